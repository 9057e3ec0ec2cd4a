"""Baselines computed from raw counts, for both benchmarks (arXiv:2605.31562, evaluation).

Cell embeddings (perturbation benchmark), each ``[cells, dims]`` float32:

* ``raw``          raw counts as they are (all genes);
* ``liblog``       library-size normalisation to ``L`` and ``log1p``,
                   ``log(1 + L c_i / sum_j c_j)``;
* ``liblog_hvg<N>`` Lib+Log restricted to the ``N`` most highly variable genes (Seurat
                   flavour: dispersion z-scored within 20 mean bins), N = 5000 and 1024; a size
                   not below the number of genes would equal ``liblog`` and is left out;
* ``pca``          PCA of Lib+Log (centred), ``n_components`` (default 128) capped by the data.

Fit on a training corpus (the paper's "PCA (1.4M samples)", arXiv:2605.31562 §6, Table 1):
with ``reference=`` :func:`expression_baselines` fits ``pca`` and ``liblog_hvg<N>`` on a
corpus's cells and applies them to the screen (rows ``pca_corpus``, ``liblog_hvg<N>_corpus``).
:func:`read_reference` reads a random subset of a shard collection's training cells (or of an
``.h5ad``), :func:`align_to_reference` moves the screen's genes onto the corpus's vocabulary as
``txfm embed`` does, and both are fit and applied on the genes both profile.

Gene representations (relationship recall): :func:`pca_gene_loadings`, the genes as PCA
loading vectors of the Lib+Log expression matrix (``components_.T``: ``[genes, c]``).

Everything works on a scipy CSR matrix of counts and densifies only the (cells x kept genes)
matrix it returns; :func:`check_dense_size` refuses sizes beyond a memory budget.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

TARGET_SUM = 1e5
HVG_SIZES = (5000, 1024)
PCA_COMPONENTS = 128
MAX_DENSE_GIB = 8.0


def as_csr(counts) -> sp.csr_matrix:
    """Counts as float32 CSR, checked: finite, non-negative, at least one cell and gene."""
    m = sp.csr_matrix(counts, dtype=np.float32) if not sp.issparse(counts) else \
        counts.tocsr().astype(np.float32)
    if m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"counts are empty: shape {m.shape}")
    if m.nnz and (not np.isfinite(m.data).all() or (m.data < 0).any()):
        raise ValueError("counts must be finite and non-negative (raw counts in .X or the "
                         "--layer given); got negative or non-finite values, are these "
                         "already normalised?")
    return m


def check_dense_size(n_rows: int, n_cols: int, what: str, max_gib: float = MAX_DENSE_GIB,
                     fix: str = "subsample cells with --max-cells"):
    gib = n_rows * n_cols * 4 / 2**30
    if gib > max_gib:
        raise MemoryError(f"{what}: a dense {n_rows:,} x {n_cols:,} float32 matrix needs "
                          f"{gib:.1f} GiB (> {max_gib} GiB); {fix} or leave this baseline out "
                          "with --baselines")


def lib_log(counts: sp.csr_matrix, target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """``log1p(L * c / sum(c))`` per cell with ``L = target_sum`` (scanpy's
    ``normalize_total(target_sum=L)`` then ``log1p``), sparse (zeros stay zero); empty cells
    stay zero. ``counts [cells, genes]`` raw counts; returns float32 CSR of the same shape.

    Raises:
        ValueError: ``target_sum`` not a finite number > 0.
    """
    if isinstance(target_sum, bool) or not isinstance(target_sum, numbers.Real) \
            or not math.isfinite(target_sum) or target_sum <= 0:
        raise ValueError(f"target_sum must be a finite number > 0, got {target_sum!r}")
    m = as_csr(counts)
    total = np.asarray(m.sum(axis=1)).ravel()
    with np.errstate(over="ignore"):  # L / S beyond fp32: those rows are redone below
        scale = np.where(total > 0, target_sum / np.where(total > 0, total, 1),
                         0.0).astype(np.float32)
    out = m.copy()
    lengths = np.diff(out.indptr)
    out.data = np.log1p(out.data * np.repeat(scale, lengths))
    wide = ~np.isfinite(scale)
    if wide.any():  # tiny float counts: L * c / S <= L fits in fp32 when formed in fp64
        at = np.repeat(wide, lengths)
        s64 = target_sum / total[wide].astype(np.float64)
        out.data[at] = np.log1p(m.data[at].astype(np.float64) * np.repeat(s64, lengths[wide]))
    return out


def highly_variable_genes(logged: sp.csr_matrix, n_top: int, n_bins: int = 20) -> np.ndarray:
    """Indices of the ``n_top`` most variable genes, Seurat flavour (as scanpy's default).

    Dispersion ``var/mean`` of ``expm1`` of the log data, log-transformed, z-scored within
    ``n_bins`` equal-width bins of ``log1p(mean)``. Genes with zero mean are never chosen.
    """
    x = logged.copy()
    x.data = np.expm1(x.data)
    n = x.shape[0]
    mean = np.asarray(x.mean(axis=0)).ravel().astype(np.float64)
    sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    var = (sq - mean**2) * n / max(n - 1, 1)
    expressed = mean > 0
    disp = np.full_like(mean, -np.inf)
    disp[expressed] = np.log(np.maximum(var[expressed], 1e-12) / mean[expressed])
    lm = np.log1p(mean)
    edges = np.linspace(lm[expressed].min(), lm[expressed].max() + 1e-9, n_bins + 1) \
        if expressed.any() else np.array([0.0, 1.0])
    b = np.clip(np.digitize(lm, edges) - 1, 0, n_bins - 1)
    norm = np.full_like(mean, -np.inf)
    for k in range(n_bins):  # 20 bins, vectorised within each
        sel = expressed & (b == k)
        if not sel.any():
            continue
        d = disp[sel]
        sd = d.std(ddof=1) if sel.sum() > 1 else 0.0
        # A bin with one gene (or no spread) keeps that gene in play, as Seurat does.
        norm[sel] = (d - d.mean()) / sd if sd > 0 else 1.0
    order = np.argsort(-norm, kind="stable")
    order = order[np.isfinite(norm[order])]
    return np.sort(order[:n_top])


def make_pca(n_components: int, shape: tuple[int, int], seed: int = 0):
    """An sklearn PCA with the solver that suits ``shape`` (rows, cols) of the data it fits:
    the covariance eigendecomposition when there are few columns and many rows (``O(n d^2)``,
    far faster than an SVD there), LAPACK otherwise for small problems, randomized SVD for
    large ones. Data with no variance gives zero components without numpy's 0/0 warning
    (callers name that case in their own words)."""
    n, d = shape
    if d <= 1000 and n >= 2 * d:
        solver = "covariance_eigh"
    elif min(n, d) <= 1000 or n_components > 0.5 * min(n, d):
        solver = "full"
    else:
        solver = "randomized"
    return _quiet_pca()(n_components=n_components, svd_solver=solver, random_state=seed)


@functools.cache
def _quiet_pca():
    from sklearn.decomposition import PCA

    class QuietPCA(PCA):
        """sklearn's PCA; its explained-variance ratio is 0/0 on data with no variance."""

        def fit(self, X, y=None):
            with np.errstate(divide="ignore", invalid="ignore"):
                return super().fit(X, y)

        def fit_transform(self, X, y=None):
            with np.errstate(divide="ignore", invalid="ignore"):
                return super().fit_transform(X, y)

    return QuietPCA


def fit_pca(logged: sp.csr_matrix, n_components: int = PCA_COMPONENTS, seed: int = 0, *,
            what: str = "pca baseline", fix: str = "subsample cells with --max-cells"):
    """An sklearn PCA fit on the dense (centred) Lib+Log matrix ``[cells, genes]``, with
    ``min(n_components, cells-1, genes)`` components (``components_ [c, genes]``,
    ``mean_ [genes]``); ValueError below 2 cells, MemoryError beyond ``MAX_DENSE_GIB``."""
    return _pca(logged, n_components, seed, what, fix)[0]


def pca_embedding(logged: sp.csr_matrix, n_components: int = PCA_COMPONENTS, seed: int = 0
                  ) -> np.ndarray:
    """PCA scores of the (centred) Lib+Log matrix, ``min(n_components, cells-1, genes)``."""
    return _pca(logged, n_components, seed, "pca baseline", "subsample cells with --max-cells",
                scores=True)[1]


def _pca(logged, n_components, seed, what, fix, scores=False):
    c = int(min(n_components, logged.shape[0] - 1, logged.shape[1]))
    if c < 1:
        raise ValueError(f"{what} needs >= 2 cells and >= 1 gene, got {logged.shape}")
    check_dense_size(*logged.shape, what, fix=fix)
    dense = logged.toarray()
    pca = make_pca(c, dense.shape, seed)
    if not scores:
        return pca.fit(dense), None
    return pca, pca.fit_transform(dense).astype(np.float32)


FIT_NAMES = "pca, liblog_hvg<N>"  # the baselines that fit something (to a reference, if given)


def expression_baselines(counts, names: tuple[str, ...] | None = None, *,
                         target_sum: float = TARGET_SUM, hvg_sizes=HVG_SIZES,
                         pca_components: int = PCA_COMPONENTS, seed: int = 0,
                         reference=None, genes=None
                         ) -> tuple[dict[str, np.ndarray], list[str]]:
    """The cell-embedding baselines of the perturbation benchmark.

    Args:
        counts: ``[cells, genes]`` raw counts (scipy sparse or dense).
        names: which to compute (``raw``, ``liblog``, ``liblog_hvg<N>``, ``pca``); default all
            (with ``liblog_hvg<N>`` for each N in ``hvg_sizes`` below the number of genes).
        reference: ``[ref_cells, genes]`` raw counts of a training corpus, in the same gene
            columns as ``counts`` (:func:`align_to_reference`). Given, ``pca`` is fit on the
            reference's Lib+Log matrix and applied to ``counts`` (``transform``: centred on
            the reference's gene means), and ``liblog_hvg<N>`` keeps the ``N`` genes most
            variable in the reference; the results are named ``pca_corpus`` and
            ``liblog_hvg<N>_corpus``. Only these fit something: ``raw``/``liblog`` are
            refused (ValueError) with a reference. Default all baselines when ``names`` is None.
        genes: ``[genes]`` bool mask (or index array) of the columns to fit and apply on, e.g.
            the genes both the screen and the corpus profile; default all. Lib+Log
            normalisation always divides by each cell's total over *all* its columns (its own
            profiled genes), as :func:`lib_log` does, before the columns are restricted.
    Returns:
        ``({name: [cells, dims] float32}, notes)``, notes saying what was left out and why.
    Raises:
        ValueError: unknown name, bad ``genes``, reference with other columns, too few cells.
        MemoryError: a dense matrix beyond ``MAX_DENSE_GIB`` (the message says the fix).
    """
    m = as_csr(counts)
    ref = None if reference is None else as_csr(reference)
    if ref is not None and ref.shape[1] != m.shape[1]:
        raise ValueError(f"reference has {ref.shape[1]:,} genes, counts {m.shape[1]:,}: give both "
                         "in the same gene columns (align_to_reference)")
    cols = _columns(genes, m.shape[1])
    n_genes = m.shape[1] if cols is None else len(cols)
    suffix = "" if ref is None else "_corpus"
    notes = []
    if names is None:
        names = ("raw", "liblog", *[f"liblog_hvg{n}" for n in hvg_sizes], "pca")
        if ref is not None:
            names = names[2:]
    check_baseline_names(names)
    out: dict[str, np.ndarray] = {}
    logged = fit = None
    for name in names:
        if ref is not None and not (name == "pca" or name.startswith("liblog_hvg")):
            raise ValueError(f"baseline {name!r} fits nothing, so it has no corpus-fit form; "
                             f"with a reference choose from {FIT_NAMES}")
        if name == "raw":
            x = m if cols is None else m[:, cols]
            check_dense_size(*x.shape, "raw baseline")
            out[name] = x.toarray()
            continue
        if logged is None:
            logged = lib_log(m, target_sum)
            if cols is not None:
                logged = logged[:, cols]
            fit = logged if ref is None else lib_log(ref, target_sum)
            if ref is not None and cols is not None:
                fit = fit[:, cols]
        if name == "liblog":
            check_dense_size(*logged.shape, "liblog baseline")
            out[name] = logged.toarray()
        elif name.startswith("liblog_hvg"):
            n_top = int(name[len("liblog_hvg"):])
            if n_top >= n_genes:
                notes.append(f"{name + suffix} left out: only {n_genes:,} genes, it would equal "
                             "liblog")
                continue
            keep = highly_variable_genes(fit, n_top)
            check_dense_size(logged.shape[0], len(keep), name + suffix)
            out[name + suffix] = logged[:, keep].toarray()
        elif name == "pca" and ref is None:
            out[name] = pca_embedding(logged, pca_components, seed)
        elif name == "pca":
            pca = fit_pca(fit, pca_components, seed, what="pca_corpus baseline (the reference)",
                          fix="lower --fit-cells")
            check_dense_size(*logged.shape, "pca_corpus baseline (the screen)")
            out[name + suffix] = pca.transform(logged.toarray()).astype(np.float32)
    fit_rows = (m if ref is None else ref).shape[0]
    if "pca" in names and pca_components > min(n_genes, fit_rows - 1):
        notes.append(f"pca{suffix}: {min(n_genes, fit_rows - 1):,} components, not "
                     f"{pca_components:,}: a PCA has at most as many as the genes "
                     f"({n_genes:,}) and the cells it is fit on, less one ({fit_rows - 1:,})")
    return out, notes


def check_baseline_names(names) -> None:
    """ValueError for a name that is not ``raw``, ``liblog``, ``liblog_hvg<N>`` (N >= 1) or
    ``pca``: checked before any baseline is computed."""
    for name in names:
        n = name[len("liblog_hvg"):] if name.startswith("liblog_hvg") else None
        if n is not None and n.isdigit() and int(n) >= 1:
            continue
        if n is not None:
            raise ValueError(f"baseline {name!r}: liblog_hvg<N> needs a whole number N >= 1 of "
                             "highly variable genes, e.g. liblog_hvg1024")
        if name not in ("raw", "liblog", "pca"):
            raise ValueError(f"unknown baseline {name!r}; choose from raw, liblog, "
                             "liblog_hvg<N>, pca")


def _columns(genes, n: int) -> np.ndarray | None:
    """``genes`` (None, ``[n]`` bool mask or indices) as sorted unique indices, None = all."""
    if genes is None:
        return None
    g = np.asarray(genes)
    if g.dtype == bool:
        if g.shape != (n,):
            raise ValueError(f"genes mask must be [{n}] bool, got shape {g.shape}")
        g = np.flatnonzero(g)
    elif g.size and (not np.issubdtype(g.dtype, np.integer) or g.min() < 0 or g.max() >= n):
        raise ValueError(f"genes must be a [{n}] bool mask or indices in [0, {n})")
    g = np.unique(g.astype(np.int64))
    if g.size == 0:
        raise ValueError("genes selects no column: no gene to fit the baselines on")
    return g


# ----------------------------------------------------------------------------- corpus reference

@dataclass(frozen=True)
class Reference:
    """Cells of a training corpus to fit baselines on (:func:`read_reference`).

    ``counts [cells, G]`` float32 CSR raw counts in the corpus's gene columns; ``genes [G]``
    its gene ids (the vocabulary of a shard collection, ``var_names`` of an ``.h5ad``);
    ``symbols [G]`` or None; ``profiled [G]`` bool, the genes every dataset the cells come
    from profiles (an unprofiled gene is a zero that means nothing); ``source`` for messages.
    """

    counts: sp.csr_matrix
    genes: list
    symbols: list | None
    profiled: np.ndarray
    source: str


def read_reference(path, max_cells: int = 50_000, seed: int = 0, *, option: str = "--fit-on"
                   ) -> Reference:
    """A random subset of ``max_cells`` cells of a corpus (all if it has fewer).

    Args:
        path: a shard collection folder written by ``txfm data convert`` (its *training*
            split is read, through :class:`txfm.data.ShardLoader`: a shuffled epoch's first
            cells, a uniform sample since the converter stores the corpus in a seeded random
            order), or an ``.h5ad`` / 10x input with raw counts in ``.X`` (read whole, then
            subsampled: give large corpora as shards).
        seed: the subset's seed.
    Raises:
        UsageError: the path is missing, not a (complete) collection, or has no raw counts.
        ValueError: ``max_cells < 2``.
    """
    import pathlib

    from txfm.cli import UsageError, error_message

    p = pathlib.Path(path)
    if max_cells < 2:
        raise ValueError(f"max_cells must be >= 2 (cells to fit a baseline on), got {max_cells}")
    if p.is_dir() and ((p / "manifest.json").exists() or (p / ".txfm-convert").exists()):
        return _read_shards(p, max_cells, seed, option)
    from .io import counts_matrix, read_cells

    if p.is_dir() and not any((p / f).exists() for f in ("matrix.mtx", "matrix.mtx.gz")):
        raise UsageError(f"{option} {p}: neither a shard collection (no manifest.json; write one "
                         "with `txfm data convert`) nor a 10x matrix folder")
    a = read_cells(p, option=option)
    x = counts_matrix(a, f"{option} {p}", f"a file whose .X holds raw counts for {option}")
    if a.n_obs > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(a.n_obs, max_cells, replace=False))
        x = x[rows]
    sym = next((a.var[c] for c in ("symbol", "gene_symbol", "gene_symbols", "gene_name",
                                   "feature_name") if c in a.var.columns), None)
    try:
        x = as_csr(x)
    except ValueError as exc:
        raise UsageError(f"{option} {p}: {error_message(exc)}") from exc
    return Reference(x, [str(g) for g in a.var_names],
                     None if sym is None else [str(s) for s in sym],
                     np.ones(x.shape[1], dtype=bool), f"{p} ({x.shape[0]:,} of {a.n_obs:,} cells)")


def _read_shards(root, max_cells: int, seed: int, option: str) -> Reference:
    import torch

    from txfm.cli import UsageError, error_message
    from txfm.data import Manifest, ShardLoader

    try:
        manifest = Manifest.load(root)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"{option}: {error_message(exc)}") from exc
    total = manifest.n_split_cells("train")
    if total < 2:
        raise UsageError(f"{option} {root}: the training split has {total} cells; need >= 2")
    n = min(max_cells, total)
    batch = min(n, 4096)
    loader = ShardLoader(root, batch, split="train", shuffle=True, seed=seed, drop_last=False,
                         buffer_size=max(batch, min(16384, n)), counts_dtype=torch.float32)
    parts, datasets, got = [], set(), 0
    it = iter(loader)
    try:
        for b in it:
            take = min(b.batch_size, n - got)
            ip = b.indptr.numpy()
            e = int(ip[take])
            parts.append(sp.csr_matrix((b.counts.numpy()[:e], b.indices.numpy()[:e], ip[:take + 1]),
                                       shape=(take, manifest.n_genes)))
            datasets.update(np.unique(b.dataset_ids.numpy()[:take]).tolist())
            got += take
            if got >= n:
                break
    finally:
        it.close()
    x = sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
    profiled = np.ones(manifest.n_genes, dtype=bool)
    for d in sorted(datasets):
        mask = np.zeros(manifest.n_genes, dtype=bool)
        mask[manifest.datasets[d].observable] = True
        profiled &= mask
    names = ", ".join(manifest.datasets[d].name for d in sorted(datasets))
    return Reference(x.astype(np.float32), manifest.gene_ids, manifest.symbols, profiled,
                     f"{root} ({x.shape[0]:,} of {total:,} training cells; datasets {names})")


def align_to_reference(var, counts, reference: Reference, table=None):
    """The screen's counts moved onto the reference's gene columns, as ``txfm embed`` does.

    Args:
        var: the screen's ``.var`` (``var_names`` and any id/symbol column are tried).
        counts: ``[cells, genes_in]`` raw counts of the screen.
        table: optional :class:`~txfm.eval.genemap.GeneTable` (Ensembl <-> symbol).
    Returns:
        ``(counts [cells, G] float32 CSR, observable [G] bool, shared [G] bool, match)``:
        ``observable`` = the screen's genes in the reference's columns (what ``txfm embed``
        may show), ``shared`` = those every reference dataset profiles (the baselines' genes),
        ``match`` the :class:`~txfm.eval.genemap.GeneMatch` (for the report).
    Raises:
        ValueError: fewer than 2 genes in common (the message says how to map names).
    """
    from .embed import map_input_genes, remap_to_vocabulary
    from .genemap import GENE_TABLE

    match = map_input_genes(var, list(reference.genes), table, reference.symbols)
    if match.n_mapped == 0:
        raise ValueError(f"no gene of the screen is among the genes of the reference "
                         f"{reference.source}: check the gene names or pass {GENE_TABLE} to "
                         "translate Ensembl ids <-> symbols")
    moved, observable = remap_to_vocabulary(as_csr(counts), match.index, len(reference.genes))
    shared = observable & reference.profiled
    if shared.sum() < 2:
        raise ValueError(f"only {int(shared.sum())} genes are both in the screen and profiled by "
                         f"the reference {reference.source}: check the gene names or pass "
                         f"{GENE_TABLE} to translate Ensembl ids <-> symbols")
    return moved, observable, shared, match


def pca_gene_loadings(counts, n_components: int = 1024, *, target_sum: float = TARGET_SUM,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Genes as PCA loading vectors of the Lib+Log expression matrix (the relationship-recall
    baseline).

    Returns:
        ``(loadings [genes_kept, c] float32, kept [genes_kept] int64)``: genes with zero
        variance (never or always equally expressed) have no direction and are left out.
        The columns are principal axes, largest variance first (score them as a
        ``GeneRepresentation(..., nested=True)``: the first ``c`` columns are ``c``
        components).
    """
    logged = lib_log(as_csr(counts), target_sum)
    x = logged.copy()
    mean = np.asarray(x.mean(axis=0)).ravel()
    sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    kept = np.flatnonzero(sq - mean**2 > 1e-12)
    if len(kept) < 3:
        raise ValueError(f"only {len(kept)} genes vary across the {x.shape[0]:,} cells: no PCA "
                         "loadings to compare")
    check_dense_size(x.shape[0], len(kept), "PCA loadings baseline")
    dense = x[:, kept].toarray()
    c = int(min(n_components, dense.shape[0] - 1, dense.shape[1]))
    pca = make_pca(c, dense.shape, seed).fit(dense)
    return pca.components_.T.astype(np.float32), kept
