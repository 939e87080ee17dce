"""Service mode without processes: the unit text, the unit files, the sc.exe argument lists
(never run here: no Windows machine), and the decisions of ``service install``/``stop``. The
Windows service host itself is in test_winservice.py."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from go2cloud_client import subp
from go2cloud_client.console import Console
from go2cloud_client.errors import NotImportedError, ServiceError
from go2cloud_client.host import service as servicemode
from go2cloud_client.host.changes import HostChangeJournal
from go2cloud_client.identity import Identity
from go2cloud_client.platform import linux, windows


def _directives(text: str) -> dict:
    out: dict = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_text_has_every_directive_of_the_contract():
    home = Path("/opt/go2cloud_client")
    text = linux.service_unit_text(
        ["/opt/go2cloud_client/go2cloud_client", "--home", str(home), "--no-prompt"], home
    )
    d = _directives(text)
    assert d["Type"] == ["simple"]
    assert d["ExecStart"] == ["/opt/go2cloud_client/go2cloud_client --home /opt/go2cloud_client --no-prompt"]
    assert d["Environment"] == ["GO2CLOUD_HOME=/opt/go2cloud_client"]
    assert d["Restart"] == ["always"] and d["RestartSec"] == ["5"]
    assert d["KillMode"] == ["mixed"] and d["TimeoutStopSec"] == ["60"]
    assert d["After"] == ["network-online.target"] and d["Wants"] == ["network-online.target"]
    assert d["WantedBy"] == ["multi-user.target"]
    assert text.index("[Unit]") < text.index("[Service]") < text.index("[Install]")


def test_unit_quotes_spaces_and_escapes_specifiers():
    home = Path("/srv/my agent/100%")
    text = linux.service_unit_text(["/usr/bin/python3", "-m", "go2cloud_client", "--home", str(home)], home)
    exec_start = _directives(text)["ExecStart"][0]
    assert exec_start == '/usr/bin/python3 -m go2cloud_client --home "/srv/my agent/100%%"'
    # systemd's unquoting then specifier expansion gives back the argument list
    assert [w.replace("%%", "%") for w in shlex.split(exec_start)][-1] == str(home)
    assert _directives(text)["Environment"] == ['"GO2CLOUD_HOME=/srv/my agent/100%%"']


def test_agent_argv_frozen_and_not(monkeypatch):
    home = Path("/opt/g")
    assert servicemode.agent_argv(home) == [
        sys.executable,
        "-m",
        "go2cloud_client",
        "--home",
        "/opt/g",
        "--no-prompt",
    ]
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", "/opt/g/go2cloud_client")
    assert servicemode.agent_argv(home) == ["/opt/g/go2cloud_client", "--home", "/opt/g", "--no-prompt"]


def test_install_without_systemd_writes_unit_and_wants_link(tmp_path, monkeypatch):
    monkeypatch.setenv(linux.SYSTEMD_DIR_ENV, str(tmp_path / "units"))
    monkeypatch.setattr(subp, "run", lambda *a, **k: pytest.fail(f"systemctl must not run: {a}"))
    home = tmp_path / "home"
    result = linux.service_install(["/x/agent", "--home", str(home), "--no-prompt"], home, start=True)
    unit = tmp_path / "units" / "go2cloud_client.service"
    link = tmp_path / "units" / "multi-user.target.wants" / "go2cloud_client.service"
    assert result == {"unit": str(unit), "wants_link": str(link), "managed": False}
    assert link.is_symlink() and link.resolve() == unit
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    assert linux.service_home() == home
    # idempotent: a second install replaces the unit and the link
    linux.service_install(["/x/agent2", "--home", str(home), "--no-prompt"], home, start=True)
    assert "ExecStart=/x/agent2 " in unit.read_text() and link.is_symlink()
    assert sorted(linux.service_uninstall()) == sorted([f"removed {link}", f"removed {unit}"])
    assert not unit.exists() and not link.is_symlink()
    assert linux.service_uninstall() == [] and linux.service_home() is None


def test_install_with_systemd_calls_systemctl(tmp_path, monkeypatch):
    monkeypatch.delenv(linux.SYSTEMD_DIR_ENV, raising=False)
    running = tmp_path / "run-systemd"
    running.mkdir()
    monkeypatch.setattr(linux, "_SYSTEMD_RUNNING", running)
    monkeypatch.setattr(linux, "SYSTEMD_DIR", tmp_path / "etc")
    calls = []
    monkeypatch.setattr(subp, "run", lambda argv, **k: calls.append(list(argv)))
    result = linux.service_install(["/x/agent"], tmp_path / "h", start=True)
    assert result["managed"] is True
    assert calls == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "go2cloud_client.service"],
        ["systemctl", "restart", "go2cloud_client.service"],
    ]
    calls.clear()
    linux.service_install(["/x/agent"], tmp_path / "h", start=False)
    assert ["systemctl", "restart", "go2cloud_client.service"] not in calls
    calls.clear()
    linux.service_uninstall()
    assert calls == [
        ["systemctl", "disable", "--now", "go2cloud_client.service"],
        ["systemctl", "daemon-reload"],
    ]
    assert not (tmp_path / "etc" / "go2cloud_client.service").exists()


def test_windows_sc_argv_built_not_run():
    argv = [
        r"C:\Program Files\go2cloud_client\go2cloud_client.exe",
        "--home",
        r"C:\Program Files\go2cloud_client",
        "--no-prompt",
    ]
    create, description, failure, failureflag = windows.service_install_commands(argv, Path(r"C:\g"))
    assert create == [
        "sc.exe",
        "create",
        "go2cloud_client",
        "binPath=",
        r'"C:\Program Files\go2cloud_client\go2cloud_client.exe" --home '
        r'"C:\Program Files\go2cloud_client" --no-prompt --windows-service',
        "start=",
        "auto",
        "DisplayName=",
        "go2cloud_client migration agent",
    ]
    assert description[:3] == ["sc.exe", "description", "go2cloud_client"]
    assert failure == [
        "sc.exe",
        "failure",
        "go2cloud_client",
        "reset=",
        "86400",
        "actions=",
        "restart/5000/restart/5000/restart/60000",
    ]
    # recovery actions also when the agent reports STOPPED with an error (non-zero exit status)
    assert failureflag == ["sc.exe", "failureflag", "go2cloud_client", "1"]
    update = windows.service_update_command(argv)
    assert update[:5] == ["sc.exe", "config", "go2cloud_client", "binPath=", create[4]]
    assert windows.service_uninstall_commands() == [
        ["sc.exe", "stop", "go2cloud_client"],
        ["sc.exe", "delete", "go2cloud_client"],
    ]


def test_windows_reinstall_uses_config_when_the_service_exists(monkeypatch):
    calls = []

    def fake_run(argv, **kw):
        calls.append(list(argv))
        if argv[1] == "create":
            raise subp.ProcessError(argv, 1073, "", "[SC] CreateService FAILED 1073: exists")
        return subp.Result(list(argv), 0, "", "")

    monkeypatch.setattr(subp, "run", fake_run)
    windows.service_install(["C:\\a.exe"], Path("C:\\g"), start=True)
    assert [c[1] for c in calls] == ["create", "config", "description", "failure", "failureflag", "stop",
                                     "start"]
    assert calls[1][4] == "C:\\a.exe --windows-service"


def test_windows_reinstall_starts_again_once_the_old_agent_has_stopped(monkeypatch):
    """sc.exe stop does not wait: while the old agent stops, sc.exe start fails with 1056."""
    calls = []
    busy = [2]

    def fake_run(argv, **kw):
        calls.append(argv[1])
        if argv[1] == "start" and busy[0]:
            busy[0] -= 1
            raise subp.ProcessError(argv, 1056, "", "[SC] StartService FAILED 1056")
        return subp.Result(list(argv), 0, "", "")

    monkeypatch.setattr(subp, "run", fake_run)
    monkeypatch.setattr(windows.time, "sleep", lambda s: None)
    windows.service_install(["C:\\a.exe"], Path("C:\\g"), start=True)
    assert calls[-4:] == ["stop", "start", "start", "start"]
    busy[0] = 10**6
    monkeypatch.setattr(windows, "SERVICE_RESTART_WAIT_S", 0.0)
    with pytest.raises(subp.ProcessError) as err:
        windows.service_install(["C:\\a.exe"], Path("C:\\g"), start=True)
    assert err.value.returncode == 1056


def test_install_refuses_a_home_that_is_not_imported(home):
    with pytest.raises(NotImportedError) as err:
        servicemode.install(home, Console())
    assert "--import-only" in str(err.value) and err.value.exit_code == 5


def test_install_records_the_service_once(home, monkeypatch, tmp_path):
    Identity.generate().save(home)
    home.write_state(home.source_file, {"source_id": "s-1", "server": "https://x"})
    monkeypatch.setenv(linux.SYSTEMD_DIR_ENV, str(tmp_path / "units"))
    started = []
    monkeypatch.setattr(servicemode, "start_detached", lambda h, *a: started.append(h) or 4242)
    lines = []
    console = Console()
    monkeypatch.setattr(console, "line", lines.append)
    servicemode.install(home, console)
    servicemode.install(home, console)
    kinds = [c["kind"] for c in HostChangeJournal(home).list()]
    assert kinds == ["service_installed"] and len(started) == 2
    assert any("systemd is not running" in line and "4242" in line for line in lines)
    monkeypatch.setattr(servicemode, "stop_agent", lambda h, **k: None)
    servicemode.uninstall(home, console)
    assert HostChangeJournal(home).list() == []
    assert not (tmp_path / "units" / "go2cloud_client.service").exists()


def test_install_writes_the_proxy_into_the_service(home, monkeypatch, tmp_path):
    """The service's agent keeps the proxy: the unit reads a root-only environment file holding
    it (credentials included, so not in the world-readable unit); the detached agent (no systemd)
    gets it in its environment; installing again without a proxy removes it."""
    from go2cloud_client.proxy import ProxySettings

    Identity.generate().save(home)
    home.write_state(home.source_file, {"source_id": "s-1", "server": "https://x"})
    monkeypatch.setenv(linux.SYSTEMD_DIR_ENV, str(tmp_path / "units"))
    started = []
    monkeypatch.setattr(servicemode, "start_detached", lambda h, p=None: started.append(p) or 4242)
    lines = []
    console = Console()
    monkeypatch.setattr(console, "line", lines.append)
    proxy = ProxySettings("http://agent:s3cret@10.9.8.7:3128", "10.0.0.0/8,.internal")
    servicemode.install(home, console, proxy=proxy)
    env_file = home.state_dir / servicemode.SERVICE_ENV
    unit = (tmp_path / "units" / "go2cloud_client.service").read_text()
    assert f"EnvironmentFile={env_file}\n" in unit and "s3cret" not in unit
    assert env_file.read_text() == ("GO2CLOUD_PROXY='http://agent:s3cret@10.9.8.7:3128'\n"
                                    "GO2CLOUD_NO_PROXY='10.0.0.0/8,.internal'\n")
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert started == [proxy]
    assert any("through the proxy http://10.9.8.7:3128" in line for line in lines)
    assert not any("s3cret" in line for line in lines)
    servicemode.install(home, console, proxy=ProxySettings())
    assert not env_file.exists()
    assert "EnvironmentFile" not in (tmp_path / "units" / "go2cloud_client.service").read_text()


def test_stop_with_no_agent(home):
    assert servicemode.stop_agent(home) is None


def test_package_folder_detection(tmp_path):
    from go2cloud_client.lifecycle import is_package_folder

    pkg = tmp_path / "opt" / "go2cloud_client"
    (pkg / "Excludes").mkdir(parents=True)
    assert not is_package_folder(pkg)  # an agent home also has Excludes/, but no executable
    (pkg / "go2cloud_client").write_text("#!/bin/sh\n")
    assert is_package_folder(pkg)
    assert not is_package_folder(Path("/")) and not is_package_folder(Path("/opt"))


def test_uninstall_asks_on_a_terminal_and_reverts_with_yes(home, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from go2cloud_client import cli as cli_mod
    from go2cloud_client.host import prep as hostprep

    monkeypatch.setenv(linux.SYSTEMD_DIR_ENV, str(tmp_path / "units"))
    calls = []
    monkeypatch.setattr(subp, "run", lambda argv, **kw: calls.append(list(argv)))
    HostChangeJournal(home).record(
        "package_installed", package="rsync", manager="apt-get", undo=["apt-get", "-y", "remove", "rsync"]
    )
    monkeypatch.setattr(hostprep, "can_prompt", lambda no_prompt: not no_prompt)
    args = ["uninstall", "--revert", "--home", str(home.root)]
    r = CliRunner().invoke(cli_mod.cli, args, input="n\n")
    assert r.exit_code == 0 and "revert 1 host change(s): package rsync installed" in r.output
    assert (
        r.output.rstrip().endswith("Nothing changed") and calls == []
        and len(HostChangeJournal(home).list()) == 1
    )
    r = CliRunner().invoke(cli_mod.cli, [*args, "--yes"])
    assert r.exit_code == 0, r.output
    assert "Reverted: removed package rsync (apt-get -y remove rsync)" in r.output
    assert calls == [["apt-get", "-y", "remove", "rsync"]] and HostChangeJournal(home).list() == []
    assert f"The agent home {home.root} is kept" in r.output and home.root.is_dir()


def test_install_under_systemd_checks_that_the_agent_runs(home, monkeypatch):
    Identity.generate().save(home)
    home.write_state(home.source_file, {"source_id": "s-1", "server": "https://x"})
    monkeypatch.setattr("go2cloud_client.platform.service_home", lambda: None)
    monkeypatch.setattr(
        "go2cloud_client.platform.service_install",
        lambda argv, h, start, env_file=None: {
            "unit": "/etc/systemd/system/go2cloud_client.service",
            "wants_link": None,
            "managed": True,
        },
    )
    monkeypatch.setattr(servicemode, "START_WAIT_S", 0.0)
    monkeypatch.setattr(servicemode, "running_pid", lambda h: None)
    monkeypatch.setattr("go2cloud_client.platform.service_state", lambda: None)
    with pytest.raises(ServiceError) as err:
        servicemode.install(home, Console())
    assert err.value.exit_code == 41 and "systemctl status go2cloud_client" in str(err.value)
    monkeypatch.setattr(servicemode, "running_pid", lambda h: 777)
    lines = []
    console = Console()
    monkeypatch.setattr(console, "line", lines.append)
    servicemode.install(home, console)
    assert lines[-1] == "Enabled at boot and started (pid 777)"


def test_windows_service_home_read_back_from_sc_qc_output():
    """`stop`/`--abort` must go through the SCM for the home the service runs (else the SCM sees a
    crash and restarts the agent): the home is read back from the binPath that install wrote."""
    argv = [r"C:\Program Files\go2cloud_client\go2cloud_client.exe", "--home",
            r"C:\Program Files\go2cloud_client", "--no-prompt"]
    bin_path = windows.service_install_commands(argv, Path(r"C:\g"))[0][4]
    qc = ("[SC] QueryServiceConfig SUCCESS\r\n\r\nSERVICE_NAME: go2cloud_client\r\n"
          "        TYPE               : 10  WIN32_OWN_PROCESS\r\n"
          f"        BINARY_PATH_NAME   : {bin_path}\r\n"
          "        DISPLAY_NAME       : go2cloud_client migration agent\r\n")
    assert windows.home_from_qc(qc) == Path(r"C:\Program Files\go2cloud_client")
    odd = [r"C:\a b\go2cloud_client.exe", "--home", r'C:\say "hi"\x', "--no-prompt"]
    assert windows.home_from_qc("BINARY_PATH_NAME : " + windows.service_update_command(odd)[4]) == \
        Path(r'C:\say "hi"\x')
    assert windows.home_from_qc("BINARY_PATH_NAME : C:\\x\\go2cloud_client.exe --no-prompt") is None
    assert windows.home_from_qc("[SC] OpenService FAILED 1060") is None


def test_windows_has_no_selinux_to_change():
    from go2cloud_client.errors import UsageError

    assert windows.selinux_mode() is None and windows.selinux_config_mode() is None
    with pytest.raises(UsageError, match="SELinux does not exist on Windows"):
        windows.set_selinux_runtime("enforcing")
    with pytest.raises(UsageError, match="SELinux does not exist on Windows"):
        windows.set_selinux_config("enforcing")


def _managed_install(home, monkeypatch):
    Identity.generate().save(home)
    home.write_state(home.source_file, {"source_id": "s-1", "server": "https://x"})
    monkeypatch.setattr("go2cloud_client.platform.service_home", lambda: None)
    monkeypatch.setattr(
        "go2cloud_client.platform.service_install",
        lambda argv, h, start, env_file=None: {"unit": "/etc/systemd/system/go2cloud_client.service",
                                               "wants_link": None, "managed": True})
    monkeypatch.setattr(servicemode, "START_WAIT_S", 0.0)
    monkeypatch.setattr(servicemode, "wait_running", lambda h, seconds: pids.pop(0) if pids else None)
    pids: list = []
    return pids


def test_install_waits_for_a_slow_host_while_systemd_runs_the_agent(home, monkeypatch):
    """Found in the live-VM test (qemu without KVM): the packaged agent took 40 s to start, the
    install gave up after 30 s with exit 41 although the service was fine. Now it keeps waiting
    while systemd reports the service's process running."""
    pids = _managed_install(home, monkeypatch)
    pids.extend([None, None, None, 4242])
    monkeypatch.setattr("go2cloud_client.platform.service_state", lambda: ("active", "running"))
    lines: list = []
    console = Console()
    monkeypatch.setattr(console, "line", lines.append)
    servicemode.install(home, console)
    assert lines[-1] == "Enabled at boot and started (pid 4242)"
    assert any("still starting" in line for line in lines), lines
    assert pids == []


def test_install_fails_at_once_when_systemd_says_the_agent_exited(home, monkeypatch):
    pids = _managed_install(home, monkeypatch)
    pids.extend([None] * 50)
    monkeypatch.setattr("go2cloud_client.platform.service_state", lambda: ("activating", "auto-restart"))
    with pytest.raises(ServiceError) as err:
        servicemode.install(home, Console())
    assert err.value.exit_code == 41 and "exited (service state activating/auto-restart)" in str(err.value)
    assert len(pids) == 49  # one wait (START_WAIT_S), then the state said it exited: no more waiting


def test_service_state_reads_systemctl_show(monkeypatch):
    out = "ActiveState=activating\nSubState=auto-restart\n"
    monkeypatch.setattr(linux.subp, "run", lambda argv, timeout: subp.Result(argv, 0, out, ""))
    assert linux.service_state() == ("activating", "auto-restart")
    monkeypatch.setattr(linux.subp, "run", lambda argv, timeout: subp.Result(argv, 0, "", ""))
    assert linux.service_state() is None
