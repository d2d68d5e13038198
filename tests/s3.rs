//! Blobs in S3-compatible object storage (`--blobs s3://BUCKET/PREFIX`) with a PostgreSQL index:
//! content-addressed keys, cold reads on another machine, the local cache's bound, a bucket
//! that stops answering, damaged objects, `gc`, `fsck --verify` and `migrate`.
//! Needs the test PostgreSQL and S3 servers `scripts/test.sh` starts (`ARTIFACTFS_TEST_PG`,
//! `ARTIFACTFS_TEST_S3`); the outage test runs an S3 server of its own.

mod common;

use std::io::{Read, Seek, Write};
use std::os::unix::io::IntoRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A new shared store on the test servers: its index URL and its bucket (`s3://B/blobs`).
fn new_store(test: &str, endpoint: Option<&str>) -> Option<(String, String, String)> {
    if !fuse_available(test) {
        return None;
    }
    let endpoint = match endpoint {
        Some(e) => e.to_owned(),
        None => s3_endpoint(test)?,
    };
    let server = pg_server(test)?;
    let base = server.rsplit_once('/').unwrap().0.to_string();
    let index = format!("{base}/{}", new_database(&server));
    let bucket = new_bucket(&endpoint);
    Some((index, bucket, endpoint))
}

/// A daemon of the store `index` + `s3://bucket/blobs` with `args` and `env` too.
/// The size of a piece of content served as it arrives (see `artifactfs::store::pieces`).
const PIECE: usize = artifactfs::store::pieces::PIECE as usize;

/// The test's own handle on `bucket` of the S3 server at `endpoint` (to damage or list objects).
fn bucket_of(bucket: &str, endpoint: &str) -> artifactfs::store::s3::Remote {
    artifactfs::store::s3::Remote::open_with(&format!("s3://{bucket}/blobs"), &s3_env_for(endpoint))
        .unwrap()
}

fn machine(test: &str, index: &str, bucket: &str, args: &[&str], env: &[(&str, &str)]) -> Mount {
    let blobs = format!("s3://{bucket}/blobs");
    let mut all = vec!["--index", index, "--blobs", blobs.as_str()];
    all.extend_from_slice(args);
    Mount::machines_on_with_args(test, &all, env).unwrap()
}

/// The keys of a bucket and their sizes (a plain ListObjectsV2, parsed by hand).
fn list_keys(endpoint: &str, bucket: &str) -> Vec<(String, u64)> {
    let xml = s3_http(endpoint, "GET", &format!("/{bucket}?list-type=2"));
    let field = |item: &str, tag: &str| -> String {
        let open = format!("<{tag}>");
        let start = item.find(&open).unwrap() + open.len();
        let end = item[start..].find("</").unwrap() + start;
        item[start..end].to_string()
    };
    xml.split("<Contents>")
        .skip(1)
        .map(|item| (field(item, "Key"), field(item, "Size").parse().unwrap()))
        .collect()
}

/// The bucket holds an object for each of `contents`, under its key and with its size, and
/// nothing else but earlier states of files being written: a descriptor a child process
/// inherited (other tests of this binary run commands meanwhile; `O_CLOEXEC` closes it at the
/// child's `exec`) is a `close()` like any other, and the daemon commits what was written so
/// far, as a flush. Such a state is no longer than the longest a file was while written
/// (`longest`: a file truncated after it was written was longer than its content), and never
/// temporary.
fn assert_objects(endpoint: &str, bucket: &str, contents: &[&[u8]], longest: u64, what: &str) {
    let keys = list_keys(endpoint, bucket);
    for c in contents {
        let want = (key_of(c), c.len() as u64);
        assert!(keys.contains(&want), "{what}: {want:?} missing in {keys:?}");
    }
    for (key, size) in &keys {
        let wanted = contents.iter().any(|c| key_of(c) == *key);
        assert!(
            wanted || (key.starts_with("blobs/sha256/") && *size <= longest),
            "{what}: {key} ({size} bytes) is not a content written: {keys:?}"
        );
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    artifactfs::store::Hash::of(bytes).to_hex()
}

/// The key content `bytes` has below `blobs/`.
fn key_of(bytes: &[u8]) -> String {
    let hex = sha256_hex(bytes);
    format!("blobs/sha256/{}/{}", &hex[..2], &hex[2..])
}

/// Bytes in the cache directory of a store, and the hashes there.
fn cache_of(store: &Path) -> (u64, Vec<String>) {
    cache_in(&store.join("cache"))
}

/// Bytes in cache directory `cache` (`cache/sha256/…`), and the hashes there.
fn cache_in(cache: &Path) -> (u64, Vec<String>) {
    let mut bytes = 0;
    let mut names = Vec::new();
    if let Ok(dirs) = std::fs::read_dir(cache.join("sha256")) {
        for d in dirs.flatten() {
            for f in std::fs::read_dir(d.path()).unwrap().flatten() {
                bytes += f.metadata().unwrap().len();
                names.push(format!(
                    "{}{}",
                    d.file_name().to_string_lossy(),
                    f.file_name().to_string_lossy()
                ));
            }
        }
    }
    (bytes, names)
}

/// Objects are keyed by their SHA-256 below the prefix, stored once, and small content makes
/// none; another machine with an empty cache reads every file right (large ones in ranges),
/// and then has them in its cache.
#[test]
fn content_is_keyed_by_its_hash_and_a_cold_machine_reads_it() {
    let test = "content_is_keyed_by_its_hash";
    let Some((index, bucket, endpoint)) = new_store(test, None) else {
        return;
    };
    let a = machine(test, &index, &bucket, &[], &[]);
    let b = machine(test, &index, &bucket, &[], &[]);
    let dir = "runs/r/artifacts";
    std::fs::create_dir_all(a.path(dir)).unwrap();
    let small = b"metrics: 0.97\n".to_vec();
    let mid = pseudo_random(1, 1 << 20);
    // Multipart: more than two parts of 8 MiB, and a last part that is not whole.
    let big = pseudo_random(2, 20 * (1 << 20) + 12345);
    for (name, bytes) in [("small", &small), ("mid", &mid), ("big", &big)] {
        std::fs::write(a.path(&format!("{dir}/{name}")), bytes).unwrap();
    }
    // The same content under other names: nothing new stored.
    sh_ok(
        &a.mnt,
        &format!("cp {dir}/mid {dir}/mid-again && cp {dir}/big {dir}/big-again"),
    );
    assert_objects(
        &endpoint,
        &bucket,
        &[&mid, &big],
        big.len().max(mid.len()) as u64,
        "one object per content, none for small content",
    );
    assert!(
        !list_keys(&endpoint, &bucket)
            .iter()
            .any(|(k, _)| *k == key_of(&small)),
        "small content made an object"
    );
    assert_eq!(cache_of(&b.store).1.len(), 0, "b has fetched nothing yet");
    for (name, bytes) in [
        ("small", &small),
        ("mid", &mid),
        ("big", &big),
        ("big-again", &big),
    ] {
        let path = b.path(&format!("{dir}/{name}"));
        assert!(
            wait_until(Duration::from_secs(3), || path.exists()),
            "{name}"
        );
        assert_eq!(&std::fs::read(&path).unwrap(), bytes, "{name} on b");
    }
    let (_, cached) = cache_of(&b.store);
    let mut cached = cached;
    cached.sort();
    let mut hashes = vec![sha256_hex(&mid), sha256_hex(&big)];
    hashes.sort();
    assert_eq!(cached, hashes, "b keeps what it fetched");
    assert_eq!(std::fs::read(b.path(&format!("{dir}/mid"))).unwrap(), mid);
    // One streamed GET instead of ranges (ARTIFACTFS_S3_RANGES=1) reads the same.
    let c = machine(test, &index, &bucket, &[], &[("ARTIFACTFS_S3_RANGES", "1")]);
    for (name, bytes) in [("big", &big), ("mid", &mid)] {
        assert_eq!(
            &std::fs::read(c.path(&format!("{dir}/{name}"))).unwrap(),
            bytes,
            "{name} on c"
        );
    }
    assert_eq!(cache_of(&c.store).1.len(), 2);
    let out = b.cli(&["fsck", "--verify"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("all re-hashed") && !text.contains("problem"),
        "{text}"
    );
}

/// With a small `--cache-size`, the cache stays within it by dropping what was opened least
/// recently, never content that is open; everything dropped is fetched again when read.
#[test]
fn the_cache_stays_within_its_size_and_keeps_open_content() {
    let test = "the_cache_stays_within_its_size";
    let Some((index, bucket, _)) = new_store(test, None) else {
        return;
    };
    let a = machine(test, &index, &bucket, &[], &[]);
    let b = machine(test, &index, &bucket, &["--cache-size", "3M"], &[]);
    let dir = "runs/c/artifacts";
    std::fs::create_dir_all(a.path(dir)).unwrap();
    let files: Vec<Vec<u8>> = (0..6).map(|i| pseudo_random(100 + i, 1 << 20)).collect();
    for (i, bytes) in files.iter().enumerate() {
        std::fs::write(a.path(&format!("{dir}/f{i}")), bytes).unwrap();
    }
    let path = |i: usize| b.path(&format!("{dir}/f{i}"));
    assert!(wait_until(Duration::from_secs(3), || path(5).exists()));
    // f0 stays open while the others are read.
    let mut held = std::fs::File::open(path(0)).unwrap();
    let mut first = [0u8; 10];
    held.read_exact(&mut first).unwrap();
    for (i, bytes) in files.iter().enumerate().skip(1) {
        assert_eq!(&std::fs::read(path(i)).unwrap(), bytes, "f{i}");
        let (bytes, _) = cache_of(&b.store);
        assert!(bytes <= 3 << 20, "cache holds {bytes} bytes after f{i}");
    }
    let (_, cached) = cache_of(&b.store);
    assert!(
        cached.contains(&sha256_hex(&files[0])),
        "open content was evicted: {cached:?}"
    );
    assert!(
        cached.contains(&sha256_hex(&files[5])),
        "the latest read is not kept: {cached:?}"
    );
    assert!(!cached.contains(&sha256_hex(&files[1])), "{cached:?}");
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    assert_eq!([&first[..], &rest[..]].concat(), files[0]);
    drop(held);
    // Evicted content comes back from the bucket.
    for (i, bytes) in files.iter().enumerate() {
        assert_eq!(&std::fs::read(path(i)).unwrap(), bytes, "f{i} again");
    }
    assert!(cache_of(&b.store).0 <= 3 << 20);
}

/// A shared store whose bucket is on an S3 server of the test's own (which it may stop), and
/// the environment its daemons need: that server's, and a patience of `patience_ms`.
struct OwnStore {
    s3: OwnS3,
    index: String,
    bucket: String,
    env: Vec<(String, String)>,
}

impl OwnStore {
    fn new(test: &str, patience_ms: u64) -> Option<OwnStore> {
        OwnStore::on_server_with(test, patience_ms, &[])
    }

    /// [`OwnStore::new`] on a server started with `server_env` (moto's settings).
    fn on_server_with(
        test: &str,
        patience_ms: u64,
        server_env: &[(&str, &str)],
    ) -> Option<OwnStore> {
        if !fuse_available(test) {
            return None;
        }
        let s3 = OwnS3::start(server_env)?;
        let (index, bucket, _) = new_store(test, Some(&s3.endpoint))?;
        let mut env = s3_env_for(&s3.endpoint);
        env.push((
            "ARTIFACTFS_TEST_S3_PATIENCE_MS".into(),
            patience_ms.to_string(),
        ));
        Some(OwnStore {
            s3,
            index,
            bucket,
            env,
        })
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

/// An S3 server of the test's own (moto, from the venv `scripts/test.sh` made), stopped with the
/// test.
struct OwnS3 {
    child: Child,
    endpoint: String,
}

impl OwnS3 {
    fn start(env: &[(&str, &str)]) -> Option<OwnS3> {
        let python = match std::env::var("ARTIFACTFS_TEST_S3_PYTHON") {
            Ok(p) => PathBuf::from(p),
            Err(_) => {
                s3_endpoint("OwnS3")?;
                panic!("ARTIFACTFS_TEST_S3_PYTHON is not set (scripts/test.sh sets it)");
            }
        };
        let server = python.parent().unwrap().join("moto_server");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s3 = OwnS3 {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        assert!(
            wait_until(Duration::from_secs(30), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "moto did not start"
        );
        Some(s3)
    }

    fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for OwnS3 {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `bytes` to a new file at `path` and closes it, returning close()'s error (which
/// `std::fs::write` would drop).
fn write_and_close(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    let fd = f.into_raw_fd();
    if unsafe { libc::close(fd) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A bucket that stops answering is waited for: a close() during a short outage returns once it
/// answers again. A longer one fails the close() with EIO after the patience, leaves nothing
/// half-visible, and service comes back without a restart.
#[test]
fn a_bucket_outage_is_waited_out_then_fails_with_eio_and_service_comes_back() {
    let test = "a_bucket_outage_is_waited_out";
    let Some(own) = OwnStore::new(test, 5000) else {
        return;
    };
    let (s3, index, bucket) = (&own.s3, own.index.as_str(), own.bucket.as_str());
    let env = own.env();
    let m = machine(test, index, bucket, &[], &env);
    let dir = m.path("runs/o/artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let before = pseudo_random(1, 300_000);
    write_and_close(&dir.join("before"), &before).unwrap();

    // A short outage: the close waits for it.
    s3.signal(libc::SIGSTOP);
    let writer = {
        let dir = dir.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = write_and_close(&dir.join("during"), &pseudo_random(2, 300_000));
            (r.map_err(|e| e.to_string()), t.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(2000));
    s3.signal(libc::SIGCONT);
    let (r, waited) = writer.join().unwrap();
    assert_eq!(r, Ok(()), "close() across a 2 s outage");
    assert!(
        waited >= Duration::from_millis(1500),
        "it did not wait: {waited:?}"
    );
    assert_eq!(
        std::fs::read(dir.join("during")).unwrap(),
        pseudo_random(2, 300_000)
    );

    // A long one: EIO after the patience (5 s here, 30 s by default).
    s3.signal(libc::SIGSTOP);
    let t = Instant::now();
    let e = write_and_close(&dir.join("lost"), &pseudo_random(3, 300_000)).unwrap_err();
    let waited = t.elapsed();
    s3.signal(libc::SIGCONT);
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(30),
        "failed after {waited:?}"
    );
    // Nothing half-visible: the file is missing, empty, or whole (the release that follows
    // the failed close() tries its commit once more, and the bucket may be back by then; until
    // that release is through, the file is being written: EBUSY).
    let mut read = std::fs::read(dir.join("lost"));
    let t = Instant::now();
    while read
        .as_ref()
        .is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY))
        && t.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(50));
        read = std::fs::read(dir.join("lost"));
    }
    match read {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}"),
        Ok(bytes) => assert!(
            bytes.is_empty() || bytes == pseudo_random(3, 300_000),
            "{} bytes of a failed close",
            bytes.len()
        ),
    }
    // Cold reads waiting for the bucket hold no request thread: with more of them waiting
    // than the mount has request threads, it still answers stat and ls at once.
    let files: Vec<Vec<u8>> = (0..6).map(|i| pseudo_random(20 + i, 100_000)).collect();
    for (i, bytes) in files.iter().enumerate() {
        write_and_close(&dir.join(format!("cold{i}")), bytes).unwrap();
    }
    let cold = machine(test, index, bucket, &["--threads", "4"], &env);
    let cold_dir = cold.path("runs/o/artifacts");
    assert!(wait_until(Duration::from_secs(3), || cold_dir
        .join("cold5")
        .exists()));
    s3.signal(libc::SIGSTOP);
    let readers: Vec<_> = (0..6)
        .map(|i| {
            let path = cold_dir.join(format!("cold{i}"));
            std::thread::spawn(move || std::fs::read(path).map_err(|e| e.to_string()))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    assert!(std::fs::metadata(cold_dir.join("before")).is_ok());
    assert!(std::fs::read_dir(&cold_dir).unwrap().count() >= 6);
    let answered = t.elapsed();
    s3.signal(libc::SIGCONT);
    for (i, r) in readers.into_iter().enumerate() {
        let got = r.join().unwrap();
        // The right bytes, or (seen twice in ~20 loaded runs, not explained yet: see the issue
        // notes) EBUSY: the writer's seal not seen yet. Never other bytes, never a hang.
        let busy = got.as_ref().is_err_and(|e| e.contains("os error 16"));
        assert!(
            got.as_ref() == Ok(&files[i]) || busy,
            "cold{i}: {:?} (stat and ls answered in {answered:?}); log: {}\nthe writer's log: {}",
            got.map(|b| b.len()),
            cold.log(),
            m.log()
        );
        if busy {
            eprintln!("cold{i}: EBUSY; the writer's log:\n{}", m.log());
        }
    }
    // (Blocked behind the fetches, they would have waited for the 5 s patience.)
    assert!(
        answered < Duration::from_secs(3),
        "stat and ls took {answered:?} while cold reads waited"
    );

    // Service is back without a restart.
    let after = pseudo_random(4, 300_000);
    write_and_close(&dir.join("after"), &after).unwrap();
    assert_eq!(std::fs::read(dir.join("after")).unwrap(), after);
    assert_eq!(std::fs::read(dir.join("before")).unwrap(), before);
    let log = m.log();
    assert!(
        !log.contains("artifactfs-test-secret"),
        "a credential reached the log"
    );
}

/// An object damaged or truncated in the bucket is never served: a machine that must fetch it
/// answers EIO; `fsck --verify` names it with the paths that use it; writing the same content
/// again repairs it.
#[test]
fn a_damaged_object_is_never_served_and_fsck_names_its_paths() {
    let test = "a_damaged_object_is_never_served";
    let Some((index, bucket, endpoint)) = new_store(test, None) else {
        return;
    };
    let a = machine(test, &index, &bucket, &[], &[]);
    let dir = "runs/d/artifacts";
    std::fs::create_dir_all(a.path(dir)).unwrap();
    let good = pseudo_random(5, 200_000);
    let other = pseudo_random(6, 300_000);
    std::fs::write(a.path(&format!("{dir}/model.bin")), &good).unwrap();
    std::fs::write(a.path(&format!("{dir}/other.bin")), &other).unwrap();
    let hash = artifactfs::store::Hash::of(&good);
    let remote = bucket_of(&bucket, &endpoint);
    // Truncated: the first half of the bytes under the same key.
    remote.put_raw(&hash, &good[..100_000]).unwrap();

    let b = machine(test, &index, &bucket, &[], &[]);
    let path = b.path(&format!("{dir}/model.bin"));
    assert!(wait_until(Duration::from_secs(3), || path.exists()));
    let e = std::fs::read(&path).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        !cache_of(&b.store).1.contains(&hash.to_hex()),
        "bad bytes were cached"
    );
    assert_eq!(
        std::fs::read(b.path(&format!("{dir}/other.bin"))).unwrap(),
        other
    );

    // Damaged in place: same size, other bytes.
    let mut flipped = good.clone();
    flipped[150_000] ^= 1;
    remote.put_raw(&hash, &flipped).unwrap();
    let out = b.cli(&["fsck", "--verify"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!("content {hash} is corrupt"))
            && text.contains("/runs/d/artifacts/model.bin"),
        "{text}"
    );
    // Missing altogether.
    let ohash = artifactfs::store::Hash::of(&other);
    remote.delete(&ohash).unwrap();
    let out = b.cli(&["fsck"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(&format!("content {ohash} is missing")) && text.contains("other.bin"),
        "{text}"
    );

    // The same content written again replaces the damaged object. (A daemon of a shared store
    // reads the list of damaged content at most a second old.)
    std::thread::sleep(Duration::from_millis(1200));
    std::fs::write(a.path(&format!("{dir}/model-again.bin")), &good).unwrap();
    assert_eq!(remote.rehash(&hash).unwrap(), hash);
    let c = machine(test, &index, &bucket, &[], &[]);
    assert_eq!(
        std::fs::read(c.path(&format!("{dir}/model.bin"))).unwrap(),
        good
    );
}

/// A large content a machine does not have is served piece by piece as it arrives, each piece
/// checked against the states its writer recorded in the index: with the object damaged in its
/// last piece, the first pieces are read (the whole object never verifies), the damaged one
/// fails with `EIO` and nothing of it is cached; the object repaired, the same handle reads on
/// (its content is opened again). A second open while the first still reads another content
/// through the daemon is served the same way (the kernel refuses a passthrough open beside a
/// cached one).
#[test]
fn a_large_content_is_served_piece_by_piece_as_it_arrives() {
    let test = "served_piece_by_piece";
    let Some((index, bucket, endpoint)) = new_store(test, None) else {
        return;
    };
    let a = machine(test, &index, &bucket, &[], &[]);
    let dir = "runs/p/artifacts";
    std::fs::create_dir_all(a.path(dir)).unwrap();
    let good = pseudo_random(9, 2 * PIECE + 1_000_000);
    std::fs::write(a.path(&format!("{dir}/weights.bin")), &good).unwrap();
    let other = pseudo_random(10, 2 * PIECE + 500_000);
    std::fs::write(a.path(&format!("{dir}/other.bin")), &other).unwrap();
    let hash = artifactfs::store::Hash::of(&good);
    let remote = bucket_of(&bucket, &endpoint);
    let mut damaged = good.clone();
    damaged[2 * PIECE + 500] ^= 1;
    remote.put_raw(&hash, &damaged).unwrap();

    let b = machine(test, &index, &bucket, &[], &[]);
    let path = b.path(&format!("{dir}/weights.bin"));
    assert!(wait_until(Duration::from_secs(3), || path.exists()));
    let mut f = std::fs::File::open(&path).unwrap();
    let mut head = vec![0u8; 2 * PIECE];
    f.read_exact(&mut head).unwrap();
    assert!(
        head == good[..2 * PIECE],
        "the checked pieces are the content's"
    );
    let mut rest = Vec::new();
    let e = f.read_to_end(&mut rest).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        !cache_of(&b.store).1.contains(&hash.to_hex()),
        "a damaged object was cached"
    );
    assert!(
        b.log().contains("does not hash as the index says"),
        "{}",
        b.log()
    );
    // Repaired: the handle that got EIO reads on.
    remote.put_raw(&hash, &good).unwrap();
    f.seek(std::io::SeekFrom::Start(2 * PIECE as u64)).unwrap();
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).unwrap();
    assert!(
        tail == good[2 * PIECE..],
        "read on by the handle that got EIO"
    );
    drop(f);
    assert!(std::fs::read(&path).unwrap() == good, "a new open");

    let path = b.path(&format!("{dir}/other.bin"));
    let hash = artifactfs::store::Hash::of(&other);
    let mut first = std::fs::File::open(&path).unwrap();
    let mut one = vec![0u8; 4096];
    first.read_exact(&mut one).unwrap();
    assert_eq!(one, other[..4096]);
    // The whole content has arrived and is cached, the first handle still open.
    assert!(
        wait_until(Duration::from_secs(20), || cache_of(&b.store)
            .1
            .contains(&hash.to_hex())),
        "not cached"
    );
    let second = std::fs::read(&path).unwrap();
    assert!(second == other, "read by a second open");
    let mut all = one;
    first.read_to_end(&mut all).unwrap();
    assert!(all == other, "read by the first handle");
    drop(first);
    // Every handle closed: the next open reads from the cache file.
    assert!(std::fs::read(&path).unwrap() == other);
}

/// An object of the wrong size under a content's key (truncated by some other client, or by
/// the bucket) is not taken for that content: a writer of the content replaces it, small (one
/// PUT) or large (in parts), and the other machine reads the right bytes.
#[test]
fn an_object_of_the_wrong_size_is_replaced_by_a_writer_of_its_content() {
    let test = "wrong_size_object_replaced";
    let Some((index, bucket, endpoint)) = new_store(test, None) else {
        return;
    };
    let remote = bucket_of(&bucket, &endpoint);
    let small = pseudo_random(13, 300_000);
    let large = pseudo_random(14, 20 << 20);
    for bytes in [&small, &large] {
        let hash = artifactfs::store::Hash::of(bytes);
        remote.put_raw(&hash, &bytes[..1000]).unwrap();
    }
    let a = machine(test, &index, &bucket, &[], &[]);
    let dir = "runs/w/artifacts";
    std::fs::create_dir_all(a.path(dir)).unwrap();
    write_and_close(&a.path(&format!("{dir}/small.bin")), &small).unwrap();
    write_and_close(&a.path(&format!("{dir}/large.bin")), &large).unwrap();
    let sizes: std::collections::HashMap<String, u64> =
        list_keys(&endpoint, &bucket).into_iter().collect();
    assert_eq!(sizes.get(&key_of(&small)), Some(&(small.len() as u64)));
    assert_eq!(sizes.get(&key_of(&large)), Some(&(large.len() as u64)));
    assert!(a.log().contains("damaged; stored again"), "{}", a.log());

    let b = machine(test, &index, &bucket, &[], &[]);
    let path = b.path(&format!("{dir}/small.bin"));
    assert!(wait_until(Duration::from_secs(3), || path.exists()));
    assert!(std::fs::read(&path).unwrap() == small);
    assert!(std::fs::read(b.path(&format!("{dir}/large.bin"))).unwrap() == large);
}

/// A fetch that no handle reads any more stops after a grace (here shortened to 0): `head`
/// of a large cold file does not leave the whole object arriving behind it (nor a temp file,
/// nor a cache entry of it); the next open fetches again, and reads it whole.
#[test]
fn a_fetch_nobody_reads_any_more_stops() {
    let test = "unread_fetch_stops";
    let Some((index, bucket, _endpoint)) = new_store(test, None) else {
        return;
    };
    let a = machine(test, &index, &bucket, &[], &[]);
    let dir = "runs/h/artifacts";
    std::fs::create_dir_all(a.path(dir)).unwrap();
    let content = pseudo_random(11, 24 * PIECE + 12_345);
    std::fs::write(a.path(&format!("{dir}/shard.bin")), &content).unwrap();
    let hash = artifactfs::store::Hash::of(&content).to_hex();

    let b = machine(
        test,
        &index,
        &bucket,
        &[],
        &[("ARTIFACTFS_TEST_UNREAD_GRACE_MS", "0")],
    );
    let path = b.path(&format!("{dir}/shard.bin"));
    assert!(wait_until(Duration::from_secs(3), || path.exists()));
    let mut head = vec![0u8; 4096];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(head, content[..4096]);
    let temps = || std::fs::read_dir(b.store.join("tmp")).unwrap().count();
    assert!(
        wait_until(Duration::from_secs(10), || temps() == 0),
        "the fetch left a temp file"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !cache_of(&b.store).1.contains(&hash),
        "the whole object was fetched for 4 KiB nobody reads any more"
    );
    assert!(std::fs::read(&path).unwrap() == content, "read again");
    assert!(
        wait_until(Duration::from_secs(5), || cache_of(&b.store)
            .1
            .contains(&hash)),
        "read whole: kept"
    );
}

/// `gc` deletes an object only when no file uses it and it is older than the upload grace.
#[test]
fn gc_deletes_unused_objects_past_the_upload_grace_only() {
    let test = "gc_deletes_unused_objects";
    let Some((index, bucket, endpoint)) = new_store(test, None) else {
        return;
    };
    let a = machine(test, &index, &bucket, &[], &[]);
    let dir = "runs/g/artifacts";
    std::fs::create_dir_all(a.path(dir)).unwrap();
    let kept = pseudo_random(7, 100_000);
    let removed = pseudo_random(8, 100_000);
    std::fs::write(a.path(&format!("{dir}/kept")), &kept).unwrap();
    std::fs::write(a.path(&format!("{dir}/removed")), &removed).unwrap();
    std::fs::remove_file(a.path(&format!("{dir}/removed"))).unwrap();
    // An object no row uses yet (an upload whose commit is still to come).
    let remote = bucket_of(&bucket, &endpoint);
    let orphan = b"uploaded, not committed yet".repeat(4000);
    remote
        .upload_bytes(&orphan, &artifactfs::store::Hash::of(&orphan), false)
        .unwrap();
    let gc = |grace_ms: &str| {
        let out = Command::new(BIN)
            .envs(a.env().iter().map(|(k, v)| (k, v)))
            .env("ARTIFACTFS_TEST_UPLOAD_GRACE_MS", grace_ms)
            .args(["gc", "--older-than", "0", "--store"])
            .arg(&a.store)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let mut keys: Vec<String> = list_keys(&endpoint, &bucket)
            .into_iter()
            .map(|k| k.0)
            .collect();
        keys.sort();
        keys
    };
    let mut all = vec![key_of(&kept), key_of(&removed), key_of(&orphan)];
    all.sort();
    assert_eq!(gc("3600000"), all, "everything is younger than the grace");
    assert_eq!(gc("0"), vec![key_of(&kept)]);
    assert_eq!(std::fs::read(a.path(&format!("{dir}/kept"))).unwrap(), kept);
}

/// `migrate` copies an embedded store into PostgreSQL plus a bucket; the shared store then
/// shows the same tree with the same bytes.
#[test]
fn migrate_copies_an_embedded_store_into_postgresql_and_a_bucket() {
    let test = "migrate_into_postgresql_and_a_bucket";
    let Some((index, bucket, endpoint)) = new_store(test, None) else {
        return;
    };
    let mut emb = Mount::new(test).unwrap();
    let art = "runs/m/artifacts";
    std::fs::create_dir_all(emb.path(art)).unwrap();
    std::fs::write(emb.path(&format!("{art}/small.txt")), b"small").unwrap();
    let big = pseudo_random(9, 3_000_000);
    std::fs::write(emb.path(&format!("{art}/big.bin")), &big).unwrap();
    // More than one piece: the migration records its piece states too.
    let huge = pseudo_random(10, artifactfs::store::pieces::PIECE as usize + 1000);
    std::fs::write(emb.path(&format!("{art}/huge.bin")), &huge).unwrap();
    emb.unmount();
    let blobs = format!("s3://{bucket}/blobs");
    let out = Command::new(BIN)
        .envs(s3_env_for(&endpoint))
        .args(["migrate", "--store"])
        .arg(&emb.store)
        .args(["--index", &index, "--blobs", &blobs])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 blobs copied"),
        "{out:?}"
    );
    let mut want = vec![
        (key_of(&big), big.len() as u64),
        (key_of(&huge), huge.len() as u64),
    ];
    want.sort();
    let mut keys = list_keys(&endpoint, &bucket);
    keys.sort();
    assert_eq!(keys, want);
    let target = artifactfs::store::Index::open_postgres_client(&index).unwrap();
    let huge_hash = artifactfs::store::Hash::of(&huge);
    let (piece, states) = target
        .pieces_get(&huge_hash)
        .unwrap()
        .expect("piece states");
    assert_eq!(
        (piece, states.len()),
        (artifactfs::store::pieces::PIECE, 32)
    );
    assert_eq!(
        target
            .pieces_get(&artifactfs::store::Hash::of(&big))
            .unwrap(),
        None,
        "one piece needs no states"
    );
    drop(target);
    let m = machine(test, &index, &bucket, &[], &[]);
    assert_eq!(
        std::fs::read(m.path(&format!("{art}/big.bin"))).unwrap(),
        big
    );
    assert!(std::fs::read(m.path(&format!("{art}/huge.bin"))).unwrap() == huge);
    assert_eq!(
        std::fs::read(m.path(&format!("{art}/small.txt"))).unwrap(),
        b"small"
    );
    let out = m.cli(&["fsck", "--verify"]);
    assert!(out.status.success(), "{out:?}");
}

/// Whether the bucket has a multipart upload in progress (a plain ListMultipartUploads).
fn uploads_in_progress(endpoint: &str, bucket: &str) -> usize {
    s3_http(endpoint, "GET", &format!("/{bucket}?uploads"))
        .matches("<Upload>")
        .count()
}

/// An upload the server will not complete (this moto takes every part under 1 GiB for too
/// small: `EntityTooSmall` at the completion) fails the close() with EIO, the file is gone, and
/// no multipart upload is left in the bucket, where it would stay, unseen and billed, until
/// aborted: neither the one streamed while the file was written nor the one tried again at the
/// commit.
#[test]
fn an_upload_the_server_will_not_complete_leaves_nothing_in_the_bucket() {
    let test = "an_upload_the_server_will_not_complete";
    let Some(own) =
        OwnStore::on_server_with(test, 5000, &[("S3_UPLOAD_PART_MIN_SIZE", "1073741824")])
    else {
        return;
    };
    let a = machine(
        test,
        &own.index,
        &own.bucket,
        &["--upload-while-writing"],
        &own.env(),
    );
    let dir = a.path("runs/u/artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = std::fs::File::create(dir.join("big")).unwrap();
    for chunk in pseudo_random(21, 40 << 20).chunks(1 << 20) {
        f.write_all(chunk).unwrap();
    }
    let endpoint = &own.s3.endpoint;
    assert_eq!(
        uploads_in_progress(endpoint, &own.bucket),
        1,
        "streamed while written"
    );
    let closed = unsafe { libc::close(f.into_raw_fd()) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    assert_eq!((closed, errno), (-1, Some(libc::EIO)));
    // The release, which close() does not wait for, tries the commit once more (another
    // upload, aborted too): none is left once it is through.
    assert!(wait_until(Duration::from_secs(60), || uploads_in_progress(
        endpoint,
        &own.bucket
    ) == 0));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(uploads_in_progress(endpoint, &own.bucket), 0);
}

/// `--upload-while-writing`: a large file written sequentially is on its way to the bucket
/// before its close(); files written otherwise (out of order, truncated) are uploaded at the
/// commit; every content ends under its own key, nothing temporary is left, and another
/// machine reads them all.
#[test]
fn a_large_file_written_sequentially_is_uploaded_while_written() {
    let test = "a_large_file_written_sequentially_is_uploaded";
    let Some((index, bucket, endpoint)) = new_store(test, None) else {
        return;
    };
    let a = machine(test, &index, &bucket, &["--upload-while-writing"], &[]);
    let dir = a.path("runs/u/artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let seq = pseudo_random(11, 40 << 20);
    let mut f = std::fs::File::create(dir.join("seq")).unwrap();
    for chunk in seq.chunks(1 << 20) {
        f.write_all(chunk).unwrap();
    }
    assert_eq!(
        uploads_in_progress(&endpoint, &bucket),
        1,
        "no upload before close()"
    );
    write_and_close_file(f);
    assert_eq!(uploads_in_progress(&endpoint, &bucket), 0);
    // Out of order: the second half first.
    let ooo = pseudo_random(12, 30 << 20);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(dir.join("ooo")).unwrap();
        f.write_all_at(&ooo[15 << 20..], 15 << 20).unwrap();
        f.write_all_at(&ooo[..15 << 20], 0).unwrap();
        write_and_close_file(f);
    }
    // Written past the stream's start, then truncated.
    let cut = pseudo_random(13, 40 << 20);
    {
        let mut f = std::fs::File::create(dir.join("cut")).unwrap();
        for chunk in cut.chunks(1 << 20) {
            f.write_all(chunk).unwrap();
        }
        f.set_len(20 << 20).unwrap();
        write_and_close_file(f);
    }
    // The same content again, streamed: stored once.
    std::fs::write(dir.join("seq-again"), &seq).unwrap();
    assert_objects(
        &endpoint,
        &bucket,
        &[&seq, &ooo, &cut[..20 << 20]],
        cut.len() as u64,
        "content keys only, nothing temporary left",
    );
    assert_eq!(uploads_in_progress(&endpoint, &bucket), 0);
    let b = machine(test, &index, &bucket, &[], &[]);
    for (name, bytes) in [
        ("seq", &seq[..]),
        ("ooo", &ooo[..]),
        ("cut", &cut[..20 << 20]),
        ("seq-again", &seq[..]),
    ] {
        let got = std::fs::read(b.path(&format!("runs/u/artifacts/{name}"))).unwrap();
        assert!(got == bytes, "{name} on b: {} bytes", got.len());
    }
}

/// Closes `f`, panicking with close()'s error if it has one.
fn write_and_close_file(f: std::fs::File) {
    let fd = f.into_raw_fd();
    assert_eq!(
        unsafe { libc::close(fd) },
        0,
        "{}",
        std::io::Error::last_os_error()
    );
}

/// A `--read-only` daemon on a bucket keeps what it fetches (`STORE/cache-ro`), also across a
/// clean restart: with the bucket stopped, what it read before is read again, and what it never
/// read fails with EIO after the patience. After a stop that was not clean, a damaged file in
/// that cache is never served: it is re-hashed at its first open and fetched again.
#[test]
fn a_read_only_daemon_keeps_what_it_fetches() {
    let test = "a_read_only_daemon_keeps_what_it_fetches";
    let Some(own) = OwnStore::new(test, 3000) else {
        return;
    };
    let (s3, index, bucket) = (&own.s3, own.index.as_str(), own.bucket.as_str());
    let env = own.env();
    let a = machine(test, index, bucket, &[], &env);
    let dir = "runs/ro/artifacts";
    std::fs::create_dir_all(a.path(dir)).unwrap();
    let read_before = pseudo_random(50, 2 << 20);
    let never_read = pseudo_random(51, 2 << 20);
    write_and_close(&a.path(&format!("{dir}/read")), &read_before).unwrap();
    write_and_close(&a.path(&format!("{dir}/never")), &never_read).unwrap();

    // Machine b: its store directory made by a writable mount, then mounted read-only.
    let mut b = machine(test, index, bucket, &[], &env);
    b.unmount();
    b.mount(&["--read-only"]);
    let kept = b.store.join("cache-ro");
    assert_eq!(
        std::fs::read(b.path(&format!("{dir}/read"))).unwrap(),
        read_before
    );
    let hash = sha256_hex(&read_before);
    assert_eq!(cache_in(&kept).1, vec![hash.clone()], "{}", b.log());
    assert!(b.log().contains("what it fetches from the bucket is kept"));

    // A clean restart, the bucket stopped: what was read is read from the cache.
    b.unmount();
    // (`unmount` does not wait for a read-only daemon to finish.)
    assert!(
        wait_until(Duration::from_secs(10), || kept.join("clean").exists()),
        "no clean mark: {}",
        b.log()
    );
    b.mount(&["--read-only"]);
    s3.signal(libc::SIGSTOP);
    let again = std::fs::read(b.path(&format!("{dir}/read")));
    let never = std::fs::read(b.path(&format!("{dir}/never")));
    s3.signal(libc::SIGCONT);
    assert_eq!(again.unwrap(), read_before, "{}", b.log());
    assert_eq!(never.unwrap_err().raw_os_error(), Some(libc::EIO));

    // As after a stop that was not clean (no mark), with the kept file damaged: fetched again.
    b.unmount();
    assert!(wait_until(Duration::from_secs(10), || kept
        .join("clean")
        .exists()));
    std::fs::remove_file(kept.join("clean")).unwrap();
    let file = kept.join("sha256").join(&hash[..2]).join(&hash[2..]);
    let mut damaged = std::fs::read(&file).unwrap();
    damaged[1000] ^= 0xff;
    std::fs::write(&file, &damaged).unwrap();
    b.mount(&["--read-only"]);
    assert_eq!(
        std::fs::read(b.path(&format!("{dir}/read"))).unwrap(),
        read_before
    );
    assert!(b.log().contains("is damaged: fetched again"), "{}", b.log());
    assert_eq!(std::fs::read(&file).unwrap(), read_before);
}

/// A rewrite of a sealed file whose content a machine does not have compares its writes with
/// that content: the content is fetched whole at the open, on the adapter's fetch pool, so
/// while the bucket is stopped the mount's single request thread stays free (before, the
/// open answered at once and the first write waited on that thread for the pieces).
#[test]
fn a_rewrite_of_cold_content_waits_off_the_request_threads() {
    let test = "a_rewrite_of_cold_content_waits_off_the_request_threads";
    let Some(own) = OwnStore::new(test, 20_000) else {
        return;
    };
    let (s3, index, bucket) = (&own.s3, own.index.as_str(), own.bucket.as_str());
    let env = own.env();
    let a = machine(test, index, bucket, &[], &env);
    let dir = "runs/rw/artifacts";
    std::fs::create_dir_all(a.path(dir)).unwrap();
    let content = pseudo_random(12, 2 * PIECE + 777);
    write_and_close(&a.path(&format!("{dir}/weights.bin")), &content).unwrap();

    let b = machine(test, index, bucket, &["--threads", "1"], &env);
    let path = b.path(&format!("{dir}/weights.bin"));
    assert!(wait_until(Duration::from_secs(3), || path.exists()));
    s3.signal(libc::SIGSTOP);
    let writer = {
        let (path, first) = (path.clone(), content[..4096].to_vec());
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().write(true).open(&path)?;
            f.write_all(&first)?;
            drop(f);
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let t = Instant::now();
        let _ = std::fs::metadata(b.path(&format!("runs/nothing{i}")));
        slowest = slowest.max(t.elapsed());
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    s3.signal(libc::SIGCONT);
    let wrote = writer.join().unwrap();
    assert!(
        slowest < Duration::from_secs(1),
        "b's lookups took up to {slowest:?} while a rewrite waited for the bucket; log: {}",
        b.log()
    );
    // The same first bytes: the rewrite changed nothing.
    wrote.unwrap();
    assert!(std::fs::read(&path).unwrap() == content);
}

/// A model version whose `MLmodel` is too large to live in the index is validated by a machine
/// that must fetch it. With the bucket stopped then, that machine's mount still answers at once
/// (the fetch waits with the index let go: it used to hold every request of the mount for the
/// fetch's patience), and the version is READY once the bucket is back.
#[test]
fn validating_a_model_fetches_with_the_index_let_go() {
    let test = "validating_a_model_fetches_with_the_index_let_go";
    let Some(own) = OwnStore::new(test, 20_000) else {
        return;
    };
    let (s3, index, bucket) = (&own.s3, own.index.as_str(), own.bucket.as_str());
    let env = own.env();
    // Machine a writes the model and leaves its validation to b (a settles only after 60 s).
    let a = machine(test, index, bucket, &["--settle", "60"], &env);
    let b = machine(test, index, bucket, &["--settle", "0.3"], &env);
    let src = tempfile::tempdir().unwrap();
    let model = src.path().join("v1");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mlflow/sklearn_iris");
    sh_ok(src.path(), &format!("cp -r '{}' v1", fixture.display()));
    let mut mlmodel = std::fs::read(model.join("MLmodel")).unwrap();
    mlmodel.extend_from_slice(format!("# {}\n", "x".repeat(100_000)).as_bytes());
    std::fs::write(model.join("MLmodel"), &mlmodel).unwrap();
    std::fs::create_dir(a.path("models/big")).unwrap();
    sh_ok(
        &a.mnt,
        &format!("cp -r '{}' models/big/v1", model.display()),
    );

    // The bucket stops; then b adds a note (small: in the index, no upload), which makes it
    // validate the version 0.3 s later, fetching the MLmodel.
    s3.signal(libc::SIGSTOP);
    std::fs::write(b.path("models/big/v1/notes.txt"), b"trained on b\n").unwrap();
    let fetching = wait_until(Duration::from_secs(10), || {
        b.log().contains("registry: fetching")
    });
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(2) {
        // A name never looked up: a LOOKUP the daemon must answer from the index.
        let t = Instant::now();
        let _ = std::fs::metadata(b.path(&format!("runs/nothing{i}")));
        slowest = slowest.max(t.elapsed());
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let fetched_before = !cache_of(&b.store).1.is_empty();
    s3.signal(libc::SIGCONT);
    assert!(
        fetching && !fetched_before,
        "b did not fetch; log: {}",
        b.log()
    );
    assert!(
        slowest < Duration::from_secs(1),
        "b's lookups took up to {slowest:?} while it validated; log: {}",
        b.log()
    );
    let v1 = b.path("models/big/v1");
    assert!(
        wait_until(Duration::from_secs(30), || getxattr(
            &v1,
            "user.artifactfs.status"
        )
        .is_ok_and(|s| s == b"READY")),
        "not READY: {:?}; log: {}",
        getxattr(&v1, "user.artifactfs.status").map(|s| String::from_utf8_lossy(&s).into_owned()),
        b.log()
    );
    assert!(cache_of(&b.store).1.contains(&sha256_hex(&mlmodel)));
}
