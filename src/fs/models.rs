//! The file-system side of the model registry: what `models/` looks like and how changes in it
//! reach [`crate::registry`].
//!
//! - Every change below `models/<name>/` first asks whether a READY version seals it
//!   ([`ArtifactFs::model_guard`]) and afterwards marks its version directory PENDING and the
//!   model active ([`ArtifactFs::model_touch`]).
//! - [`ArtifactFs::tick`] (called periodically by the daemon, directly by tests) validates the
//!   pending versions of every model that has been quiet for the settle time.
//! - The registry's links (`3`, `latest`, `@alias`) are virtual symlinks with inode numbers from
//!   [`VIRT_BASE`] up; `ln -s`/`ln -sfn` and `rm` on `@alias` names set and remove aliases.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::access::{self, Credentials};
use super::{ArtifactFs, Attr, Caller, NodeKind, from_ns, lock, log_path};
use crate::error::{FsError, FsResult, Refusal};
use crate::namespace::{self, Place, Zone};
use crate::registry::{self, Outcome, Unit};
use crate::store::index::{Entry, Index, Kind, MODELS_INO, NewEntry, State, VersionStatus};
use crate::store::now_ns;

/// An extended attribute: name and value.
type NamedValue = (&'static str, Vec<u8>);

/// Inode numbers of registry links start here (index rows never get this high).
pub const VIRT_BASE: u64 = 1 << 56;

/// Extended attributes of a version directory.
pub const XATTR_STATUS: &str = "user.artifactfs.status";
pub const XATTR_VERSION: &str = "user.artifactfs.version";
pub const XATTR_MESSAGE: &str = "user.artifactfs.message";
pub const XATTR_DIGEST: &str = "user.artifactfs.digest";
/// `setxattr models/<name> user.artifactfs.register.<dir> <store path>` registers a directory of
/// the store as a new version `<dir>` without copying its bytes.
pub const XATTR_REGISTER_PREFIX: &str = "user.artifactfs.register.";

#[derive(Debug, Clone, Copy)]
struct Activity {
    last: Instant,
    /// Files open for writing below the model.
    open: usize,
}

#[derive(Default)]
struct Links {
    by_key: HashMap<(u64, Vec<u8>), u64>,
    by_ino: HashMap<u64, (u64, Vec<u8>)>,
    next: u64,
}

/// Registry state kept in memory by the daemon.
#[derive(Default)]
pub struct ModelState {
    activity: Mutex<HashMap<u64, Activity>>,
    links: Mutex<Links>,
    /// Symlinks `ln -sf` creates under a temporary name before renaming them to `@alias`:
    /// (model, name) → version number.
    /// One that is never renamed (an interrupted `ln -sfn`) is forgotten after
    /// [`TEMP_LINK_LIFETIME`].
    temp_links: Mutex<HashMap<LinkKey, (u64, Instant)>>,
    /// On a shared store: each pending version directory's activity stamp as this daemon last
    /// saw (or wrote) it, and since when (see `registry::settle_model`).
    stamps: Mutex<HashMap<u64, (i64, Instant)>>,
    /// When the pending versions of every model were last looked for (a shared store's other
    /// machines may leave some: see [`ArtifactFs::tick`]).
    last_pending_scan: Mutex<Option<Instant>>,
}

/// A registry link: (model directory's inode, name).
type LinkKey = (u64, Vec<u8>);

/// How often a shared store's daemon looks for versions left pending by any machine.
const PENDING_SCAN: Duration = Duration::from_secs(5);

/// How long a temporary link waits for its rename to `@alias`.
const TEMP_LINK_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

fn in_models(e: &Entry) -> bool {
    e.zone == Zone::ModelRoot as u8 || e.zone == Zone::ModelTree as u8
}

impl ModelState {
    fn bump(&self, model: u64, open_delta: isize) {
        let mut act = lock(&self.activity);
        let a = act.entry(model).or_insert(Activity {
            last: Instant::now(),
            open: 0,
        });
        a.last = Instant::now();
        a.open = a.open.saturating_add_signed(open_delta);
    }

    fn link_ino(&self, model: u64, name: &[u8]) -> u64 {
        let mut l = lock(&self.links);
        let key = (model, name.to_vec());
        if let Some(&ino) = l.by_key.get(&key) {
            return ino;
        }
        let ino = VIRT_BASE + l.next;
        l.next += 1;
        l.by_key.insert(key.clone(), ino);
        l.by_ino.insert(ino, key);
        ino
    }

    fn link_key(&self, ino: u64) -> Option<(u64, Vec<u8>)> {
        lock(&self.links).by_ino.get(&ino).cloned()
    }

    /// A link that is gone (a removed alias, a renamed or expired temporary link): its inode
    /// number is never reused, so a kernel that still holds it gets `ENOENT`.
    fn forget_link(&self, model: u64, name: &[u8]) {
        let mut l = lock(&self.links);
        if let Some(ino) = l.by_key.remove(&(model, name.to_vec())) {
            l.by_ino.remove(&ino);
        }
    }

    /// Entries kept in memory for links: (inode numbers, temporary links).
    #[cfg(test)]
    fn link_counts(&self) -> (usize, usize) {
        (lock(&self.links).by_ino.len(), lock(&self.temp_links).len())
    }
}

impl ArtifactFs {
    /// After a restart, versions left PENDING are validated once the settle time has passed.
    pub(super) fn resume_pending(&self) {
        let pending = self.store.index().models_with_pending().unwrap_or_default();
        for model in pending {
            self.models.bump(model, 0);
        }
    }

    /// The unit of entry `e` if it lies below `models/`.
    pub(super) fn model_unit(&self, idx: &Index, e: &Entry) -> FsResult<Option<Unit>> {
        if !in_models(e) {
            return Ok(None);
        }
        Ok(registry::unit_of(idx, e.ino)?)
    }

    /// Refuses a change to entry `e` (or inside directory `e`) when a READY version seals it.
    pub(super) fn model_guard(
        &self,
        idx: &Index,
        op: &str,
        e: &Entry,
        name: Option<&[u8]>,
    ) -> FsResult<Option<Unit>> {
        let Some(unit) = self.model_unit(idx, e)? else {
            return Ok(None);
        };
        if let Some(v) = registry::sealing_version(idx, unit)? {
            let model = idx.model(unit.model)?.map(|m| m.name).unwrap_or_default();
            let why = format!(
                "version {} of model {model} is READY: its directory is sealed",
                v.version.unwrap_or(0)
            );
            return Err(Self::deny(
                idx,
                op,
                e.ino,
                name,
                (Refusal::NotPermitted, why),
            ));
        }
        Ok(Some(unit))
    }

    /// An `MLmodel` put at the top of a model whose subdirectories hold READY versions would
    /// make it a model copied in directly and hide those versions (`latest`, the numbers, the
    /// `@alias` links): refused (`cp -r ./model/. models/<name>/` by mistake).
    pub(super) fn refuse_mlmodel_over_versions(
        &self,
        idx: &Index,
        op: &str,
        dir: &Entry,
        name: &[u8],
    ) -> FsResult<()> {
        if dir.zone != Zone::ModelRoot as u8 || dir.ino == MODELS_INO || name != registry::MLMODEL {
            return Ok(());
        }
        let versions = idx.versions_of(dir.ino)?;
        if versions
            .iter()
            .any(|v| v.status == VersionStatus::Ready && v.dir_ino != dir.ino)
        {
            let why = "the model has READY versions in its subdirectories: an MLmodel at its top would hide them";
            return Err(Self::deny(
                idx,
                op,
                dir.ino,
                Some(name),
                (Refusal::NotPermitted, why.into()),
            ));
        }
        Ok(())
    }

    /// On a shared store, after `ino` was created as `name` in `dir` below a model: asks
    /// [`ArtifactFs::model_guard`] again, and if another machine made the version READY
    /// meanwhile (between the first guard and the insert), removes the new entry and refuses.
    /// The READY transaction and the insert both hold the index's write lock, and READY is
    /// only written if every file of the version is sealed: either the READY comes first and
    /// this check sees it, or it sees the new entry and leaves the version PENDING.
    pub(super) fn model_guard_after(
        &self,
        idx: &Index,
        op: &str,
        dir: &Entry,
        name: &[u8],
        ino: u64,
    ) -> FsResult<()> {
        if !idx.is_shared() || !in_models(dir) || dir.ino == MODELS_INO {
            return Ok(());
        }
        if let Err(e) = self.model_guard(idx, op, dir, Some(name)) {
            idx.delete_row(ino)?;
            return Err(e);
        }
        Ok(())
    }

    /// Makes `change` to entry `e` below a model, which [`ArtifactFs::model_guard`] allowed
    /// (see [`ArtifactFs::unsealed_then`]); refused as the guard refuses it if the version was
    /// sealed since.
    pub(super) fn model_change<T>(
        &self,
        idx: &Index,
        op: &str,
        e: &Entry,
        unit: Unit,
        change: impl FnOnce(&Index) -> io::Result<T>,
    ) -> FsResult<T> {
        match self.unsealed_then(idx, &[unit], change)? {
            Some(t) => Ok(t),
            None => {
                self.model_guard(idx, op, e, None)?;
                Err(FsError::Refused(Refusal::NotPermitted))
            }
        }
    }

    /// Runs `change`, a change below models that [`ArtifactFs::model_guard`] allowed for
    /// `units`. On a shared store it runs in one transaction holding the index's write lock
    /// that first asks the seals again: another machine may have made one of the versions
    /// READY since the guard (its READY transaction holds the same lock). `None` (nothing
    /// changed) if one is sealed now.
    pub(super) fn unsealed_then<T>(
        &self,
        idx: &Index,
        units: &[Unit],
        change: impl FnOnce(&Index) -> io::Result<T>,
    ) -> FsResult<Option<T>> {
        if !idx.is_shared() || units.is_empty() {
            return Ok(Some(change(idx)?));
        }
        Ok(idx.write_locked(|idx| {
            for unit in units {
                if registry::sealing_version(idx, *unit)?.is_some() {
                    return Ok(None);
                }
            }
            change(idx).map(Some)
        })?)
    }

    /// Records a change below a model: its version directory is PENDING again and the model
    /// must be quiet for the settle time before it is validated.
    pub(super) fn model_touch(&self, idx: &Index, unit: Unit, mark_pending: bool) -> FsResult<()> {
        if mark_pending {
            let now = now_ns();
            if idx.version_touched(unit.dir, unit.model, now)? {
                log::info!("registry: {}: PENDING", log_path(&idx.path_of(unit.dir)?));
            }
            lock(&self.models.stamps).insert(unit.dir, (now, Instant::now()));
        }
        self.models.bump(unit.model, 0);
        Ok(())
    }

    /// Fetches into the cache what validating `model` will read from a bucket, with the
    /// index let go (see `registry::contents_to_fetch`).
    fn fetch_for_validation(&self, model: u64) -> std::io::Result<()> {
        if self.store.blobs.remote().is_none() {
            return Ok(()); // (nothing to fetch: no need to take the index)
        }
        let wanted = registry::contents_to_fetch(&self.store.index(), &self.store.blobs, model)?;
        if !wanted.is_empty() {
            log::info!(
                "registry: fetching {} content(s) of model inode {model} to validate it",
                wanted.len()
            );
        }
        for h in &wanted {
            self.store.blobs.open_blob(h)?;
        }
        Ok(())
    }

    /// A file below a model was opened for writing (`+1`) or released (`-1`), or written.
    pub(super) fn model_write_activity(&self, model: u64, open_delta: isize) {
        self.models.bump(model, open_delta);
    }

    /// The unit a new entry `name` in directory `dir` will belong to.
    pub(super) fn unit_for_new(
        &self,
        idx: &Index,
        dir: &Entry,
        new_ino: u64,
    ) -> FsResult<Option<Unit>> {
        if dir.zone == Zone::ModelRoot as u8 && dir.ino != MODELS_INO {
            // A directory made in models/<name>/ is a candidate version of its own; a file
            // there belongs to the model directory (a model copied in directly).
            let new_is_dir = idx.get(new_ino)?.is_some_and(|e| e.kind == Kind::Dir);
            return Ok(Some(Unit {
                model: dir.ino,
                dir: if new_is_dir { new_ino } else { dir.ino },
            }));
        }
        self.model_unit(idx, dir)
    }

    /// Periodic work: syncs the store when batched durability is due, and validates the
    /// pending versions of every model quiet for the settle time. Returns one line per
    /// registry transition (also logged).
    pub fn tick(&self, now: Instant) -> Vec<String> {
        if let Err(e) = self.store.sync_if_due() {
            log::warn!("syncing the store failed: {e}");
        }
        if let Err(e) = self.store.checkpoint() {
            log::warn!("checkpointing the index failed: {e}");
        }
        self.retry_abandoned();
        let expired: Vec<(u64, Vec<u8>)> = {
            let mut temps = lock(&self.models.temp_links);
            let old: Vec<_> = temps
                .iter()
                .filter(|(_, (_, made))| made.elapsed() > TEMP_LINK_LIFETIME)
                .map(|(k, _)| k.clone())
                .collect();
            for k in &old {
                temps.remove(k);
            }
            old
        };
        for (model, name) in expired {
            log::info!(
                "registry: temporary link {:?} was never renamed to @alias; dropped",
                String::from_utf8_lossy(&name)
            );
            self.models.forget_link(model, &name);
        }
        if let Err(e) = self.store.index().seal_pending() {
            log::warn!("sealing released files in the index failed (retried): {e}");
        }
        // Versions another machine left pending (it stopped or died before deciding them)
        // are looked at here too, now and then: right after a heartbeat found PostgreSQL there
        // (the query would hold the index while it waits for PostgreSQL).
        let alive = self.store.index().alive_at();
        let mut last = lock(&self.models.last_pending_scan);
        if let Some(alive) = alive
            && last.is_none_or(|l| alive > l && l.elapsed() >= PENDING_SCAN)
        {
            *last = Some(Instant::now());
            drop(last);
            self.resume_pending();
        } else {
            drop(last);
        }
        let due: Vec<u64> = {
            let mut act = lock(&self.models.activity);
            let due: Vec<u64> = act
                .iter()
                .filter(|(_, a)| {
                    a.open == 0 && now.saturating_duration_since(a.last) >= self.opts.settle
                })
                .map(|(m, _)| *m)
                .collect();
            for m in &due {
                act.remove(m);
            }
            due
        };
        let mut lines = Vec::new();
        for model in due {
            // What the validation will read from a bucket is fetched first, with the index let
            // go (see `registry::contents_to_fetch`).
            if let Err(e) = self.fetch_for_validation(model) {
                log::warn!("registry: model inode {model} is validated later: {e}");
                self.models.bump(model, 0);
                continue;
            }
            let mut idx = self.store.index();
            let settle = self.opts.settle;
            let mut quiet = |dir: u64, stamp: i64| {
                let mut stamps = lock(&self.models.stamps);
                match stamps.get(&dir) {
                    Some((seen, since)) if *seen == stamp => since.elapsed() >= settle,
                    _ => {
                        stamps.insert(dir, (stamp, Instant::now()));
                        false
                    }
                }
            };
            let settled =
                registry::settle_model(&mut idx, &self.store.blobs, model, now_ns(), &mut quiet);
            let outcomes = match settled {
                Ok(o) => o,
                Err(e) => {
                    log::warn!("settling model inode {model} failed: {e}");
                    drop(idx);
                    self.models.bump(model, 0);
                    continue;
                }
            };
            if outcomes.iter().any(|(_, o)| *o == Outcome::Deferred) {
                self.models.bump(model, 0);
            }
            for (dir, outcome) in outcomes {
                if outcome != Outcome::Deferred {
                    lock(&self.models.stamps).remove(&dir);
                }
                let path = idx.path_of(dir).unwrap_or_default();
                let line = match outcome {
                    Outcome::Ready(n) => format!("/{}: READY as version {n}", path.display()),
                    Outcome::Failed(msg) => format!("/{}: FAILED: {msg}", path.display()),
                    Outcome::NotAModel | Outcome::Deferred => continue,
                };
                log::info!("registry: {line}");
                lines.push(line);
            }
        }
        lines
    }

    // ----- registry links --------------------------------------------------------------------

    fn link_attr(&self, model: &Entry, name: &[u8], target_len: usize, time: i64) -> Attr {
        Attr {
            ino: self.models.link_ino(model.ino, name),
            generation: 0,
            kind: NodeKind::Symlink,
            size: target_len as u64,
            perm: 0o777,
            uid: self.opts.uid.unwrap_or(model.uid),
            gid: self.opts.gid.unwrap_or(model.gid),
            mtime: from_ns(time),
            atime: from_ns(time),
            ctime: from_ns(time),
            crtime: from_ns(time),
            nlink: 1,
            sealed: false,
            stable: false,
        }
    }

    /// Where registry link `name` of model directory `model` points (a version directory's
    /// name), and when it last changed.
    fn link_target(
        &self,
        idx: &Index,
        model: &Entry,
        name: &[u8],
    ) -> FsResult<Option<(Vec<u8>, i64)>> {
        let version = match lock(&self.models.temp_links).get(&(model.ino, name.to_vec())) {
            Some(&(n, _)) => idx.version_number(model.ino, n)?,
            None => registry::link(idx, model.ino, name)?,
        };
        let Some(v) = version else { return Ok(None) };
        let dir = idx
            .get(v.dir_ino)?
            .ok_or(FsError::Refused(Refusal::NotFound))?;
        Ok(Some((dir.name, v.updated)))
    }

    /// A registry link in model directory `model`, if `name` is one.
    pub(super) fn lookup_link(
        &self,
        idx: &Index,
        model: &Entry,
        name: &[u8],
    ) -> FsResult<Option<Attr>> {
        if model.zone != Zone::ModelRoot as u8 {
            return Ok(None);
        }
        Ok(self
            .link_target(idx, model, name)?
            .map(|(t, time)| self.link_attr(model, name, t.len(), time)))
    }

    /// All registry links of model directory `model` (empty for other directories), in one
    /// pass over its versions and aliases.
    pub(super) fn list_links(&self, idx: &Index, model: &Entry) -> FsResult<Vec<(Vec<u8>, Attr)>> {
        if model.zone != Zone::ModelRoot as u8 {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut dir_names: HashMap<u64, usize> = HashMap::new();
        for (name, v) in registry::links(idx, model.ino)? {
            let len = match dir_names.get(&v.dir_ino) {
                Some(&len) => len,
                None => {
                    let Some(dir) = idx.get(v.dir_ino)? else {
                        continue;
                    };
                    dir_names.insert(v.dir_ino, dir.name.len());
                    dir.name.len()
                }
            };
            let attr = self.link_attr(model, &name, len, v.updated);
            out.push((name, attr));
        }
        let temps: Vec<Vec<u8>> = lock(&self.models.temp_links)
            .keys()
            .filter(|(m, _)| *m == model.ino)
            .map(|(_, n)| n.clone())
            .collect();
        for name in temps {
            if let Some(attr) = self.lookup_link(idx, model, &name)? {
                out.push((name, attr));
            }
        }
        Ok(out)
    }

    /// Attributes of a registry link by inode number.
    pub(super) fn link_getattr(&self, ino: u64) -> FsResult<Attr> {
        let (model, name) = self
            .models
            .link_key(ino)
            .ok_or(FsError::Refused(Refusal::NotFound))?;
        let idx = self.store.index();
        let m = Self::dir(&idx, model)?;
        self.lookup_link(&idx, &m, &name)?
            .ok_or(FsError::Refused(Refusal::NotFound))
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let (model, name) = self
            .models
            .link_key(ino)
            .ok_or(FsError::Refused(Refusal::NotFound))?;
        let idx = self.store.index();
        let m = Self::dir(&idx, model)?;
        Ok(self
            .link_target(&idx, &m, &name)?
            .ok_or(FsError::Refused(Refusal::NotFound))?
            .0)
    }

    /// `ln -s TARGET models/<name>/@alias` sets an alias; under a temporary link name
    /// ([`namespace::is_temp_link_name`]) it is the link `ln -sfn` renames over an existing
    /// alias. Any other symlink: refused (`NotPermitted`, logged).
    pub fn symlink(
        &self,
        _caller: Caller,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> FsResult<Attr> {
        let idx = self.store.index();
        self.read_only(&idx, "symlink", parent, Some(name))?;
        let dir = Self::dir(&idx, parent)?;
        if dir.zone != Zone::ModelRoot as u8 || registry::is_direct(&idx, dir.ino)? {
            return Err(Self::deny(
                &idx,
                "symlink",
                parent,
                Some(name),
                namespace::special_file("symbolic links (other than aliases in models/<name>/)")
                    .unwrap_err(),
            ));
        }
        if idx
            .lookup(parent, name)?
            .is_some_and(|e| e.state != State::Tombstone)
            || self.link_target(&idx, &dir, name)?.is_some()
        {
            return Err(FsError::Refused(Refusal::Exists));
        }
        if !namespace::is_registry_name(name) && !namespace::is_temp_link_name(name) {
            return Err(Self::deny(
                &idx,
                "symlink",
                parent,
                Some(name),
                namespace::special_file(
                    "symbolic links (other than @alias, and the temporary link ln -sfn renames to it)",
                )
                .unwrap_err(),
            ));
        }
        let Some(version) = registry::resolve_target(&idx, dir.ino, target)? else {
            let why = format!(
                "{:?} is not a READY version of this model (use a version number, latest, an alias or a version directory)",
                String::from_utf8_lossy(target)
            );
            return Err(Self::deny(
                &idx,
                "symlink",
                parent,
                Some(name),
                (Refusal::Invalid, why),
            ));
        };
        let number = version.version.unwrap_or(0);
        if let Some(alias) = name.strip_prefix(b"@") {
            namespace::check_alias(alias)
                .map_err(|r| Self::deny(&idx, "symlink", parent, Some(name), r))?;
            idx.alias_set(dir.ino, &String::from_utf8_lossy(alias), number)?;
            log::info!(
                "registry: alias @{} -> version {number} of /{}",
                String::from_utf8_lossy(alias),
                idx.path_of(dir.ino)?.display()
            );
        } else if namespace::is_registry_name(name) {
            return Err(Self::deny(
                &idx,
                "symlink",
                parent,
                Some(name),
                (
                    Refusal::NotPermitted,
                    "version numbers and latest are maintained by the registry".into(),
                ),
            ));
        } else {
            namespace::check_name(name)
                .map_err(|r| Self::deny(&idx, "symlink", parent, Some(name), r))?;
            lock(&self.models.temp_links)
                .insert((dir.ino, name.to_vec()), (number, Instant::now()));
        }
        self.lookup_link(&idx, &dir, name)?
            .ok_or(FsError::Refused(Refusal::NotFound))
    }

    /// `unlink` of a registry link: removes an alias (or a temporary link); versions and
    /// `latest` cannot be removed. `None` when `name` is not a link.
    pub(super) fn unlink_link(
        &self,
        idx: &Index,
        dir: &Entry,
        name: &[u8],
    ) -> Option<FsResult<()>> {
        if dir.zone != Zone::ModelRoot as u8 {
            return None;
        }
        if lock(&self.models.temp_links)
            .remove(&(dir.ino, name.to_vec()))
            .is_some()
        {
            self.models.forget_link(dir.ino, name);
            return Some(Ok(()));
        }
        if !namespace::is_registry_name(name) {
            return None;
        }
        Some((|| {
            if let Some(alias) = name.strip_prefix(b"@")
                && idx.alias_remove(dir.ino, &String::from_utf8_lossy(alias))?
            {
                self.models.forget_link(dir.ino, name);
                log::info!(
                    "registry: alias @{} removed from /{}",
                    String::from_utf8_lossy(alias),
                    idx.path_of(dir.ino)?.display()
                );
                return Ok(());
            }
            if self.link_target(idx, dir, name)?.is_some() {
                return Err(Self::deny(
                    idx,
                    "unlink",
                    dir.ino,
                    Some(name),
                    (
                        Refusal::NotPermitted,
                        "version links and latest are maintained by the registry".into(),
                    ),
                ));
            }
            Err(FsError::Refused(Refusal::NotFound))
        })())
    }

    /// `rename` of a temporary link (or an alias) to `@alias` in the same model: how `ln -sfn`
    /// moves an alias. `None` when the source is not a registry link.
    pub(super) fn rename_link(
        &self,
        idx: &Index,
        dir: &Entry,
        name: &[u8],
        new_dir: &Entry,
        new_name: &[u8],
    ) -> Option<FsResult<()>> {
        if dir.zone != Zone::ModelRoot as u8 {
            return None;
        }
        let temp = lock(&self.models.temp_links)
            .get(&(dir.ino, name.to_vec()))
            .map(|&(n, _)| n);
        let number = match temp {
            Some(n) => n,
            None if name.starts_with(b"@") => match self.link_target(idx, dir, name) {
                Ok(Some(_)) => {
                    let alias = String::from_utf8_lossy(&name[1..]).into_owned();
                    idx.aliases_of(dir.ino)
                        .ok()?
                        .into_iter()
                        .find(|(a, _)| *a == alias)?
                        .1
                }
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            },
            None => return None,
        };
        Some((|| {
            let Some(alias) = new_name
                .strip_prefix(b"@")
                .filter(|_| new_dir.ino == dir.ino)
            else {
                return Err(Self::deny(
                    idx,
                    "rename",
                    dir.ino,
                    Some(name),
                    (
                        Refusal::NotPermitted,
                        "a registry link can only become @alias in the same model".into(),
                    ),
                ));
            };
            namespace::check_alias(alias)
                .map_err(|r| Self::deny(idx, "rename", dir.ino, Some(new_name), r))?;
            idx.alias_set(dir.ino, &String::from_utf8_lossy(alias), number)?;
            if temp.is_some() {
                lock(&self.models.temp_links).remove(&(dir.ino, name.to_vec()));
            } else {
                idx.alias_remove(dir.ino, &String::from_utf8_lossy(&name[1..]))?;
            }
            self.models.forget_link(dir.ino, name);
            log::info!(
                "registry: alias @{} -> version {number} of /{}",
                String::from_utf8_lossy(alias),
                idx.path_of(dir.ino)?.display()
            );
            Ok(())
        })())
    }

    // ----- state as extended attributes ----------------------------------------------------

    /// The registry xattrs of a version directory (`None`: not a version directory).
    pub(super) fn version_xattrs(
        &self,
        idx: &Index,
        e: &Entry,
    ) -> FsResult<Option<Vec<NamedValue>>> {
        if !in_models(e) || e.kind != Kind::Dir {
            return Ok(None);
        }
        let Some(v) = idx.version_of_dir(e.ino)? else {
            return Ok(None);
        };
        let mut out = vec![(XATTR_STATUS, v.status.as_str().as_bytes().to_vec())];
        if let Some(n) = v.version.filter(|_| v.status == VersionStatus::Ready) {
            out.push((XATTR_VERSION, n.to_string().into_bytes()));
            out.push((XATTR_DIGEST, v.record.digest.into_bytes()));
        }
        if !v.message.is_empty() {
            out.push((XATTR_MESSAGE, v.message.into_bytes()));
        }
        Ok(Some(out))
    }

    // ----- registration without copying ------------------------------------------------------

    /// Registers store directory `source` (e.g. `runs/<id>/artifacts/model`) as version
    /// directory `dir_name` of model directory `model` by recording its files again: the same
    /// blobs, no bytes copied. The version validates like any other.
    ///
    /// The source must be a model directory (an `MLmodel` file at its top) strictly below
    /// `runs/<id>/`, so a registration never reaches the store root, `runs/`, a whole run,
    /// another model or itself (`Invalid`). The caller must be allowed to copy it, as the kernel
    /// would decide for `cp -r`: search permission on every directory of its path, read and
    /// search on every directory of the tree, read on every file (`AccessDenied`; nothing about
    /// what lies behind a directory the caller may not search is revealed). A tree with a file
    /// still open for writing is refused (`Busy`): a version never holds a half-written file.
    /// All rows are inserted in one transaction: a failure leaves no partial version.
    pub fn register_from(
        &self,
        caller: Caller,
        model: u64,
        dir_name: &[u8],
        source: &[u8],
    ) -> FsResult<Attr> {
        let idx = self.store.index();
        self.read_only(&idx, "register", model, Some(dir_name))?;
        let m = Self::dir(&idx, model)?;
        // (A setgid model directory passes its group and the bit on, as to a `cp -r`.)
        let (uid, gid) = self.owner_in(caller, &m);
        let place = namespace::place_of(m.ino, m.zone);
        let deny =
            |rule: (Refusal, String)| Self::deny(&idx, "register", model, Some(dir_name), rule);
        if place != Place::ModelRoot {
            return Err(deny((
                Refusal::Invalid,
                "register into models/<name>/".into(),
            )));
        }
        namespace::mkdir(place, dir_name).map_err(deny)?;
        self.model_guard(&idx, "register", &m, Some(dir_name))?;
        let shown = String::from_utf8_lossy(source);
        let creds = Credentials::of(caller);
        let src = match self.resolve_as(&idx, &creds, source)? {
            Resolved::Found(e) if e.kind == Kind::Dir => e,
            Resolved::Denied(at) => {
                let why = format!("permission denied: the caller may not search /{at}");
                return Err(deny((Refusal::AccessDenied, why)));
            }
            _ => {
                let why = format!("{shown:?} is not a directory of the store");
                return Err(deny((Refusal::NotFound, why)));
            }
        };
        let src_place = namespace::place_of(src.ino, src.zone);
        let has_mlmodel = matches!(
            idx.lookup(src.ino, crate::mlmodel::MLMODEL_FILE_NAME.as_bytes())?,
            Some(e) if e.kind == Kind::File && e.state != State::Tombstone
        );
        if src_place != Place::RunTree || !has_mlmodel {
            let what = if src_place != Place::RunTree {
                "is not below runs/<id>/"
            } else {
                "has no MLmodel file at its top"
            };
            let why = format!(
                "source /{} {what}: a source must be a model directory (MLmodel at its top) \
                 strictly below runs/<id>/",
                idx.path_of(src.ino)?.display()
            );
            return Err(deny((Refusal::Invalid, why)));
        }
        let src_path = idx.path_of(src.ino)?;
        let dir_want = access::READ | access::SEARCH;
        if !creds.reads_all && !creds.may(&self.attr_of(&src), dir_want) {
            let why = format!(
                "permission denied: the caller may not read /{}",
                src_path.display()
            );
            return Err(deny((Refusal::AccessDenied, why)));
        }
        let now = now_ns();
        let owner = Owner {
            uid,
            gid,
            setgid: m.mode & libc::S_ISGID,
        };
        // The version directory, hidden until every row below it is in: the tree is copied in
        // short transactions, other requests are served in between, and nobody ever sees a
        // partial version (a crash drops it at the next start).
        let mut top = copy_of(model, dir_name, &src, owner, now);
        top.state = State::Writing;
        let Some(vdir) = idx.insert(&top)? else {
            return Err(FsError::Refused(Refusal::Exists));
        };
        drop(idx);
        let copied = self.copy_tree(&creds, src.ino, &src_path, vdir, owner, now);
        #[cfg(test)]
        if let Some(hook) = tests::AFTER_COPY.with(|h| h.borrow_mut().take()) {
            hook(self);
        }
        let idx = self.store.index();
        let source_text = src_path.to_string_lossy().into_owned();
        let finished = match copied {
            Ok(Ok(count)) => idx
                .write_locked(|idx| {
                    // The model may have become a READY version itself meanwhile (an `MLmodel`
                    // copied to its top, validated while this copied), or gone: the tree is
                    // revealed only where the guard at the start would still let it in.
                    let gone = idx.get(model)?.is_none_or(|m| m.state == State::Tombstone);
                    let unit = Unit { model, dir: model };
                    if gone || registry::sealing_version(idx, unit)?.is_some() {
                        return Ok(false);
                    }
                    idx.reveal_dir(vdir)?;
                    idx.version_pending(vdir, model, now)?;
                    idx.version_source(vdir, &source_text)?;
                    Ok(true)
                })
                .map_err(FsError::from)
                .and_then(|revealed| match revealed {
                    true => Ok(count),
                    false => Err(Self::deny(
                        &idx,
                        "register",
                        model,
                        Some(dir_name),
                        (
                            Refusal::NotPermitted,
                            "the model became a READY version (or was removed) while the tree was copied".into(),
                        ),
                    )),
                }),
            Ok(Err(rule)) => Err(Self::deny(&idx, "register", model, Some(dir_name), rule)),
            Err(e) => Err(e),
        };
        let count = match finished {
            Ok(count) => count,
            Err(e) => {
                if let Err(d) = idx.delete_tree(vdir) {
                    log::warn!("registry: a failed registration's rows stay until restart: {d}");
                }
                return Err(e);
            }
        };
        log::info!(
            "registry: {} registered from {} ({count} entries, no bytes copied)",
            log_path(&idx.path_of(vdir)?),
            log_path(&src_path),
        );
        self.models.bump(model, 0);
        // Its activity stamp is this daemon's own: quiet once the settle time has passed.
        lock(&self.models.stamps).insert(vdir, (now, Instant::now()));
        let e = idx.get(vdir)?.ok_or(FsError::Refused(Refusal::NotFound))?;
        drop(idx);
        Ok(self.attr_of(&e))
    }

    /// Copies the rows below store directory `from` to below `to`, [`REGISTER_BATCH`] rows per
    /// transaction, the index free for other requests in between. Checks each entry as it
    /// goes: readable by `creds` (directories also searchable), and no file still open for
    /// writing. Returns the number of rows copied, or the refusal (with its log sentence).
    fn copy_tree(
        &self,
        creds: &Credentials,
        from: u64,
        from_path: &Path,
        to: u64,
        owner: Owner,
        now: i64,
    ) -> FsResult<Result<usize, (Refusal, String)>> {
        let mut queue = std::collections::VecDeque::from([(from, to, from_path.to_path_buf())]);
        let mut count = 0;
        while let Some((from, to, path)) = queue.pop_front() {
            let mut after = 0;
            let mut waited = None;
            loop {
                let idx = self.store.index();
                let batch = idx.children(from, after, REGISTER_BATCH)?;
                let Some(last) = batch.last() else { break };
                let next = last.ino;
                let at = |e: &Entry| path.join(std::ffi::OsStr::from_bytes(&e.name));
                for e in &batch {
                    let want = match e.kind {
                        Kind::Dir => access::READ | access::SEARCH,
                        Kind::File => access::READ,
                    };
                    if !creds.reads_all && !creds.may(&self.attr_of(e), want) {
                        let why = format!(
                            "permission denied: the caller may not read /{}",
                            at(e).display()
                        );
                        return Ok(Err((Refusal::AccessDenied, why)));
                    }
                }
                // (A row committed while still open counts as being written when its writer
                // is on another machine: `is_sealed_row`, which takes `writing` itself.)
                let busy = batch.iter().find(|e| {
                    e.kind == Kind::File
                        && (!self.is_sealed_row(e) || lock(&self.writing).contains_key(&e.ino))
                });
                if let Some(e) = busy {
                    // (A live row is busy only while a release, here or on another machine,
                    // may be on its way.)
                    if waited != Some(e.ino)
                        && (e.state == State::Live || lock(&self.writing).contains_key(&e.ino))
                    {
                        // A release already on its way (close() returned a moment ago): the
                        // same grace as open(), then this batch again.
                        let ino = e.ino;
                        drop(idx);
                        self.wait_released(ino);
                        waited = Some(ino);
                        continue;
                    }
                    let why = format!(
                        "the source is still being written (/{} is open for writing)",
                        at(e).display()
                    );
                    return Ok(Err((Refusal::Busy, why)));
                }
                let dirs = idx.write_locked(|idx| {
                    let mut dirs = Vec::new();
                    for e in &batch {
                        let ino = idx
                            .insert(&copy_of(to, &e.name, e, owner, now))?
                            .ok_or_else(|| io::Error::other("a copied name is taken"))?;
                        if e.kind == Kind::Dir {
                            dirs.push((e.ino, ino, at(e)));
                        }
                    }
                    Ok(dirs)
                })?;
                count += batch.len();
                after = next;
                queue.extend(dirs);
                // The index's mutex is not fair: without a pause this thread would take it
                // straight back, and a waiting request could starve for many batches.
                drop(idx);
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        Ok(Ok(count))
    }

    /// Resolves a `/`-separated store path (leading, doubled and trailing slashes and `.`
    /// ignored; `..` never resolves) as `creds` may: a directory they may not search stops the
    /// walk with its path, as the kernel's lookup would stop with `EACCES`.
    fn resolve_as(&self, idx: &Index, creds: &Credentials, path: &[u8]) -> FsResult<Resolved> {
        let Some(mut cur) = idx.get(crate::store::index::ROOT_INO)? else {
            return Ok(Resolved::Missing);
        };
        for name in path.split(|&b| b == b'/') {
            if name.is_empty() || name == b"." {
                continue;
            }
            if name == b".." || name.contains(&0) || cur.kind != Kind::Dir {
                return Ok(Resolved::Missing);
            }
            if !creds.may(&self.attr_of(&cur), access::SEARCH) {
                return Ok(Resolved::Denied(
                    idx.path_of(cur.ino)?.display().to_string(),
                ));
            }
            cur = match idx.lookup(cur.ino, name)? {
                Some(e) if e.state != State::Tombstone => e,
                _ => return Ok(Resolved::Missing),
            };
        }
        Ok(Resolved::Found(cur))
    }
}

/// Rows a registration copies per transaction.
const REGISTER_BATCH: usize = 1000;

/// The row of a registered version's copy of entry `e`: same content and mode (a directory's
/// with the model directory's setgid bit), new owner.
fn copy_of<'a>(parent: u64, name: &'a [u8], e: &Entry, owner: Owner, now: i64) -> NewEntry<'a> {
    NewEntry {
        parent,
        name,
        kind: e.kind,
        state: State::Live,
        zone: Zone::ModelTree as u8,
        hash: e.hash,
        size: e.size,
        mode: match e.kind {
            Kind::Dir => e.mode | owner.setgid,
            Kind::File => e.mode,
        },
        uid: owner.uid,
        gid: owner.gid,
        time: now,
    }
}

/// Who owns the entries a registration by reference makes, and the setgid bit its
/// directories get (that of the model directory).
#[derive(Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
    setgid: u32,
}

/// What [`ArtifactFs::resolve_as`] found.
enum Resolved {
    Found(Entry),
    Missing,
    /// The path of the first directory the caller may not search.
    Denied(String),
}

use std::os::unix::ffi::OsStrExt;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::SetAttr;
    use crate::store::Store;
    use crate::store::index::RUNS_INO;
    use std::path::Path;
    use std::time::Duration;

    const ME: Caller = Caller {
        uid: 0,
        gid: 0,
        pid: 0,
    };

    fn fixtures() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mlflow")
    }

    fn new_fs(dir: &Path) -> ArtifactFs {
        ArtifactFs::new(
            Store::open_writable(dir).unwrap(),
            super::super::FsOptions::default(),
        )
    }

    fn settle(fs: &ArtifactFs) -> Vec<String> {
        fs.tick(Instant::now() + Duration::from_secs(3600))
    }

    fn write(fs: &ArtifactFs, dir: u64, name: &[u8], data: &[u8]) -> FsResult<u64> {
        let (a, fh) = fs.create(ME, dir, name, 0o644)?;
        fs.write(fh, 0, data)?;
        fs.release(fh)?;
        Ok(a.ino)
    }

    /// `cp -r src dir/name` through the file-system logic.
    /// Model `iris` with a READY version `v1` (a copy of the `sklearn_iris` fixture).
    fn iris_with_ready_v1(fs: &ArtifactFs) -> (u64, u64) {
        let iris = fs.mkdir(ME, MODELS_INO, b"iris", 0o755).unwrap().ino;
        let v1 = copy_in(fs, &fixtures().join("sklearn_iris"), iris, b"v1");
        settle(fs);
        assert_eq!(xattr(fs, v1, XATTR_STATUS).as_deref(), Some("READY"));
        (iris, v1)
    }

    fn copy_in(fs: &ArtifactFs, src: &Path, dir: u64, name: &[u8]) -> u64 {
        let d = fs.mkdir(ME, dir, name, 0o755).unwrap().ino;
        let mut entries: Vec<_> = std::fs::read_dir(src)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let n = e.file_name();
            if e.file_type().unwrap().is_dir() {
                copy_in(fs, &e.path(), d, n.as_bytes());
            } else {
                write(fs, d, n.as_bytes(), &std::fs::read(e.path()).unwrap()).unwrap();
            }
        }
        d
    }

    type Hook = Box<dyn FnOnce(&ArtifactFs)>;

    thread_local! {
        /// Run by a registration by reference between its copy and its reveal (once).
        pub(super) static AFTER_COPY: std::cell::RefCell<Option<Hook>> =
            const { std::cell::RefCell::new(None) };
    }

    fn xattr(fs: &ArtifactFs, ino: u64, name: &str) -> Option<String> {
        fs.getxattr(ino, name.as_bytes())
            .ok()
            .map(|v| String::from_utf8(v).unwrap())
    }

    fn refusal<T: std::fmt::Debug>(r: FsResult<T>) -> Refusal {
        match r {
            Err(FsError::Refused(k)) => k,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn names(fs: &ArtifactFs, dir: u64) -> Vec<String> {
        fs.readdir(dir, 0, 1000)
            .unwrap()
            .into_iter()
            .map(|e| String::from_utf8(e.name).unwrap())
            .filter(|n| n != "." && n != "..")
            .collect()
    }

    #[test]
    fn fixtures_are_accepted_and_rejected_as_their_readme_says() {
        let d = tempfile::tempdir().unwrap();
        let fs = new_fs(d.path());
        let iris = fs.mkdir(ME, MODELS_INO, b"iris", 0o755).unwrap().ino;
        let cases = [
            ("sklearn_iris", Some("READY"), ""),
            ("sklearn_nosig", Some("READY"), ""),
            ("broken_invalid_yaml", Some("FAILED"), "not valid YAML"),
            ("broken_empty_mlmodel", Some("FAILED"), "empty"),
            ("broken_no_flavors", Some("FAILED"), "flavors"),
            ("broken_missing_model_file", Some("FAILED"), "model.pkl"),
            (
                "hostile_path_escape",
                Some("FAILED"),
                "outside the model directory",
            ),
            ("pyfunc_custom", Some("READY"), ""),
            ("broken_no_mlmodel", None, ""),
        ];
        let dirs: Vec<u64> = cases
            .iter()
            .map(|(f, _, _)| copy_in(&fs, &fixtures().join(f), iris, f.as_bytes()))
            .collect();
        for &dir in &dirs {
            assert_eq!(
                xattr(&fs, dir, XATTR_STATUS).as_deref(),
                Some("PENDING")
                    .filter(|_| dir != dirs[cases.len() - 1])
                    .or(xattr(&fs, dir, XATTR_STATUS).as_deref())
            );
        }
        let lines = settle(&fs);
        assert_eq!(lines.len(), cases.len() - 1, "{lines:?}");
        let mut numbers = Vec::new();
        for ((fixture, status, msg), dir) in cases.iter().zip(&dirs) {
            assert_eq!(
                xattr(&fs, *dir, XATTR_STATUS).as_deref(),
                *status,
                "{fixture}"
            );
            if *status == Some("FAILED") {
                let m = xattr(&fs, *dir, XATTR_MESSAGE).unwrap();
                assert!(m.contains(msg), "{fixture}: {m}");
                assert_eq!(xattr(&fs, *dir, XATTR_VERSION), None);
            }
            if *status == Some("READY") {
                numbers.push(xattr(&fs, *dir, XATTR_VERSION).unwrap());
                assert_eq!(xattr(&fs, *dir, XATTR_DIGEST).unwrap().len(), 64);
            }
        }
        // Versions settling in the same pass get distinct numbers.
        numbers.sort();
        assert_eq!(numbers, ["1", "2", "3"]);
        let listing = names(&fs, iris);
        for link in ["1", "2", "3", "latest"] {
            assert!(listing.contains(&link.to_string()), "{listing:?}");
        }
        let latest = fs.lookup(iris, b"latest").unwrap();
        assert_eq!(latest.kind, NodeKind::Symlink);
        assert_eq!(fs.readlink(latest.ino).unwrap(), b"pyfunc_custom");
    }

    #[test]
    fn a_version_without_the_requirements_its_python_env_names_fails() {
        let d = tempfile::tempdir().unwrap();
        let fs = new_fs(d.path());
        let iris = fs.mkdir(ME, MODELS_INO, b"iris", 0o755).unwrap().ino;
        // sklearn_iris without requirements.txt, which its python_env.yaml names (`-r`).
        let src = d.path().join("no_requirements");
        std::fs::create_dir(&src).unwrap();
        for e in std::fs::read_dir(fixtures().join("sklearn_iris")).unwrap() {
            let e = e.unwrap();
            if e.file_name() != "requirements.txt" {
                std::fs::copy(e.path(), src.join(e.file_name())).unwrap();
            }
        }
        let bad = copy_in(&fs, &src, iris, b"bad");
        settle(&fs);
        assert_eq!(xattr(&fs, bad, XATTR_STATUS).as_deref(), Some("FAILED"));
        assert_eq!(
            xattr(&fs, bad, XATTR_MESSAGE).unwrap(),
            "python_env.yaml: -r names requirements.txt, which does not exist"
        );
        // Writing the missing file makes it a version.
        write(&fs, bad, b"requirements.txt", b"mlflow==3.17.2\n").unwrap();
        settle(&fs);
        assert_eq!(xattr(&fs, bad, XATTR_STATUS).as_deref(), Some("READY"));
    }

    #[test]
    fn ready_versions_are_sealed_and_drafts_can_be_removed() {
        let d = tempfile::tempdir().unwrap();
        let fs = new_fs(d.path());
        let iris = fs.mkdir(ME, MODELS_INO, b"iris", 0o755).unwrap().ino;
        let v1 = copy_in(&fs, &fixtures().join("sklearn_iris"), iris, b"v1");
        let bad = copy_in(&fs, &fixtures().join("broken_no_flavors"), iris, b"bad");
        settle(&fs);
        let mlmodel = fs.lookup(v1, b"MLmodel").unwrap().ino;
        assert_eq!(refusal(write(&fs, v1, b"new", b"x")), Refusal::NotPermitted);
        assert_eq!(
            refusal(fs.mkdir(ME, v1, b"sub", 0o755)),
            Refusal::NotPermitted
        );
        assert_eq!(refusal(fs.unlink(v1, b"MLmodel")), Refusal::NotPermitted);
        assert_eq!(
            refusal(fs.rename(v1, b"MLmodel", v1, b"M2", false)),
            Refusal::NotPermitted
        );
        assert_eq!(refusal(fs.rmdir(iris, b"v1")), Refusal::NotPermitted);
        assert!(
            fs.setattr(
                mlmodel,
                SetAttr {
                    mode: Some(0o400),
                    ..Default::default()
                }
            )
            .is_ok()
        );
        // The FAILED draft is removed with rm -r, and its name can be used again.
        for n in names(&fs, bad) {
            fs.unlink(bad, n.as_bytes()).unwrap();
        }
        fs.rmdir(iris, b"bad").unwrap();
        let again = copy_in(&fs, &fixtures().join("sklearn_nosig"), iris, b"bad");
        settle(&fs);
        assert_eq!(xattr(&fs, again, XATTR_VERSION).as_deref(), Some("2"));
        // Numeric names, latest and @names are the registry's.
        assert_eq!(
            refusal(fs.mkdir(ME, iris, b"7", 0o755)),
            Refusal::NotPermitted
        );
        assert_eq!(refusal(fs.unlink(iris, b"latest")), Refusal::NotPermitted);
    }

    #[test]
    fn a_slow_writer_gets_a_provisional_failure_then_ready() {
        let d = tempfile::tempdir().unwrap();
        let fs = new_fs(d.path());
        let iris = fs.mkdir(ME, MODELS_INO, b"iris", 0o755).unwrap().ino;
        let v = fs.mkdir(ME, iris, b"v1", 0o755).unwrap().ino;
        let src = fixtures().join("sklearn_iris");
        // save_model writes the model file and MLmodel, then pauses before the env files.
        for f in [
            "model.skops",
            "MLmodel",
            "input_example.json",
            "serving_input_example.json",
        ] {
            write(&fs, v, f.as_bytes(), &std::fs::read(src.join(f)).unwrap()).unwrap();
        }
        assert_eq!(xattr(&fs, v, XATTR_STATUS).as_deref(), Some("PENDING"));
        // Not quiet long enough yet: nothing happens.
        assert!(fs.tick(Instant::now()).is_empty());
        settle(&fs);
        assert_eq!(xattr(&fs, v, XATTR_STATUS).as_deref(), Some("FAILED"));
        assert!(xattr(&fs, v, XATTR_MESSAGE).unwrap().contains("conda.yaml"));
        for f in ["conda.yaml", "python_env.yaml", "requirements.txt"] {
            write(&fs, v, f.as_bytes(), &std::fs::read(src.join(f)).unwrap()).unwrap();
        }
        assert_eq!(xattr(&fs, v, XATTR_STATUS).as_deref(), Some("PENDING"));
        settle(&fs);
        assert_eq!(xattr(&fs, v, XATTR_STATUS).as_deref(), Some("READY"));
    }

    #[test]
    fn a_model_copied_in_directly_is_version_one_and_takes_no_more() {
        let d = tempfile::tempdir().unwrap();
        let fs = new_fs(d.path());
        let m = copy_in(&fs, &fixtures().join("sklearn_iris"), MODELS_INO, b"iris");
        settle(&fs);
        assert_eq!(xattr(&fs, m, XATTR_VERSION).as_deref(), Some("1"));
        assert!(
            !names(&fs, m).contains(&"latest".to_string()),
            "no links inside a direct model"
        );
        assert_eq!(
            refusal(fs.mkdir(ME, m, b"v2", 0o755)),
            Refusal::NotPermitted
        );
        assert_eq!(
            refusal(write(&fs, m, b"extra", b"x")),
            Refusal::NotPermitted
        );
    }

    #[test]
    fn aliases_are_set_moved_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let fs = new_fs(d.path());
        let iris = fs.mkdir(ME, MODELS_INO, b"iris", 0o755).unwrap().ino;
        copy_in(&fs, &fixtures().join("sklearn_iris"), iris, b"a");
        copy_in(&fs, &fixtures().join("sklearn_nosig"), iris, b"b");
        settle(&fs);
        let l = fs.symlink(ME, iris, b"@champion", b"1").unwrap();
        assert_eq!(fs.readlink(l.ino).unwrap(), b"a");
        assert_eq!(
            refusal(fs.symlink(ME, iris, b"@champion", b"2")),
            Refusal::Exists
        );
        // ln -sfn: a temporary link renamed over the alias.
        fs.symlink(ME, iris, b"CuTmp123", b"./b/").unwrap();
        fs.rename(iris, b"CuTmp123", iris, b"@champion", false)
            .unwrap();
        assert_eq!(
            fs.readlink(fs.lookup(iris, b"@champion").unwrap().ino)
                .unwrap(),
            b"b"
        );
        assert!(!names(&fs, iris).contains(&"CuTmp123".to_string()));
        assert_eq!(refusal(fs.symlink(ME, iris, b"@x", b"9")), Refusal::Invalid);
        assert_eq!(
            refusal(fs.symlink(ME, iris, b"@latest", b"1")),
            Refusal::Invalid
        );
        assert_eq!(
            refusal(fs.symlink(ME, iris, b"@v3", b"1")),
            Refusal::Invalid
        );
        assert_eq!(
            refusal(fs.symlink(ME, iris, b"@a", b"../other/1")),
            Refusal::Invalid
        );
        let run = fs.mkdir(ME, RUNS_INO, b"r", 0o755).unwrap().ino;
        assert_eq!(
            refusal(fs.symlink(ME, run, b"l", b"x")),
            Refusal::NotPermitted
        );
        fs.unlink(iris, b"@champion").unwrap();
        assert_eq!(refusal(fs.lookup(iris, b"@champion")), Refusal::NotFound);
    }

    #[test]
    fn registering_a_run_model_copies_no_bytes_and_survives_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let blob_count = || {
            std::fs::read_dir(d.path().join("blobs/sha256"))
                .unwrap()
                .map(|e| std::fs::read_dir(e.unwrap().path()).unwrap().count())
                .sum::<usize>()
        };
        {
            let fs = new_fs(d.path());
            let run = fs.mkdir(ME, RUNS_INO, b"r1", 0o755).unwrap().ino;
            let art = fs.lookup(run, b"artifacts").unwrap().ino;
            copy_in(&fs, &fixtures().join("sklearn_iris"), art, b"model");
            let before = blob_count();
            let iris = fs.mkdir(ME, MODELS_INO, b"iris", 0o755).unwrap().ino;
            // By reference, and by copying (dedup): neither adds a blob.
            let v = fs
                .register_from(ME, iris, b"r1", b"runs/r1/artifacts/model")
                .unwrap()
                .ino;
            copy_in(&fs, &fixtures().join("sklearn_iris"), iris, b"copied");
            settle(&fs);
            assert_eq!(blob_count(), before);
            assert_eq!(xattr(&fs, v, XATTR_STATUS).as_deref(), Some("READY"));
            let idx = fs.store().index();
            let row = idx.version_of_dir(v).unwrap().unwrap();
            assert_eq!(
                row.record.source.as_deref(),
                Some("runs/r1/artifacts/model")
            );
            let copied = idx.lookup(iris, b"copied").unwrap().unwrap();
            assert_eq!(
                idx.version_of_dir(copied.ino)
                    .unwrap()
                    .unwrap()
                    .record
                    .digest,
                row.record.digest
            );
            drop(idx);
            // A pending draft at shutdown is validated after the restart.
            let v3 = fs.mkdir(ME, iris, b"later", 0o755).unwrap().ino;
            write(&fs, v3, b"MLmodel", b"flavors: {}").unwrap();
        }
        let fs = new_fs(d.path());
        let iris = fs.lookup(MODELS_INO, b"iris").unwrap().ino;
        assert_eq!(
            fs.readlink(fs.lookup(iris, b"latest").unwrap().ino)
                .unwrap()
                .len(),
            6
        );
        let later = fs.lookup(iris, b"later").unwrap().ino;
        assert_eq!(xattr(&fs, later, XATTR_STATUS).as_deref(), Some("PENDING"));
        settle(&fs);
        assert_eq!(xattr(&fs, later, XATTR_STATUS).as_deref(), Some("FAILED"));
    }
    /// A store with one model directory below a run (`runs/r1/artifacts/model`), a run file,
    /// a plain directory, a model `models/x` and one version registered from the run.
    fn store_with_sources(d: &Path) -> (ArtifactFs, u64) {
        let fs = new_fs(d);
        let run = fs.mkdir(ME, RUNS_INO, b"r1", 0o755).unwrap().ino;
        let art = fs.lookup(run, b"artifacts").unwrap().ino;
        copy_in(&fs, &fixtures().join("sklearn_iris"), art, b"model");
        copy_in(&fs, &fixtures().join("broken_no_mlmodel"), art, b"plain");
        let x = fs.mkdir(ME, MODELS_INO, b"x", 0o755).unwrap().ino;
        fs.register_from(ME, x, b"v1", b"runs/r1/artifacts/model")
            .unwrap();
        (fs, x)
    }

    /// The inode of `runs/r1/artifacts/model` of [`store_with_sources`].
    fn model_source(fs: &ArtifactFs) -> u64 {
        let idx = fs.store().index();
        idx.resolve(Path::new("runs/r1/artifacts/model"))
            .unwrap()
            .unwrap()
            .ino
    }

    /// A file still open for writing does not move into a model draft, nor within one (its
    /// writer, counted for the model it was created in or for none, could change it after the
    /// version is READY): `Busy`; once closed it moves.
    #[test]
    fn a_file_still_being_written_does_not_move_into_a_model() {
        let d = tempfile::tempdir().unwrap();
        let fs = new_fs(d.path());
        let run = fs.mkdir(ME, RUNS_INO, b"r1", 0o755).unwrap().ino;
        let art = fs.lookup(run, b"artifacts").unwrap().ino;
        let (_, fh) = fs.create(ME, art, b"x", 0o644).unwrap();
        fs.write(fh, 0, b"AAAA").unwrap();
        fs.flush(fh).unwrap();
        let iris = fs.mkdir(ME, MODELS_INO, b"iris", 0o755).unwrap().ino;
        let v1 = copy_in(&fs, &fixtures().join("sklearn_iris"), iris, b"v1");
        assert_eq!(
            refusal(fs.rename(art, b"x", v1, b"x", false)),
            Refusal::Busy
        );
        let (_, fh2) = fs.create(ME, v1, b"y", 0o644).unwrap();
        fs.write(fh2, 0, b"B").unwrap();
        assert_eq!(refusal(fs.rename(v1, b"y", v1, b"z", false)), Refusal::Busy);
        fs.release(fh2).unwrap();
        fs.release(fh).unwrap();
        fs.rename(art, b"x", v1, b"x", false).unwrap();
        fs.rename(v1, b"y", v1, b"z", false).unwrap();
        settle(&fs);
        assert_eq!(xattr(&fs, v1, XATTR_STATUS).as_deref(), Some("READY"));
        assert_eq!(
            refusal(fs.rename(v1, b"x", iris, b"x", false)),
            Refusal::NotPermitted
        );
    }

    /// However deep below a READY version, nothing is created or removed (the walk up to the
    /// model once gave up after 4,096 levels and took the entry for one outside `models/`).
    #[test]
    fn a_ready_version_is_sealed_however_deep() {
        let d = tempfile::tempdir().unwrap();
        let fs = new_fs(d.path());
        let m = fs.mkdir(ME, MODELS_INO, b"deep", 0o755).unwrap().ino;
        let v1 = copy_in(&fs, &fixtures().join("sklearn_iris"), m, b"v1");
        let mut cur = v1;
        {
            // (Straight into the index: through `mkdir`, each level would walk up to the
            // model, and the whole chain would take minutes.)
            let idx = fs.store().index();
            for _ in 0..4100 {
                let zone = Zone::ModelTree as u8;
                let dir = NewEntry::new_dir(cur, b"a", zone, 0o755, (0, 0), now_ns());
                cur = idx.insert(&dir).unwrap().unwrap();
            }
        }
        write(&fs, cur, b"bottom", b"b").unwrap();
        settle(&fs);
        assert_eq!(xattr(&fs, v1, XATTR_STATUS).as_deref(), Some("READY"));
        assert_eq!(
            refusal(fs.create(ME, cur, b"injected", 0o644)),
            Refusal::NotPermitted
        );
        assert_eq!(refusal(fs.unlink(cur, b"bottom")), Refusal::NotPermitted);
        assert_eq!(
            refusal(fs.mkdir(ME, cur, b"b", 0o755)),
            Refusal::NotPermitted
        );
    }

    /// A file put at the top of a model with versions, then removed or renamed away, leaves no
    /// version row of its own (it was once recorded as a PENDING version that never settled).
    #[test]
    fn a_file_at_the_top_of_a_model_leaves_no_version_behind() {
        let d = tempfile::tempdir().unwrap();
        let fs = new_fs(d.path());
        let (iris, _) = iris_with_ready_v1(&fs);
        let run = fs.mkdir(ME, RUNS_INO, b"r1", 0o755).unwrap().ino;
        let art = fs.lookup(run, b"artifacts").unwrap().ino;
        write(&fs, iris, b"notes.txt", b"x").unwrap();
        write(&fs, iris, b"moved.txt", b"y").unwrap();
        fs.unlink(iris, b"notes.txt").unwrap();
        fs.rename(iris, b"moved.txt", art, b"moved.txt", false)
            .unwrap();
        settle(&fs);
        let idx = fs.store().index();
        let versions = idx.versions_of(iris).unwrap();
        assert_eq!(versions.len(), 1, "{versions:?}");
        assert_eq!(versions[0].status, VersionStatus::Ready);
        assert!(idx.models_with_pending().unwrap().is_empty());
    }

    /// An `MLmodel` does not go to the top of a model with READY versions (it would hide
    /// `latest`, the numbers and the aliases), by create or rename; to a new model's top it
    /// does (a model copied in directly), and other files go to the top as before.
    #[test]
    fn an_mlmodel_does_not_hide_a_models_ready_versions() {
        let d = tempfile::tempdir().unwrap();
        let fs = new_fs(d.path());
        let (iris, _) = iris_with_ready_v1(&fs);
        assert_eq!(
            refusal(fs.create(ME, iris, b"MLmodel", 0o644)),
            Refusal::NotPermitted
        );
        let run = fs.mkdir(ME, RUNS_INO, b"r1", 0o755).unwrap().ino;
        let art = fs.lookup(run, b"artifacts").unwrap().ino;
        write(&fs, art, b"MLmodel", b"flavors: {}\n").unwrap();
        assert_eq!(
            refusal(fs.rename(art, b"MLmodel", iris, b"MLmodel", false)),
            Refusal::NotPermitted
        );
        write(&fs, iris, b"README.md", b"notes").unwrap();
        assert!(fs.readlink(fs.lookup(iris, b"latest").unwrap().ino).is_ok());
        let direct = fs.mkdir(ME, MODELS_INO, b"direct", 0o755).unwrap().ino;
        write(&fs, direct, b"MLmodel", b"flavors: {}\n").unwrap();
    }

    /// A model that became a READY version itself while a registration into it copied (a
    /// model copied to its top and validated) does not get the registered tree: `NotPermitted`,
    /// and the hidden copy is gone.
    #[test]
    fn a_registration_is_not_revealed_in_a_model_that_became_ready_meanwhile() {
        let d = tempfile::tempdir().unwrap();
        let (fs, _) = store_with_sources(d.path());
        let m = fs.mkdir(ME, MODELS_INO, b"d", 0o755).unwrap().ino;
        AFTER_COPY.with(|h| {
            *h.borrow_mut() = Some(Box::new(move |fs: &ArtifactFs| {
                for e in std::fs::read_dir(fixtures().join("sklearn_iris")).unwrap() {
                    let e = e.unwrap();
                    let bytes = std::fs::read(e.path()).unwrap();
                    write(fs, m, e.file_name().as_bytes(), &bytes).unwrap();
                }
                settle(fs);
                assert_eq!(xattr(fs, m, XATTR_STATUS).as_deref(), Some("READY"));
            }))
        });
        assert_eq!(
            refusal(fs.register_from(ME, m, b"extra", b"runs/r1/artifacts/model")),
            Refusal::NotPermitted
        );
        assert!(AFTER_COPY.with(|h| h.borrow().is_none()), "the hook ran");
        assert_eq!(refusal(fs.lookup(m, b"extra")), Refusal::NotFound);
        let rows = fs.store().index().descendants(m).unwrap();
        assert!(rows.iter().all(|(_, e)| e.kind == Kind::File), "{rows:?}");
    }

    /// Registration by reference into a setgid model directory gives what a `cp -r` into it
    /// gives: every copied entry takes the directory's group, every directory the bit.
    #[test]
    fn registration_into_a_setgid_model_directory_passes_its_group_on() {
        let d = tempfile::tempdir().unwrap();
        let (fs, _) = store_with_sources(d.path());
        let y = fs.mkdir(ME, MODELS_INO, b"y", 0o755).unwrap().ino;
        let change = SetAttr {
            mode: Some(0o2775),
            gid: Some(4242),
            ..SetAttr::default()
        };
        fs.setattr(y, change).unwrap();
        let v = fs
            .register_from(ME, y, b"v1", b"runs/r1/artifacts/model")
            .unwrap();
        assert_eq!((v.gid, v.perm & 0o2000), (4242, 0o2000));
        let rows = fs.store().index().descendants(v.ino).unwrap();
        assert!(!rows.is_empty());
        for (path, e) in rows {
            let path = String::from_utf8_lossy(&path);
            assert_eq!(e.gid, 4242, "{path}");
            assert_eq!(e.mode & libc::S_ISGID != 0, e.kind == Kind::Dir, "{path}");
        }
    }

    #[test]
    fn only_a_model_directory_below_a_run_is_a_source() {
        let d = tempfile::tempdir().unwrap();
        let (fs, x) = store_with_sources(d.path());
        let cases: [(&[u8], Refusal); 14] = [
            (b"", Refusal::Invalid),
            (b"/", Refusal::Invalid),
            (b"runs", Refusal::Invalid),
            (b"runs/r1", Refusal::Invalid),
            (b"runs/r1/artifacts", Refusal::Invalid),
            (b"runs/r1/artifacts/plain", Refusal::Invalid),
            (b"models", Refusal::Invalid),
            (b"models/x", Refusal::Invalid),
            (b"models/x/v1", Refusal::Invalid),
            (b"runs/r1/artifacts/model/MLmodel", Refusal::NotFound),
            (b"../../etc", Refusal::NotFound),
            (b"/etc", Refusal::NotFound),
            (b"runs/r1/artifacts/model/../model", Refusal::NotFound),
            (b"runs/r1/artifacts/mo\0del", Refusal::NotFound),
        ];
        for (i, (source, want)) in cases.iter().enumerate() {
            let name = format!("n{i}");
            assert_eq!(
                refusal(fs.register_from(ME, x, name.as_bytes(), source)),
                *want,
                "{:?}",
                String::from_utf8_lossy(source)
            );
            assert!(fs.lookup(x, name.as_bytes()).is_err(), "nothing registered");
        }
        // Slashes and `.` are only spelling.
        for (i, source) in ["/runs/r1/artifacts/model/", "runs//r1/./artifacts/model"]
            .iter()
            .enumerate()
        {
            let name = format!("ok{i}");
            let v = fs.register_from(ME, x, name.as_bytes(), source.as_bytes());
            assert!(v.is_ok(), "{source}: {v:?}");
        }
    }

    /// Random source paths (`..`, `.`, `//`, NUL, trailing slashes, non-UTF-8 bytes, very long
    /// names): a registration succeeds exactly when the path names the one model directory
    /// below a run, and a refused one leaves nothing behind.
    #[test]
    fn random_source_paths_never_reach_anything_but_a_model_directory() {
        let d = tempfile::tempdir().unwrap();
        let (fs, x) = store_with_sources(d.path());
        let long = vec![b'a'; 300];
        let parts: [&[u8]; 16] = [
            b"runs",
            b"r1",
            b"artifacts",
            b"model",
            b"models",
            b"x",
            b"v1",
            b".",
            b"..",
            b"",
            b"MLmodel",
            b"plain",
            b"\0",
            b"\xff\xfe",
            &long,
            b"mo\0del",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut accepted = 0;
        for i in 0..3000 {
            // Half of the paths start from the real one, so the accepted case is common.
            let mut comps: Vec<&[u8]> = if next(2) == 0 {
                vec![b"runs", b"r1", b"artifacts", b"model"]
            } else {
                Vec::new()
            };
            for _ in 0..next(5) {
                let at = next(comps.len() + 1);
                comps.insert(at, parts[next(parts.len())]);
            }
            let mut path = comps.join(&b'/');
            if next(4) == 0 {
                path.insert(0, b'/');
            }
            if next(4) == 0 {
                path.push(b'/');
            }
            let is_model = {
                let real: Vec<&[u8]> = path
                    .split(|&b| b == b'/')
                    .filter(|c| !c.is_empty() && *c != b".")
                    .collect();
                real == [&b"runs"[..], b"r1", b"artifacts", b"model"]
            };
            let name = format!("p{i}");
            match fs.register_from(ME, x, name.as_bytes(), &path) {
                Ok(_) => {
                    assert!(is_model, "accepted {:?}", String::from_utf8_lossy(&path));
                    accepted += 1;
                }
                Err(e) => {
                    assert!(
                        !is_model,
                        "refused {:?}: {e}",
                        String::from_utf8_lossy(&path)
                    );
                    assert!(fs.lookup(x, name.as_bytes()).is_err());
                }
            }
        }
        assert!(
            accepted > 100,
            "only {accepted} accepted: the generator is too narrow"
        );
    }

    #[test]
    fn a_source_with_a_file_open_for_writing_is_busy() {
        let d = tempfile::tempdir().unwrap();
        let (fs, x) = store_with_sources(d.path());
        let model = model_source(&fs);
        // Committed by a flush but still open (a dup'd descriptor): its bytes may still change.
        let (_, fh) = fs.create(ME, model, b"extra.txt", 0o644).unwrap();
        fs.write(fh, 0, b"first").unwrap();
        fs.flush(fh).unwrap();
        assert_eq!(
            refusal(fs.register_from(ME, x, b"v2", b"runs/r1/artifacts/model")),
            Refusal::Busy
        );
        assert!(fs.lookup(x, b"v2").is_err());
        fs.write(fh, 0, b"second").unwrap();
        fs.release(fh).unwrap();
        let v2 = fs
            .register_from(ME, x, b"v2", b"runs/r1/artifacts/model")
            .unwrap()
            .ino;
        let extra = fs.lookup(v2, b"extra.txt").unwrap().ino;
        let (rh, _) = fs.open(extra, libc::O_RDONLY).unwrap();
        assert_eq!(fs.read(rh, 0, 100).unwrap(), b"second");
        fs.release(rh).unwrap();
    }

    #[test]
    fn a_release_on_its_way_is_waited_for_not_busy() {
        // What the kernel does after `echo x > f; cp -r dir models/..`: close() returns before
        // the RELEASE reaches the daemon, and the registration may arrive first (seen in CI).
        let d = tempfile::tempdir().unwrap();
        let (fs, x) = store_with_sources(d.path());
        let model = model_source(&fs);
        let (_, fh) = fs.create(ME, model, b"late.txt", 0o644).unwrap();
        fs.write(fh, 0, b"late").unwrap();
        fs.flush(fh).unwrap();
        let v2 = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                fs.release(fh).unwrap();
            });
            fs.register_from(ME, x, b"v2", b"runs/r1/artifacts/model")
        })
        .unwrap()
        .ino;
        let late = fs.lookup(v2, b"late.txt").unwrap().ino;
        let (rh, _) = fs.open(late, libc::O_RDONLY).unwrap();
        assert_eq!(fs.read(rh, 0, 100).unwrap(), b"late");
        fs.release(rh).unwrap();
    }

    #[test]
    fn registration_checks_the_callers_permissions_on_the_whole_source() {
        let d = tempfile::tempdir().unwrap();
        let (fs, x) = store_with_sources(d.path());
        let idx = fs.store().index();
        let model = idx
            .resolve(Path::new("runs/r1/artifacts/model"))
            .unwrap()
            .unwrap();
        let run = idx.resolve(Path::new("runs/r1")).unwrap().unwrap();
        let secret = idx.lookup(model.ino, b"model.skops").unwrap().unwrap();
        drop(idx);
        // A process that is gone: no supplementary groups, no capabilities.
        let other = Caller {
            uid: 4242,
            gid: 4242,
            pid: u32::MAX,
        };
        let member = Caller { gid: 0, ..other };
        let chmod = |ino: u64, mode: u32| {
            let change = SetAttr {
                mode: Some(mode),
                ..Default::default()
            };
            fs.setattr(ino, change).unwrap();
        };
        let register = |who: Caller, name: &[u8], source: &[u8]| {
            let r = fs.register_from(who, x, name, source);
            if r.is_err() {
                assert!(fs.lookup(x, name).is_err(), "nothing registered");
            }
            r.map(|_| ())
        };
        let model_src = b"runs/r1/artifacts/model";
        // A file the caller may not read.
        chmod(secret.ino, 0o600);
        assert_eq!(
            refusal(register(other, b"a", model_src)),
            Refusal::AccessDenied
        );
        // A run the caller may not search hides what lies behind it: no ENOENT / EINVAL.
        chmod(secret.ino, 0o644);
        chmod(run.ino, 0o700);
        for source in [
            &model_src[..],
            b"runs/r1/nothing/here",
            b"runs/r1/artifacts",
        ] {
            assert_eq!(
                refusal(register(other, b"b", source)),
                Refusal::AccessDenied
            );
        }
        // The group's bits for a member of the group.
        chmod(run.ino, 0o750);
        chmod(secret.ino, 0o640);
        assert_eq!(
            refusal(register(other, b"c", model_src)),
            Refusal::AccessDenied
        );
        register(member, b"c", model_src).unwrap();
        // The version's files belong to the caller and keep the source's modes.
        let c = fs.lookup(x, b"c").unwrap();
        assert_eq!((c.uid, c.gid), (4242, 0));
        let copied = fs.lookup(c.ino, b"model.skops").unwrap();
        assert_eq!((copied.uid, copied.perm), (4242, 0o640));
        // Root (this process, with its capabilities) keeps reading everything.
        chmod(run.ino, 0o700);
        chmod(secret.ino, 0o600);
        register(ME, b"d", model_src).unwrap();
    }

    /// A model with 1,000 versions and 100 aliases: every link's lookup agrees with the
    /// listing, names that are not links are not found, and listing plus a lookup of every
    /// name stays linear (each used to rebuild every link: 1,100 x 1,100).
    #[test]
    fn a_thousand_versions_list_and_look_up_in_linear_time() {
        let d = tempfile::tempdir().unwrap();
        let fs = new_fs(d.path());
        let run = fs.mkdir(ME, RUNS_INO, b"r", 0o755).unwrap().ino;
        let art = fs.lookup(run, b"artifacts").unwrap().ino;
        copy_in(&fs, &fixtures().join("sklearn_nosig"), art, b"model");
        let m = fs.mkdir(ME, MODELS_INO, b"big", 0o755).unwrap().ino;
        for i in 0..1000 {
            let name = format!("v{i:04}");
            fs.register_from(ME, m, name.as_bytes(), b"runs/r/artifacts/model")
                .unwrap();
        }
        settle(&fs);
        for a in 0..100 {
            let target = format!("{}", a * 10 + 1);
            fs.symlink(ME, m, format!("@a{a}").as_bytes(), target.as_bytes())
                .unwrap();
        }
        let t = Instant::now();
        let listed = {
            let idx = fs.store().index();
            let model = idx.get(m).unwrap().unwrap();
            fs.list_links(&idx, &model).unwrap()
        };
        let listing = t.elapsed();
        assert_eq!(listed.len(), 1000 + 1 + 100);
        let t = Instant::now();
        for (name, attr) in &listed {
            let found = fs.lookup(m, name).unwrap();
            assert_eq!((found.ino, found.size), (attr.ino, attr.size), "{name:?}");
        }
        let lookups = t.elapsed();
        let latest = fs.lookup(m, b"latest").unwrap();
        assert_eq!(fs.readlink(latest.ino).unwrap(), b"v0999");
        assert_eq!(
            fs.readlink(fs.lookup(m, b"@a3").unwrap().ino).unwrap(),
            b"v0030"
        );
        for not_a_link in [
            "0", "1001", "01", "+1", " 1", "latest2", "@nope", "@", "@a100",
        ] {
            assert!(fs.lookup(m, not_a_link.as_bytes()).is_err(), "{not_a_link}");
        }
        eprintln!("1,000 versions + 100 aliases: list {listing:.1?}, 1,101 lookups {lookups:.1?}");
    }

    /// `ln -sfn` moving an alias 10,000 times (a new temporary name each time) leaves the
    /// daemon's link maps as small as the links that exist.
    #[test]
    fn moving_an_alias_many_times_keeps_the_link_maps_small() {
        let d = tempfile::tempdir().unwrap();
        let fs = new_fs(d.path());
        let iris = fs.mkdir(ME, MODELS_INO, b"iris", 0o755).unwrap().ino;
        copy_in(&fs, &fixtures().join("sklearn_iris"), iris, b"a");
        copy_in(&fs, &fixtures().join("sklearn_nosig"), iris, b"b");
        settle(&fs);
        fs.symlink(ME, iris, b"@champion", b"1").unwrap();
        for i in 0..10_000 {
            let temp = format!("Cu{i:06}");
            let target = if i % 2 == 0 { b"2" } else { b"1" };
            fs.symlink(ME, iris, temp.as_bytes(), target).unwrap();
            fs.lookup(iris, temp.as_bytes()).unwrap();
            fs.rename(iris, temp.as_bytes(), iris, b"@champion", false)
                .unwrap();
            fs.lookup(iris, b"@champion").unwrap();
        }
        // 1, 2, latest, @champion: what exists, not what ever existed.
        let (inos, temps) = fs.models.link_counts();
        assert!(inos <= 4, "{inos} link inode numbers kept");
        assert_eq!(temps, 0);
        assert_eq!(
            fs.readlink(fs.lookup(iris, b"@champion").unwrap().ino)
                .unwrap(),
            b"a"
        );
    }

    /// Adds `dirs` x `per_dir` sealed files below store directory `at` straight into the index
    /// (all with the content of an existing blob): a large source without writing it.
    fn bulk_source(fs: &ArtifactFs, at: u64, dirs: usize, per_dir: usize) {
        let mut idx = fs.store().index();
        let mlmodel = idx.lookup(at, b"MLmodel").unwrap().unwrap();
        for d in 0..dirs {
            let name = format!("d{d:03}");
            let dir = idx
                .insert(&NewEntry::new_dir(
                    at,
                    name.as_bytes(),
                    Zone::RunTree as u8,
                    0o755,
                    (0, 0),
                    1,
                ))
                .unwrap()
                .unwrap();
            let names: Vec<String> = (0..per_dir).map(|i| format!("f{i:05}")).collect();
            let rows: Vec<NewEntry> = names
                .iter()
                .map(|n| NewEntry {
                    state: State::Live,
                    hash: mlmodel.hash,
                    size: mlmodel.size,
                    ..NewEntry::new_file(dir, n.as_bytes(), Zone::RunTree as u8, 0o644, (0, 0), 1)
                })
                .collect();
            assert_eq!(idx.insert_many(&rows).unwrap(), per_dir);
        }
    }

    /// 100,000 entries register in batches: another request waits for one batch at most, never
    /// for the whole registration, and the version appears only once complete.
    #[test]
    fn a_hundred_thousand_entries_register_in_batches_while_others_are_served() {
        let d = tempfile::tempdir().unwrap();
        let (fs, x) = store_with_sources(d.path());
        let model = model_source(&fs);
        bulk_source(&fs, model, 100, 1000);
        let other = fs.lookup(model, b"MLmodel").unwrap().ino;
        let fs = std::sync::Arc::new(fs);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let probe = {
            let (fs, done) = (fs.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut worst, mut probes, mut saw_partial) = (Duration::ZERO, 0, false);
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let t = Instant::now();
                    fs.getattr(other).unwrap();
                    // The version is invisible until complete.
                    if let Ok(v) = fs.lookup(x, b"big") {
                        // Directories are copied in order: complete if the last one is.
                        let idx = fs.store().index();
                        let complete = idx
                            .lookup(v.ino, b"d099")
                            .unwrap()
                            .is_some_and(|d| idx.children(d.ino, 0, 2000).unwrap().len() == 1000);
                        saw_partial |= !complete;
                    }
                    worst = worst.max(t.elapsed());
                    probes += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                (worst, probes, saw_partial)
            })
        };
        let t = Instant::now();
        fs.register_from(ME, x, b"big", b"runs/r1/artifacts/model")
            .unwrap();
        let took = t.elapsed();
        done.store(true, std::sync::atomic::Ordering::Release);
        let (worst, probes, saw_partial) = probe.join().unwrap();
        eprintln!("100,100 entries registered in {took:.2?}; {probes} probes, slowest {worst:.1?}");
        assert!(!saw_partial, "a partial version was visible");
        assert!(
            probes > 10,
            "the probe was starved: {probes} probes in {took:?}"
        );
        assert!(
            worst < Duration::from_millis(500),
            "a getattr waited {worst:?}"
        );
        let v = fs.lookup(x, b"big").unwrap().ino;
        let fixture_files = std::fs::read_dir(fixtures().join("sklearn_iris"))
            .unwrap()
            .count();
        assert_eq!(
            fs.store().index().descendants(v).unwrap().len(),
            100_000 + 100 + fixture_files
        );
    }

    /// A file still open for writing found in a late batch: the registration fails with
    /// `Busy` and every row it had copied is gone again.
    #[test]
    fn a_registration_refused_midway_leaves_no_rows() {
        let d = tempfile::tempdir().unwrap();
        let (fs, x) = store_with_sources(d.path());
        let model = model_source(&fs);
        bulk_source(&fs, model, 3, 1000);
        let last = fs.lookup(model, b"d002").unwrap().ino;
        let (_, fh) = fs.create(ME, last, b"zz-open", 0o644).unwrap();
        fs.write(fh, 0, b"partial").unwrap();
        let rows = || fs.store().index().file_rows().unwrap().len();
        let before = rows();
        assert_eq!(
            refusal(fs.register_from(ME, x, b"v2", b"runs/r1/artifacts/model")),
            Refusal::Busy
        );
        assert_eq!(rows(), before, "copied rows were left behind");
        assert!(fs.lookup(x, b"v2").is_err());
        // The name is free again, and the registration goes through once the writer is done.
        fs.release(fh).unwrap();
        fs.register_from(ME, x, b"v2", b"runs/r1/artifacts/model")
            .unwrap();
    }
}
