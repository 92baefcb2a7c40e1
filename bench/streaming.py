"""Streaming training data at scale: peak memory and time to the first batch do not grow with the file.

Writes JSONL files of N short prompt/completion records (default 100,000 and 2,000,000) and, for each, in a
process of its own, runs the streaming pipeline training uses (``hfbridge.data.streaming``: the lazy reader,
``tokenize_record``, the packed collator, ``StepTokenCounter``; the tokenizer of ``hfbridge.testing``) over the whole
file, reporting the time to the first batch, the time for the whole pass and the process's peak RSS. Then one real
``hfbridge finetune --streaming --max-steps 1`` of a tiny random model on the largest file, reporting the time from
the process's start to its first optimizer step and its peak RSS. The table ends with the ratio of the largest
file's peak RSS to the smallest's.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/streaming.py                       # 100k and 2M records
    HF_HUB_OFFLINE=1 .venv/bin/python bench/streaming.py --sizes 20000 100000  # quicker
    HF_HUB_OFFLINE=1 .venv/bin/python bench/streaming.py --pass-records 100000  # each file's first 100k records
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_records(path: Path, n: int) -> Path:
    """``n`` short prompt/completion records, written line by line (the writer holds none of them)."""
    months = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
              "November", "December")
    with path.open("w") as f:
        for i in range(n):
            m, d, y = i % 12, i % 28 + 1, 1950 + i % 70
            f.write(json.dumps({"prompt": f"Normalise the date: {months[m]} {d}, {y}\nISO:",
                                "completion": f" {y}-{m + 1:02d}-{d:02d}"}) + "\n")
    return path


def pipeline_child(path: str, batch_size: int, max_length: int, limit: int | None) -> None:
    """One pass of the streaming pipeline over ``path`` (its first ``limit`` records); prints a JSON line with the
    timings."""
    t0 = time.perf_counter()
    from hfbridge.data.streaming import StreamingDataModule, open_stream
    from hfbridge.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    t_ready = time.perf_counter()
    source = open_stream(path)
    datamodule = StreamingDataModule(tokenizer, source, max_length=max_length, batch_size=batch_size, packing=True)
    batches = iter(datamodule.train_dataloader())
    first = next(batches)
    t_first = time.perf_counter()
    n_batches, tokens = 1, int(first["num_label_tokens"])
    for batch in batches:
        if limit and n_batches * batch_size >= limit:
            break
        n_batches += 1
        tokens += int((batch["labels"] != -100).sum())
    t_end = time.perf_counter()
    print(json.dumps({"setup_s": t_ready - t0, "first_batch_s": t_first - t_ready, "pass_s": t_end - t_ready,
                      "batches": n_batches, "samples": datamodule.batches.samples, "label_tokens": tokens}))


FINETUNE = """
import sys, time, json
t0 = time.perf_counter()
from hfbridge.models.causal_lm import HFAutoModelForCausalLM
original = HFAutoModelForCausalLM.optimizer_step
def optimizer_step(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    if not hasattr(sys, "_first_step"):
        sys._first_step = time.perf_counter() - t0
        print("FIRST_STEP " + json.dumps(sys._first_step), flush=True)
    return out
HFAutoModelForCausalLM.optimizer_step = optimizer_step
from hfbridge import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def run_child(argv: list[str]) -> tuple[str, float, float]:
    """Run ``argv``; its stdout, wall time and peak RSS in MiB (from ``wait4``: this child alone)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed ({proc.returncode}):\n{out[-3000:]}")
    return out, time.perf_counter() - t0, usage.ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 2_000_000])
    parser.add_argument("--workdir", help="where the files are written (default: a temporary folder, removed)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--pass-records", type=int, default=None,
                        help="stream only this many records of each file (default: the whole file)")
    parser.add_argument("--no-finetune", action="store_true", help="skip the real finetune run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return pipeline_child(args.child, args.batch_size, args.max_length, args.pass_records)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        rows = []
        for n in sorted(args.sizes):
            t0 = time.perf_counter()
            path = write_records(work / f"records-{n}.jsonl", n)
            print(f"wrote {n} records ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f}s",
                  flush=True)
            out, wall, rss = run_child([sys.executable, __file__, "--child", str(path), "--batch-size",
                                        str(args.batch_size), "--max-length", str(args.max_length),
                                        *(["--pass-records", str(args.pass_records)] if args.pass_records else [])])
            result = json.loads(out.strip().splitlines()[-1])
            rows.append((n, result, wall, rss, path))
            print(f"  pipeline: {json.dumps(result)}, peak RSS {rss:.0f} MiB", flush=True)
        finetune = None
        if not args.no_finetune:
            from hfbridge.testing import build_tiny_causal_lm

            model = build_tiny_causal_lm(work / "tiny")
            n, path = rows[-1][0], rows[-1][4]
            out, wall, rss = run_child([sys.executable, "-c", textwrap.dedent(FINETUNE), "finetune", "--streaming",
                                        "--model", str(model), "--data", str(path), "--max-steps", "1",
                                        "--batch-size", str(args.batch_size), "--output", str(work / "run"),
                                        "--no-progress-bar", "--full"])
            first = next(float(line.split()[1]) for line in out.splitlines() if line.startswith("FIRST_STEP "))
            finetune = (n, first, wall, rss)

    import tokenizers
    import torch
    import transformers

    print()
    print(f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), python "
          f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"tokenizers {tokenizers.__version__}; batch size {args.batch_size}, max length {args.max_length}, packed; "
          f"records streamed per file: {args.pass_records or 'all'}")
    print()
    print("| records in the file | time to first batch | pass | samples/s | peak RSS |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n, r, _wall, rss, _ in rows:
        print(f"| {n:,} | {r['first_batch_s']:.2f} s | {r['samples']:,} samples in {r['pass_s']:.0f} s | "
              f"{r['samples'] / r['pass_s']:,.0f} | {rss:.0f} MiB |")
    if finetune:
        n, first, wall, rss = finetune
        print(f"| {n:,}: `hfbridge finetune --streaming --max-steps 1` (tiny model) | first optimizer step "
              f"{first:.1f} s after start | whole run {wall:.0f} s | | {rss:.0f} MiB |")
    if len(rows) > 1:
        print()
        print(f"peak RSS {rows[-1][0]:,} / {rows[0][0]:,} records: {rows[-1][3] / rows[0][3]:.3f}")


if __name__ == "__main__":
    main()
