//! Test lab for fwmark, shared by the integration tests and `cargo xtask demo`:
//! - [`packets`]: frames built from etherparse headers;
//! - [`harness`]: the classifier run through `BPF_PROG_TEST_RUN`;
//! - [`netns`], [`nft`], [`daemon`]: network namespaces joined by veth, nftables
//!   mark counters on the director, and `fwmark run` as a child process.
//!
//! Everything a lab creates carries a unique name and is removed on drop, also
//! when a test fails.

pub mod bench;
pub mod daemon;
pub mod example;
pub mod harness;
pub mod kernel;
pub mod netns;
pub mod nft;
pub mod packets;
pub mod recorder;
pub mod soak;
