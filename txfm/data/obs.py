"""``obs`` of the converted corpus: the inputs' cell annotations, unified across datasets.

Every shard's ``obs`` has the same columns with the same categories, so that a loader can
concatenate them without re-coding: ``dataset`` (categorical over the dataset names) and
``source_row`` (row in its input) are added by the converter; every input column follows.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .readers import InputError

RESERVED = ("dataset", "source_row")


class ObsTables:
    """Per-dataset ``obs`` columns unified across datasets, looked up by (dataset, row).

    Numeric columns stay numeric (int64 when every dataset has them as integers, else
    float64 with NaN for datasets without them); everything else becomes a categorical with
    one sorted category list shared by all shards (missing = code -1). Input columns named
    like the ones the converter adds (``dataset``, ``source_row``) get an ``_input`` suffix.
    """

    def __init__(self, frames: list[pd.DataFrame], names: list[str], n_cells: list[int]):
        self.names = names
        self.n_datasets = len(frames)
        for f, n, name in zip(frames, n_cells, names):
            if len(f) != n:
                raise InputError(f"dataset {name}: obs has {len(f)} rows for {n} cells")
        renamed = [f.rename(columns={c: f"{c}_input" for c in RESERVED if c in f.columns})
                   for f in frames]
        self.obs_names = [np.asarray(f.index.astype(str), dtype=object) for f in renamed]
        cols: list[str] = []
        for f in renamed:
            cols += [str(c) for c in f.columns if str(c) not in cols]
        self.columns = cols
        self.kind: dict[str, str] = {}
        self.values: dict[str, list] = {}
        self.categories: dict[str, list] = {}
        for c in cols:
            present = [c in f.columns for f in renamed]
            numeric = all(pd.api.types.is_numeric_dtype(f[c])
                          and not pd.api.types.is_bool_dtype(f[c])
                          for f in renamed if c in f.columns)
            if numeric:
                as_int = all(present) and all(pd.api.types.is_integer_dtype(f[c]) for f in renamed)
                dtype = np.int64 if as_int else np.float64
                self.kind[c] = "numeric"
                self.values[c] = [f[c].to_numpy(dtype=dtype) if c in f.columns
                                  else np.full(len(f), np.nan) for f in renamed]
            else:
                strs = [pd.Series(np.where(f[c].notna(), f[c].astype(str), None), dtype=object)
                        if c in f.columns else pd.Series([None] * len(f), dtype=object)
                        for f in renamed]
                cats = sorted({v for s in strs for v in pd.unique(s.dropna())})
                self.kind[c] = "categorical"
                self.categories[c] = cats
                self.values[c] = [pd.Categorical(s, categories=cats).codes.astype(np.int32)
                                  for s in strs]

    def frame(self, ds: np.ndarray, rows: np.ndarray) -> pd.DataFrame:
        cols = {"dataset": pd.Categorical.from_codes(ds.astype(np.int32), categories=self.names),
                "source_row": rows.astype(np.int64)}
        for c in self.columns:
            out = None
            for d in range(self.n_datasets):
                sel = ds == d
                if not sel.any():
                    continue
                v = self.values[c][d][rows[sel]]
                if out is None:
                    out = np.empty(ds.size, dtype=v.dtype if self.kind[c] == "categorical"
                                   else np.result_type(*[x.dtype for x in self.values[c]]))
                out[sel] = v
            if self.kind[c] == "categorical":
                cols[c] = pd.Categorical.from_codes(out, categories=self.categories[c])
            else:
                cols[c] = out
        index = np.empty(ds.size, dtype=object)
        for d in range(self.n_datasets):
            sel = ds == d
            if sel.any():
                index[sel] = self.names[d] + ":" + self.obs_names[d][rows[sel]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pd.DataFrame(cols, index=pd.Index(index.astype(str), name=None))
