//! L3 devices on this machine's kernel: a tun device (`IFF_TUN`, so
//! `ARPHRD_NONE` like WireGuard) in a namespace of the test's own. `fwmark
//! run` attaches its L3 entry there; IP packets written to the tun file
//! arrive on its ingress with no Ethernet header (`mac_len` 0, which
//! BPF_PROG_TEST_RUN cannot give) and must reach prerouting with exactly the
//! marks they get on Ethernet, and `fwmark status` must count them.
//! (ipip and GRE, which this kernel lacks, are tested in the VM.)

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use fwmark_testlab::{
    daemon::{Daemon, fwmark_bin},
    kernel,
    netns::{Netns, ingress_programs, unique_name},
    ops::{TempDir, service_packets},
    packets::{Ext, Frame, L4},
    recorder::{Point, Recorder},
    tun::Tun,
};

const CONFIG: &str = r#"
[[service]]
name = "web"
vip = ["192.0.2.10", "2001:db8::10"]
proto = "tcp"
ports = [80, 443]
mark = 0x50

[[service]]
name = "dns"
vip = ["192.0.2.53", "2001:db8::53"]
proto = "udp"
ports = [53]
mark = 0x35

[[service]]
name = "net"
vip = ["198.51.100.0/24", "2001:db8:5::/64"]
proto = ["tcp", "udp"]
mark = 0x77
"#;

/// Every packet is written this many times.
const COPIES: u64 = 3;

/// Removes fwmark's pins and state of the test's device when dropped, also
/// when the test fails (after the namespace and its processes are gone:
/// declare it before them).
/// (fwmark's pin and run directories of the device in the test's
/// namespace, set once the namespace exists).
struct StateGuard(Vec<std::path::PathBuf>);

impl Drop for StateGuard {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
            // The namespace's own directory, once empty.
            if let Some(parent) = dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

fn point(dst: &str, proto: u8, port: u16) -> Point {
    (dst.parse().unwrap(), proto, port)
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn tun_packets_get_exact_marks_and_counts() {
    if !kernel::available("tun_packets_get_exact_marks_and_counts", &["ip", "nft"]) {
        return;
    }
    let name = unique_name('u');
    let mut state = StateGuard(Vec::new());
    let ns = Netns::create('t').expect("create a namespace");
    state.0 = ns.fwmark_dirs(&name).to_vec();
    let mut tun = Tun::create(&ns, &name).expect("create the tun device");
    // An IPv6 address gives the device its inet6 state (ip6_rcv needs it).
    ns.ip(&["addr", "add", "2001:db8:ff::1/64", "dev", &name])
        .expect("address the tun device");
    let recorder = Recorder::install(&ns).expect("install the recorder");
    let (_dir, config) = TempDir::with_file("tun", "fwmark.toml", CONFIG);
    let daemon = Daemon::start(&ns, &["run", "--iface", &name, "--config", &config])
        .expect("fwmark run attaches to the tun device");
    assert_eq!(
        ingress_programs(&ns, &name).unwrap(),
        vec!["tcx:fwmark_l3".to_string()],
        "the L3 entry is attached"
    );

    // (packet, where it arrives, the mark it must arrive with; 0: unmarked)
    let v4: IpAddr = "192.0.2.10".parse().unwrap();
    let cases: Vec<(Vec<u8>, Point, u32)> = vec![
        (
            Frame::new("192.0.2.10", L4::Tcp(80)).ip_packet(),
            point("192.0.2.10", 6, 80),
            0x50,
        ),
        (
            Frame::new("2001:db8::10", L4::Tcp(443)).ip_packet(),
            point("2001:db8::10", 6, 443),
            0x50,
        ),
        (
            Frame::new("192.0.2.53", L4::Udp(53)).ip_packet(),
            point("192.0.2.53", 17, 53),
            0x35,
        ),
        (
            // IPv6 with a destination-options header (the classifier walks
            // it; a hop-by-hop header the stack would check before prerouting).
            Frame::new("2001:db8::53", L4::Udp(53))
                .ipv6_ext(&[Ext::DestOptions])
                .ip_packet(),
            point("2001:db8::53", 17, 53),
            0x35,
        ),
        (
            // IPv4 options: the header is 32 bytes.
            Frame::new("198.51.100.7", L4::Udp(9999))
                .ipv4_options(&[1; 12])
                .ip_packet(),
            point("198.51.100.7", 17, 9999),
            0x77,
        ),
        (
            Frame::new("2001:db8:5::9", L4::Tcp(8080)).ip_packet(),
            point("2001:db8:5::9", 6, 8080),
            0x77,
        ),
        // Misses: another port, another address, another protocol.
        (
            Frame::to(v4, L4::Tcp(22)).ip_packet(),
            point("192.0.2.10", 6, 22),
            0,
        ),
        (
            Frame::new("2001:db8::99", L4::Tcp(80)).ip_packet(),
            point("2001:db8::99", 6, 80),
            0,
        ),
        (
            Frame::new("192.0.2.53", L4::Tcp(53)).ip_packet(),
            point("192.0.2.53", 6, 53),
            0,
        ),
    ];
    for _ in 0..COPIES {
        for (packet, _, _) in &cases {
            tun.send(packet).expect("write to the tun device");
        }
    }
    // The writes are received asynchronously (the backlog): wait for them.
    let want: BTreeMap<Point, Vec<u32>> = cases.iter().map(|(_, p, m)| (*p, vec![*m])).collect();
    let mut seen = BTreeMap::new();
    for _ in 0..50 {
        seen = recorder.read().expect("read the recorder");
        if seen == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        seen,
        want,
        "marks at prerouting (point -> marks)\nfwmark log:\n{}",
        daemon.stderr_so_far()
    );

    // fwmark's own counters saw the same packets.
    let out = ns
        .command(fwmark_bin())
        .args(["status", "--iface", &name, "--json"])
        .output()
        .expect("fwmark status");
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hits = 6 * COPIES;
    let misses = 3 * COPIES;
    assert_eq!(status["global"]["marked"], hits, "{status}");
    assert_eq!(status["global"]["no_match"], misses, "{status}");
    assert_eq!(status["global"]["malformed"], 0, "{status}");
    let packets = |service: &str| service_packets(&status, service);
    assert_eq!(packets("web"), 2 * COPIES);
    assert_eq!(packets("dns"), 2 * COPIES);
    assert_eq!(packets("net"), 2 * COPIES);

    let finished = daemon.stop().expect("fwmark stops");
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(
        ingress_programs(&ns, &name).unwrap().is_empty(),
        "nothing left attached"
    );
    drop(tun);
}
