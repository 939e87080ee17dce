"""Command line of the agent (click): parsing, questions and output; the use-cases it runs are in
:mod:`go2cloud_client.lifecycle`.

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
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import click
from click.core import ParameterSource

from go2cloud_client import __version__, lifecycle, platform
from go2cloud_client.config import load_config
from go2cloud_client.console import Console, human_bytes, progress_line
from go2cloud_client.errors import Go2CloudError, UsageError
from go2cloud_client.home import Home, configure_logging, log_path, resolve_home
from go2cloud_client.host import prep as hostprep
from go2cloud_client.host import service as servicemode
from go2cloud_client.host.prep import block_summary
from go2cloud_client.proxy import settings_of

LOG = logging.getLogger("go2cloud_client.cli")


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


# -- status -------------------------------------------------------------------------------------


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
@click.option("--server", "servers", metavar="URL", multiple=True,
              help="Control plane URL (https://HOST:PORT). Repeat it for replicas of one control plane: "
                   "the agent moves to the next when it cannot reach one. Env: GO2CLOUD_SERVER (URLs "
                   "separated by commas).")
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
def cli(ctx: click.Context, servers: Tuple[str, ...], token_id: Optional[str], token_code: Optional[str],
        server_fingerprint: Optional[str], home_dir: Optional[str], yes: bool, no_prompt: bool,
        import_only: bool, do_abort: bool, log_level: Optional[str], windows_service: bool,
        proxy: Optional[str], no_proxy: Optional[str]) -> Optional[int]:
    """go2cloud_client: imports this server into a workgroup and migrates it.

    Without a subcommand: prepare the host (snapshot driver, rsync, SELinux) and import it (if it
    is not imported yet), then run the agent in the foreground until Ctrl-C or SIGTERM (a running
    task resumes when the agent starts again).
    """
    server = ",".join(servers) or None
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
        lifecycle.abort(home, console)
        return None
    flags = {"server": server, "server_fingerprint": server_fingerprint, "log_level": log_level,
             "proxy": proxy, "no_proxy": no_proxy}
    if windows_service:  # started by the Service Control Manager: its exit status is the agent's
        return platform.run_windows_service(lambda attach: lifecycle.run_foreground(
            home, flags, token_id=token_id, token_code=token_code, yes=yes, no_prompt=no_prompt,
            console=Console(), ask_missing=_ask_missing, import_only=import_only, attach=attach))
    lifecycle.run_foreground(home, flags, token_id=token_id, token_code=token_code, yes=yes,
                             no_prompt=no_prompt, console=console, ask_missing=_ask_missing,
                             import_only=import_only)
    return None


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--home", "home_dir", metavar="DIR", help="Agent home (env GO2CLOUD_HOME).")
@click.pass_context
def status(ctx: click.Context, as_json: bool, home_dir: Optional[str]) -> None:
    """Show the identity, whether the agent runs, its state, task, progress and last error."""
    home = Home(resolve_home(home_dir or (ctx.obj or {}).get("home_dir")))
    doc = lifecycle.collect_status(home)
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
    lifecycle.stop(_home(ctx, home_dir), Console())


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
    yes = yes or bool(obj.get("yes"))
    no_prompt = no_prompt or bool(obj.get("no_prompt"))
    ask = not yes and hostprep.can_prompt(no_prompt)
    lifecycle.uninstall(_home(ctx, home_dir), Console(), revert=revert,
                        confirm=(lambda plan: click.confirm(plan, default=True)) if ask else None)


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
