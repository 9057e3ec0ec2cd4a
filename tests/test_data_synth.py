"""Synthetic data: reproducible, well-formed AnnData, ground truth that matches the counts."""
from __future__ import annotations

import json
from pathlib import Path

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


# ---- the output folder, --programs, the suggested conversion, cell ranges in messages ---------

SMALL = dict(cells=100, genes=100, perturbations=3, batches=1, seed=5)


def _cli(capsys, *args) -> tuple[int, str, str]:
    """``txfm ARGS`` in this process: (exit status, stdout, stderr)."""
    from txfm.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse refusals
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _refused(rc: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _tree(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _interrupt_at(monkeypatch, dataset: str, exc: type[BaseException]):
    import txfm.data.synth as synth_mod

    real = synth_mod._write_dataset

    def write(path, *a, **k):
        if path.name == dataset:
            real(path.with_name("partial.h5ad"), *a, **k)  # something on disk to clean up
            raise exc()
        return real(path, *a, **k)

    monkeypatch.setattr(synth_mod, "_write_dataset", write)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, "Terminated", OSError])
def test_an_interrupted_synth_leaves_no_trace(tmp_path, monkeypatch, exc):
    """Ctrl-C, SIGTERM or a write error half-way: no partial .h5ad, no empty truth/, no
    temporary folder, no parent folder made for the output; an earlier output stays whole."""
    from txfm.cli import Terminated

    exc = Terminated if exc == "Terminated" else exc
    _interrupt_at(monkeypatch, "atlas.h5ad", exc)
    with pytest.raises(exc):
        generate(tmp_path / "new" / "deeper" / "out", bulk=3, **SMALL)
    assert _tree(tmp_path) == []
    monkeypatch.undo()
    earlier = generate(tmp_path / "out", bulk=3, **SMALL)
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    _interrupt_at(monkeypatch, "bulk.h5ad", exc)
    with pytest.raises(exc):
        generate(tmp_path / "out", bulk=3, **{**SMALL, "seed": 6})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    assert [p.name for p in earlier.datasets] == ["screen.h5ad", "atlas.h5ad", "bulk.h5ad"]


def test_the_cli_is_interrupted_with_status_130_and_no_output(tmp_path, capsys, monkeypatch):
    _interrupt_at(monkeypatch, "screen.h5ad", KeyboardInterrupt)
    rc, _, err = _cli(capsys, "data", "synth", "--out", tmp_path / "ci", "--cells", 100,
                      "--genes", 100, "--perturbations", 3)
    assert rc == 130 and err.strip().splitlines()[-1] == "interrupted"
    assert _tree(tmp_path) == []


def test_a_rerun_replaces_an_earlier_output_as_a_whole(tmp_path):
    out = tmp_path / "big"
    first = generate(out, bulk=4, **SMALL)
    assert (out / "bulk.h5ad").is_file()
    second = generate(out, **{**SMALL, "seed": 9})  # no bulk this time
    assert sorted(p.name for p in out.iterdir()) == ["atlas.h5ad", "screen.h5ad", "truth"]
    assert json.loads(second.params.read_text())["seed"] == 9 and first.out_dir == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]  # no temporary folder left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate(empty, **SMALL).datasets[0] == empty / "screen.h5ad"


@pytest.mark.parametrize("setup, needles", [
    (lambda d: (d / "x.txt").write_text("mine"), ["not an output of txfm data synth", "x.txt"]),
    (lambda d: (generate(d, **SMALL), (d / "notes.md").write_text("mine")),
     ["earlier synth output", "notes.md"]),
    (lambda d: (generate(d, **SMALL), (d / "truth" / "mine.tsv").write_text("mine")),
     ["truth/mine.tsv"]),
])
def test_a_folder_that_is_not_only_synth_output_is_never_replaced(tmp_path, capsys, setup,
                                                                   needles):
    out = tmp_path / "raw"
    out.mkdir()
    setup(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc, _, err = _cli(capsys, "data", "synth", "--out", out, "--cells", 100, "--genes", 100,
                      "--perturbations", 3)
    _refused(rc, err, f"--out {out}:", *needles)
    with pytest.raises(ValueError, match="out_dir"):
        generate(out, **SMALL)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_a_bad_out_is_one_error_line_before_any_work(tmp_path, capsys, monkeypatch):
    import txfm.data.synth as synth_mod

    def never(*a, **k):
        raise AssertionError("generated data for a refused --out")

    monkeypatch.setattr(synth_mod, "_write_dataset", never)
    (tmp_path / "afile").write_text("")
    cases = [("", "--out '': is empty"), (tmp_path / "afile", "is a file"),
             (tmp_path / "afile" / "sub", "is a file")]
    if Path("/proc").is_dir():
        cases.append(("/proc/foo", "--out /proc/foo: cannot write there"))
    for out, needle in cases:
        rc, _, err = _cli(capsys, "data", "synth", "--out", out, "--cells", 100, "--genes", 100,
                          "--perturbations", 3)
        _refused(rc, err, needle)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    rc, _, err = _cli(capsys, "data", "synth", "--out", ".", "--cells", 100, "--genes", 100,
                      "--perturbations", 3)
    _refused(rc, err, "--out .: is the current folder")
    assert _tree(tmp_path) == ["afile", "empty"]


def test_programs_are_made_as_asked_or_refused(tmp_path, capsys):
    # it used to make 51 of 100 (and 3 of 1,000 with --genes 100) and say nothing
    rc, _, err = _cli(capsys, "data", "synth", "--out", tmp_path / "p", "--cells", 100,
                      "--genes", 3000, "--programs", 100, "--perturbations", 5)
    assert rc == 0, err
    params = json.loads((tmp_path / "p" / "truth" / "params.json").read_text())
    assert params["programs"] == 100
    programs = pd.read_csv(tmp_path / "p" / "truth" / "gene_programs.tsv", sep="\t",
                           keep_default_na=False)
    sizes = programs[programs.program != ""].groupby("program").size()
    assert len(sizes) == 100 and sizes.between(10, 40).all() and sizes.sum() <= 0.45 * 3000
    rc, _, err = _cli(capsys, "data", "synth", "--out", tmp_path / "q", "--cells", 100,
                      "--genes", 100, "--programs", 1000)
    _refused(rc, err, "--programs", "at most 4", "--genes")
    assert not (tmp_path / "q").exists()
    # the most that fit are all made, also where drawn sizes would overflow the budget
    res = generate(tmp_path / "r", programs=28, program_size=(4, 6), **{**SMALL, "genes": 250})
    assert json.loads(res.params.read_text())["programs"] == 28  # 112 of 250 genes, 4 each
    with pytest.raises(ValueError, match="programs"):
        generate(tmp_path / "s", programs=0, **SMALL)
    from txfm.data.synth import max_programs

    assert max_programs(100) == 4 and max_programs(250, (4, 6)) == 28


def test_the_suggested_conversion_runs_on_what_was_made(tmp_path, capsys, monkeypatch):
    """The printed `next:` command (paths shell-quoted, filters fitted to the data: a fixed
    --min-genes 100 left no cell of a 100-gene output) converts the output as printed."""
    import shlex

    monkeypatch.chdir(tmp_path)
    rc, out, err = _cli(capsys, "data", "synth", "--out", "sp ace/ü", "--cells", 100,
                        "--genes", 100, "--perturbations", 3)
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.startswith("next: "))
    argv = shlex.split(line[len("next: "):])
    assert argv[:4] == ["txfm", "data", "convert", "sp ace/ü/screen.h5ad"]
    argv[argv.index("SHARDS")] = "shards"
    rc, _, err = _cli(capsys, *argv[1:], "--quiet")
    assert rc == 0, err
    from txfm.data.manifest import Manifest

    params = json.loads((tmp_path / "sp ace" / "ü" / "truth" / "params.json").read_text())
    assert Manifest.load(tmp_path / "shards").n_cells >= 0.95 * 100
    assert params["convert_filters"] == {"min_cells": int(argv[argv.index("--min-cells") + 1]),
                                         "min_genes": int(argv[argv.index("--min-genes") + 1])}


def test_cell_ranges_in_messages_name_only_cells_that_exist():
    from txfm.data.layout import cell_range, shard_cells_where

    assert cell_range(64, 99) == "cells 64-98"  # not "64..99" of a 99-cell shard
    assert cell_range(7, 8) == "cell 7" and cell_range(3, 3) == "no cells"
    indptr = np.array([0, 2, 2, 5, 9])  # 4 cells
    where = shard_cells_where("dataset_0", indptr, 100, 4)
    assert where(0, -1) == "shard dataset_0 (corpus cells 100-103)"
    assert where(2, 9) == "shard dataset_0, cells 2-3 of the shard (corpus cells 102-103)"
    assert where(0, 1) == "shard dataset_0, cell 0 of the shard (corpus cell 100)"


def test_the_demo_data_are_the_ones_every_demo_measurement_was_made_on(tmp_path, monkeypatch):
    """The demo's recipe asks for 22 programs of which 21 fit; exact program counts must not
    redraw them, or every number recorded on the demo (docs/learning.md) would be of other
    data. Integer totals of each dataset pin the draw that ``txfm data demo`` makes."""
    import anndata as ad

    import txfm.data.synth as synth
    from txfm.data.demo import ensure_demo

    made, generate = [], synth.generate

    def generate_only(out_dir, **kwargs):  # the demo's own call, without its conversion
        made.append(generate(tmp_path / "raw", **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "generate", generate_only)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo(tmp_path / "demo")
    (r,) = made
    params = json.loads(r.params.read_text())
    assert (params["programs"], params["genes_in_programs"]) == (21, 112)
    totals = {p.stem: (int(ad.read_h5ad(p).X.sum()), ad.read_h5ad(p).X.nnz) for p in r.datasets}
    assert totals == {"screen": (7659049, 1060071), "atlas": (3471389, 538879),
                      "bulk": (96312482, 9600)}
