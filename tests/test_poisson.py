"""Fused rectified-tanh Poisson NLL and the poisson_nll_loss drop-in, on every CPU-capable
backend (triton runs under the interpreter), against an fp64 eager reference written here
from the paper (arXiv:2605.31562 §4) independently of txfm_kernels.poisson."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import txfm_kernels
from txfm_kernels import RowGeneMask, poisson_nll_loss, rectified_tanh_poisson_nll
from txfm_kernels.poisson import ALPHA, BETA

# The Triton interpreter evaluates masked-off lanes too (numpy warns about log(0) etc. there).
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

SHAPES = [(1, 1), (3, 7), (5, 1000), (4, 4097), (2, 44349)]
MASKS = ["none", "genes", "rows", "datasets"]
REDUCTIONS = ["mean", "sum", "none"]


def _available(name):
    info = txfm_kernels.available_backends("poisson")[name]
    return info.available and "cpu" in info.devices


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not _available(b), reason=f"{b} backend not "
                                                     "available here (see python -m txfm_kernels.info)"))
            for b in ("cpu", "triton", "torch")]


def _inputs(B, G, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, G, generator=gen, dtype=torch.float64) * 6
    x = torch.log1p(torch.rand(B, G, generator=gen, dtype=torch.float64) * 200)  # log1p-normalised
    return z.to(dtype), x.to(dtype)


def _mask(kind, B, G, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "genes":
        return torch.rand(G, generator=gen) > 0.3
    if kind == "rows":
        m = torch.rand(B, G, generator=gen) > 0.4
        m[0] = False if B > 1 else m[0]  # a row that keeps nothing contributes 0
        return m
    table = torch.rand(3, G, generator=gen) > 0.5
    table[2] = False
    ids = torch.randint(0, 3, (B,), generator=gen, dtype=torch.int32)
    return RowGeneMask(table, ids)


def _dense(mask, B, G):
    if mask is None:
        return torch.ones(B, G, dtype=torch.bool)
    if isinstance(mask, RowGeneMask):
        return mask.dense()
    return mask.expand(B, G)


def reference(z, x, mask, reduction, alpha=ALPHA, beta=BETA):
    """fp64 eager formula of the paper and its autograd gradient (z as given, upcast to fp64)."""
    B, G = z.shape
    keep = _dense(mask, B, G)
    z64 = z.detach().double().requires_grad_(True)
    phi = alpha * torch.relu(torch.tanh(z64 / beta))
    loss = torch.exp(phi) - phi * torch.exp(x.double())
    loss = torch.where(keep, loss, torch.zeros((), dtype=torch.float64))
    if reduction == "none":
        out = loss
    elif reduction == "sum":
        out = loss.sum()
    else:
        n = keep.sum(1)
        out = torch.where(n > 0, loss.sum(1) / n.clamp(min=1), 0.0).mean()
    out.backward(torch.ones_like(out))
    return out.detach(), torch.where(keep, z64.grad, 0.0)


def _term_size(z, x):
    """Size of the terms each loss element is made of, exp(phi) + phi*exp(x), and of those of
    its gradient, (alpha/beta) sech^2 (exp(phi) + exp(x)): tolerances are relative to what fp32
    arithmetic can resolve of them (the differences can cancel)."""
    u = z.double() / BETA
    phi = ALPHA * torch.relu(torch.tanh(u))
    return (torch.exp(phi) + phi * torch.exp(x.double()),
            (ALPHA / BETA) / torch.cosh(u) ** 2 * (torch.exp(phi) + torch.exp(x.double())))


def expected(z, x, mask, reduction, rtol=1e-5):
    """(loss, grad, loss tolerance, per-element grad tolerance) from the fp64 reference."""
    ref_loss, ref_grad = reference(z, x, mask, reduction)
    B, G = z.shape
    keep = _dense(mask, B, G)
    mag, gmag = (torch.where(keep, t, 0.0) for t in _term_size(z, x))
    n = keep.sum(1, keepdim=True).clamp(min=1)
    if reduction == "none":
        loss_tol = rtol * mag
    elif reduction == "sum":
        loss_tol = rtol * mag.sum()
    else:
        loss_tol = rtol * (mag / n).sum(1).mean()
        gmag = gmag / (B * n)
    # + a floor far below anything that matters (sech^2 is capped near 1e-35 for z > 435)
    grad_tol = rtol * gmag + 1e-10 * rtol * gmag.max()
    return ref_loss, ref_grad, loss_tol, grad_tol


@functools.lru_cache(maxsize=None)
def _case(shape, mask_kind, reduction):
    z, x = _inputs(*shape)
    mask = _mask(mask_kind, *shape)
    return (z, x, mask) + expected(z, x, mask, reduction)


def assert_matches(loss, grad, z, x, mask, reduction, exp=None):
    ref_loss, ref_grad, loss_tol, grad_tol = exp or expected(z, x, mask, reduction)
    B, G = z.shape
    keep = _dense(mask, B, G)
    assert loss.dtype == torch.float32
    assert loss.shape == ((B, G) if reduction == "none" else ())
    assert torch.all((loss.double() - ref_loss).abs() <= loss_tol), (loss, ref_loss)
    if reduction == "none":
        assert torch.all(loss[~keep] == 0)
    if grad is not None:
        assert grad.dtype == z.dtype and grad.shape == z.shape
        err = (grad.double() - ref_grad).abs()
        assert torch.all(err <= grad_tol), (err / grad_tol).max().item()
        assert torch.all(grad[~keep] == 0)
        assert torch.all(grad[z <= 0] == 0)


def _run(backend, z, x, mask, reduction, **kw):
    z = z.detach().requires_grad_(True)
    loss = rectified_tanh_poisson_nll(z, x, mask, reduction=reduction, backend=backend, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), z.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fp32_matches_fp64_reference(backend, shape, mask_kind, reduction):
    z, x, mask, *exp = _case(shape, mask_kind, reduction)
    loss, grad = _run(backend, z, x, mask, reduction)
    assert_matches(loss, grad, z, x, mask, reduction, exp)


def _bf16_errors(loss, grad, ref_loss, ref_grad):
    return (loss.double() - ref_loss).abs().max().item(), (grad.double() - ref_grad).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 7), (5, 1000), (2, 44349)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float32)], ids=["bf16-bf16", "bf16-fp32",
                                                                          "fp16-fp32"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision_error_at_most_twice_eager(backend, shape, dtypes, reduction):
    """Error vs fp64 (of the same rounded inputs) <= 2x the error of the paper's formula run
    eagerly in the logits' dtype."""
    zdt, xdt = dtypes
    z, x = _inputs(*shape)
    z, x = z.to(zdt), x.to(xdt)
    mask = _mask("genes", *shape)
    loss, grad = _run(backend, z, x, mask, reduction)
    assert grad.dtype == zdt
    ref_loss, ref_grad = reference(z, x, mask, reduction)
    # eager in half precision
    ze = z.detach().requires_grad_(True)
    phi = ALPHA * torch.relu(torch.tanh(ze / BETA))
    le = torch.where(mask, torch.exp(phi) - phi * torch.exp(x.to(zdt)), 0)
    le = le if reduction == "none" else (le.sum(1) / mask.sum()).mean()
    le.backward(torch.ones_like(le))
    ours = _bf16_errors(loss, grad, ref_loss, ref_grad)
    # fp16 eager overflows (exp(phi) reaches 1e5 > 65504): its error is unbounded there
    eager = [e if math.isfinite(e) else math.inf for e in _bf16_errors(le.detach(), ze.grad, ref_loss,
                                                                       ref_grad)]
    assert all(math.isfinite(e) for e in ours)
    assert ours[0] <= 2 * eager[0] and ours[1] <= 2 * eager[1], (ours, eager)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zdt", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_gradient_is_the_rounded_fp32_gradient(backend, zdt):
    """fp32 arithmetic, then one round-to-nearest-even into the logits' dtype: within half a
    unit in the last place of the fp64 reference (plus the fp32 tolerance and, for fp16,
    half its subnormal spacing)."""
    z, x = _inputs(8, 5000)
    z = z.to(zdt)
    mask = _mask("datasets", 8, 5000)
    loss, grad = _run(backend, z, x, mask, "mean")
    ref_loss, ref_grad, loss_tol, grad_tol = expected(z, x, mask, "mean")
    assert grad.dtype == zdt and abs(loss.double() - ref_loss) <= loss_tol
    half_ulp = 2.0 ** -8 if zdt == torch.bfloat16 else 2.0 ** -11
    floor = 2.0 ** -25 if zdt == torch.float16 else 0.0
    assert torch.all((grad.double() - ref_grad).abs() <= half_ulp * ref_grad.abs() + grad_tol + floor)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [2.0 ** 16, 1e-3], ids=["loss-scaled", "weighted"])
def test_fp16_gradient_is_rounded_once_after_grad_output(backend, scale):
    """fp16 logits kept their saved gradient (weight * dl/dz) in fp16 and multiplied it by
    grad_output in the backward: under a loss scale of 2^16 the "mean" weight had already
    pushed values under fp16's normal range (lost bits, zeros), and a loss weight of 1e-3
    turned values beyond fp16's range into -inf. Now: the fp64 gradient of the scaled loss,
    rounded to fp16 once (half an ulp, plus fp32's error and half the subnormal spacing)."""
    B, G = (64, 2000) if scale > 1 else (4, 300)
    z, x = _inputs(B, G)
    reduction = "mean" if scale > 1 else "sum"
    if scale < 1:  # where dl/dz beyond 65504 becomes representable once weighted
        z = torch.rand(B, G, dtype=torch.float64) * 0.05
        x = torch.full((B, G), 12.0, dtype=torch.float64)
    z, x = z.half(), x.float()
    zg = z.detach().requires_grad_(True)
    (rectified_tanh_poisson_nll(zg, x, reduction=reduction, backend=backend) * scale).backward()
    _, ref_grad, _, grad_tol = expected(z, x, None, reduction)
    ref = ref_grad * scale
    assert zg.grad.dtype == torch.float16 and torch.isfinite(zg.grad).all()
    err = (zg.grad.double() - ref).abs()
    assert torch.all(err <= 2.0 ** -11 * ref.abs() + grad_tol * scale + 2.0 ** -25), err.max()
    if scale > 1:  # the check has teeth: unscaled, most of these are under fp16's normal range
        assert (ref_grad.abs() < 2.0 ** -14).float().mean() > 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_poisson_nll_loss_fp16_gradient_survives_loss_scaling(backend):
    """As above, for the drop-in (exp(z) - x per element, mean weight 1 / 128,000); the
    ``torch`` backend is torch's own fp16 autograd, the bar it is held to."""
    inp, tgt = _dropin_inputs((64, 2000), True, torch.float16)
    scale = 2.0 ** 15  # the loss is fp16, as torch's, and so its grad_output: 2^15 fits
    a = inp.clone().requires_grad_(True)
    (poisson_nll_loss(a, tgt, backend=backend) * scale).backward()
    if backend == "torch":
        b = inp.clone().requires_grad_(True)
        (F.poisson_nll_loss(b, tgt) * scale).backward()
        assert torch.equal(a.grad, b.grad)
        return
    ref = inp.double().requires_grad_(True)
    (F.poisson_nll_loss(ref, tgt.double()) * scale).backward()
    err = (a.grad.double() - ref.grad).abs()
    fp32_err = 1e-6 * (ref.detach().exp() + tgt.double()) * scale / inp.numel()  # exp(z) - x
    assert a.grad.dtype == torch.float16
    assert torch.all(err <= 2.0 ** -11 * ref.grad.abs() + fp32_err + 2.0 ** -25), err.max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_are_finite_and_zero_grad_below_zero(backend):
    vals = torch.tensor([-1e4, -30.0, -1e-30, -0.0, 0.0, 1e-30, 1e-6, 1e-3, 0.5, 2.0, 30.0, 400.0,
                         1e4, 3e38, -3e38])
    z = vals.repeat(3, 1)
    x = torch.tensor([0.0, 1.0, 11.5]).repeat_interleave(vals.numel()).reshape(3, -1)
    for reduction in REDUCTIONS:
        loss, grad = _run(backend, z, x, None, reduction)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert torch.all(grad[z <= 0] == 0)
        assert torch.all(grad[z <= 0].view(torch.int32) == 0)  # +0.0 exactly
        assert_matches(loss, grad, z, x, None, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_propagate_and_masked_nan_does_not(backend):
    z, x = _inputs(3, 50)
    z[1, 7] = float("nan")
    for reduction in ("mean", "sum"):
        loss, grad = _run(backend, z, x, None, reduction)
        assert torch.isnan(loss)
        assert torch.isnan(grad[1, 7]) and torch.isfinite(grad[torch.arange(3) != 1]).all()
    loss, grad = _run(backend, z, x, None, "none")
    assert torch.isnan(loss[1, 7]) and torch.isnan(loss).sum() == 1
    mask = torch.ones(3, 50, dtype=torch.bool)
    mask[1, 7] = False
    loss, grad = _run(backend, z, x, mask, "mean")
    assert torch.isfinite(loss) and grad[1, 7] == 0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_logits_are_one_row(backend):
    z, x = _inputs(1, 33)
    for reduction in REDUCTIONS:
        l1, g1 = _run(backend, z[0], x[0], None, reduction)
        l2, g2 = _run(backend, z, x, None, reduction)
        assert l1.shape == ((33,) if reduction == "none" else ())
        torch.testing.assert_close(l1, l2[0] if reduction == "none" else l2, rtol=0, atol=0)
        torch.testing.assert_close(g1, g2[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    z, x = _inputs(40, 6)
    zt, xt = z.t(), x.t()  # [6, 40], strided
    assert not zt.is_contiguous()
    mask = _mask("rows", 6, 40)
    loss, grad = _run(backend, zt, xt, mask, "mean")
    assert_matches(loss, grad, zt.contiguous(), xt.contiguous(), mask, "mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_rows_beyond_65536_genes(backend):
    z, x = _inputs(2, 70001)
    mask = _mask("datasets", 2, 70001)
    loss, grad = _run(backend, z, x, mask, "mean")
    assert_matches(loss, grad, z, x, mask, "mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_grad_only_the_loss_is_computed(backend):
    z, x = _inputs(3, 20)
    with torch.no_grad():
        loss = rectified_tanh_poisson_nll(z.requires_grad_(True), x, backend=backend)
    assert not loss.requires_grad
    ref, _ = reference(z, x, None, "mean")
    assert abs(loss.double() - ref) < 1e-5 * abs(ref)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_fp64(backend, reduction):
    if not _available(backend):
        pytest.skip(f"{backend} backend not available")
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(3, 7, generator=gen, dtype=torch.float64) * 4
    z = torch.where(z.abs() < 0.2, z.sign() * 0.5 + 0.1, z).requires_grad_(True)  # off the kink
    x = torch.rand(3, 7, generator=gen, dtype=torch.float64) * 5
    mask = RowGeneMask(torch.rand(2, 7, generator=gen) > 0.3, torch.tensor([1, 0, 1]))
    fn = lambda t: rectified_tanh_poisson_nll(t, x, mask, reduction=reduction, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck(backend):
    if not _available(backend):
        pytest.skip(f"{backend} backend not available")
    op = torch.ops.txfm.poisson_nll.default
    z, x = _inputs(3, 9)
    table = torch.rand(2, 9) > 0.3
    samples = [
        (z.clone().requires_grad_(True), x, None, None, 0, False, ALPHA, BETA, 0.0, "mean", True, backend),
        (z.clone().requires_grad_(True), x.bfloat16(), table, torch.tensor([1, 0, 1]), 0, False, ALPHA,
         BETA, 0.0, "none", True, backend),
        (z.abs() + 0.1, x.abs(), None, None, 2, True, 0.0, 1.0, 1e-8, "sum", False, backend),
    ]
    for args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_custom_op_backward_leaves_its_returned_gradient_alone(backend, reduction):
    """A direct caller of torch.ops.txfm.poisson_nll holds its second output (dlogits): a
    backward with grad_output != 1 must not rescale it in place (it did, x3, and opcheck's
    AOT check failed on the op's mean and sum)."""
    if not _available(backend):
        pytest.skip(f"{backend} backend not available")
    z, x = _inputs(4, 30)
    z = (z * 10).requires_grad_(True)
    loss, dz = torch.ops.txfm.poisson_nll(z, x, None, None, 0, False, ALPHA, BETA, 0.0,
                                          reduction, True, backend)
    before = dz.clone()
    (g,) = torch.autograd.grad(loss, z, torch.full_like(loss, 3.0))
    assert torch.equal(dz, before)
    torch.testing.assert_close(g, 3.0 * before)


def test_torch_compile_fullgraph_keeps_one_op_node():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 300))
    crit = txfm_kernels.RectifiedTanhPoissonNLLLoss()
    e, x = torch.randn(8, 16), torch.rand(8, 300) * 4
    table = torch.rand(2, 300) > 0.2
    ids = torch.tensor([0, 1] * 4)

    def step(e, x):
        return crit(model(e), x, RowGeneMask(table, ids))

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss_c = compiled(e, x)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_e = step(e, x)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for gc, p in zip(grads_c, model.parameters()):
        torch.testing.assert_close(gc, p.grad, rtol=1e-4, atol=1e-6)
    calls = [n for g in graphs for n in g.graph.nodes if "poisson_nll" in str(n.target)]
    assert len(graphs) == 1 and len(calls) == 1


# ---------------------------------------------------------------------------------------------
# Backward semantics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_scales_by_grad_output(backend):
    z, x = _inputs(3, 11)
    zr = z.clone().requires_grad_(True)
    (rectified_tanh_poisson_nll(zr, x, backend=backend) * 2.5).backward()
    _, ref = reference(z, x, None, "mean")
    torch.testing.assert_close(zr.grad.double(), 2.5 * ref, rtol=1e-5, atol=1e-9)


def test_retain_graph_twice_with_unit_grad_is_reentrant_on_cpu():
    z, x = _inputs(2, 9)
    zr = z.clone().requires_grad_(True)
    loss = rectified_tanh_poisson_nll(zr, x, backend="cpu" if _available("cpu") else "torch")
    g1, = torch.autograd.grad(loss, zr, retain_graph=True)
    g2, = torch.autograd.grad(loss, zr)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@pytest.mark.skipif(not _available("cpu"), reason="cpu backend not built")
def test_second_backward_after_in_place_scaling_is_an_error():
    z, x = _inputs(2, 9)
    zr = z.clone().requires_grad_(True)
    loss = rectified_tanh_poisson_nll(zr, x, backend="cpu") * 3.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.skipif(not _available("cpu"), reason="cpu backend not built")
def test_double_backward_is_a_clear_error():
    z, x = _inputs(2, 9)
    zr = z.clone().requires_grad_(True)
    loss = rectified_tanh_poisson_nll(zr, x, backend="cpu")
    with pytest.raises(RuntimeError, match="double backward.*backend='torch'"):
        torch.autograd.grad(loss, zr, create_graph=True)
    zr2 = z.clone().requires_grad_(True)  # the torch backend supports it
    g, = torch.autograd.grad(rectified_tanh_poisson_nll(zr2, x, backend="torch"), zr2, create_graph=True)
    g.sum().backward()
    assert torch.isfinite(zr2.grad).all()


# ---------------------------------------------------------------------------------------------
# Drop-in poisson_nll_loss
# ---------------------------------------------------------------------------------------------

def _dropin_inputs(shape, log_input, dtype=torch.float64):
    gen = torch.Generator().manual_seed(5)
    inp = torch.randn(*shape, generator=gen, dtype=torch.float64) * 2
    if not log_input:
        inp = inp.abs() + 0.05
    tgt = torch.poisson(torch.rand(*shape, generator=gen, dtype=torch.float64) * 4)  # 0, 1, >1
    return inp.to(dtype), tgt.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log_input", [True, False])
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [1e-8, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_poisson_nll_loss_matches_torch(backend, log_input, full, reduction, eps, dtype):
    inp, tgt = _dropin_inputs((4, 5, 6), log_input, dtype)
    ours_in, ref_in = inp.clone().requires_grad_(True), inp.clone().requires_grad_(True)
    ours = poisson_nll_loss(ours_in, tgt, log_input, full, eps=eps, reduction=reduction,
                            backend=backend)
    ref = F.poisson_nll_loss(ref_in, tgt, log_input=log_input, full=full, eps=eps, reduction=reduction)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    tol = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, ref, **tol)
    ours.backward(torch.ones_like(ours))
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(ours_in.grad, ref_in.grad, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_poisson_nll_loss_extreme_and_special_values(backend):
    inp = torch.tensor([-200.0, -90.0, -87.0, -20.0, 0.0, 1e-30, 3.0, 80.0, 88.5, 89.0, 200.0,
                        float("nan"), float("inf"), -float("inf")])
    tgt = torch.tensor([0.0, 1.0, 2.0, 1e-3, 5.0, 1.5, 1e4, 0.0, 2.0, 3.0, 0.0, 1.0, 0.0, 2.0])
    for log_input in (True, False):
        for full in (False, True):
            x = inp.abs() if not log_input else inp
            a = poisson_nll_loss(x, tgt, log_input, full, reduction="none", backend=backend)
            b = F.poisson_nll_loss(x, tgt, log_input=log_input, full=full, reduction="none")
            torch.testing.assert_close(a, b, rtol=3e-6, atol=1e-30, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_poisson_nll_loss_half_precision_close_to_torch(backend):
    for dtype in (torch.bfloat16, torch.float16):
        inp, tgt = _dropin_inputs((3, 40), True, dtype)
        a, b = inp.clone().requires_grad_(True), inp.clone().requires_grad_(True)
        la = poisson_nll_loss(a, tgt, backend=backend)
        lb = F.poisson_nll_loss(b, tgt)
        ref = F.poisson_nll_loss(inp.double(), tgt.double())
        assert la.dtype == dtype
        assert abs(la.double() - ref) <= max(2 * abs(lb.double() - ref), 2 ** -7 * abs(ref))
        la.backward()
        lb.backward()
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=2e-2, atol=1e-4)


def test_poisson_nll_loss_falls_back_for_what_torch_alone_covers():
    inp, tgt = _dropin_inputs((3, 4), True, torch.float32)
    # broadcasting
    a = poisson_nll_loss(inp, tgt[0])
    torch.testing.assert_close(a, F.poisson_nll_loss(inp, tgt[0]))
    # target that requires grad gets its gradient, as in torch
    t = tgt.clone().requires_grad_(True)
    poisson_nll_loss(inp, t).backward()
    assert t.grad is not None
    # legacy size_average / reduce
    with pytest.warns(UserWarning):
        a = poisson_nll_loss(inp, tgt, size_average=False)
    torch.testing.assert_close(a, F.poisson_nll_loss(inp, tgt, reduction="sum"))
    with pytest.raises(ValueError, match="bogus is not a valid value for reduction"):
        poisson_nll_loss(inp, tgt, reduction="bogus")
    for bad, error in (("a", TypeError), (float("nan"), ValueError), (float("inf"), ValueError)):
        with pytest.raises(error, match="poisson_nll_loss: eps must be a"):
            poisson_nll_loss(inp, tgt, log_input=False, eps=bad)
        with pytest.raises(error, match="PoissonNLLLoss: eps must be a"):
            txfm_kernels.PoissonNLLLoss(eps=bad)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_poisson_nll_loss_keeps_channels_last(reduction):
    """A channels_last input is read in its own order (no copy); "none" keeps its strides,
    as torch's own loss does, and so does the gradient."""
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    t = torch.rand(2, 3, 4, 5) * 3
    ours = poisson_nll_loss(x, t, reduction=reduction)
    theirs = F.poisson_nll_loss(x, t, reduction=reduction)
    torch.testing.assert_close(ours, theirs)
    assert ours.stride() == theirs.stride()
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), x)
    torch.testing.assert_close(g_ours, g_theirs)
    assert g_ours.stride() == x.stride()


def test_poisson_nll_module_is_a_torch_poisson_nll_loss():
    m = txfm_kernels.PoissonNLLLoss(log_input=False, full=True, reduction="sum")
    assert isinstance(m, torch.nn.PoissonNLLLoss)
    inp, tgt = _dropin_inputs((5, 6), False, torch.float32)
    torch.testing.assert_close(m(inp, tgt), torch.nn.PoissonNLLLoss(log_input=False, full=True,
                                                                     reduction="sum")(inp, tgt))


def test_modules_and_rectified_tanh():
    z = torch.linspace(-30, 30, 101, dtype=torch.float64, requires_grad=True)
    out = txfm_kernels.RectifiedTanh()(z)
    torch.testing.assert_close(out, ALPHA * torch.relu(torch.tanh(z / BETA)))
    out.sum().backward()
    assert torch.all(z.grad[z <= 0] == 0)
    assert txfm_kernels.ALPHA == math.log(1e5 + 1) and txfm_kernels.BETA == 4 * math.e
    zz, x = _inputs(3, 12)
    crit = txfm_kernels.RectifiedTanhPoissonNLLLoss(reduction="sum", backend="torch")
    assert_matches(crit(zz, x), None, zz, x, None, "sum")
    assert "reduction='sum'" in repr(crit)


def test_deterministic_across_calls():
    backend = "cpu" if _available("cpu") else "torch"
    z, x = _inputs(7, 20001)
    a = _run(backend, z, x, _mask("rows", 7, 20001), "mean")
    b = _run(backend, z, x, _mask("rows", 7, 20001), "mean")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    z, x = _inputs(3, 8)
    f = rectified_tanh_poisson_nll
    with pytest.raises(ValueError, match="same shape.*\\(3, 8\\).*\\(3, 7\\)"):
        f(z, x[:, :7])
    with pytest.raises(TypeError, match="logits must be a floating tensor"):
        f(z.long(), x)
    with pytest.raises(TypeError, match="target must be a floating tensor"):
        f(z, x.int())
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        f(z.tolist(), x)
    with pytest.raises(ValueError, match="target is on meta"):
        f(z, x.to("meta"))
    with pytest.raises(ValueError, match="target must not require grad"):
        f(z, x.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="logits must be \\[B, G\\]"):
        f(z[None], x[None])
    with pytest.raises(ValueError, match="B >= 1 rows and G >= 1"):
        f(z[:0], x[:0])
    with pytest.raises(TypeError, match="gene_mask must be a bool tensor"):
        f(z, x, torch.ones(8))
    with pytest.raises(ValueError, match="gene_mask must have shape"):
        f(z, x, torch.ones(9, dtype=torch.bool))
    # a wrong dtype is a TypeError, as RowGeneMask.dense() and every other tensor argument say
    with pytest.raises(TypeError, match="gene_mask.dataset_ids must be int32 or int64, got "
                                        "torch.float32"):
        f(z, x, RowGeneMask(torch.ones(2, 8, dtype=torch.bool), torch.zeros(3)))
    with pytest.raises(TypeError, match="gene_mask.dataset_ids must be a torch.Tensor"):
        f(z, x, RowGeneMask(torch.ones(2, 8, dtype=torch.bool), [0, 0, 0]))
    with pytest.raises(ValueError, match="gene_mask.dataset_ids must have shape \\[B\\] = \\(3,\\)"):
        f(z, x, RowGeneMask(torch.ones(2, 8, dtype=torch.bool), torch.zeros(4, dtype=torch.int64)))
    with pytest.raises(TypeError, match="gene_mask.mask must be a bool \\[D, G\\] tensor, got "
                                        "torch.float32"):
        f(z, x, RowGeneMask(torch.ones(2, 8), torch.zeros(3, dtype=torch.int64)))
    with pytest.raises(ValueError, match="gene_mask.mask must be a bool \\[D, G=8\\]"):
        f(z, x, RowGeneMask(torch.ones(2, 7, dtype=torch.bool), torch.zeros(3, dtype=torch.int64)))
    with pytest.raises(ValueError, match="reduction='avg'"):
        f(z, x, reduction="avg")
    with pytest.raises(ValueError, match="backend='fast'"):
        f(z, x, backend="fast")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        f(z, x, backend="cuda")
    with pytest.raises(ValueError, match="beta must be finite and >= 0.001"):
        f(z, x, beta=0.0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        f(z, x, alpha=1e3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_dataset_ids_raise_on_cpu(backend):
    z, x = _inputs(3, 8)
    bad = RowGeneMask(torch.ones(2, 8, dtype=torch.bool), torch.tensor([0, 2, 1]))
    with pytest.raises((ValueError, IndexError), match="dataset_ids|index"):
        rectified_tanh_poisson_nll(z, x, bad, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_id", [-1, 2])
def test_out_of_range_dataset_ids_raise_the_same_error_on_every_backend(backend, bad_id):
    """A negative id used to wrap around to the last dataset's row on the torch backend."""
    z, x = _inputs(3, 8)
    bad = RowGeneMask(torch.ones(2, 8, dtype=torch.bool), torch.tensor([0, bad_id, 1]))
    got = "-1, 1" if bad_id < 0 else "0, 2"
    with pytest.raises(ValueError, match=r"rectified_tanh_poisson_nll: gene_mask.dataset_ids must lie in \[0, 2\).*\[" + got + r"\]"):
        rectified_tanh_poisson_nll(z, x, bad, backend=backend)
    with pytest.raises(ValueError, match=r"RowGeneMask.dataset_ids must lie in \[0, 2\)"):
        bad.dense()


def test_torch_reference_gives_nan_rows_for_unchecked_bad_ids_like_the_gpu_kernels():
    """Where ids are not checked on the host (GPU tensors, torch.compile), a row with an id
    outside [0, D) gets a NaN loss and gradient, never another dataset's genes."""
    from txfm_kernels.poisson import reference as ref

    z, x = _inputs(3, 8)
    table = torch.rand(2, 8, generator=torch.Generator().manual_seed(3)) > 0.3
    ids = torch.tensor([0, -1, 1])
    loss, grad = ref.forward(z, x, table, ids, ref.RTANH, False, ALPHA, BETA, 0.0, "none", True)
    assert torch.isnan(loss[1]).all() and torch.isnan(grad[1][table[0] | table[1]]).all()
    good = RowGeneMask(table, torch.tensor([0, 1]))
    want, _ = reference(z[[0, 2]], x[[0, 2]], good, "none")
    torch.testing.assert_close(loss[[0, 2]].double(), want, rtol=1e-5, atol=1e-4)


# -- faults a user found reusing the op in their own model ---------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_a_returned_gradient_is_never_rescaled_by_a_later_backward(backend):
    """retain_graph=True: the first backward (grad_output 1) hands out the saved buffer; a
    second one with another grad_output must not scale that buffer, i.e. the caller's tensor."""
    z, x = _inputs(2, 9)
    zr = z.clone().requires_grad_(True)
    loss = rectified_tanh_poisson_nll(zr, x, backend=backend)
    g1, = torch.autograd.grad(loss, zr, retain_graph=True)
    kept = g1.clone()
    g2, = torch.autograd.grad(loss, zr, torch.tensor(-2.0), retain_graph=True)
    torch.testing.assert_close(g1, kept, rtol=0, atol=0)
    torch.testing.assert_close(g2, -2.0 * kept, rtol=0, atol=0)
    g3, = torch.autograd.grad(loss, zr)
    torch.testing.assert_close(g3, kept, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_below_its_bound_is_refused_and_at_it_the_gradient_is_exact(backend):
    z = torch.tensor([[0.5, 2.0, 10.0, -1.0]], dtype=torch.float64)
    x = torch.tensor([[0.0, 0.0, 3.0, 0.0]], dtype=torch.float64)
    for beta in (1e-4, 1e-30, 0.0, -1.0):
        with pytest.raises(ValueError, match="beta must be finite and >= 0.001"):
            rectified_tanh_poisson_nll(z, x, beta=beta, backend=backend)
    zr = z.clone().requires_grad_(True)  # z / beta >= 500: tanh is 1, its slope 0 in fp64
    rectified_tanh_poisson_nll(zr, x, beta=1e-3, alpha=ALPHA, reduction="sum",
                               backend=backend).backward()
    assert zr.grad.abs().max().item() < 1e-20


@pytest.mark.parametrize("bad", [torch.tensor(2.0, requires_grad=True), torch.tensor(2.0), "2"])
def test_alpha_and_beta_must_be_python_numbers(bad):
    z, x = _inputs(2, 5)
    from txfm_kernels.poisson import RectifiedTanh, RectifiedTanhPoissonNLLLoss, rectified_tanh

    for call in (lambda: rectified_tanh_poisson_nll(z, x, alpha=bad),
                 lambda: rectified_tanh_poisson_nll(z, x, beta=bad),
                 lambda: rectified_tanh(z, alpha=bad), lambda: RectifiedTanh(beta=bad),
                 lambda: RectifiedTanhPoissonNLLLoss(alpha=bad)):
        with pytest.raises(TypeError, match="must be a number"):
            call()


def test_rectified_tanh_checks_its_constants_like_the_fused_op():
    from txfm_kernels.poisson import RectifiedTanh, rectified_tanh

    z = torch.linspace(-3, 3, 7)
    for kw in (dict(beta=0.0), dict(beta=-1.0), dict(alpha=1000.0), dict(alpha=math.nan)):
        with pytest.raises(ValueError, match="alpha|beta"):
            rectified_tanh(z, **kw)
        with pytest.raises(ValueError, match="alpha|beta"):
            RectifiedTanh(**kw)


def test_sparse_inputs_are_refused_by_name():
    z, x = _inputs(2, 5)
    with pytest.raises(TypeError, match=r"logits must be a dense tensor.*to_dense"):
        rectified_tanh_poisson_nll(z.to_sparse(), x)
    with pytest.raises(TypeError, match=r"target must be a dense tensor.*to_dense"):
        rectified_tanh_poisson_nll(z, x.to_sparse())


def test_unavailable_backend_names_the_alternatives(monkeypatch):
    import txfm_kernels._common as common

    monkeypatch.setattr(common, "_TRITON_INTERPRET_AT_IMPORT", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    z, x = _inputs(2, 5)
    common._resolve_cached.cache_clear()  # memoised per environment, not per import state
    try:
        with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1 was set after txfm_kernels "
                                               r"was imported.*use backend='auto'"):
            rectified_tanh_poisson_nll(z, x, backend="triton")
    finally:
        common._resolve_cached.cache_clear()


@pytest.mark.skipif(not _available("cpu"), reason="cpu backend not built")
def test_forward_mode_ad_and_func_grad_name_the_backend_that_has_them():
    z, x = _inputs(2, 5, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="forward-mode AD.*backend='torch'"):
        torch.func.jvp(lambda t: rectified_tanh_poisson_nll(t, x, backend="cpu"), (z,),
                       (torch.ones_like(z),))
    with pytest.raises(NotImplementedError, match="gradient transforms.*backend='torch'"):
        torch.func.grad(lambda t: rectified_tanh_poisson_nll(t, x, backend="cpu"))(z)
    g = torch.func.grad(lambda t: rectified_tanh_poisson_nll(t, x, backend="torch"))(z)
    assert torch.isfinite(g).all()
    zs, xs = torch.stack([z, 2 * z]), torch.stack([x, x])
    with pytest.raises(NotImplementedError, match="vmap is not supported.*backend='torch'"):
        torch.func.vmap(lambda a, b: rectified_tanh_poisson_nll(a, b, backend="cpu"))(zs, xs)
    batched = torch.func.vmap(lambda a, b: rectified_tanh_poisson_nll(a, b, backend="torch"))
    torch.testing.assert_close(batched(zs, xs), torch.stack(
        [rectified_tanh_poisson_nll(a, b, backend="cpu") for a, b in zip(zs, xs)]))


# ---------------------------------------------------------------------------------------------
# Drop-in: autograd corners, torch.func, export, torch's argument order
# ---------------------------------------------------------------------------------------------
FUSED_CPU = [b for b in BACKENDS if b.values[0] != "torch"]


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_repeated_backward_through_a_view_accumulates_like_torch(backend):
    """Logits that are a view (the drop-in flattens its input; 1-D logits gain a row) must not
    hand their saved gradient out: autograd would keep a view of it as the leaf's .grad and add
    the next backward into it in place. Three retained backwards give 1x, 2x, 3x, as torch."""
    x, t = _dropin_inputs((3, 4), True, torch.float32)
    calls = [lambda z: poisson_nll_loss(z, t, backend=backend),
             lambda z: rectified_tanh_poisson_nll(z[0], t[0].abs(), backend=backend)]
    for call in calls:
        ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        a = call(ours)
        b = (lambda z: F.poisson_nll_loss(z, t))(theirs) if call is calls[0] else \
            rectified_tanh_poisson_nll(theirs[0], t[0].abs(), backend="torch")
        for _ in range(3):
            a.backward(retain_graph=True)
            b.backward(retain_graph=True)
            torch.testing.assert_close(ours.grad, theirs.grad)
        ours.grad.zero_(), theirs.grad.zero_()  # zero_grad(set_to_none=False), then again
        a.backward(retain_graph=True)
        b.backward(retain_graph=True)
        torch.testing.assert_close(ours.grad, theirs.grad)


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_dropin_under_torch_func_falls_back_to_torch(backend):
    """torch.func transforms and forward-mode AD reach torch's own loss, as for any input the
    fused op does not cover: the drop-in stays a drop-in."""
    x, t = _dropin_inputs((3, 4), True, torch.float64)
    ours = functools.partial(poisson_nll_loss, backend=backend)
    torch.testing.assert_close(torch.func.grad(lambda a: ours(a, t))(x),
                               torch.func.grad(lambda a: F.poisson_nll_loss(a, t))(x))
    torch.testing.assert_close(torch.vmap(ours)(x, t), torch.vmap(F.poisson_nll_loss)(x, t))
    tangent = torch.ones_like(x)
    torch.testing.assert_close(torch.func.jvp(lambda a: ours(a, t), (x,), (tangent,)),
                               torch.func.jvp(lambda a: F.poisson_nll_loss(a, t), (x,), (tangent,)))


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_batched_backward_of_the_fused_losses(backend):
    """is_grads_batched (and so jacobian(vectorize=True)) sends a batch of grad_outputs through
    one backward: there is no single value to test against 1 or to scale by in place."""
    x, t = _dropin_inputs((3, 4), True, torch.float64)
    for ours, ref in ((functools.partial(poisson_nll_loss, backend=backend), F.poisson_nll_loss),
                      (functools.partial(rectified_tanh_poisson_nll, backend=backend),
                       functools.partial(rectified_tanh_poisson_nll, backend="torch"))):
        xa = x.clone().requires_grad_()
        v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        g, = torch.autograd.grad(ours(xa, t.abs()), xa, v, is_grads_batched=True)
        g_ref = torch.stack([torch.autograd.grad(ref(xa, t.abs()), xa)[0] * s for s in v])
        torch.testing.assert_close(g, g_ref)
        jac = torch.autograd.functional.jacobian(lambda a: ours(a, t.abs()), x, vectorize=True)
        torch.testing.assert_close(jac, g_ref[0])


def test_dropin_takes_torchs_positional_order_and_refuses_the_old_one():
    x, t = _dropin_inputs((3, 4), False, torch.float32)
    torch.testing.assert_close(poisson_nll_loss(x, t, False, True, None, 0.5, None, "sum"),
                               F.poisson_nll_loss(x, t, False, True, None, 0.5, None, "sum"))
    with pytest.raises(TypeError, match=r"size_average must be None or a bool.*eps= and "
                                        r"reduction= by keyword"):
        poisson_nll_loss(x, t, False, True, 0.5)  # eps where torch has size_average
    with pytest.raises(TypeError, match="reduce must be None or a bool"):
        poisson_nll_loss(x, t, False, True, None, 0.5, "sum")
    # a tensor eps (torch takes one) runs torch's implementation
    torch.testing.assert_close(poisson_nll_loss(x, t, log_input=False, eps=torch.tensor(0.5)),
                               F.poisson_nll_loss(x, t, log_input=False, eps=torch.tensor(0.5)))


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_dropin_exports_as_the_fused_op(backend):
    class Loss(torch.nn.Module):
        def forward(self, a, b):
            return poisson_nll_loss(a, b, backend=backend)

    x, t = _dropin_inputs((3, 4), True, torch.float32)
    for strict in (False, True):
        ep = torch.export.export(Loss(), (x, t), strict=strict)
        targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        assert any("txfm.poisson_nll" in name for name in targets), (strict, targets)
        torch.testing.assert_close(ep.module()(x, t), F.poisson_nll_loss(x, t))


def test_dropin_messages_name_the_dropin():
    if txfm_kernels.available_backends("poisson")["cuda"].available:
        pytest.skip("the cuda backend is available here: nothing to refuse")
    x, t = _dropin_inputs((3, 4), True, torch.float32)
    with pytest.raises(RuntimeError, match=r"^poisson_nll_loss: backend='cuda'"):
        poisson_nll_loss(x, t, backend="cuda")
    from txfm_kernels import resolve_backend
    assert resolve_backend("torch", "cpu", "poisson_nll_loss") == "torch"


@pytest.mark.parametrize("backend", BACKENDS[:2])
@pytest.mark.parametrize("alpha,beta,target", [(80.0, 1.0, 0.0), (ALPHA, BETA, 85.0),
                                               (ALPHA, BETA, 5.0)])
def test_saturated_logits_gradient_decays_as_sech2(backend, alpha, beta, target):
    """Far past the tanh's knee the gradient is (alpha/beta) 4 e^{-2u} (e^phi - e^x): it decays
    with u and is never held at a cap's value (which, times e^x up to 1e38, was up to 600).
    Reference: the formula in float64, written out here."""
    u = torch.tensor([20.0, 39.0, 40.0, 41.0, 43.0, 43.6, 45.0, 50.0, 100.0, 1e4],
                     dtype=torch.float64)
    z, x = u * beta, torch.full_like(u, target)
    w = torch.exp(-2 * u)
    expected = (alpha / beta) * 4 * w / (1 + w) ** 2 * (torch.exp(alpha * torch.tanh(u))
                                                         - torch.exp(x))
    zz = z.float().requires_grad_(True)
    rectified_tanh_poisson_nll(zz, x.float(), alpha=alpha, beta=beta, reduction="sum",
                               backend=backend).backward()
    got = zz.grad.double()
    # exact in fp32 terms while exp(-2u) is a normal fp32 number (u < ~43.5); beyond, 0 or
    # the true tiny value, each below 4 (alpha/beta) e^-86.9 |e^alpha - e^x| (docs/kernels.md)
    near = u < 43.4
    torch.testing.assert_close(got[near], expected[near], rtol=2e-5, atol=0)
    bound = 4 * (alpha / beta) * math.exp(-86.9) * abs(math.exp(alpha) - math.exp(target))
    assert float((got[~near] - expected[~near]).abs().max()) <= bound
