//! The bytes of a file being written: in memory while small, in a temp file in the store when
//! large.
//!
//! Most artifacts are small (metrics, configs, tokenizer files). Keeping them in memory until
//! they are committed spares a temp file's creation and removal for each — and when the content
//! already exists (dedup), nothing touches the disk at all. A body spills to a temp file once it
//! grows past [`MEM_FILE_MAX`] or the daemon-wide budget [`MEM_TOTAL_MAX`] is used up.
//!
//! A disk body whose temp file was published as a blob is *frozen*: the blob must never change,
//! so the next write first copies it to a fresh temp file.

use std::fs::File;
use std::io::{self, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::blobs::{hash_reader_pieces, read_full_at};
use crate::store::s3::Streaming;
use crate::store::{BlobStore, Hash};

/// Largest file kept in memory while it is written.
pub const MEM_FILE_MAX: u64 = 1 << 20;
/// Most bytes all in-memory bodies together may hold.
pub const MEM_TOTAL_MAX: u64 = 32 << 20;

/// Bytes held by in-memory bodies, daemon-wide.
#[derive(Debug, Default)]
pub struct MemBudget(AtomicU64);

impl MemBudget {
    fn take(&self, n: u64) -> bool {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            if cur + n > MEM_TOTAL_MAX {
                return false;
            }
            match self
                .0
                .compare_exchange_weak(cur, cur + n, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(c) => cur = c,
            }
        }
    }

    fn give(&self, n: u64) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub fn used(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub enum Body {
    Mem(Vec<u8>),
    Disk {
        file: File,
        /// `Some` while `file` is a private temp file; `None` once it was published (frozen).
        tmp: Option<PathBuf>,
    },
}

impl Body {
    pub fn new() -> Body {
        Body::Mem(Vec::new())
    }

    /// Reads up to `buf.len()` bytes at `offset` (the caller caps it at the file size).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self {
            Body::Mem(v) => {
                let start = (offset as usize).min(v.len());
                let n = buf.len().min(v.len() - start);
                buf[..n].copy_from_slice(&v[start..start + n]);
                Ok(n)
            }
            Body::Disk { file, .. } => read_full_at(file, buf, offset),
        }
    }

    /// Makes room for a body of `len` bytes: stays in memory if it may, else moves to disk.
    fn reserve(&mut self, blobs: &BlobStore, budget: &MemBudget, len: u64) -> io::Result<()> {
        if let Body::Mem(v) = self {
            let have = v.len() as u64;
            if len <= have || (len <= MEM_FILE_MAX && budget.take(len - have)) {
                return Ok(());
            }
            let (mut file, tmp) = blobs.new_temp()?;
            if let Err(e) = file.write_all(v) {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            budget.give(have);
            *self = Body::Disk {
                file,
                tmp: Some(tmp),
            };
        }
        self.thaw(blobs)
    }

    /// Gives a frozen disk body a private temp file again (a copy of the published blob): before
    /// it is changed, or published again because garbage collection took the blob meanwhile.
    pub fn thaw(&mut self, blobs: &BlobStore) -> io::Result<()> {
        if let Body::Disk { file, tmp } = self
            && tmp.is_none()
        {
            let (mut fresh, path) = blobs.new_temp()?;
            let mut old = file.try_clone()?;
            old.rewind()?;
            if let Err(e) = io::copy(&mut old, &mut fresh) {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
            *file = fresh;
            *tmp = Some(path);
        }
        Ok(())
    }

    pub fn write_at(
        &mut self,
        blobs: &BlobStore,
        budget: &MemBudget,
        data: &[u8],
        offset: u64,
    ) -> io::Result<()> {
        let end = offset + data.len() as u64;
        self.reserve(blobs, budget, end)?;
        match self {
            Body::Mem(v) => {
                if v.len() < end as usize {
                    v.resize(end as usize, 0);
                }
                v[offset as usize..end as usize].copy_from_slice(data);
                Ok(())
            }
            Body::Disk { file, .. } => file.write_all_at(data, offset),
        }
    }

    /// Sets the length (ftruncate); `old` is the current logical size.
    pub fn set_len(
        &mut self,
        blobs: &BlobStore,
        budget: &MemBudget,
        old: u64,
        len: u64,
    ) -> io::Result<()> {
        self.reserve(blobs, budget, len.max(old))?;
        match self {
            Body::Mem(v) => {
                budget.give((v.len() as u64).saturating_sub(len));
                v.resize(len as usize, 0);
                Ok(())
            }
            Body::Disk { file, .. } => file.set_len(len),
        }
    }

    /// Hashes the first `len` bytes from scratch (when writes were not sequential).
    /// Also returns the hash's states at every piece boundary (see [`crate::store::pieces`]).
    pub fn rehash(&mut self, len: u64) -> io::Result<(Hash, Vec<u8>)> {
        match self {
            Body::Mem(v) => {
                let mut h = crate::store::pieces::PieceHasher::new();
                h.update(&v[..len as usize]);
                Ok(h.finish())
            }
            Body::Disk { file, .. } => {
                // A failed write may have left bytes past the logical end.
                if file.metadata()?.len() != len {
                    file.set_len(len)?;
                }
                let mut f = file.try_clone()?;
                f.rewind()?;
                hash_reader_pieces(io::Read::take(f, len))
            }
        }
    }

    /// Publishes the content as blob `hash`. A disk body whose temp file became the blob is
    /// frozen afterwards; on a dedup hit it keeps its temp file.
    /// `replace`: the existing blob is known to be damaged; these bytes take its place.
    #[cfg(test)]
    pub fn publish(&mut self, blobs: &BlobStore, hash: &Hash, replace: bool) -> io::Result<()> {
        self.publish_streamed(blobs, hash, replace, Streaming::Idle)
    }

    /// [`Body::publish`] of a body whose upload began while it was written.
    pub fn publish_streamed(
        &mut self,
        blobs: &BlobStore,
        hash: &Hash,
        replace: bool,
        stream: Streaming,
    ) -> io::Result<()> {
        if replace {
            self.thaw(blobs)?;
        }
        match self {
            Body::Mem(v) => blobs.publish_bytes_as(v, hash, replace).map(|_| ()),
            Body::Disk { file, tmp } => {
                if let Some(path) = tmp.take() {
                    match blobs.publish_streamed(file, &path, hash, replace, stream) {
                        Ok(true) => {}
                        Ok(false) => *tmp = Some(path),
                        Err(e) => {
                            *tmp = Some(path);
                            return Err(e);
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// The temp file of a body on disk that is not published yet (what an upload while
    /// writing reads from).
    pub fn unpublished_file(&self) -> Option<&File> {
        match self {
            Body::Disk { file, tmp: Some(_) } => Some(file),
            _ => None,
        }
    }

    /// The first `len` bytes, to be stored in the index (small content only).
    pub fn contents(&self, len: u64) -> io::Result<std::borrow::Cow<'_, [u8]>> {
        match self {
            Body::Mem(v) => Ok(std::borrow::Cow::Borrowed(&v[..len as usize])),
            Body::Disk { file, .. } => {
                let mut buf = vec![0u8; len as usize];
                let n = read_full_at(file, &mut buf, 0)?;
                buf.truncate(n);
                Ok(std::borrow::Cow::Owned(buf))
            }
        }
    }

    /// Frees what the body holds: its share of the memory budget, its temp file.
    pub fn discard(&mut self, budget: &MemBudget) {
        match self {
            Body::Mem(v) => {
                budget.give(v.len() as u64);
                *v = Vec::new();
            }
            Body::Disk { tmp, .. } => {
                if let Some(path) = tmp.take() {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_bodies_stay_in_memory_and_large_ones_spill() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), false).unwrap();
        let budget = MemBudget::default();
        let mut b = Body::new();
        b.write_at(&blobs, &budget, b"hello", 0).unwrap();
        assert!(matches!(b, Body::Mem(_)));
        assert_eq!(budget.used(), 5);
        let big = vec![7u8; MEM_FILE_MAX as usize];
        b.write_at(&blobs, &budget, &big, 5).unwrap();
        assert!(matches!(b, Body::Disk { .. }));
        assert_eq!(budget.used(), 0);
        let mut buf = [0u8; 6];
        assert_eq!(b.read_at(&mut buf, 0).unwrap(), 6);
        assert_eq!(&buf, b"hello\x07");
        let len = 5 + MEM_FILE_MAX;
        let h = b.rehash(len).unwrap().0;
        b.publish(&blobs, &h, false).unwrap();
        // Frozen: the next write goes to a copy, the blob stays as published.
        b.write_at(&blobs, &budget, b"X", 0).unwrap();
        assert_eq!(blobs.rehash(&h).unwrap(), h);
        b.discard(&budget);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_duplicate_keeps_its_temp_file_until_discarded_and_then_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), false).unwrap();
        let budget = MemBudget::default();
        let tmp_count = || std::fs::read_dir(dir.path().join("tmp")).unwrap().count();
        let data = vec![3u8; 2 * MEM_FILE_MAX as usize];
        let len = data.len() as u64;
        let mut first = Body::new();
        first.write_at(&blobs, &budget, &data, 0).unwrap();
        let h = first.rehash(len).unwrap().0;
        first.publish(&blobs, &h, false).unwrap();
        first.discard(&budget);
        assert_eq!(tmp_count(), 0, "the first copy's temp file became the blob");

        let mut again = Body::new();
        again.write_at(&blobs, &budget, &data, 0).unwrap();
        assert!(matches!(again, Body::Disk { .. }));
        assert_eq!(again.rehash(len).unwrap().0, h);
        again.publish(&blobs, &h, false).unwrap();
        // Kept until the index row is committed, in case gc takes the existing blob meanwhile.
        assert!(matches!(again, Body::Disk { tmp: Some(_), .. }));
        assert_eq!(tmp_count(), 1);
        again.discard(&budget);
        assert_eq!(tmp_count(), 0, "the duplicate's temp file is released");
        assert_eq!(blobs.rehash(&h).unwrap(), h, "the stored blob is intact");
    }

    #[test]
    fn the_memory_budget_is_shared() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), false).unwrap();
        let budget = MemBudget::default();
        let chunk = vec![1u8; MEM_FILE_MAX as usize];
        let mut bodies: Vec<Body> = (0..(MEM_TOTAL_MAX / MEM_FILE_MAX) + 1)
            .map(|_| Body::new())
            .collect();
        for b in &mut bodies {
            b.write_at(&blobs, &budget, &chunk, 0).unwrap();
        }
        assert!(
            matches!(bodies.last().unwrap(), Body::Disk { .. }),
            "the budget is exhausted"
        );
        assert_eq!(budget.used(), MEM_TOTAL_MAX);
        for b in &mut bodies {
            b.discard(&budget);
        }
        assert_eq!(budget.used(), 0);
    }
}
