"""Extent maps of files (FIEMAP ioctl) and reflink copies (FICLONE ioctl), Linux only.

Change tracking by extent maps rests on one fact: while a reflink copy (or btrfs snapshot) of a
file exists, the physical blocks it references cannot be freed or rewritten in place. Writing to
the original therefore gives that range new physical blocks. So for two copies A (older, still
existing) and B (newer), a range that maps to the same physical bytes in both is unchanged, and
every other range (different blocks, a hole on one side, unknown/inline/delalloc/encoded
extents, past the end of A) is reported as changed.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass
from typing import List, Tuple

from snapshot_driver.base import Extent, merge_extents

FICLONE = 0x40049409
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_DATA_TAIL = 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_SHARED = 0x2000

#: extents whose physical address does not identify their bytes
UNTRUSTED = (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_ENCODED
             | FIEMAP_EXTENT_NOT_ALIGNED | FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_DATA_TAIL)

_HDR = struct.Struct("=QQIII4x")          # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXT = struct.Struct("=QQQ16xI12x")      # logical, physical, length, reserved64[2], flags, res[3]
_BATCH = 512


@dataclass(frozen=True)
class MapExtent:
    logical: int
    physical: int
    length: int
    flags: int


def fiemap(fd: int, sync: bool = True) -> List[MapExtent]:
    """All extents of the open file ``fd`` (raises OSError if the filesystem has no FIEMAP)."""
    result: List[MapExtent] = []
    start = 0
    flags = FIEMAP_FLAG_SYNC if sync else 0
    while True:
        buf = bytearray(_HDR.size + _EXT.size * _BATCH)
        _HDR.pack_into(buf, 0, start, 0xFFFFFFFFFFFFFFFF - start, flags, 0, _BATCH)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        _, _, _, mapped, _ = _HDR.unpack_from(buf, 0)
        if mapped == 0:
            break
        last = False
        for i in range(mapped):
            lo, ph, ln, fl = _EXT.unpack_from(buf, _HDR.size + i * _EXT.size)
            result.append(MapExtent(lo, ph, ln, fl))
            last = bool(fl & FIEMAP_EXTENT_LAST)
        if last:
            break
        tail = result[-1]
        start = tail.logical + tail.length
    return result


def fiemap_path(path: str) -> List[MapExtent]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fiemap(fd)
    finally:
        os.close(fd)


def clone_file(src: str, dst: str) -> None:
    """Make ``dst`` a reflink copy of ``src`` (FICLONE). Raises OSError (EXDEV, EOPNOTSUPP,
    EINVAL...) when the filesystem cannot. ``dst`` is created 0600 and removed on failure."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
            os.fsync(dfd)
        except BaseException:
            os.close(dfd)
            os.unlink(dst)
            raise
        os.close(dfd)
    finally:
        os.close(sfd)


def _segments(extents: List[MapExtent], size: int) -> List[Tuple[int, int, int, int]]:
    """(start, end, physical_at_start or -1 for hole, flags) covering [0, size) contiguously."""
    segs: List[Tuple[int, int, int, int]] = []
    pos = 0
    for e in sorted(extents, key=lambda x: x.logical):
        s, t = max(e.logical, pos), min(e.logical + e.length, size)
        if t <= s:
            continue
        if s > pos:
            segs.append((pos, s, -1, 0))
        segs.append((s, t, e.physical + (s - e.logical), e.flags))
        pos = t
    if pos < size:
        segs.append((pos, size, -1, 0))
    return segs


def diff_maps(old: List[MapExtent], old_size: int, new: List[MapExtent],
              new_size: int, physical: bool = True) -> List[Extent]:
    """Ranges of ``[0, new_size)`` whose bytes may differ between the file mapped by ``old``
    (size ``old_size``) and the one mapped by ``new``. A superset of the truth, merged.

    With ``physical=False`` only allocation is compared (hole on one side, data on the other,
    past the old end): the caller learns about rewritten data some other way."""
    a = _segments(old, old_size)
    b = _segments(new, new_size)
    changed: List[Extent] = []
    i = 0
    for bs, be, bp, bf in b:
        pos = bs
        while pos < be:
            while i < len(a) and a[i][1] <= pos:
                i += 1
            if i >= len(a):                       # past the old end of file
                changed.append(Extent(pos, be - pos))
                break
            as_, ae, ap, af = a[i]
            end = min(be, ae)
            same = False
            if bp == -1 and ap == -1:
                same = True                       # hole in both: zeros in both
            elif bp >= 0 and ap >= 0 and not physical:
                same = True
            elif bp >= 0 and ap >= 0 and not ((af | bf) & UNTRUSTED):
                same = (bp + (pos - bs) == ap + (pos - as_)
                        and (af & FIEMAP_EXTENT_UNWRITTEN) == (bf & FIEMAP_EXTENT_UNWRITTEN))
            if not same:
                changed.append(Extent(pos, end - pos))
            pos = end
    return merge_extents(changed, new_size)
