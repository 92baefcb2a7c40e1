"""hfbridge's own JAX checkpoint (``from_torch=False``) and the safetensors reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from hfbridge.jax import AutoJaxModelForCausalLM, QuantizedArray  # noqa: E402
from hfbridge.jax import tree as tree_lib  # noqa: E402
from hfbridge.jax.st_io import iter_tensors, save_tensors  # noqa: E402


def _same_params(a, b):
    fa, fb = tree_lib.flatten(a), tree_lib.flatten(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        x, y = fa[path], fb[path]
        if isinstance(x, QuantizedArray):
            np.testing.assert_array_equal(np.asarray(x.values), np.asarray(y.values))
            np.testing.assert_array_equal(np.asarray(x.scale), np.asarray(y.scale))
        else:
            assert x.dtype == y.dtype, path
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("options", [{}, {"param_dtype": "bf16"}, {"load_in_8bit": True}])
def test_save_and_load_own_format(options, jax_model_dir, tmp_path, ids):
    module, params = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("qwen3"), **options)
    module.save_pretrained(tmp_path, params)
    assert {"config.json", "hfbridge_jax.json", "jax_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    loaded_module, loaded = AutoJaxModelForCausalLM.from_pretrained(tmp_path, from_torch=False, **options)
    _same_params(params, loaded)
    np.testing.assert_array_equal(np.asarray(loaded_module(loaded, ids)), np.asarray(module(params, ids)))


def test_own_format_sharded_and_dequantized(jax_model_dir, tmp_path, ids):
    folder = jax_model_dir("llama_bias_tied")
    m8, p8 = AutoJaxModelForCausalLM.from_pretrained(folder, load_in_8bit=True)
    m8.save_pretrained(tmp_path, p8)
    assert json.loads((tmp_path / "hfbridge_jax.json").read_text())["quantized"]
    # load_in_8bit=False dequantizes an 8-bit checkpoint; auto_shard_params places it on the mesh
    m, p = AutoJaxModelForCausalLM.from_pretrained(tmp_path, from_torch=False, auto_shard_params=True)
    assert not any(isinstance(v, QuantizedArray) for v in tree_lib.flatten(p).values())
    assert p["model"]["embed_tokens"]["embedding"].sharding.mesh.devices.size == 8
    np.testing.assert_allclose(np.asarray(m(p, ids)), np.asarray(m8(p8, ids)), atol=1e-5)


def test_format_mismatch_errors(jax_model_dir, tmp_path):
    hf_folder = jax_model_dir("llama")
    with pytest.raises(FileNotFoundError, match="from_torch=True"):
        AutoJaxModelForCausalLM.from_pretrained(hf_folder, from_torch=False)
    module, params = AutoJaxModelForCausalLM.from_pretrained(hf_folder)
    module.save_pretrained(tmp_path, params)
    with pytest.raises(ValueError, match="from_torch=False"):
        AutoJaxModelForCausalLM.from_pretrained(tmp_path)


def test_safetensors_bf16_roundtrip_matches_torch_reader(tmp_path):
    import ml_dtypes
    import torch
    from safetensors.torch import load_file

    tensors = {
        "a": np.random.default_rng(0).standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
        "b": np.arange(7, dtype=np.float32),
        "c": np.array([[1, -2]], dtype=np.int8),
    }
    save_tensors(tmp_path / "x.safetensors", tensors, metadata={"k": "v"})
    ours = dict(iter_tensors(tmp_path / "x.safetensors"))
    theirs = load_file(str(tmp_path / "x.safetensors"))
    assert theirs["a"].dtype == torch.bfloat16 and ours["a"].dtype == ml_dtypes.bfloat16
    for name, value in tensors.items():
        np.testing.assert_array_equal(ours[name].astype(np.float32), value.astype(np.float32))
        np.testing.assert_array_equal(theirs[name].float().numpy(), value.astype(np.float32))
