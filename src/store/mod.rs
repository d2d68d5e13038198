//! The store: a directory holding the SQLite index and the content-addressed blobs.
//!
//! Layout: `STORE/index.sqlite` (WAL), `STORE/blobs/sha256/<2 hex>/<62 hex>`, `STORE/tmp/`,
//! `STORE/lock` (held by the one writable daemon). This module owns that layout, the single-
//! writer lock and the start-up clean-up; [`blobs`] owns the bytes and [`index`] the rows. The
//! file-system logic above talks to `Store` only, so a second index engine or blob backend can be
//! added here without touching it or the FUSE adapter.

pub mod blobs;
pub mod gc;
pub mod index;
pub mod migrate;
pub mod pieces;
pub mod s3;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

pub use blobs::BlobStore;
pub use index::{Change, ChangeSink, Index};

/// A SHA-256 content hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    pub fn from_digest(hasher: Sha256) -> Hash {
        Hash(hasher.finalize().into())
    }

    pub fn of(bytes: &[u8]) -> Hash {
        Hash(Sha256::digest(bytes).into())
    }

    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(DIGITS[(b >> 4) as usize] as char);
            s.push(DIGITS[(b & 15) as usize] as char);
        }
        s
    }

    pub fn from_hex(s: &str) -> Option<Hash> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).ok()?;
            out[i] = u8::from_str_radix(hex, 16).ok()?;
        }
        Some(Hash(out))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Content of up to this many bytes lives in the index (table `inline_content`, written in the
/// same transaction as the row that first uses it) instead of as a file in `blobs/`: a small
/// file then costs one index transaction and no inode, block or directory entry of its own.
/// See the README's "Store layout" for the measurement behind the number.
pub const INLINE_MAX: u64 = 64 * 1024;

/// A stored content, open for reading: a blob file, bytes the index holds, or a bucket's
/// content on its way into the cache, read as its pieces arrive.
pub enum Content {
    Blob(std::sync::Arc<File>),
    Inline(Vec<u8>),
    Arriving(std::sync::Arc<blobs::Arriving>),
}

impl Content {
    /// Reads until `buf` is full or the content ends; returns the bytes read.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self {
            Content::Inline(v) => {
                let start = offset.min(v.len() as u64) as usize;
                let n = buf.len().min(v.len() - start);
                buf[..n].copy_from_slice(&v[start..start + n]);
                Ok(n)
            }
            Content::Blob(f) => blobs::read_full_at(f, buf, offset),
            Content::Arriving(a) => a.read_at(buf, offset),
        }
    }

    /// Whether a read of `..end` would wait for bytes still on their way from a bucket (or
    /// for a new fetch, after one that failed).
    pub fn would_wait(&self, end: u64) -> bool {
        matches!(self, Content::Arriving(a) if !a.ready(end) || a.failed())
    }

    /// Whether this is content whose fetch failed: what did not arrive never will through it.
    pub fn failed(&self) -> bool {
        matches!(self, Content::Arriving(a) if a.failed())
    }

    /// The blob file, for content that is one (kernel passthrough needs a file).
    pub fn file(&self) -> Option<&std::sync::Arc<File>> {
        match self {
            Content::Blob(f) => Some(f),
            Content::Inline(_) | Content::Arriving(_) => None,
        }
    }

    /// Every byte, up to `limit` (the rest is left out).
    pub fn bytes(&self, limit: u64) -> io::Result<Vec<u8>> {
        match self {
            Content::Inline(v) => Ok(v[..v.len().min(limit as usize)].to_vec()),
            Content::Blob(f) => {
                let mut out = Vec::new();
                (&**f).take(limit).read_to_end(&mut out)?;
                Ok(out)
            }
            Content::Arriving(a) => {
                let mut out = vec![0; limit.min(a.size()) as usize];
                let n = a.read_at(&mut out, 0)?;
                out.truncate(n);
                Ok(out)
            }
        }
    }
}

/// Opens content `hash` of `size` bytes through a locked index: inline if the index holds it,
/// else its blob (small content stored before the index held any stays a blob).
pub fn open_content(idx: &Index, blobs: &BlobStore, hash: &Hash, size: u64) -> io::Result<Content> {
    match inline_content(idx, hash, size)? {
        Some(content) => Ok(content),
        None => Ok(Content::Blob(blobs.open_shared(hash)?)),
    }
}

/// The content `hash` of `size` bytes if the index holds it.
fn inline_content(idx: &Index, hash: &Hash, size: u64) -> io::Result<Option<Content>> {
    if size > INLINE_MAX {
        return Ok(None);
    }
    Ok(idx.inline_get(hash)?.map(Content::Inline))
}

/// The size of stored content `hash` and whether the index holds it (`false`: a blob); `None`
/// if the store has neither.
pub fn content_size(
    idx: &Index,
    blobs: &BlobStore,
    hash: &Hash,
) -> io::Result<Option<(u64, bool)>> {
    match idx.inline_size(hash)? {
        Some(n) => Ok(Some((n, true))),
        None => Ok(blobs.size(hash)?.map(|n| (n, false))),
    }
}

/// What stored content `hash` actually hashes to, inline or blob.
pub fn rehash_content(idx: &Index, blobs: &BlobStore, hash: &Hash) -> io::Result<Hash> {
    match idx.inline_get(hash)? {
        Some(bytes) => Ok(Hash::of(&bytes)),
        None => blobs.rehash(hash),
    }
}

/// Nanoseconds since the Unix epoch, the index's time unit.
pub fn now_ns() -> i64 {
    to_ns(SystemTime::now())
}

pub fn to_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_nanos().min(i64::MAX as u128) as i64),
    }
}

/// Fails with a message that says why when the caller may not read the store directory: it
/// is 0700, private to its owner, and a command run by anyone else must say so (not "no index")
/// and show nothing.
fn check_access(root: &Path) -> io::Result<()> {
    match std::fs::read_dir(root) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            let owner = std::fs::metadata(root)
                .map(|m| format!("uid {}", std::os::unix::fs::MetadataExt::uid(&m)))
                .unwrap_or_else(|_| "its owner".into());
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "permission denied: the store {} is private to {owner}; run this as that \
                     user (or root), or read through the mount",
                    root.display()
                ),
            ))
        }
        Err(e) => Err(e),
    }
}

/// The default store: `$XDG_DATA_HOME/artifactfs`, else `~/.local/share/artifactfs`.
pub fn default_store_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("artifactfs");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".local/share/artifactfs")
}

/// How a writable store makes blobs durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync every blob, and the directory entries leading to it, before its index row is
    /// written; no start after an unclean stop needs to check these rows.
    EveryClose,
    /// Publish blobs without fsync and sync the whole store file system (`syncfs`) at most a
    /// second later; after a crash, the blobs of rows committed since the last sync are
    /// re-hashed on start and rows whose bytes did not survive are dropped.
    Batched,
}

/// How long a statement of the mount's daemon waits inside SQLite for a write lock that
/// another process (`gc`, `fsck`) holds, with the daemon's index mutex held — so every request
/// of the mount waits with it (see [`Store::set_busy_timeout`]). Above one transaction of `gc`
/// (~50 ms) and short enough that the mount does not stall: a request that meets a longer hold
/// is tried again with the mutex released ([`Store::retry_busy`] for commits,
/// `ArtifactFs::retrying` for the other changes).
pub const DAEMON_BUSY_TIMEOUT: Duration = Duration::from_millis(100);

/// How long [`Store::retry_busy`] keeps trying before it gives up.
pub const BUSY_PATIENCE: Duration = Duration::from_secs(60);

/// The longest sleep between two attempts of [`Store::retry_while_busy`].
const BUSY_BACKOFF_MAX: Duration = Duration::from_millis(10);

/// WAL length (4 KiB pages) from which [`Store::checkpoint`] makes the WAL start over.
const WAL_RESTART_FRAMES: i64 = 4096;

/// An open store.
pub struct Store {
    root: PathBuf,
    pub blobs: BlobStore,
    index: Mutex<Index>,
    /// A writable store's second connection to the index, used only by [`Store::checkpoint`].
    checkpointer: Option<Mutex<Index>>,
    /// Held for the daemon's lifetime by a writable mount; `None` for read-only use.
    _lock: Option<File>,
    last_sync: Mutex<std::time::Instant>,
    /// Serialises syncs, so `STORE/synced` is replaced by one writer at a time.
    marking: Mutex<()>,
    /// [`Store::stop`] recorded a clean stop.
    stopped: std::sync::atomic::AtomicBool,
    /// `Some` for a writable store.
    durability: Option<Durability>,
    /// The index connection's own busy timeout (see [`DAEMON_BUSY_TIMEOUT`]).
    busy_timeout: Duration,
    /// How long [`Store::retry_busy`] keeps trying.
    busy_patience: Duration,
    /// A shared store's listener for the changes of other machines (see [`Store::watch`]).
    listener: Mutex<Option<index::Listener>>,
    /// A `--read-only` daemon's hold of `STORE/cache-ro` (see [`Store::keep_fetched`]).
    read_only_cache: Option<File>,
}

/// What `STORE/synced` records. Each value is a claim that stays true once made: the blobs of
/// every row committed before its time (ns, taken before the sync it records) are on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    /// `T`: a `syncfs` started at `T` completed.
    Synced(i64),
    /// `clean T`: the daemon stopped cleanly after a final sync started at `T`. Nothing needs
    /// checking on the next start. An older artifactfs wrote a clean stop as `i64::MAX`, without
    /// its time: read as `Clean(0)`.
    Clean(i64),
    /// `every-close T`: a daemon with `--sync-every-close` started, after a sync started at
    /// `T`. It makes every blob durable — bytes and directory entries — before it writes the
    /// row, so no commit it makes ever needs checking: after its unclean stop, nothing does.
    EveryClose(i64),
}

impl Marker {
    const FILE: &'static str = "synced";
    /// The value `synced` held before its latest replacement.
    const PREVIOUS: &'static str = "synced.prev";

    fn parse(text: &str) -> Option<Marker> {
        // A torn write leaves a prefix: without its newline the value is not trusted.
        let line = text.strip_suffix('\n')?;
        let number = |s: &str| s.parse::<i64>().ok().filter(|t| *t >= 0);
        match line.split_once(' ') {
            None if line == i64::MAX.to_string() => Some(Marker::Clean(0)),
            None => number(line).map(Marker::Synced),
            Some(("clean", t)) => number(t).map(Marker::Clean),
            Some(("every-close", t)) => number(t).map(Marker::EveryClose),
            Some(_) => None,
        }
    }

    fn render(self) -> String {
        match self {
            Marker::Synced(t) => format!("{t}\n"),
            Marker::Clean(t) => format!("clean {t}\n"),
            Marker::EveryClose(t) => format!("every-close {t}\n"),
        }
    }

    /// The time before which every commit's blob is on disk.
    fn time(self) -> i64 {
        match self {
            Marker::Synced(t) | Marker::Clean(t) | Marker::EveryClose(t) => t,
        }
    }

    /// Reads `root/name`: `Ok(None)` when it is missing, `Err` with the reason when it cannot be
    /// read or makes no sense (torn, damaged).
    fn read(root: &Path, name: &str) -> io::Result<Option<Marker>> {
        match fs::read(root.join(name)) {
            Ok(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(Marker::parse)
                .map(Some)
                .ok_or_else(|| io::Error::other(format!("unreadable content {bytes:?}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// What the store's markers say, and whether that is the latest marker (`false`: it is the
    /// one before, because the latest is missing or unreadable).
    fn load(root: &Path) -> (Option<Marker>, bool) {
        let latest = Marker::read(root, Marker::FILE);
        if let Ok(Some(m)) = latest {
            return (Some(m), true);
        }
        let previous = Marker::read(root, Marker::PREVIOUS).unwrap_or_else(|e| {
            log::warn!("{}: {e}", root.join(Marker::PREVIOUS).display());
            None
        });
        match (&latest, previous) {
            (Err(e), Some(p)) => log::warn!(
                "{}: {e}; using the value it replaced, {p:?} ({})",
                root.join(Marker::FILE).display(),
                root.join(Marker::PREVIOUS).display()
            ),
            (Err(e), None) => log::warn!(
                "{}: {e}, and no earlier value: every file is checked",
                root.join(Marker::FILE).display()
            ),
            _ => {}
        }
        (previous, false)
    }

    /// Replaces `root/synced` by this value so that a crash or power loss at any moment leaves
    /// a complete value to read — this one, the one it replaces, or (while the two renames are
    /// under way) the replaced one as `synced.prev`: temp file, fsync, the current value moved
    /// to `synced.prev`, rename, fsync of the directory.
    fn write(self, root: &Path) -> io::Result<()> {
        let tmp = root.join("synced.tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(self.render().as_bytes())?;
        f.sync_all()?;
        drop(f);
        let latest = root.join(Marker::FILE);
        // Keep the replaced value, if it is a good one, as the fallback.
        if matches!(Marker::read(root, Marker::FILE), Ok(Some(_))) {
            fs::rename(&latest, root.join(Marker::PREVIOUS))?;
        }
        fs::rename(&tmp, &latest)?;
        File::open(root)?.sync_all()
    }
}

/// Where a store keeps its index and its blobs: by default inside the store directory (the
/// embedded store); a store that several machines share names a PostgreSQL index and a blob
/// directory that every machine mounts. The store directory stays each machine's own (its
/// lock, its log, its identity).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locations {
    /// `postgresql://…`; `None`: `STORE/index.sqlite`.
    pub index: Option<String>,
    /// A blob directory (`BLOBS/sha256/…`, temp files in `BLOBS/tmp/<machine>`); `None`:
    /// `STORE/blobs`.
    pub blobs: Option<PathBuf>,
    /// A bucket (`s3://BUCKET[/PREFIX]`, `gs://…`, `az://…`) instead of a blob directory; the
    /// machine's cache of it is `STORE/cache`.
    pub bucket: Option<String>,
}

/// The bound of a daemon's cache of a bucket (`--cache-size`), set once by the command line.
/// A `--read-only` daemon's cache of a bucket's content, in the store directory (see
/// [`Store::keep_fetched`]), and the file in it that says its last holder stopped cleanly.
const READ_ONLY_CACHE: &str = "cache-ro";
const READ_ONLY_CACHE_CLEAN: &str = "clean";
/// How long a read-only daemon waits for another to let go of that cache.
const READ_ONLY_CACHE_PATIENCE: Duration = Duration::from_secs(3);

static CACHE_SIZE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Sets the bound of the bucket cache of the store this process mounts (`--cache-size`).
pub fn set_cache_size(bytes: u64) {
    let _ = CACHE_SIZE.set(bytes);
}

/// `--upload-while-writing`, set once by the command line.
static UPLOAD_WHILE_WRITING: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Makes the daemon upload large files to the bucket while they are written
/// (`--upload-while-writing`).
pub fn set_upload_while_writing(on: bool) {
    UPLOAD_WHILE_WRITING.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The locations this process's command line gave (`--index`, `--blobs`): every store it
/// opens without locations of its own has them.
static GIVEN: std::sync::OnceLock<Locations> = std::sync::OnceLock::new();

/// The file of a store directory that remembers its [`Locations`] (without a password).
const LOCATIONS_FILE: &str = "shared";

impl Locations {
    /// The locations as given on the command line (`--index URL`, `--blobs file:///DIR`).
    pub fn parse(index: Option<&str>, blobs: Option<&str>) -> io::Result<Locations> {
        let index = match index {
            None => None,
            Some(u) if u.starts_with("postgresql://") || u.starts_with("postgres://") => {
                index::pg_url_checked(u)?;
                Some(u.to_owned())
            }
            Some(other) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "--index {}: expected postgresql://USER[:PASS]@HOST[:PORT]/DB (without                          --index, the index is STORE/index.sqlite)",
                        without_password(other)
                    ),
                ));
            }
        };
        let mut bucket = None;
        let blobs = match blobs {
            None => None,
            Some(b) if s3::is_bucket_url(b) => {
                bucket = Some(b.trim_end_matches('/').to_owned());
                None
            }
            Some(b) => {
                let path = b.strip_prefix("file://").unwrap_or(b);
                if !path.starts_with('/') {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "--blobs {b}: expected file:///ABSOLUTE/DIR or s3://BUCKET[/PREFIX]"
                        ),
                    ));
                }
                Some(PathBuf::from(path))
            }
        };
        if bucket.is_some() && index.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "--blobs s3://… needs a shared index as well (--index postgresql://…)",
            ));
        }
        Ok(Locations {
            index,
            blobs,
            bucket,
        })
    }

    /// Makes these the locations of every store this process opens without locations of its
    /// own (the command line's; once).
    pub fn set_for_process(self) {
        let _ = GIVEN.set(self);
    }

    /// Whether this is the embedded store's (everything in the store directory).
    pub fn is_embedded(&self) -> bool {
        self.index.is_none() && self.blobs.is_none() && self.bucket.is_none()
    }

    /// The locations for store `root`: those given, or those it was first mounted with (so
    /// that `ls`, `fsck`, `gc` need only `--store`). Giving others than it was mounted with is
    /// an error: one store directory belongs to one store.
    pub fn for_store(root: &Path, given: Locations) -> io::Result<Locations> {
        let given = match (given.is_embedded(), GIVEN.get()) {
            (true, Some(cli)) => cli.clone(),
            _ => given,
        };
        let saved = match fs::read_to_string(root.join(LOCATIONS_FILE)) {
            Ok(text) => Some(Self::from_file(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        match saved {
            None => Ok(given),
            Some(saved) if given.is_embedded() => Ok(saved),
            Some(saved) => {
                let same_index = saved.index.as_deref().map(without_password)
                    == given.index.as_deref().map(without_password);
                if same_index && saved.blobs == given.blobs && saved.bucket == given.bucket {
                    Ok(given) // (with its password, if it has one)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "store {} belongs to the shared store with index {} and blobs {};                              give those (or neither), or use another --store directory",
                            root.display(),
                            saved.index.as_deref().unwrap_or("STORE/index.sqlite"),
                            saved.bucket.clone().unwrap_or_else(|| saved
                                .blobs
                                .as_deref()
                                .map_or("STORE/blobs".into(), |b| b.display().to_string())),
                        ),
                    ))
                }
            }
        }
    }

    /// Remembers these locations in store `root` (nothing for the embedded store).
    fn save(&self, root: &Path) -> io::Result<()> {
        if self.is_embedded() {
            return Ok(());
        }
        let mut text = String::new();
        if let Some(i) = &self.index {
            text.push_str(&format!("index={}\n", without_password(i)));
        }
        if let Some(b) = &self.blobs {
            text.push_str(&format!("blobs={}\n", b.display()));
        }
        if let Some(b) = &self.bucket {
            text.push_str(&format!("blobs={b}\n"));
        }
        fs::write(root.join(LOCATIONS_FILE), text)
    }

    fn from_file(text: &str) -> Locations {
        let mut l = Locations::default();
        for line in text.lines() {
            if let Some(i) = line.strip_prefix("index=") {
                l.index = Some(i.to_owned());
            } else if let Some(b) = line.strip_prefix("blobs=") {
                if s3::is_bucket_url(b) {
                    l.bucket = Some(b.to_owned());
                } else {
                    l.blobs = Some(PathBuf::from(b));
                }
            }
        }
        l
    }
}

/// `url` without the password it may hold (`scheme://user:password@host` → `scheme://user@host`),
/// for messages and files.
pub fn without_password(url: &str) -> String {
    // A password may also be a query parameter (`?password=…`, libpq's `key=value` form).
    let url = match url.split_once('?') {
        Some((base, query)) => {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|kv| !kv.to_ascii_lowercase().starts_with("password="))
                .collect();
            if kept.is_empty() {
                base.to_owned()
            } else {
                format!("{base}?{}", kept.join("&"))
            }
        }
        None => url.to_owned(),
    };
    let url = url.as_str();
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[start..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!("{}{}{}", &url[..start], &rest[..colon], &rest[at..]),
        None => url.to_owned(),
    }
}

/// This machine's identity for a shared store, kept in `STORE/machine-id` (made on first use):
/// the daemons of one machine follow one another; another machine's are others.
fn machine_id(root: &Path) -> io::Result<String> {
    let path = root.join("machine-id");
    match fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    fs::write(&path, format!("{id}\n"))?;
    Ok(id)
}

/// How often batched durability syncs the store.
pub const SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl Store {
    /// Opens (creating on first use) a store for a writable daemon: takes the single-writer
    /// lock, creates or migrates the schema, drops unfinished writes and cleans `tmp/`.
    pub fn open_writable(root: &Path) -> io::Result<Store> {
        Self::open_writable_with(root, Durability::Batched)
    }

    pub fn open_writable_with(root: &Path, durability: Durability) -> io::Result<Store> {
        Self::open_writable_at(root, &Locations::default(), durability)
    }

    /// [`Store::open_writable_with`] of a store whose index and blobs may be elsewhere. A
    /// shared store (a PostgreSQL index) makes every blob durable before its row commits,
    /// whatever `durability` says: another machine may read the row at once.
    pub fn open_writable_at(
        root: &Path,
        locations: &Locations,
        durability: Durability,
    ) -> io::Result<Store> {
        create_store_dir(root)?;
        make_private(root);
        let locations = Locations::for_store(root, locations.clone())?;
        if !locations.is_embedded() && root.join("index.sqlite").exists() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "store {} holds an embedded store: a shared one needs a --store directory                      of its own (artifactfs migrate copies an embedded store into a shared one)",
                    root.display()
                ),
            ));
        }
        let lock = take_lock(root)?;
        locations.save(root)?;
        if let Some(url) = &locations.index {
            return Self::open_shared_writable(root, url, &locations, lock);
        }
        let blobs = match &locations.blobs {
            Some(dir) => BlobStore::open_at(
                dir,
                &dir.join("tmp").join(machine_id(root)?),
                durability == Durability::EveryClose,
            )?,
            None => BlobStore::open(root, durability == Durability::EveryClose)?,
        };
        let stale = blobs.clean_tmp()?;
        if stale > 0 {
            log::info!("removed {stale} stale temp file(s) of unfinished writes");
        }
        let owner = unsafe { (libc::geteuid(), libc::getegid()) };
        let index = Index::open(&root.join("index.sqlite"), owner, now_ns())?;
        index.no_auto_checkpoint()?;
        let checkpointer = Index::open_checkpointer(&root.join("index.sqlite"))?;
        let store = Store {
            root: root.to_path_buf(),
            blobs,
            index: Mutex::new(index),
            checkpointer: Some(Mutex::new(checkpointer)),
            _lock: Some(lock),
            last_sync: Mutex::new(std::time::Instant::now()),
            marking: Mutex::new(()),
            stopped: Default::default(),
            durability: Some(durability),
            busy_timeout: index::BUSY_TIMEOUT,
            busy_patience: BUSY_PATIENCE,
            listener: Default::default(),
            read_only_cache: None,
        };
        store.recover()?;
        store.sync()?;
        Ok(store)
    }

    /// The writable daemon's store with a PostgreSQL index (see [`Store::open_writable_at`]).
    fn open_shared_writable(
        root: &Path,
        url: &str,
        locations: &Locations,
        lock: File,
    ) -> io::Result<Store> {
        let machine = machine_id(root)?;
        let blobs_dir = locations
            .blobs
            .clone()
            .unwrap_or_else(|| root.join("blobs"));
        let blobs = match &locations.bucket {
            Some(url) => {
                // The cache is only known whole after a clean stop; then a start marks the
                // store as running, so that a crash from here on is seen as one.
                let trusted = matches!(Marker::load(root), (Some(Marker::Clean(_)), true));
                Marker::Synced(now_ns()).write(root)?;
                let limit = *CACHE_SIZE.get().unwrap_or(&s3::DEFAULT_CACHE_SIZE);
                let cache = s3::BlobCache::load(&root.join("cache"), limit, trusted)?;
                let mut blobs = BlobStore::open_remote(
                    &root.join("cache"),
                    &root.join("tmp"),
                    s3::Remote::open(url)?,
                    Some(cache),
                )?;
                blobs.set_upload_while_writing(
                    UPLOAD_WHILE_WRITING.load(std::sync::atomic::Ordering::Relaxed),
                );
                blobs
            }
            None => BlobStore::open_at(&blobs_dir, &blobs_dir.join("tmp").join(&machine), true)?,
        };
        let stale = blobs.clean_tmp()?;
        if stale > 0 {
            log::info!("removed {stale} stale temp file(s) of unfinished writes");
        }
        let owner = unsafe { (libc::geteuid(), libc::getegid()) };
        let index = Index::open_postgres(url, &machine, owner, now_ns())?;
        log::info!(
            "shared store: index {}, blobs {}, machine {machine}",
            without_password(url),
            locations
                .bucket
                .clone()
                .unwrap_or_else(|| blobs_dir.display().to_string())
        );
        Ok(Store {
            root: root.to_path_buf(),
            blobs,
            index: Mutex::new(index),
            checkpointer: None,
            _lock: Some(lock),
            last_sync: Mutex::new(std::time::Instant::now()),
            marking: Mutex::new(()),
            stopped: Default::default(),
            durability: Some(Durability::EveryClose),
            busy_timeout: index::BUSY_TIMEOUT,
            busy_patience: BUSY_PATIENCE,
            listener: Default::default(),
            read_only_cache: None,
        })
    }

    /// After an unclean stop: re-hashes the blobs of rows committed since the last completed
    /// sync and drops the rows whose bytes did not reach the disk (a power loss can take bytes
    /// that were never synced; a killed daemon cannot, so normally nothing is dropped).
    /// Returns how many files it re-hashed.
    fn recover(&self) -> io::Result<usize> {
        let marker = match Marker::load(&self.root) {
            (Some(Marker::Clean(_)), true) => {
                log::info!("the last stop was clean: nothing to check");
                return Ok(0);
            }
            (Some(Marker::EveryClose(_)), true) => {
                log::info!(
                    "unclean stop: re-hashed 0 file(s): the daemon ran with --sync-every-close, \
                     every committed file's blob was on disk before its row"
                );
                return Ok(0);
            }
            // A clean stop recorded before the latest marker says only that what came before
            // it is on disk.
            (m, _) => m,
        };
        let since = marker.map_or(0, Marker::time);
        // A margin for clocks: commits shortly before the recorded sync are checked too.
        let since = since.saturating_sub(5_000_000_000);
        let idx = self.index();
        let recent = idx.changed_since(since)?;
        let mut verdict: std::collections::HashMap<Hash, bool> = Default::default();
        let mut dropped = 0;
        for (ino, hash) in &recent {
            let ok = match verdict.get(hash) {
                Some(ok) => *ok,
                None => {
                    let ok = matches!(rehash_content(&idx, &self.blobs, hash), Ok(h) if h == *hash);
                    verdict.insert(*hash, ok);
                    ok
                }
            };
            if ok {
                continue;
            }
            if idx.hash_used_before(hash, since)? {
                log::error!(
                    "blob {hash} of /{} is damaged but older files use it too: run artifactfs fsck --verify",
                    idx.path_of(*ino)?.display()
                );
                continue;
            }
            log::warn!(
                "/{} was committed just before an unclean stop and its bytes did not reach the disk: dropped",
                idx.path_of(*ino)?.display()
            );
            idx.delete_row(*ino)?;
            dropped += 1;
        }
        for (hash, ok) in verdict {
            if !ok && !idx.hash_used_before(&hash, since)? {
                let _ = fs::remove_file(self.blobs.path(&hash));
            }
        }
        // (No marker and nothing committed: a new store.)
        if marker.is_some() || !recent.is_empty() {
            log::info!(
                "unclean stop: re-hashed {} file(s) committed since the last sync, dropped \
                 {dropped}",
                recent.len()
            );
        }
        Ok(recent.len())
    }

    /// Makes every blob and index row written so far durable (`syncfs` of the store's file
    /// system), then records when that was.
    pub fn sync(&self) -> io::Result<()> {
        self.sync_marking(false)
    }

    /// Syncs; `clean` records a clean stop instead of a sync.
    fn sync_marking(&self, clean: bool) -> io::Result<()> {
        let _one = self.marking.lock().unwrap_or_else(|p| p.into_inner());
        let started = now_ns();
        self.blobs.take_unsynced();
        let dir = File::open(&self.root)?;
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let marker = if clean {
            Marker::Clean(started)
        } else if self.durability == Some(Durability::EveryClose) {
            Marker::EveryClose(started)
        } else {
            Marker::Synced(started)
        };
        marker.write(&self.root)?;
        *self.last_sync.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
        Ok(())
    }

    /// A clean stop of a writable store: syncs and records that the next start need check
    /// nothing. Call it once nothing writes to the store any more (the daemon does after the
    /// session ended and the periodic work stopped); dropping the store does it otherwise.
    pub fn stop(&self) -> io::Result<()> {
        // No more changes to hand up: the mount is gone.
        drop(
            self.listener
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        if let Some(lock) = &self.read_only_cache
            && !self.stopped.swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            // What it fetched is on disk: the next read-only daemon trusts it.
            if unsafe { libc::syncfs(lock.as_raw_fd()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let dir = self.root.join(READ_ONLY_CACHE);
            File::create(dir.join(READ_ONLY_CACHE_CLEAN))?.sync_all()?;
            File::open(&dir)?.sync_all()?;
        }
        if self._lock.is_none() || self.stopped.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        // Files released since the last commit, and any whose release never came before the
        // unmount, are sealed for other daemons now (a restart would seal them too, but a
        // clean stop leaves nothing to recover).
        {
            let idx = self.index();
            idx.seal_all_committed()?;
            idx.end_session()?;
        }
        self.sync_marking(true)?;
        self.stopped
            .store(true, std::sync::atomic::Ordering::Release);
        log::info!(
            "clean stop recorded in {}",
            self.root.join(Marker::FILE).display()
        );
        Ok(())
    }

    /// Syncs if blobs were published without fsync and the last sync is `SYNC_INTERVAL` old.
    /// (Never with `--sync-every-close`: nothing is published without fsync, and the marker
    /// written at start already says that no commit needs checking.)
    pub fn sync_if_due(&self) -> io::Result<()> {
        let due = self
            .last_sync
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
            >= SYNC_INTERVAL;
        if due && self.blobs.take_unsynced() {
            self.sync()?;
        }
        Ok(())
    }

    /// Opens an existing store without the writer lock and without changing anything (for a
    /// read-only mount, `ls` and `fsck`). A store that was never created is an error.
    pub fn open_readonly(root: &Path) -> io::Result<Store> {
        Self::open_readonly_at(root, &Locations::default())
    }

    /// [`Store::open_readonly`] of a store whose index and blobs may be elsewhere.
    pub fn open_readonly_at(root: &Path, locations: &Locations) -> io::Result<Store> {
        check_access(root)?;
        let (index, blobs) = Self::open_parts(root, locations, Index::open_readonly)?;
        Ok(Store {
            root: root.to_path_buf(),
            blobs,
            index: Mutex::new(index),
            checkpointer: None,
            _lock: None,
            last_sync: Mutex::new(std::time::Instant::now()),
            marking: Mutex::new(()),
            stopped: Default::default(),
            durability: None,
            busy_timeout: index::BUSY_TIMEOUT,
            busy_patience: BUSY_PATIENCE,
            listener: Default::default(),
            read_only_cache: None,
        })
    }

    /// On a store whose blobs are in a bucket, a `--read-only` daemon keeps what it fetches in
    /// `STORE/cache-ro`, bounded like a writable daemon's cache (`--cache-size`), when no other
    /// read-only daemon of this store holds that directory (a lock file in it); otherwise it
    /// keeps nothing, and every open of content not kept fetches it again (into an unlinked
    /// temp file in the system's temp directory, as commands do). A writable daemon's cache is its own (`STORE/cache`): it evicts by what
    /// it opens itself. What the directory holds after a stop that was not clean is re-hashed
    /// the first time it is opened, as in a writable daemon's cache. Returns whether it keeps.
    pub fn keep_fetched(&mut self) -> io::Result<bool> {
        if self.blobs.remote().is_none() || self._lock.is_some() {
            return Ok(false);
        }
        let dir = self.root.join(READ_ONLY_CACHE);
        create_store_dir(&dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join("lock"))?;
        // (The read-only daemon of this store stopped a moment ago may still be finishing:
        // `unmount` does not wait for read-only daemons.)
        let since = Instant::now();
        while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            if since.elapsed() >= READ_ONLY_CACHE_PATIENCE {
                log::info!(
                    "{} is another read-only daemon's: this one keeps nothing it fetches",
                    dir.display()
                );
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Trusted only after a clean stop; the mark goes until the next one.
        let clean = dir.join(READ_ONLY_CACHE_CLEAN);
        let trusted = clean.exists();
        if trusted {
            fs::remove_file(&clean)?;
            File::open(&dir)?.sync_all()?;
        }
        let limit = *CACHE_SIZE.get().unwrap_or(&s3::DEFAULT_CACHE_SIZE);
        let cache = s3::BlobCache::load(&dir, limit, trusted)?;
        let Some(blobs) = self.blobs.with_cache(&dir, &dir.join("tmp"), cache)? else {
            return Ok(false);
        };
        blobs.clean_tmp()?;
        self.blobs = blobs;
        self.read_only_cache = Some(lock);
        Ok(true)
    }

    /// Opens an existing store to change its index and blobs beside a running daemon, without
    /// the writer lock (`gc`, and `fsck` marking damaged blobs: both coordinate through
    /// SQLite's own locking).
    pub fn open_shared(root: &Path) -> io::Result<Store> {
        Self::open_shared_at(root, &Locations::default())
    }

    /// [`Store::open_shared`] of a store whose index and blobs may be elsewhere.
    pub fn open_shared_at(root: &Path, locations: &Locations) -> io::Result<Store> {
        check_access(root)?;
        let (index, blobs) = Self::open_parts(root, locations, Index::open_shared)?;
        Ok(Store {
            root: root.to_path_buf(),
            blobs,
            index: Mutex::new(index),
            checkpointer: None,
            _lock: None,
            last_sync: Mutex::new(std::time::Instant::now()),
            marking: Mutex::new(()),
            stopped: Default::default(),
            durability: None,
            busy_timeout: index::BUSY_TIMEOUT,
            busy_patience: BUSY_PATIENCE,
            listener: Default::default(),
            read_only_cache: None,
        })
    }

    /// The index and blobs of an existing store for a command: the embedded index opened by
    /// `embedded`, or a PostgreSQL index as a client.
    fn open_parts(
        root: &Path,
        locations: &Locations,
        embedded: fn(&Path) -> io::Result<Index>,
    ) -> io::Result<(Index, BlobStore)> {
        let locations = Locations::for_store(root, locations.clone())?;
        let index = match &locations.index {
            Some(url) => Index::open_postgres_client(url)?,
            None => embedded(&root.join("index.sqlite"))?,
        };
        let blobs = match (&locations.bucket, &locations.blobs) {
            // A command keeps nothing it fetches: its temp files are the system's.
            (Some(url), _) => BlobStore::remote_client(s3::Remote::open(url)?),
            (None, Some(dir)) => BlobStore::existing_at(dir, &dir.join("tmp").join("none")),
            (None, None) => BlobStore::open_existing(root),
        };
        Ok((index, blobs))
    }

    /// On a shared store, hands every change of its index that any machine commits to `sink`,
    /// from a thread of its own that listens to PostgreSQL's notifications, until the store
    /// stops (see [`index::Listener`]). Returns whether it listens (not on an embedded store).
    pub fn watch(&self, sink: ChangeSink) -> io::Result<bool> {
        let listener = self.index().listen(sink)?;
        let listening = listener.is_some();
        *self.listener.lock().unwrap_or_else(|p| p.into_inner()) = listener;
        Ok(listening)
    }

    /// Whether daemons of other machines write this store too (a PostgreSQL index).
    pub fn is_shared(&self) -> bool {
        self.index().is_shared()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Moves committed index pages from the WAL into the database file, mostly off the path of
    /// any request; called periodically by the daemon.
    ///
    /// The second connection copies (and fsyncs) without holding the index, so commits go on
    /// meanwhile. The WAL can only start over from its beginning when a checkpoint has caught
    /// up with every commit, which under steady writing never happens by itself; so once the
    /// WAL is long, the few pages committed during the copy are checkpointed again with the
    /// index held (one short stall instead of a WAL that grows for as long as writing goes on).
    pub fn checkpoint(&self) -> io::Result<()> {
        let Some(c) = &self.checkpointer else {
            return Ok(());
        };
        let frames = c.lock().unwrap_or_else(|p| p.into_inner()).checkpoint()?;
        if frames >= WAL_RESTART_FRAMES {
            self.index().checkpoint()?;
            log::debug!("index WAL of {frames} frames checkpointed; it starts over");
        }
        Ok(())
    }

    /// Runs `f` on the index until it does not fail with [`index::IndexBusy`] (another process
    /// holds SQLite's write lock: `gc`, `fsck`), for up to [`BUSY_PATIENCE`]. Each attempt
    /// fails at once instead of waiting inside SQLite, and between attempts the index mutex is
    /// released, so the mount's other requests are served while this one waits. `f` must
    /// change nothing when it fails busy (one statement, or one transaction), so it can be run
    /// again. A wait of over a second is logged, naming `what`.
    pub fn retry_busy<T>(
        &self,
        what: impl FnOnce() -> String,
        mut f: impl FnMut(&Index) -> io::Result<T>,
    ) -> io::Result<T> {
        self.retry_while_busy(what, index::is_busy, || {
            let idx = self.index();
            idx.set_busy_timeout(Duration::ZERO)?;
            let result = f(&idx);
            idx.set_busy_timeout(self.busy_timeout)?;
            result
        })
    }

    /// Runs `f` again while it fails because the index was busy (`busy` says which errors
    /// those are), pausing between attempts (1 ms, doubling up to 10 ms), for up to
    /// [`BUSY_PATIENCE`]; then the busy error is returned. `f` takes and releases the index
    /// itself. A wait of over a second is logged, naming `what`.
    pub fn retry_while_busy<T, E>(
        &self,
        what: impl FnOnce() -> String,
        busy: impl Fn(&E) -> bool,
        mut f: impl FnMut() -> Result<T, E>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        let mut attempts = 1u32;
        loop {
            let result = f();
            let waited = started.elapsed();
            match result {
                Err(e) if busy(&e) && waited < self.busy_patience => {
                    attempts += 1;
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(BUSY_BACKOFF_MAX);
                }
                Err(e) if busy(&e) => {
                    log::warn!(
                        "{}: the index stayed locked by another process for {:.1} s ({attempts} \
                         attempts); giving up",
                        what(),
                        waited.as_secs_f64()
                    );
                    return Err(e);
                }
                result => {
                    if waited >= Duration::from_secs(1) {
                        log::info!(
                            "{}: waited {:.1} s for the index, locked by another process",
                            what(),
                            waited.as_secs_f64()
                        );
                    }
                    return result;
                }
            }
        }
    }

    /// How long a statement waits inside SQLite for another process's write lock, holding the
    /// index mutex meanwhile (default [`index::BUSY_TIMEOUT`]; the mount's daemon, whose
    /// requests all need that mutex, uses [`DAEMON_BUSY_TIMEOUT`] and retries).
    pub fn set_busy_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.index().set_busy_timeout(timeout)?;
        self.busy_timeout = timeout;
        Ok(())
    }

    /// The index connection's own busy timeout (see [`Store::set_busy_timeout`]).
    pub fn busy_timeout(&self) -> Duration {
        self.busy_timeout
    }

    /// How long [`Store::retry_busy`] keeps trying (tests shorten it).
    pub fn set_busy_patience(&mut self, patience: Duration) {
        self.busy_patience = patience;
    }

    /// Opens content `hash` of `size` bytes (see [`open_content`]).
    /// The index is not held while a blob is opened (fetching one from a bucket takes time).
    /// Content of more than one piece that a bucket holds and the cache does not, and whose
    /// piece states the index has, is served as its pieces arrive ([`Content::Arriving`]).
    pub fn open_content(&self, hash: &Hash, size: u64) -> io::Result<Content> {
        self.open_content_as(hash, size, true)
    }

    /// Opens content `hash` of `size` bytes whole: fetched and verified before this returns,
    /// never [`Content::Arriving`]. For the handles that compare writes with it, whose
    /// requests hold the handle while they compare, and should not wait there for pieces.
    pub fn open_content_whole(&self, hash: &Hash, size: u64) -> io::Result<Content> {
        self.open_content_as(hash, size, false)
    }

    fn open_content_as(&self, hash: &Hash, size: u64, as_it_arrives: bool) -> io::Result<Content> {
        let arriving = as_it_arrives && self.blobs.remote().is_some() && size > pieces::PIECE;
        // (A statement of its own: the guard is dropped before the blob is opened.)
        let (inline, states) = {
            let idx = self.index();
            let states = match arriving && !self.blobs.cached(hash) {
                true => idx.pieces_get(hash)?,
                false => None,
            };
            (inline_content(&idx, hash, size)?, states)
        };
        if let Some(content) = inline {
            return Ok(content);
        }
        let check = states
            .filter(|(piece, _)| *piece == pieces::PIECE)
            .and_then(|(_, states)| pieces::PieceCheck::new(*hash, size, states));
        if let Some(check) = check {
            match self.blobs.open_arriving(hash, check) {
                Ok(a) => return Ok(Content::Arriving(a)),
                Err(e) => log::warn!("content {hash}: {e}; fetched whole before it is read"),
            }
        }
        Ok(Content::Blob(self.blobs.open_shared(hash)?))
    }

    /// Records the piece states of content `hash` of `size` bytes (see [`pieces`]) when its
    /// blob is in a bucket and it has more than one piece: a reader on another machine is
    /// then served each piece once it arrived and was checked.
    pub fn keep_pieces(&self, hash: &Hash, size: u64, states: &[u8]) -> io::Result<()> {
        if self.blobs.remote().is_none() || size <= pieces::PIECE {
            return Ok(());
        }
        self.retry_busy(
            || format!("piece states of content {hash}"),
            |idx| idx.pieces_put(hash, pieces::PIECE, states),
        )
    }

    /// Records small content (up to [`INLINE_MAX`]) and file `ino`'s row in one index
    /// transaction (see [`Index::commit_file_with`]), waiting out other processes' locks like
    /// every commit ([`Store::retry_busy`]). The periodic sync is then due for it, as for a
    /// blob published without fsync. `session` is the one the writer began in (see
    /// [`Index::check_writer_session`]).
    pub fn commit_inline(
        &self,
        ino: u64,
        hash: &Hash,
        size: u64,
        mtime: i64,
        bytes: &[u8],
        session: i64,
    ) -> io::Result<index::Commit> {
        let recorded = self.retry_busy(
            || format!("commit of inode {ino}"),
            |idx| {
                idx.check_writer_session(session)?;
                let stored = index::Stored::Inline { bytes };
                idx.commit_file_with(ino, hash, size, mtime, now_ns(), stored)
            },
        )?;
        self.blobs.mark_unsynced();
        Ok(recorded)
    }

    /// The index, locked. Keep the guard short: every file-system operation goes through it.
    pub fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Free space of the file system holding the store, as `statvfs` reports it.
    pub fn statvfs(&self) -> io::Result<libc::statvfs> {
        let c = std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut st = unsafe { std::mem::zeroed::<libc::statvfs>() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }
}

impl Drop for Store {
    /// A clean stop of a writable store: sync, and say so, so the next start checks nothing.
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("final sync of {} failed: {e}", self.root.display());
        }
    }
}

/// Makes a store directory made beforehand private if it is this user's (at a writable open):
/// its index holds the bytes of every small file, which only the mount's mode bits may give
/// out (`mkdir /var/lib/artifactfs` before the first mount leaves it 0755). One of another
/// owner (a group's directory) is left as it is, with a warning.
fn make_private(root: &Path) {
    let Ok(meta) = fs::metadata(root) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return;
    }
    let private = mode & 0o7700;
    let mine = std::os::unix::fs::MetadataExt::uid(&meta) == unsafe { libc::geteuid() };
    let made = if mine {
        fs::set_permissions(root, fs::Permissions::from_mode(private))
    } else {
        Err(io::Error::other("it is another user's"))
    };
    match made {
        Ok(()) => log::info!(
            "store {}: mode {mode:o} made {private:o}: other users could read its index, which \
             holds the bytes of small files",
            root.display()
        ),
        Err(e) => log::warn!(
            "store {} is open to other users (mode {mode:o}) and cannot be made private ({e}): \
             they can read its index, which holds the bytes of small files",
            root.display()
        ),
    }
}

/// Creates the store directory (mode 0700) if it does not exist yet.
pub fn create_store_dir(root: &Path) -> io::Result<()> {
    if root.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create store {}: {e}", root.display()),
            )
        })
}

/// How long taking the writer lock keeps trying before it reports the holder. A process that
/// held the lock and let it go (a command, a daemon just stopped) may still share it for a
/// moment with a child it forked, until that child calls `exec` (a `flock` belongs to the open
/// file, which a fork shares).
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// Takes the exclusive writer lock `STORE/lock` (flock), recording our pid in it.
fn take_lock(root: &Path) -> io::Result<File> {
    let path = root.join("lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)?;
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0
        && io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "store {} is already mounted writable by another artifactfs daemon (pid {}); \
                     unmount it first, or mount this one with --read-only",
                    root.display(),
                    pid.trim()
                ),
            ));
        }
        return Err(err);
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Waits until no daemon holds the writer lock of `root` (used by `unmount`), up to `timeout`.
pub fn wait_unlocked(root: &Path, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let Ok(file) = File::open(root.join("lock")) else {
        return true;
    };
    loop {
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Test helper: a committed file `runs/<name>` holding `bytes`.
#[cfg(test)]
pub(crate) fn committed_test_file(store: &Store, name: &[u8], bytes: &[u8]) -> u64 {
    store.blobs.publish_bytes(bytes, &Hash::of(bytes)).unwrap();
    test_file_with(store, name, bytes, index::Stored::Blob(&|| true))
}

/// Test helper: a committed file `runs/<name>` whose content `bytes` the index holds.
#[cfg(test)]
pub(crate) fn inline_test_file(store: &Store, name: &[u8], bytes: &[u8]) -> u64 {
    let stored = index::Stored::Inline { bytes };
    test_file_with(store, name, bytes, stored)
}

#[cfg(test)]
fn test_file_with(store: &Store, name: &[u8], bytes: &[u8], stored: index::Stored) -> u64 {
    use index::{Commit, NewEntry, RUNS_INO};
    let idx = store.index();
    let ino = idx
        .insert(&NewEntry::new_file(RUNS_INO, name, 2, 0o644, (0, 0), 1))
        .unwrap()
        .unwrap();
    let c = idx
        .commit_file_with(
            ino,
            &Hash::of(bytes),
            bytes.len() as u64,
            1,
            now_ns(),
            stored,
        )
        .unwrap();
    assert_eq!(c, Commit::Recorded);
    ino
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store directory made beforehand by hand (`mkdir`, mode 0755) becomes private at the
    /// first open: its index holds the bytes of small files.
    #[test]
    fn a_store_directory_made_beforehand_becomes_private() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o2755)).unwrap();
        drop(Store::open_writable(&root).unwrap());
        let mode = fs::metadata(&root).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o2700, "{mode:o}");
        let new = dir.path().join("new");
        create_store_dir(&new).unwrap();
        let mode = fs::metadata(&new).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }

    #[test]
    fn hash_hex_round_trips() {
        let h = Hash::of(b"abc");
        assert_eq!(
            h.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Hash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(Hash::from_hex("zz"), None);
    }

    #[test]
    fn after_an_unclean_stop_rows_whose_bytes_were_lost_are_dropped() {
        use index::RUNS_INO;
        let dir = tempfile::tempdir().unwrap();
        let (kept, lost) = (Hash::of(b"kept"), Hash::of(b"lost"));
        {
            let store = Store::open_writable(dir.path()).unwrap();
            committed_test_file(&store, b"a", b"kept");
            committed_test_file(&store, b"b", b"lost");
        }
        // As if the machine lost power: the last sync was long ago, one blob never made it.
        fs::write(dir.path().join("synced"), "1\n").unwrap();
        fs::remove_file(
            dir.path()
                .join("blobs/sha256")
                .join(&lost.to_hex()[..2])
                .join(&lost.to_hex()[2..]),
        )
        .unwrap();
        let store = Store::open_writable(dir.path()).unwrap();
        let idx = store.index();
        assert_eq!(
            idx.lookup(RUNS_INO, b"a").unwrap().unwrap().hash,
            Some(kept)
        );
        assert!(idx.lookup(RUNS_INO, b"b").unwrap().is_none());
    }

    #[test]
    fn a_clean_stop_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let before = now_ns();
        drop(Store::open_writable(dir.path()).unwrap());
        let synced = fs::read_to_string(dir.path().join("synced")).unwrap();
        let at: i64 = synced
            .strip_prefix("clean ")
            .and_then(|t| t.strip_suffix('\n'))
            .unwrap_or_else(|| panic!("{synced:?}"))
            .parse()
            .unwrap();
        assert!(at >= before, "{synced:?}");
        // The value it replaced (the start's sync) is kept as the fallback.
        let prev = Marker::read(dir.path(), Marker::PREVIOUS).unwrap().unwrap();
        assert!(
            matches!(prev, Marker::Synced(t) if t >= before && t <= at),
            "{prev:?}"
        );
        assert!(!dir.path().join("synced.tmp").exists());
    }

    #[test]
    fn markers_parse_only_when_complete() {
        assert_eq!(Marker::parse("123\n"), Some(Marker::Synced(123)));
        assert_eq!(Marker::parse("clean 7\n"), Some(Marker::Clean(7)));
        assert_eq!(
            Marker::parse(&format!("{}\n", i64::MAX)),
            Some(Marker::Clean(0))
        );
        for torn in [
            "", "12", "clean 7", "clean \n", "clean\n", "x\n", "-5\n", "1 2\n",
        ] {
            assert_eq!(Marker::parse(torn), None, "{torn:?}");
        }
        assert_eq!(
            Marker::parse("every-close 8\n"),
            Some(Marker::EveryClose(8))
        );
        assert_eq!(Marker::parse("every-close 8"), None);
        for m in [Marker::Synced(5), Marker::Clean(6), Marker::EveryClose(7)] {
            assert_eq!(Marker::parse(&m.render()), Some(m));
        }
    }

    /// A marker torn by a power loss (written by an artifactfs before markers were fsync'd) or
    /// otherwise damaged does not make the next start re-hash the whole store: the value it
    /// replaced is used.
    #[test]
    fn a_torn_marker_falls_back_to_the_value_it_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_writable(dir.path()).unwrap();
        for name in [&b"a"[..], b"b", b"c"] {
            committed_test_file(&store, name, name);
        }
        // All three were synced a minute from now (beyond the clock margin)...
        let later = now_ns() + 60_000_000_000;
        fs::write(dir.path().join("synced.prev"), format!("{later}\n")).unwrap();
        // ...and the marker that replaced it is torn: a prefix of a number, empty, or garbage.
        for torn in ["17", "", "\0\0\0\0", "clean 17"] {
            fs::write(dir.path().join("synced"), torn).unwrap();
            assert_eq!(store.recover().unwrap(), 0, "marker {torn:?}");
        }
        // Without the fallback, every file is checked (and nothing is lost).
        fs::remove_file(dir.path().join("synced.prev")).unwrap();
        assert_eq!(store.recover().unwrap(), 3);
        // A stop between the two renames leaves only synced.prev.
        fs::remove_file(dir.path().join("synced")).unwrap();
        fs::write(dir.path().join("synced.prev"), format!("{later}\n")).unwrap();
        assert_eq!(store.recover().unwrap(), 0);
        // An older clean stop is no fallback for rows committed after it.
        fs::write(dir.path().join("synced"), "").unwrap();
        fs::write(dir.path().join("synced.prev"), "clean 1\n").unwrap();
        assert_eq!(store.recover().unwrap(), 3);
    }

    /// With `--sync-every-close` the marker says so from the start, and an unclean stop then
    /// re-hashes nothing; a fallback to such a marker vouches only for what came before it.
    #[test]
    fn after_an_unclean_stop_with_sync_every_close_nothing_is_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_writable_with(dir.path(), Durability::EveryClose).unwrap();
        let start = Marker::read(dir.path(), Marker::FILE).unwrap().unwrap();
        assert!(matches!(start, Marker::EveryClose(_)), "{start:?}");
        for name in [&b"a"[..], b"b", b"c"] {
            committed_test_file(&store, name, name);
        }
        // The periodic work has nothing to sync and leaves the marker alone.
        *store.last_sync.lock().unwrap() -= SYNC_INTERVAL;
        store.sync_if_due().unwrap();
        assert_eq!(Marker::read(dir.path(), Marker::FILE).unwrap(), Some(start));
        // As after a kill: the start's marker is the latest.
        assert_eq!(store.recover().unwrap(), 0);
        // Torn, it falls back to the one before, which vouches for nothing committed since.
        fs::rename(dir.path().join("synced"), dir.path().join("synced.prev")).unwrap();
        fs::write(dir.path().join("synced"), "every-cl").unwrap();
        assert_eq!(store.recover().unwrap(), 3);
    }

    #[test]
    fn syncs_replace_the_marker_and_keep_the_value_before() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_writable(dir.path()).unwrap();
        let first = Marker::read(dir.path(), Marker::FILE).unwrap().unwrap();
        store.sync().unwrap();
        let second = Marker::read(dir.path(), Marker::FILE).unwrap().unwrap();
        assert!(second.time() >= first.time());
        assert_eq!(
            Marker::read(dir.path(), Marker::PREVIOUS).unwrap(),
            Some(first)
        );
        // A damaged marker is not kept as the fallback.
        fs::write(dir.path().join("synced"), "12").unwrap();
        store.sync().unwrap();
        assert_eq!(
            Marker::read(dir.path(), Marker::PREVIOUS).unwrap(),
            Some(first)
        );
    }

    #[test]
    fn second_writer_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open_writable(dir.path()).unwrap();
        let err = match Store::open_writable(dir.path()) {
            Err(e) => e,
            Ok(_) => panic!("second writable open succeeded"),
        };
        assert!(
            err.to_string().contains("already mounted writable"),
            "{err}"
        );
        assert!(Store::open_readonly(dir.path()).is_ok());
    }

    #[test]
    fn urls_are_shown_without_their_password() {
        for (url, shown) in [
            ("postgresql://ml:s3cret@db/a", "postgresql://ml@db/a"),
            (
                "postgresql://ml@db/a?password=s3cret",
                "postgresql://ml@db/a",
            ),
            (
                "postgresql://ml@db/a?sslmode=require&Password=s3cret&x=1",
                "postgresql://ml@db/a?sslmode=require&x=1",
            ),
            ("postgresql://db/a", "postgresql://db/a"),
        ] {
            assert_eq!(without_password(url), shown);
        }
    }

    /// A store closed while a child forked meanwhile still shares its lock (the child has not
    /// reached `exec` yet): the next writer waits for that moment instead of being refused.
    #[test]
    fn a_lock_shared_with_a_child_for_a_moment_is_waited_for() {
        use std::os::unix::io::FromRawFd;
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open_writable(dir.path()).unwrap();
        // What fork does to the lock file's descriptor: another one of the same open file.
        let fd = first._lock.as_ref().unwrap().as_raw_fd();
        let shared = unsafe { File::from_raw_fd(libc::dup(fd)) };
        drop(first);
        let child = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(shared); // exec closes it
        });
        let t = std::time::Instant::now();
        let second = Store::open_writable(dir.path());
        assert!(second.is_ok(), "{:?}", second.err());
        assert!(t.elapsed() >= std::time::Duration::from_millis(250));
        child.join().unwrap();
    }
}
