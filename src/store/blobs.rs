//! The blob directory: content-addressed, immutable byte files.
//!
//! Owns `STORE/blobs/sha256/<2 hex>/<62 hex>` and `STORE/tmp/`. New content is written to a
//! temp file, hashed by the caller, then published by `rename` into its address — or dropped
//! when that address already exists, which is how identical content is stored once. A blob is
//! never modified after it is published; nothing here deletes one (that is garbage collection's
//! job, which must consult the index first).
//!
//! This module knows nothing about paths, runs or SQLite: a second backend (S3, say) would
//! implement the same operations behind `Store`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::Hash;

/// The blob directory of one store.
#[derive(Debug)]
pub struct BlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
    next_tmp: AtomicU64,
    /// fsync each blob before it is renamed into place; otherwise blobs are synced in batches
    /// by `Store::sync` and checked after a crash (see `Store::open_writable`).
    sync_before_publish: bool,
    /// Blobs were published without fsync since the last `Store::sync`.
    unsynced: AtomicBool,
}

impl BlobStore {
    /// Opens (and creates) the blob and temp directories below `root`.
    pub fn open(root: &Path, sync_before_publish: bool) -> io::Result<Self> {
        let blobs = root.join("blobs").join("sha256");
        let tmp = root.join("tmp");
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
        })
    }

    /// The blob directory of an existing store, creating nothing (read-only use).
    pub fn open_existing(root: &Path) -> Self {
        BlobStore {
            blobs: root.join("blobs").join("sha256"),
            tmp: root.join("tmp"),
            next_tmp: AtomicU64::new(0),
            sync_before_publish: true,
            unsynced: AtomicBool::new(false),
        }
    }

    /// Whether blobs were published without fsync since the last call (and clears that).
    pub fn take_unsynced(&self) -> bool {
        self.unsynced.swap(false, Ordering::AcqRel)
    }

    /// Where the blob with this hash lives.
    pub fn path(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.blobs.join(&hex[..2]).join(&hex[2..])
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
    pub fn publish_as(
        &self,
        file: &File,
        tmp: &Path,
        hash: &Hash,
        replace: bool,
    ) -> io::Result<bool> {
        let dest = self.path(hash);
        if dest.exists() && !replace {
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
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(dest.parent().expect("blob path has a parent"))?;
                fs::rename(tmp, &dest)?;
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// Publishes `bytes` as the blob `hash` (written to a temp file first). Returns `true`
    /// when new bytes were stored, `false` when the blob already existed.
    pub fn publish_bytes(&self, bytes: &[u8], hash: &Hash) -> io::Result<bool> {
        self.publish_bytes_as(bytes, hash, false)
    }

    pub fn publish_bytes_as(&self, bytes: &[u8], hash: &Hash, replace: bool) -> io::Result<bool> {
        if self.path(hash).exists() && !replace {
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
            if rc == 0 {
                return Ok(true);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // Published meanwhile by another writer of the same content.
                Some(libc::EEXIST) => Ok(false),
                _ => Err(err),
            }
        })())
    }

    pub fn exists(&self, hash: &Hash) -> bool {
        self.path(hash).exists()
    }

    /// Every blob, by the two-hex-digit directory it sits in (for garbage collection).
    pub fn prefixes(&self) -> io::Result<Vec<PathBuf>> {
        let mut dirs: Vec<PathBuf> = fs::read_dir(&self.blobs)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        Ok(dirs)
    }

    /// The blobs in one prefix directory, with their sizes.
    pub fn blobs_in(&self, prefix: &Path) -> io::Result<Vec<(Hash, u64)>> {
        let head = prefix
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
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
        match fs::remove_file(self.path(hash)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Makes a published blob durable: its bytes and its directory entry (`fsync()`).
    pub fn sync_published(&self, hash: &Hash) -> io::Result<()> {
        let path = self.path(hash);
        File::open(&path)?.sync_all()?;
        File::open(path.parent().expect("blob path has a parent"))?.sync_all()
    }

    /// Opens a blob for reading.
    pub fn open_blob(&self, hash: &Hash) -> io::Result<File> {
        File::open(self.path(hash))
    }

    /// Size of a blob on disk, or `None` if it is missing.
    pub fn size(&self, hash: &Hash) -> io::Result<Option<u64>> {
        match fs::metadata(self.path(hash)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Re-hashes a blob and returns the hash its bytes actually have.
    pub fn rehash(&self, hash: &Hash) -> io::Result<Hash> {
        hash_reader(self.open_blob(hash)?)
    }
}

/// SHA-256 of everything `reader` yields.
pub fn hash_reader(mut reader: impl Read) -> io::Result<Hash> {
    let mut hasher = Sha256::new();
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
    Ok(Hash::from_digest(hasher))
}

#[cfg(test)]
mod tests {
    use super::*;

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
