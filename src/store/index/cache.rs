//! Answers of the index kept in memory for as long as nothing in the index has changed.
//!
//! A warm `cat` of many small files asks the index, for each `open`, for the file's row and
//! whether another process marked content damaged since; `cp -r` asks whether each new name is
//! taken twice in a row (the kernel's lookup, then `create`). Each of those questions is a read
//! transaction (a few µs: locks on the WAL index, a `stat`), and most find the index exactly as
//! the previous question did. This cache keeps the answers together with a [`Snapshot`] of the
//! index taken before they were read, and serves them only while the snapshot is unchanged.
//!
//! # Why an unchanged snapshot means unchanged answers
//!
//! A row changes only through a connection to the index, and a snapshot covers both kinds:
//!
//! - **this connection**: inside an open transaction (`BEGIN`, a savepoint) the cache is
//!   neither read nor filled, so rows not yet committed never enter it, and a rollback leaves
//!   behind only answers read before it began, which are true again. Nor while a statement of
//!   the connection is still stepping: its read transaction would show the reads in between
//!   the index as it was when it began, perhaps before the commit the header already shows. Every statement outside a
//!   transaction commits by itself, which moves the WAL-index header (below). Besides, every row
//!   this connection inserts, updates or deletes counts in SQLite's `total_changes()` as soon as
//!   its statement ends, whatever the statement (this module's, the registry's), and the count
//!   is part of the snapshot too.
//! - **any other connection** (fsck marking damaged content, gc, a second process): its commit
//!   writes the WAL-index header in the `-shm` file, which every connection maps, before its
//!   `COMMIT` returns: the change counter, the last frame, the salts and a checksum (SQLite's
//!   documented WAL-index format, <https://www.sqlite.org/walformat.html>, stable since 3.7.0).
//!   A snapshot holds a copy of that header, read the way SQLite reads it (both copies, the
//!   second after a barrier, equal, initialised), so any commit since changes it; a checkpoint
//!   only copies pages (and a WAL restart changes the salts).
//!
//! The snapshot is read before the question goes to SQLite, so an answer is never kept under a
//! snapshot older than what it read: a commit landing between the two makes the next snapshot
//! differ and drops the answer. The header is read from the connection's own mapping of the
//! `-shm` file ([`ShmHeader`]). Only the writable daemon's connection uses the cache; other
//! connections (read-only daemons, `ls`, `fsck`, `gc`) ask SQLite every time, as before.

use std::collections::HashMap;

use super::Entry;

/// Bytes of one copy of the WAL-index header (`struct WalIndexHdr`).
const HEADER: usize = 48;

/// At most this many answers are kept (a few MiB); beyond it the cache starts over.
const MAX_KEPT: usize = 1 << 14;

/// The state of the index an answer was read in: this connection's count of changed rows, and
/// the WAL-index header as of the last commit of any connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Snapshot {
    changes: u64,
    header: [u8; HEADER],
}

/// The WAL-index header, in the mapping of the `-shm` file that the connection itself made.
///
/// Asked of SQLite (`xShmMap` of the database file, region 0, which the connection mapped when
/// it first read the WAL) rather than opened and mapped again: closing a second descriptor of
/// the file would drop every `fcntl` lock this process holds on it, SQLite's included (its
/// claim on the file, without which another process re-creates it, and its WAL read marks).
/// The region stays mapped until the connection closes, and the [`Index`](super::Index) owning
/// this also owns (and outlives it with) the connection.
pub(super) struct ShmHeader {
    ptr: *const u8,
}

// Only read (with volatile reads), from whichever thread holds the index.
unsafe impl Send for ShmHeader {}

impl ShmHeader {
    /// The connection's mapping of the WAL-index header; `None` if it has none (not in WAL mode,
    /// or the WAL index lives in heap memory).
    pub(super) fn of(conn: &rusqlite::Connection) -> Option<ShmHeader> {
        use rusqlite::ffi;
        let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
        let rc = unsafe {
            ffi::sqlite3_file_control(
                conn.handle(),
                c"main".as_ptr(),
                ffi::SQLITE_FCNTL_FILE_POINTER,
                &mut file as *mut _ as *mut std::ffi::c_void,
            )
        };
        if rc != ffi::SQLITE_OK || file.is_null() {
            return None;
        }
        let methods = unsafe { (*file).pMethods };
        if methods.is_null() || unsafe { (*methods).iVersion } < 2 {
            return None;
        }
        let shm_map = unsafe { (*methods).xShmMap }?;
        let mut region: *mut std::ffi::c_void = std::ptr::null_mut();
        // Region 0 of 32 KiB (SQLite's region size), not extended: only if already mapped.
        let rc = unsafe { shm_map(file, 0, 32768, 0, &mut region) };
        if rc != ffi::SQLITE_OK || region.is_null() {
            return None;
        }
        Some(ShmHeader {
            ptr: region as *const u8,
        })
    }

    /// The header as of the last commit, or `None` while a commit is writing it (the two
    /// copies differ) or before it was ever written.
    fn read(&self) -> Option<[u8; HEADER]> {
        let mut a = [0u8; HEADER];
        let mut b = [0u8; HEADER];
        // SQLite writes copy 2, a barrier, then copy 1; it reads copy 1 then copy 2.
        for (i, x) in a.iter_mut().enumerate() {
            *x = unsafe { std::ptr::read_volatile(self.ptr.add(i)) };
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        for (i, x) in b.iter_mut().enumerate() {
            *x = unsafe { std::ptr::read_volatile(self.ptr.add(HEADER + i)) };
        }
        // isInit: byte 12.
        (a == b && a[12] != 0).then_some(a)
    }
}

/// The snapshot now, if the header can be read.
pub(super) fn snapshot(shm: &ShmHeader, changes: u64) -> Option<Snapshot> {
    Some(Snapshot {
        changes,
        header: shm.read()?,
    })
}

/// A PostgreSQL index's snapshot (the daemon's, see `Index::snapshot`): how many times its
/// connection may have changed rows, how many changes of other connections (other machines,
/// `gc`, `fsck`) its listener has heard of (`postgres::Listener`: a commit's notification
/// reaches it within milliseconds), and the current [`PG_KEEP`]-long period: answers are kept
/// for at most that period, for changes not heard of (far below the time the kernel itself keeps
/// a shared store's attributes and names).
pub(super) fn pg_snapshot(writes: u64, heard: u64) -> Snapshot {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let period = START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        / PG_KEEP.as_millis() as u64;
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(&period.to_le_bytes());
    header[8..16].copy_from_slice(&heard.to_le_bytes());
    Snapshot {
        changes: writes,
        header,
    }
}

/// At most how long a PostgreSQL index's daemon keeps an answer (see [`pg_snapshot`]).
pub(super) const PG_KEEP: std::time::Duration = std::time::Duration::from_millis(100);

/// The row at a name, in any state, and whether it is a directory being built (hidden).
pub(super) type Named = Option<(Entry, bool)>;

/// Answers read at [`RowCache::at`].
#[derive(Default)]
pub(super) struct RowCache {
    at: Option<Snapshot>,
    /// Rows by inode number, as `SELECT ... WHERE ino = ?` returned them (before
    /// `Index::current`).
    by_ino: HashMap<u64, Entry>,
    /// The row at `(parent, name)`, in any state, and whether it is a hidden directory (being
    /// built); `None`: no row there.
    at_name: HashMap<(u64, Vec<u8>), Named>,
    /// Directories whose every name `at_name` holds (a name missing there is not in them),
    /// and directories found too large to be read whole (see [`LISTING_MAX`]).
    complete: std::collections::HashSet<u64>,
    too_large: std::collections::HashSet<u64>,
    /// Directories where a name not kept was looked up once already: the next such lookup
    /// reads the directory whole (`cp -r` looks up name after name in one directory; a `stat`
    /// here and there does not pay for whole directories).
    missed: std::collections::HashSet<u64>,
    /// Whether the damaged-content list of `Index` was read (or kept up to date) at `at`.
    pub(super) damaged_current: bool,
}

/// A PostgreSQL daemon reads a directory of up to this many names whole when it looks up a
/// second name not kept there, so that the next lookups there (`cp -r` creating its files one
/// by one) need no round trip.
pub(super) const LISTING_MAX: usize = 256;

impl RowCache {
    /// Drops every answer unless they were read at `now`; afterwards answers read at `now` may
    /// be kept. `None`: no snapshot, nothing is kept.
    pub(super) fn validate(&mut self, now: Option<Snapshot>) {
        if self.at == now && now.is_some() {
            return;
        }
        self.at = now;
        self.damaged_current = false;
        fn reset<K, V>(m: &mut HashMap<K, V>) {
            if m.capacity() > 1024 && m.len() < m.capacity() / 8 {
                *m = HashMap::new();
            } else if !m.is_empty() {
                m.clear();
            }
        }
        reset(&mut self.by_ino);
        reset(&mut self.at_name);
        self.complete.clear();
        self.too_large.clear();
        self.missed.clear();
    }

    /// Notes a lookup of a name not kept in directory `dir`; whether it is the second (then
    /// the directory is worth reading whole).
    pub(super) fn missed_again(&mut self, snap: Option<Snapshot>, dir: u64) -> bool {
        self.keeps(snap) && !self.missed.insert(dir)
    }

    /// Whether every name of directory `dir` is kept.
    pub(super) fn is_complete(&self, dir: u64) -> bool {
        self.complete.contains(&dir)
    }

    /// Whether directory `dir` was found too large to be read whole.
    pub(super) fn is_too_large(&self, dir: u64) -> bool {
        self.too_large.contains(&dir)
    }

    /// Keeps every row of directory `dir`, read whole at `snap` (each with whether it is a
    /// hidden directory being built); `None`: more than [`LISTING_MAX`] names.
    pub(super) fn keep_listing(
        &mut self,
        snap: Option<Snapshot>,
        dir: u64,
        rows: Option<&[(Entry, bool)]>,
    ) {
        if !self.keeps(snap) {
            return;
        }
        let Some(rows) = rows else {
            self.too_large.insert(dir);
            return;
        };
        self.make_room();
        for (e, hidden) in rows {
            self.by_ino.insert(e.ino, e.clone());
            self.at_name
                .insert((dir, e.name.clone()), Some((e.clone(), *hidden)));
        }
        self.complete.insert(dir);
    }

    /// Whether answers read at `snap` may be kept now.
    fn keeps(&self, snap: Option<Snapshot>) -> bool {
        snap.is_some() && self.at == snap
    }

    pub(super) fn row(&self, ino: u64) -> Option<&Entry> {
        self.by_ino.get(&ino)
    }

    pub(super) fn row_at(&self, parent: u64, name: &[u8]) -> Option<&Named> {
        if self.at_name.is_empty() {
            return None;
        }
        self.at_name.get(&(parent, name.to_vec()))
    }

    /// Keeps `e`, read by inode number at `snap`.
    pub(super) fn keep_row(&mut self, snap: Option<Snapshot>, e: &Entry) {
        if self.keeps(snap) {
            self.make_room();
            self.by_ino.insert(e.ino, e.clone());
        }
    }

    /// Keeps what `(parent, name)` held at `snap`.
    pub(super) fn keep_row_at(
        &mut self,
        snap: Option<Snapshot>,
        parent: u64,
        name: &[u8],
        e: &Named,
    ) {
        if self.keeps(snap) {
            self.make_room();
            // (Every row kept by name is kept by inode number too: `sealed` and `forget_ino`
            // find its name there, without a scan.)
            if let Some((row, _)) = e {
                self.by_ino.insert(row.ino, row.clone());
            }
            self.at_name.insert((parent, name.to_vec()), e.clone());
        }
    }

    /// The damaged-content list was read (or found current) at `snap`.
    pub(super) fn damaged_read_at(&mut self, snap: Option<Snapshot>) {
        if self.keeps(snap) {
            self.damaged_current = true;
        }
    }

    /// After a change of the caller's own, whose every effect on rows it patches in
    /// ([`RowCache::patch_row`], [`RowCache::forget_ino`]): answers read at `from` are true at
    /// `to` too. Returns whether they were kept (otherwise the cache starts over at `to`).
    pub(super) fn rebase(&mut self, from: Option<Snapshot>, to: Option<Snapshot>) -> bool {
        // (Within one period only: what was read in an earlier one is not kept longer.)
        let same_period = matches!((from, to), (Some(a), Some(b)) if a.header == b.header);
        if same_period && self.at == from {
            self.at = to;
            true
        } else {
            self.validate(to);
            false
        }
    }

    /// Row `e` as it now is, by inode number and by name (a visible row).
    pub(super) fn patch_row(&mut self, e: &Entry) {
        if self.at.is_none() {
            return;
        }
        self.make_room();
        if let Some(old) = self.by_ino.insert(e.ino, e.clone())
            && (old.parent, &old.name) != (e.parent, &e.name)
        {
            self.at_name.remove(&(old.parent, old.name));
        }
        // (A directory being built is hidden, as `Index::row_named` reads it.)
        let hidden = e.kind == super::Kind::Dir && e.state == super::State::Writing;
        self.at_name
            .insert((e.parent, e.name.clone()), Some((e.clone(), hidden)));
    }

    /// Row `ino` changed in a way not patched in: forgets every answer about it (and which
    /// directories are kept whole: its own may be one).
    pub(super) fn forget_ino(&mut self, ino: u64) {
        if let Some(e) = self.by_ino.remove(&ino) {
            self.at_name.remove(&(e.parent, e.name));
        }
        self.complete.clear();
    }

    /// Row `ino` was sealed (its commit, made while open, is final), if it is kept.
    pub(super) fn sealed(&mut self, ino: u64) {
        let Some(e) = self.by_ino.get_mut(&ino) else {
            return; // (nor by name: see `keep_row_at`)
        };
        e.committed_open = false;
        if let Some(Some((named, _))) = self.at_name.get_mut(&(e.parent, e.name.clone())) {
            named.committed_open = false;
        }
    }

    fn make_room(&mut self) {
        if self.by_ino.len() + self.at_name.len() >= MAX_KEPT {
            self.by_ino = HashMap::new();
            self.at_name = HashMap::new();
            self.complete.clear();
        }
    }
}
