//! What outlives one fwmark process, per network namespace and interface:
//!
//! - `/sys/fs/bpf/fwmark/<iface>/`: the pinned maps (`ACTIVE`, `EXACT4`, `EXACT`,
//!   `RANGE4`, `RANGE6`, `PREFIX`, `RULE_STATS`, `GLOBAL_STATS`) and, with tcx, the pinned `link`;
//! - `/run/fwmark/<iface>/state.json`: the live config (text, path, hash),
//!   its generation number, the counter slot of every rule, and how the
//!   program is attached;
//! - `/run/fwmark/<iface>/apply.lock`: serializes every change of the live
//!   config (`run`, `apply`, reloads, `detach`);
//! - `/run/fwmark/<iface>/daemon.lock`: held by the one `fwmark run` that
//!   manages the interface.
//!
//! Those are the root network namespace's paths. Another namespace's have
//! its key between (`/sys/fs/bpf/fwmark/netns:INODE/<iface>/`,
//! `/run/fwmark/netns:INODE/<iface>/`, [`crate::netns`]), in the host's
//! bpffs and `/run` also from inside `ip netns exec`.
//!
//! The directories are created with mode 0700: only root may use them. A
//! clean exit or `detach` removes the interface's directories, locks
//! included, and the namespace's directories once empty.

use std::{
    fs::{self, File, OpenOptions, TryLockError},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{mode::AttachMode, netns};

/// Root of fwmark's pins on bpffs, in the mount namespace fwmark runs in
/// ([`netns::roots`] may put it in the host's).
pub const PIN_ROOT: &str = "/sys/fs/bpf/fwmark";
/// Root of fwmark's runtime state (likewise).
pub const RUN_ROOT: &str = "/run/fwmark";
/// Version of the state file's schema.
pub const STATE_VERSION: u32 = 1;

/// Where the pins and state of one interface of one network namespace
/// live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    pub iface: String,
    /// The namespace the interface is looked up in.
    pub netns: netns::Netns,
    pub pin_dir: PathBuf,
    pub run_dir: PathBuf,
}

/// Why an interface's paths cannot be named.
#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    #[error(transparent)]
    InvalidIface(#[from] InvalidIface),
    #[error("cannot tell this process's network namespace (/proc/self/ns/net): {0}")]
    Netns(#[source] io::Error),
}

/// An interface name the kernel would not accept (`dev_valid_name`); it
/// is also a path component of the pin and run directories.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0:?} is not an interface name (1-15 bytes, not \".\" or \"..\", no '/', ':' or white space)"
)]
pub struct InvalidIface(pub String);

/// fwmark has no pins for an interface (in this network namespace).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct NotAttached {
    pub iface: String,
    /// The whole message: where fwmark looked, whether the interface is in
    /// this namespace, where else an interface of that name has fwmark.
    pub message: String,
}

impl Paths {
    /// Checks that `iface` is a valid interface name.
    pub fn valid_iface(iface: &str) -> Result<(), InvalidIface> {
        let valid = !iface.is_empty()
            && iface.len() < 16
            && iface != "."
            && iface != ".."
            && !iface
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
        if valid {
            Ok(())
        } else {
            Err(InvalidIface(iface.to_string()))
        }
    }

    /// The directories of `iface` in this process's network namespace,
    /// once its name is a valid interface name.
    pub fn new(iface: &str) -> Result<Paths, PathsError> {
        let ns = netns::Netns::current().map_err(PathsError::Netns)?;
        Ok(Paths::in_netns(iface, ns)?)
    }

    /// The directories of `iface` in the namespace `ns`.
    pub fn in_netns(iface: &str, ns: netns::Netns) -> Result<Paths, InvalidIface> {
        Paths::valid_iface(iface)?;
        let (pins, run) = Paths::roots(&ns);
        Ok(Paths {
            iface: iface.to_string(),
            pin_dir: pins.join(iface),
            run_dir: run.join(iface),
            netns: ns,
        })
    }

    /// The pin and run directories of a namespace (the parents of its
    /// interfaces' directories).
    fn roots(ns: &netns::Netns) -> (PathBuf, PathBuf) {
        let roots = netns::roots();
        let (mut pins, mut run) = (roots.bpffs.join("fwmark"), roots.run.join("fwmark"));
        if let Some(key) = ns.key() {
            pins.push(&key);
            run.push(&key);
        }
        (pins, run)
    }

    /// Every interface of this process's network namespace that fwmark
    /// has pins or state for (a directory with a valid interface name),
    /// sorted: what `fwmark detach --all` and `fwmark status` go through.
    /// The interface itself may be gone. Other namespaces' are not listed
    /// (in the root namespace their `netns:INODE` directories are no
    /// interface names).
    pub fn all() -> Result<Vec<Paths>, PathsError> {
        let ns = netns::Netns::current().map_err(PathsError::Netns)?;
        let (pins, run) = Paths::roots(&ns);
        Ok(names_under(&[&pins, &run])
            .map_err(PathsError::Netns)?
            .into_iter()
            .filter_map(|name| Paths::in_netns(&name, ns.clone()).ok())
            .collect())
    }

    /// The other namespaces fwmark has pins or state of: their inodes, with
    /// whether each is still alive ([`netns::alive`]).
    pub fn other_namespaces() -> Vec<(u64, Option<bool>)> {
        let roots = netns::roots();
        let here = netns::Netns::current().ok().map(|n| n.inode);
        let Ok(keys) = names_under(&[&roots.bpffs.join("fwmark"), &roots.run.join("fwmark")])
        else {
            return Vec::new();
        };
        keys.iter()
            .filter_map(|k| netns::inode_of_key(k))
            .filter(|inode| Some(*inode) != here)
            .map(|inode| (inode, netns::alive(inode)))
            .collect()
    }

    /// The pins and state an interface of this name has in another
    /// namespace (for a message): each namespace, described.
    pub fn elsewhere(&self) -> Vec<String> {
        let roots = netns::roots();
        let mut found = Vec::new();
        if !self.netns.root && roots.bpffs.join("fwmark").join(&self.iface).exists() {
            found.push(netns::describe(true, 0));
        }
        let Ok(keys) = names_under(&[&roots.bpffs.join("fwmark")]) else {
            return found;
        };
        for inode in keys.iter().filter_map(|k| netns::inode_of_key(k)) {
            if inode != self.netns.inode
                && roots
                    .bpffs
                    .join("fwmark")
                    .join(netns::key_of(inode))
                    .join(&self.iface)
                    .exists()
            {
                found.push(netns::describe(false, inode));
            }
        }
        found
    }

    /// The error for an interface fwmark does not manage here: it names
    /// the namespace, says when the interface is not in it, and where else
    /// fwmark is attached to an interface of that name.
    pub fn not_attached(&self) -> NotAttached {
        let iface = &self.iface;
        let elsewhere = self.elsewhere();
        let elsewhere = if elsewhere.is_empty() {
            String::new()
        } else {
            format!(
                "; fwmark is attached to an interface named {iface} in {}: run fwmark there \
                 (`ip netns exec NAME fwmark ...` or `nsenter --net=PATH fwmark ...`)",
                elsewhere.join(", ")
            )
        };
        let pin_dir = self.shown_pin_dir();
        let message = if crate::preflight::interface_index(iface).is_err() {
            format!(
                "interface {iface} is not in {} (see `ip link` there), and fwmark has no pins \
                 for it here ({pin_dir}){elsewhere}",
                self.netns
            )
        } else {
            format!(
                "fwmark is not attached to {iface} in {} (no pins in {pin_dir}){elsewhere}; \
                 start it with `fwmark run --iface {iface}`",
                self.netns
            )
        };
        NotAttached {
            iface: iface.clone(),
            message,
        }
    }

    /// The pin directory as an operator finds it.
    pub fn shown_pin_dir(&self) -> String {
        netns::roots().shown(&self.pin_dir)
    }

    /// Pin path of a map or of the `link`.
    pub fn pin(&self, name: &str) -> PathBuf {
        self.pin_dir.join(name)
    }

    pub fn state_file(&self) -> PathBuf {
        self.run_dir.join("state.json")
    }

    /// Creates both directories (and their parents) with mode 0700.
    pub fn create_dirs(&self) -> io::Result<()> {
        Paths::create_private(&[&self.pin_dir, &self.run_dir])
    }

    /// Creates the run directory (for the locks) with mode 0700.
    pub fn create_run_dir(&self) -> io::Result<()> {
        Paths::create_private(&[&self.run_dir])
    }

    fn create_private(dirs: &[&PathBuf]) -> io::Result<()> {
        for dir in dirs {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            // The directory, its parent (`fwmark`, or the namespace's) and,
            // for a namespace, `fwmark` above that.
            let parent = dir.parent().expect("has a parent");
            let above = parent
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("netns:"))
                .then(|| parent.parent())
                .flatten();
            for d in [Some(dir.as_path()), Some(parent), above]
                .into_iter()
                .flatten()
            {
                fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
            }
        }
        Ok(())
    }

    /// Removes the pins and the state, with what an interrupted change
    /// left (the locks stay: they may be held; [`Paths::remove_locks`]).
    pub fn remove(&self) -> io::Result<()> {
        match fs::remove_dir_all(&self.pin_dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        // The namespace's pin directory, once it holds no interface.
        if !self.netns.root
            && let Some(parent) = self.pin_dir.parent()
        {
            let _ = fs::remove_dir(parent);
        }
        for file in [
            "state.json",
            "state.json.tmp",
            "state.pending.json",
            "state.pending.json.tmp",
            "state.upgrade.json",
            "state.upgrade.json.tmp",
        ] {
            match fs::remove_file(self.run_dir.join(file)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

impl Paths {
    /// Removes the lock files and the run directory, and the namespace's
    /// run directory once empty, so a clean exit or `detach` leaves nothing.
    /// The caller holds the apply lock (and the daemon lock, if any): a
    /// process that waits for a lock on a removed file notices and takes
    /// the new one ([`Lock`]).
    pub fn remove_locks(&self) -> io::Result<()> {
        for file in ["daemon.lock", "apply.lock"] {
            match fs::remove_file(self.run_dir.join(file)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        for dir in [Some(self.run_dir.as_path()), self.run_dir.parent()]
            .into_iter()
            .flatten()
            .take(if self.netns.root { 1 } else { 2 })
        {
            match fs::remove_dir(dir) {
                // Another process created a file there since: it stays.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
                    ) => {}
                Err(e) => return Err(e),
                Ok(()) => {}
            }
        }
        Ok(())
    }
}

/// Removes the pins and state of every network namespace that is gone
/// ([`netns::alive`] says so for sure; none when this process cannot see
/// every process). Removing a tcx link's pin releases the link; a netlink
/// filter went with its interface. Returns each namespace removed, with
/// the outcome.
pub fn remove_stale() -> Vec<(u64, io::Result<()>)> {
    let roots = netns::roots();
    Paths::other_namespaces()
        .into_iter()
        .filter(|(_, alive)| *alive == Some(false))
        .map(|(inode, _)| {
            let key = netns::key_of(inode);
            let result = [roots.bpffs.join("fwmark"), roots.run.join("fwmark")]
                .iter()
                .try_for_each(|root| match fs::remove_dir_all(root.join(&key)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                });
            (inode, result)
        })
        .collect()
}

/// The names of the directories in each of `roots` (a missing root has
/// none), sorted and without duplicates.
fn names_under(roots: &[&Path]) -> io::Result<std::collections::BTreeSet<String>> {
    let mut names = std::collections::BTreeSet::new();
    for root in roots {
        let entries = match fs::read_dir(root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                names.insert(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    Ok(names)
}

/// The live configuration of one interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// Layout version of the pinned maps (`fwmark_common::ABI_VERSION`).
    pub abi: u32,
    pub iface: String,
    /// `tcx` or `netlink`.
    pub mode: AttachMode,
    /// Netlink filter priority and handle (netlink mode only).
    pub netlink: Option<(u16, u32)>,
    /// Kernel id of the attached program.
    pub program_id: u32,
    /// When the program was first attached (Unix seconds).
    pub attached_at: u64,
    /// Counts every switch of the live config, from 1 (0: none yet).
    pub generation: u64,
    /// The `ACTIVE` slot this generation lives in.
    pub slot: u32,
    /// Size of the per-rule counter map.
    pub rule_capacity: u32,
    /// Where the live config was read from.
    pub config_path: String,
    /// SHA-256 of `config_text`, hex.
    pub config_sha256: String,
    /// The live config itself, so `apply` can diff against it and `status`
    /// can label counters even when the file has changed since.
    pub config_text: String,
    /// Counter slot of every rule of the live config, in the order the
    /// config compiles its rules.
    pub slots: Vec<u32>,
    /// Slots at or above this were never assigned: still zero since the
    /// counter map was created, so they need no zeroing when first used.
    #[serde(default)]
    pub slot_high_water: u32,
    /// The group's other interfaces (`fwmark run --iface A --iface B`):
    /// attached to the same maps, switched by the same generation. This
    /// state (of the first interface, `iface`) is the group's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<Member>,
}

/// One more interface of a group: its attachment of the group's maps. Its
/// own directories hold only its `link` pin (tcx) and the [`GROUP_FILE`]
/// that names the group's first interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub iface: String,
    /// Its slot of the global counters (1.. below `MAX_INTERFACES`; the
    /// first interface counts in slot 0).
    pub counter_slot: u32,
    /// Netlink filter priority and handle (netlink mode only).
    pub netlink: Option<(u16, u32)>,
    /// Kernel id of its program (each interface has its own load).
    pub program_id: u32,
    /// When it was attached (Unix seconds).
    pub attached_at: u64,
}

/// In the run directory of a group's member: the name of the group's
/// first interface, whose directories hold the maps and the state.
pub const GROUP_FILE: &str = "group";

impl Paths {
    /// The first interface of the group this interface is a member of
    /// (its [`GROUP_FILE`]), if it is one.
    pub fn group(&self) -> Option<String> {
        let name = fs::read_to_string(self.run_dir.join(GROUP_FILE)).ok()?;
        let name = name.trim();
        Paths::valid_iface(name).ok().map(|()| name.to_string())
    }

    /// The paths that hold the maps and state for this interface: the
    /// group's first interface's for a member, else its own.
    pub fn owner(&self) -> Paths {
        self.group()
            .and_then(|g| Paths::in_netns(&g, self.netns.clone()).ok())
            .unwrap_or_else(|| self.clone())
    }

    /// Records that this interface is a member of `group`'s maps.
    pub fn write_group(&self, group: &str) -> io::Result<()> {
        crate::durable::write(&self.run_dir.join(GROUP_FILE), group.as_bytes(), 0o600)
    }

    /// Removes a member's link pin, its group file and its directories
    /// (the locks too: the caller holds the group's apply lock and, if it
    /// is the daemon, this member's daemon lock).
    pub fn remove_member(&self) -> io::Result<()> {
        self.remove()?;
        match fs::remove_file(self.run_dir.join(GROUP_FILE)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.remove_locks()
    }
}

impl State {
    /// Reads the state; `Ok(None)` when there is none.
    pub fn load(paths: &Paths) -> io::Result<Option<State>> {
        let text = match fs::read_to_string(paths.state_file()) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", paths.state_file().display()),
            )
        })
    }

    /// Writes the state atomically and durably ([`crate::durable`]).
    pub fn save(&self, paths: &Paths) -> io::Result<()> {
        let text = serde_json::to_vec(self)?;
        crate::durable::write(&paths.state_file(), &text, 0o600)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_under_lists_directories_of_every_root_once() {
        let base = std::env::temp_dir().join(format!("fwmark-names-under-{}", std::process::id()));
        let (pins, run) = (base.join("pins"), base.join("run"));
        for dir in [
            pins.join("eth0"),
            pins.join("eth1"),
            run.join("eth1"),
            run.join("lo2"),
        ] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(run.join("not-a-dir"), "").unwrap();
        let names = super::names_under(&[&pins, &run, &base.join("missing")]).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["eth0", "eth1", "lo2"]
        );
    }

    #[test]
    fn interface_names_are_checked_before_they_become_paths() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "eth0:1",
            "a b",
            "0123456789abcdef",
        ] {
            assert!(super::Paths::new(bad).is_err(), "{bad:?}");
        }
        let root = crate::netns::Netns {
            inode: 1,
            root: true,
        };
        let p = super::Paths::in_netns("eth0", root).unwrap();
        if crate::netns::roots().via.is_none() {
            assert_eq!(p.pin_dir, std::path::Path::new("/sys/fs/bpf/fwmark/eth0"));
            assert_eq!(p.run_dir, std::path::Path::new("/run/fwmark/eth0"));
        }
        let other = crate::netns::Netns {
            inode: 4026532281,
            root: false,
        };
        let p = super::Paths::in_netns("eth0", other).unwrap();
        assert!(
            p.pin_dir.ends_with("fwmark/netns:4026532281/eth0")
                && p.run_dir.ends_with("fwmark/netns:4026532281/eth0"),
            "{p:?}"
        );
    }
}

/// An exclusive lock (`File::lock`, an `flock`) on a file in the run
/// directory, released on drop.
pub struct Lock {
    _file: File,
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: {error}")]
    Io { path: String, error: io::Error },
    #[error("{what} for {iface} is held by process {holder}")]
    Busy {
        what: &'static str,
        iface: String,
        holder: String,
    },
}

impl Lock {
    fn open(paths: &Paths, name: &str) -> Result<(File, PathBuf), LockError> {
        let path = paths.run_dir.join(name);
        let mut attempts = 0;
        loop {
            match paths.create_run_dir() {
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 10 => {
                    attempts += 1;
                    continue;
                }
                Err(error) => {
                    return Err(LockError::Io {
                        path: paths.run_dir.display().to_string(),
                        error,
                    });
                }
                Ok(()) => {}
            }
            match OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => return Ok((file, path)),
                // The directory was removed (a clean exit) after it was
                // created here: create it again.
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 10 => attempts += 1,
                Err(error) => {
                    return Err(LockError::Io {
                        path: path.display().to_string(),
                        error,
                    });
                }
            }
        }
    }

    /// Whether `file` is still the lock file at `path`: a clean exit or
    /// `detach` removes the lock files while holding the locks, so a lock
    /// taken on a file removed meanwhile protects nothing.
    fn still_there(file: &File, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        match (file.metadata(), fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    /// Waits for the apply lock: every change of the live config holds it.
    pub fn apply(paths: &Paths) -> Result<Lock, LockError> {
        loop {
            let (file, path) = Lock::open(paths, "apply.lock")?;
            file.lock().map_err(|error| LockError::Io {
                path: path.display().to_string(),
                error,
            })?;
            if Lock::still_there(&file, &path) {
                return Ok(Lock { _file: file });
            }
        }
    }

    /// Takes the daemon lock without waiting, and records this process's
    /// pid in it; fails when another `fwmark run` manages the interface.
    pub fn daemon(paths: &Paths) -> Result<Lock, LockError> {
        // `status` and `detach` probe this lock for an instant: retry a few
        // times before concluding that another run holds it.
        let mut attempts = 0;
        let (mut file, path) = loop {
            let (file, path) = Lock::open(paths, "daemon.lock")?;
            match file.try_lock() {
                Ok(()) if Lock::still_there(&file, &path) => break (file, path),
                // Removed by the run that held it, as it exited: again.
                Ok(()) => {}
                Err(TryLockError::WouldBlock) if attempts < 10 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(LockError::Busy {
                        what: "fwmark run",
                        iface: paths.iface.clone(),
                        holder: Lock::holder_pid(&path),
                    });
                }
                Err(TryLockError::Error(error)) => {
                    return Err(LockError::Io {
                        path: path.display().to_string(),
                        error,
                    });
                }
            }
        };
        let record = |file: &mut File| -> io::Result<()> {
            file.set_len(0)?;
            file.write_all(std::process::id().to_string().as_bytes())
        };
        record(&mut file).map_err(|error| LockError::Io {
            path: path.display().to_string(),
            error,
        })?;
        Ok(Lock { _file: file })
    }

    /// The pid a daemon recorded in its lock file (`?` when unreadable).
    fn holder_pid(path: &Path) -> String {
        fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    }

    /// Whether another open file description holds `file`'s lock right now
    /// (taken for an instant to test it, and released).
    fn held_elsewhere(file: &File) -> bool {
        match file.try_lock() {
            Ok(()) => {
                // Taken only to test it. Closing `file` releases it anyway,
                // so a failed unlock changes nothing.
                let _ = file.unlock();
                false
            }
            // Another error (none is expected for an open file): assume held,
            // so no caller acts as if the lock were free.
            Err(TryLockError::WouldBlock | TryLockError::Error(_)) => true,
        }
    }

    /// Whether a change holds the apply lock right now (an `apply` or a
    /// reload between its switch and recording it).
    pub fn apply_busy(paths: &Paths) -> bool {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(paths.run_dir.join("apply.lock"))
            .is_ok_and(|file| Lock::held_elsewhere(&file))
    }

    /// Whether a `fwmark run` holds the daemon lock of the interface, and
    /// its pid.
    pub fn daemon_holder(paths: &Paths) -> Option<String> {
        let path = paths.run_dir.join("daemon.lock");
        let file = OpenOptions::new().read(true).write(true).open(&path).ok()?;
        Lock::held_elsewhere(&file).then(|| Lock::holder_pid(&path))
    }
}
