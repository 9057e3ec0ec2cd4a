"""Learning: per-gene statistics, the decoder's starting point, and the diagnostics that tell a
learning model from a collapsed one (docs/learning.md)."""
import math

import numpy as np
import pytest
import torch

from txfm.data.stats import GeneStats, accumulate
from txfm.model import TxFM, preset
from txfm.model.losses import inverse_activation, optimal_logits
from txfm.train import TrainConfig
from txfm.train.diagnostics import effective_rank, is_collapsed
from txfm.train.synthetic import RandomCSRSource
from txfm.train.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")


def _dense_targets(source, target_sum):
    """float64 ``x = log1p(L c / S)`` ``[cells, G]`` and the observable mask, independently of
    txfm's samplers (scipy-free: plain numpy on the CSR arrays)."""
    xs, masks = [], []
    obs = source.observable.mask.numpy()
    source.set_epoch(0)
    for b in source:
        indptr, idx, cnt = b.indptr.numpy(), b.indices.numpy(), b.counts.numpy().astype(np.float64)
        dense = np.zeros((len(indptr) - 1, source.n_genes))
        for r in range(len(indptr) - 1):
            dense[r, idx[indptr[r]:indptr[r + 1]]] = cnt[indptr[r]:indptr[r + 1]]
        s = dense.sum(1, keepdims=True)
        xs.append(np.log1p(target_sum * dense / np.where(s > 0, s, 1)))
        masks.append(obs[b.dataset_ids.numpy()])
    return np.concatenate(xs), np.concatenate(masks)


@pytest.mark.parametrize("loss,activation", [("poisson", "rectified_tanh"), ("poisson", "relu"),
                                             ("mse", "rectified_tanh"), ("poisson", "softmax")])
def test_output_bias_starts_at_each_genes_optimum(loss, activation):
    source = RandomCSRSource(n_cells=256, n_genes=60, batch_size=64, n_datasets=2,
                             observed_fraction=0.7, shuffle=False)
    config = preset("tiny", dim=16, depth=1, heads=2, decoder_hidden=16, k=16, loss=loss,
                    activation=activation)
    stats = accumulate(source, max_cells=10_000)
    x, mask = _dense_targets(source, config.target_sum)
    assert np.array_equal(stats.n_cells, mask.sum(0))
    # independent optimum of a constant prediction per gene, over the cells that profile it
    n = np.maximum(mask.sum(0), 1)
    if loss == "mse":
        want = (x * mask).sum(0) / n
    else:
        want = np.log((np.exp(x) * mask).sum(0) / n)
    want = np.clip(want, 0.01, config.alpha * 0.999)
    model = TxFM(config, 60).init_output_bias(stats)
    bias = model.decoder.head.bias.detach().double()
    got = model.loss.predict(bias[None].float())[0].double().numpy()
    if activation == "softmax":  # a composition: compare up to the softmax's normalisation
        got, want = np.expm1(got) / np.expm1(got).sum(), np.expm1(want) / np.expm1(want).sum()
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)


def test_bias_is_a_stationary_point_of_the_poisson_loss():
    """At the initial bias, d(loss)/d(bias) of the eager fp64 Poisson loss is ~0 per gene."""
    source = RandomCSRSource(n_cells=128, n_genes=40, batch_size=64, shuffle=False)
    config = preset("tiny", dim=16, depth=1, heads=2, decoder_hidden=16, k=16)
    stats = accumulate(source)
    x, mask = _dense_targets(source, config.target_sum)
    z = optimal_logits(stats, config).double().requires_grad_()
    xh = config.alpha * torch.relu(torch.tanh(z / config.beta))
    t = torch.as_tensor(x)
    per = (torch.exp(xh) - xh * torch.exp(t)) * torch.as_tensor(mask)
    per.sum().backward()
    live = torch.as_tensor(np.log(stats.mean_exp_target(config.target_sum)) > 0.01)
    scale = torch.as_tensor((np.exp(x) * mask).sum(0))
    assert (z.grad[live].abs() / scale[live]).max() < 1e-6


def test_converter_keeps_the_gene_statistics(tmp_path):
    """The manifest's sums equal an independent float64 computation over the training cells."""
    pytest.importorskip("anndata")
    pytest.importorskip("zarr")
    from tests._shards import read_shards
    from txfm.data.convert import convert
    from txfm.data.synth import generate

    res = generate(tmp_path / "raw", cells=300, genes=80, perturbations=4, batches=2, seed=3)
    convert(res.datasets, tmp_path / "shards", min_cells=1, min_genes=1, val_fraction=0.1,
            progress=False)
    manifest, x, obs = read_shards(tmp_path / "shards")
    stats = manifest.gene_stats
    train = np.array([s.split == "train" for s in manifest.shards for _ in range(s.n_cells)])
    xt = x[train].astype(np.float64)
    frac = np.asarray(xt.multiply(1.0 / np.asarray(xt.sum(1))).sum(0)).ravel()
    np.testing.assert_allclose(stats.frac_sum, frac, rtol=1e-9)
    dsid = obs["dataset"].astype(str).to_numpy()[train]
    observable = manifest.observable().mask.numpy()
    names = [d.name for d in manifest.datasets]
    want_cells = sum(observable[i].astype(np.int64) * int((dsid == n).sum())
                     for i, n in enumerate(names))
    np.testing.assert_array_equal(stats.n_cells, want_cells)
    loader_stats = accumulate(_loader(tmp_path / "shards"), max_cells=10**9)
    np.testing.assert_allclose(loader_stats.frac_sum, stats.frac_sum, rtol=1e-9)
    np.testing.assert_array_equal(loader_stats.n_cells, stats.n_cells)


def _loader(path):
    from txfm.data import ShardLoader

    loader = ShardLoader(path, 64, split="train", shuffle=False, drop_last=False)
    loader.set_epoch(0)
    return loader


def test_inverse_activation_round_trips():
    config = preset("tiny")
    x = torch.linspace(0.0, config.alpha * 0.99, 50)
    for act in ("rectified_tanh", "relu", "clamped_relu"):
        c = config.replace(activation=act)
        z = inverse_activation(x, c)
        model = TxFM(c.replace(dim=16, heads=2, decoder_hidden=8), 50)
        np.testing.assert_allclose(model.loss.predict(z[None])[0], x, rtol=1e-4, atol=1e-4)


def test_effective_rank():
    g = torch.Generator().manual_seed(0)
    line = torch.randn(500, 1, generator=g) * torch.randn(1, 32, generator=g)
    iso = torch.randn(500, 32, generator=g)
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(iso) > 25


def _train_random(tmp_path, token_norm):
    cfg = TrainConfig.for_preset("tiny", data="random:cells=2048,genes=120,types=8",
                                 out=str(tmp_path / token_norm), steps=150, batch_size=32,
                                 val_every=150, val_batches=8, ckpt_every=None, progress=False,
                                 plot=False, tensorboard=False)
    trainer = Trainer(cfg, preset("tiny", dim=32, depth=2, heads=2, decoder_hidden=64, k=48,
                                  token_norm=token_norm))
    trainer.fit()
    return trainer


def test_diagnostics_tell_learning_from_collapse(tmp_path):
    """On this random corpus (cell types of planted programs) the RMS-scaled token learns to use
    its CLS within 150 steps and the literal token does not; the diagnostics say which is which,
    and cutting the learning model's decoder from its CLS is flagged too."""
    learning = _train_random(tmp_path, "rms")
    learned = dict(learning.diagnostics)
    assert learned["cls_gain"] > 0.05, learned
    assert learned["erank"] > 1.5, learned
    assert 0.0 < learned["masked_r2"] < 1.0, learned
    assert not is_collapsed(learned)
    rows = [r for r in _rows(tmp_path / "rms") if r.get("cls_gain") is not None]
    assert rows and math.isclose(rows[-1]["cls_gain"], learned["cls_gain"], rel_tol=1e-6)
    assert rows[-1]["collapsed"] == 0

    collapsed = _train_random(tmp_path, "none")
    flat = collapsed.diagnostics
    assert flat["cls_gain"] < 0.01 < learned["cls_gain"], (flat, learned)
    assert is_collapsed(flat)
    assert [r for r in _rows(tmp_path / "none") if r.get("collapsed") is not None][-1]["collapsed"] == 1

    with torch.no_grad():
        learning.model.decoder.fc_in.weight.zero_()  # the decoder no longer sees the cell
    learning.validate()
    cut = learning.diagnostics
    assert abs(cut["cls_gain"]) < 1e-6, cut
    assert is_collapsed(cut)


def _rows(run_dir):
    from txfm.train.metrics import read_metrics

    return read_metrics(run_dir / "metrics.csv")


def test_gene_stats_json_round_trip():
    s = GeneStats(np.array([3, 0]), np.array([0.5, 0.0]), np.array([1.0, 0.0]))
    t = GeneStats.from_json(s.to_json())
    assert np.array_equal(t.n_cells, s.n_cells) and np.allclose(t.frac_sum, s.frac_sum)
    assert GeneStats.from_json({}) is None
    np.testing.assert_allclose(s.mean_exp_target(1e5), [1 + 1e5 * 0.5 / 3, 1.0])
