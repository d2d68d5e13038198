//! The registry's tables: registered models, their versions and aliases.
//!
//! Rows only; what a status means and when it changes is decided in `crate::registry`.

use std::io;

use rusqlite::params;

use super::{DbRow, Index, NewEntry};

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

fn row_to_version(r: &DbRow) -> rusqlite::Result<VersionRow> {
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

fn row_to_model(r: &DbRow) -> rusqlite::Result<ModelRow> {
    Ok(ModelRow {
        ino: r.get::<_, i64>(0)? as u64,
        name: r.get(1)?,
        next_version: r.get::<_, i64>(2)? as u64,
        created: r.get(3)?,
    })
}

/// The advisory lock key of validating version directory `dir` ("vd" in the top bits; inode
/// numbers stay far below 2^48).
fn validation_key(dir: u64) -> i64 {
    (0x7664i64 << 48) | (dir & ((1 << 48) - 1)) as i64
}

impl Index {
    pub fn model_create(&self, ino: u64, name: &str, now: i64) -> io::Result<()> {
        self.db.exec(
            "INSERT INTO registered_models (ino, name, created) VALUES (?1, ?2, ?3)
             ON CONFLICT DO NOTHING",
            params![ino as i64, name, now],
        )?;
        Ok(())
    }

    /// Makes directory `models/<name>` (`new`) and its model's row in one transaction: a crash
    /// leaves both or neither. `None` if the name is taken.
    pub fn model_dir_create(&self, new: &NewEntry, name: &str) -> io::Result<Option<u64>> {
        self.write_locked(|idx| {
            let Some(ino) = idx.insert_in_dir(new)? else {
                return Ok(None);
            };
            // A row of that name whose directory is gone (a crash of an earlier version
            // between its two transactions) would keep the new one from being recorded.
            idx.db.exec(
                "DELETE FROM registered_models WHERE name = ?1
                 AND NOT EXISTS (SELECT 1 FROM entries WHERE ino = registered_models.ino)",
                params![name],
            )?;
            idx.model_create(ino, name, new.time)?;
            Ok(Some(ino))
        })
    }

    /// Forgets a registered model that has no versions (its directory was removed).
    pub fn model_delete(&self, ino: u64) -> io::Result<()> {
        self.db.exec("DELETE FROM registered_models WHERE ino = ?1
                 AND NOT EXISTS (SELECT 1 FROM model_versions WHERE model_ino = ?1 AND status = 'READY')", params![ino as i64])?;
        Ok(())
    }

    pub fn model(&self, ino: u64) -> io::Result<Option<ModelRow>> {
        self.db.one(
            "SELECT ino, name, next_version, created FROM registered_models WHERE ino = ?1",
            params![ino as i64],
            row_to_model,
        )
    }

    pub fn model_by_name(&self, name: &str) -> io::Result<Option<ModelRow>> {
        self.db.one(
            "SELECT ino, name, next_version, created FROM registered_models WHERE name = ?1",
            params![name],
            row_to_model,
        )
    }

    pub fn models(&self) -> io::Result<Vec<ModelRow>> {
        self.db.all(
            "SELECT ino, name, next_version, created FROM registered_models ORDER BY name",
            params![],
            row_to_model,
        )
    }

    pub fn version_of_dir(&self, dir_ino: u64) -> io::Result<Option<VersionRow>> {
        self.db.one(
            &format!("SELECT {VERSION_COLUMNS} FROM model_versions WHERE dir_ino = ?1"),
            params![dir_ino as i64],
            row_to_version,
        )
    }

    /// All version rows of a model (any status), READY ones by version number first.
    pub fn versions_of(&self, model_ino: u64) -> io::Result<Vec<VersionRow>> {
        let rows = self.db.all(
            &format!(
                "SELECT {VERSION_COLUMNS} FROM model_versions WHERE model_ino = ?1
                 ORDER BY version IS NULL, version, dir_ino"
            ),
            params![model_ino as i64],
            row_to_version,
        )?;
        Ok(rows)
    }

    /// The READY version `version` of a model.
    pub fn version_number(&self, model_ino: u64, version: u64) -> io::Result<Option<VersionRow>> {
        self.db.one(
            &format!(
                "SELECT {VERSION_COLUMNS} FROM model_versions
                 WHERE model_ino = ?1 AND version = ?2 AND status = 'READY'"
            ),
            params![model_ino as i64, version as i64],
            row_to_version,
        )
    }

    /// Marks a version directory PENDING (creating its row); READY rows are left alone.
    /// Returns whether the status changed.
    pub fn version_pending(&self, dir_ino: u64, model_ino: u64, now: i64) -> io::Result<bool> {
        let changed = self.db.exec(
            "INSERT INTO model_versions (dir_ino, model_ino, status, message, updated)
                 VALUES (?1, ?2, 'PENDING', '', ?3)
                 ON CONFLICT (dir_ino) DO UPDATE SET status = 'PENDING', message = '', updated = ?3
                 WHERE model_versions.status != 'READY' AND model_versions.status != 'PENDING'",
            params![dir_ino as i64, model_ino as i64, now],
        )?;
        Ok(changed > 0)
    }

    pub fn version_fail(&self, dir_ino: u64, message: &str, now: i64) -> io::Result<()> {
        self.db.exec(
            "UPDATE model_versions SET status = 'FAILED', message = ?2, updated = ?3
                 WHERE dir_ino = ?1 AND status != 'READY'",
            params![dir_ino as i64, message, now],
        )?;
        Ok(())
    }

    /// Records activity in a version directory (a name created, removed or renamed in it):
    /// the directory is PENDING again unless READY, and its `updated` stamp becomes `now`. Every
    /// machine of a shared store reads that stamp to tell whether the directory has been quiet
    /// long enough to validate (see `crate::registry::settle_model`). Returns whether the status
    /// changed.
    pub fn version_touched(&self, dir_ino: u64, model_ino: u64, now: i64) -> io::Result<bool> {
        let before: Option<String> = self.db.one(
            "SELECT status FROM model_versions WHERE dir_ino = ?1",
            params![dir_ino as i64],
            |r| r.get(0),
        )?;
        if before.as_deref() == Some("READY") {
            return Ok(false);
        }
        self.db.exec(
            "INSERT INTO model_versions (dir_ino, model_ino, status, message, updated)
                 VALUES (?1, ?2, 'PENDING', '', ?3)
                 ON CONFLICT (dir_ino) DO UPDATE SET status = 'PENDING', message = '', updated = ?3
                 WHERE model_versions.status != 'READY'",
            params![dir_ino as i64, model_ino as i64, now],
        )?;
        Ok(before.as_deref() != Some("PENDING"))
    }

    /// Inside a write transaction: makes a version READY with the model's next number;
    /// returns the number. The caller has checked, in the same transaction, that the version
    /// is still PENDING as it validated it (see `crate::registry::settle_model`).
    pub fn version_ready(&self, dir_ino: u64, rec: &VersionRecord, now: i64) -> io::Result<u64> {
        debug_assert!(self.db.in_transaction());
        let model_ino: i64 = self.db.row(
            "SELECT model_ino FROM model_versions WHERE dir_ino = ?1",
            params![dir_ino as i64],
            |r| r.get(0),
        )?;
        let number: i64 = self.db.row(
            "SELECT next_version FROM registered_models WHERE ino = ?1",
            params![model_ino],
            |r| r.get(0),
        )?;
        self.db.exec(
            "UPDATE registered_models SET next_version = ?2 WHERE ino = ?1",
            params![model_ino, number + 1],
        )?;
        self.db.exec(
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
        )?;
        Ok(number as u64)
    }

    /// Records where a version was registered from (before it validates).
    pub fn version_source(&self, dir_ino: u64, source: &str) -> io::Result<()> {
        self.db.exec(
            "UPDATE model_versions SET source = ?2 WHERE dir_ino = ?1",
            params![dir_ino as i64, source],
        )?;
        Ok(())
    }

    /// Drops the row of a version directory that never became READY.
    pub fn version_delete(&self, dir_ino: u64) -> io::Result<()> {
        self.db.exec(
            "DELETE FROM model_versions WHERE dir_ino = ?1 AND status != 'READY'",
            params![dir_ino as i64],
        )?;
        Ok(())
    }

    /// Models with versions still PENDING (to re-check after a restart).
    pub fn models_with_pending(&self) -> io::Result<Vec<u64>> {
        self.db.all(
            "SELECT DISTINCT model_ino FROM model_versions WHERE status = 'PENDING'",
            params![],
            |r| r.get::<_, i64>(0).map(|v| v as u64),
        )
    }

    /// Takes the claim on validating version directory `dir`: on a shared index a PostgreSQL
    /// advisory lock of this daemon's connection, so that one machine at a time validates a
    /// version (`false`: another daemon holds it); on the embedded index always `true` (one
    /// daemon). Release it with [`Index::release_validation`].
    pub fn claim_validation(&self, dir: u64) -> io::Result<bool> {
        if !self.db.is_postgres() {
            return Ok(true);
        }
        self.db.row(
            "SELECT pg_try_advisory_lock(?1)",
            params![validation_key(dir)],
            |r| r.get::<_, i64>(0).map(|b| b != 0),
        )
    }

    pub fn release_validation(&self, dir: u64) -> io::Result<()> {
        if self.db.is_postgres() {
            self.db.row(
                "SELECT pg_advisory_unlock(?1)",
                params![validation_key(dir)],
                |r| r.get::<_, i64>(0),
            )?;
        }
        Ok(())
    }

    pub fn alias_set(&self, model_ino: u64, alias: &str, version: u64) -> io::Result<()> {
        self.db.exec(
            "INSERT INTO model_aliases (model_ino, alias, version) VALUES (?1, ?2, ?3)
                 ON CONFLICT (model_ino, alias) DO UPDATE SET version = ?3",
            params![model_ino as i64, alias, version as i64],
        )?;
        Ok(())
    }

    /// Removes an alias; `false` if there was none.
    pub fn alias_remove(&self, model_ino: u64, alias: &str) -> io::Result<bool> {
        let n = self.db.exec(
            "DELETE FROM model_aliases WHERE model_ino = ?1 AND alias = ?2",
            params![model_ino as i64, alias],
        )?;
        Ok(n == 1)
    }

    pub fn aliases_of(&self, model_ino: u64) -> io::Result<Vec<(String, u64)>> {
        let rows = self.db.all(
            "SELECT alias, version FROM model_aliases WHERE model_ino = ?1 ORDER BY alias",
            params![model_ino as i64],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)),
        )?;
        Ok(rows)
    }
}
