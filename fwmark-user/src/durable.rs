//! Files that must survive a crash or a power cut whole: written to a
//! temporary file, synced, renamed over the old one, and the directory
//! synced, so that after a restart the path holds either the old contents or
//! the new ones, never a part. `state.json` and `state.pending.json` are
//! written this way.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

/// Writes `bytes` to `path` atomically and durably, the file with `mode`:
/// `<path>.tmp` is written and synced, renamed over `path`, then the
/// directory is synced (the rename is part of it).
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    rename(tmp, path)
}

/// Renames `from` over `to` (in one directory) and syncs that directory, so
/// that the rename outlives a crash.
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    sync_dir(to)
}

/// Syncs the directory `path` is in.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn replaces_whole_files_with_their_mode() {
        let dir = std::env::temp_dir().join(format!("fwmark-durable-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        write(&path, b"first", 0o600).unwrap();
        write(&path, b"second", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!dir.join("state.json.tmp").exists());
        let moved = dir.join("moved.json");
        rename(&path, &moved).unwrap();
        assert_eq!(fs::read(&moved).unwrap(), b"second");
        assert!(!path.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let path = Path::new("/nonexistent-fwmark-dir/state.json");
        assert_eq!(
            write(path, b"x", 0o600).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
