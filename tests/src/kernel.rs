//! Gate for tests that need the real kernel (root, `ip`, `nft`).
//!
//! Every test that calls it is also `#[ignore = "needs root: …"]`, so a
//! plain `cargo test` lists it as ignored rather than passed; `cargo xtask
//! test` runs them with `--include-ignored` (as does `cargo test -- --include-ignored`
//! by hand, as root). Run that way, the gate still skips a test loudly
//! when root or a tool is missing, or fails it with [`REQUIRE_ENV`]`=1`.

/// Set to `1` to turn every skip of a kernel test into a failure (CI does).
pub const REQUIRE_ENV: &str = "FWMARK_REQUIRE_KERNEL_TESTS";

/// Printed (on stderr) by every skipped kernel test; `cargo xtask test` counts it.
pub const SKIP_MARKER: &str = "SKIPPED kernel test";

fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

fn have(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// True when the kernel test `name` can run. Otherwise prints a loud SKIP
/// line and returns false, or panics when [`REQUIRE_ENV`] is `1`.
pub fn available(name: &str, tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    for tool in tools {
        if !have(tool) {
            missing.push(format!("the `{tool}` command"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "kernel test {name} needs {}; run `cargo xtask test` (it re-runs under sudo)",
        missing.join(" and ")
    );
    if required() {
        panic!("{why}, and {REQUIRE_ENV}=1 forbids skipping it");
    }
    // Written to the process's stderr directly: libtest captures eprintln!
    // of passing tests, and a skip must be seen.
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "\n!!!!! {SKIP_MARKER}: {why} !!!!!\n");
    false
}
