"""The suite's own rules: the fast lane (``scripts/test.sh --fast``) runs tests/unit and
tests/snapshot (and tests/integration/test_subp.py, which needs no server); everything in
tests/integration, tests/security and tests/faults starts real processes and says so with a
module-level ``pytestmark`` carrying ``pytest.mark.integration``, so ``-m integration`` /
``-m "not integration"`` select the same tests as the directories."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List

TESTS = Path(__file__).resolve().parents[2]
REAL_PROCESS_DIRS = ("integration", "security", "faults")


def _module_marks(path: Path) -> List[str]:
    """The ``pytest.mark.NAME`` names in the module's top-level ``pytestmark``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: List[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            for sub in ast.walk(node.value):
                if (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute)
                        and sub.value.attr == "mark"):
                    names.append(sub.attr)
    return names


def test_every_real_process_test_module_is_marked_integration():
    modules = [p for d in REAL_PROCESS_DIRS for p in sorted((TESTS / d).glob("test_*.py"))]
    assert len(modules) > 30  # the directories are where this test thinks they are
    unmarked = [str(p.relative_to(TESTS)) for p in modules if "integration" not in _module_marks(p)]
    assert unmarked == []


def test_the_fast_lane_paths_exist_and_start_no_server():
    script = (TESTS.parent / "scripts" / "test.sh").read_text(encoding="utf-8")
    (line,) = [ln for ln in script.splitlines() if ln.startswith("FAST=(")]
    paths = line[len("FAST=("):].rstrip(")").split()
    assert paths[:2] == ["tests/unit", "tests/snapshot"]
    for rel in paths:
        path = TESTS.parent / rel
        assert path.exists(), rel
        if path.is_file():  # a test from a real-process directory that needs no server
            text = path.read_text(encoding="utf-8")
            assert "harness" not in text and "server" not in text.lower(), rel
