"""One writer per output folder: ``txfm data convert`` into a shards folder and ``txfm train``
into a run folder each hold a lock there while they write, so a second command aimed at the
same folder fails at once instead of interleaving its files with the first one's."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


class FolderBusyError(FileExistsError):
    """Another process holds the folder's lock; the message names the folder and the holder."""


def _holder(fd: int) -> str:
    """What the lock's holder wrote into the lock file (``"pid N"``)."""
    return os.read(fd, 100).decode(errors="replace").strip() or "another process"


@contextlib.contextmanager
def folder_lock(folder: Path, name: str, what: str):
    """Hold an exclusive lock on the existing ``folder`` (lock file ``folder/name``) for the
    ``with`` block. ``flock`` locks die with their process, so a killed writer never leaves a
    stale lock; the lock file is removed at the end (a waiter that locked the removed file
    notices the swap and retries).

    Raises:
        FolderBusyError: another ``what`` (e.g. "conversion") holds the lock now.
    """
    path = Path(folder) / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderBusyError(f"--out {folder} is being written by another {what} "
                                  f"({holder}); wait for it to finish or choose another "
                                  f"--out") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a lock file that its holder removed meanwhile: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def lock_holder(folder: Path, name: str) -> str | None:
    """Who holds ``folder/name``'s lock now (``"pid N"``), or None when nobody does. Only looks:
    a lock file with no holder is left as it is, and none is created."""
    try:
        fd = os.open(Path(folder) / name, os.O_RDONLY)
    except OSError:
        return None
    try:
        # a shared lock conflicts only with a writer's exclusive one
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
