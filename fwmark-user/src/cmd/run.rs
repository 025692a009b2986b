//! `fwmark run`: the daemon (see `fwmark::daemon`).

use anyhow::Result;
use fwmark::daemon::{self, Options};

use crate::cli::RunArgs;

pub fn run(args: RunArgs) -> Result<()> {
    let mut ifaces = args.iface.into_iter();
    Ok(daemon::run(Options {
        iface: ifaces.next().expect("clap requires one --iface"),
        members: ifaces.collect(),
        config: args.config,
        attach: args.attach.mode(),
        keep: args.keep,
        watch: !args.no_watch,
        metrics: args.metrics,
        kernel_log: args.log_level.level(),
        max_rules: args.max_rules,
    })?)
}
