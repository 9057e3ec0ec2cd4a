"""The lean TxFM trainer: CSR shards -> device -> masked sampling -> model -> AdamW.

The recipe is the paper's (arXiv:2605.31562, training recipe). One optimizer step on each of
``W`` ranks (``torchrun``; one process = one device):

1. ``accum`` CSR micro-batches of ``batch_size / (W * accum)`` cells come from the loader
   (pinned when training on CUDA) and are copied with ``non_blocking=True`` while the previous
   step still runs on the device (one step of prefetch).
2. On the device, :func:`txfm_kernels.masked_sample` normalises them, draws ``K`` shown genes
   per cell and writes the dense target, keyed by ``(seed, offset)`` with
   ``offset = (step * accum + micro) * W + rank``: a unique number per micro-batch of the
   whole run, so draws are reproducible across resumes and a ``W``-rank run draws exactly
   what a 1-rank run accumulating ``W`` micro-batches draws. Stochastic depth takes its
   per-sample decisions from a generator keyed the same way.
3. Forward + loss under bf16 autocast (GPU), backward (DDP all-reduces the last micro-batch's
   gradients; the others run under ``no_sync``), gradient clipping, fused AdamW, the one-cycle
   schedule (:mod:`txfm.train.schedule`).

Nothing in a step waits for the device: the loss and gradient norm stay on the device and are
summed there; the host reads them (one sync) every ``log_every`` steps and at each checkpoint,
when it also measures samples/s and MFU, and stops a run whose loss is no longer finite
(:class:`TrainingDiverged`). Whether a batch needs the attention padding mask is decided on
the host from the CPU batch's dataset ids (a row is padded only if its dataset profiles fewer
than ``K`` genes), so batches without padding run the mask-free attention kernels.

Checkpoints (:mod:`txfm.train.checkpoint`) every ``ckpt_every`` steps and at the end hold the
model, optimizer, scheduler, every rank's loader position and RNG state, and the step;
``resume=True`` continues from the newest readable one and reproduces the uninterrupted
run's losses (tested bit for bit on CPU).
"""
from __future__ import annotations

import contextlib
import math
import pathlib
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from txfm.model import TxFM, TxFMConfig, preset
from txfm.model.config import ConfigError
from txfm.model.losses import MEAN_TARGET_LOSSES, optimal_logits
from txfm.data.inputs import model_inputs, open_loader, vocabulary
from txfm.data.layout import write_json_atomic
from txfm.files import missing_folders, remove_made_folders

from . import checkpoint as ckpt
from . import distributed as dist
from .config import TrainConfig
from .diagnostics import MIN_CELLS, LearningProbe, is_collapsed
from .flops import mfu, peak_flops, train_flops_per_sample
from .metrics import MetricsLogger, read_metrics
from .schedule import OneCycleSchedule

_VAL_SEED = 0x5EED_0FF5E7  # validation draws: fixed, independent of the training stream


RUN_LOCK = ".txfm-train.lock"  # held (flock) by the run writing the folder
# TxFMConfig fields that only choose how the same model runs; --resume may change these, and no
# other (not its name either: `--resume --preset S` checks the run's model by its name)
RUNTIME_MODEL_FIELDS = ("backend", "attention")


def changed_model_fields(saved, now) -> list[str]:
    """The TxFMConfig fields (keys of both mappings) whose value differs between a run's
    ``saved`` model settings and the ``now`` asked for, other than RUNTIME_MODEL_FIELDS: what
    ``--resume`` refuses (``txfm train`` names each by its flag, :class:`Trainer` by field)."""
    return [k for k in now if k in saved and k not in RUNTIME_MODEL_FIELDS and saved[k] != now[k]]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: the run stops at the row that shows it,
    before it would save a checkpoint of diverged weights (``txfm train``: an ``error:`` line,
    exit 2). ``metrics.csv`` keeps every row up to it; earlier checkpoints are kept."""


@dataclass
class TrainResult:
    run_dir: pathlib.Path
    checkpoint: pathlib.Path | None
    metrics: pathlib.Path | None
    plot: pathlib.Path | None
    step: int
    history: list[dict] = field(default_factory=list)  # the metrics rows (rank 0)

    @property
    def train_losses(self) -> list[float]:
        return [r["train_loss"] for r in self.history if r.get("train_loss") is not None]

    @property
    def val_losses(self) -> list[float]:
        return [r["val_loss"] for r in self.history if r.get("val_loss") is not None]


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------
class Trainer:
    """Builds everything from a :class:`TrainConfig` (+ optional model config, default the
    preset's) and runs it: the loaders, the model (decoder bias from the corpus), fused AdamW,
    the one-cycle schedule, DDP under torchrun (docs/training.md; arXiv:2605.31562, training
    recipe).

    ``loader_factory(split, batch_size, rank, world_size, pin_memory)`` replaces the data of
    ``cfg.data`` (tests and benchmarks pass in-memory sources).

    Raises (before the data is read where they can be told without it):
        ValueError: K above the corpus's genes, a ``backend`` or ``attention`` that cannot run
            here, a batch that does not split over ranks and ``accum``, a training split
            smaller than one step.
        FileExistsError: ``out`` holds checkpoints and ``resume`` is off.
        FileNotFoundError: ``resume`` without a checkpoint.
        ConfigError: (a ``ValueError``) an ``out`` that cannot be written.
        txfm.locks.FolderBusyError: (from :meth:`fit`) another run holds ``out``.
    """

    def __init__(self, cfg: TrainConfig, model_config: TxFMConfig | None = None, *,
                 loader_factory=None):
        self.cfg = cfg
        self.model_config = model_config or preset(cfg.preset)
        # what can be checked without the data is checked before it is read (or made: the demo)
        ckpt.check_run_dir(cfg.out)
        self.dist = dist.init(cfg.device)
        self.device = self.dist.device
        check_runtime(self.model_config, self.device)
        metrics = pathlib.Path(cfg.out) / ckpt.METRICS
        self._metrics_rows = (read_metrics(metrics) if cfg.resume and self.dist.is_main
                              and metrics.exists() else None)
        self.is_cuda = self.device.type == "cuda"
        self.run_dir = pathlib.Path(cfg.out)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.is_cuda)
        world, rank = self.dist.world_size, self.dist.rank
        self.micro = cfg.micro_batch(world)
        _seed_everything(cfg.seed)

        pin = cfg.pin_memory and self.is_cuda
        factory = loader_factory or (lambda split, bs, r, w, p: open_loader(
            cfg.data, split, bs, seed=cfg.seed, rank=r, world_size=w, pin_memory=p))
        self.loader = factory("train", self.micro, rank, world, pin)
        self.n_genes = int(self.loader.n_genes)
        self.model_config.check_genes(self.n_genes)
        if self.dist.is_main:
            warn_if_memory_short(self.model_config, self.micro, self.device)
        # Every rank opens the whole validation split (rank 0 of 1) and takes every W-th of its
        # first val_batches micro-batches (validate): the validation cells, draws and numbers
        # do not depend on the number of ranks, and all ranks validate or none does.
        try:
            self.val_loader = factory("val", self.micro, 0, 1, pin)
            why = "its 'val' split has no cells"
        except (FileNotFoundError, ValueError, KeyError) as exc:
            self.val_loader, why = None, str(exc)
        if self.val_loader is not None and len(self.val_loader) == 0:
            self.val_loader = None
        if self.val_loader is None:
            self._say(f"warning: no validation: {why}; only the training loss is logged "
                      f"(val_loss and the learning diagnostics stay empty)")
        if len(self.loader) < cfg.accum:
            raise ValueError(f"the training data yields {len(self.loader)} micro-batches of "
                             f"{self.micro} cells per rank per epoch, fewer than accum="
                             f"{cfg.accum}: lower batch_size or add cells")
        self.vocab = vocabulary(self.loader)
        obs = getattr(self.loader, "observable", None)
        if obs is not None and bool(obs.mask.all()):
            obs = None  # every dataset profiles every gene: skip the per-row tables
        self.observable = None if obs is None else obs.to(self.device)
        self._sample_buffers: dict[int, list] = {}  # batch size -> [buffer, buffer, last used]
        self._obs_counts = None if obs is None else obs.counts().cpu()
        nnz = getattr(self.loader, "gene_nnz", None)
        self.gene_weights = None
        if self.model_config.tau != 0.0:
            if nnz is None:
                raise ValueError("tau != 0 needs per-gene non-zero counts (loader.gene_nnz)")
            # m ** tau needs m > 0: a gene no training cell expresses (common in a corpus of
            # several datasets) is weighted like one expressed once, instead of failing the draw
            self.gene_weights = torch.as_tensor(nnz).to(self.device, torch.float32).clamp_min(1.0)

        self.model = TxFM(self.model_config, self.n_genes)
        self.model_config = self.model.config  # one object for the model and its sampler
        stats = self._gene_stats(factory)
        if cfg.init_bias and not cfg.resume:
            self.model.init_output_bias(stats)
        self.model.to(self.device)
        # the per-gene-mean predictor, the yardstick of the learning diagnostics
        self._mean_logits = optimal_logits(stats, self.model_config).to(self.device)
        self.diagnostics: dict = {}
        self._warned_collapse = self._warned_few_cells = False
        steps_per_epoch = len(self.loader) // cfg.accum
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = int(cfg.steps) if cfg.steps is not None else max(
            1, math.ceil(cfg.epochs * steps_per_epoch))
        self.weight_decay = (cfg.weight_decay if cfg.weight_decay is not None
                             else 1.0 / (cfg.lr * self.total_steps))
        self.optimizer = _adamw(self.model, cfg, self.weight_decay)
        self.scheduler = OneCycleSchedule(self.optimizer, peak=cfg.lr,
                                          total_steps=self.total_steps, warmup=cfg.warmup)
        rates = [b.drop_path for b in self.model.encoder.blocks]
        self._drop_rates = torch.tensor(rates, device=self.device)[:, None]
        self._use_drop = max(rates) > 0.0
        self.flops_per_sample = train_flops_per_sample(self.model_config, self.n_genes)
        self.peak = peak_flops(self.device, "bf16" if self.bf16 else "tf32")

        self.step = 0
        self.step_lr = float("nan")  # the learning rate of the last step taken (metrics' lr)
        self.epoch = 0
        self.samples = 0
        self._resumed_from = None
        self._unreadable: list[pathlib.Path] = []  # checkpoints the resume skipped
        self._begun = False  # whether this call has written to the run folder yet
        if cfg.resume:
            self._resume()
        elif ckpt.list_checkpoints(self.run_dir):
            raise FileExistsError(f"{self.run_dir} already holds checkpoints: pass --resume to "
                                  "continue that run, or choose another --out")
        else:
            self.loader.set_epoch(0)

        net = self.model
        self.ddp = None
        if self.dist.enabled:
            net = self.ddp = DDP(net, device_ids=[self.device.index] if self.is_cuda else None)
        if cfg.compile:  # after DDP, so that dynamo splits graphs at DDP's bucket boundaries
            net = torch.compile(net)
        self.net = net

    def _gene_stats(self, factory):
        """The training corpus' per-gene statistics: the manifest's, else a pass over up to
        50,000 training cells (collections converted before the manifest kept them, or an
        MSE-type loss at another target_sum than the one the manifest's mean log1p values
        were kept at)."""
        from txfm.data.stats import accumulate

        cfg = self.model_config
        stats = getattr(self.loader, "gene_stats", None)
        if stats is None or (cfg.loss in MEAN_TARGET_LOSSES
                             and not stats.kept_at(cfg.target_sum)):
            probe = factory("train", self.micro, 0, 1, False)
            if hasattr(probe, "set_epoch"):
                probe.set_epoch(0)
            stats = accumulate(probe, target_sum=cfg.target_sum)
        return stats

    # -- helpers ----------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, flush=True)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _needs_pad(self, cpu_batch) -> bool:
        """Whether any row has fewer observable genes than K (host-side, from CPU tensors)."""
        if self._obs_counts is None:
            return self.n_genes < self.model_config.k
        ids = cpu_batch.dataset_ids.long()
        return bool((self._obs_counts[ids] < self.model_config.k).any())

    def _drop_keep(self, offset: int, rows: int) -> torch.Tensor | None:
        if not self._use_drop:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(_mix(self.cfg.seed, offset, 0xD209))
        u = torch.rand(self._drop_rates.shape[0], rows, generator=g, device=self.device)
        return u >= self._drop_rates

    def _sample(self, batch, seed: int, offset: int):
        # On the CPU a fresh [B, G] target costs as much in first-touch page faults as the
        # sampling itself, so two buffers per batch size are alternated: a micro-batch's graph
        # is gone (backward done) before its buffer comes round again. GPUs have the caching
        # allocator for that.
        out = None
        if self.device.type == "cpu":
            slots = self._sample_buffers.setdefault(int(batch.indptr.shape[0]) - 1, [None, None, 0])
            slots[2] ^= 1
            out = slots[slots[2]]
        sample = model_inputs(batch, n_genes=self.n_genes, config=self.model_config,
                              observable=self.observable, seed=seed, offset=offset,
                              gene_weights=self.gene_weights, out=out)
        if self.device.type == "cpu":
            slots[slots[2]] = sample
        return sample

    def _stream(self):
        """CPU micro-batches forever, across epochs (the loader's own order and position).
        ``self._stream_epoch`` is the epoch of the batch last yielded."""
        while True:
            epoch = self._stream_epoch = self.loader.epoch
            yield from self.loader
            if self.loader.epoch == epoch:  # a loader that does not move on by itself
                self.loader.set_epoch(epoch + 1)

    def _fetch(self, stream) -> list:
        """The next step's ``accum`` (cpu, device) batch pairs; ``self._fetched_epoch`` is their
        epoch (the step that trains on them takes it, not the prefetch that follows it)."""
        out = []
        for _ in range(self.cfg.accum):
            cpu = next(stream)
            out.append((cpu, cpu.to(self.device, non_blocking=True)))
        self._fetched_epoch = self._stream_epoch
        return out

    # -- one step ---------------------------------------------------------------------------
    def train_step(self, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on ``accum`` (cpu, device) batch pairs: (loss, gradient norm
        before clipping) on device."""
        cfg, world, rank = self.cfg, self.dist.world_size, self.dist.rank
        total = torch.zeros((), device=self.device)
        for micro, (cpu, dev) in enumerate(batches):
            offset = (self.step * cfg.accum + micro) * world + rank
            sample = self._sample(dev, cfg.seed, offset)
            pad = sample.key_padding_mask if self._needs_pad(cpu) else None
            keep = self._drop_keep(offset, len(cpu))
            sync = micro == len(batches) - 1 or self.ddp is None
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                with self._autocast():
                    loss = self.net(sample, key_padding_mask=pad, drop_keep=keep)
                (loss / cfg.accum).backward()
            total += loss.detach().float()
        if cfg.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        else:  # still logged: without clipping it is the first sign of a run going unstable
            norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters() if p.grad is not None])
        self.optimizer.step()
        self.step_lr = self.scheduler.get_last_lr()[0]  # the rate this step ran at
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples += cfg.batch_size
        return total / cfg.accum, norm

    @torch.no_grad()
    def validate(self, progress=None) -> float | None:
        """Mean loss per cell over the first ``val_batches`` micro-batches of the validation
        split, with fixed draws: comparable across steps, resumes and numbers of ranks (rank
        ``r`` of ``W`` takes batches ``r, r + W, ...``). The diagnostics (``self.diagnostics``)
        are over the same cells: ``erank`` of all ranks' embeddings together.

        ``progress(done, total)`` is called after each of this rank's batches.
        """
        if self.val_loader is None:
            return None
        self.model.eval()
        probe = LearningProbe(self.model, self._mean_logits)
        total = torch.zeros((), device=self.device)
        n = 0  # cells
        world, rank = self.dist.world_size, self.dist.rank
        limit = min(self.cfg.val_batches, len(self.val_loader))
        planned = len(range(rank, limit, world))
        self.val_loader.set_epoch(0)
        done = 0
        for i, cpu in enumerate(self.val_loader):
            if i >= limit:
                break
            if i % world != rank:
                continue
            dev = cpu.to(self.device, non_blocking=True)
            sample = self._sample(dev, _VAL_SEED, i)
            pad = sample.key_padding_mask if self._needs_pad(cpu) else None
            with self._autocast():  # the loss is a mean over rows: weight it by the rows
                total += probe.add(sample, pad, index=i) * len(cpu)
            n += len(cpu)
            done += 1
            if progress is not None:
                progress(done, planned)
        every = None
        if self.dist.enabled:  # every rank's embeddings, keyed by global batch index
            every = dist.all_gather_object({i: e.cpu() for i, e in probe.embeddings.items()},
                                           self.dist)
        with self._autocast():
            probe.gather(every)
        self.model.train()
        dist.all_reduce_mean(probe.sums, self.dist)  # sums weighted by rows: ratios are exact
        self.diagnostics = probe.result() if probe.cells else {}
        stats = torch.stack([total, torch.tensor(float(n), device=self.device)])
        dist.all_reduce_mean(stats, self.dist)
        total, n = stats.tolist()
        return total / n if n else None

    # -- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint holds: model, optimizer, schedule, every rank's loader position
        and RNG state, the step, both configs and the vocabulary (a collective under DDP)."""
        loaders = dist.all_gather_object(self.loader.state_dict(), self.dist)
        rngs = dist.all_gather_object(_rng_state(self.device), self.dist)
        return {"step": self.step, "epoch": self.epoch, "samples": self.samples,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "loader": loaders, "rng": rngs,
                "world_size": self.dist.world_size,
                "model_config": self.model_config.to_dict(), "train_config": self.cfg.to_dict(),
                "n_genes": self.n_genes, "vocab": self.vocab,
                "precision": "bf16" if self.bf16 else "fp32",  # what `txfm embed` matches
                "torch": torch.__version__}

    def save(self) -> pathlib.Path | None:
        """Write a checkpoint of :meth:`state` (main rank; every rank must call it); returns
        its path on the main rank, None elsewhere. Raises ``CheckpointError`` when it cannot
        be written (nothing half-written is left)."""
        state = self.state()  # collective: every rank takes part
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(state, self.run_dir, self.step, self.cfg.keep_checkpoints,
                                        unreadable=self._unreadable)
        dist.barrier(self.dist)
        return path

    def _resume(self) -> None:
        found = ckpt.newest_readable(self.run_dir, map_location="cpu")
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt.checkpoint_dir(self.run_dir)}")
        path, state, skipped = found
        if skipped:
            warnings.warn("--resume: skipping unreadable checkpoint(s); using the previous good "
                          f"one {path}:\n  " + "\n  ".join(p for _, p in skipped),
                          RuntimeWarning, stacklevel=2)
        # set aside once the run starts writing (_begin): a refused call renames nothing
        self._unreadable = [p for p, _ in skipped]
        if state["n_genes"] != self.n_genes or (
                state["vocab"].get("hash") and self.vocab.get("hash")
                and state["vocab"]["hash"] != self.vocab["hash"]):
            raise ValueError(f"--resume: {path} was trained on another gene vocabulary "
                             f"({state['n_genes']} genes, hash {state['vocab'].get('hash')}) than "
                             f"the data ({self.n_genes} genes, hash {self.vocab.get('hash')}); "
                             f"resume with the run's own --data, or start a new run in another "
                             f"--out")
        saved = state.get("model_config") or {}
        now = self.model_config.to_dict()
        # the same shapes are not enough: another loss, token or K would change the run's
        # meaning midway, silently
        diff = ", ".join(f"{k}={saved[k]!r} (now {now[k]!r})"
                         for k in changed_model_fields(saved, now))

        def another_model(what: str) -> ValueError:
            return ValueError(f"--resume: {path} holds another model ({what}); resume with the "
                              "run's own model settings, or start a new run in another --out")

        if diff:
            raise another_model(diff)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:  # the same settings, other shapes
            raise another_model("other shapes") from exc
        rank = self.dist.rank
        same_ranks = state.get("world_size") == self.dist.world_size
        if same_ranks:  # first: a run on other data must not warn about its schedule
            try:
                self.loader.load_state_dict(state["loader"][rank])
            except ValueError as exc:
                raise ValueError(f"--resume: {path} was written for other data or loader "
                                 f"settings ({exc}); resume with the run's own --data, or "
                                 "start a new run in another --out") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.samples = state["step"], state["epoch"], state["samples"]
        saved_total = state["scheduler"].get("total_steps")
        if saved_total == self.total_steps:
            self.scheduler.load_state_dict(state["scheduler"])
        else:  # a longer (or shorter) run: re-plan the one-cycle schedule from here on
            if self.step >= self.total_steps:
                raise ValueError(f"--resume: {path} is at step {self.step}, not before the "
                                 f"requested end {self.total_steps}: ask for more steps")
            # name the checkpoint: after a fallback past a damaged one, its plan can differ
            # from the one the run last had
            warnings.warn(f"--resume: the run now has {self.total_steps} steps instead of the "
                          f"{saved_total} that {path.name} was planned for: the learning-rate "
                          f"schedule and the weight decay "
                          f"(1 / (lr x steps)) follow the new length from step {self.step} on",
                          RuntimeWarning, stacklevel=2)
            self.optimizer.param_groups[0]["weight_decay"] = self.weight_decay
            self.scheduler = OneCycleSchedule(self.optimizer, peak=self.cfg.lr,
                                              total_steps=self.total_steps,
                                              warmup=self.cfg.warmup, last_epoch=self.step - 1)
        if same_ranks:
            self.epoch = self.loader.epoch
            _set_rng_state(state["rng"][rank], self.device)
        else:
            had = state.get("world_size")
            warnings.warn(f"--resume: {path} was written by {had} rank{'' if had == 1 else 's'}, "
                          f"this run has {self.dist.world_size}: the data restarts at epoch "
                          f"{self.epoch}'s beginning", RuntimeWarning, stacklevel=2)
            self.loader.set_epoch(self.epoch)
        self._resumed_from = path
        self._say(f"resumed from {path} (step {self.step})")

    def _judge(self, row: dict, bar) -> None:
        """Sets ``row["collapsed"]`` from the diagnostics in ``row``; warns once of a collapse,
        or that the validation has too few cells to tell one."""
        if not self.diagnostics:
            return
        verdict = is_collapsed(self.diagnostics)
        if verdict is None:
            if not self._warned_few_cells and self.dist.is_main:
                self._warned_few_cells = True
                split = getattr(self.val_loader, "n_cells", None)
                if split is not None and split < MIN_CELLS:
                    # more or larger batches cannot show cells the split does not hold
                    fix = (f"the shards' validation split holds only {split}: convert them again "
                           f"with a larger --val-fraction (txfm data convert)")
                else:
                    fix = (f"raise --val-batches ({self.cfg.val_batches}) or --batch-size "
                           f"({self.cfg.batch_size})")
                bar.write(f"warning: the learning diagnostics need at least {MIN_CELLS} "
                          f"validation cells to tell a collapse, this validation has "
                          f"{self.diagnostics['cells']}: {fix}; until then 'collapsed' stays "
                          "empty", file=sys.stderr)
            return
        # early on a model may still ignore its CLS; judge after a quarter of the run
        if row["step"] < 0.25 * self.total_steps:
            return
        row["collapsed"] = int(verdict)
        if verdict and not self._warned_collapse and self.dist.is_main:
            self._warned_collapse = True
            bar.write(f"warning: step {row['step']}: the CLS embeddings carry no cell state "
                      f"(cls_gain={row['cls_gain']:.3g}, erank={row['erank']:.2f}): the model is "
                      "collapsing; see docs/learning.md", file=sys.stderr)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to the end; returns where the checkpoint, metrics and plot are. The main rank
        holds the run folder's lock meanwhile (:mod:`txfm.locks`): a second run started in the
        same folder fails at once (:class:`txfm.locks.FolderBusyError`).

        Nothing is written before the first step has trained: the first training batches and
        the validation batches are read first, so that damaged data (or a model that does not
        fit, at the first step) refuses the call with the run folder as it was. A folder that
        this call created is removed again when it fails before that."""
        self._preflight()
        if not self.dist.is_main:
            return self._fit()
        from txfm.locks import folder_lock

        made = missing_folders(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with folder_lock(self.run_dir, RUN_LOCK, "txfm train run"):
                return self._fit()
        except BaseException:
            if not self._begun:
                remove_made_folders(made)
            raise

    def _preflight(self) -> None:
        """Reads what the first step and the first validation read (from the resumed
        position), so that a damaged shard there refuses the call before anything is written."""
        self._stream_it = self._stream()
        self._pending = (self._fetch(self._stream_it) if self.step < self.total_steps
                         else None)
        if self.val_loader is None or self._pending is None:  # the last step validates
            return
        import itertools

        self.val_loader.set_epoch(0)
        for _ in itertools.islice(self.val_loader, min(self.cfg.val_batches,
                                                       len(self.val_loader))):
            pass

    def _begin(self) -> None:
        """The run starts writing its folder (main rank): ``config.json`` (atomically), the
        unreadable checkpoints the resume skipped set aside."""
        self._begun = True
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / ckpt.CONFIG, {
            "model": self.model_config.to_dict(), "train": self.cfg.to_dict(),
            "n_genes": self.n_genes, "total_steps": self.total_steps,
            "weight_decay": self.weight_decay, "world_size": self.dist.world_size,
            "parameters": sum(p.numel() for p in self.model.parameters())}, indent=2)
        kept = []
        for path in self._unreadable:
            try:
                moved = ckpt.set_aside(path)
            except FileNotFoundError:
                continue
            except OSError as exc:  # still kept out of --keep's count by save()
                kept.append(path)
                warnings.warn(f"{path}: unreadable, and cannot be set aside ({exc}); delete it",
                              RuntimeWarning, stacklevel=2)
                continue
            warnings.warn(f"set aside the unreadable checkpoint {path} as {moved.name}: it no "
                          f"longer counts toward --keep nor is tried by a resume; delete it "
                          f"once you no longer need it", RuntimeWarning, stacklevel=2)
        self._unreadable = kept

    def _fit(self) -> TrainResult:
        cfg, main = self.cfg, self.dist.is_main
        logger = None
        resumed_at = self.step if self._resumed_from else None  # begin() runs a step later

        def begin():
            nonlocal logger
            self._begin()
            if main:
                logger = MetricsLogger(self.run_dir, resumed_at, cfg.tensorboard,
                                       self._metrics_rows)

        bar = _progress(self.total_steps, self.step, enabled=main and cfg.progress)
        shown = {}  # the last validation's part of the bar, kept until the next validation
        self.model.train()
        stream, pending = self._stream_it, self._pending
        loss_sum = torch.zeros((), device=self.device)
        norm_sum = torch.zeros((), device=self.device)
        n_since, t_last, t0 = 0, time.perf_counter(), time.perf_counter()
        last_path = None
        several = self.dist.world_size > 1
        stop = _StopRequest((lambda msg: bar.write(f"warning: {msg}", file=sys.stderr)) if main
                            else (lambda msg: None), agreed=several)
        stop_after = False  # several ranks: every rank read a stop request at the last row
        with stop:
            while self.step < self.total_steps:
                self.epoch = self._fetched_epoch
                try:
                    loss, norm = self.train_step(pending)
                except BaseException:
                    bar.close()
                    raise
                if not self._begun:  # the model fits and the data read: the run is on
                    begin()
                loss_sum += loss
                norm_sum += norm.detach().float()
                n_since += 1
                bar.update(1)  # before validating, so the bar shows the step being validated
                step, done = self.step, self.step >= self.total_steps
                # one rank alone stops where its signal finds it; several stop at the step
                # after the row whose all-reduce told every one of them (see _StopRequest)
                last = stop_after if several else stop.signum is not None
                save_now = done or (cfg.ckpt_every and step % cfg.ckpt_every == 0) or last
                # Prefetch now, so the copy overlaps this step; not across a checkpoint, whose
                # loader position must not include batches that no finished step consumed.
                pending = None if (save_now or done) else self._fetch(stream)
                val_now = done or (cfg.val_every and step % cfg.val_every == 0)
                # a row at every checkpoint too: a diverged run is stopped before it saves
                if val_now or save_now or step % cfg.log_every == 0:
                    stats = torch.stack([loss_sum, norm_sum]) / n_since
                    if several:
                        stats = torch.cat([stats, stop.flags(self.device)])
                    dist.all_reduce_mean(stats, self.dist)
                    # the host waits here, once per row
                    train_loss, grad_norm, *asked = stats.tolist()
                    # at a checkpoint anyway, stop after it; else after the next step
                    if several and stop.agree(asked, step if save_now else step + 1):
                        last, stop_after = bool(save_now), not save_now
                    now = time.perf_counter()
                    sps = n_since * cfg.batch_size / (now - t_last)
                    per_device = sps / self.dist.world_size
                    row = {"step": step, "epoch": self.epoch, "samples": self.samples,
                           "train_loss": train_loss, "lr": self.step_lr,
                           "grad_norm": grad_norm,
                           "samples_per_s": sps, "step_ms": 1e3 * (now - t_last) / n_since,
                           "mfu": mfu(per_device, self.model_config, self.n_genes, self.peak),
                           "elapsed_s": now - t0}
                    if not math.isfinite(train_loss):
                        if logger is not None:
                            logger.log(row)
                            logger.close()
                        bar.close()
                        raise TrainingDiverged(
                            f"step {step}: the training loss is {train_loss} (mean over the steps "
                            f"since the last row): the run diverged. Lower --lr (peak "
                            f"{cfg.lr:g}), keep --grad-clip on, or resume from a checkpoint "
                            f"before step {step}; {self.run_dir}/metrics.csv has the rows so far")
                    if val_now:
                        live = {**_postfix(row), **shown}
                        row["val_loss"] = self.validate(None if bar.disable else (
                            lambda i, n: bar.set_postfix({**live, "val": f"{i}/{n}"})))
                        row.update(self.diagnostics)
                        self._judge(row, bar)
                        shown = _val_postfix(row)
                    if logger is not None:
                        logger.log(row)
                    bar.set_postfix({**_postfix(row), **shown}, refresh=False)
                    loss_sum.zero_(), norm_sum.zero_()
                    n_since, t_last = 0, time.perf_counter()
                if save_now:
                    last_path = self.save()
                    if last:
                        break
                    if not done:
                        pending = self._fetch(stream)
        if not self._begun:  # a resume at its last step: nothing to train
            begin()
        if stop.signum is not None:  # the checkpoint of the last step is written: stop
            bar.close()
            if logger is not None:
                logger.close()
            stop.act()
        bar.close()
        result = TrainResult(self.run_dir, last_path, None, None, self.step)
        if main:
            if logger is not None:
                logger.close()
            result.metrics = logger.path if logger is not None else None
            result.checkpoint = (last_path or self._resumed_from
                                 or (ckpt.list_checkpoints(self.run_dir) or [None])[-1])
            if result.metrics is not None and result.metrics.exists():
                result.history = read_metrics(result.metrics)
                if cfg.plot:
                    from .plot import plot_losses

                    result.plot = plot_losses(result.metrics, self.run_dir / ckpt.LOSS_PLOT,
                                              title=f"TxFM-{self.model_config.name}")
        return result


class _StopRequest:
    """Ctrl-C or SIGTERM (a scheduler's time limit) during a run: the step under way finishes, a
    checkpoint is written, and then the signal acts as it would have (``txfm train``: exit 130
    / 143), so ``--resume`` loses nothing. A second signal acts at once.

    Under several ranks (``agreed``) every rank must stop at one step, and a collective every
    step would sync the host every step. So a rank's request rides on the all-reduce that the
    metrics row already does (every ``log_every`` steps, :meth:`flags`), and every rank stops
    after the step that follows the first row where any rank asked (:meth:`agree`): that step
    takes the batch fetched ahead at the row, so the checkpoint's data position is exact.
    ``torchrun`` passes a signal it gets on to its workers, which the terminal or the scheduler
    may have signalled already, so a repeat within ``REPEAT_S`` is the same request; a later
    one acts at once (and ``torchrun`` kills its workers itself after its shutdown timeout).
    Off outside the main thread, where Python takes no signal handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_S = 5.0

    def __init__(self, say, agreed: bool = False):
        self.enabled = threading.current_thread() is threading.main_thread()
        self.agreed = agreed
        self.signum: int | None = None
        self._at = 0.0
        self._agreed = False
        self._say = say
        self._previous: dict = {}

    def __enter__(self):
        if self.enabled:
            # a signal the process ignores (a background job's SIGINT) stays ignored
            self._previous = {s: signal.signal(s, self._request) for s in self.SIGNALS
                              if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _request(self, signum, frame) -> None:
        if self.signum is not None:  # a repeat: only several ranks keep the handler
            if time.monotonic() - self._at >= self.REPEAT_S:
                self.act(signum)
            return
        self.signum, self._at = signum, time.monotonic()
        name = signal.Signals(signum).name
        if not self.agreed:
            self._restore()  # a second signal acts at once
            self._say(f"{name}: stopping after this step, once a checkpoint is written (send "
                      f"it again to stop at once)")
        else:
            self._say(f"{name}: every rank stops one step after the next metrics row "
                      f"(--log-every), once a checkpoint is written (send it again, "
                      f"{self.REPEAT_S:g} s on, to stop at once)")

    def flags(self, device: torch.device) -> torch.Tensor:
        """This rank's request, one number per signal (1 = asked), for the row's all-reduce."""
        return torch.tensor([float(self.signum == s) for s in self.SIGNALS], device=device)

    def agree(self, asked: list[float], last_step: int) -> bool:
        """Whether any rank had asked by the row just reduced (``asked``: :meth:`flags`, mean
        over ranks), so that every rank stops after ``last_step``; a rank that was not
        signalled takes the signal as its own (SIGTERM first) and so stops as the others do."""
        if not any(asked):
            return False
        if not self._agreed:
            self._agreed = True
            self.signum = self.signum or self.SIGNALS[int(asked[1] > 0)]
            self._say(f"every rank stops after step {last_step} "
                      f"({signal.Signals(self.signum).name})")
        return True

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def act(self, signum: int | None = None) -> None:
        """Let the signal that asked for the stop act now, as it would have without us."""
        self._restore()
        signal.raise_signal(signum or self.signum)


def train(cfg: TrainConfig, model_config: TxFMConfig | None = None, *,
          loader_factory=None) -> TrainResult:
    """Run (or resume) a training run (:class:`Trainer`, then :meth:`Trainer.fit`); returns
    where its checkpoint, metrics and plot are (:class:`TrainResult`; ``history`` holds the
    metrics rows). Errors as :class:`Trainer`."""
    trainer = Trainer(cfg, model_config, loader_factory=loader_factory)
    try:
        return trainer.fit()
    finally:
        dist.shutdown()


# ------------------------------------------------------------------------------------------------
def warn_if_memory_short(config: TxFMConfig, micro_batch: int, device: torch.device) -> None:
    """A ``RuntimeWarning`` when a CPU step's activations, kept for the backward, would likely
    not fit this machine's memory: the system's out-of-memory killer otherwise ends the run
    without a word (a fresh user's find: ``--preset S``, sized for GPUs, on a 24 GiB box).
    The estimate is on the low side: about 12 fp32 tensors of ``[micro_batch, K + 1, dim]``
    per encoder block (the norms, q/k/v, the attention output, the MLP's hidden layer)."""
    from txfm_kernels._common import device_memory

    ram = device_memory(device) if device.type == "cpu" else None
    if ram is None:  # a GPU reports its own out-of-memory error; no RAM figure on this platform
        return
    need = 12 * 4 * micro_batch * (config.k + 1) * config.dim * config.depth
    if need > ram:
        warnings.warn(f"a step of {micro_batch:,} cells x K = {config.k:,} genes on the CPU "
                      f"keeps about {need / 2**30:,.0f} GiB of activations for its backward, "
                      f"more than this machine's {ram / 2**30:,.0f} GiB, so the system will "
                      f"likely kill the run; lower --batch-size (or raise --accum), or train "
                      f"on a GPU", RuntimeWarning, stacklevel=2)


def check_runtime(config: TxFMConfig, device: torch.device) -> None:
    """ConfigError unless the model's ``backend`` and ``attention`` can run on ``device`` here:
    the ops would only fail at the first step, after the data are set up."""
    from txfm_kernels.backends import OPS, resolve_backend

    from txfm.model import encoder

    owner = f"TxFMConfig({config.name})"
    try:
        for op in OPS:
            resolve_backend(config.backend, device, op)
    except RuntimeError as exc:
        raise ConfigError("backend", config.backend, f"cannot run on {device.type} here ({exc}); "
                          "use auto (the fused kernels for the device) or torch (the eager "
                          "reference)", owner) from exc
    if config.attention == "flash" and encoder._fa3_func is None and encoder._fa2_func is None:
        raise ConfigError("attention", "flash", "needs flash-attn, which is not installed here: "
                          "pip install flash-attn (a CUDA build), or use auto", owner)


def _adamw(model: torch.nn.Module, cfg: TrainConfig, weight_decay: float):
    """Fused AdamW (one kernel for all parameters, CUDA and CPU); weight decay on matrices only
    **(our choice)**: biases, norms, LayerScale, CLS and per-gene NB/ZINB parameters (1-D) are
    not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), for per-micro-batch generators."""
    z = 0
    for p in parts:
        z = (z + int(p) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z & 0x7FFFFFFFFFFFFFFF


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                dynamic_ncols=True, desc="train")


def _postfix(row: dict) -> dict:
    """The bar's training part, from a metrics row."""
    out = {"loss": f"{row['train_loss']:.4g}", "samples/s": f"{row['samples_per_s']:.0f}"}
    if row.get("mfu") is not None:
        out["MFU"] = f"{100 * row['mfu']:.1f}%"
    return out


def _val_postfix(row: dict) -> dict:
    """The bar's validation part, from a validation step's metrics row."""
    out = {}
    if row.get("val_loss") is not None:
        out["val"] = f"{row['val_loss']:.4g}"
    if row.get("cls_gain") is not None:
        out["R2"] = f"{row['masked_r2']:.3f}"
        out["cls"] = f"{row['cls_gain']:.3f}"
        out["rank"] = f"{row['erank']:.1f}"
    if row.get("collapsed"):
        out["COLLAPSED"] = "!"
    return out


def sample_batch(*args, **kwargs):
    """Deprecated name of :func:`txfm.data.inputs.model_inputs` (a ``DeprecationWarning``)."""
    warnings.warn("txfm.train.sample_batch is deprecated: use txfm.data.inputs.model_inputs",
                  DeprecationWarning, stacklevel=2)
    return model_inputs(*args, **kwargs)
