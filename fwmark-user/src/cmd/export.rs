//! `fwmark export`: iptables-restore or nft input that marks as a config
//! does (the rollback path).

use anyhow::{Context as _, Result};
use fwmark::live;
use fwmark_core::export;

use crate::cli::{ExportArgs, ExportFormat};

pub fn export(args: ExportArgs) -> Result<()> {
    let loaded = live::read_config(&args.config)
        .with_context(|| format!("exporting {}", args.config.display()))?;
    let (c, r) = (&loaded.config, &loaded.ruleset);
    match args.format {
        ExportFormat::Iptables => {
            print!("{}", export::iptables(c, r, false));
            if export::has_family(r, true) {
                eprintln!(
                    "fwmark export: {} has IPv6 services: export them with --format ip6tables",
                    loaded.path
                );
            }
        }
        ExportFormat::Ip6tables => print!("{}", export::iptables(c, r, true)),
        ExportFormat::Nft => print!("{}", export::nft(c, r)),
    }
    Ok(())
}
