"""The bootable-disk builder's decisions, without a disk: the layout from the inventory (grown
where the tree needs it), and the boot fixes on a copy of a source's files."""

from __future__ import annotations

from pathlib import Path

import pytest

from go2cloud_server.errors import InvalidInput
from go2cloud_server.imagebuild import (
    MIB,
    DiskPlan,
    PartPlan,
    Report,
    _sfdisk_script,
    ensure_mount_points,
    fix_fstab,
    plan,
    reset_network,
)

UUID_ROOT = "0f0c9f1e-52c4-4d6e-9c57-1c1d3f2a9b10"
UUID_BOOT = "11111111-2222-3333-4444-555555555555"


def inventory(root_size: int = 100 * MIB) -> dict:
    return {
        "boot_mode": "bios",
        "disks": [{"name": "vda", "size_bytes": 400 * MIB, "table": "dos", "partitions": [
            {"name": "vda1", "number": 1, "start_bytes": MIB, "size_bytes": 50 * MIB, "fs_type": "ext4",
             "fs_uuid": UUID_BOOT, "fs_label": "boot", "part_type": "0x83"},
            {"name": "vda2", "number": 2, "start_bytes": 51 * MIB, "size_bytes": root_size, "fs_type": "ext4",
             "fs_uuid": UUID_ROOT, "fs_label": "root", "part_type": "0x83"},
            {"name": "vda3", "number": 3, "start_bytes": 51 * MIB + root_size, "size_bytes": 20 * MIB,
             "fs_type": "swap", "fs_uuid": "33333333-0000-0000-0000-000000000000", "part_type": "0x82"},
            {"name": "vda5", "number": 5, "start_bytes": 300 * MIB, "size_bytes": 20 * MIB, "fs_type": "ext4",
             "fs_uuid": "44444444-0000-0000-0000-000000000000"}]}],
        "mounts": [{"mountpoint": "/", "device": "/dev/vda2", "fstype": "ext4"},
                   {"mountpoint": "/boot", "device": "/dev/vda1", "fstype": "ext4"}],
    }


def test_the_layout_keeps_the_sources_partitions_and_grows_one_too_small_for_its_data(tmp_path: Path):
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / "vmlinuz").write_bytes(b"k" * 4096)
    (tmp_path / "big").write_bytes(b"\1" * (7 * MIB))
    small = plan(inventory(root_size=8 * MIB), tmp_path)
    assert small.table == "dos" and small.name == "vda"
    # the unmounted, non-swap vda5 holds nothing of the tree: left out
    assert [(p.number, p.mountpoint, p.fs_type) for p in small.parts] == [
        (1, "/boot", "ext4"), (2, "/", "ext4"), (3, None, "swap")]
    assert small.parts[0].grown_from is None and small.parts[0].size_bytes == 50 * MIB  # 4 KiB of data
    root = small.parts[1]
    assert root.grown_from == 8 * MIB and root.size_bytes >= 7 * MIB + 64 * MIB
    assert root.fs_uuid == UUID_ROOT and root.fs_label == "root"
    # the swap after it moved by as much as the root grew; the disk grew with it
    assert small.parts[2].start_bytes == 51 * MIB + root.size_bytes
    assert small.size_bytes >= 400 * MIB + root.size_bytes - 8 * MIB
    roomy = plan(inventory(root_size=200 * MIB), tmp_path)
    assert roomy.parts[1].grown_from is None and roomy.parts[1].size_bytes == 200 * MIB


def test_the_layout_refuses_what_it_cannot_rebuild(tmp_path: Path):
    inv = inventory()
    del inv["disks"][0]["table"]
    with pytest.raises(InvalidInput, match="no partition table"):
        plan(inv, tmp_path)
    with pytest.raises(InvalidInput, match="no mount for '/'"):
        plan({"disks": [], "mounts": []}, tmp_path)
    inv = inventory()
    inv["mounts"][0]["device"] = "/dev/mapper/vg-root"
    with pytest.raises(InvalidInput, match="logical volume"):
        plan(inv, tmp_path)


def test_sfdisk_script_numbers_starts_types_and_the_boot_flag():
    p = DiskPlan("vda", "dos", 400 * MIB, "bios", [
        PartPlan(1, MIB, 50 * MIB, "ext4", None, None, "0x83", "/boot"),
        PartPlan(3, 60 * MIB, 20 * MIB, "swap", None, None, None, None)])
    assert _sfdisk_script(p, 1) == ("label: dos\n1 : start=2048, size=102400, type=83, bootable\n"
                                    "3 : start=122880, size=40960, type=82\n")


def test_fstab_entries_by_kernel_name_or_id_become_uuids(tmp_path: Path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "fstab").write_text(
        "# a comment /dev/vda2 / ext4\n/dev/vda2 / ext4 defaults 0 1\n"
        "/dev/disk/by-id/virtio-abc-part1 /boot ext4 defaults 0 2\n"
        f"UUID={UUID_ROOT} /srv ext4 defaults 0 2\n/dev/vda3 none swap sw 0 0\n")
    p = plan(inventory(), tmp_path)
    report = Report()
    fix_fstab(tmp_path, p, report)
    assert (etc / "fstab").read_text() == (
        "# a comment /dev/vda2 / ext4\n"
        f"UUID={UUID_ROOT} / ext4 defaults 0 1\nUUID={UUID_BOOT} /boot ext4 defaults 0 2\n"
        f"UUID={UUID_ROOT} /srv ext4 defaults 0 2\n"
        "UUID=33333333-0000-0000-0000-000000000000 none swap sw 0 0\n")
    assert [c["detail"].split(" ->")[0] for c in report.changes] == [
        "/dev/vda2", "/dev/disk/by-id/virtio-abc-part1", "/dev/vda3"]


def test_network_is_reset_to_dhcp_and_old_nic_names_removed(tmp_path: Path):
    net = tmp_path / "etc/network"
    net.mkdir(parents=True)
    old = ("auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet static\n    address 10.77.0.2/24\n"
           "    gateway 10.77.0.1\n")
    (net / "interfaces").write_text(old)
    rules = tmp_path / "etc/udev/rules.d/70-persistent-net.rules"
    rules.parent.mkdir(parents=True)
    rules.write_text('SUBSYSTEM=="net", ATTR{address}=="52:54:00:77:00:02", NAME="eth0"\n')
    report = Report()
    reset_network(tmp_path, report)
    new = (net / "interfaces").read_text()
    assert "iface eth0 inet dhcp" in new and "10.77.0.2" not in new
    assert (net / "interfaces.go2cloud-orig").read_text() == old
    assert not rules.exists()
    assert {c["kind"] for c in report.changes} == {"network", "machine state"}
    again = Report()
    reset_network(tmp_path, again)  # DHCP already: nothing to change
    assert again.changes == []


def test_missing_boot_time_mount_points_are_made(tmp_path: Path):
    (tmp_path / "proc").mkdir()
    report = Report()
    ensure_mount_points(tmp_path, report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev", "proc", "run", "sys", "tmp"]
    assert (tmp_path / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert [c["path"] for c in report.changes] == ["/dev", "/sys", "/run", "/tmp"]  # /proc was there
