"""The recipe's one-cycle learning-rate schedule, defined for every run length.

``torch.optim.lr_scheduler.OneCycleLR`` puts the end of its warm-up at the fractional step
``warmup * total_steps - 1`` and divides by that length: with ``warmup * total_steps == 1``
(``--steps 10`` at the default 10%) it raises ``ZeroDivisionError``, and for a fractional
value the peak is never reached. Here the warm-up is a whole number of steps::

    W    = round(warmup * total_steps)          (halves up; 0 and 1 both mean "no ramp")
    top  = max(W - 1, 0)                        step (0-based) at the peak: the last warm-up step
    lr(s) = cos_anneal(peak / 25, peak, s / top)                        for s <= top (top > 0)
    lr(s) = cos_anneal(peak, peak / 25 / 1e4, (s - top) / (T - 1 - top)) for top < s <= T - 1
    cos_anneal(a, b, p) = b + (a - b) / 2 * (1 + cos(pi * p))

which is exactly OneCycleLR (``anneal_strategy="cos"``, ``div_factor=25``,
``final_div_factor=1e4``, ``cycle_momentum=False``) whenever ``warmup * total_steps`` is a
whole number >= 2 (e.g. the recipe's 600 or 50-step runs), and well defined for every
``total_steps >= 1``: one step runs at the peak; the last step of a run of two or more runs
at ``peak / 25 / 1e4``.
"""
from __future__ import annotations

import math

import torch

DIV_FACTOR = 25.0  # first warm-up step at peak / 25 (OneCycleLR's default)
FINAL_DIV_FACTOR = 1e4  # last step at peak / 25 / 1e4 (OneCycleLR's default)


def warmup_steps(total_steps: int, warmup: float) -> int:
    """Whole warm-up steps of a run: ``warmup * total_steps`` rounded to nearest, halves up."""
    return int(math.floor(warmup * total_steps + 0.5 + 1e-9))  # 1e-9: 0.15 * 10 = 1.4999...


def one_cycle_lr(step: int, total_steps: int, warmup: float, peak: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of a ``total_steps`` run (see module)."""
    initial = peak / DIV_FACTOR
    final = initial / FINAL_DIV_FACTOR
    top = max(warmup_steps(total_steps, warmup) - 1, 0)
    if step <= top:
        return _cos(initial, peak, step / top) if top else peak
    if step >= total_steps - 1:  # the last step, and any after it
        return final
    return _cos(peak, final, (step - top) / (total_steps - 1 - top))


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


class OneCycleSchedule(torch.optim.lr_scheduler.LRScheduler):
    """:func:`one_cycle_lr` as a scheduler: every param group runs at ``one_cycle_lr(step)``.

    Its ``state_dict`` holds ``total_steps``, ``warmup``, ``peak`` and ``last_epoch`` (= the
    step whose rate is set). ``last_epoch=s - 1`` starts it at step ``s`` (a resumed run).
    """

    def __init__(self, optimizer, *, peak: float, total_steps: int, warmup: float,
                 last_epoch: int = -1):
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be >= 1")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup={warmup} must be in [0, 1)")
        self.peak, self.total_steps, self.warmup = float(peak), int(total_steps), float(warmup)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        lr = one_cycle_lr(self.last_epoch, self.total_steps, self.warmup, self.peak)
        return [lr for _ in self.optimizer.param_groups]
