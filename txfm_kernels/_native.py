"""Loading of the two native libraries (C ABI, called through ctypes).

Each op has its own pair, built by ``setup.py``: ``_cpu_<op>*.so`` (C++/OpenMP) and
``libtxfm_cuda_<op>.so`` (CUDA). Neither depends on torch's C++ ABI: they take raw pointers, sizes and
(for CUDA) a ``cudaStream_t``, so one build works with every torch version. ctypes releases
the GIL for the duration of each call.

Set ``TXFM_DISABLE_NATIVE=cpu,cuda`` (either or both) to ignore a built library, e.g. to
compare against the Triton/PyTorch paths.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_REBUILD = "reinstall with `pip install -e .` (see setup.py for TXFM_BUILD_CPU / TXFM_BUILD_CUDA)"


def _disabled(kind: str) -> bool:
    raw = os.environ.get("TXFM_DISABLE_NATIVE", "")
    return kind in {p.strip().lower() for p in raw.split(",")}


@functools.lru_cache(maxsize=None)
def cpu_library(op: str) -> tuple[ctypes.CDLL | None, str]:
    """``(library, detail)`` of op's C++ kernels; library is None when unavailable, detail says why."""
    if _disabled("cpu"):
        return None, "disabled by TXFM_DISABLE_NATIVE"
    paths = sorted(glob.glob(os.path.join(_HERE, f"_cpu_{op}.*so")))
    if not paths:
        return None, f"C++ CPU library of {op} not built; {_REBUILD}"
    try:
        lib = ctypes.CDLL(paths[0])
    except OSError as exc:
        return None, f"C++ CPU library of {op} failed to load ({exc}); {_REBUILD}"
    isa = {2: "AVX-512", 1: "AVX2+FMA", 0: "portable"}[lib.txfm_cpu_isa_level()]
    return lib, f"C++/OpenMP, {isa}, {lib.txfm_cpu_max_threads()} threads"


@functools.lru_cache(maxsize=None)
def cuda_library(op: str) -> tuple[ctypes.CDLL | None, str]:
    """``(library, detail)`` of op's CUDA kernels; None when not built or no GPU is present."""
    if _disabled("cuda"):
        return None, "disabled by TXFM_DISABLE_NATIVE"
    path = os.path.join(_HERE, f"libtxfm_cuda_{op}.so")
    if not os.path.exists(path):
        return None, f"CUDA library of {op} not built (needs nvcc at install time); {_REBUILD}"
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        return None, f"CUDA library of {op} failed to load ({exc})"
    lib.txfm_cuda_error_string.restype = ctypes.c_char_p
    count = ctypes.c_int(0)
    err = lib.txfm_cuda_device_count(ctypes.byref(count))
    if count.value == 0:
        why = lib.txfm_cuda_error_string(err).decode()
        return None, f"CUDA library built but no usable GPU ({why})"
    return lib, f"CUDA runtime {lib.txfm_cuda_runtime_version()}, {count.value} device(s)"


def built_ops() -> dict[str, set[str]]:
    """Which native libraries exist on disk: ``{"cpu": {ops}, "cuda": {ops}}``."""
    names = os.listdir(_HERE)
    return {"cpu": {n[len("_cpu_"):].split(".")[0] for n in names if n.startswith("_cpu_") and n.endswith(".so")},
            "cuda": {n[len("libtxfm_cuda_"):-3] for n in names if n.startswith("libtxfm_cuda_") and n.endswith(".so")}}


def bind(lib: ctypes.CDLL, name: str, argtypes: list) -> ctypes._CFuncPtr:
    """Declare a C entry point (all of ours return an int status)."""
    fn = getattr(lib, name)
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def cuda_stream(device: torch.device) -> ctypes.c_void_p:
    """The current torch stream of ``device`` as a ``cudaStream_t``."""
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


def check_cpu(status: int, op: str) -> None:
    if status == 1:
        raise RuntimeError(f"{op}: internal error, the C++ kernel rejected its arguments")
    if status != 0:
        raise ValueError(f"{op}: the C++ kernel found invalid input data (status {status})")


def check_cuda(code: int, op: str, lib: ctypes.CDLL) -> None:
    if code != 0:
        msg = lib.txfm_cuda_error_string(code).decode()
        raise RuntimeError(f"{op}: CUDA kernel failed: {msg} (cudaError {code})")
