//! Garbage collection: removes blobs that no entry uses, and — past the retention — blobs that
//! only tombstones (removed files) use. Content the index holds (small files, see
//! `INLINE_MAX`) is collected by the same rules, after the blob directories: its rows are
//! listed a page at a time and deleted in the same kind of short transactions.
//!
//! Safe while a daemon writes to the store: every blob is decided on and removed inside a
//! transaction holding SQLite's write lock, and the daemon checks, under the same lock, that a
//! blob still exists when it records a row that uses it (`Index::commit_file`); if this
//! collection removed it in an earlier transaction, the daemon stores the bytes again. Which
//! rows use a blob can only change under that lock, so the decision and the removal, made
//! within one transaction, cannot be overtaken by a commit: that holds for each transaction on
//! its own, however the blobs are split among them. Tombstones keep their paths taken after
//! their content is collected.
//!
//! The daemon waits for the lock while gc holds it (its commits retry with the mount still
//! served, see `Store::retry_busy`), so every transaction is short: at most [`BATCH_BLOBS`]
//! blobs and about [`BATCH_TIME`], then the lock is released for [`BATCH_PAUSE`] so that
//! waiting requests get it.

use std::collections::VecDeque;
use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

use super::{Hash, Store, now_ns};

/// Most blobs one transaction decides on.
pub const BATCH_BLOBS: usize = 1000;
/// A transaction takes no more blobs once it has held the write lock this long (a removal on a
/// slow disk may add a little).
pub const BATCH_TIME: Duration = Duration::from_millis(50);
/// The lock is left free this long between two transactions: longer than the daemon sleeps
/// between two attempts while it waits (`Store::retry_while_busy`: at most 10 ms), so a waiting
/// request gets in. (A request still waiting inside SQLite's busy handler may sleep through
/// the pause; it then fails busy after `DAEMON_BUSY_TIMEOUT` and goes on retrying that way.)
/// Every pause makes gc longer: on a slow disk, with transactions of a few dozen removals, a
/// 30 ms pause cost a third of gc's time.
pub const BATCH_PAUSE: Duration = Duration::from_millis(15);

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
    /// Write transactions the collection took.
    pub transactions: u64,
    /// The longest time one of them held the index's write lock (until its commit).
    pub longest_hold: Duration,
}

impl Store {
    pub fn gc(&self, opts: &GcOptions) -> io::Result<GcReport> {
        let cutoff =
            now_ns().saturating_sub(opts.retention.as_nanos().min(i64::MAX as u128) as i64);
        if let Some(remote) = self.blobs.remote()
            && !opts.dry_run
        {
            // Temporary objects of uploads while writing that a killed daemon never copied.
            let n = remote.clean_staging(super::s3::grace_cutoff_ns())?;
            if n > 0 {
                log::info!("gc: removed {n} abandoned temporary object(s) of uploads");
            }
        }
        let prefixes = self.blobs.prefixes()?;
        let progress = io::stderr().is_terminal();
        let mut report = GcReport::default();
        // Contents listed and not yet decided on (`true`: held by the index); a transaction may
        // span prefix directories.
        let mut pending: VecDeque<(Hash, u64, bool)> = VecDeque::new();
        let mut listed = prefixes.iter().enumerate();
        // The last inline content listed (hex), `None` once all were.
        let mut inline_after = Some(String::new());
        loop {
            while pending.len() < BATCH_BLOBS
                && let Some((i, prefix)) = listed.next()
            {
                if progress {
                    eprint!("\rgc: {}/{} blob directories", i + 1, prefixes.len());
                    let _ = io::stderr().flush();
                }
                pending.extend(
                    self.blobs
                        .blobs_in(prefix)?
                        .into_iter()
                        .map(|(h, n)| (h, n, false)),
                );
            }
            if pending.len() < BATCH_BLOBS
                && let Some(after) = &inline_after
            {
                let page =
                    self.retry_busy(|| "gc".into(), |idx| idx.inline_list(after, BATCH_BLOBS))?;
                inline_after = (page.len() == BATCH_BLOBS)
                    .then(|| page.last().map(|(h, _)| h.to_hex()))
                    .flatten();
                pending.extend(page.into_iter().map(|(h, n)| (h, n, true)));
            }
            if pending.is_empty() {
                break;
            }
            if report.transactions > 0 {
                std::thread::sleep(BATCH_PAUSE);
            }
            let (taken, batch, held) = self.retry_busy(
                || "gc".into(),
                |idx| {
                    let mut batch = GcReport::default();
                    let mut taken = 0;
                    let mut locked = None;
                    idx.write_locked(|idx| {
                        let since = *locked.insert(Instant::now());
                        for (hash, size, inline) in &pending {
                            if taken == BATCH_BLOBS || since.elapsed() >= BATCH_TIME {
                                break;
                            }
                            taken += 1;
                            batch.blobs += 1;
                            let (live, newest_tombstone) = idx.blob_users(hash)?;
                            if live {
                                batch.in_use += 1;
                                continue;
                            }
                            if newest_tombstone.is_some_and(|t| t >= cutoff) {
                                batch.retained += 1;
                                continue;
                            }
                            batch.removed += 1;
                            batch.bytes_freed += size;
                            if !opts.dry_run {
                                if *inline {
                                    idx.inline_remove(hash)?;
                                } else {
                                    self.blobs.remove(hash)?;
                                    idx.pieces_remove(hash)?;
                                }
                                batch.tombstones_purged += idx.purge_tombstones(hash)? as u64;
                            }
                        }
                        Ok(())
                    })?;
                    let held = locked.map_or(Duration::ZERO, |t| t.elapsed());
                    Ok((taken, batch, held))
                },
            )?;
            pending.drain(..taken);
            report.add(&batch);
            report.transactions += 1;
            report.longest_hold = report.longest_hold.max(held);
            log::debug!("gc: {taken} blobs in one transaction holding the index {held:?}");
        }
        if progress {
            eprintln!();
        }
        Ok(report)
    }
}

impl GcReport {
    fn add(&mut self, b: &GcReport) {
        self.blobs += b.blobs;
        self.in_use += b.in_use;
        self.retained += b.retained;
        self.removed += b.removed;
        self.bytes_freed += b.bytes_freed;
        self.tombstones_purged += b.tombstones_purged;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn inline_file(store: &Store, name: &[u8], bytes: &[u8]) -> u64 {
        crate::store::inline_test_file(store, name, bytes)
    }

    #[test]
    fn collects_inline_contents_by_the_same_rules_in_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_writable(dir.path()).unwrap();
        inline_file(&store, b"live", b"live bytes");
        let gone = inline_file(&store, b"gone", b"removed bytes");
        store.index().tombstone(gone, now_ns()).unwrap();
        // A rewritable file's earlier content, kept as history.
        let meta = inline_file(&store, b"meta", b"model_name: null");
        store
            .index()
            .history_add(meta, &Hash::of(b"model_name: a"), 13, 1, now_ns())
            .unwrap();
        let earlier = inline_file(&store, b"earlier", b"model_name: a");
        store.index().delete_row(earlier).unwrap();
        // Orphans across several listing pages.
        let orphans = 2 * BATCH_BLOBS + 10;
        for i in 0..orphans {
            let name = format!("orphan {i}");
            let ino = inline_file(&store, name.as_bytes(), name.as_bytes());
            store.index().delete_row(ino).unwrap();
        }
        let inline = |h: &[u8]| store.index().inline_get(&Hash::of(h)).unwrap().is_some();
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
        let all = orphans as u64 + 4;
        assert_eq!(
            (r.blobs, r.in_use, r.retained, r.removed),
            (all, 3, 1, orphans as u64)
        );
        assert!(inline(b"orphan 0"), "dry run removes nothing");
        let r = store.gc(&keep_removed).unwrap();
        assert_eq!(r.removed, orphans as u64);
        assert!(r.transactions >= 3, "{r:?}");
        assert!(!inline(b"orphan 0") && !inline(b"orphan 2009"));
        assert!(inline(b"removed bytes") && inline(b"live bytes"));
        assert!(inline(b"model_name: a"), "history keeps its content");
        let r = store
            .gc(&GcOptions {
                retention: Duration::ZERO,
                dry_run: false,
            })
            .unwrap();
        assert_eq!((r.removed, r.tombstones_purged), (1, 1));
        assert!(!inline(b"removed bytes"));
        assert_eq!(store.index().inline_list("", 10).unwrap().len(), 3);
    }

    #[test]
    fn works_in_transactions_of_bounded_size_across_blob_directories() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_writable(dir.path()).unwrap();
        let live = file(&store, b"live", b"live bytes");
        let orphans = 2 * BATCH_BLOBS + 10;
        for i in 0..orphans {
            let bytes = format!("orphan {i}");
            store
                .blobs
                .publish_bytes(bytes.as_bytes(), &Hash::of(bytes.as_bytes()))
                .unwrap();
        }
        let opts = GcOptions {
            retention: Duration::ZERO,
            dry_run: true,
        };
        // At least three transactions (at most BATCH_BLOBS blobs each), but not one per blob
        // directory: all 256 hold some of these blobs. (A dry run only reads, so a transaction
        // reaches BATCH_BLOBS long before BATCH_TIME, even on a slow disk.)
        let r = store.gc(&opts).unwrap();
        assert_eq!((r.blobs, r.removed), (orphans as u64 + 1, orphans as u64));
        assert!(r.transactions >= 3, "{r:?}");
        assert!(r.transactions < 256, "{r:?}");
        let r = store
            .gc(&GcOptions {
                dry_run: false,
                ..opts
            })
            .unwrap();
        assert_eq!((r.blobs, r.in_use), (orphans as u64 + 1, 1));
        assert_eq!(r.removed, orphans as u64);
        assert!(r.transactions >= 3, "{r:?}");
        let idx = store.index();
        let hash = idx.get(live).unwrap().unwrap().hash.unwrap();
        assert!(store.blobs.exists(&hash));
        assert_eq!(store.blobs.prefixes().unwrap().len(), 256);
        assert_eq!(
            store
                .blobs
                .prefixes()
                .unwrap()
                .iter()
                .map(|p| store.blobs.blobs_in(p).unwrap().len())
                .sum::<usize>(),
            1
        );
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
