"""The lean TxFM trainer (arXiv:2605.31562, training recipe): ``txfm train``, from CSR shards to checkpoints.

* :class:`TrainConfig` (recipe + run settings), :func:`train` / :class:`Trainer`
* :func:`load_checkpoint` — ``(model, config, vocab_genes, info)`` from a run or a ``.pt`` file
* :mod:`txfm.train.flops` — the FLOP formula behind the MFU the progress bar shows
* :class:`RandomCSRSource` — an in-memory corpus for smoke runs and benchmarks (no Zarr)

Nothing here imports anndata or zarr until a run reads on-disk shards.
"""
from __future__ import annotations

from txfm._lazy import lazy_exports

_EXPORTS = {
    "CheckpointError": "checkpoint", "latest_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint", "RECIPES": "config", "TrainConfig": "config",
    "MemoryBatch": "synthetic", "RandomCSRSource": "synthetic", "Trainer": "trainer",
    "TrainingDiverged": "trainer", "TrainResult": "trainer", "sample_batch": "trainer",
    "train": "trainer",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
