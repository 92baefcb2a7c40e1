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


# Fixed hypothesis/reference pairs: punctuation, case, numbers, repeated words, a partial and an empty answer,
# extra whitespace. hfbridge reports corpus BLEU / 100 and the mean ROUGE F-measures (no stemming).
PAIRS = [
    ("the cat sat on the mat", "the cat sat on a mat"),
    ("The quick brown fox jumps over the lazy dog.", "A quick brown fox jumped over the lazy dog!"),
    ("2021-03-01", "2021-03-01"),
    ("2021-03-02", "2021-03-09"),
    ("hello  world,   hello", "hello world"),
    ("", "nothing was generated"),
    ("Paris is the capital of France", "The capital of France is Paris."),
]


def _reported(pairs, batches: int) -> dict:
    """What :class:`TextMetrics` reports for ``pairs``, fed in ``batches`` updates (it is corpus-level)."""
    metrics = TextMetrics()
    size = -(-len(pairs) // batches)
    for start in range(0, len(pairs), size):
        part = pairs[start : start + size]
        metrics.update_text([h for h, _ in part], [r for _, r in part])
    return metrics.compute()


@pytest.mark.parametrize("batches", [1, 3])
def test_bleu_and_rouge_equal_sacrebleu_and_rouge_score_on_fixed_strings(batches):
    import sacrebleu
    from rouge_score import rouge_scorer

    out = _reported(PAIRS, batches)
    hyps, refs = [h for h, _ in PAIRS], [r for _, r in PAIRS]
    assert out["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score / 100, abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    scores = [scorer.score(r, h) for h, r in PAIRS]
    for key in ("rouge1", "rouge2", "rougeL"):
        assert out[key] == pytest.approx(sum(s[key].fmeasure for s in scores) / len(scores), abs=1e-9)
    # Each pair alone too (sentence-level values, where one corpus statistic cannot hide another).
    for hyp, ref in PAIRS:
        alone = _reported([(hyp, ref)], 1)
        assert alone["bleu"] == pytest.approx(sacrebleu.corpus_bleu([hyp], [[ref]]).score / 100, abs=1e-9)
        for key in ("rouge1", "rouge2", "rougeL"):
            assert alone[key] == pytest.approx(scorer.score(ref, hyp)[key].fmeasure, abs=1e-9)


def test_bleu_and_rouge_of_one_pair_by_hand():
    """The libraries themselves, checked once by hand: equal lengths (no brevity penalty), n-gram precisions
    5/6, 3/5, 2/4, 1/3; ROUGE-1 of a 3-word prefix of a 6-word reference is P 1, R 1/2, F 2/3."""
    out = _reported([("the cat sat on the mat", "the cat sat on a mat")], 1)
    assert out["bleu"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-9)
    out = _reported([("the cat sat", "the cat sat on the mat")], 1)
    assert out["rouge1"] == pytest.approx(2 / 3, abs=1e-9) and out["rougeL"] == pytest.approx(2 / 3, abs=1e-9)
    assert out["rouge2"] == pytest.approx(2 * (2 / 2) * (2 / 5) / (2 / 2 + 2 / 5), abs=1e-9)
