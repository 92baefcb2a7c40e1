"""The one job pipeline: check everything cheap -> load -> score -> train -> score -> gather once -> save.

Every training run goes through :func:`run` with a :class:`~hfbridge.recipe.config.RunConfig` and a task
(:mod:`hfbridge.recipe.tasks`, or a face's own, like the declarative one). The run is written into a hidden
temporary folder beside the output folder, renamed into place only when everything is written; on several
processes rank 0 writes it and the model is gathered once, after training, for scoring and for both saves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hfbridge.console import say
from hfbridge.io import check_output_dir
from hfbridge.parallel import runtime
from hfbridge.recipe.config import RunConfig
from hfbridge.recipe.tasks import Task, task_for


@dataclass
class RunResult:
    output: Path
    before: object
    after: object
    train_seconds: float
    samples: list[dict]
    optimizer_steps: int


def build_trainer(cfg: RunConfig, work: Path | None, job=None, **overrides):
    """The one Lightning ``Trainer`` of hfbridge runs: per-step CSV metrics in ``work`` and the trackers of
    ``track.loggers`` (with the per-step metrics and the config of :mod:`hfbridge.tracking`), gradient clipping by
    ``optim.max_grad_norm``, validation every ``train.validate_every_n_steps`` optimizer steps (default: each
    epoch), a progress bar, and on a parallel ``job`` its strategy and sharded checkpoints."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import TQDMProgressBar

    from hfbridge import tracking

    train = cfg.train
    kwargs = runtime.trainer_kwargs(job)
    callbacks = [TQDMProgressBar(refresh_rate=1)] if train.progress_bar else []
    loggers = tracking.build_loggers(cfg, work)
    if loggers:
        callbacks += [tracking.StepMetrics(), tracking.LogHyperparameters(cfg.to_dict())]
    kwargs["callbacks"] = callbacks + kwargs.pop("callbacks", [])
    if train.validate_every_n_steps:
        kwargs.update(val_check_interval=train.validate_every_n_steps * train.accumulate,
                      check_val_every_n_epoch=None)
    kwargs.update(overrides)
    return pl.Trainer(
        max_epochs=train.epochs, max_steps=train.max_steps or -1, accumulate_grad_batches=train.accumulate,
        gradient_clip_val=cfg.optim.max_grad_norm,
        logger=loggers or False,
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=train.progress_bar,
        enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=str(work) if work is not None else None, **kwargs,
    )


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _score(task: Task, model, module, data, cfg: RunConfig, label: str):
    if model is None:  # another rank holds the gathered model
        return None
    t0 = time.time()
    score = task.score(model, module, data, cfg, label)
    if score is None:
        return None
    say(f"{score.message} ({time.time() - t0:.0f}s)")
    return score.value


def run_identity(cfg: RunConfig, data, data_parallel: int) -> dict:
    """What a checkpoint folder must agree with to be resumed: the settings that change what is trained (not the
    output, logging, length of the run or mesh layout: checkpoints are layout-free), the training records' content,
    and the global batch layout."""
    def digest(value) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()[:16]

    settings = {k: v for k, v in cfg.to_dict().items() if k in ("model", "method", "peft", "quantization", "optim")}
    settings["data"] = {"format": cfg.data.format, "max_length": cfg.data.max_length}
    settings["seed"] = cfg.train.seed
    return {"config": digest(settings), "training_data": digest(data.train),
            "global_batch": cfg.train.batch_size * data_parallel, "accumulate": cfg.train.accumulate}


def _final_paths(value, work: Path, output: Path):
    """``value`` (paths in nested dicts and lists) with every path inside the run's temporary folder ``work`` (the
    demo data written there) named where it will be once the folder is renamed to ``output``."""
    if isinstance(value, dict):
        return {k: _final_paths(v, work, output) for k, v in value.items()}
    if isinstance(value, list):
        return [_final_paths(v, work, output) for v in value]
    if isinstance(value, str) and Path(value).is_absolute():
        try:
            return str(Path(output) / Path(value).relative_to(work))
        except ValueError:
            return value
    return value


def run(cfg: RunConfig, task: Task | None = None) -> RunResult:
    """Run ``cfg`` (see the module docstring); returns what was scored and saved."""
    import lightning.pytorch as pl

    task = task or task_for(cfg.method.task, cfg.method.name)
    # 1. Everything cheap: the output folder and the options, then the process group and mesh sizes.
    output = check_output_dir(cfg.output.dir, cfg.output.overwrite)
    task.check(cfg)
    harness = None  # lm-evaluation-harness tasks (eval.tasks): names and data checked now, scored with the model
    if cfg.eval.tasks:
        from hfbridge.harness import lm_eval_runner

        harness = lm_eval_runner.prepare_run_tasks(cfg.eval, task.name)
    if cfg.quantization.load_in_4bit:
        from hfbridge.models import loading

        loading.require_bitsandbytes()
    job = runtime.start(cfg)
    with runtime.output_dir(job, output, cfg.output.overwrite) as work, _threads(task.threads(cfg)):
        # Every record, then the model's files and context, still without weights.
        data = task.read_data(cfg, work)
        model_path, context = task.check_model(cfg)
        runtime.check_checkpoints(job, run_identity(cfg, data, runtime.data_parallel_size(job)))
        task.write_config(cfg, work)

        # 2. Load.
        pl.seed_everything(cfg.train.seed, verbose=False)
        t0 = time.time()
        module = task.module(cfg, model_path, job)
        module.configure_model()
        say(task.loaded_message(cfg, module, time.time() - t0))

        # 3. Score before (on a mesh: a gathered copy, on rank 0).
        before = harness_before = None
        if (data.test or harness) and task.score_before(cfg):
            plain = runtime.plain_model(job, module)
            if data.test:
                before = _score(task, plain, module, data, cfg, task.before_label(cfg))
            if harness:
                harness_before = lm_eval_runner.score_run(harness, plain, module.tokenizer, cfg.eval,
                                                          task.before_label(cfg))

        # 4. Train.
        trainer, train_seconds, after, samples, harness_after = None, 0.0, None, [], None
        if task.trains(cfg):
            datamodule = task.datamodule(cfg, module, data, context)
            resume = runtime.resume_path(job)
            if resume is not None and getattr(datamodule, "reads_before_restore", False):
                # Lightning reads the first batch of a loader of unknown length (a stream) before it restores the
                # checkpoint: tell the data module where the checkpoint stopped now.
                from hfbridge.parallel import checkpoint as ckpt

                position = ckpt.read_meta(ckpt.resolve_checkpoint(resume)).get("data_position")
                if position:
                    datamodule.resume_at(position["epoch"], position["batches"])
            trainer = build_trainer(cfg, work, job, **task.trainer_overrides(cfg))
            module.model.train()  # scoring put it in eval mode
            t0 = time.time()
            with warnings.catch_warnings():  # the run folder already holds the config: Lightning's logger says so
                warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
                trainer.fit(module, datamodule, ckpt_path=resume)
            train_seconds = time.time() - t0
            say(f"trained {trainer.global_step} optimizer steps in {train_seconds:.0f}s")

        # 5. Gather once; score, show and save from that one plain model.
        model = runtime.plain_model(job, module)
        if trainer is not None:
            after = _score(task, model, module, data, cfg, "after")
            if harness:
                harness_after = lm_eval_runner.score_run(harness, model, module.tokenizer, cfg.eval, "after")
            samples = task.samples(model, module, data, cfg) if model is not None else []
        steps = trainer.global_step if trainer is not None else 0
        if model is not None:
            summary = {
                **task.summary(cfg), "config": cfg.to_dict(), "model_path": str(model_path), "format": data.format,
                "data": _final_paths(data.paths, work, output),
                "data_mixture": _final_paths(getattr(task, "data_mixture", None), work, output),
                "exact_match_before": before, "exact_match_after": after,
                "harness_before": harness_before, "harness_after": harness_after,
                "optimizer_steps": steps, "train_seconds": round(train_seconds, 1), "samples": samples,
                "torch": torch.__version__,
            }
            task.save(model, module, work, cfg, summary)
    runtime.finish(job)
    say(task.saved_message(cfg, output))
    return RunResult(output, before, after, train_seconds, samples, steps)
