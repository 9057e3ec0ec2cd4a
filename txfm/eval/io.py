"""Reading cells and gene representations for the evaluation commands.

:func:`read_cells` opens what ``txfm embed`` and ``txfm eval perturbation`` accept: an
``.h5ad`` file (read whole, with its ``obs``, ``obsm``, ``layers``, ``uns``), a 10x Cell
Ranger matrix folder (``matrix.mtx[.gz]`` + ``features.tsv[.gz]`` or ``genes.tsv[.gz]`` +
``barcodes.tsv[.gz]``) or a 10x ``.h5`` file (both through the converter's readers), always
as an AnnData with cells as rows.
"""
from __future__ import annotations

import pathlib
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp


def read_10x(path: str | pathlib.Path):
    """A 10x matrix folder or 10x ``.h5`` as AnnData, read by the converter's readers
    (:func:`txfm.data.readers.open_input`), so genes are named the same way in both places:
    ``var_names`` = Ensembl ids where the input has them (version stripped), else symbols;
    ``var["symbol"]`` keeps the symbols as given (duplicates included)."""
    import anndata as ad

    from txfm.data.readers import open_input

    reader = open_input(path)
    try:
        with warnings.catch_warnings():
            # "entries are not grouped by cell; loading the whole matrix": we load it whole anyway
            warnings.filterwarnings("ignore", message=".*not grouped by cell")
            chunks = [chunk.tocsr() for _, chunk in reader.iter_chunks(1 << 24)]
        x = sp.vstack(chunks, format="csr") if len(chunks) > 1 else chunks[0]
        x.sort_indices()
        obs = reader.obs()
        ids, symbols = reader.gene_ids, reader.gene_symbols
        var = pd.DataFrame(index=pd.Index(np.asarray(ids if ids is not None else symbols,
                                                     dtype=str), name=None))
        if ids is not None:
            var["gene_ids"] = np.asarray(ids, dtype=str)
        if symbols is not None:
            var["symbol"] = np.asarray(symbols, dtype=str)
        if reader.feature_types is not None:
            var["feature_types"] = np.asarray(reader.feature_types, dtype=str)
    finally:
        reader.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicated names: made unique just below
        a = ad.AnnData(X=x, obs=obs, var=var)
    a.var_names_make_unique()
    return a


def read_cells(path: str | pathlib.Path, *, layer: str | None = None):
    """AnnData (cells x genes) from ``.h5ad``, a 10x folder or a 10x ``.h5``.

    Args:
        layer: take the counts from ``.layers[layer]`` (``"raw"`` for ``.raw.X``) instead of
            ``.X``; the chosen matrix becomes ``.X`` of the returned object.
    """
    import anndata as ad

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir() or path.suffix in (".h5", ".hdf5"):
        a = read_10x(path)
    elif path.suffix == ".h5ad":
        a = ad.read_h5ad(path)
    else:
        raise ValueError(f"{path}: unknown input type; give an .h5ad file, a 10x matrix folder "
                         "or a 10x .h5 file")
    if a.n_obs == 0 or a.n_vars == 0:
        raise ValueError(f"{path}: empty input ({a.n_obs} cells x {a.n_vars} genes)")
    if layer is not None:
        if layer == "raw":
            if a.raw is None:
                raise KeyError(f"{path}: --layer raw but the file has no .raw")
            a = ad.AnnData(X=a.raw.X, obs=a.obs, var=a.raw.var, obsm=a.obsm, uns=a.uns)
        else:
            if layer not in a.layers:
                raise KeyError(f"{path}: no layer {layer!r} (layers: {list(a.layers.keys())}; "
                               "use 'raw' for .raw.X, or leave --layer out for .X)")
            a.X = a.layers[layer]
    return a


def gene_name_columns(var: pd.DataFrame) -> tuple[list[np.ndarray], list[str]]:
    """Alternative gene names of an AnnData's genes: ``var_names`` and any id/symbol column."""
    alts, names = [np.asarray(var.index, dtype=object)], ["var_names"]
    for col in ("gene_ids", "gene_id", "ensembl_id", "ensembl_gene_id", "symbol", "gene_symbol",
                "gene_symbols", "gene_name", "feature_name"):
        if col in var.columns:
            alts.append(var[col].astype(str).to_numpy(dtype=object))
            names.append(f"var[{col!r}]")
    return alts, names


def counts_matrix(a) -> sp.csr_matrix:
    """``a.X`` as float32 CSR (densely stored counts are converted)."""
    x = a.X
    if x is None:
        raise ValueError("the input has no .X; pass --layer")
    return sp.csr_matrix(x, dtype=np.float32) if not sp.issparse(x) else \
        x.tocsr().astype(np.float32)
