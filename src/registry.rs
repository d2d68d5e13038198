//! The model registry: which directories under `models/` are model versions, their states,
//! numbers and aliases.
//!
//! A registered model is `models/<name>/`. Its versions are the subdirectories that contain an
//! `MLmodel` file — or, when `MLmodel` sits at the top of `models/<name>/` (a model directory
//! copied straight into `models/`), that directory itself is the one version. A version is
//! PENDING while its files arrive; once the model has been quiet for the settle time the
//! registry validates it (through [`crate::mlmodel`]): READY gets the next version number and
//! is sealed, FAILED keeps the first problem as its message and stays a removable draft.
//!
//! This module decides; the index stores (`store::index`), the file-system logic asks and
//! shows (`fs`).

use std::collections::{BTreeMap, HashMap};
use std::io;

use sha2::{Digest, Sha256};

use crate::mlmodel::{self, PathKind};
use crate::store::index::{
    Index, Kind, MODELS_INO, State, VersionRecord, VersionRow, VersionStatus,
};
use crate::store::{BlobStore, Hash};

/// The file that makes a directory a model.
pub const MLMODEL: &[u8] = b"MLmodel";

/// Where an entry below `models/` belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    /// The registered model directory `models/<name>`.
    pub model: u64,
    /// The candidate version directory: the child of `models/<name>` on the path, or the model
    /// directory itself for entries directly in it.
    pub dir: u64,
}

/// Finds the registered model and candidate version directory of `ino` (an entry below
/// `models/<name>/`, or `models/<name>` itself). `None` outside `models/`.
pub fn unit_of(idx: &Index, ino: u64) -> io::Result<Option<Unit>> {
    let mut child = None;
    let mut cur = ino;
    for _ in 0..4096 {
        let Some(e) = idx.get(cur)? else {
            return Ok(None);
        };
        if e.parent == MODELS_INO {
            return Ok(Some(Unit {
                model: cur,
                dir: child.unwrap_or(cur),
            }));
        }
        if e.ino == MODELS_INO || e.parent == 0 {
            return Ok(None);
        }
        child = Some(cur);
        cur = e.parent;
    }
    Ok(None)
}

/// Whether the model directory itself holds `MLmodel` (a model copied in directly).
pub fn is_direct(idx: &Index, model: u64) -> io::Result<bool> {
    Ok(idx
        .lookup(model, MLMODEL)?
        .is_some_and(|e| e.state != State::Tombstone && e.kind == Kind::File))
}

/// The READY version row that seals `unit`, if any (the model itself when it is a direct model).
pub fn sealing_version(idx: &Index, unit: Unit) -> io::Result<Option<VersionRow>> {
    if let Some(v) = idx.version_of_dir(unit.model)?
        && v.status == VersionStatus::Ready
    {
        return Ok(Some(v));
    }
    if unit.dir != unit.model
        && let Some(v) = idx.version_of_dir(unit.dir)?
        && v.status == VersionStatus::Ready
    {
        return Ok(Some(v));
    }
    Ok(None)
}

/// SHA-256 over the sorted `(path, file hash)` pairs of a version: identifies its exact content.
pub fn tree_digest(files: &BTreeMap<Vec<u8>, String>) -> String {
    let mut h = Sha256::new();
    for (path, hash) in files {
        h.update(path);
        h.update([0]);
        h.update(hash.as_bytes());
        h.update([b'\n']);
    }
    crate::store::Hash(h.finalize().into()).to_hex()
}

/// Validates version directory `dir` and describes it, or says what is wrong with it.
pub fn validate_dir(
    idx: &Index,
    blobs: &BlobStore,
    dir: u64,
) -> io::Result<Result<VersionRecord, String>> {
    let entries = idx.descendants(dir)?;
    let mut kinds: HashMap<Vec<u8>, PathKind> = HashMap::new();
    let mut files = BTreeMap::new();
    let mut sizes: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut total = 0u64;
    let mut mlmodel_hash = None;
    for (rel, e) in &entries {
        match e.kind {
            Kind::Dir => {
                kinds.insert(rel.clone(), PathKind::Dir);
            }
            Kind::File => {
                let Some(hash) = e.hash.filter(|_| e.state == State::Live) else {
                    return Ok(Err(format!(
                        "{} is still being written",
                        String::from_utf8_lossy(rel)
                    )));
                };
                kinds.insert(rel.clone(), PathKind::File);
                files.insert(rel.clone(), hash.to_hex());
                sizes.insert(rel.clone(), e.size);
                total += e.size;
                if rel.as_slice() == MLMODEL {
                    mlmodel_hash = Some((hash, e.size));
                }
            }
        }
    }
    let Some((hash, size)) = mlmodel_hash else {
        return Ok(Err("no MLmodel file at the top of the directory".into()));
    };
    if size > mlmodel::MAX_MLMODEL_BYTES as u64 {
        return Ok(Err(format!(
            "MLmodel is {size} bytes, more than the {} allowed",
            mlmodel::MAX_MLMODEL_BYTES
        )));
    }
    let bytes = crate::store::open_content(idx, blobs, &hash, size)?
        .bytes(mlmodel::MAX_MLMODEL_BYTES as u64 + 1)?;
    let lookup = |p: &str| {
        kinds
            .get(p.as_bytes())
            .copied()
            .unwrap_or(PathKind::Missing)
    };
    let info = match mlmodel::validate(&bytes, &lookup) {
        Ok(info) => info,
        Err(invalid) => return Ok(Err(invalid.to_string())),
    };
    // The environment file must name requirement files that are there (MLflow installs from
    // them); `validate` already checked that the file itself exists.
    if let Some(env) = &info.python_env
        && let Some(hash) = files.get(env.as_bytes()).and_then(|h| Hash::from_hex(h))
    {
        let size = sizes.get(env.as_bytes()).copied().unwrap_or(u64::MAX);
        let bytes = crate::store::open_content(idx, blobs, &hash, size)?
            .bytes(mlmodel::MAX_MLMODEL_BYTES as u64 + 1)?;
        if let Err(invalid) = mlmodel::check_python_env(&bytes, env, &lookup) {
            return Ok(Err(invalid.to_string()));
        }
    }
    Ok(Ok(VersionRecord {
        run_id: info.run_id,
        artifact_path: info.artifact_path,
        model_uuid: info.model_uuid,
        model_id: info.model_id,
        flavors: Some(serde_json::to_string(&info.flavors).unwrap_or_default()),
        signature: info.signature,
        utc_time_created: info.utc_time_created,
        total_size: total,
        file_count: files.len() as u64,
        digest: tree_digest(&files),
        source: None,
    }))
}

/// What settling did to one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ready(u64),
    Failed(String),
    /// No MLmodel: a plain directory, nothing registered.
    NotAModel,
}

/// Validates every version directory of `model` that is PENDING (or not yet looked at),
/// recording the results.
/// Returns `(directory inode, outcome)` for each one looked at.
pub fn settle_model(
    idx: &mut Index,
    blobs: &BlobStore,
    model: u64,
    now: i64,
) -> io::Result<Vec<(u64, Outcome)>> {
    let mut out = Vec::new();
    if idx.model(model)?.is_none() {
        return Ok(out);
    }
    let children = idx.children(model, 0, usize::MAX >> 1)?;
    let direct = is_direct(idx, model)?;
    let mut units: Vec<u64> = Vec::new();
    if direct {
        units.push(model);
    } else {
        // A stray row for the model directory itself (files once put at its top) goes away.
        idx.version_delete(model)?;
        units.extend(
            children
                .iter()
                .filter(|c| c.kind == Kind::Dir)
                .map(|c| c.ino),
        );
    }
    for dir in units {
        // READY is final; FAILED stays until something changes in the directory (which makes
        // it PENDING again).
        if let Some(v) = idx.version_of_dir(dir)?
            && v.status != VersionStatus::Pending
        {
            continue;
        }
        let has_mlmodel = is_direct(idx, dir)?;
        if !has_mlmodel {
            idx.version_delete(dir)?;
            out.push((dir, Outcome::NotAModel));
            continue;
        }
        idx.version_pending(dir, model, now)?;
        let ready_subdirs = direct
            && idx
                .versions_of(model)?
                .iter()
                .any(|v| v.status == VersionStatus::Ready && v.dir_ino != model);
        let verdict = if ready_subdirs {
            Err("MLmodel at the top of a registered model that already has versions in subdirectories".into())
        } else {
            validate_dir(idx, blobs, dir)?
        };
        match verdict {
            Ok(record) => {
                let n = idx.version_ready(dir, &record, now)?;
                out.push((dir, Outcome::Ready(n)));
            }
            Err(msg) => {
                idx.version_fail(dir, &msg, now)?;
                out.push((dir, Outcome::Failed(msg)));
            }
        }
    }
    if direct {
        // Subdirectories of a direct model are its parts, not versions.
        for c in children.iter().filter(|c| c.kind == Kind::Dir) {
            idx.version_delete(c.ino)?;
        }
    }
    Ok(out)
}

/// The newest READY version of a model.
pub fn latest(idx: &Index, model: u64) -> io::Result<Option<VersionRow>> {
    Ok(idx
        .versions_of(model)?
        .into_iter()
        .filter(|v| v.status == VersionStatus::Ready)
        .max_by_key(|v| v.version))
}

/// The registry links shown in `models/<name>/` (subdirectory form only): each READY version
/// number, `latest` and every `@alias`, with the version each points at.
pub fn links(idx: &Index, model: u64) -> io::Result<Vec<(Vec<u8>, VersionRow)>> {
    if is_direct(idx, model)? {
        return Ok(Vec::new());
    }
    let ready: Vec<VersionRow> = idx
        .versions_of(model)?
        .into_iter()
        .filter(|v| v.status == VersionStatus::Ready && v.dir_ino != model)
        .collect();
    let by_number: std::collections::HashMap<u64, &VersionRow> =
        ready.iter().filter_map(|v| Some((v.version?, v))).collect();
    let mut out: Vec<(Vec<u8>, VersionRow)> = ready
        .iter()
        .map(|v| (v.version.unwrap_or(0).to_string().into_bytes(), v.clone()))
        .collect();
    if let Some(l) = ready.iter().max_by_key(|v| v.version) {
        out.push((b"latest".to_vec(), l.clone()));
    }
    for (alias, n) in idx.aliases_of(model)? {
        if let Some(v) = by_number.get(&n) {
            out.push((format!("@{alias}").into_bytes(), (*v).clone()));
        }
    }
    Ok(out)
}

/// The version a registry link `name` in `models/<name>/` points at. One lookup answers from
/// the rows that name can mean, without listing every link (a negative lookup of any name in
/// a model directory lands here).
pub fn link(idx: &Index, model: u64, name: &[u8]) -> io::Result<Option<VersionRow>> {
    let ready = |v: Option<VersionRow>| v.filter(|v| v.dir_ino != model);
    let version = if name == b"latest" {
        if is_direct(idx, model)? {
            return Ok(None);
        }
        idx.versions_of(model)?
            .into_iter()
            .filter(|v| v.status == VersionStatus::Ready && v.dir_ino != model)
            .max_by_key(|v| v.version)
    } else if let Some(alias) = name.strip_prefix(b"@") {
        let Ok(alias) = std::str::from_utf8(alias) else {
            return Ok(None);
        };
        let Some(n) = idx
            .aliases_of(model)?
            .into_iter()
            .find_map(|(a, n)| (a == alias).then_some(n))
        else {
            return Ok(None);
        };
        ready(idx.version_number(model, n)?)
    } else {
        // Only the canonical spelling of a number is a link ("3", not "03" or "+3").
        let Some(n) = std::str::from_utf8(name)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|n| n.to_string().as_bytes() == name)
        else {
            return Ok(None);
        };
        ready(idx.version_number(model, n)?)
    };
    if version.is_some() && is_direct(idx, model)? {
        return Ok(None);
    }
    Ok(version)
}

/// Resolves what `ln -s TARGET models/<name>/@alias` names: a version number, `latest`, an
/// alias, or a version directory's name (with optional `./` and trailing `/`).
pub fn resolve_target(idx: &Index, model: u64, target: &[u8]) -> io::Result<Option<VersionRow>> {
    let mut t = target;
    while let Some(rest) = t.strip_prefix(b"./") {
        t = rest;
    }
    while let Some(rest) = t.strip_suffix(b"/") {
        t = rest;
    }
    if let Some(v) = link(idx, model, t)? {
        return Ok(Some(v));
    }
    match idx.lookup(model, t)? {
        Some(e) if e.kind == Kind::Dir && e.state != State::Tombstone => Ok(idx
            .version_of_dir(e.ino)?
            .filter(|v| v.status == VersionStatus::Ready)),
        _ => Ok(None),
    }
}
