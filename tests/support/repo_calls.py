"""A pytest plugin (``-p tests.support.repo_calls``) that records which functions of
``go2cloud_server.repositories`` the tests called, into the file named by ``GO2CLOUD_REPO_CALLS``
(one ``module.function`` a line): tests/integration/test_postgres.py checks that its PostgreSQL
subset of the unit tests runs every repository function."""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import pkgutil
from pathlib import Path
from typing import Any, Callable, List, Set

import go2cloud_server.repositories as repositories

CALLED: Set[str] = set()


def repository_functions() -> List[str]:
    """Every public function of the repository modules (``db`` is the runner, not one of them)."""
    names = []
    for info in pkgutil.iter_modules(repositories.__path__):
        if info.name == "db":
            continue
        mod = importlib.import_module(f"{repositories.__name__}.{info.name}")
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            if fn.__module__ == mod.__name__ and not name.startswith("_"):
                names.append(f"{info.name}.{name}")
    return sorted(names)


def _recorded(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        CALLED.add(key)
        return fn(*args, **kwargs)

    return wrapper


def pytest_configure(config: Any) -> None:
    for key in repository_functions():
        mod_name, name = key.split(".")
        mod = importlib.import_module(f"{repositories.__name__}.{mod_name}")
        setattr(mod, name, _recorded(key, getattr(mod, name)))


def pytest_unconfigure(config: Any) -> None:
    out = os.environ.get("GO2CLOUD_REPO_CALLS")
    if out:
        Path(out).write_text("".join(f"{k}\n" for k in sorted(CALLED)))
