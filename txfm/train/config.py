"""Training recipe (arXiv:2605.31562, training recipe) and run settings.

Recipe defaults: AdamW (fused), peak lr 1e-3, betas (0.9, 0.999), eps 1e-6,
weight decay ``1 / (lr * total_steps)``, one-cycle cosine schedule with 10% warm-up
(:mod:`txfm.train.schedule`),
bf16 autocast on GPU, gradient clipping at 1.0 **(our choice; the paper does not say)**.
Global batch 1,536 and 200 epochs for S/B/L (paper Table 6); ``tiny`` trains 3,000 steps of
32 on the synthetic demo corpus (docs/learning.md chose the length).

``batch_size`` is the *global* batch of one optimizer step: it is split into
``world_size x accum`` micro-batches (one per rank per accumulation step).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from txfm.devices import DEVICE_NAMES, parse_device
from txfm.model.config import _FIELD_TYPES, PRECISIONS, ConfigError  # noqa: F401 - also raised for TrainConfig

RECIPES = {
    "tiny": dict(batch_size=32, steps=3000, epochs=None, ckpt_every=500, val_every=100,
                 log_every=10),
    "S": dict(batch_size=1536, epochs=200.0),
    "B": dict(batch_size=1536, epochs=200.0),
    "L": dict(batch_size=1536, epochs=200.0),
}


@dataclass
class TrainConfig:
    """Every knob of a run; saved in each checkpoint and in ``RUN/config.json``. The recipe is
    the paper's (arXiv:2605.31562, training recipe; docs/training.md); ``txfm train``'s flags
    set the same fields.

    Attributes:
        preset: model and recipe preset, ``tiny``, ``S``, ``B`` or ``L`` (:meth:`for_preset`).
        data: a shards folder (``txfm data convert``); None: the demo's shards;
            ``"random[:cells=N,genes=G]"``: generated in memory.
        out: the run folder (checkpoints, ``metrics.csv``, ``config.json``, plots).
        batch_size: cells per optimizer step, over all ranks and micro-batches (global).
        accum: micro-batches per rank per step (gradient accumulation).
        steps / epochs: the run's length in optimizer steps, or in passes over the training
            split when ``steps`` is None.
        lr: the one-cycle schedule's peak learning rate; betas, eps: AdamW's.
        weight_decay: AdamW's decoupled decay; None: ``1 / (lr x total steps)``.
        warmup: the share of steps (0-1) that warms the learning rate up.
        grad_clip: the largest gradient norm (None or 0: no clipping).
        init_bias: start the decoder's output bias at the corpus's per-gene optimum.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``bf16`` or ``fp32``.
        compile: ``torch.compile`` the model. device: ``auto``, ``cpu``, ``cuda`` or
            ``cuda:N`` (``auto`` under torchrun: ``cuda:LOCAL_RANK``).
        seed: data order, masking draws and initialisation.
        log_every, val_every, ckpt_every: in steps (None: only at the end); val_batches:
            validation micro-batches, all ranks together; keep_checkpoints: how many are kept.
        resume: continue the run in ``out`` from its last checkpoint.
        progress, tensorboard, pin_memory, plot: a progress bar, TensorBoard logs (when
            installed), pinned host batches (CUDA), ``loss.png``.

    Raises:
        ConfigError: (a ``ValueError``) a field out of range or of the wrong type, named.
    """

    preset: str = "tiny"
    data: str | None = None  # shards folder; None: the demo shards; "random[:k=v,...]": in memory
    out: str = "runs/tiny"
    batch_size: int = 32  # global, per optimizer step
    accum: int = 1  # micro-batches per rank per step
    steps: int | None = RECIPES["tiny"]["steps"]  # optimizer steps; None: epochs x steps/epoch
    epochs: float | None = None
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float | None = None  # None: 1 / (lr * total_steps) (arXiv:2605.31562, training recipe)
    warmup: float = 0.1  # share of steps warming up (txfm.train.schedule: rounded to steps)
    grad_clip: float | None = 1.0
    init_bias: bool = True  # decoder output bias from the corpus' per-gene optimum
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or bf16 / fp32
    compile: bool = False
    device: str = "auto"  # auto: cuda:LOCAL_RANK when available, else cpu
    seed: int = 0
    log_every: int = 10
    val_every: int | None = 100  # steps; None: only at the end
    val_batches: int = 8  # micro-batches per validation, all ranks together
    ckpt_every: int | None = 200  # steps; None: only at the end
    keep_checkpoints: int = 3
    resume: bool = False
    progress: bool = True
    tensorboard: bool = True  # when tensorboard is installed
    pin_memory: bool = True  # when training on CUDA
    plot: bool = True

    def __post_init__(self):
        try:
            self.betas = tuple(self.betas)
        except TypeError:
            raise ConfigError("betas", self.betas, "must be two numbers in [0, 1)") from None
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` (a ValueError naming the field) for any value out of range."""
        def need(cond, name, rule):
            if not cond:
                raise ConfigError(name, getattr(self, name), rule)

        def finite(x):
            return isinstance(x, (int, float)) and math.isfinite(x)

        for f in dataclasses.fields(self):  # types first: a JSON file or Python can pass anything
            kinds = [k.strip() for k in str(f.type).split("|")]
            value = getattr(self, f.name)
            if value is None and "None" in kinds:
                continue
            base = next(k for k in kinds if k != "None")
            if base not in _FIELD_TYPES:
                continue  # betas: checked below
            kind, what = _FIELD_TYPES[base]
            # bool is an Integral (True must not pass as steps=1); "no" must not pass as resume
            need(isinstance(value, kind) and (kind is bool or not isinstance(value, bool)),
                 f.name, f"must be {what}{' or None' if 'None' in kinds else ''}, got "
                         f"{type(value).__name__}")
        need(str(self.preset).lower() in {k.lower() for k in RECIPES}, "preset",
             f"is not a preset; use one of {list(RECIPES)}")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.accum >= 1, "accum", "must be >= 1")
        need(self.steps is not None or self.epochs is not None, "steps",
             "give steps or epochs (how long to train)")
        # steps are counted in int64 (checkpoints, the samplers' offsets)
        need(self.steps is None or 1 <= self.steps < 2**62, "steps", "must be in [1, 2**62)")
        need(self.epochs is None or (finite(self.epochs) and 0 < self.epochs <= 1e9), "epochs",
             "must be a number in (0, 1e9]")
        need(finite(self.lr) and self.lr > 0, "lr", "must be a finite number > 0")
        need(len(self.betas) == 2 and all(finite(b) and 0 <= b < 1 for b in self.betas), "betas",
             "must be two numbers in [0, 1)")
        need(finite(self.eps) and self.eps > 0, "eps", "must be a finite number > 0")
        need(self.weight_decay is None or (finite(self.weight_decay) and self.weight_decay >= 0),
             "weight_decay", "must be a finite number >= 0")
        need(finite(self.warmup) and 0.0 <= self.warmup < 1.0, "warmup", "must be in [0, 1)")
        need(self.grad_clip is None or (finite(self.grad_clip) and self.grad_clip > 0),
             "grad_clip", "must be a finite number > 0 (0 on the command line: no clipping)")
        need(self.precision in PRECISIONS, "precision", f"use one of {PRECISIONS}")
        need(self.device == "auto" or parse_device(self.device) is not None, "device",
             f"use {DEVICE_NAMES}")
        # the samplers key their draws by a signed 64-bit seed
        need(0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)")
        need(self.log_every >= 1, "log_every", "must be >= 1")
        need(self.val_every is None or self.val_every >= 1, "val_every",
             "must be >= 1 (0 on the command line: only at the end)")
        need(self.val_batches >= 1, "val_batches", "must be >= 1")
        need(self.ckpt_every is None or self.ckpt_every >= 1, "ckpt_every",
             "must be >= 1 (0 on the command line: only at the end)")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")

    def micro_batch(self, world_size: int) -> int:
        """Rows per micro-batch on each rank."""
        parts = world_size * self.accum
        if self.batch_size % parts:
            # Python's names: txfm train's _in_flags puts its flags in their place
            raise ValueError(f"batch_size={self.batch_size} must be divisible by world_size x "
                             f"accum = {world_size} x {self.accum} (processes x accum)")
        return self.batch_size // parts

    def to_dict(self) -> dict:
        """Every field, JSON-ready (what a run's ``config.json`` keeps under ``"train"``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The config of :meth:`to_dict`'s dict. Raises ``ValueError`` for an unknown field (a
        typo would otherwise leave its default in place) or a value out of range."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def for_preset(cls, name: str, **overrides) -> "TrainConfig":
        """The recipe of preset ``name`` (batch, length, intervals), then ``overrides``."""
        key = {k.lower(): k for k in RECIPES}.get(str(name).lower())
        if key is None:
            raise ConfigError("preset", name, f"is not a preset; use one of {list(RECIPES)}")
        base = dict(preset=key, out=f"runs/{key}")
        base.update(RECIPES[key])
        if base.get("epochs") is not None:  # long runs: step count follows from the data
            base.update(steps=None, val_every=1000, ckpt_every=1000, log_every=20)
        base.update(overrides)
        return cls(**base)
