#!/usr/bin/env bash
# Installs everything go2cloud needs on a fresh Debian/Ubuntu machine (as root) and the project
# itself in editable mode. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_debs=()
for pair in rsync:rsync tcpdump:tcpdump setfacl:acl setfattr:attr mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs curl:curl sudo:sudo objdump:binutils patchelf:patchelf debootstrap:debootstrap systemd-analyze:systemd ip:iproute2 tc:iproute2 tinyproxy:tinyproxy /usr/lib/postgresql/15/bin/initdb:postgresql qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils extlinux:extlinux sfdisk:fdisk ssh:openssh-client; do
    cmd=${pair%%:*}; pkg=${pair##*:}
    command -v "$cmd" >/dev/null 2>&1 || need_debs+=("$pkg")
done
if [ ${#need_debs[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: missing Debian packages (${need_debs[*]}); run this script as root" >&2
        exit 1
    fi
    echo "Installing Debian packages: ${need_debs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_debs[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import go2cloud_client, go2cloud_server, pytest, responses, tenacity, psutil, xxhash, zstandard, blake3, PyInstaller, staticx, psycopg' >/dev/null 2>&1; then
    echo "Installing go2cloud and its test dependencies with pip"
    "$PYTHON" -m pip install -q --disable-pip-version-check -e '.[server,test]'
fi
