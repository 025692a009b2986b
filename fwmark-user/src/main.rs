use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};
use fwmark::{
    apply,
    cli::{Cli, Command},
    detach, live, run, status,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    logger.format_target(false);
    // Kernel-side records arrive through the `log` crate: let the level that
    // --log-level asks for through, whatever RUST_LOG says.
    if let Command::Run(args) = &cli.command {
        match args.log_level.level() {
            Some(aya_log::Level::Debug) => logger.filter_level(log::LevelFilter::Debug),
            Some(aya_log::Level::Trace) => logger.filter_level(log::LevelFilter::Trace),
            _ => &mut logger,
        };
    }
    logger.init();
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run::run(args))),
        Command::Apply(args) => apply::apply(args),
        Command::Status(args) => status::status(&args.iface, args.json),
        Command::Detach(args) => detach::detach(&args.iface),
        Command::Check(args) => check(&args.config),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "fwmark", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(anyhow::Error::from),
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
    let loaded = live::Loaded::read(path)?;
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
