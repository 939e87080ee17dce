from __future__ import annotations

import os

import pytest

from go2cloud_client.replication.block.codec import zero_hash
from go2cloud_client.replication.block.manifest import FLUSH_EVERY, Manifest, PassJournal

CS = 65536


def h(i: int) -> bytes:
    return i.to_bytes(4, "big") * 4


def test_manifest_roundtrip_and_corruption(tmp_path):
    size = 10 * CS + 100
    m = Manifest(3, CS, size, b"".join(h(i) for i in range(11)))
    path = tmp_path / "d0.manifest"
    m.save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    back = Manifest.load(path)
    assert back is not None
    assert (back.cycle, back.chunk_size, back.disk_size, back.count) == (3, CS, size, 11)
    assert back.hash(10) == h(10) and back.hash(11) is None
    assert back.digest() == m.digest()
    raw = bytearray(path.read_bytes())
    raw[50] ^= 1
    path.write_bytes(bytes(raw))
    assert Manifest.load(path) is None          # CRC catches it: a full pass follows
    assert Manifest.load(tmp_path / "missing") is None
    with pytest.raises(ValueError):
        Manifest(1, CS, size, b"x" * 16)


def _journal(path, cycle=2, size=300 * CS, base=None, incremental=False):
    return PassJournal(path, cycle=cycle, chunk_size=CS, disk_size=size, incremental=incremental, base=base)


def test_resume_replays_acknowledged_chunks_and_holes(tmp_path):
    path = tmp_path / "d0.pass"
    j = _journal(path).open()
    for i in range(100):
        j.mark(i, h(i))
    j.mark(100, b"\0" * 16, count=50)          # a run of holes
    j.mark(150, h(150), sent=False)            # unchanged
    # no close/flush: simulate kill -9 (the records are in the page cache / file)
    again = _journal(path).open()
    assert again.done_count == 151 and again.resumed_chunks == 151
    assert all(again.is_done(i) for i in range(151)) and not again.is_done(151)
    assert again.hashes[99 * 16:100 * 16] == h(99)
    assert again.hashes[120 * 16:121 * 16] == zero_hash(CS)
    again.close()


def test_torn_record_is_cut_off(tmp_path):
    path = tmp_path / "d0.pass"
    j = _journal(path).open()
    for i in range(10):
        j.mark(i, h(i))
    j.close()
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x00\x0b\x00\x00")  # half a record
    again = _journal(path).open()
    assert again.done_count == 10
    again.mark(10, h(10))
    again.close()
    assert _journal(path).open().done_count == 11


def test_flush_every_n_records(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    j = _journal(tmp_path / "d0.pass", size=500 * CS).open()
    synced.clear()
    for i in range(FLUSH_EVERY * 3):
        j.mark(i, h(i))
    assert len(synced) == 3
    # unchanged chunks (a hash scan) never wait for the disk by themselves...
    for i in range(FLUSH_EVERY * 3, FLUSH_EVERY * 4 + 10):
        j.mark(i, h(i), sent=False)
    assert len(synced) == 3
    # ...sent batches count per chunk, and the final flush syncs whatever is left
    j.mark_many([(i, h(i), 1) for i in range(FLUSH_EVERY * 5, FLUSH_EVERY * 6)])
    assert len(synced) == 4
    j.mark(0, h(0), sent=False)
    j.close()
    assert len(synced) == 5
    back = _journal(tmp_path / "d0.pass", size=500 * CS).open()
    assert back.done_count == FLUSH_EVERY * 5 + 10
    back.close()


def test_journal_of_another_pass_is_abandoned_but_its_sent_chunks_stay_dirty(tmp_path):
    path = tmp_path / "d0.pass"
    base = Manifest(1, CS, 300 * CS, b"".join(h(i) for i in range(300)))
    old = _journal(path, cycle=2, base=base, incremental=True).open()
    old.mark(5, h(1005))                     # sent in cycle 2: the target's image has it
    old.mark(6, h(6), sent=False)            # unchanged: not sent
    old.close()
    new = _journal(path, cycle=3, base=base, incremental=True).open()
    assert new.done_count == 0 and new.dirty == {5}
    new.close()
    # the dirty mark survives another crash before the chunk is sent
    again = _journal(path, cycle=3, base=base, incremental=True).open()
    assert again.dirty == {5}
    again.mark(5, h(5))
    again.close()
    assert _journal(path, cycle=3, base=base, incremental=True).open().dirty == set()


def test_mark_dirty_undoes_done(tmp_path):
    path = tmp_path / "d0.pass"
    j = _journal(path).open()
    j.mark(7, h(7))
    j.mark_dirty(7)
    assert not j.is_done(7) and 7 in j.dirty
    j.close()
    again = _journal(path).open()
    assert not again.is_done(7) and again.dirty == {7}


def test_incremental_journal_starts_from_the_manifest_hashes(tmp_path):
    base = Manifest(1, CS, 4 * CS, b"".join(h(i) for i in range(4)))
    j = _journal(tmp_path / "p", size=6 * CS, base=base, incremental=True).open()
    assert j.hashes[:64] == base.hashes and j.hashes[64:] == bytes(32)
    j.close()


def test_a_hash_of_the_wrong_length_is_refused(tmp_path):
    j = _journal(tmp_path / "p").open()
    with pytest.raises(ValueError):
        j.mark(3, b"")
    assert len(j.hash_bytes()) == 300 * 16
    j.close()
