"""Tasks: what differs between kinds of training run, and nothing else.

A task says how its records are read and checked, which module and datamodule train on them, how a prompt is
answered, and how a held-out answer is shown. The job around it (check, load, score, train, score, gather once,
save) is :func:`hfbridge.recipe.pipeline.run`, the same for every task. A new task or method adds a class here
(or in its face, like the declarative one), never a new job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfbridge.console import say
from hfbridge.recipe.config import EMBEDDED_MODEL, RunConfig


@dataclass
class TaskData:
    """A run's records, read and checked before any weights are loaded."""

    train: list
    validation: list | None
    test: list | None  # prompts with references, for scoring
    format: str
    paths: dict = field(default_factory=dict)


@dataclass
class Score:
    """A held-out score: its value for ``summary.json``, and the line printed."""

    value: Any
    message: str
    details: Any = None


class Task:
    """The parts of a run that depend on its task (see the module docstring)."""

    name = ""
    default_model = EMBEDDED_MODEL

    def defaults(self, user: dict) -> dict:
        """Config defaults of this task for the model the user named (``user``: the merged file/flags/--set)."""
        return {"model": {"name": self.default_model}}

    def check(self, cfg: RunConfig) -> None:
        """Checks of the options that need no data and no weights."""

    def read_data(self, cfg: RunConfig, work: Path) -> TaskData:
        """Every record read and checked: the training data (the task's demo data, written into ``work/data``,
        when none is given), the validation data, and up to ``eval.samples`` test records as prompts and
        references."""
        from hfbridge.data.mixture import build_mixture, parse_sources
        from hfbridge.data.sources import resolve_source

        train_path, val_path, test_path = cfg.data.train, cfg.data.validation, cfg.data.test
        if train_path is None:
            train_path, demo_test = self.write_demo_data(work / "data", cfg)
            test_path = test_path or demo_test
        # A hub dataset (`owner/name` that is not a local path, docs/data.md) is read with these options; its
        # splits for validation and test are their own.
        hub = {"config": cfg.data.hub_config, "revision": cfg.data.hub_revision}
        val_path = val_path and resolve_source(val_path, split=cfg.data.validation_split, **hub)
        test_path = test_path and resolve_source(test_path, split=cfg.data.test_split, **hub)
        # One source or a mixture of several (docs/data.md), each read and checked in its own format; a text
        # task's sft data module tokenizes source by source, so only it takes sources of different formats.
        specs = parse_sources(str(train_path) if isinstance(train_path, Path) else train_path,
                              {**hub, "split": cfg.data.train_split})
        if cfg.data.streaming:  # one file, read as training goes: only its first records are read now
            from hfbridge.data.streaming import open_training_stream

            train = open_training_stream(cfg, specs, self.name)
            fmt = own = train.format
        else:
            self.mixture = build_mixture(specs, self.load_records, cfg.data.format, cfg.train.seed,
                                         mixed_formats=type(self).datamodule is TextTask.datamodule,
                                         task_label=f"--task {self.name} --method {cfg.method.name}")
            train, fmt = self.mixture.records, self.mixture.format
            own = fmt if len(set(self.mixture.formats)) == 1 else cfg.data.format  # mixed: each file its own
        val, self.val_format = self.load_records(val_path, own) if val_path else (None, None)
        test, test_fmt = self.load_records(test_path, own) if test_path else (None, fmt)
        test = test[: cfg.eval.samples] if test else None
        pairs = self.prompts_and_references(test, test_fmt) if test else None
        train_paths = str(train_path) if len(specs) == 1 else [s.path for s in specs]
        return TaskData(train, val, pairs, fmt, {"train": train_paths, "test": str(test_path)})

    def write_demo_data(self, folder: Path, cfg: RunConfig) -> tuple[Path, Path]:
        raise NotImplementedError

    def load_records(self, path, fmt: str) -> tuple[list, str]:
        raise NotImplementedError

    def prompts_and_references(self, records: list, fmt: str) -> list | None:
        raise NotImplementedError

    def threads(self, cfg: RunConfig) -> int | None:
        """Intra-op threads for the run (``None``: as they are)."""
        return None

    def check_model(self, cfg: RunConfig, name: str | None = None) -> tuple[Path, int | None]:
        """The model's files (``name``, default ``model.name``) and its context length, checked against the
        config; no weights are loaded."""
        from hfbridge.models import loading

        path = loading.resolve_model_path(name or cfg.model.name, cfg.model.trust_remote_code)
        config = loading.load_config(path, cfg.model.trust_remote_code)
        loading.check_max_length(cfg.data.max_length, config, "data.max_length (--max-length)")
        return path, loading.context_length(config)

    def module(self, cfg: RunConfig, model_path: Path, job):
        raise NotImplementedError

    def preprocessor(self, module):
        """What is saved beside the model to turn inputs into model inputs: the tokenizer."""
        return module.tokenizer

    def datamodule(self, cfg: RunConfig, module, data: TaskData, context: int | None):
        raise NotImplementedError

    def answer(self, model, module, prompts: list, cfg: RunConfig) -> list[str]:
        raise NotImplementedError

    def show(self, prompt) -> str:
        """A prompt as printed beside its answer."""
        raise NotImplementedError

    def score(self, model, module, data: TaskData, cfg: RunConfig, label: str) -> Score | None:
        """Exact match of greedy answers to the test prompts (``None`` without test records)."""
        from hfbridge.evaluation import exact_match

        if not data.test:
            return None
        prompts = [p for p, _ in data.test]
        result = exact_match(self.answer(model, module, prompts, cfg), [r for _, r in data.test], prompts)
        return Score(result.accuracy, f"exact match {label} fine-tuning: {result.accuracy:.1%} on "
                     f"{len(data.test)} held-out records", result)

    def samples(self, model, module, data: TaskData, cfg: RunConfig) -> list[dict]:
        """A few held-out prompts with their reference and the model's answer (printed and saved)."""
        if not data.test or not cfg.eval.show_samples:
            return []
        shown = data.test[: cfg.eval.show_samples]
        answers = self.answer(model, module, [p for p, _ in shown], cfg)
        out = []
        for (prompt, reference), prediction in zip(shown, answers):
            out.append({"prompt": self.show(prompt), "reference": reference, "prediction": prediction})
            say(f"  {self.show(prompt)!r} -> {prediction!r} (reference {reference!r})")
        return out

    def summary(self, cfg: RunConfig) -> dict:
        return {"task": self.name}

    # ---------------------------------------------------------------------------------------- steps of the job
    def trains(self, cfg: RunConfig) -> bool:
        return True

    def score_before(self, cfg: RunConfig) -> bool:
        return True

    def before_label(self, cfg: RunConfig) -> str:
        return "before"

    def trainer_overrides(self, cfg: RunConfig) -> dict:
        return {}

    def write_config(self, cfg: RunConfig, work: Path) -> None:
        """The resolved recipe as ``config.yaml``: ``hfbridge finetune --config <run>/config.yaml`` runs it again."""
        from hfbridge.recipe.config import dump_run_config

        dump_run_config(cfg, work / "config.yaml")

    def loaded_message(self, cfg: RunConfig, module, seconds: float) -> str:
        from hfbridge.models.peft_adapters import trainable_parameters

        trainable, total = trainable_parameters(module.model)
        return (f"loaded {cfg.model.name} in {seconds:.1f}s: {total / 1e6:.2f}M parameters, "
                f"{trainable / 1e6:.2f}M trainable ({'LoRA' if cfg.lora else 'full fine-tuning'})")

    def save(self, model, module, work: Path, cfg: RunConfig, summary: dict) -> None:
        """The loss curve; the model loadable by plain transformers (``model/``, with the adapter merged) and the
        adapter alone (``adapter/``) when there is one (4-bit: the adapter only), all from one plain ``model``;
        ``summary.json``."""
        from hfbridge.models.saving import save_hf_folder
        from hfbridge.reporting import plot_loss_curve

        if (work / "metrics.csv").exists():
            plot_loss_curve(work / "metrics.csv", work / "loss_curve.png", extra_metrics=self.plotted_metrics(cfg))
        preprocessor = self.preprocessor(module)
        if cfg.lora:
            save_hf_folder(model, work / "adapter", preprocessor)
            if not cfg.quantization.load_in_4bit:
                save_hf_folder(model, work / "model", preprocessor, merged=True)
        else:
            save_hf_folder(model, work / "model", preprocessor)
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    def plotted_metrics(self, cfg: RunConfig) -> tuple[str, ...]:
        """Metrics drawn in a second panel of ``loss_curve.png`` beside the losses."""
        return ()

    def saved_message(self, cfg: RunConfig, output: Path) -> str:
        folders = ("adapter/, " if cfg.quantization.load_in_4bit else "model/, adapter/, ") if cfg.lora else "model/, "
        return f"saved to {output}/ ({folders}metrics.csv, loss_curve.png, summary.json, config.yaml)"


def _adapter(cfg: RunConfig):
    from hfbridge.models.peft_adapters import LoRA

    if not cfg.lora:
        return None
    p = cfg.peft
    return LoRA(r=p.r, alpha=p.alpha, dropout=p.dropout, target_modules=p.target_modules, adapter_type=p.type,
                extra=dict(p.options))


def _optim(cfg: RunConfig):
    from hfbridge.optim import OptimizerConfig

    o = cfg.optim
    return OptimizerConfig(lr=o.lr, schedule=o.schedule, warmup_ratio=o.warmup_ratio, min_lr_ratio=o.min_lr_ratio,
                           weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm)


def _packing(cfg: RunConfig) -> bool | str:
    return {"on": True, "off": False}.get(cfg.speed.packing, cfg.speed.packing)


def module_options(cfg: RunConfig, job) -> dict:
    """The module's arguments that every task shares (adapter, 4-bit, dtype, optimizer, speed, mesh)."""
    return dict(
        model_transform=_adapter(cfg), load_in_4bit=cfg.quantization.load_in_4bit, default_dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation,
        optim=_optim(cfg), chunked_loss=cfg.speed.chunked_loss,
        activation_checkpointing=cfg.speed.activation_checkpointing, compile=cfg.speed.compile,
        liger=cfg.speed.liger, device_mesh=job.mesh if job else None, parallel=job.config if job else None,
    )


class TextTask(Task):
    """Causal LMs on text, prompt/completion or chat records (``--task text-generation``)."""

    name = "text-generation"

    def write_demo_data(self, folder: Path, cfg: RunConfig) -> tuple[Path, Path]:
        from hfbridge.data.demo import write_demo_data

        say(f"no --data given: using the bundled date-normalisation task ({cfg.data.demo_train_size} train records)")
        return write_demo_data(folder, n_train=cfg.data.demo_train_size, seed=cfg.train.seed)

    def load_records(self, path, fmt: str) -> tuple[list, str]:
        from hfbridge.data.datamodule import load_records

        return load_records(path, fmt)

    def prompts_and_references(self, records: list, fmt: str) -> list | None:
        from hfbridge.data.formats import prompt_and_reference

        if fmt == "text":
            say("the 'text' format has no prompt/answer pairs: skipping the exact-match evaluation")
            return None
        return [prompt_and_reference(r, fmt) for r in records]

    def module(self, cfg: RunConfig, model_path: Path, job):
        from hfbridge.models.causal_lm import HFAutoModelForCausalLM

        return HFAutoModelForCausalLM(model_name=str(model_path), **module_options(cfg, job))

    def datamodule(self, cfg: RunConfig, module, data: TaskData, context: int | None):
        from hfbridge.data.datamodule import CausalLMDataModule
        from hfbridge.data.mixture import MixtureDataModule, share_lines
        from hfbridge.data.token_cache import cached_tokenize

        max_length = cfg.data.max_length or min(512, context or 512)
        options = dict(max_length=max_length, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                       packing=_packing(cfg), pack_length=cfg.speed.pack_length)
        if cfg.data.streaming:
            from hfbridge.data.streaming import StreamingDataModule

            return StreamingDataModule(module.tokenizer, data.train, data.validation, **options)
        mixture = getattr(self, "mixture", None)
        if mixture is None or mixture.records is not data.train:  # records not read by read_data
            return CausalLMDataModule(module.tokenizer, data.train, data.validation, data_format=data.format,
                                      **options)

        def tokenize(records: list, fmt: str, label: str):
            return cached_tokenize(module.tokenizer, records, fmt, max_length, enabled=cfg.data.cache,
                                   rebuild=cfg.data.rebuild_cache, root=cfg.data.cache_dir, label=label)[0]

        datamodule = MixtureDataModule(module.tokenizer, mixture, data.validation,
                                       getattr(self, "val_format", None) or mixture.formats[0], tokenize, **options)
        datamodule.setup("fit")  # tokenized (or read from the cache) now, to report what each source gives
        self.data_mixture = datamodule.report
        say(f"training data: {self.data_mixture['samples']} samples, {self.data_mixture['label_tokens']} label "
            f"tokens per epoch from {len(mixture.sources)} source{'s' if len(mixture.sources) > 1 else ''}:")
        for line in share_lines(self.data_mixture):
            say(line)
        return datamodule

    def answer(self, model, module, prompts: list, cfg: RunConfig) -> list[str]:
        from hfbridge.generation import generate

        return generate(model, module.tokenizer, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                        batch_size=cfg.eval.batch_size)

    def show(self, prompt) -> str:
        return prompt if isinstance(prompt, str) else prompt[-1]["content"]


class ImageTextTask(Task):
    """Vision-language models on chat records with images (``--task image-text-to-text``)."""

    name = "image-text-to-text"

    @property
    def default_model(self) -> str:  # type: ignore[override]
        from hfbridge.models.tiny_image_text import DEMO_IMAGE_TEXT_MODEL

        return DEMO_IMAGE_TEXT_MODEL

    def defaults(self, user: dict) -> dict:
        """The tiny random demo model's recipe for the options left out: an adapter on random weights has nothing
        to adapt, so it is trained in full, at a learning rate a random model needs, for enough epochs."""
        model = (user.get("model") or {}).get("name") or self.default_model
        if model != self.default_model:
            return {"model": {"name": model}}
        return {"model": {"name": model}, "peft": {"type": "none"}, "optim": {"lr": 3e-3}, "train": {"epochs": 6}}

    def write_demo_data(self, folder: Path, cfg: RunConfig) -> tuple[Path, Path]:
        from hfbridge.data.demo_image_text import write_shapes_data

        say(f"no --data given: using the bundled coloured-shapes task ({cfg.data.demo_train_size} train records, "
            "questions about one or two generated images)")
        return write_shapes_data(folder, n_train=cfg.data.demo_train_size, seed=cfg.train.seed)

    def load_records(self, path, fmt: str) -> tuple[list, str]:
        from hfbridge.data.image_text import load_image_text_records

        return load_image_text_records(path), "messages"

    def prompts_and_references(self, records: list, fmt: str) -> list | None:
        from hfbridge.data.image_text import prompt_and_reference

        return [prompt_and_reference(r) for r in records]

    def check_model(self, cfg: RunConfig, name: str | None = None) -> tuple[Path, int | None]:
        from hfbridge.models.image_text import HFAutoModelForImageTextToText
        from hfbridge.models.tiny_image_text import DEMO_IMAGE_TEXT_MODEL, resolve_image_text_name

        if cfg.model.name == DEMO_IMAGE_TEXT_MODEL:
            say(f"no --model given: using {DEMO_IMAGE_TEXT_MODEL}, a tiny vision-language model with RANDOM weights (LLaVA "
                "architecture) built locally and trained in full, so the point is the pipeline. Real "
                "VLM weights come from a hub id or a local folder: --model HuggingFaceTB/SmolVLM-256M-Instruct "
                "(when the hub is reachable or it is in the local hub cache) or --model path/to/folder")
        path, context = super().check_model(cfg, str(resolve_image_text_name(cfg.model.name)))
        self.processor = HFAutoModelForImageTextToText.configure_processor(path, cfg.model.trust_remote_code)
        return path, context

    def module(self, cfg: RunConfig, model_path: Path, job):
        from hfbridge.models.image_text import HFAutoModelForImageTextToText

        return HFAutoModelForImageTextToText(model_name=str(model_path), processor=self.processor,
                                             **module_options(cfg, job))

    def datamodule(self, cfg: RunConfig, module, data: TaskData, context: int | None):
        from hfbridge.data.image_text import ImageTextDataModule

        return ImageTextDataModule(self.processor, data.train, data.validation, max_length=cfg.data.max_length,
                                batch_size=cfg.train.batch_size, seed=cfg.train.seed, packing=_packing(cfg),
                                pack_length=cfg.speed.pack_length)

    def answer(self, model, module, prompts: list, cfg: RunConfig) -> list[str]:
        from hfbridge.generation import generate_image_text

        return generate_image_text(model, self.processor, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                                   batch_size=cfg.eval.batch_size)

    def preprocessor(self, module):
        return self.processor

    def show(self, prompt) -> str:
        images = sum(p["type"] == "image" for m in prompt.messages for p in m["content"])
        text = "".join(p.get("text", "") for p in prompt.messages[-1]["content"])
        return f"[{images} image{'s' if images != 1 else ''}] {text}"

    def threads(self, cfg: RunConfig) -> int | None:
        """The tiny demo model trains many times faster on one thread than on two, which spin against each other."""
        from hfbridge.models.tiny_image_text import DEMO_IMAGE_TEXT_MODEL

        return 1 if cfg.model.name == DEMO_IMAGE_TEXT_MODEL else None


class PreferenceTask(TextTask):
    """Preference training of causal LMs (``--method dpo|ipo|hinge|simpo|orpo|kto|reward``, docs/preference.md):
    pairs or KTO examples in, a policy (or a reward model) out. Held-out pairs are scored before and after: how
    often the model's likelihood prefers the chosen completion (a reward model: its reward), and exact match of
    the greedy answer against the chosen one."""

    def check(self, cfg: RunConfig) -> None:
        from hfbridge.models.preference import check_preference_options

        method = cfg.method.name
        if cfg.data.format not in ("auto", "preference", "kto"):
            raise ValueError(f"data.format: {method} trains on preference records (preference or kto), not "
                             f"{cfg.data.format!r}")
        if method == "reward":
            if cfg.speed.packing == "on":
                raise ValueError("speed.packing: a reward model scores one padded row per sequence; use --packing "
                                 "auto or off")
            return
        mesh = bool(cfg.parallel.sharding_axis_dims or cfg.parallel.nproc_per_node)
        check_preference_options(method, cfg.method.beta, cfg.method.label_smoothing, cfg.method.reference,
                                 adapter=cfg.lora, mesh=mesh, load_in_4bit=cfg.quantization.load_in_4bit)

    def write_demo_data(self, folder: Path, cfg: RunConfig) -> tuple[Path, Path]:
        from hfbridge.data.demo_preference import write_preference_data

        fmt = "kto" if cfg.method.name == "kto" else "preference"
        say(f"no --data given: using the bundled date task as preference pairs ({cfg.data.demo_train_size} "
            "prompts; chosen: the ISO date, rejected: the input's format, a chatty sentence or day/month order)")
        return write_preference_data(folder, n_train=cfg.data.demo_train_size, seed=cfg.train.seed, fmt=fmt)

    def load_records(self, path, fmt: str) -> tuple[list, str]:
        from hfbridge.data.preference import load_preference_records

        records, fmt = load_preference_records(path, fmt)
        return records, fmt

    def read_data(self, cfg: RunConfig, work: Path) -> TaskData:
        data = super().read_data(cfg, work)
        wanted = "kto" if cfg.method.name == "kto" else "preference"
        if data.format != wanted:
            raise ValueError(f"data.train: --method {cfg.method.name} needs {wanted} records, but "
                             f"{data.paths.get('train')} holds {data.format} records")
        return data

    def prompts_and_references(self, records: list, fmt: str) -> list | None:
        """Pairs stay whole (for preference accuracy); the prompts and chosen answers are what generation is
        scored on (KTO: the desirable examples)."""
        self.test_examples = [r for r in records if r.desirable is not False]
        return [(r.prompt, _text(r.completions[0])) for r in self.test_examples]

    def module(self, cfg: RunConfig, model_path: Path, job):
        from hfbridge.models.preference import HFPreferenceModel, HFRewardModel

        options = module_options(cfg, job)
        if cfg.method.name == "reward":
            return HFRewardModel(model_name=str(model_path), **options)
        m = cfg.method
        return HFPreferenceModel(model_name=str(model_path), method=m.name, beta=m.beta,
                                 label_smoothing=m.label_smoothing, reference=m.reference, simpo_gamma=m.simpo_gamma,
                                 desirable_weight=m.desirable_weight, undesirable_weight=m.undesirable_weight,
                                 **options)

    def datamodule(self, cfg: RunConfig, module, data: TaskData, context: int | None):
        from hfbridge.data.preference import PreferenceDataModule

        max_length = cfg.data.max_length or min(512, context or 512)
        packing = False if cfg.method.name == "reward" else _packing(cfg)
        return PreferenceDataModule(
            module.tokenizer, data.train, data.validation, data_format=data.format, max_length=max_length,
            batch_size=cfg.train.batch_size, seed=cfg.train.seed, packing=packing, pack_length=cfg.speed.pack_length,
        )

    def score(self, model, module, data: TaskData, cfg: RunConfig, label: str) -> Score | None:
        from hfbridge.evaluation import preference_accuracy

        if not data.test:
            return None
        pairs = [e for e in self.test_examples if len(e.completions) == 2]
        value: dict = {}
        parts = []
        if pairs:
            value["preference_accuracy"] = preference_accuracy(model, module.tokenizer, pairs, cfg.eval.batch_size,
                                                               reward=cfg.method.name == "reward")
            what = "reward" if cfg.method.name == "reward" else "likelihood"
            parts.append(f"prefers the chosen answer ({what}) on {value['preference_accuracy']:.1%} of "
                         f"{len(pairs)} held-out pairs")
        if cfg.method.name != "reward":
            generated = super().score(model, module, data, cfg, label)
            value["exact_match"] = generated.value
            parts.append(f"exact match of the greedy answer with the chosen one {generated.value:.1%}")
        return Score(value, f"{label} training: " + "; ".join(parts))

    def samples(self, model, module, data: TaskData, cfg: RunConfig) -> list[dict]:
        return [] if cfg.method.name == "reward" else super().samples(model, module, data, cfg)

    def summary(self, cfg: RunConfig) -> dict:
        return {"task": self.name, "method": cfg.method.name}

    def plotted_metrics(self, cfg: RunConfig) -> tuple[str, ...]:
        return ("rewards/accuracies", "rewards/margins")


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion["content"]


TASKS = {task.name: task for task in (TextTask, ImageTextTask)}


def task_for(name: str, method: str = "sft") -> Task:
    if name not in TASKS:
        raise ValueError(f"method.task: unknown task {name!r}; choose one of {', '.join(TASKS)}")
    if method != "sft":
        if name != "text-generation":
            raise ValueError(f"method.name: {method} trains text models; --task {name} trains with sft only")
        return PreferenceTask()
    return TASKS[name]()
