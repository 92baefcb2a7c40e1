"""The parallel layer as the model modules see it: :class:`MeshPlan` implements
:class:`hfbridge.models.hooks.ParallelPlan` for a :class:`~hfbridge.parallel.ParallelConfig`.

The modules never import this: :mod:`hfbridge` registers :func:`plan_for` as their ``parallel_plan`` hook, and a
module calls it with its ``parallel`` argument. So the parallel layer receives the module's model and applies
itself, in one place (:func:`hfbridge.parallel.parallelize.parallelize_model`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from hfbridge.parallel.context import ContextParallel
from hfbridge.parallel.export import gather_plain_model
from hfbridge.parallel.materialize import is_skeleton, materialize, skeleton_for
from hfbridge.parallel.mesh import ParallelConfig, mesh_layout
from hfbridge.parallel.parallelize import parallelize_model
from hfbridge.parallel.strategy import clip_grad_norm_


@dataclass(frozen=True)
class MeshPlan:
    """What a :class:`ParallelConfig` does to a module's model, as :class:`hfbridge.models.hooks.ParallelPlan`."""

    config: ParallelConfig = field(default_factory=ParallelConfig)

    def skeleton(self, module, auto_class=None, model_name=None) -> nn.Module:
        return skeleton_for(module, auto_class, model_name)

    def parallelize(self, model: nn.Module, mesh=None, activation_checkpointing=False, compile: bool = False) -> nn.Module:
        model = parallelize_model(model, mesh, self.config, activation_checkpointing, compile)
        if mesh is not None and is_skeleton(model):
            materialize(model, mesh)
        return model

    def data_parallel_mesh(self, mesh):
        return mesh_layout(mesh).data_flat

    def context_parallel(self, mesh) -> ContextParallel | None:
        """How the module splits its batches over the ``cp`` ranks and combines their losses (``None``: cp=1)."""
        context = mesh_layout(mesh).context if mesh is not None else None
        return ContextParallel(context) if context is not None else None

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(parameters, max_norm)

    def gather(self, module) -> nn.Module | None:
        return gather_plain_model(module)


def plan_for(config: ParallelConfig | None) -> MeshPlan:
    """The plan of a module's ``parallel`` argument (``None``: the default settings)."""
    return MeshPlan(config) if config is not None else MeshPlan()
