//! One store, several machines: daemons of a shared store (a PostgreSQL index and one blob
//! directory), each with a store directory and mount point of its own, stand for machines.
//! Needs the test PostgreSQL server `scripts/test.sh` starts (`ARTIFACTFS_TEST_PG`).

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::time::{Duration, Instant};

use common::*;

/// Two machines create the same new path at the same moment, many times: exactly one create
/// succeeds, the other gets `EEXIST`, and the file holds the winner's bytes on both.
#[test]
fn racing_creates_have_exactly_one_winner() {
    let Some((m, _shared)) = Mount::machines("racing_creates_have_exactly_one_winner", 2) else {
        return;
    };
    std::fs::create_dir_all(m[0].path("runs/race/artifacts")).unwrap();
    for i in 0..100 {
        let name = format!("runs/race/artifacts/f{i}");
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let results: Vec<_> = (0..2)
            .map(|k| {
                let path = m[k].path(&name);
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    let r = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .and_then(|mut f| f.write_all(format!("machine {k}").as_bytes()));
                    r.map_err(|e| e.raw_os_error())
                })
            })
            .collect::<Vec<_>>() // both started before either is joined
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let winners: Vec<usize> = (0..2).filter(|&k| results[k].is_ok()).collect();
        assert_eq!(winners.len(), 1, "{name}: {results:?}");
        let loser = 1 - winners[0];
        assert_eq!(results[loser], Err(Some(libc::EEXIST)), "{name}");
        let want = format!("machine {}", winners[0]).into_bytes();
        for (k, machine) in m.iter().enumerate() {
            let mut last = None;
            assert!(
                wait_until(Duration::from_secs(3), || {
                    let r = std::fs::read(machine.path(&name));
                    let ok = r.as_ref().is_ok_and(|b| *b == want);
                    last = Some(r.map(|b| String::from_utf8_lossy(&b).into_owned()));
                    ok
                }),
                "{name} on machine {k} (the winner: {}): last read {last:?}; its log: {}",
                winners[0],
                machine
                    .log()
                    .lines()
                    .filter(|l| !l.contains(" INFO "))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

/// A file whose close() returned on one machine is listed and read with its bytes on the
/// other within a second (p99), also in a directory the other machine has listed before.
#[test]
fn a_closed_file_is_visible_on_the_other_machine_within_a_second() {
    let Some((m, _shared)) = Mount::machines("a_closed_file_is_visible_on_the_other_machine", 2)
    else {
        return;
    };
    let dir = "runs/vis/artifacts";
    std::fs::create_dir_all(m[0].path(dir)).unwrap();
    // The reader lists and looks up first, so its kernel has the directory cached.
    assert!(wait_until(Duration::from_secs(3), || m[1]
        .path(dir)
        .is_dir()));
    let _ = std::fs::read_dir(m[1].path(dir)).unwrap().count();
    let mut latencies = Vec::new();
    for i in 0..50 {
        let name = format!("{dir}/f{i}");
        let bytes = pseudo_random(i, 1000 + i as usize * 100);
        // The reader asks for the name before it exists (a negative entry in its cache).
        assert!(!m[1].path(&name).exists());
        std::fs::write(m[0].path(&name), &bytes).unwrap();
        let closed = Instant::now();
        let seen = wait_until(Duration::from_secs(5), || {
            std::fs::read_dir(m[1].path(dir))
                .unwrap()
                .any(|e| e.unwrap().file_name() == *format!("f{i}").as_str())
                && std::fs::read(m[1].path(&name)).is_ok_and(|b| b == bytes)
        });
        assert!(seen, "{name} never became visible on the other machine");
        latencies.push(closed.elapsed());
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100 - 1];
    eprintln!(
        "visibility on the other machine: p50 {:?}, p99 {:?}, max {:?}",
        latencies[latencies.len() / 2],
        p99,
        latencies.last().unwrap()
    );
    assert!(p99 <= Duration::from_secs(1), "p99 {p99:?}");
}

/// Write-once holds across machines: a file sealed on one is refused on the other with the
/// errno a local refusal gets, and its bytes stay.
#[test]
fn a_file_sealed_on_one_machine_is_sealed_on_the_other() {
    let Some((m, _shared)) = Mount::machines("a_file_sealed_on_one_machine", 2) else {
        return;
    };
    std::fs::create_dir_all(m[0].path("runs/w/artifacts")).unwrap();
    std::fs::write(m[0].path("runs/w/artifacts/a"), b"first").unwrap();
    assert!(wait_until(Duration::from_secs(3), || std::fs::read(
        m[1].path("runs/w/artifacts/a")
    )
    .is_ok_and(|b| b == b"first")));
    // Other bytes are refused at the write (a rewrite must repeat the sealed bytes).
    let out = sh(&m[1].mnt, "printf other > runs/w/artifacts/a");
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{out:?}"
    );
    assert_eq!(
        std::fs::read(m[1].path("runs/w/artifacts/a")).unwrap(),
        b"first"
    );
    // The same bytes again are no conflict (a retry).
    let out = sh(&m[1].mnt, "printf first > runs/w/artifacts/a");
    assert!(out.status.success(), "{out:?}");
    let e = std::fs::remove_file(m[1].path("runs/w/artifacts/a"));
    assert!(e.is_ok(), "unlink leaves a tombstone: {e:?}");
    let e = std::fs::write(m[0].path("runs/w/artifacts/a"), b"other").unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EEXIST)),
        "{e}"
    );
    assert_eq!(std::fs::read(m[0].path("runs/w/artifacts/a")).ok(), None);
}
