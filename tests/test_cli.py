import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfbridge import cli
from hfbridge.data.demo import write_demo_data


@pytest.fixture
def demo_files(tmp_path):
    return write_demo_data(tmp_path / "data", n_train=16, n_test=4)


def _finetune(model_dir, data, test, out, *extra):
    return cli.main([
        "finetune", "--model", str(model_dir), "--data", str(data), "--test-data", str(test),
        "--output", str(out), "--batch-size", "4", "--max-steps", "3", "--max-new-tokens", "4",
        "--no-progress-bar", "--lr", "1e-3", *extra,
    ])


def test_finetune_writes_a_complete_output_folder(tiny_model_dir, demo_files, tmp_path, capsys):
    train, test = demo_files
    out = tmp_path / "run"
    assert _finetune(tiny_model_dir, train, test, out) == 0
    printed = capsys.readouterr().out
    assert "exact match before fine-tuning" in printed and "exact match after fine-tuning" in printed
    for name in ("metrics.csv", "loss_curve.png", "summary.json", "model/config.json", "adapter/adapter_config.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer_steps"] == 3 and summary["exact_match_after"] is not None
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "train_loss" in header
    # the merged model is plain transformers
    model = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    assert model(torch.tensor([[3, 4, 5]])).logits.shape[-1] == model.config.vocab_size
    assert not list(tmp_path.glob(".run.tmp-*"))


def test_generate_runs_a_saved_model(tiny_model_dir, capsys):
    assert cli.main(["generate", "--model", str(tiny_model_dir), "--prompt", "hello", "--prompt", "March 3rd",
                     "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert "> hello" in printed and "> March 3rd" in printed


def test_full_finetuning_saves_the_model(tiny_model_dir, demo_files, tmp_path):
    train, test = demo_files
    out = tmp_path / "full"
    assert _finetune(tiny_model_dir, train, test, out, "--full") == 0
    assert (out / "model" / "model.safetensors").exists() and not (out / "adapter").exists()


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d, m, t: ["--data", str(t / "missing.jsonl")], "data file not found"),
        (lambda d, m, t: ["--data", str(d[1]), "--max-length", "100000"], "beyond the model's context"),
        (lambda d, m, t: ["--data", str(d[1]), "--model", "nobody/nothing"], "hub is offline"),
    ],
)
def test_bad_input_is_reported_before_loading(make_args, message, tiny_model_dir, demo_files, tmp_path, capsys):
    args = ["finetune", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"), *make_args(demo_files, tiny_model_dir, tmp_path)]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_malformed_line_is_named_with_its_number(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    assert cli.main(["finetune", "--model", str(tiny_model_dir), "--data", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err


def test_non_empty_output_is_refused_unless_overwrite(tiny_model_dir, demo_files, tmp_path, capsys):
    train, test = demo_files
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    assert _finetune(tiny_model_dir, train, test, out) == 2
    assert "exists and is not empty" in capsys.readouterr().err and (out / "precious.txt").exists()
    # --overwrite replaces only what hfbridge wrote: a folder of someone else's files is refused, untouched
    assert _finetune(tiny_model_dir, train, test, out, "--overwrite") == 2
    assert "was not written by hfbridge" in capsys.readouterr().err and (out / "precious.txt").exists()
    (out / "precious.txt").unlink()
    assert _finetune(tiny_model_dir, train, test, out) == 0  # an empty folder is fine
    assert _finetune(tiny_model_dir, train, test, out, "--overwrite") == 0  # a run of hfbridge's is replaced
    assert (out / "model").exists()


def test_interrupted_run_leaves_no_output_folder(tiny_model_dir, demo_files, tmp_path, monkeypatch):
    import lightning.pytorch as pl

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pl.Trainer, "fit", boom)
    train, test = demo_files
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _finetune(tiny_model_dir, train, test, out)
    assert not out.exists() and not list(tmp_path.glob(".run.tmp-*"))


def test_demo_data_command(tmp_path):
    assert cli.main(["demo-data", "--output", str(tmp_path / "d"), "--train-size", "5", "--test-size", "2"]) == 0
    assert len((tmp_path / "d" / "train.jsonl").read_text().splitlines()) == 5
