"""A declarative config translated into the run recipe, and fine-tuning an :class:`~hfbridge.declarative.LLM`
with the core: samples in a core format, ``CausalLMDataModule``, ``HFAutoModelForCausalLM`` (with the trainer's
regularization: :class:`~hfbridge.declarative.module.DeclarativeCausalLM`) and the one Trainer builder of
:mod:`hfbridge.recipe.pipeline` (loss per label token of the optimizer step, labels shifted once, per sample).
Nothing here re-implements the job: ``hfbridge train`` runs :func:`hfbridge.recipe.pipeline.run`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from hfbridge.declarative.schema import LLMConfig
from hfbridge.recipe.config import RunConfig, parse_run_config


def run_config(cfg: LLMConfig, dataset: str | Path | None = None, output: str | Path | None = None,
               overwrite: bool = False, seed: int = 42, progress_bar: bool = True,
               parallel: dict | None = None) -> RunConfig:
    """The run recipe a seed-003 config stands for (what ``hfbridge finetune`` would be given). ``parallel`` is
    the recipe's ``parallel`` section (``hfbridge train --nproc-per-node 2 --sharding-axis-dims 1,-1,1,1``)."""
    t, schedule, adapter = cfg.trainer, cfg.trainer.learning_rate_scheduler, cfg.adapter
    peft = {"type": "none"}
    if adapter is not None:
        peft = {"type": adapter.type, "r": adapter.r, "alpha": adapter.alpha, "dropout": adapter.dropout,
                "target_modules": adapter.target_modules or "all-linear", "options": dict(adapter.options)}
    data = {"train": str(dataset) if dataset else None, "max_length": cfg.preprocessing.max_sequence_length}
    return parse_run_config({
        "model": {"name": cfg.base_model, "dtype": cfg.model_parameters.dtype,
                  "trust_remote_code": cfg.model_parameters.trust_remote_code,
                  "attn_implementation": cfg.model_parameters.attn_implementation},
        "data": data,
        "peft": peft,
        # 4-bit weights are trained through an adapter only; a zero-shot run (no adapter) trains nothing
        "quantization": {"load_in_4bit": cfg.quantization is not None and cfg.quantization.bits == 4
                         and adapter is not None},
        "optim": {"lr": t.learning_rate, "schedule": schedule.decay, "warmup_ratio": schedule.warmup_fraction,
                  "min_lr_ratio": schedule.min_lr_ratio, "weight_decay": t.weight_decay,
                  "max_grad_norm": t.max_grad_norm},
        "train": {"epochs": t.epochs, "max_steps": t.train_steps, "batch_size": t.batch_size,
                  "accumulate": t.gradient_accumulation_steps, "validate_every_n_steps": t.validate_every_n_steps,
                  "seed": seed, "progress_bar": progress_bar},
        "eval": {"batch_size": t.eval_batch_size, "max_new_tokens": cfg.max_new_tokens},
        "output": {"dir": str(output) if output else "runs/llm", "overwrite": overwrite},
        "parallel": {k: v for k, v in (parallel or {}).items() if v is not None},
    }, "(declarative config)")


def module_for(llm, cfg: RunConfig, job=None):
    """The Lightning module that trains ``llm``'s model, built as ``hfbridge finetune`` builds its own
    (:func:`hfbridge.recipe.tasks.module_options`: adapter, optimizer, speed, mesh) plus the trainer's
    regularization.

    One process: ``llm.model`` is trained in place (adapter, quantization and device as loaded; a model loaded
    from a merged save gets the config's adapter here). On a device mesh (``job``) the LLM holds no model: the
    module loads the base model on the meta device, adds the adapter, shards it and each rank loads its shards.
    """
    from hfbridge.declarative.module import DeclarativeCausalLM
    from hfbridge.recipe.tasks import module_options

    trainer = llm.config_obj.trainer
    model = llm.model if llm.model is not None else str(llm._base_path)
    return DeclarativeCausalLM(model_name=model, tokenizer=llm.tokenizer, **module_options(cfg, job),
                               regularization_type=trainer.regularization_type,
                               regularization_lambda=trainer.regularization_lambda)


def datamodule_for(llm, train_records: Sequence[dict], validation_records: Sequence[dict] | None, cfg: RunConfig):
    """Records rendered into samples of a core format (prompt and target as the model will see them; with
    similarity retrieval, a sample never shows itself as an example)."""
    from hfbridge.data.datamodule import CausalLMDataModule

    samples = llm.training_samples(train_records)
    val_samples = llm.training_samples(validation_records) if validation_records else None
    return CausalLMDataModule(
        llm.tokenizer, samples, val_samples, data_format=llm.renderer.fmt, max_length=llm.max_sequence_length,
        batch_size=cfg.train.batch_size, val_batch_size=cfg.eval.batch_size, seed=cfg.train.seed,
    )


def device_overrides(llm) -> dict:
    """Train on the device the LLM was loaded on."""
    on_gpu = llm.curr_device.type == "cuda"
    return {"accelerator": "gpu" if on_gpu else "cpu", "devices": [llm.curr_device.index or 0] if on_gpu else 1}


def check_trainable(cfg: LLMConfig, train_records: Sequence[dict]) -> None:
    if cfg.trainer.type == "none":
        raise ValueError("trainer.type is none (zero- or few-shot): there is nothing to train")
    if not train_records:
        raise ValueError("the training split is empty; check preprocessing.split")


def fit(llm, train_records: Sequence[dict], validation_records: Sequence[dict] | None = None,
        output_dir: str | Path | None = None, progress_bar: bool = True):
    """Train ``llm.model`` (an :class:`~hfbridge.declarative.LLM`'s) in place on ``train_records`` (validation loss
    on ``validation_records``); with ``output_dir`` Lightning's ``metrics.csv`` is written there. Returns the
    Lightning trainer."""
    import lightning.pytorch as pl

    from hfbridge.recipe.pipeline import build_trainer

    check_trainable(llm.config_obj, train_records)
    cfg = run_config(llm.config_obj, seed=llm._random_seed, progress_bar=progress_bar)
    module = module_for(llm, cfg)
    data = datamodule_for(llm, train_records, validation_records, cfg)
    trainer = build_trainer(cfg, Path(output_dir) if output_dir else None, **device_overrides(llm))
    pl.seed_everything(llm._random_seed, verbose=False)
    with warnings.catch_warnings():  # the run folder already holds the config: Lightning's logger says so
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        trainer.fit(module, data)
    llm.model = module.model
    llm.model.eval()
    return trainer
