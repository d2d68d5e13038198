//! The blob directory: content-addressed, immutable byte files.
//!
//! Owns `STORE/blobs/sha256/<2 hex>/<62 hex>` and `STORE/tmp/`. New content is written to a
//! temp file, hashed by the caller, then published by `rename` into its address — or dropped
//! when that address already exists, which is how identical content is stored once. A blob is
//! never modified after it is published; nothing here deletes one (that is garbage collection's
//! job, which must consult the index first).
//!
//! With a bucket (`--blobs s3://…`, see [`super::s3`]) the same operations go to the bucket,
//! and the directory is the machine's local cache of it: a blob is uploaded before it counts as
//! published, opened from the cache, and fetched (verified) into the cache when it is not there.
//!
//! This module knows nothing about paths, runs or SQLite.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::Hash;
use super::pieces::PieceCheck;
use super::s3::{BlobCache, ObjectInfo, Remote, Streaming};

/// The blob directory of one store.
#[derive(Debug)]
pub struct BlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
    next_tmp: AtomicU64,
    /// fsync each blob before it is renamed into place, and its directories after; otherwise
    /// blobs are synced in batches by `Store::sync` and checked after a crash (see
    /// `Store::open_writable`).
    sync_before_publish: bool,
    /// Blobs were published without fsync since the last `Store::sync`.
    unsynced: AtomicBool,
    /// The bucket that holds the blobs; the directory is then a cache of it.
    remote: Option<std::sync::Arc<Remote>>,
    /// The bound of that cache (a daemon's); `None` with a bucket: nothing fetched is kept
    /// (commands).
    cache: Option<Arc<BlobCache>>,
    /// With a bucket: large files written sequentially are uploaded while they are written.
    upload_while_writing: bool,
    /// Contents being fetched from the bucket and served as their pieces arrive, by hash: one
    /// fetch for all the readers of a content.
    arriving: Arc<Mutex<HashMap<Hash, Weak<Arriving>>>>,
    /// The directories `sync_dirs` synced, in order (what the unit tests check).
    #[cfg(test)]
    synced_dirs: std::sync::Mutex<Vec<PathBuf>>,
}

impl BlobStore {
    /// Opens (and creates) the blob and temp directories below `root`.
    pub fn open(root: &Path, sync_before_publish: bool) -> io::Result<Self> {
        Self::open_at(&root.join("blobs"), &root.join("tmp"), sync_before_publish)
    }

    /// Opens (and creates) the blob directory `blobs` (blobs in `blobs/sha256`) with temp files
    /// in `tmp`, which must be on the same file system (a blob is renamed into place).
    pub fn open_at(blobs: &Path, tmp: &Path, sync_before_publish: bool) -> io::Result<Self> {
        let blobs = blobs.join("sha256");
        let tmp = tmp.to_path_buf();
        for dir in [&blobs, &tmp] {
            fs::create_dir_all(dir)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
        Ok(BlobStore {
            blobs,
            tmp,
            next_tmp: AtomicU64::new(0),
            sync_before_publish,
            unsynced: AtomicBool::new(false),
            remote: None,
            cache: None,
            upload_while_writing: false,
            arriving: Default::default(),
            #[cfg(test)]
            synced_dirs: Default::default(),
        })
    }

    /// The blobs of bucket `remote`, with `cache_dir` (`cache_dir/sha256/…`) as the local cache
    /// bounded by `cache` (`None`: nothing fetched is kept) and temp files in `tmp` (on the
    /// cache's file system).
    pub fn open_remote(
        cache_dir: &Path,
        tmp: &Path,
        remote: Remote,
        cache: Option<BlobCache>,
    ) -> io::Result<Self> {
        let mut store = Self::open_at(cache_dir, tmp, false)?;
        store.remote = Some(std::sync::Arc::new(remote));
        store.cache = cache.map(Arc::new);
        Ok(store)
    }

    /// These blobs' bucket, with `cache_dir` as its local cache (see [`BlobStore::open_remote`]):
    /// a `--read-only` daemon's (`Store::keep_fetched`).
    pub fn with_cache(
        &self,
        cache_dir: &Path,
        tmp: &Path,
        cache: BlobCache,
    ) -> io::Result<Option<Self>> {
        let Some(remote) = &self.remote else {
            return Ok(None);
        };
        let mut store = Self::open_at(cache_dir, tmp, false)?;
        store.remote = Some(remote.clone());
        store.cache = Some(Arc::new(cache));
        Ok(Some(store))
    }

    /// The blobs of bucket `remote` for a command: nothing fetched is kept, temp files go to
    /// the system's temp directory, nothing is created.
    pub fn remote_client(remote: Remote) -> Self {
        let tmp = std::env::temp_dir();
        let mut store = Self::existing_at(&tmp, &tmp);
        store.remote = Some(std::sync::Arc::new(remote));
        store
    }

    /// With a bucket: uploads the whole parts of a file being written sequentially (`file`,
    /// `end` bytes so far) once it is larger than one PUT takes, so that its `close()` waits
    /// for the tail only. Anything else does nothing.
    pub fn stream_feed(&self, stream: &mut Streaming, file: &File, end: u64) {
        let Some(remote) = self.remote.as_ref().filter(|_| self.upload_while_writing) else {
            return;
        };
        if matches!(stream, Streaming::Idle) && end > super::s3::ONE_PUT_MAX {
            *stream = match remote.stream_begin() {
                Ok(up) => Streaming::On(up),
                Err(e) => {
                    log::warn!("{e}: the file is uploaded at its commit");
                    Streaming::Off
                }
            };
        }
        if let Streaming::On(up) = stream {
            remote.stream_feed(up, file, end);
        }
    }

    /// Turns the upload while writing on or off (`--upload-while-writing`).
    pub fn set_upload_while_writing(&mut self, on: bool) {
        self.upload_while_writing = on;
    }

    /// Gives up the upload of a file being written (it was not written sequentially).
    pub fn stream_stop(&self, stream: &mut Streaming) {
        if let (Some(remote), Streaming::On(up)) =
            (&self.remote, std::mem::replace(stream, Streaming::Off))
        {
            remote.stream_abort(up);
        }
    }

    /// Whether the content is in the local cache (with a bucket) or the blob directory.
    pub fn cached(&self, hash: &Hash) -> bool {
        self.path(hash).exists()
    }

    /// The bucket, when the blobs live in one.
    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_deref()
    }

    /// The local cache's bound, with a bucket.
    pub fn cache(&self) -> Option<&BlobCache> {
        self.cache.as_deref()
    }

    /// The blob directory of an existing store, creating nothing (read-only use).
    pub fn open_existing(root: &Path) -> Self {
        Self::existing_at(&root.join("blobs"), &root.join("tmp"))
    }

    /// [`BlobStore::open_existing`] of a blob directory `blobs` with temp files in `tmp`.
    pub fn existing_at(blobs: &Path, tmp: &Path) -> Self {
        BlobStore {
            blobs: blobs.join("sha256"),
            tmp: tmp.to_path_buf(),
            next_tmp: AtomicU64::new(0),
            sync_before_publish: true,
            unsynced: AtomicBool::new(false),
            remote: None,
            cache: None,
            upload_while_writing: false,
            arriving: Default::default(),
            #[cfg(test)]
            synced_dirs: Default::default(),
        }
    }

    /// Something written since the last sync needs one (content the index holds, say).
    pub fn mark_unsynced(&self) {
        self.unsynced.store(true, Ordering::Release);
    }

    /// Whether blobs were published without fsync since the last call (and clears that).
    pub fn take_unsynced(&self) -> bool {
        self.unsynced.swap(false, Ordering::AcqRel)
    }

    /// Where the blob with this hash lives.
    pub fn path(&self, hash: &Hash) -> PathBuf {
        blob_path(&self.blobs, hash)
    }

    /// Removes every temp file: they belong to writes whose `close()` never returned.
    pub fn clean_tmp(&self) -> io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.tmp)? {
            let entry = entry?;
            fs::remove_file(entry.path())?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Creates a new, empty temp file open for reading and writing.
    pub fn new_temp(&self) -> io::Result<(File, PathBuf)> {
        loop {
            let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
            let path = self.tmp.join(format!("{}-{n}", std::process::id()));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => return Ok((file, path)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Publishes the finished temp file `tmp` (whose open handle is `file`) as the blob `hash`.
    /// Returns `true` when it was renamed into place, `false` when the blob already existed —
    /// then `tmp` is left alone: the caller keeps it until the index row is committed, in case
    /// a concurrent garbage collection removes the existing blob first.
    pub fn publish(&self, file: &File, tmp: &Path, hash: &Hash) -> io::Result<bool> {
        self.publish_as(file, tmp, hash, false)
    }

    /// `publish`, optionally replacing an existing blob (one known to be damaged) by these
    /// bytes — the rename makes that atomic for readers.
    ///
    /// With `sync_before_publish` (`--sync-every-close`) the blob is durable when this returns,
    /// whether stored now or found already there: its bytes were fsync'd before the rename, and
    /// the directory entries leading to it are fsync'd after (see [`BlobStore::sync_dirs`]).
    pub fn publish_as(
        &self,
        file: &File,
        tmp: &Path,
        hash: &Hash,
        replace: bool,
    ) -> io::Result<bool> {
        self.publish_streamed(file, tmp, hash, replace, Streaming::Idle)
    }

    /// [`BlobStore::publish_as`] of a file whose upload to the bucket began while it was
    /// written (`stream`, see [`BlobStore::stream_feed`]).
    pub fn publish_streamed(
        &self,
        file: &File,
        tmp: &Path,
        hash: &Hash,
        replace: bool,
        stream: Streaming,
    ) -> io::Result<bool> {
        if let Some(remote) = &self.remote {
            let len = file.metadata()?.len();
            let stored = match stream {
                Streaming::On(up) => remote.stream_finish(up, file, len, hash, replace)?,
                _ => remote.upload_file(file, len, hash, replace)?,
            };
            if !stored {
                return Ok(false);
            }
            // The object is stored: a cache that cannot take the file (a full disk) fails
            // nothing; the caller keeps its temp file, as when the content was there already.
            if let Err(e) = self.keep(hash, len, |dest| fs::rename(tmp, dest)) {
                log::warn!("content {hash} is stored but not kept in the cache: {e}");
                return Ok(false);
            }
            return Ok(true);
        }
        let dest = self.path(hash);
        if dest.exists() && !replace {
            self.sync_dirs_if_every_close(hash)?;
            return Ok(false);
        }
        if self.sync_before_publish {
            file.sync_all()?;
        } else {
            self.unsynced.store(true, Ordering::Release);
        }
        // Published blobs are read-only for everyone but root; the store directory is 0700.
        file.set_permissions(fs::Permissions::from_mode(0o444))?;
        match fs::rename(tmp, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(dest.parent().expect("blob path has a parent"))?;
                fs::rename(tmp, &dest)?;
            }
            Err(e) => return Err(e),
        }
        self.sync_dirs_if_every_close(hash)?;
        Ok(true)
    }

    /// Makes the directory entries that lead to blob `hash` durable: the blob's own in its
    /// prefix directory `blobs/sha256/xx/`, and the prefix directory's in `blobs/sha256/`.
    /// The second is synced every time, not only by whoever created the prefix directory: a
    /// concurrent publish into a directory another thread has just created must not return
    /// before that directory's entry is on disk, and `gc` may remove and recreate one. (Syncing
    /// an unchanged directory costs next to nothing.) `blobs/sha256/` itself was made durable by
    /// the sync at start.
    fn sync_dirs(&self, hash: &Hash) -> io::Result<()> {
        let path = self.path(hash);
        let prefix = path.parent().expect("blob path has a parent");
        for dir in [prefix, self.blobs.as_path()] {
            File::open(dir)?.sync_all()?;
            #[cfg(test)]
            self.synced_dirs.lock().unwrap().push(dir.to_path_buf());
        }
        Ok(())
    }

    /// [`BlobStore::sync_dirs`] in `--sync-every-close` mode, where a blob must be durable
    /// before its index row is written. Also for a blob found already published: it may be
    /// another thread's that is not yet through its own `sync_dirs`.
    fn sync_dirs_if_every_close(&self, hash: &Hash) -> io::Result<()> {
        if self.sync_before_publish {
            self.sync_dirs(hash)?;
        }
        Ok(())
    }

    /// Publishes `bytes` as the blob `hash` (written to a temp file first). Returns `true`
    /// when new bytes were stored, `false` when the blob already existed.
    pub fn publish_bytes(&self, bytes: &[u8], hash: &Hash) -> io::Result<bool> {
        self.publish_bytes_as(bytes, hash, false)
    }

    pub fn publish_bytes_as(&self, bytes: &[u8], hash: &Hash, replace: bool) -> io::Result<bool> {
        if let Some(remote) = &self.remote {
            if !remote.upload_bytes(bytes, hash, replace)? {
                return Ok(false);
            }
            let (mut file, tmp) = self.new_temp()?;
            let kept = file
                .write_all(bytes)
                .and_then(|()| self.keep(hash, bytes.len() as u64, |dest| fs::rename(&tmp, dest)));
            if kept.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            return Ok(true);
        }
        if self.path(hash).exists() && !replace {
            self.sync_dirs_if_every_close(hash)?;
            return Ok(false);
        }
        if !replace && let Some(published) = self.publish_unnamed(bytes, hash) {
            return published;
        }
        let (mut file, tmp) = self.new_temp()?;
        if let Err(e) = file.write_all(bytes) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let published = self.publish_as(&file, &tmp, hash, replace);
        if !matches!(published, Ok(true)) {
            let _ = fs::remove_file(&tmp);
        }
        published
    }

    /// Writes `bytes` to an unnamed file in the blob's own directory (`O_TMPFILE`) and links it
    /// into place: one directory entry instead of a temp name plus a rename, and the inode is
    /// allocated next to its directory. `None` where the file system has no `O_TMPFILE`.
    fn publish_unnamed(&self, bytes: &[u8], hash: &Hash) -> Option<io::Result<bool>> {
        let dest = self.path(hash);
        let dir = dest.parent().expect("blob path has a parent");
        let open = || {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_TMPFILE)
                .mode(0o444)
                .open(dir)
        };
        let mut file = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Err(e) = fs::create_dir_all(dir) {
                    return Some(Err(e));
                }
                open()
            }
            other => other,
        };
        if let Err(e) = &file
            && matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
            )
        {
            return None;
        }
        Some((|| {
            let file = file
                .as_mut()
                .map_err(|e| io::Error::new(e.kind(), e.to_string()))?;
            file.write_all(bytes)?;
            if self.sync_before_publish {
                file.sync_all()?;
            } else {
                self.unsynced.store(true, Ordering::Release);
            }
            // linkat through /proc needs no CAP_DAC_READ_SEARCH (unlike AT_EMPTY_PATH).
            let src = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
            let dst = std::ffi::CString::new(dest.as_os_str().as_encoded_bytes())?;
            let rc = unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    src.as_ptr(),
                    libc::AT_FDCWD,
                    dst.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            };
            let published = if rc == 0 {
                true
            } else {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    // Published meanwhile by another writer of the same content.
                    Some(libc::EEXIST) => false,
                    _ => return Err(err),
                }
            };
            self.sync_dirs_if_every_close(hash)?;
            Ok(published)
        })())
    }

    /// Whether the blob is stored (in the bucket, with one: asked there, not the cache, and only
    /// briefly: see [`Remote::has_quickly`]).
    pub fn exists(&self, hash: &Hash) -> bool {
        match &self.remote {
            Some(remote) => remote.has_quickly(hash, None),
            None => self.path(hash).exists(),
        }
    }

    /// [`BlobStore::exists`] for content of `len` bytes: an object of another size in a
    /// bucket does not count (it is damaged; the commit stores the content again).
    pub fn exists_as(&self, hash: &Hash, len: u64) -> bool {
        match &self.remote {
            Some(remote) => remote.has_quickly(hash, Some(len)),
            None => self.path(hash).exists(),
        }
    }

    /// Moves freshly written content `hash` of `len` bytes into the cache (`place` puts the file
    /// at the path it is given), and keeps the cache within its bound. Without a cache the
    /// content is not kept: `place` is not called.
    fn keep(
        &self,
        hash: &Hash,
        len: u64,
        place: impl FnOnce(&Path) -> io::Result<()>,
    ) -> io::Result<()> {
        match &self.cache {
            Some(cache) => keep_in(cache, &self.blobs, hash, len, place),
            None => Ok(()),
        }
    }

    /// Every blob, by the two hex digits it starts with (for garbage collection): the
    /// directories there are, or all 256 prefixes of a bucket.
    pub fn prefixes(&self) -> io::Result<Vec<String>> {
        if self.remote.is_some() {
            return Ok((0..=255u8).map(|b| format!("{b:02x}")).collect());
        }
        let mut dirs: Vec<String> = fs::read_dir(&self.blobs)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        dirs.sort();
        Ok(dirs)
    }

    /// The blobs whose hashes start with `head` (two hex digits), with their sizes. In a
    /// bucket, objects younger than the upload grace are left out: their uploads may not have
    /// committed their rows yet.
    pub fn blobs_in(&self, head: &str) -> io::Result<Vec<(Hash, u64)>> {
        if let Some(remote) = &self.remote {
            let young = super::s3::grace_cutoff_ns();
            return Ok(remote
                .list(head)?
                .into_iter()
                .filter(|(_, o)| o.modified_ns <= young)
                .map(|(h, o)| (h, o.size))
                .collect());
        }
        let prefix = self.blobs.join(head);
        let mut out = Vec::new();
        for e in fs::read_dir(prefix)? {
            let e = e?;
            let name = e.file_name();
            if let Some(h) = name
                .to_str()
                .and_then(|rest| Hash::from_hex(&format!("{head}{rest}")))
            {
                out.push((h, e.metadata()?.len()));
            }
        }
        Ok(out)
    }

    /// Deletes a blob (garbage collection only, with the index write lock held).
    pub fn remove(&self, hash: &Hash) -> io::Result<()> {
        if let Some(remote) = &self.remote {
            remote.delete(hash)?;
            if let Some(cache) = &self.cache {
                cache.forget(hash);
            }
        }
        match fs::remove_file(self.path(hash)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Makes a published blob durable: its bytes and the directory entries that lead to it
    /// (`fsync()`).
    pub fn sync_published(&self, hash: &Hash) -> io::Result<()> {
        if self.remote.is_some() {
            return Ok(()); // durable in the bucket once uploaded
        }
        File::open(self.path(hash))?.sync_all()?;
        self.sync_dirs(hash)
    }

    /// Opens a blob for reading. From a bucket: from the cache, or fetched (whole, verified)
    /// into it first.
    pub fn open_blob(&self, hash: &Hash) -> io::Result<File> {
        let Some(remote) = &self.remote else {
            return File::open(self.path(hash));
        };
        let path = self.path(hash);
        if let Some(cache) = &self.cache {
            match cache.touch(hash) {
                Some(false) => match File::open(&path) {
                    Ok(f) => return Ok(f),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => cache.forget(hash),
                    Err(e) => return Err(e),
                },
                Some(true) => {
                    // Left by a daemon that did not stop cleanly: whole only if it hashes right.
                    let good = File::open(&path).and_then(hash_reader).ok() == Some(*hash);
                    if good {
                        cache.insert(hash, fs::metadata(&path)?.len()); // (now verified)
                        return File::open(&path);
                    }
                    cache.forget(hash);
                    log::warn!("cached content {hash} is damaged: fetched again");
                    let _ = fs::remove_file(&path);
                }
                None => {}
            }
        }
        let (file, tmp) = self.new_temp()?;
        let fetched = (|| {
            let mut hasher = Sha256::new();
            let got = remote.fetch(hash, &mut |at, bytes| {
                hasher.update(bytes);
                file.write_all_at(bytes, at)
            })?;
            match got.map(|size| (Hash::from_digest(hasher), size)) {
                None => Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{}: no object {hash}", remote.url()),
                )),
                Some((actual, _)) if actual != *hash => {
                    log::error!(
                        "{}: object {hash} hashes to {actual}: not served (run artifactfs fsck --verify)",
                        remote.url()
                    );
                    Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("object {hash} is damaged in the bucket"),
                    ))
                }
                Some((_, size)) => Ok(size),
            }
        })();
        match fetched {
            Ok(size) => {
                // Without a cache, or with one that cannot take it (a full disk), the verified
                // bytes are served from the unlinked temp file.
                if self.cache.is_some()
                    && let Err(e) = self.keep(hash, size, |dest| fs::rename(&tmp, dest))
                {
                    log::warn!("content {hash} is not kept in the cache: {e}");
                }
                let _ = fs::remove_file(&tmp);
                Ok(file)
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// [`BlobStore::open_blob`], shared, for content kept open (by a file handle): with a
    /// cache, it is not evicted while this lives.
    pub fn open_shared(&self, hash: &Hash) -> io::Result<std::sync::Arc<File>> {
        let file = std::sync::Arc::new(self.open_blob(hash)?);
        if let Some(cache) = &self.cache {
            cache.opened(hash, &file);
        }
        Ok(file)
    }

    /// Opens content `hash` of a bucket that is not in the cache for reads that are served as
    /// its pieces arrive, each once `check` passed it (see [`super::pieces`]): a thread of its
    /// own fetches it into a temp file, which becomes its cache file once it is whole. Readers
    /// of the same content share one fetch.
    pub fn open_arriving(&self, hash: &Hash, check: PieceCheck) -> io::Result<Arc<Arriving>> {
        let Some(remote) = self.remote.clone() else {
            return Err(io::Error::other("no bucket"));
        };
        let mut map = self.arriving.lock().unwrap_or_else(|p| p.into_inner());
        // (One whose fetch failed is not joined: this open fetches again.)
        if let Some(a) = map.get(hash).and_then(Weak::upgrade)
            && !a.failed()
        {
            return Ok(a);
        }
        map.retain(|_, w| w.strong_count() > 0);
        let (file, tmp) = self.new_temp()?;
        let size = check.size();
        let arriving = Arriving::new(size, Arc::new(file));
        let job = Fetch {
            hash: *hash,
            check,
            tmp,
            arriving: arriving.clone(),
            remote,
            cache: self.cache.clone(),
            dir: self.blobs.clone(),
            map: self.arriving.clone(),
        };
        std::thread::Builder::new()
            .name("fetch".into())
            .spawn(move || job.run())?;
        map.insert(*hash, Arc::downgrade(&arriving));
        Ok(arriving)
    }

    /// Size of a blob on disk, or `None` if it is missing.
    pub fn size(&self, hash: &Hash) -> io::Result<Option<u64>> {
        if let Some(remote) = &self.remote {
            return Ok(remote.head(hash)?.map(|o: ObjectInfo| o.size));
        }
        match fs::metadata(self.path(hash)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Re-hashes a blob and returns the hash its bytes actually have.
    pub fn rehash(&self, hash: &Hash) -> io::Result<Hash> {
        if let Some(remote) = &self.remote {
            return remote.rehash(hash);
        }
        hash_reader(self.open_blob(hash)?)
    }
}

/// Where content `hash` lives in blob directory `dir`.
fn blob_path(dir: &Path, hash: &Hash) -> PathBuf {
    let hex = hash.to_hex();
    dir.join(&hex[..2]).join(&hex[2..])
}

/// Moves content `hash` of `len` bytes into `cache`, whose files are in `dir` (`place` puts
/// the file at the path it is given), and keeps the cache within its bound.
fn keep_in(
    cache: &BlobCache,
    dir: &Path,
    hash: &Hash,
    len: u64,
    place: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
    let dest = blob_path(dir, hash);
    fs::create_dir_all(dest.parent().expect("blob path has a parent"))?;
    place(&dest)?;
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o444))?;
    cache.insert(hash, len);
    cache.evict(|h| blob_path(dir, h));
    Ok(())
}

/// Content of a bucket on its way into the cache (see [`BlobStore::open_arriving`]).
#[derive(Debug)]
pub struct Arriving {
    size: u64,
    file: Arc<File>,
    progress: Mutex<Progress>,
    arrived: Condvar,
}

#[derive(Debug)]
struct Progress {
    /// Bytes from the start that are in the file and checked.
    good: u64,
    /// Why no more will come.
    failed: Option<String>,
}

impl Arriving {
    /// Content of `size` bytes arriving into `file`, nothing of it checked yet.
    fn new(size: u64, file: Arc<File>) -> Arc<Arriving> {
        Arc::new(Arriving {
            size,
            file,
            progress: Mutex::new(Progress {
                good: 0,
                failed: None,
            }),
            arrived: Condvar::new(),
        })
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads what [`read_full_at`] would, once those bytes have arrived and were checked:
    /// waits for them, or fails (`EIO`) if they cannot come.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let end = offset.saturating_add(buf.len() as u64).min(self.size);
        if offset >= end {
            return Ok(0);
        }
        self.wait_for(end)?;
        read_full_at(&self.file, &mut buf[..(end - offset) as usize], offset)
    }

    /// Waits until the first `end` bytes have arrived and were checked.
    fn wait_for(&self, end: u64) -> io::Result<()> {
        let mut p = self.progress();
        while p.good < end.min(self.size) && p.failed.is_none() {
            p = self.arrived.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        match &p.failed {
            Some(why) if p.good < end.min(self.size) => Err(io::Error::other(why.clone())),
            _ => Ok(()),
        }
    }

    /// The content's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether its fetch failed: the bytes that did not arrive never will (an open fetches
    /// again).
    pub fn failed(&self) -> bool {
        self.progress().failed.is_some()
    }

    /// Whether bytes `..end` are there now (or will never be): a read of them does not wait.
    pub fn ready(&self, end: u64) -> bool {
        let p = self.progress();
        p.good >= end.min(self.size) || p.failed.is_some()
    }

    fn advance(&self, good: u64) {
        let mut p = self.progress();
        if good > p.good {
            p.good = good;
            self.arrived.notify_all();
        }
    }

    fn fail(&self, why: String) {
        self.progress().failed = Some(why);
        self.arrived.notify_all();
    }
}

/// The thread of an [`Arriving`] content: fetches, checks, and keeps it.
struct Fetch {
    hash: Hash,
    check: PieceCheck,
    tmp: PathBuf,
    arriving: Arc<Arriving>,
    remote: Arc<Remote>,
    cache: Option<Arc<BlobCache>>,
    dir: PathBuf,
    map: Arc<Mutex<HashMap<Hash, Weak<Arriving>>>>,
}

/// Fails an [`Arriving`] content that its fetch left unfinished, when dropped (after a
/// finished fetch, it changes nothing).
struct Ends<'a>(&'a Arriving);

impl Drop for Ends<'_> {
    fn drop(&mut self) {
        if !self.0.ready(self.0.size) {
            self.0.fail("its fetch stopped".to_string());
        }
    }
}

/// Contents fetched as they arrive at most at once (each with up to `s3::PARALLEL` ranges of
/// 8 MiB in flight); further ones wait for a turn.
const MAX_FETCHES: usize = 4;

/// How many fetches of arriving contents run now.
static FETCHES: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

/// A turn among the [`MAX_FETCHES`], given back when dropped.
struct Turn;

impl Turn {
    fn take() -> Turn {
        let mut n = FETCHES.0.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= MAX_FETCHES {
            n = FETCHES.1.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
        Turn
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        *FETCHES.0.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        FETCHES.1.notify_one();
    }
}

impl Fetch {
    fn run(mut self) {
        let _turn = Turn::take();
        let Fetch {
            hash,
            check,
            tmp,
            arriving,
            remote,
            cache,
            dir,
            map,
        } = &mut self;
        // (When its handles let go of it is seen as the bytes arrive: see `abandoned`.)
        let mut unread = None;
        let a: &Arriving = arriving;
        // Should this thread end any other way than below (a panic), no reader waits forever.
        let _ends = Ends(a);
        let mut gone = false;
        let got = remote.fetch(hash, &mut |at, bytes| {
            // The bytes must follow on from what was checked (a range that came back short
            // would leave a hole the check never saw).
            if at != check.fed() {
                return Err(io::Error::other(format!(
                    "bytes at {at} after {} checked",
                    check.fed()
                )));
            }
            if abandoned(arriving, map, hash, &mut unread) {
                gone = true;
                return Err(io::Error::other("no handle reads it any more"));
            }
            a.file.write_all_at(bytes, at)?;
            match check.feed(bytes) {
                Ok(good) => {
                    a.advance(good);
                    Ok(())
                }
                Err(piece) => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the piece at byte {piece} does not hash as the index says"),
                )),
            }
        });
        if gone {
            log::debug!("content {hash}: no handle reads it any more; its fetch stopped");
            a.fail("its fetch stopped: no handle read it".to_string());
            return;
        }
        let size = a.size;
        let outcome = match got {
            Ok(Some(_)) if check.good() == size => Ok(()),
            Ok(Some(n)) => Err(format!("it has {n} bytes, not {size}")),
            Ok(None) => Err("no such object".to_string()),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(()) => {
                if let Some(cache) = cache {
                    // Open content is never evicted: marked so before it counts.
                    cache.opened(hash, &a.file);
                    if let Err(e) = keep_in(cache, dir, hash, size, |d| fs::rename(&*tmp, d)) {
                        log::warn!("content {hash} is not kept in the cache: {e}");
                    }
                }
                a.advance(size);
            }
            Err(why) => {
                log::error!(
                    "{}: object {hash}: {why}; what did not arrive checked is not served \
                     (run artifactfs fsck --verify)",
                    remote.url()
                );
                a.fail(format!("object {hash} of {}: {why}", remote.url()));
            }
        }
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(hash)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(arriving)))
        {
            map.remove(hash);
        }
    }
}

impl Drop for Fetch {
    /// The temp file goes however the fetch ended (kept content was renamed away from it): also
    /// after a panic, or when its thread could not be started.
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// How long a fetch goes on once no handle reads its content any more: a tool that opens a
/// file, reads its header and opens it again joins the same fetch, and one that only wanted
/// the header does not leave a whole object arriving behind it (holding one of the
/// [`MAX_FETCHES`] turns). Tests shorten it: `ARTIFACTFS_TEST_UNREAD_GRACE_MS`.
const UNREAD_GRACE: Duration = Duration::from_secs(2);

fn unread_grace() -> Duration {
    static GRACE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *GRACE.get_or_init(|| {
        std::env::var("ARTIFACTFS_TEST_UNREAD_GRACE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(UNREAD_GRACE, Duration::from_millis)
    })
}

/// Whether no handle has read the content `arriving` (of `hash`, in `map`) for
/// [`unread_grace`] (`since`: when it was first seen unread). If so it is out of the map, so
/// no open can join its fetch any more.
fn abandoned(
    arriving: &Arc<Arriving>,
    map: &Mutex<HashMap<Hash, Weak<Arriving>>>,
    hash: &Hash,
    since: &mut Option<Instant>,
) -> bool {
    // The fetch's own reference is the only one: no handle holds the content.
    if Arc::strong_count(arriving) > 1 {
        *since = None;
        return false;
    }
    if since.get_or_insert_with(Instant::now).elapsed() < unread_grace() {
        return false;
    }
    // An open takes its reference only under the map's lock: checked again under it.
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if Arc::strong_count(arriving) > 1 {
        *since = None;
        return false;
    }
    if map
        .get(hash)
        .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(arriving)))
    {
        map.remove(hash);
    }
    true
}

/// Reads until `buf` is full or end of file; returns the bytes read.
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// SHA-256 of everything `reader` yields, with its states at every piece boundary (see
/// [`super::pieces`]).
pub fn hash_reader_pieces(mut reader: impl Read) -> io::Result<(Hash, Vec<u8>)> {
    let mut hasher = super::pieces::PieceHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finish())
}

/// SHA-256 of everything `reader` yields (writing down the piece states costs nothing more).
pub fn hash_reader(reader: impl Read) -> io::Result<Hash> {
    hash_reader_pieces(reader).map(|(hash, _)| hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads of content still arriving wait for checked bytes, and fail (never hang) for bytes
    /// that cannot come any more; what arrived checked before stays readable.
    #[test]
    fn arriving_reads_wait_for_checked_bytes_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"0123456789").unwrap();
        let new = || Arriving::new(10, Arc::new(File::open(&path).unwrap()));
        let a = new();
        assert!(!a.ready(1));
        let reader = {
            let a = a.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4];
                let n = a.read_at(&mut buf, 2).unwrap();
                buf[..n].to_vec()
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!reader.is_finished(), "read before its bytes were checked");
        a.advance(4);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!reader.is_finished(), "read with part of its bytes checked");
        a.advance(8);
        assert_eq!(reader.join().unwrap(), b"2345");
        // The fetch ends without the rest (a panic, here the guard of its thread dropped).
        drop(Ends(&a));
        assert!(a.ready(10));
        let mut buf = [0u8; 4];
        assert_eq!(a.read_at(&mut buf, 4).unwrap(), 4);
        assert!(a.read_at(&mut buf, 7).is_err());
        assert!(a.wait_for(10).is_err());
        // A finished fetch: the guard changes nothing; reads past the end read nothing.
        let b = new();
        b.advance(10);
        drop(Ends(&b));
        assert_eq!(b.read_at(&mut buf, 8).unwrap(), 2);
        assert_eq!(b.read_at(&mut buf, 10).unwrap(), 0);
    }

    /// A fetch goes on while a handle holds its content, and for the grace after the last
    /// one let go; then it leaves the map (no open joins it any more). A handle that comes
    /// back within the grace keeps it going.
    #[test]
    fn a_fetch_nobody_reads_is_abandoned_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"0123456789").unwrap();
        let a = Arriving::new(10, Arc::new(File::open(&path).unwrap()));
        let hash = Hash([7; 32]);
        let map = Mutex::new(HashMap::from([(hash, Arc::downgrade(&a))]));
        let in_map = |map: &Mutex<HashMap<Hash, Weak<Arriving>>>| {
            map.lock()
                .unwrap()
                .get(&hash)
                .and_then(Weak::upgrade)
                .is_some()
        };
        let reader = a.clone();
        let mut since = None;
        assert!(!abandoned(&a, &map, &hash, &mut since), "a handle holds it");
        drop(reader);
        assert!(!abandoned(&a, &map, &hash, &mut since), "within the grace");
        let long_ago = Instant::now() - unread_grace() - Duration::from_millis(1);
        let back = map
            .lock()
            .unwrap()
            .get(&hash)
            .and_then(Weak::upgrade)
            .unwrap();
        since = Some(long_ago);
        assert!(
            !abandoned(&a, &map, &hash, &mut since),
            "a handle came back"
        );
        assert_eq!(since, None);
        drop(back);
        since = Some(long_ago);
        assert!(abandoned(&a, &map, &hash, &mut since));
        assert!(!in_map(&map), "an abandoned fetch is out of the map");
        // Another content's entry is left alone.
        let other = Arriving::new(10, a.file.clone());
        map.lock().unwrap().insert(hash, Arc::downgrade(&other));
        since = Some(long_ago);
        assert!(abandoned(&a, &map, &hash, &mut since));
        assert!(in_map(&map), "the entry of a newer fetch stays");
    }

    #[test]
    fn publish_dedups_identical_content() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), true).unwrap();
        let mut stored = Vec::new();
        for _ in 0..2 {
            let (mut f, tmp) = blobs.new_temp().unwrap();
            f.write_all(b"same bytes").unwrap();
            let hash = hash_reader(File::open(&tmp).unwrap()).unwrap();
            let new = blobs.publish(&f, &tmp, &hash).unwrap();
            // A dedup hit leaves the temp file to the caller.
            assert_eq!(tmp.exists(), !new);
            let _ = fs::remove_file(&tmp);
            stored.push(new);
            assert_eq!(fs::read(blobs.path(&hash)).unwrap(), b"same bytes");
            assert_eq!(blobs.rehash(&hash).unwrap(), hash);
        }
        assert_eq!(stored, [true, false]);
    }

    /// With `--sync-every-close`, every way a blob gets published — a temp file renamed into
    /// place, bytes linked in from an unnamed file, content found already there — syncs the
    /// blob's prefix directory and then `blobs/sha256/`. Batched mode syncs no directory.
    /// (That the entries then survive a power loss cannot be staged here; this checks that the
    /// syncs are issued, on the right directories.)
    #[test]
    fn every_close_publishing_syncs_the_blob_directories() {
        for every_close in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let blobs = BlobStore::open(dir.path(), every_close).unwrap();
            let synced = |hash: &Hash| {
                let dirs = std::mem::take(&mut *blobs.synced_dirs.lock().unwrap());
                if every_close {
                    let prefix = blobs.path(hash).parent().unwrap().to_path_buf();
                    assert_eq!(dirs, [prefix, dir.path().join("blobs/sha256")]);
                } else {
                    assert!(dirs.is_empty(), "{dirs:?}");
                }
            };
            // A temp file renamed into a new prefix directory, then the same content again.
            let (mut f, tmp) = blobs.new_temp().unwrap();
            f.write_all(b"renamed").unwrap();
            let hash = Hash::of(b"renamed");
            assert!(blobs.publish(&f, &tmp, &hash).unwrap());
            synced(&hash);
            let (mut f, tmp) = blobs.new_temp().unwrap();
            f.write_all(b"renamed").unwrap();
            assert!(!blobs.publish(&f, &tmp, &hash).unwrap());
            synced(&hash);
            // Bytes (O_TMPFILE and linkat where the file system has them), new and again.
            let hash = Hash::of(b"linked");
            assert!(blobs.publish_bytes(b"linked", &hash).unwrap());
            synced(&hash);
            assert!(!blobs.publish_bytes(b"linked", &hash).unwrap());
            synced(&hash);
            // A damaged blob replaced.
            assert!(blobs.publish_bytes_as(b"linked", &hash, true).unwrap());
            synced(&hash);
            // fsync() of a published blob syncs the same directories in either mode.
            blobs.sync_published(&hash).unwrap();
            let dirs = std::mem::take(&mut *blobs.synced_dirs.lock().unwrap());
            assert_eq!(dirs.len(), 2, "{dirs:?}");
        }
    }

    #[test]
    fn clean_tmp_removes_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), true).unwrap();
        let (_f, tmp) = blobs.new_temp().unwrap();
        assert!(tmp.exists());
        assert_eq!(blobs.clean_tmp().unwrap(), 1);
        assert!(!tmp.exists());
    }
}
