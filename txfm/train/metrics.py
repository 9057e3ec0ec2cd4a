"""Run metrics: ``RUN/metrics.csv`` (+ TensorBoard under ``RUN/tb`` when installed).

One CSV row per logged step: ``step, epoch, samples, train_loss, val_loss, lr, grad_norm,
samples_per_s, step_ms, mfu, elapsed_s, masked_r2, cls_gain, erank, collapsed`` (empty where
not measured at that step; ``epoch`` counts from 0 and is that of the data the step trained
on, ``samples`` the cells trained on so far over all ranks, ``lr`` the rate the step ran at;
the last four are the learning diagnostics of :mod:`txfm.train.diagnostics`, at each
validation). A row is written every ``log_every`` steps and at each validation and
checkpoint. On resume rows past the resumed step are dropped, so the file always tells one
consistent history.
"""
from __future__ import annotations

import csv
import io
import os
import pathlib
import warnings

from .checkpoint import METRICS, TENSORBOARD

COLUMNS = ["step", "epoch", "samples", "train_loss", "val_loss", "lr", "grad_norm",
           "samples_per_s", "step_ms", "mfu", "elapsed_s", "masked_r2", "cls_gain", "erank",
           "collapsed"]
INT_COLUMNS = ("step", "epoch", "samples", "collapsed")  # read back as int, so rewritten as such


class MetricsError(ValueError):
    """A metrics CSV that cannot be read back; the message names the file, the line and the fix."""


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    """Rows of a metrics CSV with numbers parsed (None where empty; :data:`INT_COLUMNS` as int).

    A last line without its newline was cut off while being written (the run stopped): it is
    dropped with a warning, as its last value may be cut short too.

    Raises :class:`MetricsError` for a file that is not one (no ``step`` column, a line with
    more or fewer fields than the header, a value that is not a number).
    """
    path = pathlib.Path(path)
    fix = (f"repair it or delete {path} (a resumed run then logs from its checkpoint's "
           "step on)")
    rows = []
    try:
        with open(path, newline="") as f:
            text = f.read()
        cut = None
        if text and not text.endswith("\n") and "\n" in text:
            text, _, cut = text.rpartition("\n")
            text += "\n"
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        if "step" not in header:
            raise MetricsError(f"{path}: line 1 has no 'step' column (header {header}): not "
                               f"a txfm metrics file; {fix}")
        if cut is not None:
            warnings.warn(f"{path}: its last line ({cut[:40]!r}...) was cut off while being "
                          f"written: dropped", RuntimeWarning, stacklevel=2)
        for r in reader:
            line = reader.line_num
            if None in r or None in r.values():  # fields beyond / short of the header
                n = len(header) + len(r.get(None, ())) - sum(v is None for v in r.values())
                raise MetricsError(f"{path}: line {line} has {n} fields, its header "
                                   f"{len(header)}; {fix}")
            row = {}
            for key, value in r.items():
                integer = key in INT_COLUMNS
                row[key] = None if value == "" else _number(value, integer)
                if row[key] is None and value != "":
                    raise MetricsError(f"{path}: line {line}: {key}={value!r} is not "
                                       f"{'an integer' if integer else 'a number'}; {fix}")
            if row["step"] is None:
                raise MetricsError(f"{path}: line {line} has no step; {fix}")
            rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MetricsError(f"{path}: cannot be read ({exc}); {fix}") from exc
    return rows


def _number(text: str, integer: bool) -> float | int | None:
    """``text`` as a float (an int for an integer column, also from ``"1.0"``); None if neither."""
    try:
        value = float(text)
    except ValueError:
        return None
    if integer:
        return int(value) if value.is_integer() else None
    return value


class MetricsLogger:
    """Writes ``RUN/metrics.csv``; on resume (``resume_step``) it keeps the rows up to that step.

    ``rows``: the file's rows as :func:`read_metrics` read them (read here when not given).
    """

    def __init__(self, run_dir: pathlib.Path, resume_step: int | None, tensorboard: bool,
                 rows: list[dict] | None = None):
        self.path = pathlib.Path(run_dir) / METRICS
        kept = []
        if resume_step is not None:
            if rows is None and self.path.exists():
                rows = read_metrics(self.path)
            kept = [r for r in rows or () if r["step"] <= resume_step]
            # every checkpoint's step has a row (the trainer logs one before it saves)
            last = kept[-1]["step"] if kept else None
            if rows is not None and last != resume_step:  # no file: deleted on purpose
                warnings.warn(f"{self.path} ends at {'step ' + str(last) if kept else 'its header'}"
                              f", before the checkpoint's step {resume_step}: the rows between "
                              f"are lost (the file was cut short or replaced), so the curves "
                              f"have a gap there", RuntimeWarning, stacklevel=2)
            unknown = sorted({k for r in kept for k in r} - set(COLUMNS))
            if unknown:  # another version's file, or an edited one: say what is lost
                missing = [c for c in COLUMNS if c not in kept[0]]
                many = len(unknown) > 1
                warnings.warn(f"{self.path}: column{'s' * many} {', '.join(unknown)} "
                              f"{'are' if many else 'is'} not written by this version, so the "
                              f"{len(kept)} rows kept up to step {resume_step} lose "
                              f"{'their' if many else 'its'} values"
                              + (f", and have none for {', '.join(missing)}" if missing else "")
                              + " (the file was written by another version, or edited)",
                              RuntimeWarning, stacklevel=2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The kept history goes to a new file that replaces the old one whole: a crash here
        # leaves the old file, not a truncated one. The open handle follows the rename.
        tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(tmp, "w", newline="")
        # "\n" line ends, as pandas writes them: the csv module's "\r\n" leaves a "\r" on the
        # last column for cut, awk and tail
        self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS, lineterminator="\n")
        self._csv.writeheader()
        for r in kept:
            self._csv.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
        self._file.flush()
        os.replace(tmp, self.path)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: CSV only
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(pathlib.Path(run_dir) / TENSORBOARD),
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
