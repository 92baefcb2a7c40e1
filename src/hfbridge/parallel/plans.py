"""Tensor- and sequence-parallel plans: which module is split how.

A plan maps module names to *kinds* (the Hugging Face ``_tp_plan`` vocabulary):

``colwise``         output features split (q/k/v, gate/up); input replicated, output stays split
``rowwise``         input features split (o_proj, down_proj); partial outputs summed
``colwise_gather_output``  the LM head: vocabulary split, logits gathered whole
``embedding_rowwise``      the input embeddings: vocabulary split, looked-up rows summed
``replicated_with_grad_allreduce``  weights replicated, input split over the heads (Qwen3 q_norm/k_norm);
                    their gradients are summed over the model-parallel ranks
``replicate``       not split by tensor parallelism (FSDP still shards it)

The plan comes from, in order: the user's partition rules (ordered ``(regex, placement)`` pairs over parameter
names, first match wins, every parameter must match), the model's own ``tp_plan`` (transformers builds it from
``config.base_model_tp_plan`` and the class's ``_tp_plan``), or :data:`BUILTIN_PLANS` by ``model_type``.
:func:`parallel_styles` turns kinds into ``torch.distributed.tensor.parallel`` styles, with the sequence-parallel
layouts when ``sp > 1`` (torchtitan's ``parallelize_llama`` design).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

KINDS = (
    "colwise", "rowwise", "colwise_gather_output", "embedding_rowwise", "replicated_with_grad_allreduce", "replicate",
)
_ALIASES = {"colwise_rep": "colwise_gather_output", "replicated": "replicate", "local": "replicate"}

_LLAMA_PLAN: dict[str, str] = {
    "model.embed_tokens": "embedding_rowwise",
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "lm_head": "colwise_gather_output",
}
BUILTIN_PLANS: dict[str, dict[str, str]] = {
    "llama": _LLAMA_PLAN,
    "mistral": _LLAMA_PLAN,
    "qwen2": _LLAMA_PLAN,
    "qwen3": {
        **_LLAMA_PLAN,
        "model.layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "model.layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
    },
}
# Sequence parallelism needs to know the decoder layout; these families have it.
SEQUENCE_PARALLEL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class UnmatchedParameterError(ValueError):
    """A parameter no partition rule matches; the message names it and lists the rules."""


class PlanError(ValueError):
    """A plan that cannot be applied to this model (unknown kind, conflicting rules, unsupported layout)."""


def _kind(value: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value  # a ParallelStyle, applied as given
    kind = _ALIASES.get(value, value)
    if kind not in KINDS:
        raise PlanError(f"{where}: tensor-parallel kind {value!r} is not supported; use one of {', '.join(KINDS)}")
    return kind


def _glob_to_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"\d+") + "$")


def expand_plan(model: nn.Module, plan: Mapping[str, Any]) -> dict[str, Any]:
    """``{module name: kind}`` for every module a (glob) plan entry names; entries matching nothing are errors."""
    names = [name for name, _ in model.named_modules() if name]
    out: dict[str, Any] = {}
    for pattern, value in plan.items():
        regex = _glob_to_regex(pattern)
        hits = [n for n in names if regex.match(n)]
        if not hits:
            raise PlanError(f"tensor-parallel plan entry {pattern!r} matches no module of {type(model).__name__}")
        for name in hits:
            out[name] = _kind(value, f"plan entry {pattern!r}")
    return out


def plan_from_rules(model: nn.Module, rules: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Apply ordered ``(regex, placement)`` rules to every parameter; first match wins.

    A module's parameters (weight and bias) must agree. Kinds other than ``replicate`` are returned per module;
    ``colwise`` on the output embeddings means ``colwise_gather_output`` (whole logits), ``rowwise`` on the input
    embeddings means ``embedding_rowwise``.
    """
    compiled = [(re.compile(pattern), _kind(placement, f"partition rule {pattern!r}")) for pattern, placement in rules]
    per_module: dict[str, tuple[Any, str]] = {}
    for name, _ in model.named_parameters():
        if _ADAPTER_PARAMETER.search(name):
            continue  # a LoRA weight follows the layer it adapts (adapter_plan)
        name = name.replace(".base_layer.", ".")  # rules name the adapted layer as it was before peft wrapped it
        kind = next((k for regex, k in compiled if regex.search(name)), None)
        if kind is None:
            listed = "\n  ".join(f"{p!r} -> {k}" for p, k in rules)
            raise UnmatchedParameterError(
                f"parameter {name!r} matches no partition rule; add a rule for it (first match wins):\n  {listed}"
            )
        module = name.rsplit(".", 1)[0] if "." in name else ""
        if module in per_module and per_module[module][0] != kind:
            raise PlanError(
                f"partition rules give the parameters of module {module!r} different placements "
                f"({per_module[module][1]!r}: {per_module[module][0]}, {name!r}: {kind}); they must agree"
            )
        per_module.setdefault(module, (kind, name))
    out_emb, in_emb = _embedding_names(model)
    plan = {}
    for module, (kind, _) in per_module.items():
        if kind == "colwise" and module == out_emb:
            kind = "colwise_gather_output"
        elif kind == "rowwise" and module == in_emb:
            kind = "embedding_rowwise"
        if kind != "replicate":
            plan[module] = kind
    return plan


_ADAPTER_PARAMETER = re.compile(r"\.lora_[A-Za-z_]+\.")


def adapter_plan(model: nn.Module, plan: Mapping[str, Any]) -> dict[str, Any]:
    """The plan of a model whose planned layers peft wrapped with LoRA (names relative to the model peft wrapped).

    A wrapped layer ``X`` planned ``colwise`` becomes ``X.base_layer`` column-wise and ``X.lora_B.<adapter>``
    column-wise: ``lora_A`` sees the replicated input and stays replicated, ``lora_B`` gives this rank's output
    features, added to the base layer's. One planned ``rowwise`` becomes ``X.base_layer`` and ``X.lora_A.<adapter>``
    row-wise: ``lora_A`` takes this rank's input features and its partial products are summed over the ranks,
    ``lora_B`` stays replicated and adds to the summed base output. Other adapter types (DoRA, IA3, LoHa, ...),
    LoRA dropout, and LoRA on layers planned any other way are refused, naming the layer."""
    modules = dict(model.named_modules())
    out: dict[str, Any] = {}
    for name, kind in plan.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "base_layer"):
            out[name] = kind
            continue
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not lora_a or lora_b is None:
            raise PlanError(
                f"{name!r} is wrapped by an adapter layer ({type(module).__name__}); tensor parallelism splits LoRA "
                "layers only: train this adapter type with fsdp/dp (tp*sp = 1)"
            )
        if any(bool(v) for v in (getattr(module, "use_dora", None) or {}).values()):
            raise PlanError(
                f"{name!r} has a DoRA adapter: its magnitude rescales whole weight columns, which tensor parallelism "
                "splits; train DoRA with fsdp/dp (tp*sp = 1), or use plain LoRA"
            )
        if kind not in ("colwise", "rowwise"):
            raise PlanError(
                f"LoRA on {name!r}, which the tensor-parallel plan splits as {kind!r}: LoRA layers can be split only "
                "where the plan is colwise or rowwise; leave this module out of the adapter's target_modules"
            )
        dropout = [a for a, m in (getattr(module, "lora_dropout", None) or {}).items() if getattr(m, "p", 0.0) > 0]
        if dropout:
            raise PlanError(
                f"LoRA dropout on {name!r} (adapter {dropout[0]!r}) with tensor parallelism: the ranks of a "
                "tensor-parallel group would draw their own dropout masks for one replicated lora_A, whose copies "
                "would then drift apart; use dropout=0.0 with tp"
            )
        out[f"{name}.base_layer"] = kind
        for adapter in lora_a:
            out[f"{name}.lora_B.{adapter}" if kind == "colwise" else f"{name}.lora_A.{adapter}"] = kind
    return out


def _embedding_names(model: nn.Module) -> tuple[str | None, str | None]:
    modules = {id(m): n for n, m in model.named_modules()}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return (modules.get(id(out_emb)) if out_emb is not None else None,
            modules.get(id(in_emb)) if in_emb is not None else None)


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def resolve_plan(model: nn.Module, rules: Sequence[tuple[str, Any]] | None = None) -> tuple[dict[str, Any], str]:
    """The plan for ``model`` and where it came from (``"partition rules"``, ``"the model's tp_plan"`` or
    ``"hfbridge's built-in <family> plan"``)."""
    if rules:
        return plan_from_rules(model, rules), "partition rules"
    hf_plan = getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None)
    if hf_plan:
        return expand_plan(model, hf_plan), "the model's tp_plan"
    family = model_type(model)
    if family in BUILTIN_PLANS:
        return expand_plan(model, BUILTIN_PLANS[family]), f"hfbridge's built-in {family} plan"
    parts = _vision_language_parts(model)
    scope, vlm_note = "", ""
    if parts is not None:
        decoder, tower = parts
        scope = "^" + re.escape(decoder + ".") + ".*"
        vlm_note = (f" For a vision-language model the plan splits its language model ({decoder}); the vision tower "
                    f"({tower}) and the projector stay replicated.")
    raise PlanError(
        f"{type(model).__name__} (model_type {family!r}) has no tensor-parallel plan: transformers gives it no "
        f"tp_plan and hfbridge has built-in plans for {', '.join(BUILTIN_PLANS)} only.{vlm_note} Pass partition "
        f"rules, e.g. ParallelConfig(partition_rules=[(r'{scope}(q_proj|k_proj|v_proj|gate_proj|up_proj)', "
        f"'colwise'), (r'{scope}(o_proj|down_proj)', 'rowwise'), (r'.*', 'replicate')]); they work only if the "
        "model's attention reshapes with the heads its rank holds (transformers gives a tp_plan to the models whose "
        "attention does)"
    )


def _vision_language_parts(model: nn.Module) -> tuple[str, str] | None:
    """The module names of a vision-language model's language model and vision tower (transformers'
    ``get_decoder()`` and ``get_encoder(modality="image")``), or None for other models."""
    if getattr(getattr(model, "config", None), "vision_config", None) is None:
        return None
    try:
        decoder, tower = model.get_decoder(), model.get_encoder(modality="image")
    except (AttributeError, TypeError, ValueError):
        return None
    names = {id(m): n for n, m in model.named_modules() if n}
    if id(decoder) not in names or id(tower) not in names:
        return None
    return names[id(decoder)], names[id(tower)]


def check_divisibility(config, model_parallel_size: int) -> None:
    """Tensor parallelism splits whole attention heads: ``tp * sp`` must divide the query and key-value heads."""
    if model_parallel_size <= 1 or config is None:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(text, attr, None)
        if heads is not None and heads % model_parallel_size:
            raise ValueError(
                f"tensor parallelism over tp*sp={model_parallel_size} ranks must divide {attr}={heads} of this "
                f"model; choose tp*sp among {_divisors_of_all(text)}"
            )


def _divisors_of_all(text_config) -> list[int]:
    values = [getattr(text_config, a, None) for a in ("num_attention_heads", "num_key_value_heads")]
    values = [v for v in values if v]
    top = min(values) if values else 1
    return [d for d in range(1, top + 1) if all(v % d == 0 for v in values)]


def parallel_styles(model: nn.Module, plan: Mapping[str, Any], sequence_parallel: bool) -> dict[str, Any]:
    """``{module name: ParallelStyle}`` for ``parallelize_module``.

    Without sequence parallelism activations between blocks are replicated: the row-wise layers all-reduce.
    With it (Llama-family layouts) the residual stream is a sequence-sharded DTensor: norms run on their
    shard (``SequenceParallel``), the attention and MLP blocks all-gather their input, the row-wise layers
    reduce-scatter their output, the embeddings reduce-scatter and the LM head gathers.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    styles: dict[str, Any] = {}
    for name, kind in plan.items():
        if not isinstance(kind, str):
            styles[name] = kind
        elif kind == "colwise":
            styles[name] = ColwiseParallel()
        elif kind == "rowwise":
            styles[name] = (RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
                            if sequence_parallel else RowwiseParallel())
        elif kind == "colwise_gather_output":
            styles[name] = ColwiseParallel(
                input_layouts=Shard(1) if sequence_parallel else Replicate(), output_layouts=Replicate()
            )
        elif kind == "embedding_rowwise":
            styles[name] = (RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False)
                            if sequence_parallel else RowwiseParallel(input_layouts=Replicate()))
        elif kind == "replicated_with_grad_allreduce":  # per-head norms: input (batch, seq, heads, head_dim)
            styles[name] = SequenceParallel(sequence_dim=2, use_local_output=True)
    if not sequence_parallel:
        return styles

    family = model_type(model)
    if family not in SEQUENCE_PARALLEL_FAMILIES:
        raise PlanError(
            f"sequence parallelism is implemented for the decoder layout of {', '.join(SEQUENCE_PARALLEL_FAMILIES)}, "
            f"not {family!r}; use sp=1 (tensor parallelism alone works with any plan)"
        )
    layers = [n for n, _ in model.named_modules() if re.fullmatch(r"model\.layers\.\d+", n)]
    needed = {"model.embed_tokens": "embedding_rowwise", "lm_head": "colwise_gather_output"}
    for module, kind in needed.items():
        if plan.get(module) != kind:
            raise PlanError(f"sequence parallelism needs {module!r} planned as {kind!r} (it is {plan.get(module)!r})")
    for layer in layers:
        for block in ("self_attn", "mlp"):
            rowwise = [n for n, k in plan.items() if n.startswith(f"{layer}.{block}.") and k == "rowwise"]
            if not rowwise:
                raise PlanError(f"sequence parallelism needs a row-wise layer in {layer}.{block}")
        styles[f"{layer}.input_layernorm"] = SequenceParallel()
        styles[f"{layer}.post_attention_layernorm"] = SequenceParallel()
        styles[f"{layer}.self_attn"] = PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
            use_local_output=True,
        )
        styles[f"{layer}.mlp"] = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        )
    styles["model.norm"] = SequenceParallel()
    return styles


def describe(plan: Mapping[str, Any]) -> Iterable[str]:
    for name, kind in plan.items():
        yield f"{name}: {kind if isinstance(kind, str) else type(kind).__name__}"
