//! Running as a service and as a mount type: the systemd unit's ExecStart line, the
//! `mount -t fuse.artifactfs` helper and an fstab line, and a container-style bind mount used by
//! an unprivileged user.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A temp dir whose path every user may traverse (for tests that switch users).
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("afs-svc-")
        .tempdir()
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Unmounts on drop, whatever happened.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn the_unit_files_exec_start_notifies_readiness_and_stops_cleanly() {
    if !fuse_available("the_unit_files_exec_start_notifies_readiness_and_stops_cleanly") {
        return;
    }
    let unit = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/artifactfs.service"),
    )
    .unwrap();
    assert!(unit.contains("Type=notify"));
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart line");
    let dir = open_tempdir();
    let (store, mnt) = (dir.path().join("store"), dir.path().join("mnt"));
    fs::create_dir(&mnt).unwrap();
    let line = exec
        .replace("/usr/local/bin/artifactfs", BIN)
        .replace("/var/lib/artifactfs", store.to_str().unwrap())
        .replace("/mnt/ml", mnt.to_str().unwrap());
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut child = Command::new(words[0])
        .args(&words[1..])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _guard = Unmount(mnt.clone());
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 from the daemon");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    // Ready means live: usable on the next line.
    assert!(is_mounted(&mnt));
    fs::create_dir(mnt.join("runs/svc")).unwrap();
    fs::write(mnt.join("runs/svc/artifacts/f"), b"x").unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = notify.recv(&mut buf).expect("STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(wait_until(Duration::from_secs(10), || child
        .try_wait()
        .unwrap()
        .is_some()));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!is_mounted(&mnt));
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("unmounted"), "logs go to stderr: {err}");
}

/// Installs `/sbin/mount.fuse.artifactfs` (a link to the binary) for the test's duration.
struct MountHelper(PathBuf);

impl MountHelper {
    fn install() -> Option<MountHelper> {
        let path = PathBuf::from("/sbin/mount.fuse.artifactfs");
        match fs::read_link(&path) {
            Ok(target) if target == Path::new(BIN) => {}
            Ok(_) | Err(_) if path.exists() => {
                eprintln!("skipped: {} exists and is not this build's", path.display());
                return None;
            }
            _ => {
                // A dangling link left by an earlier build is replaced.
                let _ = fs::remove_file(&path);
                std::os::unix::fs::symlink(BIN, &path).unwrap()
            }
        }
        Some(MountHelper(path))
    }
}

impl Drop for MountHelper {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn mount_t_fuse_artifactfs_and_an_fstab_line_work() {
    if !fuse_available("mount_t_fuse_artifactfs_and_an_fstab_line_work") {
        return;
    }
    let Some(_helper) = MountHelper::install() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the mount helper must be testable in CI"
        );
        return;
    };
    let dir = open_tempdir();
    let (store, mnt) = (dir.path().join("store"), dir.path().join("mnt"));
    fs::create_dir(&mnt).unwrap();
    let _guard = Unmount(mnt.clone());
    let out = Command::new("mount")
        .args([
            "-t",
            "fuse.artifactfs",
            "-o",
            "allow_other,settle=1,nodev,nosuid",
        ])
        .arg(&store)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -t: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::create_dir(mnt.join("runs/m")).unwrap();
    fs::write(mnt.join("runs/m/artifacts/f"), b"via mount -t").unwrap();
    let out = Command::new(BIN).arg("unmount").arg(&mnt).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same store from an fstab line, read-only this time.
    let fstab = dir.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "{} {} fuse.artifactfs ro,allow_other,noauto,nofail 0 0\n",
            store.display(),
            mnt.display()
        ),
    )
    .unwrap();
    let out = Command::new("mount")
        .arg("--fstab")
        .arg(&fstab)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount from fstab: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read(mnt.join("runs/m/artifacts/f")).unwrap(),
        b"via mount -t"
    );
    assert_eq!(
        errno(&fs::write(mnt.join("runs/m/artifacts/g"), b"x").unwrap_err()),
        libc::EROFS
    );
    let out = Command::new("umount").arg(&mnt).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A bad option is refused with a clear message.
    let out = Command::new("mount")
        .args(["-t", "fuse.artifactfs", "-o", "bogus"])
        .arg(&store)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown mount option"));
}

#[test]
fn a_bind_mount_in_another_namespace_is_used_by_an_unprivileged_user() {
    let Some(m) = Mount::with_args(
        "a_bind_mount_in_another_namespace_is_used_by_an_unprivileged_user",
        &["--allow-other"],
    ) else {
        return;
    };
    fs::set_permissions(m.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(m.path("runs/c")).unwrap();
    let shared = m.path("runs/c/artifacts/shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    let inside = m.dir.path().join("inside");
    fs::create_dir(&inside).unwrap();
    fs::set_permissions(&inside, fs::Permissions::from_mode(0o755)).unwrap();
    // What `docker run -v /mnt/ml:/data` does: a bind mount in a private mount namespace, used
    // by the container's (unprivileged) user.
    let script = format!(
        "mount --bind {mnt} {inside} && \
         setpriv --reuid=65534 --regid=65534 --clear-groups sh -c \
           'echo from-container > {inside}/runs/c/artifacts/shared/out.txt && cat {inside}/runs/c/artifacts/shared/out.txt'",
        mnt = m.mnt.display(),
        inside = inside.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "from-container"
    );
    // Seen from the host: the file exists, sealed, owned by the container's user.
    let f = shared.join("out.txt");
    assert_eq!(fs::read(&f).unwrap(), b"from-container\n");
    let owner = sh_ok(&shared, "stat -c %u:%g out.txt");
    assert_eq!(owner.trim(), "65534:65534");
    assert!(
        !is_mounted(&inside),
        "the bind mount stayed in its namespace"
    );
}
