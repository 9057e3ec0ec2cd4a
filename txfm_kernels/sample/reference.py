"""Eager PyTorch reference of the masked sampler: what ``backend="torch"`` runs (also the
``auto`` fallback), the weighted draw of every backend (``tau != 0``), the checks of the
input as torch ops, and the host-side pieces every backend shares (the call's key, the
argument bundle :class:`Call`, the error messages).

The uniform draw is the integer recipe of ``csrc/sample/sample_math.h`` written with int64
tensors (torch lacks uint32 arithmetic): bit-identical ids to the C++, CUDA and Triton
kernels. One host sync per block of draws.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..masks import ObservableGenes

_OP = "masked_sample"
ROUNDS = 6
MIN_BITS = 10  # smallest domain 2^10: see sample_math.h
ROUND_STEP = 0x61C88647
_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


class Call(NamedTuple):
    """One call's inputs as every backend takes them (checked, contiguous, on one device)."""

    indptr: torch.Tensor  # [B + 1] int64
    indices: torch.Tensor  # [nnz] int32
    counts: torch.Tensor  # [nnz] float32 / int32 / int16 / uint16 / uint8
    obs_indptr: torch.Tensor | None  # [D + 1] int64
    obs_genes: torch.Tensor | None  # int32
    dataset_ids: torch.Tensor | None  # [B] int32 / int64
    n_genes: int
    k: int
    target_sum: float  # L, already rounded to fp32 (the kernels take a float)
    k0: int  # the call's key: call_key(seed, offset)
    k1: int


# ---------------------------------------------------------------------------------------------
# Keys (host)
# ---------------------------------------------------------------------------------------------
def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def call_key(seed: int, offset: int) -> tuple[int, int]:
    """The two uint32 words that key every row's permutation of a call ``(seed, offset)``."""
    k = _splitmix64((int(seed) & _M64) ^ _splitmix64(int(offset) & _M64))
    return k & _M32, k >> 32


# ---------------------------------------------------------------------------------------------
# Uniform draw: the integer recipe with int64 tensors
# ---------------------------------------------------------------------------------------------
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # low 32 bits of x * c: exact in int64 because x < 2^32 and the constants c are < 2^31
    return (x * c) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def _feistel(x, keys, la, lb):
    for key in keys:
        left = x >> lb
        right = x & ((1 << lb) - 1)
        f = _hash32(right ^ key) & ((1 << la) - 1)
        x = (right << la) | (left ^ f)
        la, lb = lb, la
    return x


def _uniform_ids(n: torch.Tensor, k: int, k0: int, k1: int) -> torch.Tensor:
    """``[B, K]`` int64 positions in each row's observable list (``-1`` where padded)."""
    B, dev = n.numel(), n.device
    m = torch.full_like(n, MIN_BITS)
    for i in range(MIN_BITS, 31):
        m += (1 << i) < n
    la, lb = (m // 2)[:, None], (m - m // 2)[:, None]
    domain = (1 << m)[:, None]
    rs = _hash32(k0 ^ _hash32(torch.arange(B, device=dev) ^ k1))
    keys = [_hash32((rs + (i + 1) * ROUND_STEP) & _M32)[:, None] for i in range(ROUNDS)]
    kk = torch.clamp(n, max=k)[:, None]
    out = torch.full((B, k + 1), -1, dtype=torch.int64, device=dev)  # last column: discard
    cnt = torch.zeros(B, 1, dtype=torch.int64, device=dev)
    chunk = 2 * k + 256
    j0 = 0
    while B and bool((cnt < kk).any()):  # one sync per chunk; two chunks are rarely needed
        j = torch.arange(j0, j0 + chunk, device=dev)[None, :]
        y = _feistel(j, keys, la, lb)
        keep = (j < domain) & (y < n[:, None])
        pos = cnt + torch.cumsum(keep, 1) - 1
        out.scatter_(1, torch.where(keep & (pos < kk), pos, k), y)
        cnt = cnt + keep.sum(1, keepdim=True)
        j0 += chunk
    return out[:, :k]


def _normalised(c: Call, target):
    """``(row, x, total)``: each non-zero's row, ``L * c / S`` and the row sums ``S``; writes
    ``log1p(x)`` into the (zeroed) target when there is one."""
    B, nnz = c.indptr.numel() - 1, c.indices.numel()
    dev = c.indptr.device
    row = torch.repeat_interleave(torch.arange(B, device=dev), c.indptr[1:] - c.indptr[:-1],
                                  output_size=nnz)
    counts = c.counts.to(torch.float32)
    total = torch.zeros(B, dtype=torch.float64, device=dev).index_add_(0, row, counts.double())
    scale = torch.where(total > 0, c.target_sum / torch.where(total > 0, total, 1.0), 0.0)
    scale32 = scale.float()[row]
    # L / S can exceed fp32 (then the product is formed in fp64: L * c / S <= L fits)
    x = torch.where(torch.isfinite(scale32), counts * scale32,
                    (counts.double() * scale[row]).float())
    if target is not None:
        target.zero_()
        target[row, c.indices.long()] = torch.log1p(x)
    return row, x, total.float()


def _values(c: Call, row, x, gene_ids, pad, target) -> torch.Tensor:
    """log1p-normalised values of ``gene_ids`` from the target or by binary search in the CSR."""
    if target is not None:
        vals = target.gather(1, gene_ids.long())
    elif x.numel() == 0:
        vals = torch.zeros(gene_ids.shape, dtype=torch.float32, device=gene_ids.device)
    else:
        B = gene_ids.shape[0]
        keys = row * c.n_genes + c.indices.long()  # globally sorted: rows in order, ids sorted
        q = torch.arange(B, device=keys.device)[:, None] * c.n_genes + gene_ids.long()
        p = torch.searchsorted(keys, q).clamp_(max=keys.numel() - 1)
        vals = torch.where(keys[p] == q, torch.log1p(x[p]), 0.0)
    return vals.masked_fill_(pad, 0.0)


def _datasets(c: Call, B: int) -> torch.Tensor:
    """``[B]`` int64 dataset of each row, clamped into ``[0, D)`` as the kernels clamp
    unvalidated ids (a negative id never wraps around to the last datasets)."""
    if c.dataset_ids is None:
        return torch.zeros(B, dtype=torch.int64, device=c.indptr.device)
    return c.dataset_ids.long().clamp(0, c.obs_indptr.numel() - 2)


def _row_observables(c: Call, B: int):
    """``(n [B], first [B])``: each row's number of observable genes and where its list starts."""
    dev = c.indptr.device
    if c.obs_indptr is None:
        return (torch.full((B,), c.n_genes, dtype=torch.int64, device=dev),
                torch.zeros(B, dtype=torch.int64, device=dev))
    ds = _datasets(c, B)
    first = c.obs_indptr[ds]
    return c.obs_indptr[ds + 1] - first, first


def _write(c: Call, row, x, total, genes, is_pad, ids, values, pad, target, libsize) -> None:
    ids.copy_(genes)
    pad.copy_(is_pad)
    values.copy_(_values(c, row, x, genes, is_pad, target))
    libsize.copy_(total)


def fill(c: Call, ids, values, pad, target, libsize, validate: bool, backend: str = "torch"):
    """The uniform draw into the outputs (``pad`` bool, ``target`` None or ``[B, G]``)."""
    if validate:
        check_input(c)
    B = c.indptr.numel() - 1
    row, x, total = _normalised(c, target)
    n, first = _row_observables(c, B)
    local = _uniform_ids(n, c.k, c.k0, c.k1)
    is_pad = local < 0
    genes = (c.obs_genes.long()[(first[:, None] + local).clamp_(min=0)]
             if c.obs_genes is not None else local)
    genes = genes.masked_fill_(is_pad, 0)
    _write(c, row, x, total, genes, is_pad, ids, values, pad, target, libsize)


# ---------------------------------------------------------------------------------------------
# Checks as torch ops, with the messages of the cpu kernel's status codes
# ---------------------------------------------------------------------------------------------
def error_message(code: int, where: int, c: Call) -> str:
    nnz = c.indices.numel()
    n_ds = 1 if c.obs_indptr is None else c.obs_indptr.numel() - 1
    msgs = {
        10: "indptr[0] must be 0",
        11: f"indptr must be non-decreasing, but indptr[{where + 1}] < indptr[{where}]",
        12: f"indptr[-1] must equal nnz = indices.numel() = {nnz}",
        13: f"indices must lie in [0, n_genes={c.n_genes}); row {where} has one outside",
        14: f"indices must be strictly increasing within each row (sorted, no duplicates); "
            f"row {where} is not",
        15: f"counts must be finite and >= 0; row {where} has a negative or non-finite count",
        16: f"dataset_ids[{where}] is outside [0, n_datasets={n_ds})",
    }
    return f"{_OP}: {msgs[code]}"


def check_structure(c: Call) -> None:
    """What keeps the cpu kernel inside its buffers (it writes ``dense[index]`` unclamped): the
    row pointers and the gene index range, as torch ops; the cpu kernel's messages."""
    _check_indptr(c)
    bad = _out_of_range(c).nonzero()
    if bad.numel():
        row = int(torch.searchsorted(c.indptr, bad[0, 0], right=True)) - 1
        raise ValueError(error_message(13, row, c))


def _out_of_range(c: Call) -> torch.Tensor:
    """``[nnz]`` bool: gene indices outside ``[0, n_genes)``, which the cpu kernel would write
    past its row."""
    return (c.indices < 0) | (c.indices >= c.n_genes)


def _check_indptr(c: Call) -> None:
    B, nnz = c.indptr.numel() - 1, c.indices.numel()
    if int(c.indptr[0]) != 0:
        raise ValueError(error_message(10, 0, c))
    step_bad = (c.indptr[1:] < c.indptr[:-1]).nonzero()
    if step_bad.numel():
        raise ValueError(error_message(11, int(step_bad[0, 0]), c))
    if int(c.indptr[-1]) != nnz:
        raise ValueError(error_message(12, B, c))


def check_input(c: Call) -> None:
    """The cpu kernel's checks as torch ops (one sync); raises the same messages."""
    B, nnz = c.indptr.numel() - 1, c.indices.numel()
    dev = c.indptr.device
    _check_indptr(c)
    row = torch.repeat_interleave(torch.arange(B, device=dev), c.indptr[1:] - c.indptr[:-1],
                                  output_size=nnz)
    idx = c.indices

    def rows_with(flag: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.zeros(B, dtype=torch.bool, device=dev).index_put_((rows[flag],),
                                                                      flag[flag], accumulate=True)

    ds_bad = torch.zeros(B, dtype=torch.bool, device=dev)
    if c.dataset_ids is not None:
        n_ds = c.obs_indptr.numel() - 1
        ds_bad = (c.dataset_ids < 0) | (c.dataset_ids >= n_ds)
    range_bad = rows_with(_out_of_range(c), row)
    same_row = row[1:] == row[:-1]
    order_bad = rows_with(same_row & (idx[1:] <= idx[:-1]), row[1:])
    counts = c.counts
    if counts.is_floating_point():
        cbad = ~(torch.isfinite(counts) & (counts >= 0))
    elif counts.dtype in (torch.uint8, torch.uint16):
        cbad = torch.zeros(nnz, dtype=torch.bool, device=dev)
    else:
        cbad = counts < 0
    count_bad = rows_with(cbad, row)
    flags = torch.stack([ds_bad, range_bad, order_bad, count_bad])  # kernel's priority order
    bad_rows = flags.any(0).nonzero()
    if bad_rows.numel():
        r = int(bad_rows[0, 0])
        code = (16, 13, 14, 15)[int(flags[:, r].nonzero()[0, 0])]
        raise ValueError(error_message(code, r, c))


def check_observable(obs: ObservableGenes, n_genes: int, deep: bool) -> None:
    """CSR pointers always (O(D)); with ``deep`` also the lists against the mask (O(D * G))."""
    ptr = obs.indptr
    if int(ptr[0]) != 0 or bool((ptr[1:] < ptr[:-1]).any()) or int(ptr[-1]) != obs.genes.numel():
        raise ValueError(f"{_OP}: observable.indptr is not a valid CSR pointer over "
                         f"observable.genes; build it with ObservableGenes.from_mask()")
    if not deep:
        return
    if not torch.equal(ptr[1:] - ptr[:-1], obs.mask.sum(1)):
        raise ValueError(f"{_OP}: observable.indptr does not match observable.mask's row counts")
    g = obs.genes.long()
    ds = torch.repeat_interleave(torch.arange(obs.n_datasets, device=g.device), ptr[1:] - ptr[:-1],
                                 output_size=g.numel())
    if g.numel() and (bool((g < 0).any()) or bool((g >= n_genes).any())
                      or not bool(obs.mask[ds, g.clamp(0, n_genes - 1)].all())
                      or bool(((ds[1:] == ds[:-1]) & (g[1:] <= g[:-1])).any())):
        raise ValueError(f"{_OP}: observable.genes must list each dataset's masked genes sorted "
                         f"and distinct; build it with ObservableGenes.from_mask()")


# ---------------------------------------------------------------------------------------------
# Weighted draw (tau != 0): exponential clocks + topk, vectorised torch on every backend
# ---------------------------------------------------------------------------------------------
def fill_weighted(c: Call, mask: torch.Tensor | None, gene_weights, tau: float, ids, values, pad,
                  target, libsize) -> None:
    """The weighted draw (``tau != 0``) into the outputs, keyed by ``(c.k0, c.k1)``."""
    B = c.indptr.numel() - 1
    dev = c.indptr.device
    row, x, total = _normalised(c, target)
    gen = torch.Generator(device=dev)
    gen.manual_seed((c.k1 << 32) | c.k0)
    u = torch.rand((B, c.n_genes), generator=gen, device=dev)
    # key = log(w^tau / E), E ~ Exp(1): the largest key first = successive sampling with
    # probability proportional to w^tau among the genes not yet drawn (exponential clocks)
    keys = tau * torch.log(gene_weights.to(torch.float32))[None, :] - torch.log(-torch.log1p(-u))
    n, _ = _row_observables(c, B)
    if mask is not None:
        keys.masked_fill_(~mask[_datasets(c, B)], -math.inf)
    kk = min(c.k, c.n_genes)
    drawn = torch.zeros(B, c.k, dtype=torch.int64, device=dev)
    drawn[:, :kk] = torch.topk(keys, kk, dim=1, sorted=True).indices
    is_pad = torch.arange(c.k, device=dev)[None, :] >= n[:, None]
    drawn.masked_fill_(is_pad, 0)
    _write(c, row, x, total, drawn, is_pad, ids, values, pad, target, libsize)
