"""The numbers quoted in docs/jax.md: peak host memory of converting a Hugging Face checkpoint to JAX, what
8-bit storage saves and costs, and how far JAX logits are from transformers' (tiny models of each family, and
the model given).

Memory is measured in fresh subprocesses with ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak RSS) before
and after loading. Usage::

    HF_HUB_OFFLINE=1 python bench/jax_memory.py [model]   # default: the embedded smollm2-135m-instruct
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
import jax
jax.devices()
from hfbridge.jax import AutoJaxModelForCausalLM
from hfbridge.jax.quant import param_bytes
from hfbridge.models.loading import resolve_model_path
folder = resolve_model_path(sys.argv[1])
mode = sys.argv[2]
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
before = rss()
t = time.time()
out = {"mode": mode}
if mode == "torch":
    import torch
    from transformers import AutoModelForCausalLM
    before = rss()
    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out["param_mib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
else:
    module, params = AutoJaxModelForCausalLM.from_pretrained(folder, load_in_8bit=(mode == "jax-8bit"))
    jax.block_until_ready(params)
    out["param_mib"] = param_bytes(params) / 2**20
out.update(seconds=time.time() - t, rss_before_mib=before, rss_peak_mib=rss())
out["peak_minus_before_mib"] = out["rss_peak_mib"] - before
print(json.dumps(out))
"""

ERROR = r"""
import json, sys
import numpy as np
from transformers import AutoTokenizer
from hfbridge.jax import AutoJaxModelForCausalLM
from hfbridge.jax.quant import param_bytes
from hfbridge.models.loading import resolve_model_path
folder = resolve_model_path(sys.argv[1])
tok = AutoTokenizer.from_pretrained(folder)
text = "The capital of France is Paris. The quick brown fox jumps over the lazy dog. def add(a, b): return a + b"
ids = tok(text, return_tensors="np")["input_ids"].astype(np.int32)
m32, p32 = AutoJaxModelForCausalLM.from_pretrained(folder)
m8, p8 = AutoJaxModelForCausalLM.from_pretrained(folder, load_in_8bit=True)
mk, pk = AutoJaxModelForCausalLM.from_pretrained(folder, load_in_8bit=True, bit_targeted_params=[r"kernel$"])
a = np.asarray(m32(p32, ids))
out = {"tokens": int(ids.shape[1]), "max_abs_logit": float(np.abs(a).max())}
for name, (m, p) in {"kernels+embedding": (m8, p8), "kernels only": (mk, pk)}.items():
    b = np.asarray(m(p, ids))
    out[name] = {"max": float(np.abs(a - b).max()), "mean": float(np.abs(a - b).mean()),
                 "top1": float((a.argmax(-1) == b.argmax(-1)).mean()), "mib": param_bytes(p) / 2**20}
print(json.dumps(out))
"""


PARITY = r"""
import json, sys, tempfile
import numpy as np, torch, jax
from transformers import AutoModelForCausalLM, AutoTokenizer
from hfbridge.jax import AutoJaxModelForCausalLM
from hfbridge.models.loading import resolve_model_path
from hfbridge.testing import build_tiny_causal_lm, build_tiny_tokenizer

def hf(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()

out = {}
families = {"llama": {}, "llama (biases, tied)": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
            "mistral (window 5)": dict(sliding_window=5),
            "qwen2 (biases, window 4)": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
            "qwen3 (q/k norms)": dict(attention_bias=True)}
tok = build_tiny_tokenizer()
ids = np.random.default_rng(0).integers(0, 500, size=(2, 12)).astype(np.int32)
for name, overrides in families.items():
    folder = tempfile.mkdtemp()
    build_tiny_causal_lm(folder, name.split()[0], tokenizer=tok, **overrides)
    module, params = AutoJaxModelForCausalLM.from_pretrained(folder)
    out[name] = float(np.abs(np.asarray(module(params, ids)) - hf(folder, ids)).max())
folder = resolve_model_path(sys.argv[1])
tok = AutoTokenizer.from_pretrained(folder)
ids = tok("The capital of France is", return_tensors="np")["input_ids"].astype(np.int32)
module, params = AutoJaxModelForCausalLM.from_pretrained(folder)
ref = hf(folder, ids)
strict = jax.jit(module.apply, compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""})
out[sys.argv[1] + " (XLA defaults)"] = float(np.abs(np.asarray(module(params, ids)) - ref).max())
out[sys.argv[1] + " (YNNPACK dot fusion off)"] = float(np.abs(np.asarray(strict(params, ids)) - ref).max())
print(json.dumps(out))
"""


def run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct"
    from pathlib import Path

    from hfbridge.models.loading import resolve_model_path

    folder = Path(resolve_model_path(model))
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    print(f"model {model}: {folder} ({size:.0f} MiB of safetensors)")
    for mode in ("jax-fp32", "jax-8bit", "torch"):
        r = run(CHILD, model, mode)
        print(
            f"{mode:9s} params {r['param_mib']:7.1f} MiB  peak RSS {r['rss_peak_mib']:7.1f} MiB "
            f"(+{r['peak_minus_before_mib']:.1f} MiB over {r['rss_before_mib']:.1f} MiB after imports)  "
            f"{r['seconds']:.1f} s"
        )
    e = run(ERROR, model)
    print(f"8-bit vs fp32 JAX logits on {e['tokens']} tokens (max |logit| {e['max_abs_logit']:.1f}):")
    for name in ("kernels+embedding", "kernels only"):
        r = e[name]
        print(
            f"  {name:17s} params {r['mib']:6.1f} MiB  max |err| {r['max']:.3f}  mean |err| {r['mean']:.4f}  "
            f"top-1 agreement {r['top1']:.0%}"
        )


    print("max |JAX - transformers| fp32 logits:")
    for name, err in run(PARITY, model).items():
        print(f"  {name:45s} {err:.1e}")


if __name__ == "__main__":
    main()
