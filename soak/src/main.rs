//! `cargo xtask soak`: see the `fwmark_soak` library. Usage (as root):
//! fwmark-soak --fwmark FWMARK_BIN (--minutes M | --seconds S) [--out FILE]
//! Prints the report (and writes it to FILE); exits 1 when a check failed.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use fwmark_soak::{self as soak, Options};

const USAGE: &str = "usage: fwmark-soak --fwmark BIN (--minutes M | --seconds S) [--out FILE]";

fn number(flag: &str, value: Option<String>) -> Result<f64> {
    let text = value.with_context(|| format!("{flag} needs a number; {USAGE}"))?;
    let n: f64 = text
        .parse()
        .with_context(|| format!("{flag} {text:?} is not a number; {USAGE}"))?;
    if !(n.is_finite() && n > 0.0) {
        bail!("{flag} must be more than 0, not {text}");
    }
    Ok(n)
}

fn main() -> Result<()> {
    let mut seconds: Option<f64> = None;
    let mut out: Option<PathBuf> = None;
    let mut fwmark: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--minutes" => seconds = Some(number("--minutes", args.next())? * 60.0),
            "--seconds" => seconds = Some(number("--seconds", args.next())?),
            "--out" => out = args.next().map(Into::into),
            "--fwmark" => fwmark = args.next().map(Into::into),
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    let fwmark = fwmark.with_context(|| format!("--fwmark BIN is required; {USAGE}"))?;
    let seconds =
        seconds.with_context(|| format!("--minutes or --seconds is required; {USAGE}"))?;
    if seconds < 8.0 {
        bail!("a soak of {seconds} s is too short to judge: give at least 8 seconds");
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the soak creates namespaces and loads eBPF programs: run it as root (`cargo xtask soak`)"
        );
    }
    let outcome = soak::run(&Options {
        duration: Duration::from_secs_f64(seconds),
        fwmark,
    })?;
    println!("{}", outcome.report);
    if let Some(path) = out {
        std::fs::write(&path, &outcome.report)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if !outcome.passed {
        eprintln!("soak FAILED:");
        for v in &outcome.violations {
            eprintln!("  {v}");
        }
        std::process::exit(1);
    }
    Ok(())
}
