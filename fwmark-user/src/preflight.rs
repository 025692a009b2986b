//! Checks before touching the kernel, each failing with one line that says
//! what to do.

use std::{io, os::fd::AsRawFd as _, path::Path};

use aya::util::KernelVersion;
use fwmark_common::Link;
use nix::{
    mount::{MsFlags, mount},
    net::if_::{if_indextoname, if_nametoindex},
    sys::{
        socket::{AddressFamily, SockFlag, SockType, socket},
        statfs::{BPF_FS_MAGIC, statfs},
    },
};

/// Where bpffs is expected.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Oldest kernel fwmark supports: BTF-defined map-in-map maps and the
/// netlink attach path (tcx needs 6.6 and is used when present).
pub const MIN_KERNEL: KernelVersion = KernelVersion::new(5, 10, 0);

/// Capability bits (`linux/capability.h`).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "fwmark needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN) to load and attach eBPF \
         programs; run it with sudo"
    )]
    NotPrivileged,
    #[error("cannot tell the kernel version: {0}")]
    KernelUnknown(String),
    #[error("kernel {found} is too old: fwmark needs Linux >= {MIN_KERNEL} with BTF")]
    KernelTooOld { found: KernelVersion },
    #[error(
        "interface {iface:?} does not exist in {netns} (see `ip link` there); pass the interface \
         that carries the VIPs, and run fwmark in its network namespace (`ip netns exec NAME \
         fwmark ...`)"
    )]
    NoInterface { iface: String, netns: String },
    #[error(
        "interface {iface:?} has link type {link_type} ({name}), which fwmark cannot parse: it \
         reads Ethernet frames (Ethernet, bond, VLAN, veth, gretap, vxlan) and IP packets of L3 \
         devices (tun, WireGuard, ipip, ip6tnl, sit, GRE, ip6gre); attach it to the device that \
         carries the VIPs' IP packets",
        name = link_type_name(*link_type)
    )]
    UnsupportedLink { iface: String, link_type: u32 },
    #[error(
        "bpffs is not mounted at {BPFFS} and mounting it failed ({0}; mounting needs \
         CAP_SYS_ADMIN); run `mount -t bpf -o mode=0700 bpf {BPFFS}` as root (for good: \
         `bpf {BPFFS} bpf mode=0700 0 0` in /etc/fstab), then start fwmark again"
    )]
    Bpffs(io::Error),
}

/// Effective capabilities of this process, from /proc/self/status.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Root, or the capabilities that loading and attaching need: CAP_BPF to
/// load, CAP_PERFMON for the verifier to accept packet-pointer arithmetic
/// (CAP_SYS_ADMIN implies both), CAP_NET_ADMIN to attach.
pub fn check_privileges() -> Result<(), PreflightError> {
    let caps = effective_caps();
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    let load = has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON));
    if load && has(CAP_NET_ADMIN) {
        Ok(())
    } else {
        Err(PreflightError::NotPrivileged)
    }
}

/// The running kernel, checked against [`MIN_KERNEL`].
pub fn check_kernel() -> Result<KernelVersion, PreflightError> {
    let found =
        KernelVersion::current().map_err(|e| PreflightError::KernelUnknown(e.to_string()))?;
    if found < MIN_KERNEL {
        return Err(PreflightError::KernelTooOld { found });
    }
    Ok(found)
}

/// The interface's index, or a clear error.
pub fn interface_index(iface: &str) -> Result<u32, PreflightError> {
    if_nametoindex(iface).map_err(|_| PreflightError::NoInterface {
        iface: iface.into(),
        netns: crate::netns::Netns::current()
            .map_or_else(|_| "this network namespace".into(), |n| n.to_string()),
    })
}

/// Whether a network device with index `index` exists (under any name).
pub fn index_exists(index: u32) -> bool {
    // nix 0.32's `if_indextoname` returns `Ok` even when the C call fails:
    // it tests the NULL return against its pointer error sentinel, -1. Its
    // buffer then stays zeroed, an empty name, which no device has.
    if_indextoname(index).is_ok_and(|name| !name.is_empty())
}

/// `ARPHRD_ETHER` and `ARPHRD_LOOPBACK`: link types whose frames start with
/// an Ethernet header at TC ingress.
const ETHERNET_LINK_TYPES: [u32; 2] = [1, 772];

/// L3 link types (`linux/if_arp.h`): packets start at the IP header and the
/// skb's protocol names the family. `ARPHRD_TUNNEL` (ipip), `ARPHRD_TUNNEL6`
/// (ip6tnl), `ARPHRD_SIT`, `ARPHRD_IPGRE` (gre), `ARPHRD_IP6GRE` and
/// `ARPHRD_NONE` (tun with `IFF_TUN`, WireGuard).
const L3_LINK_TYPES: [u32; 6] = [768, 769, 776, 778, 823, 0xfffe];

/// A readable name of an `ARPHRD_*` link type, for messages.
pub fn link_type_name(link_type: u32) -> &'static str {
    match link_type {
        1 => "Ethernet",
        772 => "loopback",
        768 => "ipip",
        769 => "ip6tnl",
        776 => "sit",
        778 => "gre",
        823 => "ip6gre",
        0xfffe => "none: tun or WireGuard",
        512 => "PPP",
        32 => "InfiniBand",
        801 => "802.11",
        803 => "802.11 radiotap",
        _ => "see linux/if_arp.h",
    }
}

/// Which classifier entry a link type needs, if fwmark can parse it.
pub fn link_of_type(link_type: u32) -> Option<Link> {
    if ETHERNET_LINK_TYPES.contains(&link_type) {
        Some(Link::Ethernet)
    } else if L3_LINK_TYPES.contains(&link_type) {
        Some(Link::L3)
    } else {
        None
    }
}

/// The interface exists and carries Ethernet frames or IP packets; returns
/// its index.
pub fn check_interface(iface: &str) -> Result<u32, PreflightError> {
    let index = interface_index(iface)?;
    interface_link(iface)?;
    Ok(index)
}

/// Which classifier entry `iface` needs: [`Link::Ethernet`] or [`Link::L3`];
/// an error names a link type fwmark cannot parse. Without an answer from
/// the kernel (unusual) it is Ethernet rather than a guess.
pub fn interface_link(iface: &str) -> Result<Link, PreflightError> {
    let Some(link_type) = link_type(iface) else {
        return Ok(Link::Ethernet);
    };
    link_of_type(link_type).ok_or_else(|| PreflightError::UnsupportedLink {
        iface: iface.into(),
        link_type,
    })
}

/// The `ARPHRD_*` link type of `iface` in this network namespace
/// (`SIOCGIFHWADDR`; sysfs may show another namespace's devices).
fn link_type(iface: &str) -> Option<u32> {
    // nix has no typed wrapper for this ioctl; this declares one.
    nix::ioctl_readwrite_bad!(siocgifhwaddr, libc::SIOCGIFHWADDR, libc::ifreq);
    let name = iface.as_bytes();
    // SAFETY: all-zero is a valid `ifreq`.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return None;
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ok()?;
    // SAFETY: `sock` is an open socket and `req` a valid `ifreq` with a
    // NUL-terminated name (checked above), which the kernel fills in.
    unsafe { siocgifhwaddr(sock.as_raw_fd(), &mut req) }.ok()?;
    // SAFETY: SIOCGIFHWADDR succeeded, so it filled the `ifru_hwaddr` member.
    Some(u32::from(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family }))
}

/// True when `path` is a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|st| st.filesystem_type() == BPF_FS_MAGIC)
}

/// Which bpffs holds the pins ([`ensure_bpffs`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Bpffs {
    /// This mount namespace's, at [`BPFFS`].
    Present,
    /// The host's, reached through `/proc/PID/root` (this mount namespace
    /// has none, as under `ip netns exec`).
    Host(String),
    /// Mounted at [`BPFFS`] now; `lasting` when this mount namespace is the
    /// host's (else it ends with this command, and the pins with it).
    Mounted { lasting: bool },
}

impl Bpffs {
    /// Whether the pins outlive this process (`--keep`, a crash).
    pub fn lasting(&self) -> bool {
        !matches!(self, Bpffs::Mounted { lasting: false })
    }
}

/// Makes sure the pins have a bpffs: this mount namespace's at [`BPFFS`],
/// else the host's ([`crate::netns::roots`]), else one mounted at
/// [`BPFFS`] now.
pub fn ensure_bpffs() -> Result<Bpffs, PreflightError> {
    let path = Path::new(BPFFS);
    if is_bpffs(path) {
        return Ok(Bpffs::Present);
    }
    if let Some(via) = &crate::netns::roots().via {
        return Ok(Bpffs::Host(via.clone()));
    }
    std::fs::create_dir_all(path).map_err(PreflightError::Bpffs)?;
    // Root only, as systemd mounts it (the kernel's default is 1777).
    mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|errno| PreflightError::Bpffs(errno.into()))?;
    Ok(Bpffs::Mounted {
        lasting: crate::netns::mount_ns_lasting(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn interface_names_and_indexes_are_looked_up() {
        // Every network namespace has `lo`, with index 1.
        assert_eq!(super::interface_index("lo").unwrap(), 1);
        assert!(super::index_exists(1));
        assert!(super::interface_index("fwmark-none0").is_err());
        assert!(super::interface_index("lo\0").is_err());
        // Indexes count up from 1 per namespace and are never near u32::MAX.
        assert!(!super::index_exists(u32::MAX - 7));
        assert!(!super::index_exists(0));
    }

    #[test]
    fn link_types_pick_the_entry_or_are_refused() {
        use fwmark_common::Link;
        assert_eq!(super::link_of_type(1), Some(Link::Ethernet));
        assert_eq!(super::link_of_type(772), Some(Link::Ethernet));
        for l3 in [768, 769, 776, 778, 823, 0xfffe] {
            assert_eq!(super::link_of_type(l3), Some(Link::L3), "{l3}");
        }
        // PPP, InfiniBand, 802.11: neither Ethernet frames nor bare IP at ingress.
        for other in [512, 32, 801, 803] {
            assert_eq!(super::link_of_type(other), None, "{other}");
        }
        assert_eq!(super::interface_link("lo").unwrap(), Link::Ethernet);
        let e = super::PreflightError::UnsupportedLink {
            iface: "ib0".into(),
            link_type: 32,
        }
        .to_string();
        assert!(
            e.contains("link type 32 (InfiniBand)") && e.contains("tun"),
            "{e}"
        );
    }

    #[test]
    fn sysfs_is_not_bpffs() {
        assert!(!super::is_bpffs(std::path::Path::new("/sys")));
        assert!(!super::is_bpffs(std::path::Path::new(
            "/nonexistent/fwmark"
        )));
    }
}
