"""Host preparation at import: the seed's three questions, in the seed's order.

1. **Snapshot driver** (optional). The registry's probes say whether a crash-consistent snapshot
   backend is usable for the root volume (the elastio-snap/dattobd kernel driver loaded, the root
   on LVM, ...). If not, the agent offers to install the kernel copy-on-write driver with the
   distribution's package manager (package names are data on the distro classes). If the
   operator says no, the import runs with ``--no-prompt``, or the installation fails (often: the
   vendor's package repository is not configured), the import still goes on, but block-level
   replication is disabled for this source: the inventory carries
   ``capabilities.block = {"available": false, "reason": ..., "backends": [...]}`` and the
   console says why.
2. **rsync** (required for file-level replication). Missing and not installed is
   :class:`~go2cloud_client.errors.RsyncMissingError`.
3. **SELinux** (optional). When enforcing, the agent offers to set it to permissive, at run time
   (``setenforce 0``) and at boot (``SELINUX=permissive`` in ``/etc/selinux/config``).

Each question is answered by ``--yes`` (do it), by the operator on a terminal, or not asked with
``--no-prompt`` (or without a terminal): then the optional steps are skipped with one warning
line naming the flag that does them, and the required one fails with a message saying what to
run. Every change is recorded in the undo ledger (:mod:`go2cloud_client.hostchanges`) with what
undoes it, so ``go2cloud_client uninstall --revert`` can put the host back.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import click

from go2cloud_client import platform, subp
from go2cloud_client.commands import CONSISTENT_SNAPSHOT_BACKENDS
from go2cloud_client.config import Config
from go2cloud_client.console import Console
from go2cloud_client.errors import PackageInstallError, RsyncMissingError
from go2cloud_client.home import Home
from go2cloud_client.hostchanges import HostChanges

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


def block_capability(available: bool, reason: Optional[str], backends: List[str]) -> Dict[str, Any]:
    return {"block": {"available": available, "reason": reason, "backends": list(backends)}}


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
        self.changes = HostChanges(home)

    def probe(self, volume: Optional[str]) -> Tuple[List[str], Dict[str, str]]:
        return (self._probe or probe_backends)(volume)

    def run(self) -> Prepared:
        capabilities = self.snapshot_driver()
        rsync_path = self.rsync()
        self.selinux()
        return Prepared(rsync_path=rsync_path, capabilities=capabilities)

    # -- 1. snapshot driver -------------------------------------------------------------------

    def snapshot_driver(self) -> Dict[str, Any]:
        if self.config.snapshot_driver == "skip":
            LOG.info("snapshot driver step skipped (snapshot_driver: skip)")
            return block_capability(True, "not checked (snapshot_driver: skip)", [])
        volume = platform.root_block_device()
        usable, reasons = self.probe(volume)
        good = [b for b in usable if b in CONSISTENT_SNAPSHOT_BACKENDS]
        if good:
            LOG.info("crash-consistent snapshot backends usable for %s: %s", volume or "this host", good)
            return block_capability(True, None, usable)
        distro = platform.distro()
        packages = distro.driver_packages(platform.kernel()) if distro else []
        if distro is None or not packages:
            which = distro.name if distro else "this distribution"
            return self._block_disabled(
                f"no crash-consistent snapshot backend is usable and go2cloud_client knows no snapshot "
                f"driver package for {which} ({reasons.get('elastio-snap', 'elastio-snap: not usable')})",
                usable)
        # only what is missing is installed, and only that is removed again by uninstall --revert
        packages = [p for p in packages if not self._installed(distro, p)]
        if not packages:
            return self._block_disabled(
                f"the snapshot driver packages are installed but the driver is not usable: "
                f"{reasons.get(distro.snapshot_driver, '?')}", usable)
        cmd = distro.install_command(packages)
        shown = " ".join(cmd)
        answer = self.asker.ask(
            f"The snapshot driver ({distro.snapshot_driver} kernel module) is not installed. Block-level "
            f"replication needs it to copy the disks crash-consistently while this server runs. "
            f"Install it now with '{shown}'? (No: block replication is disabled for this source)",
            default=True)
        if answer is None:
            self.console.line(f"Warning: snapshot driver not installed (--no-prompt); re-run the import "
                              f"with --yes to install it ({shown})")
            return self._block_disabled(
                "the snapshot driver is not installed (the import ran with --no-prompt; --yes installs it)",
                usable)
        if not answer:
            return self._block_disabled("the operator chose not to install the snapshot driver", usable)
        self.console.line(f"Installing the snapshot driver: {shown}")
        try:
            subp.run(cmd, timeout=1800, env=subp.child_env(distro.env))
        except subp.ProcessError as exc:
            LOG.warning("installing the snapshot driver failed: %s", exc)
            return self._block_disabled(
                f"installing the snapshot driver failed ({exc}); the {distro.snapshot_driver} package "
                f"repository may not be configured on this host: {DRIVER_HELP}", usable)
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
            return self._block_disabled(
                f"the snapshot driver packages were installed but the driver is not usable: "
                f"{reasons.get(distro.snapshot_driver, '?')}", usable)
        self.console.line(f"Installed the snapshot driver ({distro.snapshot_driver})")
        return block_capability(True, None, usable)

    @staticmethod
    def _installed(distro: platform.Distro, package: str) -> bool:
        try:
            result = subp.run(distro.installed_command(package), timeout=60, rcs=range(256))
        except subp.ProcessError:
            return False
        return result.returncode == 0 and (not distro.installed_marker
                                           or distro.installed_marker in result.stdout)

    def _block_disabled(self, reason: str, usable: List[str]) -> Dict[str, Any]:
        LOG.warning("block replication disabled for this source: %s", reason)
        self.console.line(f"Block replication is disabled for this source: {reason}")
        return block_capability(False, reason, usable)

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
