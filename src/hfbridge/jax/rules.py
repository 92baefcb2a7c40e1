"""Partition rules: ordered ``(regex, PartitionSpec)`` pairs; the first regex that matches a parameter's path wins."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hfbridge.jax import tree as tree_lib
from hfbridge.jax.quant import QuantizedArray

PartitionRules = Sequence[tuple[str, P]]

# The weights' "model" dimension is split over tp, the other over fsdp and sp (ZeRO-3 style); norms replicated.
LLAMA_PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"model/embed_tokens/embedding$", P("tp", ("fsdp", "sp"))),
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", P(("fsdp", "sp"), "tp")),
    (r"self_attn/(q_proj|k_proj|v_proj)/bias$", P("tp")),
    (r"self_attn/o_proj/kernel$", P("tp", ("fsdp", "sp"))),
    (r"self_attn/o_proj/bias$", P(None)),
    (r"self_attn/(q_norm|k_norm)/scale$", P(None)),
    (r"mlp/(gate_proj|up_proj)/kernel$", P(("fsdp", "sp"), "tp")),
    (r"mlp/(gate_proj|up_proj)/bias$", P("tp")),
    (r"mlp/down_proj/kernel$", P("tp", ("fsdp", "sp"))),
    (r"mlp/down_proj/bias$", P(None)),
    (r"(input_layernorm|post_attention_layernorm)/scale$", P(None)),
    (r"model/norm/scale$", P(None)),
    (r"lm_head/kernel$", P(("fsdp", "sp"), "tp")),
)

# Gemma 2/3's extra norms and the MoE blocks (router replicated-ish, experts split over tp on the expert axis:
# each tp rank holds whole experts, their hidden dimension split over fsdp and sp).
_EXTRA_RULES: tuple[tuple[str, P], ...] = (
    (r"(pre_feedforward_layernorm|post_feedforward_layernorm)/scale$", P(None)),
    (r"(block_sparse_moe|mlp)/gate/kernel$", P(("fsdp", "sp"), None)),
    (r"experts/(w1|w3|gate_proj|up_proj)/kernel$", P("tp", ("fsdp", "sp"), None)),
    (r"experts/(w2|down_proj)/kernel$", P("tp", None, ("fsdp", "sp"))),
)

GPT2_PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"transformer/wte/embedding$", P("tp", ("fsdp", "sp"))),
    (r"transformer/wpe/embedding$", P(None, ("fsdp", "sp"))),
    (r"attn/c_attn/kernel$", P(("fsdp", "sp"), "tp")),
    (r"attn/c_attn/bias$", P("tp")),
    (r"attn/c_proj/kernel$", P("tp", ("fsdp", "sp"))),
    (r"mlp/c_fc/kernel$", P(("fsdp", "sp"), "tp")),
    (r"mlp/c_fc/bias$", P("tp")),
    (r"mlp/c_proj/kernel$", P("tp", ("fsdp", "sp"))),
    (r"c_proj/bias$", P(None)),
    (r"(ln_1|ln_2|ln_f)/(scale|bias)$", P(None)),
    (r"lm_head/kernel$", P(("fsdp", "sp"), "tp")),
)

DECODER_PARTITION_RULES = _EXTRA_RULES + LLAMA_PARTITION_RULES

DEFAULT_PARTITION_RULES: dict[str, tuple[tuple[str, P], ...]] = {
    **{name: LLAMA_PARTITION_RULES for name in ("llama", "mistral", "qwen2", "qwen3", "phi3")},
    **{name: DECODER_PARTITION_RULES for name in ("gemma", "gemma2", "gemma3_text", "mixtral", "qwen3_moe")},
    "gpt2": GPT2_PARTITION_RULES,
}

DEFAULT_AXIS_NAMES = ("dp", "fsdp", "tp", "sp")


def default_rules_for(model_type: str) -> tuple[tuple[str, P], ...]:
    return DEFAULT_PARTITION_RULES.get(model_type, DECODER_PARTITION_RULES)


def rename_axes(entry: Any, mapping: Mapping[str, str]) -> Any:
    """A spec entry (None, a name, or a tuple of names) with the names replaced by ``mapping``."""
    if entry is None:
        return None
    if isinstance(entry, tuple | list):
        return tuple(mapping.get(a, a) for a in entry)
    return mapping.get(entry, entry)


def rename_rules(rules: PartitionRules, mapping: Mapping[str, str]) -> tuple[tuple[str, P], ...]:
    """``rules`` with mesh axis names replaced by ``mapping`` (``{"fsdp": "data", ...}``)."""
    if not mapping:
        return tuple(rules)
    return tuple((pattern, P(*(rename_axes(e, mapping) for e in spec))) for pattern, spec in rules)


def axis_renaming(axis_names: Sequence[str]) -> dict[str, str]:
    """How the default names map onto custom ``sharding_axis_names``, by position: ``("data", "fully", "model",
    "seq")`` renames dp -> data, fsdp -> fully, tp -> model, sp -> seq (names beyond the fourth are extra axes)."""
    names = tuple(axis_names)
    return {d: n for d, n in zip(DEFAULT_AXIS_NAMES, names) if d != n}


class UnmatchedParameterError(ValueError):
    """A parameter whose path no partition rule matches; the message names it and lists the rules."""


def find_spec(path: str, rules: PartitionRules) -> P:
    """The spec of the first rule whose regex matches ``path`` (``re.search``); raise when none does."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            return spec
    listed = "\n  ".join(f"{pattern!r} -> {spec}" for pattern, spec in rules)
    raise UnmatchedParameterError(
        f"parameter {path!r} matches no partition rule; add a rule for it (rules, first match wins):\n  {listed}"
    )


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """``spec`` made valid for an array of ``shape``: padded or cut to its rank, and on each dimension only the
    longest prefix of mesh axes whose size product divides that dimension (the rest replicated)."""
    entries = list(spec)[: len(shape)] + [None] * max(0, len(shape) - len(spec))
    fitted = []
    for dim, entry in zip(shape, entries):
        kept: list[str] = []
        size = 1
        for axis in _axes(entry):
            if axis not in mesh.shape:
                raise ValueError(f"partition spec {spec} names mesh axis {axis!r}, but the mesh has {tuple(mesh.shape)}")
            if dim % (size * mesh.shape[axis]):
                break
            kept.append(axis)
            size *= mesh.shape[axis]
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while fitted and fitted[-1] is None:
        fitted.pop()
    return P(*fitted)


def match_partition_rules(rules: PartitionRules, params: Mapping, mesh: Mesh | None = None) -> dict:
    """A tree like ``params`` holding each parameter's PartitionSpec (fitted to its shape when ``mesh`` is given).

    A quantized parameter gets a :class:`QuantizedArray` of two specs: the rule's for the int8 values, and the
    same with the scaled-away axis replicated for the scales.
    """

    def spec_for(path: str, leaf: Any):
        spec = find_spec(path, rules)
        if isinstance(leaf, QuantizedArray):
            return QuantizedArray(*quantized_specs(spec, leaf, mesh), leaf.reduce_axis)
        return fit_spec(spec, np.shape(leaf), mesh) if mesh is not None else spec

    return tree_lib.map_with_path(spec_for, params)


def quantized_specs(spec: P, q: QuantizedArray, mesh: Mesh | None) -> tuple[P, P]:
    values = fit_spec(spec, q.shape, mesh) if mesh is not None else spec
    entries = list(values) + [None] * (q.ndim - len(values))
    entries[q.reduce_axis] = None
    scale = fit_spec(P(*entries), q.scale.shape, mesh) if mesh is not None else P(*entries)
    return values, scale


def spec_sharding(mesh: Mesh, spec: P, shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, fit_spec(spec, shape, mesh))


def make_shard_fns(rules: PartitionRules, params_shapes: Mapping, mesh: Mesh) -> dict[str, Callable]:
    """``{path: fn}`` where ``fn(array)`` places an array (numpy or JAX) on ``mesh`` by its rule.

    ``params_shapes`` is any tree with shaped leaves (arrays or ``jax.ShapeDtypeStruct``). Quantized
    parameters get a function that takes and returns a :class:`QuantizedArray`.
    """
    fns: dict[str, Callable] = {}
    for path in tree_lib.flatten(params_shapes):
        fns[path] = placement_fn(mesh, find_spec(path, rules))
    return fns


def placement_fn(mesh: Mesh, spec: P) -> Callable:
    """A function placing an array (or a QuantizedArray) on ``mesh`` by ``spec``, fitted to its shape."""

    def place(x: Any) -> Any:
        if isinstance(x, QuantizedArray):
            values_spec, scale_spec = quantized_specs(spec, x, mesh)
            return QuantizedArray(
                jax.device_put(x.values, NamedSharding(mesh, values_spec)),
                jax.device_put(x.scale, NamedSharding(mesh, scale_spec)),
                x.reduce_axis,
            )
        return jax.device_put(x, spec_sharding(mesh, spec, np.shape(x)))

    return place


def shard_params(params: Mapping, mesh: Mesh, rules: PartitionRules) -> dict:
    """Place every parameter on ``mesh`` by ``rules`` (raises for a parameter that matches no rule)."""
    return tree_lib.map_with_path(lambda path, leaf: placement_fn(mesh, find_spec(path, rules))(leaf), params)


def param_specs(params: Mapping) -> dict[str, P | None]:
    """``{path: spec}`` of the NamedShardings the parameters carry (None for other shardings)."""
    out = {}
    for path, leaf in tree_lib.flatten(params).items():
        arr = leaf.values if isinstance(leaf, QuantizedArray) else leaf
        sharding = getattr(arr, "sharding", None)
        out[path] = sharding.spec if isinstance(sharding, NamedSharding) else None
    return out


def constrain(x: jax.Array, mesh: Mesh | None, *entries: Any) -> jax.Array:
    """``with_sharding_constraint`` by ``entries`` (one per dimension) fitted to ``x``'s shape; no-op without mesh."""
    if mesh is None:
        return x
    spec = fit_spec(P(*entries), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
