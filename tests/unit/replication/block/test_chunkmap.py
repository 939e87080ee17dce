from __future__ import annotations

import errno
import os
import threading
from typing import Optional

import pytest

from go2cloud_client.replication.block.chunkmap import FLUSH_EVERY, ChunkMap, PassJournal
from go2cloud_client.replication.block.codec import zero_hash

CS = 65536


def h(i: int) -> bytes:
    return i.to_bytes(4, "big") * 4


def test_manifest_roundtrip_and_corruption(tmp_path):
    size = 10 * CS + 100
    m = ChunkMap(3, CS, size, b"".join(h(i) for i in range(11)))
    path = tmp_path / "d0.manifest"
    m.save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    back = ChunkMap.load(path)
    assert back is not None
    assert (back.cycle, back.chunk_size, back.disk_size, back.count) == (3, CS, size, 11)
    assert back.hash(10) == h(10) and back.hash(11) is None
    assert back.digest() == m.digest()
    raw = bytearray(path.read_bytes())
    raw[50] ^= 1
    path.write_bytes(bytes(raw))
    assert ChunkMap.load(path) is None          # CRC catches it: a full pass follows
    assert ChunkMap.load(tmp_path / "missing") is None
    with pytest.raises(ValueError):
        ChunkMap(1, CS, size, b"x" * 16)


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


class _Fsyncs:
    """os.fsync, recorded: which fd, from which thread; ``gate`` cleared = the next fsync blocks
    until the test sets it (a disk that is slow to sync, which a test cannot make real here)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Semaphore(0)
        self.error: Optional[OSError] = None
        self.running = self.most_at_once = 0
        lock = threading.Lock()
        real = os.fsync

        def fsync(fd: int) -> None:
            self.calls.append((fd, threading.current_thread().name))
            with lock:
                self.running += 1
                self.most_at_once = max(self.most_at_once, self.running)
            try:
                self.started.release()
                assert self.gate.wait(30), "fsync held for 30 s"
                if self.error is not None:
                    raise self.error
                real(fd)
            finally:
                with lock:
                    self.running -= 1

        monkeypatch.setattr(os, "fsync", fsync)

    def wait_started(self) -> None:
        assert self.started.acquire(timeout=30), "no fsync started"


def _in_thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


class _Waits(threading.Condition):
    """Stands for a journal's condition (``_wake``, over the same lock) and records which threads
    went to wait on it: a positive sign that a thread decided to wait, instead of a sleep."""

    def __init__(self, lock) -> None:
        super().__init__(lock)
        self._guard = threading.Lock()
        self._waited: dict = {}

    def _event(self, thread: threading.Thread) -> threading.Event:
        with self._guard:
            return self._waited.setdefault(thread, threading.Event())

    def wait(self, timeout: Optional[float] = None) -> bool:
        self._event(threading.current_thread()).set()
        return super().wait(timeout)

    def wait_until_waiting(self, thread: threading.Thread, what: str) -> None:
        assert self._event(thread).wait(30), f"{what}: {thread.name} never waited"


def _watch_waits(j: PassJournal) -> _Waits:
    """Install a :class:`_Waits` as the journal's condition (before any of its threads exist)."""
    assert j._flusher is None
    j._wake = waits = _Waits(j._lock)
    return waits


def test_journal_syncs_in_the_background_every_n_sent_records(tmp_path, monkeypatch):
    j = _journal(tmp_path / "d0.pass", size=500 * CS).open()
    fs = _Fsyncs(monkeypatch)
    for i in range(FLUSH_EVERY - 1):
        j.mark(i, h(i))
    # unchanged chunks (a hash scan) never wait for the disk by themselves
    for i in range(FLUSH_EVERY, FLUSH_EVERY * 3):
        j.mark(i, h(i), sent=False)
    assert fs.calls == []
    j.mark(FLUSH_EVERY - 1, h(FLUSH_EVERY - 1))
    fs.wait_started()
    assert len(fs.calls) == 1 and fs.calls[0][1] == "journal-d0.pass"  # not the caller's thread
    # a batch counts per chunk
    j.mark_many([(i, h(i), 1) for i in range(FLUSH_EVERY * 3, FLUSH_EVERY * 4)])
    fs.wait_started()
    assert [name for _fd, name in fs.calls] == ["journal-d0.pass"] * 2
    j.close()  # joins the flusher: an early or extra background fsync would show now
    assert len(fs.calls) == 2
    back = _journal(tmp_path / "d0.pass", size=500 * CS).open()
    assert back.done_count == FLUSH_EVERY * 4
    back.close()


def test_a_flush_waits_for_the_background_fsync_then_syncs_what_came_after(tmp_path, monkeypatch):
    j = _journal(tmp_path / "d0.pass", size=500 * CS).open()
    waits = _watch_waits(j)
    fs = _Fsyncs(monkeypatch)
    fs.gate.clear()
    j.mark_many([(i, h(i), 1) for i in range(FLUSH_EVERY)])
    fs.wait_started()                       # the background fsync is stuck
    j.mark(FLUSH_EVERY, h(FLUSH_EVERY))     # not covered by it for sure
    flush = _in_thread(j.flush)
    waits.wait_until_waiting(flush, "a flush during a background fsync")
    assert flush.is_alive() and [name for _fd, name in fs.calls] == ["journal-d0.pass"]
    fs.gate.set()
    flush.join(30)
    assert not flush.is_alive()
    assert [name for _fd, name in fs.calls] == ["journal-d0.pass", flush.name]
    assert fs.most_at_once == 1             # the flush's fsync started after the background one
    j.close()
    assert len(fs.calls) == 2               # nothing left to sync


def test_sync_soon_syncs_unchanged_records_in_the_background_without_waiting(tmp_path, monkeypatch):
    j = _journal(tmp_path / "d0.pass", size=500 * CS).open()
    fs = _Fsyncs(monkeypatch)
    fs.gate.clear()
    for i in range(10):
        j.mark(i, h(i), sent=False)         # a hash scan: never wakes the flusher by itself
    j.sync_soon()                           # returns although the fsync it asks for is stuck
    fs.wait_started()
    assert [name for _fd, name in fs.calls] == ["journal-d0.pass"]
    fs.gate.set()
    j.close()
    assert len(fs.calls) == 1
    j2 = _journal(tmp_path / "d0.pass", size=500 * CS).open()
    j2.sync_soon()                          # nothing unsynced: no fsync, no thread
    j2.close()
    assert len(fs.calls) == 1


def test_close_stops_the_flusher_and_closes_the_file_when_its_fsync_fails(tmp_path, monkeypatch):
    j = _journal(tmp_path / "d0.pass", size=500 * CS).open()
    fs = _Fsyncs(monkeypatch)
    before = set(threading.enumerate())
    j.mark_many([(i, h(i), 1) for i in range(FLUSH_EVERY)])
    fs.wait_started()
    (flusher,) = set(threading.enumerate()) - before
    j.mark(FLUSH_EVERY, h(FLUSH_EVERY))
    fs.error = OSError(errno.EIO, "Input/output error")
    with pytest.raises(OSError):
        j.close()
    assert not flusher.is_alive() and flusher.name == "journal-d0.pass"
    assert j._fd is None


def test_senders_wait_for_a_slow_fsync_only_after_another_n_records(tmp_path, monkeypatch):
    j = _journal(tmp_path / "d0.pass", size=500 * CS).open()
    waits = _watch_waits(j)
    fs = _Fsyncs(monkeypatch)
    fs.gate.clear()
    j.mark_many([(i, h(i), 1) for i in range(FLUSH_EVERY)])  # wakes the flusher, returns
    fs.wait_started()                                        # the flusher's fsync is stuck
    first = _in_thread(lambda: j.mark_many([(i, h(i), 1) for i in range(FLUSH_EVERY, 2 * FLUSH_EVERY - 1)]))
    first.join(30)
    assert not first.is_alive(), "a sender waited for the disk before another FLUSH_EVERY records"
    second = _in_thread(lambda: j.mark(2 * FLUSH_EVERY - 1, h(2 * FLUSH_EVERY - 1)))
    waits.wait_until_waiting(second, "the unsynced records grow without bound while an fsync is stuck")
    assert second.is_alive()
    fs.gate.set()
    second.join(30)
    assert not second.is_alive()
    fs.wait_started()  # the records that came in meanwhile are synced next
    j.close()
    back = _journal(tmp_path / "d0.pass", size=500 * CS).open()
    assert back.done_count == 2 * FLUSH_EVERY
    back.close()


def test_close_syncs_what_is_left_but_remove_does_not(tmp_path, monkeypatch):
    path = tmp_path / "d0.pass"
    j = _journal(path, size=500 * CS).open()
    fs = _Fsyncs(monkeypatch)
    for i in range(10):
        j.mark(i, h(i))
    j.mark(10, h(10), sent=False)
    assert fs.calls == []
    j.close()  # a pass that stops (pause, cancel, error): the journal must survive a crash
    assert len(fs.calls) == 1 and fs.calls[0][1] == threading.current_thread().name
    j2 = _journal(path, size=500 * CS).open()
    assert j2.done_count == 11
    fs.calls.clear()
    j2.mark_many([(i, h(i), 1) for i in range(20, 30)])
    j2.remove()  # the pass committed: nothing to sync in a file about to go
    assert fs.calls == [] and not path.exists()


def test_journal_of_another_pass_is_abandoned_but_its_sent_chunks_stay_dirty(tmp_path):
    path = tmp_path / "d0.pass"
    base = ChunkMap(1, CS, 300 * CS, b"".join(h(i) for i in range(300)))
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
    base = ChunkMap(1, CS, 4 * CS, b"".join(h(i) for i in range(4)))
    j = _journal(tmp_path / "p", size=6 * CS, base=base, incremental=True).open()
    assert j.hashes[:64] == base.hashes and j.hashes[64:] == bytes(32)
    j.close()


def test_a_hash_of_the_wrong_length_is_refused(tmp_path):
    j = _journal(tmp_path / "p").open()
    with pytest.raises(ValueError):
        j.mark(3, b"")
    assert len(j.hash_bytes()) == 300 * 16
    j.close()
