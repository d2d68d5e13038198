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
# A --read-only daemon on the same store, beside the writer (it holds no lock).
MNT_RO, RO_LOG = os.path.join(WORK, "mnt-ro"), os.path.join(WORK, "ro.log")
MAX_FILE_SIZE = 2 << 30  # --max-file-size 2G: a sparse write past it is cheap
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "mlflow", "sklearn_iris")
os.makedirs(MNT, exist_ok=True)
os.makedirs(MNT_RO, exist_ok=True)

committed = {}  # path relative to the mount -> sha256 hex
lock = threading.Lock()
counts = {"files": 0, "bytes": 0, "kills": 0, "registrations": 0, "reads": 0, "gc_runs": 0,
          "refused_as_expected": 0, "errors": 0}
errors = []
stop = threading.Event()
alive = threading.Event()
ro_alive = threading.Event()  # the read-only mount is up
ro_lock = threading.Lock()  # held around each use of the read-only mount, and to unmount it
generation = [0]  # bumped before each kill: an fd or an operation of an older one may fail


def error(msg):
    with lock:
        counts["errors"] += 1
        errors.append(msg)
    print("ERROR:", msg, flush=True)


def mount(resume=True):
    subprocess.run([BIN, "mount", "--store", STORE, "--settle", "0.5", "--max-file-size", "2G", MNT],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if resume:
        alive.set()


def mounted(path):
    with open("/proc/mounts") as f:
        return any(line.split()[1] == path for line in f)


def mount_ro():
    subprocess.run([BIN, "mount", "--store", STORE, "--read-only", "--log-file", RO_LOG, MNT_RO],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ro_alive.set()


def unmount_ro():
    """Unmounts the read-only mount once no worker is using it (waits for the daemon to end)."""
    ro_alive.clear()
    with ro_lock:
        if not mounted(MNT_RO):
            return
        try:
            r = subprocess.run([BIN, "unmount", MNT_RO], capture_output=True, text=True, timeout=30)
            ok = r.returncode == 0
            why = r.stderr.strip()
        except subprocess.TimeoutExpired:
            ok, why = False, "timed out"
        if not ok:
            error(f"unmount of the read-only mount failed: {why}")
            subprocess.run(["umount", "-l", MNT_RO], stderr=subprocess.DEVNULL)


def interrupted(gen):
    """Whether a failure may come from a kill: the daemon is down, or was restarted since `gen`."""
    return not alive.is_set() or generation[0] != gen


def sha256_of(path):
    """Hashes a file in chunks (sparse files of 1 GiB are read back too)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
            got = sha256_of(os.path.join(MNT, rel))
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


def verify(stage, sample=None, root=MNT):
    """Checks committed files: all of them, or `sample` random ones plus the newest 200."""
    with lock:
        items = list(committed.items())
    if sample is not None and len(items) > sample + 200:
        items = random.Random(len(items)).sample(items[:-200], sample) + items[-200:]
    for rel, h in items:
        try:
            if sha256_of(os.path.join(root, rel)) != h:
                error(f"{stage}: {rel} has wrong bytes")
        except OSError as e:
            error(f"{stage}: {rel}: {e!r}")


# ----- hostile workloads ---------------------------------------------------------------------

GiB = 1 << 30
new = {"sparse_efbig": 0, "sparse_efbig_fresh": 0, "sparse_close_failed": 0,
       "sparse_commits": 0, "big_registrations": 0,
       "big_files": 0, "register_ebusy": 0, "register_einval": 0, "register_busy_retries": 0,
       "probes": 0, "dup_checks": 0, "dup_first_ebusy": 0, "dup_first_enoent": 0,
       "dup_interrupted": 0, "dup_cut": 0}
big_durations = []  # seconds of each large registration's setxattr
probe_worst = [0.0]
zero_hashes = {}  # (head, offset, byte) -> sha256 hex of head + zeros up to offset + byte


def bump(key, by=1):
    with lock:
        new[key] += by


def sparse_hash(head, offset, byte):
    """SHA-256 of `head`, zeros up to `offset`, then `byte`, hashing zeros in 8 MiB chunks."""
    key = (head, offset, byte)
    if key not in zero_hashes:
        h = hashlib.sha256(head)
        zeros = bytes(8 << 20)
        left = offset - len(head)
        while left > 0:
            h.update(zeros[:min(left, len(zeros))])
            left -= len(zeros)
        h.update(byte)
        zero_hashes[key] = h.hexdigest()
    return zero_hashes[key]


def sparse_writer():
    """New files with one byte written (or ftruncate) far out: past --max-file-size (EFBIG, the
    file keeps the bytes it had, committed by a dup's close() or not yet), or at about 1 GiB
    (close() commits head + zeros + the byte)."""
    rnd = random.Random(11)
    run = os.path.join("runs", "soak-sparse", "artifacts")
    i = 0
    last_commit = 0.0
    while not stop.is_set():
        if not alive.wait(1):
            continue
        stop.wait(rnd.uniform(1, 4))
        if stop.is_set() or not alive.is_set():
            continue
        gen = generation[0]
        rel = os.path.join(run, f"s{i}")
        i += 1
        path = os.path.join(MNT, rel)
        head = rnd.randbytes(rnd.choice([1, 100, 5000]))
        # A commit of 1 GiB costs the daemon (and this script) a few seconds: at most one in 20 s.
        big = time.time() - last_commit > 20 and new["sparse_commits"] < 12
        mode = "commit" if big else rnd.choice(["efbig", "efbig-fresh"])
        fds = []
        try:
            os.makedirs(os.path.join(MNT, run), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fds.append(fd)
            os.write(fd, head)
            if mode == "commit":
                offset = GiB + rnd.choice([0, 4095, 123_457])
                byte = rnd.choice([b"\x01", b"z"])
                os.pwrite(fd, byte, offset)
                fds.pop()
                t0 = time.monotonic()
                os.close(fd)  # hashes 1 GiB
                took = time.monotonic() - t0
                expect = sparse_hash(head, offset, byte)
                st = os.stat(path)
                if st.st_size != offset + 1:
                    error(f"{rel}: sparse file has size {st.st_size}, wrote {offset + 1}")
                xattr = os.getxattr(path, "user.artifactfs.sha256").decode()
                if xattr != expect:
                    error(f"{rel}: sha256 xattr {xattr}, expected {expect}")
                if sha256_of(path) != expect:
                    error(f"{rel}: sparse file read back wrong bytes")
                with lock:
                    committed[rel] = expect
                    counts["files"] += 1
                    counts["bytes"] += offset + 1
                bump("sparse_commits")
                last_commit = time.time()
                print(f"{time.strftime('%H:%M:%S')} sparse commit of {offset + 1} bytes, close() took {took:.1f} s", flush=True)
                continue
            if mode == "efbig":
                # Commit the head through a dup's close(), so the file has something to keep.
                d = os.dup(fd)
                fds.append(d)
                fds.remove(fd)
                os.close(fd)
                fd = d
            offset = rnd.choice([MAX_FILE_SIZE, MAX_FILE_SIZE + GiB, 8 << 40])
            try:
                if rnd.random() < 0.25:
                    os.ftruncate(fd, offset + 1)
                else:
                    os.pwrite(fd, b"x", offset)
                error(f"{rel}: a write to {offset} past --max-file-size 2G was allowed")
            except OSError as e:
                if e.errno != 27:  # EFBIG
                    raise
            fds.remove(fd)
            # The refused write never happened: the file keeps what it had, the head (committed
            # by the dup's close(), or by this close()).
            try:
                os.close(fd)
            except OSError as e:
                if interrupted(gen):
                    continue
                bump("sparse_close_failed")
                print(f"note: {rel}: close() after EFBIG: {e!r}", flush=True)
            want = hashlib.sha256(head).hexdigest()
            st = os.stat(path)
            if st.st_size != len(head) or sha256_of(path) != want:
                error(f"{rel}: after EFBIG the file has {st.st_size} bytes, not its {len(head)} earlier ones")
            elif os.getxattr(path, "user.artifactfs.sha256").decode() != want:
                error(f"{rel}: after EFBIG the sha256 xattr is not the earlier bytes' hash")
            with lock:
                committed[rel] = want
                counts["files"] += 1
                counts["bytes"] += len(head)
            bump("sparse_efbig" if mode == "efbig" else "sparse_efbig_fresh")
        except OSError as e:
            if interrupted(gen):
                continue
            error(f"sparse {mode} {rel}: {e!r}")
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass


def probe(done, model):
    """Stats names the kernel has not cached (each a new one) while a registration runs, and a
    registry directory (cached for one second); records the worst latency."""
    i = 0
    base = os.path.join(MNT, "runs", "soak-probe", "artifacts")
    while not done.is_set():
        for path in (os.path.join(base, f"missing-{os.getpid()}-{time.monotonic_ns()}-{i}"), model):
            t0 = time.monotonic()
            try:
                os.stat(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                if alive.is_set():
                    error(f"probe stat {path}: {e!r}")
                return
            took = time.monotonic() - t0
            with lock:
                new["probes"] += 1
                probe_worst[0] = max(probe_worst[0], took)
            i += 1
        time.sleep(0.005)


def register(model, dir_name, source):
    os.setxattr(os.path.join(MNT, "models", model), f"user.artifactfs.register.{dir_name}",
                source.encode())


def build(src, files, made, lost):
    """Creates `files` (relative path -> bytes) below `src`, resuming after a kill: a name whose
    create gets EEXIST was committed before the kill (kept if its bytes are right) or is a
    tombstone of a write the kill cut off (given up)."""
    for rel, data in files.items():
        if rel in made or rel in lost:
            continue
        if stop.is_set():
            return False
        path = os.path.join(MNT, src, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            try:
                if sha256_of(path) != hashlib.sha256(data).hexdigest():
                    error(f"{src}/{rel}: committed before a kill with wrong bytes")
                    lost.add(rel)
                    continue
            except FileNotFoundError:
                lost.add(rel)
                continue
        made.add(rel)
    return True


def big_registrar():
    """Registers model directories of a few thousand files by reference, with a probe stat-ing
    meanwhile; and expects EBUSY for a source with a file open for writing, EINVAL for a run."""
    rnd = random.Random(13)
    model = "soakbig"
    fixture = {}
    for name in sorted(os.listdir(FIXTURE)):
        with open(os.path.join(FIXTURE, name), "rb") as f:
            fixture[name] = f.read()
    k = 0
    while not stop.is_set() and k < 12:
        if not alive.wait(1):
            continue
        run_id = f"soakbig{k}"
        src = f"runs/{run_id}/artifacts/model"
        files = dict(fixture)
        for d in range(30):
            for j in range(100):
                files[f"d{d:02}/f{j:03}.txt"] = f"{run_id} {d} {j} ".encode() * rnd.randint(1, 20)
        k += 1
        made, lost = set(), set()
        ok = False
        t_build = time.monotonic()
        for attempt in range(6):  # kills may land while building: resume after each restart
            if stop.is_set() or not alive.wait(30):
                break
            gen = generation[0]
            try:
                os.makedirs(os.path.join(MNT, "models", model), exist_ok=True)
                os.makedirs(os.path.join(MNT, "runs", run_id), exist_ok=True)
                if build(src, files, made, lost):
                    ok = True
                break
            except OSError as e:
                if not interrupted(gen):
                    error(f"building {src}: {e!r}")
                    break
        if not ok or "MLmodel" in lost:
            continue
        t_build = time.monotonic() - t_build
        gen = generation[0]
        try:
            # The last files' releases may still be on their way: EBUSY until they arrive.
            done = threading.Event()
            prober = threading.Thread(target=probe, args=(done, os.path.join(MNT, "models", model)))
            prober.start()
            try:
                t0 = time.monotonic()
                for retry in range(40):
                    try:
                        register(model, f"v{k}", src)
                        break
                    except OSError as e:
                        if e.errno != 16 or retry == 39:
                            raise
                        bump("register_busy_retries")
                        time.sleep(0.05)
                took = time.monotonic() - t0
            finally:
                done.set()
                prober.join()
            with lock:
                big_durations.append(took)
            vdir = os.path.join(MNT, "models", model, f"v{k}")
            listed = set()

            def walk_error(e):
                raise e  # os.walk would skip a directory it cannot list (a kill under it)

            for root, _, names in os.walk(vdir, onerror=walk_error):
                for n in names:
                    listed.add(os.path.relpath(os.path.join(root, n), vdir))
            if listed != made and not interrupted(gen):
                error(f"{model}/v{k}: lists {len(listed)} files, the source has {len(made)}; "
                      f"missing {sorted(made - listed)[:3]}, extra {sorted(listed - made)[:3]}")
            for rel in rnd.sample(sorted(made), 20):
                if sha256_of(os.path.join(vdir, rel)) != hashlib.sha256(files[rel]).hexdigest():
                    error(f"{model}/v{k}/{rel}: wrong bytes")
            status = b""
            for _ in range(100):
                status = os.getxattr(vdir, "user.artifactfs.status")
                if status.startswith(b"READY") or stop.is_set():
                    break
                time.sleep(0.2)
            if not status.startswith(b"READY") and not stop.is_set():
                error(f"{model}/v{k}: {status!r} 20 s after its registration, not READY")
            bump("big_registrations")
            bump("big_files", len(made))
            print(f"{time.strftime('%H:%M:%S')} registered {len(made)} files (built in {t_build:.1f} s) "
                  f"in {took * 1000:.0f} ms: {status.decode(errors='replace')}", flush=True)

            # Not a model directory: a whole run, and a directory without MLmodel.
            for bad in (f"runs/{run_id}", f"{src}/d00"):
                try:
                    register(model, f"inval{k}", bad)
                    error(f"registering {bad} was allowed")
                except OSError as e:
                    if e.errno != 22:
                        raise
                    bump("register_einval")

            # A source with a file still open for writing (sometimes committed by a dup's close()).
            busy_src = f"runs/{run_id}/artifacts/busy"
            build(busy_src, fixture, set(), set())
            time.sleep(0.6)  # the fixture's releases arrive
            fd = os.open(os.path.join(MNT, busy_src, "held.bin"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, b"still being written")
                if rnd.random() < 0.5:
                    os.close(os.dup(fd))  # commits, the file stays open for writing
                try:
                    register(model, f"busy{k}", busy_src)
                    error(f"registering {busy_src} with a file open for writing was allowed")
                except OSError as e:
                    if e.errno != 16:
                        raise
                    bump("register_ebusy")
            finally:
                os.close(fd)
        except OSError as e:
            if interrupted(gen):
                continue
            error(f"large registration {src}: {e!r}")
        stop.wait(rnd.uniform(5, 15))


class Interrupted(Exception):
    pass


def ro_read(rel):
    """Reads `rel` through the read-only mount: its bytes, or the errno."""
    with ro_lock:
        if not ro_alive.is_set():
            raise Interrupted
        try:
            with open(os.path.join(MNT_RO, rel), "rb") as f:
                return f.read()
        except OSError as e:
            return e.errno


def dup_worker():
    """A file written through two descriptors on the writable mount: the first close() commits
    the first bytes, the dup writes others. The read-only mount must never serve the first bytes:
    EBUSY (or ENOENT) until the dup's close(), the final bytes within a moment after it."""
    rnd = random.Random(17)
    run = os.path.join("runs", "soak-dup", "artifacts")
    i = 0
    while not stop.is_set():
        if not alive.wait(1) or not ro_alive.wait(1):
            continue
        gen = generation[0]
        rel = os.path.join(run, f"d{i}")
        i += 1
        n = rnd.choice([1, 100, 4096, 70_000, 300_000])
        first = b"A" * n
        final = b"B" * n + (rnd.randbytes(rnd.choice([0, 10, 5000])) if rnd.random() < 0.5 else b"")
        fds = []
        try:
            os.makedirs(os.path.join(MNT, run), exist_ok=True)
            fd = os.open(os.path.join(MNT, rel), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fds.append(fd)
            os.write(fd, first)
            d = os.dup(fd)
            fds.append(d)
            fds.remove(fd)
            os.close(fd)  # commits `first`; the file stays open through `d`
            t0 = time.monotonic()
            got = ro_read(rel)
            if isinstance(got, bytes):
                what = "the intermediate content" if got == first else f"{len(got)} bytes"
                error(f"{rel}: read-only mount served {what} of a file still open for writing")
            elif got == 16:
                bump("dup_first_ebusy")
                if time.monotonic() - t0 < 0.4:
                    print(f"note: {rel}: EBUSY after {time.monotonic() - t0:.2f} s", flush=True)
            elif got == 2:
                bump("dup_first_enoent")
            elif not interrupted(gen):
                error(f"{rel}: read-only open of a file being written: {os.strerror(got)}")
            os.pwrite(d, final, 0)
            fds.remove(d)
            os.close(d)  # commits `final` and seals
            with lock:
                committed[rel] = hashlib.sha256(final).hexdigest()
                counts["files"] += 1
                counts["bytes"] += len(final)
            t1 = time.monotonic()
            deadline = t1 + 3
            cut = cut_at = cut_size = None
            while True:
                got = ro_read(rel)
                if isinstance(got, bytes):
                    if got == final:
                        if cut is None:
                            bump("dup_checks")
                        else:
                            error(f"{rel}: read-only mount served the final content cut to the "
                                  f"first close()'s {cut} bytes (of {len(final)}; st_size {cut_size}) "
                                  f"{cut_at:.2f} s after the final close(), all of it after {time.monotonic() - t1:.2f} s")
                        break
                    elif got == first:
                        error(f"{rel}: read-only mount served the intermediate content after the final close()")
                        break
                    elif got == final[:len(got)] and cut is None:
                        # Keep reading: how long does the short read last?
                        bump("dup_cut")
                        cut, cut_at = len(got), time.monotonic() - t1
                        with ro_lock:
                            try:
                                cut_size = os.stat(os.path.join(MNT_RO, rel)).st_size
                            except OSError:
                                cut_size = None
                    elif got != final[:len(got)]:
                        error(f"{rel}: read-only mount served {len(got)} bytes, not the final {len(final)}")
                        break
                    if time.monotonic() > deadline:
                        error(f"{rel}: read-only mount served {len(got)} bytes, not the final {len(final)}, for 3 s")
                        break
                    time.sleep(0.1)
                    continue
                if got not in (16, 2) and not interrupted(gen):
                    error(f"{rel}: read-only open after the final close(): {os.strerror(got)}")
                    break
                if time.monotonic() > deadline:
                    if not interrupted(gen):
                        error(f"{rel}: read-only mount still answers {os.strerror(got)} 3 s after the final close()")
                    break
                time.sleep(0.1)
        except Interrupted:
            bump("dup_interrupted")
        except OSError as e:
            if interrupted(gen):
                bump("dup_interrupted")
                continue
            error(f"dup {rel}: {e!r}")
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        stop.wait(rnd.uniform(0, 0.3))


def stop_daemons():
    unmount_ro()
    if mounted(MNT):
        subprocess.run([BIN, "unmount", MNT])
    if mounted(MNT):
        subprocess.run(["umount", "-l", MNT], stderr=subprocess.DEVNULL)


def main():
    mount()
    mount_ro()
    deadline = time.time() + MINUTES * 60
    # The writers stop at the deadline even while the main loop is busy restarting.
    timer = threading.Timer(MINUTES * 60, stop.set)
    timer.daemon = True
    timer.start()
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=reader), threading.Thread(target=registrar)]
    threads += [threading.Thread(target=sparse_writer), threading.Thread(target=big_registrar),
                threading.Thread(target=dup_worker)]
    for t in threads:
        t.daemon = True
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
        generation[0] += 1
        unmount_ro()  # a read-only daemon holds no lock, but is not what this kill is about
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
        mount_ro()
        alive.set()
        verify(f"restart {counts['kills']}", sample=300)
        print(f"{time.strftime('%H:%M:%S')} kill {counts['kills']} survived; {counts['files']} files so far", flush=True)

    stop.set()
    alive.set()
    for t in threads:
        t.join(timeout=300)
        if t.is_alive():
            error(f"worker {t.name} did not stop within 5 minutes of the deadline")
    verify("final")
    verify("final, read-only mount", sample=300, root=MNT_RO)
    stop_daemons()
    fsck = subprocess.run([BIN, "fsck", "--verify", "--store", STORE], capture_output=True, text=True)
    print(fsck.stdout.strip())
    if fsck.returncode != 0:
        error("fsck --verify failed")


try:
    main()
except BaseException as e:  # Ctrl-C, or a mount that failed: stop everything, unmount both
    stop.set()
    error(f"soak aborted: {e!r}")
    raise
finally:
    stop.set()
    stop_daemons()

durations = sorted(big_durations)
print()
print(f"{'files written':<32}{counts['files']}")
print(f"{'bytes written':<32}{counts['bytes']}")
print(f"{'kills survived':<32}{counts['kills']}")
print(f"{'registrations':<32}{counts['registrations']}")
print(f"{'reads verified':<32}{counts['reads']}")
print(f"{'gc runs':<32}{counts['gc_runs']}")
print(f"{'refusals (expected)':<32}{counts['refused_as_expected']}")
print(f"{'sparse EFBIG, head committed':<32}{new['sparse_efbig']} (by a dup's close() first)")
print(f"{'sparse EFBIG, head uncommitted':<32}{new['sparse_efbig_fresh']} "
      f"(close() failed after EFBIG: {new['sparse_close_failed']})")
print(f"{'sparse 1 GiB commits':<32}{new['sparse_commits']}")
print(f"{'large registrations':<32}{new['big_registrations']} ({new['big_files']} files)")
if durations:
    print(f"{'  setxattr ms min/median/max':<32}{durations[0] * 1000:.0f} / "
          f"{durations[len(durations) // 2] * 1000:.0f} / {durations[-1] * 1000:.0f}")
print(f"{'  EBUSY retries (releases)':<32}{new['register_busy_retries']}")
print(f"{'register EBUSY (expected)':<32}{new['register_ebusy']}")
print(f"{'register EINVAL (expected)':<32}{new['register_einval']}")
print(f"{'probe stats, worst latency':<32}{new['probes']}, {probe_worst[0] * 1000:.0f} ms")
print(f"{'dup checks passed':<32}{new['dup_checks']} (first read EBUSY {new['dup_first_ebusy']}, "
      f"ENOENT {new['dup_first_enoent']}; cut by kills {new['dup_interrupted']})")
print(f"{'dup final reads cut short':<32}{new['dup_cut']} (the read-only mount's stale size)")
print(f"{'unexpected errors':<32}{counts['errors']}")
for e in errors[:20]:
    print("  ", e)
sys.exit(1 if counts["errors"] else 0)
