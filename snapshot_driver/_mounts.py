"""What is mounted where, from /proc/self/mountinfo (Linux)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import List, Optional

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class Mount:
    major: int
    minor: int
    root: str
    mountpoint: str
    fstype: str
    source: str
    options: str


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts(path: str = MOUNTINFO) -> List[Mount]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    result = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf, rf = left.split(), right.split()
        if len(lf) < 6 or len(rf) < 2:
            continue
        try:
            major, minor = (int(x) for x in lf[2].split(":"))
        except ValueError:
            continue
        result.append(Mount(major, minor, _unescape(lf[3]), _unescape(lf[4]), rf[0],
                            _unescape(rf[1]), rf[2] if len(rf) > 2 else ""))
    return result


def mount_of_path(path: str) -> Optional[Mount]:
    """The mount that holds ``path`` (longest mount point that is a prefix of its real path)."""
    real = os.path.realpath(path)
    best: Optional[Mount] = None
    for m in mounts():
        mp = m.mountpoint.rstrip("/") or "/"
        if real == mp or real.startswith(mp + "/") or mp == "/":
            if best is None or len(mp) >= len(best.mountpoint.rstrip("/") or "/"):
                best = m
    return best


def mounts_of_device(device: str, mountinfo: str = MOUNTINFO) -> List[Mount]:
    """Mounts of the filesystem on ``device``: matched by device number for a block device,
    or by the mount source's real path. Whole-filesystem mounts first, bind mounts last."""
    try:
        st = os.stat(device)
    except OSError:
        return []
    real = os.path.realpath(device)
    number = (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISBLK(st.st_mode) else None
    found = [m for m in mounts(mountinfo)
             if (number is not None and (m.major, m.minor) == number)
             or (m.source.startswith("/") and os.path.realpath(m.source) == real)]
    found.sort(key=lambda m: m.root != "/")
    return found
