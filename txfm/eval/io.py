"""Reading cells and gene representations for the evaluation commands.

:func:`read_cells` opens what ``txfm embed`` and ``txfm eval perturbation`` accept: an
``.h5ad`` file (read whole, with its ``obs``, ``obsm``, ``layers``, ``uns``), a 10x Cell
Ranger matrix folder (``matrix.mtx[.gz]`` + ``features.tsv[.gz]`` or ``genes.tsv[.gz]`` +
``barcodes.tsv[.gz]``) or a 10x ``.h5`` file (both through the converter's readers), always
as an AnnData with cells as rows. Every problem with an input or output file raises
:class:`txfm.cli.UsageError` naming the option and the file (``txfm`` prints it as one
``error:`` line).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

from txfm.cli import UsageError, error_message
from txfm.files import write_atomic


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


def read_h5ad(path: str | pathlib.Path, option: str):
    """The AnnData in ``path``; UsageError naming ``option`` if it is missing or unreadable."""
    import anndata as ad

    path = pathlib.Path(path)
    if not path.is_file():
        raise UsageError(f"{option} {path}: no such file")
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 - h5py/anndata raise many types for a bad file
        if _is_10x_h5(path):
            raise UsageError(f"{option} {path}: is a 10x Cell Ranger .h5 file, not an .h5ad; "
                             f"give it its .h5 name") from exc
        half = _sparse_float16(path)
        if half:
            raise UsageError(f"{option} {path}: {', '.join(half)} "
                             f"{'stores' if len(half) == 1 else 'store'} float16 values in a "
                             f"sparse matrix, which scipy.sparse (and so anndata) cannot load; "
                             f"store them as float32 or integers (`txfm data convert` reads "
                             f"such files as they are)") from exc
        raise UsageError(f"{option} {path}: cannot be read as .h5ad ({type(exc).__name__}: "
                         f"{error_message(exc)}); is the file complete (an interrupted copy?)"
                         ) from exc


def _sparse_float16(path: pathlib.Path) -> list[str]:
    """The sparse matrices of an ``.h5ad`` (``X``, ``raw/X``, ``layers``, ``obsm``...) whose
    values are float16: anndata's reader fails on them, as scipy.sparse has no float16."""
    import h5py

    found = []

    def visit(name, obj):
        enc = obj.attrs.get("encoding-type", b"")
        enc = enc.decode() if isinstance(enc, bytes) else str(enc)
        if (isinstance(obj, h5py.Group) and enc in ("csr_matrix", "csc_matrix")
                and "data" in obj and obj["data"].dtype == np.float16):
            found.append(name)

    try:
        with h5py.File(path, "r") as f:
            f.visititems(visit)
    except Exception:  # noqa: BLE001 - not HDF5, or damaged: the caller's message stands
        return []
    return found


def _is_10x_h5(path: pathlib.Path) -> bool:
    """Whether ``path`` is an HDF5 file laid out as Cell Ranger writes (a ``matrix`` group)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "matrix" in f and "obs" not in f
    except Exception:  # noqa: BLE001 - not HDF5 at all
        return False


def write_h5ad(adata, out: str | pathlib.Path, option: str = "--out") -> pathlib.Path:
    """Write ``adata`` to ``out`` atomically (a temporary file renamed onto ``out``), so that an
    interrupted write never leaves a half-written ``out``; UsageError if it cannot be written."""
    out = pathlib.Path(out)
    if out.is_dir():
        raise UsageError(f"{option} {out}: is a folder; give an .h5ad file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, adata.write_h5ad)
    except OSError as exc:
        raise UsageError(f"{option} {out}: cannot be written ({exc})") from exc
    return out


def read_input(path: str | pathlib.Path, option: str = "input"):
    """The AnnData (cells x genes) of an ``.h5ad``, a 10x folder or a 10x ``.h5``, as stored.

    Raises:
        UsageError: ``path`` is missing, unreadable, of an unknown type, or empty.
    """
    from txfm.data.layout import MANIFEST
    from txfm.data.readers import InputError

    path = pathlib.Path(path)
    if not path.exists():
        raise UsageError(f"{option} {path}: no such file or folder")
    suffix = path.suffix.lower()
    if path.is_dir() and (path / MANIFEST).is_file():
        raise UsageError(f"{option} {path}: is a txfm shard collection (the output of `txfm "
                         f"data convert`, for training); give the .h5ad or 10x input it was "
                         f"converted from")
    if path.is_dir() and ((path / "zarr.json").is_file() or (path / ".zgroup").is_file()):
        import anndata as ad

        try:  # an AnnData zarr store (anndata.write_zarr, a txfm shard)
            a = ad.read_zarr(path)
        except Exception as exc:  # noqa: BLE001 - zarr/anndata raise many types for a bad store
            raise UsageError(f"{option} {path}: cannot be read as an AnnData zarr store "
                             f"({type(exc).__name__}: {error_message(exc)})") from exc
    elif path.is_dir() or suffix in (".h5", ".hdf5"):
        try:
            a = read_10x(path)
        except InputError as exc:  # names the file and what is wrong already
            raise UsageError(f"{option} {error_message(exc)}") from exc
        except Exception as exc:  # noqa: BLE001 - h5py/scipy/gzip errors of a damaged input
            raise UsageError(f"{option} {path}: cannot be read as a 10x matrix "
                             f"({type(exc).__name__}: {error_message(exc)})") from exc
    elif suffix == ".h5ad":
        a = read_h5ad(path, option)
    else:
        raise UsageError(f"{option} {path}: unknown input type; give an .h5ad file, an AnnData "
                         ".zarr store, a 10x matrix folder or a 10x .h5 file")
    if a.n_obs == 0 or a.n_vars == 0:
        raise UsageError(f"{option} {path}: empty input ({a.n_obs} cells x {a.n_vars} genes)")
    return a


def with_counts(a, layer: str | None, path, option: str = "input"):
    """An AnnData whose ``.X`` is ``a``'s counts: ``.X``, ``.layers[layer]`` or, for
    ``layer="raw"``, ``.raw.X`` (with ``.raw.var``'s genes). ``a`` itself is left as it is, so
    a command can write it back whole.

    Raises:
        UsageError: no such layer, or ``"raw"`` naming both ``.raw`` and a layer ``raw``.
    """
    import anndata as ad

    if layer is None:
        return a
    where = f"{option} {path}".strip()
    if layer == "raw" and a.raw is not None and "raw" in a.layers:
        raise UsageError(f"{where}: 'raw' names both .raw and layers['raw']; rename the layer "
                         "(or drop .raw) so that the counts are unambiguous")
    if counts_source(a, layer) != ".raw.X":
        return ad.AnnData(X=a.layers[layer], obs=a.obs, var=a.var, obsm=dict(a.obsm))
    if layer == "raw" and a.raw is not None:
        return ad.AnnData(X=a.raw.X, obs=a.obs, var=a.raw.var, obsm=dict(a.obsm))
    if layer == "raw":  # .raw asked for by its name, and the file has none
        raise UsageError(f"{where}: has no .raw (nor a layer 'raw'; layers: "
                         f"{list(a.layers.keys())}); leave the layer option out for .X, or "
                         f"name the layer that holds the raw counts")
    raise UsageError(f"{where}: no layer {layer!r} (layers: {list(a.layers.keys())}"
                     f"{', and .raw' if a.raw is not None else ''}; 'raw' names .raw.X, or "
                     f"leave the layer option out for .X)")


def read_cells(path: str | pathlib.Path, *, layer: str | None = None, option: str = "input"):
    """AnnData (cells x genes) from ``.h5ad``, a 10x folder or a 10x ``.h5``, with the counts
    of ``layer`` as ``.X`` (:func:`read_input`, then :func:`with_counts`).

    Args:
        layer: take the counts from ``.layers[layer]`` (``"raw"`` for ``.raw.X``) instead of
            ``.X``.
        option: the command-line option that named ``path`` (for error messages).
    Raises:
        UsageError: ``path`` is missing, unreadable, empty, or lacks ``layer``.
    """
    return with_counts(read_input(path, option), layer, path, option)


def gene_name_columns(var: pd.DataFrame) -> tuple[list[np.ndarray], list[str]]:
    """Alternative gene names of an AnnData's genes: ``var_names`` and any id/symbol column
    (:data:`GENE_NAME_COLUMNS`, matched ignoring case: ``Gene``, ``gene_ids``, ``SYMBOL``)."""
    alts, names = [np.asarray(var.index, dtype=object)], ["var_names"]
    for col in var.columns:
        if str(col).lower() in GENE_NAME_COLUMNS:
            alts.append(var[col].astype(str).to_numpy(dtype=object))
            names.append(f"var[{col!r}]")
    return alts, names


# var columns that may name genes (lower case), besides var_names
GENE_NAME_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_gene_id", "ensembl",
                     "symbol", "gene_symbol", "gene_symbols", "gene_name", "gene_names",
                     "feature_name", "gene", "genes")


@contextlib.contextmanager
def staged_outputs(out: str | pathlib.Path):
    """A scratch folder beside ``out`` to write a command's result files into; on success
    each is moved into ``out`` (``os.replace``), on any failure (a plot error, Ctrl-C) none is
    and ``out`` keeps what it held, never a mix of two runs' files."""
    import shutil

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        files = sorted(tmp.iterdir())
        taken = [out / f.name for f in files if (out / f.name).is_dir()]
        if taken:  # checked before the first move: all files or none
            raise IsADirectoryError(f"{taken[0]} is a folder, where the result goes in a file "
                                    f"of that name; move it away and run again")
        for f in files:
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def counts_source(a, layer: str | None) -> str:
    """Where ``layer``'s counts are in ``a``, in anndata's words (:func:`with_counts` reads
    them there): ``.X``, ``layers[NAME]`` (a layer first), else ``.raw.X``."""
    if layer is None:
        return ".X"
    return f"layers[{layer!r}]" if layer in a.layers else ".raw.X"


def count_alternatives(a, form: str = "--layer {}") -> str:
    """The other places of ``a`` that may hold raw counts, for a message ("" if none), each
    named as ``form.format(layer)`` (the CLI's ``--layer NAME``; Python's ``layer='NAME'``)."""
    places = [form.format(name) for name in a.layers.keys()]
    if a.raw is not None:
        places.append(f"{form.format('raw')} (.raw.X)")
    return f"; this file also has {', '.join(places)}" if places else ""


def counts_matrix(a, source: str = "the input", layer_option: str = "--layer", *,
                  matrix: str = ".X", non_integer: str = "warn",
                  alternatives: str = "",
                  allow_option: str = "--allow-non-integer") -> sp.csr_matrix:
    """``a.X`` as float32 CSR (densely stored counts are converted), checked to be raw counts.

    Args:
        matrix: where ``a.X`` came from in the user's file (``.X``, ``layers['counts']``,
            ``.raw.X``), named in messages.
        non_integer: non-integer values (normalised or log data) give a ``UserWarning``
            (``"warn"``), a :class:`UsageError` (``"refuse"``) or nothing (``"accept"``).
        alternatives: appended to those messages (:func:`count_alternatives`).
        allow_option: what accepts non-integer values, named when they are refused.
    A backed ``.X`` (``read_h5ad(backed="r")``) is read into memory.
    Raises:
        UsageError: no ``.X``, values that are not numbers (complex, strings), a damaged
            sparse structure (``indptr``/``indices`` out of range), any value NaN, infinite or negative (names ``source``, the first bad
            cell, and ``layer_option`` to pick the raw counts), or non-integer values with
            ``non_integer="refuse"``.
    """
    x = a.X
    if x is None:
        raise UsageError(f"{source} has no .X; choose the counts with {layer_option}")
    if hasattr(x, "to_memory"):  # anndata's backed sparse dataset
        x = x.to_memory()
    if sp.issparse(x) and x.format in ("csr", "csc"):
        # a damaged indptr/indices would make scipy read out of bounds further on
        try:
            x.check_format(full_check=True)
        except (ValueError, IndexError, TypeError) as exc:
            raise UsageError(f"{source}: its sparse matrix is damaged ({exc}); re-create or "
                             "re-download the file") from exc
    kind = x.dtype.kind if hasattr(x, "dtype") else np.asarray(x).dtype.kind
    if kind not in "biuf":  # numpy would cast complex to real, and byte strings to numbers
        raise UsageError(f"{source}: {matrix} holds {x.dtype} values, not numbers; give the raw "
                         f"counts (integers, or floats holding whole numbers) with "
                         f"{layer_option}{alternatives}")
    # scipy's sparse arrays (csr_array) too: the result is always a csr_matrix
    x = sp.csr_matrix(x.tocsr() if sp.issparse(x) else np.asarray(x), dtype=np.float32)
    for bad, what in ((~np.isfinite(x.data), "NaN or infinite"), (x.data < 0, "negative")):
        if bad.any():
            where = np.flatnonzero(bad)
            cell = int(np.searchsorted(x.indptr, where[0], side="right")) - 1
            raise UsageError(f"{source}: {where.size:,} {what} values in the counts (first in "
                             f"cell {cell}, {a.obs_names[cell]!r}); TxFM needs raw counts: pass "
                             f"them with {layer_option} or clean the input")
    fractional = x.data != np.round(x.data)
    if non_integer != "accept" and fractional.any():
        example = float(x.data[np.flatnonzero(fractional)[0]])
        msg = (f"{source}: {matrix} holds non-integer values (e.g. {example:.4g}), but raw counts "
               f"are expected (normalised or log data?); pass the raw counts with "
               f"{layer_option}{alternatives}")
        if non_integer == "refuse":
            raise UsageError(msg + f", or {allow_option} to use these values anyway")
        warnings.warn(msg, stacklevel=2)
    return x
