"""Perturbation benchmark: each metric against a direct (loop) computation, its behaviour on
synthetic ground truth (true effects vs shuffled labels), the post-processing methods, the
Papalexi 2021 ECCITE-seq subset with the baselines, and the CLI's errors."""
import warnings

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("anndata", reason="txfm.data / txfm.eval need anndata: pip install anndata zarr")
pytest.importorskip("zarr", reason="txfm.data / txfm.eval need zarr: pip install anndata zarr")

from txfm.eval.perturbation import (
    BenchmarkOptions,
    Labels,
    _loo_cosine,
    evaluate_embedding,
    ilisi,
    knn_retrieval,
    linear_probe,
    lisi,
    perturbation_consistency,
    postprocess,
)
from txfm.eval.sanity import truth_effect_embedding


pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _labels(n_perts=6, cells=40, batches=2, ctrl_cells=60, seed=0):
    rng = np.random.default_rng(seed)
    pert = np.concatenate([np.repeat([f"G{i}" for i in range(n_perts)], cells),
                           np.repeat(["non-targeting"], ctrl_cells)])
    batch = rng.integers(0, batches, len(pert)).astype(str)
    return Labels.build(pert, "non-targeting", batch), rng


def test_loo_cosine_matches_a_loop():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(7, 5)) + 0.5
    s = v.sum(0)
    fast = _loo_cosine(v @ s, (v**2).sum(1), s @ s)
    slow = np.mean([np.dot(v[i], s - v[i]) / np.linalg.norm(v[i]) / np.linalg.norm(s - v[i])
                    for i in range(len(v))])
    assert fast == pytest.approx(slow, rel=1e-10)


def test_pcst_separates_consistent_from_random_perturbations():
    labels, rng = _labels(n_perts=8, cells=30)
    x = rng.normal(size=(len(labels.pert), 16))
    consistent = [1, 3, 5]  # these perturbations share a direction; the others are noise
    for p in consistent:
        rows = labels.pert == np.flatnonzero(labels.pert_names == f"G{p}")[0]
        x[rows] += rng.normal(size=16) * 1.5
    score, table = perturbation_consistency(x, labels, n_null=500)
    got = set(table.perturbation[table.consistent])
    assert got == {f"G{p}" for p in consistent}
    assert score == pytest.approx(100 * 3 / 8)
    assert table.p_value.between(1 / 501, 1).all()


def test_pcst_leaves_out_a_perturbation_of_one_cell_whatever_min_cells_says():
    labels, rng = _labels(n_perts=4, cells=20)
    pert = labels.pert_names[labels.pert].astype(object)
    pert[0] = "G_single"  # one cell: nothing to compare it with
    labels = Labels.build(pert, "non-targeting", labels.batch_names[labels.batch])
    x = rng.normal(size=(len(pert), 8))
    with pytest.warns(UserWarning, match=r"1 perturbations with < 2 cells left out: \['G_single'\]"):
        _, table = perturbation_consistency(x, labels, n_null=200, min_cells=1)
    assert "G_single" not in set(table.perturbation) and len(table) == 4


def test_pcst_is_calibrated_under_the_null():
    labels, rng = _labels(n_perts=40, cells=15, ctrl_cells=80)
    score, table = perturbation_consistency(rng.normal(size=(len(labels.pert), 12)), labels,
                                            n_null=500)
    assert score <= 10.0  # alpha = 1%: ~0.4 of 40 expected
    assert 0.3 < table.p_value.median() < 0.7


def test_pcst_too_few_cells_is_a_clear_error():
    labels, rng = _labels(n_perts=3, cells=2)
    with pytest.raises(ValueError, match="min-cells"):
        perturbation_consistency(rng.normal(size=(len(labels.pert), 4)), labels, min_cells=5)


def _lisi_loop(x, groups, perplexity):
    """Harmony's compute_simpson, one cell at a time (the reference)."""
    from sklearn.neighbors import NearestNeighbors

    k = int(3 * perplexity)
    dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    out = []
    for d, i in zip(dist[:, 1:], idx[:, 1:]):
        d = d - d[0]
        beta, lo, hi = 1.0, -np.inf, np.inf
        for _ in range(50):
            p = np.exp(-d * beta)
            h = np.log(p.sum()) + beta * (d * p).sum() / p.sum()
            p = p / p.sum()
            if abs(h - np.log(perplexity)) < 1e-5:
                break
            if h > np.log(perplexity):
                lo, beta = beta, beta * 2 if np.isinf(hi) else (beta + hi) / 2
            else:
                hi, beta = beta, beta / 2 if np.isinf(lo) else (beta + lo) / 2
        out.append(1 / sum(p[groups[i] == g].sum() ** 2 for g in np.unique(groups)))
    return np.array(out)


def test_lisi_matches_the_per_cell_reference_and_its_extremes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 3))
    groups = rng.integers(0, 3, 150)
    # both stop bisecting once the entropy is within 1e-5 of log(perplexity)
    np.testing.assert_allclose(lisi(x, groups, perplexity=10), _lisi_loop(x, groups, 10),
                               rtol=1e-4)
    # random labels: well mixed (3 minus the finite-neighbourhood shortfall, ~1/perplexity)
    assert lisi(x, groups, perplexity=10).mean() > 2.2
    separated = x + 20.0 * groups[:, None]
    assert lisi(separated, groups, perplexity=10).mean() == pytest.approx(1.0, abs=1e-3)


def test_each_perturbation_s_share_of_the_scores_adds_up_to_them():
    # three perturbations move along their own direction, the others are noise: the table
    # must name those three as the retrieved and consistent ones, and its rows, weighted by
    # the held-out cells, must give back the benchmark's own numbers
    from txfm.eval.perturbation import perturbation_table

    labels, rng = _labels(n_perts=8, cells=30, batches=3)
    x = rng.normal(size=(len(labels.pert), 16))
    planted = {"G1", "G3", "G5"}
    for name in planted:
        x[labels.pert == np.flatnonzero(labels.pert_names == name)[0]] += rng.normal(size=16) * 3
    options = BenchmarkOptions(metrics=("pcst", "lin", "knn"), postprocessing=("none",),
                               pcst_null_draws=500)
    per = {}
    row = evaluate_embedding(x, labels, options=options, by_perturbation=per).iloc[0]
    table = per["none"]
    assert list(table.perturbation) == [f"G{i}" for i in range(8)]  # the control left out
    assert (table.n_cells == 30).all()
    assert (table.lin_cells == 30).all() and (table.knn_cells == 30).all()  # each batch held out
    for metric in ("lin_top1", "lin_top5", "knn_top1", "knn_top5"):
        weights = table[f"{metric[:3]}_cells"]
        assert np.average(table[metric], weights=weights) == pytest.approx(row[metric])
    assert 100 * table.consistent.mean() == pytest.approx(row["pcst"])
    assert set(table.perturbation[table.consistent.astype(bool)]) == planted
    hits = table.set_index("perturbation")
    assert hits.loc[sorted(planted), "knn_top1"].min() > 90
    assert hits.drop(sorted(planted))["knn_top1"].max() < 60
    # the same numbers as the metric functions called on their own
    assert row["knn_top1"] == pytest.approx(knn_retrieval(x, labels)["knn_top1"])
    assert row["lin_top1"] == pytest.approx(linear_probe(x, labels)["lin_top1"])
    # without batches (one random 80/20 split) the held-out cells weigh the rows, not n_cells
    flat = Labels.build(labels.pert_names[labels.pert], "non-targeting")
    per = {}
    row = evaluate_embedding(x, flat, options=options, by_perturbation=per).iloc[0]
    table = per["none"]
    assert table.lin_cells.sum() < 0.35 * table.n_cells.sum()
    for metric in ("lin_top1", "lin_top5", "knn_top1", "knn_top5"):
        scored = table[f"{metric[:3]}_cells"] > 0
        assert np.average(table[metric][scored], weights=table[f"{metric[:3]}_cells"][scored]) \
            == pytest.approx(row[metric])
    # metrics not computed read as missing, and as no cell scored
    empty = perturbation_table(labels)
    assert (empty[["lin_cells", "knn_cells"]] == 0).all().all()
    assert empty.drop(columns=["perturbation", "n_cells", "lin_cells", "knn_cells"]) \
        .isna().all().all()


def test_knn_matches_a_brute_force_weighted_vote():
    labels, rng = _labels(n_perts=5, cells=12, batches=3)
    x = rng.normal(size=(len(labels.pert), 6))
    got = knn_retrieval(x, labels, k=7)
    keep = labels.pert != labels.control
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    hit1 = hit5 = n = 0
    for i in np.flatnonzero(keep):
        ref = np.flatnonzero(keep & (labels.batch != labels.batch[i]))
        sim = xn[ref] @ xn[i]
        top = ref[np.argsort(-sim)[:7]]
        votes = np.zeros(len(labels.pert_names))
        for j in top:
            votes[labels.pert[j]] += np.exp((xn[j] @ xn[i]) / 0.07)
        true = votes[labels.pert[i]]
        hit1 += true > 0 and (votes > true).sum() == 0
        hit5 += true > 0 and (votes > true).sum() < 5
        n += 1
    assert got["knn_top1"] == pytest.approx(100 * hit1 / n)
    assert got["knn_top5"] == pytest.approx(100 * hit5 / n)


def test_postprocessing_centres_and_whitens_on_each_batchs_controls():
    labels, rng = _labels(n_perts=4, cells=30, batches=3, ctrl_cells=200)
    shift = rng.normal(size=(3, 8)) * 5
    scale = rng.uniform(0.5, 3, size=(3, 8))
    x = rng.normal(size=(len(labels.pert), 8)) * scale[labels.batch] + shift[labels.batch]
    ctrl = labels.pert == labels.control
    for b in range(3):
        rows = ctrl & (labels.batch == b)
        np.testing.assert_allclose(postprocess(x, labels, "center")[rows].mean(0), 0, atol=1e-9)
        z = postprocess(x, labels, "standardize")[rows]
        np.testing.assert_allclose(z.std(0), 1, rtol=1e-9)
        t = postprocess(x, labels, "tvn")[rows]
        w = np.linalg.eigvalsh(np.cov(t, rowvar=False))
        assert w.max() < 1.0  # controls whitened: C (C + 0.5 I)^-1 has eigenvalues < 1
    with pytest.raises(ValueError, match="unknown post-processing"):
        postprocess(x, labels, "zscore")


def test_labels_errors_name_the_fix():
    with pytest.raises(ValueError, match="--control"):
        Labels.build(["A", "B"], "non-targeting")


# ----------------------------------------------------------------------------- ground truth

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from txfm.data.synth import generate

    return generate(tmp_path_factory.mktemp("synth_pert"), cells=1500, genes=300,
                    perturbations=12, seed=4)


def test_true_effects_score_high_and_shuffled_labels_score_chance(synth):
    import anndata as ad

    from txfm.eval.relationships import read_pairs

    rng = np.random.default_rng(0)
    obs = ad.read_h5ad(synth.datasets[0]).obs
    x = truth_effect_embedding(obs, pd.read_csv(synth.perturbations, sep="\t"), 0.5, rng)
    pert, batch = obs.perturbation.astype(str).to_numpy(), obs.batch.astype(str).to_numpy()
    dbs = [read_pairs(synth.relationships)]
    opts = BenchmarkOptions(postprocessing=("none", "center"), pcst_null_draws=300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bmdb: fewer than 20 perturbations
        truth = evaluate_embedding(x, Labels.build(pert, "non-targeting", batch), dbs,
                                   options=opts).set_index("postprocess")
        shuffled = evaluate_embedding(x, Labels.build(rng.permutation(pert), "non-targeting",
                                                      batch), dbs,
                                      options=opts).set_index("postprocess")
    chance1, chance5 = 100 / 12, 500 / 12
    best = truth.loc["center"]
    assert best.pcst == 100.0
    assert best.knn_top1 > 60 and best.lin_top1 > 60 and best.knn_top5 > 90
    assert best.bmdb > 40  # same-program targets are the most (anti-)similar pairs
    assert best.ilisi > truth.loc["none"].ilisi + 1.0  # centring removes the batch offsets
    for _, row in shuffled.iterrows():
        assert row.pcst <= 10
        assert abs(row.knn_top1 - chance1) < 6 and abs(row.lin_top1 - chance1) < 6
        assert abs(row.knn_top5 - chance5) < 10 and abs(row.lin_top5 - chance5) < 10


def test_linear_probe_without_batches_uses_a_random_split():
    labels, rng = _labels(n_perts=4, cells=50)
    labels = Labels.build(labels.pert_names[labels.pert], "non-targeting")
    x = rng.normal(size=(len(labels.pert), 5)) + 3 * np.eye(5)[labels.pert % 5]
    assert linear_probe(x, labels)["lin_top1"] > 80
    assert np.isnan(ilisi(x, labels)["ilisi"])


# ----------------------------------------------------------------------------- real data + CLI

PAPALEXI = "perturbseq_papalexi2021_eccite_subset/papalexi2021_subset.h5ad"


def test_papalexi_baselines_through_the_cli(shared_data, tmp_path, capsys):
    from txfm.cli import main

    out = tmp_path / "pert"
    argv = ["eval", "perturbation", "--embeddings", str(shared_data / PAPALEXI),
            "--perturbation-key", "top_grna_target", "--control", "non-targeting",
            "--batch-key", "bio_rep", "--db", str(shared_data / "efaar_benchmark_annotations"),
            "--max-cells", "2000", "--postprocess", "none,standardize",
            "--pcst-null-draws", "200", "--no-progress"]
    rc = main(argv + ["--out", str(out)])
    cap = capsys.readouterr()
    printed = cap.err  # lines about the work; stdout has the benchmark table alone
    assert rc == 0, cap.out + cap.err
    assert "evaluating the baselines alone" in printed
    assert "liblog_hvg1024 left out: only 290 genes" in printed
    assert "left out" not in cap.out and "Perturbation benchmark" in cap.out
    # piped into a reader that stops at once (| head -0): the same tables are saved, quietly
    from _launch import reader_gone

    from txfm.cli import CLOSED_PIPE_STATUS

    code, err = reader_gone(["-m", "txfm", *argv, "--out", str(tmp_path / "piped")])
    assert code == CLOSED_PIPE_STATUS and "Traceback" not in err, err
    for name in ("perturbation.csv", "perturbation_all.csv"):
        assert (tmp_path / "piped" / name).read_text() == (out / name).read_text()
    best = pd.read_csv(out / "perturbation.csv").set_index("embedding")
    assert list(best.index) == ["raw", "liblog", "pca"]
    full = pd.read_csv(out / "perturbation_all.csv")
    assert len(full) == 6 and set(full.postprocess) == {"none", "standardize"}
    n_perts = int(printed.split(" perturbations + ")[0].rsplit(" ", 1)[-1])
    for col in ("pcst", "lin_top1", "lin_top5", "knn_top1", "knn_top5", "bmdb", "average"):
        assert best[col].between(0, 100).all(), col
    assert best.ilisi.between(1, 3).all()
    assert best.bmdb_pairs.min() > 10  # e.g. IFNGR1-IFNGR2, JAK2-IFNGR1, STAT1-IRF1 ...
    # real signal above chance for the expression baselines (top-5 chance ~ 5/26)
    assert best.loc["liblog", "lin_top5"] > 100 * 5 / (n_perts + 1)
    assert (out / "perturbation.png").stat().st_size > 0


def test_cli_errors_are_clear(shared_data, tmp_path, capsys):
    from txfm.cli import main

    base = ["eval", "perturbation", "--embeddings", str(shared_data / PAPALEXI),
            "--out", str(tmp_path), "--no-progress", "--max-cells", "500"]
    assert main(base + ["--perturbation-key", "guide"]) == 2
    assert "top_grna_target" in capsys.readouterr().err  # lists the columns
    assert main(base + ["--perturbation-key", "top_grna_target", "--control", "NT"]) == 2
    assert "non-targeting" in capsys.readouterr().err  # lists frequent labels
    assert main(base + ["--perturbation-key", "top_grna_target", "--min-cells", "100000"]) == 2
    assert "need >= 2 perturbations" in capsys.readouterr().err
    assert main(base + ["--perturbation-key", "top_grna_target", "--obsm-key", "X_none"]) == 2
    assert "X_none" in capsys.readouterr().err
    assert main(base + ["--perturbation-key", "top_grna_target", "--baselines", "none"]) == 2
    assert "no embedding to evaluate" in capsys.readouterr().err


def test_identical_embeddings_score_chance_not_above():
    """Ties in the kNN vote or the probe's scores are broken at random (in expectation): cells
    with one shared embedding (e.g. all cells without counts in the mapped genes) must not
    score above chance, as they did when every tie counted as a hit."""
    from txfm.eval.perturbation import _topk_hits

    scores = np.array([[1.0, 1.0, 1.0, 0.0], [2.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    np.testing.assert_allclose(_topk_hits(scores, np.array([0, 1, 0]), 1), [1 / 3, 0.0, 0.0])
    np.testing.assert_allclose(_topk_hits(scores, np.array([1, 1, 1]), 2), [2 / 3, 0.5, 1.0])
    rng = np.random.default_rng(0)
    n, p = 3000, 20
    labels = Labels.build(np.where(rng.random(n) < 0.1, "ctrl",
                                   rng.integers(0, p, n).astype(str)), "ctrl",
                          rng.integers(0, 3, n))
    got = knn_retrieval(np.ones((n, 8)), labels)
    assert got["knn_top1"] == pytest.approx(100 / p, abs=1.5)
    assert got["knn_top5"] == pytest.approx(500 / p, abs=3.0)
    # Cells in file order by label, a rare label first: neighbours tied at one distance are a
    # random draw of the other batches' cells, not the file's first rows (which would all
    # vote the rare label): the vote follows the labels' shares, whatever the order.
    pert = np.array(["ctrl"] * 100 + ["rare"] * 60 + ["a"] * 420 + ["b"] * 420)
    batch = np.arange(len(pert)) % 3
    order = np.argsort(pert == "rare", kind="stable")[::-1]  # rare first
    for rows in (np.arange(len(pert)), order):
        got = knn_retrieval(np.ones((len(pert), 4)), Labels.build(pert[rows], "ctrl", batch[rows]))
        assert 35 <= got["knn_top1"] <= 55, got  # "a" or "b" wins a vote: 420 / 900 = 47%
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy division warning from a PCA of constants
        out = evaluate_embedding(np.ones((n, 8)), labels, options=BenchmarkOptions(
            metrics=("pcst",), postprocessing=("none",), pcst_null_draws=100))
    assert out["pcst"].iloc[0] <= 10.0


def test_pcst_needs_enough_null_draws_to_reach_alpha():
    from txfm.eval.perturbation import min_null_draws

    assert min_null_draws(0.01) == 100 and 1 / (1 + 100) < 0.01 <= 1 / (1 + 99)
    assert min_null_draws(0.05) == 20
    labels, rng = _labels()
    x = rng.normal(size=(len(labels.pert), 8))
    with pytest.raises(ValueError, match="at least 100"):
        perturbation_consistency(x, labels, n_null=99)


def test_cli_rejects_what_would_score_silently_wrong(synth, tmp_path, capsys):
    import anndata as ad

    from txfm.cli import main

    a = ad.read_h5ad(synth.datasets[0])[:600].copy()
    a.obsm["X_meta"] = pd.DataFrame({"t": ["type_1"] * a.n_obs}, index=a.obs_names)
    a.obsm["X_ok"] = np.random.default_rng(0).normal(size=(a.n_obs, 4)).astype(np.float32)
    a.write_h5ad(tmp_path / "in.h5ad")
    base = ["eval", "perturbation", "--embeddings", str(tmp_path / "in.h5ad"),
            "--perturbation-key", "perturbation", "--batch-key", "batch", "--baselines", "none",
            "--no-progress", "--threads", "1"]
    assert main(base + ["--pcst-null-draws", "99", "--out", str(tmp_path / "a")]) == 2
    assert "--pcst-null-draws 99" in capsys.readouterr().err
    assert main(base + ["--max-cells", "1", "--out", str(tmp_path / "b")]) == 2
    assert "--max-cells 1: the subsample has no" in capsys.readouterr().err
    assert main(base + ["--obsm-key", "X_meta", "--out", str(tmp_path / "c")]) == 2
    assert "--obsm-key X_meta: .obsm['X_meta'] of" in (err := capsys.readouterr().err)
    assert "is not a numeric [rows, dims] matrix" in err
    assert main(base + ["--metrics", "lin", "--postprocess", "none",
                        "--out", str(tmp_path / "d")]) == 0  # X_meta skipped, X_ok scored
    assert "skipping .obsm['X_meta']" in capsys.readouterr().err
    assert list(pd.read_csv(tmp_path / "d" / "perturbation.csv")["embedding"]) == ["X_ok"]
    (tmp_path / "db.txt").write_bytes(b"\x89HDF\r\n\x1a\n\x00\xff")
    assert main(base + ["--db", str(tmp_path / "db.txt"), "--metrics", "bmdb",
                        "--out", str(tmp_path / "e")]) == 2
    assert f"--db {tmp_path / 'db.txt'}: not a UTF-8 text file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- faults of a new user

def test_labels_refuse_missing_labels_and_compare_the_control_as_text():
    with pytest.raises(ValueError, match="2 cells have no perturbation label"):
        Labels.build(np.array(["a", "a", "b", np.nan, "NT", None], dtype=object), "NT")
    with pytest.raises(ValueError, match="1 cells have no batch label"):
        Labels.build(["a", "NT", "b"], "NT", ["x", None, "y"])
    labels = Labels.build(np.array([0, 1, 2, 0]), 0)
    assert labels.pert_names[labels.control] == "0"


def test_a_batch_without_controls_is_normalised_on_its_own_cells_not_skipped():
    labels, rng = _labels(n_perts=4, cells=30, batches=3, ctrl_cells=90)
    batch = labels.batch.copy()
    batch[labels.pert == labels.control] = np.where(batch[labels.pert == labels.control] == 2, 0,
                                                    batch[labels.pert == labels.control])
    labels = Labels.build(labels.pert_names[labels.pert], "non-targeting",
                          np.array(["b0", "b1", "lonely"])[batch])
    x = rng.normal(size=(len(labels.pert), 5)) + 3.0 * (batch == 2)[:, None]
    for method in ("center", "standardize", "tvn"):
        with pytest.warns(UserWarning, match="batch 'lonely' has 0 control cell"):
            y = postprocess(x, labels, method)
        np.testing.assert_allclose(y[batch == 2].mean(0), 0, atol=1e-9) if method != "tvn" \
            else None
    t = evaluate_embedding(x, labels, options=BenchmarkOptions(pcst_null_draws=100))
    assert list(t.postprocess) == ["none", "center", "standardize", "tvn"]


def test_knn_leaves_out_cells_it_cannot_retrieve_as_the_probe_does():
    """A perturbation profiled in one batch only has nothing to be retrieved from in the
    others: its cells are left out as queries (still voting as references), as the probe
    leaves them out, instead of counting as certain misses."""
    labels, rng = _labels(n_perts=5, cells=12, batches=3)
    labels = labels.subset(np.flatnonzero(~((labels.pert == 0) & (labels.batch != 0))))
    x = rng.normal(size=(len(labels.pert), 6))
    got = knn_retrieval(x, labels, k=7)
    keep = labels.pert != labels.control
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    hit1 = n = 0
    for i in np.flatnonzero(keep):
        ref = np.flatnonzero(keep & (labels.batch != labels.batch[i]))
        if labels.pert[i] not in labels.pert[ref]:
            continue
        top = ref[np.argsort(-(xn[ref] @ xn[i]))[:7]]
        votes = np.zeros(len(labels.pert_names))
        for j in top:
            votes[labels.pert[j]] += np.exp((xn[j] @ xn[i]) / 0.07)
        true = votes[labels.pert[i]]
        hit1 += true > 0 and (votes > true).sum() == 0
        n += 1
    assert n < keep.sum() and got["knn_top1"] == pytest.approx(100 * hit1 / n)


def test_a_collapsed_embedding_has_no_batch_mixing_score():
    labels, _ = _labels(n_perts=4, cells=30, batches=3)
    for dims in (4, 64):  # 64: above ilisi's 50 PCs, so a PCA of constants runs first
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = ilisi(np.ones((len(labels.pert), dims)), labels)
        said = [(w.category, str(w.message)) for w in caught]
        assert any("collapsed embedding" in m for _, m in said)
        assert not any(issubclass(c, RuntimeWarning) for c, _ in said), said  # numpy's 0/0
        assert np.isnan(r["ilisi"]) and np.isnan(r["ilisi_norm"])
    t = evaluate_embedding(np.ones((len(labels.pert), 4)), labels,
                           options=BenchmarkOptions(metrics=("ilisi",), postprocessing=("none",)))
    from txfm.eval.perturbation import best_rows

    t.insert(0, "embedding", "flat")
    assert len(best_rows(t)) == 1 and np.isnan(best_rows(t)["average"].iloc[0])


def test_cli_outputs_are_whole_and_metrics_checked_before_work(synth, tmp_path, capsys):
    import anndata as ad
    import scipy.sparse as sp

    from txfm.cli import main

    a = ad.read_h5ad(synth.datasets[0])[:600].copy()
    rng = np.random.default_rng(0)
    a.obsm["X_$\\badcmd$"] = rng.normal(size=(a.n_obs, 4)).astype(np.float32)
    a.obsm["X_sparse"] = sp.csr_matrix(rng.normal(size=(a.n_obs, 3)).astype(np.float32))
    a.obsm["X_empty"] = np.zeros((a.n_obs, 0), np.float32)
    a.write_h5ad(tmp_path / "in.h5ad")
    base = ["eval", "perturbation", "--embeddings", str(tmp_path / "in.h5ad"),
            "--perturbation-key", "perturbation", "--baselines", "none", "--no-progress",
            "--threads", "1", "--out", str(tmp_path / "o")]
    capsys.readouterr()
    assert main(base + ["--metrics", "ilisi"]) == 2  # no --batch-key: nothing to compute
    assert "nothing to compute (ilisi needs --batch-key" in capsys.readouterr().err
    assert main(base + ["--baselines", ","]) == 2
    assert main(base + ["--metrics", "lin,knn", "--postprocess", "none,none",
                        "--batch-key", "batch"]) == 0
    err = capsys.readouterr().err
    assert "skipping .obsm['X_empty'] of" in err and "it has no columns" in err
    table = pd.read_csv(tmp_path / "o" / "perturbation_all.csv")
    assert sorted(table.embedding) == ["X_$\\badcmd$", "X_sparse"]  # once each, none,none
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "perturbation.csv", "perturbation.png", "perturbation_all.csv",
        "perturbation_by_target.csv"]  # no scratch left
    by_target = pd.read_csv(tmp_path / "o" / "perturbation_by_target.csv")
    assert sorted(set(by_target.embedding)) == ["X_$\\badcmd$", "X_sparse"]
    assert by_target.pcst_p_value.isna().all()  # p.cst was not asked for


def test_cli_warns_on_normalised_counts_once_as_one_line(synth, tmp_path, capsys):
    import anndata as ad

    from txfm.cli import main

    a = ad.read_h5ad(synth.datasets[0])[:400].copy()
    a.X = a.X.astype(np.float32)
    a.X.data = np.log1p(a.X.data)
    a.write_h5ad(tmp_path / "log.h5ad")
    capsys.readouterr()
    assert main(["eval", "perturbation", "--embeddings", str(tmp_path / "log.h5ad"),
                 "--perturbation-key", "perturbation", "--batch-key", "batch", "--baselines",
                 "liblog", "--metrics", "lin", "--postprocess", "none", "--no-progress",
                 "--threads", "1", "--out", str(tmp_path / "o")]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "non-integer" in ln]
    assert len(err) == 1 and err[0].startswith("warning: --embeddings"), err
    assert ".X holds non-integer values" in err[0]


def test_metric_functions_name_a_mismatched_or_bad_embedding():
    """Each public metric checks ``x`` against the labels first: a clear error naming the
    shape expected, not a numpy broadcast or index error from deep inside."""
    from txfm.eval.perturbation import (Labels, ilisi, knn_retrieval, linear_probe, lisi,
                                        perturbation_consistency, perturbation_relationship_recall,
                                        postprocess)

    rng = np.random.default_rng(0)
    pert = np.repeat(["ctrl", "a", "b"], 20)
    batch = np.tile(["b0", "b1"], 30)
    with pytest.raises(ValueError, match="batch has 10 labels but perturbation 60"):
        Labels.build(pert, "ctrl", batch[:10])
    labels = Labels.build(pert, "ctrl", batch)
    x = rng.normal(size=(60, 4))
    calls = [lambda y: postprocess(y, labels, "center"),
             lambda y: perturbation_consistency(y, labels, n_null=100),
             lambda y: linear_probe(y, labels), lambda y: knn_retrieval(y, labels),
             lambda y: ilisi(y, labels),
             lambda y: perturbation_relationship_recall(y, labels, [])]
    for call in calls:
        for bad, match in ((x[:50], r"shape \(50, 4\).*expected \[60, dims\]"),
                           (x[:, 0], r"shape \(60,\)"),
                           (np.where(np.eye(60, 4) > 0, np.nan, x), "NaN or inf")):
            with pytest.raises(ValueError, match=match):
                call(bad)
    with pytest.raises(ValueError, match=r"groups must be \[60\] integer labels"):
        lisi(x, batch)
