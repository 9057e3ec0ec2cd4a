"""Sparse-to-dense masked sampling: a CSR batch of raw counts -> encoder inputs + dense target.

For row ``b`` (a cell or bulk sample) with counts ``c`` over its non-zero genes (CSR row) and
observable genes ``O_b`` (its dataset's profiled genes, SPEC §1-2)::

    S_b            = sum_i c_i                                    (library_size [B], fp32)
    x_bg           = log1p(L * c_g / S_b)   (0 if S_b == 0)       (target [B, G], fp32)
    gene_ids[b, :] = K genes drawn from O_b without replacement    ([B, K], int32)
    values[b, j]   = x_{b, gene_ids[b, j]}  (0 where not expressed) ([B, K], fp32)
    pad_mask[b, j] = j >= |O_b|             (padded slots: gene 0, value 0) ([B, K], bool)

**Uniform draw (tau == 0), bit-identical on every backend.** Row ``b`` of a call is keyed by
``(seed, offset, b)``: ``(seed, offset)`` become a 64-bit key on the host (splitmix64), and
the row gets 6 round keys of a keyed bijection ``P`` of ``[0, 2^m)``, ``2^m >= max(n, 1024)``,
``n = |O_b|``: an alternating unbalanced Feistel network (any ``m``, odd too) whose round
function is the "lowbias32" avalanche hash. The draw is the first ``min(K, n)`` values of
``P(0), P(1), ...`` that are ``< n`` ("filtering", the streaming form of cycle-walking:
distinct by construction, ``~K * 2^m / n`` evaluations, at most ``max(2n, 1024)``, no sort),
mapped through the dataset's sorted observable list; slot order = draw order. All of it is
uint32 xor / shift / multiply, so the C++, CUDA, Triton and torch paths give the same ids bit
for bit (csrc/sample/sample_math.h is the specification; tests/test_sample.py also has it in
plain Python). Quality: chi-square tests of every k-subset's frequency, of each slot's gene
and of pairs of slots pass (tests/test_sample.py; also checked offline for n from 7 to 20,000
with 20,000-100,000 draws each). Domains are padded to >= 2^10 because Feistel networks on a
few bits are far from uniform: a 3-bit one fails those tests whatever its number of rounds.

**Weighted draw (tau != 0).** Weight of gene ``g`` = ``gene_weights[g] ** tau`` over ``O_b``,
drawn without replacement by successive sampling (exponential clocks: keys
``tau * log w_g - log E_bg``, ``E ~ Exp(1)`` from a ``torch.Generator`` seeded by
``(seed, offset)``, then ``topk``). Vectorised torch ops on every backend, ``O(B * G)``: the
same on every backend of one device type, NOT bit-identical across CPU and CUDA (torch's
generators differ), and row ``b``'s draw also depends on ``B``.

Inputs: ``indptr [B+1]`` int64 (int32 accepted), ``indices [nnz]`` int32 sorted and distinct
within each row, ``counts [nnz]`` float32 / int32 / int16 / uint16 / uint8 read as they are
(other real dtypes are converted to float32 first: one copy). Observable genes:
:class:`~txfm_kernels.masks.ObservableGenes` (``[D, G]`` mask + sorted CSR lists) and
``dataset_ids [B]``; ``None`` = every gene. ``S`` is accumulated in fp64 on every backend
(fp32 sums past 2^24 counts would depend on the order); ``L`` is used as fp32.

Memory traffic per row: ``nnz * (4 + count bytes)`` read, ``K * 9`` bytes written for ids,
values and pad mask, and ``G * 4`` for the target (the floor: 45 MB for B = 256, G = 44,349).
The cpu kernel builds each row in a per-thread dense scratch row and streams it into the
target (non-temporal stores: no read-for-ownership); the GPU kernels scatter into a target
zeroed by a memset. Without the target nothing ``O(G)`` is written: values come from the
scratch row (cpu) or a binary search in the CSR row (GPU). A freshly allocated target also
costs its first-touch page faults, on the 2-core VM this was measured on about as much CPU
time as everything else (~25 ms for 45 MB): a loader that alternates two preallocated
results (``out=``) avoids them.

Backends (``backend=``): ``cpu`` (C++/OpenMP over rows, validates while it reads), ``cuda``
(one thread block per row), ``triton`` (one program per row), ``torch`` (vectorised eager
reference, one host sync per block of draws), ``auto`` (cuda > triton > torch on GPU, cpu >
torch on CPU).

Validation: ``validate=None`` checks CPU inputs (O(nnz), fused into the cpu kernel's pass over
each row) and trusts GPU inputs (a check would sync); ``True`` checks GPU inputs too (torch
ops, one sync) and the observable lists against their mask; ``False`` trusts everything.
Checked: indptr starts at 0, is non-decreasing and ends at nnz; indices in ``[0, n_genes)``
and strictly increasing per row; counts finite and >= 0; dataset ids in range; the observable
table's CSR pointers. Unvalidated input never makes the GPU kernels read or write outside
their buffers (row bounds, dataset ids and gene ids are clamped or masked), it only gives
unspecified values; the observable table itself is trusted (``ObservableGenes.from_mask``
builds it consistent). Under ``torch.compile`` the table's pointer check is skipped.
"""
from __future__ import annotations

import ctypes
import math
import struct
from typing import NamedTuple

import torch

from . import _native, _pool
from .backends import resolve_backend
from .masks import ObservableGenes, RowGeneMask

try:  # Triton is optional: the module imports and the other backends work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

__all__ = ["MaskedSample", "masked_sample"]

_OP = "masked_sample"
_ROUNDS = 6
_MIN_BITS = 10  # smallest domain 2^10: see sample_math.h
_ROUND_STEP = 0x61C88647
_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
# counts dtypes the kernels read directly (code shared with csrc/sample/*: CountType)
_COUNT_CODES = {torch.float32: 0, torch.int32: 1, torch.int16: 2, torch.uint8: 4}
if hasattr(torch, "uint16"):
    _COUNT_CODES[torch.uint16] = 3


class MaskedSample(NamedTuple):
    """Result of :func:`masked_sample` (``B`` rows, ``K`` slots, ``G`` genes), on the input device.

    * ``gene_ids [B, K]`` int32: drawn genes, distinct and observable per row, in draw order;
      ``0`` in padded slots.
    * ``values [B, K]`` fp32: ``log1p(L * c / S)`` of those genes (0 where not expressed or padded).
    * ``pad_mask [B, K]`` bool: True in slots beyond the row's number of observable genes.
    * ``target [B, G]`` fp32 or None: the dense log1p-normalised rows (``return_target``).
    * ``gene_mask``: None when every gene is observable, else
      :class:`~txfm_kernels.masks.RowGeneMask` ``(observable.mask, dataset_ids)``, which the
      Poisson loss takes as its ``gene_mask``.
    * ``library_size [B]`` fp32: ``S``, the sum of each row's counts.
    """

    gene_ids: torch.Tensor
    values: torch.Tensor
    pad_mask: torch.Tensor
    target: torch.Tensor | None
    gene_mask: RowGeneMask | None
    library_size: torch.Tensor


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


def _as_i32(u: int) -> int:
    """uint32 -> the int32 with the same bits (so Triton always types the argument i32)."""
    return u - (1 << 32) if u >= 1 << 31 else u


# ---------------------------------------------------------------------------------------------
# Triton kernel: one program per row
# ---------------------------------------------------------------------------------------------
if triton is not None:

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
        scale = tl.where(total > 0, L / tl.where(total > 0, total, 1.0),
                         0.0).to(tl.float32)

        trow = target_ptr + b * n_genes
        if WRITE_TARGET:  # the caller zeroed the target (a full-bandwidth memset)
            for i0 in range(start, end, BLOCK_NNZ):
                offs = i0 + tl.arange(0, BLOCK_NNZ)
                m = offs < end
                g = tl.load(indices_ptr + offs, mask=m, other=0)
                c = tl.load(counts_ptr + offs, mask=m, other=0).to(tl.float32)
                tl.store(trow + g, _log1p_nonneg(c * scale), mask=m & (g >= 0) & (g < n_genes))
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
                val = tl.where(hit, _log1p_nonneg(c * scale), 0.0)
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


def _triton_blocks(k: int, device: torch.device) -> dict:
    # The interpreter's cost is per tile iteration, so fewer, larger tiles on CPU tensors.
    gpu = device.type == "cuda"
    block_j = min(1024, max(32, triton.next_power_of_2(k)))
    return {"BLOCK_NNZ": 1024 if gpu else 2048, "BLOCK_J": block_j, "num_warps": 4}


# ---------------------------------------------------------------------------------------------
# Launchers: each fills preallocated outputs (ids, values, pad as uint8, target or None, libsize)
# ---------------------------------------------------------------------------------------------
class _Call(NamedTuple):
    indptr: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor
    obs_indptr: torch.Tensor | None
    obs_genes: torch.Tensor | None
    dataset_ids: torch.Tensor | None
    n_genes: int
    k: int
    library_size: float
    k0: int
    k1: int


def _launch_triton(c: _Call, ids, values, pad, target, libsize) -> None:
    B = c.indptr.numel() - 1
    if B == 0:
        return
    dummy = libsize
    _masked_sample_kernel[(B,)](
        c.indptr, c.indices, c.counts,
        c.obs_indptr if c.obs_indptr is not None else dummy,
        c.obs_genes if c.obs_genes is not None else dummy,
        c.dataset_ids if c.dataset_ids is not None else dummy,
        ids, values, pad, target if target is not None else dummy, libsize,
        c.indices.numel(), c.n_genes, 1 if c.obs_indptr is None else c.obs_indptr.numel() - 1,
        c.k, float(c.library_size), _as_i32(c.k0), _as_i32(c.k1),
        HAS_OBS=c.obs_indptr is not None, HAS_DS=c.dataset_ids is not None,
        WRITE_TARGET=target is not None, ROUNDS=_ROUNDS, STEP=_ROUND_STEP, MIN_BITS=_MIN_BITS,
        **_triton_blocks(c.k, c.indptr.device))


_CPU_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                 ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                 ctypes.c_int64, ctypes.c_float, ctypes.c_uint32, ctypes.c_uint32,
                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                 ctypes.c_void_p]


def _native_args(c: _Call, ids, values, pad, target, libsize) -> list:
    ds = c.dataset_ids
    return [_native.ptr(c.indptr), _native.ptr(c.indices), _native.ptr(c.counts),
            _COUNT_CODES[c.counts.dtype], c.indptr.numel() - 1, c.indices.numel(), c.n_genes,
            _native.ptr(c.obs_indptr), _native.ptr(c.obs_genes),
            1 if c.obs_indptr is None else c.obs_indptr.numel() - 1,
            _native.ptr(ds), int(ds is not None and ds.dtype == torch.int64),
            c.k, c.library_size, c.k0, c.k1,
            _native.ptr(ids), _native.ptr(values), _native.ptr(pad), _native.ptr(target),
            _native.ptr(libsize)]


def _launch_cpu(c: _Call, ids, values, pad, target, libsize, validate: bool) -> None:
    lib, _ = _native.cpu_library("sample")
    fn = _native.bind(lib, "txfm_sample_cpu", _CPU_ARGTYPES + [ctypes.c_int, ctypes.c_void_p])
    bad = ctypes.c_int64(-1)
    status = fn(*_native_args(c, ids, values, pad, target, libsize), int(validate),
                ctypes.byref(bad))
    if status >= 10:
        raise ValueError(_error_message(status, bad.value, c))
    _native.check_cpu(status, _OP)


def _launch_cuda(c: _Call, ids, values, pad, target, libsize) -> None:
    lib, _ = _native.cuda_library("sample")
    fn = _native.bind(lib, "txfm_sample_cuda", _CPU_ARGTYPES + [ctypes.c_void_p])
    code = fn(*_native_args(c, ids, values, pad, target, libsize),
              _native.cuda_stream(c.indptr.device))
    _native.check_cuda(code, _OP, lib)


# ---------------------------------------------------------------------------------------------
# torch reference: the same integer recipe with int64 tensors (torch lacks uint32 arithmetic)
# ---------------------------------------------------------------------------------------------
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # low 32 bits of x * c: exact in int64 because x < 2^32 and the constants c are < 2^31
    return (x * c) & _M32


def _hash32_t(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def _feistel_t(x, keys, la, lb):
    for key in keys:
        left = x >> lb
        right = x & ((1 << lb) - 1)
        f = _hash32_t(right ^ key) & ((1 << la) - 1)
        x = (right << la) | (left ^ f)
        la, lb = lb, la
    return x


def _uniform_ids_torch(n: torch.Tensor, k: int, k0: int, k1: int) -> torch.Tensor:
    """``[B, K]`` int64 positions in each row's observable list (``-1`` where padded)."""
    B, dev = n.numel(), n.device
    m = torch.full_like(n, _MIN_BITS)
    for i in range(_MIN_BITS, 31):
        m += (1 << i) < n
    la, lb = (m // 2)[:, None], (m - m // 2)[:, None]
    domain = (1 << m)[:, None]
    rs = _hash32_t(k0 ^ _hash32_t(torch.arange(B, device=dev) ^ k1))
    keys = [_hash32_t((rs + (i + 1) * _ROUND_STEP) & _M32)[:, None] for i in range(_ROUNDS)]
    kk = torch.clamp(n, max=k)[:, None]
    out = torch.full((B, k + 1), -1, dtype=torch.int64, device=dev)  # last column: discard
    cnt = torch.zeros(B, 1, dtype=torch.int64, device=dev)
    chunk = 2 * k + 256
    j0 = 0
    while B and bool((cnt < kk).any()):  # one sync per chunk; two chunks are rarely needed
        j = torch.arange(j0, j0 + chunk, device=dev)[None, :]
        y = _feistel_t(j, keys, la, lb)
        keep = (j < domain) & (y < n[:, None])
        pos = cnt + torch.cumsum(keep, 1) - 1
        out.scatter_(1, torch.where(keep & (pos < kk), pos, k), y)
        cnt = cnt + keep.sum(1, keepdim=True)
        j0 += chunk
    return out[:, :k]


def _torch_dense(c: _Call):
    """Per-nnz row ids, normalised values ``L * c / S`` and the row sums ``S``."""
    B, nnz = c.indptr.numel() - 1, c.indices.numel()
    dev = c.indptr.device
    row = torch.repeat_interleave(torch.arange(B, device=dev), c.indptr[1:] - c.indptr[:-1],
                                  output_size=nnz)
    counts = c.counts.to(torch.float32)
    total = torch.zeros(B, dtype=torch.float64, device=dev).index_add_(0, row, counts.double())
    scale = torch.where(total > 0, c.library_size / torch.where(total > 0, total, 1.0), 0.0)
    return row, counts * scale.float()[row], total.float()


def _torch_values(c: _Call, row, x, gene_ids, pad, target) -> torch.Tensor:
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


def _row_observables(c: _Call, B: int):
    """``(n [B], first [B])``: each row's number of observable genes and where its list starts."""
    dev = c.indptr.device
    if c.obs_indptr is None:
        return (torch.full((B,), c.n_genes, dtype=torch.int64, device=dev),
                torch.zeros(B, dtype=torch.int64, device=dev))
    ds = (c.dataset_ids.long() if c.dataset_ids is not None
          else torch.zeros(B, dtype=torch.int64, device=dev))
    first = c.obs_indptr[ds]
    return c.obs_indptr[ds + 1] - first, first


def _run_torch(c: _Call, ids, values, pad, target, libsize) -> None:
    B = c.indptr.numel() - 1
    row, x, total = _torch_dense(c)
    if target is not None:
        target.zero_()
        target[row, c.indices.long()] = torch.log1p(x)
    n, first = _row_observables(c, B)
    local = _uniform_ids_torch(n, c.k, c.k0, c.k1)
    is_pad = local < 0
    genes = (c.obs_genes.long()[(first[:, None] + local).clamp_(min=0)]
             if c.obs_genes is not None else local)
    genes = genes.masked_fill_(is_pad, 0)
    ids.copy_(genes)
    pad.copy_(is_pad)
    values.copy_(_torch_values(c, row, x, genes, is_pad, target))
    libsize.copy_(total)


# ---------------------------------------------------------------------------------------------
# Validation: one set of messages for the kernel's status codes and the torch checks
# ---------------------------------------------------------------------------------------------
def _error_message(code: int, where: int, c: _Call) -> str:
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


def _validate_torch(c: _Call) -> None:
    """The cpu kernel's checks as torch ops (one sync); raises the same messages."""
    B, nnz = c.indptr.numel() - 1, c.indices.numel()
    dev = c.indptr.device
    if int(c.indptr[0]) != 0:
        raise ValueError(_error_message(10, 0, c))
    step_bad = (c.indptr[1:] < c.indptr[:-1]).nonzero()
    if step_bad.numel():
        raise ValueError(_error_message(11, int(step_bad[0, 0]), c))
    if int(c.indptr[-1]) != nnz:
        raise ValueError(_error_message(12, B, c))
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
    range_bad = rows_with((idx < 0) | (idx >= c.n_genes), row)
    same_row = row[1:] == row[:-1]
    order_bad = rows_with(same_row & (idx[1:] <= idx[:-1]), row[1:])
    counts = c.counts
    if counts.is_floating_point():
        cbad = ~(torch.isfinite(counts) & (counts >= 0))
    elif counts.dtype in (torch.uint8,) or counts.dtype == getattr(torch, "uint16", None):
        cbad = torch.zeros(nnz, dtype=torch.bool, device=dev)
    else:
        cbad = counts < 0
    count_bad = rows_with(cbad, row)
    flags = torch.stack([ds_bad, range_bad, order_bad, count_bad])  # kernel's priority order
    bad_rows = flags.any(0).nonzero()
    if bad_rows.numel():
        r = int(bad_rows[0, 0])
        code = (16, 13, 14, 15)[int(flags[:, r].nonzero()[0, 0])]
        raise ValueError(_error_message(code, r, c))


def _validate_observable(obs: ObservableGenes, n_genes: int, deep: bool) -> None:
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
def _run_weighted(c: _Call, mask: torch.Tensor | None, gene_weights, tau, seed, offset, ids,
                  values, pad, target, libsize) -> None:
    B = c.indptr.numel() - 1
    dev = c.indptr.device
    row, x, total = _torch_dense(c)
    if target is not None:
        target.zero_()
        target[row, c.indices.long()] = torch.log1p(x)
    gen = torch.Generator(device=dev)
    k0, k1 = call_key(seed, offset)
    gen.manual_seed((k1 << 32) | k0)
    u = torch.rand((B, c.n_genes), generator=gen, device=dev)
    # key = log(w^tau / E), E ~ Exp(1): the largest key first = successive sampling with
    # probability proportional to w^tau among the genes not yet drawn (exponential clocks)
    keys = tau * torch.log(gene_weights.to(torch.float32))[None, :] - torch.log(-torch.log1p(-u))
    n, _ = _row_observables(c, B)
    if mask is not None:
        ds = (c.dataset_ids.long() if c.dataset_ids is not None
              else torch.zeros(B, dtype=torch.int64, device=dev))
        keys.masked_fill_(~mask[ds], -math.inf)
    kk = min(c.k, c.n_genes)
    drawn = torch.zeros(B, c.k, dtype=torch.int64, device=dev)
    drawn[:, :kk] = torch.topk(keys, kk, dim=1, sorted=True).indices
    is_pad = torch.arange(c.k, device=dev)[None, :] >= n[:, None]
    drawn.masked_fill_(is_pad, 0)
    ids.copy_(drawn)
    pad.copy_(is_pad)
    values.copy_(_torch_values(c, row, x, drawn, is_pad, target))
    libsize.copy_(total)


# ---------------------------------------------------------------------------------------------
# torch.library op (uniform draw), so torch.compile keeps it as one node
# ---------------------------------------------------------------------------------------------
def _fill(c: _Call, backend: str, validate: bool, ids, values, pad, target, libsize) -> None:
    pad_u8 = pad.view(torch.uint8)
    if backend == "cpu":
        _launch_cpu(c, ids, values, pad_u8, target, libsize, validate)
        return
    if validate:
        _validate_torch(c)
    if backend == "torch":
        _run_torch(c, ids, values, pad, target, libsize)
        return
    if target is not None:
        target.zero_()  # GPU kernels scatter only the non-zeros
    if backend == "cuda":
        _launch_cuda(c, ids, values, pad_u8, target, libsize)
    else:
        _launch_triton(c, ids, values, pad_u8, target, libsize)


def _new_outputs(B: int, k: int, n_genes: int, return_target: bool, device):
    return (torch.empty(B, k, dtype=torch.int32, device=device),
            torch.empty(B, k, dtype=torch.float32, device=device),
            torch.empty(B, k, dtype=torch.bool, device=device),
            (_pool.cpu_empty((B, n_genes), torch.float32) if return_target and
             torch.device(device).type == "cpu" else
             torch.empty(B, n_genes if return_target else 0, dtype=torch.float32, device=device)),
            torch.empty(B, dtype=torch.float32, device=device))


@torch.library.custom_op("txfm::masked_sample", mutates_args=())
def _masked_sample_op(indptr: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
                      obs_indptr: torch.Tensor | None, obs_genes: torch.Tensor | None,
                      dataset_ids: torch.Tensor | None, n_genes: int, k: int,
                      library_size: float, seed: int, offset: int, return_target: bool,
                      validate: bool, backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor]:
    """Uniform draw; the target is ``[B, 0]`` when not requested (custom ops return tensors)."""
    k0, k1 = call_key(seed, offset)
    c = _Call(indptr, indices, counts, obs_indptr, obs_genes, dataset_ids, n_genes, k,
              library_size, k0, k1)
    outs = _new_outputs(indptr.numel() - 1, k, n_genes, return_target, indptr.device)
    ids, values, pad, target, libsize = outs
    _fill(c, backend, validate, ids, values, pad, target if return_target else None, libsize)
    return outs


@_masked_sample_op.register_fake
def _(indptr, indices, counts, obs_indptr, obs_genes, dataset_ids, n_genes, k, library_size,
      seed, offset, return_target, validate, backend):
    return _new_outputs(indptr.shape[0] - 1, k, n_genes, return_target, indptr.device)


# ---------------------------------------------------------------------------------------------
# Argument checks (no device sync) and the public function
# ---------------------------------------------------------------------------------------------
def _tensor(name: str, t, ndim: int = 1) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{_OP}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t.contiguous()


def _check_counts(counts: torch.Tensor) -> torch.Tensor:
    if counts.dtype in _COUNT_CODES:
        return counts
    if counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError(f"{_OP}: counts must be a real number dtype (float32, int32, int16, "
                        f"uint16 or uint8 are read directly), got {counts.dtype}")
    return counts.to(torch.float32)  # float64/float16/bfloat16/int64/int8: one conversion copy


def _prepare(indptr, indices, counts, n_genes, k, observable, dataset_ids, library_size,
             gene_weights, tau) -> tuple[_Call, torch.Tensor | None]:
    indptr = _tensor("indptr", indptr)
    indices = _tensor("indices", indices)
    counts = _tensor("counts", counts)
    if indptr.dtype == torch.int32:
        indptr = indptr.long()
    if indptr.dtype != torch.int64:
        raise TypeError(f"{_OP}: indptr must be int64 (or int32), got {indptr.dtype}")
    if indptr.numel() < 1:
        raise ValueError(f"{_OP}: indptr must have B + 1 >= 1 entries, got none")
    if indices.dtype != torch.int32:
        raise TypeError(f"{_OP}: indices must be int32, got {indices.dtype}; "
                        f"pass indices.to(torch.int32)")
    if counts.numel() != indices.numel():
        raise ValueError(f"{_OP}: counts has {counts.numel()} entries but indices has "
                         f"{indices.numel()}; they must be the CSR data and indices of one matrix")
    counts = _check_counts(counts)
    device = indptr.device
    for name, t in (("indices", indices), ("counts", counts)):
        if t.device != device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but indptr on {device}; "
                             f"move all inputs to one device")
    if isinstance(n_genes, bool) or not isinstance(n_genes, int) or not 1 <= n_genes < 2**31:
        raise ValueError(f"{_OP}: n_genes must be an int in [1, 2^31), got {n_genes!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{_OP}: k must be an int >= 1 (genes shown per row), got {k!r}")
    library_size = float(library_size)
    if not (math.isfinite(library_size) and library_size > 0):
        raise ValueError(f"{_OP}: library_size must be finite and > 0, got {library_size}")
    library_size = struct.unpack("f", struct.pack("f", library_size))[0]  # kernels take fp32
    B = indptr.numel() - 1
    obs_indptr = obs_genes = mask = None
    if observable is not None:
        if not isinstance(observable, ObservableGenes):
            raise TypeError(f"{_OP}: observable must be an ObservableGenes (see "
                            f"ObservableGenes.from_mask) or None, got {type(observable).__name__}")
        if observable.mask.device != device:
            raise ValueError(f"{_OP}: observable is on {observable.mask.device} but the batch "
                             f"on {device}; use observable.to({str(device)!r}) once")
        if observable.n_genes != n_genes:
            raise ValueError(f"{_OP}: observable covers {observable.n_genes} genes but "
                             f"n_genes={n_genes}; build it over the same gene vocabulary")
        obs_indptr, obs_genes, mask = observable.indptr, observable.genes, observable.mask
        if dataset_ids is None and observable.n_datasets > 1:
            raise ValueError(f"{_OP}: observable has {observable.n_datasets} datasets, so "
                             f"dataset_ids [B] (each row's dataset) is required")
    if dataset_ids is not None and observable is not None:
        dataset_ids = _tensor("dataset_ids", dataset_ids)
        if dataset_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{_OP}: dataset_ids must be int32 or int64, got {dataset_ids.dtype}")
        if dataset_ids.numel() != B or dataset_ids.device != device:
            raise ValueError(f"{_OP}: dataset_ids must have B={B} entries on {device}, got "
                             f"{dataset_ids.numel()} on {dataset_ids.device}")
    else:
        dataset_ids = None  # without observable every row sees every gene
    if tau != 0:
        if gene_weights is None:
            raise ValueError(f"{_OP}: tau={tau} needs gene_weights [n_genes] (e.g. the number "
                             f"of training samples expressing each gene)")
        gene_weights = _tensor("gene_weights", gene_weights)
        if gene_weights.numel() != n_genes or not gene_weights.is_floating_point() \
                or gene_weights.device != device:
            raise ValueError(f"{_OP}: gene_weights must be a float tensor of n_genes={n_genes} "
                             f"entries on {device}, got {gene_weights.dtype} "
                             f"{tuple(gene_weights.shape)} on {gene_weights.device}")
    c = _Call(indptr, indices, counts, obs_indptr, obs_genes, dataset_ids, n_genes, k,
              library_size, 0, 0)
    return c, mask


def _check_out(out: MaskedSample, B: int, k: int, n_genes: int, return_target: bool, device):
    want = _new_outputs(0, 0, 0, return_target, "meta")
    shapes = [(B, k), (B, k), (B, k), (B, n_genes), (B,)]
    fields = [out.gene_ids, out.values, out.pad_mask, out.target, out.library_size]
    for name, t, w, shape in zip(("gene_ids", "values", "pad_mask", "target", "library_size"),
                                 fields, want, shapes):
        if name == "target" and not return_target:
            continue
        if (not isinstance(t, torch.Tensor) or t.dtype != w.dtype or tuple(t.shape) != shape
                or t.device != device or not t.is_contiguous()):
            raise ValueError(f"{_OP}: out.{name} must be a contiguous {w.dtype} tensor of shape "
                             f"{shape} on {device}")


@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str) -> str:
    # decided once at trace time under torch.compile (it looks at files and the environment)
    return resolve_backend(backend, torch.device(device_type), "sample",
                           gpu_order=("cuda", "triton"))


def masked_sample(indptr: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, *,
                  n_genes: int, k: int = 2048, observable: ObservableGenes | None = None,
                  dataset_ids: torch.Tensor | None = None, library_size: float = 1e5,
                  seed: int, offset: int = 0, tau: float = 0.0,
                  gene_weights: torch.Tensor | None = None, return_target: bool = True,
                  validate: bool | None = None, backend: str = "auto",
                  out: MaskedSample | None = None) -> MaskedSample:
    """Normalise a CSR batch of counts, draw ``k`` observable genes per row, build the target.

    Args:
        indptr: ``[B+1]`` int64 (int32 accepted) CSR row pointers, ``indptr[0] == 0``.
        indices: ``[nnz]`` int32 gene ids, strictly increasing within each row.
        counts: ``[nnz]`` raw counts: float32, int32, int16, uint16 or uint8 (read as they are;
            other real dtypes are converted to float32 first).
        n_genes: ``G``, the gene vocabulary size.
        k: genes shown per row (``K``); rows with fewer observable genes are padded.
        observable: which genes each dataset profiles; None = all genes.
        dataset_ids: ``[B]`` int32/int64 dataset of each row; required when ``observable`` has
            more than one dataset (ignored without ``observable``).
        library_size: ``L`` of ``log1p(L * c / sum(c))``.
        seed, offset: key of the counter-based draw (e.g. a run seed and the global step);
            row ``b`` is keyed by ``(seed, offset, b)``.
        tau: 0 = uniform draw (bit-identical on every backend); otherwise genes are drawn
            with probability proportional to ``gene_weights ** tau`` (torch ops, see module doc).
        gene_weights: ``[G]`` positive float weights (tau != 0 only).
        return_target: also write the dense ``[B, G]`` target.
        validate: None = check CPU inputs, trust GPU inputs; True = check both (syncs on GPU);
            False = trust both.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.
        out: optional preallocated :class:`MaskedSample` to write into (e.g. two alternated by
            a loader): saves the allocation and first-touch page faults of the target.

    Returns:
        :class:`MaskedSample` on the inputs' device.

    >>> import torch
    >>> from txfm_kernels import masked_sample
    >>> indptr = torch.tensor([0, 2, 3]); indices = torch.tensor([1, 4, 0], dtype=torch.int32)
    >>> s = masked_sample(indptr, indices, torch.tensor([3.0, 1.0, 5.0]), n_genes=6, k=4, seed=0)
    >>> s.gene_ids.shape, s.target.shape, s.library_size.tolist()
    (torch.Size([2, 4]), torch.Size([2, 6]), [4.0, 5.0])
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{_OP}: seed must be an int (keyword), got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"{_OP}: offset must be an int, got {offset!r}")
    tau = float(tau)
    if not math.isfinite(tau):
        raise ValueError(f"{_OP}: tau must be finite, got {tau}")
    c, mask = _prepare(indptr, indices, counts, n_genes, k, observable, dataset_ids,
                       library_size, gene_weights, tau)
    device = c.indptr.device
    backend = _resolve(backend, device.type)
    check = (device.type == "cpu") if validate is None else bool(validate)
    B = c.indptr.numel() - 1
    if observable is not None and check and not torch.compiler.is_compiling():
        _validate_observable(observable, n_genes, deep=validate is True)
    if tau != 0 and check:
        gw = gene_weights
        if not bool((torch.isfinite(gw) & (gw > 0)).all()):
            raise ValueError(f"{_OP}: gene_weights must be finite and > 0 (add a pseudo-count "
                             f"to genes never expressed)")
    gene_mask = None
    if observable is not None:
        ds = c.dataset_ids if c.dataset_ids is not None else torch.zeros(
            B, dtype=torch.int32, device=device)
        gene_mask = RowGeneMask(observable.mask, ds)

    # seeds as signed int64 (the custom op's int); call_key reduces mod 2^64 either way
    seed64 = ((seed & _M64) ^ (1 << 63)) - (1 << 63)
    offset64 = ((offset & _M64) ^ (1 << 63)) - (1 << 63)
    if out is None and tau == 0:
        ids, values, pad, target, libsize = _masked_sample_op(
            c.indptr, c.indices, c.counts, c.obs_indptr, c.obs_genes, c.dataset_ids, n_genes, k,
            c.library_size, seed64, offset64, return_target, check, backend)
        return MaskedSample(ids, values, pad, target if return_target else None, gene_mask,
                            libsize)
    if out is not None:
        _check_out(out, B, k, n_genes, return_target, device)
        outs = (out.gene_ids, out.values, out.pad_mask, out.target if return_target else None,
                out.library_size)
    else:
        ids, values, pad, target, libsize = _new_outputs(B, k, n_genes, return_target, device)
        outs = (ids, values, pad, target if return_target else None, libsize)
    if tau == 0:
        k0, k1 = call_key(seed, offset)
        _fill(c._replace(k0=k0, k1=k1), backend, check, *outs)
    else:
        if check:
            _validate_torch(c)
        _run_weighted(c, mask, gene_weights, tau, seed, offset, *outs)
    return MaskedSample(outs[0], outs[1], outs[2], outs[3], gene_mask, outs[4])
