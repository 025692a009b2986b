//! fwmark: sets `skb->mark` for LVS/IPVS services from a TC ingress eBPF
//! classifier. The binary (`main.rs`) is a thin CLI over these modules.

pub mod apply;
pub mod attach;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod detach;
pub mod diff;
pub mod explain;
pub mod export;
pub mod import;
pub mod ingress;
pub mod live;
pub mod markers;
pub mod metrics;
pub mod model;
pub mod perms;
pub mod preflight;
pub mod ruleset;
pub mod slots;
pub mod state;
pub mod status;
