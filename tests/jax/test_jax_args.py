"""The remaining ``from_pretrained`` arguments: dtypes, precision, config overrides, input_shape, verbosity,
and the import error without JAX."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from hfbridge.jax import AutoJaxModelForCausalLM  # noqa: E402


def test_import_without_jax_says_how_to_install():
    code = "import sys; sys.modules['jax'] = None\ntry:\n import hfbridge.jax\nexcept ImportError as e:\n print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "hfbridge[jax]"' in out


def test_dtype_and_param_dtype(jax_model_dir, ids):
    folder = jax_model_dir("llama")
    m32, p32 = AutoJaxModelForCausalLM.from_pretrained(folder)
    ref = np.asarray(m32(p32, ids))
    m, p = AutoJaxModelForCausalLM.from_pretrained(folder, dtype="bf16", param_dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(p)} == {jnp.dtype(jnp.bfloat16)}
    logits = m(p, ids)
    assert logits.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(logits, np.float32), ref, atol=0.05)
    m, p = AutoJaxModelForCausalLM.from_pretrained(folder, dtype=jnp.bfloat16)  # bf16 compute, fp32 storage
    assert {leaf.dtype for leaf in jax.tree.leaves(p)} == {jnp.dtype(jnp.float32)}
    assert m.trace(p, ids.shape).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        AutoJaxModelForCausalLM.from_pretrained(folder, dtype="float7")


def _dot_precisions(module, params, ids):
    jaxpr = jax.make_jaxpr(module.apply)(params, ids)
    return {e.params["precision"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"}


def test_precision(jax_model_dir, ids):
    folder = jax_model_dir("llama")
    m, p = AutoJaxModelForCausalLM.from_pretrained(folder)
    assert m.precision == jax.lax.Precision.DEFAULT  # the seed's "fastest"
    assert _dot_precisions(m, p, ids) == {(jax.lax.Precision.DEFAULT,) * 2}
    for value in ("highest", jax.lax.Precision.HIGHEST):
        m, p = AutoJaxModelForCausalLM.from_pretrained(folder, precision=value)
        assert _dot_precisions(m, p, ids) == {(jax.lax.Precision.HIGHEST,) * 2}
    with pytest.raises(ValueError, match="precision"):
        AutoJaxModelForCausalLM.from_pretrained(folder, precision="sloppy")


def test_config_kwargs_and_kwargs_override_config(jax_model_dir, hf_logits, ids):
    folder = jax_model_dir("qwen3")
    ref = hf_logits(folder, ids, rms_norm_eps=0.5)
    m, p = AutoJaxModelForCausalLM.from_pretrained(folder, config_kwargs={"rms_norm_eps": 0.5})
    assert m.config.rms_norm_eps == 0.5
    np.testing.assert_allclose(np.asarray(m(p, ids)), ref, atol=1e-4, rtol=0)
    m, _ = AutoJaxModelForCausalLM.from_pretrained(folder, rms_norm_eps=0.5)  # a config field as a keyword
    assert m.config.rms_norm_eps == 0.5
    with pytest.raises(TypeError, match="not_an_option"):
        AutoJaxModelForCausalLM.from_pretrained(folder, not_an_option=1)


def test_input_shape_is_traced(jax_model_dir):
    folder = jax_model_dir("llama")
    m, p = AutoJaxModelForCausalLM.from_pretrained(folder, input_shape=(4, 32))
    assert m.trace(p, (4, 32)).shape == (4, 32, m.config.vocab_size)
    with pytest.raises(ValueError, match="input_shape"):
        AutoJaxModelForCausalLM.from_pretrained(folder, input_shape=(8,))


def test_verbose_params(jax_model_dir, capsys):
    m, p = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("llama"), verbose_params=True)
    out = capsys.readouterr().out
    assert f"{m.num_params(p):,} parameters" in out and "llama" in out
    AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("llama"))
    assert capsys.readouterr().out == ""


def test_signature_follows_the_seed():
    import inspect

    names = list(inspect.signature(AutoJaxModelForCausalLM.from_pretrained).parameters)
    assert names == [
        "pretrained_model_name_or_path", "device", "dtype", "param_dtype", "precision", "sharding_axis_dims",
        "sharding_axis_names", "partition_axis", "shard_attention_computation", "input_shape", "shard_fns",
        "backend", "config_kwargs", "auto_shard_params", "partition_rules", "load_in_8bit", "bit_targeted_params",
        "verbose_params", "from_torch", "kwargs",
    ]
    params = inspect.signature(AutoJaxModelForCausalLM.from_pretrained).parameters
    assert params["sharding_axis_dims"].default == (1, -1, 1, 1)
    assert params["sharding_axis_names"].default == ("dp", "fsdp", "tp", "sp")


def test_the_seeds_class_name_is_the_same_loader(jax_model_dir):
    from hfbridge.jax import AutoEasyDeLModelForCausalLM, AutoJaxModelForCausalLM

    assert AutoEasyDeLModelForCausalLM is AutoJaxModelForCausalLM
    module, params = AutoEasyDeLModelForCausalLM.from_pretrained(jax_model_dir("llama"))
    assert module.config.model_type and params
