"""``txfm data synth|convert|info|verify|demo``. Heavy imports happen inside the commands."""
from __future__ import annotations

import argparse
import sys

from txfm.cli import (DefaultsHelpFormatter, finite_float, int_at_least, nonnegative_int,
                      positive_int)


def register(subparsers) -> None:
    fmt = DefaultsHelpFormatter
    data = subparsers.add_parser("data", help="synthetic data, conversion to Zarr shards, info, "
                                               "verify, the demo",
                                 description="Make, convert and inspect training data.")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    p = sub.add_parser(
        "synth", formatter_class=fmt, help="write synthetic raw counts with known ground truth",
        description="Negative-binomial counts with gene programs, cell types, CRISPRi-like "
                    "perturbations, batches and optional bulk samples: one .h5ad per dataset "
                    "(screen, atlas[, bulk]) plus truth/ (gene programs, relationship pairs in "
                    "the EFAAR entity1,entity2 format, perturbation effects). The set is built "
                    "in a hidden folder next to --out and renamed to it when complete; an "
                    "earlier synth output in --out is replaced as a whole, any other non-empty "
                    "folder is refused.")
    p.add_argument("--out", required=True,
                   help="output folder: absent, empty, or an earlier synth output (replaced)")
    p.add_argument("--cells", type=int_at_least(20), default=20_000,
                   help="single cells (screen + atlas)")
    p.add_argument("--genes", type=int_at_least(50), default=3_000, help="genes in the universe")
    p.add_argument("--perturbations", type=positive_int, default=50, help="CRISPRi target genes")
    p.add_argument("--batches", type=positive_int, default=3,
                   help="batches per single-cell dataset")
    p.add_argument("--bulk", type=nonnegative_int, default=0,
                   help="bulk samples (0: no bulk dataset)")
    p.add_argument("--programs", type=positive_int, default=None,
                   help="gene programs of 10-40 genes, which take 45%% of the genes: at most "
                        "genes*0.45/10 (default: genes/75, at least 6, as many of those as "
                        "fit)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the generator")
    p.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true",
                   help="accepted, as --no-progress is by every txfm command (--quiet by the data "
                        "commands); this one shows no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "convert", formatter_class=fmt,
        help="convert .h5ad / 10x inputs into shuffled Zarr v3 CSR shards",
        description="Each INPUT (.h5ad, 10x matrix folder, or 10x .h5) is one dataset. Genes are "
                    "keyed by Ensembl id where present, else symbol, and merged into one "
                    "vocabulary (or mapped onto --vocab). Single-cell datasets are filtered "
                    "(genes in >= --min-cells cells, then cells with >= --min-genes genes). Cells "
                    "of all inputs are shuffled across the corpus (seeded) and written as "
                    "anndata-on-zarr-v3 shards that anndata.read_zarr and annbatch read. "
                    "Interrupted? Run the same command again: finished shards are kept.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".h5ad files, 10x folders (matrix.mtx[.gz]) or 10x .h5 files; an AnnData "
                        "zarr store: write it as .h5ad first")
    p.add_argument("--out", required=True, help="output shards folder")
    p.add_argument("--vocab", default=None, help="existing vocabulary TSV (gene_id[, symbol]); "
                                                 "genes outside it are reported and dropped")
    p.add_argument("--gene-key", default="auto", choices=["auto", "id", "symbol"],
                   help="gene identity: Ensembl id where present else symbol (auto), ids only, "
                        "or symbols")
    p.add_argument("--gene-table", default=None,
                   help="Ensembl id <-> symbol table to give symbol-only inputs ids (e.g. "
                        "shared/data/gene_tables/genes_grch38_sceptre.tsv)")
    p.add_argument("--names", default=None, help="comma-separated dataset names, one per input "
                                                 "(default: file/folder names)")
    p.add_argument("--bulk-input", action="append", default=[], metavar="NAME_OR_PATH",
                   help="mark an input as bulk (not filtered); repeatable. .h5ad files with "
                        "uns['modality'] == 'bulk' are bulk already")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--layer", default=None,
                     help="read counts from .layers[LAYER] of .h5ad inputs")
    src.add_argument("--raw", action="store_true", help="read counts from .raw of .h5ad inputs")
    p.add_argument("--counts", action="append", default=[], metavar="INPUT=WHERE",
                   help="where one .h5ad input keeps its counts: X, raw or layers/NAME; INPUT is "
                        "its dataset name or path; repeatable; overrides --layer/--raw for it")
    p.add_argument("--min-cells", type=nonnegative_int, default=1000,
                   help="single-cell: keep genes expressed in >= this many cells (paper: 1,000)")
    p.add_argument("--min-genes", type=nonnegative_int, default=2000,
                   help="single-cell: keep cells expressing >= this many genes (paper: 2,000)")
    p.add_argument("--allow-non-integer", action="store_true",
                   help="accept non-integer counts (TPM-like bulk data); stored as float32")
    p.add_argument("--feature-types", default="Gene Expression",
                   help="10x feature types to keep (comma-separated; empty = all)")
    p.add_argument("--genome", default=None,
                   help="10x .h5 inputs: genomes to read (comma-separated, e.g. mm10; default "
                        "all), as scanpy's read_10x_h5(genome=...)")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of the corpus-wide shuffle")
    p.add_argument("--val-fraction", type=finite_float(0.0), default=0.01,
                   help="share of cells held out as validation shards")
    p.add_argument("--shard-cells", type=positive_int, default=None,
                   help="cells per shard (default: from --shard-mb)")
    p.add_argument("--shard-mb", type=finite_float(0.0, above=True), default=256.0,
                   help="target uncompressed MiB of counts + indices per shard")
    p.add_argument("--codec", default="none", choices=["none", "lz4", "zstd"],
                   help="inner-chunk compression (none reads fastest; see docs/data.md)")
    p.add_argument("--counts-dtype", default="auto",
                   choices=["auto", "uint16", "uint32", "float32"],
                   help="stored count dtype (auto: uint16 if all counts fit, else uint32/float32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing conversion made with other inputs/options")
    p.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true",
                   help="no progress bars (--quiet: its older name)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="summarise a shards folder",
                       description="Print the manifest summary of a shards folder.")
    p.add_argument("shards", help="shard collection folder (from `txfm data convert`)")
    p.add_argument("--json", action="store_true", help="print the whole manifest.json")
    p.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true",
                   help="accepted, as --no-progress is by every txfm command (--quiet by the data "
                        "commands); this one shows no progress bar")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="check every chunk of a shards folder for corruption",
                       description="Read every chunk of every shard and check its crc32c "
                                   "checksum and contents (gene ids, counts, cell offsets). "
                                   "Exit status 0: intact; 2: corrupt or unreadable (each "
                                   "problem is listed, naming the shard, cells and file).")
    p.add_argument("shards", help="shard collection folder (from `txfm data convert`)")
    p.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true",
                   help="no progress bar (--quiet: its older name)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", formatter_class=fmt,
                       help="make the synthetic demo shards used by plain `txfm train`",
                       description="Generate and convert the default synthetic data (skipped "
                                   "when already complete).")
    p.add_argument("--root", default="txfm-demo", help="folder of the demo (made if absent)")
    p.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true",
                   help="no progress bars (--quiet: as data convert takes it)")
    p.set_defaults(func=cmd_demo)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def cmd_synth(args) -> int:
    import shlex

    from txfm.cli import UsageError

    from .synth import generate, output_problem

    problem = output_problem(args.out)
    if problem:  # before any work: a refused --out costs nothing
        raise UsageError(f"--out {shlex.quote(args.out)}: {problem}")
    try:
        r = generate(args.out, cells=args.cells, genes=args.genes, perturbations=args.perturbations,
                     batches=args.batches, bulk=args.bulk, programs=args.programs, seed=args.seed)
    except (OSError, ValueError) as err:  # OSError: the disk filled up, say
        return _fail(str(err))
    print("wrote " + ", ".join(str(p) for p in r.datasets))
    print(f"ground truth in {r.truth_dir}: "
          + ", ".join(sorted(f.name for f in r.truth_dir.iterdir() if f.is_file())))
    print(f"next: txfm data convert {' '.join(shlex.quote(str(p)) for p in r.datasets)} "
          f"--out SHARDS --min-cells {r.min_cells} --min-genes {r.min_genes}")
    return 0


def cmd_convert(args) -> int:
    from .convert import convert
    from .readers import InputError

    names = [n.strip() for n in args.names.split(",")] if args.names is not None else None
    types = tuple(t for t in args.feature_types.split(",") if t)
    counts = {}
    for item in args.counts:
        key, sep, where = item.partition("=")
        if not sep or not key or not where:
            return _fail(f"--counts {item}: give INPUT=WHERE, e.g. --counts screen=layers/counts")
        if key in counts:
            return _fail(f"--counts {key}: given twice")
        counts[key] = where
    try:
        m = convert(args.inputs, args.out, vocab=args.vocab, gene_key=args.gene_key,
                    gene_table=args.gene_table, names=names, bulk=args.bulk_input,
                    layer=args.layer, use_raw=args.raw, min_cells=args.min_cells,
                    min_genes=args.min_genes, allow_non_integer=args.allow_non_integer,
                    feature_types=types, seed=args.seed, val_fraction=args.val_fraction,
                    shard_cells=args.shard_cells, shard_mb=args.shard_mb, codec=args.codec,
                    counts_dtype=args.counts_dtype, overwrite=args.overwrite,
                    progress=not args.quiet,
                    genome=[g for g in args.genome.split(",") if g] if args.genome else None,
                    counts=counts or None)
    except (InputError, OSError, ValueError) as err:  # OSError: e.g. --out not writable
        return _fail(str(err))
    print(f"wrote {m.root}")
    return 0


def cmd_info(args) -> int:
    import json

    from .manifest import Manifest

    try:
        m = Manifest.load(args.shards)
    except (FileNotFoundError, ValueError) as err:
        return _fail(str(err))
    if args.json:
        print(json.dumps(m.raw, indent=1))
    else:
        print(m.summary())
    return 0


def cmd_verify(args) -> int:
    from .manifest import Manifest

    try:
        m = Manifest.load(args.shards)
        report = m.verify(progress=not args.quiet and sys.stderr.isatty())
    except (OSError, ValueError) as err:
        return _fail(str(err))
    size = f"{report.n_chunks:,} X chunks, {report.n_bytes / 2**20:,.1f} MiB"
    if report.ok:
        print(f"{m.root}: {len(m.shards)} shards intact ({size} checked)")
        return 0
    for msg in report.problems:
        print(f"corrupt: {msg}")
    more = report.n_problems - len(report.problems)
    return _fail(f"{m.root}: {report.n_problems} problem(s) in {len(m.shards)} shards "
                 f"({size} checked){f', {more} not listed' if more else ''}; first: "
                 f"{report.problems[0]}")


def cmd_demo(args) -> int:
    from .demo import ensure_demo

    d = ensure_demo(args.root, progress=not args.quiet, log=lambda s: print(s, file=sys.stderr))
    print(f"demo shards: {d.shards} (the training corpus: atlas and bulk samples)\n"
          f"synthetic inputs: {d.raw} (screen.h5ad: the screen, held out of training)\n"
          f"ground truth: {d.truth}")
    return 0
