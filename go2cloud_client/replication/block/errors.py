"""Error types of the block engine (all are :class:`ReplicationError`: exit 31 from the CLI)."""

from __future__ import annotations

from go2cloud_client.errors import ReplicationError


class BlockSourceError(ReplicationError):
    """The disk to read is unusable: missing, unreadable, not a device or image, or smaller than
    what the target already holds. Retrying does not help until the operator fixes the input."""

    code = "block_source_invalid"
    summary = "a disk to replicate is missing, unreadable or smaller than what was replicated before"
    retryable = False


class BlockTargetError(ReplicationError):
    """The block target could not be reached or answered with an error (retry later)."""

    code = "block_target_failed"
    summary = "the block target could not be reached or refused a request"
    retryable = True


class BlockTargetRejectedError(BlockTargetError):
    """The block target refused a request for good (bad token, invalid request, hash refused
    again and again): retrying the same request cannot help."""

    code = "block_target_rejected"
    summary = "the block target refused a request (task token, protocol or repeated hash mismatch)"
    retryable = False


class BlockTargetFullError(BlockTargetError):
    """The target's storage is full: HTTP 507 from the block receiver, or (file mode, raised by
    the rsync replicator) rsync's "No space left on device" from the target. What the target
    committed before is intact; the control plane marks the task ``target_full`` and resumes it
    when there is room again."""

    code = "target_full"
    summary = "the target's storage is full (free space on the target; the sync resumes by itself)"
    retryable = False


class SessionFencedError(BlockTargetRejectedError):
    """409 ``stale_epoch``: another agent session holds the source now (fencing); this agent's
    writes are refused and nothing of them was written."""

    code = "stale_epoch"
    summary = "the target refused this agent's session epoch: another agent holds the source (a clone?)"
