"""Scale out over ``torch.distributed``: a ``(dp, fsdp, tp, sp)`` device mesh, FSDP2 with tensor and sequence
parallelism, sharded checkpoints with resume, and ``torchrun`` launching. See docs/distributed.md.

* :class:`ParallelConfig`, :func:`build_device_mesh` (:mod:`~hfbridge.parallel.mesh`): the mesh;
* :func:`parallelize_model` (:mod:`~hfbridge.parallel.apply`): the one place parallelism is applied;
* :class:`MeshParallelStrategy`, :class:`ShardedCheckpoint` (:mod:`~hfbridge.parallel.strategy`): Lightning;
* :func:`export_hf` (:mod:`~hfbridge.parallel.export`): a checkpoint of any layout to a Hugging Face folder.
"""

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
    "parallelize_model": "hfbridge.parallel.apply",
    "MeshParallelStrategy": "hfbridge.parallel.strategy",
    "ShardedCheckpoint": "hfbridge.parallel.strategy",
    "export_hf": "hfbridge.parallel.export",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hfbridge.parallel' has no attribute {name!r}")


__all__ = [
    "AXIS_NAMES",
    "DEFAULT_AXIS_DIMS",
    "MeshLayout",
    "MeshParallelStrategy",
    "ParallelConfig",
    "ShardedCheckpoint",
    "build_device_mesh",
    "export_hf",
    "mesh_layout",
    "parallelize_model",
    "resolve_axis_dims",
]
