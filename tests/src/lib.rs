//! Test lab for fwmark, shared by the integration tests and `cargo xtask demo`:
//! - [`packets`]: frames built from etherparse headers;
//! - [`harness`]: the classifier run through `BPF_PROG_TEST_RUN`;
//! - [`framegen`]: the differential test's seeded frame generator;
//! - [`netns`], [`nft`], [`daemon`]: network namespaces joined by veth, nftables
//!   mark counters on the director, and `fwmark run` as a child process;
//! - [`vm`]: the IPVS scenario `cargo xtask vm-test` runs inside a guest
//!   booted from Debian's kernel (binary `fwmark-vm-guest`).
//!
//! The benchmark (`bench/`, crate `fwmark-bench`) and the soak (`soak/`,
//! crate `fwmark-soak`) are crates of their own built on this lab, so its
//! tests never build their dependencies (plotters).
//!
//! Everything a lab creates carries a unique name and is removed on drop, also
//! when a test fails.

pub mod daemon;
pub mod example;
pub mod failpoint;
pub mod faults;
pub mod foreign;
pub mod framegen;
pub mod harness;
pub mod kernel;
pub mod netns;
pub mod nft;
pub mod ops;
pub mod packets;
pub mod prev;
pub mod recorder;
pub mod tun;
pub mod vm;
