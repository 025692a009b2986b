//! `fwmark run`: the daemon (see `fwmark::daemon`).

use anyhow::Result;
use fwmark::{
    attach::AttachMode,
    cli::{AttachArg, RunArgs},
    daemon::{self, Options},
};

pub fn run(args: RunArgs) -> Result<()> {
    daemon::run(Options {
        iface: args.iface,
        config: args.config,
        attach: match args.attach {
            AttachArg::Auto => None,
            AttachArg::Tcx => Some(AttachMode::Tcx),
            AttachArg::Netlink => Some(AttachMode::Netlink),
        },
        keep: args.keep,
        watch: !args.no_watch,
        metrics: args.metrics,
        kernel_log: args.log_level.level(),
        max_rules: args.max_rules,
    })
}
