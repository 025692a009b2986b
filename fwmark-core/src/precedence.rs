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

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::ExactPort => "1 (exact address, exact port)",
            Stage::ExactAllPorts => "2 (exact address, every port)",
            Stage::PrefixPort => "3 (longest prefix, port entry)",
            Stage::PrefixAllPorts => "3 (longest prefix, every-port entry)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
