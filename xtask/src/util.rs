//! Running commands, building fwmark, linting and testing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `cmd`, failing with a message when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Output of `cmd` (stdout), failing when it fails.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` and exits with its exit code.
pub fn exec(mut cmd: Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    std::process::exit(status.code().unwrap_or(1));
}

/// `program`, or `sudo -E program` when not root.
pub fn as_root(program: &Path) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        eprintln!("xtask: not root; running {} under sudo", program.display());
        let mut cmd = Command::new("sudo");
        cmd.arg("-E").arg(program);
        cmd
    }
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Builds the `fwmark` binary (with the classifier embedded); returns its path.
pub fn build_fwmark(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "fwmark-user", "--bin", "fwmark"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("fwmark"))
}

/// The Rust target of the static binaries (`cargo xtask setup` adds it).
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Builds `bin` of `package` statically linked for x86_64 (musl, release
/// profile; fwmark's classifier is embedded as in every build); returns the
/// binary's path. The musl target is self-contained (its own libc and
/// startup objects, linked by rustc's bundled linker setup), so nothing
/// but `rustup target add x86_64-unknown-linux-musl` is needed.
pub fn build_musl(package: &str, bin: &str) -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "--package",
        package,
        "--bin",
        bin,
        "--target",
        MUSL_TARGET,
    ]))
    .with_context(|| {
        format!("building {bin} for {MUSL_TARGET} failed (`cargo xtask setup` adds the target)")
    })?;
    Ok(root()
        .join("target")
        .join(MUSL_TARGET)
        .join("release")
        .join(bin))
}

/// Builds the `fwmark` binary the tests run (debug, with the test-only
/// fail-points of the `failpoints` feature); returns its path. Built on
/// its own, fwmark-user has no feature the test lab turns on, so the
/// feature is named here.
pub fn build_fwmark_for_tests() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--package",
        "fwmark-user",
        "--bin",
        "fwmark",
        "--features",
        "failpoints",
    ]))?;
    Ok(root().join("target/debug/fwmark"))
}

/// Builds the demo (`tests/src/bin/fwmark-demo.rs`); returns its path.
pub fn build_demo() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--package",
        "fwmark-testlab",
        "--bin",
        "fwmark-demo",
    ]))?;
    Ok(root().join("target/debug/fwmark-demo"))
}

/// Builds the benchmark (`bench/`, release); returns its path.
pub fn build_bench() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "fwmark-bench",
        "--bin",
        "fwmark-bench",
    ]))?;
    Ok(root().join("target/release/fwmark-bench"))
}

/// Builds the soak test (`soak/`); returns its path.
pub fn build_soak() -> Result<PathBuf> {
    run(cargo().args(["build", "--package", "fwmark-soak", "--bin", "fwmark-soak"]))?;
    Ok(root().join("target/debug/fwmark-soak"))
}

/// `cargo fmt --check` (the workspace and fuzz/) and `cargo clippy -D
/// warnings` over the workspace.
pub fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    // fuzz/ is a workspace of its own (nightly, cargo-fuzz).
    run(cargo().args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--check"]))
        .context("formatting differs: run `cargo fmt --manifest-path fuzz/Cargo.toml`")?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found problems")
}

/// Printed by a skipped kernel test (`fwmark_testlab::kernel::SKIP_MARKER`).
const SKIP_MARKER: &str = "SKIPPED kernel test";

/// Totals over every `test result:` line of a `cargo test` run, plus the
/// checks xtask runs itself (the VM test).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
}

impl Tally {
    /// Adds a libtest summary line such as
    /// `test result: ok. 13 passed; 0 failed; 0 ignored; ...`. Ignored
    /// tests count as skipped (with `--include-ignored` there are none).
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.skipped += n,
                _ => {}
            }
        }
    }
}

/// Every test of the workspace, the root-only ones included (they are
/// `#[ignore = "needs root…"]`, so a plain `cargo test` lists them as
/// ignored; here `--include-ignored` runs them); test binaries run under
/// sudo when not root. Returns the tally (kernel tests whose gate skipped
/// them count as skipped, not passed) and whether `cargo test` succeeded.
pub fn test(bin: &Path, args: &[String]) -> Result<(Tally, bool)> {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        process::Stdio,
        sync::{Arc, Mutex},
    };

    let mut cmd = cargo();
    // --no-fail-fast: a failing test binary must not hide the results of
    // the ones after it.
    cmd.args([
        "test",
        "--workspace",
        "--exclude",
        "fwmark-ebpf",
        "--no-fail-fast",
    ])
    .args(args);
    // The test binaries' own arguments come after `--`.
    if !args.iter().any(|a| a == "--") {
        cmd.arg("--");
    }
    cmd.arg("--include-ignored")
        .env("FWMARK_BIN", bin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !is_root() {
        if have("sudo") {
            eprintln!("xtask: not root; test binaries run under sudo");
            cmd.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
        } else {
            eprintln!(
                "xtask: not root and no sudo: kernel tests will be skipped \
                 (or fail with FWMARK_REQUIRE_KERNEL_TESTS=1)"
            );
        }
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    // Echo both streams as they come, counting results and skips.
    let stderr = child.stderr.take().expect("piped stderr");
    let skips = Arc::clone(&tally);
    let err_thread = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(SKIP_MARKER) {
                skips.lock().expect("tally").skipped += 1;
            }
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    });
    for line in BufReader::new(child.stdout.take().expect("piped stdout"))
        .lines()
        .map_while(Result::ok)
    {
        tally.lock().expect("tally").add_line(&line);
        println!("{line}");
    }
    let status = child.wait()?;
    let _ = err_thread.join();
    let mut t = std::mem::take(&mut *tally.lock().expect("tally"));
    // Kernel tests whose gate skipped them (no root, a missing tool)
    // return early and count as passed in libtest.
    t.passed = t.passed.saturating_sub(t.skipped);
    if !status.success() {
        eprintln!("xtask: cargo test failed: {status}");
    }
    Ok((t, status.success()))
}

/// Prints the last line of `cargo xtask test`,
/// `fwmark tests: N passed, N failed, N skipped`, and fails when anything did.
pub fn report(t: &Tally, cargo_ok: bool) -> Result<()> {
    println!(
        "fwmark tests: {} passed, {} failed, {} skipped",
        t.passed, t.failed, t.skipped
    );
    if !cargo_ok {
        bail!("cargo test failed");
    }
    if t.failed > 0 {
        bail!("{} tests failed", t.failed);
    }
    Ok(())
}

/// True when `program --version` runs.
pub fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn tally_reads_libtest_summaries() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 13 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.79s");
        t.add_line(
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("test something ... ok");
        t.add_line("test result: ok. 5 passed; 0 failed; 3 ignored; 0 measured; 0 filtered out");
        assert_eq!(
            t,
            Tally {
                passed: 20,
                failed: 1,
                skipped: 3
            }
        );
    }
}
