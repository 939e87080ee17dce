"""The process gateway with real child processes."""

from __future__ import annotations

import os
import sys
import time

import psutil
import pytest

from go2cloud_client import subp

pytestmark = pytest.mark.integration


def test_run_returns_output_and_refuses_shell_strings():
    r = subp.run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
    assert (r.returncode, r.stdout, r.stderr) == (0, "out\n", "err\n")
    with pytest.raises(TypeError):
        subp.run("echo hi")  # type: ignore[arg-type]


def test_run_error_carries_command_code_and_stderr():
    with pytest.raises(subp.ProcessError) as err:
        subp.run([sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"])
    e = err.value
    assert e.returncode == 3 and "boom" in e.stderr and e.cmd[0] == sys.executable
    assert "exited with status 3" in str(e) and "boom" in str(e)
    assert subp.run([sys.executable, "-c", "raise SystemExit(3)"], rcs=(0, 3)).returncode == 3


def test_missing_program_and_timeout_are_clear():
    with pytest.raises(subp.ProcessError, match="not installed"):
        subp.run(["/nonexistent/program-xyz"])
    with pytest.raises(subp.ProcessError, match="timed out"):
        subp.run([sys.executable, "-c", "import time; time.sleep(10)"], timeout=0.5)


def test_stdin_is_closed_and_data_is_passed():
    assert subp.run([sys.executable, "-c", "import sys; print(repr(sys.stdin.read()))"]).stdout == "''\n"
    assert subp.run(["cat"], data=b"abc").stdout == "abc"


def test_child_env_drops_secrets_and_adds_extra(monkeypatch):
    monkeypatch.setenv("MY_PASSWORD", "hunter2")
    monkeypatch.setenv("API_TOKEN", "t")
    monkeypatch.setenv("HARMLESS", "1")
    env = subp.child_env({"RSYNC_PASSWORD": "for-rsync-only"})
    assert "MY_PASSWORD" not in env and "API_TOKEN" not in env
    assert env["HARMLESS"] == "1" and env["RSYNC_PASSWORD"] == "for-rsync-only" and env["LC_ALL"] == "C"
    out = subp.run([sys.executable, "-c", "import os; print(os.environ.get('MY_PASSWORD'))"]).stdout
    assert out == "None\n"


def test_streaming_splits_carriage_returns_and_collects_stderr():
    lines = []
    code = "import sys; sys.stdout.write('a\\rb\\nc'); sys.stdout.flush(); sys.stderr.write('e1\\n')"
    p = subp.StreamingProcess([sys.executable, "-c", code], on_line=lines.append)
    assert p.wait(timeout=10) == 0
    assert lines == ["a", "b", "c"]
    assert p.stderr == "e1\n"


def test_terminate_stops_the_whole_process_group():
    code = ("import subprocess, sys, time;"
            " subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            " print('started', flush=True); time.sleep(60)")
    lines = []
    p = subp.StreamingProcess([sys.executable, "-c", code], on_line=lines.append)
    deadline = time.monotonic() + 10
    while "started" not in lines and time.monotonic() < deadline:
        time.sleep(0.05)
    children = psutil.Process(p.pid).children(recursive=True)
    assert children, "the grandchild should be running"
    p.terminate(grace=2)
    p.wait(timeout=10)
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, "terminate() must stop grandchildren too"
    assert os.getpgid(os.getpid()) != p.pid  # the child had its own group; we did not kill ourselves
