"""Streaming, shuffled CSR mini-batches from a shard collection: :class:`ShardLoader`.

How an epoch is made (deterministic for ``(seed, epoch, rank, world_size, lanes)``):

1. The split's cells are cut into *chunks* of ``chunk_size`` consecutive rows of one shard;
   the chunk order is a seeded permutation (``shuffle=True``) or the corpus order.
2. Concatenated in that order they form the epoch's cell sequence; rank ``r`` of ``W`` takes
   the contiguous part ``[N r / W, N (r + 1) / W)`` (so ranks are disjoint and, with
   ``drop_last``, all yield exactly ``(N // W) // batch_size`` batches).
3. A rank's part is cut into *windows* of ``buffer_size`` cells (a multiple of the batch
   size). A window is read with one ``pread`` per chunk and array, its rows are permuted
   (the in-memory shuffle buffer) and it is cut into batches.
4. With ``L`` DataLoader workers ("lanes") window ``j`` belongs to worker ``j mod L``; the
   DataLoader's round-robin interleaves the workers' batches. In-process there is one lane
   and ``num_threads`` threads overlap reading the next window with building batches.

How close to a global shuffle: the converter already wrote the corpus as one seeded global
permutation, so any contiguous run of rows is a uniform random sample of the corpus and a
batch touches as many distinct stretches of the original input order as a perfect shuffle
(``bench.loader``, 1,024-cell batches of 200,000 cells: 194.8 distinct 1,024-row stretches
of the input order per batch; a random permutation gives 194.7, annbatch 193.3). The
read-time shuffle (random chunks, permuted windows) makes every epoch's batches different
sets of cells: a batch draws its cells from ``buffer_size / chunk_size`` random chunks (64
by default) of the corpus.

Speed: uncompressed shards are memory-mapped; a window's pages are populated in one call
and released after use; a batch is one ``np.concatenate`` per array over the rows' slices
of the stored uint16 values, widening them to int32 as it copies (numbers in
``bench/RESULTS.md``, section "Loader").

Integrity: every inner chunk a window touches has its crc32c checked as the window is read
(``verify=True``, the default; ~10 GB/s of CPU, its cost is measured by ``bench.loader``),
gene ids are checked against the vocabulary (``validate``), and a corrupt chunk raises
:class:`~txfm.data.ShardReadError` naming the shard, its cells and the file.

Epochs and resume: :meth:`state_dict` records ``(epoch, batches consumed, lanes)``; after
:meth:`load_state_dict` the next iteration continues with exactly the next batch (windows
already consumed are skipped without reading). Every ``iter()`` continues from the batch
the last one stopped at, as a resumed run must: a peek, ``next(iter(loader))``, or a loop
left by ``break`` consumes those batches of the epoch (unlike a map-style DataLoader, which
restarts). Iterating to the end advances the epoch; :meth:`set_epoch` jumps to the start of
any epoch (``set_epoch(loader.epoch)`` restarts the current one). Where DataLoader workers
start is kept in a small shared-memory table, so the epoch also advances under a plain
``torch.utils.data.DataLoader(loader, batch_size=None, num_workers=N)`` (fresh, persistent
or spawned workers; ``set_epoch`` reaches them too). :meth:`dataloader` wraps such a
DataLoader and counts the batches it hands out, so that its state is exact at any batch and
a resumed epoch goes on as the uninterrupted one would (its round-robin restarts at the lane
that was next); a plain DataLoader's state is exact at epoch boundaries.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data._utils.collate import default_collate_fn_map

from .layout import (ShardedArrayReader, ShardReadError, damaged_metadata, missing_chunks,
                     read_metadata, shard_cells_where)
from .manifest import Manifest, ShardInfo

STATE_VERSION = 1
_MAX_WORKERS = 64  # DataLoader workers whose epochs the shared state can count
_NP_DTYPE = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}


_EXACT_FLOAT64 = 2**53  # integers of larger magnitude are not all representable in float64


def _numeric_obs(raw):
    """``(values, missing)`` of a numeric obs column (numpy bool/int/float, or pandas nullable
    ``Int*``/``UInt*``), ``missing`` a bool mask or None; None when the column is not numeric
    (categorical, strings, nullable ``boolean``: coded as categories)."""
    import pandas as pd

    if isinstance(raw, pd.Categorical):
        return None
    if isinstance(raw, pd.api.extensions.ExtensionArray):
        dtype = raw.dtype
        if not (isinstance(dtype, pd.api.extensions.ExtensionDtype)
                and getattr(dtype, "numpy_dtype", np.dtype(object)).kind in "iuf"):
            return None
        missing = np.asarray(raw.isna(), dtype=bool)
        fill = 0 if dtype.numpy_dtype.kind in "iu" else np.nan
        return raw.to_numpy(dtype=dtype.numpy_dtype, na_value=fill), missing
    a = np.asarray(raw)
    return (a, None) if a.dtype.kind in "biuf" else None


def _common_numeric(col: str, parts: list, root) -> list[np.ndarray]:
    """The shards' values of numeric column ``col`` in one dtype that holds every value exactly:
    bool; int64 for integers without missing values; float64 + NaN for integers with missing
    values (refused past 2^53, where float64 would round them); the widest float for floats."""
    kinds = {v.dtype.kind for v, _ in parts}
    if kinds == {"b"}:
        return [v for v, _ in parts]
    if kinds <= {"b", "i", "u"}:
        for v, _ in parts:
            if v.dtype == np.uint64 and v.size and v.max() > np.iinfo(np.int64).max:
                raise ShardReadError(f"{root}: obs column {col!r} has values above 2^63 - 1, "
                                     f"which int64 tensors cannot hold; store it as strings "
                                     f"(a categorical) or leave it out of obs_columns")
        if not any(m is not None and m.any() for _, m in parts):
            return [v.astype(np.int64) for v, _ in parts]
        if any(v.size and np.abs(v.astype(np.int64)).max() > _EXACT_FLOAT64 for v, _ in parts):
            raise ShardReadError(f"{root}: obs column {col!r} has missing values and integers "
                                 f"beyond 2^53, so it has no exact tensor form (int64 cannot "
                                 f"mark a missing value, float64 rounds); store it as strings "
                                 f"(a categorical) or fill the missing values")
        dtype = np.dtype(np.float64)
    elif kinds == {"f"}:
        dtype = np.result_type(*[v.dtype for v, _ in parts])
    else:  # ints beside floats: float64 keeps integers up to 2^53 exactly
        dtype = np.dtype(np.float64)
    out = []
    for v, m in parts:
        f = v.astype(dtype)
        if m is not None:
            f[m] = np.nan
        out.append(f)
    return out


@dataclass
class CSRBatch:
    """One mini-batch of ``B`` cells in CSR form, ready for ``txfm_kernels.masked_sample``.

    ``indptr [B+1]`` int64; ``indices [nnz]`` int32 vocabulary ids, sorted within each row;
    ``counts [nnz]`` int32 raw counts (float32 when the corpus has non-integer counts);
    ``dataset_ids [B]`` int32 (rows of ``loader.observable``); ``cell_ids [B]`` int64
    global corpus positions; ``obs`` the requested ``obs`` columns as ``[B]`` tensors, each
    value exact: categoricals, strings and nullable booleans as int64 codes into
    ``loader.obs_categories[col]`` (-1 = missing); bool as bool; integers as int64, or as
    float64 with NaN for missing values when the column has any (pandas ``Int64`` and
    kin); floats in their own precision (float64 stays float64), NaN = missing.
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor
    dataset_ids: torch.Tensor
    cell_ids: torch.Tensor
    obs: dict[str, torch.Tensor] = field(default_factory=dict)
    n_genes: int = 0

    @property
    def batch_size(self) -> int:
        return self.indptr.numel() - 1

    def __len__(self) -> int:
        return self.batch_size

    def _map(self, fn) -> "CSRBatch":
        return CSRBatch(fn(self.indptr), fn(self.indices), fn(self.counts), fn(self.dataset_ids),
                        fn(self.cell_ids), {k: fn(v) for k, v in self.obs.items()}, self.n_genes)

    def to(self, device, non_blocking: bool = False) -> "CSRBatch":
        """Every tensor on ``device`` (``non_blocking`` as :meth:`torch.Tensor.to`)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "CSRBatch":
        """Every tensor in pinned host memory (what a DataLoader's ``pin_memory`` calls)."""
        return self._map(lambda t: t if t.is_pinned() else t.pin_memory())

    def to_dense(self) -> torch.Tensor:
        """``[B, n_genes]`` float32 (for tests and small batches; densify on the device)."""
        b = self.batch_size
        rows = torch.repeat_interleave(torch.arange(b, device=self.indptr.device),
                                       self.indptr[1:] - self.indptr[:-1])
        out = torch.zeros(b, self.n_genes, dtype=torch.float32, device=self.indptr.device)
        out[rows, self.indices.long()] = self.counts.float()
        return out


def _collate_loader_batches(batch: list, *, collate_fn_map=None) -> CSRBatch:
    """torch's ``default_collate`` for :class:`CSRBatch` items: the loader already yields whole
    batches, so a ``DataLoader(loader)`` left at its default ``batch_size=1`` passes each one
    through; stacking several would join batches the loader drew apart, so that is refused."""
    if len(batch) == 1:
        return batch[0]
    raise ValueError(f"collating {len(batch)} ShardLoader batches (what DataLoader(loader, "
                     f"batch_size={len(batch)}) does) would join batches the loader already made: "
                     "pass batch_size=None to the DataLoader and set the ShardLoader's batch_size")


# default_collate's per-type registry, which the docstring of torch's `collate` invites
# extending in place
default_collate_fn_map[CSRBatch] = _collate_loader_batches


class _Shard:
    """One shard's arrays: in-memory ``indptr``, dataset ids and obs; readers for the rest."""

    def __init__(self, root: Path, info: ShardInfo, manifest: Manifest, obs_columns: Sequence[str]):
        import zarr

        self.info = info
        self.path = root / info.path
        self.name = info.path
        self.every_chunk_written = manifest.every_chunk_written
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zarr: consolidated metadata is not in the v3 spec
                group = zarr.open_group(self.path, mode="r")
            self.indptr = np.asarray(group["X/indptr"][:], dtype=np.int64)
        except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable shard
            damaged = damaged_metadata(self.path)  # zarr's own message names no file
            raise ShardReadError(f"{self.where(0, -1)}: cannot open X/indptr "
                                 f"({damaged[0] if damaged else f'{type(exc).__name__}: {exc}'})"
                                 ) from exc
        n = info.n_cells
        ip = self.indptr
        if (ip.size != n + 1 or ip[0] != 0 or np.any(np.diff(ip) < 0)) or int(ip[-1]) != info.nnz:
            raise ShardReadError(f"{self.where(0, -1)}: X/indptr is corrupt (expected "
                                 f"{n + 1} non-decreasing offsets from 0 to {info.nnz})")
        self.data = ShardedArrayReader(self.path / "X" / "data", self.where)
        self.indices = ShardedArrayReader(self.path / "X" / "indices", self.where)
        for arr, what in ((self.data, "data"), (self.indices, "indices")):
            if arr.length != info.nnz:
                raise ShardReadError(f"{self.where(0, info.nnz)}: X/{what} has {arr.length} "
                                     f"values, expected {info.nnz}")
        # both arrays cut into the same inner chunks: a window's pieces line up
        self.aligned = getattr(self.data, "inner", 0) == getattr(self.indices, "inner", -1)
        self.checksums = self.data.checksum and self.indices.checksum
        obs = group["obs"]
        names = [d.name for d in manifest.datasets]
        if "dataset" not in obs:
            raise ShardReadError(f"shard {self.name}: obs has no 'dataset' column")
        ds = self._read_obs(obs, "dataset")
        lookup = np.array([names.index(c) if c in names else -1 for c in ds.categories])
        self.dataset_ids = lookup[np.asarray(ds.codes)].astype(np.int32)
        if np.any(self.dataset_ids < 0):
            raise ShardReadError(f"shard {self.name}: obs 'dataset' names a dataset the "
                                 f"manifest does not list")
        self.obs_raw = {}
        for col in obs_columns:
            if col not in obs:
                have = list(obs.attrs.get("column-order", []))
                raise KeyError(f"obs column {col!r} not in shard {self.name}; columns: {have}")
            self.obs_raw[col] = self._read_obs(obs, col)

    def _read_obs(self, obs, col: str):
        import anndata as ad

        if self.every_chunk_written:  # else zarr reads an absent chunk as codes/values of 0
            for meta_file in sorted((self.path / "obs" / col).rglob("zarr.json")):
                meta = read_metadata(meta_file)
                gone = missing_chunks(meta_file.parent, meta) \
                    if meta.get("node_type") == "array" else []
                if gone:
                    raise ShardReadError(f"{self.where(0, -1)}: obs/{col}: chunk file "
                                         f"{gone[0]} is missing; the shard is damaged: convert "
                                         f"the inputs again (txfm data verify lists every "
                                         f"damaged file)")
        try:  # zarr checks each chunk's crc32c as it reads
            return ad.io.read_elem(obs[col])
        except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable column
            raise ShardReadError(f"{self.where(0, -1)}: cannot read obs/{col} "
                                 f"({type(exc).__name__}: {exc})") from exc

    def where(self, e0: int, e1: int) -> str:
        """The shard and cells holding non-zeros ``[e0, e1)`` (``e1 < 0``: the whole shard)."""
        return shard_cells_where(self.name, getattr(self, "indptr", None),
                                 self.info.cell_offset, self.info.n_cells)(e0, e1)


@dataclass
class _Window:
    index: int  # window number within the rank's epoch part
    shard: np.ndarray  # int64 [S] segments: shard index, first row, end row
    row0: np.ndarray
    row1: np.ndarray
    n_batches: int
    n_rows: int


@dataclass
class _Loaded:
    """A window in memory, as ``pieces`` of both arrays laid end to end in window order.

    ``pieces`` are zero-copy views of memory-mapped shards, one per inner chunk (uncompressed
    shards; a chunk ends with its checksum, so a run of chunks is not one slice), or slices
    of one buffer the window was read/decoded into. Row ``r`` is elements
    ``[ws[r], we[r])`` of that concatenation: pieces ``kfirst[r] .. kfirst[r] + nspan[r]``,
    piece ``k`` starting at element ``bounds[k]``."""

    idx_parts: list
    cnt_parts: list
    bounds: np.ndarray  # int64 [n_pieces + 1]
    ws: np.ndarray  # int64 [n_rows]
    we: np.ndarray
    kfirst: np.ndarray  # int64 [n_rows]
    nspan: np.ndarray  # int64 [n_rows]: pieces a row touches (0 for an empty row)
    dataset_ids: np.ndarray
    cell_ids: np.ndarray
    obs: dict
    perm: np.ndarray
    mapped: list  # (shard, e0, e1) ranges to release from the memory maps afterwards


def _check_integer(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"ShardLoader: {name} must be an integer >= {low}, got {value!r}")


class ShardLoader(torch.utils.data.IterableDataset):
    """Iterable of :class:`CSRBatch` over one split of a shard collection (see module doc).

    Args:
        shards_dir: output of ``txfm data convert`` (or :func:`txfm.data.demo.ensure_demo_shards`).
        batch_size: cells per batch.
        split: ``"train"`` or ``"val"``.
        shuffle: random chunk order + shuffle buffer (False: corpus order, for evaluation).
        seed: base seed; the epoch's order depends on ``(seed, epoch)``.
        drop_last: drop the incomplete last batch (keep True for DDP: equal batch counts).
        obs_columns: ``obs`` columns to return per batch (e.g. ``("cell_type", "batch")``).
        pin_memory: allocate batch tensors in pinned memory (needs CUDA: ValueError without).
        rank, world_size: DDP partition; default from ``torch.distributed`` when initialised.
        chunk_size: rows per contiguous read (the shuffle's granularity on disk).
        buffer_size: cells in the in-memory shuffle buffer (rounded to a multiple of
            ``batch_size``); memory is about ``(1 + prefetch) * buffer_size * bytes_per_cell``
            (~400 MB for 16,384 cells of ~3,000 non-zeros in uint16).
        num_threads: threads reading and assembling in this process (1 inside DataLoader
            workers unless given).
        counts_dtype: ``torch.int32`` or ``torch.float32``; default int32 for integer corpora.
        validate: check every gene id < n_genes as windows are read (one cheap pass).
        verify: check the crc32c of every inner chunk as windows are read (one pass over the
            bytes, ~10 GB/s; its cost is measured in ``bench/RESULTS.md``); a corrupt chunk
            raises :class:`~txfm.data.ShardReadError` naming the shard and the cells.
            Collections of format 1 have no chunk checksums: a warning says so.
        mmap: read uncompressed shards through memory maps (no copy into a window buffer;
            pages are released after each window, so RSS stays bounded); False reads every
            window with ``pread`` into a buffer. Compressed shards are always decoded.
        prefetch: windows read ahead of the one being cut into batches.
        release_pages: unmap a window's pages once its batches are built (RSS stays at ~2
            windows). False keeps them mapped: ~10% faster from the second epoch, but RSS
            grows to the corpus size (page cache the kernel can reclaim, not heap).

    Raises:
        FileNotFoundError: ``shards_dir`` holds no complete collection (no ``manifest.json``).
        ValueError: a bad argument (sizes, ``seed``, ``rank``: integers, not bools or floats;
            ``pin_memory`` without CUDA);
            a split without shards; a split (per rank) smaller than one batch with
            ``drop_last`` (it would yield no batch), or with fewer cells than ranks.
        TypeError: ``obs_columns`` given as one string, or a bad ``counts_dtype``.
        ShardReadError: a shard is missing, damaged, or has an obs column that no tensor holds
            exactly (the message names the shard and file).
        KeyError: an ``obs_columns`` name the shards do not have.
    """

    def __init__(self, shards_dir, batch_size: int, *, split: str = "train", shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, obs_columns: Sequence[str] = (),
                 pin_memory: bool = False, rank: int | None = None, world_size: int | None = None,
                 chunk_size: int = 256, buffer_size: int = 16384, num_threads: int | None = None,
                 counts_dtype: torch.dtype | None = None, validate: bool = True,
                 verify: bool = True, mmap: bool = True, prefetch: int = 1,
                 release_pages: bool = True):
        super().__init__()
        for name, v, low in (("batch_size", batch_size, 1), ("chunk_size", chunk_size, 1),
                             ("buffer_size", buffer_size, 1), ("seed", seed, 0),
                             ("prefetch", prefetch, 0), ("num_threads", num_threads, 1),
                             ("rank", rank, 0), ("world_size", world_size, 1)):
            if v is None and name in ("num_threads", "rank", "world_size"):
                continue
            _check_integer(name, v, low)
        if isinstance(obs_columns, (str, bytes)):
            raise TypeError(f"ShardLoader: obs_columns is a sequence of column names, got the "
                            f"string {obs_columns!r}; pass ({obs_columns!r},)")
        if rank is None or world_size is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
            world_size = world_size if world_size is not None else (
                dist.get_world_size() if initialised else 1)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.manifest = Manifest.load(shards_dir)
        self.root = Path(shards_dir)
        self.split = split
        infos = self.manifest.split_shards(split)
        if not infos:
            raise ValueError(f"{self.root} has no {split!r} shards"
                             + (" (convert with --val-fraction > 0)" if split == "val" else ""))
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        self.chunk_size = int(chunk_size)
        self.buffer_size = max(1, math.ceil(buffer_size / self.batch_size)) * self.batch_size
        self.num_threads = num_threads
        if pin_memory and not torch.cuda.is_available():
            # pinned memory serves copies to a GPU; torch itself fails only at the first batch
            raise ValueError("ShardLoader: pin_memory=True needs CUDA (pinned host memory is "
                             "for copies to a GPU), which this machine or torch build lacks; "
                             "leave pin_memory=False")
        self.pin = bool(pin_memory)
        self.validate = bool(validate)
        self.verify = bool(verify)
        self.mmap = bool(mmap)
        self.prefetch = max(1, int(prefetch))
        self.release_pages = bool(release_pages)
        self.obs_columns = tuple(obs_columns)
        if counts_dtype is None:
            counts_dtype = (torch.int32 if self.manifest.integer_counts
                            and self.manifest.max_count < 2**31 else torch.float32)
        if counts_dtype not in (torch.int32, torch.float32):
            raise TypeError(f"counts_dtype must be torch.int32 or torch.float32, got "
                            f"{counts_dtype}")
        self.counts_dtype = counts_dtype
        self._shards = [_Shard(self.root, info, self.manifest, self.obs_columns) for info in infos]
        if self.verify and not all(sh.checksums for sh in self._shards):
            warnings.warn(f"{self.root} has no per-chunk checksums (written by an older txfm, "
                          f"format {self.manifest.raw.get('version')}): its data cannot be "
                          f"verified as it is read; convert the inputs again to add them",
                          RuntimeWarning, stacklevel=2)
        self._unify_obs()
        self._n_cells = sum(s.info.n_cells for s in self._shards)
        per_rank = self._n_cells // self.world_size
        if per_rank == 0 or (self.drop_last and per_rank < self.batch_size):
            ranks = f" ({per_rank:,} per rank of {self.world_size})" if self.world_size > 1 else ""
            raise ValueError(f"{self.root}: the {split!r} split has {self._n_cells:,} cells"
                             f"{ranks}, " + (f"fewer than batch_size={self.batch_size}, so "
                                             f"drop_last=True leaves no batch; lower batch_size "
                                             f"or pass drop_last=False" if per_rank else
                                             "so some rank gets none; use fewer ranks"))
        sizes = np.array([s.info.n_cells for s in self._shards], dtype=np.int64)
        per = -(-sizes // self.chunk_size)
        self._chunk_shard = np.repeat(np.arange(sizes.size), per)
        first = np.concatenate([[0], np.cumsum(per)[:-1]])
        self._chunk_row0 = (np.arange(per.sum()) - np.repeat(first, per)) * self.chunk_size
        self._chunk_len = np.minimum(self.chunk_size, sizes[self._chunk_shard] - self._chunk_row0)
        self._epoch = 0
        self._position = 0  # batches of this epoch already consumed (in this rank's order)
        self._lanes = 1
        self._tracking = False  # a .dataloader() iteration is counting batches
        # Where DataLoader workers start, shared with them (see _start): [epoch, position,
        # lanes] then started[L, w] = epochs worker w of an L-worker DataLoader began since
        # the last _publish. Shared memory reaches forked, spawned and persistent workers.
        self._shared = torch.zeros(3 + (_MAX_WORKERS + 1) * _MAX_WORKERS,
                                   dtype=torch.int64).share_memory_()
        self._publish()
        self._pin_now = False
        self._observable = None
        self._gene_nnz = torch.from_numpy(self.manifest.gene_nnz.copy())

    # ------------------------------------------------------------------ public properties
    @property
    def n_genes(self) -> int:
        """``G``, the vocabulary size: every batch's gene ids lie in ``[0, G)``."""
        return self.manifest.n_genes

    @property
    def gene_nnz(self) -> torch.Tensor:
        """int64 ``[G]``: training cells in which each gene is non-zero (m_i of the masking ablation, arXiv:2605.31562)."""
        return self._gene_nnz

    @property
    def gene_stats(self):
        """Per-gene expression sums of the training split (:class:`txfm.data.stats.GeneStats`),
        or None when the manifest predates them."""
        return self.manifest.gene_stats

    @property
    def observable(self):
        """:class:`txfm_kernels.ObservableGenes`: mask ``[D datasets, G]`` bool, row ``d`` =
        the genes dataset ``d`` (a batch's ``dataset_ids``) profiles."""
        if self._observable is None:
            self._observable = self.manifest.observable()
        return self._observable

    @property
    def n_cells(self) -> int:
        """Cells of this split (all ranks together), before ``drop_last``."""
        return self._n_cells

    def __len__(self) -> int:
        return self._rank_batches()

    # -------------------------------------------------------------------------- obs
    def _unify_obs(self) -> None:
        """Per shard, each requested column as one numpy array of a dtype common to all shards
        (see :class:`CSRBatch`): no value is rounded, and a missing one is never a number."""
        import pandas as pd

        self.obs_categories: dict[str, list] = {}
        self._obs_values: list[dict[str, np.ndarray]] = [dict() for _ in self._shards]
        for col in self.obs_columns:
            raws = [s.obs_raw[col] for s in self._shards]
            numeric = [_numeric_obs(r) for r in raws]
            if all(v is not None for v in numeric):
                for i, v in enumerate(_common_numeric(col, numeric, self.root)):
                    self._obs_values[i][col] = v
                continue
            cols = [r if isinstance(r, pd.Categorical)
                    else pd.Categorical(np.asarray(r, dtype=object)) for r in raws]
            cats: dict = {}
            for c in cols:
                for v in c.categories:
                    cats.setdefault(v, len(cats))
            self.obs_categories[col] = list(cats)
            for i, c in enumerate(cols):
                lut = np.array([cats[v] for v in c.categories] + [-1], dtype=np.int64)
                self._obs_values[i][col] = lut[np.asarray(c.codes)]
        for s in self._shards:
            s.obs_raw = None

    # --------------------------------------------------------------------- epoch plan
    def _rank_range(self) -> tuple[int, int, int]:
        """(first row, end row, batches) of this rank's part of the epoch sequence."""
        n = self._n_cells
        lo = n * self.rank // self.world_size
        hi = n * (self.rank + 1) // self.world_size
        if self.drop_last:
            n_batches = (n // self.world_size) // self.batch_size
            return lo, lo + n_batches * self.batch_size, n_batches
        return lo, hi, -(-(hi - lo) // self.batch_size)

    def _rank_batches(self) -> int:
        return self._rank_range()[2]

    def _windows(self, epoch: int) -> list[_Window]:
        order = (np.random.default_rng([self.seed, epoch]).permutation(self._chunk_len.size)
                 if self.shuffle else np.arange(self._chunk_len.size))
        lens = self._chunk_len[order]
        ends = np.cumsum(lens)
        starts = ends - lens
        lo, hi, _ = self._rank_range()
        windows = []
        for j, a in enumerate(range(lo, hi, self.buffer_size)):
            b = min(hi, a + self.buffer_size)
            k0 = int(np.searchsorted(ends, a, side="right"))
            k1 = int(np.searchsorted(ends, b - 1, side="right")) + 1
            ks = order[k0:k1]
            seq0 = np.maximum(starts[k0:k1], a)
            seq1 = np.minimum(ends[k0:k1], b)
            row0 = self._chunk_row0[ks] + (seq0 - starts[k0:k1])
            windows.append(_Window(j, self._chunk_shard[ks], row0, row0 + (seq1 - seq0),
                                   -(-(b - a) // self.batch_size), b - a))
        return windows

    def _lane_windows(self, lane: int, lanes: int, skip_total: int, epoch: int):
        """This lane's windows and how many of its batches to skip (resume)."""
        windows = self._windows(epoch)
        per_lane = [windows[w::lanes] for w in range(lanes)]
        counts = np.array([sum(x.n_batches for x in ws) for ws in per_lane], dtype=np.int64)
        skips = _round_robin_consumed(counts, skip_total)
        return per_lane[lane], int(skips[lane])

    def _lane_counts(self, lanes: int, epoch: int) -> np.ndarray:
        """Batches of each of ``lanes`` lanes in ``epoch`` (window ``j`` is lane ``j % lanes``)."""
        n = np.array([w.n_batches for w in self._windows(epoch)], dtype=np.int64)
        return np.array([n[w::lanes].sum() for w in range(lanes)], dtype=np.int64)

    # ------------------------------------------------------------------------ reading
    def _load(self, win: _Window, epoch: int) -> _Loaded:
        """Make a window's rows addressable: map (or read) its segments, check gene ids and
        chunk checksums, gather per-row metadata and draw the window's row permutation."""
        segs = list(zip(win.shard.tolist(), win.row0.tolist(), win.row1.tolist()))
        slots: list = []  # per segment: (index pieces, count pieces)
        mapped, copy = [], []
        for i, (s, r0, r1) in enumerate(segs):
            sh = self._shards[s]
            e0, e1 = int(sh.indptr[r0]), int(sh.indptr[r1])
            if e1 == e0:
                slots.append(([], []))
            elif (self.mmap and sh.aligned and sh.indices.mappable(e0, e1)
                  and sh.data.mappable(e0, e1)):
                slots.append((sh.indices.pieces(e0, e1), sh.data.pieces(e0, e1)))
                mapped.append((s, e0, e1))
            else:
                slots.append(None)
                copy.append((i, sh, e0, e1))
        if copy:  # compressed (or unmappable) segments: read into one buffer each array
            total = sum(e1 - e0 for _, _, e0, e1 in copy)
            ibuf = np.empty(total, dtype=copy[0][1].indices.dtype)
            cbuf = np.empty(total, dtype=copy[0][1].data.dtype)
            off = 0
            for i, sh, e0, e1 in copy:
                n = e1 - e0
                sh.indices.read_into(e0, e1, ibuf[off:off + n], verify=self.verify)
                sh.data.read_into(e0, e1, cbuf[off:off + n], verify=self.verify)
                slots[i] = ([ibuf[off:off + n]], [cbuf[off:off + n]])
                off += n
        idx_parts = [p for ip, _ in slots for p in ip]
        cnt_parts = [p for _, cp in slots for p in cp]
        sizes = np.array([p.size for p in idx_parts], dtype=np.int64)
        bounds = np.zeros(sizes.size + 1, dtype=np.int64)
        np.cumsum(sizes, out=bounds[1:])
        if self.validate:  # one pass over the ids (also faults mapped pages in, ahead of use)
            for (s, r0, r1), (ip, _) in zip(segs, slots):
                if any(int(part.max()) >= self.n_genes for part in ip):
                    sh = self._shards[s]
                    raise ShardReadError(f"{sh.where(int(sh.indptr[r0]), int(sh.indptr[r1]))}: "
                                         f"gene index >= {self.n_genes} (corrupt X/indices)")
        if self.verify:  # crc32c of every inner chunk the mapped segments touch
            for s, e0, e1 in mapped:
                self._shards[s].indices.check(e0, e1)
                self._shards[s].data.check(e0, e1)
        n_rows = win.n_rows
        ws = np.empty(n_rows, dtype=np.int64)
        we = np.empty(n_rows, dtype=np.int64)
        ds_ids = np.empty(n_rows, dtype=np.int32)
        cell_ids = np.empty(n_rows, dtype=np.int64)
        obs = {c: [] for c in self.obs_columns}
        row = base = 0
        for s, r0, r1 in segs:
            sh = self._shards[s]
            n = r1 - r0
            ip = sh.indptr[r0:r1 + 1] - sh.indptr[r0] + base
            ws[row:row + n], we[row:row + n] = ip[:-1], ip[1:]
            ds_ids[row:row + n] = sh.dataset_ids[r0:r1]
            cell_ids[row:row + n] = sh.info.cell_offset + np.arange(r0, r1)
            for c in self.obs_columns:
                obs[c].append(self._obs_values[s][c][r0:r1])
            row += n
            base = int(ip[-1])
        kfirst = np.searchsorted(bounds, ws, side="right") - 1
        klast = np.searchsorted(bounds, we - 1, side="right") - 1
        nspan = np.where(we > ws, klast - kfirst + 1, 0)
        perm = (np.random.default_rng([self.seed, epoch, self.rank, self.world_size, win.index])
                .permutation(n_rows) if self.shuffle else np.arange(n_rows))
        return _Loaded(idx_parts, cnt_parts, bounds, ws, we, kfirst, nspan, ds_ids, cell_ids,
                       {c: np.concatenate(v) for c, v in obs.items()}, perm, mapped)

    def _release(self, w: _Loaded) -> None:
        if not self.release_pages:
            return
        for s, e0, e1 in w.mapped:
            self._shards[s].indices.release(e0, e1)
            self._shards[s].data.release(e0, e1)

    def _empty(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        if self._pin_now:  # torch's caching host allocator: reused blocks, safe async copies
            return torch.empty(n, dtype=dtype, pin_memory=True)
        # numpy backs large arrays with transparent huge pages: a fresh 12 MB output costs
        # a few dozen page faults instead of thousands (measured ~1.5x faster batches)
        return torch.from_numpy(np.empty(n, dtype=_NP_DTYPE[dtype]))

    def _assemble(self, w: _Loaded, t: int) -> CSRBatch:
        """Batch ``t`` of a loaded window: rows ``perm[t*B:(t+1)*B]`` gathered into new CSR."""
        rows = w.perm[t * self.batch_size:(t + 1) * self.batch_size]
        ws, we = w.ws[rows], w.we[rows]
        indptr = self._empty(rows.size + 1, torch.int64)
        ip = indptr.numpy()
        ip[0] = 0
        np.cumsum(we - ws, out=ip[1:])
        nnz = int(ip[-1])
        indices = self._empty(nnz, torch.int32)
        counts = self._empty(nnz, self.counts_dtype)
        # each row's spans over the window's pieces (a row crossing an inner chunk boundary
        # of a mapped shard has two)
        ns = w.nspan[rows]
        rep = np.repeat(np.arange(rows.size), ns)
        k = w.kfirst[rows][rep] + (np.arange(rep.size) - (np.cumsum(ns) - ns)[rep])
        lo = w.bounds[k]
        a = np.maximum(ws[rep], lo) - lo
        b = np.minimum(we[rep], w.bounds[k + 1]) - lo
        spans = list(zip(k.tolist(), a.tolist(), b.tolist()))
        if spans:
            # One memcpy per span (with the widening cast) inside np.concatenate: the
            # fastest pure-numpy segment gather (an nnz-long index array costs ~3x more).
            ip_, cp_ = w.idx_parts, w.cnt_parts
            np.concatenate([ip_[s][a:b] for s, a, b in spans], out=indices.numpy(),
                           casting="same_kind")
            np.concatenate([cp_[s][a:b] for s, a, b in spans], out=counts.numpy(),
                           casting="same_kind")
        obs = {c: torch.from_numpy(np.ascontiguousarray(v[rows])) for c, v in w.obs.items()}
        return CSRBatch(indptr, indices, counts, torch.from_numpy(w.dataset_ids[rows]),
                        torch.from_numpy(w.cell_ids[rows]), obs, self.n_genes)

    # ---------------------------------------------------------------------- iteration
    def _started(self) -> np.ndarray:
        return self._shared[3:].view(_MAX_WORKERS + 1, _MAX_WORKERS).numpy()

    def _publish(self) -> None:
        """Make ``(epoch, position, lanes)`` where every DataLoader worker starts next."""
        sh = self._shared.numpy()
        sh[:3] = (self._epoch, self._position, self._lanes)
        sh[3:] = 0

    def _auto_epochs(self) -> int:
        """Epochs that workers of plain DataLoaders began by themselves since the last
        :meth:`_publish` (every worker of one DataLoader begins each epoch once)."""
        if self._tracking:
            return 0
        return int(self._started()[:, 0].sum())

    def _sync(self) -> None:
        """Take epochs that plain DataLoader workers ran into this process' own state."""
        auto = self._auto_epochs()
        if auto:
            self._epoch, self._position = self._epoch + auto, 0
            self._publish()

    @property
    def epoch(self) -> int:
        """The epoch being read (or read next); plain DataLoader epochs count when begun."""
        return self._epoch + self._auto_epochs()

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.set_epoch(value)

    def _start(self, info) -> tuple[int, int, int, int]:
        """``(epoch, position, lane, lanes)`` for an iteration starting now in this process
        (``info`` = torch's worker info, None in the main process)."""
        if info is None:
            self._sync()
            if self._position and self._lanes != 1:
                raise RuntimeError(f"resuming mid-epoch needs the same number of DataLoader "
                                   f"workers as when the state was saved ({self._lanes}), got "
                                   f"0 (in-process)")
            return self._epoch, self._position, 0, 1
        # a DataLoader worker: counts its epochs in shared memory, so that the epoch advances
        # for forked (fresh each epoch), spawned and persistent workers alike
        lanes, w = info.num_workers, info.id
        if lanes > _MAX_WORKERS:
            raise ValueError(f"at most {_MAX_WORKERS} DataLoader workers, got {lanes}")
        started = self._started()
        epoch, position, saved_lanes = (int(x) for x in self._shared[:3].tolist())
        others = started[:, 0].copy()  # epochs begun by DataLoaders of other sizes
        others[lanes] = 0
        k = int(others.sum() + started[lanes, w])
        started[lanes, w] += 1
        if k:
            return epoch + k, 0, w, lanes
        if position and saved_lanes != lanes:
            raise RuntimeError(f"resuming mid-epoch needs the same number of DataLoader "
                               f"workers as when the state was saved ({saved_lanes}), got {lanes}")
        # resumed mid-epoch: the DataLoader starts its round-robin at worker 0, the
        # uninterrupted run would go on with the lane after the last one consumed
        rotation = _round_robin_next(self._lane_counts(lanes, epoch), position)
        return epoch, position, (w + rotation) % lanes, lanes

    def __iter__(self) -> Iterator[CSRBatch]:
        info = torch.utils.data.get_worker_info()
        epoch, position, lane, lanes = self._start(info)
        threads = self.num_threads or (2 if info is None else 1)
        # DataLoader workers never pin (no CUDA in forked workers): the DataLoader pins
        # in the main process when asked to (pin_memory=True, as .dataloader() does)
        self._pin_now = self.pin and info is None
        windows, skip = self._lane_windows(lane, lanes, position, epoch)
        return self._run(windows, skip, epoch, threads, track=info is None)

    def _run(self, windows: list[_Window], skip: int, epoch: int, threads: int, track: bool):
        # skip whole windows already consumed, then the first batches of the next one
        todo = deque()
        for w in windows:
            if skip >= w.n_batches:
                skip -= w.n_batches
                continue
            todo.append((w, skip))
            skip = 0
        pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="txfm-loader")
        loads: deque = deque()
        batches: deque = deque()
        inflight = max(2, threads + 1)
        try:
            def feed_loads():
                while todo and len(loads) < self.prefetch:
                    w, first = todo.popleft()
                    loads.append((w, first, pool.submit(self._load, w, epoch)))

            feed_loads()
            pending: deque = deque()  # (loaded window, batch numbers not yet submitted)
            while loads or pending or batches:
                while len(batches) < inflight and (pending or loads):
                    if not pending:
                        w, first, fut = loads.popleft()
                        pending.append((fut.result(), deque(range(first, w.n_batches))))
                        feed_loads()
                    loaded, ts = pending[0]
                    last = len(ts) == 1
                    batches.append((pool.submit(self._assemble, loaded, ts.popleft()),
                                    loaded if last else None))
                    if not ts:
                        pending.popleft()
                fut, done_window = batches.popleft()
                batch = fut.result()
                if done_window is not None:
                    self._release(done_window)
                if track:
                    self._position += 1
                yield batch
            if track:
                self._epoch, self._position = epoch + 1, 0
                self._publish()
        finally:
            for fut, _ in batches:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning at the next iteration (in this process or
        in DataLoader workers, persistent ones included). ``epoch``: an integer >= 0."""
        _check_integer("epoch", epoch, 0)
        self._epoch, self._position = int(epoch), 0
        self._publish()

    # ------------------------------------------------------------------------ resume
    def _fingerprint(self) -> dict:
        return {"vocab_hash": self.manifest.vocab_hash, "fingerprint": self.manifest.fingerprint,
                "split": self.split, "batch_size": self.batch_size, "seed": self.seed,
                "shuffle": self.shuffle, "drop_last": self.drop_last, "rank": self.rank,
                "world_size": self.world_size, "chunk_size": self.chunk_size,
                "buffer_size": self.buffer_size}

    def state_dict(self) -> dict:
        """Where the next iteration starts: exact at any batch when iterated in-process or
        through :meth:`dataloader`; at epoch boundaries when driven by a plain DataLoader
        (the main process does not see which batches its workers made)."""
        if not self._tracking:
            self._sync()
        return {"version": STATE_VERSION, "epoch": self._epoch, "batches": self._position,
                "lanes": self._lanes, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where :meth:`state_dict` was taken (the next iteration starts there).

        Raises:
            TypeError: ``state`` is not a dict.
            ValueError: a state of another version, or saved with other data or settings
                (vocabulary, collection, split, batch size, shuffle, seed, ranks).
        """
        if not isinstance(state, dict):
            raise TypeError(f"loader state must be the dict of ShardLoader.state_dict(), got "
                            f"{type(state).__name__}")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        mine = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError("loader state was saved with different data or settings "
                             + ", ".join(f"{k}: saved {a!r} != now {b!r}"
                                         for k, (a, b) in diff.items()))
        if not 0 <= int(state["batches"]) <= len(self):
            raise ValueError(f"loader state position {state['batches']} outside [0, {len(self)}]")
        if not 1 <= int(state["lanes"]) <= _MAX_WORKERS:
            raise ValueError(f"loader state lanes {state['lanes']} outside [1, {_MAX_WORKERS}]")
        self._epoch, self._position, self._lanes = (int(state["epoch"]), int(state["batches"]),
                                                   int(state["lanes"]))
        self._publish()

    def dataloader(self, num_workers: int = 2, **kwargs) -> "_TrackedDataLoader":
        """A ``torch.utils.data.DataLoader`` over this loader with ``num_workers`` processes
        (0: in this process) that keeps :meth:`state_dict` exact: it counts the batches it
        hands out, and a resumed epoch goes on exactly as the uninterrupted one would.
        ``kwargs`` go to the DataLoader (``persistent_workers=True`` keeps the workers
        across epochs)."""
        return _TrackedDataLoader(self, num_workers, kwargs)


class _TrackedDataLoader:
    def __init__(self, loader: ShardLoader, num_workers: int, kwargs: dict):
        if not 0 <= num_workers <= _MAX_WORKERS:
            raise ValueError(f"num_workers must be in [0, {_MAX_WORKERS}], got {num_workers}")
        for key in ("batch_size", "num_workers", "sampler", "batch_sampler", "shuffle",
                    "collate_fn"):
            if key in kwargs:
                raise ValueError(f"{key} is set by ShardLoader.dataloader(); do not pass it")
        self.loader, self.num_workers = loader, int(num_workers)
        self.kwargs = {"pin_memory": loader.pin, **kwargs}
        if not self.num_workers:
            self.kwargs.pop("persistent_workers", None)  # nothing to keep with 0 workers
        self._dl = None

    def __len__(self) -> int:
        return len(self.loader)

    def _loader(self) -> torch.utils.data.DataLoader:
        if self._dl is None or not self.kwargs.get("persistent_workers"):
            self._dl = torch.utils.data.DataLoader(self.loader, batch_size=None,
                                                   num_workers=self.num_workers, **self.kwargs)
        return self._dl

    def __iter__(self):
        ld = self.loader
        if not self.num_workers:  # in this process: the loader counts its own batches
            yield from self._loader()
            return
        ld._sync()
        if ld._position and ld._lanes != self.num_workers:
            raise RuntimeError(f"resuming mid-epoch needs num_workers={ld._lanes} (as saved), "
                               f"got {self.num_workers}")
        ld._lanes = self.num_workers
        ld._publish()  # the workers start at (epoch, position), this DataLoader's lanes
        epoch = ld._epoch
        ld._tracking = True
        try:
            for batch in self._loader():
                ld._position += 1
                yield batch
            ld._epoch, ld._position = epoch + 1, 0
        finally:
            ld._publish()
            ld._tracking = False


def _round_robin_consumed(counts: np.ndarray, k: int) -> np.ndarray:
    """Items taken from each lane among the first ``k`` of a round-robin over lanes with
    ``counts`` items each (exhausted lanes are skipped, as torch's DataLoader does)."""
    counts = np.asarray(counts, dtype=np.int64)
    if k <= 0:
        return np.zeros_like(counts)
    lo, hi = 0, int(counts.max())  # largest t with sum(min(counts, t)) <= k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(counts, mid).sum() <= k:
            lo = mid
        else:
            hi = mid - 1
    taken = np.minimum(counts, lo)
    rest = k - int(taken.sum())
    extra = np.flatnonzero(counts > lo)[:rest]
    taken[extra] += 1
    return taken


def _round_robin_next(counts: np.ndarray, k: int) -> int:
    """The lane after the one that yields item ``k - 1`` of a round-robin over lanes with
    ``counts`` items each (exhausted lanes skipped): where it goes on; 0 for ``k == 0``."""
    counts = np.asarray(counts, dtype=np.int64)
    if k <= 0 or counts.size == 0:
        return 0
    taken = _round_robin_consumed(counts, min(int(k), int(counts.sum())))
    # item k - 1 is in the round of the lanes that have yielded most; a round goes by index
    last = int(np.flatnonzero(taken == taken.max())[-1])
    return (last + 1) % counts.size
