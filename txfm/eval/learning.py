"""Does TxFM learn? Train on the demo corpus, embed its held-out screen, benchmark against baselines.

``python -m txfm.eval.learning`` runs, in one process and with fixed seeds, what a user runs by
hand (``docs/learning.md``)::

    txfm train                      # the demo corpus (txfm-demo/shards: atlas + bulk), tiny
    txfm embed                      # the demo screen, held out of training -> .obsm["X_txfm"]
    txfm eval perturbation          # model vs the screen's raw counts, Lib+Log / PCA fit on
                                    # the screen and on the training corpus, and the oracle
                                    # ceiling for K shown genes

and prints the benchmark with the checks that say whether the model learned: its average at
least PCA's, linear-probe / kNN top-1 at least 5x chance, and at least 2 points above those
of the same model untrained (``X_untrained``: the tiny preset at its initial weights, written by
one training step at a learning rate of 1e-30 with no weight decay, which moves each weight by
at most 1e-30). That last baseline matters: a
randomly initialised encoder already passes much of a 208-gene profile through, so chance is
a weak bar on the demo. ``--ablation`` also trains the
paper's Table 5 alternatives with the same budget and seeds (MSE instead of the Poisson loss,
ReLU instead of the rectified tanh) and our design choices undone (the paper's literal token
``[E_g ; x]`` or RMS-normalised token embeddings instead of the "split" token, one constant
starting bias, the rectified tanh's ``beta = 4 e`` kept constant at tiny's ``target_sum``), so
that their effect is measured on planted ground truth (the screen's perturbations, and the
recall of the planted gene programs by each model's codebook and decoder, the paper's Table 5
"enc" and "dec"); ``--variants`` picks some of them, and
``--seed`` repeats a comparison with another training seed.

Outputs under ``--out``: one run folder per variant and one for the untrained baseline
(``run_<variant>``, ``run_untrained``: checkpoints, ``metrics.csv``, ``loss.png`` with the
learning diagnostics), the embedded screen (``screen_emb_<variant>.h5ad``), each run's gene
representations and their recall of the demo's planted within-program gene pairs
(``genes/genes_<variant>.h5ad``, ``genes/<variant>/relationships.csv``: the paper's Table 5
"enc" and "dec"), the benchmark tables (``perturbation/perturbation.csv``, the best
post-processing per embedding, ``perturbation_all.csv`` and ``perturbation.png``) and
``learning.json`` with the headline numbers and the gene recall (strict JSON: a metric that
was not computed is ``null``).

``--summarize OUT OUT ...`` trains nothing: it reads finished ``--out`` folders of this command
(for example one per ``--seed``) and prints Table 5 over them. For each variant and baseline it
gives the mean ± sd over the folders and the paired difference "default model minus it"
(mean, standard error ``sd / sqrt(n)``, and the folders where the default is ahead). It does so
for the best post-processing by average (what the benchmark reports) and for each
post-processing held fixed, and for the gene recall (enc, dec). It writes the same numbers to
``<--out>/table5_seeds.csv``.

A run folder that exists is reused when its newest checkpoint finished the requested
``--steps`` with the requested ``--seed``, resumed (``txfm train --resume``) when it stopped
early, and refused when it was trained with other ``--steps`` or ``--seed``.

Exit status: 0 when every check passes, 1 when a finished run's checks fail, 2 for a usage
error (a bad argument, an unusable ``--out``/``--root``/``--checkpoint``, a run folder trained
with other settings, or a step that rejected its input; one ``error:`` line), 130 when
interrupted (Ctrl-C), 143 when terminated (SIGTERM, as a scheduler's time limit sends it; a
training step under way checkpoints first), 141, without a traceback, when the reader of its
output went away (``| head``; the files written so far are whole).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import sys

from txfm.cli import (ArgumentParser, UsageError, error_message, int_at_least, nonnegative_int,
                      run_piped, run_stoppable)
from txfm.files import write_atomic
from txfm.model.config import PAPER_BETA

from .cli import PERTURBATION_FILES, RELATIONSHIP_FILES, _output, _writable

# The Table 5 variants: name -> extra `txfm train` arguments (same data, budget and seeds).
VARIANTS = {
    "txfm": [],
    "mse": ["--loss", "mse"],
    "relu": ["--activation", "relu"],
    # the paper's beta = 4e as a constant: at tiny's target_sum 1e4 the default scales it
    "paper_beta": ["--set", f"tanh_beta={PAPER_BETA!r}"],
    "literal_tokens": ["--set", "token_norm=none"],
    "rms_tokens": ["--set", "token_norm=rms"],
    "constant_bias": ["--no-init-bias"],
}
CHANCE_FACTOR = 5.0
# The same model at its initial weights (the decoder's bias initialised from the corpus, as in
# every run): one step, the smallest run the trainer checkpoints, which a one-step schedule
# runs at the peak rate. At 1e-30 AdamW moves each weight by at most 1e-30, below float32's
# resolution of any weight larger than ~1e-22, and no weight decay.
UNTRAINED = "untrained"
UNTRAINED_ARGS = ["--steps", "1", "--lr", "1e-30", "--weight-decay", "0"]
# Percentage points by which lin / kNN top-1 must beat the untrained model's: a top-1 rate
# over the demo's ~9,000 test cells has a sampling sd of about 0.5 points, and a 20-step model
# is already 0.4-0.7 points ahead, so a bare ">" would pass a model that has not learned.
LEARNED_MARGIN = 2.0
# train and embed run in this process: torch's and the BLAS libraries' pools, and these for
# anything they start
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _key(name: str) -> str:
    """The ``.obsm`` key of a run's screen embedding (``X_txfm`` for the default variant)."""
    return f"X_{name}"


# What this command writes in --out, named once for the writers and for the check before any
# work (_out_names)
SUMMARY = "learning.json"
TABLES = "perturbation"  # txfm eval perturbation's --out
GENES = "genes"


def _run_dir(out: pathlib.Path, name: str) -> pathlib.Path:
    return out / f"run_{name}"


def _screen(out: pathlib.Path, name: str) -> pathlib.Path:
    """The screen with the embeddings of ``name`` and of every variant embedded before it."""
    return out / f"screen_emb_{name}.h5ad"


def _genes(out: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(``txfm genes``' h5ad, ``txfm eval relationships``' --out) of a run."""
    return out / GENES / f"genes_{name}.h5ad", out / GENES / name


def _out_names(names: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(files, folders) the runs ``names`` write, relative to --out."""
    here = pathlib.Path()
    files = [SUMMARY, *(f"{TABLES}/{f}" for f in PERTURBATION_FILES)]
    folders = [TABLES, GENES]
    for n in names:
        genes, table = _genes(here, n)
        files += [str(_screen(here, n)), str(genes), *(str(table / f) for f in RELATIONSHIP_FILES)]
        folders += [str(_run_dir(here, n)), str(table)]
    return tuple(files), tuple(folders)


def _run(argv: list[str]) -> None:
    from txfm.cli import main

    print("$ txfm " + " ".join(argv), flush=True)
    code = main(argv)
    if code:
        raise SystemExit(code)


def _best(table_csv: pathlib.Path):
    import pandas as pd

    from .perturbation import best_rows

    return best_rows(pd.read_csv(table_csv)).set_index("embedding")


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m txfm.eval.learning",
                       description=__doc__.split("\n\n")[0],
                       epilog=next(t for t in __doc__.split("\n\n")
                                   if t.startswith("Exit status")).replace("``", ""),
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", default="txfm-demo",
                   help="demo data folder (made if absent; a non-empty folder that is not a "
                        "txfm demo is refused)")
    p.add_argument("--out", default="runs/learning", help="output folder")
    p.add_argument("--checkpoint", default=None,
                   help="evaluate this run instead of training the default variant (not with "
                        "--steps or --seed)%(default).0s")
    p.add_argument("--steps", type=int_at_least(1), default=None,
                   help="training steps%(default).0s (default: the tiny recipe's, 3,000)")
    p.add_argument("--seed", type=nonnegative_int, default=None,
                   help="training seed of every variant%(default).0s (default: txfm train's, "
                        "0); the data, the embedding draws and the benchmark keep their fixed "
                        "seeds")
    p.add_argument("--ablation", action="store_true",
                   help="also train and evaluate the Table 5 variants " + str(list(VARIANTS)[1:]))
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of the --ablation variants to train "
                        "besides the default model, txfm, which is always trained (naming it "
                        "too changes nothing)%(default).0s")
    p.add_argument("--summarize", nargs="+", metavar="RUN_OUT", default=None,
                   help="train nothing: summarise finished --out folders of this command (e.g. "
                        "one per --seed) as Table 5 over seeds, with paired differences from "
                        "the default model%(default).0s")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="BLAS/OpenMP threads of training, embedding and the benchmark "
                        "%(default).0s(default: the libraries')")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _names(p: argparse.ArgumentParser, args) -> list[str]:
    """The variants to train, ``txfm`` first; exits through ``p.error`` on a bad ``--variants``."""
    if args.variants is None:
        return list(VARIANTS) if args.ablation else ["txfm"]
    picked = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not picked:
        p.error(f"--variants {args.variants!r}: no variant named; choose from {list(VARIANTS)} "
                "(or leave --variants out)")
    bad = [v for v in picked if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    twice = sorted({v for v in picked if picked.count(v) > 1})
    if twice:
        p.error(f"--variants {args.variants!r}: {twice[0]} is named twice; name each once")
    return ["txfm"] + [v for v in picked if v != "txfm"]


@contextlib.contextmanager
def _threads(n: int | None):
    """At most ``n`` threads in torch, the BLAS libraries and their subprocesses (restored
    after: the command may run inside another program, e.g. a test)."""
    if n is None:
        yield
        return
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update({k: str(n) for k in THREAD_VARS})  # before torch's first import, if any
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(before)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_root(root: pathlib.Path) -> None:
    from txfm.data.demo import DemoFolderError, check_root

    try:
        check_root(root)
    except DemoFolderError as exc:
        raise UsageError(f"--root {exc}") from exc
    _writable(root, "--root")


def _state(path: pathlib.Path) -> dict:
    """The newest readable checkpoint of a run folder, or the checkpoint file ``path``."""
    from txfm.train.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint

    if not path.is_dir():
        return read_checkpoint(path)
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path} has no checkpoints; train with `txfm train --out {path}` "
                              "or pass a .pt file")
    return found[1]


def _plan(run: pathlib.Path, steps: int, seed: int, out: pathlib.Path
          ) -> tuple[str, str, int | None]:
    """``("train" | "resume" | "reuse", what to tell the user, the run's K or None)`` for the
    run folder ``run`` (K is known once a checkpoint exists; resuming keeps it).

    Raises UsageError when ``run`` was trained with other steps or seed, or none of its
    checkpoints can be read: using it would benchmark another model than the one asked for.
    """
    from txfm.train.checkpoint import CheckpointError, list_checkpoints

    if not list_checkpoints(run):
        return "train", "", None
    try:
        state = _state(run)
    except CheckpointError as exc:
        raise UsageError(f"--out {out}: {error_message(exc)}; delete {run} to train it again, "
                         "or choose another --out") from exc
    cfg = state.get("train_config") or {}
    had = (cfg.get("steps"), cfg.get("seed"))
    if had != (steps, seed):
        raise UsageError(f"--out {out}: {run} was trained with --steps {had[0]} --seed {had[1]}, "
                         f"not --steps {steps} --seed {seed}; choose another --out or delete "
                         f"{run}")
    done, k = int(state.get("step") or 0), int(state["model_config"]["k"])
    if done >= steps:
        return "reuse", f"reusing {run}: finished ({done} of {steps} steps, seed {seed})", k
    return "resume", f"resuming {run}: stopped at step {done} of {steps} (seed {seed})", k


def _perturbations(demo, root: pathlib.Path) -> int:
    """The demo screen's perturbation count, after checking that the demo files this command
    reads open; UsageError naming the file otherwise (before hours of training, not after)."""
    import h5py

    params = demo.truth / "params.json"
    current = params
    try:
        n = int(json.loads(params.read_text())["perturbations"])
        current = demo.truth / "relationships.txt"
        current.read_text()
        current = demo.raw / "screen.h5ad"
        with h5py.File(current, "r") as f:
            if "X" not in f or "obs" not in f:
                raise ValueError("no X or obs: not an AnnData file")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--root {root}: demo file {current} cannot be read "
                         f"({type(exc).__name__}: {error_message(exc)}); delete {root} (or that "
                         "file) and run again to rebuild the demo") from exc
    return n


def _gene_recall(runs: dict[str, pathlib.Path], demo, out: pathlib.Path, threads: list[str],
                 quiet: list[str]) -> dict[str, dict[str, float]]:
    """Each run's recall (5/95, %) of the demo's planted within-program gene pairs: the
    paper's Table 5 "enc" (``codebook``) and "dec" (``decoder``) columns, from ``txfm genes``
    and ``txfm eval relationships`` (files under ``OUT/genes``)."""
    import pandas as pd

    recall = {}
    (out / GENES).mkdir(parents=True, exist_ok=True)
    for name, run in runs.items():
        genes, table = _genes(out, name)
        _run(["genes", "--checkpoint", str(run), "--out", str(genes), *quiet])
        _run(["eval", "relationships", "--genes", str(genes), "--db",
              str(demo.truth / "relationships.txt"), "--no-sweep", "--out", str(table), *threads,
              *quiet])
        rows = pd.read_csv(table / "relationships.csv")
        rows = rows[(rows["database"] == "combined") & rows["primary"].astype(bool)]
        # learning.json keeps the names it has always had: "codebook", "decoder"
        recall[name] = {r.representation.removeprefix("X_"): 100 * float(r.recall_5_95_mean)
                        for r in rows.itertuples()}
    return recall


def _table5(best, recall: dict[str, dict[str, float]]):
    """One row per run: the perturbation benchmark's best row beside the gene recall."""
    import pandas as pd

    rows = []
    for name, rec in recall.items():
        row = best.loc[_key(name)] if _key(name) in best.index else {}
        rows.append({"variant": name, "average": row.get("average"),
                     "lin_top1": row.get("lin_top1"), "knn_top1": row.get("knn_top1"),
                     "enc": rec.get("codebook"), "dec": rec.get("decoder")})
    return pd.DataFrame(rows)


SUMMARY_METRICS = ("average", "pcst", "lin_top1", "knn_top1")


def _gene_recall_of(out: pathlib.Path) -> list[tuple[str, str, float]]:
    """``(variant, "enc" | "dec", recall)`` of a finished run's ``learning.json`` (none when the
    run has no such file, or scored no genes). Raises :class:`UsageError` naming the file when
    it is not this command's JSON."""
    path = out / SUMMARY
    if not path.is_file():
        return []
    try:
        recall = json.loads(path.read_text()).get("gene_recall") or {}
        found = []
        for name, rec in recall.items():
            for metric, key in (("enc", "codebook"), ("dec", "decoder")):
                value = rec.get(key)
                if value is not None:
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        raise ValueError(f"gene_recall.{name}.{key} is {value!r}, not a number")
                    found.append((str(name), metric, float(value)))
        return found
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, ValueError) as exc:
        raise UsageError(f"--summarize {out}: {path} cannot be read ({type(exc).__name__}: "
                         f"{error_message(exc)}); run the command again for that run") from exc


def summarize(outs: list[pathlib.Path]):
    """Table 5 over several finished runs of this command (``outs``: their ``--out`` folders,
    e.g. one per ``--seed``), as a long table with one row per (variant, rows, metric).

    ``variant``: each embedding of the benchmark without its ``X_`` (``txfm``, ``relu``,
    ``untrained``, ``pca`` ...) and, for ``rows == "genes"``, each run's gene recall (metrics
    ``enc``, ``dec``: the codebook and the decoder). ``rows``: ``best`` (each embedding's
    post-processing with the highest average in that folder, what the benchmark reports) or a
    post-processing held fixed. Columns: ``n`` folders, ``mean`` and ``sd`` over them (%), and
    the paired difference ``txfm - variant`` within each folder: ``diff``, ``diff_se``
    (``sd / sqrt(n)``) and ``ahead`` (folders where ``txfm`` is higher). A variant missing
    from some folders is summarised over the folders that have it.

    Raises:
        UsageError: a folder without a readable ``perturbation/perturbation_all.csv`` with the
            default model's rows (not a finished run of this command), or with an unreadable
            ``learning.json``.
    """
    import numpy as np
    import pandas as pd

    from .perturbation import best_rows

    values: dict[tuple[str, str, str], dict[int, float]] = {}
    for i, out in enumerate(outs):
        table_csv = out / TABLES / "perturbation_all.csv"
        if not table_csv.is_file():
            raise UsageError(f"--summarize {out}: no {table_csv.relative_to(out)}; give --out "
                             f"folders of finished runs of python -m txfm.eval.learning")
        try:
            table = pd.read_csv(table_csv)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise UsageError(f"--summarize {out}: {table_csv} cannot be read ({exc}); run the "
                             f"command again for that run") from exc
        missing = sorted({"embedding", "postprocess", *SUMMARY_METRICS} - set(table.columns))
        if missing:
            raise UsageError(f"--summarize {out}: {table_csv.name} has no column {missing}; it "
                             f"is not this command's benchmark")
        text = [m for m in SUMMARY_METRICS if not pd.api.types.is_numeric_dtype(table[m])]
        if text:
            raise UsageError(f"--summarize {out}: {table_csv.name} holds text in {text}; run "
                             f"the command again for that run")
        names = table[["embedding", "postprocess"]]
        if names.isna().any().any() or not names.map(lambda v: isinstance(v, str)).all().all():
            raise UsageError(f"--summarize {out}: {table_csv.name} has rows without an embedding "
                             f"or post-processing name; run the command again for that run")
        if _key("txfm") not in set(table["embedding"]):
            raise UsageError(f"--summarize {out}: {table_csv.name} has no {_key('txfm')} rows "
                             f"(the default model); it is not this command's benchmark")
        for rows, part in [("best", best_rows(table)), *table.groupby("postprocess")]:
            for r in part.itertuples(index=False):
                name = r.embedding[2:] if r.embedding.startswith("X_") else r.embedding
                for metric in SUMMARY_METRICS:
                    values.setdefault((name, rows, metric), {})[i] = float(getattr(r, metric))
        for name, metric, value in _gene_recall_of(out):
            values.setdefault((name, "genes", metric), {})[i] = value

    out_rows = []
    for (name, rows, metric), per_run in values.items():
        runs = sorted(per_run)
        x = np.array([per_run[i] for i in runs])
        ref = values.get(("txfm", rows, metric), {})
        paired = [i for i in runs if i in ref]
        d = np.array([ref[i] - per_run[i] for i in paired])
        out_rows.append({
            "variant": name, "rows": rows, "metric": metric, "n": len(x),
            "mean": x.mean(), "sd": x.std(ddof=1) if len(x) > 1 else math.nan,
            "diff": d.mean() if len(d) else math.nan,
            "diff_se": d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.nan,
            "ahead": int((d > 0).sum()), "paired": len(d)})
    return pd.DataFrame(out_rows)


def _print_summary(args) -> int:
    from .perturbation import POSTPROCESSING

    out = _output(args.out, folder=True, writes=("table5_seeds.csv",))  # before the runs' reads
    outs = [pathlib.Path(o) for o in args.summarize]
    table = summarize(outs)
    n = len(outs)
    # saved before anything is printed: the table outlives a reader that stops early (| head)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "table5_seeds.csv"
    write_atomic(csv_path, lambda tmp: table.to_csv(tmp, index=False))

    def cell(r, what):
        if what == "mean":
            return f"{r['mean']:.2f} ± {r['sd']:.2f}"
        if r["variant"] == "txfm":
            return "–"
        return f"{r['diff']:+.2f} ({r['diff_se']:.2f})"

    print(f"Table 5 over {n} runs ({', '.join(map(str, outs))}); mean ± sd over runs, and "
          f"txfm minus each variant paired within a run: mean (standard error)")
    for rows in ("best", *(pp for pp in POSTPROCESSING if pp in set(table["rows"]))):
        sub = table[table["rows"] == rows].set_index(["variant", "metric"], drop=False)
        label = "best post-processing by average" if rows == "best" else f"{rows} held fixed"
        print(f"\n{label}:\n| variant | average | txfm - variant: average | runs txfm ahead "
              "| pcst | lin_top1 | knn_top1 |\n|---|---:|---:|---:|---:|---:|---:|")
        for name in dict.fromkeys(v for v, _ in sub.index):
            avg = sub.loc[(name, "average")]
            ahead = "–" if name == "txfm" else f"{avg['ahead']}/{avg['paired']}"
            print(f"| {name} | {cell(avg, 'mean')} | {cell(avg, 'diff')} | {ahead} | "
                  + " | ".join(cell(sub.loc[(name, m)], 'diff') for m in SUMMARY_METRICS[1:])
                  + " |")
    genes = table[table["rows"] == "genes"].set_index(["variant", "metric"], drop=False)
    if len(genes):
        print("\ngene recall of the planted programs (enc: codebook, dec: decoder):\n"
              "| variant | enc | dec | txfm - variant: enc | dec |\n|---|---:|---:|---:|---:|")
        for name in dict.fromkeys(v for v, _ in genes.index):
            enc, dec = genes.loc[(name, "enc")], genes.loc[(name, "dec")]
            print(f"| {name} | {cell(enc, 'mean')} | {cell(dec, 'mean')} | {cell(enc, 'diff')} "
                  f"| {cell(dec, 'diff')} |")
    print(f"\nwrote {csv_path}")
    return 0


def _plain(value):
    """``value`` with numpy scalars as Python numbers and NaN/inf as None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: pathlib.Path, doc) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(_plain(doc), indent=1,
                                                              allow_nan=False)))


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns its exit status (see the module docstring).

    Argument errors exit through argparse (``SystemExit(2)``); an unusable ``--out``,
    ``--root`` or ``--checkpoint``, a run folder trained with other settings and any step's
    input error are one ``error:`` line on stderr and status 2; Ctrl-C prints
    ``interrupted``, status 130, and SIGTERM ``terminated``, status 143 (a training step under
    way first writes its checkpoint; a half-made demo is removed).
    """
    p = _parser()
    args = p.parse_args(argv)
    if args.checkpoint and (args.steps is not None or args.seed is not None):
        p.error("--checkpoint: --steps and --seed would not apply to it (it is trained "
                "already); leave them out, or leave out --checkpoint to train")
    if args.summarize is not None:
        clash = [flag for flag, value in (("--checkpoint", args.checkpoint),
                                          ("--steps", args.steps), ("--seed", args.seed),
                                          ("--variants", args.variants)) if value is not None]
        if args.ablation:
            clash.append("--ablation")
        if clash:
            p.error(f"--summarize reads finished runs and trains nothing: leave out "
                    f"{', '.join(clash)}")
        if len(args.summarize) < 2:
            p.error("--summarize: give at least two --out folders (one per training seed)")
    names = _names(p, args)
    def body() -> int:
        try:
            with _threads(args.threads):
                if args.summarize is not None:
                    return _print_summary(args)
                return _learn(args, names)
        except SystemExit as exc:  # a step failed (it printed why) or was interrupted
            return exc.code if isinstance(exc.code, int) else 1

    # SIGTERM (a scheduler's time limit) and Ctrl-C stop it as they stop txfm's own commands
    return run_stoppable(body)


def _learn(args, names: list[str]) -> int:
    from txfm.train import TrainConfig
    from txfm.train.checkpoint import CheckpointError

    # every check before the demo is built or anything trains, the names it writes in --out too
    files, folders = _out_names([*names, UNTRAINED])
    out = _output(args.out, folder=True, writes=files, folders=folders)
    root = pathlib.Path(args.root)
    _check_root(root)
    ks: set[int] = set()
    runs: dict[str, pathlib.Path] = {}
    todo: dict[str, str] = {}
    run_k: dict[str, int | None] = {}  # each run's K, read from its checkpoint once
    if args.checkpoint:
        runs["txfm"] = pathlib.Path(args.checkpoint)
        try:
            ks.add(int(_state(runs["txfm"])["model_config"]["k"]))
        except CheckpointError as exc:
            raise UsageError(f"--checkpoint: {error_message(exc)}") from exc
    asked = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    try:  # the recipe's own limits (e.g. the seed's range), before hours of work
        recipe = TrainConfig.for_preset("tiny", **asked)
    except ValueError as exc:
        field = getattr(exc, "field", None)
        raise UsageError(f"--{field} {getattr(exc, 'value', '')}: {getattr(exc, 'rule', '')}"
                         if field in asked else error_message(exc)) from exc
    steps, seed = recipe.steps, recipe.seed
    for name in [*names, UNTRAINED]:
        if name not in runs:
            runs[name] = _run_dir(out, name)
            todo[name], note, run_k[name] = _plan(runs[name], 1 if name == UNTRAINED else steps,
                                                  seed, out)
            if note:
                print(note)

    from txfm.data.demo import ensure_demo

    from .perturbation import chance_percent
    from .plots import markdown_table
    from .relationships import RANDOM_RECALL

    demo = ensure_demo(root, progress=not args.no_progress, log=print)
    n_perts = _perturbations(demo, root)
    out.mkdir(parents=True, exist_ok=True)
    quiet = ["--no-progress"] if args.no_progress else []
    threads = ["--threads", str(args.threads)] if args.threads else []
    train_args = [*(["--steps", str(args.steps)] if args.steps is not None else []),
                  *(["--seed", str(args.seed)] if args.seed is not None else [])]
    for name, action in todo.items():
        if action != "reuse":
            how = ([*UNTRAINED_ARGS, "--seed", str(seed)] if name == UNTRAINED
                   else [*train_args, *VARIANTS[name]])
            if name == UNTRAINED:
                print("the untrained baseline: the model at its initial weights, so its "
                      "diagnostics rightly warn that its CLS carries no cell state", flush=True)
            _run(["train", *(["--resume"] if action == "resume" else []),
                  "--data", str(demo.shards), "--out", str(runs[name]), *how, *quiet])

    emb = demo.raw / "screen.h5ad"
    for name, run in runs.items():  # each variant adds its key to a copy of the screen
        src, emb = emb, _screen(out, name)
        _run(["embed", "--checkpoint", str(run), "--input", str(src), "--out", str(emb),
              "--key", _key(name), *quiet])
        if name in todo and name != UNTRAINED:  # the baseline needs no oracle of its own
            ks.add(run_k[name] if run_k[name] is not None
                   else int(_state(run)["model_config"]["k"]))
    recall = _gene_recall(runs, demo, out, threads, quiet)
    table_dir = out / TABLES
    _run(["eval", "perturbation", "--embeddings", str(emb), "--perturbation-key", "perturbation",
          "--control", "non-targeting", "--batch-key", "batch",
          "--db", str(demo.truth / "relationships.txt"), "--baselines", "raw,liblog,pca",
          "--fit-on", str(demo.shards), "--oracle-k", ",".join(map(str, sorted(ks))),
          "--out", str(table_dir), *threads, *quiet])

    best = _best(table_dir / "perturbation_all.csv")
    chance, chance5 = chance_percent(n_perts)
    model, pca, untrained = best.loc[_key("txfm")], best.loc["pca"], best.loc[_key(UNTRAINED)]
    checks = {
        "average >= PCA's": bool(model["average"] >= pca["average"]),
        f"lin_top1 >= {CHANCE_FACTOR:g}x chance ({CHANCE_FACTOR * chance:.1f})":
            bool(model["lin_top1"] >= CHANCE_FACTOR * chance),
        f"knn_top1 >= {CHANCE_FACTOR:g}x chance ({CHANCE_FACTOR * chance:.1f})":
            bool(model["knn_top1"] >= CHANCE_FACTOR * chance),
        f"lin_top1 >= the untrained model's + {LEARNED_MARGIN:g} "
        f"({untrained['lin_top1'] + LEARNED_MARGIN:.1f})":
            bool(model["lin_top1"] >= untrained["lin_top1"] + LEARNED_MARGIN),
        f"knn_top1 >= the untrained model's + {LEARNED_MARGIN:g} "
        f"({untrained['knn_top1'] + LEARNED_MARGIN:.1f})":
            bool(model["knn_top1"] >= untrained["knn_top1"] + LEARNED_MARGIN),
    }
    summary = {"chance_top1": chance, "checks": checks,
               "best": best.reset_index().to_dict(orient="records"),
               "gene_recall": recall, "gene_recall_random": RANDOM_RECALL}
    _write_json(out / SUMMARY, summary)  # before the tables: see _print_summary
    print(f"\nchance: top-1 {chance:.1f}%, top-5 {chance5:.1f}% ({n_perts} perturbations)")
    for what, ok in checks.items():
        print(f"  X_txfm {what}: {'yes' if ok else 'NO'}")
    print(f"\nTable 5 on the planted ground truth: the screen's perturbations (best "
          f"post-processing) and the recall of the within-program gene pairs by the "
          f"codebook (enc) and the decoder's gene weights (dec), 5/95 %, random "
          f"{RANDOM_RECALL:g}")
    print(markdown_table(_table5(best, recall)))
    print(f"wrote {out / SUMMARY}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(run_piped(main))
