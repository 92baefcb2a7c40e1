"""Preference training through the one pipeline: the step's loss does not depend on how it is split (micro-batch
x accumulation, packed or padded), every reference gives the same numbers, every method runs end to end, and bad
options or records are errors before any model loads."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from hfbridge import cli
from hfbridge.data.demo_preference import write_preference_data

METRICS = ("train_loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")


def _run(*argv):
    assert cli.main(["finetune", "--no-progress-bar", "--eval-samples", "2", "--max-new-tokens", "2",
                     "--show-samples", "0", *argv]) == 0


def _metrics(folder) -> list[dict]:
    with (folder / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train_loss")]
    return [{k: float(r[k]) for k in METRICS if r.get(k)} for r in rows]


def _close(a: list[dict], b: list[dict], tol: float = 2e-5):
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], abs=tol, rel=tol), k


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_preference_data(tmp_path_factory.mktemp("pairs"), n_train=8, n_test=2)


def test_the_step_loss_does_not_depend_on_micro_batch_accumulation_or_packing(tiny_model_dir, pairs, tmp_path):
    train, test = pairs
    runs = {}
    for batch, accumulate, packing in ((4, 1, "on"), (2, 2, "on"), (1, 4, "on"), (4, 1, "off")):
        out = tmp_path / f"b{batch}a{accumulate}{packing}"
        _run("--model", str(tiny_model_dir), "--method", "dpo", "--data", str(train), "--test-data", str(test),
             "--full", "--lr", "1e-3", "--max-steps", "2", "--batch-size", str(batch), "--accumulate",
             str(accumulate), "--packing", packing, "--output", str(out))
        runs[out.name] = (_metrics(out), load_file(out / "model" / "model.safetensors"))
    (ref_metrics, ref_weights), *others = runs.values()
    assert len(ref_metrics) == 2 and ref_metrics[1]["rewards/margins"] != 0
    for metrics, weights in others:
        _close(metrics, ref_metrics)
        for name, w in weights.items():
            assert torch.allclose(w, ref_weights[name], atol=1e-5), name


def test_adapter_copy_and_precomputed_references_agree_and_validation_is_logged(tiny_model_dir, pairs, tmp_path):
    train, test = pairs
    results = []
    for reference in ("adapter", "copy", "precomputed"):
        out = tmp_path / reference
        _run("--model", str(tiny_model_dir), "--method", "dpo", "--reference", reference, "--data", str(train),
             "--val-data", str(test), "--test-data", str(test), "--lora-dropout", "0", "--lr", "1e-2",
             "--epochs", "2", "--batch-size", "4", "--output", str(out))
        results.append(_metrics(out))
        header = (out / "metrics.csv").read_text().splitlines()[0]
        assert "val_loss" in header and "val_rewards/accuracies" in header
    assert len(results[0]) == 4  # two epochs: the precomputed reference is reused
    _close(results[1], results[0])
    _close(results[2], results[0])


@pytest.mark.parametrize("method", ["ipo", "hinge", "simpo", "orpo", "kto", "reward"])
def test_every_method_trains_end_to_end(tiny_model_dir, tmp_path, method):
    out = tmp_path / method
    _run("--model", str(tiny_model_dir), "--method", method, "--demo-train-size", "8", "--max-steps", "2",
         "--batch-size", "4", "--lr", "1e-2", "--output", str(out))
    rows = _metrics(out)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(list(r.values()))).all() for r in rows)
    assert "rewards/chosen" in rows[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["optimizer_steps"] == 2
    assert 0.0 <= summary["exact_match_after"]["preference_accuracy" if method != "kto" else "exact_match"] <= 1.0
    if method == "reward":
        assert json.loads((out / "model" / "config.json").read_text())["architectures"][0].endswith(
            "ForSequenceClassification")


def test_qlora_dpo_trains_with_the_adapter_disabled_as_reference(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    _run("--model", str(tiny_model_dir), "--method", "dpo", "--load-in-4bit", "--demo-train-size", "8",
         "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--output", str(out))
    rows = _metrics(out)
    assert rows[0]["rewards/margins"] == 0.0  # step 0: the policy is the reference
    assert rows[1]["rewards/margins"] != 0.0 and all(abs(v) < 1e4 for v in rows[1].values())


@pytest.mark.parametrize("argv, message", [
    (["--method", "kto", "--reference", "precomputed"], "cannot be precomputed"),
    (["--method", "simpo", "--reference", "copy"], "uses no reference"),
    (["--method", "dpo", "--full", "--reference", "adapter"], "needs an adapter"),
    (["--method", "reward", "--packing", "on"], "one padded row per sequence"),
    (["--method", "dpo", "--format", "messages"], "not 'messages'"),
    (["--method", "dpo", "--label-smoothing", "0.7"], "label_smoothing"),
])
def test_bad_options_are_errors_before_any_model_loads(tiny_model_dir, tmp_path, monkeypatch, capsys, argv, message):
    from hfbridge.models import loading

    monkeypatch.setattr(loading, "load_pretrained_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code = cli.main(["finetune", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"), *argv])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_sft_data_for_a_preference_method_is_an_error_before_loading(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from hfbridge.data.demo import write_demo_data
    from hfbridge.models import loading

    train, _ = write_demo_data(tmp_path / "sft", n_train=4, n_test=1)
    monkeypatch.setattr(loading, "load_pretrained_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code = cli.main(["finetune", "--model", str(tiny_model_dir), "--method", "dpo", "--data", str(train),
                     "--output", str(tmp_path / "run")])
    assert code == 2 and "train.jsonl:1" in capsys.readouterr().err


def test_hfbridge_score_rewards_texts_and_never_replaces_a_file(tiny_model_dir, pairs, tmp_path, capsys):
    train, test = pairs
    run = tmp_path / "rm"
    _run("--model", str(tiny_model_dir), "--method", "reward", "--data", str(train), "--test-data", str(test),
         "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--output", str(run))
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n"
                     + json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello"}]}) + "\n")
    out = tmp_path / "scores.jsonl"
    capsys.readouterr()
    assert cli.main(["score", "--model", str(run), "--data", str(texts), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["reward"], float) for r in rows)
    assert cli.main(["score", "--model", str(run), "--data", str(test)]) == 0
    captured = capsys.readouterr()
    assert "prefers the chosen completion in" in captured.out + captured.err
    before = out.read_text()
    assert cli.main(["score", "--model", str(run), "--data", str(texts), "--output", str(out)]) == 2
    assert out.read_text() == before  # an existing file is never replaced
    assert cli.main(["score", "--model", str(tiny_model_dir), "--data", str(texts)]) == 2  # not a reward model
    texts.write_text(json.dumps({"question": "x"}) + "\n")
    assert cli.main(["score", "--model", str(run), "--data", str(texts)]) == 2


def test_a_strategy_that_restored_weights_before_the_fit_started_refuses_a_precomputed_full_reference(
        tiny_model_dir, tiny_tokenizer):
    """Lightning restores a checkpoint before ``on_fit_start`` under strategies that do not restore after setup:
    the precomputed reference of a full fine-tune would then be the trained weights, so it is refused there (the
    mesh strategy restores after, and resumes: tests/test_fault_injection.py)."""
    from types import SimpleNamespace

    from hfbridge.models.preference import HFPreferenceModel

    module = HFPreferenceModel(model_name=str(tiny_model_dir), tokenizer=tiny_tokenizer, method="dpo",
                               reference="precomputed")
    module.configure_model()
    module.precompute_reference = lambda datamodule: pytest.fail("the reference was computed")
    datamodule = SimpleNamespace(reference_batches=lambda: [])
    module._trainer = SimpleNamespace(ckpt_path="runs/ck/step-00000002", strategy=SimpleNamespace(),
                                      datamodule=datamodule)
    with pytest.raises(ValueError, match="cannot resume under SimpleNamespace"):
        module.on_fit_start()
    module._trainer.ckpt_path = None  # a fresh run (or one whose strategy restores after the fit starts)
    computed = []
    module.precompute_reference = computed.append
    module.on_fit_start()
    assert computed == [datamodule]
