"""The job behind ``hfbridge finetune --task image-text-to-text``: fine-tune a vision-language model on chat
records with images.

Without ``--model`` it trains ``tiny-random-vlm``, a tiny LLaVA-architecture model with random weights built into
the cache, and without ``--data`` the bundled coloured-shapes task: the point is the whole pipeline running on a
CPU in a few minutes. Real vision-language weights come from a hub id (from the local hub cache, or downloaded
when the hub is reachable) or a local folder given with ``--model``. Everything that needs no weights is checked
first (the output folder, every record and image, the processor's chat template), and the run is written to a
temporary folder renamed into place at the end, as :mod:`hfbridge.finetune` does.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from hfbridge.data.demo_vision import write_shapes_data
from hfbridge.data.vision import VisionDataModule, VisionRecord, load_vision_records, prompt_and_reference
from hfbridge.evaluation import GenerationEval, normalise_answer
from hfbridge.finetune import (
    FinetuneConfig,
    FinetuneResult,
    _say,
    check_inputs,
    make_trainer,
    save_run_outputs,
)
from hfbridge.io import atomic_dir
from hfbridge.models import loading
from hfbridge.models.tiny_vlm import DEMO_VLM_NAME, resolve_vlm_name

DEFAULT_MODEL = DEMO_VLM_NAME
# The recipe of the tiny random demo model, for the options left out: an adapter on random weights has nothing to
# adapt, so it is trained in full, at a learning rate a random model needs, for enough epochs to learn the task.
DEMO_RECIPE = {"lora": False, "lr": 3e-3, "epochs": 6}


def vlm_config(**options) -> FinetuneConfig:
    """A :class:`FinetuneConfig` for the image-text-to-text job: ``model`` defaults to ``tiny-random-vlm``, whose
    options left out follow :data:`DEMO_RECIPE`."""
    options = {k: v for k, v in options.items() if v is not None}
    options.setdefault("model", DEFAULT_MODEL)
    if options["model"] == DEMO_VLM_NAME:
        options = {**DEMO_RECIPE, **options}
    return FinetuneConfig(**options)


def vlm_exact_match(model, processor, records: list[VisionRecord], max_new_tokens: int = 16) -> GenerationEval:
    """Greedy answers to each record's last question, scored by exact match against its last answer."""
    from hfbridge.models.image_text import generate

    pairs = [prompt_and_reference(r) for r in records]
    predictions = generate(model, processor, [p for p, _ in pairs], max_new_tokens=max_new_tokens)
    references = [r for _, r in pairs]
    scores = [normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references)]
    return GenerationEval(sum(scores) / max(len(scores), 1), [p for p, _ in pairs], references, predictions)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (``None``: as it is). A 0.2M-parameter model trains many times faster on one
    thread than on two, which spin against each other and against any other process on a busy machine."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _question(record: VisionRecord) -> str:
    images = sum(p["type"] == "image" for m in record.messages for p in m["content"])
    text = "".join(p.get("text", "") for p in record.messages[-1]["content"])
    return f"[{images} image{'s' if images != 1 else ''}] {text}"


def run_vlm_finetune(cfg: FinetuneConfig) -> FinetuneResult:
    import lightning.pytorch as pl

    from hfbridge.models.image_text import HFAutoModelForImageTextToText
    from hfbridge.optim import OptimizerConfig
    from hfbridge.peft import LoRA, trainable_parameters

    check_inputs(cfg)
    if cfg.data_format not in ("auto", "messages"):
        raise ValueError(f"image-text-to-text data is in the 'messages' format, not {cfg.data_format!r}")
    output = Path(cfg.output)
    demo = cfg.model == DEMO_VLM_NAME
    with atomic_dir(output, overwrite=cfg.overwrite) as work, _threads(1 if demo else None):
        # 1. Data: every record and image checked before any weights are loaded.
        train_path, val_path, test_path = cfg.data, cfg.val_data, cfg.test_data
        if train_path is None:
            train_path, demo_test = write_shapes_data(work / "data", n_train=cfg.demo_train_size, seed=cfg.seed)
            test_path = test_path or demo_test
            _say(f"no --data given: using the bundled coloured-shapes task ({cfg.demo_train_size} train records, "
                 "questions about one or two generated images)")
        train_records = load_vision_records(train_path)
        val_records = load_vision_records(val_path) if val_path else None
        test_records = load_vision_records(test_path)[: cfg.eval_samples] if test_path else None

        # 2. The model's files, processor and context, still without weights.
        if demo:
            _say(f"no --model given: using {DEMO_VLM_NAME}, a tiny vision-language model with RANDOM weights (LLaVA "
                 "architecture) built locally and trained in full, so the point is the pipeline. Real "
                 "VLM weights come from a hub id or a local folder: --model HuggingFaceTB/SmolVLM-256M-Instruct "
                 "(when the hub is reachable or it is in the local hub cache) or --model path/to/folder")
        model_path = loading.resolve_model_path(resolve_vlm_name(cfg.model), cfg.trust_remote_code)
        processor = HFAutoModelForImageTextToText.configure_processor(model_path, cfg.trust_remote_code)
        loading.check_max_length(cfg.max_length, loading.load_config(model_path, cfg.trust_remote_code), "--max-length")
        datamodule = VisionDataModule(
            processor, train_records, val_records, max_length=cfg.max_length, batch_size=cfg.batch_size, seed=cfg.seed,
        )

        # 3. Load.
        pl.seed_everything(cfg.seed, verbose=False)
        transform = None
        if cfg.lora:
            transform = LoRA(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_targets)
        module = HFAutoModelForImageTextToText(
            model_name=str(model_path), processor=processor, model_transform=transform, load_in_4bit=cfg.load_in_4bit,
            default_dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
            optim=OptimizerConfig(lr=cfg.lr, warmup_ratio=cfg.warmup_ratio, schedule=cfg.schedule),
        )
        t0 = time.time()
        module.configure_model()
        trainable, total = trainable_parameters(module.model)
        _say(f"loaded {cfg.model} in {time.time() - t0:.1f}s: {total / 1e6:.2f}M parameters, "
             f"{trainable / 1e6:.2f}M trainable ({'LoRA' if cfg.lora else 'full fine-tuning'})")

        def score(label: str) -> float | None:
            if not test_records:
                return None
            t = time.time()
            result = vlm_exact_match(module.model, processor, test_records, cfg.max_new_tokens)
            _say(f"exact match {label} fine-tuning: {result.accuracy:.1%} on {len(test_records)} held-out records "
                 f"({time.time() - t:.0f}s)")
            return result.accuracy

        before = score("before")

        # 4. Train.
        trainer = make_trainer(cfg, work, module.optim.max_grad_norm)
        t0 = time.time()
        trainer.fit(module, datamodule)
        train_seconds = time.time() - t0
        _say(f"trained {trainer.global_step} optimizer steps in {train_seconds:.0f}s")

        # 5. Score again and show samples.
        after = score("after")
        samples = []
        if test_records:
            shown = vlm_exact_match(module.model, processor, test_records[: cfg.show_samples], cfg.max_new_tokens)
            for record, reference, prediction in zip(shown.prompts, shown.references, shown.predictions):
                question = _question(record)
                samples.append({"prompt": question, "reference": reference, "prediction": prediction})
                _say(f"  {question!r} -> {prediction!r} (reference {reference!r})")

        # 6. Save: the model and its processor, loadable by plain transformers; the adapter alone too.
        save_run_outputs(module, work, cfg)
        summary = {
            "config": asdict(cfg), "task": "image-text-to-text", "model_path": str(model_path),
            "exact_match_before": before, "exact_match_after": after,
            "optimizer_steps": trainer.global_step, "train_seconds": round(train_seconds, 1),
            "samples": samples, "torch": torch.__version__,
        }
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _say(f"saved to {output}/ (model/, {'adapter/, ' if cfg.lora else ''}metrics.csv, loss_curve.png, summary.json)")
    return FinetuneResult(output, before, after, train_seconds, samples)

