//! Ethernet frames for the classifier tests: fwmark-core's frame builder,
//! the one `fwmark explain` uses too.

pub use fwmark_core::frame::*;
