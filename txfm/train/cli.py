"""``txfm train``: train TxFM from Zarr shards (or the synthetic demo) to checkpoints.

Examples::

    txfm train                                   # demo: synthetic shards + the tiny preset, CPU, minutes
    txfm train --preset S --data SHARDS --out runs/S
    txfm train --preset B --data SHARDS --out runs/B --resume
    torchrun --nproc_per_node=8 -m txfm.cli train --preset B --data SHARDS --out runs/B
    txfm train --data random:cells=4096,genes=2000 --steps 100   # in-memory random data
    txfm train --loss nb --activation clamped_relu --decoder-depth 0 --k 1024 --tau 0.5
    txfm train --set layerscale_init=1e-4 --set mlp_ratio=3

With ``--resume`` the run's saved configuration is reused (``RUN/config.json``) and only the
options given on the command line change it (e.g. ``--steps`` to train longer).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

_TRAIN_FLAGS = {  # argparse dest -> TrainConfig field
    "data": "data", "out": "out", "steps": "steps", "epochs": "epochs",
    "batch_size": "batch_size", "accum": "accum", "lr": "lr", "weight_decay": "weight_decay",
    "warmup": "warmup", "grad_clip": "grad_clip", "precision": "precision", "device": "device",
    "seed": "seed", "log_every": "log_every", "val_every": "val_every",
    "val_batches": "val_batches", "ckpt_every": "ckpt_every", "keep": "keep_checkpoints",
}
_MODEL_FLAGS = {"k": "k", "tau": "tau", "loss": "loss", "activation": "activation",
                "decoder_depth": "decoder_depth", "attention": "attention"}


def register(subparsers) -> None:
    from txfm.model.config import ACTIVATIONS, ATTENTION, LOSSES

    p = subparsers.add_parser("train", help="train TxFM (plain `txfm train`: the CPU demo)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--preset", default=None, help="tiny (default), S, B or L")
    g.add_argument("--data", default=None,
                   help="shards folder written by `txfm data convert`; default: the synthetic demo "
                        "shards (made in ./txfm-demo if absent); `random[:cells=N,genes=G,...]`: "
                        "an in-memory random corpus")
    g.add_argument("--out", default=None, help="run folder (default runs/<preset>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest readable checkpoint")
    g.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="no loss plot at the end")
    g.add_argument("--no-tensorboard", action="store_true", help="CSV metrics only")
    r = p.add_argument_group("recipe (defaults: SPEC §5 and the preset)")
    r.add_argument("--steps", type=int, default=None, help="optimizer steps")
    r.add_argument("--epochs", type=float, default=None, help="epochs (when --steps is not given)")
    r.add_argument("--batch-size", type=int, default=None, help="global batch per step")
    r.add_argument("--accum", type=int, default=None, help="gradient accumulation micro-batches")
    r.add_argument("--lr", type=float, default=None, help="peak learning rate (1e-3)")
    r.add_argument("--weight-decay", type=float, default=None, help="default 1/(lr x steps)")
    r.add_argument("--warmup", type=float, default=None, help="warm-up share of steps (0.1)")
    r.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (1.0; 0: off)")
    r.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--log-every", type=int, default=None)
    r.add_argument("--val-every", type=int, default=None)
    r.add_argument("--val-batches", type=int, default=None)
    r.add_argument("--ckpt-every", type=int, default=None)
    r.add_argument("--keep", type=int, default=None, help="checkpoints kept (3)")
    m = p.add_argument_group("model (ablation switches)")
    m.add_argument("--k", type=int, default=None, help="shown genes per sample")
    m.add_argument("--tau", type=float, default=None, help="frequency weighting of the draw (0)")
    m.add_argument("--loss", choices=LOSSES, default=None)
    m.add_argument("--activation", choices=ACTIVATIONS, default=None)
    m.add_argument("--decoder-depth", type=int, default=None, help="0 = linear decoder")
    m.add_argument("--attention", choices=ATTENTION, default=None)
    m.add_argument("--eager", action="store_true",
                   help="run on the eager reference ops instead of the fused kernels")
    m.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any TxFMConfig field, e.g. --set mlp_ratio=3 (repeatable)")
    p.set_defaults(func=run)


def _convert(value: str, current):
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    return value


def build_configs(args):
    """(TrainConfig, TxFMConfig) from parsed arguments (and RUN/config.json on --resume)."""
    from txfm.model import TxFMConfig, preset
    from txfm.train.config import TrainConfig

    name = args.preset or "tiny"
    out = pathlib.Path(args.out or f"runs/{name}")
    saved = out / "config.json"
    if args.resume and saved.exists():
        stored = json.loads(saved.read_text())
        train_cfg = TrainConfig.from_dict(stored["train"])
        model_cfg = TxFMConfig.from_dict(stored["model"])
    else:
        train_cfg = TrainConfig.for_preset(name, out=str(out))
        model_cfg = preset(name)
    changes = {field: getattr(args, dest) for dest, field in _TRAIN_FLAGS.items()
               if getattr(args, dest) is not None}
    if args.steps is not None:
        changes["epochs"] = None
    elif args.epochs is not None:
        changes["steps"] = None
    if args.grad_clip == 0:
        changes["grad_clip"] = None
    if args.compile:
        changes["compile"] = True
    if args.no_progress:
        changes["progress"] = False
    if args.no_plot:
        changes["plot"] = False
    if args.no_tensorboard:
        changes["tensorboard"] = False
    changes["resume"] = bool(args.resume)
    changes["out"] = str(out)
    train_cfg = dataclasses.replace(train_cfg, **changes)
    model_changes = {field: getattr(args, dest) for dest, field in _MODEL_FLAGS.items()
                     if getattr(args, dest) is not None}
    if args.eager:
        model_changes["use_fused_ops"] = False
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not hasattr(model_cfg, key):
            raise SystemExit(f"--set {item!r}: use FIELD=VALUE with a TxFMConfig field "
                             f"({', '.join(f.name for f in dataclasses.fields(TxFMConfig))})")
        model_changes[key] = _convert(value, getattr(model_cfg, key))
    return train_cfg, model_cfg.replace(**model_changes)


def run(args) -> int:
    from txfm.train.trainer import train

    train_cfg, model_cfg = build_configs(args)
    result = train(train_cfg, model_cfg)
    if result.checkpoint is None:  # not the main rank
        return 0
    losses = result.train_losses
    print()
    if losses:
        print(f"train loss {losses[0]:.4g} -> {losses[-1]:.4g} over {result.step} steps"
              + (f"; validation {result.val_losses[-1]:.4g}" if result.val_losses else ""))
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics:    {result.metrics}")
    if result.plot:
        print(f"loss plot:  {result.plot}")
    return 0


if __name__ == "__main__":  # python -m txfm.train.cli ...
    parser = argparse.ArgumentParser(prog="txfm")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["train"] + sys.argv[1:])
    sys.exit(ns.func(ns))
