"""The Windows service host without Windows: a fake Service Control Manager records every status
report. The real advapi32 is never called (no Windows here); its ctypes structures are checked
for their documented sizes, and its marshalling is driven through real ctypes callbacks by a
fake DLL. Fenced: no processes, no sockets."""

from __future__ import annotations

import ctypes
import sys
import threading
from typing import Callable, List, Optional

import pytest

from go2cloud_client.errors import IdentityRejectedError, ServiceError, UsageError
from go2cloud_client.platform import winservice as ws
from go2cloud_client.platform.winservice import ServiceStatus

HANDLE = 0x1234
ACCEPTS = ws.SERVICE_ACCEPT_STOP | ws.SERVICE_ACCEPT_SHUTDOWN
RUNNING = ServiceStatus(ws.SERVICE_RUNNING, ACCEPTS, 0, 0, 0, 0)
STOPPED_OK = ServiceStatus(ws.SERVICE_STOPPED, 0, 0, 0, 0, 0)


class FakeScm:
    """The SCM and advapi32 as the host sees them: ServiceMain on a thread of its own, the
    controls sent from the dispatcher thread once RUNNING is reported, and the dispatcher
    returning when STOPPED is reported (failing the test instead of hanging)."""

    def __init__(self, controls=(), *, dispatcher_error: Optional[int] = None) -> None:
        self.controls = list(controls)
        self.dispatcher_error = dispatcher_error
        self.reports: List[ServiceStatus] = []
        self.answers: List[int] = []
        self.handler: Optional[Callable[[int, int], int]] = None
        self._changed = threading.Condition()

    def _wait(self, predicate, timeout=5.0) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def states(self) -> List[int]:
        return [r.state for r in self.reports]

    def start_dispatcher(self, name, service_main):
        if self.dispatcher_error is not None:
            raise ws.ServiceApiError("StartServiceCtrlDispatcherW", self.dispatcher_error)
        thread = threading.Thread(target=service_main, args=([name],), daemon=True)
        thread.start()
        assert self._wait(lambda: ws.SERVICE_RUNNING in self.states() or ws.SERVICE_STOPPED in self.states())
        for control in self.controls:
            self.answers.append(self.handler(control, 0))
        assert self._wait(lambda: ws.SERVICE_STOPPED in self.states()), "the service never reported STOPPED"
        thread.join(5)
        assert not thread.is_alive(), "ServiceMain did not return after STOPPED"

    def register_handler(self, name, handler):
        assert name == "go2cloud_client"
        self.handler = handler
        return HANDLE

    def set_status(self, handle, state, controls_accepted, win32_exit_code, service_exit_code, checkpoint,
                   wait_hint):
        assert handle == HANDLE
        with self._changed:
            assert ws.SERVICE_STOPPED not in self.states(), "a report after STOPPED"
            self.reports.append(ServiceStatus(state, controls_accepted, win32_exit_code, service_exit_code,
                                              checkpoint, wait_hint))
            self._changed.notify_all()


class FakeAgent:
    """Runs until stopped, then takes ``stop_delay`` seconds to shut down."""

    def __init__(self, status: int = 0, stop_delay: float = 0.0) -> None:
        self.status = status
        self.stop_delay = stop_delay
        self.stopped = threading.Event()
        self.reasons: List[str] = []

    def stop(self, reason: str) -> None:
        self.reasons.append(reason)
        self.stopped.set()

    def run(self) -> int:
        assert self.stopped.wait(5), "the agent was never stopped"
        threading.Event().wait(self.stop_delay)
        return self.status


def _host(scm, run, stop=lambda reason: None, **kw) -> ws.ServiceHost:
    return ws.ServiceHost(scm, "go2cloud_client", run=run, stop=stop, **kw)


def test_start_reports_start_pending_then_running_before_the_agent_runs():
    scm = FakeScm()
    seen = []

    def run():
        seen.extend(scm.reports)
        return 0

    assert _host(scm, run).serve() == 0
    assert seen[0] == ServiceStatus(ws.SERVICE_START_PENDING, 0, 0, 0, 1, ws.START_WAIT_HINT_MS)
    assert seen[1:] == [RUNNING]
    assert scm.reports == [*seen, STOPPED_OK]


def test_stop_reports_stop_pending_with_increasing_checkpoints_then_stopped():
    scm = FakeScm([ws.SERVICE_CONTROL_STOP])
    agent = FakeAgent(stop_delay=0.3)
    assert _host(scm, agent.run, agent.stop, pulse_s=0.02).serve() == 0
    assert scm.answers == [ws.NO_ERROR] and agent.reasons == ["service stop"]
    assert scm.states()[:3] == [ws.SERVICE_START_PENDING, ws.SERVICE_RUNNING, ws.SERVICE_STOP_PENDING]
    pending = [r for r in scm.reports if r.state == ws.SERVICE_STOP_PENDING]
    assert len(pending) >= 3, pending  # the pulse thread reported while the agent stopped
    assert [r.checkpoint for r in pending] == list(range(1, len(pending) + 1))
    assert all(r.wait_hint == ws.STOP_WAIT_HINT_MS and r.controls_accepted == 0 for r in pending)
    assert scm.reports[-1] == STOPPED_OK
    assert scm.states().count(ws.SERVICE_STOPPED) == 1


def test_stop_pulse_checkpoints_without_a_thread():
    scm = FakeScm([ws.SERVICE_CONTROL_STOP])
    agent = FakeAgent()
    host = _host(scm, lambda: (agent.run(), host.pulse(), host.pulse())[0], agent.stop, pulse_s=None)
    assert host.serve() == 0
    assert [(r.state, r.checkpoint) for r in scm.reports[2:]] == [
        (ws.SERVICE_STOP_PENDING, 1), (ws.SERVICE_STOP_PENDING, 2), (ws.SERVICE_STOP_PENDING, 3),
        (ws.SERVICE_STOPPED, 0)]
    assert host.pulse() is False  # nothing after STOPPED


def test_shutdown_stops_like_stop():
    scm = FakeScm([ws.SERVICE_CONTROL_SHUTDOWN])
    agent = FakeAgent()
    assert _host(scm, agent.run, agent.stop, pulse_s=None).serve() == 0
    assert agent.reasons == ["system shutdown"] and scm.answers == [ws.NO_ERROR]
    assert scm.states() == [ws.SERVICE_START_PENDING, ws.SERVICE_RUNNING, ws.SERVICE_STOP_PENDING,
                            ws.SERVICE_STOPPED]
    assert scm.reports[-1] == STOPPED_OK


def test_a_second_stop_is_answered_and_ignored():
    scm = FakeScm([ws.SERVICE_CONTROL_STOP, ws.SERVICE_CONTROL_SHUTDOWN])
    agent = FakeAgent()
    assert _host(scm, agent.run, agent.stop, pulse_s=None).serve() == 0
    assert scm.answers == [ws.NO_ERROR, ws.NO_ERROR] and agent.reasons == ["service stop"]
    assert scm.states().count(ws.SERVICE_STOP_PENDING) == 1


def test_interrogate_repeats_the_state_and_unknown_controls_are_refused():
    scm = FakeScm([ws.SERVICE_CONTROL_INTERROGATE, ws.SERVICE_CONTROL_PAUSE, 0x80,
                   ws.SERVICE_CONTROL_STOP])
    agent = FakeAgent()
    assert _host(scm, agent.run, agent.stop, pulse_s=None).serve() == 0
    assert scm.answers == [ws.NO_ERROR, ws.ERROR_CALL_NOT_IMPLEMENTED, ws.ERROR_CALL_NOT_IMPLEMENTED,
                           ws.NO_ERROR]
    assert scm.reports[1:3] == [RUNNING, RUNNING]  # INTERROGATE: the same report again
    assert agent.reasons == ["service stop"]  # only STOP reached the agent


def test_agent_failing_with_a_status_is_a_service_specific_error():
    scm = FakeScm()
    assert _host(scm, lambda: 21).serve() == 21
    assert scm.reports[-1] == ServiceStatus(ws.SERVICE_STOPPED, 0, ws.ERROR_SERVICE_SPECIFIC_ERROR, 21, 0, 0)


def test_a_status_after_a_requested_stop_is_reported_as_a_clean_stop():
    """The operator stopped it: a non-zero status must not make the recovery actions restart it."""
    scm = FakeScm([ws.SERVICE_CONTROL_STOP])
    agent = FakeAgent(status=31)
    assert _host(scm, agent.run, agent.stop, pulse_s=None).serve() == 31
    assert scm.reports[-1] == STOPPED_OK


@pytest.mark.parametrize("exc, status", [(RuntimeError("bug"), ws.INTERNAL_ERROR_STATUS),
                                         (IdentityRejectedError("source deleted"), 25)])
def test_a_run_that_raises_reports_stopped_with_an_error_and_serve_reraises(exc, status):
    scm = FakeScm()

    def run():
        raise exc

    host = _host(scm, run)
    with pytest.raises(type(exc)) as err:
        host.serve()  # FakeScm fails instead of hanging if STOPPED never comes
    assert err.value is exc and host.status == status
    failed = ServiceStatus(ws.SERVICE_STOPPED, 0, ws.ERROR_SERVICE_SPECIFIC_ERROR, status, 0, 0)
    assert scm.reports[-1] == failed


def test_an_agent_that_does_not_stop_is_reported_stopped_after_the_timeout():
    now = [100.0]
    scm = FakeScm([ws.SERVICE_CONTROL_STOP])
    asked, release = threading.Event(), threading.Event()
    host_box = []

    def run():
        host = host_box[0]
        assert asked.wait(5)
        assert host.pulse() is True
        now[0] += ws.STOP_TIMEOUT_S
        assert host.pulse() is False  # gave up: STOPPED, the dispatcher returns
        release.set()
        return 0  # too late: nothing more is reported

    def stop(reason):
        asked.set()  # and then never stops

    host = _host(scm, run, stop, pulse_s=None, clock=lambda: now[0])
    host_box.append(host)
    assert host.serve() == ws.AgentStopError.exit_code
    assert release.is_set()
    assert scm.states() == [ws.SERVICE_START_PENDING, ws.SERVICE_RUNNING, ws.SERVICE_STOP_PENDING,
                            ws.SERVICE_STOP_PENDING, ws.SERVICE_STOPPED]
    assert scm.reports[-1] == STOPPED_OK


def test_not_started_by_the_scm_is_a_clear_error():
    host = _host(FakeScm(dispatcher_error=ws.ERROR_FAILED_SERVICE_CONTROLLER_CONNECT), lambda: 0)
    with pytest.raises(ServiceError) as err:
        host.serve()
    assert "only for the Windows Service Control Manager" in str(err.value)
    assert err.value.exit_code == 41


def test_a_failing_set_status_does_not_stop_the_service():
    class Flaky(FakeScm):
        def set_status(self, handle, state, *rest):
            super().set_status(handle, state, *rest)
            if state == ws.SERVICE_START_PENDING:
                raise ws.ServiceApiError("SetServiceStatus", 6)

    scm = Flaky()
    assert _host(scm, lambda: 0).serve() == 0
    assert scm.states() == [ws.SERVICE_START_PENDING, ws.SERVICE_RUNNING, ws.SERVICE_STOPPED]


def test_stop_relay_keeps_a_stop_that_comes_before_the_agent():
    relay = ws.StopRelay()
    relay.stop("service stop")
    agent = FakeAgent()
    relay.attach(agent)
    assert agent.reasons == ["service stop"]
    relay.stop("system shutdown")
    assert agent.reasons == ["service stop", "system shutdown"]


def test_run_service_hands_the_stop_to_the_attached_agent():
    scm = FakeScm([ws.SERVICE_CONTROL_STOP])
    agent = FakeAgent()

    def run_agent(attach):
        attach(agent)
        agent.run()

    assert ws.run_service(run_agent, name="go2cloud_client", api=scm) == 0
    assert agent.reasons == ["service stop"] and scm.reports[-1] == STOPPED_OK


# -- the ctypes binding (never run against the real advapi32) -----------------------------------


@pytest.mark.skipif(ctypes.sizeof(ctypes.c_void_p) != 8, reason="64-bit layout")
def test_structures_have_the_documented_64_bit_layout():
    assert ctypes.sizeof(ws.SERVICE_STATUS) == 28  # seven DWORDs
    assert ws.SERVICE_STATUS.dwWaitHint.offset == 24
    assert ctypes.sizeof(ws.SERVICE_TABLE_ENTRYW) == 16  # LPWSTR + function pointer
    assert ws.SERVICE_TABLE_ENTRYW.lpServiceProc.offset == 8
    assert ctypes.sizeof(ws.LPHANDLER_FUNCTION_EX) == 8


@pytest.mark.skipif(sys.platform.startswith("win"), reason="off Windows only")
def test_the_real_binding_refuses_to_load_off_windows():
    with pytest.raises(ServiceError) as err:
        ws.Advapi32Api()
    assert "only on Windows" in str(err.value)


class FakeAdvapi32:
    """Plain functions (ctypes sets argtypes on them) that call back through the ctypes thunks
    the binding built, as the SCM would."""

    def __init__(self, controls=(), fail_register=False):
        self.statuses: List[tuple] = []
        self.answers: List[int] = []
        self.table_end = None
        self.sent = False
        fake = self

        def start(table):
            entry = table[0]
            fake.table_end = (table[1].lpServiceName, bool(table[1].lpServiceProc))
            assert entry.lpServiceName == "go2cloud_client"
            argv = (ctypes.c_wchar_p * 2)("go2cloud_client", "-x")
            entry.lpServiceProc(2, argv)
            return 1

        def register(name, proc, context):
            if fail_register:
                return None
            fake.handler = proc
            return 0x5678

        def set_status(handle, status_ref):
            status = status_ref._obj
            fake.statuses.append((handle, status.dwServiceType, status.dwCurrentState,
                                  status.dwControlsAccepted, status.dwWin32ExitCode,
                                  status.dwServiceSpecificExitCode, status.dwCheckPoint, status.dwWaitHint))
            if status.dwCurrentState == ws.SERVICE_RUNNING and not fake.sent:
                fake.sent = True  # INTERROGATE reports RUNNING again, from inside this loop
                for control in controls:
                    fake.answers.append(fake.handler(control, 0, None, None))
            return 1

        self.StartServiceCtrlDispatcherW = start
        self.RegisterServiceCtrlHandlerExW = register
        self.SetServiceStatus = set_status


def test_binding_marshals_through_ctypes_callbacks():
    dll = FakeAdvapi32(controls=[ws.SERVICE_CONTROL_INTERROGATE, 0x80, ws.SERVICE_CONTROL_STOP])
    api = ws.Advapi32Api(dll, last_error=lambda: 0)
    seen_args = []
    agent = FakeAgent(status=0)

    def service_main(args):
        seen_args.extend(args)
        host = ws.ServiceHost(api, "go2cloud_client", run=agent.run, stop=agent.stop, pulse_s=None)
        host.service_main(args)

    api.start_dispatcher("go2cloud_client", service_main)
    assert seen_args == ["go2cloud_client", "-x"] and dll.table_end == (None, False)
    assert dll.answers == [ws.NO_ERROR, ws.ERROR_CALL_NOT_IMPLEMENTED, ws.NO_ERROR]
    own = ws.SERVICE_WIN32_OWN_PROCESS
    assert dll.statuses[0] == (0x5678, own, ws.SERVICE_START_PENDING, 0, 0, 0, 1, ws.START_WAIT_HINT_MS)
    assert dll.statuses[1] == (0x5678, own, ws.SERVICE_RUNNING, ACCEPTS, 0, 0, 0, 0)
    states = [s[2] for s in dll.statuses[2:]]
    assert states == [ws.SERVICE_RUNNING, ws.SERVICE_STOP_PENDING, ws.SERVICE_STOPPED]
    assert agent.reasons == ["service stop"]


def test_binding_failures_carry_the_windows_error():
    api = ws.Advapi32Api(FakeAdvapi32(fail_register=True), last_error=lambda: 1063)
    with pytest.raises(ws.ServiceApiError) as err:
        api.register_handler("go2cloud_client", lambda control, event: 0)
    assert err.value.code == 1063 and "RegisterServiceCtrlHandlerExW" in str(err.value)
    dll = FakeAdvapi32()
    dll.StartServiceCtrlDispatcherW = lambda table: 0
    host = ws.ServiceHost(ws.Advapi32Api(dll, last_error=lambda: 1063), "go2cloud_client", run=lambda: 0,
                          stop=lambda reason: None)
    with pytest.raises(ServiceError, match="not started by it"):
        host.serve()


def test_a_handler_exception_does_not_escape_into_the_dispatcher():
    dll = FakeAdvapi32()
    api = ws.Advapi32Api(dll, last_error=lambda: 0)

    def broken(control, event_type):
        raise RuntimeError("bug")

    api.register_handler("go2cloud_client", broken)
    assert dll.handler(ws.SERVICE_CONTROL_STOP, 0, None, None) == ws.NO_ERROR


# -- the CLI flag -------------------------------------------------------------------------------


def test_cli_flag_runs_the_agent_under_the_service_host(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from go2cloud_client import cli as cli_mod
    from go2cloud_client import lifecycle, platform

    calls = []

    def fake_run_foreground(home, flags, **kw):
        calls.append(kw)
        kw["attach"](FakeAgent())

    def fake_service(run_agent):
        attached = []
        run_agent(attached.append)
        assert len(attached) == 1
        return 21

    monkeypatch.setattr(lifecycle, "run_foreground", fake_run_foreground)
    monkeypatch.setattr(platform, "run_windows_service", fake_service)
    assert cli_mod.run(["--home", str(tmp_path / "h"), "--no-prompt", "--windows-service"]) == 21
    assert calls[0]["no_prompt"] is True and callable(calls[0]["attach"])
    assert "--windows-service" not in CliRunner().invoke(cli_mod.cli, ["--help"]).output


@pytest.mark.skipif(sys.platform.startswith("win"), reason="off Windows only")
def test_cli_flag_off_windows_is_a_usage_error(tmp_path, capsys):
    from go2cloud_client import cli as cli_mod
    from go2cloud_client import platform

    with pytest.raises(UsageError):
        platform.run_windows_service(lambda attach: None)
    assert cli_mod.run(["--home", str(tmp_path / "h"), "--windows-service"]) == 2
    assert "only for the Windows Service Control Manager" in capsys.readouterr().err
