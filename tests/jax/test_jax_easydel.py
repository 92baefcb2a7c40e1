"""EasyDeL's argument semantics: tuple-keyed shard_fns, custom axis names through the default rules, the
PartitionAxis fields (generation axes, hidden-state axis); and the export's one-tensor-at-a-time gathering."""

from __future__ import annotations

import weakref

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from hfbridge.jax import AutoJaxModelForCausalLM, PartitionAxis, create_mesh  # noqa: E402
from hfbridge.jax import tree as tree_lib  # noqa: E402


def test_shard_fns_in_easydels_tuple_form(jax_model_dir):
    mesh = create_mesh((1, 8, 1, 1))
    put = lambda spec: lambda x: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    fns = {
        ("params", "model", "embed_tokens", "embedding"): put(P(None, "fsdp")),  # flatten_dict of {"params": ...}
        ("model", "norm", "scale"): put(P("fsdp")),
        "model.layers.0.mlp.up_proj.kernel": put(P("fsdp")),  # flatten_dict(sep=".")
    }
    _, params = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("qwen2"), shard_fns=fns, auto_shard_params=True)
    flat = tree_lib.flatten(params)
    assert flat["model/embed_tokens/embedding"].sharding.spec == P(None, "fsdp")
    assert flat["model/norm/scale"].sharding.spec == P("fsdp")
    assert flat["model/layers/0/mlp/up_proj/kernel"].sharding.spec == P("fsdp")
    assert flat["model/layers/1/mlp/up_proj/kernel"].sharding.spec == P(("fsdp", "sp"), "tp")  # the rules for the rest
    with pytest.raises(ValueError, match="model/nope"):
        AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("qwen2"), shard_fns={("model", "nope"): put(P())})


def test_custom_axis_names_carry_through_the_default_rules(jax_model_dir, hf_logits, ids):
    folder = jax_model_dir("qwen2")
    names = ("data", "fully", "model", "seq")
    module, params = AutoJaxModelForCausalLM.from_pretrained(
        folder, sharding_axis_dims=(2, 1, 2, 2), sharding_axis_names=names, auto_shard_params=True
    )
    assert tuple(module.mesh.axis_names) == names
    q = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P(("fully", "seq"), "model")
    assert module.partition_axis.batch_axis == ("data", "fully") and module.partition_axis.head_axis == "model"
    np.testing.assert_allclose(np.asarray(module(params, ids)), hf_logits(folder, ids), atol=1e-4, rtol=0)


def _constraints(fn, *args):
    return [e.params["sharding"].spec for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if e.primitive.name == "sharding_constraint"]


def test_partition_axis_generation_and_hidden_state_fields(jax_model_dir):
    axis = PartitionAxis(head_axis="tp", generation_head_axis=None, generation_key_sequence_axis="sp",
                         hidden_state_axis="tp")
    module, params = AutoJaxModelForCausalLM.from_pretrained(
        jax_model_dir("llama"), sharding_axis_dims=(1, 2, 2, 2), auto_shard_params=True, partition_axis=axis
    )
    n = module.config.num_hidden_layers
    ids = np.zeros((2, 4), np.int32)
    prefill = _constraints(module.apply, params, ids)
    assert P(("dp", "fsdp"), "sp", "tp") in prefill  # queries: heads over tp, and the residual stream's hidden dim
    assert len(prefill) == 5 * n + (n + 1)  # attention (5 per layer) + the hidden state after embedding and each layer
    cache = module.init_cache(2, 8)
    valid = np.ones((2, 8), bool)
    decode = _constraints(lambda p, c: module.forward(p, ids[:, :1], ids[:, :1], valid, c, 4)[0], params, cache)
    batch = ("dp", "fsdp")
    # after the embedding's hidden-state constraint: q (no axis for one query, heads not split), k and v (the
    # cache's sequence over the generation key-sequence axis)
    assert decode[1:4] == [P(batch), P(batch, "sp"), P(batch, "sp")]
    assert prefill[1:4] == [P(batch, "sp", "tp"), P(batch, None, "tp"), P(batch, None, "tp")]


def test_hf_export_gathers_one_tensor_at_a_time(jax_model_dir, monkeypatch):
    from hfbridge.jax import export

    module, params = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("phi3"), auto_shard_params=True)
    tensors = export.hf_tensors(module, params)
    assert all(isinstance(t, export.LazyTensor) for t in tensors.values())  # nothing computed yet
    assert "model.layers.0.self_attn.qkv_proj.weight" in tensors and "model.layers.0.mlp.gate_up_proj.weight" in tensors
    alive: list = []
    peak = [0]
    real_host = export._host

    def spy(leaf):
        value = real_host(leaf)
        alive.append(weakref.ref(value))
        peak[0] = max(peak[0], sum(r() is not None for r in alive))
        return value

    monkeypatch.setattr(export, "_host", spy)
    import tempfile

    from hfbridge.jax.st_io import save_tensors

    with tempfile.TemporaryDirectory() as tmp:
        save_tensors(f"{tmp}/m.safetensors", tensors)
    assert len(alive) == len(tree_lib.flatten(params))
    assert peak[0] <= 3  # a fused weight's parts (q, k, v) at most, never the whole model
