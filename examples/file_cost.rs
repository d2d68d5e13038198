//! What one small file costs the daemon, phase by phase, without the kernel: the file-system
//! logic (`ArtifactFs`) driven directly, the way the FUSE adapter drives it for `cp`.
//!
//! ```text
//! cargo run --release --example file_cost -- [FILES] [BYTES] [DIR]
//! ```
//!
//! Writes `FILES` (default 10,000) files of `BYTES` (default 4096) distinct random-looking bytes
//! into a new store in a temp directory below `DIR` (default `target/`, so the store is on the
//! same disk as the bench's), 100 per directory, and prints the mean time of each request:
//! `create`, `write`, `flush` (the commit `close()` waits for: hash, store, index transaction)
//! and `release` (the seal), plus the `getattr`/`lookup` the kernel adds. As in the daemon, a
//! second thread runs the periodic work (`tick`: batched sync, index checkpoint, seals) every
//! 200 ms. Then every file is opened for reading and released, twice, as a warm `cat` of the
//! tree does (the kernel's page cache holds the bytes: only `open` and `release` reach the
//! daemon); the second round's means are printed. The store is removed afterwards. Used for the
//! per-file cost breakdown in the README (Performance). `FILE_COST_INDEX=postgresql://…` with
//! `FILE_COST_BLOBS=file:///DIR` measures a shared store instead.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use artifactfs::fs::{ArtifactFs, Caller, FsOptions};
use artifactfs::store::Store;
use artifactfs::store::index::RUNS_INO;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let files: usize = args.first().map_or(Ok(10_000), |a| a.parse())?;
    let bytes: usize = args.get(1).map_or(Ok(4096), |a| a.parse())?;
    let base = args.get(2).map_or("target", String::as_str);
    std::fs::create_dir_all(base)?;
    let dir = tempfile::Builder::new()
        .prefix("file-cost-")
        .tempdir_in(base)
        .context("temp store")?;
    // FILE_COST_INDEX=postgresql://… (and FILE_COST_BLOBS=file:///DIR): a shared store.
    let store = match std::env::var("FILE_COST_INDEX") {
        Ok(index) => {
            let blobs = std::env::var("FILE_COST_BLOBS").ok();
            let locations = artifactfs::store::Locations::parse(Some(&index), blobs.as_deref())?;
            Store::open_writable_at(
                dir.path(),
                &locations,
                artifactfs::store::Durability::EveryClose,
            )?
        }
        Err(_) => Store::open_writable(dir.path())?,
    };
    let shared = store.is_shared();
    let fs = ArtifactFs::new(
        store,
        FsOptions {
            shared_store: shared,
            ..FsOptions::default()
        },
    );
    let me = Caller {
        uid: 0,
        gid: 0,
        pid: 0,
    };
    let err = |e| anyhow::anyhow!("{e:?}");
    let run = fs.mkdir(me, RUNS_INO, b"bench", 0o755).map_err(err)?;
    let art = fs.lookup(run.ino, b"artifacts").map_err(err)?.ino;
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            // FILE_COST_NO_TICK=1: no periodic work, so the WAL keeps every commit's frames (to
            // count them; the store is then kept and its path printed).
            while std::env::var_os("FILE_COST_NO_TICK").is_none()
                && !stop.load(std::sync::atomic::Ordering::Relaxed)
            {
                fs.tick(Instant::now());
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let result = write_files(&fs, me, art, files, bytes);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        result
    })?;
    if std::env::var_os("FILE_COST_NO_TICK").is_some() {
        std::mem::forget(fs);
        println!("store kept: {}", dir.keep().display());
    }
    Ok(())
}

fn write_files(fs: &ArtifactFs, me: Caller, art: u64, files: usize, bytes: usize) -> Result<()> {
    let inos = create_files(fs, me, art, files, bytes)?;
    // The periodic work's next round (seals of the last files released) first, as a warm `cat`
    // of files written a while ago finds it done.
    fs.tick(Instant::now());
    open_files(fs, &inos)
}

/// A warm `cat` of every file: `open` (read-only) and `release` of each, two rounds.
fn open_files(fs: &ArtifactFs, inos: &[u64]) -> Result<()> {
    let err = |e| anyhow::anyhow!("{e:?}");
    let mut t = [Duration::ZERO; 2];
    for _round in 0..2 {
        t = [Duration::ZERO; 2];
        for &ino in inos {
            let s = Instant::now();
            let (fh, _) = fs.open(ino, libc::O_RDONLY).map_err(err)?;
            let a = Instant::now();
            fs.release(fh).map_err(err)?;
            let b = Instant::now();
            t[0] += a - s;
            t[1] += b - a;
        }
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / inos.len() as f64;
    println!(
        "warm cat of the {} files, mean µs per file and request:",
        inos.len()
    );
    println!("  {:<16} {:7.1}", "open (sealed)", per(t[0]));
    println!("  {:<16} {:7.1}", "release", per(t[1]));
    Ok(())
}

fn create_files(
    fs: &ArtifactFs,
    me: Caller,
    art: u64,
    files: usize,
    bytes: usize,
) -> Result<Vec<u64>> {
    let mut inos = Vec::with_capacity(files);
    let err = |e| anyhow::anyhow!("{e:?}");
    let mut t = [Duration::ZERO; 6];
    let mut data = vec![0u8; bytes];
    let mut dirs = Vec::new();
    for i in 0..files {
        if i % 100 == 0 {
            dirs.push(
                fs.mkdir(me, art, format!("d{:04}", i / 100).as_bytes(), 0o755)
                    .map_err(err)?
                    .ino,
            );
        }
        let parent = *dirs.last().unwrap();
        // Distinct content per file: a counter in every 8-byte word.
        for (w, chunk) in data.chunks_mut(8).enumerate() {
            let v = ((i as u64) << 32 | w as u64).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        let name = format!("f{:04}", i % 100);
        let s = Instant::now();
        let absent = fs.lookup(parent, name.as_bytes()).is_err();
        let a = Instant::now();
        let (attr, fh) = fs.create(me, parent, name.as_bytes(), 0o644).map_err(err)?;
        let b = Instant::now();
        fs.write(fh, 0, &data).map_err(err)?;
        let c = Instant::now();
        fs.flush(fh).map_err(err)?;
        let d = Instant::now();
        fs.release(fh).map_err(err)?;
        let e = Instant::now();
        fs.getattr(attr.ino).map_err(err)?;
        let f = Instant::now();
        assert!(absent);
        inos.push(attr.ino);
        for (k, (x, y)) in [(s, a), (a, b), (b, c), (c, d), (d, e), (e, f)]
            .into_iter()
            .enumerate()
        {
            t[k] += y - x;
        }
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / files as f64;
    let total: Duration = t.iter().sum();
    println!("{files} files of {bytes} bytes, mean µs per file and request:");
    for (k, name) in [
        "lookup (absent)",
        "create",
        "write",
        "flush (commit)",
        "release (seal)",
        "getattr",
    ]
    .iter()
    .enumerate()
    {
        println!("  {name:<16} {:7.1}", per(t[k]));
    }
    println!("  {:<16} {:7.1}", "total", per(total));
    Ok(inos)
}
