"""The drill's checks: one small function per check, each taking a :class:`Context` and returning
its items.

Everything a check looks at comes from the context (paths to migrate, disks, the mode, the control
plane, the fstab / boot / modules locations, the tmp directory, the environment...), so tests
point a check at real conditions they prepared (a full loop filesystem, a noexec tmpfs, an fstab
with device names, a server with a skewed clock). Thresholds are module constants, documented in
docs/operator-guide.md ("Drill").
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import psutil

from go2cloud_client import platform
from go2cloud_client.commands import AUTO_SNAPSHOT_ORDER, NON_PIT_ALTERNATIVES, alternatives_text
from go2cloud_client.drill import initramfs
from go2cloud_client.drill.model import Item, critical, info, warning
from go2cloud_client.errors import ProxyRefusedError
from go2cloud_client.proxy import (  # noqa: F401 - bypasses_proxy re-exported
    ProxySettings,
    ProxyURL,
    bypasses_proxy,
    connect_via_proxy,
    parse_proxy_url,
    settings_at_import,
)

#: Used space / inodes of a filesystem: critical above, warning above (percent).
USED_CRITICAL_PCT = 99.0
USED_WARNING_PCT = 90.0
#: Clock difference with the control plane (seconds): critical above, warning above.
SKEW_CRITICAL_S = 300.0
SKEW_WARNING_S = 60.0
#: TCP connect timeout of the reachability checks (seconds).
CONNECT_TIMEOUT_S = 3.0
#: rsync older than this cannot run the transfer (``--info=progress2``), newer than the second
#: has every option the agent uses (``--modify-window=-1``, ``--mkpath``).
RSYNC_MIN = (3, 1, 0)
RSYNC_GOOD = (3, 2, 3)
#: Kernels older than this are not supported by current cloud images' tools.
KERNEL_MIN = (2, 6, 32)
KERNEL_OLD = (3, 10, 0)
SUPPORTED_ARCHES = ("x86_64", "amd64", "aarch64", "arm64")
VIRTIO_DRIVERS = ("virtio_blk", "virtio_scsi", "virtio_net")
#: Process names whose files change under a live file copy (databases, container runtimes).
LIVE_DATA_PROCESSES = {
    "mysqld": "MySQL", "mariadbd": "MariaDB", "postgres": "PostgreSQL", "postmaster": "PostgreSQL",
    "mongod": "MongoDB", "redis-server": "Redis", "oracle": "Oracle", "sqlservr": "SQL Server",
    "influxd": "InfluxDB", "etcd": "etcd", "elasticsearch": "Elasticsearch", "dockerd": "Docker",
    "containerd": "containerd", "podman": "Podman", "conmon": "Podman", "crio": "CRI-O",
}
#: fstab sources that name a device by its place on the bus: they change on another hypervisor.
_DEVICE_NAME_RE = re.compile(
    r"^/dev/(sd[a-z]+|vd[a-z]+|xvd[a-z]+|hd[a-z]+|nvme\d+n\d+|mmcblk\d+)(p?\d+)?$")


@dataclass(frozen=True)
class Target:
    """A TCP endpoint the migration needs (the control plane port that receives the data)."""

    label: str
    host: str
    port: int


@dataclass(frozen=True)
class TimeProbe:
    """The answer of ``GET /api/v1/time`` (or why there was none)."""

    ok: bool
    skew_s: float = 0.0  # local clock minus the control plane's
    rtt_s: float = 0.0
    error: str = ""


def _default_processes() -> List[str]:
    names = []
    for proc in psutil.process_iter(["name"]):
        name = proc.info.get("name")
        if name:
            names.append(str(name))
    return names


def _default_snapshot_probe(volume: Optional[str]) -> Optional[Dict[str, Tuple[bool, str]]]:
    """{backend: (usable, reason)} from the snapshot driver, None when it is not installed."""
    try:
        from snapshot_driver import registry
    except ImportError:
        return None
    return {name: (res.usable, res.reason) for name, res in registry.probe_all(volume).items()}


@dataclass
class Context:
    """What the checks look at. Defaults describe this host; tests override the fields."""

    mode: str = "file"
    paths: Sequence[str] = ()
    disks: Sequence[str] = ()
    snapshot: Optional[str] = None
    home: Path = Path(".")
    tmp_dir: str = field(default_factory=tempfile.gettempdir)
    server_url: Optional[str] = None
    #: returns the control plane's time as epoch seconds (raises on failure); None = no server
    server_time: Optional[Callable[[], float]] = None
    targets: Sequence[Target] = ()
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    os_name: str = platform.NAME
    os_release: Mapping[str, str] = field(default_factory=platform.os_release)
    kernel: str = field(default_factory=platform.kernel)
    arch: str = field(default_factory=platform.arch)
    boot_mode: str = field(default_factory=platform.boot_mode)
    is_root: bool = field(default_factory=lambda: getattr(os, "geteuid", lambda: 0)() == 0)
    fstab: Path = Path("/etc/fstab")
    boot_dir: Path = Path("/boot")
    modules_dir: Path = Path("/lib/modules")
    selinux_dir: Path = Path("/sys/fs/selinux")
    apparmor_file: Path = Path("/sys/module/apparmor/parameters/enabled")
    rsync_path: Optional[str] = None
    connect_timeout: float = CONNECT_TIMEOUT_S
    process_names: Callable[[], Iterable[str]] = _default_processes
    snapshot_probe: Callable[[Optional[str]], Optional[Dict[str, Tuple[bool, str]]]] = _default_snapshot_probe
    clock: Callable[[], float] = time.time
    _time_probe: Optional[TimeProbe] = field(default=None, repr=False)
    #: the agent's proxy setting; None: the standard environment (``env``)
    proxy: Optional[ProxySettings] = None

    def time_probe(self) -> Optional[TimeProbe]:
        """One call to the control plane's clock, shared by the reachability and skew checks."""
        if self.server_time is None:
            return None
        if self._time_probe is None:
            t0 = self.clock()
            mono = time.monotonic()
            try:
                server = float(self.server_time())
            except Exception as exc:  # noqa: BLE001 - any failure means: not reachable
                self._time_probe = TimeProbe(False, error=str(exc) or type(exc).__name__)
            else:
                rtt = time.monotonic() - mono
                self._time_probe = TimeProbe(True, skew_s=(t0 + rtt / 2) - server, rtt_s=rtt)
        return self._time_probe


# -- helpers ------------------------------------------------------------------------------------


def _version_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def mount_point(path: str) -> str:
    """The mount point holding ``path`` (the nearest existing ancestor for a missing path)."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and p != os.path.dirname(p):
        p = os.path.dirname(p)
    while not os.path.ismount(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def _existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p) and p != os.path.dirname(p):
        p = os.path.dirname(p)
    return p


def _pct(used: int, total: int) -> float:
    return 100.0 * used / total if total > 0 else 0.0


# -- checks -------------------------------------------------------------------------------------


def check_os(ctx: Context) -> List[Item]:
    """OS, distribution, kernel and architecture are ones the migration supports."""
    items: List[Item] = []
    pretty = ctx.os_release.get("PRETTY_NAME") or ctx.os_release.get("ID") or ctx.os_name
    if ctx.arch not in SUPPORTED_ARCHES:
        items.append(critical("os", f"architecture {ctx.arch} is not supported (x86_64 and arm64 only)",
                              "migrate this server with another tool, or rebuild it on a supported "
                              "architecture", arch=ctx.arch))
    if ctx.os_name == "linux":
        kernel = _version_tuple(ctx.kernel)
        if kernel and kernel < KERNEL_MIN:
            items.append(critical("os", f"kernel {ctx.kernel} is older than "
                                        f"{'.'.join(map(str, KERNEL_MIN))}: the target cannot boot it",
                                  "upgrade the kernel before migrating", kernel=ctx.kernel))
        elif kernel and kernel < KERNEL_OLD:
            items.append(warning("os", f"kernel {ctx.kernel} is older than 3.10: virtio and the snapshot "
                                       "driver may be missing", "upgrade the kernel if you can",
                                 kernel=ctx.kernel))
        if platform.distro_for(ctx.os_release) is None:
            items.append(warning("os", f"distribution {pretty!r} is not one go2cloud_client knows: it will "
                                       "not install packages (rsync, snapshot driver) for you",
                                 "install rsync yourself; the migration itself works on any Linux",
                                 id=ctx.os_release.get("ID", "")))
    elif ctx.mode == "file" and not platform.SUPPORTS_FILE_MODE:
        items.append(critical("os", f"file-level migration is not supported on {ctx.os_name}",
                              "use mode block for this server"))
    if not items:
        items.append(info("os", f"{pretty}, kernel {ctx.kernel}, {ctx.arch}: supported",
                          kernel=ctx.kernel, arch=ctx.arch))
    return items


def check_privileges(ctx: Context) -> List[Item]:
    if ctx.is_root:
        return [info("privileges", "running as root (Administrator)")]
    return [warning("privileges", "not running as root: files and devices only root can read will be "
                                  "missing from the copy", "run go2cloud_client as root (sudo)")]


def check_sources(ctx: Context) -> List[Item]:
    """The paths (mode file) or disks (mode block) to migrate exist on this host."""
    items: List[Item] = []
    if ctx.mode == "block":
        from go2cloud_client.commands import is_disk

        for disk in ctx.disks:
            if not is_disk(disk):
                items.append(critical("sources", f"disk {disk} is not a block device or image file on this "
                                                 "host", "check the --disk value (lsblk lists the disks)",
                                      disk=disk))
        if not items:
            items.append(info("sources", f"disks to migrate: {', '.join(ctx.disks) or '-'}"))
        return items
    for path in ctx.paths:
        if not os.path.isdir(path):
            items.append(critical("sources", f"path {path} is not an existing directory on this host",
                                  "fix the path of the migration (go2cloud_server migration start --path)",
                                  path=path))
    if not items:
        items.append(info("sources", f"paths to migrate: {', '.join(ctx.paths) or '-'}"))
    return items


def check_rsync(ctx: Context) -> List[Item]:
    """rsync is installed and new enough (mode file)."""
    if ctx.mode != "file":
        return [info("rsync", "mode block: rsync is not needed")]
    from go2cloud_client.errors import RsyncMissingError
    from go2cloud_client.replication.rsync import find_rsync, rsync_version

    path = ctx.rsync_path or find_rsync()
    distro = platform.distro_for(ctx.os_release)
    how = (f"re-run go2cloud_client with --yes to install it, or run: "
           f"{' '.join(distro.install_command(['rsync']))}" if distro
           else "install rsync with your package manager")
    if not path:
        return [critical("rsync", "rsync is not installed", how)]
    try:
        version = rsync_version(path)
    except RsyncMissingError as exc:
        return [critical("rsync", f"rsync at {path} does not run: {exc}", how, path=path)]
    shown = ".".join(map(str, version))
    if version < RSYNC_MIN:
        return [critical("rsync", f"rsync {shown} is too old (at least {'.'.join(map(str, RSYNC_MIN))})",
                         "upgrade rsync with your package manager", path=path, version=shown)]
    if version < RSYNC_GOOD:
        return [warning("rsync", f"rsync {shown} works but lacks --mkpath and exact time stamps (3.2.3+)",
                        "upgrade rsync if your distribution offers a newer one", path=path, version=shown)]
    return [info("rsync", f"rsync {shown} ({path})", path=path, version=shown)]


def check_security_modules(ctx: Context) -> List[Item]:
    """SELinux enforcing relabels or blocks on the target; AppArmor is only reported."""
    if ctx.os_name != "linux":
        return [info("security_modules", f"not applicable on {ctx.os_name}")]
    items: List[Item] = []
    enforce = ctx.selinux_dir / "enforce"
    try:
        mode = enforce.read_text().strip()
    except OSError:
        items.append(info("security_modules", "SELinux is not active"))
    else:
        if mode == "1":
            items.append(warning("security_modules", "SELinux is enforcing: the copied system relabels "
                                                     "on first boot and may deny services on the target",
                                 "set SELINUX=permissive in /etc/selinux/config and run 'setenforce 0' "
                                 "(go2cloud_client offers it at import), or plan a relabel on the target",
                                 selinux="enforcing"))
        else:
            items.append(info("security_modules", "SELinux is permissive", selinux="permissive"))
    try:
        apparmor = ctx.apparmor_file.read_text().strip()
    except OSError:
        apparmor = ""
    if apparmor.upper().startswith("Y"):
        items.append(info("security_modules", "AppArmor is enabled (the agent runs unconfined)",
                          apparmor=True))
    return items


def _fs_usage(path: str) -> Tuple[float, float, int, int]:
    """(used %, inodes used %, free bytes, free inodes) like df (reserved blocks count as used)."""
    st = os.statvfs(path)
    used_blocks = st.f_blocks - st.f_bfree
    avail = used_blocks + st.f_bavail
    inodes_used = st.f_files - st.f_ffree
    return (_pct(used_blocks, avail), _pct(inodes_used, st.f_files), st.f_bavail * st.f_frsize,
            st.f_favail)


def _space_items(label: str, path: str) -> List[Item]:
    where = _existing(path)
    mp = mount_point(where)
    try:
        used, iused, free, ifree = _fs_usage(where)
    except OSError as exc:
        return [warning("free_space", f"cannot read the free space of {path}: {exc.strerror}",
                        "check that the filesystem is mounted and readable", path=path)]
    items: List[Item] = []
    on = f"{label} {path} (filesystem {mp})"
    data: Dict[str, Any] = {"path": path, "mount_point": mp, "used_pct": round(used, 1),
                            "inodes_used_pct": round(iused, 1), "free_bytes": free, "free_inodes": ifree}
    for what, pct, fix in (
        ("space", used, f"free space on {mp} (delete or move files, grow the filesystem)"),
        ("inodes", iused, f"delete small files on {mp} (cache, session or mail directories) or grow it"),
    ):
        if pct > USED_CRITICAL_PCT:
            items.append(critical("free_space", f"{on} is full: {pct:.1f}% of its {what} used", fix, **data))
        elif pct > USED_WARNING_PCT:
            items.append(warning("free_space", f"{on} is {pct:.1f}% full ({what})", fix, **data))
    if not items:
        items.append(info("free_space", f"{on}: {used:.0f}% used, {iused:.0f}% inodes used", **data))
    return items


def check_free_space(ctx: Context) -> List[Item]:
    """Free space and inodes of every path to migrate, of the agent home and of the tmp dir."""
    items: List[Item] = []
    seen = set()
    wanted = [("path", p) for p in ctx.paths] if ctx.mode == "file" else []
    wanted += [("agent home", str(ctx.home)), ("temporary directory", ctx.tmp_dir)]
    for label, path in wanted:
        try:
            dev = os.stat(_existing(path)).st_dev
        except OSError:
            dev = None
        if dev is not None and dev in seen and label != "path":
            continue
        if dev is not None:
            seen.add(dev)
        items.extend(_space_items(label, path))
    return items


def check_control_plane(ctx: Context) -> List[Item]:
    """The control plane answers (``GET /api/v1/time``)."""
    probe = ctx.time_probe()
    if probe is None:
        return [info("control_plane", "no control plane given: reachability and clock not checked",
                     "pass --server URL (or import this host first)")]
    if not probe.ok:
        return [critical("control_plane",
                         f"the control plane {ctx.server_url} cannot be reached: {probe.error}",
                         "check the URL, the firewall (outbound HTTPS to the control plane's port), the "
                         "proxy settings and the --server-fingerprint", server=ctx.server_url)]
    return [info("control_plane", f"the control plane {ctx.server_url} answers ({probe.rtt_s * 1000:.0f} ms)",
                 server=ctx.server_url, rtt_ms=round(probe.rtt_s * 1000, 1))]


def check_clock(ctx: Context) -> List[Item]:
    """This host's clock against the control plane's."""
    probe = ctx.time_probe()
    if probe is None or not probe.ok:
        return [info("clock", "the clock could not be compared with the control plane's")]
    skew = probe.skew_s
    side = "ahead of" if skew > 0 else "behind"
    data: Dict[str, Any] = {"skew_s": round(skew, 1)}
    fix = "synchronise the clock with NTP (timedatectl set-ntp true, chronyd or ntpd)"
    if abs(skew) > SKEW_CRITICAL_S:
        return [critical("clock", f"this host's clock is {abs(skew):.0f} s {side} the control plane's "
                                  f"(more than {SKEW_CRITICAL_S:.0f} s)", fix, **data)]
    if abs(skew) > SKEW_WARNING_S:
        return [warning("clock", f"this host's clock is {abs(skew):.0f} s {side} the control plane's", fix,
                        **data)]
    return [info("clock", f"clock within {abs(skew):.1f} s of the control plane's", **data)]


def tcp_connect(host: str, port: int, timeout: float) -> Optional[str]:
    """None when a TCP connection to host:port opens, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.timeout:
        return f"no answer within {timeout:g} s"
    except OSError as exc:
        return exc.strerror or str(exc)


def connect_through(proxy: ProxyURL, host: str, port: int, timeout: float) -> Optional[str]:
    """None when the proxy opens a CONNECT tunnel to host:port, else why not."""
    try:
        connect_via_proxy(proxy, host, port, timeout).close()
        return None
    except ProxyRefusedError as exc:
        return str(exc)
    except socket.timeout:
        return f"no answer within {timeout:g} s"
    except OSError as exc:
        return exc.strerror or str(exc)


def check_targets(ctx: Context) -> List[Item]:
    """The target ports of the migration open (the control plane port that receives its data)."""
    if not ctx.targets:
        return [info("target_ports", "no target given: checked when the control plane runs the drill")]
    items = []
    settings = proxy_of(ctx)
    for t in ctx.targets:
        via = settings.for_host(t.host) if settings.proxy else None
        if via is not None:
            why = connect_through(via, t.host, t.port, ctx.connect_timeout)
        else:
            why = tcp_connect(t.host, t.port, ctx.connect_timeout)
        where = f"{t.label} at {t.host}:{t.port}" + (f" (through the proxy {via.display})" if via else "")
        if why:
            items.append(critical("target_ports", f"cannot connect to the {where}: {why}",
                                  f"open outbound TCP port {t.port} to {t.host} in the firewall / security "
                                  "group, and check that the target is running", host=t.host, port=t.port))
        else:
            items.append(info("target_ports", f"{where} is reachable", host=t.host, port=t.port))
    return items


def proxy_of(ctx: Context) -> ProxySettings:
    """The agent's proxy setting: the one it was given, else the standard environment."""
    if ctx.proxy is not None:
        return ctx.proxy
    return settings_at_import(None, None, ctx.env)


def check_proxy(ctx: Context) -> List[Item]:
    """The agent's HTTP proxy: reachable, and which hosts go through it."""
    from urllib.parse import urlsplit

    settings = proxy_of(ctx)
    if not settings.proxy:
        return [info("proxy", "no HTTP proxy is set: the agent connects directly")]
    try:
        proxy = parse_proxy_url(settings.proxy)
    except ValueError as exc:
        return [critical("proxy", f"the proxy setting is invalid: {exc}",
                         "set --proxy / GO2CLOUD_PROXY / proxy: in config.yaml to http://[USER:PASSWORD@]HOST:PORT")]
    why = tcp_connect(proxy.host, proxy.port, ctx.connect_timeout)
    if why:
        return [critical("proxy", f"the proxy {proxy.display} cannot be reached: {why}",
                         "check the proxy address and port, that the proxy runs, and the firewall between "
                         "this host and the proxy (or remove the proxy setting)", proxy=proxy.display)]
    hosts = []
    for url in (ctx.server_url or "").split(","):
        if url.strip():
            hosts.append(("control plane", urlsplit(url.strip()).hostname or ""))
    hosts += [(t.label, t.host) for t in ctx.targets]
    items = [info("proxy", f"the proxy {proxy.display} is reachable", proxy=proxy.display)]
    for label, host in hosts:
        if settings.for_host(host) is None:
            items.append(info("proxy", f"the {label} {host} is reached directly (in no_proxy)", host=host))
        else:
            items.append(info("proxy", f"the {label} {host} is reached through the proxy {proxy.display} "
                                       "(CONNECT; the pinned certificate is checked end to end, so a proxy "
                                       "that inspects TLS fails)", host=host, proxy=proxy.display))
    return items


def check_tmp(ctx: Context) -> List[Item]:
    """The temporary directory allows executing programs."""
    flag = getattr(os, "ST_NOEXEC", 8)
    try:
        noexec = bool(os.statvfs(ctx.tmp_dir).f_flag & flag)
    except OSError as exc:
        return [warning("tmp", f"cannot read the temporary directory {ctx.tmp_dir}: {exc.strerror}",
                        "create it (mode 1777) or set TMPDIR to a writable directory")]
    if noexec:
        mp = mount_point(ctx.tmp_dir)
        return [warning("tmp", f"the temporary directory {ctx.tmp_dir} is on {mp} mounted noexec: the "
                               "packaged agent, package scripts and the snapshot driver build cannot run "
                               "there",
                        f"run 'mount -o remount,exec {mp}' for the migration, or set TMPDIR to a directory "
                        "on an exec filesystem for go2cloud_client", path=ctx.tmp_dir, mount_point=mp)]
    return [info("tmp", f"the temporary directory {ctx.tmp_dir} allows executing programs")]


def _bootloaders(boot: Path, uefi: bool) -> List[str]:
    found = []
    if uefi:
        for efi in sorted((boot / "efi" / "EFI").glob("*/*.efi")) + sorted((boot / "EFI").glob("*/*.efi")):
            found.append(str(efi))
    for cfg in ("grub/grub.cfg", "grub2/grub.cfg", "extlinux/extlinux.conf", "syslinux/syslinux.cfg",
                "loader/loader.conf"):
        if (boot / cfg).is_file():
            found.append(str(boot / cfg))
    return found


def check_boot(ctx: Context) -> List[Item]:
    """Boot mode and a bootloader the target can start."""
    if ctx.os_name != "linux":
        return [info("boot", f"boot mode {ctx.boot_mode}", boot_mode=ctx.boot_mode)]
    uefi = ctx.boot_mode == "uefi"
    found = _bootloaders(ctx.boot_dir, uefi)
    if not found:
        return [warning("boot", f"boot mode {ctx.boot_mode.upper()}, but no bootloader was found under "
                                f"{ctx.boot_dir} (grub, extlinux, systemd-boot"
                                f"{', EFI binaries' if uefi else ''}): the copy will not boot by itself",
                        "install the bootloader (grub2-install / grub-install), or migrate the data only "
                        "and boot the target from a cloud image", boot_mode=ctx.boot_mode)]
    return [info("boot", f"boot mode {ctx.boot_mode.upper()}, bootloader {found[0]}",
                 boot_mode=ctx.boot_mode, bootloader=found[0])]


def check_fstab(ctx: Context) -> List[Item]:
    """fstab entries naming devices by bus position (/dev/sda1, /dev/vdb) do not survive."""
    try:
        lines = ctx.fstab.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return [info("fstab", f"{ctx.fstab} does not exist")]
    except OSError as exc:
        return [warning("fstab", f"cannot read {ctx.fstab}: {exc.strerror}", "run as root")]
    bad = []
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if _DEVICE_NAME_RE.match(fields[0]):
            bad.append((n, fields[0], fields[1] if len(fields) > 1 else "?"))
    if not bad:
        return [info("fstab", f"{ctx.fstab}: every entry names its device by UUID, LABEL, path or mapper")]
    listed = "; ".join(f"line {n}: {dev} on {mp}" for n, dev, mp in bad)
    return [warning("fstab", f"{ctx.fstab} names devices by their bus position, which changes on the target "
                             f"({listed})",
                    f"replace each device with UUID=<uuid> (shown by 'blkid {bad[0][1]}') in {ctx.fstab}",
                    lines=[n for n, _, _ in bad], devices=[d for _, d, _ in bad])]


def _initramfs_file(boot: Path, kernel: str) -> Optional[Path]:
    for name in (f"initrd.img-{kernel}", f"initramfs-{kernel}.img", f"initrd-{kernel}", "initrd.img",
                 "initramfs.img"):
        if (boot / name).is_file():
            return boot / name
    return None


def _module_names(names: Iterable[str]) -> set:
    out = set()
    for name in names:
        base = os.path.basename(name.strip())
        m = re.match(r"^([A-Za-z0-9_-]+)\.ko(\.(xz|gz|zst))?$", base)
        if m:
            out.add(m.group(1).replace("-", "_"))
    return out


def check_virtio(ctx: Context) -> List[Item]:
    """virtio_blk / virtio_scsi / virtio_net are built into the kernel or in the initramfs."""
    if ctx.os_name != "linux":
        return [info("virtio", f"not applicable on {ctx.os_name} (install the virtio drivers for Windows)")]
    builtin: set = set()
    try:
        builtin = _module_names((ctx.modules_dir / ctx.kernel / "modules.builtin").read_text().splitlines())
    except OSError:
        pass
    missing = [d for d in VIRTIO_DRIVERS if d not in builtin]
    if not missing:
        return [info("virtio", "virtio drivers are built into the kernel")]
    image = _initramfs_file(ctx.boot_dir, ctx.kernel)
    listing: Optional[List[str]] = None
    why = ""
    if image is not None:
        listing = initramfs.list_with_tool(image)
        if listing is None:
            try:
                listing = initramfs.read_names(image)
            except (OSError, initramfs.InitramfsUnreadable, EOFError, ValueError) as exc:
                why = f"{image} cannot be read ({exc})"
    else:
        why = f"no initramfs for kernel {ctx.kernel} in {ctx.boot_dir}"
    if listing is None:
        return [info("virtio", f"cannot tell whether {', '.join(missing)} will load at boot: {why}",
                     "make sure the initramfs of the kernel you boot contains virtio_blk, virtio_scsi "
                     "and virtio_net", missing=missing)]
    missing = [d for d in missing if d not in _module_names(listing)]
    if not missing:
        return [info("virtio", f"virtio drivers are in the kernel or in {image}")]
    return [warning("virtio", f"{', '.join(missing)} neither built into kernel {ctx.kernel} nor in {image}: "
                              "the target (KVM) may not find its disk or network at boot",
                    "add them to the initramfs: Debian/Ubuntu: list them in /etc/initramfs-tools/modules and "
                    "run 'update-initramfs -u'; RHEL/SUSE: dracut -f --add-drivers "
                    "'virtio_blk virtio_scsi virtio_net'", missing=missing, initramfs=str(image))]


def check_live_data(ctx: Context) -> List[Item]:
    """Databases and container runtimes change their files under a live copy."""
    running = sorted({LIVE_DATA_PROCESSES[n] for n in ctx.process_names() if n in LIVE_DATA_PROCESSES})
    if not running:
        return [info("live_data", "no database or container runtime is running")]
    names = ", ".join(running)
    if ctx.mode == "block":
        return [info("live_data", f"running: {names}: the block copy through a snapshot is crash-consistent",
                     "stop them (or flush them) before the final sync for an application-consistent copy",
                     running=running)]
    return [warning("live_data", f"running: {names}: their files change while they are copied, so the copy "
                                 "may be inconsistent",
                    "stop them before the final sync (complete --final-sync), or migrate in block mode with "
                    "a snapshot", running=running)]


def check_snapshot(ctx: Context) -> List[Item]:
    """A snapshot backend is usable (needed in mode block)."""
    volumes: List[Optional[str]] = list(ctx.disks) if ctx.mode == "block" and ctx.disks else [None]
    results = {}
    for volume in volumes:
        probed = ctx.snapshot_probe(volume)
        if probed is None:
            if ctx.mode == "block":
                return [critical("snapshot", "the snapshot driver is not installed with this agent",
                                 "install the full go2cloud_client package (with snapshot_driver), or "
                                 "migrate in file mode")]
            return [info("snapshot", "the snapshot driver is not installed (only needed in block mode)")]
        results[volume] = probed
    items = []
    for volume, probed in results.items():
        usable = [n for n, (ok, _) in sorted(probed.items()) if ok]
        on = f" for {volume}" if volume else ""
        wanted = ctx.snapshot if ctx.mode == "block" and ctx.snapshot not in (None, "auto") else None
        pit = [n for n in usable if n in AUTO_SNAPSHOT_ORDER]
        if wanted:
            ok, reason = probed.get(wanted, (False, f"unknown backend {wanted}"))
            cost = NON_PIT_ALTERNATIVES.get(wanted)
            if ok and cost:
                items.append(info("snapshot", f"snapshot backend {wanted}{on} chosen explicitly by the "
                                              f"operator (not point in time for the whole pass: {cost}): "
                                              f"{reason}",
                                  backend=wanted, explicit=True, cost=cost, point_in_time_usable=pit))
            elif ok:
                items.append(info("snapshot", f"snapshot backend {wanted}{on} is usable: {reason}",
                                  backend=wanted))
            else:
                items.append(critical("snapshot", f"snapshot backend {wanted}{on} cannot be used: {reason}",
                                      f"pick another backend (usable here: {', '.join(usable) or 'none'}) or "
                                      "fix the reason above", backend=wanted))
        elif ctx.mode == "block" and not pit:
            # auto takes only a point-in-time backend: never a silent fall back to fsfreeze or live
            reasons = "; ".join(probed[n][1] for n in AUTO_SNAPSHOT_ORDER if n in probed) or "none known"
            left = {n: c for n, c in NON_PIT_ALTERNATIVES.items() if probed.get(n, (False, ""))[0]}
            fix = (f"choose explicitly with 'migration start --snapshot NAME': {alternatives_text()}"
                   if left else "no other backend is usable either: migrate in file mode")
            fix += f"; or make one of {', '.join(AUTO_SNAPSHOT_ORDER)} usable (LVM, btrfs, XFS reflink, " \
                   "the elastio-snap/dattobd module)"
            items.append(critical("snapshot", f"--snapshot auto: no point-in-time snapshot backend is usable"
                                              f"{on} ({reasons})", fix,
                                  usable=usable, alternatives=left))
        elif not usable:
            reasons = "; ".join(r for _, (_, r) in sorted(probed.items()))
            items.append(warning("snapshot", f"no snapshot backend is usable{on}: {reasons}",
                                 "run the agent as root and install a snapshot backend (LVM, btrfs, XFS "
                                 "reflink or the elastio-snap/dattobd module)", usable=[]))
        else:
            items.append(info("snapshot", f"usable snapshot backends{on}: {', '.join(usable)}",
                              usable=usable))
    return items


#: Every check, in report order.
ALL_CHECKS: Tuple[Tuple[str, Callable[[Context], List[Item]]], ...] = (
    ("os", check_os),
    ("privileges", check_privileges),
    ("sources", check_sources),
    ("rsync", check_rsync),
    ("security_modules", check_security_modules),
    ("free_space", check_free_space),
    ("control_plane", check_control_plane),
    ("clock", check_clock),
    ("target_ports", check_targets),
    ("proxy", check_proxy),
    ("tmp", check_tmp),
    ("boot", check_boot),
    ("fstab", check_fstab),
    ("virtio", check_virtio),
    ("live_data", check_live_data),
    ("snapshot", check_snapshot),
)


def describe() -> Dict[str, Any]:
    """Thresholds, for the report and the docs."""
    return {"used_critical_pct": USED_CRITICAL_PCT, "used_warning_pct": USED_WARNING_PCT,
            "skew_critical_s": SKEW_CRITICAL_S, "skew_warning_s": SKEW_WARNING_S}
