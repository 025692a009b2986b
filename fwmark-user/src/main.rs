use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};
use fwmark::{
    apply,
    cli::{Cli, Command},
    detach, live, run, status,
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
