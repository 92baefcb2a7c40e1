"""Peak memory of the loss alone: full logits against hfbridge's fused chunked linear + cross-entropy.

    .venv/bin/python bench/loss_memory.py                       # SmolLM2's head: 576 x 49152, 2048 tokens
    .venv/bin/python bench/loss_memory.py --tokens 8192 --trainable-head

Each variant runs in its own process: random hidden states, the output head's weight and targets are allocated,
then the loss and its backward run once; printed is the peak RSS above what was allocated before the loss (on a
GPU, the CUDA max allocated above it), the time, and the loss (which must agree).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run(args) -> dict:
    import torch
    import torch.nn.functional as F

    from hfbridge.losses import chunked_linear_cross_entropy, fused_linear_cross_entropy, masked_cross_entropy

    torch.manual_seed(0)
    device = args.device
    hidden = torch.randn(args.tokens, args.hidden, device=device, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden, device=device) * 0.02).requires_grad_(args.trainable_head)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    targets[: args.tokens // 2] = -100  # half the positions are prompt: not trained
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
    before_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args.variant == "full-logits":
        loss = masked_cross_entropy(F.linear(hidden, weight), targets)
    elif args.variant == "checkpointed-chunks":
        loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=args.chunk)
    else:
        loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=args.chunk)
    loss.backward()
    out = {"loss": float(loss), "seconds": time.perf_counter() - t0,
           "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_rss) / 1024}
    if device == "cuda":
        torch.cuda.synchronize()
        out["peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--trainable-head", action="store_true", help="the head's weight gets a gradient too")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run(args)), flush=True)
        return
    kind = "CUDA max allocated" if args.device == "cuda" else "peak RSS"
    print(f"tokens={args.tokens} (half trained) hidden={args.hidden} vocab={args.vocab} chunk={args.chunk} "
          f"trainable head={args.trainable_head} device={args.device}")
    print(f"| loss | {kind} above inputs, MB | seconds | loss value |")
    print("| --- | --- | --- | --- |")
    for variant in ("full-logits", "checkpointed-chunks", "fused-chunks"):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                              capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{variant} failed:\n{proc.stderr[-2000:]}")
        r = json.loads(line[len("RESULT "):])
        print(f"| {variant} | {r['peak_mb']:.0f} | {r['seconds']:.2f} | {r['loss']:.6f} |")


if __name__ == "__main__":
    main()
