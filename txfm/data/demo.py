"""The embedded default data: synthetic datasets converted into shards, made once and reused.

``ensure_demo(root)`` builds ``root/raw`` (the ``.h5ad`` files and ``truth/`` of
:func:`txfm.data.synth.generate`) and ``root/shards`` (the conversion of the training corpus,
:data:`DEMO_CORPUS`: the atlas and the bulk samples; the screen ``raw/screen.h5ad`` is held
out of training, to be embedded and scored) in a temporary
sibling directory and renames it to ``root`` only when both are complete, so a half-made demo
is never taken for a finished one; concurrent callers (e.g. DDP ranks) each build and the
first rename wins. Takes ~10-20 s on a 2-core CPU.

A finished demo carries the marker file ``txfm-demo.json`` (its recipe and the list of its
files). Only a folder with that marker is ever deleted and rebuilt (an older recipe, or a file
of it missing); any other non-empty folder is refused with :class:`DemoFolderError`.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from txfm.cli import UsageError, file_in_path

# Sized so that learning can be seen on a CPU (docs/learning.md): 250 genes (~210 per
# dataset), so the K = 128 genes shown in training are more than half of a cell's profile and
# carry about three genes of every program (K = 128 of ~830 genes left even an oracle far
# below PCA); 20 perturbations, each moving its own gene program of 4-6 genes (chance top-1:
# 5%). Cells are as shallow per gene as real single cells (~660 UMIs in a screen cell's 208
# genes): at 8,000 UMIs gene space is nearly noise-free and PCA of 208 genes keeps all of it.
DEMO_SYNTH = dict(cells=16_000, genes=250, perturbations=20, batches=3, bulk=40, programs=22,
                  program_size=(4, 6), depth=1_000.0, shift=(1.0, 2.0),
                  distinct_programs=True, seed=0)
# The paper's filters (1,000 cells / 2,000 genes) are for atlas-sized data; these keep the
# demo's cells while still exercising both filters.
DEMO_CONVERT = dict(min_cells=20, min_genes=40, val_fraction=0.02, seed=0)
# The training corpus: the atlas and the bulk samples. The screen is held out of training and
# only embedded and scored, as the paper scores screens its model never saw
# (arXiv:2605.31562, evaluation).
DEMO_CORPUS = ("atlas", "bulk")
MARKER = "txfm-demo.json"


class DemoFolderError(UsageError, FileExistsError):
    """``root`` cannot hold the demo: a file, under a file, not creatable, or a non-empty folder
    that is not a txfm demo. The message starts with the path and says what to do; a
    :class:`~txfm.cli.UsageError` (and, as before, a ``FileExistsError``)."""


@dataclass(frozen=True)
class DemoData:
    root: Path
    shards: Path  # the training corpus's shards (atlas + bulk; txfm train --data)
    raw: Path  # synthetic .h5ad inputs
    truth: Path  # ground truth: gene_programs.tsv, relationships.txt, perturbation_effects.tsv


def _paths(root: Path) -> DemoData:
    return DemoData(root, root / "shards", root / "raw", root / "raw" / "truth")


def _read_marker(root: Path) -> dict | None:
    """The marker's content if ``root`` carries a marker of ours, else None."""
    try:
        doc = json.loads((root / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) and "synth" in doc else None


def _complete(root: Path) -> bool:
    """Whether ``root`` is a finished demo of this recipe with every one of its files present
    (a demo missing a file would otherwise fail only when a command reads that file)."""
    doc = _read_marker(root)
    if doc is None:
        return False
    files = doc.pop("files", None)
    if doc != _marker() or not isinstance(files, list) or "shards/manifest.json" not in files:
        return False
    return all(isinstance(f, str) and (root / f).is_file() for f in files)


def _files(root: Path) -> list[str]:
    """Every file of the demo under ``root``, relative to it (what the marker lists)."""
    return sorted(p.relative_to(root).as_posix() for sub in ("raw", "shards")
                  for p in (root / sub).rglob("*") if p.is_file())


def check_root(root) -> None:
    """Raise :class:`DemoFolderError` unless ``root`` can hold the demo: absent, an empty
    folder, or a folder carrying the demo marker (which :func:`ensure_demo` may rebuild)."""
    root = Path(root)
    blocking = file_in_path(root)
    if blocking is not None:
        raise DemoFolderError(f"{root}: {blocking} is a file, not a folder; choose another "
                              "location")
    if root.exists() and not root.is_dir():
        raise DemoFolderError(f"{root}: is a file, not a folder; remove it or choose another "
                              "location")
    if root.is_dir() and _read_marker(root) is None and any(root.iterdir()):
        raise DemoFolderError(f"{root} exists and is not a txfm demo folder; remove it or "
                              f"choose another location")


def _marker() -> dict:
    """What a complete demo records: its recipe, the shard format and the ``.h5ad`` layout it
    was written in (a demo of an older format or layout is rebuilt)."""
    from .layout import FORMAT_VERSION
    from .synth import H5AD_LAYOUT

    return json.loads(json.dumps({"synth": DEMO_SYNTH, "convert": DEMO_CONVERT,
                                  "corpus": list(DEMO_CORPUS), "format": FORMAT_VERSION,
                                  "raw": H5AD_LAYOUT}))


def _record_sources_under(shards: Path, tmp: Path, root: Path) -> None:
    """Make the manifest name each dataset's source ``.h5ad`` where it will be (under ``root``),
    not in the temporary folder that is renamed to ``root``."""
    from .layout import MANIFEST, write_json_atomic

    doc = json.loads((shards / MANIFEST).read_text())
    tmp = Path(os.path.abspath(tmp))
    for d in doc["datasets"]:
        source = Path(os.path.abspath(d["report"]["path"]))
        if source.is_relative_to(tmp):
            d["report"]["path"] = str(root / source.relative_to(tmp))
    write_json_atomic(shards / MANIFEST, doc)


def ensure_demo(root, *, progress: bool = False, log=None) -> DemoData:
    """The demo data under ``root``, generated and converted first if not already complete.

    Raises:
        DemoFolderError: ``root`` is a file or under one, cannot be created, or is a non-empty
            folder without the demo marker (its files are left untouched).
    """
    from .convert import convert
    from .synth import generate

    root = Path(root)
    if _complete(root):
        return _paths(root)
    check_root(root)
    log = log or (lambda msg: None)
    if root.is_dir() and any(root.iterdir()):  # check_root: it carries our marker
        log(f"{root}: an older or incomplete txfm demo; rebuilding it")
        shutil.rmtree(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise DemoFolderError(f"{root}: cannot be created ({exc.strerror or exc}); choose "
                              "another location") from exc
    try:
        # 21 of the 22 programs asked for fit the sizes drawn: exact counts would redraw them
        # and change the demo every recorded measurement was made on (docs/learning.md)
        result = generate(tmp / "raw", **DEMO_SYNTH, exact_programs=False)
        # the converter's summary names the folder the demo is renamed to, not the temporary one
        corpus = [p for p in result.datasets if p.stem in DEMO_CORPUS]
        convert(corpus, tmp / "shards", progress=progress,
                log=lambda line: log(line.replace(str(tmp), str(root))), **DEMO_CONVERT)
        _record_sources_under(tmp / "shards", tmp, root)
        (tmp / MARKER).write_text(json.dumps({**_marker(), "files": _files(tmp)}))
        try:
            if root.exists():
                root.rmdir()  # empty placeholder
            os.rename(tmp, root)
        except OSError:
            if not _complete(root):  # lost a race to a complete demo is fine; anything else not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root)


def ensure_demo_shards(root, **kwargs) -> Path:
    """Shards folder of the demo under ``root`` (see :func:`ensure_demo`)."""
    return ensure_demo(root, **kwargs).shards
