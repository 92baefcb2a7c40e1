"""Item 4: save_pretrained / from_pretrained, and the Auto classes after registration."""

import json

import torch
from native_gpt import GPT, GPTConfig
from native_llama import LlamaForCausalLM, NativeLlamaConfig, NativeLlamaForCausalLM, register_auto_classes
from transformers import AutoConfig, AutoModelForCausalLM

from hfbridge.adapters import NativeModelForCausalLM, to_hf_api
from hfbridge.adapters import register_auto_classes as register_native_auto_classes
from hfbridge.testing import tiny_llama_config


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_walkthrough_model_saves_and_reloads(native_transformer, llama_config, tmp_path, prompt_ids):
    model = LlamaForCausalLM(model=native_transformer, config=llama_config).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"] and saved["model_type"] == "llama"
    # the walk-through's class needs its native model to be rebuilt: from_pretrained hands it over
    from native_llama import Transformer, model_args_from_config

    fresh = Transformer(model_args_from_config(llama_config))
    reloaded = NativeLlamaForCausalLM.from_pretrained(tmp_path, model=fresh).eval()
    assert torch.equal(_logits(reloaded, prompt_ids), _logits(model, prompt_ids))


def test_auto_model_for_causal_lm_after_registration(native_transformer, llama_config, tmp_path, prompt_ids,
                                                     hf_llama):
    register_auto_classes()
    config = AutoConfig.for_model("native_llama", **{k: v for k, v in llama_config.to_dict().items()
                                                     if k not in ("model_type", "architectures", "transformers_version")})
    assert isinstance(config, NativeLlamaConfig)
    model = NativeLlamaForCausalLM(config, model=native_transformer).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is NativeLlamaForCausalLM
    diff = (_logits(reloaded, prompt_ids) - _logits(hf_llama, prompt_ids)).abs().max().item()
    print(f"max |logit diff| reloaded vs HF LlamaForCausalLM: {diff:.3e}")
    assert torch.equal(_logits(reloaded, prompt_ids), _logits(model, prompt_ids)) and diff < 1e-5
    assert torch.equal(reloaded.generate(prompt_ids, max_new_tokens=6, do_sample=False),
                       model.generate(prompt_ids, max_new_tokens=6, do_sample=False))


def test_auto_model_for_a_to_hf_api_model(tiny_tokenizer, tmp_path, prompt_ids):
    register_native_auto_classes()
    torch.manual_seed(0)
    model = to_hf_api(GPT(GPTConfig(vocab_size=len(tiny_tokenizer))), tiny_tokenizer).eval()
    model.save_pretrained(tmp_path)
    torch.manual_seed(1)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, native_model=GPT(GPTConfig(vocab_size=len(tiny_tokenizer))))
    assert type(reloaded) is NativeModelForCausalLM
    assert torch.equal(_logits(reloaded, prompt_ids), _logits(model, prompt_ids))


def test_registered_config_builds_from_tiny_llama_config(tiny_tokenizer):
    register_auto_classes()
    config = tiny_llama_config(len(tiny_tokenizer), family="native_llama")
    model = AutoModelForCausalLM.from_config(config)
    assert type(model) is NativeLlamaForCausalLM and model.config.vocab_size == len(tiny_tokenizer)
