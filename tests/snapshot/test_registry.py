"""Registry, the scripted failing backend, and the pure helpers (extent merging, extent-map
diffing, tool output parsers, the record). No root needed."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from snapshot_driver import Backend, Extent, ProbeResult, SnapshotError, get, names, probe_all
from snapshot_driver._extentmap import (
    FIEMAP_EXTENT_ENCODED,
    FIEMAP_EXTENT_LAST,
    FIEMAP_EXTENT_UNWRITTEN,
    MapExtent,
    diff_maps,
)
from snapshot_driver._record import SnapshotRecord
from snapshot_driver.base import merge_extents
from snapshot_driver.btrfs import parse_find_new

ALL = ["btrfs", "dattobd", "elastio-snap", "failing", "fsfreeze", "live", "lvm", "reflink", "vss"]


# -- registry --------------------------------------------------------------------------------

def test_names():
    assert names() == ALL


def test_get_returns_configured_backends():
    for name in ALL:
        backend = get(name)
        assert isinstance(backend, Backend) and backend.name == name
    assert get("ELASTIO_SNAP").name == "elastio-snap"
    assert get("fsfreeze", max_window=5).max_window == 5.0
    assert get("live") is not get("live")


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(SnapshotError) as err:
        get("zfs")
    assert err.value.code == "unknown_backend" and not err.value.retryable
    assert str(err.value) == "unknown snapshot backend 'zfs'; known backends: " + ", ".join(ALL)


def test_probe_all_explains_every_backend(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"x" * 4096)
    results = probe_all(str(image))
    assert sorted(results) == [n for n in ALL if n != "failing"]
    for name, result in results.items():
        assert isinstance(result, ProbeResult)
        assert result.reason.startswith(f"{name}:") and len(result.reason) > 20, result
    assert results["live"].usable and "not point-in-time" in results["live"].reason
    assert not results["vss"].usable


def test_probe_all_survives_a_probe_that_breaks_its_contract(tmp_path, monkeypatch):
    """probe() must never raise; if one does anyway (a bug, an odd host), that backend reads as
    unusable with the error and the others are still probed."""
    from snapshot_driver import lvm

    def broken(self, volume=None):
        raise RuntimeError("lvs crashed")

    monkeypatch.setattr(lvm.LvmBackend, "probe", broken)
    results = probe_all(None)
    assert not results["lvm"].usable and results["lvm"].reason == "lvm: probe failed (lvs crashed)"
    assert results["live"].usable and sorted(results) == [n for n in ALL if n != "failing"]


# -- helpers ---------------------------------------------------------------------------------

def test_merge_extents():
    got = merge_extents([Extent(10, 5), Extent(0, 3), Extent(3, 2), Extent(12, 10), Extent(40, 0),
                         Extent(90, 20)], limit=100)
    assert got == [Extent(0, 5), Extent(10, 12), Extent(90, 10)]
    assert merge_extents([]) == []


def m(logical, physical, length, flags=0):
    return MapExtent(logical, physical, length, flags)


def test_diff_maps_same_blocks_are_unchanged():
    old = [m(0, 1000, 100, FIEMAP_EXTENT_LAST)]
    assert diff_maps(old, 100, old, 100) == []
    # the same bytes reported as two extents are still the same
    assert diff_maps(old, 100, [m(0, 1000, 40), m(40, 1040, 60)], 100) == []


def test_diff_maps_reports_moved_holes_grown_and_untrusted():
    old = [m(0, 1000, 100), m(200, 5000, 100)]
    new = [m(0, 1000, 30), m(30, 9000, 10), m(40, 1040, 60),     # 30..40 rewritten
           m(100, 7000, 50),                                     # hole filled
           m(200, 5000, 50, FIEMAP_EXTENT_UNWRITTEN),            # preallocated != data
           m(250, 5050, 50, FIEMAP_EXTENT_ENCODED),              # untrusted
           m(300, 8000, 100)]                                    # grown past the old size
    assert diff_maps(old, 300, new, 400) == [Extent(30, 10), Extent(100, 50), Extent(200, 200)]
    # data became a hole
    assert diff_maps(old, 300, [m(0, 1000, 100)], 300) == [Extent(200, 100)]
    # allocation-only comparison ignores rewritten data
    assert diff_maps(old, 300, new, 300, physical=False) == [Extent(100, 50)]


def test_parse_find_new():
    out = ("inode 257 file offset 0 len 409600 disk start 13631488 offset 0 gen 7 flags NONE img\n"
           "inode 258 file offset 0 len 10 disk start 0 offset 0 gen 9 flags INLINE other\n"
           "inode 257 file offset 409600 len 12288 disk start 6396 offset 0 gen 9 flags NONE img\n"
           "transid marker was 10\n")
    assert parse_find_new(out, 257) == [Extent(0, 409600), Extent(409600, 12288)]


def test_snapshot_record_is_atomic_and_private(tmp_path):
    record = SnapshotRecord(tmp_path, "elastio_snap")
    record.put({"id": "a", "state": "in_use"})
    record.put({"id": "b", "state": "base"})
    record.put({"id": "a", "state": "base"})
    assert record.path.name == "snapshot-elastio-snap.json"
    assert stat.S_IMODE(os.stat(record.path).st_mode) == 0o600
    assert sorted(e["id"] for e in record.entries()) == ["a", "b"]
    assert record.get("a") == {"id": "a", "state": "base"}
    record.remove("a")
    record.remove("b")
    assert not record.path.exists() and record.entries() == []
    record.path.write_text("{broken")
    assert record.entries() == []
    assert [p.name for p in tmp_path.iterdir()] == [record.path.name]    # no temp files left


# -- the failing backend ---------------------------------------------------------------------

@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    data = bytearray(os.urandom(1 << 20))
    data[256 << 10: 512 << 10] = bytes(256 << 10)
    path.write_bytes(bytes(data))
    return path


def sha(path, n=None):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read() if n is None else f.read(n)).hexdigest()


def test_failing_without_script_is_a_correct_backend(image, tmp_path):
    backend = get("failing")
    work = tmp_path / "work"
    s1 = backend.create(str(image), work)
    assert s1.size == 1 << 20 and sha(s1.path()) == sha(image)
    token = s1.token()
    s1.release()
    with open(image, "r+b") as f:
        f.seek(5000)
        f.write(b"changed")
    with backend.create(str(image), work) as s2:
        assert s2.changed_since(token) == [Extent(4096, 4096)]
        assert s2.changed_since(None) is None and s2.changed_since("failing:gone") is None
    backend.purge(work)
    assert os.listdir(work / "failing") == []


@pytest.mark.parametrize("code,retryable", [("no_space", False), ("snapshot_failed", True),
                                            ("snapshot_unsupported", False)])
def test_failing_create(image, tmp_path, code, retryable):
    backend = get("failing", script={"fail_create": code})
    with pytest.raises(SnapshotError) as err:
        backend.create(str(image), tmp_path / "w")
    assert (err.value.code, err.value.retryable) == (code, retryable)


def test_failing_create_only_the_first_times(image, tmp_path):
    backend = get("failing", script={"fail_create": "snapshot_failed", "fail_create_times": 2})
    for _ in range(2):
        with pytest.raises(SnapshotError):
            backend.create(str(image), tmp_path / "w")
    backend.create(str(image), tmp_path / "w").release()


def test_failing_read_after_n_bytes(image, tmp_path):
    snap = get("failing", script={"fail_read_after": 100000}).create(str(image), tmp_path / "w")
    f = snap.open()
    assert len(f.read(65536)) == 65536
    assert len(f.read(65536)) == 100000 - 65536
    with pytest.raises(SnapshotError) as err:
        f.read(1)
    assert err.value.code == "read_failed" and err.value.retryable
    f.close()
    assert os.path.getsize(snap.path()) == 100000 < snap.size     # a pread past it comes back short
    snap.release()


def test_failing_release_once(image, tmp_path):
    snap = get("failing", script={"fail_release_once": True}).create(str(image), tmp_path / "w")
    with pytest.raises(SnapshotError) as err:
        snap.release()
    assert err.value.code == "release_failed" and err.value.retryable and not snap.released
    snap.release()
    snap.release()
    assert snap.released


def test_failing_changed_since_none_and_no_token(image, tmp_path):
    backend = get("failing", script={"changed_since_none": True, "no_token": True})
    s1 = backend.create(str(image), tmp_path / "w")
    assert s1.token() is None
    s1.release()
    with backend.create(str(image), tmp_path / "w") as s2:
        assert s2.changed_since("failing:" + "0" * 12) is None


def test_failing_probe_script(image):
    result = get("failing", script={"probe": "injected: not usable"}).probe(str(image))
    assert result == ProbeResult(False, "failing: injected: not usable")


def test_failing_recover_removes_unreleased_copies(image, tmp_path):
    work = tmp_path / "w"
    backend = get("failing")
    backend.create(str(image), work).release()        # a base: kept
    backend.create(str(image), work)                  # the "crash"
    assert len(os.listdir(work / "failing")) == 2
    assert len(backend.recover(work)) == 1
    assert len(os.listdir(work / "failing")) == 1
    assert len(backend.purge(work)) == 1 and os.listdir(work / "failing") == []
