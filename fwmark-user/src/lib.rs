//! fwmark's kernel and OS layer: the classifier's maps and the generation
//! switch, attaching and detaching, pins and state, preflight checks, the
//! daemon. The pure logic (config, ruleset, model, import, export,
//! explain) is the `fwmark-core` crate; the subcommands live in the binary
//! (`src/cmd/`).

pub mod attach;
pub mod daemon;
pub mod datapath;
pub mod durable;
pub mod failpoint;
pub mod ingress;
pub mod live;
pub mod markers;
pub mod metrics;
pub mod mode;
pub mod perms;
pub mod preflight;
pub mod rtnl;
pub mod state;
pub mod status;
