mod cmd;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};
use fwmark::{
    apply,
    cli::{Cli, Command},
    detach, explain, export, live,
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
        Command::Run(args) => cmd::run::run(args),
        Command::Apply(args) => apply::apply(args),
        Command::Status(args) => cmd::status::status(args),
        Command::Detach(args) => detach::detach(&args.iface),
        Command::Check(args) => check(&args.config),
        Command::Import(args) => import(args),
        Command::Export(args) => export::export_command(&args.config, args.format),
        Command::Explain(args) => explain::Input::from_args(
            &args.packet,
            args.hex.as_deref(),
            args.later_fragment,
            &args.vlan,
        )
        .and_then(|input| explain::explain_command(&args.config, &input, args.mark)),
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

fn import(args: fwmark::cli::ImportArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Read as _;
    let (source, text) = match args.file.as_deref() {
        None => ("standard input".to_string(), String::new()),
        Some(p) if p.as_os_str() == "-" => ("standard input".to_string(), String::new()),
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        ),
    };
    let text = if source == "standard input" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading standard input")?;
        s
    } else {
        text
    };
    let imported = fwmark::import::import(&text, args.iface.as_deref(), args.skip_unsupported)
        .with_context(|| format!("importing {source}"))?;
    print!("{}", imported.config_text);
    for line in &imported.report {
        eprintln!("fwmark import: {line}");
    }
    eprintln!(
        "fwmark import: {} MARK rules from {source} -> {} services, {} exact + {} prefix entries",
        imported.rules,
        imported.config.len(),
        imported.ruleset.exact.len(),
        imported.ruleset.prefix.len()
    );
    Ok(())
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
