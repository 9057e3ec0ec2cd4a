"""C-ABI launchers of the Poisson NLL op (``backend="cpu"``: ``csrc/poisson/poisson_cpu.cpp``,
``backend="cuda"``: ``csrc/poisson/poisson_cuda.cu``), called through ctypes.

Both libraries take one :class:`PoissonArgs` (``struct txfm_poisson_args`` in
``csrc/poisson/poisson_math.h``) and compute the same thing as the Triton launcher: the loss
(0-d sum over rows of weight * kept sum, or the per-element losses) and ``weight * dl/dz``.
"""
from __future__ import annotations

import ctypes

import torch

from .. import _pool
from .._common import (DTYPE_CODE, c_struct, check_cpu_status, check_cuda_status, cuda_stream,
                       native_function, ptr)

_OP = "poisson"
_P, _I64 = ctypes.c_void_p, ctypes.c_int64

PoissonArgs = c_struct("txfm_poisson_args", """
  const void* z;             // [B, G] logits
  const void* x;             // [B, G] target
  int32_t z_dtype, x_dtype;  // txfm_dtype codes (supported pairs: see pick() in the kernels)
  int64_t B, G;
  int32_t mode, full;        // Mode; full: add Stirling's term (LOG / LINEAR only)
  double alpha, beta, eps;
  const uint8_t* mask;       // nullptr, or rows of G bytes (0 = leave the gene out)
  int64_t mask_stride;       // bytes between mask rows (0: one [G] row for every sample)
  const int64_t* ids;        // nullptr (mask row = b), or [B] mask row of sample b
  int64_t n_mask_rows;       // rows of `mask` that ids may name
  const double* row_scale;   // nullptr, or [B] weight of each row's loss and gradient
  double scale;              // weight when row_scale is nullptr
  void* grad;                // nullptr, or [B, G] weight * dl/dz in GradStore<logits' type>
  void* loss_elem;           // nullptr, or [B, G] per-element loss in the compute type
  void* loss_out;            // the reduced loss: one float (a double for fp64 data)
""")


def _args(z, x, job, grad, elem, loss_out) -> PoissonArgs:
    B, G = z.shape
    return PoissonArgs(ptr(z), ptr(x), DTYPE_CODE[z.dtype], DTYPE_CODE[x.dtype], B, G, job.mode,
                       int(job.full), job.alpha, job.beta, job.eps, ptr(job.mask),
                       job.mask_stride, ptr(job.ids), job.n_mask_rows, ptr(job.row_scale),
                       job.scale, ptr(grad), ptr(elem), ptr(loss_out))


def forward(z: torch.Tensor, x: torch.Tensor, job, backend: str):
    """``(loss, grad)`` of ``job`` (a :class:`txfm_kernels.poisson.Launch`) on contiguous
    ``z, x [B, G]`` with the ``backend`` ("cpu" or "cuda") library; see ``triton.forward``."""
    B, G = z.shape
    elementwise = job.reduction == "none"
    loss_out = torch.empty((), dtype=job.cdt, device=z.device)
    elem = torch.empty((B, G), dtype=job.cdt, device=z.device) if elementwise else None
    if backend == "cpu":
        grad = _pool.cpu_empty((B, G), job.gdt) if job.need_grad else None  # see _pool
        _, fn = native_function("cpu", _OP, "txfm_poisson_fwd", PoissonArgs)
        # (dataset ids were checked by the caller; status 2 would be one outside [0, D))
        check_cpu_status(fn(_args(z, x, job, grad, elem, loss_out)), _OP)
    else:
        grad = torch.empty((B, G), dtype=job.gdt, device=z.device) if job.need_grad else None
        lib, tile_cols = native_function("cuda", _OP, "txfm_poisson_cuda_tile_cols", None,
                                         restype=ctypes.c_int64)
        partials = torch.empty(B * -(-G // tile_cols()), dtype=torch.float64, device=z.device)
        _, fn = native_function("cuda", _OP, "txfm_poisson_fwd_cuda", PoissonArgs, _P, _P)
        with torch.cuda.device(z.device):
            code = fn(_args(z, x, job, grad, elem, loss_out), ptr(partials),
                      cuda_stream(z.device))
        check_cuda_status(code, _OP, lib)
    return (elem if elementwise else loss_out), grad


def scale_grad(grad: torch.Tensor, scale: torch.Tensor, backend: str = "cuda") -> None:
    """``grad *= scale`` in place on the GPU (``scale``: 1-element fp32 on grad's device),
    skipped on the device when ``scale == 1`` (no sync)."""
    lib, fn = native_function("cuda", _OP, "txfm_poisson_scale_cuda", None, _P, ctypes.c_int,
                              _I64, _P, _P)
    with torch.cuda.device(grad.device):
        code = fn(ptr(grad), DTYPE_CODE[grad.dtype], grad.numel(), ptr(scale),
                  cuda_stream(grad.device))
    check_cuda_status(code, _OP, lib)
