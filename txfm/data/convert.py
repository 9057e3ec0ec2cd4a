"""Convert AnnData / 10x inputs into one shuffled, sharded zarr v3 collection (``layout.py``).

Pipeline (each input is one dataset; nothing holds more than one input chunk or one output
shard in memory)::

  0. stats    stream every input once: check counts (finite, >= 0, integer unless allowed),
              count cells per gene and genes per cell (after merging duplicate genes);
              gene filter (single-cell: genes in >= min_cells cells), then cell filter
              (cells with >= min_genes of the kept genes; a second pass when genes were
              dropped). Bulk datasets are not filtered.
  1. scatter  kept cells get corpus positions from one seeded permutation
              (``numpy.random.default_rng(seed).permutation(N)`` over kept cells in input
              order); positions [0, n_train) are training shards, the rest validation.
              Each cell, remapped to vocabulary ids and sorted, is appended to its
              destination shard's bucket file under ``.txfm-convert/``.
  2. shards   each bucket is ordered by position and written as ``dataset_k`` under a
              temporary name, then renamed; its bucket is deleted.
  3. finish   ``vocab.tsv``, group ``zarr.json`` files, ``manifest.json`` (last).

Every stage is resumable: stats are cached per input, the scatter is redone from scratch
unless it completed, finished shards are skipped. A re-run with the same inputs and options
finishes an interrupted conversion; different options need ``--overwrite`` or a new ``--out``.
Each cell's origin is kept in ``obs`` (``dataset``, ``source_row``), so the shuffle is
recorded cell by cell as well as by its seed.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import numbers
import os
import shutil
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from txfm.files import atomic_target, write_atomic
from txfm.locks import folder_lock

from .layout import (CODECS, COLLECTION_ATTRS, FORMAT_NAME, FORMAT_VERSION, LOCK, MANIFEST,
                     SHARD_PREFIX, VAL_GROUP, VOCAB_FILE, WORK, write_csr_store,
                     write_group_json, write_json_atomic)
from .manifest import Manifest
from .obs import ObsTables
from .stats import GeneStats
from .readers import ENSEMBL_RE, H5adReader, InputError, InputReader, input_name, open_input
from .vocab import (Vocabulary, dataset_keys, read_gene_table, symbol_to_id_map,
                    union_vocabulary)

_META = np.dtype([("pos", "<i8"), ("nnz", "<i8"), ("ds", "<i4"), ("row", "<i8")])


@dataclass
class _Dataset:
    reader: InputReader
    name: str
    kind: str
    col2local: np.ndarray  # int64 [n_features] -> local gene, -1 = dropped (feature type)
    local_keys: np.ndarray  # object [L]
    local_syms: np.ndarray
    in_vocab: np.ndarray  # bool [L]
    gene_keep: np.ndarray | None = None  # bool [L]
    cell_keep: np.ndarray | None = None  # bool [n_cells]
    local2vocab: np.ndarray | None = None  # int64 [L], -1 = not in corpus
    kept_offset: int = 0  # global index of the first kept cell
    report: dict | None = None


def _progress(total, desc, enabled, unit="cell"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled,
                file=sys.stderr, leave=False)


def _fingerprint(inputs: Sequence[Path], params: dict) -> str:
    h = hashlib.sha256()
    for p in inputs:
        files = sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _ours(entry: Path) -> bool:
    n = entry.name
    if entry.is_dir() and (n.startswith(SHARD_PREFIX) or n == VAL_GROUP):
        # ours is a zarr group; a user's folder of that name is foreign, never deleted
        return (entry / "zarr.json").is_file()
    if not entry.is_dir():  # a manifest or zarr.json whose writer was killed mid-write
        n = atomic_target(n) or n
    return (n.startswith(SHARD_PREFIX) or n.startswith(".tmp-") or n in
            (VAL_GROUP, VOCAB_FILE, MANIFEST, "zarr.json", WORK, LOCK) or n.startswith(MANIFEST))


def _clean(out: Path) -> None:
    for entry in out.iterdir():
        if _ours(entry) and entry.name != LOCK:  # the lock stays: we hold it
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _recorded_fingerprint(path: Path) -> str | None:
    """The ``fingerprint`` a manifest or plan records; ``"corrupt"`` for a document that is
    not a JSON object (json errors propagate)."""
    doc = json.loads(path.read_text())
    return doc.get("fingerprint") if isinstance(doc, dict) else "corrupt"


def _prepare_out(out: Path, fingerprint: str, overwrite: bool) -> bool:
    """True when ``out`` already holds this exact conversion, complete."""
    if not out.exists():
        out.mkdir(parents=True)
        return False
    if not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    foreign = [e.name for e in out.iterdir() if not _ours(e)]
    if foreign:
        raise FileExistsError(f"--out {out} holds files that are not txfm shards "
                              f"({foreign[:3]}); choose an empty or new directory")
    manifest, plan = out / MANIFEST, out / WORK / "plan.json"
    previous = None
    try:
        if manifest.is_file():
            previous = _recorded_fingerprint(manifest)
            if previous == fingerprint and not overwrite:
                return True
        elif plan.is_file():
            previous = _recorded_fingerprint(plan)
    except (json.JSONDecodeError, UnicodeDecodeError):
        previous = "corrupt"
    if previous is None:  # nothing, or leftovers of a run killed before it wrote its plan
        _clean(out)
    elif previous != fingerprint or overwrite:
        if not overwrite:
            raise FileExistsError(f"--out {out} holds a conversion with other inputs or options; "
                                  f"pass --overwrite to replace it or choose another --out")
        _clean(out)
    return False


# --------------------------------------------------------------------------- chunk ops
def _where_raw_counts(ds: _Dataset) -> str:
    """Where an input's raw counts may be, for messages: an .h5ad may keep them in ``.raw``
    or a layer (--raw, --layer, --counts choose them); a 10x matrix holds only its own."""
    if isinstance(ds.reader, H5adReader):
        return (f"If the file keeps its raw counts in .raw or a layer, pass --raw or --layer "
                f"NAME (this input alone: --counts {ds.name}=raw or =layers/NAME)")
    return "A 10x matrix holds Cell Ranger's raw UMI counts: is this one a rewritten copy?"


def _check_counts(ds: _Dataset, first_row: int, m: sp.csr_matrix, allow_non_integer: bool) -> bool:
    """Raise on non-finite / negative / (unless allowed) non-integer counts; True if integral."""
    d = m.data
    kind = d.dtype.kind  # a number: every reader refuses other values when it opens the file

    def where(bad: np.ndarray) -> str:
        k = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(m.indptr, k, side="right") - 1)
        col = int(m.indices[k])
        keys = ds.reader.gene_symbols if ds.reader.gene_symbols is not None else ds.reader.gene_ids
        return f"(e.g. {float(d[k]):g} at cell {first_row + row}, gene {keys[col]})"

    if kind == "f":
        bad = ~np.isfinite(d)
        if bad.any():
            raise InputError(f"{ds.reader.path}: non-finite counts {where(bad)}; counts must be "
                             f"finite and non-negative")
    if kind in "if":
        bad = d < 0
        if bad.any():
            raise InputError(f"{ds.reader.path}: negative counts {where(bad)}; raw counts expected "
                             f"(not log-normalised or scaled data)")
    if kind == "f":
        bad = d != np.floor(d)
        if bad.any():
            if not allow_non_integer:
                raise InputError(f"{ds.reader.path}: non-integer counts {where(bad)}; raw integer "
                                 f"counts expected, not normalised or log data. "
                                 f"{_where_raw_counts(ds)}; only for TPM-like bulk data pass "
                                 f"--allow-non-integer (stored as float32)")
            return False
    return True


_FLOAT32_EXACT = 2**24  # float32 holds every integer up to this, not all above

def _to_local(m: sp.csr_matrix, col_map: np.ndarray, n_out: int) -> sp.csr_matrix:
    """Columns remapped by ``col_map`` (-1 drops), duplicates summed, zeros removed, sorted."""
    new = col_map[m.indices]
    keep = new >= 0
    if not keep.all():
        kept_upto = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
        ptr = kept_upto[m.indptr]
        m = sp.csr_matrix((m.data[keep], new[keep], ptr), shape=(m.shape[0], n_out))
    else:
        m = sp.csr_matrix((m.data, new, m.indptr), shape=(m.shape[0], n_out))
    if not m.has_canonical_format:
        m.sum_duplicates()
    if m.nnz and not np.all(m.data):
        m.eliminate_zeros()
    return m


# ------------------------------------------------------------------------------ convert
def convert(inputs: Sequence, out, *, vocab=None, gene_key: str = "auto", gene_table=None,
            names: Sequence[str] | None = None, bulk: Sequence[str] = (), layer: str | None = None,
            use_raw: bool = False, min_cells: int = 1000, min_genes: int = 2000,
            allow_non_integer: bool = False, feature_types: Sequence[str] = ("Gene Expression",),
            seed: int = 0, val_fraction: float = 0.01, shard_cells: int | None = None,
            shard_mb: float = 256.0, codec: str = "none", counts_dtype: str = "auto",
            chunk_nnz: int = 8_000_000, overwrite: bool = False, progress: bool = True,
            genome: str | Sequence[str] | None = None,
            counts: Mapping[str, str] | None = None,
            log: Callable[[str], None] | None = None) -> Manifest:
    """Convert ``inputs`` (paths; each one dataset) into a shard collection at ``out``
    (the pipeline: the module docstring and docs/data.md; the paper's filters:
    arXiv:2605.31562, data).

    Args:
        inputs: ``.h5ad`` files, 10x matrix folders or 10x ``.h5`` files (one path or several).
        out: the collection's folder (created; resumed when it holds this same conversion).
        vocab: a vocabulary file to map onto (default: the union of the inputs' genes);
            gene_key: ``auto``, ``id`` or ``symbol``; gene_table: an Ensembl id <-> symbol
            table for symbol-only inputs.
        names: one dataset name per input (default the file or folder names, ``_2`` added to
            repeats); bulk: dataset names or paths of bulk inputs (not filtered).
        layer, use_raw: where every ``.h5ad`` input keeps its counts (``layers[layer]``,
            ``.raw``; default ``X``); counts: per input ``{input: "X" | "raw" |
            "layers/NAME"}``, keyed by dataset name, path, or file name with or without its
            suffix (``--counts INPUT=WHERE``).
        min_cells, min_genes: single-cell filters: genes expressed in >= ``min_cells`` cells,
            cells expressing >= ``min_genes`` genes.
        allow_non_integer: accept non-integer counts (TPM-like bulk), stored as float32.
        feature_types: 10x feature types kept; genome: genomes read from 10x ``.h5`` inputs
            (default all).
        seed, val_fraction: the shuffle and the share of cells held out for validation.
        shard_cells, shard_mb, codec, counts_dtype, chunk_nnz: the shards' layout (cells or
            MiB per shard, ``none`` / ``lz4`` / ``zstd``, stored dtype, entries per chunk).
        overwrite: replace a collection of another conversion in ``out``.
        progress: progress bars; log: where the per-dataset report lines go (stderr).

    Returns:
        the :class:`Manifest` of the finished collection.

    Raises:
        InputError: (a ``ValueError``) a bad input: unreadable, damaged, negative or
            non-integer counts, no genes mapped.
        ValueError: a bad option (named with its ``txfm data convert`` flag).
        FileExistsError: ``out`` holds something else, or another conversion is writing it.
        TypeError: an input that is not a path, ``counts`` not a mapping.

    A conversion that fails on a bad input or option leaves no ``out`` behind if it created it.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    for p in inputs:
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"convert: inputs are paths of files or folders, got a "
                            f"{type(p).__name__}; write an AnnData first (adata.write_h5ad)")
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise InputError("no inputs given")
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    if counts_dtype not in ("auto", "uint16", "uint32", "float32"):
        raise ValueError(f"counts_dtype must be auto, uint16, uint32 or float32, got "
                         f"{counts_dtype!r}")
    _check_numbers(val_fraction=val_fraction, min_cells=min_cells, min_genes=min_genes,
                   seed=seed, shard_cells=shard_cells, shard_mb=shard_mb, chunk_nnz=chunk_nnz)
    if genome and not any(p.suffix in (".h5", ".hdf5") for p in inputs):
        raise ValueError("--genome selects genomes of 10x .h5 inputs, and none was given")
    if (layer or use_raw) and not any(p.suffix == ".h5ad" for p in inputs):
        raise ValueError(f"{'--layer' if layer else '--raw'} applies to .h5ad inputs, and none "
                         f"was given")
    for p, option in ((vocab, "--vocab"), (gene_table, "--gene-table")):
        if p is not None and not Path(p).is_file():
            raise InputError(f"{p} ({option}): " + (
                "is a folder; give the table file inside it" if Path(p).is_dir()
                else "file does not exist"))
    _check_distinct(inputs, names)
    ds_names = _dataset_names(inputs, names)
    sources = _count_sources(inputs, ds_names, counts, layer, use_raw)
    out = Path(out)
    readers: list[InputReader] = []
    try:
        for p, (p_layer, p_raw, by) in zip(inputs, sources):
            readers.append(open_input(p, layer=p_layer, use_raw=p_raw, genome=genome,
                                      chosen_by=by))
        created = not out.exists()
        state = {"prepared": False}  # set once the folder holds this conversion's work alone
        with _locked(out):
            try:
                return _convert(readers, inputs, out, vocab=vocab, gene_key=gene_key,
                                gene_table=gene_table, bulk=bulk,
                                min_cells=min_cells, min_genes=min_genes,
                                allow_non_integer=allow_non_integer,
                                feature_types=tuple(feature_types), seed=seed,
                                val_fraction=val_fraction, shard_cells=shard_cells,
                                shard_mb=shard_mb, codec=codec, counts_dtype=counts_dtype,
                                chunk_nnz=chunk_nnz, overwrite=overwrite, progress=progress,
                                log=log, genome=genome, ds_names=ds_names,
                                sources=_source_params(inputs, ds_names, sources), state=state)
            except ValueError:  # InputError included: nothing worth resuming was made
                if created:
                    shutil.rmtree(out, ignore_errors=True)
                elif state["prepared"]:  # its plan would refuse the corrected command
                    _clean(out)
                raise
    finally:
        for r in readers:
            r.close()


def _check_numbers(**values) -> None:
    """ValueError naming the option (``convert`` argument and CLI flag) that is out of range:
    NaN, infinite, negative, not a whole number, or zero where a size is meant."""
    for name, v in values.items():
        if name in ("val_fraction", "shard_mb"):
            ok = (isinstance(v, numbers.Real) and math.isfinite(v)
                  and (0 <= v < 1 if name == "val_fraction" else v > 0))
            what = "in [0, 1)" if name == "val_fraction" else "a number > 0"
        else:
            low = 1 if name in ("shard_cells", "chunk_nnz") else 0
            ok = (v is None and name == "shard_cells") or (
                isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low)
            what = f"an integer >= {low}"
        if not ok:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be {what}, got {v!r}")


@contextlib.contextmanager
def _locked(out: Path):
    """Create ``out`` and hold its lock (:func:`txfm.locks.folder_lock`) while converting into
    it: a second conversion into the same folder fails at once instead of interleaving."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # under a file, or where one cannot write
        raise FileExistsError(f"--out {out}: cannot be created ({exc.strerror or exc}); "
                              "choose another location") from exc
    with folder_lock(out, LOCK, "conversion"):
        yield


def _check_distinct(inputs: list[Path], names: Sequence[str] | None) -> None:
    """Each input once and, when given, one distinct non-empty name per input: the same file
    twice would put its cells in the corpus twice, and a name given twice would be renamed."""
    seen: dict[Path, Path] = {}
    for p in inputs:
        key = p.resolve()
        if key in seen:
            raise InputError(f"{seen[key]} and {p} are the same input; give each dataset once "
                             f"(it would be in the corpus twice)")
        seen[key] = p
    if names is None:
        return
    names = [str(n) for n in names]
    if len(names) != len(inputs):
        raise ValueError(f"--names: {len(names)} names for {len(inputs)} inputs; give one per "
                         f"input, in order")
    blank = [i for i, n in enumerate(names) if not n.strip()]
    if blank:
        raise ValueError(f"--names: name {blank[0] + 1} is empty; give every input a name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--names: {', '.join(map(repr, dup))} given twice; each dataset needs "
                         f"its own name")


def _dataset_names(inputs: list[Path], names) -> list[str]:
    """Each input's dataset name: ``names[i]``, else the input's own
    (:func:`~txfm.data.readers.input_name`), with ``_2``, ``_3``, ... added to repeats
    (``names`` checked by :func:`_check_distinct`: one per input)."""
    out: list[str] = []
    for i, p in enumerate(inputs):
        base = names[i] if names is not None else input_name(p)
        name, k = base, 2
        while name in out:
            name, k = f"{base}_{k}", k + 1
        out.append(name)
    return out


def _count_sources(inputs: list[Path], ds_names: list[str], counts, layer, use_raw
                   ) -> list[tuple[str | None, bool, str | None]]:
    """``(layer, use_raw, chosen_by)`` per input: ``counts[key]`` where given (see
    :func:`convert`), else the global ``layer`` / ``use_raw`` (``chosen_by`` None).

    A key is matched as a dataset name first, then as a path (as given, or resolved), then as
    a file name with or without its suffix, which must name one input.
    """
    out: list[tuple[str | None, bool, str | None]] = [(layer, use_raw, None)] * len(inputs)
    if not counts:
        return out
    if not isinstance(counts, Mapping):
        raise TypeError(f"counts must be a mapping {{input: 'X' | 'raw' | 'layers/NAME'}}, got "
                        f"{type(counts).__name__}")
    resolved = [os.path.abspath(p) for p in inputs]
    given: dict[int, str] = {}
    for key, where in counts.items():
        key, where = str(key), str(where)
        flag = f"--counts {key}={where}"
        hits = [i for i, n in enumerate(ds_names) if n == key]
        if not hits:
            hits = [i for i, r in enumerate(resolved) if r == os.path.abspath(key)]
        if not hits:
            hits = [i for i, p in enumerate(inputs) if key in (p.name, p.stem)]
        if len(hits) != 1:
            what = "names more than one input" if hits else "names no input"
            raise ValueError(f"{flag}: {what}; use a dataset name ({', '.join(ds_names)}) or "
                             f"an input path")
        i = hits[0]
        if i in given:
            raise ValueError(f"{flag}: input {inputs[i]} already has --counts {given[i]}; give "
                             f"each input one place")
        given[i] = f"{key}={where}"
        if inputs[i].suffix != ".h5ad":
            raise ValueError(f"{flag}: {inputs[i]} is not an .h5ad file; only .h5ad inputs "
                             f"have a choice of count matrices")
        if where == "X":
            out[i] = (None, False, flag)
        elif where in ("raw", "raw/X"):
            out[i] = (None, True, flag)
        elif where.startswith("layers/") and len(where) > len("layers/"):
            out[i] = (where[len("layers/"):], False, flag)
        else:
            raise ValueError(f"{flag}: say where the counts are: X, raw or layers/NAME")
    return out


def _source_params(inputs: list[Path], ds_names: list[str], sources) -> dict:
    """The count sources for the conversion's fingerprint, by what they resolve to: one
    place for every ``.h5ad`` input as ``layer`` / ``raw`` (as before ``--counts`` existed),
    else ``counts`` ``{dataset: "X" | "raw" | "layers/NAME"}``."""
    where = {n: ("raw" if raw else f"layers/{lay}" if lay else "X")
             for p, n, (lay, raw, _) in zip(inputs, ds_names, sources) if p.suffix == ".h5ad"}
    places = set(where.values())
    if len(places) <= 1:
        place = places.pop() if places else "X"
        return {"layer": place[len("layers/"):] if place.startswith("layers/") else None,
                "raw": place == "raw"}
    return {"layer": None, "raw": False, "counts": dict(sorted(where.items()))}


def _convert(readers, inputs, out, *, vocab, gene_key, gene_table, bulk, min_cells,
             min_genes, allow_non_integer, feature_types, seed, val_fraction, shard_cells,
             shard_mb, codec, counts_dtype, chunk_nnz, overwrite, progress, log, genome,
             ds_names, sources, state):
    # ---- names, kinds, fingerprint
    bulk = set(map(str, bulk))
    unknown = bulk - set(ds_names) - set(map(str, inputs))
    if unknown:
        raise ValueError(f"--bulk-input {', '.join(sorted(unknown))}: names no input; give a "
                         f"dataset name ({', '.join(ds_names)}) or an input path as given")
    kinds = ["bulk" if (r.kind == "bulk" or n in bulk or str(p) in bulk) else "single-cell"
             for r, n, p in zip(readers, ds_names, inputs)]
    for r in readers:  # before anything is written
        if r.feature_types is not None and feature_types:
            present = pd.unique(r.feature_types.astype(str))
            if not np.isin(present, list(feature_types)).any():
                raise InputError(f"{r.path}: no feature of the type(s) --feature-types "
                                 f"{','.join(feature_types)!r} asks for (the names must match "
                                 f"exactly); its features are of type "
                                 f"{', '.join(repr(str(t)) for t in present)}")
    params = dict(format=FORMAT_VERSION, vocab=str(vocab) if vocab else None,
                  vocab_hash=Vocabulary.load(vocab).hash if vocab else None, gene_key=gene_key,
                  gene_table=str(gene_table) if gene_table else None, names=ds_names,
                  kinds=kinds, **sources, min_cells=min_cells,
                  min_genes=min_genes, allow_non_integer=allow_non_integer,
                  feature_types=list(feature_types), seed=seed, val_fraction=val_fraction,
                  shard_cells=shard_cells, shard_mb=shard_mb, codec=codec,
                  counts_dtype=counts_dtype)
    if genome:  # only when given: older fingerprints stay valid
        params["genome"] = [genome] if isinstance(genome, str) else list(genome)
    # obs first: a column that cannot be stored fails before any pass over the counts
    obs_tables = ObsTables([r.obs() for r in readers], ds_names, [r.n_cells for r in readers],
                           [r.path for r in readers])
    fingerprint = _fingerprint(inputs, params)
    if _prepare_out(out, fingerprint, overwrite):
        log(f"{out}: already converted with these inputs and options; nothing to do")
        return Manifest.load(out)
    state["prepared"] = True
    work = out / WORK
    work.mkdir(exist_ok=True)
    if not (work / "plan.json").is_file():
        write_json_atomic(work / "plan.json", {"fingerprint": fingerprint, "params": params})

    # ---- gene keys
    given = Vocabulary.load(vocab) if vocab else None
    pairs = []
    for r in readers:
        if r.gene_ids is not None and r.gene_symbols is not None:
            pairs += list(zip(r.gene_ids, r.gene_symbols))
    if given is not None:
        pairs += list(zip(given.ids, given.symbols))
    if gene_table:
        pairs += read_gene_table(Path(gene_table))
    sym2id = symbol_to_id_map(pairs)
    datasets: list[_Dataset] = []
    for r, name, kind in zip(readers, ds_names, kinds):
        keys, syms = dataset_keys(r, gene_key, sym2id)
        valid = np.ones(len(keys), dtype=bool)
        if r.feature_types is not None and feature_types:
            valid = np.isin(r.feature_types.astype(str), list(feature_types))
        # of the features kept: the antibody tags --feature-types drops are no genes
        by_id = int(sum(bool(ENSEMBL_RE.match(str(k))) for k in keys[valid]))
        if gene_key == "auto" and 0 < by_id < valid.sum():  # say so: genes merge by key
            log(f"{name}: {by_id:,} genes keyed by Ensembl id, {int(valid.sum()) - by_id:,} by "
                f"symbol (no id known for them" + ("" if gene_table else
                                                   "; --gene-table maps symbols to ids") + ")")
        codes, uniques = pd.factorize(pd.Series(keys[valid], dtype=object), sort=False)
        col2local = np.full(len(keys), -1, dtype=np.int64)
        col2local[valid] = codes
        first = np.flatnonzero(valid)[np.unique(codes, return_index=True)[1]]
        merged = int(valid.sum() - len(uniques))
        if merged:  # said now, as repeated cell names are (txfm.data.obs), not only in the manifest
            repeat = keys[valid][pd.Index(codes).duplicated()][0]
            warnings.warn(f"{r.path}: {merged:,} genes repeat the key of an earlier one (e.g. "
                          f"{repeat!r}); their counts are summed into one gene "
                          f"(duplicate_features_merged in the manifest). Make the names unique "
                          f"first (AnnData.var_names_make_unique()) to keep them apart",
                          UserWarning, stacklevel=2)
        local_syms = syms[first]
        local_keys = np.asarray(uniques, dtype=object)
        in_vocab = (given.lookup(local_keys) >= 0 if given is not None
                    else np.ones(len(local_keys), bool))
        datasets.append(_Dataset(r, name, kind, col2local, local_keys, local_syms, in_vocab,
                                 report={"path": str(r.path), "kind": kind,
                                         "cells_input": int(r.n_cells),
                                         "features_input": int(r.n_features),
                                         "features_other_type": int((~valid).sum()),
                                         "genes_keyed_by_id": by_id,
                                         "duplicate_features_merged":
                                             int(valid.sum() - len(local_keys)),
                                         "genes_outside_vocab": int((~in_vocab).sum())}))

    # ---- pass 0: stats and filters
    integral, max_count = True, 0.0
    for i, ds in enumerate(datasets):
        st = _stats(ds, i, work, chunk_nnz, allow_non_integer, progress)
        integral &= bool(st["integral"])
        max_count = max(max_count, float(st["max_count"]))
        if 0 < float(st["max_count"]) <= 1:
            warnings.warn(f"{ds.reader.path}: every count is 0 or 1 (binarised data?): TxFM "
                          f"learns from raw UMI counts. {_where_raw_counts(ds)}", stacklevel=2)
        sc = ds.kind == "single-cell"
        ds.gene_keep = ds.in_vocab & ((st["gene_cells"] >= min_cells) if sc else True)
        if not ds.in_vocab.any():
            ours, theirs = (", ".join(repr(str(k)) for k in keys[:3])
                            for keys in (ds.local_keys, given.ids))
            raise InputError(f"{ds.reader.path}: none of its {len(ds.in_vocab):,} genes is in "
                             f"the vocabulary of --vocab {vocab} (its keys, e.g. {ours}; the "
                             f"vocabulary's, e.g. {theirs}); check --vocab, or match the names "
                             f"with --gene-key / --gene-table")
        if not ds.gene_keep.any():
            raise InputError(f"{ds.reader.path}: no gene left after filters (genes outside the "
                             f"vocabulary: {int((~ds.in_vocab).sum())}; most cells per gene: "
                             f"{int(st['gene_cells'].max()) if st['gene_cells'].size else 0} < "
                             f"min_cells={min_cells}); lower --min-cells")
        cell_genes = st["cell_genes"]
        if sc and min_genes > 0 and not np.array_equal(ds.gene_keep, ds.in_vocab):
            cell_genes = _recount_cells(ds, i, work, chunk_nnz, progress)
        ds.cell_keep = (cell_genes >= min_genes) if sc else np.ones(ds.reader.n_cells, bool)
        n_kept = int(ds.cell_keep.sum())
        if n_kept == 0:
            raise InputError(f"{ds.reader.path}: no cell left after filters (most genes per cell: "
                             f"{int(cell_genes.max())} < min_genes={min_genes}); lower --min-genes")
        ds.report.update(cells_kept=n_kept, genes_kept=int(ds.gene_keep.sum()),
                         genes_dropped_min_cells=int((ds.in_vocab & ~ds.gene_keep).sum()),
                         cells_dropped_min_genes=int(ds.reader.n_cells - n_kept),
                         nnz_kept_estimate=int(cell_genes[ds.cell_keep].sum()))
        log(f"{ds.name} ({ds.kind}): {n_kept:,}/{ds.reader.n_cells:,} cells, "
            f"{int(ds.gene_keep.sum()):,}/{len(ds.local_keys):,} genes kept"
            + (f" (filters: genes in >= {min_cells} cells, cells with >= {min_genes} genes)"
               if sc else " (bulk: not filtered)"))

    # ---- vocabulary and dtypes
    vocab_obj = given if given is not None else union_vocabulary(
        [(d.local_keys[d.gene_keep], d.local_syms[d.gene_keep]) for d in datasets])
    n_genes = len(vocab_obj)
    for ds in datasets:
        ids = vocab_obj.lookup(ds.local_keys)
        ds.local2vocab = np.where(ds.gene_keep, ids, -1)
    idx_dtype = np.dtype("uint16") if n_genes <= 65536 else np.dtype("uint32")
    if counts_dtype == "auto":
        cnt_dtype = (np.dtype("uint16") if integral and max_count <= 65535 else
                     np.dtype("uint32") if integral and max_count < 2**32 else np.dtype("float32"))
    else:
        cnt_dtype = np.dtype(counts_dtype)
        if cnt_dtype.kind == "u" and (not integral or max_count > np.iinfo(cnt_dtype).max):
            raise ValueError(f"counts_dtype={counts_dtype} cannot hold these counts (max "
                             f"{max_count}, integer={integral}); use auto")
    if cnt_dtype == np.float32 and integral and max_count > _FLOAT32_EXACT:
        log(f"warning: counts up to {max_count:,.0f} are stored as float32, which holds integers "
            f"exactly only up to {_FLOAT32_EXACT:,} (larger ones are rounded, relative error "
            f"< 6e-8)" + (f"; uint32 holds them up to {2**32 - 1:,}" if max_count < 2**32
                          else "; counts this large are seldom raw sequencing counts: check "
                               "the input"))

    # ---- layout
    offset = 0
    for ds in datasets:
        ds.kept_offset = offset
        offset += int(ds.cell_keep.sum())
    n_total = offset
    n_val = int(round(n_total * val_fraction)) if val_fraction > 0 else 0
    if val_fraction > 0 and n_total >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, n_total - 1)
    n_train = n_total - n_val
    nnz_est = sum(d.report["nnz_kept_estimate"] for d in datasets)
    bytes_per_cell = max(1.0, nnz_est / n_total * (idx_dtype.itemsize + cnt_dtype.itemsize))
    per_shard = int(shard_cells or max(1, int(shard_mb * 2**20 / bytes_per_cell)))
    shards = _shard_plan(n_train, n_val, per_shard)
    log(f"corpus: {n_total:,} cells ({n_train:,} train, {n_val:,} val) x {n_genes:,} genes; "
        f"{len(shards)} shards of <= {per_shard:,} cells; counts {cnt_dtype}, indices "
        f"{idx_dtype}, codec {codec}")
    perm = np.random.default_rng(seed).permutation(n_total)
    starts = np.array([s["start"] for s in shards], dtype=np.int64)

    # ---- pass 1: scatter into buckets
    buckets = work / "buckets"
    if not (work / "buckets.done").is_file():
        if buckets.exists():
            shutil.rmtree(buckets)
        buckets.mkdir()
        bar = _progress(n_total, "scatter", progress)
        for i, ds in enumerate(datasets):
            col2vocab = np.where(ds.col2local >= 0, ds.local2vocab[np.maximum(ds.col2local, 0)], -1)
            kept_before = np.concatenate([[0], np.cumsum(ds.cell_keep, dtype=np.int64)])
            for first_row, m in ds.reader.iter_chunks(chunk_nnz):
                keep = ds.cell_keep[first_row:first_row + m.shape[0]]
                rows = np.flatnonzero(keep)
                if rows.size == 0:
                    continue
                m = m if rows.size == m.shape[0] else m[rows]
                m = _to_local(m, col2vocab, n_genes)
                g = ds.kept_offset + kept_before[first_row] + np.arange(rows.size, dtype=np.int64)
                pos = perm[g]
                shard = np.searchsorted(starts, pos, side="right") - 1
                order = np.argsort(shard, kind="stable")
                m, pos, shard = m[order], pos[order], shard[order]
                src_rows = first_row + rows[order]
                cuts = np.flatnonzero(np.diff(shard)) + 1
                bounds = np.concatenate([[0], cuts, [shard.size]])
                for a, b in zip(bounds[:-1], bounds[1:]):
                    s = int(shard[a])
                    meta = np.empty(b - a, dtype=_META)
                    meta["pos"] = pos[a:b] - starts[s]
                    meta["nnz"] = np.diff(m.indptr[a:b + 1])
                    meta["ds"] = i
                    meta["row"] = src_rows[a:b]
                    e0, e1 = int(m.indptr[a]), int(m.indptr[b])
                    with open(buckets / f"{s}.meta", "ab") as f:
                        meta.tofile(f)
                    with open(buckets / f"{s}.idx", "ab") as f:
                        m.indices[e0:e1].astype(idx_dtype).tofile(f)
                    with open(buckets / f"{s}.val", "ab") as f:
                        m.data[e0:e1].astype(cnt_dtype).tofile(f)
                bar.update(rows.size)
        bar.close()
        (work / "buckets.done").write_text("ok\n")

    # ---- pass 2: shards
    var = pd.DataFrame({"symbol": list(vocab_obj.symbols)},
                       index=pd.Index(list(vocab_obj.ids), name=None))
    for stale in list(out.glob(".tmp-*")) + list((out / VAL_GROUP).glob(".tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in [p for folder in (out, out / VAL_GROUP) if folder.is_dir()
                  for p in folder.iterdir() if p.is_file() and atomic_target(p.name)]:
        stale.unlink(missing_ok=True)  # a half-written zarr.json or manifest of a killed run
    gene_nnz = np.zeros(n_genes, dtype=np.int64)
    gene_stats = GeneStats.zeros(n_genes)
    train_cells_by_ds = np.zeros(len(datasets), dtype=np.int64)
    records = []
    elem_cache: dict = {}
    bar = _progress(len(shards), "shards", progress, unit="shard")
    for k, spec in enumerate(shards):
        final = out / spec["path"]
        stats_file = work / f"shard_{k}.npz"
        if not final.is_dir():
            _write_shard(k, spec, final, buckets, stats_file, idx_dtype, cnt_dtype, n_genes,
                         obs_tables, var, codec, elem_cache)
        st = np.load(stats_file)
        if spec["split"] == "train":
            gene_nnz += st["gene_nnz"]
            gene_stats.frac_sum += st["gene_frac_sum"]
            gene_stats.log1p_sum += st["gene_log1p_sum"]
            train_cells_by_ds += st["ds_cells"]
        records.append({"path": spec["path"], "split": spec["split"], "n_cells": spec["n"],
                        "nnz": int(st["nnz"]), "cell_offset": spec["start"]})
        bar.update(1)
    bar.close()

    # ---- finish: vocab, groups, manifest (last)
    vocab_obj.save(out / VOCAB_FILE)
    for i, d in enumerate(datasets):  # training cells that profile each gene
        gene_stats.n_cells[d.local2vocab[d.gene_keep]] += train_cells_by_ds[i]
    n_cells_by_ds = np.zeros(len(datasets), dtype=np.int64)
    for k in range(len(shards)):
        n_cells_by_ds += np.load(work / f"shard_{k}.npz")["ds_cells"]
    doc = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "fingerprint": fingerprint,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "vocab": {"file": VOCAB_FILE, "hash": vocab_obj.hash, "n_genes": n_genes},
        "counts_dtype": cnt_dtype.name, "indices_dtype": idx_dtype.name, "codec": codec,
        "max_count": max_count, "integer_counts": integral, "every_chunk_written": True,
        "n_cells": n_total, "n_train": n_train, "n_val": n_val, "seed": seed,
        "shuffle": ("numpy.random.default_rng(seed).permutation(n_cells) over kept cells in "
                    "input order; position p < n_train goes to training shard p // shard_cells; "
                    "obs columns dataset + source_row give each cell's origin"),
        "params": params,
        "datasets": [{"name": d.name, "kind": d.kind, "n_cells": int(n_cells_by_ds[i]),
                      "observable": np.sort(d.local2vocab[d.gene_keep]).tolist(),
                      "report": d.report} for i, d in enumerate(datasets)],
        "obs_columns": ["dataset", "source_row"] + obs_tables.columns,
        "shards": records,
        "gene_nnz": gene_nnz.tolist(),
        **gene_stats.to_json(),
    }
    root_attrs = {**COLLECTION_ATTRS, "txfm": {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                                "manifest": MANIFEST, "vocab_hash": vocab_obj.hash}}
    if n_val:
        write_group_json(out / VAL_GROUP, {**root_attrs, "txfm": {**root_attrs["txfm"],
                                                                   "split": "val"}})
    write_group_json(out, root_attrs)
    write_json_atomic(out / MANIFEST, doc)
    shutil.rmtree(work, ignore_errors=True)
    manifest = Manifest.load(out)
    log(manifest.summary())
    return manifest


def _shard_plan(n_train: int, n_val: int, per_shard: int) -> list[dict]:
    shards = []
    for split, start0, n in (("train", 0, n_train), ("val", n_train, n_val)):
        for k, a in enumerate(range(0, n, per_shard)):
            path = f"{SHARD_PREFIX}{k}" if split == "train" else f"{VAL_GROUP}/{SHARD_PREFIX}{k}"
            shards.append({"path": path, "split": split, "start": start0 + a,
                           "n": min(per_shard, n - a)})
    return shards


def _stats(ds: _Dataset, i: int, work: Path, chunk_nnz: int, allow_non_integer: bool,
           progress: bool) -> dict:
    cache = work / f"stats_{i}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return dict(z)
    n_local = len(ds.local_keys)
    col_map = np.where(ds.in_vocab[np.maximum(ds.col2local, 0)] & (ds.col2local >= 0),
                       ds.col2local, -1)
    gene_cells = np.zeros(n_local, dtype=np.int64)
    cell_genes = np.zeros(ds.reader.n_cells, dtype=np.int64)
    integral, max_count = True, 0.0
    bar = _progress(ds.reader.n_cells, f"check {ds.name}", progress)
    for first_row, m in ds.reader.iter_chunks(chunk_nnz):
        integral &= _check_counts(ds, first_row, m, allow_non_integer)
        m = _to_local(m, col_map, n_local)
        if m.nnz:
            max_count = max(max_count, float(m.data.max()))
            gene_cells += np.bincount(m.indices, minlength=n_local)
        cell_genes[first_row:first_row + m.shape[0]] = np.diff(m.indptr)
        bar.update(m.shape[0])
    bar.close()
    st = {"gene_cells": gene_cells, "cell_genes": cell_genes, "integral": np.bool_(integral),
          "max_count": np.float64(max_count)}
    write_atomic(cache, lambda tmp: np.savez(tmp, **st))
    return st


def _recount_cells(ds: _Dataset, i: int, work: Path, chunk_nnz: int, progress: bool) -> np.ndarray:
    """Genes per cell counted over the kept genes only (second pass when genes were dropped)."""
    cache = work / f"recount_{i}.npy"
    if cache.is_file():
        return np.load(cache)
    keep = ds.gene_keep[np.maximum(ds.col2local, 0)] & (ds.col2local >= 0)
    col_map = np.where(keep, ds.col2local, -1)
    out = np.zeros(ds.reader.n_cells, dtype=np.int64)
    bar = _progress(ds.reader.n_cells, f"recount {ds.name}", progress)
    for first_row, m in ds.reader.iter_chunks(chunk_nnz):
        m = _to_local(m, col_map, len(ds.local_keys))
        out[first_row:first_row + m.shape[0]] = np.diff(m.indptr)
        bar.update(m.shape[0])
    bar.close()
    write_atomic(cache, lambda tmp: np.save(tmp, out))
    return out


def _write_shard(k, spec, final: Path, buckets: Path, stats_file: Path, idx_dtype, cnt_dtype,
                 n_genes, obs_tables: ObsTables, var, codec, elem_cache: dict) -> None:
    meta = np.fromfile(buckets / f"{k}.meta", dtype=_META)
    indices = np.fromfile(buckets / f"{k}.idx", dtype=idx_dtype)
    counts = np.fromfile(buckets / f"{k}.val", dtype=cnt_dtype)
    n = spec["n"]
    if meta.size != n or indices.size != counts.size or indices.size != int(meta["nnz"].sum()):
        raise RuntimeError(f"bucket of shard {spec['path']} is incomplete ({meta.size} of {n} "
                           f"cells); delete {buckets.parent} and re-run the conversion")
    order = np.argsort(meta["pos"], kind="stable")
    if not np.array_equal(meta["pos"][order], np.arange(n)):
        raise RuntimeError(f"bucket of shard {spec['path']} has wrong cell positions; delete "
                           f"{buckets.parent} and re-run the conversion")
    src_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(meta["nnz"], out=src_ptr[1:])
    m = sp.csr_matrix((counts, indices.astype(np.int32), src_ptr), shape=(n, n_genes))[order]
    del indices, counts
    meta = meta[order]
    obs = obs_tables.frame(meta["ds"], meta["row"])
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    final.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    write_csr_store(tmp, indptr=m.indptr.astype(np.int64), indices=m.indices.astype(idx_dtype),
                    counts=m.data.astype(cnt_dtype, copy=False), n_genes=n_genes, obs=obs,
                    var=var, codec=codec, cache=elem_cache)
    gstats = GeneStats.zeros(n_genes)  # the decoder's starting point (txfm.data.stats)
    gstats.add_csr(m.indptr, m.indices, m.data, np.zeros(n_genes, np.int64))
    stats = {"gene_nnz": np.bincount(m.indices, minlength=n_genes).astype(np.int64),
             "gene_frac_sum": gstats.frac_sum, "gene_log1p_sum": gstats.log1p_sum,
             "nnz": np.int64(m.nnz),
             "ds_cells": np.bincount(meta["ds"], minlength=obs_tables.n_datasets).astype(np.int64)}
    write_atomic(stats_file, lambda tmp_stats: np.savez(tmp_stats, **stats))
    os.rename(tmp, final)
    for ext in ("meta", "idx", "val"):
        (buckets / f"{k}.{ext}").unlink(missing_ok=True)
