//! The SQLite index: which path holds which content, and every path that ever held a file.
//!
//! This is the only module in the crate that touches SQLite. One table, `entries`, holds one row
//! per directory, file and tombstone, keyed by inode number (never reused) and unique by
//! `(parent, name)`. A tombstone is a row in state [`State::Tombstone`]: the path stays taken
//! forever, so it can never resolve to other content. Errors come back as `io::Error` so that a
//! full disk (`SQLITE_FULL`) reaches the caller as `ENOSPC`.
//!
//! # Files being written: reserved names
//!
//! A new file has no row until its first commit: `create` reserves its `(parent, name)` in
//! memory ([`Index::insert`] of a new file, state [`State::Writing`]) and gets its inode number,
//! without a transaction. Every read of this `Index` shows a reserved file exactly as a row in
//! state `Writing` would read ([`Index::get`], [`Index::lookup`], [`Index::children`], ...); a
//! reserved name is taken for every insert and rename; the changes of a file being written
//! (`chmod`, `rename`, `unlink`, abandoning it) change the reservation. Its first commit
//! ([`Index::commit_file`]) inserts the row in the same transaction that records the content, so
//! a small file costs one index transaction; the reservation goes once that transaction has
//! committed. The directory a reserved name was created, renamed or removed in shows the new
//! times at once, and takes them in the table with the periodic work ([`Index::seal_pending`],
//! every 200 ms, which also writes the seals of released files) or at a clean stop
//! ([`Index::seal_all_committed`]): written with each file's row, they would cost most small
//! files one more page in their commit.
//!
//! Reservations live only in the writable daemon's `Index` (the one process that creates
//! entries: it holds `STORE/lock`): another process (a `--read-only` daemon, `artifactfs ls`)
//! sees a new file from its first commit on, and a crash simply loses them, as the rows of
//! files being written were dropped at the next start. That start still drops rows in state
//! `Writing`: stores written by earlier versions have them, and rows of committed files being
//! written again ([`Index::mark_rewriting`], [`Index::recreate_at_tombstone`]) keep using
//! that state. The reservation is a seam: with a shared index (several writing daemons), the
//! reservation moves into that index, which then holds the reserved names itself.
//!
//! Inode numbers of rows and of reservations come from one counter of this `Index`, started
//! above every number the table has used (`sqlite_sequence`, kept by `AUTOINCREMENT`); rows are
//! inserted with their number, which keeps `sqlite_sequence` up to date. A number is never
//! handed out twice by one daemon, and only the numbers of reservations dropped after the last
//! commit before a stop may be handed out again after a restart (no row and no kernel cache
//! knows them then).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, params};

mod cache;
mod db;
mod postgres;
use db::{Db, DbRow};
pub use postgres::{Change, ChangeSink, Listener};
mod registry;
pub use registry::{ModelRow, VersionRecord, VersionRow, VersionStatus};

use super::Hash;

/// The table of piece states (`postgres::PIECE_STATES` is PostgreSQL's, with `BYTEA`).
const PIECE_STATES_TABLE: &str = "CREATE TABLE piece_states (hash TEXT PRIMARY KEY, piece BIGINT NOT NULL, states BLOB NOT NULL);";

/// Schema version stored in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 8;

pub const ROOT_INO: u64 = 1;
pub const RUNS_INO: u64 = 2;
pub const MODELS_INO: u64 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Live,
    Tombstone,
    Writing,
}

/// One row of the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub ino: u64,
    pub parent: u64,
    pub name: Vec<u8>,
    pub kind: Kind,
    pub state: State,
    /// Which part of the namespace the entry lives in (see `namespace::Zone`); stored so that
    /// the rules for a directory need no walk up to the root on every create.
    pub zone: u8,
    pub hash: Option<Hash>,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Nanoseconds since the Unix epoch.
    pub mtime: i64,
    pub ctime: i64,
    pub crtime: i64,
    /// Last access as `utimens` set it (reads never change it; new entries start at their
    /// creation time).
    pub atime: i64,
    /// How often the row's inode number was taken again (a directory made again where one was
    /// removed, a file created again at its tombstone): the kernel must take each for a new
    /// inode, not for the one it may still hold for the removed entry.
    pub generation: u32,
    /// Committed by a `close()` while the writing daemon still holds the file open (a dup'd
    /// descriptor may write again): `state` reads `Live`, because the writing daemon knows its
    /// own writers, but any other reader must treat the file as still being written.
    pub committed_open: bool,
}

/// Where a commit's content is: see [`Index::commit_file_with`].
pub enum Stored<'a> {
    /// In the blob store; asked under the write lock whether the blob is (still) there.
    Blob(&'a dyn Fn() -> bool),
    /// These bytes, kept in the index itself (in place of the index's copy if that was found
    /// damaged).
    Inline { bytes: &'a [u8] },
}

/// What a new row needs; the index assigns the inode number.
#[derive(Debug, Clone)]
pub struct NewEntry<'a> {
    pub parent: u64,
    pub name: &'a [u8],
    pub kind: Kind,
    pub state: State,
    pub zone: u8,
    pub hash: Option<Hash>,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub time: i64,
}

impl<'a> NewEntry<'a> {
    /// A directory.
    pub fn new_dir(
        parent: u64,
        name: &'a [u8],
        zone: u8,
        mode: u32,
        owner: (u32, u32),
        time: i64,
    ) -> Self {
        NewEntry {
            kind: Kind::Dir,
            state: State::Live,
            ..Self::new_file(parent, name, zone, mode, owner, time)
        }
    }

    /// A file that starts being written (no content yet): [`Index::insert`] reserves its name
    /// until its first commit inserts the row.
    pub fn new_file(
        parent: u64,
        name: &'a [u8],
        zone: u8,
        mode: u32,
        owner: (u32, u32),
        time: i64,
    ) -> Self {
        NewEntry {
            parent,
            name,
            kind: Kind::File,
            state: State::Writing,
            zone,
            hash: None,
            size: 0,
            mode,
            uid: owner.0,
            gid: owner.1,
            time,
        }
    }
}

/// Metadata changes (`chmod`, `chown`, `utimens`).
#[derive(Debug, Clone, Default)]
pub struct MetaChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<i64>,
    pub atime: Option<i64>,
    pub ctime: i64,
}

/// What `commit_file` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    Recorded,
    /// Recorded, and the content, which `fsck --verify` had found damaged, is whole again:
    /// these bytes took the damaged copy's place and the mark is gone.
    Healed,
    /// The row was removed (or tombstoned) while the file was open: nothing recorded.
    Gone,
    /// The blob is not there (garbage collection took it): publish it again and retry.
    BlobMissing,
}

/// A file row as `fsck` sees it.
#[derive(Debug, Clone)]
pub struct FileRow {
    pub path: PathBuf,
    pub hash: Hash,
    pub size: u64,
    pub state: State,
}

pub struct Index {
    db: Db,
    /// Files released since their last commit, still `STATE_COMMITTED_OPEN` in the table: sealed
    /// in the next commit's transaction or by [`Index::seal_pending`], whichever comes first.
    pending_seals: RefCell<Vec<u64>>,
    /// Files created again at their tombstone: the mode, owner and birth their writer gave
    /// them, which their row takes in the same transaction as the path's last content (see
    /// [`Index::recreate_at_tombstone`]).
    owners_at_commit: RefCell<HashMap<u64, (u32, u32, u32, i64)>>,
    /// New files being written, which have no row yet (see the module doc).
    reserved: RefCell<Reservations>,
    /// The next inode number to hand out, to a row or a reservation; 0 until first needed.
    next_ino: Cell<u64>,
    /// The inode number `sqlite_sequence` was last moved to by [`Index::record_used_inos`].
    recorded_seq: Cell<u64>,
    /// The contents `fsck --verify` found damaged, as last read from `damaged_blobs`: reloaded
    /// when another connection (fsck, in its own process) has changed the index since.
    damaged: RefCell<DamageCache>,
    /// A PostgreSQL index's: this daemon's session (0: none), its machine, the end of its
    /// block of inode numbers, and when it last told the index it is alive.
    session: Cell<i64>,
    machine: String,
    ino_block_end: Cell<u64>,
    last_heartbeat: Cell<Option<std::time::Instant>>,
    /// When a heartbeat last found this daemon's session alive, and whether the last one
    /// failed (PostgreSQL away).
    alive_at: Cell<Option<std::time::Instant>>,
    heartbeat_failed: Cell<bool>,
    /// The WAL-index header, mapped: how [`Index::snapshot`] tells that another connection
    /// committed. Only the writable daemon's index maps it (see `cache`).
    shm: Option<cache::ShmHeader>,
    /// Rows and names read while nothing in the index changed since (see `cache`).
    cache: RefCell<cache::RowCache>,
    /// A PostgreSQL index's daemon keeps answers too, for a moment (see `cache::pg_snapshot`).
    pg_cache: bool,
    /// Files being written whose rows this daemon deleted (`unlink` while open): their
    /// commits find them gone (see `gone_or_lost`). A few bytes for each such file.
    removed_here: RefCell<std::collections::HashSet<u64>>,
    /// How many changes of other connections the listener heard of (see `cache::pg_snapshot`).
    heard: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// [`Index::is_damaged`]'s memory: the table's hashes and the `PRAGMA data_version` they were
/// read at (it changes whenever another connection commits).
#[derive(Default)]
struct DamageCache {
    read_at: Option<i64>,
    /// When the table was last read (a PostgreSQL index has no `data_version`: it reads the
    /// table again after [`DAMAGE_RELOAD`]).
    read_when: Option<std::time::Instant>,
    hashes: std::collections::HashSet<Hash>,
}

/// Files being written that have no row until their first commit.
#[derive(Default)]
struct Reservations {
    /// By inode number: each as a row in state [`State::Writing`] would read.
    files: BTreeMap<u64, Entry>,
    /// `(parent, name)` to inode number.
    names: HashMap<(u64, Vec<u8>), u64>,
    /// Directories a reserved name was created, renamed or removed in, since the table last
    /// took their times: their mtime and ctime read as at least this (written by
    /// [`Index::seal_pending`], by [`Index::change_meta`] of the directory, or at a clean stop).
    dir_times: HashMap<u64, i64>,
}

impl Reservations {
    fn remove(&mut self, ino: u64) -> Option<Entry> {
        let e = self.files.remove(&ino)?;
        self.names.remove(&(e.parent, e.name.clone()));
        Some(e)
    }

    /// A name was created, renamed or removed in `dir` at `now`.
    fn touch(&mut self, dir: u64, now: i64) {
        let t = self.dir_times.entry(dir).or_insert(now);
        *t = (*t).max(now);
    }
}

/// Undoes a step or transaction of the index if the code inside it panics (see
/// [`Index::write_locked`]).
struct UndoOnUnwind<'a>(&'a Db, db::Step);

impl Drop for UndoOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.0.end_step(self.1, false);
        }
    }
}

/// How long a PostgreSQL index's daemon answers whether content is damaged from the table as
/// it last read it.
const DAMAGE_RELOAD: Duration = Duration::from_secs(1);

/// How far ahead of the inode numbers handed out [`Index::record_used_inos`] moves the
/// table's sequence.
const INO_BLOCK: u64 = 1024;

const COLUMNS: &str = "ino, parent, name, kind, state, zone, hash, size, mode, uid, gid, mtime, ctime, crtime, atime, \
     generation";

/// The first inode number no row has used, nor any row deleted since (`AUTOINCREMENT` keeps the
/// highest number ever used in `sqlite_sequence`).
fn first_unused_ino(db: &Db) -> io::Result<u64> {
    db.row(
        "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'entries'), 0),
                    COALESCE((SELECT MAX(ino) FROM entries), 0)) + 1",
        params![],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
}

/// How long a connection waits inside SQLite for another connection's write lock, unless told
/// otherwise: `gc`, `fsck` and the other commands may wait this long.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The index was locked by another connection (`SQLITE_BUSY`) for longer than this connection's
/// busy timeout: the statement (or transaction) that met it changed nothing, and may simply be
/// tried again.
#[derive(Debug)]
pub struct IndexBusy(String);

impl std::fmt::Display for IndexBusy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "index busy: {}", self.0)
    }
}

impl std::error::Error for IndexBusy {}

/// The error of a writer whose daemon's session `session` lost its lease (`EIO`).
fn lease_lost(session: i64) -> io::Error {
    io::Error::other(LeaseLost(format!(
        "this daemon's session {session} lost its lease (another machine cleaned up what it \
             was writing): the file's writes are not recorded"
    )))
}

/// See [`lease_lost`]; reads as `EIO`.
#[derive(Debug)]
pub struct LeaseLost(String);

impl std::fmt::Display for LeaseLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LeaseLost {}

/// Whether `e` is an [`IndexBusy`]: another connection held the index's write lock.
pub fn is_busy(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<IndexBusy>())
}

/// Checks that `url` is a PostgreSQL URL this index can use (nothing is connected).
pub fn pg_url_checked(url: &str) -> io::Result<()> {
    postgres::config(url).map(drop)
}

/// The connection settings of a `postgresql://` URL (see [`postgres::config`]).
fn pg_config(url: &str) -> io::Result<::postgres::Config> {
    postgres::config(url)
}

fn to_io(e: rusqlite::Error) -> io::Error {
    db::sqlite_error(e)
}

fn kind_code(k: Kind) -> i64 {
    match k {
        Kind::Dir => 1,
        Kind::File => 2,
    }
}

/// `entries.state` codes: the three [`State`]s, and a fourth for a file being written again
/// whose last commit was fsync'd. That one reads as [`State::Writing`], but a crash brings its
/// fsync'd version back instead of dropping it (see [`Index::mark_rewriting`]).
const STATE_LIVE: i64 = 0;
const STATE_TOMBSTONE: i64 = 1;
const STATE_WRITING: i64 = 2;
const STATE_WRITING_KEEP_SYNCED: i64 = 3;
/// Committed, but the file is still open for writing on the writing daemon: reads as
/// [`State::Live`] with [`Entry::committed_open`] set. Turned into `STATE_LIVE` when the file is
/// released (batched: [`Index::seal_later`]); a crash keeps the committed content (its `close()`
/// returned 0) and seals it.
const STATE_COMMITTED_OPEN: i64 = 4;

fn state_code(s: State) -> i64 {
    match s {
        State::Live => STATE_LIVE,
        State::Tombstone => STATE_TOMBSTONE,
        State::Writing => STATE_WRITING,
    }
}

/// Inserts row `ino` for `e`; a taken `(parent, name)` inserts nothing (returns 0): skipped, not
/// failed, since a failed statement would abort a PostgreSQL transaction the insert is part of.
fn insert_entry(db: &Db, e: &NewEntry, ino: u64) -> io::Result<usize> {
    let values = entry_values(e, ino);
    let params: Vec<&dyn rusqlite::ToSql> = values.iter().map(|v| v as _).collect();
    db.exec(INSERT_SKIPPING_TAKEN, &params)
}

/// The values of [`INSERT_SKIPPING_TAKEN`]'s parameters for `e` as inode `ino` (those of the
/// server function `artifactfs_create` too, see `Index::insert_in_dir`).
fn entry_values(e: &NewEntry, ino: u64) -> [rusqlite::types::Value; 12] {
    use rusqlite::types::Value::{Blob, Integer, Null, Text};
    [
        Integer(e.parent as i64),
        Blob(e.name.to_vec()),
        Integer(kind_code(e.kind)),
        Integer(state_code(e.state)),
        Integer(e.zone as i64),
        e.hash.map_or(Null, |h| Text(h.to_hex())),
        Integer(e.size as i64),
        Integer(e.mode as i64),
        Integer(e.uid as i64),
        Integer(e.gid as i64),
        Integer(e.time),
        Integer(ino as i64),
    ]
}

/// The row [`insert_entry`] makes of `e` as inode `ino`.
fn new_entry_row(e: &NewEntry, ino: u64) -> Entry {
    Entry {
        ino,
        parent: e.parent,
        name: e.name.to_vec(),
        kind: e.kind,
        state: e.state,
        zone: e.zone,
        hash: e.hash,
        size: e.size,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime: e.time,
        ctime: e.time,
        crtime: e.time,
        atime: e.time,
        generation: 0,
        committed_open: false,
    }
}

const INSERT_SKIPPING_TAKEN: &str = "INSERT INTO entries
     (ino, parent, name, kind, state, zone, hash, size, mode, uid, gid, mtime, ctime, crtime, atime)
     VALUES (?12, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11, ?11, ?11)
     ON CONFLICT DO NOTHING";

/// Deletes the row of committed file `ino` that a rename of file `by` onto identical content
/// replaces, and gives `by` its history; `false` if it is no longer such a file (nothing
/// deleted).
fn delete_replaced(db: &Db, ino: u64, by: u64) -> io::Result<bool> {
    let gone = db.exec(
        &format!(
            "DELETE FROM entries WHERE ino = ?1 AND kind = 2
             AND state IN ({STATE_LIVE}, {STATE_COMMITTED_OPEN})"
        ),
        params![ino as i64],
    )?;
    if gone == 1 {
        // The path's earlier contents (a rewritable file's history) stay the path's.
        db.exec(
            "UPDATE history SET ino = ?2 WHERE ino = ?1",
            params![ino as i64, by as i64],
        )?;
    }
    Ok(gone == 1)
}

fn row_to_entry(row: &DbRow) -> rusqlite::Result<Entry> {
    let kind = match row.get::<_, i64>(3)? {
        1 => Kind::Dir,
        _ => Kind::File,
    };
    let code = row.get::<_, i64>(4)?;
    let state = match code {
        STATE_LIVE | STATE_COMMITTED_OPEN => State::Live,
        STATE_TOMBSTONE => State::Tombstone,
        // STATE_WRITING, STATE_WRITING_KEEP_SYNCED
        _ => State::Writing,
    };
    let hash: Option<String> = row.get(6)?;
    Ok(Entry {
        ino: row.get::<_, i64>(0)? as u64,
        parent: row.get::<_, i64>(1)? as u64,
        name: row.get(2)?,
        kind,
        state,
        zone: row.get::<_, i64>(5)? as u8,
        hash: hash.as_deref().and_then(Hash::from_hex),
        size: row.get::<_, i64>(7)? as u64,
        mode: row.get::<_, i64>(8)? as u32,
        uid: row.get::<_, i64>(9)? as u32,
        gid: row.get::<_, i64>(10)? as u32,
        mtime: row.get(11)?,
        ctime: row.get(12)?,
        crtime: row.get(13)?,
        atime: row.get(14)?,
        generation: row.get::<_, i64>(15)? as u32,
        committed_open: code == STATE_COMMITTED_OPEN,
    })
}

impl Index {
    /// Opens the index for the daemon: creates or migrates the schema, and drops rows of writes
    /// that never completed.
    pub fn open(path: &Path, owner: (u32, u32), now: i64) -> io::Result<Index> {
        let index = Index::with(Db::Sqlite(Connection::open(path).map_err(to_io)?));
        index.configure()?;
        index.migrate(owner, now)?;
        index.drop_unfinished_writes("")?;
        index.next_ino.set(first_unused_ino(&index.db)?);
        // This connection has mapped the WAL index (its `-shm` file) by now, and keeps it
        // mapped for as long as it lives.
        let mut index = index;
        index.shm = index.db.sqlite().and_then(cache::ShmHeader::of);
        Ok(index)
    }

    fn with(db: Db) -> Index {
        if let Some(conn) = db.sqlite() {
            // Room for every statement of the common requests (rusqlite keeps 16 by default).
            conn.set_prepared_statement_cache_capacity(64);
        }
        Index {
            session: Cell::new(0),
            machine: String::new(),
            ino_block_end: Cell::new(0),
            last_heartbeat: Cell::new(None),
            alive_at: Cell::new(None),
            heartbeat_failed: Cell::new(false),
            db,
            pending_seals: Default::default(),
            owners_at_commit: Default::default(),
            reserved: Default::default(),
            next_ino: Cell::new(0),
            recorded_seq: Cell::new(0),
            damaged: Default::default(),
            shm: None,
            pg_cache: false,
            removed_here: RefCell::default(),
            heard: Default::default(),
            cache: Default::default(),
        }
    }

    /// Opens a PostgreSQL index for a daemon (`url`: `postgresql://…`), of the machine whose
    /// store has identity `machine`: creates the schema on first use (or checks its version),
    /// starts this daemon's session and drops what daemons that are gone left being written.
    pub fn open_postgres(
        url: &str,
        machine: &str,
        owner: (u32, u32),
        now: i64,
    ) -> io::Result<Index> {
        let mut index = Index::with(Db::postgres(pg_config(url)?)?);
        index.machine = machine.to_owned();
        postgres::prepare_schema(&index.db, Some((owner, now)))?;
        postgres::refuse_unfinished_migration(&index.db)?;
        let sent = std::time::Instant::now();
        let session = postgres::start_session(&index.db, machine)?;
        index.session.set(session);
        index.pg_cache = true;
        index.last_heartbeat.set(Some(sent));
        index.alive_at.set(Some(sent));
        index.clean_up_after_dead_sessions()?;
        Ok(index)
    }

    /// On a shared (PostgreSQL) index: starts a [`Listener`] that hands every change any
    /// daemon or command commits to `sink`. `None` on the embedded index (one writer, whose
    /// kernel sees every change itself).
    pub fn listen(&self, sink: ChangeSink) -> io::Result<Option<Listener>> {
        match self.db.pg_config() {
            Some(config) => {
                let own = self.db.backend_pid().unwrap_or_default();
                Listener::start(config, &self.machine, sink, self.heard.clone(), own).map(Some)
            }
            None => Ok(None),
        }
    }

    /// On a shared index: takes the lock that lets one `gc` or `fsck` (`what`) at a time run
    /// on the store, from any machine, for as long as this index is open; `Ok(Some(holder))`
    /// names the process that has it instead. Nothing on the embedded index (`Ok(None)`).
    pub fn take_maintenance_lock(&self, what: &str) -> io::Result<Option<String>> {
        if !self.db.is_postgres() {
            return Ok(None);
        }
        postgres::take_maintenance_lock(&self.db, what)
    }

    /// Whether this is a shared (PostgreSQL) index.
    pub fn is_shared(&self) -> bool {
        self.db.is_postgres()
    }

    /// Opens a PostgreSQL index as the target of `artifactfs migrate`: creates the schema if
    /// the database has none; no session (the migration writes nothing being written).
    pub fn open_postgres_target(url: &str, owner: (u32, u32), now: i64) -> io::Result<Index> {
        let index = Index::with(Db::postgres(pg_config(url)?)?);
        postgres::prepare_schema(&index.db, Some((owner, now)))?;
        Ok(index)
    }

    /// Opens a PostgreSQL index for a command (`ls`, `fsck`, `gc`, ...) beside the daemons that
    /// write it: checks its schema version, and changes nothing else.
    pub fn open_postgres_client(url: &str) -> io::Result<Index> {
        let index = Index::with(Db::postgres(pg_config(url)?)?);
        postgres::prepare_schema(&index.db, None)?;
        Ok(index)
    }

    /// Copies every row of this (embedded) index into the empty PostgreSQL index `target`, in
    /// one transaction of `target`: entries (tombstones included; files committed while open
    /// are sealed, as at any start), earlier contents, the registry, damaged marks and small
    /// contents; then moves `target`'s inode sequence above every number used here and
    /// records `migration` as done. All of it or nothing: an interrupted copy leaves `target`
    /// as it was. Returns how many rows it copied.
    pub fn copy_rows_into(&self, target: &Index, migration: &str) -> io::Result<u64> {
        /// Rows read from this index at a time.
        const MIGRATE_PAGE: usize = 1000;
        use rusqlite::types::Value;
        const TABLES: [(&str, &str); 8] = [
            (
                "entries",
                "ino, parent, name, kind, state, zone, hash, size, mode, uid, gid, mtime, ctime, \
                 crtime, atime, generation",
            ),
            ("history", "ino, hash, size, mtime, replaced"),
            ("registered_models", "ino, name, next_version, created"),
            (
                "model_versions",
                "dir_ino, model_ino, version, status, message, run_id, artifact_path, \
                 model_uuid, model_id, flavors, signature, utc_time_created, total_size, \
                 file_count, digest, source, updated",
            ),
            ("model_aliases", "model_ino, alias, version"),
            ("damaged_blobs", "hash, found"),
            ("inline_content", "hash, data"),
            ("piece_states", "hash, piece, states"),
        ];
        target.write_locked(|t| {
            let mut copied = 0u64;
            for (table, columns) in TABLES {
                let n = columns.split(',').count();
                let marks: Vec<String> = (1..=n).map(|i| format!("?{i}")).collect();
                // The fixed directories are the target's own already: theirs are kept.
                let insert = format!(
                    "INSERT INTO {table} ({columns}) VALUES ({}) ON CONFLICT DO NOTHING",
                    marks.join(", ")
                );
                // A page of rows at a time, in rowid order (history's order is its meaning),
                // so that memory stays bounded whatever the store's size.
                let mut after = i64::MIN;
                loop {
                    let page = self.db.all(
                        &format!(
                            "SELECT rowid, {columns} FROM {table} WHERE rowid > ?1
                             ORDER BY rowid LIMIT {MIGRATE_PAGE}"
                        ),
                        params![after],
                        |r| {
                            let rowid = r.get::<_, i64>(0)?;
                            let row = (1..=n)
                                .map(|i| r.get::<_, Value>(i))
                                .collect::<rusqlite::Result<Vec<_>>>()?;
                            Ok((rowid, row))
                        },
                    )?;
                    let Some(&(last, _)) = page.last() else {
                        break;
                    };
                    after = last;
                    for (_, mut row) in page {
                        if table == "entries"
                            && let Value::Integer(state) = row[4]
                            && state == STATE_COMMITTED_OPEN
                        {
                            row[4] = Value::Integer(STATE_LIVE);
                        }
                        let params: Vec<&dyn rusqlite::ToSql> =
                            row.iter().map(|v| v as &dyn rusqlite::ToSql).collect();
                        copied += t.db.exec(&insert, &params)? as u64;
                    }
                }
            }
            postgres::finish_migration(&t.db, migration)?;
            Ok(copied)
        })
    }

    /// A PostgreSQL index as a migration finds it: whether `migration` already copied its rows,
    /// after checking that it holds nothing else (no entry but the fixed directories, or
    /// this same migration started).
    pub fn migration_target_state(&self, migration: &str) -> io::Result<bool> {
        postgres::migration_state(&self.db, migration)
    }

    /// Drops the rows of writes that never completed (those that also meet `scope`, an SQL
    /// condition on `entries` starting with ` AND`, or all): directories a registration was
    /// still filling go with their trees. Files being written when their daemon stopped: a
    /// version fsync'd before the latest writes, or committed while still open, is kept;
    /// otherwise the file is gone — its path a tombstone if an earlier version had been
    /// committed.
    fn drop_unfinished_writes(&self, scope: &str) -> io::Result<()> {
        self.db.batch(&format!(
            "WITH RECURSIVE t(i) AS (
                 SELECT ino FROM entries WHERE kind = 1 AND state = {STATE_WRITING}{scope}
                 UNION ALL SELECT e.ino FROM entries e JOIN t ON e.parent = t.i)
             DELETE FROM entries WHERE ino IN (SELECT i FROM t);
             UPDATE entries SET state = {STATE_LIVE}
                 WHERE state IN ({STATE_WRITING_KEEP_SYNCED}, {STATE_COMMITTED_OPEN}){scope};
             UPDATE entries SET state = {STATE_TOMBSTONE}
                 WHERE state = {STATE_WRITING} AND hash IS NOT NULL{scope};
             DELETE FROM entries WHERE state = {STATE_WRITING}{scope};",
        ))
    }

    /// The state of the index now, for the cache: `None` (nothing may be cached) without the
    /// mapped WAL-index header, or inside a transaction: one begun (whose uncommitted rows may
    /// be rolled back), or the read transaction of a statement still stepping (whose reads see
    /// the index as it was when it began, perhaps older than the header says). Drops the
    /// cached answers unless they were read in this same state.
    fn snapshot(&self) -> Option<cache::Snapshot> {
        if self.pg_cache {
            let snap = self.snapshot_unvalidated();
            self.cache.borrow_mut().validate(snap);
            return snap;
        }
        let conn = self.db.sqlite()?;
        let idle = conn.is_autocommit()
            && unsafe {
                rusqlite::ffi::sqlite3_txn_state(conn.handle(), c"main".as_ptr())
                    == rusqlite::ffi::SQLITE_TXN_NONE
            };
        let snap = match &self.shm {
            Some(shm) if idle => cache::snapshot(shm, conn.total_changes()),
            _ => None,
        };
        self.cache.borrow_mut().validate(snap);
        snap
    }

    /// A PostgreSQL daemon's snapshot now, without dropping what was kept before it.
    fn snapshot_unvalidated(&self) -> Option<cache::Snapshot> {
        if self.pg_cache {
            let heard = self.heard.load(std::sync::atomic::Ordering::Acquire);
            self.db.writes().map(|w| cache::pg_snapshot(w, heard))
        } else {
            None
        }
    }

    /// A new inode number, for a row or a reservation.
    fn new_ino(&self) -> io::Result<u64> {
        let mut ino = self.next_ino.get();
        if self.db.is_postgres() {
            if ino == 0 || ino >= self.ino_block_end.get() {
                ino = postgres::ino_block(&self.db)?;
                self.ino_block_end.set(ino + postgres::INO_BLOCK);
            }
        } else if ino == 0 {
            ino = first_unused_ino(&self.db)?;
        }
        self.next_ino.set(ino + 1);
        Ok(ino)
    }

    /// Whether `e` is a new file that starts being written and is reserved, not inserted. A
    /// PostgreSQL index, which daemons of other machines share, inserts its row at once: its
    /// unique `(parent, name)` decides between two machines creating the same path.
    fn reserves(&self, e: &NewEntry) -> bool {
        e.kind == Kind::File
            && e.state == State::Writing
            && e.hash.is_none()
            && !self.db.is_postgres()
    }

    /// The reserved file `ino`, if it is one.
    fn reserved(&self, ino: u64) -> Option<Entry> {
        self.reserved.borrow().files.get(&ino).cloned()
    }

    fn reserved_at(&self, parent: u64, name: &[u8]) -> Option<Entry> {
        let r = self.reserved.borrow();
        if r.files.is_empty() {
            return None;
        }
        let ino = r.names.get(&(parent, name.to_vec()))?;
        r.files.get(ino).cloned()
    }

    /// `e` as it reads now: a directory takes the times reserved names gave it.
    fn current(&self, mut e: Entry) -> Entry {
        if e.kind == Kind::Dir
            && let Some(&t) = self.reserved.borrow().dir_times.get(&e.ino)
        {
            e.mtime = e.mtime.max(t);
            e.ctime = e.ctime.max(t);
        }
        // Released here, its seal waiting for the next transaction: sealed, for this daemon
        // (other daemons of a shared store see it being written until the seal is written).
        if e.committed_open && self.pending_seals.borrow().contains(&e.ino) {
            e.committed_open = false;
        }
        e
    }

    /// Reserves the name of a new file being written (see the module doc); `None` when it is
    /// taken, by a row in any state or by another reservation.
    fn reserve(&self, e: &NewEntry) -> io::Result<Option<u64>> {
        if self.reserved_at(e.parent, e.name).is_some() || self.row_at(e.parent, e.name)? {
            return Ok(None);
        }
        let ino = self.new_ino()?;
        let entry = Entry {
            ino,
            parent: e.parent,
            name: e.name.to_vec(),
            kind: Kind::File,
            state: State::Writing,
            zone: e.zone,
            hash: None,
            size: e.size,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.time,
            ctime: e.time,
            crtime: e.time,
            atime: e.time,
            generation: 0,
            committed_open: false,
        };
        let mut r = self.reserved.borrow_mut();
        r.names.insert((e.parent, entry.name.clone()), ino);
        r.files.insert(ino, entry);
        Ok(Some(ino))
    }

    /// Whether a row in any state (hidden directories included) has `(parent, name)`.
    fn row_at(&self, parent: u64, name: &[u8]) -> io::Result<bool> {
        Ok(self.row_named(parent, name)?.is_some())
    }

    /// Inside a transaction: the row of reserved file `r`, in state `state` with this content
    /// and these times, and the times its directory took meanwhile. The reservation stays until
    /// the caller's transaction has committed ([`Index::forget_reservation`]).
    #[allow(clippy::too_many_arguments)]
    fn insert_reserved(
        &self,
        r: &Entry,
        state: i64,
        hash: Option<&Hash>,
        size: u64,
        mtime: i64,
        ctime: i64,
    ) -> io::Result<()> {
        self.db.exec(
            &format!(
                "INSERT INTO entries ({COLUMNS})
                 VALUES (?1, ?2, ?3, 2, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
            ),
            params![
                r.ino as i64,
                r.parent as i64,
                r.name,
                state,
                r.zone as i64,
                hash.map(|h| h.to_hex()),
                size as i64,
                r.mode as i64,
                r.uid as i64,
                r.gid as i64,
                mtime,
                ctime,
                r.crtime,
                r.atime,
                r.generation as i64
            ],
        )?;
        self.record_used_inos()
    }

    /// Inside a transaction: every inode number handed out so far is kept from reuse after a
    /// restart (the explicit inserts record only their own). The sequence is moved
    /// [`INO_BLOCK`] numbers ahead at a time, so most commits leave its page alone (an insert
    /// below the recorded sequence does not write it either); a restart skips the rest of the
    /// block.
    fn record_used_inos(&self) -> io::Result<()> {
        if self.db.is_postgres() {
            return Ok(()); // the sequence handed out whole blocks
        }
        let last = self.next_ino.get().saturating_sub(1);
        if last <= self.recorded_seq.get() {
            return Ok(());
        }
        let ahead = last + INO_BLOCK;
        self.db.exec(
            "UPDATE sqlite_sequence SET seq = MAX(seq, ?1) WHERE name = 'entries'",
            params![ahead as i64],
        )?;
        // (Should the transaction roll back, the next insert past the real sequence records
        // its own number, as AUTOINCREMENT does: only numbers of dropped reservations could be
        // handed out again after a restart, which nothing refers to.)
        self.recorded_seq.set(ahead);
        Ok(())
    }

    /// Reserved file `ino` has its row now (the transaction that inserted it committed): the
    /// reservation goes. Its directory's new times stay in memory until the periodic work
    /// writes them ([`Index::seal_pending`]): written with each file, they would cost every
    /// small file's commit one more page (the directory's row is rarely on the file's).
    fn forget_reservation(&self, ino: u64) {
        self.reserved.borrow_mut().remove(ino);
    }

    /// Inside a transaction: the times reserved names gave their directories, into the table.
    /// Returns them, to be forgotten once the transaction has committed.
    fn write_dir_times(&self) -> io::Result<Vec<(u64, i64)>> {
        let dir_times: Vec<(u64, i64)> = self
            .reserved
            .borrow()
            .dir_times
            .iter()
            .map(|(&d, &t)| (d, t))
            .collect();
        for &(dir, t) in &dir_times {
            self.db.exec(
                "UPDATE entries SET mtime = CASE WHEN mtime > ?2 THEN mtime ELSE ?2 END,
                     ctime = CASE WHEN ctime > ?2 THEN ctime ELSE ?2 END
                     WHERE ino = ?1 AND kind = 1",
                params![dir as i64, t],
            )?;
        }
        Ok(dir_times)
    }

    /// The directory times of [`Index::write_dir_times`] are in the table: forgotten, unless a
    /// newer one came meanwhile.
    fn forget_dir_times(&self, written: &[(u64, i64)]) {
        let mut r = self.reserved.borrow_mut();
        for (dir, t) in written {
            if r.dir_times.get(dir) == Some(t) {
                r.dir_times.remove(dir);
            }
        }
    }

    /// How long a statement that needs the write lock waits inside SQLite while another
    /// connection holds it, before it fails with [`IndexBusy`]. The thread waits with whatever
    /// it holds: the daemon keeps this short and retries with its index mutex released
    /// (`Store::retry_busy`).
    pub fn set_busy_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.db.set_lock_timeout(timeout)
    }

    /// Opens an existing index for writing beside a daemon that may have it open too (no schema
    /// change, no clean-up of unfinished writes: those belong to the daemon).
    pub fn open_shared(path: &Path) -> io::Result<Index> {
        // Checks that it exists and has our schema version.
        drop(Index::open_readonly(path)?);
        let index = Index::with(Db::Sqlite(Connection::open(path).map_err(to_io)?));
        index.configure()?;
        Ok(index)
    }

    /// Opens an existing index without changing it (for `ls` and `fsck`, also while mounted).
    pub fn open_readonly(path: &Path) -> io::Result<Index> {
        if !path.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no index at {}", path.display()),
            ));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(to_io)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(to_io)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(to_io)?;
        if version != SCHEMA_VERSION {
            return Err(io::Error::other(format!(
                "index schema version {version}, this artifactfs reads {SCHEMA_VERSION}"
            )));
        }
        Ok(Index::with(Db::Sqlite(conn)))
    }

    fn configure(&self) -> io::Result<()> {
        self.set_busy_timeout(BUSY_TIMEOUT)?;
        self.db.batch(
            "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 PRAGMA foreign_keys = OFF;",
        )
    }

    fn migrate(&self, owner: (u32, u32), now: i64) -> io::Result<()> {
        let version: i64 = self
            .db
            .row("PRAGMA user_version", params![], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(io::Error::other(format!(
                "index schema version {version} is newer than this artifactfs ({SCHEMA_VERSION})"
            )));
        }
        if version < 1 {
            self.migrate_to_1(owner, now)?;
        }
        if version < 2 {
            self.migrate_to_2()?;
        }
        if version < 3 {
            self.migrate_to_3()?;
        }
        if version < 4 {
            self.migrate_to_4()?;
        }
        if version < 5 {
            self.migrate_to_5()?;
        }
        if version < 6 {
            self.migrate_to_6()?;
        }
        if version < 7 {
            self.migrate_to_7()?;
        }
        if version < 8 {
            self.migrate_to_8()?;
        }
        Ok(())
    }

    /// Version 1: the namespace (entries, with the three fixed directories).
    fn migrate_to_1(&self, owner: (u32, u32), now: i64) -> io::Result<()> {
        let (uid, gid) = owner;
        self.db.batch(&format!(
            "BEGIN;
                 CREATE TABLE entries (
                     ino    INTEGER PRIMARY KEY AUTOINCREMENT,
                     parent INTEGER NOT NULL,
                     name   BLOB    NOT NULL,
                     kind   INTEGER NOT NULL,
                     state  INTEGER NOT NULL,
                     zone   INTEGER NOT NULL,
                     hash   TEXT,
                     size   INTEGER NOT NULL DEFAULT 0,
                     mode   INTEGER NOT NULL,
                     uid    INTEGER NOT NULL,
                     gid    INTEGER NOT NULL,
                     mtime  INTEGER NOT NULL,
                     ctime  INTEGER NOT NULL,
                     crtime INTEGER NOT NULL,
                     UNIQUE (parent, name)
                 );
                 CREATE INDEX entries_by_parent ON entries (parent, ino);
                 CREATE INDEX entries_by_hash ON entries (hash);
                 INSERT INTO entries VALUES
                     ({ROOT_INO}, 0, x'', 1, 0, 0, NULL, 0, 493, {uid}, {gid}, {now}, {now}, {now}),
                     ({RUNS_INO}, {ROOT_INO}, CAST('runs' AS BLOB), 1, 0, 0, NULL, 0, 493,
                      {uid}, {gid}, {now}, {now}, {now}),
                     ({MODELS_INO}, {ROOT_INO}, CAST('models' AS BLOB), 1, 0, 0, NULL, 0, 493,
                      {uid}, {gid}, {now}, {now}, {now});
                 PRAGMA user_version = 1;
                 COMMIT;"
        ))
    }

    /// Version 2: the model registry (registered models, versions, aliases).
    fn migrate_to_2(&self) -> io::Result<()> {
        self.db.batch(
            "BEGIN;
                 CREATE TABLE registered_models (
                     ino          INTEGER PRIMARY KEY,
                     name         TEXT    NOT NULL UNIQUE,
                     next_version INTEGER NOT NULL DEFAULT 1,
                     created      INTEGER NOT NULL
                 );
                 CREATE TABLE model_versions (
                     dir_ino          INTEGER PRIMARY KEY,
                     model_ino        INTEGER NOT NULL,
                     version          INTEGER,
                     status           TEXT    NOT NULL,
                     message          TEXT    NOT NULL DEFAULT '',
                     run_id           TEXT,
                     artifact_path    TEXT,
                     model_uuid       TEXT,
                     model_id         TEXT,
                     flavors          TEXT,
                     signature        TEXT,
                     utc_time_created TEXT,
                     total_size       INTEGER,
                     file_count       INTEGER,
                     digest           TEXT,
                     source           TEXT,
                     updated          INTEGER NOT NULL,
                     UNIQUE (model_ino, version)
                 );
                 CREATE INDEX model_versions_by_model ON model_versions (model_ino, status);
                 CREATE TABLE model_aliases (
                     model_ino INTEGER NOT NULL,
                     alias     TEXT    NOT NULL,
                     version   INTEGER NOT NULL,
                     PRIMARY KEY (model_ino, alias)
                 );
                 PRAGMA user_version = 2;
                 COMMIT;",
        )
    }

    /// Version 3: blobs `fsck --verify` found damaged (reads of their files fail with EIO).
    fn migrate_to_3(&self) -> io::Result<()> {
        self.db.batch(
            "BEGIN;
                 CREATE TABLE damaged_blobs (hash TEXT PRIMARY KEY, found INTEGER NOT NULL);
                 PRAGMA user_version = 3;
                 COMMIT;",
        )
    }

    /// Version 4: access times of their own (`touch -a`, `utimensat` with `UTIME_OMIT`); an
    /// existing entry's access time starts as its modification time, which is what the daemon
    /// reported as the access time before.
    fn migrate_to_4(&self) -> io::Result<()> {
        self.db.batch(
            "BEGIN;
                 ALTER TABLE entries ADD COLUMN atime INTEGER NOT NULL DEFAULT 0;
                 UPDATE entries SET atime = mtime;
                 PRAGMA user_version = 4;
                 COMMIT;",
        )
    }

    /// Version 5: earlier contents of rewritable files (`registered_model_meta`, `--rewritable`).
    fn migrate_to_5(&self) -> io::Result<()> {
        self.db.batch(
            "BEGIN;
                 CREATE TABLE history (
                     ino      INTEGER NOT NULL,
                     hash     TEXT    NOT NULL,
                     size     INTEGER NOT NULL,
                     mtime    INTEGER NOT NULL,
                     replaced INTEGER NOT NULL
                 );
                 CREATE INDEX history_by_ino ON history (ino, replaced);
                 CREATE INDEX history_by_hash ON history (hash);
                 PRAGMA user_version = 5;
                 COMMIT;",
        )
    }

    /// Version 6 (layout 2): content of up to [`super::INLINE_MAX`] bytes lives in the index,
    /// keyed by hash like a blob, written in the same transaction as the row that first uses
    /// it. Blobs of such sizes that an earlier version wrote stay in `blobs/` and are read from
    /// there.
    fn migrate_to_6(&self) -> io::Result<()> {
        self.db.batch(
            "BEGIN;
                 CREATE TABLE inline_content (hash TEXT PRIMARY KEY, data BLOB NOT NULL);
                 PRAGMA user_version = 6;
                 COMMIT;",
        )
    }

    /// Version 7: SHA-256's states at the piece boundaries of large contents kept in a bucket
    /// (see [`super::pieces`]), so that a reader is served each piece once it is checked,
    /// before the whole content has arrived.
    fn migrate_to_7(&self) -> io::Result<()> {
        self.db.batch(&format!(
            "BEGIN;
                 {PIECE_STATES_TABLE}
                 PRAGMA user_version = 7;
                 COMMIT;"
        ))
    }

    /// Version 8: each row's generation ([`Entry::generation`]), 0 for the rows there are.
    fn migrate_to_8(&self) -> io::Result<()> {
        self.db.batch(
            "BEGIN;
                 ALTER TABLE entries ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
                 PRAGMA user_version = 8;
                 COMMIT;",
        )
    }

    /// Records the piece states of content `hash` (pieces of `piece` bytes); states already
    /// recorded for it are kept.
    pub fn pieces_put(&self, hash: &Hash, piece: u64, states: &[u8]) -> io::Result<()> {
        self.db.exec(
            "INSERT INTO piece_states (hash, piece, states) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
            params![hash.to_hex(), piece as i64, states],
        )?;
        Ok(())
    }

    /// The piece size and piece states of content `hash`, if the index holds them.
    pub fn pieces_get(&self, hash: &Hash) -> io::Result<Option<(u64, Vec<u8>)>> {
        self.db.one(
            "SELECT piece, states FROM piece_states WHERE hash = ?1",
            params![hash.to_hex()],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
        )
    }

    /// Forgets the piece states of content `hash` (garbage collection, with its blob).
    pub fn pieces_remove(&self, hash: &Hash) -> io::Result<()> {
        self.db.exec(
            "DELETE FROM piece_states WHERE hash = ?1",
            params![hash.to_hex()],
        )?;
        Ok(())
    }

    /// The bytes of inline content `hash`, if the index holds it.
    pub fn inline_get(&self, hash: &Hash) -> io::Result<Option<Vec<u8>>> {
        self.db.one(
            "SELECT data FROM inline_content WHERE hash = ?1",
            params![hash.to_hex()],
            |r| r.get(0),
        )
    }

    /// The size of inline content `hash`, if the index holds it.
    pub fn inline_size(&self, hash: &Hash) -> io::Result<Option<u64>> {
        self.db.one(
            "SELECT length(data) FROM inline_content WHERE hash = ?1",
            params![hash.to_hex()],
            |r| r.get::<_, i64>(0).map(|n| n as u64),
        )
    }

    /// Inline contents in hash order after `after` (hex; `""` for the first page), with their
    /// sizes: garbage collection's listing.
    pub fn inline_list(&self, after: &str, limit: usize) -> io::Result<Vec<(Hash, u64)>> {
        let rows = self.db.all(
            "SELECT hash, length(data) FROM inline_content WHERE hash > ?1
                 ORDER BY hash LIMIT ?2",
            params![after, limit as i64],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)),
        )?;
        let mut out = Vec::new();
        for (h, n) in rows {
            if let Some(h) = Hash::from_hex(&h) {
                out.push((h, n));
            }
        }
        Ok(out)
    }

    /// Removes inline content `hash` (garbage collection, inside its transaction).
    pub fn inline_remove(&self, hash: &Hash) -> io::Result<()> {
        self.db.exec(
            "DELETE FROM inline_content WHERE hash = ?1",
            params![hash.to_hex()],
        )?;
        Ok(())
    }

    /// Keeps `hash` (of `size` bytes, last changed at `mtime`) as an earlier content of file
    /// `ino`, replaced at `now`. Its blob stays as long as the history row does.
    pub fn history_add(
        &self,
        ino: u64,
        hash: &Hash,
        size: u64,
        mtime: i64,
        now: i64,
    ) -> io::Result<()> {
        // Once, even if tried again (a shared index's connection that broke after the
        // insert): `now` tells this replacement from any other of the file.
        self.db.exec(
            "INSERT INTO history (ino, hash, size, mtime, replaced)
             SELECT ?1, ?2, ?3, ?4, ?5 WHERE NOT EXISTS
                 (SELECT 1 FROM history WHERE ino = ?1 AND hash = ?2 AND replaced = ?5)",
            params![ino as i64, hash.to_hex(), size as i64, mtime, now],
        )?;
        Ok(())
    }

    /// Earlier contents of file `ino`, oldest first: (hash, size, mtime, replaced at).
    pub fn history_of(&self, ino: u64) -> io::Result<Vec<(Hash, u64, i64, i64)>> {
        let rows = self.db.all(
            "SELECT hash, size, mtime, replaced FROM history WHERE ino = ?1
             ORDER BY replaced, rowid",
            params![ino as i64],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            },
        )?;
        let mut out = Vec::new();
        for (hash, size, mtime, replaced) in rows {
            let hash = Hash::from_hex(&hash)
                .ok_or_else(|| io::Error::other(format!("index: bad hash {hash:?} in history")))?;
            out.push((hash, size, mtime, replaced));
        }
        Ok(out)
    }

    /// Records that blob `hash` is damaged (missing or wrong bytes).
    pub fn mark_damaged(&self, hash: &Hash, now: i64) -> io::Result<()> {
        self.db.exec(
            "INSERT INTO damaged_blobs (hash, found) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            params![hash.to_hex(), now],
        )?;
        self.damaged.borrow_mut().hashes.insert(*hash);
        Ok(())
    }

    /// Whether `fsck --verify` found content `hash` damaged. Answered from memory: the table
    /// is read again only when another connection has committed since the last read (fsck
    /// marks damage from its own process), which `PRAGMA data_version` tells without I/O.
    pub fn is_damaged(&self, hash: &Hash) -> io::Result<bool> {
        // Nothing committed anywhere since the list was last found current: it still is.
        let snap = self.snapshot();
        if snap.is_some() && self.cache.borrow().damaged_current {
            return Ok(self.damaged.borrow().hashes.contains(hash));
        }
        let version: i64 = match self.db.sqlite() {
            Some(_) => self
                .db
                .row("PRAGMA data_version", params![], |r| r.get(0))?,
            None => 0,
        };
        let mut cache = self.damaged.borrow_mut();
        let stale = match self.db.sqlite() {
            Some(_) => cache.read_at != Some(version),
            None => cache.read_when.is_none_or(|t| t.elapsed() >= DAMAGE_RELOAD),
        };
        if stale {
            cache.read_when = Some(std::time::Instant::now());
            let hashes = self
                .db
                .all("SELECT hash FROM damaged_blobs", params![], |r| {
                    r.get::<_, String>(0)
                })?
                .iter()
                .filter_map(|h| Hash::from_hex(h))
                .collect();
            cache.hashes = hashes;
            cache.read_at = Some(version);
        }
        self.cache.borrow_mut().damaged_read_at(snap);
        Ok(cache.hashes.contains(hash))
    }

    /// The blob was stored again with the right bytes.
    pub fn clear_damaged(&self, hash: &Hash) -> io::Result<()> {
        self.db.exec(
            "DELETE FROM damaged_blobs WHERE hash = ?1",
            params![hash.to_hex()],
        )?;
        self.damaged.borrow_mut().hashes.remove(hash);
        Ok(())
    }

    /// The row with this inode number, in any state (a reserved file as in state `Writing`).
    pub fn get(&self, ino: u64) -> io::Result<Option<Entry>> {
        if let Some(e) = self.reserved(ino) {
            return Ok(Some(e));
        }
        let snap = self.snapshot();
        if snap.is_some()
            && let Some(e) = self.cache.borrow().row(ino)
        {
            return Ok(Some(self.current(e.clone())));
        }
        let row = self.db.one(
            &format!("SELECT {COLUMNS} FROM entries WHERE ino = ?1"),
            params![ino as i64],
            row_to_entry,
        )?;
        if let Some(e) = &row {
            self.cache.borrow_mut().keep_row(snap, e);
        }
        Ok(row.map(|e| self.current(e)))
    }

    /// Drops every answer kept (one was found out of date).
    pub fn forget_kept(&self) {
        self.cache.borrow_mut().validate(None);
    }

    /// Row `ino` as the cache has it now, if it has it (before `current`).
    fn cached_row(&self, ino: u64) -> Option<Entry> {
        self.snapshot()?;
        self.cache.borrow().row(ino).cloned()
    }

    /// After a change of this daemon's own, made with the cache at `before`, that changed
    /// exactly rows `patched` (as they now are), rows `forget` (in ways not known here) and
    /// sealed rows `sealed`: the answers kept stay true with those patched in.
    fn patch_own_change(
        &self,
        before: Option<cache::Snapshot>,
        patched: &[Entry],
        forget: &[u64],
        sealed: &[u64],
    ) {
        let now = self.snapshot_unvalidated();
        let mut cache = self.cache.borrow_mut();
        if cache.rebase(before, now) {
            for &ino in forget {
                cache.forget_ino(ino);
            }
            for &ino in sealed {
                cache.sealed(ino);
            }
            for e in patched {
                cache.patch_row(e);
            }
        }
    }

    /// The row with this inode number, in any state, and whether `fsck --verify` found its
    /// blob damaged: what opening a file needs, in one statement.
    pub fn get_checked(&self, ino: u64) -> io::Result<Option<(Entry, bool)>> {
        let Some(e) = self.get(ino)? else {
            return Ok(None);
        };
        let damaged = match &e.hash {
            Some(h) => self.is_damaged(h)?,
            None => false,
        };
        Ok(Some((e, damaged)))
    }

    /// The row at `(parent, name)`, in any state (tombstones included).
    pub fn lookup(&self, parent: u64, name: &[u8]) -> io::Result<Option<Entry>> {
        if let Some(e) = self.reserved_at(parent, name) {
            return Ok(Some(e));
        }
        Ok(match self.row_named(parent, name)? {
            Some((e, false)) => Some(self.current(e)),
            // A directory being built: its name is taken, but nothing shows it.
            Some((_, true)) | None => None,
        })
    }

    /// The row at `(parent, name)` in any state, and whether it is a directory being built
    /// (hidden from lookups and listings).
    fn row_named(&self, parent: u64, name: &[u8]) -> io::Result<cache::Named> {
        let snap = self.snapshot();
        if snap.is_some() {
            let cache = self.cache.borrow();
            if let Some(named) = cache.row_at(parent, name) {
                return Ok(named.clone());
            }
            if cache.is_complete(parent) {
                return Ok(None);
            }
        }
        if self.pg_cache
            && !self.cache.borrow().is_too_large(parent)
            && self.cache.borrow_mut().missed_again(snap, parent)
        {
            // The whole directory, if it is small: the next names looked up there are known.
            let rows = self.db.all(
                &format!(
                    "SELECT {COLUMNS}, kind = 1 AND state = {STATE_WRITING}
                     FROM entries WHERE parent = ?1 LIMIT ?2"
                ),
                params![parent as i64, cache::LISTING_MAX as i64 + 1],
                |r| Ok((row_to_entry(r)?, r.get::<_, bool>(16)?)),
            )?;
            let whole = rows.len() <= cache::LISTING_MAX;
            let named = rows.iter().find(|(e, _)| e.name == name).cloned();
            if whole || named.is_some() {
                self.cache
                    .borrow_mut()
                    .keep_listing(snap, parent, whole.then_some(&rows[..]));
                return Ok(named);
            }
            self.cache.borrow_mut().keep_listing(snap, parent, None);
        }
        let named = self.db.one(
            &format!(
                "SELECT {COLUMNS}, kind = 1 AND state = {STATE_WRITING}
                 FROM entries WHERE parent = ?1 AND name = ?2"
            ),
            params![parent as i64, name],
            |r| Ok((row_to_entry(r)?, r.get::<_, bool>(16)?)),
        )?;
        self.cache
            .borrow_mut()
            .keep_row_at(snap, parent, name, &named);
        Ok(named)
    }

    /// A directory being built (a registration filling it in batches): inserted with
    /// [`State::Writing`], which no lookup or listing shows while its name stays taken; shown
    /// by [`Index::reveal_dir`], or dropped with its tree by [`Index::delete_tree`] (or by the
    /// next start after a crash).
    pub fn reveal_dir(&self, ino: u64) -> io::Result<bool> {
        let n = self.db.exec(
            &format!(
                "UPDATE entries SET state = {STATE_LIVE}
                     WHERE ino = ?1 AND kind = 1 AND state = {STATE_WRITING}"
            ),
            params![ino as i64],
        )?;
        Ok(n == 1)
    }

    /// Deletes `ino` and every row below it, tombstones included.
    pub fn delete_tree(&self, ino: u64) -> io::Result<usize> {
        self.db.exec(
            "WITH RECURSIVE t(i) AS (SELECT ?1 UNION ALL
                     SELECT e.ino FROM entries e JOIN t ON e.parent = t.i)
                 DELETE FROM entries WHERE ino IN (SELECT i FROM t)",
            params![ino as i64],
        )
    }

    /// Up to `limit` visible (live or being written) children of `parent` with an inode number
    /// above `after`, in inode order — a stable order for `readdir` offsets.
    pub fn children(&self, parent: u64, after: u64, limit: usize) -> io::Result<Vec<Entry>> {
        let rows = self.db.all(
            &format!(
                "SELECT {COLUMNS} FROM entries
                 WHERE parent = ?1 AND ino > ?2 AND state != 1
                 AND NOT (kind = 1 AND state = {STATE_WRITING}) ORDER BY ino LIMIT ?3"
            ),
            params![parent as i64, after as i64, limit as i64],
            row_to_entry,
        )?;
        let mut out = rows;
        {
            // Reserved files among them, in the same inode order.
            let r = self.reserved.borrow();
            let before = out.len();
            out.extend(
                r.files
                    .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                    .map(|(_, e)| e)
                    .filter(|e| e.parent == parent)
                    .cloned(),
            );
            if out.len() > before {
                out.sort_by_key(|e| e.ino);
                out.truncate(limit);
            }
        }
        Ok(out.into_iter().map(|e| self.current(e)).collect())
    }

    /// Inserts a row, or reserves the name of a new file being written (see the module doc);
    /// `Ok(None)` when `(parent, name)` is already taken (in any state, or reserved).
    pub fn insert(&self, e: &NewEntry) -> io::Result<Option<u64>> {
        if self.reserves(e) {
            return self.reserve(e);
        }
        if self.reserved_at(e.parent, e.name).is_some() {
            return Ok(None);
        }
        let ino = self.new_ino()?;
        match insert_entry(&self.db, e, ino)? {
            0 => Ok(None),
            _ => Ok(Some(ino)),
        }
    }

    /// Inserts a row as `create`, `mkdir` and `mknod` do: the directory it goes into changes too
    /// (its mtime and ctime become the row's time), in the same transaction. A new file being
    /// written is reserved instead, and its directory's new times wait with it (module doc).
    pub fn insert_in_dir(&self, e: &NewEntry) -> io::Result<Option<u64>> {
        self.renew_if_stale()?;
        if self.reserves(e) {
            let ino = self.reserve(e)?;
            if ino.is_some() {
                self.reserved.borrow_mut().touch(e.parent, e.time);
            }
            return Ok(ino);
        }
        if self.db.is_postgres() && !self.db.in_transaction() {
            // The row and its directory's times in one round trip (the directory is touched
            // only if the row went in: its inode number is new).
            let ino = self.new_ino()?;
            let t = e.time;
            let parent_before = self.cached_row(e.parent);
            let before = self.snapshot();
            // Not waited for on the server's disk: nothing was stored yet, and the commit that
            // stores the file's content waits for this too (the WAL is flushed in order). A
            // server crash may lose it (a moment's worth): then that commit finds no row and
            // fails (`gone_or_lost`), and the name is free. (`postgres::functions_schema`.)
            let lock_ms = rusqlite::types::Value::Integer(self.db.lock_timeout_ms());
            let values = entry_values(e, ino);
            let params: Vec<&dyn rusqlite::ToSql> =
                values.iter().chain([&lock_ms]).map(|v| v as _).collect();
            let done = self.db.write_call(
                // (The parameters of `INSERT_SKIPPING_TAKEN`, then the lock timeout.)
                "SELECT artifactfs_create(?13, ?12, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                &params,
                // (Its inode number is its own: a row with it is this insert's.)
                &|db| {
                    let there = db.row(
                        "SELECT EXISTS (SELECT 1 FROM entries WHERE ino = ?1)",
                        params![ino as i64],
                        |r| r.get::<_, bool>(0),
                    )?;
                    Ok(there.then_some(3))
                },
            )?;
            let counts = [(done & 1) as u64, ((done >> 1) & 1) as u64];
            match parent_before {
                Some(mut dir) if counts[0] == 1 && counts[1] == 1 => {
                    // What this changed is known exactly: the new row, and its directory's
                    // times; a new directory is empty.
                    dir.mtime = t;
                    dir.ctime = t;
                    self.patch_own_change(before, &[new_entry_row(e, ino), dir], &[], &[]);
                    if e.kind == Kind::Dir {
                        let snap = self.snapshot();
                        self.cache.borrow_mut().keep_listing(snap, ino, Some(&[]));
                    }
                }
                // (The name was taken, by a row perhaps not known here; or the directory's
                // row is not kept: start over.)
                _ => self.cache.borrow_mut().validate(None),
            }
            return Ok((counts[0] == 1).then_some(ino));
        }
        self.atomically(|| {
            let ino = self.insert(e)?;
            if ino.is_some() {
                self.touch_dir(e.parent, e.time)?;
            }
            Ok(ino)
        })
    }

    /// A directory's entries changed (a name was created, removed or renamed in it): its mtime
    /// and ctime become `now`, as on any POSIX file system.
    pub fn touch_dir(&self, dir: u64, now: i64) -> io::Result<()> {
        self.db.exec(
            "UPDATE entries SET mtime = ?2, ctime = ?2 WHERE ino = ?1 AND kind = 1",
            params![dir as i64, now],
        )?;
        Ok(())
    }

    /// [`Index::touch_dir`] of the directory holding `ino`.
    fn touch_parent_of(&self, ino: u64, now: i64) -> io::Result<()> {
        if let Some(r) = self.reserved(ino) {
            return self.touch_dir(r.parent, now);
        }
        self.db.exec(
            "UPDATE entries SET mtime = ?2, ctime = ?2
                 WHERE ino = (SELECT parent FROM entries WHERE ino = ?1) AND kind = 1",
            params![ino as i64, now],
        )?;
        Ok(())
    }

    /// Runs `f` as one step: all of its changes are made, or none. Inside a transaction
    /// already open (say [`Index::write_locked`]) it is a savepoint of that transaction,
    /// otherwise a transaction of its own.
    fn atomically<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let step = self.db.begin_step()?;
        let guard = UndoOnUnwind(&self.db, step);
        let result = f();
        std::mem::forget(guard);
        if let Err(e) = self.db.end_step(step, result.is_ok()) {
            let _ = self.db.end_step(step, false);
            return Err(e);
        }
        result
    }

    /// Inserts many rows in one transaction (bulk loading, e.g. `examples/gen_index.rs`); rows
    /// whose `(parent, name)` is already taken are skipped. Returns how many were inserted.
    pub fn insert_many(&mut self, entries: &[NewEntry]) -> io::Result<usize> {
        self.write_locked(|idx| {
            let mut inserted = 0;
            for e in entries {
                if idx.reserved_at(e.parent, e.name).is_some() {
                    continue;
                }
                let ino = idx.new_ino()?;
                inserted += insert_entry(&idx.db, e, ino)?;
            }
            Ok(inserted)
        })
    }

    /// Records committed content for a file that is being written or was committed before by
    /// the same open handle. Returns [`Commit::Gone`] if the row is gone or tombstoned (the file
    /// was removed while open), in which case nothing changes.
    /// `ctime` is the commit time (crash recovery finds recent commits by it), `mtime` may be
    /// older (`cp -a` sets it before `close()`). `blob_present` is asked with the index's write
    /// lock held, which garbage collection also takes: a blob it says is there stays there.
    pub fn commit_file(
        &self,
        ino: u64,
        hash: &Hash,
        size: u64,
        mtime: i64,
        now: i64,
        blob_present: impl Fn() -> bool,
    ) -> io::Result<Commit> {
        self.commit_file_with(ino, hash, size, mtime, now, Stored::Blob(&blob_present))
    }

    /// [`Index::commit_file`] for content stored either way: as a blob (whose presence is
    /// checked under the write lock), or inline, written in the same transaction as the row.
    /// Inline content that `fsck --verify` found damaged is replaced by these bytes and its
    /// mark removed, in the same transaction, which is where the damage is asked about too (no
    /// read transaction of its own): [`Commit::Healed`].
    pub fn commit_file_with(
        &self,
        ino: u64,
        hash: &Hash,
        size: u64,
        mtime: i64,
        now: i64,
        content: Stored,
    ) -> io::Result<Commit> {
        let owner = self.owners_at_commit.borrow().get(&ino).copied();
        if let Stored::Inline { bytes } = content
            && self.db.is_postgres()
            && !self.db.in_transaction()
            && owner.is_none()
        {
            return self.commit_inline_call(ino, hash, size, mtime, now, bytes);
        }
        let mut sealed = 0;
        let reserved = self.reserved(ino);
        let result = self.write_locked(|idx| {
            if let Stored::Blob(present) = &content
                && !present()
            {
                return Ok(Commit::BlobMissing);
            }
            sealed = idx.seal_now()?;
            if let Some(r) = &reserved {
                // The first commit of a new file: its row, in this same transaction.
                idx.insert_reserved(r, STATE_COMMITTED_OPEN, Some(hash), size, mtime, now)?;
            } else {
                // On a shared index, only a row still stamped with this daemon's session: one
                // another daemon cleaned up (this daemon's lease ran out) stays as it left it.
                let own = idx.own_rows();
                let n = idx.db.exec(
                    &format!(
                        "UPDATE entries SET hash = ?2, size = ?3, mtime = ?4, ctime = ?5,
                         state = {STATE_COMMITTED_OPEN} WHERE ino = ?1 AND state != 1{own}"
                    ),
                    params![ino as i64, hash.to_hex(), size as i64, mtime, now],
                )?;
                if n != 1 {
                    let session = idx.session.get();
                    if session != 0 && !postgres::session_exists(&idx.db, session)? {
                        return Err(lease_lost(session));
                    }
                    // Removed while open: nothing to record, no content to keep.
                    return Ok(Commit::Gone);
                }
                if let Some((mode, uid, gid, birth)) = owner {
                    // Created again at its tombstone, with its last content: its writer's now.
                    idx.db.exec(
                        "UPDATE entries SET mode = ?2, uid = ?3, gid = ?4, crtime = ?5
                         WHERE ino = ?1",
                        params![ino as i64, mode as i64, uid as i64, gid as i64, birth],
                    )?;
                }
            }
            if let Stored::Inline { bytes } = content {
                let damaged = idx.is_damaged(hash)?;
                let on_conflict = if damaged {
                    "DO UPDATE SET data = excluded.data"
                } else {
                    "DO NOTHING"
                };
                idx.db.exec(
                    &format!(
                        "INSERT INTO inline_content (hash, data) VALUES (?1, ?2)
                         ON CONFLICT (hash) {on_conflict}"
                    ),
                    params![hash.to_hex(), bytes],
                )?;
                if damaged {
                    idx.db.exec(
                        "DELETE FROM damaged_blobs WHERE hash = ?1",
                        params![hash.to_hex()],
                    )?;
                    return Ok(Commit::Healed);
                }
            }
            Ok(Commit::Recorded)
        });
        if result.is_ok() {
            self.pending_seals.borrow_mut().drain(..sealed);
        }
        if matches!(result, Ok(Commit::Gone)) {
            return self.gone_or_lost(ino);
        }
        if matches!(result, Ok(Commit::Healed)) {
            self.damaged.borrow_mut().hashes.remove(hash);
        }
        if reserved.is_some() && matches!(result, Ok(Commit::Recorded | Commit::Healed)) {
            self.forget_reservation(ino);
        }
        if owner.is_some() && matches!(result, Ok(Commit::Recorded | Commit::Healed)) {
            self.owners_at_commit.borrow_mut().remove(&ino);
        }
        result
    }

    /// [`Index::commit_file_with`] of inline content on a PostgreSQL index: the same
    /// transaction (the queued seals, the row, the content, healing damaged content) as one
    /// call of a server function, in one round trip. The content goes in only if the row took
    /// it.
    fn commit_inline_call(
        &self,
        ino: u64,
        hash: &Hash,
        size: u64,
        mtime: i64,
        now: i64,
        bytes: &[u8],
    ) -> io::Result<Commit> {
        const UNKNOWN: u64 = u64::MAX;
        const UNKNOWN_SEALS: i64 = 3;
        let damaged = self.is_damaged(hash)?;
        let seals: Vec<u64> = self.pending_seals.borrow().clone();
        let h = hash.to_hex();
        let row_before = self.cached_row(ino);
        let before = self.snapshot();
        let seal_list = seals
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        // (See `postgres::functions_schema`.)
        let done = self.db.write_call(
            "SELECT artifactfs_commit_inline(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                self.db.lock_timeout_ms(),
                seal_list,
                ino as i64,
                h,
                size as i64,
                mtime,
                now,
                self.session.get(),
                bytes,
                i64::from(damaged),
            ],
            &|db| {
                // (The row holds this content only if this commit made it so.)
                let there = db.row(
                    &format!(
                        "SELECT EXISTS (SELECT 1 FROM entries WHERE ino = ?1 AND hash = ?2
                         AND state IN ({STATE_LIVE}, {STATE_COMMITTED_OPEN}))"
                    ),
                    params![ino as i64, h],
                    |r| r.get::<_, bool>(0),
                )?;
                // (Whether the seals went in is not known: they stay queued, and are written
                // again, which changes nothing if they did.)
                Ok(there.then_some(UNKNOWN_SEALS))
            },
        )?;
        let mut counts = vec![if done == UNKNOWN_SEALS { UNKNOWN } else { 0 }; seals.len()];
        counts.push(u64::from(done == 1 || done == UNKNOWN_SEALS));
        let sealed = if counts[..seals.len()].contains(&UNKNOWN) {
            &[][..]
        } else {
            self.pending_seals.borrow_mut().drain(..seals.len());
            &seals[..]
        };
        // What this changed is known exactly: the sealed rows, and this one.
        let mut patched = vec![];
        let mut forget = vec![];
        if counts[seals.len()] == 1 {
            match row_before {
                Some(mut e) => {
                    e.hash = Some(*hash);
                    e.size = size;
                    e.mtime = mtime;
                    e.ctime = now;
                    e.state = State::Live;
                    e.committed_open = true;
                    patched.push(e);
                }
                None => forget.push(ino),
            }
        }
        self.patch_own_change(before, &patched, &forget, sealed);
        if counts[seals.len()] != 1 {
            let session = self.session.get();
            if session != 0 && !postgres::session_exists(&self.db, session)? {
                return Err(lease_lost(session));
            }
            // Removed while open: nothing recorded.
            return self.gone_or_lost(ino);
        }
        if damaged {
            self.damaged.borrow_mut().hashes.remove(hash);
            return Ok(Commit::Healed);
        }
        Ok(Commit::Recorded)
    }

    /// A commit found file `ino`'s row removed or tombstoned: [`Commit::Gone`] if this daemon
    /// removed it (an `unlink` while open) or a tombstone took its place. On a shared index a
    /// row that is simply not there any more was not removed by this daemon: PostgreSQL lost
    /// it (the server crashed before its create reached the disk, see `insert_in_dir`), or
    /// another machine dropped it when this one's lease ran out. Its content is not recorded,
    /// and `close()` must not say it is: an error (`EIO`).
    fn gone_or_lost(&self, ino: u64) -> io::Result<Commit> {
        if !self.db.is_postgres() || self.removed_here.borrow().contains(&ino) {
            return Ok(Commit::Gone);
        }
        let there = self.db.row(
            "SELECT EXISTS (SELECT 1 FROM entries WHERE ino = ?1)",
            params![ino as i64],
            |r| r.get::<_, bool>(0),
        )?;
        if there {
            return Ok(Commit::Gone);
        }
        log::error!(
            "inode {ino}: its row is gone from the shared index, not removed here (PostgreSQL \
             lost it in a crash, or this machine's lease ran out): its content is not recorded"
        );
        Err(io::Error::other(format!(
            "index: the row of inode {ino}, being written, is gone from the shared index"
        )))
    }

    /// File `ino` was released: its committed content is final. Other daemons see it sealed
    /// once this reaches the table (the next commit, or [`Index::seal_pending`] on the tick).
    pub fn seal_later(&self, ino: u64) {
        self.pending_seals.borrow_mut().push(ino);
    }

    /// Writes the seals [`Index::seal_later`] queued, and the times reserved names gave their
    /// directories (the periodic work calls it).
    pub fn seal_pending(&self) -> io::Result<()> {
        // A heartbeat that fails (PostgreSQL busy or away) must not hold up the seals.
        if let Err(e) = self.heartbeat_if_due() {
            log::warn!("heartbeat of this daemon's session failed (tried again in 5 s): {e}");
        }
        if self.pending_seals.borrow().is_empty() && self.reserved.borrow().dir_times.is_empty() {
            return Ok(());
        }
        let (n, dirs) = self.write_locked(|idx| Ok((idx.seal_now()?, idx.write_dir_times()?)))?;
        self.pending_seals.borrow_mut().drain(..n);
        self.forget_dir_times(&dirs);
        Ok(())
    }

    /// At a clean stop no file is open any more, whatever releases the kernel did not deliver
    /// before the unmount: every file committed while open is sealed (as the next start would
    /// do), so a `--read-only` daemon started afterwards serves them.
    ///
    /// The times reserved names gave their directories go into the table too.
    pub fn seal_all_committed(&self) -> io::Result<usize> {
        let own = self.own_rows();
        let n = self.atomically(|| {
            let n = self.db.exec(
                &format!(
                    "UPDATE entries SET state = {STATE_LIVE}
                     WHERE state = {STATE_COMMITTED_OPEN}{own}"
                ),
                params![],
            )?;
            self.write_dir_times()?;
            self.record_used_inos()?;
            Ok(n)
        })?;
        self.pending_seals.borrow_mut().clear();
        self.reserved.borrow_mut().dir_times.clear();
        Ok(n)
    }

    /// The condition (starting with ` AND`) that limits a statement on `entries` to this
    /// daemon's own rows: on a PostgreSQL index, those stamped with its session; on an
    /// embedded one, all (one daemon writes it).
    fn own_rows(&self) -> String {
        if self.db.is_postgres() {
            format!(" AND session = {}", self.session.get())
        } else {
            String::new()
        }
    }

    /// A PostgreSQL index's daemon, every heartbeat interval (`postgres::heartbeat_interval`):
    /// tells the index it is alive, and cleans up after the daemons whose lease ran out (see
    /// `postgres.rs`).
    fn heartbeat_if_due(&self) -> io::Result<()> {
        if self
            .last_heartbeat
            .get()
            .is_some_and(|t| t.elapsed() < postgres::heartbeat_interval())
        {
            return Ok(());
        }
        self.heartbeat()
    }

    fn heartbeat(&self) -> io::Result<()> {
        let session = self.session.get();
        if session == 0 {
            return Ok(());
        }
        // (Set first: a failure is tried again at the next heartbeat, not at every tick.)
        let sent = std::time::Instant::now();
        self.last_heartbeat.set(Some(sent));
        self.heartbeat_failed.set(true);
        if !postgres::heartbeat(&self.db, session)? {
            self.start_new_session(session)?;
        }
        self.heartbeat_failed.set(false);
        // Alive as of when the heartbeat was sent, not when its answer came: a daemon stopped
        // (SIGSTOP) while it waited for the answer gets it after its lease may have run out and
        // another machine cleaned up after it; its writers must then ask again, and fail.
        self.alive_at.set(Some(sent));
        self.clean_up_after_dead_sessions()
    }

    /// This daemon's session `lost` was ended by another daemon (it had not renewed its lease
    /// in time: stalled, or cut off from PostgreSQL), which cleaned up what it was writing.
    /// Those files' writers fail with `EIO` ([`Index::check_writer_session`]); a new session
    /// serves what comes next.
    fn start_new_session(&self, lost: i64) -> io::Result<()> {
        let session = postgres::start_session(&self.db, &self.machine)?;
        self.session.set(session);
        log::error!(
            "this daemon's session {lost} was ended by another machine: it had not renewed its \
             lease for over {:?} (stalled?), and what it was writing was cleaned up (those \
             files' writes fail with EIO); went on as session {session}",
            postgres::lease()
        );
        Ok(())
    }

    /// When a heartbeat last found this daemon's session alive (a PostgreSQL index's): periodic
    /// work that may wait runs right after one, so as not to meet an outage, where a statement
    /// waits up to `OUTAGE_PATIENCE` with the index held.
    pub fn alive_at(&self) -> Option<std::time::Instant> {
        self.alive_at.get()
    }

    /// This daemon's session now (0 on the embedded index): a writer records the one it
    /// started in and gives it to [`Index::check_writer_session`].
    pub fn session(&self) -> i64 {
        self.session.get()
    }

    /// A PostgreSQL index's daemon whose session may have run out of lease (no heartbeat found
    /// it alive for half a lease: it was stalled) asks now, before it writes, and starts a new
    /// session if it had lost its own. Not while heartbeats fail (PostgreSQL away): the
    /// request's own statements wait for it, once; a commit that finds its row cleaned up
    /// fails with `EIO` all the same.
    pub fn renew_if_stale(&self) -> io::Result<()> {
        if self.session.get() != 0
            && !self.db.in_transaction()
            && !self.heartbeat_failed.get()
            && self
                .alive_at
                .get()
                .is_none_or(|t| t.elapsed() >= postgres::lease() / 2)
        {
            self.heartbeat()?;
        }
        Ok(())
    }

    /// Fails with `EIO` if `session` (the one a writer started in) is not this daemon's
    /// session any more: the lease ran out, and another daemon cleaned up what the writer had
    /// written. Call under the same hold of the index as the commit it guards.
    pub fn check_writer_session(&self, session: i64) -> io::Result<()> {
        self.renew_if_stale()?;
        if session != self.session.get() {
            return Err(lease_lost(session));
        }
        Ok(())
    }

    /// Drops what daemons that are gone left being written, and forgets their sessions (see
    /// `postgres.rs`); takes the write lock only when there are any.
    fn clean_up_after_dead_sessions(&self) -> io::Result<()> {
        let session = self.session.get();
        if !postgres::any_dead_session(&self.db, session, &self.machine)? {
            return Ok(());
        }
        self.write_locked(|idx| {
            postgres::forget_dead_sessions(&idx.db, session, &idx.machine)?;
            idx.drop_unfinished_writes(&format!(" AND {}", postgres::LEFT_BY_DEAD_SESSIONS))
        })
    }

    /// At a clean stop of a daemon of a PostgreSQL index: what it was still writing goes (as
    /// at a start of the embedded index), and its session ends. Call after
    /// [`Index::seal_all_committed`].
    pub fn end_session(&self) -> io::Result<()> {
        let session = self.session.get();
        if session == 0 {
            return Ok(());
        }
        self.write_locked(|idx| {
            idx.drop_unfinished_writes(&idx.own_rows())?;
            postgres::end_session(&idx.db, session)
        })?;
        self.session.set(0);
        Ok(())
    }

    /// Inside a transaction: writes the queued seals and returns how many, to be dropped from
    /// the queue once the transaction has committed (a rolled-back one leaves them queued).
    fn seal_now(&self) -> io::Result<usize> {
        let inos: Vec<u64> = self.pending_seals.borrow().clone();
        if inos.is_empty() {
            return Ok(0);
        }
        // One cached statement per file (usually one: the file released since the last
        // commit) rather than one `IN (...)` list, whose statement would be compiled anew each
        // time.
        for ino in &inos {
            self.db.exec(
                &format!(
                    "UPDATE entries SET state = {STATE_LIVE}
                     WHERE ino = ?1 AND state = {STATE_COMMITTED_OPEN}"
                ),
                params![*ino as i64],
            )?;
        }
        Ok(inos.len())
    }

    /// Runs `f` in a transaction that holds SQLite's write lock from the start
    /// (`BEGIN IMMEDIATE`): commits if `f` succeeds, rolls back if it fails.
    ///
    /// Inside a transaction already open, `f` runs as a step of it (see [`Index::atomically`]).
    pub fn write_locked<T>(&self, f: impl FnOnce(&Index) -> io::Result<T>) -> io::Result<T> {
        if self.db.in_transaction() {
            return self.atomically(|| f(self));
        }
        self.db.begin_write()?;
        // Rolls the transaction back if `f` panics: otherwise it would stay open, and every
        // later `BEGIN` of this connection would fail.
        let guard = UndoOnUnwind(&self.db, db::Step::Transaction);
        let result = f(self);
        std::mem::forget(guard);
        let end = if result.is_ok() {
            self.db.commit()
        } else {
            self.db.rollback()
        };
        if let Err(e) = end {
            let _ = self.db.rollback();
            return Err(e);
        }
        result
    }

    /// Who uses blob `hash`: whether any live (or being written) entry or an earlier content of
    /// a rewritable file (history) does, and the time the
    /// newest tombstone using it was made.
    pub fn blob_users(&self, hash: &Hash) -> io::Result<(bool, Option<i64>)> {
        self.db.row(
            "SELECT EXISTS (SELECT 1 FROM entries WHERE hash = ?1 AND state != 1)
                        OR EXISTS (SELECT 1 FROM history WHERE hash = ?1),
                    (SELECT MAX(ctime) FROM entries WHERE hash = ?1 AND state = 1)",
            params![hash.to_hex()],
            |r| Ok((r.get::<_, i64>(0)? != 0, r.get(1)?)),
        )
    }

    /// Forgets the content of the tombstones that used `hash` (its blob was collected); the
    /// paths stay taken.
    pub fn purge_tombstones(&self, hash: &Hash) -> io::Result<usize> {
        self.db.exec(
            "UPDATE entries SET hash = NULL WHERE hash = ?1 AND state = 1",
            params![hash.to_hex()],
        )
    }

    /// Applies `chmod`/`chown`/`utimens` (to the reservation of a new file being written).
    pub fn change_meta(&self, ino: u64, c: &MetaChange) -> io::Result<()> {
        if let Some(e) = self.reserved.borrow_mut().files.get_mut(&ino) {
            e.mode = c.mode.unwrap_or(e.mode);
            e.uid = c.uid.unwrap_or(e.uid);
            e.gid = c.gid.unwrap_or(e.gid);
            e.mtime = c.mtime.unwrap_or(e.mtime);
            e.atime = c.atime.unwrap_or(e.atime);
            e.ctime = c.ctime;
            return Ok(());
        }
        // A directory's times from reserved names go into the table first (a `utimens` after
        // them wins).
        let dir_time = self.reserved.borrow().dir_times.get(&ino).copied();
        self.db.exec(
            "UPDATE entries SET mode = COALESCE(?2, mode), uid = COALESCE(?3, uid),
                 gid = COALESCE(?4, gid),
                 mtime = COALESCE(?5, CASE WHEN mtime > ?8 THEN mtime ELSE ?8 END),
                 atime = COALESCE(?6, atime),
                 ctime = CASE WHEN CAST(?7 AS BIGINT) > ?8 THEN ?7 ELSE ?8 END
                 WHERE ino = ?1",
            params![
                ino as i64,
                c.mode.map(|m| m as i64),
                c.uid.map(|u| u as i64),
                c.gid.map(|g| g as i64),
                c.mtime,
                c.atime,
                c.ctime,
                dir_time.unwrap_or(i64::MIN)
            ],
        )?;
        if dir_time.is_some() && !self.db.in_transaction() {
            self.reserved.borrow_mut().dir_times.remove(&ino);
        }
        Ok(())
    }

    /// Turns a row into a tombstone (files) or a removed directory (which `mkdir` may revive, so
    /// the tombstones below it keep applying).
    /// The directory holding it changes too, in the same transaction.
    pub fn tombstone(&self, ino: u64, now: i64) -> io::Result<()> {
        if let Some(r) = self.reserved(ino) {
            // A new file being written: a tombstone row (without content) takes the name.
            self.atomically(|| {
                self.insert_reserved(&r, STATE_TOMBSTONE, None, r.size, r.mtime, now)?;
                self.touch_dir(r.parent, now)
            })?;
            self.forget_reservation(ino);
            return Ok(());
        }
        self.atomically(|| {
            self.db.exec(
                "UPDATE entries SET state = 1, ctime = ?2 WHERE ino = ?1",
                params![ino as i64, now],
            )?;
            self.touch_parent_of(ino, now)
        })
    }

    /// Brings a removed directory back (`mkdir` on the path of an `rmdir`ed directory).
    /// The directory holding it changes too, in the same transaction.
    pub fn revive_dir(&self, ino: u64, mode: u32, uid: u32, gid: u32, now: i64) -> io::Result<()> {
        self.atomically(|| {
            self.db.exec(
                "UPDATE entries SET state = 0, mode = ?2, uid = ?3, gid = ?4,
                     mtime = ?5, ctime = ?5, atime = ?5, crtime = ?5, generation = generation + 1
                 WHERE ino = ?1 AND kind = 1",
                params![ino as i64, mode as i64, uid as i64, gid as i64, now],
            )?;
            self.touch_parent_of(ino, now)
        })
    }

    /// A file created again at its tombstone: the row is being written again (a crash turns it
    /// back into the tombstone, since its hash is kept), the next generation of its inode. Its
    /// mode, owner and times stay the removed file's until the path's last content is written
    /// again ([`Index::owner_at_commit`]): whatever becomes of this attempt (refused, removed,
    /// renamed, a crash), the tombstone keeps them, and they say who could have read the
    /// content. `false` if it is no tombstone.
    pub fn recreate_at_tombstone(&self, ino: u64, now: i64) -> io::Result<bool> {
        let n = self.db.exec(
            &format!(
                "UPDATE entries SET state = {STATE_WRITING}, generation = generation + 1
                     WHERE ino = ?1 AND kind = 2 AND state = {STATE_TOMBSTONE} AND hash IS NOT NULL"
            ),
            params![ino as i64],
        )?;
        if n == 1 {
            // The name is back in its directory.
            self.touch_parent_of(ino, now)?;
        }
        Ok(n == 1)
    }

    /// The mode, owner and birth the writer of file `ino`, created again at its tombstone,
    /// gave it (again, after a `chmod`): its row takes them with the path's last content, in
    /// the same transaction ([`Index::commit_file_with`]); `None`: forget them (released).
    /// Whether file `ino` was created again at its tombstone and its row does not have its
    /// writer's mode and owner yet (see [`Index::owner_at_commit`]).
    pub fn owner_pending(&self, ino: u64) -> bool {
        self.owners_at_commit.borrow().contains_key(&ino)
    }

    pub fn owner_at_commit(&self, ino: u64, owner: Option<(u32, u32, u32, i64)>) {
        let mut owners = self.owners_at_commit.borrow_mut();
        match owner {
            Some(o) => owners.insert(ino, o),
            None => owners.remove(&ino),
        };
    }

    /// A file created again at its tombstone that never got the path's last content: the
    /// tombstone again, as it was (`was`: its row before; the removed file's mode, owner and
    /// times decide who may compare a later attempt's writes as they come).
    pub fn restore_tombstone(&self, was: &Entry, now: i64) -> io::Result<()> {
        let ino = was.ino;
        if self.reserved(ino).is_some() {
            return self.tombstone(ino, now);
        }
        let own = self.own_rows();
        self.db.exec(
            &format!(
                "UPDATE entries SET state = {STATE_TOMBSTONE}, mode = ?2, uid = ?3, gid = ?4,
                     mtime = ?5, ctime = ?6, crtime = ?7
                     WHERE ino = ?1 AND state IN ({STATE_WRITING}, {STATE_WRITING_KEEP_SYNCED}){own}"
            ),
            params![
                ino as i64,
                was.mode as i64,
                was.uid as i64,
                was.gid as i64,
                was.mtime,
                was.ctime,
                was.crtime
            ],
        )?;
        // The name is gone from its directory again.
        self.touch_parent_of(ino, now)?;
        Ok(())
    }

    /// Removes a file that is still being written: a file that never committed anything goes
    /// without a trace; one that did (a close() returned) leaves a tombstone. The directory
    /// holding it changes too, in the same transaction (a reserved file just goes, and its
    /// directory's new times wait as its creation's did).
    pub fn unlink_unsealed(&self, ino: u64, now: i64) -> io::Result<()> {
        let mut r = self.reserved.borrow_mut();
        if let Some(e) = r.remove(ino) {
            r.touch(e.parent, now);
            return Ok(());
        }
        drop(r);
        self.atomically(|| self.unlink_unsealed_rows(ino, now))
    }

    fn unlink_unsealed_rows(&self, ino: u64, now: i64) -> io::Result<()> {
        if self.db.is_postgres() {
            // (Its commit, if one follows, finds no row: removed here, see `gone_or_lost`.)
            self.removed_here.borrow_mut().insert(ino);
        }
        self.touch_parent_of(ino, now)?;
        self.db.batch(&format!(
                "DELETE FROM entries WHERE ino = {ino} AND state = {STATE_WRITING} AND hash IS NULL;
                 UPDATE entries SET state = {STATE_TOMBSTONE}, ctime = {now}
                     WHERE ino = {ino} AND state IN ({STATE_WRITING}, {STATE_WRITING_KEEP_SYNCED});"
            ))
    }

    /// A committed file is being written again through the same open file (a shell redirect
    /// commits at its first close, before the writes): until it is committed again, a crash
    /// must not leave the earlier version visible — unless that version was fsync'd.
    pub fn mark_rewriting(&self, ino: u64, keep_on_crash: bool) -> io::Result<()> {
        // A row committed while open is written again only while it is still this daemon's
        // (on a shared index: stamped with its session; one another daemon sealed after this
        // daemon's lease ran out stays sealed, and the writer's session check fails it).
        // A sealed row (another handle of the file was released) only while this daemon's
        // session lives: a daemon that lost its lease without knowing it yet (the answer to its
        // last heartbeat came after another daemon had cleaned up after it) must not make a
        // row that cleanup sealed writable again. The session and its rows go in one
        // transaction, so a session still there had nothing cleaned up.
        let own = self.own_rows();
        let alive = if self.db.is_postgres() {
            format!(
                " AND EXISTS (SELECT 1 FROM sessions WHERE id = {})",
                self.session.get()
            )
        } else {
            String::new()
        };
        let n = self.db.exec(
            &format!(
                "UPDATE entries SET state = ?2 WHERE ino = ?1
                 AND ((state = {STATE_LIVE}{alive}) OR (state = {STATE_COMMITTED_OPEN}{own}))"
            ),
            params![
                ino as i64,
                if keep_on_crash {
                    STATE_WRITING_KEEP_SYNCED
                } else {
                    STATE_WRITING
                }
            ],
        )?;
        let session = self.session.get();
        if n == 0 && session != 0 && !postgres::session_exists(&self.db, session)? {
            return Err(lease_lost(session));
        }
        if n == 0 {
            // Another daemon's writer has the row (two machines replacing one rewritable file,
            // both opened while it was sealed): this writer may not change it, and is told so
            // now rather than find at its commit that the row was never its own.
            let taken: bool = self.db.row(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM entries WHERE ino = ?1 AND state IN \
                     ({STATE_WRITING}, {STATE_WRITING_KEEP_SYNCED}, {STATE_COMMITTED_OPEN}))"
                ),
                params![ino as i64],
                |r| r.get(0),
            )?;
            if taken {
                log::warn!(
                    "inode {ino}: another machine is writing it; this writer's changes are refused [EBUSY]"
                );
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
        }
        Ok(())
    }

    /// The writes of an open file failed or were abandoned while the daemon runs: it falls back
    /// to its last committed version (a `close()` returned 0 for it), or disappears if it never
    /// committed. (After a crash, [`Index::open`] keeps only fsync'd versions instead: nobody was
    /// told that the later writes did not make it.)
    ///
    /// Both statements run in one transaction, so a busy index changes nothing and the call may
    /// be repeated.
    pub fn abandon_write(&self, ino: u64) -> io::Result<()> {
        if self.reserved.borrow_mut().remove(ino).is_some() {
            return Ok(());
        }
        // (On a shared index, only while the row is still this daemon's: see `mark_rewriting`.)
        self.write_locked(|idx| {
            let own = idx.own_rows();
            idx.db.batch(&format!(
                "UPDATE entries SET state = {STATE_LIVE}
                     WHERE ino = {ino} AND state IN ({STATE_WRITING}, {STATE_WRITING_KEEP_SYNCED})
                     AND hash IS NOT NULL{own};
                 DELETE FROM entries WHERE ino = {ino} AND state = {STATE_WRITING}{own};"
            ))
        })
    }

    /// Deletes a row (or a reservation) outright, leaving no tombstone: for drafts of model versions that never
    /// became READY (their names may be reused) and for files lost in a crash before their
    /// bytes reached the disk.
    pub fn delete_row(&self, ino: u64) -> io::Result<()> {
        let mut r = self.reserved.borrow_mut();
        if r.remove(ino).is_some() {
            return Ok(());
        }
        r.dir_times.remove(&ino);
        drop(r);
        self.db
            .exec("DELETE FROM entries WHERE ino = ?1", params![ino as i64])?;
        Ok(())
    }

    /// Every visible entry below directory `dir`, with its path relative to `dir`
    /// (`/`-separated bytes), parents before children.
    pub fn descendants(&self, dir: u64) -> io::Result<Vec<(Vec<u8>, Entry)>> {
        let mut out = Vec::new();
        let mut stack = vec![(Vec::new(), dir)];
        while let Some((prefix, ino)) = stack.pop() {
            let mut after = 0;
            loop {
                let batch = self.children(ino, after, 1000)?;
                let Some(last) = batch.last() else { break };
                after = last.ino;
                for e in batch {
                    let mut rel = prefix.clone();
                    if !rel.is_empty() {
                        rel.push(b'/');
                    }
                    rel.extend_from_slice(&e.name);
                    if e.kind == Kind::Dir {
                        stack.push((rel.clone(), e.ino));
                    }
                    out.push((rel, e));
                }
            }
        }
        Ok(out)
    }

    /// Moves file `ino` to `(new_parent, new_name)`; if it had committed content and
    /// `leave_tombstone`, the old path becomes a tombstone in the same transaction. `Ok(false)` if the new path is taken.
    pub fn rename_file(
        &self,
        ino: u64,
        new_parent: u64,
        new_name: &[u8],
        new_zone: u8,
        now: i64,
        leave_tombstone: bool,
    ) -> io::Result<bool> {
        self.rename_file_replacing(
            ino,
            None,
            new_parent,
            new_name,
            new_zone,
            now,
            leave_tombstone,
        )
    }

    /// [`Index::rename_file`] onto the sealed file `replacing` (which has the same content), as
    /// POSIX `rename` does: the target name now names `ino`, the replaced row goes, in the same
    /// transaction. `Ok(false)` if `replacing` is no longer a sealed file.
    #[allow(clippy::too_many_arguments)]
    pub fn rename_file_replacing(
        &self,
        ino: u64,
        replacing: Option<u64>,
        new_parent: u64,
        new_name: &[u8],
        new_zone: u8,
        now: i64,
        leave_tombstone: bool,
    ) -> io::Result<bool> {
        if self
            .reserved_at(new_parent, new_name)
            .is_some_and(|r| r.ino != ino)
        {
            return Ok(false);
        }
        if self.reserved(ino).is_some() {
            return self.rename_reserved(ino, replacing, new_parent, new_name, new_zone, now);
        }
        // One write transaction from the start: one that reads first and writes later fails at
        // once (SQLITE_BUSY_SNAPSHOT) if another connection (gc) committed in between. A name
        // taken meanwhile undoes it all (the error), and reads as `false`.
        let moved = self.write_locked(|idx| {
            let old = idx.db.row(
                &format!("SELECT {COLUMNS} FROM entries WHERE ino = ?1"),
                params![ino as i64],
                row_to_entry,
            )?;
            if let Some(r) = replacing
                && !delete_replaced(&idx.db, r, ino)?
            {
                return Ok(false);
            }
            // Both directories change: a name left one and arrived in the other.
            for dir in [old.parent, new_parent] {
                idx.db.exec(
                    "UPDATE entries SET mtime = ?2, ctime = ?2 WHERE ino = ?1 AND kind = 1",
                    params![dir as i64, now],
                )?;
            }
            idx.db.exec(
                "UPDATE entries SET parent = ?2, name = ?3, zone = ?4, ctime = ?5 WHERE ino = ?1",
                params![
                    ino as i64,
                    new_parent as i64,
                    new_name,
                    new_zone as i64,
                    now
                ],
            )?;
            if leave_tombstone && old.hash.is_some() {
                let tombstone = idx.new_ino()?;
                idx.db.exec(
                    "INSERT INTO entries
                     (parent, name, kind, state, zone, hash, size, mode, uid, gid, mtime, ctime,
                      crtime, atime, ino)
                     VALUES (?1, ?2, 2, 1, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                    params![
                        old.parent as i64,
                        old.name,
                        old.zone as i64,
                        old.hash.map(|h| h.to_hex()),
                        old.size as i64,
                        old.mode as i64,
                        old.uid as i64,
                        old.gid as i64,
                        old.mtime,
                        now,
                        old.crtime,
                        old.atime,
                        tombstone as i64
                    ],
                )?;
            }
            Ok(true)
        });
        match moved {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            other => other,
        }
    }

    /// [`Index::rename_file_replacing`] of a reserved file: it has no content, so it leaves no
    /// tombstone; the reservation moves and both directories change, without a transaction
    /// (unless a row is replaced).
    fn rename_reserved(
        &self,
        ino: u64,
        replacing: Option<u64>,
        new_parent: u64,
        new_name: &[u8],
        new_zone: u8,
        now: i64,
    ) -> io::Result<bool> {
        if let Some(r) = replacing {
            if !delete_replaced(&self.db, r, ino)? {
                return Ok(false);
            }
        } else if self.row_at(new_parent, new_name)? {
            return Ok(false);
        }
        let mut r = self.reserved.borrow_mut();
        let Some(mut e) = r.remove(ino) else {
            return Ok(false);
        };
        r.touch(e.parent, now);
        r.touch(new_parent, now);
        e.parent = new_parent;
        e.name = new_name.to_vec();
        e.zone = new_zone;
        e.ctime = now;
        r.names.insert((new_parent, e.name.clone()), ino);
        r.files.insert(ino, e);
        Ok(true)
    }

    /// Files with content whose row changed at or after `since` (ns): `(inode, hash)`.
    pub fn changed_since(&self, since: i64) -> io::Result<Vec<(u64, Hash)>> {
        let rows = self.db.all(
            "SELECT ino, hash FROM entries WHERE kind = 2 AND hash IS NOT NULL AND ctime >= ?1",
            params![since],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?)),
        )?;
        Ok(rows
            .into_iter()
            .filter_map(|(ino, h)| Hash::from_hex(&h).map(|h| (ino, h)))
            .collect())
    }

    /// Whether a row older than `before` (ns) uses blob `hash`.
    pub fn hash_used_before(&self, hash: &Hash, before: i64) -> io::Result<bool> {
        self.db.row(
            "SELECT EXISTS (SELECT 1 FROM entries WHERE hash = ?1 AND ctime < ?2)",
            params![hash.to_hex(), before],
            |r| r.get::<_, i64>(0).map(|b| b != 0),
        )
    }

    /// Leaves checkpoints to [`Index::checkpoint`] on another connection: a checkpoint fsyncs
    /// the WAL and the database, which must not happen inside a commit that a `close()` waits
    /// for.
    pub fn no_auto_checkpoint(&self) -> io::Result<()> {
        if self.db.is_postgres() {
            return Ok(());
        }
        self.db.batch("PRAGMA wal_autocheckpoint = 0")
    }

    /// Opens a second connection to a store's index that only checkpoints.
    pub fn open_checkpointer(path: &Path) -> io::Result<Index> {
        let index = Index::with(Db::Sqlite(Connection::open(path).map_err(to_io)?));
        index.configure()?;
        index.no_auto_checkpoint()?;
        Ok(index)
    }

    /// Copies what the WAL holds into the database file without waiting for anyone (a passive
    /// checkpoint); returns how many frames the WAL holds.
    pub fn checkpoint(&self) -> io::Result<i64> {
        if self.db.is_postgres() {
            return Ok(0);
        }
        self.db
            .row("PRAGMA wal_checkpoint(PASSIVE)", params![], |r| {
                r.get::<_, i64>(1)
            })
    }

    /// Makes everything committed so far durable, by any connection: `fdatasync` of the WAL file.
    ///
    /// With `synchronous = NORMAL` a commit writes its frames to the WAL (`write(2)`, before
    /// `COMMIT` returns) without syncing it; SQLite syncs the WAL only before a checkpoint copies
    /// from it. A checkpoint is no way to sync here: a passive one gives up without an error
    /// when another connection is checkpointing (the daemon's tick does, every 200 ms), and then
    /// syncs nothing. Nor is `synchronous = FULL` for the caller's commit: an `fsync()` of a
    /// file committed at an earlier `close()`, or of a directory, has no commit of its own.
    /// Syncing the file is durable by construction: `fdatasync` covers every page of the inode,
    /// whichever descriptor wrote it. If a checkpoint restarted the WAL meanwhile, the frames
    /// were in the database file already, and synced: SQLite restarts a WAL only once all of it
    /// was copied back, and a checkpoint syncs the database before it records the copy. No WAL
    /// file at all means the last connection closed it after a complete checkpoint.
    pub fn sync(&self) -> io::Result<()> {
        let Some(conn) = self.db.sqlite() else {
            return Ok(()); // PostgreSQL: a commit is durable when it returns
        };
        let Some(db) = conn.path().filter(|p| !p.is_empty()) else {
            return Ok(()); // in memory
        };
        match std::fs::File::open(format!("{db}-wal")) {
            Ok(wal) => wal.sync_data(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The full path of a row below the root, e.g. `runs/r1/artifacts/model.pkl`.
    pub fn path_of(&self, ino: u64) -> io::Result<PathBuf> {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT_INO && cur != 0 {
            match self.get(cur)? {
                Some(e) => {
                    parts.push(e.name);
                    cur = e.parent;
                }
                None => break,
            }
            // A guard against a cycle in a damaged index; trees are far shallower.
            if parts.len() > 1 << 20 {
                break;
            }
        }
        let mut path = PathBuf::new();
        for p in parts.iter().rev() {
            path.push(OsStr::from_bytes(p));
        }
        Ok(path)
    }

    /// Resolves a `/`-separated path below the root to its row (live entries only).
    pub fn resolve(&self, path: &Path) -> io::Result<Option<Entry>> {
        let mut cur = self.get(ROOT_INO)?;
        for comp in path.components() {
            let name = match comp {
                std::path::Component::Normal(n) => n.as_bytes(),
                std::path::Component::RootDir | std::path::Component::CurDir => continue,
                _ => return Ok(None),
            };
            cur = match cur {
                Some(dir) if dir.kind == Kind::Dir => self
                    .lookup(dir.ino, name)?
                    .filter(|e| e.state != State::Tombstone),
                _ => return Ok(None),
            };
        }
        Ok(cur)
    }

    /// Every file row with content (live and tombstoned), with its path: what `fsck` checks.
    pub fn file_rows(&self) -> io::Result<Vec<FileRow>> {
        let rows = self.db.all(
            "SELECT ino, hash, size, state FROM entries WHERE kind = 2 AND hash IS NOT NULL",
            params![],
            |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)? as u64,
                    r.get::<_, i64>(3)?,
                ))
            },
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for (ino, hex, size, state) in rows {
            let hash = Hash::from_hex(&hex).ok_or_else(|| {
                io::Error::other(format!("row {ino} has a malformed hash {hex:?}"))
            })?;
            out.push(FileRow {
                path: self.path_of(ino)?,
                hash,
                size,
                state: if state == 1 {
                    State::Tombstone
                } else {
                    State::Live
                },
            });
        }
        Ok(out)
    }

    /// Runs `PRAGMA integrity_check`; returns the problems it reports (empty when fine).
    pub fn integrity_problems(&self) -> io::Result<Vec<String>> {
        if self.db.is_postgres() {
            // PostgreSQL checks its own pages (and the schema's keys hold by construction).
            return Ok(Vec::new());
        }
        let rows = self.db.all("PRAGMA integrity_check", params![], |r| {
            r.get::<_, String>(0)
        })?;
        Ok(rows.into_iter().filter(|r| r != "ok").collect())
    }
}

/// Test helper: how many write transactions the WAL of the index at `db` holds (its commit
/// frames since the WAL last started over), counted from the file itself — whatever code path
/// wrote them.
#[cfg(test)]
pub(crate) fn wal_commits(db: &Path) -> usize {
    let wal = std::fs::read(format!("{}-wal", db.display())).unwrap_or_default();
    if wal.len() < 32 {
        return 0;
    }
    let be = |at: usize| u32::from_be_bytes(wal[at..at + 4].try_into().unwrap());
    let (page, salts) = (be(8) as usize, (be(16), be(20)));
    let mut commits = 0;
    let mut at = 32;
    while at + 24 + page <= wal.len() {
        if (be(at + 8), be(at + 12)) != salts {
            break; // left from before the WAL started over
        }
        if be(at + 4) != 0 {
            commits += 1;
        }
        at += 24 + page;
    }
    commits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_file(parent: u64, name: &[u8]) -> NewEntry<'_> {
        NewEntry::new_file(parent, name, 2, 0o644, (0, 0), 1)
    }

    /// One index of each engine, to open again and again: `open(now)` is a start of the
    /// writing daemon (after a crash, if the last one was not stopped), `other()` another
    /// connection that reads it (on PostgreSQL, the daemon of another machine).
    struct Engine {
        name: &'static str,
        open: Box<dyn Fn(i64) -> Index>,
        other: Box<dyn Fn() -> Index>,
        _dir: tempfile::TempDir,
    }

    fn engines() -> Vec<Engine> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let p2 = path.clone();
        let mut v = vec![Engine {
            name: "sqlite",
            open: Box::new(move |now| Index::open(&path, (0, 0), now).unwrap()),
            other: Box::new(move || Index::open_readonly(&p2).unwrap()),
            _dir: dir,
        }];
        if let Some(url) = db::tests::test_pg_url() {
            let u2 = url.clone();
            v.push(Engine {
                name: "postgresql",
                open: Box::new(move |now| Index::open_postgres(&url, "m1", (0, 0), now).unwrap()),
                // (Without the moment a daemon keeps answers: these tests ask what the table
                // says.)
                other: Box::new(move || {
                    let mut other = Index::open_postgres(&u2, "m2", (0, 0), 0).unwrap();
                    other.pg_cache = false;
                    other
                }),
                _dir: tempfile::tempdir().unwrap(),
            });
        }
        v
    }

    /// A sealed file `name` in `runs/`, committed and sealed; its inode number.
    fn sealed_file(idx: &Index, name: &[u8], content: &[u8]) -> u64 {
        let ino = idx.insert(&new_file(RUNS_INO, name)).unwrap().unwrap();
        let h = Hash::of(content);
        let stored = Stored::Inline { bytes: content };
        let n = content.len() as u64;
        assert_eq!(
            idx.commit_file_with(ino, &h, n, 7, 7, stored).unwrap(),
            Commit::Recorded
        );
        idx.seal_later(ino);
        idx.seal_pending().unwrap();
        ino
    }

    /// A PostgreSQL index's daemon keeps answers for a moment: its own changes show at once
    /// (those of the one-round-trip server functions patched into what it keeps, the others dropping
    /// it), another machine's within `cache::PG_KEEP`.
    #[test]
    fn a_shared_index_keeps_answers_for_a_moment_and_its_own_changes_show_at_once() {
        let Some(url) = db::tests::test_pg_url() else {
            return;
        };
        let idx = Index::open_postgres(&url, "m1", (0, 0), 5).unwrap();
        let other = Index::open_postgres(&url, "m2", (0, 0), 5).unwrap();
        assert!(idx.pg_cache);
        let art = idx
            .insert_in_dir(&NewEntry::new_dir(RUNS_INO, b"kept", 2, 0o755, (0, 0), 5))
            .unwrap()
            .unwrap();
        // Read once, then answered from memory: the same values.
        assert_eq!(idx.lookup(art, b"f").unwrap(), None);
        let dir = idx.get(art).unwrap().unwrap();
        // Its own create: the new row and the directory's times, at once.
        let f = idx
            .insert_in_dir(&NewEntry::new_file(art, b"f", 3, 0o644, (0, 0), 9))
            .unwrap()
            .unwrap();
        assert_eq!(idx.lookup(art, b"f").unwrap().unwrap().ino, f);
        assert_eq!(idx.get(f).unwrap().unwrap().state, State::Writing);
        let d = idx.get(art).unwrap().unwrap();
        assert_eq!((d.mtime, d.ctime, d.ino), (9, 9, dir.ino));
        // Its own commit, and the seal that rides with the next one.
        let h = Hash::of(b"x");
        let stored = Stored::Inline { bytes: b"x" };
        assert_eq!(
            idx.commit_file_with(f, &h, 1, 10, 11, stored).unwrap(),
            Commit::Recorded
        );
        let e = idx.get(f).unwrap().unwrap();
        assert_eq!((e.hash, e.size, e.committed_open), (Some(h), 1, true));
        idx.seal_later(f);
        let g = idx
            .insert_in_dir(&NewEntry::new_file(art, b"g", 3, 0o644, (0, 0), 12))
            .unwrap()
            .unwrap();
        let stored = Stored::Inline { bytes: b"x" };
        idx.commit_file_with(g, &h, 1, 12, 12, stored).unwrap();
        assert!(idx.pending_seals.borrow().is_empty());
        assert!(!idx.get(f).unwrap().unwrap().committed_open);
        assert!(!idx.lookup(art, b"f").unwrap().unwrap().committed_open);
        // A change made the ordinary way drops what was kept.
        idx.tombstone(g, 13).unwrap();
        assert_eq!(idx.get(g).unwrap().unwrap().state, State::Tombstone);
        // Another machine's change: seen within the moment.
        assert_eq!(idx.lookup(art, b"h").unwrap(), None);
        let h2 = other
            .insert_in_dir(&NewEntry::new_file(art, b"h", 3, 0o644, (0, 0), 14))
            .unwrap()
            .unwrap();
        let start = std::time::Instant::now();
        loop {
            if let Some(e) = idx.lookup(art, b"h").unwrap() {
                assert_eq!(e.ino, h2);
                break;
            }
            assert!(
                start.elapsed() <= cache::PG_KEEP * 2,
                "not seen after {:?}",
                start.elapsed()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// A lookup of a name not kept reads one row; the second in the same directory (within the
    /// moment answers are kept) reads the directory whole, and the names after it need no
    /// query.
    #[test]
    fn the_second_name_not_kept_in_a_directory_reads_it_whole() {
        let Some(url) = db::tests::test_pg_url() else {
            return;
        };
        let idx = Index::open_postgres(&url, "m1", (0, 0), 5).unwrap();
        let other = Index::open_postgres(&url, "m2", (0, 0), 5).unwrap();
        let dir = other
            .insert_in_dir(&NewEntry::new_dir(RUNS_INO, b"whole", 2, 0o755, (0, 0), 5))
            .unwrap()
            .unwrap();
        let a = other
            .insert_in_dir(&NewEntry::new_file(dir, b"a", 3, 0o644, (0, 0), 6))
            .unwrap()
            .unwrap();
        // (Both lookups in one moment: tried again if a new one began between them.)
        let mut whole = false;
        for _ in 0..5 {
            idx.forget_kept();
            assert_eq!(idx.lookup(dir, b"x").unwrap(), None);
            assert!(!idx.cache.borrow().is_complete(dir));
            assert_eq!(idx.lookup(dir, b"a").unwrap().map(|e| e.ino), Some(a));
            whole = idx.cache.borrow().is_complete(dir);
            if whole {
                break;
            }
        }
        assert!(whole, "the second lookup did not read the directory whole");
        assert_eq!(idx.lookup(dir, b"y").unwrap(), None);
    }

    /// With its listener, a daemon drops what it keeps as soon as it hears of another
    /// connection's change, not only after the moment it keeps answers; its own changes,
    /// which what it keeps shows already, do not count.
    #[test]
    fn a_heard_change_of_another_machine_drops_what_is_kept() {
        let Some(url) = db::tests::test_pg_url() else {
            return;
        };
        let idx = Index::open_postgres(&url, "m1", (0, 0), 5).unwrap();
        let other = Index::open_postgres(&url, "m2", (0, 0), 5).unwrap();
        let _listener = idx.listen(Box::new(|_| {})).unwrap().unwrap();
        let heard = || idx.heard.load(std::sync::atomic::Ordering::Acquire);
        let wait_heard = |n: u64| {
            let start = std::time::Instant::now();
            while heard() < n {
                assert!(
                    start.elapsed() < std::time::Duration::from_secs(5),
                    "never heard"
                );
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        };
        wait_heard(1); // (the listener's connect)
        let dir = idx
            .insert_in_dir(&NewEntry::new_dir(RUNS_INO, b"heard", 2, 0o755, (0, 0), 5))
            .unwrap()
            .unwrap();
        assert_eq!(idx.lookup(dir, b"x").unwrap(), None);
        // Its own change is not counted...
        std::thread::sleep(std::time::Duration::from_millis(200));
        let before = heard();
        idx.insert_in_dir(&NewEntry::new_file(dir, b"own", 3, 0o644, (0, 0), 6))
            .unwrap()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(heard(), before, "its own create was counted");
        assert_eq!(idx.lookup(dir, b"x").unwrap(), None);
        // ... another machine's is, and the next answer is read again.
        let x = other
            .insert_in_dir(&NewEntry::new_file(dir, b"x", 3, 0o644, (0, 0), 7))
            .unwrap()
            .unwrap();
        wait_heard(before + 1);
        assert_eq!(idx.lookup(dir, b"x").unwrap().map(|e| e.ino), Some(x));
    }

    /// A daemon's listener does not hand up the changes of its own creates and small-file
    /// commits (its kernel made them), but does those of another machine's, and its own
    /// other changes.
    #[test]
    fn changes_made_through_its_own_kernel_are_not_handed_up() {
        let Some(url) = db::tests::test_pg_url() else {
            return;
        };
        let idx = Index::open_postgres(&url, "m1", (0, 0), 5).unwrap();
        let other = Index::open_postgres(&url, "m2", (0, 0), 5).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<Change>();
        let tx = std::sync::Mutex::new(tx);
        let _listener = idx
            .listen(Box::new(move |c| {
                let _ = tx.lock().unwrap().send(c);
            }))
            .unwrap()
            .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            Change::Anything
        );
        let mine = idx
            .insert_in_dir(&NewEntry::new_file(RUNS_INO, b"mine", 3, 0o644, (0, 0), 6))
            .unwrap()
            .unwrap();
        let h = Hash::of(b"x");
        idx.commit_file_with(mine, &h, 1, 7, 7, Stored::Inline { bytes: b"x" })
            .unwrap();
        // Made otherwise (a tombstone: `rm`, through the kernel too, but not through those
        // functions), its own change is handed up.
        idx.tombstone(mine, 8).unwrap();
        let theirs = other
            .insert_in_dir(&NewEntry::new_file(
                RUNS_INO,
                b"theirs",
                3,
                0o644,
                (0, 0),
                9,
            ))
            .unwrap()
            .unwrap();
        let mut seen = vec![];
        while let Ok(c) = rx.recv_timeout(Duration::from_secs(2)) {
            seen.push(c);
        }
        let named = |name: &[u8]| {
            seen.iter()
                .any(|c| matches!(c, Change::Name { parent, name: n } if *parent == RUNS_INO && n == name))
        };
        assert!(named(b"theirs"), "{seen:?}");
        assert!(
            seen.contains(&Change::Inode {
                ino: theirs,
                content: true
            }),
            "{seen:?}"
        );
        // The tombstone's notification names it; its create and commit sent none.
        assert!(named(b"mine"), "{seen:?}");
        assert!(
            !seen.contains(&Change::Inode {
                ino: mine,
                content: true
            }),
            "{seen:?}"
        );
    }

    /// `migrate` copies rows a page at a time: more than a page of entries and of history
    /// arrives whole, history in its order, committed-open files sealed.
    #[test]
    fn copying_rows_into_a_shared_index_goes_page_by_page() {
        let Some(url) = db::tests::test_pg_url() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let mut src = Index::open(&dir.path().join("index.sqlite"), (0, 0), 5).unwrap();
        let names: Vec<Vec<u8>> = (0..2500).map(|i| format!("f{i}").into_bytes()).collect();
        let entries: Vec<NewEntry> = names.iter().map(|n| new_file(RUNS_INO, n)).collect();
        assert_eq!(src.insert_many(&entries).unwrap(), 2500);
        let open = src.insert(&new_file(RUNS_INO, b"open")).unwrap().unwrap();
        src.commit_file(open, &Hash::of(b"x"), 1, 1, 2, || true)
            .unwrap();
        for i in 0..1200u64 {
            src.db
                .exec(
                    "INSERT INTO history (ino, hash, size, mtime, replaced) VALUES (?1, ?2, 1, ?3, ?3)",
                    params![open as i64, Hash::of(&i.to_le_bytes()).to_hex(), i as i64],
                )
                .unwrap();
        }
        let target = Index::open_postgres_target(&url, (0, 0), 5).unwrap();
        let copied = src.copy_rows_into(&target, "m-paged").unwrap();
        assert!(copied >= 2500 + 1 + 1200, "{copied}");
        let count = |sql: &str| -> i64 { target.db.row(sql, params![], |r| r.get(0)).unwrap() };
        assert_eq!(count("SELECT COUNT(*) FROM entries WHERE kind = 2"), 2501);
        assert_eq!(count("SELECT COUNT(*) FROM entries WHERE state = 4"), 0);
        let times: Vec<i64> = target
            .db
            .all("SELECT mtime FROM history ORDER BY rowid", params![], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(times, (0..1200).collect::<Vec<i64>>());
    }

    /// A create and a small file's commit, each one call of a server function, wait for the
    /// write lock another connection holds only as long as the lock timeout asked for, then
    /// fail as busy (retried by the daemon), having changed nothing; and go through once it is
    /// free.
    #[test]
    fn the_server_functions_wait_for_the_write_lock_as_long_as_asked() {
        let Some(url) = db::tests::test_pg_url() else {
            return;
        };
        let idx = Index::open_postgres(&url, "m1", (0, 0), 5).unwrap();
        let other = Index::open_postgres_client(&url).unwrap();
        let f = idx
            .insert_in_dir(&NewEntry::new_file(
                RUNS_INO,
                b"locked",
                3,
                0o644,
                (0, 0),
                6,
            ))
            .unwrap()
            .unwrap();
        idx.set_busy_timeout(Duration::from_millis(50)).unwrap();
        other.db.begin_write().unwrap();
        let e = idx
            .insert_in_dir(&NewEntry::new_file(
                RUNS_INO,
                b"locked2",
                3,
                0o644,
                (0, 0),
                7,
            ))
            .unwrap_err();
        assert!(is_busy(&e), "{e}");
        let h = Hash::of(b"x");
        let e = idx
            .commit_file_with(f, &h, 1, 8, 8, Stored::Inline { bytes: b"x" })
            .unwrap_err();
        assert!(is_busy(&e), "{e}");
        other.db.rollback().unwrap();
        // (Other tests' writers take the same lock: wait longer now.)
        idx.set_busy_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(idx.lookup(RUNS_INO, b"locked2").unwrap(), None);
        assert!(idx.get(f).unwrap().unwrap().hash.is_none());
        assert_eq!(
            idx.commit_file_with(f, &h, 1, 8, 8, Stored::Inline { bytes: b"x" })
                .unwrap(),
            Commit::Recorded
        );
        assert!(
            idx.insert_in_dir(&NewEntry::new_file(
                RUNS_INO,
                b"locked2",
                3,
                0o644,
                (0, 0),
                9
            ))
            .unwrap()
            .is_some()
        );
        let data: Vec<u8> = other
            .db
            .row(
                "SELECT data FROM inline_content WHERE hash = ?1",
                params![h.to_hex()],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(data, b"x");
    }

    /// On a shared index a commit that finds its row gone fails, unless this daemon removed
    /// it (an `unlink` while open, then one commit per descriptor): a row PostgreSQL lost in a
    /// crash (its create is not waited for on disk) or that another machine dropped must not
    /// let `close()` say the content is stored.
    #[test]
    fn a_commit_whose_row_vanished_fails_unless_it_was_removed_here() {
        let Some(url) = db::tests::test_pg_url() else {
            return;
        };
        let idx = Index::open_postgres(&url, "m1", (0, 0), 5).unwrap();
        let h = Hash::of(b"x");
        for inline in [true, false] {
            let name = if inline {
                b"lost-inline".as_slice()
            } else {
                b"lost-blob"
            };
            let f = idx
                .insert_in_dir(&NewEntry::new_file(RUNS_INO, name, 3, 0o644, (0, 0), 9))
                .unwrap()
                .unwrap();
            // (What a server crash does to a create not yet on disk.)
            let other = Index::open_postgres_client(&url).unwrap();
            other
                .db
                .exec("DELETE FROM entries WHERE ino = ?1", params![f as i64])
                .unwrap();
            std::thread::sleep(cache::PG_KEEP);
            let r = if inline {
                idx.commit_file_with(f, &h, 1, 10, 10, Stored::Inline { bytes: b"x" })
            } else {
                idx.commit_file(f, &h, 1, 10, 10, || true)
            };
            let e = r.unwrap_err();
            assert!(e.to_string().contains("gone from the shared index"), "{e}");
            // Removed here while open: nothing recorded, no error, at every commit.
            let g = idx
                .insert_in_dir(&NewEntry::new_file(
                    RUNS_INO,
                    b"unlinked",
                    3,
                    0o644,
                    (0, 0),
                    9,
                ))
                .unwrap()
                .unwrap();
            idx.unlink_unsealed(g, 11).unwrap();
            for _ in 0..2 {
                let r = if inline {
                    idx.commit_file_with(g, &h, 1, 12, 12, Stored::Inline { bytes: b"x" })
                } else {
                    idx.commit_file(g, &h, 1, 12, 12, || true)
                };
                assert_eq!(r.unwrap(), Commit::Gone);
            }
            assert_eq!(idx.lookup(RUNS_INO, b"unlinked").unwrap(), None);
        }
    }

    #[test]
    fn the_writable_index_keeps_answers_while_nothing_changes() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(&dir.path().join("index.sqlite"), (0, 0), 5).unwrap();
        let ino = sealed_file(&idx, b"a", b"x");
        let snap = idx.snapshot();
        assert!(snap.is_some(), "the WAL-index header is mapped");
        let e = idx.get(ino).unwrap().unwrap();
        assert_eq!(idx.lookup(RUNS_INO, b"b").unwrap(), None);
        assert_eq!(idx.get_checked(ino).unwrap(), Some((e.clone(), false)));
        // Reads change nothing: the same snapshot, and the answers come from memory.
        assert_eq!(idx.snapshot(), snap);
        assert!(idx.cache.borrow().row(ino).is_some());
        assert_eq!(idx.cache.borrow().row_at(RUNS_INO, b"b"), Some(&None));
        assert!(idx.cache.borrow().damaged_current);
        // A change of this connection (here a metadata change outside any transaction): the
        // answers read before are gone, the next ones read the table.
        let chmod = MetaChange {
            mode: Some(0o600),
            ctime: 9,
            ..Default::default()
        };
        idx.change_meta(ino, &chmod).unwrap();
        assert_ne!(idx.snapshot(), snap);
        assert_eq!(idx.get(ino).unwrap().unwrap().mode, 0o600);
        // So do renames, tombstones and new names.
        let idx = {
            let idx = idx;
            assert!(idx.rename_file(ino, RUNS_INO, b"b", 2, 10, true).unwrap());
            idx
        };
        assert_eq!(idx.lookup(RUNS_INO, b"b").unwrap().unwrap().ino, ino);
        let old = idx.lookup(RUNS_INO, b"a").unwrap().unwrap();
        assert_eq!(old.state, State::Tombstone);
        idx.tombstone(ino, 11).unwrap();
        assert_eq!(idx.get(ino).unwrap().unwrap().state, State::Tombstone);
        assert_eq!(
            idx.lookup(RUNS_INO, b"b").unwrap().unwrap().state,
            State::Tombstone
        );
        assert!(idx.insert(&new_file(RUNS_INO, b"b")).unwrap().is_none());
        assert!(idx.insert(&new_file(RUNS_INO, b"c")).unwrap().is_some());
    }

    #[test]
    fn another_connections_commit_drops_the_kept_answers_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let idx = Index::open(&path, (0, 0), 5).unwrap();
        let ino = sealed_file(&idx, b"a", b"x");
        let h = Hash::of(b"x");
        assert!(!idx.get_checked(ino).unwrap().unwrap().1);
        assert_eq!(idx.lookup(RUNS_INO, b"b").unwrap(), None);
        // fsck, in its own process: the very next open sees the damage.
        let fsck = Index::open_shared(&path).unwrap();
        fsck.mark_damaged(&h, 8).unwrap();
        assert!(idx.get_checked(ino).unwrap().unwrap().1);
        fsck.clear_damaged(&h).unwrap();
        assert!(!idx.get_checked(ino).unwrap().unwrap().1);
        // Rows changed by another process (nothing does this to a running daemon's live rows
        // today; the cache does not rely on it).
        fsck.db
            .sqlite()
            .unwrap()
            .execute("UPDATE entries SET mode = 384 WHERE ino = ?1", [ino as i64])
            .unwrap();
        assert_eq!(idx.get(ino).unwrap().unwrap().mode, 0o600);
        fsck.db
            .sqlite()
            .unwrap()
            .execute(
                "INSERT INTO entries (parent, name, kind, state, zone, mode, uid, gid, mtime,
                 ctime, crtime) VALUES (2, CAST('b' AS BLOB), 2, 1, 2, 420, 0, 0, 1, 1, 1)",
                [],
            )
            .unwrap();
        assert!(idx.lookup(RUNS_INO, b"b").unwrap().is_some());
        assert!(idx.insert(&new_file(RUNS_INO, b"b")).unwrap().is_none());
    }

    #[test]
    fn rows_seen_inside_a_rolled_back_transaction_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(&dir.path().join("index.sqlite"), (0, 0), 5).unwrap();
        let ino = sealed_file(&idx, b"a", b"x");
        assert_eq!(idx.get(ino).unwrap().unwrap().state, State::Live);
        let failed: io::Result<()> = idx.write_locked(|idx| {
            idx.db
                .sqlite()
                .unwrap()
                .execute("UPDATE entries SET state = 1 WHERE ino = ?1", [ino as i64])
                .map_err(to_io)?;
            // Read inside the transaction: the uncommitted tombstone.
            assert_eq!(idx.get(ino)?.unwrap().state, State::Tombstone);
            assert_eq!(idx.lookup(RUNS_INO, b"a")?.unwrap().state, State::Tombstone);
            Err(io::Error::other("no"))
        });
        assert!(failed.is_err());
        assert_eq!(idx.get(ino).unwrap().unwrap().state, State::Live);
        assert_eq!(
            idx.lookup(RUNS_INO, b"a").unwrap().unwrap().state,
            State::Live
        );
    }

    /// The cache reads the WAL-index header through SQLite's own mapping: opening and closing
    /// a descriptor of the `-shm` file of our own would drop this process's `fcntl` locks on it,
    /// among them SQLite's claim on the file (byte 128), and the next process to open the index
    /// (`gc`, `fsck`) would truncate and rebuild it under the daemon (which then died of
    /// SIGBUS reading the header).
    #[test]
    fn the_writable_index_keeps_its_claim_on_the_wal_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let idx = Index::open(&path, (0, 0), 5).unwrap();
        sealed_file(&idx, b"a", b"x");
        assert!(idx.snapshot().is_some());
        // A `gc` comes and goes.
        drop(Index::open_shared(&path).unwrap());
        let (_shm, rc) = lock_shm_byte(dir.path(), 128);
        assert_eq!(rc, -1, "nobody holds the WAL index's claim byte");
        assert!(idx.get(RUNS_INO).unwrap().is_some());
        assert!(idx.snapshot().is_some());
    }

    #[test]
    fn rows_read_inside_a_statements_read_transaction_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let idx = Index::open(&path, (0, 0), 5).unwrap();
        let ino = sealed_file(&idx, b"a", b"x");
        let other = Index::open_shared(&path).unwrap();
        {
            // A statement of this connection still stepping holds its read transaction open:
            // what is read meanwhile is the index as it was when it began.
            let mut stmt = idx
                .db
                .sqlite()
                .unwrap()
                .prepare("SELECT ino FROM entries")
                .unwrap();
            let mut rows = stmt.query([]).unwrap();
            assert!(rows.next().unwrap().is_some());
            other
                .db
                .sqlite()
                .unwrap()
                .execute("UPDATE entries SET mode = 384 WHERE ino = ?1", [ino as i64])
                .unwrap();
            assert_eq!(idx.get(ino).unwrap().unwrap().mode, 0o644);
        }
        assert_eq!(idx.get(ino).unwrap().unwrap().mode, 0o600);
    }

    #[test]
    fn only_the_writable_index_keeps_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let idx = Index::open(&path, (0, 0), 5).unwrap();
        sealed_file(&idx, b"a", b"x");
        assert!(idx.snapshot().is_some());
        assert!(Index::open_shared(&path).unwrap().snapshot().is_none());
        assert!(Index::open_readonly(&path).unwrap().snapshot().is_none());
    }

    /// On PostgreSQL, every change of a row is announced at its commit to every listener of
    /// the store: a new file (its name, its inode), a rename (both names), a tombstone and a
    /// deleted row (the name), an update of anything else (the inode alone); a rollback is
    /// never announced.
    #[test]
    fn changes_are_announced_to_listeners_at_commit() {
        let Some(url) = db::tests::test_pg_url() else {
            return;
        };
        let idx = Index::open_postgres(&url, "m1", (0, 0), 1).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<Change>();
        let tx = std::sync::Mutex::new(tx);
        let _listener = Index::open_postgres_client(&url)
            .unwrap()
            .listen(Box::new(move |c| {
                let _ = tx.lock().unwrap().send(c);
            }))
            .unwrap()
            .expect("a PostgreSQL index has a listener");
        // Its first connection may have missed anything: it says so first.
        let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(first, Change::Anything);
        let drain = || {
            let mut got = Vec::new();
            while let Ok(c) = rx.recv_timeout(Duration::from_millis(300)) {
                got.push(c);
            }
            got
        };
        let name = |parent: u64, n: &[u8]| Change::Name {
            parent,
            name: n.to_vec(),
        };
        let inode = |ino: u64, content: bool| Change::Inode { ino, content };

        let ino = sealed_file(&idx, b"a", b"bytes");
        let got = drain();
        for want in [name(RUNS_INO, b"a"), inode(ino, true), inode(ino, false)] {
            assert!(got.contains(&want), "{want:?} not in {got:?}");
        }
        assert!(!got.contains(&Change::Anything), "{got:?}");

        assert!(idx.rename_file(ino, RUNS_INO, b"b", 0, 2, true).unwrap());
        let got = drain();
        for want in [name(RUNS_INO, b"a"), name(RUNS_INO, b"b")] {
            assert!(got.contains(&want), "{want:?} not in {got:?}");
        }

        idx.tombstone(ino, 3).unwrap();
        let got = drain();
        assert!(got.contains(&name(RUNS_INO, b"b")), "{got:?}");
        idx.delete_row(ino).unwrap();
        let got = drain();
        assert!(got.contains(&name(RUNS_INO, b"b")), "{got:?}");

        // A change of attributes names no entry.
        let other = sealed_file(&idx, b"c", b"more");
        drain();
        idx.change_meta(
            other,
            &MetaChange {
                mode: Some(0o600),
                ctime: 4,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(drain(), vec![inode(other, false)]);

        // Nothing of a rolled-back transaction.
        idx.db.begin_write().unwrap();
        idx.db
            .exec("DELETE FROM entries WHERE ino = ?1", params![other as i64])
            .unwrap();
        idx.db.rollback().unwrap();
        assert_eq!(drain(), vec![]);
    }

    /// An index of schema version 1 (without the notifying triggers) or 2 (without the piece
    /// states) is upgraded by the next daemon that opens it; a command (`ls`) asks for that
    /// and changes nothing.
    #[test]
    fn a_version_1_or_2_index_is_upgraded_by_the_next_daemon() {
        let Some(url) = db::tests::test_pg_url() else {
            return;
        };
        let idx = Index::open_postgres(&url, "m1", (0, 0), 1).unwrap();
        idx.end_session().unwrap();
        idx.db
            .batch(
                "DROP TRIGGER entries_notify ON entries;
                 DROP TRIGGER registered_models_notify ON registered_models;
                 DROP TRIGGER model_versions_notify ON model_versions;
                 DROP TRIGGER model_aliases_notify ON model_aliases;
                 DROP FUNCTION artifactfs_notify_entry(); DROP FUNCTION artifactfs_notify_dirs();
                 DROP TABLE piece_states; ALTER TABLE entries DROP COLUMN generation;
                 UPDATE meta SET value = 1 WHERE key = 'schema_version'",
            )
            .unwrap();
        let triggers = |idx: &Index| -> i64 {
            idx.db
                .row(
                    "SELECT COUNT(*) FROM information_schema.triggers
                     WHERE trigger_schema = current_schema() AND trigger_name LIKE '%_notify'",
                    params![],
                    |r| r.get(0),
                )
                .unwrap()
        };
        assert_eq!(triggers(&idx), 0);
        let e = Index::open_postgres_client(&url).err().unwrap();
        assert!(e.to_string().contains("upgrades it"), "{e}");
        let idx = Index::open_postgres(&url, "m1", (0, 0), 2).unwrap();
        // (One row of information_schema.triggers per event: insert, update, delete.)
        assert_eq!(triggers(&idx), 12);
        Index::open_postgres_client(&url).unwrap();

        // Version 2 lacks only the piece states.
        let hash = Hash([7; 32]);
        idx.pieces_put(&hash, 8, b"states").unwrap();
        idx.end_session().unwrap();
        idx.db
            .batch(
                "DROP TABLE piece_states; ALTER TABLE entries DROP COLUMN generation;
                 UPDATE meta SET value = 2 WHERE key = 'schema_version'",
            )
            .unwrap();
        let e = Index::open_postgres_client(&url).err().unwrap();
        assert!(e.to_string().contains("version 2") && e.to_string().contains("upgrades it"));
        let idx = Index::open_postgres(&url, "m1", (0, 0), 3).unwrap();
        assert_eq!(idx.pieces_get(&hash).unwrap(), None);
        idx.pieces_put(&hash, 8, b"states").unwrap();
        idx.pieces_put(&hash, 8, b"others").unwrap();
        assert_eq!(
            idx.pieces_get(&hash).unwrap(),
            Some((8, b"states".to_vec()))
        );
        idx.pieces_remove(&hash).unwrap();
        assert_eq!(idx.pieces_get(&hash).unwrap(), None);
        Index::open_postgres_client(&url).unwrap();

        // Version 3 lacks only the generations: its rows are of generation 0.
        idx.end_session().unwrap();
        idx.db
            .batch(
                "ALTER TABLE entries DROP COLUMN generation;
                 UPDATE meta SET value = 3 WHERE key = 'schema_version'",
            )
            .unwrap();
        let e = Index::open_postgres_client(&url).err().unwrap();
        assert!(e.to_string().contains("version 3") && e.to_string().contains("upgrades it"));
        let idx = Index::open_postgres(&url, "m1", (0, 0), 4).unwrap();
        assert_eq!(idx.get(RUNS_INO).unwrap().unwrap().generation, 0);
        Index::open_postgres_client(&url).unwrap();
    }

    /// A daemon whose lease ran out without its knowing it (its last heartbeat's answer came
    /// after another daemon had cleaned up after it) writes nothing again: a row committed
    /// while open, which the cleanup sealed, is neither made writable again nor given new
    /// content; both fail as a lost lease, and the sealed content stays.
    #[test]
    fn rows_sealed_by_a_cleanup_stay_sealed_for_the_stalled_daemon() {
        let Some(url) = db::tests::test_pg_url() else {
            return;
        };
        let a = Index::open_postgres(&url, "ma", (0, 0), 1).unwrap();
        let ino = a.insert(&new_file(RUNS_INO, b"synced")).unwrap().unwrap();
        let first = Hash([1; 32]);
        assert_eq!(
            a.commit_file(ino, &first, 3, 1, 1, || true).unwrap(),
            Commit::Recorded
        );
        // a stops for longer than its lease; b finds its session gone and cleans up.
        a.db.exec(
            "UPDATE sessions SET heartbeat = 0 WHERE id = ?1",
            params![a.session.get()],
        )
        .unwrap();
        let b = Index::open_postgres(&url, "mb", (0, 0), 2).unwrap();
        let row = |idx: &Index| {
            idx.db
                .row(
                    "SELECT hash, state FROM entries WHERE ino = ?1",
                    params![ino as i64],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
                )
                .unwrap()
        };
        assert_eq!(row(&b), (first.to_hex(), STATE_LIVE));
        // a goes on as if its session were alive.
        let e = a.mark_rewriting(ino, true).unwrap_err();
        assert!(e.to_string().contains("lease"), "{e}");
        let e = a
            .commit_file(ino, &Hash([2; 32]), 4, 2, 2, || true)
            .unwrap_err();
        assert!(e.to_string().contains("lease"), "{e}");
        let e = a
            .commit_file_with(
                ino,
                &Hash::of(b"more"),
                4,
                2,
                2,
                Stored::Inline { bytes: b"more" },
            )
            .unwrap_err();
        assert!(e.to_string().contains("lease"), "{e}");
        assert_eq!(row(&b), (first.to_hex(), STATE_LIVE));
    }

    #[test]
    fn schema_has_fixed_roots_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        {
            let idx = Index::open(&path, (0, 0), 5).unwrap();
            assert_eq!(
                idx.lookup(ROOT_INO, b"runs").unwrap().unwrap().ino,
                RUNS_INO
            );
            assert_eq!(
                idx.lookup(ROOT_INO, b"models").unwrap().unwrap().ino,
                MODELS_INO
            );
        }
        let idx = Index::open(&path, (0, 0), 6).unwrap();
        assert_eq!(idx.get(ROOT_INO).unwrap().unwrap().mtime, 5);
    }

    /// A store made before access times had a column (schema version 3) opens, migrates to 4
    /// with each access time taken from the modification time, and keeps working.
    #[test]
    fn a_version_3_index_migrates_to_separate_access_times() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let hash = Hash([3; 32]);
        {
            let idx = Index::open(&path, (0, 0), 5).unwrap();
            let a = idx.insert(&new_file(RUNS_INO, b"a")).unwrap().unwrap();
            idx.commit_file(a, &hash, 3, 1_234, 1_300, || true).unwrap();
            idx.seal_later(a);
            idx.seal_pending().unwrap();
            // Back to the layout of version 3: no atime column.
            idx.db
                .sqlite()
                .unwrap()
                .execute_batch(
                    "ALTER TABLE entries DROP COLUMN atime; ALTER TABLE entries DROP COLUMN generation;
                     DROP TABLE history;
                     DROP TABLE inline_content; DROP TABLE piece_states; PRAGMA user_version = 3;",
                )
                .unwrap();
        }
        assert!(
            Index::open_readonly(&path).is_err(),
            "a version 3 index is not read as version 4 without its migration"
        );
        let idx = Index::open(&path, (0, 0), 6).unwrap();
        let version: i64 = idx
            .db
            .sqlite()
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let a = idx.lookup(RUNS_INO, b"a").unwrap().unwrap();
        assert_eq!(
            (a.state, a.hash, a.size, a.mtime, a.atime, a.generation),
            (State::Live, Some(hash), 3, 1_234, 1_234, 0)
        );
        assert_eq!(idx.get(ROOT_INO).unwrap().unwrap().atime, 5);
        // It keeps working: access and modification times change separately.
        idx.change_meta(
            a.ino,
            &MetaChange {
                atime: Some(-1_500_000_000),
                ctime: 7,
                ..Default::default()
            },
        )
        .unwrap();
        let a = idx.get(a.ino).unwrap().unwrap();
        assert_eq!((a.mtime, a.atime, a.ctime), (1_234, -1_500_000_000, 7));
        let b = idx.insert(&new_file(RUNS_INO, b"b")).unwrap().unwrap();
        assert_eq!(idx.get(b).unwrap().unwrap().atime, 1);
        drop(idx);
        assert!(Index::open_readonly(&path).is_ok());
    }

    /// Creating, removing and renaming a name changes its directories' mtime and ctime, in
    /// the same transaction as the change itself.
    #[test]
    fn directories_change_with_their_entries() {
        for engine in engines() {
            eprintln!("{}", engine.name);
            directories_change_with_their_entries_in(&mut (engine.open)(5));
        }
    }

    fn directories_change_with_their_entries_in(idx: &mut Index) {
        let times = |idx: &Index, ino| {
            let e = idx.get(ino).unwrap().unwrap();
            (e.mtime, e.ctime)
        };
        let d1 = idx
            .insert_in_dir(&NewEntry::new_dir(RUNS_INO, b"d1", 3, 0o755, (0, 0), 10))
            .unwrap()
            .unwrap();
        let d2 = idx
            .insert_in_dir(&NewEntry::new_dir(RUNS_INO, b"d2", 3, 0o755, (0, 0), 11))
            .unwrap()
            .unwrap();
        assert_eq!(times(idx, RUNS_INO), (11, 11));
        // A name already taken changes nothing.
        assert_eq!(
            idx.insert_in_dir(&NewEntry::new_dir(RUNS_INO, b"d2", 3, 0o755, (0, 0), 12))
                .unwrap(),
            None
        );
        assert_eq!(times(idx, RUNS_INO), (11, 11));
        let a = idx
            .insert_in_dir(&NewEntry::new_file(d1, b"a", 3, 0o644, (0, 0), 20))
            .unwrap()
            .unwrap();
        assert_eq!(times(idx, d1), (20, 20));
        idx.commit_file(a, &Hash([1; 32]), 1, 21, 21, || true)
            .unwrap();
        assert!(idx.rename_file(a, d2, b"b", 3, 30, true).unwrap());
        assert_eq!((times(idx, d1), times(idx, d2)), ((30, 30), (30, 30)));
        assert_eq!(times(idx, a), (21, 30), "the file's ctime, not its mtime");
        // A refused rename (the target is taken) leaves both directories alone.
        idx.insert_in_dir(&NewEntry::new_file(d1, b"c", 3, 0o644, (0, 0), 31))
            .unwrap()
            .unwrap();
        assert!(!idx.rename_file(a, d1, b"c", 3, 40, true).unwrap());
        assert_eq!((times(idx, d1), times(idx, d2)), ((31, 31), (30, 30)));
        idx.tombstone(a, 50).unwrap();
        assert_eq!(times(idx, d2), (50, 50));
        let c = idx.lookup(d1, b"c").unwrap().unwrap().ino;
        idx.unlink_unsealed(c, 60).unwrap();
        assert_eq!(times(idx, d1), (60, 60));
        assert_eq!(idx.get(c).unwrap(), None, "never committed: no trace");
        idx.tombstone(d1, 70).unwrap();
        assert_eq!(times(idx, RUNS_INO), (70, 70));
        idx.revive_dir(d1, 0o700, 0, 0, 80).unwrap();
        assert_eq!(times(idx, RUNS_INO), (80, 80));
        // Inside a transaction already open, the same step is a savepoint of it.
        idx.write_locked(|idx| {
            idx.insert_in_dir(&NewEntry::new_file(d2, b"e", 3, 0o644, (0, 0), 90))
                .map(|_| ())
        })
        .unwrap();
        assert_eq!(times(idx, d2), (90, 90));
    }

    /// A directory made again where one was removed, and a file created again at its
    /// tombstone, keep their inode number with the next generation (which the kernel's
    /// number of the inode carries); every other change keeps the generation.
    #[test]
    fn a_row_taken_again_is_of_the_next_generation() {
        for engine in engines() {
            eprintln!("{}", engine.name);
            let idx = (engine.open)(1);
            let h = Hash::of(b"x");
            let d = idx
                .insert_in_dir(&NewEntry::new_dir(RUNS_INO, b"d", 3, 0o755, (0, 0), 1))
                .unwrap()
                .unwrap();
            let f = idx.insert(&new_file(d, b"f")).unwrap().unwrap();
            idx.commit_file(f, &h, 1, 1, 2, || true).unwrap();
            idx.seal_later(f);
            idx.seal_pending().unwrap();
            let generation = |ino| idx.get(ino).unwrap().unwrap().generation;
            assert_eq!((generation(d), generation(f)), (0, 0));
            idx.tombstone(f, 3).unwrap();
            assert_eq!(generation(f), 0);
            let before = idx.get(f).unwrap().unwrap();
            assert!(idx.recreate_at_tombstone(f, 4).unwrap());
            assert_eq!(generation(f), 1);
            let during = idx.get(f).unwrap().unwrap();
            assert_eq!(
                (during.mode, during.uid, during.crtime, during.ctime),
                (before.mode, before.uid, before.crtime, before.ctime),
                "the removed file's until its content is written again"
            );
            let was = idx.get(f).unwrap().unwrap();
            let was = Entry {
                mode: 0o600,
                uid: 7,
                crtime: 1,
                ctime: 3,
                ..was
            };
            idx.restore_tombstone(&was, 5).unwrap();
            let back = idx.get(f).unwrap().unwrap();
            assert_eq!(
                (back.state, back.mode, back.uid, back.crtime, back.ctime),
                (State::Tombstone, 0o600, 7, 1, 3),
                "as it was before the attempt"
            );
            assert!(idx.recreate_at_tombstone(f, 6).unwrap());
            assert_eq!(generation(f), 2);
            // The path's last content again: the row takes its writer's mode, owner and birth
            // in the same transaction.
            idx.owner_at_commit(f, Some((0o640, 9, 8, 7)));
            assert!(idx.owner_pending(f));
            idx.commit_file(f, &h, 1, 8, 8, || true).unwrap();
            let owned = idx.get(f).unwrap().unwrap();
            assert_eq!(
                (owned.mode, owned.uid, owned.gid, owned.crtime),
                (0o640, 9, 8, 7)
            );
            assert!(!idx.owner_pending(f));
            for (n, t) in [(1, 10), (2, 20)] {
                idx.tombstone(d, t).unwrap();
                idx.revive_dir(d, 0o700, 0, 0, t + 1).unwrap();
                assert_eq!(generation(d), n);
            }
            // Other readers see it too (another machine's kernel must take it as new).
            assert_eq!((engine.other)().get(d).unwrap().unwrap().generation, 2);
        }
    }

    #[test]
    fn a_commit_stays_unsealed_for_other_readers_until_the_release_reaches_the_table() {
        for engine in engines() {
            eprintln!("{}", engine.name);
            a_commit_stays_unsealed_in(&engine);
        }
    }

    fn a_commit_stays_unsealed_in(engine: &Engine) {
        let h = Hash::of(b"x");
        let (a, b) = {
            let idx = (engine.open)(1);
            let a = idx.insert(&new_file(RUNS_INO, b"a")).unwrap().unwrap();
            let b = idx.insert(&new_file(RUNS_INO, b"b")).unwrap().unwrap();
            for ino in [a, b] {
                idx.commit_file(ino, &h, 1, 1, 2, || true).unwrap();
            }
            let other = (engine.other)();
            let seen = other.get(a).unwrap().unwrap();
            assert_eq!((seen.state, seen.committed_open), (State::Live, true));
            // Released: queued, written with the next commit's transaction.
            idx.seal_later(a);
            assert!(other.get(a).unwrap().unwrap().committed_open);
            // ... while the daemon that released it reads it sealed at once.
            assert!(!idx.get(a).unwrap().unwrap().committed_open);
            let c = idx.insert(&new_file(RUNS_INO, b"c")).unwrap().unwrap();
            idx.commit_file(c, &h, 1, 1, 3, || true).unwrap();
            assert!(!other.get(a).unwrap().unwrap().committed_open);
            assert!(other.get(c).unwrap().unwrap().committed_open);
            // ... or by the tick.
            idx.seal_later(c);
            idx.seal_pending().unwrap();
            assert!(!other.get(c).unwrap().unwrap().committed_open);
            assert!(idx.pending_seals.borrow().is_empty());
            (a, b)
        };
        // A crash with b committed but still open: its close() returned, so it is kept, sealed.
        let idx = (engine.open)(9);
        let b = idx.get(b).unwrap().unwrap();
        assert_eq!(
            (b.state, b.committed_open, b.hash),
            (State::Live, false, Some(h))
        );
        assert!(!idx.get(a).unwrap().unwrap().committed_open);
    }

    #[test]
    fn a_hidden_directory_is_invisible_and_a_crash_drops_its_tree() {
        for engine in engines() {
            eprintln!("{}", engine.name);
            a_hidden_directory_is_invisible_in(&engine);
        }
    }

    fn a_hidden_directory_is_invisible_in(engine: &Engine) {
        let (hidden, shown) = {
            let idx = (engine.open)(1);
            let mk = |parent, name: &'static [u8], state| {
                let e = NewEntry {
                    state,
                    ..NewEntry::new_dir(parent, name, 3, 0o755, (0, 0), 1)
                };
                idx.insert(&e).unwrap().unwrap()
            };
            let hidden = mk(MODELS_INO, b"hidden", State::Writing);
            let below = mk(hidden, b"sub", State::Live);
            idx.insert(&NewEntry {
                state: State::Live,
                hash: Some(Hash::of(b"x")),
                ..new_file(below, b"f")
            })
            .unwrap()
            .unwrap();
            assert_eq!(idx.lookup(MODELS_INO, b"hidden").unwrap(), None);
            assert!(idx.children(MODELS_INO, 0, 10).unwrap().is_empty());
            // Its name is taken meanwhile.
            assert_eq!(
                idx.insert(&NewEntry::new_dir(
                    MODELS_INO,
                    b"hidden",
                    3,
                    0o755,
                    (0, 0),
                    1
                ))
                .unwrap(),
                None
            );
            let shown = mk(MODELS_INO, b"shown", State::Writing);
            mk(shown, b"sub", State::Live);
            assert!(idx.reveal_dir(shown).unwrap());
            assert_eq!(
                idx.lookup(MODELS_INO, b"shown").unwrap().unwrap().state,
                State::Live
            );
            (hidden, shown)
        };
        let idx = (engine.open)(2);
        assert_eq!(idx.get(hidden).unwrap(), None);
        assert_eq!(
            idx.file_rows().unwrap().len(),
            0,
            "the hidden tree's file is gone"
        );
        assert_eq!(idx.children(shown, 0, 10).unwrap().len(), 1);
    }

    #[test]
    fn writing_rows_are_dropped_on_open_and_names_are_unique() {
        for engine in engines() {
            eprintln!("{}", engine.name);
            writing_rows_are_dropped_in(&engine);
        }
    }

    fn writing_rows_are_dropped_in(engine: &Engine) {
        let hash = Hash([7; 32]);
        {
            let idx = (engine.open)(5);
            let a = idx.insert(&new_file(RUNS_INO, b"a")).unwrap().unwrap();
            assert!(idx.insert(&new_file(RUNS_INO, b"a")).unwrap().is_none());
            assert_eq!(
                idx.commit_file(a, &hash, 3, 9, 9, || true).unwrap(),
                Commit::Recorded
            );
            idx.insert(&new_file(RUNS_INO, b"half")).unwrap().unwrap();
        }
        let idx = (engine.open)(6);
        assert!(idx.lookup(RUNS_INO, b"half").unwrap().is_none());
        let a = idx.lookup(RUNS_INO, b"a").unwrap().unwrap();
        assert_eq!((a.state, a.hash, a.size), (State::Live, Some(hash), 3));
    }

    #[test]
    fn rename_leaves_a_tombstone_with_the_content() {
        for engine in engines() {
            eprintln!("{}", engine.name);
            rename_leaves_a_tombstone_in(&mut (engine.open)(5));
        }
    }

    fn rename_leaves_a_tombstone_in(idx: &mut Index) {
        let hash = Hash([1; 32]);
        let a = idx.insert(&new_file(RUNS_INO, b"a")).unwrap().unwrap();
        idx.commit_file(a, &hash, 1, 6, 6, || true).unwrap();
        assert!(idx.rename_file(a, RUNS_INO, b"b", 2, 7, true).unwrap());
        let old = idx.lookup(RUNS_INO, b"a").unwrap().unwrap();
        assert_eq!((old.state, old.hash), (State::Tombstone, Some(hash)));
        assert_eq!(idx.lookup(RUNS_INO, b"b").unwrap().unwrap().ino, a);
        // Renaming back onto the tombstone is refused.
        assert!(!idx.rename_file(a, RUNS_INO, b"a", 2, 8, true).unwrap());
        assert_eq!(idx.path_of(a).unwrap(), PathBuf::from("runs/b"));
        assert_eq!(idx.file_rows().unwrap().len(), 2);
    }

    /// Takes an OFD write lock on byte `byte` of the `-shm` file of the index in `dir` (a
    /// stand-in for another process's SQLite lock); returns the file holding it and `fcntl`'s
    /// result.
    fn lock_shm_byte(dir: &Path, byte: i64) -> (std::fs::File, i32) {
        use std::os::unix::io::AsRawFd;
        let shm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("index.sqlite-shm"))
            .unwrap();
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_WRLCK as _;
        lock.l_whence = libc::SEEK_SET as _;
        lock.l_start = byte;
        lock.l_len = 1;
        let rc = unsafe { libc::fcntl(shm.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
        (shm, rc)
    }

    /// Pages of `file` in the page cache that are dirty or under writeback (`cachestat(2)`,
    /// Linux 6.5+); `None` where the kernel lacks it.
    fn unsynced_pages(file: &std::fs::File) -> Option<u64> {
        use std::os::unix::io::AsRawFd;
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            nr_cache: u64,
            nr_dirty: u64,
            nr_writeback: u64,
            nr_evicted: u64,
            nr_recently_evicted: u64,
        }
        const SYS_CACHESTAT: libc::c_long = 451; // the same number on every architecture
        let range = Range { off: 0, len: 0 }; // the whole file
        let mut st = Stat::default();
        let rc = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                &range as *const Range,
                &mut st as *mut Stat,
                0u32,
            )
        };
        (rc == 0).then_some(st.nr_dirty + st.nr_writeback)
    }

    /// `sync` must leave nothing of the WAL unsynced even when a passive checkpoint cannot run
    /// because another connection is checkpointing — the daemon's tick does every 200 ms. The
    /// other checkpointer is stood in for by an OFD lock on SQLite's checkpoint lock byte
    /// (byte 121 of the `-shm` file: the unix VFS's lock base 120 plus `WAL_CKPT_LOCK` 1), which
    /// SQLite's own `fcntl` locks conflict with even within this process. Whether the WAL is
    /// synced is read from the page cache (`cachestat`): no dirty or writeback pages. (Power
    /// loss itself cannot be staged here; this checks the mechanism.)
    #[test]
    fn sync_makes_the_wal_durable_while_another_connection_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let idx = Index::open(&path, (0, 0), 5).unwrap();
        idx.no_auto_checkpoint().unwrap();
        let wal = std::fs::File::open(dir.path().join("index.sqlite-wal")).unwrap();
        if unsynced_pages(&wal).is_none() {
            panic!("this kernel has no cachestat(2); the test cannot observe the WAL's sync");
        }
        let (_shm, rc) = lock_shm_byte(dir.path(), 121);
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        let other = Index::open_checkpointer(&path).unwrap();
        for i in 0..50u32 {
            let name = format!("f{i}");
            let ino = idx
                .insert(&new_file(RUNS_INO, name.as_bytes()))
                .unwrap()
                .unwrap();
            idx.commit_file(ino, &Hash([i as u8; 32]), 1, 6, 6, || true)
                .unwrap();
        }
        // The stand-in holds the checkpoint lock: a passive checkpoint gives up.
        let busy: i64 = other
            .db
            .sqlite()
            .unwrap()
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(0))
            .unwrap();
        assert_eq!(busy, 1, "the checkpoint lock is not held");
        assert!(
            unsynced_pages(&wal).unwrap() > 0,
            "the commits left nothing unsynced in the WAL"
        );
        idx.sync().unwrap();
        assert_eq!(
            unsynced_pages(&wal).unwrap(),
            0,
            "Index::sync returned with WAL pages not on disk"
        );
    }

    /// Rows in the table at `(parent, name)`, whatever the reservations say.
    fn rows_at(idx: &Index, parent: u64, name: &[u8]) -> i64 {
        idx.db
            .sqlite()
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM entries WHERE parent = ?1 AND name = ?2",
                params![parent as i64, name],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// The table's own mtime and ctime of `ino`.
    fn table_times(idx: &Index, ino: u64) -> (i64, i64) {
        idx.db
            .sqlite()
            .unwrap()
            .query_row(
                "SELECT mtime, ctime FROM entries WHERE ino = ?1",
                [ino as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
    }

    /// A new file being written has no row: its name is reserved, read everywhere as a row in
    /// state `Writing` would be, and taken for every other insert.
    #[test]
    fn a_new_file_reserves_its_name_without_a_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.sqlite");
        let mut idx = Index::open(&path, (0, 0), 5).unwrap();
        let before = wal_commits(&path);
        let a = idx
            .insert_in_dir(&NewEntry::new_file(RUNS_INO, b"a", 2, 0o640, (7, 8), 10))
            .unwrap()
            .unwrap();
        assert_eq!(wal_commits(&path), before, "no transaction");
        assert_eq!(rows_at(&idx, RUNS_INO, b"a"), 0);
        let e = idx.get(a).unwrap().unwrap();
        assert_eq!(
            (e.state, e.kind, e.hash, e.size, e.mode, e.uid, e.gid),
            (State::Writing, Kind::File, None, 0, 0o640, 7, 8)
        );
        assert_eq!((e.mtime, e.ctime, e.crtime, e.atime), (10, 10, 10, 10));
        assert!(!e.committed_open);
        assert_eq!(idx.lookup(RUNS_INO, b"a").unwrap(), Some(e.clone()));
        assert_eq!(idx.get_checked(a).unwrap(), Some((e.clone(), false)));
        assert_eq!(idx.path_of(a).unwrap(), PathBuf::from("runs/a"));
        assert_eq!(idx.resolve(Path::new("runs/a")).unwrap(), Some(e.clone()));
        // The directory shows the new name's time at once; the table takes it with the row.
        let runs = idx.get(RUNS_INO).unwrap().unwrap();
        assert_eq!((runs.mtime, runs.ctime), (10, 10));
        assert_eq!(table_times(&idx, RUNS_INO), (5, 5));
        // Taken for every kind of insert.
        assert_eq!(idx.insert(&new_file(RUNS_INO, b"a")).unwrap(), None);
        assert_eq!(
            idx.insert_in_dir(&NewEntry::new_dir(RUNS_INO, b"a", 3, 0o755, (0, 0), 11))
                .unwrap(),
            None
        );
        let sealed = NewEntry {
            state: State::Live,
            hash: Some(Hash([1; 32])),
            ..new_file(RUNS_INO, b"a")
        };
        assert_eq!(idx.insert(&sealed).unwrap(), None);
        assert_eq!(idx.insert_many(std::slice::from_ref(&sealed)).unwrap(), 0);
        assert_eq!(idx.get(a).unwrap(), Some(e));
        // ... and a name taken by a row (a tombstone, a hidden directory) is not reserved.
        let hidden = idx
            .insert(&NewEntry {
                state: State::Writing,
                ..NewEntry::new_dir(RUNS_INO, b"hidden", 3, 0o755, (0, 0), 1)
            })
            .unwrap()
            .unwrap();
        assert_eq!(idx.insert(&new_file(RUNS_INO, b"hidden")).unwrap(), None);
        assert_eq!(idx.get(hidden).unwrap().unwrap().kind, Kind::Dir);
        // chmod, utimens of the file being written change the reservation.
        idx.change_meta(
            a,
            &MetaChange {
                mode: Some(0o600),
                mtime: Some(3),
                ctime: 12,
                ..Default::default()
            },
        )
        .unwrap();
        let e = idx.get(a).unwrap().unwrap();
        assert_eq!((e.mode, e.mtime, e.ctime, e.atime), (0o600, 3, 12, 10));
        assert_eq!(rows_at(&idx, RUNS_INO, b"a"), 0);
        // A utimens of the directory after the new name wins over the name's time.
        idx.change_meta(
            RUNS_INO,
            &MetaChange {
                mtime: Some(2),
                ctime: 13,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(table_times(&idx, RUNS_INO), (2, 13));
        let runs = idx.get(RUNS_INO).unwrap().unwrap();
        assert_eq!((runs.mtime, runs.ctime), (2, 13));
    }

    /// `readdir` pages by inode number: reserved files and rows come in one inode order, pages
    /// of any size add up to the whole listing, and `rmdir` sees a reserved file.
    #[test]
    fn a_listing_merges_reserved_files_and_rows_in_inode_order() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(&dir.path().join("i.sqlite"), (0, 0), 5).unwrap();
        let d = idx
            .insert(&NewEntry::new_dir(RUNS_INO, b"d", 3, 0o755, (0, 0), 1))
            .unwrap()
            .unwrap();
        assert!(idx.children(d, 0, 10).unwrap().is_empty());
        let mut expect = Vec::new();
        for i in 0..9u8 {
            let name = [b'n', b'0' + i];
            let ino = if i % 3 == 0 {
                idx.insert(&NewEntry::new_dir(d, &name, 3, 0o755, (0, 0), 1))
            } else {
                idx.insert(&new_file(d, &name))
            };
            expect.push(ino.unwrap().unwrap());
            if i == 4 {
                // A committed file (a row) between reserved ones.
                idx.commit_file(expect[4], &Hash([4; 32]), 1, 1, 2, || true)
                    .unwrap();
            }
        }
        // A reserved file elsewhere is not listed here.
        idx.insert(&new_file(RUNS_INO, b"elsewhere")).unwrap();
        let all: Vec<u64> = idx
            .children(d, 0, 100)
            .unwrap()
            .iter()
            .map(|e| e.ino)
            .collect();
        assert_eq!(all, expect);
        assert!(expect.windows(2).all(|w| w[0] < w[1]));
        for page in 1..=4 {
            let mut got = Vec::new();
            let mut after = 0;
            loop {
                let batch = idx.children(d, after, page).unwrap();
                assert!(batch.len() <= page);
                let Some(last) = batch.last() else { break };
                after = last.ino;
                got.extend(batch.iter().map(|e| e.ino));
            }
            assert_eq!(got, expect, "pages of {page}");
        }
        let states: Vec<State> = idx
            .children(d, 0, 100)
            .unwrap()
            .iter()
            .map(|e| e.state)
            .collect();
        assert_eq!(states.iter().filter(|s| **s == State::Writing).count(), 5);
        assert_eq!(idx.descendants(d).unwrap().len(), 9);
        // A directory holding only a reserved file is not empty.
        let e = idx
            .insert(&NewEntry::new_dir(RUNS_INO, b"e", 3, 0o755, (0, 0), 1))
            .unwrap()
            .unwrap();
        let f = idx.insert(&new_file(e, b"f")).unwrap().unwrap();
        assert_eq!(idx.children(e, 0, 2).unwrap()[0].ino, f);
        assert_eq!(idx.descendants(e).unwrap()[0].0, b"f".to_vec());
    }

    /// The first commit of a new file inserts its row in the one transaction that records its
    /// content (its directory's new times follow with the periodic work); later commits update
    /// the row.
    #[test]
    fn the_first_commit_inserts_the_row_in_its_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.sqlite");
        let idx = Index::open(&path, (0, 0), 5).unwrap();
        let h = Hash([9; 32]);
        let a = idx
            .insert_in_dir(&NewEntry::new_file(RUNS_INO, b"a", 2, 0o640, (7, 8), 10))
            .unwrap()
            .unwrap();
        let before = wal_commits(&path);
        assert_eq!(
            idx.commit_file(a, &h, 3, 11, 12, || true).unwrap(),
            Commit::Recorded
        );
        assert_eq!(wal_commits(&path), before + 1);
        assert!(idx.reserved(a).is_none(), "the reservation is gone");
        assert_eq!(
            idx.get(RUNS_INO).unwrap().unwrap().mtime,
            10,
            "read at once"
        );
        idx.seal_pending().unwrap();
        assert_eq!(table_times(&idx, RUNS_INO), (10, 10));
        let other = Index::open_readonly(&path).unwrap();
        let row = other.get(a).unwrap().unwrap();
        assert_eq!(
            (row.state, row.committed_open, row.hash, row.size, row.mode),
            (State::Live, true, Some(h), 3, 0o640)
        );
        assert_eq!(
            (
                row.uid, row.gid, row.mtime, row.ctime, row.crtime, row.atime
            ),
            (7, 8, 11, 12, 10, 10)
        );
        assert_eq!(idx.get(a).unwrap(), Some(row));
        // A later commit of the same file updates its row.
        let h2 = Hash([10; 32]);
        idx.mark_rewriting(a, false).unwrap();
        idx.commit_file(a, &h2, 4, 13, 14, || true).unwrap();
        let row = other.get(a).unwrap().unwrap();
        assert_eq!((row.hash, row.size, row.ctime), (Some(h2), 4, 14));
        assert_eq!(rows_at(&idx, RUNS_INO, b"a"), 1);
    }

    /// A first commit that does not happen (the index locked by another process, the blob
    /// gone) keeps the reservation: nothing was recorded, and the commit can be tried again.
    #[test]
    fn a_first_commit_that_fails_keeps_the_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.sqlite");
        let idx = Index::open(&path, (0, 0), 5).unwrap();
        idx.set_busy_timeout(Duration::ZERO).unwrap();
        let h = Hash([9; 32]);
        let a = idx.insert(&new_file(RUNS_INO, b"a")).unwrap().unwrap();
        let reserved = idx.get(a).unwrap().unwrap();
        assert_eq!(
            idx.commit_file(a, &h, 3, 6, 6, || false).unwrap(),
            Commit::BlobMissing
        );
        assert_eq!(idx.get(a).unwrap().as_ref(), Some(&reserved));
        // Another connection holds the write lock: the commit fails, the file stays reserved.
        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let err = idx.commit_file(a, &h, 3, 6, 6, || true).unwrap_err();
        assert!(is_busy(&err), "{err}");
        holder.execute_batch("ROLLBACK").unwrap();
        assert_eq!(idx.get(a).unwrap().as_ref(), Some(&reserved));
        assert_eq!(rows_at(&idx, RUNS_INO, b"a"), 0);
        // A failure inside the transaction (the row's insert) rolls everything back too.
        idx.db
            .sqlite()
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER no_rows BEFORE INSERT ON entries
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
        idx.seal_later(RUNS_INO);
        assert!(idx.commit_file(a, &h, 3, 6, 6, || true).is_err());
        assert_eq!(idx.get(a).unwrap().as_ref(), Some(&reserved));
        assert_eq!(idx.pending_seals.borrow().len(), 1, "the seal stays queued");
        idx.db
            .sqlite()
            .unwrap()
            .execute_batch("DROP TRIGGER no_rows")
            .unwrap();
        assert_eq!(
            idx.commit_file(a, &h, 3, 6, 7, || true).unwrap(),
            Commit::Recorded
        );
        assert_eq!(rows_at(&idx, RUNS_INO, b"a"), 1);
        assert!(idx.pending_seals.borrow().is_empty());
    }

    /// Rows and reservations take their inode numbers from one counter, and no number comes
    /// back after a restart: neither one a row had, nor one a reservation had before the last
    /// commit (or a clean stop).
    #[test]
    fn inode_numbers_are_never_reused_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.sqlite");
        let h = Hash([9; 32]);
        let mut handed_out = std::collections::BTreeSet::new();
        let mut take = |ino: u64| assert!(handed_out.insert(ino), "inode {ino} handed out twice");
        {
            let idx = Index::open(&path, (0, 0), 5).unwrap();
            let a = idx.insert(&new_file(RUNS_INO, b"a")).unwrap().unwrap();
            take(a);
            let d = idx
                .insert(&NewEntry::new_dir(RUNS_INO, b"d", 3, 0o755, (0, 0), 1))
                .unwrap()
                .unwrap();
            take(d);
            let b = idx.insert(&new_file(RUNS_INO, b"b")).unwrap().unwrap();
            take(b);
            idx.unlink_unsealed(b, 6).unwrap();
            // A row deleted (a dropped draft) keeps its number too.
            let c = idx
                .insert(&NewEntry::new_dir(RUNS_INO, b"c", 3, 0o755, (0, 0), 1))
                .unwrap()
                .unwrap();
            take(c);
            idx.commit_file(a, &h, 1, 6, 6, || true).unwrap();
            // The tombstone a rename leaves takes a number of its own.
            assert!(idx.rename_file(a, d, b"a", 3, 7, true).unwrap());
            take(idx.lookup(RUNS_INO, b"a").unwrap().unwrap().ino);
            idx.delete_row(c).unwrap();
            // Reserved after the last commit: only a clean stop keeps its number.
            let e = idx.insert(&new_file(RUNS_INO, b"e")).unwrap().unwrap();
            take(e);
            idx.seal_all_committed().unwrap();
        }
        for round in 0..2 {
            let idx = Index::open(&path, (0, 0), 8).unwrap();
            let f = idx.insert(&new_file(RUNS_INO, b"f")).unwrap().unwrap();
            take(f);
            let name = format!("g{round}");
            let g = idx
                .insert(&NewEntry::new_dir(
                    RUNS_INO,
                    name.as_bytes(),
                    3,
                    0o755,
                    (0, 0),
                    1,
                ))
                .unwrap()
                .unwrap();
            take(g);
            // f is dropped at the reopen; the row inserted after it keeps its number from reuse.
        }
    }

    /// A reserved file renamed moves its reservation (no tombstone: it has no content); one
    /// removed or abandoned leaves no trace, and its name is free again.
    #[test]
    fn a_reserved_file_renames_and_unlinks_without_a_trace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.sqlite");
        let idx = Index::open(&path, (0, 0), 5).unwrap();
        let d = idx
            .insert(&NewEntry::new_dir(RUNS_INO, b"d", 3, 0o755, (0, 0), 1))
            .unwrap()
            .unwrap();
        let a = idx.insert(&new_file(RUNS_INO, b"a")).unwrap().unwrap();
        let taken = idx
            .insert(&NewEntry::new_dir(d, b"taken", 3, 0o755, (0, 0), 1))
            .unwrap()
            .unwrap();
        let before = wal_commits(&path);
        assert!(!idx.rename_file(a, d, b"taken", 3, 20, true).unwrap());
        assert!(idx.rename_file(a, d, b"b", 4, 21, true).unwrap());
        assert_eq!(wal_commits(&path), before, "no transaction");
        assert_eq!(idx.lookup(RUNS_INO, b"a").unwrap(), None);
        assert_eq!(rows_at(&idx, RUNS_INO, b"a"), 0, "no tombstone");
        let b = idx.lookup(d, b"b").unwrap().unwrap();
        assert_eq!(
            (b.ino, b.zone, b.ctime, b.state),
            (a, 4, 21, State::Writing)
        );
        assert_eq!(idx.path_of(a).unwrap(), PathBuf::from("runs/d/b"));
        for ino in [RUNS_INO, d] {
            let e = idx.get(ino).unwrap().unwrap();
            assert_eq!((e.mtime, e.ctime), (21, 21));
        }
        // The old name is free; the new one is taken, for rows too.
        assert!(idx.insert(&new_file(RUNS_INO, b"a")).unwrap().is_some());
        assert_eq!(idx.insert(&new_file(d, b"b")).unwrap(), None);
        // A row renamed onto a reserved name is refused, and nothing changes.
        let c = idx.insert(&new_file(RUNS_INO, b"c")).unwrap().unwrap();
        idx.commit_file(c, &Hash([3; 32]), 1, 1, 22, || true)
            .unwrap();
        assert!(!idx.rename_file(c, d, b"b", 3, 23, true).unwrap());
        assert_eq!(idx.lookup(RUNS_INO, b"c").unwrap().unwrap().ino, c);
        assert_eq!(idx.get(taken).unwrap().unwrap().parent, d);
        // Committed at its new place.
        idx.commit_file(a, &Hash([1; 32]), 1, 1, 24, || true)
            .unwrap();
        assert_eq!(idx.lookup(d, b"b").unwrap().unwrap().ino, a);
        assert_eq!(rows_at(&idx, d, b"b"), 1);
        // Removed before any commit: gone without a trace, the name free again.
        let e = idx.insert(&new_file(d, b"e")).unwrap().unwrap();
        idx.unlink_unsealed(e, 30).unwrap();
        assert_eq!(idx.get(e).unwrap(), None);
        assert_eq!(idx.lookup(d, b"e").unwrap(), None);
        let dd = idx.get(d).unwrap().unwrap();
        assert_eq!((dd.mtime, dd.ctime), (30, 30));
        assert_eq!(
            idx.commit_file(e, &Hash([1; 32]), 1, 1, 31, || true)
                .unwrap(),
            Commit::Gone
        );
        assert_eq!(rows_at(&idx, d, b"e"), 0);
        let e2 = idx.insert(&new_file(d, b"e")).unwrap().unwrap();
        assert!(e2 > e);
        idx.abandon_write(e2).unwrap();
        assert_eq!(idx.get(e2).unwrap(), None);
        let e3 = idx.insert(&new_file(d, b"e")).unwrap().unwrap();
        idx.delete_row(e3).unwrap();
        assert_eq!(idx.lookup(d, b"e").unwrap(), None);
        // A tombstone made of a reserved file takes the name forever, without content.
        let t = idx.insert(&new_file(d, b"t")).unwrap().unwrap();
        idx.tombstone(t, 40).unwrap();
        let row = idx.lookup(d, b"t").unwrap().unwrap();
        assert_eq!((row.ino, row.state, row.hash), (t, State::Tombstone, None));
        assert_eq!(idx.insert(&new_file(d, b"t")).unwrap(), None);
        // A crash (a reopen) drops the reservations left.
        let left = idx.insert(&new_file(d, b"left")).unwrap().unwrap();
        drop(idx);
        let idx = Index::open(&path, (0, 0), 50).unwrap();
        assert_eq!(idx.get(left).unwrap(), None);
        assert_eq!(idx.lookup(d, b"left").unwrap(), None);
        assert_eq!(idx.lookup(d, b"b").unwrap().unwrap().ino, a);
    }
}
