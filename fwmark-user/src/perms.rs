//! Who besides root can change the config: a user who can write the file
//! (or replace it in its directory) decides what fwmark marks, which is
//! root's decision. fwmark warns (at `run`, reloads, `apply` and `check`)
//! and goes on: the file may be meant that way.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
};

/// `S_ISVTX`: in a sticky directory only a file's owner may replace it.
const STICKY: u32 = 0o1000;

/// What makes `path` writable by someone other than root, one sentence
/// each with the command that fixes it. Empty when only root can change it
/// (or when it cannot be examined: reading it reports that).
pub fn config_warnings(path: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(meta) = std::fs::metadata(path) else {
        return out;
    };
    let shown = path.display();
    let mode = meta.permissions().mode();
    if meta.uid() != 0 {
        out.push(format!(
            "config {shown} is owned by uid {}, not root: that user can change what fwmark \
             marks; `chown root:root {shown}`",
            meta.uid()
        ));
    }
    if mode & 0o002 != 0 {
        out.push(format!(
            "config {shown} is writable by every user (mode {:04o}): anyone can change what \
             fwmark marks; `chmod go-w {shown}`",
            mode & 0o7777
        ));
    } else if mode & 0o020 != 0 {
        out.push(format!(
            "config {shown} is writable by group {} (mode {:04o}): its members can change what \
             fwmark marks; `chmod g-w {shown}`",
            meta.gid(),
            mode & 0o7777
        ));
    }
    // Whoever may write the directory may replace the file.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(dmeta) = std::fs::metadata(dir) {
        let dmode = dmeta.permissions().mode();
        let shown_dir = dir.display();
        if dmeta.uid() != 0 {
            out.push(format!(
                "the directory {shown_dir} of config {shown} is owned by uid {}, not root: that \
                 user can replace the config; `chown root:root {shown_dir}`",
                dmeta.uid()
            ));
        } else if dmode & 0o022 != 0 && dmode & STICKY == 0 {
            out.push(format!(
                "the directory {shown_dir} of config {shown} is writable by group or others \
                 (mode {:04o}): they can replace the config; `chmod go-w {shown_dir}`",
                dmode & 0o7777
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_and_world_writable_configs_and_directories_are_named() {
        let dir = std::env::temp_dir().join(format!("fwmark-perms-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = dir.join("fwmark.toml");
        std::fs::write(&file, "").unwrap();
        let root = std::fs::metadata(&file).unwrap().uid() == 0;
        let owner_lines = usize::from(!root) * 2;

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(config_warnings(&file).len(), owner_lines);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o664)).unwrap();
        let w = config_warnings(&file);
        assert!(w.iter().any(|l| l.contains("writable by group")), "{w:?}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        let w = config_warnings(&file);
        assert!(
            w.iter()
                .any(|l| l.contains("writable by every user (mode 0666)")
                    && l.contains("chmod go-w")),
            "{w:?}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        if root {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
            let w = config_warnings(&file);
            assert!(
                w.iter().any(|l| l.contains("can replace the config")),
                "{w:?}"
            );
            // Sticky, like /tmp: others cannot replace root's file.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
            assert!(config_warnings(&file).is_empty());
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(config_warnings(Path::new("/nonexistent/fwmark.toml")).is_empty());
    }
}
