"""The operator's admin token: where it lives and how the operator commands read it.

``serve`` creates it at first start (:func:`go2cloud_server.auth.ensure_admin_token`) in
``<data-dir>/admin.token`` (0600); operator requests carry it as ``Authorization: Bearer``.
Standard library only: the operator commands import this module, and their start-up time is
measured (docs/performance.md, "Issue 16: operator command start-up").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

ADMIN_TOKEN_FILE = "admin.token"


def read_admin_token(data_dir: Path) -> Optional[str]:
    """``GO2CLOUD_ADMIN_TOKEN``, else the content of ``<data-dir>/admin.token``; None when
    neither is there (or the file cannot be read)."""
    env = os.environ.get("GO2CLOUD_ADMIN_TOKEN")
    if env:
        return env.strip()
    path = Path(data_dir) / ADMIN_TOKEN_FILE
    try:
        return path.read_text(encoding="ascii").strip() or None
    except OSError:
        return None
