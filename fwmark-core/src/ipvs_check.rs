//! What IPVS does with fwmark's marks: a config's services checked against
//! a plain snapshot of IPVS's virtual services and real servers (and of the
//! nftables tables, for keepalived's own marking table). Pure logic: the
//! kernel layer (`fwmark::ipvs`) reads the snapshot over generic netlink and
//! nfnetlink; here it is only data, so every finding is unit-tested
//! without a kernel.
//!
//! IPVS finds a fwmark service by (address family, the packet's whole
//! `skb->mark`). A fwmark service with the full mask (the default) feeds
//! the IPVS fwmark service of its family whose mark equals its own; with a
//! partial mask it feeds every IPVS fwmark service whose mark agrees with
//! it on the mask's bits (the other bits are whatever other software left
//! there, usually zero).

use std::{collections::BTreeMap, fmt, net::IpAddr};

use crate::config::{Config, Proto};

/// keepalived's default name for the nftables table it marks IPVS traffic
/// from (`global_defs { nftables_ipvs }`, keepalived/core/global_parser.c
/// `DEFAULT_NFTABLES_IPVS_TABLE`; created in keepalived/check/check_nftables.c
/// for virtual server groups with address ranges).
pub const KEEPALIVED_TABLE: &str = "keepalived_ipvs";

/// An address family, as IPVS keys its services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// `ipv4` or `ipv6` (status, metrics labels).
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The family of an address.
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// `ipvsadm`'s option for the family (`-6` for IPv6).
    fn ipvsadm(self) -> &'static str {
        match self {
            Family::V4 => "",
            Family::V6 => " -6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// One IPVS virtual service, as `IPVS_CMD_GET_SERVICE` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsService {
    pub family: Family,
    /// The firewall mark of a fwmark service; 0 for an address:port one.
    pub fwmark: u32,
    /// IP protocol of an address:port service (0 for a fwmark service).
    pub protocol: u16,
    /// Address and port of an address:port service.
    pub addr: Option<IpAddr>,
    pub port: u16,
    /// Scheduler (`rr`, `wlc`, ...).
    pub scheduler: String,
    /// `IP_VS_SVC_F_*` flags (1: persistent).
    pub flags: u32,
    /// Persistence timeout in seconds (0: none).
    pub timeout: u32,
    /// Its real servers.
    pub dests: Vec<IpvsDest>,
}

impl IpvsService {
    /// Active connections over its real servers (`ipvsadm -L -n`'s
    /// ActiveConn, summed).
    pub fn active_conns(&self) -> u64 {
        self.dests.iter().map(|d| u64::from(d.active_conns)).sum()
    }

    /// Inactive connections over its real servers (InActConn, summed).
    pub fn inactive_conns(&self) -> u64 {
        self.dests.iter().map(|d| u64::from(d.inactive_conns)).sum()
    }

    /// `FWM 80` or `FWM 86 IPv6`, as `ipvsadm -L -n` names it (or
    /// `TCP 192.0.2.1:80` for an address:port service).
    pub fn label(&self) -> String {
        if self.fwmark != 0 {
            match self.family {
                Family::V4 => format!("FWM {}", self.fwmark),
                Family::V6 => format!("FWM {} IPv6", self.fwmark),
            }
        } else {
            let proto = Proto::from_number(self.protocol as u8).map_or_else(
                || format!("proto {}", self.protocol),
                |p| p.name().to_uppercase(),
            );
            match self.addr {
                Some(IpAddr::V6(a)) => format!("{proto} [{a}]:{}", self.port),
                Some(a) => format!("{proto} {a}:{}", self.port),
                None => format!("{proto} ?:{}", self.port),
            }
        }
    }
}

/// A real server of an IPVS service (`IPVS_CMD_GET_DEST`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsDest {
    pub addr: IpAddr,
    pub port: u16,
    /// `IP_VS_CONN_F_FWD_MASK` bits: 0 masq, 1 local, 2 tunnel, 3 route.
    pub forward: u32,
    pub weight: i32,
    pub active_conns: u32,
    pub inactive_conns: u32,
    pub persist_conns: u32,
}

impl IpvsDest {
    /// `Masq`, `Local`, `Tunnel` or `Route`, as `ipvsadm -L` shows it.
    pub fn forward_name(&self) -> &'static str {
        match self.forward & 7 {
            0 => "Masq",
            1 => "Local",
            2 => "Tunnel",
            3 => "Route",
            _ => "Bypass",
        }
    }
}

/// An nftables table: its family (`NFPROTO_*`) and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftTable {
    pub family: u8,
    pub name: String,
}

impl NftTable {
    /// `ip`, `ip6`, `inet`, ... as `nft` names the family.
    pub fn family_name(&self) -> String {
        match self.family {
            1 => "inet".into(),
            2 => "ip".into(),
            3 => "arp".into(),
            5 => "netdev".into(),
            7 => "bridge".into(),
            10 => "ip6".into(),
            n => format!("family {n}"),
        }
    }
}

/// What the kernel layer read: IPVS's services with their real servers and
/// the nftables tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Whether IPVS is there at all (the `ip_vs` module loaded); without
    /// it `services` is empty.
    pub loaded: bool,
    pub services: Vec<IpvsService>,
    pub nft_tables: Vec<NftTable>,
}

impl Snapshot {
    /// The fwmark services of IPVS.
    pub fn fwmark_services(&self) -> impl Iterator<Item = &IpvsService> {
        self.services.iter().filter(|s| s.fwmark != 0)
    }
}

/// How a fwmark service uses its mark: what the check needs of a config's
/// service (the daemon keeps these with its live config).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkUse {
    pub service: String,
    pub mark: u32,
    pub mask: u32,
    /// The families of its VIPs.
    pub families: Vec<Family>,
    pub protos: Vec<Proto>,
}

impl MarkUse {
    /// Every service of `config`, in file order.
    pub fn of_config(config: &Config) -> Vec<MarkUse> {
        config
            .services
            .iter()
            .map(|s| {
                let mut families: Vec<Family> =
                    s.vips.iter().map(|v| Family::of(v.addr())).collect();
                families.sort();
                families.dedup();
                MarkUse {
                    service: s.name.clone(),
                    mark: s.mark,
                    mask: s.mask,
                    families,
                    protos: s.protos.clone(),
                }
            })
            .collect()
    }

    /// Whether packets it marks reach `svc` (same family, and `svc`'s mark
    /// agrees with this mark on the mask's bits).
    pub fn feeds(&self, svc: &IpvsService) -> bool {
        svc.fwmark != 0
            && self.families.contains(&svc.family)
            && svc.fwmark & self.mask == self.mark
    }
}

/// Bits of the 32-bit mark that other software on a host commonly owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForeignBits {
    pub owner: &'static str,
    pub bits: u32,
    /// What the owner uses them for, and where that default is set.
    pub what: &'static str,
}

/// The defaults fwmark knows (docs/operations.md names the sources).
pub const FOREIGN_BITS: &[ForeignBits] = &[
    ForeignBits {
        owner: "kube-proxy",
        bits: 0x4000,
        what: "the masquerade mark (--iptables-masquerade-bit, default 14)",
    },
    ForeignBits {
        owner: "kube-proxy/kubelet",
        bits: 0x8000,
        what: "the drop mark (--iptables-drop-bit, default 15)",
    },
    ForeignBits {
        owner: "Calico",
        bits: 0xffff_0000,
        what: "Felix's mark bits (IptablesMarkMask, default 0xffff0000)",
    },
    ForeignBits {
        owner: "Cilium",
        bits: 0x0f00,
        what: "its magic marks (MagicMarkHostMask 0x0f00)",
    },
];

/// One thing the check found. None is an error: marking goes on; each
/// says what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// No IPVS in the kernel: nothing takes the marked packets.
    IpvsNotLoaded,
    /// A service's mark that no IPVS fwmark service of a family it has VIPs
    /// in uses: IPVS leaves those packets alone.
    NoIpvsService {
        service: String,
        mark: u32,
        mask: u32,
        family: Family,
    },
    /// An IPVS fwmark service no fwmark service marks for.
    NotMarked { fwmark: u32, family: Family },
    /// One mark given to packets of several protocols: the one IPVS fwmark
    /// service receives them all.
    MixedProtocols {
        mark: u32,
        /// Every protocol with the services that mark it.
        protos: Vec<(Proto, Vec<String>)>,
    },
    /// An IPVS fwmark service fwmark feeds that has no real server.
    NoDestinations { fwmark: u32, family: Family },
    /// A full-mask mark with bits another program on the host owns.
    ForeignBits {
        service: String,
        mark: u32,
        owner: &'static str,
        bits: u32,
        what: &'static str,
    },
    /// keepalived's own marking table is loaded: the packets it matches are
    /// marked twice.
    KeepalivedTable { family: String, name: String },
}

impl Finding {
    /// A short stable name (`--json`, tests).
    pub fn kind(&self) -> &'static str {
        match self {
            Finding::IpvsNotLoaded => "ipvs_not_loaded",
            Finding::NoIpvsService { .. } => "no_ipvs_service",
            Finding::NotMarked { .. } => "not_marked",
            Finding::MixedProtocols { .. } => "mixed_protocols",
            Finding::NoDestinations { .. } => "no_destinations",
            Finding::ForeignBits { .. } => "foreign_bits",
            Finding::KeepalivedTable { .. } => "keepalived_table",
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::IpvsNotLoaded => f.write_str(
                "IPVS is not loaded: `modprobe ip_vs` (keepalived loads it when it starts); \
                 until then no marked packet reaches a virtual service",
            ),
            Finding::NoIpvsService {
                service,
                mark,
                mask,
                family,
            } => {
                write!(
                    f,
                    "service {service:?} marks {family} packets {} but IPVS has no {family} \
                     fwmark service for it, so IPVS does not take them: add one \
                     (`ipvsadm{} -A -f {mark} -s rr`, or keepalived's `virtual_server fwmark {mark}`)",
                    crate::text::mark(*mark, *mask),
                    family.ipvsadm(),
                )?;
                if *mask != u32::MAX {
                    write!(f, " whose mark is {mark} on the bits of mask {mask:#x}")?;
                }
                Ok(())
            }
            Finding::NotMarked { fwmark, family } => write!(
                f,
                "IPVS {family} fwmark service FWM {fwmark} gets no packets from fwmark: no service \
                 of the config marks {family} packets {fwmark:#x}; add a service with `mark = \
                 {fwmark}` or remove the IPVS service (`ipvsadm{} -D -f {fwmark}`)",
                family.ipvsadm()
            ),
            Finding::MixedProtocols { mark, protos } => {
                let list: Vec<String> = protos
                    .iter()
                    .map(|(p, services)| format!("{p} by {}", services.join(", ")))
                    .collect();
                write!(
                    f,
                    "mark {mark:#x} is given to {} packets ({}): one IPVS fwmark service receives \
                     them all and schedules them together; give each protocol a mark of its own \
                     unless that is intended (e.g. DNS over TCP and UDP)",
                    protos
                        .iter()
                        .map(|(p, _)| p.name())
                        .collect::<Vec<_>>()
                        .join(" and "),
                    list.join("; ")
                )
            }
            Finding::NoDestinations { fwmark, family } => write!(
                f,
                "IPVS {family} fwmark service FWM {fwmark} has no real server: the packets fwmark \
                 marks for it are dropped; add one (`ipvsadm{} -a -f {fwmark} -r ADDRESS -m`) or \
                 check why keepalived removed them all",
                family.ipvsadm()
            ),
            Finding::ForeignBits {
                service,
                mark,
                owner,
                bits,
                what,
            } => write!(
                f,
                "service {service:?} sets the whole mark to {mark:#x}, which includes bits {:#x} \
                 that {owner} uses ({what}); if {owner} runs here, give fwmark a mask without \
                 them (e.g. `mask = 0x000000ff` and a mark inside it), or pick another mark",
                mark & bits
            ),
            Finding::KeepalivedTable { family, name } => write!(
                f,
                "nftables table `{family} {name}` (keepalived's fwmark marking, `nftables_ipvs`) is \
                 loaded alongside fwmark: packets it matches are marked twice, its mark last; \
                 let one of them mark (drop `nftables_ipvs` from keepalived.conf, or move the \
                 services it marks out of fwmark's config)"
            ),
        }
    }
}

/// Everything worth a warning about `marks` (a config's services) against
/// `ipvs`, in a stable order: per service first, then per IPVS service,
/// then the nftables tables. Without IPVS loaded that is said once,
/// instead of once per mark.
pub fn check(marks: &[MarkUse], ipvs: &Snapshot) -> Vec<Finding> {
    let mut findings = Vec::new();
    if !ipvs.loaded {
        findings.push(Finding::IpvsNotLoaded);
    }
    // Marks IPVS does not use, and marks with foreign bits.
    for m in marks {
        for &family in &m.families {
            if ipvs.loaded
                && !ipvs
                    .fwmark_services()
                    .any(|s| s.family == family && m.feeds(s))
            {
                findings.push(Finding::NoIpvsService {
                    service: m.service.clone(),
                    mark: m.mark,
                    mask: m.mask,
                    family,
                });
            }
        }
        if m.mask == u32::MAX {
            for f in FOREIGN_BITS {
                if m.mark & f.bits != 0 {
                    findings.push(Finding::ForeignBits {
                        service: m.service.clone(),
                        mark: m.mark,
                        owner: f.owner,
                        bits: f.bits,
                        what: f.what,
                    });
                }
            }
        }
    }
    // One mark, several protocols.
    let mut by_mark: BTreeMap<u32, BTreeMap<Proto, Vec<String>>> = BTreeMap::new();
    for m in marks {
        for &p in &m.protos {
            let services = by_mark.entry(m.mark).or_default().entry(p).or_default();
            if !services.contains(&m.service) {
                services.push(m.service.clone());
            }
        }
    }
    for (mark, protos) in by_mark {
        if protos.len() > 1 {
            findings.push(Finding::MixedProtocols {
                mark,
                protos: protos.into_iter().collect(),
            });
        }
    }
    // IPVS fwmark services: fed by nothing, or fed but without real servers.
    for s in ipvs.fwmark_services() {
        if !marks.iter().any(|m| m.feeds(s)) {
            findings.push(Finding::NotMarked {
                fwmark: s.fwmark,
                family: s.family,
            });
        } else if s.dests.is_empty() {
            findings.push(Finding::NoDestinations {
                fwmark: s.fwmark,
                family: s.family,
            });
        }
    }
    for t in &ipvs.nft_tables {
        if t.name == KEEPALIVED_TABLE {
            findings.push(Finding::KeepalivedTable {
                family: t.family_name(),
                name: t.name.clone(),
            });
        }
    }
    findings
}

/// The IPVS fwmark services `m` feeds, in IPVS's order.
pub fn fed_by<'a>(m: &'a MarkUse, ipvs: &'a Snapshot) -> impl Iterator<Item = &'a IpvsService> {
    ipvs.fwmark_services().filter(move |s| m.feeds(s))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn config(text: &str) -> Vec<MarkUse> {
        MarkUse::of_config(&Config::parse(text, "t.toml").unwrap())
    }

    fn dest(last: u8) -> IpvsDest {
        IpvsDest {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 2, last)),
            port: 0,
            forward: 0,
            weight: 1,
            active_conns: u32::from(last),
            inactive_conns: 2 * u32::from(last),
            persist_conns: 0,
        }
    }

    fn fwm(fwmark: u32, family: Family, dests: Vec<IpvsDest>) -> IpvsService {
        IpvsService {
            family,
            fwmark,
            protocol: 0,
            addr: None,
            port: 0,
            scheduler: "rr".into(),
            flags: 0,
            timeout: 0,
            dests,
        }
    }

    const WEB: &str = "[[service]]\nname = \"web\"\nvip = [\"192.0.2.10\", \"2001:db8::10\"]\n\
                       proto = \"tcp\"\nports = [80]\nmark = 80\n";

    fn kinds(findings: &[Finding]) -> Vec<&'static str> {
        findings.iter().map(Finding::kind).collect()
    }

    #[test]
    fn a_matching_setup_has_no_findings_and_each_family_needs_its_service() {
        let marks = config(WEB);
        assert_eq!(marks[0].families, vec![Family::V4, Family::V6]);
        let mut ipvs = Snapshot {
            loaded: true,
            services: vec![
                fwm(80, Family::V4, vec![dest(2), dest(3)]),
                fwm(80, Family::V6, vec![dest(4)]),
            ],
            nft_tables: vec![],
        };
        assert_eq!(check(&marks, &ipvs), vec![]);
        let fed: Vec<_> = fed_by(&marks[0], &ipvs).collect();
        assert_eq!(fed.len(), 2);
        assert_eq!(fed[0].active_conns(), 5);
        assert_eq!(fed[0].inactive_conns(), 10);
        assert_eq!(fed[1].label(), "FWM 80 IPv6");

        // Without the IPv6 one, the IPv6 half is reported.
        ipvs.services.pop();
        let f = check(&marks, &ipvs);
        assert_eq!(
            f,
            vec![Finding::NoIpvsService {
                service: "web".into(),
                mark: 80,
                mask: u32::MAX,
                family: Family::V6
            }]
        );
        assert!(f[0].to_string().contains("ipvsadm -6 -A -f 80"), "{}", f[0]);
    }

    #[test]
    fn an_address_port_service_is_no_fwmark_service() {
        let marks = config(WEB);
        let mut tcp = fwm(0, Family::V4, vec![dest(2)]);
        tcp.protocol = 6;
        tcp.addr = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)));
        tcp.port = 80;
        assert_eq!(tcp.label(), "TCP 192.0.2.10:80");
        let ipvs = Snapshot {
            loaded: true,
            services: vec![tcp, fwm(80, Family::V6, vec![dest(3)])],
            nft_tables: vec![],
        };
        assert_eq!(kinds(&check(&marks, &ipvs)), vec!["no_ipvs_service"]);
    }

    #[test]
    fn unmarked_and_empty_ipvs_services_are_reported() {
        let marks = config(WEB);
        let ipvs = Snapshot {
            loaded: true,
            services: vec![
                fwm(80, Family::V4, vec![]),
                fwm(80, Family::V6, vec![dest(2)]),
                fwm(81, Family::V4, vec![]),
                // Same mark, other family than any service of the config.
                fwm(80, Family::V6, vec![dest(2)]),
            ],
            nft_tables: vec![],
        };
        let f = check(&marks, &ipvs);
        assert_eq!(
            f,
            vec![
                Finding::NoDestinations {
                    fwmark: 80,
                    family: Family::V4
                },
                Finding::NotMarked {
                    fwmark: 81,
                    family: Family::V4
                },
            ]
        );
        let v4_only =
            config("[[service]]\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [80]\nmark = 80\n");
        let ipvs = Snapshot {
            loaded: true,
            services: vec![
                fwm(80, Family::V4, vec![dest(2)]),
                fwm(80, Family::V6, vec![dest(2)]),
            ],
            nft_tables: vec![],
        };
        assert_eq!(
            check(&v4_only, &ipvs),
            vec![Finding::NotMarked {
                fwmark: 80,
                family: Family::V6
            }]
        );
    }

    #[test]
    fn one_mark_for_tcp_and_udp_is_reported_once_with_its_services() {
        let marks = config(
            "[[service]]\nname = \"dns-udp\"\nvip = \"192.0.2.53\"\nproto = \"udp\"\nmark = 53\n\n\
             [[service]]\nname = \"dns-tcp\"\nvip = \"192.0.2.53\"\nproto = \"tcp\"\nmark = 53\n\n\
             [[service]]\nname = \"both\"\nvip = \"192.0.2.54\"\nproto = [\"tcp\", \"udp\"]\nmark = 54\n\n\
             [[service]]\nname = \"web\"\nvip = \"192.0.2.80\"\nproto = \"tcp\"\nports = [80, 443]\nmark = 80\n",
        );
        let ipvs = Snapshot {
            loaded: true,
            services: vec![
                fwm(53, Family::V4, vec![dest(2)]),
                fwm(54, Family::V4, vec![dest(2)]),
                fwm(80, Family::V4, vec![dest(2)]),
            ],
            nft_tables: vec![],
        };
        let f = check(&marks, &ipvs);
        assert_eq!(
            f[0],
            Finding::MixedProtocols {
                mark: 53,
                protos: vec![
                    (Proto::Tcp, vec!["dns-tcp".into()]),
                    (Proto::Udp, vec!["dns-udp".into()])
                ]
            }
        );
        assert_eq!(kinds(&f), vec!["mixed_protocols", "mixed_protocols"]);
        let text = f[0].to_string();
        assert!(text.contains("tcp and udp"), "{text}");
        assert!(text.contains("one IPVS fwmark service"), "{text}");
    }

    #[test]
    fn foreign_bits_only_with_the_full_mask() {
        let marks = config(
            "[[service]]\nname = \"k\"\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nmark = 0x4001\n\n\
             [[service]]\nname = \"c\"\nvip = \"192.0.2.2\"\nproto = \"tcp\"\nmark = 0x10000\n\n\
             [[service]]\nname = \"ci\"\nvip = \"192.0.2.3\"\nproto = \"tcp\"\nmark = 0x100\n\n\
             [[service]]\nname = \"masked\"\nvip = \"192.0.2.4\"\nproto = \"tcp\"\nmark = 0x4000\nmask = 0xffff\n\n\
             [[service]]\nname = \"plain\"\nvip = \"192.0.2.5\"\nproto = \"tcp\"\nmark = 0xff\n",
        );
        let ipvs = Snapshot {
            loaded: true,
            services: [0x4001, 0x10000, 0x100, 0x4000, 0xff]
                .into_iter()
                .map(|m| fwm(m, Family::V4, vec![dest(2)]))
                .collect(),
            nft_tables: vec![],
        };
        let f = check(&marks, &ipvs);
        let owners: Vec<(&str, &str)> = f
            .iter()
            .map(|f| match f {
                Finding::ForeignBits { service, owner, .. } => (service.as_str(), *owner),
                other => panic!("unexpected {other}"),
            })
            .collect();
        assert_eq!(
            owners,
            vec![("k", "kube-proxy"), ("c", "Calico"), ("ci", "Cilium")]
        );
    }

    #[test]
    fn a_partial_mask_feeds_every_ipvs_mark_that_agrees_on_its_bits() {
        let marks = config(
            "[[service]]\nname = \"low\"\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nmark = 0x100\nmask = 0xffff\n",
        );
        let ipvs = Snapshot {
            loaded: true,
            services: vec![
                fwm(0x100, Family::V4, vec![dest(2)]),
                fwm(0x2_0100, Family::V4, vec![dest(2)]),
                fwm(0x101, Family::V4, vec![dest(2)]),
            ],
            nft_tables: vec![],
        };
        assert_eq!(
            check(&marks, &ipvs),
            vec![Finding::NotMarked {
                fwmark: 0x101,
                family: Family::V4
            }]
        );
        assert_eq!(fed_by(&marks[0], &ipvs).count(), 2);
    }

    #[test]
    fn keepalived_table_is_reported_per_family_and_others_are_not() {
        let marks = config(WEB);
        let ipvs = Snapshot {
            loaded: true,
            services: vec![
                fwm(80, Family::V4, vec![dest(2)]),
                fwm(80, Family::V6, vec![dest(2)]),
            ],
            nft_tables: vec![
                NftTable {
                    family: 2,
                    name: KEEPALIVED_TABLE.into(),
                },
                NftTable {
                    family: 10,
                    name: KEEPALIVED_TABLE.into(),
                },
                NftTable {
                    family: 1,
                    name: "filter".into(),
                },
            ],
        };
        let f = check(&marks, &ipvs);
        assert_eq!(kinds(&f), vec!["keepalived_table", "keepalived_table"]);
        assert!(
            f[1].to_string().contains("`ip6 keepalived_ipvs`"),
            "{}",
            f[1]
        );
    }

    #[test]
    fn without_ipvs_that_is_said_once_and_config_findings_remain() {
        let marks = config(
            "[[service]]\nname = \"a\"\nvip = \"192.0.2.1\"\nproto = [\"tcp\", \"udp\"]\nmark = 80\n\n\
             [[service]]\nname = \"b\"\nvip = \"2001:db8::1\"\nproto = \"tcp\"\nmark = 0x4000\n",
        );
        let ipvs = Snapshot {
            loaded: false,
            services: vec![],
            nft_tables: vec![NftTable {
                family: 2,
                name: KEEPALIVED_TABLE.into(),
            }],
        };
        let f = check(&marks, &ipvs);
        assert_eq!(
            kinds(&f),
            vec![
                "ipvs_not_loaded",
                "foreign_bits",
                "mixed_protocols",
                "keepalived_table"
            ]
        );
        assert!(
            f[0].to_string()
                .starts_with("IPVS is not loaded: `modprobe ip_vs`")
        );
    }

    #[test]
    fn labels_and_forwarding_names_follow_ipvsadm() {
        let mut s = fwm(0, Family::V6, vec![]);
        s.protocol = 17;
        s.addr = Some(IpAddr::V6(Ipv6Addr::LOCALHOST));
        s.port = 53;
        assert_eq!(s.label(), "UDP [::1]:53");
        let mut d = dest(1);
        assert_eq!(d.forward_name(), "Masq");
        d.forward = 3;
        assert_eq!(d.forward_name(), "Route");
    }
}
