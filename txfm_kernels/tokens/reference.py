"""Eager PyTorch reference of the gene-token op: what ``backend="torch"`` runs (also the
``auto`` fallback), plus the torch steps the kernels' launchers share (the values gradient,
the sort of token positions by gene, the check of gene ids).

:func:`forward` gathers into a preallocated output (no concatenated copies); :func:`backward`
is PyTorch's embedding backward (sort-based, deterministic on CPU and GPU) fed an fp32 (fp64)
copy of the gradient rows, so that the codebook gradient is accumulated in fp32 (fp64) and
rounded once to the codebook's dtype, as the kernels do.
"""
from __future__ import annotations

import torch
from torch import nn

_OP = "gene_tokens"


def forward(codebook, gene_ids, values, cls, key_padding_mask,
            backend: str = "torch") -> torch.Tensor:
    """tokens ``[B, K + (cls given), d]``: ``[E[g] ; x]`` per token, zeros where padded, CLS
    first. Contiguous inputs, values and cls in the codebook's dtype."""
    B, K = gene_ids.shape
    D1 = codebook.shape[1]
    c = int(cls is not None)
    out = codebook.new_empty(B, K + c, D1 + 1)
    ids = gene_ids if key_padding_mask is None else gene_ids.masked_fill(key_padding_mask, 0)
    tokens = out[:, c:]
    tokens[..., :D1] = nn.functional.embedding(ids, codebook)
    tokens[..., D1] = values
    if key_padding_mask is not None:
        tokens.masked_fill_(key_padding_mask[..., None], 0)
    if c:
        out[:, 0] = cls
    return out


def backward(grad, gene_ids, key_padding_mask, n_genes: int, has_cls: bool, deterministic: bool,
             backend: str = "torch"):
    """``(grad_codebook [V, d-1], grad_values [B, K])`` from ``grad [B, K + has_cls, d]``."""
    c = int(has_cls)
    D1 = grad.shape[-1] - 1
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    rows = grad[:, c:, :D1].to(acc)
    ids = gene_ids
    if key_padding_mask is not None:
        rows = rows.masked_fill(key_padding_mask[..., None], 0)
        ids = gene_ids.masked_fill(key_padding_mask, 0)
    gc = torch.ops.aten.embedding_dense_backward(rows, ids, n_genes, -1, False)
    return gc.to(grad.dtype), grad_values(grad, key_padding_mask, c)


def grad_values(grad: torch.Tensor, key_padding_mask, c: int) -> torch.Tensor:
    """``dL/dvalues [B, K]``: the last feature of each token's gradient, 0 where padded."""
    gv = grad[:, c:, -1]
    if key_padding_mask is not None:
        return gv.masked_fill(key_padding_mask, 0)
    return gv.clone(memory_format=torch.contiguous_format)  # never a view of grad


def sorted_segments(gene_ids: torch.Tensor, key_padding_mask, n_genes: int):
    """Token positions sorted (stably) by gene id, and each gene's segment ``[off[g], off[g+1])``
    (the deterministic GPU backwards sum each segment in position order).

    Padded tokens get the key V; they and out-of-range ids sort outside every segment. Keys
    are sorted as int32 (half the radix passes of int64).
    """
    keys = gene_ids.reshape(-1)
    if keys.dtype == torch.int64:
        keys = keys.clamp(-1, n_genes).to(torch.int32)
    if key_padding_mask is not None:
        keys = keys.masked_fill(key_padding_mask.reshape(-1), n_genes)
    sorted_keys, perm = torch.sort(keys, stable=True)
    bounds = torch.arange(n_genes + 1, device=keys.device, dtype=keys.dtype)
    return perm, torch.searchsorted(sorted_keys, bounds)


def check_ids(gene_ids: torch.Tensor, key_padding_mask, n_genes: int) -> None:
    """``IndexError`` naming the non-padded ids outside ``[0, n_genes)`` (reads the ids: one
    device synchronisation on a GPU)."""
    bad = (gene_ids < 0) | (gene_ids >= n_genes)
    if key_padding_mask is not None:
        bad &= ~key_padding_mask
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    offending = gene_ids[bad]
    raise IndexError(
        f"{_OP}: gene_ids must lie in [0, {n_genes}) (the codebook has {n_genes} rows), but "
        f"{n_bad} non-padded id(s) lie outside, ranging over [{int(offending.min())}, "
        f"{int(offending.max())}] (first: {offending[:5].tolist()}); fix the gene vocabulary "
        f"mapping, or mark those positions in key_padding_mask")
