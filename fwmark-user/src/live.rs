//! Changing the live configuration of an interface: the one path that `run`
//! (start and reloads) and `apply` share. The caller holds the apply lock.
//!
//! Crash safety: the new state is written to `state.pending.json` before the
//! switch and renamed over `state.json` after it. Whoever finds a pending
//! file later compares its slot with the `ACTIVE` map: the switch happened
//! exactly when they agree (each switch moves to the other slot). The next
//! change (`apply`, `run`, a reload, `detach`) records or discards it under
//! the apply lock; readers (`status`, metrics) count a switch that happened
//! without touching the files. A switch that fails before it happens
//! removes its pending file itself.

use std::{
    fs,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use fwmark_common::ABI_VERSION;
use log::warn;

use fwmark_core::{
    Loaded, LoadedError,
    config::Config,
    diff::{self, Diff},
    ruleset::Ruleset,
    slots,
};

use crate::{
    datapath::Maps,
    durable, failpoint,
    mode::AttachMode,
    state::{Paths, STATE_VERSION, State},
};

/// Reads, validates and compiles the config at `path`, logging what is
/// legal but worth telling: who besides root can change the file, and the
/// ruleset's warnings (entries two services share).
pub fn read_config(path: &Path) -> Result<Loaded, LoadedError> {
    for w in crate::perms::config_warnings(path) {
        warn!("{w}");
    }
    let loaded = Loaded::read(path)?;
    for w in &loaded.ruleset.warnings {
        warn!("{w}");
    }
    Ok(loaded)
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh state for an interface nothing is published on yet.
pub fn initial_state(iface: &str, mode: AttachMode, rule_capacity: u32) -> State {
    State {
        version: STATE_VERSION,
        abi: ABI_VERSION,
        iface: iface.to_string(),
        mode,
        netlink: None,
        program_id: 0,
        attached_at: now(),
        generation: 0,
        slot: 0,
        rule_capacity,
        config_path: String::new(),
        config_sha256: String::new(),
        config_text: String::new(),
        slots: Vec::new(),
        slot_high_water: 0,
    }
}

fn pending_file(paths: &Paths) -> std::path::PathBuf {
    paths.run_dir.join(PENDING_FILE)
}

/// Name of the state an interrupted switch may have left, in the run dir.
pub const PENDING_FILE: &str = "state.pending.json";

/// A switch that was interrupted (its process killed) after it recorded
/// the state it was switching to.
struct Interrupted {
    state: State,
    /// Whether `ACTIVE` had been switched to the new generation.
    switched: bool,
}

fn interrupted(paths: &Paths, maps: &Maps) -> Result<Option<Interrupted>> {
    let pending_path = pending_file(paths);
    let text = match fs::read_to_string(&pending_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", pending_path.display())),
    };
    let state: State = serde_json::from_str(&text)
        .with_context(|| format!("reading {}", pending_path.display()))?;
    // Each switch moves to the other slot: it happened exactly when the
    // active slot is the pending one.
    let switched = maps.active_slot()? == state.slot && maps.is_published()?;
    Ok(Some(Interrupted { state, switched }))
}

/// Reads the state, finishing or discarding an interrupted switch first
/// (callers hold the apply lock). Without `maps` a pending switch is left
/// for the next caller that has them.
pub fn load_state(paths: &Paths, maps: Option<&Maps>) -> Result<Option<State>> {
    if let Some(maps) = maps
        && let Some(pending) = interrupted(paths, maps)?
    {
        if pending.switched {
            warn!(
                "an interrupted change of {} had switched already: recording generation {}",
                paths.iface, pending.state.generation
            );
            durable::rename(&pending_file(paths), &paths.state_file())?;
        } else {
            warn!(
                "an interrupted change of {} had not switched: the live config stays",
                paths.iface
            );
            fs::remove_file(pending_file(paths))?;
        }
    }
    Ok(State::load(paths)?)
}

/// The state as it is in the kernel, for readers (`status`, metrics): an
/// interrupted switch that happened counts, without changing any file.
/// The flag says the state came from such a switch (not recorded yet).
pub fn peek_state(paths: &Paths, maps: &Maps) -> Result<Option<(State, bool)>> {
    match interrupted(paths, maps)? {
        Some(pending) if pending.switched => Ok(Some((pending.state, true))),
        _ => Ok(State::load(paths)?.map(|s| (s, false))),
    }
}

/// The live config of `state`, compiled (None before the first switch).
pub fn live_config(state: &State) -> Result<Option<(Config, Ruleset)>> {
    if state.generation == 0 {
        return Ok(None);
    }
    let config = Config::parse(&state.config_text, &state.config_path)
        .context("the recorded live config no longer parses")?;
    let ruleset = Ruleset::compile(&config)?;
    Ok(Some((config, ruleset)))
}

/// What is live before the first switch: no service, no entry.
pub fn nothing_live() -> (Config, Ruleset) {
    (Config::empty(), Ruleset::default())
}

/// Switches the live config to `new`: diff, counter slots, generation
/// switch, state. Nothing changes when it fails before the switch.
pub fn switch(paths: &Paths, maps: &mut Maps, state: &mut State, new: &Loaded) -> Result<Diff> {
    let live = live_config(state)?;
    let nothing = nothing_live();
    let (old_c, old_r) = live.as_ref().unwrap_or(&nothing);
    let diff = diff::diff((old_c, old_r), (&new.config, &new.ruleset));

    let plan = slots::assign(
        (&new.config, &new.ruleset),
        live.as_ref().map(|(c, r)| (c, r)),
        &state.slots,
        maps.rule_capacity(),
    )?;
    let mut next = state.clone();
    next.generation += 1;
    next.slot = if maps.is_published()? {
        (maps.active_slot()? + 1) % fwmark_common::GENERATIONS
    } else {
        maps.active_slot()?
    };
    next.config_path = new.path.clone();
    next.config_sha256 = new.sha256.clone();
    next.config_text = new.text.clone();
    next.slot_high_water = plan
        .slots
        .iter()
        .map(|s| s + 1)
        .max()
        .unwrap_or(0)
        .max(state.slot_high_water);
    // Fresh slots above the high-water mark were never used: already zero.
    let dirty: Vec<u32> = plan
        .fresh
        .iter()
        .copied()
        .filter(|s| *s < state.slot_high_water)
        .collect();
    next.slots = plan.slots.clone();

    write_pending(paths, &next)?;
    failpoint::pause(failpoint::step::AFTER_PENDING_WRITTEN);
    let slot = match maps.publish(&new.ruleset, &plan.slots, &dirty) {
        Ok(slot) => slot,
        Err(e) => {
            // `publish` fails only before the switch: the old config stays.
            let _ = fs::remove_file(pending_file(paths));
            return Err(e.into());
        }
    };
    debug_assert_eq!(slot, next.slot);
    failpoint::pause(failpoint::step::AFTER_SWITCH);
    durable::rename(&pending_file(paths), &paths.state_file()).with_context(|| {
        format!(
            "recording the new state in {}",
            paths.state_file().display()
        )
    })?;
    *state = next;
    Ok(diff)
}

fn write_pending(paths: &Paths, next: &State) -> Result<()> {
    // Root only, like state.json (it becomes state.json).
    let text = serde_json::to_string_pretty(next)?;
    durable::write(&pending_file(paths), text.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", pending_file(paths).display()))
}
