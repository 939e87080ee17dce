"""``go2cloud_client check``: the drill on its own, without importing.

Uses the imported source's control plane when the home holds an import (``--server`` overrides
it); prints the items grouped by severity with their fix (or the report with ``--json``) and exits
with :class:`~go2cloud_client.errors.DrillCriticalError` (35) when an item is critical.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Tuple

import click

from go2cloud_client.config import load_config
from go2cloud_client.drill.checks import Target
from go2cloud_client.drill.model import format_report
from go2cloud_client.drill.runner import build_context, parse_host_port, run_drill
from go2cloud_client.errors import ConfigError, DrillCriticalError, UsageError
from go2cloud_client.home import Home, resolve_home
from go2cloud_client.proxy import ProxySettings, settings_at_import, settings_of

LOG = logging.getLogger(__name__)


def _imported_server(home: Home) -> Tuple[Optional[str], Optional[str]]:
    try:
        source = home.imported_source() or {}
    except ConfigError:
        return None, None
    return source.get("server"), source.get("server_fingerprint")


def _proxy(home: Home) -> ProxySettings:
    """The proxy the agent of ``home`` uses (configured, else recorded at import, else the
    standard environment)."""
    try:
        config = load_config(home)
        source = home.imported_source() or {}
    except ConfigError:
        return settings_at_import(None, None, os.environ)
    if source.get("proxy") or config.proxy:
        return settings_of(config.proxy, config.no_proxy, source)
    return settings_at_import(config.proxy, config.no_proxy, os.environ)


@click.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--mode", type=click.Choice(["file", "block"]), default="file", show_default=True,
              help="Migration mode to check for.")
@click.option("--path", "paths", multiple=True, metavar="P",
              help="Mode file: a path to migrate (repeat; default /).")
@click.option("--disk", "disks", multiple=True, metavar="D",
              help="Mode block: a disk or image to migrate (repeat).")
@click.option("--snapshot", metavar="BACKEND",
              help="Mode block: the snapshot backend to check (default auto).")
@click.option("--server", metavar="URL", help="Control plane URL (default: the imported source's).")
@click.option("--server-fingerprint", metavar="sha256:HEX", help="Pin the control plane's certificate.")
@click.option("--target", "targets", multiple=True, metavar="HOST:PORT",
              help="A target port the migration needs, e.g. the control plane's HTTPS port (repeat).")
@click.option("--home", "home_dir", metavar="DIR", help="Agent home (env GO2CLOUD_HOME).")
@click.pass_context
def check(ctx: click.Context, as_json: bool, mode: str, paths: Tuple[str, ...], disks: Tuple[str, ...],
          snapshot: Optional[str], server: Optional[str], server_fingerprint: Optional[str],
          targets: Tuple[str, ...], home_dir: Optional[str]) -> Any:
    """Run the drill on this host: is it ready to be migrated? Exit 35 when an item is critical."""
    home = Home(resolve_home(home_dir or (ctx.obj or {}).get("home_dir")))
    if mode == "block" and not disks:
        raise UsageError("--mode block needs at least one --disk (a block device or image file)")
    if mode == "file" and disks:
        raise UsageError("--disk is for --mode block; mode file takes --path")
    fingerprint = server_fingerprint
    if not server:
        server, saved_fp = _imported_server(home)
        fingerprint = fingerprint or saved_fp
    parsed = []
    for value in targets:
        try:
            host, port = parse_host_port(value)
        except ValueError as exc:
            raise UsageError(f"--target: {exc}") from None
        parsed.append(Target("target", host, port))
    drill_ctx = build_context(mode=mode, paths=list(paths) or (["/"] if mode == "file" else []),
                              disks=list(disks), snapshot=snapshot, home=str(home.root), server_url=server,
                              fingerprint=fingerprint, targets=parsed, proxy=_proxy(home))
    report = run_drill(drill_ctx).to_dict()
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        click.echo(format_report(report))
    if not report["passed"]:
        raise DrillCriticalError(f"the drill found {report['summary']['critical']} critical item(s): fix "
                                 "them before migrating (see the fixes above)")
    return 0
