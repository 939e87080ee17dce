"""Service mode: the agent under the host's service manager, and stopping a running agent.

``service install`` writes the systemd unit (Linux) or creates the Windows service (sc.exe) that
runs ``<exe> --home <home> --no-prompt``: the agent then survives logout, SSH disconnects and
reboots, and resumes its task by itself when it starts. What differs per OS (unit text,
systemctl, sc.exe) is in :mod:`go2cloud_client.platform`; this module decides what to run and
tells the operator what happened.

Where systemd does not run (containers, chroots), the unit and the ``multi-user.target.wants``
symlink are still written, and the agent is started detached (own session, stdio on
/dev/null) so that it outlives the shell: nothing restarts it after a crash or a reboot there,
and the operator is told so.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

import psutil

from go2cloud_client import platform, subp
from go2cloud_client.atomicfile import atomic_write
from go2cloud_client.console import Console
from go2cloud_client.errors import AgentStopError, NotImportedError, ServiceError
from go2cloud_client.home import HOME_ENV, Home, lock_held
from go2cloud_client.proxy import ProxySettings

LOG = logging.getLogger(__name__)

#: How long ``stop`` waits for a graceful exit before SIGKILL (the contract says 30 s).
STOP_WAIT_S = 30.0
KILL_WAIT_S = 10.0
#: How long ``service install`` waits for a detached agent to hold its home lock.
START_WAIT_S = 30.0
#: How long it waits for the agent of a service that the service manager reports running: a slow
#: host (an old CPU, a VM under software emulation) can take a minute to unpack and start the
#: packaged executable; measured 40 s in a qemu VM without KVM
SLOW_START_WAIT_S = 300.0
#: systemd sub-states of a unit whose agent is starting or running (anything else: it exited)
_STARTING = ("running", "start", "start-pre", "start-post")
#: the service's extra environment, in ``<home>/state`` (see :func:`write_service_env`)
SERVICE_ENV = "service.env"


def agent_argv(home: Path) -> List[str]:
    """The command the service runs: the frozen executable when frozen, else this Python with
    ``-m go2cloud_client`` (works for a pip install and a source checkout alike)."""
    if getattr(sys, "frozen", False):
        exe = [sys.executable]
    else:
        exe = [sys.executable, "-m", "go2cloud_client"]
    return [*exe, "--home", str(home), "--no-prompt"]


def running_pid(home: Home) -> Optional[int]:
    """The pid of the agent running with ``home``, or None."""
    if not home.exists():
        return None
    pid = home.read_pid()  # the pid file and the process first: probing the lock takes it briefly
    if not pid or not platform.pid_alive(pid):
        return None
    return pid if lock_held(home) else None


def _wait_unlocked(home: Home, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not lock_held(home):
            return True
        time.sleep(0.2)
    return not lock_held(home)


def stop_agent(home: Home, *, wait: float = STOP_WAIT_S) -> Optional[str]:
    """Stop the agent of ``home`` gracefully: SIGTERM, up to ``wait`` seconds, then SIGKILL.
    The import and the task are kept (the task resumes at the next start). Returns what was
    done, or None when no agent was running. AgentStopError when it cannot be stopped."""
    if not home.exists() or not lock_held(home):
        return None
    pid = home.read_pid()
    if not pid or not platform.pid_alive(pid):
        raise AgentStopError(
            f"an agent holds the lock of {home.root} but its pid is unknown; stop it by hand "
            "(see agent.pid) and try again")
    if platform.service_manager_running() and platform.service_home() == home.root:
        # under systemd with Restart=always a signal would only make systemd start it again
        try:
            platform.service_stop()
        except subp.ProcessError as exc:
            raise AgentStopError(f"stopping the service failed: {exc}") from exc
        if _wait_unlocked(home, KILL_WAIT_S):
            return (f"stopped the service {platform.SERVICE_NAME} (pid {pid}); it starts again at "
                    "boot, or now with: go2cloud_client service install")
    try:
        platform.terminate_pid(pid)
        if _wait_unlocked(home, wait):
            return f"stopped the agent (pid {pid})"
        platform.terminate_pid(pid, force=True)
        if _wait_unlocked(home, KILL_WAIT_S):
            return f"killed the agent (pid {pid}; it did not stop within {wait:.0f}s)"
    except PermissionError as exc:
        raise AgentStopError(f"cannot stop the agent (pid {pid}): permission denied; run as root") from exc
    raise AgentStopError(f"the agent (pid {pid}) did not exit even after SIGKILL")


def start_detached(home: Home, proxy: Optional[ProxySettings] = None) -> int:
    """Start ``agent_argv(home)`` detached and wait until it holds the home lock; its pid.
    ServiceError when it exits first (the reason is in its log)."""
    extra = {HOME_ENV: str(home.root)}
    if proxy is not None and proxy.proxy:
        extra.update(GO2CLOUD_PROXY=proxy.proxy, GO2CLOUD_NO_PROXY=proxy.no_proxy)
    env = subp.child_env(extra, lang_c=False)
    proc = subp.spawn_detached(agent_argv(home.root), env=env)
    pid = proc.pid
    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline:
        agent = home.read_pid()
        if agent and lock_held(home) and _started_by(agent, pid):
            return agent
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    else:
        raise ServiceError(f"the agent (pid {pid}) did not start within {START_WAIT_S:.0f}s; "
                           f"see {home.log_file}")
    raise ServiceError(f"the agent exited right after it was started; see {home.log_file}")


def _started_by(agent: int, spawned: int) -> bool:
    """Whether ``agent`` is the process we spawned or one it started: the packaged executable
    runs the agent two processes below (staticx's start-up code, then PyInstaller's, each
    waiting for its child and forwarding signals to it)."""
    if agent == spawned:
        return True
    try:
        return spawned in (p.pid for p in psutil.Process(agent).parents())
    except psutil.Error:
        return False


def wait_running(home: Home, seconds: float) -> Optional[int]:
    """The pid of the agent of ``home`` once it holds its lock, or None after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        pid = running_pid(home)
        if pid is not None or time.monotonic() >= deadline:
            return pid
        time.sleep(0.2)


def _wait_service_agent(home: Home, console: Console) -> int:
    """The pid of the service's agent once it holds its home lock. Waits START_WAIT_S, then, as
    long as the service manager says the service's process is up (a slow host), up to
    SLOW_START_WAIT_S in all; ServiceError at once when the service manager says it exited."""
    started = time.monotonic()
    pid = wait_running(home, START_WAIT_S)
    said = False
    while pid is None and time.monotonic() - started < SLOW_START_WAIT_S:
        state = platform.service_state()
        if state is None:
            break  # the service manager cannot tell: no reason to wait longer
        if state[1] not in _STARTING:
            raise ServiceError(
                f"the service {platform.SERVICE_NAME} was installed but its agent exited (service state "
                f"{state[0]}/{state[1]}); see {platform.service_status_hint()} and {home.log_file}")
        if not said:
            console.line(f"The agent is still starting after {START_WAIT_S:.0f}s (a slow host); "
                         f"waiting up to {SLOW_START_WAIT_S:.0f}s")
            said = True
        pid = wait_running(home, 2.0)
    if pid is None:
        raise ServiceError(
            f"the service {platform.SERVICE_NAME} was installed but its agent is not running after "
            f"{time.monotonic() - started:.0f}s; see {platform.service_status_hint()} and {home.log_file}")
    return pid


def write_service_env(home: Home, proxy: ProxySettings) -> Optional[Path]:
    """The service's extra environment (``<home>/state/service.env``, root only): the proxy
    setting, so the service's agent keeps it whatever its environment. None (and no file) when
    the agent connects directly."""
    path = home.state_dir / SERVICE_ENV
    if not proxy.proxy:
        path.unlink(missing_ok=True)
        return None
    lines = [f"GO2CLOUD_PROXY={_env_quote(proxy.proxy)}"]
    if proxy.no_proxy:
        lines.append(f"GO2CLOUD_NO_PROXY={_env_quote(proxy.no_proxy)}")
    atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"), mode=0o600)
    return path


def _env_quote(value: str) -> str:
    """A value of a systemd EnvironmentFile line: single quotes keep it as it is."""
    if "'" in value or "\n" in value:
        raise ServiceError("the proxy setting contains a quote or a line break; percent-encode it "
                           "(%27) in the proxy URL")
    return f"'{value}'"


def install(home: Home, console: Console, *, start: bool = True,
            proxy: Optional[ProxySettings] = None) -> None:
    """``service install``: idempotent (the unit is replaced and the agent restarted). ``proxy``:
    the setting the service's agent keeps (written into its environment)."""
    if home.imported_source() is None:
        raise NotImportedError(
            f"{home.root} is not imported yet: import first with go2cloud_client --home {home.root} "
            "--import-only --server URL --server-fingerprint sha256:... --token-id at-... "
            "(token code from $GO2CLOUD_TOKEN_CODE), then run service install again")
    installed = platform.service_home()
    if installed is not None and installed != home.root:
        console.line(f"Replacing the service of the home {installed} by the home {home.root}")
        stop_agent(Home(installed))
    was = stop_agent(home)  # a foreground agent of this home would hold the lock
    if was:
        console.line(was[0].upper() + was[1:])
    argv = agent_argv(home.root)
    env_file = write_service_env(home, proxy or ProxySettings())
    if env_file is not None:
        console.line(f"The service's agent connects {(proxy or ProxySettings()).describe()} ({env_file})")
    try:
        result = platform.service_install(argv, home.root, start=start, env_file=env_file)
    except (OSError, subp.ProcessError) as exc:
        raise ServiceError(f"installing the service failed: {exc}") from exc
    from go2cloud_client.host.changes import HostChangeJournal

    HostChangeJournal(home).replace("service_installed", unit=result["unit"], wants_link=result["wants_link"],
                              home=str(home.root))
    console.line(f"Installed the service {platform.SERVICE_NAME}: {result['unit']}")
    if result["managed"]:
        if not start:
            console.line("Enabled at boot; not started (--no-start)")
            return
        pid = _wait_service_agent(home, console)
        console.line(f"Enabled at boot and started (pid {pid})")
        return
    if result.get("wants_link"):
        console.line(f"Enabled at boot: {result['wants_link']}")
    if not start:
        console.line("systemd is not running on this host; the agent was not started (--no-start)")
        return
    pid = start_detached(home, proxy)
    console.line(f"systemd is not running on this host, so the agent was started without it "
                 f"(pid {pid}, detached); nothing restarts it after a crash or a reboot until "
                 "systemd runs the unit")


def remove_service_files(home: Optional[Home] = None) -> List[str]:
    """Stop the service's agent and remove the service (unit + symlink, or the Windows service).
    With ``home``: only when the installed service runs that home. Returns what was done."""
    installed = platform.service_home()
    unit, _ = platform.service_paths()
    if home is not None and installed is not None and installed != home.root:
        return [f"the installed service runs the home {installed}, not {home.root}; left in place"]
    done: List[str] = []
    if not platform.service_manager_running() and installed is not None:
        was = stop_agent(Home(installed))
        if was:
            done.append(was)
    try:
        done.extend(platform.service_uninstall())
    except (OSError, subp.ProcessError) as exc:
        raise ServiceError(f"removing the service ({unit}) failed: {exc}") from exc
    return done


def uninstall(home: Home, console: Console) -> List[str]:
    """``service uninstall``: stop the agent, remove the service, forget it in the host change journal."""
    from go2cloud_client.host.changes import HostChangeJournal

    done = remove_service_files(home)
    if home.exists():
        HostChangeJournal(home).forget_kind("service_installed")
    for line in done:
        console.line(line[0].upper() + line[1:])
    if not done:
        console.line("No service is installed")
    return done
