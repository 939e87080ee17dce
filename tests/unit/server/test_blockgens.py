"""Block generations that share unchanged data (``blockgens``): a commit copies what changed,
every generation reads back bit for bit (composed from full image + deltas), retention folds and
merges, and every step is redone after a crash. Real sparse files in tmp_path; the filesystem
check is stubbed (blkid/fsck run in tests/integration/test_block_generations.py)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Dict, List

import pytest
import xxhash

from go2cloud_server import blockgens, blockstore
from go2cloud_server.blockstore import BlockTaskStore
from go2cloud_server.errors import NotFound

CS = 65536
COUNT = 64
SIZE = COUNT * CS - 4096  # a last chunk shorter than the others


def clen(i: int) -> int:
    return min(CS, SIZE - i * CS)


class Disk:
    """A source disk as bytes, replicated into a store the way the receiver does (changed chunks
    written, zeros as holes), committed with the chunk hashes of the source."""

    def __init__(self, store: BlockTaskStore, seed: int = 1) -> None:
        self.store = store
        self.rnd = random.Random(seed)
        self.data = bytearray(SIZE)
        self.sent: Dict[int, bytes] = {}
        self.at: Dict[int, str] = {}  # cycle -> sha256 of the source at that cycle

    def chunk(self, i: int) -> bytes:
        return bytes(self.data[i * CS:i * CS + clen(i)])

    def change(self, indices: List[int], zero: bool = False) -> None:
        for i in indices:
            self.data[i * CS:i * CS + clen(i)] = bytes(clen(i)) if zero else self.rnd.randbytes(clen(i))

    def sync(self, cycle: int) -> List[dict]:
        hashes = []
        for i in range(COUNT):
            c = self.chunk(i)
            h = xxhash.xxh3_128(c)
            if self.sent.get(i) != h.digest():
                if c == bytes(len(c)):
                    self.store.write_holes("d0", i, 1, CS, SIZE)
                else:
                    self.store.write_chunk("d0", i, CS, SIZE, c, h.hexdigest())
                self.sent[i] = h.digest()
            hashes.append(h.digest())
        self.store.commit("d0", cycle, SIZE, b"".join(hashes), CS)
        self.at[cycle] = hashlib.sha256(self.data).hexdigest()
        return self.store.commit_cycle(cycle)


def exported(store: BlockTaskStore, cycle: int, out: Path) -> str:
    """sha256 of generation ``cycle`` written out as a file (the composed image)."""
    with store.open_generation("d0", cycle) as image:
        fd = os.open(str(out), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, image.size)
            for _ in image.copy_to(fd):
                pass
        finally:
            os.close(fd)
    return hashlib.sha256(out.read_bytes()).hexdigest()


@pytest.fixture
def no_reflink(monkeypatch):
    """The filesystem cannot clone (ext4): generations after the first are deltas."""
    monkeypatch.setattr(blockgens, "try_clone", lambda src, dst: False)


@pytest.fixture
def copies(monkeypatch):
    """Every byte a generation copies, counted."""
    count = {"bytes": 0}
    real = blockgens._copy_data

    def counting(sfd, dfd, offset, length):
        count["bytes"] += length
        return real(sfd, dfd, offset, length)

    monkeypatch.setattr(blockgens, "_copy_data", counting)
    return count


@pytest.fixture
def store(tmp_path):
    return BlockTaskStore(tmp_path / "block")


def gen_files(store: BlockTaskStore, cycle: int) -> List[Path]:
    return sorted((store.root / "d0").glob(f"gen-{cycle:06d}.*"))


def test_a_commit_writes_what_changed_not_the_disk(store, no_reflink, copies):
    """The issue's "a cycle's cost grows with the disk": a 4 MiB disk full of data, one chunk
    changed; the second generation holds (and its commit copies) that one chunk."""
    disk = Disk(store)
    disk.change(list(range(COUNT)))
    (first,) = disk.sync(1)
    assert first["kind"] == "full" and first["copy"] == "sparse"
    copies["bytes"] = 0
    disk.change([5])
    (gen,) = disk.sync(2)
    allocated = sum(p.stat().st_blocks * 512 for p in gen_files(store, 2) if p.suffix in (".img", ".delta"))
    assert allocated <= 2 * CS, f"generation 2 allocates {allocated} bytes for one changed chunk of {CS}"
    assert copies["bytes"] == CS
    assert gen["kind"] == "delta" and gen["image"] is False and gen["delta_chunks"] == 1
    assert gen["path"].endswith("gen-000002.delta") and "not a bootable image" in gen["note"]
    assert gen["copied_bytes"] == CS and gen["delta_of"] == 1


def test_every_generation_reads_back_bit_for_bit(store, no_reflink, tmp_path):
    disk = Disk(store, seed=2)
    disk.change(list(range(0, COUNT, 2)))  # half data, half holes
    disk.sync(1)
    disk.change([1, 2, 3])  # a hole becomes data, data changes
    disk.sync(2)
    disk.change([2, 10], zero=True)  # data becomes zeros (held by the delta as a hole)
    disk.sync(3)
    disk.change([COUNT - 1, 0])  # the short last chunk and the first
    disk.sync(4)
    disk.sync(5)  # nothing changed: an empty delta
    for cycle in range(1, 6):
        assert exported(store, cycle, tmp_path / "out.img") == disk.at[cycle], f"generation {cycle}"
    assert [r["kind"] for r in (store.generation_report("d0", c) for c in range(1, 6))] == \
        ["full", "delta", "delta", "delta", "delta"]
    assert store.generation_report("d0", 5)["delta_chunks"] == 0
    with pytest.raises(NotFound):
        store.open_generation("d0", 6)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_retention_folds_and_keeps_every_kept_generation(store, no_reflink, copies, tmp_path, keep):
    disk = Disk(store, seed=3)
    disk.change(list(range(COUNT)))
    disk.sync(1)
    for cycle in range(2, 8):
        disk.change(disk.rnd.sample(range(COUNT), 3))
        copies["bytes"] = 0
        disk.sync(cycle)
        removed = store.retain(keep)
        assert removed == ([cycle - keep] if cycle > keep else [])
        # the commit and the fold each copy what changed in one cycle: never the disk
        assert copies["bytes"] <= 2 * 3 * CS
        kept = store.generations()
        assert kept == list(range(max(1, cycle - keep + 1), cycle + 1))
        assert store.generation_report("d0", kept[0])["kind"] == "full"
        assert store.generation_report("d0", kept[0])["path"].endswith(f"gen-{kept[0]:06d}.img")
        for c in kept:
            assert exported(store, c, tmp_path / "out.img") == disk.at[c], f"gen {c} after cycle {cycle}"
    names = sorted(p.name for p in (store.root / "d0").iterdir())
    assert not [n for n in names if n.endswith((".gone", ".tmp"))]


def test_discarding_a_middle_or_the_newest_generation(store, no_reflink, tmp_path):
    disk = Disk(store, seed=4)
    disk.change(list(range(COUNT)))
    disk.sync(1)
    for cycle in (2, 3, 4, 5):
        disk.change([cycle, cycle + 1, 20])
        disk.sync(cycle)
    store.discard_cycle(3)  # a delta merged into the next one where that one does not override it
    assert store.generations() == [1, 2, 4, 5]
    store.discard_cycle(5)  # the newest: just removed
    store.discard_cycle(1)  # the full base: folded into 2
    assert store.generations() == [2, 4]
    for c in (2, 4):
        assert exported(store, c, tmp_path / "out.img") == disk.at[c]
    disk.change([40])
    disk.sync(6)  # a delta against 4, the newest left
    assert store.generation_report("d0", 6)["delta_of"] == 4
    assert exported(store, 6, tmp_path / "out.img") == disk.at[6]


def test_a_reader_keeps_reading_the_same_bytes_while_retention_moves_files(store, no_reflink, tmp_path):
    disk = Disk(store, seed=5)
    disk.change(list(range(COUNT)))
    disk.sync(1)
    disk.change([1, 2])
    disk.sync(2)
    disk.change([2, 3])
    disk.sync(3)
    with store.open_generation("d0", 3) as image:  # opened before the discards
        store.discard_cycle(2)  # merge 2 into 3
        store.discard_cycle(1)  # fold 1 into 3
        out = tmp_path / "during.img"
        fd = os.open(str(out), os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, image.size)
        for _ in image.copy_to(fd):
            pass
        os.close(fd)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == disk.at[3]
    assert store.generation_report("d0", 3)["kind"] == "full"
    assert exported(store, 3, tmp_path / "after.img") == disk.at[3]


class Crash(BaseException):
    pass


def _crash_once(monkeypatch, target, attr: str, when=lambda *a: True):
    real = getattr(target, attr)
    state = {"armed": True}

    def crashing(*args, **kwargs):
        if state["armed"] and when(*args):
            state["armed"] = False
            raise Crash(attr)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, crashing)


@pytest.mark.parametrize("point", ["fold-before-rename", "fold-after-rename", "merge-before-map",
                                   "discard-after-marker"])
def test_a_discard_interrupted_anywhere_is_finished_after_a_restart(store, no_reflink, tmp_path,
                                                                     monkeypatch, point):
    disk = Disk(store, seed=6)
    disk.change(list(range(COUNT)))
    disk.sync(1)
    for cycle in (2, 3, 4):
        disk.change([cycle * 3, cycle * 3 + 1, 30])
        disk.sync(cycle)
    if point == "fold-before-rename":
        _crash_once(monkeypatch, blockgens.os, "rename", lambda src, dst: str(src).endswith("gen-000001.img"))
        victim = 1
    elif point == "fold-after-rename":
        _crash_once(monkeypatch, blockgens, "settle")
        victim = 1
    elif point == "merge-before-map":
        _crash_once(monkeypatch, blockgens, "write_map")
        victim = 2
    else:
        _crash_once(monkeypatch, blockgens, "finish_discard")
        victim = 3
    with pytest.raises(Crash):
        store.discard_cycle(victim)
    monkeypatch.undo()
    monkeypatch.setattr(blockgens, "try_clone", lambda src, dst: False)
    # the generations the discard did not touch read the same, even before the restart finishes it
    for c in [c for c in (1, 2, 3, 4) if c != victim]:
        assert exported(store, c, tmp_path / "mid.img") == disk.at[c], f"generation {c} mid-discard"
    again = BlockTaskStore(store.root)  # "restart": the next commit finishes the discard first
    disk.store = again
    disk.change([50])
    disk.sync(5)
    assert again.generations() == [c for c in (1, 2, 3, 4, 5) if c != victim]
    for c in again.generations():
        assert exported(again, c, tmp_path / "out.img") == disk.at[c], f"generation {c} after the restart"
    names = [p.name for p in (store.root / "d0").iterdir()]
    assert not [n for n in names if n.endswith(".gone")] and f"gen-{victim:06d}.img" not in names


def test_an_interrupted_commit_is_made_again(store, no_reflink, tmp_path, monkeypatch):
    disk = Disk(store, seed=7)
    disk.change(list(range(COUNT)))
    disk.sync(1)
    disk.change([7])
    _crash_once(monkeypatch, blockgens, "_finish_files")
    with pytest.raises(Crash):
        disk.sync(2)
    assert store.generations() == [1]  # files without a report: not a generation
    (gen,) = BlockTaskStore(store.root).commit_cycle(2)
    assert gen["kind"] == "delta" and gen["delta_chunks"] == 1
    assert exported(store, 2, tmp_path / "out.img") == disk.at[2]


def test_a_delta_generation_is_verified_on_its_composed_image(store, no_reflink, monkeypatch):
    checked: list = []

    def fs_check(path, fs):
        checked.append((Path(path).name, hashlib.sha256(Path(path).read_bytes()).hexdigest()))
        return {"tool": "e2fsck -f -n", "rc": 0, "ok": True, "summary": "clean"}

    monkeypatch.setattr(blockstore, "detect_fs", lambda path: "ext4")
    monkeypatch.setattr(blockstore, "fs_check", fs_check)
    disk = Disk(store, seed=8)
    disk.change(list(range(0, COUNT, 3)))
    disk.sync(1)
    disk.change([4, 5], zero=False)
    disk.sync(2)
    done = store.verify_generation("d0", 2)
    assert done["state"] == "verified" and done["sha256"] == disk.at[2] and done["kind"] == "delta"
    assert checked == [(".check-gen-000002.img", disk.at[2])]  # fsck saw the whole image
    assert done["check"]["on"].startswith("a composed temporary copy")
    assert not list((store.root / "d0").glob(".check-*"))  # removed after the check
    first = store.verify_generation("d0", 1)
    assert first["sha256"] == disk.at[1] and first["check"]["on"] == "the image"
    store.retain(1)  # a fold makes 2 a full image: the verified report keeps its result
    after = store.generation_report("d0", 2)
    assert after["kind"] == "full" and after["sha256"] == disk.at[2] and after["state"] == "verified"
    assert json.loads((store.root / "d0" / "gen-000002.json").read_text())["image"] is True


def test_a_fold_during_the_verification_keeps_its_result(store, no_reflink, monkeypatch):
    disk = Disk(store, seed=9)
    disk.change(list(range(COUNT)))
    disk.sync(1)
    disk.change([9])
    disk.sync(2)
    monkeypatch.setattr(blockstore, "detect_fs", lambda path: None)
    monkeypatch.setattr(blockstore, "VERIFY_STEP", CS)  # a step per chunk hashed

    steps = store.verify_generation_steps("d0", 2)
    next(steps)  # hashing started (composed from 1 and 2)
    store.retain(1)  # fold 1 into 2 meanwhile
    while True:
        try:
            next(steps)
        except StopIteration as end:
            done = end.value
            break
    assert done["sha256"] == disk.at[2] and done["kind"] == "full" and done["path"].endswith("gen-000002.img")


def test_changed_runs_and_run_arithmetic():
    a = bytes(16 * 600)
    b = bytearray(a)
    for i in (0, 1, 2, 300, 599):
        b[i * 16] = 1
    assert blockgens.changed_runs(a, bytes(b)) == [(0, 3), (300, 1), (599, 1)]
    assert blockgens.runs_minus([(0, 10)], [(2, 3), (8, 5)]) == [(0, 2), (5, 3)]
    assert blockgens.runs_union([(0, 2), (5, 3)], [(2, 3), (10, 1)]) == [(0, 8), (10, 1)]


def test_without_room_for_the_composed_copy_the_check_is_skipped_and_the_sha256_verified(store, no_reflink,
                                                                                         monkeypatch):
    monkeypatch.setattr(blockstore, "detect_fs", lambda path: pytest.fail("no check without room"))
    monkeypatch.setattr(blockstore, "_free_bytes", lambda path: 1 << 20)
    disk = Disk(store, seed=10)
    disk.change(list(range(COUNT)))
    disk.sync(1)
    disk.change([3])
    disk.sync(2)
    done = store.verify_generation("d0", 2)
    assert done["state"] == "verified" and done["sha256"] == disk.at[2]
    assert done["check"]["skipped"] == "room" and "not checked" in done["check"]["summary"]
    assert not list((store.root / "d0").glob(".check-*"))
