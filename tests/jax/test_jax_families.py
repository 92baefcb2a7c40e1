"""Gemma 1/2/3, Phi-3, GPT-2, Mixtral and Qwen3-MoE against transformers (fp32 logits, atol 1e-4), their export
back to a Hugging Face folder, MoE experts sharded over tp or an expert axis, and index-sharded MoE checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from jax.sharding import PartitionSpec as P  # noqa: E402
from jax_helpers import MORE_FAMILIES  # noqa: E402

from hfbridge.jax import AutoJaxModelForCausalLM, UnsupportedArchitectureError  # noqa: E402
from hfbridge.jax import tree as tree_lib  # noqa: E402

ATOL = 1e-4


@pytest.mark.parametrize("name", sorted(MORE_FAMILIES))
def test_logits_match_transformers_and_export_roundtrips(name, jax_model_dir, hf_logits, ids, tmp_path):
    folder = jax_model_dir(name)
    module, params = AutoJaxModelForCausalLM.from_pretrained(folder)
    assert module.config.model_type == name
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    ours = np.asarray(module(params, ids, mask))
    ref = hf_logits(folder, ids, attention_mask=mask)
    np.testing.assert_allclose(ours[0], ref[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(ours[1, 2:], ref[1, 2:], atol=ATOL, rtol=0)
    # back to a Hugging Face folder (fused / stacked / tied layouts restored): transformers gives the same logits
    out = module.save_pretrained(tmp_path / "hf", params, format="hf")
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    np.testing.assert_allclose(hf_logits(out, ids, attention_mask=mask), ref, atol=1e-6, rtol=0)


def test_family_features_are_exercised(jax_model_dir):
    def config(name):
        return AutoJaxModelForCausalLM.from_pretrained(jax_model_dir(name))[0].config

    g2 = config("gemma2")
    assert g2.sandwich_norms and g2.attn_softcap == 3.0 and g2.final_softcap == 2.0 and g2.norm_offset == 1.0
    assert g2.layer_windows == (4, None) and g2.attn_scale == pytest.approx(24**-0.5)
    g3 = config("gemma3_text")
    assert g3.qk_norm and g3.local_rope.theta == 1e4 and g3.rope_type == "linear" and g3.layer_windows == (4, None)
    assert config("phi3").rotary_dim == 8
    q = config("qwen3_moe")
    assert q.moe_layers == (True, False) and not q.norm_topk_prob
    _, params = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("mixtral"))
    assert params["model"]["layers"]["0"]["block_sparse_moe"]["experts"]["w1"]["kernel"].shape == (4, 64, 128)
    _, params = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("phi3"))
    assert {"q_proj", "k_proj", "v_proj"} <= set(params["model"]["layers"]["0"]["self_attn"])


@pytest.mark.parametrize(
    ("dims", "names", "rules", "expert_spec"),
    [
        ((1, 2, 4, 1), ("dp", "fsdp", "tp", "sp"), None, P("tp", ("fsdp", "sp"))),  # experts over tp
        ((1, 2, 1, 1, 4), ("dp", "fsdp", "tp", "sp", "ep"),
         ((r"experts/(w1|w3)/kernel$", P("ep", "fsdp")), (r"experts/w2/kernel$", P("ep", None, "fsdp"))), P("ep", "fsdp")),
    ],
)
def test_moe_experts_shard_over_tp_or_an_expert_axis(dims, names, rules, expert_spec, jax_model_dir, hf_logits, ids):
    from hfbridge.jax.rules import DEFAULT_PARTITION_RULES

    folder = jax_model_dir("mixtral")
    full_rules = None if rules is None else rules + DEFAULT_PARTITION_RULES["mixtral"]
    module, params = AutoJaxModelForCausalLM.from_pretrained(
        folder, sharding_axis_dims=dims, sharding_axis_names=names, auto_shard_params=True, partition_rules=full_rules
    )
    w1 = params["model"]["layers"]["0"]["block_sparse_moe"]["experts"]["w1"]["kernel"]
    assert w1.sharding.spec == expert_spec
    assert w1.addressable_shards[0].data.shape == (1, 32, 128)  # one whole expert (half its rows) per device
    np.testing.assert_allclose(np.asarray(module(params, ids)), hf_logits(folder, ids), atol=ATOL, rtol=0)


def test_moe_index_sharded_checkpoint_streams(tmp_path, jax_model_dir, hf_logits, ids):
    """Experts spread over several files (with an index) are stacked as they arrive."""
    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(jax_model_dir("qwen3_moe"), dtype=torch.float32).save_pretrained(
        tmp_path, max_shard_size="60KB"
    )
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({index[k] for k in index if ".experts." in k}) > 1
    module, params = AutoJaxModelForCausalLM.from_pretrained(tmp_path)
    np.testing.assert_allclose(np.asarray(module(params, ids)), hf_logits(tmp_path, ids), atol=ATOL, rtol=0)


def test_refused_features_say_what(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("phi3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, pad_token_id=0, original_max_position_embeddings=32,
                         max_position_embeddings=64,
                         rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                          "long_factor": [1.0] * 8}).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="longrope"):
        AutoJaxModelForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"\.bin"):
        AutoJaxModelForCausalLM.from_pretrained(tmp_path)


def test_export_refuses_a_folder_hfbridge_did_not_write(jax_model_dir, tmp_path):
    from hfbridge.io import OutputExistsError

    module, params = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("gpt2"))
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        module.save_pretrained(tmp_path, params, format="hf")
    with pytest.raises(OutputExistsError, match="not written by hfbridge"):
        module.save_pretrained(tmp_path, params, format="hf", overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="format"):
        module.save_pretrained(tmp_path / "x", params, format="onnx")
    assert set(tree_lib.flatten(params)) >= {"transformer/wte/embedding", "transformer/h/0/attn/c_attn/kernel"}
