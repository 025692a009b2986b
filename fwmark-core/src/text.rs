//! The words fwmark reads and writes, each defined once: an address or
//! prefix, a rule, a mark, a protocol, a number. Messages, `status`, the
//! metrics' labels, `diff`, `explain`, `import` and `export` all use these.

use std::fmt;

use fwmark_common::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};
use ipnet::IpNet;

/// ICMP's protocol number.
pub const IPPROTO_ICMP: u8 = 1;
/// ICMPv6's protocol number.
pub const IPPROTO_ICMPV6: u8 = 58;

/// An address or prefix as fwmark writes it: a host (/32, /128) as the
/// address alone (`192.0.2.10`), a shorter prefix with its length
/// (`198.51.100.0/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix<'a>(pub &'a IpNet);

impl Prefix<'_> {
    /// True for a host address (/32, /128): an exact entry.
    pub fn is_host(&self) -> bool {
        self.0.prefix_len() == self.0.max_prefix_len()
    }
}

impl fmt::Display for Prefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_host() {
            write!(f, "{}", self.0.addr())
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// What a rule matches: `192.0.2.10 tcp port 443`,
/// `198.51.100.0/24 udp port 1000-2000`, `2001:db8::10 sctp all ports`.
/// The metrics label rules with it (docs/metrics.md), so it is stable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleText<'a, P, R> {
    pub vip: &'a IpNet,
    pub proto: P,
    /// The port or range (`config::PortRange`); `None`: every port.
    pub ports: Option<R>,
}

impl<P: fmt::Display, R: fmt::Display> fmt::Display for RuleText<'_, P, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", Prefix(self.vip), self.proto)?;
        match &self.ports {
            Some(p) => write!(f, " port {p}"),
            None => f.write_str(" all ports"),
        }
    }
}

/// A mark as fwmark writes it: `0x50` with the whole mask, `0x4000/0x4000`
/// with a partial one.
pub fn mark(mark: u32, mask: u32) -> String {
    if mask == u32::MAX {
        format!("{mark:#x}")
    } else {
        format!("{mark:#x}/{mask:#x}")
    }
}

/// A number in decimal or with a `0x` (`0X`) prefix in hex.
pub fn parse_u64(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// A 32-bit number (a mark or a mask) in decimal or `0x` hex.
pub fn parse_u32(text: &str) -> Option<u32> {
    parse_u64(text).and_then(|n| u32::try_from(n).ok())
}

/// The protocol names fwmark knows, in either case.
const PROTOCOLS: [(&str, u8); 7] = [
    ("tcp", IPPROTO_TCP),
    ("udp", IPPROTO_UDP),
    ("sctp", IPPROTO_SCTP),
    ("icmp", IPPROTO_ICMP),
    ("ipv6-icmp", IPPROTO_ICMPV6),
    ("icmpv6", IPPROTO_ICMPV6),
    ("icmp6", IPPROTO_ICMPV6),
];

/// An IP protocol by name (`tcp`, `udp`, `sctp`, `icmp`, `ipv6-icmp`, in
/// any case) or, with `numbers`, by number (`0`-`255`).
pub fn parse_proto(word: &str, numbers: bool) -> Option<u8> {
    PROTOCOLS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(word))
        .map(|&(_, n)| n)
        .or_else(|| numbers.then(|| word.parse().ok()).flatten())
}

/// A protocol's name for messages: `tcp`, `udp`, `sctp`, `icmp (1)`,
/// `ipv6-icmp (58)`, or `protocol N`.
pub fn proto_name(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_SCTP => "sctp".into(),
        IPPROTO_ICMP => "icmp (1)".into(),
        IPPROTO_ICMPV6 => "ipv6-icmp (58)".into(),
        n => format!("protocol {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PortRange;

    #[test]
    fn hosts_lose_their_length_prefixes_keep_it() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(Prefix(&net("192.0.2.10/32")).to_string(), "192.0.2.10");
        assert_eq!(Prefix(&net("2001:db8::10/128")).to_string(), "2001:db8::10");
        assert_eq!(
            Prefix(&net("198.51.100.0/24")).to_string(),
            "198.51.100.0/24"
        );
        assert_eq!(Prefix(&net("::/0")).to_string(), "::/0");
        let rule = |vip: &str, ports| {
            RuleText {
                vip: &net(vip),
                proto: "udp",
                ports,
            }
            .to_string()
        };
        assert_eq!(
            rule("192.0.2.10/32", Some(PortRange { lo: 53, hi: 53 })),
            "192.0.2.10 udp port 53"
        );
        assert_eq!(
            rule("198.51.100.0/24", Some(PortRange { lo: 1, hi: 9 })),
            "198.51.100.0/24 udp port 1-9"
        );
        assert_eq!(rule("2001:db8::/32", None), "2001:db8::/32 udp all ports");
    }

    #[test]
    fn marks_and_numbers() {
        assert_eq!(mark(0x50, u32::MAX), "0x50");
        assert_eq!(mark(0x4000, 0x4000), "0x4000/0x4000");
        assert_eq!(parse_u32("80"), Some(80));
        assert_eq!(parse_u32("0x50"), Some(0x50));
        assert_eq!(parse_u32("0XfF"), Some(0xff));
        assert_eq!(parse_u32("0xffffffff"), Some(u32::MAX));
        assert_eq!(parse_u32("0x100000000"), None);
        assert_eq!(parse_u32("4294967296"), None);
        assert_eq!(parse_u32("0x"), None);
        assert_eq!(parse_u32("-1"), None);
        assert_eq!(parse_u32("ten"), None);
        assert_eq!(parse_u64("0x100000000"), Some(1 << 32));
    }

    #[test]
    fn protocols_by_name_and_number() {
        assert_eq!(parse_proto("TCP", false), Some(6));
        assert_eq!(parse_proto("sctp", false), Some(132));
        assert_eq!(parse_proto("icmp6", false), Some(58));
        assert_eq!(parse_proto("17", false), None);
        assert_eq!(parse_proto("17", true), Some(17));
        assert_eq!(parse_proto("256", true), None);
        assert_eq!(parse_proto("gre", true), None);
        assert_eq!(proto_name(47), "protocol 47");
        assert_eq!(proto_name(58), "ipv6-icmp (58)");
    }
}
