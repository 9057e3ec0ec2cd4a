"""Fused rectified tanh + Poisson negative log-likelihood over the gene vocabulary, the TxFM
loss (arXiv:2605.31562 §4).

For decoder logits ``z [B, G]`` and targets ``x [B, G]`` normalised to ``L`` counts per sample
and log1p-transformed (``x = log1p(L c / sum c)``; the paper's ``L`` is 1e5)::

    phi(z)   = alpha * relu(tanh(z / beta))             alpha = log(L + 1), beta = 4 * e
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

Files: ``triton.py`` (Triton kernels), ``native.py`` (the C++ and CUDA libraries of
``csrc/poisson/``), ``reference.py`` (the eager PyTorch reference that ``backend="torch"`` and
the ``auto`` fallback run); this file checks arguments and holds the ``torch.library`` op, its
autograd, the functions and the modules.

How the kernels run (``backend="triton" | "cuda" | "cpu"``): one pass over logits and target
computes the loss and, when a gradient will be needed (``logits.requires_grad`` under grad
mode), ``dlogits`` already scaled for the reduction, into a fresh buffer (never into the
caller's logits). Rows are split into column tiles (the grid is rows x tiles); each tile
writes one partial sum and the partials are added in a fixed order, so results are
deterministic and need no float atomics. The ``"mean"`` weight of row ``b`` is
``1 / (B * kept_b)``, known before the pass: the kept counts come from a cheap reduction of
the mask alone (``[G]``: one sum; ``[D, G]``: one sum per dataset, then gathered; ``[B, G]``:
a row sum, 1 byte per element against the 8-12 bytes per element of the main pass), which
keeps the kernel single-pass. The backward is then ``dlogits *= grad_output`` in place on that
buffer, skipped when ``grad_output == 1`` (the usual ``loss.backward()``): on CPU tensors by a
host check (free, no device), on GPU inside the kernel (no sync). So a training step reads
logits and target once and writes one ``[B, G]`` gradient, and holds no other ``[B, G]``
buffer. That buffer is in the logits' dtype, except for fp16 logits: there it is fp32
(``reference.grad_dtype``) and the backward rounds ``dlogits * grad_output`` into fp16 once,
out of place, so that a loss scale (``torch.amp.GradScaler``) or a loss weight acts before
fp16's range does.

Consequences of that in-place scaling: a second backward through the same graph
(``retain_graph=True``) after one with ``grad_output != 1`` (or any on a GPU), or after the
caller changed the gradient the first one returned in place, raises PyTorch's "modified by an
inplace operation" error instead of returning a wrong gradient, and double
backward (``create_graph=True``) is an error; the ``torch`` backend (eager autograd, also what
``auto`` falls back to) supports both. Memory traffic per training step, fp32: 12 bytes per
element (read z, x; write dz); bf16 logits and target: 6 bytes.

A dataset id outside ``[0, D)`` raises a ``ValueError`` on CPU tensors, under torch.compile
too on the fused backends (their op body sees the real ids). It is not checked on GPU tensors
(that needs a sync), nor on the ``torch`` backend under torch.compile (traced into the graph):
there its row's loss and gradient come out NaN.

torch.compile: the fused forward is the ``torch.library`` custom op ``txfm::poisson_nll``
(fake and autograd registered), so ``torch.compile(model, fullgraph=True, dynamic=True)``
keeps it as one node; ``alpha``, ``beta`` (and ``eps`` of the drop-in) may be Python variables
that change between calls: new shapes reuse the compiled graph, a new float value recompiles
once under inductor (it specialises floats that reach a custom op). In eager mode the same
forward and backward run through a plain ``torch.autograd.Function``: the custom-op dispatch
alone costs ~100 us of CPU per step. The custom op returns its gradient buffer as a second
output, so its backward scales out of place: a direct caller of ``torch.ops.txfm.poisson_nll``
keeps that output as it was (``torch.library.opcheck`` passes in full).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._common import (_TRACING_TENSORS, BACKENDS, Number, backend_module, check_choice,
                       check_number, check_reverse_mode_only, check_row_ids, check_same_device,
                       check_tensor,
                       op_backend, resolve, traced, transformed)
from ..masks import RowGeneMask
from . import reference
from .reference import ALPHA, BETA, LINEAR, LOG, REDUCTIONS, RTANH

__all__ = ["ALPHA", "BETA", "rectified_tanh", "rectified_tanh_poisson_nll", "poisson_nll_loss",
           "RectifiedTanh", "RectifiedTanhPoissonNLLLoss", "PoissonNLLLoss"]

_OP = "poisson"
_ALPHA_LIMIT = 80.0  # |alpha| bound that keeps exp(phi) finite in fp32 without clamping
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class Launch(NamedTuple):
    """What a kernel launcher (``triton.forward``, ``native.forward``) computes, besides z, x.

    ``mask``: None, or uint8 bytes ``[G]`` / ``[B, G]`` / ``[D, G]`` (``mask_stride`` bytes
    between rows, 0 for ``[G]``); ``ids``: None or int64 ``[B]`` rows of a ``[D, G]`` mask
    (``n_mask_rows`` = D); row weights: ``row_scale`` fp64 ``[B]``, or ``scale`` for every row.
    """

    mode: int
    full: bool
    alpha: float
    beta: float
    eps: float
    reduction: str
    need_grad: bool
    cdt: torch.dtype  # the arithmetic and loss dtype (reference.compute_dtype)
    gdt: torch.dtype  # the gradient buffer's (reference.grad_dtype)
    mask: torch.Tensor | None
    mask_stride: int
    ids: torch.Tensor | None
    n_mask_rows: int
    row_scale: torch.Tensor | None
    scale: float


# ---------------------------------------------------------------------------------------------
# Argument checks (compile-safe: nothing here reads tensor values)
# ---------------------------------------------------------------------------------------------
_ALPHA_WHAT = (f"finite with |alpha| <= {_ALPHA_LIMIT:g} (exp(alpha) must stay finite in "
               f"fp32)")
# The kernels clamp |z / beta| at 40 before tanh, where sech^2 is ~7e-35 instead of 0; times
# alpha / beta that leak stays below 1e-29 for beta >= 1e-3 and grows without bound below it
# (beta = 1e-30 gave gradient 83 where the true one is 0). The paper's beta is 4 * e (~10.87).
BETA_MIN = 1e-3
_BETA_WHAT = f"finite and >= {BETA_MIN:g} (below, the kernels' clamp of z / beta leaks gradient)"
_FP64_MAX = float(torch.finfo(torch.float64).max)


def _check_alpha_beta(alpha, beta, op: str) -> tuple[float, float]:
    alpha = check_number(alpha, "alpha", op, _ALPHA_WHAT, low=-_ALPHA_LIMIT, high=_ALPHA_LIMIT)
    beta = check_number(beta, "beta", op, _BETA_WHAT, low=BETA_MIN, high=_FP64_MAX)
    return alpha, beta


def _rows(logits, target, op: str):
    """Validate logits/target and view them as [B, G]; returns (z, x, was_1d)."""
    for name, t in (("logits", logits), ("target", target)):
        check_tensor(t, name, op, _FLOATS, desc="a floating tensor (float32, bfloat16, float16, "
                     "float64)", hint="convert it with .float()")
    if logits.shape != target.shape:
        raise ValueError(f"{op}: logits and target must have the same shape, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    if logits.dim() not in (1, 2):
        raise ValueError(f"{op}: logits must be [B, G] (or [G] for one row), got "
                         f"{logits.dim()}-D shape {tuple(logits.shape)}; reshape to [-1, G]")
    if logits.numel() == 0:
        raise ValueError(f"{op}: logits must have B >= 1 rows and G >= 1 genes, got shape "
                         f"{tuple(logits.shape)}")
    check_same_device(op, "logits", logits=logits, target=target)
    if target.requires_grad:
        raise ValueError(f"{op}: target must not require grad (the loss is not differentiated "
                         f"with respect to it); pass target.detach()")
    was_1d = logits.dim() == 1
    return (logits[None], target[None], True) if was_1d else (logits, target, False)


def _check_gene_mask(gene_mask, B, G, device: torch.device, op: str):
    """-> (mask None | bool [G] | [B, G] | [D, G], dataset_ids None | int [B])."""
    if gene_mask is None:
        return None, None
    if isinstance(gene_mask, (RowGeneMask, tuple)):  # or a plain (mask, dataset_ids) pair
        if len(gene_mask) != 2:
            raise TypeError(f"{op}: gene_mask as a tuple must be RowGeneMask(mask [D, G], "
                            f"dataset_ids [B]), got {len(gene_mask)} items")
        mask, ids = gene_mask
        # a wrong type or dtype is a TypeError, a wrong shape a ValueError, as for every tensor
        check_tensor(mask, "gene_mask.mask", op, (torch.bool,), desc="a bool [D, G] tensor",
                     hint="use mask.bool() or mask != 0")
        if mask.dim() != 2 or mask.shape[1] != G or mask.shape[0] < 1:
            raise ValueError(f"{op}: gene_mask.mask must be a bool [D, G={G}] tensor with D >= 1, "
                             f"got shape {tuple(mask.shape)}")
        check_tensor(ids, "gene_mask.dataset_ids", op, (torch.int32, torch.int64),
                     hint="dataset ids are row indices of gene_mask.mask; use .long()")
        if ids.shape != (B,):
            raise ValueError(f"{op}: gene_mask.dataset_ids must have shape [B] = ({B},), got "
                             f"{tuple(ids.shape)}")
        check_same_device(op, "logits", logits=device,
                          **{"gene_mask.mask": mask, "gene_mask.dataset_ids": ids})
        return mask, ids
    if not isinstance(gene_mask, torch.Tensor):
        raise TypeError(f"{op}: gene_mask must be None, a bool tensor or a RowGeneMask, got "
                        f"{type(gene_mask).__name__}")
    check_tensor(gene_mask, "gene_mask", op, (torch.bool,),
                 desc="a bool tensor (True = keep the gene)", hint="use mask.bool() or mask != 0")
    if tuple(gene_mask.shape) not in ((G,), (B, G)):
        raise ValueError(f"{op}: gene_mask must have shape [G]=({G},) or [B, G]=({B}, {G}), got "
                         f"{tuple(gene_mask.shape)}")
    check_same_device(op, "logits", logits=device, gene_mask=gene_mask)
    return gene_mask, None


def _check_ids(mask, ids, op: str) -> None:
    if ids is not None:
        check_row_ids(ids, mask.shape[0], f"{op}: gene_mask.dataset_ids")


# ---------------------------------------------------------------------------------------------
# Forward: the body of the custom op (never traced: it sees real tensors and numbers)
# ---------------------------------------------------------------------------------------------
def _supported_target_dtype(z: torch.Tensor, x: torch.Tensor, mode: int) -> torch.dtype:
    """Target dtype the kernels take for these logits (other targets are converted to it)."""
    if z.dtype == torch.float64:
        return torch.float64
    if mode == RTANH:
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


def _forward(logits, target, mask, dataset_ids, mode, full, alpha, beta, eps, reduction,
             need_grad, backend):
    """Fused forward. logits/target [B, G]; mask None, [G], [B, G], or [D, G] with dataset_ids
    [B]. Returns (loss: 0-d, or [B, G] for "none"; fp32, fp64 for fp64 logits,
    grad: weight * dl/dz in reference.grad_dtype (the logits' dtype, fp32 for fp16 logits), or
    an empty tensor when need_grad is False)."""
    name = op_backend(backend, logits.device.type, _OP)
    z = logits.contiguous()
    x = target.to(_supported_target_dtype(z, target, mode)).contiguous()
    # under torch.compile the public function's check saw only traced ids: the same message here
    _check_ids(mask, dataset_ids, "rectified_tanh_poisson_nll")
    if name == "torch":
        loss, grad = reference.forward(z, x, mask, dataset_ids, mode, full, alpha, beta, eps,
                                       reduction, need_grad)
    else:
        B, G = z.shape
        mask_u8, stride, ids = None, 0, None
        if mask is not None:
            mask_u8 = mask.contiguous().view(torch.uint8)
            stride = 0 if mask.dim() == 1 else G
            if dataset_ids is not None:
                ids = dataset_ids.to(torch.int64).contiguous()
        row_scale, scale = _row_weights(B, mask_u8, stride, ids, reduction, G)
        job = Launch(mode, bool(full), float(alpha), float(beta), float(eps), reduction,
                     need_grad, reference.compute_dtype(z), reference.grad_dtype(z), mask_u8,
                     stride, ids,
                     0 if mask is None or mask.dim() == 1 else mask.shape[0], row_scale, scale)
        loss, grad = backend_module(__name__, name).forward(z, x, job, name)
    return loss, (grad if grad is not None else z.new_empty(0))


def _check_op_args(logits, target, mask, dataset_ids, mode, alpha, beta, reduction, backend):
    """The op's contract, checked again in its body: a direct ``torch.ops.txfm.poisson_nll``
    call skips the public functions' checks, and the kernels would read past a target or mask
    whose shape disagrees. Metadata only (no tensor value is read, nothing syncs); the eager
    path of the public functions calls ``_forward`` without it."""
    op = "torch.ops.txfm.poisson_nll"
    _check_choices(reduction, backend, op)
    if mode not in (RTANH, LOG, LINEAR):
        raise ValueError(f"{op}: mode must be {RTANH} (rectified tanh), {LOG} (log input) or "
                         f"{LINEAR} (rate input), got {mode!r}")
    for name, t in (("logits", logits), ("target", target)):
        check_tensor(t, name, op)
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be [B, G], got shape {tuple(t.shape)}")
    _rows(logits, target, op)
    B, G = logits.shape
    if dataset_ids is not None and mask is None:
        raise ValueError(f"{op}: dataset_ids index the rows of a [D, G] mask, so mask is needed")
    _check_gene_mask(mask if dataset_ids is None else (mask, dataset_ids), B, G, logits.device,
                     op)
    if mode == RTANH:
        _check_alpha_beta(alpha, beta, op)


# ---------------------------------------------------------------------------------------------
# torch.library custom op (+ fake)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("txfm::poisson_nll", mutates_args=())
def _poisson_nll_op(logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor],
                    dataset_ids: Optional[torch.Tensor], mode: int, full: bool, alpha: Number,
                    beta: Number, eps: Number, reduction: str, need_grad: bool,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused forward as one graph node for torch.compile / export (see _forward)."""
    _check_op_args(logits, target, mask, dataset_ids, mode, alpha, beta, reduction, backend)
    return _forward(logits, target, mask, dataset_ids, mode, full, alpha, beta, eps, reduction,
                    need_grad, backend)


@_poisson_nll_op.register_fake
def _(logits, target, mask, dataset_ids, mode, full, alpha, beta, eps, reduction, need_grad,
      backend):
    cdt = reference.compute_dtype(logits)
    loss = (logits.new_empty(logits.shape, dtype=cdt) if reduction == "none"
            else logits.new_empty((), dtype=cdt))
    grad = (logits.new_empty(logits.shape, dtype=reference.grad_dtype(logits)) if need_grad
            else logits.new_empty(0))
    return loss, grad


# ---------------------------------------------------------------------------------------------
# Autograd: the backward rescales the gradient computed in the forward
# ---------------------------------------------------------------------------------------------
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
    backend_module(__name__, backend).scale_grad(grad, grad_loss.to(torch.float32).reshape(1),
                                                 backend)
    torch.autograd.graph.increment_version(grad)  # PyTorch cannot see the kernel's write
    return grad


def _setup_context(ctx, inputs, output):
    ctx.reduction = inputs[9]
    ctx.backend = inputs[11]
    ctx.logits_dtype = inputs[0].dtype  # the gradient's; the saved buffer's may be wider
    # Logits that are a view (the drop-in flattens its input, 1-D logits gain a row) send the
    # gradient on as a view of the saved buffer, which autograd may then keep as a leaf's
    # .grad and accumulate into in place: such a buffer is never handed out.
    ctx.view_input = inputs[0]._is_view()
    ctx.save_for_backward(output[1])
    # The second output (dlogits) is never differentiated: without this autograd would fill a
    # [B, G] zero tensor as its incoming gradient on every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_of_grad_output, in_place: bool = True):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 and grad_loss is not None:
        raise RuntimeError("poisson_nll: the forward ran without a gradient (logits did not "
                           "require grad under grad mode), so there is nothing to backpropagate")
    if grad_loss is None:
        return (None,) * 12
    if torch.is_grad_enabled() and not traced(grad_loss):
        raise RuntimeError("poisson_nll: double backward (create_graph=True) is not supported "
                           "by the fused backends (their backward only rescales a gradient "
                           "computed in the forward); use backend='torch' for higher-order "
                           "gradients")
    if ctx.reduction == "none" or grad.dtype != ctx.logits_dtype:
        # scaled in fp32 (fp64), then rounded into the logits' dtype once (fp16: grad_dtype)
        dz = (grad * grad_loss).to(ctx.logits_dtype)
    elif (not in_place or traced(grad_loss) or transformed(grad_loss) or ctx.view_input
          or getattr(ctx, "handed_out", False)):
        # handed_out: an earlier backward of this graph (retain_graph=True) returned the saved
        # buffer itself, which is now the caller's gradient: scaling it in place would change
        # that gradient under them. transformed: batched gradients (is_grads_batched, vmap'd
        # vector-Jacobian products) have no single value to test or scale by. not in_place:
        # the custom op hands its gradient buffer to whoever called it, so the buffer is theirs.
        dz = (grad * grad_loss).to(ctx.logits_dtype)
    else:
        ctx.handed_out = True
        dz = _scale_grad_in_place(grad, grad_loss, ctx.backend)
    return (dz,) + (None,) * 11


def _backward_op(ctx, grad_loss, grad_of_grad_output):
    # The custom op returns its gradient buffer as an output: a direct caller of
    # torch.ops.txfm.poisson_nll holds it, so the backward must not scale it under them (and
    # torch.library's contract, checked by opcheck, is that outputs are not mutated). Under
    # torch.compile the backward is traced, which is out of place anyway; the eager path
    # (_PoissonNLLFunction) never hands the buffer out and keeps the in-place scaling.
    return _backward(ctx, grad_loss, grad_of_grad_output, in_place=False)


_poisson_nll_op.register_autograd(_backward_op, setup_context=_setup_context)


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
def _check_choices(reduction: str, backend: str, op: str) -> None:
    check_choice(reduction, "reduction", REDUCTIONS, op)
    check_choice(backend, "backend", BACKENDS, op)


def rectified_tanh(z: torch.Tensor, alpha: float = ALPHA, beta: float = BETA) -> torch.Tensor:
    """``alpha * relu(tanh(z / beta))``: the decoder's prediction ``x_hat`` in ``[0, alpha)``
    (``(alpha, 0]`` for a negative ``alpha``; ``|alpha| <= 80``, ``beta >= 1e-3``).

    Any shape and float dtype (output in ``z``'s dtype); differentiable (plain PyTorch ops,
    which torch.compile fuses into one kernel).
    """
    check_tensor(z, "z", "rectified_tanh", _FLOATS, desc="a floating tensor")
    alpha, beta = _check_alpha_beta(alpha, beta, "rectified_tanh")
    return reference.rectified_tanh(z, alpha, beta)


def rectified_tanh_poisson_nll(logits: torch.Tensor, target: torch.Tensor, gene_mask=None, *,
                               alpha: float = ALPHA, beta: float = BETA, reduction: str = "mean",
                               backend: str = "auto") -> torch.Tensor:
    """Poisson NLL of ``phi(logits)`` against ``exp(target)``, fused (arXiv:2605.31562, loss;
    the formula and the traffic it saves: the module docstring).

    Per gene ``exp(x_hat) - x_hat * exp(x)`` with ``x_hat = alpha * relu(tanh(z / beta))``,
    in nats, on the log1p-normalised scale of ``target``.

    Args:
        logits: ``[B, G]`` (or ``[G]``) fp32 / bf16 / fp16 / fp64 decoder logits ``z``
            (fp64 is computed in fp64); dense (``.to_dense()`` a sparse tensor).
        target: same shape, fp32 / bf16 (another float dtype is converted to fp32, or to
            fp64 with fp64 logits), log1p-normalised expression ``x`` (the loss uses
            ``exp(x)``: NaN, or ``x`` above ``88.72 - ln|alpha|`` (86.3 at the default
            ``alpha``, 84.3 at ``|alpha| = 80``) where ``phi * exp(x)`` overflows fp32, gives
            a NaN or infinite loss, as the eager formula does); must not require grad.
        gene_mask: None, bool ``[G]`` or ``[B, G]`` (True = keep), or
            :class:`~txfm_kernels.RowGeneMask` ``(mask [D, G], dataset_ids [B])``.
        alpha, beta: rectified-tanh constants (defaults :data:`ALPHA` = ``log(1e5 + 1)``,
            :data:`BETA` = ``4 * e``; ``|alpha| <= 80``, ``beta >= 1e-3``); Python or
            symbolic (torch.compile) floats, never tensors: they are constants of the op,
            not learnable.
        reduction: ``"mean"`` (mean over rows of per-row means over kept genes; rows keeping
            no gene contribute 0), ``"sum"`` or ``"none"`` (``[B, G]``, 0 where left out).
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"`` (eager
            autograd reference, also the ``auto`` fallback; the only one with double backward,
            forward-mode AD and ``torch.func`` transforms such as ``grad`` and ``vmap``).

    Returns:
        fp32 loss (0-d, or ``[B, G]`` / ``[G]`` for ``"none"``; fp64 for fp64 logits); its
        gradient with respect to ``logits`` comes back in the logits' dtype.

    Raises:
        TypeError / ValueError naming the argument; ``ValueError`` for a dataset id outside
        ``[0, D)`` on CPU tensors; ``RuntimeError`` for a backend that cannot run here.

    Example::

        loss = rectified_tanh_poisson_nll(decoder(e), x, RowGeneMask(observable, dataset_ids))
        loss.backward()
    """
    op = "rectified_tanh_poisson_nll"
    _check_choices(reduction, backend, op)
    alpha, beta = _check_alpha_beta(alpha, beta, op)
    z, x, was_1d = _rows(logits, target, op)
    mask, ids = _check_gene_mask(gene_mask, z.shape[0], z.shape[1], z.device, op)
    name = resolve(backend, z.device.type, _OP)
    if name != "torch":
        check_reverse_mode_only(op, ", or backend='torch' (eager autograd)", vmap=False,
                                logits=z)
    if name == "torch":  # the fused backends check in their op body (_forward)
        _check_ids(mask, ids, op)
        loss = reference.poisson_nll(z, x, mask, ids, mode=RTANH, alpha=alpha, beta=beta,
                                     reduction=reduction)
    else:
        need_grad = z.requires_grad and torch.is_grad_enabled()
        loss = _fused(z, x, mask, ids, RTANH, False, alpha, beta, 0.0, reduction, need_grad, name)
    return loss[0] if was_1d and reduction == "none" else loss


# Plain tensors, and the ones PyTorch traces with (torch.export, torch.compile): the fused
# op's fake implementation serves those. Other subclasses (DTensor, a user's) go to torch.
_DROPIN_TYPES = (torch.Tensor, nn.Parameter, *_TRACING_TENSORS)


def _native_dropin(input, target, eps) -> bool:
    """Whether poisson_nll_loss can use the fused op (else torch's own implementation)."""
    return (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)
            and type(input) in _DROPIN_TYPES and type(target) in _DROPIN_TYPES
            and not isinstance(eps, torch.Tensor)
            and input.dtype in _FLOATS and target.dtype == input.dtype
            and input.shape == target.shape and input.numel() > 0
            and input.device == target.device and not target.requires_grad
            and not transformed(input, target))


def poisson_nll_loss(input: torch.Tensor, target: torch.Tensor, log_input: bool = True,
                     full: bool = False, size_average=None, eps: float = 1e-8, reduce=None,
                     reduction: str = "mean", *, backend: str = "auto") -> torch.Tensor:
    """Drop-in for :func:`torch.nn.functional.poisson_nll_loss` on the fused kernels (the
    same arguments, in torch's order, and results; the kernels and the traffic they save: the
    module docstring).

    Per element, in nats: ``log_input=True``: ``exp(input) - target * input``; ``False``:
    ``input - target * log(input + eps)``; ``full=True`` adds Stirling's term
    ``target*log(target) - target + 0.5*log(2*pi*target)`` where ``target > 1``.

    Args:
        input: any shape, fp32 / bf16 / fp16 / fp64: the log-rate (``log_input``) or the rate.
        target: counts (or any non-negative values), the same shape and dtype to run fused.
        log_input, full, eps: as torch (``eps`` a finite number, used with
            ``log_input=False``; a tensor ``eps`` runs torch's implementation).
        size_average, reduce: torch's deprecated aliases of ``reduction`` (None or bools).
        reduction: ``"mean"`` (over all elements), ``"sum"`` or ``"none"`` (``input``'s shape).
        backend: keyword only: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``.

    Same-shape, same-dtype tensors run fused, in fp32 arithmetic (bf16/fp16 results are
    therefore at least as accurate as torch's); anything else (broadcasting, mixed dtypes, a
    target that requires grad, empty tensors, tensor subclasses, ``torch.func`` transforms
    and forward-mode AD), ``backend="torch"`` and ``auto`` without a kernel call torch's own
    implementation. Unlike torch's, the fused loss has no double backward: a backward with
    ``create_graph=True`` raises ``RuntimeError`` (it cannot be foreseen at the forward, and
    saving the input for it would double the loss's memory); pass ``backend="torch"`` for
    gradients of gradients.

    Returns:
        the loss in ``input``'s dtype: 0-d, or ``input``'s shape for ``"none"``.

    Raises:
        ValueError: an unknown ``reduction`` or ``backend``, a non-finite ``eps``; torch's
            own errors where it runs.
        TypeError: a non-numeric ``eps``; a ``size_average`` or ``reduce`` that is not None or
            a bool (an ``eps`` or ``reduction`` given in the 5th or 7th place: torch's order
            puts those two there).
        RuntimeError: a backend that cannot run here.
    """
    op = "poisson_nll_loss"
    for name, v in (("size_average", size_average), ("reduce", reduce)):
        if not (v is None or isinstance(v, bool)):
            raise TypeError(f"{op}: {name} must be None or a bool (torch's deprecated "
                            f"argument), got {v!r}; the arguments follow torch's order "
                            "(input, target, log_input, full, size_average, eps, reduce, "
                            "reduction): pass eps= and reduction= by keyword")
    if not isinstance(eps, torch.Tensor):
        eps = check_number(eps, "eps", op, "a finite number", low=-_FP64_MAX, high=_FP64_MAX)
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    _check_choices(reduction, backend, op)
    name = resolve(backend, input.device.type, op) if isinstance(input, torch.Tensor) else "torch"
    if name == "torch" or not _native_dropin(input, target, eps):
        return F.poisson_nll_loss(input, target, log_input=log_input, full=full, eps=eps,
                                  reduction=reduction)
    # A dense input in another memory format (channels_last) is read in its own order: no
    # copy, and a "none" result with the input's strides, as torch's elementwise loss gives.
    order = _memory_order(input)
    inp, tgt = (input, target) if order is None else (input.permute(order), target.permute(order))
    z = inp.reshape(1, -1)
    need_grad = z.requires_grad and torch.is_grad_enabled()
    loss = _fused(z, tgt.reshape(1, -1), None, None, LOG if log_input else LINEAR,
                  bool(full), 0.0, 1.0, eps, reduction, need_grad, name)
    loss = loss.to(input.dtype)
    if reduction != "none":
        return loss
    loss = loss.reshape(inp.shape)
    return loss if order is None else loss.permute(sorted(range(len(order)), key=order.__getitem__))


def _memory_order(t: torch.Tensor) -> list[int] | None:
    """The permutation of ``t``'s dimensions in which a non-contiguous but dense ``t`` is
    contiguous (e.g. NHWC for a channels_last NCHW tensor); None when ``t`` is contiguous or
    has no such order (a strided view: reshape copies it)."""
    if t.is_contiguous() or t.dim() < 2:
        return None
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d)))
    return order if t.permute(order).is_contiguous() else None


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class RectifiedTanh(nn.Module):
    """``alpha * relu(tanh(z / beta))`` (:func:`rectified_tanh`), any shape, in ``z``'s dtype:
    the decoder's output activation (arXiv:2605.31562, model; paper Table 5 compares it with
    ReLU). Raises ``ValueError`` for ``|alpha| > 80`` or ``beta < 1e-3`` (or non-numbers)."""

    def __init__(self, alpha: float = ALPHA, beta: float = BETA):
        super().__init__()
        self.alpha, self.beta = _check_alpha_beta(alpha, beta, type(self).__name__)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return rectified_tanh(z, self.alpha, self.beta)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.6g}, beta={self.beta:.6g}"


class RectifiedTanhPoissonNLLLoss(nn.Module):
    """:func:`rectified_tanh_poisson_nll` as a module: ``forward(logits [B, G], target [B, G],
    gene_mask=None)`` -> fp32 loss (arXiv:2605.31562, loss). Arguments, shapes and errors as
    the function; the constructor raises ``ValueError`` for a bad ``alpha``, ``beta``,
    ``reduction`` or ``backend``."""

    def __init__(self, alpha: float = ALPHA, beta: float = BETA, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        _check_choices(reduction, backend, type(self).__name__)
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
    :func:`poisson_nll_loss`: ``forward(log_input, target)``, shapes, dtypes, results and
    errors as that function (the constructor checks ``reduction``, ``backend`` and ``eps``)."""

    def __init__(self, log_input: bool = True, full: bool = False, size_average=None,
                 eps: float = 1e-8, reduce=None, reduction: str = "mean", backend: str = "auto"):
        super().__init__(log_input, full, size_average, eps, reduce, reduction)
        _check_choices(self.reduction, backend, type(self).__name__)
        self.eps = check_number(eps, "eps", type(self).__name__, "a finite number",
                                low=-_FP64_MAX, high=_FP64_MAX)
        self.backend = backend

    def forward(self, log_input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of ``log_input`` (or the rate, ``log_input=False``) against ``target``."""
        return poisson_nll_loss(log_input, target, log_input=self.log_input, full=self.full,
                                eps=self.eps, reduction=self.reduction, backend=self.backend)
