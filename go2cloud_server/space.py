"""Room on the target: the control plane keeps answering when the image store is full.

Two places hold what the server writes: the **data directory** (``serve --data-dir``: the
database, TLS identity, admin token, rsync session state) and the **target directory**
(``serve --target-dir``, default the data directory: ``tasks/<task>/`` with the file trees and
block images). Images grow with the sources; the database must stay writable whatever they do,
or heartbeats, acknowledgements and every operator command fail while the images fill the disk.

* Own filesystems (``--target-dir`` on another filesystem than ``--data-dir``): a full image
  store cannot touch the database. Nothing more is needed; this is the recommended layout.
* One filesystem (the default): a **reserve file** (``<data-dir>/db-reserve``, ``serve
  --db-reserve``, default 64 MiB, allocated with ``fallocate`` at start) holds room for the
  database. When the images run the filesystem out of space (a block write or an rsync session
  fails with ENOSPC, or SQLite itself reports the disk full) the reserve is deleted, and the
  database writes into the room it held. While the reserve is released, no data write is
  admitted (block requests and new rsync sessions are answered ``507 target_full``), so the
  images cannot take that room back; the reserve is allocated again as soon as the filesystem
  has room for it plus a margin, and only then do data writes resume.

:class:`SpaceGuard` owns that rule; :func:`usage` and :func:`describe` say how full a
filesystem is in the words the operator reads (``migration show``, events, the agent's error).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from go2cloud_server.rules import DB_RESERVE_MIB

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: default size of the database's reserve on a filesystem shared with images (defined in rules:
#: ``serve --help`` shows it)
DEFAULT_RESERVE_MIB = DB_RESERVE_MIB
#: room beyond the reserve the filesystem must have before data writes resume (so the first
#: chunk does not fill it again at once)
RESUME_MARGIN = 8 * MiB
RESERVE_NAME = "db-reserve"
_NOSPACE = (errno.ENOSPC, errno.EDQUOT)
_SQLITE_FULL = 13


@dataclass(frozen=True)
class FsSpace:
    """How full the filesystem holding ``path`` is (bytes usable by the server's user)."""

    path: str
    mount_point: str
    fstype: str
    free: int
    total: int

    def describe(self) -> str:
        return (f"{human(self.free)} free of {human(self.total)} on {self.fstype or 'the'} filesystem "
                f"mounted at {self.mount_point} (holding {self.path})")


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _existing(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _mount_of(path: Path) -> tuple:
    """(mount point, filesystem type) of ``path``, from /proc/self/mounts (the longest match)."""
    best, fstype = "/", ""
    target = str(path)
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mp = fields[1].replace("\\040", " ")
                if (target == mp or target.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                    best, fstype = mp, fields[2]
    except OSError:
        pass
    return best, fstype


def usage(path: Path) -> FsSpace:
    p = _existing(path)
    st = os.statvfs(p)
    mount_point, fstype = _mount_of(p.resolve())
    return FsSpace(path=str(path), mount_point=mount_point, fstype=fstype,
                   free=st.f_bavail * st.f_frsize, total=st.f_blocks * st.f_frsize)


def describe(path: Path) -> str:
    try:
        return usage(path).describe()
    except OSError as exc:
        return f"free space of {path} unknown ({exc.strerror or exc})"


def same_filesystem(a: Path, b: Path) -> bool:
    return os.stat(_existing(a)).st_dev == os.stat(_existing(b)).st_dev


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised while handling: a failed ROLLBACK after SQLite
    rolled back on its own) is SQLite's "database or disk is full" or an ENOSPC/EDQUOT."""
    seen = 0
    cur: Optional[BaseException] = exc
    while cur is not None and seen < 5:
        if isinstance(cur, sqlite3.Error):
            if getattr(cur, "sqlite_errorcode", None) == _SQLITE_FULL or "disk is full" in str(cur):
                return True
        if isinstance(cur, OSError) and cur.errno in _NOSPACE:
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


class SpaceGuard:
    """Keeps the database writable when images fill the filesystem (see the module docstring).

    ``data_dir`` holds the database; ``target_dir`` the images. ``reserve_bytes`` is the size of
    the reserve file, used only when both are on one filesystem (0: no reserve)."""

    def __init__(self, data_dir: Path, target_dir: Path,
                 reserve_bytes: int = DEFAULT_RESERVE_MIB * MiB) -> None:
        self.data_dir = Path(data_dir)
        self.target_dir = Path(target_dir)
        self.shared = same_filesystem(self.data_dir, self.target_dir)
        self.reserve_bytes = reserve_bytes if self.shared else 0
        self.reserve_path = self.data_dir / RESERVE_NAME
        self._lock = threading.Lock()
        self._held = False

    # the reserve --------------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        """True when data writes may go on: no reserve is needed, or it is in place."""
        return self.reserve_bytes == 0 or self._held

    def ensure(self) -> bool:
        """Allocate the reserve if it is not in place and the filesystem has room for it plus
        :data:`RESUME_MARGIN`; True when it is in place (or none is needed). Cheap when held."""
        if self.reserve_bytes == 0:
            if self.reserve_path.exists():  # a reserve of an earlier layout: not needed now
                self.reserve_path.unlink()
            return True
        with self._lock:
            if self._held:
                return True
            have = self.reserve_path.stat().st_size if self.reserve_path.exists() else 0
            missing = self.reserve_bytes - have
            if missing > 0:
                if usage(self.data_dir).free < missing + RESUME_MARGIN:
                    return False
                fd = os.open(str(self.reserve_path), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    os.posix_fallocate(fd, 0, self.reserve_bytes)
                    os.fsync(fd)
                except OSError as exc:
                    if exc.errno not in _NOSPACE:
                        raise
                    os.close(fd)
                    fd = -1
                    self.reserve_path.unlink()
                    return False
                finally:
                    if fd >= 0:
                        os.close(fd)
            self._held = True
            log.info("database reserve in place: %s (%s)", self.reserve_path, human(self.reserve_bytes))
            return True

    def release(self, why: str) -> bool:
        """Delete the reserve (the database writes into its room); True if it was held."""
        with self._lock:
            if self.reserve_bytes == 0 or not self._held:
                return False
            self._held = False
            try:
                self.reserve_path.unlink()
            except FileNotFoundError:
                pass
        log.warning("the target filesystem is full (%s): database reserve %s released (%s); data "
                    "writes are refused until there is room for it again", why, self.reserve_path,
                    human(self.reserve_bytes))
        return True

    # admission ----------------------------------------------------------------------------------
    def target_space(self) -> FsSpace:
        return usage(self.target_dir)

    def refusal(self) -> Optional[str]:
        """Why no data write may start now (the reserve is released and there is still no room to
        allocate it again), or None."""
        if self.held or self.ensure():
            return None
        return (f"the target is full: {describe(self.target_dir)}; the server keeps "
                f"{human(self.reserve_bytes)} of it for its database, and data writes resume once "
                f"{human(self.reserve_bytes + RESUME_MARGIN)} are free")
