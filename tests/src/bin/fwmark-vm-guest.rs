//! Runs inside the guest that `cargo xtask vm-test` boots (see
//! `fwmark_testlab::vm`): `fwmark-vm-guest FWMARK CONFIG`. Prints
//! `FWMARK-VM: PASS` or `FWMARK-VM: FAIL: why` as its last line, which the
//! xtask reads from the serial console.

use std::path::PathBuf;

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [fwmark, config] = args.as_slice() else {
        eprintln!("usage: fwmark-vm-guest FWMARK CONFIG");
        std::process::exit(2);
    };
    match fwmark_testlab::vm::scenario(fwmark, config) {
        Ok(()) => println!("FWMARK-VM: PASS"),
        Err(e) => {
            println!("FWMARK-VM: FAIL: {e:#}");
            std::process::exit(1);
        }
    }
}
