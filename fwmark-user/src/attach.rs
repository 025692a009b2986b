//! Attaching the classifier to an interface's ingress, first in line.
//!
//! Linux >= 6.6 has tcx (`bpf_link` based, multi-program): fwmark attaches
//! with `LinkOrder::first()`. Older kernels get the netlink path: a `clsact`
//! qdisc (added when missing, never removed: other filters may use it) and a
//! direct-action `cls_bpf` filter at priority 1.

use std::fmt;

use crate::cli::AttachArg;
use aya::{
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcError},
    },
    util::KernelVersion,
};

/// Netlink filter priority: lower runs first.
const NETLINK_PRIORITY: u16 = 1;

/// How the program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// A tcx link (Linux >= 6.6).
    Tcx,
    /// A netlink `cls_bpf` filter on the `clsact` qdisc.
    Netlink,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Netlink => "netlink clsact",
        })
    }
}

/// The first kernel with tcx.
pub const TCX_KERNEL: KernelVersion = KernelVersion::new(6, 6, 0);

impl AttachMode {
    /// The best mode this kernel supports.
    pub fn for_kernel(kernel: KernelVersion) -> AttachMode {
        if kernel >= TCX_KERNEL {
            AttachMode::Tcx
        } else {
            AttachMode::Netlink
        }
    }

    /// The mode `--attach` asks for on this kernel.
    pub fn choose(arg: AttachArg, kernel: KernelVersion) -> Result<AttachMode, AttachError> {
        match arg {
            AttachArg::Auto => Ok(AttachMode::for_kernel(kernel)),
            AttachArg::Netlink => Ok(AttachMode::Netlink),
            AttachArg::Tcx if kernel >= TCX_KERNEL => Ok(AttachMode::Tcx),
            AttachArg::Tcx => Err(AttachError::NoTcx { kernel }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("tcx needs Linux >= {TCX_KERNEL}, this is {kernel}; use --attach netlink (or auto)")]
    NoTcx { kernel: KernelVersion },
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
}

/// An attached classifier.
pub struct Attachment {
    pub iface: String,
    pub mode: AttachMode,
    pub link: SchedClassifierLinkId,
}

/// Attaches `program` (already loaded) to `iface`'s ingress, first in line.
pub fn attach(
    program: &mut SchedClassifier,
    iface: &str,
    mode: AttachMode,
) -> Result<Attachment, AttachError> {
    let options = match mode {
        AttachMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::first()),
        AttachMode::Netlink => {
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => {}
                Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(source) => {
                    return Err(AttachError::Qdisc {
                        iface: iface.to_string(),
                        source,
                    });
                }
            }
            TcAttachOptions::Netlink(NlOptions {
                priority: NETLINK_PRIORITY,
                ..Default::default()
            })
        }
    };
    let link = program
        .attach_with_options(iface, TcAttachType::Ingress, options)
        .map_err(|source| AttachError::Attach {
            iface: iface.to_string(),
            mode,
            source,
        })?;
    Ok(Attachment {
        iface: iface.to_string(),
        mode,
        link,
    })
}

/// Detaches what [`attach`] attached.
pub fn detach(program: &mut SchedClassifier, attachment: Attachment) -> Result<(), ProgramError> {
    program.detach(attachment.link)
}
