"""Fine-tuning a declarative LLM with the core: samples in a core format, ``CausalLMDataModule``,
``HFAutoModelForCausalLM`` and Lightning's ``Trainer`` (loss per label token of the optimizer step, labels shifted
once, per sample)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hfbridge.declarative.schema import TrainerConfig
from hfbridge.optim import OptimizerConfig

if TYPE_CHECKING:
    from hfbridge.declarative.llm import LLM

log = logging.getLogger(__name__)


def optimizer_config(trainer: TrainerConfig) -> OptimizerConfig:
    """The core's optimizer settings from the config's ``trainer`` section."""
    schedule = trainer.learning_rate_scheduler
    return OptimizerConfig(
        lr=trainer.learning_rate, weight_decay=trainer.weight_decay, warmup_ratio=schedule.warmup_fraction,
        schedule=schedule.decay, min_lr_ratio=schedule.min_lr_ratio, max_grad_norm=trainer.max_grad_norm,
    )


def fit(llm: LLM, train_records: Sequence[dict], validation_records: Sequence[dict] | None = None,
        output_dir: str | Path | None = None, progress_bar: bool = True):
    """Train ``llm.model`` in place on ``train_records`` (validation loss on ``validation_records``); with
    ``output_dir`` Lightning's ``metrics.csv`` is written there. Returns the Lightning trainer."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    from hfbridge.data.datamodule import CausalLMDataModule
    from hfbridge.models.causal_lm import HFAutoModelForCausalLM

    cfg = llm.config_obj.trainer
    if cfg.type == "none":
        raise ValueError("trainer.type is none (zero- or few-shot): there is nothing to train")
    if not train_records:
        raise ValueError("the training split is empty; check preprocessing.split")
    samples = [llm.renderer.sample(r) for r in train_records]
    val_samples = [llm.renderer.sample(r) for r in validation_records] if validation_records else None
    module = HFAutoModelForCausalLM(model_name=llm.model, tokenizer=llm.tokenizer, optim=optimizer_config(cfg))
    data = CausalLMDataModule(
        llm.tokenizer, samples, val_samples, data_format=llm.renderer.fmt, max_length=llm.max_sequence_length,
        batch_size=cfg.batch_size, val_batch_size=cfg.eval_batch_size, seed=llm._random_seed,
    )
    validation = {}
    if cfg.validate_every_n_steps and val_samples:
        validation = {"val_check_interval": cfg.validate_every_n_steps * cfg.gradient_accumulation_steps,
                      "check_val_every_n_epoch": None}
    on_gpu = llm.curr_device.type == "cuda"
    trainer = pl.Trainer(
        max_epochs=cfg.epochs, max_steps=cfg.train_steps or -1, accumulate_grad_batches=cfg.gradient_accumulation_steps,
        gradient_clip_val=cfg.max_grad_norm, accelerator="gpu" if on_gpu else "cpu",
        devices=[llm.curr_device.index or 0] if on_gpu else 1,
        logger=CSVLogger(save_dir=str(output_dir), name="", version="") if output_dir else False,
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=progress_bar,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(output_dir) if output_dir else None,
        callbacks=[TQDMProgressBar(refresh_rate=1)] if progress_bar else [], **validation,
    )
    pl.seed_everything(llm._random_seed, verbose=False)
    with warnings.catch_warnings():  # the run folder already holds the config: Lightning's logger says so
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        trainer.fit(module, data)
    llm.model = module.model
    llm.model.eval()
    llm._forward_keys = None
    return trainer
