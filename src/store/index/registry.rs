//! The registry's tables: registered models, their versions and aliases.
//!
//! Rows only; what a status means and when it changes is decided in `crate::registry`.

use std::io;

use rusqlite::{OptionalExtension, Row, TransactionBehavior, params};

use super::{Index, to_io};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionStatus {
    Pending,
    Ready,
    Failed,
}

impl VersionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionStatus::Pending => "PENDING",
            VersionStatus::Ready => "READY",
            VersionStatus::Failed => "FAILED",
        }
    }

    fn parse(s: &str) -> VersionStatus {
        match s {
            "READY" => VersionStatus::Ready,
            "FAILED" => VersionStatus::Failed,
            _ => VersionStatus::Pending,
        }
    }
}

/// A registered model: `models/<name>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRow {
    pub ino: u64,
    pub name: String,
    pub next_version: u64,
    pub created: i64,
}

/// What validation found out about a version directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionRecord {
    pub run_id: Option<String>,
    pub artifact_path: Option<String>,
    pub model_uuid: Option<String>,
    pub model_id: Option<String>,
    /// JSON list of flavor names.
    pub flavors: Option<String>,
    /// JSON text of the signature.
    pub signature: Option<String>,
    pub utc_time_created: Option<String>,
    pub total_size: u64,
    pub file_count: u64,
    /// SHA-256 over the sorted (path, file hash) pairs.
    pub digest: String,
    /// Store path this version was registered from without copying (`models register`).
    pub source: Option<String>,
}

/// One version directory's registry row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    pub dir_ino: u64,
    pub model_ino: u64,
    pub version: Option<u64>,
    pub status: VersionStatus,
    pub message: String,
    pub record: VersionRecord,
    pub updated: i64,
}

const VERSION_COLUMNS: &str = "dir_ino, model_ino, version, status, message, run_id, artifact_path, \
     model_uuid, model_id, flavors, signature, utc_time_created, total_size, file_count, digest, \
     source, updated";

fn row_to_version(r: &Row) -> rusqlite::Result<VersionRow> {
    Ok(VersionRow {
        dir_ino: r.get::<_, i64>(0)? as u64,
        model_ino: r.get::<_, i64>(1)? as u64,
        version: r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
        status: VersionStatus::parse(&r.get::<_, String>(3)?),
        message: r.get(4)?,
        record: VersionRecord {
            run_id: r.get(5)?,
            artifact_path: r.get(6)?,
            model_uuid: r.get(7)?,
            model_id: r.get(8)?,
            flavors: r.get(9)?,
            signature: r.get(10)?,
            utc_time_created: r.get(11)?,
            total_size: r.get::<_, Option<i64>>(12)?.unwrap_or(0) as u64,
            file_count: r.get::<_, Option<i64>>(13)?.unwrap_or(0) as u64,
            digest: r.get::<_, Option<String>>(14)?.unwrap_or_default(),
            source: r.get(15)?,
        },
        updated: r.get(16)?,
    })
}

fn row_to_model(r: &Row) -> rusqlite::Result<ModelRow> {
    Ok(ModelRow {
        ino: r.get::<_, i64>(0)? as u64,
        name: r.get(1)?,
        next_version: r.get::<_, i64>(2)? as u64,
        created: r.get(3)?,
    })
}

impl Index {
    pub fn model_create(&self, ino: u64, name: &str, now: i64) -> io::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO registered_models (ino, name, created) VALUES (?1, ?2, ?3)",
            )
            .map_err(to_io)?
            .execute(params![ino as i64, name, now])
            .map_err(to_io)?;
        Ok(())
    }

    /// Forgets a registered model that has no versions (its directory was removed).
    pub fn model_delete(&self, ino: u64) -> io::Result<()> {
        self.conn
            .execute(
                "DELETE FROM registered_models WHERE ino = ?1
                 AND NOT EXISTS (SELECT 1 FROM model_versions WHERE model_ino = ?1 AND status = 'READY')",
                [ino as i64],
            )
            .map_err(to_io)?;
        Ok(())
    }

    pub fn model(&self, ino: u64) -> io::Result<Option<ModelRow>> {
        self.conn
            .prepare_cached(
                "SELECT ino, name, next_version, created FROM registered_models WHERE ino = ?1",
            )
            .map_err(to_io)?
            .query_row([ino as i64], row_to_model)
            .optional()
            .map_err(to_io)
    }

    pub fn model_by_name(&self, name: &str) -> io::Result<Option<ModelRow>> {
        self.conn
            .prepare_cached(
                "SELECT ino, name, next_version, created FROM registered_models WHERE name = ?1",
            )
            .map_err(to_io)?
            .query_row([name], row_to_model)
            .optional()
            .map_err(to_io)
    }

    pub fn models(&self) -> io::Result<Vec<ModelRow>> {
        let mut stmt = self
            .conn
            .prepare("SELECT ino, name, next_version, created FROM registered_models ORDER BY name")
            .map_err(to_io)?;
        let rows = stmt.query_map([], row_to_model).map_err(to_io)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(to_io)
    }

    pub fn version_of_dir(&self, dir_ino: u64) -> io::Result<Option<VersionRow>> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {VERSION_COLUMNS} FROM model_versions WHERE dir_ino = ?1"
            ))
            .map_err(to_io)?
            .query_row([dir_ino as i64], row_to_version)
            .optional()
            .map_err(to_io)
    }

    /// All version rows of a model (any status), READY ones by version number first.
    pub fn versions_of(&self, model_ino: u64) -> io::Result<Vec<VersionRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {VERSION_COLUMNS} FROM model_versions WHERE model_ino = ?1
                 ORDER BY version IS NULL, version, dir_ino"
            ))
            .map_err(to_io)?;
        let rows = stmt
            .query_map([model_ino as i64], row_to_version)
            .map_err(to_io)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(to_io)
    }

    /// The READY version `version` of a model.
    pub fn version_number(&self, model_ino: u64, version: u64) -> io::Result<Option<VersionRow>> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {VERSION_COLUMNS} FROM model_versions
                 WHERE model_ino = ?1 AND version = ?2 AND status = 'READY'"
            ))
            .map_err(to_io)?
            .query_row(params![model_ino as i64, version as i64], row_to_version)
            .optional()
            .map_err(to_io)
    }

    /// Marks a version directory PENDING (creating its row); READY rows are left alone.
    /// Returns whether the status changed.
    pub fn version_pending(&self, dir_ino: u64, model_ino: u64, now: i64) -> io::Result<bool> {
        let changed = self
            .conn
            .prepare_cached(
                "INSERT INTO model_versions (dir_ino, model_ino, status, message, updated)
                 VALUES (?1, ?2, 'PENDING', '', ?3)
                 ON CONFLICT (dir_ino) DO UPDATE SET status = 'PENDING', message = '', updated = ?3
                 WHERE status != 'READY' AND status != 'PENDING'",
            )
            .map_err(to_io)?
            .execute(params![dir_ino as i64, model_ino as i64, now])
            .map_err(to_io)?;
        Ok(changed > 0)
    }

    pub fn version_fail(&self, dir_ino: u64, message: &str, now: i64) -> io::Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE model_versions SET status = 'FAILED', message = ?2, updated = ?3
                 WHERE dir_ino = ?1 AND status != 'READY'",
            )
            .map_err(to_io)?
            .execute(params![dir_ino as i64, message, now])
            .map_err(to_io)?;
        Ok(())
    }

    /// Makes a version READY with the model's next number, in one transaction; returns the number.
    pub fn version_ready(
        &mut self,
        dir_ino: u64,
        rec: &VersionRecord,
        now: i64,
    ) -> io::Result<u64> {
        // IMMEDIATE: see `Index::rename_file`.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(to_io)?;
        let model_ino: i64 = tx
            .query_row(
                "SELECT model_ino FROM model_versions WHERE dir_ino = ?1",
                [dir_ino as i64],
                |r| r.get(0),
            )
            .map_err(to_io)?;
        let number: i64 = tx
            .query_row(
                "SELECT next_version FROM registered_models WHERE ino = ?1",
                [model_ino],
                |r| r.get(0),
            )
            .map_err(to_io)?;
        tx.execute(
            "UPDATE registered_models SET next_version = ?2 WHERE ino = ?1",
            params![model_ino, number + 1],
        )
        .map_err(to_io)?;
        tx.execute(
            "UPDATE model_versions SET version = ?2, status = 'READY', message = '', run_id = ?3,
             artifact_path = ?4, model_uuid = ?5, model_id = ?6, flavors = ?7, signature = ?8,
             utc_time_created = ?9, total_size = ?10, file_count = ?11, digest = ?12,
             source = COALESCE(?13, source), updated = ?14
             WHERE dir_ino = ?1",
            params![
                dir_ino as i64,
                number,
                rec.run_id,
                rec.artifact_path,
                rec.model_uuid,
                rec.model_id,
                rec.flavors,
                rec.signature,
                rec.utc_time_created,
                rec.total_size as i64,
                rec.file_count as i64,
                rec.digest,
                rec.source,
                now
            ],
        )
        .map_err(to_io)?;
        tx.commit().map_err(to_io)?;
        Ok(number as u64)
    }

    /// Records where a version was registered from (before it validates).
    pub fn version_source(&self, dir_ino: u64, source: &str) -> io::Result<()> {
        self.conn
            .execute(
                "UPDATE model_versions SET source = ?2 WHERE dir_ino = ?1",
                params![dir_ino as i64, source],
            )
            .map_err(to_io)?;
        Ok(())
    }

    /// Drops the row of a version directory that never became READY.
    pub fn version_delete(&self, dir_ino: u64) -> io::Result<()> {
        self.conn
            .prepare_cached("DELETE FROM model_versions WHERE dir_ino = ?1 AND status != 'READY'")
            .map_err(to_io)?
            .execute([dir_ino as i64])
            .map_err(to_io)?;
        Ok(())
    }

    /// Models with versions still PENDING (to re-check after a restart).
    pub fn models_with_pending(&self) -> io::Result<Vec<u64>> {
        let mut stmt = self
            .conn
            .prepare("SELECT DISTINCT model_ino FROM model_versions WHERE status = 'PENDING'")
            .map_err(to_io)?;
        let rows = stmt.query_map([], |r| r.get::<_, i64>(0)).map_err(to_io)?;
        rows.map(|r| r.map(|v| v as u64))
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(to_io)
    }

    pub fn alias_set(&self, model_ino: u64, alias: &str, version: u64) -> io::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO model_aliases (model_ino, alias, version) VALUES (?1, ?2, ?3)
                 ON CONFLICT (model_ino, alias) DO UPDATE SET version = ?3",
            )
            .map_err(to_io)?
            .execute(params![model_ino as i64, alias, version as i64])
            .map_err(to_io)?;
        Ok(())
    }

    /// Removes an alias; `false` if there was none.
    pub fn alias_remove(&self, model_ino: u64, alias: &str) -> io::Result<bool> {
        let n = self
            .conn
            .execute(
                "DELETE FROM model_aliases WHERE model_ino = ?1 AND alias = ?2",
                params![model_ino as i64, alias],
            )
            .map_err(to_io)?;
        Ok(n == 1)
    }

    pub fn aliases_of(&self, model_ino: u64) -> io::Result<Vec<(String, u64)>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT alias, version FROM model_aliases WHERE model_ino = ?1 ORDER BY alias",
            )
            .map_err(to_io)?;
        let rows = stmt
            .query_map([model_ino as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(to_io)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(to_io)
    }
}
