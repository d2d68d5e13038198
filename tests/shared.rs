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

    // A file committed on machine 0 (a close() of a copy of its descriptor) but still open
    // there for writing does not take a sealed path of the same content on machine 1: its
    // writer could still change it there.
    std::fs::write(m[0].path("runs/w/artifacts/s"), b"same").unwrap();
    let mut t = std::fs::File::create(m[0].path("runs/w/artifacts/t")).unwrap();
    t.write_all(b"same").unwrap();
    drop(t.try_clone().unwrap()); // close() of a copy: the commit
    let t_on_1 = m[1].path("runs/w/artifacts/t");
    assert!(wait_until(Duration::from_secs(3), || t_on_1.exists()));
    let e = std::fs::rename(&t_on_1, m[1].path("runs/w/artifacts/s")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{e}");
    // The writer goes on with its own file; the sealed path keeps its content on both.
    t.write_all(b" and more").unwrap();
    drop(t);
    let t_bytes = |i: usize| std::fs::read(m[i].path("runs/w/artifacts/t")).ok();
    assert!(wait_until(Duration::from_secs(3), || t_bytes(1).as_deref()
        == Some(&b"same and more"[..])));
    assert_eq!(t_bytes(0).as_deref(), Some(&b"same and more"[..]));
    for machine in &m {
        assert_eq!(
            std::fs::read(machine.path("runs/w/artifacts/s")).unwrap(),
            b"same"
        );
    }
}

/// A process on one machine inside a directory that another machine removes and makes again
/// is in a removed directory: what it creates, removes, renames or lists there fails with
/// `ESTALE` (as on NFS), and nothing reaches the new directory of the same name. (The kernel
/// itself refuses everything in a directory this machine removed; another machine's `rmdir`
/// reaches it only as a dropped name, and its requests came to the daemon with the old
/// inode's number, which the new row took over with a later generation.)
#[test]
fn a_directory_made_again_on_another_machine_is_not_the_one_a_process_is_in() {
    let Some((m, _shared)) = Mount::machines("dir_made_again_elsewhere", 2) else {
        return;
    };
    std::fs::create_dir_all(m[0].path("runs/d/artifacts/sub")).unwrap();
    std::fs::write(m[0].path("runs/d/artifacts/sub/old"), b"old").unwrap();
    let sub1 = m[1].path("runs/d/artifacts/sub");
    assert!(wait_until(Duration::from_secs(3), || sub1
        .join("old")
        .exists()));
    // A shell on machine 1 inside `sub`, waiting for a line.
    let mut cmd = std::process::Command::new("sh");
    cmd.current_dir(&sub1).arg("-c").arg(
        "echo ready; read go; \
             e=$(touch f 2>&1); echo \"create $? ${e##*: }\"; \
             e=$(mkdir e 2>&1); echo \"mkdir $? ${e##*: }\"; \
             e=$(rm kept 2>&1); echo \"unlink $? ${e##*: }\"; \
             e=$(mv new moved 2>&1); echo \"rename $? ${e##*: }\"; \
             test -e new; echo \"lookup $?\"; \
             echo \"listed $(ls -A 2>/dev/null)\"",
    );
    let (mut child, mut out) = ready_child(cmd);
    // Machine 0 removes `sub` and makes it again, with files of its own.
    std::fs::remove_file(m[0].path("runs/d/artifacts/sub/old")).unwrap();
    std::fs::remove_dir(m[0].path("runs/d/artifacts/sub")).unwrap();
    std::fs::create_dir(m[0].path("runs/d/artifacts/sub")).unwrap();
    std::fs::write(m[0].path("runs/d/artifacts/sub/kept"), b"kept").unwrap();
    std::fs::write(m[0].path("runs/d/artifacts/sub/new"), b"new").unwrap();
    // Machine 1 sees the new directory under the name.
    assert!(wait_until(Duration::from_secs(3), || sub1
        .join("kept")
        .exists()));
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    let estale = "1 Stale file handle";
    assert_eq!(
        rest.lines().collect::<Vec<_>>(),
        [
            &format!("create {estale}"),
            &format!("mkdir {estale}"),
            &format!("unlink {estale}"),
            &format!("rename {estale}"),
            "lookup 1",
            "listed ",
        ],
        "{rest}"
    );
    // The new directory holds machine 0's files only, on both machines.
    for machine in &m {
        let sub = machine.path("runs/d/artifacts/sub");
        let mut names: Vec<_> = std::fs::read_dir(&sub)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["kept", "new"], "{}", sub.display());
        assert_eq!(std::fs::read(sub.join("kept")).unwrap(), b"kept");
    }
}

/// A file replaced on one machine by a `rename` of a file of the same content: descriptors
/// another machine holds open on the replaced file go on as on the machine that renamed —
/// `fstat` answers (no link left, its size) and reads return its bytes — instead of `ESTALE`.
#[test]
fn a_file_replaced_by_a_rename_elsewhere_stays_readable_through_open_descriptors() {
    let Some((m, _shared)) = Mount::machines("replaced_by_rename_elsewhere", 2) else {
        return;
    };
    let dir = "runs/r/artifacts";
    std::fs::create_dir_all(m[0].path(dir)).unwrap();
    let small = pseudo_random(7, 4096);
    let large = pseudo_random(8, 300 << 10);
    for (name, bytes) in [("s", &small), ("l", &large)] {
        std::fs::write(m[0].path(&format!("{dir}/{name}")), bytes).unwrap();
        std::fs::write(m[0].path(&format!("{dir}/{name}.new")), bytes).unwrap();
    }
    let on1 = |name: &str| m[1].path(&format!("{dir}/{name}"));
    assert!(wait_until(Duration::from_secs(3), || on1("l.new").exists()));
    let ino_of =
        |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let (old_s, new_s, new_l) = (
        ino_of(&on1("s")),
        ino_of(&on1("s.new")),
        ino_of(&on1("l.new")),
    );
    // Machine 1 holds both open and has read them once.
    let mut cmd = std::process::Command::new("python3");
    cmd.arg("-c")
        .arg(
            "import hashlib, os, sys\n\
             fds = [os.open(p, os.O_RDONLY) for p in sys.argv[1:]]\n\
             for fd in fds: os.read(fd, 1 << 20)\n\
             print('ready', flush=True)\n\
             sys.stdin.readline()\n\
             for fd in fds:\n\
             \x20   try:\n\
             \x20       st = os.fstat(fd)\n\
             \x20       data = os.pread(fd, 1 << 20, 0)\n\
             \x20       print(st.st_nlink, st.st_size, hashlib.sha256(data).hexdigest(), flush=True)\n\
             \x20   except OSError as e:\n\
             \x20       print('errno', e.errno, flush=True)",
        )
        .arg(on1("s"))
        .arg(on1("l"));
    let (mut child, mut out) = ready_child(cmd);
    // Machine 0 replaces both by a rename of their twins.
    for name in ["s", "l"] {
        std::fs::rename(
            m[0].path(&format!("{dir}/{name}.new")),
            m[0].path(&format!("{dir}/{name}")),
        )
        .unwrap();
    }
    // Machine 1 sees the new files under the names.
    assert!(wait_until(Duration::from_secs(3), || {
        ino_of(&on1("s")) == new_s && ino_of(&on1("l")) == new_l
    }));
    assert_ne!(old_s, new_s);
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(
        rest.lines().collect::<Vec<_>>(),
        [
            format!("0 4096 {}", sha256_hex(&small)),
            format!("0 {} {}", large.len(), sha256_hex(&large)),
        ],
        "{rest}"
    );
    assert_eq!(std::fs::read(on1("s")).unwrap(), small);
    assert_eq!(std::fs::read(on1("l")).unwrap(), large);
}

/// Two machines replacing one rewritable file (`registered_model_meta`), both opened while it
/// was sealed: the first to write has it; the other's write fails with `EBUSY` at once (its
/// `close()` used to return 0 with its bytes silently dropped), and the file holds the
/// first's bytes on both.
#[test]
fn two_machines_replacing_one_rewritable_file_do_not_both_succeed() {
    let Some((m, _shared)) = Mount::machines("two_machines_replacing", 2) else {
        return;
    };
    let rel = "runs/rw/artifacts/registered_model_meta";
    std::fs::create_dir_all(m[0].path("runs/rw/artifacts")).unwrap();
    std::fs::write(m[0].path(rel), b"version: 1\n").unwrap();
    assert!(wait_until(Duration::from_secs(3), || std::fs::read(
        m[1].path(rel)
    )
    .is_ok_and(|b| b == b"version: 1\n")));
    let open = |i: usize| OpenOptions::new().write(true).open(m[i].path(rel)).unwrap();
    let (mut a, mut b) = (open(0), open(1));
    a.write_all(b"version: 2\n").unwrap();
    let e = b.write_all(b"version: 3\n").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    drop(a);
    drop(b);
    for machine in &m {
        assert!(
            wait_until(Duration::from_secs(3), || std::fs::read(machine.path(rel))
                .is_ok_and(|got| got == b"version: 2\n")),
            "{:?}",
            std::fs::read(machine.path(rel))
        );
    }
}

/// Registration by reference on one machine of a run directory a file of which another
/// machine committed but still holds open for writing: `EBUSY` (it could still change), then,
/// once that writer closed, registered with the sealed bytes.
#[test]
fn registering_a_source_still_written_on_another_machine_is_busy() {
    let Some((m, _shared)) = Mount::machines("registering_a_source_still_written", 2) else {
        return;
    };
    sh_ok(
        &m[0].mnt,
        &format!(
            "mkdir -p runs/r1 models/x && cp -r '{}' runs/r1/artifacts/model",
            fixture("sklearn_iris").display()
        ),
    );
    let notes = "runs/r1/artifacts/model/notes.txt";
    let mut w = std::fs::File::create(m[0].path(notes)).unwrap();
    w.write_all(b"draft").unwrap();
    drop(w.try_clone().unwrap()); // close() of a copy: the commit
    assert!(wait_until(Duration::from_secs(3), || m[1]
        .path(notes)
        .exists()));
    let register = |version: &str| {
        setxattr(
            &m[1].path("models/x"),
            &format!("user.artifactfs.register.{version}"),
            b"runs/r1/artifacts/model",
        )
        .map_err(|e| e.raw_os_error())
    };
    assert_eq!(register("early"), Err(Some(libc::EBUSY)));
    assert!(!m[1].path("models/x/early").exists());
    w.write_all(b" and final").unwrap();
    drop(w);
    let mut last = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            last = Some(register("later"));
            last == Some(Ok(()))
        }),
        "not registered once the writer closed: {last:?}"
    );
    assert_eq!(
        std::fs::read(m[1].path("models/x/later/notes.txt")).unwrap(),
        b"draft and final"
    );
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

/// Every file below `root` (relative path) with its bytes' SHA-256.
fn tree(root: &std::path::Path) -> std::collections::BTreeMap<String, String> {
    let out = sh(root, "find . -type f | sort");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|p| {
            let rel = p.trim_start_matches("./").to_string();
            let sha = sha256_hex(&std::fs::read(root.join(&rel)).unwrap());
            (rel, sha)
        })
        .collect()
}

/// `artifactfs migrate` copies an embedded store into an empty shared one: every file with its
/// bytes, tombstones that still refuse other bytes, the registry; each blob re-hashed (a
/// damaged one stops it before any row is copied, naming the file, and a second run resumes);
/// a second run of a finished migration changes nothing; another store is refused.
#[test]
fn migrate_copies_an_embedded_store_into_a_shared_one() {
    let Some((machines, shared)) = Mount::machines("migrate_copies_an_embedded_store", 0) else {
        return;
    };
    drop(machines);
    let mut emb = Mount::new("migrate_copies_an_embedded_store").unwrap();
    let art = "runs/r1/artifacts";
    std::fs::create_dir_all(emb.path(art)).unwrap();
    std::fs::write(emb.path(&format!("{art}/small.txt")), b"small").unwrap();
    let big = pseudo_random(7, 300_000);
    std::fs::write(emb.path(&format!("{art}/big.bin")), &big).unwrap();
    std::fs::write(emb.path(&format!("{art}/removed")), b"first").unwrap();
    std::fs::remove_file(emb.path(&format!("{art}/removed"))).unwrap();
    sh_ok(
        &emb.mnt,
        &format!(
            "cp -r '{}' models/",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/mlflow/sklearn_iris")
                .display()
        ),
    );
    let ready = wait_until(Duration::from_secs(30), || {
        emb.cli(&["models", "show", "sklearn_iris"])
            .status
            .success()
            && String::from_utf8_lossy(&emb.cli(&["models", "show", "sklearn_iris"]).stdout)
                .contains("READY")
    });
    assert!(ready, "the model never became READY");
    let before = tree(&emb.mnt.join("runs"));
    let models_before = tree(&emb.mnt.join("models/sklearn_iris"));
    emb.unmount();

    let server = std::env::var("ARTIFACTFS_TEST_PG").unwrap();
    let base = server.rsplit_once('/').unwrap().0.to_string();
    let index = format!("{base}/{}", new_database(&server));
    let blobs_dir = shared.path().join("blobs");
    let blobs = format!("file://{}", blobs_dir.display());
    let migrate = |store: &std::path::Path| {
        std::process::Command::new(BIN)
            .args(["migrate", "--store"])
            .arg(store)
            .args(["--index", &index, "--blobs", &blobs])
            .output()
            .unwrap()
    };

    // A damaged blob stops it before any row is copied, naming the file that uses it.
    let sha = sha256_hex(&big);
    let blob = emb
        .store
        .join("blobs/sha256")
        .join(&sha[..2])
        .join(&sha[2..]);
    let good = std::fs::read(&blob).unwrap();
    let mut perms = std::fs::metadata(&blob).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(&blob, perms.clone()).unwrap();
    std::fs::write(&blob, b"not the bytes").unwrap();
    let out = migrate(&emb.store);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(err.contains(&sha) && err.contains("big.bin"), "{err}");
    // No daemon serves a migration that has not finished.
    let probe = Mount::machines_on("migrate_copies_an_embedded_store", &index, &blobs);
    match probe {
        Ok(_) => panic!("mounted an unfinished migration"),
        Err(e) => assert!(e.contains("has not finished"), "{e}"),
    }
    // Repaired, it resumes and finishes; a second run has nothing to do.
    std::fs::write(&blob, &good).unwrap();
    let out = migrate(&emb.store);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("migrated"),
        "{out:?}"
    );
    let out = migrate(&emb.store);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing to do"),
        "{out:?}"
    );
    // Another store into the same (now used) index is refused.
    let mut other = Mount::new("migrate_copies_an_embedded_store").unwrap();
    other.unmount();
    let out = migrate(&other.store);
    assert!(!out.status.success(), "{out:?}");

    // The shared store, on a machine of its own: the same tree, the same registry, the
    // tombstone still taken.
    let m = Mount::machines_on("migrate_copies_an_embedded_store", &index, &blobs).unwrap();
    assert_eq!(tree(&m.mnt.join("runs")), before);
    assert_eq!(tree(&m.mnt.join("models/sklearn_iris")), models_before);
    let show = m.cli(&["models", "show", "sklearn_iris"]);
    assert!(
        String::from_utf8_lossy(&show.stdout).contains("READY"),
        "{show:?}"
    );
    let e = std::fs::write(m.path(&format!("{art}/removed")), b"other").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let out = m.cli(&["fsck", "--verify"]);
    assert!(out.status.success(), "{out:?}");
    // New entries get inode numbers of their own.
    std::fs::write(m.path(&format!("{art}/new.txt")), b"new").unwrap();
    assert_eq!(
        std::fs::read(m.path(&format!("{art}/new.txt"))).unwrap(),
        b"new"
    );
    assert_eq!(
        std::fs::read(m.path(&format!("{art}/small.txt"))).unwrap(),
        b"small"
    );
}

/// A PostgreSQL server of this test's own (it is stopped and restarted, which the suite's
/// shared server must not be), stopped and removed when dropped.
struct OwnServer {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    port: u16,
}

impl OwnServer {
    fn start() -> Option<OwnServer> {
        let Ok(bin) = std::env::var("ARTIFACTFS_TEST_PG_BIN") else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: ARTIFACTFS_TEST_PG_BIN must name PostgreSQL's binaries (scripts/test.sh)"
            );
            eprintln!("skipped: no ARTIFACTFS_TEST_PG_BIN");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("afs-pg-own-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let s = OwnServer {
            dir,
            bin: bin.into(),
            port,
        };
        s.pg(&["initdb", "-D", "DATA", "-A", "trust", "-U", "artifactfs"]);
        s.ctl("start");
        Some(s)
    }

    fn url(&self) -> String {
        format!("postgresql://artifactfs@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs a PostgreSQL program as the `postgres` user (root may not run the server); `DATA`
    /// stands for the data directory.
    fn pg(&self, args: &[&str]) -> std::process::Output {
        let data = self.dir.path().join("data");
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("DATA", &data.display().to_string()))
            .collect();
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(&args[0]))
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        out
    }

    fn ctl(&self, what: &str) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        match what {
            "stop" => self.pg(&["pg_ctl", "-D", "DATA", "-m", "fast", "-w", "stop"]),
            _ => self.pg(&["pg_ctl", "-D", "DATA", "-l", &log, "-w", what, "-o", &opts]),
        };
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// PostgreSQL restarted while files are written: requests wait for it and go on (no write
/// fails, every closed file is there); stopped for good, a request fails with EIO after about
/// 10 s, and once it is back the same mount works again without a restart.
#[test]
fn a_postgresql_restart_is_waited_out_and_an_outage_fails_with_eio() {
    if !fuse_available("a_postgresql_restart_is_waited_out") {
        return;
    }
    let Some(server) = OwnServer::start() else {
        return;
    };
    let shared = tempfile::tempdir().unwrap();
    let blobs = format!("file://{}", shared.path().join("blobs").display());
    let m =
        Mount::machines_on("a_postgresql_restart_is_waited_out", &server.url(), &blobs).unwrap();
    let dir = m.path("runs/pg/artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let writer = {
        let dir = dir.clone();
        std::thread::spawn(move || {
            let mut failed = Vec::new();
            for i in 0..150u64 {
                if let Err(e) = std::fs::write(dir.join(format!("f{i}")), pseudo_random(i, 100)) {
                    failed.push((i, e.to_string()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            failed
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    server.ctl("restart");
    let failed = writer.join().unwrap();
    assert!(
        failed.is_empty(),
        "writes failed across the restart: {failed:?}"
    );
    for i in 0..150u64 {
        assert_eq!(
            std::fs::read(dir.join(format!("f{i}"))).unwrap(),
            pseudo_random(i, 100),
            "f{i}"
        );
    }

    server.ctl("stop");
    let t = Instant::now();
    let e = std::fs::write(dir.join("during"), b"x").unwrap_err();
    let waited = t.elapsed();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(30),
        "failed after {waited:?}"
    );
    server.ctl("start");
    std::fs::write(dir.join("after"), b"back").unwrap();
    assert_eq!(std::fs::read(dir.join("after")).unwrap(), b"back");
    assert!(!dir.join("during").exists());
    let out = m.cli(&["fsck"]);
    assert!(out.status.success(), "{out:?}");
}

/// The test knob that makes the kernel cache what another machine may change for 60 s instead
/// of 1 s: a change seen within a second was brought by a notification, not by the TTL.
const LONG_TTL: (&str, &str) = ("ARTIFACTFS_TEST_SHARED_TTL", "60");

/// Waits up to `limit` for `cond`; how long it took, or `None`.
fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Whether `name` is listed in directory `dir`.
fn listed(dir: &std::path::Path, name: &str) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .any(|e| e.unwrap().file_name() == name)
}

/// A connection to the test's database as its owner (the test server's superuser).
fn sql(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).unwrap()
}

/// With the kernel allowed to cache for 60 s, a change on one machine still reaches the
/// other's cached entries within a second — a new file in a directory it had listed and a name
/// it had found absent, an unlink of a file it had read, the same file created again at its
/// tombstone, a rename — because PostgreSQL's notifications invalidate them. With the
/// notifying trigger disabled for a moment, the same kind of change stays unseen for 2 s,
/// twice the default cache time: the TTL alone would not have brought it.
#[test]
fn notifications_not_the_ttl_bring_changes_to_the_other_machine() {
    let Some((m, _shared)) = Mount::machines_with_env(
        "notifications_not_the_ttl_bring_changes",
        2,
        &[],
        &[LONG_TTL],
    ) else {
        return;
    };
    let index = std::fs::read_to_string(m[0].store.join("shared")).unwrap();
    let index = index
        .lines()
        .find_map(|l| l.strip_prefix("index="))
        .map(str::to_owned);
    let dir = "runs/n/artifacts";
    std::fs::create_dir_all(m[0].path(dir)).unwrap();
    let (a, b) = (m[0].path(dir), m[1].path(dir));
    assert!(within(Duration::from_secs(1), || b.is_dir()).is_some());
    let mut seen = Vec::new();

    // A new file, in a directory the other machine has listed, under a name it found absent
    // (a negative entry). Only `stat` and `open` ask for it: a listing would replace the
    // negative entry by itself (readdirplus hands the kernel the entries it lists).
    let _ = listed(&b, "x");
    assert!(!b.join("new").exists());
    std::fs::write(a.join("new"), b"new bytes").unwrap();
    let t = within(Duration::from_secs(1), || {
        std::fs::read(b.join("new")).is_ok_and(|x| x == b"new bytes")
    });
    assert!(
        t.is_some(),
        "the new file did not show on the other machine within 1 s"
    );
    seen.push(("create", t.unwrap()));
    assert!(listed(&b, "new"));

    // Unlinked (a tombstone) after the other machine read it: gone there too.
    assert_eq!(std::fs::read(b.join("new")).unwrap(), b"new bytes");
    std::fs::remove_file(a.join("new")).unwrap();
    let t = within(Duration::from_secs(1), || {
        !b.join("new").exists() && !listed(&b, "new")
    });
    assert!(t.is_some(), "the unlinked file stayed on the other machine");
    seen.push(("unlink", t.unwrap()));

    // The same bytes created again at the tombstone: back.
    std::fs::write(a.join("new"), b"new bytes").unwrap();
    let t = within(Duration::from_secs(1), || {
        std::fs::read(b.join("new")).is_ok_and(|x| x == b"new bytes")
    });
    assert!(
        t.is_some(),
        "the file created again at its tombstone did not show"
    );
    seen.push(("create at tombstone", t.unwrap()));

    // Renamed: the old name goes, the new one comes, on the other machine.
    assert!(!b.join("moved").exists());
    std::fs::rename(a.join("new"), a.join("moved")).unwrap();
    let t = within(Duration::from_secs(1), || {
        !b.join("new").exists() && std::fs::read(b.join("moved")).is_ok_and(|x| x == b"new bytes")
    });
    assert!(t.is_some(), "the rename did not show on the other machine");
    seen.push(("rename", t.unwrap()));
    eprintln!("seen on the other machine after: {seen:?}");

    // Control: without the notifying trigger, the other machine keeps its cached answer.
    let index = index.expect("STORE/shared names the index");
    let mut db = sql(&index);
    assert!(!b.join("quiet").exists());
    db.batch_execute("ALTER TABLE entries DISABLE TRIGGER entries_notify")
        .unwrap();
    std::fs::write(a.join("quiet"), b"q").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let unseen = !b.join("quiet").exists();
    db.batch_execute("ALTER TABLE entries ENABLE TRIGGER entries_notify")
        .unwrap();
    assert!(
        unseen,
        "a change announced by no notification showed within 2 s: the TTL is not 60 s; the \
         other machine's log:\n{}",
        m[1].log()
    );
    assert!(a.join("quiet").exists());
}

/// The listener outlives PostgreSQL: after a restart it listens again by itself (a change is
/// seen on the other machine within a second, with the kernel allowed to cache for 60 s), and
/// after it missed notifications (its connection cut while another machine committed) it
/// has the kernel forget everything it may cache, so that change shows too.
#[test]
fn the_listener_comes_back_after_postgresql_restarts_and_forgets_what_it_missed() {
    if !fuse_available("the_listener_comes_back") {
        return;
    }
    let Some(server) = OwnServer::start() else {
        return;
    };
    let shared = tempfile::tempdir().unwrap();
    let blobs = format!("file://{}", shared.path().join("blobs").display());
    let m: Vec<Mount> = (0..2)
        .map(|_| {
            Mount::machines_on_with(
                "the_listener_comes_back",
                &server.url(),
                &blobs,
                &[LONG_TTL],
            )
            .unwrap()
        })
        .collect();
    let dir = "runs/l/artifacts";
    std::fs::create_dir_all(m[0].path(dir)).unwrap();
    let (a, b) = (m[0].path(dir), m[1].path(dir));
    assert!(within(Duration::from_secs(1), || b.is_dir()).is_some());
    let machine_b = std::fs::read_to_string(m[1].store.join("machine-id")).unwrap();
    let listener_b = format!("artifactfs listen {}", machine_b.trim());
    let listening = |db: &mut postgres::Client| {
        db.query_one(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&listener_b],
        )
        .unwrap()
        .get::<_, i64>(0)
            == 1
    };

    // A restart: the listener connects again by itself and hears the next change.
    assert!(!b.join("after-restart").exists());
    server.ctl("restart");
    // (From another database: PostgreSQL refuses to shut out the one a connection is on.)
    let mut db = sql(&server.url().replace("/postgres", "/template1"));
    assert!(
        within(Duration::from_secs(10), || listening(&mut db)).is_some(),
        "machine B's listener did not come back after the restart"
    );
    std::fs::write(a.join("after-restart"), b"r").unwrap();
    let t = within(Duration::from_secs(1), || {
        std::fs::read(b.join("after-restart")).is_ok_and(|x| x == b"r")
    });
    assert!(
        t.is_some(),
        "a change after the restart did not show within 1 s"
    );
    eprintln!("after the restart, a change showed in {:?}", t.unwrap());

    // Missed notifications: B's listener is cut off (and kept off) while A commits.
    assert!(!b.join("missed").exists());
    assert_eq!(std::fs::read(b.join("after-restart")).unwrap(), b"r");
    db.batch_execute("ALTER DATABASE postgres ALLOW_CONNECTIONS false")
        .unwrap();
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        &[&listener_b],
    )
    .unwrap();
    assert!(
        within(Duration::from_secs(5), || !listening(&mut db)).is_some(),
        "machine B's listener outlived pg_terminate_backend"
    );
    std::fs::write(a.join("missed"), b"m").unwrap();
    std::fs::remove_file(a.join("after-restart")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !b.join("missed").exists() && b.join("after-restart").exists(),
        "B saw the changes with its listener cut off: the test proves nothing"
    );
    db.batch_execute("ALTER DATABASE postgres ALLOW_CONNECTIONS true")
        .unwrap();
    let t = within(Duration::from_secs(3), || {
        std::fs::read(b.join("missed")).is_ok_and(|x| x == b"m")
            && !b.join("after-restart").exists()
    });
    assert!(
        t.is_some(),
        "after its listener came back, B still showed what it had cached; its log:\n{}",
        m[1].log()
    );
    eprintln!(
        "changes missed by the listener showed {:?} after connections were allowed again",
        t.unwrap()
    );
    assert!(
        m[1].log().matches("listening again after").count() >= 2,
        "{}",
        m[1].log()
    );
}

/// The MLflow fixtures (tests/fixtures/mlflow, inside the repository).
fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mlflow")
        .join(name)
}

/// A version directory's registry status, as `getxattr` reads it on a mount.
fn version_status(path: &std::path::Path) -> Option<String> {
    getxattr(path, "user.artifactfs.status")
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// The registry links `ls -l` shows in a model directory: name -> target.
fn registry_links(cwd: &std::path::Path, dir: &str) -> std::collections::BTreeMap<String, String> {
    String::from_utf8_lossy(&sh(cwd, &format!("ls -l '{dir}'")).stdout)
        .lines()
        .filter(|l| l.starts_with('l'))
        .filter_map(|l| {
            let (left, target) = l.split_once(" -> ")?;
            Some((left.rsplit(' ').next()?.to_string(), target.to_string()))
        })
        .collect()
}

/// `models wait` from a machine without a mount of the store (a store directory of its own,
/// given the shared index and blobs) waits for the verdict on a version another machine's
/// copy made: READY, not its first PENDING reported as FAILED.
#[test]
fn models_wait_without_a_mount_waits_for_the_verdict() {
    let Some((m, _shared)) =
        Mount::machines_with("models_wait_without_a_mount", 1, &["--settle", "1"])
    else {
        return;
    };
    let conf = std::fs::read_to_string(m[0].store.join("shared")).unwrap();
    let value = |key: &str| {
        conf.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap()
            .to_owned()
    };
    let (index, blobs) = (value("index="), value("blobs="));
    let blobs = if blobs.contains("://") {
        blobs
    } else {
        format!("file://{blobs}")
    };
    sh_ok(
        &m[0].mnt,
        &format!(
            "mkdir models/w && cp -r '{}' models/w/v1",
            fixture("sklearn_iris").display()
        ),
    );
    let other = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["models", "wait", "w", "v1", "--timeout", "30", "--store"])
        .arg(other.path().join("store"))
        .args(["--index", &index, "--blobs", &blobs])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("READY version 1"), "{text}");
}

/// Two machines copy model versions into the same `models/NAME/` at the same moment, round
/// after round (one of them, some rounds, slowly: notes of its own a file at a time after the
/// model's files, so that a machine that only watched its own copy would find the other's
/// directory complete enough to pass while files still arrive): every version is decided exactly once, in PostgreSQL — version
/// numbers unique and without gaps, the same READY/FAILED, `latest` and aliases on both
/// machines, every READY version sealed on both, and no copy refused midway.
#[test]
fn registry_races_across_machines_decide_each_version_once() {
    let Some((m, _shared)) =
        Mount::machines_with("registry_races_across_machines", 2, &["--settle", "0.3"])
    else {
        return;
    };
    std::fs::create_dir(m[0].path("models/race")).unwrap();
    assert!(wait_until(Duration::from_secs(3), || m[1]
        .path("models/race")
        .is_dir()));
    let rounds = 12;
    let mut expected: Vec<(String, &str)> = Vec::new();
    let started = Instant::now();
    for i in 0..rounds {
        let (a, b) = (format!("a{i}"), format!("b{i}"));
        // Machine 1 copies a broken model every third round, and slowly every other round.
        let b_fixture = if i % 3 == 2 {
            "broken_missing_model_file"
        } else {
            "sklearn_nosig"
        };
        let slow = i % 2 == 1;
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let copy_a = {
            let (mnt, barrier, a) = (m[0].mnt.clone(), barrier.clone(), a.clone());
            std::thread::spawn(move || {
                barrier.wait();
                sh(
                    &mnt,
                    &format!(
                        "cp -r '{}' models/race/{a}",
                        fixture("sklearn_iris").display()
                    ),
                )
            })
        };
        let copy_b = {
            let (mnt, barrier, b) = (m[1].mnt.clone(), barrier.clone(), b.clone());
            let src = fixture(b_fixture);
            std::thread::spawn(move || {
                barrier.wait();
                let script = if slow {
                    // Everything MLmodel names first, then notes of its own, a file at a time.
                    format!(
                        "set -e; cp -r '{s}' models/race/{b}; for n in 1 2 3 4 5 6; do \
                         sleep 0.12; echo note $n > models/race/{b}/notes$n.txt; done",
                        s = src.display()
                    )
                } else {
                    format!("cp -r '{}' models/race/{b}", src.display())
                };
                sh(&mnt, &script)
            })
        };
        for (name, out) in [(&a, copy_a.join().unwrap()), (&b, copy_b.join().unwrap())] {
            assert!(
                out.status.success(),
                "round {i}: the copy of {name} was refused: {}\nlogs:\n{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                m[0].log(),
                m[1].log()
            );
        }
        expected.push((a, "READY"));
        expected.push((
            b,
            if b_fixture.starts_with("broken") {
                "FAILED"
            } else {
                "READY"
            },
        ));
    }
    // Every version decided, the same way on both machines.
    for (dir, want) in &expected {
        for (k, machine) in m.iter().enumerate() {
            let p = machine.path(&format!("models/race/{dir}"));
            assert!(
                wait_until(Duration::from_secs(20), || version_status(&p).as_deref()
                    == Some(*want)),
                "{dir} on machine {k}: {:?}, not {want}\nlogs:\n{}\n{}",
                version_status(&p),
                m[0].log(),
                m[1].log()
            );
        }
    }
    let decided: Vec<usize> = m
        .iter()
        .map(|machine| {
            machine
                .log()
                .lines()
                .filter(|l| l.contains("READY as version") || l.contains(": FAILED: "))
                .count()
        })
        .collect();
    eprintln!(
        "{} versions copied in {rounds} rounds and decided in {:?}, by machine 0 and 1: {decided:?}",
        expected.len(),
        started.elapsed()
    );
    assert_eq!(
        decided.iter().sum::<usize>(),
        expected.len(),
        "each version decided exactly once; the decisions:\n{}",
        m.iter()
            .enumerate()
            .flat_map(|(k, machine)| machine
                .log()
                .lines()
                .filter(|l| l.contains("registry:") || l.contains("refused") || l.contains("error"))
                .map(|l| format!("machine {k}: {l}"))
                .collect::<Vec<_>>())
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Version numbers: unique, 1..=N without gaps, the same on both machines.
    let ready: Vec<&String> = expected
        .iter()
        .filter(|(_, s)| *s == "READY")
        .map(|(d, _)| d)
        .collect();
    let mut numbers = Vec::new();
    for dir in &ready {
        let n: Vec<String> = m
            .iter()
            .map(|machine| {
                String::from_utf8_lossy(
                    &getxattr(
                        &machine.path(&format!("models/race/{dir}")),
                        "user.artifactfs.version",
                    )
                    .unwrap(),
                )
                .into_owned()
            })
            .collect();
        assert_eq!(n[0], n[1], "{dir}: version on the two machines");
        numbers.push(n[0].parse::<u64>().unwrap());
    }
    numbers.sort();
    assert_eq!(
        numbers,
        (1..=ready.len() as u64).collect::<Vec<_>>(),
        "version numbers"
    );
    // The links and an alias set on one machine agree on the other.
    sh_ok(&m[0].mnt, "ln -sfn 2 models/race/@champion");
    assert!(wait_until(Duration::from_secs(3), || {
        registry_links(&m[1].mnt, "models/race").get("@champion")
            == registry_links(&m[0].mnt, "models/race").get("@champion")
    }));
    let links = registry_links(&m[0].mnt, "models/race");
    assert_eq!(links.len(), ready.len() + 2, "{links:?}");
    assert_eq!(links, registry_links(&m[1].mnt, "models/race"));
    assert_eq!(links["latest"], links[&ready.len().to_string()]);
    // Every READY version is sealed on both machines.
    for dir in &ready {
        for machine in &m {
            let out = sh(&machine.mnt, &format!("echo x > models/race/{dir}/extra"));
            assert!(
                !out.status.success()
                    && String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
                "{dir}: {out:?}"
            );
        }
    }
}

/// A writer in another process on `path` (a new file): writes `first` bytes, `fsync`s them if
/// `sync`, says `ready`; on a line from the test writes 4,000 more bytes and closes, then
/// prints what the write and the close returned.
fn paused_writer(path: &std::path::Path, first: usize, sync: bool) -> std::process::Child {
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import os, sys\n\
             fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)\n\
             os.write(fd, b'p' * {first})\n\
             {}\n\
             print('ready', flush=True)\n\
             sys.stdin.readline()\n\
             out = []\n\
             for what, f in (('write', lambda: os.write(fd, b'm' * 4000)), ('close', lambda: os.close(fd))):\n\
             \x20   try:\n\
             \x20       f(); out.append(what + ' ok')\n\
             \x20   except OSError as e:\n\
             \x20       out.append('%s errno %d' % (what, e.errno))\n\
             print(', '.join(out), flush=True)",
            if sync { "os.fsync(fd)" } else { "pass" }
        ))
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready", "{}", path.display());
    child
}

/// Starts `cmd` with piped stdin and stdout and waits for its first line, `ready`; the child
/// and the rest of its output.
fn ready_child(
    mut cmd: std::process::Command,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
) {
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    (child, out)
}

/// Lets a [`paused_writer`] go on; what its write and close returned.
fn resume_writer(mut child: std::process::Child) -> String {
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A daemon stopped (SIGSTOP) for longer than the lease: another machine cleans up what it
/// was writing (a file never committed is gone and its name free, one committed by `fsync`
/// keeps that content, sealed); once it runs again its writers cannot bring any of it back —
/// their writes and `close()`s fail with `EIO`, nothing half-written or conflicting becomes
/// visible — and it goes on with a new session for new files. (The lease is shortened to 2 s
/// by the test-only `ARTIFACTFS_TEST_LEASE_MS`.)
#[test]
fn a_stalled_machine_finds_its_lease_gone_and_resurrects_nothing() {
    let Some((m, _shared)) = Mount::machines_with_env(
        "a_stalled_machine_finds_its_lease_gone",
        2,
        &[],
        &[("ARTIFACTFS_TEST_LEASE_MS", "2000")],
    ) else {
        return;
    };
    let dir = "runs/stall/artifacts";
    std::fs::create_dir_all(m[0].path(dir)).unwrap();
    std::fs::write(m[0].path(&format!("{dir}/done")), b"closed before").unwrap();
    let p = |k: usize, name: &str| m[k].path(&format!("{dir}/{name}"));
    // A large file never committed, and a small one committed by fsync and then written on.
    let half = paused_writer(&p(0, "half"), 300_000, false);
    let synced = paused_writer(&p(0, "synced"), 5_000, true);
    assert!(wait_until(Duration::from_secs(3), || std::fs::read(p(
        1, "done"
    ))
    .is_ok_and(|b| b == b"closed before")));

    let pid = m[0].daemon_pid();
    let stopped = Instant::now();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let cont = scopeguard(pid);
    // The other machine cleans up once the lease (2 s) ran out.
    let cleaned = wait_until(Duration::from_secs(15), || {
        !p(1, "half").exists()
            && std::fs::read(p(1, "synced")).is_ok_and(|b| b == vec![b'p'; 5_000])
    });
    let cleaned_after = stopped.elapsed();
    assert!(
        cleaned,
        "not cleaned up after {cleaned_after:?}: half exists {}, synced reads {:?}\nlog:\n{}",
        p(1, "half").exists(),
        std::fs::read(p(1, "synced")).map(|b| b.len()),
        m[1].log()
    );
    // Its name is free: the other machine writes a file of its own there.
    std::fs::write(p(1, "half"), b"the other machine's").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    drop(cont); // SIGCONT
    let stalled = stopped.elapsed();

    assert_eq!(resume_writer(half), "write ok, close errno 5");
    assert_eq!(resume_writer(synced), "write errno 5, close errno 5");
    for k in 0..2 {
        assert!(
            wait_until(Duration::from_secs(3), || {
                std::fs::read(p(k, "half")).is_ok_and(|b| b == b"the other machine's")
                    && std::fs::read(p(k, "synced")).is_ok_and(|b| b == vec![b'p'; 5_000])
            }),
            "machine {k}: half {:?}, synced {:?}",
            std::fs::read(p(k, "half")).map(|b| b.len()),
            std::fs::read(p(k, "synced")).map(|b| b.len())
        );
    }
    // The stalled machine goes on, with a new session, for new files.
    for i in 0..5 {
        let bytes = pseudo_random(i, 100 + 70_000 * (i as usize % 2));
        std::fs::write(p(0, &format!("after{i}")), &bytes).unwrap();
        assert!(wait_until(Duration::from_secs(3), || std::fs::read(p(
            1,
            &format!("after{i}")
        ))
        .is_ok_and(|b| b == bytes)));
    }
    assert!(
        m[0].log().contains("was ended by another machine"),
        "{}",
        m[0].log()
    );
    eprintln!("stalled for {stalled:?}; the other machine had cleaned up after {cleaned_after:?}");
    for (k, machine) in m.iter().enumerate() {
        let out = machine.cli(&["fsck"]);
        assert!(out.status.success(), "fsck on machine {k}: {out:?}");
    }
}

/// Sends SIGCONT to `pid` when dropped (a stopped daemon never outlives a failed test).
fn scopeguard(pid: i32) -> impl Drop {
    struct Cont(i32);
    impl Drop for Cont {
        fn drop(&mut self) {
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    Cont(pid)
}

/// `gc` and `fsck` run from one machine at a time: while one holds the store's maintenance
/// lock, another is refused at once, in one line naming the holder, with exit status 75.
/// And `gc` stays safe while another machine writes: run again and again (retention 0) from
/// machine 0 and a third machine (the CLI only) while machine 1 writes small and large files, the same contents under several
/// names, and removes some right away (their contents become garbage, then are written
/// again: a blob published but whose row is not committed yet, or that gc takes between the
/// two, is stored again by the commit), every file machine 1 closed reads back exactly on both
/// machines, and `fsck --verify` is clean.
#[test]
fn gc_runs_one_at_a_time_and_is_safe_while_another_machine_writes() {
    let Some((m, _shared)) = Mount::machines("gc_runs_one_at_a_time", 2) else {
        return;
    };
    let dir = "runs/gc/artifacts";
    std::fs::create_dir_all(m[1].path(dir)).unwrap();

    // The maintenance lock held by another process: gc and fsck are refused, naming it.
    let (index, blobs) = store_locations(&m[0].store);
    let blobs = blobs.display().to_string();
    let blobs = if blobs.starts_with("s3://") {
        blobs // (ARTIFACTFS_TEST_BLOBS=s3)
    } else {
        format!("file://{blobs}")
    };
    let index = index.unwrap();
    let env = m[0].env().to_vec();
    let third = tempfile::tempdir().unwrap();
    let mut holder = postgres::Client::connect(&index, postgres::NoTls).unwrap();
    holder
        .batch_execute(&format!(
            "SET application_name = 'the test''s holder'; SELECT pg_advisory_lock({})",
            0x0061_7274_6966_6763i64
        ))
        .unwrap();
    for args in [&["gc"][..], &["fsck", "--verify"], &["fsck"]] {
        let t = Instant::now();
        let out = m[0].cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(75), "{args:?}: {out:?}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("the test's holder"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
    drop(holder);

    let writer = {
        let dir = m[1].path(dir);
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            for i in 0..240u64 {
                // 40 contents, each written six times: small ones in the index, large ones
                // as blobs.
                let size = if i % 2 == 0 { 3_000 } else { 150_000 };
                let bytes = pseudo_random(i % 40, size + (i % 40) as usize);
                let path = dir.join(format!("f{i}"));
                std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("f{i}: {e}"));
                if i % 3 == 0 {
                    std::fs::remove_file(&path).unwrap();
                } else {
                    kept.push((format!("f{i}"), bytes));
                }
            }
            kept
        })
    };
    let (mut runs, mut refused) = (0, 0);
    let started = Instant::now();
    while !writer.is_finished() {
        // Two at the same moment, from machine 0 and from a third machine (a store directory
        // of its own, the locations given): each runs whole or is refused.
        let other = {
            let (store, index, blobs) = (third.path().to_owned(), index.clone(), blobs.clone());
            let env = env.clone();
            std::thread::spawn(move || {
                std::process::Command::new(BIN)
                    .envs(env)
                    .args([
                        "gc",
                        "--older-than",
                        "0",
                        "--index",
                        &index,
                        "--blobs",
                        &blobs,
                    ])
                    .arg("--store")
                    .arg(store)
                    .output()
                    .unwrap()
            })
        };
        for out in [
            m[0].cli(&["gc", "--older-than", "0"]),
            other.join().unwrap(),
        ] {
            match out.status.code() {
                Some(0) => runs += 1,
                Some(75) => refused += 1,
                _ => panic!("gc: {out:?}"),
            }
        }
    }
    let kept = writer.join().unwrap();
    let out = m[0].cli(&["gc", "--older-than", "0"]);
    assert!(out.status.success(), "{out:?}");
    for (k, machine) in m.iter().enumerate() {
        for (name, bytes) in &kept {
            let p = machine.path(&format!("{dir}/{name}"));
            assert!(
                wait_until(Duration::from_secs(3), || std::fs::read(&p)
                    .is_ok_and(|b| b == *bytes)),
                "{name} on machine {k}: {:?}",
                std::fs::read(&p).map(|b| b.len())
            );
        }
        let out = machine.cli(&["fsck", "--verify"]);
        assert!(
            out.status.success(),
            "fsck --verify on machine {k}: {out:?}"
        );
    }
    let stored_again = m[1]
        .log()
        .lines()
        .filter(|l| l.contains("collected during a commit"))
        .count();
    eprintln!(
        "{} files written by machine 1 in {:?} while gc ran {runs} times ({refused} refused: \
         another was running); blobs stored again after gc took them mid-commit: {stored_again}",
        240,
        started.elapsed()
    );
    assert!(runs > 0);
}
