"""A tiny byte-level BPE tokenizer trained locally in a second, with ChatML special tokens and template: the
tokenizer of the tiny demo models (:mod:`hfbridge.models.tiny_image_text`), and of tests and benchmarks that must not
touch a hub (:mod:`hfbridge.testing` re-exports it)."""

from __future__ import annotations

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

BASE_CORPUS = [
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
    """A byte-level BPE tokenizer trained in a second on a small corpus (default :data:`BASE_CORPUS`), with ChatML
    special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((corpus or BASE_CORPUS) * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|pad|>",
        unk_token=None, additional_special_tokens=["<|endoftext|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast
