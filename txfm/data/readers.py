"""Streaming readers for the converter's inputs: ``.h5ad``, 10x directories and 10x ``.h5``.

Every reader exposes the same small surface (:class:`InputReader`): the number of cells, the
feature table (Ensembl-style ids and/or symbols, feature types), ``obs`` as a DataFrame, and
``iter_chunks(max_nnz)`` yielding ``(first_row, csr)`` with at most about ``max_nnz`` stored
values per chunk (cells x features, ``scipy.sparse.csr_matrix``, indices not necessarily
sorted). Nothing holds the whole matrix in memory except two documented fallbacks: CSC
``.h5ad`` matrices and MatrixMarket files whose entries are not grouped by cell.

Every reader checks what its format declares against what it holds, so that a damaged input
fails instead of silently losing cells: matrix shape vs the feature table, the barcodes and
``obs``; CSR/CSC ``indptr`` length, monotonicity and last value vs the stored values; column
indices inside the shape; the MatrixMarket header's entry count vs the entry lines (a file
cut at a line boundary has fewer), a plain ``.mtx`` that does not end with a newline (cut
mid-line); truncated or corrupt ``.gz`` files. Errors are :class:`InputError` naming the file
(and the line for text files).
"""
from __future__ import annotations

import gzip
import re
import warnings
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from txfm.cli import interrupted

ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_SYMBOL_COLUMNS = ("symbol", "gene_symbol", "gene_symbols", "gene_name", "gene_names",
                   "feature_name", "name")
_ID_COLUMNS = ("gene_id", "gene_ids", "ensembl_id", "ensembl_gene_id", "feature_id", "id")
# what reading a damaged file raises: truncated gzip (EOFError), corrupt gzip (zlib.error,
# gzip.BadGzipFile is an OSError), unreadable HDF5 chunks (OSError), binary junk in text
_READ_ERRORS = (OSError, EOFError, zlib.error, UnicodeDecodeError)
# float16 holds every whole number only up to 2**11; larger counts were rounded when written
FLOAT16_EXACT = 2048


class InputError(ValueError):
    """An input cannot be read or is not what the converter expects; names the file."""


def looks_like_ensembl(values) -> bool:
    values = [str(v) for v in values[:2000]]
    return bool(values) and sum(bool(ENSEMBL_RE.match(v)) for v in values) >= 0.9 * len(values)


def strip_version(ids: np.ndarray) -> np.ndarray:
    """``ENSG00000141510.16`` -> ``ENSG00000141510`` (versions differ between annotations)."""
    return np.array([s.split(".", 1)[0] if ENSEMBL_RE.match(s) else s for s in ids], dtype=object)


def _why(exc: BaseException) -> str:
    """A read error in words, with the usual cause."""
    if isinstance(exc, EOFError):
        return "the compressed stream ends early: the file is truncated (an interrupted copy?)"
    if isinstance(exc, (zlib.error, gzip.BadGzipFile)):
        return f"corrupt gzip data ({exc})"
    if isinstance(exc, UnicodeDecodeError):
        return "not a text file"
    return f"{type(exc).__name__}: {exc}"


def _open_file(path: Path, mode: str = "rt"):
    return gzip.open(path, mode) if path.suffix == ".gz" else open(path, mode)


def _read_table(path: Path, what: str) -> list[list[str]]:
    """Non-blank tab-separated lines of a (gzipped) text file, all with the same number of
    fields; InputError naming the file (and line) when it is empty, ragged or damaged."""
    rows, lines, lineno = [], [], 0
    try:
        with _open_file(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    rows.append(line.rstrip("\r\n").split("\t"))
                    lines.append(lineno)
    except _READ_ERRORS as exc:
        raise InputError(f"{path}: cannot read the {what} after line {lineno} ({_why(exc)}); "
                         f"re-create or re-download it") from exc
    if not rows:
        raise InputError(f"{path}: the {what} file is empty")
    width = len(rows[0])
    for row, lineno in zip(rows, lines):
        if len(row) != width:
            raise InputError(f"{path}, line {lineno}: {len(row)} tab-separated fields, but line "
                             f"{lines[0]} has {width}; the {what} is damaged")
    return rows


def _find(folder: Path, *names: str) -> Path | None:
    """The first of ``names`` in ``folder``, plain or gzipped. Both forms of one file (a
    ``gunzip -k`` left the original) are refused: which one holds the counts is not ours to
    guess, and they may differ."""
    for name in names:
        both = [c for c in (folder / name, folder / (name + ".gz")) if c.is_file()]
        if len(both) == 2:
            raise InputError(f"{folder}: holds both {name} and {name}.gz; remove the one that "
                             f"is not the data (10x folders hold one of them)")
        if both:
            return both[0]
    return None


def _check_indptr(path, where: str, indptr: np.ndarray, n_major: int, n_values: int) -> None:
    """A compressed-sparse ``indptr`` as declared: ``n_major + 1`` non-decreasing offsets
    from 0 to the number of stored values."""
    if indptr.size != n_major + 1:
        raise InputError(f"{path}: {where}indptr has {indptr.size} entries but the shape needs "
                         f"{n_major + 1}; the file is damaged or truncated")
    if indptr[0] != 0 or indptr[-1] != n_values or np.any(np.diff(indptr) < 0):
        raise InputError(f"{path}: {where}indptr is not a valid offset array (first "
                         f"{int(indptr[0])}, last {int(indptr[-1])}, {n_values} values stored); "
                         f"the file is damaged or truncated")


class InputReader:
    """Common interface; see the module docstring."""

    path: Path
    name: str
    kind: str = "single-cell"  # or "bulk"
    n_cells: int
    gene_ids: np.ndarray | None  # object array of Ensembl-style ids, or None
    gene_symbols: np.ndarray | None
    feature_types: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        ref = self.gene_ids if self.gene_ids is not None else self.gene_symbols
        return len(ref)

    def obs(self) -> pd.DataFrame:
        raise NotImplementedError

    def iter_chunks(self, max_nnz: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        """``(first_row, csr)`` chunks in row order covering all ``n_cells`` rows; each
        ``csr`` is cells x ``n_features``, its values of a numeric dtype scipy.sparse holds
        (a reader refuses other values when it opens the file, :meth:`_check_values`). Raises
        :class:`InputError` naming the file when the matrix cannot be read or breaks its
        declared shape."""
        if max_nnz < 1:
            raise ValueError(f"max_nnz must be >= 1, got {max_nnz}")
        rows = 0
        try:
            for first_row, m in self._chunks(int(max_nnz)):
                if m.nnz and (int(m.indices.min()) < 0 or int(m.indices.max()) >= self.n_features):
                    bad = m.indices[(m.indices < 0) | (m.indices >= self.n_features)][0]
                    raise InputError(f"{self.path}: feature index {int(bad)} in cells "
                                     f"{first_row}-{first_row + m.shape[0] - 1} is outside the "
                                     f"{self.n_features} features; the file is damaged")
                rows = first_row + m.shape[0]
                yield first_row, m
        except InputError:
            raise
        except (*_READ_ERRORS, KeyError, ValueError) as exc:
            raise InputError(f"{self.path}: cannot read the matrix after cell {rows} "
                             f"({_why(exc)})") from exc
        if rows != self.n_cells:
            raise InputError(f"{self.path}: the matrix holds {rows} cells but {self.n_cells} are "
                             f"declared; the file is damaged or truncated")

    def _chunks(self, max_nnz: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        raise NotImplementedError

    def _check_values(self, where: str, dtype) -> None:
        """Refuse stored values that are not numbers (strings, objects, complex), naming the
        matrix: counts are integers or floats."""
        dtype = np.dtype(dtype)
        if dtype.kind not in "biuf":
            raise InputError(f"{self.path}: {where} holds {dtype} values, not numbers; give "
                             f"the raw counts (integers, or floats holding whole numbers)")

    def _counts(self, values: np.ndarray, where: str) -> np.ndarray:
        """Stored values as scipy.sparse can hold them: float16, which it cannot, is widened
        to float32 (exactly), with one warning if a value is above :data:`FLOAT16_EXACT`."""
        if values.dtype != np.float16:
            return values
        if (not getattr(self, "_warned_float16", False) and values.size
                and float(np.nanmax(values)) > FLOAT16_EXACT):
            self._warned_float16 = True
            warnings.warn(f"{self.path}: {where} stores the counts as float16, which holds "
                          f"whole numbers exactly only up to {FLOAT16_EXACT:,}: larger counts "
                          f"were rounded when the file was written; store them as integers or "
                          f"float32", stacklevel=4)
        return values.astype(np.float32)

    def close(self) -> None:
        pass

    def _set_features(self, ids, symbols) -> None:
        as_obj = lambda v: np.asarray(v, dtype=str).astype(object)  # noqa: E731
        self.gene_ids = None if ids is None else strip_version(as_obj(ids))
        self.gene_symbols = None if symbols is None else as_obj(symbols)

    def _check_shape(self, n_rows: int, n_cols: int) -> None:
        if n_rows == 0:
            raise InputError(f"{self.path}: has no cells (0 rows): nothing to convert")
        if n_cols == 0:
            raise InputError(f"{self.path}: has no genes (0 columns): nothing to convert")
        if n_cols != self.n_features:
            raise InputError(f"{self.path}: matrix has {n_cols} columns but the feature table "
                             f"has {self.n_features} entries")


def _row_chunks(indptr: np.ndarray, max_nnz: int) -> np.ndarray:
    """Row boundaries so each chunk holds at most ~max_nnz values (and at least one row)."""
    n = indptr.size - 1
    targets = np.arange(0, int(indptr[-1]) + max_nnz, max_nnz)
    cuts = np.searchsorted(indptr, targets, side="right") - 1
    cuts = np.unique(np.clip(cuts, 0, n))
    if cuts[0] != 0:
        cuts = np.concatenate([[0], cuts])
    if cuts[-1] != n:
        cuts = np.concatenate([cuts, [n]])
    # a single row larger than max_nnz makes two equal cuts collapse; np.unique already did
    return cuts


def _n_rows(elem) -> int:
    """Rows of an anndata dataframe element (``obs``/``var``) without reading its columns."""
    import h5py

    if isinstance(elem, h5py.Dataset):  # anndata < 0.7: one compound dataset
        return int(elem.shape[0])
    index = elem.attrs.get("_index", "_index")
    index = index.decode() if isinstance(index, bytes) else str(index)
    return int(elem[index].shape[0])


# ---------------------------------------------------------------------------------- h5ad
class H5adReader(InputReader):
    """``X`` (or ``layers[layer]`` or ``raw/X``) of an ``.h5ad`` file, CSR/CSC/dense."""

    def __init__(self, path: Path, *, layer: str | None = None, use_raw: bool = False,
                 chosen_by: str | None = None):
        import h5py

        self.path = Path(path)
        self.name = input_name(self.path)
        self._chosen_by = chosen_by
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(f"{self.path}: cannot open as HDF5/.h5ad ({exc})") from exc
        try:
            self._open(layer, use_raw)
        except (KeyError, OSError) as exc:  # a damaged file: a missing or unreadable element
            self._f.close()
            raise InputError(f"{self.path}: not a readable .h5ad ({_why(exc)})") from exc
        except BaseException:
            self._f.close()
            raise

    def _open(self, layer: str | None, use_raw: bool) -> None:
        f = self._f
        if use_raw and layer:
            raise InputError(f"{self.path}: give either --layer or --raw, not both")
        layers = list(f["layers"].keys()) if "layers" in f else []
        # how the count matrix was chosen: this input's own --counts, or the global flag
        by = self._chosen_by or ("--raw" if use_raw else f"--layer {layer}")
        every = ("" if self._chosen_by else "; --raw and --layer apply to every .h5ad input: "
                 f"give this one its own with --counts {self.path}=WHERE (X, raw or "
                 "layers/NAME)")
        if use_raw:
            if "raw" not in f:
                raise InputError(f"{self.path}: {by} given but the file has no .raw (layers: "
                                 f"{layers}){every}")
            x_key, var_key = "raw/X", "raw/var"
        elif layer:
            if layer not in layers:
                raise InputError(f"{self.path}: {by} given but the file has no layer "
                                 f"{layer!r} (layers: {layers}"
                                 f"{', and .raw' if 'raw' in f else ''}){every}")
            x_key, var_key = f"layers/{layer}", "var"
        else:
            x_key, var_key = "X", "var"
        if x_key == "X" and "X" not in f and (layers or "raw" in f):
            raise InputError(f"{self.path}: has no .X; its counts may be in "
                             + ", ".join([f"--layer {n}" for n in layers]
                                         + (["--raw"] if "raw" in f else [])))
        for key in (x_key, var_key, "obs"):
            if key not in f:
                raise InputError(f"{self.path}: no {key} (is this an AnnData .h5ad file?)")
        import anndata as ad

        var = self._read_frame(var_key)
        uns = f.get("uns")
        modality = ""
        if uns is not None:
            for key in ("txfm_modality", "modality"):
                if key in uns:
                    modality = str(ad.io.read_elem(uns[key]))
        self.kind = "bulk" if modality.lower() == "bulk" else "single-cell"
        index = np.asarray(var.index, dtype=str)
        ids = symbols = None
        if looks_like_ensembl(index):
            ids = index
            symbols = next((var[c].astype(str).to_numpy() for c in _SYMBOL_COLUMNS if c in var),
                           None)
        else:
            symbols = index
            for c in _ID_COLUMNS:
                if c in var and looks_like_ensembl(var[c].astype(str).to_numpy()):
                    ids = var[c].astype(str).to_numpy()
                    break
        self._set_features(ids, symbols)
        ftype = next((c for c in ("feature_types", "feature_type") if c in var), None)
        self.feature_types = None if ftype is None else var[ftype].astype(str).to_numpy()
        self._x = x = f[x_key]
        enc = x.attrs.get("encoding-type", x.attrs.get("h5sparse_format", "array"))
        enc = enc.decode() if isinstance(enc, bytes) else str(enc)
        if enc in ("csr_matrix", "csr", "csc_matrix", "csc"):
            self._fmt = enc[:3]
            missing = [k for k in ("data", "indices", "indptr") if k not in x]
            if missing or "shape" not in x.attrs:
                raise InputError(f"{self.path}: sparse {x_key} lacks "
                                 f"{missing or ['its shape attribute']}; the file is damaged")
            shape = tuple(int(v) for v in x.attrs["shape"])
            if len(shape) != 2:
                raise InputError(f"{self.path}: {x_key} has shape {shape}, not 2-D")
            n_values = x["data"].shape[0]
            if x["indices"].shape[0] != n_values:
                raise InputError(f"{self.path}: {x_key} stores {n_values} values but "
                                 f"{x['indices'].shape[0]} indices; the file is damaged")
            indptr = x["indptr"][:].astype(np.int64)
            _check_indptr(self.path, f"{x_key}/", indptr,
                          shape[0] if self._fmt == "csr" else shape[1], n_values)
            self._indptr = indptr
            self._check_values(x_key, x["data"].dtype)
        else:
            if not hasattr(x, "shape") or len(x.shape) != 2:
                raise InputError(f"{self.path}: {x_key} is neither a sparse matrix nor a 2-D array")
            self._fmt = "dense"
            shape = x.shape
            self._check_values(x_key, x.dtype)
        self._x_key = x_key
        self.n_cells = shape[0]
        self._check_shape(*shape)
        n_obs = _n_rows(f["obs"])
        if n_obs != shape[0]:
            raise InputError(f"{self.path}: obs has {n_obs} rows but {x_key} has {shape[0]}; "
                             f"the file is damaged")
        self._shape = shape

    def obs(self) -> pd.DataFrame:
        return self._read_frame("obs")

    def _read_frame(self, key: str) -> pd.DataFrame:
        """The anndata dataframe ``key`` (``obs``, ``var``, ``raw/var``); InputError naming
        the file and the column that cannot be read (damaged, or an encoding this anndata
        does not know)."""
        import anndata as ad

        def read(elem):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return ad.io.read_elem(elem)

        elem = self._f[key]
        try:
            return read(elem)
        except Exception as exc:  # noqa: BLE001 - anndata's IORegistryError, KeyError, OSError..
            bad = None
            for col in getattr(elem, "keys", list)():
                try:
                    read(elem[col])
                except Exception:  # noqa: BLE001
                    bad = col
                    break
            where = f"{key} column {bad!r}" if bad else key
            raise InputError(f"{self.path}: cannot read {where} ({_why(exc)})") from exc

    def _chunks(self, max_nnz: int):
        if self._fmt == "csr":
            cuts = _row_chunks(self._indptr, max_nnz)
            data, indices = self._x["data"], self._x["indices"]
            for a, b in zip(cuts[:-1], cuts[1:]):
                s, e = int(self._indptr[a]), int(self._indptr[b])
                ptr = self._indptr[a:b + 1] - s
                yield int(a), sp.csr_matrix((self._counts(data[s:e], self._x_key), indices[s:e],
                                             ptr), shape=(int(b - a), self._shape[1]))
        elif self._fmt == "csc":
            warnings.warn(f"{self.path}: X is CSC; it is loaded whole into memory to be read by "
                          f"rows (write it as CSR to convert in bounded memory)", stacklevel=3)
            g = self._x
            m = sp.csc_matrix((self._counts(g["data"][:], self._x_key), g["indices"][:],
                               self._indptr),
                              shape=self._shape)
            if m.nnz and (m.indices.min() < 0 or m.indices.max() >= self._shape[0]):
                raise InputError(f"{self.path}: CSC row index outside the {self._shape[0]} "
                                 f"rows; the file is damaged")
            m = m.tocsr()
            cuts = _row_chunks(m.indptr.astype(np.int64), max_nnz)
            for a, b in zip(cuts[:-1], cuts[1:]):
                yield int(a), m[a:b]
        else:
            rows = max(1, int(max_nnz // max(self._shape[1], 1)))
            for a in range(0, self._shape[0], rows):
                yield a, sp.csr_matrix(self._counts(self._x[a:a + rows], self._x_key))

    def close(self) -> None:
        self._f.close()


# ------------------------------------------------------------------------ 10x directory
def _entry_problem(line: bytes, n_rows: int, n_cols: int) -> str | None:
    """What is wrong with one MatrixMarket entry line (``row col value``), or None."""
    fields = line.split()
    if len(fields) != 3:
        return f"{len(fields)} fields, 3 expected (row column value)"
    try:
        r, c, v = int(fields[0]), int(fields[1]), float(fields[2])
    except ValueError:
        return "not numbers (row and column must be integers)"
    if not (1 <= r <= n_rows and 1 <= c <= n_cols):
        return f"entry ({r}, {c}) outside the declared {n_rows} x {n_cols} matrix"
    if not np.isfinite(v):
        return f"value {fields[2].decode(errors='replace')} is not a finite number"
    return None


class TenxDirReader(InputReader):
    """A Cell Ranger matrix folder: ``matrix.mtx(.gz)`` + ``features``/``genes.tsv(.gz)`` +
    ``barcodes.tsv(.gz)``. Entries are streamed when grouped by cell (as Cell Ranger writes)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = input_name(self.path)
        self._mtx = _find(self.path, "matrix.mtx")
        feats = _find(self.path, "features.tsv", "genes.tsv")
        bars = _find(self.path, "barcodes.tsv")
        missing = [n for n, p in (("matrix.mtx[.gz]", self._mtx),
                                  ("features.tsv[.gz] or genes.tsv[.gz]", feats),
                                  ("barcodes.tsv[.gz]", bars)) if p is None]
        if missing:
            subs = sorted(d.name + "/" for d in self.path.iterdir()
                          if d.is_dir() and _find(d, "matrix.mtx"))
            hint = (f"; it holds 10x matrix folders {', '.join(subs)} (Cell Ranger v2 writes one "
                    f"per genome): give those as inputs" if subs else "")
            if (self.path / "zarr.json").is_file() or (self.path / ".zgroup").is_file():
                hint = ("; it is a zarr store, which the converter does not read: write it as "
                        ".h5ad (anndata.read_zarr(path).write_h5ad(...))")
            raise InputError(f"{self.path}: not a 10x matrix folder, missing "
                             f"{', '.join(missing)}{hint}")
        rows = _read_table(feats, "feature table")
        first = np.array([r[0] for r in rows], dtype=object)
        if len(rows[0]) >= 2:
            self._set_features(first, [r[1] for r in rows])
            if len(rows[0]) >= 3:
                self.feature_types = np.array([r[2] for r in rows], dtype=object)
        elif looks_like_ensembl(first):
            self._set_features(first, None)
        else:
            self._set_features(None, first)
        self._barcodes = np.array([r[0] for r in _read_table(bars, "barcodes")], dtype=object)
        self.n_cells = len(self._barcodes)
        n_rows, n_cols, size_line = self._read_header()
        self._dims = (n_rows, n_cols)
        # Cell Ranger writes features x cells; accept the transpose too.
        if (n_rows, n_cols) == (self.n_features, self.n_cells):
            self._cells_axis = 1
        elif (n_rows, n_cols) == (self.n_cells, self.n_features):
            self._cells_axis = 0
        else:
            raise InputError(f"{self._mtx}, line {size_line}: declares a {n_rows} x {n_cols} "
                             f"matrix but {feats.name} lists {self.n_features} features and "
                             f"{bars.name} {self.n_cells} barcodes; the files do not belong "
                             f"together or one is truncated")
        self._check_shape(self.n_cells, self.n_features)
        if self._mtx.suffix != ".gz":  # a .gz is checked by its own trailer
            with open(self._mtx, "rb") as f:
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    raise InputError(f"{self._mtx}: the last line does not end with a newline: "
                                     f"the file looks cut off mid-line (if it is complete, add "
                                     f"a final newline)")

    def _read_header(self) -> tuple[int, int, int]:
        """Parse the banner and size line; returns (rows, columns, size line number) and sets
        the entry count and the number of header lines."""
        mtx, lineno = self._mtx, 0
        try:
            with _open_file(mtx) as f:
                head = f.readline()
                lineno = 1
                words = head.lower().split()
                if len(words) < 4 or words[:2] != ["%%matrixmarket", "matrix"]:
                    raise InputError(f"{mtx}, line 1: not a MatrixMarket header (expected "
                                     f"'%%MatrixMarket matrix coordinate integer general', "
                                     f"found {head[:60].rstrip()!r})")
                fmt, field = words[2], words[3]
                symmetry = words[4] if len(words) > 4 else "general"
                if fmt != "coordinate":
                    raise InputError(f"{mtx}, line 1: MatrixMarket format {fmt!r} not supported "
                                     f"(sparse 'coordinate' expected)")
                if field not in ("integer", "real", "double"):
                    raise InputError(f"{mtx}, line 1: MatrixMarket field {field!r} not supported "
                                     f"(integer or real expected)")
                if symmetry != "general":
                    raise InputError(f"{mtx}, line 1: MatrixMarket symmetry {symmetry!r} not "
                                     f"supported (general expected)")
                line = f.readline()
                lineno += 1
                while line.startswith("%"):
                    line = f.readline()
                    lineno += 1
        except _READ_ERRORS as exc:
            raise InputError(f"{mtx}: cannot read the MatrixMarket header ({_why(exc)})") from exc
        try:
            n_rows, n_cols, nnz = (int(v) for v in line.split())
            if min(n_rows, n_cols, nnz) < 0:
                raise ValueError
        except ValueError:
            raise InputError(f"{mtx}, line {lineno}: expected the size line 'rows columns "
                             f"entries' (three non-negative integers), found "
                             f"{line[:60].rstrip()!r}") from None
        self._nnz, self._header_lines = nnz, lineno
        return n_rows, n_cols, lineno

    def obs(self) -> pd.DataFrame:
        return pd.DataFrame(index=pd.Index(self._barcodes.astype(str), name=None))

    def _entries(self, chunk_rows: int):
        """``(genes, cells, values)`` blocks of the entry lines (0-based int64 indices,
        float64 values), checked: three fields, integer indices inside the declared shape,
        and as many lines as the header declares."""
        n_rows, n_cols = self._dims
        seen = 0
        try:
            # a 4th column catches lines with extra fields (pandas would drop them silently)
            reader = pd.read_csv(self._mtx, sep=r"\s+", header=None, names=range(4),
                                 skiprows=self._header_lines, dtype=np.float64,
                                 chunksize=chunk_rows, engine="c")
            for df in reader:
                a = df.to_numpy()
                r, c = a[:, 0], a[:, 1]
                bad = (np.isnan(a[:, :3]).any(axis=1) | ~np.isnan(a[:, 3]) | (r != np.floor(r))
                       | (c != np.floor(c)) | (r < 1) | (r > n_rows) | (c < 1) | (c > n_cols)
                       | ~np.isfinite(a[:, 2]))
                if bad.any():
                    self._fail_at(seen + int(np.flatnonzero(bad)[0]))
                seen += len(a)
                r, c = r.astype(np.int64) - 1, c.astype(np.int64) - 1
                genes, cells = (r, c) if self._cells_axis == 1 else (c, r)
                yield genes, cells, a[:, 2]
        except InputError:
            raise
        except (*_READ_ERRORS, ValueError, pd.errors.ParserError) as exc:
            if interrupted():  # pandas' parser reports Ctrl-C during a read as a read error
                raise KeyboardInterrupt() from exc
            self._fail_at(None, exc)
        if seen != self._nnz:
            raise InputError(f"{self._mtx}: the header (line {self._header_lines}) declares "
                             f"{self._nnz} entries but the file holds {seen}: it is truncated "
                             f"or damaged; re-create or re-download it")

    def _fail_at(self, entry: int | None, exc: Exception | None = None):
        """Raise an InputError naming the line of entry ``entry`` (0-based, blank lines not
        counted), or of the first malformed entry line when ``entry`` is None."""
        k, lineno = -1, 0
        try:
            with _open_file(self._mtx, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if lineno <= self._header_lines or not line.strip():
                        continue
                    k += 1
                    if entry is not None and k < entry:
                        continue
                    why = _entry_problem(line, *self._dims)
                    if why or entry is not None:
                        raise InputError(f"{self._mtx}, line {lineno}: "
                                         f"{why or 'malformed entry'}: "
                                         f"{line[:60].decode(errors='replace').rstrip()!r}")
        except _READ_ERRORS as err:
            raise InputError(f"{self._mtx}: cannot read past line {lineno} ({_why(err)}); "
                             f"re-create or re-download it") from err
        raise InputError(f"{self._mtx}: malformed MatrixMarket entries ({exc})") from exc

    def _rows(self, genes, cells, vals, c0: int, c1: int) -> sp.csr_matrix:
        counts = np.bincount(cells - c0, minlength=c1 - c0)
        ptr = np.zeros(c1 - c0 + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        return sp.csr_matrix((vals, genes, ptr), shape=(c1 - c0, self.n_features))

    def _grouped_by_cell(self, chunk_rows: int) -> bool:
        """One checking pass over the entries (cached): are they grouped by cell? If not, the
        matrix is loaded whole (sorting it on disk is not implemented)."""
        if getattr(self, "_grouped", None) is None:
            last, grouped = -1, True
            for _, cells, _ in self._entries(chunk_rows):  # to the end: checks every line
                if grouped and cells.size:
                    grouped = cells[0] >= last and not np.any(np.diff(cells) < 0)
                    last = int(cells[-1])
            self._grouped = grouped
        return self._grouped

    def _chunks(self, max_nnz: int):
        if not self._grouped_by_cell(max_nnz):
            yield from self._iter_unsorted(max_nnz)
            return
        pend_g, pend_c, pend_v = [], [], []
        next_cell = 0  # first cell not yet emitted
        last_seen = -1
        for genes, cells, vals in self._entries(max_nnz):
            if cells.size == 0:
                continue
            if np.any(np.diff(cells) < 0) or cells[0] < last_seen:
                raise InputError(f"{self._mtx}: entries changed order while being read")
            last_seen = int(cells[-1])
            pend_g.append(genes), pend_c.append(cells), pend_v.append(vals)
            g, c, v = (np.concatenate(x) for x in (pend_g, pend_c, pend_v))
            # the last cell may continue in the next block: keep it pending
            cut = int(np.searchsorted(c, last_seen, side="left"))
            if cut > 0:
                yield next_cell, self._rows(g[:cut], c[:cut], v[:cut], next_cell, last_seen)
                next_cell = last_seen
            pend_g, pend_c, pend_v = [g[cut:]], [c[cut:]], [v[cut:]]
        g, c, v = (np.concatenate(x) if x else np.zeros(0) for x in (pend_g, pend_c, pend_v))
        if next_cell < self.n_cells:
            yield next_cell, self._rows(g.astype(np.int64), c.astype(np.int64), v, next_cell,
                                        self.n_cells)

    def _iter_unsorted(self, max_nnz: int):
        m = getattr(self, "_whole", None)
        if m is None:  # kept for the converter's later passes
            warnings.warn(f"{self._mtx}: entries are not grouped by cell; loading the whole "
                          f"matrix into memory", stacklevel=4)
            parts = list(self._entries(max_nnz))
            g, c, v = (np.concatenate([p[i] for p in parts]) for i in range(3))
            m = self._whole = sp.csr_matrix((v, (c, g)), shape=(self.n_cells, self.n_features))
        cuts = _row_chunks(m.indptr.astype(np.int64), max_nnz)
        for a, b in zip(cuts[:-1], cuts[1:]):
            yield int(a), m[a:b]


# --------------------------------------------------------------------------- 10x .h5
def _strs(dataset) -> np.ndarray:
    return dataset[:].astype(str)


class TenxH5Reader(InputReader):
    """Cell Ranger ``filtered_feature_bc_matrix.h5``: v3+ (one ``matrix`` group, features
    tagged by ``features/genome``) or v2 (one group per genome, e.g. ``hg19`` and ``mm10``
    of a barnyard run, every group listing the same barcodes).

    ``genome``: genome names to read (a name or a sequence; None = all). v2 groups of several
    genomes become one matrix with their genes side by side (in file order); on v3 the
    features of other genomes are left out. Unknown names raise :class:`InputError` listing
    the file's genomes.
    """

    def __init__(self, path: Path, *, genome: str | Sequence[str] | None = None):
        import h5py

        self.path = Path(path)
        self.name = input_name(self.path)
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(f"{self.path}: cannot open as HDF5 ({exc})") from exc
        wanted = [genome] if isinstance(genome, str) else list(genome or [])
        try:
            self._open(wanted)
        except (KeyError, OSError) as exc:
            self._f.close()
            raise InputError(f"{self.path}: not a readable 10x .h5 ({_why(exc)})") from exc
        except BaseException:
            self._f.close()
            raise

    def _open(self, wanted: list[str]) -> None:
        import h5py

        f = self._f
        self._parts, self._indptrs = [], []  # (group, first column, width), its indptr
        self._col_map = None  # v3 genome selection: feature -> kept column, -1 = left out
        if "matrix" in f:
            g = f["matrix"]
            self._need(g, ("features/id", "features/name"))
            feats = g["features"]
            ids, symbols = _strs(feats["id"]), _strs(feats["name"])
            types = _strs(feats["feature_type"]) if "feature_type" in feats else None
            tags = _strs(feats["genome"]) if "genome" in feats else None
            self.genomes = list(dict.fromkeys(tags.tolist())) if tags is not None else []
            self._barcodes = self._load(g, len(ids), 0)
            if wanted:
                keep = np.isin(tags, self._pick(self.genomes, wanted))
                self._col_map = np.where(keep, np.cumsum(keep) - 1, -1)
                ids, symbols = ids[keep], symbols[keep]
                types = types[keep] if types is not None else None
            self.feature_types = types.astype(object) if types is not None else None
        else:
            self.genomes = [k for k, v in f.items()
                            if isinstance(v, h5py.Group) and "indptr" in v]
            if not self.genomes:
                raise InputError(f"{self.path}: not a 10x .h5 matrix: no 'matrix' group (Cell "
                                 f"Ranger v3+) and no genome group holding a matrix (v2); "
                                 f"top-level entries: {list(f.keys())[:10]}")
            ids, symbols = [], []
            for name in self._pick(self.genomes, wanted):
                g = f[name]
                self._need(g, ("genes", "gene_names"))
                ids.append(_strs(g["genes"]))
                symbols.append(_strs(g["gene_names"]))
                barcodes = self._load(g, len(ids[-1]), sum(map(len, ids[:-1])))
                if len(self._parts) > 1 and not np.array_equal(barcodes, self._barcodes):
                    raise InputError(f"{self.path}: genome groups {self._parts[0][0].name} and "
                                     f"{g.name} list different barcodes; read one at a time "
                                     f"with --genome (genomes: {', '.join(self.genomes)})")
                self._barcodes = barcodes
            ids, symbols = np.concatenate(ids), np.concatenate(symbols)
        self._set_features(ids, symbols)
        self._indptr = sum(self._indptrs[1:], self._indptrs[0])
        self.n_cells = len(self._barcodes)
        self._check_shape(self.n_cells, self.n_features)

    def _pick(self, available: list[str], wanted: list[str]) -> list[str]:
        unknown = [g for g in wanted if g not in available]
        if unknown:
            raise InputError(f"{self.path}: no genome {', '.join(map(repr, unknown))}; the "
                             f"file's genomes: {', '.join(available) or 'none recorded'}")
        return [g for g in available if g in wanted] if wanted else available

    def _need(self, g, keys) -> None:
        missing = [k for k in ("data", "indices", "indptr", "shape", "barcodes", *keys)
                   if k not in g]
        if missing:
            raise InputError(f"{self.path}: group {g.name} lacks {', '.join(missing)}; not a "
                             f"Cell Ranger matrix, or the file is damaged")

    def _load(self, g, n_features: int, first_column: int) -> np.ndarray:
        """Check one matrix group against its declared shape (features x barcodes, CSC) and
        add it as the columns from ``first_column``; returns its barcodes."""
        where = g.name + "/"
        shape = [int(v) for v in g["shape"][:]]
        if len(shape) != 2:
            raise InputError(f"{self.path}: {where}shape is {shape}, not (features, barcodes)")
        n_feat, n_cells = shape
        if n_feat != n_features:
            raise InputError(f"{self.path}: {where}shape declares {n_feat} features but the "
                             f"feature table lists {n_features}; the file is damaged")
        barcodes = _strs(g["barcodes"])
        if len(barcodes) != n_cells:
            raise InputError(f"{self.path}: {where}shape declares {n_cells} barcodes but "
                             f"{where}barcodes lists {len(barcodes)}; the file is damaged")
        n_values = g["data"].shape[0]
        if g["indices"].shape[0] != n_values:
            raise InputError(f"{self.path}: {where} stores {n_values} values but "
                             f"{g['indices'].shape[0]} indices; the file is damaged")
        indptr = g["indptr"][:].astype(np.int64)
        _check_indptr(self.path, where, indptr, n_cells, n_values)
        self._check_values(f"{where}data", g["data"].dtype)
        self._parts.append((g, first_column, n_feat))
        self._indptrs.append(indptr)
        return barcodes

    def obs(self) -> pd.DataFrame:
        return pd.DataFrame(index=pd.Index(self._barcodes, name=None))

    def _chunks(self, max_nnz: int):
        cuts = _row_chunks(self._indptr, max_nnz)
        n_all = len(self._col_map) if self._col_map is not None else self.n_features
        for a, b in zip(cuts[:-1], cuts[1:]):
            blocks = []
            for (g, first, width), ip in zip(self._parts, self._indptrs):
                s, e = int(ip[a]), int(ip[b])
                idx = g["indices"][s:e]
                # checked per group: an index past its genome would land in the next one's
                if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= width):
                    bad = int(idx[(idx < 0) | (idx >= width)][0])
                    raise InputError(f"{self.path}: {g.name}/indices: feature index {bad} in "
                                     f"cells {a}-{b - 1} is outside the {width} features; the "
                                     f"file is damaged")
                blocks.append(sp.csr_matrix((self._counts(g["data"][s:e], f"{g.name}/data"),
                                             idx + first, ip[a:b + 1] - s),
                                            shape=(int(b - a), n_all)))
            m = blocks[0] if len(blocks) == 1 else sum(blocks[1:], blocks[0])
            if self._col_map is not None:
                m = _take_columns(m, self._col_map, self.n_features)
            yield int(a), m

    def close(self) -> None:
        self._f.close()


def _take_columns(m: sp.csr_matrix, col_map: np.ndarray, n_out: int) -> sp.csr_matrix:
    """Columns of ``m`` renumbered by ``col_map`` (-1 leaves a column out)."""
    new = col_map[m.indices]
    keep = new >= 0
    ptr = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])[m.indptr]
    return sp.csr_matrix((m.data[keep], new[keep], ptr), shape=(m.shape[0], n_out))


def input_name(path) -> str:
    """An input's default dataset name: a folder's name, a file's name without its suffix."""
    p = Path(path)
    return p.name if p.is_dir() else p.stem


def open_input(path, *, layer: str | None = None, use_raw: bool = False,
               genome: str | Sequence[str] | None = None,
               chosen_by: str | None = None) -> InputReader:
    """Pick the reader by what ``path`` is: a folder (10x), ``.h5ad``, or a 10x ``.h5``.
    ``genome`` applies to 10x ``.h5`` files only (see :class:`TenxH5Reader`); ``chosen_by``
    names what chose an ``.h5ad``'s ``layer`` / ``use_raw`` in its messages (e.g. ``--counts
    a=raw``; default the global ``--layer`` / ``--raw``)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: input does not exist")
    if p.is_dir():
        return TenxDirReader(p)
    if p.suffix == ".h5ad":
        return H5adReader(p, layer=layer, use_raw=use_raw, chosen_by=chosen_by)
    if p.suffix in (".h5", ".hdf5"):
        return TenxH5Reader(p, genome=genome)
    raise InputError(f"{p}: unknown input type; expected an .h5ad file, a 10x .h5 file or a "
                     f"10x matrix folder (matrix.mtx + features/genes.tsv + barcodes.tsv)")
