"""Backend behaviour beyond the shared contracts, on real loop-mounted filesystems: the fsfreeze
watchdog and guard, probe messages for unsuitable filesystems, base retention and honest
None answers of the change-tracking backends."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from snapshot_driver import Extent, SnapshotError, get
from tests.snapshot import conformance as c
from tests.snapshot.conftest import MKFS

pytestmark = [pytest.mark.integration, pytest.mark.root]


def test_fsfreeze_watchdog_thaws_and_check_reports_it(loopfs, tmp_path):
    fs = loopfs.make("ext4")
    # without the guard process (its own test is below), only the watchdog can thaw
    snap = get("fsfreeze", max_window=2.0, guard=False).create(fs.device, tmp_path / "w")
    try:
        assert c.is_frozen(fs.mountpoint, 0.3)
        # the watchdog's thaw is the signal: wait for it (bounded), never for a fixed time
        deadline = time.monotonic() + 30
        while c.is_frozen(fs.mountpoint, 0.3):
            assert time.monotonic() < deadline, "the watchdog did not thaw after its window"
        with pytest.raises(SnapshotError) as err:
            snap.check()
        assert err.value.code == "snapshot_expired" and err.value.retryable
        assert "hit its time limit" in str(err.value)
    finally:
        snap.release()
    snap.release()


def test_fsfreeze_guard_thaws_when_the_process_is_killed(loopfs, tmp_path):
    fs = loopfs.make("ext4")
    work = tmp_path / "w"
    proc = subprocess.Popen([sys.executable, "-c", c.CRASH.replace("os.kill(os.getpid(), signal.SIGKILL)",
                                                                   "sys.stdin.read()"),
                             str(c.REPO), "fsfreeze", "{}", fs.device, str(work)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == fs.device
        assert c.is_frozen(fs.mountpoint, 0.3)
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while c.is_frozen(fs.mountpoint, 0.3):
            assert time.monotonic() < deadline, "the guard did not thaw after the kill"
    finally:
        proc.kill()
        proc.wait()
    # the record still lists it: recover() finds it already thawed and forgets it
    assert get("fsfreeze").recover(work) == [f"fsfreeze: {fs.mountpoint} was already thawed"]


def test_fsfreeze_refuses_a_workdir_on_the_frozen_filesystem(loopfs):
    fs = loopfs.make("ext4")
    with pytest.raises(SnapshotError) as err:
        get("fsfreeze").create(fs.device, fs.mountpoint / "work")
    assert err.value.code == "bad_volume"
    assert "work directory" in str(err.value)
    assert not c.is_frozen(fs.mountpoint)


def test_fsfreeze_unmounted_device(loopfs, tmp_path):
    fs = loopfs.make("ext4")
    loopfs.umount(fs.mountpoint)
    result = get("fsfreeze").probe(fs.device)
    assert not result.usable
    assert result.reason == (f"fsfreeze: {fs.device} is not mounted; an unmounted filesystem does "
                             "not change, so read it with the live backend")
    with pytest.raises(SnapshotError) as err:
        get("fsfreeze").create(fs.device, tmp_path / "w")
    assert err.value.code == "snapshot_unsupported" and not err.value.retryable
    assert get("fsfreeze").probe(str(fs.image)).reason.startswith(
        f"fsfreeze: {fs.image} is not a block device")


def test_reflink_and_btrfs_probe_explain_unsuitable_filesystems(loopfs):
    ext4 = loopfs.make("ext4")
    image = ext4.mountpoint / "disk.img"
    image.write_bytes(b"x" * 8192)
    result = get("reflink").probe(str(image))
    assert not result.usable
    assert result.reason == (f"reflink: {ext4.mountpoint} is on ext4, which has no reflink support; "
                             "use an XFS (reflink=1) or btrfs filesystem")
    result = get("btrfs").probe(str(image))
    assert not result.usable and result.reason.startswith(f"btrfs: {image} is on ext4, not btrfs")
    xfs = loopfs.make("xfs", mkfs=[*MKFS["xfs"][:3], "-m", "reflink=0"])
    (xfs.mountpoint / "disk.img").write_bytes(b"x" * 8192)
    result = get("reflink").probe(str(xfs.mountpoint / "disk.img"))
    assert not result.usable and "was made without reflink (reflink=0)" in result.reason
    with pytest.raises(SnapshotError) as err:
        get("reflink").create(str(xfs.mountpoint / "disk.img"), xfs.mountpoint / "w")
    assert err.value.code == "snapshot_unsupported"


@pytest.mark.parametrize("name,fstype", [("reflink", "xfs"), ("btrfs", "btrfs")])
def test_bases_are_kept_newest_first_and_a_lost_base_means_unknown(loopfs, tmp_path, name, fstype):
    fs = loopfs.make(fstype, 256)
    if fstype == "btrfs":
        c.run(["btrfs", "subvolume", "create", str(fs.mountpoint / "vm")])
        subject = c.ImageSubject(fs.mountpoint / "vm" / "disk.img", tmp_path / "w",
                                 [fs.mountpoint / "vm" / ".go2cloud-snapshots"], size=8 << 20)
    else:
        subject = c.ImageSubject(fs.mountpoint / "disk.img", tmp_path / "w",
                                 [fs.mountpoint / ".go2cloud-reflink"], size=8 << 20)
    backend = get(name, keep=2)
    tokens = []
    for _ in range(3):
        snap = backend.create(subject.volume, subject.workdir)
        tokens.append(snap.token())
        snap.release()
    assert len(subject.artifacts()) == 2
    # the file grows: the new tail counts as changed
    with open(subject.volume, "ab") as f:
        f.write(os.urandom(8192))
    snap = backend.create(subject.volume, subject.workdir)
    try:
        assert snap.changed_since(tokens[0]) is None           # pruned base: unknown, not "nothing"
        assert snap.changed_since(tokens[2]) == [Extent(8 << 20, 8192)]
    finally:
        snap.release()
    backend.purge(subject.workdir)
    assert subject.artifacts() == []
