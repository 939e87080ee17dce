"""The agent's use-cases, as the command line (:mod:`go2cloud_client.cli`) runs them: import this
host and run the agent in the foreground (:func:`run_foreground`, :func:`import_source`), forget
the import (:func:`abort`), stop the agent (:func:`stop`), what the agent is doing
(:func:`collect_status`), remove the agent (:func:`uninstall`). They take parsed arguments and a
:class:`~go2cloud_client.console.Console` for the operator's lines and raise
:class:`~go2cloud_client.errors.Go2CloudError` subclasses; the CLI parses, asks what a first
import lacks and whether to uninstall (passed in as callables), prints status and maps errors to
exit codes. Host preparation asks its own questions (:mod:`go2cloud_client.host.prep`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from go2cloud_client import __version__, platform
from go2cloud_client.agent import Agent, kill_children
from go2cloud_client.api import ControlPlane, RetryingControlPlane, retry_after_of
from go2cloud_client.config import Config, load_config
from go2cloud_client.console import Console
from go2cloud_client.errors import (
    ConfigError,
    IdentityRejectedError,
    RequestRejectedError,
    ThrottledError,
    UninstallError,
)
from go2cloud_client.events import utc_now
from go2cloud_client.home import Home, HomeLock, configure_logging
from go2cloud_client.host import service as servicemode
from go2cloud_client.host.changes import HostChangeJournal, describe, revert_all
from go2cloud_client.host.prep import HostPrep, ensure_rsync
from go2cloud_client.identity import Identity
from go2cloud_client.inventory import collect
from go2cloud_client.proxy import settings_at_import
from go2cloud_client.replication.block.cycle import recover_snapshots

LOG = logging.getLogger(__name__)

ABORT_WAIT_S = 30.0

#: (server, token id, token code, no_prompt) -> {"server", "token_id", "token_code"}: what the
#: import of a host that is not imported yet still needs, asked from the operator (or a
#: UsageError naming what is missing)
AskMissing = Callable[[Optional[str], Optional[str], Optional[str], bool], Dict[str, str]]


# -- import and the foreground agent ------------------------------------------------------------


def import_source(home: Home, config: Config, console: Console, *, token_id: str, token_code: str,
                  control_plane: Optional[ControlPlane] = None,
                  capabilities: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Generate the key pair, import this host, persist the identity. The code is not stored.
    ``capabilities`` (from host preparation) goes into the inventory and into source.json.
    After ``--abort`` the import names the old source and proves its key (kept until now), so
    the control plane marks it replaced; the old key is deleted once the import succeeded."""
    assert config.server
    previous = home.previous_source_id()
    console.line(f"Importing source into {config.server} with activation code {token_id} ...")
    identity = Identity.generate()
    proxy = settings_at_import(config.proxy, config.no_proxy, os.environ)
    if proxy.proxy:
        console.line(f"Connecting {proxy.describe()}")
    cp = control_plane or ControlPlane(config.server, fingerprint=config.server_fingerprint,
                                       connect_timeout=config.connect_timeout_s,
                                       read_timeout=config.read_timeout_s, proxy=proxy)
    inventory = collect(home, capabilities)

    def on_retry(exc: BaseException, attempt: int) -> None:
        wait = retry_after_of(exc)
        if wait is not None:
            console.line(f"The control plane is throttling imports ({exc}); retrying in {wait:.0f} s "
                         "(Ctrl-C to stop)")

    retrying = RetryingControlPlane(cp, attempts=3, max_wait=5, on_retry=on_retry)
    try:
        proof = _replace_proof(home, retrying, previous, identity)
        doc = retrying.import_source(
            token_id=token_id, token_code=token_code, public_key=identity.public_key_b64,
            inventory=inventory, previous_source_id=previous, previous_source_proof=proof)
    except ThrottledError as exc:
        raise ThrottledError(
            f"{exc}; the import was not attempted: wait a few minutes, check the token id and token code "
            "(copy them again from the console) and run go2cloud_client again",
            retry_after=exc.retry_after) from None
    finally:
        if control_plane is None:
            cp.close()
    identity.save(home)
    source = {
        "source_id": doc["source_id"],
        "workgroup": {"id": doc["workgroup"]["id"], "name": doc["workgroup"]["name"]},
        "server": config.server, "server_fingerprint": config.server_fingerprint,
        "heartbeat_interval": doc.get("heartbeat_interval") or 10, "imported_at": utc_now(),
        "replaced_source_id": doc.get("replaced_source_id"),
    }
    if proxy.proxy:
        source.update(proxy=proxy.proxy, no_proxy=proxy.no_proxy)
    if capabilities:
        source["capabilities"] = capabilities
    home.write_state(home.source_file, source)
    home.remove(home.previous_source_file)
    home.remove(home.previous_key_file)
    LOG.info("imported as %s into workgroup %s (%s)", source["source_id"], source["workgroup"]["name"],
             source["workgroup"]["id"])
    if previous and doc.get("replaced_source_id") != previous:
        LOG.warning("the previous source %s was not replaced by %s", previous, source["source_id"])
        console.line(f"The previous source {previous} was not marked replaced (the control plane did not "
                     "accept the proof of its key, or it is in another workgroup); ask the operator to run: "
                     f"go2cloud_server source replace {previous} --by {source['source_id']}")
    console.import_succeeded(source["source_id"])
    return source


def _replace_proof(home: Home, cp: RetryingControlPlane, previous: Optional[str],
                   identity: Identity) -> Optional[Dict[str, str]]:
    """The proof that this host held the key of ``previous`` (kept by ``--abort``), or None when
    there is no previous source, no kept key, or the control plane no longer knows the source."""
    if not previous:
        return None
    old = Identity.load_previous(home)
    if old is None:
        LOG.info("no key of the previous source %s kept: it is not replaced by this import", previous)
        return None
    try:
        return cp.replace_proof(previous, old, identity.public_key_b64)
    except (IdentityRejectedError, RequestRejectedError) as exc:
        LOG.info("previous source %s cannot be replaced: %s", previous, exc)
    except ValueError as exc:
        LOG.warning("previous source id unusable: %s", exc)
    return None


def _install_signals(agent: Agent) -> Dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: Dict[int, Any] = {}

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if agent.stop_event.is_set():
            signal.signal(signum, previous.get(signum, signal.SIG_DFL))
            return
        LOG.info("received %s; stopping", name)
        agent.stop(name)

    for sig in platform.graceful_signals():
        previous[sig] = signal.signal(sig, handler)
    return previous


def _already_imported(home: Home) -> Optional[Dict[str, Any]]:
    """source.json of a complete import, else None (also when it is unreadable: the import
    reports that under the home's lock)."""
    try:
        return home.imported_source()
    except ConfigError:
        return None


def _imported_line(source: Dict[str, Any]) -> str:
    return (f"Already imported as source {source['source_id']} (workgroup "
            f"{(source.get('workgroup') or {}).get('name', '?')})")


def run_foreground(home: Home, flags: Dict[str, Any], *, token_id: Optional[str], token_code: Optional[str],
                   yes: bool, no_prompt: bool, console: Console, ask_missing: AskMissing,
                   import_only: bool = False, attach: Optional[Callable[[Agent], None]] = None) -> None:
    """Prepare the host and import it if needed, then run the agent (unless ``import_only``).
    What a first import lacks (server, token id, token code) comes from ``ask_missing``.
    With ``attach`` (Windows service) the agent is handed to it, to be stopped by the Service
    Control Manager, and no signal handlers are installed."""
    if import_only:
        done = _already_imported(home)
        if done:  # no lock needed: nothing is written, and a running agent may hold it
            console.line(_imported_line(done) + (
                "; --token-id/--token-code ignored" if token_id or token_code else ""))
            return
    home.ensure()
    config = load_config(home, flags=flags)
    configure_logging(home, config.log_level)
    LOG.info("go2cloud_client %s starting (home %s, pid %d)", __version__, home.root, os.getpid())
    lock = HomeLock(home)
    lock.acquire()
    try:
        source = home.read_state(home.source_file)
        identity = Identity.load(home)
        if source and identity:
            if import_only:
                console.line(_imported_line(source))
                return
            if token_id or token_code:
                console.line(f"This host is already imported as {source['source_id']}; "
                             "--token-id/--token-code ignored (go2cloud_client --abort forgets the import)")
            changes = {k: v for k, v in (("server", config.server),
                                         ("server_fingerprint", config.server_fingerprint),
                                         ("proxy", config.proxy), ("no_proxy", config.no_proxy))
                       if v and v != source.get(k)}
            if changes:
                LOG.info("control plane settings changed since the import: %s", sorted(changes))
                source.update(changes)
                home.write_state(home.source_file, source)
            rsync_path = ensure_rsync(home, config, console, yes=yes, no_prompt=no_prompt)
            console.line(f"Resuming as source {source['source_id']} (workgroup "
                         f"{(source.get('workgroup') or {}).get('name', '?')}) on {source['server']}")
        else:
            if source or identity:
                LOG.warning("incomplete import found in %s; starting the import again", home.root)
                Identity.delete(home)
                home.remove(home.source_file)
            asked = ask_missing(config.server, token_id, token_code, no_prompt)
            if not config.server:
                config = load_config(home, flags={**flags, "server": asked["server"]})
            prepared = HostPrep(home, config, console, yes=yes, no_prompt=no_prompt).run()
            rsync_path = prepared.rsync_path
            source = import_source(home, config, console, token_id=asked["token_id"],
                                   token_code=asked["token_code"], capabilities=prepared.capabilities)
            identity = Identity.load(home)
            assert identity is not None
            if import_only:
                return
        agent = Agent(home, config, source, identity, console=console, rsync_path=rsync_path)
        if attach is None:
            previous = _install_signals(agent)
        else:  # Windows service: the Service Control Manager stops the agent, not signals
            previous = {}
            attach(agent)
        try:
            agent.run()
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
        task = agent.runner.task
        console.line("Agent stopped" + (f" ({agent.stopped_by})" if agent.stopped_by else "")
                     + (f"; task {task.get('task_id')} resumes when the agent is started again"
                        if task else ""))
    finally:
        lock.release()


# -- abort --------------------------------------------------------------------------------------


def abort(home: Home, console: Console, *, final_line: bool = True) -> None:
    """Stop a running agent of this home and its rsync children, forget the import."""
    if not home.exists():
        console.line(f"Nothing to abort: {home.root} has no agent home")
        return
    done: List[str] = []
    stopped = servicemode.stop_agent(home, wait=ABORT_WAIT_S)
    if stopped:
        done.append(stopped)
    with HomeLock(home):
        killed = kill_children(home)
        if killed:
            done.append("stopped rsync process groups " + ", ".join(map(str, killed)))
        done.extend(recover_snapshots(home, purge=True))  # snapshots, frozen filesystems, bases
        for work in (home.state_dir / "block", home.state_dir / "snapshots"):
            if work.is_dir():
                shutil.rmtree(work, ignore_errors=True)
                done.append(f"removed the block replication state {work}")
        try:
            source = home.read_state(home.source_file)
        except ConfigError:
            source = None
        if source and source.get("source_id"):
            home.write_bytes(home.previous_source_file, (source["source_id"] + "\n").encode())
            done.append(f"forgot the import of source {source['source_id']} (the next import replaces it)")
            if Identity.retire(home):  # the next import signs with it, then deletes it
                done.append(f"kept the agent key as {home.previous_key_file.name} until the next import "
                            "has proved it")
        if Identity.delete(home):
            done.append("deleted the agent key")
        if home.remove(home.task_file):
            done.append("forgot the task")
        for path in (home.source_file, home.command_journal_file, home.status_file, home.children_file):
            home.remove(path)
    if done:
        LOG.info("abort: %s", "; ".join(done))
        for line in done:
            console.line(line[0].upper() + line[1:])
        if final_line:
            console.line("Aborted. Run go2cloud_client again to import this host as a new source.")
    elif final_line:
        console.line(f"Nothing to abort in {home.root} (no import, no running agent)")


def stop(home: Home, console: Console) -> None:
    """Stop the running agent gracefully (SIGTERM, SIGKILL after 30 s); keep the import and task."""
    done = servicemode.stop_agent(home)
    if done is None:
        console.line("No agent is running")
        return
    task = None
    try:
        task = home.read_state(home.task_file)
    except ConfigError:
        pass
    console.line(done[0].upper() + done[1:] + "; the import is kept" + (
        f" and task {task.get('task_id')} resumes when the agent starts again" if task else ""))


# -- status -------------------------------------------------------------------------------------


def collect_status(home: Home) -> Dict[str, Any]:
    doc: Dict[str, Any] = {"home": str(home.root), "imported": False, "source_id": None, "workgroup": None,
                           "server": None, "running": False, "pid": None, "state": None, "task_id": None,
                           "phase": None, "cycle": None, "progress": None, "last_error": None,
                           "connected": None, "updated_at": None, "block": None}
    if not home.exists():
        return doc
    source = home.imported_source()
    if source:
        doc.update({"imported": True, "source_id": source.get("source_id"),
                    "workgroup": source.get("workgroup"), "server": source.get("server"),
                    "block": (source.get("capabilities") or {}).get("block")})
    pid = servicemode.running_pid(home)
    running = pid is not None
    doc.update({"running": running, "pid": pid})
    live = home.read_state(home.status_file) or {}
    task = home.read_state(home.task_file) or {}
    if running and live:
        for key in ("state", "task_id", "phase", "cycle", "progress", "last_error", "connected",
                    "updated_at", "retry", "loops"):
            doc[key] = live.get(key)
    elif task:
        cycle = task.get("cycle")
        doc.update({"state": "stopped", "task_id": task.get("task_id"),
                    "phase": None, "cycle": cycle["number"] if cycle else task.get("last_cycle"),
                    "last_error": task.get("last_error"), "task_status": task.get("status")})
    else:
        doc["state"] = "running" if running else ("stopped" if source else "not imported")
    return doc


# -- uninstall ----------------------------------------------------------------------------------


def is_package_folder(root: Path) -> bool:
    """Whether ``root`` is an installed package folder (an executable ``go2cloud_client`` next
    to ``Excludes/``), which uninstall removes; never ``/`` or a top-level directory."""
    root = root.absolute()
    if len(root.parts) < 3:
        return False
    return (root / "Excludes").is_dir() and any(
        (root / name).is_file() for name in ("go2cloud_client", "go2cloud_client.exe"))


def _close_log() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_go2cloud", False):
            root.removeHandler(handler)
            handler.close()


def uninstall(home: Home, console: Console, *, revert: bool,
              confirm: Optional[Callable[[str], bool]] = None) -> None:
    """Stop the agent, remove the service, forget the import, revert the host changes (with
    ``revert``), remove the package folder. With ``confirm`` (a terminal, no ``--yes``) the plan
    is put to it once first; False changes nothing."""
    if not home.exists():
        console.line(f"Nothing to uninstall: {home.root} has no agent home")
        return
    configure_logging(home)
    package = is_package_folder(home.root)
    changes = HostChangeJournal(home).list()
    if confirm is not None:
        plan = ["stop the agent and remove its service", "forget the import (release snapshots)"]
        if revert and changes:
            plan.append(f"revert {len(changes)} host change(s): " + "; ".join(describe(c) for c in changes))
        if package:
            plan.append(f"delete the package folder {home.root}")
        if not confirm("Uninstall go2cloud_client: " + ", ".join(plan) + ". Proceed?"):
            console.line("Nothing changed")
            return
    unit_home = platform.service_home()
    if unit_home == home.root or any(c.get("kind") == "service_installed" for c in changes):
        servicemode.uninstall(home, console)
    abort(home, console, final_line=False)
    if home.remove(home.previous_key_file):  # no import follows to prove it
        console.line("Deleted the previous agent key")
    if revert:
        revert_all(home, say=console.line)  # HostRevertError: the folder and the host change journal stay
    else:
        left = HostChangeJournal(home).list()
        if left:
            console.line("Host changes left in place (go2cloud_client uninstall --revert undoes them):")
            for change in left:
                console.line("  " + describe(change))
    if not package:
        journal = HostChangeJournal(home).list()
        console.line(f"Uninstalled. The agent home {home.root} is kept (logs"
                     + (", undo ledger" if journal else "") + "); delete it by hand if "
                     "you no longer need it")
        return
    LOG.info("removing the package folder %s", home.root)
    _close_log()
    try:
        shutil.rmtree(home.root)
    except OSError as exc:
        raise UninstallError(
            f"removing the package folder {home.root} failed: {exc.strerror or exc}") from exc
    console.line(f"Removed the package folder {home.root}. Uninstalled.")
