//! `fwmark apply`: validate a config, show what changes, and switch the live
//! classifier of an interface to it atomically, from any process.

use anyhow::{Context as _, Result};
use fwmark::{
    datapath::Maps,
    live, markers, preflight,
    state::{Lock, Paths},
};
use fwmark_core::diff;

use crate::cli::ApplyArgs;

pub fn apply(args: ApplyArgs) -> Result<()> {
    // An invalid config fails here, before anything is touched.
    let new = live::read_config(&args.config)?;
    let mut phases = live::Phases::new("apply");
    preflight::check_privileges()?;
    preflight::interface_index(&args.iface)?;
    let paths = Paths::new(&args.iface)?;
    if !paths.pin_dir.exists() {
        return Err(paths.not_attached().into());
    }
    markers::warn_other_markers(&args.iface);
    let _lock = Lock::apply(&paths)?;
    let mut maps = Maps::from_pins(&paths.pin_dir).with_context(|| paths.not_attached())?;
    let mut state = live::load_state(&paths, Some(&maps))?.with_context(|| paths.not_attached())?;
    phases.done("reading the state");

    if args.dry_run {
        let live = live::live_config(&state)?.unwrap_or_else(live::nothing_live);
        let d = diff::diff((&live.0, &live.1), (&new.config, &new.ruleset));
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
