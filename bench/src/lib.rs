//! `cargo xtask bench`: fwmark measured side by side with its floor and
//! with iptables and nftables, in one run, on this machine.
//!
//! 1. Classifier cost through BPF_PROG_TEST_RUN: fwmark's program with N
//!    services for IPv4 hits, IPv6 hits and misses, and the empty classifier
//!    (the hook's floor), over 1,000 distinct packets each run many times.
//! 2. End to end through the kernel's receive path (see `e2e`).
//! 3. Apply time of a whole ruleset change.
//! 4. Kernel memory of fwmark's maps.
//! 5. Cost of one metrics scrape (counter reads and exposition).
//!
//! Every figure is measured over repetitions and reported as a median and
//! its spread; targets are judged by the confidence interval of the median
//! (see [`stats`]), and the end-to-end repetitions go on until the
//! comparisons are decided or a time budget is spent.
//!
//! Benchmarks are never timed tests: the test suite runs `--quick` and checks
//! only that the report is well formed.

pub mod stats;

use std::{fmt::Write as _, time::Instant};

use anyhow::{Context as _, Result};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use fwmark::datapath::{Datapath, Floor};
use fwmark_common::Target;
use fwmark_core::{
    config::Config,
    config::{PortRange, Proto},
    ruleset::{RangeEntry, Rule, Ruleset, service_key},
};

// The test lab's modules, named as when this was one of them.
use fwmark_testlab::{
    daemon, netns, nft,
    ops::{config_of, nth_addr},
    packets, recorder,
};

use crate::{
    packets::{Frame, L4},
    stats::{Verdict, cost, figure, interval, median, verdict},
};

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub quick: bool,
    /// Seconds the end-to-end section may go on repeating its rounds to
    /// decide its comparisons (it always runs at least
    /// [`Options::e2e_min_rounds`] rounds).
    pub e2e_budget: f64,
}

impl Options {
    /// The default budget: 300 s for the full run (with the other sections,
    /// a full `cargo xtask bench` takes about 15 minutes on a 2-CPU VM),
    /// 20 s for `--quick`.
    pub fn new(quick: bool) -> Options {
        Options {
            quick,
            e2e_budget: if quick { 20.0 } else { 300.0 },
        }
    }

    /// Rounds of every marker before the stopping rule is consulted: the
    /// fewest for which a 95% interval of the median exists.
    pub fn e2e_min_rounds(&self) -> usize {
        6
    }

    /// Repetitions of the classifier, apply and scrape measurements.
    fn reps(&self) -> usize {
        if self.quick { 6 } else { 11 }
    }

    /// Service counts of the classifier and end-to-end sections.
    pub fn sizes(&self) -> Vec<usize> {
        if self.quick {
            vec![1, 1_000]
        } else {
            vec![1, 1_000, 100_000, 1_000_000]
        }
    }

    fn packets(&self) -> usize {
        if self.quick { 50 } else { 1_000 }
    }

    fn repeat(&self) -> u32 {
        if self.quick { 200 } else { 2_000 }
    }
}

/// A table of the report: a title, a note, column names and rows.
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub title: String,
    pub note: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// GitHub-flavoured Markdown.
    pub fn markdown(&self) -> String {
        let mut s = format!("### {}\n\n{}\n\n", self.title, self.note);
        let _ = writeln!(s, "| {} |", self.columns.join(" | "));
        let _ = writeln!(
            s,
            "|{}|",
            self.columns
                .iter()
                .map(|_| "---")
                .collect::<Vec<_>>()
                .join("|")
        );
        for r in &self.rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        s
    }
}

/// N TCP services on port 80 per family (one exact entry and one rule
/// each), built directly rather than through a TOML file.
pub fn synthetic_ruleset(n: usize) -> Ruleset {
    let mut rs = Ruleset::default();
    for v6 in [false, true] {
        for i in 0..n {
            let addr = nth_addr(v6, i);
            let rule = rs.rules.len() as u32;
            rs.rules.push(Rule {
                service: rule as usize,
                vip: addr.into(),
                proto: Proto::Tcp,
                ports: Some(PortRange { lo: 80, hi: 80 }),
            });
            rs.exact.push((
                service_key(addr, 6, 80),
                Target {
                    mark: 1 + (i as u32 % 4000),
                    mask: u32::MAX,
                    rule,
                    prefix_len: if v6 { 128 } else { 32 },
                },
            ));
        }
    }
    rs
}

/// Average ns per run of `program` over `frames`, each run `repeat` times.
fn ns_per_packet(program: &SchedClassifier, frames: &[Vec<u8>], repeat: u32) -> Result<f64> {
    let mut total = 0u128;
    for f in frames {
        let r = program
            .test_run(TestRunOptions {
                data_in: Some(f),
                repeat,
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        total += r.duration.as_nanos();
    }
    Ok(total as f64 / frames.len() as f64)
}

/// Frames to `count` distinct services spread over `n` (port 80: hits;
/// port 81: misses).
fn frames(n: usize, count: usize, v6: bool, port: u16) -> Vec<Vec<u8>> {
    let count = count.min(n).max(1);
    (0..count)
        .map(|k| {
            let i = k * (n / count).max(1) % n.max(1);
            Frame::new(&nth_addr(v6, i).to_string(), L4::Tcp(port)).build()
        })
        .collect()
}

/// One measured classifier configuration; every figure has one value per
/// repetition (repetitions interleave the sizes and the programs).
#[derive(Clone, Debug)]
pub struct ClassifierPoint {
    pub services: usize,
    pub floor: Vec<f64>,
    pub v4_hit: Vec<f64>,
    pub v6_hit: Vec<f64>,
    /// One IPv4 packet (one service) repeated: the same lookup every run,
    /// its cache lines warm.
    pub v4_one: Vec<f64>,
    /// One IPv6 packet repeated.
    pub v6_one: Vec<f64>,
    /// IPv4 packets inside a port range of their address (TCP 1000-2000,
    /// one per IPv4 service, in the same maps as the exact hits).
    pub v4_range: Vec<f64>,
    pub miss: Vec<f64>,
    /// Bytes of kernel memory of all fwmark maps, per entry (memlock is
    /// exact: one figure).
    pub bytes_per_entry: f64,
    /// Bytes of the IPv4 exact map (elements and bucket array) per IPv4
    /// entry.
    pub v4_bytes_per_entry: f64,
    /// Bytes of the IPv6 exact map per IPv6 entry.
    pub v6_bytes_per_entry: f64,
    /// Bytes of the per-rule per-CPU counters per rule (grows with the
    /// CPU count).
    pub counter_bytes_per_rule: f64,
    /// Seconds to load and publish the generation.
    pub publish_seconds: f64,
}

/// `a[i] - b[i]` per repetition.
pub fn diff(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

impl ClassifierPoint {
    pub fn v4_above_floor(&self) -> Vec<f64> {
        diff(&self.v4_hit, &self.floor)
    }
    pub fn v6_above_floor(&self) -> Vec<f64> {
        diff(&self.v6_hit, &self.floor)
    }
    /// A range hit's cost over an exact hit's, per repetition.
    pub fn range_over_exact(&self) -> Vec<f64> {
        diff(&self.v4_range, &self.v4_hit)
    }
    pub fn v4_one_above_floor(&self) -> Vec<f64> {
        diff(&self.v4_one, &self.floor)
    }
    pub fn v6_one_above_floor(&self) -> Vec<f64> {
        diff(&self.v6_one, &self.floor)
    }
    pub fn miss_above_floor(&self) -> Vec<f64> {
        diff(&self.miss, &self.floor)
    }
}

/// Kernel memory (fdinfo's memlock) of one map.
pub fn map_memory(map: &aya::maps::MapData) -> Result<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = map.fd().as_fd().as_raw_fd();
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .context("no memlock in fdinfo")
}

/// Kernel memory of every BPF map this process holds an fd to.
pub fn process_map_memory() -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.to_string_lossy() != "anon_inode:bpf-map" {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            entry.file_name().to_string_lossy()
        ))?;
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .context("no memlock in fdinfo")?;
    }
    Ok(total)
}

/// Section 1 (and the memory figures): the classifier at each size. Every
/// size's datapath is loaded first (its memory measured as the growth of
/// the process's map memory), then each repetition measures the floor and
/// the three kinds of packets at every size in turn, so that slow phases
/// of a shared machine hit all of them alike.
pub fn classifier(opts: Options) -> Result<Vec<ClassifierPoint>> {
    let floor_program = Floor::load()?;
    let mut loaded = Vec::new();
    for n in opts.sizes() {
        let mut rs = synthetic_ruleset(n);
        // Every IPv4 service also gets TCP 1000-2000 as a range: range hits
        // are measured against exact hits in the same maps. (Exact hits
        // return before the range lookup; misses on port 81 now scan the
        // table, which the first range's low end ends.)
        let ranges: Vec<RangeEntry> = rs
            .exact
            .iter()
            .filter(|(k, _)| k.family == 4)
            .map(|(k, t)| RangeEntry {
                key: fwmark_common::ServiceKey { port: [0, 0], ..*k },
                lo: 1000,
                hi: 2000,
                target: *t,
            })
            .collect();
        rs.ranges = ranges;
        let before = process_map_memory()?;
        let started = Instant::now();
        // Counter room for exactly these rules (`--max-rules`), no headroom.
        let mut dp = Datapath::load(rs.rules.len().max(1) as u32, None, None)?;
        dp.publish_simple(&rs)?;
        let publish_seconds = started.elapsed().as_secs_f64();
        let (bytes_per_entry, v4_bytes_per_entry, v6_bytes_per_entry, counter_bytes_per_rule) = {
            // The map fds this process gained are this datapath's, plus the
            // live inner maps opened here.
            let (exact4, exact6, _prefix) = dp.maps.live_inner_maps()?;
            let (range4, _range6) = dp
                .maps
                .live_range_maps()?
                .context("the memory section's config has port ranges")?;
            let v4 = rs.exact.iter().filter(|(k, _)| k.family == 4).count();
            let v6 = rs.exact.len() - v4;
            // The range map measured here is the range section's, not the
            // exact entries'.
            let all = process_map_memory()? - before - map_memory(&range4)?;
            (
                all as f64 / rs.exact.len() as f64,
                map_memory(&exact4)? as f64 / v4.max(1) as f64,
                map_memory(&exact6)? as f64 / v6.max(1) as f64,
                map_memory(dp.maps.rule_stats_map())? as f64 / rs.rules.len().max(1) as f64,
            )
        };
        let frames = [
            frames(n, opts.packets(), false, 80),
            frames(n, opts.packets(), true, 80),
            frames(n, opts.packets(), false, 81),
            frames(n, 1, false, 80),
            frames(n, 1, true, 80),
            frames(n, opts.packets(), false, 1500),
        ];
        loaded.push((
            dp,
            frames,
            ClassifierPoint {
                services: n,
                floor: Vec::new(),
                v4_hit: Vec::new(),
                v6_hit: Vec::new(),
                v4_one: Vec::new(),
                v6_one: Vec::new(),
                v4_range: Vec::new(),
                miss: Vec::new(),
                bytes_per_entry,
                v4_bytes_per_entry,
                v6_bytes_per_entry,
                counter_bytes_per_rule,
                publish_seconds,
            },
        ));
    }
    let repeat = opts.repeat();
    for _ in 0..opts.reps() {
        for (dp, [hits4, hits6, misses, one4, one6, range4], point) in &mut loaded {
            let program = dp.program()?;
            point
                .floor
                .push(ns_per_packet(floor_program.program()?, hits4, repeat)?);
            point.v4_hit.push(ns_per_packet(program, hits4, repeat)?);
            point.v4_range.push(ns_per_packet(program, range4, repeat)?);
            point.v6_hit.push(ns_per_packet(program, hits6, repeat)?);
            point.miss.push(ns_per_packet(program, misses, repeat)?);
            // One packet, as many runs as the distinct packets get in all.
            let runs = repeat * hits4.len() as u32;
            point.v4_one.push(ns_per_packet(program, one4, runs)?);
            point.v6_one.push(ns_per_packet(program, one6, runs)?);
        }
    }
    Ok(loaded.into_iter().map(|(_, _, p)| p).collect())
}

/// The classifier table.
pub fn classifier_table(points: &[ClassifierPoint]) -> Table {
    Table {
        title: "1. Classifier cost (BPF_PROG_TEST_RUN)".into(),
        note: "ns per packet, averaged over up to 1,000 distinct packets (each a different \
               service) run many times; \"above floor\" subtracts the empty classifier measured \
               in the same repetition. N services per address family, TCP port 80. Each cell: \
               median [25th to 75th percentile] over the repetitions (n); the last column is \
               the 95% interval of the median IPv4 hit above the floor."
            .into(),
        columns: [
            "services",
            "n",
            "floor (empty program)",
            "IPv4 hit",
            "IPv4 hit above floor",
            "IPv6 hit",
            "IPv6 hit above floor",
            "one IPv4 packet above floor",
            "one IPv6 packet above floor",
            "IPv4 range hit above exact hit",
            "miss",
            "miss above floor",
            "IPv4 above floor, 95% CI",
        ]
        .map(String::from)
        .to_vec(),
        rows: points
            .iter()
            .map(|p| {
                vec![
                    p.services.to_string(),
                    p.floor.len().to_string(),
                    figure(&p.floor, 1),
                    figure(&p.v4_hit, 1),
                    cost(&p.v4_above_floor(), 1),
                    figure(&p.v6_hit, 1),
                    cost(&p.v6_above_floor(), 1),
                    cost(&p.v4_one_above_floor(), 1),
                    cost(&p.v6_one_above_floor(), 1),
                    figure(&p.range_over_exact(), 1),
                    figure(&p.miss, 1),
                    cost(&p.miss_above_floor(), 1),
                    interval(&p.v4_above_floor(), 1),
                ]
            })
            .collect(),
    }
}

/// The port-range figures: entries of FTP's passive range, and 2,000 VIPs
/// each with TCP 1024-65535 compiled, loaded and published.
#[derive(Clone, Debug)]
pub struct RangePoint {
    /// Map entries of one VIP with TCP 21 and 10000-20000.
    pub ftp_entries: usize,
    /// Map entries of 2,000 VIPs x TCP 1024-65535.
    pub vips_entries: usize,
    /// Seconds to parse, compile, load and publish them (one run).
    pub vips_seconds: f64,
    /// Kernel memory of every map of that datapath (memlock).
    pub vips_bytes: u64,
}

/// Section 6: port ranges.
pub fn ranges() -> Result<RangePoint> {
    let ftp = Config::parse(
        "[[service]]\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [21, \"10000-20000\"]\nmark = 21\n",
        "ftp.toml",
    )?;
    let ftp_entries = Ruleset::compile(&ftp)?.entries();
    let vips: Vec<String> = (0..2000)
        .map(|i| format!("\"{}\"", nth_addr(false, i)))
        .collect();
    let text = format!(
        "[[service]]\nvip = [{}]\nproto = \"tcp\"\nports = [\"1024-65535\"]\nmark = 1\n",
        vips.join(", ")
    );
    let before = process_map_memory()?;
    let started = Instant::now();
    let config = Config::parse(&text, "vips.toml")?;
    let rs = Ruleset::compile(&config)?;
    let mut dp = Datapath::load(rs.rules.len().max(1) as u32, None, None)?;
    dp.publish_simple(&rs)?;
    let vips_seconds = started.elapsed().as_secs_f64();
    let _inner = (dp.maps.live_inner_maps()?, dp.maps.live_range_maps()?);
    let vips_bytes = process_map_memory()? - before;
    Ok(RangePoint {
        ftp_entries,
        vips_entries: rs.entries(),
        vips_seconds,
        vips_bytes,
    })
}

/// The port-range targets.
pub fn range_checks(p: &RangePoint) -> Vec<Check> {
    vec![
        Check::exact(
            "Port ranges: FTP's 10000-20000 (with port 21) at most 64 map entries",
            p.ftp_entries <= 64,
            format!("{} entries", p.ftp_entries),
        ),
        Check::exact(
            "Port ranges: 2,000 VIPs x TCP 1024-65535 compile, load and publish in at most 1 s",
            p.vips_seconds <= 1.0,
            format!("{:.3} s (one run)", p.vips_seconds),
        ),
        Check::exact(
            "Port ranges: 2,000 VIPs x TCP 1024-65535 use at most 64 MiB of kernel memory",
            p.vips_bytes <= 64 << 20,
            format!("{:.2} MiB", p.vips_bytes as f64 / (1024.0 * 1024.0)),
        ),
    ]
}

/// The port-range table.
pub fn ranges_table(p: &RangePoint) -> Table {
    Table {
        title: "6. Port ranges".into(),
        note: "A port range of an exact address is one entry of a per-address range table \
               (see section 1 for a range hit's cost). Entries: what `Ruleset::compile` makes; \
               time: parse, compile, load and publish, one run; memory: memlock of every map \
               of that datapath, counters sized to the rules."
            .into(),
        columns: ["measure", "figure"].map(String::from).to_vec(),
        rows: vec![
            vec![
                "FTP (TCP 21 and 10000-20000), map entries".into(),
                p.ftp_entries.to_string(),
            ],
            vec![
                "2,000 VIPs x TCP 1024-65535, map entries".into(),
                p.vips_entries.to_string(),
            ],
            vec![
                "2,000 VIPs x TCP 1024-65535, compile + load + publish (s)".into(),
                format!("{:.3}", p.vips_seconds),
            ],
            vec![
                "2,000 VIPs x TCP 1024-65535, kernel memory (MiB)".into(),
                format!("{:.2}", p.vips_bytes as f64 / (1024.0 * 1024.0)),
            ],
        ],
    }
}

/// One end-to-end variant.
#[derive(Clone, Debug, PartialEq)]
pub enum Marker {
    None,
    /// The empty classifier attached like fwmark: the TC hook's own cost.
    EmptyTc,
    Iptables(usize),
    NftMap(usize),
    Fwmark(usize),
}

impl Marker {
    pub fn label(&self) -> String {
        match self {
            Marker::None => "no marker".into(),
            Marker::EmptyTc => "empty TC program (the hook's floor)".into(),
            Marker::Iptables(n) => format!("iptables, {n} rules"),
            Marker::NftMap(n) => format!("nftables map, {n} elements"),
            Marker::Fwmark(n) => format!("fwmark, {n} services"),
        }
    }

    fn family(&self) -> &'static str {
        match self {
            Marker::None => "none",
            Marker::EmptyTc => "empty TC program",
            Marker::Iptables(_) => "iptables",
            Marker::NftMap(_) => "nftables map",
            Marker::Fwmark(_) => "fwmark",
        }
    }

    fn size(&self) -> usize {
        match self {
            Marker::None | Marker::EmptyTc => 0,
            Marker::Iptables(n) | Marker::NftMap(n) | Marker::Fwmark(n) => *n,
        }
    }
}

/// The markers to compare.
pub fn markers(opts: Options) -> Vec<Marker> {
    let ipt: &[usize] = if opts.quick {
        &[1, 100]
    } else {
        &[1, 100, 1_000, 10_000]
    };
    let mut m = vec![Marker::None, Marker::EmptyTc];
    m.extend(ipt.iter().map(|&n| Marker::Iptables(n)));
    m.extend(opts.sizes().into_iter().map(Marker::NftMap));
    m.extend(opts.sizes().into_iter().map(Marker::Fwmark));
    m
}

/// Rules for iptables-restore: N TCP port-80 MARK rules, one per address.
pub fn iptables_rules(n: usize) -> String {
    let mut s = String::from("*mangle\n");
    for i in 0..n {
        let _ = writeln!(
            s,
            "-A PREROUTING -d {}/32 -p tcp -m tcp --dport 80 -j MARK --set-xmark {:#x}/0xffffffff",
            nth_addr(false, i),
            1 + i % 4000
        );
    }
    s.push_str("COMMIT\n");
    s
}

/// An nft table in the style of keepalived's nftables_ipvs: one map
/// `ip daddr . tcp dport : mark` and one rule.
pub fn nft_map(n: usize) -> String {
    let mut s = String::from(
        "table ip fwmarkbench {\n map m { type ipv4_addr . inet_service : mark; size 4194304;\n  elements = { ",
    );
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{} . 80 : {:#x}", nth_addr(false, i), 1 + i % 4000);
    }
    s.push_str(" }\n }\n chain pre { type filter hook prerouting priority mangle; policy accept;\n  meta mark set ip daddr . tcp dport map @m\n }\n}\n");
    s
}

/// The destinations a marker's traffic goes to: iptables' worst case, the
/// last rule; otherwise 64 services spread over the N.
fn targets(marker: &Marker) -> Vec<usize> {
    let n = marker.size().max(1);
    match marker {
        Marker::Iptables(_) => vec![n - 1],
        _ => (0..64.min(n)).map(|k| k * (n / 64.min(n))).collect(),
    }
}

/// Packets the director's IP layer received (`Ip: InReceives`).
fn in_receives(ns: &crate::netns::Netns) -> Result<u64> {
    let snmp = crate::netns::run_cmd(ns.command("cat").arg("/proc/net/snmp"))?;
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (
        ip.next().context("Ip header")?,
        ip.next().context("Ip values")?,
    );
    let i = names
        .split_whitespace()
        .position(|n| n == "InReceives")
        .context("no InReceives")?;
    Ok(values
        .split_whitespace()
        .nth(i)
        .context("short Ip line")?
        .parse()?)
}

/// Sends `frames` round robin out of `dev` for `secs` seconds from a
/// thread pinned to CPU 0; the receive side runs in the same CPU's softirq.
fn blast(dev: &str, frames: &[Vec<u8>], secs: f64) -> std::io::Result<u64> {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET adds CPU 0; the calls
    // only read the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    let socket = crate::recorder::RawSocket::open(dev)?;
    let deadline = Instant::now() + std::time::Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    while Instant::now() < deadline {
        socket.send(frames)?;
        sent += frames.len() as u64;
    }
    Ok(sent)
}

/// One marker's measured rates: packets per second the director's IP layer
/// received with the marker, and without it for the same frames just before
/// (a paired baseline), one pair per round; for the markers that are BPF
/// programs, also the program's own cost per run in that path.
#[derive(Clone, Debug)]
pub struct E2ePoint {
    pub marker: Marker,
    pub pps: Vec<f64>,
    pub base_pps: Vec<f64>,
    /// ns per run of the attached program over real traffic (bpf_stats:
    /// growth of run_time_ns / growth of run_cnt), one per round; empty
    /// for markers that are not BPF programs.
    pub prog_ns: Vec<f64>,
}

impl E2ePoint {
    /// Added ns per packet per round: 1e9/rate - 1e9/baseline rate.
    pub fn added_ns(&self) -> Vec<f64> {
        self.pps
            .iter()
            .zip(&self.base_pps)
            .map(|(v, b)| 1e9 / v - 1e9 / b)
            .collect()
    }
}

/// One target: what it asks, the figures it is judged on, and either the
/// per-repetition excess over its limit (judged by [`verdict`]) or, for a
/// figure without noise (memlock), whether it is within.
#[derive(Clone, Debug)]
pub struct Check {
    pub what: String,
    pub figure: String,
    pub excess: Vec<f64>,
    pub exact: Option<bool>,
}

impl Check {
    /// A target judged over repetitions: `excess[i] = value_i - limit_i`.
    pub fn sampled(what: impl Into<String>, figure: String, excess: Vec<f64>) -> Check {
        Check {
            what: what.into(),
            figure,
            excess,
            exact: None,
        }
    }

    /// A target on an exact figure.
    pub fn exact(what: impl Into<String>, ok: bool, figure: String) -> Check {
        Check {
            what: what.into(),
            figure,
            excess: Vec::new(),
            exact: Some(ok),
        }
    }

    pub fn verdict(&self) -> Verdict {
        match self.exact {
            Some(true) => Verdict::Met,
            Some(false) => Verdict::Missed,
            None => verdict(&self.excess),
        }
    }

    /// One line of the Targets list.
    pub fn line(&self) -> String {
        match self.exact {
            Some(_) => format!("{}: {} ({})", self.what, self.verdict().word(), self.figure),
            None => format!(
                "{}: {} ({}; 95% CI of the median excess over the limit: {})",
                self.what,
                self.verdict().word(),
                self.figure,
                interval(&self.excess, 1)
            ),
        }
    }
}

/// `a[i] - (ratio * b[i] + offset)` per repetition.
fn excess(a: &[f64], ratio: f64, b: &[f64], offset: f64) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(x, y)| x - (ratio * y + offset))
        .collect()
}

/// The end-to-end targets, from the rounds measured so far (also the
/// stopping rule of [`end_to_end`]). All costs are added ns per packet.
pub fn e2e_checks(points: &[E2ePoint]) -> Vec<Check> {
    let added = |m: &Marker| {
        points
            .iter()
            .find(|p| &p.marker == m)
            .map(E2ePoint::added_ns)
    };
    let mut out = Vec::new();
    if let (Some(fw), Some(ipt)) = (
        added(&Marker::Fwmark(1_000)),
        added(&Marker::Iptables(1_000)),
    ) {
        out.push(Check::sampled(
            "End to end, fwmark's added cost at most 1/50 of iptables with 1,000 rules",
            format!(
                "added ns per packet: fwmark {}, iptables {}",
                cost(&fw, 1),
                cost(&ipt, 1)
            ),
            excess(&fw, 1.0 / 50.0, &ipt, 0.0),
        ));
    }
    let sizes: Vec<usize> = points
        .iter()
        .filter_map(|p| match p.marker {
            Marker::Fwmark(n) => Some(n),
            _ => None,
        })
        .collect();
    for &n in &sizes {
        if let (Some(fw), Some(nft)) = (added(&Marker::Fwmark(n)), added(&Marker::NftMap(n))) {
            out.push(Check::sampled(
                format!("End to end at {n} services, fwmark at most 1/2 of the nftables map"),
                format!(
                    "added ns per packet: fwmark {}, nftables {}",
                    cost(&fw, 1),
                    cost(&nft, 1)
                ),
                excess(&fw, 0.5, &nft, 0.0),
            ));
        }
    }
    if let (Some(&first), Some(&last)) = (sizes.first(), sizes.last())
        && first != last
        && let (Some(lo), Some(hi)) = (added(&Marker::Fwmark(first)), added(&Marker::Fwmark(last)))
    {
        out.push(Check::sampled(
            format!(
                "End to end, fwmark flat from {first} to {last} services: at most 1.25x + 10 ns"
            ),
            format!(
                "added ns per packet: {} at {first}, {} at {last}",
                cost(&lo, 1),
                cost(&hi, 1)
            ),
            excess(&hi, 1.25, &lo, 10.0),
        ));
    }
    out
}

/// What a marker leaves behind while it is measured.
enum Installed {
    Nothing,
    Iptables,
    Nft,
    Fwmark(Box<Datapath>),
    Floor(Box<Floor>),
}

/// Attaches `program` first at the director's ingress (tcx); it stays
/// attached while its owner lives.
fn attach_first(lab: &crate::netns::Lab, program: &mut SchedClassifier) -> Result<()> {
    use aya::programs::{LinkOrder, TcAttachType, tc::TcAttachOptions};
    let iface = lab.director_if.clone();
    lab.director.run(|| {
        program.attach_with_options(
            &iface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
    })??;
    Ok(())
}

fn install(lab: &crate::netns::Lab, marker: &Marker) -> Result<Installed> {
    Ok(match marker {
        Marker::None => Installed::Nothing,
        Marker::Iptables(n) => {
            crate::netns::pipe_into(
                lab.director.command("iptables-restore").arg("--noflush"),
                &iptables_rules(*n),
            )?;
            Installed::Iptables
        }
        Marker::NftMap(n) => {
            crate::nft::nft_script(&lab.director, &nft_map(*n))?;
            Installed::Nft
        }
        Marker::Fwmark(_) => {
            let rs = synthetic_ruleset(marker.size().max(1));
            let mut dp = Box::new(Datapath::load(rs.rules.len().max(1) as u32, None, None)?);
            dp.publish_simple(&rs)?;
            attach_first(lab, dp.program_mut()?)?;
            Installed::Fwmark(dp)
        }
        Marker::EmptyTc => {
            let mut floor = Box::new(Floor::load()?);
            attach_first(lab, floor.program_mut()?)?;
            Installed::Floor(floor)
        }
    })
}

fn uninstall(lab: &crate::netns::Lab, installed: Installed) -> Result<()> {
    match installed {
        Installed::Nothing => {}
        // Dropping the datapath drops the tcx link: detached.
        Installed::Fwmark(datapath) => drop(datapath),
        Installed::Floor(floor) => drop(floor),
        Installed::Iptables => {
            crate::netns::run_cmd(
                lab.director
                    .command("iptables")
                    .args(["-t", "mangle", "-F"]),
            )?;
        }
        Installed::Nft => {
            crate::netns::run_cmd(lab.director.command("nft").args([
                "delete",
                "table",
                "ip",
                "fwmarkbench",
            ]))?;
        }
    }
    Ok(())
}

impl Installed {
    /// The attached BPF program, for the markers that are one.
    fn program(&self) -> Result<Option<&SchedClassifier>> {
        Ok(match self {
            Installed::Fwmark(dp) => Some(dp.program()?),
            Installed::Floor(floor) => Some(floor.program()?),
            Installed::Nothing | Installed::Iptables | Installed::Nft => None,
        })
    }
}

/// The program's own ns per run over the traffic `traffic` sends: the
/// growth of its run_time_ns over the growth of its run_cnt while the
/// kernel's run-time statistics are on. They are on while the fd of
/// BPF_ENABLE_STATS is open (aya's `enable_stats`), that is for this
/// window only: the kernel turns them off when the fd closes, whatever
/// happens here (an error, a panic, a kill), and `kernel.bpf_stats_enabled`
/// is never written.
fn own_cost(program: &SchedClassifier, traffic: impl FnOnce() -> Result<f64>) -> Result<f64> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context(
        "BPF_ENABLE_STATS (BPF_STATS_RUN_TIME) for the program's own cost; needs Linux 5.8",
    )?;
    let before = program.info().context("BPF_OBJ_GET_INFO_BY_FD")?;
    traffic()?;
    let after = program.info().context("BPF_OBJ_GET_INFO_BY_FD")?;
    let runs = after.run_count().saturating_sub(before.run_count());
    anyhow::ensure!(
        runs > 0,
        "the attached program did not run during the bpf_stats window: no traffic reached the director's ingress"
    );
    Ok(after
        .run_time()
        .saturating_sub(before.run_time())
        .as_nanos() as f64
        / runs as f64)
}

/// Section 2 as measured: the points and how the rounds ended.
#[derive(Clone, Debug)]
pub struct E2e {
    pub points: Vec<E2ePoint>,
    pub rounds: usize,
    pub seconds: f64,
    /// True when every comparison was decided before the budget ran out.
    pub decided: bool,
    pub budget: f64,
}

/// Section 2: packets per second through the receive path per marker,
/// each measured right after a baseline with the same frames. One round
/// measures every marker once (interleaved); rounds go on until every
/// end-to-end target is decided (the 95% interval of its median excess
/// excludes the limit) or until the next round would overrun
/// `opts.e2e_budget`, and at least `opts.e2e_min_rounds()` times.
pub fn end_to_end(opts: Options) -> Result<E2e> {
    let lab = crate::netns::Lab::new(&[])?;
    let mac = crate::recorder::mac_of(&lab.director, &lab.director_if)?;
    let (secs, stats_secs) = if opts.quick { (0.1, 0.05) } else { (0.5, 0.25) };
    let markers: Vec<Marker> = markers(opts)
        .into_iter()
        .filter(|m| *m != Marker::None)
        .collect();
    let mut points: Vec<E2ePoint> = markers
        .iter()
        .map(|m| E2ePoint {
            marker: m.clone(),
            pps: Vec::new(),
            base_pps: Vec::new(),
            prog_ns: Vec::new(),
        })
        .collect();
    let rate = |frames: &[Vec<u8>], secs: f64| -> Result<f64> {
        let before = in_receives(&lab.director)?;
        let started = Instant::now();
        let client_if = lab.client_if.clone();
        lab.client.run(|| blast(&client_if, frames, secs))??;
        let elapsed = started.elapsed().as_secs_f64();
        Ok((in_receives(&lab.director)? - before) as f64 / elapsed)
    };
    // Settle: a first measurement nobody uses (caches, frequency).
    let warm = vec![crate::recorder::frame_for(
        &(nth_addr(false, 0), 6, 80),
        mac,
    )];
    rate(&warm, secs)?;
    let started = Instant::now();
    let mut rounds = 0;
    let decided = loop {
        let round_started = Instant::now();
        for point in &mut points {
            let frames: Vec<Vec<u8>> = targets(&point.marker)
                .into_iter()
                .map(|t| crate::recorder::frame_for(&(nth_addr(false, t), 6, 80), mac))
                .collect();
            point.base_pps.push(rate(&frames, secs)?);
            let installed = install(&lab, &point.marker)?;
            let measured = rate(&frames, secs).and_then(|pps| {
                // The program's own cost in a window of its own, so that the
                // statistics' clock reads never weigh on the rates above.
                if let Some(program) = installed.program()? {
                    point
                        .prog_ns
                        .push(own_cost(program, || rate(&frames, stats_secs))?);
                }
                Ok(pps)
            });
            uninstall(&lab, installed)?;
            point.pps.push(measured?);
            // Freeing a large map or table runs in kernel workers after the
            // uninstall; let it finish before the next baseline.
            let settle = match (opts.quick, point.marker.size() >= 100_000) {
                (true, _) => 20,
                (false, true) => 500,
                (false, false) => 50,
            };
            std::thread::sleep(std::time::Duration::from_millis(settle));
        }
        rounds += 1;
        if rounds < opts.e2e_min_rounds() {
            continue;
        }
        let checks = e2e_checks(&points);
        if stats::all_decided(checks.iter().map(|c| &c.excess[..])) {
            break true;
        }
        let next_end = started.elapsed() + round_started.elapsed();
        if next_end.as_secs_f64() > opts.e2e_budget {
            break false;
        }
    };
    Ok(E2e {
        points,
        rounds,
        seconds: started.elapsed().as_secs_f64(),
        decided,
        budget: opts.e2e_budget,
    })
}

/// The end-to-end table.
pub fn end_to_end_table(e2e: &E2e) -> Table {
    let points = &e2e.points;
    let all_base: Vec<f64> = points.iter().flat_map(|p| p.base_pps.clone()).collect();
    let mut rows = Vec::new();
    if !all_base.is_empty() {
        rows.push(vec![
            "no marker (all baselines)".into(),
            all_base.len().to_string(),
            figure(&all_base, 0),
            "0".into(),
            "-".into(),
        ]);
    }
    for p in points {
        let added = p.added_ns();
        rows.push(vec![
            p.marker.label(),
            p.pps.len().to_string(),
            figure(&p.pps, 0),
            cost(&added, 1),
            interval(&added, 1),
        ]);
    }
    Table {
        title: "2. End to end through the receive path".into(),
        note: format!(
            "A client namespace sends TCP SYNs with AF_PACKET (sendmmsg) from a thread \
             pinned to CPU 0 over veth to a director namespace, whose softirq on the same \
             CPU runs TC ingress, netfilter prerouting and routing; the director does not \
             forward, so every packet is dropped after routing, identically for every \
             variant. Rate = packets the director's IP layer received per second. Each \
             measurement of a marker follows a baseline with the same frames and no marker; \
             added ns = 1e9/rate - 1e9/baseline per pair. iptables traffic matches its LAST \
             rule (worst case); nftables and fwmark traffic is spread over 64 services. One \
             round measures every marker once, interleaved; this run made {} rounds in {:.0} s \
             ({}, budget {:.0} s). Each cell: median [25th to 75th percentile] over the \
             rounds (n); the last column is the 95% interval of the median added cost; a \
             median at or below 0 is written \"{}\".",
            e2e.rounds,
            e2e.seconds,
            if e2e.decided {
                "every target decided"
            } else {
                "stopped by the time budget with targets undecided"
            },
            e2e.budget,
            stats::BELOW_NOISE,
        ),
        columns: [
            "marker",
            "n",
            "packets/s",
            "added ns per packet",
            "added ns, 95% CI of the median",
        ]
        .map(String::from)
        .to_vec(),
        rows,
    }
}

/// The program's own cost in the receive path (bpf_stats) beside
/// BPF_PROG_TEST_RUN's figure for the same program and size.
pub fn own_cost_table(e2e: &E2e, classifier: &[ClassifierPoint]) -> Table {
    let empty = e2e.points.iter().find(|p| p.marker == Marker::EmptyTc);
    let all_floors: Vec<f64> = classifier.iter().flat_map(|c| c.floor.clone()).collect();
    let mut rows = Vec::new();
    if let Some(e) = empty {
        rows.push(vec![
            "empty program (the floor)".into(),
            "-".into(),
            e.prog_ns.len().to_string(),
            figure(&e.prog_ns, 1),
            figure(&all_floors, 1),
            "-".into(),
            "-".into(),
        ]);
    }
    for p in &e2e.points {
        let Marker::Fwmark(n) = p.marker else {
            continue;
        };
        let c = classifier.iter().find(|c| c.services == n);
        rows.push(vec![
            "fwmark".into(),
            n.to_string(),
            p.prog_ns.len().to_string(),
            figure(&p.prog_ns, 1),
            c.map_or("-".into(), |c| figure(&c.v4_hit, 1)),
            empty.map_or("-".into(), |e| cost(&diff(&p.prog_ns, &e.prog_ns), 1)),
            c.map_or("-".into(), |c| cost(&c.v4_above_floor(), 1)),
        ]);
    }
    Table {
        title: "2b. The program's own cost: receive path (bpf_stats) and BPF_PROG_TEST_RUN".into(),
        note: "ns per run of the attached program in section 2's traffic (IPv4 hits on 64 \
               services, or the one service): the growth of the program's run_time_ns over \
               the growth of its run_cnt (bpf_prog_info) while the kernel's run-time \
               statistics are on (BPF_ENABLE_STATS, for a window of its own after each \
               measured rate), one figure per round; beside it section 1's \
               BPF_PROG_TEST_RUN figure for an IPv4 hit at the same size (for the empty \
               program: all its section-1 repetitions). The kernel's figure includes its \
               own clock reads around the program, which the empty program shows. \
               \"Above\" subtracts the empty program's figure of the same round / \
               repetition. Each cell: median [25th to 75th percentile]."
            .into(),
        columns: [
            "program",
            "services",
            "n",
            "receive path, ns per run",
            "BPF_PROG_TEST_RUN, ns per run",
            "receive path, above the empty program",
            "BPF_PROG_TEST_RUN, above the empty program",
        ]
        .map(String::from)
        .to_vec(),
        rows,
    }
}

/// Added ns per packet per marker family, for the plot: family -> (N, ns).
pub fn added_ns_series(
    points: &[E2ePoint],
) -> std::collections::BTreeMap<&'static str, Vec<(usize, f64)>> {
    let mut out: std::collections::BTreeMap<&'static str, Vec<(usize, f64)>> = Default::default();
    for p in points.iter().filter(|p| p.marker != Marker::EmptyTc) {
        out.entry(p.marker.family())
            .or_default()
            .push((p.marker.size(), median(&p.added_ns())));
    }
    out
}

/// One size of section 3: seconds per repetition of each tool.
#[derive(Clone, Debug)]
pub struct ApplyPoint {
    pub entries: usize,
    pub iptables: Vec<f64>,
    pub nft: Vec<f64>,
    pub fwmark: Vec<f64>,
}

/// Repetitions of section 3: the fewest with a 95% interval of the median
/// (iptables-restore of 1M rules takes about 20 s each).
const APPLY_REPS: usize = 6;

/// Section 3: time of a whole ruleset change of N entries; repetitions
/// interleave the sizes and the tools.
pub fn apply_times(opts: Options, fwmark_bin: &std::path::Path) -> Result<Vec<ApplyPoint>> {
    let sizes: &[usize] = if opts.quick {
        &[1_000]
    } else {
        &[1_000, 100_000, 1_000_000]
    };
    let lab = crate::netns::Lab::new(&[])?;
    let dir = std::env::temp_dir().join(format!("fwmark-bench-{}", lab.director.name));
    std::fs::create_dir_all(&dir)?;
    let small = dir.join("small.toml");
    std::fs::write(&small, config_of(1, 1))?;
    let daemon = crate::daemon::Daemon::start_bin(
        fwmark_bin,
        &lab.director,
        &[
            "run",
            "--iface",
            &lab.director_if,
            "--config",
            small.to_str().unwrap_or_default(),
            "--no-watch",
            "--max-rules",
            "2000000",
        ],
    )?;
    let mut points: Vec<ApplyPoint> = sizes
        .iter()
        .map(|&n| {
            std::fs::write(dir.join(format!("apply-{n}.toml")), config_of(n, 100))?;
            Ok(ApplyPoint {
                entries: n,
                iptables: Vec::new(),
                nft: Vec::new(),
                fwmark: Vec::new(),
            })
        })
        .collect::<Result<_>>()?;
    for _ in 0..APPLY_REPS {
        for point in &mut points {
            let n = point.entries;
            let ipt = crate::netns::pipe_into(
                lab.director.command("iptables-restore").arg("--noflush"),
                &iptables_rules(n),
            )?;
            crate::netns::run_cmd(
                lab.director
                    .command("iptables")
                    .args(["-t", "mangle", "-F"]),
            )?;
            let nft = crate::netns::pipe_into(
                lab.director.command("nft").args(["-f", "-"]),
                &nft_map(n),
            )?;
            crate::netns::run_cmd(lab.director.command("nft").args([
                "delete",
                "table",
                "ip",
                "fwmarkbench",
            ]))?;
            let path = dir.join(format!("apply-{n}.toml"));
            let started = Instant::now();
            crate::netns::run_cmd(lab.director.command(fwmark_bin).args([
                "apply",
                "--iface",
                &lab.director_if,
                "--config",
                path.to_str().unwrap_or_default(),
            ]))?;
            let fw = started.elapsed();
            // Back to the small config, so the next one starts alike.
            crate::netns::run_cmd(lab.director.command(fwmark_bin).args([
                "apply",
                "--iface",
                &lab.director_if,
                "--config",
                small.to_str().unwrap_or_default(),
            ]))?;
            point.iptables.push(ipt.as_secs_f64());
            point.nft.push(nft.as_secs_f64());
            point.fwmark.push(fw.as_secs_f64());
        }
    }
    daemon.stop()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(points)
}

/// The apply table.
pub fn apply_table(points: &[ApplyPoint]) -> Table {
    Table {
        title: "3. Apply time of a whole ruleset change".into(),
        note: "Wall time, in seconds, of `iptables-restore --noflush` of N MARK rules, `nft -f` \
               of a map with N elements, and `fwmark apply` of a config with N entries (parse, \
               validate, diff, build the new generation, switch atomically, release the old one), \
               each into an empty mangle table / map / small live config. Each cell: median \
               [25th to 75th percentile] over the repetitions (n); the ratio is taken per \
               repetition."
            .into(),
        columns: [
            "entries",
            "n",
            "iptables-restore (s)",
            "nft -f (s)",
            "fwmark apply (s)",
            "iptables / fwmark",
        ]
        .map(String::from)
        .to_vec(),
        rows: points
            .iter()
            .map(|p| {
                let ratio: Vec<f64> = p
                    .iptables
                    .iter()
                    .zip(&p.fwmark)
                    .map(|(i, f)| i / f)
                    .collect();
                vec![
                    p.entries.to_string(),
                    p.fwmark.len().to_string(),
                    figure(&p.iptables, 3),
                    figure(&p.nft, 3),
                    figure(&p.fwmark, 3),
                    format!("{}x", figure(&ratio, 1)),
                ]
            })
            .collect(),
    }
}

/// The memory table.
pub fn memory_table(points: &[ClassifierPoint]) -> Table {
    Table {
        title: "4. Kernel memory of fwmark's maps".into(),
        note: "memlock of every map (exact hash, prefix trie, per-rule counters sized to the \
               rules, generation and global maps) divided by the exact entries; `fwmark run` \
               sizes the counters to twice the rules by default (see --max-rules), which adds \
               16 bytes x CPUs per extra slot. memlock is exact (one figure); the load time is \
               one load."
            .into(),
        columns: [
            "entries",
            "bytes per entry",
            "IPv4 exact map per IPv4 entry",
            "IPv6 exact map per IPv6 entry",
            "per-CPU counters per rule",
            "load + publish (s)",
        ]
        .map(String::from)
        .to_vec(),
        rows: points
            .iter()
            .map(|p| {
                vec![
                    (p.services * 2).to_string(),
                    format!("{:.0}", p.bytes_per_entry),
                    format!("{:.0}", p.v4_bytes_per_entry),
                    format!("{:.0}", p.v6_bytes_per_entry),
                    format!("{:.0}", p.counter_bytes_per_rule),
                    format!("{:.3}", p.publish_seconds),
                ]
            })
            .collect(),
    }
}

/// One size of section 5: milliseconds per scrape.
#[derive(Clone, Debug)]
pub struct ScrapePoint {
    pub entries: usize,
    pub series: usize,
    pub bytes: usize,
    pub ms: Vec<f64>,
}

/// Section 5: the cost of one scrape of `fwmark run --metrics` at N
/// entries: reading every rule's counters from the maps and rendering the
/// exposition from the compiled live config the daemon keeps (no parsing),
/// as the daemon does per scrape, in this process.
pub fn scrape_times(opts: Options) -> Result<Vec<ScrapePoint>> {
    let sizes: &[usize] = if opts.quick {
        &[1_000, 100_000]
    } else {
        &[1_000, 100_000, 1_000_000]
    };
    let mut out = Vec::new();
    for &n in sizes {
        let loaded = fwmark_core::Loaded::from_text("bench.toml", config_of(n, 100))?;
        let rules = loaded.ruleset.rules.len();
        let mut dp = Datapath::load(fwmark::datapath::rule_capacity(rules), None, None)?;
        let slots: Vec<u32> = (0..rules as u32).collect();
        dp.maps.publish(&loaded.ruleset, &slots, &[])?;
        let live = fwmark::status::LiveConfig::new(
            1,
            &loaded.path,
            &loaded.sha256,
            slots,
            &loaded.config,
            &loaded.ruleset,
        );
        drop(loaded);
        let mut ms = Vec::new();
        let mut bytes = 0;
        for _ in 0..if opts.quick { 6 } else { 21 } {
            let started = Instant::now();
            let body = fwmark::metrics::exposition("bench0", Some(&live), &dp.maps)?;
            ms.push(started.elapsed().as_secs_f64() * 1e3);
            bytes = body.len();
        }
        out.push(ScrapePoint {
            entries: n,
            series: rules + 2 * live.services.len() + 8,
            bytes,
            ms,
        });
    }
    Ok(out)
}

/// The scrape table.
pub fn scrape_table(points: &[ScrapePoint]) -> Table {
    Table {
        title: "5. Metrics scrape".into(),
        note: "Wall time, in milliseconds, of one scrape of `fwmark run --metrics` with a config \
               of N TCP port-80 entries (one rule each, services of 1,000 VIPs): every rule's \
               counters read from the maps (batched) and the exposition rendered from the \
               compiled live config the daemon keeps; median [25th to 75th percentile] and \
               fastest of the n scrapes."
            .into(),
        columns: [
            "entries",
            "series",
            "exposition (MB)",
            "n",
            "scrape (ms)",
            "scrape fastest (ms)",
        ]
        .map(String::from)
        .to_vec(),
        rows: points
            .iter()
            .map(|p| {
                vec![
                    p.entries.to_string(),
                    p.series.to_string(),
                    format!("{:.1}", p.bytes as f64 / 1e6),
                    p.ms.len().to_string(),
                    figure(&p.ms, 2),
                    format!("{:.2}", p.ms.iter().copied().fold(f64::INFINITY, f64::min)),
                ]
            })
            .collect(),
    }
}

/// Why targets are missed where they are (found with `bpftool prog dump
/// xlated/jited`, the maps' memlock, and timing `fwmark apply`'s phases).
const MISSES: &str = "
### Where targets are missed, and why

- **Classifier, hits above the floor.** The hit path is: one per-CPU
  counter struct, Ethernet/IP/L4 parsing, the generation word, the outer
  array-of-maps lookup, one hash lookup (IPv4: jhash over the 8-byte key of
  `EXACT4` and an 8-byte compare; IPv6: the 20-byte key), the per-rule
  per-CPU counters and the mark write. The map lookups are inlined by the
  verifier except the hash lookup itself, which is most of the cost; one
  packet repeated costs the same as 1,000 distinct ones, so it is
  instructions, not cache misses. Word loads of the packet fields are not
  possible here: LLVM splits unaligned loads into bytes on the BPF target
  unless `allows-misaligned-mem-access` is enabled, which aya-build does not
  let us pass. The cost does not grow with the number of services.
- **Port range hit against an exact hit.** A range hit is the exact-port
  lookup (a miss: a whole hash lookup), then the range table's hash lookup
  and a scan of at most 8 ranges: one hash lookup more than an exact hit,
  which is what the difference measures. Meeting 10 ns needs the range
  found without the exact-port miss first, e.g. all port entries of an
  address that has ranges held in its range table (one lookup for both),
  at the price of one more lookup for exact hits of such addresses.
- **Memory per entry.** A preallocated hash element is 72 bytes for IPv4
  (48 of kernel header, the 8-byte key, 16 of value) and 88 for IPv6 (the
  20-byte key rounded up to 24), plus about 17 bytes of bucket array at 1M
  entries; the per-rule counters add 24 bytes per possible CPU plus an
  8-byte per-CPU pointer (56 bytes on this 2-CPU VM, and more on larger
  machines); counters per service instead of per rule would make the
  counter memory independent of the number of entries.
- **Apply time.** `RUST_LOG=debug fwmark apply` logs how long each phase
  takes. For 1M entries on this VM (two runs with the benchmark's config):
  parsing and validating the 17 MB TOML 0.47 to 0.57 s (the toml crate's
  parser, a string per VIP), compiling the entries 0.43 to 0.56 s, writing
  the state (the config text, JSON-escaped) 0.10 to 0.24 s, the diff and
  the counter slots about 0.1 s; in the kernel, creating the preallocated
  hash map 0.04 to 0.32 s, inserting the entries (`BPF_MAP_UPDATE_BATCH`)
  0.64 to 0.76 s, zeroing reused counter slots (batched) 0.36 s, and the
  map-in-map updates of the switch (an RCU grace period each; four of them
  took 0.06 s; a config without ranges or prefixes now makes five: two to
  place the exact maps, one to wait for readers of the old generation, two
  to free it).
  Each repetition here returns to a small config, so the next 1M apply
  reuses a million slots that counted before and must zero them. The
  kernel's share alone is 1.1 to 1.5 s, above the 1 s target; what is left
  to cut in userspace is mostly the TOML parse and the compile.
- **End to end, fwmark against the nftables map.** fwmark's added cost is
  the TC ingress hook itself (the \"empty TC program\" row: the skb set-up
  around any TC program), the classifier, and in the real receive path the
  cache misses of a large table; the nftables map's is one rule in a
  netfilter base chain. The targets above give this run's ratio with its
  interval; section 2b separates the program's own cost from the hook's, and
  the cuts listed for the classifier above would narrow it. TC ingress is
  still the only hook early enough: XDP runs before the skb exists and
  cannot set skb->mark.
- **End to end, flatness.** The 1-service case sends to one destination,
  the larger ones to 64, so it runs a slightly different path.
- **Metrics scrape.** At 100k entries most of a scrape is reading the
  per-rule counters: one `BPF_MAP_LOOKUP_BATCH` per 16k slots, but the
  kernel's generic batch walks the per-CPU array element by element (next
  key, per-CPU copy, two `copy_to_user`), about 300 ns per rule here;
  rendering the 9 MB exposition from the kept labels takes a few ms. (Before
  the daemon kept the config compiled, each scrape also parsed and compiled
  it: about 180 ms at 100k entries, and read the counters one syscall per
  rule.) Meeting 5 ms needs fewer counters to read per scrape: per-service
  counters in the kernel, or an mmapable counter array.
- **End-to-end figures** are differences of two noisy rates (each packet
  costs 1e9 / the baseline rate of section 2 on this VM's receive path,
  dominated by the AF_PACKET send and the veth/IP receive, and the VM's two
  CPUs are shared), so tens of ns either way are noise: a comparison the
  interval of the median cannot decide is written inconclusive, and section
  2b measures the program itself, in the same traffic, without that noise.
";

/// The whole report.
pub struct Report {
    pub markdown: String,
    pub png: Vec<u8>,
}

fn sh(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// How many of [`other_checks`]'s first targets are the classifier's
/// (written before the end-to-end ones).
const CLASSIFIER_CHECKS: usize = 7;

/// The classifier, memory, apply and scrape targets.
pub fn other_checks(
    classifier: &[ClassifierPoint],
    apply: &[ApplyPoint],
    scrape: &[ScrapePoint],
) -> Vec<Check> {
    let mut out = Vec::new();
    if let (Some(f), Some(l)) = (classifier.first(), classifier.last()) {
        let n = l.services;
        out.push(Check::sampled(
            format!("Classifier, IPv4 hit at {n} services, at most 25 ns above the empty program"),
            format!("{} ns", cost(&l.v4_above_floor(), 1)),
            excess(&l.v4_above_floor(), 1.0, &vec![25.0; l.floor.len()], 0.0),
        ));
        out.push(Check::sampled(
            format!(
                "Classifier, one IPv4 packet repeated at {n} services, at most 25 ns above the empty program"
            ),
            format!("{} ns", cost(&l.v4_one_above_floor(), 1)),
            excess(&l.v4_one_above_floor(), 1.0, &vec![25.0; l.floor.len()], 0.0),
        ));
        out.push(Check::sampled(
            format!("Classifier, IPv6 hit at {n} services, at most 35 ns above the empty program"),
            format!("{} ns", cost(&l.v6_above_floor(), 1)),
            excess(&l.v6_above_floor(), 1.0, &vec![35.0; l.floor.len()], 0.0),
        ));
        out.push(Check::sampled(
            format!(
                "Classifier, one IPv6 packet repeated at {n} services, at most 35 ns above the empty program"
            ),
            format!("{} ns", cost(&l.v6_one_above_floor(), 1)),
            excess(&l.v6_one_above_floor(), 1.0, &vec![35.0; l.floor.len()], 0.0),
        ));
        out.push(Check::sampled(
            format!("Classifier, a hit inside a port range at {n} services at most 10 ns more than an exact hit"),
            format!("{} ns", figure(&l.range_over_exact(), 1)),
            excess(&l.range_over_exact(), 1.0, &vec![10.0; l.floor.len()], 0.0),
        ));
        let ratio: Vec<f64> = l.v4_hit.iter().zip(&f.v4_hit).map(|(a, b)| a / b).collect();
        out.push(Check::sampled(
            format!("Classifier at {n} services at most 1.1x its cost at 1 service"),
            format!("{}x", figure(&ratio, 2)),
            excess(&l.v4_hit, 1.1, &f.v4_hit, 0.0),
        ));
        out.push(Check::exact(
            format!(
                "Memory at most 96 bytes per exact IPv4 entry at {} entries (per-CPU counters apart)",
                n * 2
            ),
            l.v4_bytes_per_entry <= 96.0,
            format!(
                "{:.0} bytes (IPv6: {:.0}; per-CPU counters: {:.0} bytes per rule on {} CPUs)",
                l.v4_bytes_per_entry,
                l.v6_bytes_per_entry,
                l.counter_bytes_per_rule,
                aya::util::nr_cpus().map_or(0, |n| n)
            ),
        ));
    }
    out.extend(apply_checks(apply));
    out.extend(scrape_checks(scrape));
    out
}

/// Issue 15's apply target: 1M entries apply in at most 1 s. (The
/// comparison with `iptables-restore` is the apply table's last column, a
/// reference rather than a target.)
pub fn apply_checks(apply: &[ApplyPoint]) -> Vec<Check> {
    apply
        .iter()
        .filter(|p| p.entries == 1_000_000)
        .map(|p| {
            let limit = 1.0;
            Check::sampled(
                format!("Apply of {} entries within {limit} s", p.entries),
                format!("{} s", figure(&p.fwmark, 3)),
                p.fwmark.iter().map(|f| f - limit).collect(),
            )
        })
        .collect()
}

/// The scrape target: one scrape at 100k entries under 5 ms.
pub fn scrape_checks(scrape: &[ScrapePoint]) -> Vec<Check> {
    scrape
        .iter()
        .filter(|p| p.entries == 100_000)
        .map(|p| {
            Check::sampled(
                "Metrics scrape at 100000 entries under 5 ms",
                format!("{} ms", figure(&p.ms, 2)),
                p.ms.iter().map(|m| m - 5.0).collect(),
            )
        })
        .collect()
}

/// A section run alone (`fwmark-bench --only SECTION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// The classifier, memory and port-range sections (1, 4 and 6).
    Classifier,
    Apply,
    Scrape,
}

impl std::str::FromStr for Section {
    type Err = String;
    fn from_str(s: &str) -> Result<Section, String> {
        match s {
            "classifier" => Ok(Section::Classifier),
            "apply" => Ok(Section::Apply),
            "scrape" => Ok(Section::Scrape),
            other => Err(format!(
                "--only {other:?}: the sections that run alone are \"classifier\", \"apply\" \
                 and \"scrape\""
            )),
        }
    }
}

/// Runs one section alone (a working session's measurement; the report
/// is written by [`run`], every section in one run): its targets and
/// its table, as markdown.
pub fn run_only(section: Section, opts: Options, fwmark_bin: &std::path::Path) -> Result<String> {
    let (checks, tables) = match section {
        Section::Classifier => {
            let points = classifier(opts)?;
            let ranges = ranges()?;
            let mut checks = other_checks(&points, &[], &[]);
            checks.extend(range_checks(&ranges));
            let tables = vec![
                classifier_table(&points),
                memory_table(&points),
                ranges_table(&ranges),
            ];
            (checks, tables)
        }
        Section::Apply => {
            let apply = apply_times(opts, fwmark_bin)?;
            (apply_checks(&apply), vec![apply_table(&apply)])
        }
        Section::Scrape => {
            let scrape = scrape_times(opts)?;
            (scrape_checks(&scrape), vec![scrape_table(&scrape)])
        }
    };
    let mut md = String::new();
    for c in &checks {
        let _ = writeln!(md, "- {}", c.line());
    }
    for t in &tables {
        md.push('\n');
        md.push_str(&t.markdown());
    }
    Ok(md)
}

/// How the verdicts are reached, written under the Targets list.
const METHOD: &str = "
### How the figures and verdicts are reached

- **Repetitions.** Every figure is measured repeatedly and written as its
  median and [25th to 75th percentile] over the repetitions. Repetitions
  interleave what they compare (the classifier's sizes and programs; every
  end-to-end marker, each right after its own baseline; the apply tools
  and sizes), so that a slow phase of a shared machine hits all of them
  alike. A cost whose median is at or below 0 (a marker measured faster
  than no marker, which only noise can do) is written \"below the noise
  (inconclusive)\", never as a negative cost.
- **Verdicts.** Each target is judged on its excess over the limit,
  computed per repetition (e.g. fwmark's added cost minus half the
  nftables map's in the same round). The 95% confidence interval of the
  median excess is the distribution-free order-statistic interval
  [x(k), x(n+1-k)] of the sorted excesses, with k the largest such that
  P(Binomial(n, 1/2) <= k-1) <= 2.5% (n = 6 gives the range, n = 11
  [x(2), x(10)], n = 20 [x(6), x(15)]); it assumes nothing about the
  shape of the noise. **met**: the whole interval is at or below the limit;
  **MISSED**: the whole interval is above it; **inconclusive**: it
  straddles the limit (the noise is larger than the difference being
  judged), or there are fewer than 6 repetitions. Memory (memlock) is
  exact and judged on its one figure.
- **End-to-end rounds.** Rounds of every marker go on until every
  end-to-end target is decided or the next round would overrun the time
  budget (`cargo xtask bench --e2e-budget SECONDS`), with at least 6
  rounds; section 2 says how this run ended.
- **The program's own cost.** Section 2b reads each attached program's
  run_time_ns and run_cnt (bpf_prog_info, through aya's `ProgramInfo`)
  before and after a window of section 2's traffic, with the kernel's
  run-time statistics on for that window only (BPF_ENABLE_STATS, the fd
  form of `kernel.bpf_stats_enabled=1`: the kernel turns them off when the
  fd closes, even if the benchmark fails or is killed, and the sysctl is
  never written). The rates of section 2 are measured with the statistics
  off, so their clock reads do not weigh on them.
";

/// Runs every section and renders the report.
pub fn run(opts: Options, fwmark_bin: &std::path::Path) -> Result<Report> {
    let classifier = classifier(opts)?;
    let range_point = ranges()?;
    let e2e = end_to_end(opts)?;
    let apply = apply_times(opts, fwmark_bin)?;
    let scrape = scrape_times(opts)?;
    let series = added_ns_series(&e2e.points);

    let mut md = String::from("# fwmark benchmarks\n\n");
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    let _ = writeln!(
        md,
        "Generated by `cargo xtask bench{}` on {} — kernel {}, {} CPUs ({cpu}), {} of memory, \
         load average {} at the start of the report (the machine is shared). \
         Every figure below was measured in this one run; absolute numbers vary between \
         machines and runs, the comparisons within a table are what count.\n",
        if opts.quick { " --quick" } else { "" },
        sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        sh("uname", &["-r"]),
        sh("nproc", &[]),
        sh("sh", &["-c", "free -h | awk '/Mem:/{print $2}'"]),
        sh("cut", &["-d ", "-f1-3", "/proc/loadavg"]),
    );

    // Targets: the classifier's first, then end to end, apply and scrape.
    let mut checks = other_checks(&classifier, &apply, &scrape);
    let mut tail = checks.split_off(checks.len().min(CLASSIFIER_CHECKS));
    tail.extend(range_checks(&range_point));
    let mut lines: Vec<String> = checks.iter().map(Check::line).collect();
    let hook = e2e
        .points
        .iter()
        .find(|p| p.marker == Marker::EmptyTc)
        .map(|p| match cost(&p.added_ns(), 1) {
            c if c == stats::BELOW_NOISE => format!("a cost {c}"),
            c => format!("{c} ns"),
        });
    if let Some(h) = hook {
        lines.push(format!(
            "(For reference: attaching an empty TC program adds {h} per packet end to end; \
             TC ingress is the earliest hook that can set skb->mark, so every TC marker pays it.)"
        ));
    }
    let e2e_checks = e2e_checks(&e2e.points);
    lines.extend(e2e_checks.iter().map(Check::line));
    lines.extend(tail.iter().map(Check::line));
    md.push_str("## Targets\n\n");
    for t in &lines {
        let _ = writeln!(md, "- {t}");
    }
    md.push_str(METHOD);
    let verdicts: Vec<Verdict> = checks
        .iter()
        .chain(&e2e_checks)
        .chain(&tail)
        .map(Check::verdict)
        .collect();
    if verdicts.iter().any(|v| *v != Verdict::Met) {
        md.push_str(MISSES);
    }
    md.push_str("\n## Results\n\n");
    for t in [
        classifier_table(&classifier),
        end_to_end_table(&e2e),
        own_cost_table(&e2e, &classifier),
        apply_table(&apply),
        memory_table(&classifier),
        scrape_table(&scrape),
        ranges_table(&range_point),
    ] {
        md.push_str(&t.markdown());
        md.push('\n');
    }
    md.push_str("![added ns per packet against the number of services](benchmarks.png)\n");
    let png = plot(&series)?;
    Ok(Report { markdown: md, png })
}

/// Added ns per packet against services (log x), one line per marker.
pub fn plot(
    series: &std::collections::BTreeMap<&'static str, Vec<(usize, f64)>>,
) -> Result<Vec<u8>> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .context("the plot needs DejaVu Sans (apt-get install fonts-dejavu-core)")?;
    let _ = plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    );
    let path = std::env::temp_dir().join(format!("fwmark-bench-{}.png", std::process::id()));
    {
        let root = BitMapBackend::new(&path, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let max_n = series
            .values()
            .flatten()
            .map(|p| p.0)
            .max()
            .unwrap_or(10)
            .max(10);
        // Log y: iptables grows by orders of magnitude; values at or below
        // 1 ns (noise around zero) sit on the axis.
        let max_y = series
            .values()
            .flatten()
            .map(|p| p.1)
            .fold(10.0_f64, f64::max)
            * 2.0;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Added cost per packet (end to end, vs. no marker)",
                ("sans-serif", 22),
            )
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(70)
            .build_cartesian_2d((1usize..max_n * 2).log_scale(), (1.0..max_y).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("services / rules / map elements (log scale)")
            .y_desc("added ns per packet (log scale)")
            .label_style(("sans-serif", 14))
            .draw()?;
        for (i, (name, points)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(usize, f64)> = points
                .iter()
                .map(|(n, v)| (*n.max(&1), v.max(1.0)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3))
                });
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
        root.present()?;
    }
    let png = std::fs::read(&path)?;
    let _ = std::fs::remove_file(&path);
    Ok(png)
}
