//! `cargo xtask fuzz`: the cargo-fuzz targets of `fuzz/` for a fixed time
//! each, with nightly. `cargo xtask test` runs every target briefly and
//! counts each as one test; a crash fails the run and names its reproducer.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::util::{output, root, run};

/// The cargo-fuzz release `setup` installs (`cargo install --locked`).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every target in `fuzz/fuzz_targets/`.
pub const TARGETS: [&str; 3] = ["config", "import", "frame"];

/// Seconds per target in `cargo xtask test`.
pub const TEST_SECONDS: u64 = 30;

fn cargo_fuzz_bin() -> PathBuf {
    crate::setup::cargo_bin_dir().join("cargo-fuzz")
}

/// Installs cargo-fuzz `CARGO_FUZZ_VERSION` unless it is there already.
pub fn ensure_cargo_fuzz() -> Result<()> {
    let bin = cargo_fuzz_bin();
    let want = format!("cargo-fuzz {CARGO_FUZZ_VERSION}");
    if output(Command::new(&bin).arg("--version")).is_ok_and(|v| v.trim() == want) {
        eprintln!("setup: cargo-fuzz: {} ({want})", bin.display());
        return Ok(());
    }
    eprintln!("setup: cargo-fuzz: installing {want} (about half a minute, once)");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--force",
        "--version",
        CARGO_FUZZ_VERSION,
    ])
    .env_remove("CARGO_TARGET_DIR")
    .env_remove("CARGO_BUILD_TARGET_DIR");
    run(&mut cmd).context("installing cargo-fuzz failed; it needs crates.io")?;
    Ok(())
}

/// How one target's run ended.
#[derive(Debug)]
pub struct Outcome {
    pub target: String,
    /// `Err`: what failed, with the reproducer when there is one.
    pub result: Result<String, String>,
}

/// `rustup run nightly cargo fuzz SUBCOMMAND` at the workspace root, without
/// the variables the outer (stable) cargo set for xtask.
fn cargo_fuzz(subcommand: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.env("RUSTUP_AUTO_INSTALL", "0")
        .args(["run", "nightly", "cargo", "fuzz", subcommand])
        .current_dir(root());
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// The build options every run uses: no sanitizer (the fuzzed code is safe
/// Rust: there is no memory error for ASan to find, and it halves the
/// speed), debug assertions and overflow checks on.
const BUILD_ARGS: [&str; 3] = ["--sanitizer", "none", "--debug-assertions"];

/// Builds every fuzz target.
pub fn build() -> Result<()> {
    let mut cmd = cargo_fuzz("build");
    cmd.args(BUILD_ARGS);
    run(&mut cmd).context("building the fuzz targets failed")
}

/// Runs `target` for `seconds` from the committed corpus (read only: new
/// inputs go to a scratch corpus under fuzz/target/), with its dictionary.
pub fn run_target(target: &str, seconds: u64) -> Outcome {
    let result = run_inner(target, seconds);
    Outcome {
        target: target.to_string(),
        result,
    }
}

fn run_inner(target: &str, seconds: u64) -> Result<String, String> {
    let fuzz = root().join("fuzz");
    let scratch = fuzz.join("target/xtask/corpus").join(target);
    let log_path = fuzz.join("target/xtask").join(format!("{target}.log"));
    let prepare = || -> std::io::Result<()> {
        if scratch.exists() {
            fs::remove_dir_all(&scratch)?;
        }
        fs::create_dir_all(&scratch)
    };
    prepare().map_err(|e| format!("preparing {}: {e}", scratch.display()))?;
    let mut cmd = cargo_fuzz("run");
    cmd.args(BUILD_ARGS)
        .arg(target)
        .arg(&scratch)
        .arg(fuzz.join("corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!(
            "-dict={}",
            fuzz.join("dict").join(format!("{target}.dict")).display()
        ))
        // An input that takes this long is a hang, not a slow input.
        .arg("-timeout=20")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("fuzz: {target}: {seconds} s (log: {})", log_path.display());
    let log = run_logged(cmd, &log_path).map_err(|e| format!("{e:#}"))?;
    let summary = summary(&log.text);
    if log.success {
        return Ok(summary);
    }
    for line in failure_excerpt(&log.text) {
        eprintln!("fuzz: {target}: {line}");
    }
    match reproducer(&log.text) {
        Some(path) => {
            let path = if path.is_absolute() {
                path
            } else {
                root().join(path)
            };
            Err(format!(
                "{summary}; reproducer: {} (replay: cargo +nightly fuzz run {} {target} {})",
                path.display(),
                BUILD_ARGS.join(" "),
                path.display()
            ))
        }
        None => Err(format!(
            "{summary}; cargo fuzz failed without a reproducer, see {}",
            log_path.display()
        )),
    }
}

struct Logged {
    success: bool,
    text: String,
}

/// Runs `cmd`, writing both streams to `log_path`; libFuzzer's progress
/// lines stay in the log, and only its summary is printed.
fn run_logged(mut cmd: Command, log_path: &Path) -> Result<Logged> {
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let out_thread = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut text = String::new();
    for line in BufReader::new(child.stderr.take().expect("piped stderr"))
        .lines()
        .map_while(Result::ok)
    {
        text.push_str(&line);
        text.push('\n');
    }
    for line in out_thread.join().unwrap_or_default() {
        text.push_str(&line);
        text.push('\n');
    }
    let status = child.wait()?;
    if let Some(dir) = log_path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::File::create(log_path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", log_path.display()))?;
    Ok(Logged {
        success: status.success(),
        text,
    })
}

/// "N runs in S s, cov C, ft F, corpus U" from libFuzzer's output.
fn summary(log: &str) -> String {
    let done = log
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("Done "))
        .map(|d| d.trim().to_string());
    let last_status = log
        .lines()
        .rev()
        .find(|l| l.starts_with('#') && l.contains(" cov: "));
    let field = |name: &str| {
        last_status.and_then(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == name)?;
            words.next().map(str::to_string)
        })
    };
    let mut parts = Vec::new();
    if let Some(d) = done {
        parts.push(d);
    }
    for (label, name) in [("cov", "cov:"), ("ft", "ft:"), ("corpus", "corp:")] {
        if let Some(v) = field(name) {
            parts.push(format!("{label} {v}"));
        }
    }
    if parts.is_empty() {
        "no libFuzzer statistics".to_string()
    } else {
        parts.join(", ")
    }
}

/// What to show of a failed run: the panic message (up to the backtrace),
/// else the log's last lines.
fn failure_excerpt(log: &str) -> Vec<&str> {
    let lines: Vec<&str> = log.lines().collect();
    match lines.iter().position(|l| l.contains(" panicked at ")) {
        Some(start) => lines[start..]
            .iter()
            .take_while(|l| !l.starts_with("stack backtrace:"))
            .take(60)
            .copied()
            .collect(),
        None => lines[lines.len().saturating_sub(30)..].to_vec(),
    }
}

/// The input libFuzzer saved for a crash, timeout or out-of-memory.
fn reproducer(log: &str) -> Option<PathBuf> {
    log.lines()
        .filter_map(|l| l.split_once("Test unit written to "))
        .map(|(_, p)| PathBuf::from(p.trim()))
        .rfind(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with("slow-unit-"))
        })
}

/// `cargo xtask fuzz` (after setup, which installs cargo-fuzz): every
/// target (or one) for `seconds` each.
pub fn fuzz(target: Option<&str>, seconds: u64) -> Result<()> {
    let targets: Vec<&str> = match target {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target {t:?}; there are {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    build()?;
    let outcomes: Vec<Outcome> = targets.iter().map(|t| run_target(t, seconds)).collect();
    report(&outcomes)
}

/// One line per target; fails when one failed.
pub fn report(outcomes: &[Outcome]) -> Result<()> {
    let mut failed = 0;
    for o in outcomes {
        match &o.result {
            Ok(s) => println!("fuzz {}: ok: {s}", o.target),
            Err(e) => {
                failed += 1;
                println!("fuzz {}: FAILED: {e}", o.target);
            }
        }
    }
    if failed > 0 {
        bail!("{failed} fuzz target(s) failed");
    }
    Ok(())
}

/// Every target for `seconds`, for `cargo xtask test`: builds once, then
/// runs each; a build failure fails every target.
pub fn for_test(seconds: u64) -> Vec<Outcome> {
    if let Err(e) = build() {
        return TARGETS
            .iter()
            .map(|t| Outcome {
                target: t.to_string(),
                result: Err(format!("{e:#}")),
            })
            .collect();
    }
    TARGETS.iter().map(|t| run_target(t, seconds)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRASH: &str = "\
#2\tINITED cov: 812 ft: 1024 corp: 12/3Kb exec/s: 0 rss: 40Mb
#9127\tNEW    cov: 815 ft: 1031 corp: 13/3Kb lim: 48 exec/s: 4563 rss: 41Mb L: 41/300 MS: 1 ChangeBit-
thread '<unnamed>' panicked at src/lib.rs:10:5:
==1234== ERROR: libFuzzer: deadly signal
MS: 1 ChangeBit-; base unit: 0000
artifact_prefix='/w/fuzz/artifacts/config/'; Test unit written to /w/fuzz/artifacts/config/crash-abc
Base64: AAAA
";

    #[test]
    fn finds_the_reproducer_and_not_slow_units() {
        assert_eq!(
            reproducer(CRASH),
            Some(PathBuf::from("/w/fuzz/artifacts/config/crash-abc"))
        );
        assert_eq!(
            reproducer("Test unit written to fuzz/artifacts/import/slow-unit-1\n"),
            None
        );
    }

    #[test]
    fn shows_the_panic_message() {
        let log = "#1 INITED\nthread '<unnamed>' panicked at src/lib.rs:1:1:\nwhy\nstack backtrace:\n 0: x\n";
        assert_eq!(
            failure_excerpt(log),
            vec!["thread '<unnamed>' panicked at src/lib.rs:1:1:", "why"]
        );
        assert_eq!(failure_excerpt("a\nb\n"), vec!["a", "b"]);
    }

    #[test]
    fn summarises_the_last_status_line() {
        let done = format!(
            "{CRASH}#20000\tDONE   cov: 900 ft: 2000 corp: 40/9Kb exec/s: 666 rss: 60Mb\nDone 20000 runs in 30 second(s)\n"
        );
        assert_eq!(
            summary(&done),
            "20000 runs in 30 second(s), cov 900, ft 2000, corpus 40/9Kb"
        );
        assert_eq!(summary(""), "no libFuzzer statistics");
    }
}
