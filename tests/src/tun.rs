//! A tun device (`IFF_TUN`, no packet information): an L3 device whose
//! packets start at the IP header. Bytes written to its file descriptor
//! arrive on the device's ingress as received IP packets, with the skb's
//! protocol from the IP version nibble.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::fd::AsRawFd as _,
};

use anyhow::{Context as _, Result, bail};

use crate::netns::Netns;

// TUNSETIFF is `_IOW('T', 202, int)` (linux/if_tun.h), though it takes a
// `struct ifreq`; nix has no typed wrapper for it.
nix::ioctl_write_ptr_bad!(
    tunsetiff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);

// TUNSETLINK is `_IOW('T', 205, int)`: the device's ARPHRD link type, set
// while it is down.
nix::ioctl_write_int_bad!(
    tunsetlink,
    nix::request_code_write!(b'T', 205, std::mem::size_of::<libc::c_int>())
);

/// `IFF_TUN` and `IFF_NO_PI` (linux/if_tun.h).
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// An open tun device; the device goes away when this is dropped.
pub struct Tun {
    file: File,
    pub name: String,
}

impl Tun {
    /// Creates tun device `name` in `ns` (the namespace of the thread that
    /// opens it) and brings it up.
    pub fn create(ns: &Netns, name: &str) -> Result<Tun> {
        Tun::open(ns, name, None)
    }

    /// [`Tun::create`] with its link type set to `link_type` (`ARPHRD_*`),
    /// to stand for a device of that type.
    pub fn create_as(ns: &Netns, name: &str, link_type: i32) -> Result<Tun> {
        Tun::open(ns, name, Some(link_type))
    }

    fn open(ns: &Netns, name: &str, link_type: Option<i32>) -> Result<Tun> {
        if name.len() >= libc::IFNAMSIZ {
            bail!(
                "tun name {name:?} is longer than {} bytes",
                libc::IFNAMSIZ - 1
            );
        }
        let file = ns.run(|| -> Result<File> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .context("opening /dev/net/tun")?;
            // SAFETY: all-zero is a valid `ifreq`.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
                *dst = *src as libc::c_char;
            }
            req.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
            // SAFETY: `file` is an open tun control file and `req` a valid
            // `ifreq` with a NUL-terminated name (checked above).
            unsafe { tunsetiff(file.as_raw_fd(), &req) }
                .with_context(|| format!("TUNSETIFF {name}"))?;
            if let Some(link_type) = link_type {
                // SAFETY: `file` is the tun device's file; the argument is a value.
                unsafe { tunsetlink(file.as_raw_fd(), link_type) }
                    .with_context(|| format!("TUNSETLINK {name} {link_type}"))?;
            }
            Ok(file)
        })??;
        ns.ip(&["link", "set", name, "up"])?;
        Ok(Tun {
            file,
            name: name.to_string(),
        })
    }

    /// Writes one IP packet to the device: it arrives on its ingress.
    pub fn send(&mut self, packet: &[u8]) -> Result<()> {
        let n = self
            .file
            .write(packet)
            .with_context(|| format!("writing a packet to {}", self.name))?;
        if n != packet.len() {
            bail!("{} took {n} of {} bytes", self.name, packet.len());
        }
        Ok(())
    }
}
