"""The packaged agent on hosts that are not this build host (docs/compatibility.md).

The executable is PyInstaller's one-file program wrapped by staticx: it carries its loader and C
library. Two real hosts are stood up with chroot (same kernel, different userland):

- an empty root: nothing but the executable and bind mounts of /proc, /sys and /dev (no libc,
  no loader, no /tmp, no shell);
- a Debian 11 root filesystem (glibc 2.31, rsync 3.2.3) built by debootstrap from the Debian
  mirror this machine uses (tests/support/debian_rootfs.py caches it), sharing this host's
  network: the agent there imports into the reference server on loopback and migrates a
  directory at file level, full and incremental, through its own rsync 3.2.3.

The packages come from the session fixture ``dist`` (packaging/build.py, cached).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from go2cloud_server.manifest import build as tree_manifest
from go2cloud_server.manifest import diff
from tests.support import debian_rootfs, tree
from tests.support.harness import Server, wait_for

pytestmark = pytest.mark.integration

LINUX = "go2cloud_client_linux_x86_64"
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture(scope="module")
def packaged(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The executable from the Linux tarball."""
    where = tmp_path_factory.mktemp("compat-pkg")
    with tarfile.open(dist / f"{LINUX}.tar.gz") as tar:
        tar.extractall(where)  # noqa: S202 - our own archive
    return where / LINUX / "go2cloud_client"


def _needs_chroot() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("chroot") is None:
        pytest.skip("needs root, unshare and chroot")


def _chroot_argv(root: Path, argv: List[str], env: Dict[str, str]) -> List[str]:
    """``argv`` run inside ``root`` with /proc, /sys and /dev bind-mounted, in a private mount
    namespace (the mounts vanish with it), with exactly ``env`` as environment."""
    mounts = " && ".join(f"mkdir -p '{root}/{d}' && mount --rbind /{d} '{root}/{d}'"
                         for d in ("proc", "sys", "dev"))
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'{mounts} && exec env -i "$@"', "sh", *[f"{k}={v}" for k, v in env.items()],
            shutil.which("chroot") or "/usr/sbin/chroot", str(root), *argv]


def _run_in(root: Path, argv: List[str], env: Dict[str, str],
            timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(_chroot_argv(root, argv, env), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


# -- (a) a root with nothing but the executable ---------------------------------------------------

def test_runs_in_an_empty_root(packaged: Path, tmp_path: Path):
    _needs_chroot()
    root = tmp_path / "empty"
    root.mkdir()
    shutil.copy2(packaged, root / "go2cloud_client")
    assert sorted(p.name for p in root.iterdir()) == ["go2cloud_client"]
    # staticx and PyInstaller unpack into $TMPDIR; this root has no /tmp, so the root itself
    env = {"TMPDIR": "/"}

    version = _run_in(root, ["/go2cloud_client", "--version"], env)
    assert version.returncode == 0, version.stdout + version.stderr
    assert version.stdout.startswith("go2cloud_client ")

    check = _run_in(root, ["/go2cloud_client", "--home", "/agent", "check", "--json"], env)
    report = json.loads(check.stdout)
    items = {i["check"]: i for i in report["items"]}
    # a root without rsync: the drill says so (critical, exit 35) instead of failing to start
    assert items["rsync"]["severity"] == "critical" and "not installed" in items["rsync"]["finding"]
    assert check.returncode == 35, check.stderr
    assert "Traceback" not in check.stderr

    status = _run_in(root, ["/go2cloud_client", "--home", "/agent", "status", "--json"], env)
    assert status.returncode == 0, status.stdout + status.stderr
    state = json.loads(status.stdout)
    assert state["home"] == "/agent" and state["imported"] is False and state["running"] is False
    # staticx's and PyInstaller's unpacked copies in $TMPDIR are gone after each run
    assert sorted(p.name for p in root.iterdir() if p.name not in ("proc", "sys", "dev")) == \
        ["go2cloud_client"]

    # the agent sees the executable the operator ran, not staticx's temporary copy of it (rsync's
    # "-e <exe> rsync-tunnel", the service unit and the default home are made from it), and the
    # host programs it starts do not get PyInstaller's LD_LIBRARY_PATH
    home = _run_in(root, ["/go2cloud_client", "status", "--json"], env)
    assert home.returncode == 0, home.stdout + home.stderr
    assert json.loads(home.stdout)["home"] == "/"
    probe = _run_in(root, ["/go2cloud_client", "-I", "-B", "-c",
                           "import os, sys; from go2cloud_client.replication import tunnel; "
                           "print(sys.executable); print(tunnel.command()); "
                           "print(os.environ.get('LD_LIBRARY_PATH'))"], env)
    assert probe.stdout.splitlines() == ["/go2cloud_client", "/go2cloud_client rsync-tunnel", "None"], \
        probe.stdout + probe.stderr

    # without any temporary directory it says what it lacks
    bare = _run_in(root, ["/go2cloud_client", "--version"], {})
    assert bare.returncode != 0 and "Failed to create temporary directory in /tmp" in bare.stderr


# -- (b) Debian 11 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bullseye(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _needs_chroot()
    if shutil.which("debootstrap") is None and not debian_rootfs.tarball().is_file():
        pytest.fail("debootstrap is not installed (apt-get install debootstrap; .ci/run does)")
    root = debian_rootfs.unpack(tmp_path_factory.mktemp("bullseye") / "root")
    return root


def _excluded(rel: bytes, is_dir: bool) -> bool:
    """The shipped default exclusions the tree of tests/support/tree.py exercises."""
    return rel == b"swapfile" or rel.startswith(b"tmp/") or rel.startswith(b"var/tmp/")


class _ChrootAgent:
    def __init__(self, argv: List[str], log: Path) -> None:
        self.lines: List[str] = []
        self.log = log
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout
        with open(self.log, "w") as out:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                out.write(line)
                out.flush()

    def output(self) -> str:
        return "\n".join(self.lines)

    def imported(self) -> Optional[str]:
        for line in self.lines:
            if line.startswith("Import Source Server [") and line.endswith("] Successfully!"):
                return line[len("Import Source Server ["):-len("] Successfully!")]
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.output()}")
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def compat_server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "server-data").start()
    yield srv
    srv.stop()


def test_debian11_imports_and_migrates_full_and_incremental(packaged: Path, bullseye: Path,
                                                           compat_server: Server, tmp_path: Path):
    server = compat_server
    ver = _run_in(bullseye, ["/usr/bin/rsync", "--version"], {"PATH": CLEAN_PATH})
    assert ver.stdout.startswith("rsync  version 3.2.3 "), ver.stdout + ver.stderr
    libc = _run_in(bullseye, ["/usr/bin/ldd", "--version"], {"PATH": CLEAN_PATH})
    assert "2.31" in libc.stdout.splitlines()[0], libc.stdout

    prefix = bullseye / "opt" / "go2cloud_client"
    prefix.mkdir(parents=True)
    shutil.copy2(packaged, prefix / "go2cloud_client")
    src_in_root = Path("/srv/data")
    src = bullseye / str(src_in_root).lstrip("/")
    tree.build(src)

    server.j("workgroup", "create", "wg-bullseye")
    code = server.new_code("wg-bullseye", uses=1)
    env = {"PATH": CLEAN_PATH, "HOME": "/root", "GO2CLOUD_TOKEN_CODE": code["token_code"]}
    agent = _ChrootAgent(_chroot_argv(bullseye, [
        "/opt/go2cloud_client/go2cloud_client", "--home", "/opt/go2cloud_client", "--no-prompt",
        "--server", server.url, "--server-fingerprint", server.fingerprint,
        "--token-id", code["token_id"]], env), tmp_path / "agent.out")
    try:
        sid = wait_for(agent.imported, 120, "the import success line")
        wait_for(lambda: server.source(sid)["status"] == "online", 60, "agent online")

        server.j("migration", "start", "--source", sid, "--path", str(src_in_root))
        server.wait_task(sid, "pending", timeout=300)
        arts = server.artifacts(sid)
        assert [a["cycle"] for a in arts] == [1]
        image1 = Path(arts[0]["path"]) / str(src_in_root).lstrip("/")
        m_src1 = tree_manifest(src, exclude=_excluded)
        assert diff(m_src1, tree_manifest(image1)) == []

        tree.change_everything(src)
        server.j("migration", "sync", "--source", sid)
        wait_for(lambda: len(server.artifacts(sid)) == 2, 300, "the second artifact")
        server.wait_task(sid, "pending", timeout=120)
        image2 = Path(server.artifacts(sid)[-1]["path"]) / str(src_in_root).lstrip("/")
        assert diff(tree_manifest(src, exclude=_excluded), tree_manifest(image2)) == []
        assert diff(m_src1, tree_manifest(image1)) == [], "cycle 2 changed the image of cycle 1"
        # the rsync the drill found and the migration used is the root's own 3.2.3
        rsync = [i for i in server.drill(sid)["report"]["items"] if i["check"] == "rsync"]
        assert [(i["data"]["path"], i["data"]["version"]) for i in rsync] == [("/usr/bin/rsync", "3.2.3")]
    finally:
        agent.stop()
    logged = (prefix / "Logs" / "go2cloud_client.log").read_text(errors="replace")
    assert "Traceback" not in agent.output() and "Traceback" not in logged
