//! What outlives one fwmark process, per interface:
//!
//! - `/sys/fs/bpf/fwmark/<iface>/`: the pinned maps (`ACTIVE`, `EXACT`,
//!   `PREFIX`, `RULE_STATS`, `GLOBAL_STATS`) and, with tcx, the pinned `link`;
//! - `/run/fwmark/<iface>/state.json`: the live config (text, path, hash),
//!   its generation number, the counter slot of every rule, and how the
//!   program is attached;
//! - `/run/fwmark/<iface>/apply.lock`: serializes every change of the live
//!   config (`run`, `apply`, reloads, `detach`);
//! - `/run/fwmark/<iface>/daemon.lock`: held by the one `fwmark run` that
//!   manages the interface.
//!
//! Both directories are created with mode 0700: only root may use them.

use std::{
    fs::{self, File, OpenOptions, TryLockError},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::mode::AttachMode;

/// Root of fwmark's pins on bpffs.
pub const PIN_ROOT: &str = "/sys/fs/bpf/fwmark";
/// Root of fwmark's runtime state.
pub const RUN_ROOT: &str = "/run/fwmark";
/// Version of the state file's schema.
pub const STATE_VERSION: u32 = 1;

/// Where the pins and state of one interface live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    pub iface: String,
    pub pin_dir: PathBuf,
    pub run_dir: PathBuf,
}

/// An interface name the kernel would not accept (`dev_valid_name`); it
/// is also a path component of the pin and run directories.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0:?} is not an interface name (1-15 bytes, not \".\" or \"..\", no '/', ':' or white space)"
)]
pub struct InvalidIface(pub String);

/// fwmark has no pins for an interface.
#[derive(Debug, thiserror::Error)]
#[error(
    "fwmark is not attached to {iface} (no pins in {}); start it with `fwmark run --iface {iface}`",
    pin_dir.display()
)]
pub struct NotAttached {
    pub iface: String,
    pub pin_dir: PathBuf,
}

impl Paths {
    /// The directories of `iface`, once its name is a valid interface name.
    pub fn new(iface: &str) -> Result<Paths, InvalidIface> {
        let valid = !iface.is_empty()
            && iface.len() < 16
            && iface != "."
            && iface != ".."
            && !iface
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
        if !valid {
            return Err(InvalidIface(iface.to_string()));
        }
        Ok(Paths {
            iface: iface.to_string(),
            pin_dir: Path::new(PIN_ROOT).join(iface),
            run_dir: Path::new(RUN_ROOT).join(iface),
        })
    }

    /// Every interface fwmark has pins or state for (a directory under
    /// [`PIN_ROOT`] or [`RUN_ROOT`] with a valid interface name), sorted:
    /// what `fwmark detach --all` goes through. The interface itself may be
    /// gone, or live in another network namespace.
    pub fn all() -> io::Result<Vec<Paths>> {
        Ok(names_under(&[Path::new(PIN_ROOT), Path::new(RUN_ROOT)])?
            .into_iter()
            .filter_map(|name| Paths::new(&name).ok())
            .collect())
    }

    /// The error for an interface fwmark does not manage.
    pub fn not_attached(&self) -> NotAttached {
        NotAttached {
            iface: self.iface.clone(),
            pin_dir: self.pin_dir.clone(),
        }
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
            for d in [dir.parent().expect("has a parent"), dir.as_path()] {
                fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
            }
        }
        Ok(())
    }

    /// Removes the pins and the state, with what an interrupted change
    /// left (the locks stay: they may be held).
    pub fn remove(&self) -> io::Result<()> {
        match fs::remove_dir_all(&self.pin_dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for file in [
            "state.json",
            "state.json.tmp",
            "state.pending.json",
            "state.pending.json.tmp",
        ] {
            match fs::remove_file(self.run_dir.join(file)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
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
        let text = serde_json::to_string_pretty(self)?;
        crate::durable::write(&paths.state_file(), text.as_bytes(), 0o600)
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
        let p = super::Paths::new("eth0").unwrap();
        assert_eq!(p.pin_dir, std::path::Path::new("/sys/fs/bpf/fwmark/eth0"));
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
        paths.create_run_dir().map_err(|error| LockError::Io {
            path: paths.run_dir.display().to_string(),
            error,
        })?;
        let path = paths.run_dir.join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|error| LockError::Io {
                path: path.display().to_string(),
                error,
            })?;
        Ok((file, path))
    }

    /// Waits for the apply lock: every change of the live config holds it.
    pub fn apply(paths: &Paths) -> Result<Lock, LockError> {
        let (file, path) = Lock::open(paths, "apply.lock")?;
        file.lock().map_err(|error| LockError::Io {
            path: path.display().to_string(),
            error,
        })?;
        Ok(Lock { _file: file })
    }

    /// Takes the daemon lock without waiting, and records this process's
    /// pid in it; fails when another `fwmark run` manages the interface.
    pub fn daemon(paths: &Paths) -> Result<Lock, LockError> {
        let (mut file, path) = Lock::open(paths, "daemon.lock")?;
        // `status` and `detach` probe this lock for an instant: retry a few
        // times before concluding that another run holds it.
        let mut attempts = 0;
        loop {
            match file.try_lock() {
                Ok(()) => break,
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
        }
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
