"""``python -m txfm_kernels.info``: print which backends can run here and why (not).

``--require NAME`` exits non-zero unless backend NAME is usable; ``--require-built cuda``
only checks that the CUDA library was compiled (useful on a build machine without a GPU).
"""
from __future__ import annotations

import argparse
import os
import sys

from . import _native
from .backends import available_backends


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m txfm_kernels.info", description=__doc__)
    parser.add_argument("--require", action="append", default=[], metavar="BACKEND")
    parser.add_argument("--require-built", action="append", default=[], choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    infos = available_backends()
    for name, info in infos.items():
        mark = "yes" if info.available else "no "
        print(f"{name:7s} {mark}  {info.detail}")
    failed = [n for n in args.require if not infos[n].available]
    here = os.path.dirname(os.path.abspath(_native.__file__))
    files = os.listdir(here)
    built = {"cpu": any(f.startswith("_cpu") and f.endswith(".so") for f in files),
             "cuda": "libtxfm_cuda.so" in files}
    failed += [f"{n} (not built)" for n in args.require_built if not built[n]]
    if failed:
        print(f"required but missing: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
