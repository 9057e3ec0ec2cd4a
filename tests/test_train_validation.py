"""Validation is never skipped silently (issue 11 item 4).

A validation split smaller than one batch is validated as one partial batch; a larger one keeps
its last, partial batch; a run without validation says so at start-up. Expected losses come from
the validation cells read back with anndata (not through the loader) and the trained model.
"""
from __future__ import annotations

import pytest

pytest.importorskip("anndata", reason="shards need anndata: pip install anndata zarr")
pytest.importorskip("zarr", reason="shards need zarr: pip install anndata zarr")

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from txfm.data import Manifest
from txfm.data.convert import convert
from txfm.data.synth import generate
from txfm.model import preset
from txfm.train import TrainConfig
from txfm.train.synthetic import MemoryBatch
from txfm.data.inputs import model_inputs
from txfm.train.diagnostics import MIN_CELLS
from txfm.train.trainer import _VAL_SEED, Trainer

BATCH = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("raw"), cells=400, genes=120, perturbations=4,
                    batches=2, seed=3)


def _shards(raw, out, val_fraction):
    convert(raw.datasets, out, min_cells=2, min_genes=5, val_fraction=val_fraction,
            shard_cells=150, seed=1, progress=False, log=lambda s: None)
    return out


def _val_cells(root) -> tuple[sp.csr_matrix, np.ndarray]:
    """The 'val' split as anndata reads it, in corpus order: (counts [N, G], dataset ids [N])."""
    m = Manifest.load(root)
    names = [d.name for d in m.datasets]
    xs, ids = [], []
    for s in m.split_shards("val"):
        a = ad.read_zarr(root / s.path)
        xs.append(sp.csr_matrix(a.X, dtype=np.float32))
        ids.append(np.array([names.index(str(d)) for d in a.obs["dataset"]], dtype=np.int32))
    return sp.vstack(xs).tocsr(), np.concatenate(ids)


def _loss(trainer, x: sp.csr_matrix, dataset_ids: np.ndarray, offset: int) -> float:
    """The model's loss on cells ``x`` drawn as validation micro-batch number ``offset``."""
    x.sort_indices()
    batch = MemoryBatch(torch.from_numpy(x.indptr.astype(np.int64)),
                        torch.from_numpy(x.indices.astype(np.int32)),
                        torch.from_numpy(x.data.astype(np.int32)),
                        torch.from_numpy(dataset_ids), torch.arange(x.shape[0]))
    sample = model_inputs(batch, n_genes=trainer.n_genes, config=trainer.model_config,
                          observable=trainer.observable, seed=_VAL_SEED, offset=offset)
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.model(sample, key_padding_mask=sample.key_padding_mask))


def _run(root, out, **kw):
    cfg = TrainConfig.for_preset("tiny", data=str(root), out=str(out), steps=4,
                                 batch_size=BATCH, val_every=2, ckpt_every=None, progress=False,
                                 plot=False, tensorboard=False, **kw)
    model = preset("tiny", dim=32, depth=2, heads=2, decoder_hidden=32, k=16,
                   use_fused_ops=False)
    trainer = Trainer(cfg, model)
    return trainer, trainer.fit()


@pytest.mark.parametrize("val_fraction", [0.015, 0.1])
def test_validation_uses_every_cell_of_a_small_split(raw, tmp_path, val_fraction, capsys):
    root = _shards(raw, tmp_path / "shards", val_fraction)
    x, ids = _val_cells(root)
    n = x.shape[0]
    assert 0 < n and (n < BATCH if val_fraction < 0.05 else n % BATCH), n  # a partial batch
    trainer, result = _run(root, tmp_path / "run")
    captured = capsys.readouterr()
    assert "no validation" not in captured.out
    if n < MIN_CELLS:  # more or larger batches cannot help: the advice is the split's size
        line = next(s for s in captured.err.splitlines() if "validation cells" in s)
        assert f"validation split holds only {n}:" in line and "--val-fraction" in line
        assert "--val-batches" not in line
    assert [r["step"] for r in result.history if r.get("val_loss") is not None] == [2, 4]
    # the last validation ran with the final weights: recompute it per cell from anndata
    starts = list(range(0, n, BATCH))
    per_batch = [_loss(trainer, x[s:s + BATCH], ids[s:s + BATCH], i) for i, s in enumerate(starts)]
    rows = [min(BATCH, n - s) for s in starts]
    expected = float(np.dot(per_batch, rows) / n)  # mean over cells, not over batches
    assert result.val_losses[-1] == pytest.approx(expected, rel=1e-5)


def test_no_validation_split_is_announced_at_start_up(raw, tmp_path, capsys):
    root = _shards(raw, tmp_path / "shards", 0.0)
    _, result = _run(root, tmp_path / "run")
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("warning: no validation:"))
    assert "'val'" in line and "--val-fraction" in line
    assert result.val_losses == [] and result.step == 4


def test_progress_bar_shows_the_step_being_validated(raw, tmp_path, monkeypatch):
    """The bar counts a step before its validation runs, so a long validation of step N is
    shown at N, not N - 1."""
    import txfm.train.trainer as trainer_mod

    bars = []
    real = trainer_mod._progress

    def keep(total, initial, enabled):
        bars.append(real(total, initial, True))
        return bars[-1]

    root = _shards(raw, tmp_path / "shards", 0.2)
    monkeypatch.setattr(trainer_mod, "_progress", keep)
    seen = []
    real_validate = Trainer.validate

    def validate(self, progress=None):
        seen.append((self.step, bars[-1].n))
        return real_validate(self, progress)

    monkeypatch.setattr(Trainer, "validate", validate)
    _run(root, tmp_path / "run")
    assert seen == [(2, 2), (4, 4)]
