//! fwmark.example.toml and the traffic that proves it: shared by the
//! end-to-end test and `cargo xtask demo`.

use std::{net::IpAddr, path::PathBuf};

use crate::nft::{Probe, ProbeProto};

/// The example config shipped at the workspace root.
pub fn config_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fwmark.example.toml")
}

/// A probe: `count` packets to `dst` `proto`/`port` that must arrive with
/// `expect_mark` (0: unmarked).
pub fn probe(dst: &str, proto: ProbeProto, port: u16, expect_mark: u32, count: u32) -> Probe {
    Probe {
        dst: dst.parse().expect("probe address"),
        proto,
        port,
        expect_mark,
        count,
    }
}

/// What fwmark.example.toml promises, written out by hand (not derived from
/// the config): every listed port, both ends of the FTP range and the ports
/// just outside it, other ports and other protocols of the same VIPs.
pub fn probes() -> Vec<Probe> {
    use ProbeProto::{Tcp, Udp};
    vec![
        probe("192.0.2.10", Tcp, 80, 80, 3),
        probe("192.0.2.10", Tcp, 443, 80, 3),
        probe("192.0.2.10", Tcp, 8080, 0, 2),
        probe("192.0.2.10", Udp, 80, 0, 2),
        probe("192.0.2.21", Tcp, 21, 21, 2),
        probe("192.0.2.21", Tcp, 9999, 0, 1),
        probe("192.0.2.21", Tcp, 10000, 21, 2),
        probe("192.0.2.21", Tcp, 15000, 21, 1),
        probe("192.0.2.21", Tcp, 20000, 21, 2),
        probe("192.0.2.21", Tcp, 20001, 0, 1),
        probe("192.0.2.53", Udp, 53, 53, 3),
        probe("192.0.2.53", Udp, 54, 0, 1),
        probe("192.0.2.53", Tcp, 53, 0, 1),
        probe("2001:db8::10", Tcp, 80, 86, 3),
        probe("2001:db8::10", Tcp, 443, 86, 2),
        probe("2001:db8::10", Tcp, 22, 0, 1),
        probe("2001:db8::10", Udp, 443, 0, 1),
    ]
}

/// The distinct destination addresses of `probes` (the VIPs to set up).
pub fn vips(probes: &[Probe]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = probes.iter().map(|p| p.dst).collect();
    v.sort();
    v.dedup();
    v
}
