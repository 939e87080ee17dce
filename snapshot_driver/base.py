"""The snapshot driver interface and its contracts.

A *volume* is what the operator wants copied: a block device (``/dev/sdb1``, ``/dev/vg0/root``)
or an image file, depending on the backend. A *snapshot* is a handle on the frozen contents of a
volume. A *backend* is one mechanism (fsfreeze, reflink, LVM, ...) that makes snapshots.

Contracts every backend keeps (the conformance suite in ``tests/snapshot`` checks them):

* Every error raised by a backend method is a :class:`SnapshotError` with a stable ``code`` and a
  ``retryable`` flag. ``retryable=False`` means "trying again on this host will fail the same
  way until the operator changes something" (tool missing, unsupported filesystem, no space);
  ``retryable=True`` means "a later attempt may succeed" (the tool failed transiently, the
  snapshot window expired, a read failed).
* A backend keeps whatever it needs to undo its work in ``workdir`` (a small JSON record written
  atomically *before* the host is changed), so :meth:`Backend.recover` can release what a crashed
  run left behind (snapshots, frozen filesystems, copies).
* Nothing here prints, exits the process, or reads configuration: the caller decides.
"""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, List, Optional

from snapshot_driver import _mounts

#: Stable error codes. Callers may switch on these; messages are for humans.
SNAPSHOT_UNSUPPORTED = "snapshot_unsupported"   # mechanism not usable here (permanent)
SNAPSHOT_FAILED = "snapshot_failed"             # the tool failed creating/releasing (retryable)
NO_SPACE = "no_space"                           # not enough space for the COW store (permanent)
TOOL_MISSING = "tool_missing"                   # the tool is not installed (permanent)
BAD_VOLUME = "bad_volume"                       # volume missing or of the wrong kind (permanent)
SNAPSHOT_EXPIRED = "snapshot_expired"           # no longer point-in-time (watchdog, overflow)
READ_FAILED = "read_failed"                     # reading the frozen contents failed (retryable)
RELEASE_FAILED = "release_failed"               # could not release (retryable; recover() later)
UNKNOWN_BACKEND = "unknown_backend"             # registry lookup of an unknown name (permanent)
BAD_TOKEN = "bad_token"                         # a token this backend did not produce (permanent)


class SnapshotError(Exception):
    """The one error type of the snapshot driver.

    ``code`` is one of the stable codes above; ``retryable`` says whether trying again without
    operator action may succeed; ``str(err)`` tells the operator what happened and what to do.
    """

    def __init__(self, message: str, *, code: str = SNAPSHOT_FAILED, retryable: bool = False,
                 backend: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.backend = backend


@dataclass(frozen=True)
class Extent:
    """A byte range of the volume: ``[offset, offset + length)``."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class ProbeResult:
    """Whether a backend can be used here, and why not (in words an operator understands,
    with what to do about it). A usable result may still carry a caveat in ``reason``."""

    usable: bool
    reason: str


def merge_extents(extents: Iterable[Extent], limit: Optional[int] = None) -> List[Extent]:
    """Sort, clip to ``[0, limit)``, drop empty, and merge overlapping or touching extents."""
    items = []
    for ext in extents:
        start, end = max(0, ext.offset), ext.offset + ext.length
        if limit is not None:
            end = min(end, limit)
        if end > start:
            items.append((start, end))
    items.sort()
    merged: List[List[int]] = []
    for s, e in items:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [Extent(s, e - s) for s, e in merged]


class Snapshot(ABC):
    """A handle on the frozen contents of one volume.

    Attributes: ``backend`` (name of the backend that made it), ``volume`` (as given to
    create()), ``size`` (bytes of frozen contents; a reader reads exactly ``[0, size)``).

    A snapshot is not thread-safe to release while reading; reading it from several threads via
    ``path()`` (each thread its own fd, pread) is fine.
    """

    backend: str
    volume: str
    size: int
    point_in_time: bool = True

    def __init__(self, backend: str, volume: str, size: int) -> None:
        self.backend = backend
        self.volume = volume
        self.size = size
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    @abstractmethod
    def path(self) -> str:
        """A path (device or file) whose first ``size`` bytes are the frozen volume.

        The reader opens it itself (O_RDONLY; pread; fadvise/O_DIRECT as it likes). Valid until
        release(); calling it after release() raises SnapshotError(code="snapshot_expired").
        Stale page cache of the path was dropped at create() where the backend can do so.
        """

    def open(self) -> BinaryIO:
        """Convenience reader of :meth:`path` (``rb``, unbuffered). The caller closes it."""
        self._check_live()
        try:
            return open(self.path(), "rb", buffering=0)
        except OSError as exc:
            raise SnapshotError(f"{self.backend}: cannot open {self.path()}: {exc.strerror}",
                                code=READ_FAILED, retryable=True, backend=self.backend) from exc

    def token(self) -> Optional[str]:
        """An opaque change-tracking position of THIS snapshot, or None if the backend cannot
        track changes. Store it after a pass committed; hand it to the next snapshot's
        :meth:`changed_since`. Tokens are plain ASCII strings, safe to persist."""
        return None

    def changed_since(self, token: Optional[str]) -> Optional[List[Extent]]:
        """Extents of this snapshot that may differ from the snapshot that produced ``token``.

        Returns None when the answer is unknown (no token, the base is gone, the mechanism
        cannot tell): the caller must then compare every chunk (hash scan). When a list is
        returned it is a superset of the truth: every byte that differs lies inside an extent
        (bytes past the old size count as changed); extents are sorted, merged,
        non-overlapping, and inside ``[0, size)``. Never raises for an unknown or stale token
        (that is None); raises SnapshotError only when the tool itself fails.
        """
        return None

    def check(self) -> None:
        """Raise SnapshotError(code="snapshot_expired", retryable=True) if the contents read so
        far may no longer be point-in-time (fsfreeze watchdog fired, LVM COW store overflowed).
        Call it after reading and before committing what was read. No-op by default."""
        self._check_live()

    @abstractmethod
    def release(self) -> None:
        """Give the snapshot back (thaw, remove the snapshot, keep what change tracking needs).

        Idempotent: a second call does nothing. Safe after recover() already released it.
        Raises SnapshotError(code="release_failed", retryable=True) if the host refused; the
        record entry is kept so a later release() or recover() tries again.
        """

    def _check_live(self) -> None:
        if self._released:
            raise SnapshotError(f"{self.backend}: snapshot of {self.volume} was already released",
                                code=SNAPSHOT_EXPIRED, retryable=True, backend=self.backend)

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Backend(ABC):
    """One snapshot mechanism.

    ``point_in_time`` says whether create() gives a consistent point-in-time copy (False only
    for ``live``). ``tracks_changes`` says whether changed_since() can return a list at all.
    """

    name: str = ""
    point_in_time: bool = True
    tracks_changes: bool = False

    @abstractmethod
    def probe(self, volume: Optional[str] = None) -> ProbeResult:
        """Can this mechanism be used on this host (and for ``volume``, when given)?

        Never raises and never changes the host; runs only read-only queries of the tool.
        """

    @abstractmethod
    def create(self, volume: str, workdir: Path) -> Snapshot:
        """Make a snapshot of ``volume``.

        ``workdir`` is a directory owned by the caller, kept between runs, where the backend
        keeps its record (and may keep copies). It must not be on the volume being frozen.
        On failure nothing is left behind (or it is in the record for recover()).
        Raises SnapshotError: ``bad_volume``/``snapshot_unsupported``/``tool_missing``/
        ``no_space`` (permanent) or ``snapshot_failed`` (retryable).
        """

    @abstractmethod
    def recover(self, workdir: Path) -> List[str]:
        """Release what a crashed run of this backend left behind, as recorded in ``workdir``:
        unreleased snapshots, frozen filesystems, partial copies. Keeps change-tracking bases.
        Returns a description of each thing released. Idempotent; a no-op on an empty workdir.
        """

    def purge(self, workdir: Path) -> List[str]:
        """recover() plus everything kept for change tracking (bases, tracking devices): what
        an abort of the migration calls. Idempotent."""
        return self.recover(workdir)


def image_file_mount(backend: str, volume: str, use_instead: str) -> Optional[_mounts.Mount]:
    """The mount holding ``volume``, which must be a disk image file (the backends that copy
    or snapshot image files: reflink, btrfs); ``use_instead`` ends the message for anything else."""
    try:
        st = os.stat(volume)
    except OSError as exc:
        raise SnapshotError(f"{backend}: {volume} does not exist ({exc.strerror}); give the path "
                            "of the disk image file", code=BAD_VOLUME, backend=backend) from exc
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotError(f"{backend}: {volume} is not a regular file; {use_instead}",
                            code=BAD_VOLUME, backend=backend)
    return _mounts.mount_of_path(volume)


def device_or_file_size(path: str) -> int:
    """Size in bytes of a block device or regular file."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def drop_cache(path: str) -> None:
    """Best effort: drop clean page cache of ``path`` so a reader does not see stale blocks
    (a block device's cache is not updated when a mounted filesystem writes file data)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)
