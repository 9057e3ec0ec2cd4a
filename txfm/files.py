"""File-system steps every command shares: writing a file whole or not at all, and taking back
the folders a failed call made. Nothing here imports a heavy module."""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

# write_atomic's temporary name: "." + stem + ".tmp" + pid + suffix
_TEMPORARY = re.compile(r"\.(?P<stem>.+)\.tmp\d+(?P<suffix>\.[^.]+)?")


def write_atomic(path, write: Callable[[Path], None], *, durable: bool = False) -> None:
    """``write(tmp)`` fills a temporary file next to ``path`` (``tmp`` is its path), which is
    then renamed onto ``path``: a crash, Ctrl-C or signal leaves the old file or the new one,
    never half of either, and no temporary file.

    ``tmp`` is hidden (a leading dot) and ends with ``path``'s suffix, so writers that choose
    the format by the extension (``savefig``, ``np.savez``) write the right one. ``durable``:
    the file's bytes reach the disk before the rename (``fsync``), so that after a power loss
    ``path`` is not a renamed file whose data never landed (checkpoints).

    Raises whatever ``write`` or the rename raises, after removing the temporary file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # see _TEMPORARY
    try:
        write(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_target(name: str) -> str | None:
    """The file name a temporary file of :func:`write_atomic` was to become (one that a
    process killed mid-write, ``SIGKILL`` or power loss, leaves behind), or None for any other
    name: so that a folder's owner knows the leftover for its own."""
    m = _TEMPORARY.fullmatch(name)
    return None if m is None else m["stem"] + (m["suffix"] or "")


def missing_folders(path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, innermost first: the folders
    that making ``path`` creates (for :func:`remove_made_folders`)."""
    path = Path(path)
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_made_folders(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (:func:`missing_folders`' list, innermost first) while they are
    empty: a call that failed takes back the folders it made, and never one that another
    writer filled meanwhile."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break
