"""The loss curves of a run as a PNG: ``plot_losses(RUN/metrics.csv, RUN/loss.png)``."""
from __future__ import annotations

import pathlib

from txfm.files import write_atomic

from .metrics import read_metrics


def plot_losses(metrics_csv: str | pathlib.Path, out_png: str | pathlib.Path,
                title: str | None = None) -> pathlib.Path:
    """Training loss (per logged step) and validation loss against step; returns ``out_png``."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    rows = read_metrics(metrics_csv)
    train = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    last = max([s for s, _ in train + val], default=1)
    # Right panel: the run after its first 10% (the warm-up), where the early drop no longer
    # hides the slower progress on the y scale.
    diag = [r for r in rows if r.get("cls_gain") is not None]
    fig = Figure(figsize=(16.5 if diag else 11, 4), dpi=120)
    axes = fig.subplots(1, 3 if diag else 2)
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
    if diag:  # is it learning? (txfm.train.diagnostics)
        ax = axes[2]
        steps = [r["step"] for r in diag]
        ax.plot(steps, [r["masked_r2"] for r in diag], "o-", label="masked-gene R² vs gene means")
        ax.plot(steps, [r["cls_gain"] for r in diag], "s-", label="CLS gain (vs shuffled CLS)")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("share of deviance beyond gene means")
        rank = ax.twinx()
        rank.plot(steps, [r["erank"] for r in diag], "^--", color="tab:green", label="erank")
        rank.set_ylabel("effective rank of CLS embeddings")
        bad = [r["step"] for r in diag if r.get("collapsed")]
        for b in bad:
            ax.axvspan(b - 0.5, b + 0.5, color="red", alpha=0.3)
        now = bool(diag[-1].get("collapsed"))
        ax.set_title("learning diagnostics" + (" — COLLAPSED" if now else
                                               f" (collapsed at step {bad[-1]}, not since)"
                                               if bad else ""))
        lines = ax.get_legend_handles_labels()
        more = rank.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = pathlib.Path(out_png)
    write_atomic(out_png, fig.savefig)  # an image viewer or notebook never sees half a file
    return out_png
