//! The FUSE adapter: translates kernel requests into calls of [`ArtifactFs`] and back.
//!
//! The only module that imports `fuser`. Its decisions are about the kernel's caches, never
//! about the store: [`errno`] (refusal kind → errno, mirrored in the README), [`ttl`] (how long
//! the kernel may cache what it is told: long for sealed files, whose content never changes,
//! and for the directories of `runs/`, which change only through the mount) and the open flags
//! (listings of those directories cached, files being written with direct I/O, small sealed
//! files kept in the page cache, no FLUSH for sealed files). Its one piece of state is FUSE
//! passthrough: when the kernel offers it, a sealed file's reads are handed to the kernel
//! straight from its blob file, so they cost what a native read costs (not while content is
//! still arriving from a bucket: its reads wait in the daemon for each piece's check, and the
//! kernel allows no passthrough open of an inode open through its page cache). When the daemon itself
//! drops a name the kernel may have cached, or on a shared store any machine changes the index,
//! [`forward_vanished`] tells the kernel; for that it remembers, on a shared store, what the
//! kernel was handed ([`Handed`]).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use fuser::BackingId;

use crate::error::{FsError, Refusal};
use crate::fs::{
    ArtifactFs, Attr, Caller, Invalidate, Lookup, NodeKind, Opened, SetAttr, SetTime, lock,
};

/// Passes what the kernel must forget (see [`ArtifactFs::on_vanish`]: names the daemon drops
/// by itself, and on a shared store every change of the index) on to the kernel, from a thread
/// of its own: an invalidation waits for the directory's lock, which a request in flight may
/// hold. `handed`: what the kernel was handed, forgotten whole on [`Invalidate::Everything`].
pub fn forward_vanished(
    fs: &Arc<ArtifactFs>,
    notifier: fuser::Notifier,
    handed: Option<Arc<Mutex<Handed>>>,
) -> std::io::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<Invalidate>();
    // (Not a strong reference: the file system goes when the session ends.)
    let weak = Arc::downgrade(fs);
    std::thread::Builder::new()
        .name("invalidate".into())
        .spawn(move || {
            // The numbers the kernel may hold inode `ino` by (one per generation, see
            // `Attr::node`): on a shared store, those it was handed (the index, which may be
            // away, is not asked); otherwise the one of its generation now.
            let nodes = |ino: u64| -> Vec<INodeNo> {
                match &handed {
                    _ if ino == crate::store::index::ROOT_INO => vec![INodeNo(ino)],
                    Some(h) => lock(h).nodes_of(ino).into_iter().map(INodeNo).collect(),
                    None => vec![INodeNo(weak.upgrade().map_or(ino, |fs| fs.node(ino)))],
                }
            };
            // The entry, and the directory's cached listing and attributes.
            let entry = |dir: INodeNo, name: &[u8]| {
                notifier
                    .inval_entry(dir, OsStr::from_bytes(name))
                    .and_then(|()| notifier.inval_inode(dir, 0, 0))
            };
            for what in rx {
                log::debug!("invalidating {what:?}");
                let r = match &what {
                    Invalidate::Entry(parent, name) => nodes(*parent)
                        .into_iter()
                        .try_for_each(|dir| entry(dir, name)),
                    // Attributes (the size) and every cached page.
                    Invalidate::Inode(ino) => nodes(*ino)
                        .into_iter()
                        .try_for_each(|n| notifier.inval_inode(n, 0, 0)),
                    // (A negative offset: no page.)
                    Invalidate::Attributes(ino) => nodes(*ino)
                        .into_iter()
                        .try_for_each(|n| notifier.inval_inode(n, -1, 0)),
                    Invalidate::Everything => {
                        let (names, inodes) = match &handed {
                            Some(h) => lock(h).all(),
                            None => Default::default(),
                        };
                        log::info!(
                            "invalidating everything the kernel may cache: {} name(s), {} \
                             inode(s)",
                            names.len(),
                            inodes.len()
                        );
                        // (Kept as the kernel's numbers: no index to ask, which may be away.)
                        for (parent, name) in &names {
                            let _ = entry(INodeNo(*parent), name);
                        }
                        for n in inodes.iter().chain(&[crate::store::index::ROOT_INO]) {
                            let _ = notifier.inval_inode(INodeNo(*n), 0, 0);
                        }
                        Ok(())
                    }
                };
                if let Err(e) = r {
                    log::debug!("cannot invalidate {what:?}: {e}");
                }
            }
        })?;
    let tx = Mutex::new(tx);
    fs.on_vanish(Box::new(move |what| {
        let _ = lock(&tx).send(what);
    }));
    Ok(())
}

macro_rules! reply_empty {
    ($reply:expr, $res:expr) => {
        match $res {
            Ok(()) => $reply.ok(),
            Err(e) => $reply.error(errno(&e)),
        }
    };
}

/// The one errno table: what each refusal means at the syscall.
pub fn errno(e: &FsError) -> Errno {
    let code = match e {
        FsError::Refused(kind) => match kind {
            Refusal::NotFound => libc::ENOENT,
            Refusal::Stale => libc::ESTALE,
            Refusal::Exists => libc::EEXIST,
            Refusal::NotPermitted => libc::EPERM,
            Refusal::Busy => libc::EBUSY,
            Refusal::Invalid => libc::EINVAL,
            Refusal::NameTooLong => libc::ENAMETOOLONG,
            Refusal::NotEmpty => libc::ENOTEMPTY,
            Refusal::NotDir => libc::ENOTDIR,
            Refusal::IsDir => libc::EISDIR,
            Refusal::ReadOnly => libc::EROFS,
            Refusal::NoData => libc::ENODATA,
            Refusal::NotSupported => libc::ENOTSUP,
            Refusal::BadHandle => libc::EBADF,
            Refusal::Range => libc::ERANGE,
            Refusal::AccessDenied => libc::EACCES,
            Refusal::FileTooBig => libc::EFBIG,
        },
        FsError::Io(io) => {
            let code = io.raw_os_error().unwrap_or(libc::EIO);
            if code != libc::ENOSPC && code != libc::EDQUOT {
                log::warn!("{}: I/O error: {io}", OP.get());
            }
            code
        }
    };
    Errno::from_i32(code)
}

/// How long the kernel may cache an entry's attributes. `shared`: another daemon (the writable
/// one, or another machine's) may change the store behind this mount, so nothing is cached for
/// longer than [`shared_ttl`].
pub fn ttl(attr: &Attr, shared: bool) -> Duration {
    match attr.kind {
        _ if (attr.sealed || (attr.stable && attr.kind == NodeKind::Dir)) && !shared => {
            Duration::from_secs(3600)
        }
        // Registry links change when versions settle, without the kernel seeing it.
        NodeKind::Symlink => Duration::ZERO,
        // Beside a writer, a file it still writes changes size behind this mount's back: its
        // attributes are never cached, or a read right after the writer's close() would stop
        // at the size seen before (found by the soak).
        // (Not one written through this mount, whose size the kernel tracks itself.)
        NodeKind::File if shared && !attr.sealed && !attr.stable => Duration::ZERO,
        NodeKind::Dir | NodeKind::File if shared => shared_ttl(),
        // Files being written: their size is the kernel's own to track, and only this handle
        // can change them. Directories the registry changes by itself (`models/`).
        NodeKind::Dir | NodeKind::File => Duration::from_secs(1),
    }
}

/// How long the kernel may remember that a name does not exist in a directory whose entries
/// only ever appear through this mount; `None` where the registry adds entries by itself.
pub fn negative_ttl(cacheable: bool, shared: bool) -> Option<Duration> {
    match (cacheable, shared) {
        (false, _) => None,
        (true, true) => Some(shared_ttl()),
        (true, false) => Some(Duration::from_secs(60)),
    }
}

/// The test knob that lengthens [`shared_ttl`] (seconds), so that a test can tell a change
/// brought by a notification from one the TTL let through.
pub const SHARED_TTL_ENV: &str = "ARTIFACTFS_TEST_SHARED_TTL";

/// How long the kernel caches what another daemon may change (entries, attributes of sealed
/// files and directories, negative entries): 1 s. On a shared store, PostgreSQL's
/// notifications invalidate each change at once (see [`forward_vanished`]); this is the
/// fallback for what they cannot cover — a lookup answered from the index just before a change
/// whose notification overtakes the answer on its way into the kernel, and the changes made
/// while the listener is cut off from PostgreSQL (it invalidates everything once it is back).
pub fn shared_ttl() -> Duration {
    static TTL: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *TTL.get_or_init(|| {
        std::env::var(SHARED_TTL_ENV)
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map_or(Duration::from_secs(1), Duration::from_secs_f64)
    })
}

/// Sealed files smaller than this are read through the daemon once and then served from the
/// kernel's page cache: for them, setting up passthrough costs more than the reads it saves.
/// Whether a file is small never changes, so one inode never mixes the two modes (which the
/// kernel refuses).
pub const SMALL_FILE: u64 = 128 * 1024;

/// How a file being written is opened: its bytes go straight to the daemon, not through the
/// page cache. That spares a copy, and the kernel's question about `security.capability` that
/// every first write() through the page cache asks (one round trip per file).
const WRITING: FopenFlags = FopenFlags::FOPEN_DIRECT_IO;

/// How a sealed file with a rewritable name is opened for reading (see [`Opened::Sealed`]).
const REWRITABLE: FopenFlags = FopenFlags::from_bits_truncate(
    FopenFlags::FOPEN_DIRECT_IO.bits() | FopenFlags::FOPEN_NOFLUSH.bits(),
);

/// Attributes sent with a negative entry (only its inode number 0 matters).
const NEGATIVE: Attr = Attr {
    ino: 0,
    generation: 0,
    kind: NodeKind::File,
    size: 0,
    perm: 0,
    uid: 0,
    gid: 0,
    mtime: std::time::UNIX_EPOCH,
    atime: std::time::UNIX_EPOCH,
    ctime: std::time::UNIX_EPOCH,
    crtime: std::time::UNIX_EPOCH,
    nlink: 1,
    sealed: false,
    stable: false,
};

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.node()),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.crtime,
        kind: file_type(a.kind),
        perm: a.perm,
        // 1 for directories means "unknown", which keeps find(1) from guessing from nlink; 0 for
        // a file removed while still open.
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 128 * 1024,
        flags: 0,
    }
}

/// A time `utimensat` gives. fuser 0.18 reads a time before 1970 that has a fraction of a
/// second wrongly: the kernel's `{ tv_sec: -2, tv_nsec: 500_000_000 }` (1.5 s before the epoch)
/// arrives as 2.5 s before, whole seconds and fraction both counted backwards. The fraction is
/// turned the right way here, so every time `stat` shows is the one that was set.
fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(kernel_time(t)),
    }
}

fn kernel_time(t: SystemTime) -> SystemTime {
    match UNIX_EPOCH.duration_since(t) {
        Ok(back) if back.subsec_nanos() != 0 => {
            UNIX_EPOCH - Duration::from_secs(back.as_secs())
                + Duration::from_nanos(back.subsec_nanos().into())
        }
        _ => t,
    }
}

fn file_type(k: NodeKind) -> FileType {
    match k {
        NodeKind::Dir => FileType::Directory,
        NodeKind::File => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
    }
}

fn caller(req: &Request) -> Caller {
    Caller::of_request(req.uid(), req.gid(), req.pid())
}

/// The `fuser::Filesystem` implementation.
pub struct FuseAdapter {
    fs: Arc<ArtifactFs>,
    /// Passthrough wanted (command line) and, after `init`, granted by the kernel.
    passthrough: Arc<AtomicBool>,
    backing: Arc<Mutex<Backing>>,
    truncating: Arc<OpenTruncates>,
    commits: CommitPool,
    /// Opens that fetch content from a bucket first.
    fetches: CommitPool,
    /// On a shared store: what the kernel was handed, for [`Invalidate::Everything`].
    handed: Option<Arc<Mutex<Handed>>>,
}

/// Answers `open` requests: in a request thread, or in the fetch pool.
struct Opener {
    fs: Arc<ArtifactFs>,
    passthrough: Arc<AtomicBool>,
    backing: Arc<Mutex<Backing>>,
    truncating: Arc<OpenTruncates>,
}

impl Opener {
    /// Answers an `open`; `fetch`: the content comes from a bucket, and this thread (of the
    /// fetch pool) gets it now, so that no read waits for it in a request thread.
    /// `pid`: the kernel's (0 for a caller outside the daemon's pid namespace), for pairing
    /// an `O_TRUNC` with this open.
    fn open(
        &self,
        node: INodeNo,
        flags: i32,
        (caller, pid): (Caller, u32),
        fetch: bool,
        reply: ReplyOpen,
    ) {
        let ino = ino_of(node);
        // The kernel refuses (`EIO`) any open of an inode other processes read through
        // passthrough that is not one too, as a writer's is not: busy, with its reason. (A
        // reader's release may be on its way: it gets the grace an open gets.)
        let passed_through = || {
            lock(&self.backing)
                .by_ino
                .get(&node.0)
                .is_some_and(|id| id.strong_count() > 0)
        };
        if flags & libc::O_ACCMODE != libc::O_RDONLY
            && passed_through()
            && !crate::fs::wait_a_release(|| !passed_through())
        {
            let e = self.fs.refuse_busy(
                "open for writing",
                ino,
                "the file is open for reading (through passthrough) by another process",
            );
            return reply.error(errno(&e));
        }
        // An open for reading only reads the index until it makes its handle: run again while
        // the index is busy, as lookups are (one that may write is not).
        let reads_only = flags & libc::O_ACCMODE == libc::O_RDONLY
            && flags & (libc::O_TRUNC | libc::O_APPEND) == 0;
        let open = || match reads_only {
            true => self.fs.retrying("open", || self.fs.open(ino, flags)),
            false => self.fs.open_by(Some(caller), ino, flags),
        };
        guarded("open", || match open() {
            Ok((fh, Opened::Sealed { size, cache })) => {
                if fetch && let Err(e) = self.fs.open_content_now(fh) {
                    let _ = self.fs.release(fh);
                    return reply.error(errno(&e));
                }
                if !cache {
                    // A rewritable file: every read asks the daemon, which serves what this
                    // handle opened; no page cache or backing file outlives a new content.
                    return reply.opened(FileHandle(fh), REWRITABLE);
                }
                self.opened_sealed(node.0, fh, size, reply)
            }
            Ok((fh, Opened::Writing)) => {
                // An `O_TRUNC` of this open, if it had one, comes next (see `setattr`).
                self.truncating.opened(ino, pid, fh);
                reply.opened(FileHandle(fh), WRITING)
            }
            Err(e) => reply.error(errno(&e)),
        })
    }

    /// (`node`: the kernel's inode, whose backing file it is.)
    fn opened_sealed(&self, node: u64, fh: u64, size: u64, reply: ReplyOpen) {
        if size >= SMALL_FILE && self.passthrough.load(Ordering::Relaxed) {
            let mut b = lock(&self.backing);
            // The kernel refuses (ETXTBSY) a passthrough open of an inode that is open through
            // its page cache, and the other way round: while a handle reads content still
            // arriving from a bucket (no backing file yet), every open of the inode does so.
            let id = match b.by_ino.get(&node).and_then(Weak::upgrade) {
                Some(id) => Some(Ok(id)),
                None if b.cached.contains_key(&node) => None,
                None => match self.fs.backing_file(fh) {
                    Ok(Some(file)) => Some(reply.open_backing(&*file).map(Arc::new)),
                    Ok(None) => None,
                    Err(e) => {
                        drop(b);
                        let _ = self.fs.release(fh);
                        return reply.error(errno(&e));
                    }
                },
            };
            match id {
                Some(Ok(id)) => {
                    b.by_ino.insert(node, Arc::downgrade(&id));
                    b.by_fh.insert(fh, id.clone());
                    reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &id);
                    return;
                }
                Some(Err(e)) => {
                    log::warn!("FUSE passthrough failed ({e}); serving reads through the daemon");
                    self.passthrough.store(false, Ordering::Relaxed);
                }
                None => {
                    *b.cached.entry(node).or_default() += 1;
                    b.cached_fh.insert(fh);
                }
            }
        }
        reply.opened(
            FileHandle(fh),
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
        );
    }
}

/// What the kernel was handed and may cache, on a shared store (by the kernel's numbers, see
/// [`Attr::node`]): each inode with the name it
/// was last handed by and how many lookups of it the kernel has not forgotten yet, and the
/// negative entries whose TTL has not run out. After notifications of changes may have been
/// missed, the daemon has the kernel forget all of it ([`forward_vanished`]).
#[derive(Default)]
pub struct Handed {
    inodes: HashMap<u64, (u64, Vec<u8>, u64)>,
    /// The kernel's numbers of `inodes` by inode number (each generation it holds).
    by_ino: HashMap<u64, Vec<u64>>,
    absent: HashMap<(u64, Vec<u8>), Instant>,
}

impl Handed {
    /// The kernel is handed inode `ino` as `name` in `parent` (one lookup more).
    fn handed(&mut self, parent: u64, name: &[u8], ino: u64) {
        let known = self.inodes.entry(ino).or_insert_with(|| {
            let nodes = self.by_ino.entry(ino_of(INodeNo(ino))).or_default();
            nodes.push(ino);
            (parent, Vec::new(), 0)
        });
        if known.0 != parent || known.1 != name {
            *known = (parent, name.to_vec(), known.2);
        }
        known.2 += 1;
    }

    /// The kernel is told `name` is absent from `parent` until `until`.
    fn absent_until(&mut self, parent: u64, name: &[u8], until: Instant) {
        if self.absent.len() >= 1 << 16 {
            let now = Instant::now();
            self.absent.retain(|_, t| *t > now);
        }
        self.absent.insert((parent, name.to_vec()), until);
    }

    /// The kernel forgot `nlookup` lookups of `ino`.
    fn forget(&mut self, ino: u64, nlookup: u64) {
        if let Some(known) = self.inodes.get_mut(&ino) {
            known.2 = known.2.saturating_sub(nlookup);
            if known.2 == 0 {
                self.inodes.remove(&ino);
                let of = ino_of(INodeNo(ino));
                if let Some(nodes) = self.by_ino.get_mut(&of) {
                    nodes.retain(|n| *n != ino);
                    if nodes.is_empty() {
                        self.by_ino.remove(&of);
                    }
                }
            }
        }
    }

    /// The kernel's numbers of inode `ino` it was handed and has not forgotten.
    fn nodes_of(&self, ino: u64) -> Vec<u64> {
        self.by_ino.get(&ino).cloned().unwrap_or_default()
    }

    /// Everything the kernel may still cache: the names (entry, negative or not) and inodes.
    fn all(&self) -> (Vec<(u64, Vec<u8>)>, Vec<u64>) {
        let now = Instant::now();
        let mut names: Vec<(u64, Vec<u8>)> = self
            .absent
            .iter()
            .filter(|(_, t)| **t > now)
            .map(|(k, _)| k.clone())
            .collect();
        names.extend(self.inodes.values().map(|(p, n, _)| (*p, n.clone())));
        (names, self.inodes.keys().copied().collect())
    }
}

/// Threads of the commit pool: two long commits at a time (hashing is CPU-bound; more would
/// only share the same cores), the rest wait their turn without holding a request thread.
const COMMIT_THREADS: usize = 2;
/// Threads that open files whose content must first come from a bucket.
const FETCH_THREADS: usize = 4;

/// Handles just opened for writing, by inode and the opening thread, for the `O_TRUNC` the
/// kernel sends as a truncate of its own right after the open (the daemon does not ask for
/// `FUSE_ATOMIC_O_TRUNC`: with it, the kernel cuts its cached size and pages of the file to
/// zero at every `O_TRUNC` open, and a concurrent reader of a sealed file being rewritten with
/// its own bytes read it empty). The kernel strips `O_TRUNC` from the open, and its truncate
/// has no handle and no other field (as `truncate(2)` by path); it comes from the thread that
/// opened. An entry lives until that truncate, the handle's first write, flush or fsync, or
/// its release. A thread's truncate takes the handle it opened last (the open and its truncate
/// are one system call of that thread). Callers from another pid namespace all come as pid 0:
/// their handles wait in the order they were opened, and a truncate takes the oldest (two `cp`
/// over one file, each open followed by its own truncate, pair up right).
#[derive(Default)]
struct OpenTruncates {
    /// Entries there are (checked without the lock by every write).
    count: AtomicUsize,
    inner: Mutex<OpenTruncatesInner>,
}

#[derive(Default)]
struct OpenTruncatesInner {
    by_opener: HashMap<(u64, u32), std::collections::VecDeque<u64>>,
    by_fh: HashMap<u64, (u64, u32)>,
}

impl OpenTruncates {
    fn opened(&self, ino: u64, pid: u32, fh: u64) {
        let mut m = lock(&self.inner);
        m.by_opener.entry((ino, pid)).or_default().push_back(fh);
        m.by_fh.insert(fh, (ino, pid));
        self.count.store(m.by_fh.len(), Ordering::Relaxed);
    }

    /// The handle the thread `pid` opened on `ino` last (pid 0: first) that nothing used
    /// since.
    fn take(&self, ino: u64, pid: u32) -> Option<u64> {
        if self.count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut m = lock(&self.inner);
        let fhs = m.by_opener.get_mut(&(ino, pid))?;
        let fh = match pid {
            0 => fhs.pop_front(),
            _ => fhs.pop_back(),
        };
        if fhs.is_empty() {
            m.by_opener.remove(&(ino, pid));
        }
        let fh = fh?;
        m.by_fh.remove(&fh);
        self.count.store(m.by_fh.len(), Ordering::Relaxed);
        Some(fh)
    }

    /// Handle `fh` was used (written, flushed, synced) or released: no truncate is its now.
    fn used(&self, fh: u64) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut m = lock(&self.inner);
        if let Some(key) = m.by_fh.remove(&fh)
            && let Some(fhs) = m.by_opener.get_mut(&key)
        {
            fhs.retain(|f| *f != fh);
            if fhs.is_empty() {
                m.by_opener.remove(&key);
            }
        }
        self.count.store(m.by_fh.len(), Ordering::Relaxed);
    }
}

/// The inode number of the kernel's number `node` (see [`Attr::node`]).
fn ino_of(node: INodeNo) -> u64 {
    crate::fs::ino_of_node(node.0)
}

/// Backing files registered with the kernel: one per inode while any handle has it open.
#[derive(Default)]
struct Backing {
    by_fh: HashMap<u64, Arc<BackingId>>,
    /// By the kernel's inode (`Attr::node`): a generation of its own.
    by_ino: HashMap<u64, Weak<BackingId>>,
    /// Handles of files large enough for passthrough opened without it (their content was
    /// still arriving from a bucket), and how many such handles each inode has.
    cached_fh: std::collections::HashSet<u64>,
    cached: HashMap<u64, usize>,
}

impl FuseAdapter {
    pub fn new(fs: Arc<ArtifactFs>, passthrough: bool) -> Self {
        let shared = fs.options().shared_store;
        FuseAdapter {
            fs,
            passthrough: Arc::new(AtomicBool::new(passthrough)),
            backing: Default::default(),
            truncating: Default::default(),
            commits: CommitPool::new(COMMIT_THREADS),
            fetches: CommitPool::new(FETCH_THREADS),
            handed: shared.then(Default::default),
        }
    }

    /// What the kernel was handed (on a shared store), for [`forward_vanished`].
    pub fn handed(&self) -> Option<Arc<Mutex<Handed>>> {
        self.handed.clone()
    }

    /// A flush, fsync or release: inline when cheap, on the commit pool when it may be long.
    fn commit(&self, fh: u64, reply: ReplyEmpty, op: fn(&ArtifactFs, u64) -> Result<(), FsError>) {
        if self.fs.commit_is_heavy(fh) {
            let fs = self.fs.clone();
            self.commits
                .run(Box::new(move || reply_empty!(reply, op(&fs, fh))));
        } else {
            reply_empty!(reply, op(&self.fs, fh))
        }
    }

    /// Replies with the entry `name` of directory `parent` (the kernel's number), or the error.
    fn reply_entry(
        &self,
        parent: u64,
        name: &OsStr,
        reply: ReplyEntry,
        res: Result<Attr, FsError>,
    ) {
        match res {
            Ok(attr) => {
                self.handing_out(parent, name.as_bytes(), attr.node());
                reply.entry(&self.ttl(&attr), &file_attr(&attr), Generation(0))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Records that the kernel is handed inode `node` as `name` in `parent` (on a shared store;
    /// the kernel's numbers).
    fn handing_out(&self, parent: u64, name: &[u8], node: u64) {
        if let Some(h) = &self.handed {
            lock(h).handed(parent, name, node);
        }
    }

    /// The refusal (`ESTALE`, one log line) of a change through a descriptor of an inode of
    /// an earlier generation (a file removed and created again since, a directory removed and
    /// made again): its path holds another inode now, which the change must not reach.
    fn stale_refusal(&self, op: &str, node: INodeNo) -> Option<Errno> {
        let stale = self
            .fs
            .getattr(ino_of(node))
            .is_ok_and(|a| a.node() != node.0);
        if !stale {
            return None;
        }
        log::info!(
            "refused {op} of inode {} through a descriptor of an earlier generation: its path \
             holds another since [ESTALE]",
            ino_of(node)
        );
        Some(Errno::from_i32(libc::ESTALE))
    }

    /// [`ArtifactFs::check_dir_node`] of the directory a request is in: the error to answer
    /// when it is a directory removed and made again since the kernel was handed it.
    fn removed_dir(&self, op: &str, dir: INodeNo) -> Option<Errno> {
        self.fs
            .retrying(op, || self.fs.check_dir_node(op, dir.0))
            .err()
            .map(|e| errno(&e))
    }

    fn ttl(&self, attr: &Attr) -> Duration {
        ttl(attr, self.fs.options().beside_others())
    }

    /// Replies to an open of a sealed file: through passthrough when it is on and the file is
    /// not small, otherwise from the kernel's page cache, which is kept across opens (the
    /// content never changes). A sealed file's `close()` has nothing to do: no FLUSH.
    /// What answering an `open` needs, for a thread of the fetch pool.
    fn opener(&self) -> Opener {
        Opener {
            fs: self.fs.clone(),
            passthrough: self.passthrough.clone(),
            backing: self.backing.clone(),
            truncating: self.truncating.clone(),
        }
    }
}

thread_local! {
    /// The request this thread is answering (named in the log line of an I/O error).
    static OP: std::cell::Cell<&'static str> = const { std::cell::Cell::new("request") };
}

/// Runs one request's handler, catching a panic: its reply is dropped unsent, which fuser
/// answers with `EIO`; the panic hook has logged the message and backtrace; the request thread
/// lives on for the next request (fuser itself would lose the thread, and after enough panics
/// the mount would hang).
fn guarded(op: &'static str, f: impl FnOnce()) {
    let outer = OP.replace(op);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err();
    OP.set(outer);
    if panicked {
        log::error!("{op}: the handler panicked (answered EIO); the daemon goes on");
    }
}

/// Threads for commits that may take long (re-hashing a large file): a request thread hands
/// the reply over and is free at once, so one user's huge files cannot occupy every request
/// thread. Jobs wait in order when all commit threads are busy.
pub struct CommitPool {
    tx: Mutex<std::sync::mpsc::Sender<Job>>,
}

type Job = Box<dyn FnOnce() + Send>;

impl CommitPool {
    pub fn new(threads: usize) -> CommitPool {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("commit-{i}"))
                .spawn(move || {
                    loop {
                        let job = lock(&rx).recv();
                        match job {
                            Ok(job) => guarded("commit", job),
                            Err(_) => break,
                        }
                    }
                });
            if let Err(e) = spawned {
                log::warn!("cannot start a commit thread ({e}); long commits run inline");
            }
        }
        CommitPool { tx: Mutex::new(tx) }
    }

    /// Runs `job` on a commit thread (inline if none could be reached).
    fn run(&self, job: Job) {
        let sent = lock(&self.tx).send(job);
        if let Err(std::sync::mpsc::SendError(job)) = sent {
            job();
        }
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Not FUSE_ATOMIC_O_TRUNC: `O_TRUNC` comes as a truncate after the open (see
        // `OpenTruncates`).
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        // No setuid bits to strip (nosuid): spares a GETXATTR security.capability per write.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        // mmap(MAP_SHARED) of a file being written (numpy's open_memmap) despite direct I/O.
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        let _ = config
            .set_max_readahead(u32::MAX)
            .or_else(|max| config.set_max_readahead(max));
        if self.passthrough.load(Ordering::Relaxed) {
            let granted = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            self.passthrough.store(granted, Ordering::Relaxed);
            if granted {
                log::info!(
                    "FUSE passthrough on: sealed files are read by the kernel from their blobs"
                );
            } else {
                log::info!(
                    "FUSE passthrough not offered by this kernel: reads go through the daemon"
                );
            }
        } else {
            log::info!("FUSE passthrough off (--no-passthrough)");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guarded("lookup", || {
            if let Some(e) = self.removed_dir("lookup", parent) {
                return reply.error(e);
            }
            match self.fs.retrying("lookup", || {
                self.fs.lookup_or_absent(ino_of(parent), name.as_bytes())
            }) {
                Ok(Lookup::Found(attr)) => self.reply_entry(parent.0, name, reply, Ok(attr)),
                Ok(Lookup::Absent { cacheable }) => {
                    let shared = self.fs.options().beside_others();
                    match negative_ttl(cacheable, shared) {
                        // A negative entry: inode 0, remembered for the TTL.
                        Some(t) => {
                            if let Some(h) = &self.handed {
                                let mut h = lock(h);
                                h.absent_until(parent.0, name.as_bytes(), Instant::now() + t);
                            }
                            let mut attr = file_attr(&NEGATIVE);
                            attr.ino = INodeNo(0);
                            reply.entry(&t, &attr, Generation(0));
                        }
                        None => reply.error(Errno::ENOENT),
                    }
                }
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    // (fuser's batch_forget calls this for each inode: its type for them is private.)
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if let Some(h) = &self.handed {
            lock(h).forget(ino.0, nlookup);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        guarded("getattr", || {
            match self.fs.retrying("getattr", || self.fs.getattr(ino_of(ino))) {
                // An inode of an earlier generation (a descriptor of a file removed and
                // created again since): as after unlink, with the size of its content (the
                // new one may still be being written); its number stays.
                Ok(a) if a.node() != ino.0 => match self.fs.getattr_earlier(ino.0) {
                    Ok(a) => {
                        let mut attr = file_attr(&a);
                        attr.ino = ino;
                        reply.attr(&self.ttl(&a), &attr)
                    }
                    Err(e) => reply.error(errno(&e)),
                },
                Ok(a) => reply.attr(&self.ttl(&a), &file_attr(&a)),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        guarded("setattr", || {
            // `open(O_TRUNC)` of an existing file: the kernel truncates in a request of its
            // own right after the open, from the same thread, without the file handle (as
            // `truncate(2)` does). It goes to the handle that thread just opened for writing.
            let fh = match fh {
                None if size == Some(0) => {
                    self.truncating.take(ino_of(ino), req.pid()).map(FileHandle)
                }
                fh => fh,
            };
            if let Some(e) = self.stale_refusal("setattr", ino) {
                return reply.error(e);
            }
            let change = SetAttr {
                mode,
                uid,
                gid,
                size,
                // `None`: not given, or `UTIME_OMIT`; that time stays as it is.
                mtime: mtime.map(set_time),
                atime: atime.map(set_time),
                // The kernel passes the file handle for ftruncate, not for truncate(path).
                fh: fh.map(|f| f.0),
            };
            match self
                .fs
                .retrying("setattr", || self.fs.setattr(ino_of(ino), change.clone()))
            {
                Ok(a) => reply.attr(&self.ttl(&a), &file_attr(&a)),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        guarded("mknod", || {
            if let Some(e) = self.removed_dir("mknod", parent) {
                return reply.error(e);
            }
            self.reply_entry(
                parent.0,
                name,
                reply,
                self.fs.retrying("mknod", || {
                    self.fs
                        .mknod(caller(req), ino_of(parent), name.as_bytes(), mode & !umask)
                }),
            )
        })
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        guarded("mkdir", || {
            if let Some(e) = self.removed_dir("mkdir", parent) {
                return reply.error(e);
            }
            self.reply_entry(
                parent.0,
                name,
                reply,
                self.fs.retrying("mkdir", || {
                    self.fs
                        .mkdir(caller(req), ino_of(parent), name.as_bytes(), mode & !umask)
                }),
            )
        })
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("unlink", || {
            if let Some(e) = self.removed_dir("unlink", parent) {
                return reply.error(e);
            }
            reply_empty!(
                reply,
                self.fs
                    .retrying("unlink", || self.fs.unlink(ino_of(parent), name.as_bytes()))
            )
        })
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("rmdir", || {
            if let Some(e) = self.removed_dir("rmdir", parent) {
                return reply.error(e);
            }
            reply_empty!(
                reply,
                self.fs
                    .retrying("rmdir", || self.fs.rmdir(ino_of(parent), name.as_bytes()))
            )
        })
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        guarded("symlink", || {
            if let Some(e) = self.removed_dir("symlink", parent) {
                return reply.error(e);
            }
            self.reply_entry(
                parent.0,
                link_name,
                reply,
                self.fs.retrying("symlink", || {
                    self.fs.symlink(
                        caller(req),
                        ino_of(parent),
                        link_name.as_bytes(),
                        target.as_os_str().as_bytes(),
                    )
                }),
            )
        })
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        guarded("readlink", || {
            match self
                .fs
                .retrying("readlink", || self.fs.readlink(ino_of(ino)))
            {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        guarded("rename", || {
            if let Some(e) = self
                .removed_dir("rename", parent)
                .or_else(|| self.removed_dir("rename", newparent))
            {
                return reply.error(e);
            }
            reply_empty!(
                reply,
                self.fs.retrying("rename", || self.fs.rename(
                    ino_of(parent),
                    name.as_bytes(),
                    ino_of(newparent),
                    newname.as_bytes(),
                    flags.contains(RenameFlags::RENAME_EXCHANGE),
                ))
            )
        })
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        guarded("link", || {
            let e = self
                .fs
                .refuse_link("link", ino_of(newparent), newname.as_bytes());
            reply.error(errno(&e));
        })
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let opener = self.opener();
        let caller = (caller(req), req.pid());
        if self.fs.open_is_heavy(ino_of(ino)) {
            // Its content comes from a bucket first: the request threads stay free meanwhile.
            self.fetches.run(Box::new(move || {
                opener.open(ino, flags.0, caller, true, reply)
            }));
        } else {
            opener.open(ino, flags.0, caller, false, reply)
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let read = move |fs: &ArtifactFs, reply: ReplyData| {
            guarded("read", || match fs.read(fh.0, offset, size) {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(&e)),
            })
        };
        if self.fs.read_would_wait(fh.0, offset, size) {
            // Bytes still on their way from a bucket: the request threads stay free meanwhile.
            let fs = self.fs.clone();
            self.fetches.run(Box::new(move || read(&fs, reply)));
        } else {
            read(&self.fs, reply)
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.truncating.used(fh.0);
        guarded("write", || match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.truncating.used(fh.0);
        guarded("flush", || self.commit(fh.0, reply, |fs, fh| fs.flush(fh)))
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        guarded("release", || {
            self.truncating.used(fh.0);
            {
                let mut b = lock(&self.backing);
                b.by_fh.remove(&fh.0);
                // The last handle on the inode closed its backing file: forget the inode too,
                // or the map would grow with every file ever read.
                if b.by_ino.get(&ino.0).is_some_and(|w| w.strong_count() == 0) {
                    b.by_ino.remove(&ino.0);
                }
                if b.cached_fh.remove(&fh.0)
                    && let Some(n) = b.cached.get_mut(&ino.0)
                {
                    *n -= 1;
                    if *n == 0 {
                        b.cached.remove(&ino.0);
                        // The next open passes reads through: the kernel would drop the pages
                        // these reads left in its cache then, in that open (0.1 s per GiB
                        // here); dropped now, from the notifier's thread, they cost it nothing.
                        self.fs.invalidate_inode(ino_of(ino));
                    }
                }
            }
            self.commit(fh.0, reply, |fs, fh| fs.release(fh))
        })
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.truncating.used(fh.0);
        guarded("fsync", || self.commit(fh.0, reply, |fs, fh| fs.fsync(fh)))
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        guarded("readdir", || {
            if let Some(e) = self.removed_dir("readdir", ino) {
                return reply.error(e);
            }
            match self
                .fs
                .retrying("readdir", || self.fs.readdir(ino_of(ino), offset, 256))
            {
                Ok(entries) => {
                    for e in entries {
                        let kind = file_type(e.attr.kind);
                        let name = OsStr::from_bytes(&e.name);
                        if reply.add(INodeNo(e.attr.node()), e.cookie, kind, name) {
                            break;
                        }
                    }
                    reply.ok();
                }
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        guarded("opendir", || {
            if let Some(e) = self.removed_dir("opendir", ino) {
                return reply.error(e);
            }
            match self.fs.opendir(ino_of(ino)) {
                // The kernel keeps the listing in its page cache and drops it itself when a create,
                // mkdir, unlink or rename through this mount changes the directory.
                Ok(true) if !self.fs.options().beside_others() => reply.opened(
                    FileHandle(0),
                    FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
                ),
                Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        guarded("readdirplus", || {
            if let Some(e) = self.removed_dir("readdirplus", ino) {
                return reply.error(e);
            }
            match self
                .fs
                .retrying("readdirplus", || self.fs.readdir(ino_of(ino), offset, 128))
            {
                Ok(entries) => {
                    for e in entries {
                        let name = OsStr::from_bytes(&e.name);
                        // "." and ".." must not be looked up by the kernel through readdirplus.
                        let attr = file_attr(&e.attr);
                        let t = if e.name == b"." || e.name == b".." {
                            Duration::ZERO
                        } else {
                            self.handing_out(ino.0, &e.name, e.attr.node());
                            self.ttl(&e.attr)
                        };
                        if reply.add(
                            INodeNo(e.attr.node()),
                            e.cookie,
                            name,
                            &t,
                            &attr,
                            Generation(0),
                        ) {
                            break;
                        }
                    }
                    reply.ok();
                }
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        guarded("fsyncdir", || {
            reply_empty!(reply, self.fs.store().index().sync().map_err(FsError::from))
        })
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        guarded("statfs", || match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        guarded("setxattr", || {
            if let Some(e) = self.stale_refusal("setxattr", ino) {
                return reply.error(e);
            }
            reply_empty!(
                reply,
                self.fs.retrying("setxattr", || {
                    self.fs
                        .setxattr(caller(req), ino_of(ino), name.as_bytes(), value)
                })
            )
        })
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        guarded("getxattr", || {
            match self.fs.retrying("getxattr", || {
                self.fs.getxattr(ino_of(ino), name.as_bytes())
            }) {
                Ok(v) => xattr_reply(reply, &v, size),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        guarded("listxattr", || {
            match self
                .fs
                .retrying("listxattr", || self.fs.listxattr(ino_of(ino)))
            {
                Ok(v) => xattr_reply(reply, &v, size),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("removexattr", || {
            if let Some(e) = self.stale_refusal("removexattr", ino) {
                return reply.error(e);
            }
            // Removing is writing: refused the same way (never a registration).
            let res = match name.as_bytes() {
                n if n.starts_with(b"user.artifactfs.register.") => {
                    Err(FsError::Refused(Refusal::NotSupported))
                }
                n => self.fs.retrying("removexattr", || {
                    self.fs.setxattr(caller(req), ino_of(ino), n, b"")
                }),
            };
            reply_empty!(reply, res)
        })
    }

    /// No ioctls: "not a terminal" (Python's `open()` asks TCGETS of every file it opens).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        guarded("ioctl", || {
            reply.error(Errno::from_i32(libc::ENOTTY));
        })
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        guarded("create", || {
            if let Some(e) = self.removed_dir("create", parent) {
                return reply.error(e);
            }
            match self.fs.retrying("create", || {
                self.fs
                    .create(caller(req), ino_of(parent), name.as_bytes(), mode & !umask)
            }) {
                Ok((attr, fh)) => {
                    self.handing_out(parent.0, name.as_bytes(), attr.node());
                    reply.created(
                        &self.ttl(&attr),
                        &file_attr(&attr),
                        Generation(0),
                        FileHandle(fh),
                        WRITING,
                    )
                }
                Err(e) => reply.error(errno(&e)),
            }
        })
    }
}

fn xattr_reply(reply: ReplyXattr, value: &[u8], size: u32) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(errno(&FsError::Refused(Refusal::Range)));
    } else {
        reply.data(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's truncate after an `O_TRUNC` open goes to the handle its thread opened, the
    /// oldest first where threads cannot be told apart (pid 0), and never to a handle already
    /// used or released.
    #[test]
    fn an_open_truncate_finds_its_handle() {
        let t = OpenTruncates::default();
        assert_eq!(t.take(5, 100), None);
        t.opened(5, 100, 1);
        t.opened(5, 200, 2);
        t.opened(6, 100, 3);
        assert_eq!(t.take(5, 200), Some(2));
        assert_eq!(t.take(5, 200), None);
        // One thread: its last open (`exec 3<>f; : > f` in one shell).
        t.opened(5, 100, 4);
        assert_eq!(t.take(5, 100), Some(4));
        assert_eq!(t.take(5, 100), Some(1));
        // Two callers the kernel gives as pid 0: each open, then its truncate, in either order.
        t.opened(7, 0, 10);
        t.opened(7, 0, 11);
        assert_eq!(t.take(7, 0), Some(10));
        assert_eq!(t.take(7, 0), Some(11));
        // Used (a write, flush or fsync came) or released: no truncate of an open any more.
        t.opened(7, 0, 12);
        t.opened(7, 0, 13);
        t.used(12);
        t.used(3);
        assert_eq!(t.take(6, 100), None);
        assert_eq!(t.take(7, 0), Some(13));
        assert_eq!(t.count.load(Ordering::Relaxed), 0);
        assert!(lock(&t.inner).by_opener.is_empty());
    }

    /// What the kernel was handed is remembered until it forgets every lookup of it, by the
    /// name it was last handed by; negative entries until their cache time runs out.
    #[test]
    fn handed_inodes_last_until_forgotten() {
        let mut h = Handed::default();
        h.handed(2, b"a", 10);
        h.handed(2, b"b", 10); // renamed, looked up again
        h.handed(2, b"c", 11);
        h.absent_until(2, b"gone", Instant::now() + Duration::from_secs(60));
        h.absent_until(2, b"expired", Instant::now() - Duration::from_secs(1));
        let (mut names, mut inodes) = h.all();
        names.sort();
        inodes.sort();
        assert_eq!(
            names,
            vec![
                (2, b"b".to_vec()),
                (2, b"c".to_vec()),
                (2, b"gone".to_vec())
            ]
        );
        assert_eq!(inodes, vec![10, 11]);
        h.forget(10, 1);
        h.forget(11, 1);
        assert_eq!(h.all().1, vec![10]);
        h.forget(10, 5);
        assert!(h.all().1.is_empty());
        // Each generation of an inode the kernel holds (a directory made again).
        let again = (1 << 40) | 12;
        h.handed(2, b"d", 12);
        h.handed(2, b"d", again);
        let mut nodes = h.nodes_of(12);
        nodes.sort();
        assert_eq!(nodes, vec![12, again]);
        h.forget(12, 1);
        assert_eq!(h.nodes_of(12), vec![again]);
        h.forget(again, 1);
        assert!(h.nodes_of(12).is_empty() && h.by_ino.is_empty());
    }

    /// What fuser 0.18 hands over for a `utimensat` time, from the kernel's `timespec`.
    fn as_fuser_gives(secs: i64, nsecs: u32) -> SystemTime {
        if secs >= 0 {
            UNIX_EPOCH + Duration::new(secs as u64, nsecs)
        } else {
            UNIX_EPOCH - Duration::new(secs.unsigned_abs(), nsecs)
        }
    }

    #[test]
    fn kernel_times_before_1970_keep_their_fraction_the_right_way() {
        // (tv_sec, tv_nsec) as the kernel normalises them, and the time they mean.
        let cases = [
            (
                (-2, 500_000_000),
                UNIX_EPOCH - Duration::new(1, 500_000_000),
            ),
            ((-1, 999_999_999), UNIX_EPOCH - Duration::from_nanos(1)),
            (
                (-2_208_988_800, 0),
                UNIX_EPOCH - Duration::from_secs(2_208_988_800),
            ),
            ((0, 1), UNIX_EPOCH + Duration::from_nanos(1)),
            (
                (4_102_444_800, 123_456_789),
                UNIX_EPOCH + Duration::new(4_102_444_800, 123_456_789),
            ),
        ];
        for ((secs, nsecs), want) in cases {
            assert_eq!(
                kernel_time(as_fuser_gives(secs, nsecs)),
                want,
                "{secs} s + {nsecs} ns"
            );
        }
    }
}
