//! The command line: `mount`, `unmount`, `fsck`, `ls`.
//!
//! Owns argument parsing (clap), daemonising a mount (a re-executed `--foreground` child that
//! reports readiness through a pipe), signal handling for a clean unmount, and the read-only
//! store commands that work without FUSE.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};

use crate::fs::{ArtifactFs, FsOptions};
use crate::fuse::FuseAdapter;
use crate::mounts;
use crate::store::index::{Kind, State};
use crate::store::{self, Store};

/// Environment variable set on the re-executed daemon: report readiness on stdout.
const READY_ENV: &str = "ARTIFACTFS_READY_PIPE";

#[derive(Parser, Debug)]
#[command(
    name = "artifactfs",
    version,
    about = "A write-once, content-addressed FUSE file system for ML artifacts"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Mount a store; returns once the mount is live (the daemon keeps running).
    Mount(MountArgs),
    /// Unmount a mount point and wait for its daemon to finish. If the file system is still
    /// mounted elsewhere (a container's volume), say so and exit 2 within a second or so: the
    /// daemon serves those mounts until they are gone.
    Unmount {
        mountpoint: PathBuf,
        /// Detach even if files are open (lazy unmount).
        #[arg(long)]
        lazy: bool,
        /// Wait, with progress, until mounts left in other namespaces are gone and the daemon
        /// has finished.
        #[arg(long)]
        wait: bool,
    },
    /// Copy an embedded store (index rows, tombstones, history, registry, small contents,
    /// blobs) into an empty shared store; re-hashes every blob; resumes after an interruption.
    Migrate {
        /// The embedded store to copy (only read) [default: as for mount]
        #[arg(long, env = "ARTIFACTFS_STORE")]
        store: Option<PathBuf>,
        /// The shared store's index: postgresql://USER[:PASS]@HOST[:PORT]/DB (an empty database)
        #[arg(long)]
        index: String,
        /// The shared store's blob directory: file:///DIR
        #[arg(long)]
        blobs: String,
    },
    /// Check that every index row has its blob; with --verify, re-hash every blob.
    Fsck {
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        verify: bool,
    },
    /// Remove blobs no entry uses, and blobs only removed files use once they are older than
    /// the retention. Safe while the store is mounted and written.
    Gc {
        #[command(flatten)]
        store: StoreArg,
        /// Retention for removed files' content, e.g. 30d, 12h, 15m, 90s, 0
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        older_than: Duration,
        /// Report what would be removed, remove nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// List a path of the store without mounting (e.g. `runs`, `runs/<id>/artifacts`).
    Ls {
        #[command(flatten)]
        store: StoreArg,
        #[arg(default_value = "runs")]
        path: PathBuf,
        /// Every content a rewritable file has had (time, hash, size), the current one last
        #[arg(long)]
        history: bool,
    },
    /// The model registry: list, show, alias, wait for a registration, register without copying.
    #[command(subcommand)]
    Models(ModelsCmd),
}

#[derive(Subcommand, Debug)]
pub enum ModelsCmd {
    /// Registered models with their latest version and aliases.
    List {
        #[command(flatten)]
        store: StoreArg,
    },
    /// A model's versions, or one version in detail (status, message, run, signature, digest, files).
    Show {
        #[command(flatten)]
        store: StoreArg,
        name: String,
        version: Option<u64>,
    },
    /// Point alias `@ALIAS` of a model at a READY version.
    Alias {
        #[command(flatten)]
        store: StoreArg,
        name: String,
        alias: String,
        version: u64,
    },
    /// Wait until models/<name>/<dir> is READY (exit 0) or FAILED (exit 1).
    Wait {
        #[command(flatten)]
        store: StoreArg,
        name: String,
        dir: String,
        /// Seconds to wait at most (exit 2 on time-out).
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
        /// A failure counts only once it has lasted this many seconds: a writer that pauses
        /// (MLflow's save_model infers requirements for seconds) makes a draft fail
        /// provisionally, and its next file makes it PENDING again.
        #[arg(long, default_value_t = 15.0)]
        grace: f64,
    },
    /// Register a directory of the store (e.g. runs/<id>/artifacts/model) as a new version,
    /// without copying bytes.
    Register {
        #[command(flatten)]
        store: StoreArg,
        name: String,
        path: String,
        /// Name of the version directory [default: the run id, else the source's last component]
        #[arg(long = "as")]
        dir: Option<String>,
    },
}

impl Cmd {
    /// The store the command works on, if any.
    fn store_arg(&self) -> Option<&StoreArg> {
        match self {
            Cmd::Mount(args) => Some(&args.store),
            Cmd::Unmount { .. } | Cmd::Migrate { .. } => None,
            Cmd::Fsck { store, .. } | Cmd::Gc { store, .. } | Cmd::Ls { store, .. } => Some(store),
            Cmd::Models(m) => Some(match m {
                ModelsCmd::List { store }
                | ModelsCmd::Show { store, .. }
                | ModelsCmd::Alias { store, .. }
                | ModelsCmd::Wait { store, .. }
                | ModelsCmd::Register { store, .. } => store,
            }),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct StoreArg {
    /// Store directory [default: $XDG_DATA_HOME/artifactfs or ~/.local/share/artifactfs]
    #[arg(long, env = "ARTIFACTFS_STORE")]
    pub store: Option<PathBuf>,
    /// A shared index: postgresql://USER[:PASS]@HOST[:PORT]/DB[?sslmode=…] (a password may
    /// also come from PGPASSWORD or ~/.pgpass) [default: STORE/index.sqlite, or the index the
    /// store was first mounted with]
    #[arg(long, env = "ARTIFACTFS_INDEX")]
    pub index: Option<String>,
    /// Where the blobs are: a directory every machine mounts (file:///DIR), or a bucket
    /// (s3://BUCKET[/PREFIX], configured by AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID…;
    /// gs:// and az:// likewise) [default: STORE/blobs, or those the store was first mounted
    /// with]
    #[arg(long, env = "ARTIFACTFS_BLOBS")]
    pub blobs: Option<String>,
}

impl StoreArg {
    /// Takes `--index` and `--blobs` for every store this command opens.
    pub fn take_locations(&self) -> anyhow::Result<()> {
        let l = store::Locations::parse(self.index.as_deref(), self.blobs.as_deref())?;
        l.set_for_process();
        Ok(())
    }

    pub fn dir(&self) -> PathBuf {
        absolute(&self.store.clone().unwrap_or_else(store::default_store_dir))
    }
}

#[derive(Args, Debug, Clone)]
pub struct MountArgs {
    #[command(flatten)]
    pub store: StoreArg,
    pub mountpoint: PathBuf,
    /// Stay attached (for systemd and containers); SIGINT/SIGTERM unmount cleanly.
    #[arg(long)]
    pub foreground: bool,
    /// Refuse every change with EROFS.
    #[arg(long)]
    pub read_only: bool,
    /// Let other users use the mount (the kernel then checks mode bits).
    #[arg(long)]
    pub allow_other: bool,
    /// Owner reported for every entry and recorded for new ones [default: the caller's]
    #[arg(long)]
    pub uid: Option<u32>,
    /// Group reported for every entry and recorded for new ones [default: the caller's]
    #[arg(long)]
    pub gid: Option<u32>,
    /// Threads serving requests [default: number of CPUs, at least 4; N itself is taken as
    /// given, at least 1]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where a detached daemon logs [default: STORE/artifactfs.log]
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// fsync every blob before close() returns, instead of syncing the store once a second
    #[arg(long)]
    pub sync_every_close: bool,
    /// Serve reads of sealed files through the daemon instead of FUSE passthrough
    #[arg(long)]
    pub no_passthrough: bool,
    /// Seconds a model directory must be quiet before its version is validated
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
    /// Largest file a write or truncate may make (K, M, G, T suffixes); beyond it EFBIG. Every
    /// byte of a file is hashed when it is committed, holes included.
    #[arg(long, default_value = "1T", value_parser = parse_size)]
    pub max_file_size: u64,
    /// With blobs in a bucket: the most the machine's cache of it (STORE/cache) may hold (K, M,
    /// G, T suffixes); least recently opened content goes first, open content never
    #[arg(long, default_value = "10G", value_parser = parse_size)]
    pub cache_size: u64,
    /// With blobs in a bucket: upload a large file written sequentially while it is written,
    /// to a temporary key copied to its content key at close(); close() then waits for the
    /// tail, the completion and the copy instead of the whole upload (see the README: on
    /// servers whose copy is slow, this is slower)
    #[arg(long)]
    pub upload_while_writing: bool,
    /// A file name below runs/ that may be replaced with other content, its earlier contents
    /// kept as history (`ls --history`); repeatable. registered_model_meta (MLflow writes it on
    /// every load) is rewritable unless `--rewritable none` is given.
    #[arg(long = "rewritable", value_name = "NAME")]
    pub rewritable: Vec<String>,
}

/// The rewritable names: the default plus those given, or only those given after `none`.
fn rewritable_names(given: &[String]) -> Vec<Vec<u8>> {
    let mut names = if given.iter().any(|n| n == "none") {
        Vec::new()
    } else {
        vec![crate::fs::DEFAULT_REWRITABLE.as_bytes().to_vec()]
    };
    names.extend(
        given
            .iter()
            .filter(|n| *n != "none")
            .map(|n| n.as_bytes().to_vec()),
    );
    names
}

/// Test hook: the daemon panics on a lookup of this name (see `FsOptions::panic_on_lookup`).
pub const FAULT_PANIC_ENV: &str = "ARTIFACTFS_FAULT_PANIC_ON";

/// A size in bytes, with an optional K, M, G or T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown unit in {s:?}: use K, M, G or T")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512G)"))?;
    n.checked_mul(1u64 << shift)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} is not a usable size"))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `artifactfs migrate` (see `store::migrate`).
fn migrate(store: Option<PathBuf>, index: &str, blobs: &str) -> Result<()> {
    let source = absolute(&store.unwrap_or_else(store::default_store_dir));
    let target = store::Locations::parse(Some(index), Some(blobs))?;
    let Some(url) = target.index else {
        unreachable!("given")
    };
    let blobs_shown = match (&target.bucket, &target.blobs) {
        (Some(b), _) => b.clone(),
        (None, Some(d)) => format!("file://{}", d.display()),
        (None, None) => unreachable!("given"),
    };
    let summary = store::migrate::migrate(
        &source,
        &url,
        target.blobs.as_deref(),
        target.bucket.as_deref(),
        &mut |line| {
            eprintln!("migrate: {line}");
        },
    )
    .with_context(|| format!("cannot migrate {}", source.display()))?;
    let index_shown = store::without_password(&url);
    if summary.already_done {
        println!(
            "{} was migrated into {index_shown} already: nothing to do",
            source.display()
        );
    } else {
        println!(
            "migrated {} into {index_shown} and {blobs_shown}: {} rows, {} blobs copied ({} MiB, \
             each re-hashed), {} blobs already there",
            source.display(),
            summary.rows,
            summary.blobs_copied,
            summary.bytes_copied >> 20,
            summary.blobs_present
        );
        println!(
            "mount it on each machine with a store directory of its own: artifactfs mount --store \
             DIR --index {index_shown} --blobs {blobs_shown} MOUNTPOINT"
        );
    }
    Ok(())
}

/// Runs the command line; the process exit code comes back.
pub fn run(cli: Cli) -> Result<ExitCode> {
    if let Some(store) = cli.command.store_arg() {
        store.take_locations()?;
    }
    match cli.command {
        Cmd::Mount(args) if args.foreground => mount_foreground(&args).map(|_| ExitCode::SUCCESS),
        Cmd::Mount(args) => mount_detached(&args).map(|_| ExitCode::SUCCESS),
        Cmd::Unmount {
            mountpoint,
            lazy,
            wait,
        } => unmount(&mountpoint, lazy, wait),
        Cmd::Migrate {
            store,
            index,
            blobs,
        } => migrate(store, &index, &blobs).map(|_| ExitCode::SUCCESS),
        Cmd::Fsck { store, verify } => fsck(&store.dir(), verify),
        Cmd::Ls {
            store,
            path,
            history: true,
        } => ls_history(&store.dir(), &path).map(|_| ExitCode::SUCCESS),
        Cmd::Ls { store, path, .. } => ls(&store.dir(), &path).map(|_| ExitCode::SUCCESS),
        Cmd::Gc {
            store,
            older_than,
            dry_run,
        } => gc(&store.dir(), older_than, dry_run),
        Cmd::Models(cmd) => crate::cli_models::run(cmd),
    }
}

/// The default log filter when RUST_LOG is not set.
/// (fuser's own messages only from warnings on errors: with `RUST_LOG` set, all of them.)
pub fn default_log_filter(cli: &Cli) -> &'static str {
    match cli.command {
        Cmd::Mount(_) => "info,fuser=error",
        _ => "warn,fuser=error",
    }
}

/// When called as a mount helper (`mount.fuse.artifactfs STORE MOUNTPOINT [-o OPTS]`, the name
/// mount(8) and /etc/fstab use for type `fuse.artifactfs`), the equivalent `artifactfs mount`
/// command line; otherwise the arguments unchanged.
pub fn mount_helper_args(argv: Vec<std::ffi::OsString>) -> Result<Vec<std::ffi::OsString>, String> {
    let called_as = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !called_as.starts_with("mount.") {
        return Ok(argv);
    }
    let mut out: Vec<std::ffi::OsString> = vec!["artifactfs".into(), "mount".into()];
    let mut positional = Vec::new();
    let mut it = argv.into_iter().skip(1);
    while let Some(arg) = it.next() {
        match arg.to_str() {
            Some("-o") => {
                let opts = it.next().ok_or("-o needs options")?;
                for opt in opts.to_string_lossy().split(',').filter(|o| !o.is_empty()) {
                    let (key, value) = opt
                        .split_once('=')
                        .map_or((opt, None), |(k, v)| (k, Some(v)));
                    match (key, value) {
                        ("ro", None) => out.push("--read-only".into()),
                        ("allow_other", None) => out.push("--allow-other".into()),
                        ("no_passthrough", None) => out.push("--no-passthrough".into()),
                        ("sync_every_close", None) => out.push("--sync-every-close".into()),
                        ("upload_while_writing", None) => out.push("--upload-while-writing".into()),
                        (
                            "uid" | "gid" | "settle" | "threads" | "log_file" | "max_file_size"
                            | "cache_size" | "rewritable",
                            Some(v),
                        ) => {
                            out.push(format!("--{}", key.replace('_', "-")).into());
                            out.push(v.into());
                        }
                        // Options mount(8), fstab and systemd pass that need nothing from us.
                        (
                            "rw"
                            | "defaults"
                            | "auto"
                            | "noauto"
                            | "nofail"
                            | "_netdev"
                            | "user"
                            | "users"
                            | "nouser"
                            | "dev"
                            | "nodev"
                            | "suid"
                            | "nosuid"
                            | "exec"
                            | "noexec"
                            | "atime"
                            | "noatime"
                            | "relatime"
                            | "default_permissions",
                            None,
                        ) => {}
                        (k, _) if k.starts_with("x-") || k.starts_with("comment=") => {}
                        _ => return Err(format!("unknown mount option {opt:?}")),
                    }
                }
            }
            // -n (no mtab), -s (sloppy), -v (verbose): nothing to do.
            Some("-n" | "-s" | "-v") => {}
            Some("-f") => out.push("--foreground".into()),
            Some("-t") => {
                it.next();
            }
            _ => positional.push(arg),
        }
    }
    let [store, mountpoint] = <[_; 2]>::try_from(positional)
        .map_err(|_| "usage: mount.fuse.artifactfs STORE MOUNTPOINT [-o OPTIONS]".to_string())?;
    out.push("--store".into());
    out.push(store);
    out.push(mountpoint);
    Ok(out)
}

/// Refuses a mount point that cannot take the mount, and a system without a usable FUSE
/// device, each with the fix (before the store is opened or created).
fn check_mountpoint(mp: &Path) -> Result<()> {
    let at = mp.display();
    let meta = match std::fs::metadata(mp) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(anyhow::Error::new(e).context(format!(
                "mount point {at} does not exist: create it first (mkdir -p {at}); in a \
                 container, create it in the image or mount a volume there"
            )));
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(anyhow::Error::new(e).context(format!(
                "mount point {at} is a FUSE mount whose daemon is gone: unmount it first \
                 (artifactfs unmount {at}, or umount -l {at})"
            )));
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("mount point {at} is not usable")));
        }
    };
    if !meta.is_dir() {
        bail!("mount point {at} is not a directory");
    }
    if let Some(e) = mounts::mounted_at(mp).filter(|e| e.fstype.starts_with("fuse")) {
        // The kernel may answer `stat` of a dead mount's root from its cache; `statfs` always
        // asks the daemon.
        if let Err(e) = mounts::statfs(mp)
            && e.raw_os_error() == Some(libc::ENOTCONN)
        {
            return Err(anyhow::Error::new(e).context(format!(
                "mount point {at} is a FUSE mount whose daemon is gone: unmount it first \
                 (artifactfs unmount {at}, or umount -l {at})"
            )));
        }
        bail!(
            "{at} is already mounted ({} of {}): unmount it first (artifactfs unmount {at}), or \
             choose another mount point",
            e.fstype,
            e.source.display()
        );
    }
    if let Some(problem) = mounts::fuse_device_problem().or_else(mounts::privilege_problem) {
        bail!("cannot mount at {at}: {problem}");
    }
    Ok(())
}

/// Re-executes this program with `--foreground` in a new session and waits until it reports
/// that the mount is live (exit 0) or that it failed (exit non-zero with its reason).
fn mount_detached(args: &MountArgs) -> Result<()> {
    let store = args.store.dir();
    let mp = absolute(&args.mountpoint);
    check_mountpoint(&mp)?;
    store::create_store_dir(&store)?;
    let log_path = args
        .log_file
        .clone()
        .map(|p| absolute(&p))
        .unwrap_or_else(|| store.join("artifactfs.log"));
    // (Its lines name paths and hashes: the store's owner's only, like the store.)
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("cannot open log file {}", log_path.display()))?;
    // (One made before, by an earlier version or by hand, too, if it is this user's.)
    if log
        .metadata()
        .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == unsafe { libc::geteuid() })
    {
        let _ = log.set_permissions(std::fs::Permissions::from_mode(0o600));
    }

    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("mount")
        .arg("--foreground")
        .arg("--store")
        .arg(&store);
    for (flag, on) in [
        ("--read-only", args.read_only),
        ("--allow-other", args.allow_other),
    ] {
        if on {
            cmd.arg(flag);
        }
    }
    for (flag, v) in [("--uid", args.uid), ("--gid", args.gid)] {
        if let Some(v) = v {
            cmd.arg(flag).arg(v.to_string());
        }
    }
    if let Some(t) = args.threads {
        cmd.arg("--threads").arg(t.to_string());
    }
    // The index URL may hold a password: through the environment (readable by the same user
    // only), not the command line (which `ps` shows everyone).
    if let Some(index) = &args.store.index {
        cmd.env("ARTIFACTFS_INDEX", index);
    }
    if let Some(blobs) = &args.store.blobs {
        cmd.env("ARTIFACTFS_BLOBS", blobs);
    }
    cmd.arg("--settle").arg(args.settle.to_string());
    cmd.arg("--max-file-size")
        .arg(args.max_file_size.to_string());
    cmd.arg("--cache-size").arg(args.cache_size.to_string());
    for name in &args.rewritable {
        cmd.arg("--rewritable").arg(name);
    }
    if args.no_passthrough {
        cmd.arg("--no-passthrough");
    }
    if args.sync_every_close {
        cmd.arg("--sync-every-close");
    }
    if args.upload_while_writing {
        cmd.arg("--upload-while-writing");
    }
    cmd.arg(&mp)
        .env(READY_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our terminal session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the daemon")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut problems = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if line == "ready" {
            eprintln!(
                "artifactfs: mounted {} at {} (pid {}, log {})",
                store.display(),
                mp.display(),
                child.id(),
                log_path.display()
            );
            return Ok(());
        }
        problems.push(line);
    }
    let status = child.wait()?;
    let reason = if problems.is_empty() {
        format!("the daemon exited ({status}) before the mount was live")
    } else {
        problems.join("; ")
    };
    Err(anyhow!("{reason} (log: {})", log_path.display()))
}

fn mount_foreground(args: &MountArgs) -> Result<()> {
    let report = std::env::var_os(READY_ENV).is_some();
    let result = serve(args, report);
    if let Err(e) = &result
        && report
    {
        println!("{e:#}");
        let _ = std::io::stdout().flush();
    }
    result
}

fn serve(args: &MountArgs, report_ready: bool) -> Result<()> {
    let store_dir = args.store.dir();
    let mp = absolute(&args.mountpoint);
    check_mountpoint(&mp)?;
    store::set_cache_size(args.cache_size);
    store::set_upload_while_writing(args.upload_while_writing);
    let durability = if args.sync_every_close {
        store::Durability::EveryClose
    } else {
        store::Durability::Batched
    };
    let mut store = if args.read_only {
        Store::open_readonly(&store_dir).map(|mut s| {
            match s.keep_fetched() {
                Ok(true) => log::info!("read-only: what it fetches from the bucket is kept"),
                Ok(false) => {}
                // (A store directory this user cannot write: reads still work.)
                Err(e) => log::warn!("read-only: keeping nothing it fetches: {e}"),
            }
            s
        })
    } else {
        Store::open_writable_with(&store_dir, durability)
    }
    .with_context(|| format!("cannot open store {}", store_dir.display()))?;
    if !args.read_only {
        // Every request needs the index: none may wait long for another process's lock with
        // it held (requests that meet the lock are retried with it released).
        store.set_busy_timeout(store::DAEMON_BUSY_TIMEOUT)?;
    }

    // Block the stop signals before any thread exists, so only the signal thread sees them.
    let sigs = stop_signals();
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &sigs, std::ptr::null_mut()) };

    let opts = FsOptions {
        read_only: args.read_only,
        shared_store: store.is_shared(),
        uid: args.uid,
        gid: args.gid,
        settle: Duration::from_secs_f64(args.settle.max(0.0)),
        max_file_size: args.max_file_size,
        panic_on_lookup: std::env::var_os(FAULT_PANIC_ENV).map(|v| v.into_vec()),
        rewritable: rewritable_names(&args.rewritable),
    };
    // Panics are logged with a backtrace (the request or tick that panicked goes on: see
    // fuse::guarded), instead of only reaching a stderr nobody reads.
    std::panic::set_hook(Box::new(|info| {
        let bt = std::backtrace::Backtrace::force_capture();
        log::error!("panic: {info}\n{bt}");
    }));
    let fs = std::sync::Arc::new(ArtifactFs::new(store, opts));
    // Periodic work: batched syncs, and the registry validates models once they have been
    // quiet for the settle time.
    let ticker = (!args.read_only).then(|| Ticker::start(&fs)).transpose()?;
    let result = serve_session(args, report_ready, &fs, sigs, &store_dir, &mp);
    // The session is over: no request comes any more. The tick may be in the middle of its
    // work (a sync, a model's validation); it finishes, then nothing but this thread uses the
    // store, and the clean stop is recorded — whether an unmount or a signal ended the session
    // or the mount failed.
    if let Some(ticker) = ticker {
        ticker.stop();
    }
    let stopped = match &result {
        Ok(()) => fs.store().stop(),
        // A session that failed may have left request threads running (fuser returns at once
        // when one panicked): sync, and leave the clean stop to the store's drop, which runs
        // when this thread lets go of the last reference — only once they are all gone.
        Err(_) if !args.read_only => fs.store().sync(),
        Err(_) => Ok(()),
    };
    if let Err(e) = stopped {
        log::warn!("final sync of {} failed: {e}", store_dir.display());
    }
    result
}

/// The thread that calls [`ArtifactFs::tick`] every 200 ms until stopped.
struct Ticker {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Ticker {
    fn start(fs: &std::sync::Arc<ArtifactFs>) -> std::io::Result<Ticker> {
        let fs = fs.clone();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("registry".into())
            .spawn(move || {
                loop {
                    // A panic in one tick (logged with its backtrace by the hook) must not end
                    // syncs, checkpoints and settling for the rest of the mount's life.
                    let tick = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        fs.tick(std::time::Instant::now());
                    }));
                    if tick.is_err() {
                        log::error!("the periodic tick panicked; it runs again in 200 ms");
                    }
                    match stopped.recv_timeout(Duration::from_millis(200)) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                }
            })?;
        Ok(Ticker { stop, thread })
    }

    /// Waits for the tick under way, if any, to finish; no other starts.
    fn stop(self) {
        drop(self.stop);
        if self.thread.join().is_err() {
            log::warn!("the periodic work panicked");
        }
    }
}

/// Mounts and serves until the session ends (unmounted, by a signal or an error).
fn serve_session(
    args: &MountArgs,
    report_ready: bool,
    fs: &std::sync::Arc<ArtifactFs>,
    sigs: libc::sigset_t,
    store_dir: &Path,
    mp: &Path,
) -> Result<()> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(store_dir.display().to_string()),
        fuser::MountOption::Subtype("artifactfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        if args.read_only {
            fuser::MountOption::RO
        } else {
            fuser::MountOption::RW
        },
    ];
    if args.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    // The default is at least 4: an open() may briefly wait for a RELEASE that another thread
    // must serve. An explicit --threads N is taken as given (at least 1): with 1, an open of a
    // file whose RELEASE is still on its way waits the whole grace, then answers EBUSY.
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .max(4)
    });
    config.n_threads = Some(threads.max(1));
    config.clone_fd = true;

    let adapter = FuseAdapter::new(fs.clone(), !args.no_passthrough);
    let handed = adapter.handed();
    let mut session = fuser::Session::new(adapter, mp, &config)
        .map_err(|e| mounts::explain_mount_error(e, mp))?;
    crate::fuse::forward_vanished(fs, session.notifier(), handed)?;
    // On a shared store, other machines' changes reach the kernel's caches at once.
    if fs.watch_other_machines()? {
        log::info!("listening for the changes of other machines (PostgreSQL notifications)");
    }
    let unmounter = session.unmount_callable();
    let mp_for_signal = mp.to_path_buf();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || wait_for_stop(sigs, unmounter, &mp_for_signal))?;

    log::info!(
        "mounted store {} at {} ({} threads{})",
        store_dir.display(),
        mp.display(),
        threads,
        if args.read_only { ", read-only" } else { "" }
    );
    sd_notify("READY=1\nSTATUS=mounted");
    if report_ready {
        println!("ready");
        std::io::stdout().flush()?;
        // Nothing more goes to the parent; it has exited.
        let devnull = std::fs::File::open("/dev/null")?;
        unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&devnull), 1) };
    }
    // run() returns once its threads are done, the adapter dropped.
    let result = session.run().context("session ended with an error");
    log::info!("unmounted {}", mp.display());
    result
}

/// Tells systemd (`Type=notify`) about the service's state, when run by it.
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
    if let Err(e) = sent {
        log::warn!("cannot notify systemd: {e}");
    }
}

fn stop_signals() -> libc::sigset_t {
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

fn wait_for_stop(sigs: libc::sigset_t, mut unmounter: fuser::SessionUnmounter, mp: &Path) {
    let mut sig = 0;
    unsafe { libc::sigwait(&sigs, &mut sig) };
    log::info!("signal {sig} received: unmounting {}", mp.display());
    sd_notify("STOPPING=1");
    if let Err(e) = unmounter.unmount() {
        log::warn!("unmount failed ({e}); detaching lazily");
        let _ = umount(mp, libc::MNT_DETACH);
    }
}

fn umount(mp: &Path, flags: libc::c_int) -> std::io::Result<()> {
    let c = std::ffi::CString::new(mp.as_os_str().as_bytes())?;
    if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writable FUSE mounts as (store, mount point), from /proc/mounts. An artifactfs mount's
/// source is its store path; the pure-Rust mount records the type as plain `fuse`.
fn writable_fuse_mounts() -> Vec<(PathBuf, PathBuf)> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            (f.len() > 3 && f[2].starts_with("fuse") && f[3].split(',').any(|o| o == "rw")).then(
                || {
                    let path = |s: &str| PathBuf::from(OsStr::from_bytes(&mounts::unescape(s)));
                    (path(f[0]), path(f[1]))
                },
            )
        })
        .collect()
}

/// Where store `store` is mounted writable.
pub fn mount_of_store(store: &Path) -> Option<PathBuf> {
    writable_fuse_mounts()
        .into_iter()
        .find_map(|(s, mp)| (s == store).then_some(mp))
}

/// The store behind a writable artifactfs mount point (read-only mounts hold no store lock,
/// so there is nothing to wait for).
fn store_of_mount(mp: &Path) -> Option<PathBuf> {
    writable_fuse_mounts()
        .into_iter()
        .find_map(|(s, m)| (m == mp && s.join("lock").exists()).then_some(s))
}

/// How long `unmount` gives mounts found in other namespaces to go by themselves (a container
/// stopping at the same moment) before it reports them.
const OTHER_MOUNTS_GRACE: Duration = Duration::from_secs(1);

/// Exit status of `unmount` when the mount point is unmounted but the file system is still
/// mounted elsewhere (another mount namespace: a container's volume), so its daemon serves on.
const STILL_MOUNTED_ELSEWHERE: u8 = 2;

fn unmount(mountpoint: &Path, lazy: bool, wait: bool) -> Result<ExitCode> {
    let mp = absolute(mountpoint);
    let store = store_of_mount(&mp);
    // The file system's device number identifies its mounts in every namespace, with its
    // source (the store directory): once the daemon is gone, a new FUSE mount may get the
    // same device number.
    let dev = mounts::mounted_at(&mp)
        .filter(|e| e.fstype.starts_with("fuse"))
        .map(|e| (e.dev, e.source));
    umount(&mp, if lazy { libc::MNT_DETACH } else { 0 }).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => anyhow!(
            "{} is busy (files are open); close them or use --lazy",
            mp.display()
        ),
        Some(libc::EINVAL) => anyhow!("{} is not mounted", mp.display()),
        _ => anyhow!("cannot unmount {}: {e}", mp.display()),
    })?;
    if lazy && !wait {
        return Ok(ExitCode::SUCCESS);
    }
    wait_for_daemon(&mp, store.as_deref(), dev.as_ref(), wait)
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// After the unmount: waits until the daemon has finished (a writable daemon's store lock is
/// free; a read-only daemon is done once no mount of its file system is left). Mounts left in
/// other namespaces keep the daemon serving: without `wait` that is reported within about a
/// second (exit status 2); with it, progress is printed until they are gone.
fn wait_for_daemon(
    mp: &Path,
    store: Option<&Path>,
    dev: Option<&(String, PathBuf)>,
    wait: bool,
) -> Result<ExitCode> {
    let start = std::time::Instant::now();
    let holders = || {
        dev.map(|(dev, source)| mounts::fuse_mounts_of(dev, source))
            .unwrap_or_default()
    };
    let daemon = store
        .and_then(|s| std::fs::read_to_string(s.join("lock")).ok())
        .map(|pid| format!("its daemon (pid {})", pid.trim()))
        .unwrap_or_else(|| "its daemon".into());
    // (mounts left, when last reported)
    let mut reported: Option<(usize, std::time::Instant)> = None;
    let mut last_held = start;
    loop {
        let left = holders();
        let done = match store {
            Some(s) => store::wait_unlocked(s, Duration::ZERO),
            None => left.is_empty(),
        };
        if done {
            if reported.is_some() {
                eprintln!("artifactfs: no mount is left; the daemon has finished");
            }
            return Ok(ExitCode::SUCCESS);
        }
        let now = std::time::Instant::now();
        if !left.is_empty() {
            last_held = now;
            if !wait && now - start >= OTHER_MOUNTS_GRACE {
                eprintln!(
                    "artifactfs: unmounted {}, but the file system is still mounted in {} other \
                     place(s): {}. {} keeps serving them and exits when they are gone (the \
                     containers stop, or they are unmounted); nothing is lost meanwhile. \
                     `artifactfs unmount --wait` waits for that.",
                    mp.display(),
                    left.len(),
                    mounts::describe(&left),
                    capitalized(&daemon)
                );
                return Ok(ExitCode::from(STILL_MOUNTED_ELSEWHERE));
            }
            let due = match reported {
                None => now - start >= OTHER_MOUNTS_GRACE,
                Some((n, at)) => n != left.len() || now - at >= Duration::from_secs(10),
            };
            if wait && due {
                eprintln!(
                    "artifactfs: waiting: {} mount(s) left: {}; {daemon} serves them and exits \
                     when they are gone",
                    left.len(),
                    mounts::describe(&left)
                );
                reported = Some((left.len(), now));
            }
        } else {
            // No mount is left anywhere we can see: the daemon is finishing (its final sync),
            // or files are still open on a lazily detached mount.
            if !wait && now - last_held >= Duration::from_secs(30) {
                bail!(
                    "unmounted, but {daemon} of {} is still running after 30 s (files still \
                     open on a detached mount, or a mount namespace without processes that \
                     holds the file system?)",
                    store.map_or_else(|| mp.display().to_string(), |s| s.display().to_string())
                );
            }
            let due = now - last_held >= Duration::from_secs(2)
                && reported.is_none_or(|(n, at)| n != 0 || now - at >= Duration::from_secs(10));
            if due {
                eprintln!("artifactfs: waiting for {daemon} to finish");
                reported = Some((0, now));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The exit status of `gc` or `fsck` refused because another one runs on the shared store
/// (`EX_TEMPFAIL`: try again later).
pub const EXIT_MAINTENANCE_BUSY: u8 = 75;

/// On a shared store, takes the lock that lets one `gc` or `fsck` (`what`) at a time run from
/// any machine; `Some(exit status)` after saying, in one line, who holds it.
fn one_at_a_time(store: &Store, what: &str) -> Result<Option<ExitCode>> {
    match store.index().take_maintenance_lock(what)? {
        None => Ok(None),
        Some(holder) => {
            eprintln!(
                "artifactfs {what}: refused: {holder} is running on this shared store (one gc \
                 or fsck at a time, from any machine); try again once it has finished"
            );
            Ok(Some(ExitCode::from(EXIT_MAINTENANCE_BUSY)))
        }
    }
}

fn fsck(store_dir: &Path, verify: bool) -> Result<ExitCode> {
    // Shared with a running daemon: fsck only adds to the list of damaged blobs.
    let store = Store::open_shared(store_dir)
        .with_context(|| format!("cannot open store {}", store_dir.display()))?;
    if let Some(code) = one_at_a_time(&store, if verify { "fsck --verify" } else { "fsck" })? {
        return Ok(code);
    }
    let mut damaged = Vec::new();
    let rows = store.index().file_rows()?;
    let mut problems = store.index().integrity_problems()?;
    let mut by_hash: std::collections::BTreeMap<store::Hash, Vec<&store::index::FileRow>> =
        Default::default();
    for row in &rows {
        by_hash.entry(row.hash).or_default().push(row);
    }
    let mut bytes = 0u64;
    let mut inline = 0usize;
    let progress = verify && std::io::stderr().is_terminal();
    for (i, (hash, users)) in by_hash.iter().enumerate() {
        if progress && (i % 64 == 0 || i + 1 == by_hash.len()) {
            eprint!("\rfsck: {}/{} contents re-hashed", i + 1, by_hash.len());
        }
        let paths = || {
            users
                .iter()
                .map(|r| {
                    format!(
                        "/{}{}",
                        r.path.display(),
                        if r.state == State::Tombstone {
                            " (removed)"
                        } else {
                            ""
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let stored = store::content_size(&store.index(), &store.blobs, hash)?;
        match stored {
            None => {
                damaged.push(*hash);
                problems.push(format!("content {hash} is missing; used by {}", paths()))
            }
            Some((size, in_index)) => {
                bytes += size;
                inline += usize::from(in_index);
                if let Some(r) = users.iter().find(|r| r.size != size) {
                    damaged.push(*hash);
                    problems.push(format!(
                        "content {hash} has {size} bytes, the index says {} for /{}",
                        r.size,
                        r.path.display()
                    ));
                } else if verify {
                    let actual = store::rehash_content(&store.index(), &store.blobs, hash)?;
                    if actual != *hash {
                        damaged.push(*hash);
                        problems.push(format!(
                            "content {hash} is corrupt (its bytes hash to {actual}); used by {}",
                            paths()
                        ));
                    }
                }
            }
        }
    }
    if progress {
        eprintln!();
    }
    let live = rows.iter().filter(|r| r.state != State::Tombstone).count();
    println!(
        "{} files ({} live, {} removed), {} contents ({} blobs, {} in the index), {} bytes{}",
        rows.len(),
        live,
        rows.len() - live,
        by_hash.len(),
        by_hash.len() - inline,
        inline,
        bytes,
        if verify { ", all re-hashed" } else { "" }
    );
    for p in &problems {
        println!("problem: {p}");
    }
    if !damaged.is_empty() {
        let idx = store.index();
        for h in &damaged {
            idx.mark_damaged(h, store::now_ns())?;
        }
        println!(
            "{} content(s) marked damaged: opening the files that use them now fails with EIO \
             until the same content is written again",
            damaged.len()
        );
    }
    if problems.is_empty() {
        println!("ok");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} problem(s)", problems.len());
        Ok(ExitCode::FAILURE)
    }
}

/// `30d`, `12h`, `15m`, `90s` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30d, 12h, 15m, 90s"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("unknown unit in {s:?}: use s, m, h or d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

fn gc(store_dir: &Path, retention: Duration, dry_run: bool) -> Result<ExitCode> {
    let shared = store::Locations::for_store(store_dir, store::Locations::default())
        .is_ok_and(|l| !l.is_embedded());
    if std::fs::read_dir(store_dir).is_ok() && !shared && !store_dir.join("index.sqlite").exists() {
        bail!("no store at {}", store_dir.display());
    }
    // The index is shared with a running daemon (if any) through SQLite's own locking.
    let store = Store::open_shared(store_dir)
        .with_context(|| format!("cannot open store {}", store_dir.display()))?;
    if let Some(code) = one_at_a_time(&store, "gc")? {
        return Ok(code);
    }
    let r = store.gc(&store::gc::GcOptions { retention, dry_run })?;
    println!(
        "{} blobs: {} in use, {} kept for removed files younger than {:?}, {} {} ({} bytes); \
         {} transactions, the longest held the index for {} ms",
        r.blobs,
        r.in_use,
        r.retained,
        retention,
        if dry_run { "would remove" } else { "removed" },
        r.removed,
        r.bytes_freed,
        r.transactions,
        r.longest_hold.as_millis(),
    );
    Ok(ExitCode::SUCCESS)
}

fn mode_string(kind: Kind, mode: u32) -> String {
    let mut s = String::from(if kind == Kind::Dir { "d" } else { "-" });
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// `ls --history PATH`: each earlier content of a file (when it was written, when it was
/// replaced, its hash and size), then the current one.
fn ls_history(store_dir: &Path, path: &Path) -> Result<()> {
    let store = Store::open_readonly(store_dir)
        .with_context(|| format!("cannot open store {}", store_dir.display()))?;
    let idx = store.index();
    let entry = idx
        .resolve(path)?
        .filter(|e| e.kind == Kind::File)
        .ok_or_else(|| {
            anyhow!(
                "{}: no such file in {}",
                path.display(),
                store_dir.display()
            )
        })?;
    let time = |ns: i64| {
        let secs = ns.div_euclid(1_000_000_000);
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (y, m, d) = civil_from_days(days);
        format!(
            "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    };
    for (hash, size, mtime, replaced) in idx.history_of(entry.ino)? {
        println!(
            "{}  {}  {:>10}  replaced {}",
            time(mtime),
            hash.to_hex(),
            size,
            time(replaced)
        );
    }
    match entry.hash {
        Some(h) => println!(
            "{}  {}  {:>10}  current",
            time(entry.mtime),
            h.to_hex(),
            entry.size
        ),
        None => println!("{}  (being written)", time(entry.mtime)),
    }
    Ok(())
}

/// The (year, month, day) of a day count since 1970-01-01, in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn ls(store_dir: &Path, path: &Path) -> Result<()> {
    let store = Store::open_readonly(store_dir)
        .with_context(|| format!("cannot open store {}", store_dir.display()))?;
    let idx = store.index();
    let entry = idx.resolve(path)?.ok_or_else(|| {
        anyhow!(
            "{}: no such entry in {}",
            path.display(),
            store_dir.display()
        )
    })?;
    let line = |e: &store::index::Entry| {
        let hash = e
            .hash
            .map(|h| h.to_hex()[..16].to_string())
            .unwrap_or_else(|| "-".into());
        let name = String::from_utf8_lossy(&e.name).into_owned();
        let writing = if e.state == State::Writing || e.committed_open {
            " (being written)"
        } else {
            ""
        };
        println!(
            "{} {:>12} {:<16} {}{}{}",
            mode_string(e.kind, e.mode),
            e.size,
            hash,
            name,
            if e.kind == Kind::Dir { "/" } else { "" },
            writing
        );
    };
    if entry.kind == Kind::File {
        line(&entry);
        return Ok(());
    }
    let mut after = 0;
    loop {
        let batch = idx.children(entry.ino, after, 1000)?;
        let Some(last) = batch.last() else { break };
        after = last.ino;
        let mut batch = batch;
        batch.sort_by(|a, b| a.name.cmp(&b.name));
        batch.iter().for_each(line);
    }
    Ok(())
}
