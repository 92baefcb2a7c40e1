"""Training efficiency against this machine's own peak: model FLOPs utilisation (MFU) and where the rest goes.

    .venv/bin/python bench/mfu.py                      # embedded SmolLM2-135M: full fine-tuning and LoRA r16
    .venv/bin/python bench/mfu.py --quick              # smoke check: small GEMMs, 3 short steps per mode
    .venv/bin/python bench/mfu.py --modes full --variants full+threads1,full+batch16,full+eager,full+compile

Each training run is a child process (bench/speed.py's runner and its data and model setup: the same samples,
LoRA, optimizer and Lightning ``Trainer`` path as ``hfbridge finetune``), and measures in the same process, with
the training's thread count (``torch.get_num_threads``):

* the fp32 matmul peak: square GEMMs (2048, 3072, 4096), best of several, before and after training (the higher
  is the peak, so a machine that got busier during training lowers the MFU rather than raising it); the bf16 GEMM
  peak (AMX) for information;
* the GEMMs at the shapes the model really runs (micro-batch tokens x hidden x out, in the forward and in the two
  backward layouts, and the output head on the trained positions): their FLOP-weighted rate is the ceiling that
  training could reach if it did nothing but its matrix products;
* training throughput over the timed optimizer steps, then a ``torch.profiler`` profile of the following steps,
  grouped into GEMM, attention, norms/pointwise, optimizer and framework overhead (the remainder of the wall time),
  plus the time the collator would add inline.

Model FLOPs (what :func:`dense_flops` and :func:`attention_flops` count; docs/benchmarks.md has the formulas):
full fine-tuning ``6 * N_body * tokens + 6 * N_head * label_tokens + attention``, LoRA ``4 * N_body * tokens +
6 * N_lora * tokens + 4 * N_head * label_tokens + attention``, where ``N_body`` is every weight matrix of the
decoder layers, ``N_head`` the output head (hfbridge projects only the trained positions), and attention counts
the causal pairs of each packed sample, 12 FLOPs per pair and attention channel and layer (forward and backward).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  bench/speed.py: its child runner, recorder, data, model loading and timed fit are reused


@dataclass(frozen=True)
class Run:
    """One measured training configuration (a child process)."""

    mode: str  # full | lora
    threads: int = 0  # 0: torch's default
    batch_factor: int = 1  # micro-batch samples x this
    attn: str = "sdpa"
    compile: bool = False
    fused_adamw: bool = False  # torch's fused AdamW kernel (CPU too) instead of its per-parameter loop
    note: str = ""


RUNS = {
    "full": Run("full", note="full fine-tuning (hfbridge defaults: packing, loss without full logits, sdpa)"),
    "lora": Run("lora", note="LoRA r16 on every linear layer of the decoder"),
    "full+threads1": Run("full", threads=1, note="one intra-op thread"),
    "full+batch16": Run("full", batch_factor=2, note="twice the micro-batch (16 samples)"),
    "full+batch32": Run("full", batch_factor=4, note="four times the micro-batch (32 samples)"),
    "full+eager": Run("full", attn="eager", note="eager attention instead of sdpa"),
    "full+compile": Run("full", compile=True, note="torch.compile of the decoder layers"),
    "full+fused-adamw": Run("full", fused_adamw=True, note="AdamW(fused=True): one kernel over all parameters"),
    "lora+compile": Run("lora", compile=True, note="LoRA, torch.compile of the decoder layers"),
}

QUICK = dict(steps=1, warmup=1, profile_steps=1, batch_size=4, accumulate=1, gemm_sizes="256,512", gemm_repeats=2,
             gemm_seconds=0.02, heldout=4)


# ----------------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class ModelDims:
    """What the model FLOPs of a causal LM depend on."""

    body: int  # weights of the decoder's matrix products (every token goes through them)
    head: int  # the output head, vocabulary x hidden (with tied embeddings: the embedding matrix, once)
    lora: int  # adapter matrices (every token), 0 without an adapter
    embedding: int  # the input embedding (a lookup: no FLOPs; tied: the head)
    total: int  # every parameter, counted once
    layers: int
    attn_width: int  # attention heads x head size (the query width)
    tied: bool


def model_dims(model) -> ModelDims:
    """Count ``model``'s weight matrices by role (works on a plain Hugging Face model or a peft one)."""
    from torch import nn

    from hfbridge.models.peft_adapters import base_model

    base = base_model(model)
    head = base.get_output_embeddings()
    embedding = base.get_input_embeddings()
    body = lora = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if ".lora_" in name or name.startswith("lora_"):
            lora += module.weight.numel()
        else:
            body += module.weight.numel()
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tied = head.weight is embedding.weight
    return ModelDims(body=body, head=head.weight.numel(), lora=lora, embedding=embedding.weight.numel(),
                     total=sum(p.numel() for p in model.parameters()), layers=config.num_hidden_layers,
                     attn_width=heads * head_dim, tied=tied)


def dense_flops(dims: ModelDims, tokens: int, label_tokens: int, mode: str) -> float:
    """FLOPs of the weight matrices for one forward and backward: 2 per weight and token for the forward, 2 for
    the gradient of the activations, 2 for the weight's gradient where it is trained. The head runs on the trained
    positions only (``label_tokens``); LoRA trains the adapter, not the base weights nor the head."""
    if mode == "full":
        return 6.0 * dims.body * tokens + 6.0 * dims.head * label_tokens
    if mode == "lora":
        return 4.0 * dims.body * tokens + 6.0 * dims.lora * tokens + 4.0 * dims.head * label_tokens
    raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")


def attention_flops(lengths, layers: int, attn_width: int, causal: bool = True) -> float:
    """Attention FLOPs (scores and weighted values) of samples of these lengths, forward and backward: each
    attended (query, key) pair costs 2 FLOPs per channel for the scores and 2 for the values in the forward, twice
    that in the backward (12 in all). ``causal``: the pairs a causal mask keeps, ``L (L + 1) / 2`` per sample;
    otherwise ``L * L`` (the convention of PaLM, nanoGPT and torchtitan, ``12 * layers * d * L`` per token)."""
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
    return 12.0 * layers * attn_width * pairs


def convention_flops(dims: ModelDims, lengths, mode: str, exclude_embedding: bool = False) -> float:
    """The peers' count of the same step: ``6 N`` per token (PaLM, nanoGPT: ``N`` every parameter, the tied
    head once; torchtitan: ``exclude_embedding``, every parameter but the embedding's), the head on every token,
    attention without causal halving; for LoRA ``4 N + 6 N_lora``."""
    n = dims.total - dims.lora - (dims.embedding if exclude_embedding else 0)
    tokens = sum(lengths)
    per_token = 6.0 * n if mode == "full" else 4.0 * n + 6.0 * dims.lora
    return per_token * tokens + attention_flops(lengths, dims.layers, dims.attn_width, causal=False)


# ----------------------------------------------------------------------------------------------------- GEMMs
def gemm_rate(m: int, k: int, n: int, layout: str = "nn", dtype=None, seconds: float = 0.2, repeats: int = 3) -> float:
    """Best GFLOP/s of ``C[m, n] = A[m, k] @ B[k, n]`` over ``repeats`` rounds of at least ``seconds`` each.

    ``layout``: ``nn`` both operands contiguous (a backward's activation gradient ``dY @ W``), ``nt`` B a
    transposed weight (``F.linear``'s ``x @ W.T``), ``tn`` A a transposed gradient (a weight gradient ``dY.T @ X``)."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn((k, m) if layout == "tn" else (m, k), generator=g).to(dtype)
    b = torch.randn((n, k) if layout == "nt" else (k, n), generator=g).to(dtype)
    a = a.t() if layout == "tn" else a
    b = b.t() if layout == "nt" else b
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm up (allocations, kernel choice)
    best = 0.0
    for _ in range(repeats):
        calls, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
        best = max(best, 2.0 * m * k * n * calls / elapsed / 1e9)
    return best


def square_peaks(sizes, repeats: int, seconds: float, dtype=None) -> dict[str, float]:
    """GFLOP/s of square GEMMs of each size (the peak is the best of them)."""
    return {str(s): round(gemm_rate(s, s, s, "nn", dtype, seconds, repeats), 2) for s in sizes}


def model_gemms(model, dims: ModelDims, rows: int, label_rows: int, mode: str, chunk: int = 512) -> list[dict]:
    """The matrix products of one micro-batch of ``rows`` tokens (``label_rows`` trained), one entry per distinct
    shape and layout, with how many times each runs: forward ``x @ W.T``, activation gradient ``dY @ W``, and
    (trained weights) weight gradient ``dY.T @ X``; the head on the trained positions in chunks of ``chunk``."""
    from torch import nn

    from hfbridge.models.peft_adapters import base_model

    head = base_model(model).get_output_embeddings()
    shapes: dict[tuple, int] = {}

    def add(k_in: int, k_out: int, m: int, trained: bool, times: int = 1):
        for key in [(m, k_in, k_out, "nt", "forward"), (m, k_out, k_in, "nn", "activation grad")] + (
                [(k_out, m, k_in, "tn", "weight grad")] if trained else []):
            shapes[key] = shapes.get(key, 0) + times

    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        is_lora = ".lora_" in name or name.startswith("lora_")
        add(module.in_features, module.out_features, rows, trained=is_lora or mode == "full")
    full_chunks, rest = divmod(label_rows, chunk)
    if full_chunks:
        add(head.in_features, head.out_features, chunk, trained=mode == "full", times=full_chunks)
    if rest:
        add(head.in_features, head.out_features, rest, trained=mode == "full")
    return [{"m": m, "k": k, "n": n, "layout": layout, "role": role, "calls": calls}
            for (m, k, n, layout, role), calls in shapes.items()]


def measure_gemms(gemms: list[dict], seconds: float, repeats: int) -> dict:
    """Each shape's GFLOP/s, and the FLOP-weighted rate of them all (total FLOPs over the summed times)."""
    flops = time_needed = 0.0
    for g in gemms:
        g["gflops"] = round(gemm_rate(g["m"], g["k"], g["n"], g["layout"], None, seconds, repeats), 2)
        f = 2.0 * g["m"] * g["k"] * g["n"] * g["calls"]
        flops += f
        time_needed += f / (g["gflops"] * 1e9)
    return {"shapes": gemms, "ceiling_gflops": flops / time_needed / 1e9, "gemm_flops_per_micro_batch": flops}


# ----------------------------------------------------------------------------------------------------- profile
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}
CATEGORIES = ("GEMM", "attention", "norms/pointwise", "optimizer", "framework")
PHASES = {"mfu.forward": "model", "mfu.backward": "model", "mfu.clip": "optimizer",
          "Optimizer.step": "optimizer", "Optimizer.zero_grad": "optimizer"}


def _phase(event) -> str | None:
    """The innermost marked range around ``event``: the model (forward, backward) or the optimizer step."""
    e = event.cpu_parent
    while e is not None:
        for prefix, phase in PHASES.items():
            if e.name.startswith(prefix):
                return phase
        e = e.cpu_parent
    return None


def _kind(event) -> str | None:
    """GEMM or attention when the event is, or runs inside, such an op."""
    e = event
    while e is not None:
        if e.name in GEMM_OPS:
            return "GEMM"
        if "scaled_dot_product" in e.name.lower():
            return "attention"
        e = e.cpu_parent
    return None


def group_profile(events, wall_us: float) -> tuple[dict[str, float], list[tuple[str, str, float]]]:
    """Self CPU time (µs) of every op, grouped: GEMM and attention wherever they run, the rest by phase (the
    model's other ops are norms/pointwise, the optimizer step's are optimizer); framework is the wall time left.
    Also the largest ops outside GEMM (category, name, µs)."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    per_op: dict[tuple[str, str], float] = {}
    for e in events:
        if not e.name.startswith("aten::"):
            continue  # ranges, autograd's engine and Python: the framework's remainder
        phase = _phase(e)
        category = _kind(e) or {"model": "norms/pointwise", "optimizer": "optimizer"}.get(phase)
        if category is None:
            continue  # outside the model and the optimizer: part of the framework's remainder
        totals[category] += e.self_cpu_time_total
        per_op[(category, e.name)] = per_op.get((category, e.name), 0.0) + e.self_cpu_time_total
    totals["framework"] = max(wall_us - sum(totals[c] for c in CATEGORIES[:-1]), 0.0)
    top = sorted(((c, n, t) for (c, n), t in per_op.items() if c != "GEMM"), key=lambda x: -x[2])[:8]
    return totals, top


class _Marked:
    """Record-function ranges around the module's forward+loss, backward and gradient clipping (so the profile
    knows which ops are the model's and which the optimizer's), set on the class in this child process only."""

    def __init__(self, cls):
        self.cls, self.saved = cls, {}

    def __enter__(self):
        import torch

        def wrap(name, fn):
            @functools.wraps(fn)
            def marked(*a, **k):
                with torch.profiler.record_function(name):
                    return fn(*a, **k)
            return marked

        for attr, name in (("training_step", "mfu.forward"), ("backward", "mfu.backward"),
                           ("configure_gradient_clipping", "mfu.clip")):
            self.saved[attr] = self.cls.__dict__.get(attr)
            setattr(self.cls, attr, wrap(name, getattr(self.cls, attr)))
        return self

    def __exit__(self, *exc):
        for attr, fn in self.saved.items():
            if fn is None:
                delattr(self.cls, attr)
            else:
                setattr(self.cls, attr, fn)


def _step_callback(args, first_profiled: int, out: dict):
    """A Lightning callback: each optimizer step's end (wall, CPU), and a ``torch.profiler`` profile of the
    micro-batches from optimizer step ``first_profiled`` on."""
    import lightning.pytorch as pl
    import torch

    class StepClock(pl.Callback):
        def __init__(self):
            self.prof = None
            out["ends"] = []

        def on_train_start(self, trainer, pl_module):
            out["start"] = (time.perf_counter(), time.process_time())

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == first_profiled * args.accumulate and args.profile_steps:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()
                out["profile_start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % args.accumulate:
                return
            out["ends"].append((time.perf_counter(), time.process_time()))
            if self.prof is not None and len(out["ends"]) == first_profiled + args.profile_steps:
                out["profile_wall"] = time.perf_counter() - out["profile_start"]
                self.prof.__exit__(None, None, None)
                out["events"] = self.prof.events()
                self.prof = None

    return StepClock()


@contextlib.contextmanager
def _extra_callbacks(*callbacks):
    """Lightning ``Trainer``s built inside get these callbacks too (bench/speed.py's run builds its own)."""
    import lightning.pytorch as pl

    plain = pl.Trainer

    class Trainer(plain):
        def __init__(self, *a, callbacks=None, **k):
            super().__init__(*a, callbacks=[*(callbacks or []), *callbacks_], **k)

    callbacks_ = list(callbacks)
    pl.Trainer = Trainer
    try:
        yield
    finally:
        pl.Trainer = plain


# ----------------------------------------------------------------------------------------------------- child
def _micro_batches(args, tokenizer, one_row: bool):
    """The micro-batches bench/speed.py's hfbridge run trains on, in order: their samples and packed rows (one row
    per micro-batch under sdpa, which hfbridge switches to per-sample attention, as bench/speed.py lays it out)."""
    from hfbridge.data.packing import PackedCollator

    samples = speed.build_samples(tokenizer, args.samples, args.max_length)
    samples = samples[: args.steps_total * args.accumulate * args.batch_size]
    collate = PackedCollator(tokenizer.pad_token_id, args.max_length, one_row=one_row)
    out = []
    for i in range(0, len(samples), args.batch_size):
        group = samples[i : i + args.batch_size]
        t0 = time.perf_counter()
        batch = collate(group)
        seconds = time.perf_counter() - t0
        out.append({"lengths": [len(s.input_ids) for s in group], "labels": speed.count_labels(batch),
                    "rows": int(batch["input_ids"].numel()), "row_width": int(batch["input_ids"].shape[1]),
                    "n_rows": int(batch["input_ids"].shape[0]), "collate_s": seconds})
    return out


def child(args) -> None:
    import torch

    run = RUNS[args.runner]
    torch.set_num_threads(run.threads or args.threads or torch.get_num_threads())
    threads = torch.get_num_threads()
    args.mode = run.mode
    args.batch_size *= run.batch_factor
    args.steps_total = args.warmup + args.steps + args.profile_steps
    args.samples = max(args.samples, args.steps_total * args.accumulate * args.batch_size)
    sizes = [int(s) for s in args.gemm_sizes.split(",")]

    peak_before = square_peaks(sizes, args.gemm_repeats, args.gemm_seconds)
    bf16 = square_peaks(sizes[-1:], args.gemm_repeats, args.gemm_seconds, torch.bfloat16)

    from hfbridge.models.loading import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    batches = _micro_batches(args, tokenizer, one_row=run.attn == "sdpa")
    plain_load, seen = speed.load_model, {}

    def load_model(a, dtype):  # the run's model as bench/speed.py loads it, with this run's attention
        model = plain_load(a, dtype)
        if run.attn != "sdpa":
            speed_base = model.get_base_model() if hasattr(model, "get_base_model") else model
            speed_base.set_attn_implementation(run.attn)
        seen["model"] = model
        return model

    from hfbridge.models.causal_lm import HFAutoModelForCausalLM

    clock: dict = {}
    system = speed.SYSTEMS["hfbridge+compile" if run.compile else "hfbridge"]
    speed.load_model = load_model
    plain_adamw = torch.optim.AdamW
    if run.fused_adamw:  # what hfbridge.optim.build_optimizer would pass
        torch.optim.AdamW = functools.partial(plain_adamw, fused=True)
    run_args = argparse.Namespace(**{**vars(args), "steps": args.steps_total})
    try:
        with _Marked(HFAutoModelForCausalLM), _extra_callbacks(_step_callback(args, args.warmup + args.steps, clock)):
            trained = speed.run_hfbridge(run_args, system)
    finally:
        speed.load_model, torch.optim.AdamW = plain_load, plain_adamw
    peak_after = square_peaks(sizes, args.gemm_repeats, args.gemm_seconds)

    model = seen["model"]
    dims = model_dims(model)
    timed = batches[args.warmup * args.accumulate : (args.warmup + args.steps) * args.accumulate]
    lengths = [n for b in timed for n in b["lengths"]]
    labels = sum(b["labels"] for b in timed)
    flops = dense_flops(dims, sum(lengths), labels, run.mode) + attention_flops(lengths, dims.layers, dims.attn_width)
    ends = [clock["start"]] + clock["ends"]
    (w0, c0), (w1, c1) = ends[args.warmup], ends[args.warmup + args.steps]
    rows = round(statistics.mean(b["rows"] for b in timed))
    label_rows = round(statistics.mean(b["labels"] for b in timed))
    gemms = measure_gemms(model_gemms(model, dims, rows, label_rows, run.mode), args.gemm_seconds, args.gemm_repeats)

    profile: dict = {}
    if clock.get("events") is not None:
        wall = clock["profile_wall"]
        totals, top = group_profile(clock["events"], wall * 1e6)
        profiled = batches[(args.warmup + args.steps) * args.accumulate :]
        per_step = 1e3 / args.profile_steps
        profile = {"step_ms": wall * per_step, "ms": {c: t / 1e3 * per_step / 1e3 for c, t in totals.items()},
                   "collate_ms": sum(b["collate_s"] for b in profiled) * per_step,
                   "top": [(c, n, t / 1e3 * per_step / 1e3) for c, n, t in top]}
    result = {
        "run": args.runner, "mode": run.mode, "threads": threads, "batch_size": args.batch_size,
        "peak_before": peak_before, "peak_after": peak_after, "bf16": bf16, "dims": asdict(dims),
        "tokens": labels, "all_tokens": sum(lengths), "seconds": w1 - w0, "cpu_seconds": c1 - c0,
        "flops": flops, "palm_flops": convention_flops(dims, lengths, run.mode),
        "torchtitan_flops": convention_flops(dims, lengths, run.mode, exclude_embedding=True),
        "attention_flops": attention_flops(lengths, dims.layers, dims.attn_width),
        "padded_tokens": sum(b["rows"] for b in timed), "row_width": max(b["row_width"] for b in timed),
        "attention_computed": (  # per sample under per-sample attention; else each padded row in full
            attention_flops(lengths, dims.layers, dims.attn_width, causal=False) if run.attn == "sdpa" else
            12.0 * dims.layers * dims.attn_width * sum(b["n_rows"] * b["row_width"] ** 2 for b in timed)),
        "gemm": gemms, "profile": profile, "peak_rss_mb": trained["peak_rss_mb"], "loss": trained["loss"],
        "losses": trained["losses"],
    }
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------- report
def peak_gflops(r: dict) -> float:
    """The machine's fp32 peak for this run: the best square GEMM, before or after training."""
    return max([*r["peak_before"].values(), *r["peak_after"].values()])


def report(args, results: dict[str, dict]) -> list[str]:
    """The results as Markdown lines."""
    ok = {k: r for k, r in results.items() if "error" not in r}
    lines = [f"model={args.model} steps: {args.warmup} warmup, {args.steps} timed, {args.profile_steps} profiled; "
             f"micro-batch {args.batch_size} samples x accumulate {args.accumulate}, max_length {args.max_length}",
             speed.versions(), "", "fp32 square GEMM GFLOP/s (before / after training), bf16 for information:", "",
             "| run | threads | " + " | ".join(f"fp32 n={s}" for s in args.gemm_sizes.split(",")) + " | bf16 | peak |",
             "| --- | ---: | " + " | ".join("---:" for _ in args.gemm_sizes.split(",")) + " | ---: | ---: |"]
    for name, r in ok.items():
        cells = [f"{r['peak_before'][s]:.0f} / {r['peak_after'][s]:.0f}" for s in r["peak_before"]]
        lines.append(f"| {name} | {r['threads']} | " + " | ".join(cells)
                     + f" | {max(r['bf16'].values()):.0f} | {peak_gflops(r):.0f} |")
    lines += ["", "Training (MFU: model FLOP/s over the run's fp32 peak; GEMM ceiling: the model's matrix products "
              "at their measured rates, as if nothing else ran):", "",
              "| run | tokens/s | label tok/s | model GFLOP/s | MFU | MFU, PaLM/nanoGPT count | MFU, torchtitan count "
              "| GEMM ceiling | padding | final loss |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | n/a: {r['error']} |" + " |" * 9)
            continue
        peak, s = peak_gflops(r), r["seconds"]
        achieved = r["flops"] / s / 1e9
        lines.append(
            f"| {name} | {r['all_tokens'] / s:.1f} | {r['tokens'] / s:.1f} | {achieved:.1f} | **{achieved / peak:.1%}** "
            f"| {r['palm_flops'] / s / 1e9 / peak:.1%} | {r['torchtitan_flops'] / s / 1e9 / peak:.1%} "
            f"| {r['gemm']['ceiling_gflops'] / peak:.1%} | {r['padded_tokens'] / r['all_tokens'] - 1:.1%} "
            f"| {r['loss']:.4f} |")
    profiled = {k: r for k, r in ok.items() if r["profile"]}
    if profiled:
        lines += ["", "Where a step's time goes (torch.profiler, % of the profiled steps' wall time):", "",
                  "| category | " + " | ".join(profiled) + " |", "| --- |" + " ---: |" * len(profiled)]
        for c in CATEGORIES:
            lines.append(f"| {c} | " + " | ".join(
                f"{r['profile']['ms'][c] / r['profile']['step_ms']:.1%} ({r['profile']['ms'][c]:.0f} ms)"
                for r in profiled.values()) + " |")
        lines.append("| data/collate (inline in `hfbridge finetune`; collated beforehand here) | " + " | ".join(
            f"+{r['profile']['collate_ms'] / r['profile']['step_ms']:.1%} ({r['profile']['collate_ms']:.0f} ms)"
            for r in profiled.values()) + " |")
        lines.append("| step wall time | " + " | ".join(f"{r['profile']['step_ms']:.0f} ms"
                                                      for r in profiled.values()) + " |")
        for name, r in profiled.items():
            gemm_rate_ = gemm_in_training(r)
            lines.append(f"\n{name}: GEMMs in training ran at {gemm_rate_:.1f} GFLOP/s "
                         f"({gemm_rate_ / peak_gflops(r):.0%} of peak); largest ops outside GEMM (ms per step): "
                         + ", ".join(f"{n} [{c}] {t:.0f}" for c, n, t in r["profile"]["top"]))
    return lines


def gemm_in_training(r: dict) -> float:
    """GFLOP/s of the model's matrix products inside the profiled training steps (their FLOPs per step over
    the profile's GEMM time)."""
    accumulate = r.get("accumulate", 1)
    flops = r["gemm"]["gemm_flops_per_micro_batch"] * accumulate
    return flops / (r["profile"]["ms"]["GEMM"] / 1e3) / 1e9 if r["profile"]["ms"]["GEMM"] else 0.0


def describe(r: dict) -> str:
    peak = peak_gflops(r)
    return f"{r['all_tokens'] / r['seconds']:.1f} tokens/s, MFU {r['flops'] / r['seconds'] / 1e9 / peak:.1%} of " \
           f"{peak:.0f} GFLOP/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="an alias, or a local model folder")
    parser.add_argument("--modes", default="full,lora", help=f"comma-separated runs, from {', '.join(RUNS)}")
    parser.add_argument("--variants", default="", help="more runs after the modes (same choices)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps before the timed ones")
    parser.add_argument("--profile-steps", type=int, default=1, help="profiled optimizer steps after the timed ones")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per micro-batch")
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--samples", type=int, default=256, help="samples generated (the first ones are used)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--heldout", type=int, default=4, help="held-out samples scored after training")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--gemm-sizes", default="2048,3072,4096", help="square GEMM sizes for the peak")
    parser.add_argument("--gemm-repeats", type=int, default=4, help="rounds per GEMM (the best counts)")
    parser.add_argument("--gemm-seconds", type=float, default=0.3, help="minimum seconds per round")
    parser.add_argument("--quick", action="store_true", help="a smoke check: " + ", ".join(
        f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--json", help="also write every run's results here (a new file)")
    parser.add_argument("--device", choices=["cpu"], default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--runner", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default="/tmp/hfbridge-mfu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model_config = None
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.runner:
        child(args)
        return
    names = [n.strip() for n in f"{args.modes},{args.variants}".split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs: {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    if args.steps < 1 or args.warmup < 1 or args.profile_steps < 0:
        parser.error("--steps and --warmup must be at least 1, --profile-steps at least 0")
    if args.json:
        from hfbridge.io import check_output_file

        try:
            check_output_file(args.json, "--json")
        except (OSError, ValueError) as e:
            parser.error(str(e))
    results = {}
    for name in names:
        results[name] = speed.run_child(name, args, script=__file__, describe=describe)
        if "error" not in results[name]:
            results[name]["accumulate"] = args.accumulate
    lines = report(args, results)
    print("\n".join(lines))
    if args.json:
        from hfbridge.io import write_text_atomic

        write_text_atomic(args.json, json.dumps({"args": vars(args), "runs": results}, indent=2))


if __name__ == "__main__":
    main()
