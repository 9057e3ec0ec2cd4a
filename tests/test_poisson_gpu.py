"""GPU checks of the fused Poisson loss: the cuda and triton backends on CUDA tensors against
the fp64 reference of test_poisson.py (skipped without a GPU; run them on a machine with one)."""
import pytest
import torch
import torch.nn.functional as F

import txfm_kernels
from txfm_kernels import RowGeneMask, poisson_nll_loss, rectified_tanh_poisson_nll

from test_poisson import MASKS, REDUCTIONS, _inputs, _mask, assert_matches, expected

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["cuda", "triton"]


def _need(backend):
    info = txfm_kernels.available_backends("poisson")[backend]
    if not (info.available and "cuda" in info.devices):
        pytest.skip(f"{backend} backend not available on CUDA tensors: {info.detail}")


def _to(mask, device):
    if mask is None:
        return None
    if isinstance(mask, RowGeneMask):
        return RowGeneMask(mask.mask.to(device), mask.dataset_ids.to(device))
    return mask.to(device)


def _run_gpu(backend, z, x, mask, reduction, grad_scale=1.0):
    zc = z.cuda().requires_grad_(True)
    loss = rectified_tanh_poisson_nll(zc, x.cuda(), _to(mask, "cuda"), reduction=reduction,
                                      backend=backend)
    (loss * grad_scale).backward(torch.ones_like(loss))
    return loss.detach().cpu(), zc.grad.cpu()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 1000), (4, 4097), (64, 44349), (2, 70001)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gpu_fp32_matches_fp64_reference(backend, shape, mask_kind, reduction):
    _need(backend)
    z, x = _inputs(*shape)
    mask = _mask(mask_kind, *shape)
    loss, grad = _run_gpu(backend, z, x, mask, reduction)
    # the GPU exp/log are the hardware approximations: a few ulp, hence the looser tolerance
    assert_matches(loss, grad, z, x, mask, reduction, expected(z, x, mask, reduction, rtol=1e-4))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float32)], ids=["bf16-bf16", "bf16-fp32",
                                                                          "fp16-fp32"])
def test_gpu_half_precision(backend, dtypes):
    _need(backend)
    z, x = _inputs(8, 44349)
    z, x = z.to(dtypes[0]), x.to(dtypes[1])
    mask = _mask("datasets", 8, 44349)
    loss, grad = _run_gpu(backend, z, x, mask, "mean")
    ref_loss, ref_grad, loss_tol, grad_tol = expected(z, x, mask, "mean", rtol=1e-4)
    assert grad.dtype == dtypes[0]
    assert abs(loss.double() - ref_loss) <= loss_tol
    # fp32 arithmetic (tolerance relative to the terms, as in fp32), then one rounding to the
    # logits' dtype: within one unit in its last place (plus fp16's subnormal spacing)
    ulp = 2.0 ** -7 if dtypes[0] == torch.bfloat16 else 2.0 ** -10
    floor = 2.0 ** -24 if dtypes[0] == torch.float16 else 0.0
    assert torch.all((grad.double() - ref_grad).abs() <= ulp * ref_grad.abs() + grad_tol + floor)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_fp16_gradient_survives_loss_scaling(backend):
    """fp16 logits keep an fp32 saved gradient (test_poisson.py's CPU check, on the GPU's
    kernels): a GradScaler's 2^16 acts before the one rounding to fp16."""
    _need(backend)
    z, x = _inputs(64, 2000)
    z, x = z.half(), x.float()
    _, grad = _run_gpu(backend, z, x, None, "mean", grad_scale=2.0 ** 16)
    _, ref_grad, _, grad_tol = expected(z, x, None, "mean", rtol=1e-4)
    ref = ref_grad * 2.0 ** 16
    assert grad.dtype == torch.float16
    assert torch.all((grad.double() - ref).abs() <= 2.0 ** -10 * ref.abs()
                     + grad_tol * 2.0 ** 16 + 2.0 ** -24)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backward_scaling_in_place(backend):
    _need(backend)
    z, x = _inputs(16, 5000)
    _, unit = _run_gpu(backend, z, x, None, "mean")
    assert_matches(*_run_gpu(backend, z, x, None, "mean"), z, x, None, "mean",
                   expected(z, x, None, "mean", rtol=1e-4))
    for scale in (2.5, 0.0):
        _, grad = _run_gpu(backend, z, x, None, "mean", grad_scale=scale)
        torch.testing.assert_close(grad, scale * unit, rtol=1e-6, atol=0)
    zc = z.cuda().requires_grad_(True)
    loss = rectified_tanh_poisson_nll(zc, x.cuda(), backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_extremes_nan_and_bad_ids(backend):
    _need(backend)
    vals = torch.tensor([-1e4, -0.0, 0.0, 1e-30, 1e-3, 2.0, 400.0, 1e4, float("nan")])
    z = vals.repeat(2, 1)
    x = torch.full_like(z, 11.5)
    loss, grad = _run_gpu(backend, z, x, None, "none")
    assert torch.isnan(loss[:, -1]).all() and torch.isnan(grad[:, -1]).all()
    assert torch.isfinite(loss[:, :-1]).all() and torch.isfinite(grad[:, :-1]).all()
    assert torch.all(grad[:, :3] == 0)
    bad = RowGeneMask(torch.ones(2, 9, dtype=torch.bool), torch.tensor([0, 5]))
    zz, xx = _inputs(2, 9)
    loss, grad = _run_gpu(backend, zz, xx, bad, "none")
    assert torch.isfinite(loss[0]).all() and torch.isnan(loss[1]).all() and torch.isnan(grad[1]).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_deterministic(backend):
    _need(backend)
    z, x = _inputs(64, 44349)
    mask = _mask("rows", 64, 44349)
    a = _run_gpu(backend, z, x, mask, "mean")
    b = _run_gpu(backend, z, x, mask, "mean")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("log_input", [True, False])
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gpu_poisson_nll_loss_matches_torch(backend, log_input, full, reduction):
    _need(backend)
    gen = torch.Generator().manual_seed(5)
    inp = torch.randn(8, 300, generator=gen) * 2
    if not log_input:
        inp = inp.abs() + 0.05
    tgt = torch.poisson(torch.rand(8, 300, generator=gen) * 4)
    for dtype in (torch.float32, torch.float64):
        a = inp.to("cuda", dtype).requires_grad_(True)
        b = inp.to("cuda", dtype).requires_grad_(True)
        t = tgt.to("cuda", dtype)
        la = poisson_nll_loss(a, t, log_input, full, reduction=reduction, backend=backend)
        lb = F.poisson_nll_loss(b, t, log_input=log_input, full=full, reduction=reduction)
        tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(la, lb, **tol)
        la.backward(torch.ones_like(la))
        lb.backward(torch.ones_like(lb))
        torch.testing.assert_close(a.grad, b.grad, **tol)


def test_gpu_auto_prefers_cuda_then_triton():
    z, x = _inputs(2, 10)
    expected_backend = next((b for b in GPU_BACKENDS
                             if txfm_kernels.available_backends("poisson")[b].available), "torch")
    from txfm_kernels.backends import resolve_backend

    assert resolve_backend("auto", torch.device("cuda"), "poisson") == expected_backend
    loss = rectified_tanh_poisson_nll(z.cuda(), x.cuda())
    assert loss.is_cuda


def test_gpu_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 3000).cuda()
    crit = txfm_kernels.RectifiedTanhPoissonNLLLoss()
    e, x = torch.randn(32, 16, device="cuda"), torch.rand(32, 3000, device="cuda") * 4
    mask = RowGeneMask(torch.rand(2, 3000, device="cuda") > 0.2, torch.arange(32, device="cuda") % 2)

    def step(e, x):
        return crit(model(e).bfloat16(), x, mask)

    torch._dynamo.reset()
    loss_c = torch.compile(step, fullgraph=True)(e, x)
    loss_c.backward()
    g_c = model.weight.grad.clone()
    model.zero_grad()
    loss_e = step(e, x)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_c, model.weight.grad, rtol=1e-3, atol=1e-6)
