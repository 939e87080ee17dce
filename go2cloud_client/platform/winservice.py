"""The agent as a Windows service: answering the Service Control Manager (SCM) without pywin32.

A program started by the SCM must call ``StartServiceCtrlDispatcherW`` within 30 s, register a
control handler and report its state with ``SetServiceStatus``; a plain console program is
stopped with error 1053. ``service install`` therefore puts ``--windows-service`` into the
binPath, and the CLI then runs the agent through :func:`run_service`:

* the main thread calls the dispatcher, which blocks until the service reports STOPPED;
* the SCM calls ServiceMain on a thread of its own: :class:`ServiceHost` registers the handler,
  reports START_PENDING then RUNNING, and runs the agent there (``run() -> exit status``);
* STOP and SHUTDOWN (the handler runs on the dispatcher thread and must return at once) report
  STOP_PENDING and call ``stop(reason)`` (``Agent.stop``); a pulse thread then reports a new
  checkpoint every ``pulse_s`` until the agent has stopped, for at most ``stop_timeout_s``
  (after which STOPPED is reported anyway so the process can exit, like systemd's SIGKILL
  after TimeoutStopSec); INTERROGATE re-reports the current state;
* when the agent exits with status 0, or after a stop the SCM asked for, the final report is
  STOPPED with exit code 0. When it exits by itself with status N != 0 (or raises), it is
  STOPPED with ERROR_SERVICE_SPECIFIC_ERROR (1066) and N as the service-specific code: with
  ``sc.exe failureflag <name> 1`` (set by ``service install``) that is a failure the recovery
  actions of ``sc.exe failure`` act on, so the SCM restarts the agent. An exception raised by
  the agent is re-raised by :meth:`ServiceHost.serve` on the main thread, where the CLI maps it
  to the process exit status as usual.

:class:`ServiceHost` is pure Python and talks to the SCM only through an ``api`` object
(:class:`ServiceApi`); the unit tests drive it with a fake. :class:`Advapi32Api` is the real
binding (ctypes, ``advapi32.dll``). The constants are the documented values of winsvc.h and
winerror.h.

NOT RUN: there is no Windows machine here. Everything that calls the real advapi32 -
:class:`Advapi32Api` with the real DLL, hence StartServiceCtrlDispatcherW,
RegisterServiceCtrlHandlerExW, SetServiceStatus, ``ctypes.WINFUNCTYPE`` callbacks called by the
SCM on its own threads, and :func:`run_service` as a whole - has never run. What is tested (on
Linux): the state machine with a fake SCM, the sizes and offsets of the ctypes structures on
64-bit, and the marshalling of :class:`Advapi32Api` against a fake DLL through real ctypes
callbacks (cdecl, the x64 calling convention; 32-bit Windows would use stdcall).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, List, NamedTuple, Optional, Protocol, Sequence

from go2cloud_client.errors import AgentStopError, Go2CloudError, ServiceError

LOG = logging.getLogger(__name__)

# -- winsvc.h ------------------------------------------------------------------------------------
SERVICE_WIN32_OWN_PROCESS = 0x00000010

SERVICE_STOPPED = 0x00000001
SERVICE_START_PENDING = 0x00000002
SERVICE_STOP_PENDING = 0x00000003
SERVICE_RUNNING = 0x00000004

SERVICE_ACCEPT_STOP = 0x00000001
SERVICE_ACCEPT_SHUTDOWN = 0x00000004

SERVICE_CONTROL_STOP = 0x00000001
SERVICE_CONTROL_PAUSE = 0x00000002
SERVICE_CONTROL_INTERROGATE = 0x00000004
SERVICE_CONTROL_SHUTDOWN = 0x00000005

# -- winerror.h ----------------------------------------------------------------------------------
NO_ERROR = 0
ERROR_CALL_NOT_IMPLEMENTED = 120
ERROR_FAILED_SERVICE_CONTROLLER_CONNECT = 1063
ERROR_SERVICE_SPECIFIC_ERROR = 1066

STATE_NAMES = {SERVICE_STOPPED: "STOPPED", SERVICE_START_PENDING: "START_PENDING",
               SERVICE_STOP_PENDING: "STOP_PENDING", SERVICE_RUNNING: "RUNNING"}

#: Wait hints (ms): how long the SCM should wait for the next report while pending.
START_WAIT_HINT_MS = 10_000
STOP_WAIT_HINT_MS = 10_000
#: A new STOP_PENDING checkpoint every PULSE_S while the agent stops (well within the hint).
PULSE_S = 2.0
#: After a STOP/SHUTDOWN, the agent gets this long before STOPPED is reported anyway (the
#: systemd unit's TimeoutStopSec).
STOP_TIMEOUT_S = 60.0
#: Exit status of a run that raised something that is not a Go2CloudError (as cli.run maps it).
INTERNAL_ERROR_STATUS = 1

_REASONS = {SERVICE_CONTROL_STOP: "service stop", SERVICE_CONTROL_SHUTDOWN: "system shutdown"}


class ServiceApiError(Exception):
    """A call of the service API failed with the Windows error ``code`` (GetLastError)."""

    def __init__(self, call: str, code: int) -> None:
        super().__init__(f"{call} failed with Windows error {code}")
        self.call = call
        self.code = code


class ServiceStatus(NamedTuple):
    """One ``SetServiceStatus`` report (the fields of SERVICE_STATUS after the service type)."""

    state: int
    controls_accepted: int
    win32_exit_code: int
    service_exit_code: int
    checkpoint: int
    wait_hint: int


class ServiceApi(Protocol):
    """What :class:`ServiceHost` needs from the SCM.

    ``start_dispatcher`` blocks until every service of the process has reported STOPPED and
    calls ``service_main(args)`` on a thread of its own meanwhile; ``register_handler`` returns
    the status handle, and the SCM then calls ``handler(control, event_type) -> Windows error
    code`` on the dispatcher thread. Failures raise :class:`ServiceApiError`.
    """

    def start_dispatcher(self, name: str, service_main: Callable[[List[str]], None]) -> None: ...

    def register_handler(self, name: str, handler: Callable[[int, int], int]) -> int: ...

    def set_status(self, handle: int, state: int, controls_accepted: int, win32_exit_code: int,
                   service_exit_code: int, checkpoint: int, wait_hint: int) -> None: ...


def exit_status_of(exc: BaseException) -> int:
    """The process exit status the CLI gives ``exc`` (docs/exit-codes.md)."""
    return exc.exit_code if isinstance(exc, Go2CloudError) else INTERNAL_ERROR_STATUS


class ServiceHost:
    """The state machine of one service process (see the module docstring for the reports).

    ``run()`` runs the agent and returns its exit status; ``stop(reason)`` asks it to stop and
    returns at once. With ``pulse_s=None`` no pulse thread is started (the tests call
    :meth:`pulse` themselves).
    """

    def __init__(self, api: ServiceApi, name: str, *, run: Callable[[], int], stop: Callable[[str], None],
                 pulse_s: Optional[float] = PULSE_S, stop_timeout_s: float = STOP_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api
        self.name = name
        self._run = run
        self._stop = stop
        self.pulse_s = pulse_s
        self.stop_timeout_s = stop_timeout_s
        self._clock = clock
        self._lock = threading.RLock()
        self._done = threading.Event()
        self._handle: Optional[int] = None
        self._last: Optional[ServiceStatus] = None
        self._stop_reason: Optional[str] = None
        self._stop_asked_at = 0.0
        #: The agent's exit status once it is known (or AgentStopError's after a stop timeout).
        self.status: Optional[int] = None
        #: What ``run`` raised, re-raised by :meth:`serve`.
        self.error: Optional[BaseException] = None

    @property
    def state(self) -> Optional[int]:
        return self._last.state if self._last else None

    # -- the main thread ------------------------------------------------------------------------

    def serve(self) -> int:
        """Run the dispatcher until the service is stopped; the agent's exit status. Re-raises
        what the agent raised. ServiceError when the SCM cannot be reached."""
        try:
            self.api.start_dispatcher(self.name, self.service_main)
        except ServiceApiError as exc:
            if exc.code == ERROR_FAILED_SERVICE_CONTROLLER_CONNECT:
                raise ServiceError(
                    "--windows-service is only for the Windows Service Control Manager (this process "
                    "was not started by it); run go2cloud_client without it, or start the service "
                    f"with: sc.exe start {self.name}") from exc
            raise ServiceError(f"the service dispatcher failed: {exc}") from exc
        if self.error is not None:
            raise self.error
        if self.status is None:
            raise ServiceError("the Service Control Manager returned without running the service "
                               f"{self.name}")
        return self.status

    # -- the ServiceMain thread -----------------------------------------------------------------

    def service_main(self, args: Sequence[str] = ()) -> None:
        """ServiceMain: register the handler, report START_PENDING and RUNNING, run the agent,
        report STOPPED (the last thing it does: the process may end right after)."""
        try:
            self._handle = self.api.register_handler(self.name, self.handle)
        except ServiceApiError as exc:
            LOG.error("cannot register the service control handler: %s", exc)
            self.error = ServiceError(f"cannot register the service control handler: {exc}")
            return
        with self._lock:
            self._report(SERVICE_START_PENDING, wait_hint=START_WAIT_HINT_MS)
            self._report(SERVICE_RUNNING)
        LOG.info("running as the Windows service %s", self.name)
        error: Optional[BaseException] = None
        try:
            status = int(self._run())
        except BaseException as exc:  # noqa: BLE001 - reported to the SCM, re-raised by serve()
            error, status = exc, exit_status_of(exc)
        self._finish(status, error)

    def _finish(self, status: int, error: Optional[BaseException]) -> None:
        with self._lock:
            self._done.set()
            if self.state == SERVICE_STOPPED:  # the stop timeout already reported it
                return
            self.status, self.error = status, error
            if status == 0:
                self._report(SERVICE_STOPPED)
            elif self._stop_reason is not None:
                LOG.warning("the agent exited with status %d after the %s; reported as a clean stop so "
                            "that the recovery actions do not restart a service that was stopped",
                            status, self._stop_reason)
                self._report(SERVICE_STOPPED)
            else:
                LOG.error("the agent exited with status %d; reporting the service as failed "
                          "(the recovery actions restart it)", status)
                self._report(SERVICE_STOPPED, win32_exit_code=ERROR_SERVICE_SPECIFIC_ERROR,
                             service_exit_code=status)

    # -- the dispatcher thread ------------------------------------------------------------------

    def handle(self, control: int, event_type: int = 0) -> int:
        """HandlerEx: answer one control at once; the Windows error code it returns."""
        if control in _REASONS:
            reason = _REASONS[control]
            with self._lock:
                if self._stop_reason is not None or self.state == SERVICE_STOPPED:
                    return NO_ERROR
                self._stop_reason = reason
                self._stop_asked_at = self._clock()
                self._report(SERVICE_STOP_PENDING, wait_hint=STOP_WAIT_HINT_MS)
            LOG.info("the Service Control Manager asks to stop (%s)", reason)
            try:
                self._stop(reason)
            except Exception:  # noqa: BLE001 - the handler must answer; the timeout still applies
                LOG.exception("stopping the agent failed")
            if self.pulse_s is not None:
                threading.Thread(target=self._pulse_loop, name="service-pulse", daemon=True).start()
            return NO_ERROR
        if control == SERVICE_CONTROL_INTERROGATE:
            with self._lock:
                if self._last is not None:
                    self._send(self._last)
            return NO_ERROR
        return ERROR_CALL_NOT_IMPLEMENTED

    # -- the pulse thread -----------------------------------------------------------------------

    def pulse(self) -> bool:
        """One STOP_PENDING checkpoint; after ``stop_timeout_s``, STOPPED instead. Whether the
        stop is still pending."""
        with self._lock:
            if self.state != SERVICE_STOP_PENDING or self._done.is_set():
                return False
            waited = self._clock() - self._stop_asked_at
            if waited >= self.stop_timeout_s:
                LOG.warning("the agent did not stop within %.0fs of the %s; reporting the service "
                            "stopped so that the process exits", waited, self._stop_reason)
                self.status = AgentStopError.exit_code
                self._report(SERVICE_STOPPED)
                return False
            assert self._last is not None
            self._send(self._last._replace(checkpoint=self._last.checkpoint + 1))
            return True

    def _pulse_loop(self) -> None:
        assert self.pulse_s is not None
        while not self._done.wait(self.pulse_s) and self.pulse():
            pass

    # -- reports (under the lock) ---------------------------------------------------------------

    def _report(self, state: int, *, win32_exit_code: int = NO_ERROR, service_exit_code: int = 0,
                wait_hint: int = 0) -> None:
        if self.state == SERVICE_STOPPED:
            return  # nothing may follow STOPPED
        pending = state in (SERVICE_START_PENDING, SERVICE_STOP_PENDING)
        controls = SERVICE_ACCEPT_STOP | SERVICE_ACCEPT_SHUTDOWN if state == SERVICE_RUNNING else 0
        self._send(ServiceStatus(state, controls, win32_exit_code,
                                 service_exit_code if win32_exit_code == ERROR_SERVICE_SPECIFIC_ERROR else 0,
                                 1 if pending else 0, wait_hint if pending else 0))

    def _send(self, status: ServiceStatus) -> None:
        self._last = status
        LOG.debug("service status %s", status)
        if self._handle is None:
            return
        try:
            self.api.set_status(self._handle, *status)
        except ServiceApiError as exc:
            LOG.warning("reporting the service state %s failed: %s",
                        STATE_NAMES.get(status.state, status.state), exc)


# -- glue between the CLI and the host ----------------------------------------------------------


class Stoppable(Protocol):
    def stop(self, reason: str) -> None: ...


class StopRelay:
    """Hands the SCM's stop to the agent, which exists only once the host is prepared; a stop
    that comes before is kept and given to the agent when it is attached."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._agent: Optional[Stoppable] = None
        self._reason: Optional[str] = None

    def attach(self, agent: Stoppable) -> None:
        with self._lock:
            self._agent = agent
            reason = self._reason
        if reason is not None:
            agent.stop(reason)

    def stop(self, reason: str) -> None:
        with self._lock:
            self._reason = reason
            agent = self._agent
        if agent is not None:
            agent.stop(reason)


def run_service(run_agent: Callable[[Callable[[Stoppable], None]], None], *, name: str,
                api: Optional[ServiceApi] = None) -> int:
    """Run ``run_agent(attach)`` as the service ``name``; the agent's exit status.
    ``run_agent`` calls ``attach(agent)`` once the agent exists, so that a stop reaches it."""
    _ensure_stdio()
    relay = StopRelay()

    def run() -> int:
        run_agent(relay.attach)
        return 0

    return ServiceHost(api or Advapi32Api(), name, run=run, stop=relay.stop).serve()


def _ensure_stdio() -> None:
    """A service has no console: where Python found no stdout/stderr, write to the null device."""
    for attr in ("stdout", "stderr"):
        if getattr(sys, attr) is None:
            setattr(sys, attr, open(os.devnull, "w", encoding="utf-8"))


# -- advapi32 (ctypes) --------------------------------------------------------------------------
# WINFUNCTYPE and WinDLL exist only on Windows; elsewhere the types are built with CFUNCTYPE so
# that this module imports and the structure layouts can be checked (on x64 Windows there is one
# calling convention, so WINFUNCTYPE and CFUNCTYPE are the same there too).

_WINFUNCTYPE: Any = getattr(ctypes, "WINFUNCTYPE", ctypes.CFUNCTYPE)

DWORD = ctypes.c_uint32
BOOL = ctypes.c_int
LPVOID = ctypes.c_void_p
SERVICE_STATUS_HANDLE = ctypes.c_void_p


class SERVICE_STATUS(ctypes.Structure):
    _fields_ = [
        ("dwServiceType", DWORD),
        ("dwCurrentState", DWORD),
        ("dwControlsAccepted", DWORD),
        ("dwWin32ExitCode", DWORD),
        ("dwServiceSpecificExitCode", DWORD),
        ("dwCheckPoint", DWORD),
        ("dwWaitHint", DWORD),
    ]


#: VOID WINAPI ServiceMain(DWORD dwNumServicesArgs, LPWSTR *lpServiceArgVectors)
LPSERVICE_MAIN_FUNCTIONW = _WINFUNCTYPE(None, DWORD, ctypes.POINTER(ctypes.c_wchar_p))
#: DWORD WINAPI HandlerEx(DWORD dwControl, DWORD dwEventType, LPVOID lpEventData, LPVOID lpContext)
LPHANDLER_FUNCTION_EX = _WINFUNCTYPE(DWORD, DWORD, DWORD, LPVOID, LPVOID)


class SERVICE_TABLE_ENTRYW(ctypes.Structure):
    _fields_ = [("lpServiceName", ctypes.c_wchar_p), ("lpServiceProc", LPSERVICE_MAIN_FUNCTIONW)]


class Advapi32Api:
    """:class:`ServiceApi` on advapi32.dll. Windows only: ServiceError elsewhere.

    ``dll`` and ``last_error`` replace the DLL and ``ctypes.get_last_error`` (GetLastError as
    saved by ctypes right after each call, since the DLL is loaded with ``use_last_error``) in
    the tests. The ctypes callbacks and the dispatch table are kept referenced for the life of
    the object: the SCM calls them long after the calls that handed them over.
    """

    def __init__(self, dll: Any = None, *, last_error: Optional[Callable[[], int]] = None) -> None:
        if dll is None:
            loader = getattr(ctypes, "WinDLL", None)
            if loader is None or not hasattr(ctypes, "WINFUNCTYPE"):
                raise ServiceError("the Windows service API (advapi32.dll) exists only on Windows; "
                                   "--windows-service is for the Windows Service Control Manager")
            dll = loader("advapi32", use_last_error=True)
        get_last_error = last_error or getattr(ctypes, "get_last_error", None)
        if get_last_error is None:
            raise ServiceError("ctypes.get_last_error exists only on Windows: pass last_error")
        self._last_error: Callable[[], int] = get_last_error
        self._dll = dll
        self._keep: List[Any] = []
        dll.StartServiceCtrlDispatcherW.argtypes = [ctypes.POINTER(SERVICE_TABLE_ENTRYW)]
        dll.StartServiceCtrlDispatcherW.restype = BOOL
        dll.RegisterServiceCtrlHandlerExW.argtypes = [ctypes.c_wchar_p, LPHANDLER_FUNCTION_EX, LPVOID]
        dll.RegisterServiceCtrlHandlerExW.restype = SERVICE_STATUS_HANDLE
        dll.SetServiceStatus.argtypes = [SERVICE_STATUS_HANDLE, ctypes.POINTER(SERVICE_STATUS)]
        dll.SetServiceStatus.restype = BOOL

    def start_dispatcher(self, name: str, service_main: Callable[[List[str]], None]) -> None:
        def main(argc: int, argv: Any) -> None:
            try:
                service_main([argv[i] for i in range(argc)] if argv else [])
            except BaseException:  # noqa: BLE001 - nothing may escape into the SCM's thread
                LOG.exception("the service main function failed")

        proc = LPSERVICE_MAIN_FUNCTIONW(main)
        table = (SERVICE_TABLE_ENTRYW * 2)()  # the second entry stays NULL: the end of the table
        table[0].lpServiceName = name
        table[0].lpServiceProc = proc
        self._keep.extend((proc, table))
        if not self._dll.StartServiceCtrlDispatcherW(table):
            raise ServiceApiError("StartServiceCtrlDispatcherW", self._last_error())

    def register_handler(self, name: str, handler: Callable[[int, int], int]) -> int:
        def handler_ex(control: int, event_type: int, _event_data: Any, _context: Any) -> int:
            try:
                return handler(control, event_type)
            except BaseException:  # noqa: BLE001 - nothing may escape into the dispatcher
                LOG.exception("the service control handler failed (control %d)", control)
                return NO_ERROR

        proc = LPHANDLER_FUNCTION_EX(handler_ex)
        self._keep.append(proc)
        handle = self._dll.RegisterServiceCtrlHandlerExW(name, proc, None)
        if not handle:
            raise ServiceApiError("RegisterServiceCtrlHandlerExW", self._last_error())
        return int(handle)

    def set_status(self, handle: int, state: int, controls_accepted: int, win32_exit_code: int,
                   service_exit_code: int, checkpoint: int, wait_hint: int) -> None:
        status = SERVICE_STATUS(SERVICE_WIN32_OWN_PROCESS, state, controls_accepted, win32_exit_code,
                                service_exit_code, checkpoint, wait_hint)
        if not self._dll.SetServiceStatus(handle, ctypes.byref(status)):
            raise ServiceApiError("SetServiceStatus", self._last_error())
