"""Per-gene expression statistics of a training corpus, for the decoder's starting point.

TxFM's decoder predicts every gene of every sample. At initialisation its per-gene output
bias decides the starting prediction; a bias at each gene's own optimum saves the many steps
(and most of the early gradient) that a constant start spends learning per-gene levels
(``docs/learning.md``). The optimum of the Poisson loss (arXiv:2605.31562 §4) for a gene
predicted at one constant value ``x_hat`` over the cells that profile it is
``x_hat* = log(mean(exp(x)))`` with ``exp(x) = 1 + target_sum * c / S``, so it needs only:

* ``n_cells [G]``: training cells whose dataset profiles the gene,
* ``frac_sum [G]``: the sum over those cells of ``c / S`` (count over the row's total count),
* ``log1p_sum [G]``: the sum of ``log1p(L * c / S)`` at one ``L``, ``GeneStats.target_sum``
  (the converter's: ``STATS_TARGET_SUM``), for the mean-squared-error optimum ``mean(x)``.
  Unlike ``frac_sum`` it cannot be rescaled to another ``L``: a model trained at another
  ``target_sum`` with an MSE-type loss needs the sums again (:func:`accumulate`).

The converter accumulates them while it writes the shards (``manifest.json`` keys
``gene_obs_cells``, ``gene_frac_sum``, ``gene_log1p_sum``); :func:`accumulate` is the same
computation on CSR batches, used for collections written before these keys existed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

STATS_TARGET_SUM = 1e5  # the L at which the converter keeps log1p_sum (the paper's)


@dataclass
class GeneStats:
    """Sums over training cells, per gene (all float64/int64 ``[G]``)."""

    n_cells: np.ndarray
    frac_sum: np.ndarray
    log1p_sum: np.ndarray
    target_sum: float = STATS_TARGET_SUM

    @classmethod
    def zeros(cls, n_genes: int, target_sum: float = STATS_TARGET_SUM) -> "GeneStats":
        return cls(np.zeros(n_genes, np.int64), np.zeros(n_genes), np.zeros(n_genes),
                   float(target_sum))

    def add_csr(self, indptr: np.ndarray, indices: np.ndarray, counts: np.ndarray,
                observable_cells: np.ndarray) -> None:
        """Add CSR rows (raw counts over the vocabulary); ``observable_cells [G]`` int: how many
        of these rows profile each gene."""
        indptr = np.asarray(indptr, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.float64)
        rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
        totals = np.add.reduceat(counts, indptr[:-1]) if counts.size else np.zeros(0)
        totals = np.where(np.diff(indptr) > 0, totals, 1.0)
        frac = counts / totals[rows] if counts.size else counts
        g = self.n_cells.size
        self.frac_sum += np.bincount(indices, weights=frac, minlength=g)
        self.log1p_sum += np.bincount(indices, weights=np.log1p(self.target_sum * frac),
                                      minlength=g)
        self.n_cells += np.asarray(observable_cells, dtype=np.int64)

    def mean_exp_target(self, target_sum: float) -> np.ndarray:
        """``[G]`` mean of ``exp(x) = 1 + target_sum * c / S`` over the cells profiling each gene
        (1.0 for a gene no cell profiles)."""
        return 1.0 + target_sum * self.frac_sum / np.maximum(self.n_cells, 1)

    def kept_at(self, target_sum: float) -> bool:
        """Whether ``log1p_sum`` was kept at this ``target_sum`` (:meth:`mean_target` serves it)."""
        return math.isclose(target_sum, self.target_sum)

    def mean_target(self, target_sum: float) -> np.ndarray:
        """``[G]`` mean of ``x = log1p(target_sum * c / S)`` over the cells profiling each gene.

        Raises:
            ValueError: ``target_sum`` is not the ``L`` these sums were kept at (the mean of a
                log does not rescale); :func:`accumulate` at that ``target_sum`` gives them.
        """
        if not self.kept_at(target_sum):
            raise ValueError(f"these gene statistics hold mean log1p values at target_sum "
                             f"{self.target_sum:g}, not {target_sum:g}; accumulate them again at "
                             f"{target_sum:g} (txfm.data.stats.accumulate(..., target_sum=))")
        return self.log1p_sum / np.maximum(self.n_cells, 1)

    def to_json(self) -> dict:
        return {"gene_obs_cells": self.n_cells.tolist(), "gene_frac_sum": self.frac_sum.tolist(),
                "gene_log1p_sum": self.log1p_sum.tolist(), "stats_target_sum": self.target_sum}

    @classmethod
    def from_json(cls, doc: dict) -> "GeneStats | None":
        """From a manifest document; None when it predates these keys."""
        if "gene_frac_sum" not in doc:
            return None
        return cls(np.asarray(doc["gene_obs_cells"], np.int64),
                   np.asarray(doc["gene_frac_sum"], np.float64),
                   np.asarray(doc["gene_log1p_sum"], np.float64),
                   float(doc.get("stats_target_sum", STATS_TARGET_SUM)))


def accumulate(loader, max_cells: int = 50_000, target_sum: float = STATS_TARGET_SUM
               ) -> GeneStats:
    """Gene statistics from up to ``max_cells`` cells of ``loader`` (CPU CSR batches with
    ``indptr, indices, counts, dataset_ids``; its ``observable`` table, when it has one), with
    ``log1p_sum`` kept at ``target_sum``."""
    stats = GeneStats.zeros(int(loader.n_genes), target_sum)
    obs = getattr(loader, "observable", None)
    mask = None if obs is None else obs.mask.cpu().numpy()
    seen = 0
    for batch in loader:
        rows = int(batch.indptr.shape[0]) - 1
        if mask is None:
            observable_cells = np.full(stats.n_cells.size, rows)
        else:
            ids = batch.dataset_ids.cpu().numpy().astype(np.int64)
            observable_cells = mask[ids].sum(0)
        stats.add_csr(batch.indptr.cpu().numpy(), batch.indices.cpu().numpy(),
                      batch.counts.cpu().numpy(), observable_cells)
        seen += rows
        if seen >= max_cells:
            break
    return stats
