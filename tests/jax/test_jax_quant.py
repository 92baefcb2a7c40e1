"""8-bit storage: int8 values with per-channel scales, dequantized on the fly."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from hfbridge.jax import AutoJaxModelForCausalLM, QuantizedArray  # noqa: E402
from hfbridge.jax import tree as tree_lib  # noqa: E402
from hfbridge.jax.quant import param_bytes, quantize  # noqa: E402
from hfbridge.jax.rules import find_spec, fit_spec, quantized_specs  # noqa: E402


def test_quantize_per_channel_error_bound():
    x = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32) * np.arange(1, 9, dtype=np.float32)
    q = quantize(x, reduce_axis=0)
    assert q.values.dtype == np.int8 and q.scale.shape == (1, 8)
    np.testing.assert_allclose(q.scale[0], np.abs(x).max(axis=0) / 127, rtol=1e-6)
    assert np.all(np.abs(np.asarray(q.dequantize()) - x) <= q.scale / 2 + 1e-6)
    rows = quantize(x, reduce_axis=1)
    assert rows.scale.shape == (32, 1)


def test_load_in_8bit_saves_memory_with_small_logit_error(jax_model_dir, ids, capsys):
    folder = jax_model_dir("llama")
    m32, p32 = AutoJaxModelForCausalLM.from_pretrained(folder)
    m8, p8 = AutoJaxModelForCausalLM.from_pretrained(folder, load_in_8bit=True)
    flat = tree_lib.flatten(p8)
    for path, leaf in flat.items():
        if path.endswith(("kernel", "embedding")):
            assert isinstance(leaf, QuantizedArray), path
            assert leaf.values.dtype == np.int8 and leaf.scale.dtype == np.float32
            assert leaf.scale.shape == ((leaf.shape[0], 1) if path.endswith("embedding") else (1, leaf.shape[1]))
        else:
            assert not isinstance(leaf, QuantizedArray) and leaf.dtype == np.float32, path
    saved = 1 - param_bytes(p8) / param_bytes(p32)
    ref = np.asarray(m32(p32, ids))
    err = np.abs(np.asarray(m8(p8, ids)) - ref).max()
    with capsys.disabled():
        print(f"\n8-bit tiny llama: {param_bytes(p32)} -> {param_bytes(p8)} bytes ({saved:.0%} saved), "
              f"max logit error {err:.2e} (logit range {np.abs(ref).max():.2f})")
    assert saved > 0.7
    assert err < 0.05


def test_bit_targeted_params_selects_parameters(jax_model_dir, ids):
    folder = jax_model_dir("qwen3")
    m, p = AutoJaxModelForCausalLM.from_pretrained(folder, load_in_8bit=True, bit_targeted_params=[r"mlp/.*_proj/kernel$"])
    quantized = {path for path, leaf in tree_lib.flatten(p).items() if isinstance(leaf, QuantizedArray)}
    assert quantized == {f"model/layers/{i}/mlp/{n}_proj/kernel" for i in range(2) for n in ("gate", "up", "down")}
    m32, p32 = AutoJaxModelForCausalLM.from_pretrained(folder)
    np.testing.assert_allclose(np.asarray(m(p, ids)), np.asarray(m32(p32, ids)), atol=0.05)


def test_8bit_sharded(jax_model_dir, ids):
    folder = jax_model_dir("llama")
    m8, p8 = AutoJaxModelForCausalLM.from_pretrained(folder, load_in_8bit=True)
    ms, ps = AutoJaxModelForCausalLM.from_pretrained(
        folder, load_in_8bit=True, sharding_axis_dims=(1, 4, 2, 1), auto_shard_params=True
    )
    for path, leaf in tree_lib.flatten(ps).items():
        if isinstance(leaf, QuantizedArray):
            values_spec, scale_spec = quantized_specs(find_spec(path, ms.default_partition_rules()), leaf, ms.mesh)
            assert leaf.values.sharding.spec == values_spec == fit_spec(values_spec, leaf.shape, ms.mesh)
            assert leaf.scale.sharding.spec == scale_spec
    np.testing.assert_allclose(np.asarray(ms(ps, ids)), np.asarray(m8(p8, ids)), atol=1e-5)
