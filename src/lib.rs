//! artifactfs: a FUSE file system for machine-learning artifacts, write-once and
//! content-addressed.
//!
//! Dependencies point one way: [`fuse`] (the kernel adapter) → [`fs`] (the file-system logic)
//! → [`namespace`] (path rules), [`registry`] (model versions, with [`mlmodel`] validating)
//! and [`store`] (blobs and the SQLite index). [`cli`] wires them to
//! the command line.

pub mod cli;
mod cli_models;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod mlmodel;
pub mod mounts;
pub mod namespace;
pub mod registry;
pub mod store;
