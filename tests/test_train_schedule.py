"""The one-cycle learning-rate schedule for every run length (issue 11 item 10).

``txfm train --steps 10`` died with ZeroDivisionError inside torch's OneCycleLR (warm-up of
exactly one step), and runs of 1-9 steps never reached the peak rate. Every length must train,
and the rate each optimizer step actually used must match an independent float64 computation;
where OneCycleLR is well defined (a whole number >= 2 of warm-up steps) it must match torch.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from txfm.model import preset
from txfm.train import TrainConfig
from txfm.train.schedule import OneCycleSchedule
from txfm.train.trainer import Trainer

PEAK = 1e-3


def _reference(total: int, warmup: float, peak: float) -> np.ndarray:
    """float64 rates of steps 0..total-1: cosine ramp peak/25 -> peak over the warm-up steps
    (the last warm-up step at the peak), then cosine decay to peak/25/1e4 at the last step."""
    n_warm = int(np.floor(np.float64(warmup) * total + 0.5 + 1e-9))
    top = max(n_warm - 1, 0)
    start, final = peak / 25.0, peak / 25.0 / 1e4
    up = np.arange(top, dtype=np.float64) / max(top, 1)
    ramp = start + (peak - start) * (1.0 - np.cos(np.pi * up)) / 2.0
    down = np.arange(total - top, dtype=np.float64) / max(total - 1 - top, 1)
    decay = final + (peak - final) * (1.0 + np.cos(np.pi * down)) / 2.0
    return np.concatenate([ramp, decay])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("steps", range(1, 13))
def test_every_run_length_trains_on_the_schedule(steps, tmp_path):
    cfg = TrainConfig.for_preset("tiny", data="random:cells=128,genes=40", out=str(tmp_path),
                                 steps=steps, batch_size=8, val_every=None, ckpt_every=None,
                                 log_every=1, progress=False, plot=False, tensorboard=False)
    model = preset("tiny", dim=16, depth=1, heads=2, decoder_hidden=16, k=8, use_fused_ops=False)
    trainer = Trainer(cfg, model)
    used = []  # the rate of each optimizer step, read when the step runs
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    result = trainer.fit()
    assert result.step == steps and len(result.train_losses) == steps
    expected = _reference(steps, cfg.warmup, PEAK)
    np.testing.assert_allclose(used, expected, rtol=1e-12, atol=0)
    assert max(used) == pytest.approx(PEAK, rel=1e-15)  # every run reaches the peak
    if steps >= 2:
        assert used[-1] == pytest.approx(PEAK / 25 / 1e4, rel=1e-12)


@pytest.mark.parametrize("total,warmup", [(20, 0.1), (50, 0.1), (600, 0.1), (12, 0.25),
                                          (40, 0.05), (10, 0.5)])
def test_matches_torch_one_cycle_where_that_is_defined(total, warmup):
    def rates(make):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=PEAK)
        sched = make(opt)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = rates(lambda o: OneCycleSchedule(o, peak=PEAK, total_steps=total, warmup=warmup))
    torchs = rates(lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=PEAK, total_steps=total, pct_start=warmup, anneal_strategy="cos",
        cycle_momentum=False))
    assert ours == torchs
    np.testing.assert_allclose(ours, _reference(total, warmup, PEAK), rtol=1e-12, atol=0)


def test_resume_continues_the_schedule(tmp_path):
    """A run stopped at step 5 of 11 and resumed uses the uninterrupted run's rates."""
    def run(out, steps, resume=False, ckpt_every=None):
        cfg = TrainConfig.for_preset("tiny", data="random:cells=128,genes=40", out=str(out),
                                     steps=steps, batch_size=8, val_every=None,
                                     ckpt_every=ckpt_every, progress=False, plot=False,
                                     tensorboard=False, resume=resume)
        trainer = Trainer(cfg, preset("tiny", dim=16, depth=1, heads=2, decoder_hidden=16, k=8,
                                      use_fused_ops=False))
        used = []
        trainer.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
        trainer.fit()
        return used

    full = run(tmp_path / "full", 11)
    first = run(tmp_path / "cut", 5)
    with pytest.warns(RuntimeWarning,
                      match=rf"11 steps instead of the 5 that step_\d+\.pt was planned"):
        rest = run(tmp_path / "cut", 11, resume=True)
    np.testing.assert_allclose(full, _reference(11, 0.1, PEAK), rtol=1e-12, atol=0)
    np.testing.assert_allclose(rest, full[5:], rtol=1e-12, atol=0)
    assert len(first) == 5
