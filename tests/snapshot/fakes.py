"""Fake command-line tools on PATH for process-boundary tests.

``FakeTools.add(name, rules)`` installs an executable ``name`` that appends its argv to a log and
answers with the first rule whose ``match`` strings all occur in its arguments:
``{"match": [...], "stdout": "", "stderr": "", "rc": 0, "once": False, "write": {path: text}}``
(``once`` rules answer one time only; ``write`` files are written before answering, to play the
tool's side effects such as a kernel driver's info file). PATH holds only the fakes.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

SCRIPT = r'''#!{python} -IS
import json, os, sys
name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
with open(os.environ["FAKE_TOOLS_LOG"], "a") as f:
    f.write(json.dumps([name] + args) + "\n")
with open(os.environ["FAKE_TOOLS_SPEC"]) as f:
    spec = json.load(f)
used_path = os.environ["FAKE_TOOLS_SPEC"] + ".used"
used = set(open(used_path).read().split()) if os.path.exists(used_path) else set()
for i, rule in enumerate(spec.get(name, [])):
    key = "%s:%d" % (name, i)
    if rule.get("once") and key in used:
        continue
    if all(any(m in a for a in args) for m in rule.get("match", [])):
        if rule.get("once"):
            with open(used_path, "a") as f:
                f.write(key + "\n")
        for path, text in rule.get("write", {{}}).items():
            with open(path, "w") as f:
                f.write(text)
        sys.stdout.write(rule.get("stdout", ""))
        sys.stderr.write(rule.get("stderr", ""))
        sys.exit(rule.get("rc", 0))
sys.stderr.write("fake %s: no rule for %r\n" % (name, args))
sys.exit(99)
'''


class FakeTools:
    def __init__(self, root: Path, monkeypatch: Any) -> None:
        self.bin = root / "fakebin"
        self.bin.mkdir()
        self.log = root / "fake-calls.jsonl"
        self.spec_path = root / "fake-spec.json"
        self.spec: Dict[str, List[Dict[str, Any]]] = {}
        self._save()
        monkeypatch.setenv("PATH", str(self.bin))
        monkeypatch.setenv("FAKE_TOOLS_LOG", str(self.log))
        monkeypatch.setenv("FAKE_TOOLS_SPEC", str(self.spec_path))

    def _save(self) -> None:
        self.spec_path.write_text(json.dumps(self.spec))

    def add(self, name: str, rules: List[Dict[str, Any]]) -> None:
        path = self.bin / name
        path.write_text(SCRIPT.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        self.spec[name] = list(rules)
        self._save()

    def calls(self, name: Optional[str] = None) -> List[List[str]]:
        if not self.log.exists():
            return []
        rows = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        return [r for r in rows if name is None or r[0] == name]

    def clear(self) -> None:
        if self.log.exists():
            os.unlink(self.log)
