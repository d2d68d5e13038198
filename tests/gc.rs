//! Garbage collection against a live, written mount: no blob of a committed or in-flight file
//! is ever removed.

mod common;

use std::fs;
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
                fs::write(art.join(&name), &content).unwrap();
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
