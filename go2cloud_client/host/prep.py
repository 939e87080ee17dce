"""Host preparation at import: the seed's three questions, in the seed's order.

1. **Snapshot driver** (optional). The registry's probes say whether a crash-consistent snapshot
   backend is usable for the root volume (the elastio-snap/dattobd kernel driver loaded, the root
   on LVM, ...). If not, the agent offers to install the kernel copy-on-write driver with the
   distribution's package manager (package names are data on the distro classes). If the
   operator says no, the import runs with ``--no-prompt``, or the installation fails (often: the
   vendor's package repository is not configured), the import goes on and block mode stays
   available: the backend is decided per disk when a block task starts, and drilled
   (``--snapshot auto`` takes only a point-in-time backend; ``fsfreeze``/``live`` are the
   operator's explicit choice). The inventory records what was found:
   ``capabilities.block = {"available": true, "driver": {"name", "installed", "reason"},
   "volumes": {device: {"usable": [...], "point_in_time": [...]}}, "backends": [...],
   "point_in_time": bool}``, and the console says why the driver is not installed.
2. **rsync** (required for file-level replication). Missing and not installed is
   :class:`~go2cloud_client.errors.RsyncMissingError`.
3. **SELinux** (optional). When enforcing, the agent offers to set it to permissive, at run time
   (``setenforce 0``) and at boot (``SELINUX=permissive`` in ``/etc/selinux/config``).

Each question is answered by ``--yes`` (do it), by the operator on a terminal, or not asked with
``--no-prompt`` (or without a terminal): then the optional steps are skipped with one warning
line naming the flag that does them, and the required one fails with a message saying what to
run. Every change is recorded in the host change journal (:mod:`go2cloud_client.host.changes`) with what
undoes it, so ``go2cloud_client uninstall --revert`` can put the host back.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import click
import psutil

from go2cloud_client import platform, subp
from go2cloud_client.commands import AUTO_SNAPSHOT_ORDER, CONSISTENT_SNAPSHOT_BACKENDS
from go2cloud_client.config import Config
from go2cloud_client.console import Console
from go2cloud_client.errors import PackageInstallError, RsyncMissingError
from go2cloud_client.home import Home
from go2cloud_client.host.changes import HostChangeJournal

LOG = logging.getLogger(__name__)

DRIVER_HELP = "https://github.com/elastio/elastio-snap (INSTALL.md: add the vendor's repository)"

WHY_PERMISSIVE = (
    "SELinux policies can deny the agent and rsync reading parts of the migrated paths, or the "
    "snapshot driver creating its devices. Permissive keeps the policy loaded and keeps labelling "
    "files, only logging denials, so enforcing can be restored later (uninstall --revert does it) "
    "without relabelling the whole file system, which disabling SELinux would require."
)


def can_prompt(no_prompt: bool) -> bool:
    """Whether a question can be asked: not ``--no-prompt`` and standard input is a terminal."""
    if no_prompt:
        return False
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


@dataclass
class Asker:
    """Answers a yes/no question from ``--yes``, the terminal, or not at all (None)."""

    yes: bool = False
    no_prompt: bool = False
    confirm: Optional[Callable[..., bool]] = None
    prompt_ok: Optional[Callable[[bool], bool]] = None

    def ask(self, question: str, default: bool = True) -> Optional[bool]:
        if self.yes:
            return True
        if not (self.prompt_ok or can_prompt)(self.no_prompt):
            return None
        return bool((self.confirm or click.confirm)(question, default=default))


@dataclass
class Prepared:
    rsync_path: str
    capabilities: Dict[str, Any] = field(default_factory=dict)


def probe_backends(volume: Optional[str]) -> Tuple[List[str], Dict[str, str]]:
    """(usable backend names, reason per backend) for ``volume`` (the root device or None)."""
    from snapshot_driver import registry

    results = registry.probe_all(volume)
    return ([n for n, r in results.items() if r.usable], {n: str(r.reason) for n, r in results.items()})


def block_capability(driver: Dict[str, Any], volumes: Mapping[str, List[str]]) -> Dict[str, Any]:
    """The ``capabilities.block`` record of the import: block mode is always available (the
    backend is decided per disk when a block task starts, and drilled); what the import found is
    recorded: the snapshot driver (installed, or why not) and the usable backends per volume."""
    per_volume = {vol: {"usable": sorted(names),
                        "point_in_time": sorted(n for n in names if n in AUTO_SNAPSHOT_ORDER)}
                  for vol, names in volumes.items()}
    backends = sorted({n for names in volumes.values() for n in names})
    return {"block": {"available": True, "reason": None, "driver": dict(driver), "backends": backends,
                      "volumes": per_volume,
                      "point_in_time": any(v["point_in_time"] for v in per_volume.values())}}


def block_summary(block: Mapping[str, Any]) -> str:
    """One line for ``status``: the driver and the point-in-time backends found at import."""
    found = block.get("driver")
    driver: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    pit = sorted({str(n) for v in (block.get("volumes") or {}).values() if isinstance(v, Mapping)
                  for n in v.get("point_in_time") or []})
    if driver.get("installed") is False:
        said = f"snapshot driver not installed: {driver.get('reason') or '?'}"
    elif driver.get("installed"):
        said = f"snapshot driver {driver.get('name') or ''} installed".replace("  ", " ")
    else:
        said = str(driver.get("reason") or "snapshot driver not checked")
    what = (f"point-in-time backends: {', '.join(pit)}" if pit
            else "no point-in-time backend on the volumes probed at import; the drill checks each "
                 "disk, and without one --snapshot fsfreeze or live must be chosen explicitly")
    return f"available ({what}; {said})"


def probed_volumes(root: Optional[str]) -> List[str]:
    """The volumes whose backends the import records: the root device and the block devices of
    the other mounted filesystems (at most 16). Disks that are not mounted are probed at the drill."""
    found: List[str] = [root] if root else []
    try:
        parts = psutil.disk_partitions(all=False)
    except OSError:
        parts = []
    for part in parts:
        dev = part.device
        if dev.startswith("/dev/") and dev not in found and len(found) < 16:
            found.append(dev)
    return found


class HostPrep:
    """The three steps for one import. ``probe`` and ``asker`` are replaceable for tests."""

    def __init__(self, home: Home, config: Config, console: Console, *, yes: bool, no_prompt: bool,
                 asker: Optional[Asker] = None,
                 probe: Optional[Callable[[Optional[str]], Tuple[List[str], Dict[str, str]]]] = None) -> None:
        self.home = home
        self.config = config
        self.console = console
        self.asker = asker or Asker(yes=yes, no_prompt=no_prompt)
        self._probe = probe
        self.changes = HostChangeJournal(home)

    def probe(self, volume: Optional[str]) -> Tuple[List[str], Dict[str, str]]:
        return (self._probe or probe_backends)(volume)

    def run(self) -> Prepared:
        capabilities = self.snapshot_driver()
        rsync_path = self.rsync()
        self.selinux()
        return Prepared(rsync_path=rsync_path, capabilities=capabilities)

    # -- 1. snapshot driver -------------------------------------------------------------------

    def snapshot_driver(self) -> Dict[str, Any]:
        """Offer the kernel snapshot driver when no point-in-time backend is usable for the root
        volume; whatever happens, block mode stays available and what was found is recorded."""
        volume = platform.root_block_device()
        if self.config.snapshot_driver == "skip":
            LOG.info("snapshot driver step skipped (snapshot_driver: skip)")
            return self._found({"installed": None, "reason": "not checked (snapshot_driver: skip)"}, volume)
        usable, reasons = self.probe(volume)
        good = [b for b in usable if b in CONSISTENT_SNAPSHOT_BACKENDS]
        distro = platform.distro()
        name = distro.snapshot_driver if distro else None
        if good:
            LOG.info("crash-consistent snapshot backends usable for %s: %s", volume or "this host", good)
            return self._found({"name": name, "installed": name in usable if name else None,
                                "reason": f"not needed: {', '.join(good)} usable"}, volume)
        packages = distro.driver_packages(platform.kernel()) if distro else []
        if distro is None or not packages:
            which = distro.name if distro else "this distribution"
            return self._not_installed(
                name, f"go2cloud_client knows no snapshot driver package for {which} "
                      f"({reasons.get('elastio-snap', 'elastio-snap: not usable')})", volume)
        # only what is missing is installed, and only that is removed again by uninstall --revert
        packages = [p for p in packages if not self._installed(distro, p)]
        if not packages:
            return self._not_installed(
                name, f"the snapshot driver packages are installed but the driver is not usable: "
                      f"{reasons.get(distro.snapshot_driver, '?')}", volume)
        cmd = distro.install_command(packages)
        shown = " ".join(cmd)
        answer = self.asker.ask(
            f"The snapshot driver ({distro.snapshot_driver} kernel module) is not installed. Block-level "
            f"replication uses it to copy the disks point in time while this server runs. "
            f"Install it now with '{shown}'? (No: block tasks use another backend: LVM, btrfs, XFS "
            f"reflink, or the operator's explicit fsfreeze/live)",
            default=True)
        if answer is None:
            self.console.line(f"Warning: snapshot driver not installed (--no-prompt); re-run the import "
                              f"with --yes to install it ({shown})")
            return self._not_installed(
                name, "the import ran with --no-prompt (--yes installs it)", volume)
        if not answer:
            return self._not_installed(name, "the operator chose not to install it", volume)
        self.console.line(f"Installing the snapshot driver: {shown}")
        try:
            subp.run(cmd, timeout=1800, env=subp.child_env(distro.env))
        except subp.ProcessError as exc:
            LOG.warning("installing the snapshot driver failed: %s", exc)
            return self._not_installed(
                name, f"installing it failed ({exc}); the {distro.snapshot_driver} package "
                      f"repository may not be configured on this host: {DRIVER_HELP}", volume)
        self.changes.record("snapshot_driver_installed", packages=packages, manager=distro.package_manager,
                            undo=distro.remove_command(packages), env=dict(distro.env),
                            unload=distro.unload_driver_command())
        usable, reasons = self.probe(volume)
        if distro.snapshot_driver not in usable:
            try:
                subp.run(distro.load_driver_command(), timeout=120)
            except subp.ProcessError as exc:
                LOG.warning("loading the snapshot driver failed: %s", exc)
            usable, reasons = self.probe(volume)
        if distro.snapshot_driver not in usable:
            return self._not_installed(
                name, f"the snapshot driver packages were installed but the driver is not usable: "
                      f"{reasons.get(distro.snapshot_driver, '?')}", volume)
        self.console.line(f"Installed the snapshot driver ({distro.snapshot_driver})")
        return self._found({"name": name, "installed": True, "reason": None}, volume)

    def _found(self, driver: Dict[str, Any], root: Optional[str]) -> Dict[str, Any]:
        """The block capability with the usable backends of every probed volume."""
        volumes: Dict[str, List[str]] = {}
        for vol in probed_volumes(root) if self.config.snapshot_driver != "skip" else []:
            try:
                volumes[vol] = list(self.probe(vol)[0])
            except Exception as exc:  # noqa: BLE001 - a volume that cannot be probed is left out
                LOG.info("probing the snapshot backends of %s failed: %s", vol, exc)
        return block_capability(driver, volumes)

    def _not_installed(self, name: Optional[str], reason: str, root: Optional[str]) -> Dict[str, Any]:
        caps = self._found({"name": name, "installed": False, "reason": reason}, root)
        block = caps["block"]
        LOG.warning("snapshot driver not installed: %s", reason)
        pit = sorted({n for v in block["volumes"].values() for n in v["point_in_time"]})
        self.console.line(
            f"Snapshot driver not installed: {reason}. Block replication stays available: each block task "
            f"picks its snapshot backend per disk when it starts, and its drill says what that costs "
            f"(point-in-time backends usable now: {', '.join(pit) or 'none'}; without one, choose "
            f"--snapshot fsfreeze or live explicitly)")
        return caps

    @staticmethod
    def _installed(distro: platform.Distro, package: str) -> bool:
        try:
            result = subp.run(distro.installed_command(package), timeout=60, rcs=range(256))
        except subp.ProcessError:
            return False
        return result.returncode == 0 and (not distro.installed_marker
                                           or distro.installed_marker in result.stdout)

    # -- 2. rsync -----------------------------------------------------------------------------

    def rsync(self) -> str:
        """The rsync binary to use; offers to install it with the distro's package manager."""
        from go2cloud_client.replication.rsync import find_rsync

        if self.config.rsync_path:
            return self.config.rsync_path
        if not platform.SUPPORTS_FILE_MODE:
            LOG.warning("file-level replication (rsync) is not supported on %s", platform.NAME)
            return "rsync"
        found = find_rsync()
        if found:
            return found
        distro = platform.distro()
        if distro is None:
            raise RsyncMissingError(
                "rsync is not installed and this distribution is not known to go2cloud_client; install "
                "rsync with your package manager and run go2cloud_client again")
        cmd = distro.install_command(["rsync"])
        shown = " ".join(cmd)
        answer = self.asker.ask(f"rsync is not installed. Install it now with '{shown}'?", default=True)
        if answer is None:
            raise RsyncMissingError(
                f"rsync is not installed: re-run with --yes to install it, or install it yourself "
                f"with: {shown}")
        if not answer:
            raise RsyncMissingError(f"rsync is not installed; install it with: {shown}")
        self.console.line(f"Installing rsync: {shown}")
        try:
            subp.run(cmd, timeout=1800, env=subp.child_env(distro.env))
        except subp.ProcessError as exc:
            raise PackageInstallError(
                f"installing rsync failed ({exc}); install it yourself with: {shown}") from exc
        self.changes.record("package_installed", package="rsync", manager=distro.package_manager,
                            undo=distro.remove_command(["rsync"]), env=dict(distro.env))
        found = find_rsync()
        if not found:
            raise RsyncMissingError(f"rsync is still not found after '{shown}'; install it and try again")
        self.console.line(f"Installed rsync ({found})")
        return found

    # -- 3. SELinux ---------------------------------------------------------------------------

    def selinux(self) -> None:
        if platform.selinux_mode() != "enforcing":
            return
        config_path = platform.selinux_config_path()
        previous_config = platform.selinux_config_mode()
        answer = self.asker.ask(
            f"SELinux is enforcing. {WHY_PERMISSIVE} Set SELinux to permissive now (setenforce 0) and at "
            f"boot (SELINUX=permissive in {config_path})?", default=True)
        if answer is None:
            self.console.line("Warning: SELinux is enforcing and was left so (--no-prompt); re-run the "
                              "import with --yes to set it to permissive if transfers are denied")
            return
        if not answer:
            self.console.line("SELinux left enforcing")
            return
        changed: List[str] = []
        try:
            platform.set_selinux_runtime("permissive")
            changed.append("permissive now (setenforce 0)")
        except (subp.ProcessError, ValueError) as exc:
            self.console.line(f"Warning: setting SELinux to permissive failed: {exc}")
        if previous_config == "enforcing":
            try:
                platform.set_selinux_config("permissive", config_path)
                changed.append(f"SELINUX=permissive in {config_path}")
            except OSError as exc:
                self.console.line(f"Warning: cannot write {config_path}: {exc.strerror or exc}")
        if not changed:
            return
        self.changes.record("selinux_mode", previous_runtime="enforcing", previous_config=previous_config,
                            config_path=str(config_path))
        self.console.line("SELinux set to " + " and ".join(changed)
                          + "; go2cloud_client uninstall --revert restores enforcing")


def ensure_rsync(home: Home, config: Config, console: Console, *, yes: bool, no_prompt: bool) -> str:
    """The rsync step alone (when the host is already imported)."""
    return HostPrep(home, config, console, yes=yes, no_prompt=no_prompt).rsync()
