//! Seeded frame generator for the differential test: well-formed frames of
//! every kind the classifier understands, aimed at a config's rule
//! boundaries, mutations of them, and random bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fwmark_core::config::Config;

use crate::packets::{Ext, Frame, L4, l3_offset};

/// What a generated frame is, for the summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A frame built whole (v4/v6, every protocol, tags, options, extension
    /// headers, fragments).
    WellFormed,
    /// A well-formed frame cut short at a random length.
    Truncated,
    /// IPv4 with a random version/IHL byte.
    BadIhl,
    /// IPv6 with a random version nibble.
    BadIpv6Version,
    /// IPv6 with 8 to 12 extension headers (more than 8 is malformed).
    LongExtChain,
    /// IPv6 whose extension headers name their own type again and again.
    LoopingExtChain,
    /// An extension header length byte set at random.
    ExtLength,
    /// An ethertype that is not IPv4/IPv6, or the other family's.
    WrongEthertype,
    /// 0 to 4 tags with 802.1Q, 802.1ad and other TPIDs.
    VlanStack,
    /// Random IPv4 flags/fragment offset or IPv6 fragment header fields.
    FragmentBits,
    /// No payload after the transport header, or nothing after the IP header.
    ZeroPayload,
    /// A well-formed frame with 1 to 3 random bytes of its headers changed.
    ByteFlip,
    /// Random bytes of random length.
    RandomBytes,
    /// An Ethernet header saying IPv4/IPv6 followed by random bytes.
    RandomAfterEthernet,
    /// An ICMP message quoting a packet from a target address and port:
    /// errors and informational types of both families, quotes of every
    /// length (cut inside the quoted headers too), the other family quoted
    /// now and then. (Other kinds mutate such frames as well.)
    IcmpError,
}

impl Kind {
    pub const ALL: [Kind; 15] = [
        Kind::WellFormed,
        Kind::Truncated,
        Kind::BadIhl,
        Kind::BadIpv6Version,
        Kind::LongExtChain,
        Kind::LoopingExtChain,
        Kind::ExtLength,
        Kind::WrongEthertype,
        Kind::VlanStack,
        Kind::FragmentBits,
        Kind::ZeroPayload,
        Kind::ByteFlip,
        Kind::RandomBytes,
        Kind::RandomAfterEthernet,
        Kind::IcmpError,
    ];
}

/// One generated frame and the mark it arrives with.
#[derive(Clone, Debug)]
pub struct Generated {
    pub kind: Kind,
    pub frame: Vec<u8>,
    pub mark: u32,
}

/// Addresses, ports and marks worth aiming at for one config: the edges of
/// every prefix and port range, and their neighbours outside.
#[derive(Clone, Debug)]
pub struct Targets {
    v4: Vec<Ipv4Addr>,
    v6: Vec<Ipv6Addr>,
    ports: Vec<u16>,
    marks: Vec<u32>,
}

impl Targets {
    pub fn new(config: &Config) -> Targets {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        let mut ports = vec![0, 1, 65535];
        let mut marks = vec![0, u32::MAX, 0x8000_0000, 1];
        for s in &config.services {
            for vip in &s.vips {
                let prefix = u32::from(vip.prefix_len());
                match vip.addr() {
                    IpAddr::V4(a) => v4.extend(
                        prefix_edges(u32::from(a).into(), 32 - prefix)
                            .map(|x| Ipv4Addr::from(x as u32)),
                    ),
                    IpAddr::V6(a) => {
                        v6.extend(prefix_edges(u128::from(a), 128 - prefix).map(Ipv6Addr::from))
                    }
                }
            }
            for r in s.ports.iter().flatten() {
                for p in [
                    r.lo.wrapping_sub(1),
                    r.lo,
                    r.lo.wrapping_add(1),
                    r.hi.wrapping_sub(1),
                    r.hi,
                    r.hi.wrapping_add(1),
                ] {
                    ports.push(p);
                }
            }
            marks.push(s.mark);
            marks.push(s.mask);
            marks.push(!s.mask);
            marks.push(s.mark ^ s.mask);
        }
        v4.push(Ipv4Addr::new(203, 0, 113, 1));
        v6.push("2001:db8:ffff::1".parse().expect("address"));
        Targets {
            v4,
            v6,
            ports,
            marks,
        }
    }
}

/// The addresses worth aiming at in the prefix `net` with `host_bits` host
/// bits: its first and last address, their neighbours inside and outside,
/// and its middle. IPv4 addresses are given and taken as the low 32 bits:
/// wrapping at 2^128 then truncating is wrapping at 2^32.
fn prefix_edges(net: u128, host_bits: u32) -> [u128; 7] {
    let last = if host_bits == 128 {
        u128::MAX
    } else {
        net | ((1u128 << host_bits) - 1)
    };
    [
        net.wrapping_sub(1),
        net,
        net.wrapping_add(1),
        net + (last - net) / 2,
        last.wrapping_sub(1),
        last,
        last.wrapping_add(1),
    ]
}

/// The generator: one seeded RNG, deterministic for a seed and config.
pub struct Generator {
    rng: fastrand::Rng,
    targets: Targets,
    /// Frames already decided (every truncation of one frame), last first.
    pending: Vec<Generated>,
}

const TPIDS: [u16; 2] = [0x8100, 0x88a8];

impl Generator {
    pub fn new(seed: u64, targets: Targets) -> Generator {
        Generator {
            rng: fastrand::Rng::with_seed(seed),
            targets,
            pending: Vec::new(),
        }
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.usize(..items.len())]
    }

    fn chance(&mut self, percent: u32) -> bool {
        self.rng.u32(..100) < percent
    }

    fn v4(&mut self) -> Ipv4Addr {
        if self.chance(90) {
            self.targets.v4[self.rng.usize(..self.targets.v4.len())]
        } else {
            Ipv4Addr::from(self.rng.u32(..))
        }
    }

    fn v6(&mut self) -> Ipv6Addr {
        if self.chance(90) {
            self.targets.v6[self.rng.usize(..self.targets.v6.len())]
        } else {
            Ipv6Addr::from(self.rng.u128(..))
        }
    }

    fn port(&mut self) -> u16 {
        if self.chance(85) {
            self.targets.ports[self.rng.usize(..self.targets.ports.len())]
        } else {
            self.rng.u16(..)
        }
    }

    fn mark(&mut self) -> u32 {
        if self.chance(70) {
            self.targets.marks[self.rng.usize(..self.targets.marks.len())]
        } else {
            self.rng.u32(..)
        }
    }

    fn l4(&mut self) -> L4 {
        let port = self.port();
        match self.rng.u32(..20) {
            0..=7 => L4::Tcp(port),
            8..=12 => L4::Udp(port),
            13..=16 => L4::Sctp(port),
            _ => L4::Other(self.pick(&[1, 58, 47, 50, 51, 59, 0, 43, 44, 60, 255])),
        }
    }

    fn ext(&mut self, later_ok: bool) -> Ext {
        match self.rng.u32(..4) {
            0 => Ext::HopByHop,
            1 => Ext::Routing,
            2 => Ext::DestOptions,
            _ => Ext::Fragment {
                offset: if later_ok && self.chance(30) {
                    self.rng.u16(1..8192)
                } else {
                    0
                },
                more: self.rng.bool(),
            },
        }
    }

    /// A well-formed frame description of either family; now and then an
    /// ICMP message about another one.
    fn frame(&mut self) -> Frame {
        if self.chance(10) {
            self.icmp_frame()
        } else {
            self.plain_frame()
        }
    }

    /// An ICMP message (mostly an error) about a packet from a target
    /// address and port to a client, as a router sends it back.
    fn icmp_frame(&mut self) -> Frame {
        let mut q = self.plain_frame();
        q.vlans.clear();
        let v6 = q.dst.is_ipv6();
        let (service, client): (IpAddr, IpAddr) = if v6 {
            (self.v6().into(), Ipv6Addr::from(self.rng.u128(..)).into())
        } else {
            (self.v4().into(), Ipv4Addr::from(self.rng.u32(..)).into())
        };
        q.src = Some(service);
        q.dst = client;
        q.src_port = self.port();
        let ty = if v6 {
            self.pick(&[1, 2, 3, 4, 1, 2, 3, 4, 0, 5, 11, 128, 129, 135])
        } else {
            self.pick(&[3, 4, 11, 3, 4, 11, 3, 11, 0, 1, 2, 5, 8, 12])
        };
        let ip_len = q.l4_offset() - l3_offset(0);
        let whole = q.ip_packet().len();
        let quoted_len = match self.rng.u32(..10) {
            0..=5 => ip_len + 8,
            6..=7 => whole,
            _ => self.rng.usize(..=whole),
        };
        let router: IpAddr = if v6 {
            Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1).into()
        } else {
            Ipv4Addr::new(198, 51, 100, 254).into()
        };
        let code = self.rng.u8(..5);
        let mut f = Frame::icmp_error(router, ty, code, [0, 0, 5, 0xdc], &q, quoted_len);
        if self.chance(5) {
            // The other family's ICMP around this quote.
            let other: IpAddr = if v6 {
                IpAddr::V4(self.v4())
            } else {
                IpAddr::V6(self.v6())
            };
            f = Frame::icmp(router, other, ty, code, [0; 4], &f.icmp.expect("icmp").body);
        }
        let tags = self.rng.usize(..=2);
        let tpids: Vec<u16> = (0..tags).map(|_| self.pick(&TPIDS)).collect();
        f = f.vlans(&tpids);
        if f.dst.is_ipv6() {
            if self.chance(20) {
                let n = self.rng.usize(1..=3);
                f.ipv6_ext = (0..n).map(|i| self.ext(i + 1 == n)).collect();
            }
        } else if self.chance(20) {
            let words = self.rng.usize(1..=10);
            f.ipv4_options = (0..words * 4).map(|_| self.rng.u8(..)).collect();
        }
        f
    }

    /// A well-formed frame description of either family.
    fn plain_frame(&mut self) -> Frame {
        let l4 = self.l4();
        let v6 = self.chance(45);
        let dst = if v6 {
            IpAddr::V6(self.v6())
        } else {
            IpAddr::V4(self.v4())
        };
        let tags = match self.rng.u32(..10) {
            0..=5 => 0,
            6..=8 => 1,
            _ => 2,
        };
        let tpids: Vec<u16> = (0..tags).map(|_| self.pick(&TPIDS)).collect();
        let mut f = Frame::to(dst, l4).vlans(&tpids);
        f.payload_len = self.pick(&[0, 1, 16, 64]);
        if v6 {
            if self.chance(40) {
                let n = self.rng.usize(1..=8);
                // At most one later fragment header, and it ends the chain.
                let mut chain = Vec::with_capacity(n);
                for i in 0..n {
                    let e = self.ext(i + 1 == n);
                    chain.push(e);
                }
                f.ipv6_ext = chain;
            }
        } else {
            if self.chance(25) {
                let words = self.rng.usize(1..=10);
                f.ipv4_options = (0..words * 4).map(|_| self.rng.u8(..)).collect();
            }
            if self.chance(15) {
                let offset = if self.rng.bool() {
                    0
                } else {
                    self.rng.u16(1..8192)
                };
                f.ipv4_fragment = (offset, self.rng.bool());
            }
        }
        f
    }

    /// Offset of the IP header and the built bytes.
    fn build(f: &Frame) -> (usize, Vec<u8>) {
        (l3_offset(f.vlans.len()), f.build())
    }

    fn v4_frame(&mut self) -> Frame {
        loop {
            let f = self.frame();
            if f.dst.is_ipv4() {
                return f;
            }
        }
    }

    fn v6_frame(&mut self) -> Frame {
        loop {
            let f = self.frame();
            if f.dst.is_ipv6() {
                return f;
            }
        }
    }

    /// Offsets of the IPv6 extension headers of `f` in its bytes.
    fn ext_offsets(f: &Frame) -> Vec<usize> {
        let mut off = l3_offset(f.vlans.len()) + 40;
        let mut out = Vec::new();
        for e in &f.ipv6_ext {
            out.push(off);
            off += e.header_len();
        }
        out
    }

    fn kind(&mut self) -> Kind {
        match self.rng.u32(..100) {
            0..=27 => Kind::WellFormed,
            28..=33 => Kind::IcmpError,
            34..=51 => Kind::Truncated,
            52..=55 => Kind::BadIhl,
            56..=57 => Kind::BadIpv6Version,
            58..=61 => Kind::LongExtChain,
            62..=64 => Kind::LoopingExtChain,
            65..=67 => Kind::ExtLength,
            68..=71 => Kind::WrongEthertype,
            72..=76 => Kind::VlanStack,
            77..=81 => Kind::FragmentBits,
            82..=84 => Kind::ZeroPayload,
            85..=91 => Kind::ByteFlip,
            92..=95 => Kind::RandomBytes,
            _ => Kind::RandomAfterEthernet,
        }
    }

    /// The next frame.
    pub fn next_frame(&mut self) -> Generated {
        if let Some(g) = self.pending.pop() {
            return g;
        }
        let kind = self.kind();
        let mark = self.mark();
        let frame = match kind {
            Kind::WellFormed => self.frame().build(),
            Kind::IcmpError => self.icmp_frame().build(),
            Kind::Truncated if self.rng.u32(..1000) < 3 => {
                // Now and then every truncation of one frame, in order.
                let full = self.frame().build();
                self.pending = (1..=full.len())
                    .rev()
                    .map(|len| Generated {
                        kind,
                        frame: full[..len].to_vec(),
                        mark,
                    })
                    .collect();
                Vec::new()
            }
            Kind::Truncated => {
                let full = self.frame().build();
                let len = self.rng.usize(..=full.len());
                full[..len].to_vec()
            }
            Kind::BadIhl => {
                let f = self.v4_frame();
                let (l3, mut b) = Self::build(&f);
                b[l3] = if self.rng.bool() {
                    0x40 | self.rng.u8(..16)
                } else {
                    self.rng.u8(..)
                };
                b
            }
            Kind::BadIpv6Version => {
                let f = self.v6_frame();
                let (l3, mut b) = Self::build(&f);
                b[l3] = (self.rng.u8(..16) << 4) | (b[l3] & 0x0f);
                b
            }
            Kind::LongExtChain => {
                let mut f = self.v6_frame();
                let n = self.rng.usize(8..=12);
                f.ipv6_ext = (0..n).map(|_| self.ext(false)).collect();
                f.build()
            }
            Kind::LoopingExtChain => {
                let f = self.v6_frame();
                let (l3, b) = Self::build(&f);
                let kind = self.pick(&[0u8, 43, 60, 44]);
                let count = self.rng.usize(1..=12);
                let mut out = b[..l3 + 40].to_vec();
                out[l3 + 6] = kind;
                for _ in 0..count {
                    // Each header names its own type as the next one; a
                    // fragment header keeps offset 0 so the walk goes on.
                    out.extend_from_slice(&[kind, 0, 0, 0, 0, 0, 0, 0]);
                }
                let tail = self.rng.usize(..24);
                out.extend((0..tail).map(|_| self.rng.u8(..)));
                out
            }
            Kind::ExtLength => {
                let mut f = self.v6_frame();
                if f.ipv6_ext.is_empty() {
                    f.ipv6_ext = (0..self.rng.usize(1..=4))
                        .map(|_| self.ext(false))
                        .collect();
                }
                let offsets = Self::ext_offsets(&f);
                let mut b = f.build();
                let at = self.pick(&offsets) + 1;
                b[at] = if self.rng.bool() {
                    self.rng.u8(..4)
                } else {
                    self.rng.u8(..)
                };
                b
            }
            Kind::WrongEthertype => {
                let f = self.frame();
                let (l3, mut b) = Self::build(&f);
                let other = if f.dst.is_ipv4() { 0x86dd } else { 0x0800 };
                let random = self.rng.u16(..);
                let t: u16 = self.pick(&[
                    0x0806, 0x88cc, 0x8847, 0x0000, 0x05dc, 0x9100, other, random,
                ]);
                b[l3 - 2..l3].copy_from_slice(&t.to_be_bytes());
                b
            }
            Kind::VlanStack => {
                let f = self.frame();
                let tags = self.rng.usize(0..=4);
                let tpids: Vec<u16> = (0..tags)
                    .map(|_| self.pick(&[0x8100, 0x88a8, 0x8100, 0x88a8, 0x9100]))
                    .collect();
                f.vlans(&tpids).build()
            }
            Kind::FragmentBits => {
                if self.rng.bool() {
                    let f = self.v4_frame();
                    let (l3, mut b) = Self::build(&f);
                    let bits = if self.rng.bool() {
                        self.rng.u16(..)
                    } else {
                        self.rng.u16(..) & 0xe000
                    };
                    b[l3 + 6..l3 + 8].copy_from_slice(&bits.to_be_bytes());
                    b
                } else {
                    let mut f = self.v6_frame();
                    let at = self.rng.usize(..=f.ipv6_ext.len());
                    f.ipv6_ext.insert(
                        at,
                        Ext::Fragment {
                            offset: 0,
                            more: false,
                        },
                    );
                    f.ipv6_ext.truncate(at + 1 + self.rng.usize(..3));
                    let offsets = Self::ext_offsets(&f);
                    let mut b = f.build();
                    let bits = self.rng.u16(..);
                    b[offsets[at] + 2..offsets[at] + 4].copy_from_slice(&bits.to_be_bytes());
                    b
                }
            }
            Kind::ZeroPayload => {
                let mut f = self.frame();
                f.payload_len = 0;
                let b = f.build();
                if self.rng.bool() {
                    b
                } else {
                    // Nothing after the IP header (and its extension headers).
                    let cut = if f.later_fragment() {
                        8
                    } else {
                        f.l4.header_len()
                    };
                    b[..b.len() - cut].to_vec()
                }
            }
            Kind::ByteFlip => {
                let mut b = self.frame().build();
                let span = b.len().min(100);
                for _ in 0..self.rng.usize(1..=3) {
                    let at = self.rng.usize(..span);
                    b[at] = self.rng.u8(..);
                }
                b
            }
            Kind::RandomBytes => {
                let len = self.rng.usize(..=128);
                (0..len).map(|_| self.rng.u8(..)).collect()
            }
            Kind::RandomAfterEthernet => {
                let f = self.frame();
                let (l3, b) = Self::build(&f);
                let mut out = b[..l3].to_vec();
                let len = self.rng.usize(..=100);
                out.extend((0..len).map(|_| self.rng.u8(..)));
                if self.rng.bool() && out.len() > l3 {
                    // Keep the version nibble right, so more gets past it.
                    out[l3] = (if f.dst.is_ipv4() { 0x40 } else { 0x60 }) | (out[l3] & 0x0f);
                }
                out
            }
        };
        Generated { kind, frame, mark }
    }
}
