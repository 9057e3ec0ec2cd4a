"""Atomic checkpoints of a run, and loading a trained model back.

Layout of a run folder ``RUN``::

    RUN/config.json                     model + train config (human-readable)
    RUN/checkpoints/step_00000200.pt    every ckpt_every steps and at the end (last N kept)
    RUN/metrics.csv, RUN/loss.png       see txfm.train.metrics

A checkpoint is written to a hidden temporary file beside it, fsynced, then renamed onto its
final name (:func:`txfm.files.write_atomic`; ``os.replace`` is atomic on POSIX), so a crash
leaves either the old set of checkpoints or the new one, never a half-written file under a
final name. A file damaged
afterwards (truncated copy, full disk) fails to load with :class:`CheckpointError` naming it;
:func:`latest_checkpoint` then falls back to the newest older one that loads, saying so. A
resumed run sets such a file aside as ``step_XXXXXXXX.pt.corrupt`` (:func:`set_aside`): it no
longer counts toward ``keep``, and no later resume or ``txfm embed`` tries it again.

Contents (a dict): ``format``, ``step``, ``epoch``, ``samples``, ``model`` (state dict of the
bare model), ``optimizer``, ``scheduler``, ``loader`` (one state per rank), ``rng`` (one per
rank: torch CPU/CUDA, numpy, python), ``model_config``, ``train_config``, ``n_genes``,
``vocab`` (``genes``: the vocabulary's gene ids in model order, ``symbols``, ``hash``) and
``precision`` (``"bf16"`` or ``"fp32"``: the arithmetic of the training forward).
Checkpoints are pickles: load only files you trust.
"""
from __future__ import annotations

import os
import pathlib
import re
import warnings
from typing import Any

import torch

from txfm.devices import device_problem, parse_device
from txfm.files import write_atomic

FORMAT = "txfm-checkpoint-v1"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")
CORRUPT = ".corrupt"  # suffix of a checkpoint set aside as unreadable (set_aside)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (truncated, corrupt, or not a TxFM checkpoint)."""


# the names a run writes in its folder (here, trainer.py, metrics.py), by kind for check_run_dir
CHECKPOINTS, TENSORBOARD = "checkpoints", "tb"
CONFIG, METRICS, LOSS_PLOT = "config.json", "metrics.csv", "loss.png"
RUN_FOLDERS = (CHECKPOINTS, TENSORBOARD)
RUN_FILES = (CONFIG, METRICS, LOSS_PLOT)


def checkpoint_dir(run_dir: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(run_dir) / CHECKPOINTS


def check_run_dir(run_dir: str | os.PathLike) -> None:
    """Raise :class:`txfm.model.config.ConfigError` (field ``out``) unless ``run_dir`` is, or
    can be made, a folder this process can write in (:func:`txfm.cli.folder_problem`), and
    every name the run writes there is free or of the kind it writes (a file where it keeps a
    folder, or the other way round, failed only at the first checkpoint or metrics row, after
    the training so far). Leaves nothing behind."""
    from txfm.cli import folder_problem
    from txfm.model.config import ConfigError

    problem = folder_problem(run_dir)
    if problem is not None:
        raise ConfigError("out", str(run_dir), problem)
    run_dir = pathlib.Path(run_dir)
    for names, is_kind, kind in ((RUN_FOLDERS, os.path.isdir, "folder"),
                                 (RUN_FILES, os.path.isfile, "file")):
        for name in names:
            path = run_dir / name
            if os.path.lexists(path) and not is_kind(path):
                raise ConfigError("out", str(run_dir),
                                  f"{path} is there and is not a {kind}, which the run writes "
                                  f"under that name; move it away or choose another --out")


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> pathlib.Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[pathlib.Path]:
    """The run's checkpoints, oldest first (by step)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def set_aside_checkpoints(run_dir: str | os.PathLike) -> list[pathlib.Path]:
    """The run's checkpoints set aside as unreadable (``*.pt.corrupt``, :func:`set_aside`)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("step_") and CORRUPT in p.name)


def set_aside(path: str | os.PathLike) -> pathlib.Path:
    """Rename the unreadable checkpoint ``path`` to ``path.corrupt`` (``.corrupt.1``, ... when
    that name is taken) and return the new name: out of :func:`list_checkpoints`, so that it
    neither counts toward ``keep`` nor is tried by the next resume. Raises ``OSError`` when it
    cannot be renamed."""
    path = pathlib.Path(path)
    target, n = path.with_name(path.name + CORRUPT), 0
    while target.exists():  # an earlier set-aside file of the same step is evidence too
        n += 1
        target = path.with_name(f"{path.name}{CORRUPT}.{n}")
    os.rename(path, target)
    _fsync_dir(path.parent)
    return target


def save_checkpoint(state: dict[str, Any], run_dir: str | os.PathLike, step: int,
                    keep: int = 3, *, unreadable=()) -> pathlib.Path:
    """Write ``state`` atomically as ``RUN/checkpoints/step_<step>.pt``; keep the ``keep`` newest
    up to ``step``. ``unreadable``: checkpoint files known to be damaged (a resume skipped them
    and could not set them aside); they neither count toward ``keep`` nor are deleted.

    Raises:
        CheckpointError: the file cannot be written (a full disk, say); nothing is left behind,
            not even on Ctrl-C or SIGTERM during the write.
    """
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    def write(tmp: pathlib.Path) -> None:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)

    try:
        write_atomic(path, write, durable=True)
    except (OSError, RuntimeError) as exc:  # torch.save reports a short write as RuntimeError
        raise CheckpointError(f"{path}: cannot be written ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else exc}); free space or "
                              f"choose another --out, then --resume from the last checkpoint"
                              ) from exc
    _fsync_dir(path.parent)
    # Files of later steps are unreadable ones a resume skipped (it takes the newest readable
    # one): they do not count toward ``keep``, or a good older checkpoint would go in their
    # place; this run overwrites each when it reaches that step.
    damaged = {pathlib.Path(p) for p in unreadable} - {path}
    ours = list_checkpoints(run_dir)
    ours = [p for p in ours[:ours.index(path) + 1] if p not in damaged]
    for old in ours[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _fsync_dir(folder: pathlib.Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_map_location(map_location):
    """``map_location`` as ``torch.load`` takes it: a CPU or CUDA device name or ``torch.device``
    becomes ``"cpu"`` or ``"cuda[:N]"`` (``"cpu:0"`` is a CPU too); a dict or a callable is
    passed on.

    Raises:
        ValueError: not a CPU or CUDA device (``mps``, ``meta``, a malformed name, a number),
            or a CUDA device this machine does not have. torch.load's own error for these
            reads like a damaged file.
    """
    if isinstance(map_location, dict) or (callable(map_location)
                                          and not isinstance(map_location, torch.device)):
        return map_location
    device = parse_device(map_location)
    if device is None:
        raise ValueError(f"map_location={map_location!r} is not a device TxFM checkpoints load "
                         f"on; pass 'cpu', 'cuda' or 'cuda:N' (or a dict or a function, as "
                         f"torch.load takes)")
    problem = device_problem(device)
    if problem:
        raise ValueError(f"map_location={map_location!r}: {problem}; load on 'cpu' and move "
                         f"the model")
    return str(device)


def _first_sentence(exc: BaseException) -> str:
    """The cause's first line and sentence: torch's zip errors append a paragraph of advice
    that would bury the file's name in a CLI's one error line."""
    text = (str(exc).strip().splitlines() or [""])[0]
    head, dot, _ = text.partition(". ")
    return head + ("." if dot else "")


def _failing_record(path: pathlib.Path) -> str | None:
    """The first record of the checkpoint's zip archive whose bytes fail the CRC-32 that
    torch.save stored for it, or None (also for a file that is no zip: torch.load judges it).
    torch.load does not check these CRCs, so a flipped bit in a weight would load silently."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """Load one checkpoint file or raise :class:`CheckpointError` naming it and why."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass a run folder (the --out "
                              "of `txfm train`) or one of its checkpoints/step_*.pt files")
    map_location = check_map_location(map_location)
    damaged = _failing_record(path)
    if damaged is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: its record {damaged} fails its "
                              f"CRC-32 (bytes changed on disk or in a copy); a run folder's "
                              f"--resume and `txfm embed` fall back to the previous checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - zip, pickle and EOF errors all mean "unreadable"
        raise CheckpointError(
            f"checkpoint {path} ({path.stat().st_size} bytes) cannot be read: it is truncated or "
            f"corrupt, or not a TxFM checkpoint ({type(exc).__name__}: "
            f"{_first_sentence(exc)})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a TxFM checkpoint (format "
                              f"{state.get('format') if isinstance(state, dict) else type(state)})")
    return state


def newest_readable(run_dir: str | os.PathLike, map_location="cpu"
                    ) -> tuple[pathlib.Path, dict[str, Any], list[tuple[pathlib.Path, str]]] | None:
    """Newest checkpoint of the run that loads, as ``(path, state, skipped)``: ``skipped`` holds
    ``(file, problem)`` for each newer file that does not load. None if the run has none; if
    none loads, raises :class:`CheckpointError` listing every file and its problem."""
    candidates = list_checkpoints(run_dir)
    if not candidates:
        return None
    skipped = []
    for path in reversed(candidates):
        try:
            state = read_checkpoint(path, map_location)
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
            continue
        return path, state, skipped
    raise CheckpointError(f"no readable checkpoint in {checkpoint_dir(run_dir)}: "
                          + "; ".join(problem for _, problem in skipped))


def latest_checkpoint(run_dir: str | os.PathLike, map_location="cpu"
                      ) -> tuple[pathlib.Path, dict[str, Any]] | None:
    """Newest checkpoint of the run that loads, as ``(path, state)``; None if the run has none.

    Unreadable newer ones are skipped with a warning naming them (and left where they are:
    only a resumed run, which writes the folder, sets them aside); if none loads, raises
    :class:`CheckpointError` listing every file and its problem.
    """
    found = newest_readable(run_dir, map_location)
    if found is None:
        return None
    path, state, skipped = found
    if skipped:
        warnings.warn("skipping unreadable checkpoint(s); using the previous good one "
                      f"{path}:\n  " + "\n  ".join(p for _, p in skipped), RuntimeWarning,
                      stacklevel=2)
    return path, state


def _aside_note(run_dir) -> str:
    """Names the run's set-aside unreadable checkpoints, for a "no checkpoints" message."""
    aside = set_aside_checkpoints(run_dir)
    if not aside:
        return ""
    return (f"; only unreadable ones, set aside as {', '.join(p.name for p in aside)}")


def load_checkpoint(path_or_run_dir: str | os.PathLike, map_location="cpu"):
    """A trained model from a checkpoint file or a run folder (its newest readable checkpoint).

    Returns ``(model, config, vocab_genes, info)``: the :class:`txfm.model.TxFM` in eval mode
    on ``map_location``, its :class:`txfm.model.TxFMConfig`, the vocabulary's gene ids (list of
    str, in the model's gene order: row ``i`` of the codebook and of the decoder's gene weights
    is ``vocab_genes[i]``), and ``info`` (``path``, ``step``, ``epoch``, ``samples``,
    ``symbols``, ``vocab_hash``, ``train_config``). The model's ``trained_precision`` is the
    arithmetic it was trained in, ``"bf16"`` or ``"fp32"`` (None for checkpoints older than
    that field).

    Raises:
        CheckpointError: no checkpoint there, or none readable (names each file and why).
        ValueError: ``map_location`` is not a device, or a CUDA device this machine lacks
            (:func:`check_map_location`).
    """
    from txfm.model import TxFM, TxFMConfig

    map_location = check_map_location(map_location)  # before any file is blamed
    target = pathlib.Path(path_or_run_dir)
    if target.is_dir():
        if target.name == CHECKPOINTS and list_checkpoints(target.parent):
            target = target.parent  # RUN/checkpoints given for RUN
        found = latest_checkpoint(target, map_location)
        if found is None:
            raise CheckpointError(f"{target} has no checkpoints (looked in "
                                  f"{checkpoint_dir(target)}{_aside_note(target)}); train with "
                                  f"`txfm train --out {target}` or pass a .pt file")
        path, state = found
    else:
        path = target
        try:
            state = read_checkpoint(path, map_location)
        except CheckpointError as exc:
            older = [p for p in list_checkpoints(path.parent.parent) if p != path]
            hint = f"; the run's other checkpoints: {[str(p) for p in older]}" if older else ""
            raise CheckpointError(f"{exc}{hint}") from exc
    config = TxFMConfig.from_dict(state["model_config"])
    model = TxFM(config, state["n_genes"])
    model.load_state_dict(state["model"])
    model.trained_precision = state.get("precision")
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()
    vocab = state.get("vocab") or {}
    info = {"path": str(path), "step": state.get("step"), "epoch": state.get("epoch"),
            "samples": state.get("samples"), "symbols": vocab.get("symbols"),
            "vocab_hash": vocab.get("hash"), "train_config": state.get("train_config")}
    return model, config, list(vocab.get("genes") or []), info
