"""``hfbridge train | predict | evaluate`` on the tiny model; save and load round trips (a fresh process too);
bad input reported before anything is written."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from decl_helpers import LABELS, date_rows, make_config, review_rows

from hfbridge import cli
from hfbridge.declarative.dataset import write_rows
from hfbridge.declarative.llm import load_llm


def _config(path, cfg: dict):
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config, dataset, out, *extra):
    return cli.main(["train", "--config", str(config), "--dataset", str(dataset), "--output", str(out),
                     "--no-progress-bar", "--random-seed", "0", *extra])


@pytest.fixture(scope="module")
def category_run(tiny_model_dir, tmp_path_factory):
    """A category model fine-tuned for 2 steps from Parquet data, and its in-process predictions."""
    tmp = tmp_path_factory.mktemp("category-run")
    cfg = make_config(tiny_model_dir, "category", adapter={"type": "lora", "r": 4, "alpha": 8})
    cfg["trainer"].update(train_steps=2)
    rows = [{**r, "split": "train"} for r in review_rows(8)] + [{**r, "split": "test"} for r in review_rows(3)]
    data = write_rows(rows, tmp / "reviews.parquet")
    assert _train(_config(tmp / "c.yaml", cfg), data, tmp / "run") == 0
    return tmp / "run", data


def test_train_writes_a_complete_run_folder_with_metrics_before_and_after(tiny_model_dir, tmp_path, capsys):
    cfg = make_config(tiny_model_dir, "text", adapter={"type": "lora", "r": 4, "alpha": 8})
    cfg["trainer"].update(train_steps=2)
    data = write_rows(date_rows(8, "train") + date_rows(3, "test"), tmp_path / "dates.csv")
    out = tmp_path / "run"
    assert _train(_config(tmp_path / "c.yaml", cfg), data, out) == 0
    printed = capsys.readouterr().out
    assert "metric" in printed and "exact_match" in printed and "before" in printed and "after" in printed
    for name in ("config.yaml", "metrics.json", "metrics.csv", "loss_curve.png", "predictions_test.csv",
                 "adapter/llm_config.yaml", "adapter/model_weights/adapter_config.json",
                 "model/llm_meta.json", "model/model_weights/model.safetensors"):
        assert (out / name).exists(), name
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["optimizer_steps"] == 2 and summary["test_samples"] == 3
    for key in ("loss", "perplexity", "token_accuracy", "exact_match", "bleu", "rouge1", "rouge2", "rougeL"):
        assert key in summary["before"] and key in summary["after"]
    assert summary["after"]["loss"] < summary["before"]["loss"]  # lr 1e-2 on 8 records: it learns
    assert not list(tmp_path.glob(".run.tmp-*"))
    # Adapter-only and merged folders load and generate what the trained model generated.
    records = date_rows(3)
    adapter, merged = load_llm(out / "adapter"), load_llm(out / "model")
    assert adapter.predict(records) == merged.predict(records)
    with open(out / "predictions_test.csv") as f:
        trained = [row["iso_predictions"] for row in csv.DictReader(f)]
    assert [r["iso_predictions"] for r in adapter.predict(records)] == trained


def test_category_runs_evaluate_and_predict_from_the_command_line(category_run, tmp_path, capsys):
    run, data = category_run
    summary = json.loads((run / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "confusion_matrix", "loss"} <= set(summary["after"])
    assert (run / "confusion_matrix_after.png").exists() and (run / "confusion_matrix_before.png").exists()
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--model", str(run), "--dataset", str(data), "--split", "test",
                     "--output", str(report)]) == 0
    table = capsys.readouterr().out
    assert "accuracy" in table and "macro_f1" in table
    metrics = json.loads(report.read_text())["metrics"]
    assert metrics["samples"] == 3 and (tmp_path / "eval_confusion_matrix.png").exists()
    assert metrics["accuracy"] == pytest.approx(summary["after"]["accuracy"])
    predictions = tmp_path / "p.jsonl"
    assert cli.main(["predict", "--model", str(run), "--dataset", str(data), "--output", str(predictions)]) == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 11 and rows[0]["sentiment_predictions"] in LABELS
    assert sum(rows[0][f"sentiment_probabilities_{label}"] for label in LABELS) == pytest.approx(1.0)


def test_a_fresh_process_loads_the_saved_model_and_predicts_the_same(category_run, tmp_path):
    run, data = category_run
    records = review_rows(8) + review_rows(3)  # the rows of the data file
    in_process = load_llm(run / "adapter").predict(records)
    merged = load_llm(run / "model").predict(records)
    for a, b in zip(in_process, merged):
        assert a["sentiment_predictions"] == b["sentiment_predictions"]
        assert a["sentiment_probability"] == pytest.approx(b["sentiment_probability"], abs=1e-4)
    out = tmp_path / "fresh.csv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "hfbridge", "predict", "--model", str(run / "adapter"),
                           "--dataset", str(data), "--output", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out) as f:
        fresh = list(csv.DictReader(f))
    assert [r["sentiment_predictions"] for r in fresh] == [r["sentiment_predictions"] for r in in_process]
    for a, b in zip(fresh, in_process):
        assert float(a["sentiment_probability"]) == pytest.approx(b["sentiment_probability"], abs=1e-5)
    with open(run / "predictions_test.csv") as f:  # what the trained model predicted before it was saved
        trained = list(csv.DictReader(f))
    for a, b in zip(fresh[-3:], trained):
        assert a["sentiment_predictions"] == b["sentiment_predictions"]
        assert float(a["sentiment_probability"]) == pytest.approx(float(b["sentiment_probability"]), abs=1e-5)


def test_zero_and_few_shot_runs_save_the_config_only(tiny_model_dir, tmp_path, capsys):
    cfg = make_config(tiny_model_dir, "category")
    cfg["trainer"] = {"type": "none"}
    cfg["prompt"]["few_shot"] = 2
    rows = [{**r, "split": "train"} for r in review_rows(6)] + [{**r, "split": "test"} for r in review_rows(3)]
    data = write_rows(rows, tmp_path / "r.jsonl")
    out = tmp_path / "zs"
    assert _train(_config(tmp_path / "c.yaml", cfg), data, out) == 0
    assert "zero-shot" in capsys.readouterr().out
    saved = yaml.safe_load((out / "model" / "llm_config.yaml").read_text())
    assert len(saved["prompt"]["examples"]) == 2  # frozen, so predicting later shows the same examples
    assert not (out / "model" / "model_weights").exists()
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["zero_shot"]["samples"] == 3 and summary["after"] is None
    llm = load_llm(out)
    assert "Answer: " in llm.renderer.user_text(review_rows(1)[0])
    with torch.no_grad():
        assert llm.predict(review_rows(2))[0]["sentiment_predictions"] in LABELS


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing-column", "r.csv:2: column 'review' is named in input_features but absent"),
        ("unknown-label", "r.csv:3: sentiment='mixed' is not one of the category labels"),
        ("placeholder", "prompt.template: placeholder {author} names no input feature"),
        ("quantization", "bitsandbytes quantizes on CUDA GPUs and on the CPU, not on 'mps'"),
        ("bad-key", "trainer.epoch: unknown key (did you mean 'epochs'?)"),
    ],
)
def test_bad_input_is_reported_clearly_and_nothing_is_written(case, message, tiny_model_dir, tmp_path, capsys):
    cfg = make_config(tiny_model_dir, "category")
    rows = review_rows(3)
    extra = []
    if case == "missing-column":
        rows = [{"text": r["review"], "sentiment": r["sentiment"]} for r in rows]
    elif case == "unknown-label":
        rows[1]["sentiment"] = "mixed"
    elif case == "placeholder":
        cfg["prompt"]["template"] = "{review} by {author}"
    elif case == "quantization":
        cfg["quantization"] = {"bits": 4}
        cfg["adapter"] = {"type": "lora"}
        extra = ["--device", "mps"]
    else:
        cfg["trainer"]["epoch"] = 2
    data = write_rows(rows, tmp_path / "r.csv")
    out = tmp_path / "out"
    assert _train(_config(tmp_path / "c.yaml", cfg), data, out, *extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_llm_data_writes_the_example_sets(tmp_path, capsys):
    out = tmp_path / "tickets.parquet"
    assert cli.main(["llm-data", "--task", "tickets", "--output", str(out), "--train-size", "8",
                     "--test-size", "4"]) == 0
    import pyarrow.parquet as pq

    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 12 and set(rows[0]) == {"ticket", "department", "split"}
    assert "wrote" in capsys.readouterr().out
