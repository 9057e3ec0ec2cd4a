"""``python -m bench.sample``: CSR counts -> K masked genes + values + dense target, cells/s.

Implementations, side by side on the same batch:

* ``loop``    what public TxFM-style code does: per row, densify (``zeros(G)`` + scatter of
  ``log1p(L * c / sum)``), ``torch.randperm`` over the row's observable genes, take K, gather
  values; the dense rows are stacked into the target (kept or not).
* ``eager``   vectorised eager PyTorch: CSR ``to_dense``, normalise + ``log1p``, random keys
  (``-inf`` on unobservable genes), ``topk`` K, gather.
* ``cpu`` / ``cuda`` / ``triton`` / ``torch``: :func:`txfm_kernels.masked_sample` with that
  backend; ``cpu+out`` / ``cuda+out`` / ``triton+out`` write into preallocated outputs
  (``out=``), which saves the allocation and first-touch page faults of the target.

Cases: B in {256, 1536}; ``sc`` rows (~3,000 non-zeros, 4 datasets of 8,000-20,000 observable
genes) and ``bulk`` rows (~20,000 non-zeros, 36,000 observable); G = 44,349; K = 2,048; with
and without the dense target. Reported: median ms, cells/s, speed-up over the loop and eager
(``x_loop``, ``x_eager``), peak extra memory (outputs included); on CPU also the process CPU
time per call (all threads: ``cpu_ms``, ``cells_per_cpu_s``), which other processes' load
disturbs far less than wall time; on a GPU the bytes the op must move and the achieved GB/s.

``--cases 256:sc,1536:bulk`` picks cases; ``--quick``: one small case (a smoke test).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings

import numpy as np
import torch

from bench.common import (add_common_args, add_ratios, benchmark_backends, check_common_args,
                          check_device, check_distinct, check_fits, emit, fail,
                          gpu_peak_bandwidth_gbs, peak_extra_mib, run, select_impls, sync, time_fn,
                          warn_if_loaded)
from txfm.cli import ArgumentParser, positive_int

G_FULL = 44_349
K_DEFAULT = 2048
L = 1e5
KINDS = {  # nnz per row (range), observable genes per dataset (range), datasets
    "sc": {"nnz": (2000, 4000), "obs": (8000, 20000), "datasets": 4},
    "bulk": {"nnz": (17000, 23000), "obs": (36000, 36000), "datasets": 1},
}
ALL_CASES = [(256, "sc"), (256, "bulk"), (1536, "sc"), (1536, "bulk")]


def make_batch(B: int, kind: str, G: int = G_FULL, seed: int = 0, nnz=None, obs=None):
    """CSR rows whose non-zeros lie in their dataset's observable genes; counts ~ geometric."""
    from txfm_kernels import ObservableGenes

    spec = KINDS[kind]
    rng = np.random.default_rng(seed)
    lo, hi = obs or spec["obs"]
    n_ds = spec["datasets"]
    sizes = np.linspace(lo, hi, n_ds).astype(int) if n_ds > 1 else [hi]
    lists = [np.sort(rng.choice(G, size=min(int(s), G), replace=False)) for s in sizes]
    observable = ObservableGenes.from_lists(lists, G)
    ds = rng.integers(0, n_ds, size=B)
    lo, hi = nnz or spec["nnz"]
    rows = []
    for b in range(B):
        genes = lists[ds[b]]
        n = min(int(rng.integers(lo, hi + 1)), len(genes))
        rows.append(np.sort(genes[rng.permutation(len(genes))[:n]]))
    lens = np.array([len(r) for r in rows])
    indptr = np.zeros(B + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(lens)
    counts = rng.geometric(0.3, size=int(indptr[-1])).astype(np.float32)
    return (torch.from_numpy(indptr), torch.from_numpy(np.concatenate(rows)).to(torch.int32),
            torch.from_numpy(counts), observable, torch.from_numpy(ds).to(torch.int32))


def loop_sample(indptr, indices, counts, observable, dataset_ids, G, K, return_target, seed=0):
    """Per-row Python loop with torch.randperm: the baseline peers use."""
    torch.manual_seed(seed)
    B = indptr.numel() - 1
    dev = indptr.device
    ids = torch.zeros(B, K, dtype=torch.int64, device=dev)
    vals = torch.zeros(B, K, dtype=torch.float32, device=dev)
    pad = torch.ones(B, K, dtype=torch.bool, device=dev)
    dense_rows = []
    ptr = indptr.tolist()
    ds = dataset_ids.tolist()
    obs_ptr = observable.indptr.tolist()
    for b in range(B):
        c = counts[ptr[b]:ptr[b + 1]]
        dense = torch.zeros(G, device=dev)
        dense[indices[ptr[b]:ptr[b + 1]].long()] = torch.log1p(L * c / c.sum().clamp_min(1e-30))
        genes = observable.genes[obs_ptr[ds[b]]:obs_ptr[ds[b] + 1]].long()
        pick = genes[torch.randperm(genes.numel(), device=dev)[:K]]
        ids[b, :pick.numel()] = pick
        vals[b, :pick.numel()] = dense[pick]
        pad[b, :pick.numel()] = False
        if return_target:
            dense_rows.append(dense)
    target = torch.stack(dense_rows) if return_target else None
    return ids, vals, pad, target


def eager_sample(indptr, indices, counts, observable, dataset_ids, G, K, return_target, seed=0):
    """Vectorised eager PyTorch: to_dense + log1p + topk over random keys."""
    B = indptr.numel() - 1
    gen = torch.Generator(device=indptr.device).manual_seed(seed)
    # check_invariants=False says what PyTorch would otherwise warn about on every call (the
    # batch is built valid here); its "CSR support is in beta" warning is PyTorch's, not ours
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        x = torch.sparse_csr_tensor(indptr, indices, counts, (B, G),
                                    check_invariants=False).to_dense()
    lib = x.sum(1, keepdim=True)
    x = torch.log1p(L * x / lib.clamp_min(1e-30))
    keys = torch.rand(B, G, generator=gen, device=x.device)
    keys.masked_fill_(~observable.mask[dataset_ids.long()], -math.inf)
    top = torch.topk(keys, K, dim=1)
    ids = top.indices
    pad = torch.isinf(top.values)
    vals = x.gather(1, ids).masked_fill_(pad, 0.0)
    return ids, vals, pad, x if return_target else None


def implementations(device: torch.device) -> list[str]:
    impls = ["loop", "eager"]
    for name in benchmark_backends("sample", device.type):
        impls.append(name)
        if name != "torch":
            impls.append(f"{name}+out")
    return impls


def bytes_moved(indptr, counts, B, G, K, return_target) -> int:
    """The op's memory traffic floor: CSR read once, outputs written once."""
    nnz = counts.numel()
    return (indptr.numel() * 8 + nnz * (4 + counts.element_size()) + B * K * (4 + 4 + 1) + B * 4
            + (B * G * 4 if return_target else 0))


def run_case(B, kind, G, K, device, impls, reps, max_seconds, seed=0, nnz=None, obs=None):
    from txfm_kernels import masked_sample

    indptr, indices, counts, observable, ds = make_batch(B, kind, G, seed, nnz, obs)
    indptr, indices, counts, ds = (t.to(device) for t in (indptr, indices, counts, ds))
    observable = observable.to(device)
    rows = []
    for return_target in (True, False):
        for impl in impls:
            if impl in ("loop", "eager"):
                fn = loop_sample if impl == "loop" else eager_sample

                def call(fn=fn):
                    return fn(indptr, indices, counts, observable, ds, G, K, return_target)
            else:
                backend, _, use_out = impl.partition("+")
                kw = dict(n_genes=G, k=K, observable=observable, dataset_ids=ds, seed=seed,
                          return_target=return_target, backend=backend)
                out = masked_sample(indptr, indices, counts, **kw) if use_out else None

                def call(kw=kw, out=out):
                    return masked_sample(indptr, indices, counts, out=out, **kw)

            cpu_s: list[float] = []  # process CPU time (all threads) of each call

            def timed(call=call):
                t0 = time.process_time()
                out = call()
                cpu_s.append(time.process_time() - t0)
                return out

            slow = impl in ("loop", "eager", "torch")
            timing = time_fn(timed, device, warmup=1, reps=3 if slow else reps,
                             max_seconds=max_seconds)
            peak = peak_extra_mib(call, device)
            ms = timing["median_ms"]
            row = {"B": B, "kind": kind, "G": G, "K": K, "target": return_target, "impl": impl,
                   "nnz_per_row": round(counts.numel() / B), "median_ms": round(ms, 3),
                   "min_ms": round(timing["min_ms"], 3), "reps": timing["reps"],
                   "cells_per_s": round(B / (ms / 1e3)),
                   "peak_extra_mib": None if peak is None else round(peak, 1)}
            if device.type == "cpu":  # robust to other processes' load, unlike wall time
                row["cpu_ms"] = round(1e3 * statistics.median(cpu_s[1:]), 3)
                row["cells_per_cpu_s"] = round(B / statistics.median(cpu_s[1:]))
            if device.type == "cuda":
                moved = bytes_moved(indptr, counts, B, G, K, return_target)
                row["gb_per_s"] = round(moved / 1e9 / (ms / 1e3), 1)
                peak_bw = gpu_peak_bandwidth_gbs(device)
                row["pct_peak_bw"] = round(100 * row["gb_per_s"] / peak_bw, 1) if peak_bw else None
            rows.append(row)
            print(f"B={B} {kind:4s} target={int(return_target)} {impl:11s} {ms:10.2f} ms "
                  f"{row['cells_per_s']:>10,} cells/s  peak +{row['peak_extra_mib']} MiB",
                  file=sys.stderr, flush=True)
            del call
            sync(device)
    return rows


def parse_cases(text: str | None) -> list[tuple[int, str]]:
    if text is None:
        return ALL_CASES
    try:
        cases = [(int(b), k) for b, k in (item.split(":") for item in text.split(","))]
    except ValueError:
        cases = []
    if not cases or min(b for b, _ in cases) < 1:
        fail(f"--cases {text!r}: give B:kind pairs with B >= 1 such as 256:sc,1536:bulk")
    bad = [k for _, k in cases if k not in KINDS]
    if bad:
        fail(f"--cases: unknown kinds {bad}; choose from {list(KINDS)}")
    return check_distinct("--cases", cases, show=lambda case: f"{case[0]}:{case[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.sample", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--cases", help="B:kind cases, e.g. 256:sc,1536:bulk (kinds: sc, bulk)")
    parser.add_argument("--K", type=positive_int, default=K_DEFAULT, help="shown genes per cell")
    parser.add_argument("--impls", help="comma-separated subset of the implementations")
    args = parser.parse_args(argv)
    check_common_args(parser, args, "--cases", "--K")

    device = torch.device(args.device)
    check_device(device)
    impls = select_impls(implementations(device), args.impls)
    warn_if_loaded()
    extra = {}
    if args.quick:
        cases, G, K, reps, max_s = [(16, "sc")], 5000, 256, args.reps or 2, 2.0
        extra = {"nnz": (200, 400), "obs": (1000, 3000)}
    else:
        cases, G, K = parse_cases(args.cases), G_FULL, args.K
        reps, max_s = args.reps or (20 if device.type == "cuda" else 7), 8.0
        if K > G:
            fail(f"--K {K}: more than the {G:,} genes of every case; use --K <= {G}")
        for B, kind in cases:  # dense rows and random keys of the eager reference: 4 x [B, G]
            check_fits(16.0 * B * G, f"--cases {B}:{kind}", device)
    rows = []
    for B, kind in cases:
        rows += run_case(B, kind, G, K, device, impls, reps, max_s, **extra)
    add_ratios(rows, ("B", "kind", "G", "K", "target"), refs=("loop", "eager"))
    columns = ["B", "kind", "target", "impl", "median_ms", "cells_per_s", "x_loop", "x_eager",
               "peak_extra_mib"]
    if device.type == "cpu":
        columns += ["cpu_ms", "cells_per_cpu_s"]
    if device.type == "cuda":
        columns += ["gb_per_s", "pct_peak_bw"]
    emit(f"masked sampling (G={G}, K={K})", rows, columns, args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
