//! The running SHA-256 of a file being written sequentially.
//!
//! Small files are hashed inline. Once a file has grown past [`BACKGROUND_FROM`] bytes, its
//! chunks go to a hashing thread of its own, so hashing overlaps with the next write request
//! instead of adding to it; a bounded queue keeps memory in check. At most
//! [`MAX_BACKGROUND`] such threads run at once, whatever the number of writers: beyond that a
//! file is hashed inline, in its write requests (so the queues hold at most
//! `MAX_BACKGROUND` x `QUEUE` x 1 MiB). `finish` hands back the digest state and the next write
//! may start a new thread from it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;

use crate::store::pieces::PieceHasher;
#[cfg(test)]
use sha2::{Digest, Sha256};

/// Files are hashed on a thread of their own once they are this large.
pub const BACKGROUND_FROM: u64 = 4 << 20;
/// Chunks (write requests, up to 1 MiB each) that may wait for the hashing thread.
const QUEUE: usize = 8;
/// Hashing threads at most, for all files together.
pub const MAX_BACKGROUND: usize = 4;

/// Hashing threads running now.
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// A slot among the [`MAX_BACKGROUND`] hashing threads, given back when dropped.
struct Slot;

impl Slot {
    fn take() -> Option<Slot> {
        RUNNING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_BACKGROUND).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::AcqRel);
    }
}

pub enum RunningHash {
    Inline(PieceHasher),
    Background {
        tx: SyncSender<Vec<u8>>,
        thread: JoinHandle<PieceHasher>,
    },
    /// The state was lost (no thread could be started, or it died): re-hash at commit.
    Poisoned,
}

impl RunningHash {
    pub fn new() -> Self {
        RunningHash::Inline(PieceHasher::new())
    }

    /// Adds the next bytes; `total` is how many bytes have been hashed with these included.
    pub fn update(&mut self, data: &[u8], total: u64) {
        if let RunningHash::Inline(h) = self
            && total >= BACKGROUND_FROM
            && let Some(slot) = Slot::take()
        {
            let mut state = std::mem::take(h);
            let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
            let spawned = std::thread::Builder::new()
                .name("hash".into())
                .spawn(move || {
                    let _slot = slot;
                    for chunk in rx {
                        state.update(&chunk);
                    }
                    state
                });
            match spawned {
                Ok(thread) => *self = RunningHash::Background { tx, thread },
                Err(e) => {
                    log::warn!(
                        "no thread for background hashing ({e}); the file is re-hashed at commit"
                    );
                    *self = RunningHash::Poisoned;
                }
            }
        }
        match self {
            RunningHash::Inline(h) => h.update(data),
            RunningHash::Background { tx, .. } => {
                if tx.send(data.to_vec()).is_err() {
                    *self = RunningHash::Poisoned;
                }
            }
            RunningHash::Poisoned => {}
        }
    }

    /// The digest state of everything added so far (waits for the hashing thread), or `None`
    /// if it was lost and the content must be re-hashed.
    pub fn finish(&mut self) -> Option<PieceHasher> {
        let state = match std::mem::replace(self, RunningHash::Poisoned) {
            RunningHash::Inline(h) => Some(h),
            RunningHash::Background { tx, thread } => {
                drop(tx);
                thread.join().ok()
            }
            RunningHash::Poisoned => None,
        };
        if let Some(h) = &state {
            *self = RunningHash::Inline(h.clone());
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two tests here count slots: they do not run at the same time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn no_more_than_max_background_threads_and_inline_beyond() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let chunk = vec![1u8; 1 << 20];
        let mut hashes: Vec<RunningHash> = (0..MAX_BACKGROUND * 3)
            .map(|_| RunningHash::new())
            .collect();
        for h in &mut hashes {
            h.update(&chunk, BACKGROUND_FROM);
        }
        // Other tests may hold slots at the same time: never more than the maximum.
        let background = hashes
            .iter()
            .filter(|h| matches!(h, RunningHash::Background { .. }))
            .count();
        assert!(background <= MAX_BACKGROUND, "{background}");
        assert!(RUNNING.load(Ordering::Acquire) <= MAX_BACKGROUND);
        assert!(hashes.iter().any(|h| matches!(h, RunningHash::Inline(_))));
        let want = Sha256::digest(&chunk);
        for mut h in hashes {
            assert_eq!(h.finish().unwrap().hash().0, want.as_slice());
        }
    }

    #[test]
    fn background_hashing_gives_the_same_digest_and_can_continue() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let data: Vec<u8> = (0..(BACKGROUND_FROM as usize * 3))
            .map(|i| (i * 7) as u8)
            .collect();
        let mut h = RunningHash::new();
        let mut total = 0u64;
        for chunk in data.chunks(1 << 20) {
            total += chunk.len() as u64;
            h.update(chunk, total);
        }
        assert!(matches!(h, RunningHash::Background { .. }));
        let first = h.finish().unwrap();
        assert_eq!(first.hash().0, Sha256::digest(&data).as_slice());
        // More bytes after a commit continue from the same state.
        h.update(b"tail", total + 4);
        let mut all = data.clone();
        all.extend_from_slice(b"tail");
        assert_eq!(
            h.finish().unwrap().hash().0,
            Sha256::digest(&all).as_slice()
        );
    }
}
