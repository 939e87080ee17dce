"""The agent packages (packaging/build.py), served by a real server and installed by install.sh.

The tarball is built once per session (PyInstaller's work is cached under build/pyinstaller/ and
reused while its inputs are unchanged). The frozen executable is run outside the repository
with an empty environment and, under a private mount namespace, with the Python installation
and the repository hidden by empty tmpfs mounts: it can only use what it carries.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from go2cloud_server import tls
from go2cloud_server.manifest import build as tree_manifest
from go2cloud_server.manifest import diff
from tests.support.harness import REPO, Server, wait_for

pytestmark = pytest.mark.integration

LINUX = "go2cloud_client_linux_x86_64"
WINDOWS = "go2cloud_client_windows_x86_64"
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: what the frozen executable must not need: the Python installation running the tests and the
#: repository (hidden by tmpfs mounts in a private mount namespace)
HIDDEN = sorted({str(Path(sys.base_prefix).resolve()), str(Path(sys.prefix).resolve()), str(REPO)})


@pytest.fixture(scope="session")
def extracted(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("extracted")
    with tarfile.open(dist / f"{LINUX}.tar.gz") as tar:
        tar.extractall(where)  # noqa: S202 - our own archive, checked in test_tarball_layout
    return where / LINUX


def _clean_env(**extra: str) -> Dict[str, str]:
    return {"PATH": CLEAN_PATH, **extra}


def _hidden_argv(argv: List[str], env: Dict[str, str]) -> List[str]:
    """``argv`` with an empty environment in a mount namespace that hides HIDDEN."""
    mounts = " && ".join(f"mount -t tmpfs -o size=1m go2cloud_hide '{p}'" for p in HIDDEN)
    envs = [f"{k}={v}" for k, v in env.items()]
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'{mounts} && exec env -i "$@"', "sh", *envs, *argv]


def _run_frozen(exe: Path, *args: str, cwd: Path, hidden: bool = True,
                env: Optional[Dict[str, str]] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    environment = env or _clean_env()
    argv = [str(exe), *args]
    argv = _hidden_argv(argv, environment) if hidden else ["env", "-i", *[f"{k}={v}" for k, v in
                                                                           environment.items()], *argv]
    return subprocess.run(argv, cwd=str(cwd), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the archives ---------------------------------------------------------------------------------

def test_tarball_layout_modes_and_sums(dist: Path):
    sums = (dist / "SHA256SUMS").read_text().splitlines()
    assert [line.split("  ")[1] for line in sums] == [f"{LINUX}.tar.gz", f"{WINDOWS}.zip"]
    for line in sums:
        digest, name = line.split("  ")
        assert _sha256(dist / name) == digest
    with tarfile.open(dist / f"{LINUX}.tar.gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert set(names) == {LINUX, f"{LINUX}/Excludes", f"{LINUX}/Excludes/rsync_excludes_linux.txt",
                          f"{LINUX}/go2cloud_client", f"{LINUX}/config.yaml.example", f"{LINUX}/README.txt",
                          f"{LINUX}/LICENSE", f"{LINUX}/VERSION", f"{LINUX}/KERNEL"}
    by_name = {m.name: m for m in members}
    assert all((m.uid, m.gid, m.uname, m.gname) == (0, 0, "root", "root") for m in members)
    assert len({m.mtime for m in members}) == 1
    assert by_name[f"{LINUX}/go2cloud_client"].mode == 0o755
    assert by_name[f"{LINUX}/Excludes"].isdir() and by_name[f"{LINUX}/Excludes"].mode == 0o755
    for name in ("config.yaml.example", "README.txt", "LICENSE", "VERSION", "KERNEL",
                 "Excludes/rsync_excludes_linux.txt"):
        assert by_name[f"{LINUX}/{name}"].mode == 0o644, name
    with tarfile.open(dist / f"{LINUX}.tar.gz") as tar:
        def read(name: str) -> bytes:
            f = tar.extractfile(f"{LINUX}/{name}")
            assert f is not None
            return f.read()

        from go2cloud_client import __version__

        assert read("VERSION") == f"{__version__}\n".encode()
        assert read("LICENSE") == (REPO / "LICENSE").read_bytes()
        assert b"Apache License" in read("LICENSE") and b"Version 2.0" in read("LICENSE")
        assert read("Excludes/rsync_excludes_linux.txt") == (
            REPO / "go2cloud_client" / "data" / "Excludes" / "rsync_excludes_linux.txt").read_bytes()
        assert read("go2cloud_client")[:4] == b"\x7fELF"


def test_windows_zip_layout_and_pyz(dist: Path, tmp_path: Path):
    with zipfile.ZipFile(dist / f"{WINDOWS}.zip") as zf:
        names = zf.namelist()
        assert names == sorted(names)
        files = {n[len(WINDOWS) + 1:] for n in names if not n.endswith("/")}
        assert files == {"go2cloud_client.pyz", "install.ps1", "Excludes/rsync_excludes_linux.txt",
                         "config.yaml.example", "README.txt", "LICENSE", "VERSION"}
        shipped = (REPO / "go2cloud_server" / "data" / "install.ps1").read_bytes()
        assert zf.read(f"{WINDOWS}/install.ps1") == shipped
        assert b"\r\n" in zf.read(f"{WINDOWS}/README.txt")
        pyz = tmp_path / "go2cloud_client.pyz"
        pyz.write_bytes(zf.read(f"{WINDOWS}/go2cloud_client.pyz"))
    # the zipapp runs with a Python that has the dependencies (here: this one), from elsewhere
    proc = subprocess.run([sys.executable, str(pyz), "--version"], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=60, env={"PATH": CLEAN_PATH, "PYTHONNOUSERSITE": "1"})
    assert proc.returncode == 0 and proc.stdout.startswith("go2cloud_client "), proc.stderr
    with zipfile.ZipFile(pyz) as zf:
        assert {"__main__.py", "go2cloud_client/cli.py", "snapshot_driver/registry.py"} <= set(zf.namelist())
        assert not [n for n in zf.namelist() if n.startswith("go2cloud_server") or n.endswith(".pyc")]


def test_kernel_requirement_is_reported(dist: Path):
    """The executable carries its C library (staticx), so the host needs no glibc; that C
    library's ABI tag is the oldest kernel it starts on, measured at each build and documented."""
    report = (REPO / "build" / "pyinstaller" / "kernel.txt").read_text().splitlines()
    assert report[0].startswith("oldest kernel: ")
    kernel = report[0].split(": ")[1]
    assert any(line.endswith("\tlibc.so.6") for line in report[1:]), report
    with tarfile.open(dist / f"{LINUX}.tar.gz") as tar:
        member = tar.extractfile(f"{LINUX}/KERNEL")
        assert member is not None
        assert member.read().decode().strip() == kernel
    for doc in ("packaging/README.md", "docs/compatibility.md"):
        assert f"Linux {kernel}" in (REPO / doc).read_text(), doc


# -- the frozen executable ---------------------------------------------------------------------------

def test_frozen_agent_runs_with_no_python_available(extracted: Path, tmp_path: Path):
    exe = extracted / "go2cloud_client"
    home = tmp_path / "home"
    for hidden in (False, True):
        version = _run_frozen(exe, "--version", cwd=tmp_path, hidden=hidden)
        assert version.returncode == 0, version.stderr
        from go2cloud_client import __version__

        assert version.stdout.strip() == f"go2cloud_client {__version__}"
    # the namespace really hides the Python installation (the same probe with python3 fails)
    probe = subprocess.run(_hidden_argv([str(Path(sys.executable).resolve()), "-c", "pass"], _clean_env()),
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0
    status = _run_frozen(exe, "status", "--json", "--home", str(home), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert isinstance(json.loads(status.stdout), dict)
    helptext = _run_frozen(exe, "--help", cwd=tmp_path)
    assert helptext.returncode == 0 and "status" in helptext.stdout
    if " check " in helptext.stdout:
        check = _run_frozen(exe, "check", "--help", cwd=tmp_path)
        assert check.returncode == 0 and "--json" in check.stdout, check.stderr
        # the drill itself (its checks are modules of go2cloud_client.drill) runs frozen
        drill = _run_frozen(exe, "check", "--json", "--home", str(home), cwd=tmp_path)
        assert drill.returncode in (0, 35), drill.stderr
        assert json.loads(drill.stdout)["items"], drill.stdout
    # the helper-child form of the interpreter (fsfreeze guard): [sys.executable, -I, -B, -c, CODE, ...]
    child = _run_frozen(exe, "-I", "-B", "-c", "import sys, zstandard, xxhash, blake3; print(sys.argv)",
                        "a", "b", cwd=tmp_path)
    assert child.returncode == 0 and child.stdout.strip() == "['-c', 'a', 'b']", child.stderr
    # every hidden import is inside: snapshot backends by name, block codecs, cryptography
    code = ("from snapshot_driver import registry; [registry.get(n) for n in registry.names()]; "
            "from go2cloud_client.replication.block import codec; import zstandard, xxhash, blake3; "
            "assert zstandard.backend == 'cext', zstandard.backend; "
            "from cryptography.hazmat.primitives.asymmetric import ed25519; "
            "ed25519.Ed25519PrivateKey.generate(); "
            "from go2cloud_client.replication.excludes import DEFAULT_EXCLUDES; "
            "DEFAULT_EXCLUDES.read_bytes(); "
            "print('ok')")
    probe = _run_frozen(exe, "-I", "-c", code, cwd=tmp_path)
    assert probe.returncode == 0 and probe.stdout.strip() == "ok", probe.stderr


# -- served by the real server, installed by install.sh ----------------------------------------------

@pytest.fixture
def pkg_server(tmp_path: Path, dist: Path) -> Iterator[Server]:
    packages = tmp_path / "packages"
    shutil.copytree(dist, packages)
    srv = Server(tmp_path / "server-data", extra_args=["--packages", str(packages)]).start()
    yield srv
    srv.stop()


def _curl(server: Server, name: str, out: Path, pin: Optional[str] = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-fsS", "--insecure", "--pinnedpubkey", pin or server.info["spki_pin"], "-o", str(out),
         f"{server.url}/download/{name}"], capture_output=True, text=True, timeout=60)


def test_download_routes_pinned_curl(pkg_server: Server, dist: Path, tmp_path: Path):
    index = tmp_path / "index.json"
    assert _curl(pkg_server, "", index).returncode == 0
    doc = json.loads(index.read_text())
    listed = {p["name"]: p for p in doc["packages"]}
    assert set(listed) == {f"{LINUX}.tar.gz", f"{WINDOWS}.zip"}
    for name, entry in listed.items():
        assert entry["error"] is None and entry["size"] == (dist / name).stat().st_size
        assert entry["sha256"] == _sha256(dist / name)
    got = tmp_path / "pkg.tar.gz"
    assert _curl(pkg_server, f"{LINUX}.tar.gz", got).returncode == 0
    assert got.read_bytes() == (dist / f"{LINUX}.tar.gz").read_bytes()
    head = subprocess.run(["curl", "-fsS", "--insecure", "--pinnedpubkey", pkg_server.info["spki_pin"],
                           "-o", "/dev/null", "-D", "-", f"{pkg_server.url}/download/{LINUX}.tar.gz"],
                          capture_output=True, text=True, timeout=60)
    headers = head.stdout.lower()
    assert f"content-length: {(dist / f'{LINUX}.tar.gz').stat().st_size}\n" in headers.replace("\r", "")
    assert "content-type: application/gzip" in headers
    assert _curl(pkg_server, "SHA256SUMS", tmp_path / "sums").returncode == 0
    assert (tmp_path / "sums").read_bytes() == (dist / "SHA256SUMS").read_bytes()
    script = tmp_path / "install.sh"
    assert _curl(pkg_server, "install.sh", script).returncode == 0
    text = script.read_text()
    assert f"SERVED_SPKI_PIN='{pkg_server.info['spki_pin']}'" in text
    assert f"SERVED_FINGERPRINT='{pkg_server.fingerprint}'" in text
    # the pin is enforced although --insecure skips the CA check
    wrong = "sha256//" + "A" * 43 + "="
    refused = _curl(pkg_server, "SHA256SUMS", tmp_path / "x", pin=wrong)
    assert refused.returncode == 90, refused.stderr
    # nothing outside the published names, whatever the path looks like
    for path in ("..%2Fserver.json", "server.json", "..", "%2e%2e/admin.token", "packages", "a/b"):
        proc = subprocess.run(["curl", "-sS", "--insecure", "--path-as-is", "-o", "/dev/null", "-w",
                               "%{http_code}", f"{pkg_server.url}/download/{path}"],
                              capture_output=True, text=True, timeout=30)
        assert proc.stdout == "404", (path, proc.stdout)


def _one_liner(server: Server, workgroup: str = "pk") -> str:
    try:
        server.j("workgroup", "create", workgroup)
    except AssertionError:
        pass
    return str(server.new_code(workgroup, uses=5)["commands"]["linux"])


def _bash(cmd: str, cwd: Path, env: Optional[Dict[str, str]] = None,
          timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {"PATH": os.environ.get("PATH", CLEAN_PATH), "HOME": "/root", **(env or {})}
    return subprocess.run(["bash", "-c", cmd], cwd=str(cwd), capture_output=True, text=True,
                          timeout=timeout, env=environment, stdin=subprocess.DEVNULL)


def test_one_liner_installs_imports_and_migrates_with_the_frozen_agent(pkg_server: Server, tmp_path: Path):
    prefix = tmp_path / "opt" / "go2cloud_client"
    work = tmp_path / "fresh"
    work.mkdir()
    cmd = _one_liner(pkg_server) + f" --prefix {prefix} --no-prompt --no-service"
    first = _bash(cmd, work)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "sha256" in first.stdout and "OK" in first.stdout
    assert "Successfully!" in first.stdout
    assert (prefix / "go2cloud_client").stat().st_mode & 0o777 == 0o755
    for name in ("README.txt", "LICENSE", "VERSION", "config.yaml.example",
                 "Excludes/rsync_excludes_linux.txt"):
        assert (prefix / name).is_file(), name
    source = json.loads((prefix / "state" / "source.json").read_text())
    sid = source["source_id"]
    token_code = cmd.split("GO2CLOUD_TOKEN_CODE='")[1].split("'")[0]
    for path in prefix.rglob("*"):
        if path.is_file() and path.name != "go2cloud_client":
            assert token_code.encode() not in path.read_bytes(), path

    # re-running the one-liner upgrades in place: same source, state kept, no second source
    (prefix / "config.yaml").write_text("log_level: DEBUG\n")
    again = _bash(_one_liner(pkg_server) + f" --prefix {prefix} --no-prompt --no-service", work)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"Already imported as source {sid}" in again.stdout
    assert (prefix / "config.yaml").read_text() == "log_level: DEBUG\n"
    assert json.loads((prefix / "state" / "source.json").read_text())["source_id"] == sid
    assert len(pkg_server.j("source", "list")["sources"]) == 1

    # the installed agent, with no Python available, migrates a small tree
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(20):
        (src / f"f{i}.bin").write_bytes(os.urandom(32 * 1024))
    (src / "sub" / "link").symlink_to("../f0.bin")
    log = open(tmp_path / "agent.out", "wb")
    argv = _hidden_argv([str(prefix / "go2cloud_client"), "--home", str(prefix), "--no-prompt"], _clean_env())
    agent = subprocess.Popen(argv,
                             cwd=str(work), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: pkg_server.source(sid)["status"] == "online", 60, "installed agent online")
        pkg_server.j("migration", "start", "--source", sid, "--path", str(src))
        pkg_server.wait_task(sid, "pending", timeout=180)
        assert diff(tree_manifest(src), tree_manifest(pkg_server.artifact_tree(sid, src))) == []
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        log.close()
    assert "Traceback" not in (tmp_path / "agent.out").read_text(errors="replace")


def test_install_sh_refuses_wrong_pin_and_fingerprint_with_nothing_installed(pkg_server: Server,
                                                                              tmp_path: Path):
    prefix = tmp_path / "opt"
    cmd = _one_liner(pkg_server) + f" --prefix {prefix} --no-prompt --no-service"
    wrong_pin = "sha256//" + "B" * 43 + "="
    proc = _bash(cmd + f" --pin '{wrong_pin}'", tmp_path)
    assert proc.returncode == 4 and "pin mismatch" in proc.stderr, proc.stdout + proc.stderr
    assert not prefix.exists()
    # a wrong pin in the one-liner itself: curl refuses the server, and the whole command fails
    # with curl's exit code (not bash's 0 for an empty script), nothing run or installed
    pin = pkg_server.info["spki_pin"]
    assert f"'{pin}'" in cmd
    proc = _bash(cmd.replace(pin, wrong_pin), tmp_path)
    assert proc.returncode == 90, proc.stdout + proc.stderr
    assert "pinned public key" in proc.stderr and not prefix.exists()
    # so does an unreachable server (curl 7: connection refused)
    proc = _bash(cmd.replace(f"{pkg_server.url}/download/", "https://127.0.0.1:9/download/"), tmp_path)
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert not prefix.exists()
    wrong_fp = cmd.replace(pkg_server.fingerprint, "sha256:" + "0" * 64)
    proc = _bash(wrong_fp, tmp_path)
    assert proc.returncode == 4 and "pin mismatch" in proc.stderr, proc.stdout + proc.stderr
    assert not prefix.exists()
    # a package that no longer matches SHA256SUMS on the server is not served at all
    packages = Path(pkg_server.extra_args[1])
    tarball = packages / f"{LINUX}.tar.gz"
    data = bytearray(tarball.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tarball.write_bytes(bytes(data))
    proc = _bash(cmd, tmp_path)
    assert proc.returncode == 4 and "HTTP error" in proc.stderr, proc.stdout + proc.stderr
    assert not prefix.exists()
    index = json.loads(subprocess.run(
        ["curl", "-fsS", "--insecure", "--pinnedpubkey", pkg_server.info["spki_pin"],
         f"{pkg_server.url}/download/"],
        capture_output=True, text=True, timeout=30, check=True).stdout)
    bad = [p for p in index["packages"] if p["name"] == tarball.name][0]
    assert "does not match its SHA256SUMS line" in bad["error"]
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("go2cloud_install.*/SHA256SUMS"))


def _tree(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"") for p in root.rglob("*")}


def test_install_sh_refuses_a_host_that_cannot_run_the_executable(pkg_server: Server, dist: Path,
                                                                   tmp_path: Path):
    """Checked after the download and before anything is stopped or installed: a kernel older
    than the package's KERNEL (uname -r answers 2.6.32 here), then an executable that does not start
    (a package whose executable fails like an old loader would). An earlier installation in the
    prefix stays exactly as it was, and its agent is not stopped."""
    prefix = tmp_path / "opt"
    (prefix / "state").mkdir(parents=True)
    (prefix / "state" / "source.json").write_text('{"source_id": "s-earlier"}')
    old_exe = prefix / "go2cloud_client"
    old_exe.write_text(f"#!/bin/sh\necho \"$@\" >> '{tmp_path}/old-agent-was-called'\n")
    old_exe.chmod(0o755)
    before = _tree(prefix)
    with tarfile.open(dist / f"{LINUX}.tar.gz") as tar:
        member = tar.extractfile(f"{LINUX}/KERNEL")
        assert member is not None
        need = member.read().decode().strip()
    assert need == (REPO / "build" / "pyinstaller" / "kernel.txt").read_text().split(": ")[1].split()[0]
    # run as root without sudo (sudo would reset PATH and hide the fake uname)
    cmd = (_one_liner(pkg_server).replace(" sudo --preserve-env=GO2CLOUD_TOKEN_CODE ", " ")
           + f" --prefix {prefix} --no-prompt --no-service")
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    uname = fakebin / "uname"
    uname.write_text('#!/bin/sh\nif [ "$1" = -r ]; then echo "2.6.32-754.el6.x86_64"; exit 0; fi\n'
                     f'exec {shutil.which("uname")} "$@"\n')
    uname.chmod(0o755)
    proc = _bash(cmd, tmp_path, env={"PATH": f"{fakebin}:{os.environ.get('PATH', CLEAN_PATH)}"})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "this host runs Linux 2.6.32; the go2cloud_client" in proc.stderr
    assert f"needs Linux {need} or newer" in proc.stderr and "nothing was installed" in proc.stderr
    assert _tree(prefix) == before and not (tmp_path / "old-agent-was-called").exists()

    # this host's kernel is new enough, but the package's executable does not start
    packages = Path(pkg_server.extra_args[1])
    tarball = packages / f"{LINUX}.tar.gz"
    broken = tmp_path / "broken.tar.gz"
    failing = (b"#!/bin/sh\n"
               b"echo \"./go2cloud_client: /lib64/libc.so.6: version \\`GLIBC_2.99' not found\" >&2\n"
               b"exit 1\n")
    with tarfile.open(tarball) as src, tarfile.open(broken, "w:gz") as out:
        for m in src.getmembers():
            if m.name == f"{LINUX}/go2cloud_client":
                m.size = len(failing)
                out.addfile(m, io.BytesIO(failing))
            else:
                out.addfile(m, src.extractfile(m) if m.isfile() else None)
    shutil.move(str(broken), str(tarball))
    sums = packages / "SHA256SUMS"
    sums.write_text("".join(f"{_sha256(tarball)}  {tarball.name}\n" if line.endswith(f"  {tarball.name}") else
                            line + "\n" for line in sums.read_text().splitlines()))
    proc = _bash(cmd, tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "executable does not run on this host" in proc.stderr and "GLIBC_2.99" in proc.stderr
    assert _tree(prefix) == before and not (tmp_path / "old-agent-was-called").exists()


class _FileServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


def test_install_sh_checks_the_sha256_itself(tmp_path: Path, dist: Path):
    """A server that serves whatever it has (no check of its own): install.sh's own sha256 check
    refuses the tampered tarball before anything is installed."""
    root = tmp_path / "www"
    (root / "download").mkdir(parents=True)
    shutil.copy(dist / "SHA256SUMS", root / "download" / "SHA256SUMS")
    data = bytearray((dist / f"{LINUX}.tar.gz").read_bytes())
    data[1000] ^= 0x01
    (root / "download" / f"{LINUX}.tar.gz").write_bytes(bytes(data))
    cert, key = tls.ensure_certificate(tmp_path / "tls", ["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *args):
            pass

    httpd = _FileServer(("127.0.0.1", 0), Handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        prefix = tmp_path / "opt"
        script = REPO / "scripts" / "install.sh"
        url = f"https://127.0.0.1:{httpd.server_address[1]}"
        proc = _bash(f"bash {script} --server {url} --server-fingerprint {tls.fingerprint(cert)} "
                     "--token-id at-x "
                     f"--prefix {prefix} --no-prompt --no-service --pin '{tls.spki_pin(cert)}'", tmp_path,
                     env={"GO2CLOUD_TOKEN_CODE": "x"})
        assert proc.returncode == 5 and "sha256 mismatch" in proc.stderr, proc.stdout + proc.stderr
        assert not prefix.exists()
    finally:
        httpd.shutdown()
        httpd.server_close()


def _fake_bin(tmp_path: Path, drop: str = "", fake: Optional[Dict[str, str]] = None) -> Path:
    """A PATH directory with the tools install.sh uses, minus ``drop``, plus ``fake`` scripts."""
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    fake = fake or {}
    for tool in ("bash", "sh", "id", "uname", "tar", "gzip", "sha256sum", "mktemp", "grep", "sed", "tr",
                 "awk", "cut", "cat", "rm", "mkdir", "cp", "chmod", "mv", "basename", "curl", "env",
                 "setpriv", "ls"):
        found = shutil.which(tool)
        if tool != drop and tool not in fake and found:
            (fakebin / tool).symlink_to(found)
    for name, body in fake.items():
        script = fakebin / name
        assert not script.exists() and not script.is_symlink()  # never write through a link to the system
        script.write_text("#!/bin/sh\n" + body + "\n")
        script.chmod(0o755)
    return fakebin


@pytest.mark.parametrize("case", ["not_root", "no_curl", "arch", "no_pin", "usage", "prefix_in_use"])
def test_install_sh_environment_errors(case: str, tmp_path: Path):
    prefix = tmp_path / "opt"
    args = (f"--server https://127.0.0.1:9 --server-fingerprint sha256:{'1' * 64} --token-id at-x "
            f"--prefix {prefix} --no-service --pin sha256//{'A' * 43}=")
    script = REPO / "go2cloud_server" / "data" / "install.sh"
    expect = {"not_root": (3, "run as root"), "no_curl": (3, "curl is not installed"),
              "arch": (3, "unsupported architecture aarch64"), "no_pin": (2, "no public-key pin"),
              "usage": (2, "the token code is never an argument"),
              "prefix_in_use": (2, "is not empty and holds no go2cloud_client installation")}[case]
    if case == "prefix_in_use":  # e.g. --prefix /usr/local: never taken over (chmod 0700, uninstall)
        prefix.mkdir(mode=0o755)
        (prefix / "bin").mkdir()
    fakebin = _fake_bin(tmp_path, drop="curl" if case == "no_curl" else "",
                        fake={"uname": "echo aarch64"} if case == "arch" else None)
    cmd = f"bash {script} {args}"
    if case == "not_root":
        # fed on stdin as the one-liner does (the checkout may sit in a directory nobody cannot read)
        cmd = f"setpriv --reuid 65534 --regid 65534 --clear-groups bash -s -- {args} < {script}"
    elif case == "no_pin":
        cmd = cmd.replace(f" --pin sha256//{'A' * 43}=", "")
    elif case == "usage":
        cmd += " --token-code secret"
    # (nobody cannot enter the test's private tmp directory: the system PATH for that case)
    path = CLEAN_PATH if case == "not_root" else str(fakebin)
    proc = subprocess.run(["bash", "-c", cmd], cwd="/", capture_output=True, text=True, timeout=60,
                          env={"PATH": path})
    assert (proc.returncode, expect[1] in proc.stderr) == (expect[0], True), proc.stdout + proc.stderr
    assert "secret" not in proc.stdout + proc.stderr
    if case == "prefix_in_use":
        assert sorted(p.name for p in prefix.iterdir()) == ["bin"] and prefix.stat().st_mode & 0o777 == 0o755
    else:
        assert not prefix.exists()


def test_install_sh_cut_short_by_the_network_runs_nothing(tmp_path: Path) -> None:
    """``curl | bash`` runs what arrived: a script cut anywhere must be a syntax error, not half a run."""
    script = (REPO / "go2cloud_server" / "data" / "install.sh").read_bytes()
    body = script.index(b"\n{\n") + 3
    cuts = sorted({body, *range(body, len(script) - 2, max(1, (len(script) - body) // 12)), len(script) - 2})
    for cut in cuts:
        part = tmp_path / f"install-{cut}.sh"
        part.write_bytes(script[:cut])
        proc = subprocess.run(["bash", str(part), "--help"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode != 0 and proc.stdout == "", (cut, proc.stdout)
        assert "go2cloud install" not in proc.stderr, (cut, proc.stderr)
        assert "syntax error" in proc.stderr or "unexpected EOF" in proc.stderr, (cut, proc.stderr)
    whole = subprocess.run(["bash", str(REPO / "go2cloud_server" / "data" / "install.sh"), "--help"],
                           capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert whole.returncode == 0 and "usage: install.sh" in whole.stdout + whole.stderr
