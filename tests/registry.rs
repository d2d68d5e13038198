//! The model registry against a real mount, driven by real tools: `cp -r` of real MLflow model
//! directories, `ln -sfn` / `rm` / `readlink` for aliases, `ls -l` for the registry links,
//! python's `os.getxattr` for a version's status, and the `artifactfs models …` CLI.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::Duration;

use common::*;

const SETTLE: &[&str] = &["--settle", "0.3"];

/// The MLflow fixtures (tests/fixtures/mlflow, inside the repository).
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mlflow")
}

fn fixture(name: &str) -> String {
    fixtures().join(name).to_string_lossy().into_owned()
}

/// Quotes a string for bash.
fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// An extended attribute read by python's `os.getxattr`: `Ok(value)` or `Err(errno)`.
fn xattr(path: &Path, name: &str) -> Result<String, i32> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import os, sys\n\
             try:\n    sys.stdout.write(os.getxattr(sys.argv[1], sys.argv[2]).decode())\n\
             except OSError as e:\n    sys.stdout.write('errno=%d' % e.errno); sys.exit(3)",
        )
        .arg(path)
        .arg(name)
        .output()
        .unwrap();
    let s = text(&out.stdout);
    match out.status.code() {
        Some(0) => Ok(s),
        Some(3) => Err(s.trim_start_matches("errno=").parse().unwrap()),
        _ => panic!("python getxattr {}: {}", path.display(), describe(&out)),
    }
}

fn status(path: &Path) -> Result<String, i32> {
    xattr(path, "user.artifactfs.status")
}

/// Polls the status xattr of `path` until it is `want`.
fn wait_status(path: &Path, want: &str, timeout: Duration) -> bool {
    wait_until(timeout, || status(path).as_deref() == Ok(want))
}

/// `artifactfs models wait <name> <dir> --timeout <s>`: (exit code, stdout).
fn models_wait(m: &Mount, name: &str, dir: &str, timeout: u32) -> (i32, String) {
    let out = m.cli(&[
        "models",
        "wait",
        name,
        dir,
        "--timeout",
        &timeout.to_string(),
        // Drafts here settle in 0.3 s; a failure that lasts 1 s is final.
        "--grace",
        "1",
    ]);
    (out.status.code().unwrap_or(-1), text(&out.stdout))
}

/// `models wait` must end in READY (exit 0); returns the version number it printed.
fn wait_ready(m: &Mount, name: &str, dir: &str) -> u64 {
    let (code, out) = models_wait(m, name, dir, 20);
    assert_eq!(
        code,
        0,
        "models wait {name} {dir}: {out}\nxattrs: status={:?} message={:?}\nlog:\n{}",
        status(&m.path(&format!("models/{name}/{dir}"))),
        xattr(
            &m.path(&format!("models/{name}/{dir}")),
            "user.artifactfs.message"
        ),
        m.log()
    );
    out.trim()
        .strip_prefix("READY version ")
        .unwrap_or_else(|| panic!("models wait printed {out:?}"))
        .parse()
        .unwrap()
}

/// The registry links of `ls -l DIR`: name -> target.
fn ls_links(cwd: &Path, dir: &str) -> BTreeMap<String, String> {
    sh_ok(cwd, &format!("ls -l {}", q(dir)))
        .lines()
        .filter(|l| l.starts_with('l'))
        .filter_map(|l| {
            let (left, target) = l.split_once(" -> ")?;
            let name = left.rsplit(' ').next()?;
            Some((name.to_string(), target.to_string()))
        })
        .collect()
}

fn ls_names(cwd: &Path, dir: &str) -> Vec<String> {
    sh_ok(cwd, &format!("ls -A {}", q(dir)))
        .lines()
        .map(str::to_string)
        .collect()
}

fn readlink(cwd: &Path, path: &str) -> String {
    sh_ok(cwd, &format!("readlink {}", q(path)))
        .trim()
        .to_string()
}

/// Runs a shell command that must fail with "Operation not permitted".
fn sh_eperm(cwd: &Path, script: &str) {
    let out = sh(cwd, script);
    assert!(
        !out.status.success() && text(&out.stderr).contains("Operation not permitted"),
        "`{script}` should fail with EPERM: {}",
        describe(&out)
    );
}

/// Collapses runs of spaces (the CLI aligns its columns).
fn squeeze(s: &str) -> String {
    s.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A child process killed and reaped on drop, whatever happens in the test.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn fixtures_copied_with_cp_are_accepted_or_rejected() {
    let Some(m) = Mount::with_args("fixtures_copied_with_cp_are_accepted_or_rejected", SETTLE)
    else {
        return;
    };
    let mnt = &m.mnt;
    sh_ok(mnt, "mkdir models/iris");
    let all = [
        "sklearn_iris",
        "sklearn_nosig",
        "broken_invalid_yaml",
        "broken_empty_mlmodel",
        "broken_no_flavors",
        "broken_missing_model_file",
        "broken_no_mlmodel",
    ];
    for f in all {
        sh_ok(mnt, &format!("cp -r {} models/iris/{f}", q(&fixture(f))));
    }
    // The accepted ones: models wait exits 0 with the version number.
    let mut numbers = BTreeMap::new();
    for f in ["sklearn_iris", "sklearn_nosig"] {
        let n = wait_ready(&m, "iris", f);
        let dir = m.path(&format!("models/iris/{f}"));
        assert_eq!(status(&dir).as_deref(), Ok("READY"), "{f}");
        assert_eq!(
            xattr(&dir, "user.artifactfs.version"),
            Ok(n.to_string()),
            "{f}"
        );
        let digest = xattr(&dir, "user.artifactfs.digest").unwrap();
        assert_eq!(digest.len(), 64, "{f}: digest {digest:?}");
        assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()), "{digest}");
        assert_eq!(
            xattr(&dir, "user.artifactfs.message"),
            Err(libc::ENODATA),
            "{f}"
        );
        numbers.insert(n, f);
    }
    assert_eq!(
        numbers.keys().copied().collect::<Vec<_>>(),
        [1, 2],
        "{numbers:?}"
    );
    // The rejected ones: models wait exits 1 and prints the message.
    for (f, why) in [
        ("broken_invalid_yaml", "not valid YAML"),
        ("broken_empty_mlmodel", "empty"),
        ("broken_no_flavors", "flavors"),
        ("broken_missing_model_file", "model.pkl"),
    ] {
        let (code, out) = models_wait(&m, "iris", f, 20);
        assert_eq!(code, 1, "models wait iris {f}: {out}");
        assert!(
            out.starts_with("FAILED: ") && out.contains(why),
            "{f}: {out}"
        );
        let dir = m.path(&format!("models/iris/{f}"));
        assert_eq!(status(&dir).as_deref(), Ok("FAILED"), "{f}");
        let msg = xattr(&dir, "user.artifactfs.message").unwrap();
        assert!(msg.contains(why), "{f}: message {msg:?} lacks {why:?}");
        assert_eq!(
            xattr(&dir, "user.artifactfs.version"),
            Err(libc::ENODATA),
            "{f}"
        );
    }
    // No MLmodel: not a model at all.
    let plain = m.path("models/iris/broken_no_mlmodel");
    assert_eq!(status(&plain), Err(libc::ENODATA));
    let (code, out) = models_wait(&m, "iris", "broken_no_mlmodel", 1);
    assert_eq!(code, 2, "models wait on a non-model times out: {out}");
    // The registry links, as ls -l shows them.
    let links = ls_links(mnt, "models/iris");
    let want: BTreeMap<String, String> = [
        ("1".to_string(), numbers[&1].to_string()),
        ("2".to_string(), numbers[&2].to_string()),
        ("latest".to_string(), numbers[&2].to_string()),
    ]
    .into();
    assert_eq!(links, want, "{}", sh_ok(mnt, "ls -l models/iris"));
    assert_eq!(readlink(mnt, "models/iris/1"), numbers[&1]);
    assert_eq!(readlink(mnt, "models/iris/latest"), numbers[&2]);
    // Through the links the files are there.
    let mlmodel = sh_ok(mnt, "cat models/iris/latest/MLmodel");
    assert_eq!(
        mlmodel.as_bytes(),
        fs::read(fixtures().join(numbers[&2]).join("MLmodel")).unwrap()
    );
    sh_ok(
        mnt,
        &format!(
            "cat models/iris/1/model.skops | cmp - {}",
            q(&fixture(&format!("{}/model.skops", numbers[&1])))
        ),
    );
    // Every file arrived intact (cp -r, byte for byte).
    for f in all {
        sh_ok(mnt, &format!("diff -r {} models/iris/{f}", q(&fixture(f))));
    }
}

#[test]
fn a_model_copied_directly_into_models_is_version_one() {
    let Some(m) = Mount::with_args("a_model_copied_directly_into_models_is_version_one", SETTLE)
    else {
        return;
    };
    let mnt = &m.mnt;
    sh_ok(
        mnt,
        &format!("cp -r {} models/", q(&fixture("sklearn_iris"))),
    );
    assert_eq!(wait_ready(&m, "sklearn_iris", "."), 1);
    let dir = m.path("models/sklearn_iris");
    assert_eq!(status(&dir).as_deref(), Ok("READY"));
    assert_eq!(xattr(&dir, "user.artifactfs.version").as_deref(), Ok("1"));
    let mut names = ls_names(mnt, "models/sklearn_iris");
    names.sort();
    let mut want: Vec<String> = fs::read_dir(fixtures().join("sklearn_iris"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    want.sort();
    assert_eq!(names, want, "no registry links inside a direct model");
    assert!(ls_links(mnt, "models/sklearn_iris").is_empty());
    // Nothing can be added inside.
    assert_eq!(
        errno(&File::create(dir.join("extra")).unwrap_err()),
        libc::EPERM
    );
    assert_eq!(
        errno(&fs::create_dir(dir.join("v2")).unwrap_err()),
        libc::EPERM
    );
    sh_eperm(mnt, "echo x > models/sklearn_iris/extra");
    sh_eperm(mnt, "mkdir models/sklearn_iris/v2");
    sh_eperm(
        mnt,
        &format!(
            "cp -r {} models/sklearn_iris/v2",
            q(&fixture("sklearn_nosig"))
        ),
    );
    sh_eperm(mnt, "ln -s 1 models/sklearn_iris/@champion");
    // The model is listed by the CLI.
    let list = squeeze(&text(&m.cli(&["models", "list"]).stdout));
    assert!(
        list.lines().any(|l| l.starts_with("sklearn_iris 1 1 0")),
        "{list}"
    );
}

#[test]
fn two_models_copied_in_parallel_are_both_ready() {
    let Some(m) = Mount::with_args("two_models_copied_in_parallel_are_both_ready", SETTLE) else {
        return;
    };
    let mnt = &m.mnt;
    sh_ok(mnt, "mkdir models/a models/b");
    let spawn = |src: &str, dst: &str| {
        Reaped(
            Command::new("cp")
                .arg("-r")
                .arg(fixture(src))
                .arg(dst)
                .current_dir(mnt)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    };
    let mut a = spawn("sklearn_iris", "models/a/v1");
    let mut b = spawn("sklearn_nosig", "models/b/v1");
    for (name, c) in [("a", &mut a), ("b", &mut b)] {
        let st = c.0.wait().unwrap();
        assert!(st.success(), "cp -r into models/{name}/v1: {st}");
    }
    assert_eq!(wait_ready(&m, "a", "v1"), 1);
    assert_eq!(wait_ready(&m, "b", "v1"), 1);
    for name in ["a", "b"] {
        let dir = format!("models/{name}");
        assert_eq!(
            ls_links(mnt, &dir),
            BTreeMap::from([
                ("1".to_string(), "v1".to_string()),
                ("latest".to_string(), "v1".to_string())
            ])
        );
        sh_ok(mnt, &format!("test -s {dir}/latest/MLmodel"));
    }
    sh_ok(
        mnt,
        &format!("diff -r {} models/a/v1", q(&fixture("sklearn_iris"))),
    );
    sh_ok(
        mnt,
        &format!("diff -r {} models/b/v1", q(&fixture("sklearn_nosig"))),
    );
}

/// The python writer of `a_slow_writer_fails_provisionally_then_becomes_ready`: writes MLmodel
/// and the model file, says "paused", waits for a line on stdin, then writes the rest; after the
/// first of the rest it prints the status it sees.
const SLOW_WRITER: &str = r#"
import os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
def put(name):
    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
put("model.skops")
put("MLmodel")
print("paused", flush=True)
sys.stdin.readline()
put("conda.yaml")
print("status after conda.yaml:", os.getxattr(dst, "user.artifactfs.status").decode(), flush=True)
for name in ["requirements.txt", "python_env.yaml", "input_example.json", "serving_input_example.json"]:
    put(name)
print("done", flush=True)
"#;

#[test]
fn a_slow_writer_fails_provisionally_then_becomes_ready() {
    let Some(m) = Mount::with_args(
        "a_slow_writer_fails_provisionally_then_becomes_ready",
        SETTLE,
    ) else {
        return;
    };
    let mnt = &m.mnt;
    sh_ok(mnt, "mkdir models/slow");
    let mut child = Reaped(
        Command::new("python3")
            .arg("-c")
            .arg(SLOW_WRITER)
            .arg(fixture("sklearn_iris"))
            .arg(m.path("models/slow/v1"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut stdin: ChildStdin = child.0.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    let read_line = |r: &mut BufReader<ChildStdout>, l: &mut String| {
        l.clear();
        r.read_line(l).unwrap();
        l.trim().to_string()
    };
    assert_eq!(read_line(&mut stdout, &mut line), "paused");
    let v1 = m.path("models/slow/v1");
    // Quiet for longer than the settle time with only MLmodel and the model file: FAILED, and the
    // message names a file MLmodel refers to that is not there (yet).
    assert!(
        wait_status(&v1, "FAILED", Duration::from_secs(10)),
        "status {:?}",
        status(&v1)
    );
    let msg = xattr(&v1, "user.artifactfs.message").unwrap();
    assert!(
        [
            "conda.yaml",
            "python_env.yaml",
            "requirements.txt",
            "input_example.json",
            "serving_input_example.json"
        ]
        .iter()
        .any(|f| msg.contains(f)),
        "message should name a missing file: {msg:?}"
    );
    let (code, out) = models_wait(&m, "slow", "v1", 5);
    assert_eq!(code, 1, "{out}");
    assert!(ls_links(mnt, "models/slow").is_empty(), "no version yet");
    // The writer resumes: PENDING again, then READY.
    writeln!(stdin, "go").unwrap();
    assert_eq!(
        read_line(&mut stdout, &mut line),
        "status after conda.yaml: PENDING"
    );
    assert_eq!(read_line(&mut stdout, &mut line), "done");
    assert!(child.0.wait().unwrap().success());
    assert_eq!(wait_ready(&m, "slow", "v1"), 1);
    assert_eq!(xattr(&v1, "user.artifactfs.message"), Err(libc::ENODATA));
    assert_eq!(readlink(mnt, "models/slow/latest"), "v1");
    sh_ok(
        mnt,
        &format!("diff -r {} models/slow/v1", q(&fixture("sklearn_iris"))),
    );
}

#[test]
fn ready_versions_are_sealed_and_failed_drafts_can_be_removed() {
    let Some(m) = Mount::with_args(
        "ready_versions_are_sealed_and_failed_drafts_can_be_removed",
        SETTLE,
    ) else {
        return;
    };
    let mnt = &m.mnt;
    sh_ok(mnt, "mkdir models/iris");
    // Registry names are reserved even before there is a version.
    sh_eperm(mnt, "mkdir models/iris/latest");
    sh_eperm(mnt, "mkdir models/iris/3");
    sh_eperm(mnt, "mkdir models/iris/@a");
    sh_ok(
        mnt,
        &format!(
            "cp -r {} models/iris/v1 && cp -r {} models/iris/bad",
            q(&fixture("sklearn_iris")),
            q(&fixture("broken_no_flavors"))
        ),
    );
    assert_eq!(wait_ready(&m, "iris", "v1"), 1);
    assert_eq!(models_wait(&m, "iris", "bad", 20).0, 1);
    // Sealed: no new file, no removal, no rename, no new dir, no rmdir.
    sh_eperm(mnt, "echo x > models/iris/v1/new");
    sh_eperm(mnt, "rm models/iris/v1/conda.yaml");
    sh_eperm(mnt, "rm -f models/iris/v1/conda.yaml");
    sh_eperm(
        mnt,
        "mv models/iris/v1/conda.yaml models/iris/v1/conda2.yaml",
    );
    sh_eperm(mnt, "mkdir models/iris/v1/sub");
    let v1 = m.path("models/iris/v1");
    assert_eq!(
        errno(&File::create(v1.join("new")).unwrap_err()),
        libc::EPERM
    );
    assert_eq!(
        errno(&fs::remove_file(v1.join("MLmodel")).unwrap_err()),
        libc::EPERM
    );
    assert_eq!(
        errno(&fs::rename(v1.join("MLmodel"), v1.join("M2")).unwrap_err()),
        libc::EPERM
    );
    assert!(!sh(mnt, "rm -r models/iris/v1").status.success());
    // Nothing changed.
    sh_ok(
        mnt,
        &format!("diff -r {} models/iris/v1", q(&fixture("sklearn_iris"))),
    );
    assert_eq!(status(&v1).as_deref(), Ok("READY"));
    assert_eq!(readlink(mnt, "models/iris/1"), "v1");
    // chmod is metadata, still allowed.
    sh_ok(mnt, "chmod 0400 models/iris/v1/MLmodel");
    // Registry names are reserved.
    sh_eperm(mnt, "mkdir models/iris/7");
    sh_eperm(mnt, "mkdir models/iris/@new");
    sh_eperm(mnt, "echo x > models/iris/12");
    sh_eperm(mnt, "rm models/iris/1");
    sh_eperm(mnt, "rm models/iris/latest");
    // The FAILED draft goes with rm -r, and its name is free again.
    sh_ok(mnt, "rm -r models/iris/bad");
    assert!(!ls_names(mnt, "models/iris").contains(&"bad".to_string()));
    sh_ok(
        mnt,
        &format!("cp -r {} models/iris/bad", q(&fixture("sklearn_nosig"))),
    );
    assert_eq!(wait_ready(&m, "iris", "bad"), 2);
    assert_eq!(readlink(mnt, "models/iris/latest"), "bad");
}

#[test]
fn aliases_are_symlinks_set_with_ln_and_the_cli() {
    let Some(m) = Mount::with_args("aliases_are_symlinks_set_with_ln_and_the_cli", SETTLE) else {
        return;
    };
    let mnt = &m.mnt;
    sh_ok(mnt, "mkdir models/iris");
    sh_ok(
        mnt,
        &format!("cp -r {} models/iris/first", q(&fixture("sklearn_iris"))),
    );
    assert_eq!(wait_ready(&m, "iris", "first"), 1);
    sh_ok(
        mnt,
        &format!("cp -r {} models/iris/second", q(&fixture("sklearn_nosig"))),
    );
    assert_eq!(wait_ready(&m, "iris", "second"), 2);

    sh_ok(mnt, "ln -sfn 1 models/iris/@champion");
    assert_eq!(readlink(mnt, "models/iris/@champion"), "first");
    sh_ok(mnt, "test -s models/iris/@champion/model.skops");
    // Moved (ln -sfn over an existing alias: temp link renamed over it).
    sh_ok(mnt, "ln -sfn 2 models/iris/@champion");
    assert_eq!(readlink(mnt, "models/iris/@champion"), "second");
    let links = ls_links(mnt, "models/iris");
    assert_eq!(
        links.get("@champion").map(String::as_str),
        Some("second"),
        "{links:?}"
    );
    assert_eq!(links.len(), 4, "no temporary link left behind: {links:?}");
    // Other targets: latest, another alias, a version directory's name.
    sh_ok(mnt, "ln -sfn latest models/iris/@newest");
    assert_eq!(readlink(mnt, "models/iris/@newest"), "second");
    sh_ok(mnt, "ln -sfn @champion models/iris/@copy");
    assert_eq!(readlink(mnt, "models/iris/@copy"), "second");
    sh_ok(mnt, "rm models/iris/@newest models/iris/@copy");
    sh_ok(mnt, "ln -sfn first models/iris/@old");
    assert_eq!(readlink(mnt, "models/iris/@old"), "first");
    // Removed.
    sh_ok(mnt, "rm models/iris/@champion");
    assert!(!ls_names(mnt, "models/iris").contains(&"@champion".to_string()));
    assert!(!sh(mnt, "readlink models/iris/@champion").status.success());
    // Invalid target or name: EINVAL; nothing is created.
    for bad in [
        "ln -s 99 models/iris/@x",
        "ln -s ../other/1 models/iris/@x",
        "ln -s 1 models/iris/@latest",
        "ln -s 1 models/iris/@v3",
    ] {
        let out = sh(mnt, bad);
        assert!(
            !out.status.success() && text(&out.stderr).contains("Invalid argument"),
            "`{bad}`: {}",
            describe(&out)
        );
    }
    assert!(!ls_names(mnt, "models/iris").contains(&"@x".to_string()));
    // Symlinks elsewhere are refused.
    sh_ok(mnt, "mkdir runs/r1");
    sh_eperm(mnt, "ln -s x runs/r1/artifacts/l");
    // The CLI sets aliases through the mount.
    let out = m.cli(&["models", "alias", "iris", "prod", "1"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(readlink(mnt, "models/iris/@prod"), "first");
    let out = m.cli(&["models", "alias", "iris", "prod", "99"]);
    assert!(!out.status.success(), "alias to a missing version");
    assert_eq!(readlink(mnt, "models/iris/@prod"), "first");
    // models list: name, latest, READY versions, pending, aliases.
    let out = m.cli(&["models", "list"]);
    assert!(out.status.success(), "{}", describe(&out));
    let list = squeeze(&text(&out.stdout));
    let row = list
        .lines()
        .find(|l| l.starts_with("iris "))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(row.starts_with("iris 2 2 0"), "{row}");
    assert!(row.contains("@prod=1") && row.contains("@old=1"), "{row}");
    // models show iris 1.
    let out = m.cli(&["models", "show", "iris", "1"]);
    assert!(out.status.success(), "{}", describe(&out));
    let show = squeeze(&text(&out.stdout));
    let digest = xattr(&m.path("models/iris/first"), "user.artifactfs.digest").unwrap();
    for want in [
        "model: iris".to_string(),
        "version: 1".to_string(),
        "status: READY".to_string(),
        "directory: models/iris/first".to_string(),
        format!("digest: {digest}"),
        {
            let files: Vec<u64> = fs::read_dir(fixtures().join("sklearn_iris"))
                .unwrap()
                .map(|f| f.unwrap().metadata().unwrap().len())
                .collect();
            let total: u64 = files.iter().sum();
            format!("size: {total} bytes in {} files", files.len())
        },
        "files:".to_string(),
    ] {
        assert!(show.lines().any(|l| l == want), "no {want:?} in\n{show}");
    }
    for f in fs::read_dir(fixtures().join("sklearn_iris")).unwrap() {
        let f = f.unwrap();
        let name = f.file_name().to_string_lossy().into_owned();
        let len = f.metadata().unwrap().len();
        let hash = sha256_hex(&fs::read(f.path()).unwrap());
        let want = format!("{len} {} {name}", &hash[..16]);
        assert!(show.lines().any(|l| l == want), "no {want:?} in\n{show}");
    }
    // A version that does not exist.
    assert!(!m.cli(&["models", "show", "iris", "5"]).status.success());
}

#[test]
fn registering_a_run_model_adds_no_blobs() {
    let Some(m) = Mount::with_args("registering_a_run_model_adds_no_blobs", SETTLE) else {
        return;
    };
    let mnt = &m.mnt;
    sh_ok(mnt, "mkdir runs/r1");
    sh_ok(
        mnt,
        &format!(
            "cp -r {} runs/r1/artifacts/model",
            q(&fixture("sklearn_iris"))
        ),
    );
    let before = stored_contents(&m.store);
    assert!(before >= 7, "{before} contents");
    // By copying (dedup) ...
    sh_ok(mnt, "mkdir models/fromrun");
    sh_ok(mnt, "cp -r runs/r1/artifacts/model models/fromrun/v1");
    // ... and by reference.
    let out = m.cli(&["models", "register", "fromrun", "runs/r1/artifacts/model"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("models/fromrun/r1"),
        "{}",
        describe(&out)
    );
    let copied = wait_ready(&m, "fromrun", "v1");
    let registered = wait_ready(&m, "fromrun", "r1");
    let mut both = [copied, registered];
    both.sort();
    assert_eq!(both, [1, 2]);
    assert_eq!(stored_contents(&m.store), before, "no content added");
    // Same files, same digest.
    sh_ok(mnt, "diff -r runs/r1/artifacts/model models/fromrun/r1");
    assert_eq!(
        xattr(&m.path("models/fromrun/v1"), "user.artifactfs.digest"),
        xattr(&m.path("models/fromrun/r1"), "user.artifactfs.digest")
    );
    let show = |n: u64| {
        let out = m.cli(&["models", "show", "fromrun", &n.to_string()]);
        assert!(out.status.success(), "{}", describe(&out));
        squeeze(&text(&out.stdout))
    };
    let reg = show(registered);
    assert!(
        reg.lines().any(|l| l == "source: runs/r1/artifacts/model"),
        "{reg}"
    );
    assert!(
        reg.lines().any(|l| l == "directory: models/fromrun/r1"),
        "{reg}"
    );
    let cop = show(copied);
    assert!(
        !cop.contains("source: runs/r1/artifacts/model"),
        "the copy has no source: {cop}"
    );
    // The run's files are untouched and still readable.
    sh_ok(
        mnt,
        &format!(
            "diff -r {} runs/r1/artifacts/model",
            q(&fixture("sklearn_iris"))
        ),
    );
    // Registering under an existing directory name fails.
    let out = m.cli(&["models", "register", "fromrun", "runs/r1/artifacts/model"]);
    assert!(!out.status.success(), "{}", describe(&out));
}

#[test]
fn the_registry_survives_a_remount() {
    let Some(mut m) = Mount::with_args("the_registry_survives_a_remount", SETTLE) else {
        return;
    };
    sh_ok(&m.mnt, "mkdir models/iris");
    sh_ok(
        &m.mnt,
        &format!(
            "cp -r {} models/iris/a && cp -r {} models/iris/b && cp -r {} models/iris/bad",
            q(&fixture("sklearn_iris")),
            q(&fixture("sklearn_nosig")),
            q(&fixture("broken_invalid_yaml"))
        ),
    );
    let na = wait_ready(&m, "iris", "a");
    let nb = wait_ready(&m, "iris", "b");
    assert_eq!(models_wait(&m, "iris", "bad", 20).0, 1);
    sh_ok(&m.mnt, "ln -sfn 1 models/iris/@champion");
    sh_ok(
        &m.mnt,
        &format!("cp -r {} models/", q(&fixture("sklearn_nosig"))),
    );
    assert_eq!(wait_ready(&m, "sklearn_nosig", "."), 1);

    let snapshot = |m: &Mount| {
        let mut s = vec![format!("{:?}", ls_links(&m.mnt, "models/iris"))];
        for d in ["a", "b", "bad", "../sklearn_nosig"] {
            let p = m.path(&format!("models/iris/{d}"));
            for x in ["status", "version", "digest", "message"] {
                s.push(format!(
                    "{d} {x} {:?}",
                    xattr(&p, &format!("user.artifactfs.{x}"))
                ));
            }
        }
        s.push(sh_ok(&m.mnt, "cat models/iris/@champion/MLmodel"));
        s.push(squeeze(&text(&m.cli(&["models", "list"]).stdout)));
        s
    };
    let before = snapshot(&m);
    assert!(before[0].contains("@champion"), "{before:?}");
    m.unmount();
    assert!(!is_mounted(&m.mnt));
    m.mount(SETTLE);
    let after = snapshot(&m);
    assert_eq!(before, after);
    // Still sealed; numbering continues after the remount.
    sh_eperm(&m.mnt, "echo x > models/iris/a/new");
    sh_ok(
        &m.mnt,
        &format!("cp -r {} models/iris/c", q(&fixture("sklearn_iris"))),
    );
    assert_eq!(wait_ready(&m, "iris", "c"), na.max(nb) + 1);
    assert_eq!(readlink(&m.mnt, "models/iris/latest"), "c");
}

#[test]
fn ls_shows_the_links_right_after_a_version_turns_ready() {
    let Some(m) = Mount::with_args(
        "ls_shows_the_links_right_after_a_version_turns_ready",
        SETTLE,
    ) else {
        return;
    };
    let mnt = &m.mnt;
    sh_ok(mnt, "mkdir models/fresh");
    sh_ok(
        mnt,
        &format!("cp -r {} models/fresh/v1", q(&fixture("sklearn_iris"))),
    );
    // Looked up (and listed) while still PENDING: nothing there yet.
    assert_eq!(ls_names(mnt, "models/fresh"), ["v1"]);
    assert!(
        !sh(mnt, "ls -l models/fresh/latest models/fresh/1")
            .status
            .success()
    );
    assert_eq!(wait_ready(&m, "fresh", "v1"), 1);
    // Right after: no stale entries.
    let names = ls_names(mnt, "models/fresh");
    assert!(
        names.contains(&"latest".to_string()) && names.contains(&"1".to_string()),
        "{names:?}"
    );
    assert_eq!(
        ls_links(mnt, "models/fresh"),
        BTreeMap::from([
            ("1".to_string(), "v1".to_string()),
            ("latest".to_string(), "v1".to_string())
        ])
    );
    sh_ok(mnt, "ls -l models/fresh/latest models/fresh/1");
    assert_eq!(readlink(mnt, "models/fresh/latest"), "v1");
    sh_ok(mnt, "cat models/fresh/latest/MLmodel > /dev/null");
    // A second version (a longer directory name): latest moves at once.
    sh_ok(
        mnt,
        &format!(
            "cp -r {} models/fresh/second_version",
            q(&fixture("sklearn_nosig"))
        ),
    );
    assert!(!sh(mnt, "ls -l models/fresh/2").status.success());
    assert_eq!(wait_ready(&m, "fresh", "second_version"), 2);
    assert_eq!(
        ls_links(mnt, "models/fresh"),
        BTreeMap::from([
            ("1".to_string(), "v1".to_string()),
            ("2".to_string(), "second_version".to_string()),
            ("latest".to_string(), "second_version".to_string())
        ])
    );
    assert_eq!(readlink(mnt, "models/fresh/latest"), "second_version");
    assert_eq!(
        sh_ok(mnt, "cat models/fresh/latest/MLmodel").as_bytes(),
        fs::read(fixtures().join("sklearn_nosig/MLmodel")).unwrap()
    );
}

#[test]
fn parallel_copies_into_one_model_get_distinct_versions() {
    let Some(m) = Mount::with_args(
        "parallel_copies_into_one_model_get_distinct_versions",
        SETTLE,
    ) else {
        return;
    };
    let mnt = &m.mnt;
    sh_ok(mnt, "mkdir models/iris");
    // Both cp -r run at once; both versions settle in the same quiet period.
    sh_ok(
        mnt,
        &format!(
            "cp -r {} models/iris/x & cp -r {} models/iris/y & wait",
            q(&fixture("sklearn_iris")),
            q(&fixture("sklearn_nosig"))
        ),
    );
    let mut n = [wait_ready(&m, "iris", "x"), wait_ready(&m, "iris", "y")];
    n.sort();
    assert_eq!(n, [1, 2]);
    let links = ls_links(mnt, "models/iris");
    assert_eq!(links.len(), 3, "{links:?}");
    assert_eq!(links["latest"], links["2"]);
    assert_ne!(links["1"], links["2"]);
}

#[test]
fn a_draft_pending_at_unmount_is_validated_after_the_remount() {
    // A long settle time: the copy is certainly still PENDING when the store is unmounted.
    let Some(mut m) = Mount::with_args(
        "a_draft_pending_at_unmount_is_validated_after_the_remount",
        &["--settle", "30"],
    ) else {
        return;
    };
    sh_ok(&m.mnt, "mkdir models/iris");
    sh_ok(
        &m.mnt,
        &format!("cp -r {} models/iris/v1", q(&fixture("sklearn_iris"))),
    );
    assert_eq!(status(&m.path("models/iris/v1")).as_deref(), Ok("PENDING"));
    m.unmount();
    m.mount(SETTLE);
    assert_eq!(wait_ready(&m, "iris", "v1"), 1);
    assert_eq!(readlink(&m.mnt, "models/iris/latest"), "v1");
}

/// `os.setxattr` on `models/<name>` as registration by reference; `ok` or the errno's name.
fn register_xattr(m: &Mount, model: &str, dir: &str, source: &[u8]) -> String {
    let path = m.path(&format!("models/{model}"));
    let name = format!("user.artifactfs.register.{dir}");
    match setxattr(&path, &name, source).map_err(|e| e.raw_os_error().unwrap()) {
        Ok(()) => "ok".into(),
        Err(libc::EINVAL) => "EINVAL".into(),
        Err(libc::ENOENT) => "ENOENT".into(),
        Err(libc::EBUSY) => "EBUSY".into(),
        Err(libc::EEXIST) => "EEXIST".into(),
        Err(libc::EACCES) => "EACCES".into(),
        Err(other) => format!("errno {other}"),
    }
}

#[test]
fn registration_sources_must_be_model_directories_below_a_run() {
    let Some(m) = Mount::with_args(
        "registration_sources_must_be_model_directories_below_a_run",
        SETTLE,
    ) else {
        return;
    };
    sh_ok(
        &m.mnt,
        &format!(
            "mkdir runs/r1 models/x && cp -r {} runs/r1/artifacts/model \
             && cp -r {} runs/r1/artifacts/plain",
            q(&fixture("sklearn_iris")),
            q(&fixture("broken_no_mlmodel"))
        ),
    );
    assert_eq!(
        register_xattr(&m, "x", "v1", b"runs/r1/artifacts/model"),
        "ok"
    );
    wait_ready(&m, "x", "v1");
    let cases: &[(&[u8], &str)] = &[
        (b"", "EINVAL"),
        (b"runs", "EINVAL"),
        (b"runs/r1", "EINVAL"),
        (b"runs/r1/artifacts", "EINVAL"),
        (b"runs/r1/artifacts/plain", "EINVAL"),
        (b"models", "EINVAL"),
        (b"models/x", "EINVAL"),
        (b"models/x/v1", "EINVAL"),
        (b"../../etc", "ENOENT"),
        (b"/etc", "ENOENT"),
        (b"runs/r1/artifacts/model/MLmodel", "ENOENT"),
        (b"runs/r1/artifacts/../artifacts/model", "ENOENT"),
        (b"runs/r1/artifacts/model\0", "ENOENT"),
    ];
    for (i, (source, want)) in cases.iter().enumerate() {
        let dir = format!("bad{i}");
        assert_eq!(
            register_xattr(&m, "x", &dir, source),
            *want,
            "{:?}",
            String::from_utf8_lossy(source)
        );
        assert!(!m.path(&format!("models/x/{dir}")).exists());
    }
    let log = m.log();
    let says_why = log
        .lines()
        .filter(|l| l.contains("a source must be a model directory (MLmodel at its top)"))
        .count();
    assert_eq!(says_why, 8, "one log line per EINVAL:\n{log}");
    // Nothing but v1 was made, and `runs/` is untouched.
    assert_eq!(
        sh_ok(&m.mnt, "ls models/x | grep -v -e latest -e '^1$'"),
        "v1\n"
    );
    sh_ok(
        &m.mnt,
        &format!(
            "diff -r {} runs/r1/artifacts/model",
            q(&fixture("sklearn_iris"))
        ),
    );
    // The CLI on the mount answers the same.
    let out = m.cli(&["models", "register", "x", "runs/r1", "--as", "whole"]);
    assert!(!out.status.success(), "{}", describe(&out));
}

#[test]
fn registering_a_source_that_is_being_written_is_busy() {
    let Some(m) = Mount::with_args("registering_a_source_that_is_being_written_is_busy", SETTLE)
    else {
        return;
    };
    sh_ok(
        &m.mnt,
        &format!(
            "mkdir runs/r1 models/x && cp -r {} runs/r1/artifacts/model",
            q(&fixture("sklearn_iris"))
        ),
    );
    // A writer that commits (close of one fd) but keeps a dup'd one open, then waits.
    let script = "import os, sys\n\
        fd = os.open('runs/r1/artifacts/model/notes.txt', os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)\n\
        os.write(fd, b'draft')\n\
        dup = os.dup(fd)\n\
        os.close(fd)\n\
        print('committed', flush=True)\n\
        sys.stdin.readline()\n\
        os.pwrite(dup, b'final', 0)\n\
        os.close(dup)\n";
    let mut child = Reaped(
        Command::new("python3")
            .args(["-c", script])
            .current_dir(&m.mnt)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "committed\n");
    assert_eq!(
        register_xattr(&m, "x", "early", b"runs/r1/artifacts/model"),
        "EBUSY"
    );
    assert!(!m.path("models/x/early").exists());
    assert!(
        m.log().contains("notes.txt is open for writing"),
        "{}",
        m.log()
    );
    // The writer finishes: now the registration proceeds, with the sealed bytes.
    {
        let stdin = child.0.stdin.as_mut().unwrap();
        std::io::Write::write_all(stdin, b"go\n").unwrap();
    }
    assert!(child.0.wait().unwrap().success());
    assert_eq!(
        register_xattr(&m, "x", "later", b"runs/r1/artifacts/model"),
        "ok"
    );
    wait_ready(&m, "x", "later");
    assert_eq!(sh_ok(&m.mnt, "cat models/x/later/notes.txt"), "final");
}

/// Registration copies rows, not bytes, in one transaction: 10,000 files take a fraction of
/// what copying them takes, and the version holds every one of them.
#[test]
fn registering_ten_thousand_files_copies_rows_only() {
    let Some(m) = Mount::with_args("registering_ten_thousand_files_copies_rows_only", SETTLE)
    else {
        return;
    };
    sh_ok(
        &m.mnt,
        &format!(
            "mkdir runs/r1 models/big && cp -r {} runs/r1/artifacts/model",
            q(&fixture("sklearn_nosig"))
        ),
    );
    let t = std::time::Instant::now();
    sh_ok(
        &m.mnt,
        "python3 -c \"
import os
for d in range(10):
    sub = f'runs/r1/artifacts/model/extra{d}'
    os.mkdir(sub)
    for i in range(1000):
        with open(f'{sub}/f{i:04}.txt', 'w') as f:
            f.write(f'{d}-{i}')
\"",
    );
    let written = t.elapsed();
    let blobs = stored_contents(&m.store);
    let t = std::time::Instant::now();
    assert_eq!(
        register_xattr(&m, "big", "v1", b"runs/r1/artifacts/model"),
        "ok"
    );
    let registered = t.elapsed();
    eprintln!(
        "10,000 files: written through the mount in {written:.2?}, registered in {registered:.2?}"
    );
    assert_eq!(stored_contents(&m.store), blobs, "no bytes copied");
    let n = sh_ok(&m.mnt, "find models/big/v1 -type f | wc -l");
    assert_eq!(n.trim(), (10_000 + 5).to_string());
    assert_eq!(sh_ok(&m.mnt, "cat models/big/v1/extra7/f0123.txt"), "7-123");
    assert!(
        m.log().contains("(10015 entries, no bytes copied)"),
        "{}",
        m.log()
    );
    wait_ready(&m, "big", "v1");
}
