"""Batched greedy generation: hfbridge's decoding loop against transformers' ``generate`` and llama.cpp.

    .venv/bin/python bench/generation.py                                   # batch 16 (as scoring), then 32 and 100
    .venv/bin/python bench/generation.py --batch-sizes 16 --llama-cpp-python /tmp/llcp-venv/bin/python

Same model (the embedded SmolLM2-135M-Instruct, float32; llama.cpp runs it exported by ``hfbridge export --format
gguf`` in f16), the same 100 prompts (the demo date task's test set, chat-rendered with the generation prompt, as
scoring renders them), the same greedy decoding of up to ``--max-new-tokens`` (16, as scoring) per prompt:

* hfbridge: :func:`hfbridge.generation.generate_ids` (batches of the batch size, its greedy fast path);
* transformers: ``model.generate(do_sample=False)`` on the same prompts sorted by length, left-padded, in batches
  of the batch size (what hfbridge's loop did before its fast path);
* llama.cpp (llama-cpp-python, in a child process: ``--llama-cpp-python`` names a Python that imports it, or a
  ``site-packages`` folder holding it): single stream (``Llama.generate`` with top-k 1, one prompt after another,
  which reuses the KV cache of the prefix a prompt shares with the previous one), and batched (llama.cpp's
  ``llama_batch`` with one sequence per prompt, batch-size sequences decoded together). n/a when not importable.

Tokens are generated tokens: each answer's tokens plus the stop token that ended it (aggregate over the prompts);
tokens/s is over the wall clock of the whole set, tokens/CPU-s over the process's CPU time (steadier on a shared
machine). Also printed: how many answers are token-for-token identical to transformers'.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def count_tokens(answers: list[list[int]], max_new_tokens: int) -> int:
    """Generated tokens: the answer's tokens and the stop token when one ended it."""
    return sum(len(a) + (len(a) < max_new_tokens) for a in answers)


def cut(tokens: list[int], stops: set[int]) -> list[int]:
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


def timed(run) -> tuple[list[list[int]], float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    answers = run()
    return answers, time.perf_counter() - wall, time.process_time() - cpu


# ------------------------------------------------------------------------------------ llama.cpp (child process)
def llama_cpp_child(spec: dict) -> dict:
    """Runs under a Python with llama_cpp (no torch, no hfbridge): single stream and batched greedy decoding."""
    import llama_cpp

    prompts, max_new, stops = spec["prompts"], spec["max_new_tokens"], set(spec["stops"])
    threads = spec["threads"]
    longest = max(len(p) for p in prompts) + max_new
    out: dict = {"version": llama_cpp.__version__}

    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=max(256, longest), n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False, seed=0)

    def single() -> list[list[int]]:
        answers = []
        for ids in prompts:
            answer: list[int] = []
            for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
                if token in stops:
                    break
                answer.append(int(token))
                if len(answer) == max_new:
                    break
            answers.append(answer)
        return answers

    single()  # warm-up (first touch of the weights)
    answers, wall, cpu = timed(single)
    out["single"] = {"answers": answers, "wall": wall, "cpu": cpu}

    for size in spec["batch_sizes"]:
        out[f"batched_{size}"] = llama_cpp_batched(llm, prompts, size, max_new, stops, threads)
    llm.close()
    return out


def llama_cpp_batched(llm, prompts: list, size: int, max_new: int, stops: set, threads: int) -> dict:
    """llama.cpp's batched decoding (``llama_batch``, one sequence per prompt, ``size`` sequences at a time; the
    prompts sorted by length as the other systems sort them); a sequence's KV cells are freed when it stops."""
    import ctypes

    import llama_cpp
    import numpy as np

    longest = max(len(p) for p in prompts) + max_new
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = size * (longest + 8)
    params.n_batch = params.n_ctx
    params.n_ubatch = 512
    params.n_seq_max = size
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    if not ctx:
        return {"error": "llama_init_from_model failed"}
    memory = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)

    def decode(entries) -> None:  # entries: (token, position, sequence, wants logits)
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(i: int) -> int:
        row = llama_cpp.llama_get_logits_ith(ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), (vocab,))))

    def batched() -> list[list[int]]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list = [None] * len(prompts)
        for start in range(0, len(order), size):
            group = order[start : start + size]
            llama_cpp.llama_memory_clear(memory, True)
            entries, last = [], {}
            for seq, i in enumerate(group):
                for pos, token in enumerate(prompts[i]):
                    entries.append((token, pos, seq, pos == len(prompts[i]) - 1))
                last[seq] = len(entries) - 1
            decode(entries)
            alive: dict = {seq: [] for seq in range(len(group))}
            position = {seq: len(prompts[i]) for seq, i in enumerate(group)}
            while alive:
                entries, rows = [], []
                for seq in list(alive):
                    token = argmax(last[seq])
                    done = token in stops
                    if not done:
                        alive[seq].append(token)
                        done = len(alive[seq]) == max_new
                    if done:
                        answers[group[seq]] = alive.pop(seq)
                        llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
                        continue
                    entries.append((token, position[seq], seq, True))
                    rows.append(seq)
                    position[seq] += 1
                if entries:
                    decode(entries)
                    last = {seq: i for i, seq in enumerate(rows)}
        return answers

    try:
        answers, wall, cpu = timed(batched)
        return {"answers": answers, "wall": wall, "cpu": cpu}
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def run_llama_cpp(args, gguf: Path, prompts, stops) -> dict | None:
    """The llama.cpp measurements from a child process, or None (with the reason printed) when unavailable."""
    python = sys.executable
    env = dict(os.environ)
    where = args.llama_cpp_python
    if where and Path(where).is_dir():  # a site-packages folder: prepended for this interpreter
        env["PYTHONPATH"] = os.pathsep.join([where, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    elif where:
        python = where
    spec = {"gguf": str(gguf), "prompts": prompts, "max_new_tokens": args.max_new_tokens, "stops": sorted(stops),
            "threads": args.threads, "batch_sizes": args.batch_sizes}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        proc = subprocess.run([python, __file__, "--llama-cpp-child", str(Path(tmp) / "spec.json")],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            print(f"llama.cpp: n/a ({reason})")
            return None
        return json.loads((Path(tmp) / "spec.json.out").read_text())


def export_f16(scratch: Path) -> Path:
    """The embedded model as GGUF f16 (``hfbridge export --format gguf``), written once into the scratch folder."""
    gguf = scratch / "smollm2-135m-instruct-f16.gguf"
    if not gguf.exists():
        from hfbridge.export.gguf import export_gguf

        scratch.mkdir(parents=True, exist_ok=True)
        export_gguf("smollm2-135m-instruct", gguf, "f16", llama_cpp=False, report=lambda m: print(f"  export: {m}"))
    return gguf


# ------------------------------------------------------------------------------------------------- main process
def versions() -> str:
    import platform

    import torch
    import transformers

    return (f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="16,32,100", help="comma-separated; 16 is what scoring uses")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="as scoring (eval.max_new_tokens)")
    parser.add_argument("--prompts", type=int, default=100, help="the demo test set's first N prompts")
    parser.add_argument("--threads", type=int, default=None, help="torch and llama.cpp threads (default: torch's)")
    parser.add_argument("--llama-cpp-python", default=None,
                        help="a Python executable that imports llama_cpp, or a site-packages folder holding it")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp")
    parser.add_argument("--scratch", default=os.path.join(tempfile.gettempdir(), "hfbridge-bench-generation"),
                        help="where the GGUF export is written (once)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--llama-cpp-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_cpp_child:
        spec = json.loads(Path(args.llama_cpp_child).read_text())
        Path(args.llama_cpp_child + ".out").write_text(json.dumps(llama_cpp_child(spec)))
        return
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if min(args.batch_sizes) < 1 or args.max_new_tokens < 1 or args.prompts < 1:
        raise SystemExit("bench/generation.py: error: batch sizes, --max-new-tokens and --prompts must be >= 1")

    import torch

    from hfbridge.data.demo import date_records
    from hfbridge.data.formats import pad_id, prompt_and_reference
    from hfbridge.generation import generate_ids, left_pad, prompt_ids, stop_ids
    from hfbridge.models.loading import load_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    model, tokenizer = load_for_inference("smollm2-135m-instruct", dtype=torch.float32)
    prompts = [prompt_and_reference(r, "messages")[0] for r in date_records(args.prompts, 0, "test")]
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    pad, stops, max_new = pad_id(tokenizer), stop_ids(tokenizer, model), args.max_new_tokens
    print(f"{len(prompts)} prompts of {min(map(len, encoded))}-{max(map(len, encoded))} tokens, greedy, up to "
          f"{max_new} new tokens; {versions()}")

    def transformers_generate(size: int) -> list[list[int]]:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        answers: list = [None] * len(encoded)
        with torch.no_grad():
            for start in range(0, len(order), size):
                group = order[start : start + size]
                ids, mask = left_pad([encoded[i] for i in group], pad)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                     pad_token_id=pad, temperature=None, top_p=None, top_k=None)
                for i, row in zip(group, out[:, ids.shape[1]:].tolist()):
                    answers[i] = cut(row, stops)
        return answers

    generate_ids(model, tokenizer, prompts[:4], max_new_tokens=2, batch_size=4)  # warm-up
    results: dict = {}
    for size in args.batch_sizes:
        for name, run in (("hfbridge", partial(generate_ids, model, tokenizer, prompts, max_new, batch_size=size)),
                          ("transformers", partial(transformers_generate, size))):
            answers, wall, cpu = timed(run)
            results[f"{name} batch {size}"] = {"answers": answers, "wall": wall, "cpu": cpu}
            print(f"  {name} batch {size}: {wall:.1f} s", flush=True)

    if not args.no_llama_cpp:
        gguf = export_f16(Path(args.scratch))
        cpp = run_llama_cpp(args, gguf, encoded, stops)
        if cpp is not None:
            results["llama.cpp single stream"] = cpp["single"]
            for size in args.batch_sizes:
                results[f"llama.cpp batched {size}"] = cpp[f"batched_{size}"]
            print(f"  llama-cpp-python {cpp['version']}, GGUF f16")
    report(results, args)


def report(results: dict, args) -> None:
    reference = {key.split()[-1]: r["answers"] for key, r in results.items() if key.startswith("transformers")}
    any_reference = next(iter(reference.values()))
    rows = {}
    for key, r in results.items():
        if "error" in r:
            print(f"{key}: {r['error']}")
            continue
        tokens = count_tokens(r["answers"], args.max_new_tokens)
        same = sum(a == b for a, b in zip(r["answers"], reference.get(key.split()[-1], any_reference)))
        rows[key] = {"tokens": tokens, "tok_s": tokens / r["wall"], "tok_cpu_s": tokens / r["cpu"], "same": same,
                     "wall": r["wall"]}
    single = rows.get("llama.cpp single stream")
    print("\n| system | tokens | wall s | tokens/s | tokens/CPU-s | x transformers (same batch) | x llama.cpp single "
          "stream | answers equal to transformers' |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, row in rows.items():
        base = rows.get(f"transformers batch {key.split()[-1]}")
        vs_hf = f"{row['tok_s'] / base['tok_s']:.2f}" if base and not key.startswith("transformers") else ""
        vs_cpp = f"{row['tok_s'] / single['tok_s']:.2f}" if single else "n/a"
        print(f"| {key} | {row['tokens']} | {row['wall']:.1f} | {row['tok_s']:.1f} | {row['tok_cpu_s']:.1f} | {vs_hf} "
              f"| {vs_cpp} | {row['same']}/{len(results[key]['answers'])} |")
    if args.json:
        from hfbridge.io import check_output_file, write_text_atomic

        write_text_atomic(check_output_file(args.json), json.dumps({"rows": rows, "results": results}, indent=1))


if __name__ == "__main__":
    main()
