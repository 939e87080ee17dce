"""snapshot_driver's process gateway (snapshot_driver/_proc.py) keeps the caller's secrets from
its children: a real child prints the environment it was given."""

from __future__ import annotations

import json
import sys

import pytest

from snapshot_driver import _proc

PRINT_ENV = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]
SECRETS = {"GO2CLOUD_TOKEN_CODE": "tc-123", "RSYNC_PASSWORD": "pw-456", "db_password": "pw-789",
           "GO2CLOUD_ADMIN_TOKEN": "adm-000", "AWS_SECRET_ACCESS_KEY": "sk-111"}


@pytest.fixture
def secret_env(monkeypatch):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LVM_SUPPRESS_FD_WARNINGS", "1")


def test_run_passes_the_environment_without_secrets(secret_env):
    res = _proc.run(PRINT_ENV, timeout=60)
    env = json.loads(res.stdout)
    assert not set(SECRETS) & set(env)
    assert not any(value in res.stdout for value in SECRETS.values())
    assert env["LVM_SUPPRESS_FD_WARNINGS"] == "1"  # the rest is inherited (lvm reads its own)
    assert env["LC_ALL"] == "C" and env["PATH"]


def test_a_guard_process_gets_no_secret_either(secret_env, tmp_path):
    out = tmp_path / "env.json"
    script = ("import json, os, sys; open(sys.argv[1], 'w').write(json.dumps(dict(os.environ))); "
              "sys.stdin.read()")
    guard = _proc.start_guard([sys.executable, "-c", script, str(out)])
    try:
        assert guard.stdin is not None
        guard.stdin.close()  # the signal the guard waits for
        assert guard.wait(timeout=60) == 0
    finally:
        if guard.poll() is None:
            guard.kill()
            guard.wait()
    env = json.loads(out.read_text())
    assert not set(SECRETS) & set(env)
