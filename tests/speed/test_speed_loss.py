"""The loss without full logits: same loss and gradients as the full logits, much less kept for backward."""

import logging

import pytest
import torch
import torch.nn.functional as F

from hfbridge import CausalLMDataModule, HFAutoModelForCausalLM, LoRA, masked_cross_entropy
from hfbridge.losses import fused_linear_cross_entropy
from hfbridge.models.chunked_loss import split_head
from hfbridge.testing import build_tiny_causal_lm


def _problem(seed=0, tokens=(3, 7), hidden=16, vocab=50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*tokens, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    b = torch.randn(vocab, generator=g, requires_grad=True)
    t = torch.randint(0, vocab, tokens, generator=g)
    t[0, :3] = -100
    mask = torch.ones(tokens)
    mask[-1, -2:] = 0
    return h, w, b, t, mask


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 4, 512])
def test_fused_linear_cross_entropy_equals_full_logits(reduction, chunk_size):
    h, w, b, t, mask = _problem()
    fused = fused_linear_cross_entropy(h, w, t, mask, reduction, chunk_size=chunk_size, bias=b) * 1.7
    full = masked_cross_entropy(F.linear(h, w, b), t, mask, reduction) * 1.7
    assert torch.allclose(fused, full, atol=1e-5)
    for ours, ref in zip(torch.autograd.grad(fused, (h, w, b)), torch.autograd.grad(full, (h, w, b))):
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)


def test_fused_loss_with_nothing_to_train_is_zero_with_zero_gradients():
    h, w, _, t, _ = _problem()
    loss = fused_linear_cross_entropy(h, w, torch.full_like(t, -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h.grad == 0) and torch.all(w.grad == 0)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while ``fn`` runs (activation memory)."""
    seen = {}

    def pack(x):
        seen[(x.data_ptr(), x.dtype, tuple(x.shape))] = x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(seen.values())


def test_fused_loss_keeps_far_less_for_backward_than_full_logits():
    h, w, _, t, _ = _problem(tokens=(4, 256), hidden=64, vocab=4096)
    full = _saved_bytes(lambda: masked_cross_entropy(F.linear(h, w), t))
    fused = _saved_bytes(lambda: fused_linear_cross_entropy(h, w, t, chunk_size=128))
    logits_bytes = 4 * 256 * 4096 * 4
    assert full >= logits_bytes and fused < logits_bytes / 10  # the weight's gradient, the hidden states' one
    frozen = w.detach()  # a frozen head (LoRA): only the hidden states' gradient is kept
    assert _saved_bytes(lambda: fused_linear_cross_entropy(h, frozen, t, chunk_size=128)) < logits_bytes / 50


def _loss_and_grads(module, batch):
    module.model.zero_grad()
    loss = module.training_step(dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory, tiny_tokenizer):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tied"), tokenizer=tiny_tokenizer, tie_word_embeddings=True)


@pytest.mark.parametrize("case", ["plain", "lora", "tied"])
def test_training_step_without_full_logits_equals_full_logits(tiny_model_dir, tied_model_dir, prompt_data, case, caplog):
    path = tied_model_dir if case == "tied" else tiny_model_dir
    results = []
    for chunked in (3, False):
        torch.manual_seed(0)
        transform = LoRA(r=4, alpha=8, dropout=0.0) if case == "lora" else None
        module = HFAutoModelForCausalLM(model_name=str(path), model_transform=transform, chunked_loss=chunked)
        module.configure_model()
        dm = CausalLMDataModule(module.tokenizer, prompt_data, batch_size=4)
        dm.setup()
        with caplog.at_level(logging.INFO, logger="hfbridge.models.causal_lm"):
            results.append(_loss_and_grads(module, dm.collator(dm.train_samples[:4])))
        assert (module._split() is not None) == bool(chunked)
    assert "loss without full logits: on" in caplog.text
    (loss, grads), (ref_loss, ref_grads) = results
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert set(grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-6, rtol=1e-4), name


def test_models_whose_logits_are_not_a_plain_head_keep_full_logits(tiny_model_dir):
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir))
    module.configure_model()
    assert split_head(module.model)[0] is not None
    # logits scaled after the head (as Cohere/Granite/Gemma soft-capping do): detected numerically
    module.model.register_forward_hook(lambda mod, args, out: out.__class__(logits=out.logits * 0.5))
    split, reason = split_head(module.model)
    assert split is None and "not the head applied" in reason
    # a head that is not a plain Linear
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir))
    module.configure_model()
    module.model.lm_head = torch.nn.Sequential(module.model.lm_head)
    split, reason = split_head(module.model)
    assert split is None and "not a plain Linear" in reason
    # and training still works, on the full logits
    dm = CausalLMDataModule(module.tokenizer, [{"text": "a b c d"}], batch_size=1)
    dm.setup()
    assert torch.isfinite(module.training_step(dm.collator(dm.train_samples)))


def test_custom_loss_fn_gets_the_full_logits(tiny_model_dir):
    seen = []

    def loss_fn(logits, labels, mask):
        seen.append(logits.shape)
        return masked_cross_entropy(logits, labels, mask)

    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir), loss_fn=loss_fn)
    module.configure_model()
    dm = CausalLMDataModule(module.tokenizer, [{"text": "a b c d"}], batch_size=1)
    dm.setup()
    module.training_step(dm.collator(dm.train_samples))
    assert seen and seen[0][-1] == module.model.config.vocab_size
