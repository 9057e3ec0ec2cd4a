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


def _constant_optimum(x, mask, loss, alpha):
    """Independent ``[G]`` optimum of a constant prediction per gene over the cells that profile
    it (``x [cells, G]`` float64 targets, ``mask`` the same shape), kept in ``[0.01, alpha)``
    as :func:`txfm.model.losses.optimal_logits` keeps it: ``mean(x)`` for MSE, else
    ``log(mean(exp(x)))``."""
    n = np.maximum(mask.sum(0), 1)
    if loss == "mse":
        want = (x * mask).sum(0) / n
    else:
        want = np.log((np.exp(x) * mask).sum(0) / n)
    return np.clip(want, 0.01, alpha * 0.999)


@pytest.mark.parametrize("target_sum", [1e5, 1e4])
@pytest.mark.parametrize("loss,activation", [("poisson", "rectified_tanh"), ("poisson", "relu"),
                                             ("mse", "rectified_tanh"), ("poisson", "softmax")])
def test_output_bias_starts_at_each_genes_optimum(loss, activation, target_sum):
    source = RandomCSRSource(n_cells=256, n_genes=60, batch_size=64, n_datasets=2,
                             observed_fraction=0.7, shuffle=False)
    config = preset("tiny", dim=16, depth=1, heads=2, decoder_hidden=16, k=16, loss=loss,
                    activation=activation, target_sum=target_sum)
    stats = accumulate(source, max_cells=10_000, target_sum=target_sum)
    x, mask = _dense_targets(source, config.target_sum)
    assert np.array_equal(stats.n_cells, mask.sum(0))
    want = _constant_optimum(x, mask, loss, config.alpha)
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


def _small_shards(tmp_path):
    """A converted synthetic corpus of 300 cells (270 training cells) at ``tmp_path/shards``:
    its manifest, raw counts [cells, genes] (CSR) and obs, read back independently."""
    pytest.importorskip("anndata")
    pytest.importorskip("zarr")
    from tests._shards import read_shards
    from txfm.data.convert import convert
    from txfm.data.synth import generate

    res = generate(tmp_path / "raw", cells=300, genes=80, perturbations=4, batches=2, seed=3)
    convert(res.datasets, tmp_path / "shards", min_cells=1, min_genes=1, val_fraction=0.1,
            progress=False)
    return read_shards(tmp_path / "shards")


def test_converter_keeps_the_gene_statistics(tmp_path):
    """The manifest's sums equal an independent float64 computation over the training cells."""
    manifest, x, obs = _small_shards(tmp_path)
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
    """On this random corpus (cell types of planted programs) the default "split" token learns to
    use its CLS within 150 steps and the literal token does not; the diagnostics say which is
    which, and cutting the learning model's decoder from its CLS is flagged too."""
    learning = _train_random(tmp_path, "split")
    learned = dict(learning.diagnostics)
    assert learned["cls_gain"] > 0.05, learned
    assert learned["erank"] > 1.5, learned
    assert 0.0 < learned["masked_r2"] < 1.0, learned
    assert not is_collapsed(learned)
    rows = [r for r in _rows(tmp_path / "split") if r.get("cls_gain") is not None]
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


@pytest.mark.parametrize("token_norm", ["split", "none", "rms"])
def test_token_value_survives_layernorm(token_norm):
    """The encoder's first operation is a LayerNorm. What a cell's pooled tokens can say about
    its programs depends on what survives it: "split" keeps the identity and turns each gene
    in its own direction as its value grows; the literal token loses the value (and the
    identity); "rms" moves every gene along one shared direction."""
    torch.manual_seed(0)
    model = TxFM(preset("tiny", token_norm=token_norm), 20)
    ln = torch.nn.LayerNorm(model.config.dim, elementwise_affine=False)
    ids, vals = torch.tensor([[3, 3, 7, 7]]), torch.tensor([[3.0, 9.0, 3.0, 9.0]])
    with torch.no_grad():
        t = ln(model.encoder.tokens(ids, vals))[0, 1:]
    cos = torch.nn.functional.cosine_similarity
    value_cos = cos(t[0], t[1], dim=0)  # gene 3 at x = 3 vs 9
    gene_cos = cos(t[1], t[3], dim=0)  # genes 3 and 7 at x = 9
    shared = cos(t[1] - t[0], t[3] - t[2], dim=0)  # does the value move both genes alike?
    if token_norm == "split":
        assert value_cos < 0.95 and gene_cos < 0.5 and shared < 0.5, (value_cos, gene_cos, shared)
    elif token_norm == "none":
        assert value_cos > 0.99 and gene_cos > 0.99, (value_cos, gene_cos)
    else:
        assert gene_cos < 0.5 and shared > 0.6, (gene_cos, shared)


def test_split_tokens_layout():
    """``[Ê_lo ; (x / SPLIT_VALUE_SCALE) Ê_hi ; x]`` with ``Ê`` the RMS-normalised codebook row;
    the CLS token is untouched and padded genes are zero."""
    from txfm.model.encoder import SPLIT_VALUE_SCALE

    model = TxFM(preset("tiny", dim=16, heads=2, decoder_hidden=8), 10)
    ids, vals = torch.tensor([[2, 5, 0]]), torch.tensor([[0.0, 6.0, 0.0]])
    pad = torch.tensor([[False, False, True]])
    with torch.no_grad():
        t = model.encoder.tokens(ids, vals, pad)[0].double()
        e = model.encoder.tokenizer.codebook.double()
    # F.rms_norm's default eps (float32's) is in the reference: E starts at std 0.02
    e = e / (e.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps).sqrt()
    h = 15 // 2
    torch.testing.assert_close(t[0], model.encoder.tokenizer.cls.double().detach())
    zero = torch.zeros(1, dtype=e.dtype)
    torch.testing.assert_close(t[1], torch.cat([e[2, :h], 0 * e[2, h:], zero]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t[2], torch.cat([e[5, :h], 6.0 / SPLIT_VALUE_SCALE * e[5, h:],
                                                torch.full((1,), 6.0, dtype=e.dtype)]),
                               rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(t[3]) == 0


def _rows(run_dir):
    from txfm.train.metrics import read_metrics

    return read_metrics(run_dir / "metrics.csv")


def test_mean_log1p_values_are_not_taken_at_another_target_sum():
    """The mean of log1p(L c / S) does not rescale with L: stats kept at 1e5 refuse 1e4."""
    s = GeneStats(np.array([2]), np.array([0.5]), np.array([np.log1p(1e5 * 0.5) * 2]))
    np.testing.assert_allclose(s.mean_target(1e5), [np.log1p(5e4)])
    with pytest.raises(ValueError, match="target_sum 100000, not 10000"):
        s.mean_target(1e4)
    with pytest.raises(ValueError, match="target_sum"):
        optimal_logits(s, preset("tiny", loss="mse", target_sum=1e4))


@pytest.mark.parametrize("loss", ["mse", "poisson"])
def test_trainer_starts_the_bias_at_its_own_target_sums_optimum(tmp_path, loss):
    """Shards whose manifest keeps mean log1p values at 1e5, a model at 1e4: the starting bias
    and the diagnostics' per-gene-mean predictor are the optimum at 1e4, computed here
    independently from the shards' counts."""
    manifest, x, obs = _small_shards(tmp_path)
    assert manifest.gene_stats.target_sum == 1e5
    config = preset("tiny", dim=16, depth=1, heads=2, decoder_hidden=16, k=16, loss=loss,
                    target_sum=1e4)
    cfg = TrainConfig.for_preset("tiny", data=str(tmp_path / "shards"), out=str(tmp_path / "run"),
                                 steps=1, batch_size=18, progress=False)  # 270 = 15 x 18
    tr = Trainer(cfg, config)
    train = np.array([s.split == "train" for s in manifest.shards for _ in range(s.n_cells)])
    assert train.sum() == 270  # the trainer's pass (full batches only) sees every cell
    xt = np.asarray(x[train].todense(), np.float64)
    t = np.log1p(1e4 * xt / xt.sum(1, keepdims=True))
    dsid = obs["dataset"].astype(str).to_numpy()[train]
    names = [d.name for d in manifest.datasets]
    mask = manifest.observable().mask.numpy()[[names.index(d) for d in dsid]]
    live = mask.sum(0) > 0
    want = _constant_optimum(t, mask, loss, config.alpha)
    for z in (tr.model.decoder.head.bias.detach(), tr._mean_logits):
        got = tr.model.loss.predict(z[None].float().cpu())[0].double().numpy()
        np.testing.assert_allclose(got[live], want[live], rtol=2e-4, atol=1e-5)


def test_gene_stats_json_round_trip():
    s = GeneStats(np.array([3, 0]), np.array([0.5, 0.0]), np.array([1.0, 0.0]))
    t = GeneStats.from_json(s.to_json())
    assert np.array_equal(t.n_cells, s.n_cells) and np.allclose(t.frac_sum, s.frac_sum)
    assert GeneStats.from_json({}) is None
    np.testing.assert_allclose(s.mean_exp_target(1e5), [1 + 1e5 * 0.5 / 3, 1.0])


def test_learning_command_rejects_unknown_variant(capsys):
    from txfm.eval.learning import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--variants", "mse,bogus", "--root", "/nonexistent"])
    assert exit_info.value.code == 2
    assert "error: --variants: unknown ['bogus']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--variants", "mse,mse", "--root", "/nonexistent"])
    assert exit_info.value.code == 2
    assert "mse is named twice" in capsys.readouterr().err
