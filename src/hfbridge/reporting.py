"""Run reports: the loss curve PNG from Lightning's ``metrics.csv``."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def read_metrics(metrics_csv: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a Lightning CSVLogger file (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with Path(metrics_csv).open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def plot_loss_curve(metrics_csv: str | Path, out_png: str | Path, title: str = "hfbridge fine-tuning",
                    extra_metrics: Sequence[str] = ()) -> Path:
    """Plot ``train_loss`` and, beside it, ``val_loss`` (every validation, step-wise or at each epoch's end: one
    marker each) against the optimizer step; the ``extra_metrics`` present in the file (for example
    ``["rewards/accuracies", "rewards/margins"]``) in a second panel below, on the same steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(metrics_csv)
    extra = [key for key in dict.fromkeys(extra_metrics) if key in series]
    if extra:
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6.5), dpi=100, sharex=True, height_ratios=(3, 2))
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        if key in series:
            steps, values = zip(*series[key])
            ax.plot(steps, values, style, label=key.replace("_", " "))
    ax.set_ylabel("loss per label token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if extra:
        for key in extra:
            steps, values = zip(*series[key])
            ax2.plot(steps, values, "-" if len(steps) > 1 else "o", label=key)
        ax2.grid(alpha=0.3)
        ax2.legend()
        ax2.set_xlabel("optimizer step")
    else:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
