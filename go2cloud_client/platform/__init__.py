"""Operating-system differences, chosen once at import.

Everything that depends on the OS (os-release, machine id, block devices, boot mode, file locks,
signals to process groups, the default agent home, SELinux, the service manager) is behind the
functions re-exported here.
Nothing outside this package looks at ``sys.platform`` or reads ``/etc/os-release``.
"""

from __future__ import annotations

import sys

if sys.platform.startswith("win"):  # pragma: no cover - untested on Windows
    from go2cloud_client.platform import windows as _impl
else:
    from go2cloud_client.platform import linux as _impl

from go2cloud_client.platform.distros import Distro, distro_for

NAME: str = _impl.NAME
#: Whether file-level replication (rsync) can run on this OS.
SUPPORTS_FILE_MODE: bool = _impl.SUPPORTS_FILE_MODE

os_release = _impl.os_release
kernel = _impl.kernel
arch = _impl.arch
boot_mode = _impl.boot_mode
read_machine_id = _impl.read_machine_id
block_devices = _impl.block_devices
mounted_device = _impl.mounted_device
system_home = _impl.system_home
lock_exclusive = _impl.lock_exclusive
unlock = _impl.unlock
pid_alive = _impl.pid_alive
terminate_pid = _impl.terminate_pid
kill_process_group = _impl.kill_process_group
graceful_signals = _impl.graceful_signals
root_block_device = _impl.root_block_device
# SELinux (None / no-ops where it does not exist)
selinux_mode = _impl.selinux_mode
selinux_config_mode = _impl.selinux_config_mode
selinux_config_path = _impl.selinux_config_path
set_selinux_runtime = _impl.set_selinux_runtime
set_selinux_config = _impl.set_selinux_config
# service mode: systemd unit (Linux) or Windows service (sc.exe)
SERVICE_NAME: str = _impl.SERVICE_NAME
service_manager_running = _impl.service_manager_running
service_paths = _impl.service_paths
service_home = _impl.service_home
service_status_hint = _impl.service_status_hint
service_install = _impl.service_install
service_uninstall = _impl.service_uninstall
service_stop = _impl.service_stop
service_state = _impl.service_state
#: --windows-service: the agent under the Windows Service Control Manager (UsageError elsewhere)
run_windows_service = _impl.run_windows_service
#: a secret read from the environment (the token code) removed from it, also from what other
#: processes can read of it (/proc/PID/environ)
forget_environment_secret = _impl.forget_environment_secret


def distro() -> Distro | None:
    """The distribution class of this host (package manager commands), or None if unknown."""
    return distro_for(os_release())


__all__ = [
    "NAME", "SUPPORTS_FILE_MODE", "Distro", "arch", "block_devices", "boot_mode", "distro",
    "distro_for", "graceful_signals", "kernel", "kill_process_group", "lock_exclusive", "mounted_device",
    "os_release", "pid_alive", "read_machine_id", "system_home", "terminate_pid", "unlock",
    "root_block_device", "selinux_mode", "selinux_config_mode", "selinux_config_path",
    "set_selinux_runtime", "set_selinux_config", "SERVICE_NAME", "service_manager_running",
    "service_paths", "service_home", "service_status_hint", "service_install", "service_uninstall",
    "service_stop", "service_state",
    "run_windows_service",
]
