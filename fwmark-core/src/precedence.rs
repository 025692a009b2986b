//! fwmark's precedence, defined once: which of the entries that match a
//! packet marks it.
//!
//! 1. the exact address with the packet's port;
//! 2. the exact address, every port;
//! 3. the longest prefix; at equal length a port entry before an every-port
//!    entry.
//!
//! An exact address is the longest prefix of its family, so one order says
//! it all: the longer prefix first, then the port entry. [`Rank`] is that
//! order; the compiled lookup ([`crate::ruleset::Ruleset::classify`]), the
//! model, `explain`'s lower-precedence matches and `export`'s rule order
//! all sort by it. Among rules of equal rank the first in config order owns
//! the entry ([`best`]). The eBPF program implements the same order with
//! its two maps; the differential test holds it against the model.

use std::{cmp::Reverse, fmt};

use ipnet::IpNet;

use crate::{config::PortRange, text::Prefix};

/// Where an entry stands in the precedence: a lower rank wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rank {
    /// Longer prefixes (and exact addresses) first.
    prefix_len: Reverse<u8>,
    /// At equal length, a port entry (`false`) first.
    every_port: bool,
}

impl Rank {
    /// The rank of an entry for a prefix of `prefix_len` bits, for one port
    /// or for every port.
    pub fn new(prefix_len: u8, every_port: bool) -> Rank {
        Rank {
            prefix_len: Reverse(prefix_len),
            every_port,
        }
    }

    /// The rank of a rule's entries: its address or prefix, its ports
    /// (`None`: every port).
    pub fn of(vip: &IpNet, ports: Option<PortRange>) -> Rank {
        Rank::new(vip.prefix_len(), ports.is_none())
    }

    pub fn prefix_len(self) -> u8 {
        self.prefix_len.0
    }

    pub fn every_port(self) -> bool {
        self.every_port
    }
}

/// The winner among `(rank, item)` candidates: the lowest rank, the first
/// of equals (the first rule in config order owns a shared entry).
pub fn best<T>(candidates: impl IntoIterator<Item = (Rank, T)>) -> Option<(Rank, T)> {
    candidates.into_iter().min_by_key(|(rank, _)| *rank)
}

/// The lookup stage an entry is found at, for telling it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// 1. exact address, exact port.
    ExactPort,
    /// Also stage 1: exact address, a port range (a port entry, looked up
    /// after the exact port; ranges of one address never overlap).
    ExactRange,
    /// 2. exact address, every port.
    ExactAllPorts,
    /// 3. a prefix with a port entry.
    PrefixPort,
    /// 3. a prefix with an every-port entry.
    PrefixAllPorts,
}

impl Stage {
    /// The stage of `vip`'s entry, by port or for every port.
    pub fn of(vip: &IpNet, every_port: bool) -> Stage {
        match (Prefix(vip).is_host(), every_port) {
            (true, false) => Stage::ExactPort,
            (true, true) => Stage::ExactAllPorts,
            (false, false) => Stage::PrefixPort,
            (false, true) => Stage::PrefixAllPorts,
        }
    }
}

impl Stage {
    /// The stage of a rule's entries for a packet its ports match: a port
    /// range of an exact address is [`Stage::ExactRange`].
    pub fn of_rule(vip: &IpNet, ports: Option<PortRange>) -> Stage {
        match ports {
            Some(p) if p.lo < p.hi && Prefix(vip).is_host() => Stage::ExactRange,
            _ => Stage::of(vip, ports.is_none()),
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::ExactPort => "1 (exact address, exact port)",
            Stage::ExactRange => "1 (exact address, port range)",
            Stage::ExactAllPorts => "2 (exact address, every port)",
            Stage::PrefixPort => "3 (longest prefix, port entry)",
            Stage::PrefixAllPorts => "3 (longest prefix, every-port entry)",
        })
    }
}

/// The precedence by example, written once: a config of nested prefixes,
/// exact addresses and port / every-port pairs of both families, and what
/// packets to it must get. Checked here against the model and the compiled
/// lookup, and in the test lab against the kernel program
/// (`tests/classifier.rs`).
pub mod examples {
    use fwmark_common::{IPPROTO_TCP as TCP, IPPROTO_UDP as UDP};

    /// The config.
    pub const CONFIG: &str = r#"
[[service]]
name = "net24-all"
vip = "198.51.100.0/24"
proto = "tcp"
mark = 1

[[service]]
name = "net24-80"
vip = "198.51.100.0/24"
proto = "tcp"
ports = [80]
mark = 2

[[service]]
name = "net25-all"
vip = "198.51.100.128/25"
proto = "tcp"
mark = 3

[[service]]
name = "host-all"
vip = "198.51.100.200"
proto = "tcp"
mark = 4

[[service]]
name = "host-443"
vip = "198.51.100.200"
proto = "tcp"
ports = [443]
mark = 5

[[service]]
name = "net16-22"
vip = "198.51.0.0/16"
proto = "tcp"
ports = [22]
mark = 6

[[service]]
name = "v6-48-all"
vip = "2001:db8:1::/48"
proto = ["tcp", "udp"]
mark = 7

[[service]]
name = "v6-64-80"
vip = "2001:db8:1:2::/64"
proto = "tcp"
ports = [80]
mark = 8
"#;

    /// (destination, protocol, port, the mark it gets under [`CONFIG`]).
    pub const CASES: [(&str, u8, u16, Option<u32>); 14] = [
        ("198.51.100.200", TCP, 443, Some(5)), // exact address, exact port
        ("198.51.100.200", TCP, 80, Some(4)),  // exact address all ports beats any prefix
        ("198.51.100.130", TCP, 80, Some(3)),  // /25 all ports beats /24 port 80
        ("198.51.100.10", TCP, 80, Some(2)),   // /24: port before all ports
        ("198.51.100.10", TCP, 81, Some(1)),
        ("198.51.100.255", TCP, 22, Some(3)), // /25 beats /16 port 22
        ("198.51.7.7", TCP, 22, Some(6)),
        ("198.51.7.7", TCP, 23, None),
        ("198.52.0.1", TCP, 22, None),
        ("198.51.100.10", UDP, 80, None),
        ("2001:db8:1:2::5", TCP, 80, Some(8)),
        ("2001:db8:1:2::5", TCP, 81, Some(7)),
        ("2001:db8:1:3::5", UDP, 80, Some(7)),
        ("2001:db8:2::5", TCP, 80, None),
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Config,
        frame::{Frame, L4},
        model::{Model, Outcome},
        ruleset::Ruleset,
    };

    /// The model (from frames built for each case) and the compiled lookup
    /// give every example its mark, at the stage the example names.
    #[test]
    fn the_examples_hold_for_the_model_and_the_compiled_lookup() {
        let config = Config::parse(examples::CONFIG, "examples.toml").unwrap();
        let model = Model::new(&config);
        let ruleset = Ruleset::compile(&config).unwrap();
        for (dst, proto, port, want) in examples::CASES {
            let frame = Frame::new(dst, L4::new(proto, Some(port))).build();
            let modelled = match model.classify(&frame, 0).outcome {
                Outcome::Marked(hit) => Some(hit.mark),
                _ => None,
            };
            assert_eq!(modelled, want, "model: {dst} {proto} {port}");
            let compiled = ruleset.classify(dst.parse().unwrap(), proto, Some(port));
            assert_eq!(
                compiled.map(|t| t.mark),
                want,
                "compiled: {dst} {proto} {port}"
            );
        }
        let stage = |dst: &str, port| {
            let hit = model.lookup(dst.parse().unwrap(), 6, Some(port)).unwrap();
            hit.stage
        };
        assert_eq!(stage("198.51.100.200", 443), Stage::ExactPort);
        assert_eq!(stage("198.51.100.200", 80), Stage::ExactAllPorts);
        assert_eq!(stage("198.51.100.10", 80), Stage::PrefixPort);
        assert_eq!(stage("198.51.100.130", 80), Stage::PrefixAllPorts);
    }

    fn rank(vip: &str, every_port: bool) -> Rank {
        Rank::new(vip.parse::<IpNet>().unwrap().prefix_len(), every_port)
    }

    #[test]
    fn exact_then_longest_prefix_then_port_before_every_port() {
        let order = [
            rank("192.0.2.10/32", false),
            rank("192.0.2.10/32", true),
            rank("198.51.100.128/25", false),
            rank("198.51.100.128/25", true),
            rank("198.51.100.0/24", false),
            rank("198.51.100.0/24", true),
            rank("0.0.0.0/0", false),
            rank("0.0.0.0/0", true),
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        let v6 = [rank("2001:db8::10/128", true), rank("2001:db8::/64", false)];
        assert!(v6[0] < v6[1]);
    }

    #[test]
    fn the_first_of_equals_wins() {
        let r = rank("192.0.2.0/24", false);
        let won = best([(rank("192.0.2.0/24", true), "all"), (r, "a"), (r, "b")]);
        assert_eq!(won, Some((r, "a")));
        assert_eq!(best(Vec::<(Rank, ())>::new()), None);
    }

    #[test]
    fn stages_follow_exactness_and_ports() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(Stage::of(&net("192.0.2.1/32"), false), Stage::ExactPort);
        assert_eq!(
            Stage::of(&net("2001:db8::1/128"), true),
            Stage::ExactAllPorts
        );
        assert_eq!(Stage::of(&net("192.0.2.0/24"), false), Stage::PrefixPort);
        assert_eq!(Stage::of(&net("::/0"), true), Stage::PrefixAllPorts);
    }
}
