"""Which implementation runs an op: ``backend="auto" | "triton" | "cuda" | "cpu" | "torch"``.

=========  ==========================================  ======================================
backend    runs on                                      needs
=========  ==========================================  ======================================
triton     CUDA tensors; CPU tensors under              ``pip install triton``; for CPU
           ``TRITON_INTERPRET=1`` (tests only, slow)    tensors ``TRITON_INTERPRET=1`` set
                                                        before txfm_kernels is imported
cuda       CUDA tensors                                 ``libtxfm_cuda.so`` (nvcc at install)
cpu        CPU tensors                                  ``_cpu*.so`` (a C++ compiler at install)
torch      anything                                     nothing: eager PyTorch reference
auto       best available for the tensors' device      CUDA: cuda, then triton, then torch;
                                                        CPU: cpu, then torch
=========  ==========================================  ======================================
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from . import _native

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")


@dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can run here, and on which devices; ``detail`` says why or why not."""

    name: str
    available: bool
    devices: tuple[str, ...]
    detail: str


def _triton_status() -> tuple[bool, tuple[str, ...], str]:
    if importlib.util.find_spec("triton") is None:
        return False, (), "triton is not installed: `pip install triton` (or txfm[triton])"
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        devices.append("cpu")
    if not devices:
        return False, (), ("triton is installed but there is no CUDA GPU; on CPU tensors it only "
                           "runs under TRITON_INTERPRET=1 (set before importing txfm_kernels)")
    import triton

    return True, tuple(devices), f"triton {triton.__version__} on {', '.join(devices)}" + (
        " (interpreter)" if "cpu" in devices else "")


def available_backends() -> dict[str, BackendInfo]:
    """Every backend with whether it is usable here and why (not).

    >>> {k: v.available for k, v in available_backends().items()}  # doctest: +SKIP
    {'triton': False, 'cuda': False, 'cpu': True, 'torch': True}
    """
    cpu_lib, cpu_detail = _native.cpu_library()
    cuda_lib, cuda_detail = _native.cuda_library()
    t_ok, t_dev, t_detail = _triton_status()
    cuda_ok = cuda_lib is not None and torch.cuda.is_available()
    if cuda_lib is not None and not torch.cuda.is_available():
        cuda_detail = f"{cuda_detail}; but this torch build sees no GPU (torch.cuda.is_available() is False)"
    return {
        "triton": BackendInfo("triton", t_ok, t_dev, t_detail),
        "cuda": BackendInfo("cuda", cuda_ok, ("cuda",) if cuda_ok else (), cuda_detail),
        "cpu": BackendInfo("cpu", cpu_lib is not None, ("cpu",) if cpu_lib else (), cpu_detail),
        "torch": BackendInfo("torch", True, ("cpu", "cuda"), f"eager PyTorch {torch.__version__}"),
    }


def resolve_backend(backend: str, device: torch.device, op: str,
                    gpu_order: tuple[str, ...] = ("cuda", "triton")) -> str:
    """Turn ``backend`` into a concrete one for tensors on ``device`` or raise saying why not.

    ``gpu_order`` is the op's preference among the GPU backends for ``"auto"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    infos = available_backends()
    kind = torch.device(device).type
    if backend == "auto":
        order = gpu_order + ("torch",) if kind == "cuda" else ("cpu", "torch")
        for name in order:
            if infos[name].available and kind in infos[name].devices:
                return name
        return "torch"
    info = infos[backend]
    if not info.available:
        raise RuntimeError(f"{op}: backend={backend!r} is not available: {info.detail}")
    if kind not in info.devices:
        raise RuntimeError(f"{op}: backend={backend!r} runs on {', '.join(info.devices)} tensors, "
                           f"got tensors on {kind}; move them or use backend='auto'")
    return backend
