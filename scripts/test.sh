#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests, the real-mount integration tests
# and the MLflow end-to-end scenario (SKIP_E2E=1 leaves that out, e.g. offline).
# Mount tests need root and /dev/fuse; with CI=true they fail instead of skipping without them.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tools the tests drive that a minimal Debian may lack.
need=()
for tool in python3 tar find dd cmp diff; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing missing tools: ${need[*]}"
        apt-get update -qq && apt-get install -y -qq python3 tar findutils coreutils diffutils >/dev/null
    else
        echo "missing tools: ${need[*]} (install them, or run as root to let this script do it)" >&2
        exit 1
    fi
fi

# Nothing the project tracks may refer to a path outside the repository: a fresh clone has nothing
# beside it. (The patterns are written so that they do not match this file itself.)
outside='[.][.]/shared|[.][.]/[.][.]/shared|/wor[k]/|/roo[t]/|/hom[e]/[a-z]|CARGO_MANIFEST_DIR[^;]*"[.][.]/'
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    hits=$(git grep -nE "$outside" -- . || true)   # binaries too (a pickle holds file names)
else
    hits=$(grep -rnE --exclude-dir=target --exclude-dir=.git "$outside" . || true)
fi
if [ -n "$hits" ]; then
    echo "scripts/test.sh: these lines refer to paths outside the repository; a fresh clone has" >&2
    echo "nothing beside it, so fixtures and data must live inside it (tests/fixtures/):" >&2
    echo "$hits" >&2
    exit 1
fi

# A throwaway PostgreSQL server on 127.0.0.1 for the shared-store tests (Debian's postgresql,
# installed when missing): its own cluster in a temp dir, stopped and removed at exit, also when
# a test fails. Tests find it through ARTIFACTFS_TEST_PG.
PG_DIR=""
PG_BIN=""
stop_pg() {
    if [ -n "$PG_DIR" ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
        rm -rf "$PG_DIR"
        PG_DIR=""
    fi
}
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
start_pg() {
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$PG_BIN" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing postgresql (for the shared-store tests)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    fi
    if [ -z "$PG_BIN" ]; then
        echo "PostgreSQL is missing: install Debian's postgresql, or run as root" >&2
        return 1
    fi
    PG_DIR=$(mktemp -d -t afs-pg-XXXXXX)
    chmod 755 "$PG_DIR"
    [ "$(id -u)" = 0 ] && chown postgres "$PG_DIR"
    local port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -A trust -U artifactfs >/dev/null
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w start \
        -o "-p $port -k $PG_DIR -c listen_addresses=127.0.0.1" >/dev/null
    export ARTIFACTFS_TEST_PG="postgresql://artifactfs@127.0.0.1:$port/postgres"
    echo "test PostgreSQL: $ARTIFACTFS_TEST_PG (data in $PG_DIR)"
}
trap stop_pg EXIT
trap 'exit 130' INT TERM

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
start_pg
cargo test --all-targets --locked
# The mount tests that define the semantics, again on a shared store (PostgreSQL index).
ARTIFACTFS_TEST_INDEX=postgresql cargo test --locked --test semantics --test tools --test registry
stop_pg

# The real MLflow client end to end (creates target/e2e-venv from PyPI on first use).
if [ "${SKIP_E2E:-}" = 1 ]; then
    echo "scripts/e2e-mlflow.sh skipped: SKIP_E2E=1"
else
    scripts/e2e-mlflow.sh
fi
