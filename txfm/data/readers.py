"""Streaming readers for the converter's inputs: ``.h5ad``, 10x directories and 10x ``.h5``.

Every reader exposes the same small surface (:class:`InputReader`): the number of cells, the
feature table (Ensembl-style ids and/or symbols, feature types), ``obs`` as a DataFrame, and
``iter_chunks(max_nnz)`` yielding ``(first_row, csr)`` with at most about ``max_nnz`` stored
values per chunk (cells x features, ``scipy.sparse.csr_matrix``, indices not necessarily
sorted). Nothing holds the whole matrix in memory except two documented fallbacks: CSC
``.h5ad`` matrices and MatrixMarket files whose entries are not grouped by cell.
"""
from __future__ import annotations

import gzip
import re
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_SYMBOL_COLUMNS = ("symbol", "gene_symbol", "gene_symbols", "gene_name", "gene_names",
                   "feature_name", "name")
_ID_COLUMNS = ("gene_id", "gene_ids", "ensembl_id", "ensembl_gene_id", "feature_id", "id")


class InputError(ValueError):
    """An input cannot be read or is not what the converter expects; names the file."""


def looks_like_ensembl(values) -> bool:
    values = [str(v) for v in values[:2000]]
    return bool(values) and sum(bool(ENSEMBL_RE.match(v)) for v in values) >= 0.9 * len(values)


def strip_version(ids: np.ndarray) -> np.ndarray:
    """``ENSG00000141510.16`` -> ``ENSG00000141510`` (versions differ between annotations)."""
    return np.array([s.split(".", 1)[0] if ENSEMBL_RE.match(s) else s for s in ids], dtype=object)


def _read_lines(path: Path) -> list[list[str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def _find(folder: Path, *names: str) -> Path | None:
    for name in names:
        for cand in (folder / name, folder / (name + ".gz")):
            if cand.is_file():
                return cand
    return None


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
        raise NotImplementedError

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


# ---------------------------------------------------------------------------------- h5ad
class H5adReader(InputReader):
    """``X`` (or ``layers[layer]`` or ``raw/X``) of an ``.h5ad`` file, CSR/CSC/dense."""

    def __init__(self, path: Path, *, layer: str | None = None, use_raw: bool = False):
        import h5py

        self.path = Path(path)
        self.name = self.path.stem
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(f"{self.path}: cannot open as HDF5/.h5ad ({exc})") from exc
        f = self._f
        if use_raw and layer:
            raise InputError(f"{self.path}: give either --layer or --raw, not both")
        if use_raw:
            if "raw" not in f:
                raise InputError(f"{self.path}: --raw given but the file has no .raw")
            x_key, var_key = "raw/X", "raw/var"
        elif layer:
            if "layers" not in f or layer not in f["layers"]:
                have = list(f["layers"].keys()) if "layers" in f else []
                raise InputError(f"{self.path}: no layer {layer!r} (layers: {have})")
            x_key, var_key = f"layers/{layer}", "var"
        else:
            x_key, var_key = "X", "var"
        if x_key not in f:
            raise InputError(f"{self.path}: no {x_key} matrix (is this an AnnData .h5ad file?)")
        import anndata as ad

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            var = ad.io.read_elem(f[var_key])
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
        self._x = f[x_key]
        enc = self._x.attrs.get("encoding-type", self._x.attrs.get("h5sparse_format", "array"))
        enc = enc.decode() if isinstance(enc, bytes) else str(enc)
        if enc in ("csr_matrix", "csr"):
            self._fmt = "csr"
            shape = tuple(int(v) for v in self._x.attrs["shape"])
            self._indptr = self._x["indptr"][:].astype(np.int64)
        elif enc in ("csc_matrix", "csc"):
            self._fmt = "csc"
            shape = tuple(int(v) for v in self._x.attrs["shape"])
        else:
            if not hasattr(self._x, "shape") or len(self._x.shape) != 2:
                raise InputError(f"{self.path}: {x_key} is neither a sparse matrix nor a 2-D array")
            self._fmt = "dense"
            shape = self._x.shape
        self.n_cells = shape[0]
        self._check_shape(*shape)
        self._shape = shape

    def obs(self) -> pd.DataFrame:
        import anndata as ad

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ad.io.read_elem(self._f["obs"])

    def iter_chunks(self, max_nnz: int):
        if self._fmt == "csr":
            cuts = _row_chunks(self._indptr, max_nnz)
            data, indices = self._x["data"], self._x["indices"]
            for a, b in zip(cuts[:-1], cuts[1:]):
                s, e = int(self._indptr[a]), int(self._indptr[b])
                ptr = self._indptr[a:b + 1] - s
                yield int(a), sp.csr_matrix((data[s:e], indices[s:e], ptr),
                                            shape=(int(b - a), self._shape[1]))
        elif self._fmt == "csc":
            warnings.warn(f"{self.path}: X is CSC; it is loaded whole into memory to be read by "
                          f"rows (write it as CSR to convert in bounded memory)", stacklevel=2)
            g = self._x
            m = sp.csc_matrix((g["data"][:], g["indices"][:], g["indptr"][:]),
                              shape=self._shape).tocsr()
            cuts = _row_chunks(m.indptr.astype(np.int64), max_nnz)
            for a, b in zip(cuts[:-1], cuts[1:]):
                yield int(a), m[a:b]
        else:
            rows = max(1, int(max_nnz // max(self._shape[1], 1)))
            for a in range(0, self._shape[0], rows):
                yield a, sp.csr_matrix(self._x[a:a + rows])

    def close(self) -> None:
        self._f.close()


# ------------------------------------------------------------------------ 10x directory
class TenxDirReader(InputReader):
    """A Cell Ranger matrix folder: ``matrix.mtx(.gz)`` + ``features``/``genes.tsv(.gz)`` +
    ``barcodes.tsv(.gz)``. Entries are streamed when grouped by cell (as Cell Ranger writes)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name
        self._mtx = _find(self.path, "matrix.mtx")
        feats = _find(self.path, "features.tsv", "genes.tsv")
        bars = _find(self.path, "barcodes.tsv")
        missing = [n for n, p in (("matrix.mtx[.gz]", self._mtx),
                                  ("features.tsv[.gz] or genes.tsv[.gz]", feats),
                                  ("barcodes.tsv[.gz]", bars)) if p is None]
        if missing:
            raise InputError(f"{self.path}: not a 10x matrix folder, missing {', '.join(missing)}")
        rows = _read_lines(feats)
        first = np.array([r[0] for r in rows], dtype=object)
        if len(rows[0]) >= 2:
            self._set_features(first, [r[1] for r in rows])
            if len(rows[0]) >= 3:
                self.feature_types = np.array([r[2] for r in rows], dtype=object)
        elif looks_like_ensembl(first):
            self._set_features(first, None)
        else:
            self._set_features(None, first)
        self._barcodes = np.array([r[0] for r in _read_lines(bars)], dtype=object)
        self.n_cells = len(self._barcodes)
        opener = gzip.open if self._mtx.suffix == ".gz" else open
        self._header_lines = 0
        try:
            with opener(self._mtx, "rt") as f:
                head = f.readline()
                self._header_lines = 1
                if not head.startswith("%%MatrixMarket matrix coordinate"):
                    raise InputError(f"{self._mtx}: not a MatrixMarket coordinate file")
                self._field = head.split()[3] if len(head.split()) > 3 else "real"
                line = f.readline()
                self._header_lines += 1
                while line.startswith("%"):
                    line = f.readline()
                    self._header_lines += 1
                n_rows, n_cols, self._nnz = (int(v) for v in line.split()[:3])
        except (OSError, EOFError, ValueError, IndexError) as exc:
            raise InputError(f"{self._mtx}: cannot read MatrixMarket header ({exc})") from exc
        if self._field not in ("integer", "real", "double"):
            raise InputError(f"{self._mtx}: MatrixMarket field {self._field!r} not supported "
                             f"(integer or real expected)")
        # Cell Ranger writes features x cells; accept the transpose too.
        if (n_rows, n_cols) == (self.n_features, self.n_cells):
            self._cells_axis = 1
        elif (n_rows, n_cols) == (self.n_cells, self.n_features):
            self._cells_axis = 0
        else:
            raise InputError(f"{self._mtx}: matrix is {n_rows} x {n_cols} but there are "
                             f"{self.n_features} features and {self.n_cells} barcodes")
        self._check_shape(self.n_cells, self.n_features)

    def obs(self) -> pd.DataFrame:
        return pd.DataFrame(index=pd.Index(self._barcodes.astype(str), name=None))

    def _entries(self, chunk_rows: int):
        dtype = {0: np.int64, 1: np.int64, 2: np.float64}
        try:
            reader = pd.read_csv(self._mtx, sep=r"\s+", header=None, skiprows=self._header_lines,
                                 dtype=dtype, chunksize=chunk_rows, engine="c")
            for df in reader:
                a = df.to_numpy(copy=False)
                gene_col, cell_col = (0, 1) if self._cells_axis == 1 else (1, 0)
                genes = a[:, gene_col].astype(np.int64) - 1
                yield genes, a[:, cell_col].astype(np.int64) - 1, a[:, 2]
        except (ValueError, pd.errors.ParserError, OSError, EOFError) as exc:
            raise InputError(f"{self._mtx}: malformed MatrixMarket entries ({exc})") from exc

    def _rows(self, genes, cells, vals, c0: int, c1: int) -> sp.csr_matrix:
        counts = np.bincount(cells - c0, minlength=c1 - c0)
        ptr = np.zeros(c1 - c0 + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        return sp.csr_matrix((vals, genes, ptr), shape=(c1 - c0, self.n_features))

    def _grouped_by_cell(self, chunk_rows: int) -> bool:
        """One pass over the cell column (cached): are entries grouped by cell? If not, the
        matrix is loaded whole (sorting it on disk is not implemented)."""
        if getattr(self, "_grouped", None) is None:
            last = -1
            self._grouped = True
            col = 1 if self._cells_axis == 1 else 0
            for df in pd.read_csv(self._mtx, sep=r"\s+", header=None, usecols=[col],
                                  skiprows=self._header_lines, dtype=np.int64,
                                  chunksize=chunk_rows, engine="c"):
                c = df.to_numpy().ravel()
                if c.size and (c[0] < last or np.any(np.diff(c) < 0)):
                    self._grouped = False
                    break
                last = int(c[-1]) if c.size else last
        return self._grouped

    def iter_chunks(self, max_nnz: int):
        if not self._grouped_by_cell(max_nnz):
            yield from self._iter_unsorted(max_nnz)
            return
        pend_g, pend_c, pend_v = [], [], []
        next_cell = 0  # first cell not yet emitted
        last_seen = -1
        for genes, cells, vals in self._entries(max_nnz):
            if cells.size == 0:
                continue
            if (cells.min() < 0 or cells.max() >= self.n_cells or genes.min() < 0
                    or genes.max() >= self.n_features):
                raise InputError(f"{self._mtx}: entry outside the declared matrix shape")
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
                          f"matrix into memory", stacklevel=3)
            parts = list(self._entries(max_nnz))
            g, c, v = (np.concatenate([p[i] for p in parts]) for i in range(3))
            m = self._whole = sp.csr_matrix((v, (c, g)), shape=(self.n_cells, self.n_features))
        cuts = _row_chunks(m.indptr.astype(np.int64), max_nnz)
        for a, b in zip(cuts[:-1], cuts[1:]):
            yield int(a), m[a:b]


# --------------------------------------------------------------------------- 10x .h5
class TenxH5Reader(InputReader):
    """Cell Ranger ``filtered_feature_bc_matrix.h5`` (v3 ``matrix`` group, or v2 per-genome)."""

    def __init__(self, path: Path):
        import h5py

        self.path = Path(path)
        self.name = self.path.stem
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(f"{self.path}: cannot open as HDF5 ({exc})") from exc
        f = self._f
        if "matrix" in f:
            g = f["matrix"]
            feats = g["features"]
            ids = feats["id"][:].astype(str)
            symbols = feats["name"][:].astype(str)
            self.feature_types = (feats["feature_type"][:].astype(str).astype(object)
                                  if "feature_type" in feats else None)
        else:
            groups = [k for k in f.keys() if "indptr" in f[k]]
            if len(groups) != 1:
                raise InputError(f"{self.path}: not a 10x .h5 matrix (no 'matrix' group and "
                                 f"{len(groups)} genome groups)")
            g = f[groups[0]]
            ids = g["genes"][:].astype(str)
            symbols = g["gene_names"][:].astype(str)
        self._set_features(ids, symbols)
        self._g = g
        n_feat, n_cells = (int(v) for v in g["shape"][:])
        self._indptr = g["indptr"][:].astype(np.int64)
        self.n_cells = n_cells
        self._barcodes = g["barcodes"][:].astype(str)
        self._check_shape(n_cells, n_feat)

    def obs(self) -> pd.DataFrame:
        return pd.DataFrame(index=pd.Index(self._barcodes, name=None))

    def iter_chunks(self, max_nnz: int):
        cuts = _row_chunks(self._indptr, max_nnz)
        data, indices = self._g["data"], self._g["indices"]
        for a, b in zip(cuts[:-1], cuts[1:]):
            s, e = int(self._indptr[a]), int(self._indptr[b])
            yield int(a), sp.csr_matrix((data[s:e], indices[s:e], self._indptr[a:b + 1] - s),
                                        shape=(int(b - a), self.n_features))

    def close(self) -> None:
        self._f.close()


def open_input(path, *, layer: str | None = None, use_raw: bool = False) -> InputReader:
    """Pick the reader by what ``path`` is: a folder (10x), ``.h5ad``, or a 10x ``.h5``."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: input does not exist")
    if p.is_dir():
        return TenxDirReader(p)
    if p.suffix == ".h5ad":
        return H5adReader(p, layer=layer, use_raw=use_raw)
    if p.suffix in (".h5", ".hdf5"):
        return TenxH5Reader(p)
    raise InputError(f"{p}: unknown input type; expected an .h5ad file, a 10x .h5 file or a "
                     f"10x matrix folder (matrix.mtx + features/genes.tsv + barcodes.tsv)")
