"""A real PostgreSQL for the tests, started by the tests themselves.

Debian's ``postgresql`` package (``scripts/setup.sh`` installs it; binaries under
``/usr/lib/postgresql/<version>/bin``): ``initdb`` and ``pg_ctl`` in a temporary directory, run
as an unprivileged user (PostgreSQL refuses to run as root: as root the cluster belongs to
``nobody``), listening on 127.0.0.1 on a free port, its unix socket in the same directory.
:func:`start` returns a :class:`Postgres`; :func:`fresh_schema_url` gives each test a schema of
its own (cheap: no ``CREATE DATABASE`` per test). When the package is missing the fixture fails,
it never skips: CI installs it (scripts/setup.sh).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

PG_ROOT = Path("/usr/lib/postgresql")
#: who runs the cluster when the tests run as root (PostgreSQL refuses root)
UNPRIVILEGED = "nobody"
USER = "go2cloud"
DATABASE = "go2cloud"


def bin_dir() -> Path:
    """The newest installed server's binaries; a clear failure when there is none."""
    versions = sorted((p for p in PG_ROOT.glob("*/bin") if (p / "initdb").exists()),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if not versions:
        raise RuntimeError(
            f"PostgreSQL is not installed (no {PG_ROOT}/*/bin/initdb): run scripts/setup.sh as root, "
            "or apt-get install postgresql"
        )
    return versions[-1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Postgres:
    """A running cluster: ``url`` reaches its database ``go2cloud`` as the superuser ``go2cloud``."""

    root: Path
    port: int
    bin: Path
    run_as: Optional[str]

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def psql(self, sql: str, database: str = DATABASE) -> str:
        """Run ``sql`` with psql (over TCP, as the superuser); its output."""
        url = f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"
        out = subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql],
            check=True, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        return out.stdout.strip()

    def fresh_url(self, prefix: str = "t") -> str:
        """A URL whose tables live in a new, empty schema (one per test)."""
        return fresh_schema_url(self.url, prefix)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _run(self.run_as, [str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate",
                               "-w", "stop"], timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def _run(user: Optional[str], argv: List[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, user=user, check=True, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd="/")


def start() -> Postgres:
    """initdb + pg_ctl start in a new temporary directory; the caller stops it."""
    binaries = bin_dir()
    run_as = UNPRIVILEGED if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="go2cloud-pg-"))
    if run_as is not None:
        pw = pwd.getpwnam(run_as)
        os.chown(root, pw.pw_uid, pw.pw_gid)
    root.chmod(0o700)
    data = root / "data"
    try:
        _run(run_as, [str(binaries / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8",
                      "--no-locale", "--no-sync"])
        port = free_port()
        opts = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
                "-c shared_buffers=16MB")
        _run(run_as, [str(binaries / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"),
                      "-w", "-t", "60", "start"])
        pg = Postgres(root=root, port=port, bin=binaries, run_as=run_as)
        pg.psql(f"CREATE DATABASE {DATABASE}", database="postgres")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        log = (root / "log").read_text(errors="replace")[-2000:] if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr or exc.stdout!r}\n{log}") from None
    return pg


#: ``GO2CLOUD_TEST_DATABASE=postgresql://...`` (a running PostgreSQL, e.g. the one
#: ``python3 -m tests.support.postgres COMMAND...`` starts) runs the control plane's unit tests
#: (tests/unit/server) on it instead of SQLite; tests/integration/test_postgres.py does, for CI
ENGINE_ENV = "GO2CLOUD_TEST_DATABASE"
_counter = itertools.count(1)


def engine_url() -> Optional[str]:
    """The PostgreSQL URL the unit tests run on, None for SQLite (the default)."""
    url = os.environ.get(ENGINE_ENV, "")
    if not url or url == "sqlite":
        return None
    if not url.startswith("postgresql://"):
        raise RuntimeError(f"{ENGINE_ENV}={url!r}: expected a postgresql:// URL (or sqlite)")
    return url


def fresh_schema_url(url: str, prefix: str = "t") -> str:
    """``url`` with a new, empty schema of its own first in the search path (through psycopg:
    no process, so the fenced unit tests can call it)."""
    import psycopg

    schema = f"{prefix}_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Postgres]:
    """One cluster for the whole session (each test takes a schema of its own)."""
    pg = start()
    try:
        yield pg
    finally:
        pg.stop()


def main(argv: List[str]) -> int:
    """``python3 -m tests.support.postgres COMMAND...``: COMMAND with a PostgreSQL of its own,
    its URL in ``GO2CLOUD_TEST_DATABASE`` (e.g. ``python3 -m pytest tests/unit/server``)."""
    if not argv:
        print("usage: python3 -m tests.support.postgres COMMAND [ARG...]", file=sys.stderr)
        return 2
    pg = start()
    try:
        return subprocess.run(argv, env={**os.environ, ENGINE_ENV: pg.url}, check=False).returncode
    finally:
        pg.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
