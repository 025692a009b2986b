//! Frames sent raw (AF_PACKET) from the client end of a lab, and the mark
//! each one reached the director's prerouting with, recorded by nftables
//! after the mangle table (priority -140) in sets keyed by destination,
//! protocol, destination port and mark.

use std::{collections::BTreeMap, io, net::IpAddr};

use anyhow::{Context as _, Result, bail};

use crate::{
    netns::{Lab, Netns, run_cmd},
    nft::nft_script,
    packets::{Frame, L4},
};
use fwmark_core::text;

const TABLE: &str = "fwmarkrec";

/// (destination, IP protocol, destination port).
pub type Point = (IpAddr, u8, u16);

/// The recording table in the director namespace.
pub struct Recorder<'a> {
    ns: &'a Netns,
}

impl<'a> Recorder<'a> {
    pub fn install(ns: &'a Netns) -> Result<Recorder<'a>> {
        let script = format!(
            "table inet {TABLE} {{\n\
               set seen4 {{ type ipv4_addr . inet_proto . inet_service . mark; flags dynamic; size 262144; }}\n\
               set seen6 {{ type ipv6_addr . inet_proto . inet_service . mark; flags dynamic; size 262144; }}\n\
               chain pre {{\n\
                 type filter hook prerouting priority -140; policy accept;\n\
                 meta l4proto {{ tcp, udp, sctp }} meta nfproto ipv4 add @seen4 {{ ip daddr . meta l4proto . th dport . meta mark }}\n\
                 meta l4proto {{ tcp, udp, sctp }} meta nfproto ipv6 add @seen6 {{ ip6 daddr . meta l4proto . th dport . meta mark }}\n\
               }}\n\
             }}\n"
        );
        nft_script(ns, &script)?;
        Ok(Recorder { ns })
    }

    /// Forgets what was recorded.
    pub fn clear(&self) -> Result<()> {
        for set in ["seen4", "seen6"] {
            run_cmd(
                self.ns
                    .command("nft")
                    .args(["flush", "set", "inet", TABLE, set]),
            )?;
        }
        Ok(())
    }

    /// What arrived: point -> marks seen with it.
    pub fn read(&self) -> Result<BTreeMap<Point, Vec<u32>>> {
        let mut out: BTreeMap<Point, Vec<u32>> = BTreeMap::new();
        for set in ["seen4", "seen6"] {
            let json = run_cmd(
                self.ns
                    .command("nft")
                    .args(["-j", "list", "set", "inet", TABLE, set]),
            )?;
            let doc: serde_json::Value = serde_json::from_str(&json).context("nft -j output")?;
            let elements = doc["nftables"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.get("set"))
                .flat_map(|s| s["elem"].as_array().cloned().unwrap_or_default());
            for e in elements {
                // Either {"concat": [...]} or {"elem": {"val": {"concat": [...]}}}.
                let concat = e
                    .get("concat")
                    .or_else(|| e.pointer("/elem/val/concat"))
                    .and_then(|c| c.as_array())
                    .with_context(|| format!("unexpected set element {e}"))?;
                let [addr, proto, port, mark] = concat.as_slice() else {
                    bail!("unexpected set element {e}");
                };
                let addr: IpAddr = addr.as_str().context("address")?.parse()?;
                let proto = match proto {
                    serde_json::Value::String(s) => {
                        text::parse_proto(s, true).with_context(|| format!("protocol {s:?}"))?
                    }
                    v => v.as_u64().context("protocol")? as u8,
                };
                let port = match port {
                    serde_json::Value::String(s) => s.parse().context("port")?,
                    v => v.as_u64().context("port")? as u16,
                };
                let mark = match mark {
                    serde_json::Value::String(s) => {
                        text::parse_u32(s).with_context(|| format!("mark {s:?}"))?
                    }
                    v => v.as_u64().context("mark")? as u32,
                };
                out.entry((addr, proto, port)).or_default().push(mark);
            }
        }
        Ok(out)
    }
}

/// The MAC address of `dev` in `ns`.
pub fn mac_of(ns: &Netns, dev: &str) -> Result<[u8; 6]> {
    let json = ns.ip(&["-j", "link", "show", "dev", dev])?;
    let doc: serde_json::Value = serde_json::from_str(&json)?;
    let text = doc[0]["address"].as_str().context("no address")?;
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC {text}"))
}

/// The frame for a point: a TCP SYN, a UDP datagram or an SCTP packet.
pub fn frame_for(point: &Point, dst_mac: [u8; 6]) -> Vec<u8> {
    let (dst, proto, port) = *point;
    let mut frame = Frame::to(dst, L4::new(proto, Some(port))).build();
    frame[..6].copy_from_slice(&dst_mac);
    frame
}

/// Sends `frames` out of `dev` in `ns` with an AF_PACKET socket.
pub fn inject(ns: &Netns, dev: &str, frames: &[Vec<u8>]) -> Result<()> {
    ns.run(|| RawSocket::open(dev)?.send(frames))??;
    Ok(())
}

/// An AF_PACKET socket bound to one interface (of the calling thread's
/// network namespace).
pub struct RawSocket {
    fd: std::os::fd::OwnedFd,
    index: i32,
}

impl RawSocket {
    pub fn open(dev: &str) -> io::Result<RawSocket> {
        use std::os::fd::FromRawFd as _;
        let name = std::ffi::CString::new(dev)?;
        // SAFETY: `name` is a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain socket creation.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawSocket {
            // SAFETY: `fd` was just returned by socket() and is owned here.
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
            index: index as i32,
        })
    }

    /// Sends each frame as it is (its first 6 bytes are the destination),
    /// up to 64 per `sendmmsg` call.
    pub fn send(&self, frames: &[Vec<u8>]) -> io::Result<()> {
        use std::os::fd::AsRawFd as _;
        for batch in frames.chunks(64) {
            // SAFETY: all-zero sockaddr_ll/iovec/mmsghdr values are valid;
            // every pointer set below points into `addrs`, `iovs` or
            // `batch`, which outlive the sendmmsg call.
            let mut addrs: Vec<libc::sockaddr_ll> =
                vec![unsafe { std::mem::zeroed() }; batch.len()];
            let mut iovs: Vec<libc::iovec> = Vec::with_capacity(batch.len());
            for (addr, frame) in addrs.iter_mut().zip(batch) {
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_ifindex = self.index;
                addr.sll_halen = 6;
                addr.sll_addr[..6].copy_from_slice(&frame[..6]);
                iovs.push(libc::iovec {
                    iov_base: frame.as_ptr() as *mut libc::c_void,
                    iov_len: frame.len(),
                });
            }
            let mut msgs: Vec<libc::mmsghdr> = (0..batch.len())
                .map(|i| {
                    // SAFETY: as above.
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_ll).cast();
                    m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                    m.msg_hdr.msg_iov = &mut iovs[i];
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            let mut done = 0;
            while done < msgs.len() {
                // SAFETY: `msgs[done..]` are valid mmsghdrs (see above).
                let n = unsafe {
                    libc::sendmmsg(
                        self.fd.as_raw_fd(),
                        msgs[done..].as_mut_ptr(),
                        (msgs.len() - done) as u32,
                        0,
                    )
                };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                done += n as usize;
            }
        }
        Ok(())
    }
}

/// Sends one frame per point from the client and returns what the director
/// recorded (cleared first). Frames are paced to stay within the veth
/// queue; points that still went missing (a full backlog drops frames) are
/// sent again, up to three times.
pub fn send_and_record(
    lab: &Lab,
    recorder: &Recorder<'_>,
    points: &[Point],
) -> Result<BTreeMap<Point, Vec<u32>>> {
    recorder.clear()?;
    let mac = mac_of(&lab.director, &lab.director_if)?;
    let mut missing: Vec<Point> = points.to_vec();
    let mut seen = BTreeMap::new();
    for _ in 0..4 {
        let frames: Vec<Vec<u8>> = missing.iter().map(|p| frame_for(p, mac)).collect();
        for chunk in frames.chunks(256) {
            inject(&lab.client, &lab.client_if, chunk)?;
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Let the director's softirq drain the veth queue.
        std::thread::sleep(std::time::Duration::from_millis(100));
        seen = recorder.read()?;
        missing.retain(|p| !seen.contains_key(p));
        if missing.is_empty() {
            break;
        }
    }
    Ok(seen)
}
