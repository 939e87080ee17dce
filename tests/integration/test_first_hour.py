"""The operator's first hour, end to end, as a new user does it on this machine.

A real `go2cloud_server serve --packages` publishes the tarball built by packaging/build.py; the
Linux one-liner printed by `code create` is run through bash exactly as printed (only a
`--prefix` and the systemd unit directory are pointed into the test's temporary directory, so the
real /opt and /etc/systemd stay untouched). Debian's rsync package is really removed first, so
the agent's host preparation installs it with apt-get and `uninstall --revert` really removes it
again; the package is put back at the end whatever happens.

systemd is not PID 1 here: `service install` writes and enables the unit and starts the agent
detached; the unit is checked with `systemd-analyze verify`, and restart-and-resume is done by
killing the agent and running the unit's ExecStart as its restart policy would.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import psutil
import pytest

from go2cloud_server.manifest import build as manifest
from go2cloud_server.manifest import diff
from tests.support import tree
from tests.support.harness import Server, wait_for

pytestmark = pytest.mark.integration

TARBALL = "go2cloud_client_linux_x86_64.tar.gz"


# -- helpers --------------------------------------------------------------------------------------

def _clean_env(**extra: str) -> Dict[str, str]:
    """What a root shell on a fresh server has: no Python settings, no go2cloud variables."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "LANG": "C.UTF-8", "TERM": "dumb"}
    env.update(extra)
    return env


def _run(argv: List[str], *, timeout: float = 120, cwd: Optional[Path] = None,
         env: Optional[Dict[str, str]] = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env or _clean_env(), stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _deb_installed(name: str) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", name], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip().endswith(" installed")


def _apt(*args: str) -> None:
    subprocess.run(["apt-get", "-y", "-qq", *args], check=True, capture_output=True, timeout=600,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def _ensure_apt_candidate(package: str) -> None:
    policy = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True).stdout
    if "Candidate: (none)" in policy or "Candidate:" not in policy:
        _apt("update")


def _unit(path: Path) -> Dict[str, List[str]]:
    values: Dict[str, List[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def _agent_pids(home: Path, *, every: bool = False) -> List[int]:
    """The agents running with ``home``: one pid per start of the executable (the packaged one
    runs as three processes, staticx's and PyInstaller's start-up code above the agent; they are
    listed only with ``every``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.fsencode(str(home)) in cmdline and any(b"go2cloud_client" in a for a in cmdline[:2]):
            pids.append(int(proc.name))
    if every:
        return pids
    return [pid for pid in pids if _ppid(pid) not in pids]


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def _kill_agents(home: Path) -> None:
    for pid in _agent_pids(home, every=True):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _default_excluded(rel: bytes, is_dir: bool) -> bool:
    """What the shipped default exclusion list keeps off the target in the sample tree."""
    return rel == b"swapfile" or rel.startswith((b"tmp/", b"var/tmp/"))


def _source_status(server: Server, sid: str) -> str:
    return str(server.source(sid)["status"])


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packages(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packages")
    for name in os.listdir(dist):
        if name.endswith((".tar.gz", ".zip")) or name == "SHA256SUMS":
            shutil.copy2(dist / name, out / name)
    assert (out / TARBALL).is_file() and (out / "SHA256SUMS").is_file()
    return out


@pytest.fixture
def package_server(tmp_path: Path, packages: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "server-data", extra_args=["--packages", str(packages)]).start()
    yield srv
    srv.stop()


@pytest.fixture
def rsync_removed() -> Iterator[None]:
    """Debian's rsync package removed for the test (the agent must install it), restored after."""
    _ensure_apt_candidate("rsync")
    was_installed = _deb_installed("rsync")
    if was_installed:
        _apt("remove", "rsync")
    assert shutil.which("rsync") is None, "rsync is still on PATH after removing the package"
    try:
        yield
    finally:
        if not _deb_installed("rsync"):
            _apt("install", "--no-install-recommends", "rsync")
        assert shutil.which("rsync"), "could not put rsync back after the test"


# -- the one-liner --------------------------------------------------------------------------------

def test_oneliner_install_migrate_abort_reimport_upgrade_uninstall(
        tmp_path: Path, package_server: Server, rsync_removed: None) -> None:
    server = package_server
    prefix = tmp_path / "opt" / "go2cloud_client"
    unit_dir = tmp_path / "systemd"
    unit_dir.mkdir()
    fresh = tmp_path / "fresh-shell"
    fresh.mkdir()

    server.j("workgroup", "create", "wg-first-hour")
    code = server.new_code("wg-first-hour", uses=5)
    oneliner = code["commands"]["linux"]
    assert code["token_code"] not in oneliner.split("bash -s --", 1)[1], \
        "the token code must reach the agent through the environment, not its arguments"
    assert "--pinnedpubkey" in oneliner and server.fingerprint in oneliner

    # as printed, plus where to install (a temp dir instead of /opt) and the unit dir
    marker = "sudo --preserve-env=GO2CLOUD_TOKEN_CODE "
    assert marker in oneliner, oneliner
    env_prefix = f"{marker}GO2CLOUD_SYSTEMD_DIR={shlex.quote(str(unit_dir))} "
    cmd = oneliner.replace(marker, env_prefix) + f" --prefix {shlex.quote(str(prefix))} --yes"
    try:
        first = _run(["bash", "-c", cmd], cwd=fresh, timeout=900)
        out = first.stdout + first.stderr
        assert "Installing rsync" in out, out
        sid = out.split("Import Source Server [", 1)[1].split("] Successfully!", 1)[0]
        assert sid.startswith("s-")

        # installed files and modes
        exe = prefix / "go2cloud_client"
        assert exe.is_file() and os.stat(exe).st_mode & 0o777 == 0o755
        assert os.stat(prefix).st_mode & 0o777 == 0o700
        assert (prefix / "Excludes" / "rsync_excludes_linux.txt").is_file()
        for secret in [prefix / "identity" / "key.pem", prefix / "state" / "source.json"]:
            assert os.stat(secret).st_mode & 0o777 == 0o600, secret
        written = [p for p in prefix.rglob("*") if p.is_file() and p.name != "go2cloud_client"]
        assert code["token_code"] not in "".join(p.read_text(errors="replace") for p in written)
        assert _deb_installed("rsync"), "the one-liner did not install rsync"
        ledger = json.loads((prefix / "state" / "host_changes.json").read_text())["changes"]
        assert any(c["kind"] == "package_installed" and "rsync" in json.dumps(c) for c in ledger), ledger

        # the unit
        unit = unit_dir / "go2cloud_client.service"
        assert unit.is_file(), out
        values = _unit(unit)
        assert values["ExecStart"] == [f"{exe} --home {prefix} --no-prompt"]
        assert values["Restart"] == ["always"] and values["KillMode"] == ["mixed"]
        assert f"GO2CLOUD_HOME={prefix}" in values["Environment"]
        assert values["WantedBy"] == ["multi-user.target"]
        assert (unit_dir / "multi-user.target.wants" / "go2cloud_client.service").resolve() == unit.resolve()
        verify = _run(["systemd-analyze", "verify", str(unit)], check=False)
        assert verify.returncode == 0, verify.stderr

        # the detached agent heartbeats
        wait_for(lambda: _source_status(server, sid) == "online", 60, "the installed agent online")
        assert len(_agent_pids(prefix)) == 1

        # a small migration through the installed agent (rsync installed by the agent)
        src = tree.build(tmp_path / "data", random_mib=1)
        server.j("migration", "start", "--source", sid, "--path", str(src))
        server.wait_task(sid, "pending", timeout=180)
        image = Path(server.artifacts(sid)[0]["path"]) / str(src).lstrip("/")
        assert diff(manifest(src, exclude=_default_excluded), manifest(image)) == []

        # restart-and-resume as the unit's restart policy does: kill, then run ExecStart
        server.j("migration", "sync", "--source", sid)
        _kill_agents(prefix)
        env = _clean_env(**dict(v.split("=", 1) for v in values["Environment"]))
        quiet = subprocess.DEVNULL
        restarted = subprocess.Popen(shlex.split(values["ExecStart"][0]), env=env, start_new_session=True,
                                     stdin=quiet, stdout=quiet, stderr=quiet)
        try:
            wait_for(lambda: len(server.artifacts(sid)) == 2, 180, "the second cycle after the restart")
            server.wait_task(sid, "pending", timeout=60)
        finally:
            restarted.terminate()
            restarted.wait(timeout=60)

        # --abort, then import again from the installed package
        aborted = _run([str(exe), "--home", str(prefix), "--abort"])
        assert "Aborted." in aborted.stdout
        assert not (prefix / "identity" / "key.pem").exists()
        reimport = _run([str(exe), "--home", str(prefix), "--import-only", "--no-prompt",
                         "--server", server.url, "--server-fingerprint", server.fingerprint,
                         "--token-id", code["token_id"]],
                        env=_clean_env(GO2CLOUD_TOKEN_CODE=code["token_code"]))
        sid2 = reimport.stdout.split("Import Source Server [", 1)[1].split("]", 1)[0]
        assert sid2 != sid
        assert _source_status(server, sid) == "replaced"

        # the one-liner again: upgrade in place, same source, one agent
        again = _run(["bash", "-c", cmd], cwd=fresh, timeout=900)
        assert "Import Source Server [" not in again.stdout, "re-running the one-liner imported again"
        assert sid2 in again.stdout
        wait_for(lambda: _source_status(server, sid2) == "online", 60, "the upgraded agent online")
        assert len(_agent_pids(prefix)) == 1
        wg = server.j("workgroup", "show", "wg-first-hour")
        assert sorted(s["id"] for s in wg["sources"] if s.get("status") != "replaced") == [sid2]

        # uninstall with revert: agent gone, files gone, unit gone, rsync removed again
        removed = _run([str(exe), "--home", str(prefix), "uninstall", "--revert", "--yes"], timeout=600,
                       env=_clean_env(GO2CLOUD_SYSTEMD_DIR=str(unit_dir)))
        assert not prefix.exists(), removed.stdout
        assert not unit.exists() and not (unit_dir / "multi-user.target.wants" / unit.name).is_symlink()
        assert _agent_pids(prefix) == []
        assert not _deb_installed("rsync"), removed.stdout
    finally:
        _kill_agents(prefix)


# -- recovery from the extracted tarball ------------------------------------------------------------

def test_tarball_abort_reimport_and_resume_after_the_client_was_closed(
        tmp_path: Path, package_server: Server, packages: Path) -> None:
    server = package_server
    with tarfile.open(packages / TARBALL) as tar:
        tar.extractall(tmp_path, filter="tar")
    folder = tmp_path / "go2cloud_client_linux_x86_64"
    exe = folder / "go2cloud_client"
    server.j("workgroup", "create", "wg-tarball")
    code = server.new_code("wg-tarball", uses=3)
    env = _clean_env(GO2CLOUD_TOKEN_CODE=code["token_code"])
    args = ["--server", server.url, "--server-fingerprint", server.fingerprint,
            "--token-id", code["token_id"], "--no-prompt"]

    def foreground() -> Foreground:
        return Foreground(["./go2cloud_client", *args], cwd=folder, env=env)

    agent = foreground()
    try:
        sid = wait_for(agent.imported, 60, "the import line")
        assert (folder / "identity" / "key.pem").exists(), "the extracted folder is the agent home"

        # sudo ./go2cloud_client --abort ; sudo ./go2cloud_client
        aborted = _run([str(exe), "--abort"], cwd=folder)
        assert "Aborted." in aborted.stdout
        agent.proc.wait(timeout=60)
        agent = foreground()
        sid2 = wait_for(agent.imported, 60, "the second import line")
        assert sid2 != sid and _source_status(server, sid) == "replaced"

        # the client is closed mid-migration (terminal closed: SIGHUP), then started again
        src = tree.build(tmp_path / "data", random_mib=24)
        server.j("migration", "start", "--source", sid2, "--path", str(src), "--bandwidth-mbps", "40")
        wait_for(lambda: server.task_status(sid2) == "syncing", 120, "syncing")
        time.sleep(1.0)
        agent.proc.send_signal(signal.SIGHUP)
        # the started process is staticx's start-up code: it dies of the hang-up (it does not
        # forward SIGHUP); the agent below it sees that and stops as on its own hang-up
        assert agent.proc.wait(timeout=60) in (0, -signal.SIGHUP), agent.output()
        wait_for(lambda: not _running_from(exe), 60, "the agent below the executable to stop")
        assert server.artifacts(sid2) == []
        agent = foreground()
        server.wait_task(sid2, "pending", timeout=240)
        image = Path(server.artifacts(sid2)[0]["path"]) / str(src).lstrip("/")
        assert diff(manifest(src, exclude=_default_excluded), manifest(image)) == []
    finally:
        if agent.proc.poll() is None:
            agent.proc.terminate()
            agent.proc.wait(timeout=60)


def _running_from(exe: Path) -> List[int]:
    """Processes of the packaged agent started as ``exe`` (staticx names it in their environment)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("STATICX_PROG_PATH") == str(exe):
                found.append(proc.pid)
        except psutil.Error:
            pass
    return found


def _default_hangup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


class Foreground:
    """``./go2cloud_client`` in the foreground as an operator runs it, its output collected."""

    def __init__(self, argv: List[str], *, cwd: Path, env: Dict[str, str]) -> None:
        self.lines: List[str] = []
        # as from a terminal: a hang-up has its default action, even when the test run itself was
        # started with SIGHUP ignored (nohup), which children would otherwise inherit
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace",
                                     preexec_fn=_default_hangup)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def imported(self) -> Optional[str]:
        """The source id of the import line, None while not printed yet."""
        for line in list(self.lines):
            if line.startswith("Import Source Server [") and line.endswith("] Successfully!"):
                return line[len("Import Source Server ["):-len("] Successfully!")]
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.output()}")
        return None
