"""`hfbridge finetune --task image-text-to-text`: the bundled shapes task, a model folder with LoRA, bad input."""

import json

import pytest
import torch
from image_text_helpers import square
from transformers import AutoModelForImageTextToText, AutoProcessor

from hfbridge import cli
from hfbridge.data.demo_image_text import write_shapes_data
from hfbridge.data.image_text import ImageTextDataModule

SMALL = ["--demo-train-size", "16", "--eval-samples", "4", "--max-steps", "3", "--batch-size", "4",
         "--max-new-tokens", "4", "--no-progress-bar"]


def test_the_default_job_trains_the_tiny_random_vlm_on_the_shapes_task(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HFBRIDGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert cli.main(["finetune", "--task", "image-text-to-text", "--output", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed and "Real VLM weights come from a hub id or a local folder" in printed
    assert "exact match before fine-tuning" in printed and "exact match after fine-tuning" in printed
    for name in ("metrics.csv", "loss_curve.png", "summary.json", "model/config.json", "model/processor_config.json",
                 "data/train.jsonl", "data/images"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "image-text-to-text" and summary["optimizer_steps"] == 3
    assert summary["config"]["peft"]["type"] == "none" and summary["config"]["optim"]["lr"] == 3e-3  # demo recipe
    # the saved model and processor are plain transformers, and they run on the saved data
    processor = AutoProcessor.from_pretrained(out / "model")
    model = AutoModelForImageTextToText.from_pretrained(out / "model")
    dm = ImageTextDataModule(processor, out / "data" / "train.jsonl", batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "num_label_tokens")}).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_a_model_folder_trains_with_lora_and_saves_adapter_and_merged_model(image_text_dirs, tmp_path):
    train, test = write_shapes_data(tmp_path / "data", n_train=8, n_test=2)
    out = tmp_path / "run"
    args = ["finetune", "--task", "image-text-to-text", "--model", str(image_text_dirs["idefics3"]), "--data", str(train),
            "--test-data", str(test), "--output", str(out), *SMALL[4:]]
    assert cli.main(args) == 0
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "model" / "model.safetensors").exists()
    assert not (out / "data").exists()  # the demo data is written only when no --data is given
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["peft"]["type"] == "lora" and summary["config"]["train"]["epochs"] == 1  # the usual defaults


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: (d / "img.png").unlink(), "data.jsonl:1: image file not found"),
        (lambda d: (d / "data.jsonl").write_text(
            '{"images": [], "messages": [{"role": "user", "content": [{"type": "image"}]}, '
            '{"role": "assistant", "content": "red"}]}\n'), "1 image placeholder(s) without their own image"),
    ],
)
def test_bad_data_is_reported_before_loading(image_text_dirs, tmp_path, capsys, setup, message):

    square().save(tmp_path / "img.png")
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img.png"}]},
                           {"role": "assistant", "content": "red"}]}
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    setup(tmp_path)
    args = ["finetune", "--task", "image-text-to-text", "--model", str(image_text_dirs["llava"]),
            "--data", str(tmp_path / "data.jsonl"), "--output", str(tmp_path / "o")]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_text_model_is_refused_for_the_image_task(tiny_model_dir, tmp_path, capsys):
    train, _ = write_shapes_data(tmp_path / "data", n_train=2, n_test=1)
    args = ["finetune", "--task", "image-text-to-text", "--model", str(tiny_model_dir), "--data", str(train),
            "--output", str(tmp_path / "o")]
    assert cli.main(args) == 2
    assert "has no multimodal processor" in capsys.readouterr().err


def test_speed_options_change_what_runs(image_text_dirs, tmp_path, monkeypatch):
    """--activation-checkpointing and --compile reach the image-text module and are applied to its model;
    --packing on trains packed (LLaVA keeps each sample's image tokens and pixels in its own segment)."""
    from hfbridge.parallel import parallelize

    applied = []
    monkeypatch.setattr(parallelize, "enable_activation_checkpointing",
                        lambda model, mode=True: applied.append(("checkpointing", mode)))
    monkeypatch.setattr(parallelize, "compile_layers", lambda model, **kw: applied.append(("compile", True)) or 0)
    train, _ = write_shapes_data(tmp_path / "data", n_train=4, n_test=1)
    base = ["finetune", "--task", "image-text-to-text", "--model", str(image_text_dirs["llava"]), "--data", str(train),
            "--max-steps", "1", "--batch-size", "2", "--no-progress-bar", "--full"]
    assert cli.main([*base, "--output", str(tmp_path / "a"), "--activation-checkpointing", "selective",
                     "--compile"]) == 0
    assert applied == [("checkpointing", "selective"), ("compile", True)]
    assert cli.main([*base, "--output", str(tmp_path / "b"), "--packing", "on"]) == 0


def test_two_processes_are_one_fsdp2_run_equal_to_one_process(image_text_dirs, tmp_path):
    """`--nproc-per-node 2 --sharding-axis-dims 1,-1,1,1` is one two-rank FSDP2 run: the same step losses as one
    process on the same global batch (2 x 2 = 4), and the same trained weights."""
    import os
    import subprocess
    import sys

    from hfbridge.reporting import read_metrics

    train, _ = write_shapes_data(tmp_path / "data", n_train=16, n_test=1)
    common = ["finetune", "--task", "image-text-to-text", "--model", str(image_text_dirs["llava"]), "--data", str(train),
              "--full", "--lr", "1e-2", "--max-steps", "3", "--no-progress-bar", "--warmup-ratio", "0",
              "--schedule", "constant", "--eval-samples", "1", "--show-samples", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    two = subprocess.run([sys.executable, "-m", "hfbridge", *common, "--output", str(tmp_path / "two"),
                          "--batch-size", "2", "--nproc-per-node", "2", "--sharding-axis-dims", "1,-1,1,1"],
                         env=env, capture_output=True, text=True, timeout=420)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-6000:]
    assert "starting 2 processes" in two.stdout and two.stdout.count("trained 3 optimizer steps") == 1
    one = subprocess.run([sys.executable, "-m", "hfbridge", *common, "--output", str(tmp_path / "one"),
                          "--batch-size", "4"], env=env, capture_output=True, text=True, timeout=420)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-6000:]
    losses = {name: [v for _, v in read_metrics(tmp_path / name / "metrics.csv")["train_loss"]]
              for name in ("one", "two")}
    assert len(losses["one"]) == 3 and losses["two"] == pytest.approx(losses["one"], abs=1e-5)
    # The trained models answer alike (weights whose gradients are near zero can differ by Adam's normalised
    # rounding noise, so the comparison is of what the models compute, on the training data).
    processor = AutoProcessor.from_pretrained(tmp_path / "one" / "model")
    batch = next(iter(ImageTextDataModule(processor, train, batch_size=4).train_dataloader()))
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_label_tokens")}
    logits = [AutoModelForImageTextToText.from_pretrained(tmp_path / name / "model").eval()(**inputs).logits
              for name in ("one", "two")]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
