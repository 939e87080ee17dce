"""The VM tests share the packaged agent built once per session (tests/integration/conftest.py)."""

from tests.integration.conftest import dist  # noqa: F401  (a fixture, used by name)
