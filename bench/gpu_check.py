"""``python -m bench.gpu_check``: on a GPU machine, validate and time every backend in one go.

1. prints which backends can run (``txfm_kernels.info``);
2. runs the GPU tests (``pytest -m gpu tests``): cuda and triton backends vs the references;
3. runs every kernel benchmark on ``cuda`` and the trainer benchmark for the S and B presets,
   writing one JSON per benchmark into ``--out``.

Build first with the CUDA kernels for your GPU, e.g.
``TXFM_CUDA_ARCHS=90 pip install -e . --no-build-isolation`` on an H100.
"""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import time

from txfm.cli import ArgumentParser, run_piped, run_stoppable

BENCHES = {
    "poisson": [],
    "tokens": [],
    "sample": [],
    "train": ["--preset", "S", "--preset", "B"],
}


def run(cmd: list[str], log) -> int:
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout, flush=True)
    log.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n[exit {proc.returncode}, {time.time() - t0:.0f} s]\n\n")
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/out/gpu"))
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--only", default=",".join(BENCHES),
                        help=f"comma-separated subset of {','.join(BENCHES)} (or 'none')")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    args = parser.parse_args(argv)
    only = [n for n in args.only.split(",") if n and n != "none"]
    unknown = [n for n in only if n not in BENCHES]
    if unknown:
        parser.error(f"--only {args.only}: unknown {', '.join(unknown)}; choose from "
                     f"{','.join(BENCHES)} (or 'none')")

    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible to torch: this command is for GPU machines",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    failures = []
    with open(args.out / "gpu_check.log", "w") as log:
        run([sys.executable, "-m", "txfm_kernels.info"], log)
        if not args.skip_tests:
            if run([sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider"], log):
                failures.append("gpu tests")
        for name in only:
            cmd = [sys.executable, "-m", f"bench.{name}", "--device", "cuda",
                   "--json", str(args.out / f"{name}.json")] + BENCHES[name]
            if args.quick:
                cmd.append("--quick")
            if run(cmd, log):
                failures.append(f"bench.{name}")
    print(f"\nresults in {args.out}; " + (f"FAILED: {', '.join(failures)}" if failures else "all passed"))
    return 1 if failures else 0


def _stoppable() -> int:
    """``main`` where Ctrl-C and SIGTERM end it with one line and 130 / 143, not a traceback;
    the benchmarks that finished have their JSON files, each whole."""
    return run_stoppable(main)


if __name__ == "__main__":
    sys.exit(run_piped(_stoppable))
