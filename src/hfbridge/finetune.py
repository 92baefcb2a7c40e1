"""The fine-tuning job behind ``hfbridge finetune``: check everything, load, score, train, score, save.

Everything cheap is checked before the model is loaded: the output folder, every data record, the model's
files and context length, bitsandbytes for 4-bit. The run writes into a hidden temporary folder beside the
output folder, renamed into place only when everything is written.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hfbridge.data.datamodule import CausalLMDataModule, load_records
from hfbridge.data.demo import write_demo_data
from hfbridge.io import check_output_dir
from hfbridge.models import loading
from hfbridge.parallel import job as parallel_job

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """All settings of a fine-tuning run (the command line's options)."""

    model: str = loading.EMBEDDED_NAME
    data: str | None = None  # None: the bundled date-normalisation demo task
    val_data: str | None = None
    test_data: str | None = None  # held-out records scored by exact match before and after
    data_format: str = "auto"
    output: str = "runs/finetune"
    overwrite: bool = False
    max_length: int | None = None  # None: 512 or the model's context, whichever is shorter
    batch_size: int = 8
    accumulate: int = 1
    epochs: int = 1
    max_steps: int = -1
    lr: float | None = None
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] | str = "all-linear"
    load_in_4bit: bool = False
    dtype: str = "auto"
    seed: int = 0
    eval_samples: int = 100
    max_new_tokens: int = 16
    show_samples: int = 5
    demo_train_size: int = 400
    trust_remote_code: bool = False
    progress_bar: bool = True
    packing: bool | str = "auto"  # auto | on | off: padding-free packing where the model keeps samples apart
    pack_length: int | None = None  # tokens per packed row (default: max_length)
    chunked_loss: bool = True  # the loss without the full tokens x vocabulary logits
    activation_checkpointing: bool | str | int = False  # True/'full', 'selective', or k (every k-th layer)
    compile: bool = False  # torch.compile of the decoder layers
    liger: bool = False  # Liger kernels on CUDA GPUs (needs liger-kernel)
    # parallelism, checkpoints and launch (hfbridge.parallel, docs/distributed.md)
    sharding_axis_dims: str | tuple[int, ...] | None = None  # e.g. "1,-1,2,1" over (dp, fsdp, tp, sp)
    sharding_axis_names: str | tuple[str, ...] | None = None
    param_dtype: str | None = None
    reduce_dtype: str | None = None
    cpu_offload: bool = False
    checkpoint_dir: str | None = None
    save_every: int | None = None
    keep_last: int | None = None
    resume: bool = False
    nproc_per_node: int | None = None  # launch only: hfbridge finetune --nproc-per-node N starts torchrun
    nnodes: str | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class FinetuneResult:
    output: Path
    before: float | None
    after: float | None
    train_seconds: float
    samples: list[dict]


def _say(message: str) -> None:
    if parallel_job.is_main_process():
        print(f"[hfbridge] {message}", flush=True)


def check_inputs(cfg: FinetuneConfig) -> None:
    """Every check that needs no model weights."""
    check_output_dir(cfg.output, cfg.overwrite)
    for name, value in (("batch_size", cfg.batch_size), ("accumulate", cfg.accumulate), ("epochs", cfg.epochs)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {cfg.max_length}")
    if cfg.load_in_4bit:
        loading.require_bitsandbytes()
    from hfbridge.models.speed import check_checkpointing_mode

    check_checkpointing_mode(cfg.activation_checkpointing)


def make_trainer(cfg: FinetuneConfig, work: Path, max_grad_norm: float | None, job=None):
    """The Lightning Trainer of a fine-tuning job: per-step CSV metrics in ``work``; on a parallel ``job`` its
    strategy and sharded checkpoints."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    parallel = parallel_job.trainer_kwargs(job)
    callbacks = [TQDMProgressBar(refresh_rate=1)] if cfg.progress_bar else []
    return pl.Trainer(
        max_epochs=cfg.epochs, max_steps=cfg.max_steps, accumulate_grad_batches=cfg.accumulate,
        gradient_clip_val=max_grad_norm, logger=CSVLogger(save_dir=str(work), name="", version=""),
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(work),
        callbacks=callbacks + parallel.pop("callbacks", []), **parallel,
    )


def save_run_outputs(module, work: Path, cfg: FinetuneConfig) -> None:
    """The loss curve, and the model loadable by plain transformers (``model/``, with the adapter merged) and the
    adapter alone (``adapter/``) when there is one (4-bit: the adapter only)."""
    from hfbridge.reporting import plot_loss_curve

    metrics_csv = work / "metrics.csv"
    if metrics_csv.exists():
        plot_loss_curve(metrics_csv, work / "loss_curve.png")
    if cfg.lora:
        module.save_pretrained(work / "adapter")
    if cfg.lora and not cfg.load_in_4bit:
        module.save_pretrained(work / "model", merged=True)
    elif not cfg.lora:
        module.save_pretrained(work / "model")


def run_finetune(cfg: FinetuneConfig) -> FinetuneResult:
    import lightning.pytorch as pl

    from hfbridge.evaluation import exact_match
    from hfbridge.models.causal_lm import HFAutoModelForCausalLM
    from hfbridge.optim import OptimizerConfig
    from hfbridge.peft import LoRA, trainable_parameters

    check_inputs(cfg)
    output = Path(cfg.output)
    job = parallel_job.start(cfg)  # under torchrun, or with a mesh/checkpoints: process group and mesh first
    with parallel_job.output_dir(job, output, cfg.overwrite) as work:
        # 1. Data: read and check every record before any weights are loaded.
        train_path, val_path, test_path = cfg.data, cfg.val_data, cfg.test_data
        if train_path is None:
            train_path, demo_test = write_demo_data(work / "data", n_train=cfg.demo_train_size, seed=cfg.seed)
            test_path = test_path or demo_test
            _say(f"no --data given: using the bundled date-normalisation task ({cfg.demo_train_size} train records)")
        train_records, fmt = load_records(train_path, cfg.data_format)
        val_records = load_records(val_path, fmt)[0] if val_path else None
        test_records = load_records(test_path, fmt)[0][: cfg.eval_samples] if test_path else None
        if test_records is not None and fmt == "text":
            _say("the 'text' format has no prompt/answer pairs: skipping the exact-match evaluation")
            test_records = None

        # 2. The model's files and context, still without weights.
        model_path = loading.resolve_model_path(cfg.model, cfg.trust_remote_code)
        model_config = loading.load_config(model_path, cfg.trust_remote_code)
        loading.check_max_length(cfg.max_length, model_config, "--max-length")
        max_length = cfg.max_length or min(512, loading.context_length(model_config) or 512)

        # 3. Load.
        pl.seed_everything(cfg.seed, verbose=False)
        transform = None
        if cfg.lora:
            transform = LoRA(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_targets)
        module = HFAutoModelForCausalLM(
            model_name=str(model_path), model_transform=transform, load_in_4bit=cfg.load_in_4bit,
            default_dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
            optim=OptimizerConfig(lr=cfg.lr, warmup_ratio=cfg.warmup_ratio, schedule=cfg.schedule),
            chunked_loss=cfg.chunked_loss, activation_checkpointing=cfg.activation_checkpointing,
            compile=cfg.compile, liger=cfg.liger,
            device_mesh=job.mesh if job else None, parallel=job.config if job else None,
        )
        t0 = time.time()
        module.configure_model()
        trainable, total = trainable_parameters(module.model)
        _say(f"loaded {cfg.model} in {time.time() - t0:.1f}s: {total / 1e6:.1f}M parameters, "
             f"{trainable / 1e6:.2f}M trainable ({'LoRA' if cfg.lora else 'full fine-tuning'})")
        tokenizer = module.tokenizer
        datamodule = CausalLMDataModule(
            tokenizer, train_records, val_records, data_format=fmt, max_length=max_length,
            batch_size=cfg.batch_size, seed=cfg.seed, packing={"on": True, "off": False}.get(cfg.packing, cfg.packing),
            pack_length=cfg.pack_length,
        )

        def score(label: str) -> float | None:
            if not test_records:
                return None
            t = time.time()
            model = parallel_job.eval_model(job, module)  # on a parallel job: a gathered copy, on rank 0
            if model is None:
                return None
            result = exact_match(model, tokenizer, test_records, fmt, max_new_tokens=cfg.max_new_tokens)
            _say(f"exact match {label} fine-tuning: {result.accuracy:.1%} on {len(test_records)} held-out records "
                 f"({time.time() - t:.0f}s)")
            return result.accuracy

        before = score("before")

        # 4. Train.
        trainer = make_trainer(cfg, work, module.optim.max_grad_norm, job)
        t0 = time.time()
        trainer.fit(module, datamodule, ckpt_path=parallel_job.resume_path(job))
        train_seconds = time.time() - t0
        _say(f"trained {trainer.global_step} optimizer steps in {train_seconds:.0f}s")

        # 5. Score again and show samples.
        after = score("after")
        samples = []
        eval_model = parallel_job.eval_model(job, module) if test_records else None
        if eval_model is not None:
            from hfbridge.data.formats import prompt_and_reference
            from hfbridge.generation import generate

            shown = test_records[: cfg.show_samples]
            pairs = [prompt_and_reference(r, fmt) for r in shown]
            predictions = generate(eval_model, tokenizer, [p for p, _ in pairs], max_new_tokens=cfg.max_new_tokens)
            for (prompt, reference), prediction in zip(pairs, predictions):
                question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
                samples.append({"prompt": question, "reference": reference, "prediction": prediction})
                _say(f"  {question!r} -> {prediction!r} (reference {reference!r})")

        # 6. Save: the model loadable by plain transformers, and the adapter alone when there is one.
        save_run_outputs(module, work, cfg)
        summary = {
            "config": asdict(cfg), "model_path": str(model_path), "format": fmt,
            "exact_match_before": before, "exact_match_after": after,
            "optimizer_steps": trainer.global_step, "train_seconds": round(train_seconds, 1),
            "samples": samples, "torch": torch.__version__,
        }
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    parallel_job.finish(job)
    _say(f"saved to {output}/ (model/, {'adapter/, ' if cfg.lora else ''}metrics.csv, loss_curve.png, summary.json)")
    return FinetuneResult(output, before, after, train_seconds, samples)
