"""Run reports: the loss curve PNG from Lightning's ``metrics.csv``."""

from __future__ import annotations

import csv
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


def plot_loss_curve(metrics_csv: str | Path, out_png: str | Path, title: str = "hfbridge fine-tuning") -> Path:
    """Plot ``train_loss`` (and ``val_loss`` when present) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(metrics_csv)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        if key in series:
            steps, values = zip(*series[key])
            ax.plot(steps, values, style, label=key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per label token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
