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

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked

# The real MLflow client end to end (creates target/e2e-venv from PyPI on first use).
if [ "${SKIP_E2E:-}" = 1 ]; then
    echo "scripts/e2e-mlflow.sh skipped: SKIP_E2E=1"
else
    scripts/e2e-mlflow.sh
fi
