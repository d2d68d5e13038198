#!/usr/bin/env bash
# Soak run: mixed writers, readers, registrations, gc, kills and restarts for MINUTES
# (default 10), then fsck --verify and a summary of counts. Not part of CI.
#   scripts/soak.sh [minutes]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}
cargo build --release --quiet
work=$(mktemp -d /tmp/artifactfs-soak.XXXXXX)
cleanup() {
    umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
python3 scripts/soak.py "$PWD/target/release/artifactfs" "$minutes" "$work"
