"""Faults a new user met in ``txfm train``: each mistake is one ``error:`` line and exit 2,
checked before the data are set up and leaving nothing on disk; the learning diagnostics do
not call a collapse on a handful of validation cells; the progress bar shows validation and
keeps its diagnostics; ``metrics.csv`` keeps its formatting across ``--resume``.

Corpora are in-memory (``random:``), models tiny, runs a few steps.
"""
from __future__ import annotations

import pathlib
import re
import shutil
import warnings

import pytest
import torch

from txfm.cli import main
from txfm.model import preset
from txfm.train import TrainConfig, train
from txfm.train.diagnostics import MIN_CELLS, effective_rank, is_collapsed
from txfm.train.metrics import COLUMNS
from txfm.train.metrics import read_metrics
from txfm.train.trainer import Trainer

GENES = 50
DATA = f"random:cells=64,genes={GENES}"
NO_K = ["--set", "dim=16", "--set", "depth=1", "--set", "heads=2", "--set", "decoder_hidden=16",
        "--eager", "--no-progress", "--no-plot", "--no-tensorboard"]
TINY = [*NO_K, "--k", "8"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**over):
    return preset("tiny", **{**dict(dim=16, depth=1, heads=2, decoder_hidden=16, k=8,
                                    backend="torch"), **over})


def _cfg(out, **over):
    base = dict(data=DATA, out=str(out), steps=4, batch_size=8, log_every=1, val_every=2,
                val_batches=2, ckpt_every=None, progress=False, plot=False, tensorboard=False)
    return TrainConfig.for_preset("tiny", **{**base, **over})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
    """A finished 4-step run (16 validation cells: its rows have ``collapsed``)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    _train_one_thread(_cfg(out))
    return out


def _train_one_thread(cfg) -> None:
    """``train(cfg, _model())`` on one thread (module fixtures cannot use ``one_thread``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, _model())
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def run(trained, tmp_path) -> pathlib.Path:
    """A copy of the trained run, to damage."""
    return pathlib.Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture
def no_data(monkeypatch):
    """Fails the test if the data are set up (checks must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the data were set up before the check")

    monkeypatch.setattr("txfm.train.trainer.open_loader", refuse)


def _error(argv, capsys, monkeypatch, tmp_path) -> str:
    """Runs ``txfm train ARGV``; asserts exit 2, one ``error:`` line, no traceback; returns it."""
    monkeypatch.chdir(tmp_path)
    status = main(["train", *argv])
    out, err = capsys.readouterr()
    assert status == 2, f"exit {status}\n{out}\n{err}"
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0][len("error: "):]


# -- 1. K above the vocabulary ---------------------------------------------------------------------
# K stays small enough that a regression fails fast instead of padding to 100,000 tokens
@pytest.mark.parametrize("flag,named", [
    (["--set", "k=300"], "--set k=300"),
    (["--k", "300"], "--k 300 (k=300)"),
    (["--preset", "S", "--steps", "1", "--batch-size", "2"], "k=2048 (from --preset S)"),
])
def test_k_above_the_vocabulary_is_refused_before_training(flag, named, capsys, monkeypatch,
                                                           tmp_path):
    out = tmp_path / "new"
    msg = _error(["--data", DATA, "--out", str(out), *NO_K, *flag], capsys, monkeypatch, tmp_path)
    assert msg == (f"{named}: more than the corpus's {GENES} genes; use k <= {GENES}"), msg
    assert not out.exists()  # nothing written


def test_k_above_the_vocabulary_on_resume_and_in_python(run, capsys, monkeypatch, tmp_path):
    msg = _error(["--out", str(run), "--resume", "--steps", "6", *TINY, "--k", "500"], capsys,
                 monkeypatch, tmp_path)
    assert msg.startswith("--k 500 with --resume: the run's model was trained with k=")
    expected = f"k=500: more than the corpus's {GENES} genes; use k <= {GENES}"
    with pytest.raises(ValueError, match=expected):
        Trainer(_cfg(tmp_path / "api"), _model(k=500))
    with pytest.raises(ValueError, match=expected):
        train(_cfg(run, resume=True, steps=6), _model(k=500))
    assert not (tmp_path / "api").exists()


# -- 2. what crashed later now fails up front --------------------------------------------------------
@pytest.mark.parametrize("out,named", [("afile/sub", "--out afile/sub: lies under afile, which "
                                        "is a file"),
                                       ("/proc/x", "--out /proc/x: cannot write there")])
def test_out_that_cannot_be_made(out, named, capsys, monkeypatch, tmp_path, no_data):
    if out.startswith("/proc") and not pathlib.Path("/proc").is_dir():
        pytest.skip("no /proc here")
    (tmp_path / "afile").write_text("x\n")
    msg = _error(["--data", DATA, "--out", out, *TINY], capsys, monkeypatch, tmp_path)
    assert msg.startswith(named), msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no scratch folder left


@pytest.mark.skipif(torch.cuda.is_available(), reason="backend=cuda runs here")
def test_backend_that_cannot_run_here(capsys, monkeypatch, tmp_path, no_data):
    tiny = [a for a in TINY if a != "--eager"]  # --eager with --set backend= is refused
    msg = _error(["--data", DATA, "--out", "run", *tiny, "--set", "backend=cuda"], capsys,
                 monkeypatch, tmp_path)
    assert msg.startswith("--set backend=cuda: cannot run on cpu here") and "use auto" in msg


def test_flash_attention_without_flash_attn(capsys, monkeypatch, tmp_path, no_data):
    from txfm.model import encoder

    if encoder._fa3_func is not None or encoder._fa2_func is not None:
        pytest.skip("flash-attn is installed here")
    msg = _error(["--data", DATA, "--out", "run", *TINY, "--set", "attention=flash"], capsys,
                 monkeypatch, tmp_path)
    assert msg.startswith("--set attention=flash: needs flash-attn") and "use auto" in msg


@pytest.mark.parametrize("damage,named", [
    (lambda text: text + "garbage" + "," * (len(COLUMNS) - 1) + "\n",
     "step='garbage' is not an integer"),
    (lambda text: text + "40,1\n", f"has 2 fields, its header {len(COLUMNS)}"),
    (lambda text: "\n".join(",".join(line.split(",")[1:]) for line in text.splitlines()),
     "no 'step' column"),
])
def test_resume_with_a_damaged_metrics_csv(run, damage, named, capsys, monkeypatch, tmp_path,
                                           no_data):
    metrics = run / "metrics.csv"
    metrics.write_text(damage(metrics.read_text()))
    before = metrics.read_text()
    msg = _error(["--out", str(run), "--resume", "--steps", "6", *TINY], capsys, monkeypatch,
                 tmp_path)
    assert msg.startswith(f"{metrics}: ") and named in msg and "delete" in msg, msg
    assert metrics.read_text() == before


def test_steps_and_epochs_together_warn_that_epochs_is_ignored(tmp_path, monkeypatch):
    from txfm.cli import build_parser
    from txfm.train.cli import build_configs

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["train", "--data", DATA, "--steps", "3", "--epochs", "2"])
    with pytest.warns(UserWarning, match=r"--epochs 2 is ignored: --steps 3 sets"):
        train_cfg, _ = build_configs(args)
    assert train_cfg.steps == 3 and train_cfg.epochs is None


def test_a_metrics_csv_cut_off_mid_row_is_named_not_taken(tmp_path):
    """A run stopped while writing a row left it cut short; resume kept it (later columns
    empty) and said nothing about the rows lost up to the checkpoint (a fresh user's find)."""
    from txfm.train.metrics import MetricsError, MetricsLogger, read_metrics

    path = tmp_path / "metrics.csv"
    full = "step,epoch,train_loss\n10,0,1.5\n20,0,1.25\n"
    path.write_text(full + "30,1,1.1")  # cut inside its last value
    with pytest.warns(RuntimeWarning, match="last line .* was cut off"):
        assert [r["step"] for r in read_metrics(path)] == [10, 20]
    path.write_text("step,epoch,train_loss\n10,0\n20,0,1.25\n")  # a short row inside
    with pytest.raises(MetricsError, match="line 2 has 2 fields, its header 3"):
        read_metrics(path)
    path.write_text(full + "30,1,1.1")
    with pytest.warns(RuntimeWarning) as said:
        MetricsLogger(tmp_path, 30, tensorboard=False).close()
    said = [str(w.message) for w in said]
    assert any("cut off" in m for m in said), said
    assert any("ends at step 20, before the checkpoint's step 30" in m for m in said), said
    assert [r["step"] for r in read_metrics(path)] == [10, 20]
    path.unlink()  # deleted on purpose (the errors' advice): logs from the checkpoint on, quietly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetricsLogger(tmp_path, 30, tensorboard=False).close()


def test_resume_with_another_model_shape(run, capsys, monkeypatch, tmp_path):
    msg = _error(["--out", str(run), "--resume", "--steps", "6", *TINY, "--set", "dim=32"],
                 capsys, monkeypatch, tmp_path)
    assert msg.startswith("--set dim=32 with --resume: the run's model was trained with "
                          "dim=16"), msg
    # in Python, the trainer refuses any change of the model, not only one of its shapes
    with pytest.raises(ValueError, match=r"--resume: .* holds another model \(loss='poisson' "
                                         r"\(now 'mse'\)\)"):
        train(_cfg(run, resume=True, steps=6), _model(loss="mse"))


# -- 3. messages that name the argument and the fix ------------------------------------------------
@pytest.mark.parametrize("flag,expected", [
    (["--seed", "99999999999999999999"], "--seed 99999999999999999999: must be in [0, 2**63)"),
    (["--set", "heads=0"], "--set heads=0: must be >= 1"),
    (["--set", "extra=abc"], "--set extra=abc: this field is a dict; give a JSON object"),
    (["--set", "mlp_ratio=0.001"], "--set mlp_ratio=0.001: gives no MLP unit"),
])
def test_messages_name_the_argument(flag, expected, capsys, monkeypatch, tmp_path, no_data):
    msg = _error(["--data", DATA, "--out", "run", *TINY, *flag], capsys, monkeypatch, tmp_path)
    assert msg.startswith(expected), msg


def test_config_types_are_checked_in_python():
    with pytest.raises(ValueError, match=r"extra='abc': must be a dict"):
        _model(extra="abc")
    with pytest.raises(ValueError, match=r"k=True: must be an integer"):
        _model(k=True)
    with pytest.raises(ValueError, match=r"seed=.*must be in \[0, 2\*\*63\)"):
        _cfg("x", seed=2**63)
    assert _model(extra={"note": "x"}).extra == {"note": "x"}


def test_tau_with_genes_no_cell_expresses(tmp_path):
    """Most of 3,000 genes of 16 random cells are never expressed: m ** tau needs m > 0."""
    cfg = _cfg(tmp_path, data="random:cells=16,genes=3000", steps=1, val_every=None)
    assert train(cfg, _model(tau=0.5)).step == 1


# -- 4. diagnostics on a handful of validation cells -------------------------------------------------
def test_min_cells_can_reach_the_rank_threshold_by_far():
    g = torch.Generator().manual_seed(0)
    assert effective_rank(torch.randn(2, 16, generator=g)) == pytest.approx(1.0)  # any 2 cells
    assert effective_rank(torch.randn(MIN_CELLS, 16, generator=g)) > 5 * 1.5
    row = {"cls_gain": 0.0, "erank": 1.0}
    assert is_collapsed({**row, "cells": MIN_CELLS - 1}) is None
    assert is_collapsed({**row, "cells": MIN_CELLS}) is True
    assert is_collapsed(row) is True  # no count given: judged as before


def test_tiny_validation_set_is_not_called_collapsed(tmp_path, capsys):
    cfg = _cfg(tmp_path, steps=4, batch_size=2, val_every=1, val_batches=1)
    result = train(cfg, _model())
    rows = [r for r in result.history if r.get("erank") is not None]
    assert len(rows) == 4 and all(r["collapsed"] is None for r in rows), rows
    captured = capsys.readouterr()
    assert "warning:" not in captured.out  # warnings go to stderr, as the CLI's others do
    out = captured.err
    assert out.count("warning:") == 1, out
    assert f"at least {MIN_CELLS} validation cells" in out and "--val-batches" in out
    assert "--batch-size" in out and "collapsing" not in out


def test_enough_validation_cells_are_judged(trained):
    rows = [r for r in read_metrics(trained / "metrics.csv") if r.get("erank") is not None]
    assert rows and all(r["collapsed"] in (0, 1) for r in rows), rows


# -- 5. the progress bar ---------------------------------------------------------------------------
class _Bar:
    """Records what the trainer shows in its bar."""

    def __init__(self, disable=False):
        self.disable = disable
        self.postfixes: list[dict] = []
        self.lines: list[str] = []

    def set_postfix(self, postfix, refresh=True):
        self.postfixes.append(dict(postfix))

    def update(self, n=1):
        pass

    def write(self, line, file=None):  # tqdm.write's signature
        self.lines.append(line)

    def close(self):
        pass


@pytest.mark.parametrize("enabled", [True, False])
def test_bar_shows_validation_and_keeps_the_diagnostics(tmp_path, monkeypatch, enabled):
    bar = _Bar(disable=not enabled)
    monkeypatch.setattr("txfm.train.trainer._progress", lambda total, initial, enabled: bar)
    train(_cfg(tmp_path, steps=4, val_every=2, val_batches=3, progress=enabled), _model())
    during = [p["val"] for p in bar.postfixes if "/" in p.get("val", "")]
    if not enabled:  # --no-progress: no per-batch work for a bar nobody sees
        assert during == []
        return
    assert during == ["1/3", "2/3", "3/3"] * 2
    logged = [p for p in bar.postfixes if "/" not in p.get("val", "")]
    assert len(logged) == 4 and all(k in logged[2] for k in ("R2", "cls", "rank")), logged
    assert logged[2]["R2"] == logged[1]["R2"]  # step 3 keeps step 2's diagnostics
    assert "R2" not in logged[0]  # none before the first validation


# -- 6. metrics.csv on resume ----------------------------------------------------------------------
def test_resume_keeps_the_rows_as_they_were_written(run):
    metrics = run / "metrics.csv"
    before = metrics.read_text().splitlines()
    assert any(line.endswith((",0", ",1")) for line in before), before
    train(_cfg(run, steps=6, resume=True), _model())
    after = metrics.read_text().splitlines()
    assert after[:len(before)] == before  # kept rows byte for byte: collapsed stays 0/1
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3, 4, 5, 6]
    assert not (run / "metrics.csv.tmp").exists()


# -- 4. faults of a user resuming and checkpointing ----------------------------------------------
@pytest.mark.parametrize("flag", [["--lr", "5e-3"], ["--warmup", "0.5"],
                                  ["--weight-decay", "0.5"]])
def test_resume_refuses_settings_the_checkpoint_restores(flag, run, capsys, monkeypatch,
                                                         tmp_path):
    """The optimizer's and the schedule's state come back from the checkpoint: a new --lr was
    recorded in config.json but never used. Now it is refused; the same value passes."""
    msg = _error(["--out", str(run), "--resume", "--steps", "6", *TINY, *flag], capsys,
                 monkeypatch, tmp_path)
    assert msg.startswith(f"{flag[0]} {float(flag[1])} with --resume: the run's optimizer") \
        and "start a new run" in msg, msg


def test_resume_without_config_json_is_refused(run, capsys, monkeypatch, tmp_path):
    (run / "config.json").unlink()
    msg = _error(["--out", str(run), "--resume", *TINY], capsys, monkeypatch, tmp_path)
    assert "config.json is missing" in msg, msg
    assert not (tmp_path / "txfm-demo").exists()  # it used to build the demo and fail later


def test_an_out_name_too_long_is_one_error_line(capsys, monkeypatch, tmp_path, no_data):
    msg = _error(["--data", DATA, "--out", "a" * 300, *TINY], capsys, monkeypatch, tmp_path)
    assert msg.startswith("--out " + "a" * 300 + ": cannot be used"), msg


def test_a_checkpoint_that_cannot_be_written_leaves_nothing(tmp_path, monkeypatch):
    from txfm.train.checkpoint import CheckpointError, save_checkpoint

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"step_00000007.pt: cannot be written \(OSError.*"
                                              r"No space left"):
        save_checkpoint({"step": 7}, tmp_path, 7)
    assert list((tmp_path / "checkpoints").iterdir()) == []

    def interrupted(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 8}, tmp_path, 8)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_plots_leave_the_callers_matplotlib_backend_alone(trained, tmp_path):
    """pyplot's switch to Agg used to change a notebook's backend; the PNG is written whole."""
    import matplotlib

    from txfm.train.plot import plot_losses

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        out = plot_losses(trained / "metrics.csv", tmp_path / "loss.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]


@pytest.mark.parametrize("field,value,rule", [
    ("batch_size", "32", "must be an integer, got str"), ("steps", 10.7, "must be an integer or "
                                                                         "None, got float"),
    ("lr", True, "must be a number, got bool"), ("resume", "no", "must be true or false"),
    ("out", None, "must be a string, got NoneType"), ("betas", 0.9, "must be two numbers")])
def test_train_config_checks_every_fields_type(field, value, rule):
    """A JSON file or a Python caller can pass anything: resume="no" used to resume."""
    from txfm.train.config import ConfigError

    with pytest.raises(ConfigError, match=rf"{field}=.*{rule}"):
        TrainConfig(**{field: value})


def test_a_second_run_in_the_same_folder_fails_at_once(capsys, monkeypatch, tmp_path):
    """Two runs started together in one --out both 'succeeded', one's results lost. The run
    folder's lock (held by the first, here by the test) refuses the second."""
    from txfm.locks import folder_lock
    from txfm.train.trainer import RUN_LOCK

    out = tmp_path / "twin"
    out.mkdir()
    with folder_lock(out, RUN_LOCK, "txfm train run"):
        msg = _error(["--data", DATA, "--out", str(out), "--steps", "2", "--batch-size", "8",
                      *TINY], capsys, monkeypatch, tmp_path)
    assert msg.startswith(f"--out {out} is being written by another txfm train run (pid "), msg
    assert sorted(p.name for p in out.iterdir()) == []  # nothing of the second run
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", DATA, "--out", str(out), "--steps", "2", "--batch-size", "8",
                 *TINY]) == 0  # the lock is gone with its holder
    assert not (out / RUN_LOCK).exists()


def test_resume_before_the_first_checkpoint_names_the_run_still_writing(capsys, monkeypatch,
                                                                       tmp_path):
    """--resume in a folder whose run has not written its first checkpoint said "no
    checkpoint yet; leave out --resume", which would start a second run in the busy folder."""
    import os

    from txfm.locks import folder_lock, lock_holder
    from txfm.train.trainer import RUN_LOCK

    out = tmp_path / "busy"
    out.mkdir()
    argv = ["--out", str(out), "--resume", *TINY]
    with folder_lock(out, RUN_LOCK, "txfm train run"):
        assert lock_holder(out, RUN_LOCK) == f"pid {os.getpid()}"
        msg = _error(argv, capsys, monkeypatch, tmp_path)
    assert f"is being trained by another txfm train run (pid {os.getpid()})" in msg, msg
    assert lock_holder(out, RUN_LOCK) is None and not (out / RUN_LOCK).exists()
    (out / RUN_LOCK).write_text("pid 1")  # left by a killed run: nobody holds it
    assert lock_holder(out, RUN_LOCK) is None
    assert "has no checkpoint yet" in _error(argv, capsys, monkeypatch, tmp_path)


def test_train_config_from_dict_refuses_an_unknown_field():
    import json

    cfg = TrainConfig.for_preset("tiny", steps=7, lr=2e-3)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"unknown fields \['stepz'\]"):
        TrainConfig.from_dict({"stepz": 3})


# -- 7. an unreadable checkpoint skipped by --resume ----------------------------------------------
def _files(folder: pathlib.Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes): what a refused call must leave."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory) -> pathlib.Path:
    """A run with good checkpoints at steps 7 and the newest, 8, cut to 1,000 bytes."""
    out = tmp_path_factory.mktemp("ckpt") / "rc"
    _train_one_thread(_cfg(out, steps=8, ckpt_every=7, val_every=None))
    newest = out / "checkpoints" / "step_00000008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    return out


def test_resume_sets_an_unreadable_checkpoint_aside_and_keeps_the_good_one(
        damaged_run, tmp_path, capsys, monkeypatch):
    """The unreadable step-8 file counted toward --keep 3: the resumed run deleted the good
    step-7 checkpoint it came from and kept the damaged file, which every later resume and
    `txfm embed` skipped again."""
    from txfm.train.checkpoint import list_checkpoints, load_checkpoint

    run = pathlib.Path(shutil.copytree(damaged_run, tmp_path / "rc"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out", str(run), "--resume", "--steps", "16", "--ckpt-every", "7",
                 "--keep", "3", *TINY]) == 0
    err = capsys.readouterr().err
    aside = [line for line in err.splitlines() if "set aside" in line]
    assert len(aside) == 1 and aside[0].startswith("warning: ") and "step_00000008.pt" in aside[0]
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "step_00000007.pt", "step_00000008.pt.corrupt", "step_00000014.pt", "step_00000016.pt"]
    assert (folder / "step_00000008.pt.corrupt").stat().st_size == 1000  # kept, as evidence
    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == list(range(1, 17))
    assert "are lost" not in err  # metrics.csv is picked up at the step resumed from
    # no later reader meets it again: resume, embed / genes, eval learning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_checkpoint(run)[3]["step"] == 16
    assert main(["train", "--out", str(run), "--resume", "--steps", "18", "--ckpt-every", "7",
                 "--keep", "3", *TINY]) == 0
    assert "step_00000008" not in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(run)] == ["step_00000014.pt", "step_00000016.pt",
                                                       "step_00000018.pt"]


def test_an_unreadable_checkpoint_that_cannot_be_set_aside_is_not_counted(damaged_run, tmp_path,
                                                                         monkeypatch):
    from txfm.train import checkpoint as ckpt

    def refuse(path):
        raise PermissionError(13, "Permission denied")

    run = pathlib.Path(shutil.copytree(damaged_run, tmp_path / "rc"))
    monkeypatch.setattr(ckpt, "set_aside", refuse)
    with pytest.warns(RuntimeWarning, match=r"step_00000008.pt: unreadable, and cannot be set "
                                             r"aside .*; delete it"):
        train(_cfg(run, resume=True, steps=16, ckpt_every=7, keep_checkpoints=2,
                   val_every=None), _model())
    # the resumed-from step 7 goes only once two newer good ones exist; the damaged file stays
    assert [p.name for p in ckpt.list_checkpoints(run)] == [
        "step_00000008.pt", "step_00000014.pt", "step_00000016.pt"]


def test_a_refused_resume_sets_nothing_aside_and_writes_nothing(damaged_run, tmp_path,
                                                               monkeypatch):
    """A resume refused at its first step (a model that does not fit, say) leaves the run's
    files as they were: no checkpoint renamed, config.json and metrics.csv untouched."""
    run = pathlib.Path(shutil.copytree(damaged_run, tmp_path / "rc"))
    before = _files(run)

    def out_of_memory(self, batches):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Trainer, "train_step", out_of_memory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback to step 7
        with pytest.raises(torch.OutOfMemoryError):
            train(_cfg(run, resume=True, steps=16, ckpt_every=7, val_every=None), _model())
    assert _files(run) == before


def test_only_set_aside_checkpoints_left_is_said(damaged_run, tmp_path, capsys, monkeypatch):
    from txfm.train.checkpoint import CheckpointError, load_checkpoint

    run = pathlib.Path(shutil.copytree(damaged_run, tmp_path / "rc"))
    folder = run / "checkpoints"
    (folder / "step_00000007.pt").unlink()
    (folder / "step_00000008.pt").rename(folder / "step_00000008.pt.corrupt")
    msg = _error(["--out", str(run), "--resume", *TINY], capsys, monkeypatch, tmp_path)
    assert "set aside the unreadable step_00000008.pt.corrupt" in msg, msg
    assert "another --out" in msg and "leave out --resume" not in msg
    with pytest.raises(CheckpointError, match=r"only unreadable ones, set aside as "
                                              r"step_00000008.pt.corrupt"):
        load_checkpoint(run)


# -- 8. a refused call writes nothing ---------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> pathlib.Path:
    from _shards import synthetic_shards

    return synthetic_shards(tmp_path_factory, cells=300, genes=60, perturbations=2, seed=4,
                            shard_cells=100, convert_seed=1, val_fraction=0.1)


def _flip_middle(f: pathlib.Path) -> None:
    """Inverts 4 bytes inside the file's first chunk (its crc32c catches it when read)."""
    b = bytearray(f.read_bytes())
    at = len(b) // 4
    b[at:at + 4] = bytes(x ^ 0xFF for x in b[at:at + 4])
    f.write_bytes(bytes(b))


DAMAGE = {  # each found only once its chunk is read: the first step's or validation's batches
    "train chunk flipped": lambda s: _flip_middle(s / "dataset_1" / "X" / "data" / "c" / "0"),
    "val chunk flipped": lambda s: _flip_middle(s / "val" / "dataset_0" / "X" / "data" / "c" / "0"),
    "train file truncated": lambda s: (s / "dataset_0" / "X" / "indices" / "c" / "0").write_bytes(
        (s / "dataset_0" / "X" / "indices" / "c" / "0").read_bytes()[:50]),
    "val file deleted": lambda s: (s / "val" / "dataset_0" / "X" / "indices" / "c" / "0").unlink(),
}
SHARD_ARGS = [*TINY, "--steps", "4", "--batch-size", "8"]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_shards_refuse_training_and_write_nothing(damage, shards, capsys, monkeypatch,
                                                          tmp_path):
    """Shards with a damaged chunk: exit 2 with the right message, but the run folder, its
    config.json and a header-only metrics.csv were left behind."""
    bad = pathlib.Path(shutil.copytree(shards, tmp_path / "bad"))
    DAMAGE[damage](bad)
    msg = _error(["--data", str(bad), "--out", "runs/b3", *SHARD_ARGS], capsys, monkeypatch,
                 tmp_path)
    assert "shard" in msg and str(bad) in msg, msg
    assert not (tmp_path / "runs").exists()  # nor the parent it made
    (tmp_path / "mine").mkdir()  # a folder the user made is left, empty
    _error(["--data", str(bad), "--out", "mine", *SHARD_ARGS], capsys, monkeypatch, tmp_path)
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []


def test_resume_on_damaged_shards_leaves_the_run_as_it_was(shards, capsys, monkeypatch,
                                                           tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", str(shards), "--out", "run", *TINY, "--steps", "2",
                 "--batch-size", "8"]) == 0
    capsys.readouterr()
    bad = pathlib.Path(shutil.copytree(shards, tmp_path / "bad"))
    DAMAGE["train chunk flipped"](bad)
    before = _files(tmp_path / "run")
    assert main(["train", "--data", str(bad), "--out", "run", "--resume", *SHARD_ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # after the warning of the longer run
    assert err[-1].startswith("error: shard dataset_1") and "crc32c" in err[-1], err
    assert [line for line in err if line.startswith("error")] == err[-1:]
    assert _files(tmp_path / "run") == before


@pytest.mark.parametrize("exc", [KeyboardInterrupt, torch.OutOfMemoryError])
def test_a_run_stopped_before_its_first_step_removes_the_folder_it_made(exc, tmp_path,
                                                                        monkeypatch):
    def fail(self, batches):
        raise exc("stopped")

    monkeypatch.setattr(Trainer, "train_step", fail)
    with pytest.raises(exc):
        train(_cfg(tmp_path / "a" / "b"), _model())
    assert list(tmp_path.iterdir()) == []


# -- faults a fresh user found (2026-12-02) ---------------------------------------------------
@pytest.mark.parametrize("name, kind", [("checkpoints", "file"), ("tb", "file"),
                                        ("metrics.csv", "folder"), ("config.json", "folder"),
                                        ("loss.png", "folder")])
def test_a_name_the_run_writes_taken_by_the_other_kind_is_refused_first(name, kind, capsys,
                                                                        monkeypatch, tmp_path,
                                                                        no_data):
    """A file named ``checkpoints`` in --out trained the whole run and then failed at the first
    save (a traceback, exit 1, config.json and metrics.csv left); a folder named
    ``metrics.csv`` failed at the first row, leaving ``metrics.csv.tmp``."""
    out = tmp_path / "o"
    out.mkdir()
    (out / name).mkdir() if kind == "folder" else (out / name).write_text("mine")
    msg = _error(["--data", DATA, "--out", str(out), *TINY, "--steps", "2"], capsys,
                 monkeypatch, tmp_path)
    assert f"{out / name} is there and is not a {'file' if kind == 'folder' else 'folder'}" in msg
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing else written


def test_out_inside_the_shards_folder_is_refused(shards, capsys, monkeypatch, tmp_path, no_data):
    for out in (shards, shards / "run"):
        msg = _error(["--data", str(shards), "--out", str(out), *TINY, "--steps", "2"], capsys,
                     monkeypatch, tmp_path)
        assert "is the shards folder --data" in msg and "choose another --out" in msg
    assert not (shards / "run").exists() and not (shards / "metrics.csv").exists()


def test_resume_refuses_a_new_model_name(run, capsys, monkeypatch, tmp_path):
    """``--set name=foo`` on --resume renamed the run's model, after which --preset with the
    run's real preset was refused."""
    msg = _error(["--out", str(run), "--resume", *TINY, "--set", "name=foo"], capsys,
                 monkeypatch, tmp_path)
    assert msg.startswith("--set name=foo with --resume: the run's model was trained with "
                          "name='tiny'")


def test_resume_accepts_the_weight_decay_in_use(run, capsys, monkeypatch, tmp_path):
    """The default weight decay, 1 / (lr x steps), was compared as None, so naming the value
    the run uses was refused as a change."""
    import json

    in_use = json.loads((run / "config.json").read_text())["weight_decay"]
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out", str(run), "--resume", *TINY, "--weight-decay",
                 repr(in_use)]) == 0
    msg = _error(["--out", str(run), "--resume", *TINY, "--weight-decay", repr(in_use * 2)],
                 capsys, monkeypatch, tmp_path)
    assert f"(weight_decay {in_use})" in msg


def test_resume_says_which_metrics_columns_it_drops(run, capsys, monkeypatch, tmp_path):
    import csv

    path = run / "metrics.csv"
    rows = list(csv.reader(path.open(newline="")))
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([rows[0] + ["future_col"]] + [r + ["7"] for r in rows[1:]])
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out", str(run), "--resume", *TINY, "--steps", "6"]) == 0
    assert re.search(r"warning: .*metrics.csv: column future_col is not written by this "
                     r"version, so the 4 rows kept up to step 4 lose its values",
                     capsys.readouterr().err)
    assert "future_col" not in path.read_text()


def test_resume_into_a_run_still_training_is_refused_before_the_checkpoint_is_read(
        run, capsys, monkeypatch, tmp_path):
    """It said "resumed from ... (step N)" and then refused: the lock was taken after the
    checkpoint was loaded."""
    from txfm.locks import folder_lock
    from txfm.train.trainer import RUN_LOCK

    monkeypatch.chdir(tmp_path)
    with folder_lock(run, RUN_LOCK, "txfm train run"):
        status = main(["train", "--out", str(run), "--resume", *TINY])
    out, err = capsys.readouterr()
    assert status == 2 and "resumed from" not in out + err, out + err
    assert err.startswith(f"error: --out {run} is being written by another txfm train run (pid ")
    assert len(err.strip().splitlines()) == 1, err


def test_a_rule_between_two_fields_names_the_flag_of_each(capsys, monkeypatch, tmp_path):
    msg = _error(["--data", DATA, "--out", str(tmp_path / "o"), *TINY, "--set", "dim=18",
                  "--set", "heads=4"], capsys, monkeypatch, tmp_path)
    assert "--set" in msg
    msg = _error(["--data", DATA, "--out", str(tmp_path / "o"), "--set", "dim=130",
                  "--no-progress"], capsys, monkeypatch, tmp_path)
    assert msg.startswith("heads=4 (from --preset tiny): must divide dim=130") and \
        msg.endswith("dim came from --set dim=130, so change one of the two"), msg


def test_a_piped_summary_starts_with_the_loss_line(capsys, monkeypatch, tmp_path):
    """Read by a script (stdout not a terminal), `txfm train`'s summary began with a blank
    line, kept only to set it apart from the progress bar on a terminal."""
    monkeypatch.chdir(tmp_path)
    status = main(["train", "--data", DATA, "--out", "run", "--steps", "2", "--batch-size", "8",
                   "--val-every", "0", *TINY])
    out = capsys.readouterr().out
    assert status == 0 and out.splitlines()[0].startswith("train loss "), repr(out)


def test_a_cpu_step_too_large_for_memory_is_warned(monkeypatch):
    """`--preset S` (sized for GPUs: 1,536 cells x K = 2,048) on a 24 GiB CPU box was killed by
    the system within a minute without a word; a warning now names the size and the fix."""
    from txfm.train.trainer import warn_if_memory_short

    ram = {"cpu": 24 * 2**30}  # a 24 GiB machine
    monkeypatch.setattr("txfm_kernels._common.device_memory", lambda device: ram.get(device.type))
    with pytest.warns(RuntimeWarning, match=r"1,536 cells x K = 2,048 .* 24 GiB.*--batch-size"):
        warn_if_memory_short(preset("S"), 1536, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_memory_short(preset("tiny"), 32, torch.device("cpu"))  # the default run
        warn_if_memory_short(preset("S"), 8, torch.device("cpu"))
        warn_if_memory_short(preset("S"), 1536, torch.device("meta"))  # not a CPU
