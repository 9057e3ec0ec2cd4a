"""The lean TxFM trainer (arXiv:2605.31562, training recipe): ``txfm train``, from CSR shards to checkpoints.

* :class:`TrainConfig` (recipe + run settings), :func:`train` / :class:`Trainer`
* :func:`load_checkpoint` — ``(model, config, vocab_genes, info)`` from a run or a ``.pt`` file
* :mod:`txfm.train.flops` — the FLOP formula behind the MFU the progress bar shows
* :class:`RandomCSRSource` — an in-memory corpus for smoke runs and benchmarks (no Zarr)

Nothing here imports anndata or zarr until a run reads on-disk shards.
"""
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from .config import RECIPES, TrainConfig
from .synthetic import MemoryBatch, RandomCSRSource
from .trainer import Trainer, TrainingDiverged, TrainResult, sample_batch, train

__all__ = ["TrainConfig", "RECIPES", "Trainer", "TrainResult", "TrainingDiverged", "train",
           "load_checkpoint", "latest_checkpoint", "CheckpointError", "RandomCSRSource",
           "MemoryBatch", "sample_batch"]
