from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from go2cloud_server.blockrx import BlockReceiver
from go2cloud_server.httpapi import Api

DOC = Path(__file__).resolve().parents[3] / "docs" / "openapi.yaml"


def _norm(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def _documented(spec: dict, prefix: str) -> set:
    """(METHOD, path) of the paths served under ``prefix``: the API's own (no path-level
    ``servers``) for /api/v1, the block target's (path-level server ending in /block/v1)."""
    out = set()
    for p, ops in spec["paths"].items():
        servers = ops.get("servers")
        base = urlsplit(servers[0]["url"]).path if servers else "/api/v1"
        if base == prefix:
            out |= {(m.upper(), _norm(prefix + p)) for m in ops if m in ("get", "post", "put", "delete")}
    return out


def test_every_route_is_documented_in_openapi():
    spec = yaml.safe_load(DOC.read_text())
    documented = _documented(spec, "/api/v1")
    api = Api(None, None, "unused")  # type: ignore[arg-type]
    served = {(m, _norm(regex.pattern.strip("^$").replace("([^/]+)", "{x}")))
              for m, regex, _, _ in api.routes._routes}
    assert served == documented


def test_every_block_route_is_documented_in_openapi():
    spec = yaml.safe_load(DOC.read_text())
    served = {(m, _norm(re.sub(r"\([^)]*\)", "{x}", pattern.strip("^$"))))
              for m, pattern, _ in BlockReceiver.routes}
    assert served == _documented(spec, "/block/v1")
    codes = spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
    assert {"chunk_hash_mismatch", "target_full", "disk_too_large", "target_busy"} <= set(codes)


def test_operator_guide_limits_and_exit_codes_match_the_code():
    from go2cloud_server import errors, rules

    guide = (DOC.parent / "operator-guide.md").read_text()
    assert rules.limits_table() in guide
    assert errors.exit_code_table() in guide
