"""Triton helpers shared by the ops' kernels (imported only where Triton is installed)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_bf16(v):
    """fp32 -> bf16 rounded to nearest even by bit arithmetic, as the GPU's conversion does (the
    interpreter's cast truncates, so a kernel tested on CPU would round differently); NaN stays
    NaN."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(v != v, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
