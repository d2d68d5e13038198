//! What the system says about mounts, for `mount` and `unmount` to explain themselves: whether
//! the FUSE device can be opened, whether this process may mount, what is mounted at a path,
//! and where else (in any mount namespace, e.g. a container's volume) a file system is still
//! mounted. Only reads `/dev/fuse`, `/proc`; mounts nothing.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::anyhow;

/// What Docker and Kubernetes need to let a container mount FUSE (named in the errors).
const PRIVILEGE_FIX: &str = "mounting FUSE needs CAP_SYS_ADMIN (root on a host, or a user \
     allowed to mount FUSE through a setuid fusermount3). In Docker: docker run --cap-add \
     SYS_ADMIN --device /dev/fuse, plus --security-opt apparmor=unconfined where AppArmor is on; \
     in Kubernetes: securityContext.capabilities.add: [SYS_ADMIN] (or privileged: true)";

/// The capability's bit number (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;

/// One line of `/proc/<pid>/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted file system (the same in every namespace it is mounted in).
    pub dev: String,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: PathBuf,
}

/// Parses a mountinfo file: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - TYPE SOURCE
/// SUPEROPTS`.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let dash = f.iter().position(|w| *w == "-")?;
            let path = |s: &str| PathBuf::from(OsStr::from_bytes(&unescape(s)));
            Some(MountEntry {
                dev: f.get(2)?.to_string(),
                mount_point: path(f.get(4)?),
                fstype: f.get(dash + 1)?.to_string(),
                source: path(f.get(dash + 2)?),
            })
        })
        .collect()
}

/// Undoes the octal escapes of /proc/mounts and mountinfo (`\040` for a space).
pub fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The file system mounted on top at `mp` in this process's mount namespace, if any.
pub fn mounted_at(mp: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|e| e.mount_point == mp)
}

/// `statfs(2)` of a path (FUSE never answers it from a cache).
pub fn statfs(path: &Path) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::uninit();
    if unsafe { libc::statfs(c.as_ptr(), buf.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Why `/dev/fuse` cannot be used, with the fix, or `None` if it opens.
pub fn fuse_device_problem() -> Option<String> {
    let err = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => return None,
        Err(e) => e,
    };
    Some(match err.raw_os_error() {
        Some(libc::ENOENT) => "there is no /dev/fuse here: the FUSE device is missing. In a \
             container, pass it in: docker run --device /dev/fuse (Kubernetes: a privileged \
             container, or a FUSE device plugin); on a host: modprobe fuse"
            .to_string(),
        Some(libc::EACCES | libc::EPERM) => format!(
            "/dev/fuse cannot be opened ({err}): in Docker pass the device with --device \
             /dev/fuse (a bind-mounted /dev/fuse is refused by the container's device rules); \
             on a host check its mode (crw-rw-rw-)"
        ),
        _ => format!("/dev/fuse cannot be opened: {err}"),
    })
}

/// Whether this process has `CAP_SYS_ADMIN` in its effective set.
pub fn has_cap_sys_admin() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// Why this process cannot mount at all, with the fix: it lacks `CAP_SYS_ADMIN` (in its own
/// user namespace, so in every namespace it could mount in) and has no `fusermount3` to mount
/// for it.
pub fn privilege_problem() -> Option<String> {
    (!has_cap_sys_admin() && !fusermount_installed()).then(|| {
        format!(
            "this process lacks CAP_SYS_ADMIN, so mount(2) would be refused, and no \
             fusermount3 is installed to mount instead: {PRIVILEGE_FIX}"
        )
    })
}

/// A `fusermount3` or `fusermount` on `PATH` (what fuser falls back to when `mount(2)` is
/// refused).
fn fusermount_installed() -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/sbin"), PathBuf::from("/bin")])
        .any(|dir| {
            ["fusermount3", "fusermount"]
                .iter()
                .any(|n| dir.join(n).exists())
        })
}

/// The error of a mount that failed, naming the missing piece and the fix. fuser tries
/// `mount(2)` and, when that is refused with `EPERM`, the setuid `fusermount3`; without one,
/// all that came back is `ENOENT` from spawning it.
pub fn explain_mount_error(err: io::Error, mp: &Path) -> anyhow::Error {
    let text = err.to_string();
    let at = mp.display();
    if text.contains("user_allow_other") {
        return anyhow!(
            "cannot mount at {at}: --allow-other by a user who is not root needs \
             user_allow_other in /etc/fuse.conf ({})",
            text.trim()
        );
    }
    if let Some(problem) = fuse_device_problem() {
        return anyhow!("cannot mount at {at}: {problem}");
    }
    if text.contains("mount()") && text.contains("EACCES") {
        return anyhow!(
            "cannot mount at {at}: mount(2) was denied (permission denied), as a security \
             module (AppArmor, SELinux) does: in Docker add --security-opt apparmor=unconfined \
             (with --cap-add SYS_ADMIN --device /dev/fuse)"
        );
    }
    let cap = has_cap_sys_admin();
    if err.kind() == io::ErrorKind::NotFound && !fusermount_installed() {
        return anyhow!(
            "cannot mount at {at}: mount(2) was refused for lack of privilege ({}), and no \
             fusermount3 is installed to mount instead: {PRIVILEGE_FIX}",
            if cap {
                "this process has CAP_SYS_ADMIN, but not over this mount namespace, or a \
                 seccomp or security profile refuses mount(2)"
            } else {
                "this process lacks CAP_SYS_ADMIN"
            }
        );
    }
    if !cap && text.contains("not permitted") {
        return anyhow!(
            "cannot mount at {at}: mount refused for lack of privilege ({}): {PRIVILEGE_FIX}",
            text.trim()
        );
    }
    anyhow::Error::new(err).context(format!("cannot mount at {at}"))
}

/// A mount of a file system found in some mount namespace.
#[derive(Debug, Clone)]
pub struct Holder {
    /// A process in that namespace (the first found).
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// The mount point as that namespace sees it.
    pub mount_point: PathBuf,
    /// Whether it is this process's own mount namespace.
    pub own_namespace: bool,
}

/// Every mount of the FUSE file system `dev` (`major:minor`) mounted from `source` (its
/// fsname: a device number is used again by a later mount once a daemon is gone) in every
/// mount namespace that has a process (each namespace read once, from its first process in
/// `/proc`).
pub fn fuse_mounts_of(dev: &str, source: &Path) -> Vec<Holder> {
    let own = std::fs::read_link("/proc/self/ns/mnt").ok();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    let mut pids: Vec<u32> = procs
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
            continue;
        };
        if !seen.insert(ns.clone()) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        for e in parse_mountinfo(&text) {
            if e.dev == dev && e.source == source && e.fstype.starts_with("fuse") {
                out.push(Holder {
                    pid,
                    comm: comm.clone(),
                    mount_point: e.mount_point,
                    own_namespace: own.as_ref() == Some(&ns),
                });
            }
        }
    }
    out
}

/// "/data (pid 123 sleep, another mount namespace)", for at most three of them.
pub fn describe(holders: &[Holder]) -> String {
    let mut parts: Vec<String> = holders
        .iter()
        .take(3)
        .map(|h| {
            format!(
                "{} ({})",
                h.mount_point.display(),
                if h.own_namespace {
                    "this mount namespace".to_string()
                } else {
                    format!("mount namespace of pid {} {}", h.pid, h.comm)
                }
            )
        })
        .collect();
    if holders.len() > 3 {
        parts.push(format!("and {} more", holders.len() - 3));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_with_optional_fields_and_escapes() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 shared:2 - fuse /var/lib/s rw\n\
                    37 35 0:52 / /m rw - fuse.artifactfs /store rw,user_id=0\n";
        let e = parse_mountinfo(text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].dev, "98:0");
        assert_eq!(e[0].mount_point, Path::new("/mnt/a b"));
        assert_eq!(e[0].fstype, "fuse");
        assert_eq!(e[0].source, Path::new("/var/lib/s"));
        assert_eq!(e[1].fstype, "fuse.artifactfs");
    }
}
