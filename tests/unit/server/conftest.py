"""Fixtures of the control plane's unit tests: a temp SQLite store, a movable clock, and small
in-memory stand-ins for the rsync sessions and the task trees (the real ones start processes and
are covered by the integration tests). Both stand-ins append to one ``events`` list, so a test
can check the order of what the service asked of them."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Set

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from go2cloud_server import auth
from go2cloud_server.clock import FakeClock
from go2cloud_server.service import Service
from go2cloud_server.store import Database, open_database
from tests.support import postgres

#: the tests' wall clock (moved by hand with ``advance``)
Clock = FakeClock


class FakeRsyncd:
    """Stands for ``go2cloud_server.rsyncd.RsyncSessions``: records which tasks' sessions the
    service ended (before a commit, on completion, cancel or replacement)."""

    def __init__(self, events: Optional[List[tuple]] = None) -> None:
        self.closed: List[str] = []
        self.events = events if events is not None else []

    def close_task(self, task_id: str) -> None:
        self.closed.append(task_id)
        self.events.append(("close", task_id))


class FakeArtifact:
    def __init__(self, n: int, path: Path) -> None:
        self.cycle = n
        self.path = path
        self.bytes = 100 * n
        self.files = n
        self.created_at = "2027-01-15T08:00:00Z"


class FakeTrees:
    """One shared record of what the service asked of every task tree."""

    def __init__(self, events: Optional[List[tuple]] = None) -> None:
        self.events = events if events is not None else []
        self.prepared: Dict[Path, Set[int]] = {}
        self.committed: Dict[Path, List[int]] = {}
        self.discarded: Dict[Path, List[int]] = {}
        self.retained: Dict[Path, List[List[int]]] = {}  # the committed list of every retain call

    def __call__(self, root: Path) -> FakeTree:
        return FakeTree(self, Path(root))


class FakeTree:
    def __init__(self, trees: FakeTrees, root: Path) -> None:
        self.t = trees
        self.root = root

    def prepare_cycle(self, n: int) -> Path:
        self.t.prepared.setdefault(self.root, set()).add(n)
        return self.root / f"{n:06d}"

    def commit_cycle(self, n: int) -> FakeArtifact:
        if n not in self.t.prepared.get(self.root, set()):
            raise FileNotFoundError(f"cycle {n} was never prepared")
        self.t.committed.setdefault(self.root, []).append(n)
        self.t.events.append(("commit", self.root, n))
        return FakeArtifact(n, self.root / f"{n:06d}")

    def discard_cycle(self, n: int) -> None:
        self.t.discarded.setdefault(self.root, []).append(n)
        self.t.events.append(("discard", self.root, n))

    def retain(self, keep: int, committed: List[int]) -> List[int]:
        """Like ``TaskTree.retain``: the committed cycles come from the caller (its database)."""
        self.t.retained.setdefault(self.root, []).append(sorted(committed))
        done = sorted(committed)
        removed = done[:-keep] if len(done) > keep else []
        self.t.committed[self.root] = [n for n in self.t.committed.get(self.root, []) if n not in removed]
        return removed

    def destroy(self) -> None:
        self.t.committed.pop(self.root, None)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def database_url() -> Optional[str]:
    """None for SQLite (the default), else a PostgreSQL URL with an empty schema of this test's
    (``GO2CLOUD_TEST_DATABASE=postgresql://...``, see tests/support/postgres.py)."""
    url = postgres.engine_url()
    return postgres.fresh_schema_url(url) if url else None


@pytest.fixture
def open_store(tmp_path: Path, database_url: Optional[str]) -> Iterator[Callable[[], Database]]:
    """Opens (and migrates) this test's database again: what a restarted server sees."""
    opened: List[Database] = []

    def open_() -> Database:
        st = open_database(database_url, tmp_path)
        st.migrate()
        opened.append(st)
        return st

    yield open_
    for st in opened:
        st.close()


@pytest.fixture
def store(open_store: Callable[[], Database]) -> Database:
    return open_store()


@pytest.fixture
def events() -> List[tuple]:
    return []


@pytest.fixture
def rsyncd(events: List[tuple]) -> FakeRsyncd:
    return FakeRsyncd(events)


@pytest.fixture
def trees(events: List[tuple]) -> FakeTrees:
    return FakeTrees(events)


@pytest.fixture
def service(tmp_path: Path, store: Database, rsyncd: FakeRsyncd, trees: FakeTrees, clock: Clock) -> Service:
    return Service(
        store,
        tmp_path,
        rsyncd=rsyncd,
        tree_factory=trees,
        public_host="10.0.0.1",
        public_url="https://10.0.0.1:8443",
        fingerprint="sha256:" + "ab" * 32,
        spki_pin="sha256//" + "A" * 43 + "=",
        heartbeat_interval=10,
        clock=clock,
    )


def new_key() -> tuple:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key, base64.b64encode(raw).decode()


def inventory(hostname: str = "web01", machine_id: str = "m-1", mounts: Optional[list] = None) -> dict:
    return {
        "hostname": hostname,
        "machine_id": machine_id,
        "os": {"family": "linux", "id": "debian", "version_id": "12", "pretty_name": "Debian 12"},
        "mounts": mounts
        if mounts is not None
        else [
            {"mountpoint": "/", "device": "/dev/vda1", "fstype": "ext4"},
            {"mountpoint": "/boot/efi", "device": "/dev/vda15", "fstype": "vfat"},
            {"mountpoint": "/proc", "device": "proc", "fstype": "proc"},
            {"mountpoint": "/srv", "device": "/dev/vdb1", "fstype": "xfs"},
            {"mountpoint": "/run", "device": "tmpfs", "fstype": "tmpfs"},
        ],
    }


def import_body(code: dict, **kw) -> dict:
    _, pub = new_key()
    body = {
        "token_id": code["token_id"],
        "token_code": code["token_code"],
        "public_key": pub,
        "agent_version": "0.1.0",
        "previous_source_id": None,
        "inventory": inventory(),
    }
    body.update(kw)
    return body


def replace_proof(service: Service, old_key: Ed25519PrivateKey, old_source_id: str, new_public_key: str,
                  ) -> dict:
    """What a re-importing agent sends as ``previous_source_proof``: a challenge of the old source
    signed with its key over the replacement message (docs/protocol.md, Import)."""
    nonce = service.agent_auth.challenge(old_source_id)["nonce"]
    sig = old_key.sign(auth.replace_message(old_source_id, new_public_key, nonce))
    return {"nonce": nonce, "signature": base64.b64encode(sig).decode()}
