//! iptables-save / iptables command text -> `fwmark import` -> config,
//! checked against iptables' own order of evaluation (see
//! `fwmark_fuzz::import`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fwmark_fuzz::import(data));
