//! fwmark's pure logic: what a config says and what the classifier does
//! with it. No kernel, no root, no async: everything here runs anywhere
//! (`fwmark check`, `explain`, `import`, `export`, the fuzz targets and most
//! unit tests use only this crate).
//!
//! - [`config`]: the TOML file, parsed and validated;
//! - [`ruleset`]: a config compiled into the classifier's map entries, and
//!   the one enumeration of a config's rules;
//! - [`precedence`]: which matching entry wins, defined once;
//! - [`text`]: the words fwmark reads and writes (addresses, rules, marks,
//!   protocols, numbers);
//! - [`frame`]: Ethernet frames built from a description (`explain` and the
//!   test lab);
//! - [`slots`]: which counter slot each rule keeps across changes;
//! - [`diff`]: what a change of config changes;
//! - [`model`]: the classifier written again in plain Rust (the reference
//!   the kernel program is tested against);
//! - [`explain`]: one packet through the model, in words;
//! - [`import`] / [`export`]: iptables rules in and out;
//! - [`ipvs_check`]: a config's marks against what IPVS (and keepalived's
//!   nftables table) does with them;
//! - [`loaded`]: a config file read, hashed and compiled.

pub mod config;
pub mod diff;
pub mod explain;
pub mod export;
pub mod frame;
pub mod import;
pub mod ipvs_check;
pub mod loaded;
pub mod model;
pub mod precedence;
pub mod ruleset;
pub mod slots;
pub mod text;

pub use loaded::{Loaded, LoadedError};
