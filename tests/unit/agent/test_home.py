from __future__ import annotations

import json
import os
import stat

import pytest

from go2cloud_client import atomicfile
from go2cloud_client.atomicfile import atomic_rename, atomic_write
from go2cloud_client.errors import AlreadyRunningError, ConfigError
from go2cloud_client.home import Home, HomeLock, lock_held, resolve_home


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_ensure_creates_private_layout(home):
    for d in (home.root, home.identity_dir, home.state_dir, home.logs_dir, home.excludes_dir):
        assert d.is_dir()
        assert mode(d) == 0o700
    assert (home.excludes_dir / "rsync_excludes_linux.txt").is_file()


def test_atomic_write_replaces_content_with_mode_0600_and_no_leftovers(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    os.chmod(target, 0o644)
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_atomic_write_failure_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_atomic_rename_moves_the_file_and_syncs_both_directories(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    src, dst = tmp_path / "a" / "key", tmp_path / "b" / "key.previous"
    src.write_bytes(b"secret")
    synced = []
    monkeypatch.setattr(atomicfile, "_fsync_dir", synced.append)
    atomic_rename(src, dst)
    assert dst.read_bytes() == b"secret" and not src.exists()
    assert synced == [dst.parent, src.parent]


def test_state_roundtrip_adds_version(home):
    home.write_state(home.task_file, {"task_id": "t-1"})
    doc = json.loads(home.task_file.read_text())
    assert doc == {"version": 1, "task_id": "t-1"}
    assert home.read_state(home.task_file)["task_id"] == "t-1"
    assert mode(home.task_file) == 0o600


def test_newer_state_version_is_a_clear_config_error(home):
    home.task_file.write_text(json.dumps({"version": 2}))
    with pytest.raises(ConfigError, match="newer go2cloud_client"):
        home.read_state(home.task_file)


def test_corrupt_state_is_config_error(home):
    home.command_journal_file.write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt"):
        home.read_state(home.command_journal_file)


def test_missing_state_is_none(home):
    assert home.read_state(home.source_file) is None


def test_second_agent_on_same_home_is_refused(home):
    with HomeLock(home):
        assert home.read_pid() == os.getpid()
        assert lock_held(home)
        with pytest.raises(AlreadyRunningError) as err:
            HomeLock(home).acquire()
        assert err.value.exit_code == 4
    assert not lock_held(home)
    assert not home.pid_file.exists()


def test_resolve_home_precedence(tmp_path):
    assert resolve_home(str(tmp_path / "a"), {"GO2CLOUD_HOME": str(tmp_path / "b")}) == tmp_path / "a"
    assert resolve_home(None, {"GO2CLOUD_HOME": str(tmp_path / "b")}) == tmp_path / "b"


def test_unwritable_home_is_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot create the agent home"):
        Home(blocker / "home").ensure()


def test_imported_source_needs_a_source_id_and_the_identity_key(tmp_path, home):
    assert Home(tmp_path / "nowhere").imported_source() is None
    assert home.imported_source() is None
    home.write_state(home.source_file, {"source_id": "s-1", "server": "https://cp:8443"})
    assert home.imported_source() is None  # no identity key: the import did not finish
    home.key_file.write_bytes(b"key")
    assert home.imported_source()["source_id"] == "s-1"
    home.write_state(home.source_file, {"server": "https://cp:8443"})
    assert home.imported_source() is None  # no source id
    home.source_file.write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt"):
        home.imported_source()
