"""The composition root of the control plane: everything ``serve`` runs, built in one place.

:class:`ServerApp` builds, from parsed :class:`ServeOptions` and a clock, the database
(``store``), the space guard, the TLS certificate, the children registry and the rsync sessions,
the :class:`~go2cloud_server.service.Service`, the block receiver, the HTTPS server and the
scheduler, and writes ``<data-dir>/server.json``. The ``serve`` command (``cli``) only sets up the
process (logging, limits, umask, signals) and calls it; tests and a future replica can build the
application the same way without click.

The clock is chosen by the caller: :class:`~go2cloud_server.clock.SystemClock` in production;
``serve --clock-offset-s`` (a hidden option, tests only) passes an
:class:`~go2cloud_server.clock.OffsetClock`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple

from go2cloud_server import space as space_mod
from go2cloud_server.autoretry import AutoRetry
from go2cloud_server.clock import Clock, SystemClock
from go2cloud_server.errors import Conflict, InvalidInput

if TYPE_CHECKING:
    from go2cloud_server.store import Database

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    """What ``serve`` was asked for (its command line, parsed and checked)."""

    host: str
    port: int
    data_dir: Path
    public_host: Optional[str] = None
    heartbeat_interval: float = 10
    auto_retry_after: float = 300
    auto_retries_per_day: int = 6
    request_timeout: float = 30
    packages_dir: Optional[Path] = None
    import_window: float = 600
    import_failures: int = 20
    target_dir: Optional[Path] = None
    db_reserve_mib: int = space_mod.DEFAULT_RESERVE_MIB
    listen_backlog: int = 4096
    #: ``postgresql://...`` (replicas on one database); None: SQLite in the data directory
    database: Optional[str] = None
    #: the TLS identity (PEM certificate and key) replicas share; None: the generated pair in
    #: ``<data-dir>/tls``
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    clock: Clock = field(default_factory=SystemClock)


def refuse_if_running(info_file: Path, data_dir: Path) -> None:
    """A server that is still running with this data directory (its ``server.json`` names a live
    process that is that server: same pid, boot and start time) must not be disturbed: its
    children would be taken for leftovers. A record whose pid is gone or now another process is
    stale (a kill -9) and ignored."""
    from go2cloud_server import children

    try:
        doc = json.loads(info_file.read_text())
        pid = int(doc["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    ident = children.process_identity(pid)
    if pid == os.getpid() or ident is None:
        return
    if doc.get("boot_id") == children.boot_id() and doc.get("start_ticks") == ident[0]:
        raise Conflict(
            f"another go2cloud_server (pid {pid}) is running with the data directory {data_dir}: stop it "
            f"first (kill {pid}) or use another --data-dir"
        )


def install_tls_identity(tls_dir: Path, cert: Path, key: Path) -> Tuple[Path, Path]:
    """``serve --tls-cert/--tls-key``: the pair is checked (readable PEM, the key matches the
    certificate) and installed as ``<data-dir>/tls/cert.pem`` and ``key.pem`` (0600), so the
    operator commands pin it and a restart without the options keeps it. Returns their paths."""
    import ssl

    from go2cloud_server import tls
    from go2cloud_server.atomicfile import write_atomic

    try:
        cert_pem, key_pem = Path(cert).read_bytes(), Path(key).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"--tls-cert/--tls-key: cannot read {exc.filename}: {exc.strerror}") from None
    try:
        tls.fingerprint(Path(cert))
        tls.server_context(Path(cert), Path(key))
    except (ValueError, ssl.SSLError) as exc:
        raise InvalidInput(
            f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its private key ({exc}): give "
            "the same pair to every replica, e.g. the cert.pem and key.pem of one replica's <data-dir>/tls"
        ) from None
    cert_path, key_path = tls.paths(tls_dir)
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (cert_path.exists() and cert_path.read_bytes() == cert_pem):
        log.info("TLS identity: installing %s as %s", cert, cert_path)
    write_atomic(key_path, key_pem.decode("ascii"), mode=0o600)
    write_atomic(cert_path, cert_pem.decode("ascii"), mode=0o600)
    return cert_path, key_path


def shared_admin_token(store: Database, data_dir: Path) -> str:
    """The operators' token. On a database of replicas (PostgreSQL) every replica serves the one
    stored in the database (made by the first) and writes it to ``<data-dir>/admin.token`` for the
    operator commands run on its machine; on SQLite it is that file's, made at the first start."""
    import secrets

    from go2cloud_server import auth
    from go2cloud_server.atomicfile import write_atomic

    try:
        local: Optional[str] = (data_dir / auth.ADMIN_TOKEN_FILE).read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        local = None
    token = store.shared_secret("admin_token", lambda: local or secrets.token_urlsafe(32))
    if token is None:
        return auth.ensure_admin_token(data_dir)
    if local != token:
        if local:
            log.warning("%s held another admin token than the database's: replaced by the replicas' shared "
                        "one", data_dir / auth.ADMIN_TOKEN_FILE)
        write_atomic(data_dir / auth.ADMIN_TOKEN_FILE, token + "\n", mode=0o600)
    return token


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def choose_target_dir(data_dir: Path, given: Optional[Path]) -> Path:
    """The image directory: ``--target-dir``, else the one recorded in ``<data-dir>/target-dir``
    at an earlier start (so a restart without the option finds the images), else the data
    directory. A given one is recorded for the next start."""
    from go2cloud_server.atomicfile import write_atomic

    record = data_dir / "target-dir"
    try:
        recorded: Optional[Path] = Path(record.read_text().strip()) if record.exists() else None
    except OSError:
        recorded = None
    if given is None:
        chosen = recorded or data_dir
    else:
        chosen = given.absolute()
        if recorded is not None and recorded != chosen and (recorded / "tasks").is_dir() \
                and any((recorded / "tasks").iterdir()):
            log.warning("--target-dir %s: the previous start used %s, which still holds task images; "
                        "tasks whose directory is not under %s have lost their images", chosen, recorded,
                        chosen / "tasks")
        write_atomic(record, f"{chosen}\n", mode=0o600)
    chosen.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        chosen.chmod(0o700)
    return chosen


class ServerApp:
    """The running control plane. ``build()`` makes every part (or raises, with what was made
    already closed by ``close()``), ``serve_forever()`` answers until ``shutdown()``, ``close()``
    stops and releases everything in order."""

    def __init__(self, opts: ServeOptions) -> None:
        from go2cloud_server.httpapi import ApiServer
        from go2cloud_server.rsyncd import RsyncSessions
        from go2cloud_server.scheduler import Scheduler
        from go2cloud_server.service import Service

        self.opts = opts
        self.clock = opts.clock
        self.data_dir = opts.data_dir.absolute()
        self.info_file = self.data_dir / "server.json"
        self.store: Optional[Database] = None
        self.rsyncd: Optional[RsyncSessions] = None
        self.service: Optional[Service] = None
        self.httpd: Optional[ApiServer] = None
        self.scheduler: Optional[Scheduler] = None
        self.local_url = ""
        self.fingerprint = ""
        self.restored = 0

    @property
    def local_host(self) -> str:
        host = self.opts.host
        return "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)

    def build(self) -> ServerApp:
        from go2cloud_server import auth, children, tls
        from go2cloud_server.artifacts import TaskTree
        from go2cloud_server.atomicfile import write_atomic
        from go2cloud_server.blockrx import BlockReceiver
        from go2cloud_server.downloads import Downloads
        from go2cloud_server.httpapi import Api, ApiServer, somaxconn
        from go2cloud_server.rsyncd import RsyncSessions
        from go2cloud_server.scheduler import Scheduler
        from go2cloud_server.service import Service
        from go2cloud_server.store import open_database
        from go2cloud_server.throttle import ImportThrottle

        opts, data_dir = self.opts, self.data_dir
        public = opts.public_host or self.local_host
        data_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            data_dir.chmod(0o700)
        target_dir = choose_target_dir(data_dir, opts.target_dir)
        space = space_mod.SpaceGuard(data_dir, target_dir, opts.db_reserve_mib * space_mod.MiB)
        if space.shared and space.reserve_bytes:
            if not space.ensure():
                log.warning("no room for the database reserve (%d MiB) in %s: %s; data writes wait until "
                            "there is", opts.db_reserve_mib, data_dir, space_mod.describe(data_dir))
        else:
            space.ensure()  # removes a reserve an earlier layout left
        store = self.store = open_database(opts.database, data_dir)
        log.info("database: %s; images in %s (%s)", store.describe(), target_dir / "tasks",
                 f"the data directory's filesystem: {opts.db_reserve_mib} MiB reserve for the database"
                 if space.shared else "their own filesystem")
        if opts.tls_cert is not None or opts.tls_key is not None:
            if opts.tls_cert is None or opts.tls_key is None:
                raise InvalidInput("--tls-cert and --tls-key go together: give both (or neither, for the "
                                   "generated pair in <data-dir>/tls)")
            cert, key = install_tls_identity(data_dir / "tls", opts.tls_cert, opts.tls_key)
        else:
            cert, key = tls.ensure_certificate(data_dir / "tls", [opts.host, public])
        fingerprint = self.fingerprint = tls.fingerprint(cert)
        spki_pin = tls.spki_pin(cert)
        store.migrate()
        admin_token = shared_admin_token(store, data_dir)
        refuse_if_running(self.info_file, data_dir)
        # what a previous run killed with -9 left behind: its children (found by their records,
        # each checked to still be the process it names) and its rsync sessions' configurations
        stopped = children.install(data_dir / "run" / "children").stop_leftovers()
        stale = children.remove_stale_dirs(data_dir / "rsync-sessions")
        if stopped or stale:
            log.warning("previous run did not stop cleanly: %d child process(es) stopped, %d rsync session "
                        "configuration(s) removed", stopped, stale)
        rsyncd = self.rsyncd = RsyncSessions(state_dir=data_dir / "rsync-sessions")
        rsyncd.check()
        agent_auth = auth.AgentAuth()
        service = self.service = Service(
            store,
            data_dir,
            rsyncd=rsyncd,
            tree_factory=TaskTree,
            public_host=public,
            fingerprint=fingerprint,
            spki_pin=spki_pin,
            heartbeat_interval=opts.heartbeat_interval,
            auto_retry=AutoRetry(after_s=opts.auto_retry_after, per_day=opts.auto_retries_per_day),
            clock=self.clock,
            agent_auth=agent_auth,
            import_throttle=ImportThrottle(
                window_s=opts.import_window, per_address=opts.import_failures,
                per_token=2 * opts.import_failures
            ),
            target_dir=target_dir,
            space=space,
        )
        self.restored = service.restore_targets()
        service.start()  # the generation verifier, with what a previous run left unverified
        downloads = Downloads(
            opts.packages_dir.absolute() if opts.packages_dir else data_dir / "packages",
            spki_pin=spki_pin,
            fingerprint=fingerprint,
        )
        log.info("downloads: %s", downloads.describe())
        receiver = BlockReceiver(resolve=service.block_store_for,  # type: ignore[arg-type]  # Protocol of the store
                                 fence=service.check_epoch)
        httpd = self.httpd = ApiServer(
            (opts.host, opts.port),
            Api(service, agent_auth, admin_token, block_receiver=receiver, downloads=downloads,
                rsync_sessions=rsyncd),
            tls.server_context(cert, key),
            request_timeout_s=opts.request_timeout,
            backlog=opts.listen_backlog,
        )
        cap = somaxconn()
        if cap is not None and cap < opts.listen_backlog:
            log.warning("listen backlog %d is capped by the kernel at net.core.somaxconn = %d: raise it "
                        "(sysctl -w net.core.somaxconn=%d) for a fleet that reconnects at once",
                        opts.listen_backlog, cap, opts.listen_backlog)
        service.public_url = f"https://{url_host(public)}:{httpd.port}"
        self.local_url = f"https://{url_host(self.local_host)}:{httpd.port}"
        write_atomic(
            self.info_file,
            json.dumps(
                {
                    "url": self.local_url,
                    "public_url": service.public_url,
                    "fingerprint": fingerprint,
                    "spki_pin": spki_pin,
                    "pid": os.getpid(),
                    # with the pid, who this process is: a later start checks a live pid against it
                    "start_ticks": (children.process_identity(os.getpid()) or (0, []))[0],
                    "boot_id": children.boot_id(),
                },
                indent=2,
            )
            + "\n",
            mode=0o600,
        )
        self.scheduler = Scheduler(service, clock=self.clock)
        self.scheduler.start()
        return self

    def urls(self) -> Tuple[str, str]:
        """(local URL, public URL) once built."""
        return self.local_url, self.service.public_url if self.service is not None else ""

    def serve_forever(self) -> None:
        assert self.httpd is not None, "build() first"
        self.httpd.serve_forever(poll_interval=0.5)

    def shutdown(self) -> None:
        """Make ``serve_forever`` return (from another thread, e.g. a signal handler's; it waits
        until ``serve_forever`` has returned, so call it only while that runs)."""
        if self.httpd is not None:
            self.httpd.shutdown()

    def close(self) -> None:
        """Stop the scheduler, the service, the HTTPS server and the rsync sessions, remove
        ``server.json`` if it is this process's, close the database. Safe after a failed build."""
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.service is not None:
            self.service.close()
        if self.httpd is not None:
            self.httpd.server_close()
        if self.rsyncd is not None:
            with contextlib.suppress(Exception):
                self.rsyncd.stop()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.info_file.read_text()).get("pid") == os.getpid():
                self.info_file.unlink()
        if self.store is not None:
            self.store.close()
