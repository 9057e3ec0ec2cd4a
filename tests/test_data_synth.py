"""Synthetic data: reproducible, well-formed AnnData, ground truth that matches the counts."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("anndata", reason="txfm.data / txfm.eval need anndata: pip install anndata zarr")
pytest.importorskip("zarr", reason="txfm.data / txfm.eval need zarr: pip install anndata zarr")

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from txfm.data.synth import generate


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn"), cells=2400, genes=500, perturbations=12,
                    batches=2, bulk=10, seed=11)


def load(path):
    return ad.read_h5ad(path)


def test_files_and_format(synth):
    assert [p.name for p in synth.datasets] == ["screen.h5ad", "atlas.h5ad", "bulk.h5ad"]
    params = json.loads(synth.params.read_text())
    assert params["seed"] == 11 and params["cells"] == 2400
    subsets = []
    for p in synth.datasets:
        a = load(p)
        assert isinstance(a.X, sp.csr_matrix) and a.X.dtype == np.int32
        assert a.X.nnz and a.X.data.min() > 0
        assert {"cell_type", "perturbation", "batch", "dataset"} <= set(a.obs.columns)
        assert (a.obs["dataset"] == p.stem).all()
        assert all(v.startswith("ENSG9") and len(v) == 15 for v in a.var_names)
        assert "symbol" in a.var and a.var["symbol"].str.startswith("SYN").all()
        assert a.uns["modality"] == ("bulk" if p.stem == "bulk" else "single-cell")
        subsets.append(set(a.var_names))
    screen, atlas, bulk = subsets
    # different, overlapping gene subsets
    assert screen != atlas and screen & atlas and (screen - atlas) and (atlas - screen)
    assert load(synth.datasets[2]).X.max() > 65535  # deep bulk samples


def test_sparse_index_dtypes_agree_so_scipy_can_use_the_matrix(synth, tmp_path, monkeypatch):
    """A CSR whose indptr and indices differ in dtype fails in scipy's tocoo/multiply (and so
    in scanpy's normalize_total); past 2^31 - 1 non-zeros both must be int64."""
    import txfm.data.synth as synth_mod

    for p in synth.datasets:
        x = load(p).X
        assert x.indptr.dtype == x.indices.dtype == np.int32
        scaled = x.multiply(1.0 / np.asarray(x.sum(axis=1)).clip(1)).tocsr()  # normalize_total
        assert scaled.tocoo().nnz == x.nnz
    small = dict(cells=60, genes=120, perturbations=2, batches=2, bulk=0, seed=3)
    narrow = [load(p).X for p in generate(tmp_path / "narrow", **small).datasets]
    monkeypatch.setattr(synth_mod, "_INT32_MAX", 100)  # the int64 path, on a small file
    wide = [load(p).X for p in generate(tmp_path / "wide", **small).datasets]
    for n, w in zip(narrow, wide):
        assert w.nnz > 100 and w.indptr.dtype == w.indices.dtype == np.int64
        assert n.indptr.dtype == n.indices.dtype == np.int32
        assert w.tocoo().nnz == w.nnz and (n != w).nnz == 0  # the same counts either way


def test_deterministic(synth, tmp_path):
    again = generate(tmp_path / "again", cells=2400, genes=500, perturbations=12, batches=2,
                     bulk=10, seed=11)
    other = generate(tmp_path / "other", cells=2400, genes=500, perturbations=12, batches=2,
                     bulk=10, seed=12)
    a, b, c = (load(r.datasets[0]) for r in (synth, again, other))
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    assert a.X.shape != c.X.shape or (a.X != c.X).nnz > 0
    assert synth.relationships.read_text() == again.relationships.read_text()


def test_truth_files(synth):
    programs = pd.read_csv(synth.programs, sep="\t", keep_default_na=False)
    assert list(programs.columns[:3]) == ["gene_id", "symbol", "program"]
    rel = pd.read_csv(synth.relationships)
    assert list(rel.columns) == ["entity1", "entity2"]
    prog = dict(zip(programs.symbol, programs.program))
    assert len(rel) > 100 and all(prog[a] == prog[b] != "" for a, b in rel.itertuples(index=False))
    sizes = programs[programs.program != ""].groupby("program").size()
    assert len(rel) == int((sizes * (sizes - 1) // 2).sum())  # every within-program pair once
    pert = pd.read_csv(synth.perturbations, sep="\t")
    screen = load(synth.datasets[0])
    labels = set(screen.obs["perturbation"].astype(str))
    assert set(pert.target) | {"non-targeting"} == labels
    assert set(pert.target_id) <= set(screen.var_names)  # every target is measured
    assert (pert.program.map(sizes) > 0).all()


def _lognorm(a):
    x = sp.csr_matrix(a.X, dtype=np.float64)
    x = sp.diags(1e4 / np.maximum(x.sum(1).A1, 1)) @ x
    x.data = np.log1p(x.data)
    return x.toarray()


def test_perturbations_knock_down_and_move_programs(synth):
    screen = load(synth.datasets[0])
    pert = pd.read_csv(synth.perturbations, sep="\t")
    programs = pd.read_csv(synth.programs, sep="\t", keep_default_na=False)
    x = _lognorm(screen)
    col = {g: i for i, g in enumerate(screen.var_names)}
    labels = screen.obs["perturbation"].astype(str).to_numpy()
    ctrl = labels == "non-targeting"
    down, moved = 0, 0
    for t in pert.itertuples():
        cells = labels == t.target
        if cells.sum() < 20:
            continue
        down += x[cells, col[t.target_id]].mean() < x[ctrl, col[t.target_id]].mean()
        members = [col[g] for g in programs.gene_id[(programs.program == t.program)
                                                     & (programs.gene_id != t.target_id)] if g in col]
        shift = x[cells][:, members].mean() - x[ctrl][:, members].mean()
        moved += np.sign(shift) == np.sign(t.program_shift)
    n = int((pd.Series(labels).value_counts()[pert.target] >= 20).sum())
    assert n >= 8 and down == n and moved >= n - 1


def test_programs_co_vary(synth):
    atlas = load(synth.datasets[1])
    programs = pd.read_csv(synth.programs, sep="\t", keep_default_na=False).set_index("gene_id")
    x = _lognorm(atlas)
    genes = np.asarray(atlas.var_names)
    prog = programs.loc[genes, "program"].to_numpy()
    expressed = x.mean(0) > 0.3
    c = np.corrcoef(x[:, expressed].T)
    p = prog[expressed]
    same = (p[:, None] == p[None, :]) & (p[:, None] != "")
    np.fill_diagonal(same, False)
    other = ~same & (p[:, None] != p[None, :])
    assert np.nanmean(c[same]) > np.nanmean(c[other]) + 0.1


def _batch_spread(result) -> float:
    """Mean over genes of the sd across batches of the screen's per-batch mean log-expression."""
    a = load(result.datasets[0])
    x = _lognorm(a)
    batches = a.obs["batch"].astype(str).to_numpy()
    means = np.stack([x[batches == b].mean(0) for b in np.unique(batches)])
    return float(means.std(0).mean())


def test_batch_effect_sets_the_batch_shifts(tmp_path):
    kw = dict(cells=1500, genes=120, perturbations=4, batches=3, bulk=0, seed=3)
    default = _batch_spread(generate(tmp_path / "default", **kw))
    none = _batch_spread(generate(tmp_path / "none", batch_effect=(0.0, 0.0), **kw))
    strong = _batch_spread(generate(tmp_path / "strong", batch_effect=(0.75, 0.3), **kw))
    # without batch effects only sampling noise separates batch means
    assert none < 0.6 * default < 0.6 * strong
    for bad in [(0.1,), (-0.1, 0.3), (float("nan"), 0.3)]:
        with pytest.raises(ValueError, match="batch_effect"):
            generate(tmp_path / "bad", batch_effect=bad, **kw)
