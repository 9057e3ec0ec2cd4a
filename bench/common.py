"""Shared benchmark harness: timing, peak memory, machine description, tables and files.

Times are medians over repetitions after warm-up, synchronising CUDA around each call.
Peak *extra* memory is what a call allocates beyond its inputs: on CUDA from the caching
allocator's peak, on CPU from the process' peak RSS (reset through ``/proc/self/clear_refs``).
On CPU the heap is trimmed first (glibc's ``malloc_trim``): glibc keeps freed blocks below its
mmap threshold (up to 32 MiB) resident, and a call reusing them would not raise the RSS.

Every bad option is one ``error:`` line and exit status 2, checked before any work, as in
``txfm``'s own commands; ``--quick`` refuses options that set the sizes it fixes.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable

import torch

from txfm.cli import (UsageError, exit_status, file_in_path, folder_problem, positive_int,
                      run_piped, signals_raise)
from txfm.cli import check_device as _check_device_name
from txfm.files import write_atomic
from txfm_kernels._common import device_memory



def fail(message: str):
    """A bad option: one ``error:`` line on stderr and exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_distinct(option: str, items: list, show: Callable[[Any], str] = str) -> list:
    """``fail`` when a list option names one case twice: the rows of both would share one
    group, and the speed-up columns (``x_eager``, ``x_compile``) would divide by the wrong
    reference. ``show`` writes a parsed case as the option spells it. Returns ``items``."""
    seen = set()
    for item in items:
        if item in seen:
            fail(f"{option}: {show(item)} is given twice; name each case once")
        seen.add(item)
    return items


def run(main: Callable[[], Any]) -> int:
    """Run a benchmark's ``main``; Ctrl-C ends it with exit status 130 and SIGTERM (a
    scheduler's time limit, ``kill``) with 143, each with one line instead of a traceback
    (output files are only written, whole, once every case has run; prepared inputs are
    written through temporary files), and a reader of its output that went away (``| head``)
    quietly with 141 (:func:`txfm.cli.run_piped`)."""
    def body() -> int:
        with signals_raise():
            try:
                rc = main()
                return rc if isinstance(rc, int) else 0
            except KeyboardInterrupt as exc:
                return exit_status(exc, stopped_note="no results written")
    return run_piped(body)


def _write_atomic(path: pathlib.Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file in its folder and rename it into place, so an
    interrupted write leaves the old file or none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: pathlib.Path) -> None:
        with open(tmp, "w", newline="") as f:
            write(f)

    write_atomic(path, fill)


def check_fits(nbytes: float, what: str, device: torch.device | str) -> None:
    """``fail`` (one ``error:`` line, exit 2) before any work when a case's tensors, about
    ``nbytes``, cannot fit in the device's memory (the host's RAM for CPU tensors)."""
    device = torch.device(device)
    total = device_memory(device)
    if total is not None and nbytes > total:
        fail(f"{what}: needs about {nbytes / 2**30:,.1f} GiB, more than the "
             f"{total / 2**30:,.1f} GiB of {device.type} memory here; choose smaller sizes")


def _device(text: str) -> str:
    """argparse ``type``: ``cpu``, ``cuda`` or ``cuda:N`` that this machine has."""
    try:
        name = _check_device_name("--device", text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--device {text!r}: ")
                                         .removeprefix(f"--device {text}: ")) from None
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _output_file(text: str) -> pathlib.Path:
    """argparse ``type``: a file this process can write (checked now, not after the run)."""
    path = pathlib.Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    blocking = file_in_path(path)
    problem = (f"{blocking} is a file, not a folder" if blocking is not None
               else folder_problem(path.parent))
    if problem:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return path


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", type=_device,
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--json", type=_output_file, help="write rows + machine info as JSON")
    parser.add_argument("--csv", type=_output_file, help="write rows as CSV")
    parser.add_argument("--reps", type=positive_int, default=None,
                        help="timed repetitions per case, at most: a case stops at its time "
                             "budget (after at least 3, or --reps when smaller; --quick times "
                             "2) and slow reference loops run 3; the table notes fewer, the "
                             "JSON/CSV 'reps' field has each count")
    parser.add_argument("--quick", action="store_true",
                        help="smallest cases, few repetitions (a smoke test, not a measurement); "
                             "options that set the case sizes are refused beside it")
    return parser


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      *size_options: str) -> None:
    """The checks of :func:`add_common_args`' options that need the whole command line:
    ``--json`` and ``--csv`` naming one file (the second write would replace the first), and
    ``--quick`` beside a ``size_option``, which ``--quick`` would silently ignore. Each is a
    usage error (one ``error:`` line, exit 2)."""
    if args.json is not None and args.csv is not None and (
            args.json.resolve() == args.csv.resolve()):
        parser.error(f"--json and --csv both name {args.json}; give each its own file")
    if not args.quick:
        return
    for option in size_options:
        dest = option.lstrip("-").replace("-", "_")
        if getattr(args, dest) != parser.get_default(dest):
            parser.error(f"{option} and --quick: --quick runs its own small case; drop one")


def select_impls(impls, wanted: str | None):
    """Keep the implementations named in ``--impls`` (comma-separated); list or dict in, same out."""
    if wanted is None:
        return impls
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    if not names:
        fail(f"--impls {wanted!r}: name at least one of {list(impls)} (comma-separated)")
    unknown = [w for w in names if w not in impls]
    if unknown:
        fail(f"--impls {wanted!r}: {unknown} not available here; choose from {list(impls)}")
    check_distinct("--impls", names)
    if isinstance(impls, dict):
        return {k: v for k, v in impls.items() if k in names}
    return [i for i in impls if i in names]


def check_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA GPU visible to torch")


def bench_device() -> str:
    """Device the pytest-benchmark cases run on: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def benchmark_backends(op: str, device: str) -> list[str]:
    """Our backends worth timing for ``op`` on ``device`` (the Triton interpreter is no benchmark)."""
    import txfm_kernels

    return [name for name, info in txfm_kernels.available_backends(op).items()
            if info.available and device in info.devices
            and not (name == "triton" and device == "cpu")]


def synced(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` followed by a device synchronisation, so a timer sees the whole GPU work."""
    def run():
        out = fn()
        sync(device)
        return out
    return run


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device | str, *, warmup: int = 2,
            reps: int = 10, max_seconds: float = 20.0) -> dict[str, float]:
    """Median/min/max milliseconds of ``fn()`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > max_seconds and len(times) >= 3:
            break
    return {"median_ms": statistics.median(times), "min_ms": min(times),
            "max_ms": max(times), "reps": len(times)}


def _trim_heap() -> None:
    """Return the heap's free pages to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_extra_mib(fn: Callable[[], Any], device: torch.device | str) -> float | None:
    """Peak memory ``fn()`` allocates beyond what already exists, in MiB (None if unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return (peak - base) / 2**20
    _trim_heap()  # freed blocks glibc keeps resident would hide a call that reuses them
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    base = _rss_kib("VmRSS")
    out = fn()
    peak = _rss_kib("VmHWM")
    del out
    return max(0, peak - base) / 1024


def compile_fn(fn: Callable, **kwargs) -> Callable:
    """``torch.compile`` with a fresh dynamo state so earlier cases do not trigger recompile limits."""
    torch._dynamo.reset()
    return torch.compile(fn, **kwargs)


def machine_info(device: torch.device | str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        # settings that change what runs or how fast, beside the command line
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "TXFM_CPU_POOL",
                                            "TXFM_DISABLE_NATIVE", "TRITON_INTERPRET")
                if k in os.environ},
    }
    from importlib import metadata

    for dist in ("txfm", "triton", "numpy", "scipy", "anndata", "zarr", "h5py"):
        try:  # what produced and read the data, beside torch
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["peak_bandwidth_gbs"] = gpu_peak_bandwidth_gbs(device)
    try:
        import txfm_kernels

        info["backends"] = {k: v.detail for k, v in txfm_kernels.available_backends().items()}
    except Exception as exc:  # noqa: BLE001 - informational only
        info["backends"] = repr(exc)
    try:
        here = pathlib.Path(__file__).parent
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, cwd=here).stdout.strip()
        info["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--", "."],
                                                capture_output=True, text=True,
                                                cwd=here.parent).stdout.strip())
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return info


def warn_if_loaded() -> None:
    """Say so when other jobs compete for the cores: single-threaded baselines (the sample op's
    Python loop) slow down far more than the kernels, so ratios then overstate the speed-up."""
    if not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        print(f"warning: load average {load:.1f} on {cores} cores: other jobs compete for the "
              f"CPU, and the ratios of this run are not comparable to a quiet machine's "
              f"(bench/RESULTS.md's were measured quiet)", file=sys.stderr)


# Nominal DRAM bandwidth (GB/s) by device name; achieved GB/s is reported against it.
_PEAK_BW = {"H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H200": 4800.0, "A100-SXM4-80GB": 2039.0,
            "A100-SXM4-40GB": 1555.0, "A100-PCIE-40GB": 1555.0, "L40S": 864.0, "RTX 4090": 1008.0}


def gpu_peak_bandwidth_gbs(device: torch.device | str) -> float | None:
    name = torch.cuda.get_device_properties(device).name
    for key, bw in _PEAK_BW.items():
        if key in name:
            return bw
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def add_ratios(rows: list[dict], group_keys: Iterable[str], time_key: str = "median_ms",
               impl_key: str = "impl", refs: Iterable[str] = ("eager", "compile")) -> None:
    """Add ``x_<ref>`` = ref time / this time (speed-up, >1 is faster) within each group."""
    group_keys = tuple(group_keys)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in group_keys), []).append(r)
    for members in groups.values():
        by_impl = {m[impl_key]: m for m in members}
        for ref in refs:
            base = by_impl.get(ref)
            for m in members:
                ok = base is not None and base.get(time_key) and m.get(time_key)
                m[f"x_{ref}"] = round(base[time_key] / m[time_key], 2) if ok else None


def format_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def command_line() -> str:
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([head] + sys.argv[1:])


def emit(name: str, rows: list[dict], columns: list[str], args: argparse.Namespace,
         device: torch.device | str, extra: dict | None = None) -> None:
    """Write JSON/CSV when asked, then print the table and machine line: files first, so
    that a reader of stdout that goes away (``| head``, which stops the run quietly with 141;
    each case's progress line goes to stderr) cannot cost the results."""
    info = machine_info(device)
    payload = {"benchmark": name, "command": command_line(), "machine": info, "rows": rows,
               **(extra or {})}
    if args.json:
        text = json.dumps(payload, indent=2, default=str)
        _write_atomic(args.json, lambda f: f.write(text))
    if args.csv:
        keys = list(dict.fromkeys(k for r in rows for k in r))

        def write_csv(f):
            w = csv.DictWriter(f, fieldnames=keys, lineterminator="\n")  # as pandas writes
            w.writeheader()
            w.writerows(rows)

        _write_atomic(args.csv, write_csv)
    print(f"\n## {name}\n")
    print(format_table(rows, columns))
    desc = info.get("gpu") or info["cpu"]
    env = "".join(f"{k}={v} " for k, v in info["env"].items())
    print(f"\n{desc}; torch {info['torch']}; triton {info['triton']}; python {info['python']}; "
          f"{info['torch_threads']} threads; command: {env}{command_line()}")
    asked = getattr(args, "reps", None)
    fewer = [r for r in rows if asked and isinstance(r.get("reps"), int) and r["reps"] < asked]
    if fewer:
        print(f"note: {len(fewer)} of {len(rows)} rows timed fewer than --reps {asked} "
              f"repetitions (time budget or a slow reference; as few as "
              f"{min(r['reps'] for r in fewer)}): see 'reps' in --json / --csv")
