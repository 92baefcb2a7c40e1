"""Serving throughput: the same requests sent by concurrent clients (decoded together by the batcher) against
sent one after another (what a one-request-at-a-time server does), to one ``hfbridge serve`` on 127.0.0.1; and
the concurrent clients again with every batch decoded by ``model.generate`` (what the server did before its
batches were steered through hfbridge's fast greedy loop).

    .venv/bin/python bench/serve_throughput.py                         # tiny random Llama, then embedded SmolLM2
    .venv/bin/python bench/serve_throughput.py --models tiny --clients 16 --max-tokens 64

Every request is a greedy chat completion (so both ways generate the very same tokens, checked); the prompts ask
for a story, in varied lengths. Printed per model: generated tokens per second (the usage counts, over the wall
time of all the requests), the median request latency, the number of decoding batches, and the speed-ups.
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    from hfbridge.serving import ServedModel, open_served_model

    if name != "tiny":
        return open_served_model(name, device="cpu")
    from hfbridge.models.loading import load_for_inference
    from hfbridge.testing import build_tiny_causal_lm

    folder = build_tiny_causal_lm(tempfile.mkdtemp(prefix="tiny-serve-"), "llama")
    model, tokenizer = load_for_inference(folder)
    return ServedModel(model, tokenizer, "tiny")


def run(client, model_id: str, prompts: list, max_tokens: int, clients: int) -> dict:
    def ask(messages):
        start = time.perf_counter()
        reply = client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens,
                                               temperature=0)
        return reply, time.perf_counter() - start

    start = time.perf_counter()
    if clients == 1:
        results = [ask(m) for m in prompts]
    else:
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(ask, prompts))
    wall = time.perf_counter() - start
    tokens = sum(r.usage.completion_tokens for r, _ in results)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall,
            "p50_s": statistics.median(s for _, s in results),
            "texts": [r.choices[0].message.content for r, _ in results]}


def bench(name: str, args) -> None:
    import openai

    from hfbridge.serving import ServeSettings, start_server

    t0 = time.perf_counter()
    served = served_model(name)
    print(f"\n== {name}: loaded in {time.perf_counter() - t0:.1f}s")
    settings = ServeSettings(max_batch_size=args.clients, batch_wait_ms=args.batch_wait_ms,
                             max_new_tokens=args.max_tokens)
    prompts = conversations(args.clients)
    with start_server(served, settings) as server, \
            openai.OpenAI(base_url=server.url + "/v1", api_key="bench", max_retries=0, timeout=600) as client:
        engine = server.app.state.served.engine
        run(client, served.model_id, prompts[:2], 4, 1)  # warm-up
        rows = {}
        for mode, clients, fast in (("sequential", 1, True), ("concurrent", args.clients, True),
                                    ("concurrent, generate", args.clients, False)):
            calls = engine.generate_calls
            engine.fast_greedy = fast
            rows[mode] = run(client, served.model_id, prompts, args.max_tokens, clients)
            rows[mode]["calls"] = engine.generate_calls - calls
        engine.fast_greedy = True
    same = len({tuple(r["texts"]) for r in rows.values()}) == 1
    for mode, r in rows.items():
        print(f"{mode:>20}: {r['tokens']:5d} tokens in {r['wall_s']:6.2f}s = {r['tok_s']:7.1f} tok/s, "
              f"median latency {r['p50_s']:.2f}s, {r['calls']} decoding batches")
    concurrent = rows["concurrent"]["tok_s"]
    print(f"concurrent: {concurrent / rows['sequential']['tok_s']:.2f}x sequential, "
          f"{concurrent / rows['concurrent, generate']['tok_s']:.2f}x through model.generate; "
          f"same answers all three ways: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m-instruct"],
                        help="'tiny' (a random 2-layer Llama), the embedded alias, or a model folder")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float, default=20.0)
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
