//! `cargo xtask setup`: what building and running the classifier needs,
//! checked and installed idempotently. Every name is derived from the
//! installed nightly toolchain, so this keeps working when nightly moves.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, have, output, run};

fn rustup() -> Command {
    let mut cmd = Command::new("rustup");
    // Never let rustup download a toolchain behind our back.
    cmd.env("RUSTUP_AUTO_INSTALL", "0");
    cmd
}

fn nightly_rustc(args: &[&str]) -> Result<String> {
    output(rustup().args(["run", "nightly", "rustc"]).args(args)).context(
        "the nightly toolchain does not run; install it with `rustup toolchain install nightly`",
    )
}

pub fn setup() -> Result<()> {
    if !have("rustup") {
        bail!(
            "rustup is not installed; fwmark builds its classifier with rustup's nightly toolchain"
        );
    }
    let toolchains = output(rustup().args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!("the nightly toolchain is missing: `rustup toolchain install nightly`");
    }

    // 1. rust-src for nightly (-Z build-std=core).
    let components =
        output(rustup().args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: nightly rust-src: present");
    } else {
        eprintln!("setup: nightly rust-src: installing");
        run(rustup().args(["component", "add", "rust-src", "--toolchain", "nightly"]))
            .context("installing nightly's rust-src failed")?;
    }

    // 2. The musl target of the stable toolchain: the static binary of
    //    `cargo xtask dist`.
    let targets = output(rustup().args(["target", "list", "--installed"]))?;
    if targets.lines().any(|l| l.trim() == util::MUSL_TARGET) {
        eprintln!("setup: rust target {}: present", util::MUSL_TARGET);
    } else {
        eprintln!("setup: rust target {}: installing", util::MUSL_TARGET);
        run(rustup().args(["target", "add", util::MUSL_TARGET]))
            .with_context(|| format!("`rustup target add {}` failed", util::MUSL_TARGET))?;
    }

    // 3. bpf-linker linked against nightly's own libLLVM.
    ensure_bpf_linker()?;

    // 4. cargo-fuzz for the fuzz targets (`cargo xtask fuzz`, and briefly in
    //    `cargo xtask test`).
    crate::fuzz::ensure_cargo_fuzz()?;

    // 5. Privileges, bpffs and the tools the kernel tests use.
    if util::is_root() {
        ensure_bpffs()?;
    } else {
        eprintln!(
            "setup: not root: `run`, `demo` and the kernel tests use sudo (fwmark needs root, \
             or CAP_BPF + CAP_NET_ADMIN)"
        );
    }
    let missing: Vec<&str> = [("ip", "iproute2"), ("nft", "nftables")]
        .into_iter()
        .filter(|(tool, _)| !have(tool))
        .map(|(_, package)| package)
        .collect();
    if !missing.is_empty() {
        let msg = format!(
            "the kernel tests need {}: `apt-get install {}`",
            missing.join(", "),
            missing.join(" ")
        );
        if std::env::var("FWMARK_REQUIRE_KERNEL_TESTS").is_ok_and(|v| v == "1") {
            bail!("{msg}");
        }
        eprintln!("setup: warning: {msg}");
    }
    Ok(())
}

/// The nightly sysroot's libLLVM: (sysroot/lib, link name such as
/// `LLVM-22-rust-1.97.0-nightly`, LLVM major version).
fn nightly_llvm() -> Result<(PathBuf, String, String)> {
    let sysroot = PathBuf::from(nightly_rustc(&["--print", "sysroot"])?.trim());
    let version = nightly_rustc(&["-vV"])?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("nightly rustc does not report its LLVM version")?
        .to_string();
    let lib_dir = sysroot.join("lib");
    let prefix = format!("libLLVM-{major}-");
    let lib = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&prefix) && n.ends_with(".so"))
        .with_context(|| {
            format!(
                "nightly ships no {prefix}*.so in {}; reinstall the nightly toolchain",
                lib_dir.display()
            )
        })?;
    let link_name = lib
        .trim_start_matches("lib")
        .trim_end_matches(".so")
        .to_string();
    Ok((lib_dir, link_name, major))
}

pub fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// True when `bin` runs and resolves its libLLVM inside `lib_dir`.
fn linked_against(bin: &Path, lib_dir: &Path) -> bool {
    let Ok(ldd) = output(Command::new("ldd").arg(bin)) else {
        return false;
    };
    let uses_nightly = ldd
        .lines()
        .any(|l| l.contains("libLLVM") && l.contains(&*lib_dir.to_string_lossy()));
    let unresolved = ldd.contains("not found");
    uses_nightly
        && !unresolved
        && Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

fn ensure_bpf_linker() -> Result<PathBuf> {
    let (lib_dir, link_name, major) = nightly_llvm()?;
    let bin = cargo_bin_dir().join("bpf-linker");
    if linked_against(&bin, &lib_dir) {
        eprintln!(
            "setup: bpf-linker: {} (LLVM {major} of nightly)",
            bin.display()
        );
        return Ok(bin);
    }
    eprintln!("setup: bpf-linker: building against nightly's {link_name} (about a minute, once)");
    let rustflags = format!(
        "-L {dir} -l dylib={link_name} -C link-arg=-Wl,-rpath,{dir}",
        dir = lib_dir.display()
    );
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args([
        "install",
        "bpf-linker",
        "--locked",
        "--force",
        "--no-default-features",
        "--features",
        &format!("llvm-{major},no-llvm-linking"),
    ])
    .env("RUSTFLAGS", rustflags)
    .env_remove("CARGO_ENCODED_RUSTFLAGS")
    .env_remove("CARGO_TARGET_DIR")
    .env_remove("CARGO_BUILD_TARGET_DIR");
    run(&mut cmd).with_context(|| {
        format!(
            "building bpf-linker failed; it needs crates.io and a bpf-linker release with \
             the feature llvm-{major}"
        )
    })?;
    if !linked_against(&bin, &lib_dir) {
        bail!(
            "{} was installed but does not use {}; is another bpf-linker earlier in PATH?",
            bin.display(),
            lib_dir.display()
        );
    }
    Ok(bin)
}

const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs at /sys/fs/bpf when it is not mounted (fwmark pins there).
fn ensure_bpffs() -> Result<()> {
    let fs_type = output(Command::new("stat").args(["-f", "-c", "%T", BPFFS])).unwrap_or_default();
    if fs_type.trim() == "bpf_fs" {
        eprintln!("setup: bpffs: mounted at {BPFFS}");
        return Ok(());
    }
    // Root only, as systemd and fwmark itself mount it.
    run(Command::new("mount").args(["-t", "bpf", "-o", "mode=0700", "bpf", BPFFS])).with_context(
        || format!("mounting bpffs failed; run `mount -t bpf -o mode=0700 bpf {BPFFS}`"),
    )?;
    eprintln!("setup: bpffs: mounted it at {BPFFS}");
    Ok(())
}
