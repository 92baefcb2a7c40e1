"""Mesh construction, partition rules, shard functions and sharded forwards on 8 virtual CPU devices."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from hfbridge.jax import AutoJaxModelForCausalLM, PartitionAxis, UnmatchedParameterError, create_mesh  # noqa: E402
from hfbridge.jax import tree as tree_lib  # noqa: E402
from hfbridge.jax.rules import LLAMA_PARTITION_RULES, find_spec, fit_spec, match_partition_rules  # noqa: E402


@pytest.fixture(scope="module")
def batch_ids():
    return np.random.default_rng(1).integers(0, 500, size=(8, 16)).astype(np.int32)


@pytest.fixture(scope="module")
def unsharded(jax_model_dir, batch_ids):
    module, params = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("qwen2"))
    return params, np.asarray(module(params, batch_ids))


def test_eight_host_devices():
    assert len(jax.devices("cpu")) == 8, "tests/jax/conftest.py must set XLA_FLAGS before jax starts"


@pytest.mark.parametrize(
    ("dims", "expected"),
    [((1, -1, 1, 1), (1, 8, 1, 1)), ((2, -1, 2, 1), (2, 2, 2, 1)), ((1, 1, 1, -1), (1, 1, 1, 8)), ((2, 2, 2, 1), (2, 2, 2, 1))],
)
def test_mesh_infers_one_dim(dims, expected):
    mesh = create_mesh(dims)
    assert tuple(mesh.shape.values()) == expected
    assert tuple(mesh.shape) == ("dp", "fsdp", "tp", "sp")


@pytest.mark.parametrize(
    ("dims", "words"),
    [
        ((1, -1, -1, 1), ["at most one -1"]),
        ((2, 2, 1, 1), ["(2, 2, 1, 1)", "4", "8 devices"]),
        ((3, -1, 1, 1), ["(3, -1, 1, 1)", "3", "8"]),
        ((1, 8, 1), ["differ in length"]),
    ],
)
def test_mesh_errors_name_dims_and_device_count(dims, words):
    with pytest.raises(ValueError) as err:
        create_mesh(dims)
    for word in words:
        assert word in str(err.value)


def test_first_matching_rule_wins():
    params = {"model": {"layers": {"0": {"self_attn": {"q_proj": {"kernel": np.zeros((4, 4))}}}}}}
    path = "model/layers/0/self_attn/q_proj/kernel"
    specific_first = [(r"q_proj/kernel$", P("tp")), (r".*", P())]
    generic_first = [(r".*", P()), (r"q_proj/kernel$", P("tp"))]
    assert tree_lib.flatten(match_partition_rules(specific_first, params))[path] == P("tp")
    assert tree_lib.flatten(match_partition_rules(generic_first, params))[path] == P()


def test_unmatched_parameter_is_named(jax_model_dir):
    rules = [(r"_proj/kernel$", P("fsdp")), (r"norm/scale$", P())]
    with pytest.raises(UnmatchedParameterError, match="model/embed_tokens/embedding"):
        AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("qwen2"), auto_shard_params=True, partition_rules=rules)


def test_fit_spec_keeps_dividing_axes_only():
    mesh = create_mesh((1, 4, 2, 1))
    assert fit_spec(P(("fsdp", "tp"), None), (16, 3), mesh) == P(("fsdp", "tp"))
    assert fit_spec(P(("fsdp", "tp"), "tp"), (12, 3), mesh) == P("fsdp")  # 12 % 8 != 0, 3 % 2 != 0
    assert fit_spec(P("tp", "fsdp"), (6,), mesh) == P("tp")


@pytest.mark.parametrize("dims", [(1, -1, 1, 1), (2, 2, 2, 1), (1, 2, 4, 1), (2, 1, 2, 2)])
def test_auto_shard_params_and_sharded_forward(dims, jax_model_dir, unsharded, batch_ids):
    params0, logits0 = unsharded
    module, params = AutoJaxModelForCausalLM.from_pretrained(
        jax_model_dir("qwen2"), sharding_axis_dims=dims, auto_shard_params=True
    )
    mesh = module.mesh
    assert mesh is not None and mesh.devices.size == 8
    for path, leaf in tree_lib.flatten(params).items():
        want = fit_spec(find_spec(path, LLAMA_PARTITION_RULES), leaf.shape, mesh)
        assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh, path
        assert leaf.sharding.spec == want, (path, leaf.sharding.spec, want)
    # concrete shard shapes: q_proj kernel (64, 64) split over fsdp*sp rows and tp columns
    q = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    rows = mesh.shape["fsdp"] * mesh.shape["sp"]
    assert q.addressable_shards[0].data.shape == (64 // rows, 64 // mesh.shape["tp"])
    np.testing.assert_array_equal(np.asarray(q), np.asarray(params0["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]))
    logits = module(params, batch_ids)
    np.testing.assert_allclose(np.asarray(logits), logits0, atol=1e-5, rtol=0)


def test_custom_shard_fns(jax_model_dir, unsharded, batch_ids):
    _, logits0 = unsharded
    mesh = create_mesh((1, 2, 4, 1))
    emb_sharding = NamedSharding(mesh, P(None, "tp"))
    fns = {"model": {"embed_tokens": {"embedding": lambda x: jax.device_put(x, emb_sharding)}}}  # nested form
    module, params = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("qwen2"), sharding_axis_dims=(1, 2, 4, 1), shard_fns=fns)
    assert params["model"]["embed_tokens"]["embedding"].sharding.spec == P(None, "tp")
    norm = params["model"]["norm"]["scale"]
    assert norm.sharding.spec == P() and len(norm.sharding.device_set) == 8  # the rest replicated on the mesh
    assert module.mesh is not None
    np.testing.assert_allclose(np.asarray(module(params, batch_ids)), logits0, atol=1e-5, rtol=0)


def test_shard_fns_take_precedence_over_rules(jax_model_dir):
    mesh = create_mesh((1, 8, 1, 1))
    path = "model/layers/1/mlp/down_proj/kernel"
    fns = {path: lambda x: jax.device_put(x, NamedSharding(mesh, P()))}
    _, params = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("qwen2"), auto_shard_params=True, shard_fns=fns)
    flat = tree_lib.flatten(params)
    assert flat[path].sharding.spec == P()
    assert flat["model/layers/0/mlp/down_proj/kernel"].sharding.spec == P("tp", ("fsdp", "sp"))


def test_shard_fns_unknown_path(jax_model_dir):
    with pytest.raises(ValueError, match="model/nope/kernel"):
        AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("qwen2"), shard_fns={"model/nope/kernel": lambda x: x})


def test_device_argument_without_sharding(jax_model_dir):
    device = jax.devices("cpu")[3]
    module, params = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("qwen2"), device=device)
    assert module.mesh is None
    assert all(leaf.devices() == {device} for leaf in jax.tree.leaves(params))
    default_module, default_params = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("qwen2"))
    assert all(leaf.devices() == {jax.devices("cpu")[0]} for leaf in jax.tree.leaves(default_params))


def test_backend_argument(jax_model_dir):
    module, _ = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("qwen2"), backend="cpu", auto_shard_params=True)
    assert {d.platform for d in module.mesh.devices.flat} == {"cpu"}
    with pytest.raises(ValueError, match="tpu"):
        AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("qwen2"), backend="tpu")


def _constraint_specs(module, params, ids):
    jaxpr = jax.make_jaxpr(module.apply)(params, ids)
    return [e.params["sharding"].spec for e in jaxpr.jaxpr.eqns if e.primitive.name == "sharding_constraint"]


def test_shard_attention_computation_and_partition_axis(jax_model_dir, unsharded, batch_ids):
    _, logits0 = unsharded
    folder = jax_model_dir("qwen2")
    kwargs = dict(sharding_axis_dims=(2, 1, 4, 1), auto_shard_params=True)
    on, params = AutoJaxModelForCausalLM.from_pretrained(folder, **kwargs)
    specs = _constraint_specs(on, params, batch_ids)
    assert len(specs) == 5 * on.config.num_hidden_layers  # q, k, v, scores, output per layer
    assert P(("dp", "fsdp"), None, "tp") in specs  # heads over tp, batch over dp*fsdp
    off, _ = AutoJaxModelForCausalLM.from_pretrained(folder, shard_attention_computation=False, **kwargs)
    assert _constraint_specs(off, params, batch_ids) == []
    axis = PartitionAxis(batch_axis="dp", sequence_axis=None, head_axis=None)
    custom, _ = AutoJaxModelForCausalLM.from_pretrained(folder, partition_axis=axis, **kwargs)
    assert custom.partition_axis == axis
    assert all(spec == P("dp") for spec in _constraint_specs(custom, params, batch_ids))
    for module in (on, custom):
        np.testing.assert_allclose(np.asarray(module(params, batch_ids)), logits0, atol=1e-5, rtol=0)
