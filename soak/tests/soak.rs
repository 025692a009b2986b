//! The soak harness cannot rot: `fwmark-soak --seconds 20` runs here, the
//! same code as `cargo xtask soak --minutes N`, against the real kernel.
//! Its checks are the test: any unmarked or mis-marked packet, counter that
//! went down or disagrees with nftables, leaked fd or kernel object fails
//! it. Throughput is never judged.

use fwmark_testlab::{daemon::fwmark_bin, kernel};

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn twenty_second_soak_passes_every_check() {
    if !kernel::available("20-second soak", &["ip", "nft", "nsenter"]) {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fwmark-soak"))
        .args(["--seconds", "20", "--fwmark"])
        .arg(fwmark_bin())
        .output()
        .expect("run fwmark-soak");
    let report = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "soak failed:\n{log}\n{report}");
    assert!(report.contains("**PASSED**: "), "{report}");
    for heading in [
        "## Figures",
        "## Marks per probe",
        "## fwmark's counters against nftables at the end",
        "## Stability",
        "## Samples",
        "## Method",
    ] {
        assert!(report.contains(heading), "missing {heading}:\n{report}");
    }
    // Every kind of check ran, and did so many times.
    for (kind, at_least) in [
        ("mark", 100),
        ("counter monotonic", 100),
        ("counter vs nft", 100),
        ("config identity", 10),
        ("kernel objects", 5),
        ("final marks", 18),
        ("stability", 5),
    ] {
        let line = report
            .lines()
            .find(|l| l.starts_with(&format!("| checks: {kind} |")))
            .unwrap_or_else(|| panic!("no checks of kind {kind}:\n{report}"));
        let n: u64 = line
            .split('|')
            .nth(2)
            .and_then(|c| c.split_whitespace().next())
            .map(|c| c.replace(',', ""))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no count in {line}"));
        assert!(n >= at_least, "only {n} checks of kind {kind}: {line}");
        assert!(line.ends_with("(0 failed) |"), "{line}");
    }
}
