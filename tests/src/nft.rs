//! nftables counters in the director's prerouting (after TC ingress, at
//! mangle priority): for each probe, packets counted per mark.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use anyhow::{Context as _, Result, bail};

use crate::netns::{Netns, run_cmd};

const TABLE: &str = "fwmarktest";

/// Transport protocol of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProbeProto {
    Tcp,
    Udp,
}

impl fmt::Display for ProbeProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProbeProto::Tcp => "tcp",
            ProbeProto::Udp => "udp",
        })
    }
}

/// Traffic to one (address, protocol, port) and the mark it must arrive with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub dst: IpAddr,
    pub proto: ProbeProto,
    pub port: u16,
    /// 0: no service, the packet must arrive unmarked.
    pub expect_mark: u32,
    /// How many connection attempts or datagrams to send.
    pub count: u32,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.dst, self.proto, self.port)
    }
}

/// Packets seen per mark for one probe; `other` counts marks no probe expects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub by_mark: BTreeMap<u32, u64>,
    pub other: u64,
}

impl Observed {
    /// Total packets seen.
    pub fn total(&self) -> u64 {
        self.by_mark.values().sum::<u64>() + self.other
    }
}

/// The counting table installed in a namespace.
pub struct MarkCounters<'a> {
    ns: &'a Netns,
    probes: Vec<Probe>,
    marks: BTreeSet<u32>,
}

impl<'a> MarkCounters<'a> {
    /// Installs one counter per (probe, mark) for every mark any probe
    /// expects, plus 0, and one for any other mark.
    pub fn install(ns: &'a Netns, probes: &[Probe]) -> Result<MarkCounters<'a>> {
        MarkCounters::install_with_marks(ns, probes, &[])
    }

    /// [`MarkCounters::install`], also counting `extra` marks separately.
    pub fn install_with_marks(
        ns: &'a Netns,
        probes: &[Probe],
        extra: &[u32],
    ) -> Result<MarkCounters<'a>> {
        let mut marks: BTreeSet<u32> = probes.iter().map(|p| p.expect_mark).collect();
        marks.insert(0);
        marks.extend(extra);
        let mut script = format!(
            "table inet {TABLE} {{\n  chain prerouting {{\n    \
             type filter hook prerouting priority mangle; policy accept;\n"
        );
        let set = marks
            .iter()
            .map(|m| format!("{m:#x}"))
            .collect::<Vec<_>>()
            .join(", ");
        for (i, p) in probes.iter().enumerate() {
            let family = if p.dst.is_ipv4() { "ip" } else { "ip6" };
            let matcher = format!("{family} daddr {} {} dport {}", p.dst, p.proto, p.port);
            for m in &marks {
                script +=
                    &format!("    {matcher} meta mark {m:#x} counter comment \"p{i} m{m}\"\n");
            }
            script +=
                &format!("    {matcher} meta mark != {{ {set} }} counter comment \"p{i} other\"\n");
        }
        script += "  }\n}\n";
        nft_script(ns, &script).with_context(|| script.clone())?;
        Ok(MarkCounters {
            ns,
            probes: probes.to_vec(),
            marks,
        })
    }

    /// Reads the counters: one [`Observed`] per probe, in probe order.
    pub fn read(&self) -> Result<Vec<Observed>> {
        let json = run_cmd(
            self.ns
                .command("nft")
                .args(["-j", "list", "table", "inet", TABLE]),
        )?;
        let mut out = vec![Observed::default(); self.probes.len()];
        for (comment, packets) in commented_counters(&json)? {
            let (probe, what) = comment.split_once(' ').context("comment format")?;
            let i: usize = probe.trim_start_matches('p').parse()?;
            if what == "other" {
                out[i].other = packets;
            } else {
                let m: u32 = what.trim_start_matches('m').parse()?;
                out[i].by_mark.insert(m, packets);
            }
        }
        Ok(out)
    }

    /// The marks counted separately.
    pub fn marks(&self) -> &BTreeSet<u32> {
        &self.marks
    }
}

/// The packet counts of the commented counter rules in `nft -j list …`
/// output, as (comment, packets), in rule order.
pub fn commented_counters(json: &str) -> Result<Vec<(String, u64)>> {
    let doc: serde_json::Value = serde_json::from_str(json).context("parsing nft -j")?;
    let mut out = Vec::new();
    for item in doc["nftables"].as_array().into_iter().flatten() {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let Some(comment) = rule["comment"].as_str() else {
            continue;
        };
        let packets = rule["expr"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|e| e["counter"]["packets"].as_u64())
            .with_context(|| format!("rule {comment:?} without a counter"))?;
        out.push((comment.to_string(), packets));
    }
    Ok(out)
}

/// Runs an `nft -f -` script in `ns`.
pub fn nft_script(ns: &Netns, script: &str) -> Result<()> {
    crate::netns::pipe_into(ns.command("nft").args(["-f", "-"]), script)?;
    Ok(())
}

/// Sends a probe's traffic; call it inside the client namespace
/// ([`Netns::run`]). TCP: connection attempts that the director refuses
/// (one SYN each, no retransmission); UDP: datagrams.
pub fn send(probe: &Probe) -> Result<()> {
    use std::net::{SocketAddr, TcpStream, UdpSocket};
    use std::time::Duration;
    let addr = SocketAddr::new(probe.dst, probe.port);
    for _ in 0..probe.count {
        match probe.proto {
            ProbeProto::Tcp => {
                // Below the 1 s initial RTO, so a lost SYN is never resent.
                match TcpStream::connect_timeout(&addr, Duration::from_millis(900)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    Err(e) => bail!("TCP connect to {addr}: {e}"),
                }
            }
            ProbeProto::Udp => {
                let bind = if probe.dst.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let sock = UdpSocket::bind(bind)?;
                sock.send_to(b"fwmark probe", addr)
                    .with_context(|| format!("UDP send to {addr}"))?;
            }
        }
    }
    Ok(())
}

/// `nft list ruleset` of a namespace, for failure messages.
pub fn dump(ns: &Netns) -> String {
    run_cmd(ns.command("nft").args(["list", "ruleset"])).unwrap_or_else(|e| e.to_string())
}
