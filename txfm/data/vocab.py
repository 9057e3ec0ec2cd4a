"""The gene vocabulary: one key per gene, shared by every shard of a corpus.

A gene's key is its Ensembl-style id where the data give one (versions stripped), else its
symbol. Datasets that only carry symbols (e.g. 10x v2 ``genes.tsv`` with one column) are
mapped to ids through the (id, symbol) pairs of the other inputs, of ``--vocab`` and of
``--gene-table``, using only symbols that name exactly one id; symbols that stay unmapped
become their own key. ``gene_key="symbol"`` keys everything by symbol instead, and
``gene_key="id"`` refuses datasets whose genes cannot all be given ids.

Within a dataset, features that end up with the same key (duplicated symbols, or two
versions of one id) are one gene: their counts are summed per cell (the converter reports
how many). The union vocabulary lists genes in order of first appearance over the inputs in
the order given, so adding inputs at the end never renumbers existing genes. It is saved as
``vocab.tsv`` (``gene_id<TAB>symbol``) and identified by :attr:`Vocabulary.hash`.
"""
from __future__ import annotations

import csv
import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .readers import InputError, InputReader, strip_version

GENE_KEY_MODES = ("auto", "id", "symbol")


@dataclass(frozen=True)
class Vocabulary:
    ids: tuple[str, ...]
    symbols: tuple[str, ...]
    _index: dict = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if len(self.ids) != len(self.symbols):
            raise ValueError("Vocabulary ids and symbols differ in length")
        index = {k: i for i, k in enumerate(self.ids)}
        if len(index) != len(self.ids):
            dup = pd.Index(self.ids)[pd.Index(self.ids).duplicated()][:5].tolist()
            raise ValueError(f"vocabulary has duplicated gene ids, e.g. {dup}")
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def index(self) -> dict[str, int]:
        return self._index

    @property
    def hash(self) -> str:
        h = hashlib.sha256()
        for i, s in zip(self.ids, self.symbols):
            h.update(f"{i}\t{s}\n".encode())
        return h.hexdigest()[:16]

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """Vocabulary id of each key, -1 when absent (int64)."""
        get = self._index.get
        return np.fromiter((get(k, -1) for k in keys), dtype=np.int64, count=len(keys))

    def save(self, path: Path) -> None:
        df = pd.DataFrame({"gene_id": list(self.ids), "symbol": list(self.symbols)})
        tmp = Path(str(path) + ".tmp")
        df.to_csv(tmp, sep="\t", index=False)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        """A TSV with a header: ``gene_id`` (and optionally ``symbol``) columns, or one
        unnamed column of keys."""
        path = Path(path)
        df = _read_tsv(path, "vocabulary TSV", sep="\t")
        cols = [c.lower() for c in df.columns]
        id_col = next((df.columns[i] for i, c in enumerate(cols)
                       if c in ("gene_id", "id", "ensembl_gene_id", "gene_ids")), df.columns[0])
        sym_col = next((df.columns[i] for i, c in enumerate(cols)
                        if c in ("symbol", "gene_symbol", "gene_name")), None)
        ids = strip_version(df[id_col].to_numpy(dtype=object))
        symbols = df[sym_col].to_numpy(dtype=object) if sym_col is not None else ids
        try:
            return cls(tuple(ids.tolist()), tuple(str(s) for s in symbols))
        except ValueError as exc:  # duplicated ids
            raise InputError(f"{path}: {exc}") from exc


def _read_tsv(path: Path, what: str, **kw) -> pd.DataFrame:
    """A table with a header line, as strings; InputError naming the file when it is missing,
    unreadable (truncated .gz, binary) or has no rows."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, **kw)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error,
            pd.errors.ParserError, pd.errors.EmptyDataError) as exc:  # csv: sniffing sep=None
        raise InputError(f"{path}: cannot read the {what} ({type(exc).__name__}: {exc})") from exc
    if df.shape[0] == 0:
        raise InputError(f"{path}: the {what} has no rows")
    return df


def read_gene_table(path: Path) -> list[tuple[str, str]]:
    """(id, symbol) pairs from a table like ``gene_tables/genes_grch38_sceptre.tsv`` (a header
    line; tab-, comma- or otherwise delimited). Raises :class:`InputError` naming the file."""
    df = _read_tsv(Path(path), "gene table", sep=None, engine="python")
    cols = {c.lower(): c for c in df.columns}
    id_col = next((cols[c] for c in ("ensembl_gene_id", "gene_id", "id") if c in cols), None)
    sym_col = next((cols[c] for c in ("gene_symbol", "symbol", "gene_name") if c in cols), None)
    if id_col is None or sym_col is None:
        raise InputError(f"{path}: gene table needs an id column (ensembl_gene_id/gene_id) and "
                         f"a symbol column (gene_symbol/symbol); found {list(df.columns)}")
    return list(zip(strip_version(df[id_col].to_numpy(dtype=object)), df[sym_col]))


def symbol_to_id_map(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Symbols that name exactly one id, mapped to it."""
    seen: dict[str, set] = {}
    for gid, sym in pairs:
        if sym and gid and sym != gid:
            seen.setdefault(sym, set()).add(gid)
    return {s: next(iter(ids)) for s, ids in seen.items() if len(ids) == 1}


def _check_names(reader: InputReader, names) -> None:
    """InputError for gene names that cannot key a vocabulary: AnnData's default index
    ``0..n-1`` (the genes would be matched across inputs by position), or empty / 'nan'."""
    if names is None or len(names) == 0:
        return
    text = np.asarray([str(v) for v in names], dtype=object)
    if len(text) > 1 and np.array_equal(text, np.arange(len(text)).astype(str).astype(object)):
        raise InputError(f"{reader.path}: its genes have no names (var's index is 0..{len(text) - 1}"
                         f", AnnData's default): store Ensembl ids or symbols as var_names (or a "
                         f"gene_ids / symbol column)")
    blank = np.flatnonzero(np.isin(np.char.strip(text.astype(str)), ["", "nan", "None"]))
    if blank.size:
        raise InputError(f"{reader.path}: {blank.size} gene(s) have an empty or 'nan' name (e.g. "
                         f"column {int(blank[0])}); name every gene, or drop those columns")


def dataset_keys(reader: InputReader, mode: str,
                 sym2id: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Key and symbol of every feature column of ``reader`` (object arrays)."""
    ids, syms = reader.gene_ids, reader.gene_symbols
    _check_names(reader, ids if ids is not None else syms)
    if mode not in GENE_KEY_MODES:
        raise ValueError(f"gene_key must be one of {GENE_KEY_MODES}, got {mode!r}")
    if mode == "symbol":
        keys = syms if syms is not None else ids
        return keys.copy(), keys.copy()
    if ids is not None:
        return ids.copy(), (syms if syms is not None else ids).copy()
    # a name that is an Ensembl id (a gene without a symbol, or names mixing both) is keyed
    # as one, without its version, like the ids of other inputs
    keys = strip_version(np.array([sym2id.get(s, s) for s in syms], dtype=object))
    if mode == "id":
        unmapped = int(sum(1 for s in syms if s not in sym2id))
        if unmapped:
            raise InputError(f"{reader.path}: gene_key='id' but {unmapped} of {len(syms)} "
                             f"symbols have no unique Ensembl id among the inputs; give "
                             f"--gene-table (e.g. shared/data/gene_tables/"
                             f"genes_grch38_sceptre.tsv) or use --gene-key auto/symbol")
    return keys, syms.copy()


def union_vocabulary(per_dataset: Sequence[tuple[np.ndarray, np.ndarray]]) -> Vocabulary:
    """Union of ``(keys, symbols)`` lists in order of first appearance."""
    ids: dict[str, str] = {}
    for keys, syms in per_dataset:
        for k, s in zip(keys, syms):
            if k not in ids:
                ids[k] = s
    return Vocabulary(tuple(ids.keys()), tuple(str(s) for s in ids.values()))
