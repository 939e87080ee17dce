"""Business logic of the control plane, one module per concern, behind one facade.

The HTTP layer (``httpapi``), the scheduler and the composition root (``app``) call
:class:`Service`; it composes the concerns, each a small class in its own module:

- ``workgroups``: workgroups;
- ``codes``: activation codes and their install one-liners;
- ``sources``: the import (and replacement) of sources, their views, association;
- ``sessions``: fencing (one live agent session per source, the epoch of data writes);
- ``agent``: the agent API (heartbeats, command poll and acknowledgements, task document, events);
- ``commands``: the command queue and the application of final acknowledgements;
- ``tasks``: migration tasks (start, actions, views, automatic retries);
- ``drills``: the drill before the first sync;
- ``targets``: the task targets, commits, verification, retention, release and the target's
  room, with a strategy per mode (``target_modes``: ``FileTarget``, ``BlockTarget``).

Each validates with ``rules`` and keeps state through ``go2cloud_server.repositories`` (no SQL
in the concerns). Every multi-step change runs in one ``BEGIN IMMEDIATE`` transaction;
filesystem work that may take long (committing a cycle) runs outside of it. Times stored and
returned are UTC; ``clock`` (``go2cloud_server.clock.Clock``) is injected so tests can move
time (offline detection, code expiry).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from go2cloud_server.auth import AgentAuth
from go2cloud_server.autoretry import AutoRetry
from go2cloud_server.clock import Clock, SystemClock, iso
from go2cloud_server.service.agent import AgentApi
from go2cloud_server.service.codes import Codes, hash_code
from go2cloud_server.service.commands import Commands
from go2cloud_server.service.drills import Drills
from go2cloud_server.service.sessions import Sessions
from go2cloud_server.service.sources import Sources
from go2cloud_server.service.target_modes import BlockStore, RsyncTarget, Tree, default_block_store_factory
from go2cloud_server.service.targets import Targets
from go2cloud_server.service.tasks import Tasks
from go2cloud_server.service.workgroups import Workgroups
from go2cloud_server.space import SpaceGuard
from go2cloud_server.store import Database
from go2cloud_server.throttle import ImportThrottle, KeyDerivation
from go2cloud_server.verifier import GenerationVerifier

__all__ = ["Service"]


class Service:
    """The facade: the configuration and shared services (store, clock, authentication,
    throttling), the concern objects, and their public operations under one name."""

    def __init__(
        self,
        store: Database,
        data_dir: Path,
        *,
        rsyncd: RsyncTarget,
        tree_factory: Callable[[Path], Tree],
        block_store_factory: Callable[[Path], BlockStore] = default_block_store_factory,
        public_host: str = "127.0.0.1",
        public_url: str = "",
        fingerprint: str = "",
        spki_pin: str = "",
        heartbeat_interval: float = 10,
        auto_retry: Optional[AutoRetry] = None,
        clock: Optional[Clock] = None,
        agent_auth: Optional[AgentAuth] = None,
        import_throttle: Optional[ImportThrottle] = None,
        target_dir: Optional[Path] = None,
        space: Optional[SpaceGuard] = None,
    ) -> None:
        self.store = store
        self.data_dir = Path(data_dir)
        #: where the task trees and block images live (``serve --target-dir``; default the data dir)
        self.target_dir = Path(target_dir) if target_dir is not None else self.data_dir
        #: keeps the database writable when images fill a filesystem they share (``space``)
        self.space = space
        self.rsyncd = rsyncd
        self.tree_factory = tree_factory
        self.block_store_factory = block_store_factory
        self.public_host = public_host
        self.public_url = public_url
        self.fingerprint = fingerprint
        self.spki_pin = spki_pin
        self.heartbeat_interval = heartbeat_interval
        #: how long an import replacing a source watches its live lease for a renewal (a running agent)
        self.replace_watch_s = 1.5 * heartbeat_interval
        #: failed cycles of a transient cause queued again by the scheduler (``autoretry``)
        self.auto_retry = auto_retry or AutoRetry()
        #: wall clock and monotonic clock (``go2cloud_server.clock``; tests pass a fake)
        self.clock: Clock = clock if clock is not None else SystemClock()
        #: nonces of the agents' challenges (a re-import proves the old source's key with one)
        self.agent_auth = agent_auth or AgentAuth()
        #: failed imports per token id and client address (429 over the limits)
        self.import_throttle = import_throttle or ImportThrottle()
        #: scrypt of activation codes on a bounded pool (503 when full)
        self.key_derivation = KeyDerivation(hash_code)

        # the concerns
        self.workgroups = Workgroups(self)
        self.codes = Codes(self)
        self.sources = Sources(self)
        self.sessions = Sessions(self)
        self.agent = AgentApi(self)
        self.commands = Commands(self)
        self.tasks = Tasks(self)
        self.drills = Drills(self)
        self.targets = Targets(self)

        # their operations, under the names httpapi, the scheduler, app and the tests call
        self.create_workgroup = self.workgroups.create_workgroup
        self.list_workgroups = self.workgroups.list_workgroups
        self.show_workgroup = self.workgroups.show_workgroup
        self.delete_workgroup = self.workgroups.delete_workgroup
        self.create_code = self.codes.create_code
        self.list_codes = self.codes.list_codes
        self.revoke_code = self.codes.revoke_code
        self.import_source = self.sources.import_source
        self.replace_source = self.sources.replace_source
        self.is_offline = self.sources.is_offline
        self.source_status = self.sources.source_status
        self.list_sources = self.sources.list_sources
        self.show_source = self.sources.show_source
        self.associate = self.sources.associate
        self.disassociate = self.sources.disassociate
        self.open_session = self.sessions.open_session
        self.fence = self.sessions.fence
        self.check_epoch = self.sessions.check_epoch
        self.mixed_writers = self.sessions.mixed_writers
        self.server_time = self.agent.server_time
        self.agent_source = self.agent.agent_source
        self.heartbeat = self.agent.heartbeat
        self.poll_commands = self.agent.poll_commands
        self.ack_command = self.agent.ack_command
        self.agent_task = self.agent.agent_task
        self.post_events = self.agent.post_events
        self.apply_unfinished = self.commands.apply_unfinished
        self.start_migration = self.tasks.start_migration
        self.migration_action = self.tasks.migration_action
        self.task_action = self.tasks.task_action
        self.workgroup_migration = self.tasks.workgroup_migration
        self.source_migration = self.tasks.source_migration
        self.task_artifacts = self.tasks.task_artifacts
        self.retry_transient_failures = self.tasks.retry_transient_failures
        self.fail_at_start = self.tasks.fail_at_start
        self.auto_sync_candidates = self.tasks.auto_sync_candidates
        self.source_drill = self.drills.source_drill
        self.tree_root = self.targets.tree_root
        self.tree = self.targets.tree
        self.block_root = self.targets.block_root
        self.block_store = self.targets.block_store
        self.block_store_for = self.targets.block_store_for
        self.target = self.targets.target
        self.rsync_session_spec = self.targets.rsync_session_spec
        self.check_room = self.targets.check_room
        self.mark_target_full = self.targets.mark_target_full
        self.rsync_session_ended = self.targets.rsync_session_ended
        self.resume_when_room = self.targets.resume_when_room
        self.restore_targets = self.targets.restore_targets

    @property
    def verifier(self) -> GenerationVerifier:
        return self.targets.verifier

    @property
    def lease_ttl(self) -> float:
        return self.sessions.lease_ttl

    def now(self) -> float:
        return self.clock.now()

    def now_iso(self) -> str:
        return iso(self.clock.now())

    def start(self) -> int:
        """Start the background work: the final acknowledgements a stop interrupted are applied,
        then the generation verifier starts with what is left unverified (see
        ``Targets.start_verifier``). Returns how many generations were queued. Without ``start``
        the verifier starts on its first generation."""
        self.apply_unfinished()
        return self.targets.start_verifier()

    def close(self) -> None:
        self.commands.close()
        self.targets.verifier.stop()
        self.key_derivation.close()
