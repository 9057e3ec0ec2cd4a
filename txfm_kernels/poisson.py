"""Fused rectified tanh + Poisson negative log-likelihood over the gene vocabulary (SPEC §4).

For decoder logits ``z [B, G]`` and log1p-normalised targets ``x [B, G]``::

    phi(z)   = alpha * relu(tanh(z / beta))             alpha = log(1e5 + 1), beta = 4e
    l[b, g]  = exp(phi) - phi * exp(x)                  Poisson NLL, log-rate phi, count exp(x)
    dl/dz    = (alpha / beta) * sech^2(z / beta) * (exp(phi) - exp(x))   for z > 0, 0 for z <= 0

:func:`rectified_tanh_poisson_nll` reduces ``l`` over the genes each row keeps (``gene_mask``):

* ``"mean"``: mean over rows of each row's mean over its kept genes. A row that keeps no gene
  contributes 0 (and gets a zero gradient) but still counts in the 1/B.
* ``"sum"``: sum over rows and kept genes.
* ``"none"``: ``[B, G]`` fp32 per-element losses, 0 where a gene is left out.

``gene_mask`` (True = keep): ``None``; a bool ``[G]`` (same genes for every row) or ``[B, G]``
tensor; or a :class:`~txfm_kernels.RowGeneMask` ``(mask [D, G] bool, dataset_ids [B] int)``,
the compact per-dataset form: kernels index row ``dataset_ids[b]`` of the ``[D, G]`` table and
never build a ``[B, G]`` mask (only the eager ``torch`` backend expands it).

Dtypes: logits fp32, bf16 or fp16; targets fp32 or bf16 (other float targets are converted);
fp64 logits with fp64 targets compute in fp64 (for gradcheck). Arithmetic and sums are fp32
(fp64 for fp64); the loss is fp32 and the gradient comes back in the logits' dtype (rounded to
nearest even). Shapes ``[B, G]`` with any ``B, G >= 1``, or ``[G]`` (one row; ``"none"`` then
gives ``[G]``). Non-contiguous inputs are copied to contiguous memory first.

:func:`poisson_nll_loss` is a drop-in for :func:`torch.nn.functional.poisson_nll_loss` (every
argument, same results, the Stirling term of ``full=True`` included) on the same kernels;
inputs it does not cover (broadcasting shapes, mixed dtypes, a target that requires grad,
empty tensors) go to torch's own implementation.

How it runs (``backend="triton" | "cuda" | "cpu"``): one pass over logits and target computes
the loss and, when a gradient will be needed (``logits.requires_grad`` under grad mode),
``dlogits`` already scaled for the reduction, into a fresh buffer (never into the caller's
logits). Rows are split into column tiles (the grid is rows x tiles); each tile writes one
partial sum and the partials are added in a fixed order, so results are deterministic and
need no float atomics. The ``"mean"`` weight of row ``b`` is ``1 / (B * kept_b)``, known before
the pass: the kept counts come from a cheap reduction of the mask alone (``[G]``: one sum;
``[D, G]``: one sum per dataset, then gathered; ``[B, G]``: a row sum, 1 byte per element
against the 8-12 bytes per element of the main pass), which keeps the kernel single-pass.
The backward is then ``dlogits *= grad_output`` in place on that buffer, skipped when
``grad_output == 1`` (the usual ``loss.backward()``): on CPU tensors by a host check (free, no
device), on GPU inside the kernel (no sync). So a training step reads logits and target once
and writes one ``[B, G]`` gradient, and holds no other ``[B, G]`` buffer.

Consequences of that in-place scaling: a second backward through the same graph
(``retain_graph=True``) after one with ``grad_output != 1`` (or any on a GPU) raises PyTorch's
"modified by an inplace operation" error instead of returning a wrong gradient, and double
backward (``create_graph=True``) is an error; ``backend="torch"`` (eager autograd) supports
both. Memory traffic per training step, fp32: 12 bytes per element (read z, x; write dz);
bf16 logits and target: 6 bytes.

A dataset id outside ``[0, D)`` raises a ``ValueError`` on CPU tensors; on GPU tensors it is not
checked on the host (that needs a sync): its row's loss and gradient come out NaN.

torch.compile: the fused forward is the ``torch.library`` custom op ``txfm::poisson_nll``
(fake and autograd registered), so ``torch.compile(model, fullgraph=True)`` keeps it as one
node. In eager mode the same forward and backward run through a plain
``torch.autograd.Function``: the custom-op dispatch alone costs ~100 us of CPU per step.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _native, _pool
from .backends import BACKENDS, resolve_backend
from .masks import RowGeneMask

try:  # Triton is optional: the other backends work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

ALPHA = math.log(1e5 + 1)
BETA = 4 * math.e

_OP = "poisson"
REDUCTIONS = ("mean", "sum", "none")
_RTANH, _LOG, _LINEAR = 0, 1, 2  # loss modes of the kernels (csrc/poisson/poisson_math.h)
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_ALPHA_LIMIT = 80.0  # |alpha| bound that keeps exp(phi) finite in fp32 without clamping


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _tanh_sech2(u):
        """(tanh(u), sech^2(u)) for u > 0 as in poisson_math.h: m = expm1(2u), r = 1/(m + 2)."""
        uc = tl.where(u < 0.0, 0.0, u)  # NaN compares false and passes through
        uc = tl.where(uc > 40.0, 40.0, uc)
        v = 2.0 * uc
        series = v * (1.0 + v * (0.5 + v * (1.0 / 6.0 + v * (1.0 / 24.0 + v * (1.0 / 120.0 + v / 720.0)))))
        m = tl.where(v < 0.25, series, tl.exp(v) - 1.0)  # expm1 without cancellation
        r = 1.0 / (m + 2.0)
        return m * r, 4.0 * r * (1.0 - r)

    @triton.jit
    def _stirling(x):
        s = x * tl.log(x) - x + 0.5 * tl.log(6.283185307179586 * x)
        return tl.where(x <= 1.0, 0.0, s)

    @triton.jit
    def _round_to_bf16(v):
        """fp32 -> bf16 rounding to nearest even by bit arithmetic (the interpreter's cast
        truncates); NaN stays NaN."""
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(v != v, (bits >> 16) | 0x40, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

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
                    tl.store(grad_ptr + row + cols, _round_to_bf16(dz), mask=inb)
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
                tl.store(grad_ptr + offs, _round_to_bf16(v), mask=m)
            else:
                tl.store(grad_ptr + offs, v.to(grad_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# Launchers: one contract for every backend
# ---------------------------------------------------------------------------------------------
# Each takes contiguous z, x [B, G] of a dtype pair the kernels support, the mask description
# (mask bytes [rows, G] or [G] as uint8, its row stride, optional int64 dataset ids), the row
# weights (``row_scale`` [B] fp64 or None, else the constant ``scale``) and returns
# ``(loss, grad)``: loss is a 0-d tensor (sum over rows of weight * kept sum) or, when
# ``elementwise``, the [B, G] per-element losses; grad is weight * dl/dz in z's dtype or None.

def _compute_dtype(z: torch.Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _supported_target_dtype(z: torch.Tensor, x: torch.Tensor, mode: int) -> torch.dtype:
    """Target dtype the kernels take for these logits (other targets are converted to it)."""
    if z.dtype == torch.float64:
        return torch.float64
    if mode == _RTANH:
        return x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
    return z.dtype


def _row_weights(B: int, mask, mask_stride: int, ids, reduction: str, G: int):
    """``(row_scale [B] fp64 | None, scale)``: each row's weight for the loss and gradient."""
    if reduction != "mean":
        return None, 1.0
    if mask is None:
        return None, 1.0 / (B * G)
    if ids is not None:  # one count per dataset: reads the [D, G] table once
        counts = mask.sum(1, dtype=torch.int64)[ids.clamp(0, mask.shape[0] - 1)]
    elif mask_stride == 0:
        counts = mask.sum(dtype=torch.int64).expand(B)
    else:
        counts = mask.sum(1, dtype=torch.int64)
    weight = torch.where(counts > 0, 1.0 / (counts.to(torch.float64) * B), 0.0)
    return weight.contiguous(), 1.0


def _interpreted(device: torch.device) -> bool:
    return device.type != "cuda"


def _triton_config(B: int, G: int, device: torch.device) -> tuple[int, int, int]:
    """(TILE, BLOCK, num_warps). On a GPU 4096-column tiles in 2048-wide steps, 8 elements
    per thread in flight (enough programs to fill the SMs from B = 64 on). Under the interpreter the cost is per step, not
    per element, so one program takes a whole row in steps of up to 16384 columns."""
    if _interpreted(device):
        block = min(triton.next_power_of_2(G), 16384)
        return block * triton.cdiv(G, block), block, 4
    return 4096, 2048, 8


def _launch_triton(z, x, mode, full, alpha, beta, eps, mask, mask_stride, ids, row_scale, scale,
                   elementwise, need_grad):
    B, G = z.shape
    cdt = _compute_dtype(z)
    tile, block, warps = _triton_config(B, G, z.device)
    n_tiles = triton.cdiv(G, tile)
    partials = torch.empty(B * n_tiles, dtype=torch.float64, device=z.device)
    grad = torch.empty_like(z) if need_grad else None
    elem = torch.empty((B, G), dtype=cdt, device=z.device) if elementwise else None
    kind = 0 if mask is None else (2 if ids is not None else 1)
    if row_scale is None:
        row_scale = torch.full((B,), scale, dtype=torch.float64, device=z.device)
    dummy = partials  # any tensor: the kernel never touches pointers its flags switch off
    with torch.cuda.device(z.device) if z.is_cuda else _nullcontext():
        _poisson_fwd_kernel[(B * n_tiles,)](
            z, x, dummy if mask is None else mask, dummy if ids is None else ids,
            row_scale, dummy if grad is None else grad, dummy if elem is None else elem, partials,
            G, n_tiles, mask_stride, 0 if mask is None or mask.dim() == 1 else mask.shape[0],
            alpha, 1.0 / beta, alpha / beta, eps, MODE=mode, FULL=full, MASK_KIND=kind,
            WRITE_GRAD=need_grad, WRITE_ELEM=elementwise,
            GRAD_BF16=z.dtype == torch.bfloat16, F64=cdt == torch.float64, TILE=tile,
            BLOCK=block, num_warps=warps)
    loss = elem if elementwise else partials.sum().to(cdt)
    return loss, grad


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_P, _I64, _D, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
_FWD_ARGS = [_P, _I, _P, _I, _I64, _I64, _I, _I, _D, _D, _D, _P, _I64, _P, _I64, _P, _D, _P, _P, _P]


@functools.lru_cache(maxsize=None)
def _cpu_fn():
    lib, _ = _native.cpu_library(_OP)
    return _native.bind(lib, "txfm_poisson_fwd", _FWD_ARGS)


@functools.lru_cache(maxsize=None)
def _cuda_fns():
    lib, _ = _native.cuda_library(_OP)
    fwd = _native.bind(lib, "txfm_poisson_fwd_cuda", _FWD_ARGS + [_P, _P])
    scale = _native.bind(lib, "txfm_poisson_scale_cuda", [_P, _I, _I64, _P, _P])
    tile_cols = lib.txfm_poisson_cuda_tile_cols
    tile_cols.restype = ctypes.c_int64
    return lib, fwd, scale, int(tile_cols())


def _native_args(z, x, mode, full, alpha, beta, eps, mask, mask_stride, ids, row_scale, scale,
                 grad, elem, loss_out):
    B, G = z.shape
    n_mask_rows = 0 if mask is None or mask.dim() == 1 else mask.shape[0]
    return (_native.ptr(z), _DTYPE_CODE[z.dtype], _native.ptr(x), _DTYPE_CODE[x.dtype], B, G, mode,
            int(full), alpha, beta, eps, _native.ptr(mask), mask_stride, _native.ptr(ids),
            n_mask_rows, _native.ptr(row_scale), scale, _native.ptr(grad), _native.ptr(elem),
            _native.ptr(loss_out))


def _launch_cpu(z, x, mode, full, alpha, beta, eps, mask, mask_stride, ids, row_scale, scale,
                elementwise, need_grad):
    B, G = z.shape
    cdt = _compute_dtype(z)
    grad = _pool.cpu_empty((B, G), z.dtype) if need_grad else None
    elem = torch.empty((B, G), dtype=cdt) if elementwise else None
    loss_out = torch.empty((), dtype=cdt)
    status = _cpu_fn()(*_native_args(z, x, mode, full, alpha, beta, eps, mask, mask_stride, ids,
                                     row_scale, scale, grad, elem, loss_out))
    if status == 2:
        raise ValueError(f"gene_mask: dataset_ids must lie in [0, {mask.shape[0]}) (rows of the "
                         f"[D, G] mask), got values outside it")
    _native.check_cpu(status, _OP)
    return (elem if elementwise else loss_out), grad


def _launch_cuda(z, x, mode, full, alpha, beta, eps, mask, mask_stride, ids, row_scale, scale,
                 elementwise, need_grad):
    B, G = z.shape
    cdt = _compute_dtype(z)
    lib, fwd, _, tile_cols = _cuda_fns()
    grad = torch.empty_like(z) if need_grad else None
    elem = torch.empty((B, G), dtype=cdt, device=z.device) if elementwise else None
    loss_out = torch.empty((), dtype=cdt, device=z.device)
    partials = torch.empty(B * -(-G // tile_cols), dtype=torch.float64, device=z.device)
    with torch.cuda.device(z.device):
        code = fwd(*_native_args(z, x, mode, full, alpha, beta, eps, mask, mask_stride, ids,
                                 row_scale, scale, grad, elem, loss_out),
                   _native.ptr(partials), _native.cuda_stream(z.device))
    _native.check_cuda(code, _OP, lib)
    return (elem if elementwise else loss_out), grad


def _launch_torch(z, x, mode, full, alpha, beta, eps, mask, mask_stride, ids, row_scale, scale,
                  elementwise, need_grad):
    """Same contract in eager PyTorch (the fallback of ``backend="auto"`` without kernels)."""
    cdt, grad_dtype = _compute_dtype(z), z.dtype
    z, x = z.to(cdt), x.to(cdt)
    if mode == _RTANH:
        u = z / beta
        phi = alpha * torch.relu(torch.tanh(u))
        ephi, y = torch.exp(phi), torch.exp(x)
        loss = ephi - phi * y
        sech2 = torch.cosh(u).square().reciprocal()  # -> 0, not NaN, when cosh overflows
        dz = torch.where(z <= 0, 0.0, (alpha / beta) * sech2 * (ephi - y))
    elif mode == _LOG:
        ez = torch.exp(z)
        loss, dz = ez - x * z, ez - x
    else:
        ze = z + eps
        loss, dz = z - x * torch.log(ze), 1.0 - x / ze
    if full:
        loss = loss + _stirling_torch(x)
    keep = _dense_keep(mask, ids)
    if keep is not None:
        loss, dz = torch.where(keep, loss, 0.0), torch.where(keep, dz, 0.0)
    weight = (row_scale.to(cdt)[:, None] if row_scale is not None else scale)
    grad = (dz * weight).to(grad_dtype) if need_grad else None
    out = loss if elementwise else (loss.sum(1, keepdim=True) * weight).sum()
    return out, grad


def _stirling_torch(x):
    return (x * torch.log(x) - x + 0.5 * torch.log(2 * math.pi * x)).masked_fill(x <= 1, 0)


def _dense_keep(mask, ids):
    """The [B, G] (or broadcastable [G]) keep mask as bool; only for the eager paths."""
    if mask is None:
        return None
    keep = mask.bool()
    return keep[ids] if ids is not None else keep


_LAUNCHERS = {"triton": _launch_triton, "cuda": _launch_cuda, "cpu": _launch_cpu,
              "torch": _launch_torch}


def _scale_grad_in_place(grad: torch.Tensor, grad_loss: torch.Tensor, backend: str) -> torch.Tensor:
    """``grad *= grad_loss`` on our own saved buffer, skipped when grad_loss == 1."""
    if grad.device.type == "cpu":
        # A CPU scalar read costs nothing (no device to sync); skipping keeps the common
        # backward free and reentrant (gradcheck calls it twice).
        if grad_loss.item() != 1.0:
            grad.mul_(grad_loss)
        return grad
    if grad.dtype == torch.float64 or backend not in ("cuda", "triton"):
        return grad.mul_(grad_loss)
    s = grad_loss.to(torch.float32).reshape(1)
    with torch.cuda.device(grad.device):
        if backend == "cuda":
            lib, _, scale_fn, _ = _cuda_fns()
            _native.check_cuda(scale_fn(_native.ptr(grad), _DTYPE_CODE[grad.dtype], grad.numel(),
                                        _native.ptr(s), _native.cuda_stream(grad.device)), _OP, lib)
        else:
            block = 4096
            _scale_kernel[(triton.cdiv(grad.numel(), block),)](
                grad, s, grad.numel(), GRAD_BF16=grad.dtype == torch.bfloat16, BLOCK=block)
    torch.autograd.graph.increment_version(grad)  # PyTorch cannot see the kernel's write
    return grad


# ---------------------------------------------------------------------------------------------
# torch.library custom op (+ fake + autograd)
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _resolve(backend: str, device_type: str, interpret_env, disable_env) -> str:
    """resolve_backend, memoised per call site state (it probes libraries: ~tens of us)."""
    return resolve_backend(backend, torch.device(device_type), _OP)


def _forward(logits, target, mask, dataset_ids, mode, full, alpha, beta, eps, reduction,
             need_grad, backend):
    """Fused forward. logits/target [B, G]; mask None, [G], [B, G], or [D, G] with dataset_ids
    [B]. Returns (loss: 0-d, or [B, G] for "none"; fp32, fp64 for fp64 logits,
    grad: weight * dl/dz in the logits' dtype, or an empty tensor when need_grad is False)."""
    name = _resolve(backend, logits.device.type, os.environ.get("TRITON_INTERPRET"),
                    os.environ.get("TXFM_DISABLE_NATIVE"))
    z = logits.contiguous()
    x = target.to(_supported_target_dtype(z, target, mode)).contiguous()
    B, G = z.shape
    mask_u8, stride, ids = None, 0, None
    if mask is not None:
        mask_u8 = mask.contiguous().view(torch.uint8)
        stride = 0 if mask.dim() == 1 else G
        if dataset_ids is not None:
            ids = dataset_ids.to(torch.int64).contiguous()
            if ids.device.type == "cpu" and ids.numel() and (
                    int(ids.min()) < 0 or int(ids.max()) >= mask.shape[0]):
                raise ValueError(f"gene_mask: dataset_ids must lie in [0, {mask.shape[0]}) "
                                 f"(rows of the [D, G] mask), got values in "
                                 f"[{int(ids.min())}, {int(ids.max())}]")
    row_scale, scale = _row_weights(B, mask_u8, stride, ids, reduction, G)
    loss, grad = _LAUNCHERS[name](z, x, mode, full, alpha, beta, eps, mask_u8, stride, ids,
                                  row_scale, scale, reduction == "none", need_grad)
    return loss, (grad if grad is not None else z.new_empty(0))


@torch.library.custom_op("txfm::poisson_nll", mutates_args=())
def _poisson_nll_op(logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor],
                    dataset_ids: Optional[torch.Tensor], mode: int, full: bool, alpha: float,
                    beta: float, eps: float, reduction: str, need_grad: bool,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused forward as one graph node for torch.compile / export (see _forward)."""
    return _forward(logits, target, mask, dataset_ids, mode, full, alpha, beta, eps, reduction,
                    need_grad, backend)


@_poisson_nll_op.register_fake
def _(logits, target, mask, dataset_ids, mode, full, alpha, beta, eps, reduction, need_grad,
      backend):
    cdt = _compute_dtype(logits)
    loss = (logits.new_empty(logits.shape, dtype=cdt) if reduction == "none"
            else logits.new_empty((), dtype=cdt))
    grad = logits.new_empty(logits.shape) if need_grad else logits.new_empty(0)
    return loss, grad


def _traced(t: torch.Tensor) -> bool:
    """Inside torch.compile / AOT tracing: tensors are fake or functional subclasses."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


def _setup_context(ctx, inputs, output):
    ctx.reduction = inputs[9]
    ctx.backend = inputs[11]
    ctx.save_for_backward(output[1])
    # The second output (dlogits) is never differentiated: without this autograd would fill a
    # [B, G] zero tensor as its incoming gradient on every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_of_grad_output):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 and grad_loss is not None:
        raise RuntimeError("poisson_nll: the forward ran without a gradient (logits did not "
                           "require grad under grad mode), so there is nothing to backpropagate")
    if grad_loss is None:
        return (None,) * 12
    if torch.is_grad_enabled() and not _traced(grad_loss):
        raise RuntimeError("poisson_nll: double backward (create_graph=True) is not supported "
                           "by the fused backends (their backward only rescales a gradient "
                           "computed in the forward); use backend='torch' for higher-order "
                           "gradients")
    if ctx.reduction == "none":
        dz = (grad * grad_loss).to(grad.dtype)
    elif _traced(grad_loss):
        dz = grad * grad_loss.to(grad.dtype)
    else:
        dz = _scale_grad_in_place(grad, grad_loss, ctx.backend)
    return (dz,) + (None,) * 11


_poisson_nll_op.register_autograd(_backward, setup_context=_setup_context)


class _PoissonNLLFunction(torch.autograd.Function):
    """Eager path: the same forward and backward as the custom op without its dispatch layers,
    which cost ~100 us of CPU per training step (as much as the GPU kernel at B = 256)."""

    @staticmethod
    def forward(ctx, *inputs):
        loss, grad = _forward(*inputs)
        _setup_context(ctx, inputs, (loss, grad))
        ctx.mark_non_differentiable(grad)
        return loss, grad

    @staticmethod
    def backward(ctx, grad_loss, grad_of_grad_output):
        return _backward(ctx, grad_loss, grad_of_grad_output)


def _fused(*inputs) -> torch.Tensor:
    """Loss of the fused op: the custom op under torch.compile, the Function in eager mode."""
    if torch.compiler.is_compiling():
        return _poisson_nll_op(*inputs)[0]
    return _PoissonNLLFunction.apply(*inputs)[0]


# ---------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------

def _check_common(reduction: str, backend: str, op: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction={reduction!r} is not one of {REDUCTIONS}")
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")


def _check_float(t, name: str, op: str, allowed: tuple) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} must be a floating tensor ({names}), got {t.dtype}; "
                        f"convert it with .float()")


def _rows(logits: torch.Tensor, target: torch.Tensor, op: str):
    """Validate logits/target and view them as [B, G]; returns (z, x, was_1d)."""
    _check_float(logits, "logits", op, (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    _check_float(target, "target", op, (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    if logits.shape != target.shape:
        raise ValueError(f"{op}: logits and target must have the same shape, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    if logits.dim() not in (1, 2):
        raise ValueError(f"{op}: logits must be [B, G] (or [G] for one row), got "
                         f"{logits.dim()}-D shape {tuple(logits.shape)}; reshape to [-1, G]")
    if logits.numel() == 0:
        raise ValueError(f"{op}: logits must have B >= 1 rows and G >= 1 genes, got shape "
                         f"{tuple(logits.shape)}")
    if logits.device != target.device:
        raise ValueError(f"{op}: logits is on {logits.device} but target is on {target.device}; "
                         f"move them to the same device")
    if target.requires_grad:
        raise ValueError(f"{op}: target must not require grad (the loss is not differentiated "
                         f"with respect to it); pass target.detach()")
    was_1d = logits.dim() == 1
    return (logits[None], target[None], True) if was_1d else (logits, target, False)


def _check_gene_mask(gene_mask, B: int, G: int, device: torch.device, op: str):
    """-> (mask None | bool [G] | [B, G] | [D, G], dataset_ids None | int [B])."""
    if gene_mask is None:
        return None, None
    if isinstance(gene_mask, (RowGeneMask, tuple)):  # or a plain (mask, dataset_ids) pair
        if len(gene_mask) != 2:
            raise TypeError(f"{op}: gene_mask as a tuple must be RowGeneMask(mask [D, G], "
                            f"dataset_ids [B]), got {len(gene_mask)} items")
        mask, ids = gene_mask
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2 \
                or mask.shape[1] != G or mask.shape[0] < 1:
            raise ValueError(f"{op}: gene_mask.mask must be a bool [D, G={G}] tensor with D >= 1, "
                             f"got {getattr(mask, 'dtype', type(mask))} "
                             f"{tuple(getattr(mask, 'shape', ()))}")
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64) \
                or ids.shape != (B,):
            raise ValueError(f"{op}: gene_mask.dataset_ids must be an int32/int64 [B={B}] tensor, "
                             f"got {getattr(ids, 'dtype', type(ids))} "
                             f"{tuple(getattr(ids, 'shape', ()))}")
        for name, t in (("mask", mask), ("dataset_ids", ids)):
            if t.device != device:
                raise ValueError(f"{op}: gene_mask.{name} is on {t.device} but logits is on "
                                 f"{device}; move it to the same device")
        return mask, ids
    if not isinstance(gene_mask, torch.Tensor):
        raise TypeError(f"{op}: gene_mask must be None, a bool tensor or a RowGeneMask, got "
                        f"{type(gene_mask).__name__}")
    if gene_mask.dtype != torch.bool:
        raise TypeError(f"{op}: gene_mask must be a bool tensor (True = keep the gene), got "
                        f"{gene_mask.dtype}; use mask.bool() or mask != 0")
    if tuple(gene_mask.shape) not in ((G,), (B, G)):
        raise ValueError(f"{op}: gene_mask must have shape [G]=({G},) or [B, G]=({B}, {G}), got "
                         f"{tuple(gene_mask.shape)}")
    if gene_mask.device != device:
        raise ValueError(f"{op}: gene_mask is on {gene_mask.device} but logits is on {device}; "
                         f"move it to the same device")
    return gene_mask, None


def _check_alpha_beta(alpha: float, beta: float, op: str) -> tuple[float, float]:
    alpha, beta = float(alpha), float(beta)
    if not (math.isfinite(alpha) and abs(alpha) <= _ALPHA_LIMIT):
        raise ValueError(f"{op}: alpha must be finite with |alpha| <= {_ALPHA_LIMIT:g} (exp(alpha) "
                         f"must stay finite in fp32), got {alpha}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"{op}: beta must be a finite positive number, got {beta}")
    return alpha, beta


def rectified_tanh(z: torch.Tensor, alpha: float = ALPHA, beta: float = BETA) -> torch.Tensor:
    """``alpha * relu(tanh(z / beta))``: the decoder's prediction ``x_hat`` in ``[0, alpha)``.

    Any shape and float dtype (output in ``z``'s dtype); differentiable (plain PyTorch ops,
    which torch.compile fuses into one kernel).
    """
    _check_float(z, "z", "rectified_tanh", (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    return alpha * torch.relu(torch.tanh(z / beta))


def _rtanh_loss_torch(z, x, mask, ids, alpha, beta, reduction):
    """Eager-autograd reference of :func:`rectified_tanh_poisson_nll` (fp32/fp64 arithmetic)."""
    cdt = _compute_dtype(z)
    z, x = z.to(cdt), x.to(cdt)
    keep = None if mask is None else (mask[ids.long()] if ids is not None else mask)
    if keep is not None:  # left-out genes never see their (possibly NaN) logits
        z = torch.where(keep, z, 0.0)
    phi = alpha * torch.relu(torch.tanh(z / beta))
    loss = torch.exp(phi) - phi * torch.exp(x)
    if keep is not None:
        loss = torch.where(keep, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if keep is None:
        return loss.mean(1).mean()
    counts = keep.expand_as(loss).sum(1)
    per_row = torch.where(counts > 0, loss.sum(1) / counts.clamp(min=1), 0.0)
    return per_row.mean()


def rectified_tanh_poisson_nll(logits: torch.Tensor, target: torch.Tensor, gene_mask=None, *,
                               alpha: float = ALPHA, beta: float = BETA, reduction: str = "mean",
                               backend: str = "auto") -> torch.Tensor:
    """Poisson NLL of ``phi(logits)`` against ``exp(target)``, fused (see the module docstring).

    Args:
        logits: ``[B, G]`` (or ``[G]``) fp32 / bf16 / fp16 decoder logits ``z``.
        target: same shape, fp32 / bf16, log1p-normalised expression ``x`` (the loss uses
            ``exp(x)``); must not require grad.
        gene_mask: None, bool ``[G]`` or ``[B, G]`` (True = keep), or
            :class:`~txfm_kernels.RowGeneMask` ``(mask [D, G], dataset_ids [B])``.
        alpha, beta: rectified-tanh constants (``|alpha| <= 80``, ``beta > 0``).
        reduction: ``"mean"`` (mean over rows of per-row means over kept genes; rows keeping
            no gene contribute 0), ``"sum"`` or ``"none"`` (``[B, G]``, 0 where left out).
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"`` (eager
            autograd reference; the only one with double backward).

    Returns:
        fp32 loss (0-d, or ``[B, G]`` / ``[G]`` for ``"none"``; fp64 for fp64 logits); its
        gradient with respect to ``logits`` comes back in the logits' dtype.

    Example::

        loss = rectified_tanh_poisson_nll(decoder(e), x, RowGeneMask(observable, dataset_ids))
        loss.backward()
    """
    op = "rectified_tanh_poisson_nll"
    _check_common(reduction, backend, op)
    alpha, beta = _check_alpha_beta(alpha, beta, op)
    z, x, was_1d = _rows(logits, target, op)
    mask, ids = _check_gene_mask(gene_mask, z.shape[0], z.shape[1], z.device, op)
    if backend == "torch":
        loss = _rtanh_loss_torch(z, x, mask, ids, alpha, beta, reduction)
    else:
        need_grad = z.requires_grad and torch.is_grad_enabled()
        loss = _fused(z, x, mask, ids, _RTANH, False, alpha, beta, 0.0, reduction, need_grad,
                      backend)
    return loss[0] if was_1d and reduction == "none" else loss


def _native_dropin(input, target) -> bool:
    """Whether poisson_nll_loss can use the fused op (else torch's own implementation)."""
    return (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)
            and type(input) is torch.Tensor and type(target) is torch.Tensor
            and input.dtype in _DTYPE_CODE and target.dtype == input.dtype
            and input.shape == target.shape and input.numel() > 0
            and input.device == target.device and not target.requires_grad)


def poisson_nll_loss(input: torch.Tensor, target: torch.Tensor, log_input: bool = True,
                     full: bool = False, eps: float = 1e-8, reduction: str = "mean",
                     backend: str = "auto", *, size_average=None, reduce=None) -> torch.Tensor:
    """Drop-in for :func:`torch.nn.functional.poisson_nll_loss` on the fused kernels.

    ``log_input=True``: ``exp(input) - target * input``; ``False``:
    ``input - target * log(input + eps)``; ``full=True`` adds Stirling's term
    ``target*log(target) - target + 0.5*log(2*pi*target)`` where ``target > 1``. Reductions as
    torch (``"mean"`` over all elements). Same-shape, same-dtype (fp32 / bf16 / fp16 / fp64)
    tensors of any shape run fused, in fp32 arithmetic (bf16/fp16 results are therefore at
    least as accurate as torch's); anything else (broadcasting, mixed dtypes, a target that
    requires grad, empty tensors, tensor subclasses) or ``backend="torch"`` calls torch's own
    implementation. ``size_average`` / ``reduce`` are torch's deprecated aliases.
    """
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce)
    op = "poisson_nll_loss"
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    _check_common(reduction, backend, op)
    if backend == "torch" or not _native_dropin(input, target):
        return F.poisson_nll_loss(input, target, log_input=log_input, full=full, eps=eps,
                                  reduction=reduction)
    z = input.reshape(1, -1)
    need_grad = z.requires_grad and torch.is_grad_enabled()
    loss = _fused(z, target.reshape(1, -1), None, None, _LOG if log_input else _LINEAR,
                  bool(full), 0.0, 1.0, float(eps), reduction, need_grad, backend)
    loss = loss.to(input.dtype)
    return loss.reshape(input.shape) if reduction == "none" else loss


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

class RectifiedTanh(nn.Module):
    """``alpha * relu(tanh(z / beta))`` (:func:`rectified_tanh`), any shape."""

    def __init__(self, alpha: float = ALPHA, beta: float = BETA):
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return rectified_tanh(z, self.alpha, self.beta)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.6g}, beta={self.beta:.6g}"


class RectifiedTanhPoissonNLLLoss(nn.Module):
    """:func:`rectified_tanh_poisson_nll` as a module: ``forward(logits [B, G], target [B, G],
    gene_mask=None)``."""

    def __init__(self, alpha: float = ALPHA, beta: float = BETA, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        _check_common(reduction, backend, type(self).__name__)
        self.alpha, self.beta = _check_alpha_beta(alpha, beta, type(self).__name__)
        self.reduction, self.backend = reduction, backend

    def forward(self, logits: torch.Tensor, target: torch.Tensor, gene_mask=None) -> torch.Tensor:
        return rectified_tanh_poisson_nll(logits, target, gene_mask, alpha=self.alpha,
                                          beta=self.beta, reduction=self.reduction,
                                          backend=self.backend)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha:.6g}, beta={self.beta:.6g}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")


class PoissonNLLLoss(nn.PoissonNLLLoss):
    """Drop-in for :class:`torch.nn.PoissonNLLLoss` (same arguments, plus ``backend``) running
    :func:`poisson_nll_loss`."""

    def __init__(self, log_input: bool = True, full: bool = False, size_average=None,
                 eps: float = 1e-8, reduce=None, reduction: str = "mean", backend: str = "auto"):
        super().__init__(log_input, full, size_average, eps, reduce, reduction)
        _check_common(self.reduction, backend, type(self).__name__)
        self.backend = backend

    def forward(self, log_input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return poisson_nll_loss(log_input, target, log_input=self.log_input, full=self.full,
                                eps=self.eps, reduction=self.reduction, backend=self.backend)
