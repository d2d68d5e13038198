#!/usr/bin/env python3
"""Soak run for artifactfs: mixed writers, readers, model registrations, gc, and daemon kills
with restarts, for a bounded time; then fsck --verify and a summary.

Usage: scripts/soak.py BINARY MINUTES WORKDIR
Every file whose close() returned is recorded with its hash and checked after every restart and
at the end. Any unexpected error is counted and printed; the exit code is non-zero if there was
one or if fsck failed.
"""
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

BIN, MINUTES, WORK = sys.argv[1], float(sys.argv[2]), sys.argv[3]
STORE, MNT = os.path.join(WORK, "store"), os.path.join(WORK, "mnt")
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "mlflow", "sklearn_iris")
os.makedirs(MNT, exist_ok=True)

committed = {}  # path relative to the mount -> sha256 hex
lock = threading.Lock()
counts = {"files": 0, "bytes": 0, "kills": 0, "registrations": 0, "reads": 0, "gc_runs": 0,
          "refused_as_expected": 0, "errors": 0}
errors = []
stop = threading.Event()
alive = threading.Event()


def error(msg):
    with lock:
        counts["errors"] += 1
        errors.append(msg)
    print("ERROR:", msg, flush=True)


def mount(resume=True):
    subprocess.run([BIN, "mount", "--store", STORE, "--settle", "0.5", MNT], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if resume:
        alive.set()


def daemon_pid():
    with open(os.path.join(STORE, "lock")) as f:
        return int(f.read().strip())


def writer(n):
    rnd = random.Random(n)
    run = os.path.join(MNT, "runs", f"soak{n}")
    i = 0
    while not stop.is_set():
        if not alive.wait(1):
            continue
        try:
            os.makedirs(os.path.join(run, "artifacts"), exist_ok=True)
            size = rnd.choice([0, 100, 4096, 70_000, 1_500_000])
            data = rnd.randbytes(size) if rnd.random() < 0.7 else bytes(size)
            rel = os.path.join("runs", f"soak{n}", "artifacts", f"f{i}")
            i += 1
            with open(os.path.join(MNT, rel), "xb") as f:
                f.write(data)
            with lock:
                committed[rel] = hashlib.sha256(data).hexdigest()
                counts["files"] += 1
                counts["bytes"] += size
            if rnd.random() < 0.1:
                try:
                    with open(os.path.join(MNT, rel), "ab"):
                        pass
                    error(f"{rel}: append to a sealed file was allowed")
                except PermissionError:
                    with lock:
                        counts["refused_as_expected"] += 1
        except OSError as e:
            if e.errno in (107, 103, 2, 5) and not alive.is_set():
                continue  # the daemon was killed under us
            if not alive.is_set():
                continue
            error(f"writer {n}: {e!r}")


def reader():
    rnd = random.Random(99)
    while not stop.is_set():
        if not alive.wait(1):
            continue
        with lock:
            items = list(committed.items())
        if not items:
            time.sleep(0.1)
            continue
        rel, h = rnd.choice(items)
        try:
            with open(os.path.join(MNT, rel), "rb") as f:
                got = hashlib.sha256(f.read()).hexdigest()
            if got != h:
                error(f"{rel}: read back wrong bytes")
            with lock:
                counts["reads"] += 1
        except OSError:
            if alive.is_set():
                # EBUSY right after close is possible only within a moment of the release.
                pass


def registrar():
    k = 0
    while not stop.is_set():
        if not alive.wait(1):
            continue
        try:
            os.makedirs(os.path.join(MNT, "models", "soak"), exist_ok=True)
            dest = os.path.join(MNT, "models", "soak", f"v{os.getpid()}-{k}")
            k += 1
            shutil.copytree(FIXTURE, dest)
            with lock:
                counts["registrations"] += 1
        except OSError as e:
            if alive.is_set() and e.errno not in (17,):
                error(f"registration: {e!r}")
        time.sleep(2)


def verify(stage, sample=None):
    """Checks committed files: all of them, or `sample` random ones plus the newest 200."""
    with lock:
        items = list(committed.items())
    if sample is not None and len(items) > sample + 200:
        items = random.Random(len(items)).sample(items[:-200], sample) + items[-200:]
    for rel, h in items:
        try:
            with open(os.path.join(MNT, rel), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != h:
                    error(f"{stage}: {rel} has wrong bytes")
        except OSError as e:
            error(f"{stage}: {rel}: {e!r}")



mount()
deadline = time.time() + MINUTES * 60
# The writers stop at the deadline even while the main loop is busy restarting.
threading.Timer(MINUTES * 60, stop.set).start()
threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
threads += [threading.Thread(target=reader), threading.Thread(target=registrar)]
for t in threads:
    t.start()
rnd = random.Random(7)
while time.time() < deadline and not stop.is_set():
    time.sleep(min(rnd.uniform(5, 20), max(0.1, deadline - time.time())))
    if time.time() >= deadline:
        break
    if rnd.random() < 0.3:
        subprocess.run([BIN, "gc", "--older-than", "0", "--store", STORE], stdout=subprocess.DEVNULL)
        counts["gc_runs"] += 1
        continue
    # Kill the daemon at a random moment, clean the stale mount, restart, check.
    alive.clear()
    os.kill(daemon_pid(), signal.SIGKILL)
    time.sleep(0.5)
    subprocess.run(["umount", MNT], stderr=subprocess.DEVNULL)
    subprocess.run(["umount", "-l", MNT], stderr=subprocess.DEVNULL)
    counts["kills"] += 1
    mount(resume=False)
    # Before the writers resume (their large files spill into tmp/ at once).
    tmp = os.listdir(os.path.join(STORE, "tmp"))
    if tmp:
        error(f"restart {counts['kills']}: tmp/ not empty after restart: {len(tmp)} files")
    alive.set()
    verify(f"restart {counts['kills']}", sample=300)
    print(f"{time.strftime('%H:%M:%S')} kill {counts['kills']} survived; {counts['files']} files so far", flush=True)

stop.set()
alive.set()
for t in threads:
    t.join()
verify("final")
subprocess.run([BIN, "unmount", MNT])
fsck = subprocess.run([BIN, "fsck", "--verify", "--store", STORE], capture_output=True, text=True)
print(fsck.stdout.strip())
if fsck.returncode != 0:
    error("fsck --verify failed")
print()
print(f"{'files written':<22}{counts['files']}")
print(f"{'bytes written':<22}{counts['bytes']}")
print(f"{'kills survived':<22}{counts['kills']}")
print(f"{'registrations':<22}{counts['registrations']}")
print(f"{'reads verified':<22}{counts['reads']}")
print(f"{'gc runs':<22}{counts['gc_runs']}")
print(f"{'refusals (expected)':<22}{counts['refused_as_expected']}")
print(f"{'unexpected errors':<22}{counts['errors']}")
for e in errors[:20]:
    print("  ", e)
sys.exit(1 if counts["errors"] else 0)
