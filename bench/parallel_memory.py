"""Peak host memory per rank when loading and training one step of a model sharded over N CPU processes.

    python bench/parallel_memory.py build DIR [VOCAB]        # a 180M-parameter Llama body (12 x 1024), see build()
    torchrun --nproc-per-node N bench/parallel_memory.py run DIR [MODE [SEQ]]
    python bench/parallel_memory.py single DIR [MODE [SEQ]]  # one process, no mesh (the baseline)
    python bench/parallel_memory.py table DIR [SEQ]          # every mode at 1, 2 and 4 ranks, a markdown table

MODE (default ``full``): ``full`` (full fine-tuning, FSDP over the N ranks, the loss without full logits), ``full-logits`` (the same
with the loss from full logits), ``qlora`` (4-bit NF4 base replicated, LoRA r=8 sharded by FSDP), ``lora-tp`` (LoRA
r=8, tensor parallelism over the N ranks), ``lora`` (LoRA r=8, FSDP). One step is the module's own training loss
(``HFAutoModelForCausalLM._loss``) on 2 sequences of SEQ tokens (default 256) per rank, backward, AdamW.

Prints, per rank, the peak resident memory (ru_maxrss) after imports, after loading, and after one step, and the
resident memory right after loading split into anonymous pages and file-backed (mmapped) pages.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import torch

MODES = ("full", "full-logits", "qlora", "lora-tp", "lora")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> dict[str, int]:
    """Current resident memory split into anonymous (allocated) and file-backed (mapped safetensors) pages."""
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon:", "RssFile:")):
            key, value = line.split(":")
            out[key.strip()] = round(int(value.split()[0]) / 1024)
    return out


def build(path: str, vocab: str | None = None) -> None:
    """The 180M Llama body (12 layers, hidden 1024, MLP 4096, 8 heads, 4 key-value heads: 188M parameters in its
    layers) with the tiny test tokenizer's vocabulary, or with ``vocab`` rows (e.g. 49152, SmolLM2's vocabulary)
    and tied input/output embeddings as SmolLM2 has, so that the logits weigh what they weigh in practice."""
    from transformers import AutoModelForCausalLM

    from hfbridge.testing import build_tiny_causal_lm, build_tiny_tokenizer, tiny_llama_config

    tokenizer = build_tiny_tokenizer()
    body = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=8,
                num_key_value_heads=4)
    if not vocab:
        build_tiny_causal_lm(path, "llama", tokenizer=tokenizer, **body)
        return
    config = tiny_llama_config(int(vocab), "llama", tie_word_embeddings=True, **body)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def step(module, seq: int) -> float:
    """One training step of the module's own loss; returns the loss."""
    vocab = module.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)  # the same batch on every rank (a tp group must see one batch)
    ids = torch.randint(0, vocab, (2, seq + 1), generator=gen)
    loss, _ = module._loss({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    loss.backward()
    torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-5).step()
    return float(loss)


def run(path: str, mode: str = "full", seq: str = "256", mesh: bool = True) -> None:
    from hfbridge import HFAutoModelForCausalLM, LoRA
    from hfbridge.parallel import ParallelConfig, build_device_mesh

    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    torch.set_num_threads(1)
    base = peak_mb()
    device_mesh = None
    if mesh:
        torch.distributed.init_process_group("gloo")
        dims = (1, 1, -1, 1) if mode == "lora-tp" else (1, -1, 1, 1)
        device_mesh = build_device_mesh(ParallelConfig(sharding_axis_dims=dims))
    t = time.time()
    module = HFAutoModelForCausalLM(model_name=path, device_mesh=device_mesh, chunked_loss=mode != "full-logits",
                                    load_in_4bit=mode == "qlora",
                                    model_transform=LoRA(r=8, alpha=16, dropout=0.0) if "lora" in mode else None)
    module.configure_model()
    loaded, load_s, now = peak_mb(), time.time() - t, rss_mb()
    t = time.time()
    loss = step(module, int(seq))
    split = module._head_split
    rank = torch.distributed.get_rank() if mesh else 0
    world = torch.distributed.get_world_size() if mesh else 1
    print(json.dumps({"world": world, "rank": rank, "mode": mode, "mesh": mesh,
                      "chunked": bool(split and split[-1] is not None), "loss": round(loss, 4),
                      "after_imports_mb": round(base), "after_load_mb": round(loaded),
                      "anon_after_load_mb": now.get("RssAnon"), "file_after_load_mb": now.get("RssFile"),
                      "after_step_mb": round(peak_mb()), "load_s": round(load_s, 1),
                      "step_s": round(time.time() - t, 1)}), flush=True)
    if mesh:
        torch.distributed.destroy_process_group()


def table(path: str, seq: str = "256") -> None:
    """Run every mode at 1, 2 and 4 ranks (LoRA + tp at 2 and 4) and print a markdown table of per-rank peaks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print("| mode | ranks | peak after load (MB) | peak after one step (MB) | loss | step s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in ("full", "full-logits", "qlora", "lora-tp"):
        for n in (1, 2, 4):
            if mode == "lora-tp" and n == 1:
                continue
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                   __file__, "run", path, mode, seq]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or len(rows) != n:
                print(f"| {mode} | {n} | failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]} |")
                continue
            loads, steps = [r["after_load_mb"] for r in rows], [r["after_step_mb"] for r in rows]
            span = lambda v: f"{min(v)}" if min(v) == max(v) else f"{min(v)}-{max(v)}"  # noqa: E731
            chunked = " (no full logits)" if all(r["chunked"] for r in rows) else ""
            print(f"| {mode}{chunked} | {n} | {span(loads)} | {span(steps)} | {rows[0]['loss']} | "
                  f"{max(r['step_s'] for r in rows)} |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command, path, *rest = sys.argv[1:]
    if command == "build":
        build(path, *rest)
    elif command == "single":
        run(path, *rest, mesh=False)
    elif command == "table":
        table(path, *rest)
    else:
        run(path, *rest)
