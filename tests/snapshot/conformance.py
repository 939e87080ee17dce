"""One conformance suite for every snapshot backend that can run on this machine.

A *case* is a backend (name + options) and a *subject*: the volume it snapshots, set up on a
real loop-mounted filesystem with known data, plus how to change it and how to see what a
backend left behind. ``test_conformance.py`` runs every check below against every case.

Two kinds of subject:

* :class:`ImageSubject`: an image file (reflink, btrfs, failing). The snapshot's bytes must
  equal the file's bytes at create(); changes are known byte ranges (and a punched hole), so
  changed_since() is checked against the real difference of the two snapshots' contents.
* :class:`DeviceSubject`: a loop device with a mounted filesystem (live, fsfreeze). The
  snapshot's bytes are copied to a new image, attached and mounted read-only, and must hold
  the files written before create() (and, for point-in-time backends, not those written after).
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import hashlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from snapshot_driver import Backend, Extent, Snapshot, SnapshotError, get
from tests.snapshot.conftest import LoopFactory, LoopFs, run

MIB = 1024 * 1024
BLOCK = 4096
REPO = Path(__file__).resolve().parents[2]

#: every SnapshotError code a backend may raise (base.py)
KNOWN_CODES = {"snapshot_unsupported", "snapshot_failed", "no_space", "tool_missing",
               "bad_volume", "snapshot_expired", "read_failed", "release_failed",
               "unknown_backend", "bad_token"}


def sha256_path(path: str, size: Optional[int] = None) -> str:
    h = hashlib.sha256()
    left = size
    with open(path, "rb", buffering=0) as f:
        while left is None or left > 0:
            buf = f.read(MIB if left is None else min(MIB, left))
            if not buf:
                break
            h.update(buf)
            if left is not None:
                left -= len(buf)
    return h.hexdigest()


def read_all(snap: Snapshot) -> bytes:
    with snap.open() as f:
        data = f.read(snap.size + 1)
        out = bytearray(data or b"")
        while len(out) < snap.size:
            more = f.read(snap.size - len(out))
            if not more:
                break
            out += more
    return bytes(out[: snap.size])


def punch_hole(fd: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x1, 0x2
    rc = libc.fallocate(ctypes.c_int(fd), ctypes.c_int(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE),
                        ctypes.c_longlong(offset), ctypes.c_longlong(length))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fill_pattern(size: int, seed: int) -> bytes:
    """A realistic mix: random blocks, text, and all-zero stretches (holes when written)."""
    rnd = hashlib.sha256(str(seed).encode()).digest()
    out = bytearray()
    i = 0
    while len(out) < size:
        kind = i % 4
        if kind == 0:
            out += os.urandom(256 * 1024)
        elif kind == 1:
            out += (b"line %d of the text part %s\n" % (i, rnd.hex().encode())) * 4000
        elif kind == 2:
            out += bytes(512 * 1024)
        else:
            out += os.urandom(128 * 1024)
        i += 1
    return bytes(out[:size])


def is_frozen(mountpoint: Path, timeout: float = 1.0) -> bool:
    """True if writing to ``mountpoint`` blocks (the filesystem is frozen)."""
    probe = mountpoint / f".frozen-probe-{os.urandom(4).hex()}"
    done = threading.Event()

    def write() -> None:
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, b"x")
            os.fsync(fd)
            os.close(fd)
            os.unlink(probe)
        finally:
            done.set()

    threading.Thread(target=write, daemon=True).start()
    return not done.wait(timeout)


class Subject:
    """What a backend snapshots in one case. Subclasses fill these in."""

    volume: str
    workdir: Path
    kind: str = ""

    def verify(self, snap: Snapshot, absent: Tuple[str, ...] = ()) -> None:
        raise NotImplementedError

    def mutate(self) -> Optional[List[Extent]]:
        """Change the volume; return the byte ranges changed, or None if not known exactly."""
        raise NotImplementedError

    def artifacts(self) -> List[str]:
        """Things on the host that snapshots made (clones, subvolumes, a frozen filesystem)."""
        return []


@dataclass
class ImageSubject(Subject):
    image: Path
    workdir: Path
    artifact_dirs: List[Path] = field(default_factory=list)
    size: int = 24 * MIB
    kind: str = "image"

    def __post_init__(self) -> None:
        self.volume = str(self.image)
        self.image.write_bytes(b"")
        fd = os.open(self.image, os.O_WRONLY)
        try:
            data = fill_pattern(self.size, 1)
            for off in range(0, self.size, MIB):
                chunk = data[off:off + MIB]
                if chunk.count(0) != len(chunk):
                    os.pwrite(fd, chunk, off)
            os.ftruncate(fd, self.size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def digest(self) -> str:
        return sha256_path(self.volume)

    def verify(self, snap: Snapshot, absent: Tuple[str, ...] = ()) -> None:
        raise AssertionError("image subjects are checked by digest")

    def mutate(self) -> List[Extent]:
        regions = [(10 * BLOCK, 100), (MIB + 5, 70000), (self.size - BLOCK, BLOCK),
                   (12 * MIB, 1), (16 * MIB + 123, 3 * MIB)]
        changed = []
        fd = os.open(self.image, os.O_WRONLY)
        try:
            for off, ln in regions:
                os.pwrite(fd, os.urandom(ln), off)
                changed.append(Extent(off, ln))
            # a hole punched into data (random data at 0..256K in fill_pattern)
            punch_hole(fd, 64 * BLOCK, 8 * BLOCK)
            changed.append(Extent(64 * BLOCK, 8 * BLOCK))
            os.fsync(fd)
        finally:
            os.close(fd)
        return changed

    def artifacts(self) -> List[str]:
        found = []
        for d in self.artifact_dirs:
            if d.is_dir():
                found += [str(d / n) for n in sorted(os.listdir(d))]
        return found


@dataclass
class DeviceSubject(Subject):
    fs: LoopFs
    loops: LoopFactory
    workdir: Path
    kind: str = "device"
    files: Dict[str, str] = field(default_factory=dict)
    counter: int = 0

    def __post_init__(self) -> None:
        self.volume = self.fs.device
        for name, size in (("random.bin", 6 * MIB), ("text.txt", 300 * 1024), ("small", 17)):
            data = fill_pattern(size, len(self.files) + 7) if name != "random.bin" else os.urandom(size)
            (self.fs.mountpoint / name).write_bytes(data)
            self.files[name] = hashlib.sha256(data).hexdigest()
        os.sync()

    def verify(self, snap: Snapshot, absent: Tuple[str, ...] = ()) -> None:
        """Copy the snapshot's bytes into a new image, mount it read-only, compare files."""
        base = self.loops.base
        self.counter += 1
        copy = base / f"copy{self.counter}.img"
        with snap.open() as src, open(copy, "wb") as dst:
            left = snap.size
            while left > 0:
                buf = src.read(min(4 * MIB, left))
                assert buf, "snapshot reader returned less than size bytes"
                if buf.count(0) == len(buf):
                    dst.seek(len(buf), os.SEEK_CUR)
                else:
                    dst.write(buf)
                left -= len(buf)
            dst.truncate(snap.size)
        dev = self.loops.attach(copy)
        mp = base / f"copy{self.counter}.mnt"
        opts = "ro,nouuid" if self.fs.fstype == "xfs" else "ro"
        try:
            self.loops.mount(dev, mp, opts)
            for name, digest in self.files.items():
                assert sha256_path(str(mp / name)) == digest, f"{name} differs in the snapshot"
            for name in absent:
                assert not (mp / name).exists(), f"{name} was written after create() but is in " \
                                                 "the snapshot"
        finally:
            self.loops.umount(mp)
            self.loops.detach(dev)
            copy.unlink()

    def mutate(self) -> None:
        data = os.urandom(2 * MIB)
        path = self.fs.mountpoint / "after.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return None

    def artifacts(self) -> List[str]:
        return [f"frozen:{self.fs.mountpoint}"] if is_frozen(self.fs.mountpoint) else []


@dataclass
class Case:
    id: str
    backend: str
    options: Dict[str, Any]
    setup: Callable[[LoopFactory, Path], Subject]
    tracks_changes: bool = False       # changed_since must return a list here
    blocks_writers: bool = False       # writes to the volume block while a snapshot exists

    def make_backend(self) -> Backend:
        return get(self.backend, **self.options)


def _device(fstype: str) -> Callable[[LoopFactory, Path], Subject]:
    def setup(loops: LoopFactory, tmp: Path) -> Subject:
        return DeviceSubject(loops.make(fstype, 64), loops, tmp / "work")
    return setup


def _reflink(fstype: str, workdir_on_fs: bool) -> Callable[[LoopFactory, Path], Subject]:
    def setup(loops: LoopFactory, tmp: Path) -> Subject:
        fs = loops.make(fstype, 256)
        (fs.mountpoint / "images").mkdir()
        work = fs.mountpoint / "work" if workdir_on_fs else tmp / "work"
        dirs = [work / "reflink", fs.mountpoint / "images" / ".go2cloud-reflink"]
        return ImageSubject(fs.mountpoint / "images" / "disk.img", work, dirs)
    return setup


def _btrfs(loops: LoopFactory, tmp: Path) -> Subject:
    fs = loops.make("btrfs", 256)
    run(["btrfs", "subvolume", "create", str(fs.mountpoint / "vm")])
    (fs.mountpoint / "vm" / "disks").mkdir()
    return ImageSubject(fs.mountpoint / "vm" / "disks" / "disk.img", tmp / "work",
                        [fs.mountpoint / "vm" / ".go2cloud-snapshots"])


def _failing(loops: LoopFactory, tmp: Path) -> Subject:
    (tmp / "images").mkdir()
    return ImageSubject(tmp / "images" / "disk.img", tmp / "work", [tmp / "work" / "failing"])


CASES = [
    Case("live-ext4", "live", {}, _device("ext4")),
    Case("fsfreeze-ext4", "fsfreeze", {"max_window": 30}, _device("ext4"), blocks_writers=True),
    Case("fsfreeze-xfs", "fsfreeze", {"max_window": 30}, _device("xfs"), blocks_writers=True),
    Case("reflink-xfs", "reflink", {}, _reflink("xfs", False), tracks_changes=True),
    Case("reflink-btrfs", "reflink", {}, _reflink("btrfs", True), tracks_changes=True),
    Case("btrfs", "btrfs", {}, _btrfs, tracks_changes=True),
    Case("failing", "failing", {"script": {}}, _failing, tracks_changes=True),
]


# -- checks ----------------------------------------------------------------------------------

def check_probe(backend: Backend, subject: Subject) -> None:
    result = backend.probe(subject.volume)
    assert result.usable, result.reason
    assert result.reason.startswith(f"{backend.name}:"), result.reason
    if not backend.point_in_time:
        assert "not point-in-time" in result.reason
    bad = backend.probe(str(subject.workdir / "no-such-volume"))
    assert not bad.usable and "does not exist" in bad.reason, bad.reason


def check_contents(backend: Backend, subject: Subject) -> None:
    expected = subject.digest() if isinstance(subject, ImageSubject) else None
    snap = backend.create(subject.volume, subject.workdir)
    try:
        assert snap.backend == backend.name and snap.volume == subject.volume
        if isinstance(subject, ImageSubject):
            assert snap.size == subject.size
            assert hashlib.sha256(read_all(snap)).hexdigest() == expected
            assert sha256_path(snap.path(), snap.size) == expected
        else:
            assert snap.size == os.stat(subject.fs.image).st_size
            subject.verify(snap)
        snap.check()
    finally:
        snap.release()


def check_point_in_time(backend: Backend, subject: Subject, blocks_writers: bool) -> None:
    if not backend.point_in_time:
        return
    before = subject.digest() if isinstance(subject, ImageSubject) else None
    snap = backend.create(subject.volume, subject.workdir)
    writer = None
    errors: List[BaseException] = []
    try:
        if blocks_writers:
            def write() -> None:
                try:
                    subject.mutate()
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            writer.join(1.0)
            assert writer.is_alive(), "a writer was not blocked while the filesystem was frozen"
        else:
            subject.mutate()
        if isinstance(subject, ImageSubject):
            assert subject.digest() != before
            assert hashlib.sha256(read_all(snap)).hexdigest() == before
        else:
            subject.verify(snap, absent=("after.bin",))
        snap.check()
    finally:
        snap.release()
        if writer is not None:
            writer.join(30)
            assert not writer.is_alive(), "the writer stayed blocked after release()"
    assert not errors, errors


def check_release(backend: Backend, subject: Subject) -> None:
    before = subject.artifacts()
    snap = backend.create(subject.volume, subject.workdir)
    snap.path()
    snap.release()
    snap.release()
    assert snap.released
    for call in (snap.path, snap.open):
        try:
            call()
        except SnapshotError as exc:
            assert exc.code == "snapshot_expired"
        else:
            raise AssertionError(f"{call.__name__}() after release() did not raise")
    after = subject.artifacts()
    # a change-tracking backend keeps the released snapshot as a base: at most one more thing
    assert len(after) <= len(before) + (1 if backend.tracks_changes else 0), (before, after)
    assert not any(a.startswith("frozen:") for a in after)
    backend.purge(subject.workdir)
    assert subject.artifacts() == [], subject.artifacts()
    assert backend.recover(subject.workdir) == []


def check_changed_since(backend: Backend, subject: Subject, must_track: bool) -> None:
    assert isinstance(subject, ImageSubject)
    s1 = backend.create(subject.volume, subject.workdir)
    old = read_all(s1)
    token = s1.token()
    assert s1.changed_since(None) is None
    assert s1.changed_since("not-a-token-of-this-backend") is None
    s1.release()
    written = subject.mutate()
    s2 = backend.create(subject.volume, subject.workdir)
    try:
        new = read_all(s2)
        extents = s2.changed_since(token)
        if must_track:
            assert token is not None and extents is not None, "no change tracking"
        if extents is None:
            return
        # sorted, merged, non-overlapping, inside [0, size)
        for a, b in zip(extents, extents[1:]):
            assert a.end < b.offset, (a, b)
        assert all(e.length > 0 and e.offset >= 0 and e.end <= s2.size for e in extents)
        # every byte that really differs lies inside a reported extent
        truth = [Extent(off, BLOCK) for off in range(0, len(new), BLOCK)
                 if old[off:off + BLOCK] != new[off:off + BLOCK]]
        assert truth, "the mutation changed nothing?"
        starts = [e.offset for e in extents]
        for t in truth:
            diff = [k for k in range(BLOCK) if old[t.offset + k] != new[t.offset + k]]
            lo, hi = t.offset + diff[0], t.offset + diff[-1]
            k = bisect.bisect_right(starts, lo) - 1
            assert k >= 0 and extents[k].offset <= lo and hi < extents[k].end, \
                f"changed bytes {lo}..{hi} not inside a reported extent: {extents}"
        # and not wildly more than what was written (block/extent granularity)
        reported = sum(e.length for e in extents)
        assert written is not None
        assert reported <= sum(w.length for w in written) + len(written) * 2 * MIB, reported
    finally:
        s2.release()


CRASH = r"""
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from snapshot_driver import get
backend = get(sys.argv[2], **json.loads(sys.argv[3]))
snap = backend.create(sys.argv[4], Path(sys.argv[5]))
print(snap.path(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def crash_child(case: Case, subject: Subject, options: Dict[str, Any]) -> None:
    proc = subprocess.run([sys.executable, "-c", CRASH, str(REPO), case.backend,
                           json.dumps(options), subject.volume, str(subject.workdir)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.strip(), proc.stderr


def check_recover(case: Case, subject: Subject) -> None:
    backend = case.make_backend()
    options = dict(case.options)
    if case.backend == "fsfreeze":
        options["guard"] = False          # leave it frozen: recover() must thaw it
    before = subject.artifacts()
    crash_child(case, subject, options)
    left = subject.artifacts()
    if case.backend != "live":
        assert len(left) == len(before) + 1, (before, left)
    released = backend.recover(subject.workdir)
    if case.backend != "live":
        assert released, "recover() released nothing after a crash"
    assert subject.artifacts() == before
    assert backend.recover(subject.workdir) == []
    # the backend still works after recovery
    backend.create(subject.volume, subject.workdir).release()


def check_errors(backend: Backend, subject: Subject) -> None:
    for volume in (str(subject.workdir / "missing.img"), str(subject.workdir)):
        subject.workdir.mkdir(parents=True, exist_ok=True)
        try:
            backend.create(volume, subject.workdir)
        except SnapshotError as exc:
            assert exc.code in KNOWN_CODES, exc.code
            assert exc.code in ("bad_volume", "snapshot_unsupported"), exc.code
            assert not exc.retryable
            assert str(exc).startswith(f"{backend.name}:"), str(exc)
        else:
            raise AssertionError(f"create({volume!r}) did not raise")
