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
    assert block_devices(tmp_path) == [
        {"name": "vda", "size_bytes": 1048576, "partitions": [{"name": "vda1", "size_bytes": 524288}]}]
