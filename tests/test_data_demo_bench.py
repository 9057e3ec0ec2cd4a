"""The embedded demo (atomic, reused) and a smoke run of ``python -m bench.loader --quick``."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("anndata", reason="txfm.data / txfm.eval need anndata: pip install anndata zarr")
pytest.importorskip("zarr", reason="txfm.data / txfm.eval need zarr: pip install anndata zarr")

import txfm.data.demo as demo
from txfm.data import Manifest, ShardLoader

SMALL = dict(cells=600, genes=150, perturbations=5, batches=2, bulk=5, seed=0)


@pytest.fixture()
def small_demo(monkeypatch):
    monkeypatch.setattr(demo, "DEMO_SYNTH", SMALL)
    monkeypatch.setattr(demo, "DEMO_CONVERT", dict(min_cells=3, min_genes=10, val_fraction=0.05,
                                                   seed=0))


def test_demo_is_built_once_and_atomically(tmp_path, small_demo, monkeypatch):
    root = tmp_path / "txfm-demo"
    lines = []
    shards = demo.ensure_demo_shards(root, log=lines.append)
    # the log names the folder the demo ends in, not the temporary one it was built in
    assert any(line.startswith(f"{shards}:") for line in lines), lines
    assert not any(".tmp-" in line for line in lines), lines
    m = Manifest.load(shards)
    # and so does the manifest's record of each dataset's source
    assert [ds.report["path"] for ds in m.datasets] == [str(root / "raw" / f"{n}.h5ad")
                                                       for n in demo.DEMO_CORPUS]
    # the training corpus is the atlas and the bulk samples; the screen is held out of it
    assert m.n_split_cells("val") > 0
    assert [ds.name for ds in m.datasets] == list(demo.DEMO_CORPUS) == ["atlas", "bulk"]
    d = demo.ensure_demo(root)
    assert (d.truth / "relationships.txt").is_file() and d.shards == shards
    stamp = (shards / "manifest.json").stat().st_mtime_ns
    assert demo.ensure_demo_shards(root) == shards
    assert (shards / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    next(iter(ShardLoader(shards, 32)))
    monkeypatch.chdir(tmp_path)  # a relative root, as `txfm train` makes ./txfm-demo
    rel = demo.ensure_demo("rel-demo")
    assert [ds.report["path"] for ds in Manifest.load(rel.shards).datasets] == [
        str(rel.raw / f"{n}.h5ad") for n in demo.DEMO_CORPUS]

    # a failure half-way leaves nothing that could be taken for a finished demo
    other = tmp_path / "other"

    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr("txfm.data.convert.convert", boom)
    with pytest.raises(RuntimeError, match="killed"):
        demo.ensure_demo(other)
    assert not other.exists() and not list(tmp_path.glob(".other.tmp-*"))
    monkeypatch.undo()

    # a demo of another recipe (its marker says so) is rebuilt, not used
    monkeypatch.setattr(demo, "DEMO_SYNTH", dict(SMALL, seed=1))
    monkeypatch.setattr(demo, "DEMO_CONVERT", dict(min_cells=3, min_genes=10, val_fraction=0.05,
                                                   seed=0))
    assert not demo._complete(root)
    demo.ensure_demo_shards(root)
    assert demo._complete(root)

    # without the marker the folder may be the user's: refused, nothing deleted
    (root / demo.MARKER).unlink()
    assert not demo._complete(root)
    with pytest.raises(demo.DemoFolderError, match="not a txfm demo folder"):
        demo.ensure_demo_shards(root)
    assert (shards / "manifest.json").is_file()


def test_bench_loader_quick(tmp_path):
    from bench.loader import main

    out = tmp_path / "loader.json"
    assert main(["--quick", "--cache", str(tmp_path / "cache"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    measured = [r for r in rows if r.get("cells_per_s")]
    assert {r["loader"] for r in measured} == {"txfm", "h5ad backed"}
    assert all(r["cells_per_s"] > 0 and float(r["distinct_stretches"]) >= 1 for r in measured)
