"""Configs and data for the declarative tests: the tiny random Llama of tests/conftest.py, no hub."""

import copy

LABELS = ["positive", "negative", "neutral"]


def make_config(model_dir, output: str = "text", **sections) -> dict:
    """A config mapping for the tiny model: a text output ``iso`` from ``date``, or a category ``sentiment``
    from ``review``."""
    if output == "text":
        cfg = {
            "model_type": "llm", "base_model": str(model_dir),
            "input_features": [{"name": "date", "type": "text"}],
            "output_features": [{"name": "iso", "type": "text"}],
            "prompt": {"template": "Convert {date}"},
            "generation": {"max_new_tokens": 5},
        }
    else:
        cfg = {
            "model_type": "llm", "base_model": str(model_dir),
            "input_features": [{"name": "review", "type": "text"}],
            "output_features": [{"name": "sentiment", "type": "category", "labels": list(LABELS)}],
            "prompt": {"template": "Review: {review}\nAnswer with one of: {__labels__}."},
        }
    cfg["trainer"] = {"type": "finetune", "batch_size": 4, "learning_rate": 1e-2, "eval_batch_size": 4}
    for key, value in sections.items():
        cfg[key] = value
    return copy.deepcopy(cfg)


def date_rows(n: int = 8, split: str | None = None) -> list[dict]:
    rows = [{"date": f"March {i + 1}, 2021", "iso": f"2021-03-{i + 1:02d}"} for i in range(n)]
    if split:
        rows = [{**r, "split": split} for r in rows]
    return rows


def review_rows(n: int = 9) -> list[dict]:
    texts = ["the film was wonderful", "the plot was dull", "it was fine"]
    return [{"review": f"{texts[i % 3]} ({i})", "sentiment": LABELS[i % 3]} for i in range(n)]
