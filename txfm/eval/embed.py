"""Cell embeddings and gene representations from a trained TxFM checkpoint (arXiv:2605.31562, evaluation).

* :func:`embed_anndata` — what ``txfm embed`` does, on an AnnData in memory: its counts
  (``.X``, a layer or ``.raw``) mapped onto the model's genes, embedded, and written to
  ``adata.obsm[key]`` as scanpy's tools write ``X_pca``.
* :func:`embed_counts` — CLS embeddings ``[cells, d]`` of raw counts whose columns are already
  in the model's vocabulary. The K shown genes of each cell are drawn by
  :func:`txfm_kernels.masked_sample` (library-size normalisation + ``log1p`` + uniform draw
  of K observable genes, as in training). The sampler keys row ``b`` of a call by
  ``(seed, offset, b)``; it is called on fixed blocks of ``KEY_BLOCK`` cells with
  ``offset`` = block number, so cell ``i``'s genes depend only on ``(seed, i)``, not on the
  batch size or device. ``draws=R`` averages the embeddings of R independent draws (seeds
  ``seed, seed+1, ...``). Only the genes the input profiles *and* the vocabulary holds are
  observable, so unprofiled genes are never shown as zeros.
* :func:`gene_representations` — the encoder codebook ``E [G, d-1]`` and the decoder's gene
  weights ``W [G, hidden]`` (``[G, d]`` with ``decoder_depth=0``).
* :func:`remap_to_vocabulary` — an input's counts with their columns moved onto the
  vocabulary (unmapped genes dropped, genes mapped twice summed).

Cost: one encoder forward per cell and draw, batched (``batch_size`` cells); memory
``O(batch_size * K * d)`` activations. On CUDA the forward runs under bf16 autocast by default,
unless the model was trained in fp32 (:func:`resolve_precision`).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd
import scipy.sparse as sp

from txfm.model.config import PRECISIONS

from . import EMBED_K_FACTOR
from .genemap import GENE_TABLE, GeneMatch, GeneTable, combine_routes, match_routes

KEY_BLOCK = 64


def load_model(checkpoint: str, device: str = "cpu"):
    """``(model, config, vocab_genes, info)`` from a run folder or checkpoint file, the model
    in eval mode on ``device`` (``auto``: CUDA when there is one; ``cpu``, ``cuda``,
    ``cuda:N``); ``info["path"]`` and ``info["step"]`` name the checkpoint file actually read.
    A tuple, so ``model, config, vocab, info = load_model(RUN)``.

    Raises:
        CheckpointError: unreadable; no gene vocabulary of the model's size; a parameter
            that is NaN or infinite (a diverged run: use an earlier checkpoint).
        txfm.cli.UsageError: (a ``ValueError``) ``device`` not a device name, or CUDA where
            there is none.
    """
    import torch

    from txfm.train import load_checkpoint
    from txfm.train.checkpoint import CheckpointError

    device = resolve_device(device)
    model, config, vocab, info = load_checkpoint(checkpoint, map_location="cpu")
    where = info.get("path", checkpoint)
    vocab = list(vocab or [])
    if len(vocab) != getattr(model, "n_genes", len(vocab)):
        raise CheckpointError(f"{where}: holds {len(vocab)} vocabulary genes for a model of "
                              f"{model.n_genes}; it was not written by txfm train (or is "
                              f"damaged), so its genes cannot be named")
    bad = [n for n, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} parameter(s) hold NaN or inf ({bad[0]}"
                              f"{', ...' if len(bad) > 1 else ''}): the run diverged before "
                              f"this step; use an earlier checkpoint (RUN/checkpoints/)")
    model = model.to(device).eval()
    return model, config, vocab, info


def resolve_precision(precision: str, device: str, trained: str | None = None) -> str:
    """``"fp32"`` or ``"bf16"``: the arithmetic of the embedding forward.

    ``"auto"`` is fp32 on the CPU; on CUDA it is the precision the model was trained in
    (``trained``: the model's ``trained_precision``, set by :func:`load_model`), bf16 when
    that is unknown.
    A model trained in fp32 can keep part of its cell state in low-variance directions of the
    CLS embedding that bf16 rounding erases: on the CPU-trained model of the earlier demo (until
    2026-12-01), a bf16 forward lowered the perturbation benchmark's average from 59.8 to 55.8
    (``docs/learning.md``).

    Raises:
        ValueError: ``precision`` not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if not str(device).startswith("cuda"):
        return "fp32"
    return "fp32" if trained == "fp32" else "bf16"


def resolve_device(device: str, option: str = "device") -> str:
    """``cpu`` or ``cuda[:N]`` for ``device``: ``auto`` (CUDA when there is one), ``cpu``,
    ``cuda`` or ``cuda:N``.

    Raises:
        txfm.cli.UsageError: (a ``ValueError``) another name, or CUDA this machine lacks; the
            message names ``option`` (``--device`` for the CLI).
    """
    import torch

    from txfm.cli import check_device

    device = check_device(option, str(device))
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def map_input_genes(var, vocab: list[str], table: GeneTable | None = None,
                    vocab_symbols: list[str] | None = None) -> GeneMatch:
    """Match an AnnData's genes (``var_names`` and any id/symbol column) onto ``vocab`` (the
    checkpoint's gene ids) or its symbols: each gene by the best route that maps it
    (:func:`txfm.eval.genemap.combine_routes`), so names mixing Ensembl ids and symbols map
    whole.

    Args:
        var: the AnnData's ``var`` (a DataFrame indexed by gene name), or a list of names.
    Features whose ``var["feature_types"]`` is not ``Gene Expression`` (10x antibody or CRISPR
    guide captures) are never mapped, even when named like a gene.
    """
    from .io import gene_name_columns

    if not isinstance(var, pd.DataFrame):
        var = pd.DataFrame(index=pd.Index([str(v) for v in var]))
    alts, names = gene_name_columns(var)
    routes = match_routes(alts, vocab, table, query_names=names)
    if vocab_symbols is not None and len(vocab_symbols) == len(vocab):
        routes += [dataclasses.replace(m, how=m.how + ", onto vocabulary symbols")
                   for m in match_routes(alts, [str(s) for s in vocab_symbols], table,
                                         query_names=names)]
    ftype = next((c for c in ("feature_types", "feature_type") if c in var.columns), None)
    other = (var[ftype].astype(str) != "Gene Expression").to_numpy() if ftype is not None \
        else np.zeros(len(var), bool)
    if other.any():  # left out before combining, so they take no vocabulary gene from a gene
        routes = [dataclasses.replace(m, index=np.where(other, -1, m.index),
                                      case=m.case & ~other) for m in routes]
    best = combine_routes(routes)
    if other.any():
        n = int(other.sum())
        best = dataclasses.replace(
            best, how=f"{best.how}; {n:,} feature{'' if n == 1 else 's'} of other types "
                      f"({', '.join(sorted(set(var[ftype][other].astype(str))))}) left out")
    return best


def remap_to_vocabulary(counts: sp.csr_matrix, index: np.ndarray, n_genes: int
                        ) -> tuple[sp.csr_matrix, np.ndarray]:
    """Move the columns of ``counts [cells, genes_in]`` onto the vocabulary.

    Args:
        counts: ``[cells, genes_in]`` scipy sparse matrix or 2-D array of raw counts.
        index: ``[genes_in]`` integer vocabulary position of each input gene, -1 = not in
            vocabulary (:func:`map_input_genes` ``.index``).
    Returns:
        ``(csr [cells, n_genes] float32 with sorted indices, observable [n_genes] bool)``.
    Raises:
        TypeError: ``counts`` not a matrix, ``index`` not integer.
        ValueError: ``index`` of the wrong length or out of ``[-1, n_genes)``; no gene mapped.
    """
    counts = _as_csr(counts, "counts")
    index = np.asarray(index)
    if index.ndim != 1 or index.shape[0] != counts.shape[1]:
        raise ValueError(f"index must be [{counts.shape[1]}] (one entry per input gene, "
                         f"counts' columns), got shape {index.shape}")
    if index.size and not np.issubdtype(index.dtype, np.integer):
        raise TypeError(f"index must hold integer vocabulary positions (-1: unmapped), got "
                        f"{index.dtype}")
    bad = (index < -1) | (index >= n_genes)
    if bad.any():
        raise ValueError(f"index holds {int(bad.sum())} positions outside [-1, {n_genes}) (first: "
                         f"{int(index[bad][0])} for input gene {int(np.flatnonzero(bad)[0])}); "
                         f"n_genes={n_genes} is the vocabulary size")
    if (index >= 0).sum() == 0:
        raise ValueError("no input gene maps onto the model's vocabulary: check the gene "
                         f"names (var_names / var['gene_ids'] / var['symbol']) or pass "
                         f"{GENE_TABLE} to translate Ensembl ids <-> symbols")
    kept = np.flatnonzero(index >= 0)
    sub = counts.tocsc()[:, kept]
    # Column j of ``sub`` goes to vocabulary gene index[kept[j]]; a selection matrix does the
    # move and sums genes that map to the same vocabulary entry.
    move = sp.csr_matrix((np.ones(len(kept), np.float32), index[kept], np.arange(len(kept) + 1)),
                         shape=(len(kept), n_genes))
    out = (sub.tocsr() @ move).tocsr().astype(np.float32)
    out.sort_indices()
    out.eliminate_zeros()
    observable = np.zeros(n_genes, dtype=bool)
    observable[index[kept]] = True
    return out, observable


def _as_csr(counts, name: str) -> sp.csr_matrix:
    """``counts`` (scipy sparse or 2-D array-like) as CSR in canonical form (sorted, one entry
    per (cell, gene): scipy's duplicate entries summed, as scipy reads them; the caller's own
    matrix when it already is), checked to be finite and >= 0; TypeError/ValueError naming it."""
    if hasattr(counts, "to_memory") and not sp.issparse(counts):  # a backed AnnData's .X
        counts = counts.to_memory()
    if sp.issparse(counts):
        if counts.ndim != 2:
            raise ValueError(f"{name} must be 2-D [cells, genes], got shape {counts.shape}")
        out = counts.tocsr()
        if not out.has_canonical_format:  # summed on a copy: the caller's matrix stays as it is
            out = out.copy()
            out.sum_duplicates()
    else:
        if hasattr(counts, "detach"):  # a torch tensor
            counts = counts.detach().cpu().numpy()
        try:
            arr = np.asarray(counts, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a scipy sparse matrix or a 2-D numeric array of "
                            f"raw counts, got {type(counts).__name__}") from exc
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D [cells, genes], got shape {arr.shape}")
        out = sp.csr_matrix(arr)
    bad = ~np.isfinite(out.data) | (out.data < 0)
    if bad.any():
        cell = int(np.searchsorted(out.indptr, np.flatnonzero(bad)[0], side="right")) - 1
        raise ValueError(f"{name}: {int(bad.sum()):,} values are NaN, infinite or negative "
                         f"(first in cell {cell}); raw counts expected")
    return out


def embed_counts(model, counts: sp.csr_matrix, observable: np.ndarray, *, k: int,
                 draws: int = 1, seed: int = 0, batch_size: int = 256, device: str = "cpu",
                 target_sum: float | None = None, precision: str = "auto",
                 progress: bool = True, library_size: float | None = None) -> np.ndarray:
    """CLS embeddings of cells.

    Args:
        model: a TxFM model with ``embed(gene_ids [B,K] int32, values [B,K] fp32,
            key_padding_mask [B,K] bool) -> [B, d]``.
        counts: ``[cells, G]`` raw counts in vocabulary columns (:func:`remap_to_vocabulary`):
            a scipy sparse matrix (CSR preferred) or a 2-D array.
        observable: ``[G]`` bool (numpy or torch), the genes this input profiles (what
            :func:`remap_to_vocabulary` returns); a one-dataset
            :class:`~txfm_kernels.ObservableGenes` is accepted too.
        k: shown genes per cell. ``txfm embed`` shows every observable gene, at most
            ``EMBED_K_FACTOR`` (8) x the model's training ``config.k``
            (``min(observable.sum(), 8 * config.k)``), which embeds better than the training
            K (docs/learning.md); pass that for the same embeddings as the CLI.
        draws: embeddings of this many independent draws are averaged (draw ``r`` uses seed
            ``seed + r``).
        seed: in ``[0, 2^63 - draws)``. When ``k`` is below the observable genes, cell
            ``i``'s draw is keyed by ``(seed, i)``: its row position, so reordering or
            subsetting the cells changes which genes each is shown.
        target_sum: the library-size normalisation; default the model's own
            (``model.config.target_sum``, what it was trained with).
        batch_size: cells per forward (memory ``O(batch_size * k * d)`` activations); it
            changes no embedding.
        device: ``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``.
        progress: a tqdm bar over the batches.
        library_size: the deprecated name of ``target_sum`` (a warning; kept for one release).
        precision: ``fp32``, ``bf16`` (autocast) or ``auto``: fp32 on the CPU; on CUDA the
            model's ``trained_precision`` (set by :func:`load_model`), bf16 when unknown
            (:func:`resolve_precision`).

    The model runs in eval mode (no dropout or stochastic depth) and is left in the mode it
    came in.

    Returns:
        ``[cells, d]`` float32. ``k`` above the number of observable genes shows them all.
    Raises:
        TypeError: ``model`` not a TxFM model; ``counts`` not a matrix.
        ValueError: no cells; ``draws``, ``k`` or ``batch_size`` not an integer >= 1;
            ``seed`` outside ``[0, 2^63 - draws)``; ``target_sum`` not a finite number > 0;
            ``counts`` not ``[cells, G]`` of the model's vocabulary; ``observable`` not ``[G]``
            bool or all False; ``device`` not ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, or
            CUDA where there is none.
    """
    import torch
    from tqdm.auto import tqdm

    import txfm_kernels

    if library_size is not None:  # the name before target_sum; kept for one release
        import warnings

        warnings.warn("embed_counts(library_size=) is deprecated: pass target_sum=",
                      DeprecationWarning, stacklevel=2)
        target_sum = library_size
    if isinstance(model, tuple):
        raise TypeError("model must be the TxFM module: load_model(...) returns "
                        "(model, config, vocab, info); pass its first element")
    if not hasattr(model, "embed"):
        raise TypeError(f"model must be a TxFM model (load_model(...)[0]), got "
                        f"{type(model).__name__}")
    counts = _as_csr(counts, "counts")
    if counts.shape[0] == 0:
        raise ValueError("no cells to embed")
    for name, v in (("k", k), ("draws", draws), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
            or not 0 <= seed < 2**63 - draws:
        raise ValueError(f"seed must be an integer in [0, 2^63 - draws), got {seed!r}")
    own = float(getattr(getattr(model, "config", None), "target_sum", 1e5))
    target_sum = own if target_sum is None else target_sum
    if isinstance(target_sum, bool) or not isinstance(target_sum, (int, float, np.number)) \
            or not np.isfinite(target_sum) or target_sum <= 0:
        raise ValueError(f"target_sum must be a finite number > 0, got {target_sum!r} (leave "
                         f"it out for the model's own, {own:g})")
    n_genes = counts.shape[1]
    vocab_size = getattr(model, "n_genes", n_genes)
    if n_genes != vocab_size:
        raise ValueError(f"counts has {n_genes} columns but the model's vocabulary {vocab_size} "
                         "genes; move the columns onto it with remap_to_vocabulary")
    if isinstance(observable, txfm_kernels.ObservableGenes):  # the kernels' table
        if observable.n_datasets != 1:
            raise ValueError(f"observable is an ObservableGenes of {observable.n_datasets} "
                             f"datasets; pass this input's own: a [{n_genes}] bool array")
        observable = observable.mask[0].cpu().numpy()
    elif isinstance(observable, torch.Tensor):
        observable = observable.cpu().numpy()
    observable = np.asarray(observable)
    if observable.shape != (n_genes,) or observable.dtype != bool:
        raise ValueError(f"observable must be [{n_genes}] bool, got {observable.shape} "
                         f"{observable.dtype}")
    if not observable.any():
        raise ValueError("observable marks no gene: the input profiles none of the model's "
                         "genes (see remap_to_vocabulary)")
    k = min(int(k), int(observable.sum()))  # more would only add padding
    device = resolve_device(device)
    obs = txfm_kernels.ObservableGenes.from_mask(torch.as_tensor(observable)).to(device)
    use_bf16 = resolve_precision(precision, device,
                                 getattr(model, "trained_precision", None)) == "bf16"
    # the draw is keyed by whole blocks of KEY_BLOCK cells; the forward takes batch_size of them
    chunk = -(-batch_size // KEY_BLOCK) * KEY_BLOCK
    out = None
    bar = tqdm(total=counts.shape[0], desc="embed", unit="cell", disable=not progress)
    training = model.training
    model.eval()  # dropout and stochastic depth off, whatever mode the caller left it in
    try:
        with torch.inference_mode():
            for start in range(0, counts.shape[0], chunk):
                stop = min(start + chunk, counts.shape[0])
                acc = None
                for r in range(draws):
                    parts = [_sample_block(counts, b0, min(b0 + KEY_BLOCK, stop), obs, k=k,
                                           target_sum=target_sum, seed=seed + r, device=device,
                                           config=getattr(model, "config", None))
                             for b0 in range(start, stop, KEY_BLOCK)]
                    gene_ids, values, pad = (torch.cat(t) for t in zip(*parts))
                    with torch.autocast(device_type="cuda" if device.startswith("cuda")
                                        else "cpu", dtype=torch.bfloat16, enabled=use_bf16):
                        e = torch.cat([model.embed(gene_ids[a:a + batch_size],
                                                   values[a:a + batch_size],
                                                   pad[a:a + batch_size]).float()
                                       for a in range(0, stop - start, batch_size)])
                    acc = e if acc is None else acc + e
                emb = (acc / draws).cpu().numpy()
                if out is None:
                    out = np.empty((counts.shape[0], emb.shape[1]), dtype=np.float32)
                out[start:stop] = emb
                bar.update(stop - start)
    finally:
        model.train(training)
        bar.close()
    if not np.isfinite(out).all():
        raise RuntimeError("the model produced NaN/inf embeddings; check the checkpoint and the "
                           "input counts (cells with no counts in the mapped genes?)")
    return out


def _named(name: str, value, cli: bool) -> str:
    """An option as a message names it: ``--key 'x'`` for ``txfm embed``, ``key='x'`` else."""
    return f"--{name.replace('_', '-')} {value!r}" if cli else f"{name}={value!r}"


def check_embed_options(*, key: str, k: int | None, draws: int, seed: int,
                        cli: bool = False) -> None:
    """The options of :func:`embed_anndata` (and ``txfm embed``, which checks them before any
    work) that need no data: ``key`` an ``.obsm`` name, ``k`` None or an integer >= 1,
    ``draws`` an integer >= 1, ``seed`` an integer in ``[0, 2^63 - draws)``.

    Raises:
        txfm.cli.UsageError: naming the option as ``cli`` says (a flag, or the argument).
    """
    from txfm.cli import UsageError

    def integer(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not isinstance(key, str) or not key or "/" in key or key != key.strip():
        raise UsageError(f"{_named('key', key, cli)}: an .obsm key must be a non-empty name "
                         f"without '/' or surrounding spaces (e.g. X_txfm)")
    if k is not None and not (integer(k) and k >= 1):
        raise UsageError(f"{_named('k', k, cli)}: must be an integer >= 1, or left out for the "
                         f"default")
    if not (integer(draws) and draws >= 1):
        raise UsageError(f"{_named('draws', draws, cli)}: must be an integer >= 1")
    if not (integer(seed) and 0 <= seed <= 2**63 - 1 - draws):
        raise UsageError(f"{_named('seed', seed, cli)}: must be an integer in [0, 2^63 - draws)")


def embed_anndata(adata, checkpoint, *, key: str = "X_txfm", layer: str | None = None,
                  k: int | None = None, draws: int = 1, seed: int = 0, batch_size: int = 256,
                  device: str = "auto", precision: str = "auto", gene_table=None,
                  allow_non_integer: bool = False, overwrite: bool = False,
                  progress: bool = True, log=None, source: str = "adata",
                  cli: bool = False) -> np.ndarray:
    """Embed every cell of ``adata`` with a trained model into ``adata.obsm[key]`` (in place,
    as ``sc.tl.pca`` writes ``obsm["X_pca"]``); what ``txfm embed`` does to a file.

    The counts are mapped onto the model's vocabulary by gene id or symbol
    (:func:`map_input_genes`), and each cell is shown ``k`` of its profiled genes
    (:func:`embed_counts`; arXiv:2605.31562, evaluation; docs/learning.md for the default).
    ``adata.uns["txfm_embed"][key]`` records the checkpoint, step, K, draws, seed, precision,
    layer and the genes mapped.

    Args:
        adata: cells x genes AnnData (in memory or backed) of raw integer counts.
        checkpoint: a run folder or checkpoint file, or the tuple :func:`load_model` returns
            (to embed several AnnData with one loaded model).
        key: the ``.obsm`` key written; an existing one needs ``overwrite=True``.
        layer: where the counts are: None (``.X``), a layer name, or ``"raw"`` (``.raw.X``,
            unless a layer is named ``raw``).
        k: shown genes per cell; default every profiled gene, at most ``EMBED_K_FACTOR`` (8)
            x the model's training K.
        draws, seed, batch_size, device, precision: as :func:`embed_counts` (device ``auto``:
            CUDA when there is one; precision ``auto``: the model's training precision).
        gene_table: a :class:`~txfm.eval.genemap.GeneTable` (Ensembl id <-> symbol), or the
            path of its file (``GeneTable.read``), for inputs named otherwise than the model's
            genes.
        allow_non_integer: embed non-integer (normalised, log) values instead of refusing.
        log: called with the one-line summary of the gene mapping (default: silent).
        source: how messages name the input (``txfm embed``: ``--input FILE``); cli: name
            ``txfm embed``'s flags in messages instead of these arguments.
    Returns:
        ``[n_obs, d]`` float32, the array put in ``adata.obsm[key]``.
    Raises:
        txfm.cli.UsageError: (a ``ValueError``) a bad ``key``, ``seed`` or ``layer``; an
            existing ``key`` without ``overwrite``; counts that are not raw counts; no gene
            mapped onto the vocabulary.
        CheckpointError: an unreadable checkpoint.
        TypeError: ``adata`` that is not an AnnData; a ``checkpoint`` of another type.
    Warns (``UserWarning``): genes summed into one vocabulary gene, case-only matches (another
    species?), fewer profiled genes than the training K, 0/1 data, cells without counts.
    """
    import warnings

    import torch

    from txfm.cli import UsageError

    from .io import (GENE_NAME_COLUMNS, count_alternatives, counts_matrix, counts_source,
                     with_counts)

    import anndata

    if not isinstance(adata, anndata.AnnData):
        raise TypeError(f"adata must be an anndata.AnnData (cells x genes), not "
                        f"{type(adata).__name__}: read a file with anndata.read_h5ad(path), or "
                        f"wrap a matrix with anndata.AnnData(X, var=...) naming its genes")
    if isinstance(checkpoint, torch.nn.Module):
        raise TypeError("checkpoint must be a run folder, a checkpoint file or the tuple "
                        "load_model(...) returns, not the model alone")
    if isinstance(checkpoint, tuple) and len(checkpoint) != 4:
        raise TypeError(f"checkpoint: a tuple must be the 4 items load_model(...) returns "
                        f"(model, config, vocab, info), got {len(checkpoint)}")
    if not isinstance(checkpoint, (tuple, str, os.PathLike)):
        raise TypeError(f"checkpoint must be a run folder or checkpoint file (str or Path) or "
                        f"the tuple load_model(...) returns, not {type(checkpoint).__name__}")
    check_embed_options(key=key, k=k, draws=draws, seed=seed, cli=cli)
    if adata.isbacked and adata.is_view:
        raise UsageError(f"{source} is a view of a backed AnnData, which cannot take .obsm: "
                         f"call .to_memory() on the view first")
    device = resolve_device(device)
    if isinstance(checkpoint, tuple):
        model, config, vocab, info = checkpoint
        model = model.to(device)
    else:
        model, config, vocab, info = load_model(str(checkpoint), device)
    counted = with_counts(adata, layer, source, "")
    raw = counts_matrix(counted, source, "--layer" if cli else "layer=",
                        matrix=counts_source(adata, layer),
                        non_integer="accept" if allow_non_integer else "refuse",
                        alternatives=count_alternatives(adata, "--layer {}" if cli
                                                        else "layer={!r}"),
                        allow_option="--allow-non-integer" if cli else "allow_non_integer=True")
    if key in adata.obsm and not overwrite:
        raise UsageError(f"{_named('key', key, cli)}: {source} already has .obsm[{key!r}]; "
                         f"choose another key or pass {'--overwrite' if cli else 'overwrite=True'}"
                         f" to replace it")
    if isinstance(gene_table, (str, os.PathLike)):  # what txfm embed --gene-table takes
        gene_table = GeneTable.read(gene_table)
    elif gene_table is not None and not isinstance(gene_table, GeneTable):
        raise TypeError(f"gene_table must be a GeneTable, a path to its file or None, got "
                        f"{type(gene_table).__name__}")
    match = map_input_genes(counted.var, vocab, gene_table, info.get("symbols"))
    if log is not None:
        log(f"{counted.n_obs:,} cells; {match.summary(len(vocab))}")
    clash = match.collisions()
    if clash.size:
        names = [str(counted.var_names[i]) for i in clash[:6]]
        warnings.warn(f"{clash.size:,} input genes share a vocabulary gene with another and are "
                      f"summed ({', '.join(names)}{' ...' if clash.size > 6 else ''})",
                      stacklevel=2)
    if match.n_case > match.n_mapped // 2:
        warnings.warn(f"{match.n_case:,} of the {match.n_mapped:,} mapped genes match only "
                      f"ignoring upper/lower case: another species' genes (Cd4 for CD4)? check "
                      f"that the model was trained on this organism", stacklevel=2)
    try:
        counts, observable = remap_to_vocabulary(raw, match.index, len(vocab))
    except ValueError as err:
        cols = list(map(str, counted.var.columns))
        raise UsageError(f"{source}: {err} (var columns: {cols or 'none'}; names tried: "
                         f"var_names and any column named {', '.join(GENE_NAME_COLUMNS)})"
                         ) from err
    if int(observable.sum()) < int(config.k):
        warnings.warn(f"the input profiles {int(observable.sum()):,} of the model's genes, fewer "
                      f"than the K={config.k} it was shown per cell in training: the embeddings "
                      f"see less of each cell than the model expects", stacklevel=2)
    if counts.nnz and float(counts.data.max()) <= 1.0:
        warnings.warn(f"{source}: every count is 0 or 1 (binarised data?): the model expects "
                      f"raw UMI counts", stacklevel=2)
    # more shown genes than in training give better embeddings (docs/learning.md); the cap
    # bounds the quadratic attention cost on inputs that profile tens of thousands of genes;
    # a K above the observable genes would only add padding (memory and time, no change)
    k = min(int(observable.sum()), k or EMBED_K_FACTOR * int(config.k))
    empty = int((np.diff(counts.indptr) == 0).sum())
    if empty:
        warnings.warn(f"{empty:,} cells have no counts in the mapped genes (their embedding is "
                      "that of an empty profile)", stacklevel=2)
    precision = resolve_precision(precision, device, getattr(model, "trained_precision", None))
    if next(model.parameters()).dtype == torch.bfloat16:
        precision = "bf16"  # a model cast to bf16 computes in bf16 whatever autocast says
    emb = embed_counts(model, counts, observable, k=k, draws=draws, seed=seed,
                       batch_size=batch_size, device=device, target_sum=float(config.target_sum),
                       precision=precision, progress=progress)
    adata.obsm[key] = emb
    runs = adata.uns.get("txfm_embed")
    # a record of before per-key records (one run's fields at the top level) is replaced
    runs = dict(runs) if isinstance(runs, dict) and "checkpoint" not in runs else {}
    source = info.get("path", checkpoint if not isinstance(checkpoint, tuple) else "")
    # absolute: the file is read later, from other folders, than the embedding was made
    runs[key] = {"checkpoint": os.path.abspath(source) if str(source) else "",
                 "step": int(info.get("step") or 0), "k": k, "draws": int(draws),
                 "seed": int(seed), "precision": precision, "layer": layer or "X",
                 "genes_mapped": match.n_mapped, "genes_input": len(match.index),
                 "mapping": match.how}
    adata.uns["txfm_embed"] = runs
    return emb


def _sample_block(counts: sp.csr_matrix, b0: int, b1: int, obs, *, k: int, target_sum: float,
                  seed: int, device: str, config=None):
    """Shown genes of cells ``b0:b1`` (one sampler call keyed by block ``b0 // KEY_BLOCK``),
    through the same :func:`txfm.data.inputs.model_inputs` as training."""
    from types import SimpleNamespace

    import torch

    from txfm.data.inputs import model_inputs
    from txfm.model import TxFMConfig

    config = (config or TxFMConfig()).replace(target_sum=target_sum)
    s, e = int(counts.indptr[b0]), int(counts.indptr[b1])
    batch = SimpleNamespace(
        indptr=torch.as_tensor((counts.indptr[b0:b1 + 1] - s).astype(np.int64), device=device),
        indices=torch.as_tensor(counts.indices[s:e].astype(np.int32), device=device),
        counts=torch.as_tensor(counts.data[s:e].astype(np.float32), device=device),
        dataset_ids=torch.zeros(b1 - b0, dtype=torch.int32, device=device))
    m = model_inputs(batch, n_genes=counts.shape[1], config=config, observable=obs, seed=seed,
                     offset=b0 // KEY_BLOCK, k=k, return_target=False)
    return m.gene_ids, m.values, m.key_padding_mask


def gene_representations(model) -> dict[str, np.ndarray]:
    """``{"X_codebook": [G, d-1], "X_decoder": [G, hidden]}`` float32 from a TxFM model: the
    encoder codebook and the decoder's last weight matrix, the paper's gene representations
    (arXiv:2605.31562, evaluation; the decoder ``[G, d]`` with ``decoder_depth=0``)."""
    import torch

    from .relationships import CODEBOOK_KEY, DECODER_KEY

    with torch.no_grad():
        codebook = model.tokenizer.codebook
        codebook = getattr(codebook, "weight", codebook).detach().float().cpu().numpy()
        decoder = model.decoder_gene_weights().detach().float().cpu().numpy()
    if codebook.shape[0] != decoder.shape[0]:
        raise RuntimeError(f"codebook has {codebook.shape[0]} genes but the decoder "
                           f"{decoder.shape[0]}")
    return {CODEBOOK_KEY: codebook, DECODER_KEY: decoder}
