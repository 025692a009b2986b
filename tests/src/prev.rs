//! The previous map layout's `fwmark`, built from its commit, for the
//! upgrade test: the binary a director runs before it upgrades.
//!
//! `$FWMARK_PREV_BIN` names a prebuilt one. Otherwise the commit's tree is
//! unpacked (`git archive`) into `.cache/prev/COMMIT/src` (git-ignored) and
//! built with its own target directory there, `.cache/prev/COMMIT/target`;
//! an existing binary is reused. The first (cold) build compiles the whole
//! dependency tree and the eBPF object: minutes (the measured time is in
//! docs/testing.md).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, OnceLock},
};

use anyhow::{Context as _, Result, bail};

/// The last commit whose pinned maps have layout 2 (`ABI_VERSION = 2`):
/// main before issue 15's layout change. The upgrade test runs its fwmark
/// first and takes its pins over with this build's.
pub const LAYOUT_2_COMMIT: &str = "f5dcd9b6031dc7a965c43a47c6ef1b757f410824";

/// The layout [`LAYOUT_2_COMMIT`]'s fwmark writes.
pub const LAYOUT_2: u32 = 2;

/// The workspace's root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the workspace root")
}

/// The layout-2 fwmark: `$FWMARK_PREV_BIN`, or built from
/// [`LAYOUT_2_COMMIT`] into `.cache/prev/` (once per process; reused
/// across runs).
pub fn binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FWMARK_PREV_BIN") {
        return Ok(PathBuf::from(p));
    }
    static BUILT: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(|| Mutex::new(None))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = &*built {
        return Ok(p.clone());
    }
    let p = build(&root(), LAYOUT_2_COMMIT)?;
    *built = Some(p.clone());
    Ok(p)
}

/// Builds `fwmark` of `commit` into `ROOT/.cache/prev/COMMIT/` unless its
/// binary is there already; returns the binary's path.
pub fn build(root: &Path, commit: &str) -> Result<PathBuf> {
    let cache = root.join(".cache/prev").join(commit);
    let bin = cache.join("target/debug/fwmark");
    if bin.exists() {
        return Ok(bin);
    }
    let has_commit = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
        .status()
        .context("running git")?;
    if !has_commit.success() {
        bail!(
            "commit {commit} (the last with map layout 2, which the upgrade test starts from) \
             is not in {}: a shallow clone? Fetch the full history (`git fetch --unshallow`) \
             and run the test again",
            root.display()
        );
    }
    let src = cache.join("src");
    // A tree half unpacked by an interrupted run is unpacked again.
    if src.exists() {
        std::fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
    }
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    let archive = Command::new("sh")
        .arg("-c")
        .arg("git -C \"$1\" archive \"$2\" | tar -x -C \"$3\"")
        .args(["sh"])
        .arg(root)
        .arg(commit)
        .arg(&src)
        .status()
        .context("running git archive")?;
    if !archive.success() {
        bail!("unpacking commit {commit} into {} failed", src.display());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = std::time::Instant::now();
    eprintln!(
        "building fwmark of {commit} (map layout 2) into {} (a cold build takes minutes)",
        cache.display()
    );
    let status = Command::new(cargo)
        .current_dir(&src)
        .args([
            "build",
            "-p",
            "fwmark-user",
            "--bin",
            "fwmark",
            "--target-dir",
        ])
        .arg(cache.join("target"))
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .status()
        .context("running cargo build")?;
    if !status.success() || !bin.exists() {
        bail!(
            "building fwmark of {commit} in {} failed ({status})",
            src.display()
        );
    }
    eprintln!(
        "built fwmark of {commit} in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(bin)
}
