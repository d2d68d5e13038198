//! Shared harness for tests that mount a real artifactfs: a guard that mounts a fresh store in a
//! temp dir with the real binary and always unmounts on drop, plus small helpers to run tools.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_artifactfs");

/// Whether this machine can mount FUSE file systems. In CI (`CI=true`) a missing FUSE is a
/// failure, not a skip; elsewhere the test prints why it is skipped.
pub fn fuse_available(test: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let dev = std::fs::metadata("/dev/fuse")
        .map(|m| m.file_type().is_char_device())
        .unwrap_or(false);
    let ok = root
        && dev
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .is_ok();
    if !ok {
        let why = format!(
            "{test}: skipped: needs root and a usable /dev/fuse (root={root}, /dev/fuse={dev})"
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{why} — but CI=true, where mount tests must run");
        }
        eprintln!("{why}");
    }
    ok
}

/// The index engine the mount tests run against: `ARTIFACTFS_TEST_INDEX=postgresql` runs them
/// on a shared store (a PostgreSQL index on the server `ARTIFACTFS_TEST_PG` names, which
/// `scripts/test.sh` starts, and a blob directory of its own); anything else, the embedded
/// store.
pub fn shared_engine() -> bool {
    std::env::var("ARTIFACTFS_TEST_INDEX").as_deref() == Ok("postgresql")
}

/// `ARTIFACTFS_TEST_BLOBS=s3`: the shared stores of the tests keep their blobs in a new bucket
/// of the test S3 server (`ARTIFACTFS_TEST_S3`, which `scripts/test.sh` starts) instead of a
/// directory.
pub fn s3_blobs() -> bool {
    std::env::var("ARTIFACTFS_TEST_BLOBS").as_deref() == Ok("s3")
}

/// The environment a daemon or command needs to reach the test S3 server at `endpoint`.
pub fn s3_env_for(endpoint: &str) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "artifactfs-test"),
        ("AWS_SECRET_ACCESS_KEY", "artifactfs-test-secret"),
        ("AWS_REGION", "us-east-1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The test S3 server's endpoint; `None` (after saying why) without one, outside CI.
pub fn s3_endpoint(test: &str) -> Option<String> {
    test_server(test, "ARTIFACTFS_TEST_S3", "S3")
}

/// The test server that `scripts/test.sh` names in variable `var`; `None` (after saying why)
/// without one, outside CI.
fn test_server(test: &str, var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(server) => Some(server),
        Err(_) => {
            let why = format!("{test}: skipped: no test {what} server ({var})");
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{why} — but CI=true; scripts/test.sh starts one");
            }
            eprintln!("{why}");
            None
        }
    }
}

/// Creates a new, empty bucket on the S3 server at `endpoint` (moto takes an unsigned PUT);
/// returns its name.
pub fn new_bucket(endpoint: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    // (The time too: one S3 server may outlive many test processes, and pids come round again.)
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let name = format!(
        "afs-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let answer = s3_http(endpoint, "PUT", &format!("/{name}"));
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "creating bucket {name}: {answer}"
    );
    name
}

/// One unsigned request to the S3 server at `endpoint` (moto takes them), without a body; the
/// whole answer, status line and headers included.
pub fn s3_http(endpoint: &str, method: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let host = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut conn = std::net::TcpStream::connect(host).unwrap();
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    answer
}

/// Where a new shared store keeps its blobs: `dir/blobs`, or with [`s3_blobs`] a new bucket
/// (`s3://BUCKET/blobs`) and the environment that reaches it.
fn shared_blobs(dir: &Path) -> (String, Vec<(String, String)>) {
    if s3_blobs() {
        let endpoint = std::env::var("ARTIFACTFS_TEST_S3")
            .expect("ARTIFACTFS_TEST_BLOBS=s3 needs ARTIFACTFS_TEST_S3 (scripts/test.sh)");
        let bucket = new_bucket(&endpoint);
        (format!("s3://{bucket}/blobs"), s3_env_for(&endpoint))
    } else {
        (
            format!("file://{}", dir.join("blobs").display()),
            Vec::new(),
        )
    }
}

/// The first mount's arguments for a new store in `dir`: on the shared engine, a new database
/// of the test server and `dir/blobs`; none for the embedded store.
/// (With [`s3_blobs`], a new bucket, and the environment that reaches it.)
fn shared_store_args(dir: &Path) -> (Vec<String>, Vec<(String, String)>) {
    if !shared_engine() {
        return (Vec::new(), Vec::new());
    }
    let server = std::env::var("ARTIFACTFS_TEST_PG")
        .expect("ARTIFACTFS_TEST_INDEX=postgresql needs ARTIFACTFS_TEST_PG (scripts/test.sh)");
    let name = new_database(&server);
    let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
    let (blobs, env) = shared_blobs(dir);
    (
        vec![
            "--index".into(),
            format!("{base}/{name}"),
            "--blobs".into(),
            blobs,
        ],
        env,
    )
}

/// The test PostgreSQL server's URL; `None` (after saying why) without one, outside CI.
pub fn pg_server(test: &str) -> Option<String> {
    test_server(test, "ARTIFACTFS_TEST_PG", "PostgreSQL")
}

/// Creates an empty database on the test server; returns its name.
pub fn new_database(server: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "afs_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let mut client = postgres::Client::connect(server, postgres::NoTls).unwrap();
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    name
}

/// A mounted store in a temp dir; unmounted (and its daemon gone) when dropped.
pub struct Mount {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    pub mnt: PathBuf,
    mounted: bool,
    /// Environment variables of the daemon, besides the test's own.
    env: Vec<(String, String)>,
    /// The daemon's pid, as its mount reported it: waited for after the unmount (`unmount`
    /// does not wait for a read-only daemon's clean stop, which writes into the store).
    pid: Option<i32>,
}

impl Mount {
    /// Mounts a fresh store. Returns `None` (after printing why) where FUSE is unavailable.
    pub fn new(test: &str) -> Option<Mount> {
        Self::with_args(test, &[])
    }

    /// Two daemons of one shared store, standing for two machines: each with a store
    /// directory and mount point of its own, both on one new database of the test PostgreSQL
    /// server and one blob directory. `None` (after saying why) without FUSE or a test server,
    /// outside CI.
    pub fn machines(test: &str, n: usize) -> Option<(Vec<Mount>, tempfile::TempDir)> {
        Self::machines_with(test, n, &[])
    }

    /// [`Mount::machines`], each daemon mounted with `args` too.
    pub fn machines_with(
        test: &str,
        n: usize,
        args: &[&str],
    ) -> Option<(Vec<Mount>, tempfile::TempDir)> {
        Self::machines_with_env(test, n, args, &[])
    }

    /// [`Mount::machines_with`], each daemon started with the environment variables `env` too
    /// (also when mounted again).
    pub fn machines_with_env(
        test: &str,
        n: usize,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Option<(Vec<Mount>, tempfile::TempDir)> {
        if !fuse_available(test) {
            return None;
        }
        let server = pg_server(test)?;
        let shared = tempfile::Builder::new()
            .prefix("afs-shared-")
            .tempdir()
            .unwrap();
        let name = new_database(&server);
        let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
        let index = format!("{base}/{name}");
        let (blobs, blobs_env) = shared_blobs(shared.path());
        let mounts = (0..n)
            .map(|_| {
                let mut all = vec!["--index", index.as_str(), "--blobs", blobs.as_str()];
                all.extend_from_slice(args);
                let mut m = Self::unmounted();
                m.env = env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .chain(blobs_env.iter().cloned())
                    .collect();
                m.mount(&all);
                m
            })
            .collect();
        Some((mounts, shared))
    }

    /// A daemon of the shared store `index` + `blobs` (as [`Mount::machines`] makes them),
    /// with a store directory of its own; the mount's error if it fails.
    pub fn machines_on(test: &str, index: &str, blobs: &str) -> Result<Mount, String> {
        Self::machines_on_with(test, index, blobs, &[])
    }

    /// [`Mount::machines_on`] whose daemon runs with the environment variables `env` too.
    pub fn machines_on_with(
        test: &str,
        index: &str,
        blobs: &str,
        env: &[(&str, &str)],
    ) -> Result<Mount, String> {
        Self::machines_on_with_args(test, &["--index", index, "--blobs", blobs], env)
    }

    /// A daemon of a shared store mounted with `args` (`--index`, `--blobs`, …) and the
    /// environment variables `env` (with an `s3://` bucket, also those reaching the test S3
    /// server), with a store directory of its own; the mount's error if it fails.
    pub fn machines_on_with_args(
        test: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Mount, String> {
        assert!(fuse_available(test));
        let mut m = Self::unmounted();
        m.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if args.iter().any(|a| a.starts_with("s3://"))
            && !env.iter().any(|(k, _)| *k == "AWS_ENDPOINT_URL")
        {
            let endpoint = std::env::var("ARTIFACTFS_TEST_S3").unwrap();
            m.env.extend(s3_env_for(&endpoint));
        }
        m.try_mount(args)?;
        Ok(m)
    }

    /// A new temp dir with a store directory and a mount point, not mounted yet.
    fn unmounted() -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("afs-test-")
            .tempdir()
            .unwrap();
        let store = dir.path().join("store");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        Mount {
            dir,
            store,
            mnt,
            mounted: false,
            env: Vec::new(),
            pid: None,
        }
    }

    pub fn with_args(test: &str, args: &[&str]) -> Option<Mount> {
        if !fuse_available(test) {
            return None;
        }
        let mut m = Self::unmounted();
        let (shared, env) = shared_store_args(m.dir.path());
        m.env = env;
        let mut all: Vec<&str> = shared.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        m.mount(&all);
        Some(m)
    }

    /// Mounts (again) the same store at the same place.
    pub fn mount(&mut self, args: &[&str]) {
        if let Err(e) = self.try_mount(args) {
            panic!("mount failed: {e}");
        }
    }

    /// [`Mount::mount`], with the mount's error (its stderr) if it fails.
    pub fn try_mount(&mut self, args: &[&str]) -> Result<(), String> {
        let out = Command::new(BIN)
            .arg("mount")
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .arg(&self.mnt)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        self.mounted = true;
        self.pid = reported_pid(&out);
        Ok(())
    }

    /// Unmounts cleanly and waits for the daemon to exit.
    pub fn unmount(&mut self) {
        if !self.mounted {
            return;
        }
        let out = Command::new(BIN)
            .arg("unmount")
            .arg(&self.mnt)
            .output()
            .unwrap();
        if !out.status.success() {
            // Busy or stale: detach so nothing is left behind.
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        self.mounted = false;
        if let Some(pid) = self.pid.take()
            && !wait_until(Duration::from_secs(10), || process_gone(pid))
        {
            eprintln!(
                "daemon {pid} of {} still running after unmount",
                self.mnt.display()
            );
        }
    }

    /// Forgets the mount without unmounting (after the daemon was killed; `umount` still runs on drop).
    pub fn mark_stale(&mut self) {
        self.mounted = false;
        let _ = Command::new("umount")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The store's daemon log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.store.join("artifactfs.log")).unwrap_or_default()
    }

    /// The environment of this mount's daemon (besides the test's own): commands of its
    /// store need it too (a bucket's endpoint and keys).
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// Runs `artifactfs <args> --store STORE`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .arg("--store")
            .arg(&self.store)
            .output()
            .unwrap()
    }

    /// The pid of the daemon serving this store (from its lock file).
    pub fn daemon_pid(&self) -> i32 {
        std::fs::read_to_string(self.store.join("lock"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            self.unmount();
        }
        // Whatever happened, never leave a (stale) mount behind.
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

pub fn is_mounted(mnt: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let want = mnt.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(&want))
}

/// Runs a shell command line with `cwd`; returns the output (never panics on failure).
pub fn sh(cwd: &Path, script: &str) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(cwd)
        .output()
        .unwrap()
}

/// Runs a shell command and asserts it succeeded; returns stdout.
pub fn sh_ok(cwd: &Path, script: &str) -> String {
    let out = sh(cwd, script);
    assert!(
        out.status.success(),
        "`{script}` failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command (no shell) and returns its output.
pub fn run<I, S>(cwd: &Path, prog: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

/// The errno of an io::Error (panics if it has none).
pub fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("no errno in {e:?}"))
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// SHA-256 hex of bytes, computed by the test itself (not by artifactfs).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deterministic pseudo-random bytes.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `setxattr(2)`.
pub fn setxattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// `getxattr(2)`.
pub fn getxattr(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(len as usize);
    Ok(buf)
}

/// The content hash artifactfs reports for a sealed file.
pub fn sha_xattr(path: &Path) -> String {
    let v = getxattr(path, "user.artifactfs.sha256")
        .unwrap_or_else(|e| panic!("getxattr user.artifactfs.sha256 of {}: {e}", path.display()));
    String::from_utf8(v).unwrap()
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
/// The daemon pid that a successful `artifactfs mount` reports: "mounted ... (pid N, log ...)".
/// (A failed one may name another daemon's pid, which is not ours to wait for.)
pub fn reported_pid(o: &Output) -> Option<i32> {
    if !o.status.success() {
        return None;
    }
    let err = String::from_utf8_lossy(&o.stderr);
    let err = &err[err.find("mounted ")?..];
    let rest = &err[err.find("(pid ")? + 5..];
    rest[..rest.find(|c: char| !c.is_ascii_digit())?]
        .parse()
        .ok()
}

pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
    }
}

/// `kill -9 pid`, and wait until it is gone.
pub fn kill9(pid: i32) {
    assert_eq!(
        unsafe { libc::kill(pid, libc::SIGKILL) },
        0,
        "kill -9 {pid}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || process_gone(pid)),
        "daemon {pid} survived SIGKILL"
    );
}

/// Where store `store` keeps its index (a PostgreSQL URL, or `None`: `STORE/index.sqlite`) and
/// its blobs (as `STORE/shared` remembers them).
pub fn store_locations(store: &Path) -> (Option<String>, PathBuf) {
    let text = std::fs::read_to_string(store.join("shared")).unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).map(str::to_owned))
    };
    let blobs = field("blobs=").map_or_else(|| store.join("blobs"), PathBuf::from);
    (field("index="), blobs)
}

/// How many contents a store holds: blob files plus the small contents its index holds
/// (`inline_content`, see `INLINE_MAX`). Read with a read-only connection, also while mounted.
pub fn stored_contents(store: &Path) -> usize {
    fn files(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.map(|e| {
                    let e = e.unwrap();
                    if e.file_type().unwrap().is_dir() {
                        files(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
            })
            .unwrap_or(0)
    }
    files(&store_locations(store).1.join("sha256")) + inline_contents(store).len()
}

fn index_readonly(store: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        store.join("index.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap()
}

fn shared_index(store: &Path) -> Option<postgres::Client> {
    let url = store_locations(store).0?;
    Some(postgres::Client::connect(&url, postgres::NoTls).unwrap())
}

/// The hashes (hex) of the small contents the index holds.
pub fn inline_contents(store: &Path) -> Vec<String> {
    if let Some(mut pg) = shared_index(store) {
        return pg
            .query("SELECT hash FROM inline_content", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    }
    let db = index_readonly(store);
    let mut stmt = db.prepare("SELECT hash FROM inline_content").unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .map(|h| h.unwrap())
        .collect()
}

/// The stored bytes of content `sha` (hex), wherever the store keeps them.
pub fn stored_bytes(store: &Path, sha: &str) -> Option<Vec<u8>> {
    let inline = match shared_index(store) {
        Some(mut pg) => pg
            .query_opt("SELECT data FROM inline_content WHERE hash = $1", &[&sha])
            .unwrap()
            .map(|r| r.get(0)),
        None => index_readonly(store)
            .query_row(
                "SELECT data FROM inline_content WHERE hash = ?1",
                [sha],
                |r| r.get(0),
            )
            .ok(),
    };
    let blobs = store_locations(store).1;
    inline.or_else(|| std::fs::read(blobs.join("sha256").join(&sha[..2]).join(&sha[2..])).ok())
}

/// Changes the stored bytes of small content `sha` behind the daemon's back (a damaged disk):
/// `None` deletes them.
pub fn damage_inline(store: &Path, sha: &str, bytes: Option<&[u8]>) {
    if let Some(mut pg) = shared_index(store) {
        let n = match bytes {
            Some(b) => pg.execute(
                "UPDATE inline_content SET data = $2 WHERE hash = $1",
                &[&sha, &b],
            ),
            None => pg.execute("DELETE FROM inline_content WHERE hash = $1", &[&sha]),
        }
        .unwrap();
        assert_eq!(n, 1, "no inline content {sha}");
        return;
    }
    let db = rusqlite::Connection::open(store.join("index.sqlite")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let n = match bytes {
        Some(b) => db.execute(
            "UPDATE inline_content SET data = ?2 WHERE hash = ?1",
            rusqlite::params![sha, b],
        ),
        None => db.execute("DELETE FROM inline_content WHERE hash = ?1", [sha]),
    }
    .unwrap();
    assert_eq!(n, 1, "no inline content {sha}");
}
