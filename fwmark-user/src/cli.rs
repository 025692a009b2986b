//! Command-line interface (clap derive); `main.rs` dispatches on it. The
//! shell completions and the man page are generated from these definitions.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Default config file.
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
    /// Attach the classifier to IFACE's ingress (or take over the attachment
    /// a previous fwmark left) and keep it marking by the config: reload on
    /// SIGHUP and when the file changes; on SIGINT/SIGTERM detach (unless
    /// --keep) and print the counters.
    Run(RunArgs),
    /// Switch the live config of IFACE to FILE atomically, printing what
    /// changes.
    Apply(ApplyArgs),
    /// Show the attachment, the live config and the counters of IFACE (or
    /// of every interface fwmark is attached to in this network namespace).
    Status(StatusArgs),
    /// Remove fwmark's attachment, pins and state from IFACE (or, with
    /// --all, from every interface fwmark has pins or state for in this
    /// network namespace).
    Detach(DetachArgs),
    /// Validate a config without touching the kernel.
    Check(CheckArgs),
    /// Turn `iptables-save`/`ip6tables-save` output (or iptables commands)
    /// into an fwmark config that gives every packet the mark iptables gave
    /// it; the config goes to stdout, the report to stderr.
    Import(ImportArgs),
    /// Print rules for iptables-restore or nft that do what a config does
    /// (the rollback path).
    Export(ExportArgs),
    /// Explain what the classifier does with one packet under a config:
    /// how it parses, the lookup key, the matching entry and its service,
    /// the mark; or why nothing matches. Uses the userspace model of the
    /// classifier: no kernel, no root.
    Explain(ExplainArgs),
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page, fwmark(8) (roff).
    Man,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Interface that receives the VIP traffic (the director's public side).
    /// Given again (`--iface A --iface B`), every one is attached to one set
    /// of maps: one config, one generation, switched together; the first
    /// one's pins and state are the group's.
    #[arg(long, short = 'i', value_name = "IFACE", required = true)]
    pub iface: Vec<String>,
    /// Config file.
    #[arg(long, short = 'c', value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// How to attach: tcx where the kernel has it (>= 6.6), else netlink.
    #[arg(long, value_enum, default_value_t = AttachArg::Auto)]
    pub attach: AttachArg,
    /// Leave marking in place when this process exits.
    #[arg(long)]
    pub keep: bool,
    /// Reload on SIGHUP only, not when the config file changes.
    #[arg(long)]
    pub no_watch: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (a bare port listens
    /// on 127.0.0.1).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Kernel-side log records (aya-log) up to this level; `off` compiles
    /// them out of the loaded program.
    #[arg(long, value_enum, default_value_t = KernelLog::Off)]
    pub log_level: KernelLog,
    /// Room for this many rules in the counter map (default: twice the
    /// config's, at least 16384). It is fixed while the interface stays
    /// attached: growing it takes `fwmark detach` and a new run.
    #[arg(long, value_name = "N")]
    pub max_rules: Option<usize>,
}

/// `--log-level` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KernelLog {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl KernelLog {
    /// The aya-log level, `None` for off.
    pub fn level(self) -> Option<aya_log::Level> {
        match self {
            KernelLog::Off => None,
            KernelLog::Error => Some(aya_log::Level::Error),
            KernelLog::Warn => Some(aya_log::Level::Warn),
            KernelLog::Info => Some(aya_log::Level::Info),
            KernelLog::Debug => Some(aya_log::Level::Debug),
            KernelLog::Trace => Some(aya_log::Level::Trace),
        }
    }
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

impl AttachArg {
    /// The mode asked for; None for auto (the best this kernel has).
    pub fn mode(self) -> Option<fwmark::mode::AttachMode> {
        match self {
            AttachArg::Auto => None,
            AttachArg::Tcx => Some(fwmark::mode::AttachMode::Tcx),
            AttachArg::Netlink => Some(fwmark::mode::AttachMode::Netlink),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// Interface whose live config changes.
    #[arg(long, short = 'i', value_name = "IFACE")]
    pub iface: String,
    /// The new config.
    #[arg(long, short = 'c', value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Print what would change and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The interface; without it, every interface fwmark is attached to
    /// in this network namespace (`--json`: an array of the documents).
    #[arg(long, short = 'i', value_name = "IFACE")]
    pub iface: Option<String>,
    /// Print a JSON document (stable schema, see README) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    #[arg(
        long,
        short = 'i',
        value_name = "IFACE",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub iface: Option<String>,
    /// Every interface fwmark has pins or state for in this network
    /// namespace (what removing the package runs, in the root one). One that a running `fwmark run` manages is reported
    /// and left alone; the exit status says whether all went.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The rules (`-` or nothing: standard input).
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The interface fwmark will run on: rules with `-i IFACE` are kept,
    /// rules for other interfaces are reported.
    #[arg(long, short = 'i', value_name = "IFACE")]
    pub iface: Option<String>,
    /// Import what can be imported and report the rest (exit 0).
    #[arg(long)]
    pub skip_unsupported: bool,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Config file.
    #[arg(long, short = 'c', value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Output format.
    #[arg(long, value_enum)]
    pub format: ExportFormat,
}

/// `--format` values of `export`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// iptables-restore input for the mangle table (IPv4 services).
    Iptables,
    /// ip6tables-restore input for the mangle table (IPv6 services).
    Ip6tables,
    /// An `nft -f` file.
    Nft,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Config file.
    #[arg(long, short = 'c', value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Also compare the marks with IPVS's fwmark services (and look for
    /// keepalived's nftables marking table); prints warnings. Reads the
    /// kernel: needs root or CAP_NET_ADMIN.
    #[arg(long)]
    pub ipvs: bool,
    /// With --ipvs: exit 1 when there is any warning.
    #[arg(long, requires = "ipvs")]
    pub strict: bool,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  fwmark explain --config fwmark.toml tcp 192.0.2.10:443\n  \
fwmark explain --config fwmark.toml udp '[2001:db8::10]:53' --mark 0x4000\n  \
fwmark explain --config fwmark.toml --later-fragment tcp 192.0.2.10\n  \
fwmark explain --config fwmark.toml --hex 020000000002020000000001080045...\n  \
fwmark explain --config fwmark.toml --l3 --hex 4500003c..."
)]
pub struct ExplainArgs {
    /// Config file.
    #[arg(long, short = 'c', value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The packet: PROTO DESTINATION (`tcp 192.0.2.10:443`, `udp
    /// [2001:db8::10]:53`, `icmp 192.0.2.10`, `proto 47 192.0.2.10`), or the
    /// hex bytes of an Ethernet frame.
    #[arg(value_name = "PACKET", num_args = 0..)]
    pub packet: Vec<String>,
    /// The packet as the hex bytes of an Ethernet frame.
    #[arg(long, value_name = "HEX")]
    pub hex: Option<String>,
    /// The mark the packet already has (decimal or 0x hex).
    #[arg(long, value_name = "MARK", default_value = "0", value_parser = parse_u32)]
    pub mark: u32,
    /// Describe a fragment at a non-zero offset (no transport header, no port).
    #[arg(long)]
    pub later_fragment: bool,
    /// Put the described packet behind an 802.1Q tag with this VLAN id
    /// (repeat for QinQ).
    #[arg(long, value_name = "ID")]
    pub vlan: Vec<u16>,
    /// The packet arrives on an L3 device (tun, WireGuard, ipip, GRE, ...):
    /// no Ethernet header, a --hex packet starts at the IP header.
    #[arg(long, conflicts_with = "vlan")]
    pub l3: bool,
}

/// A u32 in decimal or `0x` hex.
fn parse_u32(s: &str) -> Result<u32, String> {
    fwmark_core::text::parse_u32(s)
        .ok_or_else(|| format!("{s:?} is not a 32-bit mark (decimal or 0x hex)"))
}
