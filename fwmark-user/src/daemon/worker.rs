//! The daemon's worker thread: it owns the loaded programs, their maps and
//! the attachments, and does everything slow, one [`Job`] at a time: the
//! start, reloads, following the interfaces, and the final detach.
//!
//! Several interfaces (`fwmark run --iface A --iface B`) share one set of
//! maps: the first interface's pins and state are the group's, and each
//! interface has its own load of the program against those maps (with its
//! own slot of the global counters) and its own attachment. A reload
//! switches `ACTIVE` once, for all of them.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
};

use fwmark_common::ABI_VERSION;
use fwmark_core::{Loaded, diff::Diff};
use log::{error, info, warn};
use tokio::sync::oneshot;

use crate::{
    attach::{self, Attached},
    datapath::{self, Datapath, KernelLogger, Maps},
    ingress, live,
    metrics::Current,
    mode::AttachMode,
    preflight,
    state::{Lock, Member, Paths, State},
    status::{LiveConfig, Snapshot},
    upgrade,
};

use super::{DaemonError, Options, Result, notify};

/// Work for the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    /// The async side is up too (metrics, kernel log): tell the service
    /// manager marking is in place (READY=1).
    Ready,
    /// Read the config file again and switch to it if it changed.
    Reload,
    /// The interface may have gone, come back or been renamed.
    Interface,
    /// Stop: acted on once the job at hand ends, before any other queued.
    Stop(Stop),
}

/// How the worker stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// On this signal: detach (unless `keep`) and return the counter table.
    Signal(&'static str),
    /// Leave marking in place, quietly (the daemon failed after starting).
    Keep,
}

/// What the async side needs to know to follow the interfaces: the index
/// the worker is attached to on each, and whether a re-attachment failed
/// (then it is retried every second: no link notification may come to
/// retry it).
#[derive(Debug)]
pub struct Follow {
    /// Per interface, in `--iface` order; 0: nothing attached (gone).
    ifindex: Vec<AtomicU32>,
    retry: AtomicBool,
}

impl Follow {
    /// For `interfaces` interfaces.
    pub fn new(interfaces: usize) -> Follow {
        Follow {
            ifindex: (0..interfaces).map(|_| AtomicU32::new(0)).collect(),
            retry: AtomicBool::new(false),
        }
    }

    /// The index of the device the worker is attached to as interface `i`
    /// (in `--iface` order).
    pub fn ifindex(&self, i: usize) -> Option<u32> {
        Some(self.ifindex.get(i)?.load(Ordering::Relaxed)).filter(|i| *i != 0)
    }

    /// Whether the last re-attachment failed.
    pub fn retrying(&self) -> bool {
        self.retry.load(Ordering::Relaxed)
    }
}

/// What the worker starts from.
pub struct Setup {
    pub paths: Paths,
    pub opts: Options,
    pub requested: AttachMode,
    /// The config read at start.
    pub new: Loaded,
    pub ifindex: u32,
    /// The group's other interfaces (`--iface` after the first), with
    /// their indexes; the caller holds their daemon locks.
    pub members: Vec<(Paths, u32)>,
    pub current: Arc<Current>,
    pub follow: Arc<Follow>,
}

/// The async side's hold on the worker.
pub struct Handle {
    jobs: mpsc::Sender<Job>,
    /// The counter table (or the error) the worker ends with.
    done: oneshot::Receiver<Result<String>>,
}

/// Queues jobs for the worker.
pub struct Jobs(mpsc::Sender<Job>);

impl Jobs {
    /// Queues `job`; jobs of one kind queued while the worker is busy are
    /// done once.
    pub fn send(&self, job: Job) {
        if self.0.send(job).is_err() {
            error!("the worker thread has stopped: {job:?} is not done");
        }
    }
}

impl Handle {
    /// Where to queue jobs.
    pub fn jobs(&self) -> Jobs {
        Jobs(self.jobs.clone())
    }

    /// Resolves only if the worker ends on its own (it panicked): the
    /// daemon cannot go on.
    pub async fn ended(&mut self) -> DaemonError {
        match (&mut self.done).await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => DaemonError::WorkerEnded,
            Err(_) => DaemonError::WorkerGone,
        }
    }

    /// Stops the worker once its current job ends; returns the counter
    /// table it printed on the way out.
    pub async fn finish(self, stop: Stop) -> Result<String> {
        let _ = self.jobs.send(Job::Stop(stop));
        self.done.await.map_err(|_| DaemonError::WorkerGone)?
    }
}

/// Starts the worker thread: it takes over or creates the attachment and
/// makes the config live, then waits for jobs. Returns once marking is in
/// place, with the kernel log reader for the async side.
pub async fn spawn(setup: Setup) -> Result<(Handle, Vec<KernelLogger>)> {
    let (jobs, queue) = mpsc::channel();
    let (started_tx, started) = oneshot::channel();
    let (done_tx, done) = oneshot::channel();
    std::thread::Builder::new()
        .name("fwmark-worker".into())
        .spawn(move || {
            let started = (|| {
                let _apply = Lock::apply(&setup.paths)?;
                start(&setup)
            })();
            // The config read at start is live (or refused) now.
            drop(setup);
            let mut live = match started {
                Ok(live) => live,
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            let loggers: Vec<KernelLogger> = live
                .ports
                .iter_mut()
                .filter_map(|p| p.datapath.logger.take())
                .collect();
            if started_tx.send(Ok(loggers)).is_err() {
                // Nobody to take jobs from: leave marking as it is.
                live.stop(Stop::Keep).ok();
                return;
            }
            let _ = done_tx.send(live.serve(&queue));
        })
        .map_err(DaemonError::Thread)?;
    let logger = started.await.map_err(|_| DaemonError::WorkerStarting)??;
    Ok((Handle { jobs, done }, logger))
}

/// One interface of the daemon: its load of the program (against the
/// group's maps) and its attachment.
struct Port {
    /// The interface's own paths (its link pin; for a member, its group
    /// file).
    paths: Paths,
    datapath: Datapath,
    /// None while the interface is gone (or re-attaching to it failed).
    attached: Option<Attached>,
    /// Index of the interface attached to; None while it is gone.
    ifindex: Option<u32>,
    /// The last re-attach failure, logged once until it changes.
    reattach_error: Option<String>,
}

/// The daemon's hold on its interfaces.
struct Live {
    /// The group's paths (the first interface's): maps, state, apply lock.
    paths: Paths,
    /// The first interface, then the members in `--iface` order. The
    /// first one's maps are the ones switched and read.
    ports: Vec<Port>,
    /// What is live, for the service manager's status line: generation,
    /// entry counts, attachment.
    summary: String,
    /// Why the last reload failed (None once one succeeds).
    reload_error: Option<String>,
    config: PathBuf,
    keep: bool,
    /// The compiled live config, shared with the scrapes.
    current: Arc<Current>,
    /// What the async side follows the interface by.
    follow: Arc<Follow>,
}

/// An attachment goes only by an explicit detach (or `remove_now`,
/// `abandon`): a `Live` dropped any other way (an error on the way out, a
/// panic of the worker) leaves marking in place, as after `kill -9`, and
/// the next `fwmark run` adopts it.
impl Drop for Live {
    fn drop(&mut self) {
        for port in &mut self.ports {
            if let Some(attached) = port.attached.take() {
                attached.keep();
            }
        }
    }
}

impl Live {
    /// The daemon's hold once `attached` marks on the interface `setup`
    /// names.
    fn new(setup: &Setup, datapath: Datapath, attached: Attached, summary: String) -> Live {
        Live {
            summary,
            reload_error: None,
            paths: setup.paths.clone(),
            ports: vec![Port {
                paths: setup.paths.clone(),
                datapath,
                attached: Some(attached),
                ifindex: Some(setup.ifindex),
                reattach_error: None,
            }],
            config: setup.opts.config.clone(),
            keep: setup.opts.keep,
            current: Arc::clone(&setup.current),
            follow: Arc::clone(&setup.follow),
        }
    }

    /// The group's maps (the first interface's load holds them).
    fn maps(&self) -> &Maps {
        &self.ports[0].datapath.maps
    }

    /// Does jobs until told to stop (or until nobody can send any more).
    fn serve(mut self, queue: &mpsc::Receiver<Job>) -> Result<String> {
        loop {
            self.publish_follow();
            let mut jobs: Vec<Job> = match queue.recv() {
                Ok(job) => vec![job],
                Err(_) => vec![Job::Stop(Stop::Keep)],
            };
            // Whatever queued up meanwhile: a stop first, each kind once.
            jobs.extend(queue.try_iter());
            if let Some(stop) = jobs.iter().find_map(|j| match j {
                Job::Stop(stop) => Some(*stop),
                _ => None,
            }) {
                return self.stop(stop);
            }
            if jobs.contains(&Job::Ready) {
                notify::ready(&self.status_line());
            }
            if jobs.contains(&Job::Interface) {
                follow_interface(&mut self);
                notify::status(&self.status_line());
            }
            if jobs.contains(&Job::Reload) {
                let config = self.config.clone();
                reload(&mut self, &config);
            }
        }
    }

    /// The service manager's status line: the interface, what is live, the
    /// last reload error.
    fn status_line(&self) -> String {
        let names = |attached: bool| {
            self.ports
                .iter()
                .filter(|p| p.attached.is_some() == attached)
                .map(|p| p.paths.iface.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (on, gone) = (names(true), names(false));
        let mut line = if gone.is_empty() {
            format!("marking on {on}: {}", self.summary)
        } else if on.is_empty() {
            format!(
                "{gone} is gone: nothing attached, waiting for it ({})",
                self.summary
            )
        } else {
            format!(
                "marking on {on}: {}; {gone} is gone: nothing attached there, waiting for it",
                self.summary
            )
        };
        if let Some(e) = &self.reload_error {
            line.push_str("; last reload failed, the running config stays: ");
            line.push_str(e);
        }
        line
    }

    /// Tells the async side where the attachment is now.
    fn publish_follow(&self) {
        for (port, slot) in self.ports.iter().zip(&self.follow.ifindex) {
            let index = if port.attached.is_some() {
                port.ifindex.unwrap_or(0)
            } else {
                0
            };
            slot.store(index, Ordering::Relaxed);
        }
        let retry = self.ports.iter().any(|p| p.reattach_error.is_some());
        self.follow.retry.store(retry, Ordering::Relaxed);
    }

    /// Detaches (unless `keep`) or leaves marking in place; returns the
    /// counter table (empty for [`Stop::Keep`]).
    fn stop(mut self, stop: Stop) -> Result<String> {
        notify::stopping(&format!("stopping: {}", self.status_line()));
        let which = match stop {
            Stop::Keep => {
                for port in &mut self.ports {
                    if let Some(attached) = port.attached.take() {
                        attached.keep();
                    }
                }
                return Ok(String::new());
            }
            Stop::Signal(which) => which,
        };
        let iface = self.paths.iface.clone();
        let _apply = Lock::apply(&self.paths)?;
        let state = live::load_state(&self.paths, Some(self.maps()))?
            .ok_or_else(DaemonError::vanished(&self.paths))?;
        // The other interfaces first, then the group's own.
        // One that fails is logged: the others, and the first interface,
        // are still taken off.
        for port in self.ports.iter_mut().skip(1) {
            if let Err(e) = stop_member(port, &state, self.keep, which) {
                error!("{}", crate::chain(&e));
            }
        }
        match self.ports[0].attached.take() {
            Some(attached) if self.keep => {
                info!(
                    "{which}: leaving marking in place on {iface} (--keep); `fwmark detach \
                     --iface {iface}` removes it"
                );
                attached.keep();
            }
            Some(attached) => {
                info!("{which}: detaching from {iface}");
                attached
                    .detach(&iface, state.program_id)
                    .map_err(|error| DaemonError::Detach {
                        iface: iface.clone(),
                        error,
                    })?;
            }
            None => info!(
                "{which}: {iface} is gone, nothing is attached to it{}",
                if self.keep {
                    "; the pins and state stay (--keep): the next `fwmark run` attaches with them"
                } else {
                    ""
                }
            ),
        }
        // The final counters: this process holds the maps, also once their
        // pins are gone.
        let table = self
            .table(&state)
            .unwrap_or_else(|e| format!("(counters unavailable: {})\n", crate::chain(&e)));
        if !self.keep {
            // Nothing stays: pins, state, and (this process holds both
            // locks) the lock files and directories.
            self.paths
                .remove()
                .and_then(|()| self.paths.remove_locks())
                .map_err(DaemonError::remove(&self.paths))?;
        }
        Ok(table)
    }

    /// The counter table of the live config `state` records.
    fn table(&self, state: &State) -> Result<String> {
        let live = match self.current.get() {
            Some(live) if live.is_of(state) => Some(live),
            // Changed by another process since: compile what it recorded.
            _ => LiveConfig::of_state(state)?.map(Arc::new),
        };
        Ok(Snapshot::read(state, live.as_deref(), self.maps(), None)?.table())
    }
}

/// Takes a member interface off at the daemon's stop (or leaves it marking
/// with `keep`), and removes its directories unless kept.
fn stop_member(port: &mut Port, state: &State, keep: bool, which: &str) -> Result<()> {
    let iface = port.paths.iface.clone();
    let program_id = state
        .members
        .iter()
        .find(|m| m.iface == iface)
        .map_or(0, |m| m.program_id);
    match port.attached.take() {
        Some(attached) if keep => {
            info!("{which}: leaving marking in place on {iface} (--keep)");
            attached.keep();
            return Ok(());
        }
        Some(attached) => {
            info!("{which}: detaching from {iface}");
            attached
                .detach(&iface, program_id)
                .map_err(|error| DaemonError::Detach {
                    iface: iface.clone(),
                    error,
                })?;
        }
        None if keep => return Ok(()),
        None => info!("{which}: {iface} is gone, nothing is attached to it"),
    }
    port.paths
        .remove_member()
        .map_err(DaemonError::remove(&port.paths))
}

/// Takes over what a previous fwmark left on the interfaces, or attaches
/// afresh; then makes `new` the live config, and attaches the group's
/// other interfaces to the same maps.
fn start(setup: &Setup) -> Result<Live> {
    let mut live = start_first(setup)?;
    // On an error what is attached stays (as after `kill -9`): the next run
    // adopts it.
    start_members(&mut live, setup)?;
    let state = live::load_state(&live.paths, Some(live.maps()))?
        .ok_or_else(DaemonError::vanished(&live.paths))?;
    ready(&state);
    Ok(live)
}

/// Attaches the group's other interfaces to its maps: adopts those a
/// previous run left (recorded in the state), attaches the new ones (each
/// with a free slot of the global counters), and detaches recorded ones
/// that are no longer asked for. The caller holds the apply lock.
fn start_members(live: &mut Live, setup: &Setup) -> Result<()> {
    let mut state = live::load_state(&live.paths, Some(live.maps()))?
        .ok_or_else(DaemonError::vanished(&live.paths))?;
    if state.members.is_empty() && setup.members.is_empty() {
        return Ok(());
    }
    let wanted: Vec<&str> = setup
        .members
        .iter()
        .map(|(p, _)| p.iface.as_str())
        .collect();
    // Recorded members no longer asked for: off, without a gap elsewhere.
    let (kept, dropped): (Vec<Member>, Vec<Member>) = std::mem::take(&mut state.members)
        .into_iter()
        .partition(|m| wanted.contains(&m.iface.as_str()));
    for m in dropped {
        let paths = Paths::in_netns(&m.iface, live.paths.netns.clone())
            .map_err(crate::state::PathsError::from)?;
        info!(
            "{} is no longer among the interfaces of this run: detaching from it",
            m.iface
        );
        if let Err(e) = attach::remove_left(&m.iface, state.mode, &paths.pin("link"), m.program_id)
        {
            warn!("detaching from {} failed: {e}", m.iface);
        }
        let _member_lock = Lock::daemon(&paths).ok();
        paths.remove_member().map_err(DaemonError::remove(&paths))?;
    }
    state.members = kept;
    let capacity = state.rule_capacity;
    for (paths, ifindex) in &setup.members {
        let iface = paths.iface.clone();
        if paths.pin(datapath::MAP_NAMES[0]).exists() {
            return Err(DaemonError::OwnAttachment {
                iface,
                group: live.paths.iface.clone(),
            });
        }
        if let Some(other) = paths.group().filter(|g| *g != live.paths.iface) {
            return Err(DaemonError::OtherGroup {
                iface,
                group: other,
            });
        }
        let link = preflight::interface_link(&iface)?;
        let recorded = state.members.iter().position(|m| m.iface == iface);
        let counter_slot = match recorded {
            Some(i) => state.members[i].counter_slot,
            None => (1..fwmark_common::MAX_INTERFACES)
                .find(|s| state.members.iter().all(|m| m.counter_slot != *s))
                .ok_or(DaemonError::TooManyInterfaces)?,
        };
        if recorded.is_none() {
            // What a group that is gone left (a stale link pin): not ours.
            paths.remove().map_err(DaemonError::remove(paths))?;
        }
        create_dirs(paths)?;
        paths
            .write_group(&live.paths.iface)
            .map_err(DaemonError::save(paths))?;
        let mut datapath = Datapath::load_at(
            link,
            counter_slot,
            capacity,
            Some(&live.paths.pin_dir),
            setup.opts.kernel_log,
        )?;
        if recorded.is_none() {
            // An earlier member's counts may be in the slot.
            datapath.maps.zero_global_slot(counter_slot)?;
        }
        let program = datapath.program_mut()?;
        let attached = match recorded {
            Some(i) => attach::adopt(
                program,
                &iface,
                state.mode,
                &paths.pin("link"),
                state.members[i].netlink,
            )?,
            None => attach::attach(program, &iface, state.mode, &paths.pin("link"))?,
        };
        let program_id = program.info().map(|i| i.id()).unwrap_or_default();
        let member = Member {
            iface: iface.clone(),
            counter_slot,
            netlink: attached.netlink(),
            program_id,
            attached_at: live::now(),
        };
        info!(
            "{} {iface} to the maps of {} via {} (program id {program_id}, counter slot \
             {counter_slot}, generation {})",
            if recorded.is_some() {
                "adopted"
            } else {
                "attached"
            },
            live.paths.iface,
            state.mode,
            state.generation
        );
        match recorded {
            Some(i) => state.members[i] = member,
            None => state.members.push(member),
        }
        live.ports.push(Port {
            paths: paths.clone(),
            datapath,
            attached: Some(attached),
            ifindex: Some(*ifindex),
            reattach_error: None,
        });
        state
            .save(&live.paths)
            .map_err(DaemonError::save(&live.paths))?;
    }
    // In `--iface` order, as the ports are.
    state
        .members
        .sort_by_key(|m| wanted.iter().position(|w| *w == m.iface));
    state
        .save(&live.paths)
        .map_err(DaemonError::save(&live.paths))?;
    live.current.touch(&live.paths, live.maps());
    Ok(())
}

/// Takes over what a previous fwmark left on the first interface, or
/// attaches afresh; then makes `new` the live config.
fn start_first(setup: &Setup) -> Result<Live> {
    let Setup {
        paths,
        opts,
        requested,
        new,
        ..
    } = setup;
    let requested = *requested;
    // An interrupted upgrade from an older layout is finished or discarded
    // first: it decides which pins are the live ones.
    upgrade::recover(paths)?;
    let pins_present = datapath::MAP_NAMES.iter().all(|n| paths.pin(n).exists());
    let legacy_pins = upgrade::v2::MAP_NAMES.iter().all(|n| paths.pin(n).exists());
    // Recover an interrupted switch before reading the state.
    let maps = if pins_present {
        datapath::Maps::from_pins(&paths.pin_dir).ok()
    } else {
        None
    };
    let state = live::load_state(paths, maps.as_ref())?;
    drop(maps);

    #[derive(PartialEq)]
    enum Take {
        Adopt,
        Upgrade,
        Afresh,
    }
    let take = match &state {
        Some(s) if pins_present && s.abi == ABI_VERSION => Take::Adopt,
        Some(s) if legacy_pins && s.abi == upgrade::v2::ABI => Take::Upgrade,
        Some(s) if s.abi != ABI_VERSION && s.abi != upgrade::v2::ABI && paths.pin_dir.exists() => {
            return Err(DaemonError::Incompatible {
                iface: paths.iface.clone(),
                pin_dir: paths.pin_dir.clone(),
                abi: s.abi,
                ours: ABI_VERSION,
            });
        }
        _ => Take::Afresh,
    };
    if take == Take::Afresh && (state.is_some() || paths.pin_dir.exists()) {
        warn!(
            "removing an incomplete previous attachment's pins and state for {}",
            paths.iface
        );
        if let Some(s) = &state {
            let _ = attach::remove_left(&paths.iface, s.mode, &paths.pin("link"), s.program_id);
        }
        paths.remove().map_err(DaemonError::remove(paths))?;
    }

    if let (Take::Adopt | Take::Upgrade, Some(old)) = (&take, state) {
        if opts.attach.is_some() && old.mode != requested {
            return Err(DaemonError::ModeMismatch {
                iface: paths.iface.clone(),
                mode: old.mode,
                requested,
            });
        }
        let link = preflight::interface_link(&paths.iface)?;
        let (datapath, attached, mut state, adopted) = if take == Take::Upgrade {
            let up = upgrade::upgrade(paths, &old, link, opts.kernel_log)?;
            let line = format!(
                "upgraded {} from layout {} to layout {} without a gap ({} attachment, program \
                 id {} -> {}, generation {}, {} rule counters and the global counters carried \
                 over)",
                paths.iface,
                up.from,
                ABI_VERSION,
                up.state.mode,
                up.old_program_id,
                up.state.program_id,
                up.state.generation,
                up.state.slots.len()
            );
            (up.datapath, up.attached, up.state, line)
        } else {
            let mut state = old;
            let mut datapath = Datapath::load_for(
                link,
                state.rule_capacity,
                Some(&paths.pin_dir),
                opts.kernel_log,
            )?;
            let program = datapath.program_mut()?;
            let attached = attach::adopt(
                program,
                &paths.iface,
                state.mode,
                &paths.pin("link"),
                state.netlink,
            )?;
            state.program_id = program.info().map(|i| i.id()).unwrap_or_default();
            state.netlink = attached.netlink();
            let line = format!(
                "adopted the {} attachment on {} (generation {}, program id {} now)",
                state.mode, paths.iface, state.generation, state.program_id
            );
            (datapath, attached, state, line)
        };
        let mut live = Live::new(setup, datapath, attached, summary(&state, new));
        // From here on the new program marks: an error must not take the
        // attachment (and so the marking) away with it.
        let finish = |live: &mut Live, state: &mut State| -> Result<()> {
            state.save(paths).map_err(DaemonError::save(paths))?;
            info!("{adopted}");
            if state.config_sha256 == new.sha256 {
                info!("config {} unchanged", new.path);
                let labels = LiveConfig::new(
                    state.generation,
                    &state.config_path,
                    &state.config_sha256,
                    state.slots.clone(),
                    &new.config,
                    &new.ruleset,
                );
                live.current.set(Some(Arc::new(labels)), paths, live.maps());
            } else {
                switch_logged(live, state, new)?;
            }
            live.summary = summary(state, new);
            Ok(())
        };
        if let Err(e) = finish(&mut live, &mut state) {
            if let Some(attached) = live.ports[0].attached.take() {
                attached.keep();
            }
            return Err(e);
        }
        return Ok(live);
    }

    // Fresh: maps created and pinned, config published, then attached, so
    // the first packet the program sees is already classified. A failure on
    // the way removes what it created.
    create_dirs(paths)?;
    let fresh = attach_fresh(setup, requested);
    if fresh.is_err() {
        let _ = paths.remove();
    }
    fresh
}

fn attach_fresh(setup: &Setup, requested: AttachMode) -> Result<Live> {
    let Setup {
        paths,
        opts,
        new,
        current,
        ..
    } = setup;
    let capacity =
        datapath::rule_capacity(opts.max_rules.unwrap_or(0).max(new.ruleset.rules.len()));
    let link = preflight::interface_link(&paths.iface)?;
    let mut datapath = Datapath::load_for(link, capacity, Some(&paths.pin_dir), opts.kernel_log)?;
    let mut state = live::initial_state(&paths.iface, requested, capacity);
    switch(current, paths, &mut datapath.maps, &mut state, new)?;
    let program = datapath.program_mut()?;
    let attached = attach::attach(program, &paths.iface, requested, &paths.pin("link"))?;
    state.program_id = program.info().map(|i| i.id()).unwrap_or_default();
    state.netlink = attached.netlink();
    state.attached_at = live::now();
    state.save(paths).map_err(DaemonError::save(paths))?;
    info!(
        "attached to {} ingress via {} (program id {}): {} services, {} rules, {} exact + {} \
         range + {} prefix entries from {} (generation {})",
        paths.iface,
        requested,
        state.program_id,
        new.config.len(),
        new.ruleset.rules.len(),
        new.ruleset.exact.len(),
        new.ruleset.ranges.len(),
        new.ruleset.prefix.len(),
        new.path,
        state.generation
    );
    if requested == AttachMode::Tcx {
        ingress::log_after_tcx(&paths.iface, state.program_id);
    }
    let summary = summary(&state, new);
    Ok(Live::new(setup, datapath, attached, summary))
}

/// The line that says the daemon is up (tests and operators wait for it),
/// after the start and after each re-attachment. (The service manager
/// hears READY=1 once the async side is up too: [`Job::Ready`].)
fn ready(state: &State) {
    let ifaces: Vec<&str> = std::iter::once(state.iface.as_str())
        .chain(state.members.iter().map(|m| m.iface.as_str()))
        .collect();
    info!(
        "marking on {} ({} attachment, program id {}, generation {})",
        ifaces.join(", "),
        state.mode,
        state.program_id,
        state.generation
    );
}

/// Switches the live config to `new` (the caller holds the apply lock) and
/// publishes it, compiled, to the scrapes. The labels are built before the
/// switch; while it runs, scrapes serve the config they have.
fn switch(
    current: &Current,
    paths: &Paths,
    maps: &mut Maps,
    state: &mut State,
    new: &Loaded,
) -> Result<Diff> {
    let mut labels = LiveConfig::new(
        0,
        &new.path,
        &new.sha256,
        Vec::new(),
        &new.config,
        &new.ruleset,
    );
    let _changing = current.changing(maps);
    let diff = live::switch(paths, maps, state, new)?;
    labels.generation = state.generation;
    labels.slots = state.slots.clone();
    current.set(Some(Arc::new(labels)), paths, maps);
    Ok(diff)
}

fn switch_logged(live: &mut Live, state: &mut State, new: &Loaded) -> Result<()> {
    let diff = switch(
        &live.current,
        &live.paths,
        &mut live.ports[0].datapath.maps,
        state,
        new,
    )?;
    for line in &diff.lines {
        info!("  {line}");
    }
    info!(
        "config {} is live as generation {} ({})",
        new.path,
        state.generation,
        diff.to_string().lines().last().unwrap_or_default()
    );
    Ok(())
}

/// What is live, for the status line: generation, entry counts, attachment.
fn summary(state: &State, live: &Loaded) -> String {
    format!(
        "generation {}, {} services, {} rules, {} exact + {} range + {} prefix entries ({} \
         attachment, program id {})",
        state.generation,
        live.config.len(),
        live.ruleset.rules.len(),
        live.ruleset.exact.len(),
        live.ruleset.ranges.len(),
        live.ruleset.prefix.len(),
        state.mode,
        state.program_id
    )
}

/// Re-reads the config and switches to it; on any problem the running
/// config stays and the reason is logged and kept for the status line. The
/// service manager hears RELOADING=1 at the start, READY=1 at the end.
fn reload(live: &mut Live, path: &std::path::Path) {
    notify::reloading(&format!(
        "reloading {}: {}",
        path.display(),
        live.status_line()
    ));
    let result = (|| -> Result<()> {
        let new = live::read_config(path)?;
        let _apply = Lock::apply(&live.paths)?;
        let mut state = live::load_state(&live.paths, Some(live.maps()))?
            .ok_or_else(DaemonError::vanished(&live.paths))?;
        if state.config_sha256 == new.sha256 {
            info!(
                "config {} unchanged (generation {})",
                new.path, state.generation
            );
        } else {
            switch_logged(live, &mut state, &new)?;
        }
        live.summary = summary(&state, &new);
        Ok(())
    })();
    match result {
        Ok(()) => live.reload_error = None,
        Err(e) => {
            let e = crate::chain(&e);
            error!("reload failed, the running config stays: {e}");
            live.reload_error = Some(e);
        }
    }
    notify::ready(&live.status_line());
}

/// Notices an interface going away (its attachment goes with it) and
/// coming back (deleted and created again: a new index), and attaches to
/// the new one with the same maps, config and counters; the group's other
/// interfaces keep marking meanwhile.
fn follow_interface(live: &mut Live) {
    for i in 0..live.ports.len() {
        // A rename while re-attaching is notified before the async side
        // knows the new index (it drops that event): look again after
        // attaching, a few times at most (an interface that keeps flapping
        // is followed by its next notifications).
        for _ in 0..4 {
            if !follow_interface_once(live, i) {
                break;
            }
        }
    }
}

/// One look at interface `i`; true when it re-attached and the name
/// names another device since.
fn follow_interface_once(live: &mut Live, i: usize) -> bool {
    let iface = live.ports[i].paths.iface.clone();
    let now = preflight::interface_index(&iface).ok();
    if now.is_some() && now == live.ports[i].ifindex {
        return false;
    }
    if let Some(old) = live.ports[i].ifindex.take() {
        let generation = State::load(&live.paths)
            .ok()
            .flatten()
            .map_or(0, |s| s.generation);
        let port = &mut live.ports[i];
        if preflight::index_exists(old) {
            // Renamed (or the name moved elsewhere): the device and fwmark's
            // attachment on it live on, so take the attachment off it, and
            // say so once it is off.
            if let Some(attached) = port.attached.take()
                && let Err(e) = attached.remove_now(&port.paths.pin("link"))
            {
                error!(
                    "removing fwmark from the device with index {old} failed: {e}; check \
                     `tc filter show dev <its name> ingress`"
                );
            }
            warn!(
                "{iface} no longer names the device with index {old} (renamed?): removed \
                 fwmark's attachment from that device; {}",
                match now {
                    Some(new) => format!("attaching to the new {iface} (index {new})"),
                    None => format!(
                        "waiting for {iface} to appear (generation {generation} stays loaded)"
                    ),
                }
            );
        } else {
            match now {
                None => warn!(
                    "{iface} is gone (it had index {old}), and fwmark's attachment with it: \
                     nothing is marked there now; waiting for it to come back (generation \
                     {generation} stays loaded)"
                ),
                Some(new) => warn!(
                    "{iface} was replaced (index {old} -> {new}), and fwmark's attachment \
                     went with the old one; attaching to the new one (generation {generation})"
                ),
            }
            if let Some(attached) = port.attached.take() {
                attached.abandon(&port.paths.pin("link"));
            }
        }
    }
    if now.is_none() {
        return false;
    }
    match reattach(live, i) {
        Ok((state, index)) => {
            live.ports[i].reattach_error = None;
            info!(
                "{iface} is back (index {index}): attached again via {} (program id {}, \
                 generation {})",
                state.mode, state.program_id, state.generation
            );
            ready(&state);
            live.publish_follow();
            preflight::interface_index(&iface).ok() != Some(index)
        }
        Err(e) => {
            let e = crate::chain(&e);
            if live.ports[i].reattach_error.as_ref() != Some(&e) {
                error!("attaching to {iface} again failed: {e}; retrying every second");
                live.ports[i].reattach_error = Some(e);
            }
            false
        }
    }
}

/// Attaches interface `i`'s loaded program to the interface as it is now,
/// in the recorded mode, and records the new attachment in the group's
/// state; returns the state and the interface's index.
fn reattach(live: &mut Live, i: usize) -> Result<(State, u32)> {
    let iface = live.ports[i].paths.iface.clone();
    let index = preflight::check_interface(&iface)?;
    let link = preflight::interface_link(&iface)?;
    if link != live.ports[i].datapath.link() {
        return Err(DaemonError::LinkChanged {
            iface,
            loaded: live.ports[i].datapath.link(),
            now: link,
        });
    }
    let _apply = Lock::apply(&live.paths)?;
    let mut state = live::load_state(&live.paths, Some(live.maps()))?
        .ok_or_else(DaemonError::vanished(&live.paths))?;
    let port = &mut live.ports[i];
    let link_pin = port.paths.pin("link");
    let program = port.datapath.program_mut()?;
    let attached = attach::attach(program, &iface, state.mode, &link_pin)?;
    if i == 0 {
        state.netlink = attached.netlink();
        state.attached_at = live::now();
    } else if let Some(m) = state.members.iter_mut().find(|m| m.iface == iface) {
        m.netlink = attached.netlink();
        m.attached_at = live::now();
    }
    // An attachment the state does not record could not be adopted or
    // detached later: take it off again and retry at the next check.
    if let Err(e) = state.save(&live.paths) {
        if let Err(d) = attached.remove_now(&link_pin) {
            error!("taking the unrecorded attachment off {iface} failed: {d}");
        }
        return Err(DaemonError::SaveAttachment {
            path: live.paths.state_file(),
            source: e,
        });
    }
    let port = &mut live.ports[i];
    port.attached = Some(attached);
    port.ifindex = Some(index);
    live.current.touch(&live.paths, live.maps());
    Ok((state, index))
}

/// Creates an interface's pin and state directories.
fn create_dirs(paths: &Paths) -> Result<(), DaemonError> {
    paths
        .create_dirs()
        .map_err(|source| DaemonError::CreateDirs {
            pin_dir: paths.pin_dir.clone(),
            run_dir: paths.run_dir.clone(),
            source,
        })
}
