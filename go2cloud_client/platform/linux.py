"""Linux specifics: os-release, machine id, block devices, boot mode, locks, signals, SELinux,
and the systemd unit of service mode."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import stat
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from go2cloud_client import subp
from go2cloud_client.atomicfile import atomic_write
from go2cloud_client.errors import UsageError

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


#: udev's database: one file per device (``b<major>:<minor>``), ``E:KEY=VALUE`` lines
_UDEV_DATA = Path("/run/udev/data")
#: udev properties -> inventory keys: what rebuilding the disk layout on the target needs
_UDEV_KEYS = {"ID_FS_TYPE": "fs_type", "ID_FS_UUID": "fs_uuid", "ID_FS_LABEL": "fs_label",
              "ID_PART_ENTRY_TYPE": "part_type", "ID_PART_ENTRY_UUID": "part_uuid",
              "ID_PART_ENTRY_NAME": "part_name", "ID_PART_TABLE_TYPE": "table",
              "ID_PART_TABLE_UUID": "table_uuid"}


def _udev_facts(dev: Path, udev_data: Path) -> Dict[str, str]:
    """The layout facts udev knows of the device at ``dev`` (a /sys/block entry): filesystem type,
    UUID and label, partition type and UUID, partition table type. {} without udev."""
    try:
        number = (dev / "dev").read_text().strip()
        lines = (udev_data / f"b{number}").read_text(errors="replace").splitlines()
    except OSError:
        return {}
    out: Dict[str, str] = {}
    for line in lines:
        if line.startswith("E:") and "=" in line:
            key, _, value = line[2:].partition("=")
            if key in _UDEV_KEYS and value:
                out[_UDEV_KEYS[key]] = value[:128]
    return out


def block_devices(sys_block: Path = _SYS_BLOCK, udev_data: Path = _UDEV_DATA) -> List[Dict[str, Any]]:
    """Disks from /sys/block with their partitions (sizes and partition starts in bytes; /sys
    counts 512-byte sectors) and what udev knows of their layout (:func:`_udev_facts`). RAM disks
    and empty devices are skipped."""
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
                part: Dict[str, Any] = {"name": child.name, "size_bytes": _read_int(child / "size") * 512}
                if (child / "start").exists():
                    part["number"] = _read_int(child / "partition")
                    part["start_bytes"] = _read_int(child / "start") * 512
                part.update(_udev_facts(child, udev_data))
                partitions.append(part)
        entry: Dict[str, Any] = {"name": name, "size_bytes": size, "partitions": partitions}
        entry.update(_udev_facts(dev, udev_data))
        for serial_file in (dev / "device" / "serial", dev / "serial", dev / "device" / "wwid"):
            try:
                serial = serial_file.read_text(encoding="ascii", errors="replace").strip()
            except OSError:
                continue
            if serial:
                entry["serial"] = serial[:128]  # clone detection (fencing)
                break
        disks.append(entry)
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


def root_block_device(mountinfo: Path = Path("/proc/self/mountinfo")) -> Optional[str]:
    """The block device mounted on ``/`` (``/dev/...``), or None (overlay, tmpfs, unknown)."""
    try:
        lines = mountinfo.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    found: Optional[str] = None
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or " - " not in line or _unescape_mountinfo(fields[4]) != "/":
            continue
        after = line.split(" - ", 1)[1].split()
        if len(after) >= 2:
            found = _unescape_mountinfo(after[1])  # the last mount on / wins (it hides the others)
    if found and found.startswith("/dev/") and os.path.exists(found):
        return found
    return None


# -- SELinux ------------------------------------------------------------------------------------

#: The boot-time SELinux configuration. Module constant so that a test can point it elsewhere.
SELINUX_CONFIG = Path("/etc/selinux/config")
_SELINUX_ENFORCE = Path("/sys/fs/selinux/enforce")
SELINUX_MODES = ("enforcing", "permissive", "disabled")


def selinux_mode() -> Optional[str]:
    """The running SELinux mode (``enforcing``, ``permissive``, ``disabled``), or None when
    SELinux is not part of this system. ``getenforce`` when installed, else
    ``/sys/fs/selinux/enforce``, else ``disabled`` if a config file exists."""
    tool = shutil.which("getenforce")
    if tool:
        try:
            answer = subp.run([tool], timeout=30).stdout.strip().lower()
        except subp.ProcessError:
            answer = ""
        if answer in SELINUX_MODES:
            return answer
    try:
        value = _SELINUX_ENFORCE.read_text().strip()
    except OSError:
        value = ""
    if value in ("0", "1"):
        return "enforcing" if value == "1" else "permissive"
    return "disabled" if selinux_config_mode() is not None else None


def selinux_config_path() -> Path:
    return SELINUX_CONFIG


def selinux_config_mode(path: Optional[Path] = None) -> Optional[str]:
    """The ``SELINUX=`` value of the config file, or None when the file or the line is missing."""
    path = path or SELINUX_CONFIG
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    mode = None
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "SELINUX":
            mode = _unquote(value).strip().lower()
    return mode


def set_selinux_runtime(mode: str) -> None:
    """``setenforce 0`` (permissive) or ``setenforce 1`` (enforcing); ProcessError on failure."""
    if mode not in ("enforcing", "permissive"):
        raise ValueError(f"runtime SELinux mode must be enforcing or permissive, not {mode!r}")
    subp.run(["setenforce", "1" if mode == "enforcing" else "0"], timeout=60)


def set_selinux_config(mode: str, path: Optional[Path] = None) -> None:
    """Set ``SELINUX=<mode>`` in the config file (other lines kept, written atomically with the
    file's mode); OSError on failure."""
    if mode not in SELINUX_MODES:
        raise ValueError(f"SELinux mode must be one of {', '.join(SELINUX_MODES)}, not {mode!r}")
    path = path or SELINUX_CONFIG
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        perms = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        text, perms = "", 0o644
    lines, done = [], False
    for line in text.splitlines():
        key, sep, _ = line.strip().partition("=")
        if sep and key.strip() == "SELINUX":
            if done:
                continue
            line, done = f"SELINUX={mode}", True
        lines.append(line)
    if not done:
        lines.append(f"SELINUX={mode}")
    atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape"), mode=perms)


# -- service mode (systemd) ---------------------------------------------------------------------

SERVICE_NAME = "go2cloud_client"
UNIT_NAME = f"{SERVICE_NAME}.service"
SYSTEMD_DIR = Path("/etc/systemd/system")
#: Tests (and unusual hosts) put the unit elsewhere; systemctl is then never called.
SYSTEMD_DIR_ENV = "GO2CLOUD_SYSTEMD_DIR"
_SYSTEMD_RUNNING = Path("/run/systemd/system")
WANTED_BY = "multi-user.target"


def service_unit_dir() -> Path:
    override = os.environ.get(SYSTEMD_DIR_ENV)
    return Path(override) if override else SYSTEMD_DIR


def service_manager_running() -> bool:
    """Whether systemd runs this host (``/run/systemd/system`` exists) and owns the unit
    directory (not overridden by ``$GO2CLOUD_SYSTEMD_DIR``)."""
    return not os.environ.get(SYSTEMD_DIR_ENV) and _SYSTEMD_RUNNING.is_dir()


def _unit_quote(arg: str) -> str:
    """One word of a systemd command line or assignment: ``%`` doubled (specifier), ``$``
    doubled (variable expansion), double quotes when it has spaces, quotes or backslashes."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not any(c.isspace() or c in "\"'\\;" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def service_unit_text(argv: Sequence[str], home: Path, env_file: Optional[Path] = None) -> str:
    """The systemd unit of the agent (the only place the unit text is written). ``env_file``: a
    root-only file of more environment (the proxy setting, which may hold credentials: not in
    the world-readable unit, nor in what ``systemctl show`` tells every user)."""
    exec_start = " ".join(_unit_quote(a) for a in argv)
    env_line = f"EnvironmentFile={_unit_quote(str(env_file))}\n" if env_file is not None else ""
    return (
        "# Written by go2cloud_client service install; go2cloud_client service uninstall removes it.\n"
        "[Unit]\n"
        f"Description=go2cloud_client migration agent (home {str(home).replace('%', '%%')})\n"
        "After=network-online.target\n"
        "Wants=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"Environment={_unit_quote('GO2CLOUD_HOME=' + str(home))}\n"
        f"{env_line}"
        f"ExecStart={exec_start}\n"
        "Restart=always\n"
        "RestartSec=5\n"
        # usage (not imported, --no-prompt), config, identity-rejected and session-conflict (a
        # cloned machine: another live agent holds the source) errors do not heal by
        # restarting: the agent stays stopped and systemctl status shows its exit code
        "RestartPreventExitStatus=2 3 25 26\n"
        "KillMode=mixed\n"
        "TimeoutStopSec=60\n"
        "\n"
        "[Install]\n"
        f"WantedBy={WANTED_BY}\n"
    )


def service_paths() -> Tuple[Path, Path]:
    """(unit file, the ``multi-user.target.wants`` symlink that ``systemctl enable`` makes)."""
    directory = service_unit_dir()
    return directory / UNIT_NAME, directory / f"{WANTED_BY}.wants" / UNIT_NAME


def service_status_hint() -> str:
    return f"'systemctl status {UNIT_NAME}'"


def service_home() -> Optional[Path]:
    """The agent home of the installed unit (its ``GO2CLOUD_HOME``), or None without a unit."""
    unit, _ = service_paths()
    try:
        text = unit.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    import shlex

    for line in text.splitlines():
        if line.startswith("Environment="):
            for word in shlex.split(line[len("Environment="):].replace("$$", "$").replace("%%", "%")):
                if word.startswith("GO2CLOUD_HOME="):
                    return Path(word[len("GO2CLOUD_HOME="):])
    return None


def service_install(argv: Sequence[str], home: Path, *, start: bool,
                    env_file: Optional[Path] = None) -> Dict[str, Any]:
    """Write the unit and enable it. With systemd running: ``daemon-reload``, ``enable``, and
    ``restart`` when ``start``; ``managed`` is True. Otherwise the ``.wants`` symlink is made
    by hand (what enable does) and the caller starts the agent itself (``managed`` False).
    OSError / subp.ProcessError on failure."""
    unit, wants = service_paths()
    unit.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(unit, service_unit_text(argv, home, env_file).encode("utf-8"), mode=0o644)
    managed = service_manager_running()
    if managed:
        subp.run(["systemctl", "daemon-reload"], timeout=120)
        subp.run(["systemctl", "enable", UNIT_NAME], timeout=120)
        if start:
            subp.run(["systemctl", "restart", UNIT_NAME], timeout=180)
    else:
        wants.parent.mkdir(parents=True, exist_ok=True)
        if wants.is_symlink() or wants.exists():
            wants.unlink()
        wants.symlink_to(unit)
    return {"unit": str(unit), "wants_link": str(wants), "managed": managed}


def service_uninstall() -> List[str]:
    """Stop and disable the unit (systemd running) and remove the unit file and the symlink.
    Returns what was removed; idempotent. OSError / subp.ProcessError on failure."""
    unit, wants = service_paths()
    done: List[str] = []
    if service_manager_running() and unit.exists():
        subp.run(["systemctl", "disable", "--now", UNIT_NAME], timeout=180)
        done.append(f"stopped and disabled {UNIT_NAME}")
    for path in (wants, unit):
        if path.is_symlink() or path.exists():
            path.unlink()
            done.append(f"removed {path}")
    if done and service_manager_running():
        subp.run(["systemctl", "daemon-reload"], timeout=120)
    return done


def service_state() -> Optional[Tuple[str, str]]:
    """systemd's (ActiveState, SubState) of the unit, e.g. ("activating", "auto-restart") while it
    waits to restart an agent that exited, or ("active", "running"); None when it cannot tell."""
    try:
        out = subp.run(["systemctl", "show", "-p", "ActiveState", "-p", "SubState", UNIT_NAME],
                       timeout=30).stdout
    except (OSError, subp.ProcessError):
        return None
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    if "ActiveState" not in values:
        return None
    return values["ActiveState"], values.get("SubState", "")


def service_stop() -> None:
    """Stop the unit through systemd (with ``Restart=always`` a signal alone would only make
    systemd start it again). Only meaningful when :func:`service_manager_running`."""
    subp.run(["systemctl", "stop", UNIT_NAME], timeout=180)


def run_windows_service(run_agent: Callable[[Callable[[Any], None]], None]) -> int:
    """``--windows-service`` is the binPath of the Windows service; systemd needs nothing of it."""
    raise UsageError("--windows-service is only for the Windows Service Control Manager; on Linux "
                     "run go2cloud_client without it (systemd runs the agent as it is)")


def forget_environment_secret(name: str) -> None:
    """Remove the secret variable ``name`` from this process: from ``os.environ`` (children do not
    inherit it) and from the environment block the kernel shows as ``/proc/PID/environ``. That
    block is the memory the process was started with; unsetting a variable does not change it,
    so its value is overwritten in place with NUL bytes."""
    os.environ.pop(name, None)
    try:
        with open("/proc/self/stat", "rb") as fh:
            stat_line = fh.read()
        fields = stat_line[stat_line.rindex(b")") + 2:].split()
        env_start, env_end = int(fields[47]), int(fields[48])  # fields 50 and 51 of proc(5)
    except (OSError, ValueError, IndexError):
        return
    if not 0 < env_start < env_end:
        return
    import ctypes

    block = ctypes.string_at(env_start, env_end - env_start)
    prefix = name.encode() + b"="
    at = block.find(prefix)
    while at >= 0:
        if at == 0 or block[at - 1] == 0:
            value = at + len(prefix)
            end = block.find(b"\0", value)
            end = len(block) if end < 0 else end
            ctypes.memset(env_start + value, 0, end - value)
        at = block.find(prefix, at + 1)
