//! The SQL connection under the index: SQLite for the embedded store, PostgreSQL for a store
//! that several machines share.
//!
//! The index's statements are written once, in the SQL both engines accept, with SQLite's
//! numbered placeholders (`?1`, `?2`); a PostgreSQL connection rewrites them to `$1`, `$2` when it
//! prepares a statement, and keeps it prepared for the connection's life. Values cross in
//! SQLite's value types, through rusqlite's `ToSql` and `FromSql`, for both engines: a statement's
//! parameters are bound to PostgreSQL as the types PostgreSQL inferred for them (an integer for a
//! `BIGINT` or `BOOLEAN` parameter, bytes for `BYTEA`, text for `TEXT`), and a PostgreSQL row's
//! columns read as SQLite's integers, reals, text and blobs (a `BOOLEAN` as 0 or 1). So the same
//! row-reading code serves both ([`DbRow::get`] reads like `rusqlite::Row::get`).
//!
//! What differs per engine stays here: transactions (a write transaction holds SQLite's write
//! lock, or on PostgreSQL a transaction-scoped advisory lock that every writing connection of
//! the store takes first, so that writers of all machines follow one another as SQLite's do),
//! savepoints outside a transaction, and the mapping of errors to `io::Error`s (a unique key
//! taken reads as [`io::ErrorKind::AlreadyExists`], a full disk as `ENOSPC`, a read-only index as
//! `EROFS`, a lock held too long as `IndexBusy`). Schemas are each engine's own.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;

use postgres::error::SqlState;
use postgres::types::{ToSql as PgToSql, Type};
use rusqlite::ErrorCode;
use rusqlite::types::{FromSql, ToSql, ToSqlOutput, Value, ValueRef};

use super::IndexBusy;

/// The advisory lock key every write transaction on a PostgreSQL index takes first
/// (`pg_advisory_xact_lock`): "artifac" in ASCII.
pub(crate) const WRITE_LOCK_KEY: i64 = 0x0061_7274_6966_6163;

/// How many prepared statements a PostgreSQL connection keeps (the index uses a few dozen).
const MAX_STATEMENTS: usize = 256;

/// One connection to an index, of either engine.
pub(crate) enum Db {
    Sqlite(rusqlite::Connection),
    // Until `--index postgresql://…` opens one (the next step), only the tests do.
    #[allow(dead_code)]
    Postgres(Box<RefCell<Pg>>),
}

/// A PostgreSQL connection with its prepared statements.
pub(crate) struct Pg {
    config: postgres::Config,
    client: Option<postgres::Client>,
    /// Prepared statements by their SQL as the index wrote it.
    statements: HashMap<String, postgres::Statement>,
    /// Open transaction, savepoints included (0: none).
    depth: usize,
    /// Settings made on every new connection, by name (see [`Db::set_on_every_connection`]).
    settings: Vec<(String, String)>,
    /// A session-level advisory lock this connection holds (see [`Db::try_session_lock`]):
    /// taken again on a new connection, or the connection fails.
    session_lock: Option<i64>,
    /// The `lock_timeout` asked for last (ms), and the one the connection has: applied with
    /// the next statement that may wait for a lock (a write, the start of a transaction), in
    /// the same round trip where it can be, so that flipping it around a commit
    /// (`Store::retry_busy`) costs nothing.
    lock_timeout: Option<u128>,
    applied_lock_timeout: Option<u128>,
    /// Counts what this connection sent that may have changed rows (anything but a `SELECT`
    /// outside a transaction): answers read in between are the index as this connection left
    /// it (see `cache`).
    writes: u64,
    /// The PostgreSQL backend process of the current connection (0: none yet): notifications
    /// of its own commits carry it (see `postgres::Listener`).
    backend_pid: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// A statement of the open transaction (or step) failed: PostgreSQL ignores everything
    /// until it is rolled back, and a `COMMIT` would roll it back without an error.
    aborted: bool,
}

/// One row of a query's result, of either engine.
pub(crate) enum DbRow<'a> {
    Sqlite(&'a rusqlite::Row<'a>),
    Pg(&'a postgres::Row),
}

/// A column's index in a row (only `usize`, so that `r.get(0)` needs no annotation).
pub(crate) trait ColumnIndex {
    fn index(self) -> usize;
}

impl ColumnIndex for usize {
    fn index(self) -> usize {
        self
    }
}

impl DbRow<'_> {
    /// Column `i` as `T`, as `rusqlite::Row::get` reads it (a PostgreSQL column as the SQLite
    /// value it corresponds to).
    pub fn get<I: ColumnIndex, T: FromSql>(&self, i: I) -> rusqlite::Result<T> {
        let i = i.index();
        match self {
            DbRow::Sqlite(r) => r.get(i),
            DbRow::Pg(r) => {
                let v = pg_column(r, i).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        i,
                        rusqlite::types::Type::Null,
                        Box::new(e),
                    )
                })?;
                T::column_result(ValueRef::from(&v)).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        i,
                        value_type(&v),
                        Box::new(io::Error::other(e.to_string())),
                    )
                })
            }
        }
    }
}

fn value_type(v: &Value) -> rusqlite::types::Type {
    use rusqlite::types::Type as T;
    match v {
        Value::Null => T::Null,
        Value::Integer(_) => T::Integer,
        Value::Real(_) => T::Real,
        Value::Text(_) => T::Text,
        Value::Blob(_) => T::Blob,
    }
}

/// A PostgreSQL column as the SQLite value it corresponds to.
fn pg_column(r: &postgres::Row, i: usize) -> Result<Value, postgres::Error> {
    let ty = r
        .columns()
        .get(i)
        .map(|c| c.type_().clone())
        .unwrap_or(Type::TEXT);
    let v = match ty {
        Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Value::Integer),
        Type::INT4 => r
            .try_get::<_, Option<i32>>(i)?
            .map(|n| Value::Integer(n.into())),
        Type::INT2 => r
            .try_get::<_, Option<i16>>(i)?
            .map(|n| Value::Integer(n.into())),
        Type::BOOL => r
            .try_get::<_, Option<bool>>(i)?
            .map(|b| Value::Integer(b.into())),
        Type::FLOAT8 => r.try_get::<_, Option<f64>>(i)?.map(Value::Real),
        Type::FLOAT4 => r
            .try_get::<_, Option<f32>>(i)?
            .map(|f| Value::Real(f.into())),
        Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob),
        _ => r.try_get::<_, Option<String>>(i)?.map(Value::Text),
    };
    Ok(v.unwrap_or(Value::Null))
}

/// Parameter `i`'s value, bound as the type PostgreSQL inferred for it.
fn pg_param(i: usize, p: &dyn ToSql, ty: &Type) -> io::Result<Box<dyn PgToSql + Sync>> {
    let out = p.to_sql().map_err(|e| param_error(i, e.to_string()))?;
    let v: ValueRef = match &out {
        ToSqlOutput::Borrowed(v) => *v,
        ToSqlOutput::Owned(v) => v.into(),
        _ => return Err(param_error(i, "an unsupported value".into())),
    };
    let int = |n: i64| -> io::Result<i64> { Ok(n) };
    Ok(match (ty, v) {
        (&Type::INT8, ValueRef::Null) => Box::new(None::<i64>),
        (&Type::INT4, ValueRef::Null) => Box::new(None::<i32>),
        (&Type::INT2, ValueRef::Null) => Box::new(None::<i16>),
        (&Type::BOOL, ValueRef::Null) => Box::new(None::<bool>),
        (&Type::FLOAT8, ValueRef::Null) => Box::new(None::<f64>),
        (&Type::BYTEA, ValueRef::Null) => Box::new(None::<Vec<u8>>),
        (_, ValueRef::Null) => Box::new(None::<String>),
        (&Type::INT8, ValueRef::Integer(n)) => Box::new(int(n)?),
        (&Type::INT4, ValueRef::Integer(n)) => Box::new(
            i32::try_from(n).map_err(|_| param_error(i, format!("{n} out of INT4's range")))?,
        ),
        (&Type::INT2, ValueRef::Integer(n)) => Box::new(
            i16::try_from(n).map_err(|_| param_error(i, format!("{n} out of INT2's range")))?,
        ),
        (&Type::BOOL, ValueRef::Integer(n)) => Box::new(n != 0),
        (&Type::FLOAT8, ValueRef::Integer(n)) => Box::new(n as f64),
        (&Type::FLOAT8, ValueRef::Real(f)) => Box::new(f),
        (&Type::BYTEA, ValueRef::Blob(b) | ValueRef::Text(b)) => Box::new(b.to_vec()),
        (&Type::TEXT | &Type::VARCHAR | &Type::BPCHAR | &Type::NAME, ValueRef::Text(t)) => {
            Box::new(
                String::from_utf8(t.to_vec())
                    .map_err(|_| param_error(i, "text that is not UTF-8".into()))?,
            )
        }
        (ty, v) => {
            return Err(param_error(
                i,
                format!("a {:?} value for a parameter of type {ty}", v.data_type()),
            ));
        }
    })
}

fn param_error(i: usize, what: String) -> io::Error {
    io::Error::other(format!("index: parameter {}: {what}", i + 1))
}

/// SQLite's placeholders (`?1`, or `?` counted from 1) as PostgreSQL's (`$1`), outside quoted
/// strings and identifiers.
pub(crate) fn pg_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut next = 1;
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                out.push(c);
            }
            (Some(_), c) => out.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                out.push(c);
            }
            (None, '?') => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                if digits.is_empty() {
                    digits = next.to_string();
                    next += 1;
                }
                out.push('$');
                out.push_str(&digits);
            }
            (None, c) => out.push(c),
        }
    }
    out
}

/// A SQLite error as an `io::Error` (see the module doc).
pub(crate) fn sqlite_error(e: rusqlite::Error) -> io::Error {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => io::Error::from_raw_os_error(libc::ENOSPC),
        Some(ErrorCode::ReadOnly) => io::Error::from_raw_os_error(libc::EROFS),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            io::Error::other(IndexBusy(e.to_string()))
        }
        Some(ErrorCode::ConstraintViolation) => {
            io::Error::new(io::ErrorKind::AlreadyExists, format!("index: {e}"))
        }
        _ => io::Error::other(format!("index: {e}")),
    }
}

/// A PostgreSQL error as an `io::Error` (see the module doc). The message never holds the
/// connection's password: the server's messages do not carry it, and the client's name only
/// host, port, user and database.
pub(crate) fn pg_error(e: postgres::Error) -> io::Error {
    if is_outage(&e) {
        return io::Error::other(Unreachable(format!("index: PostgreSQL unreachable: {e}")));
    }
    let Some(code) = e.code() else {
        return io::Error::other(format!("index: {e}"));
    };
    let msg = match e.as_db_error() {
        Some(db) => format!("index: {}: {}", db.severity(), db.message()),
        None => format!("index: {e}"),
    };
    if *code == SqlState::UNIQUE_VIOLATION {
        io::Error::new(io::ErrorKind::AlreadyExists, msg)
    } else if *code == SqlState::DISK_FULL {
        io::Error::from_raw_os_error(libc::ENOSPC)
    } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
        io::Error::from_raw_os_error(libc::EROFS)
    } else if *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::LOCK_NOT_AVAILABLE
        || *code == SqlState::QUERY_CANCELED
    {
        io::Error::other(IndexBusy(msg))
    } else {
        io::Error::other(msg)
    }
}

/// PostgreSQL could not be reached, or dropped the connection (a restart, the network): the
/// statement may be tried again on a new connection once it is back.
#[derive(Debug)]
struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// Whether `e` says PostgreSQL is unreachable (see [`Unreachable`]).
fn is_unreachable(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Unreachable>())
}

/// Whether a PostgreSQL error is the connection's, not the statement's: the connection is
/// closed, the server is shutting down or starting, a connection exception (class 08), or an
/// I/O error (connecting, reading, writing).
fn is_outage(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        return *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
            || code.code().starts_with("08");
    }
    std::error::Error::source(e).is_some_and(|s| s.is::<io::Error>())
}

/// How long a request outside a transaction waits for PostgreSQL to come back (a restart, a
/// network outage), trying again, before it fails with `EIO`.
pub(crate) const OUTAGE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

impl Pg {
    /// Runs `f` (a statement, or the start of a transaction) and, while PostgreSQL is
    /// unreachable and no transaction is open, tries again on a new connection for up to
    /// [`OUTAGE_PATIENCE`]. Inside a transaction nothing is tried again: the transaction went
    /// with its connection, and its caller gets the error.
    fn patiently<T>(&mut self, mut f: impl FnMut(&mut Pg) -> io::Result<T>) -> io::Result<T> {
        let start = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(50);
        let mut logged = false;
        loop {
            let result = f(self);
            match result {
                Err(e) if is_unreachable(&e) && self.depth == 0 => {
                    self.client = None;
                    self.statements.clear();
                    if start.elapsed() >= OUTAGE_PATIENCE {
                        log::error!("{e}; gave up after {:?}", OUTAGE_PATIENCE);
                        return Err(e);
                    }
                    if !logged {
                        log::warn!("{e}; trying again for up to {:?}", OUTAGE_PATIENCE);
                        logged = true;
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_secs(1));
                }
                other => {
                    if logged && other.is_ok() {
                        log::info!("PostgreSQL reachable again after {:?}", start.elapsed());
                    }
                    return other;
                }
            }
        }
    }

    /// The connection, made again if the last one broke (outside a transaction only: a broken
    /// transaction is gone with its connection, and its caller has had the error).
    fn client(&mut self) -> io::Result<&mut postgres::Client> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
            self.statements.clear();
            if self.depth > 0 {
                self.depth = 0;
                return Err(io::Error::other(
                    "index: the connection to PostgreSQL broke during a transaction",
                ));
            }
        }
        if self.client.is_none() {
            self.writes += 1;
            let mut client = self.config.connect(postgres::NoTls).map_err(pg_error)?;
            for (name, value) in &self.settings {
                client
                    .batch_execute(&format!("SET {name} = '{value}'"))
                    .map_err(pg_error)?;
            }
            if let Some(key) = self.session_lock {
                let had: bool = client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                    .map_err(pg_error)?
                    .get(0);
                if !had {
                    return Err(io::Error::other(
                        "index: the connection to PostgreSQL broke, and another process took \
                         this one's lock meanwhile",
                    ));
                }
            }
            self.applied_lock_timeout = None;
            let pid: i32 = client
                .query_one("SELECT pg_backend_pid()", &[])
                .map_err(pg_error)?
                .get(0);
            self.backend_pid
                .store(pid as u32, std::sync::atomic::Ordering::Release);
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    fn prepared(&mut self, sql: &str) -> io::Result<postgres::Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let stmt = self
            .client()?
            .prepare(&pg_placeholders(sql))
            .map_err(pg_error)?;
        if self.statements.len() >= MAX_STATEMENTS {
            // Statements made for one use (a list of numbers in their text) would pile up.
            self.statements.clear();
        }
        self.statements.insert(sql.to_owned(), stmt.clone());
        Ok(stmt)
    }

    fn run<T>(
        &mut self,
        sql: &str,
        params: &[&dyn ToSql],
        f: impl Fn(
            &mut postgres::Client,
            &postgres::Statement,
            &[&(dyn PgToSql + Sync)],
        ) -> Result<T, postgres::Error>,
    ) -> io::Result<T> {
        self.patiently(|pg| pg.run_once(sql, params, &f))
    }

    fn run_once<T>(
        &mut self,
        sql: &str,
        params: &[&dyn ToSql],
        f: &impl Fn(
            &mut postgres::Client,
            &postgres::Statement,
            &[&(dyn PgToSql + Sync)],
        ) -> Result<T, postgres::Error>,
    ) -> io::Result<T> {
        if self.depth > 0 || !sql.trim_start().starts_with("SELECT") {
            self.writes += 1;
        }
        let stmt = self.prepared(sql)?;
        if stmt.params().len() != params.len() {
            return Err(io::Error::other(format!(
                "index: {} parameters for a statement of {}",
                params.len(),
                stmt.params().len()
            )));
        }
        let bound = params
            .iter()
            .zip(stmt.params())
            .enumerate()
            .map(|(i, (p, ty))| pg_param(i, *p, ty))
            .collect::<io::Result<Vec<_>>>()?;
        let refs: Vec<&(dyn PgToSql + Sync)> = bound.iter().map(|b| b.as_ref()).collect();
        let client = self.client()?;
        let result = f(client, &stmt, &refs).map_err(pg_error);
        if result.is_err() && self.depth > 0 {
            self.aborted = true;
        }
        result
    }

    /// `SET lock_timeout …; ` when the connection's differs from the one asked for (marked
    /// applied: the caller sends it before anything else), or nothing.
    fn lock_timeout_prefix(&mut self) -> String {
        match self.lock_timeout {
            Some(ms) if self.applied_lock_timeout != Some(ms) => {
                self.applied_lock_timeout = Some(ms);
                format!("SET lock_timeout = {ms}; ")
            }
            _ => String::new(),
        }
    }

    /// Applies the `lock_timeout` asked for, if the connection does not have it yet.
    fn apply_lock_timeout(&mut self) -> io::Result<()> {
        self.client()?;
        let prefix = self.lock_timeout_prefix();
        if prefix.is_empty() {
            return Ok(());
        }
        let r = self.client()?.batch_execute(&prefix).map_err(pg_error);
        if r.is_err() {
            self.applied_lock_timeout = None;
        }
        r
    }

    /// Runs statements without parameters, as [`Pg::run`] does.
    fn batch(&mut self, sql: &str) -> io::Result<()> {
        self.writes += 1;
        let result = self.patiently(|pg| {
            pg.client()?;
            let sql = format!("{}{sql}", pg.lock_timeout_prefix());
            let r = pg.client()?.batch_execute(&sql).map_err(pg_error);
            if r.is_err() {
                pg.applied_lock_timeout = None;
            }
            r
        });
        if result.is_err() && self.depth > 0 {
            self.aborted = true;
        }
        result
    }
}

impl Db {
    /// A PostgreSQL index at `config` (connected at once, so that a wrong address or password
    /// shows now).
    #[allow(dead_code)]
    pub fn postgres(config: postgres::Config) -> io::Result<Db> {
        let mut pg = Pg {
            config,
            client: None,
            statements: HashMap::new(),
            depth: 0,
            // Every check-then-change (a commit's check that its object is there, gc's check
            // that nothing uses one before it deletes it) is made under the write lock and must
            // see what was committed before the lock was taken: each statement its own
            // snapshot. A database or role whose default is `repeatable read` or
            // `serializable` would give a transaction the snapshot of its first statement, the
            // lock's, taken before the wait for it.
            settings: vec![(
                "default_transaction_isolation".to_owned(),
                "read committed".to_owned(),
            )],
            session_lock: None,
            lock_timeout: None,
            applied_lock_timeout: None,
            writes: 0,
            backend_pid: Default::default(),
            aborted: false,
        };
        pg.client()?;
        Ok(Db::Postgres(Box::new(RefCell::new(pg))))
    }

    /// Takes the session-level advisory lock `key` if it is free (`false` if another
    /// connection holds it) and keeps it for the connection's life, on every connection made
    /// again after a break too (a new connection that cannot have it fails). Always `true` on
    /// SQLite.
    pub fn try_session_lock(&self, key: i64) -> io::Result<bool> {
        let Db::Postgres(pg) = self else {
            return Ok(true);
        };
        let had = self.row(
            "SELECT pg_try_advisory_lock(?1)",
            rusqlite::params![key],
            |r| r.get::<_, i64>(0).map(|b| b != 0),
        )?;
        if had {
            pg.borrow_mut().session_lock = Some(key);
        }
        Ok(had)
    }

    /// Sets the setting `name` to `value` (no quote in either) now and on every connection made
    /// again after a break, replacing what an earlier call set it to.
    pub fn set_on_every_connection(&self, name: &str, value: &str) -> io::Result<()> {
        debug_assert!(!name.contains('\'') && !value.contains('\''));
        self.batch(&format!("SET {name} = '{value}'"))?;
        if let Db::Postgres(pg) = self {
            let mut pg = pg.borrow_mut();
            pg.settings.retain(|(n, _)| n != name);
            pg.settings.push((name.to_owned(), value.to_owned()));
        }
        Ok(())
    }

    /// How long a statement waits for a lock another connection holds before it fails with
    /// `IndexBusy` (SQLite's busy timeout, PostgreSQL's `lock_timeout`).
    pub fn set_lock_timeout(&self, timeout: std::time::Duration) -> io::Result<()> {
        match self {
            Db::Sqlite(c) => c.busy_timeout(timeout).map_err(sqlite_error),
            Db::Postgres(pg) => {
                // Applied with the next statement that may wait for a lock (see `Pg`).
                pg.borrow_mut().lock_timeout = Some(timeout.as_millis().max(1));
                Ok(())
            }
        }
    }

    /// PostgreSQL: how many times this connection may have changed rows so far (see `Pg`);
    /// `None` inside a transaction or on SQLite.
    pub fn writes(&self) -> Option<u64> {
        match self {
            Db::Postgres(pg) => {
                let pg = pg.borrow();
                (pg.depth == 0).then_some(pg.writes)
            }
            Db::Sqlite(_) => None,
        }
    }

    /// PostgreSQL: the backend process of this connection, kept current across reconnects.
    pub fn backend_pid(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicU32>> {
        match self {
            Db::Sqlite(_) => None,
            Db::Postgres(pg) => Some(pg.borrow().backend_pid.clone()),
        }
    }

    /// A PostgreSQL index's connection settings (for a connection of another's own).
    pub fn pg_config(&self) -> Option<postgres::Config> {
        match self {
            Db::Sqlite(_) => None,
            Db::Postgres(pg) => Some(pg.borrow().config.clone()),
        }
    }

    /// Whether this is a PostgreSQL index.
    pub fn is_postgres(&self) -> bool {
        matches!(self, Db::Postgres(_))
    }

    /// The SQLite connection, for what only SQLite has (`PRAGMA`s, checkpoints).
    pub fn sqlite(&self) -> Option<&rusqlite::Connection> {
        match self {
            Db::Sqlite(c) => Some(c),
            Db::Postgres(_) => None,
        }
    }

    /// Runs one statement; returns how many rows it changed.
    pub fn exec(&self, sql: &str, params: &[&dyn ToSql]) -> io::Result<usize> {
        match self {
            Db::Sqlite(c) => c
                .prepare_cached(sql)
                .and_then(|mut s| s.execute(params))
                .map_err(sqlite_error),
            Db::Postgres(pg) => {
                let mut pg = pg.borrow_mut();
                if pg.depth == 0 {
                    pg.patiently(|pg| pg.apply_lock_timeout())?;
                }
                pg.run(sql, params, |c, s, p| c.execute(s, p))
                    .map(|n| n as usize)
            }
        }
    }

    /// The first row of a query, read by `f`; `None` if there is none.
    pub fn one<T>(
        &self,
        sql: &str,
        params: &[&dyn ToSql],
        f: impl FnOnce(&DbRow) -> rusqlite::Result<T>,
    ) -> io::Result<Option<T>> {
        match self {
            Db::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql).map_err(sqlite_error)?;
                let mut rows = stmt.query(params).map_err(sqlite_error)?;
                match rows.next().map_err(sqlite_error)? {
                    Some(r) => f(&DbRow::Sqlite(r)).map(Some).map_err(sqlite_error),
                    None => Ok(None),
                }
            }
            Db::Postgres(pg) => {
                let row = pg
                    .borrow_mut()
                    .run(sql, params, |c, s, p| c.query_opt(s, p))?;
                match row {
                    Some(r) => f(&DbRow::Pg(&r)).map(Some).map_err(sqlite_error),
                    None => Ok(None),
                }
            }
        }
    }

    /// The first row of a query that always has one (an aggregate, `EXISTS`).
    pub fn row<T>(
        &self,
        sql: &str,
        params: &[&dyn ToSql],
        f: impl FnOnce(&DbRow) -> rusqlite::Result<T>,
    ) -> io::Result<T> {
        self.one(sql, params, f)?
            .ok_or_else(|| io::Error::other(format!("index: no row from {sql}")))
    }

    /// Every row of a query, each read by `f`.
    pub fn all<T>(
        &self,
        sql: &str,
        params: &[&dyn ToSql],
        mut f: impl FnMut(&DbRow) -> rusqlite::Result<T>,
    ) -> io::Result<Vec<T>> {
        match self {
            Db::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql).map_err(sqlite_error)?;
                let mut rows = stmt.query(params).map_err(sqlite_error)?;
                let mut out = Vec::new();
                while let Some(r) = rows.next().map_err(sqlite_error)? {
                    out.push(f(&DbRow::Sqlite(r)).map_err(sqlite_error)?);
                }
                Ok(out)
            }
            Db::Postgres(pg) => {
                let rows = pg.borrow_mut().run(sql, params, |c, s, p| c.query(s, p))?;
                rows.iter()
                    .map(|r| f(&DbRow::Pg(r)).map_err(sqlite_error))
                    .collect()
            }
        }
    }

    /// Runs statements without parameters (schema changes); no placeholders are rewritten.
    pub fn batch(&self, sql: &str) -> io::Result<()> {
        match self {
            Db::Sqlite(c) => c.execute_batch(sql).map_err(sqlite_error),
            Db::Postgres(pg) => pg.borrow_mut().batch(sql),
        }
    }

    /// PostgreSQL only: runs `sql`, one statement that writes by itself (a call of one of the
    /// index's server functions) and returns one integer, outside a transaction, in one round
    /// trip. While PostgreSQL is unreachable it is tried again, as a statement outside a
    /// transaction is, for up to [`OUTAGE_PATIENCE`]. A connection that broke while it ran
    /// leaves unknown whether it committed: once PostgreSQL answers again, `done` is asked (what
    /// it would have returned if its change is there, `None` if not), and it runs again only
    /// if it is not.
    pub fn write_call(
        &self,
        sql: &str,
        params: &[&dyn ToSql],
        done: &dyn Fn(&Db) -> io::Result<Option<i64>>,
    ) -> io::Result<i64> {
        let Db::Postgres(pg) = self else {
            return Err(io::Error::other(
                "index: a server function needs PostgreSQL",
            ));
        };
        let start = std::time::Instant::now();
        loop {
            let result = {
                let mut pg = pg.borrow_mut();
                if pg.depth > 0 {
                    return Err(io::Error::other("index: a write call inside a transaction"));
                }
                pg.patiently(|pg| pg.client().map(drop))?;
                pg.writes += 1;
                pg.run_once(sql, params, &|c, s, p| {
                    c.query_one(s, p).and_then(|row| row.try_get::<_, i64>(0))
                })
            };
            match result {
                Err(e) if is_unreachable(&e) && start.elapsed() < OUTAGE_PATIENCE => {
                    log::warn!("{e}; the change is tried again once it answers");
                    if let Some(v) = done(self)? {
                        return Ok(v);
                    }
                }
                other => return other,
            }
        }
    }

    /// The lock timeout asked for last, in ms (-1: none asked for; SQLite: -1).
    pub fn lock_timeout_ms(&self) -> i64 {
        match self {
            Db::Postgres(pg) => pg.borrow().lock_timeout.map_or(-1, |ms| ms as i64),
            Db::Sqlite(_) => -1,
        }
    }

    /// Starts a transaction that writes: it holds the index's write lock from its start (see
    /// the module doc) until [`Db::commit`] or [`Db::rollback`].
    pub fn begin_write(&self) -> io::Result<()> {
        match self {
            Db::Sqlite(_) => self.control("BEGIN IMMEDIATE"),
            Db::Postgres(pg) => {
                let mut pg = pg.borrow_mut();
                pg.writes += 1;
                pg.patiently(|pg| {
                    pg.client()?;
                    let prefix = pg.lock_timeout_prefix();
                    let client = pg.client()?;
                    let begun = client
                        .batch_execute(&format!(
                            "{prefix}BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})"
                        ))
                        .map_err(pg_error);
                    if begun.is_err() {
                        pg.applied_lock_timeout = None;
                    }
                    let client = pg.client.as_mut().expect("connected above");
                    if begun.is_err() && !client.is_closed() {
                        // (The lock was not had in time: the transaction begun is over too.)
                        let _ = client.batch_execute("ROLLBACK");
                    }
                    begun
                })?;
                pg.depth = 1;
                pg.aborted = false;
                Ok(())
            }
        }
    }

    pub fn commit(&self) -> io::Result<()> {
        self.end("COMMIT")
    }

    pub fn rollback(&self) -> io::Result<()> {
        self.end("ROLLBACK")
    }

    fn end(&self, how: &str) -> io::Result<()> {
        match self {
            Db::Sqlite(_) => self.control(how),
            Db::Postgres(pg) => {
                let mut pg = pg.borrow_mut();
                pg.depth = 0;
                pg.writes += 1;
                let aborted = std::mem::take(&mut pg.aborted);
                if aborted || how != "COMMIT" {
                    // A `SET lock_timeout` sent with the `BEGIN` goes with the transaction.
                    pg.applied_lock_timeout = None;
                }
                match pg.client.as_mut() {
                    Some(c) if !c.is_closed() && aborted && how == "COMMIT" => {
                        let _ = c.batch_execute("ROLLBACK");
                        Err(io::Error::other(
                            "index: a statement of the transaction failed: it was rolled back",
                        ))
                    }
                    Some(c) if !c.is_closed() => {
                        let r = c.batch_execute(how).map_err(pg_error);
                        if r.is_err() {
                            pg.applied_lock_timeout = None;
                        }
                        r
                    }
                    _ if how == "ROLLBACK" => Ok(()),
                    _ => Err(io::Error::other(
                        "index: the connection to PostgreSQL broke before the commit",
                    )),
                }
            }
        }
    }

    /// Runs one statement of transaction control (`BEGIN IMMEDIATE`, `COMMIT`, `SAVEPOINT`,
    /// ...). SQLite keeps it compiled: the commit of every small file runs several.
    fn control(&self, sql: &str) -> io::Result<()> {
        match self {
            Db::Sqlite(c) => c
                .prepare_cached(sql)
                .and_then(|mut s| s.execute([]))
                .map(drop)
                .map_err(sqlite_error),
            Db::Postgres(pg) => pg.borrow_mut().batch(sql),
        }
    }

    /// Whether a transaction is open.
    pub fn in_transaction(&self) -> bool {
        match self {
            Db::Sqlite(c) => !c.is_autocommit(),
            Db::Postgres(pg) => pg.borrow().depth > 0,
        }
    }

    /// Starts a step that can be undone on its own: a savepoint of the open transaction, or a
    /// write transaction of its own ([`Db::end_step`] ends either).
    pub fn begin_step(&self) -> io::Result<Step> {
        if self.in_transaction() {
            self.control("SAVEPOINT step")?;
            if let Db::Postgres(pg) = self {
                pg.borrow_mut().depth += 1;
            }
            Ok(Step::Savepoint)
        } else {
            self.begin_write()?;
            Ok(Step::Transaction)
        }
    }

    /// Ends a step of [`Db::begin_step`]: keeps its changes if `keep`, undoes them otherwise.
    pub fn end_step(&self, step: Step, keep: bool) -> io::Result<()> {
        match (step, keep) {
            (Step::Transaction, true) => self.commit(),
            (Step::Transaction, false) => self.rollback(),
            (Step::Savepoint, keep) => {
                let mut failed = false;
                if let Db::Postgres(pg) = self {
                    let mut pg = pg.borrow_mut();
                    pg.depth = pg.depth.saturating_sub(1).max(1);
                    // A failed statement of the step is undone with the step.
                    failed = std::mem::take(&mut pg.aborted);
                }
                if keep && !failed {
                    return self.control("RELEASE step");
                }
                self.control("ROLLBACK TO step")?;
                self.control("RELEASE step")?;
                if keep {
                    return Err(io::Error::other(
                        "index: a statement of the step failed: it was rolled back",
                    ));
                }
                Ok(())
            }
        }
    }
}

/// What [`Db::begin_step`] started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Savepoint,
    Transaction,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rusqlite::params;

    #[test]
    fn placeholders_are_rewritten_outside_quotes() {
        assert_eq!(
            pg_placeholders("SELECT a FROM t WHERE a = ?1 AND b = ?12 AND c = '?3' AND d = ?"),
            "SELECT a FROM t WHERE a = $1 AND b = $12 AND c = '?3' AND d = $1"
        );
        assert_eq!(pg_placeholders("x = ? AND y = ?"), "x = $1 AND y = $2");
        assert_eq!(pg_placeholders("\"we?ird\" = ?2"), "\"we?ird\" = $2");
    }

    /// The URL of a new throwaway schema of the test server (see [`test_pg`]).
    pub(crate) fn test_pg_url() -> Option<String> {
        let url = std::env::var("ARTIFACTFS_TEST_PG").ok()?;
        let db = test_pg()?;
        let schema: String = db
            .row("SELECT current_schema()", params![], |r| r.get(0))
            .unwrap();
        let sep = if url.contains('?') { '&' } else { '?' };
        Some(format!("{url}{sep}options=-csearch_path%3D{schema}"))
    }

    /// A throwaway schema of the test server named by `ARTIFACTFS_TEST_PG` (a `postgresql://`
    /// URL; `scripts/test.sh` starts one), or `None` without one, outside CI.
    pub(crate) fn test_pg() -> Option<Db> {
        let url = match std::env::var("ARTIFACTFS_TEST_PG") {
            Ok(u) => u,
            Err(_) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("CI=true: ARTIFACTFS_TEST_PG must name the test PostgreSQL server")
            }
            Err(_) => {
                eprintln!("no ARTIFACTFS_TEST_PG: the PostgreSQL half of this test is skipped");
                return None;
            }
        };
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let schema = format!(
            "t{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let config: postgres::Config = url.parse().expect("ARTIFACTFS_TEST_PG: a postgresql URL");
        let db = Db::postgres(config.clone()).expect("connect to the test PostgreSQL");
        db.batch(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .unwrap();
        let mut config = config;
        config.options(&format!("-c search_path={schema}"));
        Some(Db::postgres(config).unwrap())
    }

    fn engines() -> Vec<(&'static str, Db)> {
        let mut v = vec![(
            "sqlite",
            Db::Sqlite(rusqlite::Connection::open_in_memory().unwrap()),
        )];
        if let Some(pg) = test_pg() {
            v.push(("postgresql", pg));
        }
        v
    }

    fn create(db: &Db, name: &str) {
        let blob = if matches!(db, Db::Sqlite(_)) {
            "BLOB"
        } else {
            "BYTEA"
        };
        db.batch(&format!(
            "CREATE TABLE t (id BIGINT PRIMARY KEY, name {blob} NOT NULL, hash TEXT, n BIGINT);
             CREATE UNIQUE INDEX t_by_name ON t (name)"
        ))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    /// Transactions are `read committed` whatever the database's or role's default: a check
    /// made under the write lock sees what was committed before the lock was taken.
    #[test]
    fn transactions_read_committed_whatever_the_default() {
        let Some(url) = test_pg_url() else {
            return;
        };
        let url = url.replace(
            "options=",
            "options=-cdefault_transaction_isolation%3Dserializable%20",
        );
        let db = Db::postgres(url.parse().unwrap()).unwrap();
        db.begin_write().unwrap();
        let level: String = db
            .row("SHOW transaction_isolation", params![], |r| r.get(0))
            .unwrap();
        db.rollback().unwrap();
        assert_eq!(level, "read committed");
        // (Without it, a connection made with the same URL would have been serializable.)
        let config: postgres::Config = url.parse().unwrap();
        let mut raw = config.connect(postgres::NoTls).unwrap();
        let default: String = raw
            .query_one("SHOW transaction_isolation", &[])
            .unwrap()
            .get(0);
        assert_eq!(default, "serializable");
    }

    #[test]
    fn values_cross_both_engines_alike() {
        for (name, db) in engines() {
            create(&db, name);
            let none: Option<String> = None;
            let n = db
                .exec(
                    "INSERT INTO t (id, name, hash, n) VALUES (?1, ?2, ?3, ?4)",
                    params![1i64, b"a\0b".as_slice(), "h1", 7i64],
                )
                .unwrap();
            assert_eq!(n, 1, "{name}");
            db.exec(
                "INSERT INTO t (id, name, hash, n) VALUES (?1, ?2, ?3, NULL)",
                params![2i64, b"c".as_slice(), none],
            )
            .unwrap();
            let row = db
                .one(
                    "SELECT id, name, hash, n FROM t WHERE name = ?1",
                    params![b"a\0b".as_slice()],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, Vec<u8>>(1)?,
                            r.get::<_, Option<String>>(2)?,
                            r.get::<_, Option<i64>>(3)?,
                        ))
                    },
                )
                .unwrap();
            assert_eq!(
                row,
                Some((1, b"a\0b".to_vec(), Some("h1".into()), Some(7))),
                "{name}"
            );
            let nulls = db
                .row("SELECT hash, n FROM t WHERE id = ?1", params![2i64], |r| {
                    Ok((r.get::<_, Option<String>>(0)?, r.get::<_, Option<i64>>(1)?))
                })
                .unwrap();
            assert_eq!(nulls, (None, None), "{name}");
            // A boolean reads as 0 or 1, as SQLite's do.
            let exists: i64 = db
                .row(
                    "SELECT EXISTS (SELECT 1 FROM t WHERE id = ?1)",
                    params![2i64],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(exists, 1, "{name}");
            let all = db
                .all("SELECT id FROM t ORDER BY id", params![], |r| {
                    r.get::<_, i64>(0)
                })
                .unwrap();
            assert_eq!(all, vec![1, 2], "{name}");
            assert_eq!(
                db.one("SELECT id FROM t WHERE id = ?1", params![9i64], |r| r
                    .get::<_, i64>(0))
                    .unwrap(),
                None,
                "{name}"
            );
        }
    }

    #[test]
    fn a_taken_unique_key_reads_as_already_exists() {
        for (name, db) in engines() {
            create(&db, name);
            db.exec(
                "INSERT INTO t (id, name) VALUES (?1, ?2)",
                params![1i64, b"x".as_slice()],
            )
            .unwrap();
            let e = db
                .exec(
                    "INSERT INTO t (id, name) VALUES (?1, ?2)",
                    params![2i64, b"x".as_slice()],
                )
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{name}: {e}");
            // The connection goes on.
            let n = db
                .exec(
                    "INSERT INTO t (id, name) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                    params![2i64, b"x".as_slice()],
                )
                .unwrap();
            assert_eq!(n, 0, "{name}");
        }
    }

    #[test]
    fn steps_and_transactions_keep_or_undo_their_changes() {
        for (name, db) in engines() {
            create(&db, name);
            let ins = |id: i64| {
                db.exec(
                    "INSERT INTO t (id, name) VALUES (?1, ?2)",
                    params![id, id.to_string().into_bytes()],
                )
                .unwrap()
            };
            let ids = || {
                db.all("SELECT id FROM t ORDER BY id", params![], |r| {
                    r.get::<_, i64>(0)
                })
                .unwrap()
            };
            db.begin_write().unwrap();
            ins(1);
            let step = db.begin_step().unwrap();
            assert_eq!(step, Step::Savepoint, "{name}");
            ins(2);
            db.end_step(step, false).unwrap();
            let step = db.begin_step().unwrap();
            ins(3);
            db.end_step(step, true).unwrap();
            assert!(db.in_transaction(), "{name}");
            db.commit().unwrap();
            assert!(!db.in_transaction(), "{name}");
            assert_eq!(ids(), vec![1, 3], "{name}");

            let step = db.begin_step().unwrap();
            assert_eq!(step, Step::Transaction, "{name}");
            ins(4);
            db.end_step(step, false).unwrap();
            db.begin_write().unwrap();
            ins(5);
            db.rollback().unwrap();
            assert_eq!(ids(), vec![1, 3], "{name}");
        }
    }

    /// A statement that fails inside a transaction never lets the transaction commit half of
    /// it (PostgreSQL would ignore the rest and turn the COMMIT into a rollback): the commit
    /// fails, nothing stays, and the connection goes on. A failed step is undone on its own.
    #[test]
    fn a_failed_statement_never_commits_half_a_transaction() {
        for (name, db) in engines() {
            create(&db, name);
            let ins = |id: i64, n: &[u8]| {
                db.exec(
                    "INSERT INTO t (id, name) VALUES (?1, ?2)",
                    params![id, n.to_vec()],
                )
            };
            ins(1, b"a").unwrap();
            let count = || {
                db.row("SELECT COUNT(*) FROM t", params![], |r| r.get::<_, i64>(0))
                    .unwrap()
            };
            // A step that failed is undone, and the transaction goes on.
            db.begin_write().unwrap();
            ins(2, b"b").unwrap();
            let step = db.begin_step().unwrap();
            assert!(ins(3, b"a").is_err(), "{name}");
            db.end_step(step, false).unwrap();
            ins(4, b"d").unwrap();
            db.commit().unwrap();
            assert_eq!(count(), 3, "{name}");
            if name == "postgresql" {
                // A failure outside a step: the commit fails, nothing of it stays.
                db.begin_write().unwrap();
                ins(5, b"e").unwrap();
                assert!(ins(6, b"a").is_err());
                assert!(db.commit().is_err());
                assert_eq!(count(), 3);
            }
            ins(7, b"g").unwrap();
            assert_eq!(count(), 4, "{name}");
        }
    }

    /// The write lock not had within the lock timeout: the attempt fails as busy and leaves
    /// the connection usable.
    #[test]
    fn a_write_lock_not_had_in_time_is_busy_and_harmless() {
        let Some(url) = test_pg_url() else {
            return;
        };
        let one = Db::postgres(url.parse().unwrap()).unwrap();
        let two = Db::postgres(url.parse().unwrap()).unwrap();
        create(&one, "postgresql");
        two.set_lock_timeout(std::time::Duration::from_millis(50))
            .unwrap();
        one.begin_write().unwrap();
        let e = two.begin_write().unwrap_err();
        assert!(super::super::is_busy(&e), "{e}");
        assert!(!two.in_transaction());
        one.commit().unwrap();
        // (Other tests' writers take the same lock, in the same database: wait longer now.)
        two.set_lock_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        two.begin_write().unwrap();
        two.exec(
            "INSERT INTO t (id, name) VALUES (?1, ?2)",
            params![1i64, b"x".as_slice()],
        )
        .unwrap();
        two.commit().unwrap();
        let n: i64 = one
            .row("SELECT COUNT(*) FROM t", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn a_wrong_type_is_an_error_not_a_guess() {
        if let Some(db) = test_pg() {
            create(&db, "postgresql");
            let e = db
                .exec(
                    "INSERT INTO t (id, name) VALUES (?1, ?2)",
                    params!["one", b"x".as_slice()],
                )
                .unwrap_err();
            assert!(e.to_string().contains("parameter 1"), "{e}");
        }
    }
}
