//! The path grammar of the mount: what may exist where.
//!
//! ```text
//! /                      fixed: runs/ and models/ only
//! /runs/                 one directory per run id (mkdir creates a run)
//! /runs/<id>/            a run; always has artifacts/
//! /runs/<id>/...         any tree of directories and write-once files
//! /models/               one directory per registered model (mkdir registers a name)
//! /models/<name>/         version directories, or one model copied in directly (MLmodel
//!                         at its top); numeric names, `latest` and `@…` are the registry's
//! /models/<name>/...      the model's files, until the version is READY and sealed
//! ```
//! Pure rules over names and places: no I/O, no index, no kernel. The file-system logic asks
//! these functions before it changes anything, and logs the reason they give when they refuse.

use crate::error::Refusal;
use crate::store::index::{MODELS_INO, ROOT_INO, RUNS_INO};

/// The directory every run has.
pub const ARTIFACTS: &[u8] = b"artifacts";
/// Longest name of one path component, in bytes.
pub const NAME_MAX: usize = 255;

/// Which part of the namespace an entry belongs to; stored with each index row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Zone {
    /// `/`, `runs/`, `models/`.
    Fixed = 0,
    /// `runs/<id>` itself.
    RunRoot = 1,
    /// Anything below `runs/<id>/`.
    RunTree = 2,
    /// Anything below `models/<name>/`.
    ModelTree = 3,
    /// `models/<name>` itself: a registered model.
    ModelRoot = 4,
}

/// Where a directory sits, which decides what may be created in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Root,
    Runs,
    Models,
    RunRoot,
    RunTree,
    ModelRoot,
    ModelTree,
}

/// The place of directory `ino` whose row carries `zone`.
pub fn place_of(ino: u64, zone: u8) -> Place {
    match ino {
        ROOT_INO => Place::Root,
        RUNS_INO => Place::Runs,
        MODELS_INO => Place::Models,
        _ => match zone {
            z if z == Zone::RunRoot as u8 => Place::RunRoot,
            z if z == Zone::ModelRoot as u8 => Place::ModelRoot,
            z if z == Zone::ModelTree as u8 => Place::ModelTree,
            _ => Place::RunTree,
        },
    }
}

/// A refusal with the sentence that explains it in the log.
pub type Rule<T> = Result<T, (Refusal, String)>;

fn refuse<T>(kind: Refusal, why: impl Into<String>) -> Rule<T> {
    Err((kind, why.into()))
}

/// Any component name: 1–255 bytes, no `/` or NUL, not `.` or `..`.
pub fn check_name(name: &[u8]) -> Rule<()> {
    if name.len() > NAME_MAX {
        return refuse(
            Refusal::NameTooLong,
            format!("name is {} bytes, the limit is {NAME_MAX}", name.len()),
        );
    }
    if name.is_empty() || name == b"." || name == b".." {
        return refuse(Refusal::Invalid, "empty, '.' and '..' are not names");
    }
    if name.iter().any(|&b| b == b'/' || b == 0) {
        return refuse(Refusal::Invalid, "names cannot contain '/' or NUL");
    }
    Ok(())
}

/// A run id: a name without control characters.
pub fn check_run_id(name: &[u8]) -> Rule<()> {
    check_name(name)?;
    if name.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return refuse(
            Refusal::Invalid,
            "run ids cannot contain control characters",
        );
    }
    Ok(())
}

/// May a directory `name` be created in `parent`? Returns the new directory's zone.
pub fn mkdir(parent: Place, name: &[u8]) -> Rule<Zone> {
    match parent {
        Place::Root => refuse(
            Refusal::NotPermitted,
            "nothing can be created at the root; use runs/ or models/",
        ),
        Place::Runs => check_run_id(name).map(|_| Zone::RunRoot),
        Place::RunRoot | Place::RunTree => check_name(name).map(|_| Zone::RunTree),
        Place::Models => check_model_name(name).map(|_| Zone::ModelRoot),
        Place::ModelRoot => check_version_dir_name(name).map(|_| Zone::ModelTree),
        Place::ModelTree => check_name(name).map(|_| Zone::ModelTree),
    }
}

/// May a regular file `name` be created (or renamed to) in `parent`? Returns its zone.
pub fn create_file(parent: Place, name: &[u8]) -> Rule<Zone> {
    match parent {
        Place::Root => refuse(
            Refusal::NotPermitted,
            "nothing can be created at the root; use runs/ or models/",
        ),
        Place::Runs => refuse(
            Refusal::NotPermitted,
            "runs/ holds only run directories (mkdir runs/<id>)",
        ),
        Place::RunRoot | Place::RunTree => check_name(name).map(|_| Zone::RunTree),
        Place::Models => refuse(
            Refusal::NotPermitted,
            "models/ holds only registered model directories (mkdir models/<name>, cp -r a model dir)",
        ),
        Place::ModelRoot => check_version_dir_name(name).map(|_| Zone::ModelTree),
        Place::ModelTree => check_name(name).map(|_| Zone::ModelTree),
    }
}

/// May directory `name` in `parent` be removed (it is known to be empty)?
pub fn rmdir(parent: Place, name: &[u8]) -> Rule<()> {
    match parent {
        Place::Root => refuse(Refusal::NotPermitted, "runs/ and models/ cannot be removed"),
        Place::RunRoot if name == ARTIFACTS => refuse(
            Refusal::NotPermitted,
            "every run has artifacts/; remove the run instead",
        ),
        _ => Ok(()),
    }
}

/// May a file in `parent` be unlinked (soft-deleted into a tombstone)?
pub fn unlink(parent: Place) -> Rule<()> {
    match parent {
        Place::RunRoot | Place::RunTree | Place::ModelRoot | Place::ModelTree => Ok(()),
        _ => refuse(
            Refusal::NotPermitted,
            "only files below runs/<id>/ and model drafts can be removed",
        ),
    }
}

/// A registered model name, as MLflow allows: not empty, no `/`, `:`, `%`, no `..`, no control
/// characters, at most 255 bytes, UTF-8.
pub fn check_model_name(name: &[u8]) -> Rule<()> {
    check_name(name)?;
    if name
        .iter()
        .any(|&b| b == b':' || b == b'%' || b < 0x20 || b == 0x7f)
    {
        return refuse(
            Refusal::Invalid,
            "model names cannot contain ':', '%' or control characters",
        );
    }
    if name.windows(2).any(|w| w == b"..") {
        return refuse(Refusal::Invalid, "model names cannot contain '..'");
    }
    if std::str::from_utf8(name).is_err() {
        return refuse(Refusal::Invalid, "model names must be UTF-8");
    }
    Ok(())
}

/// Names in `models/<name>/` that the registry's links use: version numbers, `latest`, `@alias`.
pub fn is_registry_name(name: &[u8]) -> bool {
    name == b"latest"
        || name.first() == Some(&b'@')
        || (!name.is_empty() && name.iter().all(u8::is_ascii_digit))
}

/// A name directly in `models/<name>/` (a version directory): not the registry's, and, like run
/// ids and model names, no control characters (the registry shows it as link target, in the
/// CLI and in the log).
fn check_version_dir_name(name: &[u8]) -> Rule<()> {
    check_name(name)?;
    if is_registry_name(name) {
        return refuse(
            Refusal::NotPermitted,
            "numeric names, 'latest' and '@...' are reserved for the registry's links in models/<name>/",
        );
    }
    if name.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return refuse(
            Refusal::Invalid,
            "names in models/<name>/ cannot contain control characters",
        );
    }
    Ok(())
}

/// The names of the temporary symlink that is then renamed over `@alias` to move it: coreutils'
/// `ln -sfn` uses `Cu` and six letters or digits, `artifactfs models alias` `.alias-<pid>`.
/// Every other plain symlink in `models/<name>/` is refused.
pub fn is_temp_link_name(name: &[u8]) -> bool {
    let coreutils = name.len() == 8
        && name.starts_with(b"Cu")
        && name[2..].iter().all(u8::is_ascii_alphanumeric);
    let cli = name
        .strip_prefix(b".alias-")
        .is_some_and(|pid| !pid.is_empty() && pid.iter().all(u8::is_ascii_digit));
    coreutils || cli
}

/// An alias name, as MLflow allows: `[A-Za-z0-9_-]`, not `latest`, not `v<digits>` (and short
/// enough that `@alias` is a valid name).
pub fn check_alias(alias: &[u8]) -> Rule<()> {
    let ok_chars = !alias.is_empty()
        && alias.len() < NAME_MAX
        && alias
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok_chars {
        return refuse(
            Refusal::Invalid,
            "aliases are 1-254 characters of [A-Za-z0-9_-]",
        );
    }
    let versionlike = alias.len() > 1
        && (alias[0] == b'v' || alias[0] == b'V')
        && alias[1..].iter().all(u8::is_ascii_digit);
    if alias.eq_ignore_ascii_case(b"latest") || versionlike {
        return refuse(Refusal::Invalid, "'latest' and v<digits> cannot be aliases");
    }
    Ok(())
}

/// Special files (symlinks, hard links, devices, FIFOs, sockets) are refused everywhere.
pub fn special_file(kind: &str) -> Rule<()> {
    refuse(
        Refusal::NotPermitted,
        format!("{kind} are not supported: only directories and regular files"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name(b"model.pkl").is_ok());
        assert!(check_name(&[b'a'; 255]).is_ok());
        assert_eq!(
            check_name(&[b'a'; 256]).unwrap_err().0,
            Refusal::NameTooLong
        );
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert_eq!(check_name(bad).unwrap_err().0, Refusal::Invalid, "{bad:?}");
        }
        // Non-UTF-8 bytes are names like any other.
        assert!(check_name(b"\xff\xfe").is_ok());
        assert_eq!(check_run_id(b"run\n1").unwrap_err().0, Refusal::Invalid);
        assert!(check_run_id("ü-run_1".as_bytes()).is_ok());
        // Version directories in models/<name>/ refuse control characters as run ids do.
        for bad in [&b"v\n1"[..], b"v\x01", b"\x7fv", b"tab\there"] {
            assert_eq!(
                mkdir(Place::ModelRoot, bad).unwrap_err().0,
                Refusal::Invalid,
                "{bad:?}"
            );
            assert_eq!(
                create_file(Place::ModelRoot, bad).unwrap_err().0,
                Refusal::Invalid,
                "{bad:?}"
            );
        }
        assert_eq!(
            mkdir(Place::ModelRoot, "v1-ü".as_bytes()).unwrap(),
            Zone::ModelTree
        );
        // Deeper inside a version, names are as free as below runs/.
        assert_eq!(mkdir(Place::ModelTree, b"a\nb").unwrap(), Zone::ModelTree);
    }

    #[test]
    fn only_the_temporary_links_of_ln_sfn_and_the_cli_are_plain_symlink_names() {
        for ok in [&b"CuTmp123"[..], b"Cuab09ZZ", b".alias-4242"] {
            assert!(is_temp_link_name(ok), "{ok:?}");
        }
        for bad in [
            &b"another"[..],
            b"CuTmp12",
            b"CuTmp1234",
            b"Cu-mp123",
            b".alias-",
            b".alias-12a",
            b"@champion",
        ] {
            assert!(!is_temp_link_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn places_decide_what_may_be_created() {
        assert_eq!(
            mkdir(Place::Root, b"x").unwrap_err().0,
            Refusal::NotPermitted
        );
        assert_eq!(mkdir(Place::Runs, b"r1").unwrap(), Zone::RunRoot);
        assert_eq!(mkdir(Place::RunRoot, b"artifacts").unwrap(), Zone::RunTree);
        assert_eq!(mkdir(Place::RunTree, b"sub").unwrap(), Zone::RunTree);
        assert_eq!(
            create_file(Place::Runs, b"f").unwrap_err().0,
            Refusal::NotPermitted
        );
        assert_eq!(
            create_file(Place::Root, b"f").unwrap_err().0,
            Refusal::NotPermitted
        );
        assert_eq!(create_file(Place::RunTree, b"f").unwrap(), Zone::RunTree);
        assert_eq!(
            create_file(Place::Models, b"f").unwrap_err().0,
            Refusal::NotPermitted
        );
        assert_eq!(
            rmdir(Place::RunRoot, ARTIFACTS).unwrap_err().0,
            Refusal::NotPermitted
        );
        assert!(rmdir(Place::RunTree, ARTIFACTS).is_ok());
        assert!(rmdir(Place::Runs, b"r1").is_ok());
        assert_eq!(
            rmdir(Place::Root, b"runs").unwrap_err().0,
            Refusal::NotPermitted
        );
        assert!(unlink(Place::RunTree).is_ok());
        assert!(unlink(Place::Runs).is_err());
    }

    #[test]
    fn place_of_fixed_and_zoned_inodes() {
        assert_eq!(place_of(ROOT_INO, 0), Place::Root);
        assert_eq!(place_of(RUNS_INO, 0), Place::Runs);
        assert_eq!(place_of(MODELS_INO, 0), Place::Models);
        assert_eq!(place_of(10, Zone::RunRoot as u8), Place::RunRoot);
        assert_eq!(place_of(11, Zone::RunTree as u8), Place::RunTree);
        assert_eq!(place_of(12, Zone::ModelTree as u8), Place::ModelTree);
        assert_eq!(place_of(13, Zone::ModelRoot as u8), Place::ModelRoot);
    }
}
