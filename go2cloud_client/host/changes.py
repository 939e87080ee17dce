"""The host change journal: every change the agent made to this host, with what undoes it.

``<home>/state/host_changes.json`` = ``{"version": 1, "changes": [{"id", "time", "kind", ...}]}``,
written atomically, kept across ``--abort``. Kinds and their fields:

=============================  ==========================================================
``package_installed``          ``package`` (or ``packages``), ``manager``, ``undo`` (argv),
                               ``env`` (extra environment of the package manager)
``snapshot_driver_installed``  ``packages``, ``manager``, ``undo`` (argv), ``env``,
                               ``unload`` (argv run first, failure tolerated)
``selinux_mode``               ``previous_runtime``, ``previous_config``, ``config_path``
``service_installed``          ``unit``, ``wants_link``, ``home``
=============================  ==========================================================

:func:`revert_all` undoes them newest first. Each change leaves the journal only once its undo
has succeeded, so a revert that fails half-way can simply be run again: what was reverted is
gone from the journal, what failed is still there. Every undo is idempotent (removing a package
that is no longer installed, writing a mode that is already set).
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from go2cloud_client import platform, subp
from go2cloud_client.clock import utc_now
from go2cloud_client.errors import ConfigError, Go2CloudError, HostRevertError
from go2cloud_client.home import Home

LOG = logging.getLogger(__name__)

KINDS = ("package_installed", "snapshot_driver_installed", "selinux_mode", "service_installed")


class HostChangeJournal:
    """Read and update the host change journal of one home."""

    def __init__(self, home: Home) -> None:
        self.home = home

    def list(self) -> List[Dict[str, Any]]:
        """The recorded changes, oldest first."""
        doc = self.home.read_state(self.home.host_changes_file) or {}
        return [c for c in (doc.get("changes") or []) if isinstance(c, dict)]

    def _save(self, changes: List[Dict[str, Any]]) -> None:
        self.home.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.home.write_state(self.home.host_changes_file, {"changes": changes})

    def record(self, kind: str, **fields: Any) -> Dict[str, Any]:
        """Append a change (with a new ``id`` and the time) and return it."""
        if kind not in KINDS:
            raise ValueError(f"unknown host change kind {kind!r}")
        change = {"id": uuid.uuid4().hex[:12], "time": utc_now(), "kind": kind, **fields}
        self._save([*self.list(), change])
        LOG.info("host change recorded: %s", describe(change))
        return change

    def replace(self, kind: str, **fields: Any) -> Dict[str, Any]:
        """Record a change that exists at most once (``service_installed``): earlier entries
        of that kind are dropped."""
        kept = [c for c in self.list() if c.get("kind") != kind]
        self._save(kept)
        return self.record(kind, **fields)

    def forget(self, change: Dict[str, Any]) -> None:
        """Remove one change (matched by id, or by content for entries written without one)."""
        changes = self.list()
        for i, entry in enumerate(changes):
            if (change.get("id") and entry.get("id") == change["id"]) or entry == change:
                del changes[i]
                self._save(changes)
                return

    def forget_kind(self, kind: str) -> None:
        changes = self.list()
        kept = [c for c in changes if c.get("kind") != kind]
        if len(kept) != len(changes):
            self._save(kept)


def _shown(argv: Any) -> str:
    return " ".join(str(a) for a in argv) if isinstance(argv, list) else "?"


def _packages(change: Dict[str, Any]) -> str:
    packages = change.get("packages") or [change.get("package", "?")]
    return " ".join(str(p) for p in packages)


def describe(change: Dict[str, Any]) -> str:
    """One line for the operator: what was changed and what undoes it."""
    kind = change.get("kind")
    if kind == "package_installed":
        return (f"package {_packages(change)} installed with {change.get('manager', '?')} "
                f"(undo: {_shown(change.get('undo'))})")
    if kind == "snapshot_driver_installed":
        return (f"snapshot driver packages {_packages(change)} installed with "
                f"{change.get('manager', '?')} (undo: {_shown(change.get('undo'))})")
    if kind == "selinux_mode":
        return (f"SELinux set to permissive (was {change.get('previous_runtime')} at run time and "
                f"SELINUX={change.get('previous_config')} in {change.get('config_path')})")
    if kind == "service_installed":
        return f"service installed ({change.get('unit')}" + (
            f", {change.get('wants_link')})" if change.get("wants_link") else ")")
    return f"unknown change {kind!r} (recorded by a newer agent?)"


# -- revert -------------------------------------------------------------------------------------


def _run_undo(change: Dict[str, Any]) -> None:
    argv = change.get("undo")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise HostRevertError(f"the ledger entry has no valid undo command: {change!r}")
    raw = change.get("env")
    env = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    subp.run(argv, timeout=1800, env=subp.child_env(env))


def _revert_package(change: Dict[str, Any]) -> str:
    _run_undo(change)
    return f"removed package {_packages(change)} ({_shown(change.get('undo'))})"


def _revert_driver(change: Dict[str, Any]) -> str:
    unload = change.get("unload")
    if isinstance(unload, list) and unload:
        try:
            subp.run([str(a) for a in unload], timeout=120)
        except subp.ProcessError as exc:  # not loaded, or in use: the package removal says more
            LOG.info("unloading the snapshot driver: %s", exc)
    _run_undo(change)
    return f"removed the snapshot driver packages {_packages(change)} ({_shown(change.get('undo'))})"


def _revert_selinux(change: Dict[str, Any]) -> str:
    done = []
    previous_config = change.get("previous_config")
    config_path = change.get("config_path")
    if previous_config and config_path:
        platform.set_selinux_config(str(previous_config), Path(str(config_path)))
        done.append(f"SELINUX={previous_config} in {config_path}")
    if change.get("previous_runtime") == "enforcing" and platform.selinux_mode() == "permissive":
        platform.set_selinux_runtime("enforcing")
        done.append("enforcing at run time (setenforce 1)")
    return "restored SELinux: " + (", ".join(done) if done else "nothing to change")


def _revert_service(change: Dict[str, Any]) -> str:
    from go2cloud_client.host.service import remove_service_files

    done = remove_service_files(Home(Path(change["home"])) if change.get("home") else None)
    return "; ".join(done) if done else "the service was already removed"


REVERTERS: Dict[str, Callable[[Dict[str, Any]], str]] = {
    "package_installed": _revert_package,
    "snapshot_driver_installed": _revert_driver,
    "selinux_mode": _revert_selinux,
    "service_installed": _revert_service,
}


def revert_all(home: Home, *, say: Callable[[str], None],
               reverters: Optional[Dict[str, Callable[[Dict[str, Any]], str]]] = None) -> List[str]:
    """Undo every recorded change, newest first. A change leaves the journal when its undo
    succeeded; a failure is reported and the others are still tried. Raises HostRevertError
    listing what is left when anything failed (run it again once the cause is fixed)."""
    journal = HostChangeJournal(home)
    table = reverters or REVERTERS
    done: List[str] = []
    failed: List[str] = []
    for change in reversed(journal.list()):
        what = describe(change)
        revert = table.get(str(change.get("kind")))
        if revert is None:
            failed.append(what)
            say(f"Cannot revert {what}: this agent does not know how")
            continue
        try:
            result = revert(change)
        except (Go2CloudError, OSError, ValueError) as exc:
            LOG.warning("reverting %s failed: %s", what, exc)
            failed.append(f"{what}: {exc}")
            say(f"Could not revert {what}: {exc}")
            continue
        try:
            journal.forget(change)
        except ConfigError as exc:  # reverted, but the journal could not be updated
            failed.append(f"{what}: reverted, but {exc}")
            continue
        done.append(result)
        say("Reverted: " + result)
    if failed:
        raise HostRevertError(
            f"{len(failed)} host change(s) could not be reverted and stay in "
            f"{home.host_changes_file}: " + "; ".join(failed)
            + ". Fix the cause and run go2cloud_client uninstall --revert again")
    return done
