"""docs/exit-codes.md is generated from the error types; it must not drift from the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from go2cloud_client import errors

REPO = Path(__file__).resolve().parents[3]


def _gen():
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_exit_codes_doc_is_up_to_date():
    assert (REPO / "docs" / "exit-codes.md").read_text() == _gen().render()


def test_every_agent_error_has_a_distinct_code_and_a_summary():
    types = errors.all_error_types()
    codes = [t.code for t in types]
    assert len(codes) == len(set(codes)), codes
    for t in types:
        assert t.summary and 0 <= t.exit_code < 256
        assert f"`{t.code}`" in errors.exit_code_table()
