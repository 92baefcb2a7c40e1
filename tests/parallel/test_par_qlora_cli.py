"""``hfbridge finetune --load-in-4bit`` (QLoRA) on 2 CPU processes (gloo, fsdp=2) trains, scores and saves the
adapter, and that adapter equals the one a one-process run of the same config saves (same keys, atol 1e-5).

The gathered model is rebuilt on rank 0 from the 4-bit model itself (``parallel/export.py: gather_plain_model``).
The saved adapter is then loaded with peft onto the float base and onto the 4-bit base, and checked against a hand
computation: ``W + alpha/r * B @ A`` written into a plain model (the 4-bit weights dequantized by bitsandbytes).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hfbridge import cli
from hfbridge.data.demo import write_demo_data

ATOL = 1e-5
OLD_REFUSAL = "not rebuilt from 4-bit weights yet"
PROBE = torch.tensor([[5, 17, 42, 9, 77, 3, 120], [8, 8, 31, 64, 2, 99, 15]])


def _finetune(model_dir, data, out, *extra):
    train, test = data
    cmd = [sys.executable, "-m", "hfbridge", "finetune", "--model", str(model_dir), "--data", str(train),
           "--test-data", str(test), "--output", str(out), "--max-steps", "2", "--load-in-4bit",
           "--lora-dropout", "0", "--packing", "off", "--max-new-tokens", "4", "--no-progress-bar", "--lr", "1e-3",
           *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The same QLoRA config (global batch 4, 2 steps): one process, and 2 processes over fsdp=2 (2 rows each)."""
    pytest.importorskip("bitsandbytes")
    tmp = tmp_path_factory.mktemp("qlora-cli")
    data = write_demo_data(tmp / "data", n_train=16, n_test=2)
    one = _finetune(tiny_model_dir, data, tmp / "one", "--batch-size", "4")
    two = _finetune(tiny_model_dir, data, tmp / "two", "--batch-size", "2", "--nproc-per-node", "2",
                    "--sharding-axis-dims", "1,2,1,1")
    return {"one": (tmp / "one", one), "two": (tmp / "two", two)}


def test_two_process_qlora_saves_the_adapter_one_process_saves(runs):
    (one, _), (two, result) = runs["one"], runs["two"]
    assert "starting 2 processes" in result.stdout and "{'dp': 1, 'fsdp': 2" in result.stdout + result.stderr
    assert OLD_REFUSAL not in result.stdout + result.stderr
    assert result.stdout.count("exact match after fine-tuning") == 1  # scored once, on rank 0's gathered model
    for run in (one, two):
        assert (run / "adapter").is_dir() and not (run / "model").exists()  # 4-bit: the adapter alone
    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (one, two))
    assert sorted(a) == sorted(b) and len(a) == 28  # lora_A and lora_B of 7 linear layers x 2 blocks
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"QLoRA adapter, 2 processes (fsdp=2) against 1: {len(a)} tensors, max difference {diff:.1e}")
    assert diff < ATOL
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 100 * ATOL  # trained (B starts at zero)
    configs = [json.loads((run / "adapter" / "adapter_config.json").read_text()) for run in (one, two)]
    assert [(c["r"], c["lora_alpha"], sorted(c["target_modules"])) for c in configs] == \
        [(configs[0]["r"], configs[0]["lora_alpha"], sorted(configs[0]["target_modules"]))] * 2
    summaries = [json.loads((run / "summary.json").read_text()) for run in (one, two)]
    assert [s["optimizer_steps"] for s in summaries] == [2, 2]
    assert summaries[0]["samples"] == summaries[1]["samples"] and summaries[0]["samples"]  # same greedy answers


def _with_adapter(model, adapter_dir):
    """``model`` (a plain float model) with ``W + alpha/r * B @ A`` written into each adapted layer, by hand."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    with torch.no_grad():
        for key, a in weights.items():
            if ".lora_A." not in key:
                continue
            name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = weights[key.replace(".lora_A.", ".lora_B.")]
            model.get_submodule(name).weight += scale * b @ a
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE).logits.float()


def test_the_saved_adapter_loads_with_peft_on_the_float_and_the_4bit_base(runs, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hfbridge.models import loading

    adapter = runs["two"][0] / "adapter"
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base = _logits(plain)
    peft_float = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                           adapter).eval()
    by_hand = _logits(_with_adapter(plain, adapter))
    assert float((_logits(peft_float) - by_hand).abs().max()) < ATOL
    assert float((by_hand - base).abs().max()) > 100 * ATOL  # the adapter changes the outputs

    import bitsandbytes.functional as bnbf

    quantized = loading.load_pretrained_model(tiny_model_dir, dtype="float32", load_in_4bit=True).eval()
    dequantized = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    packed = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if type(module.weight if hasattr(module, "weight") else None).__name__ == "Params4bit":
                w = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
                dequantized.get_submodule(name).weight.copy_(w)
                packed += 1
    assert packed == 14
    qlora = PeftModel.from_pretrained(quantized, adapter).eval()
    assert float((_logits(qlora) - _logits(_with_adapter(dequantized, adapter))).abs().max()) < ATOL


def _refused(monkeypatch, capsys, tmp_path, tiny_model_dir, *args) -> str:
    """The in-process CLI as one rank under torchrun (WORLD_SIZE 2): refused before anything loads."""
    from hfbridge.models import loading

    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(loading, "load_pretrained_model", lambda *a, **k: pytest.fail("weights were loaded"))
    out = tmp_path / "o"
    assert cli.main(["finetune", "--model", str(tiny_model_dir), "--output", str(out), "--load-in-4bit",
                     "--no-progress-bar", *args]) == 2
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))
    return capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--sharding-axis-dims", "1,1,2,1"], "--load-in-4bit with tensor/sequence parallelism (tp=2, sp=1) is not "
                                          "supported: bitsandbytes packs each 4-bit weight"),
    (["--sharding-axis-dims", "1,1,1,2"], "--load-in-4bit with tensor/sequence parallelism (tp=1, sp=2)"),
    (["--sharding-axis-dims", "1,1,1,1,2"],
     "--load-in-4bit with context parallelism (cp=2) is not supported"),
    (["--method", "dpo"], "--load-in-4bit with several processes trains text fine-tuning (method sft, task "
                          "text-generation), not 'dpo' on 'text-generation'"),
])
def test_wrong_combinations_are_still_refused_before_loading(monkeypatch, capsys, tmp_path, tiny_model_dir, args,
                                                            message):
    err = _refused(monkeypatch, capsys, tmp_path, tiny_model_dir, *args)
    assert err.startswith("hfbridge finetune: error: ") and message in err, err
    assert OLD_REFUSAL not in err


def test_two_process_qlora_resumes_to_the_uninterrupted_adapter(tiny_model_dir, tmp_path):
    """QLoRA over fsdp=2 with sharded checkpoints (the 4-bit base is not in them: only what trains, and the
    optimizer): a run resumed from step 2 of 3 ends with the adapter of the run that was never interrupted."""
    import shutil

    pytest.importorskip("bitsandbytes")
    data = write_demo_data(tmp_path / "data", n_train=16, n_test=2)
    mesh = ("--batch-size", "2", "--nproc-per-node", "2", "--sharding-axis-dims", "1,2,1,1", "--max-steps", "3",
            "--save-every", "2")
    _finetune(tiny_model_dir, data, tmp_path / "whole", *mesh, "--checkpoint-dir", str(tmp_path / "ck"))
    assert sorted(p.name for p in (tmp_path / "ck").glob("step-*")) == ["step-00000002", "step-00000003"]
    from torch.distributed.checkpoint import FileSystemReader

    saved = list(FileSystemReader(str(tmp_path / "ck" / "step-00000002")).read_metadata().state_dict_metadata)
    weights = [k for k in saved if k.startswith("state_dict.")]
    assert len(weights) == 28 and all(".lora_" in k for k in weights)  # the adapter alone, no packed base
    shutil.copytree(tmp_path / "ck", tmp_path / "ck-cut", ignore=shutil.ignore_patterns("step-00000003"))
    resumed = _finetune(tiny_model_dir, data, tmp_path / "resumed", *mesh, "--checkpoint-dir",
                        str(tmp_path / "ck-cut"), "--resume")
    assert "step-00000002" in resumed.stdout + resumed.stderr
    a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("whole", "resumed"))
    assert sorted(a) == sorted(b) and len(a) == 28
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"QLoRA over fsdp=2, resumed from step 2 of 3 against uninterrupted: max adapter difference {diff:.1e}")
    assert diff < ATOL
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["optimizer_steps"] == 3
