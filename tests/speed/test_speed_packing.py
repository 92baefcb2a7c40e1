"""Padding-free packing: layout, the model-level check, and equality with padding (logits, loss, gradients)."""

import logging
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from hfbridge import CausalLMDataModule, HFAutoModelForCausalLM, OptimizerConfig
from hfbridge.data.collators import PaddedCollator
from hfbridge.data.formats import TokenizedSample
from hfbridge.data.packing import PackedCollator, best_fit_decreasing, packing_is_exact
from hfbridge.losses import IGNORE_INDEX


def _samples(lengths, seed=1, vocab=500):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 3) + torch.randint(0, vocab, (n - n // 3,), generator=g).tolist()
        out.append(TokenizedSample(ids, labels))
    return out


def test_best_fit_decreasing_respects_capacity_and_is_best_fit():
    lengths = [5, 7, 3, 2, 8, 4, 1]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    # 8, 7, 5, 4, 3, 2, 1: 8 | 7 | 5 -> 7+3 is the tightest fit for 3, 8+2 for 2, 5+4+1
    assert [[lengths[i] for i in b] for b in bins] == [[8, 2], [7, 3], [5, 4, 1]]
    assert best_fit_decreasing(lengths, 10) == bins  # deterministic
    with pytest.raises(ValueError, match="does not fit in a packed row of 6"):
        best_fit_decreasing(lengths, 6)


def test_packed_collator_restarts_positions_and_keeps_every_token_once():
    samples = _samples([7, 3, 12, 5, 9, 1])
    batch = PackedCollator(pad_token_id=0, pack_length=14)(samples)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: positions say it all
    assert batch["input_ids"].shape[1] <= 14 and batch["input_ids"].shape[0] == 3
    padded = PaddedCollator(0)(samples)
    assert (batch["labels"] != IGNORE_INDEX).sum() == (padded["labels"] != IGNORE_INDEX).sum()
    assert sorted(batch["input_ids"][batch["labels"] != IGNORE_INDEX].tolist()) == sorted(
        padded["input_ids"][padded["labels"] != IGNORE_INDEX].tolist()
    )
    starts = (batch["position_ids"] == 0).sum()
    assert starts >= len(samples)  # one restart per sample (plus one per padding tail)
    one_row = PackedCollator(0, one_row=True)(samples)
    assert one_row["input_ids"].shape == (1, sum(len(s.input_ids) for s in samples))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_per_sample_logits(tiny_model_dir, attn):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation=attn).eval()
    samples = _samples([7, 3, 12, 5, 9, 1])
    collator = PackedCollator(0, 14)
    batch = collator(samples)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for r, row in enumerate(collator.rows(samples)):
            start = 0
            for i in row:
                n = len(samples[i].input_ids)
                alone = model(input_ids=torch.tensor([samples[i].input_ids])).logits[0]
                assert torch.allclose(packed[r, start : start + n], alone, atol=1e-5), (r, i)
                start += n


class _IgnoresPositions(nn.Module):
    """A model that drops position_ids, so packed samples would attend to each other."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, position_ids=None, use_cache=None):
        return self.inner(input_ids=input_ids, use_cache=use_cache)


def test_packing_check_accepts_llama_and_rejects_a_model_that_crosses_samples(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.train()
    assert packing_is_exact(model)[0]
    assert model.training  # mode restored
    ok, reason = packing_is_exact(_IgnoresPositions(model))
    assert not ok and "crosses samples" in reason


def _dm_with_model(tokenizer, records, model, **kwargs):
    dm = CausalLMDataModule(tokenizer, records, batch_size=4, max_length=64, **kwargs)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(model=model), accumulate_grad_batches=1,
                                 strategy=None, global_rank=0, world_size=1)
    return dm


def test_datamodule_packs_by_default_only_where_exact(tiny_model_dir, tiny_tokenizer, chat_data, caplog):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with caplog.at_level(logging.INFO, logger="hfbridge.data.datamodule"):
        dm = _dm_with_model(tiny_tokenizer, chat_data, model)
        batch = next(iter(dm.train_dataloader()))
    assert "position_ids" in batch and "attention_mask" not in batch and "packing: on" in caplog.text
    assert batch["input_ids"].shape[0] < 4  # four short samples share rows

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hfbridge.data.datamodule"):
        dm = _dm_with_model(tiny_tokenizer, chat_data, _IgnoresPositions(model))
        batch = next(iter(dm.train_dataloader()))
    assert "attention_mask" in batch and "packing: off" in caplog.text

    with pytest.raises(ValueError, match="cannot be packed exactly"):
        _dm_with_model(tiny_tokenizer, chat_data, _IgnoresPositions(model), packing=True).use_packing()
    dm = _dm_with_model(tiny_tokenizer, chat_data, model, packing=False)
    assert "attention_mask" in next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match="pack_length"):
        CausalLMDataModule(tiny_tokenizer, chat_data, max_length=64, pack_length=32)


@pytest.mark.parametrize("chunked_loss", [True, False])
def test_packed_batch_has_the_loss_and_gradients_of_the_padded_batch(tiny_model_dir, prompt_data, chunked_loss):
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir), chunked_loss=chunked_loss)
    module.configure_model()
    dm = CausalLMDataModule(module.tokenizer, prompt_data, batch_size=6)
    dm.setup()
    samples = dm.train_samples[:6]

    def loss_and_grads(batch):
        module.model.zero_grad()
        loss = module.training_step(dict(batch))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in module.model.named_parameters()}

    packed_loss, packed_grads = loss_and_grads(PackedCollator(module.tokenizer.pad_token_id, 32)(samples))
    padded_loss, padded_grads = loss_and_grads(PaddedCollator(module.tokenizer.pad_token_id)(samples))
    assert torch.allclose(packed_loss, padded_loss, atol=1e-6)
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-6, rtol=1e-4), name


class _GradCapture(pl.Callback):
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def test_fit_with_packing_gives_the_gradients_of_padding(tiny_model_dir, prompt_data):
    grads = {}
    for packing in (True, False):
        torch.manual_seed(0)
        module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir), optim=OptimizerConfig(lr=1e-3, warmup_steps=0))
        dm = CausalLMDataModule(module.tokenizer, prompt_data, batch_size=3, seed=1, packing=packing)
        capture = _GradCapture()
        trainer = pl.Trainer(max_steps=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[capture])
        trainer.fit(module, dm)
        assert dm.use_packing() is packing
        grads[packing] = capture.grads[0]
    for name, grad in grads[False].items():
        assert torch.allclose(grads[True][name], grad, atol=1e-6, rtol=1e-4), name
