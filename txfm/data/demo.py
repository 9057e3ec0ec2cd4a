"""The embedded default data: synthetic datasets converted into shards, made once and reused.

``ensure_demo(root)`` builds ``root/raw`` (the ``.h5ad`` files and ``truth/`` of
:func:`txfm.data.synth.generate`) and ``root/shards`` (their conversion) in a temporary
sibling directory and renames it to ``root`` only when both are complete, so a half-made demo
is never taken for a finished one; concurrent callers (e.g. DDP ranks) each build and the
first rename wins. Takes ~10-20 s on a 2-core CPU.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

# Sized so that learning can be seen on a CPU (docs/learning.md): 250 genes (~210 per
# dataset) at ~8,000 UMIs per cell, so the K = 128 genes shown in training are more than half
# of a cell's profile and carry about three genes of every program (K = 128 of ~830 genes left
# even an oracle far below PCA); 20 perturbations, each moving its own gene program of 4-6
# genes (chance top-1: 5%).
DEMO_SYNTH = dict(cells=16_000, genes=250, perturbations=20, batches=3, bulk=40, programs=22,
                  program_size=(4, 6), depth=8_000.0, shift=(1.0, 2.0),
                  distinct_programs=True, seed=0)
# The paper's filters (1,000 cells / 2,000 genes) are for atlas-sized data; these keep the
# demo's cells while still exercising both filters.
DEMO_CONVERT = dict(min_cells=20, min_genes=100, val_fraction=0.02, seed=0)
MARKER = "txfm-demo.json"


@dataclass(frozen=True)
class DemoData:
    root: Path
    shards: Path  # the shard collection (txfm.data.ShardLoader / txfm train --data)
    raw: Path  # synthetic .h5ad inputs
    truth: Path  # ground truth: gene_programs.tsv, relationships.txt, perturbation_effects.tsv


def _paths(root: Path) -> DemoData:
    return DemoData(root, root / "shards", root / "raw", root / "raw" / "truth")


def _complete(root: Path) -> bool:
    marker = root / MARKER
    if not marker.is_file():
        return False
    try:
        doc = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return (doc == _marker() and (root / "shards" / "manifest.json").is_file())


def _marker() -> dict:
    """What a complete demo records: its recipe, the shard format and the ``.h5ad`` layout it
    was written in (a demo of an older format or layout is rebuilt)."""
    from .layout import FORMAT_VERSION
    from .synth import H5AD_LAYOUT

    return json.loads(json.dumps({"synth": DEMO_SYNTH, "convert": DEMO_CONVERT,
                                  "format": FORMAT_VERSION, "raw": H5AD_LAYOUT}))


def ensure_demo(root, *, progress: bool = False, log=None) -> DemoData:
    """The demo data under ``root``, generated and converted first if not already complete."""
    from .convert import convert
    from .synth import generate

    root = Path(root)
    if _complete(root):
        return _paths(root)
    if root.exists() and any(root.iterdir()):
        if (root / MARKER).exists() or (root / "shards").exists() or (root / "raw").exists():
            shutil.rmtree(root)  # an older or damaged demo of ours: rebuild it
        else:
            raise FileExistsError(f"{root} exists and is not a txfm demo folder; remove it or "
                                  f"choose another location")
    log = log or (lambda msg: None)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        result = generate(tmp / "raw", **DEMO_SYNTH)
        convert(result.datasets, tmp / "shards", progress=progress, log=log, **DEMO_CONVERT)
        (tmp / MARKER).write_text(json.dumps(_marker()))
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
