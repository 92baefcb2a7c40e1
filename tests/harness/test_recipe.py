"""``eval.tasks`` in a fine-tune: harness tasks scored on the in-memory model before and after training, the same
numbers ``hfbridge eval`` gives on the base model and on the saved model, and the training itself unchanged."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from hfbridge import cli
from hfbridge.data.demo import write_demo_data
from hfbridge.harness import lm_eval_runner as runner

pytest.importorskip("lm_eval")


def _losses(run) -> list[tuple[str, str, str]]:
    """Each step's loss, gradient norm and learning rate (not its timings) from the run's metrics.csv."""
    with (run / "metrics.csv").open() as f:
        return [(row["train_loss"], row["grad_norm"], row["lr"]) for row in csv.DictReader(f)]


def _loglikelihoods(results: dict) -> list[float]:
    return [r[0] for s in results["samples"]["hfbridge_dates_mc"] for r in s["filtered_resps"]]


def test_the_recipe_scores_harness_tasks_before_and_after_training(tiny_model_dir, tmp_path, monkeypatch, capsys):
    calls = []
    real = runner.evaluate

    def recording(*args, **kwargs):
        result = real(*args, **{**kwargs, "log_samples": True})
        calls.append(result)
        return result

    monkeypatch.setattr(runner, "evaluate", recording)
    train, test = write_demo_data(tmp_path / "data", n_train=16, n_test=2)
    common = ["finetune", "--no-progress-bar", "--model", str(tiny_model_dir), "--data", str(train), "--test-data",
              str(test), "--batch-size", "4", "--max-steps", "3", "--max-new-tokens", "3", "--full", "--lr", "5e-3"]
    scored, plain = tmp_path / "scored", tmp_path / "plain"
    assert cli.main([*common, "--output", str(scored), "--eval-tasks", "hfbridge_dates_mc,hfbridge_dates",
                     "--eval-tasks-limit", "4"]) == 0
    printed = capsys.readouterr().out
    assert "harness before fine-tuning: hfbridge_dates_mc acc" in printed
    assert "harness after fine-tuning: hfbridge_dates_mc acc" in printed
    summary = json.loads((scored / "summary.json").read_text())
    assert summary["config"]["eval"]["tasks"] == ["hfbridge_dates_mc", "hfbridge_dates"]
    before, after = summary["harness_before"], summary["harness_after"]
    assert set(before) == set(after) == {"hfbridge_dates_mc", "hfbridge_dates"}
    assert {"acc", "acc_stderr", "acc_norm"} <= set(before["hfbridge_dates_mc"])
    assert "exact_match" in after["hfbridge_dates"]
    assert len(calls) == 2 and _loglikelihoods(calls[0]) != _loglikelihoods(calls[1])  # training moved the model

    # Before: the base model's numbers; after: the saved model's (hfbridge eval on the folders, from disk).
    for source, run_result, scores in ((tiny_model_dir, calls[0], before), (scored, calls[1], after)):
        assert cli.main(["eval", "--model", str(source), "--tasks", "hfbridge_dates_mc,hfbridge_dates", "--limit",
                         "4", "--batch-size", "16", "--device", "cpu"]) == 0
        from_disk = calls[-1]
        assert _loglikelihoods(from_disk) == pytest.approx(_loglikelihoods(run_result), abs=1e-4)
        assert runner.metrics(from_disk) == scores

    # Scoring changes nothing in training: the same run without eval.tasks trains to the same weights.
    assert cli.main([*common, "--output", str(plain)]) == 0
    assert json.loads((plain / "summary.json").read_text())["harness_before"] is None
    assert _losses(scored) == _losses(plain)
    wa, wb = (load_file(d / "model" / "model.safetensors") for d in (scored, plain))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_recipe_task_errors_come_before_the_run_starts(tiny_model_dir, tmp_path, capsys, small_registry):
    out = tmp_path / "run"
    argv = ["finetune", "--no-progress-bar", "--model", str(tiny_model_dir), "--output", str(out)]
    assert cli.main([*argv, "--eval-tasks", "hfbridge_dates_mc,hfbridge_datez"]) == 2
    err = capsys.readouterr().err
    assert "eval.tasks (--eval-tasks): unknown task 'hfbridge_datez'; did you mean hfbridge_dates" in err
    assert cli.main([*argv, "--eval-tasks", "hfbridge_dates", "--eval-tasks-limit", "0"]) == 2
    assert "eval.tasks_limit" in capsys.readouterr().err
    assert not out.exists()
