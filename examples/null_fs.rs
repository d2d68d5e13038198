//! A FUSE file system that keeps names and sizes in memory and throws the bytes away: the
//! floor under any FUSE file system on this machine, for `scripts/bench.sh` (workload 3).
//!
//! ```text
//! cargo run --release --example null_fs -- MOUNTPOINT
//! ```
//!
//! It mounts with artifactfs's options and answers the requests `cp -r`, `find` and `cat` send
//! (lookup, getattr, mkdir, create, write, flush, release, opendir, readdir, open, read) the
//! way artifactfs does — same TTLs, direct I/O for files being written, negative entries
//! cached, listings and small sealed files kept in the kernel's caches, no FLUSH on close of a
//! file opened for reading — but does no work for them: no index, no hashing, no blob. What a
//! tool costs on it is what the kernel's round trips cost. Files read back as zeros of the size
//! written. It runs in the foreground until unmounted (`umount MOUNTPOINT`).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, WriteFlags,
};

const TTL: Duration = Duration::from_secs(3600);

struct Node {
    dir: bool,
    size: u64,
    perm: u16,
}

#[derive(Default)]
struct Tree {
    nodes: HashMap<u64, Node>,
    names: HashMap<(u64, OsString), u64>,
    /// Each directory's children in creation order, for readdir.
    children: HashMap<u64, Vec<(OsString, u64)>>,
    next: u64,
}

struct NullFs {
    tree: Mutex<Tree>,
    uid: u32,
    gid: u32,
}

impl NullFs {
    fn attr(&self, ino: u64, n: &Node) -> FileAttr {
        let now = SystemTime::now();
        FileAttr {
            ino: INodeNo(ino),
            size: n.size,
            blocks: n.size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: if n.dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: n.perm,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 128 * 1024,
            flags: 0,
        }
    }

    /// Adds `name` below `parent`; `None` if it exists.
    fn add(&self, parent: u64, name: &OsStr, dir: bool, perm: u16) -> Option<FileAttr> {
        let mut t = self.tree.lock().unwrap();
        let key = (parent, name.to_os_string());
        if t.names.contains_key(&key) {
            return None;
        }
        t.next += 1;
        let ino = t.next;
        let node = Node { dir, size: 0, perm };
        let attr = self.attr(ino, &node);
        t.nodes.insert(ino, node);
        t.names.insert(key, ino);
        t.children
            .entry(parent)
            .or_default()
            .push((name.to_os_string(), ino));
        Some(attr)
    }
}

impl Filesystem for NullFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let t = self.tree.lock().unwrap();
        match t.names.get(&(parent.0, name.to_os_string())) {
            Some(ino) => reply.entry(&TTL, &self.attr(*ino, &t.nodes[ino]), Generation(0)),
            None => {
                // A negative entry, as artifactfs gives below runs/.
                let mut attr = self.attr(0, &t.nodes[&1]);
                attr.ino = INodeNo(0);
                reply.entry(&TTL, &attr, Generation(0))
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let t = self.tree.lock().unwrap();
        match t.nodes.get(&ino.0) {
            Some(n) => reply.attr(&TTL, &self.attr(ino.0, n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self.add(parent.0, name, true, (mode & !umask & 0o7777) as u16) {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::EEXIST),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.add(parent.0, name, false, (mode & !umask & 0o7777) as u16) {
            Some(attr) => reply.created(
                &Duration::from_secs(1),
                &attr,
                Generation(0),
                FileHandle(attr.ino.0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            None => reply.error(Errno::EEXIST),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut t = self.tree.lock().unwrap();
        if let Some(n) = t.nodes.get_mut(&ino.0) {
            n.size = n.size.max(offset + data.len() as u64);
        }
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let t = self.tree.lock().unwrap();
        let mut all = vec![
            (OsString::from("."), ino.0, true),
            (OsString::from(".."), 1, true),
        ];
        for (name, child) in t.children.get(&ino.0).into_iter().flatten() {
            all.push((name.clone(), *child, t.nodes[child].dir));
        }
        for (i, (name, child, dir)) in all.into_iter().enumerate().skip(offset as usize) {
            let kind = if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // As artifactfs opens a small sealed file.
        reply.opened(
            FileHandle(ino.0),
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let len = self
            .tree
            .lock()
            .unwrap()
            .nodes
            .get(&ino.0)
            .map_or(0, |n| n.size);
        let n = len.saturating_sub(offset).min(u64::from(size));
        reply.data(&vec![0u8; n as usize]);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mountpoint] = args.as_slice() else {
        bail!("usage: null_fs MOUNTPOINT");
    };
    let mut tree = Tree::default();
    tree.nodes.insert(
        1,
        Node {
            dir: true,
            size: 0,
            perm: 0o755,
        },
    );
    tree.next = 1;
    let fs = NullFs {
        tree: Mutex::new(tree),
        uid: unsafe { libc::geteuid() },
        gid: unsafe { libc::getegid() },
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("null_fs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::RW,
    ];
    config.n_threads = Some(
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .max(4),
    );
    config.clone_fd = true;
    let session = fuser::Session::new(fs, std::path::Path::new(mountpoint), &config)
        .with_context(|| format!("cannot mount at {mountpoint}"))?;
    session.run().context("session ended with an error")?;
    Ok(())
}
