//! Test-only fail-points: named steps of a generation switch where a test
//! stops fwmark to kill it exactly there (crash recovery without timing
//! races). Compiled in only with the `failpoints` feature, which the test
//! lab turns on; without it [`pause`] is empty and the binary carries
//! neither the steps' names nor the variable.
//!
//! `FWMARK_FAILPOINT=STEP` stops the process the first time it reaches
//! STEP, `STEP:N` the Nth time (a daemon's start is its first switch, its
//! first reload the second). There fwmark prints `fwmark: fail-point STEP
//! reached: stopped` on stderr and stops itself with SIGSTOP, every thread
//! at once; the test then sees the process stopped (`T` in
//! /proc/PID/stat) and kills it, or signals it and lets it go on (SIGCONT).

/// The environment variable naming the step to stop at.
#[cfg(feature = "failpoints")]
pub const ENV: &str = "FWMARK_FAILPOINT";

/// The steps of [`crate::live::switch`], in order.
pub mod step {
    /// `state.pending.json` is written; the new maps are not filled yet.
    pub const AFTER_PENDING_WRITTEN: &str = "after-pending-written";
    /// The new generation's maps are filled and placed in the unused slot;
    /// `ACTIVE` still names the old one.
    pub const BEFORE_SWITCH: &str = "before-switch";
    /// `ACTIVE` names the new generation and the old one is released; the
    /// pending state is not yet renamed over `state.json`.
    pub const AFTER_SWITCH: &str = "after-switch";
    /// An upgrade from an older layout ([`crate::upgrade`]) replaced the
    /// program on the live attachment; the new state is not recorded yet.
    pub const UPGRADE_AFTER_REPLACE: &str = "upgrade-after-replace";
    /// An upgrade recorded the new state in `state.upgrade.json`; the pins
    /// are not swapped yet.
    pub const UPGRADE_AFTER_RECORD: &str = "upgrade-after-record";
}

/// Stops the process here when [`ENV`] names `step` (see the module).
#[cfg(feature = "failpoints")]
pub fn pause(step: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static REACHED: AtomicU32 = AtomicU32::new(0);
    let Some(wanted) = std::env::var(ENV).ok() else {
        return;
    };
    let (name, nth) = match wanted.split_once(':') {
        Some((name, n)) => (name, n.parse::<u32>().unwrap_or(1)),
        None => (wanted.as_str(), 1),
    };
    if name != step || REACHED.fetch_add(1, Ordering::SeqCst) + 1 != nth {
        return;
    }
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "fwmark: fail-point {step} reached: stopped"
    );
    // Every thread stops; SIGKILL ends it, SIGCONT lets it go on.
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
}

/// Without the `failpoints` feature: nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn pause(_step: &str) {}
