//! The `fwmark` binary: parse the command line, set up logging, dispatch
//! to `cmd/`.

mod cli;
mod cmd;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};
use cli::{Cli, Command};

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
        Command::Run(args) => cmd::run::run(args),
        Command::Apply(args) => cmd::apply::apply(args),
        Command::Status(args) => cmd::status::status(args),
        Command::Detach(args) => match args.iface {
            Some(iface) => cmd::detach::detach(&iface),
            None => cmd::detach::detach_all(),
        },
        Command::Check(args) => cmd::check::check(&args.config),
        Command::Import(args) => cmd::import::import(args),
        Command::Export(args) => cmd::export::export(args),
        Command::Explain(args) => cmd::explain::explain(args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "fwmark", &mut std::io::stdout());
            Ok(())
        }
        // fwmark(8): a system administration command.
        Command::Man => clap_mangen::Man::new(Cli::command())
            .section("8")
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
