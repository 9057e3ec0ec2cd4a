"""pytest-benchmark view of the gene-token op:
``pytest bench/test_bench_tokens.py --benchmark-enable --benchmark-only``.

Each group puts eager PyTorch, torch.compile and our backends side by side on one small case
(B=8, K=2048, d=384, V=44,349, fp32); ``python -m bench.tokens`` runs the full sizes.
"""
import pytest
import torch

from bench.common import bench_device, benchmark_backends, synced
from bench.tokens import V_FULL, eager_tokens, make_case
from txfm_kernels import gene_tokens

B, K, D = 8, 2048, 384
DEVICE = bench_device()
BACKENDS = benchmark_backends("tokens", DEVICE)
IMPLS = ["eager", "compile"] + BACKENDS


@pytest.fixture(scope="module")
def case():
    return make_case(B, K, D, V_FULL, torch.float32, DEVICE)


def _forward(impl):
    if impl == "eager":
        return eager_tokens
    if impl == "compile":
        torch._dynamo.reset()
        return torch.compile(eager_tokens)
    return lambda e, ids, x, c: gene_tokens(e, ids, x, cls=c, backend=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark, case, impl):
    codebook, gene_ids, values, cls, _ = case
    fwd = _forward(impl)
    benchmark.group = f"tokens fwd B{B} K{K} d{D}"

    def run():
        with torch.no_grad():
            return fwd(codebook, gene_ids, values, cls)

    out = benchmark(synced(run, DEVICE))
    assert out.shape == (B, K + 1, D)
    with torch.no_grad():
        assert torch.equal(out, eager_tokens(codebook, gene_ids, values, cls))  # a plain copy


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward(benchmark, case, impl):
    codebook, gene_ids, values, cls, grad = case
    fwd = _forward(impl)
    benchmark.group = f"tokens fwd+bwd B{B} K{K} d{D}"

    def run():
        return torch.autograd.grad(fwd(codebook, gene_ids, values, cls), (codebook, cls), grad)

    grads = benchmark(synced(run, DEVICE))
    assert grads[0].shape == codebook.shape
    want = torch.autograd.grad(eager_tokens(codebook, gene_ids, values, cls), (codebook, cls),
                               grad)
    for got, ref in zip(grads, want):  # fp32 sums in another order
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
