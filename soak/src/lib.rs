//! `cargo xtask soak`: fwmark under continuous traffic and a config change
//! every second, for minutes, with everything checked as it goes.
//!
//! A lab (client and director namespaces joined by veth) runs `fwmark run
//! --metrics` on the director side. The client sends TCP connection
//! attempts and UDP datagrams, IPv4 and IPv6, to ports whose mark changes,
//! ports that come and go and ports that must stay unmarked. Every second
//! the soak makes the next of [`plan::CONFIGS`] configs live, with `fwmark
//! apply` from outside (three changes in five), by rewriting the daemon's
//! config file (its file watch) or by rewriting it and sending SIGHUP.
//! Four times a second it reads nftables counters (the mark each packet
//! arrived with), `fwmark status --json` and `/metrics`, and the daemon's
//! /proc; every two seconds fwmark's kernel objects. See [`checks`] for
//! what must hold, and the report's Method section.

pub mod checks;
pub mod observe;
pub mod plan;
mod report;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use fwmark_testlab::{
    daemon::Daemon,
    netns::{Lab, run_cmd},
    nft::ProbeProto,
};

use crate::{
    checks::{Attach, Checks, How, Switch, Timeline, Verdict},
    observe::{Counters, Kernel, NftCounters, NftReading, Process, Span},
    plan::{CONFIGS, Catalog, Probe},
};

/// How long to soak, and which fwmark.
#[derive(Clone, Debug)]
pub struct Options {
    pub duration: Duration,
    pub fwmark: PathBuf,
}

/// The markdown report and whether everything held.
pub struct Outcome {
    pub report: String,
    pub passed: bool,
    pub violations: Vec<String>,
}

/// Where the daemon serves `/metrics` (loopback of the director namespace).
const METRICS_PORT: u16 = 9469;
/// How often counters, nftables and /proc are read.
const POLL: Duration = Duration::from_millis(250);
/// Kernel objects are read every this many polls (2 s).
const KERNEL_EVERY: u64 = 8;
/// A change through the daemon (file watch: checked every second) must be
/// live within this.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);
/// After the daemon exits, its kernel objects must be gone within this
/// (tcx link release is deferred to a workqueue).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// Packets per probe in the final check of the last config's marks.
const FINAL_BURST: u64 = 3;

/// Config files of the soak in a directory removed on drop.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(lab: &Lab) -> Result<Files> {
        let dir = std::env::temp_dir().join(format!("fwmark-soak-{}", lab.director.name));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = Files { dir };
        for k in 0..CONFIGS {
            std::fs::write(files.applied(k), plan::config_text(k))?;
        }
        Ok(files)
    }

    /// The file `fwmark apply` gets for config `k`.
    fn applied(&self, k: usize) -> PathBuf {
        self.dir.join(format!("apply{k}.toml"))
    }

    /// The daemon's own config file.
    fn live(&self) -> PathBuf {
        self.dir.join("live.toml")
    }

    /// Replaces the daemon's config file in one step (as editors do), so
    /// the watcher never reads half a file.
    fn write_live(&self, k: usize) -> Result<()> {
        let tmp = self.dir.join("live.toml.tmp");
        std::fs::write(&tmp, plan::config_text(k))?;
        std::fs::rename(&tmp, self.live())?;
        Ok(())
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the traffic thread sent.
#[derive(Clone, Debug, Default)]
struct Sent {
    per_probe: Vec<u64>,
    errors: u64,
}

/// Sends one packet to every probe per round (a TCP connection attempt,
/// which the director refuses, or a UDP datagram), a round every 2 ms,
/// until `stop`. Runs in the client namespace.
fn send_until(probes: &[Probe], stop: &AtomicBool) -> Result<Sent> {
    let udp4 = UdpSocket::bind("0.0.0.0:0")?;
    let udp6 = UdpSocket::bind("[::]:0")?;
    let mut sent = Sent {
        per_probe: vec![0; probes.len()],
        errors: 0,
    };
    while !stop.load(Ordering::Relaxed) {
        send_round(probes, &udp4, &udp6, &mut sent);
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(sent)
}

fn send_round(probes: &[Probe], udp4: &UdpSocket, udp6: &UdpSocket, sent: &mut Sent) {
    for (i, p) in probes.iter().enumerate() {
        let addr = SocketAddr::new(p.dst, p.port);
        let ok = match p.proto {
            ProbeProto::Udp => {
                let sock = if p.dst.is_ipv4() { udp4 } else { udp6 };
                sock.send_to(b"fwmark soak", addr).is_ok()
            }
            // Below the 1 s initial RTO: one SYN per attempt, never resent.
            ProbeProto::Tcp => {
                match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                    Ok(_) => true,
                    Err(e) => matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut
                    ),
                }
            }
        };
        if ok {
            sent.per_probe[i] += 1;
        } else {
            sent.errors += 1;
        }
    }
}

/// `fwmark ARGS…` in the director namespace; stdout, or an error with
/// stderr.
fn fwmark(lab: &Lab, bin: &Path, args: &[&str]) -> Result<String> {
    run_cmd(lab.director.command(bin).args(args))
}

fn status(lab: &Lab, bin: &Path) -> Result<Counters> {
    Counters::from_status(&fwmark(
        lab,
        bin,
        &["status", "--iface", &lab.director_if, "--json"],
    )?)
}

/// Makes a config change every second until `deadline`, recording each in
/// `timeline` before it starts and when it is done.
#[allow(clippy::too_many_arguments)]
fn drive(
    lab: &Lab,
    daemon: &Daemon,
    files: &Files,
    bin: &Path,
    timeline: &Mutex<Timeline>,
    t0: Instant,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<()> {
    for i in 1u64.. {
        let when = t0 + Duration::from_secs(i);
        if when >= deadline {
            break;
        }
        while Instant::now() < when {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20).min(when - Instant::now()));
        }
        let k = (i % CONFIGS as u64) as usize;
        let generation = i + 1;
        let how = match i % 5 {
            3 => How::Watch,
            4 => How::Sighup,
            _ => How::Apply,
        };
        let index = {
            let mut t = timeline.lock().expect("timeline");
            t.switches.push(Switch {
                generation,
                config: k,
                how,
                started: Instant::now(),
                done: None,
            });
            t.switches.len() - 1
        };
        let live_line = format!("is live as generation {generation} (");
        match how {
            How::Apply => {
                let file = files.applied(k).display().to_string();
                let out = fwmark(
                    lab,
                    bin,
                    &["apply", "--iface", &lab.director_if, "--config", &file],
                )
                .with_context(|| format!("change {i}: fwmark apply of config {k}"))?;
                let want = format!("generation {generation} is live");
                if !out.contains(&want) {
                    bail!("change {i}: fwmark apply did not say {want:?}:\n{out}");
                }
            }
            How::Watch => {
                files.write_live(k)?;
                daemon
                    .wait_for_log(&live_line, RELOAD_TIMEOUT)
                    .with_context(|| format!("change {i}: file watch, config {k}"))?;
            }
            How::Sighup => {
                files.write_live(k)?;
                daemon.signal(nix::sys::signal::Signal::SIGHUP)?;
                daemon
                    .wait_for_log(&live_line, RELOAD_TIMEOUT)
                    .with_context(|| format!("change {i}: SIGHUP, config {k}"))?;
            }
            How::Start => unreachable!("only the daemon's start is How::Start"),
        }
        timeline.lock().expect("timeline").switches[index].done = Some(Instant::now());
    }
    Ok(())
}

/// One poll's figures, for the samples table.
#[derive(Clone, Debug)]
struct Row {
    t: f64,
    generation: u64,
    packets: u64,
    process: Process,
}

/// Reads everything four times a second and checks it as it comes.
struct Poller<'a> {
    lab: &'a Lab,
    bin: &'a Path,
    nft: &'a NftCounters<'a>,
    probes: &'a [Probe],
    catalog: &'a Catalog,
    timeline: &'a Mutex<Timeline>,
    pid: u32,
    pin_dir: PathBuf,
    t0: Instant,
    checks: Checks,
    attach: Attach,
    last_nft: Option<(Span, NftReading)>,
    /// fwmark readings since the last nftables reading.
    pending: Vec<Counters>,
    last_counters: Option<Counters>,
    rows: Vec<Row>,
    kernel: Vec<(f64, Kernel)>,
    /// Inner maps seen live and then replaced, with when; checked gone at
    /// the next kernel reading.
    retired: Vec<(u32, f64)>,
    inner_ever: BTreeSet<u32>,
    freed: u64,
    polls: u64,
    reads: BTreeMap<&'static str, u64>,
}

impl Poller<'_> {
    fn secs(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn count(&mut self, what: &'static str) {
        *self.reads.entry(what).or_default() += 1;
    }

    /// One poll; false once the daemon is gone.
    fn poll(&mut self) -> bool {
        self.polls += 1;
        self.read_nft();
        self.read_counters();
        let process = match Process::read(self.pid) {
            Ok(p) => p,
            Err(e) => {
                self.checks.fail("daemon", format!("{e:#}"));
                return false;
            }
        };
        let (generation, packets) = (
            self.last_counters.as_ref().map_or(0, |c| c.generation),
            self.last_nft
                .as_ref()
                .map_or(0, |(_, n)| n.marked + n.unmarked),
        );
        self.rows.push(Row {
            t: self.secs(),
            generation,
            packets,
            process,
        });
        if self.polls % KERNEL_EVERY == 1 {
            self.read_kernel();
        }
        true
    }

    fn read_nft(&mut self) {
        let (span, reading) = Span::measure(|| self.nft.read());
        let reading = match reading {
            Ok(r) => r,
            Err(e) => {
                self.checks.fail("poll", format!("reading nftables: {e:#}"));
                return;
            }
        };
        self.count("nft");
        if let Some(last) = &self.last_nft {
            let timeline = self.timeline.lock().expect("timeline");
            checks::marks_between(
                &mut self.checks,
                self.probes,
                &timeline,
                last,
                &(span, reading.clone()),
            );
            for c in &self.pending {
                checks::against_nft(
                    &mut self.checks,
                    self.probes,
                    c,
                    &self.attach,
                    &last.1,
                    &reading,
                );
            }
        }
        self.pending.clear();
        self.last_nft = Some((span, reading));
    }

    fn read_counters(&mut self) {
        let status = status(self.lab, self.bin);
        let metrics = observe::scrape(&self.lab.director, METRICS_PORT)
            .and_then(|body| Counters::from_metrics(&body));
        for (what, reading) in [("status", status), ("metrics", metrics)] {
            let c = match reading {
                Ok(c) => c,
                Err(e) => {
                    self.checks.fail("poll", format!("reading {what}: {e:#}"));
                    continue;
                }
            };
            self.count(what);
            let timeline = self.timeline.lock().expect("timeline");
            if what == "status" {
                checks::identity(&mut self.checks, self.catalog, &timeline, &c, self.pid);
            }
            if let Some(prev) = &self.last_counters {
                checks::monotonic(&mut self.checks, self.catalog, &timeline, prev, &c);
            }
            drop(timeline);
            self.pending.push(c.clone());
            self.last_counters = Some(c);
        }
    }

    fn read_kernel(&mut self) {
        let k = match Kernel::read(self.lab, &self.pin_dir) {
            Ok(k) => k,
            Err(e) => {
                self.checks
                    .fail("kernel objects", format!("reading them: {e:#}"));
                return;
            }
        };
        self.count("kernel");
        let t = self.secs();
        // Replaced inner maps must be gone by the next reading (2 s on).
        let (due, later): (Vec<_>, Vec<_>) = self.retired.drain(..).partition(|(_, at)| *at < t);
        self.retired = later;
        for (id, at) in due {
            let gone = !observe::map_exists(id);
            self.checks.check("kernel objects", gone, || {
                format!("map {id} of a generation replaced by {at:.1} s still exists")
            });
            self.freed += u64::from(gone);
        }
        if let Some((_, prev)) = self.kernel.last() {
            for id in prev.inner_maps.difference(&k.inner_maps) {
                self.retired.push((*id, t));
            }
        }
        self.inner_ever.extend(&k.inner_maps);
        let full = observe::OUTER_MAPS.len() * fwmark_common::GENERATIONS as usize;
        self.checks
            .check("kernel objects", k.programs.len() == 1, || {
                format!("{} programs on the interface, not one", k.programs.len())
            });
        if let Some(first) = self.kernel_baseline() {
            let same = k.programs == first.programs
                && k.program_maps == first.program_maps
                && k.maps() == first.maps()
                && k.pins == first.pins;
            self.checks.check("kernel objects", same, || {
                format!(
                    "fwmark's kernel objects changed: programs {:?} -> {:?}, program maps {:?} -> {:?}, \
                     maps {} -> {}, pins {} -> {}",
                    first.programs,
                    k.programs,
                    first.program_maps,
                    k.program_maps,
                    first.maps(),
                    k.maps(),
                    first.pins,
                    k.pins
                )
            });
        } else if self.kernel.len() > 1 || k.inner_maps.len() == full {
            // From the second generation on both slots hold maps.
            self.checks
                .check("kernel objects", k.inner_maps.len() == full, || {
                    format!(
                        "{} inner maps in the generation slots, not {full}",
                        k.inner_maps.len()
                    )
                });
        }
        self.kernel.push((t, k));
    }

    /// The first kernel reading with every generation slot filled: the
    /// shape every later reading must have.
    fn kernel_baseline(&self) -> Option<Kernel> {
        let full = observe::OUTER_MAPS.len() * fwmark_common::GENERATIONS as usize;
        self.kernel
            .iter()
            .map(|(_, k)| k)
            .find(|k| k.inner_maps.len() == full)
            .cloned()
    }
}

/// Runs the soak; the report says what held and what did not.
pub fn run(opts: &Options) -> Result<Outcome> {
    let date = run_cmd(std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .unwrap_or_default();
    let kernel_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let probes = plan::probes();
    let marks = plan::all_marks(&probes);
    let catalog = Catalog::new()?;
    let lab = Lab::new(&plan::vips(&probes)).context("creating the lab namespaces")?;
    let files = Files::new(&lab)?;
    let nft = NftCounters::install(&lab.director, &lab.director_if, &probes, &marks)?;
    files.write_live(0)?;
    let live = files.live().display().to_string();
    let port = METRICS_PORT.to_string();
    let nft_before = nft.read()?;
    let daemon_started = Instant::now();
    let daemon = Daemon::start_bin(
        &opts.fwmark,
        &lab.director,
        &[
            "run",
            "--iface",
            &lab.director_if,
            "--config",
            &live,
            "--metrics",
            &port,
        ],
    )?;
    let timeline = Mutex::new(Timeline {
        switches: vec![Switch {
            generation: 1,
            config: 0,
            how: How::Start,
            started: daemon_started,
            done: Some(Instant::now()),
        }],
    });
    let attach = Attach {
        before: nft_before,
        after: nft.read()?,
    };
    let pid = status(&lab, &opts.fwmark)?
        .daemon_pid
        .context("status names no daemon")?;
    eprintln!(
        "soak: {} s, fwmark {} (pid {pid}) on {}; violations are printed as they happen",
        opts.duration.as_secs_f64(),
        opts.fwmark.display(),
        lab.director_if
    );

    let t0 = Instant::now();
    let deadline = t0 + opts.duration;
    let stop = AtomicBool::new(false);
    let mut poller = Poller {
        lab: &lab,
        bin: &opts.fwmark,
        nft: &nft,
        probes: &probes,
        catalog: &catalog,
        timeline: &timeline,
        pid,
        pin_dir: lab.director.fwmark_dirs(&lab.director_if)[0].clone(),
        t0,
        checks: Checks::new(t0),
        attach,
        last_nft: None,
        pending: Vec::new(),
        last_counters: None,
        rows: Vec::new(),
        kernel: Vec::new(),
        retired: Vec::new(),
        inner_ever: BTreeSet::new(),
        freed: 0,
        polls: 0,
        reads: BTreeMap::new(),
    };
    let (sent, driven) = std::thread::scope(|s| {
        let traffic = s.spawn(|| lab.client.run(|| send_until(&probes, &stop)));
        let driver = s.spawn(|| {
            drive(
                &lab,
                &daemon,
                &files,
                &opts.fwmark,
                &timeline,
                t0,
                deadline,
                &stop,
            )
        });
        let mut next = Instant::now();
        let mut minute = 0;
        while !driver.is_finished() || Instant::now() < deadline {
            if !poller.poll() {
                break;
            }
            let elapsed = t0.elapsed().as_secs();
            if elapsed / 60 > minute {
                minute = elapsed / 60;
                eprintln!(
                    "soak: {minute} min, generation {}, {} checks, {} violations",
                    poller.last_counters.as_ref().map_or(0, |c| c.generation),
                    poller.checks.total(),
                    poller.checks.total_failed()
                );
            }
            next += POLL;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            } else {
                next = Instant::now();
            }
        }
        stop.store(true, Ordering::Relaxed);
        let sent = traffic
            .join()
            .map_err(|_| anyhow::anyhow!("the traffic thread panicked"))
            .and_then(|r| r.and_then(|r| r));
        let driven = driver
            .join()
            .map_err(|_| anyhow::anyhow!("the driver thread panicked"))
            .and_then(|r| r);
        (sent, driven)
    });
    let sent = sent.context("sending traffic")?;
    if let Err(e) = &driven {
        poller.checks.fail("config change", format!("{e:#}"));
    }

    // Quiet: the last readings must agree exactly (the sandwich closes).
    std::thread::sleep(Duration::from_millis(500));
    let daemon_alive = poller.poll() && poller.poll();
    poller.read_kernel();
    let (last_k, last_generation) = {
        let t = timeline.lock().expect("timeline");
        let s = t.switches.last().expect("generation 1");
        (s.config, s.generation)
    };
    let final_marks = final_burst(&lab, &nft, &probes, last_k, &mut poller.checks)?;
    let end_status = status(&lab, &opts.fwmark).ok();
    poller.checks.check(
        "config identity",
        end_status.as_ref().map(|s| s.generation) == Some(last_generation),
        || {
            format!(
                "the last generation is {:?}, the soak made {last_generation}",
                end_status.as_ref().map(|s| s.generation)
            )
        },
    );

    let finished = if daemon_alive {
        Some(daemon.stop()?)
    } else {
        daemon.kill();
        None
    };
    let after_stop = released(&mut poller);
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let mut ctx = report::ReportContext {
        opts,
        date: date.trim().to_string(),
        kernel_release: kernel_release.trim().to_string(),
        load: (
            load_before
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            load_after
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        ),
        probes: &probes,
        sent: &sent,
        timeline: &timeline.lock().expect("timeline"),
        final_marks: &final_marks,
        finished: finished.as_ref(),
        end_status: end_status.as_ref(),
        after_stop,
        poller: &mut poller,
    };
    let (report, passed) = report::report(&mut ctx);
    Ok(Outcome {
        report,
        passed,
        violations: poller.checks.violations.clone(),
    })
}

/// Sends [`FINAL_BURST`] packets per probe with the traffic stopped: each
/// must arrive with the mark of the last config, all of them.
fn final_burst(
    lab: &Lab,
    nft: &NftCounters<'_>,
    probes: &[Probe],
    k: usize,
    checks: &mut Checks,
) -> Result<Vec<observe::PerMark>> {
    let before = nft.read()?;
    let sent = lab.client.run(|| -> Result<Sent> {
        let udp4 = UdpSocket::bind("0.0.0.0:0")?;
        let udp6 = UdpSocket::bind("[::]:0")?;
        let mut sent = Sent {
            per_probe: vec![0; probes.len()],
            errors: 0,
        };
        for _ in 0..FINAL_BURST {
            send_round(probes, &udp4, &udp6, &mut sent);
        }
        Ok(sent)
    })??;
    std::thread::sleep(Duration::from_millis(300));
    let after = nft.read()?;
    let deltas: Vec<observe::PerMark> = after
        .probes
        .iter()
        .zip(&before.probes)
        .map(|(a, b)| a.since(b))
        .collect();
    for ((p, d), n) in probes.iter().zip(&deltas).zip(&sent.per_probe) {
        let want = p.marks[k];
        let got = d.by_mark.get(&want).copied().unwrap_or(0);
        checks.check("final marks", *n == FINAL_BURST && got == FINAL_BURST && d.total() == FINAL_BURST, || {
            format!(
                "{}: sent {n}, config {k} wants all {FINAL_BURST} with mark {want:#x}, got {:?} (other marks: {})",
                p.label(),
                d.by_mark,
                d.other
            )
        });
    }
    Ok(deltas)
}

/// After the daemon exited: nothing of fwmark's is left in the kernel.
fn released(poller: &mut Poller<'_>) -> Vec<Verdict> {
    let Some(first) = poller.kernel_baseline() else {
        poller.checks.fail(
            "kernel objects",
            "no kernel reading with both generations to compare".into(),
        );
        return Vec::new();
    };
    let maps: BTreeSet<u32> = first
        .program_maps
        .union(&poller.inner_ever)
        .copied()
        .collect();
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    let (left_maps, left_programs) = loop {
        let left_maps: Vec<u32> = maps
            .iter()
            .copied()
            .filter(|id| observe::map_exists(*id))
            .collect();
        let left_programs: Vec<u32> = first
            .programs
            .iter()
            .copied()
            .filter(|id| observe::program_exists(*id))
            .collect();
        if (left_maps.is_empty() && left_programs.is_empty()) || Instant::now() > deadline {
            break (left_maps, left_programs);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let attached =
        fwmark_testlab::netns::ingress_programs(&poller.lab.director, &poller.lab.director_if)
            .unwrap_or_else(|e| vec![format!("error: {e:#}")]);
    let pins_left = poller.pin_dir.exists();
    poller
        .checks
        .check("kernel objects", left_maps.is_empty(), || {
            format!("maps left after the daemon exited: {left_maps:?}")
        });
    poller
        .checks
        .check("kernel objects", left_programs.is_empty(), || {
            format!("programs left after the daemon exited: {left_programs:?}")
        });
    poller
        .checks
        .check("kernel objects", attached.is_empty() && !pins_left, || {
            format!("after the daemon exited: attached {attached:?}, pins left: {pins_left}")
        });
    vec![
        Verdict {
            what: "maps freed after exit",
            rule: "every map fwmark used (program's and every inner map seen) gone within 10 s"
                .into(),
            baseline: maps.len().to_string(),
            end: format!("{} left", left_maps.len()),
            ok: left_maps.is_empty(),
        },
        Verdict {
            what: "programs freed after exit",
            rule: "the classifier gone, nothing on ingress, no pins".into(),
            baseline: first.programs.len().to_string(),
            end: format!(
                "{} left, {} attached, pins {}",
                left_programs.len(),
                attached.len(),
                if pins_left { "left" } else { "removed" }
            ),
            ok: left_programs.is_empty() && attached.is_empty() && !pins_left,
        },
    ]
}
