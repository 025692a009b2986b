//! The daemon behind `fwmark run`: take over or create the interface's
//! attachment, keep its config in line with the file (SIGHUP, file changes),
//! follow the interface, serve metrics, forward the classifier's log, and on
//! SIGINT/SIGTERM detach (or, with `keep`, leave marking in place).
//!
//! Two threads. The async loop (a current-thread tokio runtime) only waits:
//! for signals, link notifications, the file-watch tick, metrics connections and
//! the kernel log; it never does slow work. Everything slow (start,
//! reloads, re-attachment, the final detach) runs on the [`worker`] thread,
//! which owns the loaded program, its maps and the attachment, and takes
//! [`Job`]s over a channel one at a time. Scrapes run on tokio's blocking
//! pool and read the compiled live config the worker publishes
//! ([`metrics::Current`]). So a reload of a million entries, or a reload
//! waiting on another process's `fwmark apply`, delays neither scrapes nor
//! log forwarding, and a SIGTERM that arrives meanwhile is acted on as soon
//! as the job at hand ends.

mod notify;
mod worker;

use std::{io, path::PathBuf, sync::Arc, time::Duration};

use fwmark_core::LoadedError;
use log::{error, info, warn};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attach::AttachError,
    datapath::{DatapathError, KernelLogger},
    live::{self, LiveError},
    markers,
    metrics::{self, Current, Metrics, MetricsError},
    mode::{AttachMode, NoTcx},
    preflight::{self, Bpffs, PreflightError},
    rtnl::{LinkEvents, NetlinkError},
    state::{Lock, LockError, Paths, PathsError},
};

/// Why `fwmark run` cannot start or go on. Each message names the
/// interface or file and, where the user can do something, what.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("starting the async runtime")]
    Runtime(#[source] io::Error),
    #[error("installing the {0} handler")]
    Signal(&'static str, #[source] io::Error),
    #[error("subscribing to link notifications")]
    Subscribe(#[source] NetlinkError),
    #[error("another fwmark run manages this interface")]
    Busy(#[source] LockError),
    #[error("watching the kernel log ring buffer: {0}")]
    KernelLog(String),
    #[error("starting the worker thread")]
    Thread(#[source] io::Error),
    #[error("the worker thread stopped while starting")]
    WorkerStarting,
    #[error(
        "{iface} is attached to the maps of {group} (a later --iface of its run): name \
         {group} first (`fwmark run --iface {group} --iface {iface} ...`), or `fwmark detach \
         --iface {iface}` to take it out of that group"
    )]
    NotFirst { iface: String, group: String },
    #[error("{0} is given twice as --iface")]
    DuplicateIface(String),
    #[error("the worker thread stopped unexpectedly")]
    WorkerGone,
    #[error("the worker thread ended unasked")]
    WorkerEnded,
    #[error(
        "{iface} came back as a {now:?} device, but the loaded classifier parses {loaded:?} \
         packets; restart `fwmark run` to load the entry for the new device"
    )]
    LinkChanged {
        iface: String,
        loaded: fwmark_common::Link,
        now: fwmark_common::Link,
    },
    #[error("marking stays in place on {iface}; `fwmark detach --iface {iface}` removes it")]
    Extras {
        iface: String,
        #[source]
        source: Box<DaemonError>,
    },
    #[error("fwmark run stops; marking on {iface} stays as it was")]
    Stopped {
        iface: String,
        #[source]
        source: Box<DaemonError>,
    },
    #[error(
        "the state file vanished ({} was removed while fwmark run manages {iface})",
        path.display()
    )]
    StateVanished { iface: String, path: PathBuf },
    #[error(
        "{} holds pins of layout {abi}, which this fwmark (layout {ours}; it upgrades layout \
         {legacy} in place) cannot read: {}",
        pin_dir.display(),
        if *abi > *ours {
            format!(
                "they come from a newer fwmark; run that version, or `fwmark detach --iface \
                 {iface}` first (marking stops until this run attaches)"
            )
        } else {
            format!(
                "upgrade through a fwmark that reads them, or `fwmark detach --iface {iface}` \
                 first (marking stops until this run attaches)"
            )
        },
        legacy = crate::upgrade::v2::ABI
    )]
    Incompatible {
        iface: String,
        pin_dir: PathBuf,
        abi: u32,
        ours: u32,
    },
    #[error(
        "{iface} is attached with {mode} already; `fwmark detach --iface {iface}` first to \
         change to {requested}"
    )]
    ModeMismatch {
        iface: String,
        mode: AttachMode,
        requested: AttachMode,
    },
    #[error(
        "{iface} has an fwmark attachment of its own (maps pinned for it): run `fwmark \
         detach --iface {iface}` before adding it to the interfaces of {group}"
    )]
    OwnAttachment { iface: String, group: String },
    #[error(
        "{iface} is attached to the maps of another fwmark run's interfaces (of {group}): \
         run `fwmark detach --iface {iface}` (or remove it from that run's --iface) first"
    )]
    OtherGroup { iface: String, group: String },
    #[error(
        "one set of maps can be attached to at most {} interfaces: start another `fwmark run` \
         for the rest",
        fwmark_common::MAX_INTERFACES
    )]
    TooManyInterfaces,
    #[error("detaching from {iface} failed: {error}")]
    Detach { iface: String, error: String },
    #[error(
        "removing the pins in {} and the state in {}",
        pin_dir.display(),
        run_dir.display()
    )]
    Remove {
        pin_dir: PathBuf,
        run_dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating {} and {}", pin_dir.display(), run_dir.display())]
    CreateDirs {
        pin_dir: PathBuf,
        run_dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("recording the state in {}", path.display())]
    Save {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "recording the new attachment in {} failed, so it was removed",
        path.display()
    )]
    SaveAttachment {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Paths(#[from] PathsError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    NoTcx(#[from] NoTcx),
    #[error(transparent)]
    Loaded(#[from] LoadedError),
    #[error(transparent)]
    Live(#[from] LiveError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("upgrading fwmark's pins on the interface from an older layout")]
    Upgrade(#[source] Box<crate::upgrade::UpgradeError>),
}

impl From<crate::upgrade::UpgradeError> for DaemonError {
    fn from(e: crate::upgrade::UpgradeError) -> DaemonError {
        DaemonError::Upgrade(Box::new(e))
    }
}

/// The exit status of `fwmark run` when its config is what failed
/// (`EX_CONFIG` of sysexits.h); the systemd unit does not restart on it
/// (`RestartPreventExitStatus=`).
pub const EXIT_CONFIG: u8 = 78;

impl DaemonError {
    /// Whether the config is what failed (unreadable, invalid, or a ruleset
    /// that cannot be built): starting again cannot help until the file is
    /// fixed. `fwmark run` exits with [`EXIT_CONFIG`] then.
    pub fn is_config(&self) -> bool {
        match self {
            DaemonError::Loaded(_) => true,
            DaemonError::Extras { source, .. } | DaemonError::Stopped { source, .. } => {
                source.is_config()
            }
            _ => false,
        }
    }

    fn remove(paths: &Paths) -> impl FnOnce(io::Error) -> DaemonError {
        let (pin_dir, run_dir) = (paths.pin_dir.clone(), paths.run_dir.clone());
        move |source| DaemonError::Remove {
            pin_dir,
            run_dir,
            source,
        }
    }

    fn save(paths: &Paths) -> impl FnOnce(io::Error) -> DaemonError {
        let path = paths.state_file();
        move |source| DaemonError::Save { path, source }
    }

    fn vanished(paths: &Paths) -> impl FnOnce() -> DaemonError {
        let iface = paths.iface.clone();
        let path = paths.state_file();
        move || DaemonError::StateVanished { iface, path }
    }
}

type Result<T, E = DaemonError> = std::result::Result<T, E>;

use worker::{Follow, Job, Setup, Stop};

/// How often the config file is checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How often attaching to the interface again is retried after it failed
/// (the interface itself is followed by link notifications).
const REATTACH_INTERVAL: Duration = Duration::from_secs(1);

/// What `fwmark run` is asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// The interface that receives the VIP traffic.
    pub iface: String,
    /// More interfaces that share `iface`'s maps and config (`--iface`
    /// given again): one apply or reload switches them all in one
    /// generation. `iface`'s pins and state are the group's.
    pub members: Vec<String>,
    /// The config file.
    pub config: PathBuf,
    /// How to attach; None: tcx where the kernel has it, else netlink.
    pub attach: Option<AttachMode>,
    /// Leave marking in place on exit.
    pub keep: bool,
    /// Reload when the config file changes (not only on SIGHUP).
    pub watch: bool,
    /// Serve Prometheus metrics at this address (a bare port: 127.0.0.1).
    pub metrics: Option<String>,
    /// Kernel-side log records up to this level (None: compiled out).
    pub kernel_log: Option<aya_log::Level>,
    /// Room for this many rules in the counter map (None: twice the
    /// config's, at least the minimum).
    pub max_rules: Option<usize>,
}

/// Runs the daemon until SIGINT/SIGTERM; prints the counter table on exit.
/// Under systemd (`Type=notify`) it reports readiness, reloads and the stop
/// ([`notify`]); an error that ends it (an invalid config at start, say)
/// becomes the unit's status line as well as the message on stderr.
pub fn run(opts: Options) -> Result<()> {
    let iface = opts.iface.clone();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)
        .and_then(|runtime| runtime.block_on(serve(opts)));
    if let Err(e) = &result {
        notify::status(&format!(
            "fwmark run on {iface} failed: {}",
            crate::chain(e)
        ));
    }
    result
}

async fn serve(mut opts: Options) -> Result<()> {
    // Handlers first: a signal that arrives while starting must not kill the
    // process half-way (it is acted on once the start is complete).
    let handler = |kind, name| signal(kind).map_err(|e| DaemonError::Signal(name, e));
    let mut term = handler(SignalKind::terminate(), "SIGTERM")?;
    let mut int = handler(SignalKind::interrupt(), "SIGINT")?;
    let mut hup = handler(SignalKind::hangup(), "SIGHUP")?;
    // The file as it is before it is read: a change made while starting
    // is noticed by the first check.
    let mut last_seen = file_stamp(&opts.config);
    // Subscribed before the interface is looked up: a change from then on
    // is reported.
    let mut links = Some(LinkEvents::subscribe().map_err(DaemonError::Subscribe)?);
    let new = live::read_config(&opts.config)?;
    preflight::check_privileges()?;
    let kernel = preflight::check_kernel()?;
    let ifindex = preflight::check_interface(&opts.iface)?;
    let mut member_indexes = Vec::new();
    for (i, name) in opts.members.iter().enumerate() {
        if *name == opts.iface || opts.members[..i].contains(name) {
            return Err(DaemonError::DuplicateIface(name.clone()));
        }
        member_indexes.push(preflight::check_interface(name)?);
    }
    if opts.members.len() >= fwmark_common::MAX_INTERFACES as usize {
        return Err(DaemonError::TooManyInterfaces);
    }
    match preflight::ensure_bpffs()? {
        Bpffs::Present => {}
        Bpffs::Host(via) => info!(
            "pinning in the host's bpffs, {via}/{} (this mount namespace has none, as under \
             `ip netns exec`), state in {via}/run/fwmark",
            preflight::BPFFS.trim_start_matches('/')
        ),
        Bpffs::Mounted { lasting: true } => info!("mounted bpffs at {}", preflight::BPFFS),
        Bpffs::Mounted { lasting: false } => {
            warn!(
                "mounted bpffs at {bpffs} in a private mount namespace that ends with this \
                 command, and no lasting bpffs is reachable (none at /proc/1/root{bpffs} or an \
                 ancestor process's): --keep and surviving a crash are not available, marking \
                 stops when fwmark exits; mount bpffs where it lasts (`mount -t bpf -o mode=0700 \
                 bpf {bpffs}` on the host, or into the container) and start fwmark again",
                bpffs = preflight::BPFFS
            );
            opts.keep = false;
        }
    }
    let paths = Paths::new(&opts.iface)?;
    let _daemon = Lock::daemon(&paths).map_err(DaemonError::Busy)?;
    if let Some(group) = paths.group() {
        // Its directories hold only its link: starting afresh there would
        // take it off the group's maps.
        return Err(DaemonError::NotFirst {
            iface: opts.iface.clone(),
            group,
        });
    }
    // Each member's daemon lock too: no other run takes it meanwhile.
    let mut members = Vec::new();
    let mut _member_locks = Vec::new();
    for (name, index) in opts.members.iter().zip(member_indexes) {
        let member = Paths::new(name)?;
        _member_locks.push(Lock::daemon(&member).map_err(DaemonError::Busy)?);
        members.push((member, index));
    }
    for (inode, result) in crate::state::remove_stale() {
        match result {
            Ok(()) => info!(
                "removed fwmark's pins and state of network namespace net:[{inode}], which was \
                 deleted while fwmark was attached there"
            ),
            Err(e) => warn!(
                "removing fwmark's pins and state of the deleted network namespace \
                 net:[{inode}] failed: {e}"
            ),
        }
    }
    for name in std::iter::once(&opts.iface).chain(&opts.members) {
        markers::warn_other_markers(name);
    }
    let requested = AttachMode::choose(opts.attach, kernel)?;

    let current = Arc::new(Current::default());
    let follow = Arc::new(Follow::new(1 + opts.members.len()));
    let (mut worker, loggers) = worker::spawn(Setup {
        paths: paths.clone(),
        opts: opts.clone(),
        requested,
        new,
        ifindex,
        members,
        current: Arc::clone(&current),
        follow: Arc::clone(&follow),
    })
    .await?;

    // Marking is in place: a failure to start the extras leaves it there
    // (as --keep would) rather than removing it on the way out.
    let extras = async {
        let log_tasks = loggers
            .into_iter()
            .map(spawn_kernel_log)
            .collect::<Result<Vec<_>>>()?;
        let metrics_task = match &opts.metrics {
            Some(addr) => {
                let metrics = Metrics::open(paths.clone(), Arc::clone(&current))?;
                Some(metrics::serve(addr, Arc::new(metrics)).await?)
            }
            None => None,
        };
        Ok::<_, DaemonError>((log_tasks, metrics_task))
    };
    let (log_tasks, metrics_task) = match extras.await {
        Ok(tasks) => tasks,
        Err(e) => {
            let _ = worker.finish(Stop::Keep).await;
            return Err(DaemonError::Extras {
                iface: opts.iface.clone(),
                source: Box::new(e),
            });
        }
    };

    // Marking is in place and the extras are up: the worker tells the
    // service manager (READY=1), before any reload queued after this.
    let jobs = worker.jobs();
    jobs.send(Job::Ready);

    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Link notifications start following the interface; this timer retries
    // a failed re-attach (no notification may come to retry it), and checks
    // every second if the notifications fail.
    let mut retry = tokio::time::interval(REATTACH_INTERVAL);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let which = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            e = worker.ended() => return Err(DaemonError::Stopped {
                iface: opts.iface.clone(),
                source: Box::new(e),
            }),
            events = async {
                match links.as_mut() {
                    Some(links) => links.next().await,
                    None => std::future::pending().await,
                }
            }, if links.is_some() => match events {
                Ok(events) => {
                    let ifaces = std::iter::once(&opts.iface).chain(&opts.members);
                    if ifaces.enumerate().any(|(i, name)| {
                        events.iter().any(|e| e.concerns(name, follow.ifindex(i)))
                    }) {
                        jobs.send(Job::Interface);
                    }
                }
                Err(e) => {
                    error!("{}: checking {} every second from now on", crate::chain(&e), opts.iface);
                    links = None;
                    jobs.send(Job::Interface);
                }
            },
            _ = retry.tick() => {
                if links.is_none() || follow.retrying() {
                    jobs.send(Job::Interface);
                }
            }
            _ = hup.recv() => {
                info!("SIGHUP: reloading {}", opts.config.display());
                last_seen = file_stamp(&opts.config);
                jobs.send(Job::Reload);
            }
            _ = watch.tick(), if opts.watch => {
                let stamp = file_stamp(&opts.config);
                if stamp != last_seen {
                    last_seen = stamp;
                    if stamp.is_none() {
                        warn!(
                            "config {} is gone: the running config stays; it is read again \
                             when the file is back",
                            opts.config.display()
                        );
                    } else {
                        info!("{} changed: reloading", opts.config.display());
                        jobs.send(Job::Reload);
                    }
                }
            }
        }
    };
    // The worker acts on it once the job at hand ends; metrics and the
    // kernel log are served until then.
    let table = worker.finish(Stop::Signal(which)).await;
    for task in log_tasks.into_iter().chain(metrics_task) {
        task.abort();
    }
    print!("{}", table?);
    Ok(())
}

/// Forwards the classifier's log records to the log output as they come.
fn spawn_kernel_log(logger: KernelLogger) -> Result<tokio::task::JoinHandle<()>> {
    use tokio::io::{Interest, unix::AsyncFd};
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the
    // same for the logger's whole life, and the AsyncFd owns the logger.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| DaemonError::KernelLog(e.to_string()))?;
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
fn file_stamp(path: &std::path::Path) -> Option<(u64, i64, i64, i64, i64, u64)> {
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
