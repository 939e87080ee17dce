"""Block-level replication of whole disks (DESIGN section 5) to the HTTPS block target.

One pass per disk per cycle:

1. **Check the input.** Each disk's path must be a block device or a regular (image) file we can
   read; a path that is missing, unreadable or empty, or a device *smaller* than the committed
   chunk map says, is a :class:`BlockSourceError` before anything is sent.
2. **Plan.** The target's committed state (``GET .../disks/<disk>``) is compared with the local
   chunk map (cycle and digest of the hash list). If they agree, an incremental pass sends only
   chunks whose xxh3-128 differs from the chunk map (or, when ``changed_extents(disk)`` returns a
   list, only chunks overlapping those extents); otherwise every chunk is sent. A journal of the
   pass (``chunkmap.PassJournal``) resumes an interrupted pass of the same cycle.
3. **Transfer.** ``workers`` threads (default: one per core) read aligned chunks with
   ``os.pread`` and drop them from the page cache right after (``posix_fadvise(DONTNEED)``: we
   chose fadvise over O_DIRECT because it needs no aligned buffers, works on every filesystem and
   image file, and the kernel still does read-ahead), hash them (xxh3-128; BLAKE3 when checksum
   verification is on), skip unchanged ones, and compress the rest with their own zstd context
   (with no bandwidth limit, only while compressing measurably moves the disk faster than sending
   raw: :mod:`.adaptive`).
   All-zero chunks become holes (no body); on image files the holes are found with SEEK_DATA
   without reading them, and a run of them travels as one item. ``workers`` sender threads take
   the bytes from the shared token bucket and send what is ready as one batch (one request of up
   to :data:`BATCH_BYTES` of chunks; one keep-alive connection each): the per-request cost (HTTP
   parsing on both ends, the answer's round trip) is paid once per batch instead of per chunk,
   and the receiver checks every chunk of a batch before it writes any. Every acknowledged
   chunk is appended to the journal.
4. **Verify** (checksum on): the target reads its image back and names the chunks whose hash
   differs; those are sent again, and verified again (up to :data:`VERIFY_ROUNDS`).
5. **Commit.** ``POST .../commit`` with every chunk's hash; the target fsyncs and records the
   cycle; then the chunk map is replaced atomically and the journal removed.

In flight at any moment: at most ``workers`` chunks being encoded, one batch queued and one batch
per sender being sent (:attr:`BlockReplicator.inflight_window`); a resumed pass re-sends at most
those. ``set_options`` changes bandwidth and compression at once and checksum from the next chunk.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

from go2cloud_client import backoff
from go2cloud_client.clock import utc_now
from go2cloud_client.proxy import ProxyURL
from go2cloud_client.replication.base import CycleResult, PathProgress, Progress, TransferCancelled
from go2cloud_client.replication.block import adaptive, codec
from go2cloud_client.replication.block.bucket import BURST_S, TokenBucket, mbps_to_bytes
from go2cloud_client.replication.block.chunkmap import (
    HASH_LEN,
    ChunkMap,
    PassJournal,
    chunk_count,
    chunk_length,
)
from go2cloud_client.replication.block.errors import (
    BlockSourceError,
    BlockTargetError,
    BlockTargetRejectedError,
)
from go2cloud_client.replication.block.transport import BlockClient, ChunkRefused, check_target_url

LOG = logging.getLogger(__name__)

MIN_CHUNK = 64 * 1024
MAX_CHUNK = 4 * 1024 * 1024
MAX_HOLE_RUN = 4096
#: a batch (one request) carries at most this many bytes of chunks, and at most BATCH_FRAMES items
BATCH_BYTES = 8 * 1024 * 1024
BATCH_FRAMES = 16
VERIFY_ROUNDS = 3
REFUSED_RETRIES = 3
PROGRESS_INTERVAL = 0.5
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_DONE = object()

Extents = List[Tuple[int, int]]


def batch_frames(chunk_size: int) -> int:
    return max(2, min(BATCH_FRAMES, BATCH_BYTES // chunk_size))


@dataclass(frozen=True)
class BlockTarget:
    url: str
    token: str = field(repr=False)
    fingerprint: str
    #: the agent's session epoch (``X-Go2cloud-Epoch`` on every request; 0: none)
    epoch: int = 0
    #: the agent's proxy for the target's host (None: direct)
    proxy: Optional[ProxyURL] = None

    def __repr__(self) -> str:
        return f"BlockTarget(url={self.url!r}, token='***', fingerprint={self.fingerprint!r})"


@dataclass(frozen=True)
class BlockOptions:
    bandwidth_mbps: int = 0
    compression: int = 7
    checksum: bool = False
    chunk_size: int = 1 << 20
    workers: int = 0  # 0 = os.cpu_count()

    def validate(self) -> BlockOptions:
        codec.zstd_level(self.compression)
        mbps_to_bytes(self.bandwidth_mbps)
        cs = self.chunk_size
        if not MIN_CHUNK <= cs <= MAX_CHUNK or cs & (cs - 1):
            raise ValueError(f"chunk_size must be a power of two in {MIN_CHUNK}-{MAX_CHUNK}, not {cs}")
        if not 0 <= self.workers <= 256:
            raise ValueError("workers must be 0-256")
        return self


@dataclass(frozen=True)
class Disk:
    name: str
    path: str


@dataclass(frozen=True)
class BlockCycle:
    number: int
    incremental: bool
    #: a verification pass (after another agent session wrote to the target, fencing): the
    #: journal of an interrupted pass is not trusted (another session may have written what it
    #: says is done), every chunk is hashed, and the target's image is compared with all of them
    #: (differing chunks sent again) whatever the checksum option says
    reverify: bool = False


@dataclass
class BlockCycleResult(CycleResult):
    """``files`` is the number of disks; the chunk counters add up over all disks."""

    chunks_total: int = 0
    chunks_sent: int = 0        # data chunks sent (raw or zstd), including re-sends
    chunks_compressed: int = 0  # of those, sent zstd-compressed
    chunks_holes: int = 0       # all-zero chunks sent as holes
    chunks_unchanged: int = 0   # found equal to the committed chunk map (or outside changed extents)
    chunks_resumed: int = 0     # already done by an interrupted run of the same pass
    chunks_repaired: int = 0    # sent again after the verify pass found them different
    bytes_read: int = 0
    bytes_zero: int = 0
    verify_rounds: int = 0
    disks: List[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update({k: getattr(self, k) for k in (
            "chunks_total", "chunks_sent", "chunks_compressed", "chunks_holes", "chunks_unchanged",
            "chunks_resumed", "chunks_repaired", "bytes_read", "bytes_zero", "verify_rounds", "disks")})
        return d


def check_disk_name(name: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not set(name) <= _NAME_CHARS \
            or name in (".", ".."):
        raise ValueError(f"invalid disk name {name!r}: 1-64 of A-Z a-z 0-9 . _ -")
    return name


class _Source:
    """A disk opened for reading: block device or image file."""

    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        hint = ("check the disk path (a block device such as /dev/sdb or an image file) and that the "
                "snapshot it comes from still exists")
        try:
            self.fd = os.open(disk.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise BlockSourceError(f"disk {disk.name}: {disk.path} does not exist: {hint}") from None
        except PermissionError:
            raise BlockSourceError(f"disk {disk.name}: {disk.path} is not readable (permission denied): "
                                   "run the agent as root") from None
        except OSError as exc:
            raise BlockSourceError(
                f"disk {disk.name}: cannot open {disk.path} ({exc.strerror}): {hint}") from None
        try:
            st = os.fstat(self.fd)
            self.regular = stat.S_ISREG(st.st_mode)
            if not (self.regular or stat.S_ISBLK(st.st_mode)):
                raise BlockSourceError(f"disk {disk.name}: {disk.path} is neither a block device nor an "
                                       f"image file: {hint}")
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
            if self.size <= 0:
                raise BlockSourceError(f"disk {disk.name}: {disk.path} is empty (0 bytes): {hint}")
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
            while len(data) < length:
                more = os.pread(self.fd, length - len(data), offset + len(data))
                if not more:
                    raise OSError(errno.EIO, "unexpected end of the device")
                data += more
        except OSError as exc:
            raise BlockSourceError(
                f"disk {self.disk.name}: reading {self.disk.path} at offset {offset} failed "
                f"({exc.strerror}): check the device for I/O errors (dmesg)") from None
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        return data

    def data_map(self, chunk_size: int, count: int) -> Optional[bytearray]:
        """One byte per chunk, 1 where the image file may hold data; None for block devices (or
        when SEEK_DATA is unsupported): every chunk must be read."""
        if not self.regular:
            return None
        marks = bytearray(count)
        pos = 0
        try:
            while pos < self.size:
                try:
                    start = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break
                    raise
                end = min(os.lseek(self.fd, start, os.SEEK_HOLE), self.size)
                for i in range(start // chunk_size, -(-end // chunk_size)):
                    marks[i] = 1
                pos = end
        except OSError:
            return None
        return marks

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class _Holes:
    first: int
    count: int


_Item = Union[int, _Holes]


class _DiskPass:
    """Counters and shared state of the pass over one disk."""

    def __init__(self, disk: Disk, src: _Source, journal: PassJournal, base: Optional[ChunkMap],
                 candidates: Optional[bytearray], progress: PathProgress) -> None:
        self.disk = disk
        self.src = src
        self.journal = journal
        self.base = base
        self.candidates = candidates
        self.progress = progress
        self.chunk_size = journal.chunk_size
        self.size = journal.disk_size
        self.count = journal.count
        self.sent = self.compressed = self.holes = self.unchanged = self.repaired = 0
        self.bytes_read = self.bytes_zero = 0
        self.started = time.monotonic()
        self.done_at_start = 0

    def length(self, index: int) -> int:
        return chunk_length(index, self.chunk_size, self.size)

    def base_hash(self, index: int) -> Optional[bytes]:
        if self.base is None or index in self.journal.dirty:
            return None
        return self.base.hash(index)


class BlockReplicator:
    """Replicates ``disks`` to one block target, one cycle at a time (one :meth:`run_cycle` at a
    time; :meth:`set_options` may be called from any thread meanwhile)."""

    def __init__(
        self,
        *,
        target: BlockTarget,
        disks: Sequence[Disk],
        options: BlockOptions,
        state_dir: Path,
        on_progress: Callable[[Progress], None] = lambda p: None,
        changed_extents: Optional[Callable[[str], Optional[Extents]]] = None,
    ) -> None:
        if not disks:
            raise ValueError("no disks to replicate")
        names = [check_disk_name(d.name) for d in disks]
        if len(set(names)) != len(names):
            raise ValueError("disk names must be unique")
        check_target_url(target.url)
        self.target = target
        self.disks = list(disks)
        self._options = options.validate()
        self.state_dir = Path(state_dir)
        self.on_progress = on_progress
        self.changed_extents = changed_extents
        self.workers = options.workers or os.cpu_count() or 1
        self.bucket = TokenBucket(mbps_to_bytes(options.bandwidth_mbps))
        self.adaptive = adaptive.AdaptiveCompression()
        self._lock = threading.Lock()
        self._last_emit = 0.0
        self._progress: List[PathProgress] = []
        self._batches = True  # False once the target said it takes no batches

    @property
    def options(self) -> BlockOptions:
        return self._options

    @property
    def batch_frames(self) -> int:
        """Most chunks (or runs of holes) in one request: :data:`BATCH_BYTES` of chunks, 2-16."""
        return batch_frames(self._options.chunk_size)

    @property
    def inflight_window(self) -> int:
        """Chunks that can be read but not yet acknowledged at any moment: one being encoded per
        worker, a batch queued, a batch being sent per sender."""
        return self._inflight(self.batch_frames)

    def _inflight(self, frames: int) -> int:
        return self.workers + frames + self.workers * frames

    def set_options(self, options: BlockOptions) -> None:
        """Bandwidth and compression apply at once (the next token taken, the next chunk
        compressed), checksum from the next chunk read. Chunk size and workers apply from the next
        cycle."""
        options.validate()
        self._options = options
        self.bucket.set_rate(mbps_to_bytes(options.bandwidth_mbps))

    # -- paths -----------------------------------------------------------------------------------
    def manifest_path(self, disk: str) -> Path:
        return self.state_dir / f"{disk}.manifest"

    def journal_path(self, disk: str) -> Path:
        return self.state_dir / f"{disk}.pass"

    # -- progress --------------------------------------------------------------------------------
    def snapshot(self) -> Progress:
        with self._lock:
            paths = [PathProgress(**vars(p)) for p in self._progress]
        total = sum(p.bytes_total for p in paths)
        done = sum(p.bytes_done for p in paths)
        rate = sum(p.rate_bps for p in paths if p.state == "running")
        eta = max(0.0, (total - done) / rate) if rate > 0 else None
        return Progress(bytes_total=total, bytes_done=done, bytes_sent=sum(p.bytes_sent for p in paths),
                        rate_bps=rate, eta_s=eta, paths=paths)

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_emit < PROGRESS_INTERVAL:
                return
            self._last_emit = now
        try:
            self.on_progress(self.snapshot())
        except Exception:
            LOG.exception("progress callback failed")

    def _account(self, dp: _DiskPass, *, done: int = 0, sent: int = 0, zero: int = 0) -> None:
        with self._lock:
            p = dp.progress
            p.bytes_done = min(p.bytes_total, p.bytes_done + done)
            p.bytes_sent += sent
            p.bytes_zero += zero
            elapsed = time.monotonic() - dp.started
            if elapsed > 0.5:
                p.rate_bps = (p.bytes_done - dp.done_at_start) / elapsed
                p.eta_s = (p.bytes_total - p.bytes_done) / p.rate_bps if p.rate_bps > 0 else None
        self._emit()

    # -- cycle -----------------------------------------------------------------------------------
    def run_cycle(self, cycle: BlockCycle, cancel: threading.Event) -> BlockCycleResult:
        """Replicate every disk and commit it as ``cycle``. Raises TransferCancelled when
        ``cancel`` is set (the pass resumes on the next call), BlockSourceError for bad input,
        BlockTargetFullError, BlockTargetError (retryable) or BlockTargetRejectedError."""
        if not 0 < cycle.number <= 999999:
            raise ValueError(f"invalid cycle number {cycle.number}")
        started = utc_now()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        sources: List[_Source] = []
        try:
            for disk in self.disks:
                sources.append(_Source(disk))
            manifests = [ChunkMap.load(self.manifest_path(d.name)) for d in self.disks]
            for src, man in zip(sources, manifests):
                if man is not None and src.size < man.disk_size:
                    raise BlockSourceError(
                        f"disk {src.disk.name}: {src.disk.path} is {src.size} bytes, smaller than the "
                        f"{man.disk_size} bytes replicated in cycle {man.cycle}: the device shrank or "
                        "this is not the same disk; check the disk path (nothing was sent, the "
                        "committed generations are untouched)")
            with self._lock:
                self._progress = [PathProgress(path=d.name, bytes_total=s.size)
                                  for d, s in zip(self.disks, sources)]
            result = BlockCycleResult(cycle=cycle.number, bytes_total=sum(s.size for s in sources),
                                      bytes_sent=0, files=len(self.disks), passes=1, started_at=started,
                                      finished_at="")
            client = BlockClient(self.target.url, self.target.token, self.target.fingerprint, cancel=cancel,
                                 epoch=self.target.epoch, proxy=self.target.proxy)
            try:
                for i, (src, man) in enumerate(zip(sources, manifests)):
                    self._run_disk(cycle, src, man, self._progress[i], client, cancel, result)
            finally:
                client.close()
        finally:
            for src in sources:
                src.close()
        result.bytes_sent = sum(p.bytes_sent for p in self._progress)
        result.finished_at = utc_now()
        self._emit(force=True)
        return result

    def _run_disk(self, cycle: BlockCycle, src: _Source, man: Optional[ChunkMap], progress: PathProgress,
                  client: BlockClient, cancel: threading.Event, result: BlockCycleResult) -> None:
        name = src.disk.name
        opts = self._options
        chunk_size = opts.chunk_size
        try:
            tstate = client.state(name)
        except BlockTargetError:
            if cancel.is_set():
                raise TransferCancelled("transfer cancelled") from None
            raise
        committed = (tstate or {}).get("committed_cycle")
        valid = (man is not None and tstate is not None and committed == man.cycle
                 and tstate.get("hashes_digest") == man.digest())
        if man is not None and not valid:
            LOG.warning("disk %s: the target's committed state (cycle %s) does not match the local "
                        "manifest (cycle %s): sending every chunk", name, committed, man.cycle)
        if valid and man is not None and man.cycle == cycle.number:
            if man.disk_size == src.size and man.chunk_size == chunk_size:
                LOG.info("disk %s: cycle %s is already committed on the target", name, cycle.number)
                with self._lock:
                    progress.bytes_done = progress.bytes_total
                    progress.state = "done"
                result.chunks_total += man.count
                result.disks.append({"disk": name, "cycle": cycle.number, "already_committed": True})
                self.journal_path(name).unlink(missing_ok=True)
                return
        usable = valid and cycle.incremental and man is not None and man.chunk_size == chunk_size
        base = man if usable else None
        if cycle.reverify and self.journal_path(name).exists():
            LOG.warning("disk %s: verification pass after a change of agent session: the journal of the "
                        "interrupted pass is discarded (another session may have written its chunks)", name)
            self.journal_path(name).unlink()
        journal = PassJournal(self.journal_path(name), cycle=cycle.number, chunk_size=chunk_size,
                              disk_size=src.size, incremental=base is not None, base=base).open()
        try:
            candidates = (self._candidates(name, base, journal)
                          if base is not None and not cycle.reverify else None)
            dp = _DiskPass(src.disk, src, journal, base, candidates, progress)
            with self._lock:
                progress.state = "running"
                progress.bytes_done = sum(dp.length(i) for i in range(dp.count) if journal.is_done(i))
                dp.done_at_start = progress.bytes_done
            result.chunks_resumed += journal.resumed_chunks
            self._emit(force=True)
            self._transfer(dp, self._plan(dp), cancel)
            rounds = 0
            if self._options.checksum or cycle.reverify:
                while True:
                    rounds += 1
                    differ = self._verify(dp, client)
                    if not differ:
                        break
                    if rounds > VERIFY_ROUNDS:
                        raise BlockTargetError(
                            f"disk {name}: {len(differ)} chunks still differ on the target after "
                            f"{VERIFY_ROUNDS} repairs (first: {differ[:5]}); check the target's storage")
                    LOG.warning("disk %s: verify found %s chunks that differ on the target: sending them "
                                "again", name, len(differ))
                    for i in differ:
                        journal.mark_dirty(i)
                    journal.flush()
                    dp.repaired += len(differ)
                    self._transfer(dp, iter(differ), cancel)
            hashes = journal.hash_bytes()
            try:
                client.commit(name, cycle.number, src.size, chunk_size, hashes)
            except BlockTargetError:
                if cancel.is_set():
                    raise TransferCancelled("transfer cancelled") from None
                raise
            ChunkMap(cycle.number, chunk_size, src.size, hashes).save(self.manifest_path(name))
            journal.remove()
        finally:
            journal.close()
        with self._lock:
            progress.state = "done"
            progress.bytes_done = progress.bytes_total
            progress.rate_bps = 0.0
            progress.eta_s = 0.0
        result.chunks_total += dp.count
        result.chunks_sent += dp.sent
        result.chunks_compressed += dp.compressed
        result.chunks_holes += dp.holes
        result.chunks_unchanged += dp.unchanged
        result.chunks_repaired += dp.repaired
        result.bytes_read += dp.bytes_read
        result.bytes_zero += dp.bytes_zero
        result.verify_rounds += rounds
        result.disks.append({"disk": name, "cycle": cycle.number, "chunks": dp.count, "sent": dp.sent,
                             "compressed": dp.compressed, "holes": dp.holes, "unchanged": dp.unchanged,
                             "resumed": journal.resumed_chunks, "repaired": dp.repaired,
                             "incremental": base is not None, "bytes_sent": progress.bytes_sent})
        LOG.info("disk %s: cycle %s committed (%s chunks: %s sent, %s holes, %s unchanged, %s resumed)",
                 name, cycle.number, dp.count, dp.sent, dp.holes, dp.unchanged, journal.resumed_chunks)
        self._emit(force=True)

    def _candidates(self, name: str, base: ChunkMap, journal: PassJournal) -> Optional[bytearray]:
        """Chunks that may have changed per the snapshot driver (1 = read it), None = hash scan."""
        if self.changed_extents is None:
            return None
        try:
            extents = self.changed_extents(name)
        except Exception:  # noqa: BLE001 - a driver failure only costs a hash scan
            LOG.warning("disk %s: changed extents unavailable; scanning all chunks", name, exc_info=True)
            return None
        if extents is None:
            return None
        cs = journal.chunk_size
        marks = bytearray(journal.count)
        for i in range(base.count, journal.count):  # the disk grew: new chunks are all candidates
            marks[i] = 1
        for off, length in extents:
            if length <= 0 or off < 0:
                continue
            for i in range(off // cs, min(journal.count, -(-(off + length) // cs))):
                marks[i] = 1
        LOG.info("disk %s: %s of %s chunks changed per the snapshot driver", name, sum(marks), journal.count)
        return marks

    def _plan(self, dp: _DiskPass) -> Iterator[_Item]:
        """Work items of the pass in disk order: chunk indices and runs of holes."""
        journal = dp.journal
        data_map = dp.src.data_map(dp.chunk_size, dp.count)
        run: Optional[_Holes] = None
        zero_full = codec.zero_hash(dp.chunk_size)
        for i in range(dp.count):
            if journal.is_done(i):
                continue
            if dp.candidates is not None and not dp.candidates[i] and i not in journal.dirty:
                # outside the changed extents: unchanged without reading (hash stays the chunk map's)
                dp.unchanged += 1
                self._account(dp, done=dp.length(i))
                continue
            if data_map is not None and not data_map[i]:
                base_hash = dp.base_hash(i)
                length = dp.length(i)
                zero = zero_full if length == dp.chunk_size else codec.zero_hash(length)
                if base_hash == zero:
                    journal.mark(i, zero, sent=False)
                    dp.unchanged += 1
                    self._account(dp, done=length)
                    continue
                if run is not None and run.first + run.count == i and run.count < MAX_HOLE_RUN:
                    run.count += 1
                    continue
                if run is not None:
                    yield run
                run = _Holes(i, 1)
                continue
            if run is not None:
                yield run
                run = None
            yield i
        if run is not None:
            yield run

    # -- the pipeline ----------------------------------------------------------------------------
    def _transfer(self, dp: _DiskPass, items: Iterator[_Item], cancel: threading.Event) -> None:
        client = BlockClient(self.target.url, self.target.token, self.target.fingerprint, cancel=cancel,
                             epoch=self.target.epoch, proxy=self.target.proxy)
        stop = threading.Event()
        errors: List[BaseException] = []
        item_lock = threading.Lock()
        frames = batch_frames(dp.chunk_size)
        q: queue.Queue = queue.Queue(maxsize=frames)
        self.adaptive.start_transfer(self._inflight(frames) * dp.chunk_size)

        def fail(exc: BaseException) -> None:
            with item_lock:
                errors.append(exc)
            stop.set()

        def next_item() -> Optional[_Item]:
            with item_lock:
                return next(items, None)

        def put(obj: object) -> bool:
            while not (stop.is_set() or cancel.is_set()):
                try:
                    q.put(obj, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def worker() -> None:
            encoder = codec.Encoder()
            try:
                while not (stop.is_set() or cancel.is_set()):
                    item = next_item()
                    if item is None:
                        return
                    enc: Optional[codec.Encoded]
                    if isinstance(item, _Holes):
                        length = sum(dp.length(i) for i in range(item.first, item.first + item.count))
                        digest = codec.zero_hash(length) if item.count == 1 else b""
                        enc = codec.Encoded(item.first, length, digest, codec.HOLE, b"", count=item.count)
                    else:
                        enc = self._encode(dp, encoder, item)
                        if enc is None:
                            continue
                    if not put(enc):
                        return
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fail(exc)

        def sender() -> None:
            encoder = codec.Encoder()
            try:
                while True:
                    try:
                        enc = q.get(timeout=0.1)
                    except queue.Empty:
                        if stop.is_set() or cancel.is_set():
                            return
                        continue
                    if enc is _DONE or stop.is_set() or cancel.is_set():
                        return
                    # whatever else is ready joins the batch (never waits for more); under a
                    # bandwidth limit a batch is at most the bucket's burst (a quarter second of
                    # the rate), so the rate stays as smooth as with single chunks
                    batch = [enc]
                    size = len(enc.body)
                    last = False
                    rate = self.bucket.rate
                    cap = min(BATCH_BYTES, int(rate * BURST_S)) if rate else BATCH_BYTES
                    while len(batch) < frames and size < cap:
                        try:
                            more = q.get_nowait()
                        except queue.Empty:
                            break
                        if more is _DONE:
                            last = True
                            break
                        batch.append(more)
                        size += len(more.body)
                    self._send(dp, client, encoder, batch, cancel)
                    if last:
                        return
            except BaseException as exc:  # noqa: BLE001
                fail(exc)

        workers = [threading.Thread(target=worker, name=f"block-read-{n}", daemon=True)
                   for n in range(self.workers)]
        senders = [threading.Thread(target=sender, name=f"block-send-{n}", daemon=True)
                   for n in range(self.workers)]
        for t in workers + senders:
            t.start()
        finished = False
        try:
            for t in workers:
                t.join()
            for _ in senders:
                put(_DONE)
            for t in senders:
                t.join()
            finished = not (errors or cancel.is_set())
        finally:
            stop.set()
            for t in workers + senders:
                t.join()
            client.close()
            if finished:  # a verify or the commit comes next: sync, but do not wait for it
                dp.journal.sync_soon()
            # else the pass stops here: _run_disk's journal.close() syncs it before it returns
        if cancel.is_set():
            raise TransferCancelled("transfer cancelled")
        if errors:
            raise errors[0]

    def _encode(self, dp: _DiskPass, encoder: codec.Encoder, index: int) -> Optional[codec.Encoded]:
        """Read, hash and (when it must be sent) compress chunk ``index``; None when unchanged."""
        length = dp.length(index)
        data = dp.src.read(index * dp.chunk_size, length)
        with self._lock:
            dp.bytes_read += length
        # a memcmp against zeros stops at the first non-zero byte: nearly free on data, and an
        # all-zero chunk (written zeros) gets its hash from the cache instead of hashing it
        zero = codec.is_zero(data)
        digest = codec.zero_hash(length) if zero else codec.xxh3(data)
        if digest == dp.base_hash(index):
            dp.journal.mark(index, digest, sent=False)
            with self._lock:
                dp.unchanged += 1
            self._account(dp, done=length)
            return None
        opts = self._options
        if zero:
            return encoder.encode(index, data, 0, opts.checksum, digest)
        level, window = self.adaptive.choose(opts.compression, self.bucket.rate > 0, length)
        # what the disk's progress shows: the mode chosen for data chunks (an incompressible chunk
        # still goes raw when compression is chosen; trial windows alternate)
        dp.progress.compression = adaptive.ON if level else adaptive.DISABLED if opts.compression == 0 \
            else adaptive.OFF
        enc = encoder.encode(index, data, level, opts.checksum, digest)
        enc.window = window
        return enc

    def _put(self, dp: _DiskPass, client: BlockClient, batch: List[codec.Encoded],
             cancel: threading.Event) -> bool:
        """One sending of ``batch`` (raises ChunkRefused); False when cancelled (waiting for
        bandwidth, or a request failed once the transfer was cancelled)."""
        size = sum(len(enc.body) for enc in batch)
        if size and not self.bucket.take(size, cancel):
            return False  # cancelled while waiting for bandwidth
        try:
            if not (self._batches and len(batch) > 1
                    and client.put_batch(dp.disk.name, batch, dp.chunk_size, dp.size)):
                if len(batch) > 1 and self._batches:
                    LOG.info("the block target takes no batches: sending chunks one by one")
                    self._batches = False
                for enc in batch:
                    client.put_chunk(dp.disk.name, enc, dp.chunk_size, dp.size)
        except BlockTargetError:
            if cancel.is_set():
                return False
            raise
        return True

    def _send(self, dp: _DiskPass, client: BlockClient, encoder: codec.Encoder, batch: List[codec.Encoded],
              cancel: threading.Event) -> None:
        """Send ``batch`` in one request (one by one to a target without batches), then journal it;
        chunks the target refused (hash mismatch) are read again and sent again, at most
        REFUSED_RETRIES times."""
        resend = backoff.retrying(lambda exc: isinstance(exc, ChunkRefused), wait=backoff.NO_WAIT,
                                  attempts=REFUSED_RETRIES + 1)
        try:
            for attempt in resend:
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        LOG.warning("disk %s chunks %s-%s refused by the target (hash mismatch): reading "
                                    "them again", dp.disk.name, batch[0].index, batch[-1].index)
                        batch = [enc if enc.encoding == codec.HOLE else self._reencode(dp, encoder, enc)
                                 for enc in batch]
                    if not self._put(dp, client, batch, cancel):
                        return
        except ChunkRefused as exc:
            raise BlockTargetRejectedError(
                f"disk {dp.disk.name} chunks {batch[0].index}-{batch[-1].index}: the target refused them "
                f"{REFUSED_RETRIES + 1} times because data did not match its hash ({exc}); "
                "check the network path (a proxy rewriting data?) and the source's memory") from None
        dp.journal.mark_many([(enc.index, enc.digest, enc.count) for enc in batch])
        windows: Counter = Counter()
        for enc in batch:
            if enc.window:
                windows[enc.window] += enc.length
        for window, nbytes in windows.items():  # once per window: a batch is one acknowledgement
            self.adaptive.acked(window, nbytes)
        holes = [enc for enc in batch if enc.encoding == codec.HOLE]
        with self._lock:
            dp.holes += sum(enc.count for enc in holes)
            dp.bytes_zero += sum(enc.length for enc in holes)
            dp.sent += len(batch) - len(holes)
            dp.compressed += sum(1 for enc in batch if enc.encoding == codec.ZSTD)
        zero = sum(enc.length for enc in holes)
        self._account(dp, done=sum(enc.length for enc in batch), sent=sum(len(enc.body) for enc in batch),
                      zero=zero)

    def _reencode(self, dp: _DiskPass, encoder: codec.Encoder, enc: codec.Encoded) -> codec.Encoded:
        """``enc``'s chunk read and encoded again (after the target refused it), compressed only if
        it was."""
        opts = self._options
        level = opts.compression if enc.encoding == codec.ZSTD else 0
        again = encoder.encode(enc.index, dp.src.read(enc.index * dp.chunk_size, enc.length), level,
                               opts.checksum)
        again.window = enc.window
        return again

    def _verify(self, dp: _DiskPass, client: BlockClient) -> List[int]:
        hashes = dp.journal.hashes
        items = [(i, bytes(hashes[i * HASH_LEN:(i + 1) * HASH_LEN])) for i in range(dp.count)]
        return client.verify(dp.disk.name, dp.chunk_size, items)


__all__ = ["BlockCycle", "BlockCycleResult", "BlockOptions", "BlockReplicator", "BlockTarget", "Disk",
           "chunk_count"]
