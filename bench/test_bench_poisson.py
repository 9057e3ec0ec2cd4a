"""pytest-benchmark view of the fused Poisson loss: ``pytest bench/test_bench_poisson.py --benchmark-only``.

Each group puts eager PyTorch (the paper's formula), torch.compile of it and our backends side
by side on one small case (B=32, G=44,349, fp32); ``python -m bench.poisson`` runs the full
sizes and dtypes.
"""
import pytest
import torch

from bench.common import bench_device, benchmark_backends, synced
from bench.poisson import G_FULL, eager_loss, make_case
from txfm_kernels import rectified_tanh_poisson_nll

B = 32
DEVICE = bench_device()
BACKENDS = benchmark_backends("poisson", DEVICE)
IMPLS = ["eager", "compile"] + BACKENDS


@pytest.fixture(scope="module")
def case():
    return make_case(B, G_FULL, torch.float32, DEVICE)


def _loss_fn(impl):
    if impl == "eager":
        return eager_loss
    if impl == "compile":
        torch._dynamo.reset()
        return torch.compile(eager_loss)
    return lambda z, x: rectified_tanh_poisson_nll(z, x, backend=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark, case, impl):
    z, x = case
    loss_fn = _loss_fn(impl)
    benchmark.group = f"poisson fwd B{B} G{G_FULL} fp32"

    def run():
        with torch.no_grad():
            return loss_fn(z, x)

    loss = benchmark(synced(run, DEVICE))
    torch.testing.assert_close(loss.float(), eager_loss(z, x).detach(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward(benchmark, case, impl):
    z, x = case
    loss_fn = _loss_fn(impl)
    benchmark.group = f"poisson fwd+bwd B{B} G{G_FULL} fp32"

    def run():
        return torch.autograd.grad(loss_fn(z, x), z)[0]

    grad = benchmark(synced(run, DEVICE))
    assert grad.shape == z.shape and grad.dtype == z.dtype
    want = torch.autograd.grad(eager_loss(z, x), z)[0]
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-9)  # a timed wrong answer is no win
