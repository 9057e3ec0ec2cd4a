"""Tests of txfm_kernels.masked_sample (CPU; Triton under the interpreter; GPU tests marked)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats
import torch

import txfm_kernels as tk
from txfm_kernels import ObservableGenes, RowGeneMask, masked_sample
from txfm_kernels.sample import call_key

CPU_OK = tk.available_backends("sample")["cpu"].available
TRITON_CPU = "cpu" in tk.available_backends("sample")["triton"].devices
needs_cpu = pytest.mark.skipif(not CPU_OK, reason="C++ library of sample not built: "
                                                  "python setup.py build_ext --inplace")
needs_triton = pytest.mark.skipif(not TRITON_CPU, reason="triton not installed or "
                                                         "TRITON_INTERPRET!=1")
HOST_BACKENDS = [pytest.param("cpu", marks=needs_cpu), "torch",
                 pytest.param("triton", marks=needs_triton)]


# ---------------------------------------------------------------------------------------------
# Data and independent references
# ---------------------------------------------------------------------------------------------
def make_batch(B, n_genes, nnz_range, *, seed=0, dtype=torch.float32, n_datasets=0,
               obs_range=None, zero_rows=(), big_range=False):
    """Random CSR rows (sorted distinct ids), an ObservableGenes table and dataset ids."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(nnz_range[0], nnz_range[1] + 1, size=B)
    rows = [np.sort(rng.choice(n_genes, size=min(n, n_genes), replace=False)) for n in lens]
    lens = np.array([len(r) for r in rows])
    indptr = np.zeros(B + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(lens)
    counts = rng.geometric(0.3, size=int(indptr[-1])).astype(np.float64)
    if big_range and counts.size:  # normalised values from ~1e-4 to ~L
        counts[rng.random(counts.size) < 0.05] *= 10 ** rng.uniform(2, 6)
        counts = np.round(counts)
    for b in zero_rows:
        counts[indptr[b]:indptr[b + 1]] = 0
    obs = ds = None
    if n_datasets:
        lo, hi = obs_range or (1, n_genes)
        lists = [rng.choice(n_genes, size=int(rng.integers(lo, hi + 1)), replace=False)
                 for _ in range(n_datasets)]
        obs = ObservableGenes.from_lists(lists, n_genes)
        ds = torch.from_numpy(rng.integers(0, n_datasets, size=B)).to(torch.int32)
    indices = torch.from_numpy(np.concatenate(rows) if B else np.zeros(0, np.int64)).to(torch.int32)
    return (torch.from_numpy(indptr), indices, torch.from_numpy(counts).to(dtype), obs, ds)


def reference_dense(indptr, indices, counts, n_genes, L=1e5):
    """fp64 target and library sizes, one row at a time (numpy)."""
    indptr, indices = indptr.numpy(), indices.numpy()
    counts = counts.double().numpy()
    B = len(indptr) - 1
    target = np.zeros((B, n_genes))
    lib = np.zeros(B)
    for b in range(B):
        s, e = indptr[b], indptr[b + 1]
        lib[b] = counts[s:e].sum()
        if lib[b] > 0:
            target[b, indices[s:e]] = np.log1p(L * counts[s:e] / lib[b])
    return target, lib


_M32 = 0xFFFFFFFF


def _py_hash(x):
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & _M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def py_draw(n, k, seed, offset, row):
    """The draw of csrc/sample/sample_math.h in plain Python ints (positions in the obs list)."""
    k0, k1 = call_key(seed, offset)
    m = 10
    while m < 31 and (1 << m) < n:
        m += 1
    rs = _py_hash(k0 ^ _py_hash(row ^ k1))
    keys = [_py_hash((rs + (i + 1) * 0x61C88647) & _M32) for i in range(6)]
    out, j = [], 0
    while len(out) < min(k, n) and j < (1 << m):
        x, la, lb = j, m // 2, m - m // 2
        for key in keys:
            left, right = x >> lb, x & ((1 << lb) - 1)
            x = (right << la) | (left ^ (_py_hash(right ^ key) & ((1 << la) - 1)))
            la, lb = lb, la
        if x < n:
            out.append(x)
        j += 1
    return out


def observable_lists(obs, ds, B, n_genes):
    if obs is None:
        return [np.arange(n_genes)] * B
    genes, ptr = obs.genes.numpy(), obs.indptr.numpy()
    d = ds.numpy() if ds is not None else np.zeros(B, dtype=np.int64)
    return [genes[ptr[x]:ptr[x + 1]] for x in d]


def check_sample(s, indptr, indices, counts, n_genes, k, obs=None, ds=None, L=1e5,
                 return_target=True):
    """Every property of a MaskedSample against the fp64 reference."""
    B = indptr.numel() - 1
    target, lib = reference_dense(indptr, indices, counts, n_genes, L)
    assert s.gene_ids.dtype == torch.int32 and s.gene_ids.shape == (B, k)
    assert s.values.dtype == torch.float32 and s.values.shape == (B, k)
    assert s.key_padding_mask.dtype == torch.bool and s.key_padding_mask.shape == (B, k)
    np.testing.assert_allclose(s.library_size.numpy(), lib, rtol=1e-6)
    if return_target:
        assert s.target.shape == (B, n_genes) and s.target.dtype == torch.float32
        np.testing.assert_allclose(s.target.numpy(), target, rtol=2e-6, atol=2e-7)
    else:
        assert s.target is None
    ids, vals, pad = s.gene_ids.numpy(), s.values.numpy(), s.key_padding_mask.numpy()
    for b, allowed in enumerate(observable_lists(obs, ds, B, n_genes)):
        kk = min(k, len(allowed))
        assert not pad[b, :kk].any() and pad[b, kk:].all()
        assert (ids[b, kk:] == 0).all() and (vals[b, kk:] == 0).all()
        drawn = ids[b, :kk]
        assert len(set(drawn.tolist())) == kk, "ids not distinct"
        assert np.isin(drawn, allowed).all(), "unobservable gene drawn"
        if kk == len(allowed):
            assert set(drawn.tolist()) == set(allowed.tolist())
        np.testing.assert_allclose(vals[b, :kk], target[b, drawn], rtol=2e-6, atol=2e-7)
    assert np.isfinite(vals).all()
    if obs is None:
        assert s.gene_mask is None
    else:
        want = ds if ds is not None else torch.zeros(B, dtype=torch.int32)
        assert s.gene_mask.mask is obs.mask and torch.equal(s.gene_mask.dataset_ids.long(),
                                                            want.long())


def run(batch, backend, **kw):
    indptr, indices, counts, obs, ds = batch
    kw.setdefault("n_genes", int(indices.max()) + 1 if indices.numel() else 1)
    return masked_sample(indptr, indices, counts, observable=obs, dataset_ids=ds,
                         backend=backend, **kw)


# ---------------------------------------------------------------------------------------------
# Correctness against the fp64 reference, every host backend
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("return_target", [True, False])
def test_matches_reference_with_observable_tables(backend, return_target):
    G, k = 300, 48
    batch = make_batch(7, G, (0, 120), seed=1, n_datasets=3, obs_range=(20, 200),
                       zero_rows=(2,), big_range=True)
    s = run(batch, backend, n_genes=G, k=k, seed=5, offset=2, return_target=return_target)
    check_sample(s, *batch[:3], G, k, obs=batch[3], ds=batch[4], return_target=return_target)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_every_gene_observable_and_short_rows_padded(backend):
    G, k = 40, 64  # K > G: every row is padded after its 40 genes
    batch = make_batch(4, G, (0, 30), seed=2)
    s = run(batch, backend, n_genes=G, k=k, seed=0)
    check_sample(s, *batch[:3], G, k)
    assert s.key_padding_mask[:, G:].all() and not s.key_padding_mask[:, :G].any()


def test_ids_match_the_plain_python_specification():
    G, k = 1000, 37
    batch = make_batch(5, G, (1, 50), seed=3, n_datasets=2, obs_range=(5, 700))
    for backend in ["torch"] + (["cpu"] if CPU_OK else []):
        s = run(batch, backend, n_genes=G, k=k, seed=123456789123, offset=-7)
        lists = observable_lists(batch[3], batch[4], 5, G)
        for b in range(5):
            want = lists[b][py_draw(len(lists[b]), k, 123456789123, -7, b)]
            got = s.gene_ids[b, : len(want)].numpy()
            np.testing.assert_array_equal(got, want, err_msg=f"{backend} row {b}")


def test_draw_is_stable_across_versions():
    # a reproducibility anchor: changing the RNG changes every user's training draw
    assert py_draw(10, 5, seed=0, offset=0, row=0) == [7, 0, 5, 9, 6]
    assert py_draw(20000, 4, seed=42, offset=1000, row=3) == [7473, 19663, 16821, 453]


@pytest.mark.parametrize("return_target", [True, False])
def test_ids_bit_identical_across_host_backends(return_target):
    G, k = 500, 96
    batch = make_batch(6, G, (0, 200), seed=4, n_datasets=4, obs_range=(1, 500),
                       dtype=torch.int32)
    outs = {}
    for backend in ["torch"] + (["cpu"] if CPU_OK else []) + (["triton"] if TRITON_CPU else []):
        outs[backend] = run(batch, backend, n_genes=G, k=k, seed=99, offset=3,
                            return_target=return_target)
    ref = outs.pop("torch")
    for name, s in outs.items():
        assert torch.equal(s.gene_ids, ref.gene_ids), name
        assert torch.equal(s.key_padding_mask, ref.key_padding_mask), name
        torch.testing.assert_close(s.values, ref.values, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.library_size, ref.library_size, rtol=0, atol=0)
        if return_target:
            torch.testing.assert_close(s.target, ref.target, rtol=1e-6, atol=1e-6)


@needs_cpu
def test_values_without_target_equal_values_with_target():
    G = 2000
    batch = make_batch(9, G, (0, 900), seed=5, big_range=True)
    a = run(batch, "cpu", n_genes=G, k=256, seed=1)
    b = run(batch, "cpu", n_genes=G, k=256, seed=1, return_target=False)
    assert torch.equal(a.gene_ids, b.gene_ids) and torch.equal(a.values, b.values)


@needs_cpu
def test_a_direct_op_call_the_kernel_refuses_says_what_to_call_instead():
    """torch.ops.txfm.masked_sample skips the public function's checks; a size the C++ kernel
    refuses (k = 0) said "internal error" and nothing a user could act on. The op now checks
    its own arguments first (tests/test_backends.py has the other cases), and a status the
    kernel still returns names the function to call."""
    indptr = torch.tensor([0, 2], dtype=torch.int64)
    indices, counts = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"^torch\.ops\.txfm\.masked_sample: k must be an "
                                         r"int >= 1"):
        torch.ops.txfm.masked_sample(indptr, indices, counts, None, None, None, 5, 0, 1e4, 0, 0,
                                     True, False, "cpu")
    from txfm_kernels._common import _rejected

    assert "call txfm_kernels.masked_sample," in _rejected("masked_sample")
    with pytest.raises(ValueError, match=r"k must be an int >= 1"):  # the public function
        masked_sample(indptr, indices, counts, n_genes=5, k=0, seed=0, backend="cpu")
    from txfm_kernels._common import _PUBLIC  # every op's message names functions that exist

    assert all(hasattr(tk, name) for names in _PUBLIC.values() for name in names.split(" or "))


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), "torch"])
def test_seeds_offsets_and_rows_key_the_draw(backend):
    G, k = 5000, 64
    batch = make_batch(3, G, (10, 20), seed=6)
    base = run(batch, backend, n_genes=G, k=k, seed=1, offset=0).gene_ids
    assert torch.equal(base, run(batch, backend, n_genes=G, k=k, seed=1, offset=0).gene_ids)
    for kw in ({"seed": 2, "offset": 0}, {"seed": 1, "offset": 1},
               {"seed": 1 + 2**32, "offset": 0}):
        other = run(batch, backend, n_genes=G, k=k, **kw).gene_ids
        assert (other != base).float().mean() > 0.9, kw
    assert (base[0] != base[1]).float().mean() > 0.9  # rows differ
    # row b's draw depends on (seed, offset, b) and its observable count, not on other rows
    sub = make_batch(1, G, (3, 3), seed=7)
    alone = run(sub, backend, n_genes=G, k=k, seed=1, offset=0).gene_ids
    assert torch.equal(alone[0], base[0])


# ---------------------------------------------------------------------------------------------
# Statistics of the draw
# ---------------------------------------------------------------------------------------------
def _many_rows(B, n_genes, obs_genes=None):
    indptr = torch.zeros(B + 1, dtype=torch.int64)
    empty = torch.zeros(0, dtype=torch.int32)
    obs = None if obs_genes is None else ObservableGenes.from_lists([obs_genes], n_genes)
    return indptr, empty, torch.zeros(0), obs, None


@pytest.mark.parametrize("n,k", [(10, 3), (7, 7), (13, 2)])
def test_uniform_subsets_chi_square(n, k):
    """Every k-subset of n observable genes is equally likely (rows and seeds both vary)."""
    backend = "cpu" if CPU_OK else "torch"
    G = n + 5
    obs_genes = sorted(np.random.default_rng(n).choice(G, size=n, replace=False).tolist())
    subsets = {c: i for i, c in enumerate(itertools.combinations(obs_genes, k))}
    tally = np.zeros(len(subsets) if k < n else 1)
    first = np.zeros(n)
    slots = np.zeros((k, n))
    col = {g: i for i, g in enumerate(obs_genes)}
    for seed in range(4):
        batch = _many_rows(6000, G, obs_genes)
        ids = run(batch, backend, n_genes=G, k=k, seed=seed, return_target=False).gene_ids.numpy()
        for row in ids:
            tally[subsets[tuple(sorted(row.tolist()))] if k < n else 0] += 1
            for j, g in enumerate(row):
                slots[j, col[g]] += 1
        first += np.bincount([col[g] for g in ids[:, 0]], minlength=n)
    if k < n:
        assert scipy.stats.chisquare(tally).pvalue > 1e-4
    for j in range(k):  # each slot (draw order) is uniform over the genes too
        assert scipy.stats.chisquare(slots[j]).pvalue > 1e-4, f"slot {j}"


def test_uniform_inclusion_chi_square_larger_domain():
    """n = 600 (domain 1024, so filtering matters), k = 40: inclusion and first-slot counts."""
    backend = "cpu" if CPU_OK else "torch"
    n, k, B = 600, 40, 15000
    ids = run(_many_rows(B, n), backend, n_genes=n, k=k, seed=11, offset=5,
              return_target=False).gene_ids.numpy()
    inclusion = np.bincount(ids.ravel(), minlength=n)
    assert scipy.stats.chisquare(inclusion).pvalue > 1e-4
    assert scipy.stats.chisquare(np.bincount(ids[:, 0], minlength=n)).pvalue > 1e-4
    assert scipy.stats.chisquare(np.bincount(ids[:, -1], minlength=n)).pvalue > 1e-4
    # pairs: adjacent slots should not be correlated (gene of slot 0 vs slot 1, binned)
    table = np.histogram2d(ids[:, 0], ids[:, 1], bins=8, range=[[0, n], [0, n]])[0]
    assert scipy.stats.chi2_contingency(table).pvalue > 1e-4


def _inclusion_exact(w, k):
    """Successive sampling without replacement: P(gene i drawn) by enumerating sequences."""
    n = len(w)
    p = np.zeros(n)
    for seq in itertools.permutations(range(n), k):
        prob, left = 1.0, w.sum()
        for i in seq:
            prob *= w[i] / left
            left -= w[i]
        p[list(seq)] += prob
    return p


@pytest.mark.parametrize("tau", [1.0, -0.5])
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), "torch"])
def test_weighted_draw_matches_exact_inclusion_probabilities(tau, backend):
    G, k, B = 6, 2, 20000
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 9.0, 5.0])
    obs_genes = [0, 1, 2, 3, 4]  # gene 5 is unobservable: never drawn despite its weight
    s = run(_many_rows(B, G, obs_genes), backend, n_genes=G, k=k, seed=3, tau=tau,
            gene_weights=weights, return_target=False)
    ids = s.gene_ids.numpy()
    assert not s.key_padding_mask.any() and (ids != 5).all() and (ids[:, 0] != ids[:, 1]).all()
    exact = _inclusion_exact(weights[:5].double().numpy() ** tau, k)
    freq = np.bincount(ids.ravel(), minlength=G)[:5] / B
    sigma = np.sqrt(exact * (1 - exact) / B)
    assert np.all(np.abs(freq - exact) < 4.5 * sigma), (freq, exact)
    # and the first slot follows w / sum(w)
    w = weights[:5].double().numpy() ** tau
    first = np.bincount(ids[:, 0], minlength=5)[:5]
    assert scipy.stats.chisquare(first, B * w / w.sum()).pvalue > 1e-4


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), "torch"])
def test_weighted_draw_values_and_padding(backend):
    G, k = 300, 64
    batch = make_batch(5, G, (0, 100), seed=8, n_datasets=2, obs_range=(10, 120))
    weights = torch.rand(G, generator=torch.Generator().manual_seed(0)) + 0.1
    s = run(batch, backend, n_genes=G, k=k, seed=2, tau=0.5, gene_weights=weights)
    check_sample(s, *batch[:3], G, k, obs=batch[3], ds=batch[4])
    again = run(batch, backend, n_genes=G, k=k, seed=2, tau=0.5, gene_weights=weights)
    assert torch.equal(s.gene_ids, again.gene_ids)
    # integer counts (loader.gene_nnz, the m_i) draw as the same weights in float32
    counts = torch.randint(1, 5000, (G,), generator=torch.Generator().manual_seed(1))
    for dtype in (torch.int64, torch.int32):
        a = run(batch, backend, n_genes=G, k=k, seed=2, tau=0.5, gene_weights=counts.to(dtype))
        b = run(batch, backend, n_genes=G, k=k, seed=2, tau=0.5, gene_weights=counts.float())
        assert torch.equal(a.gene_ids, b.gene_ids) and torch.equal(a.values, b.values)


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_edge_cases_k1_k_equal_n_single_row_zero_rows(backend):
    G = 50
    one = make_batch(1, G, (5, 5), seed=9)
    s = run(one, backend, n_genes=G, k=1, seed=0)
    check_sample(s, *one[:3], G, 1)
    obs_genes = list(range(3, 40, 2))  # 19 observable genes; K = 19 draws them all
    batch = make_batch(3, G, (0, 10), seed=10, zero_rows=(1,))
    batch = batch[:3] + (ObservableGenes.from_lists([obs_genes], G), None)
    s = run(batch, backend, n_genes=G, k=len(obs_genes), seed=4)
    check_sample(s, *batch[:3], G, len(obs_genes), obs=batch[3])
    assert not s.key_padding_mask.any()
    assert (s.library_size[1] == 0) and (s.target[1] == 0).all() and (s.values[1] == 0).all()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_empty_rows_empty_batch_and_dataset_without_genes(backend):
    G, k = 30, 8
    obs = ObservableGenes.from_lists([[1, 2, 3], []], G)  # dataset 1 profiles nothing
    indptr = torch.tensor([0, 0, 2, 2])
    indices = torch.tensor([2, 7], dtype=torch.int32)
    counts = torch.tensor([4.0, 6.0])
    ds = torch.tensor([0, 1, 0])
    s = masked_sample(indptr, indices, counts, n_genes=G, k=k, observable=obs, dataset_ids=ds,
                      seed=1, backend=backend)
    check_sample(s, indptr, indices, counts, G, k, obs=obs, ds=ds)
    assert s.key_padding_mask[1].all() and s.key_padding_mask[0, 3:].all()
    empty = masked_sample(torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int32),
                          torch.zeros(0), n_genes=G, k=k, seed=0, backend=backend)
    assert empty.gene_ids.shape == (0, k) and empty.target.shape == (0, G)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_full_vocabulary_44349_genes(backend):
    G, k = 44_349, 2048
    B = 2 if backend == "triton" else 6
    batch = make_batch(B, G, (1000, 3000), seed=12, n_datasets=2, obs_range=(8000, 36000))
    s = run(batch, backend, n_genes=G, k=k, seed=7, offset=11)
    check_sample(s, *batch[:3], G, k, obs=batch[3], ds=batch[4])
    ref = run(batch, "torch", n_genes=G, k=k, seed=7, offset=11, return_target=False)
    assert torch.equal(s.gene_ids, ref.gene_ids)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.float64,
                                   torch.int64, torch.float16]
                         + ([torch.uint16] if hasattr(torch, "uint16") else []))
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), "torch"])
def test_count_dtypes_give_the_float32_result(dtype, backend):
    G = 200
    batch = make_batch(4, G, (0, 60), seed=13)
    small = batch[2].clamp(max=200)
    ref = masked_sample(batch[0], batch[1], small, n_genes=G, k=32, seed=3, backend=backend)
    got = masked_sample(batch[0], batch[1], small.to(dtype), n_genes=G, k=32, seed=3,
                        backend=backend)
    for a, b in zip(ref[:3] + ref[5:], got[:3] + got[5:]):
        assert torch.equal(a, b)
    assert torch.equal(ref.target, got.target)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), "torch"])
def test_out_buffers_are_filled_in_place(backend):
    G, k = 100, 16
    batch = make_batch(5, G, (0, 40), seed=14)
    fresh = run(batch, backend, n_genes=G, k=k, seed=1)
    out = tk.MaskedSample(torch.full((5, k), 7, dtype=torch.int32), torch.full((5, k), 7.0),
                          torch.ones(5, k, dtype=torch.bool), torch.full((5, G), 7.0), None,
                          torch.zeros(5))
    got = run(batch, backend, n_genes=G, k=k, seed=1, out=out)
    assert got.gene_ids is out.gene_ids and got.target is out.target
    for a, b in zip(fresh[:4] + fresh[5:], got[:4] + got[5:]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="out.target"):
        run(batch, backend, n_genes=G, k=k, seed=1, out=out._replace(target=torch.zeros(5, 3)))
    with pytest.raises(TypeError, match="out must be a MaskedSample"):
        run(batch, backend, n_genes=G, k=k, seed=1, out="x")


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ---------------------------------------------------------------------------------------------
def _good():
    indptr = torch.tensor([0, 2, 3])
    indices = torch.tensor([1, 4, 0], dtype=torch.int32)
    return indptr, indices, torch.tensor([3.0, 1.0, 5.0])


BAD_DATA = [
    (r"indptr\[0\] must be 0", lambda p, i, c: (torch.tensor([1, 2, 3]), i, c)),
    (r"indptr must be non-decreasing, but indptr\[2\] < indptr\[1\]",
     lambda p, i, c: (torch.tensor([0, 3, 2, 3]), i, c)),
    (r"indptr\[-1\] must equal nnz = indices.numel\(\) = 3",
     lambda p, i, c: (torch.tensor([0, 2, 2]), i, c)),
    (r"indices must lie in \[0, n_genes=6\); row 1",
     lambda p, i, c: (p, i.new_tensor([1, 4, 6]), c)),
    ("indices must lie in.*row 0", lambda p, i, c: (p, i.new_tensor([-1, 4, 0]), c)),
    ("strictly increasing.*row 0 is not", lambda p, i, c: (p, i.new_tensor([4, 1, 0]), c)),
    ("strictly increasing.*row 0", lambda p, i, c: (p, i.new_tensor([4, 4, 0]), c)),
    ("counts must be finite and >= 0; row 1", lambda p, i, c: (p, i, c.new_tensor([1, 1, -2]))),
    ("counts must be finite.*row 0", lambda p, i, c: (p, i, c.new_tensor([float("nan"), 1, 1]))),
    ("counts must be finite.*row 0", lambda p, i, c: (p, i, c.new_tensor([float("inf"), 1, 1]))),
    ("counts must be finite.*row 1",
     lambda p, i, c: (p, i, torch.tensor([1, 2, -3], dtype=torch.int32))),
]


@pytest.mark.parametrize("msg,mutate", BAD_DATA)
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), "torch"])
def test_bad_data_is_a_value_error_naming_it(backend, msg, mutate):
    p, i, c = mutate(*_good())
    with pytest.raises(ValueError, match=msg):
        masked_sample(p, i, c, n_genes=6, k=2, seed=0, backend=backend)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), "torch"])
def test_bad_observable_and_dataset_ids(backend):
    p, i, c = _good()
    obs2 = ObservableGenes.from_lists([[0, 1, 4], [2, 3]], 6)
    with pytest.raises(ValueError, match="dataset_ids .* is required"):
        masked_sample(p, i, c, n_genes=6, seed=0, observable=obs2, backend=backend)
    with pytest.raises(ValueError, match=r"dataset_ids\[1\] is outside \[0, n_datasets=2\)"):
        masked_sample(p, i, c, n_genes=6, seed=0, observable=obs2,
                      dataset_ids=torch.tensor([0, 2]), backend=backend)
    with pytest.raises(ValueError, match="dataset_ids must have B=2"):
        masked_sample(p, i, c, n_genes=6, seed=0, observable=obs2,
                      dataset_ids=torch.tensor([0, 1, 1]), backend=backend)
    with pytest.raises(TypeError, match="dataset_ids must be int32 or int64"):
        masked_sample(p, i, c, n_genes=6, seed=0, observable=obs2,
                      dataset_ids=torch.tensor([0.0, 1.0]), backend=backend)
    with pytest.raises(ValueError, match="observable covers 7 genes but n_genes=6"):
        masked_sample(p, i, c, n_genes=6, seed=0, backend=backend,
                      observable=ObservableGenes.from_lists([[1]], 7))
    broken = ObservableGenes(obs2.mask, obs2.indptr, obs2.genes.flip(0).contiguous())
    with pytest.raises(ValueError, match="observable.genes must list"):
        masked_sample(p, i, c, n_genes=6, seed=0, observable=broken, backend=backend,
                      dataset_ids=torch.tensor([0, 1]), validate=True)
    with pytest.raises(TypeError, match="observable must be an ObservableGenes"):
        masked_sample(p, i, c, n_genes=6, seed=0, observable=obs2.mask, backend=backend)


def test_bad_arguments():
    p, i, c = _good()
    cases = [
        (ValueError, "k must be an int >= 1", dict(k=0)),
        (ValueError, "n_genes must be an int", dict(n_genes=0)),
        (ValueError, "library_size must be finite and > 0", dict(library_size=0.0)),
        (TypeError, "seed must be an int", dict(seed=1.5)),
        (ValueError, r"seed must fit in an int64, \[-2\^63, 2\^63\), got 18446744073709551616",
         dict(seed=2**64)),
        (ValueError, "offset must fit in an int64", dict(offset=-2**63 - 1)),
        (ValueError, "tau=0.5 needs gene_weights", dict(tau=0.5)),
        (ValueError, "gene_weights must be a float or integer tensor of n_genes=6",
         dict(tau=0.5, gene_weights=torch.ones(5))),
        (ValueError, "gene_weights must be 1-D", dict(tau=0.5, gene_weights=torch.ones(6, 1))),
        (ValueError, "gene_weights must be a float or integer tensor of n_genes=6",
         dict(tau=0.5, gene_weights=torch.ones(6, dtype=torch.bool))),
        (ValueError, "gene_weights must be finite and > 0",
         dict(tau=0.5, gene_weights=torch.tensor([1, 0, 1, 1, 1, 1]))),
        (ValueError, "gene_weights must be finite and > 0",
         dict(tau=0.5, gene_weights=torch.tensor([1.0, 0, 1, 1, 1, 1]))),
        (ValueError, "backend='fast'", dict(backend="fast")),
    ]
    for exc, msg, kw in cases:
        args = dict(n_genes=6, k=2, seed=0) | kw
        with pytest.raises(exc, match=msg):
            masked_sample(p, i, c, **args)
    with pytest.raises(TypeError, match="indices must be int32.*to\\(torch.int32\\)"):
        masked_sample(p, i.long(), c, n_genes=6, seed=0)
    with pytest.raises(TypeError, match="indptr must be int64"):
        masked_sample(p.float(), i, c, n_genes=6, seed=0)
    with pytest.raises(ValueError, match="counts has 2 entries but indices has 3"):
        masked_sample(p, i, c[:2], n_genes=6, seed=0)
    with pytest.raises(TypeError, match="counts must be a real number dtype"):
        masked_sample(p, i, c.bool(), n_genes=6, seed=0)
    with pytest.raises(TypeError, match="seed"):
        masked_sample(p, i, c, n_genes=6)  # seed is a required keyword
    # indptr as int32 is accepted
    assert masked_sample(p.int(), i, c, n_genes=6, k=2, seed=0).gene_ids.shape == (2, 2)


@needs_cpu
def test_validate_false_trusts_the_input():
    p, i, c = _good()
    s = masked_sample(p, i, c.new_tensor([1, 1, -2]), n_genes=6, k=2, seed=0, validate=False,
                      backend="cpu")
    assert s.library_size.tolist() == [2.0, -2.0]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_target_sum_names_L_and_library_size_is_its_deprecated_alias(backend):
    batch = make_batch(5, 30, (1, 12), seed=21)
    target, lib = reference_dense(*batch[:3], 30, L=2e4)
    s = run(batch, backend, n_genes=30, k=6, seed=1, target_sum=2e4)
    np.testing.assert_allclose(s.target.numpy(), target, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(s.library_size.numpy(), lib, rtol=1e-6)  # S, each row's total
    with pytest.warns(DeprecationWarning, match="library_size= is deprecated, pass target_sum="):
        old = run(batch, backend, n_genes=30, k=6, seed=1, library_size=2e4)
    for a, b in zip(old, s):
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b)
    with pytest.raises(TypeError, match="pass target_sum only"), pytest.warns(DeprecationWarning):
        run(batch, backend, n_genes=30, k=6, seed=1, target_sum=2e4, library_size=2e4)
    with pytest.raises(ValueError, match="target_sum must be finite and > 0"):
        run(batch, backend, n_genes=30, k=6, seed=1, target_sum=float("inf"))


@needs_cpu
def test_unvalidated_out_of_range_dataset_ids_never_wrap_around_on_the_torch_backend():
    """With validate=False every backend clamps a dataset id into [0, D) (the kernels never
    read out of bounds); the torch reference used to index with a negative id, i.e. wrap
    around to the last dataset."""
    batch = make_batch(4, 50, (1, 20), seed=22, n_datasets=3, obs_range=(10, 40))
    indptr, indices, counts, obs, _ = batch
    ds = torch.tensor([0, -1, 2, 7], dtype=torch.int32)
    kw = dict(n_genes=50, k=8, seed=2, validate=False)
    cpu = masked_sample(indptr, indices, counts, observable=obs, dataset_ids=ds, backend="cpu",
                        **kw)
    ref = masked_sample(indptr, indices, counts, observable=obs, dataset_ids=ds, backend="torch",
                        **kw)
    clamped = masked_sample(indptr, indices, counts, observable=obs, backend="torch",
                            dataset_ids=ds.clamp(0, 2), **kw)
    for a, b, c in zip(cpu[:4] + (cpu.library_size,), ref[:4] + (ref.library_size,),
                       clamped[:4] + (clamped.library_size,)):
        assert torch.equal(a, b) and torch.equal(b, c)
    shown = ref.gene_ids[1][~ref.key_padding_mask[1]]
    assert torch.isin(shown, obs.genes[:obs.indptr[1]].long()).all()


# ---------------------------------------------------------------------------------------------
# torch.library integration
# ---------------------------------------------------------------------------------------------
def test_custom_op_passes_opcheck():
    batch = make_batch(3, 40, (0, 10), seed=15, n_datasets=2, obs_range=(5, 30))
    indptr, indices, counts, obs, ds = batch
    backend = "cpu" if CPU_OK else "torch"
    torch.library.opcheck(torch.ops.txfm.masked_sample.default,
                          (indptr, indices, counts, obs.indptr, obs.genes, ds, 40, 8, 1e5, 3, 4,
                           True, True, backend))


def test_torch_compile_fullgraph_matches_eager():
    G, k = 64, 16
    indptr, indices, counts, _, _ = make_batch(4, G, (0, 20), seed=16)
    backend = "cpu" if CPU_OK else "torch"

    def f(p, i, c):
        s = masked_sample(p, i, c, n_genes=G, k=k, seed=5, offset=1, backend=backend)
        return s.gene_ids, s.values * 2, s.target.sum(1)

    compiled = torch.compile(f, fullgraph=True)
    for a, b in zip(compiled(indptr, indices, counts), f(indptr, indices, counts)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# GPU: cuda and triton against the CPU results
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("return_target", [True, False])
def test_gpu_backends_match_cpu(backend, return_target):
    G, k = 44_349, 2048
    batch = make_batch(64, G, (0, 4000), seed=17, n_datasets=3, obs_range=(1000, 36000),
                       zero_rows=(5,), big_range=True)
    host = run(batch, "torch", n_genes=G, k=k, seed=8, offset=9, return_target=return_target)
    dev = tuple(t.cuda() if t is not None else None for t in batch[:3]) + (
        batch[3].to("cuda"), batch[4].cuda())
    s = run(dev, backend, n_genes=G, k=k, seed=8, offset=9, return_target=return_target)
    assert torch.equal(s.gene_ids.cpu(), host.gene_ids)
    assert torch.equal(s.key_padding_mask.cpu(), host.key_padding_mask)
    torch.testing.assert_close(s.values.cpu(), host.values, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(s.library_size.cpu(), host.library_size, rtol=1e-6, atol=0)
    if return_target:
        torch.testing.assert_close(s.target.cpu(), host.target, rtol=2e-6, atol=2e-6)
    check_sample(type(s)(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in s[:4]),
                         host.gene_mask, s.library_size.cpu()),
                 *batch[:3], G, k, obs=batch[3], ds=batch[4], return_target=return_target)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_count_dtypes_and_no_observable(backend):
    G, k = 3000, 256
    batch = make_batch(16, G, (0, 500), seed=18)
    for dtype in (torch.float32, torch.int32, torch.int16, torch.uint8):
        c = batch[2].clamp(max=200).to(dtype)
        host = masked_sample(batch[0], batch[1], c, n_genes=G, k=k, seed=1, backend="torch")
        s = masked_sample(batch[0].cuda(), batch[1].cuda(), c.cuda(), n_genes=G, k=k, seed=1,
                          backend=backend)
        assert torch.equal(s.gene_ids.cpu(), host.gene_ids), dtype
        torch.testing.assert_close(s.target.cpu(), host.target, rtol=2e-6, atol=2e-6)


@pytest.mark.gpu
def test_gpu_validate_true_raises_and_weighted_draw_runs():
    p, i, c = (t.cuda() for t in _good())
    with pytest.raises(ValueError, match="counts must be finite"):
        masked_sample(p, i, c.new_tensor([1, 1, -2]), n_genes=6, k=2, seed=0, validate=True)
    with pytest.raises(ValueError, match="strictly increasing"):
        masked_sample(p, i.new_tensor([4, 1, 0]), c, n_genes=6, k=2, seed=0, validate=True)
    w = torch.rand(6, device="cuda") + 0.5
    s = masked_sample(p, i, c, n_genes=6, k=4, seed=0, tau=1.0, gene_weights=w)
    assert s.gene_ids.is_cuda and not s.key_padding_mask.any()
    for row in s.gene_ids.cpu():
        assert len(set(row.tolist())) == 4


# -- faults a user found reusing the op ----------------------------------------------------------

@needs_cpu
@pytest.mark.parametrize("indptr,indices", [
    ([0, 3, 9], [1, 2, 3]),             # last pointer past the data
    ([0, -100, 3], [1, 2, 3]),          # decreasing
    ([0, 2, 3], [1, 100000, 3]),        # gene index out of range
    ([0, 2, 3], [-1, 2, 3]),
])
def test_unvalidated_cpu_input_is_still_memory_safe(indptr, indices):
    """validate=False trusts values, but a damaged CSR must not crash the process (the cpu
    kernel writes dense[index] unclamped): the structure is checked anyway, with the kernel's
    messages."""
    p = torch.tensor(indptr, dtype=torch.int64)
    i = torch.tensor(indices, dtype=torch.int32)
    c = torch.ones(len(indices))
    with pytest.raises(ValueError, match="indptr|indices"):
        masked_sample(p, i, c, n_genes=10, k=3, seed=0, backend="cpu", validate=False)


@pytest.mark.parametrize("tau", [float("inf"), 1e37, -1e3, 100.5])
def test_tau_beyond_what_fp32_keys_hold_is_refused(tau):
    p, i, c = _good()
    with pytest.raises(ValueError, match=r"tau must be finite with \|tau\| <= 100"):
        masked_sample(p, i, c, n_genes=6, k=2, seed=0, tau=tau,
                      gene_weights=torch.ones(6))


def test_target_sum_that_rounds_to_zero_in_fp32_is_refused():
    p, i, c = _good()
    with pytest.raises(ValueError, match="target_sum must be finite and > 0"):
        masked_sample(p, i, c, n_genes=6, k=2, seed=0, target_sum=1e-46)


def test_counts_that_require_grad_are_refused_up_front():
    p, i, c = _good()
    with pytest.raises(ValueError, match="counts must not require grad"):
        masked_sample(p, i, c.clone().requires_grad_(True), n_genes=6, k=2, seed=0)
    with torch.no_grad():  # nothing to differentiate there
        masked_sample(p, i, c.clone().requires_grad_(True), n_genes=6, k=2, seed=0)


def test_flags_and_small_helpers_refuse_wrong_types():
    csr = torch.tensor([[1, 2, 0, 3]], dtype=torch.float32).to_sparse_csr()
    args = (csr.crow_indices(), csr.col_indices().int(), csr.values())
    with pytest.raises(TypeError, match="return_target must be True or False, got 'no'"):
        masked_sample(*args, n_genes=4, k=2, seed=0, return_target="no")
    with pytest.raises(TypeError, match=r"validate must be True or False \(or None\), got 1"):
        masked_sample(*args, n_genes=4, k=2, seed=0, validate=1)
    with pytest.raises(ValueError, match="n_genes must be an int >= 1, got 6.0"):
        ObservableGenes.from_lists([[0, 1]], n_genes=6.0)
    with pytest.raises(TypeError, match="dataset_ids must be an integer tensor"):
        RowGeneMask(torch.ones(2, 3, dtype=torch.bool), torch.tensor([0.5])).dense()
    from txfm.train import sample_batch

    with pytest.warns(DeprecationWarning, match="use txfm.data.inputs.model_inputs"):
        with pytest.raises(TypeError):
            sample_batch()


def test_numpy_integers_are_ints():
    """Sizes and seeds read from numpy arrays (np.int64) are ints, as Python's are."""
    indptr, indices = torch.tensor([0, 2, 3]), torch.tensor([1, 4, 2], dtype=torch.int32)
    counts = torch.tensor([3.0, 1.0, 5.0])
    a = masked_sample(indptr, indices, counts, n_genes=np.int64(6), k=np.int32(4),
                      seed=np.int64(5), offset=np.uint8(2))
    b = masked_sample(indptr, indices, counts, n_genes=6, k=4, seed=5, offset=2)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
    tok = tk.GeneTokenizer(np.int64(7), np.int64(5))
    assert (tok.n_genes, tok.d) == (7, 5) and type(tok.n_genes) is int
    assert ObservableGenes.all_genes(np.int64(3)).mask.shape == (1, 3)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        masked_sample(indptr, indices, counts, n_genes=6, k=np.float64(4.0), seed=0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_sizes_beyond_memory_are_refused_by_name(backend):
    """A k (or a vocabulary) whose outputs cannot fit in the device's memory gets one error
    naming k and the rows, before any allocation (not the allocator's byte count)."""
    if backend == "cpu" and not CPU_OK:
        pytest.skip("the cpu backend is not built: TXFM_BUILD_CPU=1 pip install -e .")
    indptr, indices = torch.tensor([0, 2, 3]), torch.tensor([1, 4, 2], dtype=torch.int32)
    counts = torch.tensor([3.0, 1.0, 5.0])
    with pytest.raises(ValueError, match=r"masked_sample: B=2 rows of k=1099511627776 shown "
                                         r"genes .*GiB.*pass a smaller k"):
        masked_sample(indptr, indices, counts, n_genes=6, k=2**40, seed=0, backend=backend)
    with pytest.raises(ValueError, match=r"target \[B, 1073741823\].*return_target=False"):
        masked_sample(torch.tensor([0] + [3] * 2**12), indices, counts, n_genes=2**30 - 1,
                      k=4, seed=0, backend=backend)
    # more k than genes is allowed (padded), as documented
    s = masked_sample(indptr, indices, counts, n_genes=6, k=9, seed=0, backend=backend)
    assert s.gene_ids.shape == (2, 9) and bool(s.key_padding_mask[:, 6:].all())


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("counts,target_sum", [([0.1, 0.1], 1e38), ([1e-36, 3e-36], 1e5),
                                               ([3.0, 1.0], 3e38)])
def test_normalisation_beyond_fp32_range_of_l_over_s(backend, counts, target_sum):
    """L / S can exceed fp32 while L * c / S <= L fits: the values are log1p(L c / S), never
    NaN or inf (reference: the formula in float64)."""
    c = torch.tensor(counts)
    # the row beside an ordinary one (whose values must not change), with and without target
    both = torch.cat([c, torch.tensor([1.0, 3.0])])
    indptr, ids = torch.tensor([0, 2, 4]), torch.tensor([0, 1, 0, 1], dtype=torch.int32)
    L = float(torch.tensor(target_sum, dtype=torch.float32))
    expected = torch.log1p(L * c.double() / c.double().sum())
    plain = torch.log1p(torch.tensor([1.0, 3.0]) * torch.tensor(L / 4.0, dtype=torch.float32))
    for target in (True, False):
        s = masked_sample(indptr, ids, both, n_genes=2, k=2, seed=0, target_sum=target_sum,
                          return_target=target, backend=backend)
        got = torch.zeros(2, 2).scatter_(1, s.gene_ids.long(), s.values)
        torch.testing.assert_close(got[0].double(), expected, rtol=2e-7, atol=0)
        torch.testing.assert_close(got[1], plain, rtol=2e-7, atol=0)
        if target:
            torch.testing.assert_close(s.target, got, rtol=0, atol=0)
