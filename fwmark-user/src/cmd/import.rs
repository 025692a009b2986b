//! `fwmark import`: iptables rules in, an fwmark config out (stdout), the
//! report on stderr.

use std::io::Read as _;

use anyhow::{Context as _, Result};

use crate::cli::ImportArgs;

pub fn import(args: ImportArgs) -> Result<()> {
    let (source, text) = match args.file.as_deref() {
        Some(p) if p.as_os_str() != "-" => (
            p.display().to_string(),
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        ),
        _ => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading standard input")?;
            ("standard input".to_string(), s)
        }
    };
    let imported = fwmark_core::import::import(&text, args.iface.as_deref(), args.skip_unsupported)
        .with_context(|| format!("importing {source}"))?;
    print!("{}", imported.config_text);
    for line in &imported.report {
        eprintln!("fwmark import: {line}");
    }
    eprintln!(
        "fwmark import: {} MARK rules from {source} -> {} services, {} exact + {} range + {} \
         prefix entries",
        imported.rules,
        imported.config.len(),
        imported.ruleset.exact.len(),
        imported.ruleset.ranges.len(),
        imported.ruleset.prefix.len()
    );
    Ok(())
}
