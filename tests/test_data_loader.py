"""ShardLoader: contents, determinism, worker/rank disjointness, resume, shuffle quality."""
from __future__ import annotations

import pytest

pytest.importorskip("anndata", reason="txfm.data / txfm.eval need anndata: pip install anndata zarr")
pytest.importorskip("zarr", reason="txfm.data / txfm.eval need zarr: pip install anndata zarr")

import numpy as np
import scipy.sparse as sp
import torch

from _shards import read_shards, synthetic_shards
from txfm.data import CSRBatch, Manifest, ShardLoader
from txfm.data.loader import _round_robin_consumed

KW = dict(chunk_size=64, buffer_size=512)  # small, so windows span several chunks and shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory, cells=3000, genes=400, perturbations=10, seed=1,
                            shard_cells=700, convert_seed=7, val_fraction=0.05)


@pytest.fixture(scope="module")
def corpus(shards):
    """All cells by global id (cell_ids), read with anndata: (csr [N, G], obs)."""
    return read_shards(shards)[1:]


def to_csr(b: CSRBatch) -> sp.csr_matrix:
    return sp.csr_matrix((b.counts.numpy(), b.indices.numpy(), b.indptr.numpy()),
                         shape=(b.batch_size, b.n_genes))


def ids(batches) -> list[np.ndarray]:
    return [b.cell_ids.numpy().copy() for b in batches]


def test_batches_hold_the_right_cells(shards, corpus):
    x, obs = corpus
    m = Manifest.load(shards)
    loader = ShardLoader(shards, 100, drop_last=False, obs_columns=("cell_type", "source_row"), **KW)
    batches = list(loader)
    n_train = m.n_split_cells("train")
    assert len(batches) == len(loader) == -(-n_train // 100)
    cell_ids = np.concatenate(ids(batches))
    assert np.array_equal(np.sort(cell_ids), np.arange(n_train))  # each cell exactly once
    names = [d.name for d in m.datasets]
    for b in batches:
        assert b.indptr.dtype == torch.int64 and b.indices.dtype == torch.int32
        assert b.counts.dtype == torch.int32 and b.dataset_ids.dtype == torch.int32
        c = b.cell_ids.numpy()
        assert abs(to_csr(b) - x[c]).sum() == 0
        # sorted, in-range indices per row
        got = to_csr(b)
        assert got.has_sorted_indices and (got.indices < loader.n_genes).all()
        want_ds = [names.index(n) for n in obs["dataset"].astype(str).to_numpy()[c]]
        assert b.dataset_ids.tolist() == want_ds
        cats = loader.obs_categories["cell_type"]
        assert [cats[i] for i in b.obs["cell_type"].tolist()] == list(obs["cell_type"].astype(str).to_numpy()[c])
        assert b.obs["source_row"].tolist() == obs["source_row"].to_numpy()[c].tolist()
    dense = batches[0].to_dense()
    np.testing.assert_array_equal(dense.numpy(), x[batches[0].cell_ids.numpy()].toarray())
    assert batches[0].to("cpu", non_blocking=True).indices.dtype == torch.int32


def test_observable_and_gene_nnz(shards, corpus):
    x, obs = corpus
    loader = ShardLoader(shards, 64)
    m = loader.manifest
    og = loader.observable
    assert og.mask.shape == (len(m.datasets), m.n_genes)
    assert og.genes.dtype == torch.int32 and og.indptr.dtype == torch.int64
    # every stored gene of a cell is observable for its dataset
    ds = np.array([m.dataset_index(n) for n in obs["dataset"].astype(str)])
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    assert og.mask[torch.from_numpy(ds[rows]), torch.from_numpy(x.indices.astype(np.int64))].all()
    n_train = m.n_split_cells("train")
    assert loader.gene_nnz.dtype == torch.int64
    assert loader.gene_nnz.tolist() == np.bincount(x[:n_train].indices, minlength=m.n_genes).tolist()


def test_deterministic_and_epochs_differ(shards):
    a = ids(ShardLoader(shards, 100, seed=3, **KW))
    b = ids(ShardLoader(shards, 100, seed=3, **KW))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    loader = ShardLoader(shards, 100, seed=3, **KW)
    e0 = ids(loader)
    assert loader.epoch == 1  # iterating to the end advances the epoch
    e1 = ids(loader)
    assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))
    c = ids(ShardLoader(shards, 100, seed=4, **KW))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    loader.set_epoch(0)
    assert all(np.array_equal(x, y) for x, y in zip(ids(loader), e0))
    seq = ids(ShardLoader(shards, 100, shuffle=False, drop_last=False, **KW))
    assert np.array_equal(np.concatenate(seq), np.arange(sum(len(s) for s in seq)))


def test_ranks_are_disjoint_and_equal_length(shards):
    n_train = Manifest.load(shards).n_split_cells("train")
    world = 3
    parts = [ShardLoader(shards, 64, rank=r, world_size=world, seed=5, **KW) for r in range(world)]
    lens = [len(p) for p in parts]
    assert len(set(lens)) == 1 and lens[0] == (n_train // world) // 64
    got = [np.concatenate(ids(p)) for p in parts]
    assert all(g.size == lens[0] * 64 for g in got)
    allc = np.concatenate(got)
    assert np.unique(allc).size == allc.size
    with pytest.raises(ValueError, match="rank"):
        ShardLoader(shards, 64, rank=3, world_size=3)


def _interleave(lanes):
    out, t = [], 0
    while any(t < len(x) for x in lanes):
        out += [x[t] for x in lanes if t < len(x)]
        t += 1
    return out


def test_dataloader_workers_disjoint_and_predictable(shards):
    loader = ShardLoader(shards, 64, seed=2, **KW)
    got = ids(loader.dataloader(num_workers=2))
    assert len(got) == len(loader)
    allc = np.concatenate(got)
    assert np.unique(allc).size == allc.size
    # same cells as the in-process epoch; the order is the round-robin of the two lanes
    ref = ShardLoader(shards, 64, seed=2, **KW)
    assert set(allc) == set(np.concatenate(ids(ref)))
    lanes = []
    for w in range(2):
        windows, skip = ref._lane_windows(w, 2, 0, 0)
        lanes.append(ids(ref._run(windows, skip, 0, 1, track=False)))
    assert all(np.array_equal(x, y) for x, y in zip(got, _interleave(lanes)))
    # a plain DataLoader over the loader also sees disjoint parts in its workers
    plain = ids(torch.utils.data.DataLoader(ShardLoader(shards, 64, seed=2, **KW),
                                            batch_size=None, num_workers=2))
    assert all(np.array_equal(x, y) for x, y in zip(plain, got))



def test_plain_dataloader_default_batch_size_passes_batches_through(shards):
    """DataLoader(loader) keeps torch's default batch_size=1: each item is already a batch, so
    it comes through unchanged (it was default_collate's TypeError); stacking is refused."""
    ref = ids(ShardLoader(shards, 64, seed=2, **KW))
    batches = list(torch.utils.data.DataLoader(ShardLoader(shards, 64, seed=2, **KW)))
    assert all(isinstance(b, CSRBatch) and b.batch_size == 64 for b in batches)
    assert all(np.array_equal(b.cell_ids.numpy(), r) for b, r in zip(batches, ref))
    assert len(batches) == len(ref)
    with pytest.raises(ValueError, match=r"collating 3 ShardLoader batches.*batch_size=3\).*"
                                         r"pass batch_size=None"):
        next(iter(torch.utils.data.DataLoader(ShardLoader(shards, 64, seed=2, **KW),
                                              batch_size=3)))

def test_resume_in_process_is_exact(shards):
    full = ids(ShardLoader(shards, 100, seed=9, **KW))
    for k in (0, 1, 7, len(full) - 1):
        a = ShardLoader(shards, 100, seed=9, **KW)
        it = iter(a)
        head = [next(it).cell_ids.numpy().copy() for _ in range(k)]
        state = a.state_dict()
        assert state["batches"] == k
        b = ShardLoader(shards, 100, seed=9, **KW)
        b.load_state_dict(state)
        rest = ids(b)
        assert all(np.array_equal(x, y) for x, y in zip(head + rest, full)) and len(head + rest) == len(full)
        assert b.state_dict()["epoch"] == 1 and b.state_dict()["batches"] == 0
    c = ShardLoader(shards, 100, seed=10, **KW)
    with pytest.raises(ValueError, match="seed"):
        c.load_state_dict(state)


def test_resume_with_workers_is_exact(shards):
    full = ids(ShardLoader(shards, 64, seed=4, **KW).dataloader(num_workers=2))
    a = ShardLoader(shards, 64, seed=4, **KW)
    dl = iter(a.dataloader(num_workers=2))
    k = len(full) - 3  # late, where one lane may already be exhausted
    head = [next(dl).cell_ids.numpy().copy() for _ in range(k)]
    state = a.state_dict()
    del dl
    b = ShardLoader(shards, 64, seed=4, **KW)
    b.load_state_dict(state)
    with pytest.raises(RuntimeError, match="num_workers=2"):
        next(iter(b.dataloader(num_workers=1)))
    rest = ids(b.dataloader(num_workers=2))
    assert all(np.array_equal(x, y) for x, y in zip(head + rest, full)) and len(head + rest) == len(full)


def test_round_robin_consumed_matches_simulation():
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(0, 6, rng.integers(1, 5))
        seq = _interleave([[w] * c for w, c in enumerate(counts)])
        for k in range(len(seq) + 1):
            want = np.bincount(np.array(seq[:k], dtype=int), minlength=counts.size)
            assert _round_robin_consumed(counts, k).tolist() == want.tolist()


def test_shuffle_quality(shards, corpus):
    """Batches are as spread over the original input order as a global permutation's, and
    the batches of two epochs are different sets of cells."""
    x, obs = corpus
    m = Manifest.load(shards)
    # position in the original input order: datasets one after another, rows in file order
    sizes = {d.name: d.report["cells_input"] for d in m.datasets}
    offsets = dict(zip(sizes, np.concatenate([[0], np.cumsum(list(sizes.values()))[:-1]])))
    orig = np.array([offsets[d] for d in obs["dataset"].astype(str)]) + obs["source_row"].to_numpy()
    B, stretch = 128, 128
    loader = ShardLoader(shards, B, seed=0, **KW)
    e0 = ids(loader)
    e1 = ids(loader)
    got = np.mean([np.unique(orig[c] // stretch).size for c in e0])
    n = m.n_split_cells("train")
    rng = np.random.default_rng(0)
    ideal = np.mean([np.unique(rng.permutation(n)[:B] // stretch).size for _ in range(200)])
    assert got >= 0.97 * ideal, (got, ideal)
    # epoch 1 does not repeat epoch 0's batches: a batch shares few cells with any earlier batch
    first = {int(c): i for i, b in enumerate(e0) for c in b}
    overlap = [np.bincount([first[int(c)] for c in b if int(c) in first]).max() / B for b in e1]
    assert max(overlap) < 0.5, max(overlap)


def test_val_split_and_errors(shards):
    m = Manifest.load(shards)
    val = ShardLoader(shards, 16, split="val", shuffle=False, drop_last=False)
    got = np.concatenate(ids(val))
    assert np.array_equal(got, m.n_split_cells("train") + np.arange(m.n_split_cells("val")))
    with pytest.raises(ValueError, match="split"):
        ShardLoader(shards, 16, split="test")
    with pytest.raises(KeyError, match="not_a_column"):
        ShardLoader(shards, 16, obs_columns=("not_a_column",))
    with pytest.raises(FileNotFoundError, match="nope does not exist; a shard collection is"):
        ShardLoader(shards / "nope", 16)
    for kw, match in (({"seed": -1}, "seed must be an integer >= 0, got -1"),
                      ({"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
                      ({"batch_size": "8"}, "batch_size must be an integer >= 1, got '8'"),
                      ({"chunk_size": True}, "chunk_size must be an integer >= 1"),
                      ({"rank": 2, "world_size": 2}, r"rank must be in \[0, world_size=2\)")):
        with pytest.raises(ValueError, match=match):
            ShardLoader(shards, **{"batch_size": 16, **kw})
    with pytest.raises(TypeError, match=r"obs_columns .* the string 'batch'; pass \('batch',\)"):
        ShardLoader(shards, 16, obs_columns="batch")
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        val.set_epoch(-1)
    with pytest.raises(TypeError, match="ShardLoader.state_dict"):
        val.load_state_dict(None)


def _ddp_worker(rank, world, init_file, shards, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loader = ShardLoader(shards, 64, seed=1, **KW)  # rank/world from torch.distributed
        np.save(out / f"rank{rank}.npy", np.concatenate(ids(loader)))
        np.save(out / f"len{rank}.npy", np.array([len(loader), loader.rank, loader.world_size]))
    finally:
        dist.destroy_process_group()


def test_rank_and_world_size_default_from_torch_distributed(shards, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, tmp_path / "init", shards, tmp_path), nprocs=2, join=True)
    a, b = (np.load(tmp_path / f"rank{r}.npy") for r in range(2))
    la, lb = (np.load(tmp_path / f"len{r}.npy") for r in range(2))
    assert la.tolist()[1:] == [0, 2] and lb.tolist()[1:] == [1, 2] and la[0] == lb[0]
    assert a.size == b.size == la[0] * 64 and not set(a) & set(b)
    ref = [np.concatenate(ids(ShardLoader(shards, 64, seed=1, rank=r, world_size=2, **KW)))
           for r in range(2)]
    assert np.array_equal(ref[0], a) and np.array_equal(ref[1], b)


@pytest.mark.parametrize("mmap", [True, False])
def test_mmap_and_pread_give_the_same_batches(shards, mmap):
    a = list(ShardLoader(shards, 100, seed=2, mmap=True, **KW))
    b = list(ShardLoader(shards, 100, seed=2, mmap=mmap, num_threads=1, **KW))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.indptr, y.indptr) and torch.equal(x.indices, y.indices)
        assert torch.equal(x.counts, y.counts) and torch.equal(x.cell_ids, y.cell_ids)


@pytest.mark.gpu
def test_pinned_batches_copy_to_cuda(shards):
    loader = ShardLoader(shards, 128, pin_memory=True, **KW)
    for b in list(loader)[:3]:
        assert b.indices.is_pinned() and b.counts.is_pinned() and b.indptr.is_pinned()
        d = b.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        assert d.indices.is_cuda and torch.equal(d.indices.cpu(), b.indices)
        assert torch.equal(d.to_dense().cpu(), b.to_dense())
    pinned = list(loader.dataloader(num_workers=1, pin_memory=True))[0]
    assert pinned.indices.is_pinned()


def test_a_split_smaller_than_a_batch_is_refused_not_silently_empty(shards):
    n_val = Manifest.load(shards).n_split_cells("val")
    with pytest.raises(ValueError, match=rf"'val' split has {n_val} cells, fewer than "
                                         rf"batch_size={n_val + 1}.*drop_last=False"):
        ShardLoader(shards, n_val + 1, split="val")
    with pytest.raises(ValueError, match=r"per rank of 2\), fewer than batch_size"):
        ShardLoader(shards, n_val // 2 + 1, split="val", rank=0, world_size=2)
    (b,) = list(ShardLoader(shards, n_val + 1, split="val", drop_last=False))
    assert b.batch_size == n_val
    assert len(ShardLoader(shards, n_val, split="val")) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="pin_memory works where CUDA is")
def test_pin_memory_without_cuda_is_refused_at_construction(shards):
    with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
        ShardLoader(shards, 128, pin_memory=True, **KW)


def test_every_iter_continues_where_the_last_stopped(shards):
    """As documented: a peek consumes its batch; set_epoch(epoch) restarts the epoch."""
    loader = ShardLoader(shards, 64, **KW)
    n = len(loader)
    first = next(iter(loader))
    assert sum(1 for _ in loader) == n - 1
    loader.set_epoch(1)
    again = next(iter(loader))
    loader.set_epoch(1)
    assert torch.equal(next(iter(loader)).cell_ids, again.cell_ids)
    assert first.cell_ids.shape == again.cell_ids.shape
