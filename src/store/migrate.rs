//! `artifactfs migrate`: an embedded store copied into a shared one (a PostgreSQL index and a
//! blob directory), for a team that outgrows one machine.
//!
//! Blobs first, each re-hashed as it is copied (a blob whose bytes do not match its name stops
//! the migration, naming the files that use it) and made durable before it is published; then
//! every row in one transaction of the target index. So an interrupted migration leaves blobs
//! nobody uses yet and no row, and running it again resumes: blobs already there are kept, and
//! the rows are copied once. The target must be empty, unless it is this same migration
//! resumed; no daemon mounts it until the migration is done. The embedded store is only read
//! (under its writer lock, so no daemon changes it meanwhile).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::pieces::PIECE;
use super::{Hash, Store, blobs::BlobStore, index::Index, now_ns};

/// What a migration did.
#[derive(Debug, Default)]
pub struct Summary {
    pub blobs_copied: u64,
    pub blobs_present: u64,
    pub bytes_copied: u64,
    pub rows: u64,
    /// The rows had been copied by an earlier run already.
    pub already_done: bool,
}

/// Copies the embedded store at `source` into the shared store of `index_url` with its blobs in
/// `blobs_dir` or in bucket `bucket`; `progress` gets a line now and then.
pub fn migrate(
    source: &Path,
    index_url: &str,
    blobs_dir: Option<&Path>,
    bucket: Option<&str>,
    progress: &mut dyn FnMut(&str),
) -> io::Result<Summary> {
    if !source.join("index.sqlite").exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no embedded store at {}", source.display()),
        ));
    }
    let src = Store::open_writable(source)?;
    let owner = unsafe { (libc::geteuid(), libc::getegid()) };
    let target = Index::open_postgres_target(index_url, owner, now_ns())?;
    let migration = std::path::absolute(source)?.display().to_string();
    let mut summary = Summary::default();
    if target.migration_target_state(&migration)? {
        summary.already_done = true;
        return Ok(summary);
    }
    let dest = match (bucket, blobs_dir) {
        (Some(url), _) => BlobStore::remote_client(super::s3::Remote::open(url)?),
        (None, Some(dir)) => {
            let dest = BlobStore::open_at(dir, &dir.join("tmp").join("migrate"), true)?;
            dest.clean_tmp()?;
            dest
        }
        (None, None) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "migrate needs --blobs (file:///DIR or s3://BUCKET[/PREFIX])",
            ));
        }
    };
    let mut blobs = Vec::new();
    for prefix in src.blobs.prefixes()? {
        blobs.extend(src.blobs.blobs_in(&prefix)?);
    }
    let total: u64 = blobs.iter().map(|(_, n)| n).sum();
    let mut last = Instant::now();
    for (i, (hash, size)) in blobs.iter().enumerate() {
        let there = dest.size(hash)? == Some(*size);
        // In a bucket, content of more than one piece gets its piece states (see
        // `super::pieces`), so that it is read as it arrives.
        let pieces = bucket.is_some() && *size > PIECE;
        if there {
            summary.blobs_present += 1;
            if pieces && target.pieces_get(hash)?.is_none() {
                let input = File::open(src.blobs.path(hash))?;
                let (got, states) = super::blobs::hash_reader_pieces(input)?;
                if got == *hash {
                    target.pieces_put(hash, PIECE, &states)?;
                }
            }
        } else {
            let states = copy_blob(&src, &dest, hash).map_err(|e| blob_error(&src, hash, e))?;
            if pieces {
                target.pieces_put(hash, PIECE, &states)?;
            }
            summary.blobs_copied += 1;
            summary.bytes_copied += size;
        }
        if last.elapsed() >= Duration::from_secs(1) || i + 1 == blobs.len() {
            last = Instant::now();
            progress(&format!(
                "blobs: {} of {} ({} of {} MiB copied, {} already there)",
                i + 1,
                blobs.len(),
                summary.bytes_copied >> 20,
                total >> 20,
                summary.blobs_present
            ));
        }
    }
    progress("rows: copying the index in one transaction");
    summary.rows = src.index().copy_rows_into(&target, &migration)?;
    Ok(summary)
}

/// Copies blob `hash` into `dest`, re-hashing the bytes on the way; nothing is published if
/// they do not match. Into a bucket, returns the hash's piece states (else nothing).
fn copy_blob(src: &Store, dest: &BlobStore, hash: &Hash) -> io::Result<Vec<u8>> {
    let mut input = File::open(src.blobs.path(hash))?;
    if let Some(remote) = dest.remote() {
        // Hashed first, then uploaded from the same (locked, unchanging) file.
        let (got, states) = super::blobs::hash_reader_pieces(&input)?;
        if got != *hash {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("its bytes hash to {got}"),
            ));
        }
        let len = input.metadata()?.len();
        return remote.upload_file(&input, len, hash, false).map(|_| states);
    }
    let (mut out, tmp) = dest.new_temp()?;
    let result = (|| {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
        let got = Hash::from_digest(hasher);
        if got != *hash {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("its bytes hash to {got}"),
            ));
        }
        dest.publish(&out, &tmp, hash).map(|_| Vec::new())
    })();
    if result.is_err() || tmp.exists() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A blob that could not be copied, with the paths that use it.
fn blob_error(src: &Store, hash: &Hash, e: io::Error) -> io::Error {
    let users: Vec<String> = src
        .index()
        .file_rows()
        .map(|rows| {
            rows.into_iter()
                .filter(|r| r.hash == *hash)
                .map(|r| format!("/{}", r.path.display()))
                .collect()
        })
        .unwrap_or_default();
    io::Error::new(
        e.kind(),
        format!(
            "blob {hash} (used by {}): {e}; nothing of the index was copied (run artifactfs fsck \
             --verify on the embedded store, then migrate again: it resumes)",
            if users.is_empty() {
                "no file".to_string()
            } else {
                users.join(", ")
            }
        ),
    )
}
