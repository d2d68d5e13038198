//! Garbage collection: removes blobs that no entry uses, and — past the retention — blobs that
//! only tombstones (removed files) use.
//!
//! Safe while a daemon writes to the store: each blob prefix directory is handled in one
//! transaction holding SQLite's write lock, and the daemon checks, under the same lock, that a
//! blob still exists when it records a row that uses it (`Index::commit_file`); if this
//! collection removed it in between, the daemon stores the bytes again. Tombstones keep their
//! paths taken after their content is collected.

use std::io::{self, IsTerminal, Write};
use std::time::Duration;

use super::{Store, now_ns};

#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Blobs used only by tombstones younger than this are kept.
    pub retention: Duration,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs: u64,
    pub in_use: u64,
    /// Used only by tombstones still within the retention.
    pub retained: u64,
    pub removed: u64,
    pub bytes_freed: u64,
    pub tombstones_purged: u64,
}

impl Store {
    pub fn gc(&self, opts: &GcOptions) -> io::Result<GcReport> {
        let cutoff =
            now_ns().saturating_sub(opts.retention.as_nanos().min(i64::MAX as u128) as i64);
        let prefixes = self.blobs.prefixes()?;
        let progress = io::stderr().is_terminal();
        let mut report = GcReport::default();
        for (i, prefix) in prefixes.iter().enumerate() {
            if progress {
                eprint!("\rgc: {}/{} blob directories", i + 1, prefixes.len());
                let _ = io::stderr().flush();
            }
            let blobs = self.blobs.blobs_in(prefix)?;
            let idx = self.index();
            idx.write_locked(|idx| {
                for (hash, size) in &blobs {
                    report.blobs += 1;
                    let (live, newest_tombstone) = idx.blob_users(hash)?;
                    if live {
                        report.in_use += 1;
                        continue;
                    }
                    if newest_tombstone.is_some_and(|t| t >= cutoff) {
                        report.retained += 1;
                        continue;
                    }
                    report.removed += 1;
                    report.bytes_freed += size;
                    if !opts.dry_run {
                        self.blobs.remove(hash)?;
                        report.tombstones_purged += idx.purge_tombstones(hash)? as u64;
                    }
                }
                Ok(())
            })?;
        }
        if progress {
            eprintln!();
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Hash;
    use crate::store::index::{Commit, NewEntry, RUNS_INO, State};

    fn file(store: &Store, name: &[u8], bytes: &[u8]) -> u64 {
        crate::store::committed_test_file(store, name, bytes)
    }

    #[test]
    fn collects_unused_and_expired_blobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_writable(dir.path()).unwrap();
        file(&store, b"live", b"live bytes");
        let gone = file(&store, b"gone", b"removed bytes");
        store.index().tombstone(gone, now_ns()).unwrap();
        let orphan = Hash::of(b"orphan");
        store.blobs.publish_bytes(b"orphan", &orphan).unwrap();

        let keep_removed = GcOptions {
            retention: Duration::from_secs(3600),
            dry_run: false,
        };
        let r = store
            .gc(&GcOptions {
                dry_run: true,
                ..keep_removed.clone()
            })
            .unwrap();
        assert_eq!((r.blobs, r.in_use, r.retained, r.removed), (3, 1, 1, 1));
        assert!(store.blobs.exists(&orphan), "dry run removes nothing");

        let r = store.gc(&keep_removed).unwrap();
        assert_eq!((r.removed, r.bytes_freed), (1, 6));
        assert!(!store.blobs.exists(&orphan));
        assert!(store.blobs.exists(&Hash::of(b"removed bytes")));

        let r = store
            .gc(&GcOptions {
                retention: Duration::ZERO,
                dry_run: false,
            })
            .unwrap();
        assert_eq!((r.removed, r.tombstones_purged), (1, 1));
        assert!(store.blobs.exists(&Hash::of(b"live bytes")));
        // The path stays taken, and fsck no longer expects the collected blob.
        let idx = store.index();
        let t = idx.lookup(RUNS_INO, b"gone").unwrap().unwrap();
        assert_eq!((t.state, t.hash), (State::Tombstone, None));
        assert_eq!(idx.file_rows().unwrap().len(), 1);
    }

    #[test]
    fn a_commit_never_records_a_blob_that_gc_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_writable(dir.path()).unwrap();
        // A writer published a blob but has not recorded its row yet; gc takes it.
        let hash = Hash::of(b"in flight");
        store.blobs.publish_bytes(b"in flight", &hash).unwrap();
        store
            .gc(&GcOptions {
                retention: Duration::ZERO,
                dry_run: false,
            })
            .unwrap();
        let idx = store.index();
        let ino = idx
            .insert(&NewEntry::new_file(RUNS_INO, b"f", 2, 0o644, (0, 0), 1))
            .unwrap()
            .unwrap();
        let c = idx
            .commit_file(ino, &hash, 9, 1, now_ns(), || store.blobs.exists(&hash))
            .unwrap();
        assert_eq!(c, Commit::BlobMissing);
        assert_eq!(
            idx.get(ino).unwrap().unwrap().hash,
            None,
            "nothing was recorded"
        );
    }
}
