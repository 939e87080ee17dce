"""Operator-facing terminal output of the foreground agent.

Short status lines go to stdout (always). While a transfer runs and stdout is a TTY, one live
progress line is rewritten in place with ``\\r``; when stdout is not a TTY there is no progress
line (the log has the details). Thread-safe: the heartbeat, command and transfer threads all
write here.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import Any, Mapping, Optional, TextIO

SUCCESS_LINE = "Import Source Server [{source_id}] Successfully!"
WAITING_LINE = ("Waiting for commands from the control plane "
                "(Ctrl-C to stop; the task resumes when the agent is started again)")


def human_bytes(n: Optional[float]) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def progress_line(progress: Mapping[str, Any]) -> str:
    """``12.3 GiB / 40.0 GiB  30.7%  85.2 MiB/s  ETA 05:31``."""
    total = progress.get("bytes_total") or 0
    done = progress.get("bytes_done") or 0
    pct = f"{100.0 * done / total:5.1f}%" if total else "  ?  %"
    rate = progress.get("rate_bps") or 0.0
    return (f"{human_bytes(done)} / {human_bytes(total)}  {pct}  {human_bytes(rate)}/s  "
            f"ETA {human_duration(progress.get('eta_s'))}")


class Console:
    def __init__(self, stream: Optional[TextIO] = None, *, tty: Optional[bool] = None,
                 min_interval: float = 0.5) -> None:
        self.stream = stream or sys.stdout
        if tty is None:
            try:
                tty = self.stream.isatty()
            except (AttributeError, ValueError):
                tty = False
        self.tty = tty
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._progress_shown = False
        self._last = 0.0

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # closed terminal: keep running, the log has everything
            pass

    def _clear(self) -> None:
        if self._progress_shown:
            self._write("\r\x1b[2K")
            self._progress_shown = False

    def line(self, text: str) -> None:
        with self._lock:
            self._clear()
            self._write(text + "\n")

    def import_succeeded(self, source_id: str) -> None:
        self.line(SUCCESS_LINE.format(source_id=source_id))

    def progress(self, progress: Any) -> None:
        """Rewrite the live progress line (TTY only, at most every ``min_interval`` s)."""
        if not self.tty:
            return
        doc = progress.to_dict() if hasattr(progress, "to_dict") else progress
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.min_interval:
                return
            self._last = now
            text = progress_line(doc)
            width = shutil.get_terminal_size((100, 20)).columns
            self._write("\r\x1b[2K" + text[: max(10, width - 1)])
            self._progress_shown = True

    def clear_progress(self) -> None:
        with self._lock:
            self._clear()
