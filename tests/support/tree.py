"""A nasty source tree for replication tests, and helpers that change it between cycles.

Built as root (owners, setuid, ACLs need it). Everything a file-level migration can lose is in
here: hard links, every kind of symlink, a sparse file, xattrs, POSIX ACLs (access and default),
empty directories, odd modes and owners, hostile names (space, newline, leading '-', non-UTF-8
bytes, names that look like rsync options) and a FIFO.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path
from typing import Dict, Union

PathLike = Union[str, Path]

MiB = 1024 * 1024
SPARSE_SIZE = 64 * MiB
OWNER = (1234, 5678)

# Relative paths (bytes) of notable entries, for tests that want to poke at them.
NAMES: Dict[str, bytes] = {
    "small": b"docs/small.txt",
    "empty": b"docs/empty",
    "random": b"data/random.bin",
    "sparse": b"data/sparse.img",
    "link_a": b"links/hard-a",
    "link_b": b"links/hard-b",
    "link_c": b"links/sub/hard-c",
    "setuid": b"bin/suid-tool",
    "sticky": b"shared-tmp",
    "noperm": b"secret/nobody-can-read",
    "owned": b"owned/by-1234",
    "acl_dir": b"acl-dir",
    "acl_file": b"acl-dir/acl-file",
    "xattr": b"xattr-file",
    "fifo": b"fifo",
    "space": b"name with spaces.txt",
    "newline": b"new\nline",
    "dash": b"-rf",
    "option": b"--delete",
    "nonutf8": b"bad-\xff\xfe-name",
}


def _p(root: PathLike, rel: bytes) -> bytes:
    return os.path.join(os.fsencode(root), rel)


def _write(root: PathLike, rel: bytes, data: bytes, mode: int = 0o644) -> bytes:
    path = _p(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)
    return path


def _setfacl(*args: Union[str, bytes]) -> None:
    subprocess.run(["setfacl", *args], check=True, stdin=subprocess.DEVNULL)


def build(root: PathLike, *, seed: int = 1, random_mib: int = 3) -> Path:
    """Create the nasty tree under ``root`` (which must not exist or be empty)."""
    rnd = random.Random(seed)
    root_b = os.fsencode(root)
    os.makedirs(root_b, exist_ok=True)
    # regular files of various sizes
    _write(root, NAMES["small"], b"hello world\n")
    _write(root, NAMES["empty"], b"")
    _write(root, b"docs/one-byte", b"x")
    _write(root, b"docs/4k-boundary", rnd.randbytes(4096))
    _write(root, b"docs/odd-size", rnd.randbytes(70001))
    _write(root, NAMES["random"], rnd.randbytes(random_mib * MiB))
    for i in range(30):
        _write(root, b"many/f%03d" % i, b"file %d\n" % i * (i + 1))
    # hard links: a group of 3 across directories
    a = _write(root, NAMES["link_a"], b"shared inode content\n" * 100)
    os.makedirs(_p(root, b"links/sub"), exist_ok=True)
    os.link(a, _p(root, NAMES["link_b"]))
    os.link(a, _p(root, NAMES["link_c"]))
    # symlinks
    os.makedirs(_p(root, b"symlinks"), exist_ok=True)
    os.symlink(b"../docs/small.txt", _p(root, b"symlinks/relative"))
    os.symlink(b"/etc/hostname", _p(root, b"symlinks/absolute"))
    os.symlink(b"../does/not/exist", _p(root, b"symlinks/dangling"))
    os.symlink(b"../docs", _p(root, b"symlinks/to-dir"))
    os.symlink(b"\xff-target", _p(root, b"symlinks/nonutf8-target"))
    # sparse file: 64 MiB, a hole, some data in the middle and at the end
    sparse = _p(root, NAMES["sparse"])
    with open(sparse, "wb") as fh:
        fh.truncate(SPARSE_SIZE)
        fh.seek(16 * MiB)
        fh.write(rnd.randbytes(100_000))
        fh.seek(SPARSE_SIZE - 4096)
        fh.write(b"tail" * 1024)
    # xattrs
    x = _write(root, NAMES["xattr"], b"has xattrs\n")
    os.setxattr(x, "user.comment", b"migrated by go2cloud")
    os.setxattr(x, "user.binary", bytes(range(256)))
    os.setxattr(x, "trusted.go2cloud", b"root-only namespace")
    os.makedirs(_p(root, b"xattr-dir"), exist_ok=True)
    os.setxattr(_p(root, b"xattr-dir"), "user.dir", b"on a directory")
    # POSIX ACLs: access on a file, access + default on a directory
    os.makedirs(_p(root, NAMES["acl_dir"]), exist_ok=True)
    af = _write(root, NAMES["acl_file"], b"acl file\n", 0o640)
    _setfacl("-m", "u:1234:rw,g:5678:r", os.fsdecode(af))
    _setfacl("-m", "u:1234:rwx", os.fsdecode(_p(root, NAMES["acl_dir"])))
    _setfacl("-d", "-m", "u:1234:rx,g::r", os.fsdecode(_p(root, NAMES["acl_dir"])))
    # empty directories
    os.makedirs(_p(root, b"empty-dir"), exist_ok=True)
    os.makedirs(_p(root, b"nested/empty/dirs"), exist_ok=True)
    # modes
    _write(root, b"modes/private", b"0600\n", 0o600)
    _write(root, b"modes/exec", b"#!/bin/sh\nexit 0\n", 0o755)
    _write(root, NAMES["setuid"], b"\x7fELF pretend\n", 0o4755)
    _write(root, b"bin/sgid-tool", b"sgid\n", 0o2755)
    os.makedirs(_p(root, NAMES["sticky"]), exist_ok=True)
    os.chmod(_p(root, NAMES["sticky"]), 0o1777)
    _write(root, NAMES["noperm"], b"mode 0000\n", 0o000)
    os.makedirs(_p(root, b"locked-dir"), exist_ok=True)
    _write(root, b"locked-dir/inside", b"in a 0500 dir\n")
    os.chmod(_p(root, b"locked-dir"), 0o500)
    # owners
    o = _write(root, NAMES["owned"], b"owned\n")
    os.chown(o, *OWNER)
    os.chown(_p(root, b"owned"), *OWNER)
    os.symlink(b"by-1234", _p(root, b"owned/symlink-owned"))
    os.lchown(_p(root, b"owned/symlink-owned"), 4321, 8765)
    # hostile names
    for key in ("space", "newline", "dash", "option", "nonutf8"):
        _write(root, NAMES[key], b"name: " + NAMES[key] + b"\n")
    os.makedirs(_p(root, b"dir \xe9 latin1/-e sh"), exist_ok=True)
    _write(root, b"dir \xe9 latin1/-e sh/x", b"x\n")
    # special files
    os.mkfifo(_p(root, NAMES["fifo"]), 0o640)
    # things the shipped excludes drop when this tree is a transfer root
    _write(root, b"tmp/scratch", b"excluded\n")
    _write(root, b"var/tmp/also-excluded", b"excluded\n")
    _write(root, b"swapfile", b"\0" * 4096, 0o600)
    # deterministic times for everything that is not a symlink
    t = 1_600_000_000_000_000_000
    for dirpath, dirnames, filenames in os.walk(root_b, topdown=False):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            os.utime(p, ns=(t, t), follow_symlinks=False)
    os.utime(root_b, ns=(t, t))
    return Path(os.fsdecode(root_b))


def change_content(root: PathLike) -> None:
    """Change file contents (same size and different size), also of the hard-link group."""
    _append(root, NAMES["small"], b"more\n")
    path = _p(root, NAMES["random"])
    with open(path, "r+b") as fh:
        fh.seek(MiB)
        fh.write(os.urandom(4096))
    _append(root, NAMES["link_b"], b"changed through b\n")
    with open(_p(root, NAMES["sparse"]), "r+b") as fh:
        fh.seek(40 * MiB)
        fh.write(b"new data in the hole")


def _append(root: PathLike, rel: bytes, data: bytes) -> None:
    with open(_p(root, rel), "ab") as fh:
        fh.write(data)


def change_metadata(root: PathLike) -> None:
    """Metadata-only changes: mode, owner, xattr, ACL, mtime (content untouched)."""
    os.chmod(_p(root, NAMES["small"]), 0o600)
    os.chown(_p(root, NAMES["empty"]), 4242, 4343)
    os.setxattr(_p(root, NAMES["xattr"]), "user.comment", b"changed xattr value")
    _setfacl("-m", "u:999:r", os.fsdecode(_p(root, NAMES["acl_file"])))
    os.utime(_p(root, b"docs/one-byte"), ns=(1_700_000_000_000_000_000,) * 2)
    os.chmod(_p(root, NAMES["link_a"]), 0o600)  # the whole hard-link group


def delete_some(root: PathLike) -> None:
    os.unlink(_p(root, b"many/f000"))
    os.unlink(_p(root, NAMES["dash"]))
    os.unlink(_p(root, NAMES["link_c"]))  # the group shrinks to 2
    os.rmdir(_p(root, b"empty-dir"))


def add_some(root: PathLike) -> None:
    _write(root, b"added/new-file", b"new\n")
    _write(root, b"added/\xfe\xff", b"new non-utf8\n")
    os.link(_p(root, b"added/new-file"), _p(root, b"added/new-hardlink"))
    os.symlink(b"new-file", _p(root, b"added/new-symlink"))


def rename_some(root: PathLike) -> None:
    os.rename(_p(root, NAMES["space"]), _p(root, b"renamed with spaces.txt"))
    os.rename(_p(root, b"nested"), _p(root, b"nested-renamed"))


def change_everything(root: PathLike) -> None:
    """Every kind of change a later cycle must carry: content, metadata, deletions, additions,
    renames."""
    change_content(root)
    change_metadata(root)
    delete_some(root)
    add_some(root)
    rename_some(root)
