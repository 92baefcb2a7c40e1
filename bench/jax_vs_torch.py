"""JAX against PyTorch on the same model and the same CPU: training-step and generation throughput, peak memory.

Each framework runs in its own fresh subprocess (so peak RSS, ``ru_maxrss``, is its own), on the same token batch:
AdamW training steps on ``(batch, seq)`` tokens (fp32; first step excluded: JAX's compile, PyTorch's warm-up) and
greedy generation of ``new`` tokens for ``batch`` prompts with a KV cache (a first call excluded likewise). One run
prints the table quoted in docs/jax.md. Usage::

    HF_HUB_OFFLINE=1 python bench/jax_vs_torch.py [model] [--batch 4] [--seq 64] [--steps 4] [--new 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

CHILD = r"""
import json, os, resource, sys, time
import numpy as np
framework, folder, batch, seq, steps, new = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
rng = np.random.default_rng(0)
ids = rng.integers(3, 1000, size=(batch, seq)).astype(np.int64)
prompt = ids[:, :16]
out = {"framework": framework}
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if framework == "torch":
    import torch
    from transformers import AutoModelForCausalLM
    from hfbridge.losses import masked_cross_entropy
    torch.manual_seed(0)
    out["threads"] = torch.get_num_threads()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.tensor(ids)
    labels = torch.cat([x[:, 1:], torch.full((batch, 1), -100)], dim=1)
    def step():
        loss = masked_cross_entropy(model(input_ids=x).logits, labels)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    t = time.time(); step(); out["first_step_s"] = time.time() - t
    t = time.time()
    for _ in range(steps): step()
    out["train_tok_s"] = batch * seq * steps / (time.time() - t)
    model.eval()
    p = torch.tensor(prompt)
    gen = lambda: model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False)
    with torch.no_grad():
        t = time.time(); gen(); out["first_generate_s"] = time.time() - t
        t = time.time(); tokens = gen(); dt = time.time() - t
    out["generate_tok_s"] = batch * new / dt
else:
    import jax, optax
    from hfbridge.jax import AutoJaxModelForCausalLM
    from hfbridge.jax.train import init_opt_state, make_train_step
    module, params = AutoJaxModelForCausalLM.from_pretrained(folder)
    optimizer = optax.adamw(1e-5)
    opt_state = init_opt_state(optimizer, params)
    train = make_train_step(module, optimizer)
    x = np.asarray(ids, np.int32)
    labels = np.concatenate([x[:, 1:], np.full((batch, 1), -100, np.int32)], axis=1)
    b = {"input_ids": x, "labels": labels}
    t = time.time(); params, opt_state, loss = train(params, opt_state, b); float(loss); out["first_step_s"] = time.time() - t
    t = time.time()
    for _ in range(steps):
        params, opt_state, loss = train(params, opt_state, b)
    float(loss)
    out["train_tok_s"] = batch * seq * steps / (time.time() - t)
    p = np.asarray(prompt, np.int32)
    gen = lambda: np.asarray(module.generate(params, p, max_new_tokens=new, eos_token_id=-1))
    t = time.time(); gen(); out["first_generate_s"] = time.time() - t
    t = time.time(); tokens = gen(); dt = time.time() - t
    out["generate_tok_s"] = batch * new / dt
out["peak_rss_mib"] = rss()
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--new", type=int, default=32)
    args = parser.parse_args()
    from hfbridge.models.loading import resolve_model_path

    folder = str(resolve_model_path(args.model))
    rows = {}
    for framework in ("torch", "jax"):
        cmd = [sys.executable, "-c", CHILD, framework, folder, *map(str, (args.batch, args.seq, args.steps, args.new))]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[framework] = json.loads(done.stdout.strip().splitlines()[-1])
    import jax
    import torch
    import transformers

    print(f"model {args.model}; batch {args.batch} x seq {args.seq} (train, {args.steps} timed AdamW steps), "
          f"{args.batch} prompts x 16 tokens + {args.new} greedy tokens (generate)")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {__import__('os').cpu_count()} CPU cores; "
          f"torch {torch.__version__} ({rows['torch']['threads']} threads), jax {jax.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"{'':10}{'train tok/s':>12}{'gen tok/s':>11}{'peak RSS MiB':>14}{'1st step s':>12}{'1st gen s':>11}")
    for name, r in rows.items():
        print(f"{name:10}{r['train_tok_s']:12.1f}{r['generate_tok_s']:11.1f}{r['peak_rss_mib']:14.0f}"
              f"{r['first_step_s']:12.1f}{r['first_generate_s']:11.1f}")
    t, j = rows["torch"], rows["jax"]
    print(f"{'jax/torch':10}{j['train_tok_s'] / t['train_tok_s']:12.2f}{j['generate_tok_s'] / t['generate_tok_s']:11.2f}"
          f"{j['peak_rss_mib'] / t['peak_rss_mib']:14.2f}")


if __name__ == "__main__":
    main()
