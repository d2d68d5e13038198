# Sourced by scripts/test.sh and scripts/bench.sh: a throwaway S3-compatible server on 127.0.0.1
# (moto's server from PyPI, pinned, in a venv kept in target/moto-venv: a cold install takes
# about a minute, later runs reuse it). Its objects live in its memory and temp files only.
#   start_s3          starts it; exports ARTIFACTFS_TEST_S3 (its endpoint URL, path-style) and
#                     ARTIFACTFS_TEST_S3_PYTHON (the venv's python, which has boto3)
#   make_bucket NAME  creates a bucket on it (moto takes any credentials; region us-east-1)
#   stop_s3           stops it and removes its directory (call it from an EXIT trap: also when a
#                     test fails, or when start_s3 never ran)
# Nothing AWS_* is exported: the tests give each daemon its own credentials.
MOTO_VERSION=5.2.5
S3_DIR=""
S3_PID=""
stop_s3() {
    if [ -n "$S3_PID" ]; then
        # moto_server forks nothing without its reloader (-r); children would go too all the same.
        pkill -TERM -P "$S3_PID" 2>/dev/null || true
        kill -TERM "$S3_PID" 2>/dev/null || true
        wait "$S3_PID" 2>/dev/null || true
        S3_PID=""
    fi
    if [ -n "$S3_DIR" ]; then
        rm -rf "$S3_DIR"
        S3_DIR=""
    fi
}
# Makes (or reuses) the venv and prints its directory. The version marker is written last, so a
# venv without it (an interrupted install, or another pin) is made anew; the lock keeps two
# scripts starting at once from installing over each other.
s3_venv() {
    local target venv
    target=${CARGO_TARGET_DIR:-target}
    mkdir -p "$target" && target=$(cd "$target" && pwd) || return 1
    venv="$target/moto-venv"
    {
        flock 9
        if [ "$(cat "$venv/moto-version" 2>/dev/null)" != "$MOTO_VERSION" ] ||
            ! "$venv/bin/python" -c pass 2>/dev/null; then
            echo "installing moto[server]==$MOTO_VERSION into $venv (once; ~1 min from PyPI)" >&2
            rm -rf "$venv"
            if ! python3 -c 'import venv, ensurepip' 2>/dev/null && [ "$(id -u)" = 0 ] &&
                command -v apt-get >/dev/null; then
                apt-get update -qq >&2 &&
                    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            fi
            python3 -m venv "$venv" &&
                "$venv/bin/python" -m pip install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION" >&2 &&
                echo "$MOTO_VERSION" >"$venv/moto-version" ||
                { echo "cannot install moto[server]==$MOTO_VERSION into $venv" >&2; return 1; }
        fi
    } 9>"$target/moto-venv.lock"
    echo "$venv"
}
start_s3() {
    local venv port url deadline
    venv=$(s3_venv) || return 1
    S3_DIR=$(mktemp -d -t afs-s3-XXXXXX)
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    url="http://127.0.0.1:$port"
    # moto spools large objects to temp files: keep them in our directory.
    TMPDIR="$S3_DIR" "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" </dev/null >"$S3_DIR/log" 2>&1 &
    S3_PID=$!
    # Ready once it answers HTTP at all (an error status counts); give up when it exits or at 30 s.
    deadline=$((SECONDS + 30))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if "$venv/bin/python" -c 'import sys, urllib.request, urllib.error
try: urllib.request.urlopen(sys.argv[1], timeout=1)
except urllib.error.HTTPError: pass' "$url" 2>/dev/null; then
            export ARTIFACTFS_TEST_S3="$url"
            export ARTIFACTFS_TEST_S3_PYTHON="$venv/bin/python"
            echo "throwaway S3 (moto $MOTO_VERSION): $url (log in $S3_DIR/log)"
            return 0
        fi
        kill -0 "$S3_PID" 2>/dev/null || break
        sleep 0.2
    done
    echo "moto_server did not answer on $url; the end of its log:" >&2
    tail -n 20 "$S3_DIR/log" >&2
    stop_s3
    return 1
}
make_bucket() {
    "$ARTIFACTFS_TEST_S3_PYTHON" - "$ARTIFACTFS_TEST_S3" "$1" <<'PY'
import sys, boto3
boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
             aws_access_key_id="test", aws_secret_access_key="test").create_bucket(Bucket=sys.argv[2])
PY
}
