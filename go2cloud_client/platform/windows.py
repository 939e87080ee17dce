"""Windows specifics. UNTESTED ON WINDOWS: written without a Windows machine, kept minimal.

File-level replication (rsync) is not supported on Windows (block mode will be); inventory uses
psutil and the registry.
"""

from __future__ import annotations

import os
import platform as _stdlib_platform
import signal
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

NAME = "windows"
SUPPORTS_FILE_MODE = False


def os_release() -> Dict[str, str]:
    return {
        "ID": "windows",
        "VERSION_ID": _stdlib_platform.version(),
        "PRETTY_NAME": _stdlib_platform.platform(),
    }


def kernel() -> str:
    return _stdlib_platform.version()


def arch() -> str:
    return _stdlib_platform.machine().lower() or "unknown"


def boot_mode() -> str:
    # Windows reports the firmware type through GetFirmwareType; without ctypes testing we fall
    # back to the presence of the EFI system partition variable in the environment.
    return "uefi" if os.environ.get("firmware_type", "").lower() == "uefi" else "bios"


def read_machine_id() -> Optional[str]:
    try:
        import winreg  # type: ignore[import-not-found]

        hive = winreg.HKEY_LOCAL_MACHINE  # type: ignore[attr-defined]
        with winreg.OpenKey(hive, r"SOFTWARE\Microsoft\Cryptography") as key:  # type: ignore[attr-defined]
            value, _ = winreg.QueryValueEx(key, "MachineGuid")  # type: ignore[attr-defined]
            return str(value)
    except Exception:  # noqa: BLE001 - any failure means "unknown"; the caller generates one
        return None


def block_devices() -> List[Dict[str, Any]]:
    return []  # disks are reported through the mounts (psutil) until block mode lands


def mounted_device(path: str) -> Optional[Tuple[str, str]]:
    """Block-level reads on Windows go through VSS; freezing a mount is not a thing there."""
    return None


def system_home() -> Path:
    return Path(os.environ.get("ProgramData", r"C:\ProgramData")) / "go2cloud_client"


def lock_exclusive(fd: int) -> bool:
    import msvcrt  # type: ignore[import-not-found]

    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
    except OSError:
        return False
    return True


def unlock(fd: int) -> None:
    import msvcrt  # type: ignore[import-not-found]

    os.lseek(fd, 0, os.SEEK_SET)
    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]


def pid_alive(pid: int) -> bool:
    import psutil

    return pid > 0 and psutil.pid_exists(pid)


def terminate_pid(pid: int, *, force: bool = False) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
        proc.kill() if force else proc.terminate()
    except psutil.NoSuchProcess:
        pass


def kill_process_group(pgid: int, *, force: bool = False) -> None:
    terminate_pid(pgid, force=force)


def graceful_signals() -> Tuple[int, ...]:
    return (signal.SIGTERM, signal.SIGINT)
