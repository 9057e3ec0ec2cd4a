"""Does TxFM learn? Train on the demo corpus, embed its screen, benchmark against baselines.

``python -m txfm.eval.learning`` runs, in one process and with fixed seeds, what a user runs by
hand (``docs/learning.md``)::

    txfm train                      # the demo corpus (txfm-demo/shards), tiny preset
    txfm embed                      # the demo screen -> .obsm["X_txfm"]
    txfm eval perturbation          # model vs Lib+Log / PCA fit on the screen and on the
                                    # training corpus, and the oracle ceiling for K shown genes

and prints the benchmark with the checks that say whether the model learned: its average at
least PCA's, and linear-probe / kNN top-1 at least 5x chance. ``--ablation`` also trains the
paper's Table 5 alternatives with the same budget and seeds (MSE instead of the Poisson loss,
ReLU instead of the rectified tanh) and our design choices undone (the paper's literal token
``[E_g ; x]`` or RMS-normalised token embeddings instead of the "split" token, one constant
starting bias), so that their effect is measured on planted ground truth; ``--variants``
picks some of them, and ``--seed`` repeats a comparison with another training seed.

Outputs under ``--out``: one run folder per variant (checkpoint, ``metrics.csv``, ``loss.png``
with the learning diagnostics), the embedded screen, the benchmark tables
(``perturbation_all.csv``, ``perturbation.md``) and ``learning.json`` with the headline numbers.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

# The Table 5 variants: name -> extra `txfm train` arguments (same data, budget and seeds).
VARIANTS = {
    "txfm": [],
    "mse": ["--loss", "mse"],
    "relu": ["--activation", "relu"],
    "literal_tokens": ["--set", "token_norm=none"],
    "rms_tokens": ["--set", "token_norm=rms"],
    "constant_bias": ["--no-init-bias"],
}
CHANCE_FACTOR = 5.0


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m txfm.eval.learning",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", default="txfm-demo", help="demo data folder (made if absent)")
    p.add_argument("--out", default="runs/learning", help="output folder")
    p.add_argument("--checkpoint", default=None,
                   help="evaluate this run instead of training the default variant")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the "
                                                           "tiny recipe's)")
    p.add_argument("--seed", type=int, default=None,
                   help="training seed of every variant (default: txfm train's, 0); the data, "
                        "the embedding draws and the benchmark keep their fixed seeds")
    p.add_argument("--ablation", action="store_true",
                   help="also train and evaluate the Table 5 variants " + str(list(VARIANTS)[1:]))
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of the --ablation variants to train "
                        "(implies --ablation)")
    p.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    names = list(VARIANTS) if args.ablation else ["txfm"]
    if args.variants:
        picked = [v.strip() for v in args.variants.split(",") if v.strip()]
        bad = [v for v in picked if v not in VARIANTS]
        if bad:
            p.error(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
        names = ["txfm"] + [v for v in picked if v != "txfm"]

    from txfm.data.demo import ensure_demo
    from txfm.train import load_checkpoint

    demo = ensure_demo(args.root, progress=not args.no_progress, log=print)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet = ["--no-progress"] if args.no_progress else []
    threads = ["--threads", str(args.threads)] if args.threads else []
    seed = ["--seed", str(args.seed)] if args.seed is not None else []
    steps = ["--steps", str(args.steps)] if args.steps else []
    screen = demo.raw / "screen.h5ad"

    runs: dict[str, pathlib.Path] = {}
    for name in names:
        if name == "txfm" and args.checkpoint:
            runs[name] = pathlib.Path(args.checkpoint)
            continue
        run = out / f"run_{name}"
        if not (run / "checkpoints").is_dir():
            _run(["train", "--data", str(demo.shards), "--out", str(run), *steps, *seed,
                  *VARIANTS[name], *quiet])
        runs[name] = run

    emb = screen
    ks = set()
    for name, run in runs.items():  # each variant adds its key to a copy of the screen
        key = "X_txfm" if name == "txfm" else f"X_{name}"
        src, emb = emb, out / f"screen_emb_{name}.h5ad"
        _run(["embed", "--checkpoint", str(run), "--input", str(src), "--out", str(emb),
              "--key", key, *quiet])
        _, config, _, _ = load_checkpoint(run, map_location="cpu")
        ks.add(int(config.k))
    table_dir = out / "perturbation"
    _run(["eval", "perturbation", "--embeddings", str(emb), "--perturbation-key", "perturbation",
          "--control", "non-targeting", "--batch-key", "batch",
          "--db", str(demo.truth / "relationships.txt"), "--baselines", "liblog,pca",
          "--fit-on", str(demo.shards), "--oracle-k", ",".join(map(str, sorted(ks))),
          "--out", str(table_dir), *threads])

    best = _best(table_dir / "perturbation_all.csv")
    n_perts = int(json.loads((demo.truth / "params.json").read_text())["perturbations"])
    chance = 100.0 / n_perts
    model, pca = best.loc["X_txfm"], best.loc["pca"]
    checks = {
        "average >= PCA's": bool(model["average"] >= pca["average"]),
        f"lin_top1 >= {CHANCE_FACTOR:g}x chance ({CHANCE_FACTOR * chance:.1f})":
            bool(model["lin_top1"] >= CHANCE_FACTOR * chance),
        f"knn_top1 >= {CHANCE_FACTOR:g}x chance ({CHANCE_FACTOR * chance:.1f})":
            bool(model["knn_top1"] >= CHANCE_FACTOR * chance),
    }
    print(f"\nchance: top-1 {chance:.1f}%, top-5 {5 * chance:.1f}% ({n_perts} perturbations)")
    for what, ok in checks.items():
        print(f"  X_txfm {what}: {'yes' if ok else 'NO'}")
    summary = {"chance_top1": chance, "checks": checks,
               "best": best.reset_index().to_dict(orient="records")}
    (out / "learning.json").write_text(json.dumps(summary, indent=1, default=float))
    print(f"wrote {out / 'learning.json'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
