#!/usr/bin/env bash
# A private Docker daemon for the container tests, apart from any Docker the machine runs:
#   scripts/container/dockerd.sh start DIR   starts dockerd with its data root, exec root, pid
#                                            file and socket under DIR (DIR/docker.sock); no
#                                            host networking (--iptables=false --bridge=none)
#   scripts/container/dockerd.sh stop DIR    removes its containers, stops it, unmounts what it
#                                            mounted under DIR (overlays, netns, shm) and
#                                            removes DIR
# scripts/test.sh runs `start` before the tests and `stop` in an EXIT trap. Needs root and
# Debian's docker.io (test.sh installs it when missing).
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [ -z "$cmd" ] || [ -z "$dir" ]; then
    echo "usage: $0 start|stop DIR" >&2
    exit 2
fi

sock="$dir/docker.sock"
docker_cli() { docker -H "unix://$sock" "$@"; }

case "$cmd" in
start)
    mkdir -p "$dir/data" "$dir/exec"
    # setsid: the daemon does not get the terminal's signals; stop kills it by its pid file.
    setsid dockerd \
        --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/dockerd.pid" \
        -H "unix://$sock" --iptables=false --ip-masq=false --bridge=none \
        >"$dir/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 1 300); do
        if docker_cli version >/dev/null 2>&1; then
            exit 0
        fi
        sleep 0.1
    done
    echo "dockerd did not answer on $sock within 30 s; its log:" >&2
    tail -n 30 "$dir/dockerd.log" >&2 || true
    exit 1
    ;;
stop)
    [ -d "$dir" ] || exit 0
    if [ -S "$sock" ]; then
        ids=$(docker_cli ps -aq 2>/dev/null || true)
        if [ -n "$ids" ]; then
            # shellcheck disable=SC2086
            docker_cli rm -f $ids >/dev/null 2>&1 || true
        fi
    fi
    if [ -f "$dir/dockerd.pid" ]; then
        pid=$(cat "$dir/dockerd.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 200); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            if kill -0 "$pid" 2>/dev/null; then
                echo "dockerd $pid still running after 20 s: killing it" >&2
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
    fi
    # The containerd dockerd started for itself (dockerd stops it; make sure).
    cpid_file="$dir/exec/containerd/containerd.pid"
    if [ -f "$cpid_file" ]; then
        cpid=$(cat "$cpid_file")
        for _ in $(seq 1 100); do
            kill -0 "$cpid" 2>/dev/null || break
            [ "$_" = 50 ] && kill -TERM "$cpid" 2>/dev/null
            sleep 0.1
        done
        kill -0 "$cpid" 2>/dev/null && kill -KILL "$cpid" 2>/dev/null
    fi
    # Whatever dockerd mounted under DIR (overlay layers, netns and shm files), deepest first.
    awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac
