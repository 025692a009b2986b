//! `fwmark run --metrics ADDR`: the counters in Prometheus text format at
//! `GET /metrics`. A bare port binds 127.0.0.1; give an address to listen
//! elsewhere.
//!
//! The daemon keeps its live config compiled ([`Current`]): a scrape reads
//! the counters from the maps and renders them, it never parses the config.
//! A change made by another process (`fwmark apply`) is noticed by a cheap
//! check of the state file and the `ACTIVE` map ([`Stamp`]); only then is
//! the recorded config compiled again, once, by the scrape that noticed it.
//! Scrapes run on tokio's blocking pool, never on the task that answers
//! signals; each also reads IPVS (two short netlink dumps, `crate::ipvs`)
//! for the `fwmark_ipvs_*` gauges.

use std::{
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use fwmark_common::GlobalCounters;
use fwmark_core::{ipvs_check, text::mark as mark_text};
use log::{info, warn};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use crate::{
    datapath::{DatapathError, Maps},
    live::{self, LiveError, PENDING_FILE},
    state::Paths,
    status::{Counts, LiveConfig},
};

/// Why the metrics cannot be served or one scrape cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "no state for {iface} in {}, though fwmark run serves its metrics (was the directory \
         removed?); restart `fwmark run --iface {iface}`",
        run_dir.display()
    )]
    NoState {
        iface: String,
        run_dir: std::path::PathBuf,
    },
    #[error("opening the maps pinned in {}", pin_dir.display())]
    Open {
        pin_dir: std::path::PathBuf,
        #[source]
        source: Box<DatapathError>,
    },
    #[error("--metrics: cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the scrape stopped")]
    ScrapeStopped(#[source] tokio::task::JoinError),
    #[error("reading the request or writing the response")]
    Connection(#[from] std::io::Error),
    #[error(transparent)]
    Live(#[from] LiveError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// `9469` -> `127.0.0.1:9469`; anything else is used as given.
pub fn listen_address(addr: &str) -> String {
    if !addr.is_empty() && addr.bytes().all(|b| b.is_ascii_digit()) {
        format!("127.0.0.1:{addr}")
    } else {
        addr.to_string()
    }
}

/// What the state of an interface looks like from outside, to notice a
/// change without reading it: the state file and the pending file of an
/// unfinished switch (inode, size, modification time), and the `ACTIVE`
/// slot (a switch moves it). Every change of the live config writes a
/// pending file and renames it over the state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    state: Option<(u64, u64, i64, i64)>,
    pending: Option<(u64, u64, i64, i64)>,
    active: u32,
}

impl Stamp {
    pub fn read(paths: &Paths, maps: &Maps) -> Result<Stamp, DatapathError> {
        use std::os::unix::fs::MetadataExt as _;
        let file = |path: std::path::PathBuf| {
            std::fs::metadata(path)
                .ok()
                .map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
        };
        Ok(Stamp {
            state: file(paths.state_file()),
            pending: file(paths.run_dir.join(PENDING_FILE)),
            active: maps.active_slot()?,
        })
    }
}

/// The live config the daemon keeps compiled: the worker replaces it after
/// each switch, scrapes read it.
#[derive(Debug, Default)]
pub struct Current {
    cache: Mutex<Cache>,
    /// The worker is switching: readers use the config they have while the
    /// kernel does (`ACTIVE` still at `changing_from`), and wait for the
    /// worker to publish the new one once it moved.
    changing: AtomicBool,
    /// The `ACTIVE` slot when the switch began.
    changing_from: AtomicU32,
}

/// How long a scrape waits for the worker to publish the config the kernel
/// switched to (it records the state first: a rename and an fsync).
const PUBLISH_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct Cache {
    live: Option<Arc<LiveConfig>>,
    /// How the state looked when `live` was known to be its config.
    stamp: Option<Stamp>,
}

/// Marks the live config as changing while it lives (see [`Current::changing`]).
pub struct Changing<'a>(&'a Current);

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        self.0.changing.store(false, Ordering::Release);
    }
}

impl Current {
    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A scrape that panicked leaves a cache that is still whole.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by whoever switches the config, holding the apply lock, before
    /// the switch: until the guard drops, readers serve the config they
    /// have while the kernel uses it, rather than compiling the one being
    /// switched to from the state, and wait for [`Current::set`] once the
    /// kernel uses the new one (so a scrape never shows an older generation
    /// than `fwmark status`, which follows `ACTIVE`).
    pub fn changing(&self, maps: &Maps) -> Changing<'_> {
        // Unreadable (it never is while the maps are open): any slot read
        // later differs, and the reader waits for the worker.
        let from = maps.active_slot().unwrap_or(u32::MAX);
        self.changing_from.store(from, Ordering::Release);
        self.changing.store(true, Ordering::Release);
        Changing(self)
    }

    /// `live` is the live config now, as recorded in `paths` and `maps`
    /// (called holding the apply lock, after the state is written).
    pub fn set(&self, live: Option<Arc<LiveConfig>>, paths: &Paths, maps: &Maps) {
        let stamp = Stamp::read(paths, maps).ok();
        *self.cache() = Cache { live, stamp };
    }

    /// The state was written again with the same live config (e.g. a new
    /// attachment recorded): remember how it looks now.
    pub fn touch(&self, paths: &Paths, maps: &Maps) {
        let stamp = Stamp::read(paths, maps).ok();
        self.cache().stamp = stamp;
    }

    /// The live config as last set or compiled, without checking the state.
    pub fn get(&self) -> Option<Arc<LiveConfig>> {
        self.cache().live.clone()
    }

    /// The live config as the state records it now: the one kept, unless
    /// another process changed it since, in which case it is compiled from
    /// the state (once: later callers get that one).
    pub fn fresh(
        &self,
        paths: &Paths,
        maps: &Maps,
    ) -> Result<Option<Arc<LiveConfig>>, MetricsError> {
        if self.changing.load(Ordering::Acquire) {
            if maps.active_slot()? == self.changing_from.load(Ordering::Acquire) {
                // The kernel still classifies by the config we have.
                return Ok(self.cache().live.clone());
            }
            // Switched: the worker publishes the new config in a moment.
            let deadline = Instant::now() + PUBLISH_WAIT;
            while self.changing.load(Ordering::Acquire) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let mut cache = self.cache();
        let stamp = Stamp::read(paths, maps)?;
        if cache.stamp == Some(stamp) {
            return Ok(cache.live.clone());
        }
        let (state, _) = live::peek_state(paths, maps)?.ok_or_else(|| MetricsError::NoState {
            iface: paths.iface.clone(),
            run_dir: paths.run_dir.clone(),
        })?;
        let kept = cache.live.as_ref().is_some_and(|l| l.is_of(&state));
        if !kept {
            cache.live = LiveConfig::of_state(&state)?.map(Arc::new);
        }
        cache.stamp = Some(stamp);
        Ok(cache.live.clone())
    }
}

/// What serves the scrapes of one interface: its maps (opened once) and
/// the daemon's compiled live config.
pub struct Metrics {
    paths: Paths,
    maps: Maps,
    current: Arc<Current>,
    /// Each interface of the group and its slot of the global counters
    /// (fixed for the daemon's life: its `--iface` list).
    interfaces: Vec<(String, u32)>,
}

impl Metrics {
    /// Opens the interface's pinned maps.
    pub fn open(paths: Paths, current: Arc<Current>) -> Result<Metrics, MetricsError> {
        let maps = Maps::from_pins(&paths.pin_dir).map_err(|source| MetricsError::Open {
            pin_dir: paths.pin_dir.clone(),
            source: Box::new(source),
        })?;
        let members = crate::state::State::load(&paths)
            .ok()
            .flatten()
            .map(|s| s.members)
            .unwrap_or_default();
        let interfaces = std::iter::once((paths.iface.clone(), 0))
            .chain(members.into_iter().map(|m| (m.iface, m.counter_slot)))
            .collect();
        Ok(Metrics {
            paths,
            maps,
            current,
            interfaces,
        })
    }

    /// One scrape: the exposition with the counters as they are now, and
    /// what IPVS has for the live config's marks (left out, with a
    /// warning in the log, when IPVS cannot be read).
    pub fn exposition(&self) -> Result<String, MetricsError> {
        let live = self.current.fresh(&self.paths, &self.maps)?;
        let mut text = exposition(&self.paths.iface, live.as_deref(), &self.maps)?;
        let per_slot = self.maps.global_counters_per_slot()?;
        let interfaces: Vec<(&str, GlobalCounters)> = self
            .interfaces
            .iter()
            .map(|(name, slot)| {
                let counts = per_slot.get(*slot as usize).copied().unwrap_or_default();
                (name.as_str(), counts)
            })
            .collect();
        render_interfaces(&mut text, &self.paths.iface, &interfaces);
        if let Some(live) = live.as_deref() {
            match crate::ipvs::read() {
                Ok(ipvs) => render_ipvs(&mut text, &self.paths.iface, live, &ipvs),
                Err(e) => warn!(
                    "metrics: IPVS left out of this scrape: {}",
                    crate::chain(&e)
                ),
            }
        }
        Ok(text)
    }
}

/// Reads the counters of `live` (None: nothing is live) and renders them.
pub fn exposition(
    iface: &str,
    live: Option<&LiveConfig>,
    maps: &Maps,
) -> Result<String, DatapathError> {
    let counts = match live {
        Some(live) => live.counts(maps)?,
        None => Counts {
            global: maps.global_counters()?,
            rules: Vec::new(),
            services: Vec::new(),
        },
    };
    Ok(render(iface, live, &counts))
}

/// The packet outcomes: every packet the classifier sees has exactly one,
/// so they add up to `seen`.
pub fn outcomes(g: &GlobalCounters) -> [(&'static str, u64); 4] {
    [
        ("marked", g.marked),
        ("no_match", g.no_match),
        ("non_ip", g.non_ip),
        ("malformed", g.malformed),
    ]
}

/// Prometheus text exposition format (version 0.0.4) of `counts`, the
/// counters of `live` on `iface`.
pub fn render(iface: &str, live: Option<&LiveConfig>, counts: &Counts) -> String {
    let rules = live.map_or(0, |l| l.slots.len());
    let mut out = String::with_capacity(4096 + rules * 96);
    let mut num = itoa::Buffer::new();
    let iface = escape(iface);
    let header = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };
    // `iface="…",service="…"` of every service, escaped once per scrape.
    let service_labels: Vec<String> = live.map_or_else(Vec::new, |l| {
        l.services
            .iter()
            .map(|s| format!("iface=\"{iface}\",service=\"{}\"", escape(&s.name)))
            .collect()
    });

    for (name, help, bytes) in [
        (
            "fwmark_service_packets_total",
            "Packets marked, per service.",
            false,
        ),
        (
            "fwmark_service_bytes_total",
            "Bytes (from the IP header on) of packets marked, per service.",
            true,
        ),
    ] {
        header(&mut out, name, "counter", help);
        if let Some(live) = live {
            for ((s, labels), c) in live
                .services
                .iter()
                .zip(&service_labels)
                .zip(&counts.services)
            {
                let value = if bytes { c.bytes } else { c.packets };
                let _ = writeln!(
                    out,
                    "{name}{{{labels},mark=\"{}\"}} {value}",
                    mark_text(s.mark, s.mask)
                );
            }
        }
    }

    let name = "fwmark_service_icmp_errors_total";
    header(
        &mut out,
        name,
        "counter",
        "ICMP errors marked by the packet they quote (icmp_errors = true), per service; \
         also counted in fwmark_service_packets_total.",
    );
    if let Some(live) = live {
        for ((s, labels), c) in live
            .services
            .iter()
            .zip(&service_labels)
            .zip(&counts.services)
        {
            let _ = writeln!(
                out,
                "{name}{{{labels},mark=\"{}\"}} {}",
                mark_text(s.mark, s.mask),
                c.icmp_errors
            );
        }
    }

    let name = "fwmark_rule_packets_total";
    header(
        &mut out,
        name,
        "counter",
        "Packets marked, per rule (service, address, protocol, ports).",
    );
    if let Some(live) = live {
        for ((service, matches), c) in live.rules().zip(&counts.rules) {
            out.push_str(name);
            out.push('{');
            out.push_str(&service_labels[service]);
            out.push_str(",match=\"");
            escape_into(&mut out, matches);
            out.push_str("\"} ");
            out.push_str(num.format(c.packets));
            out.push('\n');
        }
    }

    let name = "fwmark_packets_total";
    header(
        &mut out,
        name,
        "counter",
        "Packets the classifier saw, by outcome (marked, no_match, non_ip, malformed); \
         the outcomes add up to every packet seen.",
    );
    for (result, value) in outcomes(&counts.global) {
        let _ = writeln!(
            out,
            "{name}{{iface=\"{iface}\",result=\"{result}\"}} {value}"
        );
    }

    let name = "fwmark_later_fragments_total";
    header(
        &mut out,
        name,
        "counter",
        "IP fragments at a non-zero offset (no ports: only all-ports services match them); \
         each is also counted in fwmark_packets_total by its outcome.",
    );
    let _ = writeln!(
        out,
        "{name}{{iface=\"{iface}\"}} {}",
        counts.global.later_fragment
    );

    let generation = live.map_or(0, |l| l.generation);
    let name = "fwmark_config_generation";
    header(
        &mut out,
        name,
        "gauge",
        "Generation of the live config (counts every switch).",
    );
    let _ = writeln!(out, "{name}{{iface=\"{iface}\"}} {generation}");

    let name = "fwmark_config_info";
    header(
        &mut out,
        name,
        "gauge",
        "The live config: the file it was read from, its SHA-256 and generation (always 1).",
    );
    if let Some(live) = live {
        let _ = writeln!(
            out,
            "{name}{{iface=\"{iface}\",file=\"{}\",sha256=\"{}\",generation=\"{generation}\"}} 1",
            escape(&live.path),
            escape(&live.sha256)
        );
    }
    out
}

/// Appends the packet outcomes per interface of the group `iface` names
/// (its first interface): `fwmark_interface_packets_total{iface=…,
/// interface=…,result=…}`. Over the interfaces they add up to
/// `fwmark_packets_total` (read at another instant, so later packets may
/// be in one and not the other).
pub fn render_interfaces(out: &mut String, iface: &str, interfaces: &[(&str, GlobalCounters)]) {
    let iface = escape(iface);
    let name = "fwmark_interface_packets_total";
    let _ = writeln!(
        out,
        "# HELP {name} Packets the classifier saw on each interface of the group, by outcome \
         (as fwmark_packets_total, which is their sum)."
    );
    let _ = writeln!(out, "# TYPE {name} counter");
    for (interface, counts) in interfaces {
        let interface = escape(interface);
        for (result, value) in outcomes(counts) {
            let _ = writeln!(
                out,
                "{name}{{iface=\"{iface}\",interface=\"{interface}\",result=\"{result}\"}} {value}"
            );
        }
    }
}

/// Appends the IPVS gauges for the marks of `live`: whether IPVS is
/// loaded, per service and family whether an IPVS fwmark service takes
/// its mark, and per mark and family how many real servers those IPVS
/// services have.
pub fn render_ipvs(out: &mut String, iface: &str, live: &LiveConfig, ipvs: &ipvs_check::Snapshot) {
    let iface = escape(iface);
    let header = |out: &mut String, name: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
    };
    let name = "fwmark_ipvs_loaded";
    header(
        out,
        name,
        "Whether the kernel has IPVS (the ip_vs module): 1 or 0.",
    );
    let _ = writeln!(out, "{name}{{iface=\"{iface}\"}} {}", u8::from(ipvs.loaded));

    let name = "fwmark_ipvs_service_present";
    header(
        out,
        name,
        "Whether IPVS has a fwmark service of the family for the service's mark: 1 or 0.",
    );
    // Real servers per (mark, family), each mark once.
    let mut servers: std::collections::BTreeMap<(String, &str), usize> = Default::default();
    for (label, m) in live.services.iter().zip(&live.marks) {
        let mark = mark_text(m.mark, m.mask);
        for &family in &m.families {
            let fed: Vec<&ipvs_check::IpvsService> = ipvs_check::fed_by(m, ipvs)
                .filter(|s| s.family == family)
                .collect();
            let _ = writeln!(
                out,
                "{name}{{iface=\"{iface}\",service=\"{}\",mark=\"{mark}\",family=\"{}\"}} {}",
                escape(&label.name),
                family.name(),
                u8::from(!fed.is_empty())
            );
            servers
                .entry((mark.clone(), family.name()))
                .or_insert_with(|| fed.iter().map(|s| s.dests.len()).sum());
        }
    }
    let name = "fwmark_ipvs_real_servers";
    header(
        out,
        name,
        "Real servers of the IPVS fwmark services that take a mark, per mark and family.",
    );
    for ((mark, family), n) in servers {
        let _ = writeln!(
            out,
            "{name}{{iface=\"{iface}\",mark=\"{mark}\",family=\"{family}\"}} {n}"
        );
    }
}

/// Appends `s` as a Prometheus label value (backslash, double quote and
/// newline escaped).
fn escape_into(out: &mut String, s: &str) {
    if !s.contains(['\\', '"', '\n']) {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `s` as a Prometheus label value.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    escape_into(&mut out, s);
    out
}

/// Binds and serves in a background task; each scrape runs on the blocking
/// pool.
pub async fn serve(addr: &str, metrics: Arc<Metrics>) -> Result<JoinHandle<()>, MetricsError> {
    let addr = listen_address(addr);
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| MetricsError::Listen {
            addr: addr.clone(),
            source,
        })?;
    info!("serving metrics at http://{addr}/metrics");
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let metrics = Arc::clone(&metrics);
                    tokio::spawn(async move {
                        if let Err(e) = respond(stream, metrics).await {
                            warn!("metrics request failed: {}", crate::chain(&e));
                        }
                    });
                }
                Err(e) => warn!("metrics: accept failed: {e}"),
            }
        }
    }))
}

async fn respond(mut stream: TcpStream, metrics: Arc<Metrics>) -> Result<(), MetricsError> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    // Read the request head (the first line is all that matters).
    while len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || buf[..len].contains(&b'\n') {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => {
            let scrape = tokio::task::spawn_blocking(move || metrics.exposition())
                .await
                .map_err(MetricsError::ScrapeStopped)
                .and_then(|r| r);
            match scrape {
                Ok(body) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body),
                Err(e) => (
                    "503 Service Unavailable",
                    "text/plain; charset=utf-8",
                    format!("fwmark: cannot read counters: {}\n", crate::chain(&e)),
                ),
            }
        }
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "fwmark serves /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "GET only\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fwmark_common::RuleCounters;

    use super::*;
    use fwmark_core::{config::Config, ruleset::Ruleset};

    #[test]
    fn per_interface_packets_are_labelled_by_group_and_interface() {
        let g = |marked| GlobalCounters {
            seen: marked + 1,
            marked,
            no_match: 1,
            ..GlobalCounters::default()
        };
        let mut out = String::new();
        render_interfaces(&mut out, "eth0", &[("eth0", g(5)), ("tun\"x", g(2))]);
        assert!(out.contains("# TYPE fwmark_interface_packets_total counter\n"));
        assert!(out.contains(
            "fwmark_interface_packets_total{iface=\"eth0\",interface=\"eth0\",result=\"marked\"} 5\n"
        ));
        assert!(out.contains(
            "fwmark_interface_packets_total{iface=\"eth0\",interface=\"tun\\\"x\",result=\"marked\"} 2\n"
        ));
        assert_eq!(out.matches("result=\"no_match\"} 1\n").count(), 2, "{out}");
    }

    #[test]
    fn a_bare_port_listens_on_loopback_only() {
        assert_eq!(super::listen_address("9469"), "127.0.0.1:9469");
        assert_eq!(super::listen_address("0.0.0.0:9469"), "0.0.0.0:9469");
        assert_eq!(super::listen_address("[::1]:9469"), "[::1]:9469");
    }

    const CONFIG: &str = "[[service]]\nname = \"we\\\"b\"\nvip = \"192.0.2.10\"\n\
        proto = \"tcp\"\nports = [80, 443]\nmark = 80\n\n\
        [[service]]\nname = \"dns\"\nvip = \"192.0.2.53\"\nproto = \"udp\"\nports = [53]\n\
        mark = 0x35\nmask = 0xff\n";

    fn live(path: &str) -> LiveConfig {
        let config = Config::parse(CONFIG, path).unwrap();
        let ruleset = Ruleset::compile(&config).unwrap();
        LiveConfig::new(3, path, &"ab".repeat(32), vec![7, 1, 4], &config, &ruleset)
    }

    fn counts() -> Counts {
        let rule = |packets, bytes| RuleCounters {
            packets,
            bytes,
            icmp_errors: packets / 2,
        };
        Counts {
            // 17 seen: 6 + 5 + 4 + 2; 3 later fragments among them.
            global: GlobalCounters {
                seen: 17,
                marked: 6,
                no_match: 5,
                non_ip: 4,
                later_fragment: 3,
                malformed: 2,
                icmp_error: 1,
            },
            rules: vec![rule(1, 60), rule(3, 180), rule(2, 120)],
            services: vec![rule(4, 240), rule(2, 120)],
        }
    }

    /// `name{labels} value` lines of one metric: labels -> value.
    fn samples(text: &str, name: &str) -> BTreeMap<String, u64> {
        text.lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
            .map(|rest| {
                let (labels, value) = rest.rsplit_once("} ").unwrap();
                (labels.to_string(), value.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn outcomes_add_up_to_seen_and_later_fragments_stand_apart() {
        let text = render("eth0", Some(&live("/etc/fwmark.toml")), &counts());
        let outcomes = samples(&text, "fwmark_packets_total");
        assert_eq!(
            outcomes.keys().collect::<Vec<_>>(),
            [
                "iface=\"eth0\",result=\"malformed\"",
                "iface=\"eth0\",result=\"marked\"",
                "iface=\"eth0\",result=\"no_match\"",
                "iface=\"eth0\",result=\"non_ip\"",
            ]
        );
        assert_eq!(outcomes.values().sum::<u64>(), counts().global.seen);
        assert_eq!(
            samples(&text, "fwmark_later_fragments_total"),
            BTreeMap::from([("iface=\"eth0\"".to_string(), 3)])
        );
        // Every family is declared once, with its type.
        for (family, kind) in [
            ("fwmark_packets_total", "counter"),
            ("fwmark_later_fragments_total", "counter"),
            ("fwmark_config_info", "gauge"),
        ] {
            assert_eq!(
                text.matches(&format!("# TYPE {family} {kind}\n")).count(),
                1,
                "{text}"
            );
        }
    }

    #[test]
    fn services_rules_and_config_are_labelled_and_escaped() {
        let text = render("eth0", Some(&live("/etc/fw\"mark\\new\n.toml")), &counts());
        assert_eq!(
            samples(&text, "fwmark_config_info"),
            BTreeMap::from([(
                format!(
                    "iface=\"eth0\",file=\"/etc/fw\\\"mark\\\\new\\n.toml\",sha256=\"{}\",\
                     generation=\"3\"",
                    "ab".repeat(32)
                ),
                1
            )])
        );
        assert!(text.contains("fwmark_config_generation{iface=\"eth0\"} 3\n"));
        assert_eq!(
            samples(&text, "fwmark_service_packets_total"),
            BTreeMap::from([
                (
                    "iface=\"eth0\",service=\"dns\",mark=\"0x35/0xff\"".to_string(),
                    2
                ),
                (
                    "iface=\"eth0\",service=\"we\\\"b\",mark=\"0x50\"".to_string(),
                    4
                ),
            ])
        );
        assert_eq!(
            samples(&text, "fwmark_service_bytes_total")["iface=\"eth0\",service=\"we\\\"b\",mark=\"0x50\""],
            240
        );
        assert_eq!(
            samples(&text, "fwmark_service_icmp_errors_total"),
            BTreeMap::from([
                (
                    "iface=\"eth0\",service=\"dns\",mark=\"0x35/0xff\"".to_string(),
                    1
                ),
                (
                    "iface=\"eth0\",service=\"we\\\"b\",mark=\"0x50\"".to_string(),
                    2
                ),
            ])
        );
        assert_eq!(
            samples(&text, "fwmark_rule_packets_total"),
            BTreeMap::from([
                (
                    "iface=\"eth0\",service=\"we\\\"b\",match=\"192.0.2.10 tcp port 80\""
                        .to_string(),
                    1
                ),
                (
                    "iface=\"eth0\",service=\"we\\\"b\",match=\"192.0.2.10 tcp port 443\""
                        .to_string(),
                    3
                ),
                (
                    "iface=\"eth0\",service=\"dns\",match=\"192.0.2.53 udp port 53\"".to_string(),
                    2
                ),
            ])
        );
    }

    #[test]
    fn ipvs_gauges_say_which_marks_ipvs_takes_and_how_many_real_servers() {
        use fwmark_core::ipvs_check::{Family, IpvsDest, IpvsService, Snapshot};
        let dest = IpvsDest {
            addr: "10.0.2.2".parse().unwrap(),
            port: 0,
            forward: 0,
            weight: 1,
            active_conns: 0,
            inactive_conns: 0,
            persist_conns: 0,
        };
        let fwm = |fwmark, n| IpvsService {
            family: Family::V4,
            fwmark,
            protocol: 0,
            addr: None,
            port: 0,
            scheduler: "rr".into(),
            flags: 0,
            timeout: 0,
            dests: vec![dest.clone(); n],
        };
        // 80 taken by one service with 2 real servers; 0x35/0xff by two
        // (0x35 and 0x135), 1 + 3 real servers.
        let ipvs = Snapshot {
            loaded: true,
            services: vec![fwm(80, 2), fwm(0x35, 1), fwm(0x135, 3), fwm(99, 1)],
            nft_tables: vec![],
        };
        let mut text = String::new();
        render_ipvs(&mut text, "eth0", &live("t.toml"), &ipvs);
        assert_eq!(
            samples(&text, "fwmark_ipvs_service_present"),
            BTreeMap::from([
                (
                    "iface=\"eth0\",service=\"dns\",mark=\"0x35/0xff\",family=\"ipv4\"".to_string(),
                    1
                ),
                (
                    "iface=\"eth0\",service=\"we\\\"b\",mark=\"0x50\",family=\"ipv4\"".to_string(),
                    1
                ),
            ])
        );
        assert_eq!(
            samples(&text, "fwmark_ipvs_real_servers"),
            BTreeMap::from([
                (
                    "iface=\"eth0\",mark=\"0x35/0xff\",family=\"ipv4\"".to_string(),
                    4
                ),
                (
                    "iface=\"eth0\",mark=\"0x50\",family=\"ipv4\"".to_string(),
                    2
                ),
            ])
        );
        assert!(text.contains("fwmark_ipvs_loaded{iface=\"eth0\"} 1\n"));

        let mut text = String::new();
        render_ipvs(&mut text, "eth0", &live("t.toml"), &Snapshot::default());
        assert!(text.contains("fwmark_ipvs_loaded{iface=\"eth0\"} 0\n"));
        assert_eq!(
            samples(&text, "fwmark_ipvs_service_present")
                .values()
                .sum::<u64>(),
            0
        );
        assert_eq!(
            samples(&text, "fwmark_ipvs_real_servers")
                .values()
                .sum::<u64>(),
            0
        );
    }

    #[test]
    fn nothing_live_yet_has_no_config_info() {
        let counts = Counts {
            global: GlobalCounters::default(),
            rules: Vec::new(),
            services: Vec::new(),
        };
        let text = render("e\"th0", None, &counts);
        assert!(samples(&text, "fwmark_config_info").is_empty(), "{text}");
        assert!(text.contains("fwmark_config_generation{iface=\"e\\\"th0\"} 0\n"));
    }
}
