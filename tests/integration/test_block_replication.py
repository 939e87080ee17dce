"""Block replication end to end: the real engine, the real HTTPS server of go2cloud_server with
its block receiver (in this process, tests/support/blockserver.py), real ext4/xfs filesystems in
image files and on loop devices, kill -9 of an engine process. Every check compares the
target's generation with the source bit for bit (sha256)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

import pytest
import requests
import xxhash

from go2cloud_client.replication.base import TransferCancelled
from go2cloud_client.replication.block import (
    BlockCycle,
    BlockOptions,
    BlockReplicator,
    BlockSourceError,
    BlockTarget,
    BlockTargetFullError,
    Disk,
    adaptive,
)
from go2cloud_server.blockstore import BlockTaskStore
from tests.support.blockserver import BlockServer

pytestmark = [pytest.mark.integration, pytest.mark.root]
ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
CS = 256 * 1024


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    assert os.geteuid() == 0, "block integration tests need root (loop devices, mount)"


def run(*args: str) -> str:
    return subprocess.run(list(args), check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300).stdout


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            buf = f.read(4 * MiB)
            if not buf:
                return h.hexdigest()
            h.update(buf)


@contextmanager
def loop_device(image: Path) -> Iterator[str]:
    dev = run("losetup", "--find", "--show", "--", str(image)).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@contextmanager
def mounted(image: Path, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    run("mount", "-o", "loop", "--", str(image), str(where))
    try:
        yield where
    finally:
        run("umount", str(where))


WORDS = ["migration", "block", "chunk", "zstd", "server", "disk", "cloud", "snapshot", "\n"]


def text_image(image: Path, seed: int, copies: int) -> None:
    """An image of ``copies`` x 8 MiB of text made of WORDS: every chunk compresses well."""
    rnd = random.Random(seed)
    text = " ".join(rnd.choice(WORDS) for _ in range(2 * MiB)).encode()[:8 * MiB]
    assert len(text) == 8 * MiB
    image.write_bytes(text * copies)


def make_fs(image: Path, fs: str, size: int, work: Path, seed: int = 1) -> None:
    """A filesystem with real content: random files, text, copies of /usr binaries, a zeroed file."""
    with open(image, "wb") as f:
        f.truncate(size)
    if fs == "ext4":
        run("mkfs.ext4", "-q", "-F", "--", str(image))
    else:
        run("mkfs.xfs", "-q", "-f", "--", str(image))
    rnd = random.Random(seed)
    with mounted(image, work / "mnt") as mnt:
        (mnt / "random").mkdir()
        for i in range(8):
            (mnt / "random" / f"r{i}.bin").write_bytes(rnd.randbytes(rnd.randint(256 * 1024, 3 * MiB)))
        (mnt / "text").mkdir()
        for i in range(20):
            (mnt / "text" / f"t{i}.txt").write_text(" ".join(rnd.choice(WORDS) for _ in range(40000)))
        (mnt / "bin").mkdir()
        for name in ("bash", "ls", "cp", "tar", "python3"):
            src = shutil.which(name)
            if src:
                shutil.copy(os.path.realpath(src), mnt / "bin" / name)
        (mnt / "zeros.dat").write_bytes(bytes(4 * MiB))
        os.sync()


def change_fs(image: Path, work: Path, seed: int) -> None:
    rnd = random.Random(seed)
    with mounted(image, work / "mnt") as mnt:
        (mnt / "random" / "r0.bin").unlink()
        (mnt / "new").mkdir(exist_ok=True)
        for i in range(3):
            (mnt / "new" / f"n{seed}-{i}.bin").write_bytes(rnd.randbytes(MiB))
        with open(mnt / "text" / "t3.txt", "a") as f:
            f.write("appended line\n" * 1000)
        os.sync()


def replicator(server: BlockServer, path: str, state: Path, **opts) -> BlockReplicator:
    opts.setdefault("chunk_size", CS)
    return BlockReplicator(target=BlockTarget(server.url, server.token, server.fingerprint),
                           disks=[Disk("d0", path)], options=BlockOptions(**opts), state_dir=state)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BlockServer]:
    srv = BlockServer(tmp_path / "server").start()
    yield srv
    srv.stop()


class WriteCounter:
    """Counts the chunk writes the store receives per index (data chunks only; a single chunk's
    PUT is a batch of one in the store)."""

    def __init__(self, store: BlockTaskStore) -> None:
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        real_batch = store.write_batch

        def write_batch(disk, chunk_size, disk_size, items):
            real_batch(disk, chunk_size, disk_size, items)
            with self._lock:
                for index, _count, data, _xxh3, _b3 in items:
                    if data is not None:
                        self.counts[index] += 1

        store.write_batch = write_batch  # type: ignore[method-assign]

    def resent(self) -> int:
        return sum(n - 1 for n in self.counts.values() if n > 1)


# -- full and incremental on real filesystems ----------------------------------------------------
@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_filesystem_image_full_then_incremental(tmp_path: Path, server: BlockServer, fs: str) -> None:
    image = tmp_path / f"{fs}.img"
    size = 160 * MiB if fs == "ext4" else 320 * MiB  # mkfs.xfs wants more than 300 MB
    make_fs(image, fs, size, tmp_path)
    seen: List = []
    # ext4: replicate the image file; xfs: replicate it through a loop device (a block device)
    with (loop_device(image) if fs == "xfs" else _nullpath(image)) as path:
        rep = replicator(server, path, tmp_path / "state", checksum=True)
        rep.on_progress = seen.append
        r1 = rep.run_cycle(BlockCycle(1, False), threading.Event())
    gen1 = server.generation(1)[0]
    assert gen1["sha256"] == sha256(image)
    assert gen1["fs"] == fs and gen1["check"]["ok"], gen1["check"]
    assert gen1["bytes"] == size
    assert r1.chunks_total == size // CS and r1.chunks_holes > 0 and r1.verify_rounds == 1
    last = seen[-1].paths[0]
    assert last.state == "done" and last.bytes_done == last.bytes_total == size
    assert last.bytes_zero == r1.bytes_zero > 0 and last.bytes_sent == r1.bytes_sent
    assert r1.bytes_sent < r1.bytes_total - r1.bytes_zero  # text and binaries compressed

    change_fs(image, tmp_path, seed=2)
    with (loop_device(image) if fs == "xfs" else _nullpath(image)) as path:
        rep = replicator(server, path, tmp_path / "state", checksum=True)
        r2 = rep.run_cycle(BlockCycle(2, True), threading.Event())
    gen2 = server.generation(2)[0]
    assert gen2["sha256"] == sha256(image)
    assert gen2["check"]["ok"], gen2["check"]
    assert r2.chunks_unchanged > 0.8 * r2.chunks_total
    assert server.generation(1)[0]["sha256"] == gen1["sha256"]  # generation 1 untouched
    assert sha256(Path(gen1["path"])) == gen1["sha256"]


@contextmanager
def _nullpath(path: Path) -> Iterator[str]:
    yield str(path)


def test_incremental_sends_about_the_changed_chunks(tmp_path: Path, server: BlockServer) -> None:
    image = tmp_path / "disk.img"
    rnd = random.Random(7)
    image.write_bytes(rnd.randbytes(64 * MiB))  # 256 chunks of 256 KiB
    rep = replicator(server, str(image), tmp_path / "state")
    r1 = rep.run_cycle(BlockCycle(1, False), threading.Event())
    assert r1.chunks_sent == 256
    server.generation(1)
    changed = sorted(rnd.sample(range(256), 13))  # ~5%
    with open(image, "r+b") as f:
        for i in changed:
            f.seek(i * CS + rnd.randrange(CS - 100))
            f.write(rnd.randbytes(100))
    r2 = rep.run_cycle(BlockCycle(2, True), threading.Event())
    assert r2.chunks_sent == 13 and r2.chunks_unchanged == 243
    assert 13 * CS <= r2.bytes_sent <= 14 * CS
    assert server.generation(2)[0]["sha256"] == sha256(image)

    # with changed extents from a snapshot driver, only those chunks are even read
    changed2 = sorted(rnd.sample(range(256), 13))
    with open(image, "r+b") as f:
        for i in changed2:
            f.seek(i * CS)
            f.write(rnd.randbytes(4096))
    asked: List[str] = []

    def extents(disk: str):
        asked.append(disk)
        return [(i * CS, 4096) for i in changed2]

    rep3 = BlockReplicator(target=rep.target, disks=rep.disks, options=rep.options,
                           state_dir=rep.state_dir, changed_extents=extents)
    r3 = rep3.run_cycle(BlockCycle(3, True), threading.Event())
    assert asked == ["d0"] and r3.chunks_sent == 13 and r3.bytes_read == 13 * CS
    assert server.generation(3)[0]["sha256"] == sha256(image)


# -- interruption --------------------------------------------------------------------------------
def _spawn(server: BlockServer, path: Path, state: Path, cycle: int, incremental: bool,
           mbps: int) -> subprocess.Popen:
    env = {**os.environ, "G2C_BLOCK_TOKEN": server.token, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.block_agent", server.url, "-", server.fingerprint, str(path),
         str(state), str(cycle), "1" if incremental else "0", str(mbps)],
        cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_kill_9_at_random_points_resumes_with_bounded_resend(tmp_path: Path, server: BlockServer) -> None:
    image = tmp_path / "disk.img"
    rnd = random.Random(11)
    image.write_bytes(rnd.randbytes(96 * MiB))  # 384 chunks, incompressible
    counter = WriteCounter(server.store)
    state = tmp_path / "state"
    # inflight_window of the child (2 workers, 256 KiB chunks): 2 being read + a batch queued +
    # a batch per sender (16 chunks each)
    window = BlockReplicator(target=BlockTarget(server.url, server.token, server.fingerprint),
                             disks=[Disk("d0", str(image))], state_dir=tmp_path / "unused",
                             options=BlockOptions(chunk_size=CS, workers=2)).inflight_window
    assert window == 2 + 16 + 2 * 16
    kills = 0
    for _ in range(4):
        proc = _spawn(server, image, state, 1, False, mbps=48)  # 6 MB/s: ~16 s for the pass
        time.sleep(rnd.uniform(0.8, 2.0))
        if proc.poll() is not None:
            break
        before = sum(counter.counts.values())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        assert sum(counter.counts.values()) >= before
    assert kills == 4
    proc = _spawn(server, image, state, 1, False, mbps=0)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["chunks_resumed"] > 0
    assert set(counter.counts) == set(range(384))
    print(f"kills={kills} resent={counter.resent()} resumed={result['chunks_resumed']}")
    assert counter.resent() <= kills * window, (counter.resent(), kills)
    assert server.generation(1)[0]["sha256"] == sha256(image)

    # an incremental pass, killed too
    with open(image, "r+b") as f:
        for i in rnd.sample(range(384), 40):
            f.seek(i * CS)
            f.write(rnd.randbytes(CS))
    counter.counts.clear()
    proc = _spawn(server, image, state, 2, True, mbps=8)  # 1 MB/s: 40 chunks take ~10 s
    time.sleep(3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc = _spawn(server, image, state, 2, True, mbps=0)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert len(counter.counts) == 40 and counter.resent() <= window
    assert server.generation(2)[0]["sha256"] == sha256(image)


def cancelled_pass(rep: BlockReplicator, after: int) -> None:
    """Cycle 1 of ``rep``, cancelled (as a pause does) once ``after`` bytes were sent."""
    cancel = threading.Event()

    def stop_soon(p) -> None:
        if p.bytes_sent > after:
            cancel.set()

    rep.on_progress = stop_soon
    with pytest.raises(TransferCancelled):
        rep.run_cycle(BlockCycle(1, False), cancel)
    rep.on_progress = lambda p: None


def test_cancel_then_resume_in_process(tmp_path: Path, server: BlockServer) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(3).randbytes(32 * MiB))
    rep = replicator(server, str(image), tmp_path / "state", bandwidth_mbps=40)  # 5 MB/s
    cancelled_pass(rep, 8 * MiB)
    rep.set_options(BlockOptions(chunk_size=CS, bandwidth_mbps=0))  # "modify" between runs
    r = rep.run_cycle(BlockCycle(1, False), threading.Event())
    assert r.chunks_resumed >= 32 and r.chunks_sent <= 128 - 32 + rep.inflight_window
    assert server.generation(1)[0]["sha256"] == sha256(image)


def test_pass_journal_is_synced_off_the_senders_path(tmp_path: Path, server: BlockServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The senders never fsync: the journal's own thread does, every FLUSH_EVERY sent chunks; a
    pass that stops syncs its journal before returning (it must survive a crash of the machine),
    a pass that commits removes it without a sync."""
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(4).randbytes(48 * MiB))  # 192 chunks, 3 x FLUSH_EVERY
    journal = os.path.realpath(tmp_path / "state") + "/d0.pass"  # as /proc/self/fd names it
    syncs: List[tuple] = []   # (path, thread) of every fsync
    events: List[str] = []    # "write" / "fsync" of the journal, in order
    real_fsync, real_write = os.fsync, os.write

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        syncs.append((path, threading.current_thread().name))
        real_fsync(fd)
        if path == journal:
            events.append("fsync")

    def write(fd: int, data) -> int:
        n = real_write(fd, data)
        if os.readlink(f"/proc/self/fd/{fd}") == journal:
            events.append("write")
        return n

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "write", write)
    rep = replicator(server, str(image), tmp_path / "state", bandwidth_mbps=80)  # 10 MB/s
    cancelled_pass(rep, 40 * MiB)  # the flusher has 24 MiB (2.4 s) after 64 chunks to run
    assert ("journal-d0.pass" in [name for path, name in syncs if path == journal]
            ), "no background fsync although > FLUSH_EVERY chunks were sent before the cancel"
    assert "write" in events and events[-1] == "fsync"  # the stopped pass's journal is synced
    assert not [name for _path, name in syncs if name.startswith("block-")]
    syncs.clear()
    rep.set_options(BlockOptions(chunk_size=CS, bandwidth_mbps=0))
    r = rep.run_cycle(BlockCycle(1, False), threading.Event())
    assert r.chunks_resumed >= 160 and not os.path.exists(journal)
    assert [name for path, name in syncs if path == journal and not name.startswith("journal-")] == []
    assert not [name for _path, name in syncs if name.startswith("block-")]
    assert server.generation(1)[0]["sha256"] == sha256(image)


def test_bandwidth_limit_changes_mid_pass(tmp_path: Path, server: BlockServer) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(5).randbytes(24 * MiB))
    rep = replicator(server, str(image), tmp_path / "state", bandwidth_mbps=16)  # 2 MB/s
    marks: List[float] = []

    def on_progress(p) -> None:
        if not marks and p.bytes_sent >= 4 * MiB:
            marks.append(time.monotonic())
            rep.set_options(BlockOptions(chunk_size=CS, bandwidth_mbps=0))

    rep.on_progress = on_progress
    t0 = time.monotonic()
    rep.run_cycle(BlockCycle(1, False), threading.Event())
    total = time.monotonic() - t0
    assert marks and marks[0] - t0 >= 1.2  # ~4 MB at 2 MB/s (minus one burst)
    assert total - (marks[0] - t0) < 5     # the remaining 20 MB at full speed


def test_adaptive_compression_tries_both_ways_and_a_limit_always_compresses(
        tmp_path: Path, server: BlockServer) -> None:
    """With no bandwidth limit the first round's trial windows are compressed, raw, compressed,
    each measured from the target's acknowledgements, and the chunks after them all go the way
    the round chose (whichever wins on this machine); under a limit every chunk is compressed;
    level 0 compresses none. Trial windows are made small here: twice what can be in flight,
    50 chunks of 256 KiB with 2 workers (the engine uses four times, at least 64 MiB)."""
    image = tmp_path / "text.img"
    text_image(image, seed=9, copies=12)  # 96 MiB, every chunk compressible: 384 chunks of 256 KiB
    chunks, window = 384, 2 * (2 + 16 + 2 * 16)
    for cycle, opts in [(1, {}), (2, {"bandwidth_mbps": 4000}), (3, {"compression": 0})]:
        rep = replicator(server, str(image), tmp_path / f"state{cycle}", workers=2, **opts)
        rep.adaptive = adaptive.AdaptiveCompression(trial_min=MiB, trial_inflight=2)
        r = rep.run_cycle(BlockCycle(cycle, False), threading.Event())
        assert r.chunks_sent == chunks
        assert server.generation(cycle)[0]["sha256"] == sha256(image)
        rounds = rep.adaptive.rounds
        shown = rep.snapshot().paths[0].compression  # what the disk's progress said last
        if cycle == 1:
            (_, raw, packed, choice), = rounds
            assert raw is not None and packed is not None, rounds  # both measured
            after = chunks - 3 * window
            assert r.chunks_compressed == 2 * window + (after if choice == adaptive.ON else 0), rounds
            assert shown == choice
        elif cycle == 2:
            assert rounds == [] and r.chunks_compressed == chunks and shown == "compressed"
        else:
            assert rounds == [] and r.chunks_compressed == 0 and shown == "off"


@contextmanager
def shaped_namespace(mbit: int) -> Iterator[str]:
    """A network namespace whose loopback carries ``mbit`` Mbit/s (tc token bucket filter; MTU 1500
    so that every packet fits the bucket)."""
    name = f"g2c-thin-{os.getpid()}"
    run("ip", "netns", "add", name)
    try:
        run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "mtu", "1500", "up")
        run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate",
            f"{mbit}mbit", "burst", "32kb", "latency", "100ms")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_adaptive_compression_keeps_compressing_on_a_thin_link(tmp_path: Path) -> None:
    """Agent and target in a namespace whose loopback carries 160 Mbit/s (a WAN link): the raw trial
    window is measured clearly slower than the compressed ones, and everything else is compressed.
    Trial windows are made small (twice what can be in flight: 25 MiB)."""
    image = tmp_path / "text.img"
    text_image(image, seed=11, copies=14)  # 112 MiB: a round of three 25 MiB windows, then compressed
    with shaped_namespace(160) as ns:
        out = run("ip", "netns", "exec", ns, sys.executable, "-m", "tests.support.blockpass", str(image),
                  str(tmp_path), "--trial-mib", "4", "--trial-inflight", "2")
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["sha256"] == sha256(image)
    (_, raw, packed, choice), *_ = doc["rounds"]
    assert raw is not None and packed is not None, doc["rounds"]
    assert choice == "compressed" and packed > 1.05 * raw, doc["rounds"]
    window = 2 * doc["inflight_chunks"]
    result = doc["result"]
    assert result["chunks_sent"] == 448
    assert result["chunks_compressed"] == 448 - window  # all but the raw trial window

# -- verification and the receiver's checks -------------------------------------------------------
def test_corrupted_chunk_on_target_is_found_and_repaired(tmp_path: Path, server: BlockServer) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(9).randbytes(16 * MiB))
    rep = replicator(server, str(image), tmp_path / "state", checksum=True)
    rep.run_cycle(BlockCycle(1, False), threading.Event())
    server.generation(1)
    current = server.store.root / "d0" / "current.img"
    with open(current, "r+b") as f:
        f.seek(5 * CS + 1000)
        byte = f.read(1)
        f.seek(5 * CS + 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = rep.run_cycle(BlockCycle(2, True), threading.Event())
    assert r.chunks_repaired == 1 and r.verify_rounds == 2 and r.chunks_sent == 1
    assert server.generation(2)[0]["sha256"] == sha256(image)


def _pinned(server: BlockServer) -> requests.Session:
    from go2cloud_client.tlspin import https_adapter

    s = requests.Session()
    s.mount("https://", https_adapter(server.fingerprint))
    return s


def test_receiver_refuses_bad_chunks_over_https(tmp_path: Path, server: BlockServer) -> None:
    s = _pinned(server)
    data = os.urandom(CS)
    url = f"{server.url}/disks/d0/chunks/0"
    headers = {"Authorization": f"Bearer {server.token}", "X-Chunk-Size": str(CS), "X-Disk-Size": str(4 * CS),
               "X-Encoding": "raw", "X-Chunk-Xxh3": xxhash.xxh3_128(data + b"x").hexdigest()[:32]}
    r = s.put(url, data=data, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "chunk_hash_mismatch"
    assert not (server.store.root / "d0" / "current.img").exists()
    r = s.put(url, data=data, headers={**headers, "Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = s.put(url, data=b"\0" * (5 * MiB), headers=headers)
    assert r.status_code == 413
    headers["X-Chunk-Xxh3"] = xxhash.xxh3_128(data).hexdigest()
    assert s.put(url, data=data, headers=headers).status_code == 200
    assert s.put(url, data=data, headers=headers).status_code == 200  # idempotent
    with open(server.store.root / "d0" / "current.img", "rb") as f:
        assert f.read(CS) == data
    # the control plane's own API is still there (and still needs its admin token)
    assert s.get(server.url.replace("/block/v1/tasks/t-blocktest", "/api/v1/workgroups")).status_code == 401
    # wrong pin: the agent refuses the target
    bad = BlockReplicator(target=BlockTarget(server.url, server.token, "sha256:" + "00" * 32),
                          disks=[Disk("d0", str(tmp_path))], options=BlockOptions(), state_dir=tmp_path / "s")
    image = tmp_path / "one.img"
    image.write_bytes(data)
    bad.disks = [Disk("d0", str(image))]
    from go2cloud_client.replication.block import BlockTargetRejectedError

    with pytest.raises(BlockTargetRejectedError, match="does not match the pinned fingerprint"):
        bad.run_cycle(BlockCycle(1, False), threading.Event())


def test_zero_region_stays_sparse(tmp_path: Path, server: BlockServer) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.write(os.urandom(4 * MiB))
        f.seek(CS, os.SEEK_CUR)             # a one-chunk hole between data
        f.write(os.urandom(4 * MiB - CS))
        f.write(bytes(96 * MiB))           # written zeros (allocated on the source)
        f.write(os.urandom(4 * MiB))
        f.truncate(256 * MiB)               # and a real hole at the end
    rep = replicator(server, str(image), tmp_path / "state")
    r = rep.run_cycle(BlockCycle(1, False), threading.Event())
    gen = server.generation(1)[0]
    assert gen["sha256"] == sha256(image)
    st = os.stat(gen["path"])
    assert st.st_size == 256 * MiB and st.st_blocks * 512 <= 12 * MiB
    cur = os.stat(server.store.root / "d0" / "current.img")
    assert cur.st_blocks * 512 <= 12 * MiB
    assert r.bytes_zero == 244 * MiB + CS and r.chunks_sent == 47


def test_refused_batch_is_read_again_and_an_old_target_gets_single_chunks(
        tmp_path: Path, server: BlockServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from go2cloud_server.blockrx import BlockReceiver
    from go2cloud_server.blockstore import ChunkHashMismatch
    from go2cloud_server.errors import NotFound

    image = tmp_path / "disk.img"
    rnd = random.Random(21)
    image.write_bytes(rnd.randbytes(6 * MiB) + b"text line\n" * (MiB // 10) + bytes(2 * MiB))
    refused: List[int] = []
    real_batch = server.store.write_batch

    def flaky(disk, chunk_size, disk_size, items):  # the network "corrupts" the first batch once
        if not refused:
            refused.append(items[0][0])
            raise ChunkHashMismatch(f"disk {disk} chunk {items[0][0]}: xxh3-128 does not match the data")
        real_batch(disk, chunk_size, disk_size, items)

    monkeypatch.setattr(server.store, "write_batch", flaky)
    r = replicator(server, str(image), tmp_path / "state").run_cycle(BlockCycle(1, False), threading.Event())
    assert refused and r.chunks_sent == 28
    assert server.generation(1)[0]["sha256"] == sha256(image)

    # a target without the batch route (404): the engine falls back to one PUT per chunk
    tried: List[str] = []  # a pass whose chunks happen to leave one by one never tries a batch

    def no_batches(self, store, disk, headers, body):
        tried.append("404")
        raise NotFound("no such endpoint: POST")

    monkeypatch.setattr(BlockReceiver, "_batch", no_batches)
    counter = WriteCounter(server.store)
    with open(image, "r+b") as f:
        f.write(rnd.randbytes(3 * CS))
    rep = replicator(server, str(image), tmp_path / "state")
    r = rep.run_cycle(BlockCycle(2, True), threading.Event())
    assert r.chunks_sent == 3 and set(counter.counts) == {0, 1, 2} and rep._batches is not bool(tried)
    assert server.generation(2)[0]["sha256"] == sha256(image)

    # the receiver before batches sized the body of an unknown POST at 0 bytes: 413
    monkeypatch.undo()
    real_max = BlockReceiver.max_body
    tried.clear()

    def old_max_body(method: str, path: str) -> int:
        if path.endswith("/chunks"):
            tried.append("413")
            return 0
        return real_max(method, path)

    monkeypatch.setattr(BlockReceiver, "max_body", staticmethod(old_max_body))
    counter = WriteCounter(server.store)  # undo() took the store's write_batch back to the class's
    with open(image, "r+b") as f:
        f.write(rnd.randbytes(2 * CS))
    rep = replicator(server, str(image), tmp_path / "state")
    r = rep.run_cycle(BlockCycle(3, True), threading.Event())
    assert r.chunks_sent == 2 and set(counter.counts) == {0, 1} and rep._batches is not bool(tried)
    assert server.generation(3)[0]["sha256"] == sha256(image)


def test_xfs_copied_while_frozen_is_checked_on_a_replayed_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from go2cloud_server import blockstore

    image = tmp_path / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(320 * MiB)
    run("mkfs.xfs", "-q", "-f", "--", str(image))
    gen = tmp_path / "gen-000001.img"
    with mounted(image, tmp_path / "mnt") as mnt:
        (mnt / "a.bin").write_bytes(os.urandom(5 * MiB))
        os.sync()
        (mnt / "b.txt").write_text("written just before the freeze\n")
        run("xfs_freeze", "-f", str(mnt))
        try:
            shutil.copyfile(image, gen)
        finally:
            run("xfs_freeze", "-u", str(mnt))
    before = sha256(gen)
    assert subprocess.run(["xfs_repair", "-n", "-f", str(gen)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode != 0  # the log needs replay
    report = blockstore.fs_check(gen, "xfs")
    assert report is not None and report["ok"] and report["log"] == "replayed on a copy", report
    assert sha256(gen) == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".replay")]

    # where the copy cannot be mounted, the report says so instead of a bare failure
    real = blockstore._run_check

    def no_mount(args, full=None):
        return (32, "mount: permission denied") if args[0] == "mount" else real(args, full)

    monkeypatch.setattr(blockstore, "_run_check", no_mount)
    report = blockstore.fs_check(gen, "xfs")
    assert report is not None and not report["ok"] and report["log"] == "needs replay"
    assert "log needs replay" in report["summary"] and sha256(gen) == before


# -- bad input -----------------------------------------------------------------------------------
def test_unknown_device_and_shrunk_device(tmp_path: Path, server: BlockServer) -> None:
    with pytest.raises(BlockSourceError, match="does not exist"):
        replicator(server, "/dev/g2c-no-such-disk", tmp_path / "s0").run_cycle(BlockCycle(1, False),
                                                                             threading.Event())
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(1).randbytes(8 * MiB))
    rep = replicator(server, str(image), tmp_path / "state")
    rep.run_cycle(BlockCycle(1, False), threading.Event())
    gen = server.generation(1)[0]
    committed = server.store.state("d0")
    small = tmp_path / "small.img"
    small.write_bytes(image.read_bytes()[:6 * MiB])
    with loop_device(small) as dev:
        rep2 = replicator(server, dev, tmp_path / "state")
        with pytest.raises(BlockSourceError, match="smaller than the 8388608 bytes replicated in cycle 1"):
            rep2.run_cycle(BlockCycle(2, True), threading.Event())
    assert server.store.state("d0") == committed
    assert sha256(Path(gen["path"])) == gen["sha256"]


def test_target_full_is_a_clear_error_and_keeps_the_last_generation(tmp_path: Path) -> None:
    small_fs = tmp_path / "target.img"
    with open(small_fs, "wb") as f:
        f.truncate(48 * MiB)
    run("mkfs.ext4", "-q", "-F", "--", str(small_fs))
    data_dir = tmp_path / "target"
    with mounted(small_fs, data_dir):
        server = BlockServer(data_dir).start()
        try:
            image = tmp_path / "disk.img"
            with open(image, "wb") as f:
                f.write(os.urandom(2 * MiB))
                f.truncate(64 * MiB)
            rep = replicator(server, str(image), tmp_path / "state")
            rep.run_cycle(BlockCycle(1, False), threading.Event())
            gen = server.generation(1)[0]
            with open(image, "r+b") as f:
                f.write(os.urandom(60 * MiB))
            with pytest.raises(BlockTargetFullError, match=r"block target 127\.0\.0\.1:\d+ is out of space"):
                rep.run_cycle(BlockCycle(2, True), threading.Event())
            assert server.store.state("d0")["committed_cycle"] == 1
            assert sha256(Path(gen["path"])) == gen["sha256"]
            assert server.store.generations() == [1]
        finally:
            server.stop()
