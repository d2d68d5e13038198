//! Containers for real: a Docker daemon runs the containers, and each test asserts the bytes
//! and the error messages (so the errno) a container sees. A mount on the host given as a
//! volume (read-only, read-write, to a user who is not root, with `--allow-other` and
//! `--uid/--gid`); the daemon as a container's main process; the sidecar pattern with mount
//! propagation; the mount errors inside containers; `unmount` while containers still hold the
//! volume; the packaged `Dockerfile`.
//!
//! The Docker daemon is private to the test run: `scripts/test.sh` starts one
//! (`scripts/container/dockerd.sh`) and names its socket in `ARTIFACTFS_TEST_DOCKER`. No image
//! registry is reachable, so the image is built here by `docker import` of a root file system
//! made of busybox (`busybox-static`), the artifactfs binary and the libraries `ldd` lists.
//! Without that socket the tests skip, saying why; with `CI=true` they fail.

mod common;

use std::fs;
use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// The variable naming the private Docker daemon's socket (set by scripts/test.sh).
const DOCKER_ENV: &str = "ARTIFACTFS_TEST_DOCKER";
/// A tarball of a Debian root file system for the Dockerfile's base (set by scripts/test.sh).
const DEBIAN_ENV: &str = "ARTIFACTFS_TEST_DEBIAN_ROOTFS";
/// busybox, the artifactfs binary and its libraries.
const IMAGE: &str = "afs-test/artifactfs";

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The private Docker daemon.
struct Docker {
    host: String,
}

impl Docker {
    fn cmd(&self) -> Command {
        let mut c = Command::new("docker");
        c.arg("-H").arg(&self.host);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs a docker command that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed ({}): {}",
            out.status,
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `docker run -d --network none ARGS` as a container removed on drop.
    fn start(&self, args: &[&str]) -> Container<'_> {
        let c = Container {
            docker: self,
            name: unique_name(),
        };
        let mut all = vec!["run", "-d", "--name", &c.name, "--network", "none"];
        all.extend_from_slice(args);
        self.ok(&all);
        c
    }

    /// `docker run --rm --network none ARGS` to its end; its output (stdout and stderr).
    fn once(&self, args: &[&str]) -> Output {
        let c = Container {
            docker: self,
            name: unique_name(),
        };
        let mut all = vec!["run", "--rm", "--name", &c.name, "--network", "none"];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// `docker run --rm ... IMAGE sh -c SCRIPT`, stderr merged into stdout in order.
    fn sh(&self, opts: &[&str], script: &str) -> String {
        let mut args = opts.to_vec();
        let merged = format!("exec 2>&1; {script}");
        args.extend_from_slice(&[IMAGE, "sh", "-c", &merged]);
        let out = self.once(&args);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn unique_name() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "afs-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A container removed (`docker rm -f`) on drop, whatever happened.
struct Container<'a> {
    docker: &'a Docker,
    name: String,
}

impl Container<'_> {
    /// `docker exec NAME sh -c SCRIPT`, stderr merged into stdout.
    fn exec(&self, script: &str) -> String {
        let merged = format!("exec 2>&1; {script}");
        let out = self.docker.run(&["exec", &self.name, "sh", "-c", &merged]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn logs(&self) -> String {
        text(&self.docker.run(&["logs", &self.name]))
    }

    /// Waits until the container's log says the mount is live.
    fn wait_mounted(&self) {
        assert!(
            wait_until(Duration::from_secs(30), || self
                .logs()
                .contains("mounted store")),
            "the daemon in {} did not mount: {}",
            self.name,
            self.logs()
        );
    }

    /// `docker stop` (SIGTERM, then SIGKILL after 20 s); the main process's exit code.
    fn stop(&self) -> i64 {
        self.docker.ok(&["stop", "-t", "20", &self.name]);
        self.docker
            .ok(&["inspect", "-f", "{{.State.ExitCode}}", &self.name])
            .trim()
            .parse()
            .unwrap()
    }
}

impl Container<'_> {
    /// `docker kill`: for containers whose main process (`sleep` as PID 1) ignores SIGTERM.
    fn kill(&self) {
        self.docker.ok(&["kill", &self.name]);
        self.docker.ok(&["wait", &self.name]);
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self
            .docker
            .cmd()
            .args(["rm", "-f", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The private Docker daemon with the test image built, or `None` (after saying why) where
/// there is none outside CI.
fn docker(test: &str) -> Option<&'static Docker> {
    if !fuse_available(test) {
        return None;
    }
    static DOCKER: OnceLock<Result<Docker, String>> = OnceLock::new();
    let docker = DOCKER.get_or_init(|| {
        let sock = std::env::var(DOCKER_ENV).map_err(|_| {
            format!(
                "{DOCKER_ENV} is not set: run scripts/test.sh, which starts a private dockerd \
                 (scripts/container/dockerd.sh start DIR, then {DOCKER_ENV}=DIR/docker.sock)"
            )
        })?;
        let d = Docker {
            host: format!("unix://{sock}"),
        };
        let out = d
            .cmd()
            .args(["version", "--format", "{{.Server.Version}}"])
            .output()
            .map_err(|e| format!("cannot run docker: {e}"))?;
        if !out.status.success() {
            return Err(format!("no Docker daemon at {sock}: {}", text(&out)));
        }
        build_image(&d)?;
        Ok(d)
    });
    match docker {
        Ok(d) => Some(d),
        Err(why) => {
            let why = format!("{test}: skipped: {why}");
            assert!(
                !in_ci(),
                "{why} — but CI=true, where container tests must run"
            );
            eprintln!("{why}");
            None
        }
    }
}

/// `docker import` of busybox, the artifactfs binary (stripped) and its libraries.
fn build_image(d: &Docker) -> Result<(), String> {
    let t0 = Instant::now();
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        return Err("no /bin/busybox: install busybox-static".into());
    }
    let dir = tempfile::Builder::new()
        .prefix("afs-image-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let root = dir.path();
    for sub in [
        "bin",
        "etc",
        "tmp",
        "m",
        "data",
        "store",
        "shared",
        "usr/local/bin",
    ] {
        fs::create_dir_all(root.join(sub)).map_err(|e| e.to_string())?;
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))
        .map_err(|e| e.to_string())?;
    fs::copy(busybox, root.join("bin/busybox")).map_err(|e| e.to_string())?;
    let applets = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| e.to_string())?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let link = root.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link).map_err(|e| e.to_string())?;
        }
    }
    let out = Command::new("strip")
        .arg("-o")
        .arg(root.join("usr/local/bin/artifactfs"))
        .arg(BIN)
        .output()
        .map_err(|e| format!("strip: {e}"))?;
    if !out.status.success() {
        return Err(format!("strip: {}", text(&out)));
    }
    let ldd = Command::new("ldd")
        .arg(BIN)
        .arg(busybox)
        .output()
        .map_err(|e| e.to_string())?;
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/') && !w.ends_with(':'))
    {
        let to = root.join(lib.trim_start_matches('/'));
        fs::create_dir_all(to.parent().unwrap()).map_err(|e| e.to_string())?;
        fs::copy(lib, &to).map_err(|e| format!("{lib}: {e}"))?;
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\nu1000:x:1000:1000::/tmp:/bin/sh\n\
         u2000:x:2000:2000::/tmp:/bin/sh\n",
    )
    .map_err(|e| e.to_string())?;
    fs::write(
        root.join("etc/group"),
        "root:x:0:\ng1000:x:1000:\ng2000:x:2000:\n",
    )
    .map_err(|e| e.to_string())?;
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C '{}' -c . | docker -H '{}' import - {IMAGE}",
            root.display(),
            d.host
        ))
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("docker import: {}", text(&out)));
    }
    eprintln!("image {IMAGE} built in {:?}", t0.elapsed());
    Ok(())
}

/// A mount made here by hand (a second daemon, a bind mount): detached on drop if still there.
struct HostMount(PathBuf);

impl Drop for HostMount {
    fn drop(&mut self) {
        for _ in 0..4 {
            if !is_mounted(&self.0) {
                break;
            }
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn mnt_arg(m: &Mount, target: &str) -> String {
    format!("{}:{target}", m.mnt.display())
}

/// A run with one file, written on the host.
fn host_file(m: &Mount, run: &str, name: &str, bytes: &[u8]) {
    fs::create_dir(m.path(&format!("runs/{run}"))).unwrap();
    fs::write(m.path(&format!("runs/{run}/artifacts/{name}")), bytes).unwrap();
}

// ----- a mount on the host as a volume --------------------------------------------------------

#[test]
fn a_read_only_volume_reads_and_refuses_every_change_with_erofs() {
    let test = "a_read_only_volume_reads_and_refuses_every_change_with_erofs";
    let Some(d) = docker(test) else { return };
    let Some(m) = Mount::new(test) else { return };
    host_file(&m, "r", "model.bin", b"weights v1\n");
    let t0 = Instant::now();

    // docker run -v MNT:/data:ro: the kernel refuses the change before artifactfs sees it.
    let vol = format!("{}:ro", mnt_arg(&m, "/data"));
    let out = d.sh(
        &["-v", &vol],
        "cat /data/runs/r/artifacts/model.bin; \
         echo x > /data/runs/r/artifacts/new.txt; \
         mkdir /data/runs/r2; \
         rm /data/runs/r/artifacts/model.bin; echo done",
    );
    assert!(out.starts_with("weights v1\n"), "{out}");
    assert!(
        out.contains("can't create /data/runs/r/artifacts/new.txt: Read-only file system"),
        "{out}"
    );
    assert!(
        out.contains("can't create directory '/data/runs/r2': Read-only file system"),
        "{out}"
    );
    assert!(
        out.contains("can't remove '/data/runs/r/artifacts/model.bin': Read-only file system"),
        "{out}"
    );

    // A `--read-only` daemon of the same store beside the writable one, as a read-write
    // volume: artifactfs itself answers EROFS.
    let ro = m.dir.path().join("ro");
    fs::create_dir(&ro).unwrap();
    let _ro_guard = HostMount(ro.clone());
    let out = Command::new(BIN)
        .args(["mount", "--read-only", "--store"])
        .arg(&m.store)
        .arg(&ro)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let vol = format!("{}:/data", ro.display());
    let out = d.sh(
        &["-v", &vol],
        "cat /data/runs/r/artifacts/model.bin; echo x > /data/runs/r/artifacts/new.txt; echo done",
    );
    assert_eq!(
        out,
        "weights v1\nsh: can't create /data/runs/r/artifacts/new.txt: Read-only file system\ndone\n"
    );
    let out = Command::new(BIN).arg("unmount").arg(&ro).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // Nothing changed.
    assert_eq!(
        fs::read(m.path("runs/r/artifacts/model.bin")).unwrap(),
        b"weights v1\n"
    );
    assert!(!m.path("runs/r/artifacts/new.txt").exists());
    assert!(!m.path("runs/r2").exists());
    eprintln!("{test}: {:?}", t0.elapsed());
}

#[test]
fn a_read_write_volume_writes_once_and_refuses_other_content() {
    let test = "a_read_write_volume_writes_once_and_refuses_other_content";
    let Some(d) = docker(test) else { return };
    let Some(m) = Mount::new(test) else { return };
    let t0 = Instant::now();
    let vol = mnt_arg(&m, "/data");
    let a = "/data/runs/c1/artifacts/a.txt";
    let out = d.sh(
        &["-v", &vol],
        &format!(
            "mkdir /data/runs/c1 && echo first > {a} && cat {a}; \
             echo first > {a} && echo same-content-ok; \
             echo other > {a} || echo rewrite-refused; \
             echo more >> {a} || echo append-refused; \
             mkdir /data/elsewhere || echo mkdir-refused; \
             mv /data/runs/c1/artifacts /data/runs/c1/moved || echo rename-dir-refused; \
             cat {a}"
        ),
    );
    assert_eq!(
        out,
        "first\n\
         same-content-ok\n\
         sh: write error: Operation not permitted\nrewrite-refused\n\
         sh: write error: Operation not permitted\nappend-refused\n\
         mkdir: can't create directory '/data/elsewhere': Operation not permitted\nmkdir-refused\n\
         mv: can't rename '/data/runs/c1/artifacts': Operation not permitted\nrename-dir-refused\n\
         first\n",
    );
    // A removed file's path takes back only its last content.
    let out = d.sh(
        &["-v", &vol],
        &format!("rm {a} && echo removed; echo other > {a} || echo recreate-refused; cat {a}"),
    );
    assert_eq!(
        out,
        format!(
            "removed\nsh: write error: Operation not permitted\nrecreate-refused\n\
             cat: can't open '{a}': No such file or directory\n"
        )
    );
    // The host sees the same: the path is a tombstone, the content is kept.
    let host = m.path("runs/c1/artifacts/a.txt");
    assert_eq!(
        errno(&fs::read(&host).unwrap_err()),
        libc::ENOENT,
        "the refused re-create left something at the path"
    );
    assert_eq!(
        stored_bytes(&m.store, &sha256_hex(b"first\n")).as_deref(),
        Some(&b"first\n"[..])
    );
    eprintln!("{test}: {:?}", t0.elapsed());
}

#[test]
fn a_container_user_that_is_not_root_needs_allow_other() {
    let test = "a_container_user_that_is_not_root_needs_allow_other";
    let Some(d) = docker(test) else { return };
    let Some(m) = Mount::new(test) else { return };
    host_file(&m, "r", "f", b"root's\n");
    let vol = mnt_arg(&m, "/data");
    // Without --allow-other, FUSE lets only the user who mounted (root) in.
    let out = d.sh(
        &["--user", "1000:1000", "-v", &vol],
        "ls /data; cat /data/runs/r/artifacts/f; echo x > /data/runs/x",
    );
    assert_eq!(
        out,
        "ls: /data: Permission denied\n\
         cat: can't open '/data/runs/r/artifacts/f': Permission denied\n\
         sh: can't create /data/runs/x: Permission denied\n"
    );
    let out = d.sh(&["-v", &vol], "cat /data/runs/r/artifacts/f");
    assert_eq!(out, "root's\n", "the container's root is the host's root");
}

#[test]
fn a_container_user_with_allow_other_gets_mode_bit_checks_and_owns_its_files() {
    let test = "a_container_user_with_allow_other_gets_mode_bit_checks_and_owns_its_files";
    let Some(d) = docker(test) else { return };
    let Some(m) = Mount::with_args(test, &["--allow-other"]) else {
        return;
    };
    host_file(&m, "u", "readme", b"for everyone\n");
    let shared = m.path("runs/u/artifacts/shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    fs::create_dir(m.path("runs/u/artifacts/private")).unwrap();
    let vol = mnt_arg(&m, "/data");
    let art = "/data/runs/u/artifacts";
    let out = d.sh(
        &["--user", "1000:1000", "-v", &vol],
        &format!(
            "cat {art}/readme; echo hello > {art}/shared/h.txt && cat {art}/shared/h.txt; \
             stat -c %u:%g {art}/shared/h.txt; \
             echo x > {art}/private/p.txt; echo other > {art}/shared/h.txt; echo end"
        ),
    );
    assert_eq!(
        out,
        format!(
            "for everyone\nhello\n1000:1000\n\
             sh: can't create {art}/private/p.txt: Permission denied\n\
             sh: write error: Operation not permitted\nend\n"
        )
    );
    // On the host: the file is the container user's, sealed with its bytes.
    let h = shared.join("h.txt");
    assert_eq!(fs::read(&h).unwrap(), b"hello\n");
    assert_eq!(sh_ok(&shared, "stat -c %u:%g h.txt").trim(), "1000:1000");
    assert!(!m.path("runs/u/artifacts/private/p.txt").exists());
}

#[test]
fn uid_and_gid_make_every_entry_the_container_users() {
    let test = "uid_and_gid_make_every_entry_the_container_users";
    let Some(d) = docker(test) else { return };
    let Some(m) = Mount::with_args(test, &["--allow-other", "--uid", "1000", "--gid", "1000"])
    else {
        return;
    };
    // Made by root on the host, reported (and recorded) as 1000:1000.
    host_file(&m, "own", "from-host", b"host\n");
    let vol = mnt_arg(&m, "/data");
    let art = "/data/runs/own/artifacts";
    let out = d.sh(
        &["--user", "1000:1000", "-v", &vol],
        &format!(
            "stat -c %u:%g {art} {art}/from-host; echo mine > {art}/c.txt && cat {art}/c.txt; \
             stat -c %u:%g {art}/c.txt"
        ),
    );
    assert_eq!(out, "1000:1000\n1000:1000\nmine\n1000:1000\n");
    // Another user gets the mode bits of the owner 1000 (0755: no writing).
    let out = d.sh(
        &["--user", "2000:2000", "-v", &vol],
        &format!("cat {art}/c.txt; echo x > {art}/d.txt"),
    );
    assert_eq!(
        out,
        format!("mine\nsh: can't create {art}/d.txt: Permission denied\n")
    );
    let art_host = m.path("runs/own/artifacts");
    assert_eq!(
        sh_ok(&art_host, "stat -c %u:%g c.txt from-host"),
        "1000:1000\n1000:1000\n"
    );
}

// ----- the daemon in a container ------------------------------------------------------------

#[test]
fn the_daemon_as_a_containers_main_process_serves_docker_exec_and_stops_cleanly() {
    let test = "the_daemon_as_a_containers_main_process_serves_docker_exec_and_stops_cleanly";
    let Some(d) = docker(test) else { return };
    let dir = tempfile::Builder::new()
        .prefix("afs-ctr-")
        .tempdir()
        .unwrap();
    let store = dir.path().join("store");
    fs::create_dir(&store).unwrap();
    let t0 = Instant::now();
    let vol = format!("{}:/store", store.display());
    let c = d.start(&[
        "--device",
        "/dev/fuse",
        "--cap-add",
        "SYS_ADMIN",
        "-v",
        &vol,
        IMAGE,
        "artifactfs",
        "mount",
        "--foreground",
        "--store",
        "/store",
        "/m",
    ]);
    c.wait_mounted();
    let f = "/m/runs/d/artifacts/f";
    let out = c.exec(&format!(
        "mkdir /m/runs/d && echo inside > {f} && cat {f}; echo other > {f}; ls /m/runs/d/artifacts"
    ));
    assert_eq!(out, "inside\nsh: write error: Operation not permitted\nf\n");
    assert_eq!(c.stop(), 0, "{}", c.logs());
    let logs = c.logs();
    assert!(logs.contains("unmounted /m"), "{logs}");
    assert!(logs.contains("clean stop recorded"), "{logs}");
    // The store on the host holds the file, and the stop was clean.
    assert!(
        fs::read_to_string(store.join("synced"))
            .unwrap()
            .starts_with("clean"),
    );
    let out = Command::new(BIN)
        .args(["ls", "--store"])
        .arg(&store)
        .arg("runs/d/artifacts")
        .output()
        .unwrap();
    assert!(text(&out).contains(" f\n"), "{}", text(&out));
    let out = Command::new(BIN)
        .args(["fsck", "--store"])
        .arg(&store)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    eprintln!("{test}: {:?}", t0.elapsed());
}

/// `mount --bind P P && mount --make-rshared P` (Docker refuses `rslave` from a private
/// source); everything under P unmounted on drop.
struct SharedDir(PathBuf);

impl SharedDir {
    fn new(path: &Path) -> SharedDir {
        fs::create_dir_all(path).unwrap();
        let p = path.to_str().unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "mount --bind '{p}' '{p}' && mount --make-rshared '{p}'"
            ))
            .output()
            .unwrap();
        let g = SharedDir(path.to_path_buf());
        assert!(out.status.success(), "{}", text(&out));
        g
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let prefix = format!("{}/", self.0.display());
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        for _ in 0..4 {
            if !is_mounted(&self.0) {
                break;
            }
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn the_sidecar_pattern_shares_the_mount_through_mount_propagation() {
    let test = "the_sidecar_pattern_shares_the_mount_through_mount_propagation";
    let Some(d) = docker(test) else { return };
    let dir = tempfile::Builder::new()
        .prefix("afs-side-")
        .tempdir()
        .unwrap();
    let t0 = Instant::now();
    let store = dir.path().join("store");
    fs::create_dir(&store).unwrap();
    let shared_path = dir.path().join("shared");
    let _shared = SharedDir::new(&shared_path);
    fs::create_dir(shared_path.join("ml")).unwrap();
    let host_ml = shared_path.join("ml");

    // The consumer starts first: the mount appears in it later, through rslave propagation.
    let consumer_vol = format!(
        "type=bind,source={},target=/data,bind-propagation=rslave",
        shared_path.display()
    );
    let consumer = d.start(&["--mount", &consumer_vol, IMAGE, "sleep", "600"]);
    let sidecar_vol = format!(
        "type=bind,source={},target=/shared,bind-propagation=rshared",
        shared_path.display()
    );
    let store_vol = format!("{}:/store", store.display());
    let sidecar = d.start(&[
        "--device",
        "/dev/fuse",
        "--cap-add",
        "SYS_ADMIN",
        "--mount",
        &sidecar_vol,
        "-v",
        &store_vol,
        IMAGE,
        "artifactfs",
        "mount",
        "--foreground",
        "--allow-other",
        "--store",
        "/store",
        "/shared/ml",
    ]);
    sidecar.wait_mounted();
    assert!(
        wait_until(Duration::from_secs(5), || is_mounted(&host_ml)),
        "the sidecar's mount did not propagate to the host"
    );
    let f = "/data/ml/runs/s/artifacts/f";
    let out = consumer.exec(&format!(
        "mkdir /data/ml/runs/s && echo via-sidecar > {f} && cat {f}; echo other > {f}; echo end"
    ));
    assert_eq!(
        out,
        "via-sidecar\nsh: write error: Operation not permitted\nend\n"
    );
    // A consumer started after the mount, as a user who is not root; and the host.
    let late_vol = consumer_vol.replace("target=/data", "target=/in");
    let out = d.sh(
        &["--user", "1000:1000", "--mount", &late_vol],
        "cat /in/ml/runs/s/artifacts/f; echo x > /in/ml/runs/s/artifacts/g",
    );
    assert_eq!(
        out,
        "via-sidecar\nsh: can't create /in/ml/runs/s/artifacts/g: Permission denied\n"
    );
    assert_eq!(
        fs::read(host_ml.join("runs/s/artifacts/f")).unwrap(),
        b"via-sidecar\n"
    );

    // docker stop: the daemon unmounts, and the unmount propagates to the consumer and host.
    assert_eq!(sidecar.stop(), 0, "{}", sidecar.logs());
    assert!(sidecar.logs().contains("unmounted /shared/ml"));
    let out = consumer.exec("grep -c ' /data/ml ' /proc/mounts; ls -A /data/ml; echo end");
    assert_eq!(out, "0\nend\n", "the consumer still sees the mount");
    assert!(!is_mounted(&host_ml));
    assert!(
        fs::read_to_string(store.join("synced"))
            .unwrap()
            .starts_with("clean")
    );
    eprintln!("{test}: {:?}", t0.elapsed());
}

// ----- mount errors ---------------------------------------------------------------------------

#[test]
fn mount_errors_in_containers_name_the_missing_piece_and_the_fix() {
    let test = "mount_errors_in_containers_name_the_missing_piece_and_the_fix";
    let Some(d) = docker(test) else { return };
    let t0 = Instant::now();
    // Each: the container's options, the command, what the one line must say.
    let mount = "artifactfs mount --store /store /m; echo exit=$?; ls -A /store";
    let cases: [(&[&str], &str, &[&str]); 6] = [
        (
            &[],
            mount,
            &["no /dev/fuse here", "docker run --device /dev/fuse"],
        ),
        (
            &["-v", "/dev/fuse:/dev/fuse"],
            mount,
            &["/dev/fuse cannot be opened", "--device /dev/fuse"],
        ),
        (
            &["--device", "/dev/fuse"],
            mount,
            &[
                "lacks CAP_SYS_ADMIN",
                "--cap-add SYS_ADMIN",
                "--security-opt apparmor=unconfined",
            ],
        ),
        (
            &["--device", "/dev/fuse"],
            "artifactfs mount --foreground --store /store /m; echo exit=$?; ls -A /store",
            &["lacks CAP_SYS_ADMIN", "--cap-add SYS_ADMIN"],
        ),
        (
            &["--device", "/dev/fuse", "--cap-add", "SYS_ADMIN"],
            "artifactfs mount --store /store /nowhere; echo exit=$?; ls -A /store",
            &["mount point /nowhere does not exist", "mkdir -p /nowhere"],
        ),
        (
            &["--device", "/dev/fuse", "--cap-add", "SYS_ADMIN"],
            "artifactfs mount --store /s1 /m 2>/dev/null && \
             { artifactfs mount --store /store /m; echo exit=$?; ls -A /store; \
               artifactfs unmount /m; }",
            &[
                "/m is already mounted (fuse of /s1)",
                "artifactfs unmount /m",
            ],
        ),
    ];
    for (opts, script, want) in cases {
        let out = d.sh(opts, script);
        let lines: Vec<&str> = out.lines().collect();
        // One line of error, the exit status, and no store made (`ls -A` prints nothing).
        assert_eq!(lines.len(), 2, "{opts:?} {script}: {out}");
        assert!(lines[0].starts_with("artifactfs: "), "{out}");
        assert_eq!(lines[1], "exit=1", "{out}");
        for w in want {
            assert!(lines[0].contains(w), "{opts:?}: {w:?} missing in: {out}");
        }
    }

    // mount(2) itself refused although the capability is there: a seccomp profile answering
    // EPERM (what a profile or a capability over another namespace gives), or EACCES (what
    // AppArmor's denial of mount gives; this machine has no AppArmor to run it for real).
    // These are found only when mount(2) is tried, after the store is opened.
    let dir = tempfile::Builder::new()
        .prefix("afs-seccomp-")
        .tempdir()
        .unwrap();
    for (errno, want) in [
        (
            libc::EPERM,
            &[
                "mount(2) was refused for lack of privilege",
                "seccomp",
                "--cap-add SYS_ADMIN",
            ][..],
        ),
        (
            libc::EACCES,
            &[
                "mount(2) was denied (permission denied)",
                "--security-opt apparmor=unconfined",
            ][..],
        ),
    ] {
        let profile = dir.path().join(format!("deny-mount-{errno}.json"));
        fs::write(
            &profile,
            format!(
                r#"{{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{{"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": {errno}}}]}}"#
            ),
        )
        .unwrap();
        let seccomp = format!("seccomp={}", profile.display());
        for script in [
            "artifactfs mount --store /store /m; echo exit=$?",
            "artifactfs mount --foreground --store /store /m 2>&1 | grep -v INFO; echo exit=$?",
        ] {
            let opts = [
                "--device",
                "/dev/fuse",
                "--cap-add",
                "SYS_ADMIN",
                "--security-opt",
                &seccomp,
            ];
            let out = d.sh(&opts, script);
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), 2, "{script}: {out}");
            assert!(
                lines[0].starts_with("artifactfs: cannot mount at /m: "),
                "{out}"
            );
            for w in want {
                assert!(
                    lines[0].contains(w),
                    "errno {errno}: {w:?} missing in: {out}"
                );
            }
        }
    }
    eprintln!("{test}: {:?}", t0.elapsed());
}

// ----- unmount while containers hold the volume -----------------------------------------------

#[test]
fn unmount_reports_mounts_left_in_containers_and_loses_nothing() {
    let test = "unmount_reports_mounts_left_in_containers_and_loses_nothing";
    let Some(d) = docker(test) else { return };
    let Some(mut m) = Mount::new(test) else {
        return;
    };
    host_file(&m, "r", "before", b"before unmount\n");
    let pid = m.daemon_pid();
    let vol = mnt_arg(&m, "/data");
    let holder = d.start(&["-v", &vol, IMAGE, "sleep", "600"]);
    // A writer in the container, half way through its file when the host unmounts.
    d.ok(&[
        "exec",
        "-d",
        &holder.name,
        "sh",
        "-c",
        "{ echo part1; sleep 2; echo part2; } > /data/runs/r/artifacts/slow",
    ]);
    let t0 = Instant::now();
    let out = Command::new(BIN)
        .arg("unmount")
        .arg(&m.mnt)
        .output()
        .unwrap();
    let took = t0.elapsed();
    let msg = text(&out);
    eprintln!("{test}: unmount took {took:?}: {msg}");
    assert_eq!(out.status.code(), Some(2), "{msg}");
    assert!(took < Duration::from_secs(5), "unmount took {took:?}");
    m.mark_stale();
    assert!(!is_mounted(&m.mnt));
    for w in [
        "still mounted in 1 other place(s): /data (mount namespace of pid",
        &format!("Its daemon (pid {pid}) keeps serving them and exits when they are gone"),
        "--wait",
    ] {
        assert!(msg.contains(w), "{w:?} missing in: {msg}");
    }
    // The container goes on: the writer finishes, new files are written and read.
    assert!(
        wait_until(Duration::from_secs(10), || holder
            .exec("cat /data/runs/r/artifacts/slow")
            == "part1\npart2\n"),
        "{}",
        holder.exec("cat /data/runs/r/artifacts/slow")
    );
    let out = holder.exec(
        "cat /data/runs/r/artifacts/before; echo after > /data/runs/r/artifacts/after && \
         cat /data/runs/r/artifacts/after",
    );
    assert_eq!(out, "before unmount\nafter\n");
    assert!(!process_gone(pid), "the daemon left its container mount");
    // Once the container is gone, the daemon stops cleanly by itself.
    holder.kill();
    assert!(
        wait_until(Duration::from_secs(10), || process_gone(pid)),
        "daemon {pid} still running after the last mount went"
    );
    assert!(
        fs::read_to_string(m.store.join("synced"))
            .unwrap()
            .starts_with("clean")
    );
    // Nothing lost, nothing half-written.
    m.mount(&[]);
    for (name, bytes) in [
        ("before", &b"before unmount\n"[..]),
        ("slow", b"part1\npart2\n"),
        ("after", b"after\n"),
    ] {
        assert_eq!(
            fs::read(m.path(&format!("runs/r/artifacts/{name}"))).unwrap(),
            bytes
        );
    }
    let out = m.cli(&["fsck"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn unmount_wait_waits_for_the_containers_with_progress() {
    let test = "unmount_wait_waits_for_the_containers_with_progress";
    let Some(d) = docker(test) else { return };
    let Some(mut m) = Mount::new(test) else {
        return;
    };
    host_file(&m, "w", "f", b"kept\n");
    let pid = m.daemon_pid();
    let vol = mnt_arg(&m, "/data");
    let a = d.start(&["-v", &vol, IMAGE, "sleep", "600"]);
    let b = d.start(&["-v", &vol, IMAGE, "sleep", "600"]);
    let mut child = Command::new(BIN)
        .args(["unmount", "--wait"])
        .arg(&m.mnt)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    // The next line that is not a repeat of the last (progress is repeated every 10 s).
    let mut last = String::new();
    let mut next = || loop {
        let line = rx
            .recv_timeout(Duration::from_secs(15))
            .expect("a progress line");
        if line != last {
            last = line.clone();
            return line;
        }
    };
    let first = next();
    assert!(
        first.starts_with("artifactfs: waiting: 2 mount(s) left: /data (mount namespace of pid"),
        "{first}"
    );
    assert!(
        first.contains(&format!("its daemon (pid {pid}) serves them")),
        "{first}"
    );
    m.mark_stale();
    a.kill();
    let second = next();
    assert!(
        second.starts_with("artifactfs: waiting: 1 mount(s) left"),
        "{second}"
    );
    assert!(child.try_wait().unwrap().is_none(), "--wait returned early");
    b.kill();
    let last = next();
    assert_eq!(
        last,
        "artifactfs: no mount is left; the daemon has finished"
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(process_gone(pid));
    m.mount(&[]);
    assert_eq!(fs::read(m.path("runs/w/artifacts/f")).unwrap(), b"kept\n");
}

// ----- packaging ------------------------------------------------------------------------------

#[test]
fn the_dockerfile_builds_a_runtime_image_that_mounts_and_stops_cleanly() {
    let test = "the_dockerfile_builds_a_runtime_image_that_mounts_and_stops_cleanly";
    let Some(d) = docker(test) else { return };
    let Ok(rootfs) = std::env::var(DEBIAN_ENV) else {
        let why = format!(
            "{test}: skipped: {DEBIAN_ENV} (a Debian root file system tarball) is not set: \
             scripts/test.sh makes one with debootstrap"
        );
        assert!(!in_ci(), "{why} — but CI=true");
        eprintln!("{why}");
        return;
    };
    let t0 = Instant::now();
    let base = "afs-test/debian:bookworm";
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("docker -H '{}' import '{rootfs}' {base}", d.host))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let imported = t0.elapsed();
    // The README's build: the binary in a context of its own.
    let ctx = tempfile::Builder::new()
        .prefix("afs-ctx-")
        .tempdir()
        .unwrap();
    let out = Command::new("strip")
        .arg("-o")
        .arg(ctx.path().join("artifactfs"))
        .arg(BIN)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/container/Dockerfile");
    let tag = "afs-test/runtime";
    let out = d
        .cmd()
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "--network", "none", "--build-arg"])
        .arg(format!("BASE={base}"))
        .arg("-t")
        .arg(tag)
        .arg("-f")
        .arg(&dockerfile)
        .arg(ctx.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "docker build: {}", text(&out));
    let built = t0.elapsed();
    // Run it as the README says: the store as a volume, the mount shared with consumers.
    let dir = tempfile::Builder::new()
        .prefix("afs-rt-")
        .tempdir()
        .unwrap();
    let store = dir.path().join("store");
    fs::create_dir(&store).unwrap();
    let vol = format!("{}:/var/lib/artifactfs", store.display());
    let c = d.start(&[
        "--device",
        "/dev/fuse",
        "--cap-add",
        "SYS_ADMIN",
        "-v",
        &vol,
        tag,
    ]);
    c.wait_mounted();
    let out = c.exec(
        "mkdir /mnt/ml/runs/img && echo from-image > /mnt/ml/runs/img/artifacts/f && \
         cat /mnt/ml/runs/img/artifacts/f",
    );
    assert_eq!(out, "from-image\n");
    assert_eq!(c.stop(), 0, "{}", c.logs());
    assert!(
        fs::read_to_string(store.join("synced"))
            .unwrap()
            .starts_with("clean")
    );
    eprintln!(
        "{test}: base imported in {imported:?}, image built at {built:?}, all {:?}",
        t0.elapsed()
    );
}

#[test]
fn the_compose_and_kubernetes_examples_use_the_tested_options() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/container");
    let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap();
    let compose: serde_yaml::Value = serde_yaml::from_str(&read("compose.yaml")).unwrap();
    let side = &compose["services"]["artifactfs"];
    assert_eq!(side["devices"][0], "/dev/fuse");
    assert_eq!(side["cap_add"][0], "SYS_ADMIN");
    assert_eq!(side["volumes"][1]["bind"]["propagation"], "rshared");
    assert_eq!(side["command"][1], "--foreground");
    let train = &compose["services"]["train"];
    assert_eq!(train["volumes"][0]["bind"]["propagation"], "rslave");
    assert_eq!(
        train["volumes"][0]["source"], side["volumes"][1]["source"],
        "the consumer shares the sidecar's directory"
    );

    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&read("kubernetes.yaml"))
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], true);
    assert_eq!(c["volumeMounts"][1]["mountPropagation"], "Bidirectional");
    assert!(
        c["command"][2]
            .as_str()
            .unwrap()
            .contains("artifactfs mount --foreground")
    );
    let pod = docs.iter().find(|d| d["kind"] == "Pod").unwrap();
    assert_eq!(
        pod["spec"]["containers"][0]["volumeMounts"][0]["mountPropagation"],
        "HostToContainer"
    );

    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains(r#"CMD ["mount", "--foreground""#));
}
