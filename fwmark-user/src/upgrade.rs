//! Taking over pins of an older map layout without a gap in marking.
//!
//! A `fwmark run` that finds the pins and state of a layout it can read
//! (layout [`v2::ABI`], the previous release's) builds a complete new set of
//! maps exactly as a fresh start does, fills it from the config the state
//! records, carries the counters over, and replaces the program on the
//! *live* attachment (tcx: `bpf_link_update` of the pinned link; netlink: the
//! new filter is added before the old one is deleted). Packets are marked by
//! the old program on the old maps until the replacement, by the new program
//! on the new maps from then on.
//!
//! The steps, and what a crash after each one leaves for the next start
//! ([`recover`], under the apply lock, before anything else looks at the
//! pins):
//!
//! 1. A staging directory `PIN_DIR/upgrade/` is emptied and created; the new
//!    maps are created and pinned there, the recorded config is published
//!    into them, then the counters are copied from the old maps (per CPU,
//!    by the recorded counter slots, and the global ones).
//!    *Crash:* the old program still marks from the old pins; the state
//!    still says layout 2. [`recover`] removes the staging directory and the
//!    upgrade starts over.
//! 2. The program on the live attachment is replaced; what the old program
//!    counted since the copy is added (fail-point `upgrade-after-replace`
//!    after it).
//!    *Crash:* the new program marks from maps whose only pins are in the
//!    staging directory; the state says layout 2 and the old pins are whole.
//!    [`recover`] removes the staging directory (the attached program keeps
//!    its maps) and the upgrade starts over: it replaces the program again.
//!    On netlink, the filter the crashed run added is not recorded; the new
//!    run deletes every other fwmark filter at its priority (step 2 of the
//!    next run), so none is left behind.
//! 3. The new state (layout 3, new program id and filter) is written to
//!    `RUN_DIR/state.upgrade.json`, durably (fail-point
//!    `upgrade-after-record` after it).
//! 4. The old maps' pins are removed and the staging pins renamed into
//!    `PIN_DIR` one by one; the staging directory is removed.
//! 5. `state.upgrade.json` is renamed over `state.json`.
//!    *Crash after 3 or 4:* [`recover`] finds `state.upgrade.json`: the
//!    program was replaced. It finishes step 4 (a map still in the staging
//!    directory replaces the pin of that name) and step 5, and the start
//!    adopts the new layout as usual.
//!
//! Reading layout 2 is explicit: [`v2`] names its maps and counter types
//! byte for byte and never assumes the current ones equal them.

use std::{
    fs, io,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use fwmark_common::{ABI_VERSION, GlobalCounters, Link, RuleCounters};
use log::warn;

use crate::{
    attach::{self, AttachError, Attached},
    datapath::{Datapath, DatapathError, MAP_NAMES},
    durable, failpoint,
    live::{self, LiveError},
    rtnl,
    state::{Paths, State},
};

/// The staging directory under the pin directory (no map has this name).
pub const STAGING: &str = "upgrade";
/// The new state of an upgrade that replaced the program, in the run dir.
pub const UPGRADE_FILE: &str = "state.upgrade.json";

/// The previous layout (fwmark up to the commit that changed it), as it
/// was: map names, counter types, how `ACTIVE` names the live slot.
pub mod v2 {
    use std::path::Path;

    use aya::maps::{Array, ArrayOfMaps, Map, MapData, MapError, PerCpuArray};

    /// The layout version `state.json` records for these pins.
    pub const ABI: u32 = 2;

    /// The pinned maps' names in layout 2.
    pub mod map_names {
        pub const ACTIVE: &str = "ACTIVE";
        pub const EXACT: &str = "EXACT";
        pub const PREFIX: &str = "PREFIX";
        pub const RULE_STATS: &str = "RULE_STATS";
        pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
    }

    /// Every map pin of layout 2.
    pub const MAP_NAMES: [&str; 5] = [
        map_names::ACTIVE,
        map_names::EXACT,
        map_names::PREFIX,
        map_names::RULE_STATS,
        map_names::GLOBAL_STATS,
    ];

    /// Bits of layout 2's `ACTIVE` word that hold the generation slot.
    pub const ACTIVE_GENERATION_MASK: u32 = 0xff;

    /// Layout 2's per-rule counters (`RULE_STATS`, per CPU): 24 bytes.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RuleCounters {
        pub packets: u64,
        pub bytes: u64,
        pub icmp_errors: u64,
    }

    /// Layout 2's global counters (`GLOBAL_STATS`, per CPU, 1 entry): 56
    /// bytes.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct GlobalCounters {
        pub seen: u64,
        pub marked: u64,
        pub no_match: u64,
        pub non_ip: u64,
        pub later_fragment: u64,
        pub malformed: u64,
        pub icmp_error: u64,
    }

    const _: () = assert!(std::mem::size_of::<RuleCounters>() == 24);
    const _: () = assert!(std::mem::size_of::<GlobalCounters>() == 56);

    // SAFETY: `#[repr(C)]` of u64 fields only (sizes asserted above): no
    // padding, and every bit pattern is a valid value.
    unsafe impl aya::Pod for RuleCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GlobalCounters {}

    /// Why layout 2's pins cannot be read.
    #[derive(Debug, thiserror::Error)]
    #[error("reading layout 2's map {map} in {dir}")]
    pub struct ReadError {
        pub map: &'static str,
        pub dir: String,
        #[source]
        pub source: MapError,
    }

    fn open(dir: &Path, name: &'static str) -> Result<Map, ReadError> {
        let err = |source| ReadError {
            map: name,
            dir: dir.display().to_string(),
            source,
        };
        let data = MapData::from_pin(dir.join(name)).map_err(err)?;
        Map::from_map_data(data).map_err(err)
    }

    fn typed<T: TryFrom<Map, Error = MapError>>(
        dir: &Path,
        name: &'static str,
    ) -> Result<T, ReadError> {
        T::try_from(open(dir, name)?).map_err(|source| ReadError {
            map: name,
            dir: dir.display().to_string(),
            source,
        })
    }

    /// Layout 2's counters, per CPU.
    #[derive(Clone)]
    pub struct Counters {
        /// Each given slot with its per-CPU values.
        pub rules: Vec<(u32, Vec<RuleCounters>)>,
        /// The global counters' per-CPU values.
        pub global: Vec<GlobalCounters>,
    }

    /// Reads the counters of `slots` and the global counters from the
    /// layout-2 pins in `dir`.
    pub fn read_counters(dir: &Path, slots: &[u32]) -> Result<Counters, ReadError> {
        let rule_stats: PerCpuArray<MapData, RuleCounters> = typed(dir, map_names::RULE_STATS)?;
        let global_stats: PerCpuArray<MapData, GlobalCounters> =
            typed(dir, map_names::GLOBAL_STATS)?;
        let err = |map| {
            move |source| ReadError {
                map,
                dir: dir.display().to_string(),
                source,
            }
        };
        let rules = slots
            .iter()
            .map(|&slot| {
                let values = rule_stats
                    .get(&slot, 0)
                    .map_err(err(map_names::RULE_STATS))?;
                Ok((slot, values.iter().copied().collect()))
            })
            .collect::<Result<_, ReadError>>()?;
        let global = global_stats
            .get(&0, 0)
            .map_err(err(map_names::GLOBAL_STATS))?
            .iter()
            .copied()
            .collect();
        Ok(Counters { rules, global })
    }

    impl Counters {
        /// What was counted since `earlier` (per CPU; a counter never goes
        /// down, so a smaller value is taken as no change).
        pub fn since(&self, earlier: &Counters) -> Counters {
            let rule = |a: &RuleCounters, b: &RuleCounters| RuleCounters {
                packets: a.packets.saturating_sub(b.packets),
                bytes: a.bytes.saturating_sub(b.bytes),
                icmp_errors: a.icmp_errors.saturating_sub(b.icmp_errors),
            };
            let global = |a: &GlobalCounters, b: &GlobalCounters| GlobalCounters {
                seen: a.seen.saturating_sub(b.seen),
                marked: a.marked.saturating_sub(b.marked),
                no_match: a.no_match.saturating_sub(b.no_match),
                non_ip: a.non_ip.saturating_sub(b.non_ip),
                later_fragment: a.later_fragment.saturating_sub(b.later_fragment),
                malformed: a.malformed.saturating_sub(b.malformed),
                icmp_error: a.icmp_error.saturating_sub(b.icmp_error),
            };
            Counters {
                rules: self
                    .rules
                    .iter()
                    .zip(&earlier.rules)
                    .map(|((slot, now), (_, then))| {
                        (
                            *slot,
                            now.iter().zip(then).map(|(a, b)| rule(a, b)).collect(),
                        )
                    })
                    .collect(),
                global: self
                    .global
                    .iter()
                    .zip(&earlier.global)
                    .map(|(a, b)| global(a, b))
                    .collect(),
            }
        }

        /// In this build's counter types.
        pub fn current(
            self,
        ) -> (
            Vec<(u32, Vec<fwmark_common::RuleCounters>)>,
            Vec<fwmark_common::GlobalCounters>,
        ) {
            (
                self.rules
                    .into_iter()
                    .map(|(slot, values)| (slot, values.into_iter().map(Into::into).collect()))
                    .collect(),
                self.global.into_iter().map(Into::into).collect(),
            )
        }
    }

    /// Whether layout 2's `ACTIVE` names `slot` and that slot holds a
    /// published generation (how an interrupted switch is told to have
    /// happened, as layout 2 did it).
    pub fn switched_to(dir: &Path, slot: u32) -> Result<bool, ReadError> {
        let active: Array<MapData, u32> = typed(dir, map_names::ACTIVE)?;
        let exact: ArrayOfMaps<MapData, MapData> = typed(dir, map_names::EXACT)?;
        let word = active.get(&0, 0).map_err(|source| ReadError {
            map: map_names::ACTIVE,
            dir: dir.display().to_string(),
            source,
        })?;
        let live = word & ACTIVE_GENERATION_MASK;
        Ok(live == slot && exact.get(&live, 0).is_ok())
    }
}

impl From<v2::RuleCounters> for RuleCounters {
    fn from(c: v2::RuleCounters) -> RuleCounters {
        RuleCounters {
            packets: c.packets,
            bytes: c.bytes,
            icmp_errors: c.icmp_errors,
        }
    }
}

impl From<v2::GlobalCounters> for GlobalCounters {
    fn from(c: v2::GlobalCounters) -> GlobalCounters {
        GlobalCounters {
            seen: c.seen,
            marked: c.marked,
            no_match: c.no_match,
            non_ip: c.non_ip,
            later_fragment: c.later_fragment,
            malformed: c.malformed,
            icmp_error: c.icmp_error,
        }
    }
}

/// Why an upgrade from an older layout failed. Until the program is
/// replaced the old one goes on marking; after it, the new one does.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(transparent)]
    Read(#[from] v2::ReadError),
    #[error(transparent)]
    Live(#[from] LiveError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(
        "replacing layout {from}'s program on {iface} failed; the previous program goes on \
         marking"
    )]
    Attach {
        iface: String,
        from: u32,
        #[source]
        source: Box<AttachError>,
    },
    #[error(
        "the recorded state of {iface} has {slots} counter slots for {rules} rules; \
         `fwmark detach --iface {iface}` and `fwmark run` again (marking stops in between)"
    )]
    Slots {
        iface: String,
        slots: usize,
        rules: usize,
    },
    #[error(
        "{what} {} for the upgrade of {iface} failed; {then}",
        path.display()
    )]
    File {
        iface: String,
        what: &'static str,
        path: PathBuf,
        then: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Pins of a layout other than this build's: a command that reads or
/// changes them (`status`, `apply`) stops with this.
#[derive(Debug, thiserror::Error)]
#[error(
    "{iface} has pins of layout {layout} (made by another fwmark version); this fwmark reads \
     layout {ours}: {}",
    if *layout == v2::ABI {
        format!(
            "`fwmark run --iface {iface}` upgrades them without a gap in marking, or use the \
             fwmark that made them"
        )
    } else {
        format!(
            "use the fwmark that made them, or `fwmark detach --iface {iface}` and `fwmark run` \
             again (marking stops in between)"
        )
    },
    ours = ABI_VERSION
)]
pub struct OtherLayout {
    pub iface: String,
    pub layout: u32,
}

/// Whether the recorded state of `paths`' interface names a layout other
/// than this build's (an unreadable state is left to the caller).
pub fn other_layout(paths: &Paths) -> Option<OtherLayout> {
    let state = State::load(paths).ok().flatten()?;
    (state.abi != ABI_VERSION).then(|| OtherLayout {
        iface: paths.iface.clone(),
        layout: state.abi,
    })
}

fn staging(paths: &Paths) -> PathBuf {
    paths.pin_dir.join(STAGING)
}

fn upgrade_file(paths: &Paths) -> PathBuf {
    paths.run_dir.join(UPGRADE_FILE)
}

/// Finishes or discards what an interrupted upgrade left (see the module),
/// and an interrupted switch of layout 2 (its `state.pending.json`, decided
/// by layout 2's `ACTIVE`). The caller holds the apply lock.
pub fn recover(paths: &Paths) -> Result<(), UpgradeError> {
    let iface = &paths.iface;
    if upgrade_file(paths).exists() {
        warn!(
            "an interrupted upgrade of {iface} had replaced the program already: finishing it \
             (the pins of the new layout move into {})",
            paths.pin_dir.display()
        );
        swap_pins(paths)?;
        durable::rename(&upgrade_file(paths), &paths.state_file()).map_err(|source| {
            UpgradeError::File {
                iface: iface.clone(),
                what: "recording",
                path: paths.state_file(),
                then: "fix what the error names and start `fwmark run` again",
                source,
            }
        })?;
        return Ok(());
    }
    if staging(paths).exists() {
        warn!("an interrupted upgrade of {iface} had not recorded its result: starting it over");
        remove_dir(paths, &staging(paths))?;
    }
    // A layout-2 switch interrupted between its pending file and its
    // record: decide it the way layout 2 does, before the pins change.
    let pending = paths.run_dir.join(live::PENDING_FILE);
    if let Ok(text) = fs::read_to_string(&pending)
        && let Ok(state) = serde_json::from_str::<State>(&text)
        && state.abi == v2::ABI
        && v2::MAP_NAMES.iter().all(|n| paths.pin(n).exists())
    {
        let file_error = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| UpgradeError::File {
                iface: iface.clone(),
                what,
                path,
                then: "fix what the error names and start `fwmark run` again",
                source,
            }
        };
        if v2::switched_to(&paths.pin_dir, state.slot)? {
            warn!(
                "an interrupted change of {iface} (layout 2) had switched already: recording \
                 generation {}",
                state.generation
            );
            durable::rename(&pending, &paths.state_file())
                .map_err(file_error("recording", &paths.state_file()))?;
        } else {
            warn!(
                "an interrupted change of {iface} (layout 2) had not switched: the live config stays"
            );
            fs::remove_file(&pending).map_err(file_error("removing", &pending))?;
        }
    }
    Ok(())
}

fn remove_dir(paths: &Paths, dir: &Path) -> Result<(), UpgradeError> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(UpgradeError::File {
            iface: paths.iface.clone(),
            what: "removing",
            path: dir.to_path_buf(),
            then: "remove it by hand and start `fwmark run` again",
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Step 4: the staging pins replace the pins of the same name in the pin
/// directory; the old layout's other pins go. Idempotent: a map already
/// moved is not in the staging directory any more.
fn swap_pins(paths: &Paths) -> Result<(), UpgradeError> {
    let stage = staging(paths);
    let file_error = |what, path: PathBuf| {
        move |source| UpgradeError::File {
            iface: paths.iface.clone(),
            what,
            path,
            then: "the new program marks already; fix what the error names and start \
                   `fwmark run` again to finish the upgrade",
            source,
        }
    };
    if stage.exists() {
        for name in v2::MAP_NAMES {
            if !MAP_NAMES.contains(&name) {
                let path = paths.pin(name);
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(file_error("removing", path)(e));
                    }
                    _ => {}
                }
            }
        }
        for name in MAP_NAMES {
            let from = stage.join(name);
            if !from.exists() {
                continue;
            }
            // bpffs renames over an existing pin only with RENAME_EXCHANGE;
            // remove the old pin first (the old program, if any still runs,
            // holds its maps).
            let to = paths.pin(name);
            match fs::remove_file(&to) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(file_error("removing", to)(e));
                }
                _ => {}
            }
            fs::rename(&from, &to).map_err(file_error("moving the new pin to", to.clone()))?;
        }
    }
    remove_dir(paths, &stage)
}

/// What an upgrade hands on: the new program and maps, the attachment it
/// replaced the old one on, and the state it recorded.
pub struct Upgraded {
    pub datapath: Datapath,
    pub attached: Attached,
    pub state: State,
    /// The layout upgraded from.
    pub from: u32,
    /// The old program's id.
    pub old_program_id: u32,
}

/// Upgrades the pins and state `old` (layout [`v2::ABI`]) of `paths`'
/// interface to this build's layout, without a gap in marking (see the
/// module for the steps). The caller holds the apply lock and ran
/// [`recover`].
pub fn upgrade(
    paths: &Paths,
    old: &State,
    link: Link,
    log_level: Option<aya_log::Level>,
) -> Result<Upgraded, UpgradeError> {
    let iface = &paths.iface;
    // 1. A complete new set of maps, pinned in the staging directory.
    let stage = staging(paths);
    remove_dir(paths, &stage)?;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&stage)
        .map_err(|source| UpgradeError::File {
            iface: iface.clone(),
            what: "creating",
            path: stage.clone(),
            then: "the previous program goes on marking",
            source,
        })?;
    let result = build(paths, old, link, log_level, &stage);
    let (mut datapath, next) = match result {
        Ok(built) => built,
        Err(e) => {
            let _ = fs::remove_dir_all(&stage);
            return Err(e);
        }
    };

    // The counters, copied as late as possible: what the old program
    // counts from here until it is replaced is added after the replacement.
    let copied = match v2::read_counters(&paths.pin_dir, &old.slots) {
        Ok(copied) => copied,
        Err(e) => {
            let _ = fs::remove_dir_all(&stage);
            return Err(e.into());
        }
    };
    let (rules, global) = copied.clone().current();
    if let Err(e) = datapath.maps.carry_counters(&rules, global) {
        let _ = fs::remove_dir_all(&stage);
        return Err(e.into());
    }

    // 2. Replace the program on the live attachment.
    let program = datapath.program_mut()?;
    let attached = attach::adopt(program, iface, old.mode, &paths.pin("link"), old.netlink)
        .map_err(|source| {
            let _ = fs::remove_dir_all(&stage);
            UpgradeError::Attach {
                iface: iface.clone(),
                from: old.abi,
                source: Box::new(source),
            }
        })?;
    let program_id = program.info().map(|i| i.id()).unwrap_or_default();
    if let Some((priority, handle)) = attached.netlink() {
        remove_stray_filters(iface, priority, handle);
    }
    // What the old program counted since the copy. (On netlink, a packet
    // in the instant both filters were in place counted in both.)
    match v2::read_counters(&paths.pin_dir, &old.slots) {
        Ok(now) => {
            let (rules, global) = now.since(&copied).current();
            if let Err(e) = datapath.maps.add_counters(&rules, &global) {
                warn!(
                    "adding what layout {}'s program counted during the upgrade of {iface} \
                     failed (those packets are missing from the counters): {e}",
                    old.abi
                );
            }
        }
        Err(e) => warn!(
            "reading layout {}'s last counters on {iface} failed (what it counted during the \
             upgrade is missing from the counters): {e}",
            old.abi
        ),
    }
    failpoint::pause(failpoint::step::UPGRADE_AFTER_REPLACE);

    // 3. Record the new state beside the old one.
    let mut state = next;
    state.program_id = program_id;
    state.netlink = attached.netlink();
    let upgrade_path = upgrade_file(paths);
    // From here on the new program marks: errors keep the attachment.
    let kept = |e: UpgradeError, attached: Attached| {
        attached.keep();
        e
    };
    let text = match serde_json::to_string_pretty(&state) {
        Ok(text) => text,
        Err(source) => {
            let e = LiveError::Serialize {
                iface: iface.clone(),
                source,
            };
            return Err(kept(e.into(), attached));
        }
    };
    if let Err(source) = durable::write(&upgrade_path, text.as_bytes(), 0o600) {
        return Err(kept(
            UpgradeError::File {
                iface: iface.clone(),
                what: "writing",
                path: upgrade_path,
                then: "the new program marks already from unrecorded maps; start `fwmark run` \
                       again to upgrade again",
                source,
            },
            attached,
        ));
    }
    failpoint::pause(failpoint::step::UPGRADE_AFTER_RECORD);

    // 4. The new pins replace the old ones; 5. the new state is the state.
    if let Err(e) = swap_pins(paths) {
        return Err(kept(e, attached));
    }
    if let Err(source) = durable::rename(&upgrade_path, &paths.state_file()) {
        return Err(kept(
            UpgradeError::File {
                iface: iface.clone(),
                what: "recording",
                path: paths.state_file(),
                then: "start `fwmark run` again to finish the upgrade",
                source,
            },
            attached,
        ));
    }
    Ok(Upgraded {
        datapath,
        attached,
        state,
        from: old.abi,
        old_program_id: old.program_id,
    })
}

/// Step 1 after the staging directory exists: the new maps, the recorded
/// config published into them as the next generation.
fn build(
    paths: &Paths,
    old: &State,
    link: Link,
    log_level: Option<aya_log::Level>,
    stage: &Path,
) -> Result<(Datapath, State), UpgradeError> {
    let (_, ruleset) = live::live_config(old)?.unwrap_or_else(live::nothing_live);
    if old.slots.len() != ruleset.rules.len() {
        return Err(UpgradeError::Slots {
            iface: paths.iface.clone(),
            slots: old.slots.len(),
            rules: ruleset.rules.len(),
        });
    }
    let mut datapath = Datapath::load_for(link, old.rule_capacity, Some(stage), log_level)?;
    let slot = datapath.maps.publish(&ruleset, &old.slots, &[])?;
    let mut next = old.clone();
    next.abi = ABI_VERSION;
    next.slot = slot;
    next.generation = old.generation + 1;
    Ok((datapath, next))
}

/// On netlink, fwmark's priority holds fwmark's filters only: every fwmark
/// filter there but the new one is a leftover (the old one, when deleting
/// it was not needed; one an interrupted upgrade added and never
/// recorded). Failures are warnings: the new filter marks first or alike.
fn remove_stray_filters(iface: &str, priority: u16, handle: u32) {
    let Ok(ifindex) = crate::preflight::interface_index(iface) else {
        return;
    };
    let Ok(filters) = rtnl::ingress_filters(ifindex) else {
        return;
    };
    for f in filters {
        let fwmark = f
            .bpf_name
            .as_deref()
            .is_some_and(|n| n.starts_with(fwmark_common::PROGRAM_NAME));
        if f.priority == priority && f.handle != 0 && f.handle != handle && fwmark {
            warn!(
                "removing a leftover fwmark filter on {iface} (pref {priority} handle {:#x})",
                f.handle
            );
            if let Err(e) = rtnl::delete_ingress_filter(ifindex, priority, f.handle, "bpf") {
                warn!(
                    "removing the leftover filter (pref {priority} handle {:#x}) from {iface} \
                     failed: {e}",
                    f.handle
                );
            }
        }
    }
}
