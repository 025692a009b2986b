//! Operating fwmark in a lab the way an admin does: config files, one-shot
//! commands (`apply`, `status`, `detach`) in the director namespace, the
//! state fwmark keeps for an interface, and traffic from the client.

use std::{
    path::{Path, PathBuf},
    process::Output,
};

use crate::{
    daemon::fwmark_bin,
    netns::Lab,
    nft::{self, Probe},
};

/// A directory for a test's config files, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory named after the lab (mode 0755, owned by root).
    pub fn new(lab: &Lab) -> TempDir {
        let dir = std::env::temp_dir().join(format!("fwmark-{}", lab.director.name));
        std::fs::create_dir_all(&dir).expect("create the config directory");
        TempDir(dir)
    }

    /// Writes `text` to `name` in the directory; returns the path.
    pub fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write a config file");
        path.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `fwmark ARGS…` in the director namespace and waits for it.
pub fn fwmark(lab: &Lab, args: &[&str]) -> Output {
    lab.director
        .command(fwmark_bin())
        .args(args)
        .output()
        .expect("run fwmark")
}

/// The stdout of a command that must have succeeded.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "fwmark failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `fwmark status --iface <director side> --json`.
pub fn status_json(lab: &Lab) -> serde_json::Value {
    let out = ok(fwmark(
        lab,
        &["status", "--iface", &lab.director_if, "--json"],
    ));
    serde_json::from_str(&out).expect("status --json parses")
}

/// Sends a probe's traffic from the client namespace.
pub fn send(lab: &Lab, p: &Probe) {
    lab.client
        .run(|| nft::send(p))
        .expect("enter the client namespace")
        .unwrap_or_else(|e| panic!("sending {p}: {e:#}"));
}

/// fwmark's run directory of the director's interface (state and locks).
pub fn run_dir(lab: &Lab) -> PathBuf {
    Path::new("/run/fwmark").join(&lab.director_if)
}

/// fwmark's pin directory of the director's interface.
pub fn pin_dir(lab: &Lab) -> PathBuf {
    Path::new("/sys/fs/bpf/fwmark").join(&lab.director_if)
}

/// The state file's text (`state.json`), if there is one.
pub fn state_text(lab: &Lab) -> Option<String> {
    std::fs::read_to_string(run_dir(lab).join("state.json")).ok()
}

/// Whether an interrupted change left `state.pending.json`.
pub fn pending_exists(lab: &Lab) -> bool {
    run_dir(lab).join("state.pending.json").exists()
}
