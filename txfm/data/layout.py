"""On-disk layout of a txfm shard collection, and the raw reader/writer of its sparse arrays.

A collection (the output of ``txfm data convert``) is a directory::

    SHARDS/
      zarr.json          zarr v3 group, attributes {"encoding-type": "annbatch-preshuffled",
                         "encoding-version": "0.1.0", "txfm": {...}}  (annbatch reads it as is)
      dataset_0/ ...     training shards: each a complete anndata store on zarr v3
      val/zarr.json      a second collection with the held-out validation shards
      val/dataset_0/ ...
      vocab.tsv          the gene vocabulary (gene_id<TAB>symbol), row i = gene id i
      manifest.json      written last: shards, cell counts, vocabulary hash, observable genes, m_i

Each shard ``dataset_k`` holds ``X`` as ``csr_matrix`` (``data`` = counts, ``indices`` =
vocabulary ids sorted within each row, ``indptr`` int64), ``obs`` and ``var`` (= the
vocabulary), so ``anndata.read_zarr(SHARDS / "dataset_0")`` reads it.

``X/data`` and ``X/indices`` are 1-D zarr v3 arrays with the ``sharding_indexed`` codec (index
at the end, protected by crc32c), inner chunks of ~64 rows' worth of elements (annbatch's
recommendation) and, by default, no compression: narrow dtypes (``uint16`` counts and indices
when they fit) already halve the bytes of the usual float32/int32 layout, and an uncompressed
shard's inner chunks lie back to back, so any row range is one slice of a memory-mapped
file (or one ``pread``), with no decode step.
That is what lets the loader outrun blosc-lz4-bound readers on a small CPU (PEERS.md). lz4 and
zstd inner chunks are available (``--codec``) for smaller files at a decode cost.

:class:`ShardedArrayWriter` streams such an array to disk in bounded memory and writes the
shard index itself; :class:`ShardedArrayReader` validates every shard index up front (missing
file, truncation, checksum, missing or out-of-range chunk), hands out zero-copy views of
memory-mapped uncompressed shards (``view``/``populate``/``release``) and otherwise reads or
decodes element ranges into caller buffers (``read_into``); arrays it does not recognise fall
back to zarr-python. ``write_csr_store`` writes one complete anndata store around them.
"""
from __future__ import annotations

import json
import mmap as mmap_module
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

COLLECTION_ATTRS = {"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"}
FORMAT_NAME = "txfm-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VOCAB_FILE = "vocab.tsv"
VAL_GROUP = "val"
SHARD_PREFIX = "dataset_"  # annbatch finds its datasets by this prefix
CODECS = ("none", "lz4", "zstd")

_MISSING = np.uint64(2**64 - 1)
# MADV_POPULATE_READ (Linux 5.14); Python's mmap module names it only from 3.13
_POPULATE_READ = [getattr(mmap_module, "MADV_POPULATE_READ", 22 if os.uname().sysname == "Linux"
                          else None)]
_INDEX_ENTRY = 16  # (offset, nbytes) as two little-endian uint64


class ShardReadError(RuntimeError):
    """A shard file is missing, truncated or corrupt; the message names the shard and cells."""


def _crc32c(buf) -> int:
    import google_crc32c  # a zarr dependency; the same checksum zarr's crc32c codec uses

    return int(google_crc32c.value(bytes(buf)))


def _compressor_json(codec: str, itemsize: int) -> list[dict]:
    if codec == "none":
        return []
    if codec == "lz4":
        return [{"name": "blosc", "configuration": {"typesize": itemsize, "cname": "lz4",
                                                    "clevel": 3, "shuffle": "shuffle",
                                                    "blocksize": 0}}]
    if codec == "zstd":
        return [{"name": "zstd", "configuration": {"level": 1, "checksum": False}}]
    raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")


def _numcodec(codec: str):
    import numcodecs

    if codec == "lz4":
        return numcodecs.Blosc(cname="lz4", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE, blocksize=0)
    if codec == "zstd":
        return numcodecs.Zstd(level=1)
    return None


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_group_json(path: Path, attributes: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / "zarr.json", {"zarr_format": 3, "node_type": "group",
                                           "attributes": attributes})


class ShardedArrayWriter:
    """Stream a 1-D array of known length into a zarr v3 sharded array, in bounded memory.

    ``append`` takes consecutive pieces of any size; inner chunks are cut and (optionally)
    compressed as they fill; each shard file gets its index + crc32c when it is complete.
    Uncompressed inner chunks are written back to back, so shard ``s`` is the raw bytes of
    elements ``[s * shard_len, (s + 1) * shard_len)`` (the last chunk zero-padded) followed
    by the index.
    """

    def __init__(self, array_dir: Path, *, length: int, dtype, inner: int, shard_chunks: int,
                 codec: str = "none", attributes: dict | None = None):
        self.dir = Path(array_dir)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.length = int(length)
        self.inner = max(1, int(inner))
        self.shard_chunks = max(1, int(shard_chunks))
        self.codec = codec
        self._compressor = _numcodec(codec)
        self._shard_len = self.inner * self.shard_chunks
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {
            "zarr_format": 3, "node_type": "array", "shape": [self.length],
            "data_type": self.dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [self._shard_len]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0,
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [self.inner],
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]
                + _compressor_json(codec, self.dtype.itemsize),
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                 {"name": "crc32c"}],
                "index_location": "end"}}],
            "attributes": attributes or {}, "storage_transformers": [],
        }
        if self.dtype.itemsize == 1:
            meta["codecs"][0]["configuration"]["codecs"][0] = {"name": "bytes"}
        (self.dir / "zarr.json").write_text(json.dumps(meta))
        (self.dir / "c").mkdir(exist_ok=True)
        self._written = 0  # elements handed to shard files so far
        self._pending: list[np.ndarray] = []  # < one inner chunk of leftovers (compressed path)
        self._pending_n = 0
        self._file = None
        self._shard = -1
        self._entries: list[tuple[int, int]] = []
        self._pos = 0

    # -- shard files -------------------------------------------------------------------
    def _open_shard(self, s: int) -> None:
        self._file = open(self.dir / "c" / str(s), "wb")
        self._shard, self._entries, self._pos = s, [], 0

    def _close_shard(self) -> None:
        index = np.full((self.shard_chunks, 2), _MISSING, dtype="<u8")
        if self._entries:
            index[: len(self._entries)] = np.asarray(self._entries, dtype="<u8")
        raw = index.tobytes()
        self._file.write(raw)
        self._file.write(np.uint32(_crc32c(raw)).astype("<u4").tobytes())
        self._file.close()
        self._file = None

    def _emit_chunk(self, chunk: np.ndarray) -> None:
        """Write one full inner chunk (``inner`` elements) to the current shard."""
        s = self._written // self._shard_len
        if self._shard != s:
            if self._file is not None:
                self._close_shard()
            self._open_shard(s)
        payload = chunk.astype(self.dtype, copy=False).tobytes()
        if self._compressor is not None:
            payload = self._compressor.encode(chunk.astype(self.dtype, copy=False))
        self._file.write(payload)
        self._entries.append((self._pos, len(payload)))
        self._pos += len(payload)
        self._written += self.inner

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values).reshape(-1)
        if self._compressor is None and self._pending_n == 0:
            self._append_raw(values)
            return
        self._pending.append(values)
        self._pending_n += values.size
        if self._pending_n >= self.inner:
            buf = np.concatenate(self._pending)
            n_full = buf.size // self.inner * self.inner
            for c in range(0, n_full, self.inner):
                self._emit_chunk(buf[c:c + self.inner])
            rest = buf[n_full:]
            self._pending, self._pending_n = ([rest] if rest.size else []), rest.size

    def _append_raw(self, values: np.ndarray) -> None:
        """Uncompressed fast path: whole inner chunks go to disk in one write per shard."""
        n_full = values.size // self.inner * self.inner
        done = 0
        while done < n_full:
            s = self._written // self._shard_len
            if self._shard != s:
                if self._file is not None:
                    self._close_shard()
                self._open_shard(s)
            room = self._shard_len - (self._written - s * self._shard_len)
            take = min(room, n_full - done)
            values[done:done + take].astype(self.dtype, copy=False).tofile(self._file)
            nbytes = self.inner * self.dtype.itemsize
            k0 = len(self._entries)
            self._entries.extend(((k0 + i) * nbytes, nbytes) for i in range(take // self.inner))
            self._pos += take * self.dtype.itemsize
            self._written += take
            done += take
        if n_full < values.size:
            self._pending, self._pending_n = [values[n_full:]], values.size - n_full

    def close(self) -> None:
        total = self._written + self._pending_n
        if total != self.length:
            raise RuntimeError(f"{self.dir}: wrote {total} elements, declared length {self.length}")
        if self._pending_n:
            last = np.zeros(self.inner, dtype=self.dtype)
            last[: self._pending_n] = np.concatenate(self._pending)
            self._pending, self._pending_n = [], 0
            self._emit_chunk(last)
            self._written = self.length
        if self._file is not None:
            self._close_shard()


def _pread_into(fd: int, out: np.ndarray, offset: int, what: Callable[[], str]) -> None:
    view = memoryview(out).cast("B")
    done = 0
    while done < view.nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise ShardReadError(f"{what()}: file ended {view.nbytes - done} bytes early "
                                 f"(truncated shard file)")
        done += n


class ShardedArrayReader:
    """Element-range reads of a 1-D zarr v3 array (sharded or not) into caller buffers.

    ``where(e0, e1)`` turns an element range into a human description (shard and cells) for
    error messages. Every shard index is read and checked when the reader is created.
    """

    def __init__(self, array_dir: Path, where: Callable[[int, int], str]):
        self.dir = Path(array_dir)
        self._where = where
        meta_path = self.dir / "zarr.json"
        if not meta_path.is_file():
            raise ShardReadError(f"{where(0, -1)}: array metadata {meta_path} is missing")
        meta = json.loads(meta_path.read_text())
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.length = int(meta["shape"][0])
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._zarr = None
        layout = self._parse(meta)
        if layout is None:  # a layout we do not read natively: let zarr-python do it
            import zarr

            self._zarr = zarr.open_array(self.dir, mode="r")
            return
        self.shard_len, self.inner, codec, self._index_at_end = layout
        self._decoder = _numcodec(codec)
        self._chunk_bytes = self.inner * self.dtype.itemsize
        n_shards = -(-self.length // self.shard_len)
        self._contiguous = np.zeros(n_shards, dtype=bool)
        self._data_start = np.zeros(n_shards, dtype=np.int64)
        self._index: list[np.ndarray | None] = [None] * n_shards
        for s in range(n_shards):
            self._load_index(s)

    @staticmethod
    def _parse(meta: dict):
        codecs = meta.get("codecs", [])
        if len(meta["shape"]) != 1 or len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
            return None
        cfg = codecs[0]["configuration"]
        inner_codecs = [c["name"] for c in cfg["codecs"]]
        idx_codecs = [c["name"] for c in cfg["index_codecs"]]
        if inner_codecs[0] != "bytes" or idx_codecs != ["bytes", "crc32c"]:
            return None
        if cfg["codecs"][0].get("configuration", {}).get("endian", "little") != "little":
            return None
        rest = cfg["codecs"][1:]
        if not rest:
            codec = "none"
        elif len(rest) == 1 and rest[0]["name"] == "blosc":
            codec = "lz4"  # any blosc frame decodes with numcodecs.Blosc
        elif len(rest) == 1 and rest[0]["name"] == "zstd":
            codec = "zstd"
        else:
            return None
        shard_len = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        inner = int(cfg["chunk_shape"][0])
        return shard_len, inner, codec, cfg.get("index_location", "end") == "end"

    # -- files ---------------------------------------------------------------------------
    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():  # forked: pread on inherited fds is safe, but be tidy
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(s)
        if fd is None:
            path = self.dir / "c" / str(s)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                e0 = s * self.shard_len
                raise ShardReadError(f"{self._where(e0, min(self.length, e0 + self.shard_len))}: "
                                     f"shard file {path} is missing") from None
            self._fds[s] = fd
        return fd

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"] = {}
        state.pop("_maps", None)
        return state

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        try:
            if self._pid == os.getpid():
                self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _load_index(self, s: int) -> None:
        e0 = s * self.shard_len
        e1 = min(self.length, e0 + self.shard_len)
        where = lambda: f"{self._where(e0, e1)} ({self.dir / 'c' / str(s)})"  # noqa: E731
        fd = self._fd(s)
        size = os.fstat(fd).st_size
        n_chunks = self.shard_len // self.inner
        idx_bytes = n_chunks * _INDEX_ENTRY + 4
        if size < idx_bytes:
            raise ShardReadError(f"{where()}: shard file has {size} bytes, less than its "
                                 f"{idx_bytes}-byte index (truncated)")
        raw = np.empty(idx_bytes, dtype=np.uint8)
        _pread_into(fd, raw, size - idx_bytes if self._index_at_end else 0, where)
        stored = int(raw[-4:].view("<u4")[0])
        if _crc32c(raw[:-4]) != stored:
            raise ShardReadError(f"{where()}: shard index checksum mismatch (file truncated, "
                                 f"appended to or overwritten)")
        index = raw[:-4].view("<u8").reshape(n_chunks, 2)
        n_used = -(-(e1 - e0) // self.inner)
        used = index[:n_used]
        missing = np.flatnonzero(used[:, 0] == _MISSING)
        if missing.size:
            c = int(missing[0])
            c0 = e0 + c * self.inner
            raise ShardReadError(f"{self._where(c0, min(e1, c0 + self.inner))}: inner chunk {c} "
                                 f"of {self.dir / 'c' / str(s)} is missing")
        data_start = 0 if self._index_at_end else idx_bytes
        data_end = size - idx_bytes if self._index_at_end else size
        offsets = used[:, 0].astype(np.int64)
        ends = offsets + used[:, 1].astype(np.int64)
        bad = np.flatnonzero((offsets < data_start) | (ends > data_end))
        if bad.size:
            c = int(bad[0])
            c0 = e0 + c * self.inner
            raise ShardReadError(f"{self._where(c0, min(e1, c0 + self.inner))}: inner chunk {c} "
                                 f"lies outside {self.dir / 'c' / str(s)} (truncated or corrupt "
                                 f"shard)")
        expect = data_start + np.arange(n_used, dtype=np.int64) * self._chunk_bytes
        self._contiguous[s] = (self._decoder is None and np.array_equal(offsets, expect)
                               and bool(np.all(used[:, 1] == self._chunk_bytes)))
        self._data_start[s] = data_start
        self._index[s] = None if self._contiguous[s] else used.astype(np.int64)

    # -- reads ---------------------------------------------------------------------------
    def view(self, start: int, stop: int) -> np.ndarray | None:
        """Zero-copy read-only view of elements ``[start, stop)`` through a memory map of the
        shard file, or None when they are compressed or span two shard files."""
        if self._zarr is not None or stop <= start:
            return None
        s = start // self.shard_len
        if (stop - 1) // self.shard_len != s or not self._contiguous[s]:
            return None
        maps = self.__dict__.setdefault("_maps", {})
        if maps.get("pid") != os.getpid():
            maps.clear()
            maps["pid"] = os.getpid()
        m = maps.get(s)
        if m is None:
            n = min(self.length - s * self.shard_len, self.shard_len)
            mm = np.memmap(self.dir / "c" / str(s), dtype=self.dtype, mode="r",
                           offset=int(self._data_start[s]), shape=(n,))
            # slices of a plain ndarray view cost ~0.2 us; of np.memmap ~2 us (Python hook)
            m = maps[s] = (mm, mm.view(np.ndarray))
        base = s * self.shard_len
        return m[1][start - base:stop - base]

    def _advise(self, start: int, stop: int, advice: int) -> bool:
        maps = self.__dict__.get("_maps")
        if not maps or maps.get("pid") != os.getpid():
            return False
        s = start // self.shard_len
        m = maps.get(s)
        if m is None:
            return False
        raw = m[0]._mmap
        page = mmap_module.PAGESIZE
        # np.memmap maps from the page-aligned offset below the data start
        delta = int(self._data_start[s]) % mmap_module.ALLOCATIONGRANULARITY
        base = s * self.shard_len
        lo = delta + (start - base) * self.dtype.itemsize
        hi = delta + (min(stop, base + self.shard_len) - base) * self.dtype.itemsize
        lo, hi = lo // page * page, min(len(raw), -(-hi // page) * page)
        if hi > lo:
            raw.madvise(advice, lo, hi - lo)
        return True

    def populate(self, start: int, stop: int) -> None:
        """Map the pages of ``[start, stop)`` in one call (MADV_POPULATE_READ, Linux >= 5.14)
        instead of one page fault per few pages later; a no-op where unsupported."""
        if _POPULATE_READ[0] is None:
            return
        try:
            self._advise(start, stop, _POPULATE_READ[0])
        except OSError:  # older kernel: fall back to faulting pages in on first touch
            _POPULATE_READ[0] = None

    def release(self, start: int, stop: int) -> None:
        """Drop the pages of ``[start, stop)`` from this process' mapping (they stay in the
        page cache), so that RSS does not grow to the size of the corpus."""
        if hasattr(mmap_module, "MADV_DONTNEED"):
            self._advise(start, stop, mmap_module.MADV_DONTNEED)

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy elements ``[start, stop)`` into ``out`` (same dtype, ``stop - start`` long)."""
        if stop <= start:
            return
        if self._zarr is not None:
            out[:] = self._zarr[start:stop]
            return
        pos = start
        while pos < stop:
            s = pos // self.shard_len
            s_end = min(stop, (s + 1) * self.shard_len)
            dst = out[pos - start: s_end - start]
            local = pos - s * self.shard_len
            if self._contiguous[s]:
                offset = int(self._data_start[s]) + local * self.dtype.itemsize
                _pread_into(self._fd(s), dst, offset, lambda: self._where(pos, s_end))
            else:
                self._read_chunks(s, local, dst)
            pos = s_end

    def _read_chunks(self, s: int, local: int, dst: np.ndarray) -> None:
        index = self._index[s]
        c0, c1 = local // self.inner, (local + dst.size - 1) // self.inner + 1
        fd = self._fd(s)
        base = s * self.shard_len
        for c in range(c0, c1):
            off, nbytes = int(index[c, 0]), int(index[c, 1])
            e0 = base + c * self.inner
            where = lambda: self._where(e0, min(self.length, e0 + self.inner))  # noqa: E731
            raw = np.empty(nbytes, dtype=np.uint8)
            _pread_into(fd, raw, off, where)
            try:
                chunk = raw if self._decoder is None else np.frombuffer(self._decoder.decode(raw),
                                                                        dtype=np.uint8)
                chunk = chunk.view(self.dtype)
            except Exception as exc:  # noqa: BLE001 - any codec failure is a corrupt chunk
                raise ShardReadError(f"{where()}: inner chunk {c} of {self.dir / 'c' / str(s)} "
                                     f"does not decode ({exc})") from exc
            if chunk.size != self.inner:
                raise ShardReadError(f"{where()}: inner chunk {c} of {self.dir / 'c' / str(s)} "
                                     f"decodes to {chunk.size} elements, expected {self.inner}")
            lo = max(local, c * self.inner) - c * self.inner
            hi = min(local + dst.size, (c + 1) * self.inner) - c * self.inner
            d0 = c * self.inner + lo - local
            dst[d0:d0 + hi - lo] = chunk[lo:hi]


def _elements_to_files(path: Path, elems: dict, cache: dict | None) -> None:
    """Write anndata elements (``obs``, ``var``, ...) through an in-memory zarr store, then
    dump its files: zarr-python's per-operation overhead makes writing them straight to disk
    several times slower. ``cache`` (key -> files) reuses elements identical across shards."""
    import anndata as ad
    import zarr
    from zarr.storage import MemoryStore

    files: dict[str, bytes] = {}
    todo = {}
    for key, value in elems.items():
        if cache is not None and key in cache:
            files.update(cache[key])
        else:
            todo[key] = value
    if todo:
        store = MemoryStore()
        group = zarr.open_group(store, mode="w", zarr_format=3)
        with warnings.catch_warnings(), ad.settings.override(zarr_write_format=3):
            warnings.simplefilter("ignore")
            for key, value in todo.items():
                ad.io.write_elem(group, key, value)
        for name, buf in store._store_dict.items():
            top = name.split("/", 1)[0]
            if top in todo:
                files[name] = buf.to_bytes()
                if cache is not None and top in ("var", "uns", "obsm", "varm", "obsp", "varp",
                                                 "layers"):
                    cache.setdefault(top, {})[name] = files[name]
    for name, data in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def write_csr_store(path: Path, *, indptr: np.ndarray, indices: np.ndarray, counts: np.ndarray,
                    n_genes: int, obs, var, codec: str = "none", rows_per_chunk: int = 64,
                    shard_bytes: int = 1 << 30, uns: dict | None = None,
                    cache: dict | None = None) -> None:
    """Write one anndata store (zarr v3) with CSR ``X``; ``indices``/``counts`` keep their dtypes.

    Inner chunks hold ``rows_per_chunk`` rows' worth of elements on average (annbatch's
    recommendation, 64); zarr shards are at most ``shard_bytes``. ``cache`` (a dict kept
    across calls) holds the encoded ``var`` and empty elements, which are the same in every
    shard of a collection.
    """
    import zarr

    path = Path(path)
    n_rows = indptr.size - 1
    nnz = int(indptr[-1])
    write_group_json(path, {"encoding-type": "anndata", "encoding-version": "0.1.0"})
    write_group_json(path / "X", {"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                                  "shape": [int(n_rows), int(n_genes)]})
    inner = max(1, int(round(rows_per_chunk * nnz / max(n_rows, 1))))
    inner = min(inner, max(nnz, 1))
    for name, arr in (("data", counts), ("indices", indices)):
        shard_chunks = max(1, int(shard_bytes // (inner * arr.dtype.itemsize)))
        shard_chunks = min(shard_chunks, max(1, -(-nnz // inner)))
        w = ShardedArrayWriter(path / "X" / name, length=nnz, dtype=arr.dtype, inner=inner,
                               shard_chunks=shard_chunks, codec=codec)
        w.append(arr)
        w.close()
    ip = ShardedArrayWriter(path / "X" / "indptr", length=indptr.size, dtype=np.int64,
                            inner=max(1, indptr.size), shard_chunks=1)
    ip.append(indptr.astype(np.int64, copy=False))
    ip.close()
    _elements_to_files(path, {"obs": obs, "var": var, "uns": uns or {}, "obsm": {}, "varm": {},
                              "obsp": {}, "varp": {}, "layers": {}}, cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not part of the v3 spec"
        zarr.consolidate_metadata(path)
