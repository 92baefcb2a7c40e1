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

from hfbridge.console import say
from hfbridge.declarative.dataset import OUTPUT_SUFFIXES, Splits, read_dataset, split_rows, write_rows
from hfbridge.declarative.llm import LLM, EvalResult, load_llm
from hfbridge.declarative.metrics import (
    format_confusion_matrix,
    format_table,
    plot_confusion_matrix,
    scalar_metrics,
)
from hfbridge.declarative.regularization import regularizes
from hfbridge.declarative.schema import LLMConfig, dump_config, load_config
from hfbridge.declarative.training import (
    check_trainable,
    datamodule_for,
    device_overrides,
    module_for,
    run_config,
)
from hfbridge.recipe.tasks import Score, Task, TaskData

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output: Path
    before: dict | None
    after: dict | None
    train_seconds: float
    exit_code: int = 0


def open_llm(model: str | None, config: str | None, device: str | None = None, random_seed: int = 42,
             trust_remote_code: bool = False) -> LLM:
    """A saved model (``--model``), or the base model of a config for zero- or few-shot use (``--config``).
    A saved folder's ``trust_remote_code`` is not obeyed: only ``trust_remote_code`` here (the command line)."""
    if bool(model) == bool(config):
        raise ValueError("give exactly one of --model (a saved or trained model folder) and --config (a config "
                         "whose base model is used as it is)")
    if model:
        return load_llm(model, device, trust_remote_code)
    return LLM(load_config(config), random_seed, device)


def choose_few_shot(cfg: LLMConfig, train: list[dict], seed: int) -> None:
    """Freeze few-shot examples from the training split into ``prompt.examples`` (saved with the model, so that
    predicting later shows, or retrieves from, the same examples): ``prompt.few_shot`` records drawn at random
    (seeded), or with ``few_shot_retrieval: similarity`` the whole split, the pool each prompt retrieves from."""
    k = cfg.prompt.few_shot
    if k <= 0 or cfg.prompt.examples:
        return
    if len(train) < k:
        raise ValueError(f"prompt.few_shot={k} but the training split has only {len(train)} records")
    columns = [f.name for f in cfg.input_features] + [cfg.output_feature.name]
    picked = train if cfg.prompt.few_shot_retrieval == "similarity" else random.Random(seed).sample(train, k)
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


class DeclarativeTask(Task):
    """The declarative face's task: the seed-003 config's features, prompt and metrics on the one pipeline.

    The LLM object loads the base model (adapter, quantization, device as the config says), scores it (loss,
    exact match, BLEU/ROUGE, or accuracy/F1 for categories) and saves itself (``config.yaml`` is the declarative
    config, so ``hfbridge predict --model RUN`` loads it); the pipeline checks, trains and gathers. On a device
    mesh the LLM holds no weights until scoring: the module loads and shards them as ``hfbridge finetune``'s does.
    """

    name = "declarative"

    def __init__(self, llm_cfg: LLMConfig, dataset: str | Path, seed: int, device: str | None, progress: bool):
        self.llm_cfg, self.dataset, self.seed, self.device, self.progress = llm_cfg, dataset, seed, device, progress
        self.llm: LLM | None = None
        self.work: Path | None = None
        self.job = None

    def check(self, cfg) -> None:
        from hfbridge.parallel.runtime import wanted

        if not wanted(cfg):
            return
        if self.llm_cfg.quantization is not None:
            raise ValueError("quantization: 4/8-bit weights cannot be sharded over several processes (FSDP2 needs "
                             "plain floating-point weights); train QLoRA on one device")
        if regularizes(self.llm_cfg.trainer.regularization_type, self.llm_cfg.trainer.regularization_lambda):
            raise ValueError("trainer.regularization_lambda: regularization on a device mesh (--nproc-per-node, "
                             "--sharding-axis-dims) is not supported yet; train on one process, or set it to 0")

    def read_data(self, cfg, work: Path) -> TaskData:
        self.work = work
        splits = split_rows(read_dataset(self.dataset, self.llm_cfg), self.llm_cfg, self.seed)
        if self.trains(cfg):
            check_trainable(self.llm_cfg, splits.train)
        choose_few_shot(self.llm_cfg, splits.train, self.seed)
        test = _eval_split(splits, self.llm_cfg)
        self.test_samples = len(test)
        say(f"data: {len(splits.train)} train, {len(splits.validation)} validation, {len(splits.test)} test records"
            + (f" (evaluating on {len(test)})" if test else " (no test or validation split: no evaluation)"))
        return TaskData(splits.train, splits.validation or None, test or None, "records",
                        {"dataset": str(self.dataset)})

    def check_model(self, cfg, name=None):
        return Path(self.llm_cfg.base_model), None  # the LLM object resolves and checks it as it loads

    def write_config(self, cfg, work: Path) -> None:
        dump_config(self.llm_cfg, work / "config.yaml")  # with the few-shot examples chosen above

    def module(self, cfg, model_path, job):
        self.job = job
        self.llm = LLM(self.llm_cfg, self.seed, self.device, load_model=job is None)
        return module_for(self.llm, cfg, job)

    def loaded_message(self, cfg, module, seconds: float) -> str:
        llm = self.llm
        return (f"loaded {self.llm_cfg.base_model} in {seconds:.1f}s on {llm.curr_device} "
                f"({'chat template' if llm.renderer.chat else 'plain prompt'}, output: "
                f"{self.llm_cfg.output_feature.type})")

    def trains(self, cfg) -> bool:
        return self.llm_cfg.trainer.type == "finetune"

    def score_before(self, cfg) -> bool:
        return not self.trains(cfg) or self.llm_cfg.trainer.evaluate_before

    def before_label(self, cfg) -> str:
        return "before" if self.trains(cfg) else "zero_shot"

    def trainer_overrides(self, cfg) -> dict:
        return device_overrides(self.llm) if self.job is None else {}  # on a mesh: the parallel runtime's

    def datamodule(self, cfg, module, data: TaskData, context):
        if self.job is not None:  # every rank retrieves few-shot examples with the sharded model, together
            self.llm.model = module.model
        return datamodule_for(self.llm, data.train, data.validation, cfg)

    def score(self, model, module, data: TaskData, cfg, label: str) -> Score | None:
        self.llm.model = model
        self.llm.model.eval()
        result = evaluate_records(self.llm, data.test, self.work, label, self.progress)
        if label == "after":
            write_rows([{**r, **p} for r, p in zip(data.test, result.predictions)],
                       self.work / "predictions_test.csv")
        self.llm.trained = self.llm.trained or label == "after"
        return Score(result.metrics[self.llm_cfg.output_feature.name], f"{label}: scored {len(data.test)} records")

    def samples(self, model, module, data, cfg) -> list[dict]:
        return []  # every test prediction is in predictions_test.csv

    def save(self, model, module, work: Path, cfg, summary: dict) -> None:
        self.llm.model = model
        self.llm.trained = self.trains(cfg)
        if self.trains(cfg) and (work / "metrics.csv").exists():
            from hfbridge.reporting import plot_loss_curve

            plot_loss_curve(work / "metrics.csv", work / "loss_curve.png",
                            f"hfbridge train: {self.llm_cfg.output_feature.name}")
        _save(self.llm, work, self.trains(cfg))
        before_key = "before" if self.trains(cfg) else "zero_shot"
        metrics = {before_key: summary["exact_match_before"], "after": summary["exact_match_after"],
                   "test_samples": self.test_samples,
                   "optimizer_steps": summary["optimizer_steps"], "train_seconds": summary["train_seconds"],
                   "random_seed": self.seed}
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))

    def saved_message(self, cfg, output: Path) -> str:
        return f"saved to {output}/"


def train_job(config_path: str | Path, dataset: str | Path, output: str | Path, overwrite: bool = False,
              random_seed: int = 42, device: str | None = None, progress_bar: bool = True,
              parallel: dict | None = None, argv: list[str] | None = None) -> TrainResult:
    """Check, load, evaluate before, fine-tune (unless ``trainer.type: none``), evaluate after, save: the one
    pipeline (:func:`hfbridge.recipe.pipeline.run`) with the config translated into a run recipe.

    ``parallel`` is the recipe's ``parallel`` section (mesh sizes, ``nproc_per_node``). With ``nproc_per_node``
    outside torchrun and ``argv`` (this command line), torchrun is started to run it on every process instead,
    and the result holds its ``exit_code``."""
    from hfbridge.parallel.launch import maybe_launch
    from hfbridge.recipe import pipeline

    llm_cfg = load_config(config_path)
    cfg = run_config(llm_cfg, dataset, output, overwrite, random_seed, progress_bar, parallel)
    launched = maybe_launch(cfg.parallel, argv) if argv is not None else None
    if launched is not None:
        return TrainResult(Path(output), None, None, 0.0, exit_code=launched)
    task = DeclarativeTask(llm_cfg, dataset, random_seed, device, progress_bar)
    result = pipeline.run(cfg, task)
    finetune = task.trains(cfg)
    columns = {"before" if finetune else "zero-shot": result.before} if result.before else {}
    if result.after:
        columns["after"] = result.after
    if columns:
        print(format_table(columns))
    return TrainResult(Path(output), result.before, result.after, result.train_seconds)


def _save(llm: LLM, work: Path, finetune: bool) -> None:
    from hfbridge.models.peft_adapters import is_peft_model, is_quantized

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
                split: str = "all", device: str | None = None, overwrite: bool = False,
                trust_remote_code: bool = False) -> Path:
    output = Path(output)
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--output {output}: unknown file type {output.suffix!r}; use .csv, .jsonl or .parquet")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; choose another --output or pass --overwrite")
    llm = open_llm(model, config, device, trust_remote_code=trust_remote_code)
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
                 split: str = "all", device: str | None = None, trust_remote_code: bool = False) -> dict:
    """Metrics on screen (a table) and on disk (JSON; a confusion matrix PNG beside it for a category)."""
    llm = open_llm(model, config, device, trust_remote_code=trust_remote_code)
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
