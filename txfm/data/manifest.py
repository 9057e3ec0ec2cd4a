"""``manifest.json`` of a shard collection: what the loader and the trainer need to know.

Written last by the converter (atomically), so its presence means the collection is
complete. :meth:`Manifest.load` checks its schema (:func:`check_manifest`: keys, types,
per-gene lengths, counts that agree) and checks it against the files (every listed shard
present, vocabulary hash matches ``vocab.tsv``), and raises a clear error naming the file
otherwise;
:meth:`Manifest.verify` (``txfm data verify``) reads every chunk of every shard and checks
its checksum and contents.
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from txfm.locks import lock_holder

from .layout import (CODECS, FORMAT_NAME, FORMAT_VERSION, LOCK, MANIFEST, WORK,
                     ShardedArrayReader, ShardReadError, missing_chunks, read_dtype,
                     read_metadata, shard_cells_where)
from .vocab import Vocabulary


@dataclass(frozen=True)
class DatasetInfo:
    """One input dataset: its name, kind, cell count and observable genes (vocabulary ids)."""

    name: str
    kind: str  # "single-cell" or "bulk"
    n_cells: int  # after filters (train + val)
    observable: np.ndarray  # int32, sorted vocabulary ids the dataset profiles (after filters)
    report: dict  # input sizes, filters, dropped genes, merged duplicates, source path


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the collection root, e.g. "dataset_3" or "val/dataset_0"
    split: str  # "train" or "val"
    n_cells: int
    nnz: int
    cell_offset: int  # global position of the shard's first cell (train shards first, then val)


@dataclass
class VerifyReport:
    """What :meth:`Manifest.verify` found: ``problems`` (at most ``limit`` messages, each
    naming the shard, cells or array and the file), ``n_problems`` in all, chunks and bytes
    checked."""

    problems: list[str] = field(default_factory=list)
    n_problems: int = 0
    n_chunks: int = 0
    n_bytes: int = 0
    limit: int = 20

    @property
    def ok(self) -> bool:
        return self.n_problems == 0

    def add(self, msg: str) -> None:
        self.n_problems += 1
        if len(self.problems) < self.limit:
            self.problems.append(msg)


@dataclass(frozen=True)
class Manifest:
    root: Path
    genes: "pd.DataFrame"  # vocabulary order; columns gene_id (Ensembl-style id or symbol), symbol
    vocab: Vocabulary  # the same as an object (ids, symbols, hash, lookup)
    vocab_hash: str
    datasets: tuple[DatasetInfo, ...]
    gene_nnz: np.ndarray  # int64 [G]: m_i, training cells in which gene i is non-zero
    shards: tuple[ShardInfo, ...]
    counts_dtype: str
    indices_dtype: str
    codec: str
    max_count: float
    integer_counts: bool
    seed: int
    fingerprint: str
    raw: dict  # the whole JSON document

    @property
    def gene_stats(self):
        """:class:`txfm.data.stats.GeneStats` of the training split, or None for a collection
        converted before the manifest kept them."""
        from .stats import GeneStats

        return GeneStats.from_json(self.raw)

    @property
    def n_genes(self) -> int:
        return len(self.vocab)

    @property
    def gene_ids(self) -> list[str]:
        return list(self.vocab.ids)

    @property
    def symbols(self) -> list[str]:
        return list(self.vocab.symbols)

    @property
    def n_cells(self) -> int:
        return sum(s.n_cells for s in self.shards)

    def split_shards(self, split: str) -> tuple[ShardInfo, ...]:
        """The shards of ``split`` (``"train"`` or ``"val"``, else ``ValueError``), in order."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return tuple(s for s in self.shards if s.split == split)

    def n_split_cells(self, split: str) -> int:
        return sum(s.n_cells for s in self.split_shards(split))

    def dataset_index(self, name: str) -> int:
        for i, d in enumerate(self.datasets):
            if d.name == name:
                return i
        raise KeyError(f"no dataset {name!r}; datasets: {[d.name for d in self.datasets]}")

    def observable(self):
        """Observable genes as :class:`txfm_kernels.ObservableGenes`: mask ``[D datasets, G]``
        bool, row ``d`` = the genes dataset ``d`` profiles."""
        import torch
        from txfm_kernels.masks import ObservableGenes

        mask = torch.zeros(len(self.datasets), self.n_genes, dtype=torch.bool)
        for d, info in enumerate(self.datasets):
            mask[d, torch.from_numpy(info.observable.astype(np.int64))] = True
        return ObservableGenes.from_mask(mask)

    @classmethod
    def load(cls, root) -> "Manifest":
        """The manifest of the shard collection in folder ``root``.

        The document is checked before use (:func:`check_manifest`): a JSON object whose
        required keys are all present with the right types, per-gene arrays as long as the
        vocabulary, counts and offsets non-negative integers that agree with each other.

        Raises:
            FileNotFoundError: no ``manifest.json`` (an interrupted conversion is named), or a
                shard it lists is missing.
            ValueError: a corrupt manifest (not JSON, not an object, a key missing or of the
                wrong type or length, inconsistent counts: the message names the file and the
                key), one of another format or a newer version, or a vocabulary hash that does
                not match ``vocab.tsv``.
            txfm.data.readers.InputError: the vocabulary file cannot be read.
        """
        root = Path(root)
        path = root / MANIFEST
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist; a shard collection is the folder "
                                    f"that `txfm data convert INPUT... --out FOLDER` writes")
        if not path.is_file():
            writer = lock_holder(root, LOCK)
            if writer is not None:
                hint = (f": a `txfm data convert` ({writer}) is writing it now; wait for it to "
                        f"finish")
            elif (root / WORK).exists():
                hint = (" (a conversion was interrupted: re-run the same `txfm data convert` "
                        "command to finish it)")
            else:
                hint = ("; a shard collection is the folder that `txfm data convert INPUT... "
                        "--out FOLDER` writes")
            raise FileNotFoundError(f"{root} is not a complete txfm shard collection: no "
                                    f"{MANIFEST}{hint}")
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: corrupt manifest ({exc}); {_RERUN}") from exc
        check_manifest(doc, path)
        vocab_file = root / doc["vocab"]["file"]
        vocab = Vocabulary.load(vocab_file)
        if vocab.hash != doc["vocab"]["hash"]:
            raise ValueError(f"{vocab_file}: vocabulary hash {vocab.hash} does not match "
                             f"the manifest's {doc['vocab']['hash']} (file edited or replaced)")
        check_manifest_genes(doc, len(vocab), path)
        datasets = tuple(DatasetInfo(d["name"], d["kind"], int(d["n_cells"]),
                                     np.asarray(d["observable"], dtype=np.int32), d["report"])
                         for d in doc["datasets"])
        shards = tuple(ShardInfo(s["path"], s["split"], int(s["n_cells"]), int(s["nnz"]),
                                 int(s["cell_offset"])) for s in doc["shards"])
        missing = [s.path for s in shards if not (root / s.path / "zarr.json").is_file()]
        if missing:
            raise FileNotFoundError(f"{root}: shards listed in the manifest are missing: "
                                    f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        genes = pd.DataFrame({"gene_id": list(vocab.ids), "symbol": list(vocab.symbols)})
        return cls(root=root, genes=genes, vocab=vocab, vocab_hash=vocab.hash, datasets=datasets,
                   gene_nnz=np.asarray(doc["gene_nnz"], dtype=np.int64), shards=shards,
                   counts_dtype=doc["counts_dtype"], indices_dtype=doc["indices_dtype"],
                   codec=doc["codec"], max_count=float(doc["max_count"]),
                   integer_counts=bool(doc["integer_counts"]), seed=int(doc["seed"]),
                   fingerprint=doc["fingerprint"], raw=doc)

    @property
    def every_chunk_written(self) -> bool:
        """Whether every chunk of every array was written, so that an absent chunk file is
        damage (zarr would read it as fill values); False for collections converted before
        txfm recorded it, whose obs/var arrays may omit chunks of fill values only."""
        return bool(self.raw.get("every_chunk_written", False))

    @property
    def version(self) -> int:
        return int(self.raw.get("version", 1))

    @property
    def read_dtypes(self) -> tuple[str, str]:
        """``(counts, indices)`` dtypes that anndata/zarr return for ``X`` (format >= 2:
        ordinary float/int32; format 1: the stored unsigned integers)."""
        if self.version < 2:
            return self.counts_dtype, self.indices_dtype
        return (read_dtype(self.counts_dtype, "counts").name,
                read_dtype(self.indices_dtype, "indices").name)

    def summary(self) -> str:
        """What ``txfm data info`` prints: cells per split, genes, shards, dtypes, datasets."""
        rc, ri = self.read_dtypes
        lines = [f"{self.root}: {self.n_cells:,} cells ({self.n_split_cells('train'):,} train, "
                 f"{self.n_split_cells('val'):,} val) x {self.n_genes:,} genes "
                 f"(vocab {self.vocab_hash}); {len(self.shards)} shards; counts "
                 f"{self.counts_dtype}, indices {self.indices_dtype} on disk (read as {rc}, "
                 f"{ri}), codec {self.codec}, format {self.version}"
                 + (" (no chunk checksums)" if self.version < 2 else "")]
        for i, d in enumerate(self.datasets):
            lines.append(f"  [{i}] {d.name} ({d.kind}): {d.n_cells:,} cells, "
                         f"{d.observable.size:,} observable genes")
        return "\n".join(lines)

    def verify(self, progress: bool = False, limit: int = 20) -> VerifyReport:
        """Read every chunk of every shard and check it: the crc32c of each inner chunk of
        ``X/data`` and ``X/indices`` (and that it decodes), every other array read through
        zarr (which checks its crc32c), ``X/indptr`` against the manifest, gene ids below
        ``n_genes`` and increasing within each cell, counts finite and >= 0.

        Returns a :class:`VerifyReport` (``report.ok``); ``progress`` shows a bar of bytes
        read on stderr. Arrays without checksums (format 1 collections) are problems.
        """
        from tqdm.auto import tqdm

        report = VerifyReport(limit=limit)
        if self.version < 2:
            report.add(f"{self.root} was written by txfm format {self.version}, with no "
                       f"per-chunk checksums: it cannot be verified; convert the inputs again")
            return report
        total = sum(f.stat().st_size for s in self.shards for f in (self.root / s.path).rglob("*")
                    if f.is_file())
        bar = tqdm(total=total, desc="verify", unit="B", unit_scale=True, disable=not progress,
                   file=sys.stderr, leave=False)
        groups = [self.root / "zarr.json"]  # the collections anndata/annbatch open
        if any(s.split == "val" for s in self.shards):
            groups.append(self.root / "val" / "zarr.json")
        for meta_file in groups:
            try:
                read_metadata(meta_file)
            except ShardReadError as err:
                report.add(str(err))
        try:
            for info in self.shards:
                _verify_shard(self, info, report, bar.update)
        finally:
            bar.close()
        report.n_bytes = total
        return report


_RERUN = "re-run txfm data convert"
_STATS_KEYS = ("gene_obs_cells", "gene_frac_sum", "gene_log1p_sum")  # all or none (newer)


class _Corrupt(Exception):
    """What is wrong with a manifest document (internal: becomes a ValueError naming it)."""


def _show(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, bool)) or value is None \
        else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null", int: "an integer", float: "a number"}.get(type(value),
                                                                          type(value).__name__)


def _get(obj: dict, key: str, where: str, *, optional: bool = False):
    if key not in obj:
        if optional:
            return None
        raise _Corrupt(f"{where}{key} is missing")
    return obj[key]


def _is_int(v) -> bool:
    return type(v) is int  # JSON integers; not booleans, not 5.0


def _check_object(v, name: str) -> dict:
    if not isinstance(v, dict):
        raise _Corrupt(f"{name} is {_type_name(v)}, not an object")
    return v


def _check_list(v, name: str) -> list:
    if not isinstance(v, list):
        raise _Corrupt(f"{name} is {_type_name(v)}, not a list")
    return v


def _check_str(v, name: str) -> str:
    if not isinstance(v, str) or not v:
        raise _Corrupt(f"{name} is {_show(v)}, not a non-empty string")
    return v


def _check_int(v, name: str, low: int = 0) -> int:
    if not _is_int(v) or v < low:
        raise _Corrupt(f"{name} is {_show(v)}, not an integer >= {low}")
    return v


def _check_number(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise _Corrupt(f"{name} is {_show(v)}, not a finite number >= 0")
    return float(v)


def _unique(v: str, seen: set, name: str) -> None:
    if v in seen:
        raise _Corrupt(f"{name} {_show(v)} is listed twice")
    seen.add(v)


def _choice(obj: dict, key: str, where: str, choices: tuple[str, ...]):
    v = _get(obj, key, f"{where}.")
    if v not in choices:
        raise _Corrupt(f"{where}.{key} is {_show(v)}, not "
                       + " or ".join(json.dumps(c) for c in choices))
    return v


def _check_relative(v, name: str) -> str:
    _check_str(v, name)
    p = PurePosixPath(v)
    if p.is_absolute() or ".." in p.parts or "\\" in v:
        raise _Corrupt(f"{name} is {_show(v)}, not a path inside the collection")
    return v


def _check_array(v, name: str, *, integer: bool, length: int | None = None,
                 high: int | None = None) -> np.ndarray:
    """A list of integers (or finite numbers) >= 0, of ``length`` entries, each < ``high``."""
    _check_list(v, name)
    what = "integers >= 0" if integer else "finite numbers >= 0"
    if high is not None:
        what = f"integers >= 0 and < {high}"
    ok = (lambda x: type(x) is int) if integer else (lambda x: type(x) in (int, float))
    bad = next((i for i, x in enumerate(v) if not ok(x)), None)
    if bad is not None:
        raise _Corrupt(f"{name}[{bad}] is {_show(v[bad])}; {name} must hold {what}")
    try:
        a = np.asarray(v, dtype=np.int64 if integer else np.float64)
    except OverflowError:
        raise _Corrupt(f"{name} holds an integer out of range; it must hold {what}") from None
    if length is not None and a.size != length:
        raise _Corrupt(f"{name} has {a.size} entries, the vocabulary {length}")
    bad_mask = (a < 0) if integer else ~(np.isfinite(a) & (a >= 0))
    if high is not None:
        bad_mask = bad_mask | (a >= high)
    if bad_mask.any():
        i = int(np.flatnonzero(bad_mask)[0])
        raise _Corrupt(f"{name}[{i}] is {_show(v[i])}; {name} must hold {what}")
    return a


def check_manifest(doc, path) -> None:
    """Check the schema of a parsed ``manifest.json`` (``doc``) of the collection at ``path``,
    all but what needs the vocabulary (:func:`check_manifest_genes`): a JSON object of format
    ``txfm-shards`` and a version this txfm reads, every key :meth:`Manifest.load` uses present
    with its type (strings, non-negative integers, finite numbers), every shard a folder inside
    the collection, shards in corpus order (train, then val) with contiguous cell offsets,
    and the optional cell counts (``n_cells``, ``n_train``, ``n_val``) and per-dataset counts
    agreeing with the shards. Keys that older collections lack (``every_chunk_written``, the
    gene statistics, ``version``) are checked only when present.

    Raises:
        ValueError: ``"{path}: corrupt manifest (<what and where>); re-run txfm data
            convert"``, or ``"{path}: not a txfm-shards manifest ..."`` for another format
            or a newer version.
    """
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: corrupt manifest (the top level is {_type_name(doc)}, not a "
                         f"JSON object); {_RERUN}")
    version = doc.get("version", 1)
    if doc.get("format") != FORMAT_NAME or (_is_int(version) and version > FORMAT_VERSION):
        raise ValueError(f"{path}: not a {FORMAT_NAME} manifest of version <= {FORMAT_VERSION} "
                         f"(format={doc.get('format')!r}, version={doc.get('version')!r})")
    try:
        _check_doc(doc)
    except _Corrupt as exc:
        raise ValueError(f"{path}: corrupt manifest ({exc}); {_RERUN}") from None


def check_manifest_genes(doc: dict, n_genes: int, path) -> None:
    """Check the per-gene parts of a manifest that passed :func:`check_manifest` against the
    vocabulary's ``n_genes``: ``vocab.n_genes``, ``gene_nnz`` (at most the training cells),
    the gene statistics (when present), and each dataset's observable gene ids (< n_genes).

    Raises:
        ValueError: ``"{path}: corrupt manifest (<what>); re-run txfm data convert"``.
    """
    try:
        _check_genes(doc, n_genes)
    except _Corrupt as exc:
        raise ValueError(f"{path}: corrupt manifest ({exc}); {_RERUN}") from None


def _check_doc(doc: dict) -> None:
    _check_int(doc.get("version", 1), "version", 1)
    vocab = _check_object(_get(doc, "vocab", ""), "vocab")
    _check_relative(_get(vocab, "file", "vocab."), "vocab.file")
    _check_str(_get(vocab, "hash", "vocab."), "vocab.hash")
    if "n_genes" in vocab:
        _check_int(vocab["n_genes"], "vocab.n_genes")
    for key in ("fingerprint",):
        _check_str(_get(doc, key, ""), key)
    for key, role in (("counts_dtype", "counts"), ("indices_dtype", "indices")):
        name = _check_str(_get(doc, key, ""), key)
        try:
            read_dtype(name, role)
        except ValueError as exc:  # its message lists the dtypes txfm stores
            raise _Corrupt(f"{key} is {_show(name)}: {exc}") from None
    codec = _check_str(_get(doc, "codec", ""), "codec")
    if codec not in CODECS:
        raise _Corrupt(f"codec is {_show(codec)}, not one of {', '.join(CODECS)}")
    _check_number(_get(doc, "max_count", ""), "max_count")
    for key, optional in (("integer_counts", False), ("every_chunk_written", True)):
        v = _get(doc, key, "", optional=optional)
        if key in doc and not isinstance(v, bool):
            raise _Corrupt(f"{key} is {_show(v)}, not true or false")
    _check_int(_get(doc, "seed", ""), "seed")
    for key in ("created", "shuffle"):
        if key in doc:
            _check_str(doc[key], key)
    if "params" in doc:
        _check_object(doc["params"], "params")
    if "obs_columns" in doc:
        for i, c in enumerate(_check_list(doc["obs_columns"], "obs_columns")):
            _check_str(c, f"obs_columns[{i}]")
    if "stats_target_sum" in doc:
        v = doc["stats_target_sum"]
        if _check_number(v, "stats_target_sum") <= 0:
            raise _Corrupt(f"stats_target_sum is {_show(v)}, not a finite number > 0")
    have = [k for k in _STATS_KEYS if k in doc]
    if have and len(have) < len(_STATS_KEYS):
        missing = [k for k in _STATS_KEYS if k not in doc]
        raise _Corrupt(f"{', '.join(missing)} missing beside {', '.join(have)}")

    # shards: train then val, each starting where the previous one ended
    shards = _check_list(_get(doc, "shards", ""), "shards")
    n_split = {"train": 0, "val": 0}
    offset, seen, split_before = 0, set(), "train"
    for i, s in enumerate(shards):
        where = f"shards[{i}]"
        _check_object(s, where)
        _unique(_check_relative(_get(s, "path", f"{where}."), f"{where}.path"), seen,
                f"{where}.path")
        split = _choice(s, "split", where, ("train", "val"))
        if split == "train" and split_before == "val":
            raise _Corrupt(f"{where} is a training shard after a validation shard")
        split_before = split
        n = _check_int(_get(s, "n_cells", f"{where}."), f"{where}.n_cells")
        _check_int(_get(s, "nnz", f"{where}."), f"{where}.nnz")
        start = _check_int(_get(s, "cell_offset", f"{where}."), f"{where}.cell_offset")
        if start != offset:
            raise _Corrupt(f"{where}.cell_offset is {start}, but the shards before it hold "
                           f"{offset} cells")
        offset += n
        n_split[split] += n
    for key, expect in (("n_train", n_split["train"]), ("n_val", n_split["val"]),
                        ("n_cells", offset)):
        if key in doc and _check_int(doc[key], key) != expect:
            raise _Corrupt(f"{key} is {doc[key]}, but the shards hold {expect} "
                           f"{'' if key == 'n_cells' else key[2:] + ' '}cells")

    datasets = _check_list(_get(doc, "datasets", ""), "datasets")
    names, total = set(), 0
    for i, d in enumerate(datasets):
        where = f"datasets[{i}]"
        _check_object(d, where)
        _unique(_check_str(_get(d, "name", f"{where}."), f"{where}.name"), names,
                f"{where}.name")
        _choice(d, "kind", where, ("single-cell", "bulk"))
        total += _check_int(_get(d, "n_cells", f"{where}."), f"{where}.n_cells")
        _check_list(_get(d, "observable", f"{where}."), f"{where}.observable")
        _check_object(_get(d, "report", f"{where}."), f"{where}.report")
    if total != offset:
        raise _Corrupt(f"the datasets' n_cells add up to {total}, but the shards hold {offset} "
                       f"cells")
    _check_list(_get(doc, "gene_nnz", ""), "gene_nnz")


def _check_genes(doc: dict, n_genes: int) -> None:
    listed = doc["vocab"].get("n_genes", n_genes)
    if listed != n_genes:
        raise _Corrupt(f"vocab.n_genes is {listed}, the vocabulary {n_genes}")
    nnz = _check_array(doc["gene_nnz"], "gene_nnz", integer=True, length=n_genes)
    n_train = sum(s["n_cells"] for s in doc["shards"] if s["split"] == "train")
    if nnz.size and int(nnz.max()) > n_train:
        i = int(nnz.argmax())
        raise _Corrupt(f"gene_nnz[{i}] is {int(nnz[i])}, more than the {n_train} training cells")
    if _STATS_KEYS[0] in doc:
        for key in _STATS_KEYS:
            _check_array(doc[key], key, integer=key == "gene_obs_cells", length=n_genes)
    for i, d in enumerate(doc["datasets"]):
        _check_array(d["observable"], f"datasets[{i}].observable", integer=True, high=n_genes)


def _has_crc(meta: dict) -> bool:
    """Whether an array's chunks end with a crc32c (directly or inside sharding)."""
    codecs = meta.get("codecs", [])
    if codecs and codecs[0]["name"] == "sharding_indexed":
        codecs = codecs[0]["configuration"]["codecs"]
    return any(c.get("name") in ("crc32c", "numcodecs.crc32c") for c in codecs)


def _verify_shard(m: "Manifest", info: ShardInfo, report: VerifyReport, update) -> None:
    import zarr

    path = m.root / info.path
    off, n = info.cell_offset, info.n_cells
    where_shard = shard_cells_where(info.path, None, off, n)(0, -1)
    # X/indptr and every anndata element: through zarr, which checks each chunk's crc32c
    indptr = None
    for meta_file in sorted(path.rglob("zarr.json")):
        try:
            meta = read_metadata(meta_file)
        except ShardReadError as err:
            report.add(f"{where_shard}: {err}")
            continue
        rel = meta_file.parent.relative_to(path).as_posix()
        # X/data and X/indices: their reader (below) checks every shard file and chunk
        if meta.get("node_type") != "array" or rel in ("X/data", "X/indices"):
            continue
        if m.every_chunk_written or rel == "X/indptr":  # txfm always wrote X whole
            for f in missing_chunks(meta_file.parent, meta):
                report.add(f"{where_shard}: array {rel}: chunk file {f} is missing (zarr would "
                           f"read it as {meta.get('fill_value')!r}s)")
        if not _has_crc(meta):
            report.add(f"{where_shard}: array {rel} has no per-chunk checksums (not written "
                       f"by this txfm): convert the inputs again to be able to verify it")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                values = zarr.open_array(meta_file.parent, mode="r")[...]
        except Exception as exc:  # noqa: BLE001 - any read failure is a corrupt array
            # zarr's crc32c codec says so with both checksums as raw bytes: the words matter
            why = ("a chunk fails its crc32c checksum: its bytes changed on disk"
                   if "checksum" in str(exc).lower() else f"{type(exc).__name__}: {exc}")
            report.add(f"{where_shard}: array {rel} ({meta_file.parent}) cannot be read "
                       f"({why})")
            continue
        if rel == "X/indptr":
            indptr = np.asarray(values, dtype=np.int64)
        update(sum(f.stat().st_size for f in meta_file.parent.rglob("*") if f.is_file()))
    if indptr is None or indptr.size != n + 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0) \
            or int(indptr[-1]) != info.nnz:
        report.add(f"{where_shard}: X/indptr is missing or corrupt (expected {n + 1} "
                   f"non-decreasing offsets from 0 to {info.nnz})")
        return

    where = shard_cells_where(info.path, indptr, off, n)

    row_start = np.zeros(max(info.nnz, 1), dtype=bool)
    row_start[indptr[:-1][indptr[:-1] < info.nnz]] = True
    for name in ("indices", "data"):
        try:
            reader = ShardedArrayReader(path / "X" / name, where)
        except ShardReadError as err:
            report.add(str(err))
            continue
        if reader.length != info.nnz:
            report.add(f"{where_shard}: X/{name} has {reader.length} values, expected {info.nnz}")
            continue

        state = {"next": 0, "last": -1}  # where the previous good chunk ended, its last id

        def check(e0: int, values: np.ndarray, name=name) -> None:
            if name == "indices":  # ids in range and increasing within a cell
                last = state["last"] if state["next"] == e0 else -1  # after a bad chunk: unknown
                prev = np.concatenate([[last], values[:-1]])
                state["next"], state["last"] = e0 + values.size, int(values[-1])
                bad = (values >= m.n_genes) | ((values <= prev) & ~row_start[e0:e0 + values.size])
                what = f"gene ids >= {m.n_genes} or not increasing within a cell"
            elif values.dtype.kind == "f":
                bad = ~np.isfinite(values) | (values < 0)
                what = "counts negative or not finite"
            else:
                return
            if bad.any():
                p = e0 + int(np.flatnonzero(bad)[0])
                report.add(f"{where(p, p + 1)}: X/{name} holds {what} (corrupt data)")

        try:
            report.n_chunks += reader.verify(report.add, progress=update, check=check)
        except Exception as exc:  # noqa: BLE001 - report, go on with the other arrays
            report.add(f"{where_shard}: X/{name} cannot be verified ({type(exc).__name__}: "
                       f"{exc})")
        finally:
            reader.close()
