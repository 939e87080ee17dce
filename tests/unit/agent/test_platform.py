from __future__ import annotations

from go2cloud_client.platform import distros
from go2cloud_client.platform.linux import block_devices, parse_os_release


def test_parse_os_release_quotes():
    rel = parse_os_release('ID=debian\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n# c\nID_LIKE=\'x y\'\n')
    assert rel == {"ID": "debian", "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)", "ID_LIKE": "x y"}


def test_distro_lookup_by_id_and_id_like():
    assert isinstance(distros.distro_for({"ID": "ubuntu"}), distros.Debian)
    assert distros.distro_for({"ID": "rocky", "VERSION_ID": "9.3"}).install_command(["rsync"]) == [
        "dnf", "-y", "install", "rsync"]
    assert distros.distro_for({"ID": "centos", "VERSION_ID": "7"}).install[0] == "yum"
    assert isinstance(distros.distro_for({"ID": "weird", "ID_LIKE": "rhel fedora", "VERSION_ID": "8"}),
                      distros.RHEL)
    assert distros.distro_for({"ID": "opensuse-leap"}).install_command(["rsync"])[:2] == [
        "zypper", "--non-interactive"]
    assert distros.distro_for({"ID": "alpine"}).install_command(["rsync"]) == ["apk", "add", "rsync"]
    assert distros.distro_for({"ID": "plan9"}) is None


def test_block_devices_from_sys(tmp_path):
    vda = tmp_path / "vda"
    (vda / "vda1").mkdir(parents=True)
    (vda / "size").write_text("2048\n")
    (vda / "vda1" / "size").write_text("1024\n")
    (vda / "vda1" / "partition").write_text("1\n")
    (tmp_path / "ram0").mkdir()
    (tmp_path / "ram0" / "size").write_text("10\n")
    assert block_devices(tmp_path, tmp_path / "no-udev") == [
        {"name": "vda", "size_bytes": 1048576, "partitions": [{"name": "vda1", "size_bytes": 524288}]}]


def test_block_devices_carry_the_layout_udev_knows(tmp_path):
    """What rebuilding a bootable disk on the target needs (issue 14): partition numbers and
    starts, the table type, filesystem types, UUIDs and labels, from /sys and udev's database
    (values as a Debian 12 VM's udev wrote them)."""
    sys_block, udev = tmp_path / "sys", tmp_path / "udev"
    vda = sys_block / "vda"
    (vda / "vda1").mkdir(parents=True)
    udev.mkdir()
    (vda / "size").write_text("6291456\n")
    (vda / "dev").write_text("254:0\n")
    (vda / "vda1" / "size").write_text("6289408\n")
    (vda / "vda1" / "start").write_text("2048\n")
    (vda / "vda1" / "partition").write_text("1\n")
    (vda / "vda1" / "dev").write_text("254:1\n")
    (udev / "b254:0").write_text("S:disk/by-path/pci-0000:00:04.0\nE:ID_PART_TABLE_TYPE=dos\n"
                                 "E:ID_PART_TABLE_UUID=5d1c2b7a\nI:123\n")
    (udev / "b254:1").write_text("E:ID_FS_TYPE=ext4\nE:ID_FS_UUID=0f0c9f1e-52c4-4d6e-9c57-1c1d3f2a9b10\n"
                                 "E:ID_FS_LABEL=g2c-root\nE:ID_PART_ENTRY_TYPE=0x83\n"
                                 "E:ID_PART_ENTRY_UUID=5d1c2b7a-01\nE:ID_FS_USAGE=filesystem\n")
    assert block_devices(sys_block, udev) == [{
        "name": "vda", "size_bytes": 3221225472, "table": "dos", "table_uuid": "5d1c2b7a",
        "partitions": [{"name": "vda1", "size_bytes": 3220176896, "number": 1, "start_bytes": 1048576,
                        "fs_type": "ext4", "fs_uuid": "0f0c9f1e-52c4-4d6e-9c57-1c1d3f2a9b10",
                        "fs_label": "g2c-root", "part_type": "0x83", "part_uuid": "5d1c2b7a-01"}]}]
