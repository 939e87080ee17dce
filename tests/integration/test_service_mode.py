"""Service mode in real processes: the systemd unit, the detached agent, stop, restart-and-resume.

systemd is not PID 1 on the test machine, so the unit goes to a temporary directory
(``GO2CLOUD_SYSTEMD_DIR``), ``systemd-analyze verify`` checks it, and what systemd would do is done
by hand: after a crash (``kill -9``) the test starts the unit's ``ExecStart`` with the unit's
``Environment``, parsed from the unit file, in a session of its own with stdio on /dev/null and
only systemd's default PATH, and checks that the task resumes and finishes its cycle.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import psutil
import pytest

from go2cloud_server.manifest import build as tree_manifest
from go2cloud_server.manifest import diff
from tests.support.harness import REPO, Server, _env, wait_for

pytestmark = pytest.mark.integration

TRACEBACK = "Traceback (most recent call last)"
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _cli(home: Path, units: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "go2cloud_client", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
        env=_env({"GO2CLOUD_SYSTEMD_DIR": str(units)}),
    )
    assert TRACEBACK not in proc.stdout + proc.stderr
    return proc


def _import(server: Server, home: Path, workgroup: str) -> str:
    server.j("workgroup", "create", workgroup)
    code = server.new_code(workgroup, uses=1)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "go2cloud_client",
            "--home",
            str(home),
            "--no-prompt",
            "--yes",
            "--import-only",
            "--server",
            server.url,
            "--server-fingerprint",
            server.fingerprint,
            "--token-id",
            code["token_id"],
        ],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=str(REPO),
        env=_env({"GO2CLOUD_TOKEN_CODE": code["token_code"]}),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = [x for x in proc.stdout.splitlines() if x.startswith("Import Source Server [")]
    assert line, proc.stdout
    return line[0][len("Import Source Server [") : -len("] Successfully!")]


def agent_pids(home: Path) -> List[int]:
    """Agents of this home: processes whose command line is the agent (not a CLI subcommand)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if p.info["status"] == psutil.STATUS_ZOMBIE or str(home) not in cmd:
            continue
        if "go2cloud_client" in " ".join(cmd) and cmd[-1] == "--no-prompt" and "--home" in cmd:
            found.append(p.info["pid"])
    return found


def parse_unit(text: str) -> Tuple[List[str], Dict[str, str]]:
    """ExecStart as an argument list and Environment as a mapping, unquoted as systemd does."""
    argv: List[str] = []
    env: Dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "ExecStart":
            argv = [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(value)]
        elif key == "Environment":
            for word in shlex.split(value):
                name, _, val = word.partition("=")
                env[name] = val.replace("%%", "%").replace("$$", "$")
    return argv, env


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: PID 1 of a container may not reap re-parented children)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _sample(root: Path, files: int, size: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"f{i:04d}.bin").write_bytes(os.urandom(size))
    return root


def _rsync_running(src: Path) -> bool:
    """An rsync of this test's source tree runs (other tests may run rsync at the same time)."""
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if (
            p.info["name"] == "rsync"
            and any("@go2cloud::" in a for a in cmd)
            and any(str(src) in a for a in cmd)
        ):
            return True
    return False


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Tuple[Path, Path]]:
    home, units = tmp_path / "home-svc", tmp_path / "units"
    yield home, units
    for pid in agent_pids(home):  # never leave an agent behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_generated_unit_passes_systemd_analyze_verify(server, svc):
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: run ./scripts/setup.sh as root"
    home, units = svc
    _import(server, home, "wg-verify")
    r = _cli(home, units, "service", "install", "--no-start")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the agent was not started (--no-start)" in r.stdout and agent_pids(home) == []
    unit = units / "go2cloud_client.service"
    v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0, v.stdout + v.stderr
    # verify only warns (exit 0) about directives it ignores: none may concern our unit
    assert "go2cloud_client.service" not in v.stdout + v.stderr, v.stdout + v.stderr


def test_service_install_stop_crash_resume_uninstall(server, svc, tmp_path):
    home, units = svc
    sid = _import(server, home, "wg-svc")
    unit = units / "go2cloud_client.service"
    link = units / "multi-user.target.wants" / "go2cloud_client.service"

    # install: unit, wants symlink, agent started detached and heartbeating
    r = _cli(home, units, "service", "install")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "systemd is not running on this host, so the agent was started without it" in r.stdout
    text = unit.read_text()
    argv, env = parse_unit(text)
    assert argv == [sys.executable, "-m", "go2cloud_client", "--home", str(home), "--no-prompt"]
    assert env == {"GO2CLOUD_HOME": str(home)}
    for line in (
        "Type=simple",
        "Restart=always",
        "RestartSec=5",
        "KillMode=mixed",
        "TimeoutStopSec=60",
        "After=network-online.target",
        "Wants=network-online.target",
        "WantedBy=multi-user.target",
    ):
        assert line in text.splitlines(), line
    assert link.is_symlink() and link.resolve() == unit
    (first,) = wait_for(lambda: agent_pids(home), 30, "the detached agent")
    assert psutil.Process(first).terminal() is None, "the detached agent must have no terminal"
    seen = server.source(sid)["last_seen_at"]
    wait_for(
        lambda: server.source(sid)["last_seen_at"] != seen and server.source(sid)["status"] == "online",
        30,
        "heartbeats of the detached agent",
    )
    ledger = json.loads((home / "state" / "host_changes.json").read_text())["changes"]
    assert [c["kind"] for c in ledger] == ["service_installed"] and ledger[0]["unit"] == str(unit)

    # install again: idempotent, the agent is restarted, still one agent and one ledger entry
    r = _cli(home, units, "service", "install")
    assert r.returncode == 0, r.stdout + r.stderr
    pids = wait_for(lambda: agent_pids(home), 30, "the restarted agent")
    assert len(pids) == 1 and pids[0] != first and _gone(first)
    ledger = json.loads((home / "state" / "host_changes.json").read_text())["changes"]
    assert [c["kind"] for c in ledger] == ["service_installed"]

    # a file migration starts; stop keeps the import and the task
    src = _sample(tmp_path / "src-svc", files=40, size=256 * 1024)
    server.j("migration", "start", "--source", sid, "--path", str(src), "--bandwidth-mbps", "8")
    wait_for(lambda: _rsync_running(src), 30, "rsync running")
    r = _cli(home, units, "stop")
    assert r.returncode == 0 and r.stdout.startswith("Stopped the agent (pid "), r.stdout + r.stderr
    assert "resumes when the agent starts again" in r.stdout
    assert agent_pids(home) == [] and (home / "state" / "task.json").exists()
    assert json.loads(_cli(home, units, "status", "--json").stdout)["running"] is False
    assert server.task_status(sid) not in ("failed", "cancelled")
    r = _cli(home, units, "stop")
    assert r.returncode == 0 and r.stdout.strip() == "No agent is running"

    # service install starts it again; then it crashes (kill -9) mid-cycle
    assert _cli(home, units, "service", "install").returncode == 0
    (pid,) = wait_for(lambda: agent_pids(home), 30, "the agent after install")
    wait_for(lambda: _rsync_running(src), 30, "rsync running again (the cycle resumed)")
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _gone(pid), 10, "the killed agent gone")

    # what Restart=always does: run ExecStart with the unit's environment, detached
    proc = subprocess.Popen(
        argv,
        env={"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", **env},
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        server.j("migration", "modify", "--source", sid, "--bandwidth-mbps", "0")
        server.wait_task(sid, "pending", timeout=120)
        assert [a["cycle"] for a in server.artifacts(sid)] == [1]
        assert diff(tree_manifest(src), tree_manifest(server.artifact_tree(sid, src))) == []
        assert agent_pids(home) == [proc.pid]

        # uninstall: unit and symlink removed, the agent (started by "systemd") stopped
        r = _cli(home, units, "service", "uninstall")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"Removed {unit}" in r.stdout and f"Removed {link}" in r.stdout
        assert proc.wait(timeout=60) == 0, "the agent must stop gracefully"
        assert not unit.exists() and not link.is_symlink() and agent_pids(home) == []
        assert json.loads((home / "state" / "host_changes.json").read_text())["changes"] == []
        r = _cli(home, units, "service", "uninstall")
        assert r.returncode == 0 and "No service is installed" in r.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_closed_terminal_then_started_again_resumes_the_cycle(server, agents, tmp_path):
    """No service: the terminal of a foreground agent closes mid-cycle (SIGHUP); started again
    from the same home, the agent resumes the cycle and finishes it."""
    server.j("workgroup", "create", "wg-hup")
    agent = agents("hup").start(code=server.new_code("wg-hup", uses=1))
    sid = agent.wait_imported()
    src = _sample(tmp_path / "src-hup", files=40, size=256 * 1024)
    server.j("migration", "start", "--source", sid, "--path", str(src), "--bandwidth-mbps", "8")
    wait_for(lambda: _rsync_running(src), 30, "rsync running")
    agent.kill(signal.SIGHUP)
    assert agent.proc is not None and agent.proc.returncode == 0, agent.output()
    assert "resumes when the agent is started again" in agent.output()
    wait_for(lambda: not _rsync_running(src), 20, "rsync stopped with the agent")
    agent.start()
    wait_for(lambda: any(line.startswith("Resuming as source " + sid) for line in agent.lines), 30, "resume")
    server.j("migration", "modify", "--source", sid, "--bandwidth-mbps", "0")
    server.wait_task(sid, "pending", timeout=120)
    arts = server.artifacts(sid)
    assert [a["cycle"] for a in arts] == [1]
    assert diff(tree_manifest(src), tree_manifest(Path(arts[0]["path"]) / str(src).lstrip("/"))) == []
