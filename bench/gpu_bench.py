"""GPU fine-tuning benchmark: hfbridge against TRL's SFTTrainer at its fastest, on a 1B Llama-architecture model.

    bash bench/gpu.sh                                   # one NVIDIA GPU: its own venv with CUDA torch, then this
    .venv-gpu/bin/python bench/gpu_bench.py --json runs/gpu.json    # this alone, once .venv-gpu is installed
    .venv/bin/python bench/gpu_bench.py --dry-run       # the same code on CPU, tiny sizes, under a minute

The model is built from a config with random weights (no hub): Llama-3.2-1B's shape (hidden 2048, 16 layers, 32
heads, 8 key-value heads, intermediate 8192, vocabulary 128256, tied embeddings), in bfloat16, attention through
sdpa. Data: random token ids of log-normal lengths (fixed seed), every token trained. The samples are grouped once
into rows of at most ``--row-length`` tokens by best-fit decreasing (``hfbridge.data.packing``; TRL's ``bfd``
packing is the same algorithm), and both systems train the same rows in the same order:

* hfbridge: ``HFAutoModelForCausalLM`` through a Lightning ``Trainer``, as a user runs it: padding-free packing
  (``PackedCollator``: each micro-batch's samples in rows of ``--row-length``, positions restarting per sample),
  the loss without full logits, Liger's kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) on a GPU.
  A micro-batch holds ``--rows-per-batch`` rows.
* TRL: ``SFTTrainer`` at its fastest setting: bf16, packing (``bfd``) with ``padding_free`` (the rows are handed
  over already packed, with their ``seq_lengths``, so TRL's packed collator lays them out), ``use_liger_kernel``
  on a GPU, no gradient checkpointing. TRL's padding-free collator flattens a micro-batch into one row (built for
  variable-length flash attention; flash-attn is not installed, PyPI has only its source, which compiles for an
  hour); under sdpa a longer row costs attention quadratic in its length. So TRL runs one row per micro-batch
  with ``--rows-per-batch`` times the gradient accumulation (``trl-full``, ``trl-lora``) and, on a GPU, also
  hfbridge's micro-batch flattened (``trl-full-wide``); the ratios are to the faster. Every optimizer step trains
  exactly the same tokens in every system.

Both: AdamW, cosine to 0 without warmup, clipping at 1.0, full fine-tuning and LoRA (r 16, alpha 32, every linear
layer of the decoder), each system in its own process. Printed: label tokens per second over the timed optimizer
steps (the first ``--warmup`` are not timed), model FLOPs utilisation against the GPU's dense bf16 peak, CUDA peak
memory (``torch.cuda.max_memory_allocated``), the first and final step's loss, the label tokens each system
trained; then the projection for Llama-3.1-8B from the measured utilisation. ``--json`` and ``--markdown`` write
the results (never over an existing file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  bench/speed.py: its child runner, recorder, data, model loading and timed fit are reused

# Llama-architecture shapes built with random weights. "1b" is Llama-3.2-1B's; "tiny" is for --dry-run.
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=10000.0),
}
# The model the projection is for (Llama-3.1-8B's shape; not run).
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)

# Dense (not sparse) bf16 tensor-core peak FLOP/s from the vendors' spec sheets, by a part of the device name; the
# first match wins, so the specific names come before the general ones.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12),
             ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12))


@dataclass(frozen=True)
class System:
    kind: str  # hfbridge | trl
    mode: str  # full | lora
    note: str = ""
    wide: bool = False  # TRL: --rows-per-batch rows per micro-batch (flattened into one row by its collator)


SYSTEMS = {
    "hfbridge-full": System("hfbridge", "full", "hfbridge defaults: packing, loss without full logits"),
    "trl-full": System("trl", "full", "TRL SFTTrainer: packing + padding_free, one row per micro-batch"),
    "hfbridge-lora": System("hfbridge", "lora", "hfbridge defaults, LoRA r16 on every linear layer"),
    "trl-lora": System("trl", "lora", "TRL SFTTrainer: packing + padding_free, one row per micro-batch, LoRA r16"),
    "trl-full-wide": System("trl", "full", "TRL SFTTrainer: packing + padding_free, as many rows per micro-batch "
                            "as hfbridge, which its collator lays out as one row", wide=True),
}
# The GPU run measures TRL's wide layout too, to show which TRL layout is its fastest; the dry run leaves it out.
DEFAULT_SYSTEMS = ("hfbridge-full,trl-full,trl-full-wide,hfbridge-lora,trl-lora",
                   "hfbridge-full,trl-full,hfbridge-lora,trl-lora")

# (GPU run, --dry-run) defaults of the size options; None on the command line means "this mode's default".
DEFAULTS = {
    "shape": ("1b", "tiny"),
    "steps": (12, 3),
    "warmup": (2, 1),
    "row_length": (4096, 96),
    "rows_per_batch": (8, 2),
    "median_length": (600, 24),
}
TARGET_MFU, TARGET_SPEEDUP = 0.40, 1.5


# ----------------------------------------------------------------------------------------------------- data
def sample_lengths(n: int, args) -> list[int]:
    """``n`` sample lengths (tokens, before the causal shift): log-normal around ``--median-length`` with
    ``--length-sigma``, from 8 tokens to ``--row-length``."""
    rng = random.Random(args.seed)
    mu = math.log(args.median_length)
    return [min(max(int(rng.lognormvariate(mu, args.length_sigma)), 8), args.row_length) for _ in range(n)]


def build_rows(args) -> tuple[list[list[int]], list[list[int]]]:
    """``(tokens, rows)``: the samples' token ids (random, fixed seed) and the rows, lists of sample indices of at
    most ``--row-length`` tokens in training order, exactly ``steps x accumulate x rows-per-batch`` of them.

    The samples are packed by best-fit decreasing, as many as fill the rows needed (the last, partly filled rows
    left out); the rows are then shuffled (fixed seed) so that every optimizer step holds a similar mix."""
    from hfbridge.data.packing import best_fit_decreasing

    needed = args.steps * args.accumulate * args.rows_per_batch
    n = max(needed, int(needed * args.row_length / args.median_length))
    while True:
        lengths = sample_lengths(n, args)
        rows = best_fit_decreasing(lengths, args.row_length)
        if len(rows) > needed:
            break
        n = int(n * 1.3) + 8
    rows = rows[:needed]  # best-fit decreasing fills the rows it opened first; the last ones hold the leftovers
    random.Random(args.seed + 1).shuffle(rows)
    rng = random.Random(args.seed + 2)
    low = 8  # ids below this are the tokenizer's special tokens (pad among them): never sampled
    tokens = [[rng.randrange(low, args.vocab) for _ in range(m)] for m in lengths]
    return tokens, rows


def data_digest(tokens: list[list[int]], rows: list[list[int]]) -> str:
    """A short digest of the rows' token ids, in order: equal in every process that trains the same data."""
    h = hashlib.sha256()
    for row in rows:
        for i in row:
            h.update(json.dumps(tokens[i]).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------- model
def model_config(args, tokenizer):
    from transformers import LlamaConfig

    shape = SHAPES[args.shape]
    return LlamaConfig(**shape, max_position_embeddings=max(args.row_length, 2048),
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)


def build_model(args, tokenizer):
    """The Llama model with random weights (the same in every process: fixed seed), built on the device."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        config = model_config(args, tokenizer)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def lora():
    from hfbridge.models.peft_adapters import LoRA

    return LoRA(r=16, alpha=32, dropout=0.0)


def matmul_params(shape: dict) -> int:
    """Parameters that take part in a matrix product per token: the decoder's linear layers and the output head
    (the input embedding is a lookup)."""
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + shape["vocab_size"] * h


def flops_per_token(shape: dict, mode: str, mean_context: float) -> float:
    """Training FLOPs per trained token: 6 per matrix parameter for full fine-tuning (forward 2, backward 4), 4
    for LoRA (no weight gradients for frozen weights; the adapters' own FLOPs are under 1% and not counted), plus
    causal attention over the sample: forward 2 x 2 x hidden x (position) per layer, three times that with
    backward, which averages to 6 x layers x hidden x ``mean_context`` (``sum(n^2) / sum(n)`` over the samples'
    lengths n)."""
    per_param = 6 if mode == "full" else 4
    attention = 6 * shape["num_hidden_layers"] * shape["hidden_size"] * mean_context
    return per_param * matmul_params(shape) + attention


def mean_context(tokens: list[list[int]], rows: list[list[int]]) -> float:
    lengths = [len(tokens[i]) - 1 for row in rows for i in row]  # tokens through the model (after the shift)
    return sum(n * n for n in lengths) / sum(lengths)


# ----------------------------------------------------------------------------------------------------- runners
def run_hfbridge(args, system: System) -> dict:

    from hfbridge import HFAutoModelForCausalLM, OptimizerConfig
    from hfbridge.data.formats import TokenizedSample
    from hfbridge.data.packing import PackedCollator, packing_is_exact
    from hfbridge.models.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokens, rows = build_rows(args)
    module = HFAutoModelForCausalLM(
        model_name=build_model(args, tokenizer), tokenizer=tokenizer,
        model_transform=lora() if system.mode == "lora" else None,
        optim=OptimizerConfig(lr=args.lr, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0, max_grad_norm=1.0),
        chunked_loss=True, activation_checkpointing=False, liger=args.liger,
    )
    module.configure_model()
    ok, reason = packing_is_exact(module.model)
    if not ok:
        raise RuntimeError(f"packing is not exact for this model: {reason}")
    samples = [TokenizedSample(t[:-1], t[1:]) for t in tokens]  # every token trained, shifted once
    collate = PackedCollator(tokenizer.pad_token_id, pack_length=args.row_length)
    k = args.rows_per_batch
    batches = [collate([samples[i] for row in rows[j : j + k] for i in row]) for j in range(0, len(rows), k)]
    rec = speed.fit_timed(module, batches, args.steps, args.accumulate, args.device)
    return finish(rec, args, args.accumulate, module.model, tokens, rows, batches[0]["input_ids"].shape)


def run_trl(args, system: System) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from hfbridge.models.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokens, rows = build_rows(args)
    model = build_model(args, tokenizer)
    # TRL's packed format: one record per row, its samples' tokens end to end and their lengths (the model shifts;
    # the collator masks each sample's first label, so a sample of n tokens trains n - 1, as in hfbridge).
    records = [{"input_ids": [t for i in row for t in tokens[i]], "seq_lengths": [len(tokens[i]) for i in row]}
               for row in rows]
    batch = args.rows_per_batch if system.wide else 1
    accumulate = args.accumulate * args.rows_per_batch // batch
    common = speed._hf_common(argparse.Namespace(**{**vars(args), "batch_size": batch, "accumulate": accumulate}))
    cuda = args.device == "cuda"
    config = SFTConfig(
        **{**common, "bf16": cuda, "output_dir": args.scratch}, packing=True, packing_strategy="bfd",
        padding_free=True, max_length=args.row_length, gradient_checkpointing=False, use_liger_kernel=args.liger,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    rec = speed.Recorder(cuda)

    class InOrder(SFTTrainer):  # the rows in hfbridge's order: no shuffling
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(model=model, args=config, train_dataset=Dataset.from_list(records),
                      processing_class=tokenizer, callbacks=speed._hf_callbacks(rec),
                      peft_config=lora().peft_config() if system.mode == "lora" else None)
    collate = trainer.data_collator
    shapes = []

    def counting(batch):
        out = collate(batch)
        rec.micro_tokens.append(speed.count_labels(out))
        shapes.append(tuple(out["input_ids"].shape))
        return out

    trainer.data_collator = counting
    trainer.train()
    rec.losses = speed._hf_losses(trainer)
    return finish(rec, args, accumulate, trainer.model, tokens, rows, shapes[0])


def finish(rec, args, accumulate: int, model, tokens, rows, micro_shape) -> dict:
    """The child's result: the recorder's figures over the timed steps, and what the parent checks."""
    result = rec.result(argparse.Namespace(warmup=args.warmup, steps=args.steps, accumulate=accumulate))
    result.update(
        tokens_all=sum(rec.micro_tokens[: args.steps * accumulate]), micro_batches=args.steps * accumulate,
        micro_batch_shape=list(micro_shape), data_digest=data_digest(tokens, rows),
        mean_context=mean_context(tokens, rows), samples=sum(len(r) for r in rows),
        parameters=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""), liger=args.liger,
    )
    return result


RUNNERS = {"hfbridge": run_hfbridge, "trl": run_trl}


def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    system = SYSTEMS[args.runner]
    with tempfile.TemporaryDirectory(prefix="hfbridge-gpu-bench-") as scratch:
        args.scratch = scratch  # TRL's output_dir: nothing is saved there
        result = RUNNERS[system.kind](args, system)
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------- peak
def peak_flops(args, device_name: str) -> tuple[float, str]:
    """``(FLOP/s, source)``: the spec sheet's dense bf16 figure for a known GPU, else a measured GEMM."""
    for part, value in PEAK_BF16:
        if part in device_name:
            return value, f"{device_name}: {value / 1e12:.0f} TFLOP/s dense bf16 (spec sheet)"
    import torch

    if args.device == "cuda":
        n, dtype, what = 8192, torch.bfloat16, "bf16"
    else:
        n, dtype, what = 512, torch.float32, "float32 on the CPU"
    a = torch.randn(n, n, dtype=dtype, device=args.device)
    b = torch.randn(n, n, dtype=dtype, device=args.device)
    best = float("inf")
    for _ in range(12):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if args.device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    value = 2 * n**3 / best
    return value, (f"{device_name or 'this device'} is not in the spec-sheet table: {value / 1e12:.3g} TFLOP/s "
                   f"measured (best of 12 {what} GEMMs of {n}x{n}x{n}), not a spec-sheet figure")


# ----------------------------------------------------------------------------------------------------- report
def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def report(args, results: dict[str, dict], peak: float, peak_source: str) -> tuple[str, dict]:
    """The Markdown report and the derived figures (MFU, ratios, checks, projection)."""
    cuda = args.device == "cuda"
    shape = SHAPES[args.shape]
    ok = {name: r for name, r in results.items() if "error" not in r}
    any_r = next(iter(ok.values()), {})
    ctx = any_r.get("mean_context", 0.0)
    derived: dict = {"systems": {}}
    lines = []
    if args.dry_run:
        lines.append("**Dry run** (`--dry-run`): CPU, float32 (bfloat16 is for the GPU run), the tiny shape, a "
                     "few steps. It checks that the code runs end to end; its speeds and utilisation say nothing.")
        lines.append("")
    steps_timed = args.steps - args.warmup
    lines.append(
        f"Model: Llama architecture, random weights, shape `{args.shape}` ({shape['num_hidden_layers']} layers, "
        f"hidden {shape['hidden_size']}, {shape['num_attention_heads']} heads, {shape['num_key_value_heads']} kv "
        f"heads, intermediate {shape['intermediate_size']}, vocabulary {shape['vocab_size']}), "
        f"{_count(any_r.get('parameters', 0))} parameters, {any_r.get('dtype', '?')}, sdpa attention. "
        f"Device: {any_r.get('gpu', 'CPU') if cuda else 'CPU'}. Liger: {'on' if args.liger else 'off'}"
        f"{'' if args.liger or cuda else ' (its kernels need a CUDA GPU)'}.")
    lines.append(
        f"Data: {any_r.get('samples', '?')} samples of random tokens, log-normal lengths (median "
        f"{args.median_length}, sigma {args.length_sigma}, at most {args.row_length}), in "
        f"{args.steps * args.accumulate * args.rows_per_batch} rows of at most {args.row_length} tokens; "
        f"{args.rows_per_batch} rows per hfbridge micro-batch (TRL: 1 row, accumulating {args.rows_per_batch}x "
        f"more; -wide: as hfbridge), {args.steps} optimizer steps of which the last {steps_timed} are timed; "
        f"AdamW lr {args.lr}, cosine to 0, clipping 1.0. Peak: {peak_source}.")
    lines.append(speed.versions())
    lines.append("")
    mem_key, mem_name = ("cuda_max_alloc_mb", "CUDA max alloc MB") if cuda else ("peak_rss_mb", "peak RSS MB")
    header = ["system", "label tok/s", "MFU", mem_name, "first loss", "final loss", "label tokens (all steps)",
              "micro-batch shape", "speed / TRL fastest", "memory / TRL fastest"]
    lines += [_row(header), _row(["---"] * len(header))]
    for name, r in results.items():
        system = SYSTEMS[name]
        if "error" in r:
            lines.append(_row([name, f"n/a: {r['error']}"] + [""] * (len(header) - 2)))
            continue
        tps = r["tokens"] / r["seconds"]
        mfu = tps * flops_per_token(shape, system.mode, r["mean_context"]) / peak
        base = fastest_trl(ok, system.mode)
        speedup = tps / (base["tokens"] / base["seconds"]) if base else None
        mem = r[mem_key] / base[mem_key] if base else None
        derived["systems"][name] = {"label_tokens_per_s": tps, "mfu": mfu, "speed_vs_trl": speedup,
                                    "memory_vs_trl": mem}
        lines.append(_row([
            f"{name} ({system.note})", f"{tps:,.0f}", f"{mfu:.1%}", f"{r[mem_key]:,.0f}", f"{r['losses'][0]:.4f}",
            f"{r['loss']:.4f}", f"{r['tokens_all']:,}", "x".join(map(str, r["micro_batch_shape"])),
            f"{speedup:.2f}" if speedup else "", f"{mem:.2f}" if mem else "",
        ]))
    lines.append("")
    lines.append(
        f"label tok/s: trained tokens per second over the {steps_timed} timed optimizer steps; MFU: label tok/s x "
        f"model FLOPs per token / peak, FLOPs per token = 6 (full) or 4 (LoRA) x {_count(matmul_params(shape))} "
        f"matrix parameters + causal attention 6 x layers x hidden x {ctx:.0f} (sum(n^2)/sum(n) of the samples); "
        f"speed and memory / TRL fastest: over those of the fastest TRL layout measured in the same mode (>1: "
        f"faster, <1: smaller).")
    checks = checks_of(results)
    derived["checks"] = checks
    lines.append("Checks: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()) + ".")
    # The projection the peers publish: Llama-3.1-8B tokens/s per GPU, from the measured utilisation.
    lines.append("")
    big = matmul_params(LLAMA_8B)
    total = big + LLAMA_8B["vocab_size"] * LLAMA_8B["hidden_size"]  # + the untied input embedding
    lines.append(f"**Projection, not a measurement**: Llama-3.1-8B full fine-tuning ({_count(total)} parameters, "
                 f"{_count(big)} in matrix products) on this GPU, at the utilisation measured above for the 1B "
                 f"model and the same data (8B tokens/s = MFU x peak / (6 x {_count(big)} + 6 x "
                 f"{LLAMA_8B['num_hidden_layers']} x {LLAMA_8B['hidden_size']} x {ctx:.0f})); the 8B model itself "
                 f"(and the sharding its optimizer state needs) was not run.")
    header = ["system", "measured MFU (1B)", "projected Llama-3.1-8B label tok/s/GPU"]
    lines += ["", _row(header), _row(["---"] * 3)]
    derived["projection_8b"] = {}
    for name, d in derived["systems"].items():
        if SYSTEMS[name].mode != "full":
            continue
        projected = d["mfu"] * peak / flops_per_token(LLAMA_8B, "full", ctx)
        derived["projection_8b"][name] = projected
        shown = f"{projected:,.0f}" if projected >= 100 else f"{projected:.3g}"
        lines.append(_row([name, f"{d['mfu']:.1%}", shown]))
    lines.append("")
    lines += targets(args, derived)
    return "\n".join(lines) + "\n", derived


def fastest_trl(ok: dict[str, dict], mode: str) -> dict | None:
    """The result of the fastest TRL system of ``mode`` (label tokens per second), or ``None``."""
    runs = [r for name, r in ok.items() if SYSTEMS[name].kind == "trl" and SYSTEMS[name].mode == mode]
    return max(runs, key=lambda r: r["tokens"] / r["seconds"], default=None)


def checks_of(results: dict[str, dict]) -> dict[str, bool]:
    """Every system ran with a positive speed and finite losses, on the same data and the same label tokens."""
    ok = [r for r in results.values() if "error" not in r]
    return {
        "every system ran": len(ok) == len(results),
        "positive speeds and finite losses": all(
            r["tokens"] > 0 and r["seconds"] > 0 and all(math.isfinite(x) for x in r["losses"]) for r in ok),
        "same data in every process": len({r["data_digest"] for r in ok}) <= 1,
        "same label tokens (all steps and timed)": len({(r["tokens_all"], r["tokens"]) for r in ok}) <= 1,
    }


def targets(args, derived: dict) -> list[str]:
    full = derived["systems"].get("hfbridge-full")
    if args.dry_run or full is None:
        return [f"Targets (a GPU run of the 1B model): hfbridge full fine-tuning at >= {TARGET_MFU:.0%} MFU and "
                f">= {TARGET_SPEEDUP}x TRL's fastest; not judged on a dry run."]
    lines = [f"Target: hfbridge full fine-tuning MFU >= {TARGET_MFU:.0%}: {full['mfu']:.1%} "
             f"({'met' if full['mfu'] >= TARGET_MFU else 'NOT met'})."]
    for mode in ("full", "lora"):
        d = derived["systems"].get(f"hfbridge-{mode}", {})
        if d.get("speed_vs_trl"):
            met = "met" if d["speed_vs_trl"] >= TARGET_SPEEDUP else "NOT met"
            lines.append(f"Target: hfbridge {mode} >= {TARGET_SPEEDUP}x TRL's fastest: "
                         f"{d['speed_vs_trl']:.2f}x ({met}).")
    return lines


# ----------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shape, a few steps, every system: checks the code end to end")
    parser.add_argument("--systems", help=f"comma-separated, from {', '.join(SYSTEMS)} (default: "
                        f"{DEFAULT_SYSTEMS[0]}; "
                        f"dry run: {DEFAULT_SYSTEMS[1]})")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default: 1b; dry run: tiny)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 12; dry run 3)")
    parser.add_argument("--warmup", type=int, help="optimizer steps not timed (default 2; dry run 1)")
    parser.add_argument("--row-length", type=int, help="tokens per packed row (default 4096; dry run 96)")
    parser.add_argument("--rows-per-batch", type=int, default=None,
                        help="rows per hfbridge micro-batch (TRL: one row, this many times the accumulation; "
                             "default 8; dry run 2)")
    parser.add_argument("--accumulate", type=int, default=1, help="hfbridge's micro-batches per optimizer step")
    parser.add_argument("--median-length", type=int, help="median sample length (default 600; dry run 24)")
    parser.add_argument("--length-sigma", type=float, default=1.0, help="sigma of the log-normal sample lengths")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--liger", choices=["auto", "on", "off"], default="auto",
                        help="Liger's kernels in both systems (auto: on with a CUDA GPU and liger-kernel "
                             "installed)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default; "
                        "dry run: 1)")
    parser.add_argument("--json", help="write the results here (a new file)")
    parser.add_argument("--markdown", help="write the report here (a new file)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help=argparse.SUPPRESS)
    parser.add_argument("--runner", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, (gpu, dry) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, dry if args.dry_run else gpu)
    if args.systems is None:
        args.systems = DEFAULT_SYSTEMS[1 if args.dry_run else 0]
    if args.dry_run and not args.threads:
        args.threads = 1
    args.vocab = SHAPES[args.shape]["vocab_size"]
    return parser, args


def check_args(parser, args) -> None:
    """Everything that can be refused before a model is built."""
    from hfbridge.io import check_output_file

    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown or not names:
        parser.error(f"--systems: unknown {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(SYSTEMS)}")
    args.systems = ",".join(names)
    for key in ("steps", "row_length", "rows_per_batch", "accumulate", "median_length"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be at least 0 and below --steps ({args.steps}), got {args.warmup}")
    if args.length_sigma <= 0:
        parser.error(f"--length-sigma must be positive, got {args.length_sigma}")
    if args.median_length > args.row_length:
        parser.error(f"--median-length ({args.median_length}) must not exceed --row-length ({args.row_length})")
    for flag in ("json", "markdown"):
        path = getattr(args, flag)
        if path:
            try:
                check_output_file(path, flag=f"--{flag}")
            except OSError as e:
                parser.error(str(e))
    if args.json and args.markdown and Path(args.json).resolve() == Path(args.markdown).resolve():
        parser.error("--json and --markdown name the same file")


def resolve_device_and_liger(parser, args) -> None:
    import torch

    from hfbridge.models.liger import liger_installed

    cuda = torch.cuda.is_available()
    if args.dry_run or args.device == "cpu":
        args.device = "cpu"
    elif not cuda:
        parser.error("no CUDA GPU is visible: this benchmark needs one (bash bench/gpu.sh), "
                     "or run it with --dry-run")
    else:
        args.device = "cuda"
    usable = args.device == "cuda" and liger_installed()
    if args.liger == "on" and not usable:
        parser.error("--liger on: Liger's kernels need a CUDA GPU and the liger-kernel package "
                     f"({'no CUDA device' if args.device != 'cuda' else 'liger-kernel is not installed'})")
    args.liger = usable if args.liger == "auto" else args.liger == "on"


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    if args.runner:  # a child (the parent has checked the arguments): this command line, --device, --runner
        resolve_device_and_liger(parser, args)
        child(args)
        return 0
    check_args(parser, args)
    resolve_device_and_liger(parser, args)
    names = args.systems.split(",")
    # Each system in its own process, one after another (bench/speed.py's runner: this command line, then
    # --device and --runner).
    results = {name: speed.run_child(name, args, script=__file__, describe=describe) for name in names}
    device_name = next((r.get("gpu", "") for r in results.values() if "gpu" in r), "")
    peak, peak_source = peak_flops(args, device_name)
    text, derived = report(args, results, peak, peak_source)
    print(text, end="")
    payload = {"args": {k: v for k, v in vars(args).items() if k != "runner"}, "versions": speed.versions(),
               "peak_flops": peak, "peak_source": peak_source, "systems": {n: asdict(SYSTEMS[n]) for n in names},
               "results": results, "derived": derived, "report": text}
    from hfbridge.io import write_text_atomic

    if args.json:
        write_text_atomic(args.json, json.dumps(payload, indent=2) + "\n")
    if args.markdown:
        write_text_atomic(args.markdown, text)
    return 0 if all(derived["checks"].values()) else 1


def describe(r: dict) -> str:
    mem = r.get("cuda_max_alloc_mb")
    return (f"loss {r['losses'][0]:.4f} -> {r['loss']:.4f}, {r['tokens_all']} label tokens"
            + (f", {mem:,.0f} MB CUDA" if mem is not None else ""))


if __name__ == "__main__":
    sys.exit(main())
