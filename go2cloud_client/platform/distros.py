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

    def __init__(self, release: Optional[Mapping[str, str]] = None) -> None:
        self.release = dict(release or {})

    def install_command(self, packages: List[str]) -> List[str]:
        """Argument list installing ``packages`` (fixed package names chosen by the agent, never
        input from elsewhere)."""
        return [*self.install, *packages]

    def remove_command(self, packages: List[str]) -> List[str]:
        return [*self.remove, *packages]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.release.get('ID', '?')} {self.release.get('VERSION_ID', '')}>"


class Debian(Distro):
    name = "debian"
    ids: ClassVar[Tuple[str, ...]] = ("debian", "ubuntu", "linuxmint", "raspbian", "pop", "kali")
    package_manager = "apt-get"
    install = ("apt-get", "-y", "install")
    remove = ("apt-get", "-y", "remove")
    env = {"DEBIAN_FRONTEND": "noninteractive"}


class RHEL(Distro):
    """RHEL 8+ and rebuilds (CentOS Stream, Rocky, Alma, Oracle): dnf."""

    name = "rhel"
    ids: ClassVar[Tuple[str, ...]] = ("rhel", "centos", "rocky", "almalinux", "ol")
    package_manager = "dnf"
    install = ("dnf", "-y", "install")
    remove = ("dnf", "-y", "remove")


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
