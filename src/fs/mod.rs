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
use crate::store::index::{Commit, Entry, Index, Kind, MetaChange, NewEntry, ROOT_INO, State};
use crate::store::{Hash, Store, now_ns, to_ns};

mod access;
mod body;
mod hashing;
mod models;
pub use models::{
    VIRT_BASE, XATTR_DIGEST, XATTR_MESSAGE, XATTR_REGISTER_PREFIX, XATTR_STATUS, XATTR_VERSION,
};

/// The extended attribute that carries a sealed file's content hash.
pub const XATTR_SHA256: &str = "user.artifactfs.sha256";

/// `readdir` cookies from here on are registry links (index inode numbers stay below).
const LINK_COOKIE: u64 = 1 << 60;

/// How long `open` of a file being written waits for its release before answering `Busy`.
const RELEASE_GRACE: Duration = Duration::from_millis(500);

/// Mount-wide behaviour chosen on the command line.
#[derive(Debug, Clone)]
pub struct FsOptions {
    pub read_only: bool,
    /// Report (and record for new entries) this owner instead of the caller's.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// How long a model must be quiet before its pending versions are validated.
    pub settle: Duration,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            read_only: false,
            uid: None,
            gid: None,
            settle: Duration::from_secs(2),
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
    /// The calling process (0: this process), for the permission checks of `access`.
    pub pid: u32,
}

/// Attributes of an entry, as `stat` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: NodeKind,
    pub size: u64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub crtime: SystemTime,
    /// Content and size can never change again: safe to cache for long.
    pub sealed: bool,
    /// A directory whose entries and attributes change only through this mount (`runs/` and
    /// below), never by the daemon itself: the kernel's own invalidation keeps its cache true.
    pub stable: bool,
}

/// A time given to `utimens`.
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
    /// A sealed file of this size: its pages may be kept across opens.
    Sealed { size: u64 },
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
    /// A write failed (ENOSPC, EIO): nothing more is committed, and at release the file falls
    /// back to its last committed version (or disappears if it never committed).
    failed: Option<i32>,
    /// The registered model this file belongs to, for files below `models/`.
    model: Option<u64>,
}

/// An open file: a sealed file's blob, or a file being written (cheap to clone).
#[derive(Clone)]
enum Handle {
    Read(Arc<Sealed>),
    Write(Arc<Mutex<Writer>>),
}

/// A handle on a sealed file. Its blob is opened on first use: a small file's reads are kept in
/// the kernel's page cache, so most opens of it never need the blob.
struct Sealed {
    ino: u64,
    hash: Hash,
    file: std::sync::OnceLock<Arc<File>>,
}

/// The file system.
pub struct ArtifactFs {
    store: Store,
    opts: FsOptions,
    handles: RwLock<HashMap<u64, Handle>>,
    /// Inodes being written, with the handle writing each.
    writing: Mutex<HashMap<u64, u64>>,
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
    vanish_hook: std::sync::OnceLock<VanishHook>,
}

/// See [`ArtifactFs::on_vanish`].
pub type VanishHook = Box<dyn Fn(u64, Vec<u8>) + Send + Sync>;

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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ArtifactFs {
    pub fn new(store: Store, opts: FsOptions) -> ArtifactFs {
        let fs = ArtifactFs {
            store,
            opts,
            handles: RwLock::new(HashMap::new()),
            writing: Mutex::new(HashMap::new()),
            sealed: Condvar::new(),
            next_fh: AtomicU64::new(1),
            mem: body::MemBudget::default(),
            abandoned: Mutex::new(Vec::new()),
            models: models::ModelState::default(),
            vanish_hook: std::sync::OnceLock::new(),
        };
        fs.resume_pending();
        fs
    }

    /// Sets what is told `(parent, name)` whenever the daemon itself drops a name from a
    /// directory (the FUSE adapter invalidates the kernel's caches). Set once.
    pub fn on_vanish(&self, hook: VanishHook) {
        let _ = self.vanish_hook.set(hook);
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
    /// as the index stands, e.g. `EEXIST`, where it used to fail with `EIO`.) Commits retry on
    /// their own ([`Store::retry_busy`]).
    pub fn retrying<T>(&self, op: &str, f: impl FnMut() -> FsResult<T>) -> FsResult<T> {
        self.store.retry_while_busy(
            || op.to_string(),
            |e: &FsError| matches!(e, FsError::Io(io) if crate::store::index::is_busy(io)),
            f,
        )
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
            "refused {op} /{}: {} [{:?}]",
            path.display(),
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
        let mut attr = Attr {
            ino: e.ino,
            kind: match e.kind {
                Kind::Dir => NodeKind::Dir,
                Kind::File => NodeKind::File,
            },
            size: if e.kind == Kind::Dir { 4096 } else { e.size },
            perm: (e.mode & 0o7777) as u16,
            uid: self.opts.uid.unwrap_or(e.uid),
            gid: self.opts.gid.unwrap_or(e.gid),
            mtime: from_ns(e.mtime),
            ctime: from_ns(e.ctime),
            crtime: from_ns(e.crtime),
            sealed: e.kind == Kind::File && e.state == State::Live,
            stable: e.kind == Kind::Dir && changes_only_through_mount(e),
        };
        if e.kind == Kind::File
            && let Some(w) = self.writer_of(e.ino)
        {
            let w = lock(&w);
            attr.size = w.size;
            attr.mtime = from_ns(w.mtime);
            attr.sealed = false;
        }
        attr
    }

    /// The live directory `ino`, or the refusal to use.
    fn dir(idx: &Index, ino: u64) -> FsResult<Entry> {
        match idx.get(ino)? {
            Some(e) if e.state != State::Tombstone && e.kind == Kind::Dir => Ok(e),
            Some(e) if e.state != State::Tombstone => Err(FsError::Refused(Refusal::NotDir)),
            _ => Err(FsError::Refused(Refusal::NotFound)),
        }
    }

    fn visible(idx: &Index, ino: u64) -> FsResult<Entry> {
        match idx.get(ino)? {
            Some(e) if e.state != State::Tombstone => Ok(e),
            _ => Err(FsError::Refused(Refusal::NotFound)),
        }
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
        let entry = Self::visible(&self.store.index(), ino)?;
        Ok(self.attr_of(&entry))
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
        let (uid, gid) = self.owner(caller);
        let entry = {
            let idx = self.store.index();
            self.read_only(&idx, "mkdir", parent, Some(name))?;
            let pdir = Self::dir(&idx, parent)?;
            let place = namespace::place_of(pdir.ino, pdir.zone);
            let zone = namespace::mkdir(place, name)
                .map_err(|r| Self::deny(&idx, "mkdir", parent, Some(name), r))?;
            self.model_guard(&idx, "mkdir", &pdir, Some(name))?;
            let now = now_ns();
            let ino = self.make_dir(
                &idx,
                parent,
                name,
                zone,
                mode & 0o7777,
                uid,
                gid,
                now,
                "mkdir",
            )?;
            if place == Place::Runs {
                // Every run has artifacts/.
                self.make_dir(
                    &idx,
                    ino,
                    namespace::ARTIFACTS,
                    Zone::RunTree,
                    0o755,
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
            if place == Place::Models {
                idx.model_create(ino, &String::from_utf8_lossy(name), now)?;
            } else if let Some(unit) = self.unit_for_new(&idx, &pdir, ino)? {
                self.model_touch(&idx, unit, true)?;
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
        if let Some(ino) = idx.insert(&new)? {
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
            idx.delete_row(dir.ino)?;
            idx.version_delete(dir.ino)?;
            if place == Place::Models {
                idx.model_delete(dir.ino)?;
            } else if let Some(unit) = self.model_unit(&idx, &pdir)? {
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
        let (uid, gid) = self.owner(caller);
        let now = now_ns();
        let idx = self.store.index();
        self.read_only(&idx, "create", parent, Some(name))?;
        let pdir = Self::dir(&idx, parent)?;
        let zone = namespace::create_file(namespace::place_of(pdir.ino, pdir.zone), name)
            .map_err(|r| Self::deny(&idx, "create", parent, Some(name), r))?;
        self.model_guard(&idx, "create", &pdir, Some(name))?;
        let new = NewEntry::new_file(parent, name, zone as u8, mode & 0o7777, (uid, gid), now);
        let ino = match idx.insert(&new) {
            Ok(Some(ino)) => ino,
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
        let unit = self.unit_for_new(&idx, &pdir, ino)?;
        if let Some(unit) = unit {
            self.model_touch(&idx, unit, true)?;
            self.model_write_activity(unit.model, 1);
        }
        let fh = self.new_fh();
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
            failed: None,
            model: unit.map(|u| u.model),
        };
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Handle::Write(Arc::new(Mutex::new(writer))));
        lock(&self.writing).insert(ino, fh);
        let entry = idx.get(ino)?.ok_or(FsError::Refused(Refusal::NotFound))?;
        drop(idx);
        Ok((self.attr_of(&entry), fh))
    }

    /// Opens an existing file. Only sealed files can be opened, and only for reading.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<(u64, Opened)> {
        let busy = self.wait_sealed(ino);
        let idx = self.store.index();
        let (e, damaged) = match idx.get_checked(ino)? {
            Some((e, damaged)) if e.state != State::Tombstone => (e, damaged),
            _ => return Err(FsError::Refused(Refusal::NotFound)),
        };
        if e.kind == Kind::Dir {
            return Err(FsError::Refused(Refusal::IsDir));
        }
        let writes = (flags & libc::O_ACCMODE) != libc::O_RDONLY
            || flags & (libc::O_TRUNC | libc::O_APPEND) != 0;
        if busy || e.state == State::Writing {
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
            return Err(Self::deny(
                &idx,
                "open for writing",
                ino,
                None,
                (
                    Refusal::NotPermitted,
                    "the file is sealed: files are write-once".into(),
                ),
            ));
        }
        let hash = e.hash.ok_or(FsError::Refused(Refusal::NotFound))?;
        if damaged {
            log::warn!(
                "refused open /{}: its blob {hash} is damaged (found by fsck --verify) [EIO]",
                idx.path_of(ino)?.display()
            );
            return Err(io::Error::from_raw_os_error(libc::EIO).into());
        }
        drop(idx);
        let sealed = Sealed {
            ino,
            hash,
            file: std::sync::OnceLock::new(),
        };
        let fh = self.new_fh();
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Handle::Read(Arc::new(sealed)));
        Ok((fh, Opened::Sealed { size: e.size }))
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

    /// The blob file behind a handle on a sealed file (for kernel passthrough).
    pub fn backing_file(&self, fh: u64) -> FsResult<Arc<File>> {
        match self.handle(fh)? {
            Handle::Read(h) => self.blob_file(&h),
            Handle::Write(_) => Err(FsError::Refused(Refusal::BadHandle)),
        }
    }

    /// The blob of a sealed handle, opened on first use.
    fn blob_file(&self, h: &Sealed) -> FsResult<Arc<File>> {
        if let Some(f) = h.file.get() {
            return Ok(f.clone());
        }
        let file = self.store.blobs.open_blob(&h.hash).map_err(|err| {
            log::warn!("blob {} of inode {} cannot be opened: {err}", h.hash, h.ino);
            FsError::Io(io::Error::from_raw_os_error(libc::EIO))
        })?;
        Ok(h.file.get_or_init(|| Arc::new(file)).clone())
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        let n = match self.handle(fh)? {
            Handle::Read(h) => body::read_full_at(&*self.blob_file(&h)?, &mut buf, offset)?,
            Handle::Write(w) => {
                let w = lock(&w);
                let want = (w.size.saturating_sub(offset)).min(size as u64) as usize;
                w.body.read_at(&mut buf[..want], offset)?
            }
        };
        buf.truncate(n);
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let Handle::Write(w) = self.handle(fh)? else {
            return Err(FsError::Refused(Refusal::BadHandle));
        };
        let mut w = lock(&w);
        if let Some(code) = w.failed {
            return Err(io::Error::from_raw_os_error(code).into());
        }
        let end = offset + data.len() as u64;
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
        w.size = w.size.max(end);
        w.mtime = now_ns();
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
            hook(e.parent, e.name);
        }
        result
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
                |idx| idx.mark_rewriting(w.ino, w.synced),
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

    /// `close()` of a descriptor: commit what this handle wrote.
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        match self.handle(fh)? {
            Handle::Read(_) => Ok(()),
            Handle::Write(w) => self.commit(&mut lock(&w), false),
        }
    }

    pub fn fsync(&self, fh: u64) -> FsResult<()> {
        match self.handle(fh)? {
            Handle::Read(h) => {
                self.blob_file(&h)?.sync_all()?;
                Ok(self.store.index().sync()?)
            }
            Handle::Write(w) => self.commit(&mut lock(&w), true),
        }
    }

    /// The last reference is gone: commit anything left and seal the file.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        let handle = self
            .handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh);
        let Some(Handle::Write(w)) = handle else {
            return Ok(());
        };
        let mut w = lock(&w);
        let mut result = self.commit(&mut w, false);
        if let Err(e) = &result {
            log::warn!("inode {}: commit at release failed: {e}", w.ino);
        }
        if result.is_err() || !w.committed {
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
        w.body.discard(&self.mem);
        lock(&self.writing).remove(&w.ino);
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
        let hash = if let Some(state) = running {
            Hash::from_digest(state)
        } else {
            let size = w.size;
            w.body.rehash(size)?
        };
        let blobs = &self.store.blobs;
        // Content that fsck found damaged in the store is healed by writing it again.
        let damaged = self.store.index().is_damaged(&hash)?;
        let mut attempts = 0;
        loop {
            w.body.publish(blobs, &hash, damaged)?;
            if durable {
                blobs.sync_published(&hash)?;
            }
            // Another process holding the index (gc between two of its transactions, fsck) is
            // waited for with the index mutex released; only after `BUSY_PATIENCE` does the
            // commit fail, and then the file keeps its last committed version (`release`).
            let recorded = self.store.retry_busy(
                || format!("commit of inode {}", w.ino),
                |idx| {
                    idx.commit_file(w.ino, &hash, w.size, w.mtime, now_ns(), || {
                        blobs.exists(&hash)
                    })
                },
            )?;
            match recorded {
                Commit::Recorded => {}
                Commit::Gone => log::debug!(
                    "inode {} was removed while open; its content is not recorded",
                    w.ino
                ),
                Commit::BlobMissing if attempts < 3 => {
                    // Garbage collection removed the blob between publish and commit.
                    attempts += 1;
                    log::info!("blob {hash} was collected during a commit; storing it again");
                    w.body.thaw(blobs)?;
                    continue;
                }
                Commit::BlobMissing => {
                    return Err(io::Error::other(format!("blob {hash} keeps disappearing")).into());
                }
            }
            if damaged && recorded == Commit::Recorded {
                self.store.retry_busy(
                    || format!("clearing the damage mark of blob {hash}"),
                    |idx| idx.clear_damaged(&hash),
                )?;
                log::info!("damaged blob {hash} was stored again with the right bytes");
            }
            if durable {
                self.store.index().sync()?;
            }
            break;
        }
        w.dirty = false;
        w.committed = true;
        w.synced = durable;
        Ok(())
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
                let writer = self.writer_of(ino);
                match writer {
                    Some(w) => {
                        drop(idx);
                        {
                            let mut w = lock(&w);
                            if let Some(code) = w.failed {
                                return Err(io::Error::from_raw_os_error(code).into());
                            }
                            let old = w.size;
                            // A failed set_len (EFBIG, ENOSPC) leaves the bytes as they were.
                            w.body.set_len(&self.store.blobs, &self.mem, old, size)?;
                            if size != w.size {
                                w.hash_ok = false;
                            }
                            w.size = size;
                            w.mtime = now;
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
                    None => {}
                }
            }
            let mtime = change.mtime.map(|t| match t {
                SetTime::Now => now,
                SetTime::At(t) => to_ns(t),
            });
            idx.change_meta(
                ino,
                &MetaChange {
                    mode: change.mode.map(|m| m & 0o7777),
                    uid: change.uid,
                    gid: change.gid,
                    mtime,
                    ctime: now,
                },
            )?;
            drop(idx);
            if let (Some(t), Some(w)) = (mtime, self.writer_of(ino)) {
                // cp -a and shutil.copy2 set times before close(); the commit must keep them.
                lock(&w).mtime = t;
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
            idx.delete_row(e.ino)?;
            self.model_touch(&idx, unit, unit.dir != unit.model)?;
            return Ok(());
        }
        match e.state {
            // Never sealed: gone without a tombstone (but an fsync'd version keeps one).
            State::Writing => idx.unlink_unsealed(e.ino, now_ns())?,
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
        let mut idx = self.store.index();
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
        if let Some(existing) = idx.lookup(new_parent, new_name)? {
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
        if !idx.rename_file(e.ino, new_parent, new_name, zone as u8, now_ns(), tombstone)? {
            return Err(FsError::Refused(Refusal::Exists));
        }
        if let Some(unit) = src_unit {
            self.model_touch(&idx, unit, unit.dir != unit.model)?;
        }
        if let Some(unit) = self.unit_for_new(&idx, &dst_dir, e.ino)? {
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

    /// Symbolic and hard links are refused.
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
        let idx = self.store.index();
        let e = Self::visible(&idx, ino)?;
        if name == XATTR_SHA256.as_bytes() {
            return match (e.state, e.hash) {
                (State::Live, Some(h)) if !lock(&self.writing).contains_key(&ino) => {
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
        let idx = self.store.index();
        let e = Self::visible(&idx, ino)?;
        let mut names: Vec<&str> = Vec::new();
        if e.kind == Kind::File && e.state == State::Live && !lock(&self.writing).contains_key(&ino)
        {
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
                    (Refusal::NotPermitted, why),
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
        let store = Store::open_writable(dir.path()).unwrap();
        (dir, ArtifactFs::new(store, FsOptions::default()))
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
        // Write-once: no writing, truncating or appending any more.
        for flags in [
            libc::O_WRONLY,
            libc::O_RDWR,
            libc::O_RDONLY | libc::O_TRUNC,
            libc::O_WRONLY | libc::O_APPEND,
        ] {
            assert_eq!(
                refusal(fs.open(ino, flags)),
                Refusal::NotPermitted,
                "flags {flags:#x}"
            );
        }
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
        let fs = ArtifactFs::new(
            Store::open_writable(dir.path()).unwrap(),
            FsOptions::default(),
        );
        let ino = fs.lookup(art, b"kept").unwrap().ino;
        assert_eq!(read_all(&fs, ino), b"v1", "after a restart");
    }

    #[test]
    fn a_change_that_fails_after_a_commit_keeps_the_committed_content() {
        // open(O_CREAT|O_EXCL), write, dup, close the first fd (a commit), then a change through
        // the dup fails: the file must stay as committed, sealable, and survive a restart.
        let dir = tempfile::tempdir().unwrap();
        let fs = ArtifactFs::new(
            Store::open_writable(dir.path()).unwrap(),
            FsOptions::default(),
        );
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
        let fs = ArtifactFs::new(
            Store::open_writable(dir.path()).unwrap(),
            FsOptions::default(),
        );
        for name in [&b"truncated"[..], b"written"] {
            let ino = fs.lookup(art, name).unwrap().ino;
            assert_eq!(read_all(&fs, ino), b"keep", "after a restart");
        }
    }

    #[test]
    fn a_file_written_again_after_a_commit_does_not_survive_a_crash_unless_fsynced() {
        let dir = tempfile::tempdir().unwrap();
        let (art, early, synced) = {
            let fs = ArtifactFs::new(
                Store::open_writable(dir.path()).unwrap(),
                FsOptions::default(),
            );
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
        let fs = ArtifactFs::new(
            Store::open_writable(dir.path()).unwrap(),
            FsOptions::default(),
        );
        assert_eq!(
            refusal(fs.getattr(early)),
            Refusal::NotFound,
            "no empty or half file"
        );
        assert_eq!(fs.lookup(art, b"synced").unwrap().ino, synced);
        assert_eq!(read_all(&fs, synced), b"durable");
    }

    #[test]
    fn identical_content_is_stored_once() {
        let (d, fs) = new_fs();
        let art = run_dir(&fs, "r1");
        write_file(&fs, art, "a", b"same");
        write_file(&fs, art, "b", b"same");
        let blobs: usize = std::fs::read_dir(d.path().join("blobs/sha256"))
            .unwrap()
            .map(|e| std::fs::read_dir(e.unwrap().path()).unwrap().count())
            .sum();
        assert_eq!(blobs, 1);
        assert_eq!(std::fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
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
        let first = fs.store.blobs.path(&Hash::of(b"first"));
        assert_eq!(std::fs::read(first).unwrap(), b"first");
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
        assert_eq!(refusal(fs.create(ME, art, b"a", 0o644)), Refusal::Exists);
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
        assert_eq!(refusal(fs.create(ME, art, b"b", 0o644)), Refusal::Exists);
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
        assert_eq!(refusal(fs.create(ME, sub, b"f", 0o644)), Refusal::Exists);
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
            Refusal::NotPermitted
        );
        // While being written (cp -a sets it before close): compared with the bytes so far.
        let (attr, fh) = fs.create(ME, art, b"open.txt", 0o644).unwrap();
        fs.write(fh, 0, b"partial").unwrap();
        assert_eq!(
            refusal(fs.setxattr(ME, attr.ino, name, &of(b"anything"))),
            Refusal::NotPermitted
        );
        assert_eq!(
            refusal(fs.setxattr(ME, attr.ino, name, b"not hex at all")),
            Refusal::NotPermitted
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
            let fs = ArtifactFs::new(
                Store::open_writable(dir.path()).unwrap(),
                FsOptions::default(),
            );
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
