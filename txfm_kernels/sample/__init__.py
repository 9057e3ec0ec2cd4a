"""Sparse-to-dense masked sampling: a CSR batch of raw counts -> encoder inputs + dense target.

For row ``b`` (a cell or bulk sample) with counts ``c`` over its non-zero genes (CSR row) and
observable genes ``O_b`` (its dataset's profiled genes; the masking of arXiv:2605.31562 §2)::

    S_b                    = sum_i c_i                                (library_size [B], fp32)
    x_bg                   = log1p(L * c_g / S_b)   (0 if S_b == 0)      (target [B, G], fp32)
    gene_ids[b, :]         = K genes drawn from O_b without replacement        ([B, K], int32)
    values[b, j]           = x_{b, gene_ids[b, j]}  (0 where not expressed)     ([B, K], fp32)
    key_padding_mask[b, j] = j >= |O_b|  (padded slots: gene 0, value 0)        ([B, K], bool)

``L`` is ``target_sum`` (default 1e5; the name of scanpy's ``normalize_total``), the same for
every row; ``S_b``, each row's total count, is what :class:`MaskedSample` calls
``library_size``.

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
torch on CPU). Files: ``triton.py`` (the Triton kernel), ``native.py`` (the C++ and CUDA
libraries of ``csrc/sample/``), ``reference.py`` (the torch reference, the weighted draw, the
input checks as torch ops); this file checks arguments and holds the ``torch.library`` ops,
the function and :class:`MaskedSample`.

Validation: ``validate=None`` checks CPU inputs (O(nnz), fused into the cpu kernel's pass over
each row) and trusts GPU inputs (a check would sync); ``True`` checks GPU inputs too (torch
ops, one sync) and the observable lists against their mask; ``False`` trusts the values (counts,
dataset ids: clamped) but on the cpu backend still checks the row pointers and gene indices
(torch ops), since its kernel writes ``dense[index]`` unclamped and a damaged CSR would crash
the process.
Checked: indptr starts at 0, is non-decreasing and ends at nnz; indices in ``[0, n_genes)``
and strictly increasing per row; counts finite and >= 0; dataset ids in range; the observable
table's CSR pointers. Unvalidated input never makes the GPU kernels read or write outside
their buffers (row bounds, dataset ids and gene ids are clamped or masked), it only gives
unspecified values; the observable table itself is trusted (``ObservableGenes.from_mask``
builds it consistent). Under ``torch.compile`` the table's pointer check and the check of
``gene_weights`` are skipped (they read tensor values).

torch.compile (``fullgraph=True``, ``dynamic=True`` too): a call is one node, the custom op
``txfm::masked_sample`` (uniform draw into new outputs) or ``txfm::masked_sample_into``
(``out=`` or ``tau != 0``); ``seed``, ``offset``, ``k``, ``target_sum`` and ``tau`` may be
Python variables that change between calls. New shapes and ints (``seed``, ``offset``, ``k``)
reuse the compiled graph; a new value of a float (``target_sum``, ``tau``) recompiles once
under inductor, which specialises floats that reach a custom op. In eager mode the
``out=``/``tau`` path runs the same code without the custom-op dispatch.
"""
from __future__ import annotations

import struct
import warnings
from typing import NamedTuple

import torch

from .. import _pool
from .._common import (BACKENDS, Number, as_int, backend_module, check_choice, check_fits,
                       check_int, check_number, check_same_device, check_tensor, op_backend,
                       resolve, shown, traced)
from ..masks import ObservableGenes, RowGeneMask
from . import reference
from .reference import Call, call_key

__all__ = ["MaskedSample", "masked_sample", "call_key", "TARGET_SUM", "TARGET_SUM_RANGE",
           "TAU_LIMIT"]

_OP = "masked_sample"
TARGET_SUM = 1e5  # default L of log1p(L * c / S)
# target_sum's accepted [low, high]: an fp32 number; a smaller one rounds to 0 in fp32
TARGET_SUM_RANGE = (float(torch.finfo(torch.float32).tiny), float(torch.finfo(torch.float32).max))
TAU_LIMIT = 100.0  # |tau| * log(cells) stays far inside fp32 for any corpus
# built here: under torch.compile a module float is symbolic, and an f-string of it breaks the graph
_TAU_WHAT = f"finite with |tau| <= {TAU_LIMIT:g}"
_M64 = (1 << 64) - 1
_COUNT_DTYPES = (torch.float32, torch.int32, torch.int16, torch.uint16, torch.uint8)  # read as is


class MaskedSample(NamedTuple):
    """Result of :func:`masked_sample` (``B`` rows, ``K`` slots, ``G`` genes), on the input device.

    * ``gene_ids [B, K]`` int32: drawn genes, distinct and observable per row, in draw order;
      ``0`` in padded slots.
    * ``values [B, K]`` fp32: ``log1p(L * c / S)`` of those genes (0 where not expressed or
      padded), ``L`` = ``target_sum``.
    * ``key_padding_mask [B, K]`` bool: True in slots beyond the row's number of observable genes.
    * ``target [B, G]`` fp32 or None: the dense log1p-normalised rows (``return_target``).
    * ``gene_mask``: None when every gene is observable, else
      :class:`~txfm_kernels.masks.RowGeneMask` ``(observable.mask, dataset_ids)``, which the
      Poisson loss takes as its ``gene_mask``.
    * ``library_size [B]`` fp32: ``S``, the sum of each row's counts.
    """

    gene_ids: torch.Tensor
    values: torch.Tensor
    key_padding_mask: torch.Tensor
    target: torch.Tensor | None
    gene_mask: RowGeneMask | None
    library_size: torch.Tensor

    @property
    def pad_mask(self) -> torch.Tensor:
        """Deprecated name of :attr:`key_padding_mask` (a ``DeprecationWarning``)."""
        import warnings

        warnings.warn("MaskedSample.pad_mask is deprecated: use .key_padding_mask (the same "
                      "mask, torch's name)", DeprecationWarning, stacklevel=2)
        return self.key_padding_mask


# ---------------------------------------------------------------------------------------------
# Argument checks (compile-safe: no tensor values are read here)
# ---------------------------------------------------------------------------------------------
def _tensor(name: str, t, ndim: int = 1) -> torch.Tensor:
    check_tensor(t, name, _OP)
    if t.dim() != ndim:
        raise ValueError(f"{_OP}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t.contiguous()


def _check_counts(counts: torch.Tensor) -> torch.Tensor:
    if counts.dtype in _COUNT_DTYPES:
        return counts
    if counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError(f"{_OP}: counts must be a real number dtype (float32, int32, int16, "
                        f"uint16 or uint8 are read directly), got {counts.dtype}")
    return counts.to(torch.float32)  # float64/float16/bfloat16/int64/int8: one conversion copy


_INT_WEIGHTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_inputs(indptr, indices, counts, n_genes, k, observable, dataset_ids, gene_weights,
                  tau):
    """-> (indptr int64, indices, counts, dataset_ids or None), contiguous, on one device."""
    indptr = _tensor("indptr", indptr)
    indices = _tensor("indices", indices)
    counts = _tensor("counts", counts)
    if indptr.dtype == torch.int32:
        indptr = indptr.long()
    check_tensor(indptr, "indptr", _OP, (torch.int64,), desc="int64 (or int32)")
    check_tensor(indices, "indices", _OP, (torch.int32,), hint="pass indices.to(torch.int32)")
    if counts.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{_OP}: counts must not require grad (the draw is not differentiable); "
                         "pass counts.detach()")
    counts = _check_counts(counts)
    _check_op_args(indptr, indices, counts, None, None, None, n_genes, k, _OP)
    device = indptr.device
    B = indptr.shape[0] - 1
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
        if dataset_ids is None and observable.n_datasets > 1:
            raise ValueError(f"{_OP}: observable has {observable.n_datasets} datasets, so "
                             f"dataset_ids [B] (each row's dataset) is required")
    if dataset_ids is not None and observable is not None:
        dataset_ids = _tensor("dataset_ids", dataset_ids)
        check_tensor(dataset_ids, "dataset_ids", _OP, (torch.int32, torch.int64))
        if dataset_ids.shape[0] != B or dataset_ids.device != device:
            raise ValueError(f"{_OP}: dataset_ids must have B={B} entries on {device}, got "
                             f"{dataset_ids.numel()} on {dataset_ids.device}")
    else:
        dataset_ids = None  # without observable every row sees every gene
    if tau != 0:
        if gene_weights is None:
            raise ValueError(f"{_OP}: tau={tau} needs gene_weights [n_genes] (e.g. the number "
                             f"of training samples expressing each gene)")
        gene_weights = _tensor("gene_weights", gene_weights)
        if gene_weights.dtype in _INT_WEIGHTS:  # counts such as loader.gene_nnz (m_i)
            gene_weights = gene_weights.to(torch.float32)
        if gene_weights.shape[0] != n_genes or not gene_weights.is_floating_point() \
                or gene_weights.device != device:
            raise ValueError(f"{_OP}: gene_weights must be a float or integer tensor of "
                             f"n_genes={n_genes} entries on {device}, got {gene_weights.dtype} "
                             f"{tuple(gene_weights.shape)} on {gene_weights.device}")
    return indptr, indices, counts, dataset_ids, gene_weights


def _check_values(observable, gene_weights, tau, n_genes: int, check: bool, deep: bool) -> None:
    """The checks that read tensor values: outside tracing only (see the module docstring)."""
    if not check or traced(*([gene_weights] if gene_weights is not None else [])):
        return
    if observable is not None:
        reference.check_observable(observable, n_genes, deep=deep)
    if tau != 0 and not bool((torch.isfinite(gene_weights) & (gene_weights > 0)).all()):
        raise ValueError(f"{_OP}: gene_weights must be finite and > 0 (add a pseudo-count to "
                         f"genes never expressed)")


def _check_out(out: MaskedSample, B, k, n_genes, return_target: bool, device) -> None:
    if not isinstance(out, MaskedSample):
        raise TypeError(f"{_OP}: out must be a MaskedSample (e.g. one this op returned), got "
                        f"{type(out).__name__}")
    _check_outputs((out.gene_ids, out.values, out.key_padding_mask,
                    out.target if return_target else None, out.library_size),
                   B, k, n_genes, device, _OP, "out.")


def _check_outputs(outs, B, k, n_genes, device, op: str, prefix: str) -> None:
    """``outs`` = (gene_ids, values, key_padding_mask, target or None, library_size): each of
    the dtype, shape and device the kernels write, contiguous."""
    want = _new_outputs(0, 0, 0, True, "meta", pooled=False)
    shapes = [(B, k), (B, k), (B, k), (B, n_genes), (B,)]
    names = ("gene_ids", "values", "key_padding_mask", "target", "library_size")
    for name, t, w, shape in zip(names, outs, want, shapes):
        if name == "target" and t is None:
            continue
        if (not isinstance(t, torch.Tensor) or t.dtype != w.dtype or tuple(t.shape) != shape
                or t.device != device or not t.is_contiguous()):
            raise ValueError(f"{op}: {prefix}{name} must be a contiguous {w.dtype} tensor of "
                             f"shape {shape} on {device}")


_DIRECT = "torch.ops.txfm.masked_sample"


def _check_op_args(indptr, indices, counts, obs_indptr, obs_genes, dataset_ids, n_genes, k,
                   op: str = _DIRECT) -> None:
    """The ops' contract, checked again in their bodies: a direct ``torch.ops.txfm`` call skips
    :func:`masked_sample`'s checks and its conversions, and the kernels would otherwise read
    or write past a buffer whose size or dtype disagrees. Metadata only (no tensor value is
    read, nothing syncs), so the public function's second pass through it costs microseconds."""
    check_tensor(indptr, "indptr", op, (torch.int64,), hint="pass indptr.long()")
    check_tensor(indices, "indices", op, (torch.int32,), hint="pass indices.int()")
    check_tensor(counts, "counts", op, _COUNT_DTYPES, hint="pass counts.float()")
    for name, t in (("indptr", indptr), ("indices", indices), ("counts", counts)):
        if t.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if indptr.numel() < 1:
        raise ValueError(f"{op}: indptr must have B + 1 >= 1 entries, got none")
    if counts.numel() != indices.numel():
        raise ValueError(f"{op}: counts has {counts.numel()} entries but indices has "
                         f"{indices.numel()}; they must be the CSR data and indices of one matrix")
    check_int(n_genes, "n_genes", op, 1, 2**31)
    check_int(k, "k", op, 1, what=" (genes shown per row)")
    if (obs_indptr is None) != (obs_genes is None):
        raise ValueError(f"{op}: obs_indptr and obs_genes come together (an ObservableGenes' "
                         f"indptr and genes), or neither")
    named = {"indptr": indptr, "indices": indices, "counts": counts}
    if obs_indptr is not None:
        check_tensor(obs_indptr, "obs_indptr", op, (torch.int64,))
        check_tensor(obs_genes, "obs_genes", op, (torch.int32,))
        if obs_indptr.dim() != 1 or obs_indptr.numel() < 2 or obs_genes.dim() != 1:
            raise ValueError(f"{op}: obs_indptr must be [D + 1] with D >= 1 and obs_genes 1-D "
                             f"(ObservableGenes.indptr and .genes), got shapes "
                             f"{tuple(obs_indptr.shape)} and {tuple(obs_genes.shape)}")
        named.update(obs_indptr=obs_indptr, obs_genes=obs_genes)
    if dataset_ids is not None:
        if obs_indptr is None:
            raise ValueError(f"{op}: dataset_ids index the observable table, so they need "
                             f"obs_indptr and obs_genes")
        check_tensor(dataset_ids, "dataset_ids", op, (torch.int32, torch.int64))
        if tuple(dataset_ids.shape) != (indptr.numel() - 1,):
            raise ValueError(f"{op}: dataset_ids must have shape [B] = ({indptr.numel() - 1},), "
                             f"got {tuple(dataset_ids.shape)}")
        named["dataset_ids"] = dataset_ids
    check_same_device(op, "indptr", **named)


# ---------------------------------------------------------------------------------------------
# The draw: the bodies of the custom ops (never traced: real tensors and numbers)
# ---------------------------------------------------------------------------------------------
def _new_outputs(B, k, n_genes, return_target: bool, device, pooled: bool = True):
    """(gene_ids, values, key_padding_mask, target ([B, 0] without return_target), library_size);
    a CPU target from the buffer pool unless ``pooled`` is False (fake tensors, symbolic B)."""
    pooled = pooled and return_target and torch.device(device).type == "cpu"
    return (torch.empty(B, k, dtype=torch.int32, device=device),
            torch.empty(B, k, dtype=torch.float32, device=device),
            torch.empty(B, k, dtype=torch.bool, device=device),
            (_pool.cpu_empty((B, n_genes), torch.float32) if pooled else
             torch.empty(B, n_genes if return_target else 0, dtype=torch.float32, device=device)),
            torch.empty(B, dtype=torch.float32, device=device))


def _call(indptr, indices, counts, obs_indptr, obs_genes, dataset_ids, n_genes: int, k: int,
          target_sum: float, seed: int, offset: int, op: str = _DIRECT) -> Call:
    """The backends' argument bundle: the call's key, ``target_sum`` rounded to fp32."""
    _check_op_args(indptr, indices, counts, obs_indptr, obs_genes, dataset_ids, n_genes, k, op)
    indptr, indices, counts = indptr.contiguous(), indices.contiguous(), counts.contiguous()
    k0, k1 = call_key(seed, offset)
    target_sum = struct.unpack("f", struct.pack("f", target_sum))[0]  # the kernels take fp32
    return Call(indptr, indices, counts, obs_indptr, obs_genes, dataset_ids, n_genes, k,
                target_sum, k0, k1)


def _fill(c: Call, backend: str, validate: bool, mask, gene_weights, tau: float, ids, values,
          pad, target, libsize) -> None:
    """Draw into the outputs: uniformly with ``backend``, or weighted (``tau != 0``, torch)."""
    if tau == 0:
        name = op_backend(backend, c.indptr.device.type, "sample")
        if name == "cpu" and not validate and not traced(c.indptr):
            reference.check_structure(c)  # validate=False trusts values, never memory safety
        backend_module(__name__, name).fill(c, ids, values, pad, target, libsize, validate, name)
        return
    if validate:
        reference.check_input(c)
    reference.fill_weighted(c, mask, gene_weights, tau, ids, values, pad, target, libsize)


# ---------------------------------------------------------------------------------------------
# torch.library ops, so that torch.compile keeps a call as one node
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("txfm::masked_sample", mutates_args=())
def _masked_sample_op(indptr: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
                      obs_indptr: torch.Tensor | None, obs_genes: torch.Tensor | None,
                      dataset_ids: torch.Tensor | None, n_genes: int, k: int,
                      target_sum: Number, seed: int, offset: int, return_target: bool,
                      validate: bool, backend: str, obs_mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor]:
    """Uniform draw; the target is ``[B, 0]`` when not requested (custom ops return tensors).

    ``obs_mask`` (the observable table's ``[D, G]`` mask) is not read: passing it keeps its
    size, which the argument checks equated with ``n_genes``, among the compiled graph's
    inputs (inductor would otherwise name a size it cannot bind).
    """
    c = _call(indptr, indices, counts, obs_indptr, obs_genes, dataset_ids, n_genes, k,
              target_sum, seed, offset)
    outs = _new_outputs(indptr.numel() - 1, k, n_genes, return_target, indptr.device)
    ids, values, pad, target, libsize = outs
    _fill(c, backend, validate, None, None, 0.0, ids, values, pad,
          target if return_target else None, libsize)
    return outs


@_masked_sample_op.register_fake
def _(indptr, indices, counts, obs_indptr, obs_genes, dataset_ids, n_genes, k, target_sum,
      seed, offset, return_target, validate, backend, obs_mask=None):
    return _new_outputs(indptr.shape[0] - 1, k, n_genes, return_target, indptr.device,
                        pooled=False)


def _into(indptr: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
          obs_indptr: torch.Tensor | None, obs_genes: torch.Tensor | None,
          obs_mask: torch.Tensor | None, dataset_ids: torch.Tensor | None,
          gene_weights: torch.Tensor | None, n_genes: int, k: int, target_sum: Number, seed: int,
          offset: int, tau: Number, validate: bool, backend: str, gene_ids: torch.Tensor,
          values: torch.Tensor, key_padding_mask: torch.Tensor, target: torch.Tensor | None,
          library_size: torch.Tensor) -> None:
    """Uniform (``tau == 0``) or weighted draw into preallocated outputs."""
    op = "torch.ops.txfm.masked_sample_into"
    c = _call(indptr, indices, counts, obs_indptr, obs_genes, dataset_ids, n_genes, k,
              target_sum, seed, offset, op)
    _check_outputs((gene_ids, values, key_padding_mask, target, library_size),
                   indptr.shape[0] - 1, k, n_genes, indptr.device, op, "")
    if tau != 0:  # the weighted draw reads the weights and the [D, G] mask
        if (not isinstance(gene_weights, torch.Tensor) or not gene_weights.is_floating_point()
                or tuple(gene_weights.shape) != (n_genes,)
                or gene_weights.device != indptr.device):
            raise ValueError(f"{op}: tau={tau} needs gene_weights, a float tensor of shape "
                             f"({n_genes},) on {indptr.device}")
        if obs_indptr is not None and (
                not isinstance(obs_mask, torch.Tensor) or obs_mask.dtype != torch.bool
                or tuple(obs_mask.shape) != (obs_indptr.numel() - 1, n_genes)
                or obs_mask.device != indptr.device):
            raise ValueError(f"{op}: tau={tau} with an observable table needs obs_mask, its "
                             f"bool [D, G] = ({obs_indptr.numel() - 1}, {n_genes}) mask, on "
                             f"{indptr.device}")
    _fill(c, backend, validate, obs_mask, gene_weights, tau, gene_ids, values, key_padding_mask,
          target, library_size)


_masked_sample_into_op = torch.library.custom_op(
    "txfm::masked_sample_into", _into,
    mutates_args=("gene_ids", "values", "key_padding_mask", "target", "library_size"))


@_masked_sample_into_op.register_fake
def _(*args):
    return None


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def _int64(v):
    """A Python int as the signed int64 with the same low 64 bits (the custom ops' int); the
    key reduces it mod 2^64 either way. Under torch.compile the value is passed as it is (a
    symbolic int is an int64 already)."""
    return v if torch.compiler.is_compiling() else ((v & _M64) ^ (1 << 63)) - (1 << 63)


def masked_sample(indptr: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, *,
                  n_genes: int, k: int = 2048, observable: ObservableGenes | None = None,
                  dataset_ids: torch.Tensor | None = None, target_sum: float | None = None,
                  seed: int, offset: int = 0, tau: float = 0.0,
                  gene_weights: torch.Tensor | None = None, return_target: bool = True,
                  validate: bool | None = None, backend: str = "auto",
                  out: MaskedSample | None = None, library_size: float | None = None
                  ) -> MaskedSample:
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
        target_sum: ``L`` of ``log1p(L * c / sum(c))``, finite and > 0, used as fp32 (None:
            1e5). Each row's ``sum(c)`` is ``MaskedSample.library_size``.
        seed, offset: key of the counter-based draw (e.g. a run seed and the global step);
            row ``b`` is keyed by ``(seed, offset, b)``. Each an int64, in [-2^63, 2^63)
            (ValueError otherwise, in eager mode and under torch.compile alike).
        tau: 0 = uniform draw (bit-identical on every backend); otherwise genes are drawn
            with probability proportional to ``gene_weights ** tau`` (torch ops, see module doc).
        gene_weights: ``[G]`` positive weights (tau != 0 only): float, or integer counts such
            as ``loader.gene_nnz`` (m_i), converted to float32.
        return_target: also write the dense ``[B, G]`` target.
        validate: None = check CPU inputs, trust GPU inputs; True = check both (syncs on GPU);
            False = trust the values (the cpu backend still checks the CSR's structure).
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.
        out: optional preallocated :class:`MaskedSample` to write into (e.g. two alternated by
            a loader): saves the allocation and first-touch page faults of the target.
        library_size: deprecated alias of ``target_sum`` (a ``DeprecationWarning``; removed in
            the next release).

    Returns:
        :class:`MaskedSample` on the inputs' device.

    Raises:
        TypeError / ValueError naming the argument; ``ValueError`` naming the row for invalid
        CSR data (when validated), and naming ``k`` and ``B`` when the outputs (9 bytes per
        shown slot, 4 per target entry) exceed the device's whole memory; ``RuntimeError`` for
        a backend that cannot run here.

    >>> import torch
    >>> from txfm_kernels import masked_sample
    >>> indptr = torch.tensor([0, 2, 3]); indices = torch.tensor([1, 4, 0], dtype=torch.int32)
    >>> s = masked_sample(indptr, indices, torch.tensor([3.0, 1.0, 5.0]), n_genes=6, k=4, seed=0)
    >>> s.gene_ids.shape, s.target.shape, s.library_size.tolist()
    (torch.Size([2, 4]), torch.Size([2, 6]), [4.0, 5.0])
    """
    name_L = "target_sum"
    if library_size is not None:
        warnings.warn("masked_sample: library_size= is deprecated, pass target_sum= (the "
                      "normalisation constant L; MaskedSample.library_size is each row's total "
                      "count)", DeprecationWarning, stacklevel=2)
        if target_sum is not None:
            raise TypeError(f"{_OP}: pass target_sum only (library_size is its deprecated alias)")
        target_sum, name_L = library_size, "library_size"
    target_sum = check_number(TARGET_SUM if target_sum is None else target_sum, name_L, _OP,
                              "finite and > 0 (an fp32 number)", low=TARGET_SUM_RANGE[0],
                              high=TARGET_SUM_RANGE[1])
    n_genes, k, seed, offset = as_int(n_genes), as_int(k), as_int(seed), as_int(offset)
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
            raise TypeError(f"{_OP}: {name} must be an int{' (keyword)' if name == 'seed' else ''}"
                            f", got {v!r}")
        # the custom op's int is an int64, as under torch.compile: one range in both modes
        if isinstance(v, int) and not -2**63 <= v < 2**63:
            raise ValueError(f"{_OP}: {name} must fit in an int64, [-2^63, 2^63), got {shown(v)}")
    # tau * log(m) must stay finite in fp32 for every gene's m, or the keys tie at inf and
    # unobservable genes rank among the drawn ones
    tau = check_number(tau, "tau", _OP, _TAU_WHAT, low=-TAU_LIMIT, high=TAU_LIMIT)
    check_choice(backend, "backend", BACKENDS, _OP)
    for flag, v in (("return_target", return_target), ("validate", validate)):
        if not (isinstance(v, bool) or (flag == "validate" and v is None)):
            raise TypeError(f"{_OP}: {flag} must be True or False"
                            f"{' (or None)' if flag == 'validate' else ''}, got {v!r}")
    indptr, indices, counts, dataset_ids, gene_weights = _check_inputs(
        indptr, indices, counts, n_genes, k, observable, dataset_ids, gene_weights, tau)
    device = indptr.device
    name = resolve(backend, device.type, "sample")
    check = (device.type == "cpu") if validate is None else bool(validate)
    _check_values(observable, gene_weights, tau, n_genes, check, deep=validate is True)
    B = indptr.shape[0] - 1
    obs_indptr = obs_genes = obs_mask = gene_mask = None
    if observable is not None:
        obs_indptr, obs_genes, obs_mask = observable.indptr, observable.genes, observable.mask
        ds = dataset_ids if dataset_ids is not None else torch.zeros(
            B, dtype=torch.int32, device=device)
        gene_mask = RowGeneMask(observable.mask, ds)
    if out is None and not torch.compiler.is_compiling():
        # gene_ids, values, key_padding_mask [B, K], target [B, G], library_size [B]
        big_target = return_target and n_genes > 2 * k
        check_fits(B * (k * 9 + (4 * n_genes if return_target else 0) + 4), device, _OP,
                   f"B={B} rows of k={k} shown genes" + (f" and target [B, {n_genes}]"
                                                         if return_target else ""),
                   "pass return_target=False (the values alone) or fewer rows" if big_target
                   else "a row cannot show more than its observable genes, so pass a smaller "
                   "k (at most n_genes) or fewer rows")
    seed, offset = _int64(seed), _int64(offset)
    if out is None and tau == 0:
        ids, values, pad, target, libsize = _masked_sample_op(
            indptr, indices, counts, obs_indptr, obs_genes, dataset_ids, n_genes, k, target_sum,
            seed, offset, return_target, check, name, obs_mask)
        return MaskedSample(ids, values, pad, target if return_target else None, gene_mask,
                            libsize)
    if out is not None:
        _check_out(out, B, k, n_genes, return_target, device)
        outs = (out.gene_ids, out.values, out.key_padding_mask,
                out.target if return_target else None, out.library_size)
    else:
        ids, values, pad, target, libsize = _new_outputs(B, k, n_genes, return_target, device,
                                                         pooled=not torch.compiler.is_compiling())
        outs = (ids, values, pad, target if return_target else None, libsize)
    args = (indptr, indices, counts, obs_indptr, obs_genes, obs_mask, dataset_ids, gene_weights,
            n_genes, k, target_sum, seed, offset, tau, check, name) + outs
    # under torch.compile one node; in eager mode the same body without the op's dispatch
    (_masked_sample_into_op if torch.compiler.is_compiling() else _into)(*args)
    return MaskedSample(outs[0], outs[1], outs[2], outs[3], gene_mask, outs[4])
