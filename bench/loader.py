"""Loader benchmark: shuffled 1,024-cell CSR batches from one synthetic corpus, four ways.

    python -m bench.loader [--cells 200000 --genes 44349 --nnz 3000 --batch-size 1024]
                           [--workers 2] [--codecs none,lz4] [--json out.json] [--quick]

One synthetic corpus (cells x genes, ~``--nnz`` non-zeros per cell: sorted random gene ids,
geometric counts; written once as a float32/int32 ``.h5ad`` and cached, with the shards and
annbatch's collection made from it, under ``--cache``: by default the user's cache folder,
``$XDG_CACHE_HOME/txfm/bench_loader`` or ``~/.cache/txfm/bench_loader``, since the default
corpus and its copies take several GiB) is read by

* ``txfm`` — :class:`txfm.data.ShardLoader` on shards written by ``txfm data convert``
  (counts and indices stored as uint16, read by anndata as float32/int32; codec ``none``
  and, for comparison, ``lz4``), in-process with 1 and 2 threads, with its crc32c check of
  every chunk on (the default) and, in the same run, off (``verify=off``: the cost of
  checking), and through a DataLoader with ``--workers`` processes;
* ``annbatch`` — ``annbatch.Loader`` (zarrs codec pipeline) on annbatch's own pre-shuffled
  collection written by its ``DatasetCollection`` (blosc-lz4, 64-row chunks), with
  chunk_size 512 / preload 32 (fastest) and 32 / 256 (its README), and on our collection;
  it needs Python >= 3.12, so it runs in ``.cache/annbatch-venv`` as a subprocess;
* ``h5ad backed`` — anndata's backed ``X[sorted random rows]``.

Every number is the median of ``--reps`` fresh processes after a warm-up, with the files in
the page cache (read once before); the cases take turns (one process of each, then the next
round), so that load from other jobs falls on all of them alike. Peak RSS is the process'
high-water mark (plus its DataLoader workers'). Shuffle = distinct 1,024-row stretches of
the original input order per batch; a perfect shuffle's expectation is printed as ``ideal``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

from bench.common import (add_common_args, check_common_args, check_distinct, emit, run,
                          warn_if_loaded)
from txfm.cli import ArgumentParser, nonnegative_int, positive_int
from txfm.files import write_atomic

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CACHE = (pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
                 / "txfm" / "bench_loader")
DEFAULT_ANNBATCH = ROOT / ".cache" / "annbatch-venv" / "bin" / "python"
ANNBATCH_HELP = ("python3.12 -m venv .cache/annbatch-venv && .cache/annbatch-venv/bin/pip "
                 "install annbatch zarrs")


# ----------------------------------------------------------------------------- corpus
def make_source(path: pathlib.Path, cells: int, genes: int, nnz: int,
                seed: int = 0) -> pathlib.Path:
    """Write the synthetic ``.h5ad`` (float32 counts, int32 indices, obs['orig'] = row)."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # through a temporary file: a run stopped mid-write must not leave a truncated file that
    # the next run takes for a finished one
    write_atomic(path, lambda tmp: _write_source(tmp, cells, genes, nnz, seed))
    return path


def _write_source(path: pathlib.Path, cells: int, genes: int, nnz: int, seed: int) -> None:
    import pandas as pd

    from txfm.data.synth import _H5adWriter, gene_ids, gene_symbols

    rng = np.random.default_rng(seed)
    chunk = max(64, (1 << 23) // max(nnz, 1))
    w = _H5adWriter(path, genes, data_dtype=np.float32)
    try:
        for a in range(0, cells, chunk):
            r = min(chunk, cells - a)
            # per-cell depth: log-normal around nnz; gene ids = cumulative geometric gaps
            # (sorted, distinct), so the cost is per non-zero, not per (cell, gene)
            target = np.clip(rng.lognormal(np.log(nnz), 0.3, r), 50, 0.9 * genes)
            p = target / genes
            k = int(target.max() * 1.15 + 6 * np.sqrt(target.max()) + 16)
            pos = np.cumsum(rng.geometric(p[:, None], size=(r, k)), axis=1) - 1
            hit = pos < genes
            indices = pos[hit].astype(np.int32)
            indptr = np.zeros(r + 1, dtype=np.int64)
            np.cumsum(hit.sum(axis=1), out=indptr[1:])
            counts = rng.geometric(0.55, size=indices.size).astype(np.float32)
            w.append_csr(indptr, indices, counts)
        obs = pd.DataFrame({"orig": np.arange(cells, dtype=np.int64)},
                           index=pd.Index([f"c{i}" for i in range(cells)]))
        var = pd.DataFrame({"symbol": gene_symbols(genes).astype(str)},
                           index=pd.Index(gene_ids(genes).astype(str)))
        w.finish(obs, var, {"modality": "single-cell"})
    finally:
        w.close()


def make_ours(src: pathlib.Path, out: pathlib.Path, codec: str) -> pathlib.Path:
    from txfm.data.convert import convert

    kw = dict(min_cells=0, min_genes=0, val_fraction=0.0, codec=codec, seed=0,
              progress=sys.stderr.isatty(), log=lambda s: None)
    try:  # a finished conversion with the same options is kept
        convert([src], out, **kw)
    except FileExistsError:  # a cached conversion by an older txfm (another format): redo
        convert([src], out, overwrite=True, **kw)
    return out


def annbatch_versions(python: pathlib.Path) -> dict[str, str | None]:
    """The versions of annbatch, zarrs and zarr in the venv of ``python`` (None: absent), so
    the table and the JSON name what was measured."""
    code = ("import importlib.metadata as m, json\n"
            "def v(n):\n"
            "    try:\n        return m.version(n)\n"
            "    except m.PackageNotFoundError:\n        return None\n"
            "print(json.dumps({n: v(n) for n in ('annbatch', 'zarrs', 'zarr')}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def make_annbatch(python: pathlib.Path, src: pathlib.Path, out: pathlib.Path) -> None:
    if (out / "zarr.json").is_file() and any(out.glob("dataset_*")):
        return
    tmp = out.with_name("tmp-" + out.name)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    try:
        subprocess.run([str(python), str(ROOT / "bench" / "_annbatch_worker.py"), "write",
                        str(src), str(tmp)], check=True, stdout=subprocess.DEVNULL)
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    finally:  # a stopped or failed write leaves no half-made store behind
        shutil.rmtree(tmp, ignore_errors=True)


def disk_bytes(path: pathlib.Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def warm(path: pathlib.Path) -> None:
    """Read every file once so that all loaders start from a warm page cache."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(1 << 24):
                pass


def ideal_distinct(n_cells: int, batch: int, stretch: int, seed: int = 0) -> float:
    perm = np.random.default_rng(seed).permutation(n_cells)
    n = (n_cells // batch) * batch
    groups = perm[:n].reshape(-1, batch) // stretch
    groups.sort(axis=1)
    return float(np.mean((np.diff(groups, axis=1) != 0).sum(axis=1) + 1))


# ----------------------------------------------------------------------------- workers
def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_mib() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + kids) / 1024


def _rss_now_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _endless(epoch):
    """Batches of ``epoch()`` (a fresh pass each time one ends): a small corpus runs out during
    the warm-up or the timed batches, and the timing goes on into the next epoch."""
    while True:
        empty = True
        for batch in epoch():
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the loader gave no batch in a whole pass: fewer usable cells than "
                               "--batch-size")


def worker_ours(args) -> dict:
    import torch

    from txfm.data import ShardLoader

    torch.set_num_threads(1)
    cuda = args.device.startswith("cuda")
    base_rss = _rss_now_mib()
    t_open = time.perf_counter()
    loader = ShardLoader(args.path, args.batch_size, obs_columns=("orig",), seed=args.seed,
                         num_threads=args.threads or None, pin_memory=cuda,
                         verify=not args.no_verify)
    it = _endless(lambda: loader.dataloader(args.workers) if args.workers else loader)
    next(it)
    first = time.perf_counter() - t_open
    for _ in range(args.warmup):
        next(it)
    distinct, n, moved, anon = [], 0, 0, 0.0
    on_device = None
    if cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), _cpu_s()
    for _ in range(args.batches):
        b = next(it)
        n += b.batch_size
        if cuda:  # what a trainer does: async copy from pinned memory, no sync per batch
            on_device = b.to(args.device, non_blocking=True)
            moved += sum(t.numel() * t.element_size() for t in
                         (b.indptr, b.indices, b.counts, b.dataset_ids, b.cell_ids))
        distinct.append(np.unique(b.obs["orig"].numpy() // args.stretch).size)
        anon = max(anon, _rss_now_mib("RssAnon"))
    if cuda:
        torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, _cpu_s() - c0
    del on_device
    return {"cells_per_s": n / dt, "seconds": dt, "first_batch_s": first,
            **({"cells_per_cpu_s": n / cpu} if not args.workers else {}),
            **({"h2d_gb_per_s": moved / dt / 1e9} if cuda else {}),
            "peak_anon_mib": anon,
            "peak_rss_mib": _peak_rss_mib(), "import_rss_mib": base_rss,
            "distinct_stretches": float(np.mean(distinct)),
            "nnz_per_cell": float(b.indices.numel() / b.batch_size)}


def worker_h5ad(args) -> dict:
    import anndata as ad

    base_rss = _rss_now_mib()
    t_open = time.perf_counter()
    a = ad.read_h5ad(args.path, backed="r")
    orig = a.obs["orig"].to_numpy()
    rng = np.random.default_rng(args.seed)
    n_obs = a.n_obs

    def batch():
        rows = np.sort(rng.choice(n_obs, args.batch_size, replace=False))
        return rows, a.X[rows]

    batch()
    first = time.perf_counter() - t_open
    for _ in range(args.warmup):
        batch()
    distinct, n = [], 0
    t0, c0 = time.perf_counter(), _cpu_s()
    for _ in range(args.batches):
        rows, x = batch()
        n += x.shape[0]
        distinct.append(np.unique(orig[rows] // args.stretch).size)
    dt, cpu = time.perf_counter() - t0, _cpu_s() - c0
    return {"cells_per_s": n / dt, "seconds": dt, "first_batch_s": first,
            "cells_per_cpu_s": n / cpu,
            "peak_rss_mib": _peak_rss_mib(), "import_rss_mib": base_rss,
            "distinct_stretches": float(np.mean(distinct)),
            "nnz_per_cell": float(x.nnz / x.shape[0])}


def run_once(cmd: list[str], in_process: bool = False, timeout: float = 900) -> dict:
    """The JSON line one fresh process prints (``in_process``: run a ``bench.loader`` worker
    in this process instead, for the ``--quick`` smoke test)."""
    if in_process and cmd[1:3] == ["-m", "bench.loader"]:
        wargs = parse_args(cmd[3:])
        return worker_ours(wargs) if wargs.worker == "ours" else worker_h5ad(wargs)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(results: list[dict]) -> dict:
    """Medians over a case's processes (peak RSS: the largest)."""
    out = {k: statistics.median(r[k] for r in results) for k in results[0]
           if isinstance(results[0][k], (int, float))}
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in results)
    out["runs"] = [round(r["cells_per_s"]) for r in results]
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m bench.loader", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--cells", type=positive_int, default=200_000,
                   help="cells in the synthetic corpus (default: %(default)s)")
    p.add_argument("--genes", type=positive_int, default=44_349,
                   help="genes in the synthetic corpus (default: %(default)s)")
    p.add_argument("--nnz", type=positive_int, default=3_000,
                   help="mean non-zeros per cell, at most 0.9 x --genes (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=1024,
                   help="cells per batch (default: %(default)s)")
    p.add_argument("--workers", type=nonnegative_int, default=2,
                   help="DataLoader worker processes for the extra txfm row (0: skip it)")
    p.add_argument("--codecs", default="none,lz4", help="txfm shard codecs to convert and read")
    p.add_argument("--batches", type=positive_int, default=None,
                   help="timed batches per process")
    p.add_argument("--cache", type=pathlib.Path, default=DEFAULT_CACHE,
                   help="folder for the corpus, its shards and annbatch's collection, one "
                        "subfolder per corpus, reused by later runs (default: %(default)s)")
    p.add_argument("--annbatch-python", type=pathlib.Path, default=DEFAULT_ANNBATCH,
                   help=f"the Python (>= 3.12) that has annbatch; make it with: {ANNBATCH_HELP} "
                        f"(default: %(default)s)")
    p.add_argument("--no-annbatch", action="store_true", help="leave out annbatch's rows")
    p.add_argument("--no-h5ad", action="store_true", help="leave out the backed .h5ad row")
    p.add_argument("--prepare-only", action="store_true",
                   help="write the corpus, our shards and annbatch's collection, then stop")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="the corpus's and the shuffles' seed (default: %(default)s)")
    # worker mode (one fresh process per measurement)
    p.add_argument("--worker", choices=["ours", "h5ad"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--no-verify", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--stretch", type=int, default=1024, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from txfm.data.layout import CODECS

    bad = [c for c in args.codecs.split(",") if c not in CODECS]
    if bad or not args.codecs:
        p.error(f"--codecs {args.codecs!r}: choose from {', '.join(CODECS)} (comma-separated)")
    check_distinct("--codecs", args.codecs.split(","))
    check_common_args(p, args, "--codecs", "--workers", "--cells", "--genes", "--nnz",
                      "--batch-size")
    if args.nnz > 0.9 * args.genes:  # the corpus caps each cell's depth there
        p.error(f"--nnz {args.nnz} is more than 0.9 x --genes {args.genes}: a cell has at most "
                f"{int(0.9 * args.genes)} non-zeros here; lower --nnz or raise --genes")
    if not args.worker:
        from txfm.cli import folder_problem

        problem = folder_problem(args.cache)
        if problem is not None:
            p.error(f"--cache {args.cache}: {problem}")
        warn_if_loaded()
    if args.quick:
        args.cells, args.genes, args.nnz, args.batch_size = 4096, 2000, 200, 256
        args.reps = args.reps or 1
        args.batches = args.batches or 4
        args.workers = 0
        args.codecs = "none"
        args.no_annbatch = True
        args.warmup = 1
    args.reps = args.reps or 3
    if not args.worker and args.batch_size > args.cells:  # all cells train (val_fraction 0)
        p.error(f"--batch-size {args.batch_size}: more than the {args.cells:,} cells (--cells); "
                "lower it or raise --cells")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        fn = worker_ours if args.worker == "ours" else worker_h5ad
        print(json.dumps(fn(args)))
        return 0
    B = args.batch_size
    tag = f"{args.cells}x{args.genes}x{args.nnz}" + (f"s{args.seed}" if args.seed else "")
    cache = args.cache / tag
    t = time.perf_counter()
    src = make_source(cache / "source.h5ad", args.cells, args.genes, args.nnz, args.seed)
    prep = {"source_s": round(time.perf_counter() - t, 1)}
    codecs = [c for c in args.codecs.split(",") if c]
    ours = {}
    for codec in codecs:
        t = time.perf_counter()
        ours[codec] = make_ours(src, cache / f"txfm_{codec}", codec)
        prep[f"convert_{codec}_s"] = round(time.perf_counter() - t, 1)
    ab_python = args.annbatch_python
    ab_note = None
    ab_path = cache / "annbatch.zarr"
    if args.no_annbatch:
        ab_note = f"skipped ({'--quick' if args.quick else '--no-annbatch'})"
    elif not ab_python.is_file():
        ab_note = f"not installed: {ab_python} missing; create it with `{ANNBATCH_HELP}`"
    else:
        t = time.perf_counter()
        make_annbatch(ab_python, src, ab_path)
        prep["annbatch_write_s"] = round(time.perf_counter() - t, 1)
    if args.prepare_only:
        sizes = {p.name: round(disk_bytes(p) / 2**30, 2) for p in cache.iterdir()}
        print(json.dumps({"preparation_s": prep, "annbatch": ab_note or "written",
                          "disk_gib": sizes}))
        return 0
    batches = args.batches or max(20, min(200, 150_000 // B))
    slow_batches = max(5, batches // 8)
    base = [sys.executable, "-m", "bench.loader", "--batch-size", str(B), "--stretch", "1024",
            "--warmup", str(args.warmup), "--seed", str(args.seed), "--device", args.device]
    cases = []
    for codec, path in ours.items():
        for threads in (1, 2):
            for verify in ((True, False) if codec == "none" else (True,)):
                cases.append(("txfm", f"txfm {codec}",
                              f"threads={threads}" + ("" if verify else " verify=off"), path,
                              base + ["--worker", "ours", "--path", str(path), "--threads",
                                      str(threads), "--workers", "0", "--batches", str(batches)]
                              + ([] if verify else ["--no-verify"])))
    if args.workers and "none" in ours:
        cases.append(("txfm", "txfm none", f"DataLoader workers={args.workers}", ours["none"],
                      base + ["--worker", "ours", "--path", str(ours["none"]), "--workers",
                              str(args.workers), "--threads", "1", "--batches", str(batches)]))
    ab_versions = annbatch_versions(ab_python) if ab_note is None else None
    if ab_note is None:
        ab_label = f"annbatch {ab_versions['annbatch']}" + (
            f"+zarrs {ab_versions['zarrs']}" if ab_versions["zarrs"] else "")
        abw = [str(ab_python), str(ROOT / "bench" / "_annbatch_worker.py"), "read"]
        for layout, path in (("annbatch (blosc-lz4)", ab_path),
                             *((("txfm none", ours["none"]),) if "none" in ours else ())):
            for cs, pn in ((512, 32), (32, 256)):
                if layout.startswith("txfm") and cs == 32:
                    continue
                cases.append((ab_label, layout, f"chunk={cs} preload={pn}", path,
                              abw + [str(path), "--batch-size", str(B), "--chunk-size", str(cs),
                                     "--preload-nchunks", str(pn), "--batches", str(batches),
                                     "--warmup", str(args.warmup)]))
    if not args.no_h5ad:
        cases.append(("h5ad backed", "h5ad float32/int32", "sorted random rows", src,
                      base + ["--worker", "h5ad", "--path", str(src), "--batches",
                              str(slow_batches)]))
    for path in dict.fromkeys(c[3] for c in cases):
        warm(path)
    # the cases take turns, repetition by repetition: on a shared machine every case then
    # sees the same mix of quiet and busy moments, and the ratios within the run hold
    results: list[list[dict]] = [[] for _ in cases]
    for _ in range(args.reps):
        for i, case in enumerate(cases):
            results[i].append(run_once(case[4], in_process=args.quick))
    rows = []
    for (impl, layout, settings, path, cmd), res in zip(cases, results):
        r = summarize(res)
        rows.append({"loader": impl, "layout": layout, "settings": settings,
                     "cells_per_s": round(r["cells_per_s"]), "runs": r["runs"],
                     "cells_per_cpu_s": (round(r["cells_per_cpu_s"]) if "cells_per_cpu_s" in r
                                         else None),
                     "first_batch_s": round(r["first_batch_s"], 2),
                     "peak_rss_mib": round(r["peak_rss_mib"]),
                     "rss_after_import_mib": (round(r["import_rss_mib"]) if "import_rss_mib" in r
                                              else None),
                     "peak_anon_mib": round(r["peak_anon_mib"]) if "peak_anon_mib" in r else None,
                     "distinct_stretches": round(r["distinct_stretches"], 1),
                     "h2d_gb_per_s": round(r["h2d_gb_per_s"], 2) if "h2d_gb_per_s" in r else None,
                     "disk_bytes_per_cell": round(disk_bytes(path) / args.cells)})
        print(f"{impl:22s} {layout:22s} {settings:28s} {rows[-1]['cells_per_s']:>9,} cells/s",
              file=sys.stderr)
    best_ab = max((r["cells_per_s"] for r in rows if r["loader"].startswith("annbatch")
                   and r["layout"].startswith("annbatch")), default=None)
    for r in rows:
        r["x_annbatch"] = round(r["cells_per_s"] / best_ab, 2) if best_ab else None
    # cost of the crc32c checks: 1 - verified / unverified speed, in wall time and, less
    # sensitive to other jobs on the machine, per CPU-second
    by = {(r["layout"], r["settings"]): r for r in rows}
    verify_cost = {}
    for t in (1, 2):
        on, off = by.get(("txfm none", f"threads={t}")), by.get(("txfm none",
                                                                f"threads={t} verify=off"))
        if on and off:
            verify_cost[f"threads={t}"] = {
                k: f"{1 - on[k] / off[k]:.1%}" for k in ("cells_per_s", "cells_per_cpu_s")
                if on.get(k) and off.get(k)}
    ideal = ideal_distinct(args.cells, B, 1024, args.seed)
    rows.append({"loader": "ideal", "layout": "global permutation", "settings": "",
                 "distinct_stretches": round(ideal, 1)})
    extra = {"corpus": {"cells": args.cells, "genes": args.genes, "nnz_per_cell": args.nnz,
                        "batch_size": B, "source_bytes": disk_bytes(src)},
             "preparation_s": prep, "annbatch": ab_note or "measured",
             "annbatch_versions": ab_versions,
             "verify_cost": verify_cost,
             "load": os.getloadavg()}
    columns = ["loader", "layout", "settings", "cells_per_s", "x_annbatch", "runs",
               "cells_per_cpu_s",
               "first_batch_s", "peak_rss_mib", "peak_anon_mib", "rss_after_import_mib",
               "distinct_stretches",
               "disk_bytes_per_cell"]
    if args.device.startswith("cuda"):
        columns.insert(4, "h2d_gb_per_s")
    target = f" -> {args.device}" if args.device != "cpu" else ""
    emit(f"Loader{target}: shuffled {B}-cell batches, {args.cells:,} cells x {args.genes:,} "
         f"genes, ~{args.nnz:,} nnz/cell", rows, columns, args, args.device, extra)
    if ab_note:
        print(f"\nannbatch: {ab_note}")
    if verify_cost:
        print(f"\ncost of checking every chunk's crc32c (1 - verified / unverified): "
              f"{verify_cost}")
    print(f"\nload average during the run: {os.getloadavg()}; preparation: {prep}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
