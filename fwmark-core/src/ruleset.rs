//! Compiles a [`Config`] into the map entries the classifier looks up.
//!
//! Each (service, vip, protocol, port item) becomes one *rule*: one counter
//! slot, like one iptables rule. A rule expands into entries:
//! - an exact address (/32, /128) goes into the hash map, one entry per port
//!   (a range is expanded; "every port" is one entry with port 0);
//! - a shorter prefix goes into the LPM trie, likewise one entry per port.
//!
//! Two rules that claim the same (address or prefix, protocol, port) with a
//! different mark or mask are a conflict and reject the config. With the
//! same mark and mask the first rule owns the entry and a warning says so.

use std::{collections::HashMap, fmt, net::IpAddr};

use fwmark_common::{
    ALL_PORTS, FAMILY_IPV4, FAMILY_IPV6, KEY_HEADER_BITS, LPM_LOOKUP_PREFIX_LEN, ServiceKey, Target,
};
use ipnet::IpNet;

use crate::{
    config::{Config, PortRange, Proto},
    precedence::{Rank, best},
    text::{Prefix, RuleText},
};

/// Most map entries one config may expand to (ranges count one per port).
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

/// Everything the datapath needs for one configuration generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub rules: Vec<Rule>,
    pub exact: Vec<(ServiceKey, Target)>,
    pub prefix: Vec<PrefixEntry>,
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
         supports; use fewer or narrower port ranges, or a prefix instead of many addresses"
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
    /// How many map entries `config` expands to before precedence folds
    /// them (addresses x protocols x ports, per service).
    pub fn expansion(config: &Config) -> usize {
        config
            .services
            .iter()
            .map(|s| {
                let ports = s
                    .ports
                    .as_ref()
                    .map_or(1, |ps| ps.iter().map(|p| p.len()).sum());
                s.vips.len() * s.protos.len() * ports
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
        Ok(rs)
    }

    /// Number of map entries (exact plus prefix).
    pub fn entries(&self) -> usize {
        self.exact.len() + self.prefix.len()
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
        let exact_hits = [port, Some(ALL_PORTS)]
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let t = exact.get(&service_key(addr, proto, p))?;
                let bits = u8::try_from(t.prefix_len).expect("an address length");
                Some((Rank::new(bits, p == ALL_PORTS), *t))
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
    fn expands_ports_ranges_vips_and_protos() {
        let rs = compile(
            "[[service]]\nvip = [\"192.0.2.10\", \"2001:db8::10\"]\nproto = [\"tcp\", \"udp\"]\n\
             ports = [21, \"10000-10002\"]\nmark = 21\n",
        )
        .unwrap();
        // 2 vips * 2 protos * 2 port items
        assert_eq!(rs.rules.len(), 8);
        // 2 vips * 2 protos * 4 ports
        assert_eq!(rs.exact.len(), 16);
        assert!(rs.prefix.is_empty());
        assert!(
            rs.exact
                .iter()
                .all(|(_, t)| t.mark == 21 && t.mask == u32::MAX)
        );
        let ports: Vec<u16> = rs
            .exact
            .iter()
            .filter(|(k, _)| k.family == 4 && k.proto == 6)
            .map(|(k, _)| u16::from_be_bytes(k.port))
            .collect();
        assert_eq!(ports, vec![21, 10000, 10001, 10002]);
        // Every entry points at a rule of its own vip/proto.
        for (k, t) in &rs.exact {
            let rule = &rs.rules[t.rule as usize];
            assert_eq!(rule.proto.number(), k.proto);
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
        // 65 addresses * 65535 ports = 4,259,775 entries > 2^22.
        let vips: Vec<String> = (1..=65).map(|i| format!("\"192.0.2.{i}\"")).collect();
        let err = compile(&format!(
            "[[service]]\nvip = [{}]\nproto = \"tcp\"\nports = [\"1-65535\"]\nmark = 1\n",
            vips.join(", ")
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("expands to 4259775 map entries"), "{err}");
        assert!(err.contains("more than the 4194304"), "{err}");
    }
}
