"""Speed options: activation checkpointing, torch.compile and Liger give the same loss and gradients (or a clear
message where they cannot run)."""

import pytest
import torch

from hfbridge import CausalLMDataModule, HFAutoModelForCausalLM, LoRA
from hfbridge.models import liger
from hfbridge.parallel import parallelize
from hfbridge.testing import build_tiny_causal_lm


def _module(path, **kwargs):
    torch.manual_seed(0)
    module = HFAutoModelForCausalLM(model_name=str(path), **kwargs)
    module.configure_model()
    return module


def _batch(module, records):
    dm = CausalLMDataModule(module.tokenizer, records, batch_size=4)
    dm.setup()
    return dm.packed_collator(dm.train_samples[:4])


def _loss_and_grads(module, batch):
    module.model.zero_grad()
    loss = module.training_step(dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    (loss, grads), (ref_loss, ref_grads) = a, b
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert set(grads) == set(ref_grads) and grads
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("mode", [True, "selective", 2])
@pytest.mark.parametrize("lora", [False, True])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir, prompt_data, lora, mode):
    def transform():
        return LoRA(r=4, alpha=8, dropout=0.0) if lora else None

    ref = _module(tiny_model_dir, model_transform=transform())
    ckpt = _module(tiny_model_dir, model_transform=transform(), activation_checkpointing=mode)
    base = ckpt.model.get_base_model() if lora else ckpt.model
    expected = [i % 2 == 0 for i in range(len(base.model.layers))] if mode == 2 else [True] * len(base.model.layers)
    assert [layer.gradient_checkpointing for layer in base.model.layers] == expected
    if mode == "selective":
        assert base.model.layers[0]._gradient_checkpointing_func.keywords["context_fn"] is parallelize._selective_context
    batch = _batch(ref, prompt_data)
    _assert_same(_loss_and_grads(ckpt, batch), _loss_and_grads(ref, batch))


def test_selective_checkpointing_keeps_matmul_outputs_and_recomputes_the_rest():
    """The policy saves matrix products and attention, and recomputes pointwise ops."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    assert parallelize._save_matmuls_policy(None, aten.mm.default) == CheckpointPolicy.MUST_SAVE
    assert parallelize._save_matmuls_policy(None, aten.silu.default) == CheckpointPolicy.PREFER_RECOMPUTE
    assert parallelize._save_matmuls_policy(None, aten.mul.Tensor) == CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("bad", ["sometimes", 0, -2, 1.5])
def test_a_bad_checkpointing_mode_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="activation_checkpointing=.*every k-th layer"):
        HFAutoModelForCausalLM(model_name="x", activation_checkpointing=bad)


def test_activation_checkpointing_on_a_model_without_it_is_a_clear_error(tiny_model_dir):
    def unsupported(model):
        model.supports_gradient_checkpointing = False

    module = HFAutoModelForCausalLM(
        model_name=str(tiny_model_dir), model_transform=unsupported, activation_checkpointing=True
    )
    with pytest.raises(ValueError, match="does not support it"):
        module.configure_model()


def test_compile_option_compiles_every_decoder_layer(tiny_model_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(parallelize, "compile_layers", lambda model, **kw: calls.append(model))
    module = _module(tiny_model_dir, compile=True)
    assert calls == [module.model]


def test_compiled_layers_give_the_same_loss_and_gradients(tmp_path, tiny_tokenizer, prompt_data):
    one_layer = build_tiny_causal_lm(tmp_path / "one-layer", tokenizer=tiny_tokenizer, num_hidden_layers=1)
    torch._dynamo.reset()
    ref = _module(one_layer)
    compiled = _module(one_layer)
    assert parallelize.compile_layers(compiled.model, backend="eager") == 1  # tracing, not code generation: quick
    batch = _batch(ref, prompt_data)
    try:
        _assert_same(_loss_and_grads(compiled, batch), _loss_and_grads(ref, batch))
    finally:
        torch._dynamo.reset()


def test_liger_without_the_package_is_a_clear_error(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(liger, "liger_installed", lambda: False)
    with pytest.raises(ImportError, match="pip install liger-kernel"):
        HFAutoModelForCausalLM(model_name=str(tiny_model_dir), liger=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without a GPU")
def test_liger_without_a_gpu_warns_and_trains_with_the_chunked_loss(tiny_model_dir, prompt_data, monkeypatch):
    monkeypatch.setattr(liger, "liger_installed", lambda: True)
    with pytest.warns(UserWarning, match="need a CUDA GPU"):
        module = _module(tiny_model_dir, liger=True)
    ref = _module(tiny_model_dir)
    batch = _batch(ref, prompt_data)
    _assert_same(_loss_and_grads(module, batch), _loss_and_grads(ref, batch))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not liger.liger_installed(), reason="needs a GPU and liger")
def test_liger_on_gpu_gives_the_same_loss(tiny_model_dir, prompt_data):
    ref = _module(tiny_model_dir, default_dtype="float32").cuda()
    module = _module(tiny_model_dir, default_dtype="float32", liger=True).cuda()
    batch = {k: v.cuda() for k, v in _batch(ref, prompt_data).items()}
    loss, ref_loss = module.training_step(dict(batch)), ref.training_step(dict(batch))
    assert torch.allclose(loss, ref_loss, atol=1e-4)
