"""Metrics of the declarative LLM's outputs.

Text: loss and perplexity per target token (teacher-forced), token accuracy (the argmax of the next-token logits
equals the target token), exact match of the generated text (whitespace-normalised), BLEU (sacrebleu, corpus
level) and ROUGE-1/2/L F-measures (rouge-score). BLEU is reported in [0, 1] (sacrebleu's score / 100).

Category: the same loss and token accuracy on the true label's tokens, then accuracy, macro-F1, per-class
precision/recall/F1 and the confusion matrix (rows: true label, columns: predicted), and the mean negative log
probability of the true class under the label-likelihood distribution.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hfbridge.evaluation import exact_match, normalise_answer
from hfbridge.losses import IGNORE_INDEX


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"text metrics need the {package!r} package: pip install {package}") from e


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU in [0, 1] (sacrebleu with its default 13a tokenizer)."""
    sacrebleu = _require("sacrebleu", "sacrebleu")
    if not hypotheses:
        return 0.0
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score) / 100.0


def rouge(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge-score)."""
    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score")
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs each scorer it builds
    keys = ("rouge1", "rouge2", "rougeL")
    if not hypotheses:
        return dict.fromkeys(keys, 0.0)
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=False)
    totals = dict.fromkeys(keys, 0.0)
    for hyp, ref in zip(hypotheses, references):
        scores = scorer.score(ref, hyp)
        for key in keys:
            totals[key] += scores[key].fmeasure
    return {key: value / len(hypotheses) for key, value in totals.items()}


@dataclass
class TokenStats:
    """Teacher-forced loss and accuracy over target tokens, summed over batches."""

    loss_sum: float = 0.0
    tokens: int = 0
    correct: int = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """``labels`` are next-token targets aligned with ``logits`` (-100 where not scored)."""
        valid = labels != IGNORE_INDEX
        if not bool(valid.any()):
            return
        picked = logits[valid].float()
        targets = labels[valid]
        self.loss_sum += float(torch.nn.functional.cross_entropy(picked, targets, reduction="sum"))
        self.correct += int((picked.argmax(-1) == targets).sum())
        self.tokens += int(valid.sum())

    def compute(self) -> dict[str, float]:
        if not self.tokens:
            return {}
        loss = self.loss_sum / self.tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "token_accuracy": self.correct / self.tokens}


@dataclass
class TextMetrics:
    tokens: TokenStats = field(default_factory=TokenStats)
    hypotheses: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)

    def update_text(self, predictions: list[str], references: list[str]) -> None:
        self.hypotheses.extend(predictions)
        self.references.extend(references)

    def compute(self) -> dict:
        out: dict = dict(self.tokens.compute())
        if self.hypotheses:
            hyps = [normalise_answer(h) for h in self.hypotheses]
            refs = [normalise_answer(r) for r in self.references]
            out["exact_match"] = exact_match(hyps, refs).accuracy
            out["bleu"] = bleu(hyps, refs)
            out.update(rouge(hyps, refs))
            out["samples"] = len(hyps)
        return out


@dataclass
class CategoryMetrics:
    labels: list[str]
    tokens: TokenStats = field(default_factory=TokenStats)
    y_true: list[int] = field(default_factory=list)
    y_pred: list[int] = field(default_factory=list)
    nll_sum: float = 0.0

    def update(self, true_index: list[int], probabilities: torch.Tensor) -> None:
        """``probabilities``: ``[batch, labels]``, each row summing to 1."""
        self.y_true.extend(true_index)
        self.y_pred.extend(probabilities.argmax(-1).tolist())
        picked = probabilities[torch.arange(len(true_index)), torch.tensor(true_index)]
        self.nll_sum += float(-picked.clamp(min=1e-12).log().sum())

    def confusion_matrix(self) -> list[list[int]]:
        k = len(self.labels)
        matrix = [[0] * k for _ in range(k)]
        for t, p in zip(self.y_true, self.y_pred):
            matrix[t][p] += 1
        return matrix

    def compute(self) -> dict:
        out: dict = dict(self.tokens.compute())
        n = len(self.y_true)
        if not n:
            return out
        matrix = self.confusion_matrix()
        per_class, f1s = {}, []
        for i, label in enumerate(self.labels):
            tp = matrix[i][i]
            predicted = sum(row[i] for row in matrix)
            support = sum(matrix[i])
            precision = tp / predicted if predicted else 0.0
            recall = tp / support if support else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
            f1s.append(f1)
        out["accuracy"] = sum(t == p for t, p in zip(self.y_true, self.y_pred)) / n
        out["macro_f1"] = sum(f1s) / len(f1s)
        out["class_nll"] = self.nll_sum / n
        out["samples"] = n
        out["per_class"] = per_class
        out["labels"] = list(self.labels)
        out["confusion_matrix"] = matrix
        return out


def plot_confusion_matrix(matrix: list[list[int]], labels: list[str], path: str | Path,
                          title: str = "confusion matrix") -> Path:
    """A PNG of the confusion matrix (rows true, columns predicted), with the counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 1.1 * k + 2), dpi=100)
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = max((max(row) for row in matrix), default=0)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center",
                    color="white" if matrix[i][j] > peak / 2 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


SCALAR_ORDER = ("loss", "perplexity", "token_accuracy", "exact_match", "bleu", "rouge1", "rouge2", "rougeL",
                "accuracy", "macro_f1", "class_nll", "samples")


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The numbers of a metrics dict, in a fixed order (nested values such as the confusion matrix left out)."""
    return {k: metrics[k] for k in SCALAR_ORDER if isinstance(metrics.get(k), (int, float))}


def format_table(columns: dict[str, dict]) -> str:
    """A text table: one row per metric, one column per metrics dict (for example ``before`` and ``after``)."""
    names = [n for n in SCALAR_ORDER if any(n in scalar_metrics(m) for m in columns.values())]
    header = ["metric", *columns]
    rows = []
    for name in names:
        row = [name]
        for metrics in columns.values():
            value = metrics.get(name)
            row.append("-" if value is None else f"{value:d}" if isinstance(value, int) else f"{value:.4f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_confusion_matrix(matrix: list[list[int]], labels: list[str]) -> str:
    """The confusion matrix as text: rows are true labels, columns predicted ones."""
    width = max(len(label) for label in labels + ["true \\ predicted"])
    cell = max(max(len(label) for label in labels), max((len(str(v)) for row in matrix for v in row), default=1))
    lines = ["true \\ predicted".ljust(width) + "  " + "  ".join(label.rjust(cell) for label in labels)]
    for label, row in zip(labels, matrix):
        lines.append(label.ljust(width) + "  " + "  ".join(str(v).rjust(cell) for v in row))
    return "\n".join(lines)

