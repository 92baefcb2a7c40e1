"""``hfbridge finetune --nproc-per-node 2`` starts torchrun itself and writes one complete output folder."""

import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from hfbridge.data.demo import write_demo_data
from hfbridge.parallel import checkpoint as ckpt


def test_finetune_nproc_per_node_with_tensor_parallel_and_checkpoints(tiny_model_dir, tmp_path):
    train, test = write_demo_data(tmp_path / "data", n_train=16, n_test=2)
    out, ck = tmp_path / "run", tmp_path / "ck"
    cmd = [sys.executable, "-m", "hfbridge", "finetune", "--model", str(tiny_model_dir), "--data", str(train),
           "--test-data", str(test), "--output", str(out), "--batch-size", "4", "--max-steps", "2", "--full",
           "--max-new-tokens", "4", "--no-progress-bar", "--lr", "1e-3", "--nproc-per-node", "2",
           "--sharding-axis-dims", "1,1,2,1", "--checkpoint-dir", str(ck), "--save-every", "1", "--keep-last", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "starting 2 processes" in result.stdout and "torch.distributed.run" in result.stdout
    assert result.stdout.count("exact match after fine-tuning") == 1  # printed by rank 0 only
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer_steps"] == 2
    assert "train_loss" in (out / "metrics.csv").read_text().splitlines()[0]
    assert ckpt.resolve_checkpoint(ck).name == "step-00000002"
    assert [p.name for p in ck.glob("step-*")] == ["step-00000002"]  # --keep-last 1
    model = AutoModelForCausalLM.from_pretrained(out / "model")  # gathered from the tensor-parallel shards
    assert model(torch.tensor([[3, 4, 5]])).logits.shape[-1] == model.config.vocab_size
    assert not list(tmp_path.glob(".run.tmp-*"))
