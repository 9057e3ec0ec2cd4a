"""Converter: round trips, vocabulary, filters, dtypes, codecs, bad inputs, crash + resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("anndata", reason="txfm.data / txfm.eval need anndata: pip install anndata zarr")
pytest.importorskip("zarr", reason="txfm.data / txfm.eval need zarr: pip install anndata zarr")

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from _shards import read_shards
from txfm.data import InputError, Manifest, ShardReadError
from txfm.data.convert import convert
from txfm.data.synth import generate

ROOT = Path(__file__).resolve().parent.parent


def write_h5ad(path: Path, counts, genes, *, ids=True, obs=None, dtype=np.float32, uns=None):
    """A small AnnData with ``genes`` as Ensembl-style ids (or symbols when ids=False)."""
    x = sp.csr_matrix(np.asarray(counts, dtype=dtype))
    var = pd.DataFrame({"symbol": [f"S{g}" for g in genes]} if ids else {},
                       index=pd.Index([f"ENSG{g:011d}" if ids else f"S{g}" for g in genes]))
    obs = obs if obs is not None else pd.DataFrame(index=[f"{path.stem}_{i}" for i in range(x.shape[0])])
    a = ad.AnnData(X=x, obs=obs, var=var, uns=uns or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_h5ad(path)
    return path


def shard_frames(out: Path) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """All shards (train then val) read back with anndata, concatenated in manifest order."""
    return read_shards(out)[1:]


def expected_rows(path: Path, vocab_ids: list[str], rows: np.ndarray, key="index") -> sp.csr_matrix:
    """Rows of an input .h5ad remapped onto the vocabulary, computed with anndata + scipy."""
    a = ad.read_h5ad(path)
    names = list(a.var_names) if key == "index" else list(a.var[key])
    col = {g: i for i, g in enumerate(vocab_ids)}
    target = np.array([col.get(n, -1) for n in names])
    keep = np.flatnonzero(target >= 0)
    proj = sp.csr_matrix((np.ones(keep.size), (keep, target[keep])), shape=(len(names), len(vocab_ids)))
    return (sp.csr_matrix(a.X)[rows] @ proj).tocsr()


def assert_round_trip(out: Path, inputs: dict[str, Path], key="index"):
    x, obs = shard_frames(out)
    m = Manifest.load(out)
    assert x.shape == (m.n_cells, m.n_genes)
    # every row sorted and de-duplicated, vocabulary ids in range
    x.has_sorted_indices = False
    assert sp.csr_matrix(x).has_canonical_format or x.copy().has_canonical_format
    for name, path in inputs.items():
        sel = np.flatnonzero(obs["dataset"].to_numpy() == name)
        rows = obs["source_row"].to_numpy()[sel]
        exp = expected_rows(path, m.gene_ids, rows, key=key)
        diff = x[sel] - exp
        assert abs(diff).sum() == 0, f"{name}: counts differ after the round trip"
    return x, obs, m


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth"), cells=1500, genes=300, perturbations=8,
                    batches=2, bulk=12, seed=3)


@pytest.fixture(scope="module")
def shards(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "s"
    convert(synth.datasets, out, min_cells=5, min_genes=20, val_fraction=0.05, shard_cells=400,
            progress=False, log=lambda s: None)
    return out


def test_round_trip_synthetic(synth, shards):
    inputs = {p.stem: p for p in synth.datasets}
    x, obs, m = assert_round_trip(shards, inputs)
    # every kept input cell appears exactly once
    pairs = set(zip(obs["dataset"].astype(str), obs["source_row"]))
    assert len(pairs) == m.n_cells == len(obs)
    assert {d.name for d in m.datasets} == {"screen", "atlas", "bulk"}
    assert [s.split for s in m.shards].count("val") >= 1
    assert m.n_split_cells("val") == round(0.05 * m.n_cells)
    # shuffled across datasets: each training shard mixes datasets
    first = obs.iloc[: m.shards[0].n_cells]
    assert first["dataset"].nunique() >= 2
    # labels kept, as categoricals shared by all shards
    assert {"cell_type", "perturbation", "batch"} <= set(obs.columns)
    assert "non-targeting" in set(obs["perturbation"].astype(str))
    # m_i = training cells with gene i non-zero
    train = np.flatnonzero(np.arange(x.shape[0]) < m.n_split_cells("train"))
    np.testing.assert_array_equal(m.gene_nnz, np.bincount(x[train].indices, minlength=m.n_genes))
    # observable genes per dataset = the dataset's genes kept by the filters
    for d in m.datasets:
        genes = set(ad.read_h5ad(Path(d.report["path"]), backed="r").var_names)
        assert set(np.asarray(m.gene_ids)[d.observable]) <= genes
        assert d.observable.size == d.report["genes_kept"]
    obs_genes = m.observable()
    assert obs_genes.mask.shape == (3, m.n_genes)
    assert (obs_genes.counts().numpy() == [d.observable.size for d in m.datasets]).all()


def test_layout_is_annbatch_and_anndata_compatible(shards):
    root = json.loads((shards / "zarr.json").read_text())
    assert root["node_type"] == "group"
    assert root["attributes"]["encoding-type"] == "annbatch-preshuffled"
    assert root["attributes"]["encoding-version"] == "0.1.0"
    meta = json.loads((shards / "dataset_0" / "X" / "data" / "zarr.json").read_text())
    assert meta["codecs"][0]["name"] == "sharding_indexed"
    # read as ordinary float counts / int32 indices, stored as narrow unsigned integers
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert (meta["data_type"], inner[0]["configuration"]["astype"]) in (("float32", "<u2"),
                                                                        ("float64", "<u4"))
    idx = json.loads((shards / "dataset_0" / "X" / "indices" / "zarr.json").read_text())
    assert idx["data_type"] == "int32"
    assert idx["codecs"][0]["configuration"]["codecs"][0]["configuration"]["astype"] == "<u2"
    import zarr

    g = zarr.open_group(shards / "dataset_0", mode="r")
    assert g["X"].attrs["encoding-type"] == "csr_matrix"
    # zarr-python itself reads our hand-written shard files
    a = ad.read_zarr(shards / "dataset_0")
    np.testing.assert_array_equal(g["X/indices"][:], a.X.indices)


def test_counts_dtype_fallback(synth, shards):
    m = Manifest.load(shards)
    # bulk counts exceed 65,535: the corpus falls back to uint32; indices stay uint16
    assert m.max_count > 65535 and m.counts_dtype == "uint32" and m.indices_dtype == "uint16"


def test_union_vocabulary_overlap_and_disjoint(tmp_path):
    rng = np.random.default_rng(0)
    a = write_h5ad(tmp_path / "a.h5ad", rng.poisson(2, (30, 5)), [1, 2, 3, 4, 5])
    b = write_h5ad(tmp_path / "b.h5ad", rng.poisson(2, (20, 4)), [4, 5, 6, 7])   # overlaps a
    c = write_h5ad(tmp_path / "c.h5ad", rng.poisson(2, (10, 3)), [8, 9, 10])     # disjoint
    out = tmp_path / "out"
    m = convert([a, b, c], out, min_cells=0, min_genes=0, val_fraction=0.0, progress=False,
                log=lambda s: None)
    assert m.gene_ids == [f"ENSG{g:011d}" for g in range(1, 11)]  # order of first appearance
    assert m.symbols == [f"S{g}" for g in range(1, 11)]
    assert [d.observable.tolist() for d in m.datasets] == [[0, 1, 2, 3, 4], [3, 4, 5, 6], [7, 8, 9]]
    assert_round_trip(out, {"a": a, "b": b, "c": c})
    # an existing vocabulary: genes outside it are dropped and reported
    vocab = tmp_path / "vocab.tsv"
    pd.DataFrame({"gene_id": [f"ENSG{g:011d}" for g in (7, 1, 2, 9)],
                  "symbol": ["S7", "S1", "S2", "S9"]}).to_csv(vocab, sep="\t", index=False)
    out2 = tmp_path / "out2"
    m2 = convert([a, b, c], out2, vocab=vocab, min_cells=0, min_genes=0, val_fraction=0.0,
                 progress=False, log=lambda s: None)
    assert m2.gene_ids == [f"ENSG{g:011d}" for g in (7, 1, 2, 9)]
    assert m2.datasets[0].report["genes_outside_vocab"] == 3
    assert [d.observable.tolist() for d in m2.datasets] == [[1, 2], [0], [3]]
    assert_round_trip(out2, {"a": a, "b": b, "c": c})


def test_symbols_mapped_to_ids_and_duplicates_summed(tmp_path):
    counts = np.array([[1, 2, 3], [0, 4, 0]])
    a = write_h5ad(tmp_path / "a.h5ad", counts, [1, 2, 3])
    # symbol-only input with a duplicated symbol: S2 twice -> one gene, counts summed
    var = pd.DataFrame(index=pd.Index(["S2", "S2", "S3", "S99"]))
    xb = sp.csr_matrix(np.array([[1, 1, 5, 2], [3, 0, 0, 0]], dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = tmp_path / "b.h5ad"
        ad.AnnData(X=xb, var=var, obs=pd.DataFrame(index=["b0", "b1"])).write_h5ad(b)
    out = tmp_path / "out"
    m = convert([a, b], out, min_cells=0, min_genes=0, val_fraction=0.0, progress=False,
                log=lambda s: None)
    # S2/S3 took the ids of input a; S99 stays a symbol key
    assert m.gene_ids == ["ENSG00000000001", "ENSG00000000002", "ENSG00000000003", "S99"]
    assert m.datasets[1].report["duplicate_features_merged"] == 1
    x, obs = shard_frames(out)
    b0 = x[np.flatnonzero((obs["dataset"] == "b").to_numpy() & (obs["source_row"] == 0).to_numpy())[0]]
    assert b0.toarray().ravel().tolist() == [0, 2, 5, 2]


def test_filters(tmp_path):
    # gene g is expressed in g+1 cells; cell i expresses i+1 genes
    n = 8
    counts = (np.arange(n)[:, None] >= (n - 1 - np.arange(n))[None, :]).astype(int)
    a = write_h5ad(tmp_path / "a.h5ad", counts, list(range(1, n + 1)))
    out = tmp_path / "out"
    m = convert([a], out, min_cells=3, min_genes=4, val_fraction=0.0, progress=False,
                log=lambda s: None)
    rep = m.datasets[0].report
    # genes in >= 3 cells: gene columns 2..7 (6 genes); then cells with >= 4 of those genes
    assert rep["genes_kept"] == 6 and rep["genes_dropped_min_cells"] == 2
    kept_genes = counts[:, 2:].sum(1)
    assert rep["cells_kept"] == int((kept_genes >= 4).sum())
    x, obs = shard_frames(out)
    assert sorted(obs["source_row"]) == np.flatnonzero(kept_genes >= 4).tolist()
    # bulk inputs are not filtered
    out2 = tmp_path / "out2"
    m2 = convert([a], out2, min_cells=3, min_genes=4, val_fraction=0.0, bulk=["a"],
                 progress=False, log=lambda s: None)
    assert m2.datasets[0].kind == "bulk" and m2.n_cells == n and m2.n_genes == n
    with pytest.raises(InputError, match="no cell left"):
        convert([a], tmp_path / "out3", min_cells=0, min_genes=100, progress=False,
                log=lambda s: None)
    with pytest.raises(InputError, match="no gene left"):
        convert([a], tmp_path / "out4", min_cells=100, min_genes=0, progress=False,
                log=lambda s: None)
    # into a folder that exists: the failed run leaves it as it was, so the corrected command
    # is not refused as "a conversion with other inputs or options"
    (tmp_path / "out5").mkdir()
    with pytest.raises(InputError, match="lower --min-cells"):
        convert([a], tmp_path / "out5", min_cells=100, min_genes=0, progress=False,
                log=lambda s: None)
    assert list((tmp_path / "out5").iterdir()) == []
    convert([a], tmp_path / "out5", min_cells=3, min_genes=4, progress=False, log=lambda s: None)
    # a vocabulary that shares no gene with the input says so (it said: lower --min-cells)
    (tmp_path / "v.tsv").write_text("foo\nbar\n")
    with pytest.raises(InputError, match=r"none of its 8 genes is in the vocabulary of --vocab "
                                         r".*v.tsv.*--gene-key / --gene-table") as err:
        convert([a], tmp_path / "out6", vocab=tmp_path / "v.tsv", min_cells=0, min_genes=0,
                progress=False, log=lambda s: None)
    assert "min-cells" not in str(err.value) and not (tmp_path / "out6").exists()


def test_bad_inputs(tmp_path):
    good = [[1, 2], [3, 4]]
    cases = {
        "nan": ([[1, np.nan], [0, 1]], "non-finite"),
        "inf": ([[1, np.inf], [0, 1]], "non-finite"),
        "neg": ([[1, -1], [0, 1]], "negative"),
        "frac": ([[1, 0.5], [0, 1]], "non-integer"),
    }
    for name, (counts, msg) in cases.items():
        p = write_h5ad(tmp_path / f"{name}.h5ad", counts, [1, 2])
        with pytest.raises(InputError, match=msg) as err:
            convert([p], tmp_path / f"out_{name}", min_cells=0, min_genes=0, progress=False,
                    log=lambda s: None)
        assert str(p) in str(err.value) and "cell " in str(err.value)
    frac = tmp_path / "frac.h5ad"
    m = convert([frac], tmp_path / "out_frac_ok", min_cells=0, min_genes=0, val_fraction=0.0,
                allow_non_integer=True, progress=False, log=lambda s: None)
    assert m.counts_dtype == "float32" and not m.integer_counts
    x, _ = shard_frames(tmp_path / "out_frac_ok")
    assert 0.5 in set(x.data.tolist())
    empty = write_h5ad(tmp_path / "empty.h5ad", np.zeros((0, 2)), [1, 2])
    with pytest.raises(InputError, match="no cells"):
        convert([empty], tmp_path / "o1", progress=False, log=lambda s: None)
    junk = tmp_path / "junk.h5ad"
    junk.write_bytes(b"not an hdf5 file")
    with pytest.raises(InputError, match="cannot open"):
        convert([junk], tmp_path / "o2", progress=False, log=lambda s: None)
    with pytest.raises(InputError, match="does not exist"):
        convert([tmp_path / "missing.h5ad"], tmp_path / "o3", progress=False, log=lambda s: None)
    folder = tmp_path / "not10x"
    folder.mkdir()
    with pytest.raises(InputError, match="missing matrix.mtx"):
        convert([folder], tmp_path / "o4", progress=False, log=lambda s: None)
    ok = write_h5ad(tmp_path / "ok.h5ad", good, [1, 2])
    with pytest.raises(InputError, match="no layer 'counts'"):
        convert([ok], tmp_path / "o5", layer="counts", progress=False, log=lambda s: None)


def test_layer_raw_and_10x_h5(tmp_path):
    import h5py

    rng = np.random.default_rng(1)
    counts = rng.poisson(1.5, (40, 6)).astype(np.float32)
    var = pd.DataFrame({"symbol": [f"S{i}" for i in range(6)]},
                       index=[f"ENSG{i:011d}" for i in range(6)])
    a = ad.AnnData(X=sp.csr_matrix(np.log1p(counts)), var=var,
                   obs=pd.DataFrame(index=[f"c{i}" for i in range(40)]),
                   layers={"counts": sp.csr_matrix(counts)})
    a.raw = ad.AnnData(X=sp.csr_matrix(counts), var=var)
    p = tmp_path / "layered.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_h5ad(p)
    for kw in ({"layer": "counts"}, {"use_raw": True}):
        out = tmp_path / f"out_{list(kw)[0]}"
        convert([p], out, min_cells=0, min_genes=0, val_fraction=0.0, progress=False,
                log=lambda s: None, **kw)
        x, obs = shard_frames(out)
        np.testing.assert_array_equal(x.toarray(), counts[obs["source_row"].to_numpy()])
    # X holds log1p values: refused as non-integer
    with pytest.raises(InputError, match="non-integer"):
        convert([p], tmp_path / "out_x", min_cells=0, min_genes=0, progress=False, log=lambda s: None)
    # a Cell Ranger v3 .h5 (features x cells CSC == cells x features CSR)
    m = sp.csr_matrix(counts.astype(np.int32))
    h5 = tmp_path / "filtered_feature_bc_matrix.h5"
    with h5py.File(h5, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array([6, 40])
        g["barcodes"] = np.array([f"BC{i}-1".encode() for i in range(40)])
        ft = g.create_group("features")
        ft["id"] = np.array([f"ENSG{i:011d}".encode() for i in range(6)])
        ft["name"] = np.array([f"S{i}".encode() for i in range(6)])
        ft["feature_type"] = np.array([b"Gene Expression"] * 5 + [b"Antibody Capture"])
    out = tmp_path / "out_h5"
    man = convert([h5], out, min_cells=0, min_genes=0, val_fraction=0.0, progress=False,
                  log=lambda s: None)
    assert man.n_genes == 5 and man.datasets[0].report["features_other_type"] == 1
    x, obs = shard_frames(out)
    np.testing.assert_array_equal(x.toarray(), counts[obs["source_row"].to_numpy()][:, :5])
    assert obs.index[0].startswith("filtered_feature_bc_matrix:BC")
    # an antibody tag (no Ensembl id) that --feature-types drops is no gene "keyed by symbol"
    with h5py.File(h5, "r+") as f:
        f["matrix/features/id"][5] = b"CD3_TotalSeqB"
    lines = []
    convert([h5], tmp_path / "out_ab", min_cells=0, min_genes=0, val_fraction=0.0,
            progress=False, log=lines.append)
    assert not any("keyed by" in ln for ln in lines), lines
    # feature types that match nothing (wrong case): one error naming both, before any work
    # (it was an IndexError, and its plan refused the corrected command)
    empty = tmp_path / "out_ft"
    empty.mkdir()
    for types in (["Gene expression"], ["Peaks"]):
        with pytest.raises(InputError, match=r"no feature of the type\(s\) --feature-types "
                                             r".*'Gene Expression', 'Antibody Capture'"):
            convert([h5], empty, feature_types=types, min_cells=0, min_genes=0,
                    progress=False, log=lambda s: None)
        assert list(empty.iterdir()) == []


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_codecs_round_trip(synth, tmp_path, codec):
    out = tmp_path / codec
    convert(synth.datasets[:1], out, min_cells=0, min_genes=0, val_fraction=0.0, codec=codec,
            shard_cells=500, progress=False, log=lambda s: None)
    assert_round_trip(out, {"screen": synth.datasets[0]})
    from txfm.data import ShardLoader

    loader = ShardLoader(out, 128, shuffle=False, drop_last=False)
    got = sp.vstack([sp.csr_matrix((b.counts.numpy(), b.indices.numpy(), b.indptr.numpy()),
                                   shape=(b.batch_size, loader.n_genes)) for b in loader])
    x, _ = shard_frames(out)
    assert abs(got - x).sum() == 0


def test_rerun_is_a_no_op_and_changed_options_need_overwrite(synth, shards, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in shards.rglob("*") if p.is_file()}
    convert(synth.datasets, shards, min_cells=5, min_genes=20, val_fraction=0.05, shard_cells=400,
            progress=False, log=lambda s: None)
    assert {p: p.stat().st_mtime_ns for p in shards.rglob("*") if p.is_file()} == before
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(synth.datasets, shards, min_cells=6, min_genes=20, val_fraction=0.05,
                progress=False, log=lambda s: None)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not txfm shards"):
        convert(synth.datasets, foreign, progress=False, log=lambda s: None)
    # a manifest that is JSON but not an object is another conversion's, not a crash
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "manifest.json").write_text("[1, 2, 3]")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(synth.datasets, damaged, progress=False, log=lambda s: None)


def test_a_run_killed_while_writing_its_manifest_is_completed_by_the_next(synth, shards,
                                                                         tmp_path):
    # SIGKILL mid-write leaves write_atomic's hidden temporaries, which are the conversion's
    # own files: the re-run must neither call the folder foreign nor keep them
    import shutil

    killed = tmp_path / "killed"
    shutil.copytree(shards, killed)
    (killed / "manifest.json").unlink()
    (killed / ".manifest.tmp99999.json").write_text('{"half": ')
    (killed / ".zarr.tmp99999.json").write_text("{")
    convert(synth.datasets, killed, min_cells=5, min_genes=20, val_fraction=0.05,
            shard_cells=400, progress=False, log=lambda s: None)
    assert (killed / "manifest.json").is_file()
    assert not [p.name for p in killed.rglob(".*tmp9*")]
    got, want = (json.loads((d / "manifest.json").read_text()) for d in (killed, shards))
    assert got["fingerprint"] == want["fingerprint"] and got["shards"] == want["shards"]


def test_corrupt_or_missing_chunks_are_named(shards, tmp_path):
    import shutil

    from txfm.data import ShardLoader

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    f = bad / "dataset_1" / "X" / "indices" / "c" / "0"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(ShardReadError, match=r"dataset_1.*cells? \d+(-\d+)?"):
        ShardLoader(bad, 64)
    f.write_bytes(raw[:-30] + bytes(30))  # index overwritten
    with pytest.raises(ShardReadError, match="checksum"):
        ShardLoader(bad, 64)
    f.unlink()
    with pytest.raises(ShardReadError, match=r"dataset_1.*missing"):
        ShardLoader(bad, 64)
    f.write_bytes(raw)
    # data intact but an inner chunk marked missing in a (re-checksummed) index
    from txfm.data.layout import _crc32c

    meta = json.loads((bad / "dataset_1" / "X" / "indices" / "zarr.json").read_text())
    cfg = meta["codecs"][0]["configuration"]
    n_chunks = meta["chunk_grid"]["configuration"]["chunk_shape"][0] // cfg["chunk_shape"][0]
    index = np.frombuffer(raw[-(16 * n_chunks + 4):-4], dtype="<u8").reshape(-1, 2).copy()
    index[1] = 2**64 - 1
    ib = index.tobytes()
    f.write_bytes(raw[: -(16 * n_chunks + 4)] + ib + np.uint32(_crc32c(ib)).tobytes())
    with pytest.raises(ShardReadError, match=r"inner chunk 1 .* missing") as err:
        ShardLoader(bad, 64)
    assert "corpus cells" in str(err.value)
    f.write_bytes(raw)
    # gene ids out of range (bit rot in the data region) are caught while reading
    body = bytearray(raw)
    body[0:2] = np.uint16(65535).tobytes()
    f.write_bytes(bytes(body))
    loader = ShardLoader(bad, 64, shuffle=False)
    with pytest.raises(ShardReadError, match=r"dataset_1.*gene index"):
        list(loader)


def _convert_cmd(inputs, out):
    return [sys.executable, "-c",
            "import sys; from txfm.data.convert import convert; "
            f"convert({[str(p) for p in inputs]!r}, {str(out)!r}, min_cells=5, min_genes=20, "
            "val_fraction=0.05, shard_cells=150, progress=False, log=lambda s: None)"]


def test_sigkill_half_way_then_resume(synth, tmp_path):
    inputs = synth.datasets
    ref = tmp_path / "ref"
    convert(inputs, ref, min_cells=5, min_genes=20, val_fraction=0.05, shard_cells=150,
            progress=False, log=lambda s: None)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_convert_cmd(inputs, out), cwd=ROOT, env={**os.environ})
    deadline = time.time() + 120
    done = []
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in out.glob("dataset_*") if p.is_dir()]
        if len(done) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "conversion finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        Manifest.load(out)
    finished = {p.name: p.stat().st_ino for p in out.glob("dataset_*")}
    assert finished and len(finished) < len(Manifest.load(ref).split_shards("train"))
    convert(inputs, out, min_cells=5, min_genes=20, val_fraction=0.05, shard_cells=150,
            progress=False, log=lambda s: None)
    # finished shards were kept, not rewritten
    assert {p: (out / p).stat().st_ino for p in finished} == finished
    assert not (out / ".txfm-convert").exists()
    assert not list(out.glob(".tmp-*"))
    a, ao = shard_frames(out)
    b, bo = shard_frames(ref)
    assert abs(a - b).sum() == 0
    assert (ao.index == bo.index).all()
    assert Manifest.load(out).raw["gene_nnz"] == Manifest.load(ref).raw["gene_nnz"]


def test_cli_synth_convert_info(tmp_path, capsys):
    from txfm.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "raw"), "--cells", "300", "--genes",
                 "120", "--perturbations", "5"]) == 0
    inputs = sorted(str(p) for p in (tmp_path / "raw").glob("*.h5ad"))
    assert len(inputs) == 2
    assert main(["data", "convert", *inputs, "--out", str(tmp_path / "sh"), "--min-cells", "3",
                 "--min-genes", "10", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["data", "info", str(tmp_path / "sh")]) == 0
    assert "observable genes" in capsys.readouterr().out
    assert main(["data", "convert", str(tmp_path / "nope.h5ad"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_entry_point_runs(tmp_path):
    """``python -m txfm.cli data ...`` works as a separate process (registration + exit codes)."""
    r = subprocess.run([sys.executable, "-m", "txfm.cli", "data", "info", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "not a complete txfm shard collection" in r.stderr


# -- faults a new user found ---------------------------------------------------------------------

def test_a_users_folder_named_like_a_shard_is_never_deleted(tmp_path):
    src = write_h5ad(tmp_path / "a.h5ad", np.eye(4) * 3 + 1, range(4))
    out = tmp_path / "out"
    (out / "dataset_0").mkdir(parents=True)
    (out / "dataset_0" / "data.bin").write_text("precious")
    with pytest.raises(FileExistsError, match="not txfm shards"):
        convert([src], out, min_cells=0, min_genes=0, val_fraction=0.0, progress=False)
    assert (out / "dataset_0" / "data.bin").read_text() == "precious"


def test_unnamed_or_blank_genes_are_refused_not_matched_by_position(tmp_path):
    x = sp.csr_matrix(np.ones((3, 4), dtype=np.float32))
    default = tmp_path / "default.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(X=x).write_h5ad(default)  # var index '0'..'3'
    with pytest.raises(InputError, match="genes have no names"):
        convert([default], tmp_path / "o1", min_cells=0, min_genes=0, val_fraction=0.0,
                progress=False)
    blank = tmp_path / "blank.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(X=x, var=pd.DataFrame(index=["A", "B", "nan", "D"])).write_h5ad(blank)
    with pytest.raises(InputError, match="empty or 'nan' name"):
        convert([blank], tmp_path / "o2", min_cells=0, min_genes=0, val_fraction=0.0,
                progress=False)


def _layered_inputs(folder: Path, places: dict) -> dict:
    """One .h5ad per ``{name: "X" | "raw" | "layers/NAME"}`` keeping its integer counts there
    (X log-normalised otherwise); returns ``{name: counts}``."""
    rng = np.random.default_rng(7)
    var = pd.DataFrame({"symbol": [f"S{i}" for i in range(6)]},
                       index=[f"ENSG{i:011d}" for i in range(6)])
    truth = {}
    for name, where in places.items():
        counts = rng.poisson(2.0, (30, 6)).astype(np.float32)
        truth[name] = counts
        a = ad.AnnData(X=sp.csr_matrix(counts if where == "X" else np.log1p(counts)), var=var,
                       obs=pd.DataFrame(index=[f"{name}{i}" for i in range(30)]))
        if where.startswith("layers/"):
            a.layers[where[len("layers/"):]] = sp.csr_matrix(counts)
        if where == "raw":
            a.raw = ad.AnnData(X=sp.csr_matrix(counts), var=var)
        path = folder / f"{name}.h5ad"
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a.write_h5ad(path)
    return truth


def _assert_counts(out: Path, truth: dict):
    x, obs = shard_frames(out)
    for name, counts in truth.items():
        rows = (obs["dataset"].astype(str) == name).to_numpy()
        assert rows.any()
        np.testing.assert_array_equal(x[rows].toarray(),
                                      counts[obs["source_row"].to_numpy()[rows]])


def test_each_input_keeps_its_counts_in_its_own_place(tmp_path, capsys, monkeypatch):
    """--counts INPUT=WHERE: one input's counts in X, another's in a layer, a third's in .raw
    (X log-normalised), converted in one call; keyed by dataset name or path."""
    from txfm.cli import main

    truth = _layered_inputs(tmp_path / "in", {"plain": "X", "layered": "layers/counts",
                                              "rawish": "raw"})
    monkeypatch.chdir(tmp_path)
    paths = [f"in/{n}.h5ad" for n in truth]
    common = ["--min-cells", "0", "--min-genes", "0", "--val-fraction", "0", "--quiet"]
    # a dataset name, and a path spelled otherwise than the input
    assert main(["data", "convert", *paths, "--out", "out", *common, "--counts",
                 "layered=layers/counts", "--counts", f"./{paths[2]}=raw"]) == 0
    _assert_counts(tmp_path / "out", truth)
    assert Manifest.load(tmp_path / "out").raw["params"]["counts"] == {
        "layered": "layers/counts", "plain": "X", "rawish": "raw"}
    # the fingerprint holds what the keys resolve to: another spelling of the same choice
    # (and the default given explicitly) continues the finished conversion
    assert main(["data", "convert", *paths, "--out", "out", *common, "--counts",
                 "layered.h5ad=layers/counts", "--counts", "rawish=raw", "--counts",
                 "plain=X"]) == 0
    assert "holds a conversion with other" not in capsys.readouterr().err
    capsys.readouterr()
    # mistakes: a name that is no input, a place that is none, a missing layer, a bad pair,
    # two keys for one input
    for extra, named in ((["--counts", "nope=X"], "--counts nope=X: names no input"),
                         (["--counts", "layered=counts"], "X, raw or layers/NAME"),
                         (["--counts", "layered=layers/umi"],
                          "--counts layered=layers/umi given but the file has no layer 'umi'"),
                         (["--counts", "rawish=raw", "--counts", "plain=raw"],
                          "--counts plain=raw given but the file has no .raw"),
                         (["--counts", "layered"], "give INPUT=WHERE"),
                         (["--counts", "layered=X", "--counts", "in/layered.h5ad=raw"],
                          "already has --counts layered=X")):
        assert main(["data", "convert", *paths, "--out", "bad", "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and named in err, err
        assert "apply to every" not in err
    assert not (tmp_path / "bad").exists()


def test_counts_keys_are_the_dataset_names_first(tmp_path):
    """Inputs of one file name get names ``sample`` and ``sample_2``; --names may swap names
    and file names: a key is a dataset name before it is another input's file name. A Path
    key works as a str."""
    a = _layered_inputs(tmp_path / "a", {"sample": "layers/counts"})["sample"]
    b = _layered_inputs(tmp_path / "b", {"sample": "raw"})["sample"]
    kw = dict(min_cells=0, min_genes=0, val_fraction=0.0, progress=False, log=lambda s: None)
    inputs = [tmp_path / "a" / "sample.h5ad", tmp_path / "b" / "sample.h5ad"]
    convert(inputs, tmp_path / "o1", counts={"sample": "layers/counts", "sample_2": "raw"}, **kw)
    _assert_counts(tmp_path / "o1", {"sample": a, "sample_2": b})
    with pytest.raises(ValueError, match=r"names more than one input; use a dataset name "
                                         r"\(sample, sample_2\)"):
        convert(inputs, tmp_path / "o2", counts={"sample.h5ad": "raw"}, **kw)
    convert(inputs, tmp_path / "o3", names=["raw_ds", "layer_ds"], **kw,
            counts={"raw_ds": "layers/counts", inputs[1]: "raw"})
    _assert_counts(tmp_path / "o3", {"raw_ds": a, "layer_ds": b})
    assert not (tmp_path / "o2").exists()


def test_non_integer_counts_point_to_raw_and_layer_first(tmp_path):
    src = write_h5ad(tmp_path / "log.h5ad", np.log1p(np.eye(3) * 5 + 1), range(3))
    with pytest.raises(InputError, match=r"non-integer counts \(e\.g\. [0-9.]+ at cell.*--raw or "
                                         r"--layer NAME"):
        convert([src], tmp_path / "o", min_cells=0, min_genes=0, val_fraction=0.0,
                progress=False)


def test_out_that_cannot_be_created_names_out(tmp_path):
    src = write_h5ad(tmp_path / "a.h5ad", np.eye(4) * 3 + 1, range(4))
    (tmp_path / "afile").write_text("")
    with pytest.raises(FileExistsError, match=r"--out .*afile/sub: cannot be created"):
        convert([src], tmp_path / "afile" / "sub", min_cells=0, min_genes=0, val_fraction=0.0,
                progress=False)


@pytest.mark.parametrize("top, dtype, warned", [(5e9, "auto", "seldom raw sequencing counts"),
                                                (2**24 + 1, "float32", "uint32 holds them"),
                                                (2**24, "float32", None),
                                                (3e9, "auto", None)])
def test_counts_that_float32_would_round_are_reported(tmp_path, top, dtype, warned):
    """Integer counts above 2^24 lose digits in float32 (auto picks it only past uint32)."""
    x = np.eye(4, dtype=np.float64) * 3 + 1
    x[0, 0] = top
    src = write_h5ad(tmp_path / "a.h5ad", x, range(4), dtype=np.float64)
    lines = []
    m = convert([src], tmp_path / "o", min_cells=0, min_genes=0, val_fraction=0.0,
                counts_dtype=dtype, progress=False, log=lines.append)
    warnings_ = [ln for ln in lines if ln.startswith("warning:")]
    if warned is None:
        assert warnings_ == [], warnings_
    else:
        assert len(warnings_) == 1 and "float32" in warnings_[0] and warned in warnings_[0]
        assert f"{top:,.0f}" in warnings_[0]
    assert m.max_count == top


def test_an_input_given_twice_or_names_that_clash_are_refused(tmp_path, capsys):
    from txfm.cli import main

    a = write_h5ad(tmp_path / "a.h5ad", np.eye(4) * 3 + 1, range(4))
    b = write_h5ad(tmp_path / "b.h5ad", np.eye(4) * 2 + 1, range(4))
    (tmp_path / "sub").mkdir()
    link = tmp_path / "sub" / "alias.h5ad"
    link.symlink_to(a)
    kw = dict(min_cells=0, min_genes=0, val_fraction=0.0, progress=False)
    for inputs in ([a, a], [a, tmp_path / "sub" / ".." / "a.h5ad"], [a, link]):
        with pytest.raises(InputError, match=r"are the same input; give each dataset once"):
            convert(inputs, tmp_path / "o", **kw)
    for names, msg in ((["x", "x"], r"--names: 'x' given twice"),
                       (["x", " "], r"--names: name 2 is empty"),
                       (["x"], r"--names: 1 names for 2 inputs")):
        with pytest.raises(ValueError, match=msg):
            convert([a, b], tmp_path / "o", names=names, **kw)
    assert not (tmp_path / "o").exists()
    capsys.readouterr()
    rc = main(["data", "convert", str(a), str(b), "--names", "x,x", "--out", str(tmp_path / "o"),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --names: 'x' given twice"), err
    m = convert([a, b], tmp_path / "o", names=["x", "y"], **kw)  # distinct names: fine
    assert [d.name for d in m.datasets] == ["x", "y"]


def test_names_mixing_ids_and_symbols_merge_by_id_and_are_reported(tmp_path):
    """An input whose gene names are mostly, but not all, Ensembl ids (with versions) is keyed
    by symbol; its id-named genes must still meet the same genes of an input keyed by id."""
    ids = [f"ENSG{g:011d}" for g in range(10)]
    mixed = [f"{i}.{g % 3 + 1}" for g, i in enumerate(ids[:7])] + ["GFP", "Cas9", "SYM9"]
    x = np.arange(1, 31, dtype=np.float32).reshape(3, 10)
    a = ad.AnnData(X=sp.csr_matrix(x), var=pd.DataFrame(index=mixed),
                   obs=pd.DataFrame(index=[f"a{i}" for i in range(3)]))
    b = ad.AnnData(X=sp.csr_matrix(x[:, :7] + 1),
                   var=pd.DataFrame({"symbol": [f"S{g}" for g in range(7)]}, index=ids[:7]),
                   obs=pd.DataFrame(index=[f"b{i}" for i in range(3)]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_h5ad(tmp_path / "a.h5ad")
        b.write_h5ad(tmp_path / "b.h5ad")
    lines = []
    m = convert([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "o", min_cells=0,
                min_genes=0, val_fraction=0.0, progress=False, log=lines.append)
    assert m.gene_ids == ids[:7] + ["GFP", "Cas9", "SYM9"]  # the 7 ids merged, unversioned
    assert any(ln.startswith("a: 7 genes keyed by Ensembl id, 3 by symbol") for ln in lines), lines
    assert not any(ln.startswith("b:") and "keyed" in ln for ln in lines)
    assert m.datasets[0].report["genes_keyed_by_id"] == 7


def test_scanpy_layouts_get_messages_that_name_the_fix(tmp_path):
    """Counts only in a layer (X=None), --raw with an input lacking .raw, an AnnData object
    instead of a path, and an AnnData zarr store: each error says what to do."""
    counts = sp.csr_matrix(np.eye(4, dtype=np.float32) * 3 + 1)
    a = ad.AnnData(X=None, obs=pd.DataFrame(index=[f"c{i}" for i in range(4)]),
                   var=pd.DataFrame(index=[f"ENSG{g:011d}" for g in range(4)]),
                   layers={"counts": counts})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_h5ad(tmp_path / "nox.h5ad")
        ad.AnnData(X=counts, var=a.var, obs=a.obs).write_zarr(tmp_path / "z.zarr")
    kw = dict(min_cells=0, min_genes=0, val_fraction=0.0, progress=False)
    with pytest.raises(InputError, match=r"has no \.X; its counts may be in --layer counts"):
        convert([tmp_path / "nox.h5ad"], tmp_path / "o", **kw)
    plain = write_h5ad(tmp_path / "plain.h5ad", np.eye(4) + 1, range(4))
    with pytest.raises(InputError, match=r"--raw given but the file has no \.raw.*apply to every "
                                         r"\.h5ad input"):
        convert([plain], tmp_path / "o", use_raw=True, **kw)
    with pytest.raises(TypeError, match=r"inputs are paths.*adata.write_h5ad"):
        convert([a], tmp_path / "o", **kw)
    with pytest.raises(InputError, match=r"zarr store.*write it as \.h5ad"):
        convert([tmp_path / "z.zarr"], tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists()
