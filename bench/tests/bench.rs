//! The benchmark harness cannot rot: `fwmark-bench --quick` runs here and
//! its report must be well formed. No speed is asserted (benchmarks are not
//! timed tests); `cargo xtask bench` produces the real figures.

use fwmark_testlab::{daemon::fwmark_bin, kernel};

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn quick_benchmark_report_is_well_formed() {
    if !kernel::available("quick benchmark", &["ip", "nft", "iptables", "nsenter"]) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("fwmark-benchq-{}", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fwmark-bench"))
        .args(["--quick", "--fwmark"])
        .arg(fwmark_bin())
        .arg("--out")
        .arg(&dir)
        .output()
        .expect("run fwmark-bench");
    assert!(
        out.status.success(),
        "fwmark-bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(dir.join("benchmarks.md")).unwrap();
    for heading in [
        "## Targets",
        "### 1. Classifier cost",
        "### 2. End to end",
        "### 2b. The program's own cost",
        "### 3. Apply time",
        "### 4. Kernel memory",
        "### 5. Metrics scrape",
        "### 6. Port ranges",
    ] {
        assert!(md.contains(heading), "missing {heading}:\n{md}");
    }
    // Every table: a header, a separator, rows with as many cells, and
    // numbers where numbers belong (a cell is "median [p25 to p75]", a
    // plain figure, or the words for a cost below the noise).
    let mut tables = 0;
    let lines: Vec<&str> = md.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with("|---") {
            continue;
        }
        tables += 1;
        let width = lines[i - 1].matches('|').count();
        let rows: Vec<&&str> = lines[i + 1..]
            .iter()
            .take_while(|l| l.starts_with('|'))
            .collect();
        assert!(!rows.is_empty(), "empty table above line {i}");
        for row in rows {
            assert_eq!(row.matches('|').count(), width, "ragged row {row}");
            let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
            let leading = |c: &str| {
                c.split_whitespace()
                    .next()
                    .and_then(|w| w.trim_end_matches('x').parse::<f64>().ok())
            };
            assert!(
                cells[1..].iter().any(|c| leading(c).is_some()),
                "no figure in {row}"
            );
            // Never a negative cost: the added-cost column of section 2
            // holds a positive median or the words for noise.
            if lines[i - 1].contains("added ns per packet") && !cells[0].starts_with("no marker") {
                let added = cells[3];
                assert!(
                    added == fwmark_bench::stats::BELOW_NOISE
                        || leading(added).is_some_and(|v| v > 0.0),
                    "negative or missing cost in {row}"
                );
            }
        }
    }
    assert_eq!(tables, 7, "{md}");
    let targets = md
        .lines()
        .filter(|l| {
            l.starts_with("- ")
                && (l.contains(": met (")
                    || l.contains(": **MISSED** (")
                    || l.contains(": inconclusive ("))
        })
        .count();
    assert!(targets >= 6, "{md}");
    let png = std::fs::read(dir.join("benchmarks.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 5_000,
        "not a plot"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
