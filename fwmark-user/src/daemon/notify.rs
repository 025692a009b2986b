//! Readiness and status for a service manager: systemd's `Type=notify`
//! protocol (`sd_notify(3)`), through the `sd-notify` crate. Without
//! `NOTIFY_SOCKET` in the environment (not started by systemd) every call
//! does nothing.
//!
//! - `READY=1` once the program is attached, the first generation is live
//!   and the metrics listener (if any) is up; again after each reload;
//! - `RELOADING=1` (with `MONOTONIC_USEC=`, which systemd >= 253 asks for)
//!   when a reload starts;
//! - `STOPPING=1` when a stop starts, before the final detach;
//! - `STATUS=` the interface, generation and entry counts, and the last
//!   reload error; or why the daemon could not start.
//!
//! The crate sends one datagram on a socket of its own per call; a datagram
//! to systemd's socket waits only if systemd is not reading it, so every
//! call is made from the worker thread (or after the async loop has ended),
//! never from the async loop.

use log::warn;
use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        let socket = std::env::var("NOTIFY_SOCKET").unwrap_or_default();
        warn!("telling the service manager {states:?} through {socket} failed: {e}");
    }
}

/// Marking is in place as `status` says.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload starts.
pub fn reloading(status: &str) {
    let mut states = vec![NotifyState::Reloading];
    // MONOTONIC_USEC makes systemd >= 253 accept the reload notification.
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    states.push(NotifyState::Status(status));
    send(&states);
}

/// The daemon stops.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// The status line changed.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}
