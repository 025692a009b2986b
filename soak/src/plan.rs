//! What the soak runs: the configs it cycles through, the traffic it sends
//! and, written out by hand per config (not derived from fwmark's own
//! compiler), the mark every probe must arrive with.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::Result;

use fwmark_testlab::nft::ProbeProto;

/// How many configs the soak cycles through (change `i` makes config
/// `i % CONFIGS` live).
pub const CONFIGS: usize = 4;

/// Config `k`: four services whose names never change, so their rules keep
/// their counter slots, plus one that comes and goes:
/// - `web`: IPv4 and IPv6, TCP and UDP, ports 80 and 443, mark 80/81
///   alternating every change;
/// - `dns`: UDP 53 on IPv4 and IPv6, mark 53 in every config;
/// - `net`: prefixes (the LPM trie), TCP and UDP port 8000, mark 90 for two
///   changes, then 91 for two;
/// - `bulk`: a TCP range on 192.0.2.10 growing from 1,001 to 4,001 ports
///   (the inner hash map's size changes every time; its rule, named by its
///   range, is a new rule each time);
/// - `toggle`: IPv6 UDP 5000, mark 50, only in even configs.
pub fn config_text(k: usize) -> String {
    let web = 80 + (k % 2);
    let net = if k % CONFIGS < 2 { 90 } else { 91 };
    let bulk_hi = bulk_hi(k);
    let mut text = format!(
        "# fwmark soak, config {k}\n\
         [[service]]\nname = \"web\"\nvip = [\"192.0.2.10\", \"2001:db8::10\"]\n\
         proto = [\"tcp\", \"udp\"]\nports = [80, 443]\nmark = {web}\n\n\
         [[service]]\nname = \"dns\"\nvip = [\"192.0.2.53\", \"2001:db8::53\"]\n\
         proto = \"udp\"\nports = [53]\nmark = 53\n\n\
         [[service]]\nname = \"net\"\nvip = [\"198.51.100.0/28\", \"2001:db8:1::/64\"]\n\
         proto = [\"tcp\", \"udp\"]\nports = [8000]\nmark = {net}\n\n\
         [[service]]\nname = \"bulk\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\n\
         ports = [\"10000-{bulk_hi}\"]\nmark = 100\n"
    );
    if k.is_multiple_of(2) {
        text += "\n[[service]]\nname = \"toggle\"\nvip = \"2001:db8::10\"\nproto = \"udp\"\n\
                 ports = [5000]\nmark = 50\n";
    }
    text
}

fn bulk_hi(k: usize) -> u32 {
    10_000 + 1_000 * (k as u32 % CONFIGS as u32 + 1)
}

/// Traffic to one (address, protocol, port) and the mark it must carry
/// under each config (0: unmarked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub dst: IpAddr,
    pub proto: ProbeProto,
    pub port: u16,
    pub marks: [u32; CONFIGS],
    /// `(service, match)` of the one rule that marks it in every config,
    /// when there is one: its counter must equal what nftables saw.
    pub rule: Option<(&'static str, &'static str)>,
}

impl Probe {
    /// Every mark the probe may legitimately carry at some point.
    pub fn allowed(&self) -> BTreeSet<u32> {
        self.marks.iter().copied().collect()
    }

    /// `192.0.2.10 tcp/80`
    pub fn label(&self) -> String {
        format!("{} {}/{}", self.dst, self.proto, self.port)
    }
}

fn probe(
    dst: &str,
    proto: ProbeProto,
    port: u16,
    marks: [u32; CONFIGS],
    rule: Option<(&'static str, &'static str)>,
) -> Probe {
    Probe {
        dst: dst.parse().expect("probe address"),
        proto,
        port,
        marks,
        rule,
    }
}

/// The traffic: TCP and UDP, IPv4 and IPv6, ports whose mark alternates,
/// ports that come and go, and ports that must never be marked (next to
/// marked ones: other protocol, the ports just outside the range).
pub fn probes() -> Vec<Probe> {
    use ProbeProto::{Tcp, Udp};
    const WEB: [u32; CONFIGS] = [80, 81, 80, 81];
    const NET: [u32; CONFIGS] = [90, 90, 91, 91];
    const NONE: [u32; CONFIGS] = [0; CONFIGS];
    vec![
        probe(
            "192.0.2.10",
            Tcp,
            80,
            WEB,
            Some(("web", "192.0.2.10 tcp port 80")),
        ),
        probe(
            "192.0.2.10",
            Udp,
            443,
            WEB,
            Some(("web", "192.0.2.10 udp port 443")),
        ),
        probe(
            "2001:db8::10",
            Tcp,
            443,
            WEB,
            Some(("web", "2001:db8::10 tcp port 443")),
        ),
        probe(
            "2001:db8::10",
            Udp,
            80,
            WEB,
            Some(("web", "2001:db8::10 udp port 80")),
        ),
        probe(
            "192.0.2.53",
            Udp,
            53,
            [53; CONFIGS],
            Some(("dns", "192.0.2.53 udp port 53")),
        ),
        probe(
            "2001:db8::53",
            Udp,
            53,
            [53; CONFIGS],
            Some(("dns", "2001:db8::53 udp port 53")),
        ),
        probe(
            "198.51.100.5",
            Tcp,
            8000,
            NET,
            Some(("net", "198.51.100.0/28 tcp port 8000")),
        ),
        probe(
            "2001:db8:1::5",
            Udp,
            8000,
            NET,
            Some(("net", "2001:db8:1::/64 udp port 8000")),
        ),
        probe("192.0.2.10", Tcp, 10000, [100; CONFIGS], None),
        probe("192.0.2.10", Tcp, 12500, [0, 0, 100, 100], None),
        probe("2001:db8::10", Udp, 5000, [50, 0, 50, 0], None),
        probe("192.0.2.10", Tcp, 22, NONE, None),
        probe("2001:db8::10", Tcp, 22, NONE, None),
        probe("192.0.2.10", Tcp, 9999, NONE, None),
        probe("192.0.2.10", Tcp, 14001, NONE, None),
        probe("192.0.2.53", Tcp, 53, NONE, None),
        probe("2001:db8::53", Udp, 54, NONE, None),
        probe("198.51.100.5", Udp, 8001, NONE, None),
    ]
}

/// Every mark any probe may carry, 0 included.
pub fn all_marks(probes: &[Probe]) -> BTreeSet<u32> {
    let mut marks: BTreeSet<u32> = probes.iter().flat_map(|p| p.marks).collect();
    marks.insert(0);
    marks
}

/// The distinct destinations (the VIPs the lab sets up).
pub fn vips(probes: &[Probe]) -> Vec<IpAddr> {
    let set: BTreeSet<IpAddr> = probes.iter().map(|p| p.dst).collect();
    set.into_iter().collect()
}

/// A rule's identity across configs: its service's name and its match.
pub type RuleId = (String, String);

/// What each config holds, as fwmark names it in `status` and `/metrics`:
/// the rules (for counter continuity) and the config's hash (to recognize
/// it in `status`). Compiled with fwmark's own compiler: these are names,
/// not the marks the soak checks against.
pub struct Catalog {
    pub texts: Vec<String>,
    pub sha256: Vec<String>,
    pub rules: Vec<BTreeSet<RuleId>>,
    /// Rules per service, per config.
    pub services: Vec<BTreeMap<String, BTreeSet<String>>>,
}

impl Catalog {
    pub fn new() -> Result<Catalog> {
        let mut catalog = Catalog {
            texts: Vec::new(),
            sha256: Vec::new(),
            rules: Vec::new(),
            services: Vec::new(),
        };
        for k in 0..CONFIGS {
            let text = config_text(k);
            let loaded = fwmark_core::Loaded::from_text(&format!("soak{k}.toml"), text.clone())?;
            let mut rules = BTreeSet::new();
            let mut services: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for r in &loaded.ruleset.rules {
                let name = loaded.config.services[r.service].name.clone();
                rules.insert((name.clone(), r.to_string()));
                services.entry(name).or_default().insert(r.to_string());
            }
            catalog.sha256.push(loaded.sha256);
            catalog.texts.push(text);
            catalog.rules.push(rules);
            catalog.services.push(services);
        }
        Ok(catalog)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_config_is_valid_and_names_the_fixed_rules() {
        let catalog = Catalog::new().unwrap();
        for probe in probes() {
            if let Some((service, rule)) = probe.rule {
                for k in 0..CONFIGS {
                    assert!(
                        catalog.rules[k].contains(&(service.to_string(), rule.to_string())),
                        "config {k} lacks {service}: {rule}"
                    );
                }
            }
        }
        // The bulk rule is renamed by its range every time; toggle comes and goes.
        assert_ne!(catalog.rules[0], catalog.rules[1]);
        assert!(catalog.services[0].contains_key("toggle"));
        assert!(!catalog.services[1].contains_key("toggle"));
    }

    #[test]
    fn the_expected_marks_agree_with_the_reference_classifier() {
        // The hand-written table, cross-checked against fwmark's userspace
        // reference lookup, so a typo in either shows up here.
        for k in 0..CONFIGS {
            let loaded = fwmark_core::Loaded::from_text("soak.toml", config_text(k)).unwrap();
            for p in probes() {
                let proto = match p.proto {
                    ProbeProto::Tcp => 6,
                    ProbeProto::Udp => 17,
                };
                let got = loaded
                    .ruleset
                    .classify(p.dst, proto, Some(p.port))
                    .map_or(0, |t| t.mark);
                assert_eq!(got, p.marks[k], "config {k}: {}", p.label());
            }
        }
    }
}
