#!/bin/bash
# go2cloud_client installer for Linux x86_64 (served by go2cloud_server at /download/install.sh).
#
# The one-liner printed by `go2cloud_server code create` runs it:
#   { curl -fsS --insecure --pinnedpubkey 'sha256//PIN' https://HOST:PORT/download/install.sh || echo "exit $?"; } \
#     | GO2CLOUD_TOKEN_CODE='CODE' sudo --preserve-env=GO2CLOUD_TOKEN_CODE bash -s -- \
#         --server https://HOST:PORT --server-fingerprint sha256:HEX --token-id at-...
# (the code is in sudo's and this script's environment, never in any process's arguments)
#
# Options:
#   --server URL                 control plane (https://HOST:PORT)
#   --server-fingerprint FP      sha256:HEX of the control plane's certificate (the agent pins it)
#   --token-id ID                activation code token id; the token code comes from the
#                                environment variable GO2CLOUD_TOKEN_CODE (never an argument)
#   --prefix DIR                 install folder = agent home (default /opt/go2cloud_client)
#   --yes | --no-prompt          passed to the agent (host preparation questions)
#   --no-service                 do not install the systemd service
#   --pin sha256//B64            public-key pin for the downloads (default: the pin the server
#                                wrote into this script when it served it)
#
# Steps: checks (root, curl, sha256sum, tar, x86_64, pin), download SHA256SUMS and the package into
# a temporary directory with the public key pinned, sha256 check, can this host run it (kernel
# version, then the new executable's --version), stop a running agent, install
# in place (state/, identity/, Logs/, config.yaml and an existing Excludes/ list are kept),
# `go2cloud_client --home PREFIX --import-only ...` (prompts read from /dev/tty when there is one;
# a home that is already imported is not imported again), then
# `go2cloud_client --home PREFIX service install` unless --no-service.
# Nothing is installed when a check, the download or the checksum fails.
#
# Exit status: 0 done, 2 usage, 3 this host cannot run it (not root, curl/tar/sha256sum
# missing, architecture, kernel too old, the executable does not start), 4 download failed or the server's key does not match the pin,
# 5 checksum mismatch or bad package, 6 installing the files failed, 7 the agent's import or
# service step failed (the files stay installed: fix the cause and run the one-liner again).

set -eu

# The whole script is one compound command: bash reads it to the closing brace before running
# any of it, so a download cut short by the network (curl | bash) is a syntax error, never half a run.
{

# The control plane fills these in when it serves this script (GET /download/install.sh).
SERVED_SPKI_PIN=''
SERVED_FINGERPRINT=''

PACKAGE=go2cloud_client_linux_x86_64
PREFIX=/opt/go2cloud_client
SERVER=''
FINGERPRINT=''
TOKEN_ID=''
PIN=''
YES=0
NO_PROMPT=0
NO_SERVICE=0

say() { printf 'go2cloud install: %s\n' "$*"; }
die() {
    code=$1
    shift
    printf 'go2cloud install: error: %s\n' "$*" >&2
    exit "$code"
}

usage() {
    echo "usage: install.sh --server URL --server-fingerprint sha256:HEX --token-id ID [--prefix DIR] [--yes] [--no-prompt] [--no-service] [--pin sha256//B64]"
}

need_value() {
    [ "$#" -ge 2 ] && [ -n "$2" ] || die 2 "$1 needs a value (see --help)"
}

while [ "$#" -gt 0 ]; do
    case "$1" in
    --server) need_value "$@"; SERVER=$2; shift 2 ;;
    --server=*) SERVER=${1#*=}; shift ;;
    --server-fingerprint) need_value "$@"; FINGERPRINT=$2; shift 2 ;;
    --server-fingerprint=*) FINGERPRINT=${1#*=}; shift ;;
    --token-id) need_value "$@"; TOKEN_ID=$2; shift 2 ;;
    --token-id=*) TOKEN_ID=${1#*=}; shift ;;
    --prefix) need_value "$@"; PREFIX=$2; shift 2 ;;
    --prefix=*) PREFIX=${1#*=}; shift ;;
    --pin) need_value "$@"; PIN=$2; shift 2 ;;
    --pin=*) PIN=${1#*=}; shift ;;
    --yes | -y) YES=1; shift ;;
    --no-prompt) NO_PROMPT=1; shift ;;
    --no-service) NO_SERVICE=1; shift ;;
    --token-code | --token-code=*)
        die 2 "the token code is never an argument: set GO2CLOUD_TOKEN_CODE in the environment" ;;
    -h | --help) usage; exit 0 ;;
    *) die 2 "unknown option: $1 (see --help)" ;;
    esac
done

# -- checks (nothing is changed on the host before they all pass) --------------------------------
[ -n "$SERVER" ] || die 2 "--server URL is missing"
case "$SERVER" in
https://*) ;;
*) die 2 "--server must start with https:// (got: $SERVER)" ;;
esac
SERVER=${SERVER%/}
[ -n "$FINGERPRINT" ] || die 2 "--server-fingerprint sha256:HEX is missing"
FINGERPRINT=$(printf '%s' "$FINGERPRINT" | tr 'A-F' 'a-f' | tr -d ':' | sed 's/^sha256/sha256:/')
printf '%s' "$FINGERPRINT" | grep -Eq '^sha256:[0-9a-f]{64}$' ||
    die 2 "--server-fingerprint must be sha256: followed by 64 hex digits"
[ -n "$TOKEN_ID" ] || die 2 "--token-id at-... is missing"
case "$PREFIX" in
/*) ;;
*) die 2 "--prefix must be an absolute path (got: $PREFIX)" ;;
esac
PREFIX=${PREFIX%/}
[ -n "$PREFIX" ] || die 2 "--prefix / is not allowed: give a folder such as /opt/go2cloud_client"

# the prefix becomes the agent home (0700, removed by 'uninstall'): a new or empty folder, or an
# earlier installation, never a folder that holds something else (such as /usr/local)
if [ -d "$PREFIX" ] && [ ! -e "$PREFIX/go2cloud_client" ] && [ ! -e "$PREFIX/state" ] &&
    [ -n "$(ls -A -- "$PREFIX" 2>/dev/null)" ]; then
    die 2 "--prefix $PREFIX is not empty and holds no go2cloud_client installation; choose a new folder such as /opt/go2cloud_client"
fi
[ -e "$PREFIX" ] && [ ! -d "$PREFIX" ] && die 2 "--prefix $PREFIX exists and is not a folder"

[ "$(id -u)" = 0 ] || die 3 "run as root (the one-liner uses sudo)"
for tool in curl tar gzip sha256sum mktemp; do
    command -v "$tool" >/dev/null 2>&1 || die 3 "$tool is not installed; install it with your package manager and run the command again"
done
arch=$(uname -m)
case "$arch" in
x86_64 | amd64) ;;
*) die 3 "unsupported architecture $arch: the go2cloud_client package is built for x86_64 only" ;;
esac

[ -n "$PIN" ] || PIN=$SERVED_SPKI_PIN
[ -n "$PIN" ] || die 2 "no public-key pin: run the one-liner printed by 'go2cloud_server code create' (it downloads this script from the control plane), or pass --pin sha256//..."
case "$PIN" in
sha256//*) ;;
*) die 2 "--pin must look like sha256//BASE64 (got: $PIN)" ;;
esac
if [ -n "$SERVED_FINGERPRINT" ] && [ "$SERVED_FINGERPRINT" != "$FINGERPRINT" ]; then
    die 4 "pin mismatch: --server-fingerprint $FINGERPRINT is not the certificate of the server this script came from ($SERVED_FINGERPRINT); copy the one-liner again from 'go2cloud_server code create'"
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/go2cloud_install.XXXXXX")
cleanup() { rm -rf -- "$TMP"; }
trap cleanup EXIT
trap 'cleanup; trap - EXIT; exit 130' INT TERM HUP

fetch() { # fetch NAME DEST: GET $SERVER/download/NAME with the public key pinned
    rc=0
    curl -fsS --proto '=https' --insecure --pinnedpubkey "$PIN" --connect-timeout 20 \
        --retry 3 --retry-delay 2 -o "$2" -- "$SERVER/download/$1" || rc=$?
    case "$rc" in
    0) ;;
    90) die 4 "pin mismatch: the public key of $SERVER is not $PIN; nothing was installed (check the URL, or copy the one-liner again from 'go2cloud_server code create')" ;;
    22) die 4 "$SERVER/download/$1 answered with an HTTP error: the control plane does not publish it (go2cloud_server serve --packages DIR)" ;;
    *) die 4 "downloading $SERVER/download/$1 failed (curl exit $rc); nothing was installed" ;;
    esac
}

say "downloading $PACKAGE.tar.gz from $SERVER (public key pinned)"
fetch SHA256SUMS "$TMP/SHA256SUMS"
expected=$(awk -v n="$PACKAGE.tar.gz" '($2 == n || $2 == "*" n) { print $1; exit }' "$TMP/SHA256SUMS")
printf '%s' "$expected" | grep -Eq '^[0-9a-fA-F]{64}$' ||
    die 5 "$SERVER does not publish $PACKAGE.tar.gz (not listed in its SHA256SUMS)"
fetch "$PACKAGE.tar.gz" "$TMP/$PACKAGE.tar.gz"
actual=$(sha256sum "$TMP/$PACKAGE.tar.gz" | cut -d' ' -f1)
expected=$(printf '%s' "$expected" | tr 'A-F' 'a-f')
[ "$actual" = "$expected" ] ||
    die 5 "sha256 mismatch for $PACKAGE.tar.gz: got $actual, SHA256SUMS says $expected; nothing was installed"
say "sha256 $actual OK"

# every entry inside the package folder, no absolute paths, no ..
tar -tzf "$TMP/$PACKAGE.tar.gz" >"$TMP/list" 2>/dev/null || die 5 "$PACKAGE.tar.gz is not a readable tar.gz"
if grep -Ev "^$PACKAGE(/|\$)" "$TMP/list" >/dev/null || grep -Eq '(^|/)\.\.(/|$)' "$TMP/list"; then
    die 5 "$PACKAGE.tar.gz has entries outside $PACKAGE/; refusing it"
fi
mkdir "$TMP/x"
tar -xzf "$TMP/$PACKAGE.tar.gz" -C "$TMP/x" --no-same-owner || die 5 "extracting $PACKAGE.tar.gz failed"
NEW=$TMP/x/$PACKAGE
[ -f "$NEW/go2cloud_client" ] || die 5 "$PACKAGE.tar.gz has no go2cloud_client executable"
VERSION=$(cat "$NEW/VERSION" 2>/dev/null || echo '?')

# -- can this host run it? (before anything is installed or stopped) -----------------------------
# the executable carries its own loader and C library (staticx): it does not depend on the host's
# glibc. That C library refuses kernels older than the one it was built for ("FATAL: kernel too
# old"): KERNEL in the package, measured at each build.
NEED_KERNEL=$(cat "$NEW/KERNEL" 2>/dev/null || echo none)
if [ "$NEED_KERNEL" != none ]; then
    HAVE_KERNEL=$(uname -r 2>/dev/null | sed -E 's/^([0-9]+(\.[0-9]+)*).*/\1/') || HAVE_KERNEL=''
    if [ -n "$HAVE_KERNEL" ] &&
       [ "$(printf '%s\n%s\n' "$NEED_KERNEL" "$HAVE_KERNEL" | sort -V | head -n 1)" != "$NEED_KERNEL" ]; then
        die 3 "this host runs Linux $HAVE_KERNEL; the go2cloud_client $VERSION package needs Linux $NEED_KERNEL or newer; nothing was installed"
    fi
fi
# then run it once (it unpacks itself into TMPDIR: only where programs may run; a noexec /tmp is
# handled after the install, below)
probe=$TMP/exec_probe
true_bin=$(type -P true || echo /bin/true)
TMP_EXEC=1
if cp -- "$true_bin" "$probe" 2>/dev/null && chmod 0755 "$probe" && ! "$probe" 2>/dev/null; then
    TMP_EXEC=0
fi
if [ "$TMP_EXEC" = 1 ]; then
    "$NEW/go2cloud_client" --version >"$TMP/version.out" 2>"$TMP/version.err" ||
        die 3 "the go2cloud_client $VERSION executable does not run on this host ($(head -c 300 "$TMP/version.err" | tr '\n' ' ')); nothing was installed"
fi

# -- install in place ------------------------------------------------------------------------------
EXE=$PREFIX/go2cloud_client
if [ -x "$EXE" ]; then
    say "stopping the running agent of $PREFIX (if any) before the upgrade"
    "$EXE" stop --home "$PREFIX" || say "warning: '$EXE stop' failed; the files are replaced anyway"
fi

put() { # put SRC DEST MODE: atomic replace (copy next to it, then rename)
    cp -- "$1" "$2.new.$$" && chmod "$3" "$2.new.$$" && mv -f -- "$2.new.$$" "$2" ||
        { rm -f -- "$2.new.$$"; die 6 "could not install $2"; }
}

mkdir -p -- "$PREFIX" || die 6 "could not create $PREFIX"
chmod 0700 -- "$PREFIX"
mkdir -p -- "$PREFIX/Excludes" || die 6 "could not create $PREFIX/Excludes"
put "$NEW/go2cloud_client" "$EXE" 0755
for f in README.txt LICENSE VERSION config.yaml.example; do
    if [ -f "$NEW/$f" ]; then put "$NEW/$f" "$PREFIX/$f" 0644; fi
done
for f in "$NEW"/Excludes/*; do
    [ -f "$f" ] || continue
    dest=$PREFIX/Excludes/$(basename -- "$f")
    if [ -e "$dest" ] && [ "$(sha256sum <"$f")" = "$(sha256sum <"$dest")" ]; then
        continue
    elif [ -e "$dest" ]; then
        say "kept $dest (your list; the shipped default is $PREFIX/Excludes/$(basename -- "$f").default)"
        put "$f" "$dest.default" 0644
    else
        put "$f" "$dest" 0600
    fi
done
say "installed go2cloud_client $VERSION in $PREFIX"

# The one-file executable unpacks itself into $TMPDIR at each start: /tmp mounted noexec would
# stop it, so use a folder of the prefix then.
if [ "$TMP_EXEC" = 0 ]; then
    say "note: ${TMPDIR:-/tmp} does not allow running programs (noexec); using TMPDIR=$PREFIX/tmp"
    mkdir -p -m 0700 -- "$PREFIX/tmp"
    export TMPDIR="$PREFIX/tmp"
fi

# -- import and service ---------------------------------------------------------------------------
set -- --home "$PREFIX" --import-only --server "$SERVER" --server-fingerprint "$FINGERPRINT" --token-id "$TOKEN_ID"
if [ "$YES" = 1 ]; then set -- "$@" --yes; fi
if [ "$NO_PROMPT" = 1 ]; then set -- "$@" --no-prompt; fi
rc=0
if [ "$NO_PROMPT" = 0 ] && (: </dev/tty) 2>/dev/null; then
    "$EXE" "$@" </dev/tty || rc=$?
else
    "$EXE" "$@" </dev/null || rc=$?
fi
unset GO2CLOUD_TOKEN_CODE
[ "$rc" = 0 ] || die 7 "the import failed (go2cloud_client exit $rc; log: $PREFIX/Logs/go2cloud_client.log); fix the cause and run the one-liner again"

if [ "$NO_SERVICE" = 0 ]; then
    rc=0
    "$EXE" --home "$PREFIX" service install </dev/null || rc=$?
    [ "$rc" = 0 ] || die 7 "installing the service failed (go2cloud_client exit $rc); run '$EXE --home $PREFIX service install' again after fixing the cause"
    say "done: the agent runs as the go2cloud_client service"
else
    say "done (no service): start the agent with 'sudo $EXE --home $PREFIX'"
fi
say "status: $EXE --home $PREFIX status | logs: $PREFIX/Logs/ | remove: sudo $EXE --home $PREFIX uninstall --revert"

}
