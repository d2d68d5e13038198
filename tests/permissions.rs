//! Who may do what on a real mount: other users without and with `--allow-other` (the kernel's
//! `default_permissions` checks), `--uid/--gid`, the store directory's own protection,
//! `--read-only`, and where symlinks may be made.
//!
//! The unprivileged user is `nobody` (uid/gid 65534) through util-linux's
//! `setpriv --reuid=65534 --regid=65534 --clear-groups`: no user is created. Each operation is
//! one call of the system's python (`/usr/bin/python3 -I`, readable by everyone), which prints
//! `ok [value]` or the errno's name, so every check is on the exact errno.
//!
//! The temp dirs holding mount point and store are made 0755, so only artifactfs's (and the
//! store's) own permissions are tested, not those of the temp dir.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const NOBODY: u32 = 65534;
const PYTHON: &str = "/usr/bin/python3";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Who {
    Root,
    Nobody,
    /// `nobody` with the supplementary group [`GROUP`].
    Member,
}

/// A group nobody belongs to but [`Who::Member`].
const GROUP: u32 = 4242;

/// Helpers available to the statements given to [`attempt`].
const PRELUDE: &str = r#"
import errno, os, sys
a = sys.argv[1:]
def create(p, data=b"x", mode=0o644):
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
def read(p):
    with open(p, "rb") as f:
        return f.read().decode()
def write_open(p):
    os.close(os.open(p, os.O_WRONLY))
def writes(p, parts, flags=os.O_WRONLY):
    fd = os.open(p, flags, 0o644)
    out = []
    for off, data in parts:
        try:
            os.pwrite(fd, data, off)
            out.append("ok")
        except OSError as e:
            out.append(errno.errorcode[e.errno])
    try:
        os.close(fd)
        out.append("close ok")
    except OSError as e:
        out.append("close " + errno.errorcode[e.errno])
    return " ".join(out)
NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL
def attempt_then(then, *paths):
    fd = os.open(paths[0], NEW, 0o644)
    os.pwrite(fd, b"X", 0)
    out = []
    for what, f in (("then", lambda: then(*paths)), ("close", lambda: os.close(fd))):
        try:
            f()
            out.append(what + " ok")
        except OSError as e:
            out.append(what + " " + errno.errorcode[e.errno])
    return " ".join(out)
"#;

/// Runs one python expression as `who`; returns `ok`, `ok <value>` or the errno's name
/// (`EACCES`, `EROFS`, ...). `a[0]`, `a[1]`, ... are `args`.
fn attempt(who: Who, expr: &str, args: &[&Path]) -> String {
    let prog = format!(
        "{PRELUDE}\ntry:\n    r = {expr}\nexcept OSError as e:\n    \
         print(errno.errorcode.get(e.errno, e.errno))\n    sys.exit(0)\n\
         print('ok' if r is None else 'ok ' + str(r))\n"
    );
    let mut cmd = match who {
        Who::Root => Command::new(PYTHON),
        Who::Nobody | Who::Member => {
            let groups = match who {
                Who::Member => format!("--groups={GROUP}"),
                _ => "--clear-groups".to_string(),
            };
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                &groups,
                PYTHON,
            ]);
            c
        }
    };
    let out = cmd
        .args(["-I", "-c", &prog])
        .args(args)
        .current_dir("/")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python ({expr}) failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    s.strip_suffix('\n').unwrap_or(&s).to_string()
}

fn nobody(expr: &str, args: &[&Path]) -> String {
    attempt(Who::Nobody, expr, args)
}

fn root(expr: &str, args: &[&Path]) -> String {
    attempt(Who::Root, expr, args)
}

/// Whether the tools this file needs are here (else the test says why and skips).
fn tools_available(test: &str) -> bool {
    let ok = Path::new(PYTHON).exists()
        && Command::new("setpriv")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !ok {
        let why = format!("{test}: skipped: needs {PYTHON} and setpriv (util-linux)");
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{why} — but CI=true");
        }
        eprintln!("{why}");
    }
    ok
}

/// Mounts with `args` (None: skip), and opens the temp dir (mount point's and store's parent)
/// to everyone, so that only artifactfs's own permission checks are tested.
fn mount(test: &str, args: &[&str]) -> Option<Mount> {
    if !fuse_available(test) || !tools_available(test) {
        return None;
    }
    let m = Mount::with_args(test, args)?;
    let dir = m.dir.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Its parents are the system's (/tmp): not changed here, but they must let others through.
    for parent in dir.ancestors().skip(1) {
        let mode = std::fs::metadata(parent).unwrap().permissions().mode();
        assert!(
            mode & 0o001 != 0,
            "{} (mode {mode:o}) is not searchable by other users: set TMPDIR elsewhere",
            parent.display()
        );
    }
    Some(m)
}

fn stat_owner(path: &Path) -> String {
    sh_ok(
        Path::new("/"),
        &format!("stat -c %u:%g '{}'", path.display()),
    )
    .trim()
    .to_string()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn without_allow_other_other_users_cannot_see_into_the_mount() {
    let Some(m) = mount(
        "without_allow_other_other_users_cannot_see_into_the_mount",
        &[],
    ) else {
        return;
    };
    sh_ok(&m.mnt, "mkdir runs/r && echo hi > runs/r/artifacts/f");
    let f = m.path("runs/r/artifacts/f");

    // Control: nobody can list the mount point's parent, so the refusals below are the mount's.
    assert!(
        nobody("sorted(os.listdir(a[0]))", &[m.dir.path()]).contains("'mnt'"),
        "nobody cannot even list the temp dir"
    );
    // ls as nobody fails with "Permission denied".
    let ls = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "ls"])
        .arg(&m.mnt)
        .current_dir("/")
        .output()
        .unwrap();
    assert!(
        !ls.status.success() && String::from_utf8_lossy(&ls.stderr).contains("Permission denied"),
        "ls of the mount as nobody: {} {}",
        ls.status,
        String::from_utf8_lossy(&ls.stderr)
    );
    assert_eq!(nobody("os.listdir(a[0])", &[&m.mnt]), "EACCES");
    assert_eq!(nobody("os.stat(a[0]).st_mode", &[&m.mnt]), "EACCES");
    assert_eq!(nobody("read(a[0])", &[&f]), "EACCES");
    assert_eq!(
        nobody("create(a[0])", &[&m.path("runs/r/artifacts/g")]),
        "EACCES"
    );
    // The mounting user (root) is served as usual.
    assert_eq!(root("read(a[0])", &[&f]), "ok hi\n");
}

#[test]
fn with_allow_other_the_kernel_checks_mode_bits() {
    let Some(m) = mount(
        "with_allow_other_the_kernel_checks_mode_bits",
        &["--allow-other"],
    ) else {
        return;
    };
    sh_ok(
        &m.mnt,
        "mkdir runs/r && cd runs/r/artifacts \
         && echo public > f644 && chmod 0644 f644 \
         && echo secret > f600 && chmod 0600 f600 \
         && mkdir d755 d777 && chmod 0755 d755 && chmod 0777 d777",
    );
    let art = m.path("runs/r/artifacts");
    assert_eq!(
        sh_ok(&art, "stat -c '%a %u %n' f644 f600 d755 d777"),
        "644 0 f644\n600 0 f600\n755 0 d755\n777 0 d777\n"
    );

    assert_eq!(nobody("read(a[0])", &[&art.join("f644")]), "ok public\n");
    assert_eq!(nobody("read(a[0])", &[&art.join("f600")]), "EACCES");
    assert_eq!(nobody("create(a[0])", &[&art.join("d755/new")]), "EACCES");
    assert_eq!(nobody("os.mkdir(a[0])", &[&art.join("d755/sub")]), "EACCES");
    // Not the owner: no chmod of root's file.
    assert_eq!(
        nobody("os.chmod(a[0], 0o666)", &[&art.join("f644")]),
        "EPERM"
    );

    let mine = art.join("d777/mine");
    assert_eq!(nobody("create(a[0], b'by nobody')", &[&mine]), "ok");
    assert_eq!(stat_owner(&mine), format!("{NOBODY}:{NOBODY}"));
    assert_eq!(nobody("read(a[0])", &[&mine]), "ok by nobody");
    // Its owner may chmod it (metadata of a sealed file), others' files stay closed.
    assert_eq!(nobody("os.chmod(a[0], 0o600)", &[&mine]), "ok");
    let dir = art.join("d777/dir");
    assert_eq!(nobody("os.mkdir(a[0])", &[&dir]), "ok");
    assert_eq!(stat_owner(&dir), format!("{NOBODY}:{NOBODY}"));
}

/// Whoever may write a file but not read it learns none of its bytes from which writes are
/// refused: a rewrite of a sealed file by a writer without read permission (mode 0622), and a
/// file created again at its tombstone — also on the second attempt after a refused one (the
/// first had made the row the writer's), and below a directory removed and made again by
/// another user (whose mode bits had protected the file). Such a writer's writes are all
/// accepted; its `close()` says only whether its whole content was the file's. A writer who
/// may read the file is still answered at each write.
#[test]
fn writers_who_may_not_read_a_file_learn_none_of_its_bytes() {
    let Some(m) = mount(
        "writers_who_may_not_read_a_file_learn_none_of_its_bytes",
        &["--allow-other"],
    ) else {
        return;
    };
    sh_ok(
        &m.mnt,
        "mkdir runs/r && cd runs/r/artifacts && mkdir -m 777 shared && cd shared \
         && printf secret > wo && chmod 0622 wo \
         && printf topsecret > t && chmod 0600 t && rm t \
         && mkdir -m 700 priv && printf key > priv/k && chmod 0644 priv/k && rm -r priv",
    );
    let shared = m.path("runs/r/artifacts/shared");
    let wo = shared.join("wo");
    // The sealed file, mode 0622: nobody may write it, not read it.
    assert_eq!(nobody("read(a[0])", &[&wo]), "EACCES");
    for (parts, want) in [
        ("[(0, b'X')]", "ok close EPERM"),
        ("[(0, b's')]", "ok close EPERM"),
        ("[(0, b'secreX')]", "ok close EPERM"),
        ("[(0, b'sec'), (3, b'ret')]", "ok ok close ok"),
        ("[(0, b'secret!')]", "EPERM close ok"),
    ] {
        let got = nobody(&format!("writes(a[0], {parts})"), &[&wo]);
        assert_eq!(got, format!("ok {want}"), "{parts}");
    }
    // With O_TRUNC (the kernel's truncate comes after the open): every byte again.
    assert_eq!(
        nobody(
            "writes(a[0], [(0, b'secret')], os.O_WRONLY | os.O_TRUNC)",
            &[&wo]
        ),
        "ok ok close ok"
    );
    // Its owner, who may read it, is answered at the write.
    assert_eq!(
        root("writes(a[0], [(0, b'X')])", &[&wo]),
        "ok EPERM close ok"
    );
    assert_eq!(root("read(a[0])", &[&wo]), "ok secret");

    // Created again at its tombstone (root's, 0600): twice, a byte at a time.
    let t = shared.join("t");
    for attempt in 0..2 {
        assert_eq!(
            nobody("writes(a[0], [(0, b'X')], NEW)", &[&t]),
            "ok ok close EPERM",
            "attempt {attempt}"
        );
        assert_eq!(
            nobody("writes(a[0], [(0, b't')], NEW)", &[&t]),
            "ok ok close EPERM",
            "attempt {attempt}"
        );
    }
    // An attempt removed while open leaves the tombstone root's as well; one is not moved
    // elsewhere, where the tombstone would follow it (into a directory of the writer's).
    let mine = shared.join("mine");
    assert_eq!(nobody("os.mkdir(a[0])", &[&mine]), "ok");
    let t2 = mine.join("t2");
    assert_eq!(
        nobody("attempt_then(os.unlink, a[0])", &[&t]),
        "ok then ok close EPERM"
    );
    assert_eq!(
        nobody("attempt_then(os.rename, a[0], a[1])", &[&t, &t2]),
        "ok then EBUSY close EPERM"
    );
    assert!(!t2.exists());
    assert_eq!(
        nobody("writes(a[0], [(0, b't')], NEW)", &[&t]),
        "ok ok close EPERM"
    );
    // Its whole content is accepted (the path's last content): nobody's now, with the mode
    // of its chmod while it was written.
    assert_eq!(
        nobody(
            "(lambda fd: (os.write(fd, b'topsecret'), os.fchmod(fd, 0o640), os.close(fd)))(os.open(a[0], NEW, 0o644))",
            &[&t]
        ),
        "ok (9, None, None)"
    );
    assert_eq!(stat_owner(&t), format!("{NOBODY}:{NOBODY}"));
    assert_eq!(
        std::fs::metadata(&t).unwrap().permissions().mode() & 0o7777,
        0o640
    );

    // Below a directory root had at 0700, removed, and made again by nobody: the file's own
    // mode (0644) no longer says who could read it.
    let priv_ = shared.join("priv");
    assert_eq!(nobody("os.mkdir(a[0])", &[&priv_]), "ok");
    assert_eq!(
        nobody("writes(a[0], [(0, b'X')], NEW)", &[&priv_.join("k")]),
        "ok ok close EPERM"
    );
    assert_eq!(
        nobody("writes(a[0], [(0, b'k')], NEW)", &[&priv_.join("k")]),
        "ok ok close EPERM"
    );
    // Root, who may read everything, is still answered at the write.
    assert_eq!(
        root("writes(a[0], [(0, b'X')], NEW)", &[&priv_.join("k")]),
        "ok EPERM close EPERM"
    );
}

#[test]
fn uid_and_gid_options_own_every_entry() {
    let Some(mut m) = mount(
        "uid_and_gid_options_own_every_entry",
        &["--uid", "1234", "--gid", "1234"],
    ) else {
        return;
    };
    sh_ok(
        &m.mnt,
        "mkdir runs/r && echo x > runs/r/artifacts/f && mkdir runs/r/artifacts/d",
    );
    let paths = [
        "",
        "runs",
        "models",
        "runs/r",
        "runs/r/artifacts",
        "runs/r/artifacts/f",
        "runs/r/artifacts/d",
    ];
    for p in paths {
        assert_eq!(stat_owner(&m.path(p)), "1234:1234", "owner of /{p}");
    }
    // `find` sees the same for everything.
    let owners = sh_ok(&m.mnt, "find . -printf '%U:%G\\n' | sort -u");
    assert_eq!(owners, "1234:1234\n");

    // Recorded for new entries: without --uid, what was created under it still has that owner.
    m.unmount();
    m.mount(&[]);
    for p in [
        "runs/r",
        "runs/r/artifacts",
        "runs/r/artifacts/f",
        "runs/r/artifacts/d",
    ] {
        assert_eq!(
            stat_owner(&m.path(p)),
            "1234:1234",
            "recorded owner of /{p}"
        );
    }
}

/// A directory with the setgid bit passes its group on to what is made in it, and the bit to
/// new directories, exactly as on the local file system beside the mount: files and `mkdir -p`
/// by a user outside that group, `mkdir` and `cp -r` by root.
#[test]
fn setgid_directories_pass_their_group_on_as_on_the_local_file_system() {
    let Some(mut m) = mount(
        "setgid_directories_pass_their_group_on_as_on_the_local_file_system",
        &["--allow-other"],
    ) else {
        return;
    };
    let local = m.dir.path().join("local");
    std::fs::create_dir_all(local.join("runs/s/artifacts")).unwrap();
    sh_ok(&m.mnt, "mkdir runs/s");
    let mut seen = Vec::new();
    for root in [&local, &m.mnt] {
        let a = root.join("runs/s/artifacts");
        sh_ok(
            root,
            &format!("chown 0:{GROUP} runs/s/artifacts && chmod 2777 runs/s/artifacts"),
        );
        // NOBODY is not in GROUP: the file still takes GROUP (and loses a setgid bit it asks
        // for, which the kernel strips).
        assert_eq!(nobody("create(a[0] + '/f', b'x', 0o644)", &[&a]), "ok");
        assert_eq!(nobody("create(a[0] + '/g', b'y', 0o2755)", &[&a]), "ok");
        assert_eq!(nobody("os.mkdir(a[0] + '/d', 0o755)", &[&a]), "ok");
        assert_eq!(nobody("os.makedirs(a[0] + '/d/e/f', 0o700)", &[&a]), "ok");
        assert_eq!(
            nobody("create(a[0] + '/d/e/f/h', b'z', 0o600)", &[&a]),
            "ok"
        );
        // Root's own group is 0: what root makes here takes GROUP too.
        sh_ok(&a, "mkdir r && echo r > r/x && cp -r r c");
        seen.push(sh_ok(
            &a,
            "stat -c '%n %u %g %A' f g d d/e d/e/f d/e/f/h r r/x c c/x",
        ));
    }
    assert_eq!(seen[0], seen[1], "local file system, then the mount");
    assert!(
        seen[1].contains(&format!("f {NOBODY} {GROUP} -rw-r--r--"))
            && seen[1].contains(&format!("d {NOBODY} {GROUP} drwxr-sr-x")),
        "{}",
        seen[1]
    );
    // Recorded: the same after a remount.
    m.unmount();
    m.mount(&["--allow-other"]);
    let again = sh_ok(
        &m.path("runs/s/artifacts"),
        "stat -c '%n %u %g %A' f g d d/e d/e/f d/e/f/h r r/x c c/x",
    );
    assert_eq!(again, seen[1]);
}

#[test]
fn the_store_is_private_to_its_owner() {
    let Some(m) = mount("the_store_is_private_to_its_owner", &[]) else {
        return;
    };
    // Larger than INLINE_MAX, so the store has a blob file too (smaller content lives in the
    // index, checked below as well).
    sh_ok(
        &m.mnt,
        "mkdir runs/r && yes secret | head -n 15000 > runs/r/artifacts/f",
    );
    // Let the batched sync write STORE/synced, so every kind of store file exists.
    std::thread::sleep(Duration::from_millis(1500));
    let mode = std::fs::metadata(&m.store).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "store dir mode {mode:o}");

    let mut files: Vec<PathBuf> = Vec::new();
    let mut stack = vec![m.store.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    let index = m.store.join("index.sqlite");
    assert!(files.contains(&index), "{files:?}");
    // The blob of f, named by its content hash.
    let hash = root(
        "os.getxattr(a[0], 'user.artifactfs.sha256').decode()",
        &[&m.path("runs/r/artifacts/f")],
    );
    let hash = hash.strip_prefix("ok ").expect("the sha256 xattr");
    let blob = m
        .store
        .join("blobs/sha256")
        .join(&hash[..2])
        .join(&hash[2..]);
    assert!(files.contains(&blob), "{} in {files:?}", blob.display());

    // Control: nobody can list the store's parent.
    assert!(nobody("sorted(os.listdir(a[0]))", &[m.dir.path()]).contains("'store'"));
    assert_eq!(nobody("os.listdir(a[0])", &[&m.store]), "EACCES");
    assert_eq!(
        nobody("os.listdir(a[0])", &[&m.store.join("blobs")]),
        "EACCES"
    );
    assert_eq!(nobody("read(a[0])", &[&index]), "EACCES");
    assert_eq!(nobody("read(a[0])", &[&blob]), "EACCES");
    for f in &files {
        assert_eq!(
            nobody("open(a[0], 'rb').close()", &[f]),
            "EACCES",
            "nobody opening {}",
            f.display()
        );
    }
    // The blob is the content, readable by the store's owner.
    assert_eq!(root("read(a[0])[:7]", &[&blob]), "ok secret\n");

    // The commands that read the store directly say why they cannot, and show nothing.
    for cmd in [
        &["ls"][..],
        &["ls", "runs/r/artifacts"],
        &["ls", "--history", "runs/r/artifacts/f"],
        &["models", "list"],
        &["models", "show", "m"],
        &["fsck"],
        &["gc"],
    ] {
        let out = Command::new("setpriv")
            .args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
            ])
            .arg(BIN)
            .args(cmd)
            .arg("--store")
            .arg(&m.store)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd:?} as nobody succeeded");
        assert!(
            out.stdout.is_empty(),
            "{cmd:?} showed something: {:?}",
            out.stdout
        );
        assert!(
            err.contains("permission denied") && err.contains("is private to uid 0"),
            "{cmd:?}: {err}"
        );
        assert!(!err.contains("secret"), "{cmd:?}: {err}");
    }
}

#[test]
fn read_only_mount_refuses_every_change_with_erofs() {
    let Some(mut m) = mount("read_only_mount_refuses_every_change_with_erofs", &[]) else {
        return;
    };
    sh_ok(
        &m.mnt,
        "mkdir runs/r && echo one > runs/r/artifacts/a && mkdir runs/r/artifacts/empty",
    );
    m.unmount();
    m.mount(&["--read-only"]);
    let art = m.path("runs/r/artifacts");
    let a = art.join("a");
    assert_eq!(root("read(a[0])", &[&a]), "ok one\n");
    let cases: Vec<(&str, Vec<PathBuf>)> = vec![
        ("create(a[0])", vec![art.join("new")]),
        ("os.mkdir(a[0])", vec![art.join("dir")]),
        ("os.mkdir(a[0])", vec![m.path("runs/r2")]),
        ("os.unlink(a[0])", vec![a.clone()]),
        ("os.rename(a[0], a[1])", vec![a.clone(), art.join("b")]),
        ("os.chmod(a[0], 0o600)", vec![a.clone()]),
        ("os.chmod(a[0], 0o700)", vec![art.join("empty")]),
        ("os.setxattr(a[0], 'user.x', b'1')", vec![a.clone()]),
        ("os.symlink('a', a[0])", vec![art.join("link")]),
        ("os.rmdir(a[0])", vec![art.join("empty")]),
        ("os.rmdir(a[0])", vec![m.path("runs/r")]),
        ("write_open(a[0])", vec![a.clone()]),
        ("os.truncate(a[0], 0)", vec![a.clone()]),
        ("os.utime(a[0], (1, 1))", vec![a.clone()]),
        ("os.link(a[0], a[1])", vec![a.clone(), art.join("hard")]),
    ];
    let mut wrong = Vec::new();
    for (expr, args) in &cases {
        let args: Vec<&Path> = args.iter().map(PathBuf::as_path).collect();
        let got = root(expr, &args);
        if got != "EROFS" {
            wrong.push(format!("{expr} {args:?}: {got}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "not EROFS on a read-only mount:\n{}",
        wrong.join("\n")
    );
    // Nothing changed.
    assert_eq!(
        sh_ok(&art, "ls -A"),
        "a\nempty\n",
        "read-only mount changed the tree"
    );
}

/// The MLflow fixtures (tests/fixtures/mlflow, inside the repository).
fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mlflow")
        .join(name)
}

/// `artifactfs models wait` until READY.
fn wait_ready(m: &Mount, name: &str, dir: &str) {
    let out = m.cli(&["models", "wait", name, dir, "--timeout", "20"]);
    assert!(
        out.status.success(),
        "models wait {name} {dir}: {}\n{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        m.log()
    );
}

#[test]
fn aliases_point_only_at_the_same_model_and_symlinks_elsewhere_are_refused() {
    let Some(m) = mount(
        "aliases_point_only_at_the_same_model_and_symlinks_elsewhere_are_refused",
        &["--settle", "0.3"],
    ) else {
        return;
    };
    let iris = fixture("sklearn_iris");
    assert!(iris.join("MLmodel").is_file(), "fixture {}", iris.display());
    sh_ok(
        &m.mnt,
        &format!(
            "mkdir runs/r models/a models/othermodel \
             && cp -r '{0}' models/a/v1 && cp -r '{0}' models/othermodel/v1",
            iris.display()
        ),
    );
    wait_ready(&m, "a", "v1");
    wait_ready(&m, "othermodel", "v1");

    let a = m.path("models/a");
    // Another model's version: EINVAL, and no link appears.
    assert_eq!(
        root("os.symlink('../othermodel/1', a[0])", &[&a.join("@x")]),
        "EINVAL"
    );
    assert_eq!(
        root("os.symlink('../othermodel/v1', a[0])", &[&a.join("@x")]),
        "EINVAL"
    );
    assert_eq!(
        root("os.symlink('/etc/passwd', a[0])", &[&a.join("@x")]),
        "EINVAL"
    );
    assert_eq!(root("os.readlink(a[0])", &[&a.join("@x")]), "ENOENT");
    // Control: its own version is fine.
    assert_eq!(root("os.symlink('1', a[0])", &[&a.join("@x")]), "ok");
    assert_eq!(root("os.readlink(a[0])", &[&a.join("@x")]), "ok v1");

    // Symlinks anywhere else: EPERM.
    for (target, link) in [
        ("1", "runs/r/artifacts/l"),
        ("x", "runs/r/l"),
        ("x", "runs/l"),
        ("1", "models/l"),
        ("1", "models/a/v1/l"),
        ("1", "models/othermodel/v1/@y"),
        ("x", "l"),
    ] {
        assert_eq!(
            root(&format!("os.symlink({target:?}, a[0])"), &[&m.path(link)]),
            "EPERM",
            "ln -s {target} {link}"
        );
    }
}

/// Registration by reference reads the source for the caller, so it asks what the kernel would
/// ask of `cp -r`: search on every directory of the path, read on the tree. The issue's exploit
/// (a private run registered into a world-writable model name) is refused with EACCES.
#[test]
fn registration_by_reference_needs_the_rights_a_copy_needs() {
    let Some(m) = mount(
        "registration_by_reference_needs_the_rights_a_copy_needs",
        &["--allow-other", "--settle", "0.3"],
    ) else {
        return;
    };
    sh_ok(
        &m.mnt,
        &format!(
            "mkdir runs/private && cp -r '{}' runs/private/artifacts/model \
             && echo TOP-SECRET-BYTES > runs/private/artifacts/model/secret.txt \
             && chmod 600 runs/private/artifacts/model/secret.txt && chmod 700 runs/private \
             && mkdir models/pub && chmod 777 models/pub",
            fixture("sklearn_iris").display()
        ),
    );
    let register = |who: Who, dir: &str, source: &str| {
        let expr = format!("os.setxattr(a[0], 'user.artifactfs.register.{dir}', b'{source}')");
        attempt(who, &expr, &[&m.path("models/pub")])
    };
    let source = "runs/private/artifacts/model";
    // Before: the kernel refuses the direct read.
    let secret = m.path("runs/private/artifacts/model/secret.txt");
    assert_eq!(nobody("read(a[0])", &[&secret]), "EACCES");
    // The run is 0700: nothing behind it is revealed, whatever the path.
    for src in [source, "runs/private/nothing", "runs/private/artifacts"] {
        assert_eq!(register(Who::Nobody, "stolen", src), "EACCES", "{src}");
    }
    assert_eq!(
        nobody("os.stat(a[0])", &[&m.path("models/pub/stolen")]),
        "ENOENT"
    );
    assert!(
        m.log()
            .lines()
            .any(|l| l.contains("refused register /models/pub/stolen")
                && l.contains("may not search /runs/private")),
        "one log line names the refusing path:\n{}",
        m.log()
    );
    // The run searchable, one file still private: refused, naming that file.
    sh_ok(&m.mnt, "chmod 755 runs/private");
    assert_eq!(register(Who::Nobody, "stolen", source), "EACCES");
    assert!(
        m.log()
            .contains("may not read /runs/private/artifacts/model/secret.txt"),
        "{}",
        m.log()
    );
    // Group-readable for a group nobody is a member of through a supplementary group.
    sh_ok(
        &m.mnt,
        &format!("chgrp {GROUP} {source}/secret.txt && chmod 640 {source}/secret.txt"),
    );
    assert_eq!(register(Who::Nobody, "stolen", source), "EACCES");
    assert_eq!(register(Who::Member, "shared", source), "ok");
    // The version belongs to the caller and keeps the source's modes, as `cp -r` gives them.
    let copy = m.path("models/pub/shared/secret.txt");
    assert_eq!(stat_owner(&copy), format!("{NOBODY}:{NOBODY}"));
    assert_eq!(
        sh_ok(Path::new("/"), &format!("stat -c %a '{}'", copy.display())).trim(),
        "640"
    );
    assert_eq!(
        attempt(Who::Member, "read(a[0])", &[&copy]),
        "ok TOP-SECRET-BYTES\n"
    );
    // Root keeps registering what it can read anyway.
    sh_ok(
        &m.mnt,
        &format!("chmod 700 runs/private && chmod 600 {source}/secret.txt"),
    );
    assert_eq!(register(Who::Root, "byroot", source), "ok");
    // The log names paths and refusals, never content.
    assert!(!m.log().contains("TOP-SECRET"), "{}", m.log());
    assert_eq!(
        nobody("read(a[0])", &[&m.path("models/pub/byroot/secret.txt")]),
        "EACCES"
    );
}

/// The matrix's three users: the tree's owner, a member of its group (supplementary), another.
const OWNER: u32 = 4001;
const MEMBER: u32 = 4002;

/// The permission matrix: one script builds the same tree on ext4 and on the mount (as its
/// owner), then runs every operation as each user on both. `ext4` answers are the truth;
/// a registration is compared with `cp -r` of the same directory (it reads the same files).
const MATRIX_PY: &str = r#"
import errno, json, os, sys
mode, side, root = sys.argv[1], sys.argv[2], sys.argv[3]
DMODES = [0o700, 0o750, 0o755, 0o711, 0o770, 0o777]
FMODES = [0o600, 0o640, 0o644]
USERS = ["owner", "member", "other"]
base = os.path.join(root, "runs/m/artifacts")
cases = [(i, d, f) for i, (d, f) in enumerate((d, f) for d in DMODES for f in FMODES)]
def err(e):
    return errno.errorcode.get(e.errno, str(e.errno))
def attempt(fn):
    try:
        r = fn()
        return "ok" if r is None else "ok " + str(r)
    except OSError as e:
        return err(e)
def write(p, data, mode=0o644):
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    os.write(fd, data)
    os.close(fd)
if mode == "setup":
    for i, d, f in cases:
        c = os.path.join(base, f"c{i}")
        os.mkdir(c)
        write(os.path.join(c, "MLmodel"), b"flavors: {python_function: {}}\n")
        write(os.path.join(c, "f"), b"data")
        for u in USERS:
            write(os.path.join(c, f"ren_{u}"), b"r")
            write(os.path.join(c, f"del_{u}"), b"d")
        os.chmod(os.path.join(c, "f"), f)
        os.chmod(c, d)
    sys.exit(0)
user = sys.argv[4]
def read(p):
    with open(p, "rb") as fh:
        return fh.read().decode()
def write_open(p):
    os.close(os.open(p, os.O_WRONLY))
def copy_tree(c):
    # What `cp -r` needs: list and enter every directory, read every file.
    for dirpath, dirs, files in os.walk(c, onerror=lambda e: (_ for _ in ()).throw(e)):
        for n in files:
            read(os.path.join(dirpath, n))
def register(c, i):
    if side == "ext4":
        return copy_tree(c)
    os.setxattr(os.path.join(root, "models/pub"), f"user.artifactfs.register.{user}_{i}",
                os.path.relpath(c, root).encode())
out = []
for i, d, f in cases:
    c = os.path.join(base, f"c{i}")
    fp = os.path.join(c, "f")
    ops = [
        ("listdir", lambda: ",".join(sorted(os.listdir(c)))),
        ("stat", lambda: os.stat(fp) and None),
        ("read", lambda: read(fp)),
        ("open for writing", lambda: write_open(fp)),
        ("create", lambda: write(os.path.join(c, f"new_{user}"), b"n")),
        ("mkdir", lambda: os.mkdir(os.path.join(c, f"dir_{user}"))),
        ("rename", lambda: os.rename(os.path.join(c, f"ren_{user}"), os.path.join(c, f"moved_{user}"))),
        ("unlink", lambda: os.unlink(os.path.join(c, f"del_{user}"))),
        ("chmod", lambda: os.chmod(fp, f)),
        ("register / cp -r", lambda: register(c, i)),
    ]
    for name, fn in ops:
        out.append([f"c{i} dir {d:o} file {f:o}", name, attempt(fn)])
print(json.dumps(out))
"#;

/// Runs the matrix script as `uid` (with `groups`, or none).
fn matrix(args: &[&str], uid: u32, groups: &[u32]) -> String {
    let groups = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        format!(
            "--groups={}",
            groups
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            &groups,
        ])
        .args([PYTHON, "-I", "-c", MATRIX_PY])
        .args(args)
        .current_dir("/")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "matrix {args:?} as {uid}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every operation that reads, lists, creates, renames, removes, changes modes or registers,
/// for the owner, a group member and another user, under every combination of common directory
/// and file modes, gives on the mount the answer ext4 gives (README "Security model").
#[test]
fn permission_matrix_matches_ext4() {
    let Some(m) = mount(
        "permission_matrix_matches_ext4",
        &["--allow-other", "--settle", "0.3"],
    ) else {
        return;
    };
    let ext4 = m.dir.path().join("ext4");
    // The same starting point on both: runs/m/artifacts owned by the tree's owner, and a
    // model name (on ext4 a copy destination) everyone may write to.
    std::fs::create_dir_all(ext4.join("runs/m/artifacts")).unwrap();
    sh_ok(&m.mnt, "mkdir runs/m");
    for root in [&ext4, &m.mnt] {
        sh_ok(
            root,
            &format!(
                "mkdir models/pub 2>/dev/null || mkdir -p models/pub; chmod 777 models/pub \
                 && chown {OWNER}:{OWNER} runs/m runs/m/artifacts"
            ),
        );
    }
    let users: [(&str, u32, &[u32]); 3] = [
        ("owner", OWNER, &[]),
        ("member", MEMBER, &[OWNER]),
        ("other", NOBODY, &[]),
    ];
    let mut mismatches = Vec::new();
    let mut checked = 0;
    let mut answers = std::collections::BTreeSet::new();
    let sides = [("ext4", &ext4), ("mount", &m.mnt)];
    for (side, root) in sides {
        matrix(&["setup", side, &root.to_string_lossy()], OWNER, &[]);
    }
    for (user, uid, groups) in users {
        let run = |side: &str, root: &Path| -> Vec<(String, String, String)> {
            let out = matrix(&["ops", side, &root.to_string_lossy(), user], uid, groups);
            serde_json::from_str(&out).unwrap()
        };
        let want = run("ext4", &ext4);
        let got = run("mount", &m.mnt);
        assert_eq!(want.len(), got.len());
        for ((case, op, truth), (_, _, answer)) in want.iter().zip(&got) {
            // Opening a sealed file for writing is a rewrite (only a differing write is
            // refused), so write-once changes none of these answers.
            let expected = truth.as_str();
            checked += 1;
            answers.insert(format!("{op}: {}", answer.split(' ').next().unwrap()));
            if answer != expected {
                mismatches.push(format!(
                    "{user:6} {case:24} {op:18} ext4 {truth:10} mount {answer}"
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {checked} answers differ from ext4:\n{}\nlog:\n{}",
        mismatches.len(),
        mismatches.join("\n"),
        m.log()
    );
    assert_eq!(checked, 3 * 18 * 10);
    // The matrix exercises both sides of every rule.
    for op in [
        "listdir",
        "read",
        "create",
        "rename",
        "unlink",
        "register / cp -r",
    ] {
        for answer in ["ok", "EACCES"] {
            assert!(
                answers.contains(&format!("{op}: {answer}")),
                "{op}: {answers:?}"
            );
        }
    }
}
