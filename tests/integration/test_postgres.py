"""The control plane on a real PostgreSQL (started by the tests: tests/support/postgres.py).

* the service's unit tests that reach the database run on PostgreSQL too (a focused subset that
  runs every repository function, checked);
* replicas: two ``Service`` instances on one database, as two ``serve`` processes would be:
  activation-code uses stay exact, the scheduler fires each automatic sync once, a command queued
  through one replica wakes an agent's long poll on the other;
* ``serve --database`` with two processes sharing one TLS identity and one admin token.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from go2cloud_server.clock import FakeClock
from go2cloud_server.errors import CodeRejected
from go2cloud_server.pgstore import PgStore
from go2cloud_server.repositories import workgroups as repo_workgroups
from go2cloud_server.scheduler import Scheduler
from go2cloud_server.service import Service
from go2cloud_server.store import Database
from tests.support import postgres, repo_calls
from tests.support.harness import Agent, Server, wait_for
from tests.support.postgres import pg_cluster  # noqa: F401 - the session fixture
from tests.unit.server.conftest import FakeRsyncd, FakeTrees, import_body, inventory

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
#: the unit tests that exercise the repositories through the service (run on PostgreSQL here)
PG_SUBSET = ("tests/unit/server/test_service.py", "tests/unit/server/test_drill_service.py",
             "tests/unit/server/test_block_tasks.py", "tests/unit/server/test_lease.py",
             "tests/unit/server/test_repositories.py")


def test_the_service_unit_tests_pass_on_postgresql_and_run_every_repository_function(
        pg_cluster, tmp_path):  # noqa: F811 - the session fixture
    calls = tmp_path / "calls.txt"
    env = {**os.environ, postgres.ENGINE_ENV: pg_cluster.url, "GO2CLOUD_REPO_CALLS": str(calls),
           "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.support.repo_calls",
         *PG_SUBSET],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
    called = set(calls.read_text().split())
    missing = sorted(set(repo_calls.repository_functions()) - called)
    assert missing == []


# -- replicas on one database -----------------------------------------------------------------


class Replicas:
    """Services on one database, each with a store (connections, listener) of its own."""

    def __init__(self, url: str, root: Path, clock: FakeClock) -> None:
        self.url, self.root, self.clock = url, root, clock
        self.services: List[Service] = []

    def add(self) -> Service:
        store = PgStore(self.url)
        store.migrate()
        data = self.root / f"replica{len(self.services)}"
        data.mkdir()
        svc = Service(store, data, rsyncd=FakeRsyncd(), tree_factory=FakeTrees(), clock=self.clock,
                      public_url="https://10.0.0.1:8443", fingerprint="sha256:" + "ab" * 32)
        self.services.append(svc)
        return svc

    def close(self) -> None:
        for svc in self.services:
            svc.close()
            svc.store.close()


@pytest.fixture
def replicas(pg_cluster, tmp_path) -> Iterator[Replicas]:  # noqa: F811 - the session fixture
    r = Replicas(postgres.fresh_schema_url(pg_cluster.url), tmp_path, FakeClock())
    yield r
    r.close()


def test_activation_code_uses_stay_exact_across_replicas(replicas, monkeypatch):
    a, b = replicas.add(), replicas.add()
    a.create_workgroup({"name": "web-tier"})
    code = a.create_code("web-tier", {"uses": 5})
    # the fault: a slow database between the code's check and its use (the import reads the
    # workgroup in between), so that imports through both replicas overlap there
    real_get = repo_workgroups.get

    def slow_get(d, wg_id):
        if not isinstance(d, Database):  # inside the import's transaction
            time.sleep(0.25)
        return real_get(d, wg_id)

    monkeypatch.setattr(repo_workgroups, "get", slow_get)
    results: list = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker(i: int) -> None:
        svc = (a, b)[i % 2]
        barrier.wait()
        try:
            body = import_body(code, inventory=inventory(f"h{i}", f"m{i}"))
            out = ("ok", svc.import_source(body)["source_id"])
        except CodeRejected as exc:
            out = ("rejected", exc.code)
        with lock:
            results.append(out)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 16
    assert len([r for r in results if r[0] == "ok"]) == 5
    assert sorted(r[1] for r in results if r[0] == "rejected") == ["code_exhausted"] * 11
    assert b.list_codes("web-tier")["codes"][0]["uses_left"] == 0
    assert len(a.list_sources("web-tier")["sources"]) == 5


def _pending_task_with_interval(svc: Service, every: int) -> str:
    svc.create_workgroup({"name": "web-tier"})
    code = svc.create_code("web-tier", {"uses": 1})
    sid = svc.import_source(import_body(code))["source_id"]
    svc.start_migration({"drill": False, "sync_every_s": every}, source=sid)
    start = svc.poll_commands(sid, 0)["commands"][0]
    svc.ack_command(sid, start["id"], {"status": "succeeded", "result": {}})
    assert svc.source_migration(sid)["tasks"][0]["status"] == "pending"
    return sid


def _syncs(svc: Service, sid: str) -> List[dict]:
    return [c for c in svc.poll_commands(sid, 0)["commands"] if c["type"] == "sync"]


def test_the_scheduler_fires_each_automatic_sync_once_across_replicas(replicas, monkeypatch):
    a, b = replicas.add(), replicas.add()
    sid = _pending_task_with_interval(a, 120)
    passes = {0: 0, 1: 0}  # the scheduler passes each replica ran (it asks for candidates first)
    for i, svc in enumerate((a, b)):
        def counted(i=i, real=svc.auto_sync_candidates):
            passes[i] += 1
            return real()

        monkeypatch.setattr(svc, "auto_sync_candidates", counted)
    mono = FakeClock()  # both schedulers' monotonic clock
    scheds = [Scheduler(a, clock=mono), Scheduler(b, clock=mono)]
    for s in scheds:
        assert s.run_once() == 0  # first sight of cycle 1 (by the leader)
    mono.advance(121)
    queued = [s.run_once() for s in scheds] + [s.run_once() for s in reversed(scheds)]
    assert sum(queued) == 1
    assert len(_syncs(b, sid)) == 1
    # one leader ran every pass, the other replica none
    assert sorted(passes.values()) == [0, 3]
    leader = 0 if passes[0] else 1
    # the leader dies: the other replica takes over and fires the next sync once, a full
    # interval after it took over (never earlier than asked)
    sync = _syncs(a, sid)[0]
    a.ack_command(sid, sync["id"], {"status": "succeeded", "result": {}})
    replicas.services[leader].store.close()
    other = scheds[1 - leader]
    # PostgreSQL releases the lock once the closed session's backend has exited
    wait_for(lambda: replicas.services[1 - leader].store.leader("scheduler"), 30, "the other replica leads")
    assert other.run_once() == 0  # leader now: first sight of cycle 2
    mono.advance(119)
    assert other.run_once() == 0
    mono.advance(2)
    assert other.run_once() == 1
    assert [c["params"]["cycle"]["number"] for c in _syncs(replicas.services[1 - leader], sid)] == [3]


class _FrozenMonotonic:
    """A long poll's clock that never reaches its deadline: only a wake-up ends the poll. ``looked``
    is set once the poll has looked for commands (and waits)."""

    def __init__(self) -> None:
        self.readings = 0
        self.looked = threading.Event()

    def __call__(self) -> float:
        self.readings += 1
        if self.readings >= 2:
            self.looked.set()
        return 0.0


def test_a_command_queued_on_one_replica_wakes_a_long_poll_on_the_other(replicas):
    a, b = replicas.add(), replicas.add()
    a.create_workgroup({"name": "web-tier"})
    code = a.create_code("web-tier", {"uses": 1})
    sid = a.import_source(import_body(code))["source_id"]
    got: dict = {}
    frozen = _FrozenMonotonic()

    def poll() -> None:
        got["cmds"] = a.poll_commands(sid, 3600, monotonic=frozen)["commands"]

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    assert frozen.looked.wait(30), "the poll never looked for commands"
    listener = a.store._listener
    assert listener is not None
    before = listener.received
    b.start_migration({"drill": False}, source=sid)  # queued through replica B only
    th.join(60)
    assert not th.is_alive(), "a command queued on replica B did not wake the long poll on replica A"
    assert [c["type"] for c in got["cmds"]] == ["start"]
    assert listener.received > before  # woken by the database's notification, not in-process


# -- serve --database: two processes ------------------------------------------------------------


def test_two_serve_processes_share_the_database_the_tls_identity_and_the_admin_token(pg_cluster, tmp_path):  # noqa: F811
    url = postgres.fresh_schema_url(pg_cluster.url)
    a = Server(tmp_path / "a", extra_args=["--database", url]).start()
    try:
        cert, key = a.data_dir / "tls" / "cert.pem", a.data_dir / "tls" / "key.pem"
        b = Server(tmp_path / "b", extra_env={"GO2CLOUD_DATABASE": url},
                   extra_args=["--tls-cert", str(cert), "--tls-key", str(key)]).start()
        try:
            assert b.fingerprint == a.fingerprint
            assert (b.data_dir / "tls" / "cert.pem").read_bytes() == cert.read_bytes()
            token = (a.data_dir / "admin.token").read_text()
            assert token.strip() and (b.data_dir / "admin.token").read_text() == token
            # an operator command through one replica, seen through the other
            a.j("workgroup", "create", "web-tier")
            code = b.j("code", "create", "--workgroup", "web-tier", "--uses", "2")
            assert [w["name"] for w in b.j("workgroup", "list")["workgroups"]] == ["web-tier"]
            assert [c["token_id"] for c in a.j("code", "list")["codes"]] == [code["token_id"]]
        finally:
            b.stop()
    finally:
        a.stop()
    log = (tmp_path / "a-serve.log").read_text()
    assert "database: PostgreSQL go2cloud@127.0.0.1" in log and "password" not in log.lower()


def test_serve_refuses_a_database_it_cannot_use_with_what_to_do(pg_cluster, tmp_path):  # noqa: F811
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "go2cloud_server", "serve", "--listen", "127.0.0.1:0",
             "--data-dir", str(tmp_path / "d"), *args],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    bad = serve("--database", "mysql://x@127.0.0.1/db")
    assert bad.returncode == 2 and "--database: expected postgresql://" in bad.stderr
    port = postgres.free_port()  # nothing listens there
    down = serve("--database", f"postgresql://go2cloud@127.0.0.1:{port}/go2cloud")
    assert down.returncode == 10
    assert "cannot connect to the database (PostgreSQL go2cloud@127.0.0.1:" in down.stderr
    assert "check --database" in down.stderr
    half = serve("--tls-cert", str(REPO / "pyproject.toml"))
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr


def _terminate(pg: postgres.Postgres, what: str) -> int:
    """Kill the database connections of this test process whose last query matches ``what``
    (as a database restart or a network cut would); how many."""
    out = pg.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                  f"WHERE application_name = 'go2cloud_server' AND query LIKE '{what}'")
    return int(out)


def test_a_long_poll_is_woken_after_the_listening_connection_was_cut(replicas, pg_cluster):  # noqa: F811
    a, b = replicas.add(), replicas.add()
    a.create_workgroup({"name": "web-tier"})
    code = a.create_code("web-tier", {"uses": 1})
    sid = a.import_source(import_body(code))["source_id"]
    listener = a.store._listener
    assert listener is not None
    # every replica's LISTEN connection is cut; they reconnect and listen again
    assert _terminate(pg_cluster, "LISTEN%") == 2
    reconnected = listener.reconnects
    wait_for(lambda: listener.reconnects > reconnected and listener.listening, 60,
             "the listener listens again")
    got: dict = {}
    frozen = _FrozenMonotonic()

    def poll() -> None:
        got["cmds"] = a.poll_commands(sid, 3600, monotonic=frozen)["commands"]

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    assert frozen.looked.wait(30), "the poll never looked for commands"
    b.start_migration({"drill": False}, source=sid)
    th.join(60)
    assert not th.is_alive(), "after its connection was cut, replica A no longer hears replica B's commands"
    assert [c["type"] for c in got["cmds"]] == ["start"]


def test_the_scheduler_leadership_passes_on_when_the_leaders_connection_is_cut(replicas, pg_cluster):  # noqa: F811
    a, b = replicas.add(), replicas.add()
    sid = _pending_task_with_interval(a, 120)
    mono = FakeClock()
    first, second = Scheduler(a, clock=mono), Scheduler(b, clock=mono)
    assert first.run_once() == 0 and a.store.leader("scheduler") and not b.store.leader("scheduler")
    # the session holding the leadership is cut (the database restarted it, or the network)
    held = pg_cluster.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_locks "
                           "WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()")
    assert held == "1"
    wait_for(lambda: b.store.leader("scheduler"), 30, "replica B takes the leadership over")
    assert not a.store.leader("scheduler")  # A finds its connection gone and steps back
    assert first.run_once() == 0
    assert second.run_once() == 0  # first sight of the task under its leadership
    mono.advance(121)
    assert first.run_once() == 0 and second.run_once() == 1
    assert len(_syncs(a, sid)) == 1


def test_an_agent_given_two_replicas_moves_to_the_other_when_its_replica_stops(pg_cluster, tmp_path):  # noqa: F811
    """A real agent with --server A --server B imports through A; A stops; the agent's heartbeats
    go on through B (same database: B sees them), and its log says it moved."""
    url = postgres.fresh_schema_url(pg_cluster.url)
    a = Server(tmp_path / "a", extra_args=["--database", url]).start()
    tls = a.data_dir / "tls"
    b = Server(tmp_path / "b", extra_args=["--database", url, "--tls-cert", str(tls / "cert.pem"),
                                           "--tls-key", str(tls / "key.pem")]).start()
    agent = Agent(tmp_path / "home", a)
    try:
        a.j("workgroup", "create", "web-tier")
        code = a.j("code", "create", "--workgroup", "web-tier", "--uses", "1")
        agent.start("--server", b.url, code=code)
        sid = agent.wait_imported(60)
        wait_for(lambda: b.j("source", "show", sid)["last_seen_at"], 60, "a heartbeat")
        a.stop()
        seen = b.j("source", "show", sid)["last_seen_at"]
        wait_for(lambda: b.j("source", "show", sid)["last_seen_at"] > seen, 120,
                 "a heartbeat through replica B")
        assert f"the control plane at {a.url} cannot be reached: trying {b.url}" in agent.output() + \
            _agent_log(tmp_path / "home")
        assert b.j("source", "show", sid)["status"] == "online"
    finally:
        agent.stop()
        b.stop()
        a.stop()


def _agent_log(home: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((home / "Logs").glob("*.log")))
