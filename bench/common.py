"""Shared benchmark harness: timing, peak memory, machine description, tables and files.

Times are medians over repetitions after warm-up, synchronising CUDA around each call.
Peak *extra* memory is what a call allocates beyond its inputs: on CUDA from the caching
allocator's peak, on CPU from the process' peak RSS (reset through ``/proc/self/clear_refs``;
torch's CPU allocator returns large blocks to the OS, so this sees every large buffer).
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

# Keep inductor's cache inside the checkout so warm compiles are fast and nothing leaks out.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parent.parent / ".cache" / "inductor"))


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", type=pathlib.Path, help="write rows + machine info as JSON")
    parser.add_argument("--csv", type=pathlib.Path, help="write rows as CSV")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    parser.add_argument("--quick", action="store_true",
                        help="smallest cases, few repetitions (a smoke test, not a measurement)")
    return parser


def select_impls(impls, wanted: str | None):
    """Keep the implementations named in ``--impls`` (comma-separated); list or dict in, same out."""
    if not wanted:
        return impls
    names = wanted.split(",")
    unknown = [w for w in names if w not in impls]
    if unknown:
        raise SystemExit(f"--impls: {unknown} not available here; choose from {list(impls)}")
    if isinstance(impls, dict):
        return {k: v for k, v in impls.items() if k in names}
    return [i for i in impls if i in names]


def check_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible to torch")


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
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
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
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, cwd=pathlib.Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    return info


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
    """Print the table and machine line; write JSON/CSV when asked."""
    info = machine_info(device)
    print(f"\n## {name}\n")
    print(format_table(rows, columns))
    desc = info.get("gpu") or info["cpu"]
    print(f"\n{desc}; torch {info['torch']}; triton {info['triton']}; python {info['python']}; "
          f"{info['torch_threads']} threads; command: {command_line()}")
    payload = {"benchmark": name, "command": command_line(), "machine": info, "rows": rows, **(extra or {})}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
