//! The errors of the file-system logic, named by meaning rather than by errno.
//!
//! The logic refuses operations with a [`Refusal`] kind; only the FUSE adapter turns a kind into
//! an errno (its one table lives in `fuse.rs` and in the README). Failures of the disk or index
//! arrive as `io::Error` and keep their OS error (a full disk stays `ENOSPC`).

use std::io;

/// Why an operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such entry.
    NotFound,
    /// On a shared store: the entry the kernel still remembers was removed by another machine
    /// since it was looked up. `ESTALE` makes the kernel look its name up again, once.
    Stale,
    /// The path exists or was used before (tombstone).
    Exists,
    /// Forbidden by the write-once rules or the namespace.
    NotPermitted,
    /// The file is being written through another handle.
    Busy,
    /// A malformed name or an unsupported flag.
    Invalid,
    /// A name longer than 255 bytes.
    NameTooLong,
    /// `rmdir` of a directory with entries.
    NotEmpty,
    NotDir,
    IsDir,
    /// The mount is read-only.
    ReadOnly,
    /// No such extended attribute.
    NoData,
    /// Extended attributes other than ours cannot be written.
    NotSupported,
    /// A file handle the daemon does not know.
    BadHandle,
    /// An xattr buffer too small for the value.
    Range,
    /// A file would grow past the mount's `--max-file-size`.
    FileTooBig,
    /// The caller's permissions do not allow it (checked by the daemon where the kernel
    /// cannot: content reached by reference).
    AccessDenied,
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("refused: {0:?}")]
    Refused(Refusal),
    #[error(transparent)]
    Io(#[from] io::Error),
}

pub type FsResult<T> = Result<T, FsError>;
