"""The oracle ceiling of the perturbation benchmark for a model shown K genes per cell.

Why. TxFM's encoder sees K of a cell's observable genes, drawn uniformly by the training
sampler (arXiv:2605.31562 §2), so its CLS embedding is a function of those K values alone.
Much of what the benchmark rewards (cell state, the programs a perturbation moves) is carried
by the top principal components of the Lib+Log expression. The best a K-gene encoder can do
for that *linear* structure is to estimate each cell's full-data PCA scores from the K
coordinates it is shown. :func:`oracle_embedding` computes this estimate. It knows the
loadings and gene means fit on all genes of all cells, which a model would have to learn.
Its benchmark scores are therefore a ceiling on what any model at that K can recover of the
linear structure. If the ceiling is at chance, the data cannot show learning at that K,
whatever the model. The ceiling does not bound non-linear structure; a model may exceed it
there. With K >= the observable genes the estimate is the plain PCA embedding (``ridge=0``:
exactly the ``pca`` baseline's scores).

Estimator. Cell ``b`` has shown genes ``S`` (``|S| = K``). They are drawn by
:func:`txfm_kernels.masked_sample` keyed as ``txfm embed`` draws them: ``seed``, blocks of
``KEY_BLOCK`` = 64 cells, ``offset`` = block number. The same input in the same gene columns
and the same seed therefore gives the genes ``txfm embed --seed`` shows. The cell's values
are ``x_S = log1p(L c_S / sum(c))``, normalised by the cell's total over all its genes as in
training. With the PCA loadings ``W [G, c]`` (``components_.T``) and gene means ``mu``, the
scores are estimated as::

    s = argmin_s ||x_S - mu_S - W_S s||^2 + s^T P s = (W_S^T W_S + P)^-1 W_S^T (x_S - mu_S)

This is one batched ``torch.linalg.solve`` per block of cells, in float64. The penalty is
``P = lam I`` for a given ``ridge=lam``. The default (``ridge=None``) is the
probabilistic-PCA posterior mean: ``P = diag(sigma^2 / lambda_j)``, with ``lambda_j`` the
variance of component ``j`` and ``sigma^2`` the PCA's mean residual variance per gene
(``noise_variance_``). This is the best linear estimate of the scores when the data are
Gaussian around the PCA's subspace. It shrinks the poorly determined weak components more
than the strong ones, which gives a higher (less understated) ceiling than a scalar ridge.
Measured on a synthetic screen like the demo's (``txfm.data.synth.generate(cells=20_000,
genes=3_000, perturbations=50, batches=3, seed=0)``: 13,000 cells, 2,446 genes, c = 128), the
best post-processing gave these scores (p.cst / lin top-1 / knn top-1, %; chance 2):

===========  ===================  ===================
prior        K = 128              K = 512
===========  ===================  ===================
default      72 / 3.9 / 2.3       88 / 8.7 / 3.5
ridge=0.21*  54 / 3.8 / 2.5       86 / 8.3 / 3.5
ridge=1e-3   12 / 2.4 / 1.9       82 / 5.7 / 2.6
===========  ===================  ===================

(*) 0.21 = ``sigma^2`` over the mean ``lambda_j``, the same prior made isotropic. For
comparison, all genes shown (the ``pca`` baseline) scored 96 / 19.7 / 7.0. Without a
penalty, a K below the number of components leaves the system singular. With K >= the
observable genes and ``ridge=0``, the estimate is exactly the PCA scores; the default
prior scales component ``j`` by ``lambda_j / (lambda_j + sigma^2)``.

Cost: ``O(cells * min(K, G-K) * c^2)`` flops to form ``W_S^T W_S`` (for K > G/2 the complement
is subtracted from ``W^T W``), ``O(cells * c^3)`` for the solves, ``O(cells * G * c)`` for the
right-hand sides. The PCA is fit once for all K (:func:`oracle_embeddings`). Memory is
``O(KEY_BLOCK * min(K, G-K) * c)`` float64 per block, on top of the dense ``cells x G``
float32 matrix the PCA is fit on. Measured with one thread on a loaded 2-core CPU, on the
13,000-cell screen above: the PCA fit took ~8 s; K = 128 took 10-12 s, K = 512 34 s,
K = 2048 (complement) 12 s, and K >= G 1 s.
"""
from __future__ import annotations

import numpy as np

from .baselines import TARGET_SUM, PCA_COMPONENTS, as_csr, fit_pca, lib_log
from .embed import KEY_BLOCK, _sample_block


def oracle_embedding(counts, k: int, n_components: int = PCA_COMPONENTS, *, seed: int = 0,
                     ridge: float | None = None, observable: np.ndarray | None = None,
                     target_sum: float = TARGET_SUM, device: str = "cpu") -> np.ndarray:
    """PCA scores of each cell estimated from ``k`` of its observable genes (see module doc).

    Args:
        counts: ``[cells, G]`` raw counts (scipy sparse or dense), finite and >= 0.
        k: shown genes per cell (``K``, >= 1). With ``k >=`` the observable genes every gene
            is shown, and all cells share one solve.
        n_components: PCA components ``c``, capped by ``cells - 1`` and the observable genes.
        seed: the draw's seed, as ``txfm embed --seed``.
        ridge: None = the probabilistic-PCA prior (module doc); a float ``lam >= 0`` = the
            penalty ``lam ||s||^2``. ``0`` with ``k >= G`` gives exactly the PCA scores.
        observable: ``[G]`` bool, the genes the input profiles (e.g. from
            :func:`txfm.eval.embed.remap_to_vocabulary`); None = all. The PCA is fit on these
            columns, and only these are drawn.
        target_sum: ``L`` of Lib+Log (the model's ``config.target_sum``).
        device: torch device of the sampler and the solves.
    Returns:
        ``[cells, c]`` float32.
    Raises:
        ValueError: bad ``k``, ``ridge`` or ``observable``; fewer than 2 cells; a singular
            system (no penalty and ``k`` below ``c``).
        MemoryError: the dense Lib+Log matrix exceeds the baselines' memory budget.
    """
    return oracle_embeddings(counts, (k,), n_components, seed=seed, ridge=ridge,
                             observable=observable, target_sum=target_sum, device=device)[k]


def oracle_embeddings(counts, ks, n_components: int = PCA_COMPONENTS, *, seed: int = 0,
                      ridge: float | None = None, observable: np.ndarray | None = None,
                      target_sum: float = TARGET_SUM, device: str = "cpu", log=None
                      ) -> dict[int, np.ndarray]:
    """:func:`oracle_embedding` for each K in ``ks``, sharing one PCA fit:
    ``{k: [cells, c] float32}``. ``log(msg)``, if given, is told each K's time."""
    import time

    import torch

    import txfm_kernels

    ks = list(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k (shown genes per cell) must be an integer >= 1, got {k!r}")
    if ridge is not None and not (np.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be finite and >= 0, got {ridge}")
    m = as_csr(counts)
    m.sort_indices()
    n, g = m.shape
    obs = np.ones(g, dtype=bool) if observable is None else np.asarray(observable)
    if obs.dtype != bool or obs.shape != (g,) or not obs.any():
        raise ValueError(f"observable must be a [{g}] bool mask with at least one True, got "
                         f"{obs.dtype} {obs.shape}")
    cols = np.flatnonzero(obs)
    logged = lib_log(m, target_sum)[:, cols]
    pca = fit_pca(logged, n_components, seed, what="oracle PCA")
    f64 = dict(dtype=torch.float64, device=device)
    w_obs = torch.as_tensor(pca.components_.T, **f64)  # [G_obs, c]
    mu_obs = torch.as_tensor(pca.mean_, **f64)
    c = w_obs.shape[1]
    penalty = torch.diag(torch.as_tensor(_penalty(pca, ridge), **f64))
    gram = w_obs.T @ w_obs  # = I up to rounding (orthonormal loadings)
    w = torch.zeros(g, c, **f64)
    w[torch.as_tensor(cols)] = w_obs
    mu = torch.zeros(g, **f64)
    mu[torch.as_tensor(cols)] = mu_obs
    cols_t = torch.as_tensor(cols, device=device)
    obs_genes = txfm_kernels.ObservableGenes.from_mask(torch.as_tensor(obs)).to(device)
    result = {}
    for k in ks:
        t0 = time.perf_counter()
        if k >= len(cols):  # every observable gene shown: one system for all cells
            x = torch.as_tensor(logged.toarray(), **f64) - mu_obs
            s = torch.linalg.solve(gram + penalty, (x @ w_obs).T).T
            result[k] = s.cpu().numpy().astype(np.float32)
        else:
            result[k] = _solve_shown(m, k, w, w_obs, mu, gram, penalty, cols_t, obs_genes,
                                     seed=seed, target_sum=target_sum)
        if log is not None:
            log(f"oracle_k{k}: {c} PCA scores from {min(k, len(cols)):,} shown genes of "
                f"{len(cols):,}, {time.perf_counter() - t0:.1f} s")
    return result


def _solve_shown(m, k, w, w_obs, mu, gram, penalty, cols_t, obs_genes, *, seed, target_sum):
    """Per block of ``KEY_BLOCK`` cells: draw ``k`` genes, solve the penalised system."""
    import torch

    n, g = m.shape
    c = w.shape[1]
    if k < c and not bool((torch.diagonal(penalty) > 0).all()):
        # rank(W_S^T W_S) <= k < c; LU in floating point would not notice
        raise ValueError(f"oracle k={k}: {k} shown genes cannot determine {c} PCA scores "
                         f"without a penalty (singular system); use ridge > 0 or k >= {c}")
    f64 = dict(dtype=torch.float64, device=w.device)
    out = np.empty((n, c), dtype=np.float32)
    complement = k > len(cols_t) // 2
    for b0 in range(0, n, KEY_BLOCK):
        b1 = min(b0 + KEY_BLOCK, n)
        ids, vals, pad = _sample_block(m, b0, b1, obs_genes, k=k, target_sum=target_sum,
                                       seed=seed, device=str(w.device))
        ids = ids.long()
        shown = ~pad
        y = torch.zeros(b1 - b0, g, **f64)  # centred shown values, dense: rhs = y @ W
        y.scatter_(1, ids, torch.where(shown, vals.double() - mu[ids], 0.0))
        rhs = y @ w
        if complement:  # W_S^T W_S = W^T W - W_C^T W_C, C = the genes not shown
            mask = torch.zeros(b1 - b0, g, dtype=torch.bool, device=w.device)
            mask.scatter_(1, ids, shown)
            _, pos = (~mask[:, cols_t]).nonzero(as_tuple=True)
            wc = w_obs[pos].view(b1 - b0, -1, c)  # every row hides the same number of genes
            a = gram - wc.transpose(1, 2) @ wc
        else:
            ws = w[ids] * shown[..., None]
            a = ws.transpose(1, 2) @ ws
        try:
            s = torch.linalg.solve(a + penalty, rhs)
        except RuntimeError as exc:  # torch's _LinAlgError: an exactly singular system
            raise ValueError(f"oracle k={k}: singular system for cells {b0}..{b1}; use "
                             "ridge > 0") from exc
        out[b0:b1] = s.cpu().numpy()
    return out


def _penalty(pca, ridge: float | None) -> np.ndarray:
    """``[c]`` diagonal of ``P``: ``ridge`` for each component, or (None) the probabilistic-PCA
    prior ``sigma^2 / lambda_j`` (a component without variance gets a large finite weight)."""
    ev = np.asarray(pca.explained_variance_, dtype=np.float64)
    if ridge is not None:
        return np.full(ev.shape, float(ridge))
    floor = max(float(ev.max(initial=0.0)), 1.0) * 1e-12
    return float(pca.noise_variance_) / np.maximum(ev, floor)
