"""Eager PyTorch reference of the Poisson NLL op: what ``backend="torch"`` runs, what
``backend="auto"`` falls back to without a kernel, and what the model's eager losses import.

Plain autograd code (double backward works) in fp32 arithmetic, fp64 for fp64 logits;
losses of the kernels' three modes (``csrc/poisson/poisson_math.h``):

* ``RTANH``: ``phi = alpha * relu(tanh(z / beta))``, ``l = exp(phi) - phi * exp(x)``, the TxFM
  loss (arXiv:2605.31562 §4): Poisson NLL with log-rate ``phi`` of the count ``exp(x)``;
* ``LOG`` / ``LINEAR``: :func:`torch.nn.functional.poisson_nll_loss` with ``log_input`` True /
  False (``full``: Stirling's term), the drop-in's modes.

Kept genes: ``mask`` None, bool ``[G]``, ``[B, G]``, or a ``[D, G]`` table with row ids
``[B]``. Left-out genes never see their logits (a NaN there stays out of the loss). A row
whose id lies outside ``[0, D)`` gets a NaN loss and NaN gradients, as on the GPU kernels (the
callers raise on CPU tensors before).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ALPHA = math.log(1e5 + 1)  # log(L + 1), L = 1e5: the largest log1p-normalised value
BETA = 4 * math.e
RTANH, LOG, LINEAR = 0, 1, 2  # loss modes (enum Mode in csrc/poisson/poisson_math.h)
REDUCTIONS = ("mean", "sum", "none")


def compute_dtype(z: torch.Tensor) -> torch.dtype:
    """fp64 for fp64 logits, fp32 otherwise: the arithmetic and loss dtype of every backend."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def grad_dtype(z: torch.Tensor) -> torch.dtype:
    """dtype of the op's saved gradient ``weight * dl/dz`` for logits ``z``: their own, fp32 for
    fp16 ones. The backward multiplies it by grad_output (a loss scale of 2^16, a loss
    weight), so it must keep values that fp16 cannot: the "mean" weight ``1 / (B * kept)``
    puts most of them under fp16's normal range, and a value that fits only once scaled down
    overflows. bf16 has fp32's range (``GradStore`` in ``csrc/poisson/poisson_math.h``)."""
    return torch.float32 if z.dtype == torch.float16 else z.dtype


def rectified_tanh(z: torch.Tensor, alpha: float = ALPHA, beta: float = BETA) -> torch.Tensor:
    """``alpha * relu(tanh(z / beta))``, range ``[0, alpha)``, in ``z``'s dtype."""
    return alpha * torch.relu(torch.tanh(z / beta))


def elementwise_loss(z, x, mode: int, full: bool, alpha: float, beta: float, eps: float):
    """Per-element loss of ``z`` against ``x`` (same shape and dtype) in mode ``mode``."""
    if mode == RTANH:
        phi = rectified_tanh(z, alpha, beta)
        return torch.exp(phi) - phi * torch.exp(x)
    return F.poisson_nll_loss(z, x, log_input=mode == LOG, full=full, eps=eps, reduction="none")


def elementwise_grad(z, x, mode: int, alpha: float, beta: float, eps: float):
    """``dl/dz`` of :func:`elementwise_loss`, written out: the fused op returns it, and
    autograd does not run inside a custom op's body."""
    if mode == RTANH:
        ephi = torch.exp(rectified_tanh(z, alpha, beta))
        sech2 = torch.cosh(z / beta).square().reciprocal()  # -> 0, not NaN, when cosh overflows
        return torch.where(z <= 0, 0.0, (alpha / beta) * sech2 * (ephi - torch.exp(x)))
    if mode == LOG:
        return torch.exp(z) - x
    return 1.0 - x / (z + eps)


def keep_mask(mask: torch.Tensor | None, ids: torch.Tensor | None):
    """``(keep, bad)``: the bool keep mask (``[B, G]``, ``[G]`` or None) and, with ``ids``,
    ``[B]`` bool rows whose id lies outside the ``[D, G]`` table (None without ``ids``)."""
    if mask is None:
        return None, None
    keep = mask.bool()
    if ids is None:
        return keep, None
    bad = (ids < 0) | (ids >= keep.shape[0])
    return keep[ids.clamp(0, keep.shape[0] - 1)], bad


def dense_gene_mask(gene_mask, batch: int, n_genes: int, device=None) -> torch.Tensor | None:
    """``gene_mask`` (None, bool ``[G]`` or ``[B, G]``, or a ``RowGeneMask``) as ``[B, G]`` bool
    (a view where it can), on ``device`` when it is not a tensor already."""
    if gene_mask is None:
        return None
    m = gene_mask.dense() if hasattr(gene_mask, "dense") else torch.as_tensor(gene_mask,
                                                                            device=device)
    if m.dtype != torch.bool:
        raise TypeError(f"gene_mask must be bool (True = keep the gene), got {m.dtype}")
    return m.expand(batch, n_genes)


def masked_row_mean(loss: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mean over rows of each row's mean over its kept genes; a row keeping none adds 0 (and
    still counts in the 1/B). ``loss [B, G]``, ``keep`` None or broadcastable bool."""
    if keep is None:
        return loss.mean(1).mean()
    counts = keep.expand_as(loss).sum(1)
    return torch.where(counts > 0, loss.sum(1) / counts.clamp(min=1), 0.0).mean()


def _prepare(z, x, mask, ids):
    """Inputs in the compute dtype, the keep mask, the bad rows; left-out genes' logits -> 0
    (they never reach the loss, so a NaN there stays out of it)."""
    cdt = compute_dtype(z)
    z, x = z.to(cdt), x.to(cdt)
    keep, bad = keep_mask(mask, ids)
    if keep is not None:
        z = torch.where(keep, z, 0.0)
    return z, x, keep, bad


def _kept(t, keep, bad):
    """``t`` with left-out genes 0 and rows of out-of-range dataset ids NaN (as the kernels)."""
    if keep is not None:
        t = torch.where(keep, t, 0.0)
    if bad is not None:
        t = t * torch.where(bad, math.nan, 1.0).to(t.dtype)[:, None]
    return t


def poisson_nll(z, x, mask=None, ids=None, *, mode: int = RTANH, full: bool = False,
                alpha: float = ALPHA, beta: float = BETA, eps: float = 0.0,
                reduction: str = "mean") -> torch.Tensor:
    """The op's loss with autograd: ``z, x [B, G]``; ``"none"`` gives ``[B, G]`` (0 where left
    out), ``"sum"`` and ``"mean"`` (see :func:`masked_row_mean`) a 0-d tensor; fp32 (fp64)."""
    z, x, keep, bad = _prepare(z, x, mask, ids)
    loss = _kept(elementwise_loss(z, x, mode, full, alpha, beta, eps), keep, bad)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return masked_row_mean(loss, keep)


def forward(z, x, mask, ids, mode, full, alpha, beta, eps, reduction, need_grad):
    """The fused op's contract from the same formulas: ``(loss, weight * dl/dz or None)``, the
    gradient in :func:`grad_dtype` (when the op itself runs ``"torch"``)."""
    loss = poisson_nll(z, x, mask, ids, mode=mode, full=full, alpha=alpha, beta=beta, eps=eps,
                       reduction=reduction)
    if not need_grad:
        return loss, None
    zc, xc, keep, bad = _prepare(z, x, mask, ids)
    dz = _kept(elementwise_grad(zc, xc, mode, alpha, beta, eps), keep, bad)
    B, G = dz.shape
    if reduction == "mean":  # d(mean of row means)/dl[b, g] = 1 / (B * kept_b), 0 if none kept
        counts = torch.full((B, 1), G, device=dz.device) if keep is None else \
            keep.expand(B, G).sum(1, keepdim=True)
        dz = dz * torch.where(counts > 0, 1.0 / (counts.to(dz.dtype) * B), 0.0)
    return loss, dz.to(grad_dtype(z))
