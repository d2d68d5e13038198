#!/usr/bin/env bash
# Soak run: mixed writers, readers, registrations, gc, kills and restarts for MINUTES
# (default 10), beside sparse writers, registrations of large trees and dup'd descriptors read
# through a second, --read-only mount; then fsck --verify and a summary of counts. Not part of CI.
#   scripts/soak.sh [minutes]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}
cargo build --release --quiet
# The binary cargo just built, wherever CARGO_TARGET_DIR puts it.
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/artifactfs
work=$(mktemp -d /tmp/artifactfs-soak.XXXXXX)
cleanup() {
    for m in "$work/mnt-ro" "$work/mnt"; do
        if grep -qs " $m " /proc/mounts; then
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
        fi
    done
    rm -rf "$work"
}
trap cleanup EXIT
python3 scripts/soak.py "$bin" "$minutes" "$work"
