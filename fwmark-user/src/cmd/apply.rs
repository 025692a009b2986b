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
    // A member of a group (`fwmark run --iface A --iface B`) switches the
    // group's maps: every interface of it, in one generation.
    let paths = Paths::new(&args.iface)?.owner();
    if !paths.pin_dir.exists() {
        return Err(paths.not_attached().into());
    }
    markers::warn_other_markers(&args.iface);
    let _lock = Lock::apply(&paths)?;
    // Pins of another layout are not changed as this one's.
    if let Some(other) = fwmark::upgrade::other_layout(&paths) {
        return Err(other.into());
    }
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
        new.path,
        group_names_of(&state),
        state.generation
    );
    Ok(())
}

/// The interfaces of the group's state (`A, B`; one for a single one).
fn group_names_of(state: &fwmark::state::State) -> String {
    let names: Vec<&str> = std::iter::once(state.iface.as_str())
        .chain(state.members.iter().map(|m| m.iface.as_str()))
        .collect();
    names.join(", ")
}
