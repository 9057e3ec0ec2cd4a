"""Every user-facing command turns a user's mistake into one ``error:`` line and exit status 2.

One parametrised test runs ``txfm ...`` (in-process through :func:`txfm.cli.main`, the console
entry point) for each mistake: a bad option value, a missing / damaged / wrong input file, an
output that would be overwritten. It asserts exit status 2, exactly one line with ``error:``
on stderr, no traceback, and that the message names the offending argument or file.
"""
from __future__ import annotations

import gzip
import os
import shutil

import pytest

pytest.importorskip("anndata", reason="txfm embed/eval/data need anndata: pip install anndata zarr")

import anndata as ad
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp
import torch

from txfm.cli import main

N_CELLS, N_GENES = 40, 50
GENES = [f"GENE{i:05d}" for i in range(N_GENES)]  # the vocabulary of random:genes=50
DATA = f"random:cells=64,genes={N_GENES}"
TINY = ["--set", "dim=16", "--set", "depth=1", "--set", "heads=2", "--set", "decoder_hidden=16",
        "--k", "8", "--eager", "--no-progress", "--no-plot", "--no-tensorboard"]


def _write_10x(folder, counts: sp.csr_matrix, *, gz: bool):
    """A Cell Ranger v3 matrix folder (genes x cells matrix.mtx, features.tsv, barcodes.tsv)."""
    folder.mkdir()
    ext = ".gz" if gz else ""
    opener = gzip.open if gz else open
    with opener(folder / f"matrix.mtx{ext}", "wb") as f:
        scipy.io.mmwrite(f, counts.T.tocoo().astype(np.int64), field="integer")
    with opener(folder / f"features.tsv{ext}", "wt") as f:
        f.writelines(f"{g}\t{g}\tGene Expression\n" for g in GENES)
    with opener(folder / f"barcodes.tsv{ext}", "wt") as f:
        f.writelines(f"CELL{i}-1\n" for i in range(counts.shape[0]))
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs for every case: a trained run, good and damaged .h5ad / 10x inputs, databases."""
    from txfm.model import preset
    from txfm.train import TrainConfig, train

    root = tmp_path_factory.mktemp("cli_errors")
    run = root / "run"
    cfg = TrainConfig.for_preset("tiny", data=DATA, out=str(run), steps=2, batch_size=8,
                                 val_every=None, progress=False, plot=False, tensorboard=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, preset("tiny", dim=16, depth=1, heads=2, decoder_hidden=16, k=8,
                          use_fused_ops=False))
    finally:
        torch.set_num_threads(n)

    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(3.0, (N_CELLS, N_GENES)).astype(np.float32))
    labels = np.array(["non-targeting", "GENE00001", "GENE00002", "GENE00003"])
    obs = pd.DataFrame({"perturbation": labels[np.arange(N_CELLS) % 4],
                        "batch": np.arange(N_CELLS) // 20},
                       index=[f"CELL{i}" for i in range(N_CELLS)])
    cells = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=GENES))
    cells.obsm["X_txfm"] = rng.normal(size=(N_CELLS, 8)).astype(np.float32)
    paths = {"root": root, "run": run}
    paths["cells"] = root / "cells.h5ad"
    cells.write_h5ad(paths["cells"])
    paths["one_perturbation"] = root / "one_perturbation.h5ad"
    keep = cells.obs["perturbation"].isin(["non-targeting", labels[1]]).to_numpy()
    assert 0 < keep.sum() < N_CELLS
    cells[keep].copy().write_h5ad(paths["one_perturbation"])
    from txfm.data.convert import convert

    paths["shards"] = root / "shards"  # 40 cells: fewer than a batch of 64
    convert([paths["cells"]], paths["shards"], min_cells=1, min_genes=1, val_fraction=0.0,
            progress=False)
    data = paths["cells"].read_bytes()
    paths["truncated"] = root / "truncated.h5ad"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    for name, value in (("nan", np.nan), ("negative", -2.0)):
        bad = cells.copy()
        x = counts.toarray()
        x[7, 3] = value
        bad.X = sp.csr_matrix(x)
        paths[name] = root / f"{name}.h5ad"
        bad.write_h5ad(paths[name])
    complex_counts = cells.copy()  # numpy would cast these to real without a word
    complex_counts.X = counts.toarray().astype(np.complex64)
    paths["complex"] = root / "complex.h5ad"
    complex_counts.write_h5ad(paths["complex"])
    named_like_baseline = cells.copy()
    named_like_baseline.obsm["pca"] = named_like_baseline.obsm["X_txfm"]
    paths["obsm_pca"] = root / "obsm_pca.h5ad"
    named_like_baseline.write_h5ad(paths["obsm_pca"])
    odd = cells.copy()  # .obsm entries a user may have: sparse, NaN, beyond float32
    odd.obsm["X_sparse"] = sp.csr_matrix(odd.obsm["X_txfm"])
    odd.obsm["X_nan"] = odd.obsm["X_txfm"].copy()
    odd.obsm["X_nan"][3, 1] = np.nan
    odd.obsm["X_huge"] = odd.obsm["X_txfm"].astype(np.float64) * 1e300
    paths["cells_odd_obsm"] = root / "cells_odd_obsm.h5ad"
    odd.write_h5ad(paths["cells_odd_obsm"])
    genes = ad.AnnData(obs=pd.DataFrame(index=GENES))
    genes.obsm["codebook"] = rng.normal(size=(N_GENES, 4)).astype(np.float32)
    paths["genes"] = root / "genes.h5ad"
    genes.write_h5ad(paths["genes"])
    genes.obsm["sparse"] = sp.csr_matrix(genes.obsm["codebook"])
    genes.obsm["nan"] = genes.obsm["codebook"].copy()
    genes.obsm["nan"][0, 0] = np.inf
    paths["genes_odd"] = root / "genes_odd.h5ad"
    genes.write_h5ad(paths["genes_odd"])
    paths["gene_table_tsv"] = root / "table.tsv"
    paths["gene_table_tsv"].write_text("ENSG00000000001\tGENE00001\n")
    paths["db"] = root / "db"
    paths["db"].mkdir()
    (paths["db"] / "pairs.txt").write_text("entity1,entity2\nGENE00001,GENE00002\n")
    paths["not_ckpt"] = root / "not_a_checkpoint.pt"
    paths["not_ckpt"].write_text("these are not the weights you are looking for\n")
    paths["empty_dir"] = root / "empty_dir"
    paths["empty_dir"].mkdir()
    # result folders where a result file's name is taken by a folder
    paths["taken"] = root / "taken"
    for name in ("perturbation.csv", "recall_by_database.png"):
        (paths["taken"] / name).mkdir(parents=True)
    paths["a_file"] = root / "a_file"
    paths["a_file"].write_text("x\n")
    paths["tenx_gz_cut"] = _write_10x(root / "tenx_gz_cut", counts, gz=True)
    mtx = paths["tenx_gz_cut"] / "matrix.mtx.gz"
    mtx.write_bytes(mtx.read_bytes()[: mtx.stat().st_size // 2])
    paths["tenx_features_gz_cut"] = _write_10x(root / "tenx_features_gz_cut", counts, gz=True)
    feat = paths["tenx_features_gz_cut"] / "features.tsv.gz"
    feat.write_bytes(feat.read_bytes()[: feat.stat().st_size // 2])
    paths["tenx_empty_features"] = _write_10x(root / "tenx_empty_features", counts, gz=False)
    (paths["tenx_empty_features"] / "features.tsv").write_text("")
    paths["run_corrupt"] = root / "run_corrupt"
    shutil.copytree(run, paths["run_corrupt"])
    for pt in (paths["run_corrupt"] / "checkpoints").glob("*.pt"):  # a zip header, then noise:
        pt.write_bytes(b"PK\x03\x04" + rng.bytes(1000))  # torch's long miniz error text
    paths["run_bad_config"] = root / "run_bad_config"
    shutil.copytree(run, paths["run_bad_config"])
    (paths["run_bad_config"] / "config.json").write_text("{not json")
    return paths


def _train(*args):
    return ["train", "--data", DATA, "--batch-size", "8", *TINY, "--out", "{root}/new", *args]


def _resume(*args):
    return ["train", "--out", "{run}", "--resume", "--no-progress", "--no-plot", *args]


def _embed(*args, input="{cells}", checkpoint="{run}"):
    return ["embed", "--checkpoint", checkpoint, "--input", input, "--out", "{root}/e.h5ad",
            "--no-progress", *args]


def _rel(*args):
    return ["eval", "relationships", "--db", "{db}", "--out", "{root}/rel", "--no-progress",
            *args]


def _pert(*args, emb="{cells}"):
    return ["eval", "perturbation", "--embeddings", emb, "--perturbation-key", "perturbation",
            "--control", "non-targeting", "--out", "{root}/pert", "--no-progress", *args]


def _convert(*args, input="{cells}"):
    # its own --out each: a case that wrongly succeeds must not make the next one fail
    _convert.calls = getattr(_convert, "calls", 0) + 1
    return ["data", "convert", input, "--out", f"{{root}}/shards{_convert.calls}", "--quiet",
            "--min-cells", "1", "--min-genes", "1", *args]


# (argv, a word the message must contain: the argument or file it is about)
CASES = {
    # -- txfm train ------------------------------------------------------------------------------
    "train-preset": (_train("--preset", "XL"), "--preset"),
    "train-batch-size-0": (_train("--batch-size", "0"), "--batch-size"),
    "train-lr-nan": (_train("--lr", "nan"), "--lr"),
    # a negative value in exponent form reaches the option's own check (argparse alone calls
    # it a missing argument)
    "train-lr-negative": (_train("--lr", "-1e-3"), "--lr -0.001: must be a finite number > 0"),
    "train-target-sum-negative": (_train("--target-sum", "-1e4"), "--target-sum: must be > 0"),
    "train-steps-0": (_train("--steps", "0"), "--steps"),
    "train-steps-negative": (_train("--steps", "-3"), "--steps"),
    "train-epochs-0": (_train("--epochs", "0"), "--epochs"),
    "train-warmup-1": (_train("--warmup", "1"), "--warmup"),
    "train-weight-decay-negative": (_train("--weight-decay", "-1"), "--weight-decay"),
    "train-grad-clip-negative": (_train("--grad-clip", "-1"), "--grad-clip"),
    "train-accum-0": (_train("--accum", "0"), "--accum"),
    "train-accum-indivisible": (_train("--accum", "3"), "--accum"),
    "train-log-every-0": (_train("--log-every", "0"), "--log-every"),
    "train-val-every-negative": (_train("--val-every", "-2"), "--val-every"),
    "train-val-batches-0": (_train("--val-batches", "0"), "--val-batches"),
    "train-ckpt-every-negative": (_train("--ckpt-every", "-1"), "--ckpt-every"),
    "train-keep-0": (_train("--keep", "0"), "--keep"),
    "train-seed-negative": (_train("--seed", "-1"), "--seed"),
    "train-device-unknown": (_train("--device", "gpu"), "--device"),
    "train-k-0": (_train("--k", "0"), "k=0"),
    "train-tau-nan": (_train("--tau", "nan"), "--tau"),
    "train-decoder-depth-negative": (_train("--decoder-depth", "-1"), "decoder_depth"),
    "train-set-unknown-field": (_train("--set", "blocks=3"), "--set"),
    "train-set-bad-value": (_train("--set", "mlp_ratio=wide"), "--set"),
    "train-set-out-of-range": (_train("--set", "drop_path=2"), "drop_path"),
    "train-set-backend-against-eager": (_train("--set", "backend=cpu"), "contradicts --eager"),
    "train-data-missing": (_train("--data", "{root}/no_shards"), "--data"),
    "train-data-not-shards": (_train("--data", "{empty_dir}"), "empty_dir"),
    "train-data-bad-random": (_train("--data", "random:cells=many"), "--data"),
    # the trainer's words, with the command's option instead of the Python argument
    "train-data-smaller-than-a-batch": (_train("--data", "random:cells=4,genes=50"),
                                        "lower --batch-size"),
    # the loader's words (drop_last=True, a ShardLoader argument) in the command's
    "train-shards-smaller-than-a-batch": (_train("--data", "{shards}", "--batch-size", "64"),
                                          "not one whole batch can be drawn; lower --batch-size"),
    "train-data-is-a-file": (_train("--data", "{cells}"), "is a file; txfm train reads a shards"),
    "train-resume-on-other-data": (_resume("--data", "random:cells=64,genes=3"),
                                   "resume it with the data it was trained on"),
    "train-out-is-a-file": (_train("--out", "{a_file}"), "--out"),
    "train-twice-into-one-out": (_train("--out", "{run}"), "--resume"),
    "train-resume-without-checkpoint": (_train("--resume"), "--resume"),
    "train-resume-shorter": (_train("--out", "{run}", "--resume", "--steps", "1"), "steps"),
    "train-resume-bad-config": (_train("--out", "{run_bad_config}", "--resume"), "config.json"),
    # -- txfm embed ------------------------------------------------------------------------------
    "embed-checkpoint-missing": (_embed(checkpoint="{root}/nowhere.pt"), "nowhere.pt"),
    "embed-checkpoint-not-a-checkpoint": (_embed(checkpoint="{not_ckpt}"), "not_a_checkpoint"),
    "embed-checkpoint-folder-without-run": (_embed(checkpoint="{empty_dir}"), "empty_dir"),
    "embed-every-checkpoint-unreadable": (_embed(checkpoint="{run_corrupt}"),
                                          "no readable checkpoint"),
    "embed-gene-table-folder": (_embed("--gene-table", "{empty_dir}"), "is a folder"),
    "embed-input-missing": (_embed(input="{root}/nowhere.h5ad"), "--input"),
    "embed-input-truncated": (_embed(input="{truncated}"), "truncated.h5ad"),
    "embed-input-unknown-type": (_embed(input="{a_file}"), "--input"),
    "embed-input-nan": (_embed(input="{nan}"), "NaN"),
    "embed-input-negative": (_embed(input="{negative}"), "negative"),
    "embed-input-complex": (_embed(input="{complex}"), "holds complex64 values, not numbers"),
    "embed-input-shards": (_embed(input="{shards}"), "is a txfm shard collection"),
    "embed-layer-missing": (_embed("--layer", "spliced"), "spliced"),
    "embed-layer-raw-missing": (_embed("--layer", "raw"), ".raw"),
    "embed-gene-table-missing": (_embed("--gene-table", "{root}/genes.tsv"), "--gene-table"),
    "embed-k-0": (_embed("--k", "0"), "--k"),
    "embed-k-negative": (_embed("--k", "-4"), "--k"),
    "embed-draws-0": (_embed("--draws", "0"), "--draws"),
    "embed-batch-size-0": (_embed("--batch-size", "0"), "--batch-size"),
    "embed-seed-negative": (_embed("--seed", "-1"), "--seed"),
    "embed-device-unknown": (_embed("--device", "tpu"), "--device"),
    "embed-out-is-a-folder": (_embed() + ["--out", "{empty_dir}"], "--out"),
    # -- txfm genes ------------------------------------------------------------------------------
    "genes-checkpoint-missing": (["genes", "--checkpoint", "{root}/nowhere.pt", "--out",
                                  "{root}/g.h5ad"], "nowhere.pt"),
    "genes-checkpoint-not-a-checkpoint": (["genes", "--checkpoint", "{not_ckpt}", "--out",
                                           "{root}/g.h5ad"], "not_a_checkpoint"),
    "genes-gene-table-missing": (["genes", "--checkpoint", "{run}", "--out", "{root}/g.h5ad",
                                  "--gene-table", "{root}/genes.tsv"], "--gene-table"),
    "genes-out-is-a-folder": (["genes", "--checkpoint", "{run}", "--out", "{empty_dir}"],
                              "--out"),
    # -- txfm eval relationships -----------------------------------------------------------------
    "rel-nothing-to-evaluate": (_rel(), "--genes"),
    "rel-genes-missing": (_rel("--genes", "{root}/nowhere.h5ad"), "--genes"),
    "rel-genes-truncated": (_rel("--genes", "{truncated}"), "truncated.h5ad"),
    "rel-key-missing": (_rel("--genes", "{genes}", "--key", "decoder"), "decoder"),
    "rel-gene-table-missing": (_rel("--genes", "{genes}", "--gene-table", "{root}/genes.tsv"),
                               "--gene-table"),
    "rel-db-missing": (["eval", "relationships", "--genes", "{genes}", "--db", "{root}/no_db",
                        "--out", "{root}/rel"], "--db"),
    "rel-n-components-text": (_rel("--genes", "{genes}", "--n-components", "codebook=many"),
                              "--n-components"),
    "rel-n-components-0": (_rel("--genes", "{genes}", "--n-components", "0"), "--n-components"),
    "rel-draws-0": (_rel("--genes", "{genes}", "--draws", "0"), "--draws"),
    "rel-null-pairs-0": (_rel("--genes", "{genes}", "--null-pairs", "0"), "--null-pairs"),
    "rel-seed-negative": (_rel("--genes", "{genes}", "--seed", "-1"), "--seed"),
    "rel-threads-negative": (_rel("--genes", "{genes}", "--threads", "-1"), "--threads"),
    "rel-counts-missing": (_rel("--counts", "{root}/nowhere.h5ad"), "--counts"),
    "rel-counts-nan": (_rel("--counts", "{nan}"), "NaN"),
    "rel-counts-max-cells-0": (_rel("--counts", "{cells}", "--counts-max-cells", "0"),
                               "--counts-max-cells"),
    "rel-sources-unknown": (_rel("--genes", "{genes}", "--sources", "nope"), "nope"),
    "rel-counts-layer-missing": (_rel("--counts", "{cells}", "--counts-layer", "spliced"),
                                 "spliced"),
    "rel-out-is-a-file": (_rel("--genes", "{genes}") + ["--out", "{a_file}"], "--out"),
    "rel-key-inf": (_rel("--genes", "{genes_odd}", "--key", "nan"), "--key nan"),
    "rel-db-is-a-gene-table": (["eval", "relationships", "--genes", "{genes}", "--db",
                                "{gene_table_tsv}", "--out", "{root}/rel"], "--db"),
    # -- txfm eval perturbation ------------------------------------------------------------------
    # -- txfm train --resume: what the checkpoint fixes ------------------------------------------
    "resume-loss": (_resume("--loss", "mse"), "--loss mse with --resume"),
    "resume-k": (_resume("--k", "4"), "--k 4 with --resume"),
    "resume-set-token-norm": (_resume("--set", "token_norm=none"),
                              "--set token_norm=none with --resume"),
    "resume-batch-size": (_resume("--batch-size", "16"), "--batch-size 16 with --resume: the "
                                                         "run's data order continues from"),
    "resume-accum": (_resume("--accum", "2"), "--accum 2 with --resume"),
    "resume-seed": (_resume("--seed", "5"), "--seed 5 with --resume: the run's data order and "
                                            "shown genes continue from"),
    "resume-preset": (_resume("--preset", "S"), "--preset S with --resume"),
    "resume-preset-unknown": (_resume("--preset", "XL"), "--preset XL: unknown preset"),
    # -- txfm train: values the kernels cannot take ----------------------------------------------
    "train-tau-500": (_train("--tau", "500"), "--tau 500"),
    "train-out-empty": (["train", "--data", DATA, "--out", ""], "--out is empty"),
    "train-data-empty": (["train", "--data", "", "--out", "{root}/new"], "--data is empty"),
    "train-target-sum-beyond-fp32": (_train("--target-sum", "1e308"), "--target-sum"),
    "train-layerscale-beyond-fp32": (_train("--set", "layerscale_init=1e308"),
                                     "--set layerscale_init=1e308"),
    "train-epochs-huge": (_train("--epochs", "1e308"), "--epochs"),
    "pert-embeddings-missing": (_pert(emb="{root}/nowhere.h5ad"), "--embeddings"),
    "pert-embeddings-truncated": (_pert(emb="{truncated}"), "truncated.h5ad"),
    "pert-perturbation-key-missing": (["eval", "perturbation", "--embeddings", "{cells}",
                                       "--perturbation-key", "guide", "--out", "{root}/pert"],
                                      "--perturbation-key"),
    "pert-batch-key-missing": (_pert("--batch-key", "plate"), "--batch-key"),
    "pert-obsm-key-missing": (_pert("--obsm-key", "X_scgpt"), "X_scgpt"),
    "pert-gene-table-missing": (_pert("--gene-table", "{root}/genes.tsv"), "--gene-table"),
    "pert-db-missing": (_pert("--db", "{root}/no_db"), "--db"),
    "pert-db-missing-unused": (_pert("--db", "{root}/no_db", "--metrics", "lin"), "--db"),
    "pert-one-perturbation": (_pert(emb="{one_perturbation}"), "needs at least 2"),
    "pert-counts-nan": (_pert(emb="{nan}"), "NaN"),
    "pert-counts-complex": (_pert(emb="{complex}"), "not numbers"),
    "pert-obsm-key-named-like-a-baseline": (_pert("--obsm-key", "pca", "--baselines", "pca",
                                                  emb="{obsm_pca}"),
                                            "has the name of a baseline row"),
    "pert-min-cells-0": (_pert("--min-cells", "0"), "--min-cells"),
    "pert-max-cells-negative": (_pert("--max-cells", "-5"), "--max-cells"),
    "pert-library-size-0": (_pert("--library-size", "0"), "--library-size"),
    "pert-library-size-nan": (_pert("--library-size", "nan"), "--library-size"),
    "pert-pca-components-0": (_pert("--pca-components", "0"), "--pca-components"),
    "pert-pcst-null-draws-0": (_pert("--pcst-null-draws", "0"), "--pcst-null-draws"),
    "pert-seed-negative": (_pert("--seed", "-1"), "--seed"),
    "pert-control-missing": (_pert("--control", "scrambled"), "--control"),
    "pert-baselines-unknown": (_pert("--baselines", "bogus"), "--baselines"),
    "pert-metrics-unknown": (_pert("--metrics", "auc"), "--metrics"),
    "pert-fit-on-missing": (_pert("--fit-on", "{root}/no_corpus"), "--fit-on"),
    "pert-fit-on-truncated": (_pert("--fit-on", "{truncated}"), "truncated.h5ad"),
    "pert-fit-cells-0": (_pert("--fit-on", "{cells}", "--fit-cells", "0"), "--fit-cells"),
    "pert-oracle-k-0": (_pert("--oracle-k", "0"), "--oracle-k"),
    "pert-out-is-a-file": (_pert() + ["--out", "{a_file}"], "--out"),
    "pert-obsm-key-nan": (_pert("--obsm-key", "X_nan", emb="{cells_odd_obsm}"),
                          "--obsm-key X_nan"),
    "pert-obsm-key-beyond-float32": (_pert("--obsm-key", "X_huge", emb="{cells_odd_obsm}"),
                                     "--obsm-key X_huge"),
    "pert-baselines-hvg0": (_pert("--baselines", "liblog,liblog_hvg0"), "--baselines"),
    "pert-batch-key-is-perturbation-key": (_pert("--batch-key", "perturbation"),
                                           "--batch-key"),
    # a result file's name taken by a folder: refused before the evaluation, which failed at
    # the end with a traceback
    "pert-result-name-is-a-folder": (_pert("--out", "{taken}"),
                                     "{taken}/perturbation.csv is a folder"),
    "rel-result-name-is-a-folder": (_rel("--genes", "{genes}", "--out", "{taken}"),
                                    "{taken}/recall_by_database.png is a folder"),
    # -- txfm data ---------------------------------------------------------------------------------
    "convert-shard-cells-negative": (_convert("--shard-cells", "-5"), "--shard-cells"),
    "convert-shard-mb-0": (_convert("--shard-mb", "0"), "--shard-mb"),
    "convert-input-missing": (_convert(input="{root}/nowhere.h5ad"), "nowhere.h5ad"),
    "convert-matrix-gz-truncated": (_convert(input="{tenx_gz_cut}"), "matrix.mtx.gz"),
    "convert-features-gz-truncated": (_convert(input="{tenx_features_gz_cut}"),
                                      "features.tsv.gz"),
    "convert-features-empty": (_convert(input="{tenx_empty_features}"), "features.tsv"),
    "convert-gene-table-missing": (_convert("--gene-table", "{root}/genes.tsv"), "genes.tsv"),
    "convert-gene-table-folder": (_convert("--gene-table", "{empty_dir}"), "(--gene-table): is a "
                                                                          "folder"),
    "convert-vocab-folder": (_convert("--vocab", "{empty_dir}"), "(--vocab): is a folder"),
    "data-info-missing": (["data", "info", "{root}/no_shards"], "no_shards"),
}
if torch.cuda.is_available():
    CASES["embed-device-cuda-index"] = (_embed("--device", "cuda:99"), "--device")
else:
    CASES["train-device-cuda"] = (_train("--device", "cuda"), "--device")
    CASES["embed-device-cuda"] = (_embed("--device", "cuda"), "--device")


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_mistake_gives_one_error_line_and_exit_2(case, files, capsys, monkeypatch):
    argv, named = CASES[case]
    argv = [a.format(**files) for a in argv]
    monkeypatch.chdir(files["root"])  # nothing lands in the repository if a case goes wrong
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    parser_refused = False
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse rejected the option
        status, parser_refused = exc.code, True
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status == 2, f"exit {status}\nstdout:\n{out}\nstderr:\n{err}"
    assert len(errors) == 1, err
    if parser_refused:  # the error line alone, not argparse's usage block before it
        assert err.splitlines() == errors and errors[0].startswith("error: argument "), err
        assert errors[0].endswith(" --help)"), err
    assert "Traceback" not in out + err
    assert named.format(**files) in errors[0], errors[0]


@pytest.mark.parametrize("argv, help_of", [(["train", "--quiet"], "txfm train"),
                                            (["data", "info", "x", "--bogus"], "txfm data info"),
                                            (["eval", "perturbation", "--embeddings", "e",
                                              "--perturbation-key", "p", "--bogus"],
                                             "txfm eval perturbation")])
def test_an_unknown_option_points_at_its_subcommands_help(argv, help_of, capsys):
    """It said `see txfm --help`, whose page does not list a subcommand's options."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("error:") == 1
    assert err.strip().endswith(f"(see {help_of} --help)") and "unrecognized arguments" in err


@pytest.mark.parametrize("module", ["txfm", "txfm.cli"])
def test_console_entry_exits_2_without_traceback(tmp_path, module):
    """The same through a real process (``python -m txfm``, as the ``txfm`` script runs main;
    ``python -m txfm.cli``, where the file runs as a second module, ``__main__``). The second
    error is raised by the trainer, after the parser, as a UsageError."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    for extra, line in (
            (["--preset", "XL"], "error: --preset XL: is not a preset; use one of ['tiny', 'S', "
                                 "'B', 'L']"),
            (["--steps", "2", "--set", "k=100000"], "error: --set k=100000: more than the "
                                                     "corpus's ")):
        done = subprocess.run([sys.executable, "-m", module, "train", "--data", DATA, "--out",
                               str(tmp_path / "run"), *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(line), done.stderr


def test_sigterm_ends_a_command_like_ctrl_c_with_its_own_status(tmp_path, capsys, monkeypatch):
    """SIGTERM (a scheduler's time limit) runs the same cleanup as Ctrl-C: exit 143, one line,
    the handler put back afterwards."""
    import os
    import signal

    import txfm.eval.embed

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(txfm.eval.embed, "load_model", killed)
    before = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    assert main(["genes", "--checkpoint", str(tmp_path / "x.pt"), "--out",
                 str(tmp_path / "g.h5ad")]) == 143
    assert capsys.readouterr().err == "terminated\n"
    assert signal.getsignal(signal.SIGTERM) is before
    assert list(tmp_path.iterdir()) == []


def test_torchrun_ranks_print_a_shared_mistake_once(tmp_path):
    """Under torchrun every rank meets the same bad input: one ``error:`` line, not one per
    rank (the launcher's own failure summary follows it)."""
    from _launch import torchrun

    status, out = torchrun(["-m", "txfm.cli", "train", "--data", DATA, "--out",
                            str(tmp_path / "run"), "--steps", "2", "--set", "k=100000", *TINY],
                           cwd=tmp_path, timeout=240)
    assert status != 0
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors == [errors[0]] and "--set k=100000" in errors[0], out[-3000:]


def test_report_prints_a_line_once_per_launch(tmp_path, monkeypatch, capsys):
    from txfm.cli import report

    report("error: a")
    monkeypatch.setenv("WORLD_SIZE", "2")  # ranks started by hand: every line printed
    report("error: a")
    assert capsys.readouterr().err.splitlines() == ["error: a", "error: a"]
    for attempt in ("attempt_0", "attempt_1"):  # torchrun: one folder per launch attempt
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / attempt / "1" / "error.json"))
        for line in ("error: b", "error: b", "warning: c", "error: b"):
            report(line)
    assert capsys.readouterr().err.splitlines() == ["error: b", "warning: c"] * 2


def test_odd_obsm_entries_are_densified_or_skipped_by_name(files, capsys, monkeypatch):
    """Sparse .obsm entries are evaluated (densified); with the keys defaulted, a non-finite
    one is skipped with a warning naming the file, the key and the rows, before any work."""
    monkeypatch.chdir(files["root"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = files["root"] / "odd"
    status = main(["eval", "perturbation", "--embeddings", str(files["cells_odd_obsm"]),
                   "--perturbation-key", "perturbation", "--batch-key", "batch",
                   "--baselines", "none", "--metrics", "lin,knn", "--out", str(out),
                   "--no-progress"])
    stdout, err = capsys.readouterr()
    assert status == 0, err
    assert "chance top-1 33.3%" in err  # 3 perturbations besides the control (a line about
    # the work: stderr)
    assert f"skipping .obsm['X_nan'] of {files['cells_odd_obsm']}: it has NaN or inf in 1 of" \
        in err
    assert "skipping .obsm['X_huge']" in err and "beyond float32's range" in err
    table = pd.read_csv(out / "perturbation.csv")
    assert sorted(table["embedding"]) == ["X_sparse", "X_txfm"]
    dense, sparse = (table.set_index("embedding").loc[k] for k in ("X_txfm", "X_sparse"))
    assert dense["lin_top1"] == sparse["lin_top1"] and dense["knn_top1"] == sparse["knn_top1"]

    # with every X_* key skipped, the error says so (it said the input had none)
    import anndata as ad

    only_bad = files["root"] / "only_bad.h5ad"
    a = ad.read_h5ad(files["cells_odd_obsm"])
    for k in list(a.obsm.keys()):
        if k not in ("X_nan", "X_huge"):
            del a.obsm[k]
    a.write_h5ad(only_bad)
    status = main(["eval", "perturbation", "--embeddings", str(only_bad), "--perturbation-key",
                   "perturbation", "--batch-key", "batch", "--baselines", "none", "--metrics",
                   "lin", "--out", str(files["root"] / "none"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("error:") == 1, err
    assert (f"every X_* key in .obsm of {only_bad} was skipped (X_huge, X_nan; warnings above "
            "say why)") in err and "has no X_* key" not in err

    status = main(["eval", "relationships", "--genes", str(files["genes_odd"]), "--db",
                   str(files["db"]), "--no-sweep", "--null-pairs", "100", "--draws", "1",
                   "--out", str(files["root"] / "rel_odd"), "--no-progress"])
    stdout, err = capsys.readouterr()
    assert status == 0, err
    assert "skipping .obsm['nan']" in err and "has NaN or inf in 1 of" in err
    summary = pd.read_csv(files["root"] / "rel_odd" / "relationships_summary.csv")
    # "codebook", txfm genes' name before the X_ prefix, is read under today's name
    assert {"X_codebook", "sparse"} <= set(summary.iloc[:, 0])


def test_every_command_takes_no_progress():
    """One name for one switch: each command that draws progress bars hides them with
    --no-progress (data convert / verify keep --quiet as its older name), and the others
    accept it too, so a script can pass it to every txfm command."""
    import argparse

    from txfm.cli import build_parser

    def leaves(parser, path=()):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield " ".join(path), parser
        for action in subs:
            for name, child in action.choices.items():
                yield from leaves(child, (*path, name))

    commands = dict(leaves(build_parser()))
    with_bars = {"data convert", "data verify", "data demo", "train", "embed",
                 "eval perturbation", "eval relationships"}
    assert with_bars <= set(commands), sorted(commands)
    for name, parser in commands.items():
        flags = parser._option_string_actions
        assert isinstance(flags.get("--no-progress"), argparse._StoreTrueAction), name


def test_help_is_plain_text_fast_and_interruptible(monkeypatch, capsys):
    """`txfm --help` imported torch through the packages' __init__ (~5 s on a 2-core box), so
    a Ctrl-C in those seconds printed a traceback; the help showed RST markup and
    '(default: None)' on required options (a fresh user's finds)."""
    import argparse
    import subprocess
    import sys

    import txfm.cli
    from txfm.cli import build_parser

    # reading the options imports neither torch nor anndata
    code = ("import sys, txfm.cli; txfm.cli.build_parser().parse_args(['train', '--steps', '5']);"
            "print(sorted(m for m in ('torch', 'anndata', 'zarr', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr

    def parsers(parser, path=("txfm",)):
        yield " ".join(path), parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from parsers(child, (*path, name))

    for name, parser in parsers(build_parser()):
        text = parser.format_help()
        for markup in ("``", ":class:", ":func:", ":data:", ":mod:", "(default: None)"):
            assert markup not in text, (name, markup)

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(txfm.cli, "build_parser", interrupted)
    assert txfm.cli.main(["data", "info", "x"]) == 130
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "interrupted" in err


@pytest.mark.parametrize("signame, code, word", [("SIGINT", 130, "interrupted"),
                                                   ("SIGTERM", 143, "terminated")])
def test_a_signal_a_library_turns_into_its_own_error_still_ends_the_command(
        monkeypatch, capsys, signame, code, word):
    """pandas' C parser catches the interrupt raised inside a read and raises "Calling
    read(nbytes) on source failed": `txfm data convert` of a 10x .mtx.gz then blamed the file
    ("malformed MatrixMarket entries", exit 2) for a Ctrl-C (a fresh user's find)."""
    import argparse
    import signal
    import time

    import txfm.cli

    def swallowing(args):
        try:
            os.kill(os.getpid(), getattr(signal, signame))
            time.sleep(5)
        except KeyboardInterrupt:  # SIGTERM arrives as txfm.cli.Terminated, a KeyboardInterrupt
            pass
        assert txfm.cli.interrupted()
        raise pd.errors.ParserError("Error tokenizing data. C error: Calling read(nbytes) on "
                                    "source failed. Try engine='python'.")

    class Parser:
        def parse_args(self, argv):
            return argparse.Namespace(func=swallowing)

    monkeypatch.setattr(txfm.cli, "build_parser", Parser)
    # as in a terminal: a test run in the background (nohup, CI) starts with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert txfm.cli.main(["data", "convert"]) == code
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert err.strip() == word and "error" not in err
    assert not txfm.cli.interrupted()  # a later command starts with a clean slate


def test_the_mtx_reader_reraises_an_interrupt_the_parser_swallowed(tmp_path, monkeypatch):
    """...and the 10x reader does not scan the whole file again to find a fault that is not
    there: it raises the interrupt straight away."""
    import txfm.cli
    from txfm.data import readers

    d = tmp_path / "tenx"
    d.mkdir()
    scipy.io.mmwrite(d / "matrix.mtx", sp.random(5, 4, density=0.6, format="coo", random_state=0,
                                                 data_rvs=lambda n: np.arange(1, n + 1)))
    pd.DataFrame({"id": [f"ENSG{i:011d}" for i in range(5)], "name": [f"G{i}" for i in range(5)],
                  "type": ["Gene Expression"] * 5}).to_csv(d / "features.tsv", sep="\t",
                                                           header=False, index=False)
    pd.Series([f"C{i}" for i in range(4)]).to_csv(d / "barcodes.tsv", header=False, index=False)

    def failing_read(*args, **kwargs):
        txfm.cli._signalled.append(2)
        raise pd.errors.ParserError("Calling read(nbytes) on source failed")

    reader = readers.open_input(d)
    monkeypatch.setattr(readers.pd, "read_csv", failing_read)
    monkeypatch.setattr(readers.TenxDirReader, "_fail_at",
                        lambda *a: pytest.fail("scanned the file for a fault"))
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in reader.iter_chunks(10):
                pass
    finally:
        txfm.cli._signalled.clear()


def test_size_errors_name_each_flag_once():
    from txfm.train.cli import _in_flags
    from txfm.train.config import TrainConfig

    with pytest.raises(ValueError) as exc:
        TrainConfig(batch_size=33).micro_batch(2)
    text = _in_flags(str(exc.value))
    assert text.startswith("--batch-size 33 must be divisible by"), text
    assert text.count("--batch-size") == 1


def test_model_config_states_the_kernels_limits():
    """TxFMConfig restates txfm_kernels' limits (and the paper's beta) so that building a
    config needs no torch; they must stay the kernels' own."""
    from txfm.model import config
    from txfm_kernels import poisson, sample

    assert config.TARGET_SUM_RANGE == sample.TARGET_SUM_RANGE
    assert config.TAU_LIMIT == sample.TAU_LIMIT
    assert config.ALPHA_LIMIT == poisson._ALPHA_LIMIT
    assert config.BETA_MIN == poisson.BETA_MIN
    assert config.PAPER_BETA == poisson.BETA


@pytest.mark.parametrize("what", ["cells", "genes"])
def test_convert_warns_about_repeated_names(what, tmp_path, capsys):
    """Repeated cell names are kept (source_row tells them apart) and genes under one name are
    summed into one (as documented); the console says each, with the fix."""
    import warnings

    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(3.0, (30, N_GENES)).astype(np.float32))
    genes = list(GENES)
    if what == "genes":
        genes[2], genes[4], genes[5] = genes[0], genes[1], genes[0]
    obs = [f"c{i % 20}" if what == "cells" else f"c{i}" for i in range(30)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's own warning about the names
        ad.AnnData(X=counts, var=pd.DataFrame(index=genes),
                   obs=pd.DataFrame(index=obs)).write_h5ad(tmp_path / "dup.h5ad")
    status = main(["data", "convert", str(tmp_path / "dup.h5ad"), "--out", str(tmp_path / "s"),
                   "--quiet", "--min-cells", "1", "--min-genes", "1"])
    err = capsys.readouterr().err
    assert status == 0, err
    said, fix = {"cells": ("10 cell names repeat an earlier one (e.g. 'c0')",
                           "obs_names_make_unique"),
                 "genes": (f"3 genes repeat the key of an earlier one (e.g. '{GENES[0]}')",
                           "var_names_make_unique")}[what]
    assert said in err and fix in err, err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a folder "
                    "that exists but takes no new entries")
def test_a_folder_that_takes_no_entries_is_not_called_missing():
    from txfm.cli import folder_problem

    problem = folder_problem("/proc/txfm-out")
    assert "(in /proc): it takes no new files or folders" in problem, problem
    assert "No such file" not in problem


# -- a reader of the output that goes away (``txfm ... | head``) -----------------------------

@pytest.mark.parametrize("argv", [
    ["-m", "txfm", "data", "synth", "--out", "{tmp}/synth", "--cells", "100", "--genes", "60",
     "--perturbations", "2", "--no-progress"],
    ["-m", "txfm.cli", "data", "synth", "--out", "{tmp}/synth", "--cells", "100", "--genes",
     "60", "--perturbations", "2", "--no-progress"],
    ["-m", "txfm_kernels.info"],
    ["-m", "txfm.eval.sanity", "--cells", "200", "--genes", "50", "--perturbations", "2"],
    ["-m", "bench.poisson", "--quick", "--impls", "eager", "--reps", "2"],
], ids=lambda argv: argv[1])
def test_a_reader_that_went_away_ends_the_command_quietly(argv, tmp_path):
    """No traceback, no "Exception ignored" at exit: stderr stays empty and the status is a
    shell's for a tool that a closed pipe stopped (141). ``python -m txfm.eval.learning`` is
    checked with its other output in ``test_learning_cli.py``."""
    from _launch import reader_gone

    from txfm.cli import CLOSED_PIPE_STATUS

    code, err = reader_gone([a.format(tmp=tmp_path) for a in argv])
    # a benchmark warns on stderr when the machine is busy, and writes each case's progress
    # line there ("B=...")
    assert (code, [l for l in err.splitlines() if not l.startswith(("warning: ", "B="))]) == (
        CLOSED_PIPE_STATUS, []), err


def test_every_entry_point_goes_through_run_piped():
    """The whole kind: each ``python -m`` module of the package and the benchmarks runs its
    main through :func:`txfm.cli.run_piped` (itself, through ``bench.common.run``, or through
    ``txfm.cli.main``), so none of them ends in a traceback under ``| head``."""
    import pathlib
    import re

    from _launch import REPO

    through = ("run_piped(", "run(main)", "from txfm.cli import main")
    workers = {"bench/_annbatch_worker.py"}  # its parent reads all of its output, always
    checked = []
    for top in ("txfm", "txfm_kernels", "bench"):
        for path in sorted(pathlib.Path(REPO, top).rglob("*.py")):
            name = path.relative_to(REPO).as_posix()
            text = path.read_text()
            if name.endswith("__main__.py"):
                block = text
            elif (m := re.search(r'^if __name__ == "__main__":\n(.*)', text, re.M | re.S)):
                block = m.group(1)
            else:
                continue
            checked.append(name)
            if name not in workers:
                assert any(t in block for t in through), f"{name}: run its main through run_piped"
    assert {"txfm/__main__.py", "txfm/cli.py", "txfm/eval/learning.py", "bench/poisson.py",
            "txfm_kernels/info.py"} <= set(checked)


def test_run_piped_reraises_a_broken_pipe_that_is_not_its_output():
    """A pipe to a subprocess whose reader died is a fault of its own, not ``| head``."""
    import subprocess
    import sys

    from txfm.cli import run_piped

    assert run_piped(lambda: None) == 0 and run_piped(lambda: 3) == 3
    code = ("import os\nfrom txfm.cli import run_piped\nr, w = os.pipe()\nos.close(r)\n"
            "run_piped(lambda: os.write(w, b'x'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "BrokenPipeError" in done.stderr, done.stderr
