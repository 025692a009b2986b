//! Bytes -> a frame through the reference classifier (`fwmark explain
//! --hex`), `icmp_errors` off and on (see `fwmark_fuzz::frame`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fwmark_fuzz::frame(data));
