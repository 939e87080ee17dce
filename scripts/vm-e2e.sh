#!/usr/bin/env bash
# The live-VM end to end tests (issue 14): a Debian 12 VM under qemu installs the agent with the
# Linux one-liner and migrates itself (tests/vm/). Needs root; the first run builds the VM image
# with debootstrap (a few minutes, cached under /var/cache/go2cloud-tests/), later runs reuse it.
# Under software emulation (no usable KVM) one run takes 10-20 minutes on 2 cores.
#   ./scripts/vm-e2e.sh            all VM tests
#   ./scripts/vm-e2e.sh -k reboot  further arguments go to pytest
# GO2CLOUD_VM_ACCEL=kvm uses KVM where /dev/kvm really runs guests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q -m vm tests/vm "$@"
