//! Config text -> parse + validate -> compile -> precedence, diff, export
//! and re-import (see `fwmark_fuzz::config`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fwmark_fuzz::config(data));
