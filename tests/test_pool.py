"""The CPU output-buffer pool never hands out memory that is still in use."""
import torch

from txfm_kernels import _pool, masked_sample, rectified_tanh_poisson_nll

SHAPE = (64, 40_000)  # 10 MB of fp32: above the pool's threshold


def test_buffer_is_reused_only_after_every_user_is_gone():
    _pool.clear()
    a = _pool.cpu_empty(SHAPE, torch.float32)
    b = _pool.cpu_empty(SHAPE, torch.float32)  # a is still held: a different buffer
    assert a.data_ptr() != b.data_ptr()
    view = a[3:]
    ptr = a.data_ptr()
    del a
    c = _pool.cpu_empty(SHAPE, torch.float32)  # a's view still holds its storage
    assert c.data_ptr() not in (ptr, b.data_ptr())
    del view, c
    d = _pool.cpu_empty(SHAPE, torch.float32)
    assert d.data_ptr() == ptr
    assert not d._is_view() and d.shape == SHAPE


def test_small_buffers_and_disabled_pool_are_plain_allocations(monkeypatch):
    _pool.clear()
    small = _pool.cpu_empty((4, 4), torch.float32)
    assert small.shape == (4, 4) and not _pool._pool
    monkeypatch.setenv("TXFM_CPU_POOL", "0")
    _pool.cpu_empty(SHAPE, torch.float32)
    assert not _pool._pool


def test_poisson_gradients_held_by_the_caller_are_never_overwritten():
    _pool.clear()
    x = torch.rand(*SHAPE)
    z1 = torch.randn(*SHAPE, requires_grad=True)
    z2 = torch.randn(*SHAPE, requires_grad=True)
    g1 = torch.autograd.grad(rectified_tanh_poisson_nll(z1, x), z1)[0]
    expected = g1.clone()
    g2 = torch.autograd.grad(rectified_tanh_poisson_nll(z2, x), z2)[0]
    assert torch.equal(g1, expected)
    assert g1.data_ptr() != g2.data_ptr()


def test_leaf_grad_kept_by_autograd_is_not_reused():
    _pool.clear()
    x = torch.rand(*SHAPE)
    z = torch.randn(*SHAPE, requires_grad=True)
    rectified_tanh_poisson_nll(z, x).backward()
    kept = z.grad.clone()
    w = torch.randn(*SHAPE, requires_grad=True)
    rectified_tanh_poisson_nll(w, x).backward()
    assert torch.equal(z.grad, kept)


def test_sampler_targets_held_by_the_caller_stay_intact():
    _pool.clear()
    g, rows = 40_000, 64
    gen = torch.Generator().manual_seed(0)
    indices = torch.cat([torch.randperm(g, generator=gen)[:50].sort().values for _ in range(rows)])
    indptr = torch.arange(0, 50 * rows + 1, 50, dtype=torch.int64)
    counts = torch.randint(1, 9, (50 * rows,), generator=gen).float()
    first = masked_sample(indptr, indices.int(), counts, n_genes=g, k=16, seed=1)
    kept = first.target.clone()
    second = masked_sample(indptr, indices.int(), counts * 3, n_genes=g, k=16, seed=2)
    assert torch.equal(first.target, kept)
    assert first.target.data_ptr() != second.target.data_ptr()


def test_buffer_moved_to_shared_memory_leaves_the_pool():
    """A result sent through a DataLoader queue is moved into shared memory and read by
    another process: the pool must not hand it out again once the sender drops it."""
    _pool.clear()
    a = _pool.cpu_empty(SHAPE, torch.float32)
    a.share_memory_()  # what a worker's queue does to a tensor it sends
    del a
    b = _pool.cpu_empty(SHAPE, torch.float32)
    assert not b.is_shared()  # a fresh buffer, not the block the receiver maps


class _Targets(torch.utils.data.Dataset):
    """Sampler targets made in a DataLoader worker (each above the pool's threshold)."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return _target(i)


def _target(i):
    g, rows = 40_000, 64
    gen = torch.Generator().manual_seed(i)
    indices = torch.cat([torch.randperm(g, generator=gen)[:50].sort().values
                         for _ in range(rows)])
    indptr = torch.arange(0, 50 * rows + 1, 50, dtype=torch.int64)
    counts = torch.randint(1, 9, (50 * rows,), generator=gen).float()
    return masked_sample(indptr, indices.int(), counts, n_genes=g, k=16, seed=i).target


def test_targets_made_in_dataloader_workers_stay_intact():
    held = list(torch.utils.data.DataLoader(_Targets(), batch_size=None, num_workers=1))
    for i, t in enumerate(held):
        assert torch.equal(t, _target(i)), f"batch {i} was overwritten by a later one"
