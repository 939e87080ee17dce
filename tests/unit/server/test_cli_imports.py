"""``go2cloud_server <command> --help`` imports click and the command tree, nothing of the server
and not the operator client (issue 16: operator commands start fast). No timing here: the
modules a real ``python -X importtime -m go2cloud_server ...`` lists are checked by name, so the
test fails when an import at the top of cli.py (or of a module it imports) brings one back.
Timings are measured by bench/bench_startup.py (docs/performance.md)."""

from __future__ import annotations

import pytest

from go2cloud_server import rules, space, throttle, tls
from go2cloud_server.opclient import CERT_FILE
from tests.support.importcheck import RUN_ONLY, SERVER_ONLY, heavy, imported, stderr_text

pytestmark = pytest.mark.allow_subprocess

HELPS = [
    ["--help"],
    ["serve", "--help"],
    ["workgroup", "--help"],
    ["code", "--help"],
    ["source", "--help"],
    ["source", "list", "--help"],
    ["migration", "--help"],
    ["migration", "start", "--help"],
    ["migration", "modify", "--help"],
    ["drill", "show", "--help"],
]


@pytest.mark.parametrize("args", HELPS, ids=" ".join)
def test_help_imports_nothing_of_the_server_nor_the_client(args):
    proc, mods = imported(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Usage: go2cloud_server"), proc.stdout
    assert heavy(mods, SERVER_ONLY + RUN_ONLY) == set()


def test_the_check_sees_a_heavy_import():
    """The check is not blind: an operator command that runs (here it stops at its --server
    check, before any connection) does import the client."""
    proc, mods = imported("workgroup", "list", "--server", "ftp://127.0.0.1")
    assert proc.returncode == 2 and "must start with https://" in stderr_text(proc), proc.stderr
    assert heavy(mods, RUN_ONLY) >= {"go2cloud_server.opclient", "http.client", "ssl"}
    assert heavy(mods, SERVER_ONLY) == set()


def test_usage_errors_are_still_one_line_with_exit_2():
    proc, mods = imported("workgroup", "list", "--bogus-flag")
    assert proc.returncode == 2
    assert stderr_text(proc) == (
        "error: no such option '--bogus-flag' (see 'go2cloud_server workgroup list --help')\n"
    )
    assert heavy(mods, SERVER_ONLY + ("go2cloud_server.opclient",)) == set()


def test_serve_defaults_come_from_the_modules_that_use_them():
    """cli.py reads these from rules (cheap) instead of throttle and space (the server's)."""
    assert throttle.IMPORT_WINDOW_S == rules.IMPORT_WINDOW_S == 300.0
    assert throttle.IMPORT_FAILURES_PER_ADDRESS == rules.IMPORT_FAILURES_PER_ADDRESS == 10
    assert space.DEFAULT_RESERVE_MIB == rules.DB_RESERVE_MIB == 64


def test_the_client_finds_the_certificate_serve_writes(tmp_path):
    assert tmp_path / CERT_FILE == tls.paths(tmp_path / "tls")[0]

