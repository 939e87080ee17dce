"""Full tree manifest and diff, bit for bit.

For every entry below a root (paths are ``bytes``, relative, so non-UTF-8 names are safe) the
manifest records, from ``lstat`` (symlinks are never followed): type, permission bits (including
setuid/setgid/sticky), uid, gid, size, mtime_ns, SHA-256 of the content (regular files), the link
target (symlinks), the device number (devices), and every extended attribute readable with
``os.listxattr``/``os.getxattr(follow_symlinks=False)`` — POSIX ACLs appear there as
``system.posix_acl_access`` / ``system.posix_acl_default``. Hard links are compared as a partition
of paths into inode groups (inode numbers themselves differ between trees). The root directory
itself is entry ``b"."``.

``diff(a, b)`` returns human-readable differences; an empty list means identical.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple, Union

LOG = logging.getLogger(__name__)

#: ``exclude(relpath, is_dir) -> bool``; an excluded directory is skipped with its subtree.
ExcludePredicate = Callable[[bytes, bool], bool]

_TYPES = (
    (stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "chardev"), (stat.S_ISBLK, "blockdev"),
)


@dataclass(frozen=True)
class Entry:
    type: str
    mode: int            # permission bits incl. setuid/setgid/sticky (S_IMODE)
    uid: int
    gid: int
    size: int            # regular files only (0 otherwise: directory sizes are fs-specific)
    mtime_ns: int
    sha256: Optional[str] = None
    target: Optional[bytes] = None
    rdev: Optional[int] = None
    xattrs: Tuple[Tuple[str, bytes], ...] = ()


@dataclass
class Manifest:
    entries: Dict[bytes, Entry] = field(default_factory=dict)
    #: hard-link groups (only groups with more than one path inside the tree)
    links: FrozenSet[FrozenSet[bytes]] = frozenset()

    @property
    def files(self) -> int:
        return sum(1 for e in self.entries.values() if e.type == "file")

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self.entries.values())


def _type(mode: int) -> str:
    for check, name in _TYPES:
        if check(mode):
            return name
    return "unknown"


def _xattrs(path: bytes) -> Tuple[Tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise
    out = []
    for name in sorted(names):
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                continue
            raise
    return tuple(out)


def _sha256(path: bytes) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0))
    try:
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def _entry(path: bytes, st: os.stat_result) -> Entry:
    kind = _type(st.st_mode)
    return Entry(
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind == "file" else 0,
        mtime_ns=st.st_mtime_ns,
        sha256=_sha256(path) if kind == "file" else None,
        target=os.readlink(path) if kind == "symlink" else None,
        rdev=st.st_rdev if kind in ("chardev", "blockdev") else None,
        xattrs=_xattrs(path),
    )


def build(root: Union[str, Path, bytes], exclude: Optional[ExcludePredicate] = None) -> Manifest:
    """Walk ``root`` (not following symlinks, not crossing into other file systems)."""
    root_b = os.fsencode(root)
    root_st = os.lstat(root_b)
    entries: Dict[bytes, Entry] = {b".": _entry(root_b, root_st)}
    inodes: Dict[Tuple[int, int], List[bytes]] = {}
    stack: List[bytes] = [b""]
    while stack:
        rel_dir = stack.pop()
        abs_dir = os.path.join(root_b, rel_dir) if rel_dir else root_b
        with os.scandir(abs_dir) as it:
            children = sorted(it, key=lambda d: d.name)
        for child in children:
            rel = os.path.join(rel_dir, child.name) if rel_dir else child.name
            st = os.lstat(child.path)
            is_dir = stat.S_ISDIR(st.st_mode)
            if exclude is not None and exclude(rel, is_dir):
                continue
            entries[rel] = _entry(child.path, st)
            if is_dir:
                if st.st_dev == root_st.st_dev:
                    stack.append(rel)
            elif st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    links = frozenset(frozenset(g) for g in inodes.values() if len(g) > 1)
    return Manifest(entries, links)


def _show(path: bytes) -> str:
    return repr(path)[2:-1] if path != b"." else "."


def diff(a: Manifest, b: Manifest, limit: int = 1000) -> List[str]:
    """Differences from ``a`` (expected, e.g. the source) to ``b`` (actual, e.g. the copy)."""
    out: List[str] = []
    for path in sorted(set(a.entries) | set(b.entries)):
        ea, eb = a.entries.get(path), b.entries.get(path)
        if ea is None:
            out.append(f"{_show(path)}: unexpected {eb.type if eb else '?'}")
            continue
        if eb is None:
            out.append(f"{_show(path)}: missing {ea.type}")
            continue
        if ea.type != eb.type:
            out.append(f"{_show(path)}: type {ea.type} != {eb.type}")
            continue
        for name in ("mode", "uid", "gid", "size", "mtime_ns", "sha256", "target", "rdev"):
            va, vb = getattr(ea, name), getattr(eb, name)
            if va != vb:
                if name == "mode":
                    va, vb = oct(va), oct(vb)
                out.append(f"{_show(path)}: {name} {va!r} != {vb!r}")
        if ea.xattrs != eb.xattrs:
            xa, xb = dict(ea.xattrs), dict(eb.xattrs)
            for key in sorted(set(xa) | set(xb)):
                if key not in xb:
                    out.append(f"{_show(path)}: xattr {key} missing")
                elif key not in xa:
                    out.append(f"{_show(path)}: unexpected xattr {key}")
                elif xa[key] != xb[key]:
                    out.append(f"{_show(path)}: xattr {key} differs")
    if a.links != b.links:
        for group in sorted(a.links - b.links, key=sorted):
            out.append("hard-link group missing: " + ", ".join(_show(p) for p in sorted(group)))
        for group in sorted(b.links - a.links, key=sorted):
            out.append("unexpected hard-link group: " + ", ".join(_show(p) for p in sorted(group)))
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more differences"]
    return out
