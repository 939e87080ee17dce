"""The proxy setting: parsing, where it comes from, which hosts use it (no sockets here; the
CONNECT path runs against a real tinyproxy in tests/faults/test_proxy.py)."""

from __future__ import annotations

import pytest

from go2cloud_client.config import load_config
from go2cloud_client.errors import ConfigError, UsageError
from go2cloud_client.home import Home
from go2cloud_client.proxy import (
    ProxySettings,
    parse_proxy_url,
    refused,
    settings_at_import,
    settings_of,
)


def test_parse_proxy_url_keeps_credentials_out_of_display():
    p = parse_proxy_url("http://us%40er:p%3Ass@proxy.example:3128")
    assert (p.host, p.port, p.username, p.password) == ("proxy.example", 3128, "us@er", "p:ss")
    assert p.display == "http://proxy.example:3128"
    assert "p:ss" not in repr(p) and "p%3Ass" not in repr(p)
    assert parse_proxy_url(p.url) == p
    assert p.authorization() == "Basic dXNAZXI6cDpzcw=="  # base64 of us@er:p:ss
    assert parse_proxy_url("10.0.0.1:8080").display == "http://10.0.0.1:8080"
    assert parse_proxy_url("http://[fd00::1]:3128").display == "http://[fd00::1]:3128"
    bare = parse_proxy_url("http://proxy")
    assert bare.port == 80 and bare.authorization() is None


@pytest.mark.parametrize("bad, why", [
    ("https://proxy:3128", "http://"), ("socks5://proxy:1080", "http://"), ("http://:3128", "host"),
    ("http://proxy:3128/path", "no path"), ("http://proxy:99999", "port"),
])
def test_parse_proxy_url_refuses(bad, why):
    with pytest.raises(ValueError, match=why):
        parse_proxy_url(bad)


def test_config_key_env_and_flag(tmp_path):
    home = Home(tmp_path / "h")
    home.ensure()
    home.config_file.write_text("proxy: http://file:3128\nno_proxy: .internal\n")
    assert load_config(home, environ={}).proxy == "http://file:3128"
    cfg = load_config(home, environ={"GO2CLOUD_PROXY": "http://env:3128"})
    assert cfg.proxy == "http://env:3128" and cfg.no_proxy == ".internal"
    cfg = load_config(home, environ={"GO2CLOUD_PROXY": "http://env:3128"}, flags={"proxy": "NONE"})
    assert cfg.proxy == "none"
    with pytest.raises(UsageError, match="--proxy must be an http:// proxy URL"):
        load_config(home, environ={}, flags={"proxy": "https://p:1"})
    home.config_file.write_text("proxy: ftp://x\n")
    with pytest.raises(ConfigError, match="key 'proxy'"):
        load_config(home, environ={})


def test_settings_at_import_and_after():
    env = {"https_proxy": "http://std:3128", "NO_PROXY": "10.0.0.0/8"}
    assert settings_at_import(None, None, env) == ProxySettings("http://std:3128", "10.0.0.0/8")
    assert settings_at_import("http://mine:1", None, env) == ProxySettings("http://mine:1", "10.0.0.0/8")
    assert settings_at_import("none", None, env).proxy == ""  # "none" turns the environment's off
    assert settings_at_import(None, None, {"ALL_PROXY": "http://all:1"}).proxy == "http://all:1"
    assert settings_at_import(None, None, {"http_proxy": "http://plain:1"}).proxy == ""
    recorded = {"proxy": "http://rec:3128", "no_proxy": ".lan"}
    assert settings_of(None, None, recorded) == ProxySettings("http://rec:3128", ".lan")
    assert settings_of("none", None, recorded).proxy == ""
    assert settings_of(None, None, {}) == ProxySettings()


def test_for_host_honours_no_proxy():
    s = ProxySettings("http://p:3128", "cp.example,.lan,192.168.0.0/16")
    assert s.for_host("cp.example") is None and s.for_host("db.lan") is None
    assert s.for_host("192.168.4.5") is None
    assert s.for_url("https://other.example:8443/rsync/v1/tasks/t").display == "http://p:3128"
    assert ProxySettings().for_host("anything") is None


def test_refusal_messages_say_what_to_do():
    bare, creds = parse_proxy_url("http://p:3128"), parse_proxy_url("http://u:pw@p:3128")
    err = refused(bare, "cp:443", 407, "Proxy Authentication Required")
    assert err.exit_code == 16 and err.code == "proxy_refused" and err.status == 407
    assert "http://p:3128 refused the connection to cp:443 (HTTP 407" in str(err)
    assert "none were given" in str(err)
    err = refused(creds, "cp:443", 407, "Proxy Authentication Required")
    assert "refused the user name and password" in str(err) and "pw" not in str(err)
    err = refused(bare, "cp:443", 403, "Access violation")
    assert "does not allow CONNECT to cp:443" in str(err)


def test_the_tunnels_refusal_line_is_recognised_by_the_file_replicator():
    """The rsync tunnel prints the ProxyRefusedError on stderr; the replicator turns that line
    back into the same error (exit 16), not into a retried connection failure."""
    from go2cloud_client.replication.rsync import _PROXY_REFUSED_RE

    err = refused(parse_proxy_url("http://p:3128"), "cp:8443", 403, "Forbidden")
    line = "go2cloud rsync tunnel: " + str(err)
    m = _PROXY_REFUSED_RE.search(line)
    assert m is not None and m.group(2) == "403" and m.group(1).startswith("the proxy http://p:3128 refused")
