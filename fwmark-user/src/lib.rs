//! fwmark: sets `skb->mark` for LVS/IPVS services from a TC ingress eBPF
//! classifier. The binary (`main.rs`) is a thin CLI over these modules.

pub mod attach;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod preflight;
pub mod ruleset;
pub mod run;
pub mod status;
