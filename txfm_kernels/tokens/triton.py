"""Triton kernels of the gene-token op and their launchers (``backend="triton"``).

Forward: one program per [BLOCK_R tokens, BLOCK_D features] tile of the output. Backward,
deterministic (default): token positions sorted by gene (``reference.sorted_segments``), one
program per BLOCK_G genes sums each gene's rows in position order; otherwise fp32 atomics into
a zeroed accumulator. On CPU tensors the kernels run under the Triton interpreter (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import interpreted
from .._triton import round_to_bf16
from .reference import grad_values, sorted_segments


# Sizes other than d are not specialised: Triton 3.6 fails to compile these kernels when a
# size equal to 1 becomes a constant, and only d (the row stride) gains from specialisation
# (divisible by 16 -> vectorised row access).
@triton.jit(do_not_specialize=["n_rows", "T", "K", "V", "D1"])
def _tokens_fwd_kernel(cb_ptr, ids_ptr, val_ptr, cls_ptr, pad_ptr, out_ptr,
                       n_rows, T, K, V, D1, d,
                       HAS_CLS: tl.constexpr, HAS_PAD: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """One [BLOCK_R tokens, BLOCK_D features] tile of the [B*T, d] output (d = D1 + 1)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    b = rows // T
    t = rows - b * T
    k = b * K + t - HAS_CLS
    keep = row_ok & (t >= HAS_CLS)
    if HAS_PAD:
        keep = keep & (tl.load(pad_ptr + k, mask=keep, other=1) == 0)
    g = tl.load(ids_ptr + k, mask=keep, other=0).to(tl.int64)
    keep = keep & (g >= 0) & (g < V)  # never read outside the codebook
    emb = tl.load(cb_ptr + g[:, None] * D1 + cols[None, :],
                  mask=keep[:, None] & (cols[None, :] < D1), other=0)
    val = tl.load(val_ptr + k, mask=keep, other=0)
    tile = tl.where(cols[None, :] == D1, val[:, None], emb)
    if HAS_CLS:
        c = tl.load(cls_ptr + cols, mask=cols < d, other=0)
        tile = tl.where((row_ok & (t == 0))[:, None], c[None, :], tile)
    tl.store(out_ptr + rows[:, None] * d + cols[None, :], tile,
             mask=row_ok[:, None] & (cols[None, :] < d))


@triton.jit(do_not_specialize=["V", "T", "K", "D1"])
def _tokens_bwd_sorted_kernel(grad_ptr, perm_ptr, off_ptr, gc_ptr, V, T, K, D1, d,
                              HAS_CLS: tl.constexpr, OUT_BF16: tl.constexpr,
                              BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_codebook rows of BLOCK_G genes: each gene's segment summed in position order."""
    genes = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    g_ok = genes < V
    col_ok = cols < D1
    start = tl.load(off_ptr + genes, mask=g_ok, other=0)
    count = tl.load(off_ptr + genes + 1, mask=g_ok, other=0) - start
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for j in range(0, tl.max(count, axis=0)):
        live = j < count
        tok = tl.load(perm_ptr + start + j, mask=live, other=0)
        b = tok // K
        row = b * T + (tok - b * K) + HAS_CLS
        x = tl.load(grad_ptr + row[:, None] * d + cols[None, :],
                    mask=live[:, None] & col_ok[None, :], other=0)
        acc += x.to(tl.float32)
    out = round_to_bf16(acc) if OUT_BF16 else acc.to(gc_ptr.dtype.element_ty)
    tl.store(gc_ptr + genes[:, None] * D1 + cols[None, :], out,
             mask=g_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["N", "T", "K", "V", "D1"])
def _tokens_bwd_atomic_kernel(grad_ptr, ids_ptr, pad_ptr, acc_ptr, N, T, K, V, D1, d,
                              HAS_CLS: tl.constexpr, HAS_PAD: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """acc[g] += token gradient rows, fp32 atomics (order, hence last bits, vary)."""
    tok = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    keep = tok < N
    if HAS_PAD:
        keep = keep & (tl.load(pad_ptr + tok, mask=keep, other=1) == 0)
    g = tl.load(ids_ptr + tok, mask=keep, other=0).to(tl.int64)
    keep = keep & (g >= 0) & (g < V)
    b = tok // K
    row = b * T + (tok - b * K) + HAS_CLS
    m = keep[:, None] & (cols[None, :] < D1)
    x = tl.load(grad_ptr + row[:, None] * d + cols[None, :], mask=m, other=0)
    tl.atomic_add(acc_ptr + g[:, None] * D1 + cols[None, :], x.to(tl.float32), mask=m)



def _tile(d: int, device: torch.device, rows: int = 32) -> tuple[int, int]:
    """(rows, features) per tile: ``rows`` x 128 on a GPU; few, large tiles when interpreted
    (the interpreter's cost is per tile, not per element)."""
    if interpreted(device):
        return 64, min(triton.next_power_of_2(d), 1024)
    return rows, 128


def forward(codebook, gene_ids, values, cls, key_padding_mask,
            backend: str = "triton") -> torch.Tensor:
    """tokens ``[B, K + (cls given), d]`` from contiguous inputs (see ``reference.forward``)."""
    B, K = gene_ids.shape
    V, D1 = codebook.shape
    c = int(cls is not None)
    out = codebook.new_empty(B, K + c, D1 + 1)
    if out.numel() == 0:
        return out
    block_r, block_d = _tile(D1 + 1, codebook.device)
    grid = (triton.cdiv(B * (K + c), block_r), triton.cdiv(D1 + 1, block_d))
    pad = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else gene_ids
    _tokens_fwd_kernel[grid](codebook, gene_ids, values, cls if c else codebook, pad, out,
                             B * (K + c), K + c, K, V, D1, D1 + 1, HAS_CLS=c,
                             HAS_PAD=key_padding_mask is not None, BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def backward(grad, gene_ids, key_padding_mask, n_genes: int, has_cls: bool, deterministic: bool,
             backend: str = "triton"):
    """``(grad_codebook [V, d-1], grad_values [B, K])`` from ``grad [B, K + has_cls, d]``."""
    B, K = gene_ids.shape
    D1 = grad.shape[-1] - 1
    c = int(has_cls)
    if deterministic:
        # few genes per program: a program loops as long as its longest segment
        block_g, block_d = _tile(D1, grad.device, rows=8)
        perm, offsets = sorted_segments(gene_ids, key_padding_mask, n_genes)
        gc = grad.new_empty(n_genes, D1)
        grid = (triton.cdiv(n_genes, block_g), triton.cdiv(D1, block_d))
        _tokens_bwd_sorted_kernel[grid](grad, perm, offsets, gc, n_genes, K + c, K, D1, D1 + 1,
                                        HAS_CLS=c, OUT_BF16=gc.dtype == torch.bfloat16,
                                        BLOCK_G=block_g, BLOCK_D=block_d)
    else:
        block_r, block_d = _tile(D1, grad.device)
        acc = torch.zeros(n_genes, D1, device=grad.device, dtype=torch.float32)
        if B * K:
            pad = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else gene_ids
            grid = (triton.cdiv(B * K, block_r), triton.cdiv(D1, block_d))
            _tokens_bwd_atomic_kernel[grid](grad, gene_ids, pad, acc, B * K, K + c, K, n_genes,
                                            D1, D1 + 1, HAS_CLS=c,
                                            HAS_PAD=key_padding_mask is not None,
                                            BLOCK_R=block_r, BLOCK_D=block_d)
        gc = acc.to(grad.dtype)
    return gc, grad_values(grad, key_padding_mask, c)
