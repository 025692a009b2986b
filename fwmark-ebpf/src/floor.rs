//! The benchmark floor: a TC classifier that returns at once, so the
//! benchmark can subtract the hook's own cost from the classifier's.
//!
//! It is its own eBPF object (`fwmark-floor`), apart from the production
//! classifier's: `fwmark` never loads it, only the test lab and the
//! benchmark do (`fwmark::datapath::Floor`).
// Built for the BPF target by fwmark-user/build.rs, like the classifier;
// host builds of this crate exist only so clippy checks it with the rest.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};

/// Named [`fwmark_common::FLOOR_PROGRAM_NAME`].
#[classifier]
pub fn fwmark_floor(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
