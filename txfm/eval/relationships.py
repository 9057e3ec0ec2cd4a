"""Gene-gene relationship recall (Celik et al. 2024; Kraus et al. 2024; arXiv:2605.31562, evaluation).

A *gene representation* is a matrix ``R [G, D]`` with one row per gene (the encoder codebook,
the decoder's gene weights, PCA loadings, aggregated perturbation embeddings...). How well
it encodes known biology is measured as in the EFAAR benchmark:

1. standardise the columns of ``R`` (mean 0, variance 1);
2. PCA to ``c`` components (32 for the codebook, 256 for the decoder, 1024 for baselines;
   capped by ``min(G - 1, D)``); PCA loadings, principal axes already, keep their own top ``c``
   (``GeneRepresentation.nested``);
3. cosine similarity between genes, ``s_ij = <z_i, z_j> / (|z_i| |z_j|)``;
4. null: similarities of ``n_null`` random pairs of distinct genes (seeded, ``draws`` times);
5. recall of a database at the threshold pair (lo, hi) = share of its annotated pairs (both
   genes present; pairs sorted, self-pairs dropped, de-duplicated as EFAAR's
   ``filter_relationships``) whose similarity ranks at or below the null's ``lo`` quantile or
   at or above its ``hi`` quantile (EFAAR ``compute_recall``: ranks by ``searchsorted``).
   Random vectors give ``lo + 1 - hi`` (10% for 5/95, 20% for 10/90).

Reported per database and for all databases combined (the union of their pairs), mean and
standard deviation over the null draws.

Databases: EFAAR's ``entity1,entity2`` CSV files (CORUM, HuMAP, Reactome, SIGNOR, StringDB),
``.gmt`` gene sets and ``name<TAB>space-separated genes`` cluster files (every pair of genes
within a set is a relationship).

Cost: ``O(G D c)`` for the PCA, ``O((P + n_null) c)`` for the similarities of ``P`` pairs,
computed in chunks; no ``G x G`` matrix is formed.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import warnings
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .genemap import GENE_TABLE

RECALL_THRESHOLDS: tuple[tuple[float, float], ...] = ((0.05, 0.95), (0.10, 0.90))
# recall (%) of random gene vectors at the primary thresholds: the null's two tails, lo + 1 - hi
RANDOM_RECALL = round(100 * (RECALL_THRESHOLDS[0][0] + 1 - RECALL_THRESHOLDS[0][1]), 6)
BENCHMARK_SOURCES = ("CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB")
N_NULL = 20_000
N_DRAWS = 3
RANDOM_SEED = 42
GMT_MAX_SIZE = 500
# `txfm genes` keys: scanpy's X_ prefix for a representation of the observations (here genes)
CODEBOOK_KEY, DECODER_KEY = "X_codebook", "X_decoder"
# their names before 2026-12-02, still read from older genes.h5ad files and --n-components
LEGACY_KEYS = {"codebook": CODEBOOK_KEY, "decoder": DECODER_KEY}
DEFAULT_COMPONENTS = {CODEBOOK_KEY: 32, DECODER_KEY: 256}
BASELINE_COMPONENTS = 1024
# PCA loadings over more than 1 / LOADINGS_SHARE of the genes are warned about: standardised,
# loadings of most of the spectrum are nearly orthogonal and the recall falls towards random
# (the 250-gene demo's 203 genes: 72% at 32 components, 32% at 128, 12% at 202)
LOADINGS_SHARE = 4
SWEEP_COMPONENTS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


# ----------------------------------------------------------------------------- databases

def filter_relationships(entity1: Sequence[str], entity2: Sequence[str]) -> pd.DataFrame:
    """Sort each pair, drop self-pairs and duplicates (EFAAR ``filter_relationships``)."""
    a = np.asarray(entity1, dtype=object).astype(str)
    b = np.asarray(entity2, dtype=object).astype(str)
    swap = a > b
    e1 = np.where(swap, b, a)
    e2 = np.where(swap, a, b)
    df = pd.DataFrame({"entity1": e1, "entity2": e2})
    return df[df.entity1 != df.entity2].drop_duplicates().reset_index(drop=True)


@dataclasses.dataclass
class Database:
    """Known gene-gene relationships: explicit pairs or gene sets (all pairs within a set)."""

    name: str
    pairs: pd.DataFrame | None = None  # columns entity1, entity2 (filtered)
    sets: list[np.ndarray] | None = None  # each an object array of gene symbols

    @property
    def description(self) -> str:
        if self.pairs is not None:
            return f"{len(self.pairs):,} pairs"
        return f"{len(self.sets):,} gene sets"

    def index_pairs(self, genes: pd.Index) -> np.ndarray:
        """``[P, 2]`` int64 pairs ``(i, j)``, ``i < j``, of positions in ``genes`` (unique
        names); only pairs whose two genes are both present, each once."""
        if not genes.is_unique:
            raise ValueError("index_pairs needs unique gene names")
        if self.pairs is not None:
            i = genes.get_indexer(self.pairs.entity1.to_numpy())
            j = genes.get_indexer(self.pairs.entity2.to_numpy())
            keep = (i >= 0) & (j >= 0)
            i, j = i[keep], j[keep]
        else:
            parts_i, parts_j = [], []
            for s in self.sets:  # a loop over sets (thousands), not over pairs
                idx = genes.get_indexer(s)
                idx = np.unique(idx[idx >= 0])
                if len(idx) < 2:
                    continue
                a, b = np.triu_indices(len(idx), k=1)
                parts_i.append(idx[a])
                parts_j.append(idx[b])
            if not parts_i:
                return np.zeros((0, 2), dtype=np.int64)
            i, j = np.concatenate(parts_i), np.concatenate(parts_j)
        lo, hi = np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)
        keep = lo != hi
        code = np.unique(lo[keep] * len(genes) + hi[keep])
        return np.stack([code // len(genes), code % len(genes)], axis=1)


def read_pairs(path: str | pathlib.Path, name: str | None = None) -> Database:
    """An EFAAR relationship file: CSV with header ``entity1,entity2``."""
    path = pathlib.Path(path)
    df = pd.read_csv(path, dtype=str)
    if not {"entity1", "entity2"} <= set(df.columns):
        raise ValueError(f"{path}: expected a CSV with columns 'entity1,entity2' (EFAAR format), "
                         f"got {list(df.columns)}")
    df = df.dropna(subset=["entity1", "entity2"])
    db = Database(name or path.stem, pairs=filter_relationships(df.entity1, df.entity2))
    if len(db.pairs) == 0:
        raise ValueError(f"--db {path}: holds no gene pair (header only, or only self-pairs); "
                         f"give a file with rows 'GENE1,GENE2'")
    return db


def read_gene_sets(path: str | pathlib.Path, name: str | None = None, *, min_size: int = 2,
                   max_size: int = GMT_MAX_SIZE) -> Database:
    """A ``.gmt`` file (``name<TAB>description<TAB>gene...``) or a cluster file
    (``name<TAB>space-separated genes``, e.g. EFAAR's ``CORUM_clusters.tsv``).

    Sets with fewer than ``min_size`` or more than ``max_size`` genes are skipped (a set of
    2,800 genes alone adds 3.9M pairs of little specificity); ``max_size=0`` keeps all.
    """
    path = pathlib.Path(path)
    sets, skipped = [], 0
    gmt = path.suffix.lower() == ".gmt"
    with open(path) as f:
        for line in f:
            fields = line.rstrip("\n\r").split("\t")
            if len(fields) < 2:
                continue
            genes = fields[2:] if gmt else fields[1].split()
            genes = np.unique(np.asarray([g for g in genes if g], dtype=object))
            if len(genes) < min_size or (max_size and len(genes) > max_size):
                skipped += 1
                continue
            sets.append(genes)
    if not sets:
        raise ValueError(f"--db {path}: no gene set with {min_size}..{max_size or 'any'} genes; "
                         "is it a .gmt (name<TAB>description<TAB>genes) or a cluster TSV "
                         "(name<TAB>space-separated genes)?")
    if skipped:
        warnings.warn(f"{path.name}: skipped {skipped} gene sets outside {min_size}.."
                      f"{max_size or 'any'} genes (change with --gmt-max-size)", stacklevel=2)
    return Database(name or path.stem, sets=sets)


def load_databases(paths: Iterable[str | pathlib.Path], *, gmt_max_size: int = GMT_MAX_SIZE,
                   sources: Sequence[str] | None = None) -> list[Database]:
    """Read every database named: a folder gives its ``*.txt``/``*.csv`` pair files (EFAAR
    layout) and its ``*.gmt`` files; a file is read by its extension. ``sources`` keeps only
    those names (file stems). ``paths``: one path or several.

    Raises:
        FileNotFoundError: a path that does not exist, or a folder without relationship files.
        ValueError: a file that is not a relationship or gene-set file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    dbs: list[Database] = []
    found: list[str] = []  # every database name the paths offer, for an unknown ``sources``
    for p in paths:
        p = pathlib.Path(p)
        if p.is_dir():
            files = sorted([*p.glob("*.txt"), *p.glob("*.csv"), *p.glob("*.gmt")])
            order = {s: k for k, s in enumerate(BENCHMARK_SOURCES)}
            files.sort(key=lambda f: (order.get(f.stem, len(order)), f.name))
            if not files:
                raise FileNotFoundError(f"--db {p}: no *.txt/*.csv relationship files or *.gmt "
                                        "gene sets in this folder")
        elif p.is_file():
            files = [p]
        else:
            raise FileNotFoundError(f"--db {p}: no such file or folder (pass the folder "
                                    "shared/data/efaar_benchmark_annotations, or files)")
        for f in files:
            found.append(f.stem)
            if sources is not None and f.stem not in sources:
                continue
            try:
                if f.suffix.lower() == ".gmt" or f.suffix.lower() == ".tsv":
                    dbs.append(read_gene_sets(f, max_size=gmt_max_size))
                    continue
                with open(f) as fh:
                    header = fh.readline().strip().lower()
                if header.replace(" ", "") != "entity1,entity2":
                    if p.is_dir():  # a folder may hold other text files (licences, notes)
                        if f.suffix.lower() == ".csv":  # but a .csv is most likely a database
                            warnings.warn(f"--db {f}: skipped, its header is {header[:40]!r}, "
                                          f"not 'entity1,entity2'", stacklevel=2)
                        continue
                    raise ValueError(f"--db {f}: expected header 'entity1,entity2', got "
                                     f"{header[:80]!r}")
                dbs.append(read_pairs(f))
            except UnicodeDecodeError as exc:  # a binary file named as a database
                raise ValueError(f"--db {f}: not a UTF-8 text file ({exc.reason} at byte "
                                 f"{exc.start}); give EFAAR pair files (CSV with header "
                                 f"'entity1,entity2') or .gmt gene sets") from exc
    unknown = [name for name in sources or () if name not in found]
    if unknown:
        raise ValueError(f"--sources {','.join(unknown)}: no such database in "
                         f"{[str(p) for p in paths]}; it offers {sorted(set(found))}")
    if not dbs:
        raise ValueError(f"--db: no relationship database found in {[str(p) for p in paths]}")
    names = [d.name for d in dbs]
    if len(set(names)) != len(names):
        raise ValueError(f"two databases share a name: {names}; rename one file")
    return dbs


# ----------------------------------------------------------------------------- similarities

def pca_unit_vectors(reps: np.ndarray, n_components: int, *, seed: int = RANDOM_SEED
                     ) -> np.ndarray:
    """Standardise columns, PCA to ``min(n_components, G - 1, D)`` components, unit rows.

    Args:
        reps: ``[G, D]`` gene representation (any float dtype).
    Returns:
        ``[G, c]`` float32, rows of unit norm (zero rows stay zero: similarity 0).
    """
    from sklearn.decomposition import PCA

    x = np.asarray(reps, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3 or x.shape[1] < 1:
        raise ValueError(f"gene representation must be [genes >= 3, dims >= 1], got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("gene representation contains NaN or inf")
    sd = x.std(axis=0)
    x = (x[:, sd > 0] - x[:, sd > 0].mean(axis=0)) / sd[sd > 0]
    if x.shape[1] == 0:
        raise ValueError("gene representation is constant across genes (every column has zero "
                         "variance): nothing to compare")
    c = int(min(n_components, x.shape[0] - 1, x.shape[1]))
    solver = "full" if max(x.shape) <= 2000 or c > 0.5 * min(x.shape) else "randomized"
    z = PCA(n_components=c, svd_solver=solver, random_state=seed).fit_transform(x)
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    return (z / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def pair_similarity(z: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 1 << 18
                    ) -> np.ndarray:
    """Cosine similarity of rows ``z[i]`` and ``z[j]`` (``z`` has unit rows); chunked so that
    millions of pairs never materialise ``[P, c]`` at once."""
    out = np.empty(len(i), dtype=np.float32)
    for s in range(0, len(i), chunk):
        e = s + chunk
        out[s:e] = np.einsum("pc,pc->p", z[i[s:e]], z[j[s:e]])
    return np.clip(out, -1.0, 1.0)


def random_pairs(n_genes: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uniform random pairs of distinct genes."""
    i = rng.integers(0, n_genes, n)
    j = rng.integers(0, n_genes - 1, n)
    j = j + (j >= i)
    return i, j


def compute_recall(null: np.ndarray, query: np.ndarray,
                   thresholds: Sequence[tuple[float, float]] = RECALL_THRESHOLDS) -> dict:
    """Share of ``query`` similarities beyond the null's quantiles (EFAAR ``compute_recall``)."""
    srt = np.sort(null)
    left = np.searchsorted(srt, query, side="left") / len(srt)
    right = np.searchsorted(srt, query, side="right") / len(srt)
    out = {}
    for lo, hi in thresholds:
        lo, hi = min(lo, hi), max(lo, hi)
        out[recall_column(lo, hi)] = float(np.mean((right <= lo) | (left >= hi))) \
            if len(query) else float("nan")
    return out


def recall_column(lo: float, hi: float) -> str:
    return f"recall_{round(100 * lo):g}_{round(100 * hi):g}"


@dataclasses.dataclass
class GeneRepresentation:
    """One gene representation to evaluate: ``matrix[g]`` is gene ``symbols[g]``'s vector."""

    name: str
    matrix: np.ndarray  # [G, D]
    symbols: np.ndarray  # [G] object; None = unknown gene (not evaluated)
    n_components: int
    # The columns are principal axes already, largest variance first (PCA loadings): c
    # components are its first c columns. Standardised, such columns all have variance 1, so
    # a second PCA could not rank them and slicing it would pick arbitrary axes.
    nested: bool = False

    def restricted(self, keep: np.ndarray) -> "GeneRepresentation":
        return dataclasses.replace(self, matrix=self.matrix[keep], symbols=self.symbols[keep])

    def unique_genes(self) -> tuple[np.ndarray, pd.Index]:
        """Rows with a known, first-seen symbol, and that symbol index."""
        sym = pd.Series(self.symbols)
        keep = sym.notna().to_numpy() & ~sym.duplicated().to_numpy()
        return np.flatnonzero(keep), pd.Index(sym[keep].astype(str).to_numpy())


def check_null(n_null: int, draws: int) -> None:
    """ValueError naming the options unless ``n_null >= 100`` random pairs and ``draws >= 1``
    (fewer pairs make the 5th/95th percentiles of the null meaningless)."""
    if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < 1:
        raise ValueError(f"--draws {draws}: need an integer >= 1")
    if isinstance(n_null, bool) or not isinstance(n_null, (int, np.integer)) or n_null < 100:
        raise ValueError(f"--null-pairs {n_null}: need an integer >= 100 (random gene pairs of "
                         f"each null draw)")


def recall_table(rep: GeneRepresentation, databases: Sequence[Database], *,
                 n_null: int = N_NULL, draws: int = N_DRAWS, seed: int = RANDOM_SEED,
                 thresholds: Sequence[tuple[float, float]] = RECALL_THRESHOLDS,
                 components: Sequence[int] | None = None) -> pd.DataFrame:
    """Recall of every database (and all combined) for one representation.

    Args:
        components: also evaluate these PCA sizes (for the recall-vs-components plot); the
            PCA is fitted once at the largest size and sliced (PCA scores are nested). A
            ``nested`` representation (PCA loadings) is sliced before it is standardised: its
            first ``c`` columns, its own top ``c`` principal axes.
    Returns:
        one row per (n_components, database): ``representation, n_components, database,
        n_genes, n_pairs, recall_5_95_mean, recall_5_95_std, recall_10_90_mean, ...``;
        ``primary`` is True on the rows at ``rep.n_components`` (capped).
    """
    check_null(n_null, draws)
    if rep.matrix.ndim != 2 or rep.matrix.shape[1] < 2:
        raise ValueError(f"{rep.name}: a gene representation needs at least 2 dimensions, got "
                         f"shape {rep.matrix.shape} (in 1 dimension every cosine is +-1)")
    rows_idx, genes = rep.unique_genes()
    if len(genes) < 3:
        raise ValueError(f"{rep.name}: only {len(genes)} genes with a known symbol; map gene ids "
                         f"to symbols with {GENE_TABLE}")
    pairs = {db.name: db.index_pairs(genes) for db in databases}
    nonempty = [p for p in pairs.values() if len(p)]
    if not nonempty:
        raise ValueError(f"{rep.name}: none of the {len(genes):,} genes pairs up in any database "
                         f"({', '.join(d.name for d in databases)}): are the genes named by "
                         f"symbol? (pass {GENE_TABLE} to map Ensembl ids)")
    code = np.unique(np.concatenate([p[:, 0] * len(genes) + p[:, 1] for p in nonempty]))
    pairs["combined"] = np.stack([code // len(genes), code % len(genes)], axis=1)

    max_c = int(min(max([rep.n_components, *(components or [])]), len(genes) - 1,
                    rep.matrix.shape[1]))
    if rep.nested:
        top = rep.matrix[rows_idx]
        most = max_c
    else:
        z_full = pca_unit_vectors(rep.matrix[rows_idx], max_c, seed=seed)
        most = z_full.shape[1]
    primary_c = min(rep.n_components, most)
    sizes = sorted({primary_c, *[c for c in (components or []) if c <= most]})
    rows = []
    for c in sizes:
        if rep.nested:
            z = pca_unit_vectors(top[:, :c], c, seed=seed)
        else:
            z = z_full[:, :c]
            norm = np.linalg.norm(z, axis=1, keepdims=True)
            z = z / np.where(norm > 0, norm, 1.0)
        nulls = [pair_similarity(z, *random_pairs(len(genes), n_null,
                                                  np.random.default_rng(seed + d)))
                 for d in range(draws)]
        for name, p in pairs.items():
            row = {"representation": rep.name, "n_components": c, "database": name,
                   "n_genes": len(genes), "n_pairs": len(p), "primary": c == primary_c}
            q = pair_similarity(z, p[:, 0], p[:, 1]) if len(p) else np.zeros(0, np.float32)
            per_draw = [compute_recall(nl, q, thresholds) for nl in nulls]
            for key in per_draw[0]:
                vals = np.array([r[key] for r in per_draw])
                row[f"{key}_mean"] = float(vals.mean())
                row[f"{key}_std"] = float(vals.std(ddof=1)) if draws > 1 else 0.0
            rows.append(row)
    return pd.DataFrame(rows)


def common_genes(reps: Sequence[GeneRepresentation]) -> list[GeneRepresentation]:
    """Restrict every representation to the symbols all of them have (same pairs for all)."""
    shared = None
    for r in reps:
        s = set(r.symbols[pd.notna(r.symbols)].astype(str))
        shared = s if shared is None else shared & s
    out = []
    for r in reps:
        keep = np.asarray([s is not None and s in shared for s in r.symbols])
        out.append(r.restricted(keep))
    return out


def evaluate_representations(reps: Sequence[GeneRepresentation], databases: Sequence[Database],
                             *, n_null: int = N_NULL, draws: int = N_DRAWS,
                             seed: int = RANDOM_SEED,
                             thresholds: Sequence[tuple[float, float]] = RECALL_THRESHOLDS,
                             sweep: Sequence[int] | None = SWEEP_COMPONENTS,
                             progress: bool = True) -> pd.DataFrame:
    """:func:`recall_table` for every representation, concatenated."""
    from tqdm.auto import tqdm

    tables = []
    for rep in tqdm(reps, desc="relationship recall", unit="rep", disable=not progress):
        tables.append(recall_table(rep, databases, n_null=n_null, draws=draws, seed=seed,
                                   thresholds=thresholds, components=sweep))
    return pd.concat(tables, ignore_index=True)
