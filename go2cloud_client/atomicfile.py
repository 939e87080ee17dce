"""Atomic file replacement for the agent's state, keys, filter files and exclusion lists: the
agent's one way to write or move a file that must survive a crash.

Temp file in the same directory (created with the final mode, so a secret is never readable by
others, not even briefly), fsync, rename over the target, fsync the directory. A crash leaves
either the old or the new content, never a mix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically: temp file in the same directory (created with
    ``mode``), fsync, rename over the target, fsync the directory. A crash leaves either the old
    or the new content, never a mix."""
    path = Path(path)
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(directory))
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def atomic_rename(src: Path, dst: Path) -> None:
    """Move ``src`` over ``dst`` (same filesystem) and fsync the directories, so that after a
    crash the file is under one name or the other, never lost. Raises OSError."""
    src, dst = Path(src), Path(dst)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if src.parent != dst.parent:
        _fsync_dir(src.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        dfd = os.open(str(directory), os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
