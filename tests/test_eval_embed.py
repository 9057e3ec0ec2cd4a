"""Embedding cells and exporting gene representations from a trained checkpoint, end to end:
synthetic data -> shards -> a few training steps -> `txfm embed` / `txfm genes` -> both
evaluations; and real PBMC 1k v2 cells embedded by a model trained on PBMC 1k v3."""
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

pytest.importorskip("anndata", reason="txfm.data / txfm.eval need anndata: pip install anndata zarr")
pytest.importorskip("zarr", reason="txfm.data / txfm.eval need zarr: pip install anndata zarr")

from txfm.eval.embed import remap_to_vocabulary
from txfm.eval.genemap import GeneTable, match_genes, normalise_ids


pytestmark = pytest.mark.usefixtures("one_blas_thread")


def test_remap_to_vocabulary_moves_sums_and_drops_columns():
    counts = sp.csr_matrix(np.array([[1, 2, 3, 4], [0, 5, 0, 6]], dtype=np.float32))
    out, observable = remap_to_vocabulary(counts, np.array([2, -1, 0, 2]), 3)
    np.testing.assert_array_equal(out.toarray(), [[3, 0, 5], [0, 0, 6]])
    np.testing.assert_array_equal(observable, [True, False, True])
    assert out.has_sorted_indices
    with pytest.raises(ValueError, match="gene-table"):
        remap_to_vocabulary(counts, np.full(4, -1), 3)


def test_match_genes_routes_versions_case_and_tables():
    table = GeneTable(normalise_ids(["ENSG00000141510", "ENSG00000012048"]),
                      np.array(["TP53", "BRCA1"], dtype=object))
    vocab = ["ENSG00000012048", "ENSG00000141510", "ENSG00000000003"]
    m = match_genes([["TP53", "brca1", "NOPE"]], vocab, table)
    assert m.index.tolist() == [1, 0, -1] and "symbol->Ensembl" in m.how
    m = match_genes(["ENSG00000141510.17", "ENSG00000000003.2"], vocab)
    assert m.index.tolist() == [1, 2] and m.n_mapped == 2
    m = match_genes([["ENSG00000012048.5"], ["TP53"]], ["BRCA1", "TP53"], table,
                    query_names=["ids", "symbols"])
    assert m.index.tolist() == [0] and "Ensembl->symbol" in m.how


def test_match_genes_maps_names_mixing_ids_and_symbols_gene_by_gene():
    # Genes without a symbol often keep their Ensembl id as the name: no single route maps
    # such a list, so each gene takes the best route that maps it.
    table = GeneTable(normalise_ids(["ENSG00000141510", "ENSG00000012048", "ENSG00000000003"]),
                      np.array(["TP53", "BRCA1", "TSPAN6"], dtype=object))
    vocab = ["ENSG00000012048", "ENSG00000141510", "ENSG00000000003"]
    m = match_genes(["TP53", "ENSG00000000003.4", "NOPE"], vocab, table)
    assert m.index.tolist() == [1, 2, -1]
    assert m.how == "1 by names[0] as given + 1 by names[0] symbol->Ensembl via gene table"
    # a lesser route neither remaps a gene nor sums a second gene into a reached target
    m = match_genes(["ENSG00000012048", "BRCA1"], vocab, table)
    assert m.index.tolist() == [0, -1] and m.how == "names[0] as given"
    # one route enough: reported as before
    m = match_genes(["ENSG00000012048", "ENSG00000141510"], vocab, table)
    assert m.how == "names[0] as given" and m.n_mapped == 2


def test_map_input_genes_combines_vocabulary_ids_and_symbols():
    from txfm.eval.embed import map_input_genes

    vocab = [f"ENSG9{i:010d}" for i in range(6)]
    symbols = [f"SYN{i:05d}" for i in range(6)]
    var = pd.DataFrame(index=["SYN00000", "syn00001", vocab[2], vocab[3] + ".7", "MYGENE", "ab"],
                       data={"feature_types": ["Gene Expression"] * 5 + ["Antibody Capture"]})
    m = map_input_genes(var, vocab, None, symbols)
    assert m.index.tolist() == [0, 1, 2, 3, -1, -1]
    assert m.n_case == 1 and "onto vocabulary symbols" in m.how
    assert "1 feature of other types" in m.how
    # without the symbols only the ids map
    assert map_input_genes(var, vocab).index.tolist() == [-1, -1, 2, 3, -1, -1]


def test_read_cells_reads_the_real_10x_folders(shared_data):
    from txfm.eval.io import read_cells

    v2 = read_cells(shared_data / "scrna_pbmc_1k_v2_10x")
    v3 = read_cells(shared_data / "scrna_pbmc_1k_v3_10x_qcfiltered")
    chr21 = read_cells(shared_data / "scrna_10x_v3_chr21_scanpy_testdata")
    assert v2.shape == (996, 33538) and v2.X.sum() == 3_524_098
    assert v3.shape == (906, 14688) and v3.X.sum() == 5_451_564
    assert chr21.shape == (1107, 507) and chr21.var.gene_ids.str.startswith("ENSG").all()
    assert v2.var.symbol.duplicated().sum() == 24  # kept as given; var_names made unique
    assert v2.var_names.is_unique


# ----------------------------------------------------------------------------- end to end

def _train(shards, run, steps=3):
    from txfm.model import preset
    from txfm.train import TrainConfig, train

    cfg = TrainConfig(data=str(shards), out=str(run), steps=steps, batch_size=16,
                      log_every=1, val_every=None, ckpt_every=None, progress=False,
                      plot=False, tensorboard=False, device="cpu")
    return train(cfg, preset("tiny", dim=32, depth=1, heads=2, decoder_hidden=48, k=32))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic data, its shards, and a tiny model trained for a few steps."""
    from txfm.data.convert import convert
    from txfm.data.synth import generate

    root = tmp_path_factory.mktemp("e2e")
    synth = generate(root / "raw", cells=700, genes=200, perturbations=8, seed=5)
    convert(list(synth.datasets), root / "shards", min_cells=3, min_genes=10, progress=False,
            log=lambda msg: None)
    result = _train(root / "shards", root / "run")
    assert result.checkpoint is not None
    return root, synth


def test_embed_is_deterministic_per_cell_and_reports_the_mapping(trained, capsys):
    import anndata as ad

    from txfm.cli import main

    root, synth = trained
    outs = {}
    for name, extra in (("bs64", ["--batch-size", "64"]), ("bs128", ["--batch-size", "128"]),
                        ("draws2", ["--draws", "2"])):
        out = root / f"emb_{name}.h5ad"
        # the training K, fewer than the cells' observable genes, so that draws differ
        assert main(["embed", "--checkpoint", str(root / "run"), "--input",
                     str(synth.datasets[0]), "--out", str(out), "--no-progress",
                     "--k", "32"] + extra) == 0
        outs[name] = ad.read_h5ad(out)
    printed = capsys.readouterr()
    screen = ad.read_h5ad(synth.datasets[0])
    # how the genes mapped is a line about the work: stderr; stdout has the result alone
    assert f"{screen.n_vars} of {screen.n_vars} genes mapped" in printed.err
    assert "genes mapped" not in printed.out and "wrote " in printed.out
    e64, e128 = outs["bs64"].obsm["X_txfm"], outs["bs128"].obsm["X_txfm"]
    assert e64.shape == (screen.n_obs, 32) and np.isfinite(e64).all()
    np.testing.assert_allclose(e64, e128, atol=1e-5)  # same genes shown whatever the batching
    e2 = outs["draws2"].obsm["X_txfm"]
    assert not np.allclose(e2, e64, atol=1e-4)  # a second draw changes the mean ...
    assert np.corrcoef(e2.ravel(), e64.ravel())[0, 1] > 0.5  # ... but not beyond recognition
    uns = outs["draws2"].uns["txfm_embed"]["X_txfm"]
    assert uns["draws"] == 2 and uns["genes_mapped"] == screen.n_vars
    assert (outs["bs64"].obs.perturbation == screen.obs.perturbation).all()  # input kept
    assert outs["bs64"].X.sum() == screen.X.sum()


@pytest.mark.filterwarnings("ignore:bmdb. only 8 perturbations")
def test_genes_and_both_evaluations_on_the_trained_model(trained, capsys):
    import anndata as ad

    from txfm.cli import main
    from txfm.train import load_checkpoint

    root, synth = trained
    model, config, vocab, info = load_checkpoint(root / "run")
    assert main(["genes", "--checkpoint", str(root / "run"), "--out",
                 str(root / "genes.h5ad")]) == 0
    genes = ad.read_h5ad(root / "genes.h5ad")
    assert list(genes.obs_names) == vocab
    assert genes.obsm["X_codebook"].shape == (len(vocab), 31)
    assert genes.obsm["X_decoder"].shape == (len(vocab), 48)
    assert genes.obs.symbol.str.startswith("SYN").all()

    rc = main(["eval", "relationships", "--genes", str(root / "genes.h5ad"), "--db",
               str(synth.relationships), "--counts", str(synth.datasets[0]), "--null-pairs",
               "3000", "--out", str(root / "rel"), "--no-progress"])
    assert rc == 0
    assert main(["embed", "--checkpoint", str(root / "run"), "--input", str(synth.datasets[0]),
                 "--out", str(root / "emb.h5ad"), "--no-progress"]) == 0
    rc = main(["eval", "perturbation", "--embeddings", str(root / "emb.h5ad"),
               "--perturbation-key", "perturbation", "--batch-key", "batch", "--baselines",
               "liblog", "--postprocess", "none,center", "--db", str(synth.relationships),
               "--pcst-null-draws", "200", "--out", str(root / "pert"), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rel = pd.read_csv(root / "rel" / "relationships_summary.csv")
    assert set(rel.representation) == {"X_codebook", "X_decoder", "pca_loadings"}
    pert = pd.read_csv(root / "pert" / "perturbation.csv").set_index("embedding")
    assert list(pert.index) == ["X_txfm", "liblog"]
    assert "| X_txfm |" in printed and "| X_codebook |" in printed

    # a genes.h5ad written before the keys took the X_ prefix reads under today's names, with
    # the same default components and the old --key and --n-components names still accepted
    old = genes.copy()
    old.obsm = {"codebook": genes.obsm["X_codebook"], "decoder": genes.obsm["X_decoder"]}
    old.write_h5ad(root / "genes_old.h5ad")
    rc = main(["eval", "relationships", "--genes", str(root / "genes_old.h5ad"), "--db",
               str(synth.relationships), "--key", "codebook", "--n-components", "codebook=8",
               "--null-pairs", "3000", "--out", str(root / "rel_old"), "--no-progress"])
    assert rc == 0
    old_rel = pd.read_csv(root / "rel_old" / "relationships_summary.csv")
    assert list(old_rel.representation) == ["X_codebook"] and list(old_rel.PCs) == [8]
    # N alone sets all, KEY=N (by either name) wins over it; a key named twice, once by each
    # name, is scored once
    rc = main(["eval", "relationships", "--genes", str(root / "genes_old.h5ad"), "--db",
               str(synth.relationships), "--n-components", "4", "--n-components", "decoder=6",
               "--key", "codebook", "--key", "X_codebook", "--key", "X_decoder",
               "--null-pairs", "3000", "--out", str(root / "rel_old4"), "--no-progress"])
    assert rc == 0
    old_rel = pd.read_csv(root / "rel_old4" / "relationships_summary.csv")
    assert list(zip(old_rel.representation, old_rel.PCs)) == [("X_codebook", 4), ("X_decoder", 6)]


@pytest.mark.filterwarnings("ignore:.*entries are not grouped by cell")
def test_pbmc_v2_embedded_by_a_model_trained_on_pbmc_v3(shared_data, tmp_path, capsys):
    """Different chemistries, different gene lists: only v2 genes in the v3 vocabulary are
    observable; the report says how many."""
    import anndata as ad

    from txfm.cli import main
    from txfm.data.convert import convert
    from txfm.eval.io import read_cells
    from txfm.train import load_checkpoint

    v3 = shared_data / "scrna_pbmc_1k_v3_10x_qcfiltered"
    convert([v3], tmp_path / "shards", min_cells=20, min_genes=200, progress=False,
            log=lambda msg: None)
    _train(tmp_path / "shards", tmp_path / "run", steps=2)
    _, _, vocab, _ = load_checkpoint(tmp_path / "run")
    v2 = read_cells(shared_data / "scrna_pbmc_1k_v2_10x")
    expected = int(np.isin(v2.var.symbol.to_numpy(), vocab).sum())
    assert 5000 < expected < len(vocab) + 30  # duplicated v2 symbols map twice
    for name, path in (("v2", shared_data / "scrna_pbmc_1k_v2_10x"), ("v3", v3)):
        assert main(["embed", "--checkpoint", str(tmp_path / "run"), "--input", str(path),
                     "--out", str(tmp_path / f"{name}.h5ad"), "--no-progress"]) == 0
    printed = capsys.readouterr().err
    assert f"{expected:,} of 33,538 genes mapped" in printed
    e2 = ad.read_h5ad(tmp_path / "v2.h5ad").obsm["X_txfm"]
    e3 = ad.read_h5ad(tmp_path / "v3.h5ad").obsm["X_txfm"]
    assert e2.shape == (996, 32) and e3.shape == (906, 32)
    assert np.isfinite(e2).all() and np.isfinite(e3).all()


@pytest.mark.gpu
def test_embed_on_cuda_matches_cpu(trained):
    """The sampler draws the same genes on every backend, so CUDA and CPU embeddings agree
    (fp32 on both; TF32 matmuls allowed for)."""
    import anndata as ad

    from txfm.eval.embed import embed_counts, load_model, map_input_genes
    from txfm.eval.io import counts_matrix

    root, synth = trained
    screen = ad.read_h5ad(synth.datasets[0])
    emb = {}
    for device in ("cpu", "cuda"):
        model, config, vocab, info = load_model(str(root / "run"), device)
        match = map_input_genes(screen.var, vocab, None, info["symbols"])
        counts, observable = remap_to_vocabulary(counts_matrix(screen), match.index, len(vocab))
        emb[device] = embed_counts(model, counts, observable, k=config.k, device=device,
                                   precision="fp32", progress=False)
    np.testing.assert_allclose(emb["cuda"], emb["cpu"], atol=2e-3, rtol=2e-3)


def test_embed_refuses_normalised_input_and_fails_on_unmapped_genes(trained, tmp_path, capsys):
    import anndata as ad

    from txfm.cli import main

    root, synth = trained
    screen = ad.read_h5ad(synth.datasets[0])[:64].copy()
    screen.X = screen.X.astype(np.float32)
    counts = screen.X.copy()
    screen.X.data = np.log1p(screen.X.data)
    screen.layers["counts"] = counts
    screen.write_h5ad(tmp_path / "logged.h5ad")
    base = ["embed", "--checkpoint", str(root / "run"), "--input", str(tmp_path / "logged.h5ad"),
            "--out", str(tmp_path / "e.h5ad"), "--no-progress"]
    capsys.readouterr()
    assert main(base) == 2  # log data would give another embedding: refused, the fix named
    err = capsys.readouterr().err
    assert ".X holds non-integer values" in err and "--layer counts" in err, err
    assert "--allow-non-integer" in err
    assert main(base + ["--allow-non-integer"]) == 0
    assert main(base + ["--layer", "counts", "--key", "X_counts"]) == 0
    screen.var_names = [f"OTHER{i}" for i in range(screen.n_vars)]
    screen.var = screen.var.drop(columns="symbol")
    screen.X = counts
    screen.write_h5ad(tmp_path / "other.h5ad")
    assert main(["embed", "--checkpoint", str(root / "run"), "--input",
                 str(tmp_path / "other.h5ad"), "--out", str(tmp_path / "e.h5ad")]) == 2
    assert "--gene-table" in capsys.readouterr().err


def test_embed_shows_every_observable_gene_by_default(trained):
    """Default K: every observable gene, at most EMBED_K_FACTOR x the training K."""
    import anndata as ad

    from txfm.cli import main
    from txfm.eval.cli import EMBED_K_FACTOR

    root, synth = trained
    out = root / "emb_default_k.h5ad"
    assert main(["embed", "--checkpoint", str(root / "run"), "--input", str(synth.datasets[0]),
                 "--out", str(out), "--no-progress"]) == 0
    screen = ad.read_h5ad(synth.datasets[0])
    assert ad.read_h5ad(out).uns["txfm_embed"]["X_txfm"]["k"] == min(screen.n_vars,
                                                                      EMBED_K_FACTOR * 32)


def test_embed_precision_follows_the_training_precision(trained):
    """The checkpoint records the arithmetic it was trained in; ``auto`` embeds a model trained
    in fp32 in fp32 on CUDA too, because bf16 rounding erases the low-variance directions such
    a model can keep cell state in (docs/learning.md)."""
    import anndata as ad

    from txfm.cli import main
    from txfm.eval.embed import load_model, resolve_precision

    root, synth = trained
    model, _, _, _ = load_model(str(root / "run"))
    assert model.trained_precision == "fp32"  # trained on the CPU
    assert resolve_precision("auto", "cuda", model.trained_precision) == "fp32"
    assert resolve_precision("auto", "cuda:1", "bf16") == "bf16"
    assert resolve_precision("auto", "cuda", None) == "bf16"  # older checkpoints: as before
    assert resolve_precision("auto", "cpu", "bf16") == "fp32"
    assert resolve_precision("bf16", "cpu", "fp32") == "bf16"  # an explicit choice stands
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cuda")
    out = root / "emb_precision.h5ad"
    assert main(["embed", "--checkpoint", str(root / "run"), "--input", str(synth.datasets[0]),
                 "--out", str(out), "--no-progress", "--k", "32"]) == 0
    assert ad.read_h5ad(out).uns["txfm_embed"]["X_txfm"]["precision"] == "fp32"


def test_embed_anndata_in_memory_matches_the_command(trained, tmp_path):
    """embed_anndata: an AnnData in a notebook gets the embedding txfm embed writes to a file,
    in .obsm[key] (as scanpy's tools write X_pca), with the same provenance record; a loaded
    model serves several calls; counts in a layer or .raw; a key is not replaced silently."""
    import anndata as ad
    import scipy.sparse as sp

    from txfm.cli import UsageError, main
    from txfm.eval.embed import embed_anndata, load_model

    root, synth = trained
    out = tmp_path / "cli.h5ad"
    assert main(["embed", "--checkpoint", str(root / "run"), "--input", str(synth.datasets[0]),
                 "--out", str(out), "--no-progress", "--k", "32"]) == 0
    want = ad.read_h5ad(out)
    a = ad.read_h5ad(synth.datasets[0])
    lines = []
    emb = embed_anndata(a, root / "run", k=32, progress=False, log=lines.append)
    np.testing.assert_array_equal(emb, want.obsm["X_txfm"])
    assert a.obsm["X_txfm"] is emb and len(lines) == 1 and "genes mapped" in lines[0]
    assert a.uns["txfm_embed"]["X_txfm"] == want.uns["txfm_embed"]["X_txfm"]
    with pytest.raises(UsageError, match=r"already has .obsm\['X_txfm'\].*overwrite=True"):
        embed_anndata(a, root / "run", k=32, progress=False)
    loaded = load_model(str(root / "run"))
    moved = ad.AnnData(X=sp.csr_matrix(np.log1p(a.X.toarray())), obs=a.obs, var=a.var,
                       layers={"counts": a.X.copy()})
    moved.raw = ad.AnnData(X=a.X.copy(), var=a.var)
    for layer in ("counts", "raw"):
        got = embed_anndata(moved, loaded, key=f"X_{layer}", layer=layer, k=32, progress=False)
        np.testing.assert_array_equal(got, emb)
        assert moved.uns["txfm_embed"][f"X_{layer}"]["layer"] == layer
    with pytest.raises(UsageError, match="non-integer"):  # log-normalised .X is refused
        embed_anndata(moved, loaded, key="X_bad", progress=False)
    with pytest.raises(UsageError, match="no layer 'spliced'"):
        embed_anndata(moved, loaded, key="X_bad", layer="spliced", progress=False)
    with pytest.raises(UsageError, match=r"has no \.raw \(nor a layer 'raw'; layers: "
                                         r"\['counts'\]\)"):
        embed_anndata(ad.AnnData(X=a.X.copy(), obs=a.obs, var=a.var, layers={"counts": a.X}),
                      loaded, key="X_bad", layer="raw", progress=False)
    # Python's words in Python's messages
    with pytest.raises(UsageError, match=r"layer='counts'.*allow_non_integer=True"):
        embed_anndata(moved, loaded, key="X_bad", progress=False)
    # scipy's sparse arrays and a backed file (sparse .X) embed as the matrix does
    arr = ad.AnnData(X=sp.csr_array(a.X), obs=a.obs, var=a.var)
    np.testing.assert_array_equal(embed_anndata(arr, loaded, k=32, progress=False), emb)
    backed = ad.read_h5ad(synth.datasets[0], backed="r")
    np.testing.assert_array_equal(embed_anndata(backed, loaded, k=32, progress=False), emb)
    with pytest.raises(UsageError, match="view of a backed AnnData.*to_memory"):
        embed_anndata(backed[:10], loaded, key="X_view", progress=False)
    with pytest.raises(TypeError, match="not the model alone"):
        embed_anndata(a, loaded[0], key="X_bad", progress=False)
    # wrong types name the argument (they were AttributeErrors and unpacking errors)
    for not_adata in (a.X, str(synth.datasets[0])):
        with pytest.raises(TypeError, match="adata must be an anndata.AnnData.*read_h5ad"):
            embed_anndata(not_adata, loaded, key="X_bad", progress=False)
    with pytest.raises(TypeError, match="4 items load_model.*got 3"):
        embed_anndata(a, loaded[:3], key="X_bad", progress=False)
    with pytest.raises(TypeError, match="checkpoint must be .*not int"):
        embed_anndata(a, 7, key="X_bad", progress=False)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UsageError, match="k=.*must be an integer >= 1"):
            embed_anndata(a, loaded, key="X_bad", k=bad, progress=False)


def test_embed_api_rejects_bad_arguments_by_name(trained):
    from txfm.eval.embed import embed_counts, load_model

    root, _ = trained
    loaded = load_model(str(root / "run"))
    model = loaded[0]
    g = model.n_genes
    counts = sp.random(8, g, density=0.3, format="csr", random_state=0, dtype=np.float32) * 10
    obs = np.ones(g, bool)
    with pytest.raises(TypeError, match="first element"):
        embed_counts(loaded, counts, obs, k=8, progress=False)
    with pytest.raises(ValueError, match="remap_to_vocabulary"):
        embed_counts(model, counts[:, :g - 1], obs[:-1], k=8, progress=False)
    with pytest.raises(ValueError, match="observable marks no gene"):
        embed_counts(model, counts, np.zeros(g, bool), k=8, progress=False)
    with pytest.raises(ValueError, match="observable must be"):
        embed_counts(model, counts, obs.astype(int), k=8, progress=False)
    import torch

    import txfm_kernels

    some = np.arange(g) % 3 > 0  # the kernels' one-dataset table and a tensor work as the array
    want = embed_counts(model, counts, some, k=8, progress=False)
    for other in (txfm_kernels.ObservableGenes.from_mask(torch.from_numpy(some)),
                  torch.from_numpy(some)):
        np.testing.assert_array_equal(embed_counts(model, counts, other, k=8, progress=False),
                                      want)
    two = txfm_kernels.ObservableGenes.from_lists([[0, 1], [2]], g)
    with pytest.raises(ValueError, match="ObservableGenes of 2 datasets"):
        embed_counts(model, counts, two, k=8, progress=False)
    for bad in (-1.0, 0, float("nan")):
        with pytest.raises(ValueError, match="target_sum must be a finite number > 0"):
            embed_counts(model, counts, obs, k=8, target_sum=bad, progress=False)
    for bad in (None, "64", 0, True, 2.5):
        with pytest.raises(ValueError, match="k must be an integer"):
            embed_counts(model, counts, obs, k=bad, progress=False)
    with pytest.raises(ValueError, match="use auto, cpu, cuda or cuda:N"):
        embed_counts(model, counts, obs, k=8, device="gpu", progress=False)
    with pytest.raises(ValueError, match="2-D"):
        embed_counts(model, np.ones(g), obs, k=8, progress=False)

    from txfm.train import load_checkpoint

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_checkpoint(root / "run", map_location="cuda")
    # dense arrays and torch tensors are accepted; a K above the observable genes shows them all
    dense = embed_counts(model, counts.toarray(), obs, k=g, progress=False)
    np.testing.assert_array_equal(dense, embed_counts(model, counts, obs, k=10 * g,
                                                      progress=False))


def test_remap_to_vocabulary_checks_the_index():
    counts = sp.csr_matrix(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"outside \[-1, 3\)"):
        remap_to_vocabulary(counts, np.array([0, 1, 2, 5]), 3)  # reached scipy unchecked
    with pytest.raises(ValueError, match=r"must be \[4\]"):
        remap_to_vocabulary(counts, np.array([0, 1]), 3)
    with pytest.raises(TypeError, match="integer"):
        remap_to_vocabulary(counts, np.array([0.0, 1, 2, -1]), 3)


def test_embed_cli_rejects_bad_keys_paths_and_damaged_matrices(trained, tmp_path, capsys):
    import anndata as ad
    import h5py

    from txfm.cli import main

    root, synth = trained
    screen = ad.read_h5ad(synth.datasets[0])[:64].copy()
    screen.write_h5ad(tmp_path / "s.h5ad")
    base = ["embed", "--checkpoint", str(root / "run"), "--no-progress"]
    for key in ("", "a/b", " X"):
        assert main(base + ["--input", str(tmp_path / "s.h5ad"), "--out",
                            str(tmp_path / "o.h5ad"), "--key", key]) == 2
        assert "--key" in capsys.readouterr().err
    assert main(base + ["--input", str(tmp_path / "s.h5ad"), "--out",
                        str(tmp_path / "s.h5ad" / "x.h5ad")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(base + ["--input", str(tmp_path / "s.h5ad"), "--out", str(tmp_path / "k.h5ad"),
                        "--k", "100000"]) == 0  # capped at the observable genes
    assert ad.read_h5ad(tmp_path / "k.h5ad").uns["txfm_embed"]["X_txfm"]["k"] == screen.n_vars
    # a key `txfm eval perturbation` would not find by itself is written, with a warning
    assert main(base + ["--input", str(tmp_path / "s.h5ad"), "--out", str(tmp_path / "t.h5ad"),
                        "--key", "txfm"]) == 0
    err = capsys.readouterr().err
    assert "warning: --key txfm:" in err and "--obsm-key txfm" in err and "X_txfm" in err
    assert "txfm" in ad.read_h5ad(tmp_path / "t.h5ad").obsm
    for name, damage in (("ptr", lambda x: x["indptr"].__setitem__(-1, x["indptr"][-1] + 10**5)),
                         ("idx", lambda x: x["indices"].__setitem__(slice(0, 50), 200_000))):
        bad = tmp_path / f"bad_{name}.h5ad"
        screen.write_h5ad(bad)
        with h5py.File(bad, "r+") as f:
            damage(f["X"])
        assert main(base + ["--input", str(bad), "--out", str(tmp_path / "o.h5ad")]) == 2
        assert "sparse matrix is damaged" in capsys.readouterr().err
    assert not (tmp_path / "o.h5ad").exists()


# ----------------------------------------------------------------------------- faults of a new user

def _embed_cli(trained, capsys, *args):
    from txfm.cli import main

    root, _ = trained
    capsys.readouterr()
    rc = main(["embed", "--checkpoint", str(root / "run"), "--no-progress", "--k", "32",
               *map(str, args)])
    return rc, capsys.readouterr().err


def test_embed_writes_the_input_back_whole_whatever_layer_it_reads(trained, tmp_path, capsys):
    """--layer only picks the counts: .X, .raw, layers, varm, obsp and obsm of the input are
    kept, also when --out is --input; an existing key needs --overwrite; uns per key."""
    import anndata as ad

    root, synth = trained
    src = ad.read_h5ad(synth.datasets[0])[:64].copy()
    counts = src.X.copy()
    a = src.copy()
    a.X = counts.astype(np.float32)
    a.X.data = np.log1p(a.X.data)  # what a scanpy user keeps in .X
    a.raw = ad.AnnData(X=counts, var=src.var)
    a.layers["spliced"] = counts
    a.varm["PCs"] = np.ones((a.n_vars, 2))
    a.obsp["connectivities"] = sp.identity(a.n_obs, format="csr")
    a.obsm["X_pca"] = np.zeros((a.n_obs, 3))
    path = tmp_path / "mine.h5ad"
    a.write_h5ad(path)
    rc, err = _embed_cli(trained, capsys, "--input", path, "--out", path, "--layer", "raw")
    assert rc == 0, err
    b = ad.read_h5ad(path)
    np.testing.assert_array_equal(b.X.toarray(), a.X.toarray())  # log data kept in .X
    assert b.raw is not None and "spliced" in b.layers and "PCs" in b.varm
    assert "connectivities" in b.obsp and "X_pca" in b.obsm and b.obsm["X_txfm"].shape[0] == 64
    meta = b.uns["txfm_embed"]["X_txfm"]
    assert meta["layer"] == "raw" and meta["checkpoint"].endswith(".pt") and meta["step"] > 0
    rc, err = _embed_cli(trained, capsys, "--input", path, "--out", path, "--layer", "spliced")
    assert rc == 2 and "already has .obsm['X_txfm']" in err and "--overwrite" in err
    rc, err = _embed_cli(trained, capsys, "--input", path, "--out", path, "--layer", "spliced",
                         "--key", "X_spliced")
    assert rc == 0, err
    b2 = ad.read_h5ad(path)
    np.testing.assert_allclose(b2.obsm["X_spliced"], b.obsm["X_txfm"], atol=1e-5)
    assert set(b2.uns["txfm_embed"]) == {"X_txfm", "X_spliced"}
    a.layers["raw"] = counts  # 'raw' now names both .raw and a layer
    a.write_h5ad(tmp_path / "both.h5ad")
    rc, err = _embed_cli(trained, capsys, "--input", tmp_path / "both.h5ad", "--out",
                         tmp_path / "o.h5ad", "--layer", "raw")
    assert rc == 2 and "names both .raw and layers['raw']" in err


def test_embed_maps_only_rna_features_and_prefers_distinct_genes(trained, tmp_path, capsys):
    import anndata as ad

    root, synth = trained
    a = ad.read_h5ad(synth.datasets[0])[:64].copy()
    a.write_h5ad(tmp_path / "rna.h5ad")
    rc, err = _embed_cli(trained, capsys, "--input", tmp_path / "rna.h5ad", "--out",
                         tmp_path / "rna_e.h5ad")
    assert rc == 0, err
    want = ad.read_h5ad(tmp_path / "rna_e.h5ad").obsm["X_txfm"]
    # an antibody capture named like one of the genes must not be added to it
    ab = ad.AnnData(X=sp.csr_matrix(np.full((64, 1), 5000.0, np.float32)), obs=a.obs,
                    var=pd.DataFrame({"symbol": [a.var["symbol"].iloc[4]]},
                                     index=[a.var_names[4]]))
    both = ad.concat([a, ab], axis=1, merge="first")
    both.var["feature_types"] = ["Gene Expression"] * a.n_vars + ["Antibody Capture"]
    both.var_names_make_unique()
    both.write_h5ad(tmp_path / "cite.h5ad")
    rc, err = _embed_cli(trained, capsys, "--input", tmp_path / "cite.h5ad", "--out",
                         tmp_path / "cite_e.h5ad")
    assert rc == 0, err
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "cite_e.h5ad").obsm["X_txfm"], want,
                               atol=1e-5)
    # two var_names made equal, symbols intact: the symbol route reaches every gene
    dup = a.copy()
    names = list(dup.var_names)
    names[1] = names[0]
    dup.var_names = names
    dup.write_h5ad(tmp_path / "dup.h5ad")
    rc, err = _embed_cli(trained, capsys, "--input", tmp_path / "dup.h5ad", "--out",
                         tmp_path / "dup_e.h5ad")
    assert rc == 0 and "summed" not in err, err
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "dup_e.h5ad").obsm["X_txfm"], want,
                               atol=1e-5)


def test_embed_flags_inputs_the_model_was_not_made_for(trained, tmp_path, capsys):
    import anndata as ad

    root, synth = trained
    a = ad.read_h5ad(synth.datasets[0])[:64].copy()
    few = a[:, :5].copy()
    few.write_h5ad(tmp_path / "few.h5ad")
    rc, err = _embed_cli(trained, capsys, "--input", tmp_path / "few.h5ad", "--out",
                         tmp_path / "few_e.h5ad")
    assert rc == 0 and "fewer than the K=32 it was shown" in err, err
    binary = a.copy()
    binary.X = (binary.X > 0).astype(np.float32)
    binary.write_h5ad(tmp_path / "bin.h5ad")
    rc, err = _embed_cli(trained, capsys, "--input", tmp_path / "bin.h5ad", "--out",
                         tmp_path / "bin_e.h5ad")
    assert rc == 0 and "every count is 0 or 1" in err, err
    lower = a.copy()
    lower.var_names = [v.lower() for v in lower.var_names]
    lower.var = lower.var.drop(columns="symbol")
    lower.write_h5ad(tmp_path / "lower.h5ad")
    rc, err = _embed_cli(trained, capsys, "--input", tmp_path / "lower.h5ad", "--out",
                         tmp_path / "lower_e.h5ad")
    assert rc == 0 and "only ignoring upper/lower case" in err, err
    for out, what in (("x.csv", "name it *.h5ad"), ("/proc/x.h5ad", "cannot write there")):
        rc, err = _embed_cli(trained, capsys, "--input", tmp_path / "few.h5ad", "--out", out)
        assert rc == 2 and what in err, err
    rc, err = _embed_cli(trained, capsys, "--input", tmp_path / "few.h5ad", "--out",
                         tmp_path / "s.h5ad", "--seed", 2**64)
    assert rc == 2 and err.startswith("error: --seed"), err


def test_embed_refuses_checkpoints_without_genes_or_with_nan_weights(trained, tmp_path, capsys):
    import torch

    from txfm.cli import main
    from txfm.train.checkpoint import latest_checkpoint

    root, synth = trained
    path, state = latest_checkpoint(root / "run")
    bad = dict(state, vocab={})
    torch.save(bad, tmp_path / "novocab.pt")
    nan = dict(state, model={k: v.clone() for k, v in state["model"].items()})
    key = next(k for k, v in nan["model"].items() if v.is_floating_point())
    nan["model"][key].view(-1)[0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    for ckpt, what in (("novocab.pt", "vocabulary genes"), ("nan.pt", "NaN or inf")):
        for cmd in (["genes"], ["embed", "--input", str(synth.datasets[0])]):
            capsys.readouterr()
            rc = main([*cmd, "--checkpoint", str(tmp_path / ckpt), "--out",
                       str(tmp_path / "o.h5ad"), *(["--no-progress"] if cmd[0] == "embed" else [])])
            err = capsys.readouterr().err
            assert rc == 2 and what in err and ckpt in err, err


def test_embed_api_defaults_and_inputs(trained):
    from txfm.eval.embed import embed_counts, load_model, map_input_genes

    root, synth = trained
    model, config, vocab, _ = load_model(str(root / "run"))
    rng = np.random.default_rng(0)
    dense = rng.poisson(1.0, (8, len(vocab))).astype(np.float32)
    obs = np.ones(len(vocab), bool)
    base = embed_counts(model, sp.csr_matrix(dense), obs, k=16, progress=False)
    same = embed_counts(model, sp.csr_matrix(dense), obs, k=16, progress=False,
                        target_sum=float(config.target_sum))
    np.testing.assert_array_equal(base, same)  # default: the model's own target_sum
    coo = sp.coo_matrix(dense)  # the same counts as duplicate entries (valid in scipy)
    twice = sp.coo_matrix((np.concatenate([coo.data / 2, coo.data / 2]),
                           (np.concatenate([coo.row, coo.row]), np.concatenate([coo.col,
                                                                                coo.col]))),
                          shape=coo.shape).tocsr()
    np.testing.assert_allclose(embed_counts(model, twice, obs, k=16, progress=False), base,
                               atol=1e-5)
    for seed in (-1, 2**63, 2**70):
        with pytest.raises(ValueError, match="seed must be an integer in"):
            embed_counts(model, sp.csr_matrix(dense), obs, k=16, seed=seed, progress=False)
    nan = dense.copy()
    nan[2, 3] = np.nan
    with pytest.raises(ValueError, match="counts: 1 values are NaN, infinite or negative"):
        embed_counts(model, sp.csr_matrix(nan), obs, k=16, progress=False)
    m = map_input_genes(list(vocab[:5]), vocab)
    assert m.index.tolist() == [0, 1, 2, 3, 4]
    assert len(load_model(str(root / "run" / "checkpoints"))[2]) == len(vocab)  # RUN meant
    import anndata as ad

    from txfm.eval.io import read_input

    backed_path = root / "backed.h5ad"
    ad.AnnData(X=sp.csr_matrix(dense)).write_h5ad(backed_path)
    backed = ad.read_h5ad(backed_path, backed="r")
    np.testing.assert_array_equal(embed_counts(model, backed.X, obs, k=16, progress=False), base)
    backed.file.close()
    ad.AnnData(X=sp.csr_matrix(dense)).write_zarr(root / "cells.zarr")
    assert read_input(root / "cells.zarr", "--input").shape == dense.shape  # AnnData zarr


def test_embed_python_api_as_a_pytorch_user_calls_it(trained, tmp_path):
    """What a user reusing the model from Python meets: a model left in train mode, NaN under
    padding, small batch sizes, device and map_location names, a gene table by path, a
    bf16-cast model's record, and configs that are copies."""
    import anndata as ad
    import torch

    from txfm.cli import UsageError
    from txfm.eval.embed import embed_anndata, embed_counts, load_model
    from txfm.model import PRESETS, TxFM, preset
    from txfm.train import load_checkpoint

    root, synth = trained
    model, config, vocab, info = load_model(str(root / "run"))
    rng = np.random.default_rng(1)
    counts = sp.csr_matrix(rng.poisson(2.0, (70, len(vocab))).astype(np.float32))
    obs = np.ones(len(vocab), bool)
    ref = embed_counts(model, counts, obs, k=24, progress=False)
    # train mode with stochastic depth: embedded in eval mode, and the mode is given back
    noisy = TxFM(config.replace(drop_path=0.5), len(vocab))
    noisy.load_state_dict(model.state_dict())
    assert noisy.training
    np.testing.assert_allclose(embed_counts(noisy, counts, obs, k=24, progress=False), ref,
                               atol=1e-5)
    assert noisy.training
    # the forward takes batch_size cells (memory), and the embeddings do not change
    sizes = []
    real = model.embed
    model.embed = lambda *a, **kw: (sizes.append(a[0].shape[0]), real(*a, **kw))[1]
    got = embed_counts(model, counts, obs, k=24, batch_size=8, progress=False)
    del model.embed
    assert max(sizes) == 8 and sum(sizes) == 70
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # values under padding are never read, a NaN sentinel included
    ids = torch.tensor([[3, 7, 0], [1, 2, 5]])
    pad = torch.tensor([[False, False, True], [False, False, False]])
    vals = torch.tensor([[2.0, 5.0, 0.0], [1.0, 1.0, 1.0]])
    with torch.inference_mode():
        clean = model.embed(ids, vals, pad)
        for sentinel in (float("nan"), float("inf")):
            dirty = vals.clone()
            dirty[0, 2] = sentinel
            torch.testing.assert_close(model.embed(ids, dirty, pad), clean)
    # device / map_location names: auto and cpu:0 work, others are refused by name
    assert next(load_model(str(root / "run"), device="auto")[0].parameters()).device.type \
        in ("cpu", "cuda")
    assert load_checkpoint(root / "run", map_location="cpu:0")[0] is not None
    assert next(load_model(str(root / "run"), device="cpu:0")[0].parameters()).device.type \
        == "cpu"  # the same names as map_location
    with pytest.raises(ValueError, match="map_location='gpu' is not a device"):
        load_checkpoint(root / "run", map_location="gpu")
    with pytest.raises(UsageError, match="device 'gpu': use auto, cpu, cuda or cuda:N"):
        load_model(str(root / "run"), device="gpu")
    # a gene table given by its path, as txfm embed --gene-table takes it
    screen = ad.read_h5ad(synth.datasets[0])[:40].copy()
    table = tmp_path / "genes.tsv"
    pd.DataFrame({"ensembl_gene_id": list(screen.var_names),
                  "gene_symbol": [f"S{i}" for i in range(screen.n_vars)]}
                 ).to_csv(table, sep="\t", index=False)
    by_path = embed_anndata(screen.copy(), str(root / "run"), gene_table=str(table),
                            progress=False)
    np.testing.assert_allclose(by_path, embed_anndata(screen.copy(), str(root / "run"),
                                                      progress=False), atol=1e-6)
    with pytest.raises(TypeError, match="gene_table must be a GeneTable"):
        embed_anndata(screen.copy(), str(root / "run"), gene_table=3, progress=False)
    # genes named in a column 'Gene' (any case) are found
    renamed = screen.copy()
    renamed.var["Gene"] = list(renamed.var_names)
    renamed.var_names = [f"x{i}" for i in range(renamed.n_vars)]
    np.testing.assert_allclose(embed_anndata(renamed, str(root / "run"), progress=False),
                               by_path, atol=1e-6)
    # a model cast to bf16 computes in bf16, and the record says so
    cast = (model.to(torch.bfloat16), config, vocab, info)
    bf = screen.copy()
    embed_anndata(bf, cast, progress=False, device="cpu")
    assert bf.uns["txfm_embed"]["X_txfm"]["precision"] == "bf16"
    model.float()
    # configs are copies: a preset's extra, and a model's backend switch
    p = preset("tiny")
    p.extra["note"] = 1
    assert PRESETS["tiny"].extra == {}
    TxFM(PRESETS["tiny"], 10).set_use_fused_ops(False)
    assert PRESETS["tiny"].backend == preset("tiny").backend == "auto"


def test_every_device_argument_checks_devices_the_same_way(monkeypatch):
    """--device, device=, TrainConfig.device, map_location= and the trainer's device share one
    parser of device names and one check of what CUDA devices exist (txfm.devices), each
    naming its own argument, before torch reads a name it would refuse or a file it would
    blame."""
    import torch

    from txfm.cli import UsageError, check_device
    from txfm.devices import device_problem, parse_device
    from txfm.train import distributed
    from txfm.train.checkpoint import check_map_location
    from txfm.train.config import ConfigError, TrainConfig

    assert device_problem(torch.device("cpu")) is None
    assert parse_device("cpu:0") == torch.device("cpu") == parse_device(torch.device("cpu"))
    # names torch.device refuses ("cuda:01", non-ASCII digits) or TxFM cannot load on
    for bad in ("cuda:01", "cuda:\u0663", "cuda:\u00b2", "cpu:1", "gpu", "mps", "meta", "",
                "auto", 0, torch.device("meta")):
        assert parse_device(bad) is None, bad
        with pytest.raises(ValueError, match=r"map_location=.* is not a device .* 'cuda:N'"):
            check_map_location(bad)
    for bad in ("cuda:01", "cuda:\u0663", "cpu:1", "gpu"):
        with pytest.raises(UsageError, match="use auto, cpu, cuda or cuda:N"):
            check_device("--device", bad)
        with pytest.raises(ConfigError, match="device=.*use auto, cpu, cuda or cuda:N"):
            TrainConfig(device=bad)
    assert check_device("--device", "cpu:0") == "cpu" == check_map_location("cpu:0")
    assert TrainConfig(device="cpu:0").device == "cpu:0"
    assert distributed.init("cpu:0").device == torch.device("cpu")
    assert check_map_location({"cuda:0": "cpu"}) == {"cuda:0": "cpu"}  # passed on to torch.load

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UsageError, match="--device 'cuda': CUDA is not available here"):
        check_device("--device", "cuda")
    with pytest.raises(ValueError, match="map_location='cuda': CUDA is not available here"):
        check_map_location("cuda")
    with pytest.raises(ValueError, match=r"device='cuda:3' \(this rank: cuda:3\): CUDA is not "
                                         r"available here"):
        distributed.init("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("--device", "cuda:1") == "cuda:1"
    assert check_map_location(torch.device("cuda", 1)) == "cuda:1"
    has_two = r"this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"
    with pytest.raises(UsageError, match="--device 'cuda:2': " + has_two):
        check_device("--device", "cuda:2")
    with pytest.raises(ValueError, match="map_location='cuda:2': " + has_two):
        check_map_location("cuda:2")
    with pytest.raises(ValueError, match="device='cuda:2' .*" + has_two):
        distributed.init("cuda:2")  # refused before torch.cuda.set_device
