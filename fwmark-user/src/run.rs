//! `fwmark run`: load, fill, attach, wait for a signal, detach.

use anyhow::{Context as _, Result};
use log::{info, warn};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attach::{self, AttachMode},
    cli::RunArgs,
    config::Config,
    datapath::Datapath,
    preflight,
    ruleset::Ruleset,
    status,
};

/// Validates a config and compiles it, logging its warnings.
pub fn load_ruleset(path: &std::path::Path) -> Result<(Config, Ruleset)> {
    let config = Config::load(path)?;
    let ruleset = Ruleset::compile(&config)?;
    for w in &ruleset.warnings {
        warn!("{w}");
    }
    Ok((config, ruleset))
}

pub async fn run(args: RunArgs) -> Result<()> {
    let (config, ruleset) = load_ruleset(&args.config)?;
    preflight::check_privileges()?;
    let kernel = preflight::check_kernel()?;
    preflight::check_interface(&args.iface)?;
    if preflight::ensure_bpffs()? {
        info!("mounted bpffs at {}", preflight::BPFFS);
    }

    let mut datapath = Datapath::load(ruleset.rules.len())?;
    datapath.publish(&ruleset)?;
    let mode = AttachMode::choose(args.attach, kernel)?;
    let program = datapath.program_mut()?;
    let attachment = attach::attach(program, &args.iface, mode)?;
    let program_id = program.info().map(|i| i.id()).unwrap_or_default();
    info!(
        "attached to {} ingress via {} (kernel {kernel}, program id {program_id}): \
         {} services, {} rules, {} exact + {} prefix entries from {}",
        args.iface,
        attachment.mode,
        config.len(),
        ruleset.rules.len(),
        ruleset.exact.len(),
        ruleset.prefix.len(),
        config.source,
    );

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!("{which}: detaching from {}", args.iface);

    let program = datapath.program_mut()?;
    attach::detach(program, attachment)
        .with_context(|| format!("detaching from {} failed", args.iface))?;
    let rules = datapath.rule_counters(ruleset.rules.len())?;
    let global = datapath.global_counters()?;
    print!(
        "{}",
        status::counters_table(&config, &ruleset, &rules, &global)
    );
    Ok(())
}
