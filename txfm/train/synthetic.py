"""An in-memory random CSR corpus with the :class:`txfm.data.ShardLoader` interface.

For tests, benchmarks and smoke runs that must not touch Zarr (``bench.train`` runs on GPU
machines without anndata/zarr): ``txfm train --data random`` or
``RandomCSRSource(n_cells=4096, n_genes=2000)``.

The counts have structure a model can learn: gene ``g`` of a cell of type ``t`` is
``Poisson(lib * softmax(mu + W[t])_g)`` with log-normal library sizes ``lib``, skewed gene
means ``mu`` and sparse per-type programs ``W``. Each of ``n_datasets`` datasets profiles a
random subset of the genes (its observable genes); counts outside it are zero.

Batching mirrors :class:`txfm.data.ShardLoader` (an exhausted epoch moves the source on to the
next; ``state_dict`` resumes mid-epoch) and its DDP split: each epoch is a seeded permutation of the cells cut
into micro-batches ``c = 0, 1, 2, ...``; rank ``r`` of ``world_size`` yields those with
``c % world_size == r``. So a ``world_size``-rank run whose step takes one micro-batch per rank
sees exactly the cells of a 1-rank run that accumulates ``world_size`` micro-batches per step.
"""
from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from txfm_kernels.masks import ObservableGenes


@dataclass
class MemoryBatch:
    """A CSR batch (same fields as ``txfm.data.CSRBatch``): rows are cells, columns genes."""

    indptr: torch.Tensor  # [B+1] int64
    indices: torch.Tensor  # [nnz] int32, sorted within each row
    counts: torch.Tensor  # [nnz] int32
    dataset_ids: torch.Tensor  # [B] int32
    cell_ids: torch.Tensor  # [B] int64
    obs: dict | None = None

    def __len__(self) -> int:
        return self.dataset_ids.shape[0]

    def to(self, device, non_blocking: bool = False) -> "MemoryBatch":
        return MemoryBatch(*(t.to(device, non_blocking=non_blocking) for t in (
            self.indptr, self.indices, self.counts, self.dataset_ids, self.cell_ids)), self.obs)

    def pin_memory(self) -> "MemoryBatch":
        return MemoryBatch(*(t.pin_memory() for t in (
            self.indptr, self.indices, self.counts, self.dataset_ids, self.cell_ids)), self.obs)


# RandomCSRSource's numeric arguments: name -> (integer?, the rule in words); and the keys of
# ``random:`` specs (parse_random_spec) -> argument names.
_MAX_LIBRARY = 1e7  # counts are int32: a cell's library stays far below 2**31
_ARGS = {
    "n_cells": (True, "an integer >= 1"),
    "n_genes": (True, "an integer >= 1"),
    "n_datasets": (True, "an integer >= 1"),
    "n_types": (True, "an integer >= 1"),
    "mean_library": (False, "a finite number > 0 (at most 1e7)"),
    "observed_fraction": (False, "a finite number > 0 and <= 1"),
    "seed": (True, "an integer >= 0"),
    "batch_size": (True, "an integer >= 1"),
}
_SPEC_KEYS = {"cells": "n_cells", "genes": "n_genes", "datasets": "n_datasets",
              "types": "n_types", "library": "mean_library", "observed": "observed_fraction",
              "seed": "seed"}


def _in_range(name: str, value) -> bool:
    """Whether ``value`` (already of the argument's type) is allowed for argument ``name``."""
    if name == "mean_library":
        return math.isfinite(value) and 0 < value <= _MAX_LIBRARY
    if name == "observed_fraction":
        return math.isfinite(value) and 0 < value <= 1
    return value >= (0 if name == "seed" else 1)


def _check_args(**values) -> None:
    """ValueError naming the first RandomCSRSource argument of the wrong type or range."""
    for name, value in values.items():
        integer, rule = _ARGS[name]
        ok_type = (isinstance(value, numbers.Integral) if integer
                   else isinstance(value, numbers.Real)) and not isinstance(value, bool)
        if not ok_type or not _in_range(name, value):
            raise ValueError(f"RandomCSRSource: {name} must be {rule}, got {value!r}")


class RandomCSRSource:
    """``n_cells`` random cells over ``n_genes`` genes, iterated in micro-batches of ``batch_size``.

    ``split="val"`` gives different cells (another seed) from the same genes and datasets.
    ``observed_fraction`` = share of the vocabulary each dataset profiles (first dataset: all;
    every dataset at least one gene). ``mean_library`` = mean counts per cell.

    Raises:
        ValueError: naming the argument: ``n_cells``, ``n_genes``, ``batch_size``,
            ``n_datasets`` or ``n_types`` not an integer >= 1; ``mean_library`` not a finite
            number in (0, 1e7]; ``observed_fraction`` not a finite number in (0, 1]; ``seed``
            not an integer >= 0; ``split`` not "train" or "val"; ``rank`` outside
            ``[0, world_size)``.
    """

    def __init__(self, n_cells: int = 4096, n_genes: int = 2000, batch_size: int = 32, *,
                 n_datasets: int = 2, n_types: int = 8, mean_library: float = 3000.0,
                 observed_fraction: float = 0.6, split: str = "train", shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, pin_memory: bool = False,
                 rank: int | None = None, world_size: int | None = None):
        _check_args(n_cells=n_cells, n_genes=n_genes, batch_size=batch_size,
                    n_datasets=n_datasets, n_types=n_types, mean_library=mean_library,
                    observed_fraction=observed_fraction, seed=seed)
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: use 'train' or 'val'")
        self.n_cells, self.n_genes, self.batch_size = int(n_cells), int(n_genes), int(batch_size)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.pin_memory = pin_memory
        self.rank = int(rank or 0)
        self.world_size = int(world_size or 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.epoch = 0
        self._position = 0  # micro-batches of this rank already yielded in this epoch

        corpus = np.random.default_rng(self.seed)  # shared by both splits: genes, datasets
        mu = corpus.normal(-1.0, 1.5, n_genes)
        programs = corpus.normal(0.0, 1.5, (n_types, n_genes)) * (corpus.random((n_types, n_genes)) < 0.2)
        obs = corpus.random((n_datasets, n_genes)) < observed_fraction
        obs[0] = True
        for d in np.flatnonzero(~obs.any(1)):  # a small observed_fraction: >= 1 gene each
            obs[d, corpus.integers(0, n_genes)] = True
        self.observable = ObservableGenes.from_mask(torch.from_numpy(obs))
        cells = np.random.default_rng([self.seed, 1 if split == "val" else 0])
        self.cell_type = cells.integers(0, n_types, n_cells)
        dataset = cells.integers(0, n_datasets, n_cells).astype(np.int32)
        lib = np.exp(cells.normal(np.log(mean_library), 0.5, n_cells))
        indptr, indices, counts = [np.zeros(1, np.int64)], [], []
        for start in range(0, n_cells, 512):  # bounded memory: 512 dense rows at a time
            sl = slice(start, min(start + 512, n_cells))
            logits = mu[None] + programs[self.cell_type[sl]]
            p = np.exp(logits - logits.max(1, keepdims=True)) * obs[dataset[sl]]
            rate = lib[sl, None] * p / p.sum(1, keepdims=True)
            c = cells.poisson(rate).astype(np.int32)
            r, g = np.nonzero(c)
            indices.append(g.astype(np.int32))
            counts.append(c[r, g])
            indptr.append(indptr[-1][-1] + np.cumsum(np.bincount(r, minlength=c.shape[0])))
        self._indptr = np.concatenate(indptr)
        self._indices = np.concatenate(indices)
        self._counts = np.concatenate(counts)
        self._dataset = dataset
        self.gene_nnz = torch.from_numpy(np.bincount(self._indices, minlength=n_genes).astype(np.int64))
        genes = [f"GENE{i:05d}" for i in range(n_genes)]
        digest = hashlib.sha256("\n".join(genes).encode()).hexdigest()
        self.manifest = SimpleNamespace(genes=genes, symbols=genes, vocab_hash=digest)

    # -- the ShardLoader interface ----------------------------------------------------------
    def _n_chunks(self) -> int:
        n = self.n_cells // self.batch_size if self.drop_last else -(-self.n_cells // self.batch_size)
        return n - n % self.world_size  # every rank the same number of micro-batches

    def __len__(self) -> int:
        return self._n_chunks() // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning at the next iteration."""
        self.epoch = int(epoch)
        self._position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self._position, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("world_size") != self.world_size:
            raise ValueError(f"RandomCSRSource state is for seed={state.get('seed')}, "
                             f"world_size={state.get('world_size')}; this source has "
                             f"seed={self.seed}, world_size={self.world_size}")
        self.epoch, self._position = int(state["epoch"]), int(state["position"])

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, 2, self.epoch]).permutation(self.n_cells)
        else:
            order = np.arange(self.n_cells)
        while self._position < len(self):
            chunk = self._position * self.world_size + self.rank
            rows = order[chunk * self.batch_size:(chunk + 1) * self.batch_size]
            self._position += 1
            batch = self._gather(rows)
            yield batch.pin_memory() if self.pin_memory else batch
        self.epoch, self._position = self.epoch + 1, 0  # like ShardLoader: on to the next epoch

    def _gather(self, rows: np.ndarray) -> MemoryBatch:
        starts, ends = self._indptr[rows], self._indptr[rows + 1]
        lens = ends - starts
        indptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lens, out=indptr[1:])
        src = np.arange(indptr[-1]) - np.repeat(indptr[:-1], lens) + np.repeat(starts, lens)
        return MemoryBatch(torch.from_numpy(indptr), torch.from_numpy(self._indices[src]),
                           torch.from_numpy(self._counts[src]),
                           torch.from_numpy(self._dataset[rows]),
                           torch.from_numpy(rows.astype(np.int64)))


def parse_random_spec(spec: str) -> dict:
    """``"random"`` or ``"random:cells=4096,genes=2000,datasets=2"`` -> RandomCSRSource kwargs.

    Keys (all optional): ``cells``, ``genes``, ``datasets``, ``types`` (integers >= 1),
    ``library`` (mean counts per cell: a finite number > 0, at most 1e7), ``observed`` (share
    of the genes each dataset profiles: a finite number > 0, at most 1) and ``seed`` (an
    integer >= 0). Empty items (``random:cells=64,``) are ignored.

    Raises:
        ValueError: ``spec`` is not ``random`` or ``random:key=value,...``; an item is not
            ``key=value``; a key is unknown (the message lists the valid ones) or given twice;
            a value is not of its key's type, not finite or out of its range. The message
            starts with ``--data SPEC:`` and names the key and its valid values.
    """
    head, _, tail = spec.partition(":")
    where = f"--data {spec}"
    if head != "random":
        raise ValueError(f"{where}: not a random data spec; use random or "
                         f"random:key=value,... with keys {', '.join(_SPEC_KEYS)}")
    out: dict = {}
    for item in filter(None, tail.split(",")):
        key, eq, value = (part.strip() for part in item.partition("="))
        if key not in _SPEC_KEYS:
            what = f"unknown key {key!r}" if eq else f"{item!r} is not key=value"
            raise ValueError(f"{where}: {what}; valid keys: {', '.join(_SPEC_KEYS)}")
        kwarg = _SPEC_KEYS[key]
        integer, rule = _ARGS[kwarg]
        if kwarg in out:
            raise ValueError(f"{where}: {key} is given twice")
        try:
            number = int(value) if integer else float(value)
        except ValueError:
            number = None
        if number is None or not _in_range(kwarg, number):
            raise ValueError(f"{where}: {key} must be {rule}" + ("" if value else
                                                                  " (no value given)"))
        out[kwarg] = number
    return out
