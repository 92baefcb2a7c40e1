"""The run recipe: one sectioned, typed config for every training run, read from YAML and overridden by flags.

.. code-block:: yaml

    model: {name: smollm2-135m-instruct, dtype: auto}
    method: {task: text-generation, name: sft}
    data: {train: train.jsonl, test: test.jsonl, max_length: 512}
    peft: {type: lora, r: 16, alpha: 32}
    optim: {lr: 2.0e-4, schedule: cosine}
    train: {epochs: 1, batch_size: 8, accumulate: 1}
    speed: {packing: auto, activation_checkpointing: false}
    parallel: {sharding_axis_dims: [1, -1, 1, 1]}
    output: {dir: runs/mine}

Precedence, lowest first: the schema's defaults, the task's defaults for its model (the tiny random demo VLM is
trained in full), the YAML file (``--config``), each flag, each ``--set section.key=value``. Every key has a flag
(:data:`FLAGS`); ``hfbridge finetune --print-config`` prints the resolved config, and every run saves it as
``config.yaml``, so ``hfbridge finetune --config runs/x/config.yaml`` runs it again.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hfbridge.typed_config import INVALID, ConfigError, build_section, read_yaml, write_yaml

EMBEDDED_MODEL = "smollm2-135m-instruct"
TASKS = ("text-generation", "image-text-to-text")
METHODS = ("sft", "dpo", "ipo", "hinge", "simpo", "orpo", "kto", "reward")
REFERENCES = ("auto", "adapter", "copy", "precomputed", "none")
DATA_FORMATS = ("auto", "text", "prompt_completion", "messages", "preference", "kto")
PEFT_TYPES = ("lora", "dora", "ia3", "loha", "lokr", "adalora", "vera", "boft", "oft", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelSection:
    """The model to train: a hub id, a local folder, a ``.gguf`` file or an embedded alias (``None``: the task's
    default, the embedded SmolLM2 for text, ``tiny-random-vlm`` for image-text)."""

    name: str | None = None
    dtype: str = field(default="auto", metadata={"choices": DTYPES})
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


@dataclass
class MethodSection:
    """What is trained: the task (the kind of model and data) and the method: ``sft`` (next-token loss on the
    completion or assistant turns), or preference training (docs/preference.md): ``dpo``, ``ipo``, ``hinge``,
    ``simpo``, ``orpo`` (pairs: ``prompt``/``chosen``/``rejected``), ``kto`` (``prompt``/``completion``/``label``)
    or ``reward`` (a reward model trained on pairs). The other keys are the preference methods' options."""

    task: Literal["text-generation", "image-text-to-text"] = "text-generation"
    name: str = field(default="sft", metadata={"choices": METHODS})
    beta: float | None = field(default=None, metadata={"exclusive_min": 0.0})
    label_smoothing: float = field(default=0.0, metadata={"range": (0.0, 0.5)})
    reference: str = field(default="auto", metadata={"choices": REFERENCES})
    simpo_gamma: float = 0.5
    desirable_weight: float = field(default=1.0, metadata={"exclusive_min": 0.0})
    undesirable_weight: float = field(default=1.0, metadata={"exclusive_min": 0.0})


@dataclass
class DataSection:
    """Records from ``.jsonl``, ``.csv``, ``.parquet``, a ``datasets`` folder or a hub dataset (``owner/name``
    that is not a local path, read with ``hub_config``, ``hub_revision`` and each role's split). ``train: null``
    uses the task's bundled demo data (``demo_train_size`` records); a list of sources (``PATH``, ``PATH:WEIGHT`` or
    ``{path, weight, max_samples, epochs}``) is a mixture (docs/data.md). ``test`` records are scored by exact
    match before and after. Tokenized samples are cached on disk (``cache``, ``cache_dir``, ``rebuild_cache``)."""

    train: str | list[str | dict] | None = None
    validation: str | None = None
    test: str | None = None
    format: str = field(default="auto", metadata={"choices": DATA_FORMATS})
    max_length: int | None = field(default=None, metadata={"min": 2})
    demo_train_size: int = field(default=400, metadata={"min": 1})
    cache: bool = True
    rebuild_cache: bool = False
    cache_dir: str | None = None
    # hub datasets (`owner/name` that is not a local path; docs/data.md, "Hub datasets")
    hub_config: str | None = None
    hub_revision: str | None = None
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str = "test"
    streaming: bool = False  # read the training file as training goes (docs/data.md, "Streaming")

    def __post_init__(self):
        if not isinstance(self.train, list):
            return
        only = self.train[0] if len(self.train) == 1 else None
        if isinstance(only, str) and ":" not in only and only.strip():
            self.train = only.strip()  # `--data a.jsonl`: the plain path it has always been
            return
        from hfbridge.data.mixture import normalise_train  # (imports the data layer: only for a mixture)

        self.train = normalise_train(self.train)  # each source checked, naming its position


@dataclass
class PeftSection:
    """A peft adapter (``type: none``: full fine-tuning). ``options`` go to the peft config as they are."""

    type: str = field(default="lora", metadata={"choices": PEFT_TYPES})
    r: int = field(default=16, metadata={"min": 1})
    alpha: int = field(default=32, metadata={"min": 1})
    dropout: float = field(default=0.05, metadata={"range": (0.0, 1.0)})
    target_modules: list[str] | str = "all-linear"
    options: dict = field(default_factory=dict)


@dataclass
class QuantizationSection:
    """bitsandbytes NF4 weights; with an adapter this is QLoRA."""

    load_in_4bit: bool = False


@dataclass
class OptimSection:
    """AdamW and the schedule; ``lr: null`` is 2e-4 for adapters and 2e-5 for full fine-tuning."""

    lr: float | None = field(default=None, metadata={"exclusive_min": 0.0})
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = field(default=0.05, metadata={"range": (0.0, 1.0)})
    min_lr_ratio: float = field(default=0.1, metadata={"range": (0.0, 1.0)})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    max_grad_norm: float | None = field(default=1.0, metadata={"exclusive_min": 0.0})


@dataclass
class TrainSection:
    """The loop: ``batch_size`` is the micro-batch, ``accumulate`` micro-batches make an optimizer step."""

    epochs: int = field(default=1, metadata={"min": 1})
    max_steps: int | None = field(default=None, metadata={"min": 1})
    batch_size: int = field(default=8, metadata={"min": 1})
    accumulate: int = field(default=1, metadata={"min": 1})
    validate_every_n_steps: int | None = field(default=None, metadata={"min": 1})
    seed: int = 0
    progress_bar: bool = True


@dataclass
class SpeedSection:
    """Exact speed-ups (docs/benchmarks.md). ``activation_checkpointing``: false, true/full, selective, or k."""

    packing: Literal["auto", "on", "off"] = "auto"
    pack_length: int | None = field(default=None, metadata={"min": 2})
    chunked_loss: bool = True
    activation_checkpointing: bool | str | int = False
    compile: bool = False
    liger: bool = False


@dataclass
class ParallelSection:
    """A ``(dp, fsdp, tp, sp, cp)`` device mesh and the launch (docs/distributed.md)."""

    sharding_axis_dims: list[int] | None = None
    sharding_axis_names: list[str] | None = None
    param_dtype: str | None = None
    reduce_dtype: str | None = None
    cpu_offload: bool = False
    nproc_per_node: int | None = field(default=None, metadata={"min": 1})
    nnodes: str | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None


@dataclass
class CheckpointSection:
    """Sharded checkpoints every ``save_every`` optimizer steps, the last ``keep_last`` kept."""

    dir: str | None = None
    save_every: int | None = field(default=None, metadata={"min": 1})
    keep_last: int | None = field(default=None, metadata={"min": 1})
    resume: bool = False


@dataclass
class EvalSection:
    """Exact match on up to ``samples`` test records, greedy answers of up to ``max_new_tokens``; and ``tasks``,
    lm-evaluation-harness tasks (docs/evaluation.md) scored on the in-memory model before and after training."""

    samples: int = field(default=100, metadata={"min": 1})
    max_new_tokens: int = field(default=16, metadata={"min": 1})
    batch_size: int = field(default=16, metadata={"min": 1})
    show_samples: int = field(default=5, metadata={"min": 0})
    tasks: list[str] | str = field(default_factory=list)
    tasks_limit: int | None = field(default=None, metadata={"min": 1})
    tasks_num_fewshot: int | None = field(default=None, metadata={"min": 0})
    tasks_chat_template: bool = False


@dataclass
class OutputSection:
    """The run folder; an existing non-empty one is replaced only with ``overwrite``."""

    dir: str = "runs/finetune"
    overwrite: bool = False


@dataclass
class TrackSection:
    """Experiment trackers (docs/tracking.md): ``metrics.csv`` and ``loss_curve.png`` always; ``loggers`` adds
    tensorboard, wandb (offline unless ``wandb_mode: online``) and mlflow (a file store in the run folder unless
    ``mlflow_tracking_uri``), written inside the run folder. ``run_name: null`` is the run folder's name."""

    loggers: list[str] = field(default_factory=list)
    project: str = "hfbridge"
    run_name: str | None = None
    mlflow_tracking_uri: str | None = None
    wandb_mode: str = field(default="offline", metadata={"choices": ("offline", "online")})
    wandb_entity: str | None = None


@dataclass
class RunConfig:
    """A whole run (see the module docstring)."""

    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    peft: PeftSection = field(default_factory=PeftSection)
    quantization: QuantizationSection = field(default_factory=QuantizationSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    speed: SpeedSection = field(default_factory=SpeedSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)
    track: TrackSection = field(default_factory=TrackSection)

    @property
    def lora(self) -> bool:
        """Whether an adapter is trained (any peft type but ``none``)."""
        return self.peft.type != "none"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------- flags
@dataclass(frozen=True)
class Flag:
    """The command-line flag of a config key. ``const``: a flag without a value that sets this value.
    ``repeatable``: a list key whose flag may be given several times (each value may itself be comma-separated)."""

    key: str  # section.key
    flag: str
    help: str = ""
    const: Any = None
    metavar: str | None = None
    repeatable: bool = False


# Every key of RunConfig has a flag: the names `hfbridge finetune` has always taken, the rest `--section-key`.
FLAGS: tuple[Flag, ...] = (
    Flag("model.name", "--model", "hub id, local folder, .gguf file or embedded alias (default: smollm2-135m-instruct; "
         "for image-text-to-text: tiny-random-vlm, a tiny model with random weights that shows the pipeline)"),
    Flag("model.dtype", "--dtype", "auto (fp32 on CPU, bf16 on GPUs that have it), float32, bfloat16, float16"),
    Flag("model.attn_implementation", "--attn-implementation", "sdpa (default), eager, flash_attention_2, ..."),
    Flag("model.trust_remote_code", "--trust-remote-code", "run code shipped with the model"),
    Flag("method.task", "--task", "text-generation (causal LMs, default) or image-text-to-text (vision-language "
         "models: chat records with images, see docs/image_text.md)"),
    Flag("method.name", "--method", "sft (next-token loss on completions), dpo, ipo, hinge, simpo, orpo, kto, or "
         "reward (a reward model); see docs/preference.md"),
    Flag("method.beta", "--beta", "preference temperature (default 0.1; 2.0 for simpo); orpo: the odds-ratio weight"),
    Flag("method.label_smoothing", "--label-smoothing", "dpo/simpo conservative label smoothing in [0, 0.5)"),
    Flag("method.reference", "--reference", "reference model: auto (the adapter disabled with LoRA, else a frozen "
         "copy), adapter, copy, precomputed (log-probabilities computed once before training), none"),
    Flag("method.simpo_gamma", "--simpo-gamma", "simpo's target reward margin"),
    Flag("method.desirable_weight", "--desirable-weight", "kto: weight of desirable examples"),
    Flag("method.undesirable_weight", "--undesirable-weight", "kto: weight of undesirable examples"),
    Flag("data.train", "--data", "training data: .jsonl, .csv, .parquet, a datasets folder or a hub dataset "
         "owner/name (default: demo task); repeat (or comma-separate) for a mixture, each PATH or PATH:WEIGHT (docs/data.md)",
         metavar="PATH[:WEIGHT]", repeatable=True),
    Flag("data.validation", "--val-data", "validation data (loss only): a file, folder or hub dataset"),
    Flag("data.test", "--test-data", "held-out records scored by exact match before and after training: a file, "
         "folder or hub dataset"),
    Flag("data.hub_config", "--data-config", "the config (subset) of hub datasets given by name (owner/name that "
         "is not a local path) unless their entry sets one (default: the dataset's only or default config)"),
    Flag("data.hub_revision", "--data-revision", "the revision (commit, branch or tag) of hub datasets given by name "
         "(default: the newest; offline: the cached copy)"),
    Flag("data.train_split", "--data-split", "the split of a hub training dataset (default train)"),
    Flag("data.validation_split", "--val-split", "the split of a hub --val-data dataset (default validation)"),
    Flag("data.test_split", "--test-split", "the split of a hub --test-data dataset (default test)"),
    Flag("data.format", "--format", "auto, text, prompt_completion, messages; preference or kto (preference methods)"),
    Flag("data.max_length", "--max-length", "truncate inputs to this many tokens (default: 512, or the model's "
         "context if shorter)"),
    Flag("data.demo_train_size", "--demo-train-size", "records of the bundled demo task"),
    Flag("data.cache", "--cache", "keep tokenized samples on disk and reuse them when the records, tokenizer, chat "
         "template, format and max length are the same (default on; --no-cache: tokenize every run)"),
    Flag("data.rebuild_cache", "--rebuild-cache", "tokenize again and replace the cached samples"),
    Flag("data.cache_dir", "--cache-dir", "the tokenization cache folder (default $XDG_CACHE_HOME/hfbridge/tokens "
         "or ~/.cache/hfbridge/tokens)"),
    Flag("data.streaming", "--streaming", "read the training file lazily as training goes, never all in memory "
         "(text sft, one file; file order; needs --max-steps unless --schedule constant --warmup-ratio 0; "
         "docs/data.md)"),
    Flag("peft.type", "--peft", "adapter: lora (default), dora, ia3, loha, lokr, adalora, vera, boft, oft, or none"),
    Flag("peft.type", "--full", "full fine-tuning instead of an adapter (--peft none)", const="none"),
    Flag("peft.r", "--lora-r", "adapter rank"),
    Flag("peft.alpha", "--lora-alpha", "adapter scaling numerator (scale = alpha / r)"),
    Flag("peft.dropout", "--lora-dropout", "dropout on the adapter input"),
    Flag("peft.target_modules", "--lora-targets", "'all-linear' or comma-separated module names"),
    Flag("peft.options", "--peft-options", "extra peft config keys as YAML, e.g. '{use_rslora: true}'"),
    Flag("quantization.load_in_4bit", "--load-in-4bit", "NF4 weights via bitsandbytes (QLoRA with an adapter)"),
    Flag("optim.lr", "--lr", "peak learning rate (default 2e-4 with an adapter, 2e-5 full)"),
    Flag("optim.schedule", "--schedule", "cosine, linear or constant after warmup"),
    Flag("optim.warmup_ratio", "--warmup-ratio", "share of the optimizer steps warming up linearly"),
    Flag("optim.min_lr_ratio", "--min-lr-ratio", "the schedule ends at lr * this"),
    Flag("optim.weight_decay", "--weight-decay", "AdamW weight decay (weight matrices only)"),
    Flag("optim.max_grad_norm", "--max-grad-norm", "gradient clipping by global norm (null: off)"),
    Flag("train.epochs", "--epochs", "default 1 (6 for tiny-random-vlm)"),
    Flag("train.max_steps", "--max-steps", "stop after this many optimizer steps"),
    Flag("train.batch_size", "--batch-size", "micro-batch size"),
    Flag("train.accumulate", "--accumulate", "gradient accumulation steps"),
    Flag("train.validate_every_n_steps", "--validate-every", "validation loss every N optimizer steps (default: "
         "each epoch)"),
    Flag("train.seed", "--seed", "seed of the data order, the demo data, initialisation and dropout"),
    Flag("train.progress_bar", "--progress-bar", "show a progress bar"),
    Flag("speed.packing", "--packing", "padding-free packing of each micro-batch (auto: where the model keeps "
         "samples apart)"),
    Flag("speed.pack_length", "--pack-length", "tokens per packed row (default: --max-length)"),
    Flag("speed.chunked_loss", "--chunked-loss", "the loss without the full tokens x vocabulary logits"),
    Flag("speed.activation_checkpointing", "--activation-checkpointing", "recompute activations in backward: "
         "'full' (the default when given), 'selective' (only pointwise ops), or K (every K-th layer)",
         const="full", metavar="full|selective|K"),
    Flag("speed.compile", "--compile", "torch.compile the decoder layers"),
    Flag("speed.liger", "--liger", "Liger kernels on CUDA GPUs (needs liger-kernel)"),
    Flag("parallel.sharding_axis_dims", "--sharding-axis-dims", "mesh sizes dp,fsdp,tp,sp[,cp]; one -1 is inferred "
         "from the world size (e.g. 1,-1,1,1 = FSDP over all processes; 1,-1,1,1,2 = each sequence split over 2 "
         "context-parallel ranks)"),
    Flag("parallel.sharding_axis_names", "--sharding-axis-names", "names of the four or five axes (default "
         "dp,fsdp,tp,sp[,cp])"),
    Flag("parallel.param_dtype", "--param-dtype", "FSDP2 mixed precision: dtype of the gathered parameters"),
    Flag("parallel.reduce_dtype", "--reduce-dtype", "FSDP2 mixed precision: dtype of gradient reduction"),
    Flag("parallel.cpu_offload", "--cpu-offload", "FSDP2 CPU offload of parameters, gradients and optimizer state"),
    Flag("parallel.nproc_per_node", "--nproc-per-node", "start this many processes with torchrun"),
    Flag("parallel.nnodes", "--nnodes", "torchrun --nnodes (multi-node)"),
    Flag("parallel.rdzv_endpoint", "--rdzv-endpoint", "torchrun rendezvous host:port (multi-node)"),
    Flag("parallel.rdzv_id", "--rdzv-id", "torchrun rendezvous id (multi-node)"),
    Flag("checkpoint.dir", "--checkpoint-dir", "sharded checkpoints (resumable) in this folder"),
    Flag("checkpoint.save_every", "--save-every", "checkpoint every N optimizer steps (default 100)"),
    Flag("checkpoint.keep_last", "--keep-last", "keep the last N checkpoints (default 3)"),
    Flag("checkpoint.resume", "--resume", "resume from the last complete checkpoint in --checkpoint-dir"),
    Flag("eval.samples", "--eval-samples", "held-out records to score"),
    Flag("eval.max_new_tokens", "--max-new-tokens", "tokens generated per held-out answer"),
    Flag("eval.batch_size", "--eval-batch-size", "prompts generated together"),
    Flag("eval.show_samples", "--show-samples", "held-out answers printed after training"),
    Flag("eval.tasks", "--eval-tasks", "lm-evaluation-harness tasks scored before and after training, e.g. "
         "hfbridge_dates_mc,hfbridge_dates (needs hfbridge[eval])"),
    Flag("eval.tasks_limit", "--eval-tasks-limit", "documents per harness task (default: all)"),
    Flag("eval.tasks_num_fewshot", "--eval-tasks-num-fewshot", "few-shot examples per harness prompt (default: the "
         "task's)"),
    Flag("eval.tasks_chat_template", "--eval-tasks-chat-template", "wrap harness prompts in the chat template"),
    Flag("output.dir", "--output", "the run folder (refused if not empty)"),
    Flag("output.overwrite", "--overwrite", "replace a run folder that hfbridge wrote (never another folder)"),
    Flag("track.loggers", "--logger", "experiment trackers besides metrics.csv: tensorboard, wandb, mlflow (csv is "
         "always on); repeat or comma-separate for several", metavar="csv|tensorboard|wandb|mlflow", repeatable=True),
    Flag("track.project", "--track-project", "W&B project and MLflow experiment name (default hfbridge)"),
    Flag("track.run_name", "--run-name", "the run's name in the trackers (default: the run folder's name)"),
    Flag("track.mlflow_tracking_uri", "--mlflow-tracking-uri", "MLflow store or server (default: a file store in "
         "the run folder, <run>/mlruns)"),
    Flag("track.wandb_mode", "--wandb-mode", "offline (default: written to <run>/wandb, upload later with wandb "
         "sync) or online"),
    Flag("track.wandb_entity", "--wandb-entity", "W&B entity (user or team) of an online run"),
)


def _field(key: str) -> dataclasses.Field:
    section, name = key.split(".")
    cls = typing.get_type_hints(RunConfig)[section]
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _annotation(key: str):
    section, name = key.split(".")
    return typing.get_type_hints(typing.get_type_hints(RunConfig)[section])[name]


def _parse_flag_value(key: str, text: str):
    """A flag's text as the value YAML would give (``1e-3`` a number, ``[1, 2]`` a list, ``null``), with
    comma-separated lists for list keys (``--lora-targets q_proj,v_proj``, ``--sharding-axis-dims 1,-1,1,1``)."""
    import yaml

    annotation = _annotation(key)
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, type(int | None)) else ()
    list_type = next((a for a in (annotation, *args) if typing.get_origin(a) is list), None)
    if list_type is not None and "," in text and not text.lstrip().startswith("["):
        return [yaml.safe_load(part.strip()) for part in text.split(",") if part.strip()]
    if str in args or annotation is str:
        if text in ("null", "none", "None", "~") and type(None) in args:
            return None
        if not (list_type is not None and text.lstrip().startswith("[")):
            return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--set``, ``--print-config`` and one flag per config key (values are parsed later, so that
    a flag's errors read like the file's)."""
    parser.add_argument("--config", help="a run recipe (YAML); flags override its keys")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key, e.g. --set optim.lr=1e-4 (repeatable; applied last)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag in FLAGS:
        section = flag.key.split(".")[0]
        group = groups.setdefault(section, parser.add_argument_group(f"{section} (recipe section '{section}')"))
        dest = "cfg:" + flag.key
        if flag.const is not None:
            if flag.metavar:  # an optional value: `--activation-checkpointing` alone means `full`
                group.add_argument(flag.flag, dest=dest, nargs="?", const=str(flag.const), default=None,
                                   metavar=flag.metavar, help=flag.help)
            else:
                group.add_argument(flag.flag, dest=dest, action="store_const", const=str(flag.const), default=None,
                                   help=flag.help)
        elif _annotation(flag.key) is bool:
            group.add_argument(flag.flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                               help=flag.help)
        elif flag.repeatable:
            group.add_argument(flag.flag, dest=dest, action="append", default=None, metavar=flag.metavar or "VALUE",
                               help=flag.help or None)
        else:
            group.add_argument(flag.flag, dest=dest, default=None, metavar="VALUE", help=flag.help or None)


def flag_overrides(args: argparse.Namespace) -> dict:
    """The nested mapping of the config keys given as flags."""
    nested: dict = {}
    for dest, value in vars(args).items():
        if dest.startswith("cfg:") and value is not None:
            key = dest[4:]
            section, name = key.split(".")
            if isinstance(value, list):  # a repeatable flag: every value, each possibly comma-separated
                value = [part.strip() for item in value for part in item.split(",") if part.strip()]
            elif not isinstance(value, bool):
                value = _parse_flag_value(key, value)
            nested.setdefault(section, {})[name] = value
    return nested


def set_overrides(items: list[str]) -> dict:
    """``--set section.key=value`` items as a nested mapping; a malformed item is a clear error."""
    nested: dict = {}
    problems = []
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            problems.append(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. --set optim.lr=1e-4")
            continue
        try:
            _field(key.strip())
        except (KeyError, StopIteration):
            nested.setdefault(parts[0], {})[parts[1]] = text  # reported by the schema, with "did you mean"
            continue
        nested.setdefault(parts[0], {})[parts[1]] = _parse_flag_value(key.strip(), text)
    if problems:
        raise ConfigError(problems, "(command line)")
    return nested


def merge(*layers: dict) -> dict:
    """Nested mappings merged, later layers winning key by key (sections are merged, not replaced)."""
    out: dict = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
                out[key] = merge(out[key], value)
            else:
                out[key] = value
    return out


def normalise(data: dict) -> dict:
    """Values in the forms the file may use but the schema does not: a comma-separated list for list keys."""
    data = merge(data)
    parallel = data.get("parallel")
    if isinstance(parallel, dict):
        for key in ("sharding_axis_dims", "sharding_axis_names"):
            if isinstance(parallel.get(key), str):
                parallel[key] = _parse_flag_value(f"parallel.{key}", parallel[key])
    speed = data.get("speed")
    if isinstance(speed, dict) and isinstance(speed.get("packing"), bool):
        speed["packing"] = "on" if speed["packing"] else "off"
    track = data.get("track")
    if isinstance(track, dict) and isinstance(track.get("loggers"), str):
        track["loggers"] = [part.strip() for part in track["loggers"].split(",") if part.strip()]
    return data


def parse_run_config(data: dict, source: str | None = None) -> RunConfig:
    """A :class:`RunConfig` from a nested mapping, or :class:`ConfigError` listing every problem."""
    errors: list[str] = []
    cfg = build_section(RunConfig, normalise(data), "", errors)
    if cfg is INVALID or errors:
        raise ConfigError(errors or ["config: could not be read"], source)
    errors = validate(cfg)
    if errors:
        raise ConfigError(errors, source)
    return cfg


def validate(cfg: RunConfig) -> list[str]:
    """Checks that span keys, or that the types alone do not say."""
    errors = []
    mode = cfg.speed.activation_checkpointing
    if isinstance(mode, str) and mode not in ("full", "selective") and not mode.isdigit():
        errors.append(f"speed.activation_checkpointing: must be false, true, full, selective or an integer k >= 1, "
                      f"got {mode!r}")
    if isinstance(mode, int) and not isinstance(mode, bool) and mode < 1:
        errors.append(f"speed.activation_checkpointing: k must be >= 1, got {mode}")
    if cfg.speed.pack_length is not None and cfg.data.max_length is not None and cfg.speed.pack_length < cfg.data.max_length:
        errors.append(f"speed.pack_length: must be >= data.max_length ({cfg.data.max_length}) so that every sample "
                      f"fits a packed row, got {cfg.speed.pack_length}")
    dims = cfg.parallel.sharding_axis_dims
    if dims is not None and (len(dims) not in (4, 5) or sum(d == -1 for d in dims) > 1
                             or any(d == 0 or d < -1 for d in dims)):
        errors.append(f"parallel.sharding_axis_dims: must be four sizes dp,fsdp,tp,sp or five dp,fsdp,tp,sp,cp "
                      f"(positive, at most one -1), got {dims}")
    names = cfg.parallel.sharding_axis_names
    if names is not None and (len(names) not in (4, 5) or len(set(names)) != len(names)):
        errors.append(f"parallel.sharding_axis_names: must be four or five distinct names, got {names}")
    if cfg.checkpoint.dir is None:
        for key, value in (("resume", cfg.checkpoint.resume), ("save_every", cfg.checkpoint.save_every),
                           ("keep_last", cfg.checkpoint.keep_last)):
            if value:
                errors.append(f"checkpoint.{key}: needs checkpoint.dir (--checkpoint-dir)")
    if cfg.quantization.load_in_4bit and not cfg.lora:
        errors.append("quantization.load_in_4bit: 4-bit weights cannot be trained in full; use an adapter "
                      "(peft.type: lora) for QLoRA")
    if cfg.method.task == "image-text-to-text" and cfg.data.format not in ("auto", "messages"):
        errors.append(f"data.format: image-text-to-text data is in the 'messages' format, not {cfg.data.format!r}")
    if cfg.track.loggers:  # names known, trackers installed (imported only when asked for: Lightning is slow)
        from hfbridge.tracking import check_loggers

        errors.extend(check_loggers(cfg.track.loggers))
    return errors


def resolve_config(file: str | Path | None = None, flags: dict | None = None, sets: list[str] | None = None,
                   task_defaults=None) -> RunConfig:
    """The run's config: schema defaults < ``task_defaults(user_layers)`` < the file < flags < ``--set``.

    ``task_defaults`` gets the merged user layers and returns the defaults of the task and model they name (for
    example the demo VLM's recipe), so that only keys the user left out take them.
    """
    file_layer = read_yaml(file) if file else {}
    user = merge(normalise(file_layer), normalise(flags or {}), set_overrides(sets or []))
    defaults = task_defaults(user) if task_defaults else {}
    return parse_run_config(merge(defaults, user), str(file) if file else "(command line)")


def dump_run_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (``hfbridge finetune --config`` reads it back)."""
    return write_yaml(cfg.to_dict(), path)


def config_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True, default_flow_style=None)
