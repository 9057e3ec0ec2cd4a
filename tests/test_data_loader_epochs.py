"""ShardLoader epochs under every way of driving it (in-process, ``.dataloader()``, a plain
torch DataLoader with fresh, persistent or spawned workers) and exact mid-epoch resume
through ``.dataloader(num_workers)`` for any worker count and any cut point."""
from __future__ import annotations

import pytest

pytest.importorskip("anndata", reason="txfm.data / txfm.eval need anndata: pip install anndata zarr")
pytest.importorskip("zarr", reason="txfm.data / txfm.eval need zarr: pip install anndata zarr")

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from txfm.data import Manifest, ShardLoader
from _shards import synthetic_shards
from txfm.data.loader import _round_robin_consumed, _round_robin_next

# 3 workers on a 2-core machine: torch warns; the tests only need the worker count
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

KW = dict(chunk_size=32, buffer_size=128, seed=11)  # 8 windows of 2 batches: lanes differ
B = 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory, cells=1100, genes=200, perturbations=5, seed=4,
                            shard_cells=400, convert_seed=2, val_fraction=0.0)


def ids(batches) -> list[list[int]]:
    return [b.cell_ids.tolist() for b in batches]


def interleave(lanes: list[list]) -> list:
    """torch's DataLoader order for an IterableDataset: round-robin over its workers,
    exhausted ones skipped."""
    out, t = [], 0
    while any(t < len(x) for x in lanes):
        out += [x[t] for x in lanes if t < len(x)]
        t += 1
    return out


def reference(shards, epoch: int, workers: int) -> list[list[int]]:
    """The uninterrupted epoch ``epoch`` with ``workers`` DataLoader workers, built from the
    lanes' own batch streams in this process (no DataLoader involved)."""
    ld = ShardLoader(shards, B, **KW)
    lanes = max(1, workers)
    streams = []
    for lane in range(lanes):
        windows, skip = ld._lane_windows(lane, lanes, 0, epoch)
        streams.append(ids(ld._run(windows, skip, epoch, 1, track=False)))
    return interleave(streams)


def test_reference_is_the_in_process_order(shards):
    ld = ShardLoader(shards, B, **KW)
    assert ids(ld) == reference(shards, 0, 0)
    assert ids(ld) == reference(shards, 1, 0) != reference(shards, 0, 0)
    n = Manifest.load(shards).n_split_cells("train")
    for w in (2, 3):  # every lane layout covers the same cells once
        got = sorted(c for b in reference(shards, 0, w) for c in b)
        assert got == sorted(c for b in reference(shards, 0, 0) for c in b)
        assert len(got) == len(set(got)) == (n // B) * B


@pytest.mark.parametrize("persistent", [False, True])
def test_plain_dataloader_advances_the_epoch(shards, persistent):
    ld = ShardLoader(shards, B, **KW)
    dl = torch.utils.data.DataLoader(ld, batch_size=None, num_workers=2,
                                     persistent_workers=persistent)
    for epoch in range(3):
        assert ids(dl) == reference(shards, epoch, 2), f"epoch {epoch}"
    assert ld.epoch == 3 and ld.state_dict()["epoch"] == 3
    # set_epoch reaches the workers, persistent ones included
    ld.set_epoch(7)
    assert ids(dl) == reference(shards, 7, 2)
    ld.set_epoch(1)
    assert ids(dl) == reference(shards, 1, 2)
    # and an in-process epoch after them goes on from there
    assert ld.epoch == 2 and ids(ld) == reference(shards, 2, 0)


def test_plain_dataloader_with_spawned_workers(shards):
    ld = ShardLoader(shards, B, **KW)
    dl = torch.utils.data.DataLoader(ld, batch_size=None, num_workers=2,
                                     multiprocessing_context="spawn", persistent_workers=True)
    assert ids(dl) == reference(shards, 0, 2)
    assert ids(dl) == reference(shards, 1, 2)
    ld.set_epoch(4)
    assert ids(dl) == reference(shards, 4, 2)


def test_worker_count_can_change_between_epochs(shards):
    ld = ShardLoader(shards, B, **KW)
    two = torch.utils.data.DataLoader(ld, batch_size=None, num_workers=2)
    three = torch.utils.data.DataLoader(ld, batch_size=None, num_workers=3)
    assert ids(two) == reference(shards, 0, 2)
    assert ids(three) == reference(shards, 1, 3)
    assert ids(two) == reference(shards, 2, 2)
    assert ids(ld.dataloader(num_workers=3)) == reference(shards, 3, 3)
    assert ids(three) == reference(shards, 4, 3)


@pytest.mark.parametrize("persistent", [False, True])
def test_tracked_dataloader_epochs(shards, persistent):
    ld = ShardLoader(shards, B, **KW)
    dl = ld.dataloader(num_workers=2, persistent_workers=persistent)
    assert ids(dl) == reference(shards, 0, 2)
    assert ids(dl) == reference(shards, 1, 2)
    ld.set_epoch(5)
    assert ids(dl) == reference(shards, 5, 2)
    assert ld.state_dict()["epoch"] == 6 and ld.state_dict()["batches"] == 0


def _resume(shards, workers: int, k: int, epoch: int = 1) -> tuple[list, list]:
    """(first k batches + the rest after a save/load at k, the uninterrupted epoch)."""
    a = ShardLoader(shards, B, **KW)
    a.set_epoch(epoch)
    it = iter(a.dataloader(num_workers=workers))
    head = [next(it).cell_ids.tolist() for _ in range(k)]
    state = a.state_dict()
    del it
    assert state["batches"] == k and state["epoch"] == epoch
    b = ShardLoader(shards, B, **KW)
    b.load_state_dict(state)
    rest = ids(b.dataloader(num_workers=workers))
    assert b.state_dict()["epoch"] == epoch + 1 and b.state_dict()["batches"] == 0
    return head + rest, reference(shards, epoch, workers)


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_resume_through_dataloader_is_exact(shards, workers):
    n = len(ShardLoader(shards, B, **KW))
    rng = np.random.default_rng(workers)
    # odd cuts (where a 2-worker resume used to swap batches pairwise), both ends, random
    cuts = sorted({1, 3, 5, n - 1, n} | set(rng.integers(0, n + 1, 3).tolist()))
    for k in cuts:
        got, want = _resume(shards, workers, k)
        assert got == want, f"workers={workers}, cut after {k} of {n} batches"


def test_resume_with_other_worker_count_is_refused(shards):
    a = ShardLoader(shards, B, **KW)
    it = iter(a.dataloader(num_workers=2))
    next(it)
    state = a.state_dict()
    del it
    b = ShardLoader(shards, B, **KW)
    b.load_state_dict(state)
    with pytest.raises(RuntimeError, match="num_workers=2"):
        next(iter(b.dataloader(num_workers=3)))
    with pytest.raises(RuntimeError, match="same number of DataLoader workers"):
        next(iter(b))


@settings(max_examples=300, deadline=None)
@given(counts=st.lists(st.integers(0, 7), min_size=1, max_size=5), data=st.data())
def test_rotated_round_robin_goes_on_exactly(counts, data):
    """Lane ``(w + rotation) % L`` for worker ``w``, each lane skipping what it gave, makes
    a fresh round-robin continue the interrupted one item for item."""
    seq = interleave([[(w, t) for t in range(c)] for w, c in enumerate(counts)])
    k = data.draw(st.integers(0, len(seq)))
    taken = _round_robin_consumed(np.array(counts), k)
    rot = _round_robin_next(np.array(counts), k)
    lanes = len(counts)
    resumed = interleave([[(lane, t) for t in range(int(taken[lane]), counts[lane])]
                          for lane in ((w + rot) % lanes for w in range(lanes))])
    assert seq[:k] + resumed == seq
