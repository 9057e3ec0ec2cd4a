"""Reading converted shards back with anndata (shared by the data tests)."""
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from txfm.data import Manifest


def read_shards(out: Path) -> tuple[Manifest, sp.csr_matrix, pd.DataFrame]:
    """Every shard (train then val) read with anndata, concatenated in manifest order."""
    m = Manifest.load(out)
    xs, obs = [], []
    for s in m.shards:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr: numcodecs codecs outside the v3 core spec
            a = ad.read_zarr(Path(out) / s.path)
        assert a.n_vars == m.n_genes and list(a.var_names) == m.gene_ids
        xs.append(sp.csr_matrix((a.X.data, a.X.indices.astype(np.int32), a.X.indptr), shape=a.shape))
        obs.append(a.obs)
    return m, sp.vstack(xs).tocsr(), pd.concat(obs)


def synthetic_shards(tmp_path_factory, *, cells: int, genes: int, perturbations: int,
                     seed: int, shard_cells: int, convert_seed: int, val_fraction: float) -> Path:
    """A converted synthetic corpus (two batches; no QC filtering) for a module's tests."""
    from txfm.data.convert import convert
    from txfm.data.synth import generate

    raw = generate(tmp_path_factory.mktemp("raw"), cells=cells, genes=genes,
                   perturbations=perturbations, batches=2, seed=seed)
    out = tmp_path_factory.mktemp("shards") / "s"
    convert(raw.datasets, out, min_cells=1, min_genes=1, val_fraction=val_fraction,
            shard_cells=shard_cells, seed=convert_seed, progress=False, log=lambda s: None)
    return out
