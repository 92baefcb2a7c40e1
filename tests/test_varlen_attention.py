"""``hfbridge_varlen``: per-sample SDPA on packed rows equals the stock sdpa path (block-diagonal mask) and each
sample run alone: logits and every gradient; padded, cached and masked calls are the stock path."""

import pytest
import torch

from hfbridge.data.formats import TokenizedSample
from hfbridge.data.packing import PackedCollator, packing_is_exact, uses_flash_attention
from hfbridge.models import varlen_attention
from hfbridge.testing import build_tiny_causal_lm


def _model(tmp_path, family="llama", **overrides):
    from transformers import AutoModelForCausalLM

    path = build_tiny_causal_lm(tmp_path / family, family=family, **overrides)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")


def _samples(lengths, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(TokenizedSample(input_ids=ids, labels=ids[1:] + [2]))
    return out


def _loss_and_grads(model, batch):
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    labels = batch["labels"]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                             reduction="sum")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return logits.detach(), float(loss), grads


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_rows_equal_the_stock_sdpa_path_and_samples_alone(tmp_path, family):
    model = _model(tmp_path, family)
    samples = _samples([7, 3, 11, 5, 9])
    batch = PackedCollator(0, one_row=True)(samples)
    assert batch["input_ids"].shape == (1, 35)
    ref_logits, ref_loss, ref_grads = _loss_and_grads(model, batch)  # stock sdpa: a block-diagonal mask
    switched, reason = varlen_attention.enable(model)
    assert switched, reason
    assert uses_flash_attention(model)  # the data module lays packed micro-batches out as one row
    calls = []
    original = varlen_attention.segments
    varlen_attention.segments = lambda *a: calls.append(1) or original(*a)
    try:
        logits, loss, grads = _loss_and_grads(model, batch)
    finally:
        varlen_attention.segments = original
    assert calls  # the per-sample path ran
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # each sample alone, no packing
    start = 0
    for s in samples:
        alone = model(input_ids=torch.tensor([s.input_ids]), use_cache=False).logits[0]
        torch.testing.assert_close(logits[0, start : start + len(s.input_ids)], alone, rtol=1e-5, atol=1e-5)
        start += len(s.input_ids)
    assert packing_is_exact(model)[0]


def test_several_rows_with_padding_segments(tmp_path):
    model = _model(tmp_path)
    batch = PackedCollator(0, pack_length=16)(_samples([7, 3, 11, 5, 9, 2], seed=1))
    assert batch["input_ids"].shape[0] > 1
    ref = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    varlen_attention.enable(model)
    ours = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    real = batch["labels"] != -100
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)


def test_generation_with_padding_and_a_cache_is_unchanged(tmp_path):
    model = _model(tmp_path)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kwargs)
    varlen_attention.enable(model)
    assert model.config._attn_implementation == varlen_attention.NAME
    torch.testing.assert_close(model.generate(ids, **kwargs), ref)


def test_only_plain_causal_full_attention_models_are_switched(tmp_path):
    sliding = _model(tmp_path, "mistral", sliding_window=4)
    ok, reason = varlen_attention.enable(sliding)
    assert not ok and "sliding" in reason and sliding.config._attn_implementation == "sdpa"
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(build_tiny_causal_lm(tmp_path / "e"), attn_implementation="eager")
    ok, reason = varlen_attention.enable(eager)
    assert not ok and "eager" in reason


def test_saved_config_keeps_a_loadable_attention(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(tmp_path)
    varlen_attention.enable(model)
    model.save_pretrained(tmp_path / "saved")
    AutoModelForCausalLM.from_pretrained(tmp_path / "saved")  # loads in a process without the registration
    text = (tmp_path / "saved" / "config.json").read_text()
    assert varlen_attention.NAME not in text
