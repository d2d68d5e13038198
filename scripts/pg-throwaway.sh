# Sourced by scripts/test.sh and scripts/bench.sh: a throwaway PostgreSQL server on 127.0.0.1
# (Debian's postgresql, installed when missing and root): its own cluster in a temp dir, with
# trust authentication for the user `artifactfs`.
#   start_pg   starts it; exports ARTIFACTFS_TEST_PG (its URL, database `postgres`) and
#              ARTIFACTFS_TEST_PG_BIN (its bin directory, for tests that run a server of their own)
#   stop_pg    stops it and removes its directory (call it from an EXIT trap: also when a
#              test fails)
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
    export ARTIFACTFS_TEST_PG_BIN="$PG_BIN"    # for tests that run a server of their own
    echo "throwaway PostgreSQL: $ARTIFACTFS_TEST_PG (data in $PG_DIR)"
}
