//! `cargo xtask …`: everything a fresh machine needs, from one entry point.

mod fuzz;
mod setup;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "fwmark's build tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Make this machine ready: nightly rust-src, bpf-linker built against
    /// nightly's libLLVM, bpffs; check root and the test tools. Idempotent.
    Setup,
    /// Set up, then build fwmark (the eBPF classifier is embedded).
    Build {
        /// Build with optimizations.
        #[arg(long)]
        release: bool,
    },
    /// Build (release) and run `fwmark run ARGS…`, under sudo when not root.
    /// Example: cargo xtask run -- --iface eth0 --config fwmark.example.toml
    Run {
        /// Arguments for `fwmark run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, lint (fmt, clippy) and run every test, kernel tests included
    /// (test binaries run under sudo when not root).
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// Seconds each fuzz target runs (0: none). Fuzzing is skipped when
        /// a test filter is given.
        #[arg(long, default_value_t = fuzz::TEST_SECONDS)]
        fuzz_seconds: u64,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the cargo-fuzz targets (config, import) with nightly from the
    /// committed corpus; a crash fails and names its reproducer.
    Fuzz {
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = fuzz::TEST_SECONDS)]
        seconds: u64,
    },
    /// Build, then show fwmark marking real traffic between two throwaway
    /// network namespaces, with the example config.
    Demo,
    /// Measure fwmark beside its floor, iptables and nftables (release
    /// build, as root) and write docs/benchmarks.md and docs/benchmarks.png.
    Bench {
        /// Small sizes, a few seconds (what the test suite runs).
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Build { release } => {
            setup::setup()?;
            util::build_fwmark(release).map(|_| ())
        }
        Task::Run { args } => {
            setup::setup()?;
            let bin = util::build_fwmark(true)?;
            let mut cmd = util::as_root(&bin);
            cmd.arg("run").args(&args);
            util::exec(cmd)
        }
        Task::Test {
            no_lint,
            fuzz_seconds,
            args,
        } => {
            setup::setup()?;
            if !no_lint {
                util::lint()?;
            }
            let bin = util::build_fwmark(false)?;
            let (mut tally, cargo_ok) = util::test(&bin, &args)?;
            // Each fuzz target counts as one test.
            let outcomes = if fuzz_seconds == 0 {
                Vec::new()
            } else if !args.is_empty() {
                eprintln!("xtask: a test filter was given: fuzz targets not run");
                Vec::new()
            } else {
                fuzz::for_test(fuzz_seconds)
            };
            for o in &outcomes {
                if o.result.is_ok() {
                    tally.passed += 1;
                } else {
                    tally.failed += 1;
                }
            }
            let fuzz_result = fuzz::report(&outcomes);
            util::print_totals(&tally);
            if !cargo_ok {
                anyhow::bail!("cargo test failed");
            }
            fuzz_result
        }
        Task::Fuzz { target, seconds } => {
            setup::setup()?;
            fuzz::fuzz(target.as_deref(), seconds)
        }
        Task::Bench { quick } => {
            setup::setup()?;
            let fwmark = util::build_fwmark(true)?;
            let bench = util::build_bench()?;
            let mut cmd = util::as_root(&bench);
            cmd.arg("--fwmark").arg(&fwmark);
            if quick {
                cmd.arg("--quick");
            } else {
                cmd.arg("--out").arg(util::root().join("docs"));
            }
            util::exec(cmd)
        }
        Task::Demo => {
            setup::setup()?;
            let bin = util::build_fwmark(false)?;
            let demo = util::build_demo()?;
            let mut cmd = util::as_root(&demo);
            cmd.arg(&bin).arg(util::root().join("fwmark.example.toml"));
            util::exec(cmd)
        }
    }
}
