//! What only a PostgreSQL index has: its schema, the sessions of the daemons that write to it,
//! and inode numbers handed out in blocks.
//!
//! Several daemons (one a machine) write one PostgreSQL index. Each open starts a *session* (a
//! row of `sessions`, with the machine's identity and a heartbeat); the connection names it in
//! the setting `artifactfs.session`, and a trigger stamps it on every row a write leaves in a
//! state that belongs to a living daemon (being written, committed while still open). A session
//! ends cleanly with its daemon; a daemon that died leaves its rows behind, and they are cleaned
//! up as the embedded index cleans up at a start: by the same machine's next start, or by any
//! daemon once the session's heartbeat is older than [`LEASE`] (by the server's clock). The
//! session and its rows go in one transaction; a daemon that was stalled for longer (SIGSTOP)
//! finds its session gone at its next heartbeat or commit: what it was writing fails with
//! `EIO` (a commit only changes a row still stamped with the writer's session), and it starts
//! a new session for what comes next.
//!
//! Inode numbers come from the sequence `inos` in blocks of [`INO_BLOCK`]: each daemon hands
//! out the numbers of its block, so creates need no round trip for them, and numbers are never
//! handed out twice across daemons.
//!
//! Every change of a row that the mounts show is announced to the other daemons: triggers on
//! `entries` and on the registry's tables `NOTIFY` the store's channel (PostgreSQL delivers a
//! notification at its transaction's commit, never for a rollback), whoever made the change —
//! a daemon, `gc`, `fsck`, `migrate`, a cleanup after a dead session. Each daemon's
//! [`Listener`] hears them on a connection of its own and hands them up as [`Change`]s.

use std::io;
use std::time::Duration;

use rusqlite::params;

use super::db::Db;
use super::{MODELS_INO, ROOT_INO, RUNS_INO};

/// The PostgreSQL schema's version, in `meta`. 2: the triggers that announce changes
/// ([`NOTIFY_SCHEMA`]); 3: the piece states of large contents ([`PIECE_STATES`]); 4: each
/// entry's generation ([`GENERATIONS`]). A daemon upgrades an index of an earlier version by
/// adding what it lacks.
pub const SCHEMA_VERSION: i64 = 4;

/// Each entry's generation (see `Entry::generation`).
const GENERATIONS: &str = "ALTER TABLE entries ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;";

/// The table of piece states (see `crate::store::pieces`).
const PIECE_STATES: &str = "CREATE TABLE piece_states (hash TEXT PRIMARY KEY, piece BIGINT NOT NULL, states BYTEA NOT NULL);";

/// The channel the index's triggers announce changes on: one per schema, so that stores in
/// other schemas of the same database (the index's unit tests) do not hear each other's (a
/// channel's name is at most 63 bytes: a number stands for the schema's name).
const CHANNEL: &str = "'artifactfs_' || hashtext(current_schema())";

/// The triggers that announce each change (see [`parse_change`] for the payload). A row of
/// `entries` tells its inode, whether its content changed, and the `(parent, name)` pairs whose
/// lookup changed: the row's own for an insert or a delete, the old and new ones for a rename,
/// the row's for an update that makes it a tombstone or a tombstone no more (the lookup shows
/// it, or no longer); an update of anything else (a seal, times, the mode) names no pair. A
/// registry row tells the registry directories it shows in (the model's directory, a version's
/// directory). Names are hex in the payload: at most 255 bytes, so a payload stays far below
/// PostgreSQL's limit of 8,000 bytes.
const NOTIFY_SCHEMA: &str = "
CREATE FUNCTION artifactfs_notify_entry() RETURNS trigger LANGUAGE plpgsql AS $f$
DECLARE
    msg TEXT;
BEGIN
    IF TG_OP = 'INSERT' THEN
        msg := NEW.ino || ' 1 ' || NEW.parent || ' ' || encode(NEW.name, 'hex');
    ELSIF TG_OP = 'DELETE' THEN
        msg := OLD.ino || ' 1 ' || OLD.parent || ' ' || encode(OLD.name, 'hex');
    ELSE
        msg := NEW.ino || CASE WHEN OLD.hash IS DISTINCT FROM NEW.hash THEN ' 1' ELSE ' 0' END;
        IF OLD.parent <> NEW.parent OR OLD.name <> NEW.name THEN
            msg := msg || ' ' || OLD.parent || ' ' || encode(OLD.name, 'hex')
                       || ' ' || NEW.parent || ' ' || encode(NEW.name, 'hex');
        ELSIF (OLD.state = 1) <> (NEW.state = 1) THEN
            msg := msg || ' ' || NEW.parent || ' ' || encode(NEW.name, 'hex');
        END IF;
    END IF;
    IF current_setting('artifactfs.through_kernel', true) = 'on' THEN
        msg := 'k ' || msg;
    END IF;
    PERFORM pg_notify('artifactfs_' || hashtext(current_schema()), msg);
    RETURN NULL;
END $f$;
CREATE TRIGGER entries_notify AFTER INSERT OR UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION artifactfs_notify_entry();
CREATE FUNCTION artifactfs_notify_dirs() RETURNS trigger LANGUAGE plpgsql AS $f$
DECLARE
    r JSONB;
    i INT;
BEGIN
    FOR i IN 0 .. TG_NARGS - 1 LOOP
        IF TG_OP <> 'INSERT' THEN
            r := to_jsonb(OLD);
            IF r ->> TG_ARGV[i] IS NOT NULL THEN
                PERFORM pg_notify('artifactfs_' || hashtext(current_schema()),
                                  (r ->> TG_ARGV[i]) || ' 0');
            END IF;
        END IF;
        IF TG_OP <> 'DELETE' THEN
            r := to_jsonb(NEW);
            IF r ->> TG_ARGV[i] IS NOT NULL THEN
                PERFORM pg_notify('artifactfs_' || hashtext(current_schema()),
                                  (r ->> TG_ARGV[i]) || ' 0');
            END IF;
        END IF;
    END LOOP;
    RETURN NULL;
END $f$;
CREATE TRIGGER registered_models_notify AFTER INSERT OR UPDATE OR DELETE ON registered_models
    FOR EACH ROW EXECUTE FUNCTION artifactfs_notify_dirs('ino');
CREATE TRIGGER model_versions_notify AFTER INSERT OR UPDATE OR DELETE ON model_versions
    FOR EACH ROW EXECUTE FUNCTION artifactfs_notify_dirs('model_ino', 'dir_ino');
CREATE TRIGGER model_aliases_notify AFTER INSERT OR UPDATE OR DELETE ON model_aliases
    FOR EACH ROW EXECUTE FUNCTION artifactfs_notify_dirs('model_ino');
";

/// How many inode numbers a daemon takes from the sequence at a time.
pub const INO_BLOCK: u64 = 1024;

/// How long a session lives without a heartbeat before other daemons clean up after it.
pub const LEASE: Duration = Duration::from_secs(30);

/// The lease in force: [`LEASE`], unless the test-only environment variable
/// `ARTIFACTFS_TEST_LEASE_MS` shortens it (the tests of a stalled daemon do not wait 30 s). Not
/// for production: every daemon of a store must use the same lease.
pub fn lease() -> Duration {
    static LEASE_IN_FORCE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *LEASE_IN_FORCE.get_or_init(|| {
        std::env::var("ARTIFACTFS_TEST_LEASE_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(LEASE, |ms| Duration::from_millis(ms.max(100)))
    })
}

/// How often a daemon tells the index it is alive: a sixth of the lease (5 s), so that a few
/// heartbeats may fail or come late before the lease runs out.
pub fn heartbeat_interval() -> Duration {
    lease() / 6
}

/// The server's clock in nanoseconds since the epoch: heartbeats are stamped, and leases
/// judged, by one clock (the machines' clocks may disagree).
const SERVER_NOW: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000000)::BIGINT";

/// Creates the schema on first use (with `create`), or checks its version.
pub fn prepare_schema(db: &Db, create: Option<((u32, u32), i64)>) -> io::Result<()> {
    db.begin_write()?;
    let result = create_or_check(db, create);
    match &result {
        Ok(()) => db.commit()?,
        Err(_) => {
            let _ = db.rollback();
        }
    }
    result
}

fn create_or_check(db: &Db, create: Option<((u32, u32), i64)>) -> io::Result<()> {
    let exists: i64 = db.row(
        "SELECT COUNT(*) FROM information_schema.tables
         WHERE table_schema = current_schema() AND table_name = 'meta'",
        params![],
        |r| r.get(0),
    )?;
    if exists == 1 {
        let version: Option<i64> = db.one(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            params![],
            |r| r.get(0),
        )?;
        return match version {
            Some(SCHEMA_VERSION) => Ok(()),
            // Version 1 lacks the triggers that announce changes, 2 the piece states, 3 the
            // generations: a daemon adds them.
            Some(v @ (1..=3)) if create.is_some() => {
                if v == 1 {
                    db.batch(NOTIFY_SCHEMA)?;
                    db.batch(&functions_schema())?;
                    db.batch(INLINE_STORAGE)?;
                }
                if v <= 2 {
                    db.batch(PIECE_STATES)?;
                }
                db.batch(GENERATIONS)?;
                db.exec(
                    "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
                    params![SCHEMA_VERSION],
                )?;
                log::info!("index schema upgraded from version {v} to {SCHEMA_VERSION}");
                Ok(())
            }
            Some(v) if v > SCHEMA_VERSION => Err(io::Error::other(format!(
                "index schema version {v} is newer than this artifactfs ({SCHEMA_VERSION}): \
                 upgrade artifactfs on this machine"
            ))),
            Some(v @ (1..=3)) => Err(io::Error::other(format!(
                "index schema version {v}: this artifactfs reads {SCHEMA_VERSION}; the next \
                 mount of a daemon upgrades it"
            ))),
            Some(v) => Err(io::Error::other(format!(
                "index schema version {v}: this artifactfs reads {SCHEMA_VERSION}"
            ))),
            None => Err(io::Error::other(
                "index: the database has a table `meta` without a schema version: \
                 not an artifactfs index",
            )),
        };
    }
    let Some(((uid, gid), now)) = create else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no artifactfs index in this database yet: a daemon creates it at its first mount",
        ));
    };
    db.batch(&format!(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
         CREATE SEQUENCE inos AS BIGINT START WITH {INO_BLOCK} INCREMENT BY {INO_BLOCK};
         CREATE TABLE sessions (
             id        BIGSERIAL PRIMARY KEY,
             machine   TEXT   NOT NULL,
             host      TEXT   NOT NULL,
             pid       BIGINT NOT NULL,
             started   BIGINT NOT NULL,
             heartbeat BIGINT NOT NULL
         );
         CREATE TABLE entries (
             ino     BIGINT PRIMARY KEY,
             parent  BIGINT NOT NULL,
             name    BYTEA  NOT NULL,
             kind    BIGINT NOT NULL,
             state   BIGINT NOT NULL,
             zone    BIGINT NOT NULL,
             hash    TEXT,
             size    BIGINT NOT NULL DEFAULT 0,
             mode    BIGINT NOT NULL,
             uid     BIGINT NOT NULL,
             gid     BIGINT NOT NULL,
             mtime   BIGINT NOT NULL,
             ctime   BIGINT NOT NULL,
             crtime  BIGINT NOT NULL,
             atime   BIGINT NOT NULL DEFAULT 0,
             session BIGINT,
             generation BIGINT NOT NULL DEFAULT 0,
             UNIQUE (parent, name)
         );
         CREATE INDEX entries_by_parent ON entries (parent, ino);
         CREATE INDEX entries_by_hash ON entries (hash);
         CREATE INDEX entries_by_session ON entries (session) WHERE session IS NOT NULL;
         CREATE FUNCTION artifactfs_stamp_session() RETURNS trigger LANGUAGE plpgsql AS $f$
         BEGIN
             IF NEW.state IN (2, 3, 4) THEN
                 NEW.session := NULLIF(current_setting('artifactfs.session', true), '')::BIGINT;
             ELSE
                 NEW.session := NULL;
             END IF;
             RETURN NEW;
         END $f$;
         CREATE TRIGGER entries_session BEFORE INSERT OR UPDATE OF state ON entries
             FOR EACH ROW EXECUTE FUNCTION artifactfs_stamp_session();
         INSERT INTO entries (ino, parent, name, kind, state, zone, hash, size, mode, uid, gid,
                              mtime, ctime, crtime, atime) VALUES
             ({ROOT_INO}, 0, '\\x'::BYTEA, 1, 0, 0, NULL, 0, 493, {uid}, {gid},
              {now}, {now}, {now}, {now}),
             ({RUNS_INO}, {ROOT_INO}, convert_to('runs', 'UTF8'), 1, 0, 0, NULL, 0, 493,
              {uid}, {gid}, {now}, {now}, {now}, {now}),
             ({MODELS_INO}, {ROOT_INO}, convert_to('models', 'UTF8'), 1, 0, 0, NULL, 0, 493,
              {uid}, {gid}, {now}, {now}, {now}, {now});
         CREATE TABLE registered_models (
             ino          BIGINT PRIMARY KEY,
             name         TEXT   NOT NULL UNIQUE,
             next_version BIGINT NOT NULL DEFAULT 1,
             created      BIGINT NOT NULL
         );
         CREATE TABLE model_versions (
             dir_ino          BIGINT PRIMARY KEY,
             model_ino        BIGINT NOT NULL,
             version          BIGINT,
             status           TEXT   NOT NULL,
             message          TEXT   NOT NULL DEFAULT '',
             run_id           TEXT,
             artifact_path    TEXT,
             model_uuid       TEXT,
             model_id         TEXT,
             flavors          TEXT,
             signature        TEXT,
             utc_time_created TEXT,
             total_size       BIGINT,
             file_count       BIGINT,
             digest           TEXT,
             source           TEXT,
             updated          BIGINT NOT NULL,
             UNIQUE (model_ino, version)
         );
         CREATE INDEX model_versions_by_model ON model_versions (model_ino, status);
         CREATE TABLE model_aliases (
             model_ino BIGINT NOT NULL,
             alias     TEXT   NOT NULL,
             version   BIGINT NOT NULL,
             PRIMARY KEY (model_ino, alias)
         );
         CREATE TABLE damaged_blobs (hash TEXT PRIMARY KEY, found BIGINT NOT NULL);
         CREATE TABLE history (
             rowid    BIGSERIAL PRIMARY KEY,
             ino      BIGINT NOT NULL,
             hash     TEXT   NOT NULL,
             size     BIGINT NOT NULL,
             mtime    BIGINT NOT NULL,
             replaced BIGINT NOT NULL
         );
         CREATE INDEX history_by_ino ON history (ino, replaced);
         CREATE INDEX history_by_hash ON history (hash);
         CREATE TABLE inline_content (hash TEXT PRIMARY KEY, data BYTEA NOT NULL);
         {INLINE_STORAGE}
         {PIECE_STATES}
         {NOTIFY_SCHEMA}
         {functions}
         INSERT INTO meta VALUES ('schema_version', {SCHEMA_VERSION});",
        functions = functions_schema()
    ))
}

/// How small contents are kept: a row of up to a page (8,160 bytes) stays in the table's own
/// page instead of going to TOAST storage, and a larger one goes there uncompressed (artifact
/// bytes rarely compress, and the attempt cost each 4 KiB content 0.45 ms of the server's time,
/// against 0.1 ms now: measured on this VM with `pg_stat_statements`).
const INLINE_STORAGE: &str = "
    ALTER TABLE inline_content SET (toast_tuple_target = 8160);
    ALTER TABLE inline_content ALTER COLUMN data SET STORAGE EXTERNAL;";

/// The two changes a daemon makes for every small file, as server functions (their
/// transactions mark their notifications `k `, *through the kernel*: the daemon that made them
/// has its kernel invalidate nothing for them, since that kernel made the change itself: a
/// created name and its directory, a file's commit, and the seals of files it released, which
/// change no attribute the kernel keeps; measured: ~5 invalidations a small file less, each a
/// write to `/dev/fuse` and a lookup the kernel makes again): one prepared
/// statement each, one round trip, planned once per connection (PL/pgSQL keeps its plans),
/// where the same statements sent as text cost twice the time (measured with pgbench on this
/// VM: 0.21 against 0.47 ms for a create). Both take the write lock first (as
/// `Db::begin_write` does), with the lock timeout the caller passes (negative: the session's).
///
/// - `artifactfs_create`: the row of a new entry, unless its `(parent, name)` is taken, and
///   its directory's times; not waited for on the server's disk (see `Index::insert_in_dir`).
///   Returns 1 if the row went in, plus 2 if the directory was touched.
/// - `artifactfs_commit_inline`: a small file's commit (see `Index::commit_file_with`): the
///   seals queued (`seals`, inode numbers separated by commas), the row (only while not a
///   tombstone and, with a session, still stamped with it), its inline content, healing it if
///   `damaged`. Returns 1 if the row took the content, 0 if not (nothing else changes then but
///   the seals).
fn functions_schema() -> String {
    let key = super::db::WRITE_LOCK_KEY;
    format!(
        "CREATE OR REPLACE FUNCTION artifactfs_create(
             p_lock_ms BIGINT, p_ino BIGINT, p_parent BIGINT, p_name BYTEA, p_kind BIGINT,
             p_state BIGINT, p_zone BIGINT, p_hash TEXT, p_size BIGINT, p_mode BIGINT,
             p_uid BIGINT, p_gid BIGINT, p_t BIGINT) RETURNS BIGINT LANGUAGE plpgsql AS $f$
         DECLARE inserted BIGINT; touched BIGINT := 0;
         BEGIN
             IF p_lock_ms >= 0 THEN
                 PERFORM set_config('lock_timeout', p_lock_ms::TEXT, true);
             END IF;
             PERFORM set_config('synchronous_commit', 'off', true);
             PERFORM set_config('artifactfs.through_kernel', 'on', true);
             PERFORM pg_advisory_xact_lock({key});
             INSERT INTO entries (ino, parent, name, kind, state, zone, hash, size, mode, uid,
                                  gid, mtime, ctime, crtime, atime)
                 VALUES (p_ino, p_parent, p_name, p_kind, p_state, p_zone, p_hash, p_size,
                         p_mode, p_uid, p_gid, p_t, p_t, p_t, p_t)
                 ON CONFLICT DO NOTHING;
             GET DIAGNOSTICS inserted = ROW_COUNT;
             IF inserted = 1 THEN
                 UPDATE entries SET mtime = p_t, ctime = p_t WHERE ino = p_parent AND kind = 1;
                 GET DIAGNOSTICS touched = ROW_COUNT;
             END IF;
             RETURN inserted + 2 * touched;
         END $f$;
         CREATE OR REPLACE FUNCTION artifactfs_commit_inline(
             p_lock_ms BIGINT, p_seals TEXT, p_ino BIGINT, p_hash TEXT, p_size BIGINT,
             p_mtime BIGINT, p_now BIGINT, p_session BIGINT, p_data BYTEA, p_damaged BIGINT)
             RETURNS BIGINT LANGUAGE plpgsql AS $f$
         DECLARE n BIGINT;
         BEGIN
             IF p_lock_ms >= 0 THEN
                 PERFORM set_config('lock_timeout', p_lock_ms::TEXT, true);
             END IF;
             PERFORM set_config('artifactfs.through_kernel', 'on', true);
             PERFORM pg_advisory_xact_lock({key});
             IF p_seals <> '' THEN
                 UPDATE entries SET state = 0
                     WHERE ino = ANY (string_to_array(p_seals, ',')::BIGINT[]) AND state = 4;
             END IF;
             UPDATE entries SET hash = p_hash, size = p_size, mtime = p_mtime, ctime = p_now,
                     state = 4
                 WHERE ino = p_ino AND state <> 1 AND (p_session = 0 OR session = p_session);
             GET DIAGNOSTICS n = ROW_COUNT;
             IF n = 1 AND p_damaged = 1 THEN
                 INSERT INTO inline_content (hash, data) VALUES (p_hash, p_data)
                     ON CONFLICT (hash) DO UPDATE SET data = excluded.data;
                 DELETE FROM damaged_blobs WHERE hash = p_hash;
             ELSIF n = 1 THEN
                 INSERT INTO inline_content (hash, data) VALUES (p_hash, p_data)
                     ON CONFLICT (hash) DO NOTHING;
             END IF;
             RETURN n;
         END $f$;"
    )
}

/// Starts this daemon's session; returns its id. The connection names it from now on, also
/// after a reconnect (a session started again replaces the one before).
pub fn start_session(db: &Db, machine: &str) -> io::Result<i64> {
    let host = hostname();
    let id: i64 = db.row(
        &format!(
            "INSERT INTO sessions (machine, host, pid, started, heartbeat)
             VALUES (?1, ?2, ?3, {SERVER_NOW}, {SERVER_NOW}) RETURNING id"
        ),
        params![machine, host, std::process::id() as i64],
        |r| r.get(0),
    )?;
    db.set_on_every_connection("artifactfs.session", &id.to_string())?;
    // A transaction left open by a daemon that stopped answering (SIGSTOP, swapped out)
    // would hold every machine's writes: the server ends it, and its connection.
    let idle = (lease() / 2).max(Duration::from_secs(5));
    db.set_on_every_connection(
        "idle_in_transaction_session_timeout",
        &idle.as_millis().to_string(),
    )?;
    Ok(id)
}

/// The sessions that are gone, as a condition on `sessions`: any but `own` that is of this
/// machine (it restarted) or whose heartbeat is older than the lease, by the server's clock.
/// (A condition on the row itself, so that a `DELETE` racing a heartbeat re-checks it against
/// the heartbeat's new value.)
fn dead_sessions(own: i64, machine: &str) -> String {
    let machine = machine.replace('\'', "''");
    let lease = lease().as_nanos();
    format!("id != {own} AND (machine = '{machine}' OR heartbeat < {SERVER_NOW} - {lease})")
}

/// A condition on `entries` true of the rows left by daemons that are gone: stamped with a
/// session that is no longer in `sessions` (see [`forget_dead_sessions`], which runs first in
/// the same transaction).
pub const LEFT_BY_DEAD_SESSIONS: &str =
    "session IS NOT NULL AND session NOT IN (SELECT id FROM sessions)";

/// Whether any session is gone (see [`dead_sessions`]), or any row is stamped with a session
/// that no longer exists (written by a daemon that had lost its session without knowing yet).
pub fn any_dead_session(db: &Db, own: i64, machine: &str) -> io::Result<bool> {
    db.row(
        &format!(
            "SELECT EXISTS (SELECT 1 FROM sessions WHERE {})
                 OR EXISTS (SELECT 1 FROM entries WHERE {LEFT_BY_DEAD_SESSIONS})",
            dead_sessions(own, machine)
        ),
        params![],
        |r| r.get::<_, i64>(0).map(|b| b != 0),
    )
}

/// Inside the write transaction that then drops their rows ([`LEFT_BY_DEAD_SESSIONS`]):
/// forgets the sessions that are gone. A heartbeat racing this waits for it and then finds its
/// session gone, or comes first and keeps it.
pub fn forget_dead_sessions(db: &Db, own: i64, machine: &str) -> io::Result<()> {
    db.batch(&format!(
        "DELETE FROM sessions WHERE {}",
        dead_sessions(own, machine)
    ))
}

/// Ends session `id` at a clean stop.
pub fn end_session(db: &Db, id: i64) -> io::Result<()> {
    db.exec("DELETE FROM sessions WHERE id = ?1", params![id])?;
    Ok(())
}

/// Whether session `id` still exists (another daemon ends it once its lease ran out).
pub fn session_exists(db: &Db, id: i64) -> io::Result<bool> {
    db.row(
        "SELECT EXISTS (SELECT 1 FROM sessions WHERE id = ?1)",
        params![id],
        |r| r.get::<_, i64>(0).map(|b| b != 0),
    )
}

/// Whether `migration` (a description of the store being migrated) already copied its rows
/// into this index; an error if the index holds anything else: rows beyond the fixed
/// directories, or another migration. Marks the migration as started.
pub fn migration_state(db: &Db, migration: &str) -> io::Result<bool> {
    db.begin_write()?;
    let result = (|| {
        let started: Option<String> = db.one(
            "SELECT key FROM meta WHERE key LIKE 'migration:%' LIMIT 1",
            params![],
            |r| r.get(0),
        )?;
        let ours = format!("migration:{migration}");
        match started {
            Some(key) if key == ours => {}
            Some(key) => {
                return Err(io::Error::other(format!(
                    "the target index holds another migration ({}): give it a database of its own",
                    key.trim_start_matches("migration:")
                )));
            }
            None => {
                let entries: i64 =
                    db.row("SELECT COUNT(*) FROM entries", params![], |r| r.get(0))?;
                if entries > 3 {
                    return Err(io::Error::other(
                        "the target index is not empty (a shared store already uses it): \
                         migrate into an empty database",
                    ));
                }
                db.exec(
                    "INSERT INTO meta (key, value) VALUES (?1, 0)",
                    params![ours],
                )?;
            }
        }
        let done: i64 = db.row(
            "SELECT value FROM meta WHERE key = ?1",
            params![format!("migration:{migration}")],
            |r| r.get(0),
        )?;
        Ok(done == 1)
    })();
    match &result {
        Ok(_) => db.commit()?,
        Err(_) => {
            let _ = db.rollback();
        }
    }
    result
}

/// A daemon never serves an index a migration is still filling.
pub fn refuse_unfinished_migration(db: &Db) -> io::Result<()> {
    let unfinished: Option<String> = db.one(
        "SELECT key FROM meta WHERE key LIKE 'migration:%' AND value = 0 LIMIT 1",
        params![],
        |r| r.get(0),
    )?;
    match unfinished {
        None => Ok(()),
        Some(key) => Err(io::Error::other(format!(
            "the migration of {} into this index has not finished: run artifactfs migrate again \
             (it resumes) before mounting",
            key.trim_start_matches("migration:")
        ))),
    }
}

/// Inside the copy's transaction: the inode sequence moves above every number the copied rows
/// use, and the migration is recorded as done.
pub fn finish_migration(db: &Db, migration: &str) -> io::Result<()> {
    let max: i64 = db.row(
        "SELECT COALESCE(MAX(ino), 0) FROM entries",
        params![],
        |r| r.get(0),
    )?;
    let block = INO_BLOCK as i64;
    db.row(
        "SELECT setval('inos', ?1)",
        params![(max / block + 1) * block],
        |r| r.get::<_, i64>(0),
    )?;
    db.exec(
        "UPDATE meta SET value = 1 WHERE key = ?1",
        params![format!("migration:{migration}")],
    )?;
    Ok(())
}

/// The advisory lock `gc` and `fsck` hold for as long as they run, so that one machine at a
/// time collects or checks a shared store ("artifgc" in ASCII).
pub const MAINTENANCE_LOCK_KEY: i64 = 0x0061_7274_6966_6763;

/// Takes [`MAINTENANCE_LOCK_KEY`] for command `what` (`gc`, `fsck`) of this process, or says
/// who holds it: `Ok(None)` when taken, `Ok(Some(holder))` when another process has it.
pub fn take_maintenance_lock(db: &Db, what: &str) -> io::Result<Option<String>> {
    let name = format!(
        "artifactfs {what} on {} (pid {})",
        hostname().replace('\'', ""),
        std::process::id()
    );
    db.set_on_every_connection("application_name", &name)?;
    if db.try_session_lock(MAINTENANCE_LOCK_KEY)? {
        return Ok(None);
    }
    let (hi, lo) = (
        MAINTENANCE_LOCK_KEY >> 32,
        MAINTENANCE_LOCK_KEY & 0xffff_ffff,
    );
    let holder: Option<String> = db.one(
        &format!(
            "SELECT a.application_name || COALESCE(', from ' || host(a.client_addr), '')
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
               AND l.classid::text::bigint = {hi} AND l.objid::text::bigint = {lo}
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        params![],
        |r| r.get(0),
    )?;
    Ok(Some(holder.unwrap_or_else(|| "another process".into())))
}

/// Records that session `id` is alive; `false` if it no longer exists (another daemon ended
/// it after its lease ran out).
pub fn heartbeat(db: &Db, id: i64) -> io::Result<bool> {
    let n = db.exec(
        &format!("UPDATE sessions SET heartbeat = {SERVER_NOW} WHERE id = ?1"),
        params![id],
    )?;
    Ok(n == 1)
}

/// The next block of inode numbers: its first number.
pub fn ino_block(db: &Db) -> io::Result<u64> {
    db.row("SELECT nextval('inos')", params![], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
}

/// A change of the index that another daemon (or this one, or a command) committed, as its
/// [`Listener`] hands it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// What name `name` in directory `parent` leads to changed (it appeared, went, moved, became
    /// a tombstone or was created again), and so did the directory's listing.
    Name { parent: u64, name: Vec<u8> },
    /// The row of inode `ino` changed (its attributes; `content`: its bytes too).
    Inode { ino: u64, content: bool },
    /// Changes may have been missed (the listener connected again after a break): anything
    /// may have changed.
    Anything,
}

/// The changes one notification's payload announces (see [`NOTIFY_SCHEMA`]):
/// `[k ]INO CONTENT [PARENT NAME_HEX]...` (`k `: made through its daemon's kernel, see
/// [`functions_schema`]). A payload that does not read so announces
/// [`Change::Anything`] (never less than what may have changed).
pub fn parse_change(payload: &str) -> Vec<Change> {
    let payload = payload.strip_prefix("k ").unwrap_or(payload);
    let parsed = (|| {
        let mut fields = payload.split(' ');
        let ino = fields.next()?.parse().ok()?;
        let content = match fields.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        let mut changes = vec![Change::Inode { ino, content }];
        while let Some(parent) = fields.next() {
            let parent: u64 = parent.parse().ok()?;
            let name = unhex(fields.next()?)?;
            // (The root's row has no parent: nothing caches a name for it.)
            if parent != 0 {
                changes.push(Change::Name { parent, name });
            }
        }
        Some(changes)
    })();
    parsed.unwrap_or_else(|| {
        log::warn!("unreadable change notification {payload:?}: invalidating everything");
        vec![Change::Anything]
    })
}

fn unhex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Where a [`Listener`] hands the changes it hears.
pub type ChangeSink = Box<dyn Fn(Change) + Send>;

/// How long the listener waits for a notification before it looks whether it should stop, and
/// how often an idle connection is checked (a server that vanished without closing it).
const LISTEN_POLL: std::time::Duration = std::time::Duration::from_secs(1);
const LISTEN_PROBE: std::time::Duration = std::time::Duration::from_secs(5);

/// A thread that `LISTEN`s to the store's [`CHANNEL`] on a connection of its own and hands each change to
/// its sink. A connection that breaks (a restart of PostgreSQL, the network) is made again by
/// itself, pausing 50 ms to 1 s between tries, for as long as it takes; once it listens again
/// it hands up [`Change::Anything`]: notifications committed meanwhile were lost. So does its
/// first connection (whatever was cached before it listened). Stops when dropped. Its
/// connection's `application_name` is `artifactfs listen MACHINE` (in `pg_stat_activity`).
pub struct Listener {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Listener {
    pub fn start(
        mut config: postgres::Config,
        machine: &str,
        sink: ChangeSink,
        heard: std::sync::Arc<std::sync::atomic::AtomicU64>,
        own: std::sync::Arc<std::sync::atomic::AtomicU32>,
    ) -> io::Result<Listener> {
        let name = format!("artifactfs listen {machine}");
        config.application_name(name.trim_end());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::Builder::new()
            .name("listen".into())
            .spawn(move || listen(&config, &sink, &stopping, &heard, &own))?;
        Ok(Listener { stop })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Hands changes to `sink`; counts in `heard` those not committed by the connection whose
/// backend process is `own` (the daemon's index, whose own changes its answers kept already
/// show), and every (re)connect.
fn listen(
    config: &postgres::Config,
    sink: &ChangeSink,
    stop: &std::sync::atomic::AtomicBool,
    heard: &std::sync::atomic::AtomicU64,
    own: &std::sync::atomic::AtomicU32,
) {
    use postgres::fallible_iterator::FallibleIterator;
    use std::sync::atomic::Ordering;
    let mut pause = std::time::Duration::from_millis(50);
    let mut broke: Option<std::time::Instant> = None;
    while !stop.load(Ordering::Acquire) {
        let connected = config.connect(postgres::NoTls).and_then(|mut c| {
            let channel: String = c.query_one(&format!("SELECT {CHANNEL}"), &[])?.get(0);
            c.batch_execute(&format!("LISTEN \"{channel}\""))?;
            Ok(c)
        });
        let mut client = match connected {
            Ok(c) => c,
            Err(e) => {
                if broke.is_none() {
                    log::warn!("change notifications: cannot listen ({e}); trying again");
                    broke = Some(std::time::Instant::now());
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
                continue;
            }
        };
        if let Some(t) = broke.take() {
            log::info!(
                "change notifications: listening again after {:?}; invalidating everything \
                 the kernel caches",
                t.elapsed()
            );
        }
        pause = std::time::Duration::from_millis(50);
        heard.fetch_add(1, Ordering::AcqRel);
        sink(Change::Anything);
        let mut quiet = std::time::Instant::now();
        let why = loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            let next = client.notifications().timeout_iter(LISTEN_POLL).next();
            match next {
                Ok(Some(n)) => {
                    quiet = std::time::Instant::now();
                    if n.process_id() as u32 != own.load(Ordering::Acquire) {
                        heard.fetch_add(1, Ordering::AcqRel);
                    } else if n.payload().starts_with("k ") {
                        // A create or a small file's commit of this daemon: its own kernel
                        // made it, and knows what it changed (see `through_kernel`).
                        continue;
                    }
                    for change in parse_change(n.payload()) {
                        sink(change);
                    }
                }
                Ok(None) if client.is_closed() => break "the connection closed".to_string(),
                Ok(None) if quiet.elapsed() >= LISTEN_PROBE => {
                    if let Err(e) = client.is_valid(LISTEN_PROBE) {
                        break e.to_string();
                    }
                    quiet = std::time::Instant::now();
                }
                Ok(None) => {}
                Err(e) => break e.to_string(),
            }
        };
        log::warn!("change notifications: {why}; listening again");
        broke = Some(std::time::Instant::now());
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it on
    // success (truncated names are cut at the first NUL below anyway).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::from("?");
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The connection settings of a `postgresql://USER[:PASS]@HOST[:PORT]/DB[?sslmode=…]` URL. A
/// password missing from it comes, as libpq's would, from `PGPASSWORD` or from the password file
/// (`PGPASSFILE`, or `~/.pgpass`; only if no one but its owner can read it).
pub fn config(url: &str) -> io::Result<postgres::Config> {
    if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--index: expected a postgresql://USER[:PASS]@HOST[:PORT]/DB URL",
        ));
    }
    let mut config: postgres::Config = url.parse().map_err(|e| {
        // (The parser's message names the part it could not read, never the password.)
        io::Error::new(io::ErrorKind::InvalidInput, format!("--index: {e}"))
    })?;
    if config.get_password().is_none() {
        if let Some(p) = std::env::var_os("PGPASSWORD") {
            config.password(p.as_encoded_bytes());
        } else if let Some(p) = password_from_file(&config) {
            config.password(p);
        }
    }
    Ok(config)
}

/// The password of the first line of the password file that matches the connection
/// (`host:port:database:user:password`, `*` matching anything, `\:` and `\\` escaped).
fn password_from_file(config: &postgres::Config) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let path = match std::env::var_os("PGPASSFILE") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".pgpass"),
    };
    let meta = std::fs::metadata(&path).ok()?;
    if meta.mode() & 0o077 != 0 {
        log::warn!(
            "password file {} ignored: others can read it (chmod 0600)",
            path.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or_default().to_owned();
    let db = config.get_dbname().unwrap_or(&user).to_owned();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let fields = pgpass_fields(l);
            (fields.len() == 5).then_some(fields)
        })
        .find(|f| {
            [&host, &port, &db, &user]
                .iter()
                .zip(f)
                .all(|(want, have)| have == "*" || have == *want)
        })
        .map(|f| f[4].clone())
}

/// The fields of a password file line, unescaped.
fn pgpass_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().expect("never empty").push(n);
                }
            }
            ':' => fields.push(String::new()),
            c => fields.last_mut().expect("never empty").push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_file_lines_unescape() {
        assert_eq!(
            pgpass_fields(r"db.example:5432:*:alice:p\:ss\\word"),
            vec!["db.example", "5432", "*", "alice", r"p:ss\word"]
        );
    }

    #[test]
    fn change_payloads_read_back() {
        assert_eq!(
            parse_change("42 1 7 6162"),
            vec![
                Change::Inode {
                    ino: 42,
                    content: true
                },
                Change::Name {
                    parent: 7,
                    name: b"ab".to_vec()
                }
            ]
        );
        assert_eq!(
            parse_change("42 0 7 61 8 "),
            vec![
                Change::Inode {
                    ino: 42,
                    content: false
                },
                Change::Name {
                    parent: 7,
                    name: b"a".to_vec()
                },
                Change::Name {
                    parent: 8,
                    name: vec![]
                }
            ]
        );
        // The root's row names no parent.
        assert_eq!(
            parse_change("k 1 1 0 "),
            vec![Change::Inode {
                ino: 1,
                content: true
            }]
        );
        for bad in ["", "x 1", "42 2", "42 1 7", "42 1 7 6", "42 1 7 zz"] {
            assert_eq!(parse_change(bad), vec![Change::Anything], "{bad:?}");
        }
    }

    #[test]
    fn only_postgresql_urls_are_taken() {
        assert!(config("mysql://x@y/z").is_err());
        let c = config("postgresql://alice:secret@127.0.0.1:5433/store").unwrap();
        assert_eq!(c.get_user(), Some("alice"));
        assert_eq!(c.get_dbname(), Some("store"));
        assert_eq!(c.get_ports(), &[5433]);
        // Debug output (and so any log line of a config) hides the password.
        assert!(!format!("{c:?}").contains("secret"));
    }
}
