"""Damaged inputs, multi-genome 10x .h5, nullable obs dtypes and bad `txfm data` options.

Every fault must end in one ``error:`` line naming the file (and line) or option, exit
status 2, no traceback and no output folder left behind; nothing may convert with cells
silently missing. Expected matrices come from scipy (``mmwrite``/``mmread``) and numpy, the
expected ``obs`` from anndata reading the input.
"""
from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("anndata", reason="txfm.data needs anndata: pip install anndata zarr")
pytest.importorskip("zarr", reason="txfm.data needs zarr: pip install anndata zarr")

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from _shards import read_shards
from txfm.data.convert import LOCK, convert
from txfm.data.obs import ObsTables
from txfm.data.readers import InputError

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(min_cells=0, min_genes=0, progress=False, log=lambda s: None)


def cli(capsys, *args) -> tuple[int, str]:
    """``txfm ARGS`` in this process: (exit status, stderr)."""
    from txfm.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse refusals
        rc = exc.code
    return rc, capsys.readouterr().err


def assert_refused(rc: int, err: str, *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line holding every needle, no traceback."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def convert_cli(capsys, inputs, out, *extra) -> tuple[int, str]:
    return cli(capsys, "data", "convert", *inputs, "--out", out, "--min-cells", 0,
               "--min-genes", 0, "--quiet", *extra)


# ------------------------------------------------------------------------ 10x folders
N_GENES, N_CELLS = 40, 300


def tenx_folder(path: Path, *, gz: bool = False, seed: int = 0) -> tuple[Path, sp.csr_matrix]:
    """A Cell Ranger v3 folder written with scipy.io.mmwrite (genes x cells, grouped by
    cell); returns it and the cells x genes matrix."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    x = sp.random(N_CELLS, N_GENES, density=0.3, random_state=seed, format="csr")
    x.data = rng.integers(1, 60, x.nnz).astype(np.float64)
    mtx = path / "matrix.mtx"
    scipy.io.mmwrite(mtx, x.T.tocsc(), field="integer")  # CSC of genes x cells: cell by cell
    feats = "".join(f"ENSG{i:011d}\tG{i}\tGene Expression\n" for i in range(N_GENES))
    bars = "".join(f"BC{i:05d}-1\n" for i in range(N_CELLS))
    (path / "features.tsv").write_text(feats)
    (path / "barcodes.tsv").write_text(bars)
    if gz:
        for f in ("matrix.mtx", "features.tsv", "barcodes.tsv"):
            data = (path / f).read_bytes()
            (path / f).unlink()
            (path / (f + ".gz")).write_bytes(gzip.compress(data))
    return path, x


def mtx_of(folder: Path) -> Path:
    return next(folder.glob("matrix.mtx*"))


def read_text(p: Path) -> str:
    return (gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()).decode()


def write_text(p: Path, text: str) -> None:
    data = text.encode()
    p.write_bytes(gzip.compress(data) if p.suffix == ".gz" else data)


def test_complete_folder_converts_exactly(tmp_path, capsys):
    folder, x = tenx_folder(tmp_path / "ok")
    rc, err = convert_cli(capsys, [folder], tmp_path / "out", "--val-fraction", 0)
    assert rc == 0, err
    _, got, obs = read_shards(tmp_path / "out")
    ref = sp.csr_matrix(scipy.io.mmread(mtx_of(folder)).T)  # independent reader
    assert abs(got - ref[obs["source_row"].to_numpy()]).sum() == 0
    assert abs(ref - x).sum() == 0 and got.shape[0] == N_CELLS


@pytest.mark.parametrize("gz", [False, True])
def test_mtx_cut_at_a_line_boundary_is_refused(tmp_path, capsys, gz):
    """The reported fault: a third of the entry lines gone, exit 0, cells silently dropped."""
    folder, _ = tenx_folder(tmp_path / "cut", gz=gz)
    mtx = mtx_of(folder)
    lines = read_text(mtx).splitlines(keepends=True)
    declared = int(lines[2].split()[2])
    keep = 3 + (2 * declared) // 3
    write_text(mtx, "".join(lines[:keep]))
    out = tmp_path / "out"
    rc, err = convert_cli(capsys, [folder], out)
    assert_refused(rc, err, str(mtx), f"declares {declared} entries", f"holds {keep - 3}")
    assert not out.exists()  # nothing half-written


def test_mtx_cut_mid_line_is_refused(tmp_path, capsys):
    """Cut inside the last value: the entry count still matches, the value is wrong."""
    folder, _ = tenx_folder(tmp_path / "cut")
    mtx = mtx_of(folder)
    text = mtx.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    assert len(last.split()[2]) == 2 or pytest.skip("last value has one digit")
    mtx.write_text(text.rstrip("\n")[:-1])  # "12 300 47" -> "12 300 4"
    rc, err = convert_cli(capsys, [folder], tmp_path / "out")
    assert_refused(rc, err, str(mtx), "does not end with a newline")


def test_truncated_gz_files_are_refused(tmp_path, capsys):
    for name in ("matrix.mtx.gz", "features.tsv.gz", "barcodes.tsv.gz"):
        folder, _ = tenx_folder(tmp_path / name, gz=True)
        f = folder / name
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        out = tmp_path / f"out_{name}"
        rc, err = convert_cli(capsys, [folder], out)
        assert_refused(rc, err, str(f), "truncated")
        assert not out.exists()


@pytest.mark.parametrize("name", ["matrix.mtx", "features.tsv", "barcodes.tsv"])
def test_a_file_both_plain_and_gzipped_is_refused(tmp_path, capsys, name):
    """A folder holding matrix.mtx and matrix.mtx.gz (a `gunzip -k`, an edited copy) was read
    from the plain one without a word, whichever held the counts."""
    folder, _ = tenx_folder(tmp_path / "tenx")
    (folder / (name + ".gz")).write_bytes(gzip.compress((folder / name).read_bytes()))
    rc, err = convert_cli(capsys, [folder], tmp_path / "out")
    assert_refused(rc, err, str(folder), f"holds both {name} and {name}.gz")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fault, needle", [
    ("extra field", "4 fields, 3 expected"),
    ("missing value", "2 fields, 3 expected"),
    ("row outside", "outside the declared 40 x 300 matrix"),
    ("not a number", "not numbers"),
    ("non-finite", "not a finite number"),
])
def test_malformed_entry_is_named_by_line(tmp_path, capsys, fault, needle):
    folder, _ = tenx_folder(tmp_path / "bad")
    mtx = mtx_of(folder)
    lines = mtx.read_text().splitlines(keepends=True)
    k = 3 + 700  # 1-based line number k + 1
    r, c, v = lines[k].split()
    lines[k] = {"extra field": f"{r} {c} {v} 7\n", "missing value": f"{r} {c}\n",
                "row outside": f"41 {c} {v}\n", "not a number": f"{r} x{c} {v}\n",
                "non-finite": f"{r} {c} 1e999\n"}[fault]
    mtx.write_text("".join(lines))
    rc, err = convert_cli(capsys, [folder], tmp_path / "out")
    assert_refused(rc, err, f"{mtx}, line {k + 1}", needle)


@pytest.mark.parametrize("fault, needle", [
    ("empty features", "the feature table file is empty"),
    ("empty barcodes", "the barcodes file is empty"),
    ("ragged features", "line 5: 2 tab-separated fields, but line 1 has 3"),
    ("barcode missing", "lists 40 features and barcodes.tsv 299 barcodes"),
    ("feature missing", "lists 39 features"),
    ("bad banner", "line 1: not a MatrixMarket header"),
    ("bad size line", "line 3: expected the size line"),
    ("dense mtx", "format 'array' not supported"),
])
def test_folder_declarations_are_checked(tmp_path, capsys, fault, needle):
    folder, _ = tenx_folder(tmp_path / "bad")
    feats, bars, mtx = folder / "features.tsv", folder / "barcodes.tsv", mtx_of(folder)
    if fault == "empty features":
        feats.write_text("")
    elif fault == "empty barcodes":
        bars.write_text("")
    elif fault == "ragged features":
        lines = feats.read_text().splitlines(keepends=True)
        lines[4] = "ENSG00000000004\tG4\n"
        feats.write_text("".join(lines))
    elif fault == "barcode missing":
        bars.write_text("".join(bars.read_text().splitlines(keepends=True)[:-1]))
    elif fault == "feature missing":
        feats.write_text("".join(feats.read_text().splitlines(keepends=True)[:-1]))
    else:
        lines = mtx.read_text().splitlines(keepends=True)
        if fault == "bad banner":
            lines[0] = "%%NotMatrixMarket\n"
        elif fault == "bad size line":
            lines[2] = "40 300\n"
        else:
            lines[0] = "%%MatrixMarket matrix array integer general\n"
        mtx.write_text("".join(lines))
    rc, err = convert_cli(capsys, [folder], tmp_path / "out")
    bad = {"empty features": feats, "empty barcodes": bars,
           "ragged features": feats}.get(fault, mtx)
    assert_refused(rc, err, str(bad), needle)


# --------------------------------------------------------------------------- 10x .h5
def write_v2_h5(path: Path, genomes: dict[str, np.ndarray], barcodes=None) -> None:
    """Cell Ranger v2 layout (as scanpy's read_10x_h5 reads it): one group per genome with
    barcodes, data (int32), gene_names, genes, indices, indptr (CSC of genes x cells =
    CSR of cells x genes) and shape = (genes, cells)."""
    with h5py.File(path, "w") as f:
        for name, x in genomes.items():
            m = sp.csr_matrix(x)
            g = f.create_group(name)
            bc = barcodes[name] if barcodes else [f"AAAC{i:05d}-1" for i in range(x.shape[0])]
            g["barcodes"] = np.array([b.encode() for b in bc])
            g["data"] = m.data.astype(np.int32)
            g["indices"] = m.indices.astype(np.int64)
            g["indptr"] = m.indptr.astype(np.int64)
            g["shape"] = np.array([x.shape[1], x.shape[0]], dtype=np.int32)
            prefix = "ENSG" if name.startswith("hg") else "ENSMUSG"
            g["genes"] = np.array([f"{name}_{prefix}{i:011d}".encode() for i in range(x.shape[1])])
            g["gene_names"] = np.array([f"{name}_G{i}".encode() for i in range(x.shape[1])])


def write_v3_h5(path: Path, x: np.ndarray, genome: list[str]) -> None:
    m = sp.csr_matrix(x)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data.astype(np.int32), m.indices, m.indptr
        g["shape"] = np.array([x.shape[1], x.shape[0]], dtype=np.int32)
        g["barcodes"] = np.array([f"BC{i}-1".encode() for i in range(x.shape[0])])
        ft = g.create_group("features")
        ft["id"] = np.array([f"{gn}_ENSG{i:011d}".encode() for i, gn in enumerate(genome)])
        ft["name"] = np.array([f"{gn}_G{i}".encode() for i, gn in enumerate(genome)])
        ft["feature_type"] = np.array([b"Gene Expression"] * len(genome))
        ft["genome"] = np.array([gn.encode() for gn in genome])


@pytest.fixture
def barnyard(tmp_path):
    rng = np.random.default_rng(5)
    hg, mm = rng.poisson(1.2, (50, 9)), rng.poisson(1.2, (50, 6))
    path = tmp_path / "filtered_gene_bc_matrices_h5.h5"
    write_v2_h5(path, {"hg19": hg, "mm10": mm})
    return path, hg, mm


def shards_dense(out: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    m, x, obs = read_shards(out)
    return x.toarray(), m.gene_ids, obs["source_row"].to_numpy()


def test_v2_h5_with_two_genomes_reads_all_by_default(barnyard, tmp_path, capsys):
    path, hg, mm = barnyard
    rc, err = convert_cli(capsys, [path], tmp_path / "out")
    assert rc == 0, err
    x, genes, rows = shards_dense(tmp_path / "out")
    expected_genes = ([f"hg19_ENSG{i:011d}" for i in range(9)]
                      + [f"mm10_ENSMUSG{i:011d}" for i in range(6)])
    order = [genes.index(g) for g in expected_genes]
    np.testing.assert_array_equal(x[:, order], np.hstack([hg, mm])[rows])


@pytest.mark.parametrize("genome, cols", [("mm10", slice(9, 15)), ("hg19", slice(0, 9)),
                                          ("hg19,mm10", slice(0, 15))])
def test_v2_h5_genome_option(barnyard, tmp_path, capsys, genome, cols):
    path, hg, mm = barnyard
    rc, err = convert_cli(capsys, [path], tmp_path / "out", "--genome", genome)
    assert rc == 0, err
    x, genes, rows = shards_dense(tmp_path / "out")
    names = ([f"hg19_ENSG{i:011d}" for i in range(9)] + [f"mm10_ENSMUSG{i:011d}" for i in range(6)])
    want = names[cols]
    assert sorted(genes) == sorted(want)
    np.testing.assert_array_equal(x[:, [genes.index(g) for g in want]],
                                  np.hstack([hg, mm])[rows][:, cols])


def test_h5_unknown_genome_names_the_available_ones(barnyard, tmp_path, capsys):
    path, _, _ = barnyard
    rc, err = convert_cli(capsys, [path], tmp_path / "out", "--genome", "rn6")
    assert_refused(rc, err, str(path), "'rn6'", "hg19, mm10")
    assert not (tmp_path / "out").exists()


def test_v2_index_past_its_genome_is_refused(barnyard, tmp_path, capsys):
    """hg19's feature 9 does not exist; side by side it would silently be mm10's first gene."""
    path, _, _ = barnyard
    with h5py.File(path, "a") as f:
        f["hg19/indices"][3] = 9
    rc, err = convert_cli(capsys, [path], tmp_path / "out")
    assert_refused(rc, err, str(path), "/hg19/indices: feature index 9")


def test_v2_genomes_with_different_barcodes_are_named(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "m.h5"
    write_v2_h5(path, {"hg19": rng.poisson(1, (4, 3)), "mm10": rng.poisson(1, (4, 3))},
                barcodes={"hg19": ["A-1", "B-1", "C-1", "D-1"],
                          "mm10": ["A-1", "B-1", "C-1", "E-1"]})
    rc, err = convert_cli(capsys, [path], tmp_path / "out")
    assert_refused(rc, err, str(path), "/hg19", "/mm10", "--genome")
    rc, err = convert_cli(capsys, [path], tmp_path / "out", "--genome", "mm10")
    assert rc == 0, err


def test_v3_h5_genome_option_selects_features(tmp_path, capsys):
    rng = np.random.default_rng(2)
    x = rng.poisson(1.5, (40, 7))
    genome = ["GRCh38"] * 4 + ["mm10"] * 3
    path = tmp_path / "v3.h5"
    write_v3_h5(path, x, genome)
    rc, err = convert_cli(capsys, [path], tmp_path / "all")
    assert rc == 0, err
    assert len(shards_dense(tmp_path / "all")[1]) == 7
    rc, err = convert_cli(capsys, [path], tmp_path / "mm", "--genome", "mm10")
    assert rc == 0, err
    got, genes, rows = shards_dense(tmp_path / "mm")
    want = [f"mm10_ENSG{i:011d}" for i in range(4, 7)]
    assert sorted(genes) == want
    np.testing.assert_array_equal(got[:, [genes.index(g) for g in want]], x[rows][:, 4:])
    rc, err = convert_cli(capsys, [path], tmp_path / "no", "--genome", "hg19")
    assert_refused(rc, err, str(path), "'hg19'", "GRCh38, mm10")


@pytest.mark.parametrize("fault, needle", [
    ("indptr short", "indptr has 50 entries but the shape needs 51"),
    ("data short", "stores 99 values but"),
    ("indptr end", "not a valid offset array"),
    ("shape genes", "shape declares 10 features but the feature table lists 9"),
    ("barcodes short", "barcodes lists 49"),
    ("no indices", "lacks indices"),
    ("index outside", "feature index 9 in cells"),
])
def test_h5_declarations_are_checked(tmp_path, capsys, fault, needle):
    rng = np.random.default_rng(3)
    path = tmp_path / "x.h5"
    x = rng.poisson(1.0, (50, 9))
    write_v2_h5(path, {"hg19": x})
    with h5py.File(path, "a") as f:
        g = f["hg19"]
        if fault == "indptr short":
            ip = g["indptr"][:-1]
            del g["indptr"]
            g["indptr"] = ip
        elif fault in ("data short", "indptr end"):
            d = g["data"][:99] if fault == "data short" else g["data"][:]
            del g["data"]
            g["data"] = d
            if fault == "indptr end":
                ip = g["indptr"][:]
                ip[-1] += 5
                del g["indptr"]
                g["indptr"] = ip
        elif fault == "shape genes":
            g["shape"][0] = 10
        elif fault == "barcodes short":
            b = g["barcodes"][:-1]
            del g["barcodes"]
            g["barcodes"] = b
        elif fault == "no indices":
            del g["indices"]
        else:
            g["indices"][3] = 9
    rc, err = convert_cli(capsys, [path], tmp_path / "out")
    assert_refused(rc, err, str(path), needle)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ h5ad
def write_h5ad(path: Path, x, obs=None) -> Path:
    a = ad.AnnData(X=sp.csr_matrix(np.asarray(x, dtype=np.float32)), obs=obs,
                   var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(np.shape(x)[1])]))
    if obs is None:
        a.obs_names = [f"{path.stem}_{i}" for i in range(a.n_obs)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.settings.allow_write_nullable_strings = True
        try:
            a.write_h5ad(path)
        finally:
            ad.settings.allow_write_nullable_strings = False
    return path


@pytest.mark.parametrize("fault, needle", [
    ("indptr end", "X/indptr is not a valid offset array"),
    ("indices short", "stores 200 values but 199 indices"),
    ("obs rows", "obs has 29 rows but X has 30"),
    ("index outside", "feature index 12 in cells"),
])
def test_h5ad_declarations_are_checked(tmp_path, capsys, fault, needle):
    rng = np.random.default_rng(4)
    x = np.zeros((30, 12))
    x.flat[rng.choice(x.size, 200, replace=False)] = rng.integers(1, 9, 200)
    path = write_h5ad(tmp_path / "d.h5ad", x)
    with h5py.File(path, "a") as f:
        g = f["X"]
        if fault == "indptr end":
            g["indptr"][-1] = 150
        elif fault == "indices short":
            i = g["indices"][:-1]
            del g["indices"]
            g["indices"] = i
        elif fault == "obs rows":
            idx = f["obs"]["_index"][:-1]
            del f["obs"]["_index"]
            f["obs"]["_index"] = idx
        else:
            g["indices"][5] = 12
    rc, err = convert_cli(capsys, [path], tmp_path / "out")
    assert_refused(rc, err, str(path), needle)


def _store_values(path: Path, key: str, dtype) -> None:
    """Rewrite ``key`` (a sparse group's ``data``, or a dense array) with ``dtype`` values, as
    h5py can and scipy.sparse, and so anndata's writer, cannot (float16)."""
    with h5py.File(path, "a") as f:
        target = f[key]["data"] if isinstance(f[key], h5py.Group) else f[key]
        name, values = target.name, target[...]
        del f[name]
        f[name] = values.astype(dtype)


@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
@pytest.mark.parametrize("dtype", ["float16", "uint8", "int16", "bool"])
def test_every_numeric_value_dtype_converts_exactly(tmp_path, capsys, layout, dtype):
    # scipy.sparse cannot hold float16 (anndata cannot load such a file); the reader widens it
    rng = np.random.default_rng(7)
    x = np.zeros((40, 12))
    x.flat[rng.choice(x.size, 150, replace=False)] = 1 if dtype == "bool" else rng.integers(1, 100, 150)
    path = tmp_path / "d.h5ad"
    stored = {"csr": sp.csr_matrix(x), "csc": sp.csc_matrix(x), "dense": x}[layout]
    ad.AnnData(X=stored, var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(12)])
               ).write_h5ad(path)
    _store_values(path, "X", dtype)
    rc, err = convert_cli(capsys, [path], tmp_path / "out", "--val-fraction", 0)
    assert rc == 0, err
    _, got, obs = read_shards(tmp_path / "out")
    assert abs(got - sp.csr_matrix(x)[obs["source_row"].to_numpy()]).sum() == 0
    warned = [line for line in err.splitlines()
              if line.startswith("warning:") and "X is CSC" not in line]
    assert warned == ([f"warning: {path}: every count is 0 or 1 (binarised data?): TxFM learns "
                       f"from raw UMI counts. If the file keeps its raw counts in .raw or a "
                       f"layer, pass --raw or --layer NAME (this input alone: --counts d=raw "
                       f"or =layers/NAME)"]
                      if dtype == "bool" else []), err


def test_float16_counts_above_its_exact_range_are_warned_about(tmp_path, capsys):
    x = np.ones((10, 12))
    x[3, 4] = 5000  # float16 stores 5000 exactly, but not 5001: the writer may have rounded
    path = write_h5ad(tmp_path / "d.h5ad", x)
    _store_values(path, "X", "float16")
    rc, err = convert_cli(capsys, [path], tmp_path / "out")
    assert rc == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and f"{path}: X stores the counts as float16" in warned[0], err
    assert "exactly only up to 2,048" in warned[0]


def test_counts_that_are_not_numbers_are_refused(tmp_path, capsys):
    path = write_h5ad(tmp_path / "d.h5ad", np.ones((10, 12)))
    _store_values(path, "X", "complex64")
    rc, err = convert_cli(capsys, [path], tmp_path / "out")
    assert_refused(rc, err, str(path), "X holds complex64 values, not numbers")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("values", ["fractional", "binary", "strings"])
def test_a_10x_h5_is_not_told_to_pick_a_layer_it_cannot_have(tmp_path, capsys, values):
    # --raw, --layer and --counts choose among an .h5ad's matrices; a 10x file has one
    x = np.random.default_rng(3).poisson(2.0, (30, 8)) + 1.0
    path = tmp_path / "m.h5"
    write_v3_h5(path, x, ["GRCh38"] * 8)
    with h5py.File(path, "a") as f:
        d = f["matrix/data"][:].astype(np.float64)
        del f["matrix/data"]
        f["matrix/data"] = {"fractional": d + 0.5, "binary": np.ones_like(d),
                            "strings": d.astype("S8")}[values]
    rc, err = convert_cli(capsys, [path], tmp_path / "out")
    said = [line for line in err.splitlines() if line.startswith(("error:", "warning:"))]
    assert len(said) == 1 and str(path) in said[0], err
    assert not any(o in said[0] for o in ("--raw", "--layer", "--counts")), said[0]
    if values == "binary":
        assert rc == 0 and "A 10x matrix holds Cell Ranger's raw UMI counts" in said[0]
    else:
        assert_refused(rc, err, {"fractional": "A 10x matrix holds Cell Ranger's raw UMI counts",
                                 "strings": "holds |S8 values, not numbers"}[values])
    if values == "strings":  # the readers of txfm embed say it the same way, once
        rc, err = cli(capsys, "eval", "perturbation", "--embeddings", path,
                      "--perturbation-key", "p")
        assert_refused(rc, err, f"error: --input {path}: /matrix/data holds |S8 values"
                       .replace("--input", "--embeddings"))


def test_a_float16_sparse_h5ad_is_named_by_the_anndata_readers(tmp_path, capsys):
    # anndata cannot load it at all (scipy.sparse has no float16): the message must say so,
    # not suggest a damaged file
    path = write_h5ad(tmp_path / "d.h5ad", np.ones((10, 12)))
    _store_values(path, "X", "float16")
    rc, err = cli(capsys, "eval", "perturbation", "--embeddings", path,
                  "--perturbation-key", "p")
    line = assert_refused(rc, err, str(path), "X stores float16 values in a sparse matrix",
                          "float32")
    assert "interrupted" not in line


# ------------------------------------------------------------------------- obs dtypes
def obs_frame(n: int, seed: int = 0) -> pd.DataFrame:
    """One column of every obs dtype anndata writes, each with missing values."""
    rng = np.random.default_rng(seed)
    na = rng.random(n) < 0.2

    def masked(values, dtype):
        return pd.array([None if m else v for v, m in zip(values, na)], dtype=dtype)

    ints = rng.integers(0, 200, n)
    return pd.DataFrame({
        "n_Int64": masked(ints.tolist(), "Int64"),
        "n_Int32": masked(ints.tolist(), "Int32"),
        "n_UInt8": masked(ints.tolist(), "UInt8"),
        "flag": masked((ints % 2 == 0).tolist(), "boolean"),
        "label": masked([f"s{v % 7}" for v in ints], "string"),
        "cell_type": pd.Categorical([None if m else f"t{v % 4}" for v, m in zip(ints, na)]),
        "stage": pd.Categorical([None if m else ["late", "early", "mid"][v % 3]
                                 for v, m in zip(ints, na)],
                                categories=["early", "mid", "late"], ordered=True),
        "clone": pd.Categorical([None if m else int(v % 5) for v, m in zip(ints, na)]),
        "qc_pass": ints % 3 == 0,
        "score": np.where(na, np.nan, ints / 7).astype(np.float32),
        "count": ints.astype(np.int64),
        "donor": np.array([f"d{v % 3}" for v in ints], dtype=object),
    }, index=[f"c{i}" for i in range(n)])


def assert_obs_kept(got: pd.Series, inp: pd.Series, check_dtype: bool = True) -> None:
    """``got`` holds ``inp``'s values and missing values (and its dtype, but strings, which
    are stored as categoricals, as anndata's own writer does)."""
    got, inp = got.reset_index(drop=True), inp.reset_index(drop=True)
    np.testing.assert_array_equal(got.isna().to_numpy(), inp.isna().to_numpy())
    if isinstance(inp.dtype, pd.StringDtype) or inp.dtype == object:
        assert isinstance(got.dtype, pd.CategoricalDtype)
        assert got.astype(object).where(got.notna(), None).tolist() == \
            inp.astype(object).where(inp.notna(), None).tolist()
        return
    if not check_dtype:
        got, inp = got.astype(object), inp.astype(object)
    pd.testing.assert_series_equal(got, inp, check_names=False)


def test_every_obs_dtype_survives_conversion(tmp_path):
    n = 120
    path = write_h5ad(tmp_path / "d.h5ad", np.random.default_rng(0).poisson(2, (n, 6)),
                      obs=obs_frame(n))
    inp = ad.read_h5ad(path).obs  # the reference: what anndata hands over
    assert str(inp["n_Int64"].dtype) == "Int64" and inp["n_Int64"].isna().any()
    out = tmp_path / "out"
    convert([path], out, val_fraction=0.1, shard_cells=40, **QUIET)
    _, _, obs = read_shards(out)
    rows = obs["source_row"].to_numpy()
    for c in inp.columns:
        assert_obs_kept(obs[c], inp[c].iloc[rows])
    assert obs["stage"].cat.ordered
    assert list(obs["stage"].cat.categories) == ["early", "mid", "late"]


def test_obs_columns_missing_from_a_dataset_become_missing_values(tmp_path):
    rng = np.random.default_rng(1)
    a = write_h5ad(tmp_path / "a.h5ad", rng.poisson(2, (30, 5)), obs=obs_frame(30, seed=1))
    b_obs = obs_frame(20, seed=2)[["stage", "count"]].rename(index=lambda s: "b" + s)
    b = write_h5ad(tmp_path / "b.h5ad", rng.poisson(2, (20, 5)), obs=b_obs)
    out = tmp_path / "out"
    convert([a, b], out, val_fraction=0.0, shard_cells=16, **QUIET)
    _, _, obs = read_shards(out)
    inputs = {"a": ad.read_h5ad(a).obs, "b": ad.read_h5ad(b).obs}
    for name, inp in inputs.items():
        sel = (obs["dataset"] == name).to_numpy()
        rows = obs["source_row"].to_numpy()[sel]
        for c in obs.columns.drop(["dataset", "source_row"]):
            if c in inp:  # dtypes widened where another dataset lacks the column
                assert_obs_kept(obs[c][sel], inp[c].iloc[rows], check_dtype=False)
            else:
                assert obs[c][sel].isna().all(), c
    assert str(obs["n_Int64"].dtype) == "Int64" and str(obs["flag"].dtype) == "boolean"
    assert str(obs["qc_pass"].dtype) == "boolean"  # numpy bool, missing from b
    assert obs["count"].dtype == np.int64  # numpy ints in every dataset stay ints
    assert obs["stage"].cat.ordered



def test_large_integer_obs_are_kept_exactly_when_inputs_differ(tmp_path):
    """An int64 id column missing from one input, or int64 beside uint64, used to become
    float64 (ids beyond 2^53 collapsed); they are nullable ints now, every value exact."""
    rng = np.random.default_rng(0)
    a_obs = pd.DataFrame({"uid": (2**60 + np.arange(30)).astype(np.int64),
                          "both": (2**60 + np.arange(30)).astype(np.int64)},
                         index=[f"a{i}" for i in range(30)])
    b_obs = pd.DataFrame({"both": np.arange(20, dtype=np.uint64)},
                         index=[f"b{i}" for i in range(20)])
    a = write_h5ad(tmp_path / "a.h5ad", rng.poisson(2, (30, 5)), obs=a_obs)
    b = write_h5ad(tmp_path / "b.h5ad", rng.poisson(2, (20, 5)), obs=b_obs)
    convert([a, b], tmp_path / "out", val_fraction=0.0, shard_cells=16, **QUIET)
    _, _, obs = read_shards(tmp_path / "out")
    from_a = (obs["dataset"] == "a").to_numpy()
    rows = obs["source_row"].to_numpy()
    assert str(obs["uid"].dtype) == "Int64" and obs["uid"][~from_a].isna().all()
    np.testing.assert_array_equal(obs["uid"][from_a].to_numpy(np.int64), 2**60 + rows[from_a])
    assert str(obs["both"].dtype) == "int64"
    np.testing.assert_array_equal(obs["both"].to_numpy()[~from_a], rows[~from_a])
    c_obs = pd.DataFrame({"both": np.full(20, 2**63 + 5, dtype=np.uint64)},
                         index=[f"c{i}" for i in range(20)])
    c = write_h5ad(tmp_path / "c.h5ad", rng.poisson(2, (20, 5)), obs=c_obs)
    with pytest.raises(InputError, match=r"obs column 'both'.*no integer dtype holds both"):
        convert([a, c], tmp_path / "out2", val_fraction=0.0, **QUIET)

def test_loader_returns_every_numeric_obs_value_exactly(tmp_path):
    """ShardLoader's obs tensors hold the values anndata reads: large ids in nullable Int64
    (with <NA>) and in float64 are not rounded through float32, and a missing value is NaN."""
    import torch

    from txfm.data import ShardLoader

    n = 40
    ids = [2**40 + 7 * i + 1 for i in range(n)]
    obs = pd.DataFrame({
        "id_na": pd.array([None if i % 5 == 0 else v for i, v in enumerate(ids)], dtype="Int64"),
        "id_full": pd.array(ids, dtype="Int64"),
        "umi_f64": np.array([2.0**30 + i + 0.5 for i in range(n)]),
        "score_f32": np.arange(n, dtype=np.float32) / 3,
        "count": np.arange(n, dtype=np.int64) * 3,
        "ok": np.arange(n) % 2 == 0,
    }, index=[f"c{i}" for i in range(n)])
    path = write_h5ad(tmp_path / "a.h5ad", np.random.default_rng(0).poisson(2, (n, 5)), obs=obs)
    convert([path], tmp_path / "out", val_fraction=0.0, shard_cells=16, **QUIET)
    cols = tuple(obs.columns)
    loader = ShardLoader(tmp_path / "out", n, drop_last=False, shuffle=False,
                         obs_columns=cols + ("source_row",))
    (b,) = list(loader)
    rows = b.obs["source_row"].numpy()
    want = {"id_na": torch.float64, "id_full": torch.int64, "umi_f64": torch.float64,
            "score_f32": torch.float32, "count": torch.int64, "ok": torch.bool}
    for c in cols:
        got = b.obs[c]
        assert got.dtype == want[c], c
        expected = obs[c].iloc[rows].to_numpy(dtype=got.numpy().dtype, na_value=np.nan) \
            if c == "id_na" else obs[c].iloc[rows].to_numpy()
        np.testing.assert_array_equal(got.numpy(), expected, err_msg=c)
    assert torch.isnan(b.obs["id_na"]).sum() == obs["id_na"].isna().sum()


def test_loader_refuses_an_obs_column_it_cannot_hold_exactly(tmp_path):
    from txfm.data import ShardLoader
    from txfm.data.layout import ShardReadError

    obs = pd.DataFrame({"big": pd.array([2**60, None, 3, 4], dtype="Int64")},
                       index=list("abcd"))
    path = write_h5ad(tmp_path / "a.h5ad", np.ones((4, 3)), obs=obs)
    convert([path], tmp_path / "out", val_fraction=0.0, **QUIET)
    with pytest.raises(ShardReadError, match=r"obs column 'big'.*2\^53.*categorical"):
        ShardLoader(tmp_path / "out", 2, obs_columns=("big",))
    ShardLoader(tmp_path / "out", 2)  # without the column, the loader works

def test_ordered_categories_that_differ_name_the_files_and_column(tmp_path, capsys):
    rng = np.random.default_rng(1)
    a = write_h5ad(tmp_path / "a.h5ad", rng.poisson(2, (10, 5)), obs=pd.DataFrame(
        {"stage": pd.Categorical(["lo", "hi"] * 5, categories=["lo", "hi"], ordered=True)},
        index=[f"a{i}" for i in range(10)]))
    b = write_h5ad(tmp_path / "b.h5ad", rng.poisson(2, (10, 5)), obs=pd.DataFrame(
        {"stage": pd.Categorical(["hi", "lo"] * 5, categories=["hi", "lo"], ordered=True)},
        index=[f"b{i}" for i in range(10)]))
    rc, err = convert_cli(capsys, [a, b], tmp_path / "out")
    assert_refused(rc, err, str(a), str(b), "obs column 'stage'", "ordered")
    assert not (tmp_path / "out").exists()


def test_unreadable_obs_column_names_file_and_column(tmp_path, capsys):
    path = write_h5ad(tmp_path / "d.h5ad", np.ones((8, 4)), obs=obs_frame(8)[["n_Int64", "stage"]])
    with h5py.File(path, "a") as f:  # written by a future anndata, say
        f["obs"]["n_Int64"].attrs["encoding-type"] = "nullable-something-new"
    rc, err = convert_cli(capsys, [path], tmp_path / "out")
    assert_refused(rc, err, str(path), "obs column 'n_Int64'")
    assert not (tmp_path / "out").exists()


def test_nullable_float_obs_is_stored_as_float_with_nan(tmp_path):
    """anndata cannot write pandas ``Float64``; the values and the missing ones must survive
    as float64 + NaN, in a frame anndata writes and reads back."""
    import zarr

    col = pd.array([1.5, None, 3.25, None], dtype="Float64")
    t = ObsTables([pd.DataFrame({"f": col}, index=list("abcd"))], ["d"], [4], ["in.h5ad"])
    frame = t.frame(np.zeros(4, np.int32), np.array([3, 2, 1, 0]))
    g = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: "autosharding will be the default"
        ad.io.write_elem(g, "obs", frame)
    back = ad.io.read_elem(g["obs"])["f"].to_numpy()
    expected = col.to_numpy(dtype=np.float64, na_value=np.nan)[[3, 2, 1, 0]]
    np.testing.assert_array_equal(back, expected)


# ----------------------------------------------------------------- bad options and paths
@pytest.fixture(scope="module")
def small_input(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    return write_h5ad(d / "small.h5ad", np.random.default_rng(0).poisson(2, (30, 6)))


@pytest.mark.parametrize("option, value", [
    ("--shard-cells", "-5"), ("--shard-cells", "0"), ("--shard-mb", "0"), ("--shard-mb", "-1"),
    ("--shard-mb", "nan"), ("--shard-mb", "inf"), ("--val-fraction", "nan"),
    ("--val-fraction", "-0.1"), ("--val-fraction", "1"), ("--min-cells", "-1"),
    ("--min-genes", "-3"), ("--seed", "-1"),
])
def test_bad_convert_numbers_are_refused(small_input, tmp_path, capsys, option, value):
    out = tmp_path / "out"
    rc, err = cli(capsys, "data", "convert", small_input, "--out", out, option, value)
    assert_refused(rc, err, option)
    assert not out.exists()


@pytest.mark.parametrize("option, value", [
    ("--cells", "0"), ("--genes", "-1"), ("--perturbations", "0"), ("--batches", "0"),
    ("--bulk", "-1"), ("--programs", "0"), ("--programs", "-3"), ("--seed", "-1"),
])
def test_bad_synth_numbers_are_refused(tmp_path, capsys, option, value):
    rc, err = cli(capsys, "data", "synth", "--out", tmp_path / "raw", option, value)
    assert_refused(rc, err, option)
    assert not (tmp_path / "raw").exists()


def test_synth_refuses_more_perturbations_than_it_has_targets(tmp_path, capsys):
    # it used to cap them silently (22 of 100,000) and exit 0
    rc, err = cli(capsys, "data", "synth", "--out", tmp_path / "raw", "--cells", "100",
                  "--genes", "50", "--perturbations", "100000")
    assert_refused(rc, err, "--perturbations")
    assert "at most" in err and "--genes" in err
    assert not (tmp_path / "raw").exists()
    from txfm.data.synth import generate

    with pytest.raises(ValueError, match="gene programs"):
        generate(tmp_path / "api", cells=100, genes=250, perturbations=30, programs=22,
                 program_size=(4, 6), distinct_programs=True)
    assert not (tmp_path / "api").exists()
    from txfm.eval import sanity  # the metrics' ground-truth check makes its data the same way

    with pytest.raises(SystemExit) as exc:
        sanity.main(["--cells", "100", "--genes", "50", "--perturbations", "1000",
                     "--out", str(tmp_path / "sanity")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error:") and "--perturbations" in err
    assert "Traceback" not in err and not (tmp_path / "sanity").exists()
    # too few cells for the benchmark: the advice is this command's (--cells), not txfm eval's
    with pytest.raises(SystemExit) as exc:
        sanity.main(["--cells", "20", "--genes", "50", "--perturbations", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: --cells 20: too few cells"), err
    assert "--metrics" not in err and "Traceback" not in err


@pytest.mark.parametrize("kw, needle", [
    (dict(shard_mb=0), "shard_mb (--shard-mb)"), (dict(shard_cells=-5), "shard_cells"),
    (dict(shard_mb=float("nan")), "shard_mb"), (dict(val_fraction=float("nan")), "val_fraction"),
    (dict(seed=-1), "seed"), (dict(chunk_nnz=0), "chunk_nnz"), (dict(min_cells=2.5), "min_cells"),
])
def test_convert_api_refuses_bad_numbers(small_input, tmp_path, kw, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        convert([small_input], tmp_path / "out", **{**QUIET, **kw})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["input", "gene-table", "vocab", "genome", "layer", "bulk-input",
                                  "out is a file"])
def test_bad_paths_and_options_that_apply_to_nothing_are_refused(small_input, tmp_path, capsys,
                                                                 case):
    out = tmp_path / "out"
    args = [small_input]
    extra, needle = [], str(tmp_path / "missing.tsv")
    if case == "input":
        args, needle = [tmp_path / "missing.h5ad"], str(tmp_path / "missing.h5ad")
    elif case in ("gene-table", "vocab"):
        extra = [f"--{case}", tmp_path / "missing.tsv"]
    elif case == "genome":  # only 10x .h5 inputs have genomes
        extra, needle = ["--genome", "mm10"], "--genome"
    elif case == "layer":  # only .h5ad inputs have layers
        args, extra, needle = [tenx_folder(tmp_path / "tx")[0]], ["--layer", "counts"], "--layer"
    elif case == "bulk-input":  # a typo would silently filter the bulk dataset as single-cell
        extra, needle = ["--bulk-input", "smal"], "--bulk-input smal"
    else:
        out.write_text("x")
        needle = str(out)
    rc, err = convert_cli(capsys, args, out, *extra)
    assert_refused(rc, err, needle)
    assert case == "out is a file" or not out.exists()


def test_empty_and_truncated_gene_table(small_input, tmp_path, capsys):
    for name, data in (("empty.tsv", b""), ("header.tsv", b"gene_id\tsymbol\n"),
                       ("cut.tsv.gz", gzip.compress(b"gene_id\tsymbol\n" * 500)[:40])):
        table = tmp_path / name
        table.write_bytes(data)
        rc, err = convert_cli(capsys, [small_input], tmp_path / "out", "--gene-table", table)
        assert_refused(rc, err, str(table))


# --------------------------------------------------------------------------- locking
HOLD = """
import sys, time
from pathlib import Path
from txfm.data.convert import _locked
with _locked(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_conversion_into_the_same_out_fails_and_a_killed_holder_does_not_block(
        small_input, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, err = convert_cli(capsys, [small_input], out)
        assert_refused(rc, err, str(out), "being written by another conversion",
                       f"pid {holder.pid}")
        assert (out / LOCK).is_file()  # the refused run removed nothing of the holder's
        # a reader of the half-written folder is told to wait, not to re-run the conversion
        rc, err = cli(capsys, "data", "info", out)
        assert_refused(rc, err, str(out), f"(pid {holder.pid}) is writing it now")
        assert "interrupted" not in err
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (out / LOCK).is_file()  # stale lock file of the killed process ...
    rc, err = convert_cli(capsys, [small_input], out)  # ... does not block
    assert rc == 0, err
    assert not (out / LOCK).exists()


def test_cli_process_reports_one_error_line(tmp_path):
    """The installed entry point, as a user runs it: exit 2, one line, no traceback."""
    folder, _ = tenx_folder(tmp_path / "cut")
    mtx = mtx_of(folder)
    lines = mtx.read_text().splitlines(keepends=True)
    mtx.write_text("".join(lines[:-100]))
    r = subprocess.run([sys.executable, "-m", "txfm.cli", "data", "convert", str(folder), "--out",
                        str(tmp_path / "out"), "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert_refused(r.returncode, r.stderr, str(mtx), "truncated")


def test_input_columns_named_like_the_converters_get_a_free_name(tmp_path, capsys):
    """An input holding both ``dataset`` and ``dataset_input`` (a shard read back and converted
    again) keeps both: ``dataset_input_2``; names equal as strings are refused by file."""
    obs = pd.DataFrame({"dataset": ["x"] * 30, "dataset_input": ["y"] * 30,
                        "source_row": np.arange(30), "source_row_input": np.ones(30, int)},
                       index=[f"c{i}" for i in range(30)])
    src = write_h5ad(tmp_path / "again.h5ad", np.random.default_rng(0).poisson(2, (30, 6)),
                     obs=obs)
    convert([src], tmp_path / "out", **QUIET)
    back = ad.read_zarr(tmp_path / "out" / "dataset_0").obs  # the training cells
    assert set(back["dataset_input_2"].astype(str)) == {"x"}
    assert set(back["dataset_input"].astype(str)) == {"y"}
    # the input's source_row, now source_row_input_2, beside the converter's own
    np.testing.assert_array_equal(back["source_row_input_2"].to_numpy(),
                                  back["source_row"].to_numpy())
    assert (back["source_row_input"].to_numpy() == 1).all()
    t = pd.DataFrame({1: np.zeros(4), "1": np.ones(4)}, index=list("abcd"))
    with pytest.raises(InputError, match=r"in\.h5ad: obs has two columns named '1'"):
        ObsTables([t], ["d"], [4], ["in.h5ad"])


def test_reserved_column_names_are_chosen_across_inputs():
    """One input with ``dataset`` and ``dataset_input``, another with ``dataset`` only: each
    input's ``dataset`` lands in the same column, never beside the other's
    ``dataset_input``."""
    a = pd.DataFrame({"dataset": ["A"], "dataset_input": ["x"]}, index=["a0"])
    b = pd.DataFrame({"dataset": ["B"]}, index=["b0"])
    t = ObsTables([a, b], ["a", "b"], [1, 1], ["a.h5ad", "b.h5ad"])
    frame = t.frame(np.array([0, 1], np.int32), np.array([0, 0]))
    assert list(frame["dataset_input_2"].astype(str)) == ["A", "B"]
    assert frame["dataset_input"].astype(object).tolist()[0] == "x"
    assert pd.isna(frame["dataset_input"].astype(object).tolist()[1])
