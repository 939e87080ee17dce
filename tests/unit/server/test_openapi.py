from __future__ import annotations

import re
from pathlib import Path

import yaml

from go2cloud_server.httpapi import Api

DOC = Path(__file__).resolve().parents[3] / "docs" / "openapi.yaml"


def _norm(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def test_every_route_is_documented_in_openapi():
    spec = yaml.safe_load(DOC.read_text())
    documented = {(m.upper(), _norm("/api/v1" + p)) for p, ops in spec["paths"].items() for m in ops
                  if m in ("get", "post", "put", "delete")}
    api = Api(None, None, "unused")  # type: ignore[arg-type]
    served = {(m, _norm(regex.pattern.strip("^$").replace("([^/]+)", "{x}")))
              for m, regex, _, _ in api.routes._routes}
    assert served == documented


def test_operator_guide_limits_and_exit_codes_match_the_code():
    from go2cloud_server import errors, rules

    guide = (DOC.parent / "operator-guide.md").read_text()
    assert rules.limits_table() in guide
    assert errors.exit_code_table() in guide
