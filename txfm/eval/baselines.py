"""Baselines computed from raw counts, for both benchmarks (SPEC §6).

Cell embeddings (perturbation benchmark), each ``[cells, dims]`` float32:

* ``raw``          raw counts as they are (all genes);
* ``liblog``       library-size normalisation to ``L`` and ``log1p``,
                   ``log(1 + L c_i / sum_j c_j)``;
* ``liblog_hvg<N>`` Lib+Log restricted to the ``N`` most highly variable genes (Seurat
                   flavour: dispersion z-scored within 20 mean bins), N = 5000 and 1024; a size
                   not below the number of genes would equal ``liblog`` and is left out;
* ``pca``          PCA of Lib+Log (centred), ``n_components`` (default 128) capped by the data.

Gene representations (relationship recall): :func:`pca_gene_loadings`, the genes as PCA
loading vectors of the Lib+Log expression matrix (``components_.T``: ``[genes, c]``).

Everything works on a scipy CSR matrix of counts and densifies only the (cells x kept genes)
matrix it returns; :func:`check_dense_size` refuses sizes beyond a memory budget.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

LIBRARY_SIZE = 1e5
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


def check_dense_size(n_rows: int, n_cols: int, what: str, max_gib: float = MAX_DENSE_GIB):
    gib = n_rows * n_cols * 4 / 2**30
    if gib > max_gib:
        raise MemoryError(f"{what}: a dense {n_rows:,} x {n_cols:,} float32 matrix needs "
                          f"{gib:.1f} GiB (> {max_gib} GiB); subsample cells with --max-cells "
                          "or leave this baseline out with --baselines")


def lib_log(counts: sp.csr_matrix, library_size: float = LIBRARY_SIZE) -> sp.csr_matrix:
    """``log1p(L * c / sum(c))`` per cell, sparse (zeros stay zero); empty cells stay zero."""
    m = as_csr(counts)
    total = np.asarray(m.sum(axis=1)).ravel()
    scale = np.where(total > 0, library_size / np.maximum(total, 1e-12), 0.0).astype(np.float32)
    out = m.copy()
    out.data = np.log1p(out.data * np.repeat(scale, np.diff(out.indptr)))
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
    large ones."""
    from sklearn.decomposition import PCA

    n, d = shape
    if d <= 1000 and n >= 2 * d:
        solver = "covariance_eigh"
    elif min(n, d) <= 1000 or n_components > 0.5 * min(n, d):
        solver = "full"
    else:
        solver = "randomized"
    return PCA(n_components=n_components, svd_solver=solver, random_state=seed)


def pca_embedding(logged: sp.csr_matrix, n_components: int = PCA_COMPONENTS, seed: int = 0
                  ) -> np.ndarray:
    """PCA scores of the (centred) Lib+Log matrix, ``min(n_components, cells-1, genes)``."""
    c = int(min(n_components, logged.shape[0] - 1, logged.shape[1]))
    if c < 1:
        raise ValueError(f"PCA baseline needs >= 2 cells and >= 1 gene, got {logged.shape}")
    check_dense_size(*logged.shape, "pca baseline")
    dense = logged.toarray()
    return make_pca(c, dense.shape, seed).fit_transform(dense).astype(np.float32)


def expression_baselines(counts, names: tuple[str, ...] | None = None, *,
                         library_size: float = LIBRARY_SIZE, hvg_sizes=HVG_SIZES,
                         pca_components: int = PCA_COMPONENTS, seed: int = 0
                         ) -> tuple[dict[str, np.ndarray], list[str]]:
    """The cell-embedding baselines of the perturbation benchmark.

    Args:
        counts: ``[cells, genes]`` raw counts (scipy sparse or dense).
        names: which to compute (``raw``, ``liblog``, ``liblog_hvg<N>``, ``pca``); default all
            (with ``liblog_hvg<N>`` for each N in ``hvg_sizes`` below the number of genes).
    Returns:
        ``({name: [cells, dims] float32}, notes)``, notes saying what was left out and why.
    """
    m = as_csr(counts)
    n_genes = m.shape[1]
    notes = []
    if names is None:
        names = ("raw", "liblog", *[f"liblog_hvg{n}" for n in hvg_sizes], "pca")
    out: dict[str, np.ndarray] = {}
    logged = None
    for name in names:
        if name == "raw":
            check_dense_size(*m.shape, "raw baseline")
            out[name] = m.toarray()
            continue
        if logged is None:
            logged = lib_log(m, library_size)
        if name == "liblog":
            check_dense_size(*logged.shape, "liblog baseline")
            out[name] = logged.toarray()
        elif name.startswith("liblog_hvg"):
            n_top = int(name[len("liblog_hvg"):])
            if n_top >= n_genes:
                notes.append(f"{name} left out: only {n_genes:,} genes, it would equal liblog")
                continue
            keep = highly_variable_genes(logged, n_top)
            check_dense_size(logged.shape[0], len(keep), name)
            out[name] = logged[:, keep].toarray()
        elif name == "pca":
            out[name] = pca_embedding(logged, pca_components, seed)
        else:
            raise ValueError(f"unknown baseline {name!r}; choose from raw, liblog, "
                             "liblog_hvg<N>, pca")
    return out, notes


def pca_gene_loadings(counts, n_components: int = 1024, *, library_size: float = LIBRARY_SIZE,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Genes as PCA loading vectors of the Lib+Log expression matrix (the relationship-recall
    baseline).

    Returns:
        ``(loadings [genes_kept, c] float32, kept [genes_kept] int64)``: genes with zero
        variance (never or always equally expressed) have no direction and are left out.
    """
    logged = lib_log(as_csr(counts), library_size)
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
