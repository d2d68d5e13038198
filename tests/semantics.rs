//! The semantics table of the README, syscall by syscall, against a real mount: every refusal is
//! asserted by its errno.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;

use common::*;

#[test]
fn root_lists_runs_and_models_and_refuses_creation() {
    let Some(m) = Mount::new("root_lists_runs_and_models_and_refuses_creation") else {
        return;
    };
    let mut names: Vec<_> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["models", "runs"]);
    assert_eq!(
        errno(&fs::create_dir(m.path("x")).unwrap_err()),
        libc::EPERM
    );
    assert_eq!(errno(&File::create(m.path("x")).unwrap_err()), libc::EPERM);
    assert_eq!(
        errno(&File::create(m.path("runs/file")).unwrap_err()),
        libc::EPERM
    );
    assert_eq!(
        errno(&fs::remove_dir(m.path("runs")).unwrap_err()),
        libc::EPERM
    );
    assert!(m.log().contains("refused create /runs/file"), "{}", m.log());
}

fn setup_run(m: &Mount, id: &str) -> std::path::PathBuf {
    fs::create_dir(m.path(&format!("runs/{id}"))).unwrap();
    let art = m.path(&format!("runs/{id}/artifacts"));
    assert!(art.is_dir(), "mkdir runs/<id> creates artifacts/");
    art
}

/// Runs python statements in `cwd`; prints `ok` or the errno's name of the first OSError.
fn py(cwd: &std::path::Path, stmts: &str) -> String {
    let body: String = stmts.lines().map(|l| format!("    {l}\n")).collect();
    let script = format!(
        "import errno, os\n\
         def put(name, data, mode='wb'):\n    \
             with open(name, mode) as f:\n        \
                 f.write(data)\n\
         try:\n{body}except OSError as e:\n    print(errno.errorcode[e.errno])\nelse:\n    print('ok')\n"
    );
    sh_ok(cwd, &format!("python3 -c {}", shell_quote(&script)))
        .trim()
        .to_string()
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A sealed file takes its own bytes again (a retry, `cp` over an identical copy) and nothing
/// else: the first differing write fails at once, an `O_TRUNC` close that leaves fewer bytes
/// fails, appending fails; nobody ever sees the file change, not even through a descriptor
/// opened before on this machine.
#[test]
fn sealed_files_take_their_own_bytes_again_and_nothing_else() {
    let Some(m) = Mount::new("sealed_files_take_their_own_bytes_again_and_nothing_else") else {
        return;
    };
    let art = setup_run(&m, "r1");
    let f = art.join("weights.bin");
    fs::write(&f, b"0123456789").unwrap();
    let sha = sha_xattr(&f);
    // Identical: a redirect (bash flushes before it writes), Python, cp.
    sh_ok(&art, "printf 0123456789 > weights.bin");
    assert_eq!(py(&art, "put('weights.bin', b'0123456789', 'wb')"), "ok");
    sh_ok(
        &art,
        "printf 0123456789 > copy.bin && cp copy.bin weights.bin",
    );
    assert_eq!(py(&art, "put('weights.bin', b'0123', 'r+b')"), "ok");
    // Different: the write itself fails, in bash too.
    let out = sh(&art, "echo other > weights.bin");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{out:?}"
    );
    assert_eq!(
        py(&art, "put('weights.bin', b'0123456789!', 'wb')"),
        "EPERM"
    );
    assert_eq!(
        py(
            &art,
            "f = os.open('weights.bin', os.O_WRONLY)\nos.pwrite(f, b'X', 3)"
        ),
        "EPERM"
    );
    assert_eq!(py(&art, "put('weights.bin', b'more', 'ab')"), "EPERM");
    // Truncated and closed with fewer bytes: close() fails.
    assert_eq!(py(&art, "open('weights.bin', 'wb').close()"), "EPERM");
    assert_eq!(py(&art, "put('weights.bin', b'01234', 'wb')"), "EPERM");
    assert_eq!(
        errno(
            &OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&f)
                .unwrap_err()
        ),
        libc::EEXIST
    );
    let c = std::ffi::CString::new(f.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 3) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM)
    );
    // While an O_TRUNC rewrite is open, another descriptor and stat still see the whole file.
    assert_eq!(
        py(
            &art,
            "r = os.open('weights.bin', os.O_RDONLY)\n\
             w = os.open('weights.bin', os.O_WRONLY | os.O_TRUNC)\n\
             assert os.stat('weights.bin').st_size == 10, os.stat('weights.bin').st_size\n\
             assert os.fstat(r).st_size == 10\n\
             assert os.pread(r, 100, 0) == b'0123456789', os.pread(r, 100, 0)\n\
             assert open('weights.bin', 'rb').read() == b'0123456789'\n\
             os.write(w, b'0123456789')\n\
             os.close(w)"
        ),
        "ok"
    );
    // One thread with the file open for writing twice: its `O_TRUNC` is its last open's
    // (`exec 3<>f; : > f` in one shell), which must then write every byte again.
    assert_eq!(
        py(
            &art,
            "a = os.open('weights.bin', os.O_RDWR)\n\
             b = os.open('weights.bin', os.O_WRONLY | os.O_TRUNC)\n\
             os.write(b, b'0123')\n\
             try:\n    os.close(b)\n\
             except OSError as e:\n    assert e.errno == errno.EPERM, e\n\
             else:\n    raise SystemExit('a short rewrite after O_TRUNC was accepted')\n\
             os.close(a)"
        ),
        "ok"
    );
    // What ls -l / stat shows after all this is still the truth, and nothing was stored.
    assert_eq!(fs::metadata(&f).unwrap().len(), 10);
    assert_eq!(fs::read(&f).unwrap(), b"0123456789");
    assert_eq!(sha_xattr(&f), sha);
    // Metadata is not content: chmod and utimens are allowed and stored.
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
    File::open(&f).unwrap().set_modified(t).unwrap();
    let meta = fs::metadata(&f).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.modified().unwrap(), t);
    let log = m.log();
    assert!(
        log.contains("refused write /runs/r1/artifacts/weights.bin: the file is sealed"),
        "{log}"
    );
    assert!(
        log.contains("refused close /runs/r1/artifacts/weights.bin"),
        "{log}"
    );
}

#[test]
fn a_file_being_written_is_busy_for_other_opens() {
    let Some(m) = Mount::new("a_file_being_written_is_busy_for_other_opens") else {
        return;
    };
    let art = setup_run(&m, "r1");
    let f = art.join("partial");
    let mut w = File::create(&f).unwrap();
    w.write_all(b"half").unwrap();
    assert_eq!(errno(&File::open(&f).unwrap_err()), libc::EBUSY);
    assert_eq!(
        fs::metadata(&f).unwrap().len(),
        4,
        "stat works and shows the bytes so far"
    );
    // Within the writing handle, seeking back and reading is allowed.
    drop(w);
    // Sealing happens at RELEASE, which the kernel sends right after the last close.
    assert!(wait_until(std::time::Duration::from_secs(2), || {
        File::open(&f).is_ok()
    }));
    let mut rw = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(art.join("rw"))
        .unwrap();
    rw.write_all(b"abcdef").unwrap();
    rw.seek(SeekFrom::Start(0)).unwrap();
    rw.write_all(b"AB").unwrap();
    rw.seek(SeekFrom::Start(0)).unwrap();
    let mut back = String::new();
    rw.read_to_string(&mut back).unwrap();
    assert_eq!(back, "ABcdef");
}

/// `cp` over an identical copy, again and again, while another process reads the file: the
/// reader never sees it shorter or different, and its time never changes. (Had the daemon
/// taken `O_TRUNC` at open, `FUSE_ATOMIC_O_TRUNC`, the kernel would cut its cached size and
/// pages to zero at each such open: half the reads here came back empty.)
#[test]
fn a_sealed_file_being_rewritten_is_never_seen_truncated() {
    let Some(m) = Mount::new("a_sealed_file_being_rewritten_is_never_seen_truncated") else {
        return;
    };
    let art = setup_run(&m, "r1");
    // Small files, kept in the kernel's page cache. (From 128 KiB on, files are read through
    // passthrough, and a write open while a reader has one open fails: README, known gaps.)
    for (name, size) in [("config.json", 4096usize), ("tokenizer.json", 100 << 10)] {
        let f = art.join(name);
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&f, &bytes).unwrap();
        let before = fs::metadata(&f).unwrap().modified().unwrap();
        let script = format!(
            "import os, time, multiprocessing as mp\n\
             p = {name:?}\n\
             data = open(p, 'rb').read()\n\
             def rewrite(stop, n):\n    \
                 while not stop.is_set():\n        \
                     fd = os.open(p, os.O_WRONLY | os.O_TRUNC)\n        \
                     os.write(fd, data)\n        \
                     os.close(fd)\n        \
                     n.value += 1\n\
             stop, n = mp.Event(), mp.Value('i', 0)\n\
             w = mp.Process(target=rewrite, args=(stop, n))\n\
             w.start()\n\
             reads = short_stat = wrong = 0\n\
             end = time.time() + 2\n\
             while (time.time() < end or n.value < 50) and w.is_alive():\n    \
                 if os.stat(p).st_size != len(data): short_stat += 1\n    \
                 with open(p, 'rb') as f:\n        \
                     if f.read() != data: wrong += 1\n    \
                 reads += 1\n\
             stop.set()\n\
             w.join()\n\
             assert w.exitcode == 0\n\
             print(reads > 50, n.value > 50, short_stat, wrong)\n"
        );
        let out = sh_ok(&art, &format!("python3 -c {}", shell_quote(&script)));
        assert_eq!(out.trim(), "True True 0 0", "{name}: reads, rewrites, bad");
        // ftruncate(0) of a rewrite, then every byte again: nothing changes, no time either.
        assert_eq!(
            py(
                &art,
                &format!(
                    "fd = os.open({name:?}, os.O_WRONLY)\n\
                     os.ftruncate(fd, 0)\n\
                     os.pwrite(fd, open({name:?}, 'rb').read(), 0)\n\
                     os.close(fd)"
                )
            ),
            "ok"
        );
        assert_eq!(fs::read(&f).unwrap(), bytes);
        assert_eq!(
            fs::metadata(&f).unwrap().modified().unwrap(),
            before,
            "{name}"
        );
    }
}

/// A directory removed and made again, and a file created again at its tombstone, are new
/// inodes for the kernel, also while a process still holds the old ones (a shell inside the
/// removed directory, a descriptor of the removed file): the new directory takes new files,
/// and a large file comes back while its old descriptor reads on.
#[test]
fn a_path_made_again_is_a_new_inode_while_the_old_one_is_held() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let Some(m) = Mount::new("a_path_made_again_is_a_new_inode_while_the_old_one_is_held") else {
        return;
    };
    let art = setup_run(&m, "r1");
    let dir = art.join("plots");
    fs::create_dir(&dir).unwrap();
    // As a shell `cd`'d into it would, this keeps the kernel's inode of the directory.
    let held = File::open(&dir).unwrap();
    fs::remove_dir(&dir).unwrap();
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("loss.png"), b"png").unwrap();
    assert_eq!(fs::read(dir.join("loss.png")).unwrap(), b"png");
    assert_ne!(
        held.metadata().unwrap().ino(),
        fs::metadata(&dir).unwrap().ino()
    );
    // Again, with the first new one held as well.
    let held_too = File::open(&dir).unwrap();
    fs::remove_file(dir.join("loss.png")).unwrap();
    fs::remove_dir(&dir).unwrap();
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("acc.png"), b"png").unwrap();
    drop((held, held_too));
    let names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["acc.png"]);

    // A run removed and made again: its `artifacts` directory, removed with it, comes back
    // with it as a new inode. A process still inside the old one (the kernel knows only of
    // the run's removal) reaches nothing in the new run (ESTALE, as NFS answers a process in
    // a directory removed elsewhere).
    let run = m.path("runs/again");
    fs::create_dir(&run).unwrap();
    let held = File::open(run.join("artifacts")).unwrap();
    fs::remove_dir(&run).unwrap();
    fs::create_dir(&run).unwrap();
    let at = |name: &str, mkdir: bool| {
        let c = std::ffi::CString::new(name).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&held);
        let r = unsafe {
            if mkdir {
                libc::mkdirat(fd, c.as_ptr(), 0o755)
            } else {
                libc::openat(fd, c.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o644)
            }
        };
        if r < 0 {
            Err(errno(&std::io::Error::last_os_error()))
        } else {
            Ok(())
        }
    };
    assert_eq!(at("f", false), Err(libc::ESTALE));
    assert_eq!(at("d", true), Err(libc::ESTALE));
    assert_eq!(fs::read_dir(run.join("artifacts")).unwrap().count(), 0);
    fs::write(run.join("artifacts/g"), b"g").unwrap();
    drop(held);

    // A file read through passthrough (128 KiB and more), removed while open, and written
    // again with the same bytes (write-once: nothing else may come back there).
    let f = art.join("weights.bin");
    let bytes: Vec<u8> = (0..300 << 10).map(|i| (i * 13 % 251) as u8).collect();
    fs::write(&f, &bytes).unwrap();
    let old = File::open(&f).unwrap();
    let mut head = [0u8; 4096];
    old.read_exact_at(&mut head, 0).unwrap();
    fs::remove_file(&f).unwrap();
    let outside = tempfile::tempdir().unwrap();
    let src = outside.path().join("weights.bin");
    fs::write(&src, &bytes).unwrap();
    sh_ok(&art, &format!("cp {} weights.bin", src.display()));
    assert_eq!(fs::read(&f).unwrap(), bytes);
    let mut all = vec![0u8; bytes.len()];
    old.read_exact_at(&mut all, 0).unwrap();
    assert_eq!(all, bytes);
    assert_ne!(
        old.metadata().unwrap().ino(),
        fs::metadata(&f).unwrap().ino()
    );
    // The old one is as after unlink: no link; a change through it does not reach the path.
    assert_eq!(old.metadata().unwrap().nlink(), 0);
    let refused = old.set_permissions(fs::Permissions::from_mode(0o600));
    assert_eq!(errno(&refused.unwrap_err()), libc::ESTALE);
    assert_eq!(
        fs::metadata(&f).unwrap().permissions().mode() & 0o777,
        0o644
    );

    // A small file (the kernel's page cache) open while it is created again at its tombstone:
    // its descriptor shows and reads all of it while the new one is still being written.
    let g = art.join("config.json");
    let small: Vec<u8> = (0..4096).map(|i| (i % 97) as u8).collect();
    fs::write(&g, &small).unwrap();
    let old = File::open(&g).unwrap();
    old.read_exact_at(&mut head, 0).unwrap();
    fs::remove_file(&g).unwrap();
    let mut new = File::create(&g).unwrap();
    new.write_all(&small[..100]).unwrap();
    assert_eq!(old.metadata().unwrap().len(), 4096);
    let mut all = vec![0u8; 4096];
    old.read_exact_at(&mut all, 0).unwrap();
    assert_eq!(all, small);
    new.write_all(&small[100..]).unwrap();
    drop(new);
    assert_eq!(fs::read(&g).unwrap(), small);
}

/// A file of 128 KiB or more that another process reads (the kernel reads it straight from
/// its blob, passthrough) is busy for writers meanwhile: `EBUSY` with a log line, not the
/// kernel's `EIO`; once the reader is gone, it takes its own bytes again.
#[test]
fn a_large_file_being_read_is_busy_for_writers() {
    use std::os::unix::fs::FileExt;
    let Some(m) = Mount::new("a_large_file_being_read_is_busy_for_writers") else {
        return;
    };
    let art = setup_run(&m, "r1");
    let f = art.join("weights.bin");
    let bytes: Vec<u8> = (0..256 << 10).map(|i| (i * 31 % 251) as u8).collect();
    fs::write(&f, &bytes).unwrap();
    let outside = tempfile::tempdir().unwrap();
    let src = outside.path().join("weights.bin");
    fs::write(&src, &bytes).unwrap();
    let cp = format!("cp {} weights.bin", src.display());
    let reader = File::open(&f).unwrap();
    let mut head = [0u8; 4096];
    reader.read_exact_at(&mut head, 0).unwrap();
    let out = sh(&art, &cp);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Device or resource busy"),
        "{out:?}"
    );
    assert_eq!(py(&art, "open('weights.bin', 'r+b').close()"), "EBUSY");
    // Its release reaches the daemon a moment after close() returned: the writer waits.
    drop(reader);
    sh_ok(&art, &cp);
    assert_eq!(fs::read(&f).unwrap(), bytes);
    assert!(
        m.log().contains(
            "refused open for writing /runs/r1/artifacts/weights.bin: the file is open for reading"
        ),
        "{}",
        m.log()
    );
}

#[test]
fn truncate_by_path_of_a_file_being_written_is_busy() {
    let Some(m) = Mount::new("truncate_by_path_of_a_file_being_written_is_busy") else {
        return;
    };
    let art = setup_run(&m, "r1");
    let f = art.join("f");
    let mut w = File::create(&f).unwrap();
    w.write_all(b"abc").unwrap();
    let c = std::ffi::CString::new(f.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 1) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EBUSY)
    );
    let t = sh(&art, "truncate -s 0 f");
    assert!(!t.status.success(), "truncate(1) of a file being written");
    // The writer's own descriptor may: ftruncate (it carries the file handle).
    w.set_len(5).unwrap();
    w.seek(SeekFrom::Start(5)).unwrap();
    w.write_all(b"def").unwrap();
    drop(w);
    assert!(wait_until(std::time::Duration::from_secs(2), || {
        File::open(&f).is_ok()
    }));
    assert_eq!(fs::read(&f).unwrap(), b"abc\0\0def");
    assert!(
        m.log().contains("refused truncate /runs/r1/artifacts/f"),
        "{}",
        m.log()
    );
}

#[test]
fn paths_are_write_once_across_unlink_and_rename() {
    let Some(m) = Mount::new("paths_are_write_once_across_unlink_and_rename") else {
        return;
    };
    let art = setup_run(&m, "r1");
    fs::write(art.join("a"), b"first").unwrap();
    fs::write(art.join("b"), b"other").unwrap();
    assert_eq!(
        errno(&fs::rename(art.join("a"), art.join("b")).unwrap_err()),
        libc::EEXIST
    );
    fs::rename(art.join("a"), art.join("c")).unwrap();
    assert_eq!(fs::read(art.join("c")).unwrap(), b"first");
    assert_eq!(
        errno(&fs::metadata(art.join("a")).unwrap_err()),
        libc::ENOENT
    );
    // A tombstone takes back its last content only.
    assert_eq!(py(&art, "put('a', 'changed', 'w')"), "EPERM", "tombstone");
    assert_eq!(
        errno(&fs::metadata(art.join("a")).unwrap_err()),
        libc::ENOENT
    );
    assert_eq!(
        errno(&fs::rename(art.join("c"), art.join("a")).unwrap_err()),
        libc::EEXIST
    );
    fs::remove_file(art.join("b")).unwrap();
    assert_eq!(
        errno(&fs::create_dir(art.join("b")).unwrap_err()),
        libc::EEXIST
    );
    assert_eq!(py(&art, "put('b', 'other', 'w')"), "ok");
    assert_eq!(fs::read(art.join("b")).unwrap(), b"other");
    // Renaming onto identical content: the target stays, the source goes.
    fs::write(art.join(".b.tmp"), b"other").unwrap();
    fs::rename(art.join(".b.tmp"), art.join("b")).unwrap();
    assert_eq!(
        errno(&fs::metadata(art.join(".b.tmp")).unwrap_err()),
        libc::ENOENT
    );
    fs::remove_file(art.join("b")).unwrap();
    fs::create_dir(art.join("d1")).unwrap();
    assert_eq!(
        errno(&fs::rename(art.join("d1"), art.join("d2")).unwrap_err()),
        libc::EPERM
    );
    assert_eq!(
        errno(&fs::remove_dir(art.join("c")).unwrap_err()),
        libc::ENOTDIR
    );
    fs::write(art.join("d1/x"), b"x").unwrap();
    assert_eq!(
        errno(&fs::remove_dir(art.join("d1")).unwrap_err()),
        libc::ENOTEMPTY
    );
    let mut names: Vec<_> = fs::read_dir(&art)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["c", "d1"]);
}

#[test]
fn links_and_special_files_are_refused() {
    let Some(m) = Mount::new("links_and_special_files_are_refused") else {
        return;
    };
    let art = setup_run(&m, "r1");
    fs::write(art.join("f"), b"x").unwrap();
    assert_eq!(
        errno(&std::os::unix::fs::symlink("f", art.join("l")).unwrap_err()),
        libc::EPERM
    );
    assert_eq!(
        errno(&fs::hard_link(art.join("f"), art.join("h")).unwrap_err()),
        libc::EPERM
    );
    let fifo = std::ffi::CString::new(art.join("p").as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM)
    );
}

#[test]
fn plain_symlinks_in_a_model_dir_are_refused() {
    let Some(m) = Mount::new("plain_symlinks_in_a_model_dir_are_refused") else {
        return;
    };
    fs::create_dir(m.path("models/m")).unwrap();
    assert_eq!(
        errno(&std::os::unix::fs::symlink("1", m.path("models/m/another")).unwrap_err()),
        libc::EPERM
    );
    assert!(!m.path("models/m/another").exists());
    // An empty target never reaches the daemon: the kernel refuses it (ENOENT) on every file
    // system. The daemon would say EINVAL (fs::tests::plain_symlinks_in_a_model_dir_are_refused).
    assert_eq!(
        errno(&std::os::unix::fs::symlink("", m.path("models/m/@a")).unwrap_err()),
        libc::ENOENT
    );
    let log = m.log();
    assert!(!log.contains("/models/m/@a"), "{log}");
    assert_eq!(
        log.matches("refused symlink /models/m/another").count(),
        1,
        "{log}"
    );
}

#[test]
fn names_ids_and_the_models_dir() {
    let Some(m) = Mount::new("names_ids_and_the_models_dir") else {
        return;
    };
    assert_eq!(
        errno(&fs::create_dir(m.path("runs/bad\x01id")).unwrap_err()),
        libc::EINVAL
    );
    fs::create_dir(m.path("models/iris")).unwrap();
    assert_eq!(
        errno(&fs::create_dir(m.path("models/a:b")).unwrap_err()),
        libc::EINVAL
    );
    for bad in ["models/iris/v\n1", "models/iris/v\x7f"] {
        assert_eq!(
            errno(&fs::create_dir(m.path(bad)).unwrap_err()),
            libc::EINVAL,
            "{bad:?}"
        );
    }
    assert_eq!(
        errno(&File::create(m.path("models/file")).unwrap_err()),
        libc::EPERM
    );
    // mkdir -p / os.makedirs deep below a run.
    fs::create_dir_all(m.path("runs/r2/artifacts/a/b/c")).unwrap();
    let art = m.path("runs/r2/artifacts");
    fs::write(art.join("n".repeat(255)), b"ok").unwrap();
    assert_eq!(
        errno(&File::create(art.join("n".repeat(256))).unwrap_err()),
        libc::ENAMETOOLONG
    );
    // rmdir of the artifacts dir is refused; an empty run can be removed.
    fs::create_dir(m.path("runs/empty")).unwrap();
    assert_eq!(
        errno(&fs::remove_dir(m.path("runs/empty/artifacts")).unwrap_err()),
        libc::EPERM
    );
    fs::remove_dir(m.path("runs/empty")).unwrap();
    assert!(!m.path("runs/empty").exists());
}

#[test]
fn xattrs_fsync_and_statfs() {
    let Some(m) = Mount::new("xattrs_fsync_and_statfs") else {
        return;
    };
    let art = setup_run(&m, "r1");
    let data = pseudo_random(7, 300_000);
    let mut f = File::create(art.join("blob")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let out = sh_ok(
        &art,
        "python3 -c \"import os; print(os.getxattr('blob', 'user.artifactfs.sha256').decode())\"",
    );
    assert_eq!(out.trim(), sha256_hex(&data));
    let set = sh(
        &art,
        "python3 -c \"import os; os.setxattr('blob', 'user.x', b'1')\"",
    );
    assert!(
        String::from_utf8_lossy(&set.stderr).contains("Errno 95"),
        "ENOTSUP expected: {set:?}"
    );
    let df = sh_ok(&m.mnt, "df -P . | tail -1");
    let total: u64 = df.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(total > 0, "df shows the store's real size: {df}");
}

#[test]
fn read_only_mount_refuses_changes_with_erofs() {
    let Some(mut m) = Mount::new("read_only_mount_refuses_changes_with_erofs") else {
        return;
    };
    let art = setup_run(&m, "r1");
    fs::write(art.join("a"), b"kept").unwrap();
    m.unmount();
    m.mount(&["--read-only"]);
    assert_eq!(fs::read(art.join("a")).unwrap(), b"kept");
    assert_eq!(
        errno(&fs::create_dir(art.join("d")).unwrap_err()),
        libc::EROFS
    );
    assert_eq!(
        errno(&File::create(art.join("n")).unwrap_err()),
        libc::EROFS
    );
    assert_eq!(
        errno(&fs::remove_file(art.join("a")).unwrap_err()),
        libc::EROFS
    );
    assert_eq!(
        errno(&fs::rename(art.join("a"), art.join("b")).unwrap_err()),
        libc::EROFS
    );
    assert_eq!(
        errno(&fs::set_permissions(art.join("a"), fs::Permissions::from_mode(0o600)).unwrap_err()),
        libc::EROFS
    );
    assert_eq!(
        errno(&std::os::unix::fs::symlink("a", art.join("l")).unwrap_err()),
        libc::EROFS
    );
}

#[test]
fn remount_shows_the_same_tree() {
    let Some(mut m) = Mount::new("remount_shows_the_same_tree") else {
        return;
    };
    let art = setup_run(&m, "r1");
    fs::create_dir_all(art.join("x/y")).unwrap();
    fs::write(art.join("x/y/z"), b"deep").unwrap();
    fs::write(art.join("top"), b"top").unwrap();
    fs::remove_file(art.join("top")).unwrap();
    let before = sh_ok(&m.mnt, "find . -printf '%p %s %m\\n' | sort");
    m.unmount();
    m.mount(&[]);
    assert_eq!(sh_ok(&m.mnt, "find . -printf '%p %s %m\\n' | sort"), before);
    assert_eq!(fs::read(art.join("x/y/z")).unwrap(), b"deep");
    // Tombstones persist, with their last content.
    assert_eq!(py(&art, "put('top', 'TOP', 'w')"), "EPERM");
    assert_eq!(
        errno(&fs::metadata(art.join("top")).unwrap_err()),
        libc::ENOENT
    );
    assert_eq!(py(&art, "put('top', 'top', 'w')"), "ok");
    assert_eq!(fs::read(art.join("top")).unwrap(), b"top");
}

#[test]
fn a_failed_truncate_after_a_commit_keeps_the_committed_file() {
    let Some(mut m) = Mount::new("a_failed_truncate_after_a_commit_keeps_the_committed_file")
    else {
        return;
    };
    let art = setup_run(&m, "r1");
    // close() of the first descriptor commits `keep`; the ftruncate through the dup fails.
    let out = sh_ok(
        &art,
        "python3 -c \"
import errno, os
fd = os.open('f', os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
os.write(fd, b'keep')
d = os.dup(fd)
os.close(fd)
try:
    os.ftruncate(d, 1 << 60)
    print('ftruncate succeeded')
except OSError as e:
    print(errno.errorcode[e.errno])
os.close(d)
\"",
    );
    assert_eq!(out.trim(), "EFBIG");
    let f = art.join("f");
    assert!(
        wait_until(std::time::Duration::from_secs(2), || File::open(&f).is_ok()),
        "the file is sealed, not busy: {:?}",
        File::open(&f).err()
    );
    assert_eq!(fs::read(&f).unwrap(), b"keep");
    assert_eq!(sha_xattr(&f), sha256_hex(b"keep"));
    m.unmount();
    m.mount(&[]);
    assert_eq!(fs::read(&f).unwrap(), b"keep", "after a remount");
}

/// Runs a Python script in `dir` with `where_` ("mount" or "ext4") as its argument, asserting
/// it succeeds; the script's own `assert`s carry the expected values. Every POSIX script below
/// runs on ext4 too, so each expectation is what a native file system gives.
fn python(dir: &std::path::Path, where_: &str, script: &str) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(where_)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python on {where_} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `script` on ext4 (a temp dir) and on the mount (`dir`).
fn python_like_ext4(dir: &std::path::Path, script: &str) -> String {
    let native = tempfile::tempdir().unwrap();
    python(native.path(), "ext4", script);
    python(dir, "mount", script)
}

/// `utimensat(2)` through ctypes, with `UTIME_OMIT`, for the scripts.
const PY_UTIMENSAT: &str = r#"
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
class Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]
UTIME_OMIT = (1 << 30) - 2
OMIT = (0, UTIME_OMIT)
def utimensat(path, atime, mtime):
    ts = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    if libc.utimensat(-100, path.encode(), ts, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
def times(path):
    s = os.stat(path)
    return s.st_atime_ns, s.st_mtime_ns, s.st_ctime_ns
MOUNT = sys.argv[1] == "mount"
"#;

#[test]
fn access_and_modification_times_are_separate_and_exact() {
    let Some(mut m) = Mount::new("access_and_modification_times_are_separate_and_exact") else {
        return;
    };
    let art = setup_run(&m, "r1");
    let script = format!(
        "{PY_UTIMENSAT}{}",
        r#"
import subprocess
with open("f", "wb") as f:
    f.write(b"data")
a0, m0, c0 = times("f")
time.sleep(0.02)
# touch -a: the access time only (the modification time is UTIME_OMIT).
subprocess.run(["touch", "-a", "-d", "@2000000000.5", "f"], check=True)
a1, m1, c1 = times("f")
assert (a1, m1) == (2000000000_500000000, m0), (a1, m1, m0)
assert c1 > c0, ("ctime", c0, c1)
# utimensat: UTIME_OMIT for atime, a sub-second date past 2038 for mtime.
utimensat("f", OMIT, (4102444800, 123456789))  # 2100-01-01 00:00:00.123456789
assert times("f")[:2] == (2000000000_500000000, 4102444800_123456789), times("f")
# Before 1970, with a fraction of a second: 1.5 s before the epoch.
utimensat("f", (-2, 500000000), OMIT)
assert times("f")[:2] == (-1_500000000, 4102444800_123456789), times("f")
# 1960-01-01 less a nanosecond, and os.utime with both times.
os.utime("f", ns=(-315619200_000000001, 1))
assert times("f")[:2] == (-315619200_000000001, 1), times("f")
if MOUNT:
    # 1900-01-01 and 2200-01-01: beyond what this ext4 stores (1901-12-13 to 2446 with
    # nanoseconds), within the index's nanoseconds in an i64 (1677 to 2262).
    os.utime("f", ns=(-2208988800_000000001, 7258118400_000000001))
    assert times("f")[:2] == (-2208988800_000000001, 7258118400_000000001), times("f")
# A read does not move the access time (set in the future, which relatime on ext4 keeps too).
utimensat("f", (4102444800, 999999999), (1000000000, 0))
with open("f", "rb") as f:
    assert f.read() == b"data"
assert times("f")[:2] == (4102444800_999999999, 1000000000_000000000), times("f")
print(times("f")[0], times("f")[1])
"#
    );
    let out = python_like_ext4(&art, &script);
    assert_eq!(out.trim(), "4102444800999999999 1000000000000000000");
    // The index keeps both: a remount shows the same times.
    m.unmount();
    m.mount(&[]);
    let meta = fs::metadata(art.join("f")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (
            meta.atime(),
            meta.atime_nsec(),
            meta.mtime(),
            meta.mtime_nsec()
        ),
        (4_102_444_800, 999_999_999, 1_000_000_000, 0)
    );
}

#[test]
fn directories_change_when_names_are_created_removed_or_renamed() {
    let Some(m) = Mount::new("directories_change_when_names_are_created_removed_or_renamed") else {
        return;
    };
    let art = setup_run(&m, "r1");
    let script = format!(
        "{PY_UTIMENSAT}{}",
        r#"
os.mkdir("d")
def write(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"x")
    os.close(fd)
steps = [
    ("create", ["d"], lambda: write("d/f")),
    ("mkdir", ["d"], lambda: os.mkdir("d/sub")),
    ("rename in d", ["d"], lambda: os.rename("d/f", "d/g")),
    ("rename to d/sub", ["d", "d/sub"], lambda: os.rename("d/g", "d/sub/g")),
    ("unlink", ["d/sub"], lambda: os.unlink("d/sub/g")),
    ("rmdir", ["d"], lambda: os.rmdir("d/sub")),
    ("mknod", ["d"], lambda: os.mknod("d/n", 0o644)),
]
for what, dirs, step in steps:
    before = {d: times(d) for d in dirs}
    # Cached: a stat right before the change must not be what the stat after it shows.
    time.sleep(0.02)
    start = time.time_ns()
    step()
    for d in dirs:
        a, m, c = times(d)
        assert m == c and m > before[d][1] and m >= start - 10_000_000, (what, d, before[d], (a, m, c))
        assert a == before[d][0], (what, d, "atime", before[d][0], a)
print("ok")
"#
    );
    assert_eq!(python_like_ext4(&art, &script).trim(), "ok");
}

#[test]
fn a_files_ctime_changes_on_chmod_chown_utimens_and_rename() {
    let Some(m) = Mount::new("a_files_ctime_changes_on_chmod_chown_utimens_and_rename") else {
        return;
    };
    let art = setup_run(&m, "r1");
    let script = format!(
        "{PY_UTIMENSAT}{}",
        r#"
with open("f", "wb") as f:
    f.write(b"data")
os.utime("f", ns=(1_000000001, 2_000000002))
steps = [
    ("chmod", "f", lambda: os.chmod("f", 0o600)),
    ("chown", "f", lambda: os.chown("f", 1234, 5678)),
    ("utimens (both omitted)", "f", lambda: utimensat("f", OMIT, OMIT)),
    ("utimens", "f", lambda: os.utime("f", ns=(3, 4))),
    ("rename", "g", lambda: os.rename("f", "g")),
]
for what, after, step in steps:
    a0, m0, c0 = times("f")
    time.sleep(0.02)
    step()
    a1, m1, c1 = times(after)
    want = (3, 4) if what == "utimens" else (a0, m0)
    # With both times omitted the kernel changes nothing at all, on any file system.
    changed = c1 == c0 if "omitted" in what else c1 > c0
    assert changed and (a1, m1) == want, (what, (a0, m0, c0), (a1, m1, c1))
s = os.stat("g")
assert (s.st_mode & 0o7777, s.st_uid, s.st_gid) == (0o600, 1234, 5678), s
print("ok")
"#
    );
    assert_eq!(python_like_ext4(&art, &script).trim(), "ok");
}

#[test]
fn a_file_removed_while_open_stays_usable_until_closed() {
    let Some(m) = Mount::new("a_file_removed_while_open_stays_usable_until_closed") else {
        return;
    };
    let art = setup_run(&m, "r1");
    let script = format!(
        "{PY_UTIMENSAT}{}",
        r#"
import errno
def create(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, data)
    os.close(fd)
# Being written, removed before any close(): writes, pread and fstat go on.
fd = os.open("w", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
os.write(fd, b"hello ")
os.unlink("w")
assert not os.path.exists("w")
os.write(fd, b"world")
assert os.pread(fd, 100, 0) == b"hello world"
assert os.pread(fd, 5, 6) == b"world"
s = os.fstat(fd)
assert (s.st_nlink, s.st_size, s.st_mode & 0o777) == (0, 11, 0o640), s
os.close(fd)
# It never held committed content: the name is free again.
create("w", b"again")
# A sealed file open for reading, removed: pread and fstat go on.
create("r", b"sealed")
fd = os.open("r", os.O_RDONLY)
os.unlink("r")
assert os.pread(fd, 100, 0) == b"sealed"
s = os.fstat(fd)
assert (s.st_nlink, s.st_size) == (0, 6), s
os.close(fd)
# Committed by a close() of a copy, removed, then written more.
fd = os.open("c", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
os.write(fd, b"v1")
os.close(os.dup(fd))
os.unlink("c")
os.write(fd, b"+v2")
assert os.pread(fd, 100, 0) == b"v1+v2"
s = os.fstat(fd)
assert (s.st_nlink, s.st_size) == (0, 5), s
os.close(fd)
for name in ["r", "c"]:
    try:
        create(name, b"new")
        print(name, "created")
    except OSError as e:
        print(name, errno.errorcode[e.errno])
"#
    );
    let out = python_like_ext4(&art, &script);
    // Write-once: a removed file that held committed content leaves a tombstone, which takes
    // back only its last content ("sealed", "v1": not "new").
    assert_eq!(out, "r EPERM\nc EPERM\n");
    let names = sh_ok(&art, "ls -A");
    assert_eq!(names, "w\n");
    assert_eq!(fs::read(art.join("w")).unwrap(), b"again");
}

/// A rewritable file's new content is what the next `cat` and `stat` show, even when a
/// descriptor opened before reads the old one after the change, the new content has the same
/// size, or crosses the size from which sealed files are read through passthrough.
#[test]
fn a_rewritable_files_new_content_is_what_the_next_reader_sees() {
    let Some(m) = Mount::new("a_rewritable_files_new_content_is_what_the_next_reader_sees") else {
        return;
    };
    let art = setup_run(&m, "r1");
    let meta = art.join("registered_model_meta");
    let out = py(
        &art,
        "import time\n\
         put('registered_model_meta', b'model_name: bbbb\\n')\n\
         time.sleep(0.3)\n\
         fd = os.open('registered_model_meta', os.O_RDONLY)\n\
         assert os.pread(fd, 100, 0) == b'model_name: bbbb\\n'\n\
         put('registered_model_meta', b'model_name: cccc\\n')\n\
         time.sleep(0.3)\n\
         os.pread(fd, 100, 0)\n\
         os.close(fd)",
    );
    assert_eq!(out, "ok");
    assert_eq!(fs::read(&meta).unwrap(), b"model_name: cccc\n");
    // Over 128 KiB and back, with a reader holding each version open.
    let big = vec![b'y'; 300_000];
    let held = fs::File::open(&meta).unwrap();
    fs::write(&meta, &big).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(fs::read(&meta).unwrap() == big);
    let held_big = fs::File::open(&meta).unwrap();
    fs::write(&meta, b"model_name: dddd\n").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(fs::read(&meta).unwrap(), b"model_name: dddd\n");
    assert_eq!(fs::metadata(&meta).unwrap().len(), 17);
    drop((held, held_big));
}

/// MLflow writes `registered_model_meta` into a model's directory on every load, with the
/// URI's model name and version: the one file name that may take other content. Every earlier
/// content stays in the index as history (`artifactfs ls --history`); `--rewritable` adds
/// names and `--rewritable none` takes the exception away.
#[test]
fn registered_model_meta_may_be_replaced_and_keeps_its_history() {
    let Some(mut m) = Mount::with_args(
        "registered_model_meta_may_be_replaced_and_keeps_its_history",
        &["--rewritable", "notes.yaml"],
    ) else {
        return;
    };
    let art = setup_run(&m, "r1");
    for content in [
        "model_name: null\n",
        "model_name: lr\nmodel_version: '1'\n",
        "model_name: null\n",
    ] {
        assert_eq!(
            py(
                &art,
                &format!("put('registered_model_meta', {content:?}, 'w')")
            ),
            "ok"
        );
        assert_eq!(
            fs::read_to_string(art.join("registered_model_meta")).unwrap(),
            content
        );
        assert_eq!(
            fs::metadata(art.join("registered_model_meta"))
                .unwrap()
                .len(),
            content.len() as u64
        );
    }
    assert_eq!(
        py(
            &art,
            "put('notes.yaml', 'a: 1', 'w')\nput('notes.yaml', 'a: 2', 'w')"
        ),
        "ok"
    );
    assert_eq!(fs::read_to_string(art.join("notes.yaml")).unwrap(), "a: 2");
    // Any other name stays write-once.
    fs::write(art.join("MLmodel"), b"flavors: {}\n").unwrap();
    assert_eq!(py(&art, "put('MLmodel', 'flavors: {x: 1}', 'w')"), "EPERM");
    let out = m.cli(&["ls", "--history", "runs/r1/artifacts/registered_model_meta"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].contains(&sha256_hex(b"model_name: null\n")),
        "{text}"
    );
    assert!(
        lines[1].contains(&sha256_hex(b"model_name: lr\nmodel_version: '1'\n")),
        "{text}"
    );
    assert!(
        lines[2].contains(&sha256_hex(b"model_name: null\n")) && lines[2].ends_with("current"),
        "{text}"
    );
    // `mv` of a file with the same content onto it (a tool's temp file, renamed into place)
    // leaves the path its history.
    fs::write(art.join("meta.tmp"), "model_name: null\n").unwrap();
    fs::rename(art.join("meta.tmp"), art.join("registered_model_meta")).unwrap();
    let out = m.cli(&["ls", "--history", "runs/r1/artifacts/registered_model_meta"]);
    assert!(out.status.success(), "{out:?}");
    let after = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(after.lines().count(), 3, "{after}");
    // The exception can be turned off.
    m.unmount();
    m.mount(&["--rewritable", "none"]);
    assert_eq!(
        py(
            &art,
            "put('registered_model_meta', 'model_name: x\\n', 'w')"
        ),
        "EPERM"
    );
    assert_eq!(
        fs::read_to_string(art.join("registered_model_meta")).unwrap(),
        "model_name: null\n"
    );
}
