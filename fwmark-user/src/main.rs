use std::process::ExitCode;

use clap::Parser as _;
use fwmark::{
    cli::{Cli, Command},
    run,
};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run::run(args))),
        Command::Check(args) => check(&args.config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fwmark: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let (config, ruleset) = run::load_ruleset(path)?;
    println!(
        "{}: OK: {} services, {} rules, {} exact + {} prefix entries",
        config.source,
        config.len(),
        ruleset.rules.len(),
        ruleset.exact.len(),
        ruleset.prefix.len()
    );
    Ok(())
}
