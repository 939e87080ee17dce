"""Per-task directory tree on the reference target: one point-in-time image per sync cycle.

Layout under the task root (the rsync module's path)::

    <root>/000001/          image of cycle 1 (complete tree)
    <root>/000002/          cycle 2, written by rsync --link-dest=../000001...: unchanged files
                            are hard links into cycle 1, changed files are new inodes

Which cycles are committed is recorded in the control plane's database only, never in this tree:
the source writes below it (``go2cloud_server.rsyncd`` confines it to the cycle it is writing), so
nothing here is read back as the server's state. rsync never modifies a linked file in place (it
writes a temporary file and renames it; ``--inplace`` is refused), so older images stay intact.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Set, Tuple

from go2cloud_server.clock import utc_now_iso

LOG = logging.getLogger(__name__)



@dataclass
class ArtifactInfo:
    cycle: int
    path: Path
    bytes: int
    files: int
    created_at: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _check_cycle(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= 999999:
        raise ValueError(f"invalid cycle number {n!r} (1-999999)")
    return n


def _rmtree(path: Path) -> None:
    def onerror(func, p, exc_info):  # make read-only dirs (mode 0000, 0500) removable
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700) if os.path.isdir(p) and not os.path.islink(p) else None
            func(p)
        except OSError:
            raise exc_info[1] from None

    if path.is_symlink() or not path.exists():
        if path.is_symlink():
            path.unlink()
        return
    shutil.rmtree(path, onerror=onerror)


def _tree_size(root: Path) -> Tuple[int, int]:
    """(bytes of distinct regular-file inodes, number of non-directory entries)."""
    seen: Set[Tuple[int, int]] = set()
    total = files = 0
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, name))
            files += 1
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total, files


class TaskTree:
    """The cycle images of one task (``root`` is the task's rsync module path)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def cycle_dir(self, n: int) -> Path:
        return self.root / f"{_check_cycle(n):06d}"

    def prepare_cycle(self, n: int) -> Path:
        """Create the (empty) directory of cycle ``n``, 0755 in a task root that is 0700 (the
        server's user only, like all of its data directory); idempotent (a cycle that was
        interrupted keeps its partial content, and the mode rsync gave it, so the rerun only sends
        what is missing). The caller (the service, from its database) never prepares a committed
        cycle."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        path = self.cycle_dir(n)
        try:
            path.mkdir()
        except FileExistsError:
            return path
        os.chmod(path, 0o755)  # the image's own top directory, as before (not under the umask)
        return path

    def commit_cycle(self, n: int) -> ArtifactInfo:
        """Measure cycle ``n`` as a complete image and sync the file system; the caller records
        it (in its database). Idempotent."""
        path = self.cycle_dir(n)
        if not path.is_dir() or path.is_symlink():
            raise FileNotFoundError(f"cycle {n} has no directory {path}")
        nbytes, files = _tree_size(path)
        os.sync()
        info = ArtifactInfo(cycle=n, path=path, bytes=nbytes, files=files, created_at=utc_now_iso())
        LOG.info("cycle %s committed: %s bytes, %s files", n, nbytes, files)
        return info

    def discard_cycle(self, n: int) -> None:
        """Remove cycle ``n``'s directory."""
        _rmtree(self.cycle_dir(n))

    def retain(self, keep: int, committed: List[int]) -> List[int]:
        """Delete the oldest of the ``committed`` cycles so that at most ``max(keep, 1)`` remain;
        the newest is never deleted. Returns the deleted cycle numbers."""
        keep = max(int(keep), 1)
        cycles = sorted(committed)
        doomed = cycles[:-keep] if len(cycles) > keep else []
        for n in doomed:
            self.discard_cycle(n)
            LOG.info("cycle %s deleted by retention (keep %s)", n, keep)
        return doomed

    def destroy(self) -> None:
        _rmtree(self.root)
