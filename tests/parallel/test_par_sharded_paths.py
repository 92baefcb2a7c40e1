"""The sharded paths on 2 CPU processes (gloo) equal one process: the loss without full logits under FSDP2, tensor
and sequence parallelism (the head split over the vocabulary), 4-bit QLoRA under FSDP2 (the 4-bit base replicated,
the adapter and its optimizer state sharded) and LoRA with tensor parallelism. One ``torchrun`` runs every job of
``sharded_worker.py`` (through ``par_common.torchrun``); the single-process references run here.

References: full fine-tuning is compared with one process computing the loss from full logits (an independent
path); QLoRA and LoRA with one process of the same adapter. Losses and first-step gradients at 1e-5; weights after
3 AdamW steps (lr 1e-2) at 1e-4 (Adam divides by the gradients' running RMS, so float rounding of 1e-7 in a
near-zero gradient moves a weight by up to ~1e-5; a wrong gradient moves it by ~1e-2).
"""

from unittest import mock

import par_common
import pytest
import torch
from par_common import HERE, torchrun
from sharded_worker import run_job

from hfbridge import LoRA
from hfbridge.parallel import plans
from hfbridge.parallel.mesh import MeshLayout
from hfbridge.parallel.parallelize import UnsupportedParallelismError, check_supported
from hfbridge.testing import tiny_llama_config

ATOL = 1e-5
WEIGHT_ATOL = 1e-4


def _tag(job: str) -> str:
    return job.replace("/", "_").replace("|", "+")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("sharded-2")
    m = str(tiny_model_dir)
    jobs = {
        "chunked loss, fsdp=2": f"{m}|1,2,1,1|",
        "chunked loss, tp=2 (vocabulary-split head)": f"{m}|1,1,2,1|",
        "chunked loss, sp=2": f"{m}|1,1,1,2|",
        "qlora, fsdp=2": f"{m}|1,2,1,1|qlora",
        "lora, tp=2": f"{m}|1,1,2,1|lora",
    }
    with mock.patch.object(par_common, "WORKER", HERE / "sharded_worker.py"):
        torchrun(2, str(out), "vocab", *jobs.values(), timeout=420)
    results = {name: torch.load(out / f"result-{_tag(job)}.pt") for name, job in jobs.items()}
    return results, torch.load(out / "result-vocab.pt"), m


@pytest.fixture(scope="module")
def references(runs):
    _, _, m = runs
    return {flags: run_job(f"{m}||{flags}") for flags in ("full-logits", "qlora", "lora")}


def _same(result, ref, name):
    assert len(result["losses"]) == len(ref["losses"]) == 3, name
    assert result["losses"] == pytest.approx(ref["losses"], abs=ATOL), name
    assert all(loss > 0.5 for loss in result["losses"]), name  # a real cross entropy, not a zeroed one
    assert result["grads"].keys() == ref["grads"].keys() and result["grads"], name
    for param, grad in ref["grads"].items():
        assert not torch.isnan(result["grads"][param]).any(), (name, param)
        assert torch.allclose(result["grads"][param], grad, atol=ATOL, rtol=0), (name, param)
    assert result["weights"].keys() == ref["weights"].keys(), name
    for param, weight in ref["weights"].items():
        assert torch.allclose(result["weights"][param], weight, atol=WEIGHT_ATOL, rtol=0), (name, param)
        moved = float((result["weights"][param] - result["initial"][param]).abs().max())
        assert moved > 10 * WEIGHT_ATOL, (name, param, moved)  # every trained weight was trained


def test_the_chunked_loss_runs_on_fsdp_tp_and_sp_meshes_and_equals_full_logits_on_one_process(runs, references):
    results, _, _ = runs
    ref = references["full-logits"]
    assert not ref["chunked"]
    for name in ("chunked loss, fsdp=2", "chunked loss, tp=2 (vocabulary-split head)", "chunked loss, sp=2"):
        assert results[name]["chunked"], name  # the loss ran without full logits on the mesh
        _same(results[name], ref, name)
    tp = results["chunked loss, tp=2 (vocabulary-split head)"]["placements"]
    assert tp["lm_head.weight"].endswith("Shard(dim=0))"), tp["lm_head.weight"]  # the head stayed split


def test_the_vocabulary_parallel_cross_entropy_equals_the_full_head(runs):
    _, vocab, _ = runs
    assert vocab["vocab_split"]
    assert vocab["loss"] == pytest.approx(vocab["ref"], abs=1e-6)
    assert max(vocab["grad_h"], vocab["grad_w"], vocab["grad_b"]) < 1e-6, vocab


def test_qlora_on_fsdp2_equals_one_process_with_the_base_replicated_and_the_adapter_sharded(runs, references):
    results, _, _ = runs
    result, ref = results["qlora, fsdp=2"], references["qlora"]
    _same(result, ref, "qlora")
    assert result["chunked"] and ref["chunked"]
    assert result["packed_4bit"] == ref["packed_4bit"] == 14  # 7 linear layers x 2 blocks stay 4-bit
    lora_b = [g for n, g in result["grads"].items() if "lora_B" in n]
    assert lora_b and all(g.abs().max() > 1e-5 for g in lora_b)  # lora_A's first gradient is 0: B starts at 0
    total = sum(w.numel() for w in ref["weights"].values())
    assert result["local_trainable"] == total // 2  # each rank holds half the adapter ...
    assert result["local_optimizer_state"] == 2 * total // 2  # ... and half of AdamW's two moments


def test_lora_with_tensor_parallelism_equals_one_process(runs, references):
    results, _, _ = runs
    result = results["lora, tp=2"]
    _same(result, references["lora"], "lora + tp")
    placements = result["placements"]
    layer = "base_model.model.model.layers.0."
    assert placements[layer + "self_attn.q_proj.base_layer.weight"].endswith("Shard(dim=0))")  # column-wise
    assert placements[layer + "self_attn.q_proj.lora_B.default.weight"].endswith("Shard(dim=0))")
    assert placements[layer + "self_attn.q_proj.lora_A.default.weight"] == "(Shard(dim=0),)"  # FSDP only
    assert placements[layer + "mlp.down_proj.base_layer.weight"].endswith("Shard(dim=1))")  # row-wise
    assert placements[layer + "mlp.down_proj.lora_A.default.weight"].endswith("Shard(dim=1))")
    assert placements[layer + "mlp.down_proj.lora_B.default.weight"] == "(Shard(dim=0),)"


def test_the_reference_can_fail(references):
    """The references differ visibly from each other: a path that dropped the adapter or the loss would not pass."""
    full, lora = references["full-logits"], references["lora"]
    assert full["losses"][1] != pytest.approx(lora["losses"][1], abs=100 * ATOL)
    assert references["qlora"]["losses"][0] != pytest.approx(lora["losses"][0], abs=10 * ATOL)  # 4-bit rounding


# ------------------------------------------------------------------------------------------------ refusals, plans
def _meta_model():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_llama_config(512))


def _layout(tp=1, sp=1, fsdp=2):
    return MeshLayout(mesh=None, data=None, data_flat=None, model=object() if tp * sp > 1 else None,
                      sizes={"dp": 1, "fsdp": fsdp, "tp": tp, "sp": sp})


def test_what_is_not_supported_is_refused_with_the_reason():
    model = _meta_model()
    model.is_loaded_in_4bit = True
    with pytest.raises(UnsupportedParallelismError, match="trains an adapter"):
        check_supported(model, _layout())
    adapted = LoRA(r=2, alpha=4)(model)
    check_supported(adapted, _layout())  # QLoRA over fsdp
    with pytest.raises(UnsupportedParallelismError, match="4-bit weights with tensor/sequence parallelism.*quant_state"):
        check_supported(adapted, _layout(tp=2, fsdp=1))
    eight = _meta_model()
    eight.is_loaded_in_8bit = True
    with pytest.raises(UnsupportedParallelismError, match="8-bit"):
        check_supported(LoRA(r=2, alpha=4)(eight), _layout())
    lora = LoRA(r=2, alpha=4)(_meta_model())
    check_supported(lora, _layout(tp=2, fsdp=1))  # LoRA + tp
    with pytest.raises(UnsupportedParallelismError, match=r"sequence parallelism \(sp > 1\) with an adapter"):
        check_supported(lora, _layout(sp=2, fsdp=1))


def test_the_plan_splits_lora_layers_like_their_base_and_refuses_other_adapters():
    from peft import get_peft_model

    lora = LoRA(r=2, alpha=4, dropout=0.0)(_meta_model()).get_base_model()
    plan = plans.adapter_plan(lora, plans.resolve_plan(lora)[0])
    assert plan["model.layers.0.self_attn.q_proj.base_layer"] == "colwise"
    assert plan["model.layers.0.self_attn.q_proj.lora_B.default"] == "colwise"
    assert "model.layers.0.self_attn.q_proj.lora_A.default" not in plan
    assert plan["model.layers.1.mlp.down_proj.base_layer"] == "rowwise"
    assert plan["model.layers.1.mlp.down_proj.lora_A.default"] == "rowwise"
    assert "model.layers.1.mlp.down_proj.lora_B.default" not in plan
    assert plan["lm_head"] == "colwise_gather_output"
    rules = [(r"(q|k|v|gate|up)_proj\.weight$", "colwise"), (r"(o|down)_proj\.weight$", "rowwise"),
             (r"lm_head", "colwise"), (r"embed_tokens", "rowwise"), (r"norm", "replicate")]
    assert plans.adapter_plan(lora, plans.plan_from_rules(lora, rules)) == plan  # rules name the layers as before
    dropout = LoRA(r=2, alpha=4, dropout=0.1)(_meta_model()).get_base_model()
    with pytest.raises(plans.PlanError, match="LoRA dropout on 'model.layers.0.self_attn.q_proj'.*dropout=0.0"):
        plans.adapter_plan(dropout, plans.resolve_plan(dropout)[0])
    dora = LoRA(r=2, alpha=4, dropout=0.0, adapter_type="dora")(_meta_model()).get_base_model()
    with pytest.raises(plans.PlanError, match="DoRA"):
        plans.adapter_plan(dora, plans.resolve_plan(dora)[0])
    ia3 = LoRA(adapter_type="ia3")(_meta_model()).get_base_model()
    with pytest.raises(plans.PlanError, match="LoRA layers only"):
        plans.adapter_plan(ia3, plans.resolve_plan(ia3)[0])
    import peft

    head = get_peft_model(_meta_model(), peft.LoraConfig(r=2, target_modules=["lm_head"])).get_base_model()
    with pytest.raises(plans.PlanError, match="'lm_head'.*colwise_gather_output"):
        plans.adapter_plan(head, plans.resolve_plan(head)[0])
