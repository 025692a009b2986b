//! How the classifier is attached: the vocabulary `attach`, the state
//! and `status` share (kept apart so that recording a mode does not need
//! the code that attaches).

use std::fmt;

use aya::util::KernelVersion;

/// The first kernel with tcx.
pub const TCX_KERNEL: KernelVersion = KernelVersion::new(6, 6, 0);

/// How the program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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

impl AttachMode {
    /// The best mode this kernel supports.
    pub fn for_kernel(kernel: KernelVersion) -> AttachMode {
        if kernel >= TCX_KERNEL {
            AttachMode::Tcx
        } else {
            AttachMode::Netlink
        }
    }

    /// The mode to use on this kernel: `requested`, or the best one for
    /// `None` (auto).
    pub fn choose(
        requested: Option<AttachMode>,
        kernel: KernelVersion,
    ) -> Result<AttachMode, NoTcx> {
        match requested {
            None => Ok(AttachMode::for_kernel(kernel)),
            Some(AttachMode::Netlink) => Ok(AttachMode::Netlink),
            Some(AttachMode::Tcx) if kernel >= TCX_KERNEL => Ok(AttachMode::Tcx),
            Some(AttachMode::Tcx) => Err(NoTcx { kernel }),
        }
    }
}

/// `--attach tcx` on a kernel without tcx.
#[derive(Debug, thiserror::Error)]
#[error("tcx needs Linux >= {TCX_KERNEL}, this is {kernel}; use --attach netlink (or auto)")]
pub struct NoTcx {
    pub kernel: KernelVersion,
}
