"""The suite's own rules: the fast lane (``scripts/test.sh --fast``) runs tests/unit and
tests/snapshot (and tests/integration/test_subp.py, which needs no server); everything in
tests/integration, tests/security and tests/faults starts real processes and says so with a
module-level ``pytestmark`` carrying ``pytest.mark.integration``, so ``-m integration`` /
``-m "not integration"`` select the same tests as the directories; and every test checks
something (an assert, pytest.raises, a wait that raises, or a helper that does one of these)."""

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


# -- no assert-nothing tests ------------------------------------------------------------------

#: calls that check something: they raise when what they wait for or expect does not happen
_CHECKING_ATTRS = {"raises", "fail", "warns", "deprecated_call", "wait_for", "wait_task",
                   "wait_imported"}


def _own_nodes(fn: ast.AST):
    """The nodes of a function's own body (not of the functions, lambdas or classes it defines:
    an assert in a fake callback checks nothing unless something calls it)."""
    todo = list(ast.iter_child_nodes(fn))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def _checks_directly(fn: ast.AST) -> bool:
    for node in _own_nodes(fn):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Attribute) and (node.attr in _CHECKING_ATTRS
                                                or node.attr.startswith("assert")):
            return True
        if isinstance(node, ast.Name) and node.id == "wait_for":
            return True
    return False


def _called_helpers(fn: ast.AST) -> set:
    """Functions called by name, and ``module.check_*``/``expect_*``/``verify_*`` helpers."""
    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                names.add(node.func.id)
            elif isinstance(node.func, ast.Attribute) and node.func.attr.startswith(
                    ("check", "expect", "verify")):
                names.add(node.func.attr)
    return names


def test_every_test_checks_something():
    functions: dict = {}
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.setdefault(node.name, []).append((path, node))
    checking = {name for name, defs in functions.items() if any(_checks_directly(n) for _, n in defs)}
    grew = True
    while grew:  # a test may check through a helper that asserts (or through one that calls one)
        grew = False
        for name, defs in functions.items():
            if name not in checking and any(_called_helpers(n) & checking for _, n in defs):
                checking.add(name)
                grew = True
    silent = [f"{path.relative_to(TESTS)}:{node.lineno} {name}"
              for name, defs in functions.items() if name.startswith("test_") and name not in checking
              for path, node in defs]
    assert silent == []
