"""Is the model learning? Three numbers per validation, in ``metrics.csv`` and the progress bar.

A masked autoencoder can drive its loss down while learning nothing about cells: predicting
each gene's corpus mean already removes most of the loss, and a decoder that ignores the CLS
embedding does exactly that (``docs/learning.md``). These diagnostics separate the two:

* ``masked_r2``: on the genes a cell did **not** show, the share of the per-gene-mean
  predictor's excess loss that the model removes: ``(L_mean - L_model) / (L_mean - L_sat)``,
  where ``L_sat`` is the loss of a perfect prediction. For MSE this is R²; for the Poisson loss
  it is the share of Poisson deviance explained beyond per-gene means. 0 = no better than
  means; 1 = perfect.
* ``cls_gain``: the same scale, for how much worse the loss gets when every cell's CLS
  embedding is swapped with another cell's (``(L_shuffled - L_model) / (L_mean - L_sat)``,
  all observable genes). ~0 means the decoder ignores the cell: collapse.
* ``erank``: effective rank of the validation CLS embeddings (``exp`` of the entropy of the
  normalised singular values of the standardised embedding matrix); ~1 means every cell maps
  to one line (typically library size).

:func:`is_collapsed` flags a run whose CLS gain or rank says that the embeddings carry no
cell state, once the validation has :data:`MIN_CELLS` cells to tell it from.
"""
from __future__ import annotations

import math

import torch

from txfm.model.losses import inverse_activation
from txfm_kernels.poisson.reference import dense_gene_mask

COLLAPSE_CLS_GAIN = 0.01  # below: the decoder hardly uses the cell's embedding
COLLAPSE_ERANK = 1.5  # below: embeddings lie on about one line
# The effective rank of n (centred) cells is at most n - 1: two cells always give 1.0, "collapsed"
# whatever the model. Only with that bound well above the threshold (10x) does a low rank say
# something about the model, not the sample: 16 cells.
MIN_CELLS = 1 + math.ceil(10 * COLLAPSE_ERANK)


def effective_rank(e: torch.Tensor) -> float:
    """``exp(H(p))`` with ``p`` the normalised singular values of ``e [N, d]`` with every
    dimension standardised (so one high-variance coordinate, common in transformer outputs,
    does not hide the others): 1 = all cells on one line, ``d`` = isotropic."""
    e = e.double()
    if e.shape[0] < 2 or not bool(torch.isfinite(e).all()):  # too few cells, or a diverged model
        return float("nan")
    e = e - e.mean(0)
    e = e / e.std(0).clamp_min(1e-12)
    s = torch.linalg.svdvals(e)
    p = s / s.sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def is_collapsed(row: dict) -> bool | None:
    """Whether the diagnostics ``row`` say collapse; None when its ``cells`` (if given) are
    fewer than :data:`MIN_CELLS`, too few to tell."""
    if row.get("cells") is not None and row["cells"] < MIN_CELLS:
        return None
    gain, rank = row.get("cls_gain"), row.get("erank")
    return ((gain is not None and gain < COLLAPSE_CLS_GAIN)
            or (rank is not None and rank < COLLAPSE_ERANK))


class LearningProbe:
    """Accumulates the diagnostics over validation batches; :meth:`result` gives the row.

    Under DDP each rank adds its own batches (with their global ``index``); :meth:`gather`
    then pools every rank's embeddings, and only then are the sums complete: a one-cell batch
    swaps its CLS with the last cell of the batch before it in the global order, which may
    be another rank's, so the numbers do not depend on the number of ranks.
    """

    def __init__(self, model, mean_logits: torch.Tensor):
        self.model = model
        self.mean_logits = mean_logits  # [G] logits of the per-gene-mean predictor
        self.sums = torch.zeros(6, dtype=torch.float64, device=mean_logits.device)
        self.embeddings: dict[int, torch.Tensor] = {}  # global batch index -> [b, d]
        self._lonely: list[tuple] = []  # one-cell batches: (index, target, observable, lib, loss)
        self.cells = 0

    @torch.no_grad()
    def add(self, sample, key_padding_mask, index: int | None = None) -> torch.Tensor:
        """Adds one batch (``index``: its place in the global validation order, default the
        next); returns its ordinary loss (mean over rows)."""
        index = len(self.embeddings) if index is None else int(index)
        m, cfg = self.model, self.model.config
        e = m.encoder(sample.gene_ids, sample.values, key_padding_mask)
        z = m.decoder(e).float()
        b, g = z.shape
        observable = None if cfg.include_unobserved else dense_gene_mask(
            sample.gene_mask, b, g, z.device)
        if observable is None:  # every gene counts
            observable = torch.ones(b, g, dtype=torch.bool, device=z.device)
        shown = torch.zeros_like(observable)
        ids = sample.gene_ids.long()
        keep = (torch.ones_like(ids, dtype=torch.bool) if sample.key_padding_mask is None
                else ~sample.key_padding_mask)
        shown.scatter_(1, torch.where(keep, ids, 0), keep)
        masked = observable & ~shown
        lib = sample.library_size
        loss = m.loss
        perfect = inverse_activation(sample.target, cfg)
        mean = self.mean_logits.to(z.dtype).expand(b, g)
        model_loss = loss(z, sample.target, observable, lib)
        if b > 1:  # a cell's CLS swapped for another cell's of the batch
            shuffled = loss(m.decoder(e.roll(1, 0)).float(), sample.target, observable, lib)
        else:  # its partner may be on another rank: see gather()
            shuffled = model_loss
            self._lonely.append((index, sample.target, observable, lib, model_loss))
        vals = torch.stack([
            loss(z, sample.target, masked, lib), loss(mean, sample.target, masked, lib),
            loss(perfect, sample.target, masked, lib), model_loss, shuffled,
            loss(mean, sample.target, observable, lib) - loss(perfect, sample.target, observable, lib),
        ]).double()
        self.sums += vals * b
        self.embeddings[index] = e.float()
        self.cells += b
        return vals[3].float()

    @torch.no_grad()
    def gather(self, every: list[dict[int, torch.Tensor]] | None = None) -> None:
        """Pools the embeddings of every rank (``every``: each rank's :attr:`embeddings`, from
        ``all_gather_object``; None: this rank's alone) and completes the one-cell batches'
        swapped loss with the previous batch's last cell (none for the first batch: no gain
        measured there)."""
        pooled = dict(self.embeddings)
        for part in every or ():
            pooled.update(part)
        m = self.model
        for index, target, observable, lib, model_loss in self._lonely:
            other = pooled.get(index - 1)
            if other is None:
                continue
            z = m.decoder(other[-1:].to(self.mean_logits.device)).float()
            self.sums[4] += (m.loss(z, target, observable, lib) - model_loss).double()
        self._lonely = []
        self.embeddings = pooled
        self.cells = sum(len(e) for e in pooled.values())

    def result(self) -> dict:
        s = self.sums
        masked_r2 = float((s[1] - s[0]) / (s[1] - s[2]).clamp_min(1e-12))
        cls_gain = float((s[4] - s[3]) / s[5].clamp_min(1e-12))
        e = (torch.cat([self.embeddings[i] for i in sorted(self.embeddings)])
             if self.embeddings else torch.zeros(0, 1))
        return {"masked_r2": masked_r2, "cls_gain": cls_gain, "erank": effective_rank(e),
                "cells": self.cells}
