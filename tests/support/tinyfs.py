"""A tiny real filesystem to run out of space on (the fault harness, docs/reliability.md §8).

:func:`tiny_fs` makes an ext4 filesystem of a few dozen MiB in an image file (``mkfs.ext4 -m 0``:
no blocks reserved for root, so what ``statvfs`` says is free is what the server, running as
root, can write), mounts it through a loop device (``mount -o loop``: the kernel picks a free
loop device and detaches it at unmount, so nothing global is named) and unmounts it afterwards,
whatever the test did. :meth:`TinyFs.fill` writes a ballast file until only ``leave`` bytes are
free; :meth:`TinyFs.free_ballast` removes it ("the operator freed space").

Needs root (mount). Fault tests run as root in CI and fail, never skip, when this cannot work.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

MiB = 1 << 20


def _run(*argv: str) -> None:
    proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")


class TinyFs:
    def __init__(self, image: Path, mount_point: Path) -> None:
        self.image = image
        self.mount_point = mount_point
        self._ballast: List[Path] = []

    def free(self) -> int:
        st = os.statvfs(self.mount_point)
        return st.f_bavail * st.f_frsize

    def total(self) -> int:
        st = os.statvfs(self.mount_point)
        return st.f_blocks * st.f_frsize

    def fill(self, leave: int = 0) -> int:
        """Write ballast until at most ``leave`` bytes are free (real blocks: fallocate, then
        plain writes for what fallocate's granularity left); returns the bytes written."""
        path = self.mount_point / f"ballast-{len(self._ballast)}"
        self._ballast.append(path)
        written = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            want = self.free() - leave
            if want > MiB:
                try:
                    os.posix_fallocate(fd, 0, want - MiB // 2)
                    written = want - MiB // 2
                except OSError:
                    written = 0
            os.lseek(fd, written, os.SEEK_SET)
            block = b"\xa5" * 65536
            while self.free() > leave:
                try:
                    written += os.write(fd, block[: max(4096, min(len(block), self.free() - leave))])
                    os.fsync(fd)
                except OSError:
                    break
        finally:
            os.close(fd)
        return written

    def free_ballast(self) -> None:
        for path in self._ballast:
            if path.exists():
                path.unlink()
        self._ballast.clear()
        os.sync()


@contextmanager
def tiny_fs(image: Path, mount_point: Path, size_mib: int = 128) -> Iterator[TinyFs]:
    """An ext4 filesystem of ``size_mib`` MiB in ``image``, mounted at ``mount_point`` (created)."""
    with open(image, "wb") as fh:
        fh.truncate(size_mib * MiB)
    _run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0", "--", str(image))
    mount_point.mkdir(parents=True, exist_ok=True)
    _run("mount", "-o", "loop", "--", str(image), str(mount_point))
    try:
        yield TinyFs(image, mount_point)
    finally:
        subprocess.run(["sync"], check=False)
        proc = subprocess.run(["umount", "--", str(mount_point)], capture_output=True, timeout=120)
        if proc.returncode != 0:  # a process still inside (a server that did not stop): lazily
            subprocess.run(["umount", "-l", "--", str(mount_point)], capture_output=True, timeout=120)
        image.unlink(missing_ok=True)
