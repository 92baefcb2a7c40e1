"""The longest sequence that trains within a fixed per-rank memory, at cp=1 and cp=2 (context parallelism).

    python bench/cp_memory.py search [--cap-mb 1500] [--model DIR] [--cps 1,2] [--step 512]
    python bench/cp_memory.py compare [--lengths 8192,16384] [--sample-length 1024] [--cp 2]

For each ``cp`` it binary-searches the sequence length (a multiple of ``--step``) of one training step (batch of one
row, forward, backward, AdamW step, through ``HFAutoModelForCausalLM`` on a ``(1, 1, 1, 1, cp)`` mesh over ``cp``
CPU processes, gloo): a length fits when the **peak resident memory (ru_maxrss) of every rank** stays within
``--cap-mb``. Each probe is a fresh ``torchrun`` (the peak is a high-water mark of the process), run as

    torchrun --nproc-per-node CP bench/cp_memory.py probe MODEL_DIR CP LENGTH OUT.json

The model (``--model``, default: built once into a temporary folder) is a small Llama (hidden 256, 4 layers, 8 heads,
4 key-value heads, the test tokenizer's vocabulary), so activations, not weights, dominate. The memory counted is
the whole process's: Python and torch (about 400 MB), the model, and the step. ``compare`` runs the same lengths
as one sequence per row and as a packed row (samples of ``--sample-length`` tokens, positions restarting), whose
attention is also computed block by block, per sample.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(path: Path) -> Path:
    from hfbridge.testing import build_tiny_causal_lm, build_tiny_tokenizer

    return build_tiny_causal_lm(path, "llama", tokenizer=build_tiny_tokenizer(), hidden_size=256,
                                intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                                num_key_value_heads=4, max_position_embeddings=1 << 17)


def probe(model_dir: str, cp: str, length: str, out: str, sample_length: str = "0") -> None:
    """One training step on one row of ``length`` tokens with the sequence split over ``cp`` ranks (under torchrun);
    with ``sample_length`` > 0 the row is packed: samples of that many tokens (positions restart)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(cp)))
    from hfbridge import HFAutoModelForCausalLM
    from hfbridge.parallel import ParallelConfig, build_device_mesh

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    config = ParallelConfig(sharding_axis_dims=(1, 1, 1, 1, int(cp)))
    mesh = build_device_mesh(config)
    module = HFAutoModelForCausalLM(model_name=model_dir, device_mesh=mesh, parallel=config)
    module.configure_model()
    after_load = peak_mb()
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-4)
    n = int(length)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(module.tokenizer), (1, n + 1), generator=generator)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    if int(sample_length) > 0:
        batch["position_ids"] = (torch.arange(n) % int(sample_length))[None]
    start = time.perf_counter()
    loss, tokens = module._loss(batch)
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    peaks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(peaks, {"rank": rank, "peak_mb": peak_mb(), "after_load_mb": after_load})
    if rank == 0:
        Path(out).write_text(json.dumps({"cp": int(cp), "length": n, "loss": float(loss), "tokens": tokens,
                                         "seconds": seconds, "ranks": peaks}))
    torch.distributed.destroy_process_group()


def run_probe(model_dir: Path, cp: int, length: int, work: Path, sample_length: int = 0) -> dict | None:
    """Peak per-rank memory of one step, or ``None`` when it failed (e.g. killed for memory)."""
    out = work / f"cp{cp}-{length}-{sample_length}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cp), "--standalone", __file__,
           "probe", str(model_dir), str(cp), str(length), str(out), str(sample_length)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not out.exists():
        print(f"  cp={cp} length={length}: failed (rc {result.returncode}) {result.stderr[-300:]}", flush=True)
        return None
    data = json.loads(out.read_text())
    data["max_peak_mb"] = max(r["peak_mb"] for r in data["ranks"])
    print(f"  cp={cp} length={length}: peak per rank {[round(r['peak_mb']) for r in data['ranks']]} MB "
          f"(after load {[round(r['after_load_mb']) for r in data['ranks']]}), step {data['seconds']:.1f} s",
          flush=True)
    return data


def longest(model_dir: Path, cp: int, cap_mb: float, step: int, work: Path) -> tuple[int, dict | None, int]:
    """The longest multiple of ``step`` whose peak fits ``cap_mb`` (doubling, then bisection), the probe that
    fitted, and the number of probes."""
    fits: dict[int, dict | None] = {}

    def ok(length: int) -> bool:
        if length not in fits:
            data = run_probe(model_dir, cp, length, work)
            fits[length] = data if data is not None and data["max_peak_mb"] <= cap_mb else None
        return fits[length] is not None

    lo, hi = 0, step
    while ok(hi):
        lo, hi = hi, hi * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, fits.get(lo), len(fits)


def search(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="cp-memory-"))
    model_dir = Path(args.model) if args.model else build(work / "model")
    print(f"model {model_dir}, cap {args.cap_mb} MB peak RSS per rank, lengths in steps of {args.step}", flush=True)
    rows = []
    for cp in (int(c) for c in args.cps.split(",")):
        length, data, probes = longest(model_dir, cp, args.cap_mb, args.step, work)
        rows.append((cp, length, data, probes))
    print("\n| cp | processes | longest sequence within the cap | peak RSS per rank at it (MB) | step time (s) | probes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for cp, length, data, probes in rows:
        peak = "-" if data is None else ", ".join(str(round(r["peak_mb"])) for r in data["ranks"])
        seconds = "-" if data is None else f"{data['seconds']:.1f}"
        print(f"| {cp} | {cp} | {length} | {peak} | {seconds} | {probes} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search")
    s.add_argument("--cap-mb", type=float, default=1500.0)
    s.add_argument("--model", default=None)
    s.add_argument("--cps", default="1,2")
    s.add_argument("--step", type=int, default=512)
    p = sub.add_parser("probe")
    p.add_argument("rest", nargs="+", help="MODEL_DIR CP LENGTH OUT [SAMPLE_LENGTH]")
    c = sub.add_parser("compare", help="cp=2 peaks per rank at given lengths: rows of one sequence against packed rows")
    c.add_argument("--lengths", default="8192,16384")
    c.add_argument("--sample-length", type=int, default=1024)
    c.add_argument("--cp", type=int, default=2)
    c.add_argument("--model", default=None)
    args = parser.parse_args()
    if args.command == "probe":
        probe(*args.rest)
    elif args.command == "compare":
        compare(args)
    else:
        search(args)


def compare(args) -> None:
    """The same lengths as one sequence per row and packed (positions restarting every ``--sample-length``)."""
    work = Path(tempfile.mkdtemp(prefix="cp-memory-"))
    model_dir = Path(args.model) if args.model else build(work / "model")
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        for sample_length in (0, args.sample_length):
            data = run_probe(model_dir, args.cp, length, work, sample_length)
            rows.append((length, sample_length, data))
    print("\n| cp | sequence length | row | peak RSS per rank (MB) | step time (s) |")
    print("| --- | --- | --- | --- | --- |")
    for length, sample_length, data in rows:
        kind = f"packed, samples of {sample_length}" if sample_length else "one sequence"
        peak = "-" if data is None else ", ".join(str(round(r["peak_mb"])) for r in data["ranks"])
        seconds = "-" if data is None else f"{data['seconds']:.1f}"
        print(f"| {args.cp} | {length} | {kind} | {peak} | {seconds} |")


if __name__ == "__main__":
    main()
