"""The device mesh built from ``sharding_axis_dims`` and the names of the axes activations are sharded over."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from hfbridge._shared import resolve_axis_dims

AxisNames = str | tuple[str, ...] | None

DEFAULT_AXIS_DIMS = (1, -1, 1, 1)
DEFAULT_AXIS_NAMES = ("dp", "fsdp", "tp", "sp")


@dataclass(frozen=True)
class PartitionAxis:
    """Which mesh axes shard which activation dimension (inputs, attention, the residual stream), with EasyDeL's
    field names.

    ``batch_axis`` shards the batch; ``sequence_axis`` the sequence of inputs (``shard_batch``) and, unless
    ``query_sequence_axis`` is set, of queries; ``key_sequence_axis`` the key sequence (None: keys are gathered);
    ``head_axis`` the attention heads; ``attention_dim_axis`` the head dimension; ``hidden_state_axis``, when set,
    the hidden dimension of the residual stream (a constraint after the embedding and each layer). The
    ``generation_*`` fields replace the query-sequence, head, key-sequence and head-dimension axes while decoding one
    token at a time with a KV cache.
    """

    batch_axis: AxisNames = ("dp", "fsdp")
    sequence_axis: AxisNames = "sp"
    query_sequence_axis: AxisNames = None
    key_sequence_axis: AxisNames = None
    head_axis: AxisNames = "tp"
    attention_dim_axis: AxisNames = None
    hidden_state_axis: AxisNames = None
    generation_query_sequence_axis: AxisNames = None
    generation_head_axis: AxisNames = "tp"
    generation_key_sequence_axis: AxisNames = None
    generation_attention_dim_axis: AxisNames = None

    @property
    def query_axis(self) -> AxisNames:
        return self.query_sequence_axis if self.query_sequence_axis is not None else self.sequence_axis

    def renamed(self, mapping: dict[str, str]) -> PartitionAxis:
        """The same assignment with mesh axis names replaced by ``mapping`` (``{"tp": "model", ...}``)."""
        from hfbridge.jax.rules import rename_axes

        return dataclasses.replace(self, **{f.name: rename_axes(getattr(self, f.name), mapping)
                                            for f in dataclasses.fields(self)})


def devices_for(backend: str | None = None) -> list:
    """``jax.devices(backend)``, with a clear error for a backend this machine lacks."""
    try:
        return list(jax.devices(backend))
    except RuntimeError as e:
        raise ValueError(
            f"backend {backend!r} is not available ({e}); this machine has: {', '.join(available_backends())}"
        ) from e


def available_backends() -> list[str]:
    found = []
    for name in ("cpu", "gpu", "tpu"):
        try:
            jax.devices(name)
            found.append(name)
        except RuntimeError:
            pass
    return found



def create_mesh(
    axis_dims: Sequence[int] = DEFAULT_AXIS_DIMS,
    axis_names: Sequence[str] = DEFAULT_AXIS_NAMES,
    backend: str | None = None,
    devices: Sequence | None = None,
) -> Mesh:
    """A mesh over ``devices`` (default: all devices of ``backend``) shaped by ``axis_dims`` (one -1 inferred)."""
    axis_names = tuple(axis_names)
    if len(axis_names) != len(tuple(axis_dims)):
        raise ValueError(f"sharding_axis_dims {tuple(axis_dims)} and sharding_axis_names {axis_names} differ in length")
    if len(set(axis_names)) != len(axis_names):
        raise ValueError(f"sharding_axis_names {axis_names} repeat a name")
    devices = list(devices) if devices is not None else devices_for(backend)
    dims = resolve_axis_dims(axis_dims, len(devices), size_name="device count", unit="devices")
    grid = np.array(devices, dtype=object).reshape(dims)
    return Mesh(grid, axis_names, axis_types=(AxisType.Auto,) * len(axis_names))
