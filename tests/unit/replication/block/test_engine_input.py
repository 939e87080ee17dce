"""Input checks of the block engine that happen before any network traffic."""

from __future__ import annotations

import threading

import pytest

from go2cloud_client.replication.block import (
    BlockCycle,
    BlockOptions,
    BlockReplicator,
    BlockSourceError,
    BlockTarget,
    Disk,
)
from go2cloud_client.replication.block.chunkmap import ChunkMap

TARGET = BlockTarget("https://127.0.0.1:9/block/v1/tasks/t-1", "secret-token", "sha256:" + "ab" * 32)


def rep(tmp_path, path, **kw):
    return BlockReplicator(target=TARGET, disks=[Disk("d0", str(path))], options=BlockOptions(**kw),
                           state_dir=tmp_path / "state")


def test_token_is_not_in_repr():
    assert "secret-token" not in repr(TARGET)


@pytest.mark.parametrize("kw", [{"compression": 11}, {"chunk_size": 1000}, {"chunk_size": 8 << 20},
                                {"bandwidth_mbps": -1}, {"workers": -1}])
def test_bad_options(tmp_path, kw):
    with pytest.raises(ValueError):
        rep(tmp_path, tmp_path / "x", **kw)


@pytest.mark.parametrize("name", ["", "../x", "a/b", "..", "x" * 65, "sda 1"])
def test_bad_disk_names(tmp_path, name):
    with pytest.raises(ValueError):
        BlockReplicator(target=TARGET, disks=[Disk(name, "/dev/null")], options=BlockOptions(),
                        state_dir=tmp_path)


def test_bad_target_urls(tmp_path):
    for url in ("http://10.0.0.1:1/block/v1/tasks/t", "https://h:1/other/t", "ftp://h/block/v1/tasks/t"):
        with pytest.raises(ValueError):
            BlockReplicator(target=BlockTarget(url, "t", ""), disks=[Disk("d", "/dev/null")],
                            options=BlockOptions(), state_dir=tmp_path)


def test_unknown_device(tmp_path):
    with pytest.raises(BlockSourceError, match="does not exist: check the disk path"):
        rep(tmp_path, tmp_path / "nope").run_cycle(BlockCycle(1, False), threading.Event())


def test_not_a_device(tmp_path):
    with pytest.raises(BlockSourceError, match="neither a block device nor an image file"):
        rep(tmp_path, tmp_path).run_cycle(BlockCycle(1, False), threading.Event())
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    with pytest.raises(BlockSourceError, match="is empty"):
        rep(tmp_path, empty).run_cycle(BlockCycle(1, False), threading.Event())


def test_device_smaller_than_manifest_fails_before_sending(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"x" * (1 << 20))
    r = rep(tmp_path, img)
    r.state_dir.mkdir()
    ChunkMap(4, 1 << 20, 4 << 20, bytes(64)).save(r.manifest_path("d0"))
    with pytest.raises(BlockSourceError, match="smaller than the 4194304 bytes replicated in cycle 4"):
        r.run_cycle(BlockCycle(5, True), threading.Event())  # the network fence proves nothing was sent
