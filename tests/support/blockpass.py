"""Test-only: one full block pass of an image to a :class:`BlockServer` started in this process, for
tests that must run both ends somewhere else (in a network namespace with a shaped link). Prints
the cycle's result, the adaptive-compression rounds and the sha256 the target's verifier reported
for the image, as one JSON line.

    python3 -m tests.support.blockpass IMAGE WORKDIR [--trial-mib N] [--trial-inflight N]
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

from go2cloud_client.replication.block import (
    BlockCycle,
    BlockOptions,
    BlockReplicator,
    BlockTarget,
    Disk,
    adaptive,
)
from tests.support.blockserver import BlockServer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("image")
    ap.add_argument("workdir")
    ap.add_argument("--chunk-kib", type=int, default=256)
    ap.add_argument("--trial-mib", type=int, default=0, help="smaller trial windows than the engine's")
    ap.add_argument("--trial-inflight", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.workdir)
    server = BlockServer(work / "server").start()
    try:
        rep = BlockReplicator(target=BlockTarget(server.url, server.token, server.fingerprint),
                              disks=[Disk("d0", args.image)],
                              options=BlockOptions(chunk_size=args.chunk_kib << 10, workers=2),
                              state_dir=work / "state")
        rep.adaptive = adaptive.AdaptiveCompression(
            trial_min=args.trial_mib << 20 if args.trial_mib else adaptive.TRIAL_MIN,
            trial_inflight=args.trial_inflight or adaptive.TRIAL_INFLIGHT)
        result = rep.run_cycle(BlockCycle(1, False), threading.Event())
        report = server.generation(1)[0]
    finally:
        server.stop()
    print(json.dumps({"result": result.to_dict(), "rounds": rep.adaptive.rounds,
                      "inflight_chunks": rep.inflight_window, "sha256": report["sha256"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
