"""``python -m bench.tokens``: encoder input tokens ``[E[g]; x]`` + CLS, forward and fwd+bwd.

Implementations, side by side on the same inputs:

* ``eager``    ``torch.cat([cls, torch.cat([codebook[ids], values[..., None]], -1)], 1)``
* ``compile``  ``torch.compile`` of that function (inductor)
* ``cpu`` / ``cuda`` / ``triton`` / ``torch``: :func:`txfm_kernels.gene_tokens` with that
  backend (default deterministic backward); ``cuda-atomic`` / ``triton-atomic`` with
  ``deterministic=False``.

Cases: B in {32, 192}, K = 2,048, d in {384, 768}, V = 44,349 (fp32; ``--dtype bf16`` too);
gene ids drawn without replacement per sample, as the masking does. ``fwd`` runs under
``torch.no_grad``; ``fwd+bwd`` also computes the codebook and CLS gradients
(``torch.autograd.grad``, so nothing accumulates into ``.grad``). Reported: median ms, speed-up
over eager and torch.compile (``x_eager``, ``x_compile``), peak extra memory (outputs
included), and on a GPU the bytes the op must move and the achieved GB/s.

``--sizes 32x384,192x768`` picks cases (default on CPU: every case but 192x768, whose eager
run alone needs ~5 GB; ``--sizes all`` adds it). ``--quick``: one tiny case (a smoke test).
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench.common import (add_common_args, add_ratios, benchmark_backends, check_common_args,
                          check_device, check_distinct, check_fits, compile_fn, emit, fail,
                          gpu_peak_bandwidth_gbs, peak_extra_mib, run, select_impls, sync, time_fn,
                          warn_if_loaded)
from txfm.cli import ArgumentParser, positive_int

V_FULL = 44_349
K_DEFAULT = 2048
ALL_SIZES = [(32, 384), (32, 768), (192, 384), (192, 768)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def eager_tokens(codebook, gene_ids, values, cls):
    B = gene_ids.shape[0]
    tokens = torch.cat([codebook[gene_ids], values.to(codebook.dtype)[..., None]], dim=-1)
    return torch.cat([cls.expand(B, 1, -1), tokens], dim=1)


def make_case(B, K, d, V, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codebook = (torch.randn(V, d - 1, generator=gen) * 0.02).to(dtype)
    gene_ids = torch.rand(B, V, generator=gen).argsort(dim=1)[:, :K]  # without replacement
    values = torch.rand(B, K, generator=gen) * 10
    cls = (torch.randn(d, generator=gen) * 0.02).to(dtype)
    grad = torch.randn(B, K + 1, d, generator=gen).to(dtype)
    to = dict(device=device)
    return (codebook.to(**to).requires_grad_(), gene_ids.to(**to), values.to(**to),
            cls.to(**to).requires_grad_(), grad.to(**to))


def implementations(device: torch.device) -> dict[str, dict]:
    """name -> gene_tokens keyword arguments (None for the eager/compile baselines)."""
    impls: dict[str, dict | None] = {"eager": None, "compile": None}
    for name in benchmark_backends("tokens", device.type):
        impls[name] = {"backend": name}
        if name in ("cuda", "triton"):
            impls[f"{name}-atomic"] = {"backend": name, "deterministic": False}
    return impls


def bytes_moved(B, K, d, V, dtype, mode) -> int:
    """What the op must read and write at least (its memory traffic floor)."""
    es = torch.tensor([], dtype=dtype).element_size()
    fwd = B * (K + 1) * d * es + B * K * ((d - 1) * es + 8 + 4)  # tokens, gathered rows, ids+x
    bwd = B * (K + 1) * d * es + V * (d - 1) * es + B * K * 8  # grad, grad_codebook, ids
    return fwd + (bwd if mode == "fwd+bwd" else 0)


def run_case(B, K, d, V, dtype_name, device, impls, reps, max_seconds):
    from txfm_kernels import gene_tokens

    dtype = DTYPES[dtype_name]
    codebook, gene_ids, values, cls, grad = make_case(B, K, d, V, dtype, device)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        for impl, kwargs in impls.items():
            if impl == "eager":
                fwd = eager_tokens
            elif impl == "compile":
                fwd = compile_fn(eager_tokens)
            else:
                def fwd(e, ids, x, c, kw=kwargs):
                    return gene_tokens(e, ids, x, cls=c, **kw)

            if mode == "fwd":
                def call(f=fwd):
                    with torch.no_grad():
                        return f(codebook, gene_ids, values, cls)
            else:
                def call(f=fwd):
                    out = f(codebook, gene_ids, values, cls)
                    return torch.autograd.grad(out, (codebook, cls), grad)

            timing = time_fn(call, device, warmup=2 if impl == "compile" else 1, reps=reps,
                             max_seconds=max_seconds)
            peak = peak_extra_mib(call, device)
            row = {"B": B, "K": K, "d": d, "V": V, "dtype": dtype_name, "mode": mode,
                   "impl": impl, **{k: round(v, 3) for k, v in timing.items() if k != "reps"},
                   "reps": timing["reps"],
                   "peak_extra_mib": None if peak is None else round(peak, 1)}
            if device.type == "cuda":
                moved = bytes_moved(B, K, d, V, dtype, mode)
                row["gbytes"] = round(moved / 1e9, 3)
                row["gb_per_s"] = round(moved / 1e9 / (timing["median_ms"] / 1e3), 1)
                peak_bw = gpu_peak_bandwidth_gbs(device)
                row["pct_peak_bw"] = round(100 * row["gb_per_s"] / peak_bw, 1) if peak_bw else None
            rows.append(row)
            print(f"B={B} d={d} {dtype_name} {mode:8s} {impl:14s} {row['median_ms']:9.2f} ms  "
                  f"peak +{row['peak_extra_mib']} MiB", file=sys.stderr, flush=True)
            del call, fwd
            sync(device)
    del codebook, gene_ids, values, cls, grad
    return rows


def parse_sizes(text: str | None, device: torch.device) -> list[tuple[int, int]]:
    if text is None:
        return ALL_SIZES if device.type == "cuda" else ALL_SIZES[:3]
    if text == "all":
        return ALL_SIZES
    try:
        sizes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        sizes = []
    # d is the token width [E ; value]: at least one embedding column beside the value
    if not sizes or any(len(s) != 2 or s[0] < 1 or s[1] < 2 for s in sizes):
        fail(f"--sizes {text!r}: give BxD pairs (B >= 1, D >= 2) such as 32x384,192x768, "
             f"or 'all'")
    return check_distinct("--sizes", sizes, show=lambda size: f"{size[0]}x{size[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.tokens", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--sizes", help="BxD cases, e.g. 32x384,192x768, or 'all'")
    parser.add_argument("--dtype", default="fp32", help="comma-separated: fp32, bf16")
    parser.add_argument("--K", type=positive_int, default=K_DEFAULT, help="tokens per row")
    parser.add_argument("--V", type=positive_int, default=V_FULL, help="codebook genes")
    parser.add_argument("--impls", help="comma-separated subset of the implementations")
    args = parser.parse_args(argv)
    check_common_args(parser, args, "--sizes", "--K", "--V")

    device = torch.device(args.device)
    check_device(device)
    impls = select_impls(implementations(device), args.impls)
    dtypes = args.dtype.split(",")
    if any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtype {args.dtype!r}: choose from {list(DTYPES)}")
    check_distinct("--dtype", dtypes)
    warn_if_loaded()
    if args.quick:
        sizes, K, V, reps, max_s = [(2, 64)], 256, 1000, args.reps or 2, 2.0
    else:
        sizes, K, V = parse_sizes(args.sizes, device), args.K, args.V
        if K > V:
            parser.error(f"--K {K} > --V {V}: a row's genes are distinct, so K <= V")
        reps = args.reps or (20 if device.type == "cuda" else 5)
        max_s = 10.0
    for B, d in sizes:  # the draw's [B, V] keys and order, the codebook, tokens and gradients
        check_fits(24.0 * B * V + 4.0 * V * d + 16.0 * B * (K + 1) * d,
                   f"size {B}x{d} with --K {K} --V {V}", device)

    rows = []
    for dtype_name in dtypes:
        for B, d in sizes:
            rows += run_case(B, K, d, V, dtype_name, device, impls, reps, max_s)
    add_ratios(rows, ("B", "K", "d", "V", "dtype", "mode"))
    columns = ["B", "d", "dtype", "mode", "impl", "median_ms", "x_eager", "x_compile",
               "peak_extra_mib"]
    if device.type == "cuda":
        columns += ["gb_per_s", "pct_peak_bw"]
    emit("gene tokens (K={}, V={})".format(K, V), rows, columns, args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
