"""Tiny models and a locally trained tokenizer, for tests, benchmarks and examples that must not touch a hub."""

from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Convert the date to ISO 8601: March 3rd, 2021 -> 2021-03-03",
    "January February March April May June July August September October November December",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
    "What is the capital of France? The capital of France is Paris.",
    "user assistant system: you are a helpful assistant. Answer with one word.",
    "positive negative neutral review: the film was wonderful, the plot was dull, it was fine.",
    "0123456789 - / , . : ; ? ! ' \" ( ) [ ] { }",
]


def build_tiny_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer trained in a second on a small corpus, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((corpus or _CORPUS) * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|pad|>",
        unk_token=None, additional_special_tokens=["<|endoftext|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int, family: str = "llama", **overrides):
    """A 2-layer, 64-wide config of a Llama-family architecture (llama, mistral, qwen2, qwen3)."""
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    if family == "qwen3":
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def build_tiny_causal_lm(path: str | Path, family: str = "llama", seed: int = 0, tokenizer=None, **overrides) -> Path:
    """Save a tiny random causal LM and its tokenizer to ``path`` (a folder ``from_pretrained`` loads)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = tokenizer or build_tiny_tokenizer()
    config = tiny_llama_config(len(tokenizer), family, **overrides)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
