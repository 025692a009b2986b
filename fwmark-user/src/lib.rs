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
pub mod ipvs;
pub mod live;
pub mod markers;
pub mod metrics;
pub mod mode;
pub mod netlink;
pub mod netns;
pub mod perms;
pub mod preflight;
pub mod rtnl;
pub mod state;
pub mod status;
pub mod upgrade;

/// An error with its causes, `outer: inner: innermost`, as the binary
/// prints them (`{:#}` of anyhow), for messages the library logs or sends
/// itself (a typed error's `Display` is its outermost message only).
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn chain_shows_every_cause_like_the_binary() {
        let io = std::io::Error::other("disk on fire");
        let e = anyhow::Error::new(io).context("writing /run/x");
        let typed: &(dyn std::error::Error + 'static) = e.as_ref();
        assert_eq!(super::chain(typed), format!("{e:#}"));
        assert_eq!(super::chain(typed), "writing /run/x: disk on fire");
    }
}
