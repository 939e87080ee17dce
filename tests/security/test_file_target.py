"""Attacks on the file-level target (docs/security.md, "File-level data").

A hostile source holds valid credentials: it imported with a real code and received its task's
rsync password in the ``start`` command, as every source does. It drives a real rsync through
the agent's real tunnel against the real server, with options an honest agent never uses. After
each attack the committed image is compared with its manifest from before (bit for bit), the
tree holds nothing outside the cycle being written, and the server still starts and serves.

A network observer: tcpdump captures the loopback traffic of a real migration at compression 0;
no byte sequence of the migrated file appears in it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from go2cloud_server import manifest
from tests.support.fakeagent import Api, FakeAgent
from tests.support.harness import REPO, Server, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot daemon, owners)"),
]


class HostileSource:
    """A source with valid credentials that runs rsync by hand through the agent's tunnel."""

    def __init__(self, server: Server, tmp: Path, name: str = "evil") -> None:
        self.server = server
        self.api = Api(server)
        wg = f"wg-{name}"
        server.j("workgroup", "create", wg)
        self.agent = FakeAgent(self.api, hostname=name, machine_id=f"m-{name}")
        assert self.agent.import_(server.new_code(wg)).status_code == 201
        self.agent.login()
        self.agent.heartbeat()
        self.src = tmp / f"{name}-src"
        self.src.mkdir()
        (self.src / "etc").mkdir()
        (self.src / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (self.src / "data.bin").write_bytes(os.urandom(64 * 1024))
        out = server.j("migration", "start", "--workgroup", wg, "--path", str(self.src), "--no-drill")
        self.task_id = out["started"][0]["task_id"]
        start = self.agent.commands()[0]
        self.target: Dict[str, Any] = start["params"]["target"]
        self.tree = server.data_dir / "tasks" / self.task_id / "tree"
        assert self.agent.ack(start["id"], "accepted").status_code == 200
        self.pending = start

    def rsync(self, *args: str, cycle: int, dest: str, path: Optional[str] = None,
              password: Optional[str] = None, src: Optional[Path] = None) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env.update({
            "PYTHONPATH": str(REPO),
            "RSYNC_PASSWORD": password if password is not None else self.target["password"],
            "GO2CLOUD_RSYNC_URL": self.target["url"],
            "GO2CLOUD_RSYNC_FINGERPRINT": self.target["fingerprint"],
            "GO2CLOUD_RSYNC_CYCLE": str(cycle),
            "GO2CLOUD_RSYNC_PATH": path or str(self.src),
        })
        tunnel = f"{sys.executable} -m go2cloud_client rsync-tunnel"
        source = str(src or self.src) + "/"
        cmd = ["rsync", "-aHAX", "--numeric-ids", "--mkpath", "--modify-window=-1", *args,
               "-e", tunnel, "--", source,
               f"{self.task_id}@go2cloud::{self.task_id}/{dest}"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)

    def dest(self, cycle: int) -> str:
        return f"{cycle:06d}/{str(self.src).lstrip('/')}/"

    def commit(self, cmd: Dict[str, Any]) -> None:
        assert self.agent.ack(cmd["id"]).status_code == 200

    def next_cycle(self) -> Dict[str, Any]:
        self.server.j("migration", "sync", "--source", self.agent.source_id)
        cmd = self.agent.commands()[0]
        assert self.agent.ack(cmd["id"], "accepted").status_code == 200
        return cmd


def _top(tree: Path) -> List[str]:
    return sorted(os.listdir(tree))


@pytest.fixture
def hostile(server: Server, tmp_path: Path) -> HostileSource:
    h = HostileSource(server, tmp_path)
    ok = h.rsync(cycle=1, dest=h.dest(1))  # an honest first cycle
    assert ok.returncode == 0, ok.stderr
    h.commit(h.pending)
    h.next_cycle()  # cycle 2 is being written now
    return h


def test_a_source_cannot_touch_its_committed_image_or_write_records(hostile: HostileSource, tmp_path: Path):
    h = hostile
    image1 = h.tree / "000001"
    before = manifest.build(image1)
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "etc").mkdir()
    (evil / "etc" / "passwd").write_text("root::0:0:owned:/:/bin/sh\n")
    (evil / "000003.json").write_text('{"cycle": 3}')
    attacks = [
        ([], "000001/"),  # straight into the committed image
        ([], h.dest(1)),
        (["--delete"], "000001/"),  # or delete from it
        ([], ""),  # the tree root, where records used to live
        ([], "000003/"),  # a cycle nobody asked for
        ([f"--partial-dir=../../../000001/{str(h.src).lstrip('/')}/p"], h.dest(2)),
        (["--temp-dir=/000001"], h.dest(2)),
        (["--inplace"], h.dest(2)),
        (["--backup", "--backup-dir=/000001/bk"], h.dest(2)),
        (["--keep-dirlinks"], h.dest(2)),
        ([f"--link-dest=/000001/{str(h.src).lstrip('/')}", "--write-devices"], h.dest(2)),
        (["--copy-dest=/000001"], h.dest(2)),
    ]
    for args, dest in attacks:
        proc = h.rsync(*args, cycle=2, dest=dest, src=evil)
        assert proc.returncode != 0, (args, dest, proc.stdout, proc.stderr)
    assert manifest.diff(before, manifest.build(image1)) == []
    assert _top(h.tree) == ["000001", "000002"]
    assert not (h.tree / "000002" / "000003.json").exists()
    leftovers = [p for p in (h.tree / "000002").rglob("*") if "owned" in (p.read_text(errors="ignore")
                                                                           if p.is_file() else "")]
    assert leftovers == []
    # the honest cycle 2 still works afterwards, and links unchanged files to cycle 1
    ok = h.rsync(f"--link-dest=../../{'../' * (len(str(h.src).strip('/').split('/')) - 1)}000001/"
                 f"{str(h.src).lstrip('/')}", "--partial", cycle=2, dest=h.dest(2))
    assert ok.returncode == 0, ok.stderr
    assert manifest.diff(manifest.build(h.src), manifest.build(h.tree / h.dest(2))) == []


def test_a_second_session_cannot_change_the_committed_image_through_hard_links(hostile: HostileSource):
    h = hostile
    image1 = h.tree / "000001"
    before = manifest.build(image1)
    depth = len(str(h.src).strip("/").split("/"))
    link = f"--link-dest={'../' * (depth + 1)}000001/{str(h.src).lstrip('/')}"
    first = h.rsync(link, cycle=2, dest=h.dest(2))  # links every unchanged file to cycle 1
    assert first.returncode == 0, first.stderr
    linked = h.tree / h.dest(2) / "etc" / "passwd"
    assert os.lstat(linked).st_ino == os.lstat(image1 / str(h.src).lstrip("/") / "etc" / "passwd").st_ino
    # the same cycle again with other owners and modes: rsync would chown/chmod the shared inodes
    os.chmod(h.src / "etc" / "passwd", 0o666)
    os.chown(h.src / "data.bin", 4321, 4321)
    again = h.rsync(cycle=2, dest=h.dest(2))
    assert again.returncode == 0, again.stderr
    assert manifest.diff(before, manifest.build(image1)) == []
    assert manifest.diff(manifest.build(h.src), manifest.build(h.tree / h.dest(2))) == []
    # the link-dest directory itself as the destination: its attributes are put back
    dirpath = image1 / str(h.src).lstrip("/")
    os.chmod(h.src, 0o777)
    h.rsync(link, cycle=2, dest=f"000001/{str(h.src).lstrip('/')}/")
    assert manifest.diff(before, manifest.build(image1)) == []
    assert (os.lstat(dirpath).st_mode & 0o777) != 0o777


def test_sessions_are_refused_without_the_right_task_cycle_and_never_two_at_once(
        server: Server, hostile: HostileSource, tmp_path: Path):
    h = hostile
    other = HostileSource(server, tmp_path, name="other")
    # another task's password, a wrong one, a committed cycle, a path of no task
    for kw in ({"password": other.target["password"]}, {"password": "wrong"}, {"cycle": 1},
               {"path": "/etc"}):
        params = {"cycle": 2, "dest": h.dest(2), **kw}
        proc = h.rsync(**params)  # type: ignore[arg-type]
        assert proc.returncode != 0 and "refused the rsync session" in proc.stderr, (kw, proc.stderr)
    log_text = Path(server.log.name).read_text(errors="replace")
    assert other.target["password"] not in log_text and h.target["password"] not in log_text
    # one session per task: a second one ends the first before it starts (the newest connection of
    # a task wins: an agent that reconnected after a cut must not wait for the old one to time out)
    big = tmp_path / "big"
    big.mkdir()
    (big / "blob").write_bytes(os.urandom(8 * 1024 * 1024))
    env = dict(os.environ, PYTHONPATH=str(REPO), RSYNC_PASSWORD=h.target["password"],
               GO2CLOUD_RSYNC_URL=h.target["url"], GO2CLOUD_RSYNC_FINGERPRINT=h.target["fingerprint"],
               GO2CLOUD_RSYNC_CYCLE="2", GO2CLOUD_RSYNC_PATH=str(h.src))
    tunnel = f"{sys.executable} -m go2cloud_client rsync-tunnel"
    slow = subprocess.Popen(
        ["rsync", "-a", "--mkpath", "--bwlimit=512", "-e", tunnel, "--",
         f"{big}/", f"{h.task_id}@go2cloud::{h.task_id}/{h.dest(2)}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        sessions = server.data_dir / "rsync-sessions"
        wait_for(lambda: sessions.is_dir() and any(p.name.startswith(h.task_id) for p in sessions.iterdir()),
                 20, "the first session")
        second = h.rsync(cycle=2, dest=h.dest(2))
        assert second.returncode == 0, second.stderr
        assert slow.wait(30) != 0, "the first session was not ended"
        assert "connection" in slow.stderr.read().decode(errors="replace").lower()
        # the cycle is committed while a slow session still writes: the session is ended first
        slow = subprocess.Popen(slow.args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        wait_for(lambda: sessions.is_dir() and any(p.name.startswith(h.task_id) for p in sessions.iterdir()),
                 20, "the slow session")
        cmd = h.agent.commands()[0]
        h.commit(cmd)
        assert slow.wait(30) != 0
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    assert not sessions.exists() or not os.listdir(sessions)


def test_an_upgrade_without_the_rsync_alpn_is_refused_before_any_daemon_starts(
        server: Server, hostile: HostileSource):
    """The rsync stream runs only on connections whose TLS ClientHello announced
    ``go2cloud-rsync`` (ALPN): those get TLS in memory, safe to read and write from two threads.
    A client that asks for the upgrade on an ordinary TLS connection gets a clear 400 and no
    daemon, even with the right credentials."""
    import json
    import socket
    import ssl
    from urllib.parse import urlsplit

    h = hostile
    url = urlsplit(h.target["url"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((url.hostname, url.port), timeout=20) as raw, \
            ctx.wrap_socket(raw, server_hostname=url.hostname) as sock:
        sock.sendall((f"POST {url.path}/session HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: Bearer {h.target['password']}\r\nX-Go2cloud-Cycle: 2\r\n"
                      f"X-Go2cloud-Path: {h.src}\r\nConnection: Upgrade\r\nUpgrade: go2cloud-rsync\r\n"
                      "Content-Length: 0\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert "did not announce the go2cloud-rsync protocol" in json.loads(body)["error"]["message"]
    sessions = server.data_dir / "rsync-sessions"
    assert not sessions.exists() or not os.listdir(sessions)
    # the agent's tunnel announces it, so the same credentials work through it
    ok = h.rsync(cycle=2, dest=h.dest(2))
    assert ok.returncode == 0, ok.stderr


def test_the_server_starts_whatever_a_task_left_on_disk(server: Server, tmp_path: Path):
    victim = HostileSource(server, tmp_path, name="victim")
    bystander = HostileSource(server, tmp_path, name="bystander")
    assert bystander.rsync(cycle=1, dest=bystander.dest(1)).returncode == 0
    # the victim's tree is not a directory any more (what a broken disk or a bad restore leaves)
    shutil.rmtree(victim.tree)
    victim.tree.write_text("not a directory")
    # and records in the old format, written where the source used to be able to write them
    (bystander.tree / "000001.json").write_text('{"cycle": 1}')
    (bystander.tree / "000002.json").write_text("garbage")
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    server.start()
    shown = server.source_migration(victim.agent.source_id)["tasks"][0]
    assert shown["status"] == "failed" and shown["error"]["code"] == "target_state_invalid", shown
    assert "cannot be prepared" in shown["error"]["message"]
    human = server.cli("migration", "show", "--source", victim.agent.source_id, json_out=False).stdout
    assert "target_state_invalid" in human or "cannot be prepared" in human
    # the bystander goes on: its cycle 1 commits and its image is there
    bystander.agent.login()
    cmd = bystander.pending
    bystander.commit(cmd)
    assert server.task_status(bystander.agent.source_id) == "pending"
    assert manifest.diff(manifest.build(bystander.src),
                         manifest.build(bystander.tree / bystander.dest(1))) == []


def test_a_network_observer_sees_no_migrated_byte(server: Server, agents, tmp_path: Path):
    tcpdump = shutil.which("tcpdump")
    assert tcpdump, "tcpdump is not installed: run ./scripts/setup.sh as root"
    src = tmp_path / "secret-src"
    src.mkdir()
    marker = b"G2C-CANARY-" + os.urandom(8).hex().encode() + b"-"
    (src / "secret.txt").write_bytes(marker * 20000)  # ~600 KiB, compressible: compression 0 sends it all
    (src / "blob").write_bytes(os.urandom(256 * 1024))
    pcap = tmp_path / "lo.pcap"
    cap = subprocess.Popen(
        [tcpdump, "-i", "lo", "-U", "-s", "0", "-w", str(pcap), "tcp", "port", str(server.port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: pcap.exists(), 10, "tcpdump to start")
        time.sleep(0.5)
        server.j("workgroup", "create", "wg-net")
        agent = agents("net").start(code=server.new_code("wg-net"))
        sid = agent.wait_imported()
        server.j("migration", "start", "--workgroup", "wg-net", "--path", str(src), "--compression", "0",
                 "--no-drill")
        task = server.wait_task(sid, "pending", timeout=120)
        image = server.data_dir / "tasks" / task["task_id"] / "tree" / "000001" / str(src).lstrip("/")
        assert (image / "secret.txt").read_bytes() == marker * 20000
    finally:
        time.sleep(0.5)
        cap.send_signal(signal.SIGINT)
        cap.wait(10)
    captured = pcap.read_bytes()
    assert len(captured) > 600 * 1024, "the capture holds less than the data migrated: nothing was observed"
    assert marker not in captured
    assert marker[:16] not in captured
    assert (src / "blob").read_bytes()[:64] not in captured
