//! Writing a sealed file again with the bytes it already has: a retry, a re-run, `cp` over an
//! identical copy. Nothing is stored; every `write()` is compared with the sealed content at its
//! offset, and the first one that differs (or goes past the end) is refused at once.
//!
//! After `O_TRUNC` (or `ftruncate` to 0) the writer must write every byte again: a `close()`
//! that leaves fewer fails. Without it, unwritten ranges keep their bytes, so any matching
//! writes leave the file as it was.

use std::io;
use std::sync::Arc;

use crate::store::Content;

/// Where `data`, written at `offset`, first differs from the bytes of `file` there (a short
/// file differs where it ends); `None` if they are the same. Both rewrites of sealed files and
/// files created again at a tombstone compare their writes with it.
pub(super) fn differs_at(file: &Content, offset: u64, data: &[u8]) -> io::Result<Option<u64>> {
    let mut old = vec![0u8; data.len()];
    let n = file.read_at(&mut old, offset)?;
    let same = old[..n]
        .iter()
        .zip(data)
        .take_while(|(a, b)| a == b)
        .count();
    Ok((same < data.len()).then_some(offset + same as u64))
}

/// A rewrite of a sealed file through one open file description.
pub(super) struct Rewrite {
    pub ino: u64,
    /// The sealed size: no byte may be written at or past it.
    pub size: u64,
    pub blob: Arc<Content>,
    /// Opened with `O_TRUNC` (or truncated to 0): every byte must be written again.
    pub truncated: bool,
    /// Opened with `O_APPEND`: any non-empty write would add bytes.
    pub append: bool,
    /// Whether the writer may read the file (its mode bits): only then is each write's
    /// comparison answered at once. A writer who may only write (a mode such as 0620) would
    /// otherwise learn the bytes one by one from which writes are refused; such a writer's
    /// writes are all accepted, and `close()` succeeds only if they wrote every byte again,
    /// the same: it learns whether its whole content was the file's, nothing less.
    pub compare_writes: bool,
    /// A write differed from the sealed bytes (recorded, not answered: see `compare_writes`).
    pub differed: bool,
    /// Any byte was written through this handle.
    pub wrote: bool,
    /// Byte ranges written and found equal, merged and in order.
    covered: Vec<(u64, u64)>,
}

impl Rewrite {
    pub fn new(ino: u64, size: u64, blob: Arc<Content>, truncated: bool) -> Self {
        Rewrite {
            ino,
            size,
            blob,
            truncated,
            append: false,
            compare_writes: true,
            differed: false,
            wrote: false,
            covered: Vec::new(),
        }
    }

    /// Records that `[start, end)` was written with the sealed bytes.
    pub fn cover(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        self.covered.push((start, end));
        self.covered.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.covered.len());
        for &(s, e) in &self.covered {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.covered = merged;
    }

    /// Truncation to 0 (`ftruncate`): as if opened with `O_TRUNC`.
    pub fn truncate(&mut self) {
        self.truncated = true;
        self.covered.clear();
    }

    /// Whether the file, as this handle leaves it, has exactly its sealed content (for a writer
    /// who may not read it: it wrote nothing, or every byte again, the same).
    pub fn complete(&self) -> bool {
        let whole = self.size == 0 || self.covered.first() == Some(&(0, self.size));
        if !self.compare_writes && self.wrote {
            return !self.differed && whole;
        }
        !self.truncated || whole
    }

    /// The first byte not written again after a truncation (for the log line).
    pub fn missing_from(&self) -> u64 {
        match self.covered.first() {
            Some(&(0, e)) => e,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(size: u64, truncated: bool) -> Rewrite {
        Rewrite::new(
            1,
            size,
            Arc::new(Content::Inline(vec![0; size as usize])),
            truncated,
        )
    }

    #[test]
    fn coverage_merges_ranges_in_any_order() {
        let mut r = rewrite(10, true);
        assert!(!r.complete());
        r.cover(5, 10);
        assert!(!r.complete());
        assert_eq!(r.missing_from(), 0);
        r.cover(0, 3);
        assert_eq!(r.missing_from(), 3);
        r.cover(2, 6);
        assert!(r.complete());
        r.truncate();
        assert!(!r.complete());
    }

    #[test]
    fn a_writer_who_may_not_read_must_write_every_byte_the_same() {
        let mut r = rewrite(10, false);
        r.compare_writes = false;
        assert!(r.complete(), "nothing written: nothing changes");
        r.wrote = true;
        r.cover(0, 4);
        assert!(
            !r.complete(),
            "a part, even the same bytes, answers nothing"
        );
        r.cover(4, 10);
        assert!(r.complete());
        r.differed = true;
        assert!(!r.complete());
    }

    #[test]
    fn without_truncation_any_matching_writes_leave_the_file_whole() {
        let mut r = rewrite(10, false);
        assert!(r.complete());
        r.cover(3, 4);
        assert!(r.complete());
        // An empty file is whole whatever happens.
        assert!(rewrite(0, true).complete());
    }
}
