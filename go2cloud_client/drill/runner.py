"""Run the drill: every check of :data:`~go2cloud_client.drill.checks.ALL_CHECKS` against one
:class:`~go2cloud_client.drill.checks.Context`, into a :class:`~go2cloud_client.drill.model.Report`.

A check that raises does not stop the drill: it becomes a ``warning`` item saying the check could
not run (a bug or an unexpected host must not block a migration on its own).
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from go2cloud_client import __version__
from go2cloud_client.clock import utc_now
from go2cloud_client.drill.checks import ALL_CHECKS, Context, Target
from go2cloud_client.drill.model import Item, Report, warning
from go2cloud_client.proxy import ProxySettings

LOG = logging.getLogger(__name__)

CheckFn = Callable[[Context], List[Item]]


def run_drill(ctx: Context, checks: Sequence[Tuple[str, CheckFn]] = ALL_CHECKS) -> Report:
    report = Report(mode=ctx.mode, agent_version=__version__, hostname=socket.gethostname())
    for name, check in checks:
        try:
            items = check(ctx)
        except Exception as exc:  # noqa: BLE001 - one broken check must not stop the drill
            LOG.warning("drill check %s failed: %s", name, exc)
            LOG.debug("drill check %s", name, exc_info=True)
            items = [warning(name, f"the check could not run: {type(exc).__name__}: {exc}",
                             "run 'go2cloud_client check' on the host and send its output with the "
                             "agent log")]
        report.items.extend(items)
    report.finished_at = utc_now()
    LOG.info("drill (%s): %d critical, %d warning, %d info", ctx.mode, report.count("critical"),
             report.count("warning"), report.count("info"))
    return report


def parse_host_port(value: str) -> Tuple[str, int]:
    """``HOST:PORT`` / ``[V6]:PORT`` -> (host, port); ValueError when malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def server_clock(server_url: str, fingerprint: Optional[str], timeout: float = 10.0,
                 proxy: Optional[ProxySettings] = None) -> Callable[[], float]:
    """A function asking the control plane for its time (no authentication needed)."""

    def ask() -> float:
        from go2cloud_client.api import ControlPlane

        cp = ControlPlane(server_url, fingerprint=fingerprint, connect_timeout=timeout, read_timeout=timeout,
                          proxy=proxy)
        try:
            return cp.server_time()
        finally:
            cp.close()

    return ask


def build_context(*, mode: str, paths: Sequence[str] = (), disks: Sequence[str] = (),
                  snapshot: Optional[str] = None, home: Optional[str] = None,
                  server_url: Optional[str] = None, fingerprint: Optional[str] = None,
                  targets: Sequence[Target] = (), rsync_path: Optional[str] = None,
                  server_time: Optional[Callable[[], float]] = None,
                  proxy: Optional[ProxySettings] = None) -> Context:
    """The context of a drill on this host (defaults of :class:`Context` for the rest).
    ``server_time`` defaults to asking ``server_url`` with a fresh pinned connection."""
    if server_time is None and server_url:
        server_time = server_clock(server_url, fingerprint, proxy=proxy)
    return Context(mode=mode, paths=tuple(paths), disks=tuple(disks), snapshot=snapshot,
                   home=Path(home or "."), server_url=server_url, server_time=server_time,
                   targets=tuple(targets), rsync_path=rsync_path, proxy=proxy)
