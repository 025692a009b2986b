//! `cargo xtask …`: everything a fresh machine needs, from one entry point.

mod debvm;
mod dist;
mod fuzz;
mod qemu;
mod setup;
mod util;
mod vm;

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
    /// Build the release artifacts into target/dist/: the static (musl)
    /// binary, the Debian package, the tarball and SHA256SUMS; then check
    /// them (contents, static binary, lintian).
    Dist,
    /// fwmark with real IPVS: boot Debian's cloud kernels (11: 5.10, 12:
    /// 6.1, 13: 6.12) in qemu from cached busybox initramfs images and run
    /// the IPVS scenario there with static fwmark (tests/src/vm.rs). Part of
    /// `test`.
    VmTest {
        /// Only this kernel: 5.10, 6.1 or 6.12 (or bullseye, bookworm,
        /// trixie; or 11, 12, 13). Default: all three.
        #[arg(long)]
        kernel: Option<String>,
    },
    /// fwmark's Debian package in a real Debian 12 (systemd as PID 1,
    /// keepalived, real IPVS) on Debian's cloud kernel in qemu: install,
    /// readiness before keepalived, reload, reinstall without a gap, purge.
    /// The image is built once with mmdebstrap and cached in .cache/debvm.
    /// Part of `test`.
    VmDebian {
        /// The package to test (default: the one `cargo xtask dist` builds).
        #[arg(long)]
        deb: Option<std::path::PathBuf>,
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
        /// Seconds the end-to-end section may spend repeating its rounds
        /// until its targets are decided (default: 300, or 20 with --quick).
        #[arg(long)]
        e2e_budget: Option<f64>,
        /// Run one section alone (`classifier`: the classifier, memory and
        /// port-range sections; `apply`; `scrape`) and print its targets and
        /// tables; docs/ is not written.
        #[arg(long, value_name = "SECTION")]
        only: Option<String>,
    },
    /// Run traffic through fwmark (release build, as root) while its config
    /// changes every second, checking marks, counters, memory, file
    /// descriptors and kernel objects all along; print the report.
    Soak {
        /// How long, in minutes (fractions allowed).
        #[arg(long, conflicts_with = "seconds", required_unless_present = "seconds")]
        minutes: Option<f64>,
        /// How long, in seconds.
        #[arg(long)]
        seconds: Option<f64>,
        /// Also write the report to docs/soak.md.
        #[arg(long)]
        record: bool,
    },
}

/// The VM test as one test of `cargo xtask test`: a machine that cannot
/// run it skips it loudly (a failure with FWMARK_REQUIRE_KERNEL_TESTS=1).
/// Each kernel counts as one test.
fn vm_test_counted(tally: &mut util::Tally) -> Result<()> {
    let outcomes =
        static_binaries().and_then(|(bin, guest)| vm::run_kernels(&bin, &guest, &vm::SUITES));
    match outcomes {
        Ok(outcomes) => {
            for o in outcomes {
                println!(
                    "xtask: VM test on {} ({}): {}, attached through {}, guest {:.1} s{}",
                    o.kver,
                    o.suite.name,
                    if o.passed { "passed" } else { "FAILED" },
                    o.attach.as_deref().unwrap_or("?"),
                    o.guest.as_secs_f64(),
                    if o.passed {
                        String::new()
                    } else {
                        format!(" (console: {})", o.log.display())
                    }
                );
                if o.passed {
                    tally.passed += 1;
                } else {
                    tally.failed += 1;
                }
            }
        }
        Err(e) if e.downcast_ref::<vm::Unavailable>().is_some() => {
            eprintln!("xtask: SKIPPED the VM test (real IPVS): {e}");
            if std::env::var("FWMARK_REQUIRE_KERNEL_TESTS").is_ok_and(|v| v == "1") {
                eprintln!("xtask: FWMARK_REQUIRE_KERNEL_TESTS=1: a skipped VM test is a failure");
                tally.failed += 1;
            } else {
                tally.skipped += 1;
            }
        }
        Err(e) => {
            eprintln!("xtask: the VM test failed: {e:#}");
            tally.failed += 1;
        }
    }
    Ok(())
}

/// The Debian VM test as one test of `cargo xtask test`, counted like
/// [`vm_test_counted`].
fn vm_debian_counted(tally: &mut util::Tally) -> Result<()> {
    match debian_package().and_then(|deb| debvm::vm_debian(&deb)) {
        Ok(()) => tally.passed += 1,
        Err(e) if e.downcast_ref::<vm::Unavailable>().is_some() => {
            eprintln!("xtask: SKIPPED the Debian VM test: {e}");
            if std::env::var("FWMARK_REQUIRE_KERNEL_TESTS").is_ok_and(|v| v == "1") {
                eprintln!(
                    "xtask: FWMARK_REQUIRE_KERNEL_TESTS=1: a skipped Debian VM test is a failure"
                );
                tally.failed += 1;
            } else {
                tally.skipped += 1;
            }
        }
        Err(e) => {
            eprintln!("xtask: the Debian VM test failed: {e:#}");
            tally.failed += 1;
        }
    }
    Ok(())
}

/// The package the Debian VM test installs: the one `cargo xtask dist`
/// builds (the musl build is cached, so after `dist_counted` this only
/// packs again).
fn debian_package() -> Result<std::path::PathBuf> {
    Ok(dist::dist()?.deb)
}

/// The artifacts' check as one test of `cargo xtask test` (the musl
/// build is shared with the VM tests, so it costs the packaging only).
fn dist_counted(tally: &mut util::Tally) {
    match dist::dist().and_then(|a| dist::check(&a)) {
        Ok(()) => tally.passed += 1,
        Err(e) => {
            eprintln!("xtask: the artifacts check failed: {e:#}");
            tally.failed += 1;
        }
    }
}

/// The static `fwmark` and `fwmark-vm-guest` the VM guests run.
fn static_binaries() -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    Ok((
        util::build_musl("fwmark-user", "fwmark")?,
        util::build_musl("fwmark-testlab", "fwmark-vm-guest")?,
    ))
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
            let bin = util::build_fwmark_for_tests()?;
            let (mut tally, cargo_ok) = util::test(&bin, &args)?;
            // The VM test and the fuzz targets run with the whole suite, not
            // with a filter; each counts as one test.
            if args.is_empty() {
                dist_counted(&mut tally);
                vm_test_counted(&mut tally)?;
                vm_debian_counted(&mut tally)?;
            } else {
                eprintln!(
                    "xtask: a test filter was given: the artifacts check, the VM test and fuzz targets not run"
                );
            }
            let outcomes = if fuzz_seconds == 0 || !args.is_empty() {
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
            // Each target's summary; its failures are already in the tally.
            if let Err(e) = fuzz::report(&outcomes) {
                eprintln!("xtask: {e}");
            }
            util::report(&tally, cargo_ok)
        }
        Task::Dist => {
            setup::setup()?;
            let started = std::time::Instant::now();
            let artifacts = dist::dist()?;
            dist::check(&artifacts)?;
            for path in [
                &artifacts.binary,
                &artifacts.deb,
                &artifacts.tarball,
                &artifacts.sums,
            ] {
                let size = std::fs::metadata(path)?.len();
                println!("{:>10}  {}", size, path.display());
            }
            println!(
                "xtask: dist built and checked in {:.0} s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Task::VmTest { kernel } => {
            let suites = match kernel {
                Some(which) => vec![vm::suite(&which)?],
                None => vm::SUITES.to_vec(),
            };
            setup::setup()?;
            let (bin, guest) = static_binaries()?;
            vm::vm_test(&bin, &guest, &suites)
        }
        Task::VmDebian { deb } => {
            let deb = match deb {
                Some(deb) => deb,
                None => {
                    setup::setup()?;
                    debian_package()?
                }
            };
            debvm::vm_debian(&deb)
        }
        Task::Fuzz { target, seconds } => {
            setup::setup()?;
            fuzz::fuzz(target.as_deref(), seconds)
        }
        Task::Bench {
            quick,
            e2e_budget,
            only,
        } => {
            setup::setup()?;
            let fwmark = util::build_fwmark(true)?;
            let bench = util::build_bench()?;
            let mut cmd = util::as_root(&bench);
            cmd.arg("--fwmark").arg(&fwmark);
            if let Some(b) = e2e_budget {
                cmd.arg("--e2e-budget").arg(b.to_string());
            }
            if let Some(section) = &only {
                cmd.arg("--only").arg(section);
            }
            if quick {
                cmd.arg("--quick");
            } else if only.is_none() {
                cmd.arg("--out").arg(util::root().join("docs"));
            }
            util::exec(cmd)
        }
        Task::Soak {
            minutes,
            seconds,
            record,
        } => {
            setup::setup()?;
            let fwmark = util::build_fwmark(true)?;
            let soak = util::build_soak()?;
            let mut cmd = util::as_root(&soak);
            cmd.arg("--fwmark").arg(&fwmark);
            match (minutes, seconds) {
                (Some(m), _) => cmd.arg("--minutes").arg(m.to_string()),
                (None, Some(s)) => cmd.arg("--seconds").arg(s.to_string()),
                (None, None) => unreachable!("clap requires one"),
            };
            if record {
                cmd.arg("--out").arg(util::root().join("docs/soak.md"));
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
