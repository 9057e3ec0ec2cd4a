"""C-ABI launchers of the gene-token op (``backend="cpu"``: ``csrc/tokens/tokens_cpu.cpp``,
``backend="cuda"``: ``csrc/tokens/tokens_cuda.cu``), called through ctypes.

Every entry point takes one :class:`TokensArgs` (``struct txfm_tokens_args`` in
``csrc/tokens/tokens_math.h``) and reads the fields it needs. The CPU backward sorts token
positions by gene itself (a counting sort); the deterministic CUDA backward gets them sorted
by torch (``reference.sorted_segments``).
"""
from __future__ import annotations

import ctypes

import torch

from .. import _pool
from .._common import (DTYPE_CODE, c_struct, check_cpu_status, check_cuda_status, cuda_stream,
                       native_function, ptr)
from .reference import check_ids, grad_values, sorted_segments

_OP = "gene_tokens"
_LIB = "tokens"
_P = ctypes.c_void_p

TokensArgs = c_struct("txfm_tokens_args", """
  const void* codebook;    // [V, D1]                       forward
  const void* ids;         // [B, K] int32 or int64 (id_bytes 4 or 8)
  const void* values;      // [B, K]                        forward
  const void* cls;         // [D1 + 1] or nullptr            forward
  const uint8_t* pad;      // [B, K] or nullptr, 1 = padding
  void* out;               // [B, K + has_cls, D1 + 1]       forward: the tokens
  const void* grad;        // [B, K + has_cls, D1 + 1]       backward: dL/dtokens
  void* grad_codebook;     // [V, D1]                        backward (atomic CUDA: fp32 sums)
  void* grad_values;       // [B, K]                         CPU backward
  const int64_t* perm;     // [B * K] positions sorted by gene   sorted CUDA backward
  const int64_t* offsets;  // [V + 1] each gene's segment       sorted CUDA backward
  int64_t B, K, V, D1;
  int32_t id_bytes, has_cls;
  int32_t dtype;
""")


def _args(gene_ids, n_genes: int, d1: int, has_cls: int, dtype: torch.dtype, key_padding_mask,
          **pointers) -> TokensArgs:
    B, K = gene_ids.shape
    return TokensArgs(ids=ptr(gene_ids), pad=ptr(key_padding_mask), B=B, K=K, V=n_genes, D1=d1,
                      id_bytes=gene_ids.element_size(), has_cls=has_cls,
                      dtype=DTYPE_CODE[dtype], **{k: ptr(v) for k, v in pointers.items()})


def _check_cpu(status: int, gene_ids, key_padding_mask, n_genes: int) -> None:
    if status == 2:  # a non-padded id outside [0, V): name them
        check_ids(gene_ids, key_padding_mask, n_genes)
    check_cpu_status(status, _OP)


def forward(codebook, gene_ids, values, cls, key_padding_mask, backend: str) -> torch.Tensor:
    """tokens ``[B, K + (cls given), d]`` from contiguous inputs (see ``reference.forward``)."""
    B, K = gene_ids.shape
    V, D1 = codebook.shape
    c = int(cls is not None)
    if backend == "cpu":
        out = _pool.cpu_empty((B, K + c, D1 + 1), codebook.dtype)  # see _pool: page faults
    else:
        out = codebook.new_empty(B, K + c, D1 + 1)
    args = _args(gene_ids, V, D1, c, codebook.dtype, key_padding_mask, codebook=codebook,
                 values=values, cls=cls, out=out)
    if backend == "cpu":
        _, fn = native_function("cpu", _LIB, "txfm_tokens_forward", TokensArgs)
        _check_cpu(fn(args), gene_ids, key_padding_mask, V)
    else:
        lib, fn = native_function("cuda", _LIB, "txfm_tokens_forward_cuda", TokensArgs, _P)
        check_cuda_status(fn(args, cuda_stream(out.device)), _OP, lib)
    return out


def backward(grad, gene_ids, key_padding_mask, n_genes: int, has_cls: bool, deterministic: bool,
             backend: str):
    """``(grad_codebook [V, d-1], grad_values [B, K])`` from ``grad [B, K + has_cls, d]``."""
    B, K = gene_ids.shape
    D1 = grad.shape[-1] - 1
    c = int(has_cls)
    if backend == "cpu":  # deterministic by construction
        gc = _pool.cpu_empty((n_genes, D1), grad.dtype)
        gv = grad.new_empty(B, K)
        _, fn = native_function("cpu", _LIB, "txfm_tokens_backward", TokensArgs)
        args = _args(gene_ids, n_genes, D1, c, grad.dtype, key_padding_mask, grad=grad,
                     grad_codebook=gc, grad_values=gv)
        _check_cpu(fn(args), gene_ids, key_padding_mask, n_genes)
        return gc, gv
    stream = cuda_stream(grad.device)
    if deterministic:
        perm, offsets = sorted_segments(gene_ids, key_padding_mask, n_genes)
        gc = grad.new_empty(n_genes, D1)
        lib, fn = native_function("cuda", _LIB, "txfm_tokens_backward_sorted_cuda", TokensArgs, _P)
        args = _args(gene_ids, n_genes, D1, c, grad.dtype, key_padding_mask, grad=grad,
                     grad_codebook=gc, perm=perm, offsets=offsets)
        check_cuda_status(fn(args, stream), _OP, lib)
    else:
        acc = torch.zeros(n_genes, D1, device=grad.device, dtype=torch.float32)
        lib, fn = native_function("cuda", _LIB, "txfm_tokens_backward_atomic_cuda", TokensArgs, _P)
        args = _args(gene_ids, n_genes, D1, c, grad.dtype, key_padding_mask, grad=grad,
                     grad_codebook=acc)
        check_cuda_status(fn(args, stream), _OP, lib)
        gc = acc.to(grad.dtype)
    return gc, grad_values(grad, key_padding_mask, c)
