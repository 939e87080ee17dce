"""Linux distributions as data: one small class per family, looked up by os-release ID/ID_LIKE.

Each class holds the package manager's install/remove commands as argument lists. Callers run
them through :mod:`go2cloud_client.subp` (never a shell).
"""

from __future__ import annotations

from typing import ClassVar, Dict, List, Mapping, Optional, Tuple, Type


class Distro:
    name: ClassVar[str] = "unknown"
    #: os-release IDs handled by this class (matched against ID, then ID_LIKE words).
    ids: ClassVar[Tuple[str, ...]] = ()
    package_manager: ClassVar[str] = ""
    install: ClassVar[Tuple[str, ...]] = ()
    remove: ClassVar[Tuple[str, ...]] = ()
    #: Extra environment for the package manager (e.g. non-interactive apt).
    env: ClassVar[Dict[str, str]] = {}
    #: Kernel copy-on-write snapshot driver: backend name (snapshot_driver registry) and the
    #: packages that install it (dkms module + control tool), from the vendor's repository,
    #: which may not be configured on the host. Empty: no packaged driver for this family.
    snapshot_driver: ClassVar[str] = "elastio-snap"
    snapshot_driver_packages: ClassVar[Tuple[str, ...]] = ()
    #: Module name for ``modprobe`` once the driver packages are installed.
    snapshot_driver_module: ClassVar[str] = "elastio_snap"
    #: Headers of the running kernel, which dkms needs to build the module (``{kernel}`` is
    #: ``uname -r``); empty when the family has no such package name.
    kernel_headers: ClassVar[str] = ""
    #: Argument list asking whether one package is installed (``{package}`` is replaced);
    #: installed when it exits 0 and, if set, its output contains :attr:`installed_marker`.
    installed_query: ClassVar[Tuple[str, ...]] = ("rpm", "-q", "{package}")
    installed_marker: ClassVar[str] = ""

    def __init__(self, release: Optional[Mapping[str, str]] = None) -> None:
        self.release = dict(release or {})

    def install_command(self, packages: List[str]) -> List[str]:
        """Argument list installing ``packages`` (fixed package names chosen by the agent, never
        input from elsewhere)."""
        return [*self.install, *packages]

    def remove_command(self, packages: List[str]) -> List[str]:
        return [*self.remove, *packages]

    def load_driver_command(self) -> List[str]:
        """Argument list loading the snapshot driver's kernel module."""
        return ["modprobe", self.snapshot_driver_module]

    def unload_driver_command(self) -> List[str]:
        return ["modprobe", "-r", self.snapshot_driver_module]

    def driver_packages(self, kernel: str = "") -> List[str]:
        """The snapshot driver packages of this family (empty when none is packaged), preceded by
        the headers of ``kernel`` when the family names them."""
        if not self.snapshot_driver_packages:
            return []
        headers = [self.kernel_headers.format(kernel=kernel)] if self.kernel_headers and kernel else []
        return headers + list(self.snapshot_driver_packages)

    def installed_command(self, package: str) -> List[str]:
        return [a.replace("{package}", package) for a in self.installed_query]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.release.get('ID', '?')} {self.release.get('VERSION_ID', '')}>"


class Debian(Distro):
    name = "debian"
    ids: ClassVar[Tuple[str, ...]] = ("debian", "ubuntu", "linuxmint", "raspbian", "pop", "kali")
    package_manager = "apt-get"
    install = ("apt-get", "-y", "install")
    remove = ("apt-get", "-y", "remove")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    snapshot_driver_packages = ("elastio-snap-dkms", "elastio-snap-utils")
    kernel_headers = "linux-headers-{kernel}"
    installed_query = ("dpkg-query", "-W", "-f=${Status}", "{package}")
    installed_marker = "install ok installed"


class RHEL(Distro):
    """RHEL 8+ and rebuilds (CentOS Stream, Rocky, Alma, Oracle): dnf."""

    name = "rhel"
    ids: ClassVar[Tuple[str, ...]] = ("rhel", "centos", "rocky", "almalinux", "ol")
    package_manager = "dnf"
    install = ("dnf", "-y", "install")
    remove = ("dnf", "-y", "remove")
    snapshot_driver_packages = ("dkms-elastio-snap", "elastio-snap-utils")
    kernel_headers = "kernel-devel-{kernel}"


class RHELLegacy(RHEL):
    """RHEL/CentOS 7 and Amazon Linux 2: yum."""

    name = "rhel-legacy"
    ids: ClassVar[Tuple[str, ...]] = ("amzn",)
    package_manager = "yum"
    install = ("yum", "-y", "install")
    remove = ("yum", "-y", "remove")


class Fedora(RHEL):
    name = "fedora"
    ids: ClassVar[Tuple[str, ...]] = ("fedora",)


class SUSE(Distro):
    name = "suse"
    ids: ClassVar[Tuple[str, ...]] = ("sles", "sled", "opensuse", "opensuse-leap", "opensuse-tumbleweed",
                                      "suse")
    package_manager = "zypper"
    install = ("zypper", "--non-interactive", "install")
    remove = ("zypper", "--non-interactive", "remove")


class Alpine(Distro):
    name = "alpine"
    ids: ClassVar[Tuple[str, ...]] = ("alpine",)
    package_manager = "apk"
    install = ("apk", "add")
    remove = ("apk", "del")
    installed_query = ("apk", "info", "-e", "{package}")


_BY_ID: Dict[str, Type[Distro]] = {}
for _cls in (Debian, RHEL, SUSE, Alpine, RHELLegacy, Fedora):
    for _id in _cls.ids:
        _BY_ID[_id] = _cls


def _major(version_id: str) -> int:
    try:
        return int(version_id.split(".")[0])
    except ValueError:
        return 0


def distro_for(release: Mapping[str, str]) -> Optional[Distro]:
    """The distro for an os-release mapping (keys as in the file: ID, ID_LIKE, VERSION_ID)."""
    candidates = [release.get("ID", "").lower()] + release.get("ID_LIKE", "").lower().split()
    for ident in candidates:
        cls = _BY_ID.get(ident)
        if cls is None:
            continue
        if cls is RHEL and 0 < _major(release.get("VERSION_ID", "")) < 8 and ident != "fedora":
            cls = RHELLegacy
        if cls is RHELLegacy and _major(release.get("VERSION_ID", "")) >= 2023:  # Amazon Linux 2023: dnf
            cls = RHEL
        return cls(release)
    return None
