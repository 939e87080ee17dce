"""Command line of the agent (click).

``go2cloud_client [OPTIONS]`` prepares the host and imports it if needed (``--import-only`` stops
there), then runs the agent in the foreground; ``--abort`` stops a running agent and forgets the
import; ``status [--json]`` shows what the agent is doing; ``stop`` stops the running agent and
keeps its task; ``service install|uninstall`` runs it under the service manager; ``uninstall
[--revert]`` removes the agent and, with ``--revert``, the changes it made to the host.
:func:`main` is the only place where errors become exit codes (docs/exit-codes.md).
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
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import click
from click.core import ParameterSource

from go2cloud_client import __version__, hostprep, platform, servicemode
from go2cloud_client.agent import Agent, kill_children
from go2cloud_client.api import ControlPlane, RetryingControlPlane, retry_after_of
from go2cloud_client.blockcycle import recover_snapshots
from go2cloud_client.clock import utc_now
from go2cloud_client.config import Config, load_config
from go2cloud_client.console import Console, human_bytes, progress_line
from go2cloud_client.errors import (
    ConfigError,
    Go2CloudError,
    IdentityRejectedError,
    RequestRejectedError,
    ThrottledError,
    UninstallError,
    UsageError,
)
from go2cloud_client.home import Home, HomeLock, configure_logging, log_path, resolve_home
from go2cloud_client.hostchanges import HostChanges, describe, revert_all
from go2cloud_client.hostprep import HostPrep, block_summary, ensure_rsync
from go2cloud_client.identity import Identity
from go2cloud_client.inventory import collect
from go2cloud_client.proxy import settings_at_import, settings_of

LOG = logging.getLogger("go2cloud_client.cli")

ABORT_WAIT_S = 30.0


# -- import -------------------------------------------------------------------------------------


def _ask_missing(server: Optional[str], token_id: Optional[str], token_code: Optional[str],
                 no_prompt: bool) -> Dict[str, str]:
    missing = [flag for flag, value in (("--server", server), ("--token-id", token_id),
                                        ("--token-code", token_code)) if not value]
    if missing and not hostprep.can_prompt(no_prompt):
        give = [f"{m} ..." for m in missing if m != "--token-code"]
        if "--token-code" in missing:
            give.append(f"the token code in the environment variable {TOKEN_CODE_ENV} (or --token-code - "
                        "to read it from standard input)")
        raise UsageError(
            "this host is not imported yet and " + ", ".join(missing) + " " +
            ("is" if len(missing) == 1 else "are") + " missing: pass " + ", ".join(give)
            + ", or run without --no-prompt on a terminal to be asked"
        )
    if not server:
        server = click.prompt("Control plane URL (https://...)").strip()
    if not token_id:
        token_id = click.prompt("Activation code token id (AccessTokenId)").strip()
    if not token_code:
        token_code = click.prompt("Activation code token code (AccessTokenCode)", hide_input=True).strip()
    return {"server": server or "", "token_id": token_id or "", "token_code": token_code or ""}


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
                   yes: bool, no_prompt: bool, console: Console, import_only: bool = False,
                   attach: Optional[Callable[[Agent], None]] = None) -> None:
    """Prepare the host and import it if needed, then run the agent (unless ``import_only``).
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
            asked = _ask_missing(config.server, token_id, token_code, no_prompt)
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
        for path in (home.source_file, home.ledger_file, home.status_file, home.children_file):
            home.remove(path)
    if done:
        LOG.info("abort: %s", "; ".join(done))
        for line in done:
            console.line(line[0].upper() + line[1:])
        if final_line:
            console.line("Aborted. Run go2cloud_client again to import this host as a new source.")
    elif final_line:
        console.line(f"Nothing to abort in {home.root} (no import, no running agent)")


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
    block = doc.get("block")
    if block and block.get("available") is False:  # recorded by an older agent
        click.echo(f"Block mode: disabled ({block.get('reason')})")
    elif block:
        click.echo(f"Block mode: {block_summary(block)}")
    click.echo(f"State:      {doc.get('state') or '-'}")
    if doc.get("task_id"):
        click.echo(f"Task:       {doc['task_id']}  phase {doc.get('phase') or '-'}  "
                   f"cycle {doc.get('cycle') or '-'}")
    if doc.get("progress"):
        click.echo(f"Progress:   {progress_line(doc['progress'])}")
    if doc.get("last_error"):
        err = doc["last_error"]
        click.echo(f"Last error: {err.get('code')}: {err.get('message')}")
    retry = doc.get("retry")
    if retry:
        click.echo(f"Retrying:   attempt {retry.get('attempt')} in {retry.get('next_attempt_in_s')}s "
                   f"(failing for {retry.get('failing_for_s')}s of a {retry.get('budget_s'):.0f}s budget)")
    for name, loop in sorted((doc.get("loops") or {}).items()):
        if loop.get("failures"):
            click.echo(f"Loop {name}: {loop['failures']} failure(s), last: {loop.get('last_error')}"
                       + ("" if loop.get("alive") else " (restarting)"))


# -- the token code: never an argument ------------------------------------------------------------

#: The environment variable that carries the activation code's token code.
TOKEN_CODE_ENV = "GO2CLOUD_TOKEN_CODE"


def take_token_code(source: Optional[ParameterSource], value: Optional[str]) -> Optional[str]:
    """The token code given to this run, kept in no process's arguments or environment.

    A code on the command line is refused (an argument is readable by every local user through
    ``ps`` and ``/proc/PID/cmdline`` for the life of the process, and re-executing without it
    cannot hide it from the moment before, nor from the parent of a one-file executable):
    ``--token-code -`` reads it from standard input instead. A code from ``GO2CLOUD_TOKEN_CODE``
    is removed from this process's environment at once, including the copy other processes of
    the same user can read (``/proc/PID/environ``), so neither the long-running agent nor its
    children carry it."""
    if source == ParameterSource.COMMANDLINE:
        if value != "-":
            raise UsageError(
                "the token code is never accepted as an argument: every user of this host can read "
                f"arguments (ps). Set it in the environment instead (export {TOKEN_CODE_ENV}='...' "
                f"then sudo --preserve-env={TOKEN_CODE_ENV} go2cloud_client ...), pipe it with "
                "--token-code - (printf '%s\n' \"$CODE\" | go2cloud_client --token-code - ...), or leave "
                "it out to be asked; the code given was exposed, revoke it if others use this host "
                "(go2cloud_server code revoke TOKEN_ID)")
        line = click.get_text_stream("stdin").readline().strip()
        if not line:
            raise UsageError("--token-code -: standard input had no token code (one line expected)")
        return line
    if source == ParameterSource.ENVIRONMENT:
        platform.forget_environment_secret(TOKEN_CODE_ENV)
    return value or None


# -- click --------------------------------------------------------------------------------------

_LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--server", metavar="URL", help="Control plane URL (https://HOST:PORT). Env: GO2CLOUD_SERVER.")
@click.option("--token-id", "--accesstokenid", "token_id", metavar="ID", help="Activation code token id.")
@click.option("--token-code", "--accesstokencode", "token_code", metavar="-", envvar=TOKEN_CODE_ENV,
              help=f"'-': read the activation code token code from standard input (one line). The code "
                   f"itself is never an argument (every local user could read it): give it in the "
                   f"environment variable {TOKEN_CODE_ENV}, or leave both out to be asked (hidden).")
@click.option("--server-fingerprint", metavar="sha256:HEX",
              help="Pin the control plane's certificate. Env: GO2CLOUD_SERVER_FINGERPRINT.")
@click.option("--home", "home_dir", metavar="DIR", help="Agent home (env GO2CLOUD_HOME).")
@click.option("--yes", "-y", is_flag=True,
              help="Answer yes to every question (install the snapshot driver and rsync, set SELinux "
                   "to permissive).")
@click.option("--no-prompt", is_flag=True,
              help="Never ask: optional host changes are skipped (with a warning naming the flag), a "
                   "required one fails with a message saying which flag to pass.")
@click.option("--import-only", is_flag=True,
              help="Prepare the host and import it (or say it is already imported), then exit without "
                   "running the agent.")
@click.option("--abort", "do_abort", is_flag=True,
              help="Stop the running agent and its transfers and forget the import.")
@click.option("--log-level", type=_LEVELS, help="Log level of <home>/Logs/go2cloud_client.log.")
@click.option("--proxy", metavar="URL",
              help="HTTP proxy for every connection (http://[USER:PASSWORD@]HOST:PORT, or 'none'); "
                   "default: https_proxy from the environment at import. Kept by the import and by "
                   "'service install'. Env: GO2CLOUD_PROXY (better for credentials: arguments are "
                   "visible to every local user).")
@click.option("--no-proxy", "no_proxy", metavar="HOSTS",
              help="Hosts reached without the proxy (comma-separated names, .suffixes, IPs, CIDRs). "
                   "Env: GO2CLOUD_NO_PROXY; default: no_proxy from the environment at import.")
@click.option("--windows-service", is_flag=True, hidden=True,
              help="Answer the Windows Service Control Manager (the binPath of 'service install').")
@click.version_option(__version__, "--version", prog_name="go2cloud_client", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, server: Optional[str], token_id: Optional[str], token_code: Optional[str],
        server_fingerprint: Optional[str], home_dir: Optional[str], yes: bool, no_prompt: bool,
        import_only: bool, do_abort: bool, log_level: Optional[str], windows_service: bool,
        proxy: Optional[str], no_proxy: Optional[str]) -> Optional[int]:
    """go2cloud_client: imports this server into a workgroup and migrates it.

    Without a subcommand: prepare the host (snapshot driver, rsync, SELinux) and import it (if it
    is not imported yet), then run the agent in the foreground until Ctrl-C or SIGTERM (a running
    task resumes when the agent starts again).
    """
    ctx.ensure_object(dict)
    ctx.obj.update(home_dir=home_dir, yes=yes, no_prompt=no_prompt, proxy=proxy, no_proxy=no_proxy)
    token_code = take_token_code(ctx.get_parameter_source("token_code"), token_code)
    if ctx.invoked_subcommand:
        return None
    home = Home(resolve_home(home_dir))
    console = Console()
    if do_abort:
        if home.exists():
            configure_logging(home, log_level or "INFO")
        abort(home, console)
        return None
    flags = {"server": server, "server_fingerprint": server_fingerprint, "log_level": log_level,
             "proxy": proxy, "no_proxy": no_proxy}
    if windows_service:  # started by the Service Control Manager: its exit status is the agent's
        return platform.run_windows_service(lambda attach: run_foreground(
            home, flags, token_id=token_id, token_code=token_code, yes=yes, no_prompt=no_prompt,
            console=Console(), import_only=import_only, attach=attach))
    run_foreground(home, flags, token_id=token_id, token_code=token_code, yes=yes, no_prompt=no_prompt,
                   console=console, import_only=import_only)
    return None


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


def _home(ctx: click.Context, home_dir: Optional[str]) -> Home:
    return Home(resolve_home(home_dir or (ctx.obj or {}).get("home_dir")))


@cli.command()
@click.option("--home", "home_dir", metavar="DIR", help="Agent home (env GO2CLOUD_HOME).")
@click.pass_context
def stop(ctx: click.Context, home_dir: Optional[str]) -> None:
    """Stop the running agent gracefully (SIGTERM, SIGKILL after 30 s); keep the import and task."""
    home = _home(ctx, home_dir)
    done = servicemode.stop_agent(home)
    console = Console()
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


@cli.group()
def service() -> None:
    """Run the agent under systemd (Linux) or as a Windows service."""


@service.command("install")
@click.option("--home", "home_dir", metavar="DIR", help="Agent home (env GO2CLOUD_HOME).")
@click.option("--no-start", is_flag=True, help="Install and enable, but do not start the agent now.")
@click.pass_context
def service_install(ctx: click.Context, home_dir: Optional[str], no_start: bool) -> None:
    """Install (or replace) the service running this home's agent, enable it at boot, start it."""
    home = _home(ctx, home_dir)
    if home.exists():
        configure_logging(home)
    proxy = None
    source = home.imported_source() if home.exists() else None
    if source is not None:
        config = load_config(home, flags={"proxy": ctx.obj.get("proxy"), "no_proxy": ctx.obj.get("no_proxy")})
        proxy = settings_of(config.proxy, config.no_proxy, source)
    servicemode.install(home, Console(), start=not no_start, proxy=proxy)


@service.command("uninstall")
@click.option("--home", "home_dir", metavar="DIR", help="Agent home (env GO2CLOUD_HOME).")
@click.pass_context
def service_uninstall(ctx: click.Context, home_dir: Optional[str]) -> None:
    """Stop the agent and remove the service (the import and the task are kept)."""
    home = _home(ctx, home_dir)
    if home.exists():
        configure_logging(home)
    servicemode.uninstall(home, Console())


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


def uninstall(home: Home, console: Console, *, revert: bool, yes: bool, no_prompt: bool) -> None:
    """Stop the agent, remove the service, forget the import, revert the host changes (with
    ``revert``), remove the package folder. Asks once on a terminal unless ``yes``."""
    if not home.exists():
        console.line(f"Nothing to uninstall: {home.root} has no agent home")
        return
    configure_logging(home)
    package = is_package_folder(home.root)
    changes = HostChanges(home).list()
    if not yes and hostprep.can_prompt(no_prompt):
        plan = ["stop the agent and remove its service", "forget the import (release snapshots)"]
        if revert and changes:
            plan.append(f"revert {len(changes)} host change(s): " + "; ".join(describe(c) for c in changes))
        if package:
            plan.append(f"delete the package folder {home.root}")
        if not click.confirm("Uninstall go2cloud_client: " + ", ".join(plan) + ". Proceed?", default=True):
            console.line("Nothing changed")
            return
    unit_home = platform.service_home()
    if unit_home == home.root or any(c.get("kind") == "service_installed" for c in changes):
        servicemode.uninstall(home, console)
    abort(home, console, final_line=False)
    if home.remove(home.previous_key_file):  # no import follows to prove it
        console.line("Deleted the previous agent key")
    if revert:
        revert_all(home, say=console.line)  # HostRevertError: the folder and the ledger stay
    else:
        left = HostChanges(home).list()
        if left:
            console.line("Host changes left in place (go2cloud_client uninstall --revert undoes them):")
            for change in left:
                console.line("  " + describe(change))
    if not package:
        console.line(f"Uninstalled. The agent home {home.root} is kept (logs"
                     + (", undo ledger" if HostChanges(home).list() else "") + "); delete it by hand if "
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


@cli.command("uninstall")
@click.option("--revert", is_flag=True, help="Also undo the host changes of the undo ledger (newest first).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--no-prompt", is_flag=True, help="Never ask (the command itself is the consent).")
@click.option("--home", "home_dir", metavar="DIR", help="Agent home (env GO2CLOUD_HOME).")
@click.pass_context
def uninstall_cmd(ctx: click.Context, revert: bool, yes: bool, no_prompt: bool,
                  home_dir: Optional[str]) -> None:
    """Stop and remove the agent: service, import, package folder; --revert undoes the host changes."""
    obj = ctx.obj or {}
    uninstall(_home(ctx, home_dir), Console(), revert=revert, yes=yes or bool(obj.get("yes")),
              no_prompt=no_prompt or bool(obj.get("no_prompt")))


from go2cloud_client.drill.command import check as _drill_check  # noqa: E402 - the drill (helper D)

cli.add_command(_drill_check)


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
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["rsync-tunnel"]:  # started by rsync as its transport: no CLI, no logging setup
        from go2cloud_client.replication import tunnel

        return tunnel.main(args[1:])
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
