"""Block-level replication (DESIGN section 5): whole disks in fixed chunks to the HTTPS block target.

Modules: ``codec`` (zero detection, hashes, zstd level map), ``adaptive`` (compressed or raw,
whichever measures faster), ``bucket`` (shared bandwidth token bucket), ``chunkmap`` (committed
chunk hashes and the resumable pass journal), ``transport`` (the pinned HTTPS client of the
receiver), ``engine`` (:class:`BlockReplicator`), ``errors``, and ``cycle`` (one cycle on the source:
the disks' snapshots around the engine, for the task runner).
"""

from go2cloud_client.replication.block.engine import (
    BlockCycle,
    BlockCycleResult,
    BlockOptions,
    BlockReplicator,
    BlockTarget,
    Disk,
)
from go2cloud_client.replication.block.errors import (
    BlockSourceError,
    BlockTargetError,
    BlockTargetFullError,
    BlockTargetRejectedError,
)

__all__ = ["BlockCycle", "BlockCycleResult", "BlockOptions", "BlockReplicator", "BlockSourceError",
           "BlockTarget", "BlockTargetError", "BlockTargetFullError", "BlockTargetRejectedError", "Disk"]
