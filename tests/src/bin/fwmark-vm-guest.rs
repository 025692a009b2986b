//! Runs inside the guest that `cargo xtask vm-test` boots (see
//! `fwmark_testlab::vm`): `fwmark-vm-guest FWMARK CONFIG MODE`, MODE being
//! how fwmark must attach on this kernel (`tcx` or `netlink`). Prints
//! `FWMARK-VM: PASS` or `FWMARK-VM: FAIL: why` as its last line, which the
//! xtask reads from the serial console.

use std::path::PathBuf;

use fwmark::mode::AttachMode;

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (fwmark, config, mode) = match args.as_slice() {
        [fwmark, config, mode] if mode == "tcx" => (fwmark, config, AttachMode::Tcx),
        [fwmark, config, mode] if mode == "netlink" => (fwmark, config, AttachMode::Netlink),
        _ => {
            eprintln!("usage: fwmark-vm-guest FWMARK CONFIG tcx|netlink");
            std::process::exit(2);
        }
    };
    match fwmark_testlab::vm::scenario(fwmark, config, mode) {
        Ok(()) => println!("FWMARK-VM: PASS"),
        Err(e) => {
            println!("FWMARK-VM: FAIL: {e:#}");
            std::process::exit(1);
        }
    }
}
