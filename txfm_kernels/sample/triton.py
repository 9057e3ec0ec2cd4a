"""Triton kernel of the masked sampler and its launcher (``backend="triton"``).

One program per row: the row's library size (fp64), the scatter of ``log1p(L * c / S)`` into
the zeroed target, then the draw in blocks of ``BLOCK_J`` evaluations of the Feistel bijection
(compacted with a prefix count), the values from the target row or by binary search in the
CSR row. The integer recipe and the log1p mirror ``csrc/sample/sample_math.h`` step for step:
same ids, bit for bit, as every other backend. On CPU tensors the kernel runs under the
Triton interpreter (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import interpreted
from .reference import MIN_BITS, ROUND_STEP, ROUNDS, check_input


@triton.jit
def _hash32(x):
    x ^= x >> 16
    x *= 0x21F0AAAD
    x ^= x >> 15
    x *= 0x735A2D97
    x ^= x >> 15
    return x


@triton.jit
def _feistel(x, rs, la, lb, ROUNDS: tl.constexpr, STEP: tl.constexpr):
    one = tl.full((), 1, tl.uint32)
    ctr = rs
    for i in tl.static_range(ROUNDS):
        ctr += STEP  # rs + (i + 1) * STEP, wrapping
        key = _hash32(ctr)
        left = x >> lb
        right = x & ((one << lb) - 1)
        f = _hash32(right ^ key) & ((one << la) - 1)
        x = (right << la) | (left ^ f)
        la, lb = lb, la
    return x


@triton.jit
def _normalised(c, scale):
    """L * c / S as sample_math.h's normalised(): ``c`` fp32 times the fp64 factor ``scale``
    rounded to fp32, or the fp64 product rounded once where that factor overflows fp32."""
    sf = scale.to(tl.float32)
    return tl.where(sf <= 3.40282347e38, c * sf, (c.to(tl.float64) * scale).to(tl.float32))


@triton.jit
def _log1p_nonneg(x):
    # same steps as sample_math.h: Cephes logf polynomial + correction of 1 + x's rounding
    u = 1.0 + x
    corr = (x - (u - 1.0)) / u
    bits = u.to(tl.uint32, bitcast=True)
    e = (bits >> 23).to(tl.int32) - 127
    m = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > 1.41421356
    m = tl.where(big, 0.5 * m, m)
    e = tl.where(big, e + 1, e)
    f = m - 1.0
    z = f * f
    p = 7.0376836292e-2
    p = p * f - 1.1514610310e-1
    p = p * f + 1.1676998740e-1
    p = p * f - 1.2420140846e-1
    p = p * f + 1.4249322787e-1
    p = p * f - 1.6668057665e-1
    p = p * f + 2.0000714765e-1
    p = p * f - 2.4999993993e-1
    p = p * f + 3.3333331174e-1
    fe = e.to(tl.float32)
    y = f * z * p
    y += -2.12194440e-4 * fe
    y += -0.5 * z
    return (f + y) + 0.693359375 * fe + corr


@triton.jit
def _masked_sample_kernel(
        indptr_ptr, indices_ptr, counts_ptr, obs_indptr_ptr, obs_genes_ptr, ds_ptr,
        ids_ptr, values_ptr, pad_ptr, target_ptr, libsize_ptr,
        nnz, n_genes, n_datasets, K, L, k0, k1,
        HAS_OBS: tl.constexpr, HAS_DS: tl.constexpr, WRITE_TARGET: tl.constexpr,
        ROUNDS: tl.constexpr, STEP: tl.constexpr, MIN_BITS: tl.constexpr,
        BLOCK_NNZ: tl.constexpr, BLOCK_J: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    # row bounds clamped into [0, nnz] so unvalidated input cannot read out of bounds
    start = tl.minimum(tl.maximum(tl.load(indptr_ptr + b), 0), nnz)
    end = tl.minimum(tl.maximum(tl.load(indptr_ptr + b + 1), start), nnz)

    # library size in fp64 (order-independent in fp32, see sample_math.h)
    acc = tl.zeros([BLOCK_NNZ], tl.float64)
    for i0 in range(start, end, BLOCK_NNZ):
        offs = i0 + tl.arange(0, BLOCK_NNZ)
        acc += tl.load(counts_ptr + offs, mask=offs < end, other=0).to(tl.float64)
    total = tl.sum(acc, 0)
    # fp64, as sample_math.h: L / S can exceed fp32's range while L * c / S <= L fits
    scale = tl.where(total > 0, L / tl.where(total > 0, total, 1.0), 0.0)

    trow = target_ptr + b * n_genes
    if WRITE_TARGET:  # the caller zeroed the target (a full-bandwidth memset)
        for i0 in range(start, end, BLOCK_NNZ):
            offs = i0 + tl.arange(0, BLOCK_NNZ)
            m = offs < end
            g = tl.load(indices_ptr + offs, mask=m, other=0)
            c = tl.load(counts_ptr + offs, mask=m, other=0).to(tl.float32)
            tl.store(trow + g, _log1p_nonneg(_normalised(c, scale)),
                     mask=m & (g >= 0) & (g < n_genes))
        tl.debug_barrier()  # the gather below reads what other threads scattered

    # the row's observable genes: n of them at obs_genes[o0:]
    if HAS_OBS:
        ds = 0
        if HAS_DS:
            ds = tl.minimum(tl.maximum(tl.load(ds_ptr + b).to(tl.int64), 0), n_datasets - 1)
        o0 = tl.load(obs_indptr_ptr + ds)
        n = tl.load(obs_indptr_ptr + ds + 1) - o0
    else:
        o0 = 0
        n = n_genes + 0 * start
    m_bits = tl.full((), MIN_BITS, tl.int32)
    for i in tl.static_range(MIN_BITS, 31):
        m_bits += ((1 << i) < n).to(tl.int32)
    la = (m_bits // 2).to(tl.uint32)
    lb = (m_bits - m_bits // 2).to(tl.uint32)
    domain = tl.full((), 1, tl.int64) << m_bits.to(tl.int64)
    rs = _hash32(k0.to(tl.uint32) ^ _hash32(b.to(tl.uint32) ^ k1.to(tl.uint32)))
    kk = tl.minimum(n, K)
    if not WRITE_TARGET:
        len_bits = tl.zeros((), tl.int32)
        for i in tl.static_range(40):
            len_bits += ((tl.full((), 1, tl.int64) << i) <= end - start).to(tl.int32)

    out = b * K
    cnt = 0 * start
    j0 = 0 * start
    while (cnt < kk) & (j0 < domain):
        j = j0 + tl.arange(0, BLOCK_J)
        y = _feistel(j.to(tl.uint32), rs, la, lb, ROUNDS, STEP).to(tl.int64)
        keep = (j < domain) & (y < n)
        pos = cnt + tl.cumsum(keep.to(tl.int32), 0).to(tl.int64) - 1
        w = keep & (pos < kk)
        if HAS_OBS:
            gene = tl.load(obs_genes_ptr + o0 + y, mask=w, other=0)
        else:
            gene = y.to(tl.int32)
        gene = tl.minimum(tl.maximum(gene, 0), n_genes - 1)
        if WRITE_TARGET:
            val = tl.load(trow + gene, mask=w, other=0.0)
        else:  # lower_bound of gene in the row's sorted indices
            lo = tl.zeros([BLOCK_J], tl.int64) + start
            hi = tl.zeros([BLOCK_J], tl.int64) + end
            for _ in range(len_bits):
                active = lo < hi
                mid = (lo + hi) // 2
                v = tl.load(indices_ptr + mid, mask=w & active, other=0)
                right = active & (v < gene)
                lo = tl.where(right, mid + 1, lo)
                hi = tl.where(active & (v >= gene), mid, hi)
            inside = w & (lo < end)
            hit = inside & (tl.load(indices_ptr + lo, mask=inside, other=-1) == gene)
            c = tl.load(counts_ptr + lo, mask=hit, other=0).to(tl.float32)
            val = tl.where(hit, _log1p_nonneg(_normalised(c, scale)), 0.0)
        tl.store(ids_ptr + out + pos, gene, mask=w)
        tl.store(values_ptr + out + pos, val, mask=w)
        tl.store(pad_ptr + out + pos, tl.zeros([BLOCK_J], tl.uint8), mask=w)
        cnt += tl.sum(keep.to(tl.int64), 0)
        j0 += BLOCK_J

    for p0 in range((kk // BLOCK_J) * BLOCK_J, K, BLOCK_J):
        p = p0 + tl.arange(0, BLOCK_J)
        pm = (p >= kk) & (p < K)
        tl.store(ids_ptr + out + p, tl.zeros([BLOCK_J], tl.int32), mask=pm)
        tl.store(values_ptr + out + p, tl.zeros([BLOCK_J], tl.float32), mask=pm)
        tl.store(pad_ptr + out + p, tl.full([BLOCK_J], 1, tl.uint8), mask=pm)
    tl.store(libsize_ptr + b, total.to(tl.float32))


def _as_i32(u: int) -> int:
    """uint32 -> the int32 with the same bits (so Triton always types the argument i32)."""
    return u - (1 << 32) if u >= 1 << 31 else u


def _blocks(k: int, device: torch.device) -> dict:
    # The interpreter's cost is per tile iteration, so fewer, larger tiles on CPU tensors.
    block_j = min(1024, max(32, triton.next_power_of_2(k)))
    return {"BLOCK_NNZ": 2048 if interpreted(device) else 1024, "BLOCK_J": block_j,
            "num_warps": 4}


def fill(c, ids, values, pad, target, libsize, validate: bool, backend: str = "triton") -> None:
    """The uniform draw of :class:`~txfm_kernels.sample.reference.Call` ``c`` into the outputs
    (``pad`` bool, ``target`` None or ``[B, G]``); ``validate`` checks the input first (torch
    ops, one sync)."""
    if validate:
        check_input(c)
    B = c.indptr.numel() - 1
    if target is not None:
        target.zero_()  # the kernel scatters only the non-zeros
    if B == 0:
        return
    dummy = libsize
    _masked_sample_kernel[(B,)](
        c.indptr, c.indices, c.counts,
        c.obs_indptr if c.obs_indptr is not None else dummy,
        c.obs_genes if c.obs_genes is not None else dummy,
        c.dataset_ids if c.dataset_ids is not None else dummy,
        ids, values, pad.view(torch.uint8), target if target is not None else dummy, libsize,
        c.indices.numel(), c.n_genes, 1 if c.obs_indptr is None else c.obs_indptr.numel() - 1,
        c.k, float(c.target_sum), _as_i32(c.k0), _as_i32(c.k1),
        HAS_OBS=c.obs_indptr is not None, HAS_DS=c.dataset_ids is not None,
        WRITE_TARGET=target is not None, ROUNDS=ROUNDS, STEP=ROUND_STEP, MIN_BITS=MIN_BITS,
        **_blocks(c.k, c.indptr.device))
