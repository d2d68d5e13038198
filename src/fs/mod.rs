//! The file-system logic: inodes, open handles and the write-once state machine.
//!
//! Every operation of the mount is a method here that takes plain values and returns plain
//! values or a [`FsError`]; nothing in this module knows about FUSE, so it is tested without a
//! kernel. The adapter in `fuse.rs` only translates.
//!
//! A regular file goes through three states:
//! 1. **writing** — created by `create`; its bytes are kept in memory while small and in a temp
//!    file in the store when large (`body`), hashed as they arrive when the writes are
//!    sequential (`hashing`). No other handle may open it (`Busy`).
//! 2. **committed** — at each `flush` (every `close()` of a descriptor) with new bytes, and at
//!    `fsync`, the content is hashed, published as a blob and recorded in the index, so
//!    `close()` returns only after that, and reports a failure. More writes through the same
//!    open file (a shell redirect flushes before it writes; a forked child closes its copy
//!    first) simply commit again; nobody else can have seen the earlier content. Until then
//!    the index says "being written", so a crash does not leave the earlier version visible.
//! 3. **sealed** — when the last reference is released. From then on the content never changes:
//!    writing, truncating or replacing it is refused, which lets the kernel cache it for long.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{FsError, FsResult, Refusal};
use crate::namespace::{self, Place, Zone};
use crate::store::index::{
    Commit, Entry, Index, Kind, MODELS_INO, MetaChange, NewEntry, ROOT_INO, State,
};
use crate::store::s3::Streaming;
use crate::store::{Content, Hash, INLINE_MAX, Store, now_ns, to_ns};

mod access;
mod body;
mod hashing;
mod models;
mod rewrite;
pub use models::{
    VIRT_BASE, XATTR_DIGEST, XATTR_MESSAGE, XATTR_REGISTER_PREFIX, XATTR_STATUS, XATTR_VERSION,
};

/// The extended attribute that carries a sealed file's content hash.
pub const XATTR_SHA256: &str = "user.artifactfs.sha256";

/// `readdir` cookies from here on are registry links (index inode numbers stay below).
const LINK_COOKIE: u64 = 1 << 60;

/// Commits that re-hash more than this run on the adapter's commit pool.
const HEAVY_COMMIT: u64 = 64 << 20;

/// How long `open` of a file being written waits for its release before answering `Busy`.
const RELEASE_GRACE: Duration = Duration::from_millis(500);

/// Waits up to [`RELEASE_GRACE`] (a release the kernel sent without waiting may be on its
/// way) for `done`; whether it came.
pub fn wait_a_release(mut done: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + RELEASE_GRACE;
    while !done() {
        if std::time::Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// How long a further write of a request whose row already went in waits for a busy index
/// (see `ArtifactFs::after_insert`).
const AFTER_INSERT_PATIENCE: Duration = Duration::from_secs(5);

/// Mount-wide behaviour chosen on the command line.
#[derive(Debug, Clone)]
pub struct FsOptions {
    pub read_only: bool,
    /// The store is shared: daemons of other machines write it too (a PostgreSQL index).
    pub shared_store: bool,
    /// Report (and record for new entries) this owner instead of the caller's.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// How long a model must be quiet before its pending versions are validated.
    pub settle: Duration,
    /// File names that may be replaced with other content (the one exception to write-once:
    /// MLflow's reader-side `registered_model_meta`); earlier contents are kept as history.
    pub rewritable: Vec<Vec<u8>>,
    /// Fault injection for tests (`ARTIFACTFS_FAULT_PANIC_ON`): a lookup of this name panics,
    /// so the suite can prove that a panicking request neither hangs nor kills the mount.
    pub panic_on_lookup: Option<Vec<u8>>,
    /// The largest file a write or truncate may make (`FileTooBig` beyond): a commit hashes
    /// every byte, holes included, so one sparse byte at 8 TiB would cost hours.
    pub max_file_size: u64,
}

/// The file MLflow's models repository writes into a model's directory on every load
/// (`model_name`/`model_version` of the URI it was loaded by): rewritable by default.
pub const DEFAULT_REWRITABLE: &str = "registered_model_meta";

/// The default `--max-file-size`: 1 TiB, above the single files ML frameworks write
/// (checkpoint shards are GBs to tens of GBs) and about ten minutes of hashing.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 1 << 40;

impl FsOptions {
    /// Other daemons change the store too: this is a read-only mount beside the writing
    /// daemon, or one of the daemons of a shared store. Nothing another daemon may change is
    /// cached by the kernel for long, and a file committed but still open elsewhere reads as
    /// being written.
    pub fn beside_others(&self) -> bool {
        self.read_only || self.shared_store
    }
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            read_only: false,
            shared_store: false,
            uid: None,
            gid: None,
            settle: Duration::from_secs(2),
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            panic_on_lookup: None,
            rewritable: vec![DEFAULT_REWRITABLE.as_bytes().to_vec()],
        }
    }
}

/// What an entry is, as `stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    File,
    /// A registry link in `models/<name>/` (`3`, `latest`, `@alias`).
    Symlink,
}

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// The calling process (0: this process; [`UNKNOWN_PID`]: one this process cannot see),
    /// for the permission checks of `access`.
    pub pid: u32,
}

/// The `pid` of a [`Caller`] whose process the daemon cannot see: the kernel sends pid 0 for
/// a process outside the daemon's pid namespace (a daemon in a container, callers on the
/// host), which must not be taken for the daemon itself.
pub const UNKNOWN_PID: u32 = u32::MAX;

impl Caller {
    /// The caller of a request as the kernel describes it (its pid 0: [`UNKNOWN_PID`]).
    pub fn of_request(uid: u32, gid: u32, pid: u32) -> Caller {
        Caller {
            uid,
            gid,
            pid: if pid == 0 { UNKNOWN_PID } else { pid },
        }
    }
}

/// Attributes of an entry, as `stat` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    /// See [`Entry::generation`]; with `ino`, what the kernel knows the inode by
    /// ([`Attr::node`]).
    pub generation: u32,
    pub kind: NodeKind,
    pub size: u64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    /// As `utimens` set it last (or the creation time): reads do not change it.
    pub atime: SystemTime,
    pub ctime: SystemTime,
    pub crtime: SystemTime,
    /// 1, or 0 for a file removed while open (what `fstat` of its descriptor shows).
    pub nlink: u32,
    /// Content and size can never change again: safe to cache for long.
    pub sealed: bool,
    /// A directory whose entries and attributes change only through this mount (`runs/` and
    /// below), never by the daemon itself, or a file this daemon is writing: the kernel's own
    /// invalidation keeps its cache true.
    pub stable: bool,
}

/// Bits of a kernel inode number below the generation: the index's inode numbers stay below
/// 2^40 (it hands them out one by one; a trillion), and generations count modulo 2^16 in the
/// bits above, below [`models::VIRT_BASE`]'s numbers (which have none).
const NODE_GENERATION_SHIFT: u32 = 40;

impl Attr {
    /// The number the kernel knows this inode by: its inode number with its generation. A
    /// directory made again where one was removed, or a file created again at its tombstone,
    /// keeps its row and inode number, but is a new inode for the kernel, which may still
    /// hold the old, dead one for a process inside the removed directory or a descriptor of
    /// the removed file (and would otherwise take the new entry for it).
    pub fn node(&self) -> u64 {
        node_of(self.ino, self.generation)
    }
}

/// The kernel's number for inode `ino` of generation `generation` (see [`Attr::node`]).
pub fn node_of(ino: u64, generation: u32) -> u64 {
    if ino >= models::VIRT_BASE {
        return ino;
    }
    ino | u64::from(generation & 0xffff) << NODE_GENERATION_SHIFT
}

/// The inode number of the kernel's number `node` (see [`Attr::node`]).
pub fn ino_of_node(node: u64) -> u64 {
    if node >= models::VIRT_BASE {
        return node;
    }
    node & ((1 << NODE_GENERATION_SHIFT) - 1)
}

/// A time given to `utimens` (`UTIME_OMIT` is no `SetTime` at all).
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    Now,
    At(SystemTime),
}

/// What `setattr` may change.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub mtime: Option<SetTime>,
    pub atime: Option<SetTime>,
    /// The open file the change comes through (`ftruncate`, `futimens`); `None` for a change by
    /// path (`truncate`, `chmod`). Only the handle writing a file may change its size.
    pub fh: Option<u64>,
}

/// What a lookup found.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Attr),
    /// No such name; `cacheable`: it stays absent until this mount creates it.
    Absent {
        cacheable: bool,
    },
}

/// One directory entry for `readdir`; `cookie` is the offset to continue after it.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub cookie: u64,
    pub name: Vec<u8>,
    pub attr: Attr,
}

/// How an opened file may be cached by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// A sealed file of this size: its pages may be kept across opens, unless it has a
    /// rewritable name (`cache: false`), whose content may change on the same inode.
    Sealed { size: u64, cache: bool },
    /// A file being written by this handle.
    Writing,
}

/// `statfs` figures.
#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub frsize: u32,
    pub namelen: u32,
}

/// The state of a file being written through one open handle.
struct Writer {
    ino: u64,
    /// The bytes so far.
    body: body::Body,
    hasher: hashing::RunningHash,
    /// Bytes `hasher` has seen; the incremental hash is usable while `hash_ok`.
    hashed: u64,
    hash_ok: bool,
    size: u64,
    mtime: i64,
    /// Bytes or size changed since the last commit.
    dirty: bool,
    /// Content was committed at least once (so the path now holds a file).
    committed: bool,
    /// The last commit was an fsync: that version survives a crash during later writes.
    synced: bool,
    /// A write, `flush` or `fsync` came through this handle. Every `close()` sends a flush; a
    /// handle released with none of them was never the caller's: the kernel refused the open
    /// after the daemon answered it (a large file open through passthrough elsewhere).
    used: bool,
    /// A write failed (ENOSPC, EIO): nothing more is committed, and at release the file falls
    /// back to its last committed version (or disappears if it never committed).
    failed: Option<i32>,
    /// The registered model this file belongs to, for files below `models/`.
    model: Option<u64>,
    /// Created again at a tombstone: the bytes must be that path's last content.
    expect: Option<Expected>,
    /// A rewritable file opened for writing: its content before (hash, size, mtime), kept as
    /// history by the first commit that changes it.
    replaces: Option<(Hash, u64, i64)>,
    /// A replacement whose body does not hold the content it replaces yet: it is copied in
    /// at the first write, read or size change, unless that change is the truncate of the
    /// open's `O_TRUNC` (which reaches the daemon after the open): then it never is.
    base_pending: bool,
    /// A new content of an existing inode was committed: the kernel's cached pages and
    /// attributes of it are dropped at release.
    replaced: bool,
    /// Released: its entry in `writer_attrs` is gone and must not come back (a `utimens`
    /// that found this writer just before the release must not leave a stale size behind).
    released: bool,
    /// The daemon's session (shared store) when the writer began: if the daemon lost it
    /// since (its lease ran out and another machine cleaned up), the writer's changes fail
    /// with `EIO` instead of reaching rows that are no longer its own.
    session: i64,
    /// With blobs in a bucket: the upload of a large file begun while it is written
    /// sequentially (its `close()` then waits for the tail only).
    stream: Streaming,
}

/// A file created again at its tombstone, while it is written: the mode, owner and birth its
/// writer gave it, which `stat` shows. Its row keeps the removed file's until it takes these
/// with the path's last content ([`Index::owner_at_commit`]).
#[derive(Debug, Clone, Copy)]
struct Recreated {
    mode: u32,
    uid: u32,
    gid: u32,
    birth: i64,
}

/// The content a file created again at a tombstone must have (see [`ArtifactFs::create`]).
struct Expected {
    hash: Hash,
    size: u64,
    /// The content, while the store still has it: writes are compared as they arrive.
    blob: Option<Arc<Content>>,
    /// Whether the writer could have read the removed file (see [`ArtifactFs::create`]): only
    /// then is each write compared as it arrives. Anyone else learns whether the whole content
    /// is the same at `close()`, never a byte or the size by a write's answer.
    compare_writes: bool,
    /// The tombstone as it was: it gets its mode, owner and times back if this attempt fails
    /// (the row takes the new writer's meanwhile).
    was: Entry,
}

impl Expected {
    /// Why a write of `data` at `offset` cannot be part of the expected content, if it cannot.
    fn refuses(&self, offset: u64, data: &[u8]) -> Option<String> {
        if !self.compare_writes {
            return None;
        }
        let end = offset.saturating_add(data.len() as u64);
        if end > self.size {
            return Some(format!(
                "the path held a file of {} bytes before; a write up to {end} cannot be its content",
                self.size
            ));
        }
        // Without a readable blob the hash decides at close().
        let at = rewrite::differs_at(self.blob.as_ref()?, offset, data).ok()??;
        Some(format!(
            "the path held a file before; this write differs from its content at byte {at}"
        ))
    }
}

/// An open file: a sealed file's blob, or a file being written (cheap to clone).
#[derive(Clone)]
enum Handle {
    Read(Arc<Sealed>),
    Write(Arc<Mutex<Writer>>),
    /// A sealed file opened for writing: writes must repeat its bytes.
    Rewrite(Arc<Mutex<rewrite::Rewrite>>),
}

/// A handle on a sealed file. Its content is opened on first use: a small file's reads are kept
/// in the kernel's page cache, so most opens of it never need the content.
struct Sealed {
    ino: u64,
    hash: Hash,
    size: u64,
    /// Its row as of the open, beside other machines or a writer (a shared store, a read-only
    /// daemon): `fstat` of the descriptor after the row was deleted elsewhere (the file
    /// removed, or replaced by a `rename`) answers from it, as this machine's own removals
    /// answer from [`ArtifactFs::removed_open`].
    row: Option<Box<Entry>>,
    /// Its content, opened at the first read; opened again at a read after its fetch from a
    /// bucket failed (a handle outlives an outage).
    file: RwLock<Option<Arc<Content>>>,
}

/// The file system.
pub struct ArtifactFs {
    store: Store,
    opts: FsOptions,
    handles: RwLock<HashMap<u64, Handle>>,
    /// Inodes being written, with the handle writing each.
    writing: Mutex<HashMap<u64, u64>>,
    /// Size and mtime of each file being written, as its last write left them: `stat` reads
    /// them here, never waiting for a writer busy with a write or a long commit, and never
    /// getting a stale size (the kernel would take it for the file's).
    writer_attrs: Mutex<HashMap<u64, (u64, i64)>>,
    /// Files created again at their tombstone, until they have the path's last content: the
    /// mode, owner and birth the writer gave them, which `stat` shows while the row keeps the
    /// removed file's (see [`Index::recreate_at_tombstone`]).
    recreated: Mutex<HashMap<u64, Recreated>>,
    /// Signalled whenever an inode leaves `writing` (its file was sealed).
    sealed: Condvar,
    next_fh: AtomicU64,
    /// Files whose unfinished rows could not be dropped yet (a full disk): retried by `tick`.
    abandoned: Mutex<Vec<u64>>,
    /// Memory held by small files being written.
    mem: body::MemBudget,
    /// Registry state that lives in memory: activity per model, registry link inodes.
    models: models::ModelState,
    /// Told `(parent, name)` when the daemon itself removes a name the kernel may have cached
    /// in a directory it was told is [`Attr::stable`] (an unfinished file dropped at release).
    vanish_hook: Arc<std::sync::OnceLock<VanishHook>>,
    /// Rows deleted while their file was still open (a file removed before its first commit,
    /// a draft's file below `models/`): what `fstat` of a descriptor on them shows until the
    /// last one is released.
    removed_open: Mutex<HashMap<u64, Entry>>,
}

/// See [`ArtifactFs::on_vanish`].
pub type VanishHook = Box<dyn Fn(Invalidate) + Send + Sync>;

/// What the kernel must forget about, told from a thread of its own (never from inside the
/// request that caused it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidate {
    /// Name `.1` in directory `.0` may be gone: its entry, and the directory's listing.
    Entry(u64, Vec<u8>),
    /// The size, attributes and cached pages of inode `.0` (a new content of a rewritable
    /// file, say).
    Inode(u64),
    /// The attributes of inode `.0` (not its pages: its bytes are the same).
    Attributes(u64),
    /// Everything the kernel was told and may still cache: changes may have been missed.
    Everything,
}

impl Invalidate {
    /// What the kernel must forget after a change of a shared store's index.
    fn after(change: crate::store::Change) -> Invalidate {
        use crate::store::Change;
        match change {
            Change::Name { parent, name } => Invalidate::Entry(parent, name),
            Change::Inode { ino, content: true } => Invalidate::Inode(ino),
            Change::Inode {
                ino,
                content: false,
            } => Invalidate::Attributes(ino),
            Change::Anything => Invalidate::Everything,
        }
    }
}

fn from_ns(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// Whether directory `e`'s entries change only through the mount: `runs/` and everything below
/// it. `/`, `models/` and the registry's directories also change by themselves (version links,
/// aliases, settling), so the kernel must ask again about those.
fn changes_only_through_mount(e: &Entry) -> bool {
    e.ino == crate::store::index::RUNS_INO
        || e.zone == Zone::RunRoot as u8
        || e.zone == Zone::RunTree as u8
}

/// A store path for a log line: always whole from the mount's root (`/runs/...`); one longer
/// than [`LOG_PATH_MAX`] bytes keeps its first and last parts around the number of bytes left
/// out, so a 20,000-level tree cannot make one log line megabytes long.
pub(crate) fn log_path(path: &std::path::Path) -> String {
    let full = format!("/{}", path.display());
    if full.len() <= LOG_PATH_MAX {
        return full;
    }
    let cut = |i: usize, forward: bool| {
        let mut i = i;
        while !full.is_char_boundary(i) {
            if forward { i += 1 } else { i -= 1 }
        }
        i
    };
    let head = cut(LOG_PATH_MAX / 4, false);
    let tail = cut(full.len() - LOG_PATH_MAX / 2, true);
    format!(
        "{}/…[{} bytes]…/{}",
        &full[..head],
        tail - head,
        &full[tail..]
    )
}

/// Longest path a log line shows whole.
const LOG_PATH_MAX: usize = 4096;

/// A mutex's value, also after a panic while it was held.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ArtifactFs {
    pub fn new(store: Store, opts: FsOptions) -> ArtifactFs {
        let fs = ArtifactFs {
            store,
            opts,
            handles: RwLock::new(HashMap::new()),
            writing: Mutex::new(HashMap::new()),
            writer_attrs: Mutex::new(HashMap::new()),
            recreated: Mutex::new(HashMap::new()),
            sealed: Condvar::new(),
            next_fh: AtomicU64::new(1),
            mem: body::MemBudget::default(),
            abandoned: Mutex::new(Vec::new()),
            models: models::ModelState::default(),
            vanish_hook: Default::default(),
            removed_open: Mutex::new(HashMap::new()),
        };
        fs.resume_pending();
        fs
    }

    /// Sets what is told `(parent, name)` whenever the daemon itself drops a name from a
    /// directory (the FUSE adapter invalidates the kernel's caches). Set once.
    pub fn on_vanish(&self, hook: VanishHook) {
        let _ = self.vanish_hook.set(hook);
    }

    /// On a shared store: tells the hook of [`ArtifactFs::on_vanish`] what the kernel must
    /// forget whenever any machine (this one included) changes the index — the name and the
    /// directory listing of each entry created, removed or renamed, the attributes (and for a
    /// new content, the pages) of each row changed, and everything after the store's listener
    /// had to connect again. Set the hook first. Returns whether the store announces changes
    /// (not an embedded store: there, every change comes through this mount).
    ///
    /// This daemon's own changes are forwarded too: most came through the kernel, which then
    /// knows them already (an invalidation costs it one lookup more), but not all of them do
    /// (seals and directory times written by the periodic work, the registry's validations,
    /// the cleanup after another machine's dead session), and telling those apart in the
    /// index would cost every write more than the lookups cost.
    pub fn watch_other_machines(&self) -> io::Result<bool> {
        let hook = self.vanish_hook.clone();
        self.store.watch(Box::new(move |change| {
            if let Some(hook) = hook.get() {
                hook(Invalidate::after(change));
            }
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn options(&self) -> &FsOptions {
        &self.opts
    }

    // ----- helpers -------------------------------------------------------------------------

    /// Runs a change the kernel asked for (`mkdir`, `create`, `unlink`, ...) again while it
    /// fails because another process (`gc`, `fsck`) held the index's write lock for longer
    /// than the daemon's short busy timeout; the index mutex is free between attempts, so the
    /// mount keeps answering. Such a change meets the lock at its first write, having changed
    /// nothing, and is simply done again. (One that writes several rows outside a transaction
    /// could in principle meet it between two of them — another process would have to take
    /// the lock in those microseconds and keep it past the busy timeout — and is then answered
    /// as the index stands, e.g. `EEXIST`, where it used to fail with `EIO`; the registry's
    /// write after a new row waits instead, see [`ArtifactFs::after_insert`].) Commits retry on
    /// their own ([`Store::retry_busy`]). Requests that only read (`lookup`, `getattr`,
    /// `readdir`, xattrs, an `open` for reading) are run again the same way: a read should never meet a lock, but
    /// PostgreSQL's reads can (a table lock of another session), and a retry is always safe.
    pub fn retrying<T>(&self, op: &str, f: impl FnMut() -> FsResult<T>) -> FsResult<T> {
        self.store.retry_while_busy(
            || op.to_string(),
            |e: &FsError| matches!(e, FsError::Io(io) if crate::store::index::is_busy(io)),
            f,
        )
    }

    /// Runs `f`, a further write of a request whose row already went in (`mkdir`, `create`
    /// below `models/`: the version marked PENDING). Failing busy there would make the
    /// kernel's request fail, or its retry ([`ArtifactFs::retrying`]) meet its own row
    /// (`EEXIST`): instead `f` runs once more waiting inside the index, up to
    /// [`AFTER_INSERT_PATIENCE`] (the index mutex held meanwhile; another machine's registry
    /// transaction holding the version's row is over in milliseconds).
    fn after_insert<T>(&self, idx: &Index, mut f: impl FnMut() -> FsResult<T>) -> FsResult<T> {
        match f() {
            Err(FsError::Io(e)) if crate::store::index::is_busy(&e) => {
                log::debug!("index busy after an insert ({e}); waiting for it");
                idx.set_busy_timeout(AFTER_INSERT_PATIENCE)?;
                let result = f();
                idx.set_busy_timeout(self.store.busy_timeout())?;
                result
            }
            result => result,
        }
    }

    /// Logs one line saying what was refused and why, and returns the refusal.
    fn deny(
        idx: &Index,
        op: &str,
        dir: u64,
        name: Option<&[u8]>,
        rule: (Refusal, String),
    ) -> FsError {
        let mut path = idx.path_of(dir).unwrap_or_default();
        if let Some(n) = name {
            path.push(std::ffi::OsStr::from_bytes(n));
        }
        log::info!(
            "refused {op} {}: {} [{:?}]",
            log_path(&path),
            rule.1,
            rule.0
        );
        FsError::Refused(rule.0)
    }

    fn read_only(&self, idx: &Index, op: &str, dir: u64, name: Option<&[u8]>) -> FsResult<()> {
        if self.opts.read_only {
            return Err(Self::deny(
                idx,
                op,
                dir,
                name,
                (Refusal::ReadOnly, "the mount is read-only".into()),
            ));
        }
        Ok(())
    }

    fn owner(&self, caller: Caller) -> (u32, u32) {
        (
            self.opts.uid.unwrap_or(caller.uid),
            self.opts.gid.unwrap_or(caller.gid),
        )
    }

    /// The owner of a new entry in directory `dir`: as [`ArtifactFs::owner`], except that a
    /// directory with the setgid bit passes its group on (as every local file system does).
    fn owner_in(&self, caller: Caller, dir: &Entry) -> (u32, u32) {
        let (uid, gid) = self.owner(caller);
        let gid = match self.opts.gid {
            None if dir.mode & libc::S_ISGID != 0 => dir.gid,
            _ => gid,
        };
        (uid, gid)
    }

    fn writer_of(&self, ino: u64) -> Option<Arc<Mutex<Writer>>> {
        let fh = *lock(&self.writing).get(&ino)?;
        match self
            .handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
        {
            Some(Handle::Write(w)) => Some(w.clone()),
            _ => None,
        }
    }

    fn attr_of(&self, e: &Entry) -> Attr {
        let mut attr = self.attr_of_row(e);
        if attr.stable && e.kind == Kind::File {
            let recreated = lock(&self.recreated).get(&e.ino).copied();
            if let Some(r) = recreated {
                attr.perm = r.mode as u16;
                attr.uid = self.opts.uid.unwrap_or(r.uid);
                attr.gid = self.opts.gid.unwrap_or(r.gid);
                attr.crtime = from_ns(r.birth);
            }
        }
        attr
    }

    /// [`ArtifactFs::attr_of`] with the mode, owner and birth of the row itself, also while a
    /// file created again at its tombstone is written (see [`Recreated`]).
    fn attr_of_row(&self, e: &Entry) -> Attr {
        let mut attr = Attr {
            ino: e.ino,
            generation: e.generation,
            kind: match e.kind {
                Kind::Dir => NodeKind::Dir,
                Kind::File => NodeKind::File,
            },
            size: if e.kind == Kind::Dir { 4096 } else { e.size },
            perm: (e.mode & 0o7777) as u16,
            uid: self.opts.uid.unwrap_or(e.uid),
            gid: self.opts.gid.unwrap_or(e.gid),
            mtime: from_ns(e.mtime),
            atime: from_ns(e.atime),
            ctime: from_ns(e.ctime),
            crtime: from_ns(e.crtime),
            nlink: 1,
            sealed: self.is_sealed_row(e) && !self.is_rewritable(e),
            stable: e.kind == Kind::Dir && changes_only_through_mount(e),
        };
        let writing = lock(&self.writer_attrs).get(&e.ino).copied();
        if e.kind == Kind::File
            && let Some((size, mtime)) = writing
        {
            attr.sealed = false;
            attr.size = size;
            attr.mtime = from_ns(mtime);
            // Written here: only this mount changes it until it is sealed.
            attr.stable = true;
        }
        attr
    }

    /// Whether a file row is sealed as far as this daemon can tell: a daemon beside others
    /// treats a file committed while still open elsewhere as being written.
    fn is_sealed_row(&self, e: &Entry) -> bool {
        e.kind == Kind::File
            && e.state == State::Live
            && !(e.committed_open && self.open_elsewhere(e))
    }

    /// Whether file row `e`, committed while still open, is open on another daemon (not by a
    /// writer of this one).
    fn open_elsewhere(&self, e: &Entry) -> bool {
        self.opts.beside_others() && (self.opts.read_only || self.writer_of(e.ino).is_none())
    }

    /// The live directory `ino`, or the refusal to use.
    fn dir(idx: &Index, ino: u64) -> FsResult<Entry> {
        match idx.get(ino)? {
            Some(e) if e.state != State::Tombstone && e.kind == Kind::Dir => Ok(e),
            Some(e) if e.state != State::Tombstone => Err(FsError::Refused(Refusal::NotDir)),
            _ => Err(FsError::Refused(Refusal::NotFound)),
        }
    }

    /// Whether directory `node` (the kernel's number: inode and generation) is still the
    /// directory its row holds: a row made again since has a later generation. That happens
    /// to a directory removed and made again by another machine (a shared store, or the writer
    /// beside a read-only daemon), which reaches this kernel only as a name dropped from its
    /// caches, and to a run's `artifacts` directory here, removed with its run and revived
    /// with it (the kernel knows of the run's removal only). A process still inside the old
    /// directory must reach nothing in the new one: `Stale` (`ESTALE`, as NFS answers a
    /// process in a directory another client removed; a path walk through an out-of-date
    /// name is tried again by the kernel, which then looks the name up afresh), one log line
    /// for a change (`op` other than a lookup or a listing). Anything else (no such row, no
    /// directory) is left to the request itself.
    pub fn check_dir_node(&self, op: &str, node: u64) -> FsResult<()> {
        let ino = ino_of_node(node);
        if ino >= models::VIRT_BASE {
            return Ok(());
        }
        let Some(e) = self.store.index().get(ino)? else {
            return Ok(());
        };
        if e.kind != Kind::Dir || node_of(ino, e.generation) == node {
            return Ok(());
        }
        if !matches!(op, "lookup" | "opendir" | "readdir" | "readdirplus") {
            log::info!(
                "refused {op} in directory inode {ino}: removed since this process entered it, \
                 and made again [ESTALE]"
            );
        }
        Err(FsError::Refused(Refusal::Stale))
    }

    /// Whether directory `dir` or one above it was removed and made again after `when`, the
    /// birth of a file in it (a directory holding a file cannot be removed, so a birth later
    /// than the file's is a directory made again after the file was removed): what it
    /// protected before, its mode bits then, is not known. (The fixed directories, `/`,
    /// `runs/` and `models/`, are never removed.)
    fn made_again_since(idx: &Index, mut dir: u64, when: i64) -> FsResult<bool> {
        while dir > MODELS_INO
            && let Some(d) = idx.get(dir)?
        {
            if d.crtime > when {
                return Ok(true);
            }
            dir = d.parent;
        }
        Ok(false)
    }

    fn visible(idx: &Index, ino: u64) -> FsResult<Entry> {
        match idx.get(ino)? {
            Some(e) if e.state != State::Tombstone => Ok(e),
            _ => Err(FsError::Refused(Refusal::NotFound)),
        }
    }

    /// A release of `ino` on its way, here ([`Self::wait_sealed`]) or on another daemon
    /// ([`Self::wait_sealed_elsewhere`]), given its moment; whether a writer here still has it.
    fn wait_released(&self, ino: u64) -> bool {
        let busy = self.wait_sealed(ino);
        self.wait_sealed_elsewhere(ino);
        busy
    }

    /// On a read-only daemon beside a writer: a file the writer committed but had not released
    /// yet is given the same moment for its seal to reach the index (the writer's release may
    /// follow the `close()` by a few milliseconds, its seal by up to one tick), so `close()` on
    /// the writer and `open()` here right after see the final content, not `EBUSY`.
    fn wait_sealed_elsewhere(&self, ino: u64) {
        if !self.opts.beside_others() || (!self.opts.read_only && self.writer_of(ino).is_some()) {
            return;
        }
        wait_a_release(|| !matches!(self.store.index().get(ino), Ok(Some(e)) if e.committed_open));
    }

    /// Whether `ino` is still being written, after giving a RELEASE already on its way a moment
    /// to arrive: the kernel sends it when the last descriptor closes but does not wait for it,
    /// so `echo x > f; cat f` may bring the open of `cat` to another thread first.
    fn wait_sealed(&self, ino: u64) -> bool {
        let writing = lock(&self.writing);
        if !writing.contains_key(&ino) {
            return false;
        }
        let (writing, _) = self
            .sealed
            .wait_timeout_while(writing, RELEASE_GRACE, |w| w.contains_key(&ino))
            .unwrap_or_else(|p| p.into_inner());
        writing.contains_key(&ino)
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    // ----- lookups ---------------------------------------------------------------------------

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        match self.lookup_or_absent(parent, name)? {
            Lookup::Found(attr) => Ok(attr),
            Lookup::Absent { .. } => Err(FsError::Refused(Refusal::NotFound)),
        }
    }

    /// `lookup` for the kernel, which may remember an absent name: it may below `runs/`,
    /// whose names only appear through this mount, not in `models/<name>/`, where the registry
    /// adds links by itself.
    pub fn lookup_or_absent(&self, parent: u64, name: &[u8]) -> FsResult<Lookup> {
        if self.opts.panic_on_lookup.as_deref() == Some(name) {
            panic!(
                "fault injection: lookup of {:?}",
                String::from_utf8_lossy(name)
            );
        }
        if name.len() > namespace::NAME_MAX {
            return Err(FsError::Refused(Refusal::NameTooLong));
        }
        let entry = {
            let idx = self.store.index();
            let dir = Self::dir(&idx, parent)?;
            match idx.lookup(parent, name)? {
                Some(e) if e.state != State::Tombstone => e,
                _ => {
                    return Ok(match self.lookup_link(&idx, &dir, name)? {
                        Some(attr) => Lookup::Found(attr),
                        None => Lookup::Absent {
                            cacheable: changes_only_through_mount(&dir),
                        },
                    });
                }
            }
        };
        Ok(Lookup::Found(self.attr_of(&entry)))
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        if ino >= models::VIRT_BASE {
            return self.link_getattr(ino);
        }
        let row = self.store.index().get(ino)?;
        match row {
            Some(e) if e.state != State::Tombstone => Ok(self.attr_of(&e)),
            // Removed while open: `fstat` of a descriptor still works, with no link left.
            removed => {
                let e = match removed {
                    Some(e) if e.kind == Kind::File => Some(e),
                    Some(_) => None,
                    None => lock(&self.removed_open)
                        .get(&ino)
                        .cloned()
                        .or_else(|| self.row_held_open(ino, None)),
                };
                match e {
                    Some(e) if self.is_open(ino) => Ok(Attr {
                        nlink: 0,
                        ..self.attr_of(&e)
                    }),
                    // Removed by another machine since the kernel looked its name up: as for
                    // `open`, the kernel is to look the path up again (an `open` that asked
                    // for the attributes first then meets the tombstone's refusal, and `stat`
                    // ENOENT, not a stale inode's ENOENT).
                    _ if self.opts.beside_others() => {
                        self.store.index().forget_kept();
                        Err(FsError::Refused(Refusal::Stale))
                    }
                    _ => Err(FsError::Refused(Refusal::NotFound)),
                }
            }
        }
    }

    /// Whether any handle of this daemon has file `ino` open.
    fn is_open(&self, ino: u64) -> bool {
        let writing = lock(&self.writing).contains_key(&ino);
        writing
            || self
                .handles
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .any(|h| match h {
                    Handle::Read(s) => s.ino == ino,
                    Handle::Rewrite(r) => lock(r).ino == ino,
                    Handle::Write(_) => false,
                })
    }

    /// The row of sealed file `ino` as a handle open on it saw it (beside other machines or a
    /// writer: see [`Sealed::row`]).
    /// Of several (generations of the inode), the latest, or the one of `generation`.
    fn row_held_open(&self, ino: u64, generation: Option<u32>) -> Option<Entry> {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|h| match h {
                Handle::Read(s) if s.ino == ino => s.row.as_deref(),
                _ => None,
            })
            .filter(|e| generation.is_none_or(|g| e.generation == g))
            .max_by_key(|e| e.generation)
            .cloned()
    }

    /// A row is deleted while its file may be open: keeps what `fstat` needs of it.
    fn keep_if_open(&self, e: &Entry) {
        if self.is_open(e.ino) {
            lock(&self.removed_open).insert(e.ino, e.clone());
        }
    }

    /// A handle on `ino` was released: forgets its deleted row once no handle is left.
    fn forget_if_closed(&self, ino: u64) {
        let kept = lock(&self.removed_open).contains_key(&ino);
        if kept && !self.is_open(ino) {
            lock(&self.removed_open).remove(&ino);
        }
    }

    /// Opens directory `ino` for reading; returns whether its listing may be cached across
    /// opens (it changes only through the mount, see [`Attr::stable`]).
    pub fn opendir(&self, ino: u64) -> FsResult<bool> {
        if ino >= models::VIRT_BASE {
            return Err(FsError::Refused(Refusal::NotDir));
        }
        let idx = self.store.index();
        let dir = Self::dir(&idx, ino)?;
        Ok(changes_only_through_mount(&dir))
    }

    /// Up to `max` entries of directory `ino` after `offset` (0 = from the start).
    pub fn readdir(&self, ino: u64, offset: u64, max: usize) -> FsResult<Vec<DirEntry>> {
        let (dir, children, links) = {
            let idx = self.store.index();
            let dir = Self::dir(&idx, ino)?;
            // Cookies: 1 = ".", 2 = "..", then each child's inode number, then LINK_COOKIE + i
            // for the registry's links. Children's inode numbers are above 3 except in the
            // root, where runs/ (2) shares its cookie with "..": the root's four entries always
            // go out in the first reply, so no listing resumes between the two.
            let after = if offset < 3 { 0 } else { offset };
            let children = if offset < LINK_COOKIE {
                idx.children(ino, after, max)?
            } else {
                Vec::new()
            };
            let links = if children.len() < max {
                let skip = offset.saturating_sub(LINK_COOKIE) as usize;
                self.list_links(&idx, &dir)?
                    .into_iter()
                    .enumerate()
                    .skip(skip)
                    .map(|(i, (n, a))| DirEntry {
                        cookie: LINK_COOKIE + i as u64 + 1,
                        name: n,
                        attr: a,
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let parent = if ino == ROOT_INO {
                dir.clone()
            } else {
                Self::dir(&idx, dir.parent)?
            };
            (
                vec![(1, b".".to_vec(), dir), (2, b"..".to_vec(), parent)],
                children,
                links,
            )
        };
        let mut out = Vec::new();
        for (cookie, name, e) in dir {
            if offset < cookie {
                out.push(DirEntry {
                    cookie,
                    name,
                    attr: self.attr_of(&e),
                });
            }
        }
        for e in children {
            out.push(DirEntry {
                cookie: e.ino,
                name: e.name.clone(),
                attr: self.attr_of(&e),
            });
        }
        out.extend(links);
        Ok(out)
    }

    // ----- directories ---------------------------------------------------------------------

    pub fn mkdir(&self, caller: Caller, parent: u64, name: &[u8], mode: u32) -> FsResult<Attr> {
        let entry = {
            let idx = self.store.index();
            self.read_only(&idx, "mkdir", parent, Some(name))?;
            let pdir = Self::dir(&idx, parent)?;
            let (uid, gid) = self.owner_in(caller, &pdir);
            // A directory made in a setgid directory is setgid too.
            let inherited = pdir.mode & libc::S_ISGID;
            let place = namespace::place_of(pdir.ino, pdir.zone);
            let zone = namespace::mkdir(place, name)
                .map_err(|r| Self::deny(&idx, "mkdir", parent, Some(name), r))?;
            self.model_guard(&idx, "mkdir", &pdir, Some(name))?;
            let now = now_ns();
            let ino = if place == Place::Models {
                // The directory and its model's row in one transaction.
                let new = NewEntry::new_dir(
                    parent,
                    name,
                    zone as u8,
                    mode & 0o7777 | inherited,
                    (uid, gid),
                    now,
                );
                idx.model_dir_create(&new, &String::from_utf8_lossy(name))?
                    .ok_or(FsError::Refused(Refusal::Exists))?
            } else {
                self.make_dir(
                    &idx,
                    parent,
                    name,
                    zone,
                    mode & 0o7777 | inherited,
                    uid,
                    gid,
                    now,
                    "mkdir",
                )?
            };
            self.model_guard_after(&idx, "mkdir", &pdir, name, ino)?;
            if place == Place::Runs {
                // Every run has artifacts/.
                self.make_dir(
                    &idx,
                    ino,
                    namespace::ARTIFACTS,
                    Zone::RunTree,
                    0o755 | inherited,
                    uid,
                    gid,
                    now,
                    "mkdir",
                )
                .or_else(|e| match e {
                    FsError::Refused(Refusal::Exists) => Ok(0),
                    e => Err(e),
                })?;
            }
            if place != Place::Models
                && let Some(unit) = self.unit_for_new(&idx, &pdir, ino)?
            {
                self.after_insert(&idx, || self.model_touch(&idx, unit, true))?;
            }
            idx.get(ino)?.ok_or(FsError::Refused(Refusal::NotFound))?
        };
        Ok(self.attr_of(&entry))
    }

    /// Creates directory `name` in `parent`, or revives it if it was removed before.
    #[allow(clippy::too_many_arguments)]
    fn make_dir(
        &self,
        idx: &Index,
        parent: u64,
        name: &[u8],
        zone: Zone,
        mode: u32,
        uid: u32,
        gid: u32,
        now: i64,
        op: &str,
    ) -> FsResult<u64> {
        let new = NewEntry::new_dir(parent, name, zone as u8, mode, (uid, gid), now);
        if let Some(ino) = idx.insert_in_dir(&new)? {
            return Ok(ino);
        }
        match idx.lookup(parent, name)? {
            Some(e) if e.kind == Kind::Dir && e.state == State::Tombstone => {
                idx.revive_dir(e.ino, mode, uid, gid, now)?;
                Ok(e.ino)
            }
            Some(e) if e.state == State::Tombstone => Err(Self::deny(
                idx,
                op,
                parent,
                Some(name),
                (
                    Refusal::Exists,
                    "the path held a file before; paths are write-once".into(),
                ),
            )),
            _ => Err(FsError::Refused(Refusal::Exists)),
        }
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        let idx = self.store.index();
        self.read_only(&idx, "rmdir", parent, Some(name))?;
        let pdir = Self::dir(&idx, parent)?;
        let dir = match idx.lookup(parent, name)? {
            Some(e) if e.state != State::Tombstone => e,
            _ => return Err(FsError::Refused(Refusal::NotFound)),
        };
        if dir.kind != Kind::Dir {
            return Err(FsError::Refused(Refusal::NotDir));
        }
        let place = namespace::place_of(pdir.ino, pdir.zone);
        namespace::rmdir(place, name)
            .map_err(|r| Self::deny(&idx, "rmdir", parent, Some(name), r))?;
        let unit = self.model_guard(&idx, "rmdir", &dir, None)?;
        let children = idx.children(dir.ino, 0, 2)?;
        let mut also = None;
        let empty = match children.as_slice() {
            [] => true,
            // A run whose only entry is an empty artifacts/ counts as empty.
            [a] if place == Place::Runs
                && a.name == namespace::ARTIFACTS
                && a.kind == Kind::Dir =>
            {
                also = Some(a.ino);
                idx.children(a.ino, 0, 1)?.is_empty()
            }
            _ => false,
        };
        if !empty {
            return Err(FsError::Refused(Refusal::NotEmpty));
        }
        if place == Place::Models || unit.is_some() {
            // A draft below models/ that never became a version: gone, and the name is free.
            // One transaction: a model's row goes with its directory.
            let remove = |idx: &Index| {
                idx.write_locked(|idx| {
                    idx.delete_row(dir.ino)?;
                    idx.touch_dir(parent, now_ns())?;
                    idx.version_delete(dir.ino)?;
                    if place == Place::Models {
                        idx.model_delete(dir.ino)?;
                    }
                    Ok(())
                })
            };
            match unit {
                Some(unit) => self.model_change(&idx, "rmdir", &dir, unit, remove)?,
                None => remove(&idx)?,
            }
            if place != Place::Models
                && let Some(unit) = self.model_unit(&idx, &pdir)?
            {
                self.model_touch(&idx, unit, false)?;
            }
            return Ok(());
        }
        let now = now_ns();
        if let Some(a) = also {
            idx.tombstone(a, now)?;
        }
        idx.tombstone(dir.ino, now)?;
        Ok(())
    }

    // ----- files -----------------------------------------------------------------------------

    /// Creates a new file and opens it for writing.
    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
    ) -> FsResult<(Attr, u64)> {
        self.create_once(caller, parent, name, mode, false)
    }

    fn create_once(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        retried: bool,
    ) -> FsResult<(Attr, u64)> {
        let now = now_ns();
        let idx = self.store.index();
        self.read_only(&idx, "create", parent, Some(name))?;
        let pdir = Self::dir(&idx, parent)?;
        let (uid, gid) = self.owner_in(caller, &pdir);
        let zone = namespace::create_file(namespace::place_of(pdir.ino, pdir.zone), name)
            .map_err(|r| Self::deny(&idx, "create", parent, Some(name), r))?;
        self.model_guard(&idx, "create", &pdir, Some(name))?;
        self.refuse_mlmodel_over_versions(&idx, "create", &pdir, name)?;
        let new = NewEntry::new_file(parent, name, zone as u8, mode & 0o7777, (uid, gid), now);
        let mut expect = None;
        let mut recreated = None;
        let ino = match idx.insert_in_dir(&new) {
            Ok(Some(ino)) => ino,
            // A tombstone of a file (`rm`, then the same file copied again; `tar -x` twice):
            // created again provisionally, its bytes must be the path's last content.
            Ok(None)
                if let Some(t) = idx.lookup(parent, name)?
                    && t.state == State::Tombstone
                    && t.kind == Kind::File
                    && let Some(hash) = t.hash =>
            {
                if lock(&self.writing).contains_key(&t.ino) && !retried {
                    // A release already on its way (close() returned a moment ago): the same
                    // grace as open(), then decide again.
                    drop(idx);
                    self.wait_sealed(t.ino);
                    return self.create_once(caller, parent, name, mode, true);
                }
                if lock(&self.writing).contains_key(&t.ino) {
                    // Removed while a descriptor still writes it: that writer owns the row.
                    let why = "the file removed here is still open for writing".to_string();
                    return Err(Self::deny(
                        &idx,
                        "create",
                        parent,
                        Some(name),
                        (Refusal::Busy, why),
                    ));
                }
                // Who could have read the removed file: anyone root lets read everything; its
                // owner (who may chmod it); anyone its mode bits let read, unless a directory
                // above it was removed and made again since it was made (whose mode bits then
                // are not known). The row keeps the removed file's mode, owner and times until
                // the path's last content is written again, so no attempt changes them.
                // (A tombstone born at its removal is one an earlier version's crash clean-up
                // put back from such an attempt, which had made it the attempt's writer's.)
                let creds = access::Credentials::of(caller);
                let genuine = t.crtime < t.ctime;
                let compare_writes = creds.reads_all
                    || (genuine
                        && (creds.uid == t.uid
                            || (creds.may(&self.attr_of_row(&t), access::READ)
                                && !Self::made_again_since(&idx, t.parent, t.crtime)?)));
                if !idx.recreate_at_tombstone(t.ino, now)? {
                    return Err(FsError::Refused(Refusal::Exists));
                }
                recreated = Some(Recreated {
                    mode: mode & 0o7777,
                    uid,
                    gid,
                    birth: now,
                });
                // (Its blob is opened once the index is let go: from a bucket it may be
                // fetched first.)
                expect = Some(Expected {
                    hash,
                    size: t.size,
                    blob: None,
                    compare_writes,
                    was: t.clone(),
                });
                log::info!(
                    "create {}: the path held a file before; accepted if the bytes are the same ({} bytes, {hash})",
                    log_path(&idx.path_of(t.ino)?),
                    t.size
                );
                t.ino
            }
            other => {
                return Err(match other {
                    Err(e) => e.into(),
                    _ => {
                        let why = match idx.lookup(parent, name)? {
                            Some(e) if e.state == State::Tombstone => {
                                "the path held a file before; paths are write-once"
                            }
                            _ => "the path exists",
                        };
                        Self::deny(
                            &idx,
                            "create",
                            parent,
                            Some(name),
                            (Refusal::Exists, why.into()),
                        )
                    }
                });
            }
        };
        if expect.is_none() {
            self.model_guard_after(&idx, "create", &pdir, name, ino)?;
        }
        let unit = self.unit_for_new(&idx, &pdir, ino)?;
        if let Some(unit) = unit {
            self.after_insert(&idx, || self.model_touch(&idx, unit, true))?;
            self.model_write_activity(unit.model, 1);
        }
        let fh = self.new_fh();
        let expected = expect
            .as_ref()
            .filter(|x| x.compare_writes)
            .map(|x: &Expected| (x.hash, x.size));
        let writer = Writer {
            ino,
            body: body::Body::new(),
            hasher: hashing::RunningHash::new(),
            hashed: 0,
            hash_ok: true,
            size: 0,
            mtime: now,
            dirty: true,
            committed: false,
            synced: false,
            used: false,
            failed: None,
            model: unit.map(|u| u.model),
            expect,
            replaces: None,
            replaced: false,
            released: false,
            session: idx.session(),
            stream: Streaming::Idle,
            base_pending: false,
        };
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Handle::Write(Arc::new(Mutex::new(writer))));
        lock(&self.writer_attrs).insert(ino, (0, now));
        lock(&self.writing).insert(ino, fh);
        if let Some(r) = recreated {
            idx.owner_at_commit(ino, Some((r.mode, r.uid, r.gid, r.birth)));
            lock(&self.recreated).insert(ino, r);
        }
        let entry = idx.get(ino)?.ok_or(FsError::Refused(Refusal::NotFound))?;
        drop(idx);
        if let Some((hash, size)) = expected
            && let Ok(Handle::Write(w)) = self.handle(fh)
        {
            // Without it, the hash decides at close() (see `Expected::refuses`).
            let blob = self
                .store
                .open_content_whole(&hash, size)
                .ok()
                .map(Arc::new);
            if let Some(x) = lock(&w).expect.as_mut() {
                x.blob = blob;
            }
        }
        Ok((self.attr_of(&entry), fh))
    }

    /// Opens an existing file. Only sealed files can be opened, and only for reading.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<(u64, Opened)> {
        self.open_by(None, ino, flags)
    }

    /// [`ArtifactFs::open`] by `caller` (`None`: one who may read the file): a caller who may
    /// not read a sealed file it opens for writing gets its writes compared only as a whole
    /// (see `Rewrite::compare_writes`).
    pub fn open_by(&self, caller: Option<Caller>, ino: u64, flags: i32) -> FsResult<(u64, Opened)> {
        let busy = self.wait_released(ino);
        let idx = self.store.index();
        let (e, damaged) = match idx.get_checked(ino)? {
            Some((e, damaged)) if e.state != State::Tombstone => (e, damaged),
            // Removed by another machine since the kernel looked its name up (it keeps names
            // for a moment): it is to look again, and find what the path holds now (`echo x >
            // f` then meets the tombstone's refusal, not ENOENT).
            _ if self.opts.beside_others() => {
                idx.forget_kept();
                return Err(FsError::Refused(Refusal::Stale));
            }
            _ => return Err(FsError::Refused(Refusal::NotFound)),
        };
        if e.kind == Kind::Dir {
            return Err(FsError::Refused(Refusal::IsDir));
        }
        let writes = (flags & libc::O_ACCMODE) != libc::O_RDONLY
            || flags & (libc::O_TRUNC | libc::O_APPEND) != 0;
        if busy || (e.kind == Kind::File && !self.is_sealed_row(&e)) {
            return Err(Self::deny(
                &idx,
                "open",
                ino,
                None,
                (
                    Refusal::Busy,
                    "the file is still being written through another handle".into(),
                ),
            ));
        }
        if writes {
            self.read_only(&idx, "open for writing", ino, None)?;
        }
        let hash = e.hash.ok_or(FsError::Refused(Refusal::NotFound))?;
        if damaged {
            log::warn!(
                "refused open {}: its blob {hash} is damaged (found by fsck --verify) [EIO]",
                log_path(&idx.path_of(ino)?)
            );
            return Err(io::Error::from_raw_os_error(libc::EIO).into());
        }
        drop(idx);
        let rewritable = self.is_rewritable(&e);
        if writes && rewritable {
            return self.open_replace(&e, hash, flags);
        }
        if writes {
            let reads = caller
                .is_none_or(|c| access::Credentials::of(c).may(&self.attr_of(&e), access::READ));
            return self.open_rewrite(ino, hash, e.size, flags, reads);
        }
        let sealed = Sealed {
            ino,
            hash,
            size: e.size,
            row: self.opts.beside_others().then(|| Box::new(e.clone())),
            file: RwLock::new(None),
        };
        let fh = self.new_fh();
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Handle::Read(Arc::new(sealed)));
        Ok((
            fh,
            Opened::Sealed {
                size: e.size,
                cache: !rewritable,
            },
        ))
    }

    /// A file below `runs/` with a rewritable name (`--rewritable`): its content may change
    /// on the same inode, so the kernel keeps neither its pages nor its attributes for long.
    fn is_rewritable(&self, e: &Entry) -> bool {
        e.kind == Kind::File
            && e.zone == Zone::RunTree as u8
            && self.opts.rewritable.contains(&e.name)
    }

    /// A sealed file opened for writing: a rewrite that must repeat its bytes (see `rewrite`).
    /// What others see does not change, nor does the kernel's idea of the file: the mount gets
    /// `O_TRUNC` as a truncate after the open (see `setattr`), whose reply keeps the size.
    fn open_rewrite(
        &self,
        ino: u64,
        hash: Hash,
        size: u64,
        flags: i32,
        compare_writes: bool,
    ) -> FsResult<(u64, Opened)> {
        let blob = self.store.open_content_whole(&hash, size).map_err(|err| {
            log::warn!("content {hash} of inode {ino} cannot be opened: {err}");
            FsError::Io(io::Error::from_raw_os_error(libc::EIO))
        })?;
        let truncated = flags & libc::O_TRUNC != 0;
        let mut r = rewrite::Rewrite::new(ino, size, Arc::new(blob), truncated);
        r.append = flags & libc::O_APPEND != 0;
        r.compare_writes = compare_writes;
        let fh = self.new_fh();
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Handle::Rewrite(Arc::new(Mutex::new(r))));
        Ok((fh, Opened::Writing))
    }

    /// A rewritable file opened for writing: a writer on the same inode, starting from its
    /// content (or empty with `O_TRUNC`). Until the new content is committed and released, the
    /// file is being written (others: `EBUSY`); a crash or a failure brings the old content back.
    fn open_replace(&self, e: &Entry, hash: Hash, flags: i32) -> FsResult<(u64, Opened)> {
        let mut w = Writer {
            ino: e.ino,
            body: body::Body::new(),
            hasher: hashing::RunningHash::new(),
            hashed: 0,
            hash_ok: true,
            size: 0,
            mtime: e.mtime,
            dirty: false,
            committed: true,
            // Its current version survives a crash during the new writes.
            synced: true,
            used: false,
            failed: None,
            model: None,
            expect: None,
            replaces: Some((hash, e.size, e.mtime)),
            replaced: false,
            released: false,
            session: self.store.index().session(),
            stream: Streaming::Idle,
            base_pending: false,
        };
        // The inode's one writer slot first: a second writer racing this open is Busy before
        // anything about the row changes.
        let fh = self.new_fh();
        {
            let mut writing = lock(&self.writing);
            if writing.contains_key(&e.ino) {
                return Err(FsError::Refused(Refusal::Busy));
            }
            writing.insert(e.ino, fh);
        }
        let started = self.start_replacement(&mut w, e, flags);
        if let Err(err) = started {
            // Nothing was recorded (a failed mark fails the writer before the row changes).
            w.body.discard(&self.mem);
            lock(&self.writing).remove(&e.ino);
            self.sealed.notify_all();
            return Err(err);
        }
        lock(&self.writer_attrs).insert(e.ino, (w.size, w.mtime));
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Handle::Write(Arc::new(Mutex::new(w))));
        log::info!(
            "open {} for a new content (a rewritable name; the current one is kept as history)",
            log_path(&self.store.index().path_of(e.ino).unwrap_or_default())
        );
        Ok((fh, Opened::Writing))
    }

    /// The new content's start: empty after `O_TRUNC` (the row then says "being written", its
    /// current version kept on a crash), else the current bytes, copied in when first needed
    /// ([`Writer::base_pending`]).
    fn start_replacement(&self, w: &mut Writer, e: &Entry, flags: i32) -> FsResult<()> {
        if flags & libc::O_TRUNC != 0 {
            if e.size > 0 {
                self.begin_change(w)?;
                w.mtime = now_ns();
                self.invalidate_inode(e.ino);
            }
            return Ok(());
        }
        w.size = e.size;
        w.base_pending = e.size > 0;
        Ok(())
    }

    /// Copies a replacement's old content into its body, if it is still pending: before
    /// anything reads, writes or resizes the body.
    fn load_base(&self, w: &mut Writer) -> FsResult<()> {
        if !w.base_pending {
            return Ok(());
        }
        let (hash, size, _) = w
            .replaces
            .ok_or_else(|| io::Error::other("a replacement without its old content"))?;
        let copied = (|| -> io::Result<u64> {
            let blob = self.store.open_content_whole(&hash, size)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0u64;
            loop {
                let n = blob.read_at(&mut buf, at)?;
                if n == 0 {
                    return Ok(at);
                }
                w.body
                    .write_at(&self.store.blobs, &self.mem, &buf[..n], at)?;
                w.hasher.update(&buf[..n], at + n as u64);
                at += n as u64;
            }
        })();
        match copied {
            Ok(at) => {
                w.hashed = at;
                w.size = at;
                w.base_pending = false;
                Ok(())
            }
            Err(e) => {
                // Half copied: this writer never commits; the file keeps its content.
                w.failed = Some(e.raw_os_error().unwrap_or(libc::EIO));
                log::warn!(
                    "inode {}: its content could not be read for a replacement ({e}); the file keeps it",
                    w.ino
                );
                Err(e.into())
            }
        }
    }

    /// One write of a rewrite: the sealed bytes at that offset, or `NotPermitted` at once.
    fn rewrite_write(
        &self,
        r: &Mutex<rewrite::Rewrite>,
        offset: u64,
        data: &[u8],
    ) -> FsResult<u32> {
        let mut r = lock(r);
        let end = offset.saturating_add(data.len() as u64);
        // (Refused at once whoever writes: `stat` shows anyone the size.)
        let why = if data.is_empty() {
            return Ok(0);
        } else if r.append {
            Some("the file is sealed: appending would change it".to_string())
        } else if end > r.size {
            Some(format!(
                "the file is sealed at {} bytes: a write up to {end} would change it",
                r.size
            ))
        } else {
            r.wrote = true;
            match rewrite::differs_at(&r.blob, offset, data)? {
                None => {
                    r.cover(offset, end);
                    None
                }
                Some(at) if r.compare_writes => Some(format!(
                    "the file is sealed: this write differs from its content at byte {at}"
                )),
                // Answered at close(), for the whole (see `Rewrite::compare_writes`).
                Some(_) => {
                    r.differed = true;
                    None
                }
            }
        };
        if let Some(why) = why {
            let ino = r.ino;
            drop(r);
            return Err(self.deny_ino("write", ino, (Refusal::NotPermitted, why)));
        }
        Ok(data.len() as u32)
    }

    /// A refusal about an existing inode, logged with its path.
    fn deny_ino(&self, op: &str, ino: u64, rule: (Refusal, String)) -> FsError {
        let idx = self.store.index();
        match idx.get(ino).ok().flatten() {
            Some(e) => Self::deny(&idx, op, e.parent, Some(&e.name), rule),
            None => FsError::Refused(rule.0),
        }
    }

    /// `close()` of a rewrite: the file must still have all of its bytes.
    fn rewrite_flush(&self, r: &Mutex<rewrite::Rewrite>) -> FsResult<()> {
        let r = lock(r);
        if r.complete() {
            return Ok(());
        }
        let why = if !r.compare_writes && r.wrote {
            format!(
                "the file is sealed at {} bytes, and the writer may not read it: a rewrite \
                 must write all of its bytes again, the same; these are not (its content stays \
                 as it was)",
                r.size
            )
        } else {
            format!(
                "the file is sealed at {} bytes; truncated and written again only up to byte \
                 {}, it would change (its content stays as it was)",
                r.size,
                r.missing_from()
            )
        };
        let ino = r.ino;
        drop(r);
        Err(self.deny_ino("close", ino, (Refusal::NotPermitted, why)))
    }

    fn handle(&self, fh: u64) -> FsResult<Handle> {
        match self
            .handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
        {
            Some(h) => Ok(h.clone()),
            None => Err(FsError::Refused(Refusal::BadHandle)),
        }
    }

    /// The blob file behind a handle on a sealed file (for kernel passthrough). Content the
    /// index holds has none (it is smaller than any file the adapter passes through), nor has
    /// content still arriving from a bucket (its reads wait for each piece's check): `None`.
    pub fn backing_file(&self, fh: u64) -> FsResult<Option<Arc<File>>> {
        match self.handle(fh)? {
            Handle::Read(h) => Ok(self.content_of(&h)?.file().cloned()),
            Handle::Write(_) | Handle::Rewrite(_) => Err(FsError::Refused(Refusal::BadHandle)),
        }
    }

    /// Whether a read of `size` bytes at `offset` of handle `fh` would wait for content still
    /// arriving from a bucket (the adapter then answers it off its request threads). Content
    /// not opened yet and not in the cache may have to come first. (Without a bucket: never,
    /// asked of nothing.)
    pub fn read_would_wait(&self, fh: u64, offset: u64, size: u32) -> bool {
        if self.store.blobs.remote().is_none() {
            return false;
        }
        match self.handle(fh) {
            Ok(Handle::Read(h)) => match &*h.file.read().unwrap_or_else(|p| p.into_inner()) {
                Some(c) => c.would_wait(offset.saturating_add(size as u64)),
                None => h.size > INLINE_MAX && !self.store.blobs.cached(&h.hash),
            },
            _ => false,
        }
    }

    /// Opens the content of sealed handle `fh` now rather than at its first read (on the
    /// adapter's fetch pool, for content that comes from a bucket).
    pub fn open_content_now(&self, fh: u64) -> FsResult<()> {
        match self.handle(fh)? {
            Handle::Read(h) => self.content_of(&h).map(drop),
            _ => Ok(()),
        }
    }

    /// The content of a sealed handle, opened on first use, and again after its fetch failed.
    fn content_of(&self, h: &Sealed) -> FsResult<Arc<Content>> {
        let usable = |slot: &Option<Arc<Content>>| slot.as_ref().filter(|c| !c.failed()).cloned();
        if let Some(c) = usable(&h.file.read().unwrap_or_else(|p| p.into_inner())) {
            return Ok(c);
        }
        let content = self.store.open_content(&h.hash, h.size).map_err(|err| {
            log::warn!(
                "content {} of inode {} cannot be opened: {err}",
                h.hash,
                h.ino
            );
            FsError::Io(io::Error::from_raw_os_error(libc::EIO))
        })?;
        let mut slot = h.file.write().unwrap_or_else(|p| p.into_inner());
        // (Another read may have opened it meanwhile.)
        if let Some(c) = usable(&slot) {
            return Ok(c);
        }
        Ok(slot.insert(Arc::new(content)).clone())
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        let n = match self.handle(fh)? {
            Handle::Read(h) => self.content_of(&h)?.read_at(&mut buf, offset)?,
            Handle::Rewrite(r) => {
                let blob = lock(&r).blob.clone();
                blob.read_at(&mut buf, offset)?
            }
            Handle::Write(w) => {
                let mut w = lock(&w);
                self.load_base(&mut w)?;
                let want = (w.size.saturating_sub(offset)).min(size as u64) as usize;
                w.body.read_at(&mut buf[..want], offset)?
            }
        };
        buf.truncate(n);
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let w = match self.handle(fh)? {
            Handle::Write(w) => w,
            Handle::Rewrite(r) => return self.rewrite_write(&r, offset, data),
            Handle::Read(_) => return Err(FsError::Refused(Refusal::BadHandle)),
        };
        let end = offset.saturating_add(data.len() as u64);
        if end > self.opts.max_file_size {
            return Err(self.too_big("write", fh, end));
        }
        let mut w = lock(&w);
        w.used = true;
        if let Some(code) = w.failed {
            return Err(io::Error::from_raw_os_error(code).into());
        }
        if let Some(why) = w.expect.as_ref().and_then(|x| x.refuses(offset, data)) {
            let ino = w.ino;
            drop(w);
            return Err(self.deny_ino("write", ino, (Refusal::NotPermitted, why)));
        }
        self.load_base(&mut w)?;
        if let Err(e) = w.body.write_at(&self.store.blobs, &self.mem, data, offset) {
            // The file now has a hole of unknown bytes: it is never committed again, and falls
            // back to its last committed version at release.
            w.failed = Some(e.raw_os_error().unwrap_or(libc::EIO));
            log::warn!(
                "inode {}: write failed ({e}); the file keeps its last committed content, if any",
                w.ino
            );
            return Err(e.into());
        }
        self.begin_change(&mut w)?;
        if w.hash_ok {
            if offset == w.hashed {
                w.hasher.update(data, end);
                w.hashed = end;
            } else {
                w.hash_ok = false;
            }
        }
        // Sequential writes of a large file go to the bucket as they come; any other write
        // makes it wait for the commit.
        if w.hash_ok {
            let w = &mut *w;
            if let Some(file) = w.body.unpublished_file() {
                self.store.blobs.stream_feed(&mut w.stream, file, end);
            }
        } else if matches!(w.stream, Streaming::On(_)) {
            self.store.blobs.stream_stop(&mut w.stream);
        }
        w.size = w.size.max(end);
        w.mtime = now_ns();
        lock(&self.writer_attrs).insert(w.ino, (w.size, w.mtime));
        if let Some(model) = w.model {
            self.model_write_activity(model, 0);
        }
        Ok(data.len() as u32)
    }

    /// Drops the row of an unfinished file (or restores its last committed version) and tells
    /// the kernel that the name may be gone or its attributes changed.
    fn abandon(&self, ino: u64) -> io::Result<()> {
        let (row, result) = {
            let row = self.store.index().get(ino)?;
            let result = self.store.retry_busy(
                || format!("dropping the unfinished writes of inode {ino}"),
                |idx| idx.abandon_write(ino),
            );
            (row, result)
        };
        if result.is_ok()
            && let Some(e) = row
            && let Some(hook) = self.vanish_hook.get()
        {
            hook(Invalidate::Entry(e.parent, e.name));
        }
        result
    }

    /// Asks the kernel to forget inode `ino`'s attributes and pages (from the hook's thread).
    /// The number the kernel knows inode `ino` by now (see [`Attr::node`]); for the
    /// notifications, which name inodes by it.
    pub fn node(&self, ino: u64) -> u64 {
        if ino >= models::VIRT_BASE {
            return ino;
        }
        match self.store.index().get(ino) {
            Ok(Some(e)) => node_of(ino, e.generation),
            _ => ino,
        }
    }

    pub fn invalidate_inode(&self, ino: u64) {
        if let Some(hook) = self.vanish_hook.get() {
            hook(Invalidate::Inode(ino));
        }
    }

    /// Drops the rows of unfinished files that could not be dropped at release.
    pub(crate) fn retry_abandoned(&self) {
        let pending = std::mem::take(&mut *lock(&self.abandoned));
        for ino in pending {
            if self.abandon(ino).is_err() {
                lock(&self.abandoned).push(ino);
            }
        }
    }

    /// Records that the writer's bytes or size changed. At the first change after a commit the
    /// row says "being written" until the next commit, so a crash does not leave the earlier
    /// version visible.
    ///
    /// Called only once the change succeeded: a change that fails (`EFBIG`, `ENOSPC`) leaves
    /// the writer and its row as they were, committed content intact. (Marking after the change
    /// is as safe: the caller is not told of the change before the mark is recorded.) If the mark
    /// itself cannot be recorded, the writer fails: at release it falls back to its last
    /// committed version.
    fn begin_change(&self, w: &mut Writer) -> FsResult<()> {
        if !w.dirty
            && w.committed
            && let Err(e) = self.store.retry_busy(
                || format!("write to inode {}", w.ino),
                |idx| {
                    idx.check_writer_session(w.session)?;
                    idx.mark_rewriting(w.ino, w.synced)
                },
            )
        {
            w.failed = Some(e.raw_os_error().unwrap_or(libc::EIO));
            log::warn!(
                "inode {}: cannot record a change ({e}); the file keeps its last committed content",
                w.ino
            );
            return Err(e.into());
        }
        w.dirty = true;
        Ok(())
    }

    /// The refusal of a write or truncate past `--max-file-size` (one log line).
    fn too_big(&self, op: &str, fh: u64, end: u64) -> FsError {
        let ino = self.handle(fh).ok().and_then(|h| match h {
            Handle::Write(w) => Some(lock(&w).ino),
            Handle::Rewrite(r) => Some(lock(&r).ino),
            Handle::Read(_) => None,
        });
        let idx = self.store.index();
        let why = format!(
            "{end} bytes is over --max-file-size ({} bytes)",
            self.opts.max_file_size
        );
        match ino.and_then(|i| idx.get(i).ok().flatten()) {
            Some(e) => Self::deny(
                &idx,
                op,
                e.parent,
                Some(&e.name),
                (Refusal::FileTooBig, why),
            ),
            None => FsError::Refused(Refusal::FileTooBig),
        }
    }

    /// Whether a `flush`, `fsync` or `release` of `fh` may take long: a file larger than
    /// [`HEAVY_COMMIT`] that must be hashed again (written out of order or sparse), or a writer
    /// another thread holds. The adapter runs those on its commit pool, so request threads stay
    /// free for everyone else.
    pub fn commit_is_heavy(&self, fh: u64) -> bool {
        let Ok(Handle::Write(w)) = self.handle(fh) else {
            return false;
        };
        let bucket = self.store.blobs.remote().is_some();
        match w.try_lock() {
            Ok(w) => {
                w.dirty
                    && ((w.size > HEAVY_COMMIT && !(w.hash_ok && w.hashed == w.size))
                        // An upload to a bucket, however the file was written.
                        || (bucket && w.size > INLINE_MAX))
            }
            Err(_) => true,
        }
    }

    /// Whether an `open` of `ino` may take long: a sealed file whose content must first be
    /// fetched from a bucket into the cache. The adapter runs those on a pool of its own.
    pub fn open_is_heavy(&self, ino: u64) -> bool {
        if self.store.blobs.remote().is_none() {
            return false;
        }
        let Ok(Some(e)) = self.store.index().get(ino) else {
            return false;
        };
        e.size > INLINE_MAX && e.hash.is_some_and(|h| !self.store.blobs.cached(&h))
    }

    /// `close()` of a descriptor: commit what this handle wrote.
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        match self.handle(fh)? {
            Handle::Read(_) => Ok(()),
            Handle::Rewrite(r) => self.rewrite_flush(&r),
            Handle::Write(w) => {
                let mut w = lock(&w);
                w.used = true;
                self.commit(&mut w, false)
            }
        }
    }

    pub fn fsync(&self, fh: u64) -> FsResult<()> {
        match self.handle(fh)? {
            Handle::Read(h) => {
                if let Some(f) = self.content_of(&h)?.file() {
                    f.sync_all()?;
                }
                Ok(self.store.index().sync()?)
            }
            Handle::Rewrite(r) => self.rewrite_flush(&r),
            Handle::Write(w) => {
                let mut w = lock(&w);
                w.used = true;
                self.commit(&mut w, true)
            }
        }
    }

    /// The last reference is gone: commit anything left and seal the file.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        let handle = self
            .handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh);
        let w = match handle {
            Some(Handle::Write(w)) => w,
            Some(Handle::Read(h)) => {
                self.forget_if_closed(h.ino);
                return Ok(());
            }
            Some(Handle::Rewrite(r)) => {
                // (An incomplete rewrite's last close was refused, and had the kernel's cached
                // size and pages dropped: see `rewrite_flush`.)
                let ino = lock(&r).ino;
                self.forget_if_closed(ino);
                return Ok(());
            }
            None => return Ok(()),
        };
        let mut w = lock(&w);
        if w.replaces.is_some() && !w.used && w.dirty {
            // A replacement whose open the kernel refused after the daemon answered it
            // (before rewritable files were kept out of passthrough, an `O_TRUNC` open of a
            // large one another process read got `EIO` from the kernel, and the file was
            // emptied): nothing of it was the caller's, and the file keeps its content.
            log::info!(
                "inode {}: a replacement released unused (its open failed): the file keeps its content",
                w.ino
            );
            w.dirty = false;
            w.committed = false;
        }
        let mut result = self.commit(&mut w, false);
        if let Err(e) = &result {
            log::warn!("inode {}: commit at release failed: {e}", w.ino);
        }
        if let Some(x) = &w.expect {
            // Created again at a tombstone, and never with the path's last content: the path
            // stays a tombstone.
            let restored = self.store.index().restore_tombstone(&x.was, now_ns());
            if let Err(e) = restored {
                log::warn!("inode {}: cannot restore its tombstone ({e})", w.ino);
                result = Err(e.into());
            } else if let Some(hook) = self.vanish_hook.get()
                && let Ok(Some(t)) = self.store.index().get(w.ino)
            {
                hook(Invalidate::Entry(t.parent, t.name));
            }
        } else if result.is_err() || !w.committed {
            // The latest content never (fully) reached the index: the file falls back to its
            // last committed version, or the half file disappears.
            if let Err(e) = self.abandon(w.ino) {
                log::warn!(
                    "inode {}: cannot drop the unfinished file yet ({e}); retrying",
                    w.ino
                );
                lock(&self.abandoned).push(w.ino);
                result = Err(e.into());
            }
        }
        if result.is_ok() && w.committed {
            // Sealed: other daemons on the store may serve it from now on.
            self.store.index().seal_later(w.ino);
        }
        if w.replaced {
            // A rewritable file's new content: the kernel forgets the old one's pages and size.
            self.invalidate_inode(w.ino);
        }
        w.body.discard(&self.mem);
        w.released = true;
        lock(&self.recreated).remove(&w.ino);
        self.store.index().owner_at_commit(w.ino, None);
        lock(&self.writer_attrs).remove(&w.ino);
        lock(&self.writing).remove(&w.ino);
        self.forget_if_closed(w.ino);
        self.sealed.notify_all();
        if let Some(model) = w.model {
            self.model_write_activity(model, -1);
        }
        result
    }

    /// Hashes, publishes and records the writer's content if it changed.
    fn commit(&self, w: &mut Writer, durable: bool) -> FsResult<()> {
        if let Some(code) = w.failed {
            return Err(io::Error::from_raw_os_error(code).into());
        }
        if w.dirty {
            self.load_base(w)?;
        }
        if !w.dirty {
            if durable {
                self.store.index().sync()?;
            }
            return Ok(());
        }
        let running = if w.hash_ok && w.hashed == w.size {
            w.hasher.finish()
        } else {
            None
        };
        let (hash, pieces) = if let Some(state) = running {
            state.finish()
        } else {
            let size = w.size;
            w.body.rehash(size)?
        };
        if let Some(x) = &w.expect
            && (hash != x.hash || w.size != x.size)
        {
            // Not (yet) the path's last content: nothing is recorded, the path stays a
            // tombstone. Not a failure of the writer: a shell redirect closes a copy of its
            // descriptor before it writes, and the bytes may still come.
            let why = format!(
                "the path held a file before; its content was {} ({} bytes), these {} bytes differ",
                x.hash, x.size, w.size
            );
            let ino = w.ino;
            return Err(self.deny_ino("close", ino, (Refusal::NotPermitted, why)));
        }
        if let Some((old, size, mtime)) = w.replaces
            && old != hash
        {
            self.store
                .index()
                .history_add(w.ino, &old, size, mtime, now_ns())?;
            w.replaces = None;
            w.replaced = true;
        }
        // Content that fsck found damaged in the store is healed by writing it again (small
        // content: asked and healed inside the commit's transaction).
        let recorded = if w.size <= INLINE_MAX {
            let bytes = w.body.contents(w.size)?;
            self.store
                .commit_inline(w.ino, &hash, w.size, w.mtime, &bytes, w.session)?
        } else {
            let damaged = self.store.index().is_damaged(&hash)?;
            // Before the row: a row another machine can read has its states (if it has none,
            // that machine fetches the content whole before serving it, so they are not worth
            // failing the commit for).
            if let Err(e) = self.store.keep_pieces(&hash, w.size, &pieces) {
                log::warn!("content {hash}: piece states not recorded: {e}");
            }
            let recorded = self.commit_blob(w, &hash, damaged, durable)?;
            if damaged && recorded == Commit::Recorded {
                self.store.retry_busy(
                    || format!("clearing the damage mark of content {hash}"),
                    |idx| idx.clear_damaged(&hash),
                )?;
                Commit::Healed
            } else {
                recorded
            }
        };
        if recorded == Commit::Gone {
            log::debug!(
                "inode {} was removed while open; its content is not recorded",
                w.ino
            );
        }
        if recorded == Commit::Healed {
            log::info!("damaged content {hash} was stored again with the right bytes");
        }
        if durable {
            self.store.index().sync()?;
        }
        w.dirty = false;
        w.committed = true;
        w.synced = durable;
        // (`w.expect` stays: a file created again at a tombstone holds its last content until
        // its release, whatever comes through the descriptor after a commit.)
        Ok(())
    }

    /// Publishes content over [`INLINE_MAX`] as a blob and records it (`Recorded` or `Gone`;
    /// a blob that garbage collection took between the two is stored again).
    fn commit_blob(
        &self,
        w: &mut Writer,
        hash: &Hash,
        damaged: bool,
        durable: bool,
    ) -> FsResult<Commit> {
        let blobs = &self.store.blobs;
        let mut attempts = 0;
        let mut stream = std::mem::take(&mut w.stream);
        loop {
            w.body
                .publish_streamed(blobs, hash, damaged, std::mem::take(&mut stream))?;
            if durable {
                blobs.sync_published(hash)?;
            }
            // Another process holding the index (gc between two of its transactions, fsck) is
            // waited for with the index mutex released; only after `BUSY_PATIENCE` does the
            // commit fail, and then the file keeps its last committed version (`release`).
            let recorded = self.store.retry_busy(
                || format!("commit of inode {}", w.ino),
                |idx| {
                    idx.check_writer_session(w.session)?;
                    idx.commit_file(w.ino, hash, w.size, w.mtime, now_ns(), || {
                        blobs.exists_as(hash, w.size)
                    })
                },
            )?;
            match recorded {
                Commit::BlobMissing if attempts < 3 => {
                    // Garbage collection removed the blob between publish and commit.
                    attempts += 1;
                    log::info!("blob {hash} was collected during a commit; storing it again");
                    w.body.thaw(blobs)?;
                }
                Commit::BlobMissing => {
                    return Err(io::Error::other(format!("blob {hash} keeps disappearing")).into());
                }
                other => return Ok(other),
            }
        }
    }

    // ----- metadata --------------------------------------------------------------------------

    pub fn setattr(&self, ino: u64, change: SetAttr) -> FsResult<Attr> {
        let now = now_ns();
        if change.size.is_some() {
            // truncate(path) of a file another handle is writing: Busy, after giving a release
            // already on its way a moment to arrive, as `open` does.
            let other = lock(&self.writing)
                .get(&ino)
                .is_some_and(|&fh| change.fh != Some(fh));
            if other && self.wait_sealed(ino) {
                let idx = self.store.index();
                return Err(Self::deny(
                    &idx,
                    "truncate",
                    ino,
                    None,
                    (
                        Refusal::Busy,
                        "the file is being written through another handle; only that handle may change its size".into(),
                    ),
                ));
            }
        }
        {
            let idx = self.store.index();
            let e = Self::visible(&idx, ino)?;
            self.read_only(&idx, "setattr", ino, None)?;
            if e.kind == Kind::Dir && e.zone == Zone::Fixed as u8 {
                return Err(Self::deny(
                    &idx,
                    "setattr",
                    ino,
                    None,
                    (
                        Refusal::NotPermitted,
                        "the fixed directories cannot be changed".into(),
                    ),
                ));
            }
            if let Some(size) = change.size {
                if e.kind == Kind::Dir {
                    return Err(FsError::Refused(Refusal::IsDir));
                }
                if size > self.opts.max_file_size && size != e.size {
                    let why = format!(
                        "{size} bytes is over --max-file-size ({} bytes)",
                        self.opts.max_file_size
                    );
                    return Err(Self::deny(
                        &idx,
                        "truncate",
                        e.parent,
                        Some(&e.name),
                        (Refusal::FileTooBig, why),
                    ));
                }
                let writer = self.writer_of(ino);
                match writer {
                    Some(w) => {
                        drop(idx);
                        {
                            let mut w = lock(&w);
                            if let Some(code) = w.failed {
                                return Err(io::Error::from_raw_os_error(code).into());
                            }
                            if w.base_pending && size == 0 {
                                // A replacement's `O_TRUNC`: its old content is never
                                // copied, and the hash starts from nothing.
                                w.base_pending = false;
                                w.hasher = hashing::RunningHash::new();
                                w.hashed = 0;
                            } else {
                                self.load_base(&mut w)?;
                                let old = w.size;
                                // A failed set_len (EFBIG, ENOSPC) leaves the bytes as they
                                // were.
                                w.body.set_len(&self.store.blobs, &self.mem, old, size)?;
                                if size != w.size {
                                    w.hash_ok = false;
                                    self.store.blobs.stream_stop(&mut w.stream);
                                }
                            }
                            w.size = size;
                            w.mtime = now;
                            if !w.released {
                                lock(&self.writer_attrs).insert(w.ino, (w.size, w.mtime));
                            }
                            self.begin_change(&mut w)?;
                        }
                        // The writer's lock is released: getattr takes it again.
                        return self.setattr(
                            ino,
                            SetAttr {
                                size: None,
                                ..change
                            },
                        );
                    }
                    // ftruncate(0) of a rewrite, or the O_TRUNC of its open (the adapter
                    // passes that open's handle): every byte must be written again before
                    // close(). Nothing others see changes, no time either, so the reply has
                    // the sealed size and the kernel keeps its size and pages of the file.
                    None if size == 0
                        && let Some(Handle::Rewrite(r)) =
                            change.fh.and_then(|fh| self.handle(fh).ok())
                        && lock(&r).ino == ino =>
                    {
                        lock(&r).truncate();
                        drop(idx);
                        return self.getattr(ino);
                    }
                    None if size != e.size => {
                        return Err(Self::deny(
                            &idx,
                            "truncate",
                            ino,
                            None,
                            (
                                Refusal::NotPermitted,
                                "the file is sealed: its size cannot change".into(),
                            ),
                        ));
                    }
                    // The size it has, and nothing else: no change (as `truncate(2)` to the
                    // same size, or the truncate of an `O_TRUNC` open of an empty file).
                    None if change.mode.is_none()
                        && change.uid.is_none()
                        && change.gid.is_none()
                        && change.mtime.is_none()
                        && change.atime.is_none() =>
                    {
                        drop(idx);
                        return self.getattr(ino);
                    }
                    None => {}
                }
            }
            let ns = |t: SetTime| match t {
                SetTime::Now => now,
                SetTime::At(t) => to_ns(t),
            };
            let mtime = change.mtime.map(ns);
            let (mut mode, mut uid, mut gid) =
                (change.mode.map(|m| m & 0o7777), change.uid, change.gid);
            if let Some(r) = lock(&self.recreated).get_mut(&ino) {
                // Created again at its tombstone and still written: `stat` shows these. Until
                // it has the path's last content, the row keeps the removed file's mode and
                // owner, and takes these with that content (see `recreate_at_tombstone`).
                r.mode = mode.unwrap_or(r.mode);
                r.uid = uid.unwrap_or(r.uid);
                r.gid = gid.unwrap_or(r.gid);
                if idx.owner_pending(ino) {
                    idx.owner_at_commit(ino, Some((r.mode, r.uid, r.gid, r.birth)));
                    (mode, uid, gid) = (None, None, None);
                }
            }
            idx.change_meta(
                ino,
                &MetaChange {
                    mode,
                    uid,
                    gid,
                    mtime,
                    atime: change.atime.map(ns),
                    ctime: now,
                },
            )?;
            drop(idx);
            if let Some(t) = mtime {
                match self.writer_of(ino) {
                    // cp -a and shutil.copy2 set times before close(); the commit must keep them.
                    Some(w) => {
                        let mut w = lock(&w);
                        w.mtime = t;
                        if !w.released {
                            lock(&self.writer_attrs).insert(w.ino, (w.size, w.mtime));
                        }
                    }
                    // A release under way (its handle is gone, its size and mtime not yet):
                    // what `stat` shows until it ends has this time too, or the reply to this
                    // very call would show the writer's older one.
                    None => {
                        if let Some(a) = lock(&self.writer_attrs).get_mut(&ino) {
                            a.1 = t;
                        }
                    }
                }
            }
        }
        self.getattr(ino)
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        let idx = self.store.index();
        self.read_only(&idx, "unlink", parent, Some(name))?;
        let pdir = Self::dir(&idx, parent)?;
        let e = match idx.lookup(parent, name)? {
            Some(e) if e.state != State::Tombstone => e,
            _ => {
                return self
                    .unlink_link(&idx, &pdir, name)
                    .unwrap_or(Err(FsError::Refused(Refusal::NotFound)));
            }
        };
        if e.kind == Kind::Dir {
            return Err(FsError::Refused(Refusal::IsDir));
        }
        namespace::unlink(namespace::place_of(pdir.ino, pdir.zone))
            .map_err(|r| Self::deny(&idx, "unlink", parent, Some(name), r))?;
        if let Some(unit) = self.model_guard(&idx, "unlink", &e, None)? {
            // A file of a draft below models/: removed outright, the name is free again.
            self.keep_if_open(&e);
            self.model_change(&idx, "unlink", &e, unit, |idx| {
                idx.delete_row(e.ino)?;
                idx.touch_dir(parent, now_ns())
            })?;
            self.model_touch(&idx, unit, true)?;
            return Ok(());
        }
        match e.state {
            // Never sealed: gone without a tombstone (but an fsync'd version keeps one). Its
            // descriptors still work until they are closed (`fstat` shows no link).
            State::Writing => {
                self.keep_if_open(&e);
                idx.unlink_unsealed(e.ino, now_ns())?
            }
            _ => idx.tombstone(e.ino, now_ns())?,
        }
        log::debug!("unlinked inode {} (tombstone kept)", e.ino);
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        exchange: bool,
    ) -> FsResult<()> {
        self.rename_once(parent, name, new_parent, new_name, exchange, false)
    }

    fn rename_once(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        exchange: bool,
        retried: bool,
    ) -> FsResult<()> {
        let idx = self.store.index();
        self.read_only(&idx, "rename", parent, Some(name))?;
        if exchange {
            return Err(Self::deny(
                &idx,
                "rename",
                parent,
                Some(name),
                (Refusal::Invalid, "RENAME_EXCHANGE is not supported".into()),
            ));
        }
        let src_dir = Self::dir(&idx, parent)?;
        let dst_dir = Self::dir(&idx, new_parent)?;
        let e = match idx.lookup(parent, name)? {
            Some(e) if e.state != State::Tombstone => e,
            _ => {
                return self
                    .rename_link(&idx, &src_dir, name, &dst_dir, new_name)
                    .unwrap_or(Err(FsError::Refused(Refusal::NotFound)));
            }
        };
        if parent == new_parent && name == new_name {
            return Ok(());
        }
        if idx.owner_pending(e.ino) {
            // Its row is the tombstone's until then, which must stay where it is.
            return Err(Self::deny(
                &idx,
                "rename",
                parent,
                Some(name),
                (
                    Refusal::Busy,
                    "created again at a tombstone, it moves only once it has the path's last \
                     content"
                        .into(),
                ),
            ));
        }
        if e.kind == Kind::Dir {
            return Err(Self::deny(
                &idx,
                "rename",
                parent,
                Some(name),
                (
                    Refusal::NotPermitted,
                    "directories cannot be renamed".into(),
                ),
            ));
        }
        namespace::unlink(namespace::place_of(src_dir.ino, src_dir.zone))
            .map_err(|r| Self::deny(&idx, "rename", parent, Some(name), r))?;
        let zone = namespace::create_file(namespace::place_of(dst_dir.ino, dst_dir.zone), new_name)
            .map_err(|r| Self::deny(&idx, "rename to", new_parent, Some(new_name), r))?;
        let src_unit = self.model_guard(&idx, "rename", &e, None)?;
        self.model_guard(&idx, "rename to", &dst_dir, Some(new_name))?;
        self.refuse_mlmodel_over_versions(&idx, "rename to", &dst_dir, new_name)?;
        // Both sealed: no writer here, nor one on another machine that committed the row and
        // still holds it open (it could still change it).
        let sealed =
            |row: &Entry| self.is_sealed_row(row) && !lock(&self.writing).contains_key(&row.ino);
        // (The unit the file joins: asked once, for this check and the touch at the end.)
        let dst_unit = self.unit_for_new(&idx, &dst_dir, e.ino)?;
        if !sealed(&e) && (dst_unit.is_some() || src_unit.is_some()) {
            // A version never holds a file still being written: its writer, counted for the
            // model it was created in (or none), could change it after the version is READY.
            if !retried {
                drop(idx);
                self.wait_released(e.ino);
                return self.rename_once(parent, name, new_parent, new_name, exchange, true);
            }
            return Err(Self::deny(
                &idx,
                "rename",
                parent,
                Some(name),
                (
                    Refusal::Busy,
                    "the file is still open for writing; a file moves into or within models/ once closed".into(),
                ),
            ));
        }
        if let Some(existing) = idx.lookup(new_parent, new_name)? {
            // rsync's temp file renamed onto an identical copy, a retried `mv`: nothing
            // changes at the target; the source goes, as after `rm`.
            let same = existing.state == State::Live
                && existing.kind == Kind::File
                && e.kind == Kind::File
                && e.state == State::Live
                && e.hash.is_some()
                && e.hash == existing.hash;
            let settled = sealed(&e) && sealed(&existing);
            if same && !settled && !retried {
                // A release already on its way (close() returned a moment ago): give it the
                // same grace as open(), then decide again.
                drop(idx);
                self.wait_released(e.ino);
                self.wait_released(existing.ino);
                return self.rename_once(parent, name, new_parent, new_name, exchange, true);
            }
            if same && settled {
                // As POSIX rename: the target name now names the source's inode (which the
                // kernel's cache already assumes); the path's content is the same as before.
                log::info!(
                    "rename {} onto {}: the same content, so the path's content does not change",
                    log_path(&idx.path_of(e.ino)?),
                    log_path(&idx.path_of(existing.ino)?)
                );
                let tombstone = src_unit.is_none();
                let now = now_ns();
                if !idx.rename_file_replacing(
                    e.ino,
                    Some(existing.ino),
                    new_parent,
                    new_name,
                    zone as u8,
                    now,
                    tombstone,
                )? {
                    return Err(FsError::Refused(Refusal::Exists));
                }
                // Its descriptors keep reading it, with no link left, as after `unlink`.
                self.keep_if_open(&existing);
                return Ok(());
            }
            let why = if existing.state == State::Tombstone {
                "the target path held a file before; paths are write-once"
            } else {
                "the target exists; files are never replaced"
            };
            return Err(Self::deny(
                &idx,
                "rename to",
                new_parent,
                Some(new_name),
                (Refusal::Exists, why.into()),
            ));
        }
        // Below runs/ the old path keeps its content as a tombstone; a model draft's does not.
        let tombstone = src_unit.is_none();
        let units: Vec<_> = [src_unit, self.model_unit(&idx, &dst_dir)?]
            .into_iter()
            .flatten()
            .collect();
        let renamed = self.unsealed_then(&idx, &units, |idx| {
            idx.rename_file(e.ino, new_parent, new_name, zone as u8, now_ns(), tombstone)
        })?;
        let Some(renamed) = renamed else {
            // Sealed by another machine since the guards: refused as they refuse.
            self.model_guard(&idx, "rename", &e, None)?;
            self.model_guard(&idx, "rename to", &dst_dir, Some(new_name))?;
            return Err(FsError::Refused(Refusal::NotPermitted));
        };
        if !renamed {
            return Err(FsError::Refused(Refusal::Exists));
        }
        if let Some(unit) = src_unit {
            self.model_touch(&idx, unit, true)?;
        }
        if let Some(unit) = dst_unit {
            self.model_touch(&idx, unit, true)?;
        }
        Ok(())
    }

    /// `mknod`: regular files are created empty and sealed; anything else is refused.
    pub fn mknod(&self, caller: Caller, parent: u64, name: &[u8], mode: u32) -> FsResult<Attr> {
        if mode & libc::S_IFMT != libc::S_IFREG {
            let idx = self.store.index();
            self.read_only(&idx, "mknod", parent, Some(name))?;
            return Err(Self::deny(
                &idx,
                "mknod",
                parent,
                Some(name),
                namespace::special_file("device nodes, FIFOs and sockets").unwrap_err(),
            ));
        }
        let (attr, fh) = self.create(caller, parent, name, mode)?;
        self.release(fh)?;
        self.getattr(attr.ino)
    }

    /// The attributes of `node` (the kernel's number), an earlier generation of its inode, for
    /// a descriptor of it (a file removed, then created again at its tombstone, which must
    /// have the content it had): as a handle open on that generation saw its row (beside other
    /// machines: the row may be gone since), else the size the row keeps for that content, not
    /// what a writer of the new one has written so far; no link.
    pub fn getattr_earlier(&self, node: u64) -> FsResult<Attr> {
        let ino = ino_of_node(node);
        let generation = ((node >> NODE_GENERATION_SHIFT) & 0xffff) as u32;
        let e = match self.row_held_open(ino, Some(generation)) {
            Some(e) => e,
            None => self
                .store
                .index()
                .get(ino)?
                .ok_or(FsError::Refused(Refusal::NotFound))?,
        };
        let mut attr = self.attr_of_row(&e);
        if e.kind == Kind::File {
            attr.size = e.size;
        }
        attr.nlink = 0;
        Ok(attr)
    }

    /// The refusal (`Busy`, one log line) of `op` on inode `ino`, for a reason only the
    /// adapter sees (what the kernel holds open).
    pub fn refuse_busy(&self, op: &str, ino: u64, why: &str) -> FsError {
        self.deny_ino(op, ino, (Refusal::Busy, why.to_string()))
    }

    pub fn refuse_link(&self, op: &str, parent: u64, name: &[u8]) -> FsError {
        let idx = self.store.index();
        if let Err(e) = self.read_only(&idx, op, parent, Some(name)) {
            return e;
        }
        Self::deny(
            &idx,
            op,
            parent,
            Some(name),
            namespace::special_file("symbolic and hard links").unwrap_err(),
        )
    }

    // ----- extended attributes -----------------------------------------------------------------

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        if ino >= models::VIRT_BASE {
            return Err(FsError::Refused(Refusal::NoData));
        }
        // No SELinux labels, capabilities or ACLs here. Saying "not supported" (rather than
        // "no such attribute") lets ls -l stop asking for every file of this file system.
        if name.starts_with(b"security.") || name.starts_with(b"system.") {
            return Err(FsError::Refused(Refusal::NotSupported));
        }
        if name == XATTR_SHA256.as_bytes() {
            // A RELEASE already on its way (`close()` returned a moment ago) is given the same
            // grace as for `open`: the kernel does not wait for it, so this request may come
            // first (found on a shared store: `echo x > f; getfattr f` answered ENODATA).
            self.wait_released(ino);
        }
        let idx = self.store.index();
        let e = Self::visible(&idx, ino)?;
        if name == XATTR_SHA256.as_bytes() {
            return match e.hash {
                Some(h) if self.is_sealed_row(&e) && !lock(&self.writing).contains_key(&ino) => {
                    Ok(h.to_hex().into_bytes())
                }
                _ => Err(FsError::Refused(Refusal::NoData)),
            };
        }
        self.version_xattrs(&idx, &e)?
            .and_then(|attrs| attrs.into_iter().find(|(n, _)| n.as_bytes() == name))
            .map(|(_, v)| v)
            .ok_or(FsError::Refused(Refusal::NoData))
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        if ino >= models::VIRT_BASE {
            return Ok(Vec::new());
        }
        self.wait_sealed(ino); // (as `getxattr` does)
        let idx = self.store.index();
        let e = Self::visible(&idx, ino)?;
        let mut names: Vec<&str> = Vec::new();
        if self.is_sealed_row(&e) && !lock(&self.writing).contains_key(&ino) {
            names.push(XATTR_SHA256);
        }
        if let Some(attrs) = self.version_xattrs(&idx, &e)? {
            names.extend(attrs.iter().map(|(n, _)| *n));
        }
        let mut out = Vec::new();
        for n in names {
            out.extend_from_slice(n.as_bytes());
            out.push(0);
        }
        Ok(out)
    }

    /// `setxattr`: only `user.artifactfs.register.<dir>` on `models/<name>` (registration
    /// without copying); everything else is refused.
    pub fn setxattr(&self, caller: Caller, ino: u64, name: &[u8], value: &[u8]) -> FsResult<()> {
        if let Some(dir) = name.strip_prefix(models::XATTR_REGISTER_PREFIX.as_bytes()) {
            return self.register_from(caller, ino, dir, value).map(|_| ());
        }
        // Copying a file between two places of the store (cp -a, shutil.copy2) copies its
        // xattrs too: setting the hash to what it is is a no-op, not a refusal. A file being
        // written is committed first (as a flush would), so the value is compared with the
        // hash of the bytes written so far; any other value is refused.
        if name == XATTR_SHA256.as_bytes() && !self.opts.read_only {
            if let Some(w) = self.writer_of(ino) {
                self.commit(&mut lock(&w), false)?;
            }
            let idx = self.store.index();
            let e = Self::visible(&idx, ino)?;
            if e.kind == Kind::File {
                if e.hash.map(|h| h.to_hex().into_bytes()) == Some(value.to_vec()) {
                    return Ok(());
                }
                let shown: String = String::from_utf8_lossy(value).chars().take(80).collect();
                let why = format!(
                    "{XATTR_SHA256} is the hash of the file's own content; {shown:?} is not"
                );
                return Err(Self::deny(
                    &idx,
                    "setxattr",
                    e.parent,
                    Some(&e.name),
                    (Refusal::NotSupported, why),
                ));
            }
        }
        let idx = self.store.index();
        self.read_only(&idx, "setxattr", ino, None)?;
        let why = format!(
            "extended attribute {:?} cannot be written: artifactfs keeps only its own, read-only ones",
            String::from_utf8_lossy(name)
        );
        Err(Self::deny(
            &idx,
            "setxattr",
            ino,
            None,
            (Refusal::NotSupported, why),
        ))
    }

    // ----- file system -----------------------------------------------------------------------

    pub fn statfs(&self) -> FsResult<StatFs> {
        let st = self.store.statvfs()?;
        Ok(StatFs {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: st.f_bsize as u32,
            frsize: st.f_frsize as u32,
            namelen: namespace::NAME_MAX as u32,
        })
    }
}

use std::os::unix::ffi::OsStrExt;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::index::{MODELS_INO, RUNS_INO};

    const ME: Caller = Caller {
        uid: 1000,
        gid: 1000,
        pid: 0,
    };

    fn new_fs() -> (tempfile::TempDir, ArtifactFs) {
        let dir = tempfile::tempdir().unwrap();
        let fs = fs_at(dir.path());
        (dir, fs)
    }

    /// The file system of the store in `dir`, opened (again) with the default options.
    fn fs_at(dir: &std::path::Path) -> ArtifactFs {
        ArtifactFs::new(Store::open_writable(dir).unwrap(), FsOptions::default())
    }

    fn refusal<T: std::fmt::Debug>(r: FsResult<T>) -> Refusal {
        match r {
            Err(FsError::Refused(k)) => k,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Creates run `id` and returns the inode of its artifacts/ directory.
    fn run_dir(fs: &ArtifactFs, id: &str) -> u64 {
        let run = fs.mkdir(ME, RUNS_INO, id.as_bytes(), 0o755).unwrap();
        fs.lookup(run.ino, b"artifacts").unwrap().ino
    }

    fn write_file(fs: &ArtifactFs, dir: u64, name: &str, data: &[u8]) -> u64 {
        let (attr, fh) = fs.create(ME, dir, name.as_bytes(), 0o644).unwrap();
        fs.write(fh, 0, data).unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        attr.ino
    }

    fn read_all(fs: &ArtifactFs, ino: u64) -> Vec<u8> {
        let (fh, _) = fs.open(ino, libc::O_RDONLY).unwrap();
        let data = fs.read(fh, 0, 1 << 20).unwrap();
        fs.release(fh).unwrap();
        data
    }

    /// The hash xattr asked right after `close()`, before the kernel's RELEASE arrived (it
    /// does not wait for it): the RELEASE is given its moment, and the hash is the answer.
    #[test]
    fn the_hash_asked_before_the_release_arrives_waits_for_it() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let (attr, fh) = fs.create(ME, art, b"f", 0o644).unwrap();
        fs.write(fh, 0, b"hello").unwrap();
        fs.flush(fh).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                fs.release(fh).unwrap();
            });
            assert_eq!(
                fs.getxattr(attr.ino, XATTR_SHA256.as_bytes()).unwrap(),
                Hash::of(b"hello").to_hex().into_bytes()
            );
        });
        assert_eq!(fs.listxattr(attr.ino).unwrap(), b"user.artifactfs.sha256\0");
    }

    #[test]
    fn a_written_file_is_sealed_and_hashed() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let ino = write_file(&fs, art, "a.txt", b"hello");
        let attr = fs.getattr(ino).unwrap();
        assert!(attr.sealed);
        assert_eq!((attr.size, attr.uid), (5, 1000));
        assert_eq!(read_all(&fs, ino), b"hello");
        assert_eq!(
            fs.getxattr(ino, XATTR_SHA256.as_bytes()).unwrap(),
            Hash::of(b"hello").to_hex().into_bytes()
        );
        // Write-once: opening for writing is a rewrite, and any write that would change the
        // file is refused at once; appending anything too.
        for flags in [
            libc::O_WRONLY,
            libc::O_RDWR,
            libc::O_RDONLY | libc::O_TRUNC,
            libc::O_WRONLY | libc::O_APPEND,
        ] {
            let (fh, _) = fs.open(ino, flags).unwrap();
            assert_eq!(refusal(fs.write(fh, 0, b"HELLO")), Refusal::NotPermitted);
            assert_eq!(refusal(fs.write(fh, 5, b"!")), Refusal::NotPermitted);
            fs.release(fh).unwrap();
        }
        assert_eq!(read_all(&fs, ino), b"hello");
        assert_eq!(
            refusal(fs.setattr(
                ino,
                SetAttr {
                    size: Some(0),
                    ..Default::default()
                }
            )),
            Refusal::NotPermitted
        );
        assert!(
            fs.setattr(
                ino,
                SetAttr {
                    size: Some(5),
                    ..Default::default()
                }
            )
            .is_ok()
        );
        assert_eq!(
            refusal(fs.create(ME, art, b"a.txt", 0o644)),
            Refusal::Exists
        );
    }

    #[test]
    fn an_identical_rewrite_changes_nothing_and_a_differing_one_is_refused_at_once() {
        let (d, fs) = new_fs();
        let art = run_dir(&fs, "r");
        let ino = write_file(&fs, art, "f", b"0123456789");
        let blobs = || walk_count(&d.path().join("blobs"));
        let before = (blobs(), fs.getattr(ino).unwrap());
        // cp over an identical copy: O_TRUNC, then every byte again, in pieces.
        let (fh, _) = fs.open(ino, libc::O_WRONLY | libc::O_TRUNC).unwrap();
        assert_eq!(
            fs.read(fh, 0, 4).unwrap(),
            b"0123",
            "others still see it whole"
        );
        fs.write(fh, 5, b"56789").unwrap();
        // The shell's early close: not complete yet.
        assert_eq!(refusal(fs.flush(fh)), Refusal::NotPermitted);
        fs.write(fh, 0, b"01234").unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        assert_eq!(
            (blobs(), fs.getattr(ino).unwrap()),
            before,
            "nothing stored, nothing changed"
        );
        // The first differing byte fails the write itself.
        let (fh, _) = fs.open(ino, libc::O_RDWR | libc::O_TRUNC).unwrap();
        fs.write(fh, 0, b"0123").unwrap();
        assert_eq!(refusal(fs.write(fh, 4, b"X")), Refusal::NotPermitted);
        assert_eq!(refusal(fs.write(fh, 10, b"more")), Refusal::NotPermitted);
        // Truncated and not all written again: close() says so; the file is as it was.
        assert_eq!(refusal(fs.flush(fh)), Refusal::NotPermitted);
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, ino), b"0123456789");
        // Without O_TRUNC unwritten bytes stay: a matching partial write is fine.
        let (fh, _) = fs.open(ino, libc::O_WRONLY).unwrap();
        fs.write(fh, 3, b"345").unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        // ftruncate(0) through the handle is O_TRUNC; any other size is refused.
        let (fh, _) = fs.open(ino, libc::O_WRONLY).unwrap();
        let resize = |size| SetAttr {
            size: Some(size),
            fh: Some(fh),
            ..Default::default()
        };
        assert_eq!(refusal(fs.setattr(ino, resize(3))), Refusal::NotPermitted);
        fs.setattr(ino, resize(0)).unwrap();
        assert_eq!(fs.getattr(ino).unwrap().size, 10);
        assert_eq!(refusal(fs.flush(fh)), Refusal::NotPermitted);
        fs.write(fh, 0, b"0123456789").unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        // O_APPEND: nothing may be added.
        let (fh, _) = fs.open(ino, libc::O_WRONLY | libc::O_APPEND).unwrap();
        assert_eq!(refusal(fs.write(fh, 10, b"x")), Refusal::NotPermitted);
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, ino), b"0123456789");
    }

    fn walk_count(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.map(|e| {
                    let e = e.unwrap();
                    if e.file_type().unwrap().is_dir() {
                        walk_count(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
            })
            .unwrap_or(0)
    }

    /// A replacement opened as the mount opens it (the kernel keeps `O_TRUNC` for a truncate
    /// after the open) does not read the content it replaces when that truncate comes: here
    /// that content's blob is gone, and the replacement works all the same. Without the
    /// truncate, the old bytes are still the start of the new content.
    #[test]
    fn a_replacements_old_content_is_read_only_when_needed() {
        let (dir, fs) = new_fs();
        let art = run_dir(&fs, "r");
        let old: Vec<u8> = (0..INLINE_MAX as usize + 4096).map(|i| i as u8).collect();
        let meta = write_file(&fs, art, DEFAULT_REWRITABLE, &old);
        let hash = fs.store().index().get(meta).unwrap().unwrap().hash.unwrap();
        let truncate = |fh| SetAttr {
            size: Some(0),
            fh: Some(fh),
            ..Default::default()
        };
        // Without the truncate: a write at 0 keeps the rest of the old bytes.
        let (fh, _) = fs.open(meta, libc::O_WRONLY).unwrap();
        fs.write(fh, 0, b"NEW").unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        let mut expected = old.clone();
        expected[..3].copy_from_slice(b"NEW");
        assert_eq!(read_all(&fs, meta), expected);
        // The current content's blob gone: an O_TRUNC replacement never needs it.
        let now = fs.store().index().get(meta).unwrap().unwrap().hash.unwrap();
        assert_ne!(now, hash);
        std::fs::remove_file(fs.store().blobs.path(&now)).unwrap();
        let (fh, _) = fs.open(meta, libc::O_WRONLY).unwrap();
        fs.setattr(meta, truncate(fh)).unwrap();
        fs.write(fh, 0, b"model_name: iris\n").unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, meta), b"model_name: iris\n");
        drop(dir);
    }

    /// A replacement that the kernel's open refused after the daemon answered it (only a
    /// release follows, no write or flush) leaves the file as it was; one closed without
    /// writing (`: > f`: a flush) empties it.
    #[test]
    fn a_replacement_released_unused_changes_nothing() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r");
        let meta = write_file(&fs, art, DEFAULT_REWRITABLE, b"model_name: null\n");
        let (fh, _) = fs.open(meta, libc::O_WRONLY | libc::O_TRUNC).unwrap();
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, meta), b"model_name: null\n");
        assert!(fs.store().index().history_of(meta).unwrap().is_empty());
        let (fh, _) = fs.open(meta, libc::O_WRONLY | libc::O_TRUNC).unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, meta), b"");
        assert_eq!(fs.store().index().history_of(meta).unwrap().len(), 1);
    }

    #[test]
    fn a_rewritable_name_takes_new_content_and_keeps_the_old_as_history() {
        let (d, fs) = new_fs();
        let art = run_dir(&fs, "r");
        let meta = write_file(&fs, art, DEFAULT_REWRITABLE, b"model_name: null\n");
        let old = Hash::of(b"model_name: null\n");
        // MLflow's overwrite: O_TRUNC, other content.
        let (fh, _) = fs.open(meta, libc::O_WRONLY | libc::O_TRUNC).unwrap();
        assert_eq!(fs.getattr(meta).unwrap().size, 0);
        assert_eq!(refusal(fs.open(meta, libc::O_RDONLY)), Refusal::Busy);
        fs.write(fh, 0, b"model_name: lr\nmodel_version: '1'\n")
            .unwrap();
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, meta), b"model_name: lr\nmodel_version: '1'\n");
        let history = fs.store().index().history_of(meta).unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!((history[0].0, history[0].1), (old, 17));
        // The old content's blob is kept: gc sees it in use.
        assert!(fs.store().index().blob_users(&old).unwrap().0);
        // The same content again: no new history.
        let (fh, _) = fs.open(meta, libc::O_WRONLY | libc::O_TRUNC).unwrap();
        fs.write(fh, 0, b"model_name: lr\nmodel_version: '1'\n")
            .unwrap();
        fs.release(fh).unwrap();
        assert_eq!(fs.store().index().history_of(meta).unwrap().len(), 1);
        // Without O_TRUNC a partial write changes the old content in place.
        let (fh, _) = fs.open(meta, libc::O_WRONLY).unwrap();
        fs.write(fh, 12, b"LR").unwrap();
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, meta), b"model_name: LR\nmodel_version: '1'\n");
        assert_eq!(fs.store().index().history_of(meta).unwrap().len(), 2);
        // A crash in the middle of a new content brings the last one back.
        let (fh, _) = fs.open(meta, libc::O_WRONLY | libc::O_TRUNC).unwrap();
        fs.write(fh, 0, b"half").unwrap();
        let _ = fh;
        drop(fs);
        let fs = ArtifactFs::new(
            Store::open_writable(d.path()).unwrap(),
            FsOptions::default(),
        );
        assert_eq!(read_all(&fs, meta), b"model_name: LR\nmodel_version: '1'\n");
        // Other names stay write-once, and so does the default name with `--rewritable none`.
        let other = write_file(&fs, art, "MLmodel", b"flavors: {}\n");
        let (fh, _) = fs.open(other, libc::O_WRONLY | libc::O_TRUNC).unwrap();
        assert_eq!(refusal(fs.write(fh, 0, b"x")), Refusal::NotPermitted);
        fs.release(fh).unwrap();
        drop(fs);
        let strict = FsOptions {
            rewritable: Vec::new(),
            ..Default::default()
        };
        let fs = ArtifactFs::new(Store::open_writable(d.path()).unwrap(), strict);
        let (fh, _) = fs.open(meta, libc::O_WRONLY | libc::O_TRUNC).unwrap();
        assert_eq!(refusal(fs.write(fh, 0, b"x")), Refusal::NotPermitted);
        fs.release(fh).unwrap();
    }

    #[test]
    fn renaming_onto_the_same_content_removes_the_source_only() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r");
        let dst = write_file(&fs, art, "f", b"same");
        let src = write_file(&fs, art, ".f.tmp", b"same");
        write_file(&fs, art, "other", b"different");
        fs.rename(art, b".f.tmp", art, b"f", false).unwrap();
        // As POSIX rename: the name now names the source's inode, with the same content.
        assert_eq!(fs.lookup(art, b"f").unwrap().ino, src);
        assert_eq!(refusal(fs.getattr(dst)), Refusal::NotFound);
        let dst = src;
        assert_eq!(refusal(fs.lookup(art, b".f.tmp")), Refusal::NotFound);
        assert_eq!(read_all(&fs, dst), b"same");
        // Different content: refused, both stay.
        assert_eq!(
            refusal(fs.rename(art, b"other", art, b"f", false)),
            Refusal::Exists
        );
        assert_eq!(
            read_all(&fs, fs.lookup(art, b"other").unwrap().ino),
            b"different"
        );
        // Onto a file still being written: refused (its content is not final).
        let (_, fh) = fs.create(ME, art, b"open", 0o644).unwrap();
        fs.write(fh, 0, b"same").unwrap();
        fs.flush(fh).unwrap();
        write_file(&fs, art, "again", b"same");
        assert_eq!(
            refusal(fs.rename(art, b"again", art, b"open", false)),
            Refusal::Exists
        );
        fs.release(fh).unwrap();
    }

    #[test]
    fn a_create_at_a_tombstone_waits_for_a_release_on_its_way() {
        // `close(fd); open(path, O_CREAT)` of a removed file: the RELEASE may arrive after the
        // CREATE (seen in CI: EBUSY instead of the tombstone's rule).
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let (_, fh) = fs.create(ME, art, b"c", 0o644).unwrap();
        fs.write(fh, 0, b"v1").unwrap();
        fs.flush(fh).unwrap();
        fs.unlink(art, b"c").unwrap();
        let (attr, again) = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                fs.release(fh).unwrap();
            });
            fs.create(ME, art, b"c", 0o644)
        })
        .unwrap();
        fs.write(again, 0, b"v1").unwrap();
        fs.release(again).unwrap();
        assert_eq!(read_all(&fs, attr.ino), b"v1");
    }

    #[test]
    fn a_tombstone_takes_back_only_its_last_content() {
        let (d, fs) = new_fs();
        let art = run_dir(&fs, "r");
        let ino = write_file(&fs, art, "f", b"the content");
        fs.unlink(art, b"f").unwrap();
        // Different bytes: refused as they are written; the path stays a tombstone.
        let (_, fh) = fs.create(ME, art, b"f", 0o644).unwrap();
        assert_eq!(refusal(fs.write(fh, 0, b"THE")), Refusal::NotPermitted);
        assert_eq!(
            refusal(fs.write(fh, 0, b"the content, longer")),
            Refusal::NotPermitted
        );
        assert_eq!(refusal(fs.release(fh)), Refusal::NotPermitted);
        assert_eq!(refusal(fs.lookup(art, b"f")), Refusal::NotFound);
        // The same bytes (tar -x of the same archive again): the file is back, the same inode.
        let (attr, fh) = fs.create(ME, art, b"f", 0o600).unwrap();
        assert_eq!(attr.ino, ino);
        fs.write(fh, 0, b"the content").unwrap();
        fs.release(fh).unwrap();
        let back = fs.lookup(art, b"f").unwrap();
        assert_eq!((back.ino, back.perm, back.sealed), (ino, 0o600, true));
        assert_eq!(read_all(&fs, ino), b"the content");
        // Its last content once more, committed, then more bytes through the same descriptor
        // (`{ echo a; echo b; } > f`): refused; the path keeps its one content.
        fs.unlink(art, b"f").unwrap();
        let (_, fh) = fs.create(ME, art, b"f", 0o644).unwrap();
        fs.write(fh, 0, b"the content").unwrap();
        fs.flush(fh).unwrap();
        assert_eq!(
            refusal(fs.write(fh, 11, b" and more")),
            Refusal::NotPermitted
        );
        assert_eq!(refusal(fs.write(fh, 0, b"THE")), Refusal::NotPermitted);
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, ino), b"the content");
        // Someone who could not read the removed file (mode 0600, another owner) learns
        // nothing from a write's answer: not a byte, not the size; the whole content is
        // compared at close().
        fs.setattr(
            ino,
            SetAttr {
                mode: Some(0o600),
                ..SetAttr::default()
            },
        )
        .unwrap();
        fs.unlink(art, b"f").unwrap();
        let other = Caller::of_request(2000, 2000, 0);
        let (_, fh) = fs.create(other, art, b"f", 0o644).unwrap();
        fs.write(fh, 0, b"X").unwrap();
        fs.write(fh, 100, b"past its end").unwrap();
        assert_eq!(refusal(fs.release(fh)), Refusal::NotPermitted);
        assert_eq!(refusal(fs.lookup(art, b"f")), Refusal::NotFound);
        let (_, fh) = fs.create(other, art, b"f", 0o644).unwrap();
        fs.write(fh, 0, b"the content").unwrap();
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, ino), b"the content");
        // Its content gone (gc after the retention): compared by hash at close().
        fs.unlink(art, b"f").unwrap();
        let _ = &d;
        fs.store
            .index()
            .inline_remove(&Hash::of(b"the content"))
            .unwrap();
        let (_, fh) = fs.create(ME, art, b"f", 0o644).unwrap();
        fs.write(fh, 0, b"the CONTENT").unwrap();
        assert_eq!(refusal(fs.release(fh)), Refusal::NotPermitted);
        assert_eq!(refusal(fs.lookup(art, b"f")), Refusal::NotFound);
        let (_, fh) = fs.create(ME, art, b"f", 0o644).unwrap();
        fs.write(fh, 0, b"the content").unwrap();
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, ino), b"the content");
        // A crash while it is being created again leaves the tombstone.
        fs.unlink(art, b"f").unwrap();
        let (_, fh) = fs.create(ME, art, b"f", 0o644).unwrap();
        fs.write(fh, 0, b"the").unwrap();
        drop(fs);
        let fs = ArtifactFs::new(
            Store::open_writable(d.path()).unwrap(),
            FsOptions::default(),
        );
        let _ = fh;
        let run = fs.lookup(RUNS_INO, b"r").unwrap().ino;
        let art = fs.lookup(run, b"artifacts").unwrap().ino;
        assert_eq!(refusal(fs.lookup(art, b"f")), Refusal::NotFound);
        let row = fs.store().index().get(ino).unwrap().unwrap();
        assert_eq!(row.state, State::Tombstone);
    }

    #[test]
    fn flush_before_and_after_writes_commits_each_time_and_release_seals() {
        // The shell-redirect pattern: a flush with no data, then writes, then flush + release.
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let (attr, fh) = fs.create(ME, art, b"out", 0o644).unwrap();
        fs.flush(fh).unwrap();
        assert_eq!(fs.getattr(attr.ino).unwrap().size, 0);
        assert!(!fs.getattr(attr.ino).unwrap().sealed);
        fs.write(fh, 0, b"a\n").unwrap();
        fs.flush(fh).unwrap(); // a forked child closing its copy
        fs.write(fh, 2, b"b\n").unwrap();
        // Another process cannot open a file that is still being written.
        assert_eq!(refusal(fs.open(attr.ino, libc::O_RDONLY)), Refusal::Busy);
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        assert!(fs.getattr(attr.ino).unwrap().sealed);
        assert_eq!(read_all(&fs, attr.ino), b"a\nb\n");
    }

    #[test]
    fn random_writes_and_read_back_within_the_handle() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let (attr, fh) = fs.create(ME, art, b"zip", 0o644).unwrap();
        fs.write(fh, 0, b"xxxxBODY").unwrap();
        fs.write(fh, 0, b"HEAD").unwrap(); // seek back and patch
        assert_eq!(fs.read(fh, 0, 100).unwrap(), b"HEADBODY");
        fs.write(fh, 12, b"!").unwrap(); // a gap reads as zeros
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, attr.ino), b"HEADBODY\0\0\0\0!");
        assert_eq!(
            fs.getxattr(attr.ino, XATTR_SHA256.as_bytes()).unwrap(),
            Hash::of(b"HEADBODY\0\0\0\0!").to_hex().into_bytes()
        );
    }

    #[test]
    fn ftruncate_of_a_file_being_written_grows_and_shrinks_it() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let (attr, fh) = fs.create(ME, art, b"sparse", 0o644).unwrap();
        fs.write(fh, 0, b"abc").unwrap();
        let grown = fs
            .setattr(
                attr.ino,
                SetAttr {
                    size: Some(10),
                    fh: Some(fh),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(grown.size, 10);
        fs.setattr(
            attr.ino,
            SetAttr {
                size: Some(2),
                fh: Some(fh),
                ..Default::default()
            },
        )
        .unwrap();
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, attr.ino), b"ab");
    }

    #[test]
    fn truncate_by_path_of_a_file_being_written_is_busy() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let (attr, fh) = fs.create(ME, art, b"f", 0o644).unwrap();
        fs.write(fh, 0, b"abc").unwrap();
        let by_path = SetAttr {
            size: Some(1),
            ..Default::default()
        };
        assert_eq!(
            refusal(fs.setattr(attr.ino, by_path.clone())),
            Refusal::Busy
        );
        // Through another handle (another process's descriptor) it is the same.
        let other = SetAttr {
            fh: Some(fh + 1000),
            ..by_path.clone()
        };
        assert_eq!(refusal(fs.setattr(attr.ino, other)), Refusal::Busy);
        assert_eq!(fs.getattr(attr.ino).unwrap().size, 3, "nothing changed");
        // The writer's own descriptor may (ftruncate); metadata by path still may too.
        fs.setattr(
            attr.ino,
            SetAttr {
                size: Some(5),
                fh: Some(fh),
                ..Default::default()
            },
        )
        .unwrap();
        fs.setattr(
            attr.ino,
            SetAttr {
                mode: Some(0o600),
                ..Default::default()
            },
        )
        .unwrap();
        fs.write(fh, 5, b"def").unwrap();
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, attr.ino), b"abc\0\0def");
        // Sealed: the sealed rules apply, whoever asks.
        assert_eq!(
            refusal(fs.setattr(attr.ino, by_path)),
            Refusal::NotPermitted
        );
    }

    /// A small file costs one index transaction: `create` reserves its name in memory, and the
    /// first commit inserts its row with its content. A file removed before any commit costs
    /// none. (Counted from the WAL, whatever code path wrote.)
    #[test]
    fn a_small_file_costs_one_index_transaction() {
        let (d, fs) = new_fs();
        let db = d.path().join("index.sqlite");
        let art = run_dir(&fs, "r");
        let commits = || crate::store::index::wal_commits(&db);
        let before = commits();
        let ino = write_file(&fs, art, "small", b"a few bytes");
        assert_eq!(commits(), before + 1, "create + write + close");
        assert_eq!(read_all(&fs, ino), b"a few bytes");
        // Its seal at release was queued, for the next commit's transaction or the tick's
        // (shared by every file released in between): written now, so it is not counted below.
        fs.store().index().seal_pending().unwrap();
        let before = commits();
        let (attr, fh) = fs.create(ME, art, b"tmp", 0o644).unwrap();
        assert_eq!(fs.lookup(art, b"tmp").unwrap().ino, attr.ino);
        let listed: Vec<Vec<u8>> = fs
            .readdir(art, 0, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(listed, [&b"."[..], b"..", b"small", b"tmp"]);
        fs.write(fh, 0, b"gone").unwrap();
        fs.unlink(art, b"tmp").unwrap();
        fs.release(fh).unwrap();
        assert_eq!(commits(), before, "a file removed before its first commit");
        assert_eq!(refusal(fs.lookup(art, b"tmp")), Refusal::NotFound);
        // Durable: the row is there after a restart.
        drop(fs);
        let fs = ArtifactFs::new(
            Store::open_writable(d.path()).unwrap(),
            FsOptions::default(),
        );
        assert_eq!(read_all(&fs, ino), b"a few bytes");
    }

    #[test]
    fn small_content_marked_damaged_is_refused_at_once_and_healed_by_writing_it_again() {
        let (d, fs) = new_fs();
        let art = run_dir(&fs, "r");
        let ino = write_file(&fs, art, "small", b"right bytes");
        let hash = Hash::of(b"right bytes");
        // Opened (and its answer kept) before the damage is found.
        assert_eq!(read_all(&fs, ino), b"right bytes");
        // A bit flip in the index's copy, and fsck --verify (in its own process) marks it.
        let fsck = rusqlite::Connection::open(d.path().join("index.sqlite")).unwrap();
        fsck.execute(
            "UPDATE inline_content SET data = CAST('wrong bytes' AS BLOB) WHERE hash = ?1",
            [hash.to_hex()],
        )
        .unwrap();
        fsck.execute(
            "INSERT INTO damaged_blobs (hash, found) VALUES (?1, 1)",
            [hash.to_hex()],
        )
        .unwrap();
        // The very next open sees the mark.
        match fs.open(ino, libc::O_RDONLY) {
            Err(FsError::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EIO)),
            other => panic!("open of damaged content: {other:?}"),
        }
        // The same bytes written again (another path) replace the copy and clear the mark, in
        // their commit's transaction.
        write_file(&fs, art, "again", b"right bytes");
        let marks: i64 = fsck
            .query_row("SELECT COUNT(*) FROM damaged_blobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(marks, 0);
        assert!(!fs.store().index().is_damaged(&hash).unwrap());
        assert_eq!(read_all(&fs, ino), b"right bytes");
    }

    /// Holds SQLite's write lock on the store's index from another connection, as `gc` does
    /// during one of its transactions, until dropped.
    struct IndexHolder(rusqlite::Connection);

    impl IndexHolder {
        fn new(store: &std::path::Path) -> IndexHolder {
            let conn = rusqlite::Connection::open(store.join("index.sqlite")).unwrap();
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            IndexHolder(conn)
        }
    }

    impl Drop for IndexHolder {
        fn drop(&mut self) {
            self.0.execute_batch("ROLLBACK").unwrap();
        }
    }

    #[test]
    fn a_commit_waits_for_a_locked_index_while_other_requests_are_served() {
        let (dir, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let other = write_file(&fs, art, "other", b"sealed before");
        let (attr, fh) = fs.create(ME, art, b"f", 0o644).unwrap();
        fs.write(fh, 0, b"committed after the wait").unwrap();
        let holder = IndexHolder::new(dir.path());
        let hold = Duration::from_millis(1500);
        std::thread::scope(|s| {
            let fs = &fs;
            let close = s.spawn(move || {
                let started = std::time::Instant::now();
                (fs.flush(fh), started.elapsed())
            });
            std::thread::sleep(Duration::from_millis(200));
            assert!(!close.is_finished(), "the commit did not wait for the lock");
            // Meanwhile the mount answers: the commit waits with the index mutex released.
            // (Before, it slept in SQLite's busy handler for up to 10 s with the mutex held.)
            for _ in 0..3 {
                let started = std::time::Instant::now();
                assert_eq!(fs.lookup(art, b"other").unwrap().ino, other);
                assert_eq!(fs.getattr(other).unwrap().size, 13);
                assert_eq!(read_all(fs, other), b"sealed before");
                let took = started.elapsed();
                assert!(took < Duration::from_millis(500), "took {took:?}");
                std::thread::sleep(Duration::from_millis(200));
            }
            std::thread::sleep(hold.saturating_sub(Duration::from_millis(800)));
            assert!(!close.is_finished(), "the commit did not wait for the lock");
            drop(holder);
            let (result, waited) = close.join().unwrap();
            result.unwrap();
            assert!(waited >= hold - Duration::from_millis(100), "{waited:?}");
        });
        fs.release(fh).unwrap();
        assert!(fs.getattr(attr.ino).unwrap().sealed);
        assert_eq!(read_all(&fs, attr.ino), b"committed after the wait");
    }

    /// `mkdir models/<name>` and `rmdir` of it change the directory and the model's row in one
    /// transaction: when the row's change fails (as a crash between two would leave it), the
    /// directory stays as it was.
    #[test]
    fn a_models_directory_and_its_row_change_together() {
        let (dir, fs) = new_fs();
        let db = rusqlite::Connection::open(dir.path().join("index.sqlite")).unwrap();
        let fail_on = |event: &str| {
            db.execute_batch(&format!(
                "CREATE TRIGGER fail BEFORE {event} ON registered_models
                 BEGIN SELECT RAISE(FAIL, 'injected'); END;"
            ))
            .unwrap()
        };
        let model_of = |name: &str| {
            let row = fs.store.index().model_by_name(name).unwrap();
            row.map(|r| r.ino)
        };
        fail_on("INSERT");
        assert!(fs.mkdir(ME, MODELS_INO, b"iris", 0o755).is_err());
        assert_eq!(refusal(fs.lookup(MODELS_INO, b"iris")), Refusal::NotFound);
        db.execute_batch("DROP TRIGGER fail").unwrap();
        let m = fs.mkdir(ME, MODELS_INO, b"iris", 0o755).unwrap().ino;
        assert_eq!(model_of("iris"), Some(m));
        fail_on("DELETE");
        assert!(fs.rmdir(MODELS_INO, b"iris").is_err());
        assert_eq!(fs.lookup(MODELS_INO, b"iris").unwrap().ino, m);
        db.execute_batch("DROP TRIGGER fail").unwrap();
        fs.rmdir(MODELS_INO, b"iris").unwrap();
        assert_eq!(model_of("iris"), None);
        assert_eq!(refusal(fs.lookup(MODELS_INO, b"iris")), Refusal::NotFound);
        // A model's row left without its directory (by an earlier version's crash between
        // the two) does not keep a new directory of that name from its row.
        db.execute_batch(
            "INSERT INTO registered_models (ino, name, created) VALUES (999999, 'iris', 0)",
        )
        .unwrap();
        let m = fs.mkdir(ME, MODELS_INO, b"iris", 0o755).unwrap().ino;
        assert_eq!(model_of("iris"), Some(m));
    }

    /// A file or directory made below `models/` is a row, then the version's PENDING mark:
    /// another process holding the index's lock between the two must not fail the request
    /// (nor make its retry meet its own row, `EEXIST`): the mark waits for the lock.
    #[test]
    fn a_new_entry_below_a_model_waits_for_a_busy_index_after_its_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_writable(dir.path()).unwrap();
        store
            .set_busy_timeout(crate::store::DAEMON_BUSY_TIMEOUT)
            .unwrap();
        let fs = ArtifactFs::new(store, FsOptions::default());
        let m = fs.mkdir(ME, MODELS_INO, b"m", 0o755).unwrap().ino;
        let v = fs.mkdir(ME, m, b"v1", 0o755).unwrap().ino;
        // A file is only reserved (SQLite): its first write to the index is the mark.
        let holder = IndexHolder::new(dir.path());
        let hold = Duration::from_millis(600);
        let (made, waited) = std::thread::scope(|s| {
            let fs = &fs;
            let create = s.spawn(move || {
                let started = std::time::Instant::now();
                let made = fs.retrying("create", || fs.create(ME, v, b"MLmodel", 0o644));
                (made, started.elapsed())
            });
            std::thread::sleep(hold);
            drop(holder);
            create.join().unwrap()
        });
        let (attr, fh) = made.expect("the create waited for the lock");
        assert!(waited >= hold - Duration::from_millis(100), "{waited:?}");
        fs.write(fh, 0, b"x").unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        assert!(fs.getattr(attr.ino).unwrap().sealed);
        let status = fs.getxattr(v, models::XATTR_STATUS.as_bytes()).unwrap();
        assert_eq!(status, b"PENDING");
    }

    #[test]
    fn a_commit_that_never_gets_the_lock_fails_and_keeps_the_committed_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_writable(dir.path()).unwrap();
        store.set_busy_patience(Duration::from_millis(300));
        let fs = ArtifactFs::new(store, FsOptions::default());
        let art = run_dir(&fs, "r1");
        // One file committed once, then changed; one that never committed.
        let (kept, fh_k) = fs.create(ME, art, b"kept", 0o644).unwrap();
        fs.write(fh_k, 0, b"v1").unwrap();
        fs.flush(fh_k).unwrap();
        fs.write(fh_k, 0, b"v2 longer").unwrap();
        let (never, fh_n) = fs.create(ME, art, b"never", 0o644).unwrap();
        fs.write(fh_n, 0, b"lost, and close() says so").unwrap();

        let holder = IndexHolder::new(dir.path());
        for fh in [fh_k, fh_n] {
            match fs.flush(fh) {
                Err(FsError::Io(e)) => assert!(crate::store::index::is_busy(&e), "{e}"),
                other => panic!("close() with the index locked: {other:?}"),
            }
            // Nothing can be recorded at release either; the rows wait for `tick`.
            assert!(fs.release(fh).is_err());
        }
        drop(holder);
        fs.retry_abandoned();
        let a = fs.getattr(kept.ino).unwrap();
        assert!(a.sealed && a.size == 2, "{a:?}");
        assert_eq!(read_all(&fs, kept.ino), b"v1");
        assert_eq!(refusal(fs.getattr(never.ino)), Refusal::NotFound);
        assert_eq!(refusal(fs.lookup(art, b"never")), Refusal::NotFound);
        drop(fs);
        let fs = fs_at(dir.path());
        let ino = fs.lookup(art, b"kept").unwrap().ino;
        assert_eq!(read_all(&fs, ino), b"v1", "after a restart");
    }

    #[test]
    fn a_change_that_fails_after_a_commit_keeps_the_committed_content() {
        // open(O_CREAT|O_EXCL), write, dup, close the first fd (a commit), then a change through
        // the dup fails: the file must stay as committed, sealable, and survive a restart.
        let dir = tempfile::tempdir().unwrap();
        let fs = fs_at(dir.path());
        let art = run_dir(&fs, "r1");
        let (truncated, fh_t) = fs.create(ME, art, b"truncated", 0o644).unwrap();
        fs.write(fh_t, 0, b"keep").unwrap();
        fs.flush(fh_t).unwrap();
        let (written, fh_w) = fs.create(ME, art, b"written", 0o644).unwrap();
        fs.write(fh_w, 0, b"keep").unwrap();
        fs.flush(fh_w).unwrap();
        // Growing past the in-memory limit needs STORE/tmp; without it the change fails the
        // way EFBIG or ENOSPC do.
        std::fs::remove_dir(dir.path().join("tmp")).unwrap();
        let big = body::MEM_FILE_MAX + 1;
        let grow = fs.setattr(
            truncated.ino,
            SetAttr {
                size: Some(big),
                fh: Some(fh_t),
                ..Default::default()
            },
        );
        assert!(matches!(grow, Err(FsError::Io(_))), "{grow:?}");
        assert_eq!(fs.getattr(truncated.ino).unwrap().size, 4);
        let write = fs.write(fh_w, 4, &vec![b'x'; big as usize]);
        assert!(matches!(write, Err(FsError::Io(_))), "{write:?}");
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        // The failed ftruncate left nothing to commit: the dup's close() succeeds. The failed
        // write is reported by close(), as before.
        fs.flush(fh_t).unwrap();
        fs.release(fh_t).unwrap();
        assert!(fs.flush(fh_w).is_err());
        let _ = fs.release(fh_w);
        for ino in [truncated.ino, written.ino] {
            let a = fs.getattr(ino).unwrap();
            assert!(a.sealed && a.size == 4, "inode {ino}: {a:?}");
            assert_eq!(read_all(&fs, ino), b"keep");
            assert_eq!(
                fs.getxattr(ino, XATTR_SHA256.as_bytes()).unwrap(),
                Hash::of(b"keep").to_hex().into_bytes()
            );
        }
        drop(fs);
        let fs = fs_at(dir.path());
        for name in [&b"truncated"[..], b"written"] {
            let ino = fs.lookup(art, name).unwrap().ino;
            assert_eq!(read_all(&fs, ino), b"keep", "after a restart");
        }
    }

    #[test]
    fn a_file_written_again_after_a_commit_does_not_survive_a_crash_unless_fsynced() {
        let dir = tempfile::tempdir().unwrap();
        let (art, early, synced) = {
            let fs = fs_at(dir.path());
            let art = run_dir(&fs, "r1");
            // dd / shell redirect: the first close commits the empty file, then the writes.
            let (early, fh) = fs.create(ME, art, b"dd-out", 0o644).unwrap();
            fs.flush(fh).unwrap();
            fs.write(fh, 0, b"half of it").unwrap();
            // A file fsync'd, then written again.
            let (synced, fh2) = fs.create(ME, art, b"synced", 0o644).unwrap();
            fs.write(fh2, 0, b"durable").unwrap();
            fs.fsync(fh2).unwrap();
            fs.write(fh2, 7, b" and more").unwrap();
            // The daemon dies here: no release ever comes.
            (art, early.ino, synced.ino)
        };
        let fs = fs_at(dir.path());
        assert_eq!(
            refusal(fs.getattr(early)),
            Refusal::NotFound,
            "no empty or half file"
        );
        assert_eq!(fs.lookup(art, b"synced").unwrap().ino, synced);
        assert_eq!(read_all(&fs, synced), b"durable");
    }

    /// A re-create at a tombstone makes the row its writer's (mode, owner); a crash before
    /// its release leaves the clean-up to put the tombstone back with them. The removed file's
    /// owner is then unknown: that writer's next attempt must not be answered write by write
    /// (which would give a file it could not read away a byte at a time); root still is.
    #[test]
    fn a_tombstone_a_crash_put_back_is_compared_at_close_only() {
        let dir = tempfile::tempdir().unwrap();
        let other = Caller {
            uid: 65534,
            gid: 65534,
            pid: UNKNOWN_PID,
        };
        let art = {
            let fs = fs_at(dir.path());
            let art = run_dir(&fs, "r1");
            let (_, fh) = fs.create(ME, art, b"f", 0o600).unwrap();
            fs.write(fh, 0, b"topsecret").unwrap();
            fs.flush(fh).unwrap();
            fs.release(fh).unwrap();
            fs.unlink(art, b"f").unwrap();
            let (_, fh) = fs.create(other, art, b"f", 0o644).unwrap();
            fs.write(fh, 0, b"X").unwrap();
            // The daemon dies here: no release ever comes.
            art
        };
        let fs = fs_at(dir.path());
        assert_eq!(refusal(fs.lookup(art, b"f")), Refusal::NotFound);
        for byte in [b"X", b"t"] {
            let (_, fh) = fs.create(other, art, b"f", 0o644).unwrap();
            assert!(fs.write(fh, 0, byte).is_ok(), "answered at the write");
            assert!(fs.flush(fh).is_err());
            // (Its release reports the refusal again; the kernel drops it.)
            let _ = fs.release(fh);
        }
        let (_, fh) = fs.create(ME, art, b"f", 0o644).unwrap();
        assert_eq!(refusal(fs.write(fh, 0, b"X")), Refusal::NotPermitted);
        let _ = fs.release(fh);
    }

    #[test]
    fn identical_content_is_stored_once() {
        let (d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let blobs = || -> usize {
            std::fs::read_dir(d.path().join("blobs/sha256"))
                .unwrap()
                .map(|e| std::fs::read_dir(e.unwrap().path()).unwrap().count())
                .sum()
        };
        let inline = || fs.store.index().inline_list("", 100).unwrap();
        // Small content: one row of the index's content table, no blob.
        write_file(&fs, art, "a", b"same");
        write_file(&fs, art, "b", b"same");
        assert_eq!(inline(), vec![(Hash::of(b"same"), 4)]);
        assert_eq!(blobs(), 0);
        // Larger content: one blob.
        let big = vec![7u8; INLINE_MAX as usize + 1];
        write_file(&fs, art, "c", &big);
        write_file(&fs, art, "d", &big);
        assert_eq!(blobs(), 1);
        assert_eq!(inline().len(), 1);
        assert_eq!(std::fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn content_up_to_the_inline_size_lives_in_the_index() {
        let (d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        for (name, n) in [
            ("empty", 0),
            ("one", 1),
            ("edge", INLINE_MAX),
            ("past", INLINE_MAX + 1),
        ] {
            let bytes: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let ino = write_file(&fs, art, name, &bytes);
            assert_eq!(read_all(&fs, ino), bytes, "{name}");
            let hash = Hash::of(&bytes);
            let held = fs.store.index().inline_get(&hash).unwrap();
            assert_eq!(held.is_some(), n <= INLINE_MAX, "{name}");
            assert_eq!(fs.store.blobs.exists(&hash), n > INLINE_MAX, "{name}");
            assert_eq!(
                fs.getxattr(ino, XATTR_SHA256.as_bytes()).unwrap(),
                hash.to_hex().into_bytes()
            );
        }
        // And after a restart.
        drop(fs);
        let fs = ArtifactFs::new(
            Store::open_writable(d.path()).unwrap(),
            FsOptions::default(),
        );
        let art = fs.lookup(
            fs.lookup(fs.lookup(1, b"runs").unwrap().ino, b"r1")
                .unwrap()
                .ino,
            b"artifacts",
        );
        let edge = fs.lookup(art.unwrap().ino, b"edge").unwrap();
        assert_eq!(read_all(&fs, edge.ino).len() as u64, INLINE_MAX);
    }

    /// A store written before small content moved into the index (layout of schema version
    /// 5: every content a blob file) opens and keeps working: its small blobs stay where they
    /// are and are read from there; new small content goes to the index.
    #[test]
    fn a_store_of_the_blob_only_layout_opens_and_keeps_working() {
        let d = tempfile::tempdir().unwrap();
        old_layout_store(d.path(), &[(b"old", b"small, from before")]);
        let fs = ArtifactFs::new(
            Store::open_writable(d.path()).unwrap(),
            FsOptions::default(),
        );
        let runs = fs.lookup(ROOT_INO, b"runs").unwrap().ino;
        let old = fs.lookup(runs, b"old").unwrap();
        assert_eq!(read_all(&fs, old.ino), b"small, from before");
        let blob = fs.store.blobs.path(&Hash::of(b"small, from before"));
        assert!(blob.exists());
        let art = run_dir(&fs, "r1");
        let new = write_file(&fs, art, "new", b"small, from now on");
        assert_eq!(read_all(&fs, new), b"small, from now on");
        let held = fs.store.index().inline_list("", 10).unwrap();
        assert_eq!(held, vec![(Hash::of(b"small, from now on"), 18)]);
        // gc keeps the old blob while a file uses it, and fsck checks both kinds.
        let r = fs
            .store
            .gc(&crate::store::gc::GcOptions {
                retention: Duration::ZERO,
                dry_run: false,
            })
            .unwrap();
        assert_eq!((r.blobs, r.in_use, r.removed), (2, 2, 0));
        assert!(blob.exists());
        drop(fs);
        let fs = ArtifactFs::new(
            Store::open_writable(d.path()).unwrap(),
            FsOptions::default(),
        );
        let runs = fs.lookup(ROOT_INO, b"runs").unwrap().ino;
        assert_eq!(
            read_all(&fs, fs.lookup(runs, b"old").unwrap().ino),
            b"small, from before"
        );
    }

    /// Test helper: a store in the layout of schema version 5, as the release before inline
    /// content wrote it: files committed with their content as blob files, no content table.
    fn old_layout_store(dir: &std::path::Path, files: &[(&[u8], &[u8])]) {
        {
            let store = Store::open_writable(dir).unwrap();
            for (name, bytes) in files {
                crate::store::committed_test_file(&store, name, bytes);
            }
        }
        let db = rusqlite::Connection::open(dir.join("index.sqlite")).unwrap();
        db.execute_batch(
            "DROP TABLE inline_content; DROP TABLE piece_states;
             ALTER TABLE entries DROP COLUMN generation; PRAGMA user_version = 5;",
        )
        .unwrap();
        drop(db);
        let err = Store::open_readonly(dir).err().expect("a version 5 index");
        assert!(err.to_string().contains("version 5"), "{err}");
    }

    #[test]
    fn writes_after_a_commit_never_change_the_published_blob() {
        let (d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let (attr, fh) = fs.create(ME, art, b"f", 0o644).unwrap();
        fs.write(fh, 0, b"first").unwrap();
        fs.flush(fh).unwrap();
        fs.write(fh, 5, b"+more").unwrap();
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, attr.ino), b"first+more");
        let first = fs.store.index().inline_get(&Hash::of(b"first")).unwrap();
        assert_eq!(first.as_deref(), Some(&b"first"[..]));
        // The same with a body on disk: the published blob is never written again.
        let big = vec![1u8; INLINE_MAX as usize * 2];
        let (attr, fh) = fs.create(ME, art, b"g", 0o644).unwrap();
        fs.write(fh, 0, &big).unwrap();
        fs.flush(fh).unwrap();
        fs.write(fh, big.len() as u64, b"+more").unwrap();
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, attr.ino).len(), big.len() + 5);
        let first = fs.store.blobs.path(&Hash::of(&big));
        assert_eq!(std::fs::read(first).unwrap(), big);
        assert!(d.path().join("tmp").read_dir().unwrap().next().is_none());
    }

    #[test]
    fn unlink_and_rename_leave_tombstones() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let a = write_file(&fs, art, "a", b"1");
        fs.rename(art, b"a", art, b"b", false).unwrap();
        assert_eq!(fs.lookup(art, b"b").unwrap().ino, a);
        assert_eq!(refusal(fs.lookup(art, b"a")), Refusal::NotFound);
        // Created again at the tombstone: only with its last content.
        let (_, fh) = fs.create(ME, art, b"a", 0o644).unwrap();
        assert_eq!(refusal(fs.write(fh, 0, b"2")), Refusal::NotPermitted);
        assert_eq!(refusal(fs.release(fh)), Refusal::NotPermitted);
        assert_eq!(refusal(fs.lookup(art, b"a")), Refusal::NotFound);
        write_file(&fs, art, "c", b"2");
        assert_eq!(
            refusal(fs.rename(art, b"b", art, b"c", false)),
            Refusal::Exists
        );
        assert_eq!(
            refusal(fs.rename(art, b"b", art, b"a", false)),
            Refusal::Exists
        );
        assert_eq!(
            refusal(fs.rename(art, b"b", art, b"z", true)),
            Refusal::Invalid
        );
        fs.unlink(art, b"b").unwrap();
        assert_eq!(refusal(fs.lookup(art, b"b")), Refusal::NotFound);
        assert_eq!(refusal(fs.mkdir(ME, art, b"b", 0o755)), Refusal::Exists);
    }

    #[test]
    fn a_file_removed_before_its_first_commit_leaves_no_trace() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let (_attr, fh) = fs.create(ME, art, b"scratch", 0o644).unwrap();
        fs.unlink(art, b"scratch").unwrap();
        fs.write(fh, 0, b"gone").unwrap();
        fs.release(fh).unwrap();
        assert_eq!(refusal(fs.lookup(art, b"scratch")), Refusal::NotFound);
        write_file(&fs, art, "scratch", b"allowed: the path never held content");
    }

    #[test]
    fn directories_follow_the_namespace() {
        let (_d, fs) = new_fs();
        assert_eq!(
            refusal(fs.mkdir(ME, ROOT_INO, b"x", 0o755)),
            Refusal::NotPermitted
        );
        assert_eq!(
            refusal(fs.mkdir(ME, RUNS_INO, b"bad\nid", 0o755)),
            Refusal::Invalid
        );
        assert_eq!(
            refusal(fs.mkdir(ME, MODELS_INO, b"a:b", 0o755)),
            Refusal::Invalid
        );
        assert_eq!(
            refusal(fs.create(ME, RUNS_INO, b"f", 0o644)),
            Refusal::NotPermitted
        );
        let art = run_dir(&fs, "r1");
        let run = fs.lookup(RUNS_INO, b"r1").unwrap().ino;
        assert_eq!(
            refusal(fs.mkdir(ME, RUNS_INO, b"r1", 0o755)),
            Refusal::Exists
        );
        let sub = fs.mkdir(ME, art, b"sub", 0o755).unwrap().ino;
        write_file(&fs, sub, "f", b"x");
        assert_eq!(refusal(fs.rmdir(art, b"sub")), Refusal::NotEmpty);
        assert_eq!(
            refusal(fs.rename(art, b"sub", art, b"sub2", false)),
            Refusal::NotPermitted
        );
        assert_eq!(refusal(fs.rmdir(run, b"artifacts")), Refusal::NotPermitted);
        fs.unlink(sub, b"f").unwrap();
        fs.rmdir(art, b"sub").unwrap();
        // mkdir revives the same directory, so its tombstones still apply.
        assert_eq!(fs.mkdir(ME, art, b"sub", 0o700).unwrap().ino, sub);
        let (_, fh) = fs.create(ME, sub, b"f", 0o644).unwrap();
        assert_eq!(
            refusal(fs.release(fh)),
            Refusal::NotPermitted,
            "empty is not its content"
        );
        assert_eq!(refusal(fs.lookup(sub, b"f")), Refusal::NotFound);
        // A run whose only entry is an empty artifacts/ can be removed, and made again.
        let art2 = run_dir(&fs, "r2");
        fs.rmdir(RUNS_INO, b"r2").unwrap();
        assert_eq!(run_dir(&fs, "r2"), art2);
        let names: Vec<_> = fs
            .readdir(RUNS_INO, 0, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(
            names,
            [
                b".".to_vec(),
                b"..".to_vec(),
                b"r1".to_vec(),
                b"r2".to_vec()
            ]
        );
    }

    #[test]
    fn utimens_during_a_release_shows_its_time_at_once() {
        // `close(); utime()`: the RELEASE may be under way, its handle gone but the writer's
        // size and mtime not yet (seen in CI: the reply to utime showed the write's mtime).
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let (attr, fh) = fs.create(ME, art, b"f", 0o644).unwrap();
        fs.write(fh, 0, b"data").unwrap();
        fs.flush(fh).unwrap();
        // The first step of release: the handle is gone.
        let handle = fs.handles.write().unwrap().remove(&fh).unwrap();
        let t = UNIX_EPOCH + Duration::new(2, 2);
        let change = SetAttr {
            mtime: Some(SetTime::At(t)),
            atime: Some(SetTime::At(UNIX_EPOCH + Duration::new(1, 1))),
            ..Default::default()
        };
        assert_eq!(fs.setattr(attr.ino, change).unwrap().mtime, t);
        // The rest of the release.
        fs.handles.write().unwrap().insert(fh, handle);
        fs.release(fh).unwrap();
        assert_eq!(fs.getattr(attr.ino).unwrap().mtime, t);
    }

    #[test]
    fn metadata_changes_are_stored_and_survive_the_commit() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let (attr, fh) = fs.create(ME, art, b"f", 0o644).unwrap();
        fs.write(fh, 0, b"data").unwrap();
        let old = UNIX_EPOCH + Duration::from_secs(1_000_000);
        // cp -a: fchmod + futimens before close.
        fs.setattr(
            attr.ino,
            SetAttr {
                mode: Some(0o600),
                mtime: Some(SetTime::At(old)),
                ..Default::default()
            },
        )
        .unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        let a = fs.getattr(attr.ino).unwrap();
        assert_eq!((a.perm, a.mtime), (0o600, old));
        assert_eq!(
            refusal(fs.setattr(
                RUNS_INO,
                SetAttr {
                    mode: Some(0o777),
                    ..Default::default()
                }
            )),
            Refusal::NotPermitted
        );
    }

    /// Access and modification times are separate; `None` (`UTIME_OMIT`) keeps a time as it
    /// is; times far from now (2100, before 1970, sub-second) come back exactly.
    #[test]
    fn access_and_modification_times_are_set_separately_and_exactly() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let ino = write_file(&fs, art, "f", b"x");
        let before = fs.getattr(ino).unwrap();
        assert_eq!(
            before.atime, before.crtime,
            "a new file's atime is its creation"
        );
        let y2100 = UNIX_EPOCH + Duration::new(4_102_444_800, 123_456_789);
        let set = |atime, mtime| {
            fs.setattr(
                ino,
                SetAttr {
                    atime,
                    mtime,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let a = set(Some(SetTime::At(y2100)), None);
        assert_eq!((a.atime, a.mtime), (y2100, before.mtime));
        assert!(a.ctime > before.ctime, "utimens changes ctime");
        let pre = UNIX_EPOCH - Duration::new(1, 500_000_000);
        let a = set(None, Some(SetTime::At(pre)));
        assert_eq!((a.atime, a.mtime), (y2100, pre));
        // Reading does not change the access time.
        let (fh, _) = fs.open(ino, libc::O_RDONLY).unwrap();
        fs.read(fh, 0, 10).unwrap();
        fs.release(fh).unwrap();
        assert_eq!(fs.getattr(ino).unwrap().atime, y2100);
        // The conversion itself, at the edges of what nanoseconds in an i64 hold.
        for t in [y2100, pre, UNIX_EPOCH, UNIX_EPOCH - Duration::from_nanos(1)] {
            assert_eq!(from_ns(to_ns(t)), t);
        }
        for ns in [i64::MIN, i64::MAX, -1, 0] {
            assert_eq!(to_ns(from_ns(ns)), ns.max(-i64::MAX));
        }
        let far = UNIX_EPOCH + Duration::from_secs(400 * 365 * 86_400);
        assert_eq!(
            to_ns(far),
            i64::MAX,
            "past 2262: the latest time an i64 holds"
        );
    }

    /// A directory's mtime and ctime follow every name created, removed or renamed in it.
    #[test]
    fn directories_change_when_names_come_and_go() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let sub = fs.mkdir(ME, art, b"sub", 0o755).unwrap().ino;
        // Runs `step` and checks that each of `dirs` changed: mtime and ctime both moved on.
        let check = |what: &str, dirs: &[u64], step: &dyn Fn()| {
            let before: Vec<Attr> = dirs.iter().map(|&d| fs.getattr(d).unwrap()).collect();
            std::thread::sleep(Duration::from_millis(2));
            step();
            for (&d, was) in dirs.iter().zip(before) {
                let now = fs.getattr(d).unwrap();
                assert!(
                    now.mtime > was.mtime && now.ctime > was.ctime && now.mtime == now.ctime,
                    "{what}: directory {d} was {was:?}, is {now:?}"
                );
            }
        };
        check("mkdir", &[art], &|| {
            fs.mkdir(ME, art, b"d", 0o755).unwrap();
        });
        check("create", &[sub], &|| {
            write_file(&fs, sub, "f", b"1");
        });
        check("rename to another directory", &[sub, art], &|| {
            fs.rename(sub, b"f", art, b"g", false).unwrap()
        });
        check("rename in a directory", &[art], &|| {
            fs.rename(art, b"g", art, b"h", false).unwrap()
        });
        check("unlink", &[art], &|| fs.unlink(art, b"h").unwrap());
        check("rmdir", &[art], &|| fs.rmdir(art, b"d").unwrap());
        check("mkdir of a removed directory", &[art], &|| {
            fs.mkdir(ME, art, b"d", 0o755).unwrap();
        });
    }

    /// A file removed while open stays usable through its handle: writes, reads, and its
    /// attributes with no link left. Afterwards the write-once rules apply.
    #[test]
    fn a_file_removed_while_open_stays_usable_until_released() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        // Never committed: no trace afterwards.
        let (attr, fh) = fs.create(ME, art, b"scratch", 0o640).unwrap();
        fs.write(fh, 0, b"abc").unwrap();
        fs.unlink(art, b"scratch").unwrap();
        fs.write(fh, 3, b"def").unwrap();
        assert_eq!(fs.read(fh, 1, 10).unwrap(), b"bcdef");
        let a = fs.getattr(attr.ino).unwrap();
        assert_eq!((a.nlink, a.size, a.perm), (0, 6, 0o640));
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        assert_eq!(refusal(fs.getattr(attr.ino)), Refusal::NotFound);
        assert!(lock(&fs.removed_open).is_empty());
        write_file(&fs, art, "scratch", b"the name is free");
        // Sealed and open for reading: a tombstone, readable until closed.
        let ino = write_file(&fs, art, "kept", b"sealed bytes");
        let (fh, _) = fs.open(ino, libc::O_RDONLY).unwrap();
        fs.unlink(art, b"kept").unwrap();
        assert_eq!(fs.read(fh, 7, 5).unwrap(), b"bytes");
        let a = fs.getattr(ino).unwrap();
        assert_eq!((a.nlink, a.size), (0, 12));
        fs.release(fh).unwrap();
        assert_eq!(refusal(fs.getattr(ino)), Refusal::NotFound);
        // A tombstone: only its last content may come back.
        let (_, fh) = fs.create(ME, art, b"kept", 0o644).unwrap();
        assert_eq!(
            refusal(fs.write(fh, 0, b"other bytes!")),
            Refusal::NotPermitted
        );
        assert_eq!(refusal(fs.release(fh)), Refusal::NotPermitted);
        assert_eq!(refusal(fs.lookup(art, b"kept")), Refusal::NotFound);
    }

    /// A file replaced by a rename of the same content stays usable through the descriptors
    /// open on it, with no link left, as after `unlink` (POSIX `rename`).
    #[test]
    fn a_file_replaced_by_rename_stays_usable_while_open() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        let target = write_file(&fs, art, "t", b"hello\n");
        let source = write_file(&fs, art, "s", b"hello\n");
        let (fh, _) = fs.open(target, libc::O_RDONLY).unwrap();
        fs.rename(art, b"s", art, b"t", false).unwrap();
        assert_eq!(fs.lookup(art, b"t").unwrap().ino, source);
        let a = fs.getattr(target).unwrap();
        assert_eq!((a.nlink, a.size), (0, 6));
        assert_eq!(fs.read(fh, 0, 10).unwrap(), b"hello\n");
        fs.release(fh).unwrap();
        assert_eq!(refusal(fs.getattr(target)), Refusal::NotFound);
        assert!(lock(&fs.removed_open).is_empty());
    }

    #[test]
    fn the_sha256_xattr_can_only_be_set_to_the_contents_own_hash() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r");
        let sealed = write_file(&fs, art, "sealed.txt", b"sealed");
        let name = XATTR_SHA256.as_bytes();
        let of = |b: &[u8]| Hash::of(b).to_hex().into_bytes();
        fs.setxattr(ME, sealed, name, &of(b"sealed")).unwrap();
        assert_eq!(
            refusal(fs.setxattr(ME, sealed, name, &of(b"other"))),
            Refusal::NotSupported
        );
        // While being written (cp -a sets it before close): compared with the bytes so far.
        let (attr, fh) = fs.create(ME, art, b"open.txt", 0o644).unwrap();
        fs.write(fh, 0, b"partial").unwrap();
        assert_eq!(
            refusal(fs.setxattr(ME, attr.ino, name, &of(b"anything"))),
            Refusal::NotSupported
        );
        assert_eq!(
            refusal(fs.setxattr(ME, attr.ino, name, b"not hex at all")),
            Refusal::NotSupported
        );
        fs.setxattr(ME, attr.ino, name, &of(b"partial")).unwrap();
        fs.write(fh, 7, b" and more").unwrap();
        fs.setxattr(ME, attr.ino, name, &of(b"partial and more"))
            .unwrap();
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, attr.ino), b"partial and more");
        assert_eq!(
            fs.getxattr(attr.ino, name).unwrap(),
            of(b"partial and more")
        );
    }

    #[test]
    fn files_past_the_maximum_size_are_efbig_and_keep_their_content() {
        let dir = tempfile::tempdir().unwrap();
        let fs = ArtifactFs::new(
            Store::open_writable(dir.path()).unwrap(),
            FsOptions {
                max_file_size: 1 << 20,
                ..Default::default()
            },
        );
        let art = run_dir(&fs, "r");
        let (attr, fh) = fs.create(ME, art, b"f", 0o644).unwrap();
        fs.write(fh, 0, b"keep").unwrap();
        // One byte at 8 TiB, one past the limit, a size past it: refused before any change.
        for offset in [8u64 << 40, 1 << 20, u64::MAX - 1] {
            assert_eq!(refusal(fs.write(fh, offset, b"x")), Refusal::FileTooBig);
        }
        let grow = SetAttr {
            size: Some((1 << 20) + 1),
            fh: Some(fh),
            ..Default::default()
        };
        assert_eq!(refusal(fs.setattr(attr.ino, grow)), Refusal::FileTooBig);
        // Exactly the maximum is allowed.
        fs.write(fh, (1 << 20) - 1, b"y").unwrap();
        assert!(!fs.commit_is_heavy(fh), "1 MiB is no long commit");
        fs.release(fh).unwrap();
        let mut want = vec![0u8; 1 << 20];
        want[..4].copy_from_slice(b"keep");
        want[(1 << 20) - 1] = b'y';
        assert_eq!(read_all(&fs, attr.ino), want);
    }

    #[test]
    fn a_sparse_file_needs_a_long_commit_and_a_sequential_one_does_not() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r");
        let (_, sparse) = fs.create(ME, art, b"sparse", 0o644).unwrap();
        fs.write(sparse, HEAVY_COMMIT * 2, b"x").unwrap();
        assert!(fs.commit_is_heavy(sparse));
        fs.flush(sparse).unwrap();
        assert!(
            !fs.commit_is_heavy(sparse),
            "committed: nothing left to hash"
        );
        fs.release(sparse).unwrap();
        let (_, seq) = fs.create(ME, art, b"seq", 0o644).unwrap();
        let chunk = vec![7u8; 1 << 20];
        for i in 0..(HEAVY_COMMIT >> 20) + 2 {
            fs.write(seq, i << 20, &chunk).unwrap();
        }
        assert!(!fs.commit_is_heavy(seq), "hashed while written");
        fs.release(seq).unwrap();
    }

    #[test]
    fn a_panic_inside_a_write_transaction_rolls_it_back() {
        let (_d, fs) = new_fs();
        let idx = fs.store().index();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _: io::Result<()> = idx.write_locked(|_| panic!("inside the transaction"));
        }));
        assert!(r.is_err());
        // The connection is usable: a new transaction begins and commits.
        idx.write_locked(|_| Ok(())).unwrap();
        drop(idx);
        let art = run_dir(&fs, "r");
        write_file(&fs, art, "after", b"ok");
    }

    #[test]
    fn log_paths_start_at_the_root_however_deep() {
        assert_eq!(
            log_path(std::path::Path::new("runs/r/artifacts/f")),
            "/runs/r/artifacts/f"
        );
        let deep: std::path::PathBuf = std::iter::once("runs".to_string())
            .chain((0..20_000).map(|i| format!("d{i}")))
            .collect();
        let shown = log_path(&deep);
        assert!(shown.starts_with("/runs/d0/d1/"), "{}", &shown[..40]);
        assert!(shown.ends_with("/d19998/d19999"));
        assert!(shown.len() < LOG_PATH_MAX + 64, "{}", shown.len());
        assert!(shown.contains("bytes]"));
        // The index walks the whole way up, however deep.
        let (_d, fs) = new_fs();
        let mut dir = run_dir(&fs, "deep");
        for i in 0..5000 {
            dir = fs
                .mkdir(ME, dir, format!("d{i}").as_bytes(), 0o755)
                .unwrap()
                .ino;
        }
        let path = fs.store().index().path_of(dir).unwrap();
        assert!(
            path.starts_with("runs/deep/artifacts/d0/d1"),
            "{}",
            path.display()
        );
        assert!(path.ends_with("d4999"));
    }

    #[test]
    fn special_files_and_foreign_xattrs_are_refused() {
        let (_d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        assert!(matches!(
            fs.refuse_link("symlink", art, b"l"),
            FsError::Refused(Refusal::NotPermitted)
        ));
        assert_eq!(
            refusal(fs.mknod(ME, art, b"fifo", libc::S_IFIFO | 0o644)),
            Refusal::NotPermitted
        );
        let f = fs.mknod(ME, art, b"empty", libc::S_IFREG | 0o644).unwrap();
        assert!(f.sealed && f.size == 0);
        assert_eq!(
            refusal(fs.setxattr(ME, f.ino, b"user.x", b"1")),
            Refusal::NotSupported
        );
        assert_eq!(refusal(fs.getxattr(f.ino, b"user.x")), Refusal::NoData);
        assert_eq!(fs.listxattr(f.ino).unwrap(), b"user.artifactfs.sha256\0");
        assert_eq!(
            refusal(fs.create(ME, art, &[b'n'; 256], 0o644)),
            Refusal::NameTooLong
        );
    }

    #[test]
    fn plain_symlinks_in_a_model_dir_are_refused() {
        let (_d, fs) = new_fs();
        let m = fs.mkdir(ME, MODELS_INO, b"m", 0o755).unwrap().ino;
        for (name, target) in [(&b"another"[..], &b"1"[..]), (b"link", b"/etc/passwd")] {
            assert_eq!(
                refusal(fs.symlink(ME, m, name, target)),
                Refusal::NotPermitted,
                "{name:?}"
            );
        }
        // The temporary link of ln -sfn passes the name rule (and then needs a READY target).
        assert_eq!(
            refusal(fs.symlink(ME, m, b"CuTmp123", b"1")),
            Refusal::Invalid
        );
        assert_eq!(refusal(fs.symlink(ME, m, b"@a", b"1")), Refusal::Invalid);
        // An empty target (which the kernel already refuses with ENOENT) is no version either.
        assert_eq!(refusal(fs.symlink(ME, m, b"@a", b"")), Refusal::Invalid);
    }

    #[test]
    fn read_only_refuses_every_change() {
        let dir = tempfile::tempdir().unwrap();
        {
            let fs = fs_at(dir.path());
            let art = run_dir(&fs, "r1");
            write_file(&fs, art, "a", b"1");
        }
        let fs = ArtifactFs::new(
            Store::open_readonly(dir.path()).unwrap(),
            FsOptions {
                read_only: true,
                ..Default::default()
            },
        );
        let run = fs.lookup(RUNS_INO, b"r1").unwrap().ino;
        let art = fs.lookup(run, b"artifacts").unwrap().ino;
        let a = fs.lookup(art, b"a").unwrap().ino;
        assert_eq!(read_all(&fs, a), b"1");
        assert_eq!(refusal(fs.mkdir(ME, art, b"d", 0o755)), Refusal::ReadOnly);
        assert_eq!(refusal(fs.create(ME, art, b"n", 0o644)), Refusal::ReadOnly);
        assert_eq!(refusal(fs.unlink(art, b"a")), Refusal::ReadOnly);
        assert_eq!(
            refusal(fs.rename(art, b"a", art, b"b", false)),
            Refusal::ReadOnly
        );
        assert_eq!(
            refusal(fs.setattr(
                a,
                SetAttr {
                    mode: Some(0o600),
                    ..Default::default()
                }
            )),
            Refusal::ReadOnly
        );
        assert_eq!(
            refusal(fs.setxattr(ME, a, b"user.x", b"1")),
            Refusal::ReadOnly
        );
        assert_eq!(refusal(fs.symlink(ME, art, b"l", b"a")), Refusal::ReadOnly);
        assert!(matches!(
            fs.refuse_link("link", art, b"l"),
            FsError::Refused(Refusal::ReadOnly)
        ));
        assert_eq!(refusal(fs.open(a, libc::O_WRONLY)), Refusal::ReadOnly);
    }
}
