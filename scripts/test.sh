#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests, the real-mount integration tests
# (containers included, with a private Docker daemon) and the MLflow end-to-end scenario
# (SKIP_E2E=1 leaves that out, e.g. offline).
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

# A throwaway PostgreSQL server for the shared-store tests (start_pg / stop_pg): tests find it
# through ARTIFACTFS_TEST_PG.
. scripts/pg-throwaway.sh
# A throwaway S3 server (moto) for the S3 tests (start_s3 / stop_s3): tests find it through
# ARTIFACTFS_TEST_S3 (and a python with boto3 through ARTIFACTFS_TEST_S3_PYTHON).
. scripts/s3-throwaway.sh

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings

# Container tests (tests/containers.rs): Debian's docker.io and busybox-static, a Debian root
# file system for the Dockerfile's base (debootstrap, made once and kept in target/), and a
# private dockerd, stopped on exit whatever happens.
docker_dir=""
stop_dockerd() {
    if [ -n "$docker_dir" ]; then
        scripts/container/dockerd.sh stop "$docker_dir" || true
        docker_dir=""
    fi
}
trap 'stop_dockerd; stop_pg; stop_s3' EXIT
trap 'exit 130' INT    # bash runs no EXIT trap when a signal ends it: exit instead
trap 'exit 143' TERM HUP
# In CI a container test that cannot run is a failure; elsewhere the tests skip, saying why.
container_problem() {
    if [ "${CI:-}" = true ]; then
        echo "scripts/test.sh: $1 (CI=true: the container tests must run)" >&2
        exit 1
    fi
    echo "scripts/test.sh: $1: the container tests will skip" >&2
}
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    pkgs=()
    command -v dockerd >/dev/null 2>&1 || pkgs+=(docker.io)
    [ -x /bin/busybox ] || pkgs+=(busybox-static)
    command -v debootstrap >/dev/null 2>&1 || pkgs+=(debootstrap)
    if [ ${#pkgs[@]} -gt 0 ]; then
        echo "installing for the container tests: ${pkgs[*]}"
        # policy-rc.d may refuse to start the system's dockerd: only ours runs.
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null ||
            container_problem "cannot install ${pkgs[*]}"
    fi
    cache="${CARGO_TARGET_DIR:-target}/container-base"
    base="$cache/bookworm-minbase.tar"
    if [ ! -s "$base" ]; then
        mirror=$(sed -n 's/^URIs: *\([^ ]*debian\)$/\1/p; s/^deb \(http[^ ]*debian\) bookworm .*/\1/p' \
            /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n 1 || true)
        mirror=${mirror:-http://deb.debian.org/debian}
        echo "making the Dockerfile's base image with debootstrap from $mirror (once; ~1 min)"
        mkdir -p "$cache"
        rootfs=$(mktemp -d -p "$cache" rootfs.XXXXXX)
        if debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1; then
            tar -C "$rootfs" -cf "$base.tmp" . && mv "$base.tmp" "$base"
        else
            echo "debootstrap failed ($cache/debootstrap.log)" >&2
        fi
        rm -rf "$rootfs"
    fi
    if [ -s "$base" ]; then
        export ARTIFACTFS_TEST_DEBIAN_ROOTFS
        ARTIFACTFS_TEST_DEBIAN_ROOTFS=$(realpath "$base")
    fi
    if command -v dockerd >/dev/null 2>&1; then
        docker_dir=$(mktemp -d -t afs-docker.XXXXXX)
        if scripts/container/dockerd.sh start "$docker_dir"; then
            export ARTIFACTFS_TEST_DOCKER="$docker_dir/docker.sock"
        else
            container_problem "dockerd did not start"
        fi
    fi
fi

start_pg
start_s3
cargo test --all-targets --locked
stop_dockerd
# The mount tests that define the semantics, again on a shared store (PostgreSQL index).
ARTIFACTFS_TEST_INDEX=postgresql cargo test --locked --test semantics --test tools --test registry
# And with the blobs in a bucket (PostgreSQL + S3): the same mount tests, and the machine tests.
# gc takes unused objects at once there (no upload grace), so that it races the writers for real.
ARTIFACTFS_TEST_INDEX=postgresql ARTIFACTFS_TEST_BLOBS=s3 \
    cargo test --locked --test semantics --test tools --test registry
ARTIFACTFS_TEST_BLOBS=s3 ARTIFACTFS_TEST_UPLOAD_GRACE_MS=0 cargo test --locked --test shared
stop_pg
stop_s3

# The real MLflow client end to end (creates target/e2e-venv from PyPI on first use).
if [ "${SKIP_E2E:-}" = 1 ]; then
    echo "scripts/e2e-mlflow.sh skipped: SKIP_E2E=1"
else
    # The debug binary the tests above built and used (a release build would add ~5 min).
    E2E_BIN="$(realpath "${CARGO_TARGET_DIR:-target}")/debug/artifactfs" scripts/e2e-mlflow.sh
fi
