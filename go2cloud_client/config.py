"""Layered, typed agent configuration.

Sources, later wins: ``<home>/config.yaml``, then environment variables, then command-line flags.
Every value is validated into :class:`Config`; a bad value is an error that names the key and
where it came from (ConfigError for the file and the environment, UsageError for flags), never
a silent default. Secrets (token code) are not configuration and are never read from the file.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Mapping, Optional
from urllib.parse import urlsplit

import yaml

from go2cloud_client.errors import ConfigError, UsageError
from go2cloud_client.home import Home
from go2cloud_client.proxy import validate_setting
from go2cloud_client.tlspin import is_loopback_host, normalize_fingerprint

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Config:
    server: Optional[str] = None
    server_fingerprint: Optional[str] = None
    log_level: str = "INFO"
    #: Long-poll duration for commands (protocol: 0-60 s).
    poll_wait_s: int = 25
    #: Connect timeout for control-plane requests.
    connect_timeout_s: float = 15.0
    #: Read timeout for control-plane requests (the long poll adds its wait to this).
    read_timeout_s: float = 30.0
    #: rsync binary (default: found on PATH).
    rsync_path: Optional[str] = None
    #: Snapshot driver step at import: ``ask`` (check, offer to install the kernel driver) or
    #: ``skip`` (neither check nor install; block mode is not restricted by the agent).
    snapshot_driver: str = "ask"
    #: How long a sync cycle keeps retrying network trouble (resets, stalls, the target away)
    #: before it fails; an attempt that moved data starts the budget again.
    transfer_retry_budget_s: float = 1800.0
    #: How long a sync cycle waits for an absent control plane (and for space in a full agent
    #: home or target) before it fails; acknowledgements and events wait without limit.
    control_plane_budget_s: float = 3600.0
    #: rsync ``--timeout``: a transfer that moves no data for this long is stopped and retried.
    rsync_timeout_s: int = 120
    #: HTTP proxy for every channel (``http://[user:password@]HOST:PORT``, or ``none`` to ignore
    #: ``https_proxy`` from the environment); see :mod:`go2cloud_client.proxy`.
    proxy: Optional[str] = None
    #: hosts reached without the proxy (comma-separated names, .suffixes, IPs, CIDRs, ``*``).
    no_proxy: Optional[str] = None


#: config key -> environment variable
ENV_VARS: Dict[str, str] = {
    "server": "GO2CLOUD_SERVER",
    "server_fingerprint": "GO2CLOUD_SERVER_FINGERPRINT",
    "log_level": "GO2CLOUD_LOG_LEVEL",
    "poll_wait_s": "GO2CLOUD_POLL_WAIT",
    "connect_timeout_s": "GO2CLOUD_CONNECT_TIMEOUT",
    "read_timeout_s": "GO2CLOUD_READ_TIMEOUT",
    "rsync_path": "GO2CLOUD_RSYNC",
    "snapshot_driver": "GO2CLOUD_SNAPSHOT_DRIVER",
    "transfer_retry_budget_s": "GO2CLOUD_TRANSFER_RETRY_BUDGET",
    "control_plane_budget_s": "GO2CLOUD_CONTROL_PLANE_BUDGET",
    "rsync_timeout_s": "GO2CLOUD_RSYNC_TIMEOUT",
    "proxy": "GO2CLOUD_PROXY",
    "no_proxy": "GO2CLOUD_NO_PROXY",
}


def normalize_server_url(value: str) -> str:
    """Check a control-plane URL: https (or http to a loopback host), a host, no credentials,
    no query. Returns it without a trailing slash. Raises ValueError with the reason."""
    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http"):
        raise ValueError("must start with https:// (or http:// for a loopback address)")
    if not parts.hostname:
        raise ValueError("has no host name")
    if parts.username or parts.password:
        raise ValueError("must not contain credentials")
    if parts.query or parts.fragment:
        raise ValueError("must not contain a query or fragment")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError("has an invalid port") from exc
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(
            "uses plain http:// to a non-loopback host; use https:// (plain HTTP is accepted only "
            "for 127.0.0.1/::1/localhost)"
        )
    return value.rstrip("/")


#: control-plane URLs an agent takes at most (replicas it fails over between)
MAX_SERVERS = 8


def normalize_server_urls(value: str) -> str:
    """One control-plane URL, or several separated by commas (replicas of one control plane: the
    agent uses the first that answers and moves to the next when it cannot reach it). Each is
    checked as by :func:`normalize_server_url`; returned comma-joined, without duplicates."""
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if len(urls) <= 1:
        return normalize_server_url(value)
    if len(urls) > MAX_SERVERS:
        raise ValueError(f"lists {len(urls)} URLs: at most {MAX_SERVERS}")
    out = []
    for url in urls:
        try:
            out.append(normalize_server_url(url))
        except ValueError as exc:
            raise ValueError(f"{url}: {exc}") from exc
    return ",".join(dict.fromkeys(out))


def server_urls(value: str) -> List[str]:
    """The URLs of a (normalised) ``server`` setting."""
    return [u.strip().rstrip("/") for u in value.split(",") if u.strip()]


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value.strip()


def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"must be an integer {lo}-{hi}")
        try:
            number = int(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be an integer {lo}-{hi}") from exc
        if isinstance(value, float) and value != number:
            raise ValueError(f"must be an integer {lo}-{hi}")
        if not lo <= number <= hi:
            raise ValueError(f"must be an integer {lo}-{hi}")
        return number

    return check


def _float_range(lo: float, hi: float) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number {lo:g}-{hi:g}")
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be a number {lo:g}-{hi:g}") from exc
        if not lo <= number <= hi:
            raise ValueError(f"must be a number {lo:g}-{hi:g}")
        return number

    return check


def _choice(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = _str(value).lower()
        if text not in allowed:
            raise ValueError("must be one of " + ", ".join(allowed))
        return text

    return check


def _log_level(value: Any) -> str:
    text = _str(value).upper()
    if text not in _LOG_LEVELS:
        raise ValueError("must be one of " + ", ".join(_LOG_LEVELS))
    return text


_VALIDATORS: Dict[str, Callable[[Any], Any]] = {
    "server": lambda v: normalize_server_urls(_str(v)),
    "server_fingerprint": lambda v: normalize_fingerprint(_str(v)),
    "log_level": _log_level,
    "poll_wait_s": _int_range(0, 60),
    "connect_timeout_s": _float_range(1, 300),
    "read_timeout_s": _float_range(1, 600),
    "rsync_path": _str,
    "snapshot_driver": _choice("ask", "skip"),
    "transfer_retry_budget_s": _float_range(0, 7 * 86400),
    "control_plane_budget_s": _float_range(0, 7 * 86400),
    "rsync_timeout_s": _int_range(5, 3600),
    "proxy": lambda v: validate_setting(_str(v)),
    "no_proxy": _str,
}

assert set(_VALIDATORS) == {f.name for f in fields(Config)}


def _apply(values: Dict[str, Any], raw: Mapping[str, Any], where: Callable[[str], str],
           error: type) -> None:
    for key, value in raw.items():
        if value is None:
            continue
        try:
            values[key] = _VALIDATORS[key](value)
        except ValueError as exc:
            raise error(f"{where(key)} {exc}") from exc


def read_config_file(home: Home) -> Dict[str, Any]:
    text = home.read_text(home.config_file)
    if text is None:
        return {}
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{home.config_file} is not valid YAML: {exc}") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{home.config_file} must be a mapping of key: value")
    unknown = sorted(str(k) for k in doc if k not in _VALIDATORS)
    if unknown:
        raise ConfigError(
            f"{home.config_file}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(_VALIDATORS))})"
        )
    return doc


def load_config(
    home: Home,
    environ: Optional[Mapping[str, str]] = None,
    flags: Optional[Mapping[str, Any]] = None,
) -> Config:
    """Build the effective configuration: file, then environment, then flags."""
    import os

    environ = os.environ if environ is None else environ
    values: Dict[str, Any] = {}
    _apply(values, read_config_file(home), lambda k: f"{home.config_file}: key {k!r}", ConfigError)
    env_raw = {key: environ.get(var) or None for key, var in ENV_VARS.items()}
    _apply(values, env_raw, lambda k: f"environment variable {ENV_VARS[k]}", ConfigError)
    flag_raw = {k: v for k, v in (flags or {}).items() if k in _VALIDATORS}
    _apply(values, flag_raw, lambda k: "--" + k.replace("_", "-"), UsageError)
    return Config(**values)
