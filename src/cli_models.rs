//! `artifactfs models …`: the registry from the command line.
//!
//! Reading (`list`, `show`) opens the index read-only and works while the store is mounted.
//! Changing (`alias`, `register`) and `wait` go through the mount when the store is mounted
//! writable — the daemon owns the store then — and otherwise run the same file-system logic in
//! this process on the unmounted store.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::cli::{ModelsCmd, mount_of_store};
use crate::error::FsError;
use crate::fs::{ArtifactFs, Caller, FsOptions};
use crate::registry;
use crate::store::Store;
use crate::store::index::{Index, Kind, ModelRow, VersionRow, VersionStatus};

pub fn run(cmd: ModelsCmd) -> Result<ExitCode> {
    match cmd {
        ModelsCmd::List { store } => list(&open(&store.dir())?),
        ModelsCmd::Show {
            store,
            name,
            version,
        } => show(&open(&store.dir())?, &name, version),
        ModelsCmd::Alias {
            store,
            name,
            alias,
            version,
        } => set_alias(&store.dir(), &name, &alias, version),
        ModelsCmd::Wait {
            store,
            name,
            dir,
            timeout,
            grace,
        } => wait(
            &store.dir(),
            &name,
            &dir,
            Duration::from_secs_f64(timeout),
            Duration::from_secs_f64(grace),
        ),
        ModelsCmd::Register {
            store,
            name,
            path,
            dir,
        } => register(&store.dir(), &name, &path, dir),
    }
}

fn open(dir: &Path) -> Result<Store> {
    Store::open_readonly(dir).with_context(|| format!("cannot open store {}", dir.display()))
}

fn model(idx: &Index, name: &str) -> Result<ModelRow> {
    idx.model_by_name(name)?
        .ok_or_else(|| anyhow!("no registered model {name:?}"))
}

fn dir_name(idx: &Index, v: &VersionRow) -> String {
    idx.get(v.dir_ino)
        .ok()
        .flatten()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .unwrap_or_default()
}

fn list(store: &Store) -> Result<ExitCode> {
    let idx = store.index();
    println!(
        "{:<32} {:>7} {:>8} {:>7}  aliases",
        "model", "latest", "versions", "pending"
    );
    for m in idx.models()? {
        let versions = idx.versions_of(m.ino)?;
        let ready = versions
            .iter()
            .filter(|v| v.status == VersionStatus::Ready)
            .count();
        let pending = versions.len() - ready;
        let latest = registry::latest(&idx, m.ino)?
            .and_then(|v| v.version)
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into());
        let aliases: Vec<String> = idx
            .aliases_of(m.ino)?
            .into_iter()
            .map(|(a, n)| format!("@{a}={n}"))
            .collect();
        println!(
            "{:<32} {:>7} {:>8} {:>7}  {}",
            m.name,
            latest,
            ready,
            pending,
            aliases.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn show(store: &Store, name: &str, version: Option<u64>) -> Result<ExitCode> {
    let idx = store.index();
    let m = model(&idx, name)?;
    let versions = idx.versions_of(m.ino)?;
    let Some(n) = version else {
        println!(
            "{:>7}  {:<8} {:<24} {:>12} {:>6}  {:<16} message",
            "version", "status", "dir", "bytes", "files", "digest"
        );
        for v in &versions {
            println!(
                "{:>7}  {:<8} {:<24} {:>12} {:>6}  {:<16} {}",
                v.version
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into()),
                v.status.as_str(),
                dir_name(&idx, v),
                v.record.total_size,
                v.record.file_count,
                v.record.digest.get(..16).unwrap_or(""),
                v.message
            );
        }
        return Ok(ExitCode::SUCCESS);
    };
    let v = idx
        .version_number(m.ino, n)?
        .ok_or_else(|| anyhow!("model {name:?} has no READY version {n}"))?;
    let r = &v.record;
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    println!("model:            {name}");
    println!("version:          {n}");
    println!("status:           {}", v.status.as_str());
    println!(
        "directory:        models/{name}/{}",
        if v.dir_ino == m.ino {
            String::new()
        } else {
            dir_name(&idx, &v)
        }
    );
    println!("run_id:           {}", opt(&r.run_id));
    println!("artifact_path:    {}", opt(&r.artifact_path));
    println!("model_uuid:       {}", opt(&r.model_uuid));
    println!("flavors:          {}", opt(&r.flavors));
    println!("signature:        {}", opt(&r.signature));
    println!("utc_time_created: {}", opt(&r.utc_time_created));
    println!("source:           {}", opt(&r.source));
    println!("digest:           {}", r.digest);
    println!(
        "size:             {} bytes in {} files",
        r.total_size, r.file_count
    );
    println!("files:");
    for (rel, e) in idx.descendants(v.dir_ino)? {
        if e.kind == Kind::File {
            let hash = e.hash.map(|h| h.to_hex()).unwrap_or_default();
            println!(
                "  {:>12}  {}  {}",
                e.size,
                &hash[..hash.len().min(16)],
                String::from_utf8_lossy(&rel)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `f` on the store: through the mount if it is mounted writable (the daemon owns the
/// store), else in this process.
enum Target {
    Mounted(std::path::PathBuf),
    Local(Box<ArtifactFs>),
}

fn target(store: &Path) -> Result<Target> {
    if let Some(mp) = mount_of_store(store) {
        return Ok(Target::Mounted(mp));
    }
    let s = Store::open_writable(store)
        .with_context(|| format!("cannot open store {}", store.display()))?;
    Ok(Target::Local(Box::new(ArtifactFs::new(
        s,
        FsOptions::default(),
    ))))
}

fn me() -> Caller {
    unsafe {
        Caller {
            uid: libc::geteuid(),
            gid: libc::getegid(),
            pid: 0,
        }
    }
}

fn fs_err(e: FsError) -> anyhow::Error {
    match e {
        FsError::Refused(r) => anyhow!("refused: {r:?} (see the daemon log for why)"),
        FsError::Io(e) => e.into(),
    }
}

/// The inode of `models/<name>` in an in-process file system, created if missing.
fn local_model(fs: &ArtifactFs, name: &str) -> Result<u64> {
    let models = crate::store::index::MODELS_INO;
    match fs.lookup(models, name.as_bytes()) {
        Ok(a) => Ok(a.ino),
        Err(_) => Ok(fs
            .mkdir(me(), models, name.as_bytes(), 0o755)
            .map_err(fs_err)?
            .ino),
    }
}

fn set_alias(store: &Path, name: &str, alias: &str, version: u64) -> Result<ExitCode> {
    let tmp = format!(".alias-{}", std::process::id());
    let at = format!("@{alias}");
    match target(store)? {
        Target::Mounted(mp) => {
            let dir = mp.join("models").join(name);
            std::os::unix::fs::symlink(version.to_string(), dir.join(&tmp)).with_context(|| {
                format!("version {version} of {name} is not READY, or the alias is invalid")
            })?;
            std::fs::rename(dir.join(&tmp), dir.join(&at)).context("cannot set the alias")?;
        }
        Target::Local(fs) => {
            let m = local_model(&fs, name)?;
            fs.symlink(me(), m, tmp.as_bytes(), version.to_string().as_bytes())
                .map_err(fs_err)?;
            fs.rename(m, tmp.as_bytes(), m, at.as_bytes(), false)
                .map_err(fs_err)?;
        }
    }
    println!("{name}@{alias} -> version {version}");
    Ok(ExitCode::SUCCESS)
}

fn getxattr(path: &Path, name: &str) -> Option<String> {
    let p = CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| String::from_utf8_lossy(&buf[..len as usize]).into_owned())
}

fn report(status: &str, version: Option<String>, message: Option<String>) -> ExitCode {
    match status {
        "READY" => {
            println!("READY version {}", version.unwrap_or_default());
            ExitCode::SUCCESS
        }
        _ => {
            println!("FAILED: {}", message.unwrap_or_default());
            ExitCode::FAILURE
        }
    }
}

fn wait(
    store: &Path,
    name: &str,
    dir: &str,
    timeout: Duration,
    grace: Duration,
) -> Result<ExitCode> {
    let deadline = Instant::now() + timeout;
    match target(store)? {
        Target::Mounted(mp) => {
            let path = mp.join("models").join(name).join(dir);
            let mut failed_since: Option<(Instant, Option<String>)> = None;
            loop {
                let status = getxattr(&path, "user.artifactfs.status");
                let message = getxattr(&path, "user.artifactfs.message");
                match status.as_deref() {
                    Some("READY") => {
                        return Ok(report(
                            "READY",
                            getxattr(&path, "user.artifactfs.version"),
                            None,
                        ));
                    }
                    Some("FAILED") => {
                        // The same failure for the whole grace period: final.
                        match &failed_since {
                            Some((t, m)) if *m == message => {
                                if t.elapsed() >= grace || Instant::now() >= deadline {
                                    return Ok(report("FAILED", None, message));
                                }
                            }
                            _ => failed_since = Some((Instant::now(), message)),
                        }
                    }
                    _ => failed_since = None,
                }
                if Instant::now() >= deadline {
                    println!(
                        "still {} after {:?}",
                        status.as_deref().unwrap_or("not a model version"),
                        timeout
                    );
                    return Ok(ExitCode::from(2));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Target::Local(fs) => loop {
            // Nothing is being written to an unmounted embedded store: the first round
            // validates. A shared store's other machines may still be writing the version, or
            // validating it: rounds go on until it is decided (or the timeout).
            fs.tick(Instant::now() + Duration::from_secs(3600));
            let idx = fs.store().index();
            let m = model(&idx, name)?;
            let dir_ino = if dir.is_empty() || dir == "." {
                m.ino
            } else {
                idx.lookup(m.ino, dir.as_bytes())?
                    .ok_or_else(|| anyhow!("no directory models/{name}/{dir}"))?
                    .ino
            };
            let v = idx.version_of_dir(dir_ino)?.ok_or_else(|| {
                anyhow!("models/{name}/{dir} is not a model version (no MLmodel)")
            })?;
            if v.status != VersionStatus::Pending {
                return Ok(report(
                    v.status.as_str(),
                    v.version.map(|n| n.to_string()),
                    Some(v.message),
                ));
            }
            if Instant::now() >= deadline {
                println!("still PENDING after {timeout:?}");
                return Ok(ExitCode::from(2));
            }
            drop(idx);
            std::thread::sleep(Duration::from_millis(200));
        },
    }
}

fn register(store: &Path, name: &str, path: &str, dir: Option<String>) -> Result<ExitCode> {
    let source = path.trim_matches('/');
    let dir = dir.unwrap_or_else(|| {
        let parts: Vec<&str> = source.split('/').collect();
        match parts.as_slice() {
            // MLflow 3's logged models: runs/models/<model_id>/artifacts
            ["runs", "models", model_id, ..] => model_id.to_string(),
            ["runs", run_id, _, ..] => run_id.to_string(),
            _ => parts.last().copied().unwrap_or("model").to_string(),
        }
    });
    match target(store)? {
        Target::Mounted(mp) => {
            let model_dir = mp.join("models").join(name);
            if !model_dir.is_dir() {
                std::fs::create_dir(&model_dir)
                    .with_context(|| format!("cannot create models/{name}"))?;
            }
            let p = CString::new(model_dir.as_os_str().as_bytes())?;
            let n = CString::new(format!("{}{dir}", crate::fs::XATTR_REGISTER_PREFIX))?;
            let rc = unsafe {
                libc::setxattr(
                    p.as_ptr(),
                    n.as_ptr(),
                    source.as_ptr().cast(),
                    source.len(),
                    0,
                )
            };
            if rc != 0 {
                bail!(
                    "cannot register {source} as models/{name}/{dir}: {} (see the daemon log)",
                    std::io::Error::last_os_error()
                );
            }
        }
        Target::Local(fs) => {
            let m = local_model(&fs, name)?;
            fs.register_from(me(), m, dir.as_bytes(), source.as_bytes())
                .map_err(fs_err)?;
        }
    }
    println!(
        "registering {source} as models/{name}/{dir}; `artifactfs models wait {name} {dir}` tells when it is READY"
    );
    Ok(ExitCode::SUCCESS)
}
