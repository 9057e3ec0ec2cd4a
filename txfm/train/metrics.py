"""Run metrics: ``RUN/metrics.csv`` (+ TensorBoard under ``RUN/tb`` when installed).

One CSV row per logged step: ``step, epoch, samples, train_loss, val_loss, lr, grad_norm,
samples_per_s, step_ms, mfu, elapsed_s, masked_r2, cls_gain, erank, collapsed`` (empty where
not measured at that step; the last four are the learning diagnostics of
:mod:`txfm.train.diagnostics`, at each validation). On resume
rows past the resumed step are dropped, so the file always tells one consistent history.
"""
from __future__ import annotations

import csv
import pathlib

COLUMNS = ["step", "epoch", "samples", "train_loss", "val_loss", "lr", "grad_norm",
           "samples_per_s", "step_ms", "mfu", "elapsed_s", "masked_r2", "cls_gain", "erank",
           "collapsed"]


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    """Rows of a metrics CSV with numbers parsed (None where empty)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else None) for k, v in r.items()})
    for r in rows:
        for key in ("step", "epoch", "samples"):
            if r.get(key) is not None:
                r[key] = int(r[key])
    return rows


class MetricsLogger:
    def __init__(self, run_dir: pathlib.Path, resume_step: int | None, tensorboard: bool):
        self.path = pathlib.Path(run_dir) / "metrics.csv"
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._csv.writeheader()
        for r in kept:
            self._csv.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
        self._file.flush()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: CSV only
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(pathlib.Path(run_dir) / "tb"),
                                         purge_step=None if resume_step is None else resume_step + 1)

    def log(self, row: dict) -> None:
        self._csv.writerow({k: _fmt(row.get(k)) for k in COLUMNS})
        self._file.flush()
        if self._tb is not None:
            for k in COLUMNS[3:]:
                if row.get(k) is not None:
                    self._tb.add_scalar(k, row[k], row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _fmt(v):
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else v
