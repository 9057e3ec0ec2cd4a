"""Encoder input tokens of TxFM: fused gene-embedding gather + value concat (+ CLS).

For ``codebook E [V, d-1]``, ``gene_ids g [B, K]``, ``values x [B, K]`` and an optional
``cls c [d]``, :func:`gene_tokens` returns ``tokens [B, T, d]`` with ``T = K + 1`` when a CLS
token is given (it sits at position 0) and ``T = K`` otherwise::

    tokens[b, cls + k] = [ E[g[b, k]] ; x[b, k] ]        (zeros where key_padding_mask[b, k])
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
reference, works everywhere) and ``auto``. Files: ``triton.py`` (Triton kernels),
``native.py`` (the C++ and CUDA libraries of ``csrc/tokens/``), ``reference.py`` (the eager
PyTorch reference); this file checks arguments and holds the ``torch.library`` ops, their
autograd, the function and the module. Every backend, ``torch`` included, runs inside the
same custom ops, so ``torch.compile(fullgraph=True, dynamic=True)`` sees one node for the
forward and one for the backward whatever the backend.

Bad gene ids: on CPU tensors every backend raises an ``IndexError`` naming the offending ids.
On GPU tensors the triton and cuda kernels never read outside the codebook: an out-of-range id
gives a zero token and no gradient, silently; pass ``check_ids=True`` to get the same
``IndexError`` as on CPU at the cost of one device synchronisation per call (the torch backend
on GPU raises a device-side assert, like ``nn.Embedding``). Ids at padded positions are never
read, so any placeholder (e.g. -1) may sit there.
"""
from __future__ import annotations

import torch
from torch import nn

from .._common import (BACKENDS, as_int, backend_module, check_choice, check_int,
                       check_reverse_mode_only, check_same_device, check_tensor,
                       renamed_padding, resolve)
from . import reference

__all__ = ["gene_tokens", "GeneTokenizer"]

_OP = "gene_tokens"
_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_GPU_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_MAX_WIDTH = 2048  # widest codebook row (d - 1) of the CUDA backward (registers per lane)


# ---------------------------------------------------------------------------------------------
# Argument checks (compile-safe: nothing here reads tensor values)
# ---------------------------------------------------------------------------------------------
def _check_args(codebook, gene_ids, values, cls, key_padding_mask, backend, op: str = _OP):
    check_choice(backend, "backend", BACKENDS, op)
    for name, t in (("codebook", codebook), ("gene_ids", gene_ids), ("values", values)):
        check_tensor(t, name, op)
    if codebook.dim() != 2 or codebook.shape[0] < 1 or codebook.shape[1] < 1:
        raise ValueError(f"{op}: codebook must be [n_genes, d - 1] with both sizes >= 1, "
                         f"got shape {tuple(codebook.shape)}")
    check_tensor(codebook, "codebook", op, _DTYPES, desc="float32 or bfloat16 (float64 on CPU)")
    check_tensor(gene_ids, "gene_ids", op, (torch.int32, torch.int64),
                 desc="int32 or int64 (row indices into the codebook)", hint="convert with .long()")
    if gene_ids.dim() != 2:
        raise ValueError(f"{op}: gene_ids must be [B, K], got shape {tuple(gene_ids.shape)}")
    if not values.is_floating_point():
        raise TypeError(f"{op}: values must be a float tensor (log1p-normalised expression), "
                        f"got {values.dtype}")
    if values.shape != gene_ids.shape:
        raise ValueError(f"{op}: values {tuple(values.shape)} must have the shape of gene_ids "
                         f"{tuple(gene_ids.shape)}")
    d = codebook.shape[1] + 1
    if cls is not None:
        check_tensor(cls, "cls", op)
        if cls.shape != (d,):
            raise ValueError(f"{op}: cls must be [d] = [{d}] (codebook width + 1), got "
                             f"{tuple(cls.shape)}")
        if cls.dtype != codebook.dtype:
            raise TypeError(f"{op}: cls dtype {cls.dtype} differs from the codebook's "
                            f"{codebook.dtype}; keep both parameters in one dtype")
    if key_padding_mask is not None:
        check_tensor(key_padding_mask, "key_padding_mask", op, (torch.bool,),
                     desc="bool (True = padding)")
        if key_padding_mask.shape != gene_ids.shape:
            raise ValueError(f"{op}: key_padding_mask {tuple(key_padding_mask.shape)} must have "
                             f"the shape of gene_ids {tuple(gene_ids.shape)}")
    check_same_device(op, "codebook", codebook=codebook, gene_ids=gene_ids, values=values,
                      cls=cls, key_padding_mask=key_padding_mask)


def _check_backward_args(grad, gene_ids, key_padding_mask, n_genes, has_cls, backend):
    """``txfm::gene_tokens_backward``'s contract, for a direct call (autograd's always holds)."""
    op = "torch.ops.txfm.gene_tokens_backward"
    check_choice(backend, "backend", BACKENDS, op)
    check_tensor(grad, "grad", op, _DTYPES, desc="float32 or bfloat16 (float64 on CPU)")
    check_tensor(gene_ids, "gene_ids", op, (torch.int32, torch.int64))
    check_int(n_genes, "n_genes", op, 1)
    if gene_ids.dim() != 2:
        raise ValueError(f"{op}: gene_ids must be [B, K], got shape {tuple(gene_ids.shape)}")
    B, K = gene_ids.shape
    if grad.dim() != 3 or tuple(grad.shape[:2]) != (B, K + int(has_cls)) or grad.shape[2] < 2:
        raise ValueError(f"{op}: grad must be [B, K + has_cls, d] = [{B}, {K + int(has_cls)}, d] "
                         f"with d >= 2, got shape {tuple(grad.shape)}")
    if key_padding_mask is not None:
        check_tensor(key_padding_mask, "key_padding_mask", op, (torch.bool,))
        if key_padding_mask.shape != gene_ids.shape:
            raise ValueError(f"{op}: key_padding_mask {tuple(key_padding_mask.shape)} must have "
                             f"the shape of gene_ids {tuple(gene_ids.shape)}")
    check_same_device(op, "grad", grad=grad, gene_ids=gene_ids, key_padding_mask=key_padding_mask)


# ---------------------------------------------------------------------------------------------
# Backend choice (inside the custom ops: it sees the real dtype and width, never traced)
# ---------------------------------------------------------------------------------------------
def _backend_for(backend: str, device: torch.device, dtype: torch.dtype, width: int) -> str:
    """The backend that runs a codebook of ``dtype`` and ``width`` = d - 1 columns."""
    name = resolve(backend, device.type, "tokens")
    if name in ("triton", "cuda") and dtype not in _GPU_DTYPES:
        if backend == "auto":
            return "torch"
        raise TypeError(f"{_OP}: backend={name!r} supports fp32 and bf16 codebooks, got {dtype}; "
                        "use backend='cpu' or 'torch' for fp64")
    if name == "cuda" and width > _CUDA_MAX_WIDTH:
        if backend == "auto":  # next best on the GPU
            try:
                return resolve("triton", device.type, "tokens")
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
                    cls: torch.Tensor | None, key_padding_mask: torch.Tensor | None, backend: str,
                    deterministic: bool, check_ids: bool) -> torch.Tensor:
    """tokens [B, K + (cls given), d]; every tensor contiguous, values/cls in the codebook dtype."""
    # a direct torch.ops.txfm call skips gene_tokens' checks, and the kernels would read past a
    # buffer whose shape disagrees: check the metadata again (no value read, no sync)
    op = "torch.ops.txfm.gene_tokens"
    _check_args(codebook, gene_ids, values, cls, key_padding_mask, backend, op)
    if values.dtype != codebook.dtype:
        raise TypeError(f"{op}: values must be in the codebook's dtype {codebook.dtype}, got "
                        f"{values.dtype}; pass values.to(codebook.dtype)")
    name = _backend_for(backend, codebook.device, codebook.dtype, codebook.shape[1])
    if check_ids or (gene_ids.device.type == "cpu" and name != "cpu"):  # the C++ kernel checks
        reference.check_ids(gene_ids, key_padding_mask, codebook.shape[0])
    return backend_module(__name__, name).forward(
        codebook.contiguous(), gene_ids.contiguous(), values.contiguous(),
        None if cls is None else cls.contiguous(),
        None if key_padding_mask is None else key_padding_mask.contiguous(), name)


@_gene_tokens_op.register_fake
def _(codebook, gene_ids, values, cls, key_padding_mask, backend, deterministic, check_ids):
    B, K = gene_ids.shape
    return codebook.new_empty(B, K + int(cls is not None), codebook.shape[1] + 1)


@torch.library.custom_op("txfm::gene_tokens_backward", mutates_args=())
def _gene_tokens_backward_op(grad: torch.Tensor, gene_ids: torch.Tensor,
                             key_padding_mask: torch.Tensor | None, n_genes: int, has_cls: bool,
                             backend: str, deterministic: bool
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_codebook [V, d-1], grad_values [B, K]) from grad [B, K + has_cls, d]."""
    _check_backward_args(grad, gene_ids, key_padding_mask, n_genes, has_cls, backend)
    name = _backend_for(backend, grad.device, grad.dtype, grad.shape[-1] - 1)
    return backend_module(__name__, name).backward(
        grad.contiguous(), gene_ids.contiguous(),
        None if key_padding_mask is None else key_padding_mask.contiguous(), n_genes, has_cls,
        deterministic, name)


@_gene_tokens_backward_op.register_fake
def _(grad, gene_ids, key_padding_mask, n_genes, has_cls, backend, deterministic):
    return grad.new_empty(n_genes, grad.shape[-1] - 1), grad.new_empty(gene_ids.shape)


def _setup_context(ctx, inputs, output):
    codebook, gene_ids, values, cls, key_padding_mask, backend, deterministic, _ = inputs
    ctx.save_for_backward(gene_ids, key_padding_mask)
    ctx.n_genes = codebook.shape[0]
    ctx.has_cls = cls is not None
    ctx.backend, ctx.deterministic = backend, deterministic


def _backward(ctx, grad):
    gene_ids, key_padding_mask = ctx.saved_tensors
    c = int(ctx.has_cls)
    grad_codebook = grad_values = grad_cls = None
    if ctx.needs_input_grad[0]:
        grad_codebook, grad_values = _gene_tokens_backward_op(
            grad, gene_ids, key_padding_mask, ctx.n_genes, ctx.has_cls, ctx.backend,
            ctx.deterministic)
    elif ctx.needs_input_grad[2]:
        grad_values = reference.grad_values(grad, key_padding_mask, c)
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
def gene_tokens(codebook: torch.Tensor, gene_ids: torch.Tensor, values: torch.Tensor, *,
                cls: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                deterministic: bool = True, check_ids: bool = False,
                backend: str = "auto", pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Encoder tokens ``[E[g] ; x]`` (+ CLS at position 0), fused, with a fused backward.

    Args:
        codebook: ``[V, d-1]`` gene embeddings, fp32 or bf16 (fp64 on cpu/torch backends).
        gene_ids: ``[B, K]`` int32 or int64 in ``[0, V)`` (ignored where ``key_padding_mask``).
        values: ``[B, K]`` float; cast to the codebook's dtype.
        cls: optional ``[d]`` CLS token (codebook dtype); prepended at position 0.
        key_padding_mask: optional ``[B, K]`` bool, True = padding: a zero token, no gradient
            (torch's name; ``pad_mask=`` is its deprecated alias).
        deterministic: bitwise reproducible codebook gradient (default); False lets the GPU
            backends use atomics.
        check_ids: on GPU tensors, raise ``IndexError`` for out-of-range ids (one sync). CPU
            tensors are always checked.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``[B, K + 1, d]`` with ``cls`` (``[B, K, d]`` without), in the codebook's dtype.

    Raises:
        TypeError / ValueError naming the argument (dtype, shape, device, backend);
        ``IndexError`` for an id outside ``[0, V)`` (CPU tensors, or ``check_ids``);
        ``NotImplementedError`` under forward-mode AD or ``torch.func.grad`` (``vmap`` works);
        ``RuntimeError`` for a backend that cannot run here.

    Source: the token ``[E_g ; x_g]`` of arXiv:2605.31562 (model).

    >>> E = torch.randn(100, 7); ids = torch.randint(0, 100, (2, 5)); x = torch.rand(2, 5)
    >>> gene_tokens(E, ids, x, cls=torch.zeros(8)).shape
    torch.Size([2, 6, 8])
    """
    key_padding_mask = renamed_padding(key_padding_mask, pad_mask, "gene_tokens")
    _check_args(codebook, gene_ids, values, cls, key_padding_mask, backend)
    check_reverse_mode_only("gene_tokens", " (vmap works)", codebook=codebook, values=values,
                            cls=cls)
    if values.dtype != codebook.dtype:
        values = values.to(codebook.dtype)
    return _gene_tokens_op(codebook, gene_ids, values, cls, key_padding_mask, backend,
                           deterministic, check_ids)


class GeneTokenizer(nn.Module):
    """The encoder's tokenizer: a learnable codebook ``[n_genes, d-1]`` and CLS token ``[d]``.

    ``forward(gene_ids [B, K], values [B, K], key_padding_mask=None) -> [B, K+1, d]`` (``[B, K, d]``
    with ``cls=False``); see :func:`gene_tokens`.

    Initialisation: codebook and CLS ~ N(0, 0.02²), as ViT/BERT/MAE initialise token
    embeddings and the CLS token. Small random embeddings make every gene distinguishable from
    the first step without letting the embedding part swamp the value coordinate (x in
    [0, ~11.5]), which carries the sample's signal; the pre-norm LayerNorm of the first block
    rescales the token anyway, so the scale only sets the initial embedding/value balance.
    Source: arXiv:2605.31562, model (a learnable gene embedding concatenated with the value);
    docs/kernels.md.

    Raises:
        ValueError: ``n_genes`` < 1 or ``d`` < 2 (or not ints), an unknown ``backend``.
        TypeError: a ``dtype`` other than float32 / bfloat16 (float64 on CPU).
    """

    def __init__(self, n_genes: int, d: int, cls: bool = True, backend: str = "auto",
                 deterministic: bool = True, device=None, dtype=None):
        super().__init__()
        n_genes, d = as_int(n_genes), as_int(d)
        check_int(n_genes, "n_genes", "GeneTokenizer", 1)
        check_int(d, "d", "GeneTokenizer", 2)
        if dtype is not None and dtype not in _DTYPES:
            raise TypeError(f"GeneTokenizer: dtype must be float32 or bfloat16 (float64 on CPU), "
                            f"got {dtype}")
        check_choice(backend, "backend", BACKENDS, "GeneTokenizer")
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
        """Codebook and CLS drawn anew from N(0, 0.02²) (see the class docstring)."""
        nn.init.normal_(self.codebook, std=0.02)
        if self.cls is not None:
            nn.init.normal_(self.cls, std=0.02)

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None,
                check_ids: bool = False, *, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`gene_tokens` with this module's codebook and CLS: ``[B, K+1, d]`` (``[B, K,
        d]`` without CLS) in the codebook's dtype. ``check_ids``: on GPU tensors, raise
        ``IndexError`` for an id outside ``[0, n_genes)`` (one host sync; CPU tensors are
        always checked). Other errors as :func:`gene_tokens`."""
        key_padding_mask = renamed_padding(key_padding_mask, pad_mask, "GeneTokenizer",
                                           stacklevel=5)
        return gene_tokens(self.codebook, gene_ids, values, cls=self.cls,
                           key_padding_mask=key_padding_mask,
                           deterministic=self.deterministic, backend=self.backend,
                           check_ids=check_ids)

    def extra_repr(self) -> str:
        return (f"n_genes={self.n_genes}, d={self.d}, cls={self.cls is not None}, "
                f"backend={self.backend!r}, deterministic={self.deterministic}")
