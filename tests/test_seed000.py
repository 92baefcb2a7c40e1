"""What a NeMo user of seed 000 (``HFAutoModelForCausalLM``) brings, and what it must do, against reference values:
the loss per label token of the whole optimizer step with their own ``DataLoader``; ``model_transform`` and
``model_accelerator`` in the seed's form (called with the Lightning module); a ``loss_fn`` written for flattened
tensors; the ``tokens`` batch key; ``configure_tokenizer``; a ``loss_mask``."""

import shutil

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from test_causal_lm import PerMicroBatchMean, _uneven_records
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfbridge import CausalLMDataModule, HFAutoModelForCausalLM, LoRA, OptimizerConfig, masked_cross_entropy
from hfbridge.data import EpochShuffleSampler
from hfbridge.losses import IGNORE_INDEX
from hfbridge.models.causal_lm import module_transform

ATOL = 1e-6


# ----------------------------------------------------------------------------------------------- helpers
class MetricsLog(Logger):
    """A logger that keeps what Lightning logs, to read ``train_loss`` as a user's logger sees it."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append(dict(metrics))

    def train_losses(self) -> list[float]:
        return [row["train_loss"] for row in self.rows if "train_loss" in row]


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


class GradCapture(pl.Callback):
    """The gradients of every optimizer step as callbacks see them, and as the optimizer steps with them (after
    gradient clipping: the optimizer runs the last backward inside its step, and leaves the gradients as they are)."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []
        self.stepped: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(lambda *_: self.stepped.append(_grads(pl_module)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(_grads(pl_module))


def _samples_and_collator(model_dir, records):
    dm = CausalLMDataModule(HFAutoModelForCausalLM.configure_tokenizer(str(model_dir)), records, seed=1)
    dm.setup()
    return dm.train_samples, dm.collator


def _plain_loader(model_dir, records, batch_size, shuffled=False):
    """A user's own DataLoader: padded batches of ``input_ids``, ``attention_mask``, ``labels``, nothing else."""
    samples, collator = _samples_and_collator(model_dir, records)
    sampler = EpochShuffleSampler(len(samples), seed=1) if shuffled else None  # the data module's order
    return DataLoader(samples, batch_size=batch_size, collate_fn=collator, sampler=sampler)


def _fit(model_dir, data, accumulate, steps=1, module_class=HFAutoModelForCausalLM, **trainer_kwargs):
    torch.manual_seed(0)
    module = module_class(model_name=str(model_dir), optim=OptimizerConfig(lr=1e-2, warmup_steps=0))
    if callable(data):
        data = data(module)
    capture, logger = GradCapture(), MetricsLog()
    trainer = pl.Trainer(
        max_steps=steps, accumulate_grad_batches=accumulate, logger=logger, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[capture],
        **trainer_kwargs,
    )
    trainer.fit(module, data)
    return capture, logger.train_losses()


def _assert_same_grads(a, b, rtol=0.0):
    assert a.keys() == b.keys()
    for name, grad in a.items():
        assert torch.allclose(grad, b[name], atol=ATOL, rtol=rtol), (name, (grad - b[name]).abs().max())


def _reference_logits(model_dir, batch):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _hand_masked_mean(logits, labels, mask=None):
    """Mean of -log p(label) over positions with a label (not -100) and mask 1, token by token."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    terms = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] != IGNORE_INDEX and (mask is None or mask[b, t]):
                terms.append(-logp[b, t, labels[b, t]])
    return torch.stack(terms).mean().float()


# ----------------------------------------------------------------------------------------------- 1: any DataLoader
def test_plain_dataloader_accumulation_equals_one_large_batch_and_the_datamodule(tiny_model_dir):
    records = _uneven_records()
    big, big_loss = _fit(tiny_model_dir, _plain_loader(tiny_model_dir, records, 8), accumulate=1)
    acc, acc_loss = _fit(tiny_model_dir, _plain_loader(tiny_model_dir, records, 2), accumulate=4)
    dm, dm_loss = _fit(tiny_model_dir, lambda m: CausalLMDataModule(m.tokenizer, records, batch_size=2, seed=1),
                       accumulate=4)
    _assert_same_grads(big.grads[0], acc.grads[0])
    _assert_same_grads(dm.grads[0], acc.grads[0])
    # the logged loss is the step's per-token loss: the hand-computed mean over all eight samples
    samples, collator = _samples_and_collator(tiny_model_dir, records)
    batch = collator(samples)
    expected = float(_hand_masked_mean(_reference_logits(tiny_model_dir, batch), batch["labels"]))
    for losses in (big_loss, acc_loss, dm_loss):
        assert losses == pytest.approx([expected], abs=1e-5)
    # and the test can fail: the seed's per-micro-batch mean gives other gradients
    naive, _ = _fit(tiny_model_dir, _plain_loader(tiny_model_dir, records, 2), accumulate=4,
                    module_class=PerMicroBatchMean)
    assert any(not torch.allclose(g, naive.grads[0][n], atol=ATOL, rtol=1e-4) for n, g in big.grads[0].items())


def test_plain_dataloader_short_last_step_and_clipping_equal_the_datamodule(tiny_model_dir):
    """Steps of 3 and then 1 micro-batch (the epoch's end), with binding gradient clipping: the gradients callbacks
    see, those the optimizer steps with (clipped) and the logged losses equal those of the data module path, which
    counts each step's tokens in advance."""
    records = _uneven_records()
    kwargs = dict(accumulate=3, steps=2, gradient_clip_val=0.05)
    plain, plain_losses = _fit(tiny_model_dir, _plain_loader(tiny_model_dir, records, 2, shuffled=True), **kwargs)
    dm, dm_losses = _fit(
        tiny_model_dir, lambda m: CausalLMDataModule(m.tokenizer, records, batch_size=2, seed=1, packing=False), **kwargs)
    assert len(plain.grads) == len(dm.grads) == len(dm.stepped) == 2
    _assert_same_grads(plain.grads[0], dm.grads[0])
    _assert_same_grads(plain.stepped[0], dm.stepped[0])
    # the second step starts from weights equal to ~1e-7 after one Adam step
    _assert_same_grads(plain.grads[1], dm.grads[1], rtol=1e-4)
    _assert_same_grads(plain.stepped[1], dm.stepped[1], rtol=1e-4)
    norm = torch.cat([g.flatten() for g in dm.grads[0].values()]).norm()
    clipped = torch.cat([g.flatten() for g in dm.stepped[0].values()]).norm()
    assert norm > 0.1 and clipped == pytest.approx(0.05, rel=1e-4)  # clipping binds
    assert plain_losses == pytest.approx(dm_losses, abs=1e-6) and len(dm_losses) == 2


def test_optimizer_step_override_without_super_is_an_error(tiny_model_dir):
    class NoSuper(HFAutoModelForCausalLM):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            optimizer.step(closure=optimizer_closure)

    with pytest.raises(RuntimeError, match="must call super"):
        _fit(tiny_model_dir, _plain_loader(tiny_model_dir, _uneven_records(), 2), accumulate=2, steps=2,
             module_class=NoSuper)


# ----------------------------------------------------------------------------------------------- 3: model_transform
def _peft_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _hfbridge_lora(model):
    torch.manual_seed(7)
    return LoRA(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])(model)


seen = []


@module_transform
def _seed_form_marked(module):
    seen.append(type(module))
    module.model = _peft_lora(module.model)  # NeMo's style: wrap the module's model
    return module


def _seed_form_annotated(module: HFAutoModelForCausalLM):
    seen.append(type(module))
    module.model = _peft_lora(module.model)


def _seed_form_string_annotation(module: "pl.LightningModule"):
    seen.append(type(module))
    module.model = _peft_lora(module.model)


@pytest.mark.parametrize("transform, takes_module", [
    (_seed_form_marked, True), (_seed_form_annotated, True), (_seed_form_string_annotation, True),
    (_hfbridge_lora, False),
])
def test_model_transform_in_either_form_gives_the_reference_adapter(tiny_model_dir, prompt_data, transform,
                                                                     takes_module):
    seen.clear()
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir), model_transform=transform)
    assert module.transform_takes_module(transform) is takes_module
    module.configure_model()
    assert seen == ([HFAutoModelForCausalLM] if takes_module else [])
    reference = _peft_lora(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)))
    mine = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs.keys() and all("lora_" in n for n in mine)
    for name, p in mine.items():
        assert torch.equal(p, theirs[name]), name
    # and it trains: the loss of a batch is the reference model's (its adapter starts at zero)
    dm = CausalLMDataModule(module.tokenizer, prompt_data, batch_size=4)
    dm.setup()
    batch = dm.collator(dm.train_samples[:4])
    loss = module.training_step(dict(batch))
    with torch.no_grad():
        expected = masked_cross_entropy(reference(input_ids=batch["input_ids"],
                                                  attention_mask=batch["attention_mask"]).logits, batch["labels"])
    assert torch.allclose(loss, expected, atol=1e-5)


def test_which_form_a_transform_takes_is_decided_from_marks_and_annotations(tiny_model_dir):
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir))

    class Marked:
        takes_module = True

        def __call__(self, module):
            pass

    def annotated_model(model: torch.nn.Module):
        pass

    def lightning_annotated(module: pl.LightningModule):
        pass

    def unannotated(module):
        pass

    assert module.transform_takes_module(Marked()) and module.transform_takes_module(lightning_annotated)
    assert module.transform_takes_module(lambda m: None) is False
    assert not any(module.transform_takes_module(f) for f in (annotated_model, unannotated, LoRA(), print))


# ----------------------------------------------------------------------------------------------- 6: model_accelerator
@pytest.mark.parametrize("accelerator_form", ["model", "module"])
def test_model_accelerator_is_applied_last_after_the_transform(tiny_model_dir, accelerator_form):
    order = []

    def transform(model):
        order.append("transform")
        with torch.no_grad():
            model.lm_head.weight.add_(1.0)

    def accelerate(model):
        order.append("accelerator")
        with torch.no_grad():
            model.lm_head.weight.mul_(2.0)

    accelerator = accelerate if accelerator_form == "model" else module_transform(lambda m: accelerate(m.model))
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir), model_transform=transform,
                                    model_accelerator=accelerator)
    module.configure_model()
    assert order == ["transform", "accelerator"]
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        reference.lm_head.weight.copy_((reference.lm_head.weight + 1.0) * 2.0)  # transform, then accelerator
        ids = torch.tensor([[3, 4, 5, 6, 7]])
        module.model.eval()
        assert torch.allclose(module.model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)


# ----------------------------------------------------------------------------------------------- 4: flat loss_fn
def nemo_masked_cross_entropy(logits, targets, mask=None):
    """NeMo's ``masked_cross_entropy``, verbatim: it needs ``[tokens, vocab]`` logits and ``[tokens]`` targets."""
    if mask is not None:
        loss = F.cross_entropy(logits, targets, reduction="none")
        return torch.mean(loss[mask.view(-1) == 1])
    return F.cross_entropy(logits, targets)


def _batch_with_mask(model_dir, prompt_data):
    samples, collator = _samples_and_collator(model_dir, prompt_data)
    batch = collator(samples[:4])
    mask = (batch["labels"] != IGNORE_INDEX).long()
    first = mask.argmax(dim=1)
    mask[torch.arange(4), first] = 0  # drop each row's first trained token
    mask[torch.arange(4), first + 1] = 0  # and its second
    return batch, mask


@pytest.mark.parametrize("with_mask", [True, False])
def test_loss_fn_written_for_flattened_tensors_runs_and_equals_masked_cross_entropy(tiny_model_dir, prompt_data,
                                                                                    with_mask):
    batch, mask = _batch_with_mask(tiny_model_dir, prompt_data)
    if with_mask:
        batch["loss_mask"] = mask
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir), loss_fn=nemo_masked_cross_entropy,
                                    loss_fn_flat=True)
    module.configure_model()
    loss = module.training_step(dict(batch))
    logits = _reference_logits(tiny_model_dir, batch)
    assert torch.allclose(loss, masked_cross_entropy(logits, batch["labels"], batch.get("loss_mask")), atol=1e-5)
    # without the flag it gets 3-D logits, which this function cannot take
    module.loss_fn_flat = False
    with pytest.raises((RuntimeError, ValueError, IndexError)):
        module.training_step(dict(batch))


# ----------------------------------------------------------------------------------------------- 5: tokens
@pytest.mark.parametrize("chunked_loss", [True, False])
def test_tokens_key_is_read_as_input_ids(tiny_model_dir, prompt_data, chunked_loss):
    batch, _ = _batch_with_mask(tiny_model_dir, prompt_data)
    nemo_batch = {"tokens": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir), chunked_loss=chunked_loss)
    module.configure_model()
    loss = module.training_step(dict(nemo_batch))
    expected = _hand_masked_mean(_reference_logits(tiny_model_dir, batch), batch["labels"])
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(module.validation_step(dict(nemo_batch)), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------- 6: loss_mask
@pytest.mark.parametrize("chunked_loss", [True, False])
def test_loss_mask_batch_gives_the_hand_computed_masked_mean(tiny_model_dir, prompt_data, chunked_loss):
    batch, mask = _batch_with_mask(tiny_model_dir, prompt_data)
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir), chunked_loss=chunked_loss)
    module.configure_model()
    loss = module.training_step({**batch, "loss_mask": mask})
    logits = _reference_logits(tiny_model_dir, batch)
    assert torch.allclose(loss, _hand_masked_mean(logits, batch["labels"], mask), atol=1e-5)
    assert not torch.allclose(loss, _hand_masked_mean(logits, batch["labels"]), atol=1e-4)  # the mask matters


# ----------------------------------------------------------------------------------------------- 6: configure_tokenizer
def test_configure_tokenizer_is_static_and_gives_a_pad_token_like_the_reference(tiny_model_dir, tmp_path):
    texts = ["Date: May 1", "The quick brown fox jumps over the lazy dog."]
    with_pad = HFAutoModelForCausalLM.configure_tokenizer(str(tiny_model_dir))
    reference = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert with_pad.pad_token == reference.pad_token == "<|pad|>"
    assert with_pad(texts, padding=True)["input_ids"] == reference(texts, padding=True)["input_ids"]
    # a tokenizer without a pad token gets its EOS token as the pad token
    folder = shutil.copytree(tiny_model_dir, tmp_path / "no-pad")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(str(folder))
    reference = AutoTokenizer.from_pretrained(str(folder))
    assert reference.pad_token is None
    configured = HFAutoModelForCausalLM.configure_tokenizer(str(folder))
    assert configured.pad_token == reference.eos_token and configured.pad_token_id == reference.eos_token_id
    ids = configured(texts, padding=True)["input_ids"]
    plain = reference(texts)["input_ids"]
    assert ids[0] == plain[0] + [reference.eos_token_id] * (len(plain[1]) - len(plain[0])) and ids[1] == plain[1]
