"""From stored cells to model inputs: the one route shared by training and ``txfm embed``.

* :func:`open_loader` — the training or validation loader of ``txfm train --data``: a shard
  collection, the demo corpus (``None``) or an in-memory ``random[:...]`` source.
* :func:`vocabulary` — the gene vocabulary of a loader, as kept in checkpoints.
* :func:`model_inputs` — a CSR batch of raw counts (on the device) -> the encoder's shown genes
  and values and the dense loss target: library-size normalisation to ``target_sum``,
  ``log1p`` and the draw of K observable genes (arXiv:2605.31562, preprocessing and masking),
  by :func:`txfm_kernels.masked_sample`, keyed by ``(seed, offset)``.
"""
from __future__ import annotations

import pathlib

import torch

from txfm_kernels.sample import masked_sample


def demo_root() -> pathlib.Path:
    """Where plain ``txfm train`` keeps the synthetic demo corpus (git-ignored)."""
    return pathlib.Path("txfm-demo")


def open_loader(data: str | None, split: str, batch_size: int, *, seed: int, rank: int,
                world_size: int, pin_memory: bool):
    """The loader of ``data``: a shards folder, None (the demo shards) or ``random[:...]``.

    Training batches are all full (``drop_last``: equal counts on every rank); validation keeps
    its last, partial batch, so a split smaller than one batch is still used.
    """
    shuffle = drop_last = split == "train"
    if data is not None and str(data).startswith("random"):
        from txfm.train.synthetic import RandomCSRSource, parse_random_spec

        kwargs = parse_random_spec(str(data))
        return RandomCSRSource(batch_size=batch_size, split=split, shuffle=shuffle,
                               drop_last=drop_last, pin_memory=pin_memory, rank=rank,
                               world_size=world_size, **kwargs)
    from .loader import ShardLoader  # anndata/zarr: imported only for on-disk shards

    if data is None:
        from .demo import ensure_demo_shards

        data = ensure_demo_shards(demo_root())
    return ShardLoader(data, batch_size, split=split, shuffle=shuffle, seed=seed,
                       drop_last=drop_last, pin_memory=pin_memory, rank=rank, world_size=world_size)


def vocabulary(loader) -> dict:
    """``{"genes": [G] ids, "symbols": [G] or None, "hash": vocabulary hash or None}``."""
    manifest = getattr(loader, "manifest", None)
    genes = getattr(manifest, "genes", None)
    symbols = getattr(manifest, "symbols", None)
    if genes is not None and hasattr(genes, "columns"):  # a DataFrame
        frame = genes
        id_col = next((c for c in ("gene_id", "id", "ensembl_id") if c in frame.columns), None)
        sym_col = next((c for c in ("symbol", "gene_symbol", "name") if c in frame.columns), None)
        genes = list(frame[id_col] if id_col else frame.index)
        symbols = list(frame[sym_col]) if sym_col else symbols
    genes = [str(g) for g in genes] if genes is not None else [str(i) for i in range(loader.n_genes)]
    symbols = [str(s) for s in symbols] if symbols is not None else None
    return {"genes": genes, "symbols": symbols, "hash": getattr(manifest, "vocab_hash", None)}


def model_inputs(batch, *, n_genes: int, config, observable, seed: int, offset: int,
                 k: int | None = None, gene_weights: torch.Tensor | None = None,
                 return_target: bool = True, out=None):
    """Encoder inputs (+ target) of a CSR batch: a :class:`txfm_kernels.MaskedSample`.

    Args:
        batch: ``indptr [B+1]`` int64, ``indices [nnz]`` int32, ``counts [nnz]`` and
            ``dataset_ids [B]`` int32 tensors on one device (a loader batch moved there).
        config: the :class:`txfm.model.TxFMConfig` (``k``, ``target_sum``, ``tau`` and
            ``backend``).
        observable: :class:`txfm_kernels.ObservableGenes` on that device, or None (every gene).
        seed, offset: the draw's key: row ``b`` draws from ``(seed, offset, b)``.
        k: shown genes (default ``config.k``; ``txfm embed`` shows more).
        gene_weights: ``[G]`` m_i for ``tau != 0`` draws; None: uniform draws.
        out: a previous result of the same shape to write into.
    """
    weighted = gene_weights is not None and config.tau != 0.0
    return masked_sample(
        batch.indptr, batch.indices, batch.counts, n_genes=n_genes,
        k=config.k if k is None else k, observable=observable,
        dataset_ids=batch.dataset_ids if observable is not None else None,
        target_sum=config.target_sum, seed=seed, offset=offset,
        tau=config.tau if weighted else 0.0, gene_weights=gene_weights if weighted else None,
        return_target=return_target, out=out,
        backend=config.backend)
