//! The live config compiled into counter labels ([`LiveConfig`]), its
//! counters read at one time ([`Counts`]), and one snapshot of an
//! interface's attachment, live config and counters with two renderings:
//! the text table (in the spirit of `iptables -t mangle -L -n -v`) and the
//! `--json` document. The Prometheus exposition is in `metrics`.

use std::fmt::Write as _;

use fwmark_common::{GlobalCounters, RuleCounters};
use fwmark_core::{
    config::Config,
    ipvs_check::{self, MarkUse},
    ruleset::Ruleset,
    text::mark as mark_text,
};
use serde::Serialize;

use crate::{
    datapath::{DatapathError, Maps},
    ipvs::IpvsError,
    live::{self, LiveError},
    mode::AttachMode,
    state::State,
};

/// The global counters as a JSON object of their names.
fn global_counters<S: serde::Serializer>(g: &GlobalCounters, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap as _;
    let mut map = s.serialize_map(Some(GlobalCounters::NAMES.len()))?;
    for (name, value) in GlobalCounters::NAMES.iter().zip(g.values()) {
        map.serialize_entry(name, &value)?;
    }
    map.end()
}

/// Version of the `--json` schema; bumped only on incompatible changes.
pub const JSON_SCHEMA: u32 = 1;

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Snapshot {
    pub schema: u32,
    pub iface: String,
    pub attach: AttachInfo,
    pub config: ConfigInfo,
    /// `{"seen": N, "marked": N, ...}`, in [`GlobalCounters::NAMES`] order.
    #[serde(serialize_with = "global_counters")]
    pub global: GlobalCounters,
    /// The global counters of each interface of the group (one for a
    /// single interface); they add up to `global`.
    pub interfaces: Vec<InterfaceCounters>,
    pub services: Vec<ServiceCounters>,
    /// What IPVS does with the marks (`fwmark status`; absent from the
    /// daemon's exit table).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipvs: Option<IpvsReport>,
}

/// One interface's global counters (`fwmark run --iface A --iface B`
/// shares one set of maps; each interface counts in its own slot).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct InterfaceCounters {
    pub iface: String,
    /// Its slot of the global counter map.
    pub counter_slot: u32,
    #[serde(serialize_with = "global_counters")]
    pub global: GlobalCounters,
}

/// IPVS as `status` saw it: loaded or not, and the check's findings.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct IpvsReport {
    /// Whether the kernel has IPVS (the `ip_vs` module).
    pub loaded: bool,
    /// Why IPVS could not be read, when it could not (the counters are
    /// shown all the same).
    pub error: Option<String>,
    /// Warnings of `fwmark check --ipvs` for the live config.
    pub findings: Vec<FindingInfo>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FindingInfo {
    /// e.g. `no_ipvs_service`, `not_marked`, `keepalived_table`.
    pub kind: String,
    pub message: String,
}

/// An IPVS fwmark service a service's packets reach, with its connection
/// counts summed over its real servers, as `ipvsadm -L -n` shows them.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct IpvsFeed {
    /// `ipv4` or `ipv6`.
    pub family: &'static str,
    pub fwmark: u32,
    pub scheduler: String,
    pub real_servers: usize,
    pub active_conns: u64,
    pub inactive_conns: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AttachInfo {
    /// `tcx` or `netlink`.
    pub mode: AttachMode,
    /// Layout version of the pinned maps (`fwmark_common::ABI_VERSION` of
    /// the fwmark that made them).
    pub layout: u32,
    pub program_id: u32,
    /// Unix seconds.
    pub attached_at: u64,
    /// The `fwmark run` managing the interface, if any.
    pub daemon_pid: Option<u32>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ConfigInfo {
    pub generation: u64,
    pub path: String,
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ServiceCounters {
    pub name: String,
    pub mark: u32,
    pub mask: u32,
    pub packets: u64,
    pub bytes: u64,
    /// Of `packets`, ICMP errors marked by the packet they quote
    /// (`icmp_errors = true`).
    pub icmp_errors: u64,
    pub rules: Vec<RuleCount>,
    /// The IPVS fwmark services it feeds (with `status`, when IPVS could
    /// be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipvs: Option<Vec<IpvsFeed>>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RuleCount {
    /// e.g. `192.0.2.10 tcp port 80`.
    #[serde(rename = "match")]
    pub matches: String,
    pub packets: u64,
    pub bytes: u64,
    pub icmp_errors: u64,
}

/// The live config compiled into what its counters are labelled with:
/// services and, per rule, its service and what it matches. `fwmark run`
/// keeps it (a scrape never parses the config); `status` builds it from
/// the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveConfig {
    pub generation: u64,
    pub path: String,
    pub sha256: String,
    /// Counter slot of every rule, in rule order.
    pub slots: Vec<u32>,
    pub services: Vec<ServiceLabel>,
    /// How every service uses its mark (families, protocols), for the
    /// IPVS check, in service order.
    pub marks: Vec<MarkUse>,
    /// Service index of every rule.
    rule_service: Vec<u32>,
    /// What every rule matches (`192.0.2.10 tcp port 80`), one after the
    /// other (one allocation, not one per rule), ending at `rule_ends`.
    rule_text: String,
    rule_ends: Vec<usize>,
}

/// A service as its counters are labelled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceLabel {
    pub name: String,
    pub mark: u32,
    pub mask: u32,
}

impl LiveConfig {
    /// The labels of `config` compiled as `ruleset`, live as `generation`
    /// with counter `slots` (one per rule).
    pub fn new(
        generation: u64,
        path: &str,
        sha256: &str,
        slots: Vec<u32>,
        config: &Config,
        ruleset: &Ruleset,
    ) -> LiveConfig {
        let mut rule_text = String::new();
        let mut rule_ends = Vec::with_capacity(ruleset.rules.len());
        for r in &ruleset.rules {
            let _ = write!(rule_text, "{r}");
            rule_ends.push(rule_text.len());
        }
        LiveConfig {
            generation,
            path: path.to_string(),
            sha256: sha256.to_string(),
            slots,
            services: config
                .services
                .iter()
                .map(|s| ServiceLabel {
                    name: s.name.clone(),
                    mark: s.mark,
                    mask: s.mask,
                })
                .collect(),
            marks: MarkUse::of_config(config),
            rule_service: ruleset.rules.iter().map(|r| r.service as u32).collect(),
            rule_text,
            rule_ends,
        }
    }

    /// The live config `state` records, parsed and compiled (None before
    /// the first switch).
    pub fn of_state(state: &State) -> Result<Option<LiveConfig>, LiveError> {
        Ok(live::live_config(state)?.map(|(config, ruleset)| {
            LiveConfig::new(
                state.generation,
                &state.config_path,
                &state.config_sha256,
                state.slots.clone(),
                &config,
                &ruleset,
            )
        }))
    }

    /// Whether this is the live config `state` records.
    pub fn is_of(&self, state: &State) -> bool {
        self.generation == state.generation && self.sha256 == state.config_sha256
    }

    /// Every rule: its service's index and what it matches.
    pub fn rules(&self) -> impl Iterator<Item = (usize, &str)> {
        let starts = std::iter::once(0).chain(self.rule_ends.iter().copied());
        self.rule_service
            .iter()
            .zip(starts.zip(&self.rule_ends))
            .map(|(&service, (start, &end))| (service as usize, &self.rule_text[start..end]))
    }

    /// Reads its counters from the maps: the global ones and every rule's
    /// and service's (the sum of its rules').
    pub fn counts(&self, maps: &Maps) -> Result<Counts, DatapathError> {
        let global = maps.global_counters()?;
        let rules = maps.rule_counters(&self.slots)?;
        let mut services = vec![RuleCounters::default(); self.services.len()];
        for (&service, c) in self.rule_service.iter().zip(&rules) {
            let s = &mut services[service as usize];
            s.packets += c.packets;
            s.bytes += c.bytes;
            s.icmp_errors += c.icmp_errors;
        }
        Ok(Counts {
            global,
            rules,
            services,
        })
    }
}

/// Counters of a [`LiveConfig`], read at one time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counts {
    pub global: GlobalCounters,
    /// Per rule, in rule order.
    pub rules: Vec<RuleCounters>,
    /// Per service, in service order.
    pub services: Vec<RuleCounters>,
}

impl Snapshot {
    /// Reads the counters of the live config described by `state`
    /// (compiling it from the state), and what IPVS does with its marks.
    pub fn collect(
        state: &State,
        maps: &Maps,
        daemon_pid: Option<u32>,
    ) -> Result<Snapshot, LiveError> {
        let live = LiveConfig::of_state(state)?;
        let mut snapshot = Snapshot::read(state, live.as_ref(), maps, daemon_pid)?;
        if let Some(live) = &live {
            snapshot.add_ipvs(live, crate::ipvs::read());
        }
        Ok(snapshot)
    }

    /// Reads the counters of `live`, the live config of `state` compiled
    /// already (None: nothing is live yet).
    pub fn read(
        state: &State,
        live: Option<&LiveConfig>,
        maps: &Maps,
        daemon_pid: Option<u32>,
    ) -> Result<Snapshot, DatapathError> {
        let (global, services) = match live {
            Some(live) => {
                let counts = live.counts(maps)?;
                let mut services: Vec<ServiceCounters> = live
                    .services
                    .iter()
                    .zip(&counts.services)
                    .map(|(s, c)| ServiceCounters {
                        name: s.name.clone(),
                        mark: s.mark,
                        mask: s.mask,
                        packets: c.packets,
                        bytes: c.bytes,
                        icmp_errors: c.icmp_errors,
                        rules: Vec::new(),
                        ipvs: None,
                    })
                    .collect();
                for ((service, matches), c) in live.rules().zip(&counts.rules) {
                    services[service].rules.push(RuleCount {
                        matches: matches.to_string(),
                        packets: c.packets,
                        bytes: c.bytes,
                        icmp_errors: c.icmp_errors,
                    });
                }
                (counts.global, services)
            }
            None => (maps.global_counters()?, Vec::new()),
        };
        // Per interface, and the total from the same read, so they add up.
        let per_slot = maps.global_counters_per_slot()?;
        let interfaces: Vec<InterfaceCounters> = std::iter::once((state.iface.clone(), 0))
            .chain(
                state
                    .members
                    .iter()
                    .map(|m| (m.iface.clone(), m.counter_slot)),
            )
            .map(|(iface, slot)| InterfaceCounters {
                iface,
                counter_slot: slot,
                global: per_slot.get(slot as usize).copied().unwrap_or_default(),
            })
            .collect();
        let global = if state.members.is_empty() {
            global
        } else {
            interfaces.iter().fold(GlobalCounters::default(), |a, i| {
                crate::datapath::add_global(a, &i.global)
            })
        };
        Ok(Snapshot {
            schema: JSON_SCHEMA,
            iface: state.iface.clone(),
            attach: AttachInfo {
                mode: state.mode,
                layout: state.abi,
                program_id: state.program_id,
                attached_at: state.attached_at,
                daemon_pid,
            },
            config: ConfigInfo {
                generation: state.generation,
                path: state.config_path.clone(),
                sha256: state.config_sha256.clone(),
            },
            global,
            interfaces,
            services,
            ipvs: None,
        })
    }

    /// Adds what IPVS does with the marks of `live` (the live config this
    /// snapshot counts): per service the IPVS fwmark services it feeds,
    /// and the check's findings. `read` is what reading IPVS gave.
    pub fn add_ipvs(&mut self, live: &LiveConfig, read: Result<ipvs_check::Snapshot, IpvsError>) {
        for service in &mut self.services {
            service.ipvs = None;
        }
        let ipvs = match read {
            Ok(ipvs) => ipvs,
            Err(e) => {
                self.ipvs = Some(IpvsReport {
                    loaded: false,
                    error: Some(crate::chain(&e)),
                    findings: Vec::new(),
                });
                return;
            }
        };
        if ipvs.loaded {
            for (service, m) in self.services.iter_mut().zip(&live.marks) {
                service.ipvs = Some(
                    ipvs_check::fed_by(m, &ipvs)
                        .map(|s| IpvsFeed {
                            family: s.family.name(),
                            fwmark: s.fwmark,
                            scheduler: s.scheduler.clone(),
                            real_servers: s.dests.len(),
                            active_conns: s.active_conns(),
                            inactive_conns: s.inactive_conns(),
                        })
                        .collect(),
                );
            }
        }
        self.ipvs = Some(IpvsReport {
            loaded: ipvs.loaded,
            error: None,
            findings: ipvs_check::check(&live.marks, &ipvs)
                .iter()
                .map(|f| FindingInfo {
                    kind: f.kind().to_string(),
                    message: f.to_string(),
                })
                .collect(),
        });
    }

    /// The header lines and the counter table.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "interface {}: {} attachment, layout {}, program id {}, attached at {} (unix), {}",
            self.iface,
            self.attach.mode,
            self.attach.layout,
            self.attach.program_id,
            self.attach.attached_at,
            match self.attach.daemon_pid {
                Some(pid) => format!("managed by fwmark run (pid {pid})"),
                None => "no fwmark run managing it (kept)".to_string(),
            }
        );
        if self.interfaces.len() > 1 {
            let names: Vec<&str> = self.interfaces.iter().map(|i| i.iface.as_str()).collect();
            let _ = writeln!(
                out,
                "interfaces {}: one set of maps, switched together",
                names.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "config generation {} from {} (sha256 {})",
            self.config.generation,
            self.config.path,
            &self.config.sha256[..self.config.sha256.len().min(16)]
        );
        out.push_str(&self.table());
        out
    }

    /// The counter table alone: a line per service and per rule, then the
    /// global counters.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:>12} {:>14}  {:<10} {:<20} match",
            "pkts", "bytes", "mark", "service"
        );
        for s in &self.services {
            let _ = write!(
                out,
                "{:>12} {:>14}  {:<10} {:<20} (total)",
                s.packets,
                s.bytes,
                mark_text(s.mark, s.mask),
                s.name
            );
            if s.icmp_errors > 0 {
                let _ = write!(out, " of which {} ICMP errors", s.icmp_errors);
            }
            out.push('\n');
            if let Some(feeds) = &s.ipvs {
                let blank = "";
                if feeds.is_empty() {
                    let _ = writeln!(
                        out,
                        "{blank:>12} {blank:>14}  {blank:<10} {blank:<20} -> IPVS: no fwmark service for this mark"
                    );
                }
                for f in feeds {
                    let _ = writeln!(
                        out,
                        "{blank:>12} {blank:>14}  {blank:<10} {blank:<20} -> IPVS FWM {}{} {}: {} real servers, ActiveConn {} InActConn {}",
                        f.fwmark,
                        if f.family == "ipv6" { " IPv6" } else { "" },
                        f.scheduler,
                        f.real_servers,
                        f.active_conns,
                        f.inactive_conns
                    );
                }
            }
            for r in &s.rules {
                let _ = writeln!(
                    out,
                    "{:>12} {:>14}  {:<10} {:<20} {}",
                    r.packets, r.bytes, "", "", r.matches
                );
            }
        }
        let line = |g: &GlobalCounters| {
            GlobalCounters::NAMES
                .iter()
                .zip(g.values())
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<String>>()
                .join(" ")
        };
        if self.interfaces.len() > 1 {
            for i in &self.interfaces {
                let _ = writeln!(out, "global on {}: {}", i.iface, line(&i.global));
            }
        }
        let _ = writeln!(out, "global: {}", line(&self.global));
        if let Some(ipvs) = &self.ipvs {
            match &ipvs.error {
                Some(e) => {
                    let _ = writeln!(out, "ipvs: cannot read: {e}");
                }
                None if !ipvs.loaded => {
                    let _ = writeln!(out, "ipvs: IPVS is not loaded: `modprobe ip_vs`");
                }
                None => {
                    let _ = writeln!(out, "ipvs: {} warnings", ipvs.findings.len());
                }
            }
            for f in ipvs.findings.iter().filter(|f| f.kind != "ipvs_not_loaded") {
                let _ = writeln!(out, "warning: {}", f.message);
            }
        }
        out
    }

    /// The `--json` document.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a snapshot always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            schema: JSON_SCHEMA,
            iface: "eth0".into(),
            attach: AttachInfo {
                mode: AttachMode::Tcx,
                layout: fwmark_common::ABI_VERSION,
                program_id: 7,
                attached_at: 1_700_000_000,
                daemon_pid: Some(42),
            },
            config: ConfigInfo {
                generation: 3,
                path: "/etc/fwmark/fwmark.toml".into(),
                sha256: "ab".repeat(32),
            },
            global: GlobalCounters {
                seen: 10,
                marked: 6,
                no_match: 3,
                non_ip: 1,
                later_fragment: 0,
                malformed: 0,
                icmp_error: 0,
            },
            interfaces: Vec::new(),
            services: vec![ServiceCounters {
                name: "we\"b".into(),
                mark: 80,
                mask: u32::MAX,
                packets: 6,
                bytes: 360,
                icmp_errors: 2,
                rules: vec![RuleCount {
                    matches: "192.0.2.10 tcp port 80".into(),
                    packets: 6,
                    bytes: 360,
                    icmp_errors: 2,
                }],
                ipvs: None,
            }],
            ipvs: None,
        }
    }

    #[test]
    fn several_interfaces_show_their_own_global_counters_and_the_total() {
        let mut s = sample();
        let g = |seen, marked| GlobalCounters {
            seen,
            marked,
            no_match: seen - marked,
            ..GlobalCounters::default()
        };
        s.global = g(10, 6);
        s.interfaces = vec![
            InterfaceCounters {
                iface: "eth0".into(),
                counter_slot: 0,
                global: g(7, 4),
            },
            InterfaceCounters {
                iface: "tun-lb".into(),
                counter_slot: 1,
                global: g(3, 2),
            },
        ];
        let text = s.text();
        assert!(
            text.contains("interfaces eth0, tun-lb: one set of maps"),
            "{text}"
        );
        assert!(
            text.contains("global on eth0: seen=7 marked=4 no_match=3"),
            "{text}"
        );
        assert!(
            text.contains("global on tun-lb: seen=3 marked=2 no_match=1"),
            "{text}"
        );
        assert!(text.contains("global: seen=10 marked=6"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&s.json()).unwrap();
        assert_eq!(v["interfaces"][1]["iface"], "tun-lb");
        assert_eq!(v["interfaces"][1]["counter_slot"], 1);
        assert_eq!(v["interfaces"][1]["global"]["marked"], 2);
        // One interface: no per-interface lines, the total as before.
        s.interfaces.truncate(1);
        assert!(!s.text().contains("global on"), "{}", s.text());
    }

    #[test]
    fn a_live_config_labels_every_rule_with_its_service() {
        let text = "[[service]]\nname = \"web\"\nvip = [\"192.0.2.10\", \"2001:db8::/64\"]\n\
                    proto = \"tcp\"\nports = [80, \"8000-8080\"]\nmark = 80\n\n\
                    [[service]]\nvip = \"192.0.2.53\"\nproto = \"udp\"\nmark = 53\n";
        let config = Config::parse(text, "t.toml").unwrap();
        let ruleset = Ruleset::compile(&config).unwrap();
        let slots: Vec<u32> = (0..ruleset.rules.len() as u32).rev().collect();
        let live = LiveConfig::new(2, "t.toml", "00", slots.clone(), &config, &ruleset);
        let rules: Vec<(usize, String)> = live.rules().map(|(s, m)| (s, m.to_string())).collect();
        let expected: Vec<(usize, String)> = ruleset
            .rules
            .iter()
            .map(|r| (r.service, r.to_string()))
            .collect();
        assert_eq!(rules, expected);
        assert_eq!(rules.len(), 5, "{rules:?}");
        assert_eq!(live.services[1].name, "service2");
        assert_eq!(live.slots, slots);
    }

    #[test]
    fn status_shows_the_ipvs_service_each_service_feeds_and_the_findings() {
        use fwmark_core::ipvs_check::{Family, IpvsDest, IpvsService};
        let text = "[[service]]\nname = \"web\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\n\
                    ports = [80]\nmark = 80\n\n\
                    [[service]]\nname = \"dns\"\nvip = \"192.0.2.53\"\nproto = \"udp\"\nmark = 53\n";
        let config = Config::parse(text, "t.toml").unwrap();
        let ruleset = Ruleset::compile(&config).unwrap();
        let live = LiveConfig::new(1, "t.toml", "00", vec![0, 1], &config, &ruleset);
        let mut snap = sample();
        snap.services = ["web", "dns"]
            .iter()
            .zip([80, 53])
            .map(|(n, mark)| ServiceCounters {
                name: n.to_string(),
                mark,
                mask: u32::MAX,
                packets: 0,
                bytes: 0,
                icmp_errors: 0,
                rules: vec![],
                ipvs: None,
            })
            .collect();
        let dest = |active, inactive| IpvsDest {
            addr: "10.0.2.2".parse().unwrap(),
            port: 0,
            forward: 0,
            weight: 1,
            active_conns: active,
            inactive_conns: inactive,
            persist_conns: 0,
        };
        let ipvs = ipvs_check::Snapshot {
            loaded: true,
            services: vec![IpvsService {
                family: Family::V4,
                fwmark: 80,
                protocol: 0,
                addr: None,
                port: 0,
                scheduler: "rr".into(),
                flags: 0,
                timeout: 0,
                dests: vec![dest(1, 2), dest(3, 4)],
            }],
            nft_tables: vec![],
        };
        snap.add_ipvs(&live, Ok(ipvs));
        let table = snap.table();
        assert!(
            table.contains("-> IPVS FWM 80 rr: 2 real servers, ActiveConn 4 InActConn 6"),
            "{table}"
        );
        assert!(
            table.contains("-> IPVS: no fwmark service for this mark"),
            "{table}"
        );
        assert!(table.contains("ipvs: 1 warnings"), "{table}");
        let v: serde_json::Value = serde_json::from_str(&snap.json()).unwrap();
        assert_eq!(v["services"][0]["ipvs"][0]["active_conns"], 4);
        assert_eq!(v["services"][0]["ipvs"][0]["family"], "ipv4");
        assert_eq!(v["services"][1]["ipvs"], serde_json::json!([]));
        assert_eq!(v["ipvs"]["findings"][0]["kind"], "no_ipvs_service");

        snap.add_ipvs(&live, Err(IpvsError::NotLoaded));
        assert!(
            snap.table()
                .contains("ipvs: cannot read: IPVS is not loaded")
        );
        let not_loaded = ipvs_check::Snapshot::default();
        snap.add_ipvs(&live, Ok(not_loaded));
        let table = snap.table();
        assert!(
            table.contains("ipvs: IPVS is not loaded: `modprobe ip_vs`"),
            "{table}"
        );
        assert!(!table.contains("warning: IPVS is not loaded"), "{table}");
    }

    #[test]
    fn json_schema_is_stable() {
        let v: serde_json::Value = serde_json::from_str(&sample().json()).unwrap();
        assert_eq!(v["schema"], 1);
        assert_eq!(v["attach"]["mode"], "tcx");
        assert_eq!(v["attach"]["layout"], fwmark_common::ABI_VERSION);
        assert_eq!(v["attach"]["daemon_pid"], 42);
        assert_eq!(v["config"]["generation"], 3);
        assert_eq!(v["global"]["marked"], 6);
        assert_eq!(v["global"]["icmp_error"], 0);
        assert_eq!(v["services"][0]["icmp_errors"], 2);
        assert_eq!(v["services"][0]["rules"][0]["icmp_errors"], 2);
        assert_eq!(
            v["services"][0]["rules"][0]["match"],
            "192.0.2.10 tcp port 80"
        );
        assert_eq!(v["services"][0]["packets"], 6);
    }
}
