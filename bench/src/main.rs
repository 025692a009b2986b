//! `cargo xtask bench`: see the `fwmark_bench` library. Usage (as root):
//! fwmark-bench --fwmark FWMARK_BIN [--quick] [--e2e-budget SECONDS] [--out DIR]
//!              [--only classifier|apply|scrape]
//! Prints the tables; with --out writes DIR/benchmarks.md and
//! DIR/benchmarks.png. --only runs one section alone and prints its targets
//! and table (nothing is written). --e2e-budget bounds how long the end-to-end section
//! repeats its rounds to decide its targets (default 300 s, 20 s quick).

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use fwmark_bench::{self as bench, Options};

fn main() -> Result<()> {
    let mut quick = false;
    let mut budget: Option<f64> = None;
    let mut out: Option<PathBuf> = None;
    let mut fwmark: Option<PathBuf> = None;
    let mut only: Option<bench::Section> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => out = args.next().map(Into::into),
            "--fwmark" => fwmark = args.next().map(Into::into),
            "--only" => {
                let v = args
                    .next()
                    .context("--only needs a section: apply or scrape")?;
                only = Some(v.parse().map_err(anyhow::Error::msg)?);
            }
            "--e2e-budget" => {
                let v = args.next().context("--e2e-budget needs SECONDS")?;
                budget = Some(
                    v.parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .with_context(|| {
                            format!("--e2e-budget {v:?}: give a number of seconds, e.g. 300")
                        })?,
                );
            }
            other => bail!(
                "unknown argument {other:?}; usage: fwmark-bench --fwmark BIN [--quick] [--e2e-budget SECONDS] [--out DIR] [--only classifier|apply|scrape]"
            ),
        }
    }
    let fwmark = fwmark.context("--fwmark BIN is required (the fwmark binary to time)")?;
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the benchmark loads eBPF programs and creates namespaces: run it as root (`cargo xtask bench`)"
        );
    }
    let mut opts = Options::new(quick);
    if let Some(b) = budget {
        opts.e2e_budget = b;
    }
    if let Some(section) = only {
        println!("{}", bench::run_only(section, opts, &fwmark)?);
        return Ok(());
    }
    let report = bench::run(opts, &fwmark)?;
    println!("{}", report.markdown);
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("benchmarks.md"), &report.markdown)?;
        std::fs::write(dir.join("benchmarks.png"), &report.png)?;
        eprintln!(
            "wrote {0}/benchmarks.md and {0}/benchmarks.png",
            dir.display()
        );
    }
    Ok(())
}
