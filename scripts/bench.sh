#!/usr/bin/env bash
# Benchmark: artifactfs mount against a native directory on the same disk.
#
# Usage: scripts/bench.sh [--quick] [--runs N] [--only 1,3,6] [--dir DIR] [--keep]
#                         [--mount-arg ARG]... [--index URL|local] [--s3 local]
#   --quick        smoke test: 64 MiB instead of 1 GiB, 1,000 files instead of 10,000,
#                  a 100,000-file index instead of 1,000,000, 3 counted runs
#   --runs N       counted runs per workload (default 5; one warm-up run comes first)
#   --only LIST    run only these workloads (numbers 1-7, 9 and 10; 7 is measured together
#                  with 1)
#   --dir DIR      work directory, holding the native trees and the stores (default
#                  target/bench); it must not be a FUSE mount, and it is emptied first
#   --keep         keep the work directory's trees and stores afterwards
#   --mount-arg A  extra argument for `artifactfs mount` (repeatable), e.g. --no-passthrough
#   --index URL    also run workload 9: a shared store (PostgreSQL index, blob directory)
#                  against the embedded one. URL is a PostgreSQL server whose user may create
#                  databases (one is made and dropped per run), or `local` for a throwaway
#                  server this script starts and stops (scripts/pg-throwaway.sh)
#   --s3 local     also run workload 10: the shared store with its blobs in S3-compatible
#                  object storage, here a throwaway moto server this script starts and stops
#                  (scripts/s3-throwaway.sh; `local` is the only choice for now). A fresh bucket
#                  and database per run; its index is --index's server (`local` if not given)
#
# Needs root (or a user allowed to mount FUSE), /dev/fuse, python3, openssl (installed with
# apt-get when missing and root). Builds target/release/artifactfs and the gen_index example.
#
# Method: every workload runs native and mount alternately (warm-up, then N counted pairs),
# each timed with a monotonic clock around the command alone; creating inputs, `sync`, `rm`
# and mounting happen outside the timed part. Write workloads use a fresh store and a fresh
# daemon for every run (so nothing is deduplicated against an earlier run); read workloads use
# one daemon for the workload. Each timed write of workload 1/7 comes right after a file of its
# size was written and deleted, so all find recycled page cache memory (see settle_big).
# Peak RSS is the largest VmHWM (/proc/<pid>/status, pid from STORE/lock) among the daemons
# that served the workload, read just before unmounting.
# The table gives two ratios: of the medians, and the median of each counted pair's own ratio
# (the pair runs back to back, so it holds when the machine's speed drifts during the bench).
# The table is printed and written to DIR/../bench-result.md (every run: bench-result-runs.tsv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

QUICK=0
RUNS=""
ONLY=""
WORK="$ROOT/target/bench"
KEEP=0
MOUNT_ARGS=()
INDEX=""
S3=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --runs) RUNS="$2"; shift ;;
        --only) ONLY="$2"; shift ;;
        --dir) WORK="$2"; shift ;;
        --keep) KEEP=1 ;;
        --mount-arg) MOUNT_ARGS+=("$2"); shift ;;
        --index) INDEX="$2"; shift ;;
        --s3) S3="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ -z "$ONLY" ]; then
    ONLY="1,2,3,4,5,6,7"
    [ -n "$INDEX" ] && ONLY="$ONLY,9"
    [ -n "$S3" ] && ONLY="$ONLY,10"
fi
if [ -n "$S3" ] && [ "$S3" != local ]; then
    echo "bench.sh: --s3 $S3: only --s3 local (a throwaway moto server) for now" >&2
    exit 2
fi
if [[ ",$ONLY," == *",10,"* ]]; then
    [ -n "$S3" ] || { echo "bench.sh: workload 10 needs --s3 local" >&2; exit 2; }
    # Workload 10's index: --index's server, or a throwaway one (not adding workload 9 then).
    [ -n "$INDEX" ] || INDEX=local
fi
if [[ ",$ONLY," == *",9,"* ]] && [ -z "$INDEX" ]; then
    echo "bench.sh: workload 9 needs --index URL or --index local" >&2
    exit 2
fi
if [ "$QUICK" = 1 ]; then
    BIG_MIB=64; NFILES=1000; MODEL_MIB=16; STAT_LARGE=100000; : "${RUNS:=3}"
else
    BIG_MIB=1024; NFILES=10000; MODEL_MIB=200; STAT_LARGE=1000000; : "${RUNS:=5}"
fi
PER_DIR=100                       # files per directory in the file trees and generated indexes
NDIRS=$(( (NFILES + PER_DIR - 1) / PER_DIR ))
STAT_K=$(( NFILES / (RUNS + 1) )); [ "$STAT_K" -gt 2000 ] && STAT_K=2000
want() { [[ ",$ONLY," == *",$1,"* ]]; }
log() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }

# ----- mounts: everything this script mounts is unmounted on exit, whatever happens ---------

AFS="$ROOT/target/release/artifactfs"
GEN="$ROOT/target/release/examples/gen_index"
NULLFS="$ROOT/target/release/examples/null_fs"
MOUNTS=()
PASSTHROUGH="unknown"
DURABILITY="blobs synced within ~1 s of close (default)"
if [[ " ${MOUNT_ARGS[*]} " == *" --sync-every-close "* ]]; then
    DURABILITY="every blob fsync'ed before close() returns (--sync-every-close)"
fi

cleanup() {
    local rc=$? mp
    trap - EXIT INT TERM
    drop_bench_db
    for mp in "${MOUNTS[@]}"; do
        if mountpoint -q "$mp" 2>/dev/null; then
            "$AFS" unmount "$mp" >/dev/null 2>&1 || "$AFS" unmount --lazy "$mp" >/dev/null 2>&1 ||
                umount -l "$mp" 2>/dev/null || echo "bench.sh: could not unmount $mp" >&2
        fi
    done
    drop_bucket
    if [ "$KEEP" = 0 ] && [ -d "$WORK" ]; then
        rm -rf --one-file-system "$WORK" 2>/dev/null || true
    fi
    stop_pg
    stop_s3
    exit "$rc"
}
# The shared index of workload 9: a database made for one run (BENCH_DB, its URL BENCH_DB_URL)
# on the server at PG_URL.
. scripts/pg-throwaway.sh
PG_URL="" BENCH_DB="" BENCH_DB_URL=""
with_db() {   # URL DB: URL with its database replaced by DB
    python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$1" "$2"
}
make_bench_db() {
    BENCH_DB="afs_bench_$$_$1"
    psql -q "$PG_URL" -c "CREATE DATABASE $BENCH_DB" >/dev/null
    BENCH_DB_URL=$(with_db "$PG_URL" "$BENCH_DB")
}
drop_bench_db() {
    if [ -n "$BENCH_DB" ]; then
        psql -q "$PG_URL" -c "DROP DATABASE IF EXISTS $BENCH_DB" >/dev/null 2>&1 || true
        BENCH_DB=""
    fi
}
# The bucket of workload 10: one made for one run (BENCH_BUCKET) on the throwaway S3 server;
# S3_ENV is what an artifactfs command needs to reach it.
. scripts/s3-throwaway.sh
BENCH_BUCKET=""
S3_ENV=()
drop_bucket() {   # empties and removes BENCH_BUCKET (moto keeps large objects in temp files)
    if [ -n "$BENCH_BUCKET" ]; then
        "$ARTIFACTFS_TEST_S3_PYTHON" - "$ARTIFACTFS_TEST_S3" "$BENCH_BUCKET" <<'PY' >/dev/null 2>&1 || true
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="bench", aws_secret_access_key="bench")
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[2]):
    for o in page.get("Contents", []):
        s3.delete_object(Bucket=sys.argv[2], Key=o["Key"])
s3.delete_bucket(Bucket=sys.argv[2])
PY
        BENCH_BUCKET=""
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

DAEMON_PID=""
# mount_store STORE MNT: mounts a (new or existing) store; sets DAEMON_PID.
mount_store() {
    mkdir -p "$2"
    MOUNTS+=("$2")
    local out
    if ! out=$("$AFS" mount --store "$1" "${MOUNT_ARGS[@]}" "$2" 2>&1); then
        echo "bench.sh: mount failed: $out" >&2
        return 1
    fi
    DAEMON_PID=$(tr -dc 0-9 < "$1/lock")
    passthrough_of "$1"
}
# passthrough_of STORE: sets PASSTHROUGH from what the daemon of STORE logged.
passthrough_of() {
    if grep -q "passthrough on" "$1/artifactfs.log" 2>/dev/null; then
        PASSTHROUGH=on
    elif grep -qi "passthrough" "$1/artifactfs.log" 2>/dev/null; then
        PASSTHROUGH=off
    else
        PASSTHROUGH="off (not in this build)"
    fi
}
# unmount_store MNT STORE KEY: records the daemon's VmHWM for row KEY, then unmounts.
unmount_store() {
    local pid kb key
    pid=$(tr -dc 0-9 < "$2/lock")
    kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    for key in $3; do echo -e "$key\t$kb" >> "$RSS"; done
    "$AFS" unmount "$1"
    forget_mount "$1"
}
# forget_mount MNT: MNT is unmounted; the exit clean-up need not try it.
forget_mount() {
    local kept=() m
    for m in "${MOUNTS[@]}"; do [ "$m" = "$1" ] || kept+=("$m"); done
    MOUNTS=("${kept[@]}")
}

# ----- results ----------------------------------------------------------------------------

# row KEY LABEL UNIT: declares a table row (in this order). UNIT is s, us or MiB.
row() { echo -e "$1\t$2\t$3" >> "$ROWS"; }
# record KEY SIDE VALUE (only for counted runs, REP > 0)
record() { [ "$REP" -gt 0 ] && echo -e "$1\t$2\t$3" >> "$RES" || true; }
note() { echo -e "$1\t$2" >> "$NOTES"; }
ELAPSED=0
# timed KEY SIDE CMD...: runs CMD, records its wall time in seconds.
timed() {
    local key=$1 side=$2 t0 t1
    shift 2
    t0=$(date +%s%N)
    "$@"
    t1=$(date +%s%N)
    ELAPSED=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f", (b - a) / 1e9 }')
    record "$key" "$side" "$ELAPSED"
}
DROP_OK=0
drop_caches() { sync; echo "$1" > /proc/sys/vm/drop_caches; }
settle() { sync; }
# settle_big: settle, then write and delete a file a little larger than a big write, so that
# every timed big write finds the page cache memory the same way: just freed by a file. On this
# VM a page-cache write into memory nothing freed just before costs several times more (the
# kernel's copy into the page cache: 1 GiB took 3.6 s instead of 0.6 s natively, for the mount
# alike): without this, row 1a (right after the native run's `rm`) got recycled memory and
# row 7 (the first copy still cached) fresh memory.
settle_big() {
    sync
    dd if=/dev/zero of="$WORK/warm.bin" bs=1M count=$((BIG_MIB + 256)) status=none
    rm -f "$WORK/warm.bin"
}
rmtree() { rm -rf --one-file-system "$@"; }
du_bytes() { du -sb "$1" | cut -f1; }

# ----- preflight ----------------------------------------------------------------------------

missing=()
for tool in openssl python3 dd cp find awk du mountpoint; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "installing ${missing[*]}"
        apt-get update -qq && apt-get install -y -qq openssl python3 coreutils findutils \
            gawk util-linux >/dev/null
    else
        echo "bench.sh: missing ${missing[*]} (install them, or run as root)" >&2
        exit 1
    fi
fi
[ -e /dev/fuse ] || { echo "bench.sh: no /dev/fuse" >&2; exit 1; }

log "building release (artifactfs + examples/gen_index)"
cargo build --release --quiet --bin artifactfs --example gen_index --example null_fs

WORK=$(realpath -m "$WORK")
if [ -d "$WORK" ]; then
    if grep -q " $WORK/" /proc/mounts; then
        echo "bench.sh: something is still mounted below $WORK; unmount it first" >&2
        exit 1
    fi
    if [ ! -e "$WORK/.artifactfs-bench" ] && [ -n "$(ls -A "$WORK")" ]; then
        echo "bench.sh: $WORK is not empty and not a bench directory; choose another --dir" >&2
        exit 1
    fi
    log "emptying $WORK"
    rmtree "$WORK"
fi
mkdir -p "$WORK"/{src,native,stores,mnt}
touch "$WORK/.artifactfs-bench"
ROWS="$WORK/rows.tsv" RES="$WORK/results.tsv" RSS="$WORK/rss.tsv" NOTES="$WORK/notes.tsv"
: > "$ROWS"; : > "$RES"; : > "$RSS"; : > "$NOTES"
if [ "$(stat -c %d "$WORK/native")" != "$(stat -c %d "$WORK/stores")" ]; then
    echo "bench.sh: native dir and stores are on different file systems" >&2
    exit 1
fi
if [ -w /proc/sys/vm/drop_caches ] && (sync; echo 1 > /proc/sys/vm/drop_caches) 2>/dev/null; then
    DROP_OK=1
fi
MNT="$WORK/mnt/m"
SRC_BIG="$WORK/src/big.bin"
SRC_TREE="$WORK/src/tree"
SRC_MODEL="$WORK/src/model"
START=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ----- inputs (created once per bench run) -------------------------------------------------

if want 1 || want 2 || want 7 || want 10; then
    log "creating a $BIG_MIB MiB random file"
    # 1 MiB writes, as dd bs=1M and the daemon write it: the page cache's folio sizes follow the
    # write sizes, and small folios would make the native reads of workload 2 slower.
    dd if=/dev/urandom of="$SRC_BIG" bs=1M count="$BIG_MIB" iflag=fullblock status=none
fi
log "creating $NFILES files of 4 KiB in $NDIRS directories"
python3 - "$SRC_TREE" "$NFILES" "$PER_DIR" <<'PY'
import os, sys
root, n, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    d = f"{root}/d{i // per:04d}"
    if i % per == 0:
        os.makedirs(d)
    with open(f"{d}/f{i % per:04d}", "wb") as f:
        f.write(os.urandom(4096))
PY
if want 4; then
    log "creating a model directory ($MODEL_MIB MiB weights + 20 small files)"
    mkdir -p "$SRC_MODEL"
    dd if=/dev/urandom of="$SRC_MODEL/model.safetensors" bs=1M count="$MODEL_MIB" \
        iflag=fullblock status=none
    python3 - "$SRC_MODEL" <<'PY'
import os, sys
names = ["MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "config.json",
         "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "vocab.txt", "merges.txt", "README.md", "LICENSE",
         "input_example.json", "serving_input_example.json", "registered_model_meta",
         "metadata/MLmodel", "metadata/conda.yaml", "metadata/requirements.txt",
         "metadata/python_env.yaml"]
for i, name in enumerate(names):
    path = os.path.join(sys.argv[1], name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(os.urandom(512 << (i % 8)))   # 512 B .. 64 KiB
PY
fi
sync

# A fresh store + mount with run `bench`; prints nothing, sets STORE.
fresh_mount() {
    STORE="$WORK/stores/$1"
    mount_store "$STORE" "$MNT"
    mkdir "$MNT/runs/bench"
}
ART="$MNT/runs/bench/artifacts"

# ----- 1 + 7: write one big file; write the same bytes again (dedup) ----------------------

w_dd() { dd if="$SRC_BIG" of="$1" bs=1M status=none; }
w_cp() { cp "$SRC_BIG" "$1"; }
w_dd_sha() { dd if="$SRC_BIG" of="$1" bs=1M status=none && openssl dgst -sha256 "$1" >/dev/null; }
w_dd_fsync() { dd if="$SRC_BIG" of="$1" bs=1M conv=fsync status=none; }

if want 1 || want 7; then
    SZ="$BIG_MIB MiB"; [ "$BIG_MIB" = 1024 ] && SZ="1 GiB"
    row 1a "1 write $SZ: dd bs=1M" s
    row 1b "1 write $SZ: cp" s
    row 1c "1 write $SZ: dd, vs native dd + openssl dgst -sha256" s
    row 1d "1 write $SZ: dd, vs native dd conv=fsync" s
    row 7 "7 write the same $SZ again (dd, 2nd copy)" s
    for REP in $(seq 0 "$RUNS"); do
        log "workload 1/7: run $REP of $RUNS"
        N="$WORK/native/w1-r$REP"; mkdir -p "$N"
        settle_big; timed 1a native w_dd "$N/dd.bin"
        record 7 native "$ELAPSED"
        rmtree "$N"; mkdir -p "$N"

        settle; fresh_mount "w1-dd-r$REP"; mkdir "$ART/rep$REP"
        settle_big; timed 1a mount w_dd "$ART/rep$REP/dd.bin"
        record 1c mount "$ELAPSED"; record 1d mount "$ELAPSED"
        g1=$(du_bytes "$STORE/blobs")
        settle_big; timed 7 mount w_dd "$ART/rep$REP/dd-again.bin"
        g2=$(du_bytes "$STORE/blobs")
        unmount_store "$MNT" "$STORE" "1a 1c 1d 7"; rmtree "$STORE"

        settle_big; timed 1b native w_cp "$N/cp.bin"
        rmtree "$N"; mkdir -p "$N"
        settle; fresh_mount "w1-cp-r$REP"; mkdir "$ART/rep$REP"
        settle_big; timed 1b mount w_cp "$ART/rep$REP/cp.bin"
        unmount_store "$MNT" "$STORE" 1b; rmtree "$STORE"

        settle_big; timed 1c native w_dd_sha "$N/dd.bin"
        rmtree "$N"; mkdir -p "$N"
        settle_big; timed 1d native w_dd_fsync "$N/dd.bin"
        rmtree "$N"
    done
    note 1a "$BIG_MIB MiB random bytes from a page-cached file"
    note 1c "native column: dd, then openssl dgst -sha256 of the result"
    note 1d "native column: dd conv=fsync, durable on return; the mount: $DURABILITY"
    note 7 "store blobs: +$((g1 >> 20)) MiB after the 1st copy, +$(((g2 - g1) >> 20)) MiB after the 2nd; native: every copy is new bytes"
fi

# ----- 2: read the big file back ------------------------------------------------------------

r_cat() { cat "$1" > /dev/null; }
if want 2; then
    row 2a "2 read $BIG_MIB MiB back, page cache warm" s
    [ "$DROP_OK" = 1 ] && row 2b "2 read $BIG_MIB MiB back, after drop_caches" s
    fresh_mount w2
    cp "$SRC_BIG" "$ART/big.bin"
    settle
    for REP in $(seq 0 "$RUNS"); do
        log "workload 2: run $REP of $RUNS"
        timed 2a native r_cat "$SRC_BIG"
        timed 2a mount r_cat "$ART/big.bin"
    done
    if [ "$DROP_OK" = 1 ]; then
        for REP in $(seq 0 "$RUNS"); do
            log "workload 2 (cold): run $REP of $RUNS"
            drop_caches 3; timed 2b native r_cat "$SRC_BIG"
            drop_caches 3; timed 2b mount r_cat "$ART/big.bin"
        done
        drop_caches 3
        # Re-warm the inputs that later workloads read from the page cache.
        cat "$SRC_TREE"/*/* > /dev/null
    else
        note 2a "drop_caches not writable here: no cold-cache row"
    fi
    note 2a "passthrough: $PASSTHROUGH"
    unmount_store "$MNT" "$STORE" "2a 2b"; rmtree "$STORE"
fi

# ----- 3 + 4: cp -r of many small files; of a model-shaped directory -----------------------

c_cpr() { cp -r "$1" "$2"; }
NULLMNT="$WORK/mnt/null"
NULLPID=""
# examples/null_fs answers like artifactfs but stores nothing: what the FUSE round trips alone
# cost. null_fs_start / null_fs_stop mount and unmount it at $NULLMNT.
null_fs_start() {
    mkdir -p "$NULLMNT"
    "$NULLFS" "$NULLMNT" & NULLPID=$!
    MOUNTS+=("$NULLMNT")
    local i
    for i in $(seq 100); do mountpoint -q "$NULLMNT" && break; sleep 0.05; done
}
null_fs_stop() {
    umount "$NULLMNT"; wait "$NULLPID" || true
    forget_mount "$NULLMNT"
}
# null_fs_cpr SRC KEY: a timed cp -r into a fresh null_fs (its time also in FLOOR_S).
FLOOR_S=""
null_fs_cpr() {
    null_fs_start
    settle; timed "$2" mount c_cpr "$1" "$NULLMNT/copy"
    FLOOR_S=$ELAPSED
    null_fs_stop
}
W3_STORE=""
cp_tree_workload() {   # KEY LABEL SRC KEEP_LAST_STORE [FLOOR_KEY FLOOR_LABEL]
    # The copies are removed only after the last run: on a disk mounted with `discard`, removing
    # thousands of files between runs slows the next run down.
    local key=$1 src=$3 keep=$4 floor=${5:-} trash=() native_s
    row "$key" "$2" s
    [ -n "$floor" ] && row "$floor" "$6" s
    [ -n "$floor" ] && row "${key}n" "$7" s
    for REP in $(seq 0 "$RUNS"); do
        log "workload $key: run $REP of $RUNS"
        settle; timed "$key" native c_cpr "$src" "$WORK/native/$key-r$REP"
        native_s=$ELAPSED
        trash+=("$WORK/native/$key-r$REP")
        # Against the floor, the two runs go back to back in alternating order (row ${key}n: its
        # "native" column is null_fs), so that the machine's drift falls on both alike.
        if [ -n "$floor" ] && [ $((REP % 2)) = 1 ]; then null_fs_cpr "$src" "$floor"; fi
        settle; fresh_mount "w$key-r$REP"
        settle; timed "$key" mount c_cpr "$src" "$ART/rep$REP"
        [ -n "$floor" ] && record "${key}n" mount "$ELAPSED"
        unmount_store "$MNT" "$STORE" "$key ${floor:+${key}n}"
        if [ "$key" = 3 ]; then
            # What the store holds on disk (blocks, index and blobs) for the bytes written.
            record 8a native "$(awk -v b="$(du_bytes "$src")" 'BEGIN { printf "%.3f", b / 1048576 }')"
            record 8a mount "$(du -sk "$STORE" | awk '{ printf "%.3f", $1 / 1024 }')"
        fi
        if [ -n "$floor" ]; then
            if [ $((REP % 2)) = 0 ]; then null_fs_cpr "$src" "$floor"; fi
            record "${key}n" native "$FLOOR_S"
            record "$floor" native "$native_s"
        fi
        if [ "$keep" = 1 ] && [ "$REP" = "$RUNS" ]; then
            W3_STORE="$STORE"
        else
            trash+=("$STORE")
        fi
    done
    log "workload $key: removing the copies"
    rmtree "${trash[@]}"
    sync
}
if want 3; then
    cp_tree_workload 3 "3 cp -r $NFILES files of 4 KiB in $NDIRS dirs" "$SRC_TREE" 1 \
        3f "3 the same cp -r into null_fs (stores nothing: the FUSE floor)" \
        "3 cp -r, artifactfs vs null_fs back to back (#12: ≤ 1.6×)"
    note 3n "native column: row 3f's null_fs; mount: row 3's artifactfs; each run times both back to back, in alternating order; read the paired column"
    note 3f "examples/null_fs: answers lookup/create/write/flush/release like artifactfs from memory and drops the bytes; same native column as row 3"
    row 8a "8 store on disk after row 3's cp -r (MiB), vs the bytes written" MiB
    note 8a "native column: the bytes of the $NFILES files (apparent size); mount: du of the whole store (index, WAL, blobs) after a clean unmount"
fi
if want 4; then
    cp_tree_workload 4 "4 cp -r model dir ($MODEL_MIB MiB + 20 small files)" "$SRC_MODEL" 0
fi

# ----- 5: ls -lR, find, cat of every file over the tree, caches warm ------------------------

o_lsR() { ls -lR "$1" > /dev/null; }
o_find() { find "$1" > /dev/null; }
o_catall() { find "$1" -type f -exec cat {} + > /dev/null; }
if want 5; then
    row 5a "5 ls -lR of the $NFILES-file tree (warm)" s
    row 5b "5 find of the $NFILES-file tree (warm)" s
    row 5c "5 cat of every file of the tree (warm)" s
    if [ -z "$W3_STORE" ]; then
        fresh_mount w5
        cp -r "$SRC_TREE" "$ART/rep$RUNS"
        W3_STORE="$STORE"
    else
        STORE="$W3_STORE"
        mount_store "$STORE" "$MNT"
    fi
    TREE_M="$ART/rep$RUNS"
    for REP in $(seq 0 "$RUNS"); do
        log "workload 5: run $REP of $RUNS"
        timed 5a native o_lsR "$SRC_TREE"
        timed 5a mount o_lsR "$TREE_M"
        timed 5b native o_find "$SRC_TREE"
        timed 5b mount o_find "$TREE_M"
        timed 5c native o_catall "$SRC_TREE"
        timed 5c mount o_catall "$TREE_M"
    done
    note 5a "run 0 warms the caches and is not counted"
    # The floor: the same cat through a FUSE file system that does nothing (examples/null_fs),
    # and (row 5n) the two back to back in alternating order, the store still mounted.
    row 5f "5 the same cat in null_fs (does nothing: the FUSE floor)" s
    row 5n "5 cat of every file, artifactfs vs null_fs back to back (#12: ≤ 1.1×)" s
    null_fs_start
    cp -r "$SRC_TREE" "$NULLMNT/tree"
    for REP in $(seq 0 "$RUNS"); do
        log "workload 5 (null_fs): run $REP of $RUNS"
        timed 5f native o_catall "$SRC_TREE"
        if [ $((REP % 2)) = 0 ]; then timed 5n mount o_catall "$TREE_M"; fi
        timed 5f mount o_catall "$NULLMNT/tree"
        record 5n native "$ELAPSED"
        if [ $((REP % 2)) = 1 ]; then timed 5n mount o_catall "$TREE_M"; fi
    done
    null_fs_stop
    unmount_store "$MNT" "$STORE" "5a 5b 5c 5n"
    note 5n "native column: row 5f's null_fs; mount: artifactfs, the tree of row 5; each run times both back to back, in alternating order; run 0 not counted; read the paired column"
    note 5f "examples/null_fs: opens and reads served like artifactfs's small sealed files, from memory"
fi
if [ -n "$W3_STORE" ] && want 3; then
    row 8b "8 fsck --verify of row 3's store ($NFILES files)" s
    for REP in $(seq 0 "$RUNS"); do
        log "workload 8: fsck --verify, run $REP of $RUNS"
        timed 8b mount "$AFS" fsck --verify --store "$W3_STORE" > /dev/null
    done
    note 8b "re-hashes every content the store holds; target ≤ 1 s"
fi
if [ -n "$W3_STORE" ]; then rmtree "$W3_STORE"; fi

# ----- 6: stat latency, 10k vs 1M indexed files --------------------------------------------

# stat_batch ROOT N REP: mean microseconds of one os.stat over STAT_K paths of the N-file tree
# (d%04d/f%04d names), the REP-th disjoint slice of one fixed random sample: every path is
# stat'ed for the first time in this bench run.
stat_batch() {
    python3 - "$1" "$2" "$3" "$STAT_K" "$((RUNS + 1))" "$PER_DIR" <<'PY'
import os, random, sys, time
root, n, rep, k, reps, per = sys.argv[1], *map(int, sys.argv[2:])
idx = random.Random(20240601).sample(range(n), k * reps)[rep * k:(rep + 1) * k]
paths = [f"{root}/d{i // per:04d}/f{i % per:04d}" for i in idx]
total = 0.0
for p in paths:
    t0 = time.perf_counter()
    os.stat(p)
    total += time.perf_counter() - t0
print(f"{total / len(paths) * 1e6:.3f}")
PY
}
if want 6; then
    small_label="$((NFILES / 1000))k"
    large_label="$((STAT_LARGE / 1000))k"; [ "$STAT_LARGE" -ge 1000000 ] && large_label="$((STAT_LARGE / 1000000))M"
    row 6a "6 stat, $small_label-file store vs native $small_label tree (µs/stat)" us
    row 6b "6 stat, $large_label-file store, the same paths as 6a (µs/stat)" us
    row 6c "6 stat, $large_label-file store, paths anywhere in it (µs/stat)" us
    S_SMALL="$WORK/stores/w6-small" S_LARGE="$WORK/stores/w6-large"
    M_SMALL="$WORK/mnt/small" M_LARGE="$WORK/mnt/large"
    log "workload 6: generating indexes of $NFILES and $STAT_LARGE files"
    "$GEN" "$S_SMALL" "$NFILES" "$PER_DIR" >&2
    "$GEN" "$S_LARGE" "$STAT_LARGE" "$PER_DIR" >&2
    settle
    mount_store "$S_SMALL" "$M_SMALL"
    mount_store "$S_LARGE" "$M_LARGE"
    for REP in $(seq 0 "$RUNS"); do
        log "workload 6: run $REP of $RUNS"
        [ "$DROP_OK" = 1 ] && drop_caches 2
        record 6a native "$(stat_batch "$SRC_TREE" "$NFILES" "$REP")"
        [ "$DROP_OK" = 1 ] && drop_caches 2
        record 6a mount "$(stat_batch "$M_SMALL/runs/bench/artifacts" "$NFILES" "$REP")"
        [ "$DROP_OK" = 1 ] && drop_caches 2
        record 6b mount "$(stat_batch "$M_LARGE/runs/bench/artifacts" "$NFILES" "$REP")"
        [ "$DROP_OK" = 1 ] && drop_caches 2
        record 6c mount "$(stat_batch "$M_LARGE/runs/bench/artifacts" "$STAT_LARGE" "$REP")"
    done
    if [ "$DROP_OK" = 1 ]; then c="dentry cache dropped (echo 2) before each batch"; else c="fresh paths"; fi
    note 6a "mean of $STAT_K stats of never-stat'ed paths per run; $c; index sizes $(du -h "$S_SMALL/index.sqlite" | cut -f1) / $(du -h "$S_LARGE/index.sqlite" | cut -f1)"
    note 6b "only the index differs from 6a (same names, same directories)"
    note 6c "also more directories to look up, more index pages touched"
    unmount_store "$M_SMALL" "$S_SMALL" 6a
    unmount_store "$M_LARGE" "$S_LARGE" "6b 6c"
    rmtree "$S_SMALL" "$S_LARGE"
fi

# pg_up N: PG_URL is the server of --index (a throwaway one, started once, for `local`).
pg_up() {
    [ -n "$PG_URL" ] && return 0
    if [ "$INDEX" = local ]; then
        start_pg >&2
        PG_URL="$ARTIFACTFS_TEST_PG"
    else
        PG_URL="$INDEX"
    fi
    command -v psql >/dev/null || { echo "bench.sh: workload $1 needs psql" >&2; exit 1; }
}

# ----- 9: a shared store (PostgreSQL index + blob directory) against the embedded one -------

if want 9; then
    pg_up 9
    row 9a "9 cp -r $NFILES files of 4 KiB, shared index vs embedded" s
    row 9b "9 stat after 9a, shared index vs embedded (µs/stat)" us
    trash=()
    for REP in $(seq 0 "$RUNS"); do
        log "workload 9: run $REP of $RUNS"
        settle; fresh_mount "w9-embedded-r$REP"
        settle; timed 9a native c_cpr "$SRC_TREE" "$ART/rep$REP"
        [ "$DROP_OK" = 1 ] && drop_caches 2
        record 9b native "$(stat_batch "$ART/rep$REP" "$NFILES" "$REP")"
        unmount_store "$MNT" "$STORE" ""
        trash+=("$STORE")

        make_bench_db "$REP"
        STORE="$WORK/stores/w9-shared-r$REP"
        mkdir -p "$STORE-blobs" "$MNT"
        MOUNTS+=("$MNT")
        "$AFS" mount --store "$STORE" --index "$BENCH_DB_URL" --blobs "file://$STORE-blobs" \
            "${MOUNT_ARGS[@]}" "$MNT" >/dev/null
        mkdir "$MNT/runs/bench"
        settle; timed 9a mount c_cpr "$SRC_TREE" "$ART/rep$REP"
        [ "$DROP_OK" = 1 ] && drop_caches 2
        record 9b mount "$(stat_batch "$ART/rep$REP" "$NFILES" "$REP")"
        unmount_store "$MNT" "$STORE" "9a 9b"
        drop_bench_db
        trash+=("$STORE" "$STORE-blobs")
    done
    log "workload 9: removing the copies"
    rmtree "${trash[@]}"
    sync
    note 9a "native column: the same cp -r into an embedded store (fresh per run); mount: a fresh shared store (a new database on the PostgreSQL server, blobs in a directory), server $(with_db "$PG_URL" "…" | sed 's#//[^@/]*@#//#') on this machine over TCP; target ≤ 2×"
    note 9b "mean of $STAT_K stats of never-stat'ed paths of the tree 9a wrote, on the daemon that wrote it; native column: the embedded store"
    want 10 || stop_pg
fi

# ----- 10: the shared store with its blobs in S3 (moto) against the embedded one -----------

# mount_s3 STORE MNT [VAR=VALUE]...: mounts a machine of the shared store (database
# BENCH_DB_URL, blobs in bucket BENCH_BUCKET) whose cache is STORE/cache; its daemon gets the
# VARs too. Sets DAEMON_PID.
mount_s3() {
    local store=$1 mp=$2 out
    shift 2
    mkdir -p "$mp"
    MOUNTS+=("$mp")
    if ! out=$(env "${S3_ENV[@]}" "$@" "$AFS" mount --store "$store" --index "$BENCH_DB_URL" \
        --blobs "s3://$BENCH_BUCKET/blobs" "${MOUNT_ARGS[@]}" "$mp" 2>&1); then
        echo "bench.sh: mount failed: $out" >&2
        return 1
    fi
    DAEMON_PID=$(tr -dc 0-9 < "$store/lock")
    passthrough_of "$store"
}
# s3_get KEY [first]: seconds a plain GET of object KEY of BENCH_BUCKET takes with boto3 (its
# bytes read in 1 MiB pieces and discarded), timed around the GET alone; with `first`, until
# the first 4 KiB of its body are there.
s3_get() {
    "$ARTIFACTFS_TEST_S3_PYTHON" - "$ARTIFACTFS_TEST_S3" "$BENCH_BUCKET" "$1" "${2:-all}" <<'PY'
import sys, time, boto3
url, bucket, key, mode = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                  aws_access_key_id="bench", aws_secret_access_key="bench")
t0 = time.perf_counter()
r = s3.get_object(Bucket=bucket, Key=key)
body, n, want = r["Body"], 0, r["ContentLength"]
if mode == "first":
    n, want = len(body.read(4096)), 4096
else:
    while chunk := body.read(1 << 20):
        n += len(chunk)
t = time.perf_counter() - t0
body.close()
if n != want:
    sys.exit(f"s3_get: {n} bytes of {want}")
print(f"{t:.6f}")
PY
}
r_head() { [ "$(head -c 4096 "$1" | wc -c)" = 4096 ]; }
# log_problems STORE...: shows the warnings and errors the daemons of STOREs logged (the first 5
# of each), before the stores are removed.
log_problems() {
    local st n
    for st in "$@"; do
        n=$(grep -cE '^\[[^]]* (WARN|ERROR) ' "$st/artifactfs.log" 2>/dev/null || true)
        if [ "${n:-0}" -gt 0 ]; then
            log "$(basename "$st")/artifactfs.log: $n warning/error lines, the first:"
            grep -E '^\[[^]]* (WARN|ERROR) ' "$st/artifactfs.log" | head -n 5 | cut -c1-400 >&2
        fi
    done
}
# cold_read KEY MNT: the boto3 GET of the big file's object, then cat of the big file on the
# machine mounted at MNT (whose cache is empty); the page cache dropped before each.
cold_read() {
    local t
    [ "$DROP_OK" = 1 ] && drop_caches 3
    t=$(s3_get "$BIG_KEY")
    record "$1" native "$t"
    [ "$DROP_OK" = 1 ] && drop_caches 3
    timed "$1" mount r_cat "$2/runs/bench/artifacts/big.bin"
}
if want 10; then
    pg_up 10
    start_s3 >&2
    S3_ENV=(AWS_ENDPOINT_URL="$ARTIFACTFS_TEST_S3" AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=bench
            AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1)
    BIG_SHA=$(sha256sum "$SRC_BIG" | cut -d' ' -f1)
    BIG_KEY="blobs/sha256/${BIG_SHA:0:2}/${BIG_SHA:2}"
    SZ="$BIG_MIB MiB"; [ "$BIG_MIB" = 1024 ] && SZ="1 GiB"
    row 10a "10 S3: write $SZ (cp), vs the embedded store" s
    row 10b "10 S3: cold read $SZ on a 2nd machine (cat), 1 GET, vs a boto3 GET" s
    row 10b8 "10 S3: cold read $SZ on a 2nd machine (cat), 8 ranged GETs, vs a boto3 GET" s
    row 10c "10 S3: warm read $SZ again on the 2nd machine (cat), vs native cat" s
    row 10e "10 S3: first 4 KiB of the $SZ file on a cold machine (head -c), vs boto3's first 4 KiB" s
    row 10d "10 S3: cp -r $NFILES files of 4 KiB, vs the embedded store" s
    M2="$WORK/mnt/m2"
    for REP in $(seq 0 "$RUNS"); do
        log "workload 10: run $REP of $RUNS"
        # The reference of 10a and 10d: a fresh embedded store.
        settle; fresh_mount "w10-embedded-r$REP"
        settle_big; timed 10a native w_cp "$ART/big.bin"
        settle; timed 10d native c_cpr "$SRC_TREE" "$ART/tree"
        unmount_store "$MNT" "$STORE" ""
        rmtree "$STORE"

        # Machine 1 writes into a fresh shared store: a new database and a new bucket.
        make_bench_db "w10_r$REP"
        BENCH_BUCKET="afs-bench-$$-r$REP"
        make_bucket "$BENCH_BUCKET"
        S_1="$WORK/stores/w10-m1-r$REP" S_2="$WORK/stores/w10-m2-r$REP" S_3="$WORK/stores/w10-m3-r$REP"
        settle; mount_s3 "$S_1" "$MNT"
        mkdir "$MNT/runs/bench"
        settle_big; timed 10a mount w_cp "$ART/big.bin"
        settle; timed 10d mount c_cpr "$SRC_TREE" "$ART/tree"
        unmount_store "$MNT" "$S_1" "10a 10d"

        # Machine 2 (a fresh store: its cache is empty) reads it, with one streamed GET; then
        # again, from its cache.
        settle; mount_s3 "$S_2" "$M2" ARTIFACTFS_S3_RANGES=1
        cold_read 10b "$M2"
        cat "$SRC_BIG" > /dev/null
        timed 10c native r_cat "$SRC_BIG"
        timed 10c mount r_cat "$M2/runs/bench/artifacts/big.bin"
        unmount_store "$M2" "$S_2" "10b 10c"
        # Machine 3, the same with the default ranged GETs.
        settle; mount_s3 "$S_3" "$M2"
        cold_read 10b8 "$M2"
        unmount_store "$M2" "$S_3" "10b8"
        # Machine 4: how soon the first bytes come (the rest goes on arriving meanwhile).
        S_4="$WORK/stores/w10-m4-r$REP"
        settle; mount_s3 "$S_4" "$M2" ARTIFACTFS_S3_RANGES=1
        [ "$DROP_OK" = 1 ] && drop_caches 3
        record 10e native "$(s3_get "$BIG_KEY" first)"
        [ "$DROP_OK" = 1 ] && drop_caches 3
        timed 10e mount r_head "$M2/runs/bench/artifacts/big.bin"
        unmount_store "$M2" "$S_4" "10e"

        drop_bench_db
        drop_bucket
        log_problems "$S_1" "$S_2" "$S_3" "$S_4"
        rmtree "$S_1" "$S_2" "$S_3" "$S_4"
        # Re-warm the inputs that the next run reads from the page cache.
        if [ "$DROP_OK" = 1 ]; then cat "$SRC_TREE"/*/* > /dev/null; fi
    done
    sync
    server="server $(with_db "$PG_URL" "…" | sed 's#//[^@/]*@#//#')"
    [ "$INDEX" = local ] && server="a throwaway PostgreSQL server"
    if [ "$DROP_OK" = 1 ]; then c="page cache dropped (echo 3) before each side"; else c="page cache not dropped (drop_caches not writable)"; fi
    note 10a "native column: the same cp into an embedded store (fresh per run); mount: a fresh shared store (a new database on $server, blobs in a new bucket of a throwaway moto $MOTO_VERSION, both on this machine), timed around cp, close() included; target: report"
    note 10b "machine 2: a fresh store (empty cache) on the same database and bucket, mounted after machine 1 unmounted; daemon with ARTIFACTFS_S3_RANGES=1 (one streamed GET: the fair setting on moto, which serves a ranged GET in time proportional to the whole object); native column: boto3 get_object of the same object, read and discarded, timed in python around the GET alone; $c; target ≤ 1.2×"
    note 10b8 "as 10b on a 3rd fresh machine, ARTIFACTFS_S3_RANGES unset (default: 8 ranged GETs in flight; each costs moto the whole object); target ≤ 1.2×"
    note 10c "cat again on machine 2 (from its cache, passthrough: $PASSTHROUGH); native column: cat of the input file, page cache warm; target: native"
    note 10e "a 4th fresh machine (ARTIFACTFS_S3_RANGES=1): head -c 4096 of the file, open included; served once the first 8 MiB piece has arrived and was checked against the piece states in the index; native column: boto3 get_object until the first 4 KiB of its body; $c; the whole object used to come first"
    note 10d "on 10a's mounts after 10a; small contents live in the index (no PUT); native column: the embedded store; target ≤ 2×"
    stop_s3
    stop_pg
fi

# ----- the table -----------------------------------------------------------------------------

ELAPSED_TOTAL=$(( $(date +%s) - START ))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
disk_src=$(findmnt -no SOURCE -T "$WORK" || echo '?')
rot=$(cat "/sys/block/$(basename "$disk_src")/queue/rotational" 2>/dev/null || echo '?')
fs_type=$(findmnt -no FSTYPE -T "$WORK" || echo '?')
fs_opts=$(findmnt -no OPTIONS -T "$WORK" | tr ',' '\n' | grep -E '^(discard|relatime|noatime)$' | paste -sd, - || true)
# ext4 without a journal skips every recently deleted inode when it allocates one: creating
# many files soon after deleting many (an earlier bench run's clean-up) is slower then.
journal=""
if [ "$fs_type" = ext4 ]; then
    if ls /proc/fs/jbd2/ 2>/dev/null | grep -q "^$(basename "$disk_src")-"; then
        journal=", journal"
    else
        journal=", no journal"
    fi
fi
cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo || true)
ram=$(awk '/^MemTotal/ {printf "%d GiB RAM", $2 / 1048576}' /proc/meminfo || true)
MACHINE="$(nproc) cores ($cpu), $ram, kernel $(uname -r), disk $disk_src $fs_type ($fs_opts, \
rotational=$rot$journal), native dir and store on the same file system, passthrough $PASSTHROUGH, \
durability: $DURABILITY${MOUNT_ARGS[*]:+, mount args: ${MOUNT_ARGS[*]}}; \
load average $LOAD_START at the start, $LOAD_END at the end (other work on the machine skews results)"
REV="$(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo '+dirty')"
OUT="$(dirname "$WORK")/bench-result.md"
python3 - "$ROWS" "$RES" "$RSS" "$NOTES" "$RUNS" "$MACHINE" "$REV" "$ELAPSED_TOTAL" "$QUICK" \
    "$(date -u '+%Y-%m-%d %H:%M UTC')" <<'PY' | tee "$OUT"
import statistics, sys
rows_f, res_f, rss_f, notes_f, runs, machine, rev, elapsed, quick, date = sys.argv[1:]
def tsv(path):
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]
vals, rss, notes = {}, {}, {}
for key, side, v in tsv(res_f):
    vals.setdefault((key, side), []).append(float(v))
for key, kb in tsv(rss_f):
    rss[key] = max(rss.get(key, 0), int(kb))
for key, text in tsv(notes_f):
    notes.setdefault(key, []).append(text)
def fmt(v, unit):
    if v is None:
        return "—"
    if unit == "us":
        return f"{v:.1f} µs"
    if unit == "MiB":
        return f"{v:.1f} MiB"
    return f"{v:.3f} s" if v < 10 else f"{v:.2f} s"
out = []
out.append(f"artifactfs bench, {date}, {'--quick, ' if quick == '1' else ''}{runs} counted runs "
           f"after a warm-up, medians; commit {rev}; took {int(elapsed) // 60} min {int(elapsed) % 60} s")
out.append(f"machine: {machine}")
out.append("")
out.append("| workload | native | mount | mount/native | paired | peak daemon RSS | notes |")
out.append("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
medians = {}
for key, label, unit in tsv(rows_f):
    n = vals.get((key, "native")); m = vals.get((key, "mount"))
    nm = statistics.median(n) if n else None
    mm = statistics.median(m) if m else None
    medians[key] = mm
    ratio = f"{mm / nm:.2f}×" if nm and mm else "—"
    # Each counted run is a native/mount pair run back to back: the median of the pairs'
    # ratios holds when the machine's speed drifts during the bench.
    pairs = [b / a for a, b in zip(n or [], m or []) if a > 0]
    paired = f"{statistics.median(pairs):.2f}×" if n and m and pairs else "—"
    note = list(notes.get(key, []))
    if key in ("6b", "6c") and medians.get("6a") and mm:
        ratio = f"{mm / medians['6a']:.2f}× 6a's mount"
        note = [f"growth vs the small store: {mm / medians['6a']:.2f}×"] + note
    kb = rss.get(key)
    out.append(f"| {label} | {fmt(nm, unit)} | {fmt(mm, unit)} | {ratio} | {paired} | "
               f"{f'{kb / 1024:.0f} MiB' if kb else '—'} | {'; '.join(note)} |")
out.append("")
out.append("paired: the median of the counted runs' own mount/native ratios (each run times "
           "native and mount back to back).")
out.append("Peak daemon RSS: largest VmHWM of the daemons that served the row (write rows: a fresh "
           "store and daemon per run; read rows: one daemon per workload).")
print("\n".join(out))
PY
cp "$RES" "${OUT%.md}-runs.tsv"
log "table written to $OUT, every counted run to ${OUT%.md}-runs.tsv"
