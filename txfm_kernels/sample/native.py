"""C-ABI launchers of the masked sampler (``backend="cpu"``: ``csrc/sample/sample_cpu.cpp``,
``backend="cuda"``: ``csrc/sample/sample_cuda.cu``), called through ctypes.

Both take one :class:`SampleArgs` (``struct txfm_sample_args`` in
``csrc/sample/sample_math.h``). The cpu kernel checks the input while it reads it and returns
a status code (``>= 10``) and the row at fault; the CUDA kernel trusts its input (it clamps
row bounds, dataset ids and gene ids, so it never reads or writes out of bounds), and the
input is checked by torch ops beforehand when asked.
"""
from __future__ import annotations

import ctypes

import torch

from .._common import (DTYPE_CODE, c_struct, check_cpu_status, check_cuda_status, cuda_stream,
                       native_function, ptr)
from .reference import check_input, error_message

_OP = "masked_sample"
_LIB = "sample"

SampleArgs = c_struct("txfm_sample_args", """
  const int64_t* indptr;     // [B + 1] CSR row pointers
  const int32_t* indices;    // [nnz] gene ids, strictly increasing within a row
  const void* counts;        // [nnz] of count_type
  int32_t count_type;        // txfm_dtype: TXFM_F32, TXFM_I32, TXFM_I16, TXFM_U16 or TXFM_U8
  int32_t ds_is_64;          // dataset_ids are int64 (else int32)
  int64_t B, nnz, G;
  const int64_t* obs_indptr; // [n_datasets + 1], or nullptr: every gene observable
  const int32_t* obs_genes;  // each dataset's observable genes, sorted
  int64_t n_datasets;
  const void* dataset_ids;   // [B], or nullptr: dataset 0
  int64_t K;                 // genes drawn per row
  float target_sum;          // L of log1p(L * c / sum(c))
  uint32_t k0, k1;           // the call's key (derived from (seed, offset) on the host)
  int32_t* gene_ids;         // [B, K] outputs
  float* values;             // [B, K]
  uint8_t* pad;              // [B, K]
  float* target;             // [B, G], or nullptr: no target (CUDA: zeroed by the caller)
  float* libsize;            // [B] sum of each row's counts
""")


def _args(c, ids, values, pad, target, libsize) -> SampleArgs:
    ds = c.dataset_ids
    return SampleArgs(ptr(c.indptr), ptr(c.indices), ptr(c.counts), DTYPE_CODE[c.counts.dtype],
                      int(ds is not None and ds.dtype == torch.int64), c.indptr.numel() - 1,
                      c.indices.numel(), c.n_genes, ptr(c.obs_indptr), ptr(c.obs_genes),
                      1 if c.obs_indptr is None else c.obs_indptr.numel() - 1, ptr(ds), c.k,
                      c.target_sum, c.k0, c.k1, ptr(ids), ptr(values), ptr(pad), ptr(target),
                      ptr(libsize))


def fill(c, ids, values, pad, target, libsize, validate: bool, backend: str) -> None:
    """The uniform draw of :class:`~txfm_kernels.sample.reference.Call` ``c`` into the outputs
    (``pad`` bool, ``target`` None or ``[B, G]``) with the ``backend`` ("cpu" or "cuda")
    library; ``validate`` checks the input (cpu: in the kernel's pass; cuda: torch ops first,
    one sync)."""
    args = _args(c, ids, values, pad.view(torch.uint8), target, libsize)
    if backend == "cpu":
        _, fn = native_function("cpu", _LIB, "txfm_sample_cpu", SampleArgs, ctypes.c_int,
                                ctypes.POINTER(ctypes.c_int64))
        bad = ctypes.c_int64(-1)
        status = fn(args, int(validate), ctypes.byref(bad))
        if status >= 10:
            raise ValueError(error_message(status, bad.value, c))
        check_cpu_status(status, _OP)
        return
    if validate:
        check_input(c)
    if target is not None:
        target.zero_()  # the kernel scatters only the non-zeros
    lib, fn = native_function("cuda", _LIB, "txfm_sample_cuda", SampleArgs, ctypes.c_void_p)
    check_cuda_status(fn(args, cuda_stream(c.indptr.device)), _OP, lib)
