"""Reuse of large CPU output buffers between calls (``TXFM_CPU_POOL=0`` turns it off).

A fresh ``[B, G]`` output on the CPU is dominated by the kernel's first-touch page faults:
at 256 x 44,349 fp32 (45 MB), ``z + x`` into a fresh tensor takes 15 ms on a 2-core VM and
3.3 ms into an existing one. PyTorch's CPU allocator returns such blocks to the OS on free, so
every training step pays the faults again. The ops therefore take their big CPU outputs (the
Poisson gradient, the sampler's dense target) from this small pool: a buffer is handed out
again only when nothing but the pool references its storage any more (the previous caller
dropped every tensor and view of it, and autograd freed its graph), so a result is never
overwritten while still in use. A buffer whose storage went to shared memory (a result a
DataLoader worker sent to the main process) leaves the pool, as its reader is in another
process and cannot be counted. The pool keeps at most ``_PER_KEY`` buffers per
(shape, dtype) and ``_KEYS`` shapes, i.e. one or two outputs' worth of memory per shape.
CUDA tensors never come from here: the caching allocator already reuses device memory.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch

_MIN_BYTES = 8 << 20  # smaller buffers fault in faster than the bookkeeping pays off
_PER_KEY = 2
_KEYS = 4
_lock = threading.Lock()
_pool: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _enabled() -> bool:
    return os.environ.get("TXFM_CPU_POOL", "1") != "0" and hasattr(torch._C, "_storage_Use_Count")


# Use count of a storage that only its owning tensor references (the probe's own storage
# wrapper adds one reference; measured rather than assumed).
_FREE = _use_count(torch.empty(1)) if hasattr(torch._C, "_storage_Use_Count") else -1


def _alias(buf: torch.Tensor) -> torch.Tensor:
    """A new tensor (not a view) on ``buf``'s storage, so that the pool can count its users."""
    out = torch.empty(0, dtype=buf.dtype)
    with torch.no_grad():
        out.set_(buf.untyped_storage(), 0, buf.shape, buf.stride())
    return out


def cpu_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Like ``torch.empty(shape, dtype=dtype)`` on the CPU, reusing a free pooled buffer."""
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    if numel * torch.empty((), dtype=dtype).element_size() < _MIN_BYTES or not _enabled():
        return torch.empty(shape, dtype=dtype)
    key = (shape, dtype)
    with _lock:
        bufs = _pool.get(key)
        if bufs is not None:
            _pool.move_to_end(key)
            for buf in list(bufs):
                if buf.is_shared():
                    # sent to another process (a DataLoader worker's queue moves a result
                    # into shared memory), which may still read it: never hand it out again
                    bufs.remove(buf)
                elif _use_count(buf) == _FREE:
                    return _alias(buf)
        buf = torch.empty(shape, dtype=dtype)
        if bufs is None:
            bufs = _pool[key] = []
            while len(_pool) > _KEYS:
                _pool.popitem(last=False)
        if len(bufs) >= _PER_KEY:
            return buf  # every pooled buffer of this shape is in use: a plain fresh one
        bufs.append(buf)
        return _alias(buf)


def clear() -> None:
    """Drop every pooled buffer (memory of buffers still in use is freed with their last user)."""
    with _lock:
        _pool.clear()
