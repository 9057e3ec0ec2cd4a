"""Tables and figures of the evaluation commands (matplotlib, Agg backend: no display)."""
from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd


def markdown_table(df: pd.DataFrame, floatfmt: str = ".1f") -> str:
    """A GitHub markdown table (numbers formatted, NaN as '–')."""
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "–" if not np.isfinite(v) else format(v, floatfmt)
        return str(v)

    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join("---" if df[c].dtype == object else "---:" for c in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


class _Figures:
    """The part of ``pyplot`` the plots use, on bare ``matplotlib.figure.Figure`` objects: no
    pyplot state, and the caller's backend (a notebook's inline one) is left as it is."""

    def __init__(self):
        import matplotlib

        self.cm = matplotlib.cm

    @staticmethod
    def subplots(nrows=1, ncols=1, *, figsize=None, squeeze=True, **kw):
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(nrows, ncols, squeeze=squeeze, **kw)

    @staticmethod
    def close(fig) -> None:  # nothing to release: pyplot never knew the figure
        return None


def _plt():
    return _Figures()


def _save(plt, fig, path: str | pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _text(name) -> str:
    """A user's name (an .obsm key, a database) as plain text: matplotlib would read ``$...$``
    as mathtext, and fail on what it cannot parse."""
    return str(name).replace("$", r"\$")


def plot_recall_vs_components(table: pd.DataFrame, path: str | pathlib.Path,
                              database: str = "combined", metric: str = "recall_5_95"
                              ) -> pathlib.Path:
    """Recall (mean ± std over null draws) against the number of PCA components, one line per
    representation."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    sub = table[table.database == database]
    for name, g in sub.groupby("representation", sort=False):
        g = g.sort_values("n_components")
        ax.errorbar(g.n_components, 100 * g[f"{metric}_mean"], yerr=100 * g[f"{metric}_std"],
                    marker="o", capsize=2, label=_text(name))
        prim = g[g.primary]
        ax.scatter(prim.n_components, 100 * prim[f"{metric}_mean"], s=120, facecolors="none",
                   edgecolors="k", zorder=3)
    lo, hi = metric.split("_")[1:3]
    ax.axhline(int(lo) + 100 - int(hi), color="grey", ls="--", lw=1, label="random (null rate)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("PCA components")
    ax.set_ylabel(f"recall {lo}/{hi} (%), {_text(database)}")
    ax.set_title("Gene-gene relationship recall (circled: reported)")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_recall_by_database(table: pd.DataFrame, path: str | pathlib.Path,
                            metric: str = "recall_5_95") -> pathlib.Path:
    """Grouped bars: recall per database (and combined) for each representation."""
    plt = _plt()
    prim = table[table.primary]
    reps = list(dict.fromkeys(prim.representation))
    dbs = list(dict.fromkeys(prim.database))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(dbs) * max(1, len(reps)) / 2, 4))
    w = 0.8 / max(len(reps), 1)
    for r, name in enumerate(reps):
        g = prim[prim.representation == name].set_index("database").reindex(dbs)
        ax.bar(np.arange(len(dbs)) + r * w, 100 * g[f"{metric}_mean"], w,
               yerr=100 * g[f"{metric}_std"], label=_text(name), capsize=2)
    lo, hi = metric.split("_")[1:3]
    ax.axhline(int(lo) + 100 - int(hi), color="grey", ls="--", lw=1)
    ax.set_xticks(np.arange(len(dbs)) + w * (len(reps) - 1) / 2, [_text(d) for d in dbs],
                  rotation=30)
    ax.set_ylabel(f"recall {lo}/{hi} (%)")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_perturbation_metrics(best: pd.DataFrame, path: str | pathlib.Path,
                              metrics=("pcst", "lin_top1", "lin_top5", "knn_top1", "knn_top5",
                                       "bmdb", "ilisi_norm", "average")) -> pathlib.Path:
    """One panel per metric, one bar per embedding, labelled with the embedding and its best
    post-processing; a metric no embedding has reads "–" in its panel."""
    plt = _plt()
    metrics = [m for m in metrics if m in best.columns]
    cols = 4
    rows = int(np.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    names = [_text(n) + (f" ({p})" if "postprocess" in best.columns else "")
             for n, p in zip(best.embedding, best.get("postprocess", best.embedding))]
    colors = plt.cm.tab10(np.arange(len(names)) % 10)
    for ax, m in zip(axes.ravel(), metrics):
        values = best[m].to_numpy(dtype=float)
        ax.bar(np.arange(len(names)), values, color=colors)
        if not np.isfinite(values).any():
            ax.text(0.5, 0.5, "–", transform=ax.transAxes, ha="center", va="center", fontsize=20)
        ax.set_title(m)
        ax.set_xticks(np.arange(len(names)), names, rotation=45, ha="right", fontsize=7)
    for ax in axes.ravel()[len(metrics):]:
        ax.axis("off")
    fig.suptitle("Perturbation benchmark (best post-processing per embedding)")
    return _save(plt, fig, path)
