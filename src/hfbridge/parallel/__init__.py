"""Scale out over ``torch.distributed``: a ``(dp, fsdp, tp, sp)`` device mesh, FSDP2 with tensor and sequence
parallelism, sharded checkpoints with resume, and ``torchrun`` launching. See docs/distributed.md.

* :class:`ParallelConfig`, :func:`build_device_mesh` (:mod:`~hfbridge.parallel.mesh`): the mesh, and the one way
  it is built from axis sizes;
* :func:`parallelize_model` (:mod:`~hfbridge.parallel.parallelize`): the one place where tensor parallelism, activation
  checkpointing, ``torch.compile`` and FSDP2 are applied, in that order;
* :class:`MeshPlan` (:mod:`~hfbridge.parallel.mesh_plan`): that, as the model modules call it
  (:class:`hfbridge.models.hooks.ParallelPlan`; they never import this package);
* :class:`MeshParallelStrategy`, :class:`ShardedCheckpoint` (:mod:`~hfbridge.parallel.strategy`): Lightning;
* :func:`export_hf` (:mod:`~hfbridge.parallel.export`): a checkpoint of any layout to a Hugging Face folder.
"""

from hfbridge._shared import lazy_exports
from hfbridge.parallel.mesh import (
    AXIS_NAMES,
    DEFAULT_AXIS_DIMS,
    MeshLayout,
    ParallelConfig,
    build_device_mesh,
    mesh_layout,
    resolve_axis_dims,
)

_LAZY = {
    "parallelize_model": "hfbridge.parallel.parallelize",
    "MeshPlan": "hfbridge.parallel.mesh_plan",
    "MeshParallelStrategy": "hfbridge.parallel.strategy",
    "ShardedCheckpoint": "hfbridge.parallel.strategy",
    "export_hf": "hfbridge.parallel.export",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "AXIS_NAMES",
    "DEFAULT_AXIS_DIMS",
    "MeshLayout",
    "MeshParallelStrategy",
    "MeshPlan",
    "ParallelConfig",
    "ShardedCheckpoint",
    "build_device_mesh",
    "export_hf",
    "mesh_layout",
    "parallelize_model",
    "resolve_axis_dims",
]
