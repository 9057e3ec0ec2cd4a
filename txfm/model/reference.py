"""Eager PyTorch reference ops for TxFM: what the fused ``txfm_kernels`` ops compute.

``TxFMConfig(use_fused_ops=False)`` runs the model on these, for comparison and debugging:
they materialise every intermediate (``[B, K, d-1]`` gathers, ``[B, G]`` masks and losses)
that the fused kernels avoid, but are plain autograd code that anyone can read.

* :func:`gene_tokens` — ``[CLS; [E[g]; x] ...]`` encoder tokens (SPEC §3).
* :func:`rectified_tanh` — ``alpha * relu(tanh(z / beta))`` (SPEC §3).
* :func:`masked_row_mean` — mean over rows of each row's mean over its kept genes (SPEC §4);
  the reduction every loss here uses.
* :func:`masked_sample` — a vectorised CSR -> (shown genes, values, dense target) sampler,
  used only where :mod:`txfm_kernels.sample` is not importable (its ``backend="torch"`` is
  the eager path otherwise, so that both paths draw the same genes).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from txfm_kernels.masks import RowGeneMask  # the compact mask both sampler paths return


def gene_tokens(codebook: torch.Tensor, gene_ids: torch.Tensor, values: torch.Tensor, *,
                cls: torch.Tensor | None = None,
                pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Encoder tokens ``[B, K(+1), d]``: ``[codebook[g]; value]`` per shown gene, CLS first.

    ``codebook [V, d-1]``, ``gene_ids [B, K]`` int, ``values [B, K]``, ``cls [d]``,
    ``pad_mask [B, K]`` bool (True = padding -> a zero token). Output dtype = codebook dtype.
    """
    emb = codebook[gene_ids.long()]
    tok = torch.cat([emb, values.to(emb.dtype)[..., None]], dim=-1)
    if pad_mask is not None:
        tok = tok.masked_fill(pad_mask[..., None], 0.0)
    if cls is not None:
        tok = torch.cat([cls.to(tok.dtype).expand(tok.shape[0], 1, -1), tok], dim=1)
    return tok


def rectified_tanh(z: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``alpha * relu(tanh(z / beta))``, range ``[0, alpha)``."""
    return alpha * torch.relu(torch.tanh(z / beta))


def dense_gene_mask(gene_mask, batch: int, n_genes: int, device) -> torch.Tensor | None:
    """``gene_mask`` (None, ``[G]``, ``[B, G]`` bool or a ``RowGeneMask``) as ``[B, G]`` bool."""
    if gene_mask is None:
        return None
    if hasattr(gene_mask, "dense"):
        m = gene_mask.dense()
    else:
        m = torch.as_tensor(gene_mask, device=device)
    if m.dtype != torch.bool:
        raise TypeError(f"gene_mask must be bool, got {m.dtype}")
    return m.expand(batch, n_genes)


def masked_row_mean(per_gene: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over rows of each row's mean over its kept genes; a row with none kept adds 0."""
    if mask is None:
        return per_gene.mean()
    kept = mask.sum(1).clamp_min(1).to(per_gene.dtype)
    return (per_gene.masked_fill(~mask, 0.0).sum(1) / kept).mean()


def poisson_nll(logits: torch.Tensor, target: torch.Tensor, gene_mask=None, *,
                alpha: float, beta: float) -> torch.Tensor:
    """SPEC §4 loss in fp32: ``exp(phi(z)) - phi(z) * exp(x)``, ``phi`` = rectified tanh."""
    xh = rectified_tanh(logits.float(), alpha, beta)
    per_gene = torch.exp(xh) - xh * torch.exp(target.float())
    mask = dense_gene_mask(gene_mask, logits.shape[0], logits.shape[1], logits.device)
    return masked_row_mean(per_gene, mask)


# --------------------------------------------------------------------------------------------
# Fallback sampler (only where txfm_kernels.sample is missing)
# --------------------------------------------------------------------------------------------
class MaskedSample(NamedTuple):
    """Encoder inputs and loss target of a batch; same fields as ``txfm_kernels.MaskedSample``."""

    gene_ids: torch.Tensor  # [B, K] int32
    values: torch.Tensor  # [B, K] fp32
    pad_mask: torch.Tensor  # [B, K] bool
    target: torch.Tensor | None  # [B, G] fp32
    gene_mask: object  # RowGeneMask or None
    library_size: torch.Tensor  # [B] fp32


def _generator(seed: int, offset: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(offset)) % (2**63 - 1))
    return g


def masked_sample(indptr: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, *,
                  n_genes: int, k: int = 2048, observable=None, dataset_ids=None,
                  library_size: float = 1e5, seed: int = 0, offset: int = 0, tau: float = 0.0,
                  gene_weights: torch.Tensor | None = None,
                  return_target: bool = True) -> MaskedSample:
    """Vectorised eager sampler (SPEC §1–2): densify, normalise, draw ``k`` observable genes.

    Uniform draw without replacement = top-k of i.i.d. uniform keys; weighted (``tau != 0``)
    = top-k of ``log(u) / w`` keys (Efraimidis–Spirakis). Rows with fewer than ``k``
    observable genes are padded at the end (``pad_mask``). Same ``(seed, offset)`` -> same
    draw on the same device; *not* the fused op's random stream.
    """
    device = indptr.device
    b = indptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(b, device=device), indptr[1:] - indptr[:-1])
    dense = torch.zeros(b, n_genes, dtype=torch.float32, device=device)
    dense[rows, indices.long()] = counts.float()
    if observable is not None:
        if dataset_ids is None:
            raise ValueError("masked_sample: observable needs dataset_ids [B]")
        obs = observable.mask[dataset_ids.long()]
        gene_mask = RowGeneMask(observable.mask, dataset_ids)
    else:
        obs = torch.ones(b, n_genes, dtype=torch.bool, device=device)
        gene_mask = None
    dense = dense * obs
    lib = dense.sum(1)
    x = torch.log1p(dense * (library_size / lib.clamp_min(1e-30))[:, None])
    keys = torch.rand(b, n_genes, generator=_generator(seed, offset, device), device=device)
    if tau != 0.0:
        if gene_weights is None:
            raise ValueError("masked_sample: tau != 0 needs gene_weights [G] (m_i of SPEC §2)")
        w = gene_weights.float().clamp_min(1.0).pow(tau)
        keys = torch.log(keys.clamp_min(1e-30)) / w
    keys = keys.masked_fill(~obs, float("-inf"))
    kk = min(k, n_genes)
    top, ids = torch.topk(keys, kk, dim=1)
    pad = top == float("-inf")
    values = x.gather(1, ids).masked_fill(pad, 0.0)
    ids = ids.masked_fill(pad, 0)
    if kk < k:  # more shown slots than genes: pad the rest
        extra = k - kk
        ids = torch.cat([ids, ids.new_zeros(b, extra)], 1)
        values = torch.cat([values, values.new_zeros(b, extra)], 1)
        pad = torch.cat([pad, pad.new_ones(b, extra)], 1)
    return MaskedSample(ids.to(torch.int32), values, pad, x if return_target else None,
                        gene_mask, lib)
