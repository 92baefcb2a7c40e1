"""Fine-tuning speed side by side: hfbridge against transformers' Trainer and TRL's SFTTrainer (padded and packed).

    .venv/bin/python bench/speed.py                                  # embedded SmolLM2-135M, LoRA, every system
    .venv/bin/python bench/speed.py --systems hfbridge,trl --steps 4 --warmup 1     # a quick look
    .venv/bin/python bench/speed.py --mode full --config-only --model-config 1b     # GPU: 1.2B random init, MFU

Every system runs in its own process (so its peak memory is its own), one after another, on the same model, the
same tokenized samples in the same order, the same micro-batch (samples), gradient accumulation, optimizer
steps, learning rate and schedule (AdamW, cosine to 0, no warmup, clipping at 1.0), in float32 on CPU (bfloat16
weights on a GPU). TRL's packing regroups the samples itself (best-fit decreasing over the data set), so its
micro-batch is one padding-free row holding as many tokens as hfbridge's micro-batches hold on average.

Printed per system: label tokens per second over the timed optimizer steps (the first ``--warmup`` are not
timed), peak memory (the process's peak RSS on CPU; CUDA max allocated on a GPU), the final optimizer step's
loss, and, on a GPU with full fine-tuning, model FLOPs utilisation; then every system's ratios to hfbridge.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IGNORE_INDEX = -100


@dataclass(frozen=True)
class System:
    """One measured configuration."""

    kind: str  # hfbridge | trainer | trl
    packing: bool = False
    chunked_loss: bool = True
    checkpointing: bool | str | int | None = None  # None: the system's own default (hfbridge: 'selective', k)
    compile: bool = False
    liger: bool = False
    note: str = ""


SYSTEMS = {
    "hfbridge": System("hfbridge", packing=True, note="defaults: packing, loss without full logits"),
    "hfbridge+ckpt": System("hfbridge", packing=True, checkpointing=True, note="+ activation checkpointing"),
    "hfbridge+compile": System("hfbridge", packing=True, compile=True, note="+ torch.compile of the layers"),
    "hfbridge+sac": System("hfbridge", packing=True, checkpointing="selective",
                           note="+ selective checkpointing (recompute pointwise ops only)"),
    "hfbridge+ckpt2": System("hfbridge", packing=True, checkpointing=2, note="+ checkpointing every 2nd layer"),
    "hfbridge+ckpt+compile": System("hfbridge", packing=True, checkpointing=True, compile=True,
                                    note="+ activation checkpointing and torch.compile"),
    "hfbridge+liger": System("hfbridge", packing=True, liger=True, note="+ Liger kernels (CUDA only)"),
    "hfbridge-padded": System("hfbridge", chunked_loss=False, note="packing and chunked loss off (the old path)"),
    "trainer": System("trainer", note="transformers Trainer, padded"),
    "trl": System("trl", note="TRL SFTTrainer, padded, its defaults (checkpointing on)"),
    "trl-no-ckpt": System("trl", checkpointing=False, note="TRL SFTTrainer, padded, checkpointing off"),
    "trl-packing": System("trl", packing=True, note="TRL SFTTrainer, packing (bfd, padding-free), defaults"),
    "trl-packing-no-ckpt": System("trl", packing=True, checkpointing=False, note="TRL packing, checkpointing off"),
}
DEFAULT_SYSTEMS = "hfbridge,hfbridge+ckpt,hfbridge+compile,hfbridge+liger,trainer,trl,trl-no-ckpt,trl-packing,trl-packing-no-ckpt"

# Peak dense bf16 tensor-core FLOP/s, for model FLOPs utilisation.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}

# Llama-architecture configs for random-init runs (SmolLM2's tokenizer, 49152 tokens).
MODEL_CONFIGS = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
}


# ----------------------------------------------------------------------------------------------------- data
def build_samples(tokenizer, n: int, max_length: int, seed: int = 0, split: str = "train") -> list:
    """The demo date task, half of the answers followed by an explanation of long-tailed length (log-normal,
    median about 35 words): lengths from about 60 to ``max_length`` tokens, as in real instruction data."""
    from hfbridge.data.demo import date_records
    from hfbridge.data.formats import tokenize_record

    rng = random.Random(seed)
    words = ("the model learns to answer questions about dates numbers places and people in plain words while "
             "keeping each reply short clear and correct").split()
    records = date_records(n, seed, split)
    for record in records:
        if rng.random() < 0.5:
            extra = min(int(rng.lognormvariate(3.5, 0.9)), 400)
            answer = record["messages"][-1]["content"]
            record["messages"][-1]["content"] = f"{answer}. " + " ".join(rng.choice(words) for _ in range(extra))
    return [tokenize_record(tokenizer, r, "messages", max_length) for r in records]


def unshifted(sample, pad_id: int) -> tuple[list[int], list[int]]:
    """A sample as Trainer and TRL take it (the model shifts): the full token sequence, labels on the tokens."""
    last = sample.labels[-1] if sample.labels[-1] != IGNORE_INDEX else pad_id
    return sample.input_ids + [last], [IGNORE_INDEX] + sample.labels


# ----------------------------------------------------------------------------------------------------- helpers
class Recorder:
    """Per optimizer step: its end time and loss; per micro-batch: its label tokens."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.start = (0.0, 0.0)
        self.step_end: list[tuple[float, float]] = []  # (wall, process CPU) seconds
        self.losses: list[float] = []
        self.micro_tokens: list[int] = []

    def now(self) -> tuple[float, float]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def result(self, args) -> dict:
        w, s, a = args.warmup, args.steps, args.accumulate
        if len(self.step_end) < s:
            raise RuntimeError(f"only {len(self.step_end)} of {s} optimizer steps ran")
        first = self.step_end[w - 1] if w else self.start
        last = self.step_end[s - 1]
        tokens = sum(self.micro_tokens[w * a : s * a])
        walls = [self.start[0]] + [t[0] for t in self.step_end]
        return {**peak_memory(self.cuda), "tokens": tokens, "seconds": last[0] - first[0], "cpu_seconds": last[1] - first[1],
                "loss": self.losses[-1], "losses": self.losses,
                "step_seconds": [round(b - a_, 2) for a_, b in zip(walls, walls[1:])]}


def heldout_loss(model, args, tokenizer) -> float:
    """Per-token loss of the trained model on held-out samples, computed the same way for every system."""
    import torch

    from hfbridge.data.collators import PaddedCollator
    from hfbridge.losses import masked_cross_entropy

    samples = build_samples(tokenizer, args.heldout, args.max_length, seed=1, split="test")
    collate = PaddedCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(samples), 4):
            batch = collate(samples[i : i + 4])
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           use_cache=False).logits
            labels = batch["labels"].to(device)
            total += float(masked_cross_entropy(logits, labels, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def peak_memory(cuda: bool) -> dict:
    """The process's peak RSS so far (and CUDA's max allocated): taken when training ends, before scoring."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if cuda:
        import torch

        out["cuda_max_alloc_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    return out


def count_labels(batch) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def load_model(args, dtype):
    """The model (pretrained, or random from ``--model-config``) with the LoRA transform in LoRA mode."""
    import torch

    from hfbridge.models.loading import load_config, load_pretrained_model, resolve_model_path

    if args.model_config:
        from transformers import AutoModelForCausalLM

        config = load_config(resolve_model_path(args.model))
        for key, value in MODEL_CONFIGS[args.model_config].items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        model = load_pretrained_model(args.model, dtype=dtype)
    if args.mode == "lora":
        from hfbridge.models.peft_adapters import LoRA

        model = LoRA(r=16, alpha=32, dropout=0.0)(model)
    return model


def model_dtype(args):
    import torch

    return torch.bfloat16 if args.device == "cuda" else torch.float32


# ----------------------------------------------------------------------------------------------------- runners
def run_hfbridge(args, system: System) -> dict:
    import torch

    from hfbridge import HFAutoModelForCausalLM, OptimizerConfig
    from hfbridge.data.collators import PaddedCollator
    from hfbridge.data.packing import PackedCollator, packing_is_exact, uses_flash_attention
    from hfbridge.models.loading import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    module = HFAutoModelForCausalLM(
        model_name=load_model(args, model_dtype(args)), tokenizer=tokenizer,
        optim=OptimizerConfig(lr=args.lr, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0, max_grad_norm=1.0),
        chunked_loss=system.chunked_loss, activation_checkpointing=system.checkpointing or False,
        compile=system.compile, liger=system.liger,
    )
    module.configure_model()
    samples = build_samples(tokenizer, args.samples, args.max_length)[: args.steps * args.accumulate * args.batch_size]
    if system.packing:  # as CausalLMDataModule(packing="auto") decides it
        ok, reason = packing_is_exact(module.model)
        if not ok:
            raise RuntimeError(f"packing is not exact for this model: {reason}")
        # one row per micro-batch where the attention is variable-length, as the data module lays it out
        collate = PackedCollator(tokenizer.pad_token_id, args.max_length, one_row=uses_flash_attention(module.model))
    else:
        collate = PaddedCollator(tokenizer.pad_token_id)
    batches = [collate(samples[i : i + args.batch_size]) for i in range(0, len(samples), args.batch_size)]
    rec = fit_timed(module, batches, args.steps, args.accumulate, args.device)
    return {**rec.result(args), "heldout_loss": heldout_loss(module.model, args, tokenizer)}


def fit_timed(module, batches, steps: int, accumulate: int, device: str, precision: str = "32-true") -> Recorder:
    """Train ``module`` on ``batches`` with Lightning for ``steps`` optimizer steps, recording each step's end time
    and loss and each micro-batch's label tokens (clipping 1.0, no logger, checkpoints or progress bar)."""
    import lightning.pytorch as pl

    from hfbridge.data.collators import StepTokenCounter

    rec = Recorder(device == "cuda")
    rec.micro_tokens = [count_labels(b) for b in batches]

    class Timer(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            rec.start = rec.now()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % accumulate == 0:
                rec.step_end.append(rec.now())
                rec.losses.append(float(trainer.callback_metrics["train_loss"]))

    trainer = pl.Trainer(
        max_steps=steps, accumulate_grad_batches=accumulate, gradient_clip_val=1.0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()],
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=StepTokenCounter(batches, accumulate))
    return rec


def _hf_rows(args, tokenizer):
    samples = build_samples(tokenizer, args.samples, args.max_length)[: args.steps * args.accumulate * args.batch_size]
    rows = []
    for s in samples:
        ids, labels = unshifted(s, tokenizer.pad_token_id)
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _hf_callbacks(rec: Recorder):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kw):
            rec.start = rec.now()

        def on_step_end(self, targs, state, control, **kw):
            rec.step_end.append(rec.now())

    return [Timer()]


def _hf_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _hf_common(args) -> dict:
    return dict(
        output_dir=args.scratch, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulate, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=args.device != "cuda", dataloader_num_workers=0,
        remove_unused_columns=False, seed=0, disable_tqdm=True, bf16=False,
    )


def run_trainer(args, system: System) -> dict:
    """transformers' Trainer: padded batches, the model's own (shifting) loss."""
    import torch
    from transformers import Trainer, TrainingArguments

    from hfbridge.models.loading import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args, model_dtype(args))
    rows = _hf_rows(args, tokenizer)
    rec = Recorder(args.device == "cuda")

    def collate(batch):
        n = max(len(r["input_ids"]) for r in batch)
        pad = tokenizer.pad_token_id
        out = {
            "input_ids": torch.tensor([r["input_ids"] + [pad] * (n - len(r["input_ids"])) for r in batch]),
            "labels": torch.tensor([r["labels"] + [IGNORE_INDEX] * (n - len(r["labels"])) for r in batch]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in batch]),
        }
        return out

    rec.micro_tokens = [count_labels(collate(rows[i : i + args.batch_size])) for i in range(0, len(rows), args.batch_size)]
    targs = TrainingArguments(**_hf_common(args), gradient_checkpointing=bool(system.checkpointing))

    class InOrder(Trainer):  # the same order as the other systems: no shuffling
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=_hf_callbacks(rec))
    trainer.train()
    rec.losses = _hf_losses(trainer)
    return {**rec.result(args), "heldout_loss": heldout_loss(trainer.model, args, tokenizer)}


def run_trl(args, system: System) -> dict:
    """TRL's SFTTrainer on the same tokenized samples (a ``labels`` column, so TRL tokenizes nothing), padded or
    with its own packing. Its defaults stand except float32 (its default bf16 autocast is 40x slower on these
    CPUs, and the other systems run float32) and, where the system says so, checkpointing."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from hfbridge.models.loading import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args, model_dtype(args))
    rows = _hf_rows(args, tokenizer)
    extra = {}
    if system.checkpointing is not None:
        extra["gradient_checkpointing"] = system.checkpointing
    common = _hf_common(args)
    if system.packing:
        # One padding-free row per micro-batch, as many tokens as a micro-batch of samples holds on average.
        mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)
        pack = max(round(mean_len * args.batch_size), max(len(r["input_ids"]) for r in rows))
        common["per_device_train_batch_size"] = 1
        extra.update(packing=True, max_length=pack)
    else:
        extra.update(max_length=args.max_length + 1)
    config = SFTConfig(**common, **extra)
    rec = Recorder(args.device == "cuda")

    class InOrder(SFTTrainer):  # padded: the same order as the others; packed rows keep TRL's own sampler
        def _get_train_sampler(self, *a, **k):
            if system.packing:
                return super()._get_train_sampler(*a, **k)
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      callbacks=_hf_callbacks(rec))
    collate = trainer.data_collator

    def counting(batch):
        out = collate(batch)
        rec.micro_tokens.append(count_labels(out))
        return out

    trainer.data_collator = counting
    trainer.train()
    rec.losses = _hf_losses(trainer)
    return {**rec.result(args), "heldout_loss": heldout_loss(trainer.model, args, tokenizer)}


RUNNERS = {"hfbridge": run_hfbridge, "trainer": run_trainer, "trl": run_trl}


# ----------------------------------------------------------------------------------------------------- report
def model_flops_per_token(args) -> float | None:
    """6 x (parameters without the input embedding) + attention, per trained token (full fine-tuning)."""
    from transformers import AutoConfig

    from hfbridge.models.loading import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    for key, value in (MODEL_CONFIGS[args.model_config] if args.model_config else {}).items():
        setattr(config, key, value)
    h, layers, inter, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter
    mean_len = args.max_length / 2  # causal attention over about half a sample on average
    return 6 * (layers * per_layer + vocab * h) + 12 * layers * h * mean_len


def child(args, systems: dict | None = None, runners: dict | None = None) -> None:
    """Run one system (``args.runner``) in this process and print its result; ``systems`` and ``runners``
    default to this script's (bench/preference.py passes its own)."""
    import torch

    system = (systems or SYSTEMS)[args.runner]
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = (runners or RUNNERS)[system.kind](args, system)
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result), flush=True)


def versions() -> str:
    import importlib.metadata as md

    names = ("torch", "transformers", "trl", "peft", "lightning", "accelerate")
    found = []
    for name in names:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(found)


def _fmt_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _ratio(results: dict, name: str, key: str, of: str) -> str:
    """``results[name][key] / results[of][key]`` where both ran; speed keys are tokens per (CPU) second."""
    a, b = results.get(name, {}), results.get(of, {})
    if "error" in a or "error" in b or not a or not b:
        return ""
    value = (lambda r: r["tokens"] / r[key]) if key in ("seconds", "cpu_seconds") else (lambda r: r[key])
    return f"{value(a) / value(b):.2f}"


def report(args, results: dict[str, dict]) -> None:
    """The results as a Markdown table, every system's speed and memory relative to TRL's (padded and packed)."""
    gpu = args.device == "cuda"
    mem_key, mem_name = ("cuda_max_alloc_mb", "CUDA max alloc MB") if gpu else ("peak_rss_mb", "peak RSS MB")
    flops = model_flops_per_token(args) if gpu and args.mode == "full" else None
    print(f"model={args.model}{' (' + args.model_config + ' random init)' if args.model_config else ''} "
          f"mode={args.mode} device={args.device} steps={args.steps} (timed {args.steps - args.warmup}) "
          f"micro-batch={args.batch_size} samples x accumulate {args.accumulate}, max_length={args.max_length}, "
          f"lr={args.lr}, torch threads={next((r['threads'] for r in results.values() if 'threads' in r), '?')}")
    print(versions())
    header = ["system", "label tok/s", "label tok/CPU-s", mem_name, "final loss", "held-out loss",
              "speed / TRL padded (wall, CPU)", "speed / TRL packed (wall, CPU)", "memory / TRL padded"]
    header += ["MFU"] if flops else []
    print(_fmt_row(header))
    print(_fmt_row(["---"] * len(header)))
    for name, r in results.items():
        if "error" in r:
            print(_fmt_row([name, f"n/a: {r['error']}"] + [""] * (len(header) - 2)))
            continue
        wall, cpu = r["tokens"] / r["seconds"], r["tokens"] / r["cpu_seconds"]
        cells = [name, f"{wall:.1f}", f"{cpu:.1f}", f"{r[mem_key]:.0f}", f"{r['loss']:.4f}", f"{r['heldout_loss']:.4f}"]
        for base in ("trl", "trl-packing"):
            cells.append(f"{_ratio(results, name, 'seconds', base)}, {_ratio(results, name, 'cpu_seconds', base)}")
        cells.append(_ratio(results, name, mem_key, "trl"))
        if flops:
            peak = next((v for k, v in PEAK_FLOPS.items() if k in r.get("gpu", "")), None)
            cells.append(f"{wall * flops / peak:.1%}" if peak else "n/a")
        print(_fmt_row(cells))
    print("final loss: the last optimizer step's training loss; held-out loss: per-token loss on the same held-out "
          "samples after training; label tok/CPU-s: per second of the process's own CPU time (steadier than wall "
          "time on a shared machine); speed / X: label tokens per second over X's (>1: faster than X); "
          "memory / TRL padded: peak memory over TRL padded's (<1: smaller)")


def run_child(name: str, args, script: str = __file__, describe=None) -> dict:
    """One system in its own process (``script --runner name``); its RESULT line, or an error. ``describe(r)``:
    the part of the progress line after the speeds (default: the final and held-out loss)."""
    cmd = [sys.executable, script, *sys.argv[1:], "--device", args.device, "--runner", name]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {"error": "failed (see stderr)"}
    r = json.loads(line[len("RESULT "):])
    r["wall_seconds"] = round(time.time() - t0, 1)
    detail = describe(r) if describe else f"loss {r['loss']:.4f}, held-out {r['heldout_loss']:.4f}"
    print(f"# {name}: {r['tokens'] / r['seconds']:.1f} label tok/s, {r['tokens'] / r['cpu_seconds']:.1f} per CPU-s, "
          f"{detail}, {r['peak_rss_mb']:.0f} MB, {r['wall_seconds']:.0f}s", file=sys.stderr, flush=True)
    return r


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall-clock throughput (its other figures come with it)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    ranked = sorted(ok, key=lambda r: r["tokens"] / r["seconds"])
    return {**ranked[len(ranked) // 2], "runs": len(ok)}


def write_json(args, names: list[str], runs: dict[str, list[dict]]) -> None:
    payload = {"args": vars(args), "versions": versions(), "systems": {k: asdict(SYSTEMS[k]) for k in names},
               "runs": runs}
    with open(args.json, "w") as f:
        json.dump(payload, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), help="random init of this size instead")
    parser.add_argument("--mode", choices=["full", "lora"], default="lora")
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"comma-separated, from {', '.join(SYSTEMS)}")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per micro-batch")
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--samples", type=int, default=512, help="samples generated (the first ones are used)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--heldout", type=int, default=32, help="held-out samples scored after training")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--repeats", type=int, default=1, help="runs per system (alternating order; medians)")
    parser.add_argument("--json", help="also write every run's results here")
    parser.add_argument("--runner", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default="/tmp/hfbridge-speed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.runner:
        child(args)
        return
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        sys.exit(f"unknown systems: {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    if args.samples < args.steps * args.accumulate * args.batch_size:
        sys.exit("--samples must cover steps x accumulate x batch-size")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    # Repeats run in alternating order (A B C, C B A, ...) so that changes in machine load hit every system alike.
    order = [n for r in range(args.repeats) for n in (names if r % 2 == 0 else names[::-1])]
    for name in order:
        if SYSTEMS[name].liger and args.device != "cuda":
            runs[name] = [{"error": "Liger's kernels need a CUDA GPU"}]
            continue
        runs[name].append(run_child(name, args))
        if args.json:
            write_json(args, names, runs)
    results = {name: median_run(rs) for name, rs in runs.items()}
    report(args, results)


if __name__ == "__main__":
    main()
