"""Device names, and whether a named device exists on this machine: the one check behind
every device argument (``--device`` of the commands, ``device=`` of the Python API and
:class:`txfm.train.TrainConfig`, ``map_location=`` of the checkpoint readers); each caller
words the error for its own argument."""
from __future__ import annotations

import re
import sys

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
# ASCII digits without leading zeros: what torch.device parses ("cuda:01" and "cuda:٣" it
# refuses); cpu:0 is the CPU, as torch.device takes it
_NAME = re.compile(r"cpu(:0)?|cuda(:(0|[1-9][0-9]*))?", re.ASCII)


def parse_device(name) -> "torch.device | None":
    """``name`` (a ``str`` or ``torch.device``) as a CPU or CUDA ``torch.device``, or None when
    it is neither (``auto``, another device type, a malformed name). Reads no hardware."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(name, torch.device):
        return name if name.type in ("cpu", "cuda") else None
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        return None
    import torch  # here, not at the top: option parsing and --help need no torch

    device = torch.device(name)
    return torch.device("cpu") if device.type == "cpu" else device


def device_problem(device: "torch.device") -> str | None:
    """Why ``device`` cannot be used here (a CUDA device this machine lacks), or None.
    Checks availability only, never allocates; other device types are left to torch."""
    if device.type != "cuda":
        return None
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return f"CUDA is not available here (torch {torch.__version__})"
    if device.index is not None and device.index >= count:
        return f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None
