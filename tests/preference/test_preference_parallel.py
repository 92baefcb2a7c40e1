"""DPO on an FSDP2 mesh of two gloo processes equals one process: every logged value of every step, and the
trained adapter."""

import csv
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hfbridge.data.demo_preference import write_preference_data


def _finetune(*argv) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hfbridge", "finetune", "--no-progress-bar", *argv]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def _rows(folder):
    with (folder / "metrics.csv").open() as f:
        keep = ("train_loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen")
        return [{k: float(r[k]) for k in keep} for r in csv.DictReader(f) if r.get("train_loss")]


def test_fsdp2_dpo_equals_one_process(tiny_model_dir, tmp_path):
    train, test = write_preference_data(tmp_path / "data", n_train=12, n_test=2)
    common = ["--model", str(tiny_model_dir), "--method", "dpo", "--data", str(train), "--test-data", str(test),
              "--max-steps", "3", "--lr", "1e-2", "--lora-dropout", "0", "--eval-samples", "2",
              "--max-new-tokens", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    _finetune(*common, "--batch-size", "4", "--output", str(one))
    _finetune(*common, "--batch-size", "2", "--nproc-per-node", "2", "--sharding-axis-dims", "1,2,1,1",
              "--output", str(two))
    a, b = _rows(one), _rows(two)
    assert len(a) == len(b) == 3 and a[2]["rewards/chosen"] != 0
    for x, y in zip(a, b):
        for k in x:
            assert x[k] == pytest.approx(y[k], abs=1e-5, rel=1e-5), k
    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (one, two))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)  # Adam: lr 1e-2 per step
