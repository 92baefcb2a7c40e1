"""Text and category metrics against hand-computed values; the confusion matrix PNG; the table."""

import math

import pytest
import torch

from hfbridge.declarative.metrics import (
    CategoryMetrics,
    TextMetrics,
    TokenStats,
    format_table,
    plot_confusion_matrix,
)


def test_token_stats_are_loss_perplexity_and_accuracy_over_labelled_tokens():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]]])
    labels = torch.tensor([[0, 0, -100]])
    stats = TokenStats()
    stats.update(logits, labels)
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2
    out = stats.compute()
    assert out["loss"] == pytest.approx(expected) and out["perplexity"] == pytest.approx(math.exp(expected))
    assert out["token_accuracy"] == 0.5


def test_text_metrics_exact_match_bleu_and_rouge():
    metrics = TextMetrics()
    metrics.update_text(["2021-03-01", " 2021-03-02 ", "the cat sat on the mat"],
                        ["2021-03-01", "2021-03-09", "the cat sat on the mat"])
    out = metrics.compute()
    assert out["exact_match"] == pytest.approx(2 / 3) and out["samples"] == 3
    assert 0.0 < out["bleu"] < 1.0 and 0.0 < out["rouge2"] < out["rouge1"] <= 1.0
    perfect = TextMetrics()
    perfect.update_text(["a b c d"], ["a b c d"])
    assert perfect.compute()["bleu"] == pytest.approx(1.0) and perfect.compute()["rougeL"] == 1.0


def test_category_metrics_accuracy_macro_f1_and_confusion_matrix(tmp_path):
    metrics = CategoryMetrics(["a", "b", "c"])
    probabilities = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    metrics.update([0, 1, 1, 2], probabilities)
    out = metrics.compute()
    assert out["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert out["accuracy"] == 0.75
    f1_a, f1_b, f1_c = 2 / 3, 2 / 3, 1.0  # a: p 1/2 r 1; b: p 1 r 1/2; c: perfect
    assert out["macro_f1"] == pytest.approx((f1_a + f1_b + f1_c) / 3)
    assert out["class_nll"] == pytest.approx(-(math.log(0.8) + math.log(0.7) + math.log(0.3) + math.log(0.7)) / 4)
    png = plot_confusion_matrix(out["confusion_matrix"], out["labels"], tmp_path / "cm.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_table_has_a_row_per_metric_and_a_column_per_run():
    table = format_table({"before": {"accuracy": 0.25, "samples": 8}, "after": {"accuracy": 0.875, "samples": 8}})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "before", "after"]
    assert lines[2].split() == ["accuracy", "0.2500", "0.8750"] and lines[3].split() == ["samples", "8", "8"]
