"""A bootable disk built from a real Debian root file system (issue 14): the live-VM tests' image
(tests/support/vm.py) mounted read-only stands for a file-level image of a source. The built disk
must hold the same files (full manifest: types, modes, owners, sizes, hashes, xattrs, ACLs,
hard links), the source's file system UUID and label, the partition layout, extlinux and the MBR
boot code; the conversion report lists each change. tests/vm boots the result under qemu."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from go2cloud_server.imagebuild import MBR_CODE, MIB, build, plan, write_report
from go2cloud_server.manifest import build as manifest
from go2cloud_server.manifest import diff
from tests.support import vm

pytestmark = [pytest.mark.integration, pytest.mark.root]

#: what the conversion changes on purpose (each listed in the report; the directories because
#: files were written in them)
CHANGED = {b"etc/network", b"etc/network/interfaces", b"etc/network/interfaces.go2cloud-orig",
           b"boot/extlinux", b"boot/extlinux/ldlinux.sys", b"boot/extlinux/ldlinux.c32"}


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def source_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The VM image's root file system, mounted read-only: a Debian 12 system as a cycle's tree."""
    why = vm.available()
    if why:
        pytest.fail(f"needs the VM image tools: {why}")
    image = vm.ensure_image()
    meta = json.loads((image / "meta.json").read_text())
    mnt = tmp_path_factory.mktemp("source-root")
    loop = _run("losetup", "--find", "--show", "--read-only", "--offset", str(meta["part_start_mib"] * MIB),
                str(image / "disk.img")).strip()
    try:
        _run("mount", "-o", "ro", loop, str(mnt))
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def vm_inventory(image: Path) -> dict:
    """What the VM's agent reports (tests/vm's import sends this shape; see go2cloud_client.inventory)."""
    meta = json.loads((image / "meta.json").read_text())
    size = (image / "disk.img").stat().st_size
    start = meta["part_start_mib"] * MIB
    return {"boot_mode": "bios",
            "disks": [{"name": "vda", "size_bytes": size, "table": "dos", "partitions": [
                {"name": "vda1", "number": 1, "start_bytes": start, "size_bytes": size - start,
                 "fs_type": "ext4", "fs_uuid": meta["root_uuid"], "fs_label": vm.ROOT_LABEL,
                 "part_type": "0x83"}]}],
            "mounts": [{"mountpoint": "/", "device": "/dev/vda1", "fstype": "ext4"}]}


def _exclude(rel: bytes, is_dir: bool) -> bool:
    return rel in CHANGED or rel.startswith(b"lost+found")


def test_a_bootable_disk_from_a_debian_tree(source_root: Path, tmp_path: Path) -> None:
    image = vm.image_dir()
    out = tmp_path / "built.img"
    layout = plan(vm_inventory(image), source_root)
    report = build(source_root, layout, out)
    files = write_report(report, out)

    # the layout: the source's table, partition, boot flag and MBR boot code
    table = json.loads(_run("sfdisk", "--json", str(out)))["partitiontable"]
    assert table["label"] == "dos"
    (part,) = table["partitions"]
    assert part["start"] == MIB // 512 and part.get("bootable") is True and part["type"] == "83"
    with open(out, "rb") as f, open(MBR_CODE["dos"], "rb") as code:
        assert f.read(440) == code.read(440)

    # the file system: the source's type, UUID and label (its fstab names the UUID)
    meta = json.loads((image / "meta.json").read_text())
    loop = _run("losetup", "--find", "--show", "--read-only", "--offset", str(MIB), str(out)).strip()
    mnt = tmp_path / "built"
    mnt.mkdir()
    try:
        probe = _run("blkid", "-p", "-o", "export", loop)
        assert f"UUID={meta['root_uuid']}" in probe and f"LABEL={vm.ROOT_LABEL}" in probe
        assert "TYPE=ext4" in probe
        _run("mount", "-o", "ro", loop, str(mnt))
        try:
            assert diff(manifest(source_root, exclude=_exclude), manifest(mnt, exclude=_exclude)) == []
            assert "iface eth0 inet dhcp" in (mnt / "etc/network/interfaces").read_text()
            assert (mnt / "etc/network/interfaces.go2cloud-orig").read_text() == \
                (source_root / "etc/network/interfaces").read_text()
            assert (mnt / "boot/extlinux/ldlinux.sys").is_file()
            assert (mnt / "boot/extlinux/extlinux.conf").read_bytes() == \
                (source_root / "boot/extlinux/extlinux.conf").read_bytes()
        finally:
            _run("umount", str(mnt))
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)

    # the report lists each change, as JSON and text
    doc = json.loads(files[0].read_text())
    kinds = [c["kind"] for c in doc["changes"]]
    assert kinds.count("boot loader") == 2 and "network" in kinds
    assert doc["disk"]["partitions"][0]["fs_uuid"] == meta["root_uuid"]
    assert "extlinux installed" in files[1].read_text()


def test_the_boot_check_fails_with_the_console_when_nothing_boots(tmp_path: Path) -> None:
    """A disk with nothing to boot: qemu's BIOS finds no boot sector, no login prompt ever comes;
    the check fails after its timeout, says what to look at, and leaves the image unchanged
    (-snapshot)."""
    from go2cloud_server.bootcheck import BootCheckFailed, boot_check

    disk = tmp_path / "blank.img"
    with open(disk, "wb") as f:
        f.truncate(64 * MIB)
    with pytest.raises(BootCheckFailed, match="no login prompt on the serial console within 10 s") as err:
        boot_check(disk, timeout_s=10)
    assert err.value.code == "boot_check_failed" and err.value.exit_code != 0
    assert disk.stat().st_blocks == 0  # not written: the boot ran on a snapshot
