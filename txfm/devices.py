"""Whether a named device exists on this machine: the one check behind every device argument
(``--device`` of the commands, ``device=`` of the Python API, ``map_location=`` of the
checkpoint readers); each caller words the error for its own argument."""
from __future__ import annotations

import torch


def device_problem(device: torch.device) -> str | None:
    """Why ``device`` cannot be used here (a CUDA device this machine lacks), or None.
    Checks availability only, never allocates; other device types are left to torch."""
    if device.type != "cuda":
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return f"CUDA is not available here (torch {torch.__version__})"
    if device.index is not None and device.index >= count:
        return f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None
