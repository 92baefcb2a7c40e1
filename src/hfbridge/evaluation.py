"""Evaluate generation on held-out records: exact match of the generated answer against the reference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hfbridge.data.formats import prompt_and_reference
from hfbridge.generation import generate


def normalise_answer(text: str) -> str:
    """Whitespace-trimmed, with inner runs of whitespace collapsed; case is kept (formats are case-sensitive)."""
    return " ".join(text.split())


@dataclass
class GenerationEval:
    accuracy: float
    prompts: list = field(repr=False)
    references: list[str] = field(repr=False)
    predictions: list[str] = field(repr=False)

    @property
    def correct(self) -> list[bool]:
        return [normalise_answer(p) == normalise_answer(r) for p, r in zip(self.predictions, self.references)]


def exact_match(
    model, tokenizer, records: Sequence[dict], fmt: str, max_new_tokens: int = 32, batch_size: int = 16
) -> GenerationEval:
    """Generate greedily for each record's prompt and score exact match against its reference."""
    if not records:
        raise ValueError("no records to evaluate")
    pairs = [prompt_and_reference(r, fmt) for r in records]
    prompts = [p for p, _ in pairs]
    references = [r for _, r in pairs]
    predictions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores = [normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references)]
    return GenerationEval(sum(scores) / len(scores), prompts, references, predictions)
