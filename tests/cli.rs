//! The command line against real mounts: `mount` (detached, `--foreground`, `--read-only`),
//! `unmount`, `fsck`, `ls`, the default store and the daemon log.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

// ----- local helpers -------------------------------------------------------------------------

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A mount this file made itself (beyond the harness's `Mount`): unmounted on drop, lazily if
/// need be, and its daemon waited for.
struct ExtraMount {
    mnt: PathBuf,
    pid: Option<i32>,
}

impl ExtraMount {
    /// Runs `artifactfs mount [--store STORE] ARGS MNT` with extra environment; the guard is
    /// returned whatever happened, with the command's output.
    fn mount(
        store: Option<&Path>,
        mnt: &Path,
        args: &[&str],
        envs: &[(&str, &Path)],
    ) -> (ExtraMount, Output) {
        let mut cmd = Command::new(BIN);
        cmd.arg("mount");
        if let Some(s) = store {
            cmd.arg("--store").arg(s);
        }
        cmd.args(args).arg(mnt).env_remove("ARTIFACTFS_STORE");
        if !envs.iter().any(|(k, _)| *k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let guard = ExtraMount {
            mnt: mnt.to_path_buf(),
            pid: reported_pid(&out),
        };
        (guard, out)
    }
}

impl Drop for ExtraMount {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        if let Some(pid) = self.pid
            && !wait_until(Duration::from_secs(5), || process_gone(pid))
        {
            eprintln!(
                "daemon {pid} of {} still running after unmount; killing it",
                self.mnt.display()
            );
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A `mount --foreground` child: killed and its mount detached on drop if the test did not end
/// them.
struct Foreground {
    child: Child,
    mnt: PathBuf,
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

fn blob_path(store: &Path, sha: &str) -> PathBuf {
    store.join("blobs/sha256").join(&sha[..2]).join(&sha[2..])
}

/// The mount's source (the store path) in /proc/mounts.
fn mount_source(mnt: &Path) -> Option<String> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let want = mnt.to_string_lossy();
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(1) == Some(&want.as_ref())).then(|| f[0].to_string())
    })
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("afs-cli-")
        .tempdir()
        .unwrap()
}

// ----- mount ---------------------------------------------------------------------------------

#[test]
fn mount_refuses_a_missing_or_non_directory_mount_point() {
    if !fuse_available("mount_refuses_a_missing_or_non_directory_mount_point") {
        return;
    }
    let dir = temp_dir();
    let store = dir.path().join("store");

    let missing = dir.path().join("no-such-dir");
    let (_g1, out) = ExtraMount::mount(Some(&store), &missing, &[], &[]);
    assert!(
        !out.status.success(),
        "mount on a missing directory succeeded"
    );
    let err = stderr(&out);
    assert!(
        err.contains(&*missing.to_string_lossy()),
        "message does not name the mount point: {err}"
    );
    assert!(
        err.contains("No such file or directory"),
        "unclear message: {err}"
    );

    let file = dir.path().join("regular-file");
    fs::write(&file, b"x").unwrap();
    let (_g2, out) = ExtraMount::mount(Some(&store), &file, &[], &[]);
    assert!(!out.status.success(), "mount on a regular file succeeded");
    let err = stderr(&out);
    assert!(
        err.contains(&*file.to_string_lossy()),
        "message does not name the mount point: {err}"
    );
    assert!(err.contains("not a directory"), "unclear message: {err}");
    assert!(!is_mounted(&file));
}

#[test]
fn mount_on_a_mounted_or_dead_mount_point_says_unmount_first() {
    let Some(mut m) = Mount::new("mount_on_a_mounted_or_dead_mount_point_says_unmount_first")
    else {
        return;
    };
    // Another store over the live mount: refused before anything is created.
    let other = m.dir.path().join("other-store");
    let (_g, out) = ExtraMount::mount(Some(&other), &m.mnt, &[], &[]);
    assert!(!out.status.success(), "a second mount went over the first");
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{} is already mounted (fuse of {})",
            m.mnt.display(),
            m.store.display()
        )) && err.contains("unmount it first"),
        "{err}"
    );
    assert!(!other.exists(), "the refused mount created its store");
    assert_eq!(err.lines().count(), 1, "{err}");

    // The daemon dies: the mount point answers ENOTCONN, and mount says what to do.
    kill9(m.daemon_pid());
    let (_g, out) = ExtraMount::mount(Some(&m.store), &m.mnt, &[], &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("is a FUSE mount whose daemon is gone: unmount it first")
            && err.contains("Transport endpoint is not connected"),
        "{err}"
    );
    // ... and `artifactfs unmount` does it.
    let out = Command::new(BIN)
        .arg("unmount")
        .arg(&m.mnt)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!is_mounted(&m.mnt));
    m.mark_stale();
    m.mount(&[]);
}

#[test]
fn second_writable_mount_of_a_store_is_refused() {
    let Some(m) = Mount::new("second_writable_mount_of_a_store_is_refused") else {
        return;
    };
    let other = m.dir.path().join("other");
    fs::create_dir(&other).unwrap();
    let (_g, out) = ExtraMount::mount(Some(&m.store), &other, &[], &[]);
    assert!(
        !out.status.success(),
        "a second writable daemon mounted the same store"
    );
    assert!(
        stderr(&out).contains("already mounted writable"),
        "{}",
        stderr(&out)
    );
    assert!(!is_mounted(&other));
    // The first mount is unaffected.
    fs::create_dir(m.path("runs/still-works")).unwrap();
}

#[test]
fn read_only_mount_reads_refuses_every_change_and_sees_new_files() {
    let Some(m) = Mount::new("read_only_mount_reads_refuses_every_change_and_sees_new_files")
    else {
        return;
    };
    fs::create_dir(m.path("runs/ro")).unwrap();
    fs::write(
        m.path("runs/ro/artifacts/a.txt"),
        b"sealed before the read-only mount\n",
    )
    .unwrap();

    let ro = m.dir.path().join("ro");
    fs::create_dir(&ro).unwrap();
    let (_g, out) = ExtraMount::mount(Some(&m.store), &ro, &["--read-only"], &[]);
    assert!(
        out.status.success(),
        "read-only mount failed: {}",
        stderr(&out)
    );
    let p = |rel: &str| ro.join(rel);

    // Reads work.
    assert_eq!(
        fs::read(p("runs/ro/artifacts/a.txt")).unwrap(),
        b"sealed before the read-only mount\n"
    );
    let mut names: Vec<_> = fs::read_dir(&ro)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["models", "runs"]);

    // Every change: EROFS.
    let erofs = |what: &str, r: std::io::Result<()>| match r {
        Ok(()) => panic!("{what} succeeded on the read-only mount"),
        Err(e) => assert_eq!(errno(&e), libc::EROFS, "{what}: {e}"),
    };
    erofs("mkdir run", fs::create_dir(p("runs/new")));
    erofs(
        "mkdir below a run",
        fs::create_dir(p("runs/ro/artifacts/d")),
    );
    erofs(
        "create",
        File::create(p("runs/ro/artifacts/b.txt")).map(drop),
    );
    erofs(
        "open for writing",
        OpenOptions::new()
            .write(true)
            .open(p("runs/ro/artifacts/a.txt"))
            .map(drop),
    );
    erofs("unlink", fs::remove_file(p("runs/ro/artifacts/a.txt")));
    erofs(
        "rename",
        fs::rename(p("runs/ro/artifacts/a.txt"), p("runs/ro/artifacts/c.txt")),
    );
    erofs(
        "chmod",
        fs::set_permissions(
            p("runs/ro/artifacts/a.txt"),
            fs::Permissions::from_mode(0o600),
        ),
    );
    erofs(
        "setxattr",
        setxattr(&p("runs/ro/artifacts/a.txt"), "user.test", b"1"),
    );
    erofs("rmdir", fs::remove_dir(p("runs/ro/artifacts")));
    // Nothing changed.
    assert_eq!(
        fs::read(m.path("runs/ro/artifacts/a.txt")).unwrap(),
        b"sealed before the read-only mount\n"
    );
    assert_eq!(
        fs::metadata(m.path("runs/ro/artifacts/a.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o644
    );

    // Files the writer seals afterwards (observed: visible at once, no remount needed).
    fs::create_dir(m.path("runs/later")).unwrap();
    fs::write(
        m.path("runs/later/artifacts/new.txt"),
        b"sealed while the read-only mount was up\n",
    )
    .unwrap();
    fs::write(m.path("runs/ro/artifacts/b.txt"), b"b\n").unwrap();
    let t0 = Instant::now();
    let seen = wait_until(Duration::from_secs(3), || {
        fs::read(p("runs/later/artifacts/new.txt")).ok().as_deref()
            == Some(b"sealed while the read-only mount was up\n")
            && fs::read(p("runs/ro/artifacts/b.txt")).ok().as_deref() == Some(b"b\n")
    });
    assert!(
        seen,
        "the read-only mount does not see files sealed by the writer after 3 s"
    );
    eprintln!(
        "read-only mount saw the writer's new files after {:?}",
        t0.elapsed()
    );

    // A file the writer removes leaves the read-only mount's listing; opening it fails. Its
    // attributes may stay cached (sealed files get a long TTL): observed, not asserted.
    fs::remove_file(m.path("runs/ro/artifacts/b.txt")).unwrap();
    let listed = || {
        fs::read_dir(p("runs/ro/artifacts"))
            .unwrap()
            .any(|e| e.unwrap().file_name() == "b.txt")
    };
    assert!(
        wait_until(Duration::from_secs(3), || !listed()),
        "the read-only mount still lists a file the writer removed"
    );
    let open = File::open(p("runs/ro/artifacts/b.txt"));
    assert!(
        open.is_err(),
        "the read-only mount still opens a file the writer removed"
    );
    eprintln!(
        "after the writer removed b.txt, the read-only mount: stat -> {:?}, open -> {:?}",
        fs::metadata(p("runs/ro/artifacts/b.txt")).map(|m| m.len()),
        open.map(drop)
    );

    // A directory the writer removes and makes again: a path through the name the reader's
    // kernel still keeps for the old one (for up to its 1 s cache time; a read-only daemon
    // hears of no change) reaches the new one at once; a descriptor of the old one reaches
    // nothing in the new one (ESTALE).
    fs::create_dir(m.path("runs/ro/artifacts/d")).unwrap();
    fs::write(m.path("runs/ro/artifacts/d/x"), b"x").unwrap();
    assert!(wait_until(Duration::from_secs(3), || fs::read(p(
        "runs/ro/artifacts/d/x"
    ))
    .is_ok()));
    let held = File::open(p("runs/ro/artifacts/d")).unwrap();
    fs::remove_file(m.path("runs/ro/artifacts/d/x")).unwrap();
    fs::remove_dir(m.path("runs/ro/artifacts/d")).unwrap();
    fs::create_dir(m.path("runs/ro/artifacts/d")).unwrap();
    fs::write(m.path("runs/ro/artifacts/d/y"), b"y").unwrap();
    assert_eq!(fs::read(p("runs/ro/artifacts/d/y")).unwrap(), b"y");
    let name = std::ffi::CString::new("y").unwrap();
    let fd = unsafe {
        libc::openat(
            std::os::fd::AsRawFd::as_raw_fd(&held),
            name.as_ptr(),
            libc::O_RDONLY,
        )
    };
    let e = std::io::Error::last_os_error();
    assert_eq!(
        fd, -1,
        "the old directory's descriptor opened the new one's file"
    );
    assert_eq!(errno(&e), libc::ESTALE, "{e}");
}

#[test]
fn unmounting_a_read_only_mount_does_not_wait_for_the_writable_daemon() {
    let Some(m) = Mount::new("unmounting_a_read_only_mount_does_not_wait_for_the_writable_daemon")
    else {
        return;
    };
    let ro = m.dir.path().join("ro");
    fs::create_dir(&ro).unwrap();
    let (_g, out) = ExtraMount::mount(Some(&m.store), &ro, &["--read-only"], &[]);
    assert!(
        out.status.success(),
        "read-only mount failed: {}",
        stderr(&out)
    );
    let t0 = Instant::now();
    // Run with a deadline: a hang here must not stall the suite for long.
    let mut child = Command::new(BIN)
        .arg("unmount")
        .arg(&ro)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t0.elapsed() > Duration::from_secs(8) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert!(!is_mounted(&ro), "the read-only mount is still mounted");
    assert!(
        status.is_some_and(|s| s.success()),
        "`artifactfs unmount` of the read-only mount: {status:?} after {:?} — it waits for the \
         writable daemon's store lock, which the read-only daemon never held. {err}",
        t0.elapsed()
    );
    assert!(is_mounted(&m.mnt), "the writable mount went away too");
}

#[test]
fn foreground_mount_unmounts_cleanly_on_sigterm_sigint_and_sighup() {
    if !fuse_available("foreground_mount_unmounts_cleanly_on_sigterm_sigint_and_sighup") {
        return;
    }
    let dir = temp_dir();
    let store = dir.path().join("store");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    for (sig, name) in [
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGHUP, "SIGHUP"),
    ] {
        let log = File::create(dir.path().join(format!("foreground-{name}.log"))).unwrap();
        let child = Command::new(BIN)
            .args(["mount", "--foreground", "--store"])
            .arg(&store)
            .arg(&mnt)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut fg = Foreground {
            child,
            mnt: mnt.clone(),
        };
        assert!(
            wait_until(Duration::from_secs(10), || is_mounted(&mnt)),
            "{name}: the foreground mount never became live"
        );
        assert!(
            fg.child.try_wait().unwrap().is_none(),
            "{name}: the foreground process exited while mounted"
        );
        let run = format!("runs/{name}");
        fs::create_dir(mnt.join(&run)).unwrap();
        fs::write(mnt.join(format!("{run}/artifacts/f")), name).unwrap();

        let t0 = Instant::now();
        assert_eq!(unsafe { libc::kill(fg.child.id() as i32, sig) }, 0);
        let status = loop {
            if let Some(s) = fg.child.try_wait().unwrap() {
                break Some(s);
            }
            if t0.elapsed() > Duration::from_secs(5) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = fs::read_to_string(dir.path().join(format!("foreground-{name}.log"))).unwrap();
        assert!(
            status.is_some(),
            "{name}: the foreground process did not exit within 5 s\n{log}"
        );
        assert!(
            status.unwrap().success(),
            "{name}: exit status {status:?}\n{log}"
        );
        assert!(
            !is_mounted(&mnt),
            "{name}: still mounted after the process exited"
        );
        eprintln!("{name}: unmounted and exited in {:?}", t0.elapsed());
    }
    // Everything written through the three mounts is in the store.
    let out = Command::new(BIN)
        .args(["ls", "--store"])
        .arg(&store)
        .arg("runs")
        .output()
        .unwrap();
    for name in ["SIGTERM", "SIGINT", "SIGHUP"] {
        assert!(
            stdout(&out).contains(&format!("{name}/")),
            "{}",
            stdout(&out)
        );
    }
}

// ----- unmount -------------------------------------------------------------------------------

#[test]
fn unmount_of_a_busy_mount_fails_and_lazy_unmount_detaches() {
    let Some(mut m) = Mount::new("unmount_of_a_busy_mount_fails_and_lazy_unmount_detaches") else {
        return;
    };
    fs::create_dir(m.path("runs/busy")).unwrap();
    fs::write(m.path("runs/busy/artifacts/held.txt"), b"held open\n").unwrap();
    let mut held = File::open(m.path("runs/busy/artifacts/held.txt")).unwrap();
    let pid = m.daemon_pid();

    let out = Command::new(BIN)
        .arg("unmount")
        .arg(&m.mnt)
        .output()
        .unwrap();
    assert!(!out.status.success(), "unmount of a busy mount succeeded");
    assert!(stderr(&out).contains("busy"), "{}", stderr(&out));
    assert!(is_mounted(&m.mnt), "a failed unmount unmounted anyway");

    let out = Command::new(BIN)
        .args(["unmount", "--lazy"])
        .arg(&m.mnt)
        .output()
        .unwrap();
    assert!(out.status.success(), "unmount --lazy: {}", stderr(&out));
    assert!(
        !is_mounted(&m.mnt),
        "still in /proc/mounts after unmount --lazy"
    );
    m.mark_stale();
    // The open file keeps working until it is closed; then the daemon goes away.
    let mut s = String::new();
    held.read_to_string(&mut s).unwrap();
    assert_eq!(s, "held open\n");
    drop(held);
    assert!(
        wait_until(Duration::from_secs(10), || process_gone(pid)),
        "daemon {pid} still running 10 s after the lazily unmounted mount's last file closed"
    );
}

#[test]
fn unmount_of_a_directory_that_is_not_mounted_fails_clearly() {
    let dir = temp_dir();
    let out = Command::new(BIN)
        .arg("unmount")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not mounted"), "{}", stderr(&out));
}

// ----- fsck ----------------------------------------------------------------------------------

#[test]
fn fsck_finds_corrupt_blobs_with_verify_and_missing_blobs_always() {
    let Some(mut m) = Mount::new("fsck_finds_corrupt_blobs_with_verify_and_missing_blobs_always")
    else {
        return;
    };
    fs::create_dir(m.path("runs/f")).unwrap();
    // Three blobs and, below INLINE_MAX, three contents the index holds.
    let files = [
        ("good.bin", 1u64, 100_000),
        ("bad.bin", 2, 100_000),
        ("gone.bin", 3, 100_000),
        ("small_good.txt", 4, 2000),
        ("small_bad.txt", 5, 2000),
        ("small_gone.txt", 6, 2000),
    ];
    let mut sha = std::collections::HashMap::new();
    for (name, seed, len) in files {
        let data = pseudo_random(seed, len + seed as usize);
        fs::write(m.path(&format!("runs/f/artifacts/{name}")), &data).unwrap();
        sha.insert(name, sha256_hex(&data));
    }
    m.unmount();

    let clean = m.cli(&["fsck"]);
    assert!(
        clean.status.success(),
        "{}{}",
        stdout(&clean),
        stderr(&clean)
    );
    assert!(
        stdout(&clean).lines().any(|l| l == "ok"),
        "{}",
        stdout(&clean)
    );
    assert!(
        stdout(&clean)
            .starts_with("6 files (6 live, 0 removed), 6 contents (3 blobs, 3 in the index)"),
        "{}",
        stdout(&clean)
    );
    let clean = m.cli(&["fsck", "--verify"]);
    assert!(clean.status.success(), "{}", stdout(&clean));
    assert!(
        stdout(&clean).lines().any(|l| l == "ok"),
        "{}",
        stdout(&clean)
    );

    // Flip one byte of bad.bin's blob and of small_bad.txt's row: sizes still agree, only
    // --verify can tell.
    let bad = blob_path(&m.store, &sha["bad.bin"]);
    fs::set_permissions(&bad, fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = fs::read(&bad).unwrap();
    bytes[1234] ^= 0x40;
    fs::write(&bad, &bytes).unwrap();
    let mut small = stored_bytes(&m.store, &sha["small_bad.txt"]).unwrap();
    small[17] ^= 0x40;
    damage_inline(&m.store, &sha["small_bad.txt"], Some(&small));
    let plain = m.cli(&["fsck"]);
    assert!(
        plain.status.success(),
        "plain fsck re-hashed? {}",
        stdout(&plain)
    );
    assert!(
        stdout(&plain).lines().any(|l| l == "ok"),
        "{}",
        stdout(&plain)
    );
    let verify = m.cli(&["fsck", "--verify"]);
    let report = stdout(&verify);
    assert_eq!(
        verify.status.code(),
        Some(1),
        "fsck --verify on a corrupt blob: {report}"
    );
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("problem"))
        .collect();
    for bad in [
        "/runs/f/artifacts/bad.bin",
        "/runs/f/artifacts/small_bad.txt",
    ] {
        assert!(problems.iter().any(|l| l.contains(bad)), "{report}");
    }
    assert!(
        !problems
            .iter()
            .any(|l| l.contains("good") || l.contains("gone")),
        "{report}"
    );
    assert_eq!(problems.len(), 2, "{report}");

    // Delete gone.bin's blob and small_gone.txt's row: plain fsck notices.
    fs::remove_file(blob_path(&m.store, &sha["gone.bin"])).unwrap();
    damage_inline(&m.store, &sha["small_gone.txt"], None);
    let plain = m.cli(&["fsck"]);
    let report = stdout(&plain);
    assert_eq!(
        plain.status.code(),
        Some(1),
        "fsck with a missing blob: {report}"
    );
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("problem"))
        .collect();
    for gone in [
        "/runs/f/artifacts/gone.bin",
        "/runs/f/artifacts/small_gone.txt",
    ] {
        assert!(
            problems
                .iter()
                .any(|l| l.contains(gone) && l.contains("missing")),
            "{report}"
        );
    }
    assert!(!report.lines().any(|l| l == "ok"), "{report}");

    // Damaged contents read as EIO through a new mount; writing the same bytes again heals.
    m.mount(&[]);
    for name in ["bad.bin", "small_bad.txt", "small_gone.txt"] {
        let err = fs::read(m.path(&format!("runs/f/artifacts/{name}"))).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{name}");
    }
    let small = pseudo_random(6, 2006);
    fs::write(m.path("runs/f/artifacts/small_gone_again.txt"), &small).unwrap();
    assert_eq!(
        fs::read(m.path("runs/f/artifacts/small_gone.txt")).unwrap(),
        small
    );
    assert_eq!(
        stored_bytes(&m.store, &sha["small_gone.txt"]).as_deref(),
        Some(&small[..])
    );
}

// ----- ls ------------------------------------------------------------------------------------

/// `ls` lines as (mode, size, hash, name).
fn ls_lines(o: &Output) -> Vec<(String, u64, String, String)> {
    stdout(o)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 4, "ls line {l:?}");
            (
                f[0].to_string(),
                f[1].parse().unwrap(),
                f[2].to_string(),
                f[3..].join(" "),
            )
        })
        .collect()
}

#[test]
fn ls_lists_the_store_without_a_mount() {
    let Some(mut m) = Mount::new("ls_lists_the_store_without_a_mount") else {
        return;
    };
    fs::create_dir(m.path("runs/exp1")).unwrap();
    fs::create_dir(m.path("runs/exp2")).unwrap();
    let a = b"alpha\n".repeat(1000);
    let b = pseudo_random(5, 4321);
    fs::write(m.path("runs/exp1/artifacts/a.txt"), &a).unwrap();
    fs::create_dir(m.path("runs/exp1/artifacts/sub")).unwrap();
    fs::write(m.path("runs/exp1/artifacts/sub/b.bin"), &b).unwrap();
    fs::write(m.path("runs/exp1/artifacts/removed.txt"), b"x").unwrap();
    fs::remove_file(m.path("runs/exp1/artifacts/removed.txt")).unwrap();
    m.unmount();
    assert!(!is_mounted(&m.mnt));

    let runs = m.cli(&["ls", "runs"]);
    assert!(runs.status.success(), "{}", stderr(&runs));
    let names: Vec<String> = ls_lines(&runs).into_iter().map(|l| l.3).collect();
    assert_eq!(names, ["exp1/", "exp2/"], "{}", stdout(&runs));
    // PATH defaults to runs.
    assert_eq!(stdout(&m.cli(&["ls"])), stdout(&runs));

    let arts = m.cli(&["ls", "runs/exp1/artifacts"]);
    assert!(arts.status.success(), "{}", stderr(&arts));
    let lines = ls_lines(&arts);
    let find = |n: &str| {
        lines
            .iter()
            .find(|l| l.3 == n)
            .unwrap_or_else(|| panic!("{n} not listed:\n{}", stdout(&arts)))
            .clone()
    };
    let la = find("a.txt");
    assert_eq!(
        (la.0.as_str(), la.1, la.2.as_str()),
        ("-rw-r--r--", a.len() as u64, &sha256_hex(&a)[..16])
    );
    let ls = find("sub/");
    assert!(ls.0.starts_with('d') && ls.2 == "-", "{ls:?}");
    assert!(
        !lines.iter().any(|l| l.3.contains("removed")),
        "a removed file is listed:\n{}",
        stdout(&arts)
    );

    let sub = m.cli(&["ls", "runs/exp1/artifacts/sub"]);
    let lb = ls_lines(&sub);
    assert_eq!(lb.len(), 1, "{}", stdout(&sub));
    assert_eq!(
        (lb[0].1, lb[0].2.as_str(), lb[0].3.as_str()),
        (b.len() as u64, &sha256_hex(&b)[..16], "b.bin")
    );
    // A file path lists that file.
    let one = m.cli(&["ls", "runs/exp1/artifacts/a.txt"]);
    assert!(one.status.success(), "{}", stderr(&one));
    assert_eq!(ls_lines(&one).len(), 1, "{}", stdout(&one));
    assert_eq!(ls_lines(&one)[0].3, "a.txt");
    // Unknown paths are an error that names them.
    let none = m.cli(&["ls", "runs/nope"]);
    assert!(!none.status.success());
    assert!(stderr(&none).contains("runs/nope"), "{}", stderr(&none));
}

// ----- the store -----------------------------------------------------------------------------

#[test]
fn store_directory_is_created_private() {
    let Some(m) = Mount::new("store_directory_is_created_private") else {
        return;
    };
    let mode = fs::metadata(&m.store).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode,
        0o700,
        "the store {} was created mode {mode:o}",
        m.store.display()
    );
}

#[test]
fn default_store_honours_xdg_data_home() {
    if !fuse_available("default_store_honours_xdg_data_home") {
        return;
    }
    let dir = temp_dir();
    let xdg = dir.path().join("xdg");
    let home = dir.path().join("home");
    let mnt = dir.path().join("mnt");
    for d in [&xdg, &home, &mnt] {
        fs::create_dir(d).unwrap();
    }
    let envs: [(&str, &Path); 2] = [("XDG_DATA_HOME", &xdg), ("HOME", &home)];
    let (guard, out) = ExtraMount::mount(None, &mnt, &[], &envs);
    assert!(
        out.status.success(),
        "mount without --store: {}",
        stderr(&out)
    );
    let store = xdg.join("artifactfs");
    assert!(
        store.join("index.sqlite").exists(),
        "no store at {}",
        store.display()
    );
    assert!(
        !home.join(".local").exists(),
        "the store went to HOME despite XDG_DATA_HOME"
    );
    assert_eq!(
        mount_source(&mnt).as_deref(),
        Some(&*store.to_string_lossy())
    );
    fs::create_dir(mnt.join("runs/xdg-run")).unwrap();

    let out = Command::new(BIN).arg("unmount").arg(&mnt).output().unwrap();
    assert!(out.status.success(), "unmount: {}", stderr(&out));
    drop(guard);
    // `ls` without --store finds the same store.
    let out = Command::new(BIN)
        .arg("ls")
        .env_remove("ARTIFACTFS_STORE")
        .env("XDG_DATA_HOME", &xdg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("xdg-run/"), "{}", stdout(&out));
    // Without XDG_DATA_HOME: ~/.local/share/artifactfs (nothing there: the error names it).
    let out = Command::new(BIN)
        .arg("ls")
        .env_remove("ARTIFACTFS_STORE")
        .env_remove("XDG_DATA_HOME")
        .env("HOME", &home)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let want = home.join(".local/share/artifactfs");
    assert!(
        stderr(&out).contains(&*want.to_string_lossy()),
        "{}",
        stderr(&out)
    );
}

// ----- the log -------------------------------------------------------------------------------

#[test]
fn a_refused_operation_logs_exactly_one_refused_line() {
    if !fuse_available("a_refused_operation_logs_exactly_one_refused_line") {
        return;
    }
    let dir = temp_dir();
    for level in ["info", "debug"] {
        let store = dir.path().join(format!("store-{level}"));
        let mnt = dir.path().join(format!("mnt-{level}"));
        fs::create_dir(&mnt).unwrap();
        let (_g, out) =
            ExtraMount::mount(Some(&store), &mnt, &[], &[("RUST_LOG", Path::new(level))]);
        assert!(out.status.success(), "{}", stderr(&out));
        // A file directly in runs/ is refused (EPERM).
        let e = File::create(mnt.join("runs/refuse-me-please")).unwrap_err();
        assert_eq!(errno(&e), libc::EPERM);
        let log_path = store.join("artifactfs.log");
        let refused = || {
            fs::read_to_string(&log_path)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("refused"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        wait_until(Duration::from_secs(2), || !refused().is_empty());
        std::thread::sleep(Duration::from_millis(100));
        let lines = refused();
        assert_eq!(
            lines.len(),
            1,
            "RUST_LOG={level}: refused lines:\n{}",
            lines.join("\n")
        );
        assert!(
            lines[0].contains("refused create /runs/refuse-me-please"),
            "RUST_LOG={level}: {}",
            lines[0]
        );
        let out = Command::new(BIN).arg("unmount").arg(&mnt).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

/// A file committed by one `close()` while a dup'd descriptor still writes is not sealed: a
/// `--read-only` daemon on the same store answers `EBUSY` for it, never its intermediate bytes,
/// and serves the final content once the writer released it. One path, one content.
#[test]
fn a_read_only_daemon_never_serves_a_file_that_is_still_open_for_writing() {
    let Some(m) =
        Mount::new("a_read_only_daemon_never_serves_a_file_that_is_still_open_for_writing")
    else {
        return;
    };
    fs::create_dir(m.path("runs/r")).unwrap();
    let ro = m.dir.path().join("ro");
    fs::create_dir(&ro).unwrap();
    let (_g, out) = ExtraMount::mount(Some(&m.store), &ro, &["--read-only"], &[]);
    assert!(
        out.status.success(),
        "read-only mount failed: {}",
        stderr(&out)
    );
    let script = "import os, sys\n\
        fd = os.open('runs/r/artifacts/f', os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)\n\
        os.write(fd, b'AAAA')\n\
        dup = os.dup(fd)\n\
        os.close(fd)\n\
        print('committed', flush=True)\n\
        sys.stdin.readline()\n\
        os.pwrite(dup, b'BBBBBB', 0)\n\
        os.close(dup)\n\
        print('sealed', flush=True)\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .current_dir(&m.mnt)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "committed");
    let f = ro.join("runs/r/artifacts/f");
    // Committed but still open on the writer: never "AAAA" through the other daemon (and the
    // size seen now must not stick).
    let _ = fs::metadata(&f);
    for _ in 0..5 {
        match fs::read(&f) {
            Ok(bytes) => panic!(
                "the read-only daemon served {:?}",
                String::from_utf8_lossy(&bytes)
            ),
            Err(e) => assert!(
                [libc::EBUSY, libc::ENOENT].contains(&errno(&e)),
                "read through the read-only daemon: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "sealed");
    assert!(child.wait().unwrap().success());
    // Released: the seal reaches the index within a tick; the kernel's cached attributes on the
    // read-only mount last at most a second.
    // The first successful read is the whole final content, never cut to the size seen while
    // the file was being written (cached attributes; found by the soak).
    let ok = wait_until(Duration::from_secs(3), || match fs::read(&f) {
        Ok(b) => {
            assert_eq!(b, b"BBBBBB", "served {:?}", String::from_utf8_lossy(&b));
            true
        }
        Err(_) => false,
    });
    assert!(
        ok,
        "the read-only daemon never served the sealed content: {:?}",
        fs::read(&f)
    );
    assert_eq!(fs::read(m.path("runs/r/artifacts/f")).unwrap(), b"BBBBBB");
}

/// A request whose handler panics answers `EIO`, logs the panic with a backtrace, and leaves
/// its request thread serving: with 2 threads, 10 panics in a row would otherwise leave none.
#[test]
fn a_panicking_request_answers_eio_and_the_mount_lives_on() {
    let Some(m) = Mount::new("a_panicking_request_answers_eio_and_the_mount_lives_on") else {
        return;
    };
    // The fixture's own mount is not needed: a second store with the fault hook armed.
    let store = m.dir.path().join("store2");
    let mnt = m.dir.path().join("mnt2");
    fs::create_dir(&mnt).unwrap();
    let boom = Path::new("boom");
    let (_g, out) = ExtraMount::mount(
        Some(&store),
        &mnt,
        &["--threads", "2"],
        &[("ARTIFACTFS_FAULT_PANIC_ON", boom)],
    );
    assert!(out.status.success(), "mount failed: {}", stderr(&out));
    for _ in 0..10 {
        // `timeout`: if the threads were gone, this would hang instead of failing.
        let out = Command::new("timeout")
            .args(["10", "stat"])
            .arg(mnt.join("runs/boom"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Input/output error"),
            "stat runs/boom: {:?} {err}",
            out.status
        );
    }
    fs::create_dir(mnt.join("runs/r")).unwrap();
    fs::write(mnt.join("runs/r/artifacts/f"), b"still here\n").unwrap();
    assert_eq!(
        fs::read(mnt.join("runs/r/artifacts/f")).unwrap(),
        b"still here\n"
    );
    let log = fs::read_to_string(store.join("artifactfs.log")).unwrap();
    assert_eq!(
        log.matches("lookup: the handler panicked").count(),
        10,
        "{log}"
    );
    assert!(
        log.contains("panic: ") && log.contains("fault injection"),
        "{log}"
    );
    assert!(
        log.contains("stack backtrace") || log.contains("at src/"),
        "no backtrace:\n{log}"
    );
}
