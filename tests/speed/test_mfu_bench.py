"""bench/mfu.py: its model FLOP count against torch's own FLOP counter on a real forward and backward, by hand,
and its --quick path end to end on a tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_loader import load_bench
from torch.utils.flop_counter import FlopCounterMode

from hfbridge import HFAutoModelForCausalLM
from hfbridge.losses import IGNORE_INDEX
from hfbridge.models.peft_adapters import LoRA

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "mfu.py"


def _bench():
    return load_bench("mfu")


def _counted_step(module, length: int, trained: int) -> float:
    """FLOPs torch counts for hfbridge's loss (forward, head on the trained positions) and its backward, on one
    sample of ``length`` tokens whose last ``trained`` positions have labels."""
    ids = torch.randint(3, 100, (1, length))
    labels = torch.full((1, length), IGNORE_INDEX)
    labels[0, -trained:] = ids[0, -trained:]
    module._split()  # found once per model with a check forward of its own, which is not the step's work
    with FlopCounterMode(display=False) as counter:
        loss, _ = module._loss({"input_ids": ids, "labels": labels})
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_model_flops_equal_torchs_flop_counter(tiny_model_dir, mode):
    """Eager attention, so torch counts its matrix products too (the whole L x L square: no causal halving)."""
    bench = _bench()
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir), attn_implementation="eager",
                                    model_transform=LoRA(r=4, alpha=8, dropout=0.0) if mode == "lora" else None)
    module.configure_model()
    dims = bench.model_dims(module.model)
    config = module.model.config
    assert dims.layers == 2 and dims.attn_width == 64 and not dims.tied
    assert dims.head == config.vocab_size * 64 and dims.embedding == config.vocab_size * 64
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128  # q, o; k, v (2 of 4 heads); gate, up, down
    assert dims.body == 2 * per_layer
    length, trained = 23, 9
    counted = _counted_step(module, length, trained)
    expected = bench.dense_flops(dims, length, trained, mode) + bench.attention_flops([length], 2, 64, causal=False)
    if mode == "lora":
        # r=4 on q, k, v, o (64 -> 64/32 wide), gate, up (64 -> 128) and down (128 -> 64), in both layers
        assert dims.lora == 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
        # Nothing before layer 0 is trained, so autograd never computes the gradient of layer 0's input: its q, k
        # and v projections (base weights and LoRA's A) skip their activation gradient, 2 FLOPs per weight.
        expected -= 2 * length * (64 * 64 + 2 * 64 * 32 + 3 * 64 * 4)
    assert counted == expected


def test_attention_and_convention_counts_by_hand(tiny_model_dir):
    bench = _bench()
    # causal pairs of samples of 3 and 4 tokens: 6 + 10; 12 FLOPs per pair, channel and layer
    assert bench.attention_flops([3, 4], layers=2, attn_width=5) == 12 * 2 * 5 * 16
    assert bench.attention_flops([3, 4], layers=2, attn_width=5, causal=False) == 12 * 2 * 5 * 25
    dims = bench.ModelDims(body=100, head=40, lora=10, embedding=40, total=152, layers=1, attn_width=2, tied=True)
    # full: 6 per body weight and token, the head on the 2 trained positions only
    assert bench.dense_flops(dims, tokens=7, label_tokens=2, mode="full") == 6 * 100 * 7 + 6 * 40 * 2
    # LoRA: forward and activation gradient of the frozen weights (4), all 6 for the adapter
    assert bench.dense_flops(dims, tokens=7, label_tokens=2, mode="lora") == 4 * 100 * 7 + 6 * 10 * 7 + 4 * 40 * 2
    # PaLM/nanoGPT: 6 x every parameter (the tied head once) per token; torchtitan leaves the embedding out
    assert bench.convention_flops(dims, [3, 4], "full") == 6 * 142 * 7 + 12 * 1 * 2 * 25
    assert bench.convention_flops(dims, [3, 4], "full", exclude_embedding=True) == 6 * 102 * 7 + 12 * 1 * 2 * 25
    with pytest.raises(ValueError, match="mode"):
        bench.dense_flops(dims, 1, 1, "qlora")


def test_gemm_plan_and_profile_grouping(tiny_model_dir):
    bench = _bench()
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir))
    module.configure_model()
    dims = bench.model_dims(module.model)
    gemms = bench.model_gemms(module.model, dims, rows=40, label_rows=600, mode="full", chunk=512)
    flops = sum(2 * g["m"] * g["k"] * g["n"] * g["calls"] for g in gemms)
    # the plan's matrix products are exactly the dense model FLOPs of a micro-batch
    assert flops == bench.dense_flops(dims, 40, 600, "full")
    assert {(g["m"], g["calls"]) for g in gemms if g["n"] == dims.head // 64 and g["layout"] == "nt"} == {
        (512, 1), (88, 1)}
    # the profile: a GEMM inside a backward range counts as GEMM, a pointwise op as the model's, the optimizer's
    # own ops as optimizer, and the wall time not in any op is the framework's
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        x = torch.randn(64, 64)
        with torch.profiler.record_function("mfu.backward"):
            torch.mm(x, x)
            torch.sigmoid(x)
        with torch.profiler.record_function("Optimizer.step#AdamW.step"):
            x.add_(1.0)
    totals, top = bench.group_profile(prof.events(), wall_us=1e9)
    assert totals["GEMM"] > 0 and totals["norms/pointwise"] > 0 and totals["optimizer"] > 0
    assert totals["attention"] == 0 and totals["framework"] > 0.99e9
    assert {name for _, name, _ in top} >= {"aten::sigmoid", "aten::add_"}


def test_quick_run_end_to_end(tiny_model_dir, tmp_path):
    """``--quick`` on a tiny model: one LoRA run in its own process, its peak, MFU and profile table printed and
    written; an existing --json file is refused before anything runs."""
    out = tmp_path / "mfu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(BENCH), "--quick", "--model", str(tiny_model_dir), "--modes", "lora", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| lora | 1 |" in proc.stdout and "| GEMM |" in proc.stdout and "MFU" in proc.stdout
    run = json.loads(out.read_text())["runs"]["lora"]
    assert run["flops"] > 0 and run["seconds"] > 0 and run["threads"] == 1
    assert run["dims"]["lora"] > 0 and set(run["profile"]["ms"]) == {"GEMM", "attention", "norms/pointwise",
                                                                       "optimizer", "framework"}
    assert run["profile"]["ms"]["GEMM"] > 0 and run["profile"]["ms"]["optimizer"] > 0
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr
