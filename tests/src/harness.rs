//! The classifier run through `BPF_PROG_TEST_RUN`: load it, publish a config,
//! feed it frames and read back the mark from the `__sk_buff` context.

use anyhow::Result;
use aya::programs::{TestRun as _, TestRunOptions};
use fwmark::datapath::{Datapath, rule_capacity};
use fwmark_common::{GlobalCounters, Link, RuleCounters};
use fwmark_core::{config::Config, ruleset::Ruleset};

/// `sizeof(struct __sk_buff)` on current kernels.
const SKB_CTX_LEN: usize = 192;
/// `offsetof(struct __sk_buff, mark)`.
const SKB_MARK_OFFSET: usize = 8;

/// `TC_ACT_UNSPEC` / `TCX_NEXT`: "continue".
pub const TC_ACT_UNSPEC: i32 = -1;

/// What the classifier did with one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The program's return code.
    pub ret: i32,
    /// `skb->mark` after the program.
    pub mark: u32,
}

/// A loaded classifier with a published config.
pub struct Harness {
    pub datapath: Datapath,
    pub config: Config,
    pub ruleset: Ruleset,
}

impl Harness {
    /// Loads the classifier and publishes the config given as TOML text.
    pub fn new(toml: &str) -> Result<Harness> {
        Harness::on(Link::Ethernet, toml)
    }

    /// Loads the classifier's entry for `link` and publishes the config.
    /// `BPF_PROG_TEST_RUN` always builds an Ethernet skb (the protocol from
    /// the frame's ethertype, the network header after 14 bytes), so the L3
    /// entry runs here with a 14-byte `mac_len`, as on an ipip device
    /// before Linux 5.14; `mac_len` 0 (tun, WireGuard) takes a real device.
    pub fn on(link: Link, toml: &str) -> Result<Harness> {
        let config = Config::parse(toml, "test config")?;
        let ruleset = Ruleset::compile(&config)?;
        let mut datapath =
            Datapath::load_for(link, rule_capacity(ruleset.rules.len()), None, None)?;
        datapath.publish_simple(&ruleset)?;
        Ok(Harness {
            datapath,
            config,
            ruleset,
        })
    }

    /// Runs the classifier once on `frame`, with `skb->mark` preset to `mark`.
    pub fn run(&self, frame: &[u8], mark: u32) -> Result<Verdict> {
        self.try_run(frame, mark)?.map_err(|errno| {
            anyhow::anyhow!(
                "BPF_PROG_TEST_RUN of a {}-byte frame: {}",
                frame.len(),
                std::io::Error::from_raw_os_error(errno)
            )
        })
    }

    /// Global counters so far.
    pub fn global(&self) -> Result<GlobalCounters> {
        Ok(self.datapath.maps.global_counters()?)
    }

    /// Per-rule counters so far.
    pub fn rules(&self) -> Result<Vec<RuleCounters>> {
        let slots: Vec<u32> = (0..self.ruleset.rules.len() as u32).collect();
        Ok(self.datapath.maps.rule_counters(&slots)?)
    }
}

/// `EINVAL`, what `BPF_PROG_TEST_RUN` answers for a frame it refuses.
pub const EINVAL: i32 = libc::EINVAL;

impl Harness {
    /// Like [`Harness::run`], but a frame `BPF_PROG_TEST_RUN` refuses comes
    /// back as `Ok(Err(errno))` instead of an error.
    pub fn try_run(&self, frame: &[u8], mark: u32) -> Result<std::result::Result<Verdict, i32>> {
        let mut ctx_in = [0u8; SKB_CTX_LEN];
        ctx_in[SKB_MARK_OFFSET..SKB_MARK_OFFSET + 4].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let result = self.datapath.program()?.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            ..TestRunOptions::default()
        });
        match result {
            Ok(r) => Ok(Ok(Verdict {
                ret: r.return_value as i32,
                mark: u32::from_ne_bytes(
                    ctx_out[SKB_MARK_OFFSET..SKB_MARK_OFFSET + 4]
                        .try_into()
                        .expect("4 bytes"),
                ),
            })),
            Err(aya::programs::ProgramError::SyscallError(e)) => match e.io_error.raw_os_error() {
                Some(errno) => Ok(Err(errno)),
                None => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        }
    }
}
