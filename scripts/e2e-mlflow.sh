#!/usr/bin/env bash
# End-to-end test with the real MLflow client (issue 6).
#
#   scripts/e2e-mlflow.sh
#
# 1. Creates (or reuses) the virtualenv target/e2e-venv with pinned mlflow and scikit-learn
#    (scripts/e2e-venv.sh: pip runs only when the installed versions differ from the pins).
# 2. Builds target/release/artifactfs with `cargo build --release` (an up-to-date build is a
#    no-op; E2E_NO_BUILD=1 reuses an existing binary without invoking cargo; E2E_BIN=PATH uses
#    that binary instead, as scripts/test.sh does with the debug build its tests made).
# 3. Mounts a fresh store in a temp dir (`artifactfs mount --store STORE --settle 1 MNT`) and runs
#    scripts/e2e_mlflow.py against it: tracking in SQLite outside the mount, artifacts in
#    file://MNT/runs, the model registry in MNT/models. The scenario prints a summary table.
# 4. Unmounts (also on failure or Ctrl-C: trap), checks the daemon exited, runs `fsck --verify`.
#
# Exit 0 only if every check passed. Environment:
#   E2E_NO_BUILD=1   reuse target/release/artifactfs
#   E2E_BIN=PATH     use this artifactfs binary (nothing is built)
#   E2E_STRACE=1     run the scenario under `strace -f -e trace=file,desc` (log kept in the work dir)
#   E2E_KEEP=1       keep the work dir (store, daemon log, sqlite db); it is always kept on failure
#   RUST_LOG         passed to the daemon (e.g. debug)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

BIN=${E2E_BIN:-$ROOT/target/release/artifactfs}

now_ms() { echo $(($(date +%s%N) / 1000000)); }
secs_since() { local d=$(($(now_ms) - $1)); printf '%d.%01d' $((d / 1000)) $((d % 1000 / 100)); }
T0=$(now_ms)
declare -a TIMES=()
phase_start() { PHASE=$1; PT=$(now_ms); echo "== $1"; }
phase_end() { TIMES+=("$(printf '%-10s %7ss' "$PHASE" "$(secs_since "$PT")")"); }

# ---- 1. virtualenv --------------------------------------------------------------------------------
phase_start venv
PY=$(scripts/e2e-venv.sh | tail -n1)
phase_end

# ---- 2. binary ------------------------------------------------------------------------------------
phase_start build
if [ -n "${E2E_BIN:-}" ]; then
    [ -x "$BIN" ] || { echo "e2e-mlflow: E2E_BIN=$BIN is not an executable" >&2; exit 1; }
    echo "build: using $BIN (E2E_BIN)"
elif [ "${E2E_NO_BUILD:-0}" = 1 ] && [ -x "$BIN" ]; then
    echo "build: reusing $BIN (E2E_NO_BUILD=1)"
else
    cargo build --release --locked   # waits if another build holds the lock
fi
phase_end

# ---- 3. mount + scenario --------------------------------------------------------------------------
[ -e /dev/fuse ] || { echo "e2e-mlflow: /dev/fuse is missing" >&2; exit 1; }
WORK=$(mktemp -d /tmp/artifactfs-e2e-mlflow.XXXXXX)
STORE=$WORK/store
MNT=$WORK/mnt
mkdir -p "$MNT"
DAEMON_PID=
PY_PID=
RC=1

is_mounted() { awk -v m="$MNT" '$2 == m { f = 1 } END { exit !f }' /proc/self/mounts; }
daemon_alive() { [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; }
scenario_alive() { [ -n "$PY_PID" ] && kill -0 -- "-$PY_PID" 2>/dev/null; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if scenario_alive; then
        # interrupted: stop the scenario's process group (python and its subprocesses)
        echo "cleanup: stopping the scenario (process group $PY_PID)"
        kill -TERM -- "-$PY_PID" 2>/dev/null || true
        for _ in $(seq 50); do scenario_alive || break; sleep 0.1; done
        scenario_alive && kill -KILL -- "-$PY_PID" 2>/dev/null || true
    fi
    if is_mounted; then
        echo "cleanup: unmounting $MNT"
        "$BIN" unmount "$MNT" || "$BIN" unmount --lazy "$MNT" || umount -l "$MNT" || true
    fi
    if daemon_alive; then
        for _ in $(seq 50); do daemon_alive || break; sleep 0.1; done
        if daemon_alive; then
            echo "cleanup: daemon $DAEMON_PID still running: SIGTERM" >&2
            kill -TERM "$DAEMON_PID" 2>/dev/null || true
            sleep 2
            daemon_alive && kill -KILL "$DAEMON_PID" 2>/dev/null || true
        fi
    fi
    if [ "$RC" = 0 ] && [ "$rc" = 0 ] && [ "${E2E_KEEP:-0}" != 1 ]; then
        rm -rf "$WORK"
    else
        echo "work dir kept: $WORK (store, artifactfs.log, mlflow.db${E2E_STRACE:+, strace.log})"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

phase_start mount
"$BIN" mount --store "$STORE" --settle 1 "$MNT"
DAEMON_PID=$(cat "$STORE/lock")
echo "mounted $MNT (store $STORE, daemon pid $DAEMON_PID)"
phase_end

phase_start scenario
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PYTHONUNBUFFERED=1
export GIT_PYTHON_REFRESH=quiet
run=("$PY" "$ROOT/scripts/e2e_mlflow.py" --mount "$MNT" --store "$STORE" --work "$WORK" --bin "$BIN")
if [ "${E2E_STRACE:-0}" = 1 ]; then
    run=(strace -f -e trace=file,desc -o "$WORK/strace.log" "${run[@]}")
fi
# In its own process group (setsid), in the background + wait, so that an interrupt reaches the
# trap at once and cleanup can stop the scenario and everything it started.
set +e
(cd "$WORK" && exec setsid "${run[@]}") &
PY_PID=$!
wait "$PY_PID"
SCENARIO_RC=$?
PY_PID=
set -e
phase_end

# ---- 4. unmount, daemon gone, fsck ----------------------------------------------------------------
phase_start unmount
POST=()
if "$BIN" unmount "$MNT" && ! is_mounted; then POST+=("unmount|PASS|"); else POST+=("unmount|FAIL|still mounted"); fi
for _ in $(seq 50); do daemon_alive || break; sleep 0.1; done
if daemon_alive; then POST+=("daemon exited after unmount|FAIL|pid $DAEMON_PID alive"); else POST+=("daemon exited after unmount|PASS|"); fi
if out=$("$BIN" fsck --store "$STORE" --verify 2>&1) && [ "$(echo "$out" | tail -n1)" = ok ]; then
    POST+=("fsck --verify|PASS|$(echo "$out" | head -n1)")
else
    POST+=("fsck --verify|FAIL|$(echo "$out" | tr '\n' ' ')")
fi
phase_end

echo
echo "daemon refusals (STORE/artifactfs.log):"
grep -h 'refused' "$STORE/artifactfs.log" | sed -e 's/^/  /' || echo "  none"
grep -hiE 'error|panic' "$STORE/artifactfs.log" | grep -v refused | sed -e 's/^/  LOG: /' || true

echo
printf '%-30s %-6s %s\n' "post-run check" result detail
POST_FAIL=0
for row in "${POST[@]}"; do
    IFS='|' read -r name res detail <<<"$row"
    printf '%-30s %-6s %s\n' "$name" "$res" "$detail"
    [ "$res" = PASS ] || POST_FAIL=1
done

echo
echo "timings:"
for t in "${TIMES[@]}"; do echo "  $t"; done
printf '  %-10s %7ss\n' total "$(secs_since "$T0")"

# One closing line in the plain "N passed, N failed" form, counting scenario and post-run checks.
read -r SC_PASS SC_TOTAL < "$WORK/scenario-counts" 2>/dev/null || { SC_PASS=0; SC_TOTAL=1; }
POST_TOTAL=${#POST[@]}
POST_PASS=0
for row in "${POST[@]}"; do [[ "$row" == *"|PASS|"* ]] && POST_PASS=$((POST_PASS + 1)); done
PASSED=$(( ${SC_PASS:-0} + POST_PASS ))
FAILED=$(( ${SC_TOTAL:-0} - ${SC_PASS:-0} + POST_TOTAL - POST_PASS ))
if [ "$SCENARIO_RC" = 0 ] && [ "$POST_FAIL" = 0 ]; then
    RC=0
else
    echo "e2e-mlflow: FAIL (scenario exit $SCENARIO_RC)"
    [ "$FAILED" -gt 0 ] || FAILED=1
fi
echo "e2e-mlflow: $PASSED passed, $FAILED failed"
exit "$RC"
