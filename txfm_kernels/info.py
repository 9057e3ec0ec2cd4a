"""``python -m txfm_kernels.info``: print which backends can run here and why (not).

``--require NAME`` exits non-zero unless backend NAME is usable; ``--require-built cuda``
only checks that the CUDA library was compiled (useful on a build machine without a GPU).
"""
from __future__ import annotations

import argparse
import sys

from ._common import OPS, available_backends, built_ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m txfm_kernels.info", description=__doc__)
    parser.add_argument("--require", action="append", default=[], metavar="BACKEND")
    parser.add_argument("--require-built", action="append", default=[], choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    infos = available_backends()
    unknown = [n for n in args.require if n not in infos]
    if unknown:
        parser.error(f"--require {unknown[0]!r}: not a backend; choose from {', '.join(infos)}")
    for name, info in infos.items():
        mark = "yes" if info.available else "no "
        print(f"{name:7s} {mark}  {info.detail}")
    failed = [n for n in args.require if not infos[n].available]
    built = built_ops()
    for kind in args.require_built:
        missing = [op for op in OPS if op not in built[kind]]
        failed += [f"{kind} library of {op} (not built)" for op in missing]
    if failed:
        print(f"required but missing: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # the command-line helper of the package these kernels ship in (it imports no torch)
    from txfm.cli import run_piped

    sys.exit(run_piped(main))
