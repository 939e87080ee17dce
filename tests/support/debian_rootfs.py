"""A Debian 11 (bullseye: glibc 2.31, rsync 3.2.3) root filesystem for the compatibility tests.

Built once with ``debootstrap`` from the Debian mirror this machine's apt already uses (read from
/etc/apt at run time: no mirror host is written in the repository) and cached as a tarball
under ``/var/cache/go2cloud-tests/`` (``GO2CLOUD_TEST_CACHE`` overrides it), so later runs only
unpack it (a few seconds instead of minutes). A lock file serialises concurrent builders.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

SUITE = "bullseye"
PACKAGES = ("rsync",)
#: bump when the recipe changes, so an old cached tarball is not reused
RECIPE = 1


def cache_dir() -> Path:
    return Path(os.environ.get("GO2CLOUD_TEST_CACHE", "/var/cache/go2cloud-tests"))


def _apt_source_lines() -> Iterator[str]:
    """``URL SUITE...`` for every enabled Debian source of this machine (one-line and deb822)."""
    etc = Path("/etc/apt")
    files: List[Path] = []
    if (etc / "sources.list").is_file():
        files.append(etc / "sources.list")
    if (etc / "sources.list.d").is_dir():
        files += sorted(p for p in (etc / "sources.list.d").iterdir()
                        if p.suffix in (".list", ".sources") and p.is_file())
    for path in files:
        text = path.read_text(errors="replace")
        if path.suffix == ".list":
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 3 and parts[0] == "deb":
                    rest = [p for p in parts[1:] if not p.startswith("[")]
                    if rest:
                        yield " ".join(rest[:2])
        else:
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith((" ", "\t", "#")):
                        key, value = line.split(":", 1)
                        fields[key.strip().lower()] = value.strip()
                enabled = fields.get("enabled", "yes").lower() != "no"
                if not enabled or "deb" not in fields.get("types", "").split():
                    continue
                suites = fields.get("suites", "").split()
                for uri in fields.get("uris", "").split():
                    yield f"{uri} {suites[0] if suites else ''}"


def debian_mirror() -> Optional[str]:
    """The URL of the main Debian archive this machine's apt uses (not the security one)."""
    for line in _apt_source_lines():
        url, _, suite = line.partition(" ")
        if url.startswith(("http://", "https://")) and "security" not in url and "security" not in suite:
            return url.rstrip("/")
    return None


def tarball() -> Path:
    return cache_dir() / f"debian-{SUITE}-minbase-{'-'.join(PACKAGES)}-r{RECIPE}.tar"


def debootstrap(suite: str, packages: Sequence[str], root: Path, mirror: str) -> None:
    """``debootstrap --variant=minbase --include=PACKAGES SUITE ROOT MIRROR`` (nice'd)."""
    tool = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.path.exists(tool):
        raise RuntimeError("debootstrap is not installed (apt-get install debootstrap)")
    proc = subprocess.run(
        ["nice", "-n", "19", tool, "--variant=minbase", "--include=" + ",".join(packages), suite, str(root),
         mirror],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"debootstrap {suite} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")


def _build(out: Path) -> None:
    mirror = debian_mirror()
    if mirror is None:
        raise RuntimeError("no Debian mirror in /etc/apt/sources.list{,.d}: cannot run debootstrap")
    work = Path(tempfile.mkdtemp(prefix="go2cloud-debootstrap-", dir=str(out.parent)))
    try:
        root = work / "root"
        debootstrap(SUITE, PACKAGES, root, mirror)
        tmp = out.with_name(out.name + ".tmp")
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(tmp), "."],
                       check=True, stdin=subprocess.DEVNULL)
        os.replace(tmp, out)
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)


def ensure_tarball() -> Path:
    """The cached tarball of the root filesystem, built first if missing."""
    out = tarball()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.is_file():
            _build(out)
    return out


def unpack(dest: Path) -> Path:
    """A fresh copy of the root filesystem at ``dest`` (which must not exist)."""
    src = ensure_tarball()
    dest.mkdir(parents=True)
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(dest), "-xpf", str(src)],
                   check=True, stdin=subprocess.DEVNULL)
    return dest
