"""Encoder input tokens of TxFM: fused gene-embedding gather + value concat (+ CLS).

For ``codebook E [V, d-1]``, ``gene_ids g [B, K]``, ``values x [B, K]`` and an optional
``cls c [d]``, :func:`gene_tokens` returns ``tokens [B, T, d]`` with ``T = K + 1`` when a CLS
token is given (it sits at position 0) and ``T = K`` otherwise::

    tokens[b, cls + k] = [ E[g[b, k]] ; x[b, k] ]        (zeros where pad_mask[b, k])
    tokens[b, 0]       = c                                (when cls is given)

Backward (``G = dL/dtokens``; padded tokens receive and give no gradient)::

    dE[v]      = sum over non-padded (b, k) with g[b, k] == v of G[b, cls + k, :d-1]
    dx[b, k]   = G[b, cls + k, d-1]         (0 where padded)
    dc         = sum over b of G[b, 0, :]

Dtypes: the codebook (and cls) fp32 or bf16 (fp64 too on the cpu and torch backends, for
gradcheck); ``values`` any float dtype, cast to the codebook's dtype as torch would (round to
nearest even); ``gene_ids`` int32 or int64. The tokens and every gradient come out in the
dtype of the parameter they belong to; ``dE`` and ``dc`` are accumulated in fp32 (fp64 for
fp64). Under ``torch.autocast`` nothing changes: the op is not on autocast's lists, so the
tokens stay in the codebook's dtype (fp32 parameters give fp32 tokens); the model casts them
if it wants bf16 activations, or keeps a bf16 codebook.

Determinism: by default ``dE`` is bitwise reproducible from run to run. Token positions are
grouped by gene id (a stable counting sort on CPU, ``torch.sort(stable=True)`` on GPU) and each
gene's rows are summed in position order, the way PyTorch's embedding backward does, so no
atomics are involved. ``deterministic=False`` lets the triton and cuda backends scatter with
fp32 atomics instead (faster with few repeated ids; the last bits then vary between runs).

Memory traffic (elements of the codebook dtype, ``N = B*K``): forward reads ``N`` codebook
rows and writes ``B*T*d`` tokens; backward reads the ``B*T*d`` gradient and writes the dense
``V*(d-1)`` codebook gradient (the zero rows of genes no token shows are written by the
same kernel, not by a separate zero-fill). Besides the outputs, nothing ``[B, K, d]``-sized is
allocated; the sort needs ``O(N + V)`` integers.

Backends (``backend=``, see :mod:`txfm_kernels.backends`): ``cpu`` (C++/OpenMP, default on CPU
tensors), ``cuda`` (C-ABI CUDA library; default on GPU), ``triton``, ``torch`` (eager
reference, works everywhere) and ``auto``.

Bad gene ids: on CPU tensors every backend raises an ``IndexError`` naming the offending ids.
On GPU tensors the triton and cuda kernels never read outside the codebook: an out-of-range id
gives a zero token and no gradient, silently; pass ``check_ids=True`` to get the same
``IndexError`` as on CPU at the cost of one device synchronisation per call (the torch backend
on GPU raises a device-side assert, like ``nn.Embedding``). Ids at padded positions are never
read, so any placeholder (e.g. -1) may sit there.
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch
from torch import nn

from . import _native, _pool
from .backends import BACKENDS, resolve_backend

try:  # Triton is optional: the other backends work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

_OP = "gene_tokens"
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2}
_GPU_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_MAX_WIDTH = 2048  # widest codebook row (d - 1) of the CUDA backward (registers per lane)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

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
                                  HAS_CLS: tl.constexpr, BLOCK_G: tl.constexpr,
                                  BLOCK_D: tl.constexpr):
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
        tl.store(gc_ptr + genes[:, None] * D1 + cols[None, :],
                 acc.to(gc_ptr.dtype.element_ty), mask=g_ok[:, None] & col_ok[None, :])

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


def _interpreted(device: torch.device) -> bool:
    return device.type != "cuda"  # Triton on CPU tensors = the interpreter (tests)


def _tile(d: int, device: torch.device, rows: int = 32) -> tuple[int, int]:
    """(rows, features) per Triton tile: ``rows`` x 128 on a GPU; few, large tiles when
    interpreted (the interpreter's cost is per tile, not per element)."""
    if _interpreted(device):
        return 64, min(triton.next_power_of_2(d), 1024)
    return rows, 128


# ---------------------------------------------------------------------------------------------
# Launchers: each takes contiguous inputs already checked by gene_tokens()
# ---------------------------------------------------------------------------------------------
def _sizes(codebook, gene_ids, cls):
    B, K = gene_ids.shape
    V, D1 = codebook.shape
    return B, K, V, D1, int(cls is not None)


def _forward_triton(codebook, gene_ids, values, cls, pad_mask):
    B, K, V, D1, c = _sizes(codebook, gene_ids, cls)
    out = codebook.new_empty(B, K + c, D1 + 1)
    if out.numel() == 0:
        return out
    block_r, block_d = _tile(D1 + 1, codebook.device)
    grid = (triton.cdiv(B * (K + c), block_r), triton.cdiv(D1 + 1, block_d))
    pad = pad_mask.view(torch.uint8) if pad_mask is not None else gene_ids
    _tokens_fwd_kernel[grid](codebook, gene_ids, values, cls if c else codebook, pad, out,
                             B * (K + c), K + c, K, V, D1, D1 + 1, HAS_CLS=c,
                             HAS_PAD=pad_mask is not None, BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def _sorted_segments(gene_ids, pad_mask, V):
    """Token positions sorted (stably) by gene id, and each gene's segment ``[off[g], off[g+1])``.

    Padded tokens get the key V; they and out-of-range ids sort outside every segment. Keys
    are sorted as int32 (half the radix passes of int64).
    """
    keys = gene_ids.reshape(-1)
    if keys.dtype == torch.int64:
        keys = keys.clamp(-1, V).to(torch.int32)
    if pad_mask is not None:
        keys = keys.masked_fill(pad_mask.reshape(-1), V)
    sorted_keys, perm = torch.sort(keys, stable=True)
    bounds = torch.arange(V + 1, device=keys.device, dtype=keys.dtype)
    return perm, torch.searchsorted(sorted_keys, bounds)


def _backward_triton(grad, gene_ids, pad_mask, V, c, deterministic):
    B, K = gene_ids.shape
    D1 = grad.shape[-1] - 1
    if deterministic:
        # few genes per program: a program loops as long as its longest segment
        block_g, block_d = _tile(D1, grad.device, rows=8)
        perm, offsets = _sorted_segments(gene_ids, pad_mask, V)
        gc = grad.new_empty(V, D1)
        grid = (triton.cdiv(V, block_g), triton.cdiv(D1, block_d))
        _tokens_bwd_sorted_kernel[grid](grad, perm, offsets, gc, V, K + c, K, D1, D1 + 1,
                                        HAS_CLS=c, BLOCK_G=block_g, BLOCK_D=block_d)
    else:
        block_r, block_d = _tile(D1, grad.device)
        acc = torch.zeros(V, D1, device=grad.device, dtype=torch.float32)
        if B * K:
            pad = pad_mask.view(torch.uint8) if pad_mask is not None else gene_ids
            grid = (triton.cdiv(B * K, block_r), triton.cdiv(D1, block_d))
            _tokens_bwd_atomic_kernel[grid](grad, gene_ids, pad, acc, B * K, K + c, K, V, D1,
                                            D1 + 1, HAS_CLS=c, HAS_PAD=pad_mask is not None,
                                            BLOCK_R=block_r, BLOCK_D=block_d)
        gc = acc.to(grad.dtype)
    return gc, _grad_values(grad, pad_mask, c)


def _grad_values(grad, pad_mask, c):
    gv = grad[:, c:, -1]
    if pad_mask is not None:
        return gv.masked_fill(pad_mask, 0)
    return gv.clone(memory_format=torch.contiguous_format)  # never a view of grad


@functools.lru_cache(maxsize=None)
def _cpu_fns():
    lib, detail = _native.cpu_library("tokens")
    if lib is None:
        raise RuntimeError(f"{_OP}: backend='cpu' is not available: {detail}")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fwd = _native.bind(lib, "txfm_tokens_forward",
                       [p, p, i32, p, p, p, p, i64, i64, i64, i64, i32, i32])
    bwd = _native.bind(lib, "txfm_tokens_backward",
                       [p, p, i32, p, p, p, i64, i64, i64, i64, i32, i32])
    return fwd, bwd


def _forward_cpu(codebook, gene_ids, values, cls, pad_mask):
    B, K, V, D1, c = _sizes(codebook, gene_ids, cls)
    out = _pool.cpu_empty((B, K + c, D1 + 1), codebook.dtype)  # see _pool: page faults
    fwd, _ = _cpu_fns()
    status = fwd(_native.ptr(codebook), _native.ptr(gene_ids), gene_ids.element_size(),
                 _native.ptr(values), _native.ptr(cls), _native.ptr(pad_mask), _native.ptr(out),
                 B, K, V, D1, c, _DTYPE_CODE[codebook.dtype])
    if status == 2:
        _raise_bad_ids(gene_ids, pad_mask, V)
    _native.check_cpu(status, _OP)
    return out


def _backward_cpu(grad, gene_ids, pad_mask, V, c, deterministic):
    B, K = gene_ids.shape
    D1 = grad.shape[-1] - 1
    gc = _pool.cpu_empty((V, D1), grad.dtype)
    gv = grad.new_empty(B, K)
    _, bwd = _cpu_fns()
    status = bwd(_native.ptr(grad), _native.ptr(gene_ids), gene_ids.element_size(),
                 _native.ptr(pad_mask), _native.ptr(gc), _native.ptr(gv), B, K, V, D1, c,
                 _DTYPE_CODE[grad.dtype])
    if status == 2:
        _raise_bad_ids(gene_ids, pad_mask, V)
    _native.check_cpu(status, _OP)
    return gc, gv


@functools.lru_cache(maxsize=None)
def _cuda_fns():
    lib, detail = _native.cuda_library("tokens")
    if lib is None:
        raise RuntimeError(f"{_OP}: backend='cuda' is not available: {detail}")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fwd = _native.bind(lib, "txfm_tokens_forward_cuda",
                       [p, p, i32, p, p, p, p, i64, i64, i64, i64, i32, i32, p])
    sorted_ = _native.bind(lib, "txfm_tokens_backward_sorted_cuda",
                           [p, p, p, p, i64, i64, i64, i64, i32, i32, p])
    atomic = _native.bind(lib, "txfm_tokens_backward_atomic_cuda",
                          [p, p, i32, p, p, i64, i64, i64, i64, i32, i32, p])
    return lib, fwd, sorted_, atomic


def _forward_cuda(codebook, gene_ids, values, cls, pad_mask):
    B, K, V, D1, c = _sizes(codebook, gene_ids, cls)
    out = codebook.new_empty(B, K + c, D1 + 1)
    lib, fwd, _, _ = _cuda_fns()
    code = fwd(_native.ptr(codebook), _native.ptr(gene_ids), gene_ids.element_size(),
               _native.ptr(values), _native.ptr(cls), _native.ptr(pad_mask), _native.ptr(out),
               B, K, V, D1, c, _DTYPE_CODE[codebook.dtype], _native.cuda_stream(out.device))
    _native.check_cuda(code, _OP, lib)
    return out


def _backward_cuda(grad, gene_ids, pad_mask, V, c, deterministic):
    B, K = gene_ids.shape
    D1 = grad.shape[-1] - 1
    lib, _, sorted_, atomic = _cuda_fns()
    stream = _native.cuda_stream(grad.device)
    if deterministic:
        perm, offsets = _sorted_segments(gene_ids, pad_mask, V)
        gc = grad.new_empty(V, D1)
        code = sorted_(_native.ptr(grad), _native.ptr(perm), _native.ptr(offsets), _native.ptr(gc),
                       B, K, V, D1, c, _DTYPE_CODE[grad.dtype], stream)
    else:
        acc = torch.zeros(V, D1, device=grad.device, dtype=torch.float32)
        code = atomic(_native.ptr(grad), _native.ptr(gene_ids), gene_ids.element_size(),
                      _native.ptr(pad_mask), _native.ptr(acc), B, K, V, D1, c,
                      _DTYPE_CODE[grad.dtype], stream)
        gc = acc.to(grad.dtype)
    _native.check_cuda(code, _OP, lib)
    return gc, _grad_values(grad, pad_mask, c)


def _forward_torch(codebook, gene_ids, values, cls, pad_mask):
    """Eager reference: gather into a preallocated output (no concatenated copies)."""
    B, K, V, D1, c = _sizes(codebook, gene_ids, cls)
    out = codebook.new_empty(B, K + c, D1 + 1)
    ids = gene_ids if pad_mask is None else gene_ids.masked_fill(pad_mask, 0)
    tokens = out[:, c:]
    tokens[..., :D1] = nn.functional.embedding(ids, codebook)
    tokens[..., D1] = values
    if pad_mask is not None:
        tokens.masked_fill_(pad_mask[..., None], 0)
    if c:
        out[:, 0] = cls
    return out


def _backward_torch(grad, gene_ids, pad_mask, V, c, deterministic):
    """Eager reference: PyTorch's embedding backward (sort-based, deterministic on CPU and
    GPU), fed an fp32 (fp64) copy of the gradient rows so that it accumulates in fp32 (fp64)."""
    D1 = grad.shape[-1] - 1
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    rows = grad[:, c:, :D1].to(acc)
    ids = gene_ids
    if pad_mask is not None:
        rows = rows.masked_fill(pad_mask[..., None], 0)
        ids = gene_ids.masked_fill(pad_mask, 0)
    gc = torch.ops.aten.embedding_dense_backward(rows, ids, V, -1, False)
    return gc.to(grad.dtype), _grad_values(grad, pad_mask, c)


_FORWARD = {"triton": _forward_triton, "cuda": _forward_cuda, "cpu": _forward_cpu,
            "torch": _forward_torch}
_BACKWARD = {"triton": _backward_triton, "cuda": _backward_cuda, "cpu": _backward_cpu,
             "torch": _backward_torch}


# ---------------------------------------------------------------------------------------------
# Id checks and backend choice (run inside the custom op, so torch.compile never traces them)
# ---------------------------------------------------------------------------------------------
def _raise_bad_ids(gene_ids, pad_mask, V):
    bad = (gene_ids < 0) | (gene_ids >= V)
    if pad_mask is not None:
        bad &= ~pad_mask
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    offending = gene_ids[bad]
    raise IndexError(
        f"{_OP}: gene_ids must lie in [0, {V}) (the codebook has {V} rows), but {n_bad} "
        f"non-padded id(s) lie outside, ranging over [{int(offending.min())}, "
        f"{int(offending.max())}] (first: {offending[:5].tolist()}); fix the gene vocabulary "
        f"mapping, or mark those positions in pad_mask")


@functools.lru_cache(maxsize=None)
def _resolve(backend: str, device_type: str, env: tuple) -> str:
    return resolve_backend(backend, torch.device(device_type), "tokens")


def _backend_for(backend: str, device: torch.device, dtype: torch.dtype, width: int) -> str:
    """The backend that runs a codebook of ``dtype`` and ``width`` = d - 1 columns."""
    env = (os.environ.get("TXFM_DISABLE_NATIVE", ""), os.environ.get("TRITON_INTERPRET", ""))
    name = _resolve(backend, device.type, env)
    if name in ("triton", "cuda") and dtype not in _GPU_DTYPES:
        if backend == "auto":
            return "torch"
        raise TypeError(f"{_OP}: backend={name!r} supports fp32 and bf16 codebooks, got {dtype}; "
                        "use backend='cpu' or 'torch' for fp64")
    if name == "cuda" and width > _CUDA_MAX_WIDTH:
        if backend == "auto":  # next best on the GPU
            try:
                return _resolve("triton", device.type, env)
            except RuntimeError:
                return "torch"
        raise ValueError(f"{_OP}: backend='cuda' handles d <= {_CUDA_MAX_WIDTH + 1}, got "
                         f"d = {width + 1}; use backend='triton' or 'torch'")
    return name


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: forward, backward, fake (meta) implementations, autograd
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("txfm::gene_tokens", mutates_args=())
def _gene_tokens_op(codebook: torch.Tensor, gene_ids: torch.Tensor, values: torch.Tensor,
                    cls: torch.Tensor | None, pad_mask: torch.Tensor | None, backend: str,
                    deterministic: bool, check_ids: bool) -> torch.Tensor:
    """tokens [B, K + (cls given), d]; every tensor contiguous, values/cls in the codebook dtype."""
    name = _backend_for(backend, codebook.device, codebook.dtype, codebook.shape[1])
    if check_ids or (gene_ids.device.type == "cpu" and name != "cpu"):  # the C++ kernel checks
        _raise_bad_ids(gene_ids, pad_mask, codebook.shape[0])
    return _FORWARD[name](codebook.contiguous(), gene_ids.contiguous(), values.contiguous(),
                          None if cls is None else cls.contiguous(),
                          None if pad_mask is None else pad_mask.contiguous())


@_gene_tokens_op.register_fake
def _(codebook, gene_ids, values, cls, pad_mask, backend, deterministic, check_ids):
    B, K = gene_ids.shape
    return codebook.new_empty(B, K + int(cls is not None), codebook.shape[1] + 1)


@torch.library.custom_op("txfm::gene_tokens_backward", mutates_args=())
def _gene_tokens_backward_op(grad: torch.Tensor, gene_ids: torch.Tensor,
                             pad_mask: torch.Tensor | None, n_genes: int, has_cls: bool,
                             backend: str, deterministic: bool
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_codebook [V, d-1], grad_values [B, K]) from grad [B, K + has_cls, d]."""
    name = _backend_for(backend, grad.device, grad.dtype, grad.shape[-1] - 1)
    return _BACKWARD[name](grad.contiguous(), gene_ids.contiguous(),
                           None if pad_mask is None else pad_mask.contiguous(), n_genes,
                           int(has_cls), deterministic)


@_gene_tokens_backward_op.register_fake
def _(grad, gene_ids, pad_mask, n_genes, has_cls, backend, deterministic):
    return grad.new_empty(n_genes, grad.shape[-1] - 1), grad.new_empty(gene_ids.shape)


def _setup_context(ctx, inputs, output):
    codebook, gene_ids, values, cls, pad_mask, backend, deterministic, _ = inputs
    ctx.save_for_backward(gene_ids, pad_mask)
    ctx.n_genes = codebook.shape[0]
    ctx.has_cls = cls is not None
    ctx.backend, ctx.deterministic = backend, deterministic


def _backward(ctx, grad):
    gene_ids, pad_mask = ctx.saved_tensors
    c = int(ctx.has_cls)
    grad_codebook = grad_values = grad_cls = None
    if ctx.needs_input_grad[0]:
        grad_codebook, grad_values = _gene_tokens_backward_op(
            grad, gene_ids, pad_mask, ctx.n_genes, ctx.has_cls, ctx.backend, ctx.deterministic)
    elif ctx.needs_input_grad[2]:
        grad_values = _grad_values(grad, pad_mask, c)
    if c and ctx.needs_input_grad[3]:
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        grad_cls = grad[:, 0].sum(0, dtype=acc).to(grad.dtype)
    return grad_codebook, None, grad_values, grad_cls, None, None, None, None


_gene_tokens_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(f"{_OP}: double backward (a gradient of the gradient) is not supported")


_gene_tokens_backward_op.register_autograd(_no_double_backward,
                                           setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------------------------
# Functional API and module
# ---------------------------------------------------------------------------------------------
def _check_args(codebook, gene_ids, values, cls, pad_mask, backend):
    if backend not in BACKENDS:
        raise ValueError(f"{_OP}: backend={backend!r} is not one of {BACKENDS}")
    for name, t in (("codebook", codebook), ("gene_ids", gene_ids), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if codebook.dim() != 2 or codebook.shape[0] < 1 or codebook.shape[1] < 1:
        raise ValueError(f"{_OP}: codebook must be [n_genes, d - 1] with both sizes >= 1, "
                         f"got shape {tuple(codebook.shape)}")
    if codebook.dtype not in _DTYPE_CODE:
        raise TypeError(f"{_OP}: codebook must be float32 or bfloat16 (float64 on CPU), got "
                        f"{codebook.dtype}")
    if gene_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{_OP}: gene_ids must be int32 or int64 (row indices into the "
                        f"codebook), got {gene_ids.dtype}; convert with .long()")
    if gene_ids.dim() != 2:
        raise ValueError(f"{_OP}: gene_ids must be [B, K], got shape {tuple(gene_ids.shape)}")
    if not values.is_floating_point():
        raise TypeError(f"{_OP}: values must be a float tensor (log1p-normalised expression), "
                        f"got {values.dtype}")
    if values.shape != gene_ids.shape:
        raise ValueError(f"{_OP}: values {tuple(values.shape)} must have the shape of gene_ids "
                         f"{tuple(gene_ids.shape)}")
    d = codebook.shape[1] + 1
    if cls is not None:
        if cls.shape != (d,):
            raise ValueError(f"{_OP}: cls must be [d] = [{d}] (codebook width + 1), got "
                             f"{tuple(cls.shape)}")
        if cls.dtype != codebook.dtype:
            raise TypeError(f"{_OP}: cls dtype {cls.dtype} differs from the codebook's "
                            f"{codebook.dtype}; keep both parameters in one dtype")
    if pad_mask is not None:
        if pad_mask.dtype != torch.bool:
            raise TypeError(f"{_OP}: pad_mask must be bool (True = padding), got {pad_mask.dtype}")
        if pad_mask.shape != gene_ids.shape:
            raise ValueError(f"{_OP}: pad_mask {tuple(pad_mask.shape)} must have the shape of "
                             f"gene_ids {tuple(gene_ids.shape)}")
    named = [("codebook", codebook), ("gene_ids", gene_ids), ("values", values), ("cls", cls),
             ("pad_mask", pad_mask)]
    devices = {n: t.device for n, t in named if t is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{n} on {dev}" for n, dev in devices.items())
        raise ValueError(f"{_OP}: all tensors must be on one device, got {where}")


def gene_tokens(codebook: torch.Tensor, gene_ids: torch.Tensor, values: torch.Tensor, *,
                cls: torch.Tensor | None = None, pad_mask: torch.Tensor | None = None,
                deterministic: bool = True, check_ids: bool = False,
                backend: str = "auto") -> torch.Tensor:
    """Encoder tokens ``[E[g] ; x]`` (+ CLS at position 0), fused, with a fused backward.

    Args:
        codebook: ``[V, d-1]`` gene embeddings, fp32 or bf16 (fp64 on cpu/torch backends).
        gene_ids: ``[B, K]`` int32 or int64 in ``[0, V)`` (ignored where ``pad_mask``).
        values: ``[B, K]`` float; cast to the codebook's dtype.
        cls: optional ``[d]`` CLS token (codebook dtype); prepended at position 0.
        pad_mask: optional ``[B, K]`` bool, True = padding: a zero token, no gradient.
        deterministic: bitwise reproducible codebook gradient (default); False lets the GPU
            backends use atomics.
        check_ids: on GPU tensors, raise ``IndexError`` for out-of-range ids (one sync). CPU
            tensors are always checked.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``[B, K + 1, d]`` with ``cls`` (``[B, K, d]`` without), in the codebook's dtype.

    >>> E = torch.randn(100, 7); ids = torch.randint(0, 100, (2, 5)); x = torch.rand(2, 5)
    >>> gene_tokens(E, ids, x, cls=torch.zeros(8)).shape
    torch.Size([2, 6, 8])
    """
    _check_args(codebook, gene_ids, values, cls, pad_mask, backend)
    if values.dtype != codebook.dtype:
        values = values.to(codebook.dtype)
    return _gene_tokens_op(codebook, gene_ids, values, cls, pad_mask, backend, deterministic,
                           check_ids)


class GeneTokenizer(nn.Module):
    """The encoder's tokenizer: a learnable codebook ``[n_genes, d-1]`` and CLS token ``[d]``.

    ``forward(gene_ids [B, K], values [B, K], pad_mask=None) -> [B, K+1, d]`` (``[B, K, d]``
    with ``cls=False``); see :func:`gene_tokens`.

    Initialisation: codebook and CLS ~ N(0, 0.02²), as ViT/BERT/MAE initialise token
    embeddings and the CLS token. Small random embeddings make every gene distinguishable from
    the first step without letting the embedding part swamp the value coordinate (x in
    [0, ~11.5]), which carries the sample's signal; the pre-norm LayerNorm of the first block
    rescales the token anyway, so the scale only sets the initial embedding/value balance.
    """

    def __init__(self, n_genes: int, d: int, cls: bool = True, backend: str = "auto",
                 deterministic: bool = True, device=None, dtype=None):
        super().__init__()
        if n_genes < 1 or d < 2:
            raise ValueError(f"GeneTokenizer: need n_genes >= 1 and d >= 2, got {n_genes}, {d}")
        if backend not in BACKENDS:
            raise ValueError(f"GeneTokenizer: backend={backend!r} is not one of {BACKENDS}")
        factory = {"device": device, "dtype": dtype}
        self.n_genes, self.d = n_genes, d
        self.backend, self.deterministic = backend, deterministic
        self.codebook = nn.Parameter(torch.empty(n_genes, d - 1, **factory))
        if cls:
            self.cls = nn.Parameter(torch.empty(d, **factory))
        else:
            self.register_parameter("cls", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.codebook, std=0.02)
        if self.cls is not None:
            nn.init.normal_(self.cls, std=0.02)

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor,
                pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return gene_tokens(self.codebook, gene_ids, values, cls=self.cls, pad_mask=pad_mask,
                           deterministic=self.deterministic, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"n_genes={self.n_genes}, d={self.d}, cls={self.cls is not None}, "
                f"backend={self.backend!r}, deterministic={self.deterministic}")


__all__ = ["gene_tokens", "GeneTokenizer"]
