"""Compact description of which genes each sample's dataset profiles ("observable genes").

A corpus mixes datasets that each measure only part of the gene vocabulary; a sample's genes
are drawn from, and its loss taken over, the genes its dataset profiles (arXiv:2605.31562 §2,
§4). Rather than a ``[B, G]`` mask per batch, the ops take a per-dataset table plus each row's
dataset id:

* :class:`ObservableGenes` — built once per corpus: ``mask [D, G]`` bool and the same sets as
  sorted id lists in CSR form (``indptr [D+1]`` int64, ``genes [nnz]`` int32), which the
  sampler needs to draw "the j-th observable gene" in O(1).
* :class:`RowGeneMask` — ``(mask [D, G] bool, dataset_ids [B] int)``: what
  :func:`txfm_kernels.rectified_tanh_poisson_nll` accepts as ``gene_mask`` and what
  :func:`txfm_kernels.masked_sample` returns as its ``gene_mask``. Row ``b`` keeps gene ``g``
  iff ``mask[dataset_ids[b], g]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from ._common import as_int, check_int, check_row_ids


class RowGeneMask(NamedTuple):
    """Row ``b`` keeps gene ``g`` iff ``mask[dataset_ids[b], g]``; never materialises ``[B, G]``.

    Fields:
        mask: ``[D, G]`` bool, one row per dataset (:attr:`ObservableGenes.mask`).
        dataset_ids: ``[B]`` int32 or int64, each row's dataset, in ``[0, D)``; on the device
            of ``mask``.

    The ops that take it (``gene_mask=`` of :func:`txfm_kernels.rectified_tanh_poisson_nll`)
    check it and name the argument: a ``TypeError`` for a float or bool ``dataset_ids`` or a
    non-bool ``mask``, a ``ValueError`` for a length other than ``B`` or (on CPU tensors) an id
    outside ``[0, D)``. Source: the loss over observable genes, arXiv:2605.31562 §2, §4.
    """

    mask: torch.Tensor  # [D, G] bool
    dataset_ids: torch.Tensor  # [B] int32 or int64, values in [0, D)

    def dense(self) -> torch.Tensor:
        """The equivalent ``[B, G]`` bool mask (for references and debugging).

        Float ids raise a ``TypeError``. A dataset id outside ``[0, D)`` raises a ``ValueError``
        on CPU tensors; on GPU tensors (no host check, it would synchronise) it is torch's
        out-of-bounds index error, negative ids included (they never wrap around to the last
        rows).
        """
        n = self.mask.shape[0]
        if self.dataset_ids.is_floating_point() or self.dataset_ids.dtype == torch.bool:
            raise TypeError(f"RowGeneMask.dataset_ids must be an integer tensor, got "
                            f"{self.dataset_ids.dtype}")
        ids = self.dataset_ids.long()
        check_row_ids(ids, n, "RowGeneMask.dataset_ids")
        return self.mask[torch.where(ids < 0, n, ids)]


@dataclass(frozen=True)
class ObservableGenes:
    """Per-dataset observable genes of a corpus with ``D`` datasets and ``G`` genes.

    Fields (build them with :meth:`from_mask`, :meth:`from_lists` or :meth:`all_genes`, on the
    device the ops run on):
        mask: ``[D, G]`` bool, ``mask[d, g]`` iff dataset ``d`` profiles gene ``g``.
        indptr: ``[D + 1]`` int64, CSR offsets into ``genes`` (``indptr[0] = 0``).
        genes: ``[nnz]`` int32, each dataset's gene ids, sorted, ``nnz = mask.sum()``.

    Raises:
        TypeError: a field of another dtype or shape.
        ValueError: ``D = 0`` or ``G = 0`` (no dataset row for the kernels to read).

    Source: genes drawn from, and the loss taken over, a sample's observable genes
    (arXiv:2605.31562 §2, §4).
    """

    mask: torch.Tensor  # [D, G] bool
    indptr: torch.Tensor  # [D + 1] int64
    genes: torch.Tensor  # [nnz] int32, sorted within each dataset

    def __post_init__(self):
        if self.mask.dtype != torch.bool or self.mask.dim() != 2:
            raise TypeError(f"ObservableGenes.mask must be a [D, G] bool tensor, got "
                            f"{self.mask.dtype} of shape {tuple(self.mask.shape)}")
        if self.indptr.dtype != torch.int64 or self.indptr.shape != (self.mask.shape[0] + 1,):
            raise TypeError(f"ObservableGenes.indptr must be int64 of shape [D+1] = "
                            f"[{self.mask.shape[0] + 1}], got {self.indptr.dtype} "
                            f"{tuple(self.indptr.shape)}; build it with from_mask()/from_lists()")
        if self.genes.dtype != torch.int32 or self.genes.dim() != 1:
            raise TypeError("ObservableGenes.genes must be a 1-D int32 tensor; build it with "
                            "from_mask()/from_lists()")
        if self.mask.shape[0] < 1 or self.mask.shape[1] < 1:
            # the kernels index row dataset_ids[b] of the table: an empty one has no row to read
            raise ValueError(f"ObservableGenes needs at least one dataset and one gene, got a "
                             f"[D, G] = {list(self.mask.shape)} table; every row's dataset must "
                             f"be in it (ObservableGenes.all_genes(G) when all rows see every gene)")

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "ObservableGenes":
        """From a ``[D, G]`` bool mask (or ``[G]`` for a single dataset), on its device.
        Raises ``TypeError`` for another dtype or shape, ``ValueError`` for ``D = 0`` or ``G = 0``."""
        mask = torch.as_tensor(mask)
        if mask.dim() == 1:
            mask = mask[None]
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise TypeError(f"mask must be [D, G] bool, got {mask.dtype} {tuple(mask.shape)}")
        counts = mask.sum(1)
        indptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
        indptr[1:] = torch.cumsum(counts, 0)
        genes = mask.nonzero()[:, 1].to(torch.int32)  # row-major order: sorted per dataset
        return cls(mask, indptr, genes)

    @classmethod
    def from_lists(cls, gene_lists: Sequence[Sequence[int]], n_genes: int) -> "ObservableGenes":
        """From one list of observable gene ids per dataset (duplicates are ignored); CPU.

        Raises:
            ValueError: ``n_genes`` not an int >= 1, no dataset, or an id outside
                ``[0, n_genes)``.
            TypeError: an id that is not an integer (``0.5``, ``True``).
        """
        n_genes = as_int(n_genes)
        check_int(n_genes, "n_genes", "ObservableGenes.from_lists", 1)
        if len(gene_lists) == 0:
            raise ValueError("ObservableGenes.from_lists: gene_lists is empty; give one list of "
                             "gene ids per dataset")
        mask = torch.zeros(len(gene_lists), n_genes, dtype=torch.bool)
        for d, ids in enumerate(gene_lists):
            ids = torch.as_tensor(ids)
            if ids.numel() and (ids.is_floating_point() or ids.is_complex()
                                or ids.dtype == torch.bool):
                # as_tensor(..., dtype=int64) would truncate 0.5 to gene 0 silently
                raise TypeError(f"gene_lists[{d}] must hold integer gene ids, got {ids.dtype}")
            ids = ids.to(torch.int64)
            if ids.numel() and (ids.min() < 0 or ids.max() >= n_genes):
                raise ValueError(f"gene_lists[{d}] has ids outside [0, {n_genes})")
            mask[d, ids] = True
        return cls.from_mask(mask)

    @classmethod
    def all_genes(cls, n_genes: int, device: torch.device | str = "cpu") -> "ObservableGenes":
        """One dataset that profiles every one of ``n_genes`` genes, on ``device``."""
        n_genes = as_int(n_genes)
        check_int(n_genes, "n_genes", "ObservableGenes.all_genes", 1)
        return cls.from_mask(torch.ones(1, n_genes, dtype=torch.bool, device=device))

    @property
    def n_datasets(self) -> int:
        """``D``, the number of datasets (rows of :attr:`mask`)."""
        return self.mask.shape[0]

    @property
    def n_genes(self) -> int:
        """``G``, the vocabulary size (columns of :attr:`mask`)."""
        return self.mask.shape[1]

    def counts(self) -> torch.Tensor:
        """``[D]`` int64: number of observable genes of each dataset."""
        return self.indptr[1:] - self.indptr[:-1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ObservableGenes":
        """A copy on ``device`` (``non_blocking`` as :meth:`torch.Tensor.to`)."""
        return ObservableGenes(self.mask.to(device, non_blocking=non_blocking),
                               self.indptr.to(device, non_blocking=non_blocking),
                               self.genes.to(device, non_blocking=non_blocking))

    def row_mask(self, dataset_ids: torch.Tensor) -> RowGeneMask:
        """The Poisson loss's ``gene_mask`` for rows of datasets ``dataset_ids [B]`` (int):
        row ``b`` keeps the genes its dataset profiles."""
        return RowGeneMask(self.mask, dataset_ids)
