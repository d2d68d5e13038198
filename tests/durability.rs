//! Crash safety and concurrency against real mounts: the daemon is killed with SIGKILL while a
//! writer is busy, processes race to create one path, threads write side by side, and the store
//! must come back exactly as the writers were told it was.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::*;

// ----- local helpers -------------------------------------------------------------------------

/// A small seeded generator for the test's own choices (kill moments, file positions).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform-ish in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The seed of the crash test: `AFS_CRASH_SEED` if set (to replay a failure), else fixed.
fn crash_seed() -> u64 {
    std::env::var("AFS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_260_401)
}

/// A child process killed (and reaped) on drop if it is still running, e.g. when a test fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reads a file, retrying briefly on EBUSY (the window between `close()` returning and the
/// kernel's asynchronous RELEASE). Returns the bytes and how many EBUSY retries it took.
fn read_retrying_busy(path: &Path) -> (Vec<u8>, u32) {
    let mut busy = 0;
    loop {
        match fs::read(path) {
            Ok(b) => return (b, busy),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && busy < 250 => {
                busy += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("read {}: {e}", path.display()),
        }
    }
}

/// `sha256sum` (coreutils, fast even where this test is built without optimisation) of every
/// regular file below `dir`, keyed by path relative to `dir`.
fn hashes_below(dir: &Path) -> BTreeMap<String, String> {
    let out = sh_ok(
        dir,
        "find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum",
    );
    out.lines()
        .map(|l| {
            let (hash, path) = l
                .split_once("  ")
                .unwrap_or_else(|| panic!("sha256sum line {l:?}"));
            (path.trim_start_matches("./").to_string(), hash.to_string())
        })
        .collect()
}

// ----- kill -9 while writing -----------------------------------------------------------------

/// The writer: for each file it records `intent NAME SIZE SHA256` (fsync'd) before open(), and
/// `done NAME` (fsync'd) only after close() returned 0. On the first error it records
/// `error NAME ERRNO` and exits 3. The record lives outside the mount.
const WRITER_PY: &str = r#"
import hashlib, os, random, sys

dest, record = sys.argv[1], sys.argv[2]
seed, count, big_at, big_size = (int(a) for a in sys.argv[3:7])
rec = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

def note(line):
    os.write(rec, (line + "\n").encode())
    os.fsync(rec)

sizes = random.Random(seed)
for i in range(count + 1):
    if i == big_at:
        name, size = "big.bin", big_size
    else:
        name, size = "f%03d.bin" % (i if i < big_at else i - 1), sizes.randint(1 << 10, 256 << 10)
    data = random.Random(seed * 100003 + i).randbytes(size)
    note("intent %s %d %s" % (name, size, hashlib.sha256(data).hexdigest()))
    fd = None
    try:
        fd = os.open(os.path.join(dest, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        view = memoryview(data)
        while view:
            n = os.write(fd, view[: 1 << 20])
            view = view[n:]
        closing, fd = fd, None
        os.close(closing)
    except OSError as e:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        note("error %s %d" % (name, e.errno))
        sys.exit(3)
    note("done %s" % name)
note("finished")
"#;

#[derive(Default, Debug)]
struct Record {
    /// name -> (size, sha256) the writer meant to store.
    intents: BTreeMap<String, (u64, String)>,
    /// Files whose close() returned 0.
    done: BTreeSet<String>,
    error: Option<(String, i32)>,
    finished: bool,
}

fn read_record(path: &Path) -> Record {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut r = Record::default();
    // Only complete lines count (the writer may be appending).
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    for line in complete.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["intent", name, size, sha] => {
                r.intents
                    .insert(name.to_string(), (size.parse().unwrap(), sha.to_string()));
            }
            ["done", name] => {
                r.done.insert(name.to_string());
            }
            ["error", name, errno] => r.error = Some((name.to_string(), errno.parse().unwrap())),
            ["finished"] => r.finished = true,
            _ => panic!("bad record line {line:?}"),
        }
    }
    r
}

fn done_count(path: &Path) -> usize {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("done "))
        .count()
}

#[test]
fn sigkill_while_writing_loses_nothing_acknowledged_and_leaves_no_partial_file() {
    let Some(mut m) =
        Mount::new("sigkill_while_writing_loses_nothing_acknowledged_and_leaves_no_partial_file")
    else {
        return;
    };
    const ROUNDS: u64 = 5;
    const SMALL_FILES: u64 = 200;
    const BIG: u64 = 32 << 20;
    let seed = crash_seed();
    eprintln!("crash test seed {seed} (replay with AFS_CRASH_SEED={seed})");
    let mut rng = Rng::new(seed);
    let script = m.dir.path().join("writer.py");
    fs::write(&script, WRITER_PY).unwrap();
    let started = Instant::now();
    // Every round's acknowledged files: they must survive all later crashes too.
    let mut acknowledged: Vec<(String, String, u64)> = Vec::new();

    for round in 0..ROUNDS {
        let t0 = Instant::now();
        let run = format!("runs/r{round}");
        fs::create_dir(m.path(&run)).unwrap();
        let dest = m.path(&format!("{run}/artifacts"));
        let record_path = m.dir.path().join(format!("record-{round}.txt"));
        let big_at = rng.below(SMALL_FILES + 1);
        // Even rounds kill while the 32 MiB file is being written; odd rounds at any file.
        let kill_after = if round.is_multiple_of(2) {
            big_at
        } else {
            rng.below(SMALL_FILES)
        };
        let delay = Duration::from_millis(rng.below(40));
        let file_seed = seed.wrapping_add(round) % 1_000_000;

        let mut writer = KillOnDrop(
            Command::new("python3")
                .arg(&script)
                .arg(&dest)
                .arg(&record_path)
                .args([file_seed, SMALL_FILES, big_at, BIG].map(|n| n.to_string()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let reached = wait_until(Duration::from_secs(60), || {
            done_count(&record_path) as u64 >= kill_after || writer.0.try_wait().unwrap().is_some()
        });
        assert!(reached, "round {round}: the writer made no progress");
        std::thread::sleep(delay);
        let pid = m.daemon_pid();
        kill9(pid);
        let wrote_for = t0.elapsed();

        // The writer must see errors and stop on its own.
        let writer_status = {
            let end = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(s) = writer.0.try_wait().unwrap() {
                    break s;
                }
                if Instant::now() > end {
                    let _ = writer.0.kill();
                    let _ = writer.0.wait();
                    panic!("round {round}: the writer hangs after the daemon was killed");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let mut writer_err = String::new();
        writer
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut writer_err)
            .unwrap();
        let rec = read_record(&record_path);
        eprintln!(
            "round {round}: big.bin at {big_at}, kill after {kill_after} files + {delay:?} \
             ({wrote_for:?} in): {} done, writer {writer_status}, error {:?}",
            rec.done.len(),
            rec.error
        );
        if rec.finished {
            eprintln!("round {round}: the writer finished before the kill landed");
        } else {
            let (name, errno) = rec.error.clone().unwrap_or_else(|| {
                panic!("round {round}: writer stopped without recording an error: {writer_err}")
            });
            assert!(
                errno == libc::ENOTCONN || errno == libc::ECONNABORTED,
                "round {round}: the writer's error on {name} was errno {errno}, expected ENOTCONN \
                 (or ECONNABORTED for a request in flight)"
            );
        }

        // Remount the same store.
        m.mark_stale();
        assert!(
            !is_mounted(&m.mnt),
            "round {round}: the stale mount is still there"
        );
        m.mount(&[]);

        let tmp: Vec<_> = fs::read_dir(m.store.join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(
            tmp.is_empty(),
            "round {round}: STORE/tmp not empty after remount: {tmp:?}"
        );

        // Everything visible must be something the writer meant, complete and correct.
        let visible = hashes_below(&dest);
        for (name, sha) in &visible {
            let (size, want) = rec.intents.get(name).unwrap_or_else(|| {
                panic!("round {round}: {name} is visible but the writer never created it")
            });
            assert_eq!(
                sha, want,
                "round {round}: {name} is visible with content the writer did not write (partial?)"
            );
            let p = dest.join(name);
            assert_eq!(
                fs::metadata(&p).unwrap().len(),
                *size,
                "round {round}: size of {name}"
            );
            assert_eq!(&sha_xattr(&p), want, "round {round}: xattr of {name}");
        }
        // Everything acknowledged must be there.
        for name in &rec.done {
            assert!(
                visible.contains_key(name),
                "round {round}: {name} was acknowledged by close() but is gone after the crash"
            );
            let (size, sha) = &rec.intents[name];
            acknowledged.push((format!("{run}/artifacts/{name}"), sha.clone(), *size));
        }
        let unacknowledged: Vec<_> = visible.keys().filter(|n| !rec.done.contains(*n)).collect();
        if !unacknowledged.is_empty() {
            eprintln!(
                "round {round}: committed but not acknowledged (complete, allowed): {unacknowledged:?}"
            );
        }

        // Every row has its blob, of the right size. (The bytes of this round's files were
        // just hashed through the mount; `fsck --verify` re-hashes every blob once, at the end,
        // which keeps the test linear in the data written.)
        let fsck = m.cli(&["fsck"]);
        assert!(
            fsck.status.success(),
            "round {round}: fsck: {}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        eprintln!("round {round} took {:?}", t0.elapsed());
    }

    // Earlier rounds' files survived the later crashes.
    for (rel, sha, size) in &acknowledged {
        let p = m.path(rel);
        let meta =
            fs::metadata(&p).unwrap_or_else(|e| panic!("{rel} lost after later crashes: {e}"));
        assert_eq!(meta.len(), *size, "{rel}");
        assert_eq!(&sha_xattr(&p), sha, "{rel}");
    }
    m.unmount();
    let fsck = m.cli(&["fsck", "--verify"]);
    assert!(
        fsck.status.success(),
        "fsck --verify after {ROUNDS} crashes: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    eprintln!(
        "{} acknowledged files over {ROUNDS} crashes, {:?}",
        acknowledged.len(),
        started.elapsed()
    );
}

/// A file fsync'd and still open survives a crash with exactly its fsync'd content, even when
/// more bytes were written after the fsync.
#[test]
fn fsynced_file_is_in_the_index_and_survives_a_crash_while_open() {
    let Some(mut m) = Mount::new("fsynced_file_is_in_the_index_and_survives_a_crash_while_open")
    else {
        return;
    };
    fs::create_dir(m.path("runs/s")).unwrap();
    let data = pseudo_random(7, 100_000);
    let sha = sha256_hex(&data);
    let mut f = File::create(m.path("runs/s/artifacts/data.bin")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();

    // Still open, still mounted: the index already has it.
    let out = m.cli(&["ls", "runs/s/artifacts"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = listing
        .lines()
        .find(|l| l.ends_with("data.bin") || l.contains(" data.bin "))
        .unwrap_or_else(|| panic!("fsync'd data.bin not listed by `artifactfs ls`:\n{listing}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[1], data.len().to_string(), "{line}");
    assert_eq!(fields[2], &sha[..16], "{line}");

    // More bytes after the fsync, then the daemon dies before close().
    f.write_all(b"not synced, never closed").unwrap();
    kill9(m.daemon_pid());
    drop(f);
    m.mark_stale();
    m.mount(&[]);
    let p = m.path("runs/s/artifacts/data.bin");
    assert_eq!(
        fs::read(&p).unwrap(),
        data,
        "content after the crash is not the fsync'd content"
    );
    assert_eq!(sha_xattr(&p), sha);
    let fsck = m.cli(&["fsck", "--verify"]);
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

// ----- clean remount -------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: char,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime_ns: i128,
    sha: Option<String>,
    xattr: Option<String>,
}

/// Every entry below `root`: type, mode, owner, size, mtime, content hash and hash xattr.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let meta = fs::symlink_metadata(&p).unwrap();
            let mtime = meta.modified().unwrap();
            let mtime_ns = match mtime.duration_since(UNIX_EPOCH) {
                Ok(d) => d.as_nanos() as i128,
                Err(e) => -(e.duration().as_nanos() as i128),
            };
            let file = meta.is_file();
            if meta.is_dir() {
                stack.push(p.clone());
            }
            out.insert(
                p.strip_prefix(root).unwrap().to_path_buf(),
                Node {
                    kind: if file {
                        'f'
                    } else if meta.is_dir() {
                        'd'
                    } else {
                        '?'
                    },
                    mode: meta.mode(),
                    uid: meta.uid(),
                    gid: meta.gid(),
                    size: meta.len(),
                    mtime_ns,
                    sha: file.then(|| sha256_hex(&read_retrying_busy(&p).0)),
                    xattr: file.then(|| sha_xattr(&p)),
                },
            );
        }
    }
    out
}

#[test]
fn clean_remount_shows_the_same_tree() {
    let Some(mut m) = Mount::new("clean_remount_shows_the_same_tree") else {
        return;
    };
    sh_ok(
        &m.mnt,
        "set -e
         mkdir runs/a runs/b runs/gone
         mkdir -p runs/a/artifacts/sub/deep runs/a/artifacts/empty runs/a/artifacts/removed
         echo hello > runs/a/artifacts/x.txt
         head -c 65536 /dev/urandom > runs/a/artifacts/sub/deep/y.bin
         cp runs/a/artifacts/x.txt runs/b/artifacts/same-as-x.txt
         : > runs/b/artifacts/empty-file
         printf 'to be renamed' > runs/b/artifacts/old-name
         mv runs/b/artifacts/old-name runs/b/artifacts/new-name
         printf 'to be removed' > runs/b/artifacts/unlinked
         rm runs/b/artifacts/unlinked
         rmdir runs/a/artifacts/removed runs/gone
         chmod 600 runs/a/artifacts/x.txt
         chmod 700 runs/a/artifacts/sub
         touch -d '2001-02-03 04:05:06.789' runs/a/artifacts/sub/deep/y.bin",
    );
    let before = snapshot(&m.mnt);
    assert!(before.len() >= 12, "{before:#?}");
    m.unmount();
    assert!(!is_mounted(&m.mnt));
    m.mount(&[]);
    let after = snapshot(&m.mnt);
    let changed: Vec<_> = before
        .keys()
        .chain(after.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| format!("{}: {:?} -> {:?}", k.display(), before.get(k), after.get(k)))
        .collect();
    assert!(
        changed.is_empty(),
        "the tree changed across a clean remount:\n{}",
        changed.join("\n")
    );
    // The removed entries stay removed, the tombstones still apply.
    assert!(!m.path("runs/b/artifacts/unlinked").exists());
    assert!(!m.path("runs/gone").exists());
    // A renamed-away path takes back only its last content, after the remount too.
    let out = sh(
        &m.mnt,
        "python3 -c \"\nwith open('runs/b/artifacts/old-name', 'xb') as f:\n    f.write(b'something else')\n\"",
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "a renamed-away path took other content after remount: {out:?}"
    );
    assert!(!m.path("runs/b/artifacts/old-name").exists());
}

// ----- concurrency ---------------------------------------------------------------------------

/// Per round, 2-4 forked processes wait on one pipe, then all `open(O_CREAT|O_EXCL)` the same
/// path; the winner writes its own id and closes. Prints `ROUND PATH CODE...` per round, where
/// a code is 0 for the winner, 100+errno for an open that failed, 99 for anything else.
const RACE_PY: &str = r#"
import os, sys, time

dest, rounds = sys.argv[1], int(sys.argv[2])

def contend(path, ident, rfd):
    os.read(rfd, 1)  # returns at EOF, when the parent closes the write end: all start together
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except OSError as e:
        return 100 + e.errno
    os.write(fd, ident * 512)
    os.close(fd)
    return 0

for r in range(rounds):
    n = 2 + r % 3
    path = os.path.join(dest, "race-%02d" % r)
    rfd, wfd = os.pipe()
    kids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                os.close(wfd)
                code = contend(path, ("round %d process %d\n" % (r, i)).encode(), rfd)
            finally:
                os._exit(code)
        kids.append(pid)
    os.close(rfd)
    time.sleep(0.03)
    os.close(wfd)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in kids]
    print(r, path, *codes, flush=True)
"#;

#[test]
fn racing_exclusive_creates_have_exactly_one_winner() {
    let Some(m) = Mount::new("racing_exclusive_creates_have_exactly_one_winner") else {
        return;
    };
    fs::create_dir(m.path("runs/race")).unwrap();
    let script = m.dir.path().join("race.py");
    fs::write(&script, RACE_PY).unwrap();
    let dest = m.path("runs/race/artifacts");
    let out = run(
        m.dir.path(),
        "python3",
        [script.as_os_str(), dest.as_os_str(), "20".as_ref()],
    );
    assert!(
        out.status.success(),
        "race script: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut rounds = 0;
    let mut busy_retries = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (round, path) = (f[0], Path::new(f[1]));
        let codes: Vec<i32> = f[2..].iter().map(|c| c.parse().unwrap()).collect();
        let winners: Vec<usize> = (0..codes.len()).filter(|&i| codes[i] == 0).collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: codes {codes:?} (0 = won, 100+errno = refused)"
        );
        for (i, c) in codes.iter().enumerate() {
            assert!(
                *c == 0 || *c == 100 + libc::EEXIST,
                "round {round}: process {i} got code {c} (100+errno), expected EEXIST"
            );
        }
        let (content, busy) = read_retrying_busy(path);
        busy_retries += busy;
        let want = format!("round {round} process {}\n", winners[0]).repeat(512);
        assert!(
            content == want.as_bytes(),
            "round {round}: content is not the winner's ({} bytes, starts {:?})",
            content.len(),
            String::from_utf8_lossy(&content[..content.len().min(40)])
        );
        rounds += 1;
    }
    assert_eq!(rounds, 20, "{text}");
    if busy_retries > 0 {
        eprintln!(
            "note: {busy_retries} EBUSY retries reading files right after their writer exited"
        );
    }
}

#[test]
fn parallel_writers_to_different_files_keep_every_byte() {
    let Some(mut m) = Mount::new("parallel_writers_to_different_files_keep_every_byte") else {
        return;
    };
    const THREADS: u64 = 8;
    const FILES: u64 = 50;
    fs::create_dir(m.path("runs/par")).unwrap();
    let base = m.path("runs/par/artifacts");
    let content = |t: u64, i: u64| {
        pseudo_random(
            t * 1000 + i + 1,
            1 + ((t * 7919 + i * 104_729) % (32 << 10)) as usize,
        )
    };
    let path_of = |t: u64, i: u64| {
        // Half the files in the shared directory, half in the thread's own subdirectory.
        if i.is_multiple_of(2) {
            base.join(format!("t{t}-f{i:02}"))
        } else {
            base.join(format!("t{t}/f{i:02}"))
        }
    };
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (content, path_of, base) = (&content, &path_of, &base);
            s.spawn(move || {
                fs::create_dir(base.join(format!("t{t}"))).unwrap();
                for i in 0..FILES {
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o644)
                        .open(path_of(t, i))
                        .unwrap();
                    f.write_all(&content(t, i)).unwrap();
                }
            });
        }
    });
    eprintln!(
        "{} files written by {THREADS} threads in {:?}",
        THREADS * FILES,
        t0.elapsed()
    );
    let mut busy_retries = 0;
    for t in 0..THREADS {
        for i in 0..FILES {
            let p = path_of(t, i);
            let want = content(t, i);
            let (got, busy) = read_retrying_busy(&p);
            busy_retries += busy;
            assert!(
                got == want,
                "{} differs ({} bytes, want {})",
                p.display(),
                got.len(),
                want.len()
            );
            assert_eq!(sha_xattr(&p), sha256_hex(&want), "{}", p.display());
        }
    }
    if busy_retries > 0 {
        eprintln!("note: {busy_retries} EBUSY retries reading files right after their close()");
    }
    m.unmount();
    let fsck = m.cli(&["fsck", "--verify"]);
    let report = String::from_utf8_lossy(&fsck.stdout).into_owned();
    assert!(fsck.status.success(), "{report}");
    let n = THREADS * FILES;
    assert!(
        report.starts_with(&format!("{n} files ({n} live, 0 removed), {n} contents")),
        "{report}"
    );
}

// ----- clean stop ----------------------------------------------------------------------------

/// Holds the write lock of the SQLite database `argv[1]` from "locked" until stdin closes.
const HOLD_LOCK_PY: &str = r#"
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
c.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
c.execute("ROLLBACK")
"#;

/// The part of the daemon log written after `from` bytes.
fn log_since(m: &Mount, from: usize) -> String {
    m.log().get(from..).unwrap_or_default().to_string()
}

/// An unmount that lands while the periodic work is busy is a clean stop all the same: the
/// daemon lets the tick finish, then records the clean stop, and the next start checks nothing.
/// The tick is held busy deterministically: a model changed just now is validated by the tick
/// (`--settle 0`), and that waits for the index's write lock, which another process holds until
/// the unmount was issued.
#[test]
fn an_unmount_while_the_tick_is_busy_is_a_clean_stop() {
    let Some(mut m) = Mount::with_args(
        "an_unmount_while_the_tick_is_busy_is_a_clean_stop",
        &["--settle", "0"],
    ) else {
        return;
    };
    let script = m.dir.path().join("hold_lock.py");
    fs::write(&script, HOLD_LOCK_PY).unwrap();
    for round in 0..3 {
        let version = format!("models/m{round}/v1");
        fs::create_dir_all(m.path(&version)).unwrap();
        fs::write(m.path(&format!("{version}/MLmodel")), "not: [a model\n").unwrap();
        let mut holder = KillOnDrop(
            Command::new("python3")
                .arg(&script)
                .arg(m.store.join("index.sqlite"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut line = [0u8; 7];
        holder
            .0
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut line)
            .unwrap();
        assert_eq!(&line, b"locked\n");
        // The tick (every 200 ms) starts validating m{round} and waits for the lock.
        std::thread::sleep(Duration::from_millis(600));
        let mut unmount = KillOnDrop(
            Command::new(BIN)
                .arg("unmount")
                .arg(&m.mnt)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        assert!(
            wait_until(Duration::from_secs(10), || !is_mounted(&m.mnt)),
            "round {round}: not unmounted"
        );
        // The session is over; the tick is still waiting. Let it go on.
        drop(holder.0.stdin.take());
        assert!(holder.0.wait().unwrap().success());
        let status = unmount.0.wait().unwrap();
        let mut err = String::new();
        let _ = unmount.0.stderr.take().unwrap().read_to_string(&mut err);
        assert!(status.success(), "round {round}: unmount: {err}");
        m.mark_stale();
        let synced = fs::read_to_string(m.store.join("synced")).unwrap();
        assert!(
            synced.starts_with("clean "),
            "round {round}: STORE/synced after the unmount is {synced:?}, not a clean stop"
        );
        let from = m.log().len();
        m.mount(&["--settle", "0"]);
        let log = log_since(&m, from);
        assert!(
            log.contains("the last stop was clean: nothing to check") && !log.contains("unclean"),
            "round {round}: the start after a clean unmount:\n{log}"
        );
    }
}

/// With `--sync-every-close` every committed file's blob is durable before its row is written,
/// so the start after a `kill -9` re-hashes nothing (it used to re-hash everything committed
/// since the mount). The files are all there, intact.
#[test]
fn after_a_kill_with_sync_every_close_nothing_is_rehashed() {
    let Some(mut m) = Mount::with_args(
        "after_a_kill_with_sync_every_close_nothing_is_rehashed",
        &["--sync-every-close"],
    ) else {
        return;
    };
    fs::create_dir(m.path("runs/e")).unwrap();
    let mut files = Vec::new();
    // Small files (kept in memory, linked in) and a large one (a temp file, renamed).
    for i in 0..20u64 {
        let len = if i == 7 {
            8 << 20
        } else {
            1000 + i as usize * 997
        };
        let data = pseudo_random(100 + i, len);
        let rel = format!("runs/e/artifacts/f{i:02}");
        fs::write(m.path(&rel), &data).unwrap();
        files.push((rel, sha256_hex(&data)));
    }
    // The same content again: found already stored.
    fs::write(m.path("runs/e/artifacts/again"), pseudo_random(100, 1000)).unwrap();
    kill9(m.daemon_pid());
    m.mark_stale();
    let from = m.log().len();
    m.mount(&[]);
    let log = log_since(&m, from);
    let line = log
        .lines()
        .find(|l| l.contains("unclean stop"))
        .unwrap_or_else(|| panic!("the start after kill -9 saw no unclean stop:\n{log}"));
    assert!(
        line.contains("re-hashed 0 file(s)"),
        "the start after kill -9 re-hashed files that --sync-every-close had made durable:\n{line}"
    );
    for (rel, sha) in &files {
        assert_eq!(&sha_xattr(&m.path(rel)), sha, "{rel}");
    }
}
