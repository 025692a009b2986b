//! Attaching the classifier to an interface's ingress, first in line, and
//! taking over or removing an attachment a previous fwmark left.
//!
//! Linux >= 6.6 has tcx (`bpf_link` based, multi-program): fwmark attaches
//! with `LinkOrder::first()` and pins the link under the interface's pin
//! directory, so marking survives the process. A new fwmark replaces the
//! program on the live link atomically (`bpf_link_update`).
//!
//! Older kernels get the netlink path: a `clsact` qdisc (added when missing,
//! never removed: other filters may use it) and a direct-action `cls_bpf`
//! filter at priority 1, or the lowest priority no other filter uses
//! (see `ingress`); such a filter lives until it is deleted.

use std::path::Path;

use aya::programs::{
    LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    links::{FdLink, LinkError, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError},
};

use crate::{ingress, mode::AttachMode, preflight, rtnl};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("adding the clsact qdisc to {iface} failed")]
    Qdisc {
        iface: String,
        #[source]
        source: TcError,
    },
    #[error("attaching to {iface} ingress ({mode}) failed")]
    Attach {
        iface: String,
        mode: AttachMode,
        #[source]
        source: ProgramError,
    },
    #[error("the pinned link {path} cannot be used")]
    PinnedLink {
        path: String,
        #[source]
        source: LinkError,
    },
    #[error("pinning the link at {path} failed")]
    Pin {
        path: String,
        #[source]
        source: aya::pin::PinError,
    },
    #[error(transparent)]
    Interface(#[from] preflight::PreflightError),
    #[error(
        "removing the previous netlink filter (pref {priority} handle {handle:#x}) from {iface} \
         failed, so the new one was taken off again and the previous one goes on marking; \
         `fwmark detach --iface {iface}` removes it, then `fwmark run` attaches afresh"
    )]
    OldFilter {
        iface: String,
        priority: u16,
        handle: u32,
        #[source]
        source: rtnl::NetlinkError,
    },
}

/// An attachment this process holds.
pub enum Attached {
    /// A pinned tcx link.
    Tcx(PinnedLink),
    /// A netlink filter (detached when dropped, unless kept).
    Netlink {
        link: SchedClassifierLink,
        priority: u16,
        handle: u32,
    },
}

impl Attached {
    pub fn mode(&self) -> AttachMode {
        match self {
            Attached::Tcx(_) => AttachMode::Tcx,
            Attached::Netlink { .. } => AttachMode::Netlink,
        }
    }

    /// Netlink priority and handle, to record in the state.
    pub fn netlink(&self) -> Option<(u16, u32)> {
        match self {
            Attached::Tcx(_) => None,
            Attached::Netlink {
                priority, handle, ..
            } => Some((*priority, *handle)),
        }
    }

    /// Leaves the attachment in place after this process exits.
    pub fn keep(self) {
        match self {
            // The pin keeps the link attached when the fd closes.
            Attached::Tcx(pinned) => drop(pinned),
            // Dropping the link would delete the filter.
            Attached::Netlink { link, .. } => std::mem::forget(link),
        }
    }

    /// Lets go of an attachment whose interface went away (the kernel
    /// removed the filter, or left the tcx link without an interface):
    /// the link's pin goes, nothing is sent to the kernel about the old
    /// interface index.
    pub fn abandon(self, link_pin: &Path) {
        match self {
            Attached::Tcx(pinned) => {
                if pinned.unpin().is_err() {
                    let _ = std::fs::remove_file(link_pin);
                }
            }
            // Its filter went with the interface; deleting it by the old
            // index could hit another interface that reuses the index.
            Attached::Netlink { link, .. } => std::mem::forget(link),
        }
    }

    /// Takes the attachment off its device at once (by the device's index,
    /// so also when the interface was renamed and its name now means
    /// another device or none), without waiting for a tcx release.
    pub fn remove_now(self, link_pin: &Path) -> Result<(), String> {
        match self {
            // Without its pin, the link goes when its last fd closes.
            Attached::Tcx(pinned) => {
                if pinned.unpin().is_err() {
                    let _ = std::fs::remove_file(link_pin);
                }
                Ok(())
            }
            // The link deletes the filter by the device's index, which is
            // still that device's.
            Attached::Netlink { link, .. } => {
                aya::programs::links::Link::detach(link).map_err(|e| e.to_string())
            }
        }
    }

    /// Removes the attachment (and the link's pin); returns once the kernel
    /// no longer runs `program_id` on `iface`.
    pub fn detach(self, iface: &str, program_id: u32) -> Result<(), String> {
        match self {
            Attached::Tcx(pinned) => {
                // Without its pin, the link goes when its last fd closes.
                let link = pinned.unpin().map_err(|e| e.to_string())?;
                drop(link);
                wait_tcx_gone(iface, program_id)
            }
            Attached::Netlink { link, .. } => {
                aya::programs::links::Link::detach(link).map_err(|e| e.to_string())
            }
        }
    }
}

fn attach_error(iface: &str, mode: AttachMode) -> impl FnOnce(ProgramError) -> AttachError + '_ {
    move |source| AttachError::Attach {
        iface: iface.to_string(),
        mode,
        source,
    }
}

fn add_clsact(iface: &str) -> Result<(), AttachError> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => Ok(()),
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(source) => Err(AttachError::Qdisc {
            iface: iface.to_string(),
            source,
        }),
    }
}

fn netlink_attached(link: SchedClassifierLink) -> Result<Attached, ProgramError> {
    let priority = link.priority()?;
    let handle = u32::from(link.handle()?);
    Ok(Attached::Netlink {
        link,
        priority,
        handle,
    })
}

/// Attaches `program` (loaded) to `iface`'s ingress, first in line; a tcx
/// link is pinned at `link_pin`. A netlink filter takes the lowest priority
/// no other filter uses ([`ingress::netlink_priority`]).
pub fn attach(
    program: &mut SchedClassifier,
    iface: &str,
    mode: AttachMode,
    link_pin: &Path,
) -> Result<Attached, AttachError> {
    match mode {
        AttachMode::Tcx => {
            let id = program
                .attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(attach_error(iface, mode))?;
            let link = program.take_link(id).map_err(attach_error(iface, mode))?;
            let fd_link = FdLink::try_from(link).map_err(|source| AttachError::PinnedLink {
                path: link_pin.display().to_string(),
                source,
            })?;
            let pinned = fd_link.pin(link_pin).map_err(|source| AttachError::Pin {
                path: link_pin.display().to_string(),
                source,
            })?;
            Ok(Attached::Tcx(pinned))
        }
        AttachMode::Netlink => {
            add_clsact(iface)?;
            attach_netlink(program, iface, ingress::netlink_priority(iface))
        }
    }
}

/// Adds `program` as a direct-action filter at `priority` (the `clsact`
/// qdisc exists).
fn attach_netlink(
    program: &mut SchedClassifier,
    iface: &str,
    priority: u16,
) -> Result<Attached, AttachError> {
    let mode = AttachMode::Netlink;
    let id = program
        .attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(NlOptions {
                priority,
                ..Default::default()
            }),
        )
        .map_err(attach_error(iface, mode))?;
    let link = program.take_link(id).map_err(attach_error(iface, mode))?;
    netlink_attached(link).map_err(attach_error(iface, mode))
}

/// Whether `error` says that a tcx link lost its interface (`ENOLINK`:
/// the interface was deleted, or deleted and created again).
fn is_defunct_link(error: &ProgramError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(libc::ENOLINK)
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Takes over the attachment a previous fwmark left, running `program`
/// from now on without a gap:
/// - tcx: the program on the pinned link is replaced atomically; a link
///   whose interface went away since (or that is missing) is replaced by a
///   fresh attachment;
/// - netlink: a filter with the new program is added at the same priority
///   before the old one is deleted (for an instant both mark alike, from the
///   same maps).
pub fn adopt(
    program: &mut SchedClassifier,
    iface: &str,
    mode: AttachMode,
    link_pin: &Path,
    old_netlink: Option<(u16, u32)>,
) -> Result<Attached, AttachError> {
    match mode {
        AttachMode::Tcx => {
            let pin_error = |source| AttachError::PinnedLink {
                path: link_pin.display().to_string(),
                source,
            };
            let pinned = match PinnedLink::from_pin(link_pin) {
                Ok(pinned) => pinned,
                Err(_) if !link_pin.exists() => {
                    log::warn!(
                        "no pinned link in {}: the previous fwmark lost its attachment to {iface} \
                         (the interface went away); attaching afresh",
                        link_pin.parent().unwrap_or(link_pin).display()
                    );
                    return attach(program, iface, mode, link_pin);
                }
                Err(e) => return Err(pin_error(e)),
            };
            let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(pin_error)?;
            let id = match program.attach_to_link(link) {
                Ok(id) => id,
                Err(e) if is_defunct_link(&e) => {
                    log::warn!(
                        "the pinned link {} lost {iface} (the interface was deleted since); \
                         attaching afresh",
                        link_pin.display()
                    );
                    if let Ok(pinned) = PinnedLink::from_pin(link_pin) {
                        let _ = pinned.unpin();
                    }
                    return attach(program, iface, mode, link_pin);
                }
                Err(e) => return Err(attach_error(iface, mode)(e)),
            };
            let link = program.take_link(id).map_err(attach_error(iface, mode))?;
            let fd_link = FdLink::try_from(link).map_err(pin_error)?;
            // Still pinned: re-open it as a PinnedLink for detach/keep.
            drop(fd_link);
            let pinned = PinnedLink::from_pin(link_pin).map_err(pin_error)?;
            Ok(Attached::Tcx(pinned))
        }
        AttachMode::Netlink => {
            add_clsact(iface)?;
            // The old filter's priority holds fwmark's filters only: the
            // new one joins it there.
            let priority = match old_netlink {
                Some((priority, _)) => priority,
                None => ingress::netlink_priority(iface),
            };
            let attached = attach_netlink(program, iface, priority)?;
            // The new filter got the old one's handle only when the old one
            // is gone (the interface was replaced): then nothing to delete.
            if let Some(old) = old_netlink
                && Some(old) != attached.netlink()
            {
                delete_netlink_filter(iface, old.0, old.1)?;
            }
            Ok(attached)
        }
    }
}

/// Deletes one `cls_bpf` filter by priority and handle (over rtnetlink:
/// aya can delete only the filters it attached itself). A filter already
/// gone (deleted by hand, or by a run that failed) is fine.
fn delete_netlink_filter(iface: &str, priority: u16, handle: u32) -> Result<(), AttachError> {
    let ifindex = preflight::interface_index(iface)?;
    rtnl::delete_ingress_filter(ifindex, priority, handle, "bpf").map_err(|source| {
        AttachError::OldFilter {
            iface: iface.to_string(),
            priority,
            handle,
            source,
        }
    })?;
    Ok(())
}

/// The kernel releases a tcx link from a workqueue once its last reference
/// is gone; wait (up to 5 s) until `program_id` is off `iface`'s ingress.
fn wait_tcx_gone(iface: &str, program_id: u32) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let attached = match SchedClassifier::query_tcx(iface, TcAttachType::Ingress) {
            Ok((_, programs)) => programs.iter().any(|p| p.id() == program_id),
            // The interface is gone, and the link with it.
            Err(_) => false,
        };
        if !attached {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "program {program_id} is still attached to {iface} 5 s after its link was released"
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Removes an attachment left by a previous fwmark (`fwmark detach`).
pub fn remove_left(
    iface: &str,
    mode: AttachMode,
    link_pin: &Path,
    program_id: u32,
) -> Result<(), String> {
    match mode {
        AttachMode::Tcx => match PinnedLink::from_pin(link_pin) {
            Ok(pinned) => Attached::Tcx(pinned).detach(iface, program_id),
            // Gone with its interface, or never pinned: nothing attached.
            Err(_) => Ok(()),
        },
        AttachMode::Netlink => {
            match tc::qdisc_detach_program(
                iface,
                TcAttachType::Ingress,
                fwmark_common::PROGRAM_NAME,
            ) {
                Ok(()) => Ok(()),
                Err(TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}
