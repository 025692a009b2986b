//! Header parsers, one small inline function per header, in the style of
//! Cilium's `bpf/lib/`: direct packet access, one bounds check per header,
//! fixed loop bounds. Every header walked must be whole (IPv4 options, IPv6
//! extension headers, the fixed TCP/UDP/SCTP header): a truncated one makes
//! the packet malformed.
//!
//! The IP parsers take the offset of the address they read as a const
//! parameter: the destination of the packet itself, the source of the packet
//! an ICMP error quotes (`icmp_error`), with the same header walk.

use core::{hint::black_box, ptr::read_unaligned};

use aya_ebpf::{
    bindings::bpf_hdr_start_off::BPF_HDR_START_NET, helpers::bpf_skb_load_bytes_relative,
    programs::TcContext,
};

use fwmark_common::{
    ALL_PORTS, FAMILY_IPV4, FAMILY_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP,
    IPPROTO_UDP, MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS, ServiceKey, is_icmp_error,
    wire::{
        EMBEDDED_L4_MIN, ETH_HLEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ICMP_HLEN, IPV4_MIN_HLEN,
        IPV6_DEST_OPTIONS, IPV6_FRAG_HLEN, IPV6_FRAGMENT, IPV6_HLEN, IPV6_HOP_BY_HOP, IPV6_ROUTING,
        SCTP_HLEN, TCP_HLEN, TPID_8021AD, TPID_8021Q, UDP_HLEN, VLAN_HLEN,
    },
};

/// A parsed IP packet: its lookup key and what the counters need.
pub struct Packet {
    /// Family, protocol, destination port (ALL_PORTS for later fragments and
    /// protocols without ports) and destination address.
    pub key: ServiceKey,
    /// A fragment at a non-zero offset: no L4 header.
    pub later_fragment: bool,
    /// Offset of the IP header; bytes are counted from there, like iptables.
    pub l3_offset: u32,
    /// Offset of the header after the IP header(s): where an ICMP message starts.
    pub l4_offset: usize,
}

/// Offsets in the IPv4 and IPv6 headers of the addresses the parsers read.
const IPV4_SRC: usize = 12;
const IPV4_DST: usize = 16;
const IPV6_SRC: usize = 8;
const IPV6_DST: usize = 24;

pub enum Parsed {
    Ip(Packet),
    NonIp,
    Malformed,
}

/// Bounds-checked pointer to `N` bytes at `off`: the one check per header.
#[inline(always)]
fn header<const N: usize>(data: usize, end: usize, off: usize) -> Option<*const [u8; N]> {
    let start = data + off;
    if start + N > end {
        return None;
    }
    Some(start as *const [u8; N])
}

/// Whether `len` bytes at `off` are inside the packet: the check for a
/// header whose length is only known at run time (IPv4 options, IPv6
/// extension headers). A truncated header is malformed even where its
/// contents are not needed.
#[inline(always)]
fn fits(data: usize, end: usize, off: usize, len: usize) -> bool {
    data + off + len <= end
}

#[inline(always)]
fn be16(hi: u8, lo: u8) -> u16 {
    u16::from_be_bytes([hi, lo])
}

/// Ethernet plus up to [`MAX_VLAN_TAGS`] 802.1Q/802.1ad tags:
/// returns (ethertype, offset of the L3 header).
#[inline(always)]
fn ethernet(data: usize, end: usize) -> Option<(u16, usize)> {
    let eth = header::<ETH_HLEN>(data, end, 0)?;
    // SAFETY: `header` checked that ETH_HLEN bytes are inside the packet.
    let mut proto = unsafe { be16((*eth)[12], (*eth)[13]) };
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != TPID_8021Q && proto != TPID_8021AD {
            break;
        }
        let tag = header::<VLAN_HLEN>(data, end, off)?;
        // SAFETY: bounds checked by `header`.
        proto = unsafe { be16((*tag)[2], (*tag)[3]) };
        off += VLAN_HLEN;
    }
    Some((proto, off))
}

/// IPv4 with any IHL: fills family and the address at `ADDR`, returns
/// (protocol, L4 offset, later fragment).
#[inline(always)]
fn ipv4<const ADDR: usize>(
    data: usize,
    end: usize,
    off: usize,
    key: &mut ServiceKey,
) -> Option<(u8, usize, bool)> {
    let ip = header::<IPV4_MIN_HLEN>(data, end, off)?;
    // SAFETY: bounds checked by `header`.
    let (ver_ihl, frag, proto, daddr) = unsafe {
        (
            (*ip)[0],
            be16((*ip)[6], (*ip)[7]),
            (*ip)[9],
            read_unaligned(ip.cast::<u8>().add(ADDR).cast::<[u8; 4]>()),
        )
    };
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN || !fits(data, end, off, ihl) {
        return None;
    }
    key.family = FAMILY_IPV4;
    key.addr[0] = u32::from_ne_bytes(daddr);
    // Fragment offset (low 13 bits) non-zero: payload only, no L4 header.
    Some((proto, off + ihl, frag & 0x1fff != 0))
}

/// IPv6 plus its extension headers (hop-by-hop, routing, destination
/// options, fragment), at most [`MAX_IPV6_EXT_HEADERS`] of them; fills family
/// and the address at `ADDR`.
#[inline(always)]
fn ipv6<const ADDR: usize>(
    data: usize,
    end: usize,
    off: usize,
    key: &mut ServiceKey,
) -> Option<(u8, usize, bool)> {
    let ip = header::<IPV6_HLEN>(data, end, off)?;
    // SAFETY: bounds checked by `header`.
    let (version, mut next, daddr) = unsafe {
        (
            (*ip)[0] >> 4,
            (*ip)[6],
            read_unaligned(ip.cast::<u8>().add(ADDR).cast::<[[u8; 4]; 4]>()),
        )
    };
    if version != 6 {
        return None;
    }
    key.family = FAMILY_IPV6;
    key.addr = [
        u32::from_ne_bytes(daddr[0]),
        u32::from_ne_bytes(daddr[1]),
        u32::from_ne_bytes(daddr[2]),
        u32::from_ne_bytes(daddr[3]),
    ];
    let mut off = off + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS => {
                let ext = header::<2>(data, end, off)?;
                // SAFETY: bounds checked by `header`.
                let (nh, len) = unsafe { ((*ext)[0], (*ext)[1]) };
                let len = (usize::from(len) + 1) * 8;
                if !fits(data, end, off, len) {
                    return None;
                }
                next = nh;
                off += len;
            }
            IPV6_FRAGMENT => {
                let frag = header::<IPV6_FRAG_HLEN>(data, end, off)?;
                // SAFETY: bounds checked by `header`.
                let (nh, offset) = unsafe { ((*frag)[0], be16((*frag)[2], (*frag)[3]) & 0xfff8) };
                if offset != 0 {
                    // A later fragment: what follows is payload, stop here.
                    return Some((nh, off + IPV6_FRAG_HLEN, true));
                }
                next = nh;
                off += IPV6_FRAG_HLEN;
            }
            _ => return Some((next, off, false)),
        }
    }
    match next {
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS | IPV6_FRAGMENT => None,
        _ => Some((next, off, false)),
    }
}

/// Destination port (bytes 2..4) of a transport header of `N` bytes, which
/// must be whole: iptables' port matches do not match a truncated one.
#[inline(always)]
fn port_of<const N: usize>(data: usize, end: usize, off: usize) -> Option<[u8; 2]> {
    let l4 = header::<N>(data, end, off)?;
    // SAFETY: bounds checked by `header`.
    Some(unsafe { [(*l4)[2], (*l4)[3]] })
}

/// Destination port of TCP (20-byte header), UDP (8) and SCTP (12-byte
/// common header).
#[inline(always)]
fn dest_port(data: usize, end: usize, off: usize, proto: u8) -> Option<[u8; 2]> {
    match proto {
        IPPROTO_TCP => port_of::<TCP_HLEN>(data, end, off),
        IPPROTO_UDP => port_of::<UDP_HLEN>(data, end, off),
        _ => port_of::<SCTP_HLEN>(data, end, off),
    }
}

/// Parses the Ethernet frame in `[data, data_end)`.
#[inline(always)]
pub fn packet(data: usize, data_end: usize) -> Parsed {
    let Some((ethertype, l3)) = ethernet(data, data_end) else {
        return Parsed::Malformed;
    };
    ip(data, data_end, ethertype, l3)
}

/// The most bytes an L3 device's skb may carry in front of its network
/// header at TC ingress (see [`network_offset`]).
pub const MAX_L3_HEADROOM: u32 = 128;

/// Parses the packet of an L3 device (tun, WireGuard, ipip, GRE, ...):
/// the IP header sits at the skb's network header, and the family comes
/// from the skb's protocol (`ETH_P_IP`, `ETH_P_IPV6`), not from a header.
#[inline(always)]
pub fn packet_l3(ctx: &TcContext) -> Parsed {
    // `protocol` holds the __be16 in its low 16 bits.
    let protocol = u16::from_be(ctx.skb.protocol() as u16);
    if protocol != ETHERTYPE_IPV4 && protocol != ETHERTYPE_IPV6 {
        return Parsed::NonIp;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(l3) = network_offset(ctx, data, data_end) else {
        return Parsed::Malformed;
    };
    ip(data, data_end, protocol, l3 as usize)
}

/// Where the network header is, counted from `data`: the skb's `mac_len`,
/// which TC ingress pushed in front of it. It is 0 on tun, WireGuard and
/// (Linux >= 5.14) ipip devices, but not everywhere: ipip before 5.14 keeps
/// the outer Ethernet and IP headers there, a GRE device without a fixed
/// remote the outer IP and GRE headers, and `BPF_PROG_TEST_RUN` an Ethernet
/// header. `__sk_buff` has no field for it, so it is measured: a 1-byte
/// `bpf_skb_load_bytes_relative` from the network header at offset
/// `linear - m - 1` succeeds exactly when `m >= mac_len` (the helper reads
/// the linear part only, which ends at `data_end`). One call when it is 0,
/// a binary search of 8 more otherwise; more than [`MAX_L3_HEADROOM`] bytes
/// (or a linear part over 64 KiB, which the helper refuses) is `None`.
///
/// The search is arithmetic, not branches, with the probe's answer hidden
/// from LLVM (`black_box`): with branches every path would end at its own
/// constant offset, and the verifier would walk the parsers once per
/// constant (over its million-instruction limit).
#[inline(always)]
fn network_offset(ctx: &TcContext, data: usize, data_end: usize) -> Option<u32> {
    // A scalar (pointer subtraction needs CAP_PERFMON, which loading needs).
    let linear = (data_end - data) as i64;
    // 1 when `m >= mac_len`, else 0.
    let covers = |m: i64| -> i64 {
        // For m >= linear (mac_len <= linear <= m) the probe reads the
        // network header's first byte, there unless mac_len == linear, a
        // packet with no network header (malformed either way).
        let past = linear - m - 1;
        let offset = if past < 0 { 0 } else { past as u32 };
        let mut byte = 0u8;
        // SAFETY: the helper writes at most 1 byte into `byte`; `ctx.skb`
        // is the context pointer the kernel passed.
        let ret = unsafe {
            bpf_skb_load_bytes_relative(
                ctx.skb.skb as *const _,
                offset,
                (&mut byte as *mut u8).cast(),
                1,
                BPF_HDR_START_NET,
            )
        };
        // 0 (read) or a negative errno.
        black_box(((ret as u64 >> 63) ^ 1) as i64)
    };
    if covers(0) == 1 {
        return Some(0);
    }
    let max = i64::from(MAX_L3_HEADROOM);
    if covers(max) == 0 {
        return None;
    }
    // covers(lo) == 0, covers(hi) == 1: mac_len is in (lo, hi].
    let (mut lo, mut hi) = (0i64, max);
    for _ in 0..8 {
        let mid = lo + (hi - lo) / 2;
        let c = covers(mid);
        hi -= c * (hi - mid);
        lo += (1 - c) * (mid - lo);
    }
    if !(1..=max).contains(&hi) {
        return None;
    }
    // Bounds for the verifier, which cannot follow the arithmetic (and
    // before 6.x not the range check either): a mask LLVM cannot drop.
    Some(black_box(hi as u32) & 0xff)
}

/// The IP packet at `l3` whose family `ethertype` names: IPv4 or IPv6 with
/// its extension headers, then the TCP/UDP/SCTP destination port.
#[inline(always)]
fn ip(data: usize, data_end: usize, ethertype: u16, l3: usize) -> Parsed {
    let mut key = ServiceKey {
        family: 0,
        proto: 0,
        port: ALL_PORTS.to_be_bytes(),
        addr: [0; 4],
    };
    let l3_result = match ethertype {
        ETHERTYPE_IPV4 => ipv4::<IPV4_DST>(data, data_end, l3, &mut key),
        ETHERTYPE_IPV6 => ipv6::<IPV6_DST>(data, data_end, l3, &mut key),
        _ => return Parsed::NonIp,
    };
    let Some((proto, l4, later_fragment)) = l3_result else {
        return Parsed::Malformed;
    };
    key.proto = proto;
    if !later_fragment && matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        match dest_port(data, data_end, l4, proto) {
            Some(port) => key.port = port,
            None => return Parsed::Malformed,
        }
    }
    Parsed::Ip(Packet {
        key,
        later_fragment,
        l3_offset: l3 as u32,
        l4_offset: l4,
    })
}

/// Whether `pkt` is an ICMP message of its own family (ICMP in IPv4,
/// ICMPv6 in IPv6) with its header in this packet: the only packets
/// [`icmp_error`] looks at. One compare on every other packet.
#[inline(always)]
pub fn is_icmp(pkt: &Packet) -> bool {
    !pkt.later_fragment
        && ((pkt.key.proto == IPPROTO_ICMP && pkt.key.family == FAMILY_IPV4)
            || (pkt.key.proto == IPPROTO_ICMPV6 && pkt.key.family == FAMILY_IPV6))
}

/// What an ICMP message looks like under `icmp_errors = true`.
pub enum Icmp {
    /// Informational (echo, neighbour discovery, ...): looked up as it is.
    Informational,
    /// An error: the key of the packet it quotes (its family, protocol,
    /// SOURCE port and SOURCE address), and whether that packet is a later
    /// fragment (looked up without its port).
    Error(ServiceKey, bool),
    /// The ICMP header or the quoted headers are truncated or malformed.
    Malformed,
}

/// The ICMP message at `pkt.l4_offset`: its 8-byte header must be whole; an
/// error's quoted packet is parsed by the same IP parsers as the packet
/// itself (IPv4 options, IPv6 extension headers), reading the source
/// address, and must carry [`EMBEDDED_L4_MIN`] bytes of its TCP, UDP or
/// SCTP header, of which the source port is the key's port.
#[inline(always)]
pub fn icmp_error(data: usize, end: usize, pkt: &Packet) -> Icmp {
    let Some(icmp) = header::<ICMP_HLEN>(data, end, pkt.l4_offset) else {
        return Icmp::Malformed;
    };
    let v6 = pkt.key.family == FAMILY_IPV6;
    // SAFETY: bounds checked by `header`.
    let ty = unsafe { (*icmp)[0] };
    if !is_icmp_error(v6, ty) {
        return Icmp::Informational;
    }
    let mut key = ServiceKey {
        family: 0,
        proto: 0,
        port: ALL_PORTS.to_be_bytes(),
        addr: [0; 4],
    };
    let inner = pkt.l4_offset + ICMP_HLEN;
    let quoted = if v6 {
        ipv6::<IPV6_SRC>(data, end, inner, &mut key)
    } else {
        ipv4::<IPV4_SRC>(data, end, inner, &mut key)
    };
    let Some((proto, l4, later_fragment)) = quoted else {
        return Icmp::Malformed;
    };
    key.proto = proto;
    if !later_fragment && matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        let Some(l4) = header::<EMBEDDED_L4_MIN>(data, end, l4) else {
            return Icmp::Malformed;
        };
        // SAFETY: bounds checked by `header`; the source port is bytes 0..2.
        key.port = unsafe { [(*l4)[0], (*l4)[1]] };
    }
    Icmp::Error(key, later_fragment)
}
