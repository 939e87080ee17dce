"""The drill report: one :class:`Item` per finding, with a severity and a fix in operator words.

Severities:

* ``critical`` - the migration would fail or produce an unusable copy; the control plane does not
  start the task (``drill_abnormal``) unless the operator overrides it;
* ``warning`` - the migration runs but something will likely need attention (consistency, boot on
  the target, a noisy neighbour);
* ``info`` - what was found, nothing to do (``fix`` is empty).

The report is plain JSON (``Report.to_dict``): it is the ``result.drill`` of the ``drill`` command's
acknowledgement and the output of ``go2cloud_client check --json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from go2cloud_client.clock import utc_now

CRITICAL, WARNING, INFO = "critical", "warning", "info"
SEVERITIES = (CRITICAL, WARNING, INFO)
REPORT_VERSION = 1


@dataclass(frozen=True)
class Item:
    check: str
    severity: str
    finding: str
    fix: str = ""
    data: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")

    def to_dict(self) -> Dict[str, Any]:
        return {"check": self.check, "severity": self.severity, "finding": self.finding, "fix": self.fix,
                "data": dict(self.data)}


def critical(check: str, finding: str, fix: str, **data: Any) -> Item:
    return Item(check, CRITICAL, finding, fix, data)


def warning(check: str, finding: str, fix: str, **data: Any) -> Item:
    return Item(check, WARNING, finding, fix, data)


def info(check: str, finding: str, fix: str = "", **data: Any) -> Item:
    return Item(check, INFO, finding, fix, data)


@dataclass
class Report:
    mode: str
    items: List[Item] = field(default_factory=list)
    started_at: str = field(default_factory=utc_now)
    finished_at: Optional[str] = None
    agent_version: str = ""
    hostname: str = ""

    def count(self, severity: str) -> int:
        return sum(1 for i in self.items if i.severity == severity)

    @property
    def passed(self) -> bool:
        """No critical item."""
        return self.count(CRITICAL) == 0

    def by_severity(self, severity: str) -> List[Item]:
        return [i for i in self.items if i.severity == severity]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "mode": self.mode,
            "passed": self.passed,
            "summary": {s: self.count(s) for s in SEVERITIES},
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "agent_version": self.agent_version,
            "hostname": self.hostname,
            "items": [i.to_dict() for i in self.items],
        }


def summary_line(report: Dict[str, Any]) -> str:
    """``Drill passed: 0 critical, 2 warnings, 11 info`` from a report dict."""
    counts = report.get("summary") or {}
    word = "passed" if report.get("passed") else "abnormal"
    n_warn = counts.get(WARNING, 0)
    return (f"Drill {word}: {counts.get(CRITICAL, 0)} critical, {n_warn} warning"
            f"{'' if n_warn == 1 else 's'}, {counts.get(INFO, 0)} info")


def format_report(report: Dict[str, Any], *, show_info: bool = True) -> str:
    """Human text: the summary line, then the items grouped by severity with their fix."""
    lines = [summary_line(report)]
    items = [i for i in report.get("items") or [] if isinstance(i, dict)]
    for severity, title in ((CRITICAL, "Critical"), (WARNING, "Warning"), (INFO, "Info")):
        group = [i for i in items if i.get("severity") == severity]
        if not group or (severity == INFO and not show_info):
            continue
        lines.append("")
        lines.append(f"{title} ({len(group)}):")
        for item in group:
            lines.append(f"  [{item.get('check')}] {item.get('finding')}")
            if item.get("fix"):
                lines.append(f"      fix: {item['fix']}")
    return "\n".join(lines)
