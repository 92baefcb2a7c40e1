"""Records to token ids: the prompt, the target and the stop tokens, cut exactly where the core's formats cut.

A sample is tokenized by :func:`hfbridge.data.formats.tokenize_record` (the one place samples become tokens) and
split into ``prompt_ids`` (not trained), ``target_ids`` (the target's own tokens) and ``stop_ids`` (what the format
trains after the target: EOS, or the chat template's end-of-turn tokens). ``prompt + target + stop`` is therefore
the very sequence the core's DataModule trains on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hfbridge.data.formats import tokenize_record
from hfbridge.declarative.prompt import PromptRenderer
from hfbridge.generation import prompt_ids
from hfbridge.losses import IGNORE_INDEX


def full_and_first_target(tokenizer, sample: dict, fmt: str) -> tuple[list[int], int]:
    """The sample's token ids and the index of its first trained token (the core's shifted form undone)."""
    tokenized = tokenize_record(tokenizer, sample, fmt)
    if not tokenized.labels or tokenized.labels[-1] == IGNORE_INDEX:
        raise ValueError("the sample's last token is not trained; the target must come last")
    full = [*tokenized.input_ids, tokenized.labels[-1]]
    first = next(t for t, label in enumerate(tokenized.labels) if label != IGNORE_INDEX) + 1
    return full, first


@dataclass
class SampleEncoder:
    tokenizer: object
    renderer: PromptRenderer
    stop_ids: list[int] = field(init=False)

    def __post_init__(self):
        if self.renderer.chat:
            # What the chat template trains after an empty answer: its end-of-turn token(s).
            full, first = full_and_first_target(self.tokenizer, self.renderer.sample({}, ""), "messages")
            self.stop_ids = full[first:]
        else:
            eos = self.tokenizer.eos_token_id
            self.stop_ids = [eos] if eos is not None else []

    def prompt_ids(self, record: dict, examples: list[dict] | None = None) -> list[int]:
        """The prompt as generation sees it (with ``examples``, default the renderer's static ones)."""
        return prompt_ids(self.tokenizer, self.renderer.prompt(record, examples))

    def split(self, record: dict, target: str | None = None) -> tuple[list[int], list[int]]:
        """``(prompt_ids, target_ids)`` of a record; ``prompt + target + stop_ids`` is the core's sample."""
        full, first = full_and_first_target(self.tokenizer, self.renderer.sample(record, target), self.renderer.fmt)
        trained = full[first:]
        n_stop = len(self.stop_ids)
        if n_stop and trained[-n_stop:] != self.stop_ids:
            raise ValueError(f"the sample does not end with the format's stop tokens {self.stop_ids}: {trained}")
        return full[:first], trained[: len(trained) - n_stop]

    def target_ids(self, record: dict, target: str | None = None) -> list[int]:
        return self.split(record, target)[1]
