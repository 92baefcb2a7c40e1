"""Scoring generated answers: exact match against the references."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


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


def exact_match(predictions: Sequence[str], references: Sequence[str], prompts: Sequence | None = None) -> GenerationEval:
    """The share of ``predictions`` equal to their ``references`` after :func:`normalise_answer`."""
    if not references:
        raise ValueError("no records to evaluate")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    result = GenerationEval(0.0, list(prompts or []), list(references), list(predictions))
    result.accuracy = sum(result.correct) / len(references)
    return result
