"""The jobs behind ``hfbridge train | predict | evaluate`` for declarative configs.

Everything that needs no weights is checked first: the config (every key), the output folder, the data set
(columns, labels, splits). ``train`` writes its run folder under a temporary name, renamed when complete.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from hfbridge.declarative.dataset import Splits, read_dataset, split_rows, write_rows
from hfbridge.declarative.llm import LLM, EvalResult, load_llm
from hfbridge.declarative.metrics import (
    format_confusion_matrix,
    format_table,
    plot_confusion_matrix,
    scalar_metrics,
)
from hfbridge.declarative.schema import LLMConfig, dump_config, load_config
from hfbridge.io import atomic_dir, check_output_dir

log = logging.getLogger(__name__)


def say(message: str) -> None:
    print(f"[hfbridge] {message}", flush=True)


@dataclass
class TrainResult:
    output: Path
    before: dict | None
    after: dict | None
    train_seconds: float


def open_llm(model: str | None, config: str | None, device: str | None = None, random_seed: int = 42) -> LLM:
    """A saved model (``--model``), or the base model of a config for zero- or few-shot use (``--config``)."""
    if bool(model) == bool(config):
        raise ValueError("give exactly one of --model (a saved or trained model folder) and --config (a config "
                         "whose base model is used as it is)")
    if model:
        return load_llm(model, device)
    return LLM(load_config(config), random_seed, device)


def choose_few_shot(cfg: LLMConfig, train: list[dict], seed: int) -> None:
    """Freeze ``prompt.few_shot`` examples from the training split into ``prompt.examples`` (saved with the
    model, so that predicting later shows the same examples)."""
    k = cfg.prompt.few_shot
    if k <= 0 or cfg.prompt.examples:
        return
    if len(train) < k:
        raise ValueError(f"prompt.few_shot={k} but the training split has only {len(train)} records")
    columns = [f.name for f in cfg.input_features] + [cfg.output_feature.name]
    picked = random.Random(seed).sample(train, k)
    cfg.prompt.examples = [{c: r.get(c) for c in columns} for r in picked]


def evaluate_records(llm: LLM, records: list[dict], out_dir: Path | None, tag: str,
                     progress: bool = True) -> EvalResult:
    """Metrics of ``records``; for a category output the confusion matrix PNG is written to ``out_dir``."""
    t0 = time.time()
    result = llm.evaluate(records, progress=progress)
    name = llm.config_obj.output_feature.name
    metrics = result.metrics[name]
    say(f"{tag}: evaluated {len(records)} records in {time.time() - t0:.0f}s")
    if out_dir is not None and "confusion_matrix" in metrics:
        png = plot_confusion_matrix(metrics["confusion_matrix"], metrics["labels"],
                                    out_dir / f"confusion_matrix_{tag}.png", f"{name}: {tag}")
        metrics["confusion_matrix_png"] = png.name
    return result


def _eval_split(splits: Splits, cfg: LLMConfig) -> list[dict]:
    records = splits.test or splits.validation
    if cfg.trainer.max_eval_samples:
        records = records[: cfg.trainer.max_eval_samples]
    return records


def train_job(config_path: str | Path, dataset: str | Path, output: str | Path, overwrite: bool = False,
              random_seed: int = 42, device: str | None = None, progress_bar: bool = True) -> TrainResult:
    """Check, load, evaluate before, fine-tune (unless ``trainer.type: none``), evaluate after, save."""
    cfg = load_config(config_path)
    output = check_output_dir(output, overwrite)
    splits = split_rows(read_dataset(dataset, cfg), cfg, random_seed)
    finetune = cfg.trainer.type == "finetune"
    if finetune and not splits.train:
        raise ValueError(f"{dataset}: the training split is empty (preprocessing.split)")
    choose_few_shot(cfg, splits.train, random_seed)
    test = _eval_split(splits, cfg)
    say(f"data: {len(splits.train)} train, {len(splits.validation)} validation, {len(splits.test)} test records"
        + (f" (evaluating on {len(test)})" if test else " (no test or validation split: no evaluation)"))
    with atomic_dir(output, overwrite=overwrite) as work:
        dump_config(cfg, work / "config.yaml")
        t0 = time.time()
        llm = LLM(cfg, random_seed, device)
        say(f"loaded {cfg.base_model} in {time.time() - t0:.1f}s on {llm.curr_device} "
            f"({'chat template' if llm.renderer.chat else 'plain prompt'}, output: {cfg.output_feature.type})")
        name = cfg.output_feature.name
        before = after = None
        if test and (not finetune or cfg.trainer.evaluate_before):
            before = evaluate_records(llm, test, work, "before" if finetune else "zero_shot",
                                      progress_bar).metrics[name]
        train_seconds, steps = 0.0, 0
        if finetune:
            t0 = time.time()
            trainer = llm.train(splits.train, splits.validation or None, work, progress_bar)
            train_seconds, steps = time.time() - t0, trainer.global_step
            say(f"trained {steps} optimizer steps in {train_seconds:.0f}s")
            if (work / "metrics.csv").exists():
                from hfbridge.reporting import plot_loss_curve

                plot_loss_curve(work / "metrics.csv", work / "loss_curve.png", f"hfbridge train: {name}")
            if test:
                result = evaluate_records(llm, test, work, "after", progress_bar)
                after = result.metrics[name]
                write_rows([{**r, **p} for r, p in zip(test, result.predictions)], work / "predictions_test.csv")
        _save(llm, work, finetune)
        summary = {"before" if finetune else "zero_shot": before, "after": after, "test_samples": len(test),
                   "optimizer_steps": steps, "train_seconds": round(train_seconds, 1), "random_seed": random_seed}
        (work / "metrics.json").write_text(json.dumps(summary, indent=2))
    columns = {"before" if finetune else "zero-shot": before} if before else {}
    if after:
        columns["after"] = after
    if columns:
        print(format_table(columns))
    say(f"saved to {output}/")
    return TrainResult(Path(output), before, after, train_seconds)


def _save(llm: LLM, work: Path, finetune: bool) -> None:
    from hfbridge.peft import is_peft_model, is_quantized

    if finetune and is_peft_model(llm.model):
        llm.save(work / "adapter")
        if not is_quantized(llm.model):
            llm.save(work / "model", merged=True)
    else:
        llm.save(work / "model")


def _select(dataset: str | Path, cfg: LLMConfig, split: str, seed: int, need_target: bool) -> list[dict]:
    rows = read_dataset(dataset, cfg, need_target)
    if split == "all":
        return [r for _, r in rows]
    records = split_rows(rows, cfg, seed).get(split)
    if not records:
        raise ValueError(f"{dataset}: the {split!r} split is empty")
    return records


def predict_job(model: str | None, config: str | None, dataset: str | Path, output: str | Path,
                split: str = "all", device: str | None = None, overwrite: bool = False) -> Path:
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; choose another --output or pass --overwrite")
    llm = open_llm(model, config, device)
    records = _select(dataset, llm.config_obj, split, llm._random_seed, need_target=False)
    t0 = time.time()
    predictions = llm.predict(records, progress=True)
    say(f"predicted {len(records)} records in {time.time() - t0:.0f}s")
    write_rows([{**r, **p} for r, p in zip(records, predictions)], output)
    name = llm.config_obj.output_feature.name
    for record, prediction in list(zip(records, predictions))[:5]:
        shown = {k: record.get(k) for k in llm.input_features}
        say(f"  {shown} -> {prediction[f'{name}_predictions']!r}")
    say(f"wrote {output}")
    return output


def evaluate_job(model: str | None, config: str | None, dataset: str | Path, output: str | Path,
                 split: str = "all", device: str | None = None) -> dict:
    """Metrics on screen (a table) and on disk (JSON; a confusion matrix PNG beside it for a category)."""
    llm = open_llm(model, config, device)
    records = _select(dataset, llm.config_obj, split, llm._random_seed, need_target=True)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    result = llm.evaluate(records, progress=True)
    name = llm.config_obj.output_feature.name
    metrics = result.metrics[name]
    if "confusion_matrix" in metrics:
        png = plot_confusion_matrix(metrics["confusion_matrix"], metrics["labels"],
                                    output.with_name(output.stem + "_confusion_matrix.png"), name)
        metrics["confusion_matrix_png"] = str(png)
    report = {"model": str(model or config), "dataset": str(dataset), "split": split, "output_feature": name,
              "metrics": metrics}
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(output)
    print(format_table({name: metrics}))
    if "confusion_matrix" in metrics:
        print("\n" + format_confusion_matrix(metrics["confusion_matrix"], metrics["labels"]))
    say(f"wrote {output}")
    return scalar_metrics(metrics)
