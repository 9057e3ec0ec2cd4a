"""``python -m bench.poisson``: rectified-tanh Poisson NLL over the gene vocabulary, forward and
forward+backward.

Implementations, side by side on the same inputs (logits ``z [B, G]``, log1p targets
``x [B, G]``, no gene mask, reduction "mean"):

* ``eager``    the TxFM loss (arXiv:2605.31562 §4) in eager PyTorch, in the inputs' dtype:
  ``phi = alpha * relu(tanh(z / beta)); (exp(phi) - phi * exp(x)).mean(1).mean()``
* ``compile``  ``torch.compile`` of that function (inductor)
* ``cpu`` / ``cuda`` / ``triton`` / ``torch``:
  :func:`txfm_kernels.rectified_tanh_poisson_nll` with that backend (``torch`` is our eager
  reference with fp32 arithmetic; the Triton interpreter on CPU is not benchmarked).

Cases: B in {64, 256, 1024}, G = 44,349, fp32 and bf16 (logits and target in that dtype).
``fwd`` runs under ``torch.no_grad``; ``fwd+bwd`` also computes dlogits
(``torch.autograd.grad``, so nothing accumulates into ``.grad``). Reported: median ms,
speed-up over eager and torch.compile (``x_eager``, ``x_compile``), peak extra memory (the
gradient included), and on a GPU the bytes the op must move (read z and x; write dz for
fwd+bwd), the achieved GB/s and its fraction of the GPU's peak bandwidth.

``--quick``: one tiny case (a smoke test, not a measurement).
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench.common import (add_common_args, add_ratios, benchmark_backends, check_common_args,
                          check_device, check_distinct, check_fits, compile_fn, emit,
                          gpu_peak_bandwidth_gbs, peak_extra_mib, run, select_impls, sync, time_fn,
                          warn_if_loaded)
from txfm.cli import ArgumentParser, positive_int

G_FULL = 44_349
BATCHES = (64, 256, 1024)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def eager_loss(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The loss of arXiv:2605.31562 §4 as a user would write it (no mask: mean over genes, then
    over rows)."""
    from txfm_kernels import ALPHA, BETA

    phi = ALPHA * torch.relu(torch.tanh(z / BETA))
    return (torch.exp(phi) - phi * torch.exp(x)).mean(1).mean()


def make_case(B: int, G: int, dtype: torch.dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, G, generator=gen) * 4
    x = torch.log1p(torch.rand(B, G, generator=gen) * 100)
    return z.to(device=device, dtype=dtype).requires_grad_(True), x.to(device=device, dtype=dtype)


def implementations(device: torch.device) -> list[str]:
    return ["eager", "compile"] + benchmark_backends("poisson", device.type)


def bytes_moved(B: int, G: int, dtype: torch.dtype, mode: str) -> int:
    """The op's memory-traffic floor: read z and x, and write dz when a gradient is needed."""
    es = torch.tensor([], dtype=dtype).element_size()
    return B * G * es * (3 if mode == "fwd+bwd" else 2)


def run_case(B, G, dtype_name, device, impls, reps, max_seconds):
    from txfm_kernels import rectified_tanh_poisson_nll

    dtype = DTYPES[dtype_name]
    z, x = make_case(B, G, dtype, device)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        for impl in impls:
            if impl == "eager":
                fn = eager_loss
            elif impl == "compile":
                fn = compile_fn(eager_loss)
            else:
                def fn(z, x, backend=impl):
                    return rectified_tanh_poisson_nll(z, x, backend=backend)

            if mode == "fwd":
                def call(f=fn):
                    with torch.no_grad():
                        return f(z, x)
            else:
                def call(f=fn):
                    return torch.autograd.grad(f(z, x), z)[0]

            timing = time_fn(call, device, warmup=2 if impl == "compile" else 1, reps=reps,
                             max_seconds=max_seconds)
            peak = peak_extra_mib(call, device)
            row = {"B": B, "G": G, "dtype": dtype_name, "mode": mode, "impl": impl,
                   **{k: round(v, 3) for k, v in timing.items() if k != "reps"},
                   "reps": timing["reps"], "peak_extra_mib": None if peak is None else round(peak, 1)}
            if device.type == "cuda":
                moved = bytes_moved(B, G, dtype, mode)
                row["gbytes"] = round(moved / 1e9, 4)
                row["gb_per_s"] = round(moved / 1e9 / (timing["median_ms"] / 1e3), 1)
                peak_bw = gpu_peak_bandwidth_gbs(device)
                row["pct_peak_bw"] = round(100 * row["gb_per_s"] / peak_bw, 1) if peak_bw else None
            rows.append(row)
            print(f"B={B:5d} {dtype_name} {mode:8s} {impl:8s} {row['median_ms']:9.2f} ms  "
                  f"peak +{row['peak_extra_mib']} MiB", file=sys.stderr, flush=True)
            del call, fn
            sync(device)
    del z, x
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.poisson", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)),
                        help="comma-separated batch sizes B (default 64,256,1024)")
    parser.add_argument("--G", type=positive_int, default=G_FULL,
                        help="genes per row (default 44,349)")
    parser.add_argument("--dtype", help="comma-separated: fp32, bf16 (default both; fp32 with --quick)")
    parser.add_argument("--impls", help="comma-separated subset of the implementations")
    args = parser.parse_args(argv)
    check_common_args(parser, args, "--batches", "--G")

    device = torch.device(args.device)
    check_device(device)
    impls = select_impls(implementations(device), args.impls)
    dtypes = (args.dtype or ("fp32" if args.quick else "fp32,bf16")).split(",")
    if any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtype {args.dtype!r}: choose from {list(DTYPES)}")
    check_distinct("--dtype", dtypes)
    if args.quick:
        batches, G, reps, max_s = [4], 2048, args.reps or 2, 2.0
    else:
        try:
            batches = [int(b) for b in args.batches.split(",")]
        except ValueError:
            batches = []
        if not batches or min(batches) < 1:
            parser.error(f"--batches {args.batches!r}: give integers >= 1 such as 64,256")
        check_distinct("--batches", batches)
        G = args.G
        reps = args.reps or (50 if device.type == "cuda" else 5)
        max_s = 10.0 if device.type == "cuda" else 4.0
    for B in batches:  # inputs, gradients and the eager formula's temporaries: ~6 x [B, G] fp32
        check_fits(24.0 * B * G, f"--batches {B} with --G {G}", device)
    warn_if_loaded()

    rows = []
    for dtype_name in dtypes:
        for B in batches:
            rows += run_case(B, G, dtype_name, device, impls, reps, max_s)
    add_ratios(rows, ("B", "G", "dtype", "mode"))
    columns = ["B", "dtype", "mode", "impl", "median_ms", "x_eager", "x_compile", "peak_extra_mib"]
    if device.type == "cuda":
        columns += ["gbytes", "gb_per_s", "pct_peak_bw"]
    emit(f"rectified-tanh Poisson NLL (G={G}, reduction=mean)", rows, columns, args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
