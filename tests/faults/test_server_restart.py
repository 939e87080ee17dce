"""Crash-safe restart of the control plane (issue 17, item 2; docs/reliability.md section 2).

``kill -9`` of ``serve`` runs none of its cleanup. What it started must die with it or be found
and stopped at the next start (never an unrelated process that reused a pid), the next ``serve``
on the same data directory and port must come up, and a running migration must finish by itself
with the artifact equal to the source. Everything is real: the server, the agent, rsync, the
children (``sleep``/``sh`` stand in for a filesystem check only in the process-level cases).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator, Tuple

import pytest

from go2cloud_server.children import Children, process_identity
from go2cloud_server.manifest import build, diff
from tests.faults.kill_harness import tree_bytes
from tests.faults.server_harness import RestartableServer, kill_at_random_point, processes_naming
from tests.support.harness import REPO, Agent, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def rserver(tmp_path: Path) -> Iterator[RestartableServer]:
    srv = RestartableServer(tmp_path / "server-data").start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_mid_file_migration_then_restart_completes_unattended(
        rserver: RestartableServer, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(24):
        (src / f"f{i:02d}.bin").write_bytes(os.urandom(1 << 20))
    (src / "sub").mkdir()
    (src / "sub" / "small.txt").write_text("hello\n")
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    rserver.j("workgroup", "create", "wg-r")
    agent = Agent(tmp_path / "home", rserver).start(code=rserver.new_code("wg-r", uses=1))
    try:
        sid = agent.wait_imported()
        rserver.j("migration", "start", "--source", sid, "--path", str(src), "--no-drill",
                  "--bandwidth-mbps", "40", "--compression", "0")
        point = kill_at_random_point(rserver.kill9, lambda: tree_bytes(rserver.data_dir / "tasks") / size,
                                     0.1, 0.8, rng)
        # nothing the server started outlives it
        wait_for(lambda: not processes_naming(str(rserver.data_dir)), 10,
                 f"no process of the killed server (killed at {point:.0%})")
        started = time.monotonic()
        rserver.restart()
        print(f"restart after kill -9 at {point:.0%}: up in {time.monotonic() - started:.1f} s")
        task = rserver.wait_task(sid, "pending", timeout=240)
        assert task["last_committed_cycle"] == 1
        image = rserver.artifact_tree(sid, src)
        assert diff(build(src), build(image)) == []
        assert rserver.children() == {}
    finally:
        agent.kill()


_HELPER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from go2cloud_server.children import Children
    reg = Children(Path(sys.argv[1]))
    proc = reg.popen(sys.argv[2:])
    print(proc.pid, flush=True)
    time.sleep(600)
""")


def _helper(run_dir: Path, *argv: str) -> Tuple[subprocess.Popen, int]:
    """A process standing in for the server: it starts ``argv`` through the registry."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", _HELPER, str(run_dir), *argv],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    return proc, child


def _gone(pid: int) -> bool:
    return process_identity(pid) is None


def test_a_child_dies_with_the_server(tmp_path: Path) -> None:
    helper, child = _helper(tmp_path / "run", "sleep", "300")
    assert not _gone(child)
    os.kill(helper.pid, signal.SIGKILL)
    helper.wait()
    wait_for(lambda: _gone(child), 10, "the child of a killed server to die with it")


def test_what_a_child_started_is_stopped_at_the_next_start(tmp_path: Path) -> None:
    marker = f"server-leftover-{os.getpid()}-{time.monotonic_ns()}"
    # the child (bash) dies with the server; the process it started in its session does not
    helper, child = _helper(tmp_path / "run", "bash", "-c", f"(exec -a {marker} sleep 300) & wait")
    wait_for(lambda: [p for p, a in processes_naming(marker).items() if a[0] == marker], 10, "the grandchild")
    os.kill(helper.pid, signal.SIGKILL)
    helper.wait()
    wait_for(lambda: _gone(child), 10, "the direct child to die with the server")
    survivors = processes_naming(marker)
    assert survivors, "the grandchild should outlive the server (the fault this guards against)"
    assert Children(tmp_path / "run").stop_leftovers() == 1
    wait_for(lambda: not processes_naming(marker), 10, "the leftover to be stopped")
    assert list((tmp_path / "run").glob("*.json")) == []


def test_a_reused_pid_is_never_signalled(tmp_path: Path) -> None:
    """A record naming a pid that is now an unrelated process (another start time) only goes."""
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        run = tmp_path / "run"
        run.mkdir()
        ident = process_identity(bystander.pid)
        assert ident is not None
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        (run / f"{bystander.pid}.json").write_text(json.dumps(
            {"pid": bystander.pid, "start_ticks": ident[0] - 1, "boot_id": boot, "argv": ["sleep", "300"]}))
        assert Children(run).stop_leftovers() == 0
        assert bystander.poll() is None and not _gone(bystander.pid)
        assert list(run.glob("*.json")) == []
    finally:
        bystander.kill()
        bystander.wait()


def test_a_second_server_on_a_running_servers_data_dir_is_refused(rserver: RestartableServer) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "go2cloud_server", "serve", "--listen", "127.0.0.1:0",
                           "--data-dir", str(rserver.data_dir)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 4, proc.stderr
    assert f"another go2cloud_server (pid {rserver.proc.pid}) is running" in proc.stderr
    assert rserver.proc.poll() is None
