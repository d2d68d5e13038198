//! Reference-model property test of the file-system logic (no kernel).
//!
//! Random, seeded sequences of operations (create, write, close = flush + release, open, read,
//! rename, unlink, mkdir, rmdir, chmod, truncate, ...) run against `artifactfs::fs::ArtifactFs`
//! on a fresh temp store, and against `Model`, a small in-memory model of the semantics the
//! README documents: write-once files, tombstones on unlink/rename below `runs/`, `EEXIST` on
//! tombstoned paths, `EBUSY` opening or truncating (by path) a file being written, `EPERM`
//! writing or truncating a sealed file, `ENOTEMPTY`, `EPERM` renaming directories, `mkdir` of a removed directory reviving it,
//! the namespace rules of `/` and `runs/`.
//!
//! Every operation's result (value, or refusal kind by name) must agree, and after every
//! operation the whole visible tree (names, kinds, sizes, modes, sealed or not) must agree.
//! On a mismatch the test prints the seed, the operations so far with their results, both
//! results, and a shrunk sequence that still fails.
//!
//! Knobs (environment): `MODEL_CHECK_SEQS` (default 300), `MODEL_CHECK_OPS` (default 60),
//! `MODEL_CHECK_SEED` (run only this seed), `MODEL_CHECK_THREADS` (default 8),
//! `MODEL_CHECK_README_LITERAL=1` (see below).
//!
//! Choices where the README is silent (recorded here, modelled as the code does):
//! - A file removed or renamed away *before its first commit* (no `close()`/`fsync` yet) leaves
//!   no tombstone: the path never held content (the code's unit test
//!   `a_file_removed_before_its_first_commit_leaves_no_trace`). The README's unlink/rename rows
//!   do not mention this exception; `MODEL_CHECK_README_LITERAL=1` models them literally
//!   (every removal leaves a tombstone) and then the code disagrees, e.g.
//!   `create f; unlink f; mkdir f` succeeds where the literal reading says `EEXIST`.
//! - Creating a file (or renaming one) onto the path of a removed directory is `EEXIST`.
//! - Error precedence: path resolution, then "where may this be" (namespace), then "is the
//!   name taken".

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use artifactfs::error::FsError;
use artifactfs::fs::{ArtifactFs, Attr, Caller, FsOptions, NodeKind, SetAttr, SetTime};
use artifactfs::store::Store;
use artifactfs::store::index::{MODELS_INO, ROOT_INO, RUNS_INO};
use sha2::Digest;

const ME: Caller = Caller {
    uid: 1000,
    gid: 1000,
    pid: 0,
};

// ----- deterministic randomness ----------------------------------------------------------------

/// xorshift64*: small, deterministic, no crates.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut r = Rng((seed ^ 0x2545_F491_4F6C_DD1D).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        for _ in 0..4 {
            r.next();
        }
        r
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        (self.next() >> 11) % n.max(1)
    }

    /// True with probability `num/den`.
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

// ----- operations --------------------------------------------------------------------------------

type Name = Vec<u8>;
/// A path as components below the mount's root (empty = the root).
type P = Vec<Name>;

fn p(s: &str) -> P {
    s.split('/')
        .filter(|c| !c.is_empty())
        .map(|c| c.as_bytes().to_vec())
        .collect()
}

fn show_name(n: &[u8]) -> String {
    if n.len() > 40 {
        format!("<{} x {:?}>", n.len(), n[0] as char)
    } else {
        n.escape_ascii().to_string()
    }
}

fn show(path: &P) -> String {
    let mut s = String::from("/");
    s.push_str(
        &path
            .iter()
            .map(|c| show_name(c))
            .collect::<Vec<_>>()
            .join("/"),
    );
    s
}

fn split(path: &P) -> (P, Name) {
    let mut parent = path.clone();
    let name = parent.pop().expect("an operation on the root's parent");
    (parent, name)
}

/// One operation. Handles are named by ordinal: the n-th handle this sequence opened.
#[derive(Clone, Debug)]
enum Op {
    Create {
        path: P,
        mode: u32,
    },
    Mknod {
        path: P,
        fifo: bool,
    },
    Open {
        path: P,
        flags: i32,
    },
    Write {
        h: usize,
        off: u64,
        data: Vec<u8>,
    },
    Read {
        h: usize,
        off: u64,
        len: u32,
    },
    /// `close()` of a duplicate descriptor: FLUSH without RELEASE.
    Flush {
        h: usize,
    },
    Fsync {
        h: usize,
    },
    /// The last `close()`: FLUSH then RELEASE.
    Close {
        h: usize,
    },
    Truncate {
        path: P,
        size: u64,
    },
    Chmod {
        path: P,
        mode: u32,
    },
    /// `chown`: a new uid and/or gid.
    Chown {
        path: P,
        uid: Option<u32>,
        gid: Option<u32>,
    },
    /// `utimens` of the mtime: `None` = now.
    Utimens {
        path: P,
        secs: Option<u64>,
    },
    Setxattr {
        path: P,
    },
    Symlink {
        path: P,
    },
    /// A hard link of `from` at `to`.
    Link {
        from: P,
        to: P,
    },
    Unlink {
        path: P,
    },
    Rename {
        from: P,
        to: P,
        exchange: bool,
    },
    Mkdir {
        path: P,
        mode: u32,
    },
    Rmdir {
        path: P,
    },
    Stat {
        path: P,
    },
    Getxattr {
        path: P,
    },
    Readdir {
        path: P,
    },
}

fn flags_name(f: i32) -> &'static str {
    match f {
        libc::O_RDONLY => "O_RDONLY",
        libc::O_WRONLY => "O_WRONLY",
        libc::O_RDWR => "O_RDWR",
        x if x == libc::O_RDONLY | libc::O_TRUNC => "O_RDONLY|O_TRUNC",
        x if x == libc::O_WRONLY | libc::O_APPEND => "O_WRONLY|O_APPEND",
        x if x == libc::O_WRONLY | libc::O_TRUNC => "O_WRONLY|O_TRUNC",
        _ => "?",
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Create { path, mode } => write!(f, "create {} {mode:#o}", show(path)),
            Op::Mknod { path, fifo } => {
                let k = if *fifo { "S_IFIFO" } else { "S_IFREG" };
                write!(f, "mknod {} {k}", show(path))
            }
            Op::Open { path, flags } => write!(f, "open {} {}", show(path), flags_name(*flags)),
            Op::Write { h, off, data } => {
                write!(f, "write h{h} @{off} {:?}", data.escape_ascii().to_string())
            }
            Op::Read { h, off, len } => write!(f, "read h{h} @{off} len {len}"),
            Op::Flush { h } => write!(f, "flush h{h} (close of a dup)"),
            Op::Fsync { h } => write!(f, "fsync h{h}"),
            Op::Close { h } => write!(f, "close h{h} (flush + release)"),
            Op::Truncate { path, size } => write!(f, "truncate {} {size}", show(path)),
            Op::Chmod { path, mode } => write!(f, "chmod {} {mode:#o}", show(path)),
            Op::Chown { path, uid, gid } => write!(f, "chown {} {uid:?}:{gid:?}", show(path)),
            Op::Utimens { path, secs } => match secs {
                Some(t) => write!(f, "utimens {} mtime={t}s", show(path)),
                None => write!(f, "utimens {} mtime=now", show(path)),
            },
            Op::Setxattr { path } => write!(f, "setxattr {} user.x", show(path)),
            Op::Symlink { path } => write!(f, "symlink {} -> target", show(path)),
            Op::Link { from, to } => write!(f, "link {} -> {}", show(from), show(to)),
            Op::Unlink { path } => write!(f, "unlink {}", show(path)),
            Op::Rename { from, to, exchange } => write!(
                f,
                "rename {} -> {}{}",
                show(from),
                show(to),
                if *exchange { " RENAME_EXCHANGE" } else { "" }
            ),
            Op::Mkdir { path, mode } => write!(f, "mkdir {} {mode:#o}", show(path)),
            Op::Rmdir { path } => write!(f, "rmdir {}", show(path)),
            Op::Stat { path } => write!(f, "stat {}", show(path)),
            Op::Getxattr { path } => write!(f, "getxattr {} user.artifactfs.sha256", show(path)),
            Op::Readdir { path } => write!(f, "readdir {}", show(path)),
        }
    }
}

// ----- results ---------------------------------------------------------------------------------

/// The attributes both sides are compared on. Owner and mode of the fixed directories
/// (`/`, `runs`, `models`) are the store's, not the model's business: `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct A {
    dir: bool,
    size: u64,
    perm: Option<u16>,
    owner: Option<(u32, u32)>,
    /// Compared only where the model knows it (set by `utimens` to a given time).
    mtime: Option<SystemTime>,
    sealed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Out {
    Unit,
    /// A new handle (its ordinal).
    Handle(usize),
    Len(u32),
    Attr(A),
    Data(Vec<u8>),
    Entries(Vec<(Name, A)>),
    /// The operation names a handle that does not exist (after shrinking): not run.
    Skipped,
    /// A refusal, by kind name (`Exists`, `NotPermitted`, ...), or `Io(...)`.
    Err(String),
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Out::Data(d) => write!(f, "Data({:?})", d.escape_ascii().to_string()),
            Out::Err(e) => write!(f, "Err({e})"),
            Out::Entries(es) => {
                let names: Vec<String> = es.iter().map(|(n, _)| show_name(n)).collect();
                write!(f, "Entries({})", names.join(", "))
            }
            other => write!(f, "{other:?}"),
        }
    }
}

fn err(kind: &str) -> Out {
    Out::Err(kind.to_string())
}

/// Maps the real error to a name: `FsError::Refused(kind)` -> the kind's name.
fn real_err(e: FsError) -> Out {
    match e {
        FsError::Refused(k) => Out::Err(format!("{k:?}")),
        FsError::Io(e) => Out::Err(format!("Io({e})")),
    }
}

// ----- the model ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Root,
    Runs,
    Models,
    RunRoot,
    RunTree,
}

#[derive(Clone, Debug, PartialEq)]
enum Slot {
    Live(usize),
    /// The path held a file (removed or renamed away): taken for ever, but for its last
    /// committed content, which may be created there again.
    FileTomb(Vec<u8>, Option<usize>),
    /// A removed directory; `mkdir` revives this very node (tombstones inside still apply).
    DirTomb(usize),
}

#[derive(Clone, Debug)]
struct Node {
    dir: bool,
    fixed: bool,
    /// For directories: what may be created inside.
    place: Place,
    perm: u16,
    owner: (u32, u32),
    /// Known only after `utimens` to a given time; writes make it "now" (unknown) again.
    mtime: Option<SystemTime>,
    content: Vec<u8>,
    /// Content was committed (flush/fsync/release) while the file was at a path.
    committed: bool,
    /// What was committed last (a tombstone keeps it).
    committed_content: Vec<u8>,
    /// Created again at a tombstone: must end up with this content.
    expect: Option<Vec<u8>>,
    /// A write handle is open on it (from `create`).
    writing: bool,
    /// Still reachable by a path (not unlinked).
    attached: bool,
    children: BTreeMap<Name, Slot>,
}

#[derive(Clone, Debug)]
struct MHandle {
    node: usize,
    write: bool,
    /// What a read handle sees (the sealed content at open).
    snapshot: Vec<u8>,
    /// A sealed file opened for writing: writes must repeat its bytes.
    rewrite: Option<Rewrite>,
}

#[derive(Clone, Debug, Default)]
struct Rewrite {
    truncated: bool,
    append: bool,
    /// Bytes written again, merged.
    covered: Vec<(usize, usize)>,
}

impl Rewrite {
    fn cover(&mut self, start: usize, end: usize) {
        self.covered.push((start, end));
        self.covered.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::new();
        for &(s, e) in &self.covered {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.covered = merged;
    }

    fn complete(&self, len: usize) -> bool {
        !self.truncated || len == 0 || self.covered.first() == Some(&(0, len))
    }
}

struct Model {
    nodes: Vec<Node>,
    handles: Vec<Option<MHandle>>,
    /// Rules the model applied (for the coverage line): e.g. "create on a tombstone".
    events: Vec<&'static str>,
}

const NAME_MAX: usize = 255;

/// Any name: 1-255 bytes, no '/' or NUL, not '.' or '..'.
fn check_name(name: &[u8]) -> Result<(), &'static str> {
    if name.len() > NAME_MAX {
        return Err("NameTooLong");
    }
    if name.is_empty() || name == b"." || name == b".." || name.iter().any(|&b| b == b'/' || b == 0)
    {
        return Err("Invalid");
    }
    Ok(())
}

/// A run id: a name without control characters.
fn check_run_id(name: &[u8]) -> Result<(), &'static str> {
    check_name(name)?;
    if name.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err("Invalid");
    }
    Ok(())
}

impl Model {
    fn new() -> Model {
        let dir = |place, fixed| Node {
            dir: true,
            fixed,
            place,
            perm: 0o755,
            owner: (ME.uid, ME.gid),
            mtime: None,
            content: Vec::new(),
            committed: true,
            committed_content: Vec::new(),
            expect: None,
            writing: false,
            attached: true,
            children: BTreeMap::new(),
        };
        let mut root = dir(Place::Root, true);
        root.children.insert(b"runs".to_vec(), Slot::Live(1));
        root.children.insert(b"models".to_vec(), Slot::Live(2));
        Model {
            nodes: vec![root, dir(Place::Runs, true), dir(Place::Models, true)],
            handles: Vec::new(),
            events: Vec::new(),
        }
    }

    fn attr(&self, id: usize) -> A {
        let n = &self.nodes[id];
        A {
            dir: n.dir,
            size: if n.dir { 4096 } else { n.content.len() as u64 },
            perm: (!n.fixed).then_some(n.perm),
            owner: (!n.fixed).then_some(n.owner),
            mtime: n.mtime,
            sealed: !n.dir && !n.writing,
        }
    }

    fn new_node(&mut self, n: Node) -> usize {
        self.nodes.push(n);
        self.nodes.len() - 1
    }

    fn new_dir(&mut self, place: Place, perm: u16) -> usize {
        self.new_node(Node {
            dir: true,
            fixed: false,
            place,
            perm,
            owner: (ME.uid, ME.gid),
            mtime: None,
            content: Vec::new(),
            committed: true,
            committed_content: Vec::new(),
            expect: None,
            writing: false,
            attached: true,
            children: BTreeMap::new(),
        })
    }

    /// The node at `path`, resolved one component at a time like the kernel's lookups.
    fn resolve(&self, path: &P) -> Result<usize, &'static str> {
        let mut cur = 0;
        for c in path {
            if c.len() > NAME_MAX {
                return Err("NameTooLong");
            }
            if !self.nodes[cur].dir {
                return Err("NotDir");
            }
            match self.nodes[cur].children.get(c) {
                Some(Slot::Live(id)) => cur = *id,
                _ => return Err("NotFound"),
            }
        }
        Ok(cur)
    }

    /// The directory that holds `path`'s last component.
    fn parent_dir(&self, path: &P) -> Result<(usize, Name), &'static str> {
        let (parent, name) = split(path);
        let id = self.resolve(&parent)?;
        if !self.nodes[id].dir {
            return Err("NotDir");
        }
        Ok((id, name))
    }

    fn visible_children(&self, dir: usize) -> Vec<(Name, usize)> {
        self.nodes[dir]
            .children
            .iter()
            .filter_map(|(n, s)| match s {
                Slot::Live(id) => Some((n.clone(), *id)),
                _ => None,
            })
            .collect()
    }

    fn commit(&mut self, node: usize) {
        if self.nodes[node].attached {
            self.nodes[node].committed = true;
            self.nodes[node].committed_content = self.nodes[node].content.clone();
        }
    }

    /// A commit of a file created again at a tombstone happens only with its last content
    /// (which it must keep until its release: the expectation goes only then).
    fn commit_checked(&mut self, node: usize) -> Result<(), &'static str> {
        if let Some(x) = &self.nodes[node].expect
            && *x != self.nodes[node].content
        {
            return Err("NotPermitted");
        }
        self.commit(node);
        Ok(())
    }

    /// Where node `id` is attached: (directory, name).
    fn location(&self, id: usize) -> Option<(usize, Name)> {
        self.nodes.iter().enumerate().find_map(|(d, n)| {
            n.children.iter().find_map(|(name, s)| {
                matches!(s, Slot::Live(x) if *x == id).then(|| (d, name.clone()))
            })
        })
    }

    fn handle(&self, h: usize) -> Option<MHandle> {
        self.handles.get(h).cloned().flatten()
    }

    fn apply(&mut self, op: &Op) -> Out {
        // A directory whose names changed (created, removed, renamed, revived) has a new mtime
        // and ctime: "now", which the model does not know.
        let before: Vec<Option<BTreeMap<Name, Slot>>> = self
            .nodes
            .iter()
            .map(|n| n.dir.then(|| n.children.clone()))
            .collect();
        let out = match self.apply_inner(op) {
            Ok(out) => out,
            Err(kind) => err(kind),
        };
        for (i, children) in before.into_iter().enumerate() {
            if let Some(children) = children
                && children != self.nodes[i].children
            {
                self.nodes[i].mtime = None;
            }
        }
        out
    }

    fn apply_inner(&mut self, op: &Op) -> Result<Out, &'static str> {
        match op {
            Op::Create { path, mode } => {
                let id = self.create(path, *mode)?;
                self.handles.push(Some(MHandle {
                    node: id,
                    write: true,
                    snapshot: Vec::new(),
                    rewrite: None,
                }));
                Ok(Out::Handle(self.handles.len() - 1))
            }
            Op::Mknod { path, fifo } => {
                let (_, _) = self.parent_dir_for_mknod(path)?;
                if *fifo {
                    return Err("NotPermitted");
                }
                let id = self.create(path, 0o644)?;
                // create + release: committed (empty) and sealed; at a tombstone only if its
                // last content was empty too.
                self.nodes[id].writing = false;
                if self.commit_checked(id).is_err() {
                    let x = self.nodes[id].expect.take().unwrap();
                    if let Some((dir, name)) = self.location(id) {
                        self.nodes[dir]
                            .children
                            .insert(name, Slot::FileTomb(x, None));
                    }
                    self.nodes[id].attached = false;
                    return Err("NotPermitted");
                }
                self.nodes[id].expect = None;
                Ok(Out::Attr(self.attr(id)))
            }
            Op::Open { path, flags } => {
                let id = self.resolve(path)?;
                let n = &self.nodes[id];
                if n.dir {
                    return Err("IsDir");
                }
                if n.writing {
                    return Err("Busy");
                }
                let writes = (flags & libc::O_ACCMODE) != libc::O_RDONLY
                    || flags & (libc::O_TRUNC | libc::O_APPEND) != 0;
                let rewrite = writes.then(|| {
                    self.events.push("rewrite");
                    Rewrite {
                        truncated: flags & libc::O_TRUNC != 0,
                        append: flags & libc::O_APPEND != 0,
                        covered: Vec::new(),
                    }
                });
                let snapshot = self.nodes[id].content.clone();
                self.handles.push(Some(MHandle {
                    node: id,
                    write: false,
                    snapshot,
                    rewrite,
                }));
                Ok(Out::Handle(self.handles.len() - 1))
            }
            Op::Write { h, off, data } => {
                let Some(hd) = self.handle(*h) else {
                    return Ok(Out::Skipped);
                };
                if let Some(mut rw) = hd.rewrite {
                    if data.is_empty() {
                        return Ok(Out::Len(0));
                    }
                    let c = &hd.snapshot;
                    let (start, end) = (*off as usize, *off as usize + data.len());
                    if rw.append || end > c.len() || c[start..end] != data[..] {
                        self.events.push("rewrite-differs");
                        return Err("NotPermitted");
                    }
                    rw.cover(start, end);
                    self.handles[*h].as_mut().unwrap().rewrite = Some(rw);
                    return Ok(Out::Len(data.len() as u32));
                }
                if !hd.write {
                    return Err("BadHandle");
                }
                if let Some(x) = &self.nodes[hd.node].expect {
                    let end = *off as usize + data.len();
                    if end > x.len() || x[*off as usize..end] != data[..] {
                        self.events.push("recreate-differs");
                        return Err("NotPermitted");
                    }
                }
                self.nodes[hd.node].mtime = None;
                let c = &mut self.nodes[hd.node].content;
                let end = *off as usize + data.len();
                if c.len() < end {
                    c.resize(end, 0);
                }
                c[*off as usize..end].copy_from_slice(data);
                Ok(Out::Len(data.len() as u32))
            }
            Op::Read { h, off, len } => {
                let Some(hd) = self.handle(*h) else {
                    return Ok(Out::Skipped);
                };
                let src = if hd.write {
                    &self.nodes[hd.node].content
                } else {
                    &hd.snapshot
                };
                let start = (*off as usize).min(src.len());
                let end = (start + *len as usize).min(src.len());
                Ok(Out::Data(src[start..end].to_vec()))
            }
            Op::Flush { h } | Op::Fsync { h } => {
                let Some(hd) = self.handle(*h) else {
                    return Ok(Out::Skipped);
                };
                if let Some(rw) = &hd.rewrite {
                    return if rw.complete(hd.snapshot.len()) {
                        Ok(Out::Unit)
                    } else {
                        Err("NotPermitted")
                    };
                }
                if hd.write {
                    self.commit_checked(hd.node)?;
                }
                Ok(Out::Unit)
            }
            Op::Close { h } => {
                let Some(hd) = self.handle(*h) else {
                    return Ok(Out::Skipped);
                };
                self.handles[*h] = None;
                if let Some(rw) = &hd.rewrite {
                    return if rw.complete(hd.snapshot.len()) {
                        Ok(Out::Unit)
                    } else {
                        Err("NotPermitted")
                    };
                }
                if hd.write {
                    self.nodes[hd.node].writing = false;
                    let committed = self.commit_checked(hd.node);
                    if committed.is_err() {
                        // Never with its last content: the path is a tombstone again.
                        let x = self.nodes[hd.node].expect.take().unwrap();
                        if let Some((dir, name)) = self.location(hd.node) {
                            self.nodes[dir]
                                .children
                                .insert(name, Slot::FileTomb(x, None));
                        }
                        self.nodes[hd.node].attached = false;
                        return Err("NotPermitted");
                    }
                    self.nodes[hd.node].expect = None;
                }
                Ok(Out::Unit)
            }
            Op::Truncate { path, size } => {
                let id = self.resolve(path)?;
                let n = &mut self.nodes[id];
                if n.fixed {
                    return Err("NotPermitted");
                }
                if n.dir {
                    return Err("IsDir");
                }
                if n.writing {
                    // truncate(path): only the writer's own descriptor may change the size.
                    return Err("Busy");
                } else if *size != n.content.len() as u64 {
                    return Err("NotPermitted");
                }
                Ok(Out::Attr(self.attr(id)))
            }
            Op::Chmod { path, mode } => {
                let id = self.resolve(path)?;
                if self.nodes[id].fixed {
                    return Err("NotPermitted");
                }
                self.nodes[id].perm = (*mode & 0o7777) as u16;
                Ok(Out::Attr(self.attr(id)))
            }
            Op::Chown { path, uid, gid } => {
                let id = self.resolve(path)?;
                let n = &mut self.nodes[id];
                if n.fixed {
                    return Err("NotPermitted");
                }
                n.owner = (uid.unwrap_or(n.owner.0), gid.unwrap_or(n.owner.1));
                Ok(Out::Attr(self.attr(id)))
            }
            Op::Utimens { path, secs } => {
                let id = self.resolve(path)?;
                let n = &mut self.nodes[id];
                if n.fixed {
                    return Err("NotPermitted");
                }
                n.mtime = secs.map(|t| UNIX_EPOCH + Duration::from_secs(t));
                Ok(Out::Attr(self.attr(id)))
            }
            Op::Setxattr { path } => {
                self.resolve(path)?;
                Err("NotSupported")
            }
            Op::Symlink { path } => {
                self.parent_dir(path)?;
                Err("NotPermitted")
            }
            Op::Link { from, to } => {
                self.resolve(from)?;
                self.resolve(&split(to).0)?;
                Err("NotPermitted")
            }
            Op::Unlink { path } => {
                let (dir, name) = self.parent_dir(path)?;
                let Some(Slot::Live(id)) = self.nodes[dir].children.get(&name).cloned() else {
                    return Err("NotFound");
                };
                if self.nodes[id].dir {
                    return Err("IsDir");
                }
                if matches!(
                    self.nodes[dir].place,
                    Place::Root | Place::Runs | Place::Models
                ) {
                    return Err("NotPermitted");
                }
                self.detach_file(dir, &name, id, true);
                Ok(Out::Unit)
            }
            Op::Rename { from, to, exchange } => {
                let (sdir, sname) = split(from);
                let (ddir, dname) = split(to);
                let sdir = self.resolve(&sdir)?;
                let ddir = self.resolve(&ddir)?;
                if *exchange {
                    return Err("Invalid");
                }
                if !self.nodes[sdir].dir || !self.nodes[ddir].dir {
                    return Err("NotDir");
                }
                let Some(Slot::Live(id)) = self.nodes[sdir].children.get(&sname).cloned() else {
                    return Err("NotFound");
                };
                if sdir == ddir && sname == dname {
                    return Ok(Out::Unit);
                }
                if self.nodes[id].expect.is_some() && !self.nodes[id].committed {
                    // Created again at a tombstone, without its last content yet: its row is
                    // the tombstone's, which stays where it is.
                    self.events.push("rename-of-a-re-create");
                    return Err("Busy");
                }
                if self.nodes[id].dir {
                    return Err("NotPermitted");
                }
                match self.nodes[ddir].place {
                    Place::Root | Place::Runs | Place::Models => return Err("NotPermitted"),
                    _ => check_name(&dname)?,
                }
                match self.nodes[ddir].children.get(&dname).cloned() {
                    Some(Slot::FileTomb(..)) => {
                        self.events.push("rename-onto-tombstone");
                        return Err("Exists");
                    }
                    Some(Slot::Live(dst)) => {
                        let (a, b) = (&self.nodes[id], &self.nodes[dst]);
                        let sealed = |n: &Node| !n.dir && !n.writing && n.committed;
                        if sealed(a) && sealed(b) && a.content == b.content {
                            // As POSIX: the target name now names the source's file; the
                            // path's content is what it was.
                            self.events.push("rename-onto-identical");
                            self.detach_file(sdir, &sname, id, false);
                            self.nodes[dst].attached = false;
                            self.nodes[id].attached = true;
                            self.nodes[ddir].children.insert(dname, Slot::Live(id));
                            return Ok(Out::Unit);
                        }
                        return Err("Exists");
                    }
                    Some(_) => return Err("Exists"),
                    None => {}
                }
                if self.nodes[id].writing {
                    self.events.push("rename-while-writing");
                }
                self.detach_file(sdir, &sname, id, false);
                self.nodes[id].attached = true;
                self.nodes[ddir].children.insert(dname, Slot::Live(id));
                Ok(Out::Unit)
            }
            Op::Mkdir { path, mode } => {
                let (dir, name) = self.parent_dir(path)?;
                let place = match self.nodes[dir].place {
                    Place::Root | Place::Models => return Err("NotPermitted"),
                    Place::Runs => {
                        check_run_id(&name)?;
                        Place::RunRoot
                    }
                    Place::RunRoot | Place::RunTree => {
                        check_name(&name)?;
                        Place::RunTree
                    }
                };
                let perm = (*mode & 0o7777) as u16;
                let id = self.make_dir(dir, &name, place, perm)?;
                if place == Place::RunRoot {
                    // Every run has artifacts/ (made or revived with it).
                    let _ = self.make_dir(id, b"artifacts", Place::RunTree, 0o755);
                }
                Ok(Out::Attr(self.attr(id)))
            }
            Op::Rmdir { path } => {
                let (dir, name) = self.parent_dir(path)?;
                let Some(Slot::Live(id)) = self.nodes[dir].children.get(&name).cloned() else {
                    return Err("NotFound");
                };
                if !self.nodes[id].dir {
                    return Err("NotDir");
                }
                let place = self.nodes[dir].place;
                if place == Place::Root || (place == Place::RunRoot && name == b"artifacts") {
                    return Err("NotPermitted");
                }
                let kids = self.visible_children(id);
                let mut also = None;
                let empty = match kids.as_slice() {
                    [] => true,
                    // A run whose only entry is an empty artifacts/ counts as empty.
                    [(n, a)] if place == Place::Runs && n == b"artifacts" && self.nodes[*a].dir => {
                        also = Some(*a);
                        self.visible_children(*a).is_empty()
                    }
                    _ => false,
                };
                if !empty {
                    return Err("NotEmpty");
                }
                if let Some(a) = also {
                    self.events.push("rmdir-run");
                    self.nodes[id]
                        .children
                        .insert(b"artifacts".to_vec(), Slot::DirTomb(a));
                }
                self.nodes[dir].children.insert(name, Slot::DirTomb(id));
                Ok(Out::Unit)
            }
            Op::Stat { path } => {
                let id = self.resolve(path)?;
                Ok(Out::Attr(self.attr(id)))
            }
            Op::Getxattr { path } => {
                let id = self.resolve(path)?;
                let n = &self.nodes[id];
                if n.dir || n.writing {
                    return Err("NoData");
                }
                Ok(Out::Data(hex_sha256(&n.content).into_bytes()))
            }
            Op::Readdir { path } => {
                let id = self.resolve(path)?;
                if !self.nodes[id].dir {
                    return Err("NotDir");
                }
                Ok(Out::Entries(self.entries(id)))
            }
        }
    }

    /// mknod resolves the parent like any creation; a FIFO is refused without more checks.
    fn parent_dir_for_mknod(&self, path: &P) -> Result<(usize, Name), &'static str> {
        let (parent, name) = split(path);
        Ok((self.resolve(&parent)?, name))
    }

    fn create(&mut self, path: &P, mode: u32) -> Result<usize, &'static str> {
        let (dir, name) = self.parent_dir(path)?;
        match self.nodes[dir].place {
            Place::Root | Place::Runs | Place::Models => return Err("NotPermitted"),
            _ => check_name(&name)?,
        }
        match self.nodes[dir].children.get(&name) {
            // Live, a file's tombstone or a removed directory: the path is taken.
            Some(Slot::FileTomb(last, from)) => {
                // Removed while its writer still has it open: that writer owns the row.
                if from.is_some_and(|n| self.nodes[n].writing) {
                    self.events.push("create-on-tombstone-still-open");
                    return Err("Busy");
                }
                self.events.push("create-on-tombstone");
                let last = last.clone();
                let id = self.new_node(Node {
                    dir: false,
                    fixed: false,
                    place: Place::RunTree,
                    perm: (mode & 0o7777) as u16,
                    owner: (ME.uid, ME.gid),
                    mtime: None,
                    content: Vec::new(),
                    committed: false,
                    committed_content: Vec::new(),
                    expect: Some(last),
                    writing: true,
                    attached: true,
                    children: BTreeMap::new(),
                });
                self.nodes[dir].children.insert(name, Slot::Live(id));
                return Ok(id);
            }
            Some(Slot::DirTomb(_)) => {
                self.events.push("create-on-removed-dir");
                return Err("Exists");
            }
            Some(Slot::Live(_)) => return Err("Exists"),
            None => {}
        }
        let id = self.new_node(Node {
            dir: false,
            fixed: false,
            place: Place::RunTree,
            perm: (mode & 0o7777) as u16,
            owner: (ME.uid, ME.gid),
            mtime: None,
            content: Vec::new(),
            committed: false,
            committed_content: Vec::new(),
            expect: None,
            writing: true,
            attached: true,
            children: BTreeMap::new(),
        });
        self.nodes[dir].children.insert(name, Slot::Live(id));
        Ok(id)
    }

    /// Takes file `id` away from its path: a tombstone if it ever held committed content.
    /// With `MODEL_CHECK_README_LITERAL=1` every removed or renamed-away file leaves one, as
    /// the README's unlink and rename rows read literally.
    /// `same_row`: the tombstone is the file's own row (unlink), which its writer, if it still
    /// has one, goes on owning; a rename leaves a new row behind.
    fn detach_file(&mut self, dir: usize, name: &[u8], id: usize, same_row: bool) {
        let from = same_row.then_some(id);
        if let Some(x) = self.nodes[id].expect.clone() {
            // Created again provisionally: the tombstone it came from.
            self.nodes[dir]
                .children
                .insert(name.to_vec(), Slot::FileTomb(x, from));
        } else if self.nodes[id].committed || readme_literal() {
            self.events.push("tombstone");
            let last = self.nodes[id].committed_content.clone();
            self.nodes[dir]
                .children
                .insert(name.to_vec(), Slot::FileTomb(last, from));
        } else {
            self.events.push("uncommitted-leaves-no-tombstone");
            self.nodes[dir].children.remove(name);
        }
        self.nodes[id].attached = false;
    }

    fn make_dir(
        &mut self,
        dir: usize,
        name: &[u8],
        place: Place,
        perm: u16,
    ) -> Result<usize, &'static str> {
        match self.nodes[dir].children.get(name).cloned() {
            None => {
                let id = self.new_dir(place, perm);
                self.nodes[dir]
                    .children
                    .insert(name.to_vec(), Slot::Live(id));
                Ok(id)
            }
            Some(Slot::DirTomb(id)) => {
                self.events.push("mkdir-revives");
                self.nodes[id].perm = perm;
                self.nodes[id].owner = (ME.uid, ME.gid);
                self.nodes[id].mtime = None;
                self.nodes[dir]
                    .children
                    .insert(name.to_vec(), Slot::Live(id));
                Ok(id)
            }
            Some(Slot::FileTomb(..)) => {
                self.events.push("mkdir-on-tombstone");
                Err("Exists")
            }
            Some(_) => Err("Exists"),
        }
    }

    fn entries(&self, dir: usize) -> Vec<(Name, A)> {
        self.visible_children(dir)
            .into_iter()
            .map(|(n, id)| (n, self.attr(id)))
            .collect()
    }

    /// Every visible entry: path -> attributes.
    fn tree(&self) -> BTreeMap<String, A> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(String::new(), 0usize)];
        while let Some((prefix, id)) = stack.pop() {
            for (n, c) in self.visible_children(id) {
                let path = format!("{prefix}/{}", show_name(&n));
                if self.nodes[c].dir {
                    stack.push((path.clone(), c));
                }
                out.insert(path, self.attr(c));
            }
        }
        out
    }

    /// Visible files and directories (for the generator's biases): (path, dir, writing).
    fn live(&self) -> Vec<(P, bool, bool)> {
        let mut out = Vec::new();
        let mut stack = vec![(P::new(), 0usize)];
        while let Some((prefix, id)) = stack.pop() {
            for (n, c) in self.visible_children(id) {
                let mut path = prefix.clone();
                path.push(n);
                let node = &self.nodes[c];
                if node.dir {
                    stack.push((path.clone(), c));
                }
                out.push((path, node.dir, node.writing));
            }
        }
        out.sort();
        out
    }
}

/// `MODEL_CHECK_README_LITERAL=1`: model "unlink/rename leaves a tombstone" without the code's
/// exception for files that never committed (see the module doc).
fn readme_literal() -> bool {
    std::env::var("MODEL_CHECK_README_LITERAL").as_deref() == Ok("1")
}

fn hex_sha256(b: &[u8]) -> String {
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

// ----- the real file-system logic ------------------------------------------------------------------

struct Real {
    _dir: tempfile::TempDir,
    fs: ArtifactFs,
    /// Handle ordinal -> the real file handle (None once closed).
    handles: Vec<Option<u64>>,
}

fn real_attr(a: &Attr) -> A {
    let fixed = [ROOT_INO, RUNS_INO, MODELS_INO].contains(&a.ino);
    A {
        dir: a.kind == NodeKind::Dir,
        size: a.size,
        perm: (!fixed).then_some(a.perm),
        owner: (!fixed).then_some((a.uid, a.gid)),
        mtime: Some(a.mtime),
        sealed: a.sealed,
    }
}

impl Real {
    fn new() -> Real {
        let dir = tempfile::Builder::new()
            .prefix("afs-model-")
            .tempdir()
            .unwrap();
        let store = Store::open_writable(&dir.path().join("store")).unwrap();
        Real {
            fs: ArtifactFs::new(store, FsOptions::default()),
            _dir: dir,
            handles: Vec::new(),
        }
    }

    /// The inode at `path`, by one `lookup` per component (as the kernel does).
    fn resolve(&self, path: &P) -> Result<u64, FsError> {
        let mut cur = ROOT_INO;
        for c in path {
            cur = self.fs.lookup(cur, c)?.ino;
        }
        Ok(cur)
    }

    fn parent(&self, path: &P) -> Result<(u64, Name), FsError> {
        let (parent, name) = split(path);
        Ok((self.resolve(&parent)?, name))
    }

    fn fh(&self, h: usize) -> Option<u64> {
        self.handles.get(h).copied().flatten()
    }

    fn apply(&mut self, op: &Op) -> Out {
        match self.apply_inner(op) {
            Ok(out) => out,
            Err(e) => real_err(e),
        }
    }

    fn apply_inner(&mut self, op: &Op) -> Result<Out, FsError> {
        let fs = &self.fs;
        Ok(match op {
            Op::Create { path, mode } => {
                let (dir, name) = self.parent(path)?;
                let (attr, fh) = fs.create(ME, dir, &name, *mode)?;
                let a = real_attr(&attr);
                // create's own attributes must be those of an empty file being written.
                let want = A {
                    dir: false,
                    size: 0,
                    perm: Some((*mode & 0o7777) as u16),
                    owner: Some((ME.uid, ME.gid)),
                    mtime: a.mtime,
                    sealed: false,
                };
                if a != want {
                    return Ok(Out::Attr(a));
                }
                self.handles.push(Some(fh));
                Out::Handle(self.handles.len() - 1)
            }
            Op::Mknod { path, fifo } => {
                let (dir, name) = self.parent(path)?;
                let mode = if *fifo { libc::S_IFIFO } else { libc::S_IFREG } | 0o644;
                Out::Attr(real_attr(&fs.mknod(ME, dir, &name, mode)?))
            }
            Op::Open { path, flags } => {
                let ino = self.resolve(path)?;
                let (fh, _) = fs.open(ino, *flags)?;
                self.handles.push(Some(fh));
                Out::Handle(self.handles.len() - 1)
            }
            Op::Write { h, off, data } => match self.fh(*h) {
                None => Out::Skipped,
                Some(fh) => Out::Len(fs.write(fh, *off, data)?),
            },
            Op::Read { h, off, len } => match self.fh(*h) {
                None => Out::Skipped,
                Some(fh) => Out::Data(fs.read(fh, *off, *len)?),
            },
            Op::Flush { h } => match self.fh(*h) {
                None => Out::Skipped,
                Some(fh) => {
                    fs.flush(fh)?;
                    Out::Unit
                }
            },
            Op::Fsync { h } => match self.fh(*h) {
                None => Out::Skipped,
                Some(fh) => {
                    fs.fsync(fh)?;
                    Out::Unit
                }
            },
            Op::Close { h } => match self.fh(*h) {
                None => Out::Skipped,
                Some(fh) => {
                    // The kernel sends RELEASE whatever FLUSH answered.
                    let flushed = fs.flush(fh);
                    let released = fs.release(fh);
                    self.handles[*h] = None;
                    flushed?;
                    released?;
                    Out::Unit
                }
            },
            Op::Truncate { path, size } => {
                let ino = self.resolve(path)?;
                let change = SetAttr {
                    size: Some(*size),
                    ..Default::default()
                };
                Out::Attr(real_attr(&fs.setattr(ino, change)?))
            }
            Op::Chmod { path, mode } => {
                let ino = self.resolve(path)?;
                let change = SetAttr {
                    mode: Some(*mode),
                    ..Default::default()
                };
                Out::Attr(real_attr(&fs.setattr(ino, change)?))
            }
            Op::Chown { path, uid, gid } => {
                let ino = self.resolve(path)?;
                let change = SetAttr {
                    uid: *uid,
                    gid: *gid,
                    ..Default::default()
                };
                Out::Attr(real_attr(&fs.setattr(ino, change)?))
            }
            Op::Utimens { path, secs } => {
                let ino = self.resolve(path)?;
                let t = match secs {
                    Some(t) => SetTime::At(UNIX_EPOCH + Duration::from_secs(*t)),
                    None => SetTime::Now,
                };
                let change = SetAttr {
                    mtime: Some(t),
                    ..Default::default()
                };
                Out::Attr(real_attr(&fs.setattr(ino, change)?))
            }
            Op::Setxattr { path } => {
                let ino = self.resolve(path)?;
                fs.setxattr(ME, ino, b"user.x", b"1")?;
                Out::Unit
            }
            Op::Symlink { path } => {
                let (dir, name) = self.parent(path)?;
                Out::Attr(real_attr(&fs.symlink(ME, dir, &name, b"target")?))
            }
            Op::Link { from, to } => {
                self.resolve(from)?;
                let (dir, name) = self.parent(to)?;
                return Err(fs.refuse_link("link", dir, &name));
            }
            Op::Unlink { path } => {
                let (dir, name) = self.parent(path)?;
                fs.unlink(dir, &name)?;
                Out::Unit
            }
            Op::Rename { from, to, exchange } => {
                let (sdir, sname) = self.parent(from)?;
                let (ddir, dname) = self.parent(to)?;
                fs.rename(sdir, &sname, ddir, &dname, *exchange)?;
                Out::Unit
            }
            Op::Mkdir { path, mode } => {
                let (dir, name) = self.parent(path)?;
                Out::Attr(real_attr(&fs.mkdir(ME, dir, &name, *mode)?))
            }
            Op::Rmdir { path } => {
                let (dir, name) = self.parent(path)?;
                fs.rmdir(dir, &name)?;
                Out::Unit
            }
            Op::Stat { path } => {
                let ino = self.resolve(path)?;
                Out::Attr(real_attr(&fs.getattr(ino)?))
            }
            Op::Getxattr { path } => {
                let ino = self.resolve(path)?;
                Out::Data(fs.getxattr(ino, b"user.artifactfs.sha256")?)
            }
            Op::Readdir { path } => {
                let ino = self.resolve(path)?;
                Out::Entries(self.entries(ino)?)
            }
        })
    }

    fn entries(&self, ino: u64) -> Result<Vec<(Name, A)>, FsError> {
        let mut out: Vec<(Name, A)> = self
            .fs
            .readdir(ino, 0, 10_000)?
            .into_iter()
            .filter(|e| e.name != b"." && e.name != b"..")
            .map(|e| (e.name, real_attr(&e.attr)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn tree(&self) -> Result<BTreeMap<String, A>, FsError> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(String::new(), ROOT_INO)];
        while let Some((prefix, ino)) = stack.pop() {
            for e in self.fs.readdir(ino, 0, 10_000)? {
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                let path = format!("{prefix}/{}", show_name(&e.name));
                if e.attr.kind == NodeKind::Dir {
                    stack.push((path.clone(), e.attr.ino));
                }
                out.insert(path, real_attr(&e.attr));
            }
        }
        Ok(out)
    }

    /// Releases whatever is still open (the end of a sequence).
    fn close_all(&mut self) {
        for fh in self.handles.drain(..).flatten() {
            let _ = self.fs.flush(fh);
            let _ = self.fs.release(fh);
        }
    }
}

// ----- the generator ---------------------------------------------------------------------------

const A_DIR: &str = "runs/r/artifacts";

/// Paths the sequences play in: mostly one run's artifacts, a little of runs/r, runs/s, / and runs/.
fn pool() -> Vec<P> {
    let mut v = Vec::new();
    for n in ["a", "b", "c", "d", "e"] {
        v.push(p(&format!("{A_DIR}/{n}")));
    }
    let mut odd = p(A_DIR);
    odd.push(b"\xffz".to_vec()); // not UTF-8
    v.push(odd);
    let mut ctl = p(A_DIR);
    ctl.push(b"c\x01tl".to_vec()); // a control character: fine below a run
    v.push(ctl);
    for d in ["d", "e"] {
        for n in ["a", "b", "d"] {
            v.push(p(&format!("{A_DIR}/{d}/{n}")));
        }
    }
    v.push(p(&format!("{A_DIR}/d/d/a")));
    v.push(p(&format!("{A_DIR}/a/x"))); // below what may be a file
    v
}

fn pool_rare() -> Vec<P> {
    let mut v: Vec<P> = [
        "runs/r/x",
        "runs/r/artifacts",
        "runs/r",
        "runs/s",
        "runs/s/artifacts",
        "runs/s/artifacts/a",
        "runs/s/x",
        "x",
        "runs",
        "models",
        "runs/f",
        "models/f",
        "",
    ]
    .iter()
    .map(|s| p(s))
    .collect();
    let mut bad = p("runs");
    bad.push(b"bad\x01id".to_vec());
    v.push(bad);
    v
}

fn long_name_path() -> P {
    let mut v = p(A_DIR);
    v.push(vec![b'n'; 256]);
    v
}

struct Gen {
    rng: Rng,
    pool: Vec<P>,
    rare: Vec<P>,
    /// Opens of a file being written wait 0.5 s for its release before `EBUSY`: rationed.
    busy_budget: u32,
}

impl Gen {
    fn any_path(&mut self) -> P {
        if self.rng.chance(1, 9) {
            self.rng.pick(&self.rare).clone()
        } else {
            self.rng.pick(&self.pool).clone()
        }
    }

    /// A path for something new, usually in a directory that exists.
    fn new_path(&mut self, m: &Model) -> P {
        if self.rng.chance(3, 4) {
            let ok: Vec<P> = self
                .pool
                .iter()
                .filter(|p| matches!(m.resolve(&split(p).0), Ok(id) if m.nodes[id].dir))
                .cloned()
                .collect();
            if !ok.is_empty() {
                return self.rng.pick(&ok).clone();
            }
        }
        self.any_path()
    }

    /// A path, preferring visible entries of the wanted kind.
    fn path_pref(&mut self, m: &Model, want_dir: Option<bool>, avoid_writing: bool) -> P {
        if self.rng.chance(2, 3) {
            let live: Vec<P> = m
                .live()
                .into_iter()
                .filter(|(_, d, w)| want_dir.is_none_or(|wd| wd == *d) && !(avoid_writing && *w))
                .map(|(p, _, _)| p)
                .collect();
            if !live.is_empty() {
                return self.rng.pick(&live).clone();
            }
        }
        self.any_path()
    }

    fn handles(&self, m: &Model, write: Option<bool>) -> Vec<usize> {
        m.handles
            .iter()
            .enumerate()
            .filter(|(_, h)| {
                h.as_ref()
                    .is_some_and(|h| write.is_none_or(|w| w == h.write))
            })
            .map(|(i, _)| i)
            .collect()
    }

    fn mode(&mut self) -> u32 {
        *self.rng.pick(&[0o644, 0o600, 0o755, 0o700, 0o444, 0o4755])
    }

    fn op(&mut self, m: &Model) -> Op {
        loop {
            let roll = self.rng.below(100);
            let op = match roll {
                0..=11 => {
                    let path = if self.rng.chance(1, 40) {
                        long_name_path()
                    } else {
                        self.new_path(m)
                    };
                    Op::Create {
                        path,
                        mode: self.mode(),
                    }
                }
                12..=27 => {
                    let hs = self.handles(m, Some(true));
                    if hs.is_empty() {
                        continue;
                    }
                    let h = *self.rng.pick(&hs);
                    let size = m.nodes[m.handles[h].as_ref().unwrap().node].content.len() as u64;
                    let off = if self.rng.chance(2, 3) {
                        size
                    } else {
                        self.rng.below(size + 4)
                    };
                    let len = 1 + self.rng.below(8) as usize;
                    let data = (0..len).map(|_| b'a' + self.rng.below(26) as u8).collect();
                    Op::Write { h, off, data }
                }
                28..=38 => {
                    let hs = self.handles(m, None);
                    if hs.is_empty() {
                        continue;
                    }
                    Op::Close {
                        h: *self.rng.pick(&hs),
                    }
                }
                39..=41 => {
                    let hs = self.handles(m, Some(true));
                    if hs.is_empty() {
                        continue;
                    }
                    let h = *self.rng.pick(&hs);
                    if self.rng.chance(1, 3) {
                        Op::Fsync { h }
                    } else {
                        Op::Flush { h }
                    }
                }
                42..=51 => {
                    let path = if self.rng.chance(1, 60) {
                        long_name_path()
                    } else {
                        self.path_pref(m, Some(false), false)
                    };
                    let busy = matches!(m.resolve(&path), Ok(id) if m.nodes[id].writing);
                    if busy {
                        if self.busy_budget == 0 {
                            continue;
                        }
                        self.busy_budget -= 1;
                    }
                    let flags = if self.rng.chance(2, 3) {
                        libc::O_RDONLY
                    } else {
                        *self.rng.pick(&[
                            libc::O_WRONLY,
                            libc::O_RDWR,
                            libc::O_RDONLY | libc::O_TRUNC,
                            libc::O_WRONLY | libc::O_APPEND,
                            libc::O_WRONLY | libc::O_TRUNC,
                        ])
                    };
                    Op::Open { path, flags }
                }
                52..=58 => {
                    let hs = self.handles(m, None);
                    if hs.is_empty() {
                        continue;
                    }
                    let h = *self.rng.pick(&hs);
                    let hd = m.handles[h].as_ref().unwrap();
                    let size = if hd.write {
                        m.nodes[hd.node].content.len()
                    } else {
                        hd.snapshot.len()
                    } as u64;
                    Op::Read {
                        h,
                        off: self.rng.below(size + 2),
                        len: 1 + self.rng.below(16) as u32,
                    }
                }
                59..=66 => {
                    let from = self.path_pref(m, Some(false), false);
                    let to = if self.rng.chance(1, 4) {
                        self.path_pref(m, None, false)
                    } else {
                        self.new_path(m)
                    };
                    let exchange = self.rng.chance(1, 25);
                    Op::Rename { from, to, exchange }
                }
                67..=73 => Op::Unlink {
                    path: self.path_pref(m, Some(false), false),
                },
                74..=80 => {
                    let path = if self.rng.chance(1, 40) {
                        long_name_path()
                    } else {
                        self.new_path(m)
                    };
                    Op::Mkdir {
                        path,
                        mode: self.mode(),
                    }
                }
                81..=86 => {
                    // Mostly directories below the run (rmdir of /runs, runs/r/artifacts: rarer).
                    let deep: Vec<P> = m
                        .live()
                        .into_iter()
                        .filter(|(p, d, _)| *d && p.len() > 3)
                        .map(|(p, _, _)| p)
                        .collect();
                    let path = if !deep.is_empty() && self.rng.chance(3, 4) {
                        self.rng.pick(&deep).clone()
                    } else {
                        self.path_pref(m, Some(true), false)
                    };
                    Op::Rmdir { path }
                }
                87..=89 => {
                    let path = self.path_pref(m, None, false);
                    match self.rng.below(8) {
                        0..=3 => Op::Chmod {
                            path,
                            mode: self.mode(),
                        },
                        4 => Op::Chown {
                            path,
                            uid: self.rng.chance(1, 2).then_some(1234),
                            gid: self.rng.chance(1, 2).then_some(4321),
                        },
                        5 | 6 => Op::Utimens {
                            path,
                            secs: self
                                .rng
                                .chance(3, 4)
                                .then(|| 1_000_000_000 + self.rng.below(1000)),
                        },
                        _ => match self.rng.below(3) {
                            0 => Op::Setxattr { path },
                            1 => Op::Symlink { path },
                            _ => Op::Link {
                                from: self.path_pref(m, Some(false), false),
                                to: self.new_path(m),
                            },
                        },
                    }
                }
                90..=93 => {
                    let path = self.path_pref(m, Some(false), false);
                    let cur = m
                        .resolve(&path)
                        .map(|id| m.nodes[id].content.len() as u64)
                        .unwrap_or(0);
                    let size = *self.rng.pick(&[0, cur, cur + 1, cur.saturating_sub(1)]);
                    Op::Truncate { path, size }
                }
                94 => Op::Stat {
                    path: self.path_pref(m, None, false),
                },
                95..=96 => Op::Getxattr {
                    path: self.path_pref(m, Some(false), false),
                },
                97 => Op::Readdir {
                    path: self.path_pref(m, Some(true), false),
                },
                _ => Op::Mknod {
                    path: self.any_path(),
                    fifo: self.rng.chance(1, 2),
                },
            };
            return fix_up(op);
        }
    }
}

/// Operations that name an entry cannot name the root: they get `/runs` instead. `mkdir` in
/// `models/` registers a model (outside this model's scope): it gets `runs/s` instead.
fn fix_up(op: Op) -> Op {
    let fix = |path: P| if path.is_empty() { p("runs") } else { path };
    match op {
        Op::Create { path, mode } => Op::Create {
            path: fix(path),
            mode,
        },
        Op::Mknod { path, fifo } => Op::Mknod {
            path: fix(path),
            fifo,
        },
        Op::Unlink { path } => Op::Unlink { path: fix(path) },
        Op::Symlink { path } => Op::Symlink { path: fix(path) },
        Op::Link { from, to } => Op::Link { from, to: fix(to) },
        Op::Rmdir { path } => Op::Rmdir { path: fix(path) },
        Op::Rename { from, to, exchange } => Op::Rename {
            from: fix(from),
            to: fix(to),
            exchange,
        },
        Op::Mkdir { path, mode } => {
            let path = fix(path);
            let path = if path.first().map(Vec::as_slice) == Some(b"models") {
                p("runs/s")
            } else {
                path
            };
            Op::Mkdir { path, mode }
        }
        other => other,
    }
}

/// The ops of sequence `seed`, generated against the model as they are applied.
fn generate(seed: u64, n_ops: usize) -> Vec<Op> {
    let mut g = Gen {
        rng: Rng::new(seed),
        pool: pool(),
        rare: pool_rare(),
        busy_budget: u32::from(seed.is_multiple_of(3)),
    };
    let mut m = Model::new();
    let mut ops = vec![Op::Mkdir {
        path: p("runs/r"),
        mode: 0o755,
    }];
    m.apply(&ops[0]);
    while ops.len() < n_ops {
        let op = g.op(&m);
        m.apply(&op);
        ops.push(op);
    }
    ops
}

// ----- running and checking ----------------------------------------------------------------------

struct Failure {
    /// Index of the failing op.
    at: usize,
    /// Each op so far with the real result.
    log: Vec<(Op, Out)>,
    what: String,
}

impl Failure {
    fn op_kind(&self) -> String {
        let s = self.log[self.at].0.to_string();
        s.split(' ').next().unwrap_or("").to_string()
    }

    fn render(&self) -> String {
        let mut s = String::new();
        for (i, (op, out)) in self.log.iter().enumerate() {
            let mark = if i == self.at { ">>" } else { "  " };
            let _ = writeln!(s, "{mark} {i:3}: {op}  => {out}");
        }
        let _ = writeln!(s, "{}", self.what);
        s
    }
}

fn tree_diff(real: &BTreeMap<String, A>, model: &BTreeMap<String, A>) -> String {
    let mut s = String::new();
    for (k, v) in real {
        match model.get(k) {
            None => {
                let _ = writeln!(s, "  only in real:  {k} {v:?}");
            }
            Some(m) if m != v => {
                let _ = writeln!(
                    s,
                    "  differs:       {k}\n     real  {v:?}\n     model {m:?}"
                );
            }
            _ => {}
        }
    }
    for (k, v) in model {
        if !real.contains_key(k) {
            let _ = writeln!(s, "  only in model: {k} {v:?}");
        }
    }
    s
}

/// How often each (kind of op, outcome) was seen: printed, so a generator that stops reaching a
/// rule shows.
static COVERAGE: Mutex<BTreeMap<(String, String), usize>> = Mutex::new(BTreeMap::new());

fn outcome_kind(o: &Out) -> String {
    match o {
        Out::Err(e) => e.clone(),
        Out::Attr(a) if a.sealed => "ok(sealed)".into(),
        Out::Attr(_) => "ok".into(),
        Out::Skipped => "skipped".into(),
        _ => "ok".into(),
    }
}

/// Forgets the real mtime wherever the model does not know it.
fn forget_mtime(got: &mut A, want: &A) {
    if want.mtime.is_none() {
        got.mtime = None;
    }
}

fn normalize(got: &mut Out, want: &Out) {
    match (got, want) {
        (Out::Attr(g), Out::Attr(w)) => forget_mtime(g, w),
        (Out::Entries(g), Out::Entries(w)) => {
            for ((gn, ga), (wn, wa)) in g.iter_mut().zip(w) {
                if gn == wn {
                    forget_mtime(ga, wa);
                }
            }
        }
        _ => {}
    }
}

/// Runs `ops` on a fresh store and the model; the first disagreement, if any.
fn check(ops: &[Op]) -> Result<(), Box<Failure>> {
    check_with(ops, false)
}

fn check_with(ops: &[Op], count: bool) -> Result<(), Box<Failure>> {
    let mut real = Real::new();
    let mut model = Model::new();
    let mut log: Vec<(Op, Out)> = Vec::new();
    let mut result = Ok(());
    for (i, op) in ops.iter().enumerate() {
        let want = model.apply(op);
        let mut got = real.apply(op);
        normalize(&mut got, &want);
        log.push((op.clone(), got.clone()));
        if count {
            let mut cov = COVERAGE.lock().unwrap();
            for e in model.events.drain(..) {
                *cov.entry(("rule".into(), e.into())).or_default() += 1;
            }
            drop(cov);
            let kind = op.to_string().split(' ').next().unwrap_or("").to_string();
            *COVERAGE
                .lock()
                .unwrap()
                .entry((kind, outcome_kind(&got)))
                .or_default() += 1;
        }
        if got != want {
            result = Err(Box::new(Failure {
                at: i,
                log,
                what: format!("result differs:\n   real:  {got}\n   model: {want}"),
            }));
            break;
        }
        let mut rt = match real.tree() {
            Ok(t) => t,
            Err(e) => {
                result = Err(Box::new(Failure {
                    at: i,
                    log,
                    what: format!("readdir of the real tree failed: {e}"),
                }));
                break;
            }
        };
        let mt = model.tree();
        for (k, a) in rt.iter_mut() {
            if let Some(w) = mt.get(k) {
                forget_mtime(a, w);
            }
        }
        if rt != mt {
            result = Err(Box::new(Failure {
                at: i,
                log,
                what: format!("tree differs after the op:\n{}", tree_diff(&rt, &mt)),
            }));
            break;
        }
    }
    real.close_all();
    result
}

/// Greedily drops ops while the sequence still fails at the same kind of op (time-capped).
fn shrink(ops: &[Op], first: &Failure, budget: Duration) -> Vec<Op> {
    let kind = first.op_kind();
    let start = Instant::now();
    let mut cur: Vec<Op> = ops[..=first.at].to_vec();
    let mut changed = true;
    while changed && start.elapsed() < budget {
        changed = false;
        let mut i = 1; // keep the initial mkdir runs/r
        while i < cur.len() && start.elapsed() < budget {
            let mut cand = cur.clone();
            cand.remove(i);
            match check(&cand) {
                Err(f) if f.op_kind() == kind => {
                    cand.truncate(f.at + 1);
                    cur = cand;
                    changed = true;
                }
                _ => i += 1,
            }
        }
    }
    cur
}

/// A failing sequence: seed, its ops, the first disagreement.
type Failed = (u64, Vec<Op>, Box<Failure>);

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn the_logic_agrees_with_the_reference_model() {
    let started = Instant::now();
    let n_seqs = env_num("MODEL_CHECK_SEQS", 300);
    let n_ops = env_num("MODEL_CHECK_OPS", 60) as usize;
    let threads = env_num("MODEL_CHECK_THREADS", 8).max(1) as usize;
    let seeds: Vec<u64> = match std::env::var("MODEL_CHECK_SEED") {
        Ok(s) => vec![s.parse().expect("MODEL_CHECK_SEED is a number")],
        Err(_) => (1..=n_seqs).collect(),
    };

    let next = AtomicUsize::new(0);
    let failures: Mutex<Vec<Failed>> = Mutex::new(Vec::new());
    let total_ops = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&seed) = seeds.get(i) else { break };
                    let ops = generate(seed, n_ops);
                    total_ops.fetch_add(ops.len(), Ordering::Relaxed);
                    if let Err(f) = check_with(&ops, true) {
                        failures.lock().unwrap().push((seed, ops, f));
                    }
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap();
    failures.sort_by_key(|f| f.0);
    eprintln!(
        "model check: {} sequences, {} ops, {} failing, {:.1?}",
        seeds.len(),
        total_ops.load(Ordering::Relaxed),
        failures.len(),
        started.elapsed()
    );
    let mut cov = String::new();
    for ((op, out), n) in COVERAGE.lock().unwrap().iter() {
        let _ = write!(cov, "{op}:{out}={n} ");
    }
    eprintln!("coverage (op:outcome=count): {cov}");
    if failures.is_empty() {
        return;
    }

    // One report per kind of failing op (the first seed of each), each with a shrunk sequence.
    let mut report = String::new();
    let mut seen = Vec::new();
    let mut by_kind: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (seed, _, f) in &failures {
        by_kind.entry(f.op_kind()).or_default().push(*seed);
    }
    let _ = writeln!(report, "failing seeds by the kind of op that disagreed:");
    for (k, seeds) in &by_kind {
        let _ = writeln!(
            report,
            "  {k}: {} seeds, e.g. {:?}",
            seeds.len(),
            &seeds[..seeds.len().min(8)]
        );
    }
    for (seed, ops, f) in &failures {
        let kind = f.op_kind();
        if seen.contains(&kind) || seen.len() >= 4 {
            continue;
        }
        seen.push(kind);
        let _ = writeln!(
            report,
            "\n=== seed {seed} (MODEL_CHECK_SEED={seed}): disagreement at op {} ===\n{}",
            f.at,
            f.render()
        );
        let small = shrink(ops, f, Duration::from_secs(30));
        if let Err(sf) = check(&small) {
            let _ = writeln!(
                report,
                "--- shrunk to {} ops ---\n{}",
                small.len(),
                sf.render()
            );
        }
    }
    panic!(
        "{} of {} sequences disagree with the reference model\n{report}",
        failures.len(),
        seeds.len()
    );
}
