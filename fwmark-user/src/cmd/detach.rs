//! `fwmark detach`: remove the attachment, the pins and the state that a
//! `fwmark run --keep` (or a killed one) left on an interface; `--all`: on
//! every interface of this network namespace (what removing the Debian
//! package runs, in the root namespace). Nothing stays behind: the lock
//! files and directories go too.

use anyhow::{Context as _, Result, bail};

use fwmark::{
    attach, datapath, live, preflight,
    state::{Lock, Paths},
};

pub fn detach(iface: &str) -> Result<()> {
    preflight::check_privileges()?;
    let paths = Paths::new(iface)?;
    match detach_paths(&paths)? {
        Some(done) => println!("{done}"),
        None => return Err(paths.not_attached().into()),
    }
    Ok(())
}

/// `fwmark detach --all`: every interface with pins or state, each on its
/// own (one that fails does not stop the others).
pub fn detach_all() -> Result<()> {
    preflight::check_privileges()?;
    let all = Paths::all().context("listing fwmark's pins and state")?;
    let mut failed = Vec::new();
    let mut done = 0;
    for paths in &all {
        match detach_paths(paths) {
            Ok(Some(line)) => {
                println!("{line}");
                done += 1;
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("fwmark: error: {}: {e:#}", paths.iface);
                failed.push(paths.iface.as_str());
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} interfaces still have fwmark's attachment, pins or state: {}",
            failed.len(),
            all.len(),
            failed.join(", ")
        );
    }
    if done == 0 {
        println!("fwmark is attached nowhere: nothing to detach");
    }
    Ok(())
}

/// Detaches from one interface; the line to print, or None when there was
/// nothing (no state, no pins).
fn detach_paths(paths: &Paths) -> Result<Option<String>> {
    let iface = paths.iface.as_str();
    if let Some(pid) = Lock::daemon_holder(paths) {
        bail!(
            "fwmark run (pid {pid}) manages {iface}; stop it first (SIGTERM, or \
             `systemctl stop fwmark@{iface}`): it detaches on exit unless it runs with --keep"
        );
    }
    let owner = paths.owner();
    if owner != *paths {
        return detach_member(paths, &owner);
    }
    let _lock = Lock::apply(paths)?;
    // A `run` may have started between the check above and the lock.
    if let Some(pid) = Lock::daemon_holder(paths) {
        bail!("fwmark run (pid {pid}) manages {iface} now; stop it instead");
    }
    let done = detach_locked(paths)?;
    paths
        .remove_locks()
        .with_context(|| format!("removing {}", paths.run_dir.display()))?;
    Ok(done)
}

/// Detaches one interface of a group (`fwmark run --iface A --iface B`
/// left with --keep): its attachment and directories go, the group's other
/// interfaces keep marking with the same maps.
fn detach_member(paths: &Paths, owner: &Paths) -> Result<Option<String>> {
    let iface = paths.iface.as_str();
    let _lock = Lock::apply(owner)?;
    if let Some(pid) = Lock::daemon_holder(paths).or_else(|| Lock::daemon_holder(owner)) {
        bail!("fwmark run (pid {pid}) manages {iface} now; stop it instead");
    }
    let maps = datapath::Maps::from_pins(&owner.pin_dir).ok();
    let state = live::load_state(owner, maps.as_ref())?;
    drop(maps);
    let mut line = format!("removed fwmark's pins and state of {iface}");
    if let Some(mut state) = state
        && let Some(at) = state.members.iter().position(|m| m.iface == iface)
    {
        let member = state.members.remove(at);
        attach::remove_left(iface, state.mode, &paths.pin("link"), member.program_id)
            .map_err(anyhow::Error::msg)?;
        state
            .save(owner)
            .with_context(|| format!("recording the state in {}", owner.state_file().display()))?;
        line = format!(
            "detached fwmark from {iface} ({} attachment, program id {}); {} and the group's \
             other interfaces keep marking (generation {})",
            state.mode, member.program_id, owner.iface, state.generation
        );
    }
    paths
        .remove_member()
        .with_context(|| format!("removing {}", paths.run_dir.display()))?;
    Ok(Some(line))
}

/// [`detach_paths`] once the apply lock is held.
fn detach_locked(paths: &Paths) -> Result<Option<String>> {
    let iface = paths.iface.as_str();
    // With the maps, an interrupted change is recorded first (so the line
    // below names the generation that was live).
    let maps = datapath::Maps::from_pins(&paths.pin_dir).ok();
    let state = live::load_state(paths, maps.as_ref())?;
    drop(maps);
    let Some(state) = state else {
        if paths.pin_dir.exists() {
            paths.remove()?;
            return Ok(Some(format!("removed stale pins of {iface}")));
        }
        return Ok(None);
    };
    // A netlink filter is found by the interface's name, in this namespace:
    // one that is not here went with its interface (deleted, or moved to
    // another namespace with it).
    if state.mode == fwmark::mode::AttachMode::Netlink
        && let Err(e) = preflight::interface_index(iface)
    {
        paths.remove()?;
        return Ok(Some(format!(
            "{e}: removed fwmark's pins and state of {iface}; its netlink filter went with the              interface"
        )));
    }
    // The group's other interfaces first (`fwmark run --iface A --iface B`).
    for member in &state.members {
        let member_paths = Paths::in_netns(&member.iface, paths.netns.clone())?;
        if let Err(e) = attach::remove_left(
            &member.iface,
            state.mode,
            &member_paths.pin("link"),
            member.program_id,
        ) {
            eprintln!("fwmark: warning: detaching from {}: {e}", member.iface);
        }
        member_paths
            .remove_member()
            .with_context(|| format!("removing {}", member_paths.run_dir.display()))?;
    }
    attach::remove_left(iface, state.mode, &paths.pin("link"), state.program_id)
        .map_err(anyhow::Error::msg)?;
    paths.remove()?;
    Ok(Some(format!(
        "detached fwmark from {iface} ({} attachment, program id {}, generation {})",
        state.mode, state.program_id, state.generation
    )))
}
