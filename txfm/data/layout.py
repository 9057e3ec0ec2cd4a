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
vocabulary ids sorted within each row, ``indptr`` int32 while the shard's non-zeros fit,
else int64), ``obs`` and ``var`` (= the vocabulary), so
``anndata.read_zarr(SHARDS / "dataset_0")`` reads it.

What readers get and what is stored differ (format version 2):

* ``anndata.read_zarr`` / annbatch / zarr return an ordinary CSR: ``indices`` int32 and
  ``data`` float32 (float64 where counts needed uint32 on disk, so that every count stays
  exact), so ``X @ X.T``, ``X.power(2)`` or ``X * 1000`` behave as on any other AnnData.
* On disk, counts and indices are the narrowest unsigned integers that hold them (``uint16``
  when they fit): a ``numcodecs.fixedscaleoffset`` codec with scale 1 and offset 0 (exact
  for integers; read by zarr-python and zarrs) widens them as they are read. That halves the
  bytes of the float32/int32 layout, which is what lets :class:`~txfm.data.ShardLoader` read
  the raw narrow values straight from a memory map, with no decode step, and outrun
  blosc-lz4-bound readers on a small CPU (``bench/RESULTS.md``).
* ``X/data``, ``X/indices`` and ``X/indptr`` are 1-D zarr v3 arrays with the
  ``sharding_indexed`` codec (index at the end) and inner chunks of ~64 rows' worth of
  elements (annbatch's recommendation); every inner chunk ends with its crc32c (zarr's
  ``crc32c`` codec) and every shard index has one too. By default chunks are not compressed,
  so a shard file is its chunks back to back (each followed by 4 checksum bytes) and then
  the index; lz4 and zstd inner chunks are available (``--codec``) for smaller files at a
  decode cost. The ``obs``/``var``/``uns`` arrays are zstd-compressed with a crc32c as well,
  so every chunk that holds data can be verified (``txfm data verify``).

Collections of format version 1 (uint16 arrays as such, no per-chunk checksums) are still
read; they cannot be verified.

:class:`ShardedArrayWriter` streams such an array to disk in bounded memory and writes the
shard index itself; :class:`ShardedArrayReader` validates every shard index up front (missing
file, truncation, checksum, missing or out-of-range chunk), hands out zero-copy,
chunk-by-chunk views of memory-mapped uncompressed shards (``pieces``/``release``), checks
chunk checksums where asked, and otherwise reads or decodes element ranges into caller
buffers (``read_into``); arrays it does not recognise fall back to zarr-python.
``write_csr_store`` writes one complete anndata store around them.
"""
from __future__ import annotations

import json
import mmap as mmap_module
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from txfm.files import write_atomic

COLLECTION_ATTRS = {"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"}
FORMAT_NAME = "txfm-shards"
FORMAT_VERSION = 2  # 2: arrays read as int32/float32, crc32c on every chunk
MANIFEST = "manifest.json"
VOCAB_FILE = "vocab.tsv"
WORK = ".txfm-convert"  # a conversion's working folder, removed when it finishes
LOCK = ".txfm-convert.lock"  # held (flock) by the conversion writing the folder
VAL_GROUP = "val"
SHARD_PREFIX = "dataset_"  # annbatch finds its datasets by this prefix
CODECS = ("none", "lz4", "zstd")

# stored dtype -> the dtype readers get (the smallest ordinary one that holds every value)
_READ_AS = {"counts": {"uint16": "float32", "uint32": "float64", "float32": "float32"},
            "indices": {"uint16": "int32", "uint32": "int32", "int32": "int32"}}

_MISSING = np.uint64(2**64 - 1)
# MADV_POPULATE_READ (Linux 5.14); Python's mmap module names it only from 3.13
_POPULATE_READ = [getattr(mmap_module, "MADV_POPULATE_READ", 22 if os.uname().sysname == "Linux"
                          else None)]
_INDEX_ENTRY = 16  # (offset, nbytes) as two little-endian uint64
_CRC = 4  # bytes of a crc32c trailer


class ShardReadError(RuntimeError):
    """A shard file is missing, truncated or corrupt; the message names the shard and cells,
    and ends with what to do (unless it says so itself)."""

    FIX = ("`txfm data verify` on the shard folder lists every damaged chunk; converting the "
           "inputs again (`txfm data convert ... --overwrite`) mends them")

    def __str__(self) -> str:
        text = super().__str__()
        return text if "convert" in text else f"{text} ({self.FIX})"


def cell_range(start: int, stop: int) -> str:
    """The cells ``[start, stop)`` as a message names them: ``cells 64-98`` (both ends
    included, so a 99-cell shard never shows a cell 99), ``cell 64`` for one, ``no cells``
    for none: the one way messages print a range of cells."""
    if stop <= start:
        return "no cells"
    if stop == start + 1:
        return f"cell {start}"
    return f"cells {start}-{stop - 1}"


def shard_cells_where(shard: str, indptr: np.ndarray | None, cell_offset: int,
                      n_cells: int) -> Callable[[int, int], str]:
    """The ``where(e0, e1)`` of a shard's :class:`ShardedArrayReader`: the shard and the cells
    (of the shard and of the corpus, :func:`cell_range`) holding the non-zeros ``[e0, e1)``;
    ``e1 < 0`` (or no ``indptr``, the shard's ``int [n_cells + 1]`` row offsets): the whole
    shard."""
    def where(e0: int, e1: int) -> str:
        if e1 < 0 or indptr is None:
            return f"shard {shard} (corpus {cell_range(cell_offset, cell_offset + n_cells)})"
        r0 = int(np.searchsorted(indptr, e0, side="right") - 1)
        r1 = int(np.searchsorted(indptr, max(e0, e1 - 1), side="right"))
        r1 = min(max(r1, r0 + 1), n_cells)
        return (f"shard {shard}, {cell_range(r0, r1)} of the shard (corpus "
                f"{cell_range(cell_offset + r0, cell_offset + r1)})")

    return where


def read_metadata(path: Path) -> dict:
    """A ``zarr.json`` (or other JSON metadata file) as a dict.

    Raises:
        ShardReadError: the file is missing or not a JSON object; the message names the file.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardReadError(f"{path}: metadata cannot be read ({type(exc).__name__}: {exc}); "
                             f"the file is damaged: convert the inputs again (txfm data verify "
                             f"lists every damaged file)") from exc
    if not isinstance(doc, dict):
        raise ShardReadError(f"{path}: metadata is not a JSON object; the file is damaged: "
                             f"convert the inputs again")
    return doc


def missing_chunks(array_dir: Path, meta: dict | None = None) -> list[str]:
    """The chunk (or zarr shard) files of the zarr v3 array in ``array_dir`` that are absent.

    zarr reads an absent chunk as the array's fill value without a word, which is right only
    where the writer skipped chunks that held nothing else; txfm writes every chunk (the
    manifest's ``every_chunk_written``), so for its collections an absent file is damage.
    Arrays of another chunk grid or key encoding give ``[]`` (not checked).
    """
    array_dir = Path(array_dir)
    meta = read_metadata(array_dir / "zarr.json") if meta is None else meta
    grid, keys = meta.get("chunk_grid", {}), meta.get("chunk_key_encoding", {})
    if grid.get("name") != "regular" or keys.get("name") != "default":
        return []
    shape, chunk = meta.get("shape", []), grid.get("configuration", {}).get("chunk_shape", [])
    if len(shape) != len(chunk) or not all(int(c) > 0 for c in chunk):
        return []
    sep = keys.get("configuration", {}).get("separator", "/")
    counts = [-(-int(n) // int(c)) for n, c in zip(shape, chunk)]
    missing = []
    for index in np.ndindex(*counts) if all(counts) else ():
        key = sep.join(["c", *map(str, index)]) if index else "c"
        if not (array_dir / key).is_file():
            missing.append(str(array_dir / key))
    return missing


def damaged_metadata(folder: Path) -> list[str]:
    """The messages of every ``zarr.json`` under ``folder`` that :func:`read_metadata` refuses."""
    found = []
    for meta_file in sorted(Path(folder).rglob("zarr.json")):
        try:
            read_metadata(meta_file)
        except ShardReadError as err:
            found.append(str(err))
    return found


def _crc32c(buf) -> int:
    """crc32c of a contiguous buffer (bytes or ndarray; no copy): zarr's ``crc32c`` codec."""
    import google_crc32c  # a zarr dependency

    return int(google_crc32c.value(buf))


def read_dtype(stored, role: str) -> np.dtype:
    """The dtype zarr/anndata return for ``role`` ("counts" or "indices") stored as ``stored``."""
    try:
        name = np.dtype(stored).name
    except TypeError:  # not a dtype at all: refused below like any dtype txfm does not store
        name = str(stored)
    try:
        return np.dtype(_READ_AS[role][name])
    except KeyError:
        raise ValueError(f"cannot store {role} as {name}; use one of "
                         f"{sorted(_READ_AS[role])}") from None


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


def write_json_atomic(path: Path, obj, indent: int = 1) -> None:
    """``obj`` as JSON through a temporary file renamed onto ``path``: a crash or signal leaves
    the old file or the new one, never half of either, and no temporary file."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=indent)), durable=True)


def write_group_json(path: Path, attributes: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / "zarr.json", {"zarr_format": 3, "node_type": "group",
                                           "attributes": attributes})


class ShardedArrayWriter:
    """Stream a 1-D array of known length into a zarr v3 sharded array, in bounded memory.

    ``append`` takes consecutive pieces of any size; inner chunks are cut, (optionally)
    compressed and followed by their crc32c as they fill; each shard file gets its index +
    crc32c when it is complete. ``dtype`` is what is stored; ``read_as`` (default: the same)
    is the array's zarr ``data_type``, what readers get: a ``numcodecs.fixedscaleoffset``
    codec (scale 1, offset 0) converts between them, exactly for integers. Uncompressed inner
    chunks are written back to back, so shard ``s`` is chunk after chunk of ``inner`` raw
    elements (the last zero-padded), each followed by its 4-byte crc32c, then the index.
    ``checksum=False`` writes format-1 arrays (no per-chunk crc32c; for tests).
    """

    def __init__(self, array_dir: Path, *, length: int, dtype, inner: int, shard_chunks: int,
                 codec: str = "none", read_as=None, attributes: dict | None = None,
                 checksum: bool = True):
        self.dir = Path(array_dir)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        read_as = self.dtype if read_as is None else np.dtype(read_as).newbyteorder("<")
        self.length = int(length)
        self.inner = max(1, int(inner))
        self.shard_chunks = max(1, int(shard_chunks))
        self.codec = codec
        self.checksum = bool(checksum)
        self._compressor = _numcodec(codec)
        self._shard_len = self.inner * self.shard_chunks
        self.dir.mkdir(parents=True, exist_ok=True)
        inner_codecs = [{"name": "bytes", "configuration": {"endian": "little"}}
                        if self.dtype.itemsize > 1 else {"name": "bytes"}]
        if read_as != self.dtype:
            inner_codecs.insert(0, {"name": "numcodecs.fixedscaleoffset", "configuration": {
                "scale": 1, "offset": 0, "dtype": read_as.str, "astype": self.dtype.str}})
        inner_codecs += _compressor_json(codec, self.dtype.itemsize)
        if self.checksum:
            inner_codecs.append({"name": "crc32c"})
        meta = {
            "zarr_format": 3, "node_type": "array", "shape": [self.length],
            "data_type": read_as.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [self._shard_len]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0.0 if read_as.kind == "f" else 0,
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [self.inner],
                "codecs": inner_codecs,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                 {"name": "crc32c"}],
                "index_location": "end"}}],
            "attributes": attributes or {}, "storage_transformers": [],
        }
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

    def _to_shard(self) -> None:
        s = self._written // self._shard_len
        if self._shard != s:
            if self._file is not None:
                self._close_shard()
            self._open_shard(s)

    def _emit_chunk(self, chunk: np.ndarray) -> None:
        """Write one full inner chunk (``inner`` elements) to the current shard."""
        self._to_shard()
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        payload = chunk.tobytes() if self._compressor is None else self._compressor.encode(chunk)
        if self.checksum:
            payload = bytes(payload) + np.uint32(_crc32c(payload)).astype("<u4").tobytes()
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
        """Uncompressed fast path: whole inner chunks (+ their crc32c) go to disk in blocks."""
        n_full = values.size // self.inner * self.inner
        cb = self.inner * self.dtype.itemsize
        stride = cb + (_CRC if self.checksum else 0)
        block = max(1, (64 << 20) // stride)  # chunks per write: bounded extra memory
        done = 0
        while done < n_full:
            self._to_shard()
            room = self._shard_len - (self._written - self._shard * self._shard_len)
            k = min(room, n_full - done, block * self.inner) // self.inner
            raw = values[done:done + k * self.inner].astype(self.dtype, copy=False)
            raw = np.ascontiguousarray(raw).view(np.uint8).reshape(k, cb)
            if self.checksum:
                out = np.empty((k, stride), dtype=np.uint8)
                out[:, :cb] = raw
                crcs = np.array([_crc32c(row) for row in raw], dtype="<u4")
                out[:, cb:] = crcs.view(np.uint8).reshape(k, _CRC)
                raw = out
            raw.tofile(self._file)
            k0 = len(self._entries)
            self._entries.extend(((k0 + i) * stride, stride) for i in range(k))
            self._pos += k * stride
            self._written += k * self.inner
            done += k * self.inner
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

    ``dtype`` is the stored dtype (what :meth:`pieces` and :meth:`read_into` deliver),
    ``read_dtype`` what zarr/anndata return; ``checksum`` whether inner chunks carry a
    crc32c. ``where(e0, e1)`` turns an element range into a human description (shard and
    cells) for error messages. Every shard index is read and checked on creation; chunk
    checksums are checked by :meth:`check` (mapped pieces), by :meth:`read_into` when asked
    and by :meth:`verify` (every chunk).
    """

    def __init__(self, array_dir: Path, where: Callable[[int, int], str]):
        self.dir = Path(array_dir)
        self._where = where
        meta_path = self.dir / "zarr.json"
        if not meta_path.is_file():
            raise ShardReadError(f"{where(0, -1)}: array metadata {meta_path} is missing")
        meta = read_metadata(meta_path)
        self.read_dtype = np.dtype(meta["data_type"])
        self.dtype = self.read_dtype.newbyteorder("<")
        self.length = int(meta["shape"][0])
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._zarr = None
        layout = self._parse(meta)
        if layout is None:  # a layout we do not read natively: let zarr-python do it
            import zarr

            self._zarr = zarr.open_array(self.dir, mode="r")
            self.checksum = "crc32c" in json.dumps(meta["codecs"])  # zarr checks it on read
            return
        self.shard_len, self.inner, codec, self._index_at_end, stored, self.checksum = layout
        self.dtype = stored
        self._decoder = _numcodec(codec)
        self._chunk_bytes = self.inner * self.dtype.itemsize
        self._stride = self._chunk_bytes + (_CRC if self.checksum else 0)  # uncompressed
        n_shards = -(-self.length // self.shard_len)
        self._regular = np.zeros(n_shards, dtype=bool)  # chunks back to back, uncompressed
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
        chain = list(cfg["codecs"])
        idx_codecs = [c["name"] for c in cfg["index_codecs"]]
        if idx_codecs != ["bytes", "crc32c"]:
            return None
        stored = np.dtype(meta["data_type"]).newbyteorder("<")
        if chain and chain[0]["name"] == "numcodecs.fixedscaleoffset":
            c = chain.pop(0)["configuration"]
            if (float(c.get("scale", 1)) != 1 or float(c.get("offset", 0)) != 0
                    or "astype" not in c or np.dtype(c["dtype"]) != np.dtype(meta["data_type"])):
                return None
            stored = np.dtype(c["astype"])
            if stored.byteorder == ">" or stored.kind not in "uif":
                return None
        if not chain or chain[0]["name"] != "bytes":
            return None
        if chain.pop(0).get("configuration", {}).get("endian", "little") != "little":
            return None
        checksum = bool(chain) and chain[-1]["name"] == "crc32c"
        if checksum:
            chain.pop()
        if not chain:
            codec = "none"
        elif len(chain) == 1 and chain[0]["name"] == "blosc":
            codec = "lz4"  # any blosc frame decodes with numcodecs.Blosc
        elif len(chain) == 1 and chain[0]["name"] == "zstd":
            codec = "zstd"
        else:
            return None
        shard_len = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        inner = int(cfg["chunk_shape"][0])
        return (shard_len, inner, codec, cfg.get("index_location", "end") == "end",
                stored.newbyteorder("<"), checksum)

    # -- files ---------------------------------------------------------------------------
    def _path(self, s: int) -> Path:
        return self.dir / "c" / str(s)

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():  # forked: pread on inherited fds is safe, but be tidy
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(s)
        if fd is None:
            try:
                fd = os.open(self._path(s), os.O_RDONLY)
            except FileNotFoundError:
                e0 = s * self.shard_len
                raise ShardReadError(f"{self._where(e0, min(self.length, e0 + self.shard_len))}: "
                                     f"shard file {self._path(s)} is missing") from None
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

    def _chunk_where(self, c: int) -> str:
        """Shard, cells and file of global inner chunk ``c`` (for error messages)."""
        e0 = c * self.inner
        s = e0 // self.shard_len
        return (f"{self._where(e0, min(self.length, e0 + self.inner))}: inner chunk "
                f"{c - s * (self.shard_len // self.inner)} of {self._path(s)}")

    def _load_index(self, s: int) -> None:
        e0 = s * self.shard_len
        e1 = min(self.length, e0 + self.shard_len)
        where = lambda: f"{self._where(e0, e1)} ({self._path(s)})"  # noqa: E731
        fd = self._fd(s)
        size = os.fstat(fd).st_size
        n_chunks = self.shard_len // self.inner
        idx_bytes = n_chunks * _INDEX_ENTRY + _CRC
        if size < idx_bytes:
            raise ShardReadError(f"{where()}: shard file has {size} bytes, less than its "
                                 f"{idx_bytes}-byte index (truncated)")
        raw = np.empty(idx_bytes, dtype=np.uint8)
        _pread_into(fd, raw, size - idx_bytes if self._index_at_end else 0, where)
        stored = int(raw[-_CRC:].view("<u4")[0])
        if _crc32c(raw[:-_CRC]) != stored:
            raise ShardReadError(f"{where()}: shard index checksum mismatch (file truncated, "
                                 f"appended to or overwritten)")
        index = raw[:-_CRC].view("<u8").reshape(n_chunks, 2)
        n_used = -(-(e1 - e0) // self.inner)
        used = index[:n_used]
        c_first = s * n_chunks
        missing = np.flatnonzero(used[:, 0] == _MISSING)
        if missing.size:
            raise ShardReadError(f"{self._chunk_where(c_first + int(missing[0]))} is missing")
        data_start = 0 if self._index_at_end else idx_bytes
        data_end = size - idx_bytes if self._index_at_end else size
        offsets = used[:, 0].astype(np.int64)
        ends = offsets + used[:, 1].astype(np.int64)
        bad = np.flatnonzero((offsets < data_start) | (ends > data_end)
                             | (used[:, 1] < (_CRC if self.checksum else 0)))
        if bad.size:
            raise ShardReadError(f"{self._chunk_where(c_first + int(bad[0]))} lies outside the "
                                 f"file (truncated or corrupt shard)")
        expect = data_start + np.arange(n_used, dtype=np.int64) * self._stride
        self._regular[s] = (self._decoder is None and np.array_equal(offsets, expect)
                            and bool(np.all(used[:, 1] == self._stride)))
        self._data_start[s] = data_start
        self._index[s] = None if self._regular[s] else used.astype(np.int64)

    # -- memory-mapped pieces --------------------------------------------------------------
    def _map(self, s: int) -> np.ndarray:
        """Shard ``s``'s chunk region as a flat uint8 array backed by a memory map."""
        maps = self.__dict__.setdefault("_maps", {})
        if maps.get("pid") != os.getpid():
            maps.clear()
            maps["pid"] = os.getpid()
        m = maps.get(s)
        if m is None:
            n_used = -(-(min(self.length, (s + 1) * self.shard_len) - s * self.shard_len)
                       // self.inner)
            mm = np.memmap(self._path(s), dtype=np.uint8, mode="r",
                           offset=int(self._data_start[s]), shape=(n_used * self._stride,))
            # slices of a plain ndarray view cost ~0.2 us; of np.memmap ~2 us (Python hook)
            m = maps[s] = (mm, mm.view(np.ndarray))
        return m[1]

    def _chunks(self, start: int, stop: int) -> range:
        return range(start // self.inner, (stop - 1) // self.inner + 1)

    def mappable(self, start: int, stop: int) -> bool:
        """Whether ``[start, stop)`` can be served as memory-mapped pieces (uncompressed)."""
        if self._zarr is not None or stop <= start:
            return False
        return bool(np.all(self._regular[start // self.shard_len:
                                         (stop - 1) // self.shard_len + 1]))

    def pieces(self, start: int, stop: int) -> list[np.ndarray]:
        """Zero-copy read-only views of elements ``[start, stop)``, one per inner chunk
        touched (in order), from memory maps of the shard files (see :meth:`mappable`).
        The pages of those whole chunks are mapped in one call per shard file
        (MADV_POPULATE_READ, Linux >= 5.14) instead of one page fault per few pages later."""
        per_shard = self.shard_len // self.inner
        out = []
        for c in self._chunks(start, stop):
            s, lc = divmod(c, per_shard)
            raw = self._map(s)
            b0 = lc * self._stride
            if lc == 0 or c == start // self.inner:  # first chunk of a shard file or range
                c_end = min((s + 1) * per_shard, (stop - 1) // self.inner + 1)
                self._advise(s, b0, (c_end - s * per_shard) * self._stride, _POPULATE_READ[0])
            lo = max(start - c * self.inner, 0)
            hi = min(stop - c * self.inner, self.inner)
            out.append(raw[b0:b0 + self._chunk_bytes].view(self.dtype)[lo:hi])
        return out

    def check(self, start: int, stop: int) -> None:
        """Check the crc32c of every inner chunk holding ``[start, stop)`` of a mappable
        range; a mismatch raises :class:`ShardReadError` naming the shard, the cells and the
        file. A no-op for arrays without per-chunk checksums (format 1)."""
        if not self.checksum:
            return
        per_shard = self.shard_len // self.inner
        for c in self._chunks(start, stop):
            s, lc = divmod(c, per_shard)
            raw = self._map(s)
            b0 = lc * self._stride
            self._check(c, raw[b0:b0 + self._chunk_bytes],
                        raw[b0 + self._chunk_bytes:b0 + self._stride])

    def _check(self, c: int, body, trailer) -> None:
        if _crc32c(body) != int(np.frombuffer(trailer, dtype="<u4")[0]):
            raise ShardReadError(f"{self._chunk_where(c)} fails its crc32c checksum (the data "
                                 f"changed after it was written: corrupt file or disk)")

    def _advise(self, s: int, lo: int, hi: int, advice: int | None) -> None:
        """madvise bytes ``[lo, hi)`` of shard ``s``'s chunk region (page-aligned outward)."""
        maps = self.__dict__.get("_maps")
        if advice is None or not maps or maps.get("pid") != os.getpid() or s not in maps:
            return
        raw = maps[s][0]._mmap
        page = mmap_module.PAGESIZE
        # np.memmap maps from the allocation-granularity-aligned offset below the data start
        delta = int(self._data_start[s]) % mmap_module.ALLOCATIONGRANULARITY
        lo, hi = (delta + lo) // page * page, min(len(raw), -(-(delta + hi) // page) * page)
        if hi <= lo:
            return
        try:
            raw.madvise(advice, lo, hi - lo)
        except OSError:  # MADV_POPULATE_READ needs Linux >= 5.14: fault pages in on use
            if advice == _POPULATE_READ[0]:
                _POPULATE_READ[0] = None

    def release(self, start: int, stop: int) -> None:
        """Drop the pages of the chunks holding ``[start, stop)`` from this process' mapping
        (they stay in the page cache), so that RSS does not grow to the size of the corpus."""
        if not hasattr(mmap_module, "MADV_DONTNEED") or stop <= start:
            return
        per_shard = self.shard_len // self.inner
        c0, c1 = start // self.inner, (stop - 1) // self.inner + 1
        for s in range(c0 // per_shard, (c1 - 1) // per_shard + 1):
            a = max(c0, s * per_shard) - s * per_shard
            b = min(c1, (s + 1) * per_shard) - s * per_shard
            self._advise(s, a * self._stride, b * self._stride, mmap_module.MADV_DONTNEED)

    # -- reads into buffers ----------------------------------------------------------------
    def read_into(self, start: int, stop: int, out: np.ndarray, *, verify: bool = True) -> None:
        """Copy elements ``[start, stop)`` into ``out`` (stored dtype, ``stop - start`` long),
        checking chunk checksums when ``verify``."""
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
            if self._regular[s] and not (verify and self.checksum):
                # chunks back to back: strided raw read, skipping the crc trailers
                self._read_regular(s, local, dst)
            else:
                self._read_chunks(s, local, dst, verify)
            pos = s_end

    def _read_regular(self, s: int, local: int, dst: np.ndarray) -> None:
        fd, pos, end = self._fd(s), local, local + dst.size
        while pos < end:
            c = pos // self.inner
            hi = min(end, (c + 1) * self.inner) if self.checksum else end
            off = int(self._data_start[s]) + c * self._stride + (pos - c * self.inner) * \
                self.dtype.itemsize
            e0 = s * self.shard_len + pos
            _pread_into(fd, dst[pos - local:hi - local], off,
                        lambda: self._where(e0, s * self.shard_len + hi))
            pos = hi

    def _chunk_bytes_at(self, s: int, lc: int) -> tuple[int, int]:
        if self._regular[s]:
            return int(self._data_start[s]) + lc * self._stride, self._stride
        index = self._index[s]
        return int(index[lc, 0]), int(index[lc, 1])

    def _decode_chunk(self, c: int, raw: np.ndarray, verify: bool) -> np.ndarray:
        """One inner chunk's stored elements from its encoded bytes (checksum checked when
        ``verify``)."""
        if self.checksum:
            if verify:
                self._check(c, raw[:-_CRC], raw[-_CRC:])
            raw = raw[:-_CRC]
        try:
            chunk = raw if self._decoder is None else np.frombuffer(self._decoder.decode(raw),
                                                                    dtype=np.uint8)
            chunk = chunk.view(self.dtype)
        except Exception as exc:  # noqa: BLE001 - any codec failure is a corrupt chunk
            raise ShardReadError(f"{self._chunk_where(c)} does not decode ({exc})") from exc
        if chunk.size != self.inner:
            raise ShardReadError(f"{self._chunk_where(c)} decodes to {chunk.size} elements, "
                                 f"expected {self.inner}")
        return chunk

    def _read_chunks(self, s: int, local: int, dst: np.ndarray, verify: bool) -> None:
        c0, c1 = local // self.inner, (local + dst.size - 1) // self.inner + 1
        fd = self._fd(s)
        per_shard = self.shard_len // self.inner
        for lc in range(c0, c1):
            c = s * per_shard + lc
            off, nbytes = self._chunk_bytes_at(s, lc)
            raw = np.empty(nbytes, dtype=np.uint8)
            _pread_into(fd, raw, off, lambda: self._chunk_where(c))
            chunk = self._decode_chunk(c, raw, verify)
            lo = max(local, lc * self.inner) - lc * self.inner
            hi = min(local + dst.size, (lc + 1) * self.inner) - lc * self.inner
            d0 = lc * self.inner + lo - local
            dst[d0:d0 + hi - lo] = chunk[lo:hi]

    def verify(self, problem: Callable[[str], None], *,
               progress: Callable[[int], None] | None = None,
               check: Callable[[int, np.ndarray], None] | None = None) -> int:
        """Check every inner chunk (crc32c, and that it decodes); returns the chunks checked.

        ``problem(message)`` is called for each bad chunk (the message names the shard,
        cells and file); ``check(e0, values)`` gets the stored values of each good chunk,
        from element ``e0`` on, in order; ``progress(nbytes)`` as bytes are read. An array
        without per-chunk checksums (format 1) is one problem."""
        if self._zarr is not None:
            raise ValueError(f"{self.dir}: not a txfm sharded array")
        if not self.checksum:
            problem(f"{self._where(0, -1)}: {self.dir} has no per-chunk checksums (written by "
                    f"txfm format 1): convert the inputs again to be able to verify it")
            return 0
        per_shard = self.shard_len // self.inner
        n_chunks = 0
        for s in range(len(self._regular)):
            n_used = -(-(min(self.length, (s + 1) * self.shard_len) - s * self.shard_len)
                       // self.inner)
            fd = self._fd(s)
            for lc in range(n_used):
                c = s * per_shard + lc
                off, nbytes = self._chunk_bytes_at(s, lc)
                raw = np.empty(nbytes, dtype=np.uint8)
                n_chunks += 1
                try:
                    _pread_into(fd, raw, off, lambda: self._chunk_where(c))
                    values = self._decode_chunk(c, raw, True)
                except ShardReadError as err:
                    problem(str(err))
                else:
                    if check is not None:
                        e0 = c * self.inner
                        check(e0, values[:min(self.inner, self.length - e0)])
                if progress is not None:
                    progress(nbytes)
        return n_chunks


def _elements_to_files(path: Path, elems: dict, cache: dict | None) -> None:
    """Write anndata elements (``obs``, ``var``, ...) through an in-memory zarr store, then
    dump its files: zarr-python's per-operation overhead makes writing them straight to disk
    several times slower. Every array is zstd-compressed with a crc32c after it, so that its
    chunks can be verified. ``cache`` (key -> files) reuses elements identical across
    shards."""
    import anndata as ad
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec
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
        kwargs = {"compressors": [ZstdCodec(), Crc32cCodec()]}
        # every chunk, even one of fill values only: an absent chunk file is then damage
        # (missing_chunks), not a chunk zarr skipped
        with warnings.catch_warnings(), ad.settings.override(zarr_write_format=3), \
                zarr.config.set({"array.write_empty_chunks": True}):
            warnings.simplefilter("ignore")
            for key, value in todo.items():
                ad.io.write_elem(group, key, value, dataset_kwargs=kwargs)
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
                    cache: dict | None = None, checksum: bool = True) -> None:
    """Write one anndata store (zarr v3) with CSR ``X``.

    ``indices``/``counts`` are stored in their dtypes (``uint16``/``uint32`` indices;
    ``uint16``/``uint32``/``float32`` counts) and read back by zarr/anndata as
    :func:`read_dtype` says (int32 indices; float32, or float64 for uint32, counts).
    Inner chunks hold ``rows_per_chunk`` rows' worth of elements on average (annbatch's
    recommendation, 64), each with its crc32c; zarr shards are at most ``shard_bytes``.
    ``cache`` (a dict kept across calls) holds the encoded ``var`` and empty elements, which
    are the same in every shard of a collection. ``checksum=False`` writes format-1 ``X``
    arrays (tests of old collections only).
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
    for name, arr, role in (("data", counts, "counts"), ("indices", indices, "indices")):
        shard_chunks = max(1, int(shard_bytes // (inner * arr.dtype.itemsize)))
        shard_chunks = min(shard_chunks, max(1, -(-nnz // inner)))
        w = ShardedArrayWriter(path / "X" / name, length=nnz, dtype=arr.dtype, inner=inner,
                               shard_chunks=shard_chunks, codec=codec,
                               read_as=read_dtype(arr.dtype, role) if checksum else None,
                               checksum=checksum)
        w.append(arr)
        w.close()
    # indptr in the dtype anndata reads indices as (int32 while the non-zeros fit): scipy and
    # scikit-learn's compiled routines refuse a CSR whose indptr and indices differ
    ip_dtype = np.dtype(np.int32) if nnz <= np.iinfo(np.int32).max else np.dtype(np.int64)
    ip = ShardedArrayWriter(path / "X" / "indptr", length=indptr.size, dtype=ip_dtype,
                            inner=max(1, indptr.size), shard_chunks=1, checksum=checksum)
    ip.append(indptr.astype(ip_dtype, copy=False))
    ip.close()
    _elements_to_files(path, {"obs": obs, "var": var, "uns": uns or {}, "obsm": {}, "varm": {},
                              "obsp": {}, "varp": {}, "layers": {}}, cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not part of the v3 spec"
        zarr.consolidate_metadata(path)
