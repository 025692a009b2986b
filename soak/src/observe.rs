//! What the soak reads while it runs: nftables counters in the director's
//! prerouting (the marks packets really arrived with), fwmark's counters
//! from `status --json` and from `/metrics`, the daemon's memory and file
//! descriptors from /proc, and fwmark's kernel objects.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use fwmark_testlab::{
    netns::{Lab, Netns, run_cmd},
    nft::nft_script,
};

use crate::plan::{Probe, RuleId};

const TABLE: &str = "fwmarksoak";

/// When a reading was taken: it reflects the system somewhere in between.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub start: Instant,
    pub end: Instant,
}

impl Span {
    pub fn measure<T>(f: impl FnOnce() -> T) -> (Span, T) {
        let start = Instant::now();
        let value = f();
        (
            Span {
                start,
                end: Instant::now(),
            },
            value,
        )
    }
}

/// Packets per mark for one probe, and with any mark not listed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PerMark {
    pub by_mark: BTreeMap<u32, u64>,
    pub other: u64,
}

impl PerMark {
    pub fn total(&self) -> u64 {
        self.by_mark.values().sum::<u64>() + self.other
    }

    /// Packets with a mark other than 0.
    pub fn marked(&self) -> u64 {
        self.total() - self.by_mark.get(&0).copied().unwrap_or(0)
    }

    /// `self - before`, per mark.
    pub fn since(&self, before: &PerMark) -> PerMark {
        PerMark {
            by_mark: self
                .by_mark
                .iter()
                .map(|(m, n)| (*m, n - before.by_mark.get(m).copied().unwrap_or(0)))
                .collect(),
            other: self.other - before.other,
        }
    }
}

/// One reading of the nftables counters.
#[derive(Clone, Debug, Default)]
pub struct NftReading {
    /// Every IPv4/IPv6 packet that came in on the director's interface,
    /// unmarked and marked.
    pub unmarked: u64,
    pub marked: u64,
    /// Per probe, in probe order.
    pub probes: Vec<PerMark>,
}

/// The counting table in the director: two counters for everything that
/// arrives on the interface (mark 0, any other mark), then one chain per
/// probe with a counter per possible mark and one for any other mark. It
/// hooks prerouting at mangle priority: after TC ingress, where fwmark
/// marks, and before anything else could drop a packet.
pub struct NftCounters<'a> {
    ns: &'a Netns,
    probes: usize,
}

impl<'a> NftCounters<'a> {
    pub fn install(
        ns: &'a Netns,
        iface: &str,
        probes: &[Probe],
        marks: &BTreeSet<u32>,
    ) -> Result<NftCounters<'a>> {
        let set = marks
            .iter()
            .map(|m| format!("{m:#x}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut chains = String::new();
        let mut jumps = String::new();
        for (i, p) in probes.iter().enumerate() {
            let family = if p.dst.is_ipv4() { "ip" } else { "ip6" };
            jumps += &format!(
                "    iifname \"{iface}\" {family} daddr {} {} dport {} jump p{i}\n",
                p.dst, p.proto, p.port
            );
            chains += &format!("  chain p{i} {{\n");
            for m in marks {
                chains += &format!("    meta mark {m:#x} counter comment \"p{i} m{m}\"\n");
            }
            chains +=
                &format!("    meta mark != {{ {set} }} counter comment \"p{i} other\"\n  }}\n");
        }
        let script = format!(
            "table inet {TABLE} {{\n{chains}  chain pre {{\n    \
             type filter hook prerouting priority mangle; policy accept;\n    \
             iifname \"{iface}\" meta mark 0 counter comment \"all m0\"\n    \
             iifname \"{iface}\" meta mark != 0 counter comment \"all marked\"\n{jumps}  }}\n}}\n"
        );
        nft_script(ns, &script).with_context(|| script.clone())?;
        Ok(NftCounters {
            ns,
            probes: probes.len(),
        })
    }

    pub fn read(&self) -> Result<NftReading> {
        let json = run_cmd(
            self.ns
                .command("nft")
                .args(["-j", "list", "table", "inet", TABLE]),
        )?;
        parse_nft(&json, self.probes)
    }
}

fn parse_nft(json: &str, probes: usize) -> Result<NftReading> {
    let mut out = NftReading {
        probes: vec![PerMark::default(); probes],
        ..NftReading::default()
    };
    for (comment, packets) in fwmark_testlab::nft::commented_counters(json)? {
        let (who, what) = comment.split_once(' ').context("comment format")?;
        if who == "all" {
            match what {
                "m0" => out.unmarked = packets,
                _ => out.marked = packets,
            }
            continue;
        }
        let i: usize = who.trim_start_matches('p').parse()?;
        let slot = out.probes.get_mut(i).context("probe index")?;
        if what == "other" {
            slot.other = packets;
        } else {
            slot.by_mark
                .insert(what.trim_start_matches('m').parse()?, packets);
        }
    }
    Ok(out)
}

/// fwmark's counters, from `status --json` or from `/metrics`, in one shape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub source: &'static str,
    pub generation: u64,
    /// Only `status` says which config is live.
    pub sha256: Option<String>,
    pub daemon_pid: Option<u32>,
    pub global: BTreeMap<String, u64>,
    /// Service -> (packets, bytes).
    pub services: BTreeMap<String, (u64, u64)>,
    /// Rule -> (packets, bytes when the source gives them).
    pub rules: BTreeMap<RuleId, (u64, Option<u64>)>,
}

impl Counters {
    pub fn global(&self, name: &str) -> u64 {
        self.global.get(name).copied().unwrap_or(0)
    }

    /// Parses `fwmark status --json`.
    pub fn from_status(json: &str) -> Result<Counters> {
        let doc: serde_json::Value =
            serde_json::from_str(json).with_context(|| format!("status --json: {json}"))?;
        let num = |v: &serde_json::Value, what: &str| {
            v.as_u64()
                .with_context(|| format!("status --json: {what} is not a number: {json}"))
        };
        let mut out = Counters {
            source: "status",
            generation: num(&doc["config"]["generation"], "config.generation")?,
            sha256: doc["config"]["sha256"].as_str().map(str::to_string),
            daemon_pid: doc["attach"]["daemon_pid"].as_u64().map(|p| p as u32),
            ..Counters::default()
        };
        for (name, value) in doc["global"].as_object().context("status: global")? {
            out.global.insert(name.clone(), num(value, name)?);
        }
        for s in doc["services"].as_array().context("status: services")? {
            let name = s["name"].as_str().context("service name")?.to_string();
            for r in s["rules"].as_array().context("service rules")? {
                out.rules.insert(
                    (
                        name.clone(),
                        r["match"].as_str().context("rule match")?.to_string(),
                    ),
                    (
                        num(&r["packets"], "packets")?,
                        Some(num(&r["bytes"], "bytes")?),
                    ),
                );
            }
            out.services.insert(
                name,
                (num(&s["packets"], "packets")?, num(&s["bytes"], "bytes")?),
            );
        }
        Ok(out)
    }

    /// Parses the Prometheus exposition of `fwmark run --metrics`.
    pub fn from_metrics(body: &str) -> Result<Counters> {
        let mut out = Counters {
            source: "metrics",
            ..Counters::default()
        };
        let mut seen_generation = false;
        for line in body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (name, labels, value) =
                parse_sample(line).with_context(|| format!("metrics line {line:?}"))?;
            let label = |k: &str| {
                labels
                    .get(k)
                    .cloned()
                    .with_context(|| format!("metrics line {line:?} has no label {k}"))
            };
            match name {
                "fwmark_service_packets_total" => {
                    out.services.entry(label("service")?).or_default().0 = value;
                }
                "fwmark_service_bytes_total" => {
                    out.services.entry(label("service")?).or_default().1 = value;
                }
                "fwmark_rule_packets_total" => {
                    out.rules
                        .insert((label("service")?, label("match")?), (value, None));
                }
                // Outcomes; their sum is `seen` (added below).
                "fwmark_packets_total" => {
                    out.global.insert(label("result")?, value);
                }
                "fwmark_later_fragments_total" => {
                    out.global.insert("later_fragment".into(), value);
                }
                "fwmark_config_generation" => {
                    out.generation = value;
                    seen_generation = true;
                }
                _ => {}
            }
        }
        if !seen_generation {
            bail!("no fwmark_config_generation in the exposition:\n{body}");
        }
        // Named like `status --json` names it, so readings of both compare.
        let seen = ["marked", "no_match", "non_ip", "malformed"]
            .iter()
            .map(|o| out.global(o))
            .sum();
        out.global.insert("seen".into(), seen);
        Ok(out)
    }
}

/// `name{k="v",...} value` -> (name, labels, value).
fn parse_sample(line: &str) -> Option<(&str, BTreeMap<String, String>, u64)> {
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => {
            let (name, value) = line.split_once(' ')?;
            return Some((name, BTreeMap::new(), value.trim().parse().ok()?));
        }
    };
    let mut labels = BTreeMap::new();
    let mut chars = rest.char_indices().peekable();
    loop {
        let (start, c) = chars.next()?;
        if c == '}' {
            let value = rest[start + 1..].trim().parse().ok()?;
            return Some((name, labels, value));
        }
        if c == ',' {
            continue;
        }
        let eq = rest[start..].find('=')? + start;
        let key = rest[start..eq].to_string();
        while chars.peek()?.0 < eq + 1 {
            chars.next();
        }
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()?.1 {
                '"' => break,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                other => value.push(other),
            }
        }
        labels.insert(key, value);
    }
}

/// `GET /metrics` from `127.0.0.1:port` inside `ns`; the body.
pub fn scrape(ns: &Netns, port: u16) -> Result<String> {
    let response = ns.run(move || -> Result<String> {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: soak\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP response: {response}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("metrics answered {head}: {body}");
    }
    Ok(body.to_string())
}

/// The daemon's memory, threads and open file descriptors.
#[derive(Clone, Copy, Debug, Default)]
pub struct Process {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub size_kib: u64,
    pub threads: u64,
    pub fds: u64,
}

impl Process {
    pub fn read(pid: u32) -> Result<Process> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status (did the daemon exit?)"))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("/proc/{pid}/status has no {name}"))
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("listing /proc/{pid}/fd"))?
            .count() as u64;
        Ok(Process {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
            size_kib: field("VmSize:")?,
            threads: field("Threads:")?,
            fds,
        })
    }
}

/// fwmark's array-of-maps, each with one inner map per generation slot.
pub const OUTER_MAPS: [&str; 5] = [
    fwmark_common::map_names::EXACT4,
    fwmark_common::map_names::EXACT,
    fwmark_common::map_names::RANGE4,
    fwmark_common::map_names::RANGE6,
    fwmark_common::map_names::PREFIX,
];

/// fwmark's objects in the kernel, and the machine's totals.
#[derive(Clone, Debug, Default)]
pub struct Kernel {
    /// Programs on the interface's ingress (tcx), by id.
    pub programs: Vec<u32>,
    /// Maps the attached program uses (its outer maps, counters, ...).
    pub program_maps: BTreeSet<u32>,
    /// The inner maps in the generation slots of `EXACT4`, `EXACT`,
    /// `RANGE4`, `RANGE6` and `PREFIX`.
    pub inner_maps: BTreeSet<u32>,
    /// Kernel memory charged to all of those maps (fdinfo `memlock`).
    pub memlock: u64,
    /// Entries in fwmark's pin directory.
    pub pins: u64,
    /// Every BPF map and program on the machine (others' included).
    pub system_maps: u64,
    pub system_programs: u64,
}

impl Kernel {
    /// Maps attributable to fwmark on this interface.
    pub fn maps(&self) -> u64 {
        self.program_maps.union(&self.inner_maps).count() as u64
    }

    pub fn read(lab: &Lab, pin_dir: &Path) -> Result<Kernel> {
        use aya::{
            maps::{Map, MapData, MapInfo, loaded_maps, of_maps::ArrayOfMaps},
            programs::{SchedClassifier, TcAttachType, loaded_programs},
        };
        let dev = lab.director_if.clone();
        let (_, attached) = lab
            .director
            .run(move || SchedClassifier::query_tcx(&dev, TcAttachType::Ingress))??;
        let mut out = Kernel {
            programs: attached.iter().map(|p| p.id()).collect(),
            ..Kernel::default()
        };
        for p in &attached {
            out.program_maps
                .extend(p.map_ids().context("program map ids")?.unwrap_or_default());
        }
        for name in OUTER_MAPS {
            let path = pin_dir.join(name);
            let data =
                MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            let outer: ArrayOfMaps<MapData, MapData> =
                ArrayOfMaps::try_from(Map::from_map_data(data)?)?;
            for slot in 0..fwmark_common::GENERATIONS {
                // An empty slot (before the second generation) has no map.
                if let Ok(inner) = outer.get(&slot, 0) {
                    out.inner_maps.insert(inner.info()?.id());
                }
            }
        }
        for id in out.program_maps.union(&out.inner_maps) {
            // A map replaced since it was listed is simply not counted.
            if let Ok(info) = MapInfo::from_id(*id) {
                out.memlock += memlock(&info).unwrap_or(0);
            }
        }
        out.pins = std::fs::read_dir(pin_dir)
            .with_context(|| format!("listing {}", pin_dir.display()))?
            .count() as u64;
        out.system_maps = loaded_maps().filter(Result::is_ok).count() as u64;
        out.system_programs = loaded_programs().filter(Result::is_ok).count() as u64;
        Ok(out)
    }
}

/// The `memlock` line of the map's fdinfo: the memory the kernel charges it.
fn memlock(info: &aya::maps::MapInfo) -> Result<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = info.fd()?;
    let raw = fd.as_fd().as_raw_fd();
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no memlock in fdinfo")
}

/// Whether a map with this id still exists.
pub fn map_exists(id: u32) -> bool {
    aya::maps::MapInfo::from_id(id).is_ok()
}

/// Whether a program with this id still exists.
pub fn program_exists(id: u32) -> bool {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|p| p.id() == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_samples_parse_with_escapes() {
        let (name, labels, value) = parse_sample(
            r#"fwmark_rule_packets_total{iface="x",service="w\"eb",match="192.0.2.10 tcp port 80"} 42"#,
        )
        .unwrap();
        assert_eq!(name, "fwmark_rule_packets_total");
        assert_eq!(labels["service"], "w\"eb");
        assert_eq!(labels["match"], "192.0.2.10 tcp port 80");
        assert_eq!(value, 42);
        assert_eq!(parse_sample("up 1").unwrap().2, 1);
        assert!(parse_sample("broken{a=\"1\" 3").is_none());
    }

    #[test]
    fn metrics_exposition_becomes_counters() {
        let body = "# HELP x\n\
            fwmark_service_packets_total{iface=\"i\",service=\"web\",mark=\"0x50\"} 7\n\
            fwmark_service_bytes_total{iface=\"i\",service=\"web\",mark=\"0x50\"} 700\n\
            fwmark_rule_packets_total{iface=\"i\",service=\"web\",match=\"192.0.2.10 tcp port 80\"} 7\n\
            fwmark_packets_total{iface=\"i\",result=\"marked\"} 9\n\
            fwmark_packets_total{iface=\"i\",result=\"no_match\"} 4\n\
            fwmark_later_fragments_total{iface=\"i\"} 2\n\
            fwmark_config_generation{iface=\"i\"} 3\n";
        let c = Counters::from_metrics(body).unwrap();
        assert_eq!(c.generation, 3);
        assert_eq!(c.services["web"], (7, 700));
        assert_eq!(
            c.rules[&("web".into(), "192.0.2.10 tcp port 80".into())],
            (7, None)
        );
        assert_eq!(c.global("marked"), 9);
        assert_eq!(c.global("seen"), 13);
        assert_eq!(c.global("later_fragment"), 2);
        assert!(Counters::from_metrics("# nothing\n").is_err());
    }

    #[test]
    fn nft_json_becomes_a_reading() {
        let json = r#"{"nftables": [{"metainfo": {}},
            {"rule": {"comment": "all m0", "expr": [{"counter": {"packets": 5, "bytes": 1}}]}},
            {"rule": {"comment": "all marked", "expr": [{"counter": {"packets": 7, "bytes": 1}}]}},
            {"rule": {"comment": "p0 m80", "expr": [{"match": {}}, {"counter": {"packets": 3, "bytes": 1}}]}},
            {"rule": {"comment": "p0 other", "expr": [{"counter": {"packets": 1, "bytes": 1}}]}},
            {"rule": {"expr": [{"jump": {"target": "p0"}}]}}]}"#;
        let r = parse_nft(json, 1).unwrap();
        assert_eq!((r.unmarked, r.marked), (5, 7));
        assert_eq!(r.probes[0].by_mark[&80], 3);
        assert_eq!(r.probes[0].other, 1);
        assert_eq!(r.probes[0].marked(), 4);
    }
}
