"""gene_tokens / GeneTokenizer: every backend against an eager autograd reference.

Forward outputs are exact copies (bitwise equal to the reference); gradients are compared to
a reference computed in fp32 (fp64 for fp64). Triton runs under the interpreter on CPU
tensors (conftest.py), so its shapes stay small.
"""
import pytest
import torch

import txfm_kernels
from txfm_kernels import GeneTokenizer, gene_tokens

_INFOS = txfm_kernels.available_backends("tokens")
CPU_BACKENDS = ["torch"]
if _INFOS["cpu"].available:
    CPU_BACKENDS.append("cpu")
if "cpu" in _INFOS["triton"].devices:  # the interpreter (conftest sets it when there is no GPU)
    CPU_BACKENDS.append("triton")

V_FULL = 44_349


def reference(codebook, gene_ids, values, cls=None, key_padding_mask=None):
    """The eager formulation the op replaces (padding zeroed, CLS prepended)."""
    ids = gene_ids.long()
    if key_padding_mask is not None:
        ids = ids.masked_fill(key_padding_mask, 0)
    tokens = torch.cat([codebook[ids], values.to(codebook.dtype)[..., None]], dim=-1)
    if key_padding_mask is not None:
        tokens = tokens.masked_fill(key_padding_mask[..., None], 0)
    if cls is not None:
        tokens = torch.cat([cls.expand(tokens.shape[0], 1, -1), tokens], dim=1)
    return tokens


def make_inputs(B, K, d, V, *, dtype=torch.float32, id_dtype=torch.int64, cls=True, pad=False,
                ids="random", device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    codebook = torch.randn(V, d - 1, generator=gen).to(dtype)
    if ids == "random":
        gene_ids = torch.randint(0, V, (B, K), generator=gen)
    elif ids == "equal":
        gene_ids = torch.full((B, K), V // 2)
    elif ids == "distinct":
        gene_ids = torch.randperm(V, generator=gen)[: B * K].reshape(B, K)
    elif ids == "few":  # heavily repeated ids: long segments
        gene_ids = torch.randint(0, min(V, 3), (B, K), generator=gen)
    values = torch.rand(B, K, generator=gen) * 10
    cls_t = torch.randn(d, generator=gen).to(dtype) if cls else None
    key_padding_mask = (torch.rand(B, K, generator=gen) < 0.3) if pad else None
    if key_padding_mask is not None:
        gene_ids = gene_ids.masked_fill(key_padding_mask, -1)  # padded ids may hold any placeholder
    grad = torch.randn(B, K + int(cls), d, generator=gen).to(dtype)
    to = dict(device=device)
    return (codebook.to(**to), gene_ids.to(id_dtype).to(**to), values.to(**to),
            None if cls_t is None else cls_t.to(**to),
            None if key_padding_mask is None else key_padding_mask.to(**to), grad.to(**to))


def run_op(codebook, gene_ids, values, cls, key_padding_mask, grad, **kw):
    """(tokens, grad_codebook, grad_values, grad_cls) of gene_tokens with autograd."""
    leaves = [codebook.detach().requires_grad_(), values.detach().requires_grad_()]
    if cls is not None:
        leaves.append(cls.detach().requires_grad_())
    out = gene_tokens(leaves[0], gene_ids, leaves[1], cls=leaves[2] if cls is not None else None,
                      key_padding_mask=key_padding_mask, **kw)
    grads = torch.autograd.grad(out, leaves, grad)
    return (out.detach(),) + tuple(grads) + ((None,) if cls is None else ())


def run_reference(codebook, gene_ids, values, cls, key_padding_mask, grad):
    """Reference tokens in the codebook dtype, gradients in fp32 (fp64 stays fp64)."""
    acc = torch.float64 if codebook.dtype == torch.float64 else torch.float32
    out = reference(codebook, gene_ids, values, cls, key_padding_mask)
    leaves = [codebook.to(acc).requires_grad_(), values.to(codebook.dtype).to(acc).requires_grad_()]
    if cls is not None:
        leaves.append(cls.to(acc).requires_grad_())
    ref = reference(leaves[0], gene_ids, leaves[1], leaves[2] if cls is not None else None,
                    key_padding_mask)
    grads = torch.autograd.grad(ref, leaves, grad.to(acc))
    return (out,) + tuple(grads) + ((None,) if cls is None else ())


def assert_matches(got, want, dtype):
    out, gc, gv, gcls = got
    r_out, r_gc, r_gv, r_gcls = want
    assert out.dtype == dtype and out.shape == r_out.shape
    assert torch.equal(out, r_out), "tokens must be exact copies"
    assert gc.dtype == dtype and gc.shape == r_gc.shape
    # fp32 sums in another order (segments of up to ~700 rows here): a few ulps of the summed
    # magnitudes; bf16: one rounding of the fp32 sum (to nearest on every backend, see
    # test_bf16_codebook_gradient_is_the_fp32_sum_rounded_to_nearest).
    tol = dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gc.float(), r_gc.float(), **tol)
    assert torch.equal(gv.double(), r_gv.to(dtype).double()), "grad_values is a plain copy"
    if r_gcls is not None:
        assert gcls.dtype == dtype
        torch.testing.assert_close(gcls.float(), r_gcls.float(), **tol)


SHAPES = [  # B, K, d, V, ids
    (1, 1, 2, 1, "random"),
    (3, 7, 9, 11, "random"),
    (4, 33, 17, 50, "few"),
    (2, 5, 130, 7, "equal"),
    (3, 40, 6, 120, "distinct"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cls", [True, False], ids=["cls", "nocls"])
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
def test_matches_reference(backend, shape, dtype, cls, pad):
    B, K, d, V, ids = shape
    id_dtype = torch.int32 if (B + K) % 2 else torch.int64
    args = make_inputs(B, K, d, V, dtype=dtype, id_dtype=id_dtype, cls=cls, pad=pad, ids=ids)
    assert_matches(run_op(*args, backend=backend), run_reference(*args), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("deterministic", [True, False])
def test_bf16_codebook_gradient_is_the_fp32_sum_rounded_to_nearest(backend, deterministic):
    """A bf16 codebook's gradient is its fp32 sum rounded to nearest (as on the GPU): within
    half a bf16 ulp of the exact sum, plus fp32's summation error. Truncation (what the Triton
    interpreter's cast does) errs by up to a whole ulp."""
    args = make_inputs(4, 200, 17, 5, dtype=torch.bfloat16, ids="few", seed=3)
    _, gc, _, _ = run_op(*args, backend=backend, deterministic=deterministic)
    codebook, gene_ids, values, cls, key_padding_mask, grad = args
    exact = torch.zeros(codebook.shape, dtype=torch.float64).index_add_(
        0, gene_ids.reshape(-1).long(), grad[:, 1:, :-1].reshape(-1, codebook.shape[1]).double())
    got = gc.double()
    ulp = torch.exp2(torch.floor(torch.log2(got.abs().clamp_min(1e-30))) - 7)
    err = ((got - exact).abs() / ulp)[exact.abs() > 1e-3]
    assert err.max() <= 0.5 + 0.05, err.max()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("deterministic", [True, False])
def test_full_vocabulary(backend, deterministic):
    """V = 44,349 (the DiverseRNA vocabulary); each gene at most once per sample."""
    B, K = (2, 300) if backend == "triton" else (6, 2048)
    args = make_inputs(B, K, 33, V_FULL, ids="distinct", pad=True, id_dtype=torch.int32)
    assert_matches(run_op(*args, backend=backend, deterministic=deterministic),
                   run_reference(*args), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_default_backward_is_bitwise_deterministic(backend, dtype):
    B, K = (4, 64) if backend == "triton" else (16, 512)
    args = make_inputs(B, K, 24, 5, dtype=dtype, ids="few", pad=True)
    first, second = run_op(*args, backend=backend), run_op(*args, backend=backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cpu_and_triton_sum_in_the_same_order():
    """Both reduce each gene's rows in token order: fp32 results agree to the bit."""
    if not {"cpu", "triton"} <= set(CPU_BACKENDS):
        pytest.skip("needs the cpu and triton backends")
    args = make_inputs(5, 40, 20, 4, ids="few", pad=True)
    cpu, tri = run_op(*args, backend="cpu"), run_op(*args, backend="triton")
    assert torch.equal(cpu[1], tri[1])


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_gradcheck_fp64(backend):
    codebook, gene_ids, values, cls, key_padding_mask, _ = make_inputs(
        3, 6, 5, 4, dtype=torch.float64, cls=True, pad=True, ids="few")
    values = values.double()

    def fn(e, x, c):
        return gene_tokens(e, gene_ids, x, cls=c, key_padding_mask=key_padding_mask,
                           backend=backend)

    leaves = (codebook.requires_grad_(), values.requires_grad_(), cls.requires_grad_())
    assert torch.autograd.gradcheck(fn, leaves)


def test_opcheck():
    backend = "cpu" if "cpu" in CPU_BACKENDS else "torch"
    codebook, gene_ids, values, cls, key_padding_mask, grad = make_inputs(3, 6, 5, 9, pad=True)
    codebook.requires_grad_()
    values.requires_grad_()
    cls.requires_grad_()
    torch.library.opcheck(torch.ops.txfm.gene_tokens.default,
                          (codebook, gene_ids, values, cls, key_padding_mask, backend, True, False))
    valid_ids = gene_ids.masked_fill(key_padding_mask, 0).int()
    torch.library.opcheck(torch.ops.txfm.gene_tokens.default,
                          (codebook, valid_ids, values, None, None, backend, True, False))
    torch.library.opcheck(torch.ops.txfm.gene_tokens_backward.default,
                          (grad, gene_ids, key_padding_mask, 9, True, backend, True))


def test_torch_compile_fullgraph_module():
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = GeneTokenizer(40, 8)
            self.head = torch.nn.Linear(8, 1)

        def forward(self, ids, x, pad):
            return self.head(self.tok(ids, x, pad)).square().mean()

    model = Tiny()
    _, gene_ids, values, _, key_padding_mask, _ = make_inputs(3, 10, 8, 40, pad=True)
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(gene_ids, values, key_padding_mask)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_loss = model(gene_ids, values, key_padding_mask)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [7, -2])
def test_out_of_range_ids_raise_naming_gene_ids(backend, bad):
    codebook, gene_ids, values, cls, _, _ = make_inputs(2, 5, 4, 7)
    gene_ids[1, 3] = bad
    with pytest.raises(IndexError, match=r"gene_ids must lie in \[0, 7\).*\[" + str(bad)):
        gene_tokens(codebook, gene_ids, values, cls=cls, backend=backend)


def test_the_module_checks_ids_when_asked(monkeypatch):
    tok = GeneTokenizer(7, 4, backend="torch")
    ids = torch.tensor([[0, 7]])
    for check in (False, True):  # CPU tensors: checked either way
        with pytest.raises(IndexError, match=r"gene_ids must lie in \[0, 7\)"):
            tok(ids, torch.ones(1, 2), check_ids=check)
    seen = {}
    real = txfm_kernels.tokens.gene_tokens
    monkeypatch.setattr(txfm_kernels.tokens, "gene_tokens",
                        lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    tok(torch.tensor([[0, 6]]), torch.ones(1, 2), check_ids=True)
    assert seen["check_ids"] is True  # passed on, for GPU tensors


def test_ids_under_padding_are_never_read():
    codebook, gene_ids, values, cls, _, _ = make_inputs(2, 5, 4, 7)
    key_padding_mask = torch.zeros(2, 5, dtype=torch.bool)
    key_padding_mask[0, 1] = True
    gene_ids[0, 1] = 10**6
    out = gene_tokens(codebook, gene_ids, values, cls=cls, key_padding_mask=key_padding_mask)
    assert torch.equal(out[0, 2], torch.zeros(4))


def test_backward_op_rejects_out_of_range_ids():
    backend = "cpu" if "cpu" in CPU_BACKENDS else "torch"
    grad = torch.randn(2, 4, 5)
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 99]])
    with pytest.raises((IndexError, RuntimeError)):
        torch.ops.txfm.gene_tokens_backward(grad, ids, None, 7, False, backend, True)


def test_bad_arguments_are_named():
    codebook, gene_ids, values, cls, key_padding_mask, _ = make_inputs(2, 5, 4, 7, pad=True)
    with pytest.raises(TypeError, match="gene_ids must be int32 or int64"):
        gene_tokens(codebook, gene_ids.float(), values)
    with pytest.raises(ValueError, match="values .* shape of gene_ids"):
        gene_tokens(codebook, gene_ids, values[:, :3])
    with pytest.raises(ValueError, match="gene_ids must be \\[B, K\\]"):
        gene_tokens(codebook, gene_ids.reshape(-1), values.reshape(-1))
    with pytest.raises(ValueError, match="cls must be \\[d\\] = \\[4\\]"):
        gene_tokens(codebook, gene_ids, values, cls=torch.zeros(3))
    with pytest.raises(TypeError, match="cls dtype"):
        gene_tokens(codebook, gene_ids, values, cls=cls.double())
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        gene_tokens(codebook, gene_ids, values, key_padding_mask=key_padding_mask.int())
    with pytest.raises(ValueError, match="key_padding_mask .* shape of gene_ids"):
        gene_tokens(codebook, gene_ids, values, key_padding_mask=key_padding_mask[:1])
    with pytest.raises(TypeError, match="values must be a float"):
        gene_tokens(codebook, gene_ids, gene_ids)
    with pytest.raises(TypeError, match="codebook must be float32"):
        gene_tokens(codebook.half(), gene_ids, values)
    with pytest.raises(ValueError, match="codebook must be \\[n_genes, d - 1\\]"):
        gene_tokens(codebook[0], gene_ids, values)
    with pytest.raises(ValueError, match="gene_ids is on meta but codebook is on cpu"):
        gene_tokens(codebook, gene_ids.to("meta"), values)
    with pytest.raises(ValueError, match="backend='fast'"):
        gene_tokens(codebook, gene_ids, values, backend="fast")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        gene_tokens(codebook, gene_ids, values, backend="cuda")


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton not installed")
def test_triton_rejects_fp64_with_the_fix():
    codebook, gene_ids, values, _, _, _ = make_inputs(2, 5, 4, 7, dtype=torch.float64)
    with pytest.raises(TypeError, match="fp32 and bf16.*'cpu' or 'torch'"):
        gene_tokens(codebook, gene_ids, values.double(), backend="triton")


def test_values_are_cast_to_the_codebook_dtype_and_get_their_own_grad_dtype():
    codebook, gene_ids, values, cls, _, grad = make_inputs(2, 5, 4, 7, dtype=torch.bfloat16)
    x = (values / 3).requires_grad_()  # fp32 values, not representable in bf16
    out = gene_tokens(codebook, gene_ids, x, cls=cls)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[:, 1:, -1], x.detach().to(torch.bfloat16))
    (gx,) = torch.autograd.grad(out, x, grad)
    assert gx.dtype == torch.float32
    assert torch.equal(gx, grad[:, 1:, -1].float())


def test_autocast_keeps_the_codebook_dtype():
    codebook, gene_ids, values, cls, _, _ = make_inputs(2, 5, 4, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gene_tokens(codebook, gene_ids, values, cls=cls)
    assert out.dtype == torch.float32


def test_double_backward_is_a_clear_error():
    codebook, gene_ids, values, cls, _, _ = make_inputs(2, 5, 4, 7)
    codebook.requires_grad_()
    out = gene_tokens(codebook, gene_ids, values, cls=cls)
    (g,) = torch.autograd.grad(out.square().sum(), codebook, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_and_non_contiguous_inputs(backend):
    codebook = torch.randn(6, 9)[:, ::2]  # non-contiguous [6, 5]
    gene_ids = torch.randint(0, 6, (5, 3)).t()  # non-contiguous [3, 5]
    values = torch.rand(5, 3).t()
    cls = torch.randn(6)
    grad = torch.randn(3, 6, 6)
    assert_matches(run_op(codebook, gene_ids, values, cls, None, grad, backend=backend),
                   run_reference(codebook, gene_ids, values, cls, None, grad), torch.float32)
    empty_ids = torch.zeros(3, 0, dtype=torch.long)
    out, gc, gv, gcls = run_op(codebook, empty_ids, torch.zeros(3, 0), cls, None,
                               torch.ones(3, 1, 6), backend=backend)
    assert out.shape == (3, 1, 6) and torch.equal(out[:, 0], cls.expand(3, 6))
    assert torch.equal(gc, torch.zeros(6, 5)) and gv.shape == (3, 0)
    assert torch.equal(gcls, torch.full((6,), 3.0))


def test_gene_tokenizer_module():
    torch.manual_seed(0)
    tok = GeneTokenizer(2000, 65)
    assert tok.codebook.shape == (2000, 64) and tok.cls.shape == (65,)
    assert abs(tok.codebook.std().item() - 0.02) < 1e-3
    assert "n_genes=2000, d=65, cls=True" in repr(tok)
    gene_ids = torch.randint(0, 2000, (2, 7))
    values = torch.rand(2, 7)
    out = tok(gene_ids, values)
    assert out.shape == (2, 8, 65)
    assert torch.equal(out, reference(tok.codebook, gene_ids, values, tok.cls))
    no_cls = GeneTokenizer(10, 4, cls=False).to(torch.bfloat16)
    assert no_cls.cls is None
    assert no_cls(gene_ids % 10, values).shape == (2, 7, 4)
    assert no_cls(gene_ids % 10, values).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="d must be an int >= 2"):
        GeneTokenizer(10, 1)


# ------------------------------------------------------------------------------ GPU (lead runs)
GPU_BACKENDS = ["cuda", "triton", "torch"]


def _gpu_backend_or_skip(backend):
    info = txfm_kernels.available_backends("tokens")[backend]
    if not info.available or "cuda" not in info.devices:
        pytest.skip(f"backend {backend} not usable on GPU here: {info.detail}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES + [(8, 2048, 384, V_FULL, "distinct"),
                                            (32, 2048, 768, V_FULL, "random"),
                                            (4, 512, 70, 3, "few")],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_matches_reference(backend, dtype, shape, deterministic):
    _gpu_backend_or_skip(backend)
    B, K, d, V, ids = shape
    for cls, pad in ((True, True), (False, False)):
        args = make_inputs(B, K, d, V, dtype=dtype, cls=cls, pad=pad, ids=ids,
                           id_dtype=torch.int32 if K % 2 else torch.int64)
        want = run_reference(*args)
        got = run_op(*[a.cuda() if a is not None else None for a in args], backend=backend,
                     deterministic=deterministic)
        assert_matches([g.cpu() if g is not None else None for g in got], want, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_default_backward_is_bitwise_deterministic(backend):
    _gpu_backend_or_skip(backend)
    args = make_inputs(64, 2048, 384, 1000, ids="random", pad=True, device="cuda")
    first, second = run_op(*args, backend=backend), run_op(*args, backend=backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_bad_ids(backend):
    _gpu_backend_or_skip(backend)
    codebook, gene_ids, values, cls, _, _ = make_inputs(2, 5, 4, 7, device="cuda")
    gene_ids[1, 3] = 7
    out = gene_tokens(codebook, gene_ids, values, cls=cls, backend=backend)  # no check: no read
    assert torch.equal(out[1, 4].cpu(), torch.zeros(4))
    with pytest.raises(IndexError, match=r"gene_ids must lie in \[0, 7\)"):
        gene_tokens(codebook, gene_ids, values, cls=cls, backend=backend, check_ids=True)


@pytest.mark.gpu
def test_gpu_wide_rows_fall_back_from_cuda():
    _gpu_backend_or_skip("cuda")
    args = make_inputs(2, 16, 2100, 30, device="cuda")
    with pytest.raises(ValueError, match="backend='cuda' handles d <= 2049"):
        gene_tokens(*args[:3], cls=args[3], backend="cuda")
    got = run_op(*args, backend="auto")
    cpu = [None if t is None else t.cpu() for t in args]
    got = [None if t is None else t.cpu() for t in got]
    assert_matches(got, run_reference(*cpu), torch.float32)


def test_forward_mode_ad_and_func_grad_are_refused_not_silently_zero():
    """A torch.library op with only a backward formula dropped jvp tangents (zeros) and failed
    inside PyTorch under torch.func.grad; vmap and reverse mode work."""
    import torch.autograd.forward_ad as fwAD

    E = torch.randn(10, 7, dtype=torch.float64)
    ids = torch.randint(0, 10, (2, 3))
    x = torch.rand(2, 3, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda v: gene_tokens(E, ids, v), (x,), (torch.ones_like(x),))
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            gene_tokens(E, ids, fwAD.make_dual(x, torch.ones_like(x)))
    with pytest.raises(NotImplementedError, match="torch.func gradient transforms"):
        torch.func.grad(lambda e: gene_tokens(e, ids, x).sum())(E)
    batched = torch.vmap(lambda v: gene_tokens(E, ids, v))(x[None].expand(3, 2, 3))
    assert torch.equal(batched[1], gene_tokens(E, ids, x))


@pytest.mark.parametrize("args,kw,exc,match", [
    ((10, 8.5), {}, ValueError, "d must be an int"),
    ((10.0, 8), {}, ValueError, "n_genes must be an int"),
    ((0, 8), {}, ValueError, "n_genes must be an int >= 1"),
    ((10, 8), {"dtype": torch.float16}, TypeError, "dtype must be float32 or bfloat16"),
])
def test_tokenizer_arguments_are_checked_by_name(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        GeneTokenizer(*args, **kw)


def test_pad_mask_is_a_deprecated_alias_of_key_padding_mask():
    from txfm.model import TxFM, preset
    from txfm_kernels import masked_sample

    codebook, gene_ids, values, cls, _, _ = make_inputs(2, 5, 4, 7)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True
    want = gene_tokens(codebook, gene_ids, values, cls=cls, key_padding_mask=mask)
    with pytest.warns(DeprecationWarning, match="pass key_padding_mask="):
        got = gene_tokens(codebook, gene_ids, values, cls=cls, pad_mask=mask)
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="give key_padding_mask only"):
        gene_tokens(codebook, gene_ids, values, key_padding_mask=mask, pad_mask=mask)
    tok = GeneTokenizer(7, 4)
    with pytest.warns(DeprecationWarning):
        assert torch.equal(tok(gene_ids, values, pad_mask=mask), tok(gene_ids, values, mask))
    model = TxFM(preset("tiny", dim=16, depth=1, heads=2, decoder_hidden=16, k=4), 7).eval()
    with pytest.warns(DeprecationWarning, match="TxFM.embed"):
        assert torch.equal(model.embed(gene_ids, values, pad_mask=mask),
                           model.embed(gene_ids, values, mask))
    for call in (lambda **kw: model.logits(gene_ids, values, **kw),
                 lambda **kw: model.predict(gene_ids, values, **kw),
                 lambda **kw: model.encoder(gene_ids, values, **kw),
                 lambda **kw: model.encoder.tokens(gene_ids, values, **kw)):
        with pytest.warns(DeprecationWarning, match="pad_mask= is deprecated") as seen:
            old = call(pad_mask=mask)
        assert seen[0].filename == __file__  # the warning points at the caller
        assert torch.equal(old, call(key_padding_mask=mask))
    # under torch.compile (fullgraph) the alias works without the warning dynamo cannot trace
    compiled = torch.compile(lambda e, i, x, m: gene_tokens(e, i, x, pad_mask=m), fullgraph=True)
    assert torch.equal(compiled(codebook, gene_ids, values, mask),
                       gene_tokens(codebook, gene_ids, values, key_padding_mask=mask))
    csr = torch.tensor([[1, 2, 0, 3, 1, 0, 2]], dtype=torch.float32).to_sparse_csr()
    s = masked_sample(csr.crow_indices(), csr.col_indices().int(), csr.values(), n_genes=7, k=3,
                      seed=0)
    with pytest.warns(DeprecationWarning, match="use .key_padding_mask"):
        assert s.pad_mask is s.key_padding_mask
    # a batch object of before the rename (a .pad_mask field): its mask is used, with a warning
    import collections

    Old = collections.namedtuple("Old", "gene_ids values pad_mask target gene_mask library_size")
    ids, vals = s.gene_ids.long(), s.values
    pad = torch.tensor([[False, False, True]])
    old = Old(ids, vals, pad, s.target, s.gene_mask, s.library_size)
    with pytest.warns(DeprecationWarning, match=r"TxFM.forward \(sample\)"):
        got = model(old)
    assert torch.equal(got, model(s, key_padding_mask=pad))
    assert not torch.equal(got, model(s, key_padding_mask=None))
    with pytest.warns(DeprecationWarning, match="TxFM.forward"):
        assert torch.equal(model(s, pad_mask=pad), got)
