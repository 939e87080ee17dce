"""Test-only: run one block cycle in a child process (so a test can kill -9 it).

``python -m tests.support.block_agent URL TOKEN FINGERPRINT DISK_PATH STATE_DIR CYCLE INCREMENTAL
[BANDWIDTH_MBPS]``; prints the cycle result as JSON on success. The token comes from the
environment variable G2C_BLOCK_TOKEN when TOKEN is "-" (kept out of the process arguments).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

from go2cloud_client.replication.block import BlockCycle, BlockOptions, BlockReplicator, BlockTarget, Disk


def main(argv: list) -> int:
    url, token, fingerprint, path, state, cycle, incremental = argv[:7]
    mbps = int(argv[7]) if len(argv) > 7 else 0
    if token == "-":
        token = os.environ.pop("G2C_BLOCK_TOKEN")
    rep = BlockReplicator(target=BlockTarget(url, token, fingerprint), disks=[Disk("d0", path)],
                          options=BlockOptions(bandwidth_mbps=mbps, chunk_size=256 * 1024, workers=2),
                          state_dir=Path(state))
    result = rep.run_cycle(BlockCycle(int(cycle), incremental == "1"), threading.Event())
    print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
