//! Stopping `fwmark` at a named step of a generation switch, to kill or
//! signal it exactly there: fwmark's test-only fail-points
//! (`fwmark-user/src/failpoint.rs`, the `failpoints` feature, which this
//! lab turns on and `cargo xtask test` builds the binary with).

use std::time::{Duration, Instant};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{daemon::Daemon, netns::Lab};

pub use fwmark::failpoint::{ENV, step};

/// The value of [`ENV`] that stops at `step` the `nth` time (from 1).
pub fn nth(step: &str, nth: u32) -> String {
    format!("{step}:{nth}")
}

/// The state letter of process `pid` in /proc/PID/stat (`T` when stopped),
/// or None when it is gone.
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE ...": COMM may hold anything but ends at the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Waits (up to 60 s) until process `pid` has stopped at the fail-point
/// `at`; panics when it exits or runs on instead.
pub fn wait_stopped(pid: u32, at: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match state(pid) {
            Some('T') => return,
            Some('Z') | None => panic!(
                "fwmark (pid {pid}) exited before it reached the fail-point {at}: \
                 is it built with `--features failpoints`? (`cargo xtask test` does that; \
                 by hand: `cargo build -p fwmark-user --features failpoints`)"
            ),
            Some(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "fwmark (pid {pid}) did not stop at the fail-point {at} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `signal` to the stopped process `pid`, then SIGCONT so it is
/// acted on (only SIGKILL reaches a stopped process by itself).
pub fn signal_and_resume(pid: u32, signal: Signal) {
    let pid = Pid::from_raw(pid as i32);
    kill(pid, signal).expect("signal the stopped fwmark");
    if signal != Signal::SIGKILL {
        kill(pid, Signal::SIGCONT).expect("resume the stopped fwmark");
    }
}

/// Lets the stopped process `pid` go on.
pub fn resume(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGCONT).expect("resume the stopped fwmark");
}

/// `fwmark apply` of `config` on the lab's director interface, stopped at
/// the fail-point `at` (a step, or [`nth`]); its output is piped.
pub fn spawn_apply(lab: &Lab, config: &str, at: &str) -> std::process::Child {
    let child = lab
        .director
        .command(crate::daemon::fwmark_bin())
        .args(["apply", "--iface", &lab.director_if, "--config", config])
        .env(ENV, at)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn fwmark apply");
    wait_stopped(child.id(), at);
    child
}

/// [`Daemon::run_on`] with the fail-point `at` armed: it stops there once
/// it gets so far (its start is its first switch, so a reload is `STEP:2`).
pub fn run_on(lab: &Lab, config: &str, extra: &[&str], at: &str) -> Daemon {
    let env = format!("{ENV}={at}");
    Daemon::run_behind(lab, &["env", &env], config, extra).expect("start fwmark run")
}
