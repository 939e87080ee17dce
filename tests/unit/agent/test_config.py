from __future__ import annotations

import pytest

from go2cloud_client.config import load_config
from go2cloud_client.errors import ConfigError, UsageError
from go2cloud_client.tlspin import normalize_fingerprint

FP = "sha256:" + "ab" * 32


def test_defaults(home):
    cfg = load_config(home, environ={})
    assert cfg.server is None and cfg.poll_wait_s == 25 and cfg.log_level == "INFO"


def test_layers_file_then_env_then_flags(home):
    home.config_file.write_text("server: https://file.example\npoll_wait_s: 10\nlog_level: debug\n")
    cfg = load_config(home, environ={})
    assert (cfg.server, cfg.poll_wait_s, cfg.log_level) == ("https://file.example", 10, "DEBUG")
    cfg = load_config(home, environ={"GO2CLOUD_SERVER": "https://env.example/"})
    assert cfg.server == "https://env.example" and cfg.poll_wait_s == 10
    cfg = load_config(home, environ={"GO2CLOUD_SERVER": "https://env.example"},
                      flags={"server": "https://flag.example", "log_level": None})
    assert cfg.server == "https://flag.example" and cfg.log_level == "DEBUG"


@pytest.mark.parametrize("text,key", [
    ("poll_wait_s: 61\n", "poll_wait_s"),
    ("poll_wait_s: yes\n", "poll_wait_s"),
    ("server: ftp://x\n", "server"),
    ("server_fingerprint: md5:00\n", "server_fingerprint"),
    ("log_level: LOUD\n", "log_level"),
])
def test_bad_file_value_names_the_key(home, text, key):
    home.config_file.write_text(text)
    with pytest.raises(ConfigError, match=key) as err:
        load_config(home, environ={})
    assert err.value.exit_code == 3


def test_unknown_key_and_bad_yaml(home):
    home.config_file.write_text("sever: https://x\n")
    with pytest.raises(ConfigError, match="sever"):
        load_config(home, environ={})
    home.config_file.write_text("server: [\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(home, environ={})


def test_bad_env_names_the_variable(home):
    with pytest.raises(ConfigError, match="GO2CLOUD_POLL_WAIT"):
        load_config(home, environ={"GO2CLOUD_POLL_WAIT": "-1"})


def test_bad_flag_is_usage_error(home):
    with pytest.raises(UsageError, match="--server-fingerprint"):
        load_config(home, environ={}, flags={"server_fingerprint": "sha256:zz"})


def test_plain_http_only_to_loopback(home):
    assert load_config(home, environ={}, flags={"server": "http://127.0.0.1:8080"}).server
    assert load_config(home, environ={}, flags={"server": "http://[::1]:8080"}).server
    with pytest.raises(UsageError, match="non-loopback"):
        load_config(home, environ={}, flags={"server": "http://10.0.0.1"})
    with pytest.raises(UsageError, match="credentials"):
        load_config(home, environ={}, flags={"server": "https://u:p@host"})


def test_fingerprint_normalised():
    colons = "SHA256:" + ":".join(["AB"] * 32)
    assert normalize_fingerprint(colons) == FP


def test_several_control_plane_urls(home):
    cfg = load_config(home, environ={"GO2CLOUD_SERVER": "https://a.example/, https://b.example:8443,https://a.example"})
    assert cfg.server == "https://a.example,https://b.example:8443"
    with pytest.raises(UsageError, match="http://b.example: uses plain http://"):
        load_config(home, environ={}, flags={"server": "https://a.example,http://b.example"})
    with pytest.raises(ConfigError, match="at most 8"):
        load_config(home, environ={"GO2CLOUD_SERVER": ",".join(f"https://h{i}.example" for i in range(9))})


def test_the_cli_joins_repeated_server_options(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from go2cloud_client import cli as cli_mod

    seen = {}
    monkeypatch.setattr(cli_mod.lifecycle, "run_foreground",
                        lambda home, flags, **kw: seen.update(flags) or 0)
    CliRunner().invoke(cli_mod.cli, ["--home", str(tmp_path), "--server", "https://a.example",
                                     "--server", "https://b.example"])
    assert seen["server"] == "https://a.example,https://b.example"
