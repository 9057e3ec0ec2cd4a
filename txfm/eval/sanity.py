"""Do the metrics measure what they claim? Ground-truth checks on the synthetic generator.

``python -m txfm.eval.sanity [--out DIR] [--cells N] [--genes G] [--perturbations P]``

Generates synthetic data (:func:`txfm.data.synth.generate`, whose gene programs, relationship
pairs and perturbation effects are known) and prints two tables:

1. *Relationship recall* of gene representations built from the truth — one-hot program
   membership, each gene outside every program its own singleton direction
   (:func:`truth_gene_representation`) — next to random vectors and to the truth with
   shuffled gene names. Expected: ~100%, the null rate (10% at 5/95, 20% at 10/90), ~null.
2. *Perturbation benchmark* of cell embeddings built from the true effects — program shift
   and knockdown of the cell's perturbation, a per-batch offset, Gaussian noise
   (:func:`truth_effect_embedding`) — with the true labels and with shuffled labels.
   Expected: p.cst ~100% and lin/knn far above chance vs p.cst ~0-1% and lin/knn at chance
   (1/P top-1, 5/P top-5).

The tests (``tests/test_eval_*.py``) assert the same on smaller data.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np
import pandas as pd

from txfm.cli import ArgumentParser, folder_problem, int_at_least, run_piped


def truth_gene_representation(programs: pd.DataFrame, noise: float, rng: np.random.Generator,
                              singleton_dims: int = 32) -> np.ndarray:
    """``[genes, programs + singleton_dims]``: one-hot program membership (``programs.program``,
    "" = none); a gene outside every program gets a random unit direction in the extra dims;
    plus ``noise`` x N(0, 1)."""
    prog = programs.program.fillna("").astype(str).to_numpy()
    names = sorted(p for p in set(prog) if p)
    onehot = (prog[:, None] == np.array(names)[None, :]).astype(float)
    single = prog == ""
    extra = np.zeros((len(prog), singleton_dims))
    extra[single] = rng.normal(size=(single.sum(), singleton_dims)) / np.sqrt(singleton_dims)
    rep = np.hstack([onehot, extra])
    return rep + noise * rng.normal(size=rep.shape)


def truth_effect_embedding(obs: pd.DataFrame, effects: pd.DataFrame, sigma: float,
                           rng: np.random.Generator, batch_scale: float = 1.0
                           ) -> np.ndarray:
    """``[cells, programs + targets]``: the cell's perturbation effect (``program_shift`` on its
    program's axis, ``knockdown_log / 2`` on the target's own axis; controls 0), plus a random
    offset per batch (``batch_scale``) and ``sigma`` x N(0, 1) noise."""
    progs = sorted(effects.program.unique())
    n_p, n_t = len(progs), len(effects)
    table = np.zeros((n_t, n_p + n_t))
    table[np.arange(n_t), [progs.index(p) for p in effects.program]] = effects.program_shift
    table[np.arange(n_t), n_p + np.arange(n_t)] = 0.5 * effects.knockdown_log
    lut = {t: i for i, t in enumerate(effects.target)}
    ix = np.array([lut.get(p, -1) for p in obs.perturbation.astype(str)])
    batch = obs.batch.astype(str).to_numpy()
    offsets = {b: batch_scale * rng.normal(size=n_p + n_t) for b in np.unique(batch)}
    x = np.where(ix[:, None] >= 0, table[np.maximum(ix, 0)], 0.0)
    return x + np.stack([offsets[b] for b in batch]) + sigma * rng.normal(size=x.shape)


def run(out: pathlib.Path, *, cells: int, genes: int, perturbations: int, seed: int = 0,
        sigma: float = 0.5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both checks; returns (relationship table, perturbation table)."""
    import warnings

    import anndata as ad

    from txfm.data.synth import generate

    from .perturbation import BenchmarkOptions, Labels, evaluate_embedding
    from .relationships import GeneRepresentation, read_pairs, recall_table

    synth = generate(out, cells=cells, genes=genes, perturbations=perturbations, seed=seed)
    rng = np.random.default_rng(seed)
    programs = pd.read_csv(synth.programs, sep="\t", keep_default_na=False)
    db = read_pairs(synth.relationships)
    symbols = programs.symbol.to_numpy(dtype=object)
    truth = truth_gene_representation(programs, 0.05, rng)
    reps = [GeneRepresentation("truth programs", truth, symbols, 32),
            GeneRepresentation("random vectors", rng.normal(size=truth.shape), symbols, 32),
            GeneRepresentation("truth, shuffled genes", truth, rng.permutation(symbols), 32)]
    rel = pd.concat([recall_table(r, [db]) for r in reps]).query("database == 'combined'")
    rel = rel[["representation", "n_genes", "n_pairs", "recall_5_95_mean", "recall_5_95_std",
               "recall_10_90_mean", "recall_10_90_std"]].reset_index(drop=True)

    screen = ad.read_h5ad(synth.datasets[0])
    effects = pd.read_csv(synth.perturbations, sep="\t")
    x = truth_effect_embedding(screen.obs, effects, sigma, rng)
    pert = screen.obs.perturbation.astype(str).to_numpy()
    batch = screen.obs.batch.astype(str).to_numpy()
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bmdb with < 20 perturbations on small settings
        for name, labels in (("true labels", pert), ("shuffled labels", rng.permutation(pert))):
            try:
                t = evaluate_embedding(x, Labels.build(labels, "non-targeting", batch), [db],
                                       options=BenchmarkOptions(postprocessing=("none", "center")))
            except ValueError as exc:  # its advice names options of txfm eval, not of this
                raise ValueError(f"--cells {cells}: too few cells for the benchmark "
                                 f"({str(exc).split('; ')[0]}); use more --cells (the default "
                                 f"is 8000)") from exc
            t.insert(0, "labels", name)
            rows.append(t)
    pert_table = pd.concat(rows, ignore_index=True)
    pert_table.attrs["n_perturbations"] = len(effects)
    return rel, pert_table


def main(argv: list[str] | None = None) -> int:
    from .perturbation import chance_percent
    from .plots import markdown_table

    p = ArgumentParser(prog="python -m txfm.eval.sanity", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="where to write the synthetic data (default: a "
                                               "temporary folder)")
    p.add_argument("--cells", type=int_at_least(20), default=8000)
    p.add_argument("--genes", type=int_at_least(50), default=1500)
    p.add_argument("--perturbations", type=int_at_least(1), default=30)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    args = p.parse_args(argv)
    if args.out is not None and (why := folder_problem(args.out)):
        p.error(f"--out {args.out}: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(args.out or tmp)
        try:
            rel, pert = run(out, cells=args.cells, genes=args.genes,
                            perturbations=args.perturbations, seed=args.seed)
        except ValueError as exc:  # the generator refuses a size it cannot honour
            p.error(str(exc))
    rel = rel.assign(**{c: 100 * rel[c] for c in rel.columns if c.startswith("recall")})
    print("Relationship recall (%) of the true gene programs, combined over the truth pairs:\n")
    print(markdown_table(rel))
    n_perts = int(pert.attrs["n_perturbations"])
    cols = ["labels", "postprocess", "pcst", "lin_top1", "lin_top5", "knn_top1", "knn_top5",
            "bmdb", "ilisi", "average"]
    top1, top5 = chance_percent(n_perts)
    print(f"\nPerturbation benchmark (%) of the true effects (chance: top-1 {top1:.1f}, "
          f"top-5 {top5:.1f}):\n")
    print(markdown_table(pert[cols]))
    return 0


if __name__ == "__main__":
    sys.exit(run_piped(main))
