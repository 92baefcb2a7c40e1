"""`hfbridge finetune --task image-text-to-text`: the bundled shapes task, a model folder with LoRA, bad input."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from vlm_helpers import square

from hfbridge import cli
from hfbridge.data.demo_vision import write_shapes_data
from hfbridge.data.vision import VisionDataModule
from hfbridge.vlm_finetune import DEMO_RECIPE, vlm_config

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
    assert summary["config"]["lora"] is False and summary["config"]["lr"] == DEMO_RECIPE["lr"]
    # the saved model and processor are plain transformers, and they run on the saved data
    processor = AutoProcessor.from_pretrained(out / "model")
    model = AutoModelForImageTextToText.from_pretrained(out / "model")
    dm = VisionDataModule(processor, out / "data" / "train.jsonl", batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "num_label_tokens")}).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_a_model_folder_trains_with_lora_and_saves_adapter_and_merged_model(vlm_dirs, tmp_path):
    train, test = write_shapes_data(tmp_path / "data", n_train=8, n_test=2)
    out = tmp_path / "run"
    args = ["finetune", "--task", "image-text-to-text", "--model", str(vlm_dirs["idefics3"]), "--data", str(train),
            "--test-data", str(test), "--output", str(out), *SMALL[4:]]
    assert cli.main(args) == 0
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "model" / "model.safetensors").exists()
    assert not (out / "data").exists()  # the demo data is written only when no --data is given
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["lora"] is True and summary["config"]["epochs"] == 1  # the usual defaults


def test_options_left_out_follow_the_demo_recipe_only_for_the_demo_model():
    assert (vlm_config().lora, vlm_config().epochs, vlm_config().lr) == (False, 6, 3e-3)
    assert vlm_config(epochs=2, lr=None).epochs == 2
    real = vlm_config(model="some/vlm")
    assert (real.lora, real.epochs, real.lr) == (True, 1, None)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: (d / "img.png").unlink(), "data.jsonl:1: image file not found"),
        (lambda d: (d / "data.jsonl").write_text(
            '{"images": [], "messages": [{"role": "user", "content": [{"type": "image"}]}, '
            '{"role": "assistant", "content": "red"}]}\n'), "1 image placeholder(s) without their own image"),
    ],
)
def test_bad_data_is_reported_before_loading(vlm_dirs, tmp_path, capsys, setup, message):

    square().save(tmp_path / "img.png")
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img.png"}]},
                           {"role": "assistant", "content": "red"}]}
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    setup(tmp_path)
    args = ["finetune", "--task", "image-text-to-text", "--model", str(vlm_dirs["llava"]),
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
