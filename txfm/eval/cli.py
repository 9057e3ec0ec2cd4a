"""``txfm embed``, ``txfm genes``, ``txfm eval relationships``, ``txfm eval perturbation``.

Heavy imports (torch, sklearn, anndata) happen inside the command functions.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from txfm.cli import (
    DefaultsHelpFormatter,
    UsageError,
    error_message,
    file_in_path,
    folder_problem,
    finite_float,
    int_at_least,
    nonnegative_int,
    positive_int,
    # lines about the work go to stderr: stdout carries the results alone, written after the
    # files, so a reader that stops early (| head) cannot lose them
    report,
)

from . import EMBED_K_FACTOR




def register(subparsers) -> None:
    from txfm.model.config import PRECISIONS  # the train subparser imports it (and torch) too

    fmt = DefaultsHelpFormatter

    p = subparsers.add_parser(
        "embed", formatter_class=fmt,
        help="CLS embeddings of cells into .obsm (AnnData / 10x input)",
        description="Embed cells with a trained checkpoint: the input's genes are mapped onto "
                    "the model's vocabulary (reported), K of them are shown per cell (drawn with "
                    "a fixed seed, or the mean over --draws draws), and the CLS outputs are "
                    "written to .obsm[--key] of a copy of the input (the input whole, with its "
                    ".X, .raw and layers; uns['txfm_embed'][KEY] records the checkpoint file, "
                    "step and settings).")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    p.add_argument("--input", required=True,
                   help=".h5ad, AnnData zarr store, 10x matrix folder, or 10x .h5")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--layer", default=None, help="counts from .layers[LAYER] ('raw' = .raw.X)")
    p.add_argument("--gene-table", default=None,
                   help="Ensembl id <-> symbol TSV (e.g. shared/data/gene_tables/"
                        "genes_grch38_sceptre.tsv) when input and vocabulary name genes "
                        "differently")
    p.add_argument("--k", type=positive_int, default=None,
                   help="shown genes per cell%(default).0s (default: every observable gene, at "
                        f"most {EMBED_K_FACTOR} x the model's training K; docs/learning.md)")
    p.add_argument("--draws", type=positive_int, default=1,
                   help="average the embeddings of this many draws of shown genes (draw r "
                        "uses seed --seed + r)")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of the draws of shown genes; when K is below a cell's "
                        "observable genes, cell i's draw is keyed by (seed, i), its row "
                        "position: reordering or subsetting the cells changes which genes "
                        "each is shown")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="cells per forward pass (memory, not results)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing .obsm[--key] of the input")
    p.add_argument("--allow-non-integer", action="store_true",
                   help="embed counts that are not integers (refused by default: normalised "
                        "or log data give another embedding than the raw counts)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: fp32 on the CPU; on CUDA the precision the model was trained in "
                        "(bf16 when the checkpoint does not say)")
    p.add_argument("--key", default="X_txfm",
                   help="obsm key to write (X_...: what `txfm eval perturbation` finds by itself)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_embed)

    p = subparsers.add_parser(
        "genes", formatter_class=fmt,
        help="gene representations (codebook, decoder weights) as an AnnData",
        description="Write the encoder codebook (.obsm['X_codebook'], G x (d-1)) and the "
                    "decoder's gene weights (.obsm['X_decoder'], G x hidden) with genes as "
                    "observations.")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--gene-table", default=None, help="add obs['symbol'] for Ensembl-id "
                                                      "vocabularies")
    p.add_argument("--no-progress", action="store_true",
                   help="accepted, as by every txfm command; this one shows no progress bar")
    p.set_defaults(func=cmd_genes)

    ev = subparsers.add_parser("eval", help="relationship recall / perturbation benchmark")
    evs = ev.add_subparsers(dest="eval_command", required=True, metavar="EVAL")

    p = evs.add_parser(
        "relationships", formatter_class=fmt,
        help="gene-gene relationship recall of gene representations (arXiv:2605.31562, evaluation)",
        description="Standardise each gene representation, PCA, cosine similarity; recall of "
                    "each database's pairs beyond the 5th/95th (and 10th/90th) percentiles of "
                    "random gene pairs, 3 null draws (mean ± std), per database and combined. "
                    "With --counts, the PCA loadings of the Lib+Log expression matrix are "
                    "evaluated beside the model as the baseline.")
    p.add_argument("--genes", default=None, help="genes.h5ad from `txfm genes` (genes as obs, "
                                                 "representations in .obsm)")
    p.add_argument("--db", action="append", required=True,
                   help="folder of EFAAR entity1,entity2 files and/or .gmt files, or a file; "
                        "repeatable")
    p.add_argument("--sources", default=None,
                   help="comma-separated database names to keep (file stems)")
    p.add_argument("--key", action="append", default=None,
                   help="obsm key(s) of --genes to evaluate (default: all)")
    p.add_argument("--n-components", action="append", default=None,
                   help="PCA components, KEY=N or N for all (default X_codebook=32, "
                        "X_decoder=256, others and baselines 1024); capped by min(genes - 1, dims)")
    p.add_argument("--gene-table", default=None, help="map Ensembl ids to symbols")
    p.add_argument("--counts", default=None,
                   help="training-like counts (.h5ad/10x) for the PCA-loadings baseline")
    p.add_argument("--counts-layer", default=None,
                   help="the raw counts of --counts from this layer ('raw' = .raw.X)")
    p.add_argument("--counts-max-cells", type=positive_int, default=20000,
                   help="subsample cells of --counts for the baseline PCA")
    p.add_argument("--null-pairs", type=positive_int, default=20000,
                   help="random gene pairs per draw")
    p.add_argument("--draws", type=positive_int, default=3, help="null draws")
    p.add_argument("--seed", type=nonnegative_int, default=42,
                   help="seed of the null pairs and the --counts subsample")
    p.add_argument("--gmt-max-size", type=nonnegative_int, default=500,
                   help="skip gene sets larger than this (0 = keep all)")
    p.add_argument("--all-genes", action="store_true",
                   help="evaluate each representation on all its genes instead of the genes "
                        "all representations share")
    p.add_argument("--no-sweep", action="store_true", help="skip the recall-vs-components sweep")
    p.add_argument("--out", default="txfm_eval_relationships", help="output folder")
    _add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_with_threads(cmd_relationships))

    p = evs.add_parser(
        "perturbation", formatter_class=fmt,
        help="perturbation benchmark (pcst, lin, knn, bmdb, ilisi) with baselines",
        description="Bendidi et al. 2024 benchmark on every embedding in .obsm (and the "
                    "raw-count baselines computed from .X or --layer), each under every "
                    "post-processing; the table shows the best post-processing per embedding.")
    p.add_argument("--embeddings", required=True, help=".h5ad with embeddings in .obsm and raw "
                                                       "counts in .X (or --layer)")
    p.add_argument("--perturbation-key", required=True, help="obs column with perturbation "
                                                             "labels (target gene symbols)")
    p.add_argument("--control", default="non-targeting", help="control label")
    p.add_argument("--batch-key", default=None, help="obs column with batches (held out in "
                                                     "lin/knn; mixed in ilisi)")
    p.add_argument("--obsm-key", action="append", default=None,
                   help="an .obsm embedding to evaluate; repeatable. Without it every X_* key "
                        "is evaluated (and one that is not a finite numeric matrix skipped)")
    p.add_argument("--layer", default=None, help="raw counts for the baselines from this layer")
    p.add_argument("--baselines", default="raw,liblog,liblog_hvg5000,liblog_hvg1024,pca",
                   help="comma-separated, or 'none'")
    p.add_argument("--db", action="append", default=None,
                   help="relationship databases for bmdb (as in `eval relationships`)")
    p.add_argument("--gene-table", default=None, help="map Ensembl-id labels to symbols (bmdb)")
    p.add_argument("--postprocess", default="none,center,standardize,tvn",
                   help="comma-separated post-processings to try on each embedding (the best "
                        "is reported): none, center, standardize, tvn")
    p.add_argument("--metrics", default="pcst,lin,knn,bmdb,ilisi",
                   help="comma-separated: pcst, lin, knn, bmdb (needs --db), ilisi (needs "
                        "--batch-key)")
    p.add_argument("--min-cells", type=positive_int, default=5,
                   help="perturbations with fewer cells are left out")
    p.add_argument("--max-cells", type=positive_int, default=None,
                   help="random subsample of cells")
    p.add_argument("--target-sum", "--library-size", dest="target_sum",
                   type=finite_float(0.0, above=True), default=1e5,
                   help="Lib+Log target sum L (scanpy's normalize_total target_sum; "
                        "--library-size is a deprecated alias)")
    p.add_argument("--pca-components", type=positive_int, default=128, help="PCA baseline size")
    p.add_argument("--fit-on", default=None, metavar="PATH",
                   help="training corpus (a shard collection from `txfm data convert`, or an "
                        ".h5ad of raw counts): also fit the pca and liblog_hvg<N> baselines on "
                        "it and apply them to the screen, as rows pca_corpus, "
                        "liblog_hvg<N>_corpus (the paper's 'PCA (1.4M samples)'), on the genes "
                        "both profile")
    p.add_argument("--fit-cells", type=int_at_least(2), default=50000,
                   help="random training cells of --fit-on to fit on (drawn with --seed)")
    p.add_argument("--oracle-k", type=_k_list, default=None, metavar="K[,K2]",
                   help="add rows oracle_k{K}: each cell's PCA scores (--pca-components, fit on "
                        "all genes) estimated from K genes drawn as `txfm embed --seed` shows "
                        "them (onto the --fit-on vocabulary when given): the ceiling of a model "
                        "shown K genes (txfm.eval.oracle)")
    p.add_argument("--pcst-null-draws", type=positive_int, default=1000,
                   help="random cell sets in p.cst's null (at least 1 / p-value threshold)")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of subsamples, the probe, kNN tie-breaks and p.cst's null")
    p.add_argument("--out", default="txfm_eval_perturbation", help="output folder")
    _add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_with_threads(cmd_perturbation))


# ----------------------------------------------------------------------------- helpers

def _k_list(text: str) -> tuple[int, ...]:
    """argparse ``type``: comma-separated integers >= 1 (``128,512``)."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not parts or not all(t.isdigit() and int(t) >= 1 for t in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give integers >= 1, comma-separated "
                                         "(e.g. 128,512)")
    return tuple(dict.fromkeys(int(t) for t in parts))


def _add_threads(p) -> None:
    p.add_argument("--threads", type=nonnegative_int, default=0,
                   help="BLAS/OpenMP threads (0 = the libraries' default). The matrices here are "
                        "small: on a busy machine --threads 1 avoids oversubscription (measured "
                        "4x faster on a loaded 2-core box)")


def _with_threads(func):
    def run(args):
        if not args.threads:
            return func(args)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(args.threads):
            return func(args)

    run.__doc__ = func.__doc__
    return run


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _check_row_names(obsm_keys, rows, option: str) -> None:
    """A baseline row named like an ``.obsm`` entry to score would replace it unseen: refused,
    naming the entry and ``option``, the baselines' option."""
    clash = sorted(set(rows) & set(obsm_keys))
    if clash:
        raise UsageError(f"--obsm-key {clash[0]}: .obsm[{clash[0]!r}] has the name of a baseline "
                         f"row ({option}); rename the .obsm entry or leave that baseline out")


def _add_rows(embeddings: dict, rows: dict, option: str) -> None:
    """Add baseline rows to the embeddings to score (:func:`_check_row_names` first)."""
    _check_row_names(embeddings, rows, option)
    embeddings.update(rows)


def _obsm_matrix(value, dtype):
    """An ``.obsm`` entry as a dense ``[rows, dims]`` array of ``dtype`` (sparse entries are
    densified), or ``(None, why)`` for one that is not a finite numeric matrix that fits."""
    import numpy as np
    import scipy.sparse as sp

    try:
        x = np.asarray(value.toarray() if sp.issparse(value) else value)
        if not np.issubdtype(x.dtype, np.floating):  # ints, bools; text fails here
            x = x.astype(np.float64)
    except (TypeError, ValueError):
        return None, "is not a numeric [rows, dims] matrix"
    if x.ndim != 2:
        return None, f"is not a numeric [rows, dims] matrix (shape {x.shape})"
    if x.shape[1] == 0:
        return None, "has no columns"
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        return None, f"has NaN or inf in {int(bad.sum()):,} of {len(x):,} rows"
    big = np.finfo(dtype).max
    # only a wider float can overflow the cast (a float32 input is not copied to check)
    if x.dtype.itemsize > np.dtype(dtype).itemsize and np.abs(x).max(initial=0.0) > big:
        return None, (f"has values beyond {np.dtype(dtype).name}'s range (|x| > {big:.3g}); "
                      "rescale it")
    return x.astype(dtype, copy=False), None


def _table(path):
    """The ``--gene-table`` (None if not given); UsageError if it cannot be read."""
    from .genemap import GeneTable

    if not path:
        return None
    try:
        return GeneTable.read(path)
    except (OSError, ValueError) as exc:  # missing file, no id/symbol columns, bad CSV
        msg = error_message(exc).removeprefix(f"gene table {pathlib.Path(path)}: ")
        raise UsageError(f"--gene-table {path}: {msg}") from exc


def _writable(path: pathlib.Path, option: str) -> None:
    """UsageError unless a folder can be made (or written) at ``path``."""
    problem = folder_problem(path)
    if problem is not None:
        raise UsageError(f"{option} {path}: {problem}")


# the result files of the two evaluations, written into --out (staged_outputs)
RELATIONSHIP_FILES = ("relationships.csv", "relationships_summary.csv",
                      "recall_by_database.png", "recall_vs_components.png")
PERTURBATION_FILES = ("perturbation_all.csv", "perturbation.csv", "perturbation_by_target.csv",
                      "perturbation.png")


def _output(path, *, folder: bool, writes: tuple[str, ...] = (),
            folders: tuple[str, ...] = ()) -> pathlib.Path:
    """``--out`` checked before any work: a folder (``folder``) or an ``.h5ad`` file name, not
    the other, where this process can write; in a folder, none of the files it ``writes`` may
    be a folder there, nor any of its ``folders`` a file (either failed at the end, after the
    whole evaluation)."""
    out = pathlib.Path(path)
    for names, is_wrong, found, wanted in ((writes, pathlib.Path.is_dir, "folder", "file"),
                                           (folders, pathlib.Path.is_file, "file", "folder")):
        for name in names:
            if is_wrong(out / name):
                raise UsageError(f"--out {out}: {out / name} is a {found}, where the results go "
                                 f"in a {wanted} of that name; move it away or choose another "
                                 f"--out")
    blocking = file_in_path(out)
    if blocking is not None:
        raise UsageError(f"--out {out}: {blocking} is a file, not a folder; choose another path")
    if folder and out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; give a folder for the results")
    if not folder and out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give an .h5ad file name")
    if not folder and out.suffix.lower() != ".h5ad":
        raise UsageError(f"--out {out}: the output is an .h5ad file; name it *.h5ad")
    _writable(out if folder else out.parent, "--out")
    return out


# ----------------------------------------------------------------------------- embed / genes

def cmd_embed(args) -> int:
    from .embed import check_embed_options, embed_anndata, load_model, resolve_device
    from .io import read_input, write_h5ad

    device = resolve_device(args.device, "--device")
    out = _output(args.out, folder=False)
    check_embed_options(key=args.key, k=args.k, draws=args.draws, seed=args.seed, cli=True)
    if not args.key.startswith("X_"):
        report(f"warning: --key {args.key}: `txfm eval perturbation` (as scanpy) finds the "
               f".obsm keys that start with X_ by itself; pass it --obsm-key {args.key}, or "
               f"name this one X_{args.key}")
    table = _table(args.gene_table)
    loaded = load_model(args.checkpoint, device)
    original = read_input(args.input, "--input")  # written back whole, plus .obsm[--key]
    emb = embed_anndata(original, loaded, key=args.key, layer=args.layer, k=args.k,
                        draws=args.draws, seed=args.seed, batch_size=args.batch_size,
                        device=device, precision=args.precision, gene_table=table,
                        allow_non_integer=args.allow_non_integer, overwrite=args.overwrite,
                        progress=not args.no_progress, source=f"--input {args.input}",
                        cli=True, log=lambda line: report(f"{args.input}: {line}"))
    run = original.uns["txfm_embed"][args.key]
    write_h5ad(original, out)
    print(f"wrote {out}: .obsm[{args.key!r}] {emb.shape[0]:,} x {emb.shape[1]} (K={run['k']}, "
          f"draws={args.draws}, {device}, {run['precision']})")
    return 0


def cmd_genes(args) -> int:
    import anndata as ad
    import pandas as pd

    from .embed import gene_representations, load_model
    from .genemap import gene_symbols
    from .io import write_h5ad

    out = _output(args.out, folder=False)
    table = _table(args.gene_table)
    model, _, vocab, info = load_model(args.checkpoint, "cpu")
    reps = gene_representations(model)
    obs = pd.DataFrame(index=pd.Index([str(g) for g in vocab], name=None))
    symbols = info.get("symbols") if isinstance(info, dict) else None
    if symbols is not None or args.gene_table:
        obs["symbol"] = gene_symbols(vocab, symbols, table)
    a = ad.AnnData(obs=obs, obsm=reps)
    # the file actually read and its step, as txfm embed records them
    a.uns["txfm_genes"] = {"checkpoint": str(info.get("path", args.checkpoint)),
                           "step": int(info.get("step") or 0)}
    write_h5ad(a, out)
    print(f"wrote {out}: {len(vocab):,} genes; " +
          ", ".join(f"obsm[{k!r}] {v.shape[1]} dims" for k, v in reps.items()))
    return 0


# ----------------------------------------------------------------------------- relationships

def _components_map(values) -> tuple[dict, int | None]:
    """``--n-components``: ``({KEY: N} as given, the N given for all or None)``."""
    out, default = {}, None
    for v in values or []:
        key, _, n = v.rpartition("=")
        if not n.isdigit() or int(n) < 1 or (_ and not key):
            raise UsageError(f"--n-components {v}: use N or KEY=N with N >= 1 (e.g. "
                             f"X_codebook=32)")
        if key:
            out[key] = int(n)
        else:
            default = int(n)
    return out, default


def _components_of(key: str, given: dict, default: int | None) -> int:
    """A representation's PCA components: its own ``KEY=N``, else the ``N`` given for all, else
    the paper's choice for the model's two (32, 256), else that of the baselines (1024)."""
    from .relationships import BASELINE_COMPONENTS, DEFAULT_COMPONENTS

    return given.get(key, default or DEFAULT_COMPONENTS.get(key, BASELINE_COMPONENTS))


def _recall_summary(table):
    """One row per representation: recall 5/95 per database and 10/90 combined, in percent,
    mean and std over the null draws (numeric ``<db>_mean`` / ``<db>_std`` columns)."""
    import pandas as pd

    prim = table[table.primary]
    single_db = prim.database.nunique() == 2  # one database + "combined" (the same pairs)
    rows = []
    for name, g in prim.groupby("representation", sort=False):
        row = {"representation": name, "genes": int(g.n_genes.iloc[0]),
               "PCs": int(g.n_components.iloc[0])}
        for _, r in g.iterrows():
            if single_db and r.database == "combined":
                continue
            has = r.n_pairs > 0
            row[f"{r.database}_mean"] = 100 * r.recall_5_95_mean if has else float("nan")
            row[f"{r.database}_std"] = 100 * r.recall_5_95_std if has else float("nan")
        comb = g[g.database == "combined"].iloc[0]
        row["combined_10_90_mean"] = 100 * comb.recall_10_90_mean
        row["combined_10_90_std"] = 100 * comb.recall_10_90_std
        rows.append(row)
    return pd.DataFrame(rows)


def _with_spread(summary):
    """The summary for printing: each ``X_mean``/``X_std`` pair as one ``mean ± std`` column."""
    import math

    out = summary[["representation", "genes", "PCs"]].copy()
    for col in summary.columns:
        if col.endswith("_mean"):
            base = col[:-len("_mean")]
            out[base.replace("combined_10_90", "10/90 combined")] = [
                "–" if math.isnan(m) else f"{m:.1f} ± {sd:.1f}"
                for m, sd in zip(summary[col], summary[f"{base}_std"])]
    return out


def _rename_legacy_keys(genes) -> dict[str, str]:
    """A ``genes.h5ad`` written by ``txfm genes`` before its keys took scanpy's ``X_`` prefix
    (``codebook``, ``decoder``) is read under today's names. Returns ``{old: new}`` for every
    old name that now stands for a new key of the file (renamed, or a file written since), by
    which ``--key`` and ``--n-components`` may still name it; a file that holds both names
    keeps both, each under its own."""
    from .relationships import LEGACY_KEYS

    for old, new in LEGACY_KEYS.items():
        if old in genes.obsm and new not in genes.obsm:
            genes.obsm[new] = genes.obsm.pop(old)
    return {old: new for old, new in LEGACY_KEYS.items()
            if old not in genes.obsm and new in genes.obsm}


def cmd_relationships(args) -> int:
    import numpy as np

    from .baselines import pca_gene_loadings
    from .genemap import gene_symbols
    from .io import counts_matrix, read_cells, read_h5ad, staged_outputs
    from .plots import markdown_table, plot_recall_by_database, plot_recall_vs_components
    from .relationships import (
        DEFAULT_COMPONENTS,
        LOADINGS_SHARE,
        RANDOM_RECALL,
        SWEEP_COMPONENTS,
        GeneRepresentation,
        check_null,
        common_genes,
        evaluate_representations,
        load_databases,
    )

    if args.genes is None and args.counts is None:
        return _fail("nothing to evaluate: pass --genes genes.h5ad and/or --counts X.h5ad")
    try:
        check_null(args.null_pairs, args.draws)
    except ValueError as err:
        return _fail(str(err))
    out = _output(args.out, folder=True, writes=RELATIONSHIP_FILES)
    table = _table(args.gene_table)
    sources = args.sources.split(",") if args.sources else None
    try:
        dbs = load_databases(args.db, gmt_max_size=args.gmt_max_size, sources=sources)
    except (FileNotFoundError, ValueError) as err:
        return _fail(str(err))
    report("databases: " + ", ".join(f"{d.name} ({d.description})" for d in dbs))
    comps, default_c = _components_map(args.n_components)
    reps = []
    if args.genes:
        g = read_h5ad(args.genes, "--genes")
        renamed = _rename_legacy_keys(g)
        # later wins, as for one name given twice: codebook=16 then X_codebook=8 gives 8
        comps = {renamed.get(k, k): n for k, n in comps.items()}
        if not len(g.obsm.keys()):
            return _fail(f"--genes {args.genes}: no gene representation in .obsm; write one "
                         "with `txfm genes`")
        # each once, in the order given: a key named twice (or by its old and new names)
        keys = list(dict.fromkeys(renamed.get(k, k) for k in (args.key or g.obsm.keys())))
        missing = [k for k in keys if k not in g.obsm]
        if missing:
            return _fail(f"--key {','.join(missing)}: not in .obsm of {args.genes} (it has "
                         f"{list(g.obsm.keys())})")
        syms = gene_symbols(g.obs_names, g.obs["symbol"].to_numpy() if "symbol" in g.obs else None,
                            table)
        for k in keys:
            x, why = _obsm_matrix(g.obsm[k], np.float64)
            if x is None:
                if args.key:  # asked for by name
                    return _fail(f"--key {k}: .obsm[{k!r}] of {args.genes} {why}")
                print(f"warning: skipping .obsm[{k!r}] of {args.genes}: it {why}", file=sys.stderr)
                continue
            reps.append(GeneRepresentation(k, x, syms, _components_of(k, comps, default_c)))
        if not reps:
            return _fail(f"--genes {args.genes}: no .obsm entry is a finite numeric matrix")
    if args.counts:
        c = read_cells(args.counts, layer=args.counts_layer, option="--counts")
        x = counts_matrix(c, f"--counts {args.counts}", "--counts-layer")
        if c.n_obs > args.counts_max_cells:
            rows = np.sort(np.random.default_rng(args.seed).choice(c.n_obs, args.counts_max_cells,
                                                                    replace=False))
            x = x[rows]
        n = _components_of("pca_loadings", comps, default_c)
        try:
            loadings, kept = pca_gene_loadings(x, n, seed=args.seed)
        except ValueError as err:
            return _fail(f"--counts {args.counts}: {err}")
        syms = gene_symbols(c.var_names, c.var["symbol"].to_numpy() if "symbol" in c.var else None,
                            table)[kept]
        report(f"baseline pca_loadings: {x.shape[0]:,} cells, {len(kept):,} varying genes, "
              f"{loadings.shape[1]} components")
        if loadings.shape[1] * LOADINGS_SHARE > len(kept):
            print(f"warning: pca_loadings at {loadings.shape[1]} components of {len(kept)} "
                  f"genes: standardised, the loadings of most of the spectrum are nearly "
                  f"orthogonal, so this baseline's recall falls towards random (the paper's "
                  f"1024 components are ~5% of its ~20,000 genes); see its recall against "
                  f"components in relationships.csv, or pass --n-components pca_loadings=N "
                  f"with N <= {len(kept) // LOADINGS_SHARE}", file=sys.stderr)
        reps.append(GeneRepresentation("pca_loadings", loadings, syms, n, nested=True))
    named = {r.name for r in reps} | {"pca_loadings"}
    unknown = sorted(set(comps) - set(DEFAULT_COMPONENTS) - named)
    if unknown:
        return _fail(f"--n-components {unknown[0]}=...: no representation of that name "
                     f"(evaluating {sorted(r.name for r in reps)})")
    if len(reps) > 1 and not args.all_genes:
        reps = common_genes(reps)
        if len(reps[0].symbols) == 0:
            return _fail(f"the representations share no gene ({', '.join(r.name for r in reps)}"
                         f"); check that --genes and --counts name genes the same way "
                         f"(--gene-table maps ids to symbols), or pass --all-genes")
        report(f"evaluating on the {len(reps[0].symbols):,} genes all representations share "
              "(--all-genes to use each one's own)")
    try:
        res = evaluate_representations(reps, dbs, n_null=args.null_pairs, draws=args.draws,
                                       seed=args.seed,
                                       sweep=None if args.no_sweep else SWEEP_COMPONENTS,
                                       progress=not args.no_progress)
    except ValueError as err:
        return _fail(str(err))
    summary = _recall_summary(res)
    with staged_outputs(out) as tmp:  # all four files, or none, replace the last run's
        table, table_summary, by_database, vs_components = RELATIONSHIP_FILES
        res.to_csv(tmp / table, index=False)
        summary.to_csv(tmp / table_summary, index=False)
        plot_recall_by_database(res, tmp / by_database)
        plot_recall_vs_components(res, tmp / vs_components)
    print(f"\nRecall 5/95 (%) per database, mean ± std over null draws (random: "
          f"{RANDOM_RECALL:.1f}):\n")
    print(markdown_table(_with_spread(summary)))
    print(f"\nwrote {out}/relationships.csv, relationships_summary.csv, recall_by_database.png, "
          "recall_vs_components.png")
    return 0


# ----------------------------------------------------------------------------- perturbation

def _corpus_and_oracle_rows(args, adata, base_names, table) -> dict:
    """Rows ``<baseline>_corpus`` (fit on ``--fit-on``) and ``oracle_k{K}`` (``--oracle-k``)."""
    import time

    from .baselines import align_to_reference, expression_baselines, read_reference
    from .io import counts_matrix
    from .oracle import oracle_embeddings

    raw = counts_matrix(adata, f"--embeddings {args.embeddings}")
    rows, observable = {}, None
    if args.fit_on:
        ref = read_reference(args.fit_on, args.fit_cells, args.seed)
        raw, observable, shared, match = align_to_reference(adata.var, raw, ref, table)
        report(f"--fit-on {ref.source}: screen {match.summary(len(ref.genes))}; "
              f"{int(shared.sum()):,} genes both profile")
        names = [n for n in base_names if n == "pca" or n.startswith("liblog_hvg")]
        if names:
            t0 = time.perf_counter()
            fit, notes = expression_baselines(raw, names, target_sum=args.target_sum,
                                              pca_components=args.pca_components,
                                              seed=args.seed, reference=ref.counts,
                                              genes=shared)
            for n in notes:
                report(n)
            report(f"corpus-fit baselines {list(fit)}: {time.perf_counter() - t0:.1f} s")
            rows.update(fit)
    if args.oracle_k:
        oracle = oracle_embeddings(raw, args.oracle_k, args.pca_components, seed=args.seed,
                                   observable=observable, target_sum=args.target_sum,
                                   log=print)
        rows.update((f"oracle_k{k}", e) for k, e in oracle.items())
    return rows


def cmd_perturbation(args) -> int:
    import numpy as np
    import pandas as pd
    from tqdm.auto import tqdm

    from .baselines import check_baseline_names, expression_baselines
    from .genemap import gene_symbols
    from .io import count_alternatives, counts_matrix, read_cells, staged_outputs
    from .perturbation import (
        METRICS,
        PCST_ALPHA,
        POSTPROCESSING,
        BenchmarkOptions,
        Labels,
        best_rows,
        chance_percent,
        evaluate_embedding,
        min_null_draws,
    )
    from .plots import markdown_table, plot_perturbation_metrics
    from .relationships import load_databases

    out = _output(args.out, folder=True, writes=PERTURBATION_FILES)
    if "pcst" in args.metrics.split(",") and args.pcst_null_draws < min_null_draws():
        return _fail(f"--pcst-null-draws {args.pcst_null_draws}: p.cst needs at least "
                     f"{min_null_draws()} null draws to reach p < {PCST_ALPHA}")
    table = _table(args.gene_table)
    adata = read_cells(args.embeddings, layer=args.layer, option="--embeddings")
    for key, what in ((args.perturbation_key, "--perturbation-key"),
                      (args.batch_key, "--batch-key")):
        if key is not None and key not in adata.obs:
            return _fail(f"{what} {key!r} is not an obs column of {args.embeddings} (columns: "
                         f"{list(adata.obs.columns)})")
    post = tuple(dict.fromkeys(s.strip() for s in args.postprocess.split(",") if s.strip()))
    metrics = tuple(dict.fromkeys(s.strip() for s in args.metrics.split(",") if s.strip()))
    bad = [p for p in post if p not in POSTPROCESSING] + [m for m in metrics if m not in METRICS]
    if bad or not post or not metrics:
        return _fail(f"unknown or empty --postprocess/--metrics {bad}; choose from "
                     f"{POSTPROCESSING} and {METRICS}")
    computable = [m for m in metrics if not (m == "ilisi" and not args.batch_key)
                  and not (m == "bmdb" and not args.db)]
    if not computable:
        return _fail(f"--metrics {','.join(metrics)}: nothing to compute (ilisi needs "
                     f"--batch-key, bmdb needs --db); add those or other metrics")
    base_names = () if args.baselines.strip() == "none" else \
        tuple(dict.fromkeys(s.strip() for s in args.baselines.split(",") if s.strip()))
    if args.baselines.strip() != "none" and not base_names:
        return _fail(f"--baselines {args.baselines!r}: name baselines (e.g. liblog,pca) or "
                     "'none'")
    try:
        check_baseline_names(base_names)
    except ValueError as err:
        return _fail(f"--baselines: {err}")
    if args.batch_key is not None and args.batch_key == args.perturbation_key:
        return _fail(f"--batch-key {args.batch_key!r} is the --perturbation-key column too: "
                     "name the obs column of the batches (or leave --batch-key out)")
    if args.fit_on and not pathlib.Path(args.fit_on).exists():
        return _fail(f"--fit-on {args.fit_on}: no such file or folder (a shard collection "
                     "from `txfm data convert`, or an .h5ad of raw counts)")
    dbs = []
    if args.db and "bmdb" not in metrics:
        # a typo in an option that goes unused is still a typo: say so rather than ignore it
        missing = [d for d in args.db if not pathlib.Path(d).exists()]
        if missing:
            return _fail(f"--db {missing[0]}: no such file or folder")
        report("warning: --db is used only by the bmdb metric, which --metrics leaves out")
    if "bmdb" in metrics and args.db:  # read before the long work: a typo costs nothing
        try:
            dbs = load_databases(args.db)
        except (FileNotFoundError, ValueError) as err:
            return _fail(str(err))
    unlabelled = adata.obs[args.perturbation_key].isna().to_numpy()
    if args.batch_key:
        unlabelled |= adata.obs[args.batch_key].isna().to_numpy()
    if unlabelled.any():
        report(f"leaving out {int(unlabelled.sum()):,} cells without a perturbation/batch label")
        adata = adata[~unlabelled].copy()
    if adata.n_obs == 0:
        return _fail(f"{args.embeddings}: no cells to evaluate")
    if args.max_cells and adata.n_obs > args.max_cells:
        had_control = (adata.obs[args.perturbation_key].astype(str) == args.control).any()
        rows = np.sort(np.random.default_rng(args.seed).choice(adata.n_obs, args.max_cells,
                                                                replace=False))
        adata = adata[rows].copy()
        report(f"subsampled {args.max_cells:,} cells")
        if had_control and not (adata.obs[args.perturbation_key].astype(str)
                                == args.control).any():
            return _fail(f"--max-cells {args.max_cells}: the subsample has no {args.control!r} "
                         "control cell; raise --max-cells")
    pert = adata.obs[args.perturbation_key].astype(str).to_numpy()
    counts = pd.Series(pert).value_counts()
    small = counts[(counts < args.min_cells) & (counts.index != args.control)]
    if len(small):
        report(f"leaving out {len(small)} perturbations with < {args.min_cells} cells: "
              f"{list(small.index[:10])}{' ...' if len(small) > 10 else ''}")
        adata = adata[~np.isin(pert, small.index)].copy()
        pert = adata.obs[args.perturbation_key].astype(str).to_numpy()
    try:
        labels = Labels.build(pert, args.control,
                              adata.obs[args.batch_key].to_numpy() if args.batch_key else None)
    except ValueError as err:
        return _fail(str(err))
    n_perts = len(labels.pert_names) - 1
    n_given = int((counts.index != args.control).sum())
    if n_given < 2 and not args.max_cells:  # no option can help: the input has too few
        return _fail(f"{args.embeddings}: --perturbation-key {args.perturbation_key!r} has "
                     f"{n_given} perturbation(s) besides the control {args.control!r}; the "
                     f"benchmark compares perturbations, so it needs at least 2")
    if n_perts < 2:
        sub = f" in the --max-cells {args.max_cells} subsample" if args.max_cells else ""
        return _fail(f"need >= 2 perturbations with >= {args.min_cells} cells (--min-cells) "
                     f"besides the control{sub}, found {n_perts}; lower --min-cells"
                     + (" or raise --max-cells" if args.max_cells else ""))
    keys = list(dict.fromkeys(args.obsm_key or [k for k in adata.obsm.keys()
                                                if k.startswith("X_")]))
    missing = [k for k in keys if k not in adata.obsm]
    if missing:
        return _fail(f"--obsm-key {','.join(missing)}: not in .obsm of {args.embeddings} (it "
                     f"has {list(adata.obsm.keys())})")
    if args.batch_key is None:
        report("warning: no --batch-key: lin/knn use a random 80/20 split and ilisi is not "
               "computed")
    n_batches = labels.n_batches
    top1, top5 = chance_percent(n_perts)
    report(f"{adata.n_obs:,} cells, {n_perts} perturbations + {args.control!r} "
          f"({int((labels.pert == labels.control).sum()):,} cells), {n_batches} "
          f"batch{'es' if n_batches != 1 else ''}; chance top-1 {top1:.1f}%, top-5 {top5:.1f}%")

    _check_row_names(keys, base_names, "--baselines")  # before any work
    embeddings, skipped = {}, []
    for k in list(keys):
        x, why = _obsm_matrix(adata.obsm[k], np.float32)
        if x is None:
            if args.obsm_key:  # asked for by name
                return _fail(f"--obsm-key {k}: .obsm[{k!r}] of {args.embeddings} {why}")
            print(f"warning: skipping .obsm[{k!r}] of {args.embeddings}: it {why}",
                  file=sys.stderr)
            keys.remove(k)
            skipped.append(k)
            continue
        embeddings[k] = x
    if base_names:
        raw = counts_matrix(adata, f"--embeddings {args.embeddings}",
                            matrix=".X" if args.layer is None else f"layers[{args.layer!r}]",
                            alternatives=count_alternatives(adata))
        try:
            base, notes = expression_baselines(raw, base_names,
                                               target_sum=args.target_sum,
                                               pca_components=args.pca_components,
                                               seed=args.seed)
        except (ValueError, MemoryError) as err:
            return _fail(f"--baselines {args.baselines}: {err}")
        for n in notes:
            report(n)
        _add_rows(embeddings, base, "--baselines")
    if args.fit_on or args.oracle_k:
        try:
            _add_rows(embeddings, _corpus_and_oracle_rows(args, adata, base_names, table),
                      "--fit-on" if args.fit_on else "--oracle-k")
        except UsageError:  # names its option and file already
            raise
        except (ValueError, MemoryError) as err:
            return _fail(f"{'--fit-on' if args.fit_on else '--oracle-k'}: {err}")
    if not embeddings:
        if skipped:
            return _fail(f"no embedding to evaluate: every X_* key in .obsm of {args.embeddings} "
                         f"was skipped ({', '.join(skipped)}; warnings above say why) and "
                         "--baselines none")
        return _fail("no embedding to evaluate: the input has no X_* key in .obsm and "
                     "--baselines none")
    if not keys:
        report(f"no usable embedding in .obsm ({', '.join(skipped)} skipped): evaluating the "
               "baselines alone" if skipped else
               "no embedding in .obsm: evaluating the baselines alone")
    if "bmdb" in metrics and not args.db:
        report("no --db: bmdb not computed")
    symbols = gene_symbols(labels.pert_names, table=table)
    options = BenchmarkOptions(metrics=metrics, postprocessing=post, min_cells=args.min_cells,
                               pcst_null_draws=args.pcst_null_draws, seed=args.seed)
    tables, targets = [], []
    for name, x in tqdm(embeddings.items(), desc="perturbation benchmark", unit="embedding",
                        disable=args.no_progress):
        per = {}
        try:
            t = evaluate_embedding(x, labels, dbs, symbols=symbols, options=options,
                                   by_perturbation=per)
        except ValueError as err:
            return _fail(f"{name}: {err}")
        t.insert(0, "embedding", name)
        t.insert(1, "dims", x.shape[1])
        tables.append(t)
        for method, p in per.items():
            targets.append(p.assign(embedding=name, postprocess=method)
                           [["embedding", "postprocess", *p.columns]])
    full = pd.concat(tables, ignore_index=True)
    best = best_rows(full)
    if dbs and "bmdb_pairs" in full and not (full["bmdb_pairs"] > 0).any():
        print(f"warning: bmdb undefined: no annotated pair of --db joins two of the "
              f"{n_perts} perturbation targets (if the labels are Ensembl ids, --gene-table "
              f"maps them to symbols)", file=sys.stderr)
    with staged_outputs(out) as tmp:  # all four files, or none, replace the last run's
        every, best_only, by_target, plot = PERTURBATION_FILES
        full.to_csv(tmp / every, index=False)
        best.to_csv(tmp / best_only, index=False)
        pd.concat(targets, ignore_index=True).to_csv(tmp / by_target, index=False)
        plot_perturbation_metrics(best, tmp / plot)
    shown = [c for c in ("embedding", "dims", "postprocess", "pcst", "lin_top1", "lin_top5",
                         "knn_top1", "knn_top5", "bmdb", "ilisi", "average") if c in best.columns]
    print("\nPerturbation benchmark (%; ilisi in [1, #batches]); best post-processing per "
          "embedding:\n")
    print(markdown_table(best[shown]))
    print(f"\nwrote {out}/perturbation.csv (best), perturbation_all.csv (every "
          "post-processing), perturbation_by_target.csv (each perturbation's share of the "
          "scores), perturbation.png")
    return 0
