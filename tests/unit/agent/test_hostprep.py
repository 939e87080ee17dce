"""Host preparation decisions: --yes, --no-prompt and answers on a terminal, for the snapshot
driver, rsync and SELinux; the inventory capability sent with the import. Package managers,
probes and SELinux tools are faked at the function boundary (no process runs)."""

from __future__ import annotations

import json

import pytest
import responses
from click.testing import CliRunner

from go2cloud_client import cli as cli_mod
from go2cloud_client import subp
from go2cloud_client.config import Config
from go2cloud_client.console import Console
from go2cloud_client.errors import RsyncMissingError
from go2cloud_client.host import prep as hostprep
from go2cloud_client.host.changes import HostChangeJournal
from go2cloud_client.host.prep import Asker, HostPrep
from go2cloud_client.platform import distros, linux

DEBIAN = distros.Debian({"ID": "debian", "VERSION_ID": "12"})


pytestmark = pytest.mark.usefixtures("reset_logging")


class Host:
    """The faked host: package manager calls, probe answers, SELinux state, rsync presence."""

    def __init__(self, monkeypatch, tmp_path):
        self.calls = []
        self.queries = []
        self.preinstalled = set()
        self.fail = set()
        self.driver_usable_after_install = True
        self.installed = set()
        self.rsync = "/usr/bin/rsync"
        self.selinux = None
        self.config = tmp_path / "selinux-config"
        monkeypatch.setattr(subp, "run", self.run)
        monkeypatch.setattr("go2cloud_client.platform.distro", lambda: DEBIAN)
        monkeypatch.setattr("go2cloud_client.platform.root_block_device", lambda: "/dev/vda1")
        monkeypatch.setattr("go2cloud_client.platform.kernel", lambda: "6.1.0-test")
        monkeypatch.setattr("go2cloud_client.platform.selinux_mode", lambda: self.selinux)
        monkeypatch.setattr(linux, "SELINUX_CONFIG", self.config)
        monkeypatch.setattr("go2cloud_client.replication.rsync.find_rsync", lambda: self.rsync)
        monkeypatch.setattr(hostprep.psutil, "disk_partitions", lambda all=False: [])  # root only

    def run(self, argv, **kw):
        argv = list(argv)
        if argv[0] == "dpkg-query":
            self.queries.append(argv[-1])
            if argv[-1] in self.preinstalled:
                return subp.Result(argv, 0, "install ok installed", "")
            return subp.Result(argv, 1, "", f"dpkg-query: no packages found matching {argv[-1]}")
        self.calls.append(argv)
        if argv[0] in self.fail:
            raise subp.ProcessError(argv, 100, "", "E: Unable to locate package elastio-snap-dkms")
        if argv[:3] == ["apt-get", "-y", "install"]:
            self.installed.update(argv[3:])
            if "rsync" in argv:
                self.rsync = "/usr/bin/rsync"
        if argv[0] == "setenforce":
            self.selinux = "permissive" if argv[1] == "0" else "enforcing"
        return subp.Result(argv, 0, "", "")

    def probe(self, volume):
        assert volume == "/dev/vda1"
        usable = ["fsfreeze", "live"]
        if "elastio-snap-dkms" in self.installed | self.preinstalled and self.driver_usable_after_install:
            usable.insert(0, "elastio-snap")
        return usable, {"elastio-snap": "elastio-snap: elioctl is not installed"}


@pytest.fixture
def host(monkeypatch, tmp_path):
    return Host(monkeypatch, tmp_path)


def prep(home, host, *, yes=False, no_prompt=False, answers=None, config=None):
    lines = []
    console = Console()
    console.line = lines.append  # type: ignore[method-assign]
    questions = []

    def confirm(question, default=True):
        questions.append(question)
        return answers.pop(0)

    asker = Asker(
        yes=yes, no_prompt=no_prompt, confirm=confirm, prompt_ok=lambda np: answers is not None and not np
    )
    p = HostPrep(
        home, config or Config(), console, yes=yes, no_prompt=no_prompt, asker=asker, probe=host.probe
    )
    return p, lines, questions


# -- snapshot driver --------------------------------------------------------------------------


def test_consistent_backend_usable_no_question(home, host):
    host.installed.add("elastio-snap-dkms")
    p, lines, questions = prep(home, host, answers=[])
    assert p.snapshot_driver() == {
        "block": {"available": True, "reason": None, "backends": ["elastio-snap", "fsfreeze", "live"],
                  "driver": {"name": "elastio-snap", "installed": True,
                             "reason": "not needed: elastio-snap usable"},
                  "volumes": {"/dev/vda1": {"usable": ["elastio-snap", "fsfreeze", "live"],
                                            "point_in_time": ["elastio-snap"]}},
                  "point_in_time": True}
    }
    assert questions == [] and host.calls == [] and lines == []


def test_no_prompt_skips_the_driver_with_a_warning_naming_yes(home, host):
    p, lines, _ = prep(home, host, no_prompt=True)
    cap = p.snapshot_driver()["block"]
    assert cap["available"] is True and cap["driver"]["installed"] is False
    assert "--no-prompt" in cap["driver"]["reason"] and cap["backends"] == ["fsfreeze", "live"]
    assert cap["volumes"] == {"/dev/vda1": {"usable": ["fsfreeze", "live"], "point_in_time": []}}
    assert cap["point_in_time"] is False
    assert host.calls == [] and HostChangeJournal(home).list() == []
    assert any(
        line.startswith("Warning: snapshot driver not installed") and "--yes" in line for line in lines
    )
    assert any(line.startswith("Snapshot driver not installed: the import ran with --no-prompt")
               and "Block replication stays available" in line for line in lines)


def test_operator_says_no_on_the_terminal(home, host):
    p, lines, questions = prep(home, host, answers=[False])
    cap = p.snapshot_driver()["block"]
    assert cap["available"] is True and cap["driver"] == {
        "name": "elastio-snap", "installed": False, "reason": "the operator chose not to install it"}
    assert (
        "apt-get -y install linux-headers-6.1.0-test elastio-snap-dkms elastio-snap-utils" in questions[0]
        and host.calls == []
    )


def test_yes_installs_the_driver_and_records_the_undo(home, host):
    p, lines, _ = prep(home, host, yes=True)
    cap = p.snapshot_driver()["block"]
    assert cap["available"] is True and cap["backends"][0] == "elastio-snap"
    assert cap["driver"]["installed"] is True and cap["point_in_time"] is True
    assert host.calls == [
        ["apt-get", "-y", "install", "linux-headers-6.1.0-test", "elastio-snap-dkms", "elastio-snap-utils"]
    ]
    (change,) = HostChangeJournal(home).list()
    assert change["kind"] == "snapshot_driver_installed"
    assert change["undo"] == [
        "apt-get",
        "-y",
        "remove",
        "linux-headers-6.1.0-test",
        "elastio-snap-dkms",
        "elastio-snap-utils",
    ]
    assert change["unload"] == ["modprobe", "-r", "elastio_snap"]
    assert "Installed the snapshot driver (elastio-snap)" in lines


def test_only_missing_packages_are_installed_and_undone(home, host):
    host.preinstalled.update({"linux-headers-6.1.0-test", "elastio-snap-utils"})
    p, _, _ = prep(home, host, yes=True)
    assert p.snapshot_driver()["block"]["available"] is True
    assert host.calls == [["apt-get", "-y", "install", "elastio-snap-dkms"]]
    (change,) = HostChangeJournal(home).list()
    assert change["undo"] == ["apt-get", "-y", "remove", "elastio-snap-dkms"], (
        "never remove what was there before"
    )


def test_packages_present_but_driver_unusable_installs_nothing(home, host):
    host.preinstalled.update({"linux-headers-6.1.0-test", "elastio-snap-dkms", "elastio-snap-utils"})
    host.driver_usable_after_install = False
    p, _, questions = prep(home, host, yes=True)
    cap = p.snapshot_driver()["block"]
    assert cap["available"] is True and cap["driver"]["installed"] is False
    assert "packages are installed but the driver is not usable" in cap["driver"]["reason"]
    assert host.calls == [] and questions == [] and HostChangeJournal(home).list() == []


def test_install_failure_is_reported_not_fatal(home, host):
    host.fail.add("apt-get")
    p, lines, _ = prep(home, host, yes=True)
    cap = p.snapshot_driver()["block"]
    assert cap["available"] is True and cap["driver"]["installed"] is False
    reason = cap["driver"]["reason"]
    assert "installing it failed" in reason and "Unable to locate package" in reason
    assert "repository" in reason and HostChangeJournal(home).list() == []
    assert cap["volumes"]["/dev/vda1"]["usable"] == ["fsfreeze", "live"]


def test_installed_but_not_usable_tries_modprobe_and_says_why(home, host):
    host.driver_usable_after_install = False
    p, _, _ = prep(home, host, yes=True)
    cap = p.snapshot_driver()["block"]
    assert cap["available"] is True and "installed but the driver is not usable" in cap["driver"]["reason"]
    assert ["modprobe", "elastio_snap"] in host.calls
    assert [c["kind"] for c in HostChangeJournal(home).list()] == ["snapshot_driver_installed"]


def test_distro_without_driver_packages(home, host, monkeypatch):
    monkeypatch.setattr("go2cloud_client.platform.distro", lambda: distros.SUSE({"ID": "sles"}))
    p, _, questions = prep(home, host, yes=True)
    cap = p.snapshot_driver()["block"]
    assert cap["available"] is True and "suse" in cap["driver"]["reason"]
    assert host.calls == [] and questions == []


def test_skip_config_neither_checks_nor_installs(home, host):
    p, _, _ = prep(home, host, yes=True, config=Config(snapshot_driver="skip"))
    cap = p.snapshot_driver()["block"]
    assert cap["available"] is True and cap["driver"]["reason"] == "not checked (snapshot_driver: skip)"
    assert cap["volumes"] == {} and cap["backends"] == []
    assert host.calls == [] and host.queries == []


def test_driver_packages_are_data_on_the_distro_classes():
    assert DEBIAN.driver_packages() == ["elastio-snap-dkms", "elastio-snap-utils"]
    assert DEBIAN.driver_packages("6.1.0-18-amd64")[0] == "linux-headers-6.1.0-18-amd64"
    assert DEBIAN.installed_command("rsync") == ["dpkg-query", "-W", "-f=${Status}", "rsync"]
    rhel = distros.distro_for({"ID": "rocky", "VERSION_ID": "9.3"})
    assert rhel is not None and rhel.driver_packages() == ["dkms-elastio-snap", "elastio-snap-utils"]
    assert rhel.driver_packages("5.14.0-362.el9.x86_64")[0] == "kernel-devel-5.14.0-362.el9.x86_64"
    assert rhel.installed_command("rsync") == ["rpm", "-q", "rsync"]
    assert rhel.install_command(rhel.driver_packages())[:3] == ["dnf", "-y", "install"]
    legacy = distros.distro_for({"ID": "centos", "VERSION_ID": "7"})
    assert legacy is not None and legacy.install_command(["x"])[0] == "yum"
    assert distros.distro_for({"ID": "alpine"}).driver_packages() == []  # type: ignore[union-attr]


# -- rsync ------------------------------------------------------------------------------------


def test_rsync_missing_no_prompt_is_the_required_error(home, host):
    host.rsync = None
    p, _, _ = prep(home, host, no_prompt=True)
    with pytest.raises(RsyncMissingError) as err:
        p.rsync()
    assert (
        err.value.exit_code == 30
        and "--yes" in str(err.value)
        and "apt-get -y install rsync" in str(err.value)
    )


def test_rsync_refused_on_terminal(home, host):
    host.rsync = None
    p, _, questions = prep(home, host, answers=[False])
    with pytest.raises(RsyncMissingError):
        p.rsync()
    assert "rsync is not installed" in questions[0] and host.calls == []


def test_rsync_installed_with_yes(home, host):
    host.rsync = None
    p, _, _ = prep(home, host, yes=True)
    assert p.rsync() == "/usr/bin/rsync"
    (change,) = HostChangeJournal(home).list()
    assert change["kind"] == "package_installed" and change["undo"] == ["apt-get", "-y", "remove", "rsync"]
    assert change["env"] == {"DEBIAN_FRONTEND": "noninteractive"}


# -- SELinux ----------------------------------------------------------------------------------


def test_selinux_not_enforcing_nothing_asked(home, host):
    for mode in (None, "permissive", "disabled"):
        host.selinux = mode
        p, _, questions = prep(home, host, answers=[])
        p.selinux()
        assert questions == [] and host.calls == []


def test_selinux_yes_sets_permissive_and_records_previous(home, host):
    host.selinux = "enforcing"
    host.config.write_text("SELINUX=enforcing\nSELINUXTYPE=targeted\n")
    p, lines, _ = prep(home, host, yes=True)
    p.selinux()
    assert host.calls == [["setenforce", "0"]] and host.selinux == "permissive"
    assert host.config.read_text() == "SELINUX=permissive\nSELINUXTYPE=targeted\n"
    (change,) = HostChangeJournal(home).list()
    assert change == {
        **change,
        "kind": "selinux_mode",
        "previous_runtime": "enforcing",
        "previous_config": "enforcing",
        "config_path": str(host.config),
    }
    assert any("uninstall --revert" in line for line in lines)


def test_selinux_question_explains_permissive(home, host):
    host.selinux = "enforcing"
    host.config.write_text("SELINUX=enforcing\n")
    p, lines, questions = prep(home, host, answers=[False])
    p.selinux()
    assert "relabel" in questions[0] and "permissive" in questions[0]
    assert (
        host.calls == []
        and host.config.read_text() == "SELINUX=enforcing\n"
        and "SELinux left enforcing" in lines
    )


def test_selinux_no_prompt_warns_and_leaves_it(home, host):
    host.selinux = "enforcing"
    host.config.write_text("SELINUX=enforcing\n")
    p, lines, _ = prep(home, host, no_prompt=True)
    p.selinux()
    assert host.calls == [] and HostChangeJournal(home).list() == []
    assert any(line.startswith("Warning: SELinux is enforcing") and "--yes" in line for line in lines)


# -- the whole import through the CLI: order of the questions, capability in the inventory -------


@responses.activate
def test_import_asks_in_the_seed_order_and_sends_the_capability(tmp_path, host, monkeypatch):
    host.rsync = None
    host.selinux = "enforcing"
    host.config.write_text("SELINUX=enforcing\n")
    monkeypatch.setenv("GO2CLOUD_SNAPSHOT_DRIVER", "ask")
    monkeypatch.setattr(hostprep, "probe_backends", host.probe)
    monkeypatch.setattr(hostprep, "can_prompt", lambda no_prompt: not no_prompt)
    responses.add(
        responses.POST,
        "https://cp.example/api/v1/sources/import",
        status=200,
        json={
            "source_id": "s-0123456789abcdef",
            "workgroup": {"id": "wg-1", "name": "web"},
            "heartbeat_interval": 10,
        },
    )
    home = tmp_path / "h"
    result = CliRunner().invoke(
        cli_mod.cli,
        [
            "--home",
            str(home),
            "--server",
            "https://cp.example",
            "--token-id",
            "at-1",
            "--import-only",
        ],
        input="n\ny\ny\n",
        env={"GO2CLOUD_TOKEN_CODE": "c"},
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert (
        out.index("snapshot driver") < out.index("rsync is not installed") < out.index("SELinux is enforcing")
    )
    assert "Snapshot driver not installed: the operator chose not to install it" in out
    assert "Import Source Server [s-0123456789abcdef] Successfully!" in out
    body = json.loads(responses.calls[0].request.body)
    block = body["inventory"]["capabilities"]["block"]
    assert block["available"] is True and block["driver"]["installed"] is False
    assert block["volumes"] == {"/dev/vda1": {"usable": ["fsfreeze", "live"], "point_in_time": []}}
    assert [c["kind"] for c in HostChangeJournal(cli_mod.Home(home)).list()] == [
        "package_installed",
        "selinux_mode",
    ]
    source = json.loads((home / "state" / "source.json").read_text())
    assert source["capabilities"]["block"]["driver"]["reason"] == "the operator chose not to install it"
    # --import-only again: already imported, nothing asked, no second import
    again = CliRunner().invoke(cli_mod.cli, ["--home", str(home), "--import-only", "--token-id", "at-2"])
    assert again.exit_code == 0
    assert again.output.startswith("Already imported as source s-0123456789abcdef (workgroup web)")
    assert len(responses.calls) == 1
