//! `fwmark detach`: remove the attachment, the pins and the state that a
//! `fwmark run --keep` (or a killed one) left on an interface.

use anyhow::{Result, bail};

use crate::{
    attach, live, preflight,
    state::{Lock, Paths},
};

pub fn detach(iface: &str) -> Result<()> {
    preflight::check_privileges()?;
    let paths = Paths::new(iface)?;
    if let Some(pid) = Lock::daemon_holder(&paths) {
        bail!(
            "fwmark run (pid {pid}) manages {iface}; stop it instead (SIGTERM, or \
             `systemctl stop fwmark`): it detaches on exit unless it runs with --keep"
        );
    }
    let _lock = Lock::apply(&paths)?;
    // A `run` may have started between the check above and the lock.
    if let Some(pid) = Lock::daemon_holder(&paths) {
        bail!("fwmark run (pid {pid}) manages {iface} now; stop it instead");
    }
    // With the maps, an interrupted change is recorded first (so the line
    // below names the generation that was live).
    let maps = crate::datapath::Maps::from_pins(&paths.pin_dir).ok();
    let state = live::load_state(&paths, maps.as_ref())?;
    drop(maps);
    let Some(state) = state else {
        if paths.pin_dir.exists() {
            paths.remove()?;
            println!("removed stale pins of {iface}");
            return Ok(());
        }
        bail!("{}", paths.not_attached());
    };
    attach::remove_left(iface, state.mode, &paths.pin("link"), state.program_id)
        .map_err(anyhow::Error::msg)?;
    paths.remove()?;
    println!(
        "detached fwmark from {iface} ({} attachment, program id {}, generation {})",
        state.mode, state.program_id, state.generation
    );
    Ok(())
}
