"""Triton kernels of the Poisson NLL op and their launchers (``backend="triton"``).

One program per (row, column tile) computes the loss partial sum of its tile (row weight
included) and, when wanted, ``weight * dl/dz`` (in ``reference.grad_dtype``) and the
per-element losses; the partials are added in a fixed order on the host side of the launch
(deterministic, no float atomics). The per-element math follows ``csrc/poisson/poisson_math.h``; on CPU tensors
the kernels run under the Triton interpreter (tests).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._common import interpreted
from .._triton import round_to_bf16


@triton.jit
def _tanh_sech2(u):
    """(tanh(u), sech^2(u)) for u > 0 as in poisson_math.h, from one exp: up to u = 40
    m = expm1(2u), r = 1/(m + 2), tanh = m r, sech^2 = 4r(1 - r); beyond, w = exp(-2u),
    tanh = 1, sech^2 = 4w (decays with u: no cap, no overflow)."""
    uc = tl.where(u < 0.0, 0.0, u)  # NaN compares false and passes through
    far = uc > 40.0
    v = tl.where(far, -2.0 * uc, 2.0 * uc)
    e = tl.exp(v)
    series = v * (1.0 + v * (0.5 + v * (1.0 / 6.0 + v * (1.0 / 24.0 + v * (1.0 / 120.0 + v / 720.0)))))
    m = tl.where(v < 0.25, series, e - 1.0)  # expm1 without cancellation (u <= 40)
    r = 1.0 / (m + 2.0)
    return tl.where(far, 1.0, m * r), tl.where(far, 4.0 * e, 4.0 * r * (1.0 - r))


@triton.jit
def _stirling(x):
    s = x * tl.log(x) - x + 0.5 * tl.log(6.283185307179586 * x)
    return tl.where(x <= 1.0, 0.0, s)


@triton.jit
def _poisson_fwd_kernel(z_ptr, x_ptr, mask_ptr, ids_ptr, row_scale_ptr, grad_ptr, elem_ptr,
                        partial_ptr, G, n_tiles, mask_stride, n_mask_rows, alpha,
                        inv_beta, alpha_over_beta, eps,
                        MODE: tl.constexpr, FULL: tl.constexpr, MASK_KIND: tl.constexpr,
                        WRITE_GRAD: tl.constexpr,
                        WRITE_ELEM: tl.constexpr, GRAD_BF16: tl.constexpr,
                        F64: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr):
    """One (row, TILE-column tile): loss partial (row weight included), scaled dlogits.

    MASK_KIND: 0 none, 1 mask row ``b`` (stride 0 for a shared [G] row), 2 mask row
    ``ids[b]`` of a [D, G] table (an id outside [0, D) makes the row NaN, no OOB read).
    """
    pid = tl.program_id(0)
    b = pid // n_tiles
    col0 = (pid % n_tiles) * TILE
    row = b.to(tl.int64) * G
    cdt = tl.float64 if F64 else tl.float32
    w = tl.load(row_scale_ptr + b).to(cdt)
    bad = 0.0
    if MASK_KIND == 1:
        mrow = mask_ptr + b.to(tl.int64) * mask_stride
    if MASK_KIND == 2:
        r = tl.load(ids_ptr + b)
        ok = (r >= 0) & (r < n_mask_rows)
        mrow = mask_ptr + tl.where(ok, r, 0).to(tl.int64) * mask_stride
        bad = tl.where(ok, 0.0, float("nan"))
    acc = tl.zeros([BLOCK], dtype=cdt)
    for start in range(0, TILE, BLOCK):
        cols = col0 + start + tl.arange(0, BLOCK)
        inb = cols < G
        z = tl.load(z_ptr + row + cols, mask=inb, other=0.0).to(cdt)
        x = tl.load(x_ptr + row + cols, mask=inb, other=0.0).to(cdt)
        if MODE == 0:
            t, s2 = _tanh_sech2(z * inv_beta)
            phi = tl.where(z <= 0.0, 0.0, alpha * t)
            ephi = tl.exp(phi)
            y = tl.exp(x)
            loss = ephi - phi * y
            dz = tl.where(z <= 0.0, 0.0, alpha_over_beta * s2 * (ephi - y))
        elif MODE == 1:
            ez = tl.exp(z)
            loss = ez - x * z
            dz = ez - x
        else:
            ze = z + eps
            loss = z - x * tl.log(ze)
            dz = 1.0 - x / ze
        if FULL:
            loss += _stirling(x)
        keep = inb
        if MASK_KIND != 0:
            keep = keep & (tl.load(mrow + cols, mask=inb, other=0) != 0)
        loss = tl.where(keep, loss, 0.0) + bad
        dz = tl.where(keep, dz * w, 0.0) + bad
        acc += tl.where(inb, loss, 0.0)
        if WRITE_GRAD:
            if GRAD_BF16:
                tl.store(grad_ptr + row + cols, round_to_bf16(dz), mask=inb)
            else:
                tl.store(grad_ptr + row + cols, dz.to(grad_ptr.dtype.element_ty), mask=inb)
        if WRITE_ELEM:
            tl.store(elem_ptr + row + cols, loss, mask=inb)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0) * w)


@triton.jit
def _scale_kernel(grad_ptr, scale_ptr, n, GRAD_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """grad *= scale in place, skipped when scale == 1 (read on the device: no sync)."""
    s = tl.load(scale_ptr)
    if s != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        v = tl.load(grad_ptr + offs, mask=m, other=0.0).to(tl.float32) * s
        if GRAD_BF16:
            tl.store(grad_ptr + offs, round_to_bf16(v), mask=m)
        else:
            tl.store(grad_ptr + offs, v.to(grad_ptr.dtype.element_ty), mask=m)



def _config(G: int, device: torch.device) -> tuple[int, int, int]:
    """(TILE, BLOCK, num_warps). On a GPU 4096-column tiles in 2048-wide steps, 8 elements per
    thread in flight (enough programs to fill the SMs from B = 64 on). Under the interpreter the
    cost is per step, not per element, so one program takes a whole row in steps of up to
    16384 columns."""
    if interpreted(device):
        block = min(triton.next_power_of_2(G), 16384)
        return block * triton.cdiv(G, block), block, 4
    return 4096, 2048, 8


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward(z: torch.Tensor, x: torch.Tensor, job, backend: str = "triton"):
    """``(loss, grad)`` of ``job`` (a :class:`txfm_kernels.poisson.Launch`) on contiguous
    ``z, x [B, G]``: loss 0-d (sum over rows of weight * kept sum) or, for ``"none"``, the
    ``[B, G]`` per-element losses; grad ``weight * dl/dz`` in ``job.gdt``, or None."""
    B, G = z.shape
    tile, block, warps = _config(G, z.device)
    n_tiles = triton.cdiv(G, tile)
    partials = torch.empty(B * n_tiles, dtype=torch.float64, device=z.device)
    grad = torch.empty((B, G), dtype=job.gdt, device=z.device) if job.need_grad else None
    elementwise = job.reduction == "none"
    elem = torch.empty((B, G), dtype=job.cdt, device=z.device) if elementwise else None
    mask, ids = job.mask, job.ids
    row_scale = job.row_scale
    if row_scale is None:
        row_scale = torch.full((B,), job.scale, dtype=torch.float64, device=z.device)
    dummy = partials  # any tensor: the kernel never touches pointers its flags switch off
    with _on_device(z):
        _poisson_fwd_kernel[(B * n_tiles,)](
            z, x, dummy if mask is None else mask, dummy if ids is None else ids, row_scale,
            dummy if grad is None else grad, dummy if elem is None else elem, partials,
            G, n_tiles, job.mask_stride, job.n_mask_rows, job.alpha, 1.0 / job.beta,
            job.alpha / job.beta, job.eps, MODE=job.mode, FULL=job.full,
            MASK_KIND=0 if mask is None else (2 if ids is not None else 1),
            WRITE_GRAD=job.need_grad, WRITE_ELEM=elementwise,
            GRAD_BF16=job.gdt == torch.bfloat16, F64=job.cdt == torch.float64, TILE=tile,
            BLOCK=block, num_warps=warps)
    return (elem if elementwise else partials.sum().to(job.cdt)), grad


def scale_grad(grad: torch.Tensor, scale: torch.Tensor, backend: str = "triton") -> None:
    """``grad *= scale`` in place (``scale``: 1-element fp32 on grad's device), skipped on the
    device when ``scale == 1`` (no sync)."""
    block = 4096
    with _on_device(grad):
        _scale_kernel[(triton.cdiv(grad.numel(), block),)](
            grad, scale, grad.numel(), GRAD_BF16=grad.dtype == torch.bfloat16, BLOCK=block)
