"""Linux specifics: os-release, machine id, block devices, boot mode, locks, signals."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import stat
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

NAME = "linux"
SUPPORTS_FILE_MODE = True

_OS_RELEASE_FILES = (Path("/etc/os-release"), Path("/usr/lib/os-release"))
_MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
_SYS_BLOCK = Path("/sys/block")
_EFI_DIR = Path("/sys/firmware/efi")


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
        value = value.replace('\\"', '"').replace("\\$", "$").replace("\\`", "`").replace("\\\\", "\\")
    return value


def parse_os_release(text: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = _unquote(value)
    return out


def os_release() -> Dict[str, str]:
    """The os-release fields (``ID``, ``ID_LIKE``, ``VERSION_ID``, ``PRETTY_NAME``...)."""
    for path in _OS_RELEASE_FILES:
        try:
            return parse_os_release(path.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
    return {}


def kernel() -> str:
    return os.uname().release


def arch() -> str:
    return os.uname().machine


def boot_mode() -> str:
    return "uefi" if _EFI_DIR.is_dir() else "bios"


def read_machine_id() -> Optional[str]:
    for path in _MACHINE_ID_FILES:
        try:
            value = path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            continue
        if value:
            return value
    return None


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def block_devices(sys_block: Path = _SYS_BLOCK) -> List[Dict[str, Any]]:
    """Disks from /sys/block with their partitions (sizes in bytes; /sys counts 512-byte
    sectors). RAM disks and empty devices are skipped."""
    disks: List[Dict[str, Any]] = []
    try:
        names = sorted(p.name for p in sys_block.iterdir())
    except OSError:
        return disks
    for name in names:
        if name.startswith(("ram", "zram")):
            continue
        dev = sys_block / name
        size = _read_int(dev / "size") * 512
        if size == 0:
            continue
        partitions = []
        try:
            children = sorted(dev.iterdir())
        except OSError:
            children = []
        for child in children:
            if child.name.startswith(name) and (child / "partition").exists():
                partitions.append({"name": child.name, "size_bytes": _read_int(child / "size") * 512})
        disks.append({"name": name, "size_bytes": size, "partitions": partitions})
    return disks


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounted_device(path: str, *, mountinfo: Path = Path("/proc/self/mountinfo"),
                   sys_block: Path = _SYS_BLOCK) -> Optional[Tuple[str, str]]:
    """(block device, mount point) when the filesystem on ``path`` is mounted: ``path`` is a
    mounted block device, or an image file attached to a loop device that is mounted (then the
    device is the loop device). None when it is not mounted (or unknown)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    devs: Dict[str, str] = {}
    if stat.S_ISBLK(st.st_mode):
        devs[f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"] = path
    elif stat.S_ISREG(st.st_mode):
        real = os.path.realpath(path)
        try:
            loops = [p for p in sys_block.iterdir() if p.name.startswith("loop")]
        except OSError:
            loops = []
        for loop in loops:
            try:
                backing = (loop / "loop" / "backing_file").read_text().strip()
                dev = (loop / "dev").read_text().strip()
            except OSError:
                continue
            if backing == real:
                devs[dev] = f"/dev/{loop.name}"
    if not devs:
        return None
    try:
        lines = mountinfo.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and fields[2] in devs:
            return devs[fields[2]], _unescape_mountinfo(fields[4])
    return None


def system_home() -> Path:
    return Path("/var/lib/go2cloud_client")


def lock_exclusive(fd: int) -> bool:
    """Take an exclusive, non-blocking lock on an open file; False when another holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def terminate_pid(pid: int, *, force: bool = False) -> None:
    try:
        os.kill(pid, signal.SIGKILL if force else signal.SIGTERM)
    except ProcessLookupError:
        pass


def kill_process_group(pgid: int, *, force: bool = False) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL if force else signal.SIGTERM)
    except ProcessLookupError:
        pass


def graceful_signals() -> Tuple[int, ...]:
    return (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
