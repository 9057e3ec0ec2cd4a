"""Eager PyTorch reference ops for TxFM: what the fused ``txfm_kernels`` ops compute.

``TxFMConfig(use_fused_ops=False)`` runs the model on these, for comparison and debugging:
they materialise every intermediate (``[B, K, d-1]`` gathers, ``[B, G]`` masks and losses)
that the fused kernels avoid, but are plain autograd code that anyone can read.

* :func:`gene_tokens` — ``[CLS; [E[g]; x] ...]`` encoder tokens (arXiv:2605.31562, model).
* :func:`rectified_tanh` — ``alpha * relu(tanh(z / beta))`` (arXiv:2605.31562, model).
* :func:`masked_row_mean` — mean over rows of each row's mean over its kept genes (arXiv:2605.31562, loss);
  the reduction every loss here uses.

The eager path samples with :func:`txfm_kernels.masked_sample` ``backend="torch"`` (vectorised
torch ops), so both paths draw exactly the same genes.
"""
from __future__ import annotations

import torch


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
    """arXiv:2605.31562, loss loss in fp32: ``exp(phi(z)) - phi(z) * exp(x)``, ``phi`` = rectified tanh."""
    xh = rectified_tanh(logits.float(), alpha, beta)
    per_gene = torch.exp(xh) - xh * torch.exp(target.float())
    mask = dense_gene_mask(gene_mask, logits.shape[0], logits.shape[1], logits.device)
    return masked_row_mean(per_gene, mask)
