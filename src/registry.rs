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

/// The contents a validation of `model`'s pending versions may have to fetch from a bucket:
/// the files at the top of each pending version directory that are small enough to be an
/// `MLmodel` or an environment file but too large to live in the index, and not in `blobs`'
/// local cache. (None without a bucket.) The daemon fetches them with the index let go, so
/// that a slow or unreachable bucket holds up the validation alone, never the mount's other
/// requests, which all need the index.
pub fn contents_to_fetch(idx: &Index, blobs: &BlobStore, model: u64) -> io::Result<Vec<Hash>> {
    if blobs.remote().is_none() {
        return Ok(Vec::new());
    }
    let units: Vec<u64> = if is_direct(idx, model)? {
        vec![model]
    } else {
        idx.children(model, 0, usize::MAX >> 1)?
            .iter()
            .filter(|c| c.kind == Kind::Dir)
            .map(|c| c.ino)
            .collect()
    };
    let mut out = Vec::new();
    for dir in units {
        if idx
            .version_of_dir(dir)?
            .is_some_and(|v| v.status != VersionStatus::Pending)
        {
            continue;
        }
        for c in idx.children(dir, 0, usize::MAX >> 1)? {
            if c.kind == Kind::File
                && c.size > crate::store::INLINE_MAX
                && c.size <= mlmodel::MAX_MLMODEL_BYTES as u64
                && let Some(h) = c.hash
                && !blobs.cached(&h)
            {
                out.push(h);
            }
        }
    }
    Ok(out)
}

/// Finds the registered model and candidate version directory of `ino` (an entry below
/// `models/<name>/`, or `models/<name>` itself). `None` outside `models/`.
///
/// A file directly in `models/<name>/` belongs to the model directory itself (a model copied in
/// directly), as [`crate::fs`] counts a new one. The walk goes all the way up, however deep the
/// tree: stopping early would take an entry deep below a sealed version for one outside
/// `models/`. Only a cycle, which a sound index never has, ends it with an error.
pub fn unit_of(idx: &Index, ino: u64) -> io::Result<Option<Unit>> {
    let mut child: Option<(u64, Kind)> = None;
    let mut cur = ino;
    for _ in 0..(1u32 << 24) {
        let Some(e) = idx.get(cur)? else {
            return Ok(None);
        };
        if e.parent == MODELS_INO {
            return Ok(Some(Unit {
                model: cur,
                dir: match child {
                    Some((dir, Kind::Dir)) => dir,
                    _ => cur,
                },
            }));
        }
        if e.ino == MODELS_INO || e.parent == 0 {
            return Ok(None);
        }
        child = Some((cur, e.kind));
        cur = e.parent;
    }
    Err(io::Error::other(format!(
        "index: the parents of inode {ino} form a cycle"
    )))
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
    /// Not decided yet, to be looked at again: on a shared store, files may still arrive from
    /// another machine (the directory has not been quiet long enough, a file in it is being
    /// written, or another machine is validating it), or it changed during the validation.
    Deferred,
}

/// The digest of `dir`'s files as they are, if every one of them is sealed (`None` while a
/// file is still being written or awaits its seal, on any machine).
pub fn sealed_tree_digest(idx: &Index, dir: u64) -> io::Result<Option<String>> {
    let mut files = BTreeMap::new();
    for (rel, e) in idx.descendants(dir)? {
        if e.kind != Kind::File {
            continue;
        }
        match e.hash {
            Some(hash) if e.state == State::Live && !e.committed_open => {
                files.insert(rel, hash.to_hex());
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(tree_digest(&files)))
}

/// Validates every version directory of `model` that is PENDING (or not yet looked at),
/// recording the results.
/// Returns `(directory inode, outcome)` for each one looked at.
///
/// `quiet(dir, stamp)` says whether version directory `dir` has been quiet for the settle
/// time since its activity stamp (`model_versions.updated`, which every change in it sets,
/// on any machine) became `stamp`; asked on a shared store only (one daemon knows its own
/// activity). There a version is decided exactly once, by one machine:
/// - it is looked at once it is quiet and none of its files is still being written;
/// - one daemon at a time validates it ([`Index::claim_validation`]; the others defer);
/// - the decision is written in one transaction holding the index's write lock, and only if
///   the version is still PENDING with the same stamp and, for READY, its files are still the
///   ones validated, all sealed (a file created after the READY transaction finds the version
///   sealed: see `fs`).
pub fn settle_model(
    idx: &mut Index,
    blobs: &BlobStore,
    model: u64,
    now: i64,
    quiet: &mut dyn FnMut(u64, i64) -> bool,
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
    let shared = idx.is_shared();
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
        let Some(stamp) = idx.version_of_dir(dir)?.map(|v| v.updated) else {
            continue;
        };
        if shared && (!quiet(dir, stamp) || sealed_tree_digest(idx, dir)?.is_none()) {
            out.push((dir, Outcome::Deferred));
            continue;
        }
        if !idx.claim_validation(dir)? {
            out.push((dir, Outcome::Deferred));
            continue;
        }
        let decided = decide(idx, blobs, model, dir, direct, stamp, now);
        let released = idx.release_validation(dir);
        out.push((dir, decided?));
        released?;
    }
    if direct {
        // Subdirectories of a direct model are its parts, not versions.
        for c in children.iter().filter(|c| c.kind == Kind::Dir) {
            idx.version_delete(c.ino)?;
        }
    }
    Ok(out)
}

/// Validates version directory `dir` (PENDING with activity stamp `stamp`, claimed by this
/// daemon) and records the verdict, if the version is still as it was validated (see
/// [`settle_model`]).
fn decide(
    idx: &Index,
    blobs: &BlobStore,
    model: u64,
    dir: u64,
    direct: bool,
    stamp: i64,
    now: i64,
) -> io::Result<Outcome> {
    let as_validated = |idx: &Index| -> io::Result<bool> {
        Ok(idx
            .version_of_dir(dir)?
            .is_some_and(|v| v.status == VersionStatus::Pending && v.updated == stamp))
    };
    // (Another daemon may have decided it before this one got the claim.)
    if !as_validated(idx)? {
        return Ok(Outcome::Deferred);
    }
    let ready_subdirs = direct
        && idx
            .versions_of(model)?
            .iter()
            .any(|v| v.status == VersionStatus::Ready && v.dir_ino != model);
    let verdict = if ready_subdirs {
        Err(
            "MLmodel at the top of a registered model that already has versions in subdirectories"
                .into(),
        )
    } else {
        validate_dir(idx, blobs, dir)?
    };
    let shared = idx.is_shared();
    idx.write_locked(|idx| {
        if !as_validated(idx)? {
            return Ok(Outcome::Deferred);
        }
        match verdict {
            Ok(record) => {
                if shared && sealed_tree_digest(idx, dir)?.as_deref() != Some(&record.digest) {
                    return Ok(Outcome::Deferred);
                }
                Ok(Outcome::Ready(idx.version_ready(dir, &record, now)?))
            }
            Err(msg) => {
                idx.version_fail(dir, &msg, now)?;
                Ok(Outcome::Failed(msg))
            }
        }
    })
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
