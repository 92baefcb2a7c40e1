"""The run recipe: one sectioned config from YAML, flags and --set, printed, saved and read back."""

import dataclasses
import typing

import pytest
import yaml

from hfbridge import cli
from hfbridge.recipe.config import FLAGS, RunConfig, dump_run_config, resolve_config
from hfbridge.typed_config import ConfigError


def _resolved(capsys, *argv) -> dict:
    assert cli.main(["finetune", "--print-config", *argv]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_every_key_has_a_flag_and_every_flag_a_key():
    keys = {f"{s.name}.{f.name}" for s in dataclasses.fields(RunConfig)
            for f in dataclasses.fields(typing.get_type_hints(RunConfig)[s.name])}
    assert {flag.key for flag in FLAGS} == keys
    assert len({flag.flag for flag in FLAGS}) == len(FLAGS)  # no flag names two keys


def test_file_then_flags_then_set(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {lr: 1.0e-3, schedule: linear}\ntrain: {batch_size: 4, epochs: 3}\n"
                      "peft: {target_modules: [q_proj, v_proj]}\n")
    cfg = _resolved(capsys, "--config", str(recipe), "--batch-size", "2", "--set", "train.epochs=5",
                    "--sharding-axis-dims", "1,-1,1,1")
    assert cfg["optim"] == {**cfg["optim"], "lr": 1e-3, "schedule": "linear"}  # the file
    assert cfg["train"]["batch_size"] == 2 and cfg["train"]["epochs"] == 5  # a flag, then --set, win
    assert cfg["peft"]["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["parallel"]["sharding_axis_dims"] == [1, -1, 1, 1]
    assert cfg["model"]["name"] == "smollm2-135m-instruct"  # the text task's default model, filled in


def test_old_flags_keep_their_meaning(capsys):
    cfg = _resolved(capsys, "--full", "--no-progress-bar", "--lora-targets", "q_proj,v_proj", "--max-steps", "3",
                    "--activation-checkpointing", "--overwrite", "--data", "d.jsonl", "--val-data", "v.jsonl")
    assert cfg["peft"]["type"] == "none" and cfg["train"]["progress_bar"] is False
    assert cfg["peft"]["target_modules"] == ["q_proj", "v_proj"] and cfg["train"]["max_steps"] == 3
    assert cfg["speed"]["activation_checkpointing"] == "full" and cfg["output"]["overwrite"] is True
    assert (cfg["data"]["train"], cfg["data"]["validation"]) == ("d.jsonl", "v.jsonl")


def test_the_demo_vlm_recipe_applies_only_to_keys_left_out(capsys):
    demo = _resolved(capsys, "--task", "image-text-to-text")
    assert demo["model"]["name"] == "tiny-random-vlm"
    assert (demo["peft"]["type"], demo["optim"]["lr"], demo["train"]["epochs"]) == ("none", 3e-3, 6)
    chosen = _resolved(capsys, "--task", "image-text-to-text", "--epochs", "2")
    assert chosen["train"]["epochs"] == 2 and chosen["peft"]["type"] == "none"
    real = _resolved(capsys, "--task", "image-text-to-text", "--model", "some/vlm")
    assert (real["peft"]["type"], real["optim"]["lr"], real["train"]["epochs"]) == ("lora", None, 1)


@pytest.mark.parametrize(("argv", "messages"), [
    (["--set", "optim.lrr=1e-3"], ["optim.lrr: unknown key (did you mean 'lr'?)"]),
    (["--set", "trian.epochs=2"], ["trian: unknown key (did you mean 'train'?)"]),
    (["--batch-size", "0", "--packing", "maybe"], ["train.batch_size: must be >= 1, got 0",
                                                   "speed.packing: must be one of auto, on, off, got 'maybe'"]),
    (["--set", "optim.lr"], ["--set 'optim.lr': expected SECTION.KEY=VALUE"]),
    (["--lr", ".nan"], ["optim.lr: must be a finite number"]),
    (["--resume", "--save-every", "5"], ["checkpoint.resume: needs checkpoint.dir",
                                         "checkpoint.save_every: needs checkpoint.dir"]),
    (["--max-length", "512", "--pack-length", "256"], ["speed.pack_length: must be >= data.max_length (512)"]),
    (["--sharding-axis-dims", "1,-1,-1,1"], ["parallel.sharding_axis_dims: must be four sizes"]),
    (["--activation-checkpointing", "sometimes"], ["speed.activation_checkpointing: must be false, true"]),
    (["--load-in-4bit", "--full"], ["quantization.load_in_4bit: 4-bit weights cannot be trained in full"]),
    (["--max-steps", "-5"], ["train.max_steps: must be >= 1, got -5"]),
    (["--max-new-tokens", "0", "--eval-samples", "-1"], ["eval.max_new_tokens: must be >= 1, got 0",
                                                         "eval.samples: must be >= 1, got -1"]),
])
def test_bad_values_are_reported_with_their_key(argv, messages, capsys):
    assert cli.main(["finetune", "--print-config", *argv]) == 2
    err = capsys.readouterr().err
    for message in messages:
        assert message in err


def test_a_bad_file_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    assert cli.main(["finetune", "--config", str(bad), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert f"invalid config {bad}" in err and "not valid YAML" in err
    bad.write_text("optim:\n  learning_rate: 1e-3\n")
    assert cli.main(["finetune", "--config", str(bad), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "optim.learning_rate: unknown key" in err
    assert cli.main(["finetune", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_a_saved_config_resolves_to_the_same_run(tmp_path):
    cfg = resolve_config(None, {"optim": {"lr": 3e-4}, "speed": {"activation_checkpointing": "selective"},
                                "parallel": {"sharding_axis_dims": [1, -1, 1, 1]}, "data": {"train": "x.jsonl"}})
    saved = dump_run_config(cfg, tmp_path / "config.yaml")
    assert resolve_config(saved) == cfg
    with pytest.raises(ConfigError):
        resolve_config(None, {"optim": {"schedule": "exp"}})


def test_the_docs_list_every_key_and_the_example_recipes_resolve():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    docs = (root / "docs" / "recipes.md").read_text()
    missing = [f.key for f in FLAGS if f"`{f.key}` | `{f.flag}`" not in docs]
    assert not missing, f"docs/recipes.md lacks {missing}"
    recipes = sorted((root / "examples").glob("recipe_*.yaml"))
    assert len(recipes) >= 3
    for recipe in recipes:
        resolve_config(recipe)
