"""Loop-device filesystems for the snapshot driver tests.

The conformance tests need root and loop devices: when those are missing they FAIL (this suite
is what proves the snapshot backends work). A backend whose filesystem tool (mkfs.xfs,
mkfs.btrfs) is missing is skipped with a message; CI installs xfsprogs and btrfs-progs.
Every loop device and mount made here is torn down, even when the test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest

MIB = 1024 * 1024

MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}
#: mkfs.xfs refuses filesystems under 300 MB; the images are sparse, so this costs little.
MIN_MIB = {"ext4": 64, "xfs": 320, "btrfs": 128}


def run(args: List[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout, check=check)


def require_root_and_loop() -> None:
    if os.geteuid() != 0:
        pytest.fail("the snapshot conformance suite needs root (loop devices, mount, fsfreeze)")
    if not os.path.exists("/dev/loop-control") or shutil.which("losetup") is None:
        pytest.fail("the snapshot conformance suite needs loop devices (/dev/loop-control, "
                    "losetup)")


def require_mkfs(fstype: str) -> None:
    tool = MKFS[fstype][0]
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (install {'xfsprogs' if fstype == 'xfs' else 'btrfs-progs'}"
                    f"); skipping the {fstype} cases")


@dataclass
class LoopFs:
    fstype: str
    image: Path
    device: str
    mountpoint: Path


class LoopFactory:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.devices: List[str] = []
        self.mounts: List[Path] = []

    def attach(self, image: Path, read_only: bool = False) -> str:
        args = ["losetup", "--find", "--show"] + (["--read-only"] if read_only else []) + [str(image)]
        dev = run(args).stdout.strip()
        self.devices.append(dev)
        return dev

    def mount(self, device: str, where: Path, options: str = "") -> Path:
        where.mkdir(parents=True, exist_ok=True)
        run(["mount"] + (["-o", options] if options else []) + [device, str(where)])
        self.mounts.append(where)
        return where

    def make(self, fstype: str, size_mib: int = 0, name: str = "",
             mkfs: Optional[List[str]] = None) -> LoopFs:
        require_root_and_loop()
        require_mkfs(fstype)
        size_mib = max(size_mib, MIN_MIB[fstype])
        name = name or f"{fstype}{len(self.devices)}"
        image = self.base / f"{name}.img"
        run(["truncate", "-s", f"{size_mib}M", str(image)])
        dev = self.attach(image)
        run((mkfs or MKFS[fstype]) + [dev])
        mp = self.mount(dev, self.base / f"{name}.mnt")
        return LoopFs(fstype, image, dev, mp)

    def umount(self, where: Path) -> None:
        run(["fsfreeze", "-u", str(where)], check=False)
        run(["umount", str(where)], check=False)
        if where in self.mounts:
            self.mounts.remove(where)

    def detach(self, device: str) -> None:
        run(["losetup", "-d", device], check=False)
        if device in self.devices:
            self.devices.remove(device)

    def cleanup(self) -> None:
        errors = []
        for mp in reversed(list(self.mounts)):
            # a test may have left it frozen: thaw first, or umount would hang
            run(["fsfreeze", "-u", str(mp)], check=False)
            res = run(["umount", str(mp)], check=False)
            if res.returncode != 0:
                res = run(["umount", "-l", str(mp)], check=False)
                if res.returncode != 0:
                    errors.append(f"umount {mp}: {res.stderr.strip()}")
        self.mounts.clear()
        for dev in reversed(list(self.devices)):
            res = run(["losetup", "-d", dev], check=False)
            if res.returncode != 0:
                errors.append(f"losetup -d {dev}: {res.stderr.strip()}")
        self.devices.clear()
        assert not errors, errors


@pytest.fixture
def loopfs(tmp_path: Path) -> Iterator[LoopFactory]:
    """``loopfs.make("xfs")`` -> a fresh loop-mounted filesystem under tmp_path."""
    factory = LoopFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def make_loopfs(loopfs: LoopFactory) -> Callable[..., LoopFs]:
    return loopfs.make
