"""``go2cloud_server``: run the reference control plane (``serve``) and drive it (operator commands).

Every operator command talks to the REST API (see ``client``), has ``--json``, and exits with a
documented status (docs/operator-guide.md, "Exit codes"): 0 ok, 2 invalid input, 3 not found,
4 conflict or limit, 5 authentication failed, 10 server unreachable, 1 internal error. Errors are
one line on stderr (``error: ...``), never a traceback.
"""

from __future__ import annotations

import os
import re
import sys
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import click

# Start-up time is part of every operator command (docs/performance.md, "Issue 16: operator command
# start-up"): import here only what the command tree itself needs (click, and the cheap modules
# that give option choices and defaults). A command imports what it runs inside its function:
# the server (app, service, store, sqlite3, cryptography, http.server ...) only in ``serve``, the
# HTTP client (opclient: http.client, ssl) only in :class:`Op`. tests/unit/server/test_cli_imports.py
# fails when a heavy module comes back.
from go2cloud_server import rules
from go2cloud_server.errors import InvalidInput, NothingStarted, ServerError

if TYPE_CHECKING:  # pragma: no cover - types only
    import logging

    from go2cloud_server.opclient import Endpoint

DEFAULT_DATA_DIR = "/var/lib/go2cloud_server"


# ----------------------------------------------------------------------------------------------
# error handling: the only place that turns errors into exit codes
class _Group(click.Group):
    def main(
        self,
        args: Optional[Sequence[str]] = None,
        prog_name: Optional[str] = None,
        complete_var: Optional[str] = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(
                args=args,
                prog_name=prog_name or "go2cloud_server",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except click.exceptions.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            msg = exc.format_message().rstrip(".")
            _echo_error(f"error: {msg[:1].lower()}{msg[1:]}{hint}")
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _echo_error(f"error: {exc.format_message()}")
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        except ServerError as exc:
            _echo_error(f"error: {exc.message}")
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - never a traceback for the operator
            _log().debug("internal error", exc_info=True)
            _echo_error(
                f"error: internal error: {exc.__class__.__name__}: {exc} "
                "(re-run with GO2CLOUD_DEBUG=1 for details)"
            )
            if os.environ.get("GO2CLOUD_DEBUG"):
                import traceback

                traceback.print_exc()
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Reference control plane and target of go2cloud (serve) and its operator commands."""


# ----------------------------------------------------------------------------------------------
# output helpers
#: What a terminal would act on instead of showing: C0 controls (ESC, CR, LF, BEL, ...), DEL, C1
#: controls (0x80-0x9f, such as the one-byte CSI 0x9b), and the Unicode bidi controls that reorder
#: what is shown (U+061C, U+200E/F, U+202A-202E, U+2066-2069) or break lines (U+2028/9).
#: (A pattern, compiled by ``re`` on first use and cached there: a help text prints none of this.)
_TERMINAL_CONTROLS = "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"


def terminal_safe(text: str) -> str:
    """``text`` with every terminal control character shown as its escape (``\\x1b``, ``\\u202e``).

    Strings a source sends (hostname, OS, agent version, events, drill items, error messages) are
    shown to the operator; a code holder must not be able to clear the screen, move the cursor,
    set the window title or reorder a line. Every human output goes through here (:meth:`Op.out`
    on the data, :func:`_echo_error`, the log formatter of ``serve``); ``--json`` never does.
    Backslashes are left alone, so the function is idempotent."""
    return re.sub(
        _TERMINAL_CONTROLS,
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
        text,
    )


def _terminal_safe_data(data: Any) -> Any:
    """A copy of an API answer with :func:`terminal_safe` applied to every string (keys too)."""
    if isinstance(data, str):
        return terminal_safe(data)
    if isinstance(data, dict):
        return {_terminal_safe_data(k): _terminal_safe_data(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_terminal_safe_data(v) for v in data]
    return data


def _echo_error(message: str) -> None:
    click.echo(terminal_safe(message), err=True)


def _log() -> logging.Logger:
    """This module's logger (``logging`` is imported by ``serve``, or for an internal error)."""
    import logging

    return logging.getLogger(__name__)


def _echo_json(data: Any) -> None:
    import json

    click.echo(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True))


def _width(text: str) -> int:
    """Terminal columns of ``text`` (CJK characters take two)."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def _table(headers: List[str], rows: List[List[Any]]) -> str:
    cells = [[("-" if v is None or v == "" else str(v)) for v in row] for row in rows]
    widths = [_width(h) for h in headers]
    for row in cells:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], _width(v))
    lines = ["  ".join(_pad(h, widths[i]) for i, h in enumerate(headers)).rstrip()]
    for row in cells:
        lines.append("  ".join(_pad(v, widths[i]) for i, v in enumerate(row)).rstrip())
    return "\n".join(lines)


def _kv(pairs: List[Tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {'-' if v is None or v == '' else v}" for k, v in pairs)


def _block_mode(inventory: Dict[str, Any]) -> str:
    """The agent's block capability (inventory.capabilities.block) in words; agents that do not
    report it are treated as able to do block mode."""
    block = ((inventory.get("capabilities") or {}).get("block")) if isinstance(inventory, dict) else None
    if not isinstance(block, dict):
        return "not reported (allowed)"
    if block.get("available") is False:  # an older agent's import
        return f"disabled: {block.get('reason') or 'no reason given'}"
    backends = ", ".join(str(b) for b in block.get("backends") or []) or "-"
    said = f"available (snapshot backends: {backends})"
    volumes = block.get("volumes")
    if isinstance(volumes, dict) and volumes:
        pit = sorted({str(n) for v in volumes.values() if isinstance(v, dict)
                      for n in v.get("point_in_time") or []})
        said += f"; point in time: {', '.join(pit) or 'none (the drill checks each disk)'}"
    driver = block.get("driver")
    if isinstance(driver, dict) and driver.get("installed") is False:
        said += f"; snapshot driver not installed: {driver.get('reason') or '?'}"
    return said


def _bytes(n: Any) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _progress(p: Optional[Dict[str, Any]]) -> str:
    if not p or not p.get("bytes_total"):
        return "-"
    pct = 100.0 * float(p.get("bytes_done") or 0) / float(p["bytes_total"])
    return f"{pct:.0f}% of {_bytes(p['bytes_total'])}"


def _wg_name(wg: Optional[Dict[str, Any]]) -> str:
    return f"{wg['name']} ({wg['id']})" if wg else "-"


# ----------------------------------------------------------------------------------------------
# operator plumbing
#: the type of every command's --data-dir, made once: each click.Path looks its words up with
#: gettext (a search of the locale directories) when it is made
_DATA_DIR_TYPE = click.Path(path_type=Path)


def operator_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--json", "as_json", is_flag=True, help="Print the API answer as JSON.")(fn)
    fn = click.option(
        "--server-fingerprint",
        metavar="sha256:HEX",
        help="Pin the server certificate (default: <data-dir>/tls/cert.pem).",
    )(fn)
    fn = click.option(
        "--server",
        metavar="URL",
        envvar="GO2CLOUD_SERVER",
        help="Server URL (env GO2CLOUD_SERVER; default: <data-dir>/server.json).",
    )(fn)
    fn = click.option(
        "--data-dir",
        type=_DATA_DIR_TYPE,
        envvar="GO2CLOUD_DATA_DIR",
        default=DEFAULT_DATA_DIR,
        show_default=True,
        help="Server data directory: admin.token, server.json, tls/ (env GO2CLOUD_DATA_DIR).",
    )(fn)
    return fn


class Op:
    """Per-invocation context of an operator command."""

    def __init__(
        self, data_dir: Path, server: Optional[str], server_fingerprint: Optional[str], as_json: bool
    ) -> None:
        from go2cloud_server.opclient import OperatorClient, resolve

        self.as_json = as_json
        self.endpoint: Endpoint = resolve(data_dir, server, server_fingerprint)
        self.client = OperatorClient(self.endpoint)

    def call(self, method: str, path: str, body: Any = None, params: Optional[Dict[str, Any]] = None) -> Any:
        return self.client.request(method, path, body, params)

    def out(self, data: Any, human: Callable[[Any], str]) -> None:
        if self.as_json:
            _echo_json(data)
        else:
            click.echo(human(_terminal_safe_data(data)))


def _op(kw: Dict[str, Any]) -> Op:
    return Op(kw.pop("data_dir"), kw.pop("server"), kw.pop("server_fingerprint"), kw.pop("as_json"))


def seg(value: str) -> str:
    """``value`` as one path segment of an API URL (:meth:`OperatorClient.seg`)."""
    from go2cloud_server.opclient import OperatorClient

    return OperatorClient.seg(value)


def _scope(workgroup: Optional[str], source: Optional[str]) -> str:
    if bool(workgroup) == bool(source):
        raise InvalidInput("give exactly one of --workgroup WG or --source S")
    return f"/workgroups/{seg(workgroup)}" if workgroup else f"/sources/{seg(source or '')}"


# ----------------------------------------------------------------------------------------------
# serve
def raise_fd_limit() -> None:
    """Raise the soft limit of open files to the hard limit, and say so: every agent holds one or
    two connections (docs/reliability.md, "Bounded resources"), and the common soft limit of 1024
    is below what a fleet needs while the hard limit usually is not."""
    import resource

    log = _log()
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # what Linux allows at most (fs.nr_open)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open files: soft limit raised from %d to %d (the hard limit)", soft, hard)
            return
        except (OSError, ValueError) as exc:
            log.warning("open files: cannot raise the soft limit %d to %d: %s", soft, hard, exc)
            return
    log.info("open files: limit %d", soft)


#: glibc's allocator for a server with a thread per connection: no per-thread cache (``tcache``:
#: up to 7 freed blocks of each of 64 sizes kept by every thread, which grew the RSS under 1,000
#: agents by ~1.5 MiB a minute, bounded only by threads x ~240 KiB) and 2 arenas instead of 8 per
#: core (less memory kept free in arenas). Measured with bench/bench_fleet.py (docs/performance.md).
MALLOC_TUNABLES = "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=2"
_TUNED_ENV = "GO2CLOUD_MALLOC_TUNED"


def tune_malloc() -> Optional[str]:
    """Run the server with :data:`MALLOC_TUNABLES`: glibc reads them only at process start, so
    the first time the process re-executes itself with them set (same pid, same arguments). An
    operator's own ``GLIBC_TUNABLES`` is left alone, as is a libc other than glibc. Returns what
    is in effect (for the log), None when nothing was changed."""
    if os.environ.pop(_TUNED_ENV, None):
        tuned = os.environ.get("GLIBC_TUNABLES", "")
        if tuned == MALLOC_TUNABLES:  # for this process only: its rsync daemons run untuned
            del os.environ["GLIBC_TUNABLES"]
        return f"GLIBC_TUNABLES={tuned}"
    import platform

    argv = list(getattr(sys, "orig_argv", None) or [])
    # only a server process of its own (never ``serve`` called inside another program, a test's)
    if os.environ.get("GLIBC_TUNABLES") or platform.libc_ver()[0] != "glibc" \
            or "serve" not in sys.argv[1:] or "serve" not in argv \
            or not any("go2cloud_server" in a for a in argv):
        return None
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
    env[_TUNED_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError as exc:  # the interpreter cannot be executed again: run untuned
        return f"default (re-executing {sys.executable} with {MALLOC_TUNABLES} failed: {exc})"
    return None  # not reached


def _parse_listen(value: str) -> Tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidInput(f"--listen {value!r}: expected HOST:PORT (port 0-65535, 0 = pick a free port)")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def _setup_logging(level: str) -> None:
    import logging
    import time

    class TerminalSafeFormatter(logging.Formatter):
        """Log lines of ``serve`` (read on a terminal, or with ``journalctl``) with the message's
        control characters escaped: request paths and hostnames come from the network."""

        def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
            return terminal_safe(super().formatMessage(record))

    handler = logging.StreamHandler(sys.stderr)
    fmt = TerminalSafeFormatter("%(asctime)sZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    fmt.converter = time.gmtime
    handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


@main.command()
@click.option(
    "--listen",
    default="127.0.0.1:8443",
    show_default=True,
    metavar="HOST:PORT",
    help="Address of the HTTPS API (port 0 = pick a free port).",
)
@click.option(
    "--data-dir",
    type=_DATA_DIR_TYPE,
    envvar="GO2CLOUD_DATA_DIR",
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="State directory (env GO2CLOUD_DATA_DIR).",
)
@click.option(
    "--rsync-port",
    type=click.IntRange(0, 65535),
    default=None,
    hidden=True,
    help="Ignored: file-level data goes through the HTTPS port (no rsync listener any more).",
)
@click.option(
    "--public-host",
    metavar="HOST",
    help="Address agents use to reach this server (default: the listen host).",
)
@click.option(
    "--auto-retry-after",
    type=click.FloatRange(1, 86400),
    default=300,
    show_default=True,
    help="Seconds after a cycle failed for a transient cause (network, control plane or target away) "
    "before the server queues it again by itself; doubled for each automatic retry of the day.",
)
@click.option(
    "--auto-retries-per-day",
    type=click.IntRange(0, 100),
    default=3,
    show_default=True,
    help="Automatic retries of a failed cycle per task in 24 hours (0: never; then only migration sync).",
)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(0.2, 3600),
    default=10,
    show_default=True,
    help="Seconds between agent heartbeats; a source is offline after 3 missed ones.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(1, 600),
    default=30,
    show_default=True,
    metavar="SECONDS",
    help="Total time a client has for the TLS handshake, and for a request line and its headers "
    "(a body gets this plus 1 s per 16 KiB); slower clients are disconnected. Long polls are not cut.",
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning"]), default="info", show_default=True
)
@click.option(
    "--packages",
    "packages_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Agent packages served under /download/ without authentication: the files listed in this "
    "directory's SHA256SUMS (packaging/build.py writes them to dist/). Default: <data-dir>/packages.",
)
@click.option(
    "--import-window",
    type=click.FloatRange(1, 86400),
    default=rules.IMPORT_WINDOW_S,
    show_default=True,
    metavar="SECONDS",
    help="Sliding window in which failed imports are counted (per client address and per token id).",
)
@click.option(
    "--import-failures",
    type=click.IntRange(1, 100000),
    default=rules.IMPORT_FAILURES_PER_ADDRESS,
    show_default=True,
    metavar="N",
    help="Failed imports allowed per client address in the window (twice as many per token id); "
    "more are answered 429 with Retry-After.",
)
@click.option(
    "--target-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    metavar="DIR",
    help="Where the images go (task trees and block images, under DIR/tasks/). Put it on its own "
    "filesystem: a full image store then cannot stop the database, and the control plane keeps "
    "answering. Default: the data directory (or the directory recorded at the previous start).",
)
@click.option(
    "--db-reserve",
    "db_reserve_mib",
    type=click.IntRange(0, 1 << 20),
    default=rules.DB_RESERVE_MIB,
    show_default=True,
    metavar="MIB",
    help="When images and database share a filesystem: MiB kept in <data-dir>/db-reserve for the "
    "database. A full target releases it (heartbeats, acknowledgements and operator commands go "
    "on; the task shows target_full), and data writes wait until it can be allocated again. 0: "
    "no reserve. Not used with a --target-dir on another filesystem.",
)
@click.option(
    "--listen-backlog",
    type=click.IntRange(16, 65535),
    default=4096,
    show_default=True,
    metavar="N",
    help="Connections the kernel queues before the server accepts them (a fleet reconnecting at "
    "once after a restart). The kernel caps it at net.core.somaxconn.",
)
@click.option(
    "--database",
    envvar="GO2CLOUD_DATABASE",
    metavar="URL",
    default=None,
    help="postgresql://USER@HOST:PORT/DATABASE: keep the state in PostgreSQL, shared by every replica "
    "of serve given the same URL (env GO2CLOUD_DATABASE; a password goes in ~/.pgpass or PGPASSWORD). "
    "Default: SQLite in <data-dir>/server.db.",
)
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    metavar="FILE",
    help="PEM certificate of the HTTPS port, with --tls-key: give every replica the same pair so agents "
    "pin one identity. Installed into <data-dir>/tls. Default: the pair generated there at the first start.",
)
@click.option(
    "--tls-key",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    metavar="FILE",
    help="PEM private key of --tls-cert.",
)
@click.option(
    "--clock-offset-s",
    type=float,
    default=0.0,
    hidden=True,
    help="TESTS ONLY: shift the server's wall clock by this many seconds (code expiry, clock skew).",
)
def serve(
    listen: str,
    data_dir: Path,
    rsync_port: Optional[int],
    public_host: Optional[str],
    heartbeat_interval: float,
    auto_retry_after: float,
    auto_retries_per_day: int,
    request_timeout: float,
    log_level: str,
    packages_dir: Optional[Path],
    import_window: float,
    import_failures: int,
    target_dir: Optional[Path],
    db_reserve_mib: int,
    listen_backlog: int,
    database: Optional[str],
    tls_cert: Optional[Path],
    tls_key: Optional[Path],
    clock_offset_s: float,
) -> None:
    """Run the control plane (HTTPS API, rsync target, scheduler) in the foreground."""
    import signal
    import threading

    from go2cloud_server.app import ServeOptions, ServerApp
    from go2cloud_server.clock import Clock, OffsetClock, SystemClock

    log = _log()

    malloc_tuning = tune_malloc()  # may re-exec this process: first, before anything is opened
    _setup_logging(log_level)
    raise_fd_limit()
    if malloc_tuning:
        log.info("memory allocator: %s (docs/reliability.md, \"Bounded resources\")", malloc_tuning)
    from go2cloud_server import memtrace

    memtrace.start_from_env()  # benchmarks only (GO2CLOUD_MEMTRACE)
    if rsync_port is not None:
        log.warning("--rsync-port is ignored: file-level data goes through the HTTPS port now")
    host, port = _parse_listen(listen)
    if heartbeat_interval == int(heartbeat_interval):
        heartbeat_interval = int(heartbeat_interval)
    # everything the server and its rsync daemon create under the data directory (database and
    # its WAL, logs, state, task directories, block images) is for the server's user only;
    # what needs another mode sets it explicitly (the top directory of a file image)
    os.umask(0o077)
    clock: Clock = SystemClock()
    if clock_offset_s:  # the test hook: a real server process with a shifted wall clock
        log.warning("--clock-offset-s %s: the server clock is shifted (tests only)", clock_offset_s)
        clock = OffsetClock(clock_offset_s)
    app = ServerApp(ServeOptions(
        host=host,
        port=port,
        data_dir=data_dir.absolute(),
        public_host=public_host,
        heartbeat_interval=heartbeat_interval,
        auto_retry_after=auto_retry_after,
        auto_retries_per_day=auto_retries_per_day,
        request_timeout=request_timeout,
        packages_dir=packages_dir,
        import_window=import_window,
        import_failures=import_failures,
        target_dir=target_dir,
        db_reserve_mib=db_reserve_mib,
        listen_backlog=listen_backlog,
        database=database,
        tls_cert=tls_cert,
        tls_key=tls_key,
        clock=clock,
    ))
    try:
        app.build()

        def stop(signum: int, frame: Any) -> None:
            log.info("signal %d: shutting down", signum)
            threading.Thread(target=app.shutdown, name="shutdown", daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        local_url, public_url = app.urls()
        log.info(
            "go2cloud_server listening on %s (public %s), fingerprint %s (API, block and rsync data), "
            "%d task target(s) restored; admin token in %s",
            local_url,
            public_url,
            app.fingerprint,
            app.restored,
            app.data_dir / "admin.token",
        )
        app.serve_forever()
    finally:
        app.close()
        log.info("go2cloud_server stopped")


# ----------------------------------------------------------------------------------------------
# workgroup
@main.group()
def workgroup() -> None:
    """Create, list, show and delete workgroups."""


def _wg_human(wg: Dict[str, Any]) -> str:
    tags = ", ".join(f"{k}={v}" for k, v in sorted((wg.get("tags") or {}).items()))
    return _kv(
        [
            ("id", wg["id"]),
            ("name", wg["name"]),
            ("description", wg.get("description")),
            ("tags", tags),
            ("sources", wg.get("source_count")),
            ("migration", wg.get("migration_status")),
            ("created", wg.get("created_at")),
        ]
    )


@workgroup.command("create")
@click.argument("name")
@click.option("--description", default="", help="Free text, up to 256 characters.")
@click.option("--tag", "tags", multiple=True, metavar="K=V", help="A tag (repeat; up to 20).")
@operator_options
def workgroup_create(name: str, description: str, tags: Tuple[str, ...], **kw: Any) -> None:
    """Create workgroup NAME."""
    tag_map: Dict[str, str] = {}
    for item in tags:
        k, v = rules.parse_tag(item)
        tag_map[k] = v
    body = {"name": rules.workgroup_name(name), "description": description, "tags": tag_map}
    op = _op(kw)
    op.out(
        op.call("POST", "/workgroups", body), lambda wg: f"Workgroup {wg['name']} created.\n" + _wg_human(wg)
    )


@workgroup.command("list")
@operator_options
def workgroup_list(**kw: Any) -> None:
    """List workgroups."""
    op = _op(kw)
    data = op.call("GET", "/workgroups")

    def human(d: Dict[str, Any]) -> str:
        if not d["workgroups"]:
            return "No workgroups yet: create one with 'go2cloud_server workgroup create NAME'."
        return _table(
            ["ID", "NAME", "SOURCES", "MIGRATION", "DESCRIPTION"],
            [
                [w["id"], w["name"], w["source_count"], w["migration_status"], w["description"]]
                for w in d["workgroups"]
            ],
        )

    op.out(data, human)


@workgroup.command("show")
@click.argument("wg")
@operator_options
def workgroup_show(wg: str, **kw: Any) -> None:
    """Show workgroup WG (id or name) with its sources."""
    op = _op(kw)

    def human(d: Dict[str, Any]) -> str:
        text = _wg_human(d)
        if d.get("sources"):
            text += "\n\n" + _source_table(d["sources"])
        return text

    op.out(op.call("GET", f"/workgroups/{seg(wg)}"), human)


@workgroup.command("delete")
@click.argument("wg")
@operator_options
def workgroup_delete(wg: str, **kw: Any) -> None:
    """Delete workgroup WG (it must have no sources)."""
    op = _op(kw)
    op.out(op.call("DELETE", f"/workgroups/{seg(wg)}"), lambda d: f"Workgroup {wg} deleted.")


# ----------------------------------------------------------------------------------------------
# code
@main.group()
def code() -> None:
    """Activation codes that let agents import sources into a workgroup."""


@code.command("create")
@click.option("--workgroup", "wg", required=True, help="Workgroup id or name.")
@click.option(
    "--uses",
    type=int,
    help=f"How many imports ({rules.CODE_USES[0]}-{rules.CODE_USES[1]}, default {rules.CODE_USES_DEFAULT}).",
)
@click.option(
    "--days",
    type=int,
    help=f"Validity in days ({rules.CODE_DAYS[0]}-{rules.CODE_DAYS[1]}, default {rules.CODE_DAYS_DEFAULT}).",
)
@operator_options
def code_create(wg: str, uses: Optional[int], days: Optional[int], **kw: Any) -> None:
    """Create an activation code and print the commands to paste on sources."""
    body: Dict[str, Any] = {}
    if uses is not None:
        body["uses"] = rules.integer(uses, "--uses", rules.CODE_USES)
    if days is not None:
        body["days"] = rules.integer(days, "--days", rules.CODE_DAYS)
    op = _op(kw)

    def human(d: Dict[str, Any]) -> str:
        return "\n".join(
            [
                _kv(
                    [
                        ("token id", d["token_id"]),
                        ("token code", d["token_code"]),
                        ("workgroup", _wg_name(d["workgroup"])),
                        ("uses", d["uses"]),
                        ("expires", d["expires_at"]),
                    ]
                ),
                "",
                "Run on a Linux source (as root):",
                "  " + d["commands"]["linux"],
                "",
                "Run on a Windows source (PowerShell as Administrator):",
                "  " + d["commands"]["powershell"],
                "",
                "The token code is shown only now; keep it secret.",
            ]
        )

    op.out(op.call("POST", f"/workgroups/{seg(wg)}/codes", body), human)


@code.command("list")
@click.option("--workgroup", "wg", help="Only the codes of this workgroup.")
@operator_options
def code_list(wg: Optional[str], **kw: Any) -> None:
    """List activation codes (never their secret part)."""
    op = _op(kw)

    def human(d: Dict[str, Any]) -> str:
        if not d["codes"]:
            return "No activation codes."
        return _table(
            ["TOKEN ID", "WORKGROUP", "USES LEFT", "EXPIRES", "STATE"],
            [
                [
                    c["token_id"],
                    (c.get("workgroup") or {}).get("name"),
                    f"{c['uses_left']}/{c['uses']}",
                    c["expires_at"],
                    c["state"],
                ]
                for c in d["codes"]
            ],
        )

    op.out(op.call("GET", "/codes", params={"workgroup": wg} if wg else None), human)


@code.command("revoke")
@click.argument("token_id")
@operator_options
def code_revoke(token_id: str, **kw: Any) -> None:
    """Revoke activation code TOKEN_ID: later imports with it are refused."""
    op = _op(kw)
    op.out(
        op.call("POST", f"/codes/{seg(token_id)}/revoke"),
        lambda d: f"Activation code {d['token_id']} revoked.",
    )


# ----------------------------------------------------------------------------------------------
# source
@main.group()
def source() -> None:
    """Imported source servers."""


def _source_table(sources: List[Dict[str, Any]]) -> str:
    return _table(
        ["ID", "HOSTNAME", "WORKGROUP", "STATUS", "LAST SEEN", "TASK"],
        [
            [
                s["id"],
                s["hostname"],
                (s.get("workgroup") or {}).get("name"),
                s["status"],
                s.get("last_seen_at"),
                s.get("task_id"),
            ]
            for s in sources
        ],
    )


@source.command("list")
@click.option("--workgroup", "wg", help="Only the sources of this workgroup.")
@operator_options
def source_list(wg: Optional[str], **kw: Any) -> None:
    """List sources with their real-time status."""
    op = _op(kw)
    op.out(
        op.call("GET", "/sources", params={"workgroup": wg} if wg else None),
        lambda d: _source_table(d["sources"]) if d["sources"] else "No sources imported yet.",
    )


@source.command("show")
@click.argument("source_id")
@operator_options
def source_show(source_id: str, **kw: Any) -> None:
    """Show source SOURCE_ID: inventory summary, agent state, task and recent events."""
    op = _op(kw)

    def human(d: Dict[str, Any]) -> str:
        inv = d.get("inventory") or {}
        agent = d.get("agent") or {}
        task = d.get("task") or {}
        err = agent.get("last_error") or {}
        text = _kv(
            [
                ("id", d["id"]),
                ("hostname", d["hostname"]),
                ("workgroup", _wg_name(d.get("workgroup"))),
                ("status", d["status"]),
                ("os", d.get("os")),
                ("kernel", inv.get("kernel")),
                ("arch", inv.get("arch")),
                ("cpus", inv.get("cpus")),
                ("memory", _bytes(inv.get("memory_bytes"))),
                ("block mode", _block_mode(inv)),
                ("agent version", d.get("agent_version")),
                ("imported", d.get("imported_at")),
                ("last seen", d.get("last_seen_at")),
                ("agent state", agent.get("state")),
                ("phase", agent.get("phase")),
                ("progress", _progress(d.get("progress"))),
                ("task", f"{task['task_id']} ({task['status']})" if task else None),
                ("last error", f"{err.get('code')}: {err.get('message')}" if err else None),
                ("replaced by", d.get("replaced_by")),
            ]
        )
        retry = agent.get("retry") or {}
        if retry:
            text += "\n" + _kv([("retrying", _retry_line(retry))])
        from go2cloud_server import heartbeat as heartbeat_report

        failing = heartbeat_report.failing_loops(agent.get("loops"))
        if failing:
            text += "\n\nAgent loops that failed (restarted automatically with backoff):\n" + _table(
                ["LOOP", "STATE", "FAILURES", "LAST FAILURE", "LAST ERROR"],
                [[name, "running" if loop["alive"] else "restarting", loop["failures"],
                  loop.get("last_failure_at") or "-", loop.get("last_error") or "-"]
                 for name, loop in sorted(failing.items())],
            )
        session = d.get("session") or {}
        if session:
            text += "\n" + _kv([("session", f"epoch {session.get('epoch')} since {session.get('since')} "
                                            f"({'live' if session.get('live') else 'expired'} until "
                                            f"{session.get('expires_at')})")])
        warning = d.get("clone_warning") or {}
        if warning:
            text += ("\n\nWARNING (possible cloned machine, " + str(warning.get("time")) + "):\n  "
                     + str(warning.get("message")))
        events = d.get("events") or []
        if events:
            text += "\n\nRecent events:\n" + _table(
                ["TIME", "LEVEL", "CODE", "MESSAGE"],
                [[e["time"], e["level"], e["code"], e["message"]] for e in events],
            )
        return text

    op.out(op.call("GET", f"/sources/{seg(source_id)}"), human)


def _retry_line(retry: Dict[str, Any]) -> str:
    """One line for a cycle the agent is retrying (its heartbeat's ``retry``)."""
    parts = [f"attempt {retry.get('attempt')} after {retry.get('code')}"]
    if retry.get("next_attempt_in_s") is not None:
        parts.append(f"next in {retry['next_attempt_in_s']:.0f}s")
    if retry.get("failing_for_s") is not None and retry.get("budget_s") is not None:
        parts.append(f"failing for {retry['failing_for_s']:.0f}s of a {retry['budget_s']:.0f}s budget")
    return ", ".join(parts) + (f": {retry['message']}" if retry.get("message") else "")


@source.command("associate")
@click.argument("source_id")
@click.option("--workgroup", "wg", required=True, help="Workgroup id or name.")
@operator_options
def source_associate(source_id: str, wg: str, **kw: Any) -> None:
    """Put source SOURCE_ID into workgroup WG."""
    op = _op(kw)
    op.out(
        op.call("POST", f"/sources/{seg(source_id)}/associate", {"workgroup": wg}),
        lambda d: f"Source {d['id']} is now in workgroup {_wg_name(d.get('workgroup'))}.",
    )


@source.command("disassociate")
@click.argument("source_id")
@operator_options
def source_disassociate(source_id: str, **kw: Any) -> None:
    """Take source SOURCE_ID out of its workgroup."""
    op = _op(kw)
    op.out(
        op.call("POST", f"/sources/{seg(source_id)}/disassociate"),
        lambda d: f"Source {d['id']} is no longer in a workgroup.",
    )


@source.command("replace")
@click.argument("source_id")
@click.option("--by", "by", required=True, metavar="NEW", help="The source that replaces SOURCE_ID.")
@operator_options
def source_replace(source_id: str, by: str, **kw: Any) -> None:
    """Mark source SOURCE_ID replaced by source NEW (its task is cancelled, its target released).

    For a host imported again without a proof of its old key (an agent whose home was lost, or a
    source in no workgroup): check that NEW is the same machine first."""
    op = _op(kw)
    op.out(
        op.call("POST", f"/sources/{seg(source_id)}/replace", {"by": by}),
        lambda d: f"Source {d['id']} is now replaced by {d['replaced_by']}; its agent is refused "
        "from now on.",
    )


# ----------------------------------------------------------------------------------------------
# migration
@main.group()
def migration() -> None:
    """Start and drive migrations of a workgroup or of one source."""


def scope_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--source", "src", metavar="S", help="One source.")(fn)
    fn = click.option("--workgroup", "wg", metavar="WG", help="Every source of a workgroup (id or name).")(fn)
    return fn


def _duration(value: Optional[str]) -> Any:
    return rules.parse_duration(value) if value is not None else None


_TASK_KEYS = ("name", "description", "bandwidth_mbps", "bandwidth_schedule", "compression", "checksum",
              "sync_every", "keep_images")


def task_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--keep-images",
        type=int,
        help=f"Images kept per task ({rules.KEEP_IMAGES[0]}-"
        f"{rules.KEEP_IMAGES[1]}, default {rules.KEEP_IMAGES_DEFAULT}).",
    )(fn)
    fn = click.option(
        "--sync-every",
        metavar="DURATION",
        help="Automatic incremental sync interval: 30m, 2h, 1d (at least 60s), or 'off'.",
    )(fn)
    fn = click.option("--checksum/--no-checksum", default=None, help="Verify file contents by checksum.")(fn)
    fn = click.option("--compression", type=int, help="Compression level 0-10 (default 7, 0 = off).")(fn)
    fn = click.option(
        "--bandwidth-schedule",
        metavar="WINDOWS",
        help="Bandwidth windows in the source's local time, Mbit/s per window (0 = unlimited), e.g. "
        "'Mon-Fri 08:00-20:00=50,*=0'; outside every window (and with no '*') --bandwidth-mbps applies; "
        "'none' removes the schedule.",
    )(fn)
    fn = click.option("--bandwidth-mbps", type=int, help="Bandwidth limit in Mbit/s (0 = unlimited).")(fn)
    fn = click.option("--description", help="Task description.")(fn)
    fn = click.option("--name", help="Task name.")(fn)
    return fn


def _task_body(
    name: Optional[str],
    description: Optional[str],
    bandwidth_mbps: Optional[int],
    bandwidth_schedule: Optional[str],
    compression: Optional[int],
    checksum: Optional[bool],
    sync_every: Optional[str],
    keep_images: Optional[int],
) -> Dict[str, Any]:
    body: Dict[str, Any] = {}
    if name is not None:
        body["name"] = name
    if description is not None:
        body["description"] = description
    if bandwidth_mbps is not None:
        body["bandwidth_mbps"] = rules.integer(bandwidth_mbps, "--bandwidth-mbps", rules.BANDWIDTH_MBPS)
    if bandwidth_schedule is not None:
        # checked here for a quick answer; the normalised form is the server's
        rules.bandwidth_schedule(bandwidth_schedule, "--bandwidth-schedule")
        body["bandwidth_schedule"] = bandwidth_schedule
    if compression is not None:
        body["compression"] = rules.integer(compression, "--compression", rules.COMPRESSION)
    if checksum is not None:
        body["checksum"] = checksum
    if sync_every is not None:
        body["sync_every_s"] = rules.sync_every(_duration(sync_every))
    if keep_images is not None:
        body["keep_images"] = rules.integer(keep_images, "--keep-images", rules.KEEP_IMAGES)
    return body


def _start_human(d: Dict[str, Any]) -> str:
    parts = []
    if d.get("started"):
        parts.append(
            "Started:\n" + _table(["SOURCE", "TASK"], [[e["source_id"], e["task_id"]] for e in d["started"]])
        )
    if d.get("skipped"):
        parts.append(
            "Skipped:\n" + _table(["SOURCE", "REASON"], [[e["source_id"], e["reason"]] for e in d["skipped"]])
        )
    if d.get("not_migratable"):
        parts.append(
            "Cannot be migrated:\n"
            + _table(["SOURCE", "REASON"], [[e["source_id"], e["reason"]] for e in d["not_migratable"]])
        )
    return "\n\n".join(parts) or "No sources in this workgroup."


@migration.command("start")
@scope_options
@click.option(
    "--mode",
    type=click.Choice(rules.MODES),
    default="file",
    show_default=True,
    help="file: rsync of paths; block: whole disks or image files through a snapshot.",
)
@click.option(
    "--path",
    "paths",
    multiple=True,
    metavar="P",
    help="Mode file: absolute source path to migrate (repeat; default: the source's local mount points).",
)
@click.option(
    "--disk",
    "disks",
    multiple=True,
    metavar="DEV_OR_IMAGE",
    help="Mode block: block device or image file on the source, e.g. /dev/vdb (repeat; required).",
)
@click.option(
    "--snapshot",
    type=click.Choice(rules.SNAPSHOT_BACKENDS),
    help=f"Mode block: snapshot backend on the source (default {rules.SNAPSHOT_DEFAULT}: the first "
    "usable of reflink, btrfs, elastio-snap, dattobd, lvm, else live).",
)
@click.option(
    "--drill/--no-drill",
    default=True,
    show_default=True,
    help="Run the drill on each source first; a critical item stops that source (drill_abnormal).",
)
@task_options
@operator_options
def migration_start(
    wg: Optional[str],
    src: Optional[str],
    mode: str,
    paths: Tuple[str, ...],
    disks: Tuple[str, ...],
    snapshot: Optional[str],
    drill: bool,
    **kw: Any,
) -> None:
    """Start migrating every source of a workgroup (or one source); the drill runs first."""
    body = _task_body(**{k: kw.pop(k) for k in _TASK_KEYS})
    body["drill"] = drill
    if mode == "block":
        if paths:
            raise InvalidInput("--path: only for --mode file (mode block migrates disks: use --disk)")
        if not disks:
            raise InvalidInput(
                "--disk: required with --mode block (a block device or image file, e.g. /dev/vdb)"
            )
        body.update(mode="block", disks=rules.disks(list(disks)), snapshot=rules.snapshot(snapshot))
        if body["snapshot"] in rules.NON_PIT_SNAPSHOTS:  # the operator's informed choice: who
            body["by"] = _operator_name()
    else:
        if disks:
            raise InvalidInput("--disk: only for --mode block (file mode migrates paths: use --path)")
        if snapshot:
            raise InvalidInput("--snapshot: only for --mode block")
        if paths:
            body["paths"] = rules.paths(list(paths))
    scope = _scope(wg, src)
    op = _op(kw)
    out = op.call("POST", f"{scope}/migration", body)
    op.out(out, _start_human)
    if not out.get("started") and (out.get("skipped") or out.get("not_migratable")):
        n = len(out.get("skipped") or []) + len(out.get("not_migratable") or [])
        raise NothingStarted(f"no migration started: none of the {n} source(s) of the request could start "
                             "(see the reasons above; fix them and run migration start again)")


def _action_human(action: str) -> Callable[[Dict[str, Any]], str]:
    def human(d: Dict[str, Any]) -> str:
        parts = []
        if d.get("affected"):
            parts.append(
                f"{action}:\n"
                + _table(
                    ["SOURCE", "TASK", "COMMAND"],
                    [[e["source_id"], e["task_id"], e.get("command_id")] for e in d["affected"]],
                )
            )
        if d.get("skipped"):
            parts.append(
                "Skipped:\n"
                + _table(["SOURCE", "REASON"], [[e["source_id"], e["reason"]] for e in d["skipped"]])
            )
        return "\n\n".join(parts) or "Nothing to do."

    return human


def _make_action(action: str, help_text: str) -> None:
    def cmd(wg: Optional[str], src: Optional[str], **kw: Any) -> None:
        body: Dict[str, Any] = {}
        if action == "modify":
            body = _task_body(**{k: kw.pop(k) for k in _TASK_KEYS})
            if not body:
                raise InvalidInput("modify: give at least one option to change (see --help)")
        elif action == "complete":
            body = {"final_sync": bool(kw.pop("final_sync"))}
        elif action == "drill":
            body = {"override": bool(kw.pop("override"))}
            if body["override"]:
                body["by"] = _operator_name()
        scope = _scope(wg, src)
        op = _op(kw)
        op.out(op.call("POST", f"{scope}/migration/{action}", body), _action_human(action.capitalize()))

    fn: Callable[..., Any] = operator_options(cmd)
    if action == "modify":
        fn = task_options(fn)
    if action == "complete":
        fn = click.option(
            "--final-sync", is_flag=True, help="Run one last incremental sync before completing."
        )(fn)
    if action == "drill":
        fn = click.option(
            "--override",
            is_flag=True,
            help="Start the migration despite the drill's critical items (recorded: who and when).",
        )(fn)
    fn = scope_options(fn)
    migration.command(action, help=help_text)(fn)


for _action, _help in (
    (
        "modify",
        "Change task name, description, bandwidth, compression, checksum, sync interval or retention.",
    ),
    ("pause", "Pause the running sync (rsync is stopped; resume continues)."),
    ("resume", "Resume a paused task."),
    ("sync", "Run one incremental sync now (also retries a failed task)."),
    ("complete", "Finish the migration (optionally after a final sync); no more syncs afterwards."),
    ("cancel", "Cancel the migration and release its target (images already taken are kept)."),
    ("drill", "Run the drill again after fixing its critical items (or --override to start anyway)."),
):
    _make_action(_action, _help)


def _operator_name() -> str:
    """Who overrides a drill, as recorded in the task: user@host of this operator command."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:128]


@main.group()
def drill() -> None:
    """Drill reports (the checks a source runs before its migration starts)."""


_SEVERITY_TITLES = (("critical", "Critical"), ("warning", "Warning"), ("info", "Info"))


def _drill_human(d: Dict[str, Any]) -> str:
    report = d.get("report") or {}
    counts = report.get("summary") or {}
    head = [
        ("source", f"{d['source_id']} ({d.get('hostname')})"),
        ("task", f"{d.get('task_id')} ({d.get('task_status')})"),
        ("drill", f"{d['drill_id']}: {d['status']}"),
        ("requested", d.get("requested_at")),
        ("finished", d.get("finished_at")),
    ]
    if report:
        head.append(
            ("items", ", ".join(f"{counts.get(k, 0)} {k}" for k, _ in _SEVERITY_TITLES))
        )
    if d.get("override"):
        o = d["override"]
        head.append(("override", f"started despite critical items by {o.get('by')} at {o.get('at')}"))
    text = _kv(head)
    items = report.get("items") or []
    for sev, title in _SEVERITY_TITLES:
        group = [i for i in items if i.get("severity") == sev]
        if not group:
            continue
        text += f"\n\n{title} ({len(group)}):"
        for item in group:
            text += f"\n  [{item.get('check')}] {item.get('finding')}"
            if item.get("fix"):
                text += f"\n      fix: {item['fix']}"
    if not report:
        text += "\n\nThe drill is running: no report yet."
    return text


@drill.command("show")
@click.option("--source", "src", required=True, metavar="S", help="The source.")
@operator_options
def drill_show(src: str, **kw: Any) -> None:
    """The latest drill report of a source, items by severity with their fix."""
    op = _op(kw)
    op.out(op.call("GET", f"/sources/{seg(src)}/drill"), _drill_human)


def _eta(seconds: Any) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _disk_progress(t: Dict[str, Any]) -> str:
    """Per-disk progress of a block task (from the agent's last heartbeat)."""
    prog = t.get("progress") or {}
    by_name = {d.get("name"): d for d in prog.get("disks") or [] if isinstance(d, dict)}
    last_image = {a.get("disk"): a for a in t.get("artifacts") or []}  # ordered by cycle
    rows = []
    for disk in t.get("disks") or []:
        p = by_name.get(disk["name"]) or {}
        art = last_image.get(disk["name"])
        total = p.get("bytes_total")
        done = p.get("bytes_done")
        pct = f" ({100.0 * float(done or 0) / float(total):.0f}%)" if total else ""
        rows.append(
            [
                disk["name"],
                disk["path"],
                p.get("state"),
                _bytes(total),
                _bytes(done) + pct if done is not None else "-",
                _bytes(p.get("bytes_sent")) + (f" ({p['compression']})" if p.get("compression") else ""),
                _bytes(p.get("bytes_zero")),
                f"{_bytes(p['rate_bps'])}/s" if p.get("rate_bps") else "-",
                _eta(p.get("eta_s")),
                f"{art['cycle']}: {_check_text(art.get('report'))}" if art else "-",
            ]
        )
    return f"Disks of {t['task_id']} (snapshot {t.get('snapshot') or '-'}):\n" + _table(
        ["DISK", "PATH", "STATE", "TOTAL", "DONE", "SENT", "ZERO SKIPPED", "RATE", "ETA", "LAST IMAGE"], rows
    )


def _mbit(mbps: Any) -> str:
    return f"{mbps} Mbit/s" if mbps else "unlimited"


def _bandwidth_line(t: Dict[str, Any]) -> str:
    """The limit in force now (as the source's agent evaluates its windows) and the schedule."""
    schedule = t.get("bandwidth_schedule")
    now = t.get("bandwidth_now") if isinstance(t.get("bandwidth_now"), dict) else None
    if not schedule:
        return _mbit(t.get("bandwidth_mbps")) if t.get("bandwidth_mbps") else ""
    text = (f"now {_mbit(now.get('limit_mbps'))}" if now else
            "now unknown (the agent has not reported since the schedule was set)")
    if now and now.get("next_change_at"):
        text += f", {_mbit(now.get('next_limit_mbps'))} from {now['next_change_at']}"
    zone = f", {now['zone']}" if now and now.get("zone") else ""
    zone = f" (local time of the source{zone})"
    return (f"{text}; schedule {schedule}{zone}; outside the windows "
            f"{_mbit(t.get('bandwidth_mbps'))}")


def _show_human(d: Dict[str, Any]) -> str:
    head: List[Tuple[str, Any]] = []
    if "workgroup" in d:
        head += [("workgroup", _wg_name(d["workgroup"])), ("status", d["status"])]
        counts = ", ".join(f"{k} {v}" for k, v in sorted((d.get("source_status_counts") or {}).items()))
        head.append(("sources", counts))
        tasks = d.get("tasks") or []
    else:
        head += [
            ("source", f"{d['source_id']} ({d.get('hostname')})"),
            ("source status", d["source_status"]),
            ("migration", d["status"]),
        ]
        tasks = (d.get("tasks") or [])[:1]
    text = _kv(head)
    if tasks:
        text += "\n\n" + _table(
            ["SOURCE", "TASK", "STATUS", "CYCLE", "PROGRESS", "IMAGES", "SYNC EVERY", "ERROR"],
            [
                [
                    t["source_id"],
                    t["task_id"],
                    t["status"] + (" (completing)" if t.get("finalizing") else ""),
                    t.get("cycle") or t.get("last_committed_cycle"),
                    _progress(t.get("progress")),
                    len(t.get("artifacts") or []),
                    rules.format_duration(t.get("sync_every_s")),
                    (t.get("error") or {}).get("message"),
                ]
                for t in tasks
            ],
        )
    for t in tasks:
        bw = _bandwidth_line(t)
        if bw:
            text += f"\n\nBandwidth of {t['task_id']}: {bw}"
        choice = t.get("snapshot_choice")
        if isinstance(choice, dict):
            text += (f"\n\nSnapshot of {t['task_id']}: {choice.get('backend')}, chosen explicitly by "
                     f"{choice.get('by')} at {choice.get('at')} ({choice.get('cost')})")
        if t.get("mode") == "block" and t.get("disks"):
            text += "\n\n" + _disk_progress(t)
    return text


@migration.command("show")
@scope_options
@operator_options
def migration_show(wg: Optional[str], src: Optional[str], **kw: Any) -> None:
    """Migration status of a workgroup or of one source, with tasks and progress."""
    scope = _scope(wg, src)
    op = _op(kw)
    op.out(op.call("GET", f"{scope}/migration"), _show_human)


@migration.command("artifacts")
@click.option("--source", "src", metavar="S", help="The artifacts of this source's latest task.")
@click.option("--task", "task_id", metavar="T", help="The artifacts of this task.")
@operator_options
def migration_artifacts(src: Optional[str], task_id: Optional[str], **kw: Any) -> None:
    """List the images (one per completed sync cycle) of a task."""
    if bool(src) == bool(task_id):
        raise InvalidInput("give exactly one of --source S or --task T")
    op = _op(kw)
    if src:
        tasks = op.call("GET", f"/sources/{seg(src)}/migration").get("tasks") or []
        if not tasks:
            from go2cloud_server.errors import NotFound

            raise NotFound(f"source {src} has no migration task yet")
        task_id = tasks[0]["task_id"]
    data = op.call("GET", f"/tasks/{seg(task_id or '')}/artifacts")
    op.out(data, _artifacts_human)


def _check_text(report: Optional[Dict[str, Any]]) -> str:
    """A block artifact's verification report in one cell: filesystem and check result (or that
    the verification is still running, or why it could not be done)."""
    from go2cloud_server.verifier import REPORT_FAILED, REPORT_PENDING

    report = report or {}
    if report.get("state") == REPORT_PENDING:
        return "verifying"
    if report.get("state") == REPORT_FAILED:
        return f"not verified: {report.get('error') or 'unknown error'}"
    check = report.get("check")
    if isinstance(check, dict):
        if check.get("skipped"):
            check = check.get("summary") or f"check skipped ({check['skipped']})"
        else:
            summary = check.get("summary") or ""
            check = "ok" if check.get("ok") else f"failed (rc {check.get('rc')}): {summary}"
    fs = report.get("fs")
    return " ".join(str(x) for x in (fs, check) if x) or "-"


def _artifacts_human(d: Dict[str, Any]) -> str:
    arts = d["artifacts"]
    if not arts:
        return "No images yet."
    if any(a.get("disk") for a in arts):
        return _table(
            ["CYCLE", "DISK", "CREATED", "SIZE", "STATE", "SHA256", "CHECK", "PATH"],
            [
                [
                    a["cycle"],
                    a.get("disk"),
                    a["created_at"],
                    _bytes(a["bytes"]),
                    (a.get("report") or {}).get("state") or "-",
                    (a.get("sha256") or "-")[:16],
                    _check_text(a.get("report")),
                    a["path"],
                ]
                for a in arts
            ],
        )
    return _table(
        ["CYCLE", "CREATED", "SIZE", "FILES", "PATH"],
        [[a["cycle"], a["created_at"], _bytes(a["bytes"]), a["files"], a["path"]] for a in arts],
    )


# ----------------------------------------------------------------------------------------------
# image (block generations written out; runs on the target host, reads the data directory)
@main.group()
def image() -> None:
    """Images of committed cycles (block tasks), written out from the data directory."""


@image.command("export")
@click.option("--source", required=True, help="Source id (s-...).")
@click.option("--cycle", type=click.IntRange(1, 999999), help="Committed cycle (default: the newest).")
@click.option("--disk", help="Disk name, as 'migration artifacts' shows it (needed when there are several).")
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="File to write.")
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]), default="raw", show_default=True,
              help="Image format (raw: a sparse file, bit-identical to the source disk; qcow2: not yet).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), envvar="GO2CLOUD_DATA_DIR",
              default=DEFAULT_DATA_DIR, show_default=True,
              help="The server's data directory, as 'serve' has it (read only; env GO2CLOUD_DATA_DIR).")
@click.option("--database", envvar="GO2CLOUD_DATABASE", metavar="URL", default=None,
              help="The database 'serve' was given (postgresql://...; env GO2CLOUD_DATABASE); default: the "
                   "SQLite file in --data-dir.")
@click.option("--boot-check", is_flag=True,
              help="Then boot the image under qemu (unchanged: -snapshot, no network) and wait for a login "
                   "prompt on its serial console; exit non-zero when none comes.")
@click.option("--boot-timeout", type=click.IntRange(10, 86400), default=900, show_default=True,
              help="Seconds the boot check waits for the login prompt (software emulation is slow).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def image_export(source: str, cycle: Optional[int], disk: Optional[str], out: Path, fmt: str, force: bool,
                 data_dir: Path, database: Optional[str], boot_check: bool, boot_timeout: int,
                 as_json: bool) -> None:
    """Write a source's disk at a committed cycle as a sparse raw image (on the target host): a block
    task's disk as replicated, or a file task's tree built into a bootable disk (BIOS, extlinux)."""
    from go2cloud_server.imageexport import ExportRequest, export_image

    res = export_image(ExportRequest(data_dir=data_dir, source=source, out=out, cycle=cycle, disk=disk,
                                     fmt=fmt, force=force, database=database))
    if not as_json:
        if res.kind == "converted":
            click.echo(terminal_safe(
                f"Built a bootable disk of {res.disk} from cycle {res.cycle} (source {res.source}, task "
                f"{res.task}) at {res.out}: {_bytes(res.bytes)}, {_bytes(res.data_bytes)} of data; the "
                f"conversion report is {res.out}.conversion.txt (and .json)"))
        else:
            verified = (f"sha256 {res.sha256} (verified)" if res.sha256 else
                        f"verification {res.state or 'unknown'}")
            sizes = f"{_bytes(res.bytes)}, {_bytes(res.data_bytes)} of data"
            click.echo(terminal_safe(f"Exported cycle {res.cycle} of disk {res.disk} (source {res.source}, "
                                     f"task {res.task}) to {res.out}: {sizes}; {verified}"))
    doc = res.as_dict()
    if boot_check:
        from go2cloud_server.bootcheck import boot_check as run_boot_check

        if not as_json:
            click.echo(f"Booting it under qemu to check it (up to {boot_timeout} s)...")
        checked = run_boot_check(Path(res.out), timeout_s=boot_timeout)
        doc["boot_check"] = {"login_after_s": checked.seconds, "accel": checked.accel,
                             "console": checked.console}
        if not as_json:
            click.echo(terminal_safe(f"Boot check: a login prompt after {checked.seconds:.0f} s "
                                     f"({checked.accel}); the console is in {checked.console}"))
    if as_json:
        _echo_json(doc)
