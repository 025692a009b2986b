//! `fwmark explain`: what the classifier does with one packet under a
//! config, from the reference model ([`crate::model`]): how the frame
//! parses, the lookup key, the stage and entry that match (with the service
//! and its line in the config) and the mark computation, or why nothing
//! matches. No kernel, no privileges.
//!
//! The packet is either described (`tcp 192.0.2.10:443`,
//! `udp [2001:db8::10]:53`, `sctp 192.0.2.90:2905`, `icmp 192.0.2.10`,
//! `proto 47 192.0.2.10`), in which case a frame is built for it, or given
//! as the hex bytes of an Ethernet frame.

use std::{fmt::Write as _, net::IpAddr};

use fwmark_common::{
    Link,
    wire::{ETHERTYPE_IPV4, ETHERTYPE_IPV6},
};

use crate::{
    config::Config,
    frame::{Ext, Frame, L4},
    model::{
        Icmp, Key, Model, Outcome, Parse, Stage, apply_mark, icmp_is_error, is_icmp,
        transport_header_len,
    },
    text::{self, proto_name},
};

/// A packet that cannot be read from the command line; the message says
/// what to write instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

type Result<T, E = InputError> = std::result::Result<T, E>;

macro_rules! bail {
    ($($arg:tt)*) => {
        return Err(InputError(format!($($arg)*)))
    };
}

/// A packet described on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Description {
    pub proto: u8,
    pub dst: IpAddr,
    pub port: Option<u16>,
    /// A fragment at a non-zero offset (no transport header).
    pub later_fragment: bool,
    /// VLAN ids, outermost first (802.1Q tags).
    pub vlans: Vec<u16>,
}

/// How `explain` was asked about a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Described(Description),
    Hex(Vec<u8>),
}

/// `tcp`, `udp`, `sctp`, `icmp`, `ipv6-icmp` or a protocol number.
fn parse_proto(word: &str) -> Result<u8> {
    text::parse_proto(word, true).ok_or_else(|| {
        InputError(format!(
            "{word:?} is not a protocol: use tcp, udp, sctp, icmp, ipv6-icmp or a number 0-255"
        ))
    })
}

/// `192.0.2.10`, `192.0.2.10:443`, `2001:db8::10`, `[2001:db8::10]:443`.
fn parse_destination(text: &str) -> Result<(IpAddr, Option<u16>)> {
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| InputError(format!("{p:?} in {text:?} is not a port number (0-65535)")))
    };
    if let Some(rest) = text.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            bail!("{text:?}: an IPv6 address in brackets needs the closing `]`");
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| InputError(format!("{addr:?} is not an IPv6 address")))?;
        return match after {
            "" => Ok((addr, None)),
            _ => match after.strip_prefix(':') {
                Some(p) => Ok((addr, Some(port(p)?))),
                None => bail!("{text:?}: write the port as [ADDRESS]:PORT"),
            },
        };
    }
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Ok((addr, None));
    }
    match text.rsplit_once(':') {
        Some((addr, p)) if !addr.contains(':') => {
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| InputError(format!("{addr:?} is not an IP address")))?;
            Ok((addr, Some(port(p)?)))
        }
        _ => bail!(
            "{text:?} is not an address: write 192.0.2.10:443, or [2001:db8::10]:443 for IPv6"
        ),
    }
}

/// Hex digits of a frame, with optional spaces, colons or a `0x` prefix.
pub fn parse_hex(text: &str) -> Result<Vec<u8>> {
    let text = text.trim();
    let text = text.strip_prefix("0x").unwrap_or(text);
    let digits: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':' && *c != '-')
        .collect();
    if let Some(bad) = digits.chars().find(|c| !c.is_ascii_hexdigit()) {
        bail!("{bad:?} is not a hex digit; give the frame as hex bytes (0011aabb...)");
    }
    if !digits.len().is_multiple_of(2) {
        bail!(
            "{} hex digits is an odd number: every byte takes two",
            digits.len()
        );
    }
    Ok((0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("checked hex digits"))
        .collect())
}

/// True when `text` looks like a hex frame rather than a description: only
/// hex digits (and separators), at least an Ethernet header's worth.
fn looks_like_hex(text: &str) -> bool {
    let digits: Vec<char> = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect();
    digits.len() >= 28 && digits.iter().all(|c| c.is_ascii_hexdigit())
}

impl Input {
    /// The packet from the command line's words: a description (`tcp
    /// 192.0.2.10:443`, also as one word) or hex bytes (`--hex`, or
    /// recognised by their form).
    pub fn from_args(
        words: &[String],
        hex: Option<&str>,
        later_fragment: bool,
        vlans: &[u16],
    ) -> Result<Input> {
        let joined = words.join(" ");
        if let Some(h) = hex {
            if !words.is_empty() {
                bail!("give either --hex FRAME or a packet description, not both");
            }
            return Ok(Input::Hex(parse_hex(h)?));
        }
        if looks_like_hex(&joined) {
            if later_fragment || !vlans.is_empty() {
                bail!("--later-fragment and --vlan describe a packet; a hex frame says it all");
            }
            return Ok(Input::Hex(parse_hex(&joined)?));
        }
        let mut parts = joined.split_whitespace();
        let usage = "describe the packet as PROTO DESTINATION, e.g. `tcp 192.0.2.10:443`, \
                     `udp [2001:db8::10]:53` or `proto 47 192.0.2.10`, or give --hex FRAME";
        let Some(first) = parts.next() else {
            bail!("no packet: {usage}");
        };
        let proto = if first.eq_ignore_ascii_case("proto") {
            let Some(n) = parts.next() else {
                bail!("`proto` needs a number: {usage}");
            };
            parse_proto(n)?
        } else {
            parse_proto(first)?
        };
        let Some(dest) = parts.next() else {
            bail!("no destination: {usage}");
        };
        if let Some(extra) = parts.next() {
            bail!("unexpected {extra:?} after the destination: {usage}");
        }
        let (dst, port) = parse_destination(dest)?;
        let has_ports = transport_header_len(proto).is_some();
        match (has_ports, port, later_fragment) {
            (true, None, false) => bail!(
                "{} needs a destination port ({dest}:PORT, or [ADDRESS]:PORT for IPv6), \
                 unless it is a --later-fragment",
                proto_name(proto)
            ),
            (true, Some(_), true) => {
                bail!("a later fragment carries no port: drop the port or --later-fragment")
            }
            (false, Some(_), _) => {
                bail!("{} has no ports: give the address alone", proto_name(proto))
            }
            _ => {}
        }
        if vlans.len() > 3 {
            bail!("at most 3 --vlan tags (the classifier parses 2; a third is not IP)");
        }
        if let Some(v) = vlans.iter().find(|v| **v > 4094) {
            bail!("VLAN id {v} is out of range (0-4094)");
        }
        Ok(Input::Described(Description {
            proto,
            dst,
            port,
            later_fragment,
            vlans: vlans.to_vec(),
        }))
    }

    /// The frame's bytes.
    pub fn frame(&self) -> Vec<u8> {
        match self {
            Input::Hex(bytes) => bytes.clone(),
            Input::Described(d) => d.frame(),
        }
    }

    /// The bytes as a device of kind `link` delivers them: the Ethernet
    /// frame, or for an L3 device the IP packet (a hex input is taken as
    /// given, so it is the IP packet itself there).
    pub fn bytes_on(&self, link: Link) -> Vec<u8> {
        match (self, link) {
            (Input::Hex(bytes), _) => bytes.clone(),
            (Input::Described(d), Link::Ethernet) => d.frame(),
            (Input::Described(d), Link::L3) => d.packet().ip_packet(),
        }
    }
}

impl Description {
    /// An Ethernet frame for the description, by [`crate::frame`]: 802.1Q
    /// tags, a 20-byte IPv4 or 40-byte IPv6 header (plus a fragment header
    /// for an IPv6 later fragment), the transport header and 16 bytes of
    /// payload.
    pub fn frame(&self) -> Vec<u8> {
        self.packet().build()
    }

    /// The description as a [`Frame`] to build.
    fn packet(&self) -> Frame {
        const LATER_OFFSET: u16 = 185; // 1480 bytes: the second fragment of a 1500-byte MTU
        let frame = Frame::to(self.dst, L4::new(self.proto, self.port)).vlan_ids(&self.vlans);
        match (self.later_fragment, self.dst) {
            (false, _) => frame,
            (true, IpAddr::V4(_)) => frame.ipv4_fragment(LATER_OFFSET, false),
            (true, IpAddr::V6(_)) => frame.ipv6_ext(&[Ext::Fragment {
                offset: LATER_OFFSET,
                more: false,
            }]),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The explanation of `frame` arriving with `mark` under `config`, as text.
pub fn explain(config: &Config, frame: &[u8], mark: u32) -> String {
    explain_on(config, Link::Ethernet, frame, mark)
}

/// The skb protocol an L3 device gives `packet`: what tun (without packet
/// information) derives from the IP version nibble, and what a tunnel
/// carrying IPv4 or IPv6 sets; 0 (not IP) for any other version.
pub fn l3_protocol(packet: &[u8]) -> u16 {
    match packet.first().map(|b| b >> 4) {
        Some(4) => ETHERTYPE_IPV4,
        Some(6) => ETHERTYPE_IPV6,
        _ => 0,
    }
}

/// The explanation of `bytes` arriving with `mark` under `config` on a
/// device of kind `link`: an Ethernet frame, or an L3 device's IP packet
/// (its skb protocol by [`l3_protocol`]).
pub fn explain_on(config: &Config, link: Link, bytes: &[u8], mark: u32) -> String {
    let frame = bytes;
    let model = Model::new(config);
    let decision = match link {
        Link::Ethernet => model.classify(frame, mark),
        Link::L3 => model.classify_l3(l3_protocol(frame), frame, mark),
    };
    let mut out = String::new();
    let w = &mut out;
    match link {
        Link::Ethernet => {
            let _ = writeln!(w, "frame: {} bytes: {}", frame.len(), hex(frame));
        }
        Link::L3 => {
            let _ = writeln!(
                w,
                "packet on an L3 device (no Ethernet header): {} bytes: {}",
                frame.len(),
                hex(frame)
            );
        }
    }
    let _ = writeln!(w, "parse:");
    for layer in &decision.parsed.layers {
        let _ = writeln!(w, "  {layer}");
    }
    let service_line = |i: usize| {
        let s = &config.services[i];
        format!("service {:?} ({} line {})", s.name, config.source, s.line)
    };
    match &decision.parsed.result {
        Parse::Malformed(why) => {
            let _ = writeln!(w, "  malformed: {why}");
            let _ = writeln!(
                w,
                "result: not looked up; malformed frames are never marked; mark stays {mark:#x}"
            );
            let _ = writeln!(w, "counters: seen, malformed");
        }
        Parse::NonIp {
            ethertype,
            third_tag,
        } => {
            if *third_tag {
                let _ = writeln!(
                    w,
                    "  a third VLAN tag ({ethertype:#06x}): the classifier parses two"
                );
            } else if link == Link::L3 {
                let _ = writeln!(
                    w,
                    "  skb protocol {ethertype:#06x} is neither IPv4 nor IPv6 (the first byte's \
                     version nibble is neither 4 nor 6)"
                );
            } else {
                let _ = writeln!(w, "  ethertype {ethertype:#06x} is neither IPv4 nor IPv6");
            }
            let _ = writeln!(w, "result: not IP, not looked up; mark stays {mark:#x}");
            let _ = writeln!(w, "counters: seen, non_ip");
        }
        Parse::Ip(key) if matches!(decision.icmp, Some(Icmp::Malformed(_))) => {
            let Some(Icmp::Malformed(why)) = &decision.icmp else {
                unreachable!("matched above");
            };
            let _ = writeln!(w, "  malformed ICMP error: {why}");
            let _ = writeln!(
                w,
                "result: icmp_errors = true reads ICMP errors whole (the ICMP header, the quoted \
                 IP headers and 8 bytes of the quoted transport header); this one is cut or \
                 malformed, so it is not looked up and never marked; mark stays {mark:#x}"
            );
            let _ = writeln!(w, "  ({key} as a packet)");
            let _ = writeln!(w, "counters: seen, malformed");
        }
        Parse::Ip(key) => {
            // An ICMP error is looked up by the packet it quotes.
            let (addr, proto, port, later_fragment) = match &decision.icmp {
                Some(Icmp::Error { ty, code, quoted }) => {
                    let _ = writeln!(
                        w,
                        "icmp_errors = true: ICMP type {ty} code {code} is an error, looked up by \
                         the packet it quotes: its source address, protocol and source port (the \
                         service side of a packet sent from the VIP), so IPVS's schedule_icmp \
                         finds the same fwmark service"
                    );
                    let _ = writeln!(w, "lookup key: {quoted} (the quoted packet's source)");
                    if quoted.later_fragment {
                        let _ = writeln!(
                            w,
                            "  the quoted packet is a later fragment: only every-port entries can match"
                        );
                    }
                    (quoted.src, quoted.proto, quoted.port, false)
                }
                Some(Icmp::Informational { ty }) => {
                    let _ = writeln!(
                        w,
                        "icmp_errors = true, but ICMP type {ty} is informational: looked up as \
                         itself (no service matches ICMP)"
                    );
                    let _ = writeln!(w, "lookup key: {key}");
                    (key.dst, key.proto, key.port, key.later_fragment)
                }
                _ => {
                    if let Some(ty) = icmp_error_type(frame, key) {
                        let _ = writeln!(
                            w,
                            "ICMP type {ty} is an error, but icmp_errors is off: looked up as \
                             itself (set icmp_errors = true to mark it like the packet it quotes)"
                        );
                    }
                    let _ = writeln!(w, "lookup key: {key}");
                    (key.dst, key.proto, key.port, key.later_fragment)
                }
            };
            let key = &Lookup {
                dst: addr,
                proto,
                port,
                later_fragment,
            };
            if key.later_fragment {
                let _ = writeln!(
                    w,
                    "  a later fragment has no transport header: only every-port entries can match"
                );
            }
            let later = if key.later_fragment {
                ", later_fragment"
            } else {
                ""
            };
            match decision.outcome {
                Outcome::Marked(hit) => {
                    let rule = &model.rules[hit.rule];
                    let _ = writeln!(w, "match: stage {}", hit.stage);
                    let _ = writeln!(
                        w,
                        "  {}: {rule} (rule {})",
                        service_line(hit.service),
                        hit.rule
                    );
                    let _ = writeln!(
                        w,
                        "mark: ({mark:#x} & !{mask:#x}) | ({value:#x} & {mask:#x}) = {new:#x}",
                        mask = hit.mask,
                        value = hit.mark,
                        new = apply_mark(mark, hit.mark, hit.mask)
                    );
                    let others = shadowed(&model, key.dst, key.proto, key.port, hit.rule);
                    if !others.is_empty() {
                        let _ = writeln!(w, "also matching, lower precedence:");
                        for (i, stage) in others {
                            let _ = writeln!(
                                w,
                                "  stage {stage}: {}: {}",
                                service_line(model.rules[i].service),
                                model.rules[i]
                            );
                        }
                    }
                    let icmp = if decision.icmp_error() {
                        ", icmp_error (and the rule's icmp_errors)"
                    } else {
                        ""
                    };
                    let _ = writeln!(w, "counters: seen, marked{later}{icmp}");
                }
                _ => {
                    let _ = writeln!(
                        w,
                        "no match: no entry covers this key; mark stays {mark:#x}"
                    );
                    for (i, why) in near_misses(&model, key.dst, key.proto, key.port) {
                        let _ = writeln!(
                            w,
                            "  not {}: {} ({why})",
                            service_line(model.rules[i].service),
                            model.rules[i]
                        );
                    }
                    let _ = writeln!(w, "counters: seen, no_match{later}");
                }
            }
        }
    }
    out
}

/// What is looked up: the packet's own key, or an ICMP error's quoted one.
struct Lookup {
    dst: IpAddr,
    proto: u8,
    port: Option<u16>,
    later_fragment: bool,
}

/// The type of an ICMP error of the packet's own family, if `key` is one
/// (read whether or not `icmp_errors` is on, for the hint).
fn icmp_error_type(frame: &[u8], key: &Key) -> Option<u8> {
    if !is_icmp(key) {
        return None;
    }
    let ty = *frame.get(key.l4_offset)?;
    icmp_is_error(key.dst.is_ipv6(), ty).then_some(ty)
}

/// Other rules that match the key, in precedence order, without `winner`
/// (at most 8).
fn shadowed(
    model: &Model,
    dst: IpAddr,
    proto: u8,
    port: Option<u16>,
    winner: usize,
) -> Vec<(usize, Stage)> {
    model
        .matches(dst, proto, port)
        .into_iter()
        .filter(|&(i, _)| i != winner)
        .take(8)
        .collect()
}

/// Rules for the packet's address that do not match it, and why (at most 8).
fn near_misses(model: &Model, dst: IpAddr, proto: u8, port: Option<u16>) -> Vec<(usize, String)> {
    model
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.vip.contains(&dst))
        .filter_map(|(i, r)| {
            let why = if r.proto != proto {
                format!("the packet is {}", proto_name(proto))
            } else {
                match (r.ports, port) {
                    (Some(range), Some(p)) => format!("port {p} is not in {range}"),
                    (Some(_), None) if transport_header_len(proto).is_some() => {
                        "a later fragment has no port; only every-port entries match it".into()
                    }
                    _ => return None,
                }
            };
            Some((i, why))
        })
        .take(8)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMPV6_PACKET_TOO_BIG};

    const CONFIG: &str = "[[service]]\nname = \"web\"\nvip = [\"192.0.2.10\", \"2001:db8::10\"]\n\
                          proto = \"tcp\"\nports = [443]\nmark = 80\n";

    #[test]
    fn an_l3_packet_is_explained_without_an_ethernet_header() {
        let config = Config::parse(
            "[[service]]\nname = \"web\"\nvip = [\"192.0.2.10\", \"2001:db8::10\"]\n\
             proto = \"tcp\"\nports = [443]\nmark = 80\n",
            "test",
        )
        .unwrap();
        for (dst, protocol) in [("192.0.2.10", 0x0800), ("2001:db8::10", 0x86dd)] {
            let input = Input::Described(Description {
                proto: 6,
                dst: dst.parse().unwrap(),
                port: Some(443),
                later_fragment: false,
                vlans: vec![],
            });
            let packet = input.bytes_on(Link::L3);
            assert_eq!(packet, input.frame()[14..], "{dst}");
            assert_eq!(l3_protocol(&packet), protocol);
            let text = explain_on(&config, Link::L3, &packet, 0);
            assert!(text.contains("no Ethernet header (L3 device)"), "{text}");
            assert!(text.contains("= 0x50"), "{text}");
            // The same bytes behind no header are garbage as an Ethernet frame.
            assert!(!explain(&config, &packet, 0).contains("= 0x50"));
        }
        let text = explain_on(&config, Link::L3, &[0x50; 40], 0);
        assert!(text.contains("skb protocol 0x0000 is neither"), "{text}");
    }

    fn error_frame(vip: &str, client: &str, ty: u8, code: u8) -> Vec<u8> {
        let quoted = Frame::new(client, L4::Tcp(40000))
            .from(vip.parse().unwrap())
            .from_port(443);
        let router: IpAddr = if vip.contains(':') {
            "2001:db8:ffff::1".parse().unwrap()
        } else {
            "198.51.100.1".parse().unwrap()
        };
        let ip_len = quoted.l4_offset() - crate::frame::l3_offset(0);
        Frame::icmp_error(router, ty, code, [0, 0, 5, 0xdc], &quoted, ip_len + 8).build()
    }

    #[test]
    fn an_icmp_error_is_explained_by_the_quoted_packet() {
        let on = Config::parse(&format!("icmp_errors = true\n{CONFIG}"), "f.toml").unwrap();
        let f = error_frame(
            "192.0.2.10",
            "203.0.113.5",
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
        );
        let text = explain(&on, &f, 0);
        for want in [
            "ICMP at byte 34, type 3 code 4: an error",
            "quoted IPv4 at byte 42, header 20 bytes, dst 203.0.113.5, tcp, src 192.0.2.10",
            "source port 443, destination port 40000",
            "lookup key: IPv4 192.0.2.10 tcp port 443 (the quoted packet's source)",
            "service \"web\" (f.toml line 2): 192.0.2.10 tcp port 443",
            "= 0x50",
            "counters: seen, marked, icmp_error",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        let f6 = error_frame("2001:db8::10", "2001:db8:c::5", ICMPV6_PACKET_TOO_BIG, 0);
        let text = explain(&on, &f6, 0);
        assert!(text.contains("ICMPv6 at byte 54, type 2 code 0"), "{text}");
        assert!(text.contains("= 0x50"), "{text}");
        // Cut inside the quoted TCP ports: malformed, and said so.
        let text = explain(&on, &f[..f.len() - 1], 7);
        assert!(
            text.contains("malformed ICMP error: truncated quoted transport header"),
            "{text}"
        );
        assert!(text.contains("counters: seen, malformed"), "{text}");
        // Off: the hint, and no match.
        let off = Config::parse(CONFIG, "f.toml").unwrap();
        let text = explain(&off, &f, 7);
        assert!(text.contains("icmp_errors is off"), "{text}");
        assert!(text.contains("no match"), "{text}");
    }
}
