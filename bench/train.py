"""Training-step throughput of TxFM: fused ``txfm_kernels`` ops vs the eager reference ops.

One optimizer step of the real trainer (:meth:`txfm.train.Trainer.train_step`): masked
sampling of a CSR batch on the device, forward, loss, backward, gradient clipping, AdamW,
scheduler. Data come from the in-memory random CSR corpus (no Zarr needed; ~3,000 non-zeros
per cell at G = 44,349), copied to the device once, so the numbers are the device step alone.

    python -m bench.train                           # CPU: tiny, eager vs fused
    python -m bench.train --device cuda             # GPU: S and B, bf16 autocast, + MFU
    python -m bench.train --device cuda --preset B --compile --profile

``--profile`` adds where the fused step's time goes (torch.profiler, grouped by kind of op).
MFU = samples/s x train FLOPs per sample (:mod:`txfm.train.flops`) / the device's dense peak.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from bench.common import (add_common_args, add_ratios, check_common_args, check_device,
                          check_distinct, emit, run, sync, warn_if_loaded)
from txfm.cli import ArgumentParser, positive_int
from txfm.model import preset
from txfm.model.config import TOKEN_NORMS
from txfm.train.config import TrainConfig
from txfm.train.flops import train_flops_per_sample
from txfm.train.synthetic import RandomCSRSource
from txfm.train.trainer import Trainer

# preset -> (genes, micro-batch) per device kind; GPU micro-batches fit an 80 GB H100 in bf16
CASES = {
    "cpu": {"tiny": (3000, 32), "S": (44_349, 2)},
    "cuda": {"tiny": (3000, 256), "S": (44_349, 96), "B": (44_349, 32), "L": (44_349, 12)},
}
QUICK = {"tiny": dict(dim=32, depth=2, heads=2, decoder_hidden=64, k=32)}


def _trainer(name: str, genes: int, batch: int, device: str, fused: bool, compile_: bool,
             overrides: dict, out_dir: str) -> Trainer:
    cfg = TrainConfig.for_preset(name, data=None, out=out_dir, steps=1000, epochs=None,
                                 batch_size=batch, device=device, progress=False,
                                 tensorboard=False, plot=False, compile=compile_)
    model_cfg = preset(name, backend="auto" if fused else "torch", **overrides)
    library = 5000.0 if genes > 10_000 else 1500.0  # ~3,000 non-zeros per cell at G = 44,349

    def factory(split, bs, rank, world, pin):
        return RandomCSRSource(n_cells=max(2 * bs, 64), n_genes=genes, batch_size=bs,
                               mean_library=library, split=split, rank=rank, world_size=world,
                               observed_fraction=0.8, seed=0)

    return Trainer(cfg, model_cfg, loader_factory=factory)


def _categorise(name: str) -> str:
    """Kind of a GPU kernel (or CPU op) from its name."""
    n = name.lower()
    if "txfm" in n or any(k in n for k in ("tokens", "poisson", "masked_sample", "_sample_")):
        return "txfm ops (tokens, loss, sampling)"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "cudnn")):
        return "attention"
    if any(k in n for k in ("gemm", "xmma", "nvjet", "cutlass", "::mm", "addmm", "bmm", "matmul")):
        return "matmul"
    if any(k in n for k in ("layer_norm", "layernorm", "rms_norm", "rmsnorm")):
        return "layernorm / rmsnorm"
    # clip_grad_norm_ runs as foreach norms (aten::_foreach_norm, linalg_vector_norm)
    if any(k in n for k in ("adam", "multi_tensor", "foreach", "vector_norm")):
        return "optimizer / clip"
    if "gelu" in n:
        return "gelu"
    if any(k in n for k in ("copy", "cat", "memcpy", "memset", "fill")):
        return "copies / fills"
    return "other elementwise"


def profile_step(trainer: Trainer, batches, steps: int = 3) -> list[dict]:
    """Time per kind of work over ``steps`` steps: GPU kernel time on CUDA, op self time on CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            trainer.train_step(batches)
        sync(trainer.device)
    totals: dict[str, float] = {}
    for ev in prof.key_averages():
        if cuda:  # kernels only: CPU-side ops also carry their kernels' time (double count)
            if ev.device_type != DeviceType.CUDA:
                continue
            t = ev.self_device_time_total
        else:
            t = ev.self_cpu_time_total
        if t > 0:
            key = _categorise(ev.key)
            totals[key] = totals.get(key, 0.0) + t
    whole = sum(totals.values()) or 1.0
    return [{"part": k, "ms_per_step": v / 1e3 / steps, "share": v / whole}
            for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]


def run_case(name, genes, batch, device, impl, args, overrides) -> tuple[dict, list | None]:
    fused = impl != "eager"
    with tempfile.TemporaryDirectory() as out_dir:
        tr = _trainer(name, genes, batch, device, fused, impl == "fused+compile", overrides,
                      out_dir)
        stream = tr._stream()
        batches = tr._fetch(stream)
        warm = 1 if args.quick else 3
        for _ in range(warm):
            tr.train_step(batches)
        sync(tr.device)
        if tr.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(tr.device)
        reps = args.reps or (2 if args.quick else 10)
        t0 = time.perf_counter()
        for _ in range(reps):
            tr.train_step(batches)
        sync(tr.device)
        dt = (time.perf_counter() - t0) / reps
        sps = batch / dt
        flops = train_flops_per_sample(tr.model_config, genes)
        row = {"preset": name, "impl": impl, "tokens": tr.model_config.token_norm,
               "genes": genes, "k": tr.model_config.k,
               "batch": batch, "step_ms": dt * 1e3, "samples_per_s": sps,
               "tflops": sps * flops / 1e12,
               "mfu": (sps * flops / tr.peak) if tr.peak else None,
               "peak_mib": (torch.cuda.max_memory_allocated(tr.device) / 2**20
                            if tr.device.type == "cuda" else None)}
        prof = profile_step(tr, batches) if (args.profile and impl != "eager") else None
        del tr, batches, stream
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row, prof


def main(argv=None) -> list[dict]:
    parser = ArgumentParser(prog="python -m bench.train", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--preset", action="append", help="tiny, S, B, L (repeatable)")
    parser.add_argument("--batch", type=positive_int,
                        help="micro-batch (default per preset and device)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(fused)")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager reference")
    parser.add_argument("--profile", action="store_true", help="where the fused step's time goes")
    parser.add_argument("--threads", type=positive_int, help="torch intra-op threads (CPU)")
    parser.add_argument("--tokens", action="append", choices=TOKEN_NORMS,
                        help="TxFMConfig.token_norm to time (repeatable; default: the preset's)")
    args = parser.parse_args(argv)
    check_common_args(parser, args, "--batch")
    unknown = [p for p in args.preset or [] if p not in CASES["cuda"] and p not in CASES["cpu"]]
    if unknown:
        parser.error(f"--preset {unknown[0]}: choose from "
                     f"{sorted(set(CASES['cuda']) | set(CASES['cpu']))}")
    check_distinct("--preset", args.preset or [])
    check_distinct("--tokens", args.tokens or [])
    if args.threads and args.threads > (os.cpu_count() or 1):
        print(f"warning: --threads {args.threads} is more than this machine's {os.cpu_count()} "
              "CPUs; oversubscribed threads slow each step down", file=sys.stderr)
    kind = torch.device(args.device).type
    check_device(torch.device(args.device))
    warn_if_loaded()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.preset or (["tiny"] if kind == "cpu" else ["S", "B"])
    impls = (["fused"] if args.no_eager else ["eager", "fused"]) + (
        ["fused+compile"] if args.compile else [])
    rows, profiles = [], {}
    for name in names:
        genes, batch = CASES[kind].get(name, CASES["cuda"].get(name, (44_349, 8)))
        overrides = QUICK.get(name, {}) if args.quick else {}
        if args.quick:
            genes, batch = min(genes, 500), min(batch, 8)
            # the other presets keep their shape; K cannot exceed the quick corpus's genes
            overrides = overrides or {"k": min(preset(name).k, genes)}
        batch = args.batch or batch
        for tokens in args.tokens or [None]:
            case = dict(overrides, **({"token_norm": tokens} if tokens else {}))
            for impl in impls:
                row, prof = run_case(name, genes, batch, args.device, impl, args, case)
                rows.append(row)
                if prof:
                    profiles[f"{name} {row['tokens']} {impl}"] = prof
    add_ratios(rows, ["preset", "batch", "tokens"], time_key="step_ms", refs=("eager",))
    emit("train step (sample + forward + backward + AdamW)", rows,
         ["preset", "impl", "tokens", "genes", "k", "batch", "step_ms", "samples_per_s", "tflops",
          "mfu", "peak_mib", "x_eager"], args, args.device, extra={"profiles": profiles})
    for name, prof in profiles.items():
        print(f"\n### where a {name} step's time goes ({kind})\n")
        print("| part | per step | share |\n|---|---:|---:|")
        for p in prof:
            print(f"| {p['part']} | {p['ms_per_step']:.2f} ms | {100 * p['share']:.1f}% |")
    return rows


if __name__ == "__main__":
    raise SystemExit(run(main))
