"""Peak host memory per rank when loading (and training one step of) a model sharded over N CPU processes.

    python bench/parallel_memory.py build DIR                        # a 180M-parameter Llama (720 MB in fp32)
    torchrun --nproc-per-node N bench/parallel_memory.py run DIR [lora]
    python bench/parallel_memory.py single DIR                       # one process, no mesh (the baseline)

Prints, per rank, the peak resident memory (ru_maxrss) after imports, after loading, and after one step (AdamW),
and the resident memory right after loading split into anonymous pages and file-backed (mmapped) pages.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch


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


def build(path: str) -> None:
    from hfbridge.testing import build_tiny_causal_lm, build_tiny_tokenizer

    build_tiny_causal_lm(path, "llama", tokenizer=build_tiny_tokenizer(), hidden_size=1024, intermediate_size=4096,
                         num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4)


def step(module) -> None:
    ids = torch.randint(0, 500, (2, 64))
    loss = module.model(input_ids=ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-5).step()


def run(path: str, *flags: str, mesh: bool = True) -> None:
    from hfbridge import HFAutoModelForCausalLM, LoRA
    from hfbridge.parallel import ParallelConfig, build_device_mesh

    torch.set_num_threads(1)
    base = peak_mb()
    device_mesh = None
    if mesh:
        torch.distributed.init_process_group("gloo")
        device_mesh = build_device_mesh(ParallelConfig())
    t = time.time()
    module = HFAutoModelForCausalLM(model_name=path, device_mesh=device_mesh, chunked_loss=False,
                                    model_transform=LoRA(r=8, alpha=16) if "lora" in flags else None)
    module.configure_model()
    loaded, load_s, now = peak_mb(), time.time() - t, rss_mb()
    step(module)
    rank = torch.distributed.get_rank() if mesh else 0
    world = torch.distributed.get_world_size() if mesh else 1
    print(json.dumps({"world": world, "rank": rank, "mode": "lora" if "lora" in flags else "full",
                      "after_imports_mb": round(base), "after_load_mb": round(loaded),
                      "anon_after_load_mb": now.get("RssAnon"), "file_after_load_mb": now.get("RssFile"),
                      "after_step_mb": round(peak_mb()), "load_s": round(load_s, 1)}), flush=True)
    if mesh:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command, path, *rest = sys.argv[1:]
    if command == "build":
        build(path)
    elif command == "single":
        run(path, *rest, mesh=False)
    else:
        run(path, *rest)
