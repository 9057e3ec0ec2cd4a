"""Baselines fit on a training corpus and applied to a screen (the paper's "PCA (1.4M
samples)", arXiv:2605.31562 §6), and the oracle ceiling for K shown genes (txfm.eval.oracle).
References are independent: numpy/sklearn in float64, draws from the sampler's own keying."""
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

pytest.importorskip("anndata", reason="txfm.data / txfm.eval need anndata: pip install anndata zarr")
pytest.importorskip("zarr", reason="txfm.data / txfm.eval need zarr: pip install anndata zarr")

from txfm.eval.baselines import (  # noqa: E402
    Reference,
    align_to_reference,
    expression_baselines,
    read_reference,
)
from txfm.eval.oracle import oracle_embedding, oracle_embeddings  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_blas_thread")
L = 1e4


def _lib_log64(x) -> np.ndarray:
    """Lib+Log in float64, each cell divided by its total over every column."""
    x = np.asarray(x.todense() if sp.issparse(x) else x, dtype=np.float64)
    tot = x.sum(1, keepdims=True)
    return np.log1p(L * x / np.where(tot > 0, tot, 1.0))


def _low_rank_counts(rng, n, g, rank=4, shift=0.0):
    """Poisson counts around a rank-``rank`` log-mean with well-separated component scales."""
    lat = rng.normal(size=(n, rank)) * np.array([3.0, 2.2, 1.6, 1.2][:rank]) + shift
    load = rng.normal(size=(rank, g)) / np.sqrt(g) * 4
    return sp.csr_matrix(rng.poisson(np.exp(1.5 + lat @ load * 0.5)).astype(np.float32))


def _align_signs(got, ref):
    """Flip each column of ``got`` to the sign of ``ref`` (PCA axes are defined up to sign)."""
    return got * np.sign((got * ref).sum(0, keepdims=True))


# ----------------------------------------------------------------------------- corpus fit

def test_pca_corpus_is_sklearn_fit_on_the_reference_and_applied_to_the_screen():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    ref = _low_rank_counts(rng, 400, 60)
    screen = _low_rank_counts(rng, 150, 60, shift=0.4)
    genes = np.ones(60, dtype=bool)
    genes[[3, 17, 41]] = False  # counted in each cell's total, but not fit on
    out, notes = expression_baselines(screen, ("pca",), target_sum=L, pca_components=4,
                                      reference=ref, genes=genes)
    assert list(out) == ["pca_corpus"] and not notes
    r, s = _lib_log64(ref)[:, genes], _lib_log64(screen)[:, genes]
    want = PCA(4, svd_solver="full").fit(r).transform(s)
    got = out["pca_corpus"]
    assert got.shape == (150, 4) and got.dtype == np.float32
    np.testing.assert_allclose(_align_signs(got, want), want, atol=2e-3 * np.abs(want).max())
    # not the PCA of the screen itself: centred on the reference's means, not the screen's
    assert np.abs(got.mean(0)).max() > 0.1 * got.std(0).max()
    own, _ = expression_baselines(screen, ("pca",), target_sum=L, pca_components=4,
                                  genes=genes)
    assert np.abs(own["pca"].mean(0)).max() < 1e-4 * own["pca"].std(0).max()


def test_hvg_corpus_keeps_the_genes_variable_in_the_reference():
    rng = np.random.default_rng(1)
    n, g = 500, 200
    mean = np.exp(rng.uniform(0.5, 2.5, g))

    def counts(variable):
        mu = np.tile(mean, (n, 1))
        mu[:, variable] *= rng.gamma(0.5, 2.0, (n, len(variable)))  # overdispersed genes
        return sp.csr_matrix(rng.poisson(mu).astype(np.float32))

    ref_var, screen_var = np.arange(0, 200, 20), np.arange(7, 200, 20)
    ref, screen = counts(ref_var), counts(screen_var)
    out, _ = expression_baselines(screen, ("liblog_hvg10",), target_sum=L, reference=ref)
    own, _ = expression_baselines(screen, ("liblog_hvg10",), target_sum=L)
    s = _lib_log64(screen)

    def columns(got):
        """Which screen genes the baseline's columns are (each must be one, exactly)."""
        err = np.abs(got[:, :, None] - s[:, None, :]).max(0)  # [kept, genes]
        assert (err.min(1) < 1e-5).all()
        return set(err.argmin(1).tolist())

    from_ref, from_screen = columns(out["liblog_hvg10_corpus"]), columns(own["liblog_hvg10"])
    # Seurat's z-scoring within mean bins may swap a planted gene for a bin neighbour
    assert len(from_ref & set(ref_var)) >= 8 and not from_ref & set(screen_var)
    assert len(from_screen & set(screen_var)) >= 8 and not from_screen & set(ref_var)


def test_corpus_fit_refuses_what_it_cannot_do():
    rng = np.random.default_rng(2)
    a, b = _low_rank_counts(rng, 30, 20), _low_rank_counts(rng, 30, 21)
    with pytest.raises(ValueError, match="same gene columns"):
        expression_baselines(a, ("pca",), reference=b)
    with pytest.raises(ValueError, match="fits nothing"):
        expression_baselines(a, ("raw",), reference=a)
    with pytest.raises(ValueError, match="no column"):
        expression_baselines(a, ("pca",), reference=a, genes=np.zeros(20, bool))
    out, notes = expression_baselines(a, ("liblog_hvg5000", "pca"), reference=a, genes=np.r_[0:10])
    assert list(out) == ["pca_corpus"] and "only 10 genes" in notes[0]
    assert "pca_corpus: 10 components, not 128" in notes[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from txfm.data.convert import convert
    from txfm.data.synth import generate

    root = tmp_path_factory.mktemp("corpus")
    synth = generate(root / "raw", cells=700, genes=220, perturbations=6, batches=2, seed=3)
    convert(synth.datasets, root / "shards", min_cells=5, min_genes=20, val_fraction=0.05,
            shard_cells=200, progress=False, log=lambda s: None)
    return synth, root / "shards"


def test_read_reference_samples_training_cells_of_the_shards(corpus):
    from _shards import read_shards

    _, shards = corpus
    m, x, _ = read_shards(shards)
    n_train = m.n_split_cells("train")
    ref = read_reference(shards, max_cells=250, seed=5)
    assert ref.counts.shape == (250, m.n_genes) and ref.genes == m.gene_ids
    train = {x[i].toarray().tobytes(): i for i in range(n_train)}
    rows = [train.get(ref.counts[i].toarray().astype(x.dtype).tobytes()) for i in range(250)]
    assert None not in rows and len(set(rows)) == 250  # distinct training cells
    assert rows != sorted(rows)  # a random subset, not the first cells
    again = read_reference(shards, max_cells=250, seed=5)
    assert (again.counts != ref.counts).nnz == 0
    assert (read_reference(shards, max_cells=250, seed=6).counts != ref.counts).nnz > 0
    both = np.zeros(m.n_genes, bool)
    both[np.intersect1d(m.datasets[0].observable, m.datasets[1].observable)] = True
    np.testing.assert_array_equal(ref.profiled, both)  # both datasets are in 250 cells
    assert read_reference(shards, max_cells=10**6).counts.shape[0] == n_train


def test_align_to_reference_moves_genes_as_embed_does():
    rng = np.random.default_rng(4)
    vocab = [f"G{i}" for i in range(10)]
    profiled = np.ones(10, bool)
    profiled[2] = False
    ref = Reference(sp.csr_matrix((3, 10), dtype=np.float32), vocab, None, profiled, "test")
    var = pd.DataFrame(index=["G7", "X1", "G2", "G0", "G5"])
    x = sp.csr_matrix(rng.poisson(3, (4, 5)).astype(np.float32))
    moved, observable, shared, match = align_to_reference(var, x, ref)
    want = np.zeros((4, 10), np.float32)
    want[:, [7, 2, 0, 5]] = x.toarray()[:, [0, 2, 3, 4]]
    np.testing.assert_array_equal(moved.toarray(), want)
    np.testing.assert_array_equal(np.flatnonzero(observable), [0, 2, 5, 7])
    np.testing.assert_array_equal(np.flatnonzero(shared), [0, 5, 7])
    assert match.n_mapped == 4
    with pytest.raises(ValueError, match="no gene of the screen is among the genes of the "
                                         "reference test.*gene-table"):
        align_to_reference(pd.DataFrame(index=["A", "B"]), x[:, :2], ref)


# ----------------------------------------------------------------------------- oracle

def test_oracle_with_every_gene_shown_is_the_pca_embedding():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(5)
    x = _low_rank_counts(rng, 200, 40)
    pca = PCA(6, svd_solver="full").fit(_lib_log64(x))
    want = pca.transform(_lib_log64(x))
    for k in (40, 1000):
        got = oracle_embedding(x, k, 6, ridge=0.0, target_sum=L)
        np.testing.assert_allclose(_align_signs(got, want), want, atol=1e-3 * np.abs(want).max())
    # the default prior shrinks component j by lambda_j / (lambda_j + sigma^2)
    ev = pca.explained_variance_
    shrunk = want * ev / (ev + pca.noise_variance_)
    got = oracle_embedding(x, 40, 6, target_sum=L)
    np.testing.assert_allclose(_align_signs(got, shrunk), shrunk, atol=1e-3 * np.abs(want).max())
    assert (ev / (ev + pca.noise_variance_)).min() < 0.95  # the check can tell the difference


@pytest.mark.parametrize("k, ridge", [(7, 0.3), (29, 0.3), (7, None), (29, None)])
def test_oracle_is_the_ridge_solve_on_the_genes_the_sampler_shows(k, ridge):
    """K below half the genes (gathered) and above (complement); scalar ridge and the prior."""
    import torch
    from sklearn.decomposition import PCA

    import txfm_kernels

    rng = np.random.default_rng(6)
    x = _low_rank_counts(rng, 150, 40)  # 150 cells: 3 sampler blocks of 64, the last partial
    observable = np.ones(40, bool)
    observable[[1, 9, 30]] = False
    cols = np.flatnonzero(observable)
    c, seed = 5, 11
    got = oracle_embedding(x, k, c, seed=seed, ridge=ridge, observable=observable,
                           target_sum=L)

    pca = PCA(c, svd_solver="full").fit(_lib_log64(x)[:, cols])
    penalty = np.diag(np.full(c, ridge) if ridge is not None else
                      pca.noise_variance_ / pca.explained_variance_)
    w = np.zeros((40, c))
    w[cols] = pca.components_.T
    mu = np.zeros(40)
    mu[cols] = pca.mean_
    xl = _lib_log64(x)
    obs = txfm_kernels.ObservableGenes.from_mask(torch.as_tensor(observable))
    want = np.zeros((150, c))
    for block, b0 in enumerate(range(0, 150, 64)):  # txfm embed's keying: block = offset
        sub = x[b0:b0 + 64]
        s = txfm_kernels.masked_sample(torch.as_tensor(sub.indptr.astype(np.int64)),
                                       torch.as_tensor(sub.indices.astype(np.int32)),
                                       torch.as_tensor(sub.data), n_genes=40, k=k,
                                       observable=obs,
                                       dataset_ids=torch.zeros(sub.shape[0], dtype=torch.int32),
                                       target_sum=L, seed=seed, offset=block,
                                       return_target=False)
        for i, ids in enumerate(s.gene_ids.numpy()):
            assert len(set(ids)) == k and observable[ids].all()
            ws, ys = w[ids], xl[b0 + i, ids] - mu[ids]
            want[b0 + i] = np.linalg.solve(ws.T @ ws + penalty, ws.T @ ys)
    np.testing.assert_allclose(_align_signs(got, want), want, atol=2e-3 * np.abs(want).max())
    if ridge is None:  # several K share one PCA fit and give the same as one K at a time
        both = oracle_embeddings(x, [k, 40], c, seed=seed, observable=observable,
                                 target_sum=L)
        np.testing.assert_array_equal(both[k], got)


def test_oracle_errors_are_clear():
    x = _low_rank_counts(np.random.default_rng(7), 100, 30)
    with pytest.raises(ValueError, match="singular"):
        oracle_embedding(x, 3, 10, ridge=0.0)
    assert oracle_embedding(x, 3, 10).shape == (100, 10)  # the default prior penalises
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="k .*>= 1"):
            oracle_embedding(x, bad, 4)
    with pytest.raises(ValueError, match="ridge"):
        oracle_embedding(x, 5, 4, ridge=-1.0)
    with pytest.raises(ValueError, match="observable"):
        oracle_embedding(x, 5, 4, observable=np.ones(29, bool))


# ----------------------------------------------------------------------------- CLI

def test_cli_adds_corpus_and_oracle_rows(corpus, tmp_path, capsys):
    from txfm.cli import main

    synth, shards = corpus
    out = tmp_path / "pert"
    rc = main(["eval", "perturbation", "--embeddings", str(synth.datasets[0]),
               "--perturbation-key", "perturbation", "--batch-key", "batch",
               "--baselines", "pca,liblog_hvg100", "--fit-on", str(shards), "--fit-cells", "300",
               "--oracle-k", "16,1000", "--pca-components", "16", "--metrics", "pcst,lin,knn",
               "--postprocess", "none,center", "--pcst-null-draws", "100", "--out", str(out),
               "--no-progress", "--threads", "1"])
    cap = capsys.readouterr()
    printed = cap.err  # lines about the work go to stderr
    assert rc == 0, cap.out + cap.err
    assert "300 of" in printed and "genes both profile" in printed
    best = pd.read_csv(out / "perturbation.csv").set_index("embedding")
    assert list(best.index) == ["pca", "liblog_hvg100", "pca_corpus", "liblog_hvg100_corpus",
                                "oracle_k16", "oracle_k1000"]
    assert best.loc[["pca", "pca_corpus", "oracle_k16", "oracle_k1000"], "dims"].eq(16).all()
    assert best.loc["liblog_hvg100_corpus", "dims"] == 100
    for col in ("pcst", "lin_top1", "knn_top1", "average"):
        assert best[col].between(0, 100).all(), col
    # every gene shown: the oracle is the PCA of the screen, so it scores like the pca row
    assert abs(best.loc["oracle_k1000", "lin_top1"] - best.loc["pca", "lin_top1"]) < 10

    # an .h5ad corpus works too (the atlas as the training corpus)
    rc = main(["eval", "perturbation", "--embeddings", str(synth.datasets[0]),
               "--perturbation-key", "perturbation", "--baselines", "pca",
               "--fit-on", str(synth.datasets[1]), "--metrics", "lin",
               "--postprocess", "none", "--out", str(tmp_path / "p2"), "--no-progress"])
    assert rc == 0
    assert list(pd.read_csv(tmp_path / "p2" / "perturbation.csv").embedding) == \
        ["pca", "pca_corpus"]


@pytest.mark.parametrize("extra, needle", [
    (["--fit-on", "{tmp}/nowhere"], "--fit-on"),
    (["--fit-on", "{tmp}"], "--fit-on"),
    (["--fit-on", "{shards}", "--fit-cells", "1"], "--fit-cells"),
    (["--oracle-k", "0"], "--oracle-k"),
    (["--oracle-k", "12,x"], "--oracle-k"),
])
def test_cli_errors_name_the_option(corpus, tmp_path, capsys, extra, needle):
    from txfm.cli import main

    synth, shards = corpus
    argv = ["eval", "perturbation", "--embeddings", str(synth.datasets[0]),
            "--perturbation-key", "perturbation", "--baselines", "pca", "--metrics", "lin",
            "--out", str(tmp_path / "o"), "--no-progress",
            *[a.format(tmp=tmp_path, shards=shards) for a in extra]]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert "error:" in err[-1] and needle in err[-1], err
    assert not (tmp_path / "o").exists()


def test_lib_log_and_embed_counts_refuse_a_bad_target_sum():
    import scipy.sparse as sp

    from txfm.eval.baselines import lib_log

    m = sp.csr_matrix(np.array([[1.0, 2.0], [0.0, 3.0]]))
    for bad in (-1, 0, float("nan"), float("inf"), "1e4", True):
        with pytest.raises(ValueError, match="target_sum must be a finite number > 0"):
            lib_log(m, bad)
    np.testing.assert_allclose(lib_log(m, 10.0).toarray(),
                               np.log1p(10.0 * m.toarray() / m.sum(1).A))


def test_lib_log_where_target_sum_over_the_library_exceeds_fp32():
    """Tiny float counts (L / S beyond fp32): log1p(L c / S) as the sampler forms it, not inf;
    an ordinary row beside it is untouched (reference: the formula in float64)."""
    from txfm.eval.baselines import lib_log

    m = sp.csr_matrix(np.array([[1e-40, 3e-40, 0.0], [1.0, 3.0, 0.0]], dtype=np.float32))
    got = lib_log(m, 1e5).toarray()
    c = m.toarray().astype(np.float64)  # the stored values (1e-40 is an fp32 subnormal)
    np.testing.assert_allclose(got, np.log1p(1e5 * c / c.sum(1, keepdims=True)), rtol=2e-7)
    assert np.isfinite(got).all()
