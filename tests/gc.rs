//! Garbage collection against a live, written mount: no blob of a committed or in-flight file
//! is ever removed, no writer's close() fails while gc runs (its transactions are short and the
//! daemon waits out a locked index with the mount still answering), also on a store of 100,000
//! blobs.

mod common;

use std::fs;
use std::io::Write;
use std::os::fd::IntoRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A file name and the bytes whose close() returned.
type Written = (String, Vec<u8>);

#[test]
fn gc_racing_writers_never_loses_a_committed_file() {
    let Some(m) = Mount::new("gc_racing_writers_never_loses_a_committed_file") else {
        return;
    };
    fs::create_dir(m.path("runs/r")).unwrap();
    let art = m.path("runs/r/artifacts");
    let stop = Arc::new(AtomicBool::new(false));
    let written: Arc<Mutex<Vec<Written>>> = Arc::default();
    let mut writers = Vec::new();
    for t in 0..3u64 {
        let (art, stop, written) = (art.clone(), stop.clone(), written.clone());
        writers.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Few distinct contents: many commits are dedup hits on blobs that other
                // files' removal leaves unused, exactly what gc collects.
                let small = !i.is_multiple_of(3);
                let content = pseudo_random(i % 5, if small { 3000 } else { 1_500_000 });
                let name = format!("t{t}-{i}");
                write_and_close(&art.join(&name), &content)
                    .unwrap_or_else(|e| panic!("{name}: close() failed: {e}"));
                if i.is_multiple_of(4) {
                    // Removed files leave their blobs to tombstones only.
                    fs::remove_file(art.join(&name)).unwrap();
                } else {
                    written.lock().unwrap().push((name, content));
                }
                i += 1;
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut runs = 0;
    let mut removed_any = false;
    while Instant::now() < deadline {
        let out = Command::new(BIN)
            .args(["gc", "--older-than", "0", "--store"])
            .arg(&m.store)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        removed_any |= !text.contains("removed 0 ");
        runs += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert!(runs >= 3, "gc ran {runs} times");
    assert!(
        removed_any,
        "gc never found anything to collect: the race was not exercised"
    );
    let written = written.lock().unwrap();
    assert!(written.len() > 20, "only {} files written", written.len());
    for (name, content) in written.iter() {
        let got = fs::read(art.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(got == *content, "{name} changed");
    }
    let fsck = m.cli(&["fsck", "--verify"]);
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// Writes `bytes` to a new file and closes it, returning close()'s own result (dropping a
/// `File` ignores it, and close() is where a commit's failure is reported).
fn write_and_close(path: &Path, bytes: &[u8]) -> std::io::Result<Duration> {
    let step =
        |what: &str, e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"));
    let mut f = fs::File::create_new(path).map_err(|e| step("create", e))?;
    f.write_all(bytes).map_err(|e| step("write", e))?;
    let fd = f.into_raw_fd();
    let started = Instant::now();
    if unsafe { libc::close(fd) } != 0 {
        return Err(step("close", std::io::Error::last_os_error()));
    }
    Ok(started.elapsed())
}

#[test]
fn a_close_waits_out_a_held_index_lock_while_the_mount_answers() {
    let Some(mut m) = Mount::new("a_close_waits_out_a_held_index_lock_while_the_mount_answers")
    else {
        return;
    };
    fs::create_dir(m.path("runs/r")).unwrap();
    fs::write(m.path("runs/r/artifacts/other"), b"sealed before").unwrap();
    // Changes of the namespace during the hold are made in another directory: the kernel holds
    // a directory's lock while it waits for a create or unlink in it, so lookups of names in
    // that same directory that it has not cached wait with it.
    fs::create_dir(m.path("runs/s")).unwrap();
    fs::write(
        m.path("runs/s/artifacts/removed"),
        b"removed during the hold",
    )
    .unwrap();
    // A new mount: nothing about `other` is in the kernel's caches, so the stat and cat below
    // have to be answered by the daemon.
    m.unmount();
    m.mount(&[]);

    // Held for longer than any one transaction of gc, shorter than the daemon's patience
    // (60 s); the old daemon waited up to 10 s for it with its index mutex held.
    let hold = Duration::from_millis(2500);
    let index = rusqlite::Connection::open(m.store.join("index.sqlite")).unwrap();
    let target = m.path("runs/r/artifacts/f");
    let mut f = fs::File::create_new(&target).unwrap();
    f.write_all(b"committed after the wait").unwrap();
    index.execute_batch("BEGIN IMMEDIATE").unwrap();
    let held = Instant::now();
    let fd = f.into_raw_fd();
    let close = std::thread::spawn(move || {
        let rc = unsafe { libc::close(fd) };
        (rc, std::io::Error::last_os_error(), held.elapsed())
    });
    // Changes of the namespace wait too (they used to fail after the busy timeout).
    let created = m.path("runs/s/artifacts/g");
    let create = std::thread::spawn(move || write_and_close(&created, b"created during the hold"));
    let removed = m.path("runs/s/artifacts/removed");
    let unlink = std::thread::spawn(move || fs::remove_file(removed));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!close.is_finished(), "close() did not wait for the index");
    assert!(!create.is_finished(), "create did not wait for the index");
    assert!(!unlink.is_finished(), "unlink did not wait for the index");
    let other = m.path("runs/r/artifacts/other");
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(fs::metadata(&other).unwrap().len(), 13);
        assert_eq!(fs::read(&other).unwrap(), b"sealed before");
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(500),
            "stat + cat of a sealed file took {took:?} while a close() waited"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(hold.saturating_sub(held.elapsed()));
    assert!(!close.is_finished(), "close() did not wait for the index");
    index.execute_batch("ROLLBACK").unwrap();
    let (rc, err, waited) = close.join().unwrap();
    assert_eq!(rc, 0, "close() failed: {err}");
    assert!(waited >= hold, "close() returned after {waited:?}");
    create.join().unwrap().unwrap();
    unlink.join().unwrap().unwrap();
    assert_eq!(fs::read(&target).unwrap(), b"committed after the wait");
    m.unmount();
    m.mount(&[]);
    assert_eq!(fs::read(&target).unwrap(), b"committed after the wait");
    assert_eq!(
        fs::read(m.path("runs/s/artifacts/g")).unwrap(),
        b"created during the hold"
    );
    assert!(!m.path("runs/s/artifacts/removed").exists());
    assert!(
        m.log()
            .contains("s for the index, locked by another process"),
        "no log line for the long wait:\n{}",
        m.log()
    );
}

/// Blobs in the store [`gc_of_a_large_store_never_fails_a_writer`] collects: the full 100,000
/// of issue #18. Measured on the development machine (2 cores, ext4 mounted with `discard`,
/// debug build). Quiet machine: the blob files and rows are made in 7–10 s; gc decides on all
/// of them and removes half (50,000 unlinks, ~90 µs each) in 180–330 transactions, the longest
/// holding the index 53–82 ms, in 15–28 s while three writers close thousands of files
/// (slowest close() 60–150 ms); the whole test, clean-up included, 37–41 s. With other builds
/// and tests keeping the load average at 10: 18 s to make the store, gc 150 s in ~2,000
/// transactions (unlinks take ~2 ms then), longest hold 306 ms, slowest close() 300 ms, the
/// test ~330 s. Fewer blobs would not test the issue's case; the time is the disk's.
const LARGE_STORE_BLOBS: usize = 100_000;

#[test]
fn gc_of_a_large_store_never_fails_a_writer() {
    use artifactfs::namespace::Zone;
    use artifactfs::store::index::{Kind, NewEntry, RUNS_INO, State};
    use artifactfs::store::{Hash, Store, now_ns};

    let Some(mut m) = Mount::new("gc_of_a_large_store_never_fails_a_writer") else {
        return;
    };
    m.unmount();
    // The store, filled directly: half the blobs are used by files of `runs/bulk`, half by
    // nothing (what gc removes).
    let started = Instant::now();
    let used = LARGE_STORE_BLOBS / 2;
    {
        let store = Store::open_writable(&m.store).unwrap();
        let contents: Vec<Vec<u8>> = (0..LARGE_STORE_BLOBS)
            .map(|i| format!("blob {i}").into_bytes())
            .collect();
        let hashes: Vec<Hash> = contents.iter().map(|c| Hash::of(c)).collect();
        for (c, h) in contents.iter().zip(&hashes) {
            store.blobs.publish_bytes(c, h).unwrap();
        }
        let mut idx = store.index();
        let now = now_ns();
        let dir = |idx: &artifactfs::store::Index, parent, name: &[u8], zone: Zone| {
            let new = NewEntry::new_dir(parent, name, zone as u8, 0o755, (0, 0), now);
            idx.insert(&new).unwrap().unwrap()
        };
        let run = dir(&idx, RUNS_INO, b"bulk", Zone::RunRoot);
        let artifacts = dir(&idx, run, b"artifacts", Zone::RunTree);
        let names: Vec<Vec<u8>> = (0..used).map(|i| format!("f{i}").into_bytes()).collect();
        let rows: Vec<NewEntry> = (0..used)
            .map(|i| NewEntry {
                parent: artifacts,
                name: &names[i],
                kind: Kind::File,
                state: State::Live,
                zone: Zone::RunTree as u8,
                hash: Some(hashes[i]),
                size: contents[i].len() as u64,
                mode: 0o644,
                uid: 0,
                gid: 0,
                time: now,
            })
            .collect();
        assert_eq!(idx.insert_many(&rows).unwrap(), used);
    }
    eprintln!(
        "{LARGE_STORE_BLOBS} blobs, {used} of them used, made in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    m.mount(&[]);

    fs::create_dir(m.path("runs/r")).unwrap();
    let art = m.path("runs/r/artifacts");
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for t in 0..3u64 {
        let (art, stop) = (art.clone(), stop.clone());
        let log = m.store.join("artifactfs.log");
        writers.push(std::thread::spawn(move || {
            let mut written: Vec<Written> = Vec::new();
            let mut slowest = Duration::ZERO;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Some contents repeat, and every fourth file is removed: gc meets blobs
                // that writers are committing again.
                let content = pseudo_random(i % 7 + 100 * (i % 2), 2000 + (i % 5) as usize);
                let name = format!("t{t}-{i}");
                let closed = write_and_close(&art.join(&name), &content).unwrap_or_else(|e| {
                    let log = fs::read_to_string(&log).unwrap_or_default();
                    panic!("{name}: {e}; the daemon's log:\n{log}")
                });
                slowest = slowest.max(closed);
                if i.is_multiple_of(4) {
                    fs::remove_file(art.join(&name)).unwrap();
                } else {
                    written.push((name, content));
                }
                i += 1;
                // Steady writing all through gc, not as many files as the machine can take.
                std::thread::sleep(Duration::from_millis(5));
            }
            (written, slowest)
        }));
    }
    std::thread::sleep(Duration::from_millis(200));
    let gc_started = Instant::now();
    let out = Command::new(BIN)
        .args(["gc", "--older-than", "0", "--store"])
        .arg(&m.store)
        .output()
        .unwrap();
    let gc_took = gc_started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut written = Vec::new();
    let mut slowest_close = Duration::ZERO;
    for w in writers {
        let (files, slowest) = w.join().unwrap();
        written.extend(files);
        slowest_close = slowest_close.max(slowest);
    }
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "gc took {:.1} s: {}; {} files written meanwhile, slowest close() {slowest_close:?}",
        gc_took.as_secs_f64(),
        summary.trim(),
        written.len()
    );
    let blobs: u64 = summary.split(' ').next().unwrap().parse().unwrap();
    assert!(blobs >= LARGE_STORE_BLOBS as u64, "{summary}");
    // At least every unused blob of the store (contents the writers removed may add a few).
    let removed: usize = summary
        .split_once(", removed ")
        .and_then(|(_, rest)| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no removed count in {summary:?}"));
    assert!(removed >= LARGE_STORE_BLOBS - used, "{summary}");
    // Many short transactions, not one per blob directory (~390 blobs each here) or fewer.
    let transactions: u64 = summary
        .split_once("; ")
        .and_then(|(_, rest)| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in {summary:?}"));
    assert!(
        transactions >= (LARGE_STORE_BLOBS / 1000) as u64,
        "{summary}"
    );
    // The longest transaction: gc stops taking blobs after 50 ms; the margin is for one slow
    // unlink and a loaded machine (306 ms at a load average of 10 on 2 cores).
    let longest: u64 = summary
        .rsplit_once("held the index for ")
        .and_then(|(_, ms)| ms.trim().strip_suffix(" ms"))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no longest hold in {summary:?}"));
    assert!(
        longest < 500,
        "a gc transaction held the index {longest} ms"
    );

    assert!(written.len() > 20, "only {} files written", written.len());
    for (name, content) in &written {
        let got = fs::read(art.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(got == *content, "{name} changed");
    }
    assert_eq!(
        fs::read(m.path(&format!("runs/bulk/artifacts/f{}", used - 1))).unwrap(),
        format!("blob {}", used - 1).as_bytes()
    );
    m.unmount();
    // Every row still has its blob of the right size.
    let fsck = m.cli(&["fsck"]);
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}
