from __future__ import annotations

import json

import pytest
import responses
from click.testing import CliRunner

from go2cloud_client import cli as cli_mod
from go2cloud_client import lifecycle
from go2cloud_client.identity import Identity
from go2cloud_client.platform import distros

pytestmark = pytest.mark.usefixtures("reset_logging")


@pytest.fixture
def rsync_present(monkeypatch):
    monkeypatch.setattr("go2cloud_client.replication.rsync.find_rsync", lambda: "/usr/bin/rsync")


def run(capsys, *argv):
    code = cli_mod.run(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_version():
    result = CliRunner().invoke(cli_mod.cli, ["--version"])
    assert result.exit_code == 0 and "0.1.0" in result.output


def test_status_json_on_empty_home(tmp_path):
    result = CliRunner().invoke(cli_mod.cli, ["--home", str(tmp_path / "none"), "status", "--json"])
    assert result.exit_code == 0
    doc = json.loads(result.output)
    assert doc["imported"] is False and doc["running"] is False and doc["source_id"] is None
    assert not (tmp_path / "none").exists()  # status never creates the home


def test_status_human_and_subcommand_home(tmp_path):
    result = CliRunner().invoke(cli_mod.cli, ["status", "--home", str(tmp_path)])
    assert result.exit_code == 0 and "Not imported" in result.output


def test_abort_with_nothing_imported(tmp_path, capsys):
    code, out, _ = run(capsys, "--home", str(tmp_path / "h"), "--abort")
    assert code == 0 and "Nothing to abort" in out
    (tmp_path / "h2").mkdir()
    code, out, _ = run(capsys, "--home", str(tmp_path / "h2"), "--abort")
    assert code == 0 and "Nothing to abort" in out


def test_abort_forgets_import(home, capsys):
    Identity.generate().save(home)
    home.write_state(home.source_file, {"source_id": "s-old1", "server": "https://x"})
    home.write_state(home.task_file, {"task_id": "t-1"})
    code, out, _ = run(capsys, "--home", str(home.root), "--abort")
    assert code == 0 and "s-old1" in out
    assert not home.key_file.exists() and not home.source_file.exists() and not home.task_file.exists()
    assert home.previous_source_id() == "s-old1"


def test_no_prompt_names_missing_flags(tmp_path, capsys, rsync_present):
    code, _, err = run(capsys, "--home", str(tmp_path / "h"), "--no-prompt")
    assert code == 2
    assert err.startswith("error: ") and "--server" in err and "--token-id" in err and "--token-code" in err


def test_plain_http_server_refused(tmp_path, capsys):
    code, _, err = run(capsys, "--home", str(tmp_path / "h"), "--server", "http://10.1.2.3", "--no-prompt")
    assert code == 2 and "--server" in err


def test_rsync_missing_no_prompt_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GO2CLOUD_TOKEN_CODE", "c")
    monkeypatch.setattr("go2cloud_client.replication.rsync.find_rsync", lambda: None)
    monkeypatch.setattr("go2cloud_client.platform.distro", lambda: distros.Debian({"ID": "debian"}))
    code, _, err = run(capsys, "--home", str(tmp_path / "h"), "--server", "https://cp.example",
                       "--token-id", "at-1", "--no-prompt")
    assert code == 30 and "apt-get -y install rsync" in err and "--yes" in err


@responses.activate
def test_wrong_code_exit_code_and_nothing_kept(tmp_path, capsys, rsync_present, monkeypatch):
    monkeypatch.setenv("GO2CLOUD_TOKEN_CODE", "very-secret-code")
    responses.add(responses.POST, "https://cp.example/api/v1/sources/import", status=403,
                  json={"error": {"code": "code_unknown", "message": "unknown activation code"}})
    home = tmp_path / "h"
    code, out, err = run(capsys, "--home", str(home), "--server", "https://cp.example", "--accesstokenid",
                         "at-1", "--no-prompt")
    assert code == 20 and err.startswith("error: ") and "token id" in err
    assert not (home / "identity" / "key.pem").exists()
    assert "very-secret-code" not in (home / "Logs" / "go2cloud_client.log").read_text() + out + err


def test_unexpected_error_is_logged_not_shown(tmp_path, capsys, monkeypatch):
    def boom(home):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(lifecycle, "collect_status", boom)
    code, _, err = run(capsys, "--home", str(tmp_path), "status")
    assert code == 1 and "unexpected internal error, see" in err and "kaboom" not in err


def test_bad_option_is_usage_exit_2(capsys):
    assert cli_mod.run(["--frobnicate"]) == 2
