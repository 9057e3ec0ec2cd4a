"""Match gene identifiers across files: Ensembl ids, symbols, and a gene table between them.

Annotation databases name genes by symbol; a checkpoint's vocabulary, an AnnData's
``var_names`` or a 10x ``features.tsv`` may use Ensembl ids, symbols, or both. A *gene table*
(e.g. ``shared/data/gene_tables/genes_grch38_sceptre.tsv``: ``ensembl_gene_id``,
``gene_symbol``) translates between them.

Rules (the same everywhere in :mod:`txfm.eval`):

* Ensembl ids are compared without their version suffix (``ENSG00000141510.17`` ==
  ``ENSG00000141510``); symbols exactly, then, for what is still unmatched, upper-cased.
* A name that occurs more than once on the target side maps to its first occurrence.
* :func:`match_genes` tries every way of matching it can (directly; with a table, query
  Ensembl -> symbol and query symbol -> Ensembl). Each gene takes the best route that maps it
  (routes ranked by how many genes they match), so inputs whose names mix Ensembl ids and
  symbols map whole; a later route never remaps a gene or reaches a target an earlier one
  reached. The report names each route used and how many genes it mapped.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Sequence

import numpy as np
import pandas as pd

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def is_ensembl(names: Sequence[str]) -> np.ndarray:
    """``[n]`` bool: which names look like Ensembl gene ids (``ENSG…``, ``ENSMUSG…``)."""
    return np.fromiter((bool(_ENSEMBL.match(str(n))) for n in names), dtype=bool,
                       count=len(names))


def normalise_ids(names: Sequence[str]) -> np.ndarray:
    """Strip Ensembl version suffixes; leave symbols as they are. Returns an object array."""
    out = np.asarray([str(n) for n in names], dtype=object)
    ens = is_ensembl(out)
    if ens.any():
        out[ens] = [n.split(".", 1)[0] for n in out[ens]]
    return out


# how messages that both the CLI and the Python API raise name the gene table
GENE_TABLE = "a gene table (--gene-table; gene_table= in Python)"


@dataclasses.dataclass(frozen=True)
class GeneTable:
    """Ensembl id <-> symbol translation, read from a TSV/CSV gene table."""

    ensembl: np.ndarray  # [n] object, without version
    symbol: np.ndarray  # [n] object

    @classmethod
    def read(cls, path: str | pathlib.Path) -> "GeneTable":
        """Read a table with an Ensembl-id column and a symbol column.

        Columns are found by name (one containing ``ensembl`` or ``gene_id``, one containing
        ``symbol`` or ``name``); a headerless two-column file is read as (ensembl, symbol).

        Raises:
            FileNotFoundError: no such file, or a folder. ValueError: no id and symbol columns.
        """
        path = pathlib.Path(path)
        if path.is_dir():
            raise FileNotFoundError(f"gene table {path}: is a folder; give the table file "
                                    "(e.g. shared/data/gene_tables/genes_grch38_sceptre.tsv)")
        if not path.is_file():
            raise FileNotFoundError(f"gene table {path}: no such file (expected a TSV/CSV with "
                                    "Ensembl id and gene symbol columns, e.g. "
                                    "shared/data/gene_tables/genes_grch38_sceptre.tsv)")
        sep = "," if path.suffix.lower() == ".csv" else "\t"
        df = pd.read_csv(path, sep=sep, dtype=str)
        cols = [c.lower() for c in df.columns]
        ens_col = next((c for c, lc in zip(df.columns, cols) if "ensembl" in lc or "gene_id" in lc),
                       None)
        sym_col = next((c for c, lc in zip(df.columns, cols) if "symbol" in lc or "name" in lc),
                       None)
        if ens_col is None or sym_col is None:
            first = df.columns[0]
            if len(df.columns) >= 2 and _ENSEMBL.match(str(first)):
                df = pd.read_csv(path, sep=sep, dtype=str, header=None)
                ens_col, sym_col = df.columns[0], df.columns[1]
            else:
                raise ValueError(f"gene table {path}: cannot find an Ensembl-id column and a "
                                 f"symbol column among {list(df.columns)}; name them e.g. "
                                 "'ensembl_gene_id' and 'gene_symbol'")
        df = df[[ens_col, sym_col]].dropna()
        return cls(normalise_ids(df[ens_col].to_numpy()), df[sym_col].to_numpy(dtype=object))

    def __len__(self) -> int:
        return len(self.ensembl)

    def ensembl_to_symbol(self, ids: Sequence[str]) -> np.ndarray:
        """Symbols of ``ids`` (object array; None where the table has no entry)."""
        lut = pd.Series(self.symbol, index=self.ensembl)
        lut = lut[~lut.index.duplicated()]
        out = lut.reindex(normalise_ids(ids)).to_numpy(dtype=object)
        out[pd.isna(out)] = None
        return out

    def symbol_to_ensembl(self, symbols: Sequence[str]) -> np.ndarray:
        """Ensembl ids of ``symbols`` (first table row of a symbol, exact match first, then
        upper-cased; None where absent)."""
        lut = pd.Series(self.ensembl, index=self.symbol)
        lut = lut[~lut.index.duplicated()]
        query = pd.Index([str(s) for s in symbols])
        out = lut.reindex(query).to_numpy(dtype=object)
        missing = pd.isna(out)
        if missing.any():
            upper = pd.Series(lut.to_numpy(), index=[str(s).upper() for s in lut.index])
            upper = upper[~upper.index.duplicated()]
            out[missing] = upper.reindex(query[missing].str.upper()).to_numpy(dtype=object)
        out[pd.isna(out)] = None
        return out


def _lookup(query: np.ndarray, target: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Index of each query name in ``target`` (first occurrence) or -1, exact, then ignoring
    case; and which matched only ignoring case (``[n]`` bool)."""
    target = normalise_ids(target)
    pos = pd.Series(np.arange(len(target)), index=target)
    pos = pos[~pos.index.duplicated()]
    q = pd.Index([("" if v is None else str(v)) for v in query])
    idx = pos.reindex(q).to_numpy()
    missing = np.isnan(idx)
    if missing.any():
        upper = pd.Series(pos.to_numpy(), index=[str(t).upper() for t in pos.index])
        upper = upper[~upper.index.duplicated()]
        idx[missing] = upper.reindex(q[missing].str.upper()).to_numpy()
    out = np.where(np.isnan(idx), -1, idx).astype(np.int64)
    blank = np.array([v is None or v == "" for v in query], dtype=bool)
    out[blank] = -1
    return out, missing & (out >= 0)


@dataclasses.dataclass(frozen=True)
class GeneMatch:
    """Result of :func:`match_genes`: ``index[i]`` = target position of query gene i, or -1."""

    index: np.ndarray  # [n_query] int64
    how: str
    n_case: int = 0  # of the mapped, how many only ignoring upper/lower case (from case)
    case: np.ndarray | None = None  # [n_query] bool: matched only ignoring case (None: unknown)

    def __post_init__(self):
        if self.case is not None:
            object.__setattr__(self, "n_case", int(self.case.sum()))

    @property
    def n_mapped(self) -> int:
        return int((self.index >= 0).sum())

    @property
    def n_targets(self) -> int:
        """Distinct target genes reached (below ``n_mapped`` when query genes collide)."""
        return len(np.unique(self.index[self.index >= 0]))

    def collisions(self) -> np.ndarray:
        """Positions of query genes that share their target with another query gene."""
        mapped = self.index >= 0
        _, inverse, counts = np.unique(self.index[mapped], return_inverse=True,
                                       return_counts=True)
        return np.flatnonzero(mapped)[counts[inverse] > 1]

    def summary(self, n_target: int | None = None) -> str:
        n = len(self.index)
        s = f"{self.n_mapped:,} of {n:,} genes mapped ({100.0 * self.n_mapped / max(n, 1):.1f}%, " \
            f"{self.how}{f'; {self.n_case:,} only ignoring case' if self.n_case else ''})"
        if n_target is not None:
            s += f" onto {self.n_targets:,} of {n_target:,}"
        return s

    def better_than(self, other: "GeneMatch | None") -> bool:
        """More distinct targets (genes summed together count once), then more genes mapped,
        then fewer matched only ignoring case."""
        return other is None or self._rank() > other._rank()

    def _rank(self) -> tuple[int, int, int]:
        return self.n_targets, self.n_mapped, -self.n_case


def match_genes(query: Sequence[str] | Sequence[Sequence[str]], target: Sequence[str],
                table: GeneTable | None = None, *,
                query_names: Sequence[str] | None = None) -> GeneMatch:
    """Map query genes onto ``target`` names: each gene by the best route that maps it
    (:func:`combine_routes` of :func:`match_routes`).

    Args:
        query: one sequence of names, or several alternative sequences for the same genes
            (e.g. an AnnData's ``var_names`` and its ``var["symbol"]``), each tried.
        target: names to map onto (e.g. a model vocabulary or an annotation's symbols).
        table: optional Ensembl <-> symbol table, tried in both directions.
        query_names: labels for the alternatives in ``query`` (for the report).
    Raises:
        ValueError: an empty ``query``.
    """
    return combine_routes(match_routes(query, target, table, query_names=query_names))


def match_routes(query: Sequence[str] | Sequence[Sequence[str]], target: Sequence[str],
                 table: GeneTable | None = None, *,
                 query_names: Sequence[str] | None = None) -> list[GeneMatch]:
    """One :class:`GeneMatch` per route of :func:`match_genes` (each alternative of ``query``
    as given and, with a ``table``, translated in both directions), in the order tried."""
    if len(query) and isinstance(query[0], str):
        alternatives = [query]
    else:
        alternatives = list(query)
    names = list(query_names) if query_names is not None else \
        [f"names[{i}]" for i in range(len(alternatives))]
    out = []
    for name, alt in zip(names, alternatives):
        alt = normalise_ids(alt)
        routes = [(f"{name} as given", alt)]
        if table is not None:
            routes.append((f"{name} Ensembl->symbol via gene table", table.ensembl_to_symbol(alt)))
            routes.append((f"{name} symbol->Ensembl via gene table", table.symbol_to_ensembl(alt)))
        for how, q in routes:
            index, case = _lookup(np.asarray(q, dtype=object), target)
            out.append(GeneMatch(index, how, case=case))
    return out


def combine_routes(routes: Sequence[GeneMatch]) -> GeneMatch:
    """Each gene mapped by the best route that maps it.

    Routes are ranked by :meth:`GeneMatch.better_than`. The best one's mapping is kept whole;
    each next route only fills genes still unmapped, and only onto targets no route before it
    reached (so a fill never sums two input genes into one target). ``how`` names the best
    route alone when no other added a gene, else every contributing route with its count.

    Raises:
        ValueError: no route (an empty query).
    """
    if not routes:
        raise ValueError("match_genes: empty query")
    ranked = sorted(routes, key=GeneMatch._rank, reverse=True)
    best = ranked[0]
    index = best.index.copy()
    case = best.case.copy() if best.case is not None else np.zeros(len(index), bool)
    used = [(best.how, best.n_mapped)]
    for m in ranked[1:]:
        free = (index < 0) & (m.index >= 0) & ~np.isin(m.index, index[index >= 0])
        if free.any():
            index[free] = m.index[free]
            if m.case is not None:
                case[free] = m.case[free]
            used.append((m.how, int(free.sum())))
    if len(used) == 1:
        return best
    how = " + ".join(f"{n:,} by {h}" for h, n in used)
    return GeneMatch(index, how, case=case)


def gene_symbols(names: Sequence[str], symbols: Sequence[str] | None = None,
                 table: GeneTable | None = None) -> np.ndarray:
    """Best symbol per gene: given ``symbols``, else table lookup of Ensembl ids, else the name.

    Returns an object array with None where an Ensembl id has no symbol in the table.
    """
    names = normalise_ids(names)
    if symbols is not None:
        out = np.asarray([None if (s is None or (isinstance(s, float) and np.isnan(s)) or s == "")
                          else str(s) for s in symbols], dtype=object)
        fill = np.asarray([v is None for v in out])
        out[fill] = names[fill]
    else:
        out = names.copy()
    ens = is_ensembl(out)
    if ens.any():
        if table is not None:
            out[ens] = table.ensembl_to_symbol(out[ens])
        # Without a table an Ensembl id stays as it is; it simply matches no symbol.
    return out
