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
    last = max([s for s, _ in train + val], default=1)
    # Right panel: the run after its first 10% (the warm-up), where the early drop no longer
    # hides the slower progress on the y scale.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for ax, start in zip(axes, (0, 0.1 * last)):
        t = [(s, v) for s, v in train if s >= start]
        v = [(s, x) for s, x in val if s >= start]
        if t:
            ax.plot(*zip(*t), label="train", lw=1.2)
        if v:
            ax.plot(*zip(*v), "o-", label="validation", lw=1.2, ms=4)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("loss (mean over observable genes)")
    axes[0].set_title(title or pathlib.Path(metrics_csv).parent.name)
    axes[1].set_title("after warm-up (zoomed)")
    fig.tight_layout()
    out_png = pathlib.Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
