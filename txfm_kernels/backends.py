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


OPS = ("poisson", "tokens", "sample")


def available_backends(op: str | None = None) -> dict[str, BackendInfo]:
    """Every backend with whether it is usable here and why (not).

    ``op`` (``"poisson"``, ``"tokens"``, ``"sample"``) asks about that op's native libraries;
    without it a native backend counts as available when every op's library is.

    >>> {k: v.available for k, v in available_backends().items()}  # doctest: +SKIP
    {'triton': False, 'cuda': False, 'cpu': True, 'torch': True}
    """
    ops = OPS if op is None else (op,)
    t_ok, t_dev, t_detail = _triton_status()
    out = {"triton": BackendInfo("triton", t_ok, t_dev, t_detail)}
    for kind, loader in (("cuda", _native.cuda_library), ("cpu", _native.cpu_library)):
        found = [(o,) + loader(o) for o in ops]
        missing = [f"{o}: {detail}" for o, lib, detail in found if lib is None]
        ok = not missing
        detail = found[0][2] if ok else "; ".join(missing)
        if kind == "cuda" and ok and not torch.cuda.is_available():
            ok, detail = False, f"{detail}; but this torch build sees no GPU"
        out[kind] = BackendInfo(kind, ok, (kind,) if ok else (), detail)
    out["torch"] = BackendInfo("torch", True, ("cpu", "cuda"), f"eager PyTorch {torch.__version__}")
    return {k: out[k] for k in ("triton", "cuda", "cpu", "torch")}


def resolve_backend(backend: str, device: torch.device, op: str,
                    gpu_order: tuple[str, ...] = ("cuda", "triton")) -> str:
    """Turn ``backend`` into a concrete one for op's tensors on ``device`` or raise saying why not.

    ``op`` is one of :data:`OPS`; ``gpu_order`` is its preference among GPU backends for "auto".
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    infos = available_backends(op)
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
