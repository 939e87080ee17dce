"""The block receiver against a hostile source that holds a valid block task token (docs/security.md,
"Block receiver"): the real server (``go2cloud_server serve``) over HTTPS on loopback, the source
imported through the real agent API with an inventory it chose, its task started by the operator
CLI. Each test asserts that nothing was written where it was refused, that the server still
answers, and that another task is unaffected.

The findings: the receiver took any disk name of a task (unlimited disks, each up to 16 TiB), read
a request body (up to 16 MiB) before it checked the token, and verified generations one after the
other on one shared thread, so a source with a huge hole-only disk held up every other task's
verification (an 8 GiB hole-only disk cost the verifier 5 s with no data sent).
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import requests
import xxhash

from go2cloud_client.api import ControlPlane
from go2cloud_client.identity import Identity
from tests.support.harness import Server, wait_for

pytestmark = pytest.mark.integration

MiB = 1 << 20
GiB = 1 << 30
CS = 4 * MiB
#: sha256 of 8 GiB of zeros (``head -c 8589934592 /dev/zero | sha256sum``)
SHA256_8GIB_ZEROS = "ebfb4ef19ae410f190327b5ebd312711263bc7579970e87d9c1e2d84e06b3c25"


class HostileSource:
    """A source imported with an inventory of its choosing, whose block task the operator started:
    it holds the task's real token and speaks to the block receiver directly."""

    def __init__(self, server: Server, name: str, disks: Dict[str, int], task_disks: List[str]) -> None:
        self.server = server
        wg = f"wg-{name}"
        server.j("workgroup", "create", wg)
        code = server.new_code(wg)
        self.identity = Identity.generate()
        self.api = ControlPlane(server.url, fingerprint=server.fingerprint, identity=self.identity)
        inventory = {"hostname": name, "machine_id": f"m-{name}",
                     "disks": [{"name": n, "size_bytes": s, "partitions": []} for n, s in disks.items()]}
        doc = self.api.import_source(token_id=code["token_id"], token_code=code["token_code"],
                                     public_key=self.identity.public_key_b64, inventory=inventory)
        self.source_id = self.api.source_id = doc["source_id"]
        self.api.heartbeat({"agent_version": "0.1.0", "state": "idle"})
        args = ["migration", "start", "--source", self.source_id, "--mode", "block", "--no-drill"]
        for d in task_disks:
            args += ["--disk", d]
        server.j(*args)
        (self.start,) = [c for c in self.api.poll_commands(wait=0) if c["type"] == "start"]
        target = self.start["params"]["target"]
        self.task_id = self.start["params"]["task_id"]
        self.url = target["url"]
        self.token = target["token"]
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.token}"

    @property
    def block_dir(self) -> Path:
        return self.server.data_dir / "tasks" / self.task_id / "block"

    def files(self) -> List[str]:
        root = self.block_dir
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []

    def request(self, method: str, path: str, body: bytes = b"", **headers: str) -> requests.Response:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the self-signed certificate (the agent pins it)
            return self.http.request(method, f"{self.url}{path}", data=body, verify=False,
                                     headers={k.replace("_", "-"): v for k, v in headers.items()}, timeout=60)

    def holes(self, disk: str, count: int, disk_size: int, chunk_size: int = CS) -> requests.Response:
        return self.request("PUT", f"/disks/{disk}/chunks/0", X_Chunk_Size=str(chunk_size),
                            X_Disk_Size=str(disk_size), X_Encoding="hole", X_Chunk_Count=str(count))

    def commit(self, disk: str, hashes: bytes, disk_size: int, chunk_size: int = CS) -> requests.Response:
        return self.request("POST", f"/disks/{disk}/commit", hashes, X_Cycle="1", X_Disk_Size=str(disk_size),
                            X_Chunk_Size=str(chunk_size))

    def ack_cycle(self) -> None:
        """The agent's "cycle 1 done": the control plane makes the generations and queues their
        verification."""
        self.api.ack(self.start["id"], "succeeded", result={})


def zero_hashes(disk_size: int, chunk_size: int = CS) -> bytes:
    count = -(-disk_size // chunk_size)
    last = disk_size - (count - 1) * chunk_size
    return xxhash.xxh3_128(bytes(chunk_size)).digest() * (count - 1) + xxhash.xxh3_128(bytes(last)).digest()


def artifact(server: Server, task_id: str) -> Optional[Dict[str, Any]]:
    token = (server.data_dir / "admin.token").read_text().strip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = requests.get(f"{server.url}/api/v1/tasks/{task_id}/artifacts", verify=False, timeout=30,
                         headers={"Authorization": f"Bearer {token}"})
    r.raise_for_status()
    arts = r.json()["artifacts"]
    return arts[0] if arts else None


def rchar(pid: int) -> int:
    """Bytes the process read through read(2)/pread(2) so far, page cache or not."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/PID/io")


def raw_request(server: Server, head: str, *, until_closed: bool) -> bytes:
    """Send only the request line and headers over TLS (no body: the server would wait 90 s for
    it) and return the answer, which must come within 20 s. ``until_closed``: also wait for the
    server to close the connection (else stop once the answer is complete)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    host, port = server.url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        with ctx.wrap_socket(sock) as tls:
            tls.sendall(head.encode())
            answer = b""
            try:
                while True:
                    got = tls.recv(65536)
                    if not got:
                        return answer  # the server closed the connection after its answer
                    answer += got
                    head_end = answer.find(b"\r\n\r\n")
                    if head_end >= 0 and not until_closed:
                        length = int(answer.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
                        if len(answer) >= head_end + 4 + length:
                            return answer
            except socket.timeout:
                raise AssertionError(f"no answer (or no close) within 20 s: the server waits for the body; "
                                     f"got {answer!r}") from None


@pytest.fixture
def victim(server: Server) -> HostileSource:
    """Another source's task with a committed disk: what a hostile source must not disturb."""
    src = HostileSource(server, "victim", {"vdb": 64 * MiB}, ["/dev/vdb"])
    assert src.holes("vdb", 16, 64 * MiB).status_code == 200
    assert src.commit("vdb", zero_hashes(64 * MiB), 64 * MiB).status_code == 200
    return src


def assert_victim_intact(victim: HostileSource) -> None:
    r = victim.request("GET", "/disks/vdb")
    assert r.status_code == 200 and r.json()["committed_cycle"] == 1 and r.json()["disk_size"] == 64 * MiB
    assert victim.files() == ["vdb", "vdb/committed.hashes", "vdb/current.img", "vdb/state.json"]


def test_a_disk_the_task_did_not_declare_is_refused_and_nothing_is_created(server: Server, victim):
    src = HostileSource(server, "evil1", {"vdb": 64 * MiB}, ["/dev/vdb"])
    data = b"x" * CS
    xxh = xxhash.xxh3_128(data).hexdigest()
    geo = {"X_Chunk_Size": str(CS), "X_Disk_Size": str(64 * MiB)}
    for disk in ("vdc", "evil", "vdb-2", "..x", victim.task_id):
        assert src.holes(disk, 16, 64 * MiB).status_code == 404
        r = src.request("PUT", f"/disks/{disk}/chunks/1", data, X_Encoding="raw", X_Chunk_Xxh3=xxh, **geo)
        assert r.status_code == 404 and "not a disk of this task" in r.json()["error"]["message"]
        assert src.commit(disk, zero_hashes(64 * MiB), 64 * MiB).status_code == 404
        assert src.request("GET", f"/disks/{disk}").status_code == 404
        assert src.request("POST", f"/disks/{disk}/verify", struct.pack(">I16s", 0, bytes(16)),
                           X_Chunk_Size=str(CS)).status_code == 404
    assert src.files() == []  # not even a directory
    # its own disk works; the other task is untouched
    assert src.holes("vdb", 16, 64 * MiB).status_code == 200
    assert src.files() == ["vdb", "vdb/current.img"]
    assert_victim_intact(victim)


def test_a_disk_larger_than_the_source_reported_is_refused(server: Server, victim):
    src = HostileSource(server, "evil2", {"vdb": 64 * MiB}, ["/dev/vdb", "/srv/disk.img"])
    huge = 16 << 40
    r = src.holes("vdb", 1, huge)
    assert r.status_code == 403 and r.json()["error"]["code"] == "disk_too_large"
    assert "inventory" in r.json()["error"]["message"]
    assert src.holes("vdb", 1, 64 * MiB + CS).status_code == 403
    # a commit claiming a huge disk is refused from its headers (its 64 MiB of hashes never read)
    assert src.commit("vdb", zero_hashes(huge), huge).status_code == 403
    assert src.files() == []
    # an image file: no size in the inventory, so its first write pins its size for the task
    assert src.holes("disk.img", 8, 32 * MiB).status_code == 200
    r = src.holes("disk.img", 1, 1 << 40)
    assert r.status_code == 403 and "first write" in r.json()["error"]["message"]
    assert src.commit("disk.img", zero_hashes(33 * MiB), 33 * MiB).status_code == 403
    assert src.commit("disk.img", zero_hashes(32 * MiB), 32 * MiB).status_code == 200
    assert (src.block_dir / "disk.img" / "current.img").stat().st_size == 32 * MiB
    # a chunk past the disk's declared end, a verify that reads one chunk many times
    assert src.holes("disk.img", 1, 32 * MiB).status_code == 200
    r = src.request("PUT", "/disks/disk.img/chunks/8", X_Chunk_Size=str(CS), X_Disk_Size=str(32 * MiB),
                    X_Encoding="hole")
    assert r.status_code == 400 and "index" in r.json()["error"]["message"]
    r = src.request("POST", "/disks/disk.img/verify", struct.pack(">I16s", 0, bytes(16)) * 65536,
                    X_Chunk_Size=str(CS))
    assert r.status_code == 400 and "twice" in r.json()["error"]["message"]
    assert sorted(src.files()) == ["disk.img", "disk.img/committed.hashes", "disk.img/current.img",
                                   "disk.img/size.json", "disk.img/state.json"]
    assert_victim_intact(victim)
    assert server.proc is not None and server.proc.poll() is None


def test_a_refused_request_is_answered_before_its_body_is_read(server: Server, victim):
    src = HostileSource(server, "evil3", {"vdb": 64 * MiB}, ["/dev/vdb"])
    path = f"/block/v1/tasks/{src.task_id}/disks"
    big = 16 * MiB

    def head(token: str, disk: str, disk_size: int) -> str:
        return (f"POST {path}/{disk}/chunks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"X-Chunk-Size: {CS}\r\nX-Disk-Size: {disk_size}\r\nContent-Length: {big}\r\n\r\n")

    # not the task's request: answered at once, the connection closed (the body is never read)
    for token in (src.token + "x", victim.token, ""):  # a wrong token, another task's, none
        answer = raw_request(server, head(token, "vdb", 64 * MiB), until_closed=True)
        first, _, rest = answer.partition(b"\r\n")
        assert first.split()[1] == b"401" and b"Connection: close" in rest, answer
    # and when the client does send the 16 MiB, the server reads at most a little of it
    assert server.proc is not None
    before = rchar(server.proc.pid)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    host, port = server.url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as sock, ctx.wrap_socket(sock) as tls:
        tls.sendall(head(src.token + "x", "vdb", 64 * MiB).encode())
        try:
            tls.sendall(bytes(big))
        except OSError:
            pass  # the server closed the connection
        try:
            while tls.recv(65536):
                pass
        except OSError:
            pass
    read = rchar(server.proc.pid) - before
    assert read < 4 * MiB, f"the server read {read} bytes of a refused 16 MiB body"
    # the task's own refused request: answered at once too, from its headers
    for disk, size, status in (("evil", 64 * MiB, b"404"),  # not a disk of the task
                               ("vdb", 1 << 40, b"403")):  # larger than the source reported
        answer = raw_request(server, head(src.token, disk, size), until_closed=False)
        assert answer.split()[1] == status, answer
    assert src.files() == []
    assert_victim_intact(victim)


def test_a_hole_only_disk_is_verified_without_reading_it_and_does_not_hold_up_another_task(
        server: Server, victim):
    big = HostileSource(server, "huge", {"vdb": 8 * GiB}, ["/dev/vdb"])
    small = HostileSource(server, "small", {"vdb": 64 * MiB}, ["/dev/vdb"])
    assert big.holes("vdb", 8 * GiB // CS, 8 * GiB).status_code == 200
    assert big.commit("vdb", zero_hashes(8 * GiB), 8 * GiB).status_code == 200
    data = bytes(range(256)) * (CS // 256)
    r = small.request("PUT", "/disks/vdb/chunks/3", data, X_Chunk_Size=str(CS), X_Disk_Size=str(64 * MiB),
                      X_Encoding="raw", X_Chunk_Xxh3=xxhash.xxh3_128(data).hexdigest())
    assert r.status_code == 200
    hashes = bytearray(zero_hashes(64 * MiB))
    hashes[3 * 16:4 * 16] = xxhash.xxh3_128(data).digest()
    assert small.commit("vdb", bytes(hashes), 64 * MiB).status_code == 200

    assert server.proc is not None
    read_before = rchar(server.proc.pid)
    big.ack_cycle()  # the huge generation is queued first...
    small.ack_cycle()  # ...the small one right after it
    done = wait_for(lambda: (a := artifact(server, small.task_id)) and a["sha256"] and a, 120,
                    "the small task's generation to be verified")
    assert done["report"]["state"] == "verified"
    huge = artifact(server, big.task_id)
    assert huge is not None and huge["sha256"] is None and huge["report"]["state"] == "pending", (
        "the small task's generation waited until the huge one was verified")

    huge = wait_for(lambda: (a := artifact(server, big.task_id)) and a["sha256"] and a, 300,
                    "the huge generation to be verified")
    assert huge["sha256"] == SHA256_8GIB_ZEROS and huge["bytes"] == 8 * GiB
    read = rchar(server.proc.pid) - read_before
    assert read < 64 * MiB, f"the server read {read} bytes to verify 8 GiB of holes and 64 MiB of data"
    assert_victim_intact(victim)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/PID/status")


def test_many_concurrent_bodies_of_one_task_hold_a_bounded_amount_of_memory(server: Server, victim):
    """64 connections of one task, each sending a 16 MiB batch but its last byte: the server holds
    at most the task's in-flight limit (256 MiB) of bodies; the others wait, holding nothing (the
    server used to fill a 16 MiB buffer per connection: 1 GiB here, unbounded with more)."""
    src = HostileSource(server, "evil4", {"vdb": 64 * MiB}, ["/dev/vdb"])
    assert server.proc is not None
    before = rss(server.proc.pid)
    big = 16 * MiB
    head = (f"POST /block/v1/tasks/{src.task_id}/disks/vdb/chunks HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {src.token}\r\nX-Chunk-Size: {CS}\r\nX-Disk-Size: {64 * MiB}\r\n"
            f"Content-Length: {big}\r\n\r\n").encode()
    body = bytes(big - 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    host, port = server.url.split("//", 1)[1].rsplit(":", 1)
    conns: List[ssl.SSLSocket] = []
    sent: List[int] = []
    lock = threading.Lock()

    def send(tls: ssl.SSLSocket) -> None:
        try:
            tls.sendall(head)
            tls.sendall(body)  # blocks while the server does not read this request's body
        except OSError:
            return
        with lock:
            sent.append(1)

    threads = []
    try:
        for _ in range(64):
            tls = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=120))
            conns.append(tls)
            threads.append(threading.Thread(target=send, args=(tls,), daemon=True))
            threads[-1].start()
        wait_for(lambda: len(sent) >= 16, 120, "16 bodies taken in")
        # no waiting for "long enough": the server answers each of the other 48 requests 503
        # (target_busy) once it waited its busy time (30 s) for room; count its answers in its log
        refused = f"POST /block/v1/tasks/{src.task_id}/disks/vdb/chunks -> 503"

        def all_others_refused() -> bool:
            assert len(sent) <= 16, f"the server took in {len(sent)} bodies of 16 MiB of one task at once"
            return Path(server.log.name).read_text(errors="replace").count(refused) >= 64 - 16

        wait_for(all_others_refused, 120, "the server to refuse the 48 requests that found no room")
        for th in threads:  # a refused sender's sendall fails: every sender's outcome is known now
            th.join(30)
        assert not any(th.is_alive() for th in threads)
        taken, grown = len(sent), rss(server.proc.pid) - before
        # another task is served meanwhile
        assert victim.holes("vdb", 16, 64 * MiB).status_code == 200
        assert victim.request("GET", "/disks/vdb").status_code == 200
    finally:
        for tls in conns:
            try:
                tls.close()
            except OSError:
                pass
    assert taken <= 16, f"the server took in {taken} bodies of 16 MiB of one task at once"
    assert grown < 400 * MiB, f"the server's memory grew by {grown} bytes"
    assert src.files() == []
    assert server.proc.poll() is None
