"""The host change journal: record, describe, revert newest first, keep what failed so a re-run
finishes the job."""

from __future__ import annotations

import pytest

from go2cloud_client import subp
from go2cloud_client.errors import HostRevertError
from go2cloud_client.host import changes as hostchanges
from go2cloud_client.host.changes import HostChangeJournal, revert_all
from go2cloud_client.platform import linux


def test_record_list_forget(home):
    journal = HostChangeJournal(home)
    a = journal.record(
        "package_installed", package="rsync", manager="apt-get", undo=["apt-get", "-y", "remove", "rsync"]
    )
    b = journal.record("selinux_mode", previous_runtime="enforcing", previous_config="enforcing",
                      config_path="/etc/selinux/config")
    assert [c["kind"] for c in journal.list()] == ["package_installed", "selinux_mode"]
    assert a["id"] != b["id"] and a["time"].endswith("Z")
    journal.forget(a)
    assert [c["id"] for c in journal.list()] == [b["id"]]
    with pytest.raises(ValueError):
        journal.record("frobnicated")


def test_old_entries_without_id_are_forgotten_by_content(home):
    home.write_state(
        home.host_changes_file,
        {
            "changes": [
                {
                    "time": "t",
                    "kind": "package_installed",
                    "package": "rsync",
                    "manager": "apt-get",
                    "undo": ["apt-get", "-y", "remove", "rsync"],
                }
            ]
        },
    )
    calls = []
    revert_all(home, say=lambda s: None, reverters={"package_installed": lambda c: calls.append(c) or "ok"})
    assert len(calls) == 1 and HostChangeJournal(home).list() == []


def test_revert_runs_newest_first_and_a_failure_can_be_rerun(home):
    journal = HostChangeJournal(home)
    for name in ("one", "two", "three"):
        journal.record(
            "package_installed", package=name, manager="apt-get", undo=["apt-get", "-y", "remove", name]
        )
    order = []
    broken = {"two"}

    def revert(change):
        order.append(change["package"])
        if change["package"] in broken:
            raise subp.ProcessError(["apt-get"], 100, "", "E: dpkg was interrupted")
        return f"removed {change['package']}"

    said = []
    with pytest.raises(HostRevertError) as err:
        revert_all(home, say=said.append, reverters={"package_installed": revert})
    assert order == ["three", "two", "one"]  # newest first, and a failure does not stop the others
    assert err.value.exit_code == 40 and "uninstall --revert" in str(err.value) and "dpkg" in str(err.value)
    assert [c["package"] for c in journal.list()] == ["two"]
    assert any(line.startswith("Could not revert package two") for line in said)
    broken.clear()
    order.clear()
    assert revert_all(home, say=said.append, reverters={"package_installed": revert}) == ["removed two"]
    assert order == ["two"] and journal.list() == []
    assert revert_all(home, say=said.append) == []  # nothing left: idempotent


def test_package_revert_runs_the_recorded_argv_with_its_env(home, monkeypatch):
    calls = []
    monkeypatch.setattr(subp, "run", lambda argv, **kw: calls.append((list(argv), kw.get("env") or {})))
    HostChangeJournal(home).record(
        "snapshot_driver_installed",
        packages=["elastio-snap-dkms", "elastio-snap-utils"],
        manager="apt-get",
        env={"DEBIAN_FRONTEND": "noninteractive"},
        undo=["apt-get", "-y", "remove", "elastio-snap-dkms", "elastio-snap-utils"],
        unload=["modprobe", "-r", "elastio_snap"],
    )
    HostChangeJournal(home).record(
        "package_installed",
        package="rsync",
        manager="apt-get",
        env={"DEBIAN_FRONTEND": "noninteractive"},
        undo=["apt-get", "-y", "remove", "rsync"],
    )
    revert_all(home, say=lambda s: None)
    assert [c[0] for c in calls] == [
        ["apt-get", "-y", "remove", "rsync"],
        ["modprobe", "-r", "elastio_snap"],
        ["apt-get", "-y", "remove", "elastio-snap-dkms", "elastio-snap-utils"],
    ]
    assert calls[0][1]["DEBIAN_FRONTEND"] == "noninteractive"
    assert HostChangeJournal(home).list() == []


def test_a_failed_unload_does_not_stop_the_driver_removal(home, monkeypatch):
    calls = []

    def fake_run(argv, **kw):
        calls.append(argv[0])
        if argv[0] == "modprobe":
            raise subp.ProcessError(argv, 1, "", "modprobe: FATAL: Module elastio_snap is in use.")

    monkeypatch.setattr(subp, "run", fake_run)
    HostChangeJournal(home).record(
        "snapshot_driver_installed",
        packages=["p"],
        manager="apt-get",
        undo=["apt-get", "x"],
        unload=["modprobe", "-r", "elastio_snap"],
    )
    revert_all(home, say=lambda s: None)
    assert calls == ["modprobe", "apt-get"] and HostChangeJournal(home).list() == []


def test_bad_undo_entry_is_kept(home):
    HostChangeJournal(home).record("package_installed", package="x", manager="apt-get", undo="rm -rf /")
    with pytest.raises(HostRevertError):
        revert_all(home, say=lambda s: None)
    assert len(HostChangeJournal(home).list()) == 1


def test_selinux_revert_restores_config_and_runtime(home, tmp_path, monkeypatch):
    config = tmp_path / "selinux-config"
    config.write_text("# comment\nSELINUX=permissive\nSELINUXTYPE=targeted\n")
    monkeypatch.setattr(linux, "SELINUX_CONFIG", config)
    calls = []
    monkeypatch.setattr(subp, "run", lambda argv, **kw: calls.append(list(argv)))
    monkeypatch.setattr("go2cloud_client.platform.selinux_mode", lambda: "permissive")
    HostChangeJournal(home).record(
        "selinux_mode", previous_runtime="enforcing", previous_config="enforcing", config_path=str(config)
    )
    done = revert_all(home, say=lambda s: None)
    assert config.read_text() == "# comment\nSELINUX=enforcing\nSELINUXTYPE=targeted\n"
    assert calls == [["setenforce", "1"]]
    assert "SELINUX=enforcing" in done[0] and HostChangeJournal(home).list() == []


def test_describe_every_kind():
    assert "undo: apt-get -y remove rsync" in hostchanges.describe(
        {
            "kind": "package_installed",
            "package": "rsync",
            "manager": "apt-get",
            "undo": ["apt-get", "-y", "remove", "rsync"],
        }
    )
    assert "permissive" in hostchanges.describe({"kind": "selinux_mode", "previous_runtime": "enforcing"})
    assert (
        hostchanges.describe({"kind": "service_installed", "unit": "/u", "wants_link": "/w"})
        == "service installed (/u, /w)"
    )
    assert "newer agent" in hostchanges.describe({"kind": "teleported"})
