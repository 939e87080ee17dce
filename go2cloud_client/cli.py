"""Command line of the agent (click).

``go2cloud_client [OPTIONS]`` imports the host if needed and runs the agent in the foreground;
``--abort`` stops a running agent and forgets the import; ``status [--json]`` shows what the agent
is doing. :func:`main` is the only place where errors become exit codes (docs/exit-codes.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import click

from go2cloud_client import __version__, platform, subp
from go2cloud_client.agent import Agent, kill_children
from go2cloud_client.api import ControlPlane, RetryingControlPlane
from go2cloud_client.blockcycle import recover_snapshots
from go2cloud_client.config import Config, load_config
from go2cloud_client.console import Console, human_bytes, progress_line
from go2cloud_client.errors import (
    AlreadyRunningError,
    ConfigError,
    Go2CloudError,
    PackageInstallError,
    RsyncMissingError,
    UsageError,
)
from go2cloud_client.events import utc_now
from go2cloud_client.home import Home, HomeLock, configure_logging, lock_held, log_path, resolve_home
from go2cloud_client.identity import Identity
from go2cloud_client.inventory import collect

LOG = logging.getLogger("go2cloud_client.cli")

ABORT_WAIT_S = 30.0


def _can_prompt(no_prompt: bool) -> bool:
    if no_prompt:
        return False
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


# -- rsync --------------------------------------------------------------------------------------


def record_host_change(home: Home, change: Dict[str, Any]) -> None:
    """Append to the undo ledger ``state/host_changes.json`` (kept across --abort)."""
    doc = home.read_state(home.host_changes_file) or {}
    changes = list(doc.get("changes") or [])
    changes.append({"time": utc_now(), **change})
    home.write_state(home.host_changes_file, {"changes": changes})


def ensure_rsync(home: Home, config: Config, console: Console, *, yes: bool, no_prompt: bool) -> str:
    """The rsync binary to use; offers to install it with the distro's package manager."""
    from go2cloud_client.replication.rsync import find_rsync

    if config.rsync_path:
        return config.rsync_path
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
            "rsync with your package manager and run go2cloud_client again"
        )
    cmd = distro.install_command(["rsync"])
    shown = " ".join(cmd)
    if not yes:
        if not _can_prompt(no_prompt):
            raise RsyncMissingError(
                f"rsync is not installed: re-run with --yes to install it, or install it yourself "
                f"with: {shown}"
            )
        if not click.confirm(f"rsync is not installed. Install it now with '{shown}'?", default=True):
            raise RsyncMissingError(f"rsync is not installed; install it with: {shown}")
    console.line(f"Installing rsync: {shown}")
    try:
        subp.run(cmd, timeout=1800, env=subp.child_env(distro.env))
    except subp.ProcessError as exc:
        raise PackageInstallError(
            f"installing rsync failed ({exc}); install it yourself with: {shown}") from exc
    record_host_change(home, {"kind": "package_installed", "package": "rsync",
                              "manager": distro.package_manager, "undo": distro.remove_command(["rsync"])})
    found = find_rsync()
    if not found:
        raise RsyncMissingError(f"rsync is still not found after '{shown}'; install it and try again")
    console.line(f"Installed rsync ({found})")
    return found


# -- import -------------------------------------------------------------------------------------


def _ask_missing(server: Optional[str], token_id: Optional[str], token_code: Optional[str],
                 no_prompt: bool) -> Dict[str, str]:
    missing = [flag for flag, value in (("--server", server), ("--token-id", token_id),
                                        ("--token-code", token_code)) if not value]
    if missing and not _can_prompt(no_prompt):
        raise UsageError(
            "this host is not imported yet and " + ", ".join(missing) + " " +
            ("is" if len(missing) == 1 else "are") + " missing: pass "
            + " ".join(f"{m} ..." for m in missing)
            + " (the token code can also come from $GO2CLOUD_TOKEN_CODE), or run without --no-prompt "
            "on a terminal to be asked"
        )
    if not server:
        server = click.prompt("Control plane URL (https://...)").strip()
    if not token_id:
        token_id = click.prompt("Activation code token id (AccessTokenId)").strip()
    if not token_code:
        token_code = click.prompt("Activation code token code (AccessTokenCode)", hide_input=True).strip()
    return {"server": server or "", "token_id": token_id or "", "token_code": token_code or ""}


def import_source(home: Home, config: Config, console: Console, *, token_id: str, token_code: str,
                  control_plane: Optional[ControlPlane] = None) -> Dict[str, Any]:
    """Generate the key pair, import this host, persist the identity. The code is not stored."""
    assert config.server
    previous = home.previous_source_id()
    console.line(f"Importing source into {config.server} with activation code {token_id} ...")
    identity = Identity.generate()
    cp = control_plane or ControlPlane(config.server, fingerprint=config.server_fingerprint,
                                       connect_timeout=config.connect_timeout_s,
                                       read_timeout=config.read_timeout_s)
    inventory = collect(home)
    try:
        doc = RetryingControlPlane(cp, attempts=3, max_wait=5).import_source(
            token_id=token_id, token_code=token_code, public_key=identity.public_key_b64,
            inventory=inventory, previous_source_id=previous)
    finally:
        if control_plane is None:
            cp.close()
    identity.save(home)
    source = {
        "source_id": doc["source_id"],
        "workgroup": {"id": doc["workgroup"]["id"], "name": doc["workgroup"]["name"]},
        "server": config.server, "server_fingerprint": config.server_fingerprint,
        "heartbeat_interval": doc.get("heartbeat_interval") or 10, "imported_at": utc_now(),
        "replaced_source_id": previous,
    }
    home.write_state(home.source_file, source)
    home.remove(home.previous_source_file)
    LOG.info("imported as %s into workgroup %s (%s)", source["source_id"], source["workgroup"]["name"],
             source["workgroup"]["id"])
    console.import_succeeded(source["source_id"])
    return source


# -- foreground ---------------------------------------------------------------------------------


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


def run_foreground(home: Home, flags: Dict[str, Any], *, token_id: Optional[str], token_code: Optional[str],
                   yes: bool, no_prompt: bool, console: Console) -> None:
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
            if token_id or token_code:
                console.line(f"This host is already imported as {source['source_id']}; "
                             "--token-id/--token-code ignored (go2cloud_client --abort forgets the import)")
            changes = {k: v for k, v in (("server", config.server),
                                         ("server_fingerprint", config.server_fingerprint))
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
            asked = _ask_missing(config.server, token_id, token_code, no_prompt)
            if not config.server:
                config = load_config(home, flags={**flags, "server": asked["server"]})
            rsync_path = ensure_rsync(home, config, console, yes=yes, no_prompt=no_prompt)
            source = import_source(home, config, console, token_id=asked["token_id"],
                                   token_code=asked["token_code"])
            identity = Identity.load(home)
            assert identity is not None
        agent = Agent(home, config, source, identity, console=console, rsync_path=rsync_path)
        previous = _install_signals(agent)
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


def abort(home: Home, console: Console) -> None:
    """Stop a running agent of this home and its rsync children, forget the import."""
    if not home.exists():
        console.line(f"Nothing to abort: {home.root} has no agent home")
        return
    done: List[str] = []
    pid = home.read_pid()
    if lock_held(home):
        if not pid or not platform.pid_alive(pid):
            raise AlreadyRunningError(
                f"an agent holds the lock of {home.root} but its pid is unknown; stop it first")
        try:
            platform.terminate_pid(pid)
            deadline = time.monotonic() + ABORT_WAIT_S
            while time.monotonic() < deadline and lock_held(home):
                time.sleep(0.2)
            if lock_held(home):
                platform.terminate_pid(pid, force=True)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and lock_held(home):
                    time.sleep(0.2)
                done.append(f"killed the agent (pid {pid}; it did not stop within {ABORT_WAIT_S:.0f}s)")
            else:
                done.append(f"stopped the agent (pid {pid})")
        except PermissionError as exc:
            raise ConfigError(f"cannot stop the agent (pid {pid}): permission denied; run as root") from exc
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
        if Identity.delete(home):
            done.append("deleted the agent key")
        if home.remove(home.task_file):
            done.append("forgot the task")
        for path in (home.source_file, home.ledger_file, home.status_file, home.children_file):
            home.remove(path)
    if done:
        LOG.info("abort: %s", "; ".join(done))
        for line in done:
            console.line(line[0].upper() + line[1:])
        console.line("Aborted. Run go2cloud_client again to import this host as a new source.")
    else:
        console.line(f"Nothing to abort in {home.root} (no import, no running agent)")


# -- status -------------------------------------------------------------------------------------


def collect_status(home: Home) -> Dict[str, Any]:
    doc: Dict[str, Any] = {"home": str(home.root), "imported": False, "source_id": None, "workgroup": None,
                           "server": None, "running": False, "pid": None, "state": None, "task_id": None,
                           "phase": None, "cycle": None, "progress": None, "last_error": None,
                           "connected": None, "updated_at": None}
    if not home.exists():
        return doc
    source = home.read_state(home.source_file)
    if source:
        doc.update({"imported": True, "source_id": source.get("source_id"),
                    "workgroup": source.get("workgroup"), "server": source.get("server")})
    pid = home.read_pid()
    running = bool(pid and platform.pid_alive(pid) and lock_held(home))
    doc.update({"running": running, "pid": pid if running else None})
    live = home.read_state(home.status_file) or {}
    task = home.read_state(home.task_file) or {}
    if running and live:
        for key in ("state", "task_id", "phase", "cycle", "progress", "last_error", "connected",
                    "updated_at"):
            doc[key] = live.get(key)
    elif task:
        cycle = task.get("cycle")
        doc.update({"state": "stopped", "task_id": task.get("task_id"),
                    "phase": None, "cycle": cycle["number"] if cycle else task.get("last_cycle"),
                    "last_error": task.get("last_error"), "task_status": task.get("status")})
    else:
        doc["state"] = "running" if running else ("stopped" if source else "not imported")
    return doc


def print_status(doc: Dict[str, Any]) -> None:
    if not doc["imported"]:
        click.echo(f"Not imported (home {doc['home']}). Run go2cloud_client to import this host.")
        return
    wg = doc.get("workgroup") or {}
    click.echo(f"Source:     {doc['source_id']} (workgroup {wg.get('name', '?')} {wg.get('id', '')})")
    click.echo(f"Server:     {doc['server']}")
    click.echo(f"Home:       {doc['home']}")
    click.echo("Agent:      " + (f"running (pid {doc['pid']})" + ("" if doc.get("connected") in (None, True)
                                                                   else ", control plane unreachable")
                                 if doc["running"] else "not running"))
    click.echo(f"State:      {doc.get('state') or '-'}")
    if doc.get("task_id"):
        click.echo(f"Task:       {doc['task_id']}  phase {doc.get('phase') or '-'}  "
                   f"cycle {doc.get('cycle') or '-'}")
    if doc.get("progress"):
        click.echo(f"Progress:   {progress_line(doc['progress'])}")
    if doc.get("last_error"):
        err = doc["last_error"]
        click.echo(f"Last error: {err.get('code')}: {err.get('message')}")


# -- click --------------------------------------------------------------------------------------

_LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--server", metavar="URL", help="Control plane URL (https://HOST:PORT). Env: GO2CLOUD_SERVER.")
@click.option("--token-id", "--accesstokenid", "token_id", metavar="ID", help="Activation code token id.")
@click.option("--token-code", "--accesstokencode", "token_code", metavar="CODE", envvar="GO2CLOUD_TOKEN_CODE",
              help="Activation code token code (env GO2CLOUD_TOKEN_CODE; prompted hidden if missing).")
@click.option("--server-fingerprint", metavar="sha256:HEX",
              help="Pin the control plane's certificate. Env: GO2CLOUD_SERVER_FINGERPRINT.")
@click.option("--home", "home_dir", metavar="DIR", help="Agent home (env GO2CLOUD_HOME).")
@click.option("--yes", "-y", is_flag=True, help="Answer yes to every question (e.g. install rsync).")
@click.option("--no-prompt", is_flag=True, help="Never ask; fail with a message saying which flag to pass.")
@click.option("--abort", "do_abort", is_flag=True,
              help="Stop the running agent and its transfers and forget the import.")
@click.option("--log-level", type=_LEVELS, help="Log level of <home>/Logs/go2cloud_client.log.")
@click.version_option(__version__, "--version", prog_name="go2cloud_client", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, server: Optional[str], token_id: Optional[str], token_code: Optional[str],
        server_fingerprint: Optional[str], home_dir: Optional[str], yes: bool, no_prompt: bool,
        do_abort: bool, log_level: Optional[str]) -> None:
    """go2cloud_client: imports this server into a workgroup and migrates it.

    Without a subcommand: import this host (if it is not imported yet), then run the agent in the
    foreground until Ctrl-C or SIGTERM (a running task resumes when the agent starts again).
    """
    ctx.ensure_object(dict)
    ctx.obj["home_dir"] = home_dir
    if ctx.invoked_subcommand:
        return
    home = Home(resolve_home(home_dir))
    console = Console()
    if do_abort:
        if home.exists():
            configure_logging(home, log_level or "INFO")
        abort(home, console)
        return
    flags = {"server": server, "server_fingerprint": server_fingerprint, "log_level": log_level}
    run_foreground(home, flags, token_id=token_id, token_code=token_code, yes=yes, no_prompt=no_prompt,
                   console=console)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--home", "home_dir", metavar="DIR", help="Agent home (env GO2CLOUD_HOME).")
@click.pass_context
def status(ctx: click.Context, as_json: bool, home_dir: Optional[str]) -> None:
    """Show the identity, whether the agent runs, its state, task, progress and last error."""
    home = Home(resolve_home(home_dir or (ctx.obj or {}).get("home_dir")))
    doc = collect_status(home)
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print_status(doc)


# -- entry point --------------------------------------------------------------------------------


def _crash_log() -> Path:
    path = log_path()
    if path is not None:
        return path
    path = Path(tempfile.gettempdir()) / "go2cloud_client-error.log"
    handler = logging.FileHandler(str(path), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return path


def run(argv: Optional[List[str]] = None) -> int:
    """Run the CLI and return the exit status (errors mapped per docs/exit-codes.md)."""
    try:
        rv = cli.main(args=argv, prog_name="go2cloud_client", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("\ninterrupted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except Go2CloudError as exc:
        LOG.error("%s (exit %d)", exc, exc.exit_code)
        if exc.detail:
            LOG.debug("detail: %s", exc.detail)
        LOG.debug("traceback", exc_info=True)
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        return 130
    except Exception:  # noqa: BLE001 - the one place that turns a bug into an exit status
        path = _crash_log()
        LOG.exception("unexpected internal error")
        click.echo(f"error: unexpected internal error, see {path}", err=True)
        return 1


def main(argv: Optional[List[str]] = None) -> None:
    sys.exit(run(argv))


__all__ = ["cli", "main", "run", "human_bytes"]
