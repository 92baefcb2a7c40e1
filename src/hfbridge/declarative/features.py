"""Output features: how the model's outputs become predictions, and which metrics they keep."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hfbridge.declarative.metrics import CategoryMetrics, TextMetrics
from hfbridge.declarative.schema import FeatureConfig


@dataclass
class TextOutputFeature:
    """Free text, generated; metrics: loss, perplexity, token accuracy, exact match, BLEU, ROUGE."""

    config: FeatureConfig
    tokenizer: object = field(repr=False)
    metrics: TextMetrics = field(default_factory=TextMetrics)

    type = "text"

    @property
    def name(self) -> str:
        return self.config.name

    def decode(self, generated_ids: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated_ids]

    def reset_metrics(self) -> None:
        self.metrics = TextMetrics()


@dataclass
class CategoryOutputFeature:
    """One of a fixed list of labels, chosen by the log-likelihood of each label's tokens after the prompt, so
    every class gets a probability; metrics: loss, token accuracy, accuracy, macro-F1, confusion matrix."""

    config: FeatureConfig
    tokenizer: object = field(repr=False)
    metrics: CategoryMetrics = field(init=False)

    type = "category"

    def __post_init__(self):
        self.metrics = CategoryMetrics(list(self.labels))

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels or [])

    def label_index(self, text: str) -> int:
        """The index of a label, matched after trimming whitespace; -1 if it is none of them."""
        text = text.strip()
        return self.labels.index(text) if text in self.labels else -1

    def decode(self, log_likelihoods: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """``(labels, probabilities)`` from per-label log-likelihoods ``[batch, labels]``."""
        probabilities = torch.softmax(log_likelihoods.float(), dim=-1)
        return [self.labels[i] for i in probabilities.argmax(-1).tolist()], probabilities

    def reset_metrics(self) -> None:
        self.metrics = CategoryMetrics(list(self.labels))


OutputFeature = TextOutputFeature | CategoryOutputFeature


def build_output_feature(config: FeatureConfig, tokenizer) -> OutputFeature:
    if config.type == "category":
        return CategoryOutputFeature(config, tokenizer)
    if config.type == "text":
        return TextOutputFeature(config, tokenizer)
    raise ValueError(f"unknown output feature type {config.type!r}")
