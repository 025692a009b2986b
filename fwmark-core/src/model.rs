//! A reference model of the classifier, in plain Rust, written from the
//! specification (README "How it works") rather than from the BPF code, so a
//! differential test can hold the two against each other and `fwmark
//! explain` can say why a packet gets the mark it gets.
//!
//! What it models, per frame:
//! - parsing: Ethernet, up to two 802.1Q/802.1ad tags (a third tag is not
//!   IP), IPv4 with any header length, IPv6 with hop-by-hop, routing,
//!   destination-options and fragment headers (at most
//!   [`MAX_IPV6_EXT_HEADERS`]), then the TCP, UDP or SCTP destination port.
//!   Every header the parser walks must be wholly inside the frame (a
//!   truncated header is malformed, never marked), and for TCP, UDP and SCTP
//!   that includes the whole fixed transport header, as iptables' port
//!   matches require;
//! - fragments: a fragment at a non-zero offset has no transport header and
//!   is looked up without a port, so only every-port services match it;
//! - the lookup, straight from the config's rules (not from the compiled
//!   map entries), ranked by [`crate::precedence`]: exact address and port,
//!   exact address every port, then the longest prefix, a port entry before
//!   an every-port entry at equal length; among equals the first rule in
//!   config order owns the entry;
//! - ICMP errors (`icmp_errors = true`): an ICMPv4 message of type 3, 4 or
//!   11 in IPv4, or an ICMPv6 message of type 1 to 4 in IPv6, not a later
//!   fragment, is looked up by the packet it quotes: that packet's source
//!   address, protocol and source port, by the same lookup. The 8-byte ICMP
//!   header, the quoted IP header (IPv4 options, IPv6 extension headers, the
//!   same walk and limits) and the first 8 bytes of a quoted TCP, UDP or
//!   SCTP header must be in the frame; otherwise it is malformed. A quoted
//!   later fragment is looked up without a port. Other ICMP is looked up as
//!   itself (and no service matches ICMP);
//! - the mark, `(old & !mask) | (value & mask)`, and which global counter
//!   the frame adds to.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use fwmark_common::{
    GlobalCounters, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS,
    wire::{
        EMBEDDED_L4_MIN, ETH_HLEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ICMP_HLEN, IPV4_MIN_HLEN,
        IPV6_DEST_OPTIONS, IPV6_FRAG_HLEN, IPV6_FRAGMENT, IPV6_HLEN, IPV6_HOP_BY_HOP, IPV6_ROUTING,
        SCTP_HLEN, TCP_HLEN, TPID_8021AD, TPID_8021Q, UDP_HLEN, VLAN_HLEN,
    },
};
use ipnet::IpNet;

use crate::{
    config::{Config, PortRange},
    precedence::{Rank, best},
    ruleset::rules,
    text::RuleText,
};
pub use crate::{precedence::Stage, text::proto_name};

/// Length of the fixed transport header the port is read from, for the
/// protocols that have ports: TCP 20, UDP 8, SCTP 12 (the common header).
pub fn transport_header_len(proto: u8) -> Option<usize> {
    match proto {
        IPPROTO_TCP => Some(TCP_HLEN),
        IPPROTO_UDP => Some(UDP_HLEN),
        IPPROTO_SCTP => Some(SCTP_HLEN),
        _ => None,
    }
}

/// One header as the parser read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layer {
    Ethernet {
        ethertype: u16,
    },
    /// No link-layer header: an L3 device's packet (tun, WireGuard, ipip,
    /// GRE, ...), whose family is the skb's protocol.
    L3 {
        protocol: u16,
    },
    Vlan {
        tpid: u16,
        vid: u16,
        ethertype: u16,
    },
    Ipv4 {
        offset: usize,
        header_len: usize,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
        /// Fragment offset in 8-byte units.
        fragment_offset: u16,
        more_fragments: bool,
    },
    Ipv6 {
        offset: usize,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        next: u8,
    },
    /// Hop-by-hop, routing or destination options.
    Ipv6Ext {
        offset: usize,
        kind: u8,
        len: usize,
        next: u8,
    },
    Ipv6Fragment {
        offset: usize,
        /// Fragment offset in 8-byte units.
        fragment_offset: u16,
        more_fragments: bool,
        next: u8,
    },
    Transport {
        offset: usize,
        proto: u8,
        port: u16,
    },
    /// An ICMP or ICMPv6 header (read only with `icmp_errors = true`).
    Icmp {
        offset: usize,
        ipv6: bool,
        ty: u8,
        code: u8,
        /// One of the error types looked up by the packet they quote.
        error: bool,
    },
    /// A header of the packet an ICMP error quotes.
    Quoted(Box<Layer>),
    /// The first 8 bytes of the quoted packet's TCP, UDP or SCTP header.
    QuotedPorts {
        offset: usize,
        proto: u8,
        src_port: u16,
        dst_port: u16,
    },
}

fn ipv6_ext_name(kind: u8) -> &'static str {
    match kind {
        IPV6_HOP_BY_HOP => "hop-by-hop options",
        IPV6_ROUTING => "routing",
        IPV6_FRAGMENT => "fragment",
        _ => "destination options",
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layer::Ethernet { ethertype } => write!(f, "Ethernet, ethertype {ethertype:#06x}"),
            Layer::L3 { protocol } => write!(
                f,
                "no Ethernet header (L3 device), skb protocol {protocol:#06x}"
            ),
            Layer::Vlan {
                tpid,
                vid,
                ethertype,
            } => write!(
                f,
                "VLAN tag {tpid:#06x} ({}), id {vid}, ethertype {ethertype:#06x}",
                if *tpid == TPID_8021AD {
                    "802.1ad"
                } else {
                    "802.1Q"
                }
            ),
            Layer::Ipv4 {
                offset,
                header_len,
                dst,
                proto,
                fragment_offset,
                more_fragments,
                ..
            } => {
                write!(
                    f,
                    "IPv4 at byte {offset}, header {header_len} bytes, dst {dst}, {}",
                    proto_name(*proto)
                )?;
                if *fragment_offset != 0 || *more_fragments {
                    write!(
                        f,
                        ", fragment offset {} bytes{}",
                        u32::from(*fragment_offset) * 8,
                        if *more_fragments {
                            ", more fragments"
                        } else {
                            ""
                        }
                    )?;
                }
                Ok(())
            }
            Layer::Ipv6 {
                offset, dst, next, ..
            } => {
                write!(f, "IPv6 at byte {offset}, dst {dst}, next header {next}")
            }
            Layer::Ipv6Ext {
                offset,
                kind,
                len,
                next,
            } => write!(
                f,
                "IPv6 {} header at byte {offset}, {len} bytes, next header {next}",
                ipv6_ext_name(*kind)
            ),
            Layer::Ipv6Fragment {
                offset,
                fragment_offset,
                more_fragments,
                next,
            } => write!(
                f,
                "IPv6 fragment header at byte {offset}, fragment offset {} bytes{}, next header {next}",
                u32::from(*fragment_offset) * 8,
                if *more_fragments {
                    ", more fragments"
                } else {
                    ""
                }
            ),
            Layer::Transport {
                offset,
                proto,
                port,
            } => write!(
                f,
                "{} at byte {offset}, destination port {port}",
                proto_name(*proto).to_uppercase()
            ),
            Layer::Icmp {
                offset,
                ipv6,
                ty,
                code,
                error,
            } => write!(
                f,
                "{} at byte {offset}, type {ty} code {code}: {}",
                if *ipv6 { "ICMPv6" } else { "ICMP" },
                if *error {
                    "an error, quoting the packet it is about"
                } else {
                    "informational"
                }
            ),
            Layer::Quoted(inner) => match &**inner {
                Layer::Ipv4 { src, .. } => write!(f, "quoted {inner}, src {src}"),
                Layer::Ipv6 { src, .. } => write!(f, "quoted {inner}, src {src}"),
                _ => write!(f, "quoted {inner}"),
            },
            Layer::QuotedPorts {
                offset,
                proto,
                src_port,
                dst_port,
            } => write!(
                f,
                "quoted {} at byte {offset} (first 8 bytes), source port {src_port}, \
                 destination port {dst_port}",
                proto_name(*proto).to_uppercase()
            ),
        }
    }
}

/// Why a frame is malformed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// `header` starts at `offset` and needs `need` bytes; the frame ends first.
    Truncated {
        header: &'static str,
        offset: usize,
        need: usize,
        len: usize,
    },
    /// The IP version nibble does not match the ethertype.
    BadVersion { offset: usize, version: u8 },
    /// IPv4 header length below 20 bytes.
    BadIhl { offset: usize, ihl: u8 },
    /// More IPv6 extension headers than the classifier walks.
    TooManyExtHeaders { offset: usize },
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Malformed::Truncated {
                header,
                offset,
                need,
                len,
            } => write!(
                f,
                "truncated {header}: it needs bytes {offset}..{} but the frame has {len}",
                offset + need
            ),
            Malformed::BadVersion { offset, version } => {
                write!(
                    f,
                    "IP version {version} at byte {offset} does not match the ethertype"
                )
            }
            Malformed::BadIhl { offset, ihl } => write!(
                f,
                "IPv4 header length {ihl} (x4 = {} bytes) at byte {offset} is below 20 bytes",
                u32::from(*ihl) * 4
            ),
            Malformed::TooManyExtHeaders { offset } => write!(
                f,
                "more than {MAX_IPV6_EXT_HEADERS} IPv6 extension headers (the next one at byte {offset})"
            ),
        }
    }
}

/// What the classifier looks a packet up by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    pub dst: IpAddr,
    pub proto: u8,
    /// Destination port; `None` for later fragments and protocols without ports.
    pub port: Option<u16>,
    /// A fragment at a non-zero offset.
    pub later_fragment: bool,
    /// Where the IP header starts (bytes are counted from there).
    pub l3_offset: usize,
    /// Where the header after the IP header(s) starts.
    pub l4_offset: usize,
}

/// A lookup's fields as explain prints them: `IPv4 ADDR PROTO port N`, or
/// why there is no port (`fragment` names a later fragment).
fn write_lookup(
    f: &mut fmt::Formatter<'_>,
    addr: IpAddr,
    proto: u8,
    port: Option<u16>,
    later_fragment: bool,
    fragment: &str,
) -> fmt::Result {
    let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
    write!(f, "{family} {addr} {}", proto_name(proto))?;
    match port {
        Some(p) => write!(f, " port {p}"),
        None if later_fragment => write!(f, " ({fragment}: no port)"),
        None => write!(f, " (no ports)"),
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_lookup(
            f,
            self.dst,
            self.proto,
            self.port,
            self.later_fragment,
            "later fragment",
        )
    }
}

/// What parsing a frame gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parse {
    Ip(Key),
    /// Neither IPv4 nor IPv6: the ethertype after the tags, and whether it
    /// is a third VLAN tag.
    NonIp {
        ethertype: u16,
        third_tag: bool,
    },
    Malformed(Malformed),
}

/// A parse with the headers read on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub layers: Vec<Layer>,
    pub result: Parse,
}

fn be16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// The `need` bytes at `offset`, or the truncation.
fn bytes<'a>(
    frame: &'a [u8],
    header: &'static str,
    offset: usize,
    need: usize,
) -> Result<&'a [u8], Malformed> {
    frame
        .get(offset..offset + need)
        .ok_or(Malformed::Truncated {
            header,
            offset,
            need,
            len: frame.len(),
        })
}

/// Ethernet: the ethertype.
fn ethernet(frame: &[u8]) -> Result<u16, Malformed> {
    let h = bytes(frame, "Ethernet header", 0, ETH_HLEN)?;
    Ok(be16(h, 12))
}

/// One VLAN tag at `offset`: (VLAN id, inner ethertype).
fn vlan(frame: &[u8], offset: usize) -> Result<(u16, u16), Malformed> {
    let h = bytes(frame, "VLAN tag", offset, VLAN_HLEN)?;
    Ok((be16(h, 0) & 0x0fff, be16(h, 2)))
}

/// IPv4 at `offset`: the whole header, options included, must be present.
fn ipv4(frame: &[u8], offset: usize) -> Result<Layer, Malformed> {
    let h = bytes(frame, "IPv4 header", offset, IPV4_MIN_HLEN)?;
    let version = h[0] >> 4;
    if version != 4 {
        return Err(Malformed::BadVersion { offset, version });
    }
    let ihl = h[0] & 0x0f;
    if ihl < 5 {
        return Err(Malformed::BadIhl { offset, ihl });
    }
    let header_len = usize::from(ihl) * 4;
    bytes(frame, "IPv4 options", offset, header_len)?;
    let flags_fragment = be16(h, 6);
    Ok(Layer::Ipv4 {
        offset,
        header_len,
        src: Ipv4Addr::new(h[12], h[13], h[14], h[15]),
        dst: Ipv4Addr::new(h[16], h[17], h[18], h[19]),
        proto: h[9],
        fragment_offset: flags_fragment & 0x1fff,
        more_fragments: flags_fragment & 0x2000 != 0,
    })
}

/// The fixed IPv6 header at `offset`.
fn ipv6(frame: &[u8], offset: usize) -> Result<Layer, Malformed> {
    let h = bytes(frame, "IPv6 header", offset, IPV6_HLEN)?;
    let version = h[0] >> 4;
    if version != 6 {
        return Err(Malformed::BadVersion { offset, version });
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&h[24..40]);
    Ok(Layer::Ipv6 {
        offset,
        src: Ipv6Addr::from(src),
        dst: Ipv6Addr::from(dst),
        next: h[6],
    })
}

/// A hop-by-hop, routing or destination-options header: (next, length in
/// bytes, which is 8 * (1 + its length field)); all of it must be present.
fn ipv6_options(frame: &[u8], offset: usize, kind: u8) -> Result<Layer, Malformed> {
    let h = bytes(frame, "IPv6 extension header", offset, 2)?;
    let len = (usize::from(h[1]) + 1) * 8;
    let next = h[0];
    bytes(frame, "IPv6 extension header", offset, len)?;
    Ok(Layer::Ipv6Ext {
        offset,
        kind,
        len,
        next,
    })
}

/// The 8-byte IPv6 fragment header.
fn ipv6_fragment(frame: &[u8], offset: usize) -> Result<Layer, Malformed> {
    let h = bytes(frame, "IPv6 fragment header", offset, IPV6_FRAG_HLEN)?;
    let offset_flags = be16(h, 2);
    Ok(Layer::Ipv6Fragment {
        offset,
        fragment_offset: offset_flags >> 3,
        more_fragments: offset_flags & 1 != 0,
        next: h[0],
    })
}

/// The destination port of a TCP, UDP or SCTP header at `offset`.
fn transport(frame: &[u8], offset: usize, proto: u8) -> Result<Option<Layer>, Malformed> {
    let Some(len) = transport_header_len(proto) else {
        return Ok(None);
    };
    let name = match proto {
        IPPROTO_TCP => "TCP header",
        IPPROTO_UDP => "UDP header",
        _ => "SCTP common header",
    };
    let h = bytes(frame, name, offset, len)?;
    Ok(Some(Layer::Transport {
        offset,
        proto,
        port: be16(h, 2),
    }))
}

/// Parses a frame as the classifier does.
pub fn parse(frame: &[u8]) -> Parsed {
    let mut layers = Vec::new();
    let result = parse_into(frame, &mut layers).unwrap_or_else(Parse::Malformed);
    Parsed { layers, result }
}

/// Parses an L3 device's packet as the classifier's L3 entry does: the IP
/// header at byte 0, its family named by `protocol` (the skb's protocol,
/// `ETH_P_IP` or `ETH_P_IPV6`; anything else is not IP).
pub fn parse_l3(protocol: u16, packet: &[u8]) -> Parsed {
    let mut layers = vec![Layer::L3 { protocol }];
    let result = ip_into(packet, protocol, 0, &mut layers).unwrap_or_else(Parse::Malformed);
    Parsed { layers, result }
}

fn parse_into(frame: &[u8], layers: &mut Vec<Layer>) -> Result<Parse, Malformed> {
    let mut ethertype = ethernet(frame)?;
    layers.push(Layer::Ethernet { ethertype });
    let mut offset = ETH_HLEN;
    let is_tag = |t: u16| t == TPID_8021Q || t == TPID_8021AD;
    for _ in 0..MAX_VLAN_TAGS {
        if !is_tag(ethertype) {
            break;
        }
        let tpid = ethertype;
        let (vid, inner) = vlan(frame, offset)?;
        layers.push(Layer::Vlan {
            tpid,
            vid,
            ethertype: inner,
        });
        ethertype = inner;
        offset += VLAN_HLEN;
    }
    ip_into(frame, ethertype, offset, layers)
}

/// The IP packet at `l3_offset` whose family `ethertype` names.
fn ip_into(
    frame: &[u8],
    ethertype: u16,
    l3_offset: usize,
    layers: &mut Vec<Layer>,
) -> Result<Parse, Malformed> {
    let offset = l3_offset;
    // A tag the VLAN walk left (a third one) only exists behind Ethernet.
    let ethernet = matches!(layers.first(), Some(Layer::Ethernet { .. }));
    let is_tag = |t: u16| ethernet && (t == TPID_8021Q || t == TPID_8021AD);
    let (dst, proto, l4_offset, later_fragment) = match ethertype {
        ETHERTYPE_IPV4 => {
            let layer = ipv4(frame, offset)?;
            let Layer::Ipv4 {
                header_len,
                dst,
                proto,
                fragment_offset,
                ..
            } = layer
            else {
                unreachable!("ipv4() returns an IPv4 layer");
            };
            layers.push(layer);
            (
                IpAddr::V4(dst),
                proto,
                offset + header_len,
                fragment_offset != 0,
            )
        }
        ETHERTYPE_IPV6 => {
            let layer = ipv6(frame, offset)?;
            let Layer::Ipv6 { dst, next, .. } = layer else {
                unreachable!("ipv6() returns an IPv6 layer");
            };
            layers.push(layer);
            let (proto, l4_offset, later) = ipv6_chain(frame, offset + IPV6_HLEN, next, layers)?;
            (IpAddr::V6(dst), proto, l4_offset, later)
        }
        other => {
            return Ok(Parse::NonIp {
                ethertype: other,
                third_tag: is_tag(other),
            });
        }
    };
    let port = if later_fragment {
        None
    } else {
        match transport(frame, l4_offset, proto)? {
            Some(layer @ Layer::Transport { port, .. }) => {
                layers.push(layer);
                Some(port)
            }
            _ => None,
        }
    };
    Ok(Parse::Ip(Key {
        dst,
        proto,
        port,
        later_fragment,
        l3_offset,
        l4_offset,
    }))
}

/// What the packet an ICMP error quotes is looked up by: its source (the
/// service side of a packet the director's real server sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quoted {
    pub src: IpAddr,
    pub proto: u8,
    /// Source port; `None` for a quoted later fragment or a protocol
    /// without ports.
    pub port: Option<u16>,
    pub later_fragment: bool,
}

impl fmt::Display for Quoted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_lookup(
            f,
            self.src,
            self.proto,
            self.port,
            self.later_fragment,
            "quoted later fragment",
        )
    }
}

/// An ICMP message as `icmp_errors = true` reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Icmp {
    /// Not an error: looked up as itself.
    Informational { ty: u8 },
    /// An error, looked up by the packet it quotes.
    Error { ty: u8, code: u8, quoted: Quoted },
    /// Its header or the quoted headers are truncated or malformed.
    Malformed(Malformed),
}

/// Whether ICMP type `ty` (ICMPv6 if `ipv6`) is an error that quotes the
/// packet it is about: ICMPv4 destination unreachable, source quench and
/// time exceeded; ICMPv6 destination unreachable, packet too big, time
/// exceeded and parameter problem (as IPVS reads them).
pub fn icmp_is_error(ipv6: bool, ty: u8) -> bool {
    const V4: [u8; 3] = [3, 4, 11];
    const V6: [u8; 4] = [1, 2, 3, 4];
    if ipv6 {
        V6.contains(&ty)
    } else {
        V4.contains(&ty)
    }
}

/// Whether `key` is an ICMP message of its own family with its header in
/// this packet (ICMP in IPv4, ICMPv6 in IPv6, not a later fragment): the
/// packets `icmp_errors` reads.
pub fn is_icmp(key: &Key) -> bool {
    !key.later_fragment
        && match key.dst {
            IpAddr::V4(_) => key.proto == IPPROTO_ICMP,
            IpAddr::V6(_) => key.proto == IPPROTO_ICMPV6,
        }
}

/// The ICMP message of `key` (see [`is_icmp`]), with its layers.
pub fn icmp(frame: &[u8], key: &Key, layers: &mut Vec<Layer>) -> Icmp {
    icmp_into(frame, key, layers).unwrap_or_else(Icmp::Malformed)
}

fn icmp_into(frame: &[u8], key: &Key, layers: &mut Vec<Layer>) -> Result<Icmp, Malformed> {
    let ipv6 = key.dst.is_ipv6();
    let offset = key.l4_offset;
    let name = if ipv6 { "ICMPv6 header" } else { "ICMP header" };
    let h = bytes(frame, name, offset, ICMP_HLEN)?;
    let (ty, code) = (h[0], h[1]);
    let error = icmp_is_error(ipv6, ty);
    layers.push(Layer::Icmp {
        offset,
        ipv6,
        ty,
        code,
        error,
    });
    if !error {
        return Ok(Icmp::Informational { ty });
    }
    // The quoted packet: the same header walk as the packet itself.
    let inner = offset + ICMP_HLEN;
    let mut quoted_layers = Vec::new();
    let walked = quoted_ip(frame, inner, ipv6, &mut quoted_layers);
    layers.extend(
        quoted_layers
            .into_iter()
            .map(|l| Layer::Quoted(Box::new(l))),
    );
    let (src, proto, l4, later_fragment) = walked?;
    let port = if !later_fragment && transport_header_len(proto).is_some() {
        let h = bytes(
            frame,
            "quoted transport header (its first 8 bytes)",
            l4,
            EMBEDDED_L4_MIN,
        )?;
        let (src_port, dst_port) = (be16(h, 0), be16(h, 2));
        layers.push(Layer::QuotedPorts {
            offset: l4,
            proto,
            src_port,
            dst_port,
        });
        Some(src_port)
    } else {
        None
    };
    Ok(Icmp::Error {
        ty,
        code,
        quoted: Quoted {
            src,
            proto,
            port,
            later_fragment,
        },
    })
}

/// The quoted IP header at `offset` (IPv6 with its extension headers):
/// (source, protocol, transport offset, later fragment).
fn quoted_ip(
    frame: &[u8],
    offset: usize,
    ipv6: bool,
    layers: &mut Vec<Layer>,
) -> Result<(IpAddr, u8, usize, bool), Malformed> {
    if ipv6 {
        let layer = self::ipv6(frame, offset)?;
        let Layer::Ipv6 { src, next, .. } = layer else {
            unreachable!("ipv6() returns an IPv6 layer");
        };
        layers.push(layer);
        let (proto, l4, later) = ipv6_chain(frame, offset + IPV6_HLEN, next, layers)?;
        Ok((IpAddr::V6(src), proto, l4, later))
    } else {
        let layer = self::ipv4(frame, offset)?;
        let Layer::Ipv4 {
            src,
            header_len,
            proto,
            fragment_offset,
            ..
        } = layer
        else {
            unreachable!("ipv4() returns an IPv4 layer");
        };
        layers.push(layer);
        Ok((
            IpAddr::V4(src),
            proto,
            offset + header_len,
            fragment_offset != 0,
        ))
    }
}

/// Walks the IPv6 extension headers from `offset`, `next` being the first
/// one's type: (upper-layer protocol, its offset, later fragment).
fn ipv6_chain(
    frame: &[u8],
    mut offset: usize,
    mut next: u8,
    layers: &mut Vec<Layer>,
) -> Result<(u8, usize, bool), Malformed> {
    let mut walked = 0;
    loop {
        let is_ext = matches!(
            next,
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS | IPV6_FRAGMENT
        );
        if !is_ext {
            return Ok((next, offset, false));
        }
        if walked == MAX_IPV6_EXT_HEADERS {
            return Err(Malformed::TooManyExtHeaders { offset });
        }
        walked += 1;
        if next == IPV6_FRAGMENT {
            let layer = ipv6_fragment(frame, offset)?;
            let Layer::Ipv6Fragment {
                fragment_offset,
                next: after,
                ..
            } = layer
            else {
                unreachable!("ipv6_fragment() returns a fragment layer");
            };
            layers.push(layer);
            offset += IPV6_FRAG_HLEN;
            if fragment_offset != 0 {
                // What follows is payload: its protocol is the fragment's next header.
                return Ok((after, offset, true));
            }
            next = after;
        } else {
            let layer = ipv6_options(frame, offset, next)?;
            let Layer::Ipv6Ext {
                len, next: after, ..
            } = layer
            else {
                unreachable!("ipv6_options() returns an extension layer");
            };
            layers.push(layer);
            offset += len;
            next = after;
        }
    }
}

/// One rule of the config: a (service, vip, protocol, port item), numbered
/// in config order as the counter slots are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRule {
    pub service: usize,
    pub vip: IpNet,
    pub proto: u8,
    /// `None`: every port.
    pub ports: Option<PortRange>,
    pub mark: u32,
    pub mask: u32,
}

impl ModelRule {
    /// Where the rule's entries stand in the precedence.
    pub fn rank(&self) -> Rank {
        Rank::of(&self.vip, self.ports)
    }
}

/// As a rule is written everywhere ([`RuleText`]).
impl fmt::Display for ModelRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        RuleText {
            vip: &self.vip,
            proto: proto_name(self.proto),
            ports: self.ports,
        }
        .fmt(f)
    }
}

/// The entry a packet matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    /// Index of the rule (the counter slot of a freshly published config).
    pub rule: usize,
    pub service: usize,
    pub stage: Stage,
    pub mark: u32,
    pub mask: u32,
}

/// `(old & !mask) | (value & mask)`: the bits of `mask` come from `value`,
/// the others stay as they were.
pub fn apply_mark(old: u32, value: u32, mask: u32) -> u32 {
    (old & !mask) | (value & mask)
}

/// Where a frame is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Marked(Hit),
    NoMatch,
    NonIp,
    Malformed,
}

/// What the classifier does with one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub parsed: Parsed,
    /// The ICMP message, read when `icmp_errors = true` and the packet is
    /// ICMP of its family ([`is_icmp`]).
    pub icmp: Option<Icmp>,
    pub outcome: Outcome,
    /// The mark the frame came with.
    pub old_mark: u32,
    /// The mark it leaves with.
    pub mark: u32,
}

impl Decision {
    /// A fragment at a non-zero offset (counted in `later_fragment` besides
    /// `marked` or `no_match`).
    pub fn later_fragment(&self) -> bool {
        matches!(
            self.parsed.result,
            Parse::Ip(Key {
                later_fragment: true,
                ..
            })
        )
    }

    /// Marked as an ICMP error, by the packet it quotes.
    pub fn icmp_error(&self) -> bool {
        matches!(
            (&self.outcome, &self.icmp),
            (Outcome::Marked(_), Some(Icmp::Error { .. }))
        )
    }

    /// Adds this frame to the global counters, as the classifier does.
    pub fn count(&self, c: &mut GlobalCounters) {
        c.seen += 1;
        if self.icmp_error() {
            c.icmp_error += 1;
        }
        match self.outcome {
            Outcome::Marked(_) => c.marked += 1,
            Outcome::NoMatch => c.no_match += 1,
            Outcome::NonIp => c.non_ip += 1,
            Outcome::Malformed => c.malformed += 1,
        }
        if self.later_fragment() {
            c.later_fragment += 1;
        }
    }
}

/// The classifier's behaviour for one config.
#[derive(Clone, Debug)]
pub struct Model {
    pub rules: Vec<ModelRule>,
    /// The config's `icmp_errors`.
    pub icmp_errors: bool,
}

impl Model {
    /// The model of `config`: one rule per (service, vip, protocol, port
    /// item), in config order.
    pub fn new(config: &Config) -> Model {
        let rules = rules(config)
            .map(|r| {
                let s = &config.services[r.service];
                ModelRule {
                    service: r.service,
                    vip: r.vip,
                    proto: r.proto.number(),
                    ports: r.ports,
                    mark: s.mark,
                    mask: s.mask,
                }
            })
            .collect();
        Model {
            rules,
            icmp_errors: config.icmp_errors,
        }
    }

    /// The stage at which `rule` would match (dst, proto, port), if it does.
    pub fn rule_stage(
        rule: &ModelRule,
        dst: IpAddr,
        proto: u8,
        port: Option<u16>,
    ) -> Option<Stage> {
        if rule.proto != proto || !rule.vip.contains(&dst) {
            return None;
        }
        if let Some(r) = rule.ports {
            match port {
                Some(p) if r.lo <= p && p <= r.hi => {}
                _ => return None,
            }
        }
        Some(Stage::of_rule(&rule.vip, rule.ports))
    }

    /// The rules that match (dst, proto, port), each with its stage, in
    /// precedence order (config order among equals): the first marks.
    pub fn matches(&self, dst: IpAddr, proto: u8, port: Option<u16>) -> Vec<(usize, Stage)> {
        let mut all: Vec<(Rank, usize, Stage)> = self
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let stage = Self::rule_stage(r, dst, proto, port)?;
                Some((r.rank(), i, stage))
            })
            .collect();
        all.sort();
        all.into_iter().map(|(_, i, stage)| (i, stage)).collect()
    }

    /// The entry (dst, proto, port) matches, by fwmark's precedence; `port`
    /// is `None` for later fragments and protocols without ports.
    pub fn lookup(&self, dst: IpAddr, proto: u8, port: Option<u16>) -> Option<Hit> {
        let matching = self.rules.iter().enumerate().filter_map(|(i, rule)| {
            let stage = Self::rule_stage(rule, dst, proto, port)?;
            Some((rule.rank(), (i, stage)))
        });
        best(matching).map(|(_, (i, stage))| {
            let rule = &self.rules[i];
            Hit {
                rule: i,
                service: rule.service,
                stage,
                mark: rule.mark,
                mask: rule.mask,
            }
        })
    }

    /// What the classifier does with `frame` arriving with `mark`.
    pub fn classify(&self, frame: &[u8], mark: u32) -> Decision {
        self.decide(frame, parse(frame), mark)
    }

    /// What the classifier's L3 entry does with `packet` (an IP packet from
    /// its first byte, as an L3 device delivers it) whose skb protocol is
    /// `protocol`, arriving with `mark`.
    pub fn classify_l3(&self, protocol: u16, packet: &[u8], mark: u32) -> Decision {
        self.decide(packet, parse_l3(protocol, packet), mark)
    }

    fn decide(&self, frame: &[u8], mut parsed: Parsed, mark: u32) -> Decision {
        let mut icmp = None;
        let found = |hit: Option<Hit>| hit.map_or(Outcome::NoMatch, Outcome::Marked);
        let outcome = match parsed.result.clone() {
            Parse::NonIp { .. } => Outcome::NonIp,
            Parse::Malformed(_) => Outcome::Malformed,
            Parse::Ip(key) if self.icmp_errors && is_icmp(&key) => {
                let message = self::icmp(frame, &key, &mut parsed.layers);
                let outcome = match &message {
                    Icmp::Malformed(_) => Outcome::Malformed,
                    Icmp::Informational { .. } => found(self.lookup(key.dst, key.proto, key.port)),
                    Icmp::Error { quoted, .. } => {
                        found(self.lookup(quoted.src, quoted.proto, quoted.port))
                    }
                };
                icmp = Some(message);
                outcome
            }
            Parse::Ip(key) => found(self.lookup(key.dst, key.proto, key.port)),
        };
        let new_mark = match outcome {
            Outcome::Marked(hit) => apply_mark(mark, hit.mark, hit.mask),
            _ => mark,
        };
        Decision {
            parsed,
            icmp,
            outcome,
            old_mark: mark,
            mark: new_mark,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::ruleset::Ruleset;

    /// Frames assembled byte by byte, independently of any packet library.
    fn eth(ethertype: u16) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    fn ipv4(dst: [u8; 4], proto: u8, options: usize, fragment: u16) -> Vec<u8> {
        let ihl = 5 + options / 4;
        let mut h = vec![0x40 | ihl as u8, 0, 0, 0, 0, 0];
        h.extend_from_slice(&fragment.to_be_bytes());
        h.extend_from_slice(&[64, proto, 0, 0, 203, 0, 113, 7]);
        h.extend_from_slice(&dst);
        h.extend(std::iter::repeat_n(1u8, options)); // NOP options
        h
    }

    fn ipv6(dst: &str, next: u8) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0, 0, 0, next, 64];
        h.extend_from_slice(&[
            0x20, 0x01, 0x0d, 0xb8, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,
        ]);
        h.extend_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        h
    }

    fn l4(proto: u8, port: u16) -> Vec<u8> {
        let mut h = vec![0x9c, 0x40];
        h.extend_from_slice(&port.to_be_bytes());
        h.resize(transport_header_len(proto).unwrap_or(8), 0);
        h
    }

    fn tcp4(dst: [u8; 4], port: u16) -> Vec<u8> {
        [eth(0x0800), ipv4(dst, 6, 0, 0), l4(6, port)].concat()
    }

    const CONFIG: &str = r#"
[[service]]
name = "web"
vip = ["192.0.2.10", "2001:db8::10"]
proto = "tcp"
ports = [80, 443]
mark = 80

[[service]]
name = "allports"
vip = ["192.0.2.77", "2001:db8::77"]
proto = ["tcp", "udp"]
mark = 77

[[service]]
name = "bit"
vip = "192.0.2.1"
proto = "tcp"
ports = [80]
mark = 0x4000
mask = 0x4000

[[service]]
name = "same-a"
vip = "192.0.2.30"
proto = "udp"
ports = ["100-200"]
mark = 9

[[service]]
name = "same-b"
vip = "192.0.2.30"
proto = "udp"
ports = ["150-250"]
mark = 9
"#;

    /// [`CONFIG`] and the precedence examples' nested prefixes.
    fn model() -> (Config, Model) {
        let text = format!("{CONFIG}{}", crate::precedence::examples::CONFIG);
        let config = Config::parse(&text, "t.toml").unwrap();
        let model = Model::new(&config);
        (config, model)
    }

    fn mark_of(m: &Model, frame: &[u8]) -> Option<u32> {
        match m.classify(frame, 0xdead_0000).outcome {
            Outcome::Marked(hit) => Some(hit.mark),
            _ => None,
        }
    }

    #[test]
    fn the_first_rule_owns_a_shared_entry() {
        let (config, m) = model();
        let hit = m
            .lookup("192.0.2.30".parse().unwrap(), 17, Some(170))
            .unwrap();
        assert_eq!(config.services[hit.service].name, "same-a");
        let hit = m
            .lookup("192.0.2.30".parse().unwrap(), 17, Some(220))
            .unwrap();
        assert_eq!(config.services[hit.service].name, "same-b");
    }

    #[test]
    fn mark_keeps_the_bits_outside_the_mask() {
        assert_eq!(apply_mark(0x1234, 0x4000, 0x4000), 0x5234);
        assert_eq!(apply_mark(0xffff_ffff, 0x0100, 0xff00), 0xffff_01ff);
        assert_eq!(apply_mark(0xdead_beef, 0x50, u32::MAX), 0x50);
        let (_, m) = model();
        let d = m.classify(&tcp4([192, 0, 2, 1], 80), 0x1234);
        assert_eq!(d.mark, 0x5234);
        let d = m.classify(&tcp4([192, 0, 2, 99], 80), 0x1234);
        assert_eq!((d.outcome, d.mark), (Outcome::NoMatch, 0x1234));
    }

    #[test]
    fn l3_packets_start_at_the_ip_header_with_the_family_from_the_protocol() {
        let (_, m) = model();
        let v4 = [ipv4([192, 0, 2, 10], 6, 4, 0), l4(6, 443)].concat();
        let v6 = [ipv6("2001:db8::10", 6), l4(6, 80)].concat();
        let marked = |protocol: u16, packet: &[u8]| match m.classify_l3(protocol, packet, 0).outcome
        {
            Outcome::Marked(hit) => Some(hit.mark),
            _ => None,
        };
        assert_eq!(marked(0x0800, &v4), Some(80));
        assert_eq!(marked(0x86dd, &v6), Some(80));
        let d = m.classify_l3(0x0800, &v4, 0);
        assert_eq!(d.parsed.layers[0], Layer::L3 { protocol: 0x0800 });
        let Parse::Ip(key) = d.parsed.result else {
            panic!("{d:?}")
        };
        assert_eq!((key.l3_offset, key.l4_offset), (0, 24));
        // The protocol names the family: the other family's header is malformed.
        assert_eq!(
            m.classify_l3(0x86dd, &v4, 0).parsed.result,
            Parse::Malformed(Malformed::BadVersion {
                offset: 0,
                version: 4
            })
        );
        assert_eq!(m.classify_l3(0x0800, &v6, 0).outcome, Outcome::Malformed);
        // Not IP, and no VLAN walk (a tag protocol is just not IP).
        for protocol in [0x0806, 0x8100, 0] {
            assert_eq!(
                m.classify_l3(protocol, &v4, 0).parsed.result,
                Parse::NonIp {
                    ethertype: protocol,
                    third_tag: false
                }
            );
        }
        // Truncated and later fragments as on Ethernet.
        assert_eq!(
            m.classify_l3(0x0800, &v4[..30], 0).outcome,
            Outcome::Malformed
        );
        let later = [ipv4([192, 0, 2, 77], 6, 0, 100), vec![0xab; 8]].concat();
        let d = m.classify_l3(0x0800, &later, 0);
        assert!(d.later_fragment());
        assert_eq!(marked(0x0800, &later), Some(77));
        // An Ethernet frame on the L3 entry: its header is read as IP.
        assert_eq!(marked(0x0800, &tcp4([192, 0, 2, 10], 443)), None);
    }

    #[test]
    fn vlan_tags_two_are_parsed_a_third_is_not_ip() {
        let (_, m) = model();
        let body = [ipv4([192, 0, 2, 10], 6, 0, 0), l4(6, 443)].concat();
        let tagged = |tpids: &[u16]| {
            let mut f = eth(tpids.first().copied().unwrap_or(0x0800));
            for (i, _) in tpids.iter().enumerate() {
                f.extend_from_slice(&[0, 100 + i as u8]);
                f.extend_from_slice(&tpids.get(i + 1).copied().unwrap_or(0x0800).to_be_bytes());
            }
            [f, body.clone()].concat()
        };
        assert_eq!(mark_of(&m, &tagged(&[0x8100])), Some(80));
        assert_eq!(mark_of(&m, &tagged(&[0x88a8, 0x8100])), Some(80));
        let d = m.classify(&tagged(&[0x88a8, 0x8100, 0x8100]), 0);
        assert_eq!(d.outcome, Outcome::NonIp);
        assert_eq!(
            d.parsed.result,
            Parse::NonIp {
                ethertype: 0x8100,
                third_tag: true
            }
        );
        assert_eq!(
            m.classify(&eth(0x0806)[..13], 0).outcome,
            Outcome::Malformed
        );
        let arp = [eth(0x0806), vec![0; 28]].concat();
        assert_eq!(m.classify(&arp, 0).outcome, Outcome::NonIp);
    }

    #[test]
    fn truncation_anywhere_in_a_header_is_malformed() {
        let (_, m) = model();
        // IPv4 with 8 bytes of options, TCP: the port needs the whole TCP header.
        let full = [eth(0x0800), ipv4([192, 0, 2, 10], 6, 8, 0), l4(6, 80)].concat();
        let l4_at = 14 + 28;
        for len in 0..=full.len() {
            let d = m.classify(&full[..len], 7);
            if len >= l4_at + 20 {
                assert_eq!(d.mark, 80, "len {len}");
            } else {
                assert_eq!((d.outcome, d.mark), (Outcome::Malformed, 7), "len {len}");
            }
        }
        // A later fragment needs no transport header, but its IPv4 options
        // must be there.
        let later = [eth(0x0800), ipv4([192, 0, 2, 77], 6, 12, 0x2000 | 185)].concat();
        assert_eq!(mark_of(&m, &later), Some(77));
        assert_eq!(
            m.classify(&later[..later.len() - 1], 0).outcome,
            Outcome::Malformed
        );
        // UDP needs 8 bytes, SCTP 12.
        let udp = [eth(0x0800), ipv4([192, 0, 2, 77], 17, 0, 0), l4(17, 53)].concat();
        assert_eq!(udp.len(), 14 + 20 + 8);
        assert_eq!(mark_of(&m, &udp), Some(77));
        assert_eq!(
            m.classify(&udp[..udp.len() - 1], 0).outcome,
            Outcome::Malformed
        );
        // A protocol without ports needs nothing after the IP header.
        let icmp = [eth(0x0800), ipv4([192, 0, 2, 77], 1, 0, 0)].concat();
        assert_eq!(m.classify(&icmp, 0).outcome, Outcome::NoMatch);
    }

    #[test]
    fn bad_version_and_header_length_are_malformed() {
        let (_, m) = model();
        let good = tcp4([192, 0, 2, 10], 80);
        for (byte, want) in [
            (0x45u8, None),
            (0x44, Some(4)),
            (0x40, Some(0)),
            (0x65, Some(6)),
        ] {
            let mut f = good.clone();
            f[14] = byte;
            let d = m.classify(&f, 0);
            match want {
                None => assert_eq!(d.mark, 80),
                Some(_) => assert_eq!(d.outcome, Outcome::Malformed, "{byte:#x}"),
            }
        }
        let v6_with_v4_version = [eth(0x86dd), ipv6("2001:db8::10", 6)]
            .concat()
            .iter()
            .enumerate()
            .map(|(i, b)| if i == 14 { 0x45 } else { *b })
            .collect::<Vec<u8>>();
        assert_eq!(
            m.classify(&v6_with_v4_version, 0).parsed.result,
            Parse::Malformed(Malformed::BadVersion {
                offset: 14,
                version: 4
            })
        );
    }

    fn ext(next: u8, len_field: u8) -> Vec<u8> {
        let mut h = vec![next, len_field];
        h.resize((usize::from(len_field) + 1) * 8, 0);
        h
    }

    #[test]
    fn ipv6_extension_chains_up_to_eight() {
        let (_, m) = model();
        let chain = |n: usize| {
            let mut f = [eth(0x86dd), ipv6("2001:db8::10", 60)].concat();
            for i in 0..n {
                f.extend(ext(if i + 1 == n { 6 } else { 60 }, 1));
            }
            f.extend(l4(6, 443));
            f
        };
        assert_eq!(mark_of(&m, &chain(1)), Some(80));
        assert_eq!(mark_of(&m, &chain(8)), Some(80));
        assert!(matches!(
            m.classify(&chain(9), 0).parsed.result,
            Parse::Malformed(Malformed::TooManyExtHeaders { .. })
        ));
        // A truncated extension header before a protocol without ports.
        let mut f = [eth(0x86dd), ipv6("2001:db8::10", 0)].concat();
        f.extend(&ext(58, 2)[..20]);
        assert_eq!(m.classify(&f, 0).outcome, Outcome::Malformed);
    }

    #[test]
    fn later_fragments_match_only_every_port_entries() {
        let (_, m) = model();
        let frag = |dst: &str, offset: u16, next: u8| {
            let mut f = [eth(0x86dd), ipv6(dst, 44)].concat();
            f.extend_from_slice(&[next, 0]);
            f.extend_from_slice(&((offset << 3) | 1).to_be_bytes());
            f.extend_from_slice(&[0, 0, 0xfe, 0xed]);
            f.extend(l4(next, 443));
            f
        };
        assert_eq!(mark_of(&m, &frag("2001:db8::10", 0, 6)), Some(80));
        let d = m.classify(&frag("2001:db8::10", 185, 6), 0);
        assert_eq!(d.outcome, Outcome::NoMatch);
        assert!(d.later_fragment());
        assert_eq!(mark_of(&m, &frag("2001:db8::77", 185, 6)), Some(77));
        let v4 = [eth(0x0800), ipv4([198, 51, 100, 10], 6, 0, 185)].concat();
        assert_eq!(mark_of(&m, &v4), Some(1));
        let mut c = GlobalCounters::default();
        m.classify(&v4, 0).count(&mut c);
        assert_eq!((c.seen, c.marked, c.later_fragment), (1, 1, 1));
    }

    /// The model's config-level lookup against the compiled entries'
    /// lookup (`Ruleset::classify`), on keys around every rule's edges: two
    /// independent readings of the precedence and ownership rules.
    #[test]
    fn the_model_and_the_compiled_lookup_agree() {
        let (config, m) = model();
        let ruleset = Ruleset::compile(&config).unwrap();
        let exact: HashMap<_, _> = ruleset.exact.iter().copied().collect();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut addrs: Vec<IpAddr> = Vec::new();
        for r in &m.rules {
            let (first, last) = (r.vip.network(), r.vip.broadcast());
            addrs.extend([first, last]);
            match (first, last) {
                (IpAddr::V4(a), IpAddr::V4(b)) => {
                    addrs.push(Ipv4Addr::from(u32::from(a).wrapping_sub(1)).into());
                    addrs.push(Ipv4Addr::from(u32::from(b).wrapping_add(1)).into());
                }
                (IpAddr::V6(a), IpAddr::V6(b)) => {
                    addrs.push(Ipv6Addr::from(u128::from(a).wrapping_sub(1)).into());
                    addrs.push(Ipv6Addr::from(u128::from(b).wrapping_add(1)).into());
                }
                _ => unreachable!(),
            }
        }
        let mut hits = 0;
        for _ in 0..20_000 {
            let mut dst = addrs[rng.usize(..addrs.len())];
            if rng.bool() {
                dst = match dst {
                    IpAddr::V4(a) => Ipv4Addr::from(u32::from(a) ^ rng.u32(..256)).into(),
                    IpAddr::V6(a) => Ipv6Addr::from(u128::from(a) ^ rng.u128(..256)).into(),
                };
            }
            let proto = [6, 17, 132, 1][rng.usize(..4)];
            let port = match rng.u32(..10) {
                0 => None,
                1..=6 => {
                    Some([22, 79, 80, 81, 99, 100, 150, 200, 201, 250, 251, 443][rng.usize(..12)])
                }
                _ => Some(rng.u16(..)),
            };
            let modelled = m.lookup(dst, proto, port).map(|h| (h.mark, h.mask, h.rule));
            let compiled = ruleset
                .classify_with(&exact, dst, proto, port)
                .map(|t| (t.mark, t.mask, t.rule as usize));
            assert_eq!(modelled, compiled, "{dst} proto {proto} port {port:?}");
            hits += usize::from(modelled.is_some());
        }
        assert!(hits > 1_000, "only {hits} hits: the keys miss the rules");
    }

    /// An ICMP error from 198.51.100.1 to `vip`, quoting `quoted` (an IP
    /// packet), assembled by hand.
    fn icmp4_error(ty: u8, vip: [u8; 4], quoted: &[u8]) -> Vec<u8> {
        let mut ip = ipv4(vip, 1, 0, 0);
        ip[12..16].copy_from_slice(&[198, 51, 100, 1]);
        [
            eth(0x0800),
            ip,
            vec![ty, 4, 0, 0, 0, 0, 0x05, 0xdc],
            quoted.to_vec(),
        ]
        .concat()
    }

    /// A quoted IPv4 packet from `vip`:`sport` to the client, with
    /// `options` bytes of options.
    fn quoted4(vip: [u8; 4], proto: u8, sport: u16, options: usize) -> Vec<u8> {
        let mut ip = ipv4([203, 0, 113, 7], proto, options, 0);
        ip[12..16].copy_from_slice(&vip);
        [
            ip,
            sport.to_be_bytes().to_vec(),
            vec![0x9c, 0x40, 0, 0, 0, 1],
        ]
        .concat()
    }

    fn icmp_model(on: bool) -> Model {
        let text = format!("icmp_errors = {on}\n{CONFIG}");
        Model::new(&Config::parse(&text, "t.toml").unwrap())
    }

    #[test]
    fn icmp_errors_take_the_mark_of_the_quoted_source() {
        let m = icmp_model(true);
        // Fragmentation needed about 192.0.2.10:443 -> client, quoted
        // with 8 bytes of IPv4 options: web.
        let f = icmp4_error(3, [192, 0, 2, 10], &quoted4([192, 0, 2, 10], 6, 443, 8));
        let d = m.classify(&f, 0xdead_0000);
        assert_eq!(d.mark, 80, "{d:?}");
        assert!(d.icmp_error());
        let mut c = GlobalCounters::default();
        d.count(&mut c);
        assert_eq!((c.seen, c.marked, c.icmp_error), (1, 1, 1));
        // Source quench and time exceeded too; the quoted source port
        // decides, not the destination port.
        for ty in [4, 11] {
            assert_eq!(
                mark_of(
                    &m,
                    &icmp4_error(ty, [192, 0, 2, 10], &quoted4([192, 0, 2, 10], 6, 80, 0))
                ),
                Some(80)
            );
        }
        let by_dst_port = icmp4_error(3, [192, 0, 2, 10], &quoted4([192, 0, 2, 10], 6, 40000, 0));
        assert_eq!(m.classify(&by_dst_port, 0).outcome, Outcome::NoMatch);
        // The quoted SOURCE address decides, not the error's destination.
        let other_vip = icmp4_error(3, [192, 0, 2, 10], &quoted4([192, 0, 2, 77], 17, 5353, 0));
        assert_eq!(mark_of(&m, &other_vip), Some(77));
        // Informational ICMP (echo request 8, echo reply 0, 12 is not one
        // IPVS reads) is never marked.
        for ty in [0, 8, 12, 5] {
            let f = icmp4_error(ty, [192, 0, 2, 10], &quoted4([192, 0, 2, 10], 6, 443, 0));
            let d = m.classify(&f, 0);
            assert_eq!(d.outcome, Outcome::NoMatch, "type {ty}");
            assert_eq!(d.icmp, Some(Icmp::Informational { ty }));
        }
        // Off: the same error is ICMP to the VIP, which no service matches.
        let off = icmp_model(false);
        let d = off.classify(&f, 0);
        assert_eq!((d.outcome, d.icmp), (Outcome::NoMatch, None));
    }

    #[test]
    fn icmpv6_errors_walk_the_quoted_extension_headers() {
        let m = icmp_model(true);
        let quoted = |sport: u16, exts: usize| {
            let mut ip = ipv6("2001:db8:ff::7", if exts > 0 { 60 } else { 6 });
            ip[8..24].copy_from_slice(&"2001:db8::10".parse::<Ipv6Addr>().unwrap().octets());
            let mut q = ip;
            for i in 0..exts {
                q.extend(ext(if i + 1 == exts { 6 } else { 0 }, 0));
            }
            q.extend(sport.to_be_bytes());
            q.extend([0x9c, 0x40, 0, 0, 0, 1]);
            q
        };
        let error = |ty: u8, q: &[u8]| {
            let mut ip = ipv6("2001:db8::10", 58);
            ip[8..24].copy_from_slice(&"2001:db8:1::1".parse::<Ipv6Addr>().unwrap().octets());
            [
                eth(0x86dd),
                ip,
                vec![ty, 0, 0, 0, 0, 0, 0x05, 0x00],
                q.to_vec(),
            ]
            .concat()
        };
        for ty in 1..=4 {
            assert_eq!(
                mark_of(&m, &error(ty, &quoted(443, 0))),
                Some(80),
                "type {ty}"
            );
        }
        assert_eq!(mark_of(&m, &error(2, &quoted(443, 3))), Some(80));
        assert_eq!(mark_of(&m, &error(2, &quoted(443, 8))), Some(80));
        assert!(matches!(
            m.classify(&error(2, &quoted(443, 9)), 0).icmp,
            Some(Icmp::Malformed(Malformed::TooManyExtHeaders { .. }))
        ));
        // Echo request/reply, neighbour solicitation: informational.
        for ty in [128, 129, 135, 0, 5] {
            assert_eq!(
                m.classify(&error(ty, &quoted(443, 0)), 0).outcome,
                Outcome::NoMatch,
                "type {ty}"
            );
        }
        // An ICMPv4 type number in ICMPv6 means something else: 11 is not an error.
        assert_eq!(
            m.classify(&error(11, &quoted(443, 0)), 0).outcome,
            Outcome::NoMatch
        );
        // ICMPv4 quoting IPv6 is malformed (the quoted version is wrong).
        let mixed = icmp4_error(3, [192, 0, 2, 10], &quoted(443, 0));
        assert_eq!(m.classify(&mixed, 0).outcome, Outcome::Malformed);
    }

    #[test]
    fn icmp_errors_truncated_anywhere_are_malformed() {
        let m = icmp_model(true);
        let full = icmp4_error(3, [192, 0, 2, 10], &quoted4([192, 0, 2, 10], 6, 443, 12));
        let icmp_at = 14 + 20;
        let ports_end = icmp_at + 8 + 32 + 8;
        assert_eq!(full.len(), ports_end);
        for len in 0..=full.len() {
            let d = m.classify(&full[..len], 7);
            let want = if len < icmp_at {
                Outcome::Malformed
            } else if len < ports_end {
                // Outer IP whole: the ICMP header or the quote is cut.
                Outcome::Malformed
            } else {
                d.outcome
            };
            assert_eq!(d.outcome, want, "len {len}");
            assert_eq!(d.mark == 80, len == ports_end, "len {len}");
        }
        // Extra bytes after the 8 quoted ones change nothing.
        let longer = [full.clone(), vec![0; 40]].concat();
        assert_eq!(mark_of(&m, &longer), Some(80));
        // Off: a cut quote is not looked at, so not malformed.
        let off = icmp_model(false);
        assert_eq!(
            off.classify(&full[..icmp_at + 3], 0).outcome,
            Outcome::NoMatch
        );
    }
}
