//! Compiles a [`Config`] into the map entries the classifier looks up.
//!
//! Each (service, vip, protocol, port item) becomes one *rule*: one counter
//! slot, like one iptables rule. A rule compiles into entries:
//! - an exact address (/32, /128) with one port: one exact hash entry;
//!   with a port range: one [`RangeEntry`] (kept as a range, looked up after
//!   the exact port); with every port: one exact entry with port 0. An
//!   address with more than [`MAX_RANGES`] ranges of one protocol keeps its
//!   widest [`MAX_RANGES`] as ranges and expands the others, one exact
//!   entry per port;
//! - a shorter prefix goes into the LPM trie, one entry per port (ranges on
//!   prefixes stay expanded; they count against [`MAX_ENTRIES`] port by
//!   port).
//!
//! Two rules that claim the same (address or prefix, protocol, port) with a
//! different mark or mask are a conflict and reject the config; for the port
//! entries of an exact address the conflict names the overlapping ports.
//! With the same mark and mask the first rule owns the entry (the
//! overlapping ports) and a warning says so.

use std::{collections::HashMap, fmt, net::IpAddr};

pub use fwmark_common::MAX_RANGES;
use fwmark_common::{
    ALL_PORTS, FAMILY_IPV4, FAMILY_IPV6, KEY_HEADER_BITS, LPM_LOOKUP_PREFIX_LEN, ServiceKey, Target,
};
use ipnet::IpNet;

use crate::{
    config::{Config, PortRange, Proto},
    precedence::{Rank, best},
    text::{Prefix, RuleText},
};

/// Most map entries one config may compile to: exact entries, prefix
/// entries and port ranges of exact addresses (one each; a range on a
/// prefix counts one per port).
pub const MAX_ENTRIES: usize = 1 << 22;

/// One counter slot: a (service, vip, protocol, port item) of the config.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Index of the service in the config.
    pub service: usize,
    pub vip: IpNet,
    pub proto: Proto,
    /// `None`: every port.
    pub ports: Option<PortRange>,
}

impl Rule {
    /// What the rule matches, without its service: comparable across configs.
    pub fn matches(&self) -> (IpNet, Proto, Option<PortRange>) {
        (self.vip, self.proto, self.ports)
    }

    /// Where its entries stand in the precedence.
    pub fn rank(&self) -> Rank {
        Rank::of(&self.vip, self.ports)
    }
}

/// `192.0.2.10 tcp port 443`, `198.51.100.0/24 udp all ports`
/// ([`RuleText`]).
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        RuleText {
            vip: &self.vip,
            proto: self.proto,
            ports: self.ports,
        }
        .fmt(f)
    }
}

/// The config's rules in config order: each service's addresses x
/// protocols x port items (`None` when it has no `ports`: every port). The
/// one enumeration: its order numbers the counter slots of a fresh config,
/// and the ruleset and the model both walk it.
pub fn rules(config: &Config) -> impl Iterator<Item = Rule> + '_ {
    config.services.iter().enumerate().flat_map(|(service, s)| {
        let items = s.ports.as_ref().map_or(1, Vec::len);
        s.vips.iter().flat_map(move |&vip| {
            s.protos.iter().flat_map(move |&proto| {
                (0..items).map(move |i| Rule {
                    service,
                    vip,
                    proto,
                    ports: s.ports.as_ref().map(|ps| ps[i]),
                })
            })
        })
    })
}

/// A prefix entry: the LPM trie key (`prefix_len` counts the key header and
/// the address prefix) and its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixEntry {
    pub prefix_len: u32,
    pub key: ServiceKey,
    pub target: Target,
}

/// A port range of an exact address: ports `lo..=hi` of the key's family,
/// protocol and address get `target`. The ranges of one key are disjoint,
/// at most [`MAX_RANGES`], and listed together in port order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeEntry {
    /// Family, protocol and address; port [`ALL_PORTS`].
    pub key: ServiceKey,
    pub lo: u16,
    pub hi: u16,
    pub target: Target,
}

/// Everything the datapath needs for one configuration generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub rules: Vec<Rule>,
    pub exact: Vec<(ServiceKey, Target)>,
    pub prefix: Vec<PrefixEntry>,
    /// Port ranges of exact addresses, grouped by key, in port order.
    pub ranges: Vec<RangeEntry>,
    /// Things that are legal but worth telling the operator.
    pub warnings: Vec<String>,
    /// The config's `icmp_errors`: published with the entries, in the same
    /// generation word.
    pub icmp_errors: bool,
}

/// Two services claim one entry with different marks.
#[derive(Debug, thiserror::Error)]
#[error(
    "{file}: services {first:?} (line {first_line}) and {second:?} (line {second_line}) \
     both claim {entry} with different marks ({first_mark:#x}/{first_mask:#x} and \
     {second_mark:#x}/{second_mask:#x}); remove the entry from one of them"
)]
pub struct Conflict {
    pub file: String,
    pub entry: String,
    pub first: String,
    pub first_line: usize,
    pub first_mark: u32,
    pub first_mask: u32,
    pub second: String,
    pub second_line: usize,
    pub second_mark: u32,
    pub second_mask: u32,
}

/// A config that cannot be turned into map entries.
#[derive(Debug, thiserror::Error)]
pub enum RulesetError {
    #[error(transparent)]
    Conflict(Box<Conflict>),
    #[error(
        "{file}: the config expands to {entries} map entries, more than the {max} fwmark \
         supports; use fewer or narrower port ranges on prefixes, or a prefix instead of many \
         addresses"
    )]
    TooLarge {
        file: String,
        entries: usize,
        max: usize,
    },
}

/// Family and address bytes of a map key.
fn family_and_addr(addr: IpAddr) -> (u8, [u8; 16]) {
    let mut bytes = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            (FAMILY_IPV4, bytes)
        }
        IpAddr::V6(a) => (FAMILY_IPV6, a.octets()),
    }
}

/// The exact-match key for (addr, proto, port); port 0 = every port.
pub fn service_key(addr: IpAddr, proto: u8, port: u16) -> ServiceKey {
    let (family, addr) = family_and_addr(addr);
    ServiceKey {
        family,
        proto,
        port: port.to_be_bytes(),
        addr: ServiceKey::addr_words(addr),
    }
}

/// LPM `prefix_len` of an entry for an address prefix of `bits` bits.
pub fn lpm_prefix_len(bits: u8) -> u32 {
    KEY_HEADER_BITS + u32::from(bits)
}

impl Ruleset {
    /// How many map entries `config` compiles to before precedence folds
    /// them, per service: addresses x protocols x port items, where a port
    /// item of a prefix counts one per port (ranges on prefixes are
    /// expanded) and one of an exact address counts once.
    pub fn expansion(config: &Config) -> usize {
        config
            .services
            .iter()
            .map(|s| {
                let items = s.ports.as_ref().map_or(1, Vec::len);
                let ports = s
                    .ports
                    .as_ref()
                    .map_or(1, |ps| ps.iter().map(|p| p.len()).sum());
                let per_proto: usize = s
                    .vips
                    .iter()
                    .map(|v| if Prefix(v).is_host() { items } else { ports })
                    .sum();
                per_proto * s.protos.len()
            })
            .sum()
    }

    /// Compiles a validated config.
    pub fn compile(config: &Config) -> Result<Ruleset, RulesetError> {
        let entries = Ruleset::expansion(config);
        if entries > MAX_ENTRIES {
            return Err(RulesetError::TooLarge {
                file: config.source.clone(),
                entries,
                max: MAX_ENTRIES,
            });
        }

        // The entries claimed so far, by (prefix_len, key): their index in
        // `exact`, or in `prefix` with IN_PREFIX set. Indexes only (4 bytes
        // a slot, the keys stay in the entries), so the table of a million
        // entries stays in the CPU's cache.
        use std::hash::BuildHasher as _;
        const IN_PREFIX: u32 = 1 << 31;
        let hasher = foldhash::fast::FixedState::default();
        let key_of = |rs: &Ruleset, i: u32| {
            if i & IN_PREFIX == 0 {
                (LPM_LOOKUP_PREFIX_LEN, rs.exact[i as usize].0)
            } else {
                let e = &rs.prefix[(i & !IN_PREFIX) as usize];
                (e.prefix_len, e.key)
            }
        };
        let mut owner: hashbrown::HashTable<u32> = hashbrown::HashTable::with_capacity(entries);
        // The port entries of exact addresses: per (family, protocol,
        // address), the disjoint port intervals claimed, in port order.
        let mut claimed: HashMap<ServiceKey, usize> = HashMap::new();
        let mut groups: Vec<(ServiceKey, Vec<Claim>)> = Vec::new();
        let mut rs = Ruleset {
            icmp_errors: config.icmp_errors,
            ..Ruleset::default()
        };
        for rule in rules(config) {
            let service = &config.services[rule.service];
            let (vip, proto, ports) = (&rule.vip, rule.proto, rule.ports);
            let index = u32::try_from(rs.rules.len()).expect("rules fit in u32");
            let exact = Prefix(vip).is_host();
            let (lo, hi) = ports.map_or((ALL_PORTS, ALL_PORTS), |p| (p.lo, p.hi));
            rs.rules.push(rule.clone());
            if exact && let Some(range) = ports {
                let key = service_key(vip.network(), proto.number(), ALL_PORTS);
                let g = *claimed.entry(key).or_insert_with(|| {
                    groups.push((key, Vec::new()));
                    groups.len() - 1
                });
                let target = Target {
                    mark: service.mark,
                    mask: service.mask,
                    rule: index,
                    prefix_len: u32::from(vip.prefix_len()),
                };
                claim(
                    config,
                    &rs.rules,
                    &mut rs.warnings,
                    &mut groups[g].1,
                    range,
                    target,
                )?;
                continue;
            }
            for port in lo..=hi {
                let key = service_key(vip.network(), proto.number(), port);
                let target = Target {
                    mark: service.mark,
                    mask: service.mask,
                    rule: index,
                    prefix_len: u32::from(vip.prefix_len()),
                };
                let prefix_len = if exact {
                    LPM_LOOKUP_PREFIX_LEN
                } else {
                    lpm_prefix_len(vip.prefix_len())
                };
                // One probe per entry: a new one is inserted where it was looked up.
                let claim = owner.entry(
                    hasher.hash_one((prefix_len, key)),
                    |&i| key_of(&rs, i) == (prefix_len, key),
                    |&i| hasher.hash_one(key_of(&rs, i)),
                );
                if let hashbrown::hash_table::Entry::Occupied(o) = &claim {
                    let i = *o.get();
                    let (in_exact, idx) = (i & IN_PREFIX == 0, (i & !IN_PREFIX) as usize);
                    let owner_rule = if in_exact {
                        rs.exact[idx].1.rule
                    } else {
                        rs.prefix[idx].target.rule
                    } as usize;
                    let existing = if in_exact {
                        rs.exact[idx].1
                    } else {
                        rs.prefix[idx].target
                    };
                    let first = &config.services[rs.rules[owner_rule].service];
                    let entry = describe(vip, proto, port);
                    if (existing.mark, existing.mask) != (target.mark, target.mask) {
                        return Err(RulesetError::Conflict(Box::new(Conflict {
                            file: config.source.clone(),
                            entry,
                            first: first.name.clone(),
                            first_line: first.line,
                            first_mark: existing.mark,
                            first_mask: existing.mask,
                            second: service.name.clone(),
                            second_line: service.line,
                            second_mark: target.mark,
                            second_mask: target.mask,
                        })));
                    }
                    rs.warnings.push(format!(
                        "service {:?} (line {}) repeats {entry}, already claimed by \
                         {:?} (line {}) with the same mark; it counts there",
                        service.name, service.line, first.name, first.line
                    ));
                    continue;
                }
                if exact {
                    claim.or_insert(rs.exact.len() as u32);
                    rs.exact.push((key, target));
                } else {
                    claim.or_insert(rs.prefix.len() as u32 | IN_PREFIX);
                    rs.prefix.push(PrefixEntry {
                        prefix_len,
                        key,
                        target,
                    });
                }
            }
        }
        for (key, claims) in groups {
            // The widest MAX_RANGES ranges stay ranges (ties: the lower
            // ports); single ports and any further ranges are exact entries.
            let mut wide: Vec<&Claim> = claims.iter().filter(|c| c.hi > c.lo).collect();
            wide.sort_by_key(|c| (std::cmp::Reverse(c.hi - c.lo), c.lo));
            wide.truncate(MAX_RANGES);
            wide.sort_by_key(|c| c.lo);
            for c in &claims {
                if wide.iter().any(|w| w.lo == c.lo) {
                    continue;
                }
                for port in c.lo..=c.hi {
                    rs.exact.push((
                        ServiceKey {
                            port: port.to_be_bytes(),
                            ..key
                        },
                        c.target,
                    ));
                }
            }
            rs.ranges.extend(wide.iter().map(|c| RangeEntry {
                key,
                lo: c.lo,
                hi: c.hi,
                target: c.target,
            }));
        }
        if rs.entries() > MAX_ENTRIES {
            return Err(RulesetError::TooLarge {
                file: config.source.clone(),
                entries: rs.entries(),
                max: MAX_ENTRIES,
            });
        }
        Ok(rs)
    }

    /// Number of map entries (exact, prefix and port ranges).
    pub fn entries(&self) -> usize {
        self.exact.len() + self.prefix.len() + self.ranges.len()
    }

    /// What the classifier does with a packet to `addr`, `proto`, `port`
    /// (a later fragment: no port), in userspace: the entries that match,
    /// the winner by [`crate::precedence`]. A reference for tests and for
    /// `import`'s check; linear in the number of prefix entries.
    pub fn classify(&self, addr: IpAddr, proto: u8, port: Option<u16>) -> Option<Target> {
        let exact: std::collections::HashMap<ServiceKey, Target> =
            self.exact.iter().copied().collect();
        self.classify_with(&exact, addr, proto, port)
    }

    /// [`Ruleset::classify`] with the exact entries already indexed.
    pub fn classify_with(
        &self,
        exact: &HashMap<ServiceKey, Target>,
        addr: IpAddr,
        proto: u8,
        port: Option<u16>,
    ) -> Option<Target> {
        let all_ports_key = service_key(addr, proto, ALL_PORTS);
        let range_hits = self
            .ranges
            .iter()
            .filter(|r| r.key == all_ports_key && port.is_some_and(|p| r.lo <= p && p <= r.hi))
            .map(|r| r.target);
        let exact_hits = [port, Some(ALL_PORTS)]
            .into_iter()
            .flatten()
            .filter_map(|p| exact.get(&service_key(addr, proto, p)).map(|t| (p, *t)))
            .chain(range_hits.map(|t| (1, t)))
            .map(|(p, t)| {
                let bits = u8::try_from(t.prefix_len).expect("an address length");
                (Rank::new(bits, p == ALL_PORTS), t)
            });
        // An exact address is the longest prefix of its family: no prefix
        // entry outranks an exact hit, so the prefixes need no scan then.
        if let Some((_, t)) = best(exact_hits) {
            return Some(t);
        }
        let (family, bytes) = family_and_addr(addr);
        let prefix_hits = self.prefix.iter().filter_map(|e| {
            let bits = e.prefix_len - KEY_HEADER_BITS;
            let key_bytes = e.key.addr_bytes();
            let entry_port = u16::from_be_bytes(e.key.port);
            let hit = e.key.family == family
                && e.key.proto == proto
                && (entry_port == ALL_PORTS || Some(entry_port) == port)
                && (0..bits as usize).all(|b| {
                    let mask = 0x80u8 >> (b % 8);
                    key_bytes[b / 8] & mask == bytes[b / 8] & mask
                });
            let bits = u8::try_from(bits).expect("an address length");
            hit.then_some((Rank::new(bits, entry_port == ALL_PORTS), e.target))
        });
        best(prefix_hits).map(|(_, t)| t)
    }
}

/// A port interval of an exact address claimed by one rule.
struct Claim {
    lo: u16,
    hi: u16,
    target: Target,
}

/// Claims `range` of one exact (family, protocol, address) for the rule of
/// `target`: the ports already claimed by an earlier rule stay theirs (a
/// warning with the same mark and mask, a conflict otherwise, naming the
/// overlapping ports); the rest are added to `claims` (disjoint, in port
/// order).
fn claim(
    config: &Config,
    rules: &[Rule],
    warnings: &mut Vec<String>,
    claims: &mut Vec<Claim>,
    range: PortRange,
    target: Target,
) -> Result<(), RulesetError> {
    let rule = &rules[target.rule as usize];
    let service = &config.services[rule.service];
    let (lo, hi) = (range.lo, range.hi);
    let start = claims.partition_point(|c| c.hi < lo);
    let mut end = start;
    let mut free = Vec::new();
    let mut next = u32::from(lo);
    while end < claims.len() && claims[end].lo <= hi {
        let c = &claims[end];
        let first = &config.services[rules[c.target.rule as usize].service];
        let entry = RuleText {
            vip: &rule.vip,
            proto: rule.proto,
            ports: Some(PortRange {
                lo: c.lo.max(lo),
                hi: c.hi.min(hi),
            }),
        }
        .to_string();
        if (c.target.mark, c.target.mask) != (target.mark, target.mask) {
            return Err(RulesetError::Conflict(Box::new(Conflict {
                file: config.source.clone(),
                entry,
                first: first.name.clone(),
                first_line: first.line,
                first_mark: c.target.mark,
                first_mask: c.target.mask,
                second: service.name.clone(),
                second_line: service.line,
                second_mark: target.mark,
                second_mask: target.mask,
            })));
        }
        warnings.push(format!(
            "service {:?} (line {}) repeats {entry}, already claimed by \
             {:?} (line {}) with the same mark; it counts there",
            service.name, service.line, first.name, first.line
        ));
        if next < u32::from(c.lo) {
            free.push((next as u16, c.lo - 1));
        }
        next = u32::from(c.hi) + 1;
        end += 1;
    }
    if next <= u32::from(hi) {
        free.push((next as u16, hi));
    }
    if free.is_empty() {
        return Ok(());
    }
    let mut merged: Vec<Claim> = claims.drain(start..end).collect();
    merged.extend(free.into_iter().map(|(lo, hi)| Claim { lo, hi, target }));
    merged.sort_by_key(|c| c.lo);
    claims.splice(start..start, merged);
    Ok(())
}

/// One entry as a rule of one port (or of every port) would say it.
fn describe(vip: &IpNet, proto: Proto, port: u16) -> String {
    RuleText {
        vip,
        proto,
        ports: (port != ALL_PORTS).then_some(PortRange { lo: port, hi: port }),
    }
    .to_string()
}

/// Parses and compiles config text, for unit tests.
#[cfg(test)]
pub(crate) fn compile_text(text: &str) -> (Config, Ruleset) {
    let config = Config::parse(text, "t").expect("valid test config");
    let ruleset = Ruleset::compile(&config).expect("compilable test config");
    (config, ruleset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(text: &str) -> Result<Ruleset, RulesetError> {
        Ruleset::compile(&Config::parse(text, "t.toml").unwrap())
    }

    #[test]
    fn key_encoding_is_network_order_and_zero_padded() {
        let k = service_key("192.0.2.10".parse().unwrap(), 6, 443);
        assert_eq!(k.family, FAMILY_IPV4);
        assert_eq!(k.proto, 6);
        assert_eq!(k.port, [0x01, 0xbb]);
        assert_eq!(
            k.addr_bytes(),
            [192, 0, 2, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        // The key's bytes in memory: family, protocol, port, address.
        assert_eq!(
            [
                std::mem::offset_of!(ServiceKey, family),
                std::mem::offset_of!(ServiceKey, proto),
                std::mem::offset_of!(ServiceKey, port),
                std::mem::offset_of!(ServiceKey, addr),
            ],
            [0, 1, 2, 4]
        );
        let k6 = service_key("2001:db8::10".parse().unwrap(), 17, 53);
        assert_eq!(k6.family, FAMILY_IPV6);
        assert_eq!(k6.addr_bytes()[0..2], [0x20, 0x01]);
        assert_eq!(k6.addr_bytes()[15], 0x10);
        assert_eq!(lpm_prefix_len(24), 56);
    }

    #[test]
    fn ports_are_entries_and_ranges_stay_ranges() {
        let rs = compile(
            "[[service]]\nvip = [\"192.0.2.10\", \"2001:db8::10\"]\nproto = [\"tcp\", \"udp\"]\n\
             ports = [21, \"10000-10002\"]\nmark = 21\n",
        )
        .unwrap();
        // 2 vips * 2 protos * 2 port items
        assert_eq!(rs.rules.len(), 8);
        // 2 vips * 2 protos: port 21 exact, 10000-10002 one range each.
        assert_eq!((rs.exact.len(), rs.ranges.len()), (4, 4));
        assert!(rs.prefix.is_empty());
        assert!(
            rs.exact
                .iter()
                .all(|(_, t)| t.mark == 21 && t.mask == u32::MAX)
        );
        assert!(
            rs.exact
                .iter()
                .all(|(k, _)| u16::from_be_bytes(k.port) == 21)
        );
        for r in &rs.ranges {
            assert_eq!((r.lo, r.hi, r.key.port), (10000, 10002, [0, 0]));
            let rule = &rs.rules[r.target.rule as usize];
            assert_eq!(rule.proto.number(), r.key.proto);
            assert_eq!(
                rule.ports,
                Some(PortRange {
                    lo: 10000,
                    hi: 10002
                })
            );
        }
        let addr: IpAddr = "192.0.2.10".parse().unwrap();
        assert_eq!(rs.classify(addr, 6, Some(10001)).map(|t| t.mark), Some(21));
        assert_eq!(rs.classify(addr, 6, Some(10003)), None);
        assert_eq!(rs.classify(addr, 6, None), None);
    }

    #[test]
    fn ftp_passive_range_is_one_entry_per_vip() {
        let rs = compile(
            "[[service]]\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [21, \"10000-20000\"]\nmark = 21\n",
        )
        .unwrap();
        assert_eq!(rs.entries(), 2);
        assert!(rs.entries() <= 64);
    }

    #[test]
    fn a_range_split_by_earlier_ports_keeps_precedence_and_owners() {
        let rs = compile(
            "[[service]]\nname = \"a\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [100, \"200-300\"]\nmark = 1\n\
             [[service]]\nname = \"b\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [\"50-400\"]\nmark = 1\n\
             [[service]]\nname = \"c\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nmark = 3\n",
        )
        .unwrap();
        // b keeps 50-99, 101-199, 301-400; 100 and 200-300 stay a's.
        assert_eq!(rs.warnings.len(), 2, "{:?}", rs.warnings);
        let addr: IpAddr = "192.0.2.10".parse().unwrap();
        let rule = |p| rs.classify(addr, 6, Some(p)).map(|t| t.rule);
        assert_eq!(
            [
                rule(50),
                rule(99),
                rule(100),
                rule(101),
                rule(250),
                rule(301),
                rule(400)
            ],
            [
                Some(2),
                Some(2),
                Some(0),
                Some(2),
                Some(1),
                Some(2),
                Some(2)
            ]
        );
        // Outside every range: the all-ports entry.
        assert_eq!(rule(401), Some(3));
        assert_eq!(rule(49), Some(3));
    }

    #[test]
    fn overlapping_ranges_with_different_marks_are_a_conflict() {
        let err = compile(
            "[[service]]\nname = \"a\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [\"1000-2000\"]\nmark = 1\n\
             [[service]]\nname = \"b\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [\"1500-2500\"]\nmark = 2\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("192.0.2.10 tcp port 1500-2000"), "{err}");
        assert!(
            err.contains("\"a\" (line 1)") && err.contains("\"b\" (line 7)"),
            "{err}"
        );
    }

    #[test]
    fn more_ranges_than_a_table_holds_expand_the_narrowest() {
        let ports: Vec<String> = (0..10)
            .map(|i| format!("\"{}-{}\"", 1000 + i * 100, 1000 + i * 100 + 1 + i))
            .collect();
        let rs = compile(&format!(
            "[[service]]\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [{}]\nmark = 1\n",
            ports.join(", ")
        ))
        .unwrap();
        assert_eq!(rs.ranges.len(), MAX_RANGES);
        // The two narrowest (2 and 3 ports) are expanded.
        assert_eq!(rs.exact.len(), 2 + 3);
        let lows: Vec<u16> = rs.ranges.iter().map(|r| r.lo).collect();
        assert!(lows.windows(2).all(|w| w[0] < w[1]), "{lows:?}");
        let addr: IpAddr = "192.0.2.10".parse().unwrap();
        for i in 0..10u16 {
            let lo = 1000 + i * 100;
            for p in [lo, lo + 1 + i] {
                assert!(rs.classify(addr, 6, Some(p)).is_some(), "port {p}");
            }
            assert!(rs.classify(addr, 6, Some(lo + 2 + i)).is_none());
        }
    }

    #[test]
    fn prefixes_go_to_the_trie_and_all_ports_is_port_zero() {
        let rs =
            compile("[[service]]\nvip = \"198.51.100.0/24\"\nproto = \"tcp\"\nmark = 9\n").unwrap();
        assert!(rs.exact.is_empty());
        assert_eq!(rs.prefix.len(), 1);
        let e = rs.prefix[0];
        assert_eq!(e.prefix_len, 32 + 24);
        assert_eq!(e.key.port, [0, 0]);
        assert_eq!(e.target.prefix_len, 24);
        assert_eq!(e.key.addr_bytes()[..4], [198, 51, 100, 0]);
    }

    #[test]
    fn conflicting_marks_name_both_services() {
        let err = compile(
            "[[service]]\nname = \"web\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [80, 443]\nmark = 80\n\
             [[service]]\nname = \"alt\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [\"440-450\"]\nmark = 81\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("\"web\" (line 1)"), "{err}");
        assert!(err.contains("\"alt\" (line 7)"), "{err}");
        assert!(err.contains("192.0.2.10 tcp port 443"), "{err}");
    }

    #[test]
    fn same_mark_overlap_is_a_warning_and_first_owns_it() {
        let rs = compile(
            "[[service]]\nname = \"a\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [80]\nmark = 80\n\
             [[service]]\nname = \"b\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [\"80-81\"]\nmark = 80\n",
        )
        .unwrap();
        assert_eq!(rs.exact.len(), 2);
        assert_eq!(rs.warnings.len(), 1);
        assert!(rs.warnings[0].contains("already claimed by \"a\""));
        assert_eq!(rs.exact[0].1.rule, 0);
    }

    #[test]
    fn exact_and_prefix_with_different_marks_are_not_a_conflict() {
        let rs = compile(
            "[[service]]\nvip = \"192.0.2.0/24\"\nproto = \"tcp\"\nports = [80]\nmark = 1\n\
             [[service]]\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [80]\nmark = 2\n",
        )
        .unwrap();
        assert_eq!((rs.exact.len(), rs.prefix.len()), (1, 1));
    }

    #[test]
    fn refuses_configs_beyond_the_entry_limit() {
        // A range on a prefix stays expanded: 65 prefixes * 65535 ports =
        // 4,259,775 entries > 2^22.
        let vips: Vec<String> = (1..=65).map(|i| format!("\"10.{i}.0.0/16\"")).collect();
        let err = compile(&format!(
            "[[service]]\nvip = [{}]\nproto = \"tcp\"\nports = [\"1-65535\"]\nmark = 1\n",
            vips.join(", ")
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("expands to 4259775 map entries"), "{err}");
        assert!(err.contains("more than the 4194304"), "{err}");
        // On exact addresses a range is one entry: 2,000 VIPs x 1024-65535.
        let vips: Vec<String> = (0..2000)
            .map(|i| format!("\"10.0.{}.{}\"", i / 250, 1 + i % 250))
            .collect();
        let rs = compile(&format!(
            "[[service]]\nvip = [{}]\nproto = \"tcp\"\nports = [\"1024-65535\"]\nmark = 1\n",
            vips.join(", ")
        ))
        .unwrap();
        assert_eq!((rs.entries(), rs.ranges.len()), (2000, 2000));
    }
}
