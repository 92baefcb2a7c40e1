"""Item 6: a wrapped native model trains with HFAutoModelForCausalLM and saves in a form that reloads."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from native_gpt import GPT, GPTConfig
from native_llama import (
    LlamaForCausalLM,
    NativeLlamaConfig,
    NativeLlamaForCausalLM,
    Transformer,
    model_args_from_config,
)

from hfbridge import CausalLMDataModule, HFAutoModelForCausalLM, OptimizerConfig
from hfbridge.adapters import HFModelArchitecture, NativeModelForCausalLM, to_hf_api

RECORDS = [{"prompt": f"What is the capital of France? ({i})", "completion": " The capital of France is Paris."}
           for i in range(8)]


def _fit(module, tokenizer, steps=6):
    dm = CausalLMDataModule(tokenizer, RECORDS, batch_size=4, seed=0)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, dm)
    return dm


def _batch_loss(module, dm):
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    was_training = module.model.training
    module.model.eval()
    with torch.no_grad():
        loss = module.loss_fn(module.forward(batch).logits, batch["labels"], batch.get("loss_mask"))
    module.model.train(was_training)
    return float(loss)


def test_walkthrough_model_trains_and_reloads(native_transformer, llama_config, tiny_tokenizer, tmp_path):
    config = NativeLlamaConfig(**{k: v for k, v in llama_config.to_dict().items() if k != "model_type"})
    wrapped = NativeLlamaForCausalLM(config, model=native_transformer)
    module = HFAutoModelForCausalLM(model_name=wrapped, tokenizer=tiny_tokenizer,
                                    optim=OptimizerConfig(lr=3e-3, warmup_steps=0))
    module.configure_model()
    dm = CausalLMDataModule(tiny_tokenizer, RECORDS, batch_size=4, seed=0)
    before = _batch_loss(module, dm)
    _fit(module, tiny_tokenizer)
    after = _batch_loss(module, dm)
    assert after < before - 0.5, (before, after)

    module.save_pretrained(tmp_path / "out")
    reloaded = NativeLlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[474, 314, 272, 328]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, module.model.eval()(ids).logits)


def test_seed_walkthrough_class_trains(native_transformer, llama_config, tiny_tokenizer):
    wrapped = LlamaForCausalLM(model=native_transformer, config=llama_config)
    module = HFAutoModelForCausalLM(model_name=wrapped, tokenizer=tiny_tokenizer,
                                    optim=OptimizerConfig(lr=3e-3, warmup_steps=0))
    module.configure_model()
    dm = CausalLMDataModule(tiny_tokenizer, RECORDS, batch_size=4, seed=0)
    before = _batch_loss(module, dm)
    _fit(module, tiny_tokenizer)
    assert _batch_loss(module, dm) < before - 0.5


def test_native_module_wrapped_by_model_transform(tiny_tokenizer, tmp_path):
    """Works today: to_hf_api as the model_transform wraps a plain native module."""
    torch.manual_seed(0)
    native = GPT(GPTConfig(vocab_size=len(tiny_tokenizer)))
    module = HFAutoModelForCausalLM(model_name=native, tokenizer=tiny_tokenizer, model_transform=to_hf_api,
                                    optim=OptimizerConfig(lr=3e-3, warmup_steps=0))
    module.configure_model()
    assert isinstance(module.model, NativeModelForCausalLM)
    dm = CausalLMDataModule(tiny_tokenizer, RECORDS, batch_size=4, seed=0)
    before = _batch_loss(module, dm)
    _fit(module, tiny_tokenizer)
    assert _batch_loss(module, dm) < before - 0.5

    module.save_pretrained(tmp_path / "gpt")
    assert (tmp_path / "gpt" / "tokenizer.json").exists()
    reloaded = NativeModelForCausalLM.from_pretrained(tmp_path / "gpt", native_model=GPT(GPTConfig(vocab_size=len(tiny_tokenizer))))
    ids = torch.tensor([[474, 314, 272, 328]])
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, module.model.eval()(ids).logits)


def test_plain_native_module_is_auto_wrapped(tiny_tokenizer):
    """The proposed behaviour: model_name=<plain nn.Module> is wrapped with to_hf_api by configure_model."""
    native = Transformer(model_args_from_config(NativeLlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)))
    module = HFAutoModelForCausalLM(model_name=native, tokenizer=tiny_tokenizer,
                                    optim=OptimizerConfig(lr=3e-3, warmup_steps=0))
    module.configure_model()
    if not isinstance(module.model, HFModelArchitecture):
        pytest.skip("hfbridge.models.causal_lm does not auto-wrap native modules yet (see docs/adapters.md)")
    dm = CausalLMDataModule(tiny_tokenizer, RECORDS, batch_size=4, seed=0)
    before = _batch_loss(module, dm)
    _fit(module, tiny_tokenizer)
    assert _batch_loss(module, dm) < before - 0.5


def test_lora_on_a_wrapped_native_model(native_transformer, llama_config, tiny_tokenizer):
    from hfbridge import LoRA

    wrapped = LlamaForCausalLM(model=native_transformer, config=llama_config)
    module = HFAutoModelForCausalLM(model_name=wrapped, tokenizer=tiny_tokenizer, model_transform=LoRA(r=8),
                                    optim=OptimizerConfig(lr=1e-2, warmup_steps=0))
    module.configure_model()
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(".output." in n for n in trainable)  # "all-linear" leaves the LM head alone
    dm = CausalLMDataModule(tiny_tokenizer, RECORDS, batch_size=4, seed=0)
    before = _batch_loss(module, dm)
    _fit(module, tiny_tokenizer)
    assert _batch_loss(module, dm) < before - 0.2


def test_resize_token_embeddings_reaches_the_native_model(native_transformer, llama_config):
    config = copy.deepcopy(llama_config)  # resizing updates the config's vocab_size
    model = LlamaForCausalLM(model=native_transformer, config=config).eval()
    ids = torch.tensor([[5, 6, 7]])
    vocab = config.vocab_size
    with torch.no_grad():
        before = model(ids).logits
        model.resize_token_embeddings(vocab + 7, mean_resizing=False)
        after = model(ids).logits
    assert native_transformer.tok_embeddings.num_embeddings == vocab + 7 == config.vocab_size
    assert model.lm_head is native_transformer.output and native_transformer.output.out_features == vocab + 7
    assert after.shape[-1] == vocab + 7
    assert (after[..., :vocab] - before).abs().max().item() < 1e-5
