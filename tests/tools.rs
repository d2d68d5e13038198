//! Real tools against a real mount, the way users drive it: coreutils (`cp -r`, `cp -a`, `ls`,
//! `cat`, `find`, `stat`, `dd`, `df`, `mv`, `ln`, `mkfifo`, `touch`, `truncate`), `tar`, the
//! shell's redirections and Python's `shutil`, `zipfile`, `mmap`, `tempfile` + `os.replace` and
//! `os.*xattr`. Every test asserts exit codes, errno values, bytes, hashes or listings.

mod common;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------------------------

/// The old mtime given to some source entries (2001-02-03 04:05:06 UTC).
const OLD_MTIME: i64 = 981_173_106;
/// Size of the binary file of the source tree: a few MiB, deliberately not block-aligned.
const BLOB_LEN: usize = 3 * 1024 * 1024 + 12_345;

/// Creates run `id` and returns its `artifacts/` directory.
fn new_run(m: &Mount, id: &str) -> PathBuf {
    fs::create_dir(m.path(&format!("runs/{id}"))).unwrap();
    let art = m.path(&format!("runs/{id}/artifacts"));
    assert!(art.is_dir(), "mkdir runs/{id} did not create artifacts/");
    art
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a shell command that must FAIL; returns its stderr.
fn sh_fail(cwd: &Path, script: &str) -> String {
    let out = sh(cwd, script);
    assert!(
        !out.status.success(),
        "`{script}` unexpectedly succeeded:\nstdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stderr)
}

/// Runs `python3 -c script args...` in `cwd`.
fn py(cwd: &Path, script: &str, args: &[&Path]) -> Output {
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

/// Runs a python script that must succeed; returns its stdout.
fn py_ok(cwd: &Path, script: &str, args: &[&Path]) -> String {
    let out = py(cwd, script, args);
    assert!(
        out.status.success(),
        "python failed ({}):\n{script}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs one line of python (`;`-separated statements) in `cwd`: `None` if it succeeded, else the
/// `errno` of the `OSError` it raised.
fn py_errno(cwd: &Path, stmt: &str) -> Option<i32> {
    let script = format!(
        "import os, sys, shutil\ntry:\n    {stmt}\nexcept OSError as e:\n    print(e.errno)\nelse:\n    print('ok')\n"
    );
    let out = py_ok(cwd, &script, &[]);
    match out.trim() {
        "ok" => None,
        n => Some(
            n.parse()
                .unwrap_or_else(|_| panic!("python printed {n:?} for {stmt}")),
        ),
    }
}

/// Reads a file of the mount. A file closed a moment ago may still be waiting for the kernel's
/// asynchronous RELEASE (open -> EBUSY); that window is retried briefly and reported on stderr.
fn read_settled(path: &Path) -> Vec<u8> {
    let end = Instant::now() + Duration::from_secs(3);
    let mut busy = 0;
    loop {
        match fs::read(path) {
            Ok(b) => {
                if busy > 0 {
                    eprintln!(
                        "note: {} was EBUSY {busy} time(s) right after close",
                        path.display()
                    );
                }
                return b;
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < end => {
                busy += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("read {}: {e}", path.display()),
        }
    }
}

/// Runs a shell command that must succeed within `secs`. If it hangs (a daemon thread stuck), the
/// daemon is killed so that the command and the mount are released, and the test fails saying so.
fn sh_ok_within(m: &mut Mount, cwd: &Path, script: &str, secs: u64) -> String {
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "`{script}` failed ({}):\nstdout: {}\nstderr: {}",
                out.status,
                text(&out.stdout),
                text(&out.stderr)
            );
            return text(&out.stdout);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = m.daemon_pid();
    let stack = fs::read_to_string(format!("/proc/{}/stack", child.id())).unwrap_or_default();
    // The daemon does not answer: kill it (the kernel then fails the pending request), reap the
    // command and detach the dead mount, so that nothing is left behind.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = child.wait();
    m.mark_stale();
    panic!(
        "`{script}` did not finish within {secs}s: the daemon never answered. Kernel stack:\n{stack}\nlog:\n{}",
        m.log()
    );
}

/// `user.artifactfs.sha256` of a path, read by python's `os.getxattr` (no getfattr needed).
fn xattr_sha256(path: &Path) -> String {
    py_ok(
        Path::new("/"),
        "import os, sys\nsys.stdout.write(os.getxattr(sys.argv[1], 'user.artifactfs.sha256').decode())",
        &[path],
    )
}

/// A small but varied source tree in `base/src` (outside the mount):
/// nested dirs, an empty dir, a binary file of a few MiB, an empty file, a 0600 file with an old
/// mtime, an executable script and a dozen small logs.
fn make_tree(base: &Path) -> PathBuf {
    let src = base.join("src");
    for d in ["data/nested/deeper", "logs", "emptydir", "scripts"] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    fs::write(src.join("README.txt"), "artifacts of run 1\n").unwrap();
    fs::write(src.join("empty.dat"), b"").unwrap();
    fs::write(src.join("secret.key"), "-----BEGIN KEY-----\nabc\n").unwrap();
    fs::write(src.join("data/blob.bin"), pseudo_random(1, BLOB_LEN)).unwrap();
    let csv: String = (0..500).map(|i| format!("{i},{}\n", i * i)).collect();
    fs::write(src.join("data/nested/numbers.csv"), csv).unwrap();
    fs::write(src.join("data/nested/deeper/leaf.txt"), "leaf\n").unwrap();
    fs::write(src.join("scripts/run.sh"), "#!/bin/sh\necho run\n").unwrap();
    for i in 0..12 {
        fs::write(
            src.join(format!("logs/epoch_{i:02}.log")),
            format!("epoch {i} loss {}\n", 1.0 / (i + 1) as f64),
        )
        .unwrap();
    }
    fs::set_permissions(
        src.join("scripts/run.sh"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    fs::set_permissions(src.join("secret.key"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(
        src.join("data/nested/deeper"),
        fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    // Old mtimes last, so that nothing created afterwards moves them.
    sh_ok(
        &src,
        &format!(
            "touch -m -d @{OLD_MTIME} secret.key data/nested/deeper/leaf.txt data/nested/deeper emptydir"
        ),
    );
    src
}

/// `find` listing of a tree, sorted: path, type and (files) size, plus `extra` printf fields
/// (e.g. `%m %T@`) for every entry.
fn find_listing(dir: &Path, extra: &str) -> String {
    sh_ok(
        dir,
        &format!(
            "find . \\( -type d -printf '%p d {extra}\\n' \\) -o \\( -type f -printf '%p f %s {extra}\\n' \\) \
             -o -printf '%p other\\n' | LC_ALL=C sort"
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// Copying trees in
// ---------------------------------------------------------------------------------------------

#[test]
fn cp_r_tree_then_diff_cmp_and_find() {
    let Some(m) = Mount::new("cp_r_tree_then_diff_cmp_and_find") else {
        return;
    };
    let src = make_tree(m.dir.path());
    let art = new_run(&m, "cp-r");
    sh_ok(&art, &format!("cp -r {} tree", src.display()));
    let dst = art.join("tree");

    sh_ok(m.dir.path(), &format!("diff -r src {}", dst.display()));
    sh_ok(
        m.dir.path(),
        &format!("cmp src/data/blob.bin {}/data/blob.bin", dst.display()),
    );
    assert_eq!(find_listing(&dst, ""), find_listing(&src, ""));
    assert_eq!(
        read_settled(&dst.join("data/blob.bin")),
        pseudo_random(1, BLOB_LEN)
    );
    assert_eq!(fs::metadata(dst.join("empty.dat")).unwrap().len(), 0);
    assert!(dst.join("emptydir").is_dir());
    assert_eq!(fs::read_dir(dst.join("emptydir")).unwrap().count(), 0);
    // cp -r without -p keeps the permission bits of the source (masked by the umask 022).
    assert_eq!(
        fs::metadata(dst.join("secret.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        fs::metadata(dst.join("scripts/run.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert_eq!(
        xattr_sha256(&dst.join("data/blob.bin")),
        sha256_hex(&pseudo_random(1, BLOB_LEN)),
        "content hash of the copied binary"
    );
    // A second cp -r of the same tree (a retry) succeeds and stores nothing; a changed file
    // in the source is refused.
    let blobs = stored_contents(&m.store);
    sh_ok(&art, &format!("cp -r {}/. tree/", src.display()));
    assert_eq!(stored_contents(&m.store), blobs);
    fs::write(src.join("data/blob.bin"), b"changed").unwrap();
    let again = sh(&art, &format!("cp -r {}/. tree/", src.display()));
    assert!(
        !again.status.success(),
        "cp of changed bytes over a sealed file succeeded"
    );
    assert!(
        text(&again.stderr).contains("Operation not permitted"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(
        xattr_sha256(&dst.join("data/blob.bin")),
        sha256_hex(&pseudo_random(1, BLOB_LEN))
    );
    fs::write(src.join("data/blob.bin"), pseudo_random(1, BLOB_LEN)).unwrap();
    sh_ok(m.dir.path(), &format!("diff -r src {}", dst.display()));
}

#[test]
fn cp_a_tree_preserves_bytes_modes_and_mtimes() {
    let Some(m) = Mount::new("cp_a_tree_preserves_bytes_modes_and_mtimes") else {
        return;
    };
    let src = make_tree(m.dir.path());
    let art = new_run(&m, "cp-a");
    sh_ok(&art, &format!("cp -a {} tree", src.display()));
    let dst = art.join("tree");

    sh_ok(m.dir.path(), &format!("diff -r src {}", dst.display()));
    sh_ok(
        m.dir.path(),
        &format!("cmp src/data/blob.bin {}/data/blob.bin", dst.display()),
    );
    // Modes and mtimes (to the nanosecond) of every file and directory, the top one included.
    assert_eq!(find_listing(&dst, "%m %T@"), find_listing(&src, "%m %T@"));
    let key = fs::metadata(dst.join("secret.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::os::unix::fs::MetadataExt::mtime(&key), OLD_MTIME);
    let leaf_dir = fs::metadata(dst.join("data/nested/deeper")).unwrap();
    assert_eq!(leaf_dir.permissions().mode() & 0o777, 0o750);
    assert_eq!(std::os::unix::fs::MetadataExt::mtime(&leaf_dir), OLD_MTIME);
    // stat(1) agrees with find(1).
    let stat = |p: &Path| sh_ok(p, "stat -c '%a %s %Y' secret.key empty.dat data/blob.bin");
    assert_eq!(stat(&dst), stat(&src));
}

// ---------------------------------------------------------------------------------------------
// Looking at files: ls, cat, stat, find
// ---------------------------------------------------------------------------------------------

#[test]
fn ls_cat_stat_on_written_files() {
    let Some(m) = Mount::new("ls_cat_stat_on_written_files") else {
        return;
    };
    let art = new_run(&m, "look");
    sh_ok(
        &art,
        "umask 022; printf 'hello\\n' > hello.txt; mkdir sub; printf 'abc' > sub/abc.txt",
    );
    sh_ok(&art, "cat hello.txt hello.txt > twice.txt");
    sh_ok(
        &art,
        &format!("chmod 640 sub/abc.txt && touch -m -d @{OLD_MTIME} sub/abc.txt"),
    );

    assert_eq!(sh_ok(&art, "cat hello.txt"), "hello\n");
    assert_eq!(sh_ok(&art, "cat twice.txt"), "hello\nhello\n");
    assert_eq!(sh_ok(&art, "cat sub/abc.txt"), "abc");

    let ls = sh_ok(&art, "LC_ALL=C ls -ln --time-style=+%s sub");
    let line = ls
        .lines()
        .find(|l| l.ends_with(" abc.txt"))
        .unwrap_or_else(|| panic!("ls -l:\n{ls}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        f,
        [
            "-rw-r-----",
            "1",
            "0",
            "0",
            "3",
            &OLD_MTIME.to_string(),
            "abc.txt"
        ],
        "{ls}"
    );
    let ls = sh_ok(&art, "LC_ALL=C ls -l");
    let names: Vec<&str> = ls
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().last().unwrap())
        .collect();
    assert_eq!(names, ["hello.txt", "sub", "twice.txt"], "{ls}");
    let fields = |name: &str| -> Vec<String> {
        let l = ls
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .unwrap_or_else(|| panic!("{ls}"));
        l.split_whitespace().take(5).map(str::to_string).collect()
    };
    assert_eq!(
        fields("hello.txt"),
        ["-rw-r--r--", "1", "root", "root", "6"],
        "{ls}"
    );
    assert_eq!(
        fields("twice.txt"),
        ["-rw-r--r--", "1", "root", "root", "12"],
        "{ls}"
    );
    assert_eq!(
        fields("sub")[..4],
        ["drwxr-xr-x", "1", "root", "root"],
        "{ls}"
    );

    assert_eq!(
        sh_ok(&art, "stat -c '%s|%a|%F|%h|%u|%g|%b|%B' hello.txt"),
        "6|644|regular file|1|0|0|1|512\n"
    );
    assert_eq!(
        sh_ok(&art, "stat -c '%s|%a|%F|%Y' sub/abc.txt"),
        format!("3|640|regular file|{OLD_MTIME}\n")
    );
    assert_eq!(sh_ok(&art, "stat -c '%F|%h|%a' sub"), "directory|1|755\n");
    assert_eq!(sh_ok(&art, "stat -c '%F|%a' .."), "directory|755\n");
    // find: by type, name and size.
    assert_eq!(
        sh_ok(&art, "find . -type f | LC_ALL=C sort"),
        "./hello.txt\n./sub/abc.txt\n./twice.txt\n"
    );
    assert_eq!(sh_ok(&art, "find . -type d | LC_ALL=C sort"), ".\n./sub\n");
    assert_eq!(
        sh_ok(&art, "find . -name '*.txt' -size -5c"),
        "./sub/abc.txt\n"
    );
    assert_eq!(
        sh_ok(&art, "find . -type f -newermt @1000000000 | LC_ALL=C sort"),
        "./hello.txt\n./twice.txt\n"
    );
    // Missing paths are ENOENT for the tools as well.
    let err = sh_fail(&art, "LC_ALL=C cat nope.txt");
    assert!(err.contains("No such file or directory"), "{err}");
    let err = sh_fail(&art, "LC_ALL=C stat nope.txt");
    assert!(err.contains("No such file or directory"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// dd
// ---------------------------------------------------------------------------------------------

#[test]
fn dd_from_generated_file_hash_matches() {
    let Some(m) = Mount::new("dd_from_generated_file_hash_matches") else {
        return;
    };
    let art = new_run(&m, "dd");
    let src = m.dir.path().join("random.bin");
    let bytes = pseudo_random(7, 5 * 1024 * 1024 + 17);
    fs::write(&src, &bytes).unwrap();

    let s = src.display();
    sh_ok(
        &art,
        &format!("dd if={s} of=four.bin bs=1M count=4 status=none"),
    );
    sh_ok(&art, &format!("dd if={s} of=all.bin bs=1M status=none"));
    sh_ok(
        &art,
        &format!("dd if={s} of=small-blocks.bin bs=4k count=300 status=none"),
    );

    let four = &bytes[..4 * 1024 * 1024];
    assert_eq!(read_settled(&art.join("four.bin")), four);
    assert_eq!(xattr_sha256(&art.join("four.bin")), sha256_hex(four));
    assert_eq!(xattr_sha256(&art.join("all.bin")), sha256_hex(&bytes));
    assert_eq!(
        xattr_sha256(&art.join("small-blocks.bin")),
        sha256_hex(&bytes[..300 * 4096])
    );
    // sha256sum reading through the mount agrees with the xattr.
    let sums = sh_ok(&art, "sha256sum four.bin all.bin");
    assert_eq!(
        sums,
        format!(
            "{}  four.bin\n{}  all.bin\n",
            sha256_hex(four),
            sha256_hex(&bytes)
        )
    );
    assert_eq!(
        fs::metadata(art.join("all.bin")).unwrap().len(),
        bytes.len() as u64
    );
    // dd of the same bytes over a sealed file: a rewrite that changes nothing.
    sh_ok(
        &art,
        &format!("dd if={s} of=four.bin bs=1M count=1 conv=notrunc status=none"),
    );
    // Other bytes: the write is refused.
    let err = sh_fail(
        &art,
        "LC_ALL=C dd if=/dev/zero of=four.bin bs=1M count=1 conv=notrunc status=none",
    );
    assert!(err.contains("Operation not permitted"), "{err}");
    // Without conv=notrunc dd truncates first: 1 MiB of the 4 written again is not the file,
    // and closing it says so.
    let err = sh_fail(
        &art,
        &format!("LC_ALL=C dd if={s} of=four.bin bs=1M count=1 status=none"),
    );
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(xattr_sha256(&art.join("four.bin")), sha256_hex(four));
}

#[test]
fn dd_seek_makes_sparse_64mib_file() {
    let Some(mut m) = Mount::new("dd_seek_makes_sparse_64mib_file") else {
        return;
    };
    let art = new_run(&m, "sparse");
    const MIB: usize = 1024 * 1024;
    let tail = pseudo_random(64, MIB);
    let tail_path = m.dir.path().join("tail.bin");
    fs::write(&tail_path, &tail).unwrap();
    let cmd = |of: &str, conv: &str| {
        format!(
            "dd if={} of={of} bs=1M seek=63 count=1 {conv} status=none",
            tail_path.display()
        )
    };
    // The same command on the local disk, as the reference.
    sh_ok(m.dir.path(), &cmd("local-sparse.bin", ""));
    let mut expected = vec![0u8; 63 * MIB];
    expected.extend_from_slice(&tail);

    // conv=notrunc: dd only seeks and writes at 63 MiB. Without it, dd first ftruncate()s the
    // new, still open file to seek*bs (a SETATTR size on a file being written).
    for (name, conv) in [("notrunc.bin", "conv=notrunc"), ("sparse.bin", "")] {
        sh_ok_within(&mut m, &art, &cmd(name, conv), 60);
        let path = art.join(name);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            64 * MIB as u64,
            "{name}"
        );
        let back = read_settled(&path);
        assert_eq!(back.len(), 64 * MIB, "{name}");
        assert!(
            back[..63 * MIB].iter().all(|&b| b == 0),
            "{name}: the hole does not read back as zeros"
        );
        assert!(back[63 * MIB..] == tail[..], "{name}: the tail differs");
        assert_eq!(xattr_sha256(&path), sha256_hex(&expected), "{name}");
        sh_ok(
            m.dir.path(),
            &format!("cmp local-sparse.bin {}", path.display()),
        );
        // Reading only the tail with dd skip=.
        let out = run(
            &art,
            "dd",
            [&format!("if={name}"), "bs=1M", "skip=63", "status=none"],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(out.stdout == tail, "{name}: dd skip=63 read another tail");
        // A read in the middle of the hole.
        let out = run(
            &art,
            "dd",
            [
                &format!("if={name}"),
                "bs=4096",
                "skip=5000",
                "count=2",
                "status=none",
            ],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(out.stdout == vec![0u8; 8192], "{name}: hole read");
    }
}

// ---------------------------------------------------------------------------------------------
// tar
// ---------------------------------------------------------------------------------------------

#[test]
fn tar_extract_into_run_and_archive_back_out() {
    let Some(m) = Mount::new("tar_extract_into_run_and_archive_back_out") else {
        return;
    };
    let base = m.dir.path();
    let src = make_tree(base);
    let art = new_run(&m, "tar");
    sh_ok(base, "tar -cf tree.tar src");
    sh_ok(
        &art,
        &format!("tar -xf {}", base.join("tree.tar").display()),
    );

    let dst = art.join("src");
    sh_ok(base, &format!("diff -r src {}", dst.display()));
    assert_eq!(find_listing(&dst, ""), find_listing(&src, ""));
    // tar (as root) restores permission bits and (whole-second) mtimes, for files and dirs.
    let stat = |p: &Path| sh_ok(p, "find . -exec stat -c '%n %F %a %Y' {} + | LC_ALL=C sort");
    assert_eq!(stat(&dst), stat(&src));

    // Archive the artifacts back out of the mount and compare again.
    sh_ok(
        &art,
        &format!("tar -cf {} src", base.join("back.tar").display()),
    );
    fs::create_dir(base.join("out")).unwrap();
    sh_ok(&base.join("out"), "tar -xf ../back.tar");
    sh_ok(base, "diff -r src out/src");
    assert_eq!(stat(&base.join("out/src")), stat(&src));
    // tar -x -k (keep old files) again over the sealed files: refused, nothing changes.
    let err = sh_fail(
        &art,
        &format!("LC_ALL=C tar -xkf {}", base.join("tree.tar").display()),
    );
    assert!(
        err.contains("README.txt: Cannot open: File exists"),
        "{err}"
    );
    sh_ok(base, &format!("diff -r src {}", dst.display()));
    // A plain tar -x of the same archive again first unlinks each file (a soft delete), then
    // creates it at its tombstone with the same bytes: it succeeds and nothing changes.
    let blobs = stored_contents(&m.store);
    sh_ok(
        &art,
        &format!("tar -xf {}", base.join("tree.tar").display()),
    );
    sh_ok(base, &format!("diff -r src {}", dst.display()));
    assert_eq!(stored_contents(&m.store), blobs);
    assert_eq!(
        py_errno(&dst, "open('README.txt', 'xb')"),
        Some(libc::EEXIST)
    );
}

// ---------------------------------------------------------------------------------------------
// Python: shutil, tempfile + os.replace, zipfile, mmap, xattrs, byte names
// ---------------------------------------------------------------------------------------------

#[test]
fn python_shutil_copy2_and_copytree() {
    let Some(m) = Mount::new("python_shutil_copy2_and_copytree") else {
        return;
    };
    let src = make_tree(m.dir.path());
    let art = new_run(&m, "shutil");
    let script = r#"
import os, shutil, sys
src, art = sys.argv[1], sys.argv[2]
shutil.copy2(os.path.join(src, 'secret.key'), os.path.join(art, 'secret.key'))
shutil.copy2(os.path.join(src, 'data', 'blob.bin'), art)
shutil.copy2(os.path.join(src, 'empty.dat'), os.path.join(art, 'empty.dat'))
shutil.copytree(src, os.path.join(art, 'tree'))
for name in ('secret.key', 'blob.bin', 'empty.dat'):
    st = os.stat(os.path.join(art, name))
    print(name, oct(st.st_mode & 0o777), st.st_size, st.st_mtime_ns)
"#;
    let out = py_ok(&art, script, &[&src, &art]);
    let st = |rel: &str| {
        let md = fs::metadata(src.join(rel)).unwrap();
        use std::os::unix::fs::MetadataExt;
        (
            md.mode() & 0o777,
            md.size(),
            md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
        )
    };
    let (mode, size, mtime) = st("secret.key");
    assert_eq!(mode, 0o600);
    let expected = format!(
        "secret.key {mode:#o} {size} {mtime}\nblob.bin {:#o} {} {}\nempty.dat {:#o} {} {}\n",
        st("data/blob.bin").0,
        st("data/blob.bin").1,
        st("data/blob.bin").2,
        st("empty.dat").0,
        st("empty.dat").1,
        st("empty.dat").2
    );
    assert_eq!(out, expected);
    sh_ok(
        &art,
        &format!(
            "cmp {}/secret.key secret.key && cmp {}/data/blob.bin blob.bin",
            src.display(),
            src.display()
        ),
    );
    sh_ok(
        m.dir.path(),
        &format!("diff -r src {}", art.join("tree").display()),
    );
    assert_eq!(
        find_listing(&art.join("tree"), "%m %T@"),
        find_listing(&src, "%m %T@")
    );
    // copy2 onto a sealed file: EPERM (open for writing with O_TRUNC).
    let e = py_errno(
        &art,
        &format!("shutil.copy2('{}/README.txt', 'secret.key')", src.display()),
    );
    assert_eq!(e, Some(libc::EPERM));
    // copytree onto an existing tree: FileExistsError.
    let e = py_errno(
        &art,
        &format!("shutil.copytree('{}', 'tree')", src.display()),
    );
    assert_eq!(e, Some(libc::EEXIST));
}

#[test]
fn python_temp_file_then_os_replace() {
    let Some(m) = Mount::new("python_temp_file_then_os_replace") else {
        return;
    };
    let art = new_run(&m, "replace");
    fs::create_dir(art.join("model")).unwrap();
    let script = r#"
import os, sys, tempfile
d = sys.argv[1]
# MLflow style: fixed temp name in the same directory, close, os.replace.
tmp, final = os.path.join(d, '.tmpXYZ'), os.path.join(d, 'MLmodel')
with open(tmp, 'wb') as f:
    f.write(b'flavors:\n  python_function: {}\n')
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, final)
# rsync style: mkstemp (O_EXCL, 0600), fchmod, os.replace.
fd, tmp2 = tempfile.mkstemp(dir=d, prefix='.model.pkl.')
os.write(fd, b'\x80\x04pickle' * 1000)
os.fchmod(fd, 0o644)
os.close(fd)
os.replace(tmp2, os.path.join(d, 'model.pkl'))
print(os.path.basename(tmp2))
"#;
    let dir = art.join("model");
    let tmp2 = py_ok(&art, script, &[&dir]).trim().to_string();
    assert!(tmp2.starts_with(".model.pkl."), "{tmp2}");

    assert_eq!(
        read_settled(&dir.join("MLmodel")),
        b"flavors:\n  python_function: {}\n"
    );
    assert_eq!(
        read_settled(&dir.join("model.pkl")),
        b"\x80\x04pickle".repeat(1000)
    );
    assert_eq!(
        fs::metadata(dir.join("model.pkl"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o644
    );
    let mut names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["MLmodel", "model.pkl"], "temp names must be gone");
    assert_eq!(py_errno(&dir, "os.stat('.tmpXYZ')"), Some(libc::ENOENT));
    // The temp names are tombstones: they take back their last content only, with or without
    // O_EXCL; anything else (even nothing) fails at close() and leaves the tombstone.
    assert_eq!(
        py_errno(&dir, "f = open('.tmpXYZ', 'wb'); f.close()"),
        Some(libc::EPERM)
    );
    assert_eq!(
        py_errno(
            &dir,
            &format!("f = open('{tmp2}', 'xb'); f.write(b'other'); f.close()")
        ),
        Some(libc::EPERM)
    );
    assert_eq!(py_errno(&dir, "os.stat('.tmpXYZ')"), Some(libc::ENOENT));
    // A second identical save (a re-run): temp file with the same bytes, os.replace onto the
    // final name: the same content, so it succeeds and the temp name goes.
    assert_eq!(
        py_errno(
            &dir,
            "f = open('.tmpDEF', 'wb'); f.write(b'flavors:\\n  python_function: {}\\n'); f.close(); os.replace('.tmpDEF', 'MLmodel')"
        ),
        None
    );
    assert_eq!(py_errno(&dir, "os.stat('.tmpDEF')"), Some(libc::ENOENT));
    // A second save over the final name is refused: os.replace onto an existing file -> EEXIST.
    assert_eq!(
        py_errno(
            &dir,
            "f = open('.tmpABC', 'wb'); f.write(b'v2'); f.close(); os.replace('.tmpABC', 'MLmodel')"
        ),
        Some(libc::EEXIST)
    );
    assert_eq!(
        read_settled(&dir.join("MLmodel")),
        b"flavors:\n  python_function: {}\n"
    );
    assert_eq!(
        read_settled(&dir.join(".tmpABC")),
        b"v2",
        "a refused rename keeps the source"
    );
}

#[test]
fn python_zipfile_writer_seeks_back_and_reads_back() {
    let Some(m) = Mount::new("python_zipfile_writer_seeks_back_and_reads_back") else {
        return;
    };
    let art = new_run(&m, "zip");
    let payload = m.dir.path().join("payload.bin");
    fs::write(&payload, pseudo_random(3, 1024 * 1024 + 3)).unwrap();
    let write = r#"
import sys, zipfile
path, payload = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as z:
    z.writestr('MLmodel', 'flavors: {}\n')
    z.write(payload, 'data/payload.bin')
    z.writestr(zipfile.ZipInfo('data/stored.txt'), b'stored ' * 1000, compress_type=zipfile.ZIP_STORED)
    with z.open('stream.txt', 'w') as member:   # streamed: sizes patched afterwards
        for i in range(2000):
            member.write(b'line %d\n' % i)
    z.writestr('empty', b'')
"#;
    let zip = art.join("model.zip");
    py_ok(&art, write, &[&zip, &payload]);
    let read = r#"
import hashlib, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    print(z.testzip())
    for name in z.namelist():
        print(name, hashlib.sha256(z.read(name)).hexdigest())
"#;
    let out = py_ok(&art, read, &[&zip]);
    let stream: Vec<u8> = (0..2000)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect();
    let expected = format!(
        "None\nMLmodel {}\ndata/payload.bin {}\ndata/stored.txt {}\nstream.txt {}\nempty {}\n",
        sha256_hex(b"flavors: {}\n"),
        sha256_hex(&pseudo_random(3, 1024 * 1024 + 3)),
        sha256_hex(&b"stored ".repeat(1000)),
        sha256_hex(&stream),
        sha256_hex(b"")
    );
    assert_eq!(out, expected);
    // The sealed zip's hash equals the hash of its bytes; appending to it ('a' mode) is refused.
    assert_eq!(xattr_sha256(&zip), sha256_hex(&read_settled(&zip)));
    assert_eq!(
        py_errno(
            &art,
            "import zipfile; z = zipfile.ZipFile('model.zip', 'a'); z.writestr('new.txt', b'x'); z.close()"
        ),
        Some(libc::EPERM)
    );
    assert_eq!(xattr_sha256(&zip), sha256_hex(&read_settled(&zip)));
}

#[test]
fn python_mmap_reads_sealed_file() {
    let Some(m) = Mount::new("python_mmap_reads_sealed_file") else {
        return;
    };
    let art = new_run(&m, "mmap");
    let bytes = pseudo_random(11, 2 * 1024 * 1024 + 1001);
    fs::write(art.join("weights.bin"), &bytes).unwrap();
    let _ = read_settled(&art.join("weights.bin"));
    let script = r#"
import hashlib, mmap, sys
with open(sys.argv[1], 'rb') as f:
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        print(len(mm), hashlib.sha256(mm[:]).hexdigest(), mm[4096:4100].hex(), mm[-3:].hex())
"#;
    let out = py_ok(&art, script, &[&art.join("weights.bin")]);
    let n = bytes.len();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(
        out,
        format!(
            "{n} {} {} {}\n",
            sha256_hex(&bytes),
            hex(&bytes[4096..4100]),
            hex(&bytes[n - 3..])
        )
    );
    // A writable descriptor on a sealed file takes only its own bytes.
    assert_eq!(
        py_errno(
            &art,
            "f = open('weights.bin', 'r+b'); f.write(b'X'); f.close()"
        ),
        Some(libc::EPERM)
    );
    assert_eq!(
        sha256_hex(&read_settled(&art.join("weights.bin"))),
        sha256_hex(&bytes)
    );
}

#[test]
fn xattr_hash_and_refused_setxattr() {
    let Some(m) = Mount::new("xattr_hash_and_refused_setxattr") else {
        return;
    };
    let art = new_run(&m, "xattr");
    sh_ok(&art, "seq 1 10000 > numbers.txt");
    let expected: String = (1..=10000).map(|i| format!("{i}\n")).collect();
    assert_eq!(read_settled(&art.join("numbers.txt")), expected.as_bytes());
    assert_eq!(
        xattr_sha256(&art.join("numbers.txt")),
        sha256_hex(expected.as_bytes())
    );
    assert_eq!(
        sh_ok(&art, "sha256sum numbers.txt | cut -d' ' -f1").trim(),
        sha256_hex(expected.as_bytes())
    );

    let list = py_ok(&art, "import os; print(os.listxattr('numbers.txt'))", &[]);
    assert_eq!(list.trim(), "['user.artifactfs.sha256']");
    let ns = "os.setxattr('numbers.txt', ";
    assert_eq!(
        py_errno(&art, &format!("{ns}'user.foo', b'x')")),
        Some(libc::ENOTSUP)
    );
    assert_eq!(
        py_errno(&art, &format!("{ns}'user.artifactfs.sha256', b'0' * 64)")),
        Some(libc::ENOTSUP)
    );
    assert_eq!(
        py_errno(
            &art,
            "os.removexattr('numbers.txt', 'user.artifactfs.sha256')"
        ),
        Some(libc::ENOTSUP)
    );
    assert_eq!(
        py_errno(&art, "os.getxattr('numbers.txt', 'user.other')"),
        Some(libc::ENODATA)
    );
    assert_eq!(
        py_errno(&art, "os.setxattr('.', 'user.foo', b'x')"),
        Some(libc::ENOTSUP)
    );
    assert_eq!(
        xattr_sha256(&art.join("numbers.txt")),
        sha256_hex(expected.as_bytes())
    );
}

#[test]
fn non_utf8_names_round_trip() {
    let Some(m) = Mount::new("non_utf8_names_round_trip") else {
        return;
    };
    let art = new_run(&m, "bytes");
    let script = r#"
import os, sys
d = os.fsencode(sys.argv[1])
os.chdir(d)
names = [b'\xff\xfe.bin', b'caf\xe9.txt', b'ok-\xc3\xa9.txt']
for i, n in enumerate(names):
    fd = os.open(n, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, n * (i + 1))
    os.close(fd)
os.mkdir(b'\x80dir')
fd = os.open(b'\x80dir/\xfe', os.O_CREAT | os.O_WRONLY, 0o644)
os.write(fd, b'inner')
os.close(fd)
os.rename(b'caf\xe9.txt', b'caf\xe9-renamed.txt')
print(sorted(os.listdir(b'.')))
print(os.listdir(b'\x80dir'))
for n in [b'\xff\xfe.bin', b'caf\xe9-renamed.txt', b'ok-\xc3\xa9.txt', b'\x80dir/\xfe']:
    with open(n, 'rb') as f:
        print(n, f.read())
try:
    fd = os.open(b'caf\xe9.txt', os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, b'not its content')
except OSError as e:
    print('recreate', e.errno)
"#;
    let out = py_ok(&art, script, &[&art]);
    let expected = format!(
        "{}\n{}\n{}\n{}\n{}\n{}\nrecreate {}\n",
        r"[b'caf\xe9-renamed.txt', b'ok-\xc3\xa9.txt', b'\x80dir', b'\xff\xfe.bin']",
        r"[b'\xfe']",
        r"b'\xff\xfe.bin' b'\xff\xfe.bin'",
        r"b'caf\xe9-renamed.txt' b'caf\xe9.txtcaf\xe9.txt'",
        r"b'ok-\xc3\xa9.txt' b'ok-\xc3\xa9.txtok-\xc3\xa9.txtok-\xc3\xa9.txt'",
        r"b'\x80dir/\xfe' b'inner'",
        libc::EPERM
    );
    assert_eq!(out, expected);
    // The same bytes through Rust's read_dir and through ls / find. (The refused re-creation of
    // café.txt is left at its tombstone by the RELEASE of python's descriptor, which the kernel
    // sends after the process has exited, without waiting for it: until then the name is a file
    // being written, and listed.)
    let names = || {
        let mut names: Vec<Vec<u8>> = fs::read_dir(&art)
            .unwrap()
            .map(|e| e.unwrap().file_name().as_bytes().to_vec())
            .collect();
        names.sort();
        names
    };
    let want: Vec<Vec<u8>> = vec![
        b"caf\xe9-renamed.txt".to_vec(),
        b"ok-\xc3\xa9.txt".to_vec(),
        b"\x80dir".to_vec(),
        b"\xff\xfe.bin".to_vec(),
    ];
    wait_until(Duration::from_secs(5), || names() == want);
    assert_eq!(names(), want);
    let find = sh(&art, "LC_ALL=C find . -type f | LC_ALL=C sort");
    assert!(find.status.success());
    assert_eq!(
        find.stdout,
        b"./caf\xe9-renamed.txt\n./ok-\xc3\xa9.txt\n./\x80dir/\xfe\n./\xff\xfe.bin\n".to_vec()
    );
    let p = art.join(std::ffi::OsStr::from_bytes(b"\xff\xfe.bin"));
    assert_eq!(read_settled(&p), b"\xff\xfe.bin");
}

#[test]
fn name_length_255_ok_256_enametoolong() {
    let Some(m) = Mount::new("name_length_255_ok_256_enametoolong") else {
        return;
    };
    let art = new_run(&m, "names");
    let n255 = "a".repeat(255);
    let n256 = "a".repeat(256);
    // 255 bytes of UTF-8 made of 2-byte characters plus one ASCII byte.
    let u255 = format!("{}x", "é".repeat(127));
    assert_eq!(u255.len(), 255);

    sh_ok(&art, &format!("echo long > {n255}"));
    sh_ok(&art, &format!("echo utf > {u255} && mkdir d{}", &n255[1..]));
    assert_eq!(read_settled(&art.join(&n255)), b"long\n");
    assert_eq!(read_settled(&art.join(&u255)), b"utf\n");
    let ls = sh_ok(&art, "ls");
    assert!(ls.lines().any(|l| l == n255), "{ls}");
    assert!(ls.lines().any(|l| l == u255), "{ls}");
    assert!(art.join(format!("d{}", &n255[1..])).is_dir());

    let err = sh_fail(&art, &format!("LC_ALL=C touch {n256}"));
    assert!(err.contains("File name too long"), "{err}");
    assert_eq!(
        py_errno(&art, &format!("open('{n256}', 'wb')")),
        Some(libc::ENAMETOOLONG)
    );
    assert_eq!(
        py_errno(&art, &format!("os.mkdir('{n256}')")),
        Some(libc::ENAMETOOLONG)
    );
    assert_eq!(
        py_errno(&art, &format!("os.stat('{n256}')")),
        Some(libc::ENAMETOOLONG)
    );
    assert_eq!(
        py_errno(&art, &format!("os.rename('{n255}', '{n256}')")),
        Some(libc::ENAMETOOLONG)
    );
    assert_eq!(
        py_errno(&art, &format!("os.mkdir('../../{n256}')")),
        Some(libc::ENAMETOOLONG)
    );
    assert_eq!(
        py_errno(&art, &format!("os.mkdir('../../{n255}')")),
        None,
        "run id of 255 bytes"
    );
    assert!(m.path(&format!("runs/{n255}/artifacts")).is_dir());
    assert!(!sh_ok(&art, "ls").lines().any(|l| l.len() > 255));
}

// ---------------------------------------------------------------------------------------------
// Shell patterns
// ---------------------------------------------------------------------------------------------

#[test]
fn shell_redirections_create_files() {
    let Some(m) = Mount::new("shell_redirections_create_files") else {
        return;
    };
    let art = new_run(&m, "shell");
    sh_ok(&art, "echo x > echo.txt");
    sh_ok(&art, "seq 1 1000 > seq.txt");
    sh_ok(&art, "exec 3>fd3.txt; echo a >&3; echo b >&3; exec 3>&-");
    sh_ok(&art, "{ echo a; seq 1 3; echo b; } > group.txt");
    sh_ok(
        &art,
        "python3 -c 'print(\"py\" * 3)' > py.txt; date -u -d @0 +%Y > date.txt",
    );
    sh_ok(&art, "touch touched");
    sh_ok(&art, "printf one >> appended.txt");
    sh_ok(&art, "echo hi | tee tee.txt > /dev/null");

    let seq: String = (1..=1000).map(|i| format!("{i}\n")).collect();
    let expect: [(&str, &[u8]); 9] = [
        ("echo.txt", b"x\n"),
        ("seq.txt", seq.as_bytes()),
        ("fd3.txt", b"a\nb\n"),
        ("group.txt", b"a\n1\n2\n3\nb\n"),
        ("py.txt", b"pypypy\n"),
        ("date.txt", b"1970\n"),
        ("touched", b""),
        ("appended.txt", b"one"),
        ("tee.txt", b"hi\n"),
    ];
    for (name, bytes) in expect {
        assert_eq!(read_settled(&art.join(name)), bytes, "{name}");
        assert_eq!(xattr_sha256(&art.join(name)), sha256_hex(bytes), "{name}");
    }
    assert_eq!(
        sh_ok(&art, "ls | LC_ALL=C sort"),
        "appended.txt\ndate.txt\necho.txt\nfd3.txt\ngroup.txt\npy.txt\nseq.txt\ntee.txt\ntouched\n"
    );
    // touch made an empty file that is sealed: nothing can be written to it any more.
    assert_eq!(fs::metadata(art.join("touched")).unwrap().len(), 0);
    assert_eq!(
        py_errno(&art, "f = open('touched', 'ab'); f.write(b'x'); f.close()"),
        Some(libc::EPERM)
    );
    assert_eq!(
        py_errno(
            &art,
            "fd = os.open('touched', os.O_WRONLY); os.write(fd, b'x')"
        ),
        Some(libc::EPERM)
    );
    sh_ok(&art, "touch touched");
    // wc / grep / head through the mount.
    assert_eq!(sh_ok(&art, "wc -l < seq.txt").trim(), "1000");
    assert_eq!(sh_ok(&art, "grep -c '^1' seq.txt").trim(), "112");
    assert_eq!(
        sh_ok(&art, "head -n 2 group.txt; tail -c 2 group.txt"),
        "a\n1\nb\n"
    );
}

#[test]
fn shell_refusals_on_sealed_and_tombstoned_files() {
    let Some(m) = Mount::new("shell_refusals_on_sealed_and_tombstoned_files") else {
        return;
    };
    let art = new_run(&m, "refuse");
    sh_ok(&art, "echo original > f; printf new >> appended");
    // Appending to a sealed file (whether created by > or by >>).
    let err = sh_fail(&art, "LC_ALL=C; printf more >> f");
    assert!(err.contains("Operation not permitted"), "{err}");
    let err = sh_fail(&art, "LC_ALL=C; printf more >> appended");
    assert!(err.contains("Operation not permitted"), "{err}");
    let err = sh_fail(&art, "LC_ALL=C; echo y > f");
    assert!(err.contains("Operation not permitted"), "{err}");
    let err = sh_fail(&art, "LC_ALL=C truncate -s 0 f");
    assert!(err.contains("Operation not permitted"), "{err}");
    let err = sh_fail(&art, "LC_ALL=C truncate -s 100 f");
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(read_settled(&art.join("f")), b"original\n");
    assert_eq!(read_settled(&art.join("appended")), b"new");
    // The same refusals by errno: opening for writing is allowed, changing is not.
    let put = |mode: &str, data: &str| {
        py_errno(
            &art,
            &format!("f = open('f', '{mode}'); f.write({data}); f.close()"),
        )
    };
    assert_eq!(put("ab", "b'x'"), Some(libc::EPERM));
    assert_eq!(put("wb", "b''"), Some(libc::EPERM), "truncated to nothing");
    assert_eq!(put("wb", "b'original'"), Some(libc::EPERM), "a byte short");
    assert_eq!(put("r+b", "b'O'"), Some(libc::EPERM));
    assert_eq!(put("wb", "b'original\\n'"), None, "the same bytes again");
    assert_eq!(put("r+b", "b'orig'"), None);
    assert_eq!(py_errno(&art, "open('f', 'xb')"), Some(libc::EEXIST));
    assert_eq!(py_errno(&art, "os.truncate('f', 0)"), Some(libc::EPERM));
    assert_eq!(
        py_errno(&art, "os.truncate('f', 9)"),
        None,
        "truncate to the same size is a no-op"
    );

    // rm, then writing the name again: only its last content comes back.
    sh_ok(&art, "rm f");
    assert!(!art.join("f").exists());
    let err = sh_fail(&art, "LC_ALL=C; echo z > f");
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(
        py_errno(
            &art,
            "fd = os.open('f', os.O_CREAT | os.O_WRONLY, 0o644); os.close(fd)"
        ),
        Some(libc::EPERM)
    );
    sh_fail(&art, "LC_ALL=C touch f");
    assert_eq!(sh_ok(&art, "ls"), "appended\n");
    let err = sh_fail(&art, "LC_ALL=C cat f");
    assert!(err.contains("No such file or directory"), "{err}");
    sh_ok(&art, "echo original > f");
    assert_eq!(read_settled(&art.join("f")), b"original\n");
}

#[test]
fn touch_on_sealed_file_updates_mtime_only() {
    let Some(m) = Mount::new("touch_on_sealed_file_updates_mtime_only") else {
        return;
    };
    let art = new_run(&m, "touch");
    sh_ok(&art, "echo data > done.flag");
    let _ = read_settled(&art.join("done.flag"));
    sh_ok(&art, &format!("touch -d @{OLD_MTIME} done.flag"));
    assert_eq!(
        sh_ok(&art, "stat -c '%Y %s' done.flag"),
        format!("{OLD_MTIME} 5\n")
    );
    sh_ok(&art, "chmod 444 done.flag");
    assert_eq!(sh_ok(&art, "stat -c '%a' done.flag"), "444\n");
    assert_eq!(read_settled(&art.join("done.flag")), b"data\n");
}

#[test]
fn mv_file_allowed_mv_dir_refused() {
    let Some(m) = Mount::new("mv_file_allowed_mv_dir_refused") else {
        return;
    };
    let art = new_run(&m, "mv");
    sh_ok(
        &art,
        "echo A > a; echo C > c; mkdir dir1 other; echo in > dir1/inner",
    );
    sh_ok(&art, "mv a b");
    assert_eq!(read_settled(&art.join("b")), b"A\n");
    assert!(!art.join("a").exists());
    // `a` is a tombstone now: only its last content may come back.
    let err = sh_fail(&art, "LC_ALL=C; echo again > a");
    assert!(err.contains("Operation not permitted"), "{err}");
    // (The tombstone is back once the refused writer's release, which close() does not wait
    // for, has reached the daemon and the kernel has dropped the name: a moment after.)
    assert!(wait_until(Duration::from_secs(3), || !art
        .join("a")
        .exists()));
    assert_eq!(
        py_errno(&art, "os.rename('b', 'a')"),
        Some(libc::EEXIST),
        "rename onto a tombstone"
    );
    assert_eq!(
        py_errno(&art, "os.rename('c', 'b')"),
        Some(libc::EEXIST),
        "rename onto an existing file"
    );
    // Into a subdirectory, to a fresh name.
    sh_ok(&art, "mv b other/b");
    assert_eq!(read_settled(&art.join("other/b")), b"A\n");
    assert_eq!(sh_ok(&art, "ls | LC_ALL=C sort"), "c\ndir1\nother\n");

    // Directories cannot be renamed.
    let err = sh_fail(&art, "LC_ALL=C mv dir1 dir2");
    assert!(err.contains("Operation not permitted"), "{err}");
    let err = sh_fail(&art, "LC_ALL=C mv dir1 other/");
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(
        py_errno(&art, "os.rename('dir1', 'dir2')"),
        Some(libc::EPERM)
    );
    assert!(!art.join("dir2").exists());
    assert!(!art.join("other/dir1").exists());
    assert_eq!(read_settled(&art.join("dir1/inner")), b"in\n");
}

#[test]
fn links_and_fifos_refused() {
    let Some(m) = Mount::new("links_and_fifos_refused") else {
        return;
    };
    let art = new_run(&m, "links");
    sh_ok(&art, "echo t > target");
    for cmd in [
        "ln -s target sym",
        "ln target hard",
        "mkfifo fifo",
        "ln -s /etc/passwd abs",
    ] {
        let err = sh_fail(&art, &format!("LC_ALL=C {cmd}"));
        assert!(err.contains("Operation not permitted"), "{cmd}: {err}");
    }
    assert_eq!(
        py_errno(&art, "os.symlink('target', 'sym')"),
        Some(libc::EPERM)
    );
    assert_eq!(
        py_errno(&art, "os.link('target', 'hard')"),
        Some(libc::EPERM)
    );
    assert_eq!(py_errno(&art, "os.mkfifo('fifo')"), Some(libc::EPERM));
    assert_eq!(sh_ok(&art, "ls"), "target\n");
    assert_eq!(read_settled(&art.join("target")), b"t\n");
}

#[test]
fn df_reports_nonzero_size() {
    let Some(m) = Mount::new("df_reports_nonzero_size") else {
        return;
    };
    let art = new_run(&m, "df");
    for p in [&m.mnt, &art] {
        let out = sh_ok(p, "df -B1 --output=size,avail,target .");
        let line = out
            .lines()
            .nth(1)
            .unwrap_or_else(|| panic!("df printed:\n{out}"));
        let f: Vec<&str> = line.split_whitespace().collect();
        let size: u64 = f[0].parse().unwrap();
        let avail: u64 = f[1].parse().unwrap();
        assert!(size > 0, "{out}");
        assert!(avail <= size, "{out}");
        assert_eq!(f[2], m.mnt.to_str().unwrap(), "{out}");
    }
    let out = sh_ok(&m.mnt, "df -h .");
    assert!(out.lines().count() == 2, "{out}");
    let st = sh_ok(&m.mnt, "stat -f -c '%b %S %l' .");
    let f: Vec<u64> = st.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert!(f[0] > 0 && f[1] > 0, "{st}");
    assert!(f[2] >= 255, "max name length {st}");
}
