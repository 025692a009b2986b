//! `fwmark check`: validate and compile a config without touching the kernel.

use std::path::Path;

use anyhow::Result;
use fwmark::live;

pub fn check(path: &Path) -> Result<()> {
    let loaded = live::read_config(path)?;
    println!(
        "{}: OK: {} services, {} rules, {} exact + {} prefix entries",
        loaded.path,
        loaded.config.len(),
        loaded.ruleset.rules.len(),
        loaded.ruleset.exact.len(),
        loaded.ruleset.prefix.len()
    );
    Ok(())
}
