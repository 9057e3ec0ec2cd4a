"""pytest-benchmark view of the masked sampler:
``pytest bench/test_bench_sample.py --benchmark-enable --benchmark-only``.

Each group puts the per-row loop peers use, the vectorised eager version and our backends side
by side on one small case (B=32 single-cell rows, G=44,349, K=2,048, with and without the dense
target); ``python -m bench.sample`` runs the full sizes.
"""
import pytest
import torch

import txfm_kernels
from bench.sample import G_FULL, eager_sample, loop_sample, make_batch
from txfm_kernels import masked_sample

B, K = 32, 2048
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [name for name, info in txfm_kernels.available_backends("sample").items()
            if info.available and DEVICE in info.devices
            and not (name == "triton" and DEVICE == "cpu")]  # the interpreter is no benchmark
IMPLS = ["loop", "eager"] + BACKENDS


@pytest.fixture(scope="module")
def batch():
    indptr, indices, counts, obs, ds = make_batch(B, "sc")
    return (indptr.to(DEVICE), indices.to(DEVICE), counts.to(DEVICE), obs.to(DEVICE),
            ds.to(DEVICE))


def _synced(fn):
    def run():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out
    return run


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
    out = benchmark(_synced(run))
    assert out[0].shape == (B, K)
