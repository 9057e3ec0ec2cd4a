"""annbatch side of ``bench.loader``: runs under Python >= 3.12 in its own venv (no torch).

    python bench/_annbatch_worker.py write SRC.h5ad OUT.zarr
    python bench/_annbatch_worker.py read COLLECTION.zarr --batch-size 1024 --chunk-size 512 \
        --preload-nchunks 32 --batches 150 --warmup 3 [--no-zarrs]

``write`` builds annbatch's own pre-shuffled collection with its defaults (64-row inner
chunks, ~1 GB shards, blosc-lz4), only splitting it into ~1 GB datasets instead of 20 GB so
that the shuffle fits in the shared machine's memory (the split does not change the layout
the loader reads). ``read`` times shuffled batches through ``annbatch.Loader`` (the zarrs
codec pipeline unless ``--no-zarrs``) and prints one JSON line: cells/s, peak RSS and the
shuffle metric of ``bench.loader`` (distinct 1,024-row stretches of the original order per
batch, from ``obs['orig']``).
"""
from __future__ import annotations

import argparse
import json
import resource
import time


def _zarrs(enabled: bool) -> None:
    import zarr

    if enabled:
        zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})


def write(src: str, out: str, zarrs: bool) -> None:
    import annbatch
    import numpy as np

    _zarrs(zarrs)
    t0 = time.perf_counter()
    col = annbatch.DatasetCollection(out)
    col.add_adatas([src], dataset_size="1GB", rng=np.random.default_rng(0))
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def _anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _endless(loader):
    """Batches of fresh passes over ``loader``: a small corpus runs out during the warm-up or
    the timed batches (as in bench.loader; this file runs in annbatch's own venv)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("annbatch gave no batch in a whole pass: fewer cells than "
                               "--batch-size")


def read(path: str, args) -> None:
    import annbatch
    import numpy as np

    _zarrs(not args.no_zarrs)
    t_open = time.perf_counter()
    col = annbatch.DatasetCollection(path, mode="r")
    loader = annbatch.Loader(chunk_size=args.chunk_size, preload_nchunks=args.preload_nchunks,
                             batch_size=args.batch_size, shuffle=True, drop_last=True,
                             preload_to_gpu=False, rng=np.random.default_rng(args.seed))
    loader.use_collection(col)
    it = _endless(loader)
    next(it)
    first = time.perf_counter() - t_open
    for _ in range(args.warmup):
        next(it)
    distinct = []
    n, anon = 0, 0.0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    t0, c0 = time.perf_counter(), ru.ru_utime + ru.ru_stime
    for _ in range(args.batches):
        batch = next(it)
        x = batch["X"]
        n += x.shape[0]
        orig = batch["obs"]["orig"].to_numpy()
        distinct.append(np.unique(orig // args.stretch).size)
        anon = max(anon, _anon_mib())
    dt = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru.ru_utime + ru.ru_stime - c0
    print(json.dumps({"cells_per_s": n / dt, "seconds": dt, "batches": args.batches,
                      "cells_per_cpu_s": n / cpu,
                      "first_batch_s": first,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_anon_mib": anon,
                      "distinct_stretches": float(np.mean(distinct)),
                      "nnz_per_cell": float(x.nnz / x.shape[0]),
                      "dtype": str(x.dtype)}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["write", "read"])
    p.add_argument("path")
    p.add_argument("out", nargs="?")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--preload-nchunks", type=int, default=32)
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--stretch", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-zarrs", action="store_true")
    args = p.parse_args()
    if args.mode == "write":
        write(args.path, args.out, not args.no_zarrs)
    else:
        read(args.path, args)


if __name__ == "__main__":
    main()
