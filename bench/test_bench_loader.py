"""pytest-benchmark cases for the loader (small corpus; ``--benchmark-only`` to run).

    pytest bench/test_bench_loader.py --benchmark-only

Each case reads 8 shuffled 256-cell batches of a 6,000 x 5,000 corpus (~600 nnz/cell):
``txfm`` in-process with 1 and 2 threads, with and without its crc32c check of every chunk,
and anndata's backed ``.h5ad`` random access.
"""
from __future__ import annotations

import numpy as np
import pytest

from bench.loader import make_ours, make_source

BATCH, N_BATCHES = 256, 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_loader")
    src = make_source(root / "source.h5ad", 6000, 5000, 600)
    return src, make_ours(src, root / "txfm_none", "none")


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("threads", [1, 2])
def test_txfm_loader(benchmark, corpus, threads, verify):
    from txfm.data import ShardLoader

    benchmark.group = "loader: 8 x 256 shuffled cells"
    loader = ShardLoader(corpus[1], BATCH, num_threads=threads, verify=verify)

    def run():
        loader.set_epoch(0)
        it = iter(loader)
        return sum(next(it).batch_size for _ in range(N_BATCHES))

    assert benchmark(run) == BATCH * N_BATCHES


def test_h5ad_backed(benchmark, corpus):
    import anndata as ad

    benchmark.group = "loader: 8 x 256 shuffled cells"
    a = ad.read_h5ad(corpus[0], backed="r")
    rng = np.random.default_rng(0)

    def run():
        return sum(a.X[np.sort(rng.choice(a.n_obs, BATCH, replace=False))].shape[0]
                   for _ in range(N_BATCHES))

    assert benchmark(run) == BATCH * N_BATCHES
