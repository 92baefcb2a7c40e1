"""The declarative LLM config: a YAML file checked, key by key, before anything is loaded.

.. code-block:: yaml

    model_type: llm
    base_model: smollm2-135m-instruct
    input_features: [{name: date, type: text}]
    output_features: [{name: iso, type: text}]          # or {name: label, type: category, labels: [a, b]}
    prompt: {template: "Rewrite as ISO 8601: {date}"}   # or {task: "..."}
    adapter: {type: lora, r: 16, alpha: 32}
    quantization: {bits: 4}
    generation: {max_new_tokens: 16}                     # any transformers GenerationConfig field
    trainer: {type: finetune, epochs: 1, batch_size: 8, learning_rate: 2.0e-4}
    preprocessing: {max_sequence_length: 256, split: {type: fixed, column: split}}

Every problem is reported with the key's path and what is allowed (``trainer.batch_size: must be an integer >= 1,
got 0``); all problems of a file are reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hfbridge.models.peft_adapters import ADAPTER_TYPES
from hfbridge.typed_config import INVALID, ConfigError, build_section, read_yaml, write_yaml

RESERVED_PLACEHOLDERS = ("__task__", "__labels__")
FEATURE_TYPES_IN = ("text",)
FEATURE_TYPES_OUT = ("text", "category")
DTYPES = ("auto", "float32", "bfloat16", "float16")


# --------------------------------------------------------------------------------------------------- sections
@dataclass
class FeatureConfig:
    """A column of the data set. Inputs are ``text``; the output is ``text`` or ``category`` (with its labels)."""

    name: str
    type: str = "text"
    labels: list[str] | None = None


@dataclass
class PromptConfig:
    """How a record becomes the model's prompt.

    ``template`` has ``{column}`` placeholders (and ``{__task__}``, ``{__labels__}``); without one, a template is
    built from ``task`` and the input columns. ``chat: auto`` renders the prompt as a user turn with the model's
    chat template when it has one. ``examples`` are few-shot records shown before each prompt; ``few_shot: k``
    fills them from the training split when ``hfbridge train`` runs (they are then saved with the model).

    ``few_shot_retrieval`` says how (Ludwig's ``prompt.retrieval.type``, whose ``random`` and ``semantic``
    correspond): ``random`` (default) draws k training records once, seeded, and every prompt shows those;
    ``similarity`` keeps the whole training split as the pool (``examples``) and shows each prompt the k records
    whose input is most similar to its own (cosine of the model's mean-pooled last hidden states).
    """

    template: str | None = None
    task: str | None = None
    system: str | None = None
    chat: bool | Literal["auto"] = "auto"
    examples: list[dict] = field(default_factory=list)
    few_shot: int = field(default=0, metadata={"min": 0})
    few_shot_retrieval: Literal["random", "similarity"] = "random"


@dataclass
class AdapterConfig:
    """A peft adapter: ``lora``, ``dora``, ``ia3``, ``loha``, ``lokr``, ... ``options`` go to the peft config."""

    type: str = field(default="lora", metadata={"choices": ADAPTER_TYPES})
    r: int = field(default=8, metadata={"min": 1})
    alpha: int = field(default=16, metadata={"min": 1})
    dropout: float = field(default=0.05, metadata={"range": (0.0, 1.0)})
    target_modules: list[str] | str | None = "all-linear"
    options: dict = field(default_factory=dict)


@dataclass
class QuantizationConfig:
    """bitsandbytes weights: 4 (NF4, double quantization; with an adapter this is QLoRA) or 8 bits."""

    bits: Literal[4, 8] = 4


@dataclass
class SchedulerConfig:
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_fraction: float = field(default=0.05, metadata={"range": (0.0, 1.0)})
    min_lr_ratio: float = field(default=0.1, metadata={"range": (0.0, 1.0)})


@dataclass
class TrainerConfig:
    """``type: none`` (zero- or few-shot: nothing is trained) or ``finetune``.

    ``regularization_type`` (``l1``, ``l2``, ``l1_l2``) and ``regularization_lambda`` (Ludwig's names and defaults:
    ``l2`` and 0, so off) add ``lambda * sum |w|`` and/or ``lambda * sum w^2`` of the trainable weights to the
    training loss."""

    type: Literal["none", "finetune"] = "finetune"
    epochs: int = field(default=1, metadata={"min": 1})
    train_steps: int | None = field(default=None, metadata={"min": 1})
    batch_size: int = field(default=8, metadata={"min": 1})
    eval_batch_size: int = field(default=16, metadata={"min": 1})
    gradient_accumulation_steps: int = field(default=1, metadata={"min": 1})
    learning_rate: float | None = field(default=None, metadata={"exclusive_min": 0.0})
    learning_rate_scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    regularization_type: Literal["l1", "l2", "l1_l2"] | None = "l2"
    regularization_lambda: float = field(default=0.0, metadata={"min": 0.0})
    max_grad_norm: float | None = field(default=1.0, metadata={"exclusive_min": 0.0})
    validate_every_n_steps: int | None = field(default=None, metadata={"min": 1})
    evaluate_before: bool = True
    max_eval_samples: int | None = field(default=None, metadata={"min": 1})


@dataclass
class SplitConfig:
    """``fixed``: a column says ``train``/``validation``/``test`` (or 0/1/2); ``random``: by probabilities;
    ``auto``: ``fixed`` when the data has the column, else ``random``."""

    type: Literal["auto", "fixed", "random"] = "auto"
    column: str = "split"
    probabilities: list[float] = field(default_factory=lambda: [0.8, 0.0, 0.2])


@dataclass
class PreprocessingConfig:
    max_sequence_length: int | None = field(default=None, metadata={"min": 2})
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class ModelParameters:
    """``dtype: auto`` is float32 on CPU and bfloat16 on GPUs that have it."""

    dtype: str = field(default="auto", metadata={"choices": DTYPES})
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"


@dataclass
class LLMConfig:
    """The whole config (see the module docstring)."""

    model_type: Literal["llm"]
    base_model: str
    input_features: list[FeatureConfig]
    output_features: list[FeatureConfig]
    prompt: PromptConfig = field(default_factory=PromptConfig)
    adapter: AdapterConfig | None = None
    quantization: QuantizationConfig | None = None
    generation: dict = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    model_parameters: ModelParameters = field(default_factory=ModelParameters)

    # The seed's name for the base model.
    @property
    def model_name(self) -> str:
        return self.base_model

    @property
    def output_feature(self) -> FeatureConfig:
        return self.output_features[0]

    @property
    def max_new_tokens(self) -> int:
        return int(self.generation.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DEFAULT_MAX_NEW_TOKENS = 32


# --------------------------------------------------------------------------------------------------- cross-checks
def template_placeholders(template: str) -> list[str]:
    """The ``{name}`` fields of a format string (``{{`` and ``}}`` are literal braces)."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            names.append(name)
    return names


def _check_features(cfg: LLMConfig, errors: list[str]) -> None:
    if not cfg.input_features:
        errors.append("input_features: at least one input feature is needed")
    if len(cfg.output_features) != 1:
        errors.append(f"output_features: exactly one output feature is supported, got {len(cfg.output_features)}")
    seen: set[str] = set()
    for group, allowed in (("input_features", FEATURE_TYPES_IN), ("output_features", FEATURE_TYPES_OUT)):
        for i, feature in enumerate(getattr(cfg, group)):
            where = f"{group}[{i}]"
            if feature.type not in allowed:
                errors.append(f"{where}.type: must be one of {', '.join(allowed)}, got {feature.type!r}")
            if feature.name in seen:
                errors.append(f"{where}.name: {feature.name!r} is used by another feature")
            if feature.name in RESERVED_PLACEHOLDERS:
                errors.append(f"{where}.name: {feature.name!r} is reserved")
            seen.add(feature.name)
            if feature.type == "category":
                labels = feature.labels
                if not labels or len(labels) < 2:
                    errors.append(f"{where}.labels: a category output needs a list of at least 2 labels")
                elif len(set(labels)) != len(labels):
                    errors.append(f"{where}.labels: labels must be unique, got {labels}")
                elif any(not label.strip() for label in labels):
                    errors.append(f"{where}.labels: labels must not be empty strings")
            elif feature.labels is not None:
                errors.append(f"{where}.labels: only category outputs have labels")


def _check_prompt(cfg: LLMConfig, errors: list[str]) -> None:
    prompt = cfg.prompt
    inputs = [f.name for f in cfg.input_features]
    if prompt.template is not None:
        try:
            names = template_placeholders(prompt.template)
        except ValueError as e:
            errors.append(f"prompt.template: not a valid template ({e}); write literal braces as {{{{ and }}}}")
            return
        for name in names:
            if name == "":
                errors.append("prompt.template: empty placeholder {} ; name a column, e.g. {" + inputs[0] + "}")
            elif name in RESERVED_PLACEHOLDERS:
                if name == "__task__" and not prompt.task:
                    errors.append("prompt.template: {__task__} is used but prompt.task is not set")
                if name == "__labels__" and cfg.output_features and cfg.output_feature.type != "category":
                    errors.append("prompt.template: {__labels__} needs a category output feature")
            elif name not in inputs:
                errors.append(
                    f"prompt.template: placeholder {{{name}}} names no input feature; input features: "
                    f"{', '.join(inputs)} (add it to input_features, or fix the placeholder)"
                )
        unused = [n for n in inputs if n not in names]
        if unused:
            errors.append(f"prompt.template: input features {', '.join(unused)} appear in no placeholder")
    if prompt.few_shot_retrieval == "similarity" and prompt.few_shot < 1:
        errors.append("prompt.few_shot_retrieval: similarity needs prompt.few_shot >= 1 (how many examples each "
                      "prompt shows)")
    target = cfg.output_feature.name if cfg.output_features else None
    for i, example in enumerate(prompt.examples):
        missing = [c for c in [*inputs, target] if c is not None and c not in example]
        if missing:
            errors.append(f"prompt.examples[{i}]: missing columns {', '.join(missing)}")


def _check_generation(cfg: LLMConfig, errors: list[str]) -> None:
    from transformers import GenerationConfig

    allowed = sorted(GenerationConfig().to_dict())
    for key in cfg.generation:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            errors.append(f"generation.{key}: not a transformers GenerationConfig field{hint}")
    new_tokens = cfg.generation.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        errors.append(f"generation.max_new_tokens: must be an integer >= 1, got {new_tokens!r}")
    if any(e.startswith("generation.") for e in errors):
        return
    try:
        GenerationConfig(**cfg.generation).validate(strict=True)
    except (ValueError, TypeError) as e:
        errors.append(f"generation: {e}")


def _check_adapter(cfg: LLMConfig, errors: list[str]) -> None:
    if cfg.adapter is None:
        return
    from hfbridge.models.peft_adapters import LoRA

    try:
        LoRA(r=cfg.adapter.r, alpha=cfg.adapter.alpha, dropout=cfg.adapter.dropout,
             target_modules=cfg.adapter.target_modules, adapter_type=cfg.adapter.type,
             extra=dict(cfg.adapter.options)).peft_config()
    except (TypeError, ValueError) as e:
        errors.append(f"adapter.options: peft rejects the adapter settings: {e}")


def _check_split(cfg: LLMConfig, errors: list[str]) -> None:
    probs = cfg.preprocessing.split.probabilities
    if len(probs) != 3 or any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6 or probs[0] <= 0:
        errors.append(
            "preprocessing.split.probabilities: must be 3 non-negative numbers [train, validation, test] summing "
            f"to 1 with train > 0, got {probs}"
        )


def validate(cfg: LLMConfig) -> list[str]:
    """Checks that span several keys."""
    errors: list[str] = []
    _check_features(cfg, errors)
    if cfg.input_features and cfg.output_features:
        _check_prompt(cfg, errors)
    _check_generation(cfg, errors)
    _check_adapter(cfg, errors)
    _check_split(cfg, errors)
    if cfg.trainer.type == "finetune" and cfg.quantization is not None and cfg.adapter is None:
        errors.append("quantization: fine-tuning quantized weights needs an adapter (add an adapter section, "
                      "or use trainer.type: none)")
    return errors


def parse_config(data: dict | LLMConfig, source: str | None = None) -> LLMConfig:
    """An :class:`LLMConfig` from a mapping, or :class:`ConfigError` listing every problem."""
    if isinstance(data, LLMConfig):
        return data
    errors: list[str] = []
    if isinstance(data, dict) and "output_features" in data and isinstance(data["output_features"], list):
        # Labels are strings (YAML may read `labels: [1, 2]` as numbers).
        for feature in data["output_features"]:
            if isinstance(feature, dict) and isinstance(feature.get("labels"), list):
                feature["labels"] = [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                                     for v in feature["labels"]]
    cfg = build_section(LLMConfig, data, "", errors)
    if cfg is INVALID:
        raise ConfigError(errors or ["config: could not be read"], source)
    reported = {e.split(":")[0].split(".")[0].split("[")[0] for e in errors}
    errors += [e for e in validate(cfg) if e.split(":")[0].split(".")[0].split("[")[0] not in reported]
    if errors:
        raise ConfigError(errors, source)
    return cfg


def load_config(path: str | Path | dict) -> LLMConfig:
    """Read and validate a YAML config file (or a mapping)."""
    if isinstance(path, (dict, LLMConfig)):
        return parse_config(path)
    return parse_config(read_yaml(path), str(path))


def dump_config(cfg: LLMConfig, path: str | Path) -> Path:
    """Write the full config (defaults filled in) as YAML."""
    return write_yaml(cfg.to_dict(), path)
