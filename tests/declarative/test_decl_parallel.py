"""``hfbridge train --nproc-per-node 2 --sharding-axis-dims 1,-1,1,1``: a declarative config trained with FSDP2 over
two gloo processes through the parallel layer ``hfbridge finetune`` uses, equal to one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from decl_helpers import date_rows, make_config

from hfbridge import cli
from hfbridge.declarative import load_llm
from hfbridge.declarative.dataset import write_rows
from hfbridge.reporting import read_metrics


def _config(tmp_path, model_dir, batch_size: int):
    cfg = make_config(model_dir, "text", adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0})
    cfg["prompt"].update(few_shot=1, few_shot_retrieval="similarity")  # retrieved with the sharded model too
    cfg["trainer"].update(batch_size=batch_size, train_steps=3, learning_rate=1e-2, evaluate_before=False,
                          learning_rate_scheduler={"decay": "constant", "warmup_fraction": 0.0})
    path = tmp_path / f"c{batch_size}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_processes_are_one_fsdp2_run_equal_to_one_process(tiny_model_dir, tmp_path):
    """The same step losses as one process on the same global batch (2 x 2 = 4), and models that compute alike."""
    data = write_rows(date_rows(16, "train") + date_rows(2, "test"), tmp_path / "d.csv")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


    def train(name: str, batch_size: int) -> list[str]:
        return ["train", "--config", str(_config(tmp_path, tiny_model_dir, batch_size)), "--data", str(data),
                "--output", str(tmp_path / name), "--no-progress-bar", "--seed", "0"]

    two = subprocess.run([sys.executable, "-m", "hfbridge", *train("two", 2), "--nproc-per-node", "2",
                          "--sharding-axis-dims", "1,-1,1,1"], env=env, capture_output=True, text=True, timeout=420)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-6000:]
    assert "starting 2 processes" in two.stdout and "device mesh {'dp': 1, 'fsdp': 2" in two.stderr
    assert (two.stdout + two.stderr).count("trained 3 optimizer steps") == 1  # rank 0 speaks
    assert cli.main(train("one", 4)) == 0
    losses = {name: [v for _, v in read_metrics(tmp_path / name / "metrics.csv")["train_loss"]]
              for name in ("one", "two")}
    assert len(losses["one"]) == 3 and losses["two"] == pytest.approx(losses["one"], abs=1e-5)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["optimizer_steps"] == 3
    # The gathered, saved models (adapter and merged) compute what the one-process model computes.
    records = date_rows(4)
    for folder in ("adapter", "model"):
        one, two = (load_llm(tmp_path / name / folder) for name in ("one", "two"))
        inputs, targets = one.encode_inputs(records), one.encode_targets(records)
        assert torch.equal(inputs["date"], two.encode_inputs(records)["date"])  # the same retrieved examples
        with torch.no_grad():
            logits = [llm.forward((inputs, targets))["iso::logits"] for llm in (one, two)]
        torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


def test_what_a_mesh_cannot_do_yet_is_refused_before_loading(tiny_model_dir, tmp_path, capsys):
    data = write_rows(date_rows(4, "train"), tmp_path / "d.csv")
    cfg = make_config(tiny_model_dir, "text", adapter={"type": "lora"})
    cfg["trainer"].update(regularization_type="l1", regularization_lambda=0.1)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--data", str(data), "--output", str(out),
                     "--sharding-axis-dims", "1,-1,1,1"]) == 2
    assert "regularization on a device mesh" in capsys.readouterr().err and not out.exists()
