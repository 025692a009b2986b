//! The classifier in the real kernel, through BPF_PROG_TEST_RUN: every frame
//! is built with etherparse headers, run once, and the mark is read back from
//! the `__sk_buff` context.

use fwmark_core::{model::Model, precedence::examples};
use fwmark_testlab::{
    harness::{Harness, TC_ACT_UNSPEC, Verdict},
    kernel,
    packets::{Ext, Frame, L4, l3_offset},
};

const PRESET: u32 = 0x0bad_0000;

const CONFIG: &str = r#"
[[service]]
name = "web"
vip = "192.0.2.10"
proto = "tcp"
ports = [80, 443]
mark = 80

[[service]]
name = "ftp"
vip = "192.0.2.21"
proto = "tcp"
ports = [21, "10000-20000"]
mark = 21

[[service]]
name = "dns"
vip = ["192.0.2.53", "2001:db8::53"]
proto = "udp"
ports = [53]
mark = 53

[[service]]
name = "sig"
vip = ["192.0.2.90", "2001:db8::90"]
proto = "sctp"
ports = [2905]
mark = 90

[[service]]
name = "web6"
vip = "2001:db8::10"
proto = "tcp"
ports = [80, 443]
mark = 86

[[service]]
name = "allports"
vip = ["192.0.2.77", "2001:db8::77"]
proto = ["tcp", "udp"]
mark = 77
"#;

fn harness(name: &str, config: &str) -> Option<Harness> {
    if !kernel::available(name, &[]) {
        return None;
    }
    Some(Harness::new(config).expect("load classifier and publish config"))
}

fn run(h: &Harness, frame: &Frame) -> Verdict {
    h.run(&frame.build(), PRESET).expect("test run")
}

fn assert_marked(h: &Harness, frame: &Frame, mark: u32) {
    let v = run(h, frame);
    assert_eq!(v.ret, TC_ACT_UNSPEC, "{frame:?}");
    assert_eq!(v.mark, mark, "{frame:?}: got {:#x}, want {mark:#x}", v.mark);
}

fn assert_untouched(h: &Harness, frame: &Frame) {
    assert_marked(h, frame, PRESET);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv4_tcp_udp_sctp_hits_and_misses() {
    let Some(h) = harness("ipv4_tcp_udp_sctp_hits_and_misses", CONFIG) else {
        return;
    };
    assert_marked(&h, &Frame::new("192.0.2.10", L4::Tcp(80)), 80);
    assert_marked(&h, &Frame::new("192.0.2.10", L4::Tcp(443)), 80);
    assert_untouched(&h, &Frame::new("192.0.2.10", L4::Tcp(81)));
    assert_untouched(&h, &Frame::new("192.0.2.10", L4::Udp(80)));
    assert_untouched(&h, &Frame::new("192.0.2.11", L4::Tcp(80)));
    assert_marked(&h, &Frame::new("192.0.2.21", L4::Tcp(21)), 21);
    for (port, hit) in [
        (9999, false),
        (10000, true),
        (15000, true),
        (20000, true),
        (20001, false),
    ] {
        let f = Frame::new("192.0.2.21", L4::Tcp(port));
        if hit {
            assert_marked(&h, &f, 21);
        } else {
            assert_untouched(&h, &f);
        }
    }
    assert_marked(&h, &Frame::new("192.0.2.53", L4::Udp(53)), 53);
    assert_untouched(&h, &Frame::new("192.0.2.53", L4::Tcp(53)));
    assert_marked(&h, &Frame::new("192.0.2.90", L4::Sctp(2905)), 90);
    assert_untouched(&h, &Frame::new("192.0.2.90", L4::Sctp(2906)));
    assert_untouched(&h, &Frame::new("192.0.2.90", L4::Other(1)));
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_tcp_udp_sctp_hits_and_misses() {
    let Some(h) = harness("ipv6_tcp_udp_sctp_hits_and_misses", CONFIG) else {
        return;
    };
    assert_marked(&h, &Frame::new("2001:db8::10", L4::Tcp(80)), 86);
    assert_marked(&h, &Frame::new("2001:db8::10", L4::Tcp(443)), 86);
    assert_untouched(&h, &Frame::new("2001:db8::10", L4::Tcp(8080)));
    assert_untouched(&h, &Frame::new("2001:db8::11", L4::Tcp(80)));
    assert_marked(&h, &Frame::new("2001:db8::53", L4::Udp(53)), 53);
    assert_marked(&h, &Frame::new("2001:db8::90", L4::Sctp(2905)), 90);
    // The IPv4 VIP's bytes inside an IPv6 address must not match it.
    assert_untouched(&h, &Frame::new("c000:20a::", L4::Tcp(80)));
    assert_untouched(&h, &Frame::new("::ffff:192.0.2.10", L4::Tcp(80)));
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn all_ports_services_match_every_port_of_their_protocols() {
    let Some(h) = harness("all_ports_services", CONFIG) else {
        return;
    };
    for port in [1, 80, 65535] {
        assert_marked(&h, &Frame::new("192.0.2.77", L4::Tcp(port)), 77);
        assert_marked(&h, &Frame::new("2001:db8::77", L4::Udp(port)), 77);
    }
    assert_untouched(&h, &Frame::new("192.0.2.77", L4::Sctp(80)));
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn vlan_and_qinq_tags_are_skipped_three_are_not_ip() {
    let Some(h) = harness("vlan_and_qinq", CONFIG) else {
        return;
    };
    let f = Frame::new("192.0.2.10", L4::Tcp(443));
    assert_marked(&h, &f.clone().vlans(&[0x8100]), 80);
    assert_marked(&h, &f.clone().vlans(&[0x88a8, 0x8100]), 80);
    assert_marked(&h, &f.clone().vlans(&[0x8100, 0x8100]), 80);
    assert_marked(
        &h,
        &Frame::new("2001:db8::10", L4::Tcp(80)).vlans(&[0x88a8, 0x8100]),
        86,
    );
    let before = h.global().unwrap().non_ip;
    assert_untouched(&h, &f.vlans(&[0x88a8, 0x8100, 0x8100]));
    assert_eq!(h.global().unwrap().non_ip, before + 1);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv4_options_of_every_length() {
    let Some(h) = harness("ipv4_options", CONFIG) else {
        return;
    };
    for words in 1..=10usize {
        // NOP options ending with End of Options List.
        let mut options = vec![1u8; words * 4];
        *options.last_mut().unwrap() = 0;
        let f = Frame::new("192.0.2.10", L4::Tcp(80)).ipv4_options(&options);
        assert_marked(&h, &f, 80);
        assert_untouched(
            &h,
            &Frame::new("192.0.2.10", L4::Tcp(81)).ipv4_options(&options),
        );
    }
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn bad_ipv4_header_length_and_version_are_malformed() {
    let Some(h) = harness("bad_ipv4_header", CONFIG) else {
        return;
    };
    let good = Frame::new("192.0.2.10", L4::Tcp(80)).build();
    let l3 = l3_offset(0);
    for ver_ihl in [0x44u8, 0x40, 0x65] {
        let mut bad = good.clone();
        bad[l3] = ver_ihl;
        let before = h.global().unwrap().malformed;
        let v = h.run(&bad, PRESET).unwrap();
        assert_eq!(
            (v.ret, v.mark),
            (TC_ACT_UNSPEC, PRESET),
            "ver/ihl {ver_ihl:#x}"
        );
        assert_eq!(h.global().unwrap().malformed, before + 1);
    }
    // IHL 15 on a frame that has no 60-byte header is a truncation.
    let mut bad = good.clone();
    bad.truncate(l3 + 40);
    bad[l3] = 0x4f;
    assert_eq!(h.run(&bad, PRESET).unwrap().mark, PRESET);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_extension_headers_are_walked() {
    let Some(h) = harness("ipv6_extension_headers", CONFIG) else {
        return;
    };
    let base = Frame::new("2001:db8::10", L4::Tcp(443));
    let chains: [&[Ext]; 6] = [
        &[Ext::HopByHop],
        &[Ext::Routing],
        &[Ext::DestOptions],
        &[Ext::Fragment {
            offset: 0,
            more: true,
        }],
        &[
            Ext::HopByHop,
            Ext::DestOptions,
            Ext::Routing,
            Ext::Fragment {
                offset: 0,
                more: true,
            },
            Ext::DestOptions,
        ],
        &[Ext::DestOptions; 8],
    ];
    for chain in chains {
        assert_marked(&h, &base.clone().ipv6_ext(chain), 86);
        assert_marked(
            &h,
            &Frame::new("2001:db8::53", L4::Udp(53)).ipv6_ext(chain),
            53,
        );
    }
    // One more than the walker's bound: malformed, left alone.
    let before = h.global().unwrap().malformed;
    assert_untouched(&h, &base.clone().ipv6_ext(&[Ext::DestOptions; 9]));
    assert_eq!(h.global().unwrap().malformed, before + 1);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn later_fragments_never_match_by_port() {
    let Some(h) = harness("later_fragments", CONFIG) else {
        return;
    };
    // First fragments carry the L4 header: matched by port.
    assert_marked(
        &h,
        &Frame::new("192.0.2.10", L4::Tcp(80)).ipv4_fragment(0, true),
        80,
    );
    assert_marked(
        &h,
        &Frame::new("2001:db8::10", L4::Tcp(80)).ipv6_ext(&[Ext::Fragment {
            offset: 0,
            more: true,
        }]),
        86,
    );
    let before = h.global().unwrap();
    // Later fragments: payload where the port would be, so no port match...
    assert_untouched(
        &h,
        &Frame::new("192.0.2.10", L4::Tcp(80)).ipv4_fragment(185, false),
    );
    assert_untouched(
        &h,
        &Frame::new("2001:db8::10", L4::Tcp(80)).ipv6_ext(&[
            Ext::HopByHop,
            Ext::Fragment {
                offset: 185,
                more: true,
            },
        ]),
    );
    // ...but an all-ports service of that address and protocol matches, like
    // an iptables rule without --dport.
    assert_marked(
        &h,
        &Frame::new("192.0.2.77", L4::Tcp(80)).ipv4_fragment(185, true),
        77,
    );
    assert_marked(
        &h,
        &Frame::new("2001:db8::77", L4::Udp(80)).ipv6_ext(&[Ext::Fragment {
            offset: 7,
            more: false,
        }]),
        77,
    );
    let after = h.global().unwrap();
    assert_eq!(after.later_fragment - before.later_fragment, 4);
    assert_eq!(after.marked - before.marked, 2);
    assert_eq!(after.no_match - before.no_match, 2);
}

/// Every truncation of a frame: marked exactly when the whole transport
/// header (TCP 20 bytes, UDP 8, SCTP 12) is inside the data, never dropped,
/// malformed counted otherwise.
///
/// BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header, and
/// untagged IPv4/IPv6 frames shorter than the fixed IP header (it reads the
/// addresses); behind a VLAN tag it takes any length from 14 bytes, so the
/// tagged cases cover truncation inside the IP header.
fn check_truncations(h: &Harness, frame: &Frame, l4_offset: usize, mark: u32) {
    let full = frame.build();
    let first = if frame.vlans.is_empty() {
        l3_offset(0) + if frame.dst.is_ipv4() { 20 } else { 40 }
    } else {
        14
    };
    let l4_len = match frame.l4 {
        L4::Tcp(_) => 20,
        L4::Udp(_) => 8,
        L4::Sctp(_) => 12,
        L4::Other(_) => 0,
    };
    for len in first..=full.len() {
        let before = h.global().unwrap();
        let v = h.run(&full[..len], PRESET).unwrap();
        let after = h.global().unwrap();
        assert_eq!(v.ret, TC_ACT_UNSPEC, "len {len}");
        if len >= l4_offset + l4_len {
            assert_eq!(v.mark, mark, "len {len} of {frame:?}");
        } else {
            assert_eq!(v.mark, PRESET, "len {len} of {frame:?}");
            assert_eq!(
                after.malformed,
                before.malformed + 1,
                "len {len} of {frame:?} should count as malformed"
            );
        }
    }
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn truncated_headers_at_every_length() {
    let Some(h) = harness("truncated_headers", CONFIG) else {
        return;
    };
    check_truncations(&h, &Frame::new("192.0.2.10", L4::Tcp(80)), 14 + 20, 80);
    check_truncations(
        &h,
        &Frame::new("192.0.2.10", L4::Tcp(80)).vlans(&[0x8100]),
        18 + 20,
        80,
    );
    check_truncations(
        &h,
        &Frame::new("2001:db8::10", L4::Tcp(80)).vlans(&[0x8100]),
        18 + 40,
        86,
    );
    check_truncations(
        &h,
        &Frame::new("192.0.2.53", L4::Udp(53))
            .vlans(&[0x88a8, 0x8100])
            .ipv4_options(&[1, 1, 1, 0]),
        14 + 8 + 24,
        53,
    );
    check_truncations(&h, &Frame::new("2001:db8::90", L4::Sctp(2905)), 14 + 40, 90);
    check_truncations(
        &h,
        &Frame::new("2001:db8::10", L4::Tcp(443)).ipv6_ext(&[
            Ext::HopByHop,
            Ext::Routing,
            Ext::Fragment {
                offset: 0,
                more: true,
            },
        ]),
        14 + 40 + 16 + 8 + 8,
        86,
    );
    check_truncations(
        &h,
        &Frame::new("2001:db8::53", L4::Udp(53))
            .vlans(&[0x8100])
            .ipv6_ext(&[
                Ext::DestOptions,
                Ext::Fragment {
                    offset: 0,
                    more: true,
                },
            ]),
        18 + 40 + 16 + 8,
        53,
    );
}

/// Headers the classifier does not need all of must still be whole: IPv4
/// options of a later fragment, an IPv6 extension header before a protocol
/// without ports (what ip_rcv and ip6tables' header walk would refuse).
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn truncated_options_and_extension_headers_are_malformed() {
    let Some(h) = harness("truncated_options_and_extension_headers", CONFIG) else {
        return;
    };
    // A later fragment to an every-port service is marked when whole...
    let later = Frame::new("192.0.2.77", L4::Tcp(80))
        .vlans(&[0x8100])
        .ipv4_options(&[1; 12])
        .ipv4_fragment(185, false);
    let bytes = later.build();
    assert_eq!(h.run(&bytes, PRESET).unwrap().mark, 77);
    // ...and malformed when its options are cut, whatever follows them.
    let l3 = l3_offset(1);
    for len in [l3 + 20, l3 + 31] {
        let before = h.global().unwrap();
        let v = h.run(&bytes[..len], PRESET).unwrap();
        assert_eq!((v.ret, v.mark), (TC_ACT_UNSPEC, PRESET), "len {len}");
        let after = h.global().unwrap();
        assert_eq!(after.malformed, before.malformed + 1, "len {len}");
        assert_eq!(after.later_fragment, before.later_fragment, "len {len}");
    }
    // IPv6 hop-by-hop header (16 bytes) cut short before ICMPv6.
    let icmp = Frame::new("2001:db8::77", L4::Other(58)).ipv6_ext(&[Ext::HopByHop]);
    let bytes = icmp.build();
    let whole = h.global().unwrap();
    h.run(&bytes, PRESET).unwrap();
    assert_eq!(h.global().unwrap().no_match, whole.no_match + 1);
    for len in [14 + 40 + 2, 14 + 40 + 15] {
        let before = h.global().unwrap();
        let v = h.run(&bytes[..len], PRESET).unwrap();
        assert_eq!((v.ret, v.mark), (TC_ACT_UNSPEC, PRESET), "len {len}");
        assert_eq!(
            h.global().unwrap().malformed,
            before.malformed + 1,
            "len {len}"
        );
    }
}

/// fwmark's precedence by example (nested prefixes, exact addresses, port
/// and every-port entries of both families), shared with fwmark-core's tests.
const PRECEDENCE: &str = examples::CONFIG;

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn precedence_exact_before_prefix_longest_first_port_before_all() {
    let Some(h) = harness("precedence", PRECEDENCE) else {
        return;
    };
    for (dst, proto, port, want) in examples::CASES {
        let f = Frame::new(dst, L4::new(proto, Some(port)));
        match want {
            Some(m) => assert_marked(&h, &f, m),
            None => assert_untouched(&h, &f),
        }
    }
}

const MASKS: &str = r#"
[[service]]
name = "bit"
vip = "192.0.2.1"
proto = "tcp"
ports = [80]
mark = 0x4000
mask = 0x4000

[[service]]
name = "byte"
vip = "192.0.2.2"
proto = "tcp"
ports = [80]
mark = 0x0100
mask = 0xff00

[[service]]
name = "whole"
vip = "192.0.2.3"
proto = "tcp"
ports = [80]
mark = 0x50
"#;

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn mask_semantics_with_a_preset_mark() {
    let Some(h) = harness("mask_semantics", MASKS) else {
        return;
    };
    let cases = [
        ("192.0.2.1", 0x1234, 0x5234),
        ("192.0.2.1", 0xffff, 0xffff),
        ("192.0.2.1", 0, 0x4000),
        ("192.0.2.2", 0xabcd, 0x01cd),
        ("192.0.2.2", 0xffff_ffff, 0xffff_01ff),
        ("192.0.2.3", 0xdead_beef, 0x50),
        ("192.0.2.4", 0x77, 0x77), // no match: untouched
    ];
    for (dst, preset, want) in cases {
        let v = h
            .run(&Frame::new(dst, L4::Tcp(80)).build(), preset)
            .unwrap();
        assert_eq!(v.ret, TC_ACT_UNSPEC);
        assert_eq!(v.mark, want, "{dst} preset {preset:#x}: got {:#x}", v.mark);
    }
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn counters_add_up() {
    let Some(h) = harness("counters_add_up", CONFIG) else {
        return;
    };
    let marked_frames = [
        Frame::new("192.0.2.10", L4::Tcp(80)),
        Frame::new("192.0.2.10", L4::Tcp(443)),
        Frame::new("192.0.2.10", L4::Tcp(443)).vlans(&[0x8100]),
        Frame::new("2001:db8::53", L4::Udp(53)),
        Frame::new("192.0.2.77", L4::Tcp(80)).ipv4_fragment(10, false),
    ];
    let unmarked = [
        Frame::new("192.0.2.10", L4::Tcp(22)),
        Frame::new("192.0.2.10", L4::Tcp(80)).ipv4_fragment(10, true),
    ];
    let mut bytes_web = 0u64;
    for f in &marked_frames {
        let bytes = f.build();
        assert_ne!(h.run(&bytes, 0).unwrap().mark, 0);
        if f.dst.to_string() == "192.0.2.10" {
            bytes_web += (bytes.len() - l3_offset(f.vlans.len())) as u64;
        }
    }
    for f in &unmarked {
        assert_eq!(h.run(&f.build(), 0).unwrap().mark, 0);
    }
    let mut arp = Frame::new("192.0.2.10", L4::Tcp(80)).build();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    h.run(&arp, 0).unwrap();
    let mut short = Frame::new("192.0.2.10", L4::Tcp(80))
        .vlans(&[0x8100])
        .build();
    short.truncate(24);
    h.run(&short, 0).unwrap();

    let g = h.global().unwrap();
    assert_eq!(g.seen, 9);
    assert_eq!(g.marked, 5);
    assert_eq!(g.no_match, 2);
    assert_eq!(g.non_ip, 1);
    assert_eq!(g.malformed, 1);
    assert_eq!(g.later_fragment, 2);
    assert_eq!(g.seen, g.marked + g.no_match + g.non_ip + g.malformed);

    // Per rule: web's port 80 and 443 rules, counted from the IP header on.
    let rules = h.rules().unwrap();
    let web: Vec<_> = h
        .ruleset
        .rules
        .iter()
        .zip(&rules)
        .filter(|(r, _)| h.config.services[r.service].name == "web")
        .map(|(_, c)| *c)
        .collect();
    assert_eq!(
        web.iter().map(|c| c.packets).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(web.iter().map(|c| c.bytes).sum::<u64>(), bytes_web);
    assert_eq!(rules.iter().map(|c| c.packets).sum::<u64>(), 5);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn republishing_switches_generations() {
    let Some(mut h) = harness("republishing", CONFIG) else {
        return;
    };
    assert_marked(&h, &Frame::new("192.0.2.10", L4::Tcp(80)), 80);
    let other = fwmark_core::config::Config::parse(
        "[[service]]\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [80]\nmark = 81\n",
        "b",
    )
    .unwrap();
    let rs = fwmark_core::ruleset::Ruleset::compile(&other).unwrap();
    for round in 0..5u32 {
        let (rs, mark) = if round % 2 == 0 {
            (&rs, 81)
        } else {
            (&h.ruleset, 80)
        };
        let rs = rs.clone();
        h.datapath.publish_simple(&rs).unwrap();
        assert_marked(&h, &Frame::new("192.0.2.10", L4::Tcp(80)), mark);
        assert_eq!(h.datapath.maps.active_slot().unwrap(), (round + 1) % 2);
    }
    assert_untouched(&h, &Frame::new("192.0.2.10", L4::Tcp(443)));
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn republishing_switches_prefix_lookups_on_and_off() {
    let Some(mut h) = harness("republishing_prefixes", PRECEDENCE) else {
        return;
    };
    let in_prefix = Frame::new("198.51.100.10", L4::Tcp(80));
    assert_marked(&h, &in_prefix, 2);
    let exact_only = fwmark_core::ruleset::Ruleset::compile(
        &fwmark_core::config::Config::parse(CONFIG, "exact only").unwrap(),
    )
    .unwrap();
    let with_prefixes = h.ruleset.clone();
    h.datapath.publish_simple(&exact_only).unwrap();
    assert_untouched(&h, &in_prefix);
    assert_marked(&h, &Frame::new("192.0.2.10", L4::Tcp(80)), 80);
    h.datapath.publish_simple(&with_prefixes).unwrap();
    assert_marked(&h, &in_prefix, 2);
    assert_untouched(&h, &Frame::new("192.0.2.10", L4::Tcp(80)));
}

/// Port ranges switched on, off and on again: the range tables and their
/// flag in `ACTIVE` go with the generation, and a table a generation
/// without ranges leaves in a slot is never read.
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn republishing_switches_range_lookups_on_and_off() {
    let service = |ports: &str, mark: u32| {
        format!(
            "[[service]]\nname = \"ftp\"\nvip = \"192.0.2.21\"\nproto = \"tcp\"\n\
             ports = {ports}\nmark = {mark}\n"
        )
    };
    let compile = |text: &str| {
        fwmark_core::ruleset::Ruleset::compile(
            &fwmark_core::config::Config::parse(text, "ranges").unwrap(),
        )
        .unwrap()
    };
    let wide = service(r#"[21, "10000-20000"]"#, 21);
    let Some(mut h) = harness("republishing_ranges", &wide) else {
        return;
    };
    assert_eq!(h.ruleset.ranges.len(), 1, "10000-20000 stays one range");
    let (p12345, p15500, p21) = (
        Frame::new("192.0.2.21", L4::Tcp(12345)),
        Frame::new("192.0.2.21", L4::Tcp(15500)),
        Frame::new("192.0.2.21", L4::Tcp(21)),
    );
    assert_marked(&h, &p12345, 21);
    let none = compile(&service("[21]", 21));
    assert!(none.ranges.is_empty());
    // Twice: the second lands in the slot the ranges were published in.
    for _ in 0..2 {
        h.datapath.publish_simple(&none).unwrap();
        assert_untouched(&h, &p12345);
        assert_marked(&h, &p21, 21);
    }
    let narrow = compile(&service(r#"["15000-16000"]"#, 22));
    h.datapath.publish_simple(&narrow).unwrap();
    assert_untouched(&h, &p12345);
    assert_untouched(&h, &p21);
    assert_marked(&h, &p15500, 22);
    h.datapath.publish_simple(&none).unwrap();
    assert_untouched(&h, &p15500);
    assert_marked(&h, &p21, 21);
}

/// Config A: the exact entry marks 80. Config B: no exact entry, the prefix
/// marks 81. A packet classified with A's prefix but B's exact map (a mix)
/// would get mark 1, or none at all.
const MIX_A: &str = r#"
[[service]]
name = "exact"
vip = "192.0.2.10"
proto = "tcp"
ports = [80]
mark = 80

[[service]]
name = "block"
vip = "192.0.2.0/24"
proto = "tcp"
mark = 1
"#;

const MIX_B: &str = r#"
[[service]]
name = "block"
vip = "192.0.2.0/24"
proto = "tcp"
mark = 81
"#;

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn readers_never_see_a_mixed_generation() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(mut h) = harness("readers_never_see_a_mixed_generation", MIX_A) else {
        return;
    };
    let a = h.ruleset.clone();
    let b = fwmark_core::ruleset::Ruleset::compile(
        &fwmark_core::config::Config::parse(MIX_B, "mix b").unwrap(),
    )
    .unwrap();
    let frame = Frame::new("192.0.2.10", L4::Tcp(80)).build();
    let (program, maps) = h.datapath.split().unwrap();
    let done = AtomicBool::new(false);
    let (seen, switches) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            use aya::programs::{TestRun as _, TestRunOptions};
            let mut seen = std::collections::BTreeMap::<u32, u64>::new();
            while !done.load(Ordering::Relaxed) {
                let mut ctx_out = [0u8; 192];
                program
                    .test_run(TestRunOptions {
                        data_in: Some(&frame),
                        ctx_in: Some(&[0u8; 192]),
                        ctx_out: Some(&mut ctx_out),
                        ..TestRunOptions::default()
                    })
                    .unwrap();
                let mark = u32::from_ne_bytes(ctx_out[8..12].try_into().unwrap());
                *seen.entry(mark).or_default() += 1;
            }
            seen
        });
        let mut switches = 0;
        for i in 0..200 {
            let rs = if i % 2 == 0 { &b } else { &a };
            let slots: Vec<u32> = (0..rs.rules.len() as u32).collect();
            maps.publish(rs, &slots, &[]).unwrap();
            switches += 1;
        }
        done.store(true, Ordering::Relaxed);
        (reader.join().unwrap(), switches)
    });
    assert_eq!(switches, 200);
    let total: u64 = seen.values().sum();
    assert!(total > 1000, "the reader ran only {total} times: {seen:?}");
    assert!(
        seen.keys().all(|m| *m == 80 || *m == 81),
        "a packet saw a mix of generations: {seen:?}"
    );
    assert!(seen.contains_key(&80) && seen.contains_key(&81), "{seen:?}");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn the_userspace_reference_agrees_with_the_kernel() {
    let Some(h) = harness("the_userspace_reference_agrees_with_the_kernel", PRECEDENCE) else {
        return;
    };
    let mut checked = 0;
    for dst in [
        "198.51.100.200",
        "198.51.100.130",
        "198.51.100.10",
        "198.51.100.255",
        "198.51.7.7",
        "198.52.0.1",
        "2001:db8:1:2::5",
        "2001:db8:1:3::5",
        "2001:db8:2::5",
    ] {
        for l4 in [
            L4::Tcp(22),
            L4::Tcp(80),
            L4::Tcp(81),
            L4::Tcp(443),
            L4::Udp(80),
        ] {
            let frame = Frame::new(dst, l4);
            let (proto, port) = match l4 {
                L4::Tcp(p) => (6, p),
                L4::Udp(p) => (17, p),
                _ => unreachable!(),
            };
            let want = h
                .ruleset
                .classify(frame.dst, proto, Some(port))
                .map_or(PRESET, |t| (PRESET & !t.mask) | (t.mark & t.mask));
            assert_eq!(run(&h, &frame).mark, want, "{dst} {l4:?}");
            checked += 1;
        }
    }
    assert_eq!(checked, 45);
}

// ---- ICMP errors (`icmp_errors = true`) ------------------------------------

/// A router on the way from the director to its clients.
const ROUTER_V4: &str = "198.51.100.1";
const ROUTER_V6: &str = "2001:db8:ffff::1";
/// A client of the services.
const CLIENT_V4: &str = "203.0.113.50";
const CLIENT_V6: &str = "2001:db8:c::50";

/// A packet the director (its real server) sent: from `vip` and the port
/// of `l4` to a client's port 40000, as an ICMP error quotes it.
fn reply(vip: &str, l4: L4) -> Frame {
    let client = if vip.contains(':') {
        CLIENT_V6
    } else {
        CLIENT_V4
    };
    let (client_l4, port) = match l4 {
        L4::Tcp(p) => (L4::Tcp(40000), p),
        L4::Udp(p) => (L4::Udp(40000), p),
        L4::Sctp(p) => (L4::Sctp(40000), p),
        other => (other, 0),
    };
    Frame::new(client, client_l4)
        .from(vip.parse().unwrap())
        .from_port(port)
}

/// An ICMP error of type `ty` about `quoted`, quoting its IP header and
/// `quoted_l4` bytes after it (8 as ICMPv4 routers do).
fn error_about(ty: u8, quoted: &Frame, quoted_l4: usize) -> Frame {
    let router = if quoted.dst.is_ipv6() {
        ROUTER_V6
    } else {
        ROUTER_V4
    };
    let ip_len = quoted.l4_offset() - l3_offset(quoted.vlans.len());
    Frame::icmp_error(
        router.parse().unwrap(),
        ty,
        0,
        [0, 0, 0x05, 0x78],
        quoted,
        ip_len + quoted_l4,
    )
}

fn icmp_config() -> String {
    format!("icmp_errors = true\n{CONFIG}")
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn icmp_errors_take_the_mark_of_the_quoted_source() {
    let Some(h) = harness("icmp_errors", &icmp_config()) else {
        return;
    };
    let before = h.global().unwrap();
    // Fragmentation needed, source quench, time exceeded about web's
    // 192.0.2.10:443 -> client, quoted with every IPv4 header length.
    let mut marked = 0;
    for ty in [3, 4, 11] {
        for opts in (0..=40).step_by(4) {
            let q = reply("192.0.2.10", L4::Tcp(443)).ipv4_options(&vec![1; opts]);
            assert_marked(&h, &error_about(ty, &q, 8), 80);
            marked += 1;
        }
    }
    // Behind VLAN tags, with IPv4 options on the error itself.
    let q = reply("192.0.2.53", L4::Udp(53));
    assert_marked(
        &h,
        &error_about(3, &q, 8)
            .vlans(&[0x88a8, 0x8100])
            .ipv4_options(&[1, 1, 1, 0]),
        53,
    );
    marked += 1;
    // SCTP, and IPv6 errors 1-4 with quoted extension headers.
    assert_marked(
        &h,
        &error_about(11, &reply("192.0.2.90", L4::Sctp(2905)), 8),
        90,
    );
    marked += 1;
    for ty in 1..=4 {
        for ext in [
            vec![],
            vec![Ext::HopByHop, Ext::Routing, Ext::DestOptions],
            vec![
                Ext::HopByHop,
                Ext::Fragment {
                    offset: 0,
                    more: true,
                },
            ],
        ] {
            let q = reply("2001:db8::10", L4::Tcp(80)).ipv6_ext(&ext);
            assert_marked(&h, &error_about(ty, &q, 8), 86);
            let q = reply("2001:db8::53", L4::Udp(53)).ipv6_ext(&ext);
            assert_marked(&h, &error_about(ty, &q, 8).ipv6_ext(&ext), 53);
            marked += 2;
        }
    }
    // A quoted later fragment has no port: only every-port services.
    let frag = reply("192.0.2.77", L4::Tcp(80)).ipv4_fragment(185, false);
    assert_marked(&h, &error_about(3, &frag, 8), 77);
    marked += 1;
    let frag = reply("192.0.2.10", L4::Tcp(443)).ipv4_fragment(185, false);
    assert_untouched(&h, &error_about(3, &frag, 8));
    // The SOURCE port and address decide: a quoted packet TO the VIP's
    // port (the client's side), or from another port, is not the service's.
    let towards = Frame::new("192.0.2.10", L4::Tcp(443)).from(CLIENT_V4.parse().unwrap());
    assert_untouched(&h, &error_about(3, &towards, 8));
    let towards6 = Frame::new("2001:db8::10", L4::Tcp(443)).from(CLIENT_V6.parse().unwrap());
    assert_untouched(&h, &error_about(2, &towards6, 8));
    let other_port = reply("192.0.2.10", L4::Tcp(8443));
    assert_untouched(&h, &error_about(3, &other_port, 8));
    // Informational ICMP is never marked, whatever follows its header.
    let q = reply("192.0.2.10", L4::Tcp(443));
    for ty in [0, 5, 8, 12, 13, 14] {
        assert_untouched(&h, &error_about(ty, &q, 8));
    }
    let q6 = reply("2001:db8::10", L4::Tcp(443));
    for ty in [0, 5, 11, 128, 129, 133, 135, 136] {
        assert_untouched(&h, &error_about(ty, &q6, 8));
    }
    // ICMPv4 in IPv6 or ICMPv6 in IPv4 is not an ICMP error of its packet.
    let mut v4_in_v6 = error_about(3, &q, 8);
    v4_in_v6.dst = "2001:db8::10".parse().unwrap();
    v4_in_v6.src = None;
    v4_in_v6.l4 = L4::Other(1);
    assert_untouched(&h, &v4_in_v6);
    // ICMPv4 quoting IPv6 is malformed.
    let wrong = error_about(3, &q6, 8);
    let mut wrong = Frame::icmp(
        ROUTER_V4.parse().unwrap(),
        "192.0.2.10".parse().unwrap(),
        3,
        4,
        [0; 4],
        &wrong.ip_packet(),
    );
    wrong.vlans.clear();
    let m = h.global().unwrap().malformed;
    assert_untouched(&h, &wrong);
    assert_eq!(h.global().unwrap().malformed, m + 1);

    let after = h.global().unwrap();
    assert_eq!(after.icmp_error - before.icmp_error, marked);
    assert_eq!(after.marked - before.marked, marked);
    // Per service: web's rules counted every web error.
    let web: u64 = h
        .ruleset
        .rules
        .iter()
        .zip(h.rules().unwrap())
        .filter(|(r, _)| h.config.services[r.service].name == "web")
        .map(|(_, c)| c.icmp_errors)
        .sum();
    assert_eq!(web, 33);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn icmp_errors_off_leaves_them_unmarked_and_switches_with_the_entries() {
    let Some(mut h) = harness("icmp_errors_off", CONFIG) else {
        return;
    };
    let error = error_about(3, &reply("192.0.2.10", L4::Tcp(443)), 8);
    let cut = {
        let mut b = error.build();
        b.truncate(14 + 20 + 8 + 10);
        b
    };
    let g = h.global().unwrap();
    assert_untouched(&h, &error);
    // Off, a cut quote is not read: no match, not malformed.
    assert_eq!(h.run(&cut, PRESET).unwrap().mark, PRESET);
    let after = h.global().unwrap();
    assert_eq!(
        (after.no_match - g.no_match, after.malformed - g.malformed),
        (2, 0)
    );
    // Turned on by a new generation, off again by the next.
    let on = fwmark_core::ruleset::Ruleset::compile(
        &fwmark_core::config::Config::parse(&icmp_config(), "on").unwrap(),
    )
    .unwrap();
    let off = h.ruleset.clone();
    h.datapath.publish_simple(&on).unwrap();
    assert_marked(&h, &error, 80);
    let g = h.global().unwrap();
    assert_eq!(h.run(&cut, PRESET).unwrap().mark, PRESET);
    assert_eq!(h.global().unwrap().malformed, g.malformed + 1);
    h.datapath.publish_simple(&off).unwrap();
    assert_untouched(&h, &error);
}

/// An ICMP error cut at every length: the kernel agrees with the model on
/// the mark and on every global counter, and marks exactly when the quoted
/// packet's first 8 transport bytes are there.
fn check_icmp_truncations(h: &Harness, model: &Model, frame: &Frame, quoted_l4: usize) {
    let full = frame.build();
    let mut marked_at = None;
    for len in 14..=full.len() {
        let before = h.global().unwrap();
        let got = h.try_run(&full[..len], PRESET).unwrap();
        let want = model.classify(&full[..len], PRESET);
        let Ok(v) = got else {
            // BPF_PROG_TEST_RUN refuses untagged frames shorter than the
            // fixed IP header; the tagged cases cover those lengths.
            assert!(len < l3_offset(frame.vlans.len()) + 40, "len {len} refused");
            continue;
        };
        let after = h.global().unwrap();
        assert_eq!(v.ret, TC_ACT_UNSPEC, "len {len}");
        assert_eq!(v.mark, want.mark, "len {len}: kernel vs model {want:?}");
        let mut counted = fwmark_common::GlobalCounters::default();
        want.count(&mut counted);
        assert_eq!(
            (
                after.seen - before.seen,
                after.marked - before.marked,
                after.no_match - before.no_match,
                after.malformed - before.malformed,
                after.icmp_error - before.icmp_error,
            ),
            (
                counted.seen,
                counted.marked,
                counted.no_match,
                counted.malformed,
                counted.icmp_error
            ),
            "len {len}"
        );
        if v.mark != PRESET && marked_at.is_none() {
            marked_at = Some(len);
        }
    }
    assert_eq!(
        marked_at,
        Some(quoted_l4 + 8),
        "marked from the first length that holds 8 quoted transport bytes"
    );
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn icmp_errors_truncated_at_every_length_kernel_equals_model() {
    let Some(h) = harness("icmp_truncated", &icmp_config()) else {
        return;
    };
    let model = Model::new(&h.config);
    // IPv4 error with a quoted IPv4 header with 12 bytes of options, behind
    // a VLAN tag (so every length from 14 runs).
    let q = reply("192.0.2.10", L4::Tcp(443)).ipv4_options(&[1; 12]);
    let f = error_about(3, &q, 8).vlans(&[0x8100]);
    check_icmp_truncations(&h, &model, &f, 18 + 20 + 8 + 32);
    // A whole quoted TCP header (routers may quote more): still 8 decide.
    let f = error_about(11, &q, 20);
    check_icmp_truncations(&h, &model, &f, 14 + 20 + 8 + 32);
    // IPv6 packet too big quoting a packet with extension headers, the
    // error itself with a hop-by-hop header, tagged.
    let exts = [
        Ext::HopByHop,
        Ext::Routing,
        Ext::Fragment {
            offset: 0,
            more: true,
        },
    ];
    let q6 = reply("2001:db8::53", L4::Udp(53)).ipv6_ext(&exts);
    let f = error_about(2, &q6, 8)
        .ipv6_ext(&[Ext::HopByHop])
        .vlans(&[0x8100]);
    check_icmp_truncations(&h, &model, &f, 18 + 40 + 16 + 8 + 40 + 16 + 8 + 8);
    let q6 = reply("2001:db8::90", L4::Sctp(2905)).ipv6_ext(&[Ext::DestOptions]);
    let f = error_about(1, &q6, 12).vlans(&[0x8100]);
    check_icmp_truncations(&h, &model, &f, 18 + 40 + 8 + 40 + 16);
}
