//! One snapshot of an interface's attachment, live config and counters, and
//! its three renderings: the text table (in the spirit of
//! `iptables -t mangle -L -n -v`), the `--json` document and the Prometheus
//! exposition served by `--metrics`.

use std::fmt::Write as _;

use anyhow::Result;
use fwmark_common::GlobalCounters;
use fwmark_core::text::mark as mark_text;
use serde::Serialize;

use crate::{attach::AttachMode, datapath::Maps, live, state::State};

/// Version of the `--json` schema; bumped only on incompatible changes.
pub const JSON_SCHEMA: u32 = 1;

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Snapshot {
    pub schema: u32,
    pub iface: String,
    pub attach: AttachInfo,
    pub config: ConfigInfo,
    pub global: GlobalCounters,
    pub services: Vec<ServiceCounters>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AttachInfo {
    /// `tcx` or `netlink`.
    pub mode: AttachMode,
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
    pub rules: Vec<RuleCount>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RuleCount {
    /// e.g. `192.0.2.10 tcp port 80`.
    #[serde(rename = "match")]
    pub matches: String,
    pub packets: u64,
    pub bytes: u64,
}

impl Snapshot {
    /// Reads the counters of the live config described by `state`.
    pub fn collect(state: &State, maps: &Maps, daemon_pid: Option<u32>) -> Result<Snapshot> {
        let global = maps.global_counters()?;
        let mut services = Vec::new();
        if let Some((config, ruleset)) = live::live_config(state)? {
            let counts = maps.rule_counters(&state.slots)?;
            // Rules per service in one pass (not one scan of every rule per
            // service: that is quadratic for large configs, on every scrape).
            let mut per_service: Vec<Vec<RuleCount>> = vec![Vec::new(); config.services.len()];
            for (r, c) in ruleset.rules.iter().zip(&counts) {
                per_service[r.service].push(RuleCount {
                    matches: r.to_string(),
                    packets: c.packets,
                    bytes: c.bytes,
                });
            }
            for (service, rules) in config.services.iter().zip(per_service) {
                services.push(ServiceCounters {
                    name: service.name.clone(),
                    mark: service.mark,
                    mask: service.mask,
                    packets: rules.iter().map(|r| r.packets).sum(),
                    bytes: rules.iter().map(|r| r.bytes).sum(),
                    rules,
                });
            }
        }
        Ok(Snapshot {
            schema: JSON_SCHEMA,
            iface: state.iface.clone(),
            attach: AttachInfo {
                mode: state.mode,
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
            services,
        })
    }

    /// The header lines and the counter table.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "interface {}: {} attachment, program id {}, attached at {} (unix), {}",
            self.iface,
            self.attach.mode,
            self.attach.program_id,
            self.attach.attached_at,
            match self.attach.daemon_pid {
                Some(pid) => format!("managed by fwmark run (pid {pid})"),
                None => "no fwmark run managing it (kept)".to_string(),
            }
        );
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
            let _ = writeln!(
                out,
                "{:>12} {:>14}  {:<10} {:<20} (total)",
                s.packets,
                s.bytes,
                mark_text(s.mark, s.mask),
                s.name
            );
            for r in &s.rules {
                let _ = writeln!(
                    out,
                    "{:>12} {:>14}  {:<10} {:<20} {}",
                    r.packets, r.bytes, "", "", r.matches
                );
            }
        }
        let global: Vec<String> = GlobalCounters::NAMES
            .iter()
            .zip(self.global.values())
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        let _ = writeln!(out, "global: {}", global.join(" "));
        out
    }

    /// The `--json` document.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a snapshot always serializes")
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let iface = escape(&self.iface);
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        };
        let service_labels = |s: &ServiceCounters| {
            format!(
                "iface=\"{iface}\",service=\"{}\",mark=\"{}\"",
                escape(&s.name),
                mark_text(s.mark, s.mask)
            )
        };
        family(
            "fwmark_service_packets_total",
            "counter",
            "Packets marked, per service.",
            self.services
                .iter()
                .map(|s| (service_labels(s), s.packets))
                .collect(),
        );
        family(
            "fwmark_service_bytes_total",
            "counter",
            "Bytes (from the IP header on) of packets marked, per service.",
            self.services
                .iter()
                .map(|s| (service_labels(s), s.bytes))
                .collect(),
        );
        let rule_labels = |s: &ServiceCounters, r: &RuleCount| {
            format!(
                "iface=\"{iface}\",service=\"{}\",match=\"{}\"",
                escape(&s.name),
                escape(&r.matches)
            )
        };
        family(
            "fwmark_rule_packets_total",
            "counter",
            "Packets marked, per rule (service, address, protocol, ports).",
            self.services
                .iter()
                .flat_map(|s| s.rules.iter().map(move |r| (rule_labels(s, r), r.packets)))
                .collect(),
        );
        family(
            "fwmark_packets_total",
            "counter",
            "Packets the classifier saw, by outcome (marked + no_match + non_ip + malformed = seen).",
            GlobalCounters::NAMES
                .iter()
                .zip(self.global.values())
                .map(|(n, v)| (format!("iface=\"{iface}\",result=\"{n}\""), v))
                .collect(),
        );
        family(
            "fwmark_config_generation",
            "gauge",
            "Generation of the live config (counts every switch).",
            vec![(format!("iface=\"{iface}\""), self.config.generation)],
        );
        out
    }
}

/// Escapes a Prometheus label value.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `fwmark status`.
pub fn status(iface: &str, json: bool) -> Result<()> {
    use anyhow::Context as _;
    crate::preflight::check_privileges()?;
    let paths = crate::state::Paths::new(iface)?;
    let not_attached = || paths.not_attached();
    if !paths.pin_dir.exists() {
        return Err(not_attached().into());
    }
    let maps = Maps::from_pins(&paths.pin_dir).with_context(not_attached)?;
    let (state, unrecorded) = live::peek_state(&paths, &maps)?.with_context(not_attached)?;
    // A change in progress holds the apply lock between its switch and
    // recording it: only a switch nobody is recording was interrupted.
    if unrecorded && !crate::state::Lock::apply_busy(&paths) {
        log::warn!(
            "an interrupted change of {iface} switched to generation {} and is not recorded \
             yet; the next `fwmark apply`, `run` or `detach` records it",
            state.generation
        );
    }
    let daemon = crate::state::Lock::daemon_holder(&paths).and_then(|p| p.parse().ok());
    let snapshot = Snapshot::collect(&state, &maps, daemon)?;
    if json {
        println!("{}", snapshot.json());
    } else {
        print!("{}", snapshot.text());
    }
    Ok(())
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
            },
            services: vec![ServiceCounters {
                name: "we\"b".into(),
                mark: 80,
                mask: u32::MAX,
                packets: 6,
                bytes: 360,
                rules: vec![RuleCount {
                    matches: "192.0.2.10 tcp port 80".into(),
                    packets: 6,
                    bytes: 360,
                }],
            }],
        }
    }

    #[test]
    fn json_schema_is_stable() {
        let v: serde_json::Value = serde_json::from_str(&sample().json()).unwrap();
        assert_eq!(v["schema"], 1);
        assert_eq!(v["attach"]["mode"], "tcx");
        assert_eq!(v["attach"]["daemon_pid"], 42);
        assert_eq!(v["config"]["generation"], 3);
        assert_eq!(v["global"]["marked"], 6);
        assert_eq!(
            v["services"][0]["rules"][0]["match"],
            "192.0.2.10 tcp port 80"
        );
        assert_eq!(v["services"][0]["packets"], 6);
    }

    #[test]
    fn prometheus_exposition() {
        let p = sample().prometheus();
        assert!(p.contains("# TYPE fwmark_service_packets_total counter\n"));
        assert!(p.contains(
            "fwmark_service_packets_total{iface=\"eth0\",service=\"we\\\"b\",mark=\"0x50\"} 6\n"
        ));
        assert!(p.contains("fwmark_packets_total{iface=\"eth0\",result=\"seen\"} 10\n"));
        assert!(p.contains("fwmark_config_generation{iface=\"eth0\"} 3\n"));
    }
}
