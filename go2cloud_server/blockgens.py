"""The generations of one block disk: full images and deltas that share unchanged data.

A generation is the state of a disk at a committed cycle. Where the filesystem can clone a file
(FICLONE: XFS with reflink, btrfs) every generation is a full image, a clone of ``current.img``
that shares its extents. Elsewhere (ext4) a full copy would cost the whole disk per cycle, so only
the first generation is a full (sparse) image and each later one is a **delta**: a sparse file
holding only the chunks that changed in that cycle, at their own offsets, plus the map of the
chunks it holds. Which chunks changed comes from the chunk hashes committed with the cycle
against those of the previous generation (``gen-N.hashes``): a commit copies O(changed) bytes,
in the kernel (``copy_file_range`` of the data regions; holes stay holes).

Files of generation N in the disk's directory::

    gen-N.img       a full image (reflink clone or sparse copy)                   kind "full"
    gen-N.delta     a delta: the chunks of the map, at their offsets; the rest    kind "delta"
                    of the file is holes and means nothing
    gen-N.chunks    the delta's map: {"version", "cycle", "chunk_size", "disk_size", "runs":
                    [[first chunk, count], ...]}; a chunk that became all zeros is held (as a hole)
    gen-N.hashes    the committed xxh3-128 of every chunk at cycle N (16 bytes per chunk): what the
                    next cycle's delta is computed against
    gen-N.json      the report (``blockstore``): the generation exists for its users iff it exists
    gen-N.gone      a discard in progress: the report is removed, the files still serve the
                    generations after N until the discard is finished

Reading generation K composes the chain: the newest full image at or before K, then every delta
after it up to K, the newest holder of a chunk winning. Every file of the chain counts, also one
whose discard is in progress (``.gone``): its data still serves the later generations until the
discard has moved it.

Discarding generation N (retention, cancel) keeps every other generation's content at every
moment, so a reader that opened its files before (the background verifier, ``image export`` in
another process) reads the same bytes; steps, each idempotent, redone from the files alone after
a crash (:func:`recover`):

1. ``gen-N.gone`` is created, then ``gen-N.json`` removed (N is gone for its users);
2. the next generation M (the first file of the chain after N) takes what it needs of N:
   N full and M a delta: M's chunks are written into N's image (fold), which is then renamed to
   ``gen-M.img`` (M is now full) and M's delta files removed; N a delta and M a delta: N's
   chunks that M does not hold are copied into M's delta file, then M's map (written atomically)
   holds them too (merge); otherwise (M full, or N the newest) nothing;
3. N's files are removed, the ``.gone`` marker last.

Cost: a fold copies the chunks of M's delta, a merge those of N's delta: what changed, never the
disk. Files of a generation that has neither report nor ``.gone`` are an interrupted commit and
are removed by :func:`recover`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from go2cloud_server.atomicfile import fsync_dir, write_atomic

log = logging.getLogger(__name__)

HASH_LEN = 16
FULL = "full"
DELTA = "delta"
_FICLONE = 0x40049409
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_COPY_BLOCK = 1 << 20
_FILE_RE = re.compile(r"^gen-(\d{6})\.(img|delta|chunks|hashes|json|gone)$")
_TMP_RE = re.compile(r"^\.gen-(\d{6})\..*\.tmp$")
#: a chunk run: (first chunk, count)
Run = Tuple[int, int]
#: what a fold calls to make a generation's report say what it is now: (cycle, kind, path)
ReportUpdate = Callable[[int, str, Path], None]


def name(cycle: int, ext: str) -> str:
    return f"gen-{cycle:06d}.{ext}"


# -- copying ranges in the kernel ----------------------------------------------------------------
def _punch(fd: int, offset: int, length: int) -> None:
    from go2cloud_server.blockstore import punch_hole

    punch_hole(fd, offset, length)


def _copy_data(sfd: int, dfd: int, offset: int, length: int) -> int:
    """Copy [offset, offset+length) of ``sfd`` to the same offsets of ``dfd``: ``copy_file_range``
    (in the kernel: no copy through this process), else reads and writes of 1 MiB. Every byte a
    generation copies goes through here (tests count them)."""
    done = 0
    use_kernel = True
    while done < length:
        pos = offset + done
        if use_kernel:
            try:
                n = os.copy_file_range(sfd, dfd, length - done, pos, pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                use_kernel = False
                continue
        else:
            buf = os.pread(sfd, min(_COPY_BLOCK, length - done), pos)
            n = len(buf)
            view = memoryview(buf)
            written = 0
            while written < n:
                written += os.pwrite(dfd, view[written:], pos + written)
        if n == 0:
            raise OSError(errno.EIO, f"short read at offset {pos}")
        done += n
    return done


def copy_range(sfd: int, dfd: int, offset: int, length: int) -> int:
    """Make [offset, offset+length) of ``dfd`` read as that range of ``sfd``: its data regions
    are copied (:func:`_copy_data`), its holes punched in ``dfd`` (a no-op where ``dfd`` has a
    hole already). Returns the bytes copied."""
    end = offset + length
    pos = offset
    copied = 0
    while pos < end:
        try:
            start = min(os.lseek(sfd, pos, os.SEEK_DATA), end)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            start = end
        if start > pos:
            _punch(dfd, pos, start - pos)
        if start >= end:
            break
        try:
            stop = min(os.lseek(sfd, start, os.SEEK_HOLE), end)
        except OSError:
            stop = end
        copied += _copy_data(sfd, dfd, start, stop - start)
        pos = stop
    return copied


def data_regions(fd: int, offset: int, length: int) -> Iterator[Tuple[int, int]]:
    """(offset, length) of the data regions of ``fd`` within [offset, offset+length)."""
    end = offset + length
    pos = offset
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            yield pos, end - pos
            return
        if start >= end:
            return
        try:
            stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        except OSError:
            stop = end
        yield start, stop - start
        pos = stop


def try_clone(src: Path, dst: Path) -> bool:
    """Reflink ``src`` to a new ``dst`` (0600); False (nothing left behind) where unsupported."""
    sfd = os.open(str(src), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dfd = os.open(str(dst), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(dfd, _FICLONE, sfd)
            os.fsync(dfd)
            ok = True
        except OSError:
            ok = False
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    if not ok:
        dst.unlink(missing_ok=True)
    return ok


# -- chunk runs ----------------------------------------------------------------------------------
def changed_runs(before: bytes, after: bytes) -> List[Run]:
    """The runs of chunks whose hash differs between two hash arrays of the same length (16
    bytes per chunk), compared 256 chunks at a time (a 64 GiB disk of 1 MiB chunks: 256 compares
    when nothing changed)."""
    if len(before) != len(after):
        raise ValueError("hash arrays of different lengths")
    count = len(after) // HASH_LEN
    block = 256
    changed: List[int] = []
    for first in range(0, count, block):
        lo, hi = first * HASH_LEN, min(count, first + block) * HASH_LEN
        if before[lo:hi] == after[lo:hi]:
            continue
        for i in range(first, min(count, first + block)):
            o = i * HASH_LEN
            if before[o:o + HASH_LEN] != after[o:o + HASH_LEN]:
                changed.append(i)
    return to_runs(changed)


def to_runs(indices: Sequence[int]) -> List[Run]:
    runs: List[Run] = []
    for i in indices:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def runs_minus(runs: Sequence[Run], held: Sequence[Run]) -> List[Run]:
    """The chunks of ``runs`` not in ``held`` (both sorted, non-overlapping), as runs."""
    out: List[Run] = []
    j = 0
    for first, count in runs:
        pos, end = first, first + count
        while pos < end:
            while j < len(held) and held[j][0] + held[j][1] <= pos:
                j += 1
            if j < len(held) and held[j][0] <= pos:
                pos = min(end, held[j][0] + held[j][1])
                continue
            stop = min(end, held[j][0]) if j < len(held) else end
            out.append((pos, stop - pos))
            pos = stop
    return out


def runs_union(a: Sequence[Run], b: Sequence[Run]) -> List[Run]:
    merged: List[Run] = []
    for first, count in sorted([*a, *b]):
        if merged and merged[-1][0] + merged[-1][1] >= first:
            last_first, last_count = merged[-1]
            merged[-1] = (last_first, max(last_first + last_count, first + count) - last_first)
        else:
            merged.append((first, count))
    return merged


def runs_chunks(runs: Sequence[Run]) -> int:
    return sum(c for _, c in runs)


# -- the chain ---------------------------------------------------------------------------------------
@dataclass
class Member:
    """One generation's files in the chain."""

    cycle: int
    kind: Optional[str]      # FULL, DELTA, or None (no usable data file)
    visible: bool            # has its report
    gone: bool               # discard in progress


def scan(ddir: Path) -> Dict[int, Dict[str, bool]]:
    """{cycle: {extension: True}} of the generation files in ``ddir``."""
    found: Dict[int, Dict[str, bool]] = {}
    try:
        names = os.listdir(ddir)
    except FileNotFoundError:
        return found
    for entry in names:
        m = _FILE_RE.match(entry)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = True
    return found


def chain(ddir: Path) -> List[Member]:
    """The generations whose files count (a report or a discard in progress), oldest first."""
    out: List[Member] = []
    for cycle, exts in sorted(scan(ddir).items()):
        visible, gone = bool(exts.get("json")), bool(exts.get("gone"))
        if not (visible or gone):
            continue
        kind = FULL if exts.get("img") else DELTA if exts.get("delta") and exts.get("chunks") else None
        out.append(Member(cycle, kind, visible, gone))
    return out


def read_map(ddir: Path, cycle: int) -> dict:
    doc = json.loads((ddir / name(cycle, "chunks")).read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
        raise ValueError(f"{ddir / name(cycle, 'chunks')}: not a chunk map")
    doc["runs"] = [(int(f), int(c)) for f, c in doc["runs"]]
    return doc


def write_map(ddir: Path, cycle: int, chunk_size: int, disk_size: int, runs: Sequence[Run]) -> None:
    write_atomic(ddir / name(cycle, "chunks"), json.dumps({
        "version": 1, "cycle": cycle, "chunk_size": chunk_size, "disk_size": disk_size,
        "runs": [list(r) for r in runs]}) + "\n")


def _open_ro(path: Path) -> int:
    return os.open(str(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _open_rw(path: Path) -> int:
    return os.open(str(path), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)


def _copy_runs(sfd: int, dfd: int, runs: Sequence[Run], chunk_size: int, disk_size: int) -> int:
    copied = 0
    for first, count in runs:
        off = first * chunk_size
        copied += copy_range(sfd, dfd, off, min(disk_size, (first + count) * chunk_size) - off)
    return copied


# -- making a generation -----------------------------------------------------------------------------
@dataclass
class Made:
    kind: str
    how: str            # "reflink", "sparse" (full copy of the data regions) or "delta"
    chunks: int         # chunks the delta holds (0 for a full image)
    copied: int         # bytes copied (0 for a reflink)
    base: Optional[int]  # the generation a delta was computed against


def make(ddir: Path, cycle: int, current: Path, hashes: bytes, chunk_size: int, disk_size: int,
         reflink: bool = True) -> Made:
    """Make the data files of generation ``cycle`` from ``current`` (the committed image) and its
    chunk ``hashes``: a reflink clone where possible, else a delta against the newest visible
    generation when it has the same geometry and its hashes, else a full sparse copy. Leaves no
    report (the caller writes it last); call :func:`recover` first (no files of ``cycle`` exist)."""
    prev = None
    for m in reversed(chain(ddir)):
        if m.cycle < cycle and m.visible and m.kind is not None:
            prev = m
            break
    if reflink:
        tmp = ddir / f".gen-{cycle:06d}.img.tmp"
        tmp.unlink(missing_ok=True)
        if try_clone(current, tmp):
            os.rename(tmp, ddir / name(cycle, "img"))
            _finish_files(ddir, cycle, hashes)
            return Made(FULL, "reflink", 0, 0, None)
    prev_hashes: Optional[bytes] = None
    if prev is not None:
        try:
            prev_hashes = (ddir / name(prev.cycle, "hashes")).read_bytes()
        except FileNotFoundError:
            prev_hashes = None
        geometry = _geometry(ddir, prev)
        same = prev_hashes is not None and len(prev_hashes) == len(hashes)
        if not same or geometry != (chunk_size, disk_size):
            prev_hashes = None
    sfd = _open_ro(current)
    try:
        if prev is None or prev_hashes is None:
            tmp = ddir / f".gen-{cycle:06d}.img.tmp"
            dfd = os.open(str(tmp), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(dfd, disk_size)
                copied = copy_range(sfd, dfd, 0, disk_size)
                os.fsync(dfd)
            finally:
                os.close(dfd)
            os.rename(tmp, ddir / name(cycle, "img"))
            _finish_files(ddir, cycle, hashes)
            return Made(FULL, "sparse", 0, copied, None)
        runs = changed_runs(prev_hashes, hashes)
        tmp = ddir / f".gen-{cycle:06d}.delta.tmp"
        dfd = os.open(str(tmp), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(dfd, disk_size)
            copied = _copy_runs(sfd, dfd, runs, chunk_size, disk_size)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    write_map(ddir, cycle, chunk_size, disk_size, runs)
    os.rename(tmp, ddir / name(cycle, "delta"))
    _finish_files(ddir, cycle, hashes)
    return Made(DELTA, "delta", runs_chunks(runs), copied, prev.cycle)


def _finish_files(ddir: Path, cycle: int, hashes: bytes) -> None:
    write_atomic(ddir / name(cycle, "hashes"), hashes)
    fsync_dir(ddir)


def _geometry(ddir: Path, m: Member) -> Optional[Tuple[int, int]]:
    """(chunk size, disk size) of a generation, from its report (or its map)."""
    for ext in ("json", "chunks"):
        try:
            doc = json.loads((ddir / name(m.cycle, ext)).read_text())
        except (FileNotFoundError, ValueError):
            continue
        cs, ds = doc.get("chunk_size"), doc.get("disk_size")
        if isinstance(cs, int) and isinstance(ds, int):
            return cs, ds
    return None


# -- discarding --------------------------------------------------------------------------------------
ALL_FILES = ("img", "delta", "chunks", "hashes", "json")


def remove_files(ddir: Path, cycle: int, exts: Sequence[str] = ALL_FILES) -> None:
    for ext in exts:
        (ddir / name(cycle, ext)).unlink(missing_ok=True)


def begin_discard(ddir: Path, cycle: int) -> bool:
    """Step 1 of a discard: the ``.gone`` marker, then the report removed. False when the
    generation has no files."""
    exts = scan(ddir).get(cycle)
    if not exts:
        return False
    if not exts.get("gone"):
        marker = ddir / name(cycle, "gone")
        marker.write_bytes(b"")
        fsync_dir(ddir)
    (ddir / name(cycle, "json")).unlink(missing_ok=True)
    return True


def finish_discard(ddir: Path, cycle: int, update_report: ReportUpdate) -> int:
    """Steps 2 and 3 of a discard of ``cycle`` (its ``.gone`` marker exists): the next generation
    takes what it needs, then the files go. Idempotent. Returns the bytes copied."""
    members = chain(ddir)
    me = next((m for m in members if m.cycle == cycle), None)
    copied = 0
    if me is not None and me.kind is not None:
        after = [m for m in members if m.cycle > cycle and m.kind is not None]
        nxt = after[0] if after else None
        if nxt is not None and nxt.kind == DELTA:
            copied = _fold(ddir, me, nxt, update_report) if me.kind == FULL else _merge(ddir, me, nxt)
    remove_files(ddir, cycle)
    fsync_dir(ddir)
    (ddir / name(cycle, "gone")).unlink(missing_ok=True)
    fsync_dir(ddir)
    return copied


def _fold(ddir: Path, full: Member, delta: Member, update_report: ReportUpdate) -> int:
    """``full``'s image takes the chunks of ``delta``, then becomes ``delta``'s full image."""
    doc = read_map(ddir, delta.cycle)
    cs, ds = int(doc["chunk_size"]), int(doc["disk_size"])
    sfd = _open_ro(ddir / name(delta.cycle, "delta"))
    try:
        dfd = _open_rw(ddir / name(full.cycle, "img"))
        try:
            copied = _copy_runs(sfd, dfd, doc["runs"], cs, ds)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    os.rename(ddir / name(full.cycle, "img"), ddir / name(delta.cycle, "img"))
    fsync_dir(ddir)
    settle(ddir, delta.cycle, update_report)
    log.info("block %s: generation %s folded into %s (%s chunks, %s bytes copied): %s is a full image now",
             ddir, full.cycle, delta.cycle, runs_chunks(doc["runs"]), copied, delta.cycle)
    return copied


def settle(ddir: Path, cycle: int, update_report: ReportUpdate) -> None:
    """A generation with a full image and delta files (a fold renamed the image, then stopped):
    the delta files go and the report says full."""
    remove_files(ddir, cycle, ("delta", "chunks"))
    fsync_dir(ddir)
    update_report(cycle, FULL, ddir / name(cycle, "img"))


def _merge(ddir: Path, delta: Member, nxt: Member) -> int:
    """``nxt``'s delta takes the chunks of ``delta`` it does not hold (invisible until its map
    says so), then its map holds them."""
    mine, theirs = read_map(ddir, delta.cycle), read_map(ddir, nxt.cycle)
    cs, ds = int(theirs["chunk_size"]), int(theirs["disk_size"])
    missing = runs_minus(mine["runs"], theirs["runs"])
    copied = 0
    if missing:
        sfd = _open_ro(ddir / name(delta.cycle, "delta"))
        try:
            dfd = _open_rw(ddir / name(nxt.cycle, "delta"))
            try:
                copied = _copy_runs(sfd, dfd, missing, cs, ds)
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        write_map(ddir, nxt.cycle, cs, ds, runs_union(theirs["runs"], missing))
    log.info("block %s: generation %s merged into %s (%s chunks, %s bytes copied)", ddir, delta.cycle,
             nxt.cycle, runs_chunks(missing), copied)
    return copied


def recover(ddir: Path, update_report: ReportUpdate) -> List[int]:
    """Finish what a crash interrupted, from the files alone: temporary files and the files of
    an interrupted commit (neither report nor ``.gone``) removed; a fold that renamed its image
    settled; every discard in progress finished, oldest first. Returns the cycles whose discard
    was finished. Idempotent; the caller holds the disk's lock."""
    try:
        names = os.listdir(ddir)
    except FileNotFoundError:
        return []
    for entry in names:
        if _TMP_RE.match(entry):
            (ddir / entry).unlink(missing_ok=True)
    finished: List[int] = []
    for cycle, exts in sorted(scan(ddir).items()):
        if not exts.get("json") and not exts.get("gone"):
            remove_files(ddir, cycle)
            log.info("block %s: generation %s was not finished (no report): its files are removed", ddir,
                     cycle)
        elif exts.get("img") and (exts.get("delta") or exts.get("chunks")):
            settle(ddir, cycle, update_report)
    for m in chain(ddir):
        if m.gone:
            finish_discard(ddir, m.cycle, update_report)
            finished.append(m.cycle)
    return finished


# -- reading a generation ----------------------------------------------------------------------------
class Composed:
    """Generation K of a disk, opened: the files of its chain (held open, so a discard that moves
    them meanwhile changes nothing of what this reads) and the holder of every chunk.
    :meth:`data_runs` gives its data in order; everything else reads as zeros."""

    def __init__(self, ddir: Path, cycle: int, size: int, fds: List[int], kind: str,
                 pieces: List[Tuple[int, int, int]]) -> None:
        self.ddir = ddir
        self.cycle = cycle
        self.size = size
        self.kind = kind
        self._fds = fds
        #: (offset, length, fd) covering [0, size) in order
        self._pieces = pieces

    def data_runs(self) -> Iterator[Tuple[int, int, int]]:
        """(offset, length, fd holding those bytes at the same offset) of every data region."""
        for off, length, fd in self._pieces:
            for start, n in data_regions(fd, off, length):
                yield start, n, fd

    def copy_to(self, out_fd: int) -> Iterator[int]:
        """Write the data into ``out_fd`` (sized and sparse already) at the same offsets; yields
        the bytes copied after each region."""
        for off, length, fd in self.data_runs():
            yield _copy_data(fd, out_fd, off, length)

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    def __enter__(self) -> Composed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GenerationMissing(Exception):
    """The generation has no report (never made, or discarded)."""


def open_generation(ddir: Path, cycle: int, attempts: int = 20) -> Composed:
    """Open generation ``cycle`` for reading (read-only: nothing on disk changes). A discard
    running meanwhile (another thread or process) may rename or remove a file between the listing
    and the open: the listing is then taken again."""
    for _ in range(attempts):
        try:
            return _open_once(ddir, cycle)
        except FileNotFoundError:
            continue
    raise OSError(errno.EAGAIN, f"generation {cycle} in {ddir}: its files kept changing while it was opened")


def _open_once(ddir: Path, cycle: int) -> Composed:
    members = chain(ddir)
    me = next((m for m in members if m.cycle == cycle and m.visible), None)
    if me is None or me.kind is None:
        raise GenerationMissing(f"generation {cycle} does not exist in {ddir}")
    upto = [m for m in members if m.cycle <= cycle and m.kind is not None]
    base_i = max((i for i, m in enumerate(upto) if m.kind == FULL), default=None)
    if base_i is None:
        raise OSError(errno.ENOENT, f"generation {cycle} in {ddir}: no full image before it")
    fds: List[int] = []
    try:
        base_fd = _open_ro(ddir / name(upto[base_i].cycle, "img"))
        fds.append(base_fd)
        size = os.fstat(base_fd).st_size
        holder: Dict[int, int] = {}
        cs = 0
        for m in upto[base_i + 1:]:
            doc = read_map(ddir, m.cycle)
            fd = _open_ro(ddir / name(m.cycle, "delta"))
            fds.append(fd)
            cs, size = int(doc["chunk_size"]), int(doc["disk_size"])
            for first, count in doc["runs"]:
                for i in range(first, first + count):
                    holder[i] = fd
        pieces: List[Tuple[int, int, int]] = []
        pos = 0
        run_first, run_fd, run_count = -1, -1, 0
        overridden: List[Tuple[int, int, int]] = []  # (first chunk, count, fd)
        for i in sorted(holder):
            fd = holder[i]
            if run_count and run_first + run_count == i and run_fd == fd:
                run_count += 1
                continue
            if run_count:
                overridden.append((run_first, run_count, run_fd))
            run_first, run_fd, run_count = i, fd, 1
        if run_count:
            overridden.append((run_first, run_count, run_fd))
        for first, count, fd in overridden:
            off = first * cs
            end = min(size, (first + count) * cs)
            if off > pos:
                pieces.append((pos, off - pos, base_fd))
            pieces.append((off, end - off, fd))
            pos = end
        if pos < size:
            pieces.append((pos, size - pos, base_fd))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Composed(ddir, cycle, size, fds, me.kind, pieces)


def new_id() -> str:
    """A generation's identity in its report (a discarded and re-made cycle gets another)."""
    return secrets.token_hex(8)
