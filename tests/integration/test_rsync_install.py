"""rsync missing at import: the agent offers to install it with the distribution's package manager.

The agent runs in a private mount namespace where /usr/bin/rsync is hidden (``/dev/null`` bound
over it). The package manager is the one boundary faked here: a script bound over
/usr/bin/apt-get records its arguments and "installs" rsync by removing the bind mount, so that
the agent really finds rsync afterwards. Everything else (server, import, undo ledger) is real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import REPO, _env

pytestmark = pytest.mark.integration

FAKE_APT = """#!/bin/sh
echo "$@" >> {record}
umount /usr/bin/rsync
"""


def _run_hidden(tmp_path: Path, agent_args: list, token_code: str) -> subprocess.CompletedProcess:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("this test needs root and unshare (CI runs as root)")
    if not os.path.exists("/usr/bin/apt-get"):
        pytest.fail("this test expects a Debian-family host with /usr/bin/apt-get")
    if not os.path.exists("/usr/bin/rsync"):
        pytest.fail("rsync must be installed at /usr/bin/rsync (scripts/setup.sh)")
    return subprocess.run(_argv(agent_args), capture_output=True, text=True, timeout=120, cwd=str(REPO),
                          env=_env({"FAKE": str(_fake(tmp_path)), "PY": sys.executable,
                                    "GO2CLOUD_TOKEN_CODE": token_code}))


def _argv(agent_args: list) -> list:
    inner = ("mount --bind /dev/null /usr/bin/rsync && mount --bind \"$FAKE\" /usr/bin/apt-get && "
             "exec \"$PY\" -m go2cloud_client \"$@\"")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner, "sh", *agent_args]


def test_missing_rsync_refused_without_yes_keeps_the_code_unused(server, tmp_path):
    server.j("workgroup", "create", "wg-rsync")
    code = server.new_code("wg-rsync", uses=1)
    home = tmp_path / "home-norsync"
    r = _run_hidden(tmp_path, ["--home", str(home), "--no-prompt", "--server", server.url,
                               "--server-fingerprint", server.fingerprint,
                               "--token-id", code["token_id"]], code["token_code"])
    assert r.returncode == 30, r.stdout + r.stderr
    assert "rsync is not installed" in r.stderr and "apt-get -y install rsync" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "apt-get.calls").exists(), "nothing may be installed without consent"
    codes = server.j("code", "list", "--workgroup", "wg-rsync")["codes"]
    assert codes[0]["uses_left"] == 1, "the activation code must not be consumed by a failed start"


def test_missing_rsync_installed_with_yes_and_recorded_for_undo(server, tmp_path):
    server.j("workgroup", "create", "wg-rsync2")
    code = server.new_code("wg-rsync2", uses=1)
    home = tmp_path / "home-rsync"
    # the agent imports and keeps running; stop it (SIGTERM) once the success line is out
    proc = subprocess.Popen(
        _argv(["--home", str(home), "--yes", "--no-prompt", "--server", server.url,
               "--server-fingerprint", server.fingerprint, "--token-id", code["token_id"]]),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(REPO),
        env=_env({"FAKE": str(_fake(tmp_path)), "PY": sys.executable,
                  "GO2CLOUD_TOKEN_CODE": code["token_code"]}),
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("Import Source Server ["):
            break
    proc.terminate()
    proc.wait(timeout=30)
    out = "\n".join(lines)
    assert "Installing rsync: apt-get -y install rsync" in out, out
    assert any(line.startswith("Import Source Server [s-") for line in lines), out
    assert (tmp_path / "apt-get.calls").read_text().split() == ["-y", "install", "rsync"]
    ledger = json.loads((home / "state" / "host_changes.json").read_text())
    change = ledger["changes"][0]
    assert change["kind"] == "package_installed" and change["package"] == "rsync"
    assert change["undo"] == ["apt-get", "-y", "remove", "rsync"]


def _fake(tmp_path: Path) -> Path:
    fake = tmp_path / "fake-apt-get"
    fake.write_text(FAKE_APT.format(record=tmp_path / "apt-get.calls"))
    fake.chmod(0o755)
    return fake
