"""Per-disk state of the block engine, in the agent's state directory.

``<disk>.manifest`` — the chunk map (:class:`ChunkMap`): the xxh3-128 of every chunk the target
has **committed** (fixed 16-byte records after a fixed header, CRC-32 at the end), replaced
atomically after each commit (the file keeps its first name)::

    header  >8sIIIIQQ  magic "G2CBMAN1", version, cycle, chunk_size, reserved, disk_size, count
    body    count x 16 bytes (chunk i at offset 40 + 16 i)
    trailer >I         CRC-32 of header and body

``<disk>.pass`` — the journal of the pass in progress: a header naming the cycle and the geometry
it belongs to, then one 28-byte record per finished work item (chunk sent and acknowledged, or
found unchanged), appended with ``write(2)`` as each completes. The journal's own thread (the
flusher) fsyncs it once :data:`FLUSH_EVERY` records of sent chunks are unsynced, and once more
when the transfer ends; the senders wait for it only when another ``FLUSH_EVERY`` came in while
it syncs, or ``2 x FLUSH_EVERY`` before it started (a disk slower than the transfer). They never
wait for the disk otherwise: an fsync waits for every write the filesystem has to order before
its journal commit, the server's own writes included; on the benchmark VM, with the target on
the same disk, each took ~90 ms and 31 of them inline made the pass 20-30% slower. Records of
unchanged chunks alone never wake the flusher (losing them costs a re-read, not a re-send). When
a pass stops early (pause, cancel, error) the journal is fsynced before it is closed; a pass that
commits removes it without waiting for the disk. Replaying it rebuilds the done-map (one bit per
chunk) and the new hashes, so a resumed pass skips what the target already has: after a crash of
the agent (kill -9: the records are in the page cache) it re-sends only the chunks that were in
flight; after a crash of the whole machine also those whose records were not yet synced: those
of the fsync in progress and those that came in meanwhile, typically ``FLUSH_EVERY`` and at most
``3 x FLUSH_EVERY`` plus two batches per sender (a sender appends its whole batch before it
checks). A torn last record is detected by its CRC and cut off::

    header  >8sIIIIQII  magic "G2CBPAS1", version, cycle, chunk_size, flags, disk_size,
                        base_cycle, CRC-32 of the preceding header bytes
    record  >II16sI     first chunk, count, xxh3-128, CRC-32 of the preceding 24 bytes
            count = 1: one chunk with that hash; count > 1: a run of holes (each chunk hashes
            as zeros of its length); count = 0: "dirty", the chunk must be sent in this pass
            (carried over from an abandoned pass of an earlier cycle); bit 31 of count set:
            the chunk was found unchanged (not sent)

A journal whose header does not match the pass being started (other cycle, geometry or base)
is abandoned, but the chunks it sent are carried over as dirty: the target's image already
holds them although the chunk map does not say so, so the new pass sends them again.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Optional, Sequence, Set, Tuple

import xxhash

from go2cloud_client.atomicfile import atomic_write
from go2cloud_client.replication.block.codec import zero_hash

LOG = logging.getLogger(__name__)

HASH_LEN = 16
CHUNK_MAP_VERSION = 1
PASS_VERSION = 1
FLUSH_EVERY = 64
_MAN_HEAD = struct.Struct(">8sIIIIQQ")
_MAN_MAGIC = b"G2CBMAN1"
_PASS_HEAD = struct.Struct(">8sIIIIQII")
_PASS_MAGIC = b"G2CBPAS1"
_REC = struct.Struct(">II16sI")
FLAG_INCREMENTAL = 1
UNCHANGED = 1 << 31


def chunk_count(disk_size: int, chunk_size: int) -> int:
    return -(-disk_size // chunk_size)


def chunk_length(index: int, chunk_size: int, disk_size: int) -> int:
    return min(chunk_size, disk_size - index * chunk_size)


class ChunkMap:
    """Hashes of the chunks the target committed at ``cycle``."""

    def __init__(self, cycle: int, chunk_size: int, disk_size: int, hashes: bytes) -> None:
        if len(hashes) != chunk_count(disk_size, chunk_size) * HASH_LEN:
            raise ValueError("manifest: hash count does not match the geometry")
        self.cycle = cycle
        self.chunk_size = chunk_size
        self.disk_size = disk_size
        self.hashes = bytes(hashes)

    @property
    def count(self) -> int:
        return len(self.hashes) // HASH_LEN

    def digest(self) -> str:
        """xxh3-128 hex of the hash list (the target reports the same for what it committed)."""
        return xxhash.xxh3_128(self.hashes).hexdigest()

    def hash(self, index: int) -> Optional[bytes]:
        if 0 <= index < self.count:
            return self.hashes[index * HASH_LEN:(index + 1) * HASH_LEN]
        return None

    def encode(self) -> bytes:
        head = _MAN_HEAD.pack(_MAN_MAGIC, CHUNK_MAP_VERSION, self.cycle, self.chunk_size, 0, self.disk_size,
                              self.count)
        crc = zlib.crc32(self.hashes, zlib.crc32(head))
        return head + self.hashes + struct.pack(">I", crc)

    def save(self, path: Path) -> None:
        atomic_write(path, self.encode())

    @classmethod
    def decode(cls, raw: bytes) -> ChunkMap:
        if len(raw) < _MAN_HEAD.size + 4:
            raise ValueError("manifest: too short")
        magic, version, cycle, chunk_size, _, disk_size, count = _MAN_HEAD.unpack_from(raw)
        if magic != _MAN_MAGIC or version != CHUNK_MAP_VERSION:
            raise ValueError("manifest: not a version-1 manifest")
        end = _MAN_HEAD.size + count * HASH_LEN
        if len(raw) != end + 4:
            raise ValueError("manifest: size does not match its header")
        (crc,) = struct.unpack_from(">I", raw, end)
        if zlib.crc32(raw[:end]) != crc:
            raise ValueError("manifest: CRC mismatch")
        return cls(cycle, chunk_size, disk_size, raw[_MAN_HEAD.size:end])

    @classmethod
    def load(cls, path: Path) -> Optional[ChunkMap]:
        """The chunk map at ``path``; None when missing or unreadable (logged: a full pass follows)."""
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return cls.decode(raw)
        except ValueError as exc:
            LOG.warning("ignoring %s (%s): the next pass sends every chunk", path, exc)
            return None


class PassJournal:
    """Done-map and new hashes of one pass over one disk, persisted as an append-only journal.

    Thread-safe: :meth:`mark` is called from the sender threads, and the journal's flusher thread
    (started at the first :data:`FLUSH_EVERY` sent records) fsyncs it; :meth:`close` stops the
    flusher, so nothing may mark the journal after (or while) it is closed.
    """

    def __init__(self, path: Path, *, cycle: int, chunk_size: int, disk_size: int, incremental: bool,
                 base: Optional[ChunkMap]) -> None:
        self.path = Path(path)
        self.cycle = cycle
        self.chunk_size = chunk_size
        self.disk_size = disk_size
        self.count = chunk_count(disk_size, chunk_size)
        self.flags = FLAG_INCREMENTAL if incremental else 0
        self.base_cycle = base.cycle if base is not None else 0
        self.hashes = bytearray(self.count * HASH_LEN)
        if base is not None and base.chunk_size == chunk_size:
            n = min(base.count, self.count) * HASH_LEN
            self.hashes[:n] = base.hashes[:n]
        self.done = bytearray(-(-self.count // 8))
        self.done_count = 0
        self.dirty: Set[int] = set()
        self.resumed_chunks = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._fd: Optional[int] = None
        self._unsynced = 0
        self._unsynced_sent = 0
        self._flusher: Optional[threading.Thread] = None
        self._syncing = False
        self._closing = False
        self._sync_soon = False
        self._sync_failed = False

    # -- bitmap ----------------------------------------------------------------------------------
    def is_done(self, index: int) -> bool:
        return bool(self.done[index >> 3] & (1 << (index & 7)))

    def _set(self, index: int, count: int, digest: bytes) -> None:
        if count == 1 and len(digest) != HASH_LEN:
            raise ValueError(f"chunk {index}: a hash of {len(digest)} bytes, expected {HASH_LEN}")
        for i in range(index, min(index + count, self.count)):
            if count > 1:
                h = zero_hash(chunk_length(i, self.chunk_size, self.disk_size))
            else:
                h = digest
            self.hashes[i * HASH_LEN:(i + 1) * HASH_LEN] = h
            bit = 1 << (i & 7)
            if not self.done[i >> 3] & bit:
                self.done[i >> 3] |= bit
                self.done_count += 1
            self.dirty.discard(i)

    # -- file ------------------------------------------------------------------------------------
    def _header(self) -> bytes:
        head = _PASS_HEAD.pack(_PASS_MAGIC, PASS_VERSION, self.cycle, self.chunk_size, self.flags,
                               self.disk_size, self.base_cycle, 0)
        return head[:-4] + struct.pack(">I", zlib.crc32(head[:-4]))

    @staticmethod
    def _records(raw: bytes):
        off = _PASS_HEAD.size
        while off + _REC.size <= len(raw):
            index, count, digest, crc = _REC.unpack_from(raw, off)
            if zlib.crc32(raw[off:off + _REC.size - 4]) != crc:
                break
            yield off + _REC.size, index, count & ~UNCHANGED, digest, not count & UNCHANGED
            off += _REC.size

    def open(self) -> PassJournal:
        """Resume from the journal at ``path`` if it belongs to this pass, else start a new one
        (carrying over the chunks an abandoned pass sent as dirty)."""
        header = self._header()
        carried: Set[int] = set()
        self._closing = False
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raw = b""
        good = 0
        if raw[:_PASS_HEAD.size] == header:
            good = _PASS_HEAD.size
            for end, index, count, digest, _sent in self._records(raw):
                if index >= self.count:
                    break
                if count == 0:
                    self._unset(index)
                else:
                    self._set(index, count, digest)
                good = end
            self.resumed_chunks = self.done_count
            LOG.info("resuming the pass of cycle %s from %s: %s of %s chunks already done", self.cycle,
                     self.path.name, self.done_count, self.count)
        elif raw:
            for _, index, count, _digest, sent in self._records(raw):
                if sent:
                    carried.update(range(index, index + max(count, 1)))
            LOG.info("abandoning %s (another pass); %s chunks it sent are sent again", self.path.name,
                     len(carried))
        if good:
            fd = os.open(str(self.path), os.O_WRONLY | os.O_CLOEXEC)
            os.ftruncate(fd, good)  # cut a torn record
            os.close(fd)
        else:
            atomic_write(self.path, header)
        self._fd = os.open(str(self.path), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        new_dirty = sorted(i for i in carried if i < self.count and i not in self.dirty)
        for i in new_dirty:
            self.dirty.add(i)
            self._append(i, 0, bytes(HASH_LEN))
        if new_dirty:
            self.flush()
        return self

    @staticmethod
    def _record(index: int, count: int, digest: bytes) -> bytes:
        rec = _REC.pack(index, count, digest, 0)
        return rec[:-4] + struct.pack(">I", zlib.crc32(rec[:-4]))

    def _append(self, index: int, count: int, digest: bytes) -> None:
        assert self._fd is not None, "journal not open"
        os.write(self._fd, self._record(index, count, digest))
        self._unsynced += 1

    def _wake_flusher(self) -> None:
        """(Lock held.) Start the flusher if it is not running, and wake it."""
        if self._flusher is None:
            flusher = threading.Thread(target=self._flush_loop, name=f"journal-{self.path.name}",
                                       daemon=True)
            flusher.start()
            self._flusher = flusher
        self._wake.notify_all()

    def _sync_every(self, sent: int) -> None:
        """(Lock held.) Wake the flusher once :data:`FLUSH_EVERY` records of sent chunks are
        unsynced; wait for it while it syncs and another ``FLUSH_EVERY`` came in, or while twice
        that wait for it to start."""
        self._unsynced_sent += sent
        if self._unsynced_sent < FLUSH_EVERY:
            return
        self._wake_flusher()
        while not self._closing and (self._unsynced_sent >= 2 * FLUSH_EVERY
                                     or (self._syncing and self._unsynced_sent >= FLUSH_EVERY)):
            self._wake.wait()

    def sync_soon(self) -> None:
        """Have the flusher fsync whatever is unsynced (records of unchanged chunks included),
        without waiting for it: the transfer ended, a verify or the commit comes next."""
        with self._lock:
            if self._fd is not None and self._unsynced and not self._closing:
                self._sync_soon = True
                self._wake_flusher()

    def _flush_loop(self) -> None:
        """The flusher: fsync, outside the lock, what was appended before it took the records'
        count (records appended meanwhile count for the next fsync)."""
        while True:
            with self._lock:
                while not (self._closing or self._unsynced_sent >= FLUSH_EVERY
                           or (self._sync_soon and self._unsynced)):
                    self._wake.wait()
                if self._closing or self._fd is None:
                    return
                fd = self._fd
                self._unsynced = self._unsynced_sent = 0
                self._sync_soon = False
                self._syncing = True
            try:
                os.fsync(fd)
            except OSError as exc:
                # the journal only bounds what a crash makes the next pass re-send: the pass goes
                # on (the fsync when a pass stops early tries again; it may not see this error)
                if not self._sync_failed:
                    self._sync_failed = True
                    LOG.warning("cannot sync the pass journal %s (%s): a crash of this machine during "
                                "this pass would make the next one re-send more", self.path, exc.strerror)
                with self._lock:
                    self._unsynced += 1
            finally:
                with self._lock:
                    self._syncing = False
                    self._wake.notify_all()

    def _sync_now(self) -> None:
        """(Lock held.) fsync here, after a running background fsync is done with the fd."""
        while self._syncing:
            self._wake.wait()
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
            self._unsynced = self._unsynced_sent = 0

    def mark(self, index: int, digest: bytes, count: int = 1, sent: bool = True) -> None:
        """Chunk ``index`` (or hole run ``index``..``index+count-1``) is on the target: sent and
        acknowledged, or (``sent=False``) unchanged since the committed chunk map."""
        with self._lock:
            self._set(index, count, digest)
            self._append(index, count if sent else count | UNCHANGED, digest)
            if sent:
                self._sync_every(1)

    def mark_many(self, items: Sequence[Tuple[int, bytes, int]]) -> None:
        """:meth:`mark` (sent) of several ``(index, digest, count)`` at once, in one write."""
        with self._lock:
            recs = []
            for index, digest, count in items:
                self._set(index, count, digest)
                recs.append(self._record(index, count, digest))
            assert self._fd is not None, "journal not open"
            os.write(self._fd, b"".join(recs))
            self._unsynced += len(recs)
            self._sync_every(len(recs))

    def _unset(self, index: int) -> None:
        bit = 1 << (index & 7)
        if self.done[index >> 3] & bit:
            self.done[index >> 3] &= ~bit & 0xFF
            self.done_count -= 1
        self.dirty.add(index)

    def mark_dirty(self, index: int) -> None:
        """Chunk ``index`` must be sent again in this pass (the verify pass found it different)."""
        with self._lock:
            self._unset(index)
            self._append(index, 0, bytes(HASH_LEN))  # the caller flushes once it marked them all

    def flush(self) -> None:
        """fsync every record appended so far (waits for a background fsync in progress)."""
        with self._lock:
            self._sync_now()

    def close(self, sync: bool = True) -> None:
        """Stop the flusher and close the file, fsynced first unless ``sync`` is False (the
        flusher is stopped and the file closed even when that fsync fails)."""
        try:
            if sync:
                self.flush()
        finally:
            with self._lock:
                self._closing = True
                self._wake.notify_all()
                flusher, self._flusher = self._flusher, None
            if flusher is not None:
                flusher.join()  # it fsyncs outside the lock: the fd stays open until it is done
            with self._lock:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None

    def remove(self) -> None:
        """Delete the journal (its pass is committed): no fsync of a file about to go."""
        self.close(sync=False)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def hash_bytes(self) -> bytes:
        return bytes(self.hashes)
