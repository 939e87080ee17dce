"""lvm, elastio-snap, dattobd and vss driven against fake tools on PATH.

These backends cannot run on the CI machine (no device-mapper, no kernel module loading, not
Windows), so their tests stop at the process boundary: the exact argv they run, how they read
the tools' output, how they handle a missing or failing tool, and what probe() tells the
operator.
"""

from __future__ import annotations

import json
import re

import pytest

from snapshot_driver import SnapshotError, get
from snapshot_driver.kernel_cow import parse_info
from snapshot_driver.lvm import parse_lvs
from snapshot_driver.vss import parse_vssadmin_create
from tests.snapshot.fakes import FakeTools

GIB = 1024 ** 3
MIB = 1024 ** 2


@pytest.fixture
def fakes(tmp_path, monkeypatch) -> FakeTools:
    return FakeTools(tmp_path, monkeypatch)


# -- lvm -------------------------------------------------------------------------------------

def lvs_row(lv="root", vg="vg0", size=10 * GIB, attr="-wi-ao----", free=5 * GIB) -> str:
    return f"  {lv}|{vg}|{size}|{attr}|{free}\n"


@pytest.fixture
def lvm(fakes, tmp_path):
    control = tmp_path / "mapper-control"
    control.write_text("")

    def make(lvs_rules=None, lvcreate_rules=None, lvremove_rules=None, **options):
        fakes.add("lvs", lvs_rules if lvs_rules is not None else [
            {"match": ["go2cloud-snap-"], "stdout": lvs_row("go2cloud-snap-x", attr="swi-a-s---")},
            {"match": ["vg0/root"], "stdout": lvs_row()},
        ])
        fakes.add("lvcreate", lvcreate_rules if lvcreate_rules is not None else [
            {"stdout": '  Logical volume "go2cloud-snap" created.\n'}])
        fakes.add("lvremove", lvremove_rules if lvremove_rules is not None else [
            {"stdout": '  Logical volume "go2cloud-snap" successfully removed.\n'}])
        return get("lvm", mapper_control=str(control), **options)
    return make


def test_lvm_create_and_release_run_the_exact_commands(lvm, fakes, tmp_path):
    backend = lvm()
    snap = backend.create("vg0/root", tmp_path / "work")
    assert fakes.calls("lvs")[0] == [
        "lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", "|",
        "-o", "lv_name,vg_name,lv_size,lv_attr,vg_free", "--", "vg0/root"]
    (create,) = fakes.calls("lvcreate")
    assert create[:7] == ["lvcreate", "--snapshot", "--permission", "r", "-L", "2048m", "-n"]
    assert re.fullmatch(r"go2cloud-snap-[0-9a-f]{8}", create[7])
    assert create[8:] == ["--", "vg0/root"]
    assert snap.path() == f"/dev/vg0/{create[7]}"
    assert snap.size == 10 * GIB and snap.token() is None and snap.changed_since("x") is None
    snap.release()
    snap.release()
    assert fakes.calls("lvremove") == [["lvremove", "-f", "--", f"vg0/{create[7]}"]]
    assert not (tmp_path / "work" / "snapshot-lvm.json").exists()     # record emptied


def test_lvm_cow_size_options(lvm, fakes, tmp_path):
    lvm(cow_percent=5).create("vg0/root", tmp_path / "w").release()
    assert fakes.calls("lvcreate")[-1][5] == "512m"
    lvm(cow_size=3 * MIB).create("vg0/root", tmp_path / "w").release()
    assert fakes.calls("lvcreate")[-1][5] == "64m"      # at least 64 MiB


def test_lvm_thin_volume_gets_a_thin_snapshot(lvm, fakes, tmp_path):
    backend = lvm(lvs_rules=[{"stdout": lvs_row(attr="Vwi-aotz--", free=0)}])
    backend.create("vg0/root", tmp_path / "w").release()
    create = fakes.calls("lvcreate")[0]
    assert "-L" not in create and create[4:6] == ["--setactivationskip", "n"]


def test_lvm_release_of_a_vanished_snapshot_is_fine(lvm, fakes, tmp_path):
    backend = lvm(lvremove_rules=[{"rc": 5, "stderr": '  Failed to find logical volume "vg0/x"\n'}])
    snap = backend.create("vg0/root", tmp_path / "w")
    assert (tmp_path / "w" / "snapshot-lvm.json").exists()        # in the ledger while it exists
    snap.release()                                                   # lvremove fails: "not found"
    name = fakes.calls("lvcreate")[0][7]
    assert fakes.calls("lvremove") == [["lvremove", "-f", "--", f"vg0/{name}"]]
    assert not (tmp_path / "w" / "snapshot-lvm.json").exists()    # gone: nothing left to recover
    assert backend.recover(tmp_path / "w") == []
    snap.release()                                                   # and once released, it stays so
    assert len(fakes.calls("lvremove")) == 1


def test_lvm_release_failure_is_retryable_and_recover_retries(lvm, fakes, tmp_path):
    backend = lvm(lvremove_rules=[
        {"once": True, "rc": 5, "stderr": "  Logical volume vg0/x in use.\n"},
        {"stdout": "removed\n"}])
    snap = backend.create("vg0/root", tmp_path / "w")
    with pytest.raises(SnapshotError) as err:
        snap.release()
    assert err.value.code == "release_failed" and err.value.retryable
    assert "in use" in str(err.value)
    released = backend.recover(tmp_path / "w")
    assert len(released) == 1 and released[0].startswith("lvm: removed snapshot vg0/go2cloud-snap-")
    assert backend.recover(tmp_path / "w") == []


def test_lvm_recover_removes_what_a_crashed_run_left(lvm, fakes, tmp_path):
    lvm().create("vg0/root", tmp_path / "w")          # never released: the "crash"
    name = fakes.calls("lvcreate")[0][7]
    assert lvm().recover(tmp_path / "w") == [f"lvm: removed snapshot vg0/{name}"]
    assert fakes.calls("lvremove")[-1] == ["lvremove", "-f", "--", f"vg0/{name}"]


def test_lvm_no_space(lvm, fakes, tmp_path):
    backend = lvm(lvs_rules=[{"stdout": lvs_row(free=100 * MIB)}])
    assert "has 100 MiB free but the snapshot of root needs 2048 MiB" in backend.probe("vg0/root").reason
    with pytest.raises(SnapshotError) as err:
        backend.create("vg0/root", tmp_path / "w")
    assert err.value.code == "no_space" and not err.value.retryable
    assert fakes.calls("lvcreate") == []


def test_lvm_lvcreate_failures(lvm, fakes, tmp_path):
    backend = lvm(lvcreate_rules=[{"rc": 5, "stderr": "  Insufficient free space: 512 extents "
                                                      "needed, but only 10 available\n"}])
    with pytest.raises(SnapshotError) as err:
        backend.create("vg0/root", tmp_path / "w")
    assert err.value.code == "no_space" and not err.value.retryable
    backend = lvm(lvcreate_rules=[{"rc": 5, "stderr": "  device-mapper: reload ioctl failed\n"}],
                  lvremove_rules=[{"rc": 5, "stderr": "  Failed to find logical volume\n"}])
    with pytest.raises(SnapshotError) as err:
        backend.create("vg0/root", tmp_path / "w")
    assert err.value.code == "snapshot_failed" and err.value.retryable
    assert "reload ioctl failed" in str(err.value)
    assert backend.recover(tmp_path / "w") == []       # nothing left in the record


def test_lvm_overflowed_snapshot_is_reported_by_check(lvm, fakes, tmp_path):
    backend = lvm(lvs_rules=[
        {"match": ["go2cloud-snap-"], "stdout": lvs_row("go2cloud-snap-x", attr="swi-I-s---")},
        {"stdout": lvs_row()}])
    snap = backend.create("vg0/root", tmp_path / "w")
    with pytest.raises(SnapshotError) as err:
        snap.check()
    assert err.value.code == "snapshot_expired" and err.value.retryable
    snap.release()


def test_lvm_probe_messages(lvm, fakes, tmp_path):
    assert get("lvm").probe().reason == ("lvm: lvs, lvcreate, lvremove not installed; install the "
                                         "lvm2 package")
    backend = lvm()
    assert backend.probe("vg0/root").usable
    missing = get("lvm", mapper_control=str(tmp_path / "nope")).probe()
    assert not missing.usable
    assert "is missing: device-mapper is not available in this kernel" in missing.reason
    backend = lvm(lvs_rules=[{"rc": 5, "stderr": '  Volume group "sda1" not found\n'}])
    result = backend.probe("/dev/sda1")
    assert not result.usable
    assert result.reason.startswith("lvm: /dev/sda1 is not an LVM logical volume")
    assert 'Volume group "sda1" not found' in result.reason


def test_lvm_parse_lvs():
    rows = parse_lvs("  root|vg0|10737418240|-wi-ao----|5368709120\n\n  bad line\n")
    assert len(rows) == 1 and rows[0].vg == "vg0" and rows[0].size == 10 * GIB and not rows[0].thin


# -- elastio-snap / dattobd ------------------------------------------------------------------

FLAVOURS = {"dattobd": ("dbdctl", "datto"), "elastio-snap": ("elioctl", "elastio-snap")}


def info(*devices) -> str:
    return json.dumps({"version": "0.11.0", "devices": list(devices)}, indent="\t")


def device(minor, block_device, state, seq=1, cow="/.go2cloud.cow"):
    return {"minor": minor, "cow_file": cow, "block_device": block_device, "max_cache": 314572800,
            "fallocate": 0, "seq_id": seq, "uuid": "a" * 32, "version": 1,
            "nr_changed_blocks": 0, "state": state}


@pytest.fixture(params=sorted(FLAVOURS))
def kcow(request, fakes, tmp_path):
    name = request.param
    tool, prefix = FLAVOURS[name]
    volume = tmp_path / "sdb1"
    volume.write_bytes(b"\0" * 1048576)
    mnt = tmp_path / "data"
    mnt.mkdir()
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"36 25 8:17 / {mnt} rw,relatime shared:1 - ext4 {volume} rw\n")
    info_path = tmp_path / "info"
    info_path.write_text(info())

    class K:
        pass

    k = K()
    k.name, k.tool, k.prefix, k.volume, k.mnt, k.info = name, tool, prefix, str(volume), mnt, info_path

    def make(rules=None, **options):
        if rules is None:
            rules = [
                {"match": ["setup-snapshot"], "write": {str(info_path): info(device(0, str(volume), 3))}},
                {"match": ["transition-to-incremental"],
                 "write": {str(info_path): info(device(0, str(volume), 2))}},
                {"match": ["transition-to-snapshot"],
                 "write": {str(info_path): info(device(0, str(volume), 3, seq=2))}},
                {"match": ["destroy"], "write": {str(info_path): info()}},
            ]
        fakes.add(tool, rules)
        return get(name, info_path=str(info_path), dev_dir="/dev", mountinfo=str(mountinfo), **options)
    k.make = make
    return k


def test_kernel_cow_setup_and_destroy(kcow, fakes, tmp_path):
    backend = kcow.make()
    snap = backend.create(kcow.volume, tmp_path / "w")
    cow = f"{kcow.mnt}/.go2cloud-{kcow.name}-1.cow"
    assert fakes.calls() == [[kcow.tool, "setup-snapshot", kcow.volume, cow, "0"]]
    assert snap.path() == f"/dev/{kcow.prefix}0"
    assert snap.size == 1048576
    assert snap.token() is None and snap.changed_since("anything") is None
    snap.release()
    snap.release()
    assert fakes.calls()[1:] == [[kcow.tool, "destroy", "0"]]
    assert backend.recover(tmp_path / "w") == []


def test_kernel_cow_picks_a_free_minor(kcow, fakes, tmp_path):
    kcow.info.write_text(info(device(0, "/dev/other", 3)))
    backend = kcow.make(rules=[{"match": ["setup-snapshot"]}])
    snap = backend.create(kcow.volume, tmp_path / "w")
    assert fakes.calls()[0][-1] == "1" and snap.path() == f"/dev/{kcow.prefix}1"


def test_kernel_cow_tracking_goes_incremental_then_back_to_snapshot(kcow, fakes, tmp_path):
    backend = kcow.make(track=True)
    backend.create(kcow.volume, tmp_path / "w").release()
    snap = backend.create(kcow.volume, tmp_path / "w")
    assert fakes.calls() == [
        [kcow.tool, "setup-snapshot", kcow.volume, f"{kcow.mnt}/.go2cloud-{kcow.name}-1.cow", "0"],
        [kcow.tool, "transition-to-incremental", "0"],
        [kcow.tool, "transition-to-snapshot", f"{kcow.mnt}/.go2cloud-{kcow.name}-0.cow", "0"],
    ]
    snap.release()
    assert backend.recover(tmp_path / "w") == []          # tracking is kept by recover()
    assert backend.purge(tmp_path / "w") == [f"{kcow.name}: destroyed minor 0 ({kcow.volume})"]
    assert fakes.calls()[-1] == [kcow.tool, "destroy", "0"]


def test_kernel_cow_recover_destroys_a_crashed_snapshot(kcow, fakes, tmp_path):
    kcow.make().create(kcow.volume, tmp_path / "w")       # never released
    assert kcow.make().recover(tmp_path / "w") == [f"{kcow.name}: destroyed minor 0 ({kcow.volume})"]


def test_kernel_cow_tool_failure(kcow, fakes, tmp_path):
    backend = kcow.make(rules=[{"rc": 255, "stderr": "error setting up snapshot: Invalid argument\n"}])
    with pytest.raises(SnapshotError) as err:
        backend.create(kcow.volume, tmp_path / "w")
    assert err.value.code == "snapshot_failed" and err.value.retryable
    assert "setup-snapshot failed" in str(err.value) and "Invalid argument" in str(err.value)
    assert backend.recover(tmp_path / "w") == []


def test_kernel_cow_probe_messages(kcow, fakes, tmp_path):
    assert get(kcow.name).probe().reason.startswith(f"{kcow.name}: {kcow.tool} is not installed")
    backend = kcow.make()
    assert backend.probe(kcow.volume).usable
    other = tmp_path / "sdc1"
    other.write_bytes(b"")
    result = backend.probe(str(other))
    assert not result.usable and "is not mounted" in result.reason
    kcow.info.unlink()
    result = backend.probe(kcow.volume)
    assert not result.usable and "kernel module is not loaded" in result.reason
    with pytest.raises(SnapshotError) as err:
        backend.create(kcow.volume, tmp_path / "w")
    assert err.value.code == "snapshot_unsupported" and not err.value.retryable


def test_kernel_cow_parse_info():
    text = info(device(2, "/dev/sda1", 3), {"minor": "bad"})
    assert [d["minor"] for d in parse_info(text)] == [2]
    assert parse_info("not json") == []


# -- vss -------------------------------------------------------------------------------------

GUID = "{8E4F1B6A-0C9D-4A3B-9F7E-2D1C3B4A5E6F}"
DEVICE = r"\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopy7"
VSSADMIN_CREATE = (
    "vssadmin 1.1 - Volume Shadow Copy Service administrative command-line tool\r\n"
    "(C) Copyright 2001-2013 Microsoft Corp.\r\n\r\n"
    "Successfully created shadow copy for 'C:\\'\r\n"
    f"    Shadow Copy ID: {GUID}\r\n"
    f"    Shadow Copy Volume Name: {DEVICE}\r\n")


def ps_created(size=128 * GIB) -> str:
    return json.dumps({"rv": 0, "id": GUID, "device": DEVICE, "size": size}) + "\r\n"


def test_vss_probe_says_not_windows():
    result = get("vss").probe("C:")
    assert not result.usable
    assert result.reason.startswith("vss: Volume Shadow Copy is a Windows service and this host "
                                    "is not Windows")


def test_vss_powershell_create_and_release(fakes, tmp_path):
    fakes.add("powershell", [{"match": ["Invoke-CimMethod"], "stdout": ps_created()},
                             {"match": ["Remove-CimInstance"]}])
    backend = get("vss", windows=True)
    snap = backend.create("c:", tmp_path / "w")
    (create,) = fakes.calls()
    assert create[:6] == ["powershell", "-NoProfile", "-NonInteractive", "-ExecutionPolicy",
                          "Bypass", "-Command"]
    assert "Volume='C:\\'" in create[6] and "Context='ClientAccessible'" in create[6]
    assert "Get-Partition -DriveLetter C" in create[6]
    assert snap.path() == DEVICE and snap.size == 128 * GIB
    snap.release()
    snap.release()
    release = fakes.calls()[1]
    assert release[:6] == create[:6] and f"ID='{GUID}'" in release[6]
    assert release[6].endswith("| Remove-CimInstance")
    assert len(fakes.calls()) == 2


@pytest.mark.parametrize("rv,code,retryable", [(6, "no_space", False), (9, "snapshot_failed", True),
                                               (4, "snapshot_unsupported", False)])
def test_vss_create_errors(fakes, tmp_path, rv, code, retryable):
    fakes.add("powershell", [{"stdout": json.dumps({"rv": rv}) + "\n"}])
    with pytest.raises(SnapshotError) as err:
        get("vss", windows=True).create("C:", tmp_path / "w")
    assert (err.value.code, err.value.retryable) == (code, retryable)
    assert get("vss", windows=True).recover(tmp_path / "w") == []


def test_vss_vssadmin_mode(fakes, tmp_path):
    fakes.add("vssadmin", [{"match": ["create"], "stdout": VSSADMIN_CREATE},
                           {"match": ["delete"], "once": True, "stdout": "Deleted\r\n"},
                           {"match": ["delete"], "rc": 1,
                            "stdout": "No items found that satisfy the query.\r\n"}])
    fakes.add("powershell", [{"match": ["Get-Partition"], "stdout": "53687091200\r\n"}])
    backend = get("vss", tool="vssadmin", windows=True)
    snap = backend.create("D:\\", tmp_path / "w")
    assert fakes.calls("vssadmin") == [["vssadmin", "create", "shadow", "/for=D:"]]
    assert snap.path() == DEVICE and snap.size == 50 * GIB
    snap.release()
    assert fakes.calls("vssadmin")[1] == ["vssadmin", "delete", "shadows", f"/shadow={GUID}", "/quiet"]
    backend.delete(GUID)          # already gone: "No items found" is not an error


def test_vss_recover_deletes_a_crashed_shadow(fakes, tmp_path):
    fakes.add("powershell", [{"match": ["Invoke-CimMethod"], "stdout": ps_created()},
                             {"match": ["Remove-CimInstance"]}])
    get("vss", windows=True).create("C:", tmp_path / "w")   # never released
    done = get("vss", windows=True).recover(tmp_path / "w")
    assert done == [f"vss: deleted shadow copy {GUID} of C:"]


def test_vss_refuses_bad_volumes_without_running_anything(fakes, tmp_path):
    fakes.add("powershell", [{"stdout": ps_created()}])
    for volume in ("C:'; Remove-Item x; '", "/dev/sda1", "CC:"):
        with pytest.raises(SnapshotError) as err:
            get("vss", windows=True).create(volume, tmp_path / "w")
        assert err.value.code == "bad_volume"
    assert fakes.calls() == []


def test_vss_tool_missing(fakes, tmp_path):
    result = get("vss", windows=True).probe("C:")
    assert not result.usable and "powershell was not found on PATH" in result.reason


def test_vss_parse_vssadmin():
    assert parse_vssadmin_create(VSSADMIN_CREATE) == (GUID, DEVICE)
    with pytest.raises(ValueError):
        parse_vssadmin_create("Error: Invalid command.")
