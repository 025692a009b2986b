//! `cargo xtask bench`: see the `fwmark_bench` library. Usage (as root):
//! fwmark-bench --fwmark FWMARK_BIN [--quick] [--classifier-only] [--e2e-budget SECONDS] [--out DIR]
//! Prints the tables; with --out writes DIR/benchmarks.md and
//! DIR/benchmarks.png. --e2e-budget bounds how long the end-to-end section
//! repeats its rounds to decide its targets (default 300 s, 20 s quick).
//! --classifier-only runs the classifier, memory and port-range sections
//! alone and prints them with their targets (no report written).

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use fwmark_bench::{self as bench, Options};

fn main() -> Result<()> {
    let mut quick = false;
    let mut classifier_only = false;
    let mut budget: Option<f64> = None;
    let mut out: Option<PathBuf> = None;
    let mut fwmark: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--classifier-only" => classifier_only = true,
            "--out" => out = args.next().map(Into::into),
            "--fwmark" => fwmark = args.next().map(Into::into),
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
                "unknown argument {other:?}; usage: fwmark-bench --fwmark BIN [--quick] [--e2e-budget SECONDS] [--out DIR]"
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
    if classifier_only {
        // Sections 1, 4 and 6 alone, printed with their targets.
        let points = bench::classifier(opts)?;
        let ranges = bench::ranges()?;
        for t in [
            bench::classifier_table(&points),
            bench::memory_table(&points),
            bench::ranges_table(&ranges),
        ] {
            println!("{}", t.markdown());
        }
        let checks = bench::other_checks(&points, &[], &[]);
        for c in checks.iter().chain(&bench::range_checks(&ranges)) {
            println!("- {}", c.line());
        }
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
