//! `fwmark apply`: validate a config, show what changes, and switch the live
//! classifier of an interface to it atomically, from any process.

use anyhow::{Context as _, Result};

use crate::{
    cli::ApplyArgs,
    datapath::Maps,
    diff,
    live::{self, Loaded},
    preflight,
    ruleset::Ruleset,
    state::{Lock, Paths},
};

pub fn apply(args: ApplyArgs) -> Result<()> {
    // An invalid config fails here, before anything is touched.
    let new = Loaded::read(&args.config)?;
    preflight::check_privileges()?;
    preflight::interface_index(&args.iface)?;
    let paths = Paths::new(&args.iface)?;
    if !paths.pin_dir.exists() {
        anyhow::bail!("{}", paths.not_attached());
    }
    crate::markers::warn_other_markers(&args.iface);
    let _lock = Lock::apply(&paths)?;
    let mut maps = Maps::from_pins(&paths.pin_dir).with_context(|| paths.not_attached())?;
    let mut state = live::load_state(&paths, Some(&maps))?.with_context(|| paths.not_attached())?;

    if args.dry_run {
        let live = live::live_config(&state)?;
        let empty = (
            crate::config::Config {
                source: String::new(),
                services: Vec::new(),
            },
            Ruleset::default(),
        );
        let (c, r) = live.as_ref().unwrap_or(&empty);
        let d = diff::diff((c, r), (&new.config, &new.ruleset));
        println!("{d}");
        println!(
            "dry run: nothing changed; generation {} stays live on {}",
            state.generation, args.iface
        );
        return Ok(());
    }
    if state.config_sha256 == new.sha256 {
        println!(
            "no change: {} is live already as generation {} on {}",
            new.path, state.generation, args.iface
        );
        return Ok(());
    }
    let d = live::switch(&paths, &mut maps, &mut state, &new)?;
    println!("{d}");
    println!(
        "applied {} to {}: generation {} is live",
        new.path, args.iface, state.generation
    );
    Ok(())
}
