"""The activation code is in no process's arguments at any moment (docs/security.md).

Arguments are world-readable (``ps``, ``/proc/PID/cmdline``): any local user of a source could
take the code and import hosts into the workgroup. The printed Linux one-liner is run for real
(its shell part, fetching install.sh from the real server) while every process's cmdline is
sampled; the agent is started the supported way and its cmdline and environment, and its
children's, are read after the import.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest

from go2cloud_server.service.codes import install_commands
from tests.support.harness import REPO, Server, _env, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.shared_server]  # one server for the module


class CmdlineSampler:
    """Reads every process's /proc/PID/cmdline in a loop; collects those containing ``needle``."""

    def __init__(self, needle: str) -> None:
        self.needle = needle.encode()
        self.leaks: List[str] = []
        self.seen: Set[bytes] = set()
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or pid == me:
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        cmd = fh.read()
                except OSError:
                    continue
                self.seen.add(cmd.replace(b"\0", b" "))
                if self.needle in cmd:
                    self.leaks.append(cmd.replace(b"\0", b" ").decode(errors="replace"))
            self.rounds += 1

    def __enter__(self) -> CmdlineSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def sudo_env(tmp_path: Path) -> Iterator[Dict[str, str]]:
    """The environment to run the one-liner in: the real sudo when it can be used here without a
    password (it runs the command as its child and waits for it, so its arguments live as long
    as the install), else a stub ``sudo`` on PATH that does the same for the one-liner's use:
    takes ``VAR=value`` arguments into the environment, keeps the ``--preserve-env=`` ones, runs
    the command as its child and waits."""
    env = _env()
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        yield env
        return
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sudo = bin_dir / "sudo"
    sudo.write_text("""#!/bin/sh
keep=""
while [ "$#" -gt 0 ]; do
    case "$1" in
    --preserve-env=*) keep="$keep ${1#--preserve-env=}"; shift ;;
    -*) shift ;;
    *=*) export "$1"; shift ;;
    *) break ;;
    esac
done
"$@"
""")
    sudo.chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    yield env


def _shell_part(line: str) -> str:
    """The one-liner as the operator pastes it into an interactive shell on the source."""
    return line + "\n"


def test_the_printed_linux_one_liner_puts_the_code_in_no_argv(server: Server, sudo_env: Dict[str, str],
                                                              tmp_path: Path):
    server.j("workgroup", "create", "wg-argv")
    code = server.new_code("wg-argv", uses=1)
    line = code["commands"]["linux"]
    assert code["token_code"] in line
    # the operator's interactive shell reads the line from its terminal: here bash reads it from
    # a pipe (never from its arguments, which would be a leak of this test, not of the product)
    with CmdlineSampler(code["token_code"]) as sampler:
        proc = subprocess.run(["bash", "--norc", "--noprofile", "-s"], input=_shell_part(line), text=True,
                              capture_output=True, timeout=120, env=sudo_env, cwd=str(tmp_path))
        time.sleep(0.2)
    # install.sh ran (it stops at the package download: this server publishes no package)
    assert "go2cloud install:" in proc.stderr + proc.stdout, proc.stderr + proc.stdout
    assert proc.returncode == 4 and "does not publish" in proc.stderr, proc.stderr + proc.stdout
    seen = b"\n".join(sampler.seen)
    assert sampler.rounds > 5 and b"sudo --preserve-env" in seen and b"bash -s --" in seen, seen[-3000:]
    assert not sampler.leaks, f"the activation code was in the arguments of: {sampler.leaks}"


def test_the_one_liner_still_hands_the_code_to_install_sh():
    """The code reaches the installer's environment (and the installer's import step)."""
    line = install_commands("https://127.0.0.1:1", "sha256:" + "ab" * 32, "at-0123", "C0DE'x",
                            "sha256//p=")["linux"]
    tokens = shlex.split(line)
    # an assignment in front of sudo: the shell puts it in sudo's environment, not its arguments
    at = tokens.index("GO2CLOUD_TOKEN_CODE=C0DE'x")
    assert tokens[at - 1] == "|" and tokens[at + 1:at + 5] == ["sudo", "--preserve-env=GO2CLOUD_TOKEN_CODE",
                                                              "bash", "-s"]
    assert "C0DE" not in " ".join(tokens[:at] + tokens[at + 1:]) and tokens[-1] == "at-0123"
    assert "--token-code" not in line


def test_install_sh_reads_and_unsets_the_code(tmp_path: Path):
    text = (REPO / "go2cloud_server" / "data" / "install.sh").read_text()
    body = text[text.index("# -- import and service"):]
    assert body.index('"$EXE" "$@"') < body.index("unset GO2CLOUD_TOKEN_CODE") < body.index("service install")


def _proc_text(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as fh:
        return fh.read()


def _descendants(pid: int) -> List[int]:
    out: List[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in os.listdir(f"/proc/{parent}/task"):
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                out.append(child)
                todo.append(child)
    return out


def test_a_running_agent_keeps_the_code_in_no_argv_and_no_environment(server: Server, agents, tmp_path: Path):
    from tests.support import tree

    src = tree.build(tmp_path / "source")
    server.j("workgroup", "create", "wg-env")
    code = server.new_code("wg-env", uses=1)
    agent = agents("env").start(code=code)  # the supported way: GO2CLOUD_TOKEN_CODE in its environment
    sid = agent.wait_imported()
    assert agent.proc is not None
    secret = code["token_code"].encode()
    # a real transfer, so the agent has children (rsync) to look at too
    big = src / "big.bin"
    big.write_bytes(os.urandom(1024 * 1024) * 48)
    server.j("migration", "start", "--source", sid, "--path", str(src), "--no-drill",
             "--bandwidth-mbps", "20")
    children = wait_for(lambda: _descendants(agent.proc.pid), 60, "the agent's rsync children")
    for pid in [agent.proc.pid, *children]:
        try:
            cmdline, environ = _proc_text(pid, "cmdline"), _proc_text(pid, "environ")
        except OSError:  # a child that ended meanwhile
            continue
        assert secret not in cmdline, (pid, cmdline)
        assert secret not in environ, (pid, cmdline)
    assert b"rsync" in b" ".join(_proc_text(p, "cmdline") for p in children if os.path.exists(f"/proc/{p}"))


def test_a_code_on_the_command_line_is_refused_saying_what_to_do(tmp_path: Path):
    secret = "s3cr3t-c0de-on-the-command-line"
    proc = subprocess.run(
        [sys.executable, "-m", "go2cloud_client", "--home", str(tmp_path / "h"), "--no-prompt",
         "--server", "https://127.0.0.1:9", "--token-id", "at-1", "--token-code", secret],
        capture_output=True, text=True, timeout=60, env=_env(), stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert "GO2CLOUD_TOKEN_CODE" in proc.stderr and "--token-code -" in proc.stderr
    assert secret not in proc.stderr + proc.stdout
    assert not (tmp_path / "h").exists() or not any((tmp_path / "h").rglob("source.json"))
    # the SMC spelling is refused the same way
    proc = subprocess.run(
        [sys.executable, "-m", "go2cloud_client", "--home", str(tmp_path / "h"), "--no-prompt",
         "--accesstokencode", secret, "status"], capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 2 and "GO2CLOUD_TOKEN_CODE" in proc.stderr


def test_token_code_dash_reads_it_from_standard_input(server: Server, tmp_path: Path):
    server.j("workgroup", "create", "wg-stdin")
    code = server.new_code("wg-stdin", uses=1)
    home = tmp_path / "home-stdin"
    proc = subprocess.run(
        [sys.executable, "-m", "go2cloud_client", "--home", str(home), "--no-prompt", "--yes",
         "--import-only", "--server", server.url, "--server-fingerprint", server.fingerprint,
         "--token-id", code["token_id"], "--token-code", "-"],
        input=code["token_code"] + "\n", capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Import Source Server [s-" in proc.stdout
    assert code["token_code"] not in proc.stdout + proc.stderr


def test_powershell_one_liner_runs_no_process_with_the_code():
    """PowerShell cannot run here: checked as text. ``$env:`` and the script block run inside the
    operator's PowerShell (no process); install.ps1 starts only go2cloud_client, without the code
    in its arguments, and removes the variable after the import."""
    line = install_commands("https://127.0.0.1:1", "sha256:" + "ab" * 32, "at-0123", "C0DE", "sha256//p=")
    code_part, rest = line["powershell"].split("; ", 1)
    assert code_part == "$env:GO2CLOUD_TOKEN_CODE='C0DE'" and "C0DE" not in rest
    assert "& ([scriptblock]::Create(" in rest
    assert "Start-Process" not in rest and "powershell" not in rest.lower()
    text = (REPO / "go2cloud_server" / "data" / "install.ps1").read_text()
    runs = [ln for ln in text.splitlines() if ln.strip().startswith("&") or "Start-Process" in ln]
    assert runs and all("TOKEN_CODE" not in ln and "TokenCode" not in ln for ln in runs), runs
    assert text.count("Remove-Item Env:GO2CLOUD_TOKEN_CODE") == 2
