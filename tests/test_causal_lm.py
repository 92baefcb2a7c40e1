import warnings

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from hfbridge import CausalLMDataModule, HFAutoModelForCausalLM, LoRA, OptimizerConfig, masked_cross_entropy
from hfbridge.generation import generate, generate_ids
from hfbridge.io import OutputExistsError
from hfbridge.models import loading


class GradCapture(pl.Callback):
    """Keep a copy of every gradient at each optimizer step."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})


class PerMicroBatchMean(HFAutoModelForCausalLM):
    """The seed's (NeMo's) loss: each micro-batch's own mean, whatever the rest of the optimizer step holds."""

    def training_step(self, batch, batch_idx=None):
        return self._loss(batch)[0]


def _grads_after_one_step(model_dir, records, batch_size, accumulate, token_normalised=True):
    torch.manual_seed(0)
    module_class = HFAutoModelForCausalLM if token_normalised else PerMicroBatchMean
    module = module_class(model_name=str(model_dir), optim=OptimizerConfig(lr=1e-3, warmup_steps=0))
    dm = CausalLMDataModule(module.tokenizer, records, batch_size=batch_size, seed=1)
    if not token_normalised:  # the per-micro-batch mean that other wrappers use
        dm.train_dataloader = lambda: torch.utils.data.DataLoader(
            (dm.setup(), dm.train_samples)[1], batch_size=batch_size, collate_fn=dm.collator,
            sampler=__import__("hfbridge").data.EpochShuffleSampler(len(dm.train_samples), 1),
        )
    capture = GradCapture()
    trainer = pl.Trainer(
        max_steps=1, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[capture],
    )
    trainer.fit(module, dm)
    return capture.grads[0]


def _uneven_records():
    # lengths differ a lot, so the per-micro-batch mean differs from the per-token mean
    lengths = [1, 9, 2, 14, 3, 6, 1, 11]
    return [{"prompt": f"Q{i}:", "completion": " ab" * n} for i, n in enumerate(lengths)]


def test_gradient_accumulation_equals_one_large_batch(tiny_model_dir):
    records = _uneven_records()
    big = _grads_after_one_step(tiny_model_dir, records, batch_size=8, accumulate=1)
    accumulated = _grads_after_one_step(tiny_model_dir, records, batch_size=2, accumulate=4)
    for name, grad in big.items():
        assert torch.allclose(grad, accumulated[name], atol=1e-6, rtol=1e-4), name
    # and the test can fail: per-micro-batch averaging gives other gradients
    naive = _grads_after_one_step(tiny_model_dir, records, batch_size=2, accumulate=4, token_normalised=False)
    assert any(not torch.allclose(g, naive[n], atol=1e-6, rtol=1e-4) for n, g in big.items())


def test_training_step_loss_is_masked_cross_entropy_of_shifted_labels(tiny_model_dir, prompt_data):
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir))
    module.configure_model()
    dm = CausalLMDataModule(module.tokenizer, prompt_data, batch_size=4)
    dm.setup()
    batch = dm.collator(dm.train_samples[:4])
    loss = module.training_step(dict(batch))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    assert torch.allclose(loss, masked_cross_entropy(logits, batch["labels"]), atol=1e-5)


def test_configure_model_is_idempotent_and_random_init_works(tiny_model_dir):
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir), load_pretrained_weights=False)
    torch.manual_seed(1234)  # not the seed the saved tiny model was made with
    module.configure_model()
    first = module.model
    module.configure_model()
    assert module.model is first
    pretrained = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    w_random = first.model.embed_tokens.weight
    assert w_random.shape == pretrained.model.embed_tokens.weight.shape
    assert not torch.allclose(w_random, pretrained.model.embed_tokens.weight)


def test_remove_extra_batch_keys_keeps_forward_args_and_reserved(tiny_model_dir):
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir))
    module.configure_model()
    batch = {"input_ids": 1, "attention_mask": 2, "labels": 3, "loss_mask": 4, "junk": 5}
    assert set(module._remove_extra_batch_keys(batch)) == {"input_ids", "attention_mask", "labels", "loss_mask"}
    # `labels` is an argument of HF forward (so it stays); hfbridge's forward() never passes it (no double shift)
    assert set(module._remove_extra_batch_keys(batch, reserved_keys=[])) == {"input_ids", "attention_mask", "labels"}


def test_fit_logs_train_and_val_loss_and_loss_falls(tiny_model_dir, chat_data):
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir), optim=OptimizerConfig(lr=3e-3, warmup_steps=0))
    dm = CausalLMDataModule(module.tokenizer, chat_data * 2, val_data=chat_data[:4], batch_size=4)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.validate(module, dm)
    before = trainer.callback_metrics["val_loss"].item()
    trainer.fit(module, dm)
    after = trainer.callback_metrics["val_loss"].item()
    assert "train_loss" in trainer.callback_metrics
    assert after < before


def test_save_pretrained_reloads_in_plain_transformers_with_same_logits(tiny_model_dir, tmp_path):
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir))
    module.configure_model()
    with torch.no_grad():
        module.model.model.embed_tokens.weight.add_(0.01)  # make it differ from the source
    module.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    ids = torch.tensor([[3, 4, 5, 6]])
    module.model.eval()
    with torch.no_grad():
        assert torch.allclose(module.model(ids).logits, reloaded(ids).logits, atol=1e-6)
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_lora_adapter_and_merged_saves_reload_with_same_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel

    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir), model_transform=LoRA(r=4, alpha=8, dropout=0.0))
    module.configure_model()
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a non-trivial adapter
    module.save_pretrained(tmp_path / "adapter")
    module.save_pretrained(tmp_path / "merged", merged=True)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
        assert torch.allclose(adapter(input_ids=ids).logits, expected, atol=1e-5)
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_lora_trains_only_adapter_parameters(tiny_model_dir):
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir), model_transform=LoRA(r=4, target_modules=["q_proj", "v_proj"]))
    module.configure_model()
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and not any("k_proj" in n for n in trainable)


def test_save_refuses_non_empty_folder_unless_overwrite(tiny_model_dir, tmp_path):
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir))
    module.configure_model()
    module.save_pretrained(tmp_path / "out")  # a folder hfbridge wrote (only those may be replaced, see io.py)
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="not empty"):
        module.save_pretrained(tmp_path / "out", overwrite=False)
    module.save_pretrained(tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "config.json").exists() and not (tmp_path / "out" / "keep.txt").exists()


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    prompts = ["Date: May 1", "Convert the date to ISO 8601: March 3rd, 2021 ->", "Q", [{"role": "user", "content": "hi"}]]
    batched = generate_ids(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=4)
    single = [generate_ids(model, tiny_tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert len(generate(model, tiny_tokenizer, prompts, max_new_tokens=4)) == 4


def test_generation_keeps_prompts_within_the_context(tiny_model_dir, tiny_tokenizer, caplog):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    long_prompt = "January February " * 200  # far beyond the 256-token context
    out = generate_ids(model, tiny_tokenizer, [long_prompt], max_new_tokens=6)
    assert len(out[0]) <= 6
    assert "keep only their last tokens" in caplog.text


def test_dtype_auto_is_float32_on_cpu_and_bad_names_are_errors():
    assert loading.resolve_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        loading.resolve_dtype("float8", "cpu")
    with pytest.warns(UserWarning, match="much slower"):
        loading.resolve_dtype("bfloat16", "cpu")


def test_unavailable_attention_falls_back_with_a_warning(tiny_model_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = loading.load_pretrained_model(str(tiny_model_dir), attn_implementation="flash_attention_2")
    assert any("not available" in str(w.message) for w in caught)
    assert model.config._attn_implementation in ("sdpa", "eager")


def test_unknown_model_while_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(loading.ModelNotFoundError, match="not in the local Hugging Face cache and the hub is offline"):
        loading.resolve_model_path("some-org/no-such-model")


def test_local_folder_without_config_is_an_error(tmp_path):
    with pytest.raises(loading.ModelNotFoundError, match="no config.json"):
        loading.resolve_model_path(tmp_path)


def test_load_in_4bit_without_bitsandbytes_is_a_clear_error(monkeypatch, tiny_model_dir):
    real = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(ImportError, match="need the bitsandbytes package"):
        HFAutoModelForCausalLM(model_name=str(tiny_model_dir), load_in_4bit=True)


def test_max_length_beyond_context_is_an_error(tiny_model_dir):
    config = loading.load_config(tiny_model_dir)
    with pytest.raises(ValueError, match="beyond the model's context of 256"):
        loading.check_max_length(1000, config)


def test_qlora_trains_on_cpu(tiny_model_dir, chat_data):
    pytest.importorskip("bitsandbytes")
    module = HFAutoModelForCausalLM(model_name=str(tiny_model_dir), load_in_4bit=True,
                                    model_transform=LoRA(r=4, dropout=0.0))
    module.configure_model()
    assert module.model.is_loaded_in_4bit
    dm = CausalLMDataModule(module.tokenizer, chat_data, batch_size=4)
    dm.setup()
    loss = module.training_step(dm.collator(dm.train_samples[:4]))
    loss.backward()
    grads = [p.grad for n, p in module.model.named_parameters() if "lora_" in n]
    assert torch.isfinite(loss) and all(g is not None for g in grads)
