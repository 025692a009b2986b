//! `fwmark status`: the attachment, the live config and the counters of an
//! interface, as a table or `--json`.

use anyhow::{Context as _, Result, bail};
use fwmark::{
    datapath::Maps,
    live, preflight,
    state::{Lock, Paths},
    status::Snapshot,
};

use crate::cli::StatusArgs;

pub fn status(args: StatusArgs) -> Result<()> {
    let iface = &args.iface;
    preflight::check_privileges()?;
    let paths = Paths::new(iface)?;
    let not_attached = || paths.not_attached();
    if !paths.pin_dir.exists() {
        bail!("{}", not_attached());
    }
    let maps = Maps::from_pins(&paths.pin_dir).with_context(not_attached)?;
    let (state, unrecorded) = live::peek_state(&paths, &maps)?.with_context(not_attached)?;
    // A change in progress holds the apply lock between its switch and
    // recording it: only a switch nobody is recording was interrupted.
    if unrecorded && !Lock::apply_busy(&paths) {
        log::warn!(
            "an interrupted change of {iface} switched to generation {} and is not recorded \
             yet; the next `fwmark apply`, `run` or `detach` records it",
            state.generation
        );
    }
    let daemon = Lock::daemon_holder(&paths).and_then(|p| p.parse().ok());
    let snapshot = Snapshot::collect(&state, &maps, daemon)?;
    if args.json {
        println!("{}", snapshot.json());
    } else {
        print!("{}", snapshot.text());
    }
    Ok(())
}
