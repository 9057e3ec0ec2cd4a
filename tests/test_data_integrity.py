"""Shards as anndata hands them over (ordinary dtypes, safe arithmetic) and corruption checks
(crc32c on every chunk: the loader refuses a corrupt chunk, ``txfm data verify`` finds it)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("anndata", reason="txfm.data / txfm.eval need anndata: pip install anndata zarr")
pytest.importorskip("zarr", reason="txfm.data / txfm.eval need zarr: pip install anndata zarr")

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from txfm.data import Manifest, ShardLoader, ShardReadError
from _shards import synthetic_shards
from txfm.data.convert import convert
from txfm.data.synth import generate

ROOT = Path(__file__).resolve().parent.parent
ANNBATCH_PYTHON = ROOT / ".cache" / "annbatch-venv" / "bin" / "python"


def _read_zarr(path: Path) -> ad.AnnData:
    with warnings.catch_warnings():
        # zarr-python < 3.2 notes once that numcodecs codecs are outside the v3 core spec
        warnings.filterwarnings("ignore", message=".*Numcodecs codecs are not in the Zarr")
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata")
        return ad.read_zarr(path)


def _write_h5ad(path: Path, x: sp.csr_matrix, prefix: str) -> Path:
    n, g = x.shape
    a = ad.AnnData(X=x, obs=pd.DataFrame(index=[f"{prefix}{i}" for i in range(n)]),
                   var=pd.DataFrame(index=[f"ENSG{j:011d}" for j in range(g)]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def big_counts(tmp_path_factory):
    """Counts up to 65,535 (stored as uint16), where uint16 arithmetic wraps at once."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    x = sp.random(300, 120, density=0.3, format="csr", random_state=1, dtype=np.float64)
    x.data = rng.integers(1, 65_536, x.nnz).astype(np.float32)
    x = x.astype(np.float32)
    src = _write_h5ad(root / "big.h5ad", x, "c")
    out = root / "shards"
    convert([src], out, min_cells=0, min_genes=0, val_fraction=0.0, shard_cells=128,
            progress=False, log=lambda s: None)
    return src, out


def _arithmetic_matches(got: sp.spmatrix, ref: sp.spmatrix) -> None:
    """Ordinary arithmetic on ``got`` (as anndata returns it) equals scipy in float64."""
    assert got.indices.dtype.kind == "i" and got.indptr.dtype.kind == "i"
    assert got.dtype.kind == "f"
    # one index dtype, as scipy makes it: scikit-learn's compiled routines (TruncatedSVD,
    # mean_variance_axis, so scanpy's pca without centring) refuse a CSR whose two differ
    assert got.indices.dtype == got.indptr.dtype, (got.indices.dtype, got.indptr.dtype)
    from sklearn.utils.sparsefuncs import mean_variance_axis

    mean, _ = mean_variance_axis(got, axis=0)
    np.testing.assert_allclose(mean, np.asarray(ref.mean(axis=0)).ravel(), rtol=1e-5)
    ref = sp.csr_matrix(ref, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy warns on unsigned index arrays, numpy on overflow
        cases = {"X @ X.T": (got @ got.T, ref @ ref.T), "X.power(2)": (got.power(2), ref.power(2)),
                 "X.multiply(X)": (got.multiply(got), ref.multiply(ref)),
                 "X * 1000": (got * 1000, ref * 1000), "X.sum(1)": (got.sum(1), ref.sum(1))}
    for name, (a, b) in cases.items():
        a = a.toarray() if sp.issparse(a) else np.asarray(a)
        b = b.toarray() if sp.issparse(b) else np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=2e-6, err_msg=name)


def test_anndata_reads_an_ordinary_csr_whose_arithmetic_is_right(big_counts):
    src, out = big_counts
    m = Manifest.load(out)
    assert m.counts_dtype == "uint16"  # still two bytes per count on disk
    source = ad.read_h5ad(src)
    for info in m.shards:
        a = _read_zarr(out / info.path)
        assert isinstance(a.X, sp.csr_matrix)
        assert a.X.indices.dtype == np.int32 and a.X.data.dtype == np.float32
        rows = a.obs["source_row"].to_numpy()
        _arithmetic_matches(a.X, sp.csr_matrix(source.X)[rows])


def test_uint32_counts_read_as_exact_float64(tmp_path):
    """Counts above 65,535 are stored as uint32 and read as float64 (float32 would round)."""
    # 16,777,217 = 2**24 + 1 is not a float32
    x = sp.csr_matrix(np.array([[70_000, 0, 16_777_217], [1, 2, 3]], dtype=np.float64))
    src = _write_h5ad(tmp_path / "bulk.h5ad", x, "b")
    out = tmp_path / "s"
    m = convert([src], out, min_cells=0, min_genes=0, val_fraction=0.0, progress=False,
                log=lambda s: None)
    assert m.counts_dtype == "uint32" and m.read_dtypes == ("float64", "int32")
    a = _read_zarr(out / m.shards[0].path)
    assert a.X.dtype == np.float64
    _arithmetic_matches(a.X, x[a.obs["source_row"].to_numpy()])


def test_real_pbmc_shard_arithmetic(shared_data, tmp_path):
    """The 10x PBMC v3 counts: anndata's X of a shard gives X @ X.T as scipy in float64."""
    out = tmp_path / "pbmc"
    convert([shared_data / "scrna_pbmc_1k_v3_10x_qcfiltered"], out, min_cells=0, min_genes=0,
            val_fraction=0.0, progress=False, log=lambda s: None)
    m = Manifest.load(out)
    a = _read_zarr(out / m.shards[0].path)
    x = a.X[:400]
    ref = sp.csr_matrix((x.data.astype(np.float64), x.indices.astype(np.int64), x.indptr),
                        shape=x.shape)
    assert ref.data.max() > 255  # large enough counts that uint16 X @ X.T wrapped
    _arithmetic_matches(x, ref)


@pytest.mark.skipif(not ANNBATCH_PYTHON.is_file(),
                    reason="annbatch needs Python >= 3.12 in its own venv: python3.12 -m venv "
                           ".cache/annbatch-venv && .cache/annbatch-venv/bin/pip install annbatch "
                           "zarrs (as bench.loader uses it)")
def test_annbatch_batches_are_ordinary(big_counts):
    src, out = big_counts
    code = ("import json, sys, numpy as np, zarr, annbatch, warnings; warnings.simplefilter('ignore');"
            "zarr.config.set({'codec_pipeline.path': 'zarrs.ZarrsCodecPipeline'});"
            "col = annbatch.DatasetCollection(sys.argv[1], mode='r');"
            "ld = annbatch.Loader(chunk_size=16, preload_nchunks=4, batch_size=32, shuffle=True,"
            " drop_last=True, preload_to_gpu=False, rng=np.random.default_rng(0));"
            "ld.use_collection(col); b = next(iter(ld)); x = b['X'];"
            "print(json.dumps({'data': x.data.dtype.name, 'indices': x.indices.dtype.name,"
            " 'sum': float(x.astype(np.float64).power(2).sum()), 'rows': b['obs']['source_row'].tolist(),"
            " 'sq': float(x.power(2).sum())}))")
    r = subprocess.run([str(ANNBATCH_PYTHON), "-c", code, str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["data"] in ("float32", "float64") and got["indices"] in ("int32", "int64")
    ref = sp.csr_matrix(ad.read_h5ad(src).X, dtype=np.float64)[got["rows"]]
    assert got["sq"] == pytest.approx(ref.power(2).sum(), rel=1e-6)


# ------------------------------------------------------------------------------ corruption
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory, cells=1500, genes=300, perturbations=5, seed=3,
                            shard_cells=500, convert_seed=1, val_fraction=0.05)


def _copy(shards, tmp_path, codec_dir=None) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(codec_dir or shards, bad)
    return bad


def _chunk(bad: Path, shard: str, array: str, c: int = 0) -> tuple[Path, int, int]:
    """(file, byte offset, byte length) of inner chunk ``c`` of ``shard/X/array``."""
    meta = json.loads((bad / shard / "X" / array / "zarr.json").read_text())
    cfg = meta["codecs"][0]["configuration"]
    n = meta["chunk_grid"]["configuration"]["chunk_shape"][0] // cfg["chunk_shape"][0]
    f = bad / shard / "X" / array / "c" / "0"
    raw = f.read_bytes()
    index = np.frombuffer(raw[-(16 * n + 4):-4], dtype="<u8").reshape(-1, 2)
    return f, int(index[c, 0]), int(index[c, 1])


def _flip(f: Path, at: int, n: int = 4, zero: bool = False) -> None:
    b = bytearray(f.read_bytes())
    b[at:at + n] = bytes(n) if zero else bytes(x ^ 0xFF for x in b[at:at + n])
    f.write_bytes(bytes(b))


def _verify_cli(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "txfm.cli", "data", "verify", str(path),
                           "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _assert_cli_names(r: subprocess.CompletedProcess, *patterns: str) -> None:
    import re

    assert r.returncode == 2, (r.stdout, r.stderr)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in r.stderr, err
    for p in patterns:
        assert re.search(p, err[0]), (p, err[0])


def test_every_data_array_carries_checksums(shards):
    for meta_file in shards.rglob("zarr.json"):
        meta = json.loads(meta_file.read_text())
        if meta.get("node_type") != "array":
            continue
        codecs = meta["codecs"]
        if codecs[0]["name"] == "sharding_indexed":
            assert codecs[0]["configuration"]["index_codecs"][-1]["name"] == "crc32c"
            codecs = codecs[0]["configuration"]["codecs"]
        assert codecs[-1]["name"] == "crc32c", meta_file
    r = _verify_cli(shards)
    assert r.returncode == 0 and "intact" in r.stdout, r.stderr


@pytest.mark.parametrize("how", ["flip 4 bytes", "zero 4 KiB"])
@pytest.mark.parametrize("array", ["data", "indices"])
def test_corrupt_chunk_is_refused_and_named(shards, tmp_path, how, array):
    bad = _copy(shards, tmp_path)
    f, off, nbytes = _chunk(bad, "dataset_1", array, c=1)
    if how == "flip 4 bytes":
        _flip(f, off + nbytes // 2, 4)
    else:  # within the chunk, keeping its checksum trailer
        n = min(4096, nbytes - 4 - 8)
        _flip(f, off + 8, n, zero=True)
    # ids pushed out of range are caught by the (earlier) gene-id check, the rest by crc32c
    pattern = (r"dataset_1, cells? \d+(-\d+)? of the shard \(corpus cells? \d+(-\d+)?\).*"
               r"(crc32c|gene index)")
    for kwargs in ({}, {"mmap": False}):
        loader = ShardLoader(bad, 64, shuffle=False, chunk_size=64, buffer_size=256, **kwargs)
        with pytest.raises(ShardReadError, match=pattern):
            for _ in loader:
                pass
    report = Manifest.load(bad).verify()
    assert not report.ok and report.n_problems >= 1
    assert any("dataset_1" in p and "inner chunk 1" in p for p in report.problems)
    _assert_cli_names(_verify_cli(bad), r"dataset_1, cells? \d+(-\d+)?", r"inner chunk 1",
                      f"X/{array}/c/0")
    # without verification the loader reads on (what `verify=False` trades for speed)
    if array == "data":
        assert sum(b.batch_size for b in ShardLoader(bad, 64, verify=False)) > 0


def test_corrupt_compressed_chunk_is_refused(shards, tmp_path):
    raw = tmp_path / "raw"
    gen = generate(raw, cells=400, genes=100, perturbations=3, batches=1, seed=2)
    out = tmp_path / "lz4"
    convert(gen.datasets[:1], out, min_cells=1, min_genes=1, val_fraction=0.0, codec="lz4",
            progress=False, log=lambda s: None)
    f, off, nbytes = _chunk(out, "dataset_0", "data", c=0)
    _flip(f, off + nbytes // 2, 4)
    with pytest.raises(ShardReadError, match=r"dataset_0, cells? \d+(-\d+)?.*crc32c"):
        list(ShardLoader(out, 32, shuffle=False))
    _assert_cli_names(_verify_cli(out), "dataset_0", "crc32c")


def test_corrupt_obs_and_indptr_are_named(shards, tmp_path):
    bad = _copy(shards, tmp_path)
    codes = bad / "dataset_0" / "obs" / "dataset" / "codes" / "c" / "0"
    _flip(codes, 2, 4)
    with pytest.raises(ShardReadError, match=r"shard dataset_0 .*obs/dataset"):
        ShardLoader(bad, 64)
    _assert_cli_names(_verify_cli(bad), "dataset_0", "obs/dataset/codes",
                      "fails its crc32c checksum")  # not zarr's raw bytes
    shutil.rmtree(bad)
    bad = _copy(shards, tmp_path)
    indptr = bad / "val" / "dataset_0" / "X" / "indptr" / "c" / "0"
    _flip(indptr, 9, 4)
    with pytest.raises(ShardReadError, match=r"val/dataset_0.*X/indptr.*\(`txfm data verify` "
                                             r"on the shard folder .*--overwrite`\) mends them"):
        ShardLoader(bad, 16, split="val")
    _assert_cli_names(_verify_cli(bad), "val/dataset_0", "X/indptr")



@pytest.mark.parametrize("meta", ["zarr.json", "val/zarr.json", "dataset_1/zarr.json",
                                  "dataset_1/X/data/zarr.json", "dataset_1/X/indptr/zarr.json",
                                  "dataset_1/obs/dataset/codes/zarr.json"])
def test_damaged_zarr_json_is_named(shards, tmp_path, meta):
    """A truncated metadata file: `txfm data verify` names it; the loader either does not need
    it (zarr reads the shard's consolidated metadata) or names it in its error."""
    bad = _copy(shards, tmp_path)
    f = bad / meta
    f.write_text(f.read_text()[:30])
    _assert_cli_names(_verify_cli(bad), re.escape(str(f)), "metadata cannot be read",
                      "convert the inputs again")
    try:
        for split in ("train", "val"):
            list(ShardLoader(bad, 64, split=split))
    except ShardReadError as err:
        assert str(f) in str(err) and "convert the inputs again" in str(err), err


def test_every_chunk_is_written(tmp_path):
    """zarr skips chunks of fill values only by default, and reads an absent one as fill
    values; txfm writes them all, so that an absent chunk file can be called damage. A
    single-dataset corpus has obs/dataset codes that are all 0, the fill value."""
    from txfm.data.layout import missing_chunks

    gen = generate(tmp_path / "raw", cells=300, genes=60, perturbations=2, batches=1, seed=4)
    out = tmp_path / "one"
    convert(gen.datasets[:1], out, min_cells=1, min_genes=1, val_fraction=0.1, shard_cells=100,
            progress=False, log=lambda s: None)
    assert Manifest.load(out).every_chunk_written
    arrays = [f.parent for f in out.rglob("zarr.json")
              if json.loads(f.read_text()).get("node_type") == "array"]
    assert any(a.as_posix().endswith("obs/dataset/codes") for a in arrays)
    assert [m for a in arrays for m in missing_chunks(a)] == []


@pytest.mark.parametrize("chunk", ["obs/dataset/codes/c/0", "obs/cell_type/categories/c/0",
                                   "var/symbol/c/0", "X/indptr/c/0", "X/indices/c/0"])
def test_deleted_chunk_file_is_named(shards, tmp_path, chunk):
    """zarr (and so anndata.read_zarr) reads a deleted chunk as fill values: cells of dataset
    0, cell type 0, count 0. The loader and `txfm data verify` name the file instead."""
    bad = _copy(shards, tmp_path)
    f = bad / "dataset_1" / chunk
    f.unlink()
    _assert_cli_names(_verify_cli(bad), "dataset_1", re.escape(str(f)), "missing")
    if chunk.startswith("var/"):  # the loader reads no var
        return
    with pytest.raises(ShardReadError, match=rf"dataset_1.*{re.escape(str(f))}|dataset_1.*X/"):
        list(ShardLoader(bad, 64, obs_columns=("cell_type",)))

def test_verify_cli_errors_without_traceback(tmp_path):
    _assert_cli_names(_verify_cli(tmp_path / "nope"), "nope does not exist")
    (tmp_path / "empty").mkdir()
    _assert_cli_names(_verify_cli(tmp_path / "empty"), "not a complete txfm shard collection")


def test_format_1_collection_still_reads_but_cannot_be_verified(shards, tmp_path):
    """A collection written before chunk checksums: read as before, with a warning."""
    from txfm.data.layout import write_csr_store

    old = _copy(shards, tmp_path)
    m = Manifest.load(old)
    for info in m.shards:
        a = _read_zarr(old / info.path)
        x = a.X
        shutil.rmtree(old / info.path / "X")
        write_csr_store(old / info.path, indptr=x.indptr.astype(np.int64),
                        indices=x.indices.astype(np.uint16), counts=x.data.astype(np.uint16),
                        n_genes=m.n_genes, obs=a.obs, var=a.var, checksum=False)
    doc = json.loads((old / "manifest.json").read_text())
    doc["version"] = 1
    (old / "manifest.json").write_text(json.dumps(doc))
    with pytest.warns(RuntimeWarning, match="no per-chunk checksums"):
        loader = ShardLoader(old, 64, seed=2)
    ref = ShardLoader(shards, 64, seed=2)
    for b, r in zip(loader, ref):
        assert np.array_equal(b.cell_ids, r.cell_ids) and np.array_equal(b.counts, r.counts)
        assert np.array_equal(b.indices, r.indices)
    assert "format 1" in Manifest.load(old).summary()
    _assert_cli_names(_verify_cli(old), "no per-chunk checksums", "convert the inputs again")
