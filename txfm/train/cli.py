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
options given on the command line change it (e.g. ``--steps`` to train longer); what the
checkpoint fixes (the model, the optimizer's schedule, the data stream) is refused, and the
display options apply to this command only (docs/training.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import sys
import warnings

from txfm.cli import UsageError, error_message, finite_float, help_text

_TRAIN_FLAGS = {  # argparse dest -> TrainConfig field
    "data": "data", "out": "out", "steps": "steps", "epochs": "epochs",
    "batch_size": "batch_size", "accum": "accum", "lr": "lr", "weight_decay": "weight_decay",
    "warmup": "warmup", "grad_clip": "grad_clip", "precision": "precision", "device": "device",
    "seed": "seed", "log_every": "log_every", "val_every": "val_every",
    "val_batches": "val_batches", "ckpt_every": "ckpt_every", "keep": "keep_checkpoints",
}
_MODEL_FLAGS = {"k": "k", "tau": "tau", "target_sum": "target_sum", "loss": "loss",
                "activation": "activation",
                "decoder_depth": "decoder_depth", "attention": "attention"}
# What a checkpoint fixes, so that --resume refuses a new value instead of recording it
# unused (or changing the run's meaning midway): the optimizer's and the schedule's state,
# and the data stream's (its order and position are keyed by the batch, the micro-batches
# and the seed).
_FIXED_ON_RESUME = {"lr": "optimizer and schedule", "warmup": "optimizer and schedule",
                    "weight_decay": "optimizer and schedule", "batch_size": "data order",
                    "accum": "data order", "seed": "data order and shown genes"}

_FLAG_OF = {field: "--" + dest.replace("_", "-") for dest, field in _TRAIN_FLAGS.items()}
_FLAG_OF["preset"] = "--preset"


def register(subparsers) -> None:
    from txfm.model.config import ACTIVATIONS, ATTENTION, LOSSES, PRECISIONS

    p = subparsers.add_parser("train", help="train TxFM (plain `txfm train`: the CPU demo)",
                              description=help_text(__doc__),
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
    g.add_argument("--no-init-bias", action="store_true",
                   help="start every gene's decoder bias at one constant instead of its "
                        "per-gene optimum over the corpus (docs/learning.md)")
    g.add_argument("--no-tensorboard", action="store_true", help="CSV metrics only")
    r = p.add_argument_group("recipe (defaults: arXiv:2605.31562, training recipe and the preset)")
    r.add_argument("--steps", type=int, default=None, help="optimizer steps")
    r.add_argument("--epochs", type=finite_float(), default=None,
                   help="epochs (when --steps is not given)")
    r.add_argument("--batch-size", type=int, default=None, help="global batch per step")
    r.add_argument("--accum", type=int, default=None, help="gradient accumulation micro-batches")
    r.add_argument("--lr", type=finite_float(), default=None, help="peak learning rate (1e-3)")
    r.add_argument("--weight-decay", type=finite_float(), default=None,
                   help="default 1/(lr x steps)")
    r.add_argument("--warmup", type=finite_float(), default=None,
                   help="warm-up share of steps (0.1), rounded to whole steps")
    r.add_argument("--grad-clip", type=finite_float(), default=None,
                   help="max gradient norm (1.0; 0: off)")
    r.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="auto: bf16 autocast on a GPU that has it, else fp32")
    r.add_argument("--seed", type=int, default=None,
                   help="seed of the weights, the data order and the shown genes (0)")
    r.add_argument("--log-every", type=int, default=None,
                   help="steps between metrics.csv rows (10)")
    r.add_argument("--val-every", type=int, default=None, help="steps (0: only at the end)")
    r.add_argument("--val-batches", type=int, default=None,
                   help="validation micro-batches (8; the last may be partial)")
    r.add_argument("--ckpt-every", type=int, default=None, help="steps (0: only at the end)")
    r.add_argument("--keep", type=int, default=None, help="checkpoints kept (3)")
    m = p.add_argument_group("model (ablation switches)")
    m.add_argument("--k", type=int, default=None, help="shown genes per sample")
    m.add_argument("--tau", type=finite_float(), default=None,
                   help="frequency weighting of the draw (0)")
    m.add_argument("--target-sum", type=finite_float(0.0, above=True), default=None,
                   help="L: counts are normalised to this total before log1p (the preset's: "
                        "the paper's 1e5 for S/B/L, 1e4 for tiny; scanpy's normalize_total "
                        "target_sum)")
    m.add_argument("--loss", choices=LOSSES, default=None,
                   help="reconstruction loss (poisson, the paper's; the others are its ablations)")
    m.add_argument("--activation", choices=ACTIVATIONS, default=None,
                   help="decoder output activation (rectified_tanh, the paper's)")
    m.add_argument("--decoder-depth", type=int, default=None, help="0 = linear decoder")
    m.add_argument("--attention", choices=ATTENTION, default=None,
                   help="attention kernel (auto: flash-attn when installed and no row is "
                        "padded, else PyTorch's scaled_dot_product_attention)")
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
    if isinstance(current, dict):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError("this field is a dict; give a JSON object, e.g. "
                             """'extra={"note": "run 3"}'""")
        return parsed
    if isinstance(current, int):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if isinstance(current, float):
        number = finite_float()
        try:
            return number(value)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None
    return value


def build_configs(args):
    """(TrainConfig, TxFMConfig) from parsed arguments (and RUN/config.json on --resume).

    Raises :class:`txfm.cli.UsageError` naming the option for any value out of range, a
    ``--resume`` without a checkpoint, or an ``--out`` that is not a folder one can write in.
    """
    from txfm.locks import lock_holder
    from txfm.model import TxFMConfig, preset
    from txfm.train.checkpoint import (CONFIG, check_run_dir, checkpoint_dir,
                                       list_checkpoints, set_aside_checkpoints)
    from txfm.train.config import ConfigError, TrainConfig
    from txfm.train.trainer import RUN_LOCK

    name = args.preset or "tiny"
    for flag, value in (("--out", args.out), ("--data", args.data)):
        if value is not None and not value.strip():
            raise UsageError(f"{flag} is empty: name a folder (or leave {flag} out for its "
                             "default)")
    out = pathlib.Path(args.out or f"runs/{name}")
    saved = out / CONFIG
    try:
        check_run_dir(out)
        busy = lock_holder(out, RUN_LOCK)
        has_checkpoint = args.resume and bool(list_checkpoints(out))
        if busy and not (args.resume and not has_checkpoint):  # that case: below
            # here, before the checkpoint is read and "resumed from ..." said
            raise UsageError(f"--out {out} is being written by another txfm train run "
                             f"({busy}); wait for it to finish{', then resume' * args.resume}, "
                             f"or choose another --out")
        if args.resume:
            if not has_checkpoint:
                if busy:
                    raise UsageError(f"--resume: {out} is being trained by another txfm train "
                                     f"run ({busy}) that has not written its first checkpoint "
                                     "yet; let it run, or stop it after its first checkpoint "
                                     "and resume then")
                aside = set_aside_checkpoints(out)
                if aside:
                    raise UsageError(f"--resume: {out} has no readable checkpoint (earlier "
                                     f"resumes set aside the unreadable "
                                     f"{', '.join(p.name for p in aside)} in "
                                     f"{checkpoint_dir(out)}); start a new run in another --out")
                raise UsageError(f"--resume: {out} has no checkpoint yet (nothing in "
                                 f"{checkpoint_dir(out)}); leave out --resume to start a new run")
            if saved.exists():
                try:
                    stored = json.loads(saved.read_text())
                    train_cfg = TrainConfig.from_dict(stored["train"])
                    model_cfg = TxFMConfig.from_dict(stored["model"])
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise UsageError(f"{saved}: cannot be read ({error_message(exc)}); restore "
                                     "it or start a new run in another --out") from exc
        if args.resume and not saved.exists():
            raise UsageError(f"--resume: {saved} is missing, so the run's settings are unknown; "
                             f"restore it, or start a new run in another --out")
        if args.resume and args.preset is not None:
            try:
                asked = preset(args.preset).name
            except ValueError as exc:
                raise UsageError(f"--preset {args.preset}: {exc}") from exc
            if asked != model_cfg.name:
                raise UsageError(f"--preset {args.preset} with --resume: the run's model is "
                                 f"{model_cfg.name!r} (its config.json) and goes on as it is; "
                                 f"leave out --preset, or start a new run (another --out)")
        if args.resume:
            # the optimizer's and the schedule's state come back from the checkpoint as they
            # were; a new value would be recorded but never used
            in_use = dict(vars(train_cfg))
            if in_use.get("weight_decay") is None:  # the default, 1 / (lr x steps): its value
                in_use["weight_decay"] = stored.get("weight_decay")
            fixed = [(dest, getattr(args, dest), in_use[_TRAIN_FLAGS[dest]])
                     for dest in _FIXED_ON_RESUME if getattr(args, dest) is not None]
            changed = [(d, new, old) for d, new, old in fixed if not (
                new == old or (isinstance(new, float) and isinstance(old, float)
                               and math.isclose(new, old, rel_tol=1e-9)))]
            if changed:
                d, new, old = changed[0]
                what = _FIXED_ON_RESUME[d]
                raise UsageError(f"--{d.replace('_', '-')} {new} with --resume: the run's "
                                 f"{what} continue{'' if ' and ' in what else 's'} from its "
                                 f"checkpoint "
                                 f"({_TRAIN_FLAGS[d]} {old}); start a new run (another --out) "
                                 f"to change it")
        if not args.resume:
            train_cfg = TrainConfig.for_preset(name, out=str(out))
            model_cfg = preset(name)
        changes = {field: getattr(args, dest) for dest, field in _TRAIN_FLAGS.items()
                   if getattr(args, dest) is not None}
        data = changes.get("data")
        if data is not None and not str(data).startswith("random") and os.path.isdir(data):
            if out.resolve() == pathlib.Path(data).resolve() or (
                    pathlib.Path(data).resolve() in out.resolve().parents):
                raise UsageError(f"--out {out} is the shards folder --data {data} or lies inside "
                                 f"it: the run's files would be written among the shards; "
                                 f"choose another --out")
            # absolute in RUN/config.json: `--resume` may run from another folder
            changes["data"] = os.path.abspath(data)
        if args.steps is not None:
            if args.epochs is not None:
                warnings.warn(f"--epochs {args.epochs:g} is ignored: --steps {args.steps} sets "
                              f"the run's length (give one of them)", UserWarning, stacklevel=2)
            changes["epochs"] = None
        elif args.epochs is not None:
            changes["steps"] = None
        for dest in ("grad_clip", "val_every", "ckpt_every"):  # 0 means off / only at the end
            if getattr(args, dest) == 0:
                changes[_TRAIN_FLAGS[dest]] = None
        if args.compile:
            changes["compile"] = True
        if args.no_init_bias:
            changes["init_bias"] = False
        # how this command runs and shows its work, not the run's settings: never inherited
        # from the run's config.json on --resume
        changes.update(progress=not args.no_progress, plot=not args.no_plot,
                       tensorboard=not args.no_tensorboard)
        if args.resume:
            changes["compile"] = bool(args.compile)
        changes["resume"] = bool(args.resume)
        changes["out"] = str(out)
        train_cfg = dataclasses.replace(train_cfg, **changes)
    except ConfigError as exc:
        raise _config_error(exc, args) from exc
    model_changes = {field: getattr(args, dest) for dest, field in _MODEL_FLAGS.items()
                     if getattr(args, dest) is not None}
    if args.eager:
        model_changes["backend"] = "torch"
    fields = ", ".join(f.name for f in dataclasses.fields(TxFMConfig))
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not hasattr(model_cfg, key):
            raise UsageError(f"--set {item}: use FIELD=VALUE with a TxFMConfig field ({fields})")
        try:
            model_changes[key] = _convert(value, getattr(model_cfg, key))
        except ValueError as exc:
            raise UsageError(f"--set {item}: {exc}") from exc
        if args.eager and key == "backend" and model_changes[key] != "torch":
            # --set wins over a value flag (documented); --eager names what runs, so say so
            raise UsageError(f"--set {item} contradicts --eager (the eager reference ops, "
                             f"backend='torch'); give one of them")
    if args.resume:  # named by its flag here; Trainer refuses the same in Python
        from txfm.train.trainer import changed_model_fields

        saved = {field: getattr(model_cfg, field) for field in model_changes}
        changed = changed_model_fields(saved, model_changes)
        if changed:
            field = changed[0]
            raise UsageError(f"{_model_flag(args, field)} with --resume: the run's model was "
                             f"trained with {field}={saved[field]!r} (its config.json); start a "
                             f"new run (another --out) to change it")
    try:
        return train_cfg, model_cfg.replace(**model_changes)
    except ConfigError as exc:
        raise _config_error(exc, args) from exc


def _config_error(exc, args) -> UsageError:
    """A :class:`~txfm.model.config.ConfigError` as the user's mistake, named by the flag that
    gave the value: ``--k 5000``, ``--set k=5000``, or the preset / saved run it came from."""
    from txfm.train.checkpoint import CONFIG

    field, rule = exc.field, exc.rule
    if not exc.owner.startswith("TxFMConfig"):
        return UsageError(f"{_FLAG_OF.get(field, field)} {exc.value}: {rule}")
    flag = _model_flag(args, field)
    if flag is not None and flag.startswith("--set "):
        where = flag
    elif flag is not None:
        where = f"{flag} ({field}={exc.value!r})"
    else:
        out = pathlib.Path(args.out or f"runs/{args.preset or 'tiny'}")
        saved = out / CONFIG
        if args.resume and saved.exists():
            # the run's model is fixed, so the advice to change the value cannot be followed:
            # the data is what does not fit
            return UsageError(f"{field}={exc.value!r} (from the run's {saved}): "
                              f"{rule.split(';')[0]}; a resumed run keeps its model, so resume "
                              f"it with the data it was trained on, or start a new run (another "
                              f"--out) on this data")
        where = f"{field}={exc.value!r} (from --preset {args.preset or 'tiny'})"
        # a rule between two fields (heads must divide dim): name the flag that set the other
        other = next((f for f in re.findall(r"\b([a-z_]+)=", rule)
                      if f != field and _model_flag(args, f)), None)
        if other is not None:
            return UsageError(f"{where}: {rule}; {other} came from {_model_flag(args, other)}, "
                              f"so change one of the two")
    return UsageError(f"{where}: {rule}")


def _model_flag(args, field: str) -> str | None:
    """How the command line set TxFMConfig ``field``: ``--set FIELD=VALUE`` (applied after the
    flags, so it wins) or its own flag with the value (``--k 5000``); None when neither did."""
    given = [item for item in args.set if item.partition("=")[0] == field]
    if given:
        return f"--set {given[-1]}"
    dest = next((d for d, f in _MODEL_FLAGS.items() if f == field and getattr(args, d) is not None),
                None)
    return None if dest is None else f"--{dest.replace('_', '-')} {getattr(args, dest)}"


def _check_data(data: str | None, saved: pathlib.Path | None = None) -> None:
    """UsageError unless ``--data`` is absent (the demo), a folder, or a valid random spec;
    ``saved``: the run's config.json the value came from (``--resume`` without ``--data``)."""
    if data is None:
        return
    if str(data).startswith("random"):
        from txfm.train.synthetic import parse_random_spec

        try:
            parse_random_spec(str(data))
        except ValueError as exc:
            raise UsageError(f"{exc}; e.g. random:cells=4096,genes=2000") from exc  # names --data
    elif pathlib.Path(data).is_file():
        raise UsageError(f"--data {data} is a file; txfm train reads a shards folder: convert "
                         f"it first (`txfm data convert {data} --out SHARDS`), then --data SHARDS")
    elif not pathlib.Path(data).is_dir() and saved is not None:
        if os.path.isabs(data):
            raise UsageError(f"--data {data} (from {saved}): no such folder; pass --data with "
                             f"the shards' new path")
        raise UsageError(f"--data {data} (from {saved}; relative to the folder the run was "
                         f"started from): no such folder here; resume from that folder, or "
                         f"pass --data with the shards' path")
    elif not pathlib.Path(data).is_dir():
        raise UsageError(f"--data {data}: no such folder; give a shards folder written by "
                         "`txfm data convert`, random[:cells=N,genes=G], or leave --data out for "
                         "the demo")


def _in_flags(message: str) -> str:
    """A library message about sizes in this command's words: its options, not the Python
    arguments behind them (the trainer always drops a last partial batch)."""
    message = message.replace("so drop_last=True leaves no batch; lower batch_size or pass "
                              "drop_last=False", "so not one whole batch can be drawn; lower "
                              "batch_size")
    for name in ("batch_size", "accum"):
        flag = _FLAG_OF[name]
        message = re.sub(rf"(?<![\w.-]){name}=", flag + " ", message)
        message = re.sub(rf"(?<![\w.-]){name}\b", flag, message)
    return message


def run(args) -> int:
    from txfm.cli import check_device
    from txfm.train import distributed as dist
    from txfm.train.checkpoint import CONFIG
    from txfm.train.config import ConfigError
    from txfm.train.trainer import Trainer

    train_cfg, model_cfg = build_configs(args)
    from_run = args.resume and args.data is None
    _check_data(train_cfg.data, pathlib.Path(train_cfg.out) / CONFIG if from_run else None)
    check_device("--device", train_cfg.device)
    try:
        try:
            trainer = Trainer(train_cfg, model_cfg)
        except ConfigError as exc:  # what only the data or this machine tell: k, backend, ...
            raise _config_error(exc, args) from exc
        except (ValueError, OSError) as exc:  # setting up: the data, --out, --resume, sizes
            raise UsageError(_in_flags(error_message(exc))) from exc
        result = trainer.fit()
    finally:
        dist.shutdown()
    if result.checkpoint is None:  # not the main rank
        return 0
    losses = result.train_losses
    if sys.stdout.isatty():  # apart from the bar above it; a pipe or a file starts with the summary
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
    from txfm.cli import main

    sys.exit(main(["train"] + sys.argv[1:]))
