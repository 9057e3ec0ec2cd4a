"""Running a command under ``torchrun`` from a test (shared by the distributed tests)."""
import os
import signal
import subprocess
import sys

import pytest


def torchrun(args: list[str], *, cwd, nproc: int = 2, timeout: float = 300) -> tuple[int, str]:
    """``python -m torch.distributed.run --nproc_per_node=NPROC ARGS``: (exit status, stdout and
    stderr together). One thread per rank, a port of this test process's own. The launch gets
    its own process group, so on a timeout every rank is killed and the test fails instead of
    hanging the suite on a rank that holds the output pipes."""
    proc = start_torchrun(args, cwd=cwd, nproc=nproc)
    out, _ = finish(proc, timeout, "torchrun")
    return proc.returncode, out


def start_torchrun(args: list[str], *, cwd, nproc: int = 2) -> subprocess.Popen:
    """:func:`torchrun` started, not waited for (end it with :func:`finish`)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    port = 20000 + (os.getpid() * 7 + sum(map(ord, "".join(args)))) % 20000
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_port", str(port), *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def rank_pid(proc: subprocess.Popen, rank: int) -> int | None:
    """The pid of worker ``rank`` of a :func:`start_torchrun` launch (its ``RANK``), or None
    while it has not started."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != proc.pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(entry)
    return None


def finish(proc: subprocess.Popen, timeout: float, what: str) -> tuple[str, str]:
    """``proc.communicate()``; on a timeout, kill the process group that ``proc`` leads
    (``start_new_session=True``) and fail the test with the end of its output."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{what} did not finish in {timeout:.0f} s:\n{(out or err or '')[-3000:]}")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reader_gone(argv: list[str], *, cwd=REPO, timeout: float = 300) -> tuple[int, str]:
    """``python ARGV | head -0`` at its most abrupt: the reader of the command's stdout has
    exited before the command writes anything. Returns (exit status, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    proc.stdout.close()
    _, err = finish(proc, timeout, f"python {' '.join(argv)}")
    return proc.returncode, err
