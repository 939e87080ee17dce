"""The server's one process gateway (go2cloud_server/proc.py): a minimal environment (no secret
of the server's reaches a child), argument lists only, a timeout that kills the child's group."""

from __future__ import annotations

import json
import sys

import pytest

from go2cloud_server import proc
from go2cloud_server.children import Children

pytestmark = pytest.mark.allow_subprocess

PRINT_ENV = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]
SECRETS = {"GO2CLOUD_TOKEN_CODE": "tc-123", "GO2CLOUD_ADMIN_TOKEN": "adm-456",
           "DB_PASSWORD": "pw-789", "AWS_SECRET_ACCESS_KEY": "sk-000"}


@pytest.fixture
def secret_env(monkeypatch):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GO2CLOUD_HARMLESS", "1")


def _child_env(out: bytes) -> dict:
    return json.loads(out.decode().strip().splitlines()[-1])


def test_run_gives_the_child_only_path_and_the_c_locale(secret_env):
    rc, out = proc.run(PRINT_ENV, timeout=60)
    assert rc == 0
    env = _child_env(out)
    assert not set(SECRETS) & set(env)
    assert not any(value in out.decode() for value in SECRETS.values())
    assert env.get("LC_ALL") == "C" and env.get("PATH")
    assert "GO2CLOUD_HARMLESS" not in env  # minimal: nothing is inherited but PATH


def test_a_recorded_child_of_the_registry_gets_no_secret_either(secret_env, tmp_path):
    rc, out = Children(tmp_path / "run").run(PRINT_ENV, timeout=60)
    assert rc == 0
    assert not set(SECRETS) & set(_child_env(out))
    assert list((tmp_path / "run").glob("*.json")) == []  # forgotten once it ended


def test_spawn_adds_only_what_the_caller_passes(secret_env):
    child = proc.spawn(PRINT_ENV, env={"RSYNC_PASSWORD": "given-on-purpose"}, stdout=proc.PIPE)
    out, _ = child.communicate(timeout=60)
    env = _child_env(out)
    assert env["RSYNC_PASSWORD"] == "given-on-purpose"
    assert not set(SECRETS) & set(env)


def test_run_refuses_a_shell_string_and_kills_a_child_that_outlives_its_timeout():
    with pytest.raises(TypeError):
        proc.run("echo hi", timeout=5)
    with pytest.raises(proc.TimeoutExpired):
        proc.run(["sleep", "600"], timeout=0.2)


def test_a_missing_program_is_file_not_found():
    with pytest.raises(FileNotFoundError):
        proc.run(["/nonexistent/go2cloud-no-such-program"], timeout=5)


def test_run_gives_the_child_its_input_or_a_closed_stdin():
    """sfdisk reads its script on stdin (imagebuild): ``input`` is what the child reads; without
    it the child's stdin is closed (it reads nothing, never the server's terminal)."""
    echo = [sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read().upper())"]
    assert proc.run(echo, timeout=30, input=b"label: dos\n") == (0, b"LABEL: DOS\n")
    assert proc.run(echo, timeout=30) == (0, b"")


def test_no_other_server_module_imports_subprocess():
    """The one way to run a process (docs/architecture.md): a module that imported subprocess
    itself would give its children the server's whole environment (the admin token included)."""
    import ast
    from pathlib import Path

    root = Path(proc.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "proc.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "subprocess" or n.startswith("subprocess.") for n in names):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []
