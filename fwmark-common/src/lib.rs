//! Everything that crosses the kernel boundary between the fwmark classifier
//! (`fwmark-ebpf`) and its loader (`fwmark-user`).
//!
//! Every type is `#[repr(C)]`, has no implicit padding, and its size and
//! alignment are asserted at compile time, so both sides agree byte for byte.
#![no_std]

use core::mem::{align_of, size_of};

/// Names of the maps in the eBPF object, as the loader looks them up.
pub mod map_names {
    /// `Array<u32, 1>`: index of the generation the classifier uses.
    pub const ACTIVE: &str = "ACTIVE";
    /// `ArrayOfMaps<HashMap<ServiceKey4, Target>, 2>`: exact IPv4-address
    /// entries per generation (8-byte key).
    pub const EXACT4: &str = "EXACT4";
    /// `ArrayOfMaps<HashMap<ServiceKey, Target>, 2>`: exact IPv6-address
    /// entries per generation.
    pub const EXACT: &str = "EXACT";
    /// `ArrayOfMaps<HashMap<ServiceKey4, RangeTable>, 2>`: port ranges of
    /// exact IPv4 addresses per generation (key port [`super::ALL_PORTS`]).
    pub const RANGE4: &str = "RANGE4";
    /// `ArrayOfMaps<HashMap<ServiceKey, RangeTable>, 2>`: port ranges of
    /// exact IPv6 addresses per generation.
    pub const RANGE6: &str = "RANGE6";
    /// `ArrayOfMaps<LpmTrie<ServiceKey, Target>, 2>`: prefix entries per generation.
    pub const PREFIX: &str = "PREFIX";
    /// `PerCpuArray<RuleCounters>`: packets and bytes per rule.
    pub const RULE_STATS: &str = "RULE_STATS";
    /// `PerCpuArray<GlobalCounters, MAX_INTERFACES>`: global counters, one
    /// slot per interface the maps are attached to ([`IFACE_SLOT`]).
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
}

/// Interfaces one set of maps can be attached to at once: the slots of
/// `GLOBAL_STATS`.
pub const MAX_INTERFACES: u32 = 64;

/// Name of the classifier's read-only global that picks its
/// `GLOBAL_STATS` slot: the loader sets it per interface (each interface
/// gets its own load of the program against the same maps), so finding
/// the slot costs one load of a frozen constant per packet.
pub const IFACE_SLOT: &str = "FWMARK_IFACE_SLOT";

/// Version of the pinned maps' layout (their names, key and value types,
/// the `ACTIVE` word). The loader records it in the interface's state and
/// refuses to adopt pins of another version; change it with any of those.
/// Pins of the previous version (2) are upgraded in place by `fwmark run`
/// (`fwmark::upgrade`), which names that version's maps and types itself.
pub const ABI_VERSION: u32 = 3;

/// Name of the classifier program in the eBPF object.
pub const PROGRAM_NAME: &str = "fwmark";
/// Name of the classifier's entry for L3 devices (tun, WireGuard, ipip,
/// ip6tnl, sit, GRE): packets start at the IP header, the family is the
/// skb's protocol. Same maps as [`PROGRAM_NAME`].
pub const PROGRAM_NAME_L3: &str = "fwmark_l3";

/// What a device's packets start with at TC ingress, which picks the
/// classifier's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Link {
    /// An Ethernet header (Ethernet, bond, VLAN, veth, gretap, vxlan, lo).
    Ethernet,
    /// The IP header; the family comes from the skb's protocol.
    L3,
}

impl Link {
    /// The classifier program for this link.
    pub const fn program_name(self) -> &'static str {
        match self {
            Link::Ethernet => PROGRAM_NAME,
            Link::L3 => PROGRAM_NAME_L3,
        }
    }
}
/// Name of the benchmark floor program (returns at once; never attached),
/// the one program of its own eBPF object, `fwmark-floor`.
pub const FLOOR_PROGRAM_NAME: &str = "fwmark_floor";

/// VLAN tags parsed in the packet data before the L3 header; a frame with
/// one more is not IP. (At TC ingress the kernel has usually moved the
/// outermost tag to `skb->vlan_tci` already, which leaves the data untagged.)
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before the L4 header; a longer chain is
/// malformed.
pub const MAX_IPV6_EXT_HEADERS: usize = 8;

/// Number of configuration generations the classifier can switch between.
pub const GENERATIONS: u32 = 2;

/// Bits of the `ACTIVE` value that hold the generation index.
pub const ACTIVE_GENERATION_MASK: u32 = 0xff;
/// Set in the `ACTIVE` value when the active generation has prefix entries;
/// without it the classifier skips the LPM lookups. Switching generation and
/// this flag is one 32-bit write, so a packet never sees one without the other.
pub const ACTIVE_HAS_PREFIX: u32 = 1 << 8;

/// Set in the `ACTIVE` value when the active generation has port ranges
/// (`RANGE4`/`RANGE6` entries); without it the classifier skips the range
/// lookup, so a config without ranges pays nothing for them.
pub const ACTIVE_HAS_RANGE: u32 = 1 << 10;

/// Set in the `ACTIVE` value when the active generation's config has
/// `icmp_errors = true`: ICMP errors get the mark of the service their
/// embedded packet came from. Part of the same 32-bit word as the generation,
/// so turning it on or off switches atomically with the entries.
pub const ACTIVE_ICMP_ERRORS: u32 = 1 << 9;

/// Value of [`ServiceKey::family`] for IPv4.
pub const FAMILY_IPV4: u8 = 4;
/// Value of [`ServiceKey::family`] for IPv6.
pub const FAMILY_IPV6: u8 = 6;

/// IP protocol numbers fwmark classifies.
pub const IPPROTO_TCP: u8 = 6;
/// UDP.
pub const IPPROTO_UDP: u8 = 17;
/// SCTP.
pub const IPPROTO_SCTP: u8 = 132;
/// ICMP (inside IPv4).
pub const IPPROTO_ICMP: u8 = 1;
/// ICMPv6 (inside IPv6).
pub const IPPROTO_ICMPV6: u8 = 58;

/// Whether an ICMP message of type `ty` is an error that quotes the packet
/// it is about, as IPVS handles them (`ip_vs_in_icmp`, `ip_vs_in_icmp_v6`):
/// ICMPv4 destination unreachable (3), source quench (4) and time exceeded
/// (11); ICMPv6 destination unreachable (1), packet too big (2), time
/// exceeded (3) and parameter problem (4). Everything else (echo, router
/// and neighbour discovery, ...) is informational and never marked.
#[inline(always)]
pub const fn is_icmp_error(ipv6: bool, ty: u8) -> bool {
    if ipv6 {
        matches!(ty, 1..=4)
    } else {
        matches!(ty, 3 | 4 | 11)
    }
}

/// Header formats the classifier parses: lengths, ethertypes and IPv6
/// extension header numbers (the IP protocol numbers are [`IPPROTO_TCP`]
/// and its neighbours). The classifier and userspace's model of it both
/// parse by these.
pub mod wire {
    /// Ethernet header: destination, source, ethertype.
    pub const ETH_HLEN: usize = 14;
    /// One 802.1Q/802.1ad tag: TCI and the inner ethertype.
    pub const VLAN_HLEN: usize = 4;
    /// IPv4 header without options (IHL 5).
    pub const IPV4_MIN_HLEN: usize = 20;
    /// The fixed IPv6 header.
    pub const IPV6_HLEN: usize = 40;
    /// The IPv6 fragment header.
    pub const IPV6_FRAG_HLEN: usize = 8;
    /// The fixed TCP header the destination port is read from.
    pub const TCP_HLEN: usize = 20;
    /// The UDP header.
    pub const UDP_HLEN: usize = 8;
    /// The SCTP common header.
    pub const SCTP_HLEN: usize = 12;
    /// The ICMP and ICMPv6 header: type, code, checksum and 4 bytes that
    /// depend on the type; an error's quoted packet follows it.
    pub const ICMP_HLEN: usize = 8;
    /// Bytes of the quoted packet's transport header an ICMP error must
    /// carry (RFC 792 quotes "the first 64 bits"): enough for TCP's, UDP's
    /// and SCTP's source and destination ports.
    pub const EMBEDDED_L4_MIN: usize = 8;

    /// Ethertype of IPv4 (`ETH_P_IP`).
    pub const ETHERTYPE_IPV4: u16 = 0x0800;
    /// Ethertype of IPv6 (`ETH_P_IPV6`).
    pub const ETHERTYPE_IPV6: u16 = 0x86dd;
    /// Tag protocol of an 802.1Q VLAN tag (`ETH_P_8021Q`).
    pub const TPID_8021Q: u16 = 0x8100;
    /// Tag protocol of an 802.1ad (QinQ service) tag (`ETH_P_8021AD`).
    pub const TPID_8021AD: u16 = 0x88a8;

    /// IPv6 hop-by-hop options header (`NEXTHDR_HOP`).
    pub const IPV6_HOP_BY_HOP: u8 = 0;
    /// IPv6 routing header (`NEXTHDR_ROUTING`).
    pub const IPV6_ROUTING: u8 = 43;
    /// IPv6 fragment header (`NEXTHDR_FRAGMENT`).
    pub const IPV6_FRAGMENT: u8 = 44;
    /// IPv6 destination options header (`NEXTHDR_DEST`).
    pub const IPV6_DEST_OPTIONS: u8 = 60;
}

/// [`ServiceKey::port`] of an entry that matches every port of its address.
pub const ALL_PORTS: u16 = 0;

/// Bits of [`ServiceKey`] in front of the address: family, protocol, port.
pub const KEY_HEADER_BITS: u32 = 32;
/// `prefix_len` of an LPM lookup key: the whole [`ServiceKey`].
pub const LPM_LOOKUP_PREFIX_LEN: u32 = KEY_HEADER_BITS + 128;

/// What a packet is looked up by: (address family, protocol, destination
/// port, destination address).
///
/// The same layout is the exact-match hash key and the data part of the LPM
/// trie key (`aya`'s `Key<ServiceKey>`, whose `prefix_len` counts
/// [`KEY_HEADER_BITS`] plus the address prefix). The family, protocol and port
/// come first so a prefix entry always matches them in full.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceKey {
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// [`IPPROTO_TCP`], [`IPPROTO_UDP`] or [`IPPROTO_SCTP`].
    pub proto: u8,
    /// Destination port in network byte order as it sits in the packet
    /// (`[hi, lo]`), or [`ALL_PORTS`].
    pub port: [u8; 2],
    /// Destination address bytes in packet order, held as four words
    /// (`u32::from_ne_bytes` of each 4 bytes) so the key is 4-byte aligned
    /// and copied by words; IPv4 uses the first word, the rest are zero.
    pub addr: [u32; 4],
}

impl ServiceKey {
    /// [`ServiceKey::addr`] from 16 address bytes in packet order.
    pub const fn addr_words(b: [u8; 16]) -> [u32; 4] {
        [
            u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
        ]
    }

    /// The address bytes in packet order.
    pub fn addr_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        for (chunk, word) in out.chunks_exact_mut(4).zip(self.addr) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        out
    }
}

/// The IPv4 exact-match key: (protocol, destination port, destination
/// address) in 8 bytes, two words, without [`ServiceKey`]'s family byte and
/// its 12 bytes of zero address. The kernel hashes and compares 8 bytes
/// instead of 20, and a preallocated hash element is 72 bytes instead of 88
/// (48 of kernel header, the key rounded up to 8, the value to 8).
///
/// IPv6 exact entries keep [`ServiceKey`] (family byte included): without
/// the family the key would be 20 bytes all the same (1 + 1 + 2 + 16), so
/// the element and the hash cost are unchanged, and the one type stays
/// shared with the LPM trie of both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceKey4 {
    /// [`IPPROTO_TCP`], [`IPPROTO_UDP`] or [`IPPROTO_SCTP`].
    pub proto: u8,
    /// Always zero (the key has no padding the kernel could hash).
    pub zero: u8,
    /// Destination port in network byte order (`[hi, lo]`), or [`ALL_PORTS`].
    pub port: [u8; 2],
    /// Destination address bytes in packet order (`u32::from_ne_bytes`).
    pub addr: u32,
}

impl ServiceKey {
    /// The IPv4 exact key of an IPv4 [`ServiceKey`] (its first address word).
    #[inline(always)]
    pub const fn v4(&self) -> ServiceKey4 {
        ServiceKey4 {
            proto: self.proto,
            zero: 0,
            port: self.port,
            addr: self.addr[0],
        }
    }
}

/// Port ranges one [`RangeTable`] holds: the ranges of one (family,
/// protocol, exact address). The classifier scans them in order, so the
/// bound is small; further ranges of the same address are expanded into
/// exact entries (one per port) by the compiler.
pub const MAX_RANGES: usize = 8;

/// One port range of a [`RangeTable`]: ports `lo..=hi` (host order) get
/// `target`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PortRangeEntry {
    /// First port, host byte order.
    pub lo: u16,
    /// Last port (inclusive), host byte order.
    pub hi: u16,
    pub target: Target,
}

/// The port ranges of one (family, protocol, exact address): the value of
/// the `RANGE4`/`RANGE6` maps. `ranges[..len]` are disjoint and sorted by
/// port; the classifier scans them after the exact-port lookup misses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RangeTable {
    /// Ranges in use (at most [`MAX_RANGES`]).
    pub len: u32,
    pub ranges: [PortRangeEntry; MAX_RANGES],
}

/// How the classifier declares a range map's value (see [`TargetBytes`]).
pub type RangeTableBytes = [u8; size_of::<RangeTable>()];

/// What to do with a packet that matched: `mark = (mark & !mask) | (value & mask)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Target {
    /// The mark value, already inside `mask`.
    pub mark: u32,
    /// The bits of `skb->mark` this entry owns (all ones: `--set-mark`).
    pub mask: u32,
    /// Index in the `RULE_STATS` counter array.
    pub rule: u32,
    /// Address prefix length of a prefix entry (0..=128); the classifier
    /// compares it between the port and the all-ports prefix lookups.
    pub prefix_len: u32,
}

/// How the classifier declares the inner maps' value: a [`Target`]'s bytes.
///
/// Userspace creates the inner maps of each generation without BTF, and the
/// kernel accepts one into the outer map only if it looks like the template
/// the program was loaded with. Kernels before 6.2 (Debian 12's 6.1) also
/// compare `timer_off`, which is -ENOENT for a template whose BTF value type
/// is a struct but -EINVAL both for a BTF-less map and for an array value
/// type: with `Target` itself as the value, every generation switch fails
/// there with EINVAL. The bytes are laid out exactly as `Target`; the
/// classifier reads them as one.
pub type TargetBytes = [u8; size_of::<Target>()];

/// Per-rule counters, like `iptables -L -v` shows per rule. Bytes count from
/// the IP header on, as iptables counts them. ICMP errors marked by the rule
/// (`icmp_errors = true`) are counted in `packets` and `bytes` too, and again
/// in `icmp_errors`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RuleCounters {
    /// Packets marked by this rule.
    pub packets: u64,
    /// Their bytes from the IP header on.
    pub bytes: u64,
    /// Of `packets`, the ICMP errors marked because the packet they quote
    /// came from this rule's address, protocol and port.
    pub icmp_errors: u64,
}

/// The classifier's global counters, one per CPU in `GLOBAL_STATS[0]`.
/// `seen = marked + no_match + non_ip + malformed`; `later_fragment` counts a
/// subset of `marked + no_match`, `icmp_error` a subset of `marked`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct GlobalCounters {
    /// Every packet the classifier ran on.
    pub seen: u64,
    /// Packets whose mark was written.
    pub marked: u64,
    /// IPv4/IPv6 packets that matched no service.
    pub no_match: u64,
    /// Packets that are neither IPv4 nor IPv6 (ARP, LLDP, a third VLAN tag, ...).
    pub non_ip: u64,
    /// IP fragments at a non-zero offset (only all-ports services can match them).
    pub later_fragment: u64,
    /// Truncated or malformed headers; such packets are never marked.
    /// With `icmp_errors = true` this includes ICMP errors whose quoted
    /// headers are truncated or malformed.
    pub malformed: u64,
    /// ICMP errors marked by the service of the packet they quote (a subset
    /// of `marked`; only with `icmp_errors = true`).
    pub icmp_error: u64,
}

impl GlobalCounters {
    /// Field names, in declaration order, as `fwmark` prints them.
    pub const NAMES: [&'static str; 7] = [
        "seen",
        "marked",
        "no_match",
        "non_ip",
        "later_fragment",
        "malformed",
        "icmp_error",
    ];

    /// Values in [`Self::NAMES`] order.
    pub fn values(&self) -> [u64; 7] {
        [
            self.seen,
            self.marked,
            self.no_match,
            self.non_ip,
            self.later_fragment,
            self.malformed,
            self.icmp_error,
        ]
    }
}

// Layout contract: sizes and alignments both sides rely on, with no padding.
const _: () = assert!(size_of::<ServiceKey>() == 20);
const _: () = assert!(align_of::<ServiceKey>() == 4);
const _: () = assert!(size_of::<ServiceKey4>() == 8);
const _: () = assert!(align_of::<ServiceKey4>() == 4);
const _: () = assert!(size_of::<Target>() == 16);
const _: () = assert!(align_of::<Target>() == 4);
const _: () = assert!(size_of::<PortRangeEntry>() == 20);
const _: () = assert!(align_of::<PortRangeEntry>() == 4);
const _: () = assert!(size_of::<RangeTable>() == 4 + 20 * MAX_RANGES);
const _: () = assert!(align_of::<RangeTable>() == 4);
const _: () = assert!(size_of::<RuleCounters>() == 24);
const _: () = assert!(align_of::<RuleCounters>() == 8);
const _: () = assert!(size_of::<GlobalCounters>() == 56);
const _: () = assert!(align_of::<GlobalCounters>() == 8);
const _: () = assert!(GENERATIONS - 1 <= ACTIVE_GENERATION_MASK);
const _: () = assert!(ACTIVE_HAS_PREFIX & ACTIVE_GENERATION_MASK == 0);
const _: () = assert!(ACTIVE_ICMP_ERRORS & (ACTIVE_GENERATION_MASK | ACTIVE_HAS_PREFIX) == 0);
const _: () = assert!(
    ACTIVE_HAS_RANGE & (ACTIVE_GENERATION_MASK | ACTIVE_HAS_PREFIX | ACTIVE_ICMP_ERRORS) == 0
);
const _: () = assert!(wire::EMBEDDED_L4_MIN <= wire::UDP_HLEN);
const _: () = assert!(LPM_LOOKUP_PREFIX_LEN as usize == size_of::<ServiceKey>() * 8);

// aya requires map keys and values to be plain old data: `#[repr(C)]`,
// no padding, valid for any bit pattern. bytemuck's `Pod` derive above
// checks exactly that at compile time for each of these types.
#[cfg(feature = "user")]
mod pod {
    // SAFETY: `ServiceKey` derives `bytemuck::Pod` (see above).
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: `ServiceKey4` derives `bytemuck::Pod`.
    unsafe impl aya::Pod for super::ServiceKey4 {}
    // SAFETY: `Target` derives `bytemuck::Pod`.
    unsafe impl aya::Pod for super::Target {}
    // SAFETY: `RangeTable` derives `bytemuck::Pod`.
    unsafe impl aya::Pod for super::RangeTable {}
    // SAFETY: `RuleCounters` derives `bytemuck::Pod`.
    unsafe impl aya::Pod for super::RuleCounters {}
    // SAFETY: `GlobalCounters` derives `bytemuck::Pod`.
    unsafe impl aya::Pod for super::GlobalCounters {}
}
