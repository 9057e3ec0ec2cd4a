"""Which implementation runs an op: ``backend="auto" | "triton" | "cuda" | "cpu" | "torch"``.

=========  ==========================================  ======================================
backend    runs on                                      needs
=========  ==========================================  ======================================
triton     CUDA tensors; CPU tensors under              ``pip install triton``; for CPU
           ``TRITON_INTERPRET=1`` (tests only, slow)    tensors ``TRITON_INTERPRET=1`` set
                                                        before txfm_kernels is imported
cuda       CUDA tensors                                 ``libtxfm_cuda_<op>.so`` (nvcc at
                                                        install time)
cpu        CPU tensors                                  ``_cpu_<op>*.so`` (a C++ compiler at
                                                        install time)
torch      anything                                     nothing: the op's eager PyTorch
                                                        reference (``<op>/reference.py``)
auto       best available for the tensors' device      CUDA: cuda, then triton, then torch;
                                                        CPU: cpu, then torch
=========  ==========================================  ======================================

``python -m txfm_kernels.info`` prints the table for this machine. The implementation lives in
:mod:`txfm_kernels._common` with the rest of what every op shares.
"""
from ._common import BACKENDS, OPS, BackendInfo, available_backends, resolve_backend

__all__ = ["BACKENDS", "OPS", "BackendInfo", "available_backends", "resolve_backend"]
