"""Host preparation and uninstall at the process boundary, against a real server.

Faked, and only these: the package manager (a script named ``apt-get`` first on PATH, or bound
over /usr/bin/apt-get inside a private mount namespace when rsync has to be hidden), ``modprobe``,
and SELinux's ``getenforce``/``setenforce`` (scripts keeping the mode in a file). The SELinux
configuration is the real path ``/etc/selinux/config``, seen through an overlay mounted on /etc in
a private mount namespace, so the real /etc is never written. The agent, the server, the import,
the undo ledger and the uninstall run for real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from tests.support.harness import REPO, Server, _env

pytestmark = pytest.mark.integration

TRACEBACK = "Traceback (most recent call last)"

FAKE_APT = """#!/bin/sh
echo "$*" >> "{calls}"
case "$*" in
  *elastio*) if [ -n "$FAIL_DRIVER" ]; then
        echo "E: Unable to locate package elastio-snap-dkms" >&2; exit 100; fi ;;
esac
case "$*" in
  *install*rsync*) umount /usr/bin/rsync 2>/dev/null || true ;;
esac
exit 0
"""
FAKE_MODPROBE = """#!/bin/sh
echo "modprobe $*" >> "{calls}"
exit 0
"""
FAKE_GETENFORCE = """#!/bin/sh
cat "{state}"
"""
FAKE_SETENFORCE = """#!/bin/sh
echo "setenforce $*" >> "{calls}"
if [ "$1" = 0 ]; then echo Permissive > "{state}"; else echo Enforcing > "{state}"; fi
"""


def _driver_packages() -> str:
    """What the agent installs on this Debian host: the running kernel's headers (unless already
    installed: what was there before is never installed, nor removed, by the agent) and the
    elastio-snap packages."""
    headers = f"linux-headers-{os.uname().release}"
    q = subprocess.run(["dpkg-query", "-W", "-f=${Status}", headers], capture_output=True, text=True)
    there = q.returncode == 0 and "install ok installed" in q.stdout
    return " ".join(([] if there else [headers]) + ["elastio-snap-dkms", "elastio-snap-utils"])


def _needs_root() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("this test needs root and unshare (CI runs as root)")


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


class Fakes:
    def __init__(self, tmp_path: Path):
        self.bin = tmp_path / "fakebin"
        self.bin.mkdir()
        self.calls = tmp_path / "calls.txt"
        self.state = tmp_path / "selinux-state"
        self.apt = _script(self.bin / "apt-get", FAKE_APT.format(calls=self.calls))
        _script(self.bin / "modprobe", FAKE_MODPROBE.format(calls=self.calls))
        _script(self.bin / "getenforce", FAKE_GETENFORCE.format(state=self.state))
        _script(self.bin / "setenforce", FAKE_SETENFORCE.format(calls=self.calls, state=self.state))

    def env(self, **extra: str) -> Dict[str, str]:
        env = _env({"GO2CLOUD_SNAPSHOT_DRIVER": "ask", **extra})
        env["PATH"] = f"{self.bin}{os.pathsep}{env['PATH']}"
        return env

    def recorded(self) -> List[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


@pytest.fixture
def fakes(tmp_path: Path) -> Fakes:
    return Fakes(tmp_path)


def _import_args(server: Server, workgroup: str, home: Path) -> List[str]:
    try:
        server.j("workgroup", "create", workgroup)
    except AssertionError:
        pass
    code = server.new_code(workgroup, uses=1)
    return [
        "--home",
        str(home),
        "--import-only",
        "--server",
        server.url,
        "--server-fingerprint",
        server.fingerprint,
        "--token-id",
        code["token_id"],
        "--token-code",
        code["token_code"],
    ]


def _agent(
    args: List[str], env: Dict[str, str], namespace: Optional[str] = None
) -> subprocess.CompletedProcess:
    """``python -m go2cloud_client ARGS``; with ``namespace``, a shell snippet run first inside a
    private mount namespace."""
    args = list(args)
    if "--token-code" in args:  # the code goes into the environment, never into the arguments
        at = args.index("--token-code")
        env = {**env, "GO2CLOUD_TOKEN_CODE": args[at + 1]}
        del args[at : at + 2]
    argv = [sys.executable, "-m", "go2cloud_client", *args]
    if namespace is not None:
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            namespace + ' && exec "$PY" -m go2cloud_client "$@"',
            "sh",
            *args,
        ]
        env = {**env, "PY": sys.executable}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=str(REPO), env=env)
    assert TRACEBACK not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def _sid(out: str) -> str:
    line = [x for x in out.splitlines() if x.startswith("Import Source Server [")]
    assert line, out
    return line[0][len("Import Source Server [") : -len("] Successfully!")]


def _ledger(home: Path) -> List[dict]:
    path = home / "state" / "host_changes.json"
    return json.loads(path.read_text())["changes"] if path.exists() else []


def test_snapshot_driver_install_fails_import_succeeds_block_stays_available(server, fakes, tmp_path):
    driver = _driver_packages()
    home = tmp_path / "home-driver"
    r = _agent(["--yes", "--no-prompt", *_import_args(server, "wg-driver", home)], fakes.env(FAIL_DRIVER="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    sid = _sid(r.stdout)
    assert f"Installing the snapshot driver: apt-get -y install {driver}" in r.stdout
    assert "Snapshot driver not installed: installing it failed" in r.stdout
    assert "Block replication stays available" in r.stdout
    assert fakes.recorded() == [f"-y install {driver}"]
    assert _ledger(home) == [], "a failed installation changed nothing to revert"
    block = server.j("source", "show", sid)["inventory"]["capabilities"]["block"]
    assert block["available"] is True and block["driver"]["installed"] is False
    reason = block["driver"]["reason"]
    assert "Unable to locate package elastio-snap-dkms" in reason and "repository" in reason
    assert isinstance(block["backends"], list) and "elastio-snap" not in block["backends"]
    shown = server.cli("source", "show", sid, json_out=False).stdout  # what the operator reads
    assert "block mode:" in shown and "snapshot driver not installed: installing it failed" in shown
    status = _agent(["status", "--home", str(home)], fakes.env())
    assert "Block mode: available (" in status.stdout and "snapshot driver not installed" in status.stdout


def test_snapshot_driver_skipped_with_no_prompt(server, fakes, tmp_path):
    home = tmp_path / "home-driver-np"
    r = _agent(["--no-prompt", *_import_args(server, "wg-driver", home)], fakes.env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Warning: snapshot driver not installed (--no-prompt); re-run the import with --yes" in r.stdout
    assert fakes.recorded() == []
    block = server.j("source", "show", _sid(r.stdout))["inventory"]["capabilities"]["block"]
    assert block["available"] is True and "--no-prompt" in block["driver"]["reason"]


def test_rsync_installed_at_import_and_removed_by_uninstall_revert(server, fakes, tmp_path):
    _needs_root()
    if not os.path.exists("/usr/bin/rsync") or not os.path.exists("/usr/bin/apt-get"):
        pytest.fail("this test expects a Debian-family host with /usr/bin/rsync and /usr/bin/apt-get")
    home = tmp_path / "home-rsync"
    hide = 'mount --bind /dev/null /usr/bin/rsync && mount --bind "$FAKE_APT" /usr/bin/apt-get'
    r = _agent(
        ["--yes", "--no-prompt", *_import_args(server, "wg-rsync", home)],
        fakes.env(FAKE_APT=str(fakes.apt), GO2CLOUD_SNAPSHOT_DRIVER="skip"),
        namespace=hide,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Installing rsync: apt-get -y install rsync" in r.stdout and "Installed rsync" in r.stdout
    assert fakes.recorded() == ["-y install rsync"]
    (change,) = _ledger(home)
    assert change["kind"] == "package_installed" and change["undo"] == ["apt-get", "-y", "remove", "rsync"]

    # uninstall without --revert: the import is forgotten, the change is listed and left in place
    r = _agent(["uninstall", "--home", str(home)], fakes.env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Host changes left in place (go2cloud_client uninstall --revert undoes them):" in r.stdout
    assert "package rsync installed with apt-get (undo: apt-get -y remove rsync)" in r.stdout
    assert fakes.recorded() == ["-y install rsync"] and len(_ledger(home)) == 1
    assert not (home / "state" / "source.json").exists() and not (home / "identity" / "key.pem").exists()

    # with --revert: the recorded argv runs (through PATH, as the agent always runs it)
    r = _agent(["uninstall", "--revert", "--home", str(home)], fakes.env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Reverted: removed package rsync (apt-get -y remove rsync)" in r.stdout
    assert fakes.recorded() == ["-y install rsync", "-y remove rsync"]
    assert _ledger(home) == [] and home.is_dir(), "a home that is not a package folder is kept"


def test_selinux_set_permissive_and_restored_without_touching_etc(server, fakes, tmp_path):
    _needs_root()
    real = Path("/etc/selinux/config")
    before = real.read_bytes() if real.exists() else None
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    fakes.state.write_text("Enforcing\n")
    home = tmp_path / "home-selinux"
    overlay = (
        'mount -t overlay overlay -o "lowerdir=/etc,upperdir=$UP,workdir=$WK" /etc && '
        'mkdir -p /etc/selinux && printf "# test\\nSELINUX=enforcing\\nSELINUXTYPE=targeted\\n" '
        "> /etc/selinux/config"
    )
    env = fakes.env(UP=str(tmp_path / "upper"), WK=str(tmp_path / "work"), GO2CLOUD_SNAPSHOT_DRIVER="skip")
    r = _agent(["--yes", "--no-prompt", *_import_args(server, "wg-selinux", home)], env, namespace=overlay)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (
        "SELinux set to permissive now (setenforce 0) and SELINUX=permissive in /etc/selinux/config"
        in r.stdout
    )
    assert fakes.recorded() == ["setenforce 0"] and fakes.state.read_text() == "Permissive\n"
    written = (
        tmp_path / "upper" / "selinux" / "config"
    )  # what the agent wrote, seen in the overlay's upper dir
    assert written.read_text() == "# test\nSELINUX=permissive\nSELINUXTYPE=targeted\n"
    (change,) = _ledger(home)
    assert {k: change[k] for k in ("kind", "previous_runtime", "previous_config", "config_path")} == {
        "kind": "selinux_mode",
        "previous_runtime": "enforcing",
        "previous_config": "enforcing",
        "config_path": "/etc/selinux/config",
    }

    # uninstall --revert in a new namespace over the same upper dir: the same view of /etc
    remount = 'mount -t overlay overlay -o "lowerdir=/etc,upperdir=$UP,workdir=$WK" /etc'
    r = _agent(["uninstall", "--revert", "--home", str(home)], env, namespace=remount)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (
        "Reverted: restored SELinux: SELINUX=enforcing in /etc/selinux/config, enforcing at run time"
        in r.stdout
    )
    assert written.read_text() == "# test\nSELINUX=enforcing\nSELINUXTYPE=targeted\n"
    assert fakes.recorded() == ["setenforce 0", "setenforce 1"] and fakes.state.read_text() == "Enforcing\n"
    assert _ledger(home) == []
    assert (real.read_bytes() if real.exists() else None) == before, "the real /etc must not change"


def _package(tmp_path: Path) -> Path:
    """A copy of a fake package folder: an executable go2cloud_client and Excludes/."""
    template = tmp_path / "template" / "go2cloud_client_linux_x86_64"
    (template / "Excludes").mkdir(parents=True)
    (template / "Excludes" / "rsync_excludes_linux.txt").write_text("/proc/*\n")
    _script(template / "go2cloud_client", f'#!/bin/sh\nexec "{sys.executable}" -m go2cloud_client "$@"\n')
    (template / "VERSION").write_text("0.1.0\n")
    installed = tmp_path / "opt" / "go2cloud_client"
    shutil.copytree(template, installed, symlinks=True)
    return installed


def test_uninstall_removes_the_package_folder_service_and_reverts(server, fakes, tmp_path):
    driver = _driver_packages()
    pkg = _package(tmp_path)
    units = tmp_path / "units"
    env = fakes.env(GO2CLOUD_SYSTEMD_DIR=str(units))
    # import from the package folder: the snapshot driver "installs" but stays unusable (no real
    # module here), which is recorded (block mode stays available)
    r = _agent(["--yes", "--no-prompt", *_import_args(server, "wg-pkg", pkg)], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the snapshot driver packages were installed but the driver is not usable" in r.stdout
    r = _agent(["service", "install", "--home", str(pkg)], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [c["kind"] for c in _ledger(pkg)] == ["snapshot_driver_installed", "service_installed"]
    assert (pkg / "agent.pid").exists()

    r = _agent(["uninstall", "--revert", "--yes", "--home", str(pkg)], env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "Stopped the agent (pid " in out and f"Removed {units / 'go2cloud_client.service'}" in out
    assert f"Reverted: removed the snapshot driver packages {driver}" in out
    assert f"Removed the package folder {pkg}. Uninstalled." in out
    assert not pkg.exists() and not (units / "go2cloud_client.service").exists()
    assert not (units / "multi-user.target.wants" / "go2cloud_client.service").is_symlink()
    assert fakes.recorded() == [
        f"-y install {driver}",
        "modprobe elastio_snap",
        "modprobe -r elastio_snap",
        f"-y remove {driver}",
    ]
    assert (tmp_path / "template" / "go2cloud_client_linux_x86_64" / "go2cloud_client").exists()
