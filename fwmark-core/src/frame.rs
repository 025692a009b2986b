//! Ethernet frames built from a description, from etherparse's header
//! types (etherparse has no SCTP: its 12-byte common header is the one part
//! written here). An ICMP error ([`Frame::icmp_error`]) quotes another
//! frame's IP packet, with a correct ICMP/ICMPv6 checksum (IPVS checks it). The one frame builder: `fwmark explain` builds the frame
//! of a described packet with it, and the test lab its classifier,
//! differential, benchmark and end-to-end frames.

use std::net::IpAddr;

use fwmark_common::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type, IpFragOffset,
    IpNumber, Ipv4Header, Ipv4Options, Ipv6FlowLabel, Ipv6FragmentHeader, Ipv6Header,
    Ipv6RawExtHeader, SingleVlanHeader, TcpHeader, UdpHeader, VlanId,
};

/// Client address every frame comes from.
pub const SRC_V4: [u8; 4] = [203, 0, 113, 7];
/// Client address of IPv6 frames.
pub const SRC_V6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,
];
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// Source port of every TCP, UDP and SCTP frame unless set ([`Frame::from_port`]).
pub const SRC_PORT: u16 = 40000;

/// TPID of an 802.1Q tag.
pub const TPID_8021Q: u16 = 0x8100;

/// The transport part of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp(u16),
    Udp(u16),
    Sctp(u16),
    /// Any other IP protocol, with an 8-byte opaque header.
    Other(u8),
}

impl L4 {
    /// The transport part for protocol `proto` and destination `port`
    /// (`None`, for TCP, UDP or SCTP: port 0, as in a later fragment,
    /// whose transport header is not in the frame).
    pub fn new(proto: u8, port: Option<u16>) -> L4 {
        let port = port.unwrap_or(0);
        match proto {
            IPPROTO_TCP => L4::Tcp(port),
            IPPROTO_UDP => L4::Udp(port),
            IPPROTO_SCTP => L4::Sctp(port),
            n => L4::Other(n),
        }
    }

    fn number(self) -> IpNumber {
        match self {
            L4::Tcp(_) => IpNumber::TCP,
            L4::Udp(_) => IpNumber::UDP,
            L4::Sctp(_) => IpNumber(132),
            L4::Other(n) => IpNumber(n),
        }
    }

    /// Length of the header [`Frame::build`] writes for it.
    pub fn header_len(self) -> usize {
        match self {
            L4::Tcp(_) => TcpHeader::MIN_LEN,
            L4::Udp(_) | L4::Other(_) => 8,
            L4::Sctp(_) => 12,
        }
    }

    fn bytes(self, src_port: u16, payload_len: usize) -> Vec<u8> {
        match self {
            L4::Tcp(port) => {
                let mut h = TcpHeader::new(src_port, port, 1, 64240);
                h.syn = true;
                h.to_bytes().to_vec()
            }
            L4::Udp(port) => UdpHeader {
                source_port: src_port,
                destination_port: port,
                length: (UdpHeader::LEN + payload_len) as u16,
                checksum: 0,
            }
            .to_bytes()
            .to_vec(),
            L4::Sctp(port) => {
                let mut h = Vec::with_capacity(12);
                h.extend_from_slice(&src_port.to_be_bytes());
                h.extend_from_slice(&port.to_be_bytes());
                h.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // verification tag
                h.extend_from_slice(&0u32.to_be_bytes()); // checksum (not checked here)
                h
            }
            L4::Other(_) => vec![0; 8],
        }
    }
}

/// An IPv6 extension header to put between the IPv6 header and L4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOptions,
    /// Fragment header with this offset (in 8-byte units) and M flag.
    Fragment {
        offset: u16,
        more: bool,
    },
}

impl Ext {
    fn number(self) -> IpNumber {
        match self {
            Ext::HopByHop => IpNumber::IPV6_HEADER_HOP_BY_HOP,
            Ext::Routing => IpNumber::IPV6_ROUTE_HEADER,
            Ext::DestOptions => IpNumber::IPV6_DESTINATION_OPTIONS,
            Ext::Fragment { .. } => IpNumber::IPV6_FRAGMENTATION_HEADER,
        }
    }

    /// Length of the header [`Frame::build`] writes for it.
    pub fn header_len(self) -> usize {
        match self {
            Ext::HopByHop | Ext::DestOptions => 16,
            Ext::Routing | Ext::Fragment { .. } => 8,
        }
    }

    fn bytes(self, next: IpNumber) -> Vec<u8> {
        match self {
            // Options padded with PadN to 14 bytes: a 16-byte header.
            Ext::HopByHop | Ext::DestOptions => {
                Ipv6RawExtHeader::new_raw(next, &[1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
                    .expect("valid extension payload")
                    .to_bytes()
                    .to_vec()
            }
            // Routing type 4 (SRH-like layout), segments left 0: 8 bytes.
            Ext::Routing => Ipv6RawExtHeader::new_raw(next, &[4, 0, 0, 0, 0, 0])
                .expect("valid extension payload")
                .to_bytes()
                .to_vec(),
            Ext::Fragment { offset, more } => Ipv6FragmentHeader {
                next_header: next,
                fragment_offset: IpFragOffset::try_new(offset).expect("13-bit offset"),
                more_fragments: more,
                identification: 0xfeed,
            }
            .to_bytes()
            .to_vec(),
        }
    }
}

/// One VLAN tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    /// 0x8100 (802.1Q), 0x88a8 (802.1ad) or any other value.
    pub tpid: u16,
    /// VLAN id (0-4095).
    pub vid: u16,
}

/// An ICMP (IPv4) or ICMPv6 (IPv6) message in place of the transport
/// header: its type, code, bytes 4..8 (the MTU of "fragmentation needed"
/// and "packet too big") and what follows: for an error, the quoted packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icmp {
    pub ty: u8,
    pub code: u8,
    pub rest: [u8; 4],
    pub body: Vec<u8>,
}

/// ICMPv4 destination unreachable.
pub const ICMP_DEST_UNREACH: u8 = 3;
/// Its code "fragmentation needed and DF set".
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMPv6 packet too big.
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;

/// Everything a frame can vary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// VLAN tags, outermost first.
    pub vlans: Vec<Tag>,
    /// Source address: [`SRC_V4`] / [`SRC_V6`] unless set.
    pub src: Option<IpAddr>,
    /// Source port of TCP, UDP and SCTP ([`SRC_PORT`] unless set).
    pub src_port: u16,
    pub dst: IpAddr,
    /// An ICMP message in place of `l4` (whose protocol it replaces with
    /// ICMP or ICMPv6 by the family of `dst`).
    pub icmp: Option<Icmp>,
    pub l4: L4,
    /// IPv4 options (a multiple of 4 bytes, at most 40).
    pub ipv4_options: Vec<u8>,
    /// IPv4 fragment offset in 8-byte units, and the MF flag (a fragment
    /// has DF clear; any other frame DF set).
    pub ipv4_fragment: (u16, bool),
    /// IPv6 extension headers in order.
    pub ipv6_ext: Vec<Ext>,
    /// Bytes after the L4 header.
    pub payload_len: usize,
}

impl Frame {
    /// A plain frame: no VLAN, no options, not fragmented, 16 bytes of payload.
    /// Panics unless `dst` is an IP address (for tests; see [`Frame::to`]).
    pub fn new(dst: &str, l4: L4) -> Frame {
        Frame::to(dst.parse().expect("an IP address"), l4)
    }

    /// A plain frame to `dst`.
    pub fn to(dst: IpAddr, l4: L4) -> Frame {
        Frame {
            vlans: Vec::new(),
            src: None,
            src_port: SRC_PORT,
            dst,
            icmp: None,
            l4,
            ipv4_options: Vec::new(),
            ipv4_fragment: (0, false),
            ipv6_ext: Vec::new(),
            payload_len: 16,
        }
    }

    /// Tags with these TPIDs, outermost first, with VLAN ids 100, 101, ...
    pub fn vlans(mut self, tpids: &[u16]) -> Frame {
        self.vlans = (100..)
            .zip(tpids)
            .map(|(vid, &tpid)| Tag { tpid, vid })
            .collect();
        self
    }

    /// 802.1Q tags with these VLAN ids, outermost first.
    pub fn vlan_ids(mut self, ids: &[u16]) -> Frame {
        self.vlans = ids
            .iter()
            .map(|&vid| Tag {
                tpid: TPID_8021Q,
                vid,
            })
            .collect();
        self
    }

    pub fn ipv4_options(mut self, options: &[u8]) -> Frame {
        self.ipv4_options = options.to_vec();
        self
    }

    pub fn ipv4_fragment(mut self, offset: u16, more: bool) -> Frame {
        self.ipv4_fragment = (offset, more);
        self
    }

    pub fn ipv6_ext(mut self, ext: &[Ext]) -> Frame {
        self.ipv6_ext = ext.to_vec();
        self
    }

    /// From `src` instead of the client address.
    pub fn from(mut self, src: IpAddr) -> Frame {
        self.src = Some(src);
        self
    }

    /// From source port `port`.
    pub fn from_port(mut self, port: u16) -> Frame {
        self.src_port = port;
        self
    }

    /// The source address.
    pub fn source(&self) -> IpAddr {
        self.src.unwrap_or(match self.dst {
            IpAddr::V4(_) => IpAddr::from(SRC_V4),
            IpAddr::V6(_) => IpAddr::from(SRC_V6),
        })
    }

    /// An ICMP message (ICMPv6 for an IPv6 `dst`) from `router` to `dst`
    /// with type `ty`, code `code`, bytes 4..8 `rest` and `body` after the
    /// 8-byte header.
    pub fn icmp(
        router: IpAddr,
        dst: IpAddr,
        ty: u8,
        code: u8,
        rest: [u8; 4],
        body: &[u8],
    ) -> Frame {
        let proto = if dst.is_ipv6() { 58 } else { 1 };
        let mut f = Frame::to(dst, L4::Other(proto)).from(router);
        f.icmp = Some(Icmp {
            ty,
            code,
            rest,
            body: body.to_vec(),
        });
        f.payload_len = 0;
        f
    }

    /// An ICMP error about `quoted` (a packet the director sent, from the
    /// VIP to a client), as a router on the way sends it back: from
    /// `router` to `quoted`'s source, quoting the first `quoted_len` bytes
    /// of `quoted`'s IP packet (all of it if shorter).
    pub fn icmp_error(
        router: IpAddr,
        ty: u8,
        code: u8,
        rest: [u8; 4],
        quoted: &Frame,
        quoted_len: usize,
    ) -> Frame {
        let ip = quoted.ip_packet();
        let body = &ip[..quoted_len.min(ip.len())];
        Frame::icmp(router, quoted.source(), ty, code, rest, body)
    }

    /// The IP packet: the frame without its Ethernet header and tags.
    pub fn ip_packet(&self) -> Vec<u8> {
        self.build()[l3_offset(self.vlans.len())..].to_vec()
    }

    /// Offset of the transport header (or ICMP header) in the frame.
    pub fn l4_offset(&self) -> usize {
        let ip = match self.dst {
            IpAddr::V4(_) => 20 + self.ipv4_options.len(),
            IpAddr::V6(_) => 40 + self.ipv6_ext.iter().map(|e| e.header_len()).sum::<usize>(),
        };
        l3_offset(self.vlans.len()) + ip
    }

    /// The ICMP header and body, with its checksum.
    fn icmp_bytes(&self, icmp: &Icmp) -> Vec<u8> {
        let mut out = match (self.source(), self.dst) {
            (IpAddr::V6(src), IpAddr::V6(dst)) => Icmpv6Header::with_checksum(
                Icmpv6Type::Unknown {
                    type_u8: icmp.ty,
                    code_u8: icmp.code,
                    bytes5to8: icmp.rest,
                },
                src.octets(),
                dst.octets(),
                &icmp.body,
            )
            .expect("ICMPv6 body fits")
            .to_bytes()
            .to_vec(),
            _ => Icmpv4Header::with_checksum(
                Icmpv4Type::Unknown {
                    type_u8: icmp.ty,
                    code_u8: icmp.code,
                    bytes5to8: icmp.rest,
                },
                &icmp.body,
            )
            .to_bytes()
            .to_vec(),
        };
        out.extend_from_slice(&icmp.body);
        out
    }

    /// A fragment at a non-zero offset: 8 bytes of payload stand where the
    /// transport header would be.
    pub fn later_fragment(&self) -> bool {
        match self.dst {
            IpAddr::V4(_) => self.ipv4_fragment.0 != 0,
            IpAddr::V6(_) => self
                .ipv6_ext
                .iter()
                .any(|e| matches!(e, Ext::Fragment { offset, .. } if *offset != 0)),
        }
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let l3_type = match self.dst {
            IpAddr::V4(_) => EtherType::IPV4,
            IpAddr::V6(_) => EtherType::IPV6,
        };
        let mut out = Vec::new();
        let first_type = self.vlans.first().map_or(l3_type, |t| EtherType(t.tpid));
        out.extend_from_slice(
            &Ethernet2Header {
                source: SRC_MAC,
                destination: DST_MAC,
                ether_type: first_type,
            }
            .to_bytes(),
        );
        for (i, tag) in self.vlans.iter().enumerate() {
            let inner = self.vlans.get(i + 1).map_or(l3_type, |t| EtherType(t.tpid));
            out.extend_from_slice(
                &SingleVlanHeader {
                    pcp: Default::default(),
                    drop_eligible_indicator: false,
                    vlan_id: VlanId::try_new(tag.vid).expect("a 12-bit VLAN id"),
                    ether_type: inner,
                }
                .to_bytes(),
            );
        }

        // A later fragment carries payload where the L4 header would be.
        let l4 = if self.later_fragment() {
            vec![0xab; 8]
        } else if let Some(icmp) = &self.icmp {
            self.icmp_bytes(icmp)
        } else {
            self.l4.bytes(self.src_port, self.payload_len)
        };
        let src = self.source();
        let payload = vec![0x5a; self.payload_len];

        match self.dst {
            IpAddr::V4(dst) => {
                let mut ip = Ipv4Header::new(
                    (l4.len() + payload.len()) as u16,
                    64,
                    self.l4.number(),
                    match src {
                        IpAddr::V4(a) => a.octets(),
                        IpAddr::V6(_) => SRC_V4,
                    },
                    dst.octets(),
                )
                .expect("ipv4 payload fits");
                ip.options = Ipv4Options::try_from(&self.ipv4_options[..]).expect("valid options");
                ip.fragment_offset =
                    IpFragOffset::try_new(self.ipv4_fragment.0).expect("13-bit offset");
                ip.more_fragments = self.ipv4_fragment.1;
                // Don't fragment, unless it is a fragment.
                ip.dont_fragment = self.ipv4_fragment == (0, false);
                ip.total_len = (ip.header_len() + l4.len() + payload.len()) as u16;
                ip.header_checksum = ip.calc_header_checksum();
                out.extend_from_slice(&ip.to_bytes());
            }
            IpAddr::V6(dst) => {
                let mut ext_bytes = Vec::new();
                for (i, ext) in self.ipv6_ext.iter().enumerate() {
                    let next = self
                        .ipv6_ext
                        .get(i + 1)
                        .map_or(self.l4.number(), |e| e.number());
                    ext_bytes.extend(ext.bytes(next));
                }
                let ip = Ipv6Header {
                    traffic_class: 0,
                    flow_label: Ipv6FlowLabel::ZERO,
                    payload_length: (ext_bytes.len() + l4.len() + payload.len()) as u16,
                    next_header: self
                        .ipv6_ext
                        .first()
                        .map_or(self.l4.number(), |e| e.number()),
                    hop_limit: 64,
                    source: match src {
                        IpAddr::V6(a) => a.octets(),
                        IpAddr::V4(_) => SRC_V6,
                    },
                    destination: dst.octets(),
                };
                out.extend_from_slice(&ip.to_bytes());
                out.extend(ext_bytes);
            }
        }
        out.extend(l4);
        out.extend(payload);
        out
    }
}

/// Offset of the IP header in a frame with `vlans` tags.
pub fn l3_offset(vlans: usize) -> usize {
    14 + 4 * vlans
}
