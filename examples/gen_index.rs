//! Fills a store's index with many files quickly, for the stat/lookup benchmark
//! (`scripts/bench.sh`, workload 6).
//!
//! ```text
//! cargo run --release --example gen_index -- STORE FILES [FILES_PER_DIR]
//! ```
//!
//! Creates (or extends) the store `STORE` — which must not be mounted — with the run `bench`
//! and `FILES` files `runs/bench/artifacts/dNNNN/fNNNN`, `FILES_PER_DIR` (default 100) per
//! directory, directories numbered from `d0000` and files from `f0000` in each. Every file is a
//! real row pointing at one real 4 KiB blob, so the store passes `artifactfs fsck` and the files
//! can be read; only the index rows are bulk-inserted (one transaction per directory batch)
//! instead of going through FUSE. The names are the ones `scripts/bench.sh` gives its native
//! tree, so both sides can be stat'ed by formula without listing them first.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use artifactfs::namespace::Zone;
use artifactfs::store::index::{Kind, NewEntry, RUNS_INO, State};
use artifactfs::store::{Hash, Store, now_ns};

/// Rows per transaction.
const BATCH: usize = 50_000;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 3 {
        bail!("usage: gen_index STORE FILES [FILES_PER_DIR]");
    }
    let store_dir = PathBuf::from(&args[0]);
    let files: usize = args[1].parse().context("FILES")?;
    let per_dir: usize = match args.get(2) {
        Some(s) => s.parse().context("FILES_PER_DIR")?,
        None => 100,
    };
    if per_dir == 0 {
        bail!("FILES_PER_DIR must be at least 1");
    }
    let dirs = files.div_ceil(per_dir);
    let started = Instant::now();

    let store = Store::open_writable(&store_dir)
        .with_context(|| format!("open store {}", store_dir.display()))?;
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let now = now_ns();

    // The one blob every file points at.
    let content = vec![b'x'; 4096];
    let hash = Hash::of(&content);
    let (mut tmp_file, tmp_path) = store.blobs.new_temp()?;
    tmp_file.write_all(&content)?;
    store.blobs.publish(&tmp_file, &tmp_path, &hash)?;
    store.blobs.sync_published(&hash)?;

    let mut idx = store.index();
    let dir_row = |parent: u64, name: &[u8], zone: Zone| -> Result<u64> {
        let new = NewEntry::new_dir(parent, name, zone as u8, 0o755, (uid, gid), now);
        Ok(match idx.insert(&new)? {
            Some(ino) => ino,
            None => idx.lookup(parent, name)?.context("row vanished")?.ino,
        })
    };
    let run = dir_row(RUNS_INO, b"bench", Zone::RunRoot)?;
    let artifacts = dir_row(run, b"artifacts", Zone::RunTree)?;
    let mut dir_inos = Vec::with_capacity(dirs);
    for d in 0..dirs {
        dir_inos.push(dir_row(
            artifacts,
            format!("d{d:04}").as_bytes(),
            Zone::RunTree,
        )?);
    }

    // File names, then rows referring to them, one transaction per BATCH rows.
    let names: Vec<(u64, Vec<u8>)> = (0..files)
        .map(|i| {
            (
                dir_inos[i / per_dir],
                format!("f{:04}", i % per_dir).into_bytes(),
            )
        })
        .collect();
    let mut inserted = 0;
    for chunk in names.chunks(BATCH) {
        let rows: Vec<NewEntry> = chunk
            .iter()
            .map(|(parent, name)| NewEntry {
                parent: *parent,
                name,
                kind: Kind::File,
                state: State::Live,
                zone: Zone::RunTree as u8,
                hash: Some(hash),
                size: content.len() as u64,
                mode: 0o644,
                uid,
                gid,
                time: now,
            })
            .collect();
        inserted += idx.insert_many(&rows)?;
    }
    idx.sync()?;
    drop(idx);
    println!(
        "{}: {inserted} new file rows ({files} files in {dirs} dirs) in {:.1} s",
        store_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
