"""Windows specifics. UNTESTED ON WINDOWS: written without a Windows machine, kept minimal.

File-level replication (rsync) is not supported on Windows (block mode will be); inventory uses
psutil and the registry.
"""

from __future__ import annotations

import os
import platform as _stdlib_platform
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from go2cloud_client import subp
from go2cloud_client.errors import UsageError

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


def root_block_device() -> Optional[str]:
    """The system volume (``C:\\``): what VSS snapshots."""
    return os.environ.get("SystemDrive", "C:") + "\\"


# -- SELinux (not a thing on Windows) -------------------------------------------------------------

SELINUX_CONFIG = Path("nonexistent-selinux-config")


def selinux_mode() -> Optional[str]:
    return None


def selinux_config_path() -> Path:
    return SELINUX_CONFIG


def selinux_config_mode(path: Optional[Path] = None) -> Optional[str]:
    return None


def set_selinux_runtime(mode: str) -> None:
    """Never called on Windows (:func:`selinux_mode` is None, so host preparation asks nothing);
    a host change journal entry copied from a Linux host gets a clear refusal instead of a silent success."""
    raise UsageError("SELinux does not exist on Windows: there is no SELinux mode to change or restore")


def set_selinux_config(mode: str, path: Optional[Path] = None) -> None:
    set_selinux_runtime(mode)


# -- service mode (sc.exe) ------------------------------------------------------------------------
# UNTESTED ON WINDOWS: the argument lists below are unit-tested, never run. A plain console
# program started by the SCM is stopped after 30 s (error 1053), so the binPath carries
# --windows-service: the agent then answers the Service Control Manager through advapi32
# (winservice.py; its state machine is unit-tested, the advapi32 calls have never run).

SERVICE_NAME = "go2cloud_client"
DISPLAY_NAME = "go2cloud_client migration agent"
DESCRIPTION = ("go2cloud migration agent: heartbeats to the control plane and replicates this "
               "server; resumes its task after a restart")
#: sc.exe exit codes that mean "already in the wanted state".
_SERVICE_EXISTS = 1073
_SERVICE_NOT_ACTIVE = 1062
_SERVICE_DOES_NOT_EXIST = 1060
_SERVICE_ALREADY_RUNNING = 1056
#: How long ``service install`` retries ``sc.exe start`` while the old agent stops (its stop
#: timeout is 60 s, see winservice.STOP_TIMEOUT_S).
SERVICE_RESTART_WAIT_S = 90.0
#: The hidden CLI flag that makes the agent answer the Service Control Manager.
SERVICE_FLAG = "--windows-service"


def _bin_path(argv: Sequence[str]) -> str:
    return subprocess.list2cmdline([*argv, SERVICE_FLAG])


def service_install_commands(argv: Sequence[str], home: Path) -> List[List[str]]:
    """sc.exe argument lists creating the service (start=auto, restart on failure, description).
    sc.exe wants ``option=`` and the value as separate words. ``failureflag 1`` makes the
    recovery actions also apply when the agent reports STOPPED with an error (a non-zero exit
    status), not only when the process dies without reporting."""
    return [
        ["sc.exe", "create", SERVICE_NAME, "binPath=", _bin_path(argv), "start=", "auto",
         "DisplayName=", DISPLAY_NAME],
        ["sc.exe", "description", SERVICE_NAME, f"{DESCRIPTION} (home {home})"],
        ["sc.exe", "failure", SERVICE_NAME, "reset=", "86400",
         "actions=", "restart/5000/restart/5000/restart/60000"],
        ["sc.exe", "failureflag", SERVICE_NAME, "1"],
    ]


def service_update_command(argv: Sequence[str]) -> List[str]:
    """``sc.exe config`` for a service that already exists (re-install)."""
    return ["sc.exe", "config", SERVICE_NAME, "binPath=", _bin_path(argv),
            "start=", "auto", "DisplayName=", DISPLAY_NAME]


def service_uninstall_commands() -> List[List[str]]:
    return [["sc.exe", "stop", SERVICE_NAME], ["sc.exe", "delete", SERVICE_NAME]]


def service_manager_running() -> bool:
    return True


def service_paths() -> Tuple[Path, Path]:
    return Path(f"service:{SERVICE_NAME}"), Path("")


def home_from_qc(output: str) -> Optional[Path]:
    """The ``--home`` of the ``BINARY_PATH_NAME`` line printed by ``sc.exe qc``, or None.
    The path is a command line quoted as :func:`subprocess.list2cmdline` writes it."""
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().upper() == "BINARY_PATH_NAME":
            words = _split_cmdline(value.strip())
            if "--home" in words[:-1]:
                return Path(words[words.index("--home") + 1])
    return None


def _split_cmdline(text: str) -> List[str]:
    """Split a command line the way list2cmdline quotes it (double quotes, backslash-escaped quotes)."""
    words: List[str] = []
    word: List[str] = []
    quoted = started = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] == '"':
            word.append('"')
            i += 2
            continue
        if ch == '"':
            quoted, started = not quoted, True
        elif ch in " \t" and not quoted:
            if word or started:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(ch)
        i += 1
    if word or started:
        words.append("".join(word))
    return words


def service_home() -> Optional[Path]:
    """The agent home of the installed service (from ``sc.exe qc``), None when there is none."""
    try:
        out = subp.run(["sc.exe", "qc", SERVICE_NAME], timeout=60).stdout
    except subp.ProcessError:
        return None  # 1060: the service does not exist
    return home_from_qc(out)


def service_status_hint() -> str:
    return f"'sc.exe query {SERVICE_NAME}' and the Windows event log"


def service_install(argv: Sequence[str], home: Path, *, start: bool,
                    env_file: Optional[Path] = None) -> Dict[str, Any]:
    """``env_file`` is not used: the service's agent reads the proxy setting the import recorded
    in its home (source.json)."""
    create, *rest = service_install_commands(argv, home)
    try:
        subp.run(create, timeout=60)
    except subp.ProcessError as exc:
        if exc.returncode != _SERVICE_EXISTS:
            raise
        subp.run(service_update_command(argv), timeout=60)
    for cmd in rest:
        subp.run(cmd, timeout=60)
    if start:
        subp.run(["sc.exe", "stop", SERVICE_NAME], timeout=60, rcs=(0, _SERVICE_NOT_ACTIVE))
        _start_when_stopped()
    return {"unit": f"service:{SERVICE_NAME}", "wants_link": None, "managed": True}


def _start_when_stopped() -> None:
    """``sc.exe start``, again while the agent stopped by ``sc.exe stop`` is still stopping (sc.exe
    does not wait: the service answers 1056 until it has reported STOPPED, up to 60 s later)."""
    deadline = time.monotonic() + SERVICE_RESTART_WAIT_S
    while True:
        try:
            subp.run(["sc.exe", "start", SERVICE_NAME], timeout=60)
            return
        except subp.ProcessError as exc:
            if exc.returncode != _SERVICE_ALREADY_RUNNING or time.monotonic() >= deadline:
                raise
        time.sleep(1.0)


def service_uninstall() -> List[str]:
    stop, delete = service_uninstall_commands()
    subp.run(stop, timeout=60, rcs=(0, _SERVICE_NOT_ACTIVE, _SERVICE_DOES_NOT_EXIST))
    rc = subp.run(delete, timeout=60, rcs=(0, _SERVICE_DOES_NOT_EXIST)).returncode
    return [] if rc == _SERVICE_DOES_NOT_EXIST else [f"deleted the Windows service {SERVICE_NAME}"]


def service_state() -> Optional[Tuple[str, str]]:
    """Not read on Windows: ``service install`` waits there for the agent itself (None)."""
    return None


def service_stop() -> None:
    subp.run(["sc.exe", "stop", SERVICE_NAME], timeout=60, rcs=(0, _SERVICE_NOT_ACTIVE))


def run_windows_service(run_agent: Callable[[Callable[[Any], None]], None]) -> int:
    """``--windows-service``: run ``run_agent(attach)`` under the Service Control Manager; the
    agent's exit status (see :mod:`go2cloud_client.platform.winservice`)."""
    from go2cloud_client.platform import winservice

    return winservice.run_service(run_agent, name=SERVICE_NAME)


def forget_environment_secret(name: str) -> None:
    """Remove the secret variable ``name`` from this process's environment (its block in the
    process environment is rewritten by the C runtime, so other processes reading it no longer
    see the value; children do not inherit it)."""
    os.environ.pop(name, None)
