"""Serving throughput and latency, on one ``hfbridge serve`` on 127.0.0.1, all in one run:

* a burst: the same requests sent by concurrent clients (decoded together by the batcher) against sent one after
  another (what a one-request-at-a-time server does), and the concurrent clients again with every batch decoded by
  ``model.generate`` (what the server did before its batches were steered through hfbridge's fast greedy loop);
* arrivals: requests of mixed lengths (``max_tokens`` cycling 64, 8, 32, 16) sent one every ``--arrival-ms``,
  served with continuous batching (a request joins the running batch between steps), batch after batch
  (``--no-continuous-batching``), and batch after batch through ``model.generate``;
* the baseline a user would pick instead: ``transformers serve`` of the same model folder (float32 on the CPU) with
  its defaults and with ``--continuous-batching``, given the same burst and arrivals (``--no-baseline`` skips it).

    .venv/bin/python bench/serve_throughput.py                         # tiny random Llama, then embedded SmolLM2
    .venv/bin/python bench/serve_throughput.py --models tiny --clients 16 --max-tokens 64

Every request is a greedy chat completion (so every way generates the very same tokens, checked); the prompts ask
for a story, in varied lengths. Printed per model and way: generated tokens per second (the usage counts, over the
wall time of all the requests), the median (and for arrivals the mean and 90th percentile) request latency, the
number of decoding batches, and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def conversations(n: int) -> list[list[dict]]:
    """Requests that ask for a paragraph (so most answers run to ``--max-tokens``), of varied length."""
    animals = ["cat", "dog", "fox", "owl", "horse", "whale", "bee", "crow"]
    places = ["Paris", "a small village", "the mountains", "a busy harbour"]
    return [[{"role": "user", "content": f"Tell me a story about a {animals[i % 8]} in {places[i % 4]}."
                                         + " Use simple words." * (i % 3)}] for i in range(n)]


def served_model(name: str):
    """The served model and its Hugging Face folder (what the baseline server loads)."""
    from hfbridge.models.loading import resolve_model_path
    from hfbridge.serving import ServedModel, open_served_model

    if name != "tiny":
        return open_served_model(name, device="cpu"), resolve_model_path(name)
    from hfbridge.models.loading import load_for_inference
    from hfbridge.testing import build_tiny_causal_lm

    folder = build_tiny_causal_lm(tempfile.mkdtemp(prefix="tiny-serve-"), "llama")
    model, tokenizer = load_for_inference(folder)
    return ServedModel(model, tokenizer, "tiny"), folder


@contextlib.contextmanager
def transformers_serve(folder, continuous: bool, port: int = 8731):
    """``transformers serve`` of ``folder`` on 127.0.0.1 (float32 on the CPU, as hfbridge serves it), in its own
    process; stopped after."""
    import shutil
    import signal
    import urllib.request

    exe = shutil.which("transformers", path=os.path.dirname(sys.executable)) or shutil.which("transformers")
    cmd = [exe, "serve", str(folder), "--port", str(port), "--device", "cpu", "--dtype", "float32",
           "--continuous-batching" if continuous else "--no-continuous-batching"]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    raise RuntimeError("transformers serve did not start:\n" + log.read().decode()[-3000:]) from None
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run(client, model_id: str, prompts: list, max_tokens, clients: int, spacing_s: float = 0.0) -> dict:
    """Send ``prompts`` (``max_tokens``: one for all, or one per prompt) from ``clients`` threads, the i-th not
    before ``i * spacing_s``; tokens per second over the wall time, latencies, texts."""
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    start = time.perf_counter()

    def ask(i):
        time.sleep(max(0.0, start + i * spacing_s - time.perf_counter()))
        sent = time.perf_counter()
        reply = client.chat.completions.create(model=model_id, messages=prompts[i], max_tokens=limits[i],
                                               temperature=0)
        return reply, time.perf_counter() - sent

    if clients == 1:
        results = [ask(i) for i in range(len(prompts))]
    else:
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(ask, range(len(prompts))))
    wall = time.perf_counter() - start
    tokens = sum(r.usage.completion_tokens for r, _ in results)
    latencies = sorted(s for _, s in results)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "p50_s": statistics.median(latencies),
            "mean_s": statistics.fmean(latencies), "p90_s": latencies[int(0.9 * (len(latencies) - 1))],
            "texts": [r.choices[0].message.content for r, _ in results]}


def bench(name: str, args) -> None:
    import openai

    from hfbridge.serving import ServeSettings, start_server

    t0 = time.perf_counter()
    served, folder = served_model(name)
    print(f"\n== {name}: loaded in {time.perf_counter() - t0:.1f}s")
    settings = ServeSettings(max_batch_size=args.clients, batch_wait_ms=args.batch_wait_ms,
                             max_new_tokens=args.max_tokens)
    prompts = conversations(args.clients)
    with start_server(served, settings) as server, \
            openai.OpenAI(base_url=server.url + "/v1", api_key="bench", max_retries=0, timeout=600) as client:
        engine = server.app.state.served.engine
        run(client, served.model_id, prompts[:2], 4, 1)  # warm-up
        batcher = server.app.state.served.batcher
        rows = {}
        for mode, clients, fast in (("sequential", 1, True), ("concurrent", args.clients, True),
                                    ("concurrent, generate", args.clients, False)):
            calls = engine.generate_calls
            engine.fast_greedy = fast
            rows[mode] = run(client, served.model_id, prompts, args.max_tokens, clients)
            rows[mode]["calls"] = engine.generate_calls - calls
        limits = [(64, 8, 32, 16)[i % 4] * args.max_tokens // 64 or 1 for i in range(len(prompts))]
        arrivals = {}
        for mode, continuous, fast in (("continuous", True, True), ("batch after batch", False, True),
                                       ("batch after batch, generate", False, False)):
            calls = engine.generate_calls
            engine.fast_greedy, batcher.continuous = fast, continuous
            arrivals[mode] = run(client, served.model_id, prompts, limits, args.clients, args.arrival_ms / 1000)
            arrivals[mode]["calls"] = engine.generate_calls - calls
        engine.fast_greedy, batcher.continuous = True, True
    baseline = {}
    if args.baseline:  # transformers' own OpenAI-compatible server, its default and its continuous batching
        del server, engine, batcher
        for continuous in (False, True):
            with transformers_serve(folder, continuous) as url, \
                    openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600) as client:
                run(client, str(folder), prompts[:2], 4, 1)  # warm-up (and the model loaded)
                label = "transformers serve" + (" --continuous-batching" if continuous else "")
                baseline[label] = {"burst": run(client, str(folder), prompts, args.max_tokens, args.clients),
                                   "arrivals": run(client, str(folder), prompts, limits, args.clients,
                                                   args.arrival_ms / 1000)}
    same = len({tuple(r["texts"]) for r in rows.values()}) == 1
    print("burst: every request at once")
    for mode, r in rows.items():
        print(f"{mode:>28}: {r['tokens']:5d} tokens in {r['wall_s']:6.2f}s = {r['tok_s']:7.1f} tok/s, "
              f"median latency {r['p50_s']:.2f}s, {r['calls']} decoding batches")
    concurrent = rows["concurrent"]["tok_s"]
    print(f"concurrent: {concurrent / rows['sequential']['tok_s']:.2f}x sequential, "
          f"{concurrent / rows['concurrent, generate']['tok_s']:.2f}x through model.generate; "
          f"same answers all three ways: {same}")
    print(f"arrivals: one request every {args.arrival_ms:.0f} ms, max_tokens cycling {limits[:4]}")
    for mode, r in arrivals.items():
        print(f"{mode:>28}: {r['tokens']:5d} tokens in {r['wall_s']:6.2f}s = {r['tok_s']:7.1f} tok/s, "
              f"latency mean {r['mean_s']:.2f}s, median {r['p50_s']:.2f}s, p90 {r['p90_s']:.2f}s, "
              f"{r['calls']} decoding batches")
    ref = arrivals["continuous"]
    for mode in ("batch after batch", "batch after batch, generate"):
        print(f"continuous against {mode}: {ref['tok_s'] / arrivals[mode]['tok_s']:.2f}x tok/s, mean latency "
              f"{ref['mean_s'] / arrivals[mode]['mean_s']:.2f}x")
    print(f"same answers all three ways: {len({tuple(r['texts']) for r in arrivals.values()}) == 1}")
    for label, r in baseline.items():
        ours = {"burst": rows["concurrent"], "arrivals": arrivals["continuous"]}
        for scenario, b in r.items():
            equal = sum(x == y for x, y in zip(b["texts"], ours[scenario]["texts"]))
            print(f"{label:>38} ({scenario}): {b['tokens']:5d} tokens in {b['wall_s']:6.2f}s = {b['tok_s']:7.1f} "
                  f"tok/s, latency mean {b['mean_s']:.2f}s, p90 {b['p90_s']:.2f}s; hfbridge "
                  f"{ours[scenario]['tok_s'] / b['tok_s']:.2f}x its tok/s at {ours[scenario]['mean_s'] / b['mean_s']:.2f}x"
                  f" its mean latency; {equal}/{len(b['texts'])} answers equal to hfbridge's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m-instruct"],
                        help="'tiny' (a random 2-layer Llama), the embedded alias, or a model folder")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float, default=20.0)
    parser.add_argument("--arrival-ms", type=float, default=100.0, help="spacing of the arrivals scenario's requests")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip `transformers serve` (with and without its continuous batching)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; {args.clients} requests of up to {args.max_tokens} tokens")
    for name in args.models:
        bench(name, args)


if __name__ == "__main__":
    main()
