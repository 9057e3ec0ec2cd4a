"""pytest-benchmark view of the gene-token op:
``pytest bench/test_bench_tokens.py --benchmark-enable --benchmark-only``.

Each group puts eager PyTorch, torch.compile and our backends side by side on one small case
(B=8, K=2048, d=384, V=44,349, fp32); ``python -m bench.tokens`` runs the full sizes.
"""
import pytest
import torch

import txfm_kernels
from bench.tokens import V_FULL, eager_tokens, make_case
from txfm_kernels import gene_tokens

B, K, D = 8, 2048, 384
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [name for name, info in txfm_kernels.available_backends("tokens").items()
            if info.available and DEVICE in info.devices
            and not (name == "triton" and DEVICE == "cpu")]  # the interpreter is no benchmark
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


def _synced(fn):
    def run():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out
    return run


@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark, case, impl):
    codebook, gene_ids, values, cls, _ = case
    fwd = _forward(impl)
    benchmark.group = f"tokens fwd B{B} K{K} d{D}"

    def run():
        with torch.no_grad():
            return fwd(codebook, gene_ids, values, cls)

    out = benchmark(_synced(run))
    assert out.shape == (B, K + 1, D)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward(benchmark, case, impl):
    codebook, gene_ids, values, cls, grad = case
    fwd = _forward(impl)
    benchmark.group = f"tokens fwd+bwd B{B} K{K} d{D}"

    def run():
        return torch.autograd.grad(fwd(codebook, gene_ids, values, cls), (codebook, cls), grad)

    grads = benchmark(_synced(run))
    assert grads[0].shape == codebook.shape
