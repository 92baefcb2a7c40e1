"""Training throughput and peak memory: hfbridge against transformers' Trainer, same model, data, batch, steps.

    .venv/bin/python bench/train_throughput.py                       # embedded SmolLM2, full fine-tuning
    .venv/bin/python bench/train_throughput.py --mode lora --steps 12

Each system runs in its own process (so peak RSS is its own) on the same tokenized samples in the same order,
with the same micro-batch, gradient accumulation, optimizer steps, learning rate and schedule. The first
``--warmup`` optimizer steps are not timed. Printed per system: label tokens per second over the timed steps,
peak resident memory, and the final step's loss; then hfbridge's ratios against the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_samples(args, tokenizer):
    """The benchmark's data: the demo date task plus longer chat samples, for a realistic spread of lengths."""
    import random

    from hfbridge.data.demo import date_records
    from hfbridge.data.formats import tokenize_record

    rng = random.Random(0)
    records = date_records(args.samples, 0, "train")
    words = "the model learns to answer questions about dates numbers places and people in plain words".split()
    for record in records[::3]:  # a third of the samples get a long assistant explanation
        answer = record["messages"][-1]["content"]
        extra = " ".join(rng.choice(words) for _ in range(rng.randint(20, 120)))
        record["messages"][-1]["content"] = f"{answer}. {extra}"
    samples = [tokenize_record(tokenizer, r, "messages", args.max_length) for r in records]
    order = list(range(len(samples)))
    rng.shuffle(order)
    return [samples[i] for i in order]


def micro_batches(samples, batch_size):
    return [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]


def lora_transform(args):
    from hfbridge.models.peft_adapters import LoRA

    return LoRA(r=16, alpha=32, dropout=0.0) if args.mode == "lora" else None


def run_hfbridge(args) -> dict:
    import lightning.pytorch as pl
    import torch

    from hfbridge import HFAutoModelForCausalLM, OptimizerConfig
    from hfbridge.data.collators import PaddedCollator, StepTokenCounter

    torch.manual_seed(0)
    module = HFAutoModelForCausalLM(
        model_name=args.model, model_transform=lora_transform(args),
        optim=OptimizerConfig(lr=args.lr, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0, max_grad_norm=1.0),
    )
    module.configure_model()
    samples = build_samples(args, module.tokenizer)
    collate = PaddedCollator(module.tokenizer.pad_token_id)
    batches = [collate(b) for b in micro_batches(samples, args.batch_size)]
    batches = batches[: args.steps * args.accumulate]
    loader = StepTokenCounter(batches, args.accumulate)
    timer = StepTimer(args.accumulate, args.warmup)
    trainer = pl.Trainer(
        max_steps=args.steps, accumulate_grad_batches=args.accumulate, gradient_clip_val=1.0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return timer.result(float(trainer.callback_metrics["train_loss"]))


class StepTimer:
    """Times optimizer steps after the warmup and counts their label tokens (a Lightning callback)."""

    def __new__(cls, *args, **kwargs):
        import lightning.pytorch as pl

        class _StepTimer(pl.Callback):
            def __init__(self, accumulate, warmup):
                self.accumulate, self.warmup = accumulate, warmup
                self.tokens, self.start, self.end, self.steps = 0, None, None, 0

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if self.start is not None:
                    self.tokens += int((batch["labels"] != -100).sum())
                if (batch_idx + 1) % self.accumulate == 0:
                    self.steps += 1
                    if self.steps == self.warmup:
                        self.start = time.perf_counter()
                    self.end = time.perf_counter()

            def result(self, loss):
                return {"tokens": self.tokens, "seconds": self.end - self.start, "loss": loss}

        return _StepTimer(*args, **kwargs)


def run_trainer(args) -> dict:
    """transformers' Trainer on the same samples: the HF model shifts labels itself, so it gets the unshifted
    sequence (one more input token per sample) whose targets are exactly hfbridge's."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hfbridge.losses import IGNORE_INDEX
    from hfbridge.models.loading import load_pretrained_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    model = load_pretrained_model(args.model)
    transform = lora_transform(args)
    if transform is not None:
        model = transform(model)
    samples = build_samples(args, tokenizer)[: args.steps * args.accumulate * args.batch_size]
    rows = [{"input_ids": s.input_ids + [s.labels[-1]], "labels": [IGNORE_INDEX] + s.labels} for s in samples]
    counted = {"tokens": 0, "timing": False}

    def collate(batch):
        n = max(len(r["input_ids"]) for r in batch)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([r["input_ids"] + [pad] * (n - len(r["input_ids"])) for r in batch])
        labels = torch.tensor([r["labels"] + [IGNORE_INDEX] * (n - len(r["labels"])) for r in batch])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in batch])
        if counted["timing"]:
            counted["tokens"] += int((labels != IGNORE_INDEX).sum())
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    times = {}

    class Timer(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step == args.warmup:
                times["start"] = time.perf_counter()
                counted["timing"] = True
            times["end"] = time.perf_counter()

    targs = TrainingArguments(
        output_dir=args.scratch, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulate, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False, seed=0,
        disable_tqdm=True, weight_decay=0.0,
    )

    class InOrder(Trainer):  # the same order as hfbridge's run: no shuffling
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Timer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # tokens collated after the timer started include the first timed step's micro-batches only from then on
    return {"tokens": counted["tokens"], "seconds": times["end"] - times["start"], "loss": float(losses[-1])}


RUNNERS = {"hfbridge": run_hfbridge, "transformers-Trainer": run_trainer}


def _median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (its memory and loss are reported with it)."""
    ranked = sorted(runs, key=lambda r: r["tokens"] / r["seconds"])
    return ranked[len(ranked) // 2]


def child(args) -> None:
    result = RUNNERS[args.runner](args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--mode", choices=["full", "lora"], default="full")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--repeats", type=int, default=2, help="runs per system, alternating")
    parser.add_argument("--runner", choices=list(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default="/tmp/hfbridge-bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runner:
        child(args)
        return
    # Runs alternate (A B B A ...) so that a change in machine load over time hits both systems alike;
    # each system's figures are the medians of its runs.
    names = list(RUNNERS)
    order = [n for r in range(args.repeats) for n in (names if r % 2 == 0 else names[::-1])]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for name in order:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--runner", name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        runs[name].append(json.loads(line[len("RESULT "):]))
    results = {n: _median_run(rs) for n, rs in runs.items()}
    print(f"model={args.model} mode={args.mode} steps={args.steps} (timed {args.steps - args.warmup}) "
          f"micro-batch={args.batch_size} accumulate={args.accumulate} max_length={args.max_length}")
    print(f"{'system':<22} {'label tok/s':>12} {'peak RSS MB':>12} {'final loss':>11}")
    for name, r in results.items():
        print(f"{name:<22} {r['tokens'] / r['seconds']:>12.1f} {r['peak_rss_mb']:>12.0f} {r['loss']:>11.4f}")
    ours, base = results["hfbridge"], results["transformers-Trainer"]
    speed = (ours["tokens"] / ours["seconds"]) / (base["tokens"] / base["seconds"])
    print(f"hfbridge / Trainer: throughput x{speed:.2f}, peak memory x{ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
