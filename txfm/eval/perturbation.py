"""Perturbation benchmark (Bendidi et al. 2024; arXiv:2605.31562, evaluation) on cell embeddings.

Input: ``x [cells, dims]`` (any embedding or baseline), a perturbation label per cell (the
control label, e.g. ``non-targeting``, among them) and optionally a batch label per cell.

Metrics, all in percent except ``ilisi``:

* ``pcst``  perturbation consistency. PCA fitted on control cells (``pcst_pcs`` components),
            then per batch standardised on that batch's controls. For a perturbation with cells
            ``x_1..x_n`` the statistic is the mean leave-one-out cosine similarity
            ``t = 1/n sum_i cos(x_i, sum_{j != i} x_j)``. Null: the same statistic for
            ``n_null`` random sets of ``n`` cells drawn from a pool of up to 10,000 random cells
            (any label). ``p = (1 + #{null >= t}) / (1 + n_null)``; consistent if ``p < alpha``
            (0.01), so ``n_null`` must be at least ``1 / alpha`` (100). Score = share of
            perturbations (with ``>= min_cells`` cells, and at least 2: one cell has no
            leave-one-out cosine) consistent.
* ``lin_top1``, ``lin_top5``  logistic-regression probe of the perturbation labels
            (controls excluded), trained on all batches but one and tested on the held-out one,
            each batch in turn (pooled over folds).
* ``knn_top1``, ``knn_top5``  weighted k-NN retrieval across batches: each cell's ``k``
            nearest (cosine) cells in *other* batches vote ``exp(cos / T)`` for their label
            (k=20, T=0.07, as Tx-Evaluation's ``WeightedKNNClassifier``). In both, a true
            label tied with others counts as the expected hit of a random tie-break, and kNN
            takes neighbours at tied distances in a seeded random order of the reference
            cells (not the file's), so identical embeddings score chance: about the most
            frequent perturbation's share of cells (1/P top-1 when balanced), which the probe
            then predicts from its intercept and kNN from a random draw of voters. A cell
            whose perturbation has no cell in the other batches is left out of both (it
            cannot be predicted or retrieved).
* ``bmdb``  relationship recall of perturbation embeddings: per-perturbation mean embedding,
            cosine similarity of all perturbation pairs as the null, recall of the annotated
            pairs of the databases (combined) beyond the 5th/95th percentiles.
* ``ilisi`` batch mixing: mean inverse Simpson index of batch labels in each cell's kNN
            neighbourhood (k = 3 x perplexity, Gaussian kernel calibrated to the perplexity
            by bisection, vectorised over cells); 1 = no mixing, #batches = perfect.
            ``ilisi_norm = 100 (ilisi - 1) / (#batches - 1)``. A cell whose neighbours all
            sit at its own position (a collapsed embedding) has no neighbourhood to mix:
            it is left out, and an embedding with no such cell left scores NaN.
* ``average`` mean of the percent metrics computed (``pcst``, ``lin_top1``, ``lin_top5``,
            ``knn_top1``, ``knn_top5``, ``bmdb``, ``ilisi_norm``: up to seven numbers).

Post-processing before the metrics (each tried; the best ``average`` is reported):
``none``; ``center`` (subtract the batch's control mean); ``standardize`` (centre and scale on
the batch's controls); ``tvn`` (typical variation normalisation as in EFAAR/Tx-Evaluation:
standardise on controls, PCA fitted on controls, standardise again, then per batch
``x (C_b + 0.5 I)^(-1/2)`` with ``C_b`` the batch controls' covariance). A batch with fewer
than 2 controls uses all its cells instead, with a warning.

:func:`perturbation_table` splits the scores by perturbation (lin and kNN over each one's
held-out cells, its p.cst p-value): which perturbations an embedding retrieves.

Everything is vectorised over cells (loops run over batches, perturbations, folds).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from .baselines import make_pca

POSTPROCESSING = ("none", "center", "standardize", "tvn")
METRICS = ("pcst", "lin", "knn", "bmdb", "ilisi")
PCST_PCS = 50
PCST_NULL_CELLS = 10_000
PCST_NULL_DRAWS = 1000
PCST_ALPHA = 0.01
MIN_CELLS = 5
KNN_K = 20
KNN_T = 0.07
# the probe: L2-regularised logistic regression on standardised features, a probe and not a
# model to tune (few iterations, loose tolerance), on a random subset of large training folds
PROBE_C = 1.0
PROBE_MAX_ITER = 200
PROBE_TOL = 1e-3
PROBE_MAX_TRAIN_CELLS = 20_000
LISI_PERPLEXITY = 30
LISI_MAX_CELLS = 10_000
LISI_PCS = 50
MIN_PERTURBATIONS_BMDB = 20


@dataclasses.dataclass(frozen=True)
class Labels:
    """Per-cell labels as integer codes."""

    pert: np.ndarray  # [n] int64 code into pert_names
    pert_names: np.ndarray  # [P] object
    control: int  # code of the control label
    batch: np.ndarray | None  # [n] int64 code into batch_names, or None
    batch_names: np.ndarray | None

    @classmethod
    def build(cls, perturbation: Sequence, control: str, batch: Sequence | None = None
              ) -> "Labels":
        """Codes of ``[n]`` perturbation labels (any type; compared as text, as is
        ``control``) and optional ``[n]`` batch labels.

        Raises:
            ValueError: a missing label (None, NaN, pd.NA) in either, which would become a
                class of its own (drop those cells first); ``batch`` of another length;
                ``control`` not among the labels.
        """
        control = str(control)
        if batch is not None and len(batch) != len(perturbation):
            raise ValueError(f"batch has {len(batch):,} labels but perturbation "
                             f"{len(perturbation):,}: give one of each per cell")
        for what, values in (("perturbation", perturbation), ("batch", batch)):
            if values is not None:
                missing = int(pd.isna(pd.Series(np.asarray(values, dtype=object))).sum())
                if missing:
                    raise ValueError(f"{missing:,} cells have no {what} label (None/NaN); drop "
                                     f"them first (the CLI leaves them out)")
        pert = pd.Categorical(np.asarray(perturbation).astype(str))
        names = np.asarray(pert.categories, dtype=object)
        if control not in set(names):
            common = pd.Series(np.asarray(pert)).value_counts().index[:8].tolist()
            raise ValueError(f"control label {control!r} not found among the perturbation labels "
                             f"(most frequent: {common}); give the control's label (the CLI's "
                             f"--control)")
        b = bn = None
        if batch is not None:
            bc = pd.Categorical(np.asarray(batch).astype(str))
            b, bn = bc.codes.astype(np.int64), np.asarray(bc.categories, dtype=object)
        return cls(pert.codes.astype(np.int64), names, int(np.flatnonzero(names == control)[0]),
                   b, bn)

    @property
    def n_batches(self) -> int:
        return 1 if self.batch is None else len(self.batch_names)

    def subset(self, rows: np.ndarray) -> "Labels":
        return dataclasses.replace(self, pert=self.pert[rows],
                                   batch=None if self.batch is None else self.batch[rows])

    def batch_groups(self) -> list[np.ndarray]:
        if self.batch is None:
            return [np.arange(len(self.pert))]
        return [np.flatnonzero(self.batch == b) for b in range(self.n_batches)]


def check_embedding(x, labels: Labels, what: str = "embedding") -> np.ndarray:
    """``x`` as a float64 ``[n, d]`` array of one finite row per cell of ``labels``.

    Raises:
        ValueError: ``x`` not 2-D, not ``len(labels.pert)`` rows, or not finite.
    """
    x = np.asarray(x)
    if x.ndim != 2 or len(x) != len(labels.pert) or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{what} has shape {x.shape} ({x.dtype}), expected "
                         f"[{len(labels.pert)}, dims] numbers: one row per labelled cell")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or inf")
    return x


# ----------------------------------------------------------------------------- post-processing

def _control_stats(x: np.ndarray, ctrl: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    if ctrl.sum() < 2:
        raise ValueError(f"{where}: fewer than 2 control cells; centring/scaling on controls needs "
                         "controls (or choose --postprocess none)")
    mu = x[ctrl].mean(axis=0)
    sd = x[ctrl].std(axis=0)
    return mu, np.where(sd > 1e-8, sd, 1.0)


def _batch_reference(ctrl_rows: np.ndarray, labels: Labels, b: int, method: str) -> np.ndarray:
    """The rows a batch's statistics come from: its controls, or (as p.cst does) all its cells
    when it has fewer than 2 controls, with a warning naming the batch."""
    if ctrl_rows.sum() >= 2:
        return ctrl_rows
    name = labels.batch_names[b] if labels.batch_names is not None else b
    warnings.warn(f"{method}: batch {name!r} has {int(ctrl_rows.sum())} control cell(s); it is "
                  f"normalised on all its cells instead of its controls", stacklevel=3)
    return np.ones_like(ctrl_rows)


def postprocess(x: np.ndarray, labels: Labels, method: str) -> np.ndarray:
    """Apply one post-processing method to ``x [n, d]`` (one row per cell of ``labels``, any
    float dtype; :func:`check_embedding`): ``none``, ``center``, ``standardize`` or ``tvn``
    (module docstring). Returns float64 ``[n, d']`` (``d' <= d`` after TVN's PCA).

    Raises:
        ValueError: a bad ``x`` or ``method``; fewer than 2 control cells to centre or scale on.
    """
    x = check_embedding(x, labels)
    ctrl = labels.pert == labels.control
    if method == "none":
        return x
    if method not in POSTPROCESSING:
        raise ValueError(f"unknown post-processing {method!r}; choose from {POSTPROCESSING}")
    if method in ("center", "standardize"):
        out = np.empty_like(x)
        for b, rows in enumerate(labels.batch_groups()):
            ref = _batch_reference(ctrl[rows], labels, b, method)
            mu, sd = _control_stats(x[rows], ref, f"batch {b}")
            out[rows] = (x[rows] - mu) if method == "center" else (x[rows] - mu) / sd
        return out
    # TVN
    mu, sd = _control_stats(x, ctrl, "tvn")
    y = (x - mu) / sd
    c = int(min(y.shape[1], ctrl.sum() - 1))
    y = make_pca(c, (int(ctrl.sum()), y.shape[1])).fit(y[ctrl]).transform(y)
    mu, sd = _control_stats(y, ctrl, "tvn")
    y = (y - mu) / sd
    out = np.empty_like(y)
    for b, rows in enumerate(labels.batch_groups()):
        yc = y[rows][_batch_reference(ctrl[rows], labels, b, method)]
        cov = np.cov(yc, rowvar=False, ddof=1).reshape(y.shape[1], y.shape[1]) \
            + 0.5 * np.eye(y.shape[1])
        w, v = np.linalg.eigh(cov)
        out[rows] = y[rows] @ (v * (1.0 / np.sqrt(np.maximum(w, 1e-12)))) @ v.T
    return out


# ----------------------------------------------------------------------------- p.cst

def _loo_cosine(dots: np.ndarray, sq: np.ndarray, total_sq: np.ndarray) -> np.ndarray:
    """Mean over a set of ``cos(x_i, S - x_i)`` from ``x_i . S`` (dots), ``|x_i|^2`` (sq) and
    ``|S|^2`` (total_sq, broadcast), with ``S`` the set's sum; last axis = set members."""
    num = dots - sq
    den = np.sqrt(np.maximum(total_sq - 2.0 * dots + sq, 0.0) * sq)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0).mean(axis=-1)


def min_null_draws(alpha: float = PCST_ALPHA) -> int:
    """Fewest p.cst null draws with which ``p = 1 / (1 + n_null)`` can fall below ``alpha``."""
    return int(np.floor(1.0 / alpha))


def perturbation_consistency(x: np.ndarray, labels: Labels, *, n_pcs: int = PCST_PCS,
                             null_cells: int = PCST_NULL_CELLS, n_null: int = PCST_NULL_DRAWS,
                             alpha: float = PCST_ALPHA, min_cells: int = MIN_CELLS,
                             seed: int = 0) -> tuple[float, pd.DataFrame]:
    """p.cst (see module docstring) of ``x [n, d]`` (one row per cell of ``labels``, any float
    dtype; :func:`check_embedding`). Returns ``(score %, per-perturbation table)``.

    Raises:
        ValueError: a bad ``x``; ``n_null`` too small for any p-value to fall below ``alpha``
            (the smallest is ``1 / (1 + n_null)``), or fewer than 3 control cells.
    """
    min_null = min_null_draws(alpha)
    if n_null < min_null:
        raise ValueError(f"p.cst: {n_null} null draws cannot give a p-value below "
                         f"alpha={alpha} (the smallest is 1/(1+{n_null})); use at least "
                         f"{min_null} (--pcst-null-draws)")
    x = check_embedding(x, labels)
    ctrl = labels.pert == labels.control
    if ctrl.sum() < 3:
        raise ValueError(f"p.cst needs at least 3 control cells to fit its PCA, found "
                         f"{int(ctrl.sum())}; leave pcst out of --metrics")
    c = int(min(n_pcs, x.shape[1], ctrl.sum() - 1))
    if np.ptp(x[ctrl], axis=0).any():
        y = make_pca(c, (int(ctrl.sum()), x.shape[1]), seed).fit(x[ctrl]).transform(x)
    else:  # constant controls have no principal axes (PCA would divide by a zero variance)
        y = x[:, :c] - x[ctrl][0, :c]
    for rows in labels.batch_groups():
        cb = ctrl[rows]
        base = y[rows][cb] if cb.sum() >= 2 else y[rows]  # batch without controls: its own stats
        sd = base.std(axis=0)
        y[rows] = (y[rows] - base.mean(axis=0)) / np.where(sd > 1e-8, sd, 1.0)
    y = y.astype(np.float32)

    counts = np.bincount(labels.pert, minlength=len(labels.pert_names))
    perts = [p for p in range(len(labels.pert_names)) if p != labels.control]
    # one cell has no others to be compared with: its leave-one-out cosine is undefined
    min_cells = max(int(min_cells), 2)
    eligible = [p for p in perts if counts[p] >= min_cells]
    if not eligible:
        raise ValueError(f"p.cst: no perturbation has >= {min_cells} cells (largest: "
                         f"{counts[perts].max() if perts else 0}); lower --min-cells")
    rng = np.random.default_rng(seed)
    pool = rng.choice(len(y), size=min(null_cells, len(y)), replace=False)
    yp = y[pool]
    # Each null draw is a uniform random permutation of the pool; its first n entries are a
    # uniform random n-subset, so one permutation matrix serves every set size.
    order = rng.permuted(np.tile(np.arange(len(pool), dtype=np.int32), (n_null, 1)), axis=1)

    sizes = np.minimum(counts[eligible], len(pool))
    null_by_size = {int(n): _null_loo_cosine(yp, order[:, :n]) for n in np.unique(sizes)}

    rows_out = []
    order_all = np.argsort(labels.pert, kind="stable")
    starts = np.searchsorted(labels.pert[order_all], np.arange(len(labels.pert_names) + 1))
    for p, n in zip(eligible, sizes):
        members = order_all[starts[p]:starts[p + 1]]
        if len(members) > n:  # more cells than the null pool: compare like with like
            members = rng.choice(members, size=n, replace=False)
        v = y[members].astype(np.float64)
        s = v.sum(axis=0)
        t = float(_loo_cosine(v @ s, (v**2).sum(1), s @ s))
        null = null_by_size[int(n)]
        p_val = (1 + len(null) - np.searchsorted(null, t, side="left")) / (1 + len(null))
        rows_out.append((labels.pert_names[p], int(counts[p]), t, float(p_val), p_val < alpha))
    skipped = [labels.pert_names[p] for p in perts if counts[p] < min_cells]
    if skipped:
        warnings.warn(f"p.cst: {len(skipped)} perturbations with < {min_cells} cells left out: "
                      f"{skipped[:10]}{' ...' if len(skipped) > 10 else ''}", stacklevel=2)
    table = pd.DataFrame(rows_out, columns=["perturbation", "n_cells", "loo_cosine", "p_value",
                                            "consistent"])
    return 100.0 * float(table.consistent.mean()), table


def _null_loo_cosine(pool: np.ndarray, idx: np.ndarray, chunk_elems: int = 1 << 23
                     ) -> np.ndarray:
    """Sorted statistic of the random sets ``pool[idx[r]]`` (``idx [R, n]``), gathered in chunks
    of draws so that ``[draws, n, d]`` stays below ``chunk_elems`` elements."""
    r_total, n = idx.shape
    step = max(1, chunk_elems // max(n * pool.shape[1], 1))
    out = np.empty(r_total)
    sq = (pool**2).sum(axis=1)
    for r in range(0, r_total, step):
        sel = idx[r:r + step]
        g = pool[sel]  # [draws, n, d]
        s = g.sum(axis=1)
        dots = np.einsum("rtd,rd->rt", g, s)
        out[r:r + step] = _loo_cosine(dots, sq[sel], (s**2).sum(axis=1)[:, None])
    return np.sort(out)


def chance_percent(n_perts: int) -> tuple[float, float]:
    """Top-1 and top-5 chance (%) of a perturbation's label among ``n_perts`` balanced ones."""
    return 100.0 / n_perts, min(100.0, 500.0 / n_perts)


# ----------------------------------------------------------------------------- lin / knn

def _folds(labels: Labels, keep: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, test rows) pairs: leave one batch out; without batches one random 80/20
    split (seeded)."""
    if labels.batch is not None and labels.n_batches >= 2:
        return [(np.flatnonzero(keep & (labels.batch != b)),
                 np.flatnonzero(keep & (labels.batch == b))) for b in range(labels.n_batches)]
    if labels.batch is not None:
        warnings.warn("only one batch: lin/knn use a random 80/20 split instead of held-out "
                      "batches", stacklevel=3)
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(keep)
    test = rng.random(len(rows)) < 0.2
    return [(rows[~test], rows[test])]


def _topk_hits(scores: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """``[n]`` float in [0, 1]: the chance that the true class is among the ``k`` highest
    (positive) scores when ties are broken at random. Counting every tie as a hit would
    score identical embeddings above chance."""
    true_score = scores[np.arange(len(truth)), truth]
    higher = (scores > true_score[:, None]).sum(axis=1)
    tied = (scores == true_score[:, None]).sum(axis=1)  # >= 1: the true class itself
    return np.where(true_score > 0, np.clip((k - higher) / tied, 0.0, 1.0), 0.0)


def linear_probe(x: np.ndarray, labels: Labels, *, include_control: bool = False,
                 max_train_cells: int = PROBE_MAX_TRAIN_CELLS, max_iter: int = PROBE_MAX_ITER,
                 tol: float = PROBE_TOL, C: float = PROBE_C, seed: int = 0) -> dict:
    """Logistic-regression probe of the perturbation labels from ``x [n, d]`` (one row per
    cell of ``labels``, any float dtype; :func:`check_embedding`): trained on some batches,
    tested on the others (each batch held out once; controls left out unless
    ``include_control``). Returns ``{"lin_top1": %, "lin_top5": %}``.

    Raises:
        ValueError: a bad ``x``; no test cell whose perturbation occurs in the training batches.
    """
    return _rates("lin", _probe_hits(x, labels, include_control=include_control,
                                     max_train_cells=max_train_cells, max_iter=max_iter, tol=tol,
                                     C=C, seed=seed))


def _rates(metric: str, hits: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict:
    """``{metric_top1: %, metric_top5: %}`` of ``(rows, top-1 hits, top-5 hits)``."""
    return {f"{metric}_top1": 100.0 * hits[1].mean(), f"{metric}_top5": 100.0 * hits[2].mean()}


def _probe_hits(x: np.ndarray, labels: Labels, *, include_control: bool = False,
                max_train_cells: int = PROBE_MAX_TRAIN_CELLS, max_iter: int = PROBE_MAX_ITER,
                tol: float = PROBE_TOL, C: float = PROBE_C, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`linear_probe` cell by cell: ``(rows, top-1 hits, top-5 hits)``, the rows of the
    test cells of every fold and each one's expected hit in [0, 1]."""
    x = check_embedding(x, labels)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    keep = np.ones(len(labels.pert), bool) if include_control else labels.pert != labels.control
    rows, hit1, hit5 = [], [], []
    rng = np.random.default_rng(seed)
    for train, test in _folds(labels, keep, seed):
        train_classes = np.unique(labels.pert[train])
        test = test[np.isin(labels.pert[test], train_classes)]
        if len(train_classes) < 2 or len(test) == 0:
            continue
        if len(train) > max_train_cells:
            train = rng.choice(train, max_train_cells, replace=False)
        scaler = StandardScaler().fit(x[train])
        clf = LogisticRegression(C=C, max_iter=max_iter, tol=tol, random_state=seed)
        # One BLAS thread: the probe's products are small ([cells, dims] x [dims, classes]) and
        # spinning BLAS threads made each lbfgs step ~10x slower on a busy 2-core machine.
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore")  # ConvergenceWarning: a probe, not a model to tune
            clf.fit(scaler.transform(x[train]).astype(np.float32), labels.pert[train])
        proba = clf.predict_proba(scaler.transform(x[test]).astype(np.float32))
        truth = np.searchsorted(clf.classes_, labels.pert[test])
        proba = proba + 1e-12  # a true class with probability 0 still ranks
        rows.append(test)
        hit1.append(_topk_hits(proba, truth, 1))
        hit5.append(_topk_hits(proba, truth, 5))
    if not rows:
        raise ValueError("linear probe: no test cell whose perturbation also occurs in the "
                         "training batches")
    return np.concatenate(rows), np.concatenate(hit1), np.concatenate(hit5)


def knn_retrieval(x: np.ndarray, labels: Labels, *, k: int = KNN_K, temperature: float = KNN_T,
                  include_control: bool = False, seed: int = 0) -> dict:
    """Weighted cosine k-NN of ``x [n, d]`` (one row per cell of ``labels``, any float dtype;
    :func:`check_embedding`): each cell's perturbation is voted by its ``k`` nearest cells of
    other batches (weights ``exp(cos / temperature)``). Returns ``{"knn_top1": %,
    "knn_top5": %}``.

    Raises:
        ValueError: a bad ``x``.
    """
    return _rates("knn", _knn_hits(x, labels, k=k, temperature=temperature,
                                   include_control=include_control, seed=seed))


def _knn_hits(x: np.ndarray, labels: Labels, *, k: int = KNN_K, temperature: float = KNN_T,
              include_control: bool = False, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`knn_retrieval` cell by cell: ``(rows, top-1 hits, top-5 hits)``, the rows of the
    query cells of every fold and each one's expected hit in [0, 1]."""
    x = check_embedding(x, labels)
    from sklearn.neighbors import NearestNeighbors

    keep = np.ones(len(labels.pert), bool) if include_control else labels.pert != labels.control
    n_classes = len(labels.pert_names)
    # Cosine neighbours = Euclidean neighbours of unit vectors (cos = 1 - d^2 / 2), which
    # scikit-learn finds with a float32 GEMM: ~4x faster than its metric="cosine" path.
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    unit = (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)
    rows, hit1, hit5 = [], [], []
    rng = np.random.default_rng(seed)
    for ref, query in _folds(labels, keep, seed):
        # scikit-learn breaks distance ties by row order: in a seeded random order of the
        # reference cells, tied neighbours are a random draw, not the file's first rows
        ref = ref[rng.permutation(len(ref))]
        # as the probe: a cell whose perturbation has no cell in the other batches cannot be
        # retrieved, so it is left out rather than counted as a miss
        query = query[np.isin(labels.pert[query], labels.pert[ref])]
        if len(ref) == 0 or len(query) == 0:
            continue
        kk = min(k, len(ref))
        nn = NearestNeighbors(n_neighbors=kk, metric="euclidean", algorithm="brute")
        dist, idx = nn.fit(unit[ref]).kneighbors(unit[query])
        w = np.exp((1.0 - dist.astype(np.float64) ** 2 / 2.0) / temperature)
        flat = (np.arange(len(query))[:, None] * n_classes + labels.pert[ref][idx]).ravel()
        scores = np.bincount(flat, weights=w.ravel(), minlength=len(query) * n_classes) \
            .reshape(len(query), n_classes)
        truth = labels.pert[query]
        rows.append(query)
        hit1.append(_topk_hits(scores, truth, 1))
        hit5.append(_topk_hits(scores, truth, 5))
    if not rows:
        raise ValueError("knn: nothing to retrieve (no non-control cells in two batches)")
    return np.concatenate(rows), np.concatenate(hit1), np.concatenate(hit5)


# ----------------------------------------------------------------------------- bmdb

def perturbation_relationship_recall(x: np.ndarray, labels: Labels, databases, *,
                                     symbols: np.ndarray | None = None,
                                     threshold: tuple[float, float] = (0.05, 0.95)) -> dict:
    """Recall (%) of annotated pairs among perturbation targets, from the mean per
    perturbation of ``x [n, d]`` (one row per cell of ``labels``, any float dtype;
    :func:`check_embedding`).

    Args:
        symbols: ``[P]`` gene symbol of each perturbation label (None entries are skipped);
            default: the labels themselves.
    Returns:
        ``{"bmdb": combined recall, "bmdb_<db>": per database, "bmdb_pairs": #pairs}``;
        NaN where no annotated pair is among the perturbations.
    Raises:
        ValueError: a bad ``x``.
    """
    from .relationships import compute_recall, recall_column

    x = check_embedding(x, labels)

    perts = np.array([p for p in range(len(labels.pert_names)) if p != labels.control])
    sums = np.zeros((len(labels.pert_names), x.shape[1]))
    np.add.at(sums, labels.pert, x)  # fine: P x d accumulators, vectorised over cells
    counts = np.bincount(labels.pert, minlength=len(labels.pert_names))
    means = sums[perts] / counts[perts, None]
    syms = np.asarray(labels.pert_names if symbols is None else symbols, dtype=object)[perts]
    ok = pd.notna(syms) & ~pd.Series(syms).duplicated().to_numpy() & (counts[perts] > 0)
    means, syms = means[ok], syms[ok].astype(str)
    if len(syms) < MIN_PERTURBATIONS_BMDB:
        warnings.warn(f"bmdb: only {len(syms)} perturbations (EFAAR asks for >= "
                      f"{MIN_PERTURBATIONS_BMDB}); the recall is noisy", stacklevel=2)
    norm = np.linalg.norm(means, axis=1, keepdims=True)
    z = means / np.where(norm > 0, norm, 1.0)
    sim = np.clip(z @ z.T, -1, 1)
    iu = np.triu_indices(len(syms), k=1)
    null = sim[iu]
    genes = pd.Index(syms)
    col = recall_column(*threshold)
    out, all_pairs = {}, []
    for db in databases:
        pairs = db.index_pairs(genes)
        all_pairs.append(pairs)
        out[f"bmdb_{db.name}"] = 100.0 * compute_recall(null, sim[pairs[:, 0], pairs[:, 1]],
                                                        [threshold])[col] if len(pairs) else np.nan
    pairs = np.unique(np.concatenate(all_pairs), axis=0) if all_pairs else np.zeros((0, 2), int)
    out["bmdb"] = 100.0 * compute_recall(null, sim[pairs[:, 0], pairs[:, 1]], [threshold])[col] \
        if len(pairs) and len(null) else np.nan
    out["bmdb_pairs"] = len(pairs)
    return out


# ----------------------------------------------------------------------------- iLISI

def lisi(x: np.ndarray, groups: np.ndarray, *, perplexity: float = LISI_PERPLEXITY,
         n_iter: int = 50, tol: float = 1e-5) -> np.ndarray:
    """Per-cell LISI (Korsunsky et al. 2019) of integer labels ``groups``.

    kNN graph with ``k = 3 perplexity`` Euclidean neighbours (self excluded); weights
    ``exp(-beta_i d_ij)`` with ``beta_i`` found by bisection so that the neighbourhood's
    entropy equals ``log(perplexity)`` (all cells at once); LISI = ``1 / sum_c p_c^2``; NaN for
    a cell whose ``k`` neighbours all lie at distance 0.
    """
    from sklearn.neighbors import NearestNeighbors

    groups = np.asarray(groups)
    if groups.shape != (len(x),) or not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"groups must be [{len(x)}] integer labels, got {groups.shape} "
                         f"{groups.dtype} (codes of text labels: pd.Categorical(labels).codes)")
    n = len(x)
    k = int(min(3 * perplexity, n - 1))
    if k < 1:
        raise ValueError("LISI needs at least 2 cells")
    dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    dist, idx = dist[:, 1:], idx[:, 1:]
    target = np.log(min(perplexity, k))
    beta = np.ones(n)
    lo = np.full(n, -np.inf)
    hi = np.full(n, np.inf)
    d0 = dist - dist[:, :1]  # shift by the nearest distance: same P, no underflow

    def weights(beta):
        p = np.exp(-d0 * beta[:, None])
        s = p.sum(axis=1)
        h = np.log(s) + beta * (d0 * p).sum(axis=1) / s
        return p / s[:, None], h

    p, h = weights(beta)
    for _ in range(n_iter):
        diff = h - target
        if np.all(np.abs(diff) < tol):
            break
        up = diff > 0  # entropy too high: sharpen
        lo = np.where(up, beta, lo)
        hi = np.where(up, hi, beta)
        beta = np.where(up, np.where(np.isfinite(hi), (beta + hi) / 2, beta * 2),
                        np.where(np.isfinite(lo), (beta + lo) / 2, beta / 2))
        p, h = weights(beta)
    n_groups = int(groups.max()) + 1
    flat = (np.arange(n)[:, None] * n_groups + groups[idx]).ravel()
    per_group = np.bincount(flat, weights=p.ravel(), minlength=n * n_groups).reshape(n, n_groups)
    out = 1.0 / (per_group**2).sum(axis=1)
    # every neighbour at distance 0: which ones the search returned is arbitrary, so their
    # labels say nothing about mixing
    return np.where(dist[:, -1] > 0, out, np.nan)


def ilisi(x: np.ndarray, labels: Labels, *, perplexity: float = LISI_PERPLEXITY,
          max_cells: int = LISI_MAX_CELLS, n_pcs: int = LISI_PCS, seed: int = 0) -> dict:
    """Mean batch LISI of ``x [n, d]`` (one row per cell of ``labels``, any float dtype;
    :func:`check_embedding`) on up to ``max_cells`` random cells, in the top ``n_pcs`` PCs.
    Returns ``{"ilisi": 1..n_batches, "ilisi_norm": % of the way from 1 to n_batches}``, NaN
    without two batches or when every cell's neighbours coincide.

    Raises:
        ValueError: a bad ``x``.
    """
    x = check_embedding(x, labels)
    if labels.batch is None or labels.n_batches < 2:
        return {"ilisi": np.nan, "ilisi_norm": np.nan}
    rows = np.arange(len(x))
    if len(rows) > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
    xs = np.asarray(x[rows], dtype=np.float64)
    if xs.shape[1] > n_pcs:
        xs = make_pca(n_pcs, xs.shape, seed).fit_transform(xs)
    per_cell = lisi(xs, labels.batch[rows], perplexity=perplexity)
    defined = np.isfinite(per_cell)
    if not defined.any():
        warnings.warn("ilisi: every cell's neighbours sit at its own position (a collapsed "
                      "embedding): batch mixing is undefined", stacklevel=2)
        return {"ilisi": np.nan, "ilisi_norm": np.nan}
    score = float(per_cell[defined].mean())
    return {"ilisi": score, "ilisi_norm": 100.0 * (score - 1.0) / (labels.n_batches - 1)}


# ----------------------------------------------------------------------------- runner

@dataclasses.dataclass
class BenchmarkOptions:
    metrics: tuple[str, ...] = METRICS
    postprocessing: tuple[str, ...] = POSTPROCESSING
    min_cells: int = MIN_CELLS
    pcst_pcs: int = PCST_PCS
    pcst_null_cells: int = PCST_NULL_CELLS
    pcst_null_draws: int = PCST_NULL_DRAWS
    knn_k: int = KNN_K
    lisi_perplexity: float = LISI_PERPLEXITY
    lisi_max_cells: int = LISI_MAX_CELLS
    seed: int = 0


AVERAGE_OF = ("pcst", "lin_top1", "lin_top5", "knn_top1", "knn_top5", "bmdb", "ilisi_norm")


def evaluate_embedding(x: np.ndarray, labels: Labels, databases=(), *,
                       symbols: np.ndarray | None = None,
                       options: BenchmarkOptions | None = None,
                       by_perturbation: dict | None = None) -> pd.DataFrame:
    """Every metric under every post-processing for one embedding; one row per method.

    ``by_perturbation``: a dict that receives, for each post-processing, the
    :func:`perturbation_table` of the same run (which perturbations the embedding retrieves;
    the metrics are computed once for both).
    """
    options = options or BenchmarkOptions()
    x = check_embedding(x, labels)
    rows = []
    for method in options.postprocessing:
        row: dict = {"postprocess": method}
        try:
            y = postprocess(x, labels, method)
        except ValueError as err:
            warnings.warn(f"post-processing {method} skipped: {err}", stacklevel=2)
            continue
        pcst = lin = knn = None
        if "pcst" in options.metrics:
            row["pcst"], pcst = perturbation_consistency(
                y, labels, n_pcs=options.pcst_pcs, null_cells=options.pcst_null_cells,
                n_null=options.pcst_null_draws, min_cells=options.min_cells, seed=options.seed)
        if "lin" in options.metrics:
            lin = _probe_hits(y, labels, seed=options.seed)
            row.update(_rates("lin", lin))
        if "knn" in options.metrics:
            knn = _knn_hits(y, labels, k=options.knn_k, seed=options.seed)
            row.update(_rates("knn", knn))
        if by_perturbation is not None:
            by_perturbation[method] = perturbation_table(labels, pcst=pcst, lin=lin, knn=knn)
        if "bmdb" in options.metrics and databases:
            row.update(perturbation_relationship_recall(y, labels, databases, symbols=symbols))
        if "ilisi" in options.metrics:
            row.update(ilisi(y, labels, perplexity=options.lisi_perplexity,
                             max_cells=options.lisi_max_cells, seed=options.seed))
        vals = [row[k] for k in AVERAGE_OF if k in row and np.isfinite(row[k])]
        row["average"] = float(np.mean(vals)) if vals else np.nan
        rows.append(row)
    if not rows:
        raise ValueError("every post-processing failed; see the warnings above")
    return pd.DataFrame(rows)


def perturbation_table(labels: Labels, *, pcst: pd.DataFrame | None = None,
                       lin: tuple | None = None, knn: tuple | None = None) -> pd.DataFrame:
    """One row per perturbation (the control left out), in label order: ``perturbation``,
    ``n_cells``; ``lin_cells`` and ``knn_cells``, its held-out cells that the probe and the
    retrieval scored (every cell with batches; about a fifth without); ``lin_top1``,
    ``lin_top5``, ``knn_top1``, ``knn_top5`` (%, over those cells; NaN where there are none, or
    the metric was not computed); ``pcst_p_value`` and ``consistent``
    (:func:`perturbation_consistency`'s table; NaN and missing for a perturbation with fewer
    than ``min_cells`` cells). ``lin`` and ``knn`` are the ``(rows, top-1 hits, top-5 hits)``
    of the probe and the retrieval. Each metric of the benchmark is the mean of its column
    weighted by ``lin_cells`` or ``knn_cells`` (p.cst: the share of ``consistent``), so the
    table says which perturbations make up a score."""
    perts = np.array([p for p in range(len(labels.pert_names)) if p != labels.control],
                     dtype=np.int64)
    names = labels.pert_names[perts]
    out = pd.DataFrame({"perturbation": names,
                        "n_cells": np.bincount(labels.pert, minlength=len(labels.pert_names))
                        [perts]})
    n_labels = len(labels.pert_names)
    for metric, hits in (("lin", lin), ("knn", knn)):
        code = labels.pert[hits[0]] if hits is not None else np.zeros(0, np.int64)
        n = np.bincount(code, minlength=n_labels)[perts]
        out[f"{metric}_cells"] = n
        for j, k in ((1, 1), (2, 5)):
            col = np.full(len(perts), np.nan)
            if hits is not None:
                got = np.bincount(code, weights=hits[j], minlength=n_labels)[perts]
                col = np.where(n > 0, 100.0 * got / np.maximum(n, 1), np.nan)
            out[f"{metric}_top{k}"] = col
    out["pcst_p_value"] = np.nan
    out["consistent"] = pd.array([pd.NA] * len(perts), dtype="boolean")
    if pcst is not None and len(pcst):
        where = pd.Series(np.arange(len(perts)), index=names)
        at = where.loc[pcst["perturbation"].to_numpy()].to_numpy()
        out.loc[at, "pcst_p_value"] = pcst["p_value"].to_numpy()
        out.loc[at, "consistent"] = pcst["consistent"].to_numpy(dtype=bool)
    return out


def best_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Per embedding, the post-processing with the highest ``average`` (the first one where
    no average could be computed)."""
    score = table["average"].astype(float).fillna(-np.inf)
    best = table.loc[score.groupby(table["embedding"], sort=False).idxmax()]
    return best.reset_index(drop=True)
