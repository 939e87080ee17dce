"""The suite's own rules: everything in tests/integration, tests/security and tests/faults starts
real processes and says so with a module-level ``pytestmark`` carrying ``pytest.mark.integration``
(markers are strict: pyproject.toml registers each one)."""

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

