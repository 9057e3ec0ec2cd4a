"""torch.compile(fullgraph=True, dynamic=True) of every public op and of the TxFM model.

Arguments come from Python variables that change between calls (alpha, beta, eps, seed,
offset, k, target_sum, tau, batch sizes): each compiled function must keep working without
a graph break, hold exactly one node per fused op, and agree with an eager fp64 reference
written here. New shapes and integers never recompile; a new value of a float that reaches a
custom op recompiles once (inductor specialises floats passed to custom ops).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import txfm_kernels as tk
from txfm_kernels import RowGeneMask

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

_INFOS = {op: tk.available_backends(op) for op in ("poisson", "tokens", "sample")}


def _host_backends(op):
    """Backends that run CPU tensors here (triton only under the interpreter)."""
    names = [b for b in ("cpu", "triton") if "cpu" in _INFOS[op][b].devices]
    return names + ["torch"]


class Graphs:
    """A torch.compile backend that compiles with inductor and records, per graph compiled,
    the targets of its call nodes (a graph whose compilation restarts, e.g. when inductor
    specialises a float, is recorded once, as finally compiled)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        compiled = compile_fx(gm, example_inputs)
        self.graphs.append(targets)
        return compiled

    def nodes(self, name: str) -> list[int]:
        """Per graph, the number of call nodes whose target mentions ``name``."""
        return [sum(name in t for t in g) for g in self.graphs]


def _compile(fn):
    torch._dynamo.reset()
    rec = Graphs()
    return torch.compile(fn, fullgraph=True, dynamic=True, backend=rec), rec


# ---------------------------------------------------------------------------------------------
# Poisson NLL
# ---------------------------------------------------------------------------------------------
def _rtanh_reference(z, x, keep, alpha, beta):
    """fp64 loss ("mean" over each row's kept genes) and its gradient, by autograd."""
    z64 = z.detach().double().requires_grad_(True)
    phi = alpha * torch.relu(torch.tanh(z64 / beta))
    loss = torch.where(keep, torch.exp(phi) - phi * torch.exp(x.double()), 0.0)
    n = keep.sum(1)
    out = torch.where(n > 0, loss.sum(1) / n.clamp(min=1), 0.0).mean()
    out.backward()
    return out.detach(), z64.grad


@pytest.mark.parametrize("backend", _host_backends("poisson"))
def test_poisson_variable_alpha_beta_one_graph_one_node(backend):
    def step(z, x, table, ids, alpha, beta):
        return tk.rectified_tanh_poisson_nll(z, x, RowGeneMask(table, ids), alpha=alpha,
                                             beta=beta, backend=backend)

    compiled, rec = _compile(step)
    gen = torch.Generator().manual_seed(0)
    for i, (B, G, alpha, beta) in enumerate(((3, 40, 3.0, 2.0), (5, 33, 3.0, 2.0),
                                             (4, 50, tk.ALPHA, tk.BETA))):
        z = (torch.randn(B, G, generator=gen) * 4).requires_grad_(True)
        x = torch.rand(B, G, generator=gen) * 3
        table = torch.rand(2, G, generator=gen) > 0.3
        ids = torch.randint(0, 2, (B,), generator=gen)
        loss = compiled(z, x, table, ids, alpha, beta)
        (grad,) = torch.autograd.grad(loss, z)
        want_loss, want_grad = _rtanh_reference(z, x, table[ids], alpha, beta)
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)
        if i == 1:
            assert len(rec.graphs) == 1, "new B and G must not recompile"
    assert len(rec.graphs) <= 2
    assert set(rec.nodes("poisson_nll")) == {0 if backend == "torch" else 1}


def test_poisson_default_constants_and_module():
    crit = tk.RectifiedTanhPoissonNLLLoss()
    compiled, rec = _compile(lambda z, x: crit(z, x))
    for B in (2, 6):
        z = torch.randn(B, 30, requires_grad=True)
        x = torch.rand(B, 30)
        loss = compiled(z, x)
        (grad,) = torch.autograd.grad(loss, z)
        want_loss, want_grad = _rtanh_reference(z, x, torch.ones(B, 30, dtype=torch.bool),
                                                tk.ALPHA, tk.BETA)
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)
    assert len(rec.graphs) == 1
    assert rec.nodes("poisson_nll") == [0 if tk.resolve_backend("auto", torch.device("cpu"),
                                                                 "poisson") == "torch" else 1]


def test_poisson_bad_alpha_from_a_variable_still_raises_compiled():
    compiled, _ = _compile(lambda z, x, a: tk.rectified_tanh_poisson_nll(z, x, alpha=a))
    z, x = torch.randn(2, 5), torch.rand(2, 5)
    compiled(z, x, 2.0)
    with pytest.raises(Exception, match="alpha must be finite"):
        compiled(z, x, 1e3)


def test_poisson_nll_loss_variable_eps():
    def f(inp, tgt, eps):
        return tk.poisson_nll_loss(inp, tgt, log_input=False, full=True, eps=eps)

    compiled, rec = _compile(f)
    fused = tk.resolve_backend("auto", torch.device("cpu"), "poisson") != "torch"
    for i, (n, eps) in enumerate(((12, 1e-8), (20, 1e-8), (7, 0.5))):
        inp = (torch.rand(n) + 0.05).requires_grad_(True)
        tgt = torch.poisson(torch.rand(n) * 4)
        loss = compiled(inp, tgt, eps)
        (grad,) = torch.autograd.grad(loss, inp)
        i64 = inp.detach().double().requires_grad_(True)
        t64 = tgt.double()
        stirling = torch.where(
            t64 > 1, t64 * torch.log(t64) - t64 + 0.5 * torch.log(2 * math.pi * t64), 0.0)
        want = (i64 - t64 * torch.log(i64 + eps) + stirling).mean()
        want.backward()
        torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), i64.grad, rtol=1e-5, atol=1e-6)
        if i == 1:
            assert len(rec.graphs) == 1, "a new length must not recompile"
    assert set(rec.nodes("poisson_nll")) == {int(fused)}


# ---------------------------------------------------------------------------------------------
# Gene tokens
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _host_backends("tokens"))
def test_gene_tokens_dynamic_shapes_one_node(backend):
    tok = tk.GeneTokenizer(40, 8, backend=backend)

    def f(ids, values, pad):
        return tok(ids, values, pad).square().sum()

    compiled, rec = _compile(f)
    gen = torch.Generator().manual_seed(1)
    for B, K in ((3, 5), (4, 7), (2, 9)):
        ids = torch.randint(0, 40, (B, K), generator=gen)
        values = torch.rand(B, K, generator=gen)
        pad = torch.rand(B, K, generator=gen) < 0.2
        loss = compiled(ids, values, pad)
        grads = torch.autograd.grad(loss, [tok.codebook, tok.cls])
        E = tok.codebook.detach().double().requires_grad_()
        c = tok.cls.detach().double().requires_grad_()
        emb = torch.cat([E[ids.masked_fill(pad, 0)], values.double()[..., None]], -1)
        ref = torch.cat([c.expand(B, 1, -1), emb.masked_fill(pad[..., None], 0)], 1)
        want = ref.square().sum()
        want_grads = torch.autograd.grad(want, [E, c])
        torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
    assert len(rec.graphs) == 1
    assert rec.nodes("gene_tokens") == [1]


# ---------------------------------------------------------------------------------------------
# Masked sampling
# ---------------------------------------------------------------------------------------------
def _csr(B, G, seed):
    rng = np.random.default_rng(seed)
    rows = [np.sort(rng.choice(G, size=int(rng.integers(1, 15)), replace=False)) for _ in range(B)]
    indptr = np.zeros(B + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    counts = rng.integers(1, 30, size=int(indptr[-1])).astype(np.float32)
    return (torch.from_numpy(indptr), torch.from_numpy(np.concatenate(rows)).int(),
            torch.from_numpy(counts))


def _target_reference(indptr, indices, counts, G, L):
    """fp64 log1p(L * c / S), one row at a time."""
    out = np.zeros((len(indptr) - 1, G))
    for b in range(len(indptr) - 1):
        s, e = int(indptr[b]), int(indptr[b + 1])
        c = counts[s:e].double().numpy()
        out[b, indices[s:e].numpy()] = np.log1p(np.float32(L) * c / c.sum())
    return torch.from_numpy(out)


@pytest.mark.parametrize("messages", [True, False], ids=["torch>=2.13", "torch<2.13"])
@pytest.mark.parametrize("backend", _host_backends("sample"))
def test_masked_sample_variable_arguments(backend, messages, monkeypatch):
    # torch < 2.13 cannot trace torch._check's message: the checks then take none
    monkeypatch.setattr(tk._common, "_CHECK_MESSAGES", messages)
    G = 60
    obs = tk.ObservableGenes.from_lists([list(range(0, 45)), list(range(15, 60))], G)
    weights = torch.rand(G, generator=torch.Generator().manual_seed(2)) + 0.1

    def f(indptr, indices, counts, ds, k, seed, offset, target_sum, tau):
        s = tk.masked_sample(indptr, indices, counts, n_genes=G, k=k, observable=obs,
                             dataset_ids=ds, seed=seed, offset=offset, target_sum=target_sum,
                             tau=tau, gene_weights=weights, backend=backend)
        return s.gene_ids, s.values, s.key_padding_mask, s.target, s.library_size

    compiled, rec = _compile(f)
    calls = [(4, 8, 3, 0, 1e4, 0.0), (6, 12, 4, 1, 1e4, 0.0), (5, 6, 5, 2, 1e4, 0.0),  # uniform
             (4, 8, 3, 0, 1e4, 1.0), (6, 12, 9, 1, 1e4, 1.0),  # weighted
             (5, 7, 1, 3, 2.5e3, 0.0)]  # a new target_sum
    graphs_after = []
    for i, (B, k, seed, offset, target_sum, tau) in enumerate(calls):
        indptr, indices, counts = _csr(B, G, i)
        ds = torch.tensor([b % 2 for b in range(B)])
        args = (indptr, indices, counts, ds, k, seed, offset, target_sum, tau)
        got, eager = compiled(*args), f(*args)
        for a, b in zip(got, eager):  # the same draw as eager (bit for bit)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(got[3].double(), _target_reference(indptr, indices, counts, G,
                                                                      target_sum),
                                   rtol=2e-6, atol=2e-6)
        graphs_after.append(len(rec.graphs))
    # batch size, k, seed and offset never recompile; the weighted draw is its own graph
    assert graphs_after[:5] == [1, 1, 1, 2, 2] and graphs_after[5] <= 3
    assert set(rec.nodes("txfm.masked_sample")) == {1}


@pytest.mark.parametrize("name,good,bad,msg", [
    ("seed", 3, 2**63, "seed must fit in an int64"),
    ("offset", 5, -2**63 - 1, "offset must fit in an int64"),
    ("k", 3, 0, "k must be an int >= 1"),
])
def test_masked_sample_bad_traced_int_keeps_its_message(name, good, bad, msg):
    """A bad int that dynamo traces as a symbol: formatting the symbol into the message stopped
    tracing with 'BUILD_STRING type error', which hid the library's message."""
    indptr, indices, counts = _csr(3, 60, 0)

    def f(v):
        args = dict(n_genes=60, k=2, seed=0)
        args[name] = v
        return tk.masked_sample(indptr, indices, counts, **args).gene_ids

    compiled, _ = _compile(f)
    compiled(good)
    with pytest.raises(Exception, match=msg):
        compiled(bad)
    with pytest.raises(ValueError, match=f"{msg}.*got {bad}"):  # eager names the value
        f(bad)


def test_masked_sample_into_preallocated_outputs_compiles():
    G = 40
    out = tk.masked_sample(*_csr(3, G, 0), n_genes=G, k=5, seed=0)

    def f(indptr, indices, counts, seed, target_sum):
        s = tk.masked_sample(indptr, indices, counts, n_genes=G, k=5, seed=seed,
                             target_sum=target_sum, out=out)
        return s.target.sum()

    compiled, rec = _compile(f)
    for seed, L in ((1, 1e4), (2, 1e4)):
        batch = _csr(3, G, seed)
        total = compiled(*batch, seed, L)
        want = _target_reference(*batch, G, L)
        torch.testing.assert_close(out.target.double(), want, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(total.double(), want.sum(), rtol=1e-5, atol=1e-4)
    assert len(rec.graphs) == 1 and rec.nodes("txfm.masked_sample_into") == [1]


# ---------------------------------------------------------------------------------------------
# The whole model: forward, backward and an optimizer step
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # ~60 s of inductor compilation on 2 cores
def test_txfm_model_training_step_compiles_dynamic():
    from txfm.model import TxFM, preset

    G = 120
    torch.manual_seed(0)
    config = preset("tiny", depth=2, dim=32, heads=2, k=24, decoder_depth=2, decoder_hidden=48)
    model = TxFM(config, n_genes=G)
    ref = TxFM(config, n_genes=G).double()
    ref.load_state_dict(model.state_dict())
    obs = tk.ObservableGenes.from_lists([list(range(0, 100)), list(range(20, 120))], G)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    compiled, rec = _compile(model)
    for step, B in enumerate((4, 7, 5)):
        batch = _csr(B, G, 10 + step)
        s = tk.masked_sample(*batch, n_genes=G, k=24, observable=obs,
                             dataset_ids=torch.arange(B) % 2, seed=step)
        loss = compiled(s)
        loss.backward()
        opt.step()
        opt.zero_grad()
        s64 = s._replace(values=s.values.double(), target=s.target.double())
        want = ref(s64)  # eager, fp64 parameters and arithmetic
        want.backward()
        opt_ref.step()
        opt_ref.zero_grad()
        torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-4, atol=1e-4)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.double(), q.detach(), rtol=1e-3, atol=1e-4)
    assert len(rec.graphs) == 1, "a new batch size must not recompile"
    assert rec.nodes("gene_tokens") == [1] and rec.nodes("poisson_nll") == [1]


# ---------------------------------------------------------------------------------------------
# GPU: the cuda and triton backends under the same compilation (bench.gpu_check runs these)
# ---------------------------------------------------------------------------------------------
def _gpu_backend_or_skip(op, backend):
    info = tk.available_backends(op)[backend]
    if not info.available or "cuda" not in info.devices:
        pytest.skip(f"backend {backend} not usable on GPU here: {info.detail}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_ops_compile_dynamic(backend):
    for op in ("poisson", "tokens", "sample"):
        _gpu_backend_or_skip(op, backend)
    dev = "cuda"
    G = 300
    tok = tk.GeneTokenizer(G, 16, backend=backend).to(dev)
    obs = tk.ObservableGenes.from_lists([list(range(0, 250)), list(range(50, 300))], G).to(dev)
    head = torch.nn.Linear(16, G).to(dev)

    def step(indptr, indices, counts, ds, seed, alpha):
        s = tk.masked_sample(indptr, indices, counts, n_genes=G, k=32, observable=obs,
                             dataset_ids=ds, seed=seed, backend=backend)
        z = head(tok(s.gene_ids, s.values, s.key_padding_mask)[:, 0])
        return tk.rectified_tanh_poisson_nll(z, s.target, s.gene_mask, alpha=alpha,
                                             backend=backend)

    compiled, rec = _compile(step)
    for i, B in enumerate((8, 13)):
        batch = [t.to(dev) for t in _csr(B, G, 30 + i)]
        ds = (torch.arange(B) % 2).to(dev)
        loss = compiled(*batch, ds, i, tk.ALPHA)
        grads = torch.autograd.grad(loss, [tok.codebook, head.weight])
        want = step(*batch, ds, i, tk.ALPHA)
        want_grads = torch.autograd.grad(want, [tok.codebook, head.weight])
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert len(rec.graphs) == 1
    for name in ("txfm.masked_sample", "gene_tokens", "poisson_nll"):
        assert rec.nodes(name) == [1], name
