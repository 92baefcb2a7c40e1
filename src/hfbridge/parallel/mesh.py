"""The ``(dp, fsdp, tp, sp, cp)`` device mesh and the settings of a parallel run.

``sharding_axis_dims`` gives the size of each axis named in ``sharding_axis_names``; one of them may be ``-1``
and is inferred from the world size. What the axes mean:

* ``dp``: replicas (hybrid sharding replicates over ``dp``);
* ``fsdp``: FSDP2 shards parameters, gradients and optimizer state over it;
* ``tp``: tensor parallelism (attention heads and MLP columns split over it);
* ``sp``: sequence parallelism. Its ranks split the sequence of the activations between the attention and MLP
  blocks (norms, residual stream). As in Megatron-LM and torchtitan this rides on the tensor-parallel
  collectives, so the ``sp`` ranks join the ``tp`` ranks in one model-parallel group of ``tp * sp`` ranks that
  splits the weights too.
* ``cp``: context parallelism. Its ranks split every sequence of a micro-batch (load-balanced chunks) and
  all-gather the keys and values in each attention layer (:mod:`hfbridge.parallel.context`); FSDP2 shards over
  ``fsdp x cp``.

Ranks with different ``(dp, fsdp)`` coordinates see different data; the ``tp * sp`` ranks and the ``cp`` ranks of
one group see the same batch. The mesh is laid out in the order ``dp, fsdp, cp, tp, sp`` (:data:`MESH_ORDER`)
whatever the order of the names, so the model-parallel ranks are neighbours (the same node when there are
several), then the ``cp`` ranks. Four sizes name ``dp, fsdp, tp, sp`` (``cp`` is 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hfbridge._shared import resolve_axis_dims  # noqa: F401  (re-exported by hfbridge.parallel)

AXIS_NAMES: tuple[str, ...] = ("dp", "fsdp", "tp", "sp", "cp")
MESH_ORDER: tuple[str, ...] = ("dp", "fsdp", "cp", "tp", "sp")  # how the ranks are laid out
DEFAULT_AXIS_DIMS: tuple[int, ...] = (1, -1, 1, 1)
DATA_AXES = ("dp", "fsdp")
MODEL_AXES = ("tp", "sp")


@dataclass(frozen=True)
class ParallelConfig:
    """How a model is spread over the processes of a ``torchrun`` job.

    Args:
        sharding_axis_dims: size of each axis; one ``-1`` is inferred from the world size.
        sharding_axis_names: the axes those sizes belong to, a permutation of (a subset of) dp, fsdp, tp, sp,
            cp; an axis left out has size 1. The default names five sizes ``dp, fsdp, tp, sp, cp``, or four
            ``dp, fsdp, tp, sp``.
        partition_rules: ordered ``(regex, placement)`` pairs for tensor parallelism; the first regex that
            matches (``re.search``) a parameter's name wins. ``placement`` is ``"colwise"``, ``"rowwise"``,
            ``"replicate"`` or a ``torch.distributed.tensor.parallel.ParallelStyle``. Every parameter must
            match a rule. ``None`` uses the model's own Hugging Face ``_tp_plan`` or the built-in plans.
        param_dtype: dtype of the parameters during forward/backward (FSDP2 ``MixedPrecisionPolicy``); ``None``
            keeps the loaded dtype.
        reduce_dtype: dtype of the gradient reduction; ``None`` is float32.
        cpu_offload: keep sharded parameters, gradients and optimizer state in host memory (FSDP2
            ``CPUOffloadPolicy``).
        activation_checkpointing: recompute each decoder block's activations in the backward pass.
        reshard_after_forward: free the gathered parameters of a block after its forward (ZeRO-3); ``False``
            keeps them until the backward (ZeRO-2 like, faster, more memory).
    """

    sharding_axis_dims: tuple[int, ...] = DEFAULT_AXIS_DIMS
    sharding_axis_names: tuple[str, ...] = AXIS_NAMES
    partition_rules: tuple[tuple[str, Any], ...] | None = None
    param_dtype: str | torch.dtype | None = None
    reduce_dtype: str | torch.dtype | None = "float32"
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True

    def __post_init__(self):
        object.__setattr__(self, "sharding_axis_dims", tuple(int(d) for d in self.sharding_axis_dims))
        object.__setattr__(self, "sharding_axis_names", tuple(self.sharding_axis_names))
        if self.sharding_axis_names == AXIS_NAMES and len(self.sharding_axis_dims) == len(AXIS_NAMES) - 1:
            object.__setattr__(self, "sharding_axis_names", AXIS_NAMES[:-1])  # four sizes: dp, fsdp, tp, sp
        if self.partition_rules is not None:
            object.__setattr__(self, "partition_rules", tuple(tuple(r) for r in self.partition_rules))
        check_axis_names(self.sharding_axis_dims, self.sharding_axis_names)

    def axis_sizes(self, world_size: int) -> dict[str, int]:
        """``{axis: size}`` for all five axes, with the ``-1`` resolved for ``world_size`` processes."""
        dims = resolve_axis_dims(self.sharding_axis_dims, world_size)
        sizes = dict.fromkeys(AXIS_NAMES, 1)
        sizes.update(zip(self.sharding_axis_names, dims))
        return sizes


def check_axis_names(dims: Sequence[int], names: Sequence[str]) -> None:
    if len(dims) != len(names):
        raise ValueError(f"sharding_axis_dims {tuple(dims)} and sharding_axis_names {tuple(names)} differ in length")
    unknown = [n for n in names if n not in AXIS_NAMES]
    if unknown:
        raise ValueError(f"sharding_axis_names {tuple(names)}: unknown axis {unknown[0]!r}; use {', '.join(AXIS_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"sharding_axis_names {tuple(names)} repeat a name")



def parse_axis_dims(text: str) -> tuple[int, ...]:
    """``"1,-1,2,1"`` -> ``(1, -1, 2, 1)`` (the command line's ``--sharding-axis-dims``)."""
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ValueError(f"--sharding-axis-dims {text!r}: give comma-separated integers, e.g. 1,-1,2,1") from None


def parse_axis_names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_device_mesh(config: ParallelConfig, world_size: int | None = None, device_type: str = "cpu"):
    """The 5-D ``DeviceMesh`` of ``config`` over the initialised process group, laid out ``dp, fsdp, cp, tp, sp``."""
    from torch.distributed.device_mesh import init_device_mesh

    if world_size is None:
        world_size = torch.distributed.get_world_size()
    sizes = config.axis_sizes(world_size)
    return init_device_mesh(device_type, tuple(sizes[a] for a in MESH_ORDER), mesh_dim_names=MESH_ORDER)


@dataclass
class MeshLayout:
    """The sub-meshes of a 4-D mesh that parallelism uses.

    ``data`` is the 2-D ``(dp, fsdp)`` mesh FSDP2 shards over (hybrid: replicated over dp, sharded over fsdp;
    with ``cp > 1`` it is ``(dp, fsdp x cp)``); ``data_flat`` the ``dp x fsdp`` ranks as one group (they see
    different data: token counts, sampler shards); ``model`` the 1-D tensor/sequence parallel mesh of ``tp * sp``
    ranks (``None`` when that is 1); ``context`` the 1-D ``cp`` mesh (``None`` when ``cp`` is 1).
    """

    mesh: Any
    data: Any
    data_flat: Any
    model: Any
    sizes: dict[str, int]
    context: Any = None

    @property
    def data_parallel_size(self) -> int:
        return self.sizes["dp"] * self.sizes["fsdp"]

    @property
    def model_parallel_size(self) -> int:
        return self.sizes["tp"] * self.sizes["sp"]

    @property
    def sequence_parallel(self) -> bool:
        return self.sizes["sp"] > 1

    @property
    def context_parallel_size(self) -> int:
        return self.sizes.get("cp", 1)

    @property
    def data_parallel_rank(self) -> int:
        return self.data_flat.get_local_rank()


_LAYOUTS: dict[int, MeshLayout] = {}


def mesh_layout(mesh) -> MeshLayout:
    """The :class:`MeshLayout` of a mesh built by :func:`build_device_mesh`, or of Lightning's 2-D
    ``("data_parallel", "tensor_parallel")`` mesh (read as fsdp x tp)."""
    key = id(mesh)
    if key in _LAYOUTS and _LAYOUTS[key].mesh is mesh:
        return _LAYOUTS[key]
    names = tuple(mesh.mesh_dim_names or ())
    if names == ("data_parallel", "tensor_parallel"):
        sizes = {"dp": 1, "fsdp": mesh["data_parallel"].size(), "tp": mesh["tensor_parallel"].size(), "sp": 1,
                 "cp": 1}
        data = mesh["data_parallel"]
        data_flat = data
        model = mesh["tensor_parallel"] if sizes["tp"] > 1 else None
        context = None
    elif names in (MESH_ORDER, AXIS_NAMES[:-1]):  # built by build_device_mesh (or by hand without cp)
        sizes = {a: mesh[a].size() if a in names else 1 for a in AXIS_NAMES}
        data = mesh["dp", "fsdp"]
        data_flat = data._flatten("dp_fsdp")
        model = mesh["tp", "sp"]._flatten("tp_sp") if sizes["tp"] * sizes["sp"] > 1 else None
        context = mesh["cp"] if sizes["cp"] > 1 else None
        if context is not None:  # FSDP2 shards over fsdp x cp (and averages gradients over it)
            mesh["fsdp", "cp"]._flatten("fsdp_cp")
            data = mesh["dp", "fsdp_cp"]
    else:
        raise ValueError(
            f"a device mesh with axes {names} is not understood: build it with hfbridge.parallel.build_device_mesh "
            f"(axes {MESH_ORDER}) or use Lightning's ModelParallelStrategy mesh"
        )
    layout = MeshLayout(mesh, data, data_flat, model, sizes, context)
    _LAYOUTS[key] = layout
    return layout
