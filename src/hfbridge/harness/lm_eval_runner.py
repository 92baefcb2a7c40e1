"""lm-evaluation-harness tasks on a model hfbridge has loaded (or loads), checked before any weights are read.

The model object and its tokenizer go to lm-eval's own ``HFLM`` and ``simple_evaluate``, so a score here is the
score ``lm_eval --model hf`` gives on the same folder (tests/harness checks it). Task names resolve against the
tasks shipped in ``hfbridge/harness/tasks`` first (an index of two files, instant) and lm-eval's own task
registry only when a name is not among them (an index of every lm-eval task: about 10 s). A task's data is read
before the model loads: a hub data set that is not in the local ``datasets`` cache, with the hub offline
(``HF_HUB_OFFLINE=1`` or ``HF_DATASETS_OFFLINE=1``) or unreachable, is an error naming the task.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import importlib.util
import json
import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hfbridge.harness.bundled import BUNDLED_TASKS, TASKS_DIR

INSTALL_HINT = 'pip install "hfbridge[eval]"'
RESULTS_WRITER = "hfbridge eval"  # the "writer" of a results file

# lm-eval's notes that do not apply here: the model object is passed on purpose, and the bundled tasks read
# their data through a function that needs no metadata.
_QUIET = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model",
          "Custom kwargs can be passed to `--metadata`")


def require_lm_eval() -> None:
    """lm-evaluation-harness is an optional dependency: an ImportError with the install command when missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError(f"lm-evaluation-harness is not installed; hfbridge eval needs it: {INSTALL_HINT}")


def parse_task_names(tasks: str | Sequence[str] | None) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` as a list of unique names in order; none is an error."""
    if tasks is None:
        names: list[str] = []
    elif isinstance(tasks, str):
        names = [t.strip() for t in tasks.split(",")]
    else:
        names = [str(t).strip() for t in tasks]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise ValueError(f"no tasks given; name at least one, e.g. {','.join(BUNDLED_TASKS)}")
    return names


def check_limit(limit: int | None, where: str = "--limit") -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{where} must be a whole number of at least 1 (documents per task), got {limit!r}")


def check_num_fewshot(num_fewshot: int | None, where: str = "--num-fewshot") -> None:
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int)
                                    or num_fewshot < 0):
        raise ValueError(f"{where} must be a whole number of at least 0, got {num_fewshot!r}")


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(q in message for q in _QUIET)


@contextlib.contextmanager
def _lm_eval_logging(verbose: bool = False) -> Iterator[None]:
    """lm-eval logs every step at INFO; keep its warnings (less the ones above) unless ``verbose``."""
    logger = logging.getLogger("lm_eval")
    level, quiet = logger.level, _QuietFilter()
    if not verbose:
        logger.setLevel(logging.WARNING)
    loggers = [logger, *[logging.getLogger(n) for n in logging.root.manager.loggerDict if n.startswith("lm_eval.")]]
    for each in loggers:
        each.addFilter(quiet)
    try:
        yield
    finally:
        logger.setLevel(level)
        for each in loggers:
            each.removeFilter(quiet)


# ----------------------------------------------------------------------------------------------------- tasks
def _task_dirs(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    extra = [] if include_path is None else [include_path] if isinstance(include_path, (str, os.PathLike)) \
        else list(include_path)
    dirs = [TASKS_DIR]
    for path in map(Path, extra):
        if not path.exists():
            raise FileNotFoundError(f"--include-path {path}: no such folder or file of task YAMLs")
        dirs.append(path)
    return dirs


def task_manager(tasks: Sequence[str], include_path=None):
    """An lm-eval ``TaskManager`` that knows every name in ``tasks``: the bundled tasks (and ``include_path``)
    alone when that is enough, else lm-eval's whole registry too. An unknown name is a ValueError that names
    it and suggests the nearest known names."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    dirs = tuple(str(d) for d in _task_dirs(include_path))
    manager = TaskManager(include_path=list(dirs), include_defaults=False)
    if all(name in manager.all_tasks for name in tasks):
        return manager
    manager = _full_task_manager(dirs)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        lines = []
        for name in unknown:
            near = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            lines.append(f"unknown task {name!r}{hint}")
        raise ValueError(f"{'; '.join(lines)} (bundled tasks: {', '.join(BUNDLED_TASKS)}; "
                         "`lm_eval ls tasks` lists lm-eval's own)")
    return manager


@functools.lru_cache(maxsize=4)
def _full_task_manager(dirs: tuple[str, ...]):
    """lm-eval's whole registry and ``dirs`` (indexed once per process: about 10 s)."""
    from lm_eval.tasks import TaskManager

    with _lm_eval_logging():
        return TaskManager(include_path=list(dirs), include_defaults=True)


def _offline() -> bool:
    import datasets

    flags = (os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flags) or bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))


def _dataset_of(manager, name: str) -> str:
    """The data set a task reads (its ``dataset_path``), for messages; ``?`` when the index does not say."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml

        entry = manager.task_index[name]
        config = load_yaml(entry.yaml_path, resolve_func=False, recursive=True) if entry.yaml_path else {}
        path = config.get("dataset_path")
        return f"{path}" + (f" ({config['dataset_name']})" if config.get("dataset_name") else "") if path else "?"
    except Exception:  # the message is best effort; the error it explains is raised anyway
        return "?"


def load_tasks(manager, tasks: Sequence[str]) -> dict:
    """Every task built and its data read (from the bundled files or the local ``datasets`` cache), one name at a
    time, so that an error names its task. Returns lm-eval's ``TaskManager.load`` result for all of them."""
    import datasets

    for name in tasks:
        try:
            with _lm_eval_logging():
                manager.load([name])
        except (ConnectionError, datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as e:
            where = _dataset_of(manager, name)
            state = ("the hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if _offline()
                     else "the hub could not be reached")
            raise ValueError(
                f"task {name!r}: its data ({where}) is not in the local datasets cache and {state}. Run it once "
                f"where the hub is reachable to fill the cache ({datasets.config.HF_DATASETS_CACHE}), or use a "
                f"bundled task ({', '.join(BUNDLED_TASKS)}). [{type(e).__name__}: {e}]"
            ) from e
    with _lm_eval_logging():
        return manager.load(list(tasks))


@dataclass
class HarnessTasks:
    """Checked task names and the manager that builds them (:func:`prepare_tasks`)."""

    names: list[str]
    manager: object


def prepare_tasks(tasks: str | Sequence[str], include_path=None) -> HarnessTasks:
    """Names parsed, resolved and their data read: everything that can fail before a model is loaded."""
    require_lm_eval()
    names = parse_task_names(tasks)
    manager = task_manager(names, include_path)
    load_tasks(manager, names)
    return HarnessTasks(names, manager)


# ----------------------------------------------------------------------------------------------------- scoring
@contextlib.contextmanager
def _kept_rng_and_mode(model: torch.nn.Module) -> Iterator[None]:
    """lm-eval seeds python, numpy and torch; a fine-tune that scores before training must train as it would
    without scoring, so the generators' states (and the model's train/eval mode) are restored afterwards."""
    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    training = model.training
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
        model.train(training)


def evaluate(model, tokenizer, tasks: HarnessTasks, *, limit: int | None = None, num_fewshot: int | None = None,
             batch_size: int = 16, apply_chat_template: bool = False, log_samples: bool = False,
             verbose: bool = False) -> dict:
    """lm-eval's ``simple_evaluate`` on an in-memory model (``PreTrainedModel`` or peft model, on any device) through
    its ``HFLM``, batched; returns lm-eval's results dict (``results``, ``versions``, ``n-shot``, ...). The
    tokenizer is copied: lm-eval may set its pad token and padding side. ``log_samples``: each document's
    prompt, responses and scores in ``results["samples"]``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    check_limit(limit)
    check_num_fewshot(num_fewshot)
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    with _kept_rng_and_mode(model), _lm_eval_logging(verbose):
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        return simple_evaluate(
            model=lm, tasks=list(tasks.names), task_manager=tasks.manager, limit=limit, num_fewshot=num_fewshot,
            batch_size=batch_size, apply_chat_template=apply_chat_template, log_samples=log_samples,
        )


def metrics(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results, stderr included (``acc``, ``acc_stderr``; a metric
    after a filter other than ``none`` keeps its ``,filter`` suffix)."""
    out: dict[str, dict] = {}
    for section in ("results", "groups"):
        for task, values in (results.get(section) or {}).items():
            row = out.setdefault(task, {})
            for key, value in values.items():
                if key == "alias" or "," not in key:
                    continue
                metric, _, filter_name = key.partition(",")
                row[metric if filter_name == "none" else key] = value
    return out


def summary_line(scores: dict[str, dict[str, float]]) -> str:
    """``task metric value, ...`` for one printed line (no stderr)."""
    parts = []
    for task, row in scores.items():
        for metric, value in row.items():
            if "_stderr" not in metric and isinstance(value, (int, float)):
                parts.append(f"{task} {metric} {value:.3f}")
    return ", ".join(parts)


def table(results: dict) -> str:
    """A text table of lm-eval's results: one row per task and metric, with its stderr, shots and documents."""
    n_shot, n_samples = results.get("n-shot") or {}, results.get("n-samples") or {}
    header = ["task", "metric", "value", "stderr", "n-shot", "docs"]
    rows = []
    for task, row in metrics(results).items():
        for metric, value in row.items():
            if "_stderr" in metric:
                continue
            stderr = row.get(metric.replace(",", "_stderr,", 1) if "," in metric else f"{metric}_stderr")
            docs = (n_samples.get(task) or {}).get("effective", "")
            rows.append([task, metric, _number(value), "" if stderr is None else f"± {_number(stderr)}",
                         str(n_shot.get(task, "")), str(docs)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------------- output
def check_output_file(path: str | os.PathLike) -> Path:
    """Refuse an output that exists, is a folder, or whose folder does not exist (:mod:`hfbridge.io`: hfbridge
    never replaces a file)."""
    from hfbridge.io import check_output_file as check

    return check(path, "--output")


def write_results(path: str | os.PathLike, report: dict) -> Path:
    """``report`` as JSON at ``path``, whole or not at all, never replacing a file (:mod:`hfbridge.io`)."""
    from lm_eval.utils import handle_non_serializable

    from hfbridge.io import write_text_atomic

    check_output_file(path)
    text = json.dumps({"writer": RESULTS_WRITER, **report}, indent=2, default=handle_non_serializable) + "\n"
    return write_text_atomic(path, text)


def report(results: dict, **settings) -> dict:
    """What a results file holds: the settings, ``metrics`` (:func:`metrics`) and lm-eval's own sections."""
    import lm_eval

    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
    return {**settings, "metrics": metrics(results), "lm_eval_version": getattr(lm_eval, "__version__", None),
            "lm_eval": {k: results[k] for k in keep if k in results}, "time": time.time()}


# ----------------------------------------------------------------------------------------------------- recipe
def prepare_run_tasks(eval_cfg, task_name: str = "text-generation") -> HarnessTasks | None:
    """The recipe's ``eval.tasks`` checked and their data read, before a fine-tune loads its model (``None``
    when there are none). ``eval_cfg``: the recipe's ``EvalSection``."""
    if not eval_cfg.tasks:
        return None
    where = "eval.tasks (--eval-tasks)"
    if task_name == "image-text-to-text":
        raise ValueError(f"{where}: lm-evaluation-harness tasks score text causal LMs; method.task is {task_name}")
    try:
        require_lm_eval()
    except ImportError as e:
        raise ImportError(f"{where}: {e}") from None
    check_limit(eval_cfg.tasks_limit, "eval.tasks_limit (--eval-tasks-limit)")
    check_num_fewshot(eval_cfg.tasks_num_fewshot, "eval.tasks_num_fewshot (--eval-tasks-num-fewshot)")
    try:
        return prepare_tasks(eval_cfg.tasks)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def score_run(tasks: HarnessTasks | None, model, tokenizer, eval_cfg, label: str) -> dict | None:
    """The tasks scored on a fine-tune's in-memory model, printed as one line; ``{task: {metric: value}}`` for
    ``summary.json``. ``None`` without tasks, or on a rank that does not hold the gathered model."""
    from hfbridge.console import say

    if tasks is None or model is None:
        return None
    t0 = time.time()
    results = evaluate(model, tokenizer, tasks, limit=eval_cfg.tasks_limit, num_fewshot=eval_cfg.tasks_num_fewshot,
                       batch_size=eval_cfg.batch_size, apply_chat_template=eval_cfg.tasks_chat_template)
    scores = metrics(results)
    say(f"harness {label} fine-tuning: {summary_line(scores)} ({time.time() - t0:.0f}s)")
    return scores
