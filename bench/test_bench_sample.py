"""pytest-benchmark view of the masked sampler:
``pytest bench/test_bench_sample.py --benchmark-enable --benchmark-only``.

Each group puts the per-row loop peers use, the vectorised eager version and our backends side
by side on one small case (B=32 single-cell rows, G=44,349, K=2,048, with and without the dense
target); ``python -m bench.sample`` runs the full sizes.
"""
import pytest

from bench.common import bench_device, benchmark_backends, synced
from bench.sample import G_FULL, eager_sample, loop_sample, make_batch
from txfm_kernels import masked_sample

B, K = 32, 2048
DEVICE = bench_device()
BACKENDS = benchmark_backends("sample", DEVICE)
IMPLS = ["loop", "eager"] + BACKENDS


@pytest.fixture(scope="module")
def batch():
    indptr, indices, counts, obs, ds = make_batch(B, "sc")
    return (indptr.to(DEVICE), indices.to(DEVICE), counts.to(DEVICE), obs.to(DEVICE),
            ds.to(DEVICE))


@pytest.mark.parametrize("return_target", [True, False], ids=["target", "no-target"])
@pytest.mark.parametrize("impl", IMPLS)
def test_masked_sample(benchmark, batch, impl, return_target):
    indptr, indices, counts, obs, ds = batch
    target = "target" if return_target else "no target"
    benchmark.group = f"masked sample B{B} K{K} G{G_FULL} {target}"
    if impl in ("loop", "eager"):
        fn = loop_sample if impl == "loop" else eager_sample

        def run():
            return fn(indptr, indices, counts, obs, ds, G_FULL, K, return_target)
    else:
        def run():
            return masked_sample(indptr, indices, counts, n_genes=G_FULL, k=K, observable=obs,
                                 dataset_ids=ds, seed=0, return_target=return_target,
                                 backend=impl)
    out = benchmark(synced(run, DEVICE))
    assert out[0].shape == (B, K)
