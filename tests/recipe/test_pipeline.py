"""The one pipeline: a saved config.yaml runs the same run again; the model is gathered once after training and
that copy is scored and saved; the caller's tokenizer is never changed."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from hfbridge import cli
from hfbridge.data.demo import write_demo_data
from hfbridge.reporting import read_metrics


def _run(*argv):
    assert cli.main(["finetune", "--no-progress-bar", *argv]) == 0


def test_a_saved_config_reproduces_the_run(tiny_model_dir, tmp_path):
    train, test = write_demo_data(tmp_path / "data", n_train=16, n_test=3)
    first, again = tmp_path / "first", tmp_path / "again"
    _run("--model", str(tiny_model_dir), "--data", str(train), "--test-data", str(test), "--output", str(first),
         "--batch-size", "4", "--max-steps", "3", "--max-new-tokens", "4", "--lr", "1e-3", "--full")
    _run("--config", str(first / "config.yaml"), "--output", str(again))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (first, again))
    assert a["config"] == {**b["config"], "output": a["config"]["output"]}
    assert (a["optimizer_steps"], a["samples"]) == (b["optimizer_steps"], b["samples"])
    ma, mb = (read_metrics(d / "metrics.csv") for d in (first, again))
    for key in ("train_loss", "lr", "grad_norm"):  # not the timings and memory columns
        assert ma[key] == mb[key], key
    wa, wb = (load_file(d / "model" / "model.safetensors") for d in (first, again))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_model_is_gathered_once_after_training_for_scoring_and_both_saves(tiny_model_dir, tmp_path, monkeypatch):
    """With a mesh (here a one-process group, made by --checkpoint-dir) the model is sharded: it is gathered once
    to score before training and once after, and the adapter and the merged model are saved from that copy."""
    from hfbridge.parallel import export

    calls = []
    real = export.gather_plain_model
    monkeypatch.setattr(export, "gather_plain_model", lambda module: calls.append(1) or real(module))
    train, test = write_demo_data(tmp_path / "data", n_train=8, n_test=2)
    out = tmp_path / "run"
    _run("--model", str(tiny_model_dir), "--data", str(train), "--test-data", str(test), "--output", str(out),
         "--batch-size", "4", "--max-steps", "2", "--max-new-tokens", "3", "--checkpoint-dir", str(tmp_path / "ck"))
    assert len(calls) == 2  # before, and once after
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "model" / "model.safetensors").exists()
    assert json.loads((out / "summary.json").read_text())["exact_match_after"] is not None


def test_the_callers_tokenizer_is_not_changed(tiny_model_dir):
    from hfbridge.data.datamodule import CausalLMDataModule
    from hfbridge.generation import generate_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    records = [{"prompt": "a", "completion": "b"}, {"prompt": "c d", "completion": "e"}]
    dm = CausalLMDataModule(tokenizer, records, batch_size=2, packing=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert tokenizer.pad_token is None  # padded with EOS, the tokenizer untouched
    assert batch["input_ids"][0, -1] == tokenizer.eos_token_id or batch["input_ids"][1, -1] == tokenizer.eos_token_id
    from transformers import AutoModelForCausalLM

    generate_ids(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, ["a", "c d"], max_new_tokens=2)
    assert tokenizer.pad_token is None


def test_the_summary_names_the_demo_data_where_it_is_after_the_run(tiny_model_dir, tmp_path):
    """The demo data is written into the run's temporary folder, which becomes the output: summary.json names the
    files in the output folder, not in the temporary one that no longer exists."""
    out = tmp_path / "run"
    _run("--model", str(tiny_model_dir), "--output", str(out), "--demo-train-size", "8", "--eval-samples", "2",
         "--batch-size", "4", "--max-steps", "1", "--max-new-tokens", "2", "--full")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == {"train": str(out / "data" / "train.jsonl"), "test": str(out / "data" / "test.jsonl")}
    assert [s["path"] for s in summary["data_mixture"]["sources"]] == [str(out / "data" / "train.jsonl")]
    assert (out / "data" / "train.jsonl").is_file() and (out / "data" / "test.jsonl").is_file()
    assert not list(tmp_path.glob(".run.tmp-*"))
