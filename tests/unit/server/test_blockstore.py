"""Block target storage and receiver, without sockets or processes (the HTTPS path and the
generations' fsck are in tests/integration/test_block_replication.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import threading
import time
from pathlib import Path

import blake3
import pytest
import xxhash
import zstandard

from go2cloud_server import blockstore, rules
from go2cloud_server.blockrx import BlockReceiver
from go2cloud_server.blockstore import BlockTaskStore, ChunkHashMismatch, DiskTooLarge, decompress_chunk
from go2cloud_server.errors import AuthFailed, InvalidInput, NotFound

CS = 65536
SIZE = 16 * CS
TOKEN = "tok-1"


def xh(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


@pytest.fixture
def store(tmp_path):
    return BlockTaskStore(tmp_path / "tasks" / "t-1" / "block")


@pytest.fixture
def rx(store):
    return BlockReceiver(lambda task, token: store if (task, token) == ("t-1", TOKEN) else None)


def put(rx, index, body, encoding="raw", xxh3=None, b3=None, token=TOKEN, cs=CS, size=SIZE, extra=None):
    headers = {"Authorization": f"Bearer {token}", "X-Chunk-Size": str(cs), "X-Disk-Size": str(size),
               "X-Encoding": encoding}
    if xxh3:
        headers["X-Chunk-Xxh3"] = xxh3
    if b3:
        headers["X-Chunk-Blake3"] = b3
    headers.update(extra or {})
    return rx.handle("PUT", f"/block/v1/tasks/t-1/disks/d0/chunks/{index}", headers, body)


def test_write_verify_commit_state(store):
    data = os.urandom(CS)
    store.write_chunk("d0", 3, CS, SIZE, data, xh(data))
    img = store.root / "d0" / "current.img"
    assert img.stat().st_size == SIZE
    with open(img, "rb") as f:
        f.seek(3 * CS)
        assert f.read(CS) == data
    hashes = [xxhash.xxh3_128(bytes(CS)).digest()] * 16
    hashes[3] = xxhash.xxh3_128(data).digest()
    assert store.verify("d0", b"".join(hashes), chunk_size=CS) == []
    wrong = list(hashes)
    wrong[5] = b"\1" * 16
    assert store.verify("d0", b"".join(wrong), chunk_size=CS) == [5]
    with pytest.raises(NotFound):
        store.state("d1")
    store.commit("d0", 1, SIZE, b"".join(hashes))
    st = store.state("d0")
    assert st["committed_cycle"] == 1 and st["hashes_count"] == 16 and st["chunk_size"] == CS
    assert store.committed_hashes("d0") == b"".join(hashes)
    store.commit("d0", 1, SIZE, b"".join(hashes))  # idempotent


def test_writes_start_their_writeback(store, monkeypatch):
    """Every write starts the writeback of the range it wrote (sync_file_range, so the commit's
    fsync does not write a whole pass at once); a refused batch writes and starts nothing. What
    the kernel then does with the pages cannot be observed reliably here: the calls are."""
    calls = []
    real = blockstore.start_writeback

    def spy(fd, offset, length):
        calls.append((offset, length))
        real(fd, offset, length)  # the real system call, on the real file

    monkeypatch.setattr(blockstore, "start_writeback", spy)
    data = os.urandom(CS)
    store.write_chunk("d0", 3, CS, SIZE, data, xh(data))
    store.write_batch("d0", CS, SIZE, [(5, 1, data, xh(data), None), (6, 1, data, xh(data), None),
                                       (7, 2, None, "", None)])
    assert calls == [(3 * CS, CS), (5 * CS, 4 * CS)]
    assert blockstore._libc_fns["sync_file_range"] is not None, "sync_file_range not found in libc"
    # the last chunk of a disk whose size is not a multiple of the chunk size: clipped to the disk
    size = SIZE - 100
    tail = os.urandom(CS - 100)
    store.write_batch("d1", CS, size, [(14, 1, data, xh(data), None), (15, 1, tail, xh(tail), None)])
    assert calls[-1] == (14 * CS, size - 14 * CS)
    calls.clear()
    with pytest.raises(ChunkHashMismatch):
        store.write_batch("d0", CS, SIZE, [(8, 1, data, xh(data), None), (9, 1, data, xh(b"x"), None)])
    assert calls == []
    with open(store.root / "d0" / "current.img", "rb") as f:
        f.seek(8 * CS)
        assert f.read(CS) == bytes(CS)


def test_one_writer_per_image_at_a_time(store, monkeypatch):
    """Two receiver threads never write the same image at once (the second sleeps on the store's
    lock instead of spinning on the inode lock); two different disks are written in parallel."""
    import threading
    import time

    active = {"d0": 0, "d1": 0}
    peak = {"d0": 0, "d1": 0, "both": 0}
    guard = threading.Lock()
    real = BlockTaskStore._put

    def slow_put(fd, offset, length, data, xxh3):
        disk = "d0" if os.readlink(f"/proc/self/fd/{fd}").split("/")[-2] == "d0" else "d1"
        with guard:
            active[disk] += 1
            peak[disk] = max(peak[disk], active[disk])
            peak["both"] = max(peak["both"], active["d0"] + active["d1"])
        time.sleep(0.02)
        real(fd, offset, length, data, xxh3)
        with guard:
            active[disk] -= 1

    monkeypatch.setattr(BlockTaskStore, "_put", staticmethod(slow_put))
    data = os.urandom(CS)

    def writer(disk, first):
        for i in range(first, first + 4):
            store.write_batch(disk, CS, SIZE, [(i, 1, data, xh(data), None)])

    threads = [threading.Thread(target=writer, args=(d, f)) for d, f in
               (("d0", 0), ("d0", 4), ("d1", 0), ("d1", 4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak["d0"] == 1 and peak["d1"] == 1 and peak["both"] == 2, peak
    for disk in ("d0", "d1"):
        with open(store.root / disk / "current.img", "rb") as f:
            assert f.read(8 * CS) == data * 8


def test_hash_checked_before_writing(store):
    data = os.urandom(CS)
    with pytest.raises(ChunkHashMismatch):
        store.write_chunk("d0", 0, CS, SIZE, data, xh(data[:-1] + b"x"))
    with pytest.raises(ChunkHashMismatch):
        store.write_chunk("d0", 0, CS, SIZE, data, xh(data), blake3.blake3(b"other").hexdigest())
    assert not (store.root / "d0" / "current.img").exists()
    with pytest.raises(ChunkHashMismatch):  # a "hole" whose hash says it has data
        store.write_chunk("d0", 0, CS, SIZE, None, xh(data))


@pytest.mark.parametrize("disk", ["..", ".", "a/b", "", "x" * 65, "../../etc"])
def test_disk_names_are_validated(store, disk):
    with pytest.raises(InvalidInput):
        store.write_chunk(disk, 0, CS, SIZE, bytes(CS), xh(bytes(CS)))


@pytest.mark.parametrize("index,cs,size,length", [
    (16, CS, SIZE, CS),            # index past the end
    (-1, CS, SIZE, CS),
    (0, 1000, SIZE, 1000),         # chunk size not a multiple of 4096
    (0, 8 << 20, 8 << 20, 8 << 20),  # chunk size over 4 MiB
    (0, CS, 0, CS),                # empty disk
    (15, CS, SIZE - 10, CS),       # last chunk is short: a full one would write past the end
])
def test_ranges_are_validated(store, index, cs, size, length):
    data = b"\1" * length
    with pytest.raises(InvalidInput):
        store.write_chunk("d0", index, cs, size, data, xh(data))


def test_symlinked_disk_dir_is_refused(store, tmp_path):
    store.root.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", store.root / "d0")
    with pytest.raises(InvalidInput):
        store.write_chunk("d0", 0, CS, SIZE, b"\1" * CS, xh(b"\1" * CS))
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_holes_keep_the_image_sparse(store):
    big = 64 * 1024 * 1024
    cs = 1 << 20
    data = os.urandom(cs)
    for i in range(64):
        store.write_chunk("d0", i, cs, big, data, xh(data))
    img = store.root / "d0" / "current.img"
    full = img.stat().st_blocks
    assert full * 512 >= big
    for i in range(64):  # the source became all zeros: every chunk is punched out
        store.write_chunk("d0", i, cs, big, None, "")
    assert img.stat().st_blocks * 512 <= 1 << 20
    with open(img, "rb") as f:
        assert f.read(cs) == bytes(cs)
    store.write_holes("d0", 0, 64, cs, big)  # idempotent
    # zeros sent as data are written sparsely too
    store.write_chunk("d0", 5, cs, big, bytes(cs), xh(bytes(cs)))
    assert img.stat().st_blocks * 512 <= 1 << 20


def test_decompression_bomb_is_refused():
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20))
    assert len(bomb) < 10_000
    with pytest.raises(InvalidInput, match="declares 67108864 bytes"):
        decompress_chunk(bomb, CS)
    hidden = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(bytes(64 << 20))
    with pytest.raises(InvalidInput, match="more than"):
        decompress_chunk(hidden, CS)
    short = zstandard.ZstdCompressor(write_content_size=False).compress(b"a" * 100)
    with pytest.raises(InvalidInput):
        decompress_chunk(short, CS)
    with pytest.raises(InvalidInput):
        decompress_chunk(b"not zstd at all", CS)


def test_receiver_auth_and_errors(rx, store):
    data = os.urandom(CS)
    status, doc = put(rx, 0, data, xxh3=xh(data), token="wrong")
    assert status == 401 and doc["error"]["code"] == "unauthorized"
    status, doc = rx.handle("PUT", "/block/v1/tasks/t-1/disks/d0/chunks/0", {}, data)
    assert status == 401
    status, doc = put(rx, 0, data, xxh3=xh(b"other"))
    assert status == 422 and doc["error"]["code"] == "chunk_hash_mismatch"
    status, doc = put(rx, 0, data, encoding="gzip", xxh3=xh(data))
    assert status == 400
    status, doc = put(rx, 99, data, xxh3=xh(data))
    assert status == 400 and "index" in doc["error"]["message"]
    bomb = zstandard.ZstdCompressor().compress(bytes(CS * 4))
    status, doc = put(rx, 0, bomb, encoding="zstd", xxh3=xh(bytes(CS)))
    assert status == 400
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    status, doc = rx.handle("GET", "/block/v1/tasks/t-1/disks/../x", bearer, b"")
    assert status == 404
    status, doc = rx.handle("DELETE", "/block/v1/tasks/t-1/disks/d0", bearer, b"")
    assert status == 400


def test_receiver_chunk_verify_commit(rx, store):
    text = b"hello block world\n" * 4000
    text = text[:CS]
    frame = zstandard.ZstdCompressor().compress(text)
    assert put(rx, 1, frame, encoding="zstd", xxh3=xh(text), b3=blake3.blake3(text).hexdigest())[0] == 200
    assert put(rx, 2, b"", encoding="hole", extra={"X-Chunk-Count": "14"})[0] == 200
    auth = {"Authorization": f"Bearer {TOKEN}", "X-Chunk-Size": str(CS)}
    z = xxhash.xxh3_128(bytes(CS)).digest()
    records = struct.pack(">I16s", 1, xxhash.xxh3_128(text).digest()) + struct.pack(">I16s", 2, z) \
        + struct.pack(">I16s", 0, b"\7" * 16)
    status, doc = rx.handle("POST", "/block/v1/tasks/t-1/disks/d0/verify", auth, records)
    assert status == 200 and doc["differ"] == [0] and doc["checked"] == 3
    hashes = z + xxhash.xxh3_128(text).digest() + z * 14
    status, doc = rx.handle("POST", "/block/v1/tasks/t-1/disks/d0/commit",
                            {**auth, "X-Cycle": "1", "X-Disk-Size": str(SIZE)}, hashes)
    assert status == 200 and doc["committed_cycle"] == 1
    assert doc["hashes_digest"] == xxhash.xxh3_128(hashes).hexdigest()
    status, doc = rx.handle("POST", "/block/v1/tasks/t-1/disks/d0/commit",
                            {**auth, "X-Cycle": "2", "X-Disk-Size": str(SIZE)}, hashes[:-16])
    assert status == 400
    status, doc = rx.handle("GET", "/block/v1/tasks/t-1/disks/d0", auth, b"")
    assert status == 200 and doc["committed_cycle"] == 1


def test_retain_and_discard(store):
    d = store.root / "d0"
    d.mkdir(parents=True)
    for n in (1, 2, 3, 4):
        (d / f"gen-{n:06d}.img").write_bytes(b"x")
        (d / f"gen-{n:06d}.json").write_text("{}")
    assert store.generations() == [1, 2, 3, 4]
    assert store.retain(2) == [1, 2]
    assert store.generations() == [3, 4]
    store.discard_cycle(4)
    assert store.generations() == [3]
    store.destroy()
    assert not store.root.exists()


# -- generations: made at once (pending), verified later -------------------------------------------
@pytest.fixture
def checks(monkeypatch):
    """No blkid or fsck in unit tests: the filesystem is "ext4" and its check records each call."""
    calls: list = []

    def fs_check(path, fs):
        calls.append((str(path), fs))
        return {"tool": "e2fsck -f -n", "rc": 0, "ok": True, "summary": "clean"}

    monkeypatch.setattr(blockstore, "detect_fs", lambda path: "ext4")
    monkeypatch.setattr(blockstore, "fs_check", fs_check)
    return calls


def _committed(store, cycle=1, seed=b"a"):
    data = (seed * CS)[:CS]
    store.write_chunk("d0", 2, CS, SIZE, data, xh(data))
    hashes = [xxhash.xxh3_128(bytes(CS)).digest()] * 16
    hashes[2] = xxhash.xxh3_128(data).digest()
    store.commit("d0", cycle, SIZE, b"".join(hashes), CS)
    return hashlib.sha256((store.root / "d0" / "current.img").read_bytes()).hexdigest()


def test_generation_is_pending_then_verified(store, checks):
    want = _committed(store)
    (gen,) = store.commit_cycle(1)
    assert gen["state"] == "pending" and gen["sha256"] is None and gen["check"] is None
    assert gen["bytes"] == SIZE and gen["copy"] in ("reflink", "sparse") and checks == []
    assert store.pending_generations() == [("d0", 1)] and store.generations() == [1]
    img = Path(gen["path"])
    assert hashlib.sha256(img.read_bytes()).hexdigest() == want

    done = store.verify_generation("d0", 1)
    assert done is not None and done["state"] == "verified" and done["sha256"] == want
    assert done["fs"] == "ext4" and done["check"]["ok"] and done["bytes"] == SIZE and done["verified_at"]
    assert checks == [(str(img), "ext4")]
    assert json.loads(img.with_suffix(".json").read_text()) == done  # the report on disk is final
    assert store.pending_generations() == []
    # idempotent: neither verifying nor committing again redoes anything
    assert store.verify_generation("d0", 1) == done and store.commit_cycle(1) == [done]
    assert len(checks) == 1


def test_crash_between_copy_and_verification_leaves_a_pending_report(store, checks, monkeypatch):
    want = _committed(store)

    def crash(path, fs):
        raise KeyboardInterrupt("server killed during the check")

    store.commit_cycle(1)
    monkeypatch.setattr(blockstore, "fs_check", crash)
    with pytest.raises(KeyboardInterrupt):
        store.verify_generation("d0", 1)
    # "restart": a new store object finds the generation still pending and completes it
    again = BlockTaskStore(store.root)
    assert again.pending_generations() == [("d0", 1)]
    assert again.commit_cycle(1)[0]["state"] == "pending"  # the image is not made again
    monkeypatch.setattr(blockstore, "fs_check", lambda path, fs: {"ok": True, "rc": 0, "summary": ""})
    done = again.verify_generation("d0", 1)
    assert done is not None and done["state"] == "verified" and done["sha256"] == want


def test_an_interrupted_copy_is_made_again(store, checks):
    want = _committed(store)
    d = store.root / "d0"
    (d / "gen-000001.img").write_bytes(b"half a copy")  # no report: the copy did not finish
    assert store.generations() == []
    (gen,) = store.commit_cycle(1)
    assert gen["state"] == "pending" and hashlib.sha256(Path(gen["path"]).read_bytes()).hexdigest() == want


def test_generation_discarded_while_queued_or_being_verified(store, checks, monkeypatch):
    _committed(store)
    store.commit_cycle(1)
    store.discard_cycle(1)  # retention removed it before the verifier got to it
    assert store.verify_generation("d0", 1) is None
    assert not list((store.root / "d0").glob("gen-000001.*"))

    _committed(store, cycle=2, seed=b"b")
    store.commit_cycle(2)

    def discard_during_check(path, fs):
        store.discard_cycle(2)
        return {"ok": True, "rc": 0, "summary": ""}

    monkeypatch.setattr(blockstore, "fs_check", discard_during_check)
    assert store.verify_generation("d0", 2) is None
    assert not list((store.root / "d0").glob("gen-000002.*"))  # no orphan report written


def test_unreadable_generation_is_reported_failed(store, checks, monkeypatch):
    _committed(store)
    store.commit_cycle(1)

    def unreadable(fd, length, offset):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(blockstore, "_pread", unreadable)
    done = store.verify_generation("d0", 1)
    assert done is not None and done["state"] == "failed" and "Input/output error" in done["error"]
    assert done["sha256"] is None and checks == []
    assert store.verify_generation("d0", 1) == done  # final: not retried


# -- only the task's disks, no larger than the source reported; verification in steps ----------
INVENTORY = {"disks": [{"name": "vdb", "size_bytes": SIZE, "partitions": [
    {"name": "vdb1", "size_bytes": SIZE - CS}]}, {"name": "vdc", "size_bytes": 0, "partitions": []}]}


def test_declared_disk_limits_come_from_the_inventory():
    disks = rules.disk_names(["/dev/vdb", "/dev/vdb1", "/dev/vdc", "/dev/mapper/vg-root", "/srv/img/vdb",
                              "/dev/sdz"])
    assert blockstore.declared_disk_limits(disks, INVENTORY) == {
        "vdb": SIZE, "vdb1": SIZE - CS,
        "vdc": None,  # the inventory does not know its size
        "vg-root": None, "vdb-2": None,  # not a device node of the inventory: an image file, a mapper name
        "sdz": None}
    assert blockstore.declared_disk_limits(disks[:1], {"disks": "junk"}) == {"vdb": None}


@pytest.fixture
def dstore(tmp_path):
    return BlockTaskStore(tmp_path / "tasks" / "t-2" / "block", {"vdb": SIZE, "disk.img": None})


def test_only_declared_disks_are_accepted_and_nothing_is_created(dstore):
    data = os.urandom(CS)
    for call in (lambda: dstore.write_chunk("evil", 0, CS, SIZE, data, xh(data)),
                 lambda: dstore.write_holes("evil", 0, 4, CS, SIZE),
                 lambda: dstore.commit("evil", 1, SIZE, bytes(16 * 16), CS),
                 lambda: dstore.state("evil"),
                 lambda: dstore.verify_indices("evil", [(0, bytes(16))], CS)):
        with pytest.raises(NotFound, match="not a disk of this task"):
            call()
    assert not dstore.root.exists()
    dstore.write_chunk("vdb", 0, CS, SIZE, data, xh(data))
    assert dstore.disks() == ["vdb"]


def test_a_disk_larger_than_the_inventory_says_is_refused(dstore):
    with pytest.raises(DiskTooLarge, match="inventory"):
        dstore.write_holes("vdb", 0, 1, CS, SIZE + CS)
    with pytest.raises(DiskTooLarge):
        dstore.commit("vdb", 1, 1 << 44, bytes(16 * ((1 << 44) // (4 << 20))), 4 << 20)
    assert not dstore.root.exists()
    dstore.write_holes("vdb", 0, 16, CS, SIZE)  # its own size is fine


def test_an_image_too_large_for_the_target_filesystem_is_a_clear_refusal(dstore, monkeypatch):
    def efbig(fd, size):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(blockstore.os, "ftruncate", efbig)
    with pytest.raises(DiskTooLarge, match="cannot hold an image that large"):
        dstore.write_holes("vdb", 0, 1, CS, SIZE)


def test_a_disk_of_unknown_size_is_pinned_at_its_first_write(dstore, tmp_path):
    dstore.write_holes("disk.img", 0, 1, CS, 4 * CS)
    with pytest.raises(DiskTooLarge, match="first write"):
        dstore.write_holes("disk.img", 0, 1, CS, 5 * CS)
    # pinned on disk: a restarted server (a new store object) keeps the limit
    again = BlockTaskStore(dstore.root, {"vdb": SIZE, "disk.img": None})
    with pytest.raises(DiskTooLarge):
        again.commit("disk.img", 1, 1 << 40, bytes(16 * ((1 << 40) // (4 << 20))), 4 << 20)
    assert again.size_limit("disk.img") == 4 * CS
    again.write_holes("disk.img", 0, 4, CS, 4 * CS)
    assert (dstore.root / "disk.img" / "current.img").stat().st_size == 4 * CS


@pytest.fixture
def drx(dstore):
    return BlockReceiver(lambda task, token: dstore if (task, token) == ("t-2", TOKEN) else None)


def test_receiver_decides_from_the_headers_before_the_body(drx, dstore):
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    geo = {**bearer, "X-Chunk-Size": str(CS), "X-Disk-Size": str(SIZE)}
    base = "/block/v1/tasks/t-2/disks"
    with pytest.raises(AuthFailed):
        drx.authorize("PUT", f"{base}/vdb/chunks/0", {**geo, "Authorization": "Bearer wrong"})
    with pytest.raises(NotFound):
        drx.authorize("POST", f"{base}/evil/chunks", geo)
    with pytest.raises(DiskTooLarge):
        drx.authorize("POST", f"{base}/vdb/commit", {**geo, "X-Disk-Size": str(1 << 44), "X-Cycle": "1"})
    # a commit's body is exactly the hashes of the disk's chunks, not the protocol's 64 MiB cap
    req = drx.authorize("POST", f"{base}/vdb/commit", {**geo, "X-Cycle": "1"})
    assert req.max_body == 16 * 16
    status, doc = drx.serve(req, {**geo, "X-Cycle": "1"}, bytes(16 * 17))
    assert status == 413 and doc["error"]["code"] == "too_large"
    status, doc = drx.handle("GET", f"{base}/evil", bearer, b"")
    assert status == 404 and "not a disk of this task" in doc["error"]["message"]
    assert not dstore.root.exists()


def test_verify_reads_each_chunk_once_per_request(drx, dstore):
    dstore.write_holes("vdb", 0, 16, CS, SIZE)
    auth = {"Authorization": f"Bearer {TOKEN}", "X-Chunk-Size": str(CS)}
    twice = struct.pack(">I16s", 3, bytes(16)) * 2
    status, doc = drx.handle("POST", "/block/v1/tasks/t-2/disks/vdb/verify", auth, twice)
    assert status == 400 and "twice" in doc["error"]["message"]


def _read_counter(monkeypatch):
    read = {"bytes": 0, "calls": 0}
    real = blockstore._pread

    def counting(fd, length, offset):
        buf = real(fd, length, offset)
        read["bytes"] += len(buf)
        read["calls"] += 1
        return buf

    monkeypatch.setattr(blockstore, "_pread", counting)
    return read


def test_holes_are_verified_without_reading_them_and_in_steps(store, checks, monkeypatch):
    size, cs = 1 << 30, 4 << 20
    store.write_holes("d0", 0, size // cs, cs, size)
    data = (b"data" * cs)[:cs]
    store.write_chunk("d0", 7, cs, size, data, xh(data))
    hashes = [xxhash.xxh3_128(bytes(cs)).digest()] * (size // cs)
    hashes[7] = xxhash.xxh3_128(data).digest()
    store.commit("d0", 1, size, b"".join(hashes), cs)
    store.commit_cycle(1)
    read = _read_counter(monkeypatch)
    steps = store.verify_generation_steps("d0", 1)
    count = 0
    while True:
        try:
            next(steps)
            count += 1
        except StopIteration as end:
            report = end.value
            break
    want = hashlib.sha256()
    want.update(bytes(7 * cs))
    want.update(data)
    for _ in range(size // cs - 8):
        want.update(bytes(cs))
    assert report["state"] == "verified" and report["sha256"] == want.hexdigest()
    assert read["bytes"] == cs  # the one data chunk; 1020 MiB of holes hashed without a read
    assert count >= size // blockstore.VERIFY_STEP  # a step per 64 MiB, then the filesystem check's


def test_a_long_filesystem_check_does_not_hold_up_another_task(tmp_path, monkeypatch):
    """The fsck of one task's generation (up to an hour on a crafted filesystem) runs in its own
    thread: the shared verifier verifies another task's generation meanwhile."""
    from go2cloud_server.verifier import GenerationVerifier

    stores = {t: BlockTaskStore(tmp_path / t / "block") for t in ("slow", "fast")}
    for store in stores.values():
        _committed(store)
        store.commit_cycle(1)
    started, release = threading.Event(), threading.Event()

    def fs_check(path, fs):
        if "/slow/" in str(path):
            started.set()
            assert release.wait(30)
        return {"tool": "e2fsck -f -n", "rc": 0, "ok": True, "summary": "clean"}

    monkeypatch.setattr(blockstore, "detect_fs", lambda path: "ext4")
    monkeypatch.setattr(blockstore, "fs_check", fs_check)
    reports: dict = {}

    def verify(task, cycle, disk):
        reports[task] = yield from stores[task].verify_generation_steps(disk, cycle)

    verifier = GenerationVerifier(verify)
    try:
        verifier.submit("slow", 1, "d0")
        assert started.wait(30)
        verifier.submit("fast", 1, "d0")
        for _ in range(3000):
            if "fast" in reports:
                break
            time.sleep(0.01)
        assert reports.get("fast", {}).get("state") == "verified"
        assert "slow" not in reports  # its check is still running
        release.set()
        for _ in range(3000):
            if verifier.idle():
                break
            time.sleep(0.01)
        assert reports["slow"]["state"] == "verified" and reports["slow"]["check"]["ok"]
    finally:
        release.set()
        verifier.stop()


def test_a_task_bodies_in_flight_are_bounded_and_other_tasks_are_not(dstore, store):
    from go2cloud_server.blockrx import TargetBusy

    stores = {"t-1": store, "t-2": dstore}
    rx = BlockReceiver(lambda task, token: stores.get(task) if token == TOKEN else None,
                       inflight_limit=100, busy_wait_s=30)
    geo = {"Authorization": f"Bearer {TOKEN}", "X-Chunk-Size": str(CS), "X-Disk-Size": str(SIZE)}
    first = rx.authorize("POST", "/block/v1/tasks/t-2/disks/vdb/chunks", geo)
    rx.reserve(first, 60)
    events: list = []
    second = rx.authorize("POST", "/block/v1/tasks/t-2/disks/vdb/chunks", geo)
    waiter = threading.Thread(target=lambda: (rx.reserve(second, 60), events.append("second in")))
    waiter.start()
    other = rx.authorize("POST", "/block/v1/tasks/t-1/disks/d0/chunks", {**geo, "X-Disk-Size": str(SIZE)})
    rx.reserve(other, 100)  # another task: its own budget
    events.append("other in")
    assert events == ["other in"]  # the second request of t-2 waits
    events.append("first done")
    rx.release(first, 60)
    waiter.join(30)
    assert events == ["other in", "first done", "second in"]
    rx.release(second, 60)
    rx.release(other, 100)
    # a request that never fits (its task's others hold the budget) is refused after the wait
    impatient = BlockReceiver(rx.resolve, inflight_limit=100, busy_wait_s=0)
    impatient.reserve(first, 100)
    with pytest.raises(TargetBusy, match="in flight"):
        impatient.reserve(second, 1)
    impatient.release(first, 100)
    impatient.reserve(second, 1000)  # alone, any size fits (bounded by the route's body cap)
