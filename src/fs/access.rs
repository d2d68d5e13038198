//! The kernel's permission check, for the paths that reach content by reference.
//!
//! The mount uses `default_permissions`: the kernel checks mode bits on every `lookup` and `open`
//! before a request reaches the daemon. Registration by reference (`user.artifactfs.register.*`,
//! `artifactfs models register`) names its source by a path the kernel never walks, so the daemon
//! applies the same rule itself: owner bits for the owner, group bits for a member of the file's
//! group (primary or supplementary), other bits for everyone else; a caller with
//! `CAP_DAC_READ_SEARCH` or `CAP_DAC_OVERRIDE` in the daemon's user namespace may read and search
//! anything (root, as the kernel lets it).

use super::{Attr, Caller, NodeKind};

/// Read permission (the `r` bit of a triple).
pub const READ: u16 = 4;
/// Search permission on a directory (the `x` bit of a triple).
pub const SEARCH: u16 = 1;

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;

/// Who a caller is for the permission check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// May read and search everything (`CAP_DAC_READ_SEARCH` / `CAP_DAC_OVERRIDE`).
    pub reads_all: bool,
}

impl Credentials {
    /// The caller's credentials: uid and gid from the request, supplementary groups and
    /// capabilities from `/proc/<pid>/status` (`pid` 0: this process). When the process is
    /// gone, cannot be seen ([`super::UNKNOWN_PID`]: outside the daemon's pid namespace) or is
    /// in another user namespace, only uid 0 keeps its privilege and no supplementary group
    /// counts: a check can only be stricter than the kernel's, never looser.
    pub fn of(caller: Caller) -> Credentials {
        if caller.pid == super::UNKNOWN_PID {
            return Credentials {
                uid: caller.uid,
                gid: caller.gid,
                groups: Vec::new(),
                reads_all: caller.uid == 0,
            };
        }
        let proc = if caller.pid == 0 {
            "/proc/self".to_string()
        } else {
            format!("/proc/{}", caller.pid)
        };
        let status = std::fs::read_to_string(format!("{proc}/status")).unwrap_or_default();
        let same_userns = match (
            std::fs::read_link(format!("{proc}/ns/user")),
            std::fs::read_link("/proc/self/ns/user"),
        ) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        let mut groups = Vec::new();
        let mut caps = 0u64;
        for line in status.lines() {
            if let Some(g) = line.strip_prefix("Groups:") {
                groups = g
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
            } else if let Some(c) = line.strip_prefix("CapEff:") {
                caps = u64::from_str_radix(c.trim(), 16).unwrap_or(0);
            }
        }
        let has = |cap: u32| caps & (1 << cap) != 0;
        let reads_all = if status.is_empty() {
            caller.uid == 0
        } else {
            same_userns && (has(CAP_DAC_READ_SEARCH) || has(CAP_DAC_OVERRIDE))
        };
        Credentials {
            uid: caller.uid,
            gid: caller.gid,
            groups: if same_userns { groups } else { Vec::new() },
            reads_all,
        }
    }

    /// Whether the caller has every permission in `want` (`READ`, `SEARCH`, or both) on an
    /// entry with attributes `attr`, as the kernel's `generic_permission` decides.
    pub fn may(&self, attr: &Attr, want: u16) -> bool {
        if self.reads_all {
            return true;
        }
        let shift = if attr.uid == self.uid {
            6
        } else if attr.gid == self.gid || self.groups.contains(&attr.gid) {
            3
        } else {
            0
        };
        let bits = (attr.perm >> shift) & 7;
        debug_assert!(want & !(READ | SEARCH) == 0);
        debug_assert!(attr.kind == NodeKind::Dir || want & SEARCH == 0);
        bits & want == want
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn attr(kind: NodeKind, perm: u16, uid: u32, gid: u32) -> Attr {
        Attr {
            ino: 9,
            generation: 0,
            kind,
            size: 0,
            perm,
            uid,
            gid,
            mtime: UNIX_EPOCH,
            atime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            nlink: 1,
            sealed: true,
            stable: true,
        }
    }

    fn user(uid: u32, gid: u32, groups: &[u32]) -> Credentials {
        Credentials {
            uid,
            gid,
            groups: groups.to_vec(),
            reads_all: false,
        }
    }

    #[test]
    fn owner_group_and_other_bits_apply_as_the_kernel_applies_them() {
        let f = attr(NodeKind::File, 0o640, 10, 20);
        assert!(user(10, 99, &[]).may(&f, READ));
        assert!(user(11, 20, &[]).may(&f, READ));
        assert!(user(11, 99, &[20]).may(&f, READ), "supplementary group");
        assert!(!user(11, 99, &[21]).may(&f, READ));
        // The owner gets the owner's bits only, even when the group's would allow more.
        let g = attr(NodeKind::File, 0o040, 10, 20);
        assert!(!user(10, 20, &[]).may(&g, READ));
        let d = attr(NodeKind::Dir, 0o711, 10, 20);
        assert!(user(12, 12, &[]).may(&d, SEARCH));
        assert!(!user(12, 12, &[]).may(&d, READ | SEARCH));
        assert!(user(10, 10, &[]).may(&d, READ | SEARCH));
        let private = attr(NodeKind::Dir, 0o700, 0, 0);
        assert!(!user(65534, 65534, &[]).may(&private, SEARCH));
        let root = Credentials {
            reads_all: true,
            ..user(0, 0, &[])
        };
        assert!(root.may(&private, READ | SEARCH));
    }

    #[test]
    fn this_process_is_read_from_proc() {
        let me = unsafe { (libc::geteuid(), libc::getegid()) };
        let c = Credentials::of(Caller {
            uid: me.0,
            gid: me.1,
            pid: 0,
        });
        assert_eq!((c.uid, c.gid), me);
        // As root (the test suite's case) the effective set holds CAP_DAC_OVERRIDE.
        if me.0 == 0 {
            assert!(c.reads_all);
        }
        // A process that does not exist: no groups, and only uid 0 keeps its privilege.
        let gone = Credentials::of(Caller {
            uid: 1000,
            gid: 1000,
            pid: u32::MAX,
        });
        assert_eq!(gone.groups, Vec::<u32>::new());
        assert!(!gone.reads_all);
        // A process the daemon cannot see (the kernel said pid 0): not this process, whose
        // privileges (root's, in the test suite) it must not borrow.
        let unseen = |uid| Credentials::of(Caller::of_request(uid, 1000, 0));
        assert_eq!(unseen(1000).groups, Vec::<u32>::new());
        assert!(!unseen(1000).reads_all);
        assert!(unseen(0).reads_all, "uid 0 keeps its privilege");
    }
}
