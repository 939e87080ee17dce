"""Block target storage of one task: disk images written chunk by chunk, committed generations.

Layout under ``<data-dir>/tasks/<task_id>/block`` (the store's root)::

    <disk>/current.img          the image being written (sparse; chunk i at i * chunk_size)
    <disk>/committed.hashes     xxh3-128 of every chunk at the last commit (16 bytes per chunk)
    <disk>/size.json            {"version", "disk", "disk_size", "pinned_at"}: the limit of a disk
                                whose size the source's inventory does not give
    <disk>/state.json           {"version", "disk", "chunk_size", "disk_size", "committed_cycle",
                                 "hashes_count", "hashes_digest", "committed_at"}
    <disk>/gen-000003.img       generation of cycle 3 as a full image: a reflink clone of
                                current.img (XFS with reflink, btrfs), or a sparse copy (the first
                                generation, or the oldest kept one after retention folded into it)
    <disk>/gen-000004.delta     generation of cycle 4 as a delta (no reflink): only the chunks
    <disk>/gen-000004.chunks    that changed in cycle 4, at their offsets, and their map; reading
                                it composes the chain (see ``blockgens``, which owns this layout)
    <disk>/gen-000003.hashes    the committed chunk hashes at cycle 3 (the next delta's base)
    <disk>/gen-000003.json      its report: "kind" full or delta ("image": false and a "note" for
                                a delta: not bootable, use ``image export``), "path", "copy"
                                (reflink, sparse, delta), "copied_bytes", "id"; "state" pending
                                (made, not yet verified), verified (size, sha256 of the whole
                                image, filesystem, fsck result, of a delta on a composed temporary
                                copy; an XFS copied while frozen is checked on a copy whose log
                                was replayed, see :func:`fs_check`) or failed (unreadable)

Rules:

* Every chunk is checked against the sender's xxh3-128 (and BLAKE3 when given) *after*
  decompression and *before* it is written; a mismatch writes nothing (:class:`ChunkHashMismatch`).
  A batch (:meth:`BlockTaskStore.write_batch`) is checked whole before its first write: one bad
  chunk refuses all of it.
* Only the task's disks: a store the control plane made knows the disks its task declared and
  how large each may be (:func:`declared_disk_limits`: the size the source's inventory reported,
  or for a disk the inventory does not know, such as an image file, the size of its first write,
  pinned in ``<disk>/size.json``). Any other disk name is NotFound and creates nothing; a larger
  disk size is :class:`DiskTooLarge` (HTTP 403), checked before anything is read or written.
* Nothing is written outside ``<root>/<disk>/``: disk names are ``[A-Za-z0-9._-]{1,64}`` (not
  ``.``/``..``), the disk directory must not be a symlink, image files are opened with
  ``O_NOFOLLOW``, and index, chunk size and disk size are range-checked so a write never lands
  past the image's end.
* Holes stay sparse: an all-zero chunk is punched with ``fallocate(PUNCH_HOLE | KEEP_SIZE)``;
  where punching is not supported the range is written with zeros only if it holds data.
* Chunk writes are idempotent (same index, same bytes, same place). Each write starts the
  writeback of what it wrote (:func:`start_writeback`), so the data goes to the device during the
  pass. ``commit`` truncates the image to the disk size, fsyncs image and directory and records
  the cycle and the chunk hashes; committing the same cycle with the same hashes again is a no-op.
* ``commit_cycle`` makes generation ``<cycle>`` of every disk from its committed ``current.img``,
  writing O(changed chunks): a reflink where the filesystem supports FICLONE, else a delta of the
  chunks whose committed hash differs from the previous generation's (``copy_file_range`` of
  their data; the first generation is a full sparse copy), plus a ``pending`` report;
  ``verify_generation`` (slow: sha256 and fsck, run by the control plane's background verifier)
  turns it into the final report. Both are idempotent and crash-safe: files without a report are
  an interrupted commit (made again), a pending report is verified again. A generation's content
  never changes; its files do only when retention discards the one before it (``blockgens``: a
  fold or a merge, O(one delta), crash-safe, invisible to a reader that has it open). Later passes
  only touch ``current.img``. A delta's content is what ``current.img`` held at its commit for
  every chunk whose committed hash changed, and the previous generation's for the others: the same
  trust in the agent's chunk hashes as the incremental transfer itself (checksum verification
  re-reads ``current.img`` against them).
* A full target filesystem (ENOSPC/EDQUOT) raises :class:`TargetFull` (HTTP 507); what was
  committed before stays intact.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import (
    Callable,
    Dict,
    Generator,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
    cast,
)

import blake3
import xxhash
import zstandard

from go2cloud_server import blockgens, children, proc
from go2cloud_server.atomicfile import fsync_dir, write_atomic
from go2cloud_server.clock import utc_now_iso
from go2cloud_server.errors import Conflict, InvalidInput, NotFound, ServerError
from go2cloud_server.verifier import REPORT_FAILED, REPORT_PENDING, REPORT_VERIFIED

log = logging.getLogger(__name__)

STATE_VERSION = 1
HASH_LEN = 16
MIN_CHUNK = 4096
MAX_CHUNK = 4 * 1024 * 1024
MAX_DISK = 1 << 50          # 1 PiB
MAX_CHUNKS = 1 << 22        # per disk (4 TiB at 1 MiB chunks, 16 TiB at 4 MiB)
CURRENT = "current.img"
_DISK_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_GEN_RE = re.compile(r"^gen-(\d{6})\.img$")
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_NOSPACE = (errno.ENOSPC, errno.EDQUOT)
FSCK_TIMEOUT_S = 3600
_COPY_BLOCK = 1 << 20


Buffer = Union[bytes, bytearray, memoryview]
#: one chunk of a batch: (index, count, plain data or None for zeros, xxh3-128 hex, BLAKE3 hex or
#: None); count > 1 only for a run of holes
BatchItem = Tuple[int, int, Optional[Buffer], str, Optional[str]]


class TargetFull(ServerError):
    http_status = 507
    code = "target_full"
    summary = "the target's storage is full"


class ChunkHashMismatch(ServerError):
    http_status = 422
    code = "chunk_hash_mismatch"
    summary = "a chunk did not match the hash it was sent with (nothing was written)"


class DiskTooLarge(ServerError):
    http_status = 403
    code = "disk_too_large"
    summary = "a disk's size is larger than the task allows (nothing was written)"


def declared_disk_limits(task_disks: Sequence[Mapping[str, object]],
                         inventory: Mapping[str, object]) -> Dict[str, Optional[int]]:
    """The disks a block task may write, ``{name: largest size in bytes, or None}``, from the
    task's disks (``[{"name", "path"}]``, what the operator gave at start) and the source's
    inventory (disks and partitions with ``size_bytes``, as reported at import).

    A disk given as a device node directly under ``/dev`` (``/dev/vdb``, ``/dev/nvme0n1p2``) is
    looked up by its kernel name among the inventory's disks and partitions: its size there is the
    limit. Anything else (an image file, ``/dev/mapper/...``, ``/dev/disk/by-id/...``) or a
    device the inventory does not list has no known size: None, and the store pins the size of
    the disk's first write as its limit for the rest of the task."""
    sizes: Dict[str, int] = {}
    disks = inventory.get("disks") if isinstance(inventory, Mapping) else None
    for entry in disks if isinstance(disks, list) else []:
        if not isinstance(entry, Mapping):
            continue
        parts = entry.get("partitions")
        parts = [p for p in parts if isinstance(p, Mapping)] if isinstance(parts, list) else []
        for item in [entry, *parts]:
            name, size = item.get("name"), item.get("size_bytes")
            if isinstance(name, str) and isinstance(size, int) and not isinstance(size, bool) and size > 0:
                sizes[name] = size
    out: Dict[str, Optional[int]] = {}
    for disk in task_disks:
        name, path = disk.get("name"), disk.get("path")
        if not isinstance(name, str) or not _DISK_RE.match(name):
            continue
        dev = path[len("/dev/"):] if isinstance(path, str) and path.startswith("/dev/") else ""
        out[name] = sizes.get(dev) if dev and "/" not in dev else None
    return out


_LOCKS: Dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    """One lock per path (a disk directory, an image), shared by every store object of the process."""
    key = str(path)
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


def check_disk_name(name: str) -> str:
    if not isinstance(name, str) or not _DISK_RE.match(name) or name in (".", ".."):
        raise InvalidInput(f"disk: invalid name {name!r} (1-64 of A-Z a-z 0-9 . _ -)")
    return name


def check_geometry(chunk_size: int, disk_size: int) -> int:
    """Validate chunk and disk size; return the number of chunks."""
    if not isinstance(chunk_size, int) or not MIN_CHUNK <= chunk_size <= MAX_CHUNK or chunk_size % MIN_CHUNK:
        raise InvalidInput(f"chunk_size: {chunk_size!r} must be a multiple of 4096 in 4096-{MAX_CHUNK}")
    if not isinstance(disk_size, int) or not 0 < disk_size <= MAX_DISK:
        raise InvalidInput(f"disk_size: {disk_size!r} must be 1-{MAX_DISK}")
    count = -(-disk_size // chunk_size)
    if count > MAX_CHUNKS:
        raise InvalidInput(f"disk_size: {disk_size} is {count} chunks of {chunk_size}, over {MAX_CHUNKS}")
    return count


def chunk_len(index: int, chunk_size: int, disk_size: int) -> int:
    count = check_geometry(chunk_size, disk_size)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
        raise InvalidInput(f"index: {index!r} out of range 0-{count - 1}")
    return min(chunk_size, disk_size - index * chunk_size)


_ZERO_HASHES: Dict[int, str] = {}


def zero_xxh3(length: int) -> str:
    found = _ZERO_HASHES.get(length)
    if found is None:
        found = xxhash.xxh3_128(bytes(length)).hexdigest()
        if len(_ZERO_HASHES) < 64:
            _ZERO_HASHES[length] = found
    return found


_LOCAL = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompression context (made once per thread, not per chunk)."""
    found = getattr(_LOCAL, "dctx", None)
    if found is None:
        found = _LOCAL.dctx = zstandard.ZstdDecompressor()
    return found


def decompress_chunk(payload: Buffer, expected_len: int) -> bytes:
    """zstd frame -> exactly ``expected_len`` bytes. Never inflates past ``expected_len + 1``
    bytes (a decompression bomb is refused, whatever content size its header claims)."""
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as exc:
        raise InvalidInput(f"body: not a zstd frame ({exc})") from None
    declared = params.content_size
    unknown = (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR)
    if declared not in unknown and declared != expected_len:
        raise InvalidInput(f"body: zstd frame declares {declared} bytes, the chunk has {expected_len}")
    if declared == expected_len:
        # the frame declares the chunk's size: one-shot decompression into a buffer of exactly
        # that size (libzstd fails a frame whose content does not match its declared size);
        # anything after the frame is refused, as by the streaming path below
        try:
            data = _decompressor().decompress(payload, max_output_size=expected_len, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            _LOCAL.dctx = None  # a fresh context for the next chunk after a corrupt frame
            raise InvalidInput(f"body: corrupt zstd data ({exc})") from None
        except TypeError:  # zstandard < 0.22: no allow_extra_data, take the streaming path
            pass
        else:
            if len(data) != expected_len:
                raise InvalidInput(f"body: decompresses to {len(data)} bytes, the chunk has {expected_len}")
            return data
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload)) as reader:
            data = reader.read(expected_len + 1)
            while len(data) <= expected_len:
                more = reader.read(expected_len + 1 - len(data))
                if not more:
                    break
                data += more
    except zstandard.ZstdError as exc:
        raise InvalidInput(f"body: corrupt zstd data ({exc})") from None
    if len(data) != expected_len:
        raise InvalidInput(f"body: decompresses to {'more than ' if len(data) > expected_len else ''}"
                           f"{len(data)} bytes, the chunk has {expected_len}")
    return data


# -- sparse files ------------------------------------------------------------------------------
_libc: Optional[ctypes.CDLL] = None
_libc_fns: Dict[str, Optional[Callable[..., int]]] = {}


_SYNC_FILE_RANGE_WRITE = 2


def _libc_fn(name: str, argtypes: list) -> Optional[Callable[..., int]]:
    """``name`` from the libc the process already has loaded (find_library would run ldconfig),
    or None where there is none (another OS, a libc without it)."""
    global _libc
    if name in _libc_fns:
        return _libc_fns[name]
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(_libc, name)
        fn.argtypes = argtypes
    except (OSError, AttributeError):
        fn = None
    _libc_fns[name] = fn
    return fn


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2); False when unsupported here (EOPNOTSUPP, ENOSYS, no libc)."""
    fn = _libc_fn("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])
    if fn is None:
        return False
    if fn(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing the dirty pages of [offset, offset+length) to the device, without waiting
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, what PostgreSQL's ``*_flush_after`` settings and
    RocksDB's ``bytes_per_sync`` do). A pass's data then reaches the disk while the pass runs:
    the commit's fsync finds little left to write instead of the whole pass (gigabytes the kernel
    would otherwise hold dirty until the 30 s expiry or the fsync), and a target receiving many
    disks does not pile up dirty memory. Durability still comes from the commit's fsync only.
    Best effort: a no-op where unsupported; a write error surfaces at that fsync."""
    fn = _libc_fn("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
    if fn is not None and length > 0:
        fn(fd, ctypes.c_int64(offset), ctypes.c_int64(length), _SYNC_FILE_RANGE_WRITE)


def _is_hole(fd: int, offset: int, length: int) -> bool:
    """True if [offset, offset+length) holds no data (or lies past the end of the file)."""
    try:
        nxt = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data at or after offset
            return True
        return False
    return nxt >= offset + length


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros without allocating blocks where possible."""
    if length <= 0 or _is_hole(fd, offset, length):
        return
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        return
    zeros = bytes(min(length, _COPY_BLOCK))
    done = 0
    while done < length:
        n = min(len(zeros), length - done)
        os.pwrite(fd, zeros[:n], offset + done)
        done += n


def data_extents(fd: int, size: int) -> Iterator[Tuple[int, int]]:
    """(offset, length) of the data regions of a file (the whole file where SEEK_DATA fails)."""
    return blockgens.data_regions(fd, 0, size)


def sparse_copy(src: Path, dst: Path) -> str:
    """Copy ``src`` to ``dst`` (created 0600): reflink when the filesystem can, else copy the
    data regions only, in the kernel (``copy_file_range``). Returns ``"reflink"`` or ``"sparse"``."""
    if blockgens.try_clone(src, dst):
        return "reflink"
    sfd = os.open(str(src), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dfd = os.open(str(dst), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(sfd).st_size
            os.ftruncate(dfd, size)
            blockgens.copy_range(sfd, dfd, 0, size)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return "sparse"


#: logical bytes hashed per step of a generation's verification (``verify_generation_steps``):
#: the shared background verifier takes turns between tasks after each step (a step is ~50 ms
#: of sha256, or a read of this much data)
VERIFY_STEP = 64 << 20


def _sha256_sparse_steps(fd: int, name: Path,
                         step: Optional[int] = None) -> Generator[None, None, Tuple[int, str]]:
    """(size, sha256 hex) of an open file, holes hashed as zeros without reading them from disk,
    in steps (see :func:`_sha256_runs_steps`)."""
    size = os.fstat(fd).st_size
    runs = ((off, length, fd) for off, length in data_extents(fd, size))
    return (yield from _sha256_runs_steps(runs, size, name, step))


def _sha256_runs_steps(runs: Iterator[Tuple[int, int, int]], size: int, name: Path,
                       step: Optional[int] = None) -> Generator[None, None, Tuple[int, str]]:
    """(size, sha256 hex) of an image of ``size`` bytes whose data regions are ``runs``
    ((offset, length, fd holding them at that offset), in order; the rest is zeros), holes hashed
    as zeros without reading them from disk (one reusable zero buffer is fed to the hash), in
    steps: yields after every ``step`` logical bytes, returns the result."""
    sha = hashlib.sha256()
    zeros = memoryview(bytes(_COPY_BLOCK))
    step = step or VERIFY_STEP
    pos = 0
    budget = step

    def hole(upto: int) -> Iterator[None]:
        nonlocal pos, budget
        while pos < upto:
            n = min(_COPY_BLOCK, upto - pos)
            sha.update(zeros[:n])
            pos += n
            budget -= n
            if budget <= 0:
                budget = step
                yield

    for off, length, fd in runs:
        yield from hole(off)  # the hole before this extent
        end = off + length
        while pos < end:
            buf = _pread(fd, min(_COPY_BLOCK, end - pos), pos)
            if not buf:
                raise OSError(errno.EIO, f"short read of {name}")
            sha.update(buf)
            pos += len(buf)
            budget -= len(buf)
            if budget <= 0:
                budget = step
                yield
    yield from hole(size)
    return size, sha.hexdigest()


def _sha256_sparse(fd: int, name: Path) -> Tuple[int, str]:
    """(size, sha256 hex) of an open file, holes hashed as zeros without reading them."""
    return _drain(_sha256_sparse_steps(fd, name))


def _pread(fd: int, length: int, offset: int) -> bytes:
    """The one read of a generation's verification (tests count the bytes it reads)."""
    return os.pread(fd, length, offset)


_T = TypeVar("_T")


def _drain(steps: Generator[None, None, _T]) -> _T:
    """Run a generator of steps to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(_T, done.value)


def _run_check(args: List[str], full: Optional[List[str]] = None) -> Tuple[Optional[int], str]:
    """(return code, last lines of the output); ``full`` receives every line when given."""
    try:
        if children.REGISTRY is not None:  # the server's: the check dies with it (a kill -9)
            rc, stdout = children.REGISTRY.run(args, timeout=FSCK_TIMEOUT_S)
        else:
            rc, stdout = proc.run(args, timeout=FSCK_TIMEOUT_S)
    except FileNotFoundError:
        return None, f"{args[0]} is not installed"
    except proc.TimeoutExpired:
        return None, f"{args[0]} did not finish within {FSCK_TIMEOUT_S} s"
    out = stdout.decode("utf-8", "replace").strip().splitlines()
    if full is not None:
        full.extend(out)
    return rc, " | ".join(out[-4:])[-1000:]


def detect_fs(path: Path) -> Optional[str]:
    rc, out = _run_check(["blkid", "-p", "-o", "value", "-s", "TYPE", "--", str(path)])
    if rc != 0 or not out:
        return None
    return out.split(" | ")[-1].strip() or None


def fs_check(path: Path, fs: Optional[str]) -> Optional[dict]:
    """Read-only filesystem check of an image file: ``e2fsck -fn`` (ext2/3/4), ``xfs_repair -n``.

    An XFS copied while mounted (frozen for the final sync) has a log to replay, which
    ``xfs_repair -n`` refuses to judge. Then the check runs on a replayed copy
    (:func:`_xfs_replayed_check`); where that is impossible (no root, no loop devices) the report
    says ``"log": "needs replay"`` instead of a bare failure."""
    if fs in ("ext2", "ext3", "ext4"):
        args = ["e2fsck", "-f", "-n", "--", str(path)]
    elif fs == "xfs":
        args = ["xfs_repair", "-n", "-f", str(path)]  # xfs_repair takes no "--"
    else:
        return None
    lines: List[str] = []
    rc, summary = _run_check(args, lines)
    report = {"tool": " ".join(args[:-2] if args[-2] == "--" else args[:-1]), "rc": rc, "ok": rc == 0,
              "summary": summary}
    if fs == "xfs" and rc not in (0, None) and _XFS_DIRTY_LOG in " ".join(lines):
        report.update(_xfs_replayed_check(path, summary))
    return report


#: what xfs_repair -n says of a log it cannot replay ("... valuable metadata changes in a log
#: which needs to be replayed" / "... which is being ignored because the -n option was used")
_XFS_DIRTY_LOG = "metadata changes in a log"


def _xfs_replayed_check(path: Path, first: str) -> dict:
    """``xfs_repair -n`` of a copy of ``path`` whose log was replayed by mounting it (loop,
    read-write, ``nouuid``: the source filesystem may be mounted on this host) and unmounting
    it. The copy (a reflink where the filesystem can) lives next to the image and is removed;
    the generation itself is never mounted or written."""
    copy = path.with_name(f".replay-{path.name}")
    mnt = path.with_name(f".replay-{path.stem}.mnt")
    needs = {"log": "needs replay",
             "summary": "the filesystem was copied while mounted (frozen): its log needs replay before "
                        "xfs_repair -n can judge it; mount a copy once, unmount it, then run xfs_repair -n "
                        f"({first[-300:]})"}
    try:
        copy.unlink(missing_ok=True)
        sparse_copy(path, copy)
        mnt.mkdir(exist_ok=True)
        rc, out = _run_check(["mount", "-t", "xfs", "-o", "loop,nouuid", "--", str(copy), str(mnt)])
        if rc != 0:
            log.warning("cannot replay the xfs log of %s on a copy (mount: %s)", path, out)
            return needs
        rc, out = _run_check(["umount", "--", str(mnt)])
        if rc != 0:
            log.warning("cannot unmount %s: %s", mnt, out)
            return needs
        rc, summary = _run_check(["xfs_repair", "-n", "-f", str(copy)])
        return {"rc": rc, "ok": rc == 0, "summary": summary, "log": "replayed on a copy"}
    except OSError as exc:
        log.warning("cannot replay the xfs log of %s on a copy: %s", path, exc)
        return needs
    finally:
        copy.unlink(missing_ok=True)
        try:
            mnt.rmdir()
        except OSError:
            pass


#: free space left on the target after the composed copy a delta's filesystem check needs
CHECK_ROOM_MARGIN = 256 << 20


def _free_bytes(path: Path) -> Optional[int]:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


#: filesystem checks of generations running at once (each in its own thread and child process)
FS_CHECKS = threading.BoundedSemaphore(2)
_CHECK_POLL_S = 0.01


def _checked_in_background(img: Path) -> Generator[None, None, Tuple[Optional[str], Optional[dict]]]:
    """``detect_fs`` and ``fs_check`` of ``img`` in a thread of their own, as steps: yields while
    it waits for one of the FS_CHECKS slots and while the check runs (an fsck of a big, crafted
    filesystem may take up to FSCK_TIMEOUT_S), so the shared verifier goes on with other tasks
    meanwhile. Returns (filesystem, check report)."""
    while not FS_CHECKS.acquire(timeout=_CHECK_POLL_S):
        yield
    result: List[Tuple[Optional[str], Optional[dict]]] = []
    failed: List[BaseException] = []

    def run() -> None:
        try:
            fs = detect_fs(img)
            result.append((fs, fs_check(img, fs)))
        except BaseException as exc:  # noqa: BLE001 - handed to the generation's verification
            failed.append(exc)
        finally:
            FS_CHECKS.release()

    thread = threading.Thread(target=run, name=f"fs-check-{img.name}", daemon=True)
    try:
        thread.start()
    except BaseException:
        FS_CHECKS.release()
        raise
    while True:
        thread.join(_CHECK_POLL_S)
        if not thread.is_alive():
            break
        yield
    if failed:
        raise failed[0]
    return result[0]


def _kind_fields(kind: str, path: Path, cycle: int) -> dict:
    """What a report says of its generation's files: a full image (bootable as it is) or a delta."""
    if kind == blockgens.FULL:
        return {"kind": blockgens.FULL, "path": str(path), "image": True, "note": None}
    return {"kind": blockgens.DELTA, "path": str(path), "image": False,
            "note": f"a delta: only the chunks that changed in cycle {cycle} (map: "
                    f"{path.with_suffix('.chunks').name}), not a bootable image; write the whole image with "
                    f"'go2cloud_server image export --cycle {cycle}'"}


class BlockTaskStore:
    """The block images of one task. Thread-safe for concurrent chunk writes (each write opens
    the image on its own); commits and generations of one disk are serialised."""

    def __init__(self, root: Path, disks: Optional[Mapping[str, Optional[int]]] = None) -> None:
        self.root = Path(root)
        #: called with what failed when a write meets a full filesystem, before TargetFull is
        #: raised (the control plane marks the task ``target_full`` at once)
        self.on_full: Optional[Callable[[str], None]] = None
        self._declared: Optional[Dict[str, Optional[int]]] = None
        self._pinned: Dict[str, int] = {}
        self._pin_lock = threading.Lock()
        if disks is not None:
            self.declare(disks)

    # -- the disks of the task -------------------------------------------------------------------
    def declare(self, disks: Mapping[str, Optional[int]]) -> None:
        """The only disks this store accepts, with their largest size (None: pinned at the
        disk's first write, see :func:`declared_disk_limits`). A store nobody declared disks to
        accepts any valid disk name and size (tools and tests; the control plane always declares)."""
        self._declared = {check_disk_name(name): (int(size) if size else None)
                          for name, size in disks.items()}

    @property
    def declared(self) -> Optional[Dict[str, Optional[int]]]:
        return None if self._declared is None else dict(self._declared)

    def admit_disk(self, disk: str) -> None:
        """NotFound (nothing created) unless ``disk`` is one of the task's disks."""
        check_disk_name(disk)
        if self._declared is not None and disk not in self._declared:
            names = ", ".join(sorted(self._declared)) or "none"
            raise NotFound(f"disk {disk} is not a disk of this task (its disks: {names}); send only the "
                           "disks of the task's start command")

    def size_limit(self, disk: str) -> Optional[int]:
        """The largest size ``disk`` may have: the inventory's, else the size pinned at its first
        write; None when nothing is declared or not pinned yet. Memory only once known."""
        if self._declared is None:
            return None
        limit = self._declared.get(disk)
        if limit is None:
            limit = self._pinned.get(disk)
        if limit is None:
            limit = self._read_pin(disk)
        return limit

    def check_size(self, disk: str, disk_size: int) -> None:
        """DiskTooLarge when ``disk_size`` is over the disk's limit (before anything is read or
        written)."""
        self.admit_disk(disk)
        limit = self.size_limit(disk)
        if limit is None or disk_size <= limit:
            return
        if self._declared is not None and self._declared.get(disk):
            why = "the size the source's inventory reported for it at import"
            fix = ("if the disk was grown since, re-import the source (a fresh inventory) and start a new "
                   "migration task")
        else:
            why = "the size of its first write in this task (a disk of unknown size is pinned then)"
            fix = "a disk cannot grow within a task: start a new migration task for the grown disk"
        raise DiskTooLarge(f"disk {disk}: {disk_size} bytes is larger than {limit} bytes, {why}; {fix}")

    def _admit_size(self, disk: str, disk_size: int) -> None:
        """:meth:`check_size`, pinning the size of a declared disk of unknown size at its first
        write (persisted in ``<disk>/size.json``, so a restart keeps it)."""
        self.check_size(disk, disk_size)
        if self._declared is None or self._declared.get(disk) or disk in self._pinned:
            return
        with self._pin_lock:
            limit = self._read_pin(disk)
            if limit is None:
                ddir = self._disk_dir(disk, create=True)
                write_atomic(ddir / "size.json", json.dumps({
                    "version": STATE_VERSION, "disk": disk, "disk_size": disk_size,
                    "pinned_at": utc_now_iso()}) + "\n")
                self._pinned[disk] = disk_size
                log.info("block %s: disk %s has no size in the source's inventory: %s bytes pinned at its "
                         "first write", self.root, disk, disk_size)
        self.check_size(disk, disk_size)  # another thread pinned a smaller size first

    def _read_pin(self, disk: str) -> Optional[int]:
        try:
            doc = json.loads((self._disk_dir(disk) / "size.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        size = doc.get("disk_size") if isinstance(doc, dict) else None
        if not isinstance(size, int) or size <= 0:
            return None
        self._pinned[disk] = size
        return size

    # -- paths -----------------------------------------------------------------------------------
    def _disk_dir(self, disk: str, create: bool = False) -> Path:
        check_disk_name(disk)
        path = self.root / disk
        if create:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:
                pass
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise InvalidInput(f"disk {disk}: the target path is not a plain directory")
        return path

    def _open_image(self, disk: str, disk_size: int) -> int:
        path = self._disk_dir(disk, create=True) / CURRENT
        try:
            fd = os.open(str(path), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._raise_io(exc, f"cannot open the image of disk {disk}")
        try:
            if os.fstat(fd).st_size < disk_size:
                os.ftruncate(fd, disk_size)
        except OSError as exc:
            os.close(fd)
            self._raise_io(exc, f"cannot size the image of disk {disk}")
        return fd

    def _write_lock(self, disk: str) -> threading.Lock:
        return _lock_for(self.root / disk / CURRENT)

    def _raise_io(self, exc: OSError, what: str) -> None:
        if exc.errno in _NOSPACE:
            from go2cloud_server.space import describe

            message = f"{what}: the target's storage is full ({describe(self.root)})"
            if self.on_full is not None:
                try:
                    self.on_full(message)
                except Exception:  # noqa: BLE001 - the agent is told all the same
                    log.warning("cannot record the full target of %s", self.root, exc_info=True)
            raise TargetFull(f"{message}; committed generations are intact: free space on the "
                             "target, the cycle resumes by itself") from exc
        if exc.errno == errno.EFBIG:  # ext4 holds files up to 16 TiB - 4 KiB
            raise DiskTooLarge(f"{what}: the target's filesystem ({self.root}) cannot hold an image that "
                               "large: put the server's data directory on XFS or btrfs") from exc
        raise exc

    def disks(self) -> List[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.is_symlink() and _DISK_RE.match(p.name)
                      and (self._declared is None or p.name in self._declared))

    # -- chunks ----------------------------------------------------------------------------------
    @staticmethod
    def _check_chunk(disk: str, index: int, length: int, data: Optional[Buffer], xxh3: str,
                     blake3_hex: Optional[str]) -> None:
        """Refuse (nothing written) a chunk whose plain data does not match its hashes."""
        if data is None:
            if xxh3 and xxh3.lower() != zero_xxh3(length):
                raise ChunkHashMismatch(f"disk {disk} chunk {index}: a hole with the hash of non-zero data")
            return
        if len(data) != length:
            raise InvalidInput(f"disk {disk} chunk {index}: {len(data)} bytes, expected {length}")
        if xxhash.xxh3_128(data).hexdigest() != (xxh3 or "").lower():
            raise ChunkHashMismatch(f"disk {disk} chunk {index}: xxh3-128 does not match the data")
        if blake3_hex is not None and blake3.blake3(data).hexdigest() != blake3_hex.lower():
            raise ChunkHashMismatch(f"disk {disk} chunk {index}: BLAKE3 does not match the data")

    @staticmethod
    def _put(fd: int, offset: int, length: int, data: Optional[Buffer], xxh3: str) -> None:
        """Write checked data (``None`` = zeros) at ``offset``: zeros as a hole."""
        # the data's xxh3 was checked: only data hashing like zeros can be all zeros (then one
        # memcmp confirms it); saves a byte count of every other chunk
        if data is None or (xxh3.lower() == zero_xxh3(length) and data == bytes(length)):
            punch_hole(fd, offset, length)
            return
        view = memoryview(data)
        done = 0
        while done < length:
            done += os.pwrite(fd, view[done:], offset + done)

    def write_chunk(self, disk: str, index: int, chunk_size: int, disk_size: int,
                    data: Optional[Buffer],
                    xxh3: str, blake3_hex: Optional[str] = None) -> None:
        """Write one plain chunk (``data`` None = all zeros, written as a hole) after checking it
        against ``xxh3`` (hex xxh3-128) and, when given, ``blake3_hex``: a batch of one."""
        self.write_batch(disk, chunk_size, disk_size, [(index, 1, data, xxh3, blake3_hex)])

    def write_batch(self, disk: str, chunk_size: int, disk_size: int, items: Sequence[BatchItem]) -> None:
        """Write several chunks at once, all or nothing as far as checks go: every item is
        range-checked and every chunk's data checked against its hashes *before* the first
        write; one refused item refuses the whole batch (nothing of it is written). ``count`` > 1
        is a run of holes (``data`` None). The image is opened once for the batch."""
        check_disk_name(disk)
        check_geometry(chunk_size, disk_size)
        self._admit_size(disk, disk_size)
        for index, count, data, xxh3, b3 in items:
            length = chunk_len(index, chunk_size, disk_size)
            if count != 1:
                if data is not None or not 1 <= count:
                    raise InvalidInput(f"disk {disk} chunk {index}: only a run of holes has a count")
                chunk_len(index + count - 1, chunk_size, disk_size)
                continue
            self._check_chunk(disk, index, length, data, xxh3, b3)
        if not items:
            return
        fd = self._open_image(disk, disk_size)
        try:
            # one writer per image at a time: the filesystem serialises writes to one file anyway
            # (the inode lock), and a second thread waiting here sleeps, where waiting for the
            # inode lock spins (measured: ~0.35 CPU-s per 2 GiB pass with two senders on ext4)
            with self._write_lock(disk):
                for index, count, data, xxh3, _b3 in items:
                    offset = index * chunk_size
                    if count != 1:
                        punch_hole(fd, offset, min(disk_size, (index + count) * chunk_size) - offset)
                    else:
                        self._put(fd, offset, min(chunk_size, disk_size - offset), data, xxh3)
                start = min(i[0] for i in items) * chunk_size
                end = min(disk_size, max(i[0] + i[1] for i in items) * chunk_size)
                start_writeback(fd, start, end - start)
        except OSError as exc:
            first, last = min(i[0] for i in items), max(i[0] + i[1] for i in items) - 1
            what = f"chunk {first}" if first == last else f"chunks {first}-{last}"
            self._raise_io(exc, f"cannot write {what} of disk {disk}")
        finally:
            os.close(fd)

    def write_holes(self, disk: str, first: int, count: int, chunk_size: int, disk_size: int) -> None:
        """Chunks ``first`` .. ``first+count-1`` are all zeros: a batch of one run of holes."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise InvalidInput(f"count: {count!r} must be >= 1")
        self.write_batch(disk, chunk_size, disk_size, [(first, count, None, "", None)])

    # -- state -----------------------------------------------------------------------------------
    def _read_state(self, disk: str) -> Optional[dict]:
        path = self._disk_dir(disk) / "state.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        return doc if isinstance(doc, dict) else None

    def state(self, disk: str) -> dict:
        """What the target holds for ``disk``; NotFound if it never received anything."""
        self.admit_disk(disk)
        ddir = self._disk_dir(disk)
        img = ddir / CURRENT
        if not ddir.is_dir():
            raise NotFound(f"disk {disk}: nothing received yet")
        st = self._read_state(disk) or {}
        size = img.lstat().st_size if img.exists() else 0
        return {"disk": disk, "size": size, "chunk_size": st.get("chunk_size"),
                "disk_size": st.get("disk_size"), "committed_cycle": st.get("committed_cycle"),
                "hashes_count": st.get("hashes_count", 0), "hashes_digest": st.get("hashes_digest"),
                "committed_at": st.get("committed_at")}

    def committed_hashes(self, disk: str) -> bytes:
        try:
            return (self._disk_dir(disk) / "committed.hashes").read_bytes()
        except FileNotFoundError:
            return b""

    def commit(self, disk: str, cycle: int, disk_size: int, chunk_hashes: bytes, chunk_size: int = 0) -> dict:
        """Make ``current.img`` of ``disk`` the state of ``cycle``: truncate to ``disk_size``,
        fsync image and directory, record the cycle and the chunk hashes (16 bytes per chunk)."""
        if not isinstance(cycle, int) or not 0 < cycle <= 999999:
            raise InvalidInput(f"cycle: {cycle!r} must be 1-999999")
        if len(chunk_hashes) % HASH_LEN:
            raise InvalidInput("hashes: length is not a multiple of 16")
        count = len(chunk_hashes) // HASH_LEN
        if not chunk_size:  # derive it: the smallest multiple of 4096 that gives ``count`` chunks
            chunk_size = -(-disk_size // max(count, 1)) if isinstance(disk_size, int) else 0
            chunk_size += -chunk_size % MIN_CHUNK
        if check_geometry(chunk_size, disk_size) != count:
            raise InvalidInput(f"hashes: {count} given, the disk has {-(-disk_size // chunk_size)} chunks")
        self._admit_size(disk, disk_size)
        ddir = self._disk_dir(disk, create=True)
        digest = xxhash.xxh3_128(chunk_hashes).hexdigest()
        with _lock_for(ddir):
            old = self._read_state(disk)
            if old and old.get("committed_cycle") == cycle and old.get("hashes_digest") == digest:
                return self.state(disk)
            if old and isinstance(old.get("committed_cycle"), int) and old["committed_cycle"] > cycle:
                raise Conflict(f"disk {disk}: cycle {old['committed_cycle']} is already committed, "
                               f"cannot commit the older cycle {cycle}")
            fd = self._open_image(disk, disk_size)
            try:
                os.ftruncate(fd, disk_size)
                os.fsync(fd)
                write_atomic(ddir / "committed.hashes", chunk_hashes)
                write_atomic(ddir / "state.json", json.dumps({
                    "version": STATE_VERSION, "disk": disk, "chunk_size": chunk_size, "disk_size": disk_size,
                    "committed_cycle": cycle, "hashes_count": count, "hashes_digest": digest,
                    "committed_at": utc_now_iso()}, indent=1) + "\n")
                fsync_dir(ddir)
            except OSError as exc:
                self._raise_io(exc, f"cannot commit disk {disk}")
            finally:
                os.close(fd)
        log.info("block %s: disk %s committed cycle %s (%s bytes, %s chunks)", self.root, disk, cycle,
                 disk_size, count)
        return self.state(disk)

    def verify(self, disk: str, hashes: bytes, first: int = 0, chunk_size: int = 0) -> List[int]:
        """Read back ``current.img`` from chunk ``first`` on; return the indices whose xxh3-128
        differs from ``hashes`` (16 bytes per chunk). ``chunk_size`` defaults to the committed one."""
        return self.verify_indices(disk, [(first + i, hashes[i * HASH_LEN:(i + 1) * HASH_LEN])
                                          for i in range(len(hashes) // HASH_LEN)], chunk_size)

    def verify_indices(self, disk: str, items: List[Tuple[int, bytes]], chunk_size: int = 0) -> List[int]:
        self.admit_disk(disk)
        ddir = self._disk_dir(disk)
        if not chunk_size:
            chunk_size = int((self._read_state(disk) or {}).get("chunk_size") or 0)
        check_geometry(chunk_size, MIN_CHUNK)
        try:
            fd = os.open(str(ddir / CURRENT), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return [i for i, _ in items]
        bad: List[int] = []
        try:
            size = os.fstat(fd).st_size
            for index, want in items:
                off = index * chunk_size
                if index < 0 or off >= size:
                    bad.append(index)
                    continue
                length = min(chunk_size, size - off)
                if _is_hole(fd, off, length):
                    got = bytes.fromhex(zero_xxh3(length))
                else:
                    got = xxhash.xxh3_128(os.pread(fd, length, off)).digest()
                if got != want:
                    bad.append(index)
        finally:
            os.close(fd)
        return bad

    # -- generations -----------------------------------------------------------------------------
    # (the layout of full images and deltas is ``blockgens``'s; this class keeps the reports)
    def gen_path(self, disk: str, cycle: int) -> Path:
        """Where generation ``cycle``'s full image is, or would be."""
        return self._disk_dir(disk) / blockgens.name(cycle, "img")

    def _report_path(self, disk: str, cycle: int) -> Path:
        return self._disk_dir(disk) / blockgens.name(cycle, "json")

    def commit_cycle(self, cycle: int) -> List[dict]:
        """Make generation ``cycle`` of every disk committed at that cycle (idempotent): its files
        and a ``pending`` report. Costs what changed: a reflink where possible, else a delta of
        the chunks that changed since the previous generation (``blockgens``); the first
        generation of a disk is a full sparse copy. The slow part (sha256, filesystem check) is
        :meth:`verify_generation`, run later by the caller. Returns the reports as they are now
        (``pending``, or final when already verified)."""
        out: List[dict] = []
        disks = [d for d in self.disks()
                 if (self._read_state(d) or {}).get("committed_cycle") == cycle
                 or self._report_path(d, cycle).exists()]
        if not disks:
            raise Conflict(f"cycle {cycle}: no disk of this task is committed at that cycle")
        for disk in disks:
            out.append(self._make_generation(disk, cycle))
        return out

    @staticmethod
    def _read_report(path: Path) -> Optional[dict]:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        if not isinstance(doc, dict):
            return None
        doc.setdefault("state", REPORT_VERIFIED)  # reports written before verification was split
        doc.setdefault("kind", blockgens.FULL)  # reports written before deltas
        return doc

    def generation_report(self, disk: str, cycle: int) -> Optional[dict]:
        """The report of generation ``cycle`` of ``disk`` as it is on disk, or None."""
        return self._read_report(self._report_path(disk, cycle))

    def _reports(self, disk: str) -> blockgens.ReportUpdate:
        """What a fold calls: the report of ``cycle`` says it is now a ``kind`` at ``path``."""
        ddir = self._disk_dir(disk)

        def update(cycle: int, kind: str, path: Path) -> None:
            rpath = ddir / blockgens.name(cycle, "json")
            report = self._read_report(rpath)
            if report is None or (report.get("kind") == kind and report.get("path") == str(path)):
                return
            report.update(_kind_fields(kind, path, cycle))
            write_atomic(rpath, json.dumps(report, indent=1) + "\n")
        return update

    def _recover(self, disk: str) -> None:
        """Finish what a crash interrupted in ``disk``'s generations (under its lock)."""
        ddir = self._disk_dir(disk)
        if ddir.is_dir():
            blockgens.recover(ddir, self._reports(disk))

    def _make_generation(self, disk: str, cycle: int) -> dict:
        """The files of generation ``cycle`` of ``disk`` plus its ``pending`` report.

        Crash-safe: the report is written (atomically) only after the files are complete and
        fsynced, so files without a report are an interrupted commit and are made again."""
        ddir = self._disk_dir(disk)
        report_path = ddir / blockgens.name(cycle, "json")
        with _lock_for(ddir):
            self._recover(disk)
            found = self._read_report(report_path)
            if found is not None:
                return found
            blockgens.remove_files(ddir, cycle)
            st = self._read_state(disk) or {}
            chunk_size, disk_size = int(st.get("chunk_size") or 0), int(st.get("disk_size") or 0)
            try:
                made = blockgens.make(ddir, cycle, ddir / CURRENT, self.committed_hashes(disk), chunk_size,
                                      disk_size)
            except OSError as exc:
                blockgens.remove_files(ddir, cycle)
                self._raise_io(exc, f"cannot create generation {cycle} of disk {disk}")
            path = ddir / blockgens.name(cycle, "img" if made.kind == blockgens.FULL else "delta")
            report = {"state": REPORT_PENDING, "disk": disk, "cycle": cycle, "path": str(path),
                      "bytes": disk_size, "sha256": None, "fs": None, "copy": made.how, "check": None,
                      "created_at": utc_now_iso(), "id": blockgens.new_id(), "chunk_size": chunk_size,
                      "disk_size": disk_size, "copied_bytes": made.copied,
                      **_kind_fields(made.kind, path, cycle)}
            if made.kind == blockgens.DELTA:
                report.update(delta_chunks=made.chunks, delta_of=made.base)
            try:
                write_atomic(report_path, json.dumps(report, indent=1) + "\n")
            except OSError as exc:
                blockgens.remove_files(ddir, cycle)
                self._raise_io(exc, f"cannot write the report of generation {cycle} of disk {disk}")
        log.info("block %s: generation %s of disk %s: %s (%s, %s bytes copied), verification pending",
                 self.root, cycle, disk, made.kind, made.how, made.copied)
        return report

    def pending_generations(self) -> List[Tuple[str, int]]:
        """(disk, cycle) of every generation whose report is still ``pending``."""
        out: List[Tuple[str, int]] = []
        for disk in self.disks():
            for m in blockgens.chain(self.root / disk):
                if m.visible and (self._read_report(self._report_path(disk, m.cycle)) or {}).get("state") \
                        == REPORT_PENDING:
                    out.append((disk, m.cycle))
        return out

    def open_generation(self, disk: str, cycle: int) -> blockgens.Composed:
        """Generation ``cycle`` of ``disk`` opened for reading (full image or composed from the
        chain of deltas; see ``blockgens``); NotFound when it does not exist. Read-only."""
        check_disk_name(disk)
        try:
            return blockgens.open_generation(self.root / disk, cycle)
        except blockgens.GenerationMissing:
            raise NotFound(f"disk {disk} has no generation {cycle}") from None

    def verify_generation(self, disk: str, cycle: int) -> Optional[dict]:
        """:meth:`verify_generation_steps` run to its end, in one go."""
        return _drain(self.verify_generation_steps(disk, cycle))

    def verify_generation_steps(self, disk: str, cycle: int) -> Generator[None, None, Optional[dict]]:
        """Verify generation ``cycle`` of ``disk``: sha256 of its image (a delta's composed with
        the generations before it), filesystem found, read-only check (of a delta: on a composed
        temporary copy next to it, removed after); write the final report (``verified``, or
        ``failed`` with ``error`` when the image cannot be read) and return it. A generator: it
        yields after every ``VERIFY_STEP`` bytes hashed and while the filesystem check runs (in a
        thread of its own, see :func:`_checked_in_background`), so the caller can take turns
        between the generations of several tasks; the report is its return value. Holes are
        hashed without being read (their cost is the sha256 of their zeros, no disk reads).

        Idempotent: a final report is returned as it is. Returns None when the generation is gone
        (discarded by retention or cancel, before or during the verification): nothing is written
        then. Runs without the disk's lock (a check may take long and the next cycle's commit must
        not wait); the report is written under the lock, and only if the report is still the
        pending one of the same generation (same ``id``) that was verified. A fold that makes the
        generation a full image meanwhile changes neither its content nor this result."""
        ddir = self._disk_dir(disk)
        report_path = ddir / blockgens.name(cycle, "json")
        report = self._read_report(report_path)
        if report is None:
            return None
        if report.get("state") != REPORT_PENDING:
            return report
        ident = report.get("id") or report.get("created_at")
        final = dict(report)
        try:
            image: Optional[blockgens.Composed] = blockgens.open_generation(ddir, cycle)
        except (blockgens.GenerationMissing, FileNotFoundError):
            return None
        except OSError as exc:
            image = None
            final.update(state=REPORT_FAILED, error=f"cannot open generation {cycle} of disk {disk}: {exc}")
        if image is not None:
            try:
                try:
                    size, digest = yield from _sha256_runs_steps(image.data_runs(), image.size,
                                                                 Path(str(report.get("path"))))
                    final.update(bytes=size, sha256=digest)
                except OSError as exc:
                    final.update(state=REPORT_FAILED, error=f"cannot read {report.get('path')}: {exc}")
                if final["state"] == REPORT_PENDING:
                    if image.kind == blockgens.FULL:
                        image.close()
                        fs, check = yield from _checked_in_background(ddir / blockgens.name(cycle, "img"))
                        on = "the image"
                    else:
                        fs, check = yield from self._check_composed(image, ddir, cycle)
                        on = "a composed temporary copy (the generation is a delta)"
                    if check is not None:
                        check["on"] = on
                    final.update(state=REPORT_VERIFIED, fs=fs, check=check)
            finally:
                image.close()
        final["verified_at"] = utc_now_iso()
        with _lock_for(ddir):
            now = self._read_report(report_path)
            if now is None or (now.get("id") or now.get("created_at")) != ident:
                log.info("block %s: generation %s of disk %s was discarded while it was verified", self.root,
                         cycle, disk)
                return None
            if now.get("state") != REPORT_PENDING:
                return now
            for key in ("kind", "path", "image", "note"):  # a fold may have made it a full image meanwhile
                if key in now:
                    final[key] = now[key]
                else:
                    final.pop(key, None)
            write_atomic(report_path, json.dumps(final, indent=1) + "\n")
        check = final.get("check")
        log.info("block %s: generation %s of disk %s %s: sha256 %s, fs %s, check ok: %s", self.root, cycle,
                 disk, final["state"], final.get("sha256"), final.get("fs"),
                 check.get("ok") if isinstance(check, dict) else None)
        return final

    def _check_composed(self, image: blockgens.Composed, ddir: Path,
                        cycle: int) -> Generator[None, None, Tuple[Optional[str], Optional[dict]]]:
        """``detect_fs`` and ``fs_check`` of a delta generation, on a composed copy written next
        to it (sparse: the space of its data, for the time of the check) and removed after."""
        tmp = ddir / f".check-{blockgens.name(cycle, 'img')}"
        data = sum(n for _off, n, _fd in image.data_runs())
        free = _free_bytes(ddir)
        if free is not None and free < data + CHECK_ROOM_MARGIN:
            image.close()
            log.warning("block %s: generation %s: no room for a composed copy to check (%s bytes of data, "
                        "%s free): filesystem check skipped", self.root, cycle, data, free)
            return None, {"ok": None, "rc": None, "skipped": "room",
                          "summary": f"not checked: a delta is checked on a composed copy of its "
                                     f"{data} bytes of data, and the target has {free} bytes free (needs "
                                     f"{CHECK_ROOM_MARGIN} more); its sha256 is verified"}
        try:
            tmp.unlink(missing_ok=True)
            fd = os.open(str(tmp), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, image.size)
                budget = VERIFY_STEP
                for n in image.copy_to(fd):
                    budget -= n
                    if budget <= 0:
                        budget = VERIFY_STEP
                        yield
            finally:
                os.close(fd)
                image.close()
            return (yield from _checked_in_background(tmp))
        except OSError as exc:
            if exc.errno not in _NOSPACE:
                raise
            return None, {"ok": None, "rc": None, "skipped": "room",
                          "summary": f"not checked: no room for a composed copy of the delta ({exc}); its "
                                     "sha256 is verified"}
        finally:
            tmp.unlink(missing_ok=True)

    def generations(self) -> List[int]:
        """Cycles that have a complete generation (files + report) for at least one disk."""
        found = set()
        for disk in self.disks():
            for m in blockgens.chain(self.root / disk):
                if m.visible and m.kind is not None:
                    found.add(m.cycle)
        return sorted(found)

    def discard_cycle(self, cycle: int) -> None:
        """Remove generation ``cycle`` of every disk (report first), also one still being
        verified: :meth:`verify_generation` then finds it gone and writes nothing. The next
        generation takes what it needs of it first (``blockgens``: a fold or a merge, O(chunks of
        one delta)); the others keep their content at every moment."""
        for disk in self.disks():
            ddir = self._disk_dir(disk)
            with _lock_for(ddir):
                self._recover(disk)
                if not blockgens.begin_discard(ddir, cycle):
                    continue
                try:
                    blockgens.finish_discard(ddir, cycle, self._reports(disk))
                except OSError as exc:
                    self._raise_io(exc, f"cannot discard generation {cycle} of disk {disk} (finished at "
                                        "the next commit)")

    def retain(self, keep: int) -> List[int]:
        """Keep the newest ``keep`` generations (at least 1); return the removed cycles."""
        keep = max(1, int(keep))
        gens = self.generations()
        removed = gens[:-keep] if len(gens) > keep else []
        for cycle in removed:
            self.discard_cycle(cycle)
        return removed

    def destroy(self) -> None:
        if self.root.is_symlink():
            self.root.unlink()
        elif self.root.exists():
            shutil.rmtree(self.root)
