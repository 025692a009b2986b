//! `fwmark run`: take over or create the interface's attachment, keep its
//! config in line with the file (SIGHUP, file changes), serve metrics, and
//! on SIGINT/SIGTERM detach (or, with `--keep`, leave marking in place).

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use fwmark_common::ABI_VERSION;
use fwmark_core::Loaded;
use log::{error, info, warn};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attach::{self, AttachMode, Attached},
    cli::RunArgs,
    datapath::{self, Datapath, MAP_NAMES},
    ingress, live, markers, metrics, preflight,
    rtnl::LinkEvents,
    state::{Lock, Paths, State},
    status::Snapshot,
};

/// How often the config file is checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How often attaching to the interface again is retried after it failed
/// (the interface itself is followed by link notifications).
const REATTACH_INTERVAL: Duration = Duration::from_secs(1);

/// The daemon's hold on the interface.
struct Live {
    paths: Paths,
    datapath: Datapath,
    /// None while the interface is gone (or re-attaching to it failed).
    attached: Option<Attached>,
    /// Index of the interface attached to; None while it is gone.
    ifindex: Option<u32>,
    /// The last re-attach failure, logged once until it changes.
    reattach_error: Option<String>,
}

pub async fn run(args: RunArgs) -> Result<()> {
    // Handlers first: a signal that arrives while starting must not kill the
    // process half-way (it is acted on once the start is complete).
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    // The file as it is before it is read: a change made while starting
    // is noticed by the first check.
    let mut last_seen = file_stamp(&args.config);
    // Subscribed before the interface is looked up: a change from then on
    // is reported.
    let mut links = Some(LinkEvents::subscribe().context("subscribing to link notifications")?);
    let new = live::read_config(&args.config)?;
    preflight::check_privileges()?;
    let kernel = preflight::check_kernel()?;
    let ifindex = preflight::check_interface(&args.iface)?;
    if preflight::ensure_bpffs()? {
        info!("mounted bpffs at {}", preflight::BPFFS);
    }
    let paths = Paths::new(&args.iface)?;
    let _daemon = Lock::daemon(&paths).context("another fwmark run manages this interface")?;
    markers::warn_other_markers(&args.iface);
    let requested = AttachMode::choose(args.attach.mode(), kernel)?;

    let mut live = {
        let _apply = Lock::apply(&paths)?;
        start(&paths, &args, requested, &new, ifindex)?
    };

    // Marking is in place: a failure to start the extras leaves it there
    // (as --keep would) rather than removing it on the way out.
    let extras = async {
        let log_task = match live.datapath.logger.take() {
            Some(logger) => Some(spawn_kernel_log(logger)?),
            None => None,
        };
        let metrics_task = match &args.metrics {
            Some(addr) => Some(metrics::serve(addr, paths.clone()).await?),
            None => None,
        };
        Ok::<_, anyhow::Error>((log_task, metrics_task))
    };
    let (log_task, metrics_task) = match extras.await {
        Ok(tasks) => tasks,
        Err(e) => {
            if let Some(attached) = live.attached.take() {
                attached.keep();
            }
            return Err(e.context(format!(
                "marking stays in place on {}; `fwmark detach --iface {}` removes it",
                args.iface, args.iface
            )));
        }
    };

    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Link notifications drive follow_interface; this timer retries a
    // failed re-attach (no notification may come to retry it), and checks
    // every second if the notifications fail.
    let mut retry = tokio::time::interval(REATTACH_INTERVAL);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let which = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            events = async {
                match links.as_mut() {
                    Some(links) => links.next().await,
                    None => std::future::pending().await,
                }
            }, if links.is_some() => match events {
                Ok(events) => {
                    if events.iter().any(|e| e.concerns(&args.iface, live.ifindex)) {
                        follow_interface(&mut live);
                    }
                }
                Err(e) => {
                    error!("{e}: checking {} every second from now on", args.iface);
                    links = None;
                    follow_interface(&mut live);
                }
            },
            _ = retry.tick(), if links.is_none() || live.reattach_error.is_some() => {
                follow_interface(&mut live);
            }
            _ = hup.recv() => {
                info!("SIGHUP: reloading {}", args.config.display());
                last_seen = file_stamp(&args.config);
                reload(&mut live, &args.config);
            }
            _ = watch.tick(), if !args.no_watch => {
                let stamp = file_stamp(&args.config);
                if stamp != last_seen {
                    last_seen = stamp;
                    if stamp.is_none() {
                        warn!(
                            "config {} is gone: the running config stays; it is read again \
                             when the file is back",
                            args.config.display()
                        );
                    } else {
                        info!("{} changed: reloading", args.config.display());
                        reload(&mut live, &args.config);
                    }
                }
            }
        }
    };
    for task in [metrics_task, log_task].into_iter().flatten() {
        task.abort();
    }

    let _apply = Lock::apply(&paths)?;
    let state = live::load_state(&live.paths, Some(&live.datapath.maps))?
        .context("the state file vanished")?;
    let table = Snapshot::collect(&state, &live.datapath.maps, None)
        .map(|s| s.table())
        .unwrap_or_else(|e| format!("(counters unavailable: {e:#})\n"));
    match live.attached.take() {
        Some(attached) if args.keep => {
            info!(
                "{which}: leaving marking in place on {} (--keep); `fwmark detach --iface {}` \
                 removes it",
                args.iface, args.iface
            );
            attached.keep();
        }
        Some(attached) => {
            info!("{which}: detaching from {}", args.iface);
            attached
                .detach(&args.iface, state.program_id)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("detaching from {} failed", args.iface))?;
        }
        None => info!(
            "{which}: {} is gone, nothing is attached to it{}",
            args.iface,
            if args.keep {
                "; the pins and state stay (--keep): the next `fwmark run` attaches with them"
            } else {
                ""
            }
        ),
    }
    if !args.keep {
        live.paths
            .remove()
            .with_context(|| format!("removing {}", live.paths.pin_dir.display()))?;
    }
    print!("{table}");
    Ok(())
}

/// Forwards the classifier's log records to the log output as they come.
fn spawn_kernel_log(logger: datapath::KernelLogger) -> Result<tokio::task::JoinHandle<()>> {
    use tokio::io::{Interest, unix::AsyncFd};
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the
    // same for the logger's whole life, and the AsyncFd owns the logger.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching the kernel log ring buffer: {e}"))?;
    Ok(tokio::spawn(async move {
        loop {
            match logger.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!("kernel log reader stopped: {e}");
                    return;
                }
            }
        }
    }))
}

/// Size, modification and change times and inode of the config file, to
/// notice changes: an editor's rename counts, and so does a change of mode
/// or owner (ctime), which can make the file unreadable or readable again.
/// None when it is gone.
fn file_stamp(path: &Path) -> Option<(u64, i64, i64, i64, i64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        m.ino(),
    ))
}

/// Takes over what a previous fwmark left on the interface, or attaches
/// afresh; then makes `new` the live config.
fn start(
    paths: &Paths,
    args: &RunArgs,
    requested: AttachMode,
    new: &Loaded,
    ifindex: u32,
) -> Result<Live> {
    let pins_present = MAP_NAMES.iter().all(|n| paths.pin(n).exists());
    // Recover an interrupted switch before reading the state.
    let maps = if pins_present {
        datapath::Maps::from_pins(&paths.pin_dir).ok()
    } else {
        None
    };
    let state = live::load_state(paths, maps.as_ref())?;
    drop(maps);

    let adoptable = match &state {
        Some(s) if pins_present && s.abi == ABI_VERSION => true,
        Some(s) if pins_present => bail!(
            "{} holds pins of an incompatible fwmark (layout {}, this one uses {}): run \
             `fwmark detach --iface {}` first (marking stops until this run attaches)",
            paths.pin_dir.display(),
            s.abi,
            ABI_VERSION,
            paths.iface
        ),
        _ => false,
    };
    if !adoptable && (state.is_some() || paths.pin_dir.exists()) {
        warn!(
            "removing an incomplete previous attachment's pins and state for {}",
            paths.iface
        );
        if let Some(s) = &state {
            let _ = attach::remove_left(&paths.iface, s.mode, &paths.pin("link"), s.program_id);
        }
        paths.remove()?;
    }

    if let (true, Some(mut state)) = (adoptable, state) {
        if args.attach != crate::cli::AttachArg::Auto && state.mode != requested {
            bail!(
                "{} is attached with {} already; `fwmark detach --iface {}` first to change to {}",
                paths.iface,
                state.mode,
                paths.iface,
                requested
            );
        }
        let mut datapath = Datapath::load(
            state.rule_capacity,
            Some(&paths.pin_dir),
            args.log_level.level(),
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
        let mut live = Live {
            paths: paths.clone(),
            datapath,
            attached: Some(attached),
            ifindex: Some(ifindex),
            reattach_error: None,
        };
        // From here on the new program marks: an error must not take the
        // attachment (and so the marking) away with it.
        let finish = |live: &mut Live, state: &mut State| -> Result<()> {
            state.save(paths)?;
            info!(
                "adopted the {} attachment on {} (generation {}, program id {} now)",
                state.mode, paths.iface, state.generation, state.program_id
            );
            if state.config_sha256 == new.sha256 {
                info!("config {} unchanged", new.path);
            } else {
                switch_logged(live, state, new)?;
            }
            Ok(())
        };
        if let Err(e) = finish(&mut live, &mut state) {
            if let Some(attached) = live.attached.take() {
                attached.keep();
            }
            return Err(e);
        }
        ready(&state);
        return Ok(live);
    }

    // Fresh: maps created and pinned, config published, then attached, so
    // the first packet the program sees is already classified. A failure on
    // the way removes what it created.
    paths.create_dirs()?;
    let fresh = attach_fresh(paths, args, requested, new, ifindex);
    if fresh.is_err() {
        let _ = paths.remove();
    }
    fresh
}

fn attach_fresh(
    paths: &Paths,
    args: &RunArgs,
    requested: AttachMode,
    new: &Loaded,
    ifindex: u32,
) -> Result<Live> {
    let capacity =
        datapath::rule_capacity(args.max_rules.unwrap_or(0).max(new.ruleset.rules.len()));
    let mut datapath = Datapath::load(capacity, Some(&paths.pin_dir), args.log_level.level())?;
    let mut state = live::initial_state(&paths.iface, requested, capacity);
    live::switch(paths, &mut datapath.maps, &mut state, new)?;
    let program = datapath.program_mut()?;
    let attached = attach::attach(program, &paths.iface, requested, &paths.pin("link"))?;
    state.program_id = program.info().map(|i| i.id()).unwrap_or_default();
    state.netlink = attached.netlink();
    state.attached_at = live::now();
    state.save(paths)?;
    info!(
        "attached to {} ingress via {} (program id {}): {} services, {} rules, {} exact + {} \
         prefix entries from {} (generation {})",
        paths.iface,
        requested,
        state.program_id,
        new.config.len(),
        new.ruleset.rules.len(),
        new.ruleset.exact.len(),
        new.ruleset.prefix.len(),
        new.path,
        state.generation
    );
    if requested == AttachMode::Tcx {
        ingress::log_after_tcx(&paths.iface, state.program_id);
    }
    ready(&state);
    Ok(Live {
        paths: paths.clone(),
        datapath,
        attached: Some(attached),
        ifindex: Some(ifindex),
        reattach_error: None,
    })
}

/// The line that says the daemon is up (tests and operators wait for it).
fn ready(state: &State) {
    info!(
        "marking on {} ({} attachment, program id {}, generation {})",
        state.iface, state.mode, state.program_id, state.generation
    );
}

fn switch_logged(live: &mut Live, state: &mut State, new: &Loaded) -> Result<()> {
    let diff = live::switch(&live.paths, &mut live.datapath.maps, state, new)?;
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

/// Re-reads the config and switches to it; on any problem the running
/// config stays and the reason is logged.
fn reload(live: &mut Live, path: &Path) {
    let result = (|| -> Result<()> {
        let new = live::read_config(path)?;
        let _apply = Lock::apply(&live.paths)?;
        let mut state = live::load_state(&live.paths, Some(&live.datapath.maps))?
            .context("the state file vanished")?;
        if state.config_sha256 == new.sha256 {
            info!(
                "config {} unchanged (generation {})",
                new.path, state.generation
            );
            return Ok(());
        }
        switch_logged(live, &mut state, &new)
    })();
    if let Err(e) = result {
        error!("reload failed, the running config stays: {e:#}");
    }
}

/// Notices the interface going away (its attachment goes with it) and
/// coming back (deleted and created again: a new index), and attaches to
/// the new one with the same maps, config and counters.
fn follow_interface(live: &mut Live) {
    let iface = live.paths.iface.clone();
    let now = preflight::interface_index(&iface).ok();
    if now.is_some() && now == live.ifindex {
        return;
    }
    if let Some(old) = live.ifindex.take() {
        let generation = State::load(&live.paths)
            .ok()
            .flatten()
            .map_or(0, |s| s.generation);
        if preflight::index_exists(old) {
            // Renamed (or the name moved elsewhere): the device and fwmark's
            // attachment on it live on, so take the attachment off it.
            warn!(
                "{iface} no longer names the device with index {old} (renamed?): removing \
                 fwmark's attachment from that device; {}",
                match now {
                    Some(new) => format!("attaching to the new {iface} (index {new})"),
                    None => format!(
                        "waiting for {iface} to appear (generation {generation} stays loaded)"
                    ),
                }
            );
            if let Some(attached) = live.attached.take()
                && let Err(e) = attached.remove_now(&live.paths.pin("link"))
            {
                error!(
                    "removing fwmark from the device with index {old} failed: {e}; check \
                     `tc filter show dev <its name> ingress`"
                );
            }
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
            if let Some(attached) = live.attached.take() {
                attached.abandon(&live.paths.pin("link"));
            }
        }
    }
    let Some(index) = now else {
        return;
    };
    match reattach(live, index) {
        Ok(state) => {
            live.reattach_error = None;
            info!(
                "{iface} is back (index {index}): attached again via {} (program id {}, \
                 generation {})",
                state.mode, state.program_id, state.generation
            );
            ready(&state);
        }
        Err(e) => {
            let e = format!("{e:#}");
            if live.reattach_error.as_ref() != Some(&e) {
                error!("attaching to {iface} again failed: {e}; retrying every second");
                live.reattach_error = Some(e);
            }
        }
    }
}

/// Attaches the loaded program to the interface as it is now (`index`),
/// in the recorded mode, and records the new attachment.
fn reattach(live: &mut Live, index: u32) -> Result<State> {
    let iface = live.paths.iface.clone();
    preflight::check_interface(&iface)?;
    let _apply = Lock::apply(&live.paths)?;
    let mut state = live::load_state(&live.paths, Some(&live.datapath.maps))?
        .context("the state file vanished")?;
    let program = live.datapath.program_mut()?;
    let attached = attach::attach(program, &iface, state.mode, &live.paths.pin("link"))?;
    state.netlink = attached.netlink();
    state.attached_at = live::now();
    // An attachment the state does not record could not be adopted or
    // detached later: take it off again and retry at the next check.
    if let Err(e) = state.save(&live.paths) {
        if let Err(d) = attached.remove_now(&live.paths.pin("link")) {
            error!("taking the unrecorded attachment off {iface} failed: {d}");
        }
        return Err(e).context("recording the new attachment failed, so it was removed");
    }
    live.attached = Some(attached);
    live.ifindex = Some(index);
    Ok(state)
}
