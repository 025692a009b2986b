//! `fwmark check`: validate and compile a config without touching the
//! kernel; with `--ipvs`, also compare its marks with what IPVS (and
//! keepalived's nftables table) has.

use anyhow::{Result, bail};
use fwmark::{ipvs, live};
use fwmark_core::ipvs_check::{self, MarkUse};

use crate::cli::CheckArgs;

pub fn check(args: &CheckArgs) -> Result<()> {
    let loaded = live::read_config(&args.config)?;
    println!(
        "{}: OK: {} services, {} rules, {} exact + {} range + {} prefix entries",
        loaded.path,
        loaded.config.len(),
        loaded.ruleset.rules.len(),
        loaded.ruleset.exact.len(),
        loaded.ruleset.ranges.len(),
        loaded.ruleset.prefix.len()
    );
    if !args.ipvs {
        return Ok(());
    }
    let snapshot = ipvs::read()?;
    let findings = ipvs_check::check(&MarkUse::of_config(&loaded.config), &snapshot);
    for f in &findings {
        println!("warning: {f}");
    }
    let fwm = snapshot.fwmark_services().count();
    println!(
        "IPVS: {}, {fwm} fwmark services, {} other; {} findings",
        if snapshot.loaded {
            "loaded"
        } else {
            "not loaded"
        },
        snapshot.services.len() - fwm,
        findings.len()
    );
    if args.strict && !findings.is_empty() {
        bail!(
            "{} IPVS findings for {} (--strict makes them fatal)",
            findings.len(),
            loaded.path
        );
    }
    Ok(())
}
