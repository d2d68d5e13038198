//! artifactfs: a FUSE file system for machine-learning artifacts, write-once and
//! content-addressed.
//!
//! Dependencies point one way: [`fuse`] (the kernel adapter) → [`fs`] (the file-system logic)
//! → [`namespace`] (path rules) and [`store`] (blobs and the SQLite index). [`cli`] wires them to
//! the command line.

pub mod cli;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod namespace;
pub mod store;
