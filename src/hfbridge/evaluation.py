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


def preference_accuracy(model, tokenizer, pairs: Sequence, batch_size: int = 16, reward: bool = False,
                        max_length: int | None = None) -> float:
    """The share of preference pairs (:class:`hfbridge.data.preference.PreferenceExample`) whose chosen completion
    the model prefers: a higher summed log-probability after the prompt, or with ``reward=True`` (a reward model)
    a higher reward. Ties count as not preferred."""
    import torch

    from hfbridge.data.formats import pad_id
    from hfbridge.data.preference import PreferenceCollator, tokenize_preference_example
    from hfbridge.models.chunked_loss import split_head
    from hfbridge.models.preference import reward_scores, sequence_logps

    if not pairs:
        raise ValueError("no preference pairs to score")
    collate = PreferenceCollator(pad_id(tokenizer))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    split = None if reward else split_head(model)[0]  # found once, not per batch
    wins = 0
    try:
        for start in range(0, len(pairs), batch_size):
            samples = [tokenize_preference_example(tokenizer, p, max_length) for p in pairs[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in collate(samples).items() if torch.is_tensor(v)}
            n = len(samples)
            with torch.no_grad():
                scores = reward_scores(model, batch) if reward else sequence_logps(model, batch, 2 * n, split)[0]
            wins += int((scores[:n] > scores[n:]).sum())
    finally:
        model.train(was_training)
    return wins / len(pairs)
