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

/// `kill -9` of one machine's daemon while it writes: what its `close()`s returned for stays,
/// with its bytes, on the other machine; the file it was still writing is never shown with
/// its partial bytes there, and is gone (its name free again) once that machine starts again;
/// the other machine's mount works throughout.
#[test]
fn a_machine_killed_while_writing_leaves_only_what_it_closed() {
    let Some((mut m, _shared)) = Mount::machines("a_machine_killed_while_writing", 2) else {
        return;
    };
    let dir = "runs/k/artifacts";
    std::fs::create_dir_all(m[0].path(dir)).unwrap();
    for i in 0..5 {
        std::fs::write(m[0].path(&format!("{dir}/done{i}")), pseudo_random(i, 5000)).unwrap();
    }
    // A file left open with part of its bytes written (a writer in another process).
    let mut writer = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sys, time\nf = open('{}', 'wb')\nf.write(b'partial' * 1000)\nf.flush()\n\
             print('ready', flush=True)\ntime.sleep(60)",
            m[0].path(&format!("{dir}/half")).display()
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(writer.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    kill9(m[0].daemon_pid());
    let _ = writer.kill();
    let _ = writer.wait();
    m[0].mark_stale();

    let half = m[1].path(&format!("{dir}/half"));
    // A closed file reads with its bytes, or (its seal had not reached the index when the
    // daemon died: a dup'd descriptor could still have changed it) is busy until the killed
    // machine starts again or its lease runs out; never anything else.
    for i in 0..5 {
        let p = m[1].path(&format!("{dir}/done{i}"));
        match std::fs::read(&p) {
            Ok(b) => assert!(b == pseudo_random(i, 5000), "done{i}: other bytes"),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "done{i}: {e}"),
        }
    }
    // Never its partial bytes: the name is held (being written), reading it is refused.
    match std::fs::read(&half) {
        Ok(b) => panic!(
            "the other machine read {} bytes of a half-written file",
            b.len()
        ),
        Err(e) => assert!(
            matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::ENOENT)),
            "{e}"
        ),
    }
    // The other machine works on.
    std::fs::write(m[1].path(&format!("{dir}/meanwhile")), b"m1").unwrap();

    // The killed machine starts again: what it was writing is gone, its name free.
    m[0].mount(&[]);
    assert!(
        wait_until(Duration::from_secs(3), || !half.exists()),
        "the half-written file outlived its machine's restart"
    );
    for i in 0..5 {
        let p = m[1].path(&format!("{dir}/done{i}"));
        assert!(
            wait_until(Duration::from_secs(3), || std::fs::read(&p)
                .is_ok_and(|b| b == pseudo_random(i, 5000))),
            "done{i} on the other machine after the restart"
        );
    }
    std::fs::write(&half, b"whole, from the other machine").unwrap();
    assert!(wait_until(Duration::from_secs(3), || std::fs::read(
        m[0].path(&format!("{dir}/half"))
    )
    .is_ok_and(|b| b == b"whole, from the other machine")));
    assert_eq!(
        std::fs::read(m[0].path(&format!("{dir}/meanwhile"))).unwrap(),
        b"m1"
    );
    for (k, machine) in m.iter().enumerate() {
        let out = machine.cli(&["fsck"]);
        assert!(out.status.success(), "fsck on machine {k}: {out:?}");
    }
}
