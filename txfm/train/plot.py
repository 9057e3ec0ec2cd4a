"""The loss curves of a run as a PNG: ``plot_losses(RUN/metrics.csv, RUN/loss.png)``."""
from __future__ import annotations

import pathlib

from .metrics import read_metrics


def plot_losses(metrics_csv: str | pathlib.Path, out_png: str | pathlib.Path,
                title: str | None = None) -> pathlib.Path:
    """Training loss (per logged step) and validation loss against step; returns ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_csv)
    train = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.2, ms=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over observable genes)")
    ax.set_title(title or pathlib.Path(metrics_csv).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = pathlib.Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
