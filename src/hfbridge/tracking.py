"""Experiment trackers of a run, and the metrics of every optimizer step (docs/tracking.md).

Every run writes Lightning's ``metrics.csv`` (and ``loss_curve.png`` from it); ``track.loggers`` adds TensorBoard,
Weights & Biases and MLflow, through Lightning's own loggers, each writing inside the run folder:

* ``tensorboard/``: TensorBoard event files;
* ``wandb/``: the W&B run folder, offline unless ``track.wandb_mode: online`` (``wandb sync`` uploads it later);
* ``mlruns/``: an MLflow file store, unless ``track.mlflow_tracking_uri`` names another store or a server.

A run is written into a temporary folder that is renamed at the end (:func:`hfbridge.io.atomic_dir`). MLflow's
file store records absolute artifact locations; they are rewritten to the run's final folder when the run ends,
so the store reads (and takes artifacts) after the rename. W&B and TensorBoard keep no absolute paths to the run
folder (W&B's ``latest-run`` and log shortcuts are made relative).

:class:`StepMetrics` adds to what the module logs (``train_loss``, ``lr``, ``val_loss``) the gradient norm before
clipping, tokens and label tokens per second, the step's wall time and the peak memory, once per optimizer step;
:class:`LogHyperparameters` gives every tracker the run's resolved config.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import resource
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from hfbridge.console import say
from hfbridge.losses import IGNORE_INDEX
from hfbridge.optim import total_grad_norm

log = logging.getLogger(__name__)

LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # logger -> module it needs
INSTALL = 'pip install "hfbridge[track]"'


# --------------------------------------------------------------------------------------------------- checks
def check_loggers(names: Iterable[str], key: str = "track.loggers") -> list[str]:
    """The problems of a list of logger names: unknown names (the known ones listed) and trackers whose library
    is not installed (found without importing it)."""
    names = list(names)
    problems = []
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        problems.append(f"{key}: unknown logger{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(map(repr, unknown))}; known: {', '.join(LOGGERS)}")
    missing = [n for n in dict.fromkeys(names) if n in PACKAGES and importlib.util.find_spec(PACKAGES[n]) is None]
    if missing:
        problems.append(f"{key}: {', '.join(missing)} needs {', '.join(PACKAGES[n] for n in missing)}, which is "
                        f"not installed; install the trackers with: {INSTALL}")
    return problems


# --------------------------------------------------------------------------------------------------- loggers
def final_dir(work: Path, output_dir: str | Path | None) -> Path:
    """The folder ``work`` becomes: ``output_dir`` when ``work`` is its temporary sibling
    (``.NAME.tmp-*``, :func:`hfbridge.io.atomic_dir`), else ``work`` itself."""
    work = Path(work).resolve()
    if output_dir is None:
        return work
    final = Path(output_dir).resolve()
    if work.parent == final.parent and work.name.startswith(f".{final.name}.tmp-"):
        return final
    return work


def build_loggers(cfg, work: Path | None) -> list:
    """Lightning loggers of a run: the CSV logger (``metrics.csv`` in ``work``) first, then those of
    ``cfg.track.loggers``; none without ``work``."""
    from lightning.pytorch.loggers import CSVLogger

    if work is None:
        return []
    track = cfg.track
    problems = check_loggers(track.loggers)
    if problems:
        raise ValueError("; ".join(problems))
    final = final_dir(work, cfg.output.dir)
    run_name = track.run_name or final.name
    loggers: list = [CSVLogger(save_dir=str(work), name="", version="")]
    for name in dict.fromkeys(track.loggers):
        if name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(work), name="tensorboard", version="",
                                             default_hp_metric=False))
        elif name == "wandb":
            loggers.append(_wandb_logger(track, work, final, run_name))
        elif name == "mlflow":
            loggers.append(_mlflow_logger(track, work, final, run_name))
    return loggers


def _wandb_logger(track, work: Path, final: Path, run_name: str):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    class RunFolderWandbLogger(WandbLogger):
        """Lightning's W&B logger whose run is finished when training ends (so that its files are complete before
        the run folder is renamed), with relative shortcuts in ``wandb/``; an offline run says where it will be
        (W&B itself, silenced, would name the temporary folder)."""

        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self._wandb_init.pop("anonymous", None)  # always passed by Lightning; W&B warns that it is obsolete

        def finalize(self, status: str) -> None:
            super().finalize(status)
            if self._experiment is None:
                return
            run_dir = Path(self._experiment.dir).resolve().parent  # .../wandb/offline-run-*/files -> its folder
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None
            relative_links(Path(work) / "wandb", Path(work))
            if track.wandb_mode == "offline" and status == "success":
                where = final / run_dir.relative_to(Path(work).resolve())
                say(f"W&B offline run in {where}; upload it with: wandb sync {where}")

    # mode as a wandb.init argument (Lightning's offline=True would set WANDB_MODE for the whole process); no
    # console capture (the progress bar would fill it)
    return RunFolderWandbLogger(
        name=run_name, project=track.project, save_dir=str(work), entity=track.wandb_entity, mode=track.wandb_mode,
        settings=wandb.Settings(console="off", silent=True),
    )


def _mlflow_logger(track, work: Path, final: Path, run_name: str):
    from lightning.pytorch.loggers import MLFlowLogger

    uri = track.mlflow_tracking_uri
    local_store = None
    if uri is None:
        local_store = Path(work) / "mlruns"
        uri = local_store.resolve().as_uri()
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses file stores unless asked (it prefers a database, which mlflow-skinny cannot open); a file
        # store needs no network, so nothing may try to reach MLflow's telemetry server either
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    class RunFolderMLFlowLogger(MLFlowLogger):
        """Lightning's MLflow logger; a file store in the run folder has its absolute artifact locations moved to
        the run's final folder when the run ends."""

        def finalize(self, status: str = "success") -> None:
            super().finalize(status)
            if local_store is not None and final != Path(work).resolve():
                relocate_mlflow_store(local_store, Path(work).resolve(), final)

    return RunFolderMLFlowLogger(experiment_name=track.project, run_name=run_name, tracking_uri=uri)


def relocate_mlflow_store(store: Path, old: Path, new: Path) -> list[Path]:
    """Rewrite the ``artifact_location`` / ``artifact_uri`` of an MLflow file store's ``meta.yaml`` files from
    folder ``old`` to folder ``new`` (where the store will be after a rename). Returns the files changed."""
    import yaml

    old_uri, new_uri = old.as_uri(), new.as_uri()
    changed = []
    for meta in Path(store).rglob("meta.yaml"):
        data = yaml.safe_load(meta.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            continue
        touched = False
        for key in ("artifact_location", "artifact_uri"):
            value = data.get(key)
            if isinstance(value, str) and (value == old_uri or value.startswith(old_uri + "/")):
                data[key] = new_uri + value[len(old_uri):]
                touched = True
        if touched:
            meta.write_text(yaml.safe_dump(data, default_flow_style=False), encoding="utf-8")
            changed.append(meta)
    return changed


def relative_links(folder: Path, root: Path) -> None:
    """Symbolic links below ``folder`` that point, by absolute path, inside ``root`` become relative (they stay
    valid when ``root`` is renamed)."""
    root = Path(root).resolve()
    if not Path(folder).is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            link = Path(dirpath) / name
            if not link.is_symlink():
                continue
            target = Path(os.readlink(link))
            if not target.is_absolute():
                continue
            try:
                target.relative_to(root)
            except ValueError:
                continue
            link.unlink()
            link.symlink_to(os.path.relpath(target, link.parent.resolve()))


# --------------------------------------------------------------------------------------------------- metrics
def batch_token_counts(module, batch) -> tuple[Any, Any] | None:
    """``(tokens, label_tokens)`` of a micro-batch (tensors or numbers, counted without a device sync): the
    module's own ``batch_token_counts(batch)`` when it has one; else the tokens of the samples (the attention
    mask's sum; for packed rows, which have none, the positions of a sample: ``sequence_ids >= 0`` when the batch
    has them, else every position but the padding that ends a row, see :func:`packed_tokens`) and the labels that
    are not ignored. ``None`` for a batch that cannot be counted."""
    own = getattr(module, "batch_token_counts", None)
    if callable(own):
        return own(batch)
    if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
        return None
    if batch.get("attention_mask") is not None:
        tokens = batch["attention_mask"].sum()
    elif batch.get("sequence_ids") is not None:
        tokens = (batch["sequence_ids"] >= 0).sum()
    elif batch.get("position_ids") is not None:
        tokens = packed_tokens(batch["input_ids"], batch["labels"], batch["position_ids"])
    else:
        tokens = batch["input_ids"].numel()
    return tokens, (batch["labels"] != IGNORE_INDEX).sum()


def packed_tokens(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The sample tokens of packed rows (:class:`hfbridge.data.packing.PackedCollator`): each sample's positions
    restart at 0, and a row shorter than the batch's width ends with padding that restarts them too, one pad id
    repeated, with no labels. A row's last segment (from its last position 0) is that padding when it is not the
    row's first segment, all its labels are ignored and all its ids equal; every other position is a token."""
    width = input_ids.shape[-1]
    starts = (position_ids == 0).flip(-1).int().argmax(-1, keepdim=True)
    last = width - 1 - starts  # where each row's last segment begins
    tail = torch.arange(width, device=input_ids.device) >= last
    padding = (((labels == IGNORE_INDEX) | ~tail).all(-1) & ((input_ids == input_ids[..., -1:]) | ~tail).all(-1)
               & (last.squeeze(-1) > 0))
    return input_ids.numel() - (tail.sum(-1) * padding).sum()


def peak_memory(device: torch.device) -> tuple[str, float]:
    """``("cuda_max_alloc_mb", MiB)``: the most CUDA memory tensors have held on ``device`` (PyTorch's
    ``max_memory_allocated``) on a GPU; else ``("peak_rss_mb", MiB)``: the process's peak resident memory."""
    if device.type == "cuda":
        return "cuda_max_alloc_mb", torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return "peak_rss_mb", peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _distributed(trainer) -> bool:
    return trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


class StepMetrics(Callback):
    """Once per optimizer step: ``grad_norm`` (the global norm of the gradients before clipping, taken when the
    step's last backward is done), ``tokens_per_s`` and ``label_tokens_per_s`` (the step's tokens, summed over its
    micro-batches and the data-parallel ranks, over ``step_time_s``, the wall time from the start of its first
    micro-batch to the end of the optimizer step), and the peak memory (``cuda_max_alloc_mb`` on a GPU, else
    ``peak_rss_mb``; the largest over the ranks). See :func:`batch_token_counts` for what is counted."""

    def __init__(self) -> None:
        self._reset()
        self._warned = False

    def _reset(self) -> None:
        self._t0: float | None = None
        self._counts: list | None = []
        self._stepped = False

    def _now(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = self._now(pl_module)
        counts = batch_token_counts(pl_module, batch)
        if counts is None:
            if not self._warned:
                log.warning("tokens per second are not logged: the batches are not mappings with input_ids and "
                            "labels, and %s has no batch_token_counts(batch)", type(pl_module).__name__)
                self._warned = True
            self._counts = None
        elif self._counts is not None:
            self._counts.append(counts)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        pl_module.log("grad_norm", float(total_grad_norm(params)), on_step=True, on_epoch=False, prog_bar=False)
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._stepped:  # still accumulating this optimizer step
            return
        seconds = self._now(pl_module) - (self._t0 if self._t0 is not None else time.perf_counter())
        memory_key, memory = peak_memory(pl_module.device)
        tokens = labels = None
        if self._counts is not None:
            tokens = float(sum(float(t) for t, _ in self._counts))
            labels = float(sum(float(n) for _, n in self._counts))
        if _distributed(trainer):
            tokens, labels, memory = self._reduce(trainer, pl_module, tokens, labels, memory)
        values = {"step_time_s": seconds, memory_key: memory}
        if tokens is not None and seconds > 0:
            values.update(tokens_per_s=tokens / seconds, label_tokens_per_s=labels / seconds)
        pl_module.log_dict(values, on_step=True, on_epoch=False, prog_bar=False)
        self._reset()

    @staticmethod
    def _reduce(trainer, pl_module, tokens, labels, memory):
        """Counts summed over the data-parallel ranks (ranks of a tensor/sequence-parallel group share a batch:
        the sum over all ranks is divided by their number), memory the largest of any rank."""
        dist = torch.distributed
        counted = tokens is not None
        sums = torch.tensor([tokens or 0.0, labels or 0.0], dtype=torch.float64, device=pl_module.device)
        dist.all_reduce(sums)
        peak = torch.tensor([memory], dtype=torch.float64, device=pl_module.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        data_parallel = getattr(trainer.strategy, "data_parallel_size", None) or trainer.world_size
        sums = sums * data_parallel / trainer.world_size
        tokens, labels = (float(v) for v in sums.tolist())
        return (tokens if counted else None), (labels if counted else None), float(peak.item())


class LogHyperparameters(Callback):
    """Give the run's resolved config to every tracker as hyperparameters when fitting starts (nested; the
    TensorBoard and MLflow loggers flatten the keys, ``section/key``). The CSV logger is left out: the run folder
    has the config as ``config.yaml``."""

    def __init__(self, config: dict) -> None:
        self.config = config

    def on_fit_start(self, trainer, pl_module) -> None:
        from lightning.pytorch.loggers import CSVLogger

        for logger in trainer.loggers:
            if not isinstance(logger, CSVLogger):
                logger.log_hyperparams(self.config)
