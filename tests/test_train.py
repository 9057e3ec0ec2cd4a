"""The trainer: the loss falls, DDP == one process, SIGKILL + --resume is exact, checkpoints."""
import argparse
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from _launch import finish, rank_pid, start_torchrun, torchrun
from txfm.cli import UsageError
from txfm.data import Manifest
from txfm.model import TxFM, preset
from txfm.train import CheckpointError, TrainConfig, latest_checkpoint, load_checkpoint, train
from txfm.train.checkpoint import list_checkpoints, read_checkpoint
from txfm.train.cli import build_configs, register
from txfm.train.flops import forward_flops, train_flops_per_sample
from txfm.train.metrics import read_metrics
from txfm.train.synthetic import RandomCSRSource

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = "random:cells=512,genes=300"
SMALL = ["--set", "dim=32", "--set", "depth=2", "--set", "heads=2", "--set", "decoder_hidden=64",
         "--k", "32"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _small_model(**over):
    base = dict(dim=32, depth=2, heads=2, decoder_hidden=64, k=32)
    base.update(over)
    return preset("tiny", **base)


def _cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "txfm.cli", "train", "--no-progress", "--no-plot", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _run_cli(args, timeout=240):
    proc = _cli(args)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _losses(run_dir):
    return {r["step"]: r["train_loss"] for r in read_metrics(pathlib.Path(run_dir) / "metrics.csv")
            if r["train_loss"] is not None}


# -- learning ------------------------------------------------------------------------------------
def test_loss_falls_within_a_few_hundred_steps(tmp_path):
    # from one constant logit for every gene (init_bias=False): the per-gene levels must be
    # learnt too; tests/test_learning.py covers the data-initialised start
    cfg = TrainConfig.for_preset("tiny", data="random:cells=1024,genes=400", out=str(tmp_path),
                                 steps=150, batch_size=32, log_every=10, val_every=50,
                                 ckpt_every=None, progress=False, init_bias=False)
    result = train(cfg, _small_model(k=48))
    train_losses, val_losses = result.train_losses, result.val_losses
    assert len(train_losses) == 15 and len(val_losses) == 3
    first, last = train_losses[0], train_losses[-1]
    # Poisson NLL without log(y!) is negative; improving means falling by a clear margin
    assert last < first - 0.2 * abs(first), train_losses
    assert val_losses[-1] < val_losses[0], val_losses
    assert result.plot is not None and result.plot.stat().st_size > 1000
    assert result.checkpoint == list_checkpoints(tmp_path)[-1]


def test_schedule_and_weight_decay_follow_the_recipe(tmp_path):
    from txfm.train.trainer import Trainer

    cfg = TrainConfig.for_preset("tiny", data=DATA, out=str(tmp_path), steps=50, batch_size=16,
                                 progress=False)
    tr = Trainer(cfg, _small_model())
    assert tr.weight_decay == pytest.approx(1.0 / (1e-3 * 50))
    groups = tr.optimizer.param_groups
    assert groups[0]["weight_decay"] == pytest.approx(tr.weight_decay)
    assert groups[1]["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in groups[0]["params"])
    assert groups[0]["betas"] == (0.9, 0.999) and groups[0]["eps"] == 1e-6
    lrs = []
    for _ in range(50):
        lrs.append(tr.scheduler.get_last_lr()[0])
        tr.optimizer.step()
        tr.scheduler.step()
    peak = max(range(50), key=lambda i: lrs[i])
    assert peak == 4 and lrs[peak] == pytest.approx(1e-3)  # 10% warm-up, then cosine down
    assert lrs[0] == pytest.approx(1e-3 / 25)
    assert lrs[-1] < 1e-5


# -- distributed -----------------------------------------------------------------------------------
def test_two_process_gloo_ddp_matches_one_process(tmp_path):
    common = ["--data", DATA, "--batch-size", "16", "--steps", "6", "--log-every", "1",
              "--val-every", "3", "--ckpt-every", "6", "--set", "drop_path=0.3", *SMALL]
    _run_cli([*common, "--out", str(tmp_path / "one"), "--accum", "2"])
    status, out = torchrun(["-m", "txfm.cli", "train", "--no-progress", "--no-plot", *common,
                            "--out", str(tmp_path / "two")], cwd=ROOT)
    assert status == 0, out
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, one, two)
    # validation: the same cells and draws on one rank and on two, diagnostics over both ranks
    for col in ("val_loss", "masked_r2", "cls_gain", "erank"):
        va = [r[col] for r in read_metrics(tmp_path / "one" / "metrics.csv") if r["val_loss"]]
        vb = [r[col] for r in read_metrics(tmp_path / "two" / "metrics.csv") if r["val_loss"]]
        assert len(va) == 2 and None not in va and va == pytest.approx(vb, rel=1e-4), col
    ma, mb = (read_checkpoint(list_checkpoints(tmp_path / n)[-1])["model"] for n in ("one", "two"))
    for name in ma:
        torch.testing.assert_close(ma[name], mb[name], rtol=1e-3, atol=1e-5, msg=name)


_VALIDATE = """
import json, sys
from txfm.model import preset
from txfm.train import TrainConfig
from txfm.train.trainer import Trainer
data, out, dest = sys.argv[1:4]
cfg = TrainConfig.for_preset("tiny", data=data, out=out, steps=6, batch_size=34,
                             accum=int(sys.argv[4]), val_batches=8, resume=True, progress=False,
                             plot=False)
tr = Trainer(cfg, preset("tiny", dim=32, depth=2, heads=2, decoder_hidden=64, k=32))
loss = tr.validate()
if tr.dist.is_main:
    json.dump(dict(tr.diagnostics, val_loss=loss), open(dest, "w"))
"""


def test_validation_of_shards_does_not_depend_on_the_number_of_ranks(tmp_path, tmp_path_factory):
    # The shard loader gives each rank a contiguous part of a split; validation must still
    # cover the same cells (every rank reads the split whole and takes every other batch) and
    # the diagnostics all ranks' cells: one checkpoint, validated by one process and by two.
    from _shards import synthetic_shards

    shards = synthetic_shards(tmp_path_factory, cells=600, genes=120, perturbations=4, seed=5,
                              shard_cells=128, convert_seed=0, val_fraction=0.2)
    run = tmp_path / "run"
    # micro-batches of 17: the split's last batch has one cell, on the other rank than the
    # batch its CLS is swapped with
    n_val = Manifest.load(shards).n_split_cells("val")
    assert n_val % 17 == 1 and n_val // 17 + 1 <= 8
    _run_cli(["--data", str(shards), "--batch-size", "34", "--steps", "6", "--accum", "2",
              "--val-every", "0", "--val-batches", "8", *SMALL, "--out", str(run)])
    script = tmp_path / "validate.py"
    script.write_text(_VALIDATE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, str(script), str(shards), str(run),
                          str(tmp_path / "one.json"), "2"], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=300)
    assert one.returncode == 0, one.stderr
    status, out = torchrun([str(script), str(shards), str(run), str(tmp_path / "two.json"), "1"],
                           cwd=ROOT)
    assert status == 0, out
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["cells"] == b["cells"] == n_val
    for key in ("val_loss", "masked_r2", "cls_gain", "erank"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key


# -- checkpoints and resume ------------------------------------------------------------------------
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_after_a_checkpoint_of_its_last_step(tmp_path, sig, code):
    """A scheduler's SIGTERM (or Ctrl-C) threw away every step since the last checkpoint (500
    for tiny by default): the step under way now finishes and is saved, then the run stops
    with the signal's status, and --resume continues as if nothing happened (a fresh user's
    find)."""
    common = ["--data", DATA, "--batch-size", "16", "--steps", "60", "--log-every", "1",
              "--val-every", "0", "--ckpt-every", "0", *SMALL]
    run = tmp_path / "run"
    # Python takes Ctrl-C only where it starts with SIGINT at its default; a test run in the
    # background (nohup, CI) hands its children an ignored SIGINT
    proc = _cli([*common, "--out", str(run)],
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a row being written
            if (run / "metrics.csv").exists() and max(_losses(run), default=0) >= 5:
                break
        time.sleep(0.01)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    assert f"{signal.Signals(sig).name}: stopping after this step" in out and "Traceback" not in out
    saved = sorted((run / "checkpoints").glob("step_*.pt"))
    last = max(_losses(run))
    assert len(saved) == 1 and saved[0].name == f"step_{last:08d}.pt" and last < 60, (saved, last)
    if sig == signal.SIGTERM:  # the resumed run is the uninterrupted one, bit for bit
        full = tmp_path / "full"
        _run_cli([*common, "--out", str(full)])
        out = _run_cli([*common, "--out", str(run), "--resume"])
        assert f"(step {last})" in out
        a, b = _losses(full), _losses(run)
        assert sorted(a) == sorted(b) == list(range(1, 61))
        assert [a[s] for s in a] == [b[s] for s in a]


def test_under_torchrun_a_signal_stops_every_rank_at_one_step_after_a_checkpoint(tmp_path):
    """Under torchrun a scheduler's SIGTERM stopped each rank at once, losing every step since
    the last checkpoint. The ranks now agree at the next metrics row and stop one step later
    with a checkpoint, whether the launcher got the signal (and passed it on to every rank) or
    one non-main rank alone; --resume then ends where the uninterrupted run does, bit for
    bit."""
    log_every, steps = 4, 600
    common = ["-m", "txfm.cli", "train", "--no-progress", "--no-plot", "--data", DATA,
              "--batch-size", "16", "--steps", str(steps), "--log-every", str(log_every),
              "--val-every", "0", "--ckpt-every", "0", *SMALL]
    status, out = torchrun([*common, "--out", str(tmp_path / "full")], cwd=ROOT)
    assert status == 0, out
    full = _losses(tmp_path / "full")
    for who in ("torchrun", "rank 1"):
        run = tmp_path / who.replace(" ", "")
        proc = start_torchrun([*common, "--out", str(run)], cwd=ROOT)
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None and time.time() < deadline, finish(proc, 60, who)[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a row being written
                if (run / "metrics.csv").exists() and max(_losses(run), default=0) >= 20:
                    break
            time.sleep(0.01)
        os.kill(proc.pid if who == "torchrun" else rank_pid(proc, 1), signal.SIGTERM)
        out, _ = finish(proc, 120, who)
        saved = sorted((run / "checkpoints").glob("step_*.pt"))
        last = max(_losses(run))
        assert len(saved) == 1 and saved[0].name == f"step_{last:08d}.pt", (who, saved, out)
        assert last < steps and last % log_every == 1, (who, last, out)  # a row, then one step
        assert f"every rank stops after step {last} (SIGTERM)" in out, out
        assert "txfm/train" not in out, out  # no rank's traceback
        status, out = torchrun([*common, "--out", str(run), "--resume"], cwd=ROOT)
        assert status == 0 and f"(step {last})" in out, out
        losses = _losses(run)
        # the row after the stop averages only the steps since it; every other row is the same
        same = [s for s in full if s < last or s > last + log_every]
        assert [losses[s] for s in same] == [full[s] for s in same], who
        a, b = (read_checkpoint(p / "checkpoints" / f"step_{steps:08d}.pt")["model"]
                for p in (tmp_path / "full", run))
        assert all(torch.equal(a[k], b[k]) for k in a), who


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    # 512 cells / 16 = 32 steps per epoch: the kill lands at the epoch boundary (step 32) or
    # just after it, so the resumed run crosses into a new epoch from a saved position.
    common = ["--data", DATA, "--batch-size", "16", "--steps", "60", "--log-every", "1",
              "--val-every", "20", "--ckpt-every", "16", "--set", "drop_path=0.2", *SMALL]
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run_cli([*common, "--out", str(full)])
    proc = _cli([*common, "--out", str(killed)])
    deadline = time.time() + 180
    while not (killed / "checkpoints" / "step_00000032.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    steps_done = max(_losses(killed))
    assert steps_done < 60, "the run ended before it could be killed: make it longer"
    out = _run_cli([*common, "--out", str(killed), "--resume"])
    resumed_from = int(out.split("(step ")[1].split(")")[0])
    assert resumed_from in (32, 48)
    a, b = _losses(full), _losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 61))
    assert [a[s] for s in a] == [b[s] for s in a]  # bit for bit
    va = [r["val_loss"] for r in read_metrics(full / "metrics.csv") if r["val_loss"]]
    vb = [r["val_loss"] for r in read_metrics(killed / "metrics.csv") if r["val_loss"]]
    assert va == vb
    for run in (full, killed):  # step 32 ends epoch 0, in the resumed run too
        epochs = {int(r["step"]): int(r["epoch"]) for r in read_metrics(run / "metrics.csv")}
        assert [epochs[s] for s in range(1, 61)] == [0] * 32 + [1] * 28


def test_a_metrics_row_carries_the_learning_rate_its_step_ran_at(tmp_path):
    from txfm.train.schedule import one_cycle_lr

    cfg = TrainConfig.for_preset("tiny", data=DATA, out=str(tmp_path), steps=12, batch_size=16,
                                 log_every=1, ckpt_every=None, val_every=None, progress=False,
                                 plot=False)
    train(cfg, _small_model())
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.csv")]
    assert lrs == pytest.approx([one_cycle_lr(i, 12, cfg.warmup, cfg.lr) for i in range(12)])
    # "\n" line ends, as pandas writes them: "\r\n" left a "\r" on the last column for cut/awk
    assert b"\r" not in (tmp_path / "metrics.csv").read_bytes()


def test_grad_norm_is_logged_with_and_without_clipping(tmp_path):
    """``grad_norm`` is the norm before clipping, and a run with clipping off (``--grad-clip
    0``; the paper names no clipping) logs it too: there it is the first sign of trouble.
    Step 1's gradients are the same either way, so both runs log the same first norm."""
    norms = {}
    for clip in (1.0, None):
        cfg = TrainConfig.for_preset("tiny", data=DATA, out=str(tmp_path / str(clip)), steps=3,
                                     batch_size=16, log_every=1, ckpt_every=None, val_every=None,
                                     progress=False, plot=False, grad_clip=clip)
        train(cfg, _small_model())
        norms[clip] = [r["grad_norm"] for r in read_metrics(tmp_path / str(clip) / "metrics.csv")]
        assert len(norms[clip]) == 3 and all(math.isfinite(n) and n > 0 for n in norms[clip])
    assert norms[None][0] == pytest.approx(norms[1.0][0], rel=1e-6)


def test_a_diverged_run_stops_with_one_error_before_saving(tmp_path, capsys):
    """A NaN loss ends the run at the row that shows it: an error line (exit 2), the rows so
    far in metrics.csv, no checkpoint of NaN weights, and no traceback from the validation's
    diagnostics of NaN embeddings."""
    from txfm.cli import main

    out = tmp_path / "run"
    status = main(["train", "--data", DATA, *SMALL, "--batch-size", "16", "--steps", "40",
                   "--lr", "1e6", "--grad-clip", "0", "--val-every", "10", "--log-every", "5",
                   "--ckpt-every", "10", "--out", str(out), "--no-progress", "--no-plot"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status == 2 and len(errors) == 1, err
    assert "the run diverged" in errors[0] and "--lr" in errors[0] and "Traceback" not in err
    rows = read_metrics(out / "metrics.csv")
    assert rows and not math.isfinite(rows[-1]["train_loss"])
    assert all(math.isfinite(r["train_loss"]) for r in rows[:-1])
    saved = [int(p.stem.split("_")[1]) for p in list_checkpoints(out)]
    assert all(s < rows[-1]["step"] for s in saved)
    from txfm.train.diagnostics import effective_rank
    assert math.isnan(effective_rank(torch.full((20, 4), float("nan"))))


def test_a_metrics_row_carries_the_epoch_of_its_own_step(tmp_path):
    # 512 random cells / 16 = 32 steps per epoch. Step 32 trains on epoch 0's last batch while
    # the next step's batch, the first of epoch 1, is already fetched when its row is written.
    cfg = TrainConfig.for_preset("tiny", data=DATA, out=str(tmp_path), steps=40, batch_size=16,
                                 log_every=1, ckpt_every=None, val_every=None, progress=False,
                                 plot=False)
    train(cfg, _small_model())
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [0] * 32 + [1] * 8
    assert [int(r["samples"]) for r in rows][31] == 512


def test_truncated_checkpoint_gives_a_clear_error_and_the_previous_one_is_used(tmp_path):
    cfg = TrainConfig.for_preset("tiny", data=DATA, out=str(tmp_path), steps=6, batch_size=16,
                                 ckpt_every=3, val_every=None, progress=False, plot=False)
    train(cfg, _small_model())
    first, last = list_checkpoints(tmp_path)
    assert (first.name, last.name) == ("step_00000003.pt", "step_00000006.pt")
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="step_00000006.pt.*truncated or corrupt"):
        read_checkpoint(last)
    with pytest.raises(CheckpointError, match="step_00000003.pt"):  # names the good one
        load_checkpoint(last)
    with pytest.warns(RuntimeWarning, match=r"(?s)previous good one \S*step_00000003.pt.*step_00000006.pt.*truncated"):
        path, state = latest_checkpoint(tmp_path)
    assert path == first and state["step"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model, _, _, info = load_checkpoint(tmp_path)
        assert info["step"] == 3
        resumed = train(TrainConfig(**{**cfg.to_dict(), "resume": True}), _small_model())
    assert resumed.step == 6 and read_checkpoint(list_checkpoints(tmp_path)[-1])["step"] == 6
    # one flipped bit in a weight loaded silently (torch.load does not check the zip's CRCs)
    last = list_checkpoints(tmp_path)[-1]
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x40
    last.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step_00000006.pt is damaged: its record \S+ "
                                              r"fails its CRC-32"):
        read_checkpoint(last)
    with pytest.warns(RuntimeWarning, match=r"(?s)step_00000003.pt.*step_00000006.pt.*CRC-32"):
        assert latest_checkpoint(tmp_path)[0] == first
    first.write_bytes(b"not a checkpoint")
    list_checkpoints(tmp_path)[-1].write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        latest_checkpoint(tmp_path)


def test_resume_on_data_of_another_vocabulary_says_what_to_do(tmp_path):
    cfg = TrainConfig.for_preset("tiny", data=DATA, out=str(tmp_path), steps=2, batch_size=16,
                                 val_every=None, progress=False, plot=False)
    train(cfg, _small_model())
    other = TrainConfig(**{**cfg.to_dict(), "data": "random:cells=512,genes=200", "resume": True})
    with pytest.raises(ValueError, match=r"another gene vocabulary \(300 genes.*\(200 genes.*; "
                                         r"resume with the run's own --data, or start a new run"):
        train(other, _small_model())


def test_new_run_refuses_to_overwrite_and_resume_needs_a_checkpoint(tmp_path):
    cfg = TrainConfig.for_preset("tiny", data=DATA, out=str(tmp_path), steps=2, batch_size=16,
                                 val_every=None, progress=False, plot=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(**{**cfg.to_dict(), "resume": True}), _small_model())
    train(cfg, _small_model())
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, _small_model())


def test_load_checkpoint_returns_model_config_vocab(tmp_path):
    cfg = TrainConfig.for_preset("tiny", data=DATA, out=str(tmp_path), steps=3, batch_size=16,
                                 val_every=None, progress=False, plot=False)
    train(cfg, _small_model(loss="nb"))
    model, config, genes, info = load_checkpoint(tmp_path)
    assert isinstance(model, TxFM) and not model.training
    assert config.loss == "nb" and config.dim == 32
    assert genes[:2] == ["GENE00000", "GENE00001"] and len(genes) == 300
    assert info["step"] == 3 and info["vocab_hash"] and info["symbols"][0] == "GENE00000"
    state = read_checkpoint(list_checkpoints(tmp_path)[-1])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["model"][name])
    assert model.tokenizer.codebook.shape == (300, 31)
    ids = torch.randint(0, 300, (2, 32), dtype=torch.int32)
    assert model.embed(ids, torch.rand(2, 32)).shape == (2, 32)


# -- pieces ----------------------------------------------------------------------------------------
def test_random_source_splits_ranks_like_accumulation():
    one = RandomCSRSource(256, 100, batch_size=8, seed=3)
    ranks = [RandomCSRSource(256, 100, batch_size=8, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert len(one) == 32 and len(ranks[0]) == 16
    seq = [b.cell_ids for b in one]
    by_rank = [[b.cell_ids for b in src] for src in ranks]
    for i, ids in enumerate(seq):
        assert torch.equal(ids, by_rank[i % 2][i // 2])
    assert torch.cat(seq).unique().numel() == 256  # one epoch = every cell once
    src = RandomCSRSource(256, 100, batch_size=8, seed=3)
    it = iter(src)
    next(it), next(it)
    state = src.state_dict()
    rest = [b.cell_ids for b in it]
    src2 = RandomCSRSource(256, 100, batch_size=8, seed=3)
    src2.load_state_dict(state)
    assert all(torch.equal(a, b.cell_ids) for a, b in zip(rest, src2))
    assert one.epoch == 1 and one.state_dict()["position"] == 0  # on to the next epoch
    assert not torch.equal(next(iter(one)).cell_ids, seq[0])  # reshuffled
    one.set_epoch(0)
    val = RandomCSRSource(256, 100, batch_size=8, seed=3, split="val")
    assert not torch.equal(next(iter(val)).counts[:50], next(iter(one)).counts[:50])


def test_cli_overrides_and_resume_reuse_the_saved_config(tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--preset", "S", "--data", "D", "--out", str(tmp_path),
                              "--steps", "10", "--loss", "nb", "--eager", "--k", "1024",
                              "--set", "mlp_ratio=3", "--set", "qkv_bias=false", "--grad-clip", "0"])
    tcfg, mcfg = build_configs(args)
    assert (tcfg.preset, tcfg.batch_size, tcfg.steps, tcfg.epochs) == ("S", 1536, 10, None)
    assert tcfg.grad_clip is None and tcfg.data == "D"
    assert (mcfg.dim, mcfg.loss, mcfg.k, mcfg.mlp_ratio, mcfg.qkv_bias, mcfg.use_fused_ops) == (
        384, "nb", 1024, 3.0, False, False)
    cfg = TrainConfig.for_preset("tiny", data=DATA, out=str(tmp_path / "run"), steps=2,
                                 batch_size=16, val_every=None, progress=False, plot=False)
    train(cfg, _small_model(loss="mse"))
    args = parser.parse_args(["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "4"])
    tcfg, mcfg = build_configs(args)
    assert tcfg.resume and tcfg.steps == 4 and tcfg.data == DATA and tcfg.batch_size == 16
    assert mcfg.loss == "mse" and mcfg.dim == 32
    with pytest.raises(UsageError, match="TxFMConfig field"):
        build_configs(parser.parse_args(["train", "--set", "blocks=3"]))


def test_run_records_its_data_folder_absolute_so_resume_works_from_anywhere(tmp_path,
                                                                            monkeypatch):
    """RUN/config.json kept `--data demo/shards` as typed: `--resume` from another folder then
    failed with "no such folder ... leave --data out", though --data had been left out."""
    from txfm.train.cli import _check_data

    (tmp_path / "demo" / "shards").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    tcfg, _ = build_configs(parser.parse_args(["train", "--data", "demo/shards",
                                               "--out", "runs/a"]))
    assert tcfg.data == str(tmp_path / "demo" / "shards")
    saved = tmp_path / "runs" / "a" / "config.json"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(UsageError, match=r"--data demo/shards \(from .*config.json; relative to "
                                         r"the folder the run was started from\)"):
        _check_data("demo/shards", saved)
    with pytest.raises(UsageError, match=r"\(from .*config.json\): no such folder; pass --data"):
        _check_data(str(tmp_path / "gone"), saved)


def test_flop_formula():
    cfg = preset("B")
    f = forward_flops(cfg, 44_349)
    n, d = 2049, 768
    full_block = 24 * n * d * d + 4 * n * n * d
    assert f["blocks"] + f["attention"] == pytest.approx(11 * full_block + 4 * n * d * d
                                                         + 20 * d * d + 4 * n * d)
    assert train_flops_per_sample(cfg, 44_349) == pytest.approx(1.3976e12, rel=1e-3)


@pytest.mark.gpu
def test_gpu_training_steps_bf16(tmp_path):
    cfg = TrainConfig.for_preset("tiny", data="random:cells=2048,genes=2000", out=str(tmp_path),
                                 steps=30, batch_size=64, val_every=15, progress=False,
                                 device="cuda")
    result = train(cfg, preset("tiny", drop_path=0.1))
    assert result.train_losses[-1] < result.train_losses[0]
    assert all(r["mfu"] is None or 0 < r["mfu"] < 1 for r in result.history)


def test_trains_and_resumes_on_zarr_shards(tmp_path):
    """The real data path: synthetic AnnData -> converter -> Zarr shards -> ShardLoader."""
    pytest.importorskip("zarr")
    from txfm.data.convert import convert
    from txfm.data.manifest import Manifest
    from txfm.data.synth import generate

    synth = generate(tmp_path / "raw", cells=600, genes=200, perturbations=5, batches=2,
                     bulk=20, seed=1)
    convert(synth.datasets, tmp_path / "shards", min_cells=5, min_genes=10,
                 val_fraction=0.1, progress=False)
    cfg = TrainConfig.for_preset("tiny", data=str(tmp_path / "shards"), out=str(tmp_path / "run"),
                                 steps=8, batch_size=16, ckpt_every=4, val_every=4, log_every=2,
                                 progress=False, plot=False)
    first = train(cfg, _small_model())
    assert first.step == 8 and len(first.val_losses) == 2
    model, config, genes, info = load_checkpoint(tmp_path / "run")
    manifest = Manifest.load(tmp_path / "shards")
    assert genes == list(manifest.genes["gene_id"]) and info["symbols"] == manifest.symbols
    assert info["vocab_hash"] == manifest.vocab_hash
    # resume asking for more steps: the schedule is re-planned, the data continue
    longer = TrainConfig(**{**cfg.to_dict(), "steps": 12, "resume": True})
    with pytest.warns(RuntimeWarning,
                      match=rf"12 steps instead of the 8 that step_\d+\.pt was planned"):
        second = train(longer, _small_model())
    assert second.step == 12 and [r["step"] for r in second.history] == [2, 4, 6, 8, 10, 12]


def test_an_unreadable_later_checkpoint_does_not_push_out_a_good_one(tmp_path):
    """Resumed from step 4 past an unreadable step-6 file, the run keeps its ``keep`` newest
    good checkpoints up to its own step; the step-6 file is set aside (``.corrupt``), so it
    neither counts nor shadows the run's own step 6 later."""
    cfg = TrainConfig.for_preset("tiny", data=DATA, out=str(tmp_path), steps=6, batch_size=16,
                                 ckpt_every=2, keep_checkpoints=2, val_every=None,
                                 progress=False, plot=False)
    train(cfg, _small_model())
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004.pt",
                                                            "step_00000006.pt"]
    last = list_checkpoints(tmp_path)[-1]
    last.write_bytes(last.read_bytes()[:100])
    resumed = TrainConfig(**{**cfg.to_dict(), "resume": True, "steps": 5, "ckpt_every": 1,
                             "keep_checkpoints": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        train(resumed, _small_model())
        # the new step-5 checkpoint is kept (counting the step-6 file would have deleted it)
        assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005.pt"]
        assert (tmp_path / "checkpoints" / "step_00000006.pt.corrupt").exists()
        path, state = latest_checkpoint(tmp_path)
        assert path.name == "step_00000005.pt" and state["step"] == 5
        train(TrainConfig(**{**resumed.to_dict(), "steps": 7}), _small_model())
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_00000007.pt"], names  # 6 rewritten at step 6, then pruned
