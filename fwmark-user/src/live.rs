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
    fs, io,
    path::{Path, PathBuf},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use fwmark_common::ABI_VERSION;
use log::{debug, warn};

use fwmark_core::{
    Loaded, LoadedError,
    config::{Config, ConfigErrors, LoadError},
    diff::{self, Diff},
    ruleset::{Ruleset, RulesetError},
    slots::{self, OutOfSlots},
};

use crate::{
    datapath::{DatapathError, Maps},
    durable, failpoint,
    mode::AttachMode,
    state::{Paths, STATE_VERSION, State},
};

/// Why the live configuration of an interface cannot be read or changed.
/// Each message names the file or interface and, where the user can do
/// something, what.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("recording the new state in {}", path.display())]
    Record {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing {} (a change of {iface} that had not switched)", path.display())]
    Discard {
        iface: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "reading {}: it does not parse ({error}); it is the state an interrupted change of \
         {iface} was switching to: move it aside, then make the live config known again with \
         `fwmark apply --iface {iface} --config FILE`",
        path.display()
    )]
    PendingCorrupt {
        iface: String,
        path: PathBuf,
        error: serde_json::Error,
    },
    /// `error` names the file (see [`State::load`]).
    #[error(
        "the recorded state of {iface} does not parse ({error}); move it aside, then \
         `fwmark detach --iface {iface}` removes the stale pins and `fwmark run` attaches afresh"
    )]
    StateCorrupt { iface: String, error: io::Error },
    #[error("serializing the new state of {iface}")]
    Serialize {
        iface: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the recorded live config no longer parses (interface {iface}, generation \
         {generation}); to replace it, `fwmark detach --iface {iface}` and start `fwmark run` \
         again"
    )]
    RecordedConfig {
        iface: String,
        generation: u64,
        #[source]
        source: ConfigErrors,
    },
    #[error(
        "the recorded live config no longer compiles (interface {iface}, generation \
         {generation}); to replace it, `fwmark detach --iface {iface}` and start `fwmark run` \
         again"
    )]
    RecordedRuleset {
        iface: String,
        generation: u64,
        #[source]
        source: RulesetError,
    },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    OutOfSlots(#[from] OutOfSlots),
}

/// Debug-level timing of the phases of a change (`RUST_LOG=debug`):
/// each [`Phases::done`] logs the time since the previous one.
pub struct Phases {
    what: &'static str,
    last: Instant,
}

impl Phases {
    pub fn new(what: &'static str) -> Phases {
        Phases {
            what,
            last: Instant::now(),
        }
    }

    /// Logs how long `phase` took (since the previous phase ended).
    pub fn done(&mut self, phase: &str) {
        let now = Instant::now();
        debug!(
            "{}: {phase}: {:.1} ms",
            self.what,
            (now - self.last).as_secs_f64() * 1e3
        );
        self.last = now;
    }
}

/// Reads, validates and compiles the config at `path`, logging what is
/// legal but worth telling: who besides root can change the file, and the
/// ruleset's warnings (entries two services share).
pub fn read_config(path: &Path) -> Result<Loaded, LoadedError> {
    for w in crate::perms::config_warnings(path) {
        warn!("{w}");
    }
    // `Loaded::read`, phase by phase.
    let mut phases = Phases::new("config");
    let display = path.display().to_string();
    let text = fs::read_to_string(path).map_err(|error| LoadError::Read {
        path: display.clone(),
        error,
    })?;
    phases.done("reading the file");
    let config = Config::parse(&text, &display)?;
    phases.done("parsing and validating");
    let ruleset = Ruleset::compile(&config)?;
    phases.done("compiling the entries");
    let sha256 = fwmark_core::loaded::sha256_hex(&text);
    phases.done("hashing");
    let loaded = Loaded {
        path: display,
        text,
        sha256,
        config,
        ruleset,
    };
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
        members: Vec::new(),
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

fn interrupted(paths: &Paths, maps: &Maps) -> Result<Option<Interrupted>, LiveError> {
    let pending_path = pending_file(paths);
    let text = match fs::read_to_string(&pending_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LiveError::Read {
                path: pending_path,
                source,
            });
        }
    };
    let state: State = serde_json::from_str(&text).map_err(|error| LiveError::PendingCorrupt {
        iface: paths.iface.clone(),
        path: pending_path.clone(),
        error,
    })?;
    // Each switch moves to the other slot: it happened exactly when the
    // active slot is the pending one.
    let switched = maps.active_slot()? == state.slot && maps.is_published()?;
    Ok(Some(Interrupted { state, switched }))
}

/// The recorded state (`state.json`); `Ok(None)` when there is none.
fn recorded(paths: &Paths) -> Result<Option<State>, LiveError> {
    State::load(paths).map_err(|error| {
        if error.kind() == io::ErrorKind::InvalidData {
            LiveError::StateCorrupt {
                iface: paths.iface.clone(),
                error,
            }
        } else {
            LiveError::Read {
                path: paths.state_file(),
                source: error,
            }
        }
    })
}

/// Reads the state, finishing or discarding an interrupted switch first
/// (callers hold the apply lock). Without `maps` a pending switch is left
/// for the next caller that has them.
pub fn load_state(paths: &Paths, maps: Option<&Maps>) -> Result<Option<State>, LiveError> {
    if let Some(maps) = maps
        && let Some(pending) = interrupted(paths, maps)?
    {
        if pending.switched {
            warn!(
                "an interrupted change of {} had switched already: recording generation {}",
                paths.iface, pending.state.generation
            );
            durable::rename(&pending_file(paths), &paths.state_file()).map_err(|source| {
                LiveError::Record {
                    path: paths.state_file(),
                    source,
                }
            })?;
        } else {
            warn!(
                "an interrupted change of {} had not switched: the live config stays",
                paths.iface
            );
            fs::remove_file(pending_file(paths)).map_err(|source| LiveError::Discard {
                iface: paths.iface.clone(),
                path: pending_file(paths),
                source,
            })?;
        }
    }
    recorded(paths)
}

/// The state as it is in the kernel, for readers (`status`, metrics): an
/// interrupted switch that happened counts, without changing any file.
/// The flag says the state came from such a switch (not recorded yet).
pub fn peek_state(paths: &Paths, maps: &Maps) -> Result<Option<(State, bool)>, LiveError> {
    match interrupted(paths, maps)? {
        Some(pending) if pending.switched => Ok(Some((pending.state, true))),
        _ => Ok(recorded(paths)?.map(|s| (s, false))),
    }
}

/// The live config of `state`, compiled (None before the first switch).
pub fn live_config(state: &State) -> Result<Option<(Config, Ruleset)>, LiveError> {
    if state.generation == 0 {
        return Ok(None);
    }
    let config = Config::parse(&state.config_text, &state.config_path).map_err(|source| {
        LiveError::RecordedConfig {
            iface: state.iface.clone(),
            generation: state.generation,
            source,
        }
    })?;
    let ruleset = Ruleset::compile(&config).map_err(|source| LiveError::RecordedRuleset {
        iface: state.iface.clone(),
        generation: state.generation,
        source,
    })?;
    Ok(Some((config, ruleset)))
}

/// What is live before the first switch: no service, no entry.
pub fn nothing_live() -> (Config, Ruleset) {
    (Config::empty(), Ruleset::default())
}

/// Switches the live config to `new`: diff, counter slots, generation
/// switch, state. Nothing changes when it fails before the switch.
pub fn switch(
    paths: &Paths,
    maps: &mut Maps,
    state: &mut State,
    new: &Loaded,
) -> Result<Diff, LiveError> {
    let mut phases = Phases::new("switch");
    let live = live_config(state)?;
    phases.done("compiling the live config");
    let nothing = nothing_live();
    let (old_c, old_r) = live.as_ref().unwrap_or(&nothing);
    let diff = diff::diff((old_c, old_r), (&new.config, &new.ruleset));
    phases.done("diff");

    let plan = slots::assign(
        (&new.config, &new.ruleset),
        live.as_ref().map(|(c, r)| (c, r)),
        &state.slots,
        maps.rule_capacity(),
    )?;
    phases.done("counter slots");
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
    phases.done("writing the pending state");
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
    phases.done("publishing");
    failpoint::pause(failpoint::step::AFTER_SWITCH);
    durable::rename(&pending_file(paths), &paths.state_file()).map_err(|source| {
        LiveError::Record {
            path: paths.state_file(),
            source,
        }
    })?;
    phases.done("recording the state");
    *state = next;
    Ok(diff)
}

fn write_pending(paths: &Paths, next: &State) -> Result<(), LiveError> {
    // Root only, like state.json (it becomes state.json). Compact: at 1M
    // rules the pretty form spends a line per slot.
    // Sized for the config text and the slots up front: no regrowing.
    let mut text = Vec::with_capacity(next.config_text.len() + 11 * next.slots.len() + 4096);
    serde_json::to_writer(&mut text, next).map_err(|source| LiveError::Serialize {
        iface: paths.iface.clone(),
        source,
    })?;
    durable::write(&pending_file(paths), &text, 0o600).map_err(|source| LiveError::Write {
        path: pending_file(paths),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_that_does_not_parse_names_the_file_the_interface_and_what_to_do() {
        let dir = std::env::temp_dir().join(format!("fwmark-live-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let paths = Paths {
            iface: "eth7".into(),
            netns: crate::netns::Netns::current().unwrap(),
            pin_dir: dir.join("pins"),
            run_dir: dir.clone(),
        };
        assert!(recorded(&paths).unwrap().is_none());
        fs::write(paths.state_file(), "{ not json").unwrap();
        let e = recorded(&paths).unwrap_err();
        fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(e, LiveError::StateCorrupt { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains(&paths.state_file().display().to_string()),
            "{text}"
        );
        assert!(text.contains("fwmark detach --iface eth7"), "{text}");
    }

    #[test]
    fn a_recorded_config_that_no_longer_parses_names_the_interface_and_the_file() {
        let mut state = initial_state("eth7", AttachMode::Tcx, 16);
        assert!(live_config(&state).unwrap().is_none());
        state.generation = 3;
        state.config_path = "/etc/fwmark/old.toml".into();
        state.config_text = "[[service]]\nname = 1\n".into();
        let e = live_config(&state).unwrap_err();
        assert!(matches!(e, LiveError::RecordedConfig { .. }), "{e:?}");
        let chain = crate::chain(&e);
        assert!(
            chain.contains("the recorded live config no longer parses"),
            "{chain}"
        );
        assert!(chain.contains("interface eth7, generation 3"), "{chain}");
        assert!(chain.contains("/etc/fwmark/old.toml"), "{chain}");
    }
}
