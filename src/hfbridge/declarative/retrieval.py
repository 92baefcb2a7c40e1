"""Few-shot examples retrieved per prompt (``prompt.few_shot_retrieval: similarity``).

The pool is the config's ``prompt.examples`` (the training split, frozen there by ``hfbridge train``, so a saved
model retrieves from the same pool). Each record's input, rendered by the prompt template without examples, is
embedded by the model itself (:meth:`hfbridge.declarative.LLM.embed`: mean-pooled last hidden state, unit
length), and the k pool records with the highest cosine similarity are shown, most similar first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hfbridge.declarative.prompt import value_text
from hfbridge.declarative.schema import LLMConfig


def record_key(cfg: LLMConfig, record: dict) -> tuple[str, ...]:
    """A record's input columns and target, as text: what makes two records the same example."""
    columns = [f.name for f in cfg.input_features] + [cfg.output_feature.name]
    return tuple(value_text(record.get(c)) for c in columns)


def nearest(queries: torch.Tensor, pool: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> list[list[int]]:
    """For each row of ``queries`` ``[n, d]``, the indices of the ``k`` rows of ``pool`` ``[m, d]`` with the highest
    dot product (cosine, for unit vectors), highest first; ``exclude`` ``[n, m]`` (true: never pick) leaves some
    out. Ties go to the earlier pool record."""
    scores = queries.float() @ pool.float().T
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return [[int(j) for j, v in zip(row_indices[:k], row_values[:k]) if v != float("-inf")]
            for row_indices, row_values in zip(indices, values)]


def same_record_mask(cfg: LLMConfig, records: Sequence[dict], pool: Sequence[dict]) -> torch.Tensor:
    """``[len(records), len(pool)]``: true where a pool example is the record itself (its inputs and target), so that
    a training sample is never shown its own answer."""
    keys = [record_key(cfg, p) for p in pool]
    return torch.tensor([[record_key(cfg, r) == key for key in keys] for r in records], dtype=torch.bool)
