"""TxFM model: presets and parameter counts, fused vs eager ops, attention, ablation switches."""
import copy
import math

import pytest
import torch

from txfm.model import PRESETS, TxFM, TxFMConfig, preset
from txfm_kernels.masks import ObservableGenes
from txfm_kernels.sample import masked_sample

G = 300


pytestmark = pytest.mark.usefixtures("one_thread")




def _batch(b=6, g=G, k=32, seed=0, n_datasets=2, small_dataset=None, target_sum=None):
    """A MaskedSample from the eager (torch backend) sampler on random CSR rows, normalised at
    ``target_sum`` (default: the tiny preset's, as the models of these tests are)."""
    gen = torch.Generator().manual_seed(seed)
    nnz = torch.randint(5, g // 3, (b,), generator=gen)
    indptr = torch.zeros(b + 1, dtype=torch.int64)
    indptr[1:] = nnz.cumsum(0)
    idx = torch.cat([torch.randperm(g, generator=gen)[:n].sort().values for n in nnz]).int()
    counts = torch.randint(1, 30, (int(indptr[-1]),), generator=gen).float()
    mask = torch.rand(n_datasets, g, generator=gen) < 0.6
    mask[0] = True
    if small_dataset is not None:  # dataset 1 profiles fewer genes than K: padding
        mask[1] = False
        mask[1, :small_dataset] = True
    obs = ObservableGenes.from_mask(mask)
    ds = torch.arange(b) % n_datasets
    return masked_sample(indptr, idx, counts, n_genes=g, k=k, observable=obs, dataset_ids=ds,
                         seed=seed, backend="torch",
                         target_sum=target_sum or PRESETS["tiny"].target_sum)


def _tiny(**over):
    base = dict(depth=2, heads=2, dim=32, k=32, decoder_hidden=48, decoder_depth=2)
    base.update(over)
    return preset("tiny", **base)


# -- presets ---------------------------------------------------------------------------------------
PAPER_TABLE6 = {"S": (6, 6, 384, 0.1, 2048, 57e6), "B": (12, 12, 768, 0.1, 2048, 159e6),
              "L": (24, 16, 1024, 0.3, 2048, 403e6)}


@pytest.mark.parametrize("name", ["S", "B", "L"])
def test_presets_match_spec_table_and_parameter_counts(name):
    depth, heads, dim, drop, k, params = PAPER_TABLE6[name]
    cfg = preset(name)
    assert (cfg.depth, cfg.heads, cfg.dim, cfg.drop_path, cfg.k) == (depth, heads, dim, drop, k)
    assert cfg.target_sum == 1e5  # the paper's L; only tiny, for shallow screens, takes 1e4
    with torch.device("meta"):  # count without allocating 1.6 GB for L
        model = TxFM(cfg, 44_349)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.05, f"{name}: {n / 1e6:.1f}M vs paper {params / 1e6:.0f}M"
    assert model.tokenizer.codebook.shape == (44_349, dim - 1)
    assert model.decoder_gene_weights().shape == (44_349, cfg.decoder_hidden)


def test_preset_lookup_and_overrides():
    assert preset("b").name == "B" and preset("B", k=1024).k == 1024
    assert PRESETS["B"].k == 2048  # overrides never touch the preset itself
    with pytest.raises(ValueError, match="unknown preset"):
        preset("XL")
    with pytest.raises(ValueError, match="unknown fields"):
        preset("S", blocks=3)
    with pytest.raises(ValueError, match="multiple of heads"):
        TxFMConfig(dim=100, heads=3)
    with pytest.raises(ValueError, match="loss="):
        TxFMConfig(loss="l1")
    assert TxFMConfig.from_dict(preset("S").to_dict()) == preset("S")


def test_config_saved_before_token_norm_keeps_the_literal_token():
    old = preset("tiny").to_dict()
    del old["token_norm"]  # checkpoints written before the field existed
    assert TxFMConfig.from_dict(old).token_norm == "none"
    assert preset("tiny").token_norm == "split"


def test_config_saved_before_tanh_beta_keeps_the_constant_it_was_trained_with():
    old = preset("tiny").to_dict()
    del old["tanh_beta"]  # checkpoints written before the field existed used 4e at any L
    assert TxFMConfig.from_dict(old).beta == 4 * math.e
    assert TxFMConfig.from_dict(preset("tiny").to_dict()).beta == preset("tiny").beta


@pytest.mark.parametrize("target_sum", [1e3, 1e4, 1e5, 1e6])
def test_rectified_tanh_keeps_the_papers_shape_at_every_target_sum(target_sum):
    """The paper's activation is given at L = 1e5 (alpha = log(1e5 + 1), beta = 4e). At any
    other L only its ceiling moves: phi_L(z) / alpha_L = phi_1e5(s z) / alpha_1e5 with
    s = alpha_1e5 / alpha_L, and the slope at the origin stays log(1e5 + 1) / (4e)."""
    cfg = TxFMConfig(target_sum=target_sum)
    a_paper = math.log(1e5 + 1)
    z = torch.linspace(-5, 60, 131, dtype=torch.float64)

    def phi(z, alpha, beta):
        return alpha * torch.relu(torch.tanh(z / beta))

    s = a_paper / math.log(target_sum + 1)
    torch.testing.assert_close(phi(z, cfg.alpha, cfg.beta) / cfg.alpha,
                               phi(s * z, a_paper, 4 * math.e) / a_paper, rtol=1e-12, atol=1e-12)
    assert cfg.alpha / cfg.beta == pytest.approx(a_paper / (4 * math.e), rel=1e-12)
    if target_sum == 1e5:
        assert cfg.beta == 4 * math.e  # exactly the paper's constant, not within rounding
    # the literal constant stays available at any L
    assert TxFMConfig(target_sum=target_sum, tanh_beta=4 * math.e).beta == 4 * math.e


@pytest.mark.parametrize("fields, field", [
    ({"tanh_beta": -1.0}, "tanh_beta"),
    ({"tanh_beta": 1e-4}, "tanh_beta"),
    ({"tanh_beta": float("nan")}, "tanh_beta"),
    ({"target_sum": 1e-4}, "target_sum"),  # derived beta 9e-5: below the kernels' 1e-3
    ({"target_sum": 1e36}, "target_sum"),  # alpha 82.9: exp(alpha) overflows fp32
])
def test_rectified_tanh_constants_out_of_the_kernels_range_are_refused(fields, field):
    with pytest.raises(ValueError, match=f"{field}="):
        TxFMConfig(**fields)
    if field == "target_sum":  # only the fused Poisson loss has these limits
        assert TxFMConfig(activation="relu", **fields).target_sum == fields["target_sum"]
        assert TxFMConfig(target_sum=fields["target_sum"], tanh_beta=1.0,
                          loss="mse").target_sum == fields["target_sum"]


# -- fused vs eager --------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True])
def test_fused_and_eager_paths_give_same_loss_and_grads(padded):
    torch.manual_seed(0)
    sample = _batch(k=48, small_dataset=20 if padded else None)
    assert bool(sample.key_padding_mask.any()) == padded
    fused = TxFM(_tiny(k=48, use_fused_ops=True), G)
    eager = copy.deepcopy(fused).set_use_fused_ops(False)
    assert fused.loss.fused and not eager.loss.fused
    lf, le = fused(sample), eager(sample)
    lf.backward()
    le.backward()
    torch.testing.assert_close(lf, le, rtol=1e-5, atol=1e-4)
    for (name, pf), pe in zip(fused.named_parameters(), eager.parameters()):
        torch.testing.assert_close(pf.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=name)


# -- encoder ---------------------------------------------------------------------------------------
def test_padding_is_invisible_to_the_embedding():
    torch.manual_seed(0)
    model = TxFM(_tiny(), G).eval()
    s = _batch(k=32, small_dataset=10)
    pad = s.key_padding_mask
    assert pad.any()
    other_ids = torch.where(pad, torch.randint(0, G, pad.shape, dtype=torch.int32), s.gene_ids)
    other_vals = torch.where(pad, torch.rand(pad.shape) * 5, s.values)
    e1 = model.embed(s.gene_ids, s.values, pad)
    e2 = model.embed(other_ids, other_vals, pad)
    torch.testing.assert_close(e1, e2)
    # a padded row equals the same row with its padded slots removed
    row = int(pad.any(1).nonzero()[0])
    keep = ~pad[row]
    e_row = model.embed(s.gene_ids[row:row + 1, keep], s.values[row:row + 1, keep])
    torch.testing.assert_close(e1[row:row + 1], e_row, rtol=1e-5, atol=1e-5)


def test_embedding_is_invariant_to_gene_order():
    torch.manual_seed(0)
    model = TxFM(_tiny(), G).eval()
    s = _batch()
    perm = torch.randperm(s.gene_ids.shape[1])
    torch.testing.assert_close(model.embed(s.gene_ids, s.values),
                               model.embed(s.gene_ids[:, perm], s.values[:, perm]),
                               rtol=1e-5, atol=1e-5)


def test_cls_only_last_block_equals_full_block():
    torch.manual_seed(0)
    model = TxFM(_tiny(depth=3), G).eval()
    s = _batch(small_dataset=12)
    enc = model.encoder
    x = enc.tokens(s.gene_ids, s.values, s.key_padding_mask)
    mask = torch.nn.functional.pad(~s.key_padding_mask, (1, 0), value=True)[:, None, None, :]
    for blk in enc.blocks:
        x = blk(x, mask, None)  # every block on every token
    torch.testing.assert_close(enc.norm(x[:, 0]),
                               model.embed(s.gene_ids, s.values, s.key_padding_mask),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_attention_backends_agree(padded):
    torch.manual_seed(0)
    s = _batch(small_dataset=12 if padded else None)
    pad = s.key_padding_mask if padded else None
    sdpa = TxFM(_tiny(attention="sdpa"), G).eval()
    math_ = copy.deepcopy(sdpa)
    for blk in math_.encoder.blocks:
        blk.attn.backend = "math"
    torch.testing.assert_close(sdpa.embed(s.gene_ids, s.values, pad),
                               math_.embed(s.gene_ids, s.values, pad), rtol=1e-5, atol=1e-5)


def test_stochastic_depth_follows_drop_keep_and_is_off_in_eval():
    torch.manual_seed(0)
    model = TxFM(_tiny(depth=3, drop_path=0.5), G)
    s = _batch()
    b = s.gene_ids.shape[0]
    keep = torch.rand(3, b) > 0.5
    l1 = model(s, drop_keep=keep)
    l2 = model(s, drop_keep=keep)
    assert torch.equal(l1, l2)  # decisions given: deterministic
    all_kept = model(s, drop_keep=torch.ones(3, b, dtype=torch.bool))
    assert not torch.equal(l1, all_kept)
    model.eval()
    torch.testing.assert_close(model(s), model(s, drop_keep=keep))  # eval: no drop at all


# -- loss head and ablations -----------------------------------------------------------------------
def test_default_loss_is_the_spec_poisson_over_observable_genes():
    torch.manual_seed(0)
    model = TxFM(_tiny(use_fused_ops=False), G).eval()
    s = _batch()
    z = model.logits(s.gene_ids, s.values).double()
    cfg = model.config
    xh = cfg.alpha * torch.relu(torch.tanh(z / cfg.beta))
    per = torch.exp(xh) - xh * torch.exp(s.target.double())
    m = s.gene_mask.dense()
    expect = ((per * m).sum(1) / m.sum(1)).mean()
    torch.testing.assert_close(model(s).double(), expect, rtol=1e-5, atol=1e-4)
    # include_unobserved: the mean runs over every gene
    model.config.include_unobserved = True
    torch.testing.assert_close(model(s).double(), per.mean(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("loss", ["poisson", "nb", "zinb", "mse", "smoothl1"])
@pytest.mark.parametrize("activation", ["rectified_tanh", "relu", "clamped_relu", "softmax"])
def test_every_loss_and_activation_trains(loss, activation):
    torch.manual_seed(0)
    model = TxFM(_tiny(loss=loss, activation=activation, decoder_depth=0), G)
    s = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        out = model(s)
        assert torch.isfinite(out)
        out.backward()
        opt.step()
        losses.append(out.item())
    assert losses[-1] < losses[0], (loss, activation, losses[0], losses[-1])


def test_nb_and_zinb_match_scipy_likelihoods():
    scipy_stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(0)
    s = _batch(b=3, g=40, k=8, n_datasets=1)
    for loss in ("nb", "zinb"):
        model = TxFM(_tiny(loss=loss, k=8, use_fused_ops=False), 40).eval()
        with torch.no_grad():
            model.loss.log_theta.uniform_(-1, 1)
            if loss == "zinb":
                model.loss.pi_logit.uniform_(-2, 0)
            z = model.logits(s.gene_ids, s.values)
            xh = model.loss.predict(z).double()
            size = (s.library_size.double() / model.config.target_sum)[:, None]
            c = (size * torch.expm1(s.target.double())).round()
            mu = size * torch.expm1(xh) + 1e-8
            theta = torch.exp(model.loss.log_theta.double())[None].expand_as(mu)
            logp = torch.from_numpy(scipy_stats.nbinom.logpmf(
                c.numpy(), theta.numpy(), (theta / (theta + mu)).numpy()))
            if loss == "zinb":
                pi = torch.sigmoid(model.loss.pi_logit.double())[None]
                logp = torch.where(c == 0, torch.log(pi + (1 - pi) * torch.exp(logp)),
                                   torch.log(1 - pi) + logp)
            expect = (-logp).mean()
            torch.testing.assert_close(model(s).double(), expect, rtol=1e-3, atol=1e-3)


def test_nb_needs_library_size():
    model = TxFM(_tiny(loss="nb"), G)
    s = _batch()
    with pytest.raises(ValueError, match="library_size"):
        model(s, library_size=None)


def test_decoder_depth_zero_is_linear_and_shapes():
    model = TxFM(_tiny(decoder_depth=0), G)
    assert model.decoder_gene_weights().shape == (G, 32)
    assert len(model.decoder.layers) == 0 and model.decoder.fc_in is None
    deep = TxFM(_tiny(decoder_depth=4, decoder_hidden=40), G)
    assert deep.decoder_gene_weights().shape == (G, 40) and len(deep.decoder.layers) == 3
    s = _batch()
    assert deep.embed(s.gene_ids, s.values).shape == (s.gene_ids.shape[0], 32)
    assert deep.predict(s.gene_ids, s.values).shape == (s.gene_ids.shape[0], G)


def test_forward_accepts_tensors_and_rejects_missing_target():
    model = TxFM(_tiny(), G)
    s = _batch()
    by_fields = model(gene_ids=s.gene_ids, values=s.values, key_padding_mask=s.key_padding_mask,
                      target=s.target, gene_mask=s.gene_mask, library_size=s.library_size)
    model.eval()
    torch.testing.assert_close(model(s), model(**s._asdict()))
    assert torch.isfinite(by_fields)
    with pytest.raises(ValueError, match="target"):
        model(gene_ids=s.gene_ids, values=s.values)
    with pytest.raises(TypeError, match="TxFMConfig"):
        TxFM({"dim": 8}, G)


@pytest.mark.gpu
def test_gpu_bf16_fused_matches_eager():
    torch.manual_seed(0)
    s = _batch(b=16, k=64, small_dataset=30)
    s = type(s)(*(t.cuda() if torch.is_tensor(t) else t for t in s))
    s = s._replace(gene_mask=type(s.gene_mask)(*(t.cuda() for t in s.gene_mask)))
    fused = TxFM(_tiny(k=64, use_fused_ops=True), G).cuda()
    eager = copy.deepcopy(fused).set_use_fused_ops(False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lf, le = fused(s), eager(s)
    lf.backward()
    le.backward()
    torch.testing.assert_close(lf, le, rtol=2e-2, atol=2e-2)
    for pf, pe in zip(fused.parameters(), eager.parameters()):
        torch.testing.assert_close(pf.grad, pe.grad, rtol=5e-2, atol=5e-3)
