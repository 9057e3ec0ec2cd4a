"""``obs`` of the converted corpus: the inputs' cell annotations, unified across datasets.

Every shard's ``obs`` has the same columns with the same dtypes (and categories), so that a
loader can concatenate them without re-coding: ``dataset`` (categorical over the dataset
names) and ``source_row`` (row in its input) are added by the converter; every input column
follows, its values and missing values kept. How a column is stored, given its dtype in the
datasets that have it (a dataset without the column gives missing values):

* categorical: the same categories in the same order when every dataset has the same
  ones (``ordered`` kept); else unordered, the sorted union. Ordered categoricals whose
  categories differ between datasets are an error (no order would be right).
* integer: numpy ints stay numpy ints (common type; int64 beside uint64 is int64 when the
  values fit, else an error); pandas nullable ``Int*``/``UInt*`` stay nullable with
  ``<NA>``, and so do numpy ints missing from some dataset (never float64, which would round
  ids beyond 2^53).
* float: numpy floats (common type), NaN for missing. pandas nullable ``Float*`` become
  numpy floats, ``<NA>`` -> NaN: anndata cannot store nullable floats.
* boolean: numpy ``bool``; pandas ``boolean`` (with ``<NA>``) when nullable or missing
  from some dataset.
* anything else (strings, ``string`` dtype, objects, mixed kinds across datasets): a
  categorical of the values as text, sorted categories, missing = NaN (what anndata's own
  ``write_h5ad`` does with strings).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .readers import InputError

RESERVED = ("dataset", "source_row")


def _family(dtype) -> str:
    if isinstance(dtype, pd.CategoricalDtype):
        return "category"
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int"
    if pd.api.types.is_float_dtype(dtype):
        return "float"
    return "text"


def _nullable(dtype) -> bool:
    return isinstance(dtype, pd.api.extensions.ExtensionDtype)


def _concat(arrays: list) -> pd.api.extensions.ExtensionArray:
    return pd.concat([pd.Series(a) for a in arrays], ignore_index=True).array


def _as_text(parts: list[pd.Series | None], lens: list[int]) -> pd.Categorical:
    strs = [pd.Series(np.where(s.notna(), s.astype(str), None), dtype=object)
            if s is not None else pd.Series([None] * n, dtype=object)
            for s, n in zip(parts, lens)]
    cats = sorted({v for s in strs for v in pd.unique(s.dropna())})
    return pd.Categorical(pd.concat(strs, ignore_index=True), categories=cats)


def _common_int(dtypes: list[np.dtype], present: list[pd.Series]) -> np.dtype:
    """The integer dtype that holds every input's values: numpy's common type, except that
    int64 beside uint64 (which numpy makes float64) is int64 when the unsigned values fit."""
    dt = np.result_type(*dtypes)
    if dt.kind in "iu":
        return dt
    top = max(int(s.max()) for s, d in zip(present, dtypes) if d.kind == "u" and s.notna().any())
    if top > np.iinfo(np.int64).max:
        raise ValueError(f"integers up to {top} (uint64) beside signed ones: no integer dtype "
                         f"holds both; store the column as strings in one of the inputs")
    return np.dtype(np.int64)


def _unify(parts: list[pd.Series | None], lens: list[int]):
    """One array over all datasets' rows (dataset order) holding column ``parts``."""
    present = [s for s in parts if s is not None]
    everywhere = len(present) == len(parts)
    families = {_family(s.dtype) for s in present}
    if families == {"category"}:
        cats = [s.cat.categories for s in present]
        ordered = {s.cat.ordered for s in present}
        if all(c.equals(cats[0]) for c in cats) and len(ordered) == 1:
            dtype = pd.CategoricalDtype(cats[0], ordered=ordered.pop())
        elif True in ordered:
            raise ValueError("ordered categoricals whose categories differ between inputs "
                             f"({[c.tolist()[:5] for c in cats]}); give every input the same "
                             f"categories in the same order")
        else:
            try:
                dtype = pd.CategoricalDtype(cats[0].append(cats[1:]).unique().sort_values())
            except TypeError:  # categories of different kinds (numbers and text)
                return _as_text(parts, lens)
        codes = [pd.Categorical(s, dtype=dtype).codes if s is not None
                 else np.full(n, -1, np.int8) for s, n in zip(parts, lens)]
        return pd.Categorical.from_codes(np.concatenate(codes), dtype=dtype)
    if families == {"bool"}:
        if everywhere and not any(_nullable(s.dtype) for s in present):
            return np.concatenate([s.to_numpy(dtype=bool) for s in present])
        return _concat([pd.array(s, dtype="boolean") if s is not None
                        else pd.array([pd.NA] * n, dtype="boolean") for s, n in zip(parts, lens)])
    if families <= {"int", "float"}:
        nullable = any(_nullable(s.dtype) for s in present)
        dtypes = [s.dtype.numpy_dtype if _nullable(s.dtype) else s.dtype for s in present]
        if "float" in families:
            dt = np.result_type(*dtypes)
            return np.concatenate([s.to_numpy(dtype=dt, na_value=np.nan) if s is not None
                                   else np.full(n, np.nan, dt) for s, n in zip(parts, lens)])
        dt = _common_int(dtypes, present)
        # integers missing from some input: nullable ints with <NA>, never float64 + NaN,
        # which rounds ids beyond 2^53
        nullable = nullable or not everywhere
        if not nullable:
            return np.concatenate([s.to_numpy(dtype=dt) for s in present])
        name = ("UInt" if dt.kind == "u" else "Int") + str(dt.itemsize * 8)
        return _concat([pd.array(s, dtype=name) if s is not None
                        else pd.array([pd.NA] * n, dtype=name) for s, n in zip(parts, lens)])
    return _as_text(parts, lens)


def _input_columns(frames: list[pd.DataFrame], paths: list[str]) -> list[pd.DataFrame]:
    """``frames`` with string column names, the reserved ones (:data:`RESERVED`) renamed to
    ``<name>_input`` (``_input_2``, ... when that name is taken too). The new names are chosen
    once, from every frame's columns, so that one output column never holds one input's
    ``dataset`` and another input's ``dataset_input``.

    Raises:
        InputError: two columns of one input whose names are equal as strings (``1``, ``"1"``).
    """
    names = []
    for frame, path in zip(frames, paths):
        cols = pd.Index([str(c) for c in frame.columns])
        if cols.has_duplicates:
            dup = cols[cols.duplicated()][0]
            raise InputError(f"{path}: obs has two columns named {dup!r} (as strings); rename "
                             f"one (adata.obs.rename(columns=...)) and convert again")
        names.append(list(cols))
    taken = {c for cols in names for c in cols}
    rename = {}
    for c in RESERVED:
        if any(c in cols for cols in names):
            new, n = f"{c}_input", 2
            while new in taken:
                new, n = f"{c}_input_{n}", n + 1
            taken.add(new)
            rename[c] = new
    out = []
    for frame, cols in zip(frames, names):
        f = frame.copy(deep=False)
        f.columns = [rename.get(c, c) for c in cols]
        out.append(f)
    return out


class ObsTables:
    """Per-dataset ``obs`` columns unified across datasets (see the module docstring), looked
    up by (dataset, row). Input columns named like the ones the converter adds (``dataset``,
    ``source_row``) get an ``_input`` suffix (``_input_2``, ... if that name is taken too);
    column names become strings, and two that are equal as strings are refused.

    ``frames``: each dataset's ``obs`` (rows = its cells); ``names``: dataset names;
    ``n_cells``: rows expected per dataset; ``paths``: each dataset's input file, named in
    errors (:class:`InputError`, naming the file and column).
    """

    def __init__(self, frames: list[pd.DataFrame], names: list[str], n_cells: list[int],
                 paths: list | None = None):
        self.names = names
        self.n_datasets = len(frames)
        paths = [str(p) for p in paths] if paths is not None else [f"dataset {n}" for n in names]
        for f, n, path in zip(frames, n_cells, paths):
            if len(f) != n:
                raise InputError(f"{path}: obs has {len(f)} rows for {n} cells")
        renamed = _input_columns(frames, paths)
        self.obs_names = [np.asarray(f.index.astype(str), dtype=object) for f in renamed]
        for names_d, path in zip(self.obs_names, paths):
            dup = pd.Index(names_d).duplicated()
            if dup.any():
                # kept as they are (source_row tells the cells apart), but said now rather than
                # by anndata when the shards are read
                warnings.warn(f"{path}: {int(dup.sum()):,} cell names repeat an earlier one "
                              f"(e.g. {names_d[np.flatnonzero(dup)[0]]!r}); the shards keep "
                              f"them, and their source_row column tells the cells apart. Make "
                              f"them unique first (AnnData.obs_names_make_unique()) to join "
                              f"the shards back to the input by name", UserWarning,
                              stacklevel=2)
        self.offsets = np.concatenate([[0], np.cumsum(n_cells)]).astype(np.int64)
        cols: list[str] = []
        for f in renamed:
            cols += [c for c in f.columns if c not in cols]
        self.columns = cols
        self.data: dict = {}  # column -> array over all datasets' rows, in dataset order
        for c in cols:
            parts = [f[c] if c in f.columns else None for f in renamed]
            try:
                self.data[c] = _unify(parts, [len(f) for f in renamed])
            except (TypeError, ValueError) as exc:
                have = ", ".join(f"{p} ({s.dtype})" for p, s in zip(paths, parts) if s is not None)
                raise InputError(f"{have}: obs column {c!r} cannot be stored: {exc}") from exc

    def frame(self, ds: np.ndarray, rows: np.ndarray) -> pd.DataFrame:
        """``obs`` of the cells (dataset ``ds[i]``, row ``rows[i]``), in that order."""
        idx = self.offsets[ds] + rows
        cols = {"dataset": pd.Categorical.from_codes(ds.astype(np.int32), categories=self.names),
                "source_row": rows.astype(np.int64)}
        for c in self.columns:
            cols[c] = self.data[c][idx]
        index = np.empty(ds.size, dtype=object)
        for d in range(self.n_datasets):
            sel = ds == d
            if sel.any():
                index[sel] = self.names[d] + ":" + self.obs_names[d][rows[sel]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pd.DataFrame(cols, index=pd.Index(index.astype(str), name=None))
