//! Command-line interface (clap derive); `main.rs` dispatches on it.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Default config file of `fwmark run`.
pub const DEFAULT_CONFIG: &str = "/etc/fwmark/fwmark.toml";

/// Sets firewall marks for LVS/IPVS services from a TC ingress eBPF
/// classifier, configured by a TOML file.
#[derive(Debug, Parser)]
#[command(name = "fwmark", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the config, attach the classifier to IFACE's ingress and mark
    /// packets until SIGINT/SIGTERM (then detach and print the counters).
    Run(RunArgs),
    /// Validate a config without touching the kernel.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Interface that receives the VIP traffic (the director's public side).
    #[arg(long, short = 'i', value_name = "IFACE")]
    pub iface: String,
    /// Config file.
    #[arg(long, short = 'c', value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// How to attach: tcx where the kernel has it (>= 6.6), else netlink.
    #[arg(long, value_enum, default_value_t = AttachArg::Auto)]
    pub attach: AttachArg,
}

/// `--attach` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttachArg {
    /// tcx on Linux >= 6.6, netlink clsact otherwise.
    Auto,
    /// A tcx link (Linux >= 6.6).
    Tcx,
    /// A cls_bpf filter on the clsact qdisc, for kernels or tooling without tcx.
    Netlink,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Config file.
    #[arg(long, short = 'c', value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}
