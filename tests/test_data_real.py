"""Converter on real public data in ../shared/data (skipped when that folder is absent).

Expected values are computed independently of the converter's readers: ``scipy.io.mmread``
plus the gene files, duplicated symbols summed, the filters applied with numpy.
"""
from __future__ import annotations

import gzip
import warnings

import pytest

pytest.importorskip("anndata", reason="txfm.data / txfm.eval need anndata: pip install anndata zarr")
pytest.importorskip("zarr", reason="txfm.data / txfm.eval need zarr: pip install anndata zarr")

import anndata as ad
import numpy as np
import scipy.io
import scipy.sparse as sp

from _shards import read_shards
from txfm.data import ShardLoader
from txfm.data.convert import convert


def read_10x(folder):
    """(cells x features CSR int64, first feature column, second column or None)."""
    m = scipy.io.mmread(folder / "matrix.mtx.gz")
    feats = folder / ("features.tsv.gz" if (folder / "features.tsv.gz").exists() else "genes.tsv.gz")
    with gzip.open(feats, "rt") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    second = [r[1] for r in rows] if len(rows[0]) > 1 else None
    return sp.csr_matrix(m.T).astype(np.int64), [r[0] for r in rows], second


corpus = read_shards


def project(x: sp.csr_matrix, keys: list[str], vocab: list[str]) -> sp.csr_matrix:
    """Columns keyed by ``keys`` summed onto ``vocab`` (duplicates add up, others dropped)."""
    pos = {k: i for i, k in enumerate(vocab)}
    target = np.array([pos.get(k, -1) for k in keys])
    keep = np.flatnonzero(target >= 0)
    p = sp.csr_matrix((np.ones(keep.size, dtype=np.int64), (keep, target[keep])),
                      shape=(len(keys), len(vocab)))
    return (x @ p).tocsr()


def filtered(x: sp.csr_matrix, keys: list[str], min_cells: int, min_genes: int):
    """Kept unique keys and kept rows after the gene filter then the cell filter."""
    uniq = list(dict.fromkeys(keys))
    merged = project(x, keys, uniq)
    merged.eliminate_zeros()
    gene_cells = np.bincount(merged.indices, minlength=len(uniq))
    kept = [k for k, c in zip(uniq, gene_cells) if c >= min_cells]
    sub = project(x, keys, kept)
    sub.eliminate_zeros()
    rows = np.flatnonzero(np.diff(sub.indptr) >= min_genes)
    return kept, rows


def test_pbmc_v2_and_v3_into_one_vocabulary(shared_data, tmp_path):
    v2 = shared_data / "scrna_pbmc_1k_v2_10x"
    v3 = shared_data / "scrna_pbmc_1k_v3_10x_qcfiltered"
    out = tmp_path / "pbmc"
    min_cells, min_genes = 3, 200
    # these MatrixMarket files list entries gene by gene (converted from R), not cell by cell
    with pytest.warns(UserWarning, match="not grouped by cell"):
        m = convert([v2, v3], out, names=["pbmc_v2", "pbmc_v3"], min_cells=min_cells,
                    min_genes=min_genes, val_fraction=0.02, shard_cells=500, progress=False,
                    log=lambda s: None)
    m, x, obs = corpus(out)
    expected_vocab = []
    for name, folder in (("pbmc_v2", v2), ("pbmc_v3", v3)):
        raw, symbols, _ = read_10x(folder)
        kept, rows = filtered(raw, symbols, min_cells, min_genes)
        expected_vocab += [k for k in kept if k not in expected_vocab]
        d = m.datasets[m.dataset_index(name)]
        assert d.n_cells == rows.size and d.report["genes_kept"] == len(kept)
        assert sorted(np.asarray(m.gene_ids)[d.observable]) == sorted(kept)
        sel = np.flatnonzero(obs["dataset"].astype(str).to_numpy() == name)
        assert sorted(obs["source_row"].to_numpy()[sel]) == rows.tolist()
        kept_set = set(kept)  # genes the filter removed here stay out, even if in the vocab
        keys = [k if k in kept_set else None for k in symbols]
        want = project(raw[obs["source_row"].to_numpy()[sel]], keys, m.gene_ids)
        assert abs(x[sel] - want).sum() == 0
    assert m.gene_ids == expected_vocab  # union in order of first appearance
    assert m.datasets[0].report["duplicate_features_merged"] == 24
    assert m.datasets[1].report["duplicate_features_merged"] == 10
    assert m.counts_dtype == "uint16" and m.integer_counts
    # and the loader streams all of it
    loader = ShardLoader(out, 128, drop_last=False)
    n = sum(b.batch_size for b in loader)
    assert n == m.n_split_cells("train")


def test_chr21_10x_v3_and_symbol_to_id_mapping(shared_data, tmp_path):
    chr21 = shared_data / "scrna_10x_v3_chr21_scanpy_testdata"
    raw, ids, syms = read_10x(chr21)
    out = tmp_path / "chr21"
    m = convert([chr21], out, min_cells=0, min_genes=0, val_fraction=0.0, progress=False,
                log=lambda s: None)
    m, x, obs = corpus(out)
    assert m.gene_ids == ids and m.symbols == syms  # Ensembl ids as keys, symbols kept
    # the streaming MatrixMarket reader (entries grouped by cell) cuts chunks between cells
    from txfm.data.readers import TenxDirReader

    chunks = list(TenxDirReader(chr21).iter_chunks(3000))
    assert len(chunks) > 3 and [c[0] for c in chunks] == sorted(c[0] for c in chunks)
    streamed = sp.vstack([c[1] for c in chunks]).tocsr()
    streamed.sum_duplicates()
    assert abs(streamed - raw).sum() == 0
    np.testing.assert_array_equal(x.toarray(), raw[obs["source_row"].to_numpy()].toarray())
    assert obs.index[0].startswith("scrna_10x_v3_chr21_scanpy_testdata:")
    # PBMC (symbols only) + chr21 (ids): with a gene table the symbols become Ensembl ids
    # and the datasets share the chr21 genes
    v3 = shared_data / "scrna_pbmc_1k_v3_10x_qcfiltered"
    out2 = tmp_path / "mixed"
    table = shared_data / "gene_tables" / "genes_grch38_sceptre.tsv"
    with pytest.warns(UserWarning, match="not grouped by cell"):
        m2 = convert([chr21, v3], out2, gene_table=table, min_cells=0, min_genes=0,
                     val_fraction=0.0, progress=False, log=lambda s: None)
    obs_chr21 = set(m2.datasets[0].observable.tolist())
    obs_pbmc = set(m2.datasets[1].observable.tolist())
    shared = obs_chr21 & obs_pbmc
    assert len(shared) > 100
    assert all(m2.gene_ids[g].startswith("ENSG") for g in shared)
    assert m2.n_genes < len(ids) + 14688


def test_papalexi_h5ad_keeps_labels(shared_data, tmp_path):
    p = shared_data / "perturbseq_papalexi2021_eccite_subset" / "papalexi2021_subset.h5ad"
    out = tmp_path / "papalexi"
    m = convert([p], out, min_cells=10, min_genes=20, val_fraction=0.0, progress=False,
                log=lambda s: None)
    loader = ShardLoader(out, 512, obs_columns=("top_grna_target", "bio_rep"))
    b = next(iter(loader))
    cats = loader.obs_categories["top_grna_target"]
    assert "non-targeting" in cats and b.obs["top_grna_target"].min() >= 0
    src = ad.read_h5ad(p)
    rows = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shard = ad.read_zarr(out / m.shards[0].path)
    rows = shard.obs["source_row"].to_numpy()
    assert (shard.obs["top_grna_target"].astype(str).to_numpy()
            == src.obs["top_grna_target"].astype(str).to_numpy()[rows]).all()
