//! Where this process is: its network namespace (which keys fwmark's pins,
//! state and locks), and the bpffs and `/run` that outlive it.
//!
//! A namespace is named by the inode of its nsfs file
//! (`stat /proc/self/ns/net`, as `ip netns identify` and `lsns` do). The
//! netns cookie (`SO_NETNS_COOKIE`) is never reused, but needs Linux 5.14,
//! and fwmark supports 5.10: the inode is the key. An inode is unique among
//! live namespaces; the kernel may give a deleted namespace's inode to a
//! new one, which then adopts what fwmark left there like a restart does
//! (`fwmark run` cleans up the state of deleted namespaces first).
//!
//! `ip netns exec` gives its command a private mount namespace with a fresh
//! `/sys`, so `/sys/fs/bpf` there is not the host's. fwmark then reaches the
//! host's through `/proc/1/root` or, where that is closed, through the
//! nearest ancestor process in another mount namespace (the shell that ran
//! `ip netns exec`), and holds that directory open for its whole life.

use std::{
    fmt,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use nix::{
    fcntl::{OFlag, open},
    sys::{
        stat::{Mode, stat},
        statfs::{BPF_FS_MAGIC, statfs},
    },
};

/// The inode of the initial network namespace on kernels that give it a
/// fixed one (`PROC_NET_INIT_INO`); earlier kernels number it like any
/// other, from `0xF0000000` up.
const PROC_NET_INIT_INO: u64 = 0xEFFF_FFF9;
/// The inode of the initial pid namespace (`PROC_PID_INIT_INO`), fixed
/// since Linux 3.8.
const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;

/// The inode of the initial user namespace (`PROC_USER_INIT_INO`), fixed
/// since Linux 3.8.
const PROC_USER_INIT_INO: u64 = 0xEFFF_FFFD;

/// What decides whether a network namespace is the root one.
struct Seen {
    /// Its inode.
    inode: u64,
    /// pid 1's network namespace, where it can be read.
    init: Option<u64>,
    /// This process sees the initial pid namespace.
    initial_pid: bool,
    /// This process is in the initial user namespace.
    initial_user: bool,
    /// The namespace has an `ip netns` name.
    named: bool,
}

/// Whether `seen` is the root network namespace (see [`Netns::current`]).
fn is_root(seen: &Seen) -> bool {
    if seen.inode == PROC_NET_INIT_INO {
        return true;
    }
    match seen.init {
        Some(init) => init == seen.inode && seen.initial_pid,
        None => seen.initial_pid && seen.initial_user && !seen.named,
    }
}

/// Where `ip netns` keeps its named namespaces.
const NAMED: &str = "/run/netns";

/// A network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    /// Inode of its nsfs file.
    pub inode: u64,
    /// The host's (initial) namespace: pins and state keep the paths
    /// fwmark always used.
    pub root: bool,
}

/// The inode of a namespace file (`/proc/PID/ns/KIND`).
fn ns_inode(path: &str) -> Option<u64> {
    stat(path).ok().map(|st| st.st_ino)
}

impl Netns {
    /// This process's network namespace.
    ///
    /// It is the root one when its inode is the kernel's fixed number for
    /// the initial namespace, or when it is pid 1's and this process sees
    /// the initial pid namespace (inside `ip netns exec` pid 1 is still the
    /// host's init; in a container with its own pid namespace pid 1 is the
    /// container's, whose network namespace is not the host's).
    ///
    /// Reading `/proc/1/ns/net` takes more privilege than fwmark keeps
    /// under its systemd unit (its capabilities are not a superset of
    /// pid 1's, and it has no CAP_SYS_PTRACE). Where it cannot be read, a
    /// process in the initial pid and user namespaces counts as in the root
    /// network namespace unless that namespace has an `ip netns` name, so
    /// that the unit's daemon and an operator's `fwmark status` agree.
    pub fn current() -> std::io::Result<Netns> {
        let inode = stat("/proc/self/ns/net")
            .map_err(std::io::Error::from)?
            .st_ino;
        let root = is_root(&Seen {
            inode,
            init: ns_inode("/proc/1/ns/net"),
            initial_pid: ns_inode("/proc/self/ns/pid") == Some(PROC_PID_INIT_INO),
            initial_user: ns_inode("/proc/self/ns/user") == Some(PROC_USER_INIT_INO),
            named: !names_of(inode).is_empty(),
        });
        Ok(Netns { inode, root })
    }

    /// The path component that keys the namespace's pins and state: none
    /// for the root namespace (today's paths), `netns:INODE` for another
    /// (with a ':', which no interface name has).
    pub fn key(&self) -> Option<String> {
        (!self.root).then(|| key_of(self.inode))
    }

    /// The `ip netns` names of the namespace (bind mounts in `/run/netns`).
    pub fn names(&self) -> Vec<String> {
        names_of(self.inode)
    }
}

/// The key of a namespace that is not the root one.
pub fn key_of(inode: u64) -> String {
    format!("netns:{inode}")
}

/// The inode a key names (`netns:INODE`).
pub fn inode_of_key(key: &str) -> Option<u64> {
    key.strip_prefix("netns:")?.parse().ok()
}

/// The `ip netns` names of the namespace with this inode.
pub fn names_of(inode: u64) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NAMED) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| stat(&e.path()).is_ok_and(|st| st.st_ino == inode))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Describes a namespace for messages: `the root network namespace`, or
/// `network namespace net:[INODE] (ip netns NAME)`.
pub fn describe(root: bool, inode: u64) -> String {
    if root {
        return "the root network namespace".into();
    }
    let names = names_of(inode);
    if names.is_empty() {
        format!("network namespace net:[{inode}]")
    } else {
        format!(
            "network namespace net:[{inode}] (ip netns {})",
            names.join(", ")
        )
    }
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe(self.root, self.inode))
    }
}

/// Whether something this process can see still holds the namespace with
/// this inode: a process or thread in it, an open file of it, a bind mount
/// of it (`ip netns add`, container runtimes). `None` when this process
/// cannot see every process (it is not in the initial pid namespace), so
/// the answer would be a guess.
pub fn alive(inode: u64) -> Option<bool> {
    if ns_inode("/proc/self/ns/pid") != Some(PROC_PID_INIT_INO) {
        return None;
    }
    if ns_inode("/proc/self/ns/net") == Some(inode) {
        return Some(true);
    }
    let target = format!("net:[{inode}]");
    let mounted = ["/proc/self/mountinfo", "/proc/1/mountinfo"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .any(|text| {
            text.lines()
                .any(|l| l.split(' ').nth(3).is_some_and(|root| root == target))
        });
    if mounted {
        return Some(true);
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return None;
    };
    let links = |dir: PathBuf| -> bool {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == target.as_str())
            })
        })
    };
    for proc in procs.flatten() {
        if !proc
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let tasks = std::fs::read_dir(proc.path().join("task"));
        for task in tasks.into_iter().flatten().flatten() {
            if ns_inode(&task.path().join("ns/net").to_string_lossy()) == Some(inode) {
                return Some(true);
            }
        }
        if links(proc.path().join("fd")) {
            return Some(true);
        }
    }
    Some(false)
}

/// The file systems that hold fwmark's pins and state.
#[derive(Debug)]
pub struct Roots {
    /// The directory bpffs is mounted on (`/sys/fs/bpf`, or the host's
    /// through an open directory).
    pub bpffs: PathBuf,
    /// The directory of runtime state (`/run`, or the host's).
    pub run: PathBuf,
    /// How the host's file systems are reached when they are not this
    /// mount namespace's own: `/proc/PID/root`.
    pub via: Option<String>,
    _root: Option<OwnedFd>,
}

/// bpffs's mount point in a mount namespace.
pub const BPFFS: &str = "sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|st| st.filesystem_type() == BPF_FS_MAGIC)
}

/// The parent of a process (`/proc/PID/stat`'s fourth field).
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// Processes whose root may show a lasting bpffs when this mount namespace
/// has none: pid 1, then this process's ancestors, nearest first.
fn candidates() -> Vec<u32> {
    let mut pids = vec![1];
    let mut pid = std::process::id();
    while let Some(p) = parent(pid) {
        if p <= 1 || pids.contains(&p) {
            break;
        }
        pids.push(p);
        pid = p;
    }
    pids
}

/// The bpffs of another mount namespace (pid 1's, or an ancestor's) when
/// this one has none at `/sys/fs/bpf`; the process and its root directory,
/// opened.
fn foreign_bpffs() -> Option<(u32, OwnedFd)> {
    let ours = ns_inode("/proc/self/ns/mnt");
    candidates().into_iter().find_map(|pid| {
        if ns_inode(&format!("/proc/{pid}/ns/mnt")) == ours && ours.is_some() {
            return None;
        }
        let root = format!("/proc/{pid}/root");
        if !is_bpffs(&Path::new(&root).join(BPFFS)) {
            return None;
        }
        let fd = open(
            root.as_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        Some((pid, fd))
    })
}

/// Whether this process's mount namespace outlives it as the host's does:
/// it is pid 1's, or (pid 1's hidden) every ancestor's.
pub fn mount_ns_lasting() -> bool {
    let ours = ns_inode("/proc/self/ns/mnt");
    match ns_inode("/proc/1/ns/mnt") {
        Some(init) => ours == Some(init),
        None => candidates()
            .into_iter()
            .skip(1)
            .all(|pid| ns_inode(&format!("/proc/{pid}/ns/mnt")).is_none_or(|m| Some(m) == ours)),
    }
}

static ROOTS: OnceLock<Roots> = OnceLock::new();

/// Where the pins and state live for this process, found once: this mount
/// namespace's own `/sys/fs/bpf` and `/run` when it has bpffs there (or
/// nothing else has: [`crate::preflight::ensure_bpffs`] mounts one), else
/// the host's.
pub fn roots() -> &'static Roots {
    ROOTS.get_or_init(|| {
        let own = Roots {
            bpffs: Path::new("/").join(BPFFS),
            run: PathBuf::from("/run"),
            via: None,
            _root: None,
        };
        if is_bpffs(&own.bpffs) {
            return own;
        }
        match foreign_bpffs() {
            Some((pid, fd)) => {
                let base = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
                Roots {
                    bpffs: base.join(BPFFS),
                    run: base.join("run"),
                    via: Some(format!("/proc/{pid}/root")),
                    _root: Some(fd),
                }
            }
            None => own,
        }
    })
}

impl Roots {
    /// A path under these roots as an operator finds it: the host's
    /// `/sys/fs/bpf/...` or `/run/...`, not `/proc/self/fd/N/...`.
    pub fn shown(&self, path: &Path) -> String {
        if let Some(base) = self
            .bpffs
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            && self.via.is_some()
            && let Ok(rest) = path.strip_prefix(base)
        {
            return format!("/{} (the host's)", rest.display());
        }
        path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::{PROC_NET_INIT_INO, Seen, is_root};

    #[test]
    fn the_root_namespace_is_found_with_and_without_pid_1s() {
        let seen = |inode, init, initial_pid, initial_user, named| Seen {
            inode,
            init,
            initial_pid,
            initial_user,
            named,
        };
        // The kernel's fixed number (6.18) decides alone.
        assert!(is_root(&seen(PROC_NET_INIT_INO, None, false, false, true)));
        // pid 1's namespace, readable: equal in the initial pid namespace.
        assert!(is_root(&seen(7, Some(7), true, true, false)));
        assert!(!is_root(&seen(7, Some(8), true, true, false)));
        assert!(
            !is_root(&seen(7, Some(7), false, true, false)),
            "a container's pid 1"
        );
        // Unreadable (a systemd unit's reduced capabilities): the host's
        // namespaces, unless `ip netns` names it or a container's.
        assert!(is_root(&seen(7, None, true, true, false)));
        assert!(!is_root(&seen(7, None, true, true, true)), "ip netns exec");
        assert!(
            !is_root(&seen(7, None, false, true, false)),
            "own pid namespace"
        );
        assert!(
            !is_root(&seen(7, None, true, false, false)),
            "own user namespace"
        );
    }

    #[test]
    fn keys_are_never_interface_names() {
        let key = super::key_of(4026532281);
        assert_eq!(key, "netns:4026532281");
        assert!(crate::state::Paths::valid_iface(&key).is_err());
        assert_eq!(super::inode_of_key(&key), Some(4026532281));
        assert_eq!(super::inode_of_key("eth0"), None);
    }

    #[test]
    fn this_namespace_is_alive_and_named_by_its_inode() {
        let ns = super::Netns::current().unwrap();
        assert_ne!(super::alive(ns.inode), Some(false));
        assert_eq!(ns.key().is_none(), ns.root);
        assert!(ns.to_string().contains("network namespace"));
    }

    #[test]
    fn parents_are_read_from_proc() {
        let me = std::process::id();
        assert!(super::parent(me).is_some());
        assert_eq!(super::candidates()[0], 1);
    }
}
