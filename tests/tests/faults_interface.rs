//! Faults of the interface under `fwmark run`, in the real kernel between
//! two namespaces: deleted and created again, renamed away and back (tcx
//! and netlink), and a kept attachment whose interface was replaced; a
//! re-attachment that failed is retried; and all of it with no iproute2 on
//! fwmark's PATH (link notifications and tc filters over rtnetlink).

use std::time::Duration;

use fwmark_testlab::{
    daemon::{Daemon, fwmark_bin},
    faults::{setup, state_json, web_counters, web_mark},
    foreign::{Foreign, Hook},
    ops::{apply, ingress, ok, pin_dir, run_dir, status_json, stop_ok, web_dns_config as config},
};

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn interface_deleted_and_created_again_is_followed_tcx() {
    interface_deleted_and_created_again("tcx");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn interface_deleted_and_created_again_is_followed_netlink() {
    interface_deleted_and_created_again("netlink");
}

fn interface_deleted_and_created_again(mode: &str) {
    let name = format!("interface_deleted_and_created_again_{mode}");
    let Some((lab, files, a)) = setup(&name, &["ip", "nft", "nsenter", "tc"], "a.toml") else {
        return;
    };
    let counters = web_counters(&lab);
    let daemon = Daemon::run_on(&lab, &a, &["--attach", mode, "--no-watch"]).unwrap();
    assert_eq!(web_mark(&lab, &counters), 80);
    let program_id = status_json(&lab)["attach"]["program_id"].clone();

    lab.delete_link().unwrap();
    daemon
        .wait_for_log("is gone (it had index", Duration::from_secs(10))
        .unwrap();
    // Pins and state stay, consistent: status reads them as before.
    let status = status_json(&lab);
    assert_eq!(status["config"]["generation"], 1);
    assert_eq!(status["attach"]["program_id"], program_id);

    lab.recreate_link().unwrap();
    daemon
        .wait_for_log("is back (index", Duration::from_secs(10))
        .unwrap();
    assert_eq!(web_mark(&lab, &counters), 80);
    assert_eq!(
        ingress(&lab),
        vec![format!("{mode}:fwmark")],
        "exactly one attachment on the new interface"
    );
    let status = status_json(&lab);
    assert_eq!(status["attach"]["program_id"], program_id);
    assert_eq!(status["config"]["generation"], 1);
    // The counters went on: one packet before, one after.
    assert_eq!(status["services"][0]["packets"], 2);
    let state = state_json(&lab);
    if mode == "netlink" {
        assert_eq!(state["netlink"][0], 1, "{state}");
    }
    // Changes reach the new attachment.
    let b = files.write("b.toml", &config(81));
    ok(apply(&lab, &b));
    assert_eq!(web_mark(&lab, &counters), 81);

    // One log line for the loss, one for the return.
    let log = daemon.stderr_so_far();
    assert_eq!(log.matches("is gone (it had index").count(), 1, "{log}");
    assert_eq!(log.matches("is back (index").count(), 1, "{log}");
    stop_ok(daemon);
    assert!(ingress(&lab).is_empty());
    assert!(!pin_dir(&lab).exists());
    assert_eq!(web_mark(&lab, &counters), 0);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn interface_renamed_away_and_back_is_followed_tcx() {
    interface_renamed_away_and_back("tcx");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn interface_renamed_away_and_back_is_followed_netlink() {
    interface_renamed_away_and_back("netlink");
}

/// A rename keeps the device (and so an attachment on it): fwmark must take
/// its attachment off the device that no longer has its name, or it would
/// go on marking there, unseen by `status`, `detach` and the next `run`.
fn interface_renamed_away_and_back(mode: &str) {
    let name = format!("interface_renamed_away_and_back_{mode}");
    let Some((lab, _files, a)) = setup(&name, &["ip", "nft", "nsenter", "tc"], "a.toml") else {
        return;
    };
    let counters = web_counters(&lab);
    let daemon = Daemon::run_on(&lab, &a, &["--attach", mode, "--no-watch"]).unwrap();
    assert_eq!(web_mark(&lab, &counters), 80);

    let dev = &lab.director_if;
    let other = format!("{dev}r");
    let rename = |from: &str, to: &str| {
        lab.director.ip(&["link", "set", from, "down"]).unwrap();
        lab.director.ip(&["link", "set", from, "name", to]).unwrap();
        lab.director.ip(&["link", "set", to, "up"]).unwrap();
    };
    rename(dev, &other);
    daemon
        .wait_for_log("no longer names the device", Duration::from_secs(10))
        .unwrap();
    assert!(
        fwmark_testlab::netns::ingress_programs(&lab.director, &other)
            .unwrap()
            .is_empty(),
        "fwmark left its attachment on the renamed device"
    );

    rename(&other, dev);
    daemon
        .wait_for_log("is back (index", Duration::from_secs(10))
        .unwrap();
    assert_eq!(web_mark(&lab, &counters), 80);
    assert_eq!(ingress(&lab), vec![format!("{mode}:fwmark")]);
    stop_ok(daemon);
    assert!(ingress(&lab).is_empty());
    assert_eq!(web_mark(&lab, &counters), 0);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_kept_attachment_whose_interface_was_replaced_is_attached_afresh_tcx() {
    kept_attachment_of_a_replaced_interface("tcx");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_kept_attachment_whose_interface_was_replaced_is_attached_afresh_netlink() {
    kept_attachment_of_a_replaced_interface("netlink");
}

fn kept_attachment_of_a_replaced_interface(mode: &str) {
    let name = format!("kept_attachment_of_a_replaced_interface_{mode}");
    let Some((lab, _files, a)) = setup(&name, &["ip", "nft", "nsenter", "tc"], "a.toml") else {
        return;
    };
    let daemon = Daemon::run_on(&lab, &a, &["--attach", mode, "--keep"]).unwrap();
    daemon.stop().unwrap();
    lab.delete_link().unwrap();
    lab.recreate_link().unwrap();
    let counters = web_counters(&lab);
    assert_eq!(
        web_mark(&lab, &counters),
        0,
        "nothing marks the new interface"
    );

    let daemon = Daemon::run_on(&lab, &a, &["--attach", mode]).unwrap();
    assert_eq!(web_mark(&lab, &counters), 80);
    assert_eq!(ingress(&lab), vec![format!("{mode}:fwmark")]);
    if mode == "tcx" {
        let log = daemon.stderr_so_far();
        assert!(log.contains("attaching afresh"), "{log}");
    }
    stop_ok(daemon);
    assert!(ingress(&lab).is_empty());
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn no_iproute2_is_needed_at_run_time_tcx() {
    no_iproute2_at_run_time("tcx");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn no_iproute2_is_needed_at_run_time_netlink() {
    no_iproute2_at_run_time("netlink");
}

/// fwmark talks to the kernel itself (aya and rtnetlink): with no `tc` or
/// `ip` on its PATH it lists the other filters (and so picks a free
/// priority), attaches, adopts a killed run's attachment (for netlink,
/// deleting the old filter), follows a rename, and detaches.
fn no_iproute2_at_run_time(mode: &str) {
    let name = format!("no_iproute2_at_run_time_{mode}");
    let Some((lab, _files, a)) = setup(&name, &["ip", "nft", "nsenter", "tc"], "a.toml") else {
        return;
    };
    let no_path = ["/usr/bin/env", "PATH=/nonexistent"];
    let counters = web_counters(&lab);
    let dev = &lab.director_if;
    let _early = Foreign::attach(&lab.director, dev, "early", Hook::Filter(1)).unwrap();
    let with_fwmark = match mode {
        "tcx" => vec!["tcx:fwmark", "netlink:early"],
        _ => vec!["netlink:early", "netlink:fwmark"],
    };

    let daemon = Daemon::run_behind(&lab, &no_path, &a, &["--attach", mode, "--no-watch"]).unwrap();
    let log = daemon.stderr_so_far();
    // The filter at pref 1 was listed: named in the log, and fwmark's own
    // netlink filter took the next priority.
    assert!(log.contains("tc filter pref 1 bpf early"), "{log}");
    assert!(!log.contains("cannot list"), "{log}");
    if mode == "netlink" {
        assert_eq!(state_json(&lab)["netlink"][0], 2);
    }
    assert_eq!(ingress(&lab), with_fwmark);
    assert_eq!(web_mark(&lab, &counters), 80);

    // Killed: marking stays, and the next run adopts it.
    daemon.kill();
    let daemon = Daemon::run_behind(
        &lab,
        &no_path,
        &a,
        &["--attach", mode, "--no-watch", "--keep"],
    )
    .unwrap();
    let log = daemon.stderr_so_far();
    assert!(log.contains("adopted the"), "{log}");
    assert_eq!(ingress(&lab), with_fwmark, "one attachment after adoption");
    assert_eq!(web_mark(&lab, &counters), 80);

    // A rename away and back is followed (link notifications).
    let other = format!("{dev}r");
    let rename = |from: &str, to: &str| {
        lab.director.ip(&["link", "set", from, "down"]).unwrap();
        lab.director.ip(&["link", "set", from, "name", to]).unwrap();
        lab.director.ip(&["link", "set", to, "up"]).unwrap();
    };
    rename(dev, &other);
    daemon
        .wait_for_log("no longer names the device", Duration::from_secs(10))
        .unwrap();
    rename(&other, dev);
    daemon
        .wait_for_log("is back (index", Duration::from_secs(10))
        .unwrap();
    assert_eq!(ingress(&lab), with_fwmark);
    assert_eq!(web_mark(&lab, &counters), 80);

    // --keep leaves marking in place; `fwmark detach` removes it.
    stop_ok(daemon);
    assert_eq!(ingress(&lab), with_fwmark);
    let out = lab
        .director
        .command(no_path[0])
        .arg(no_path[1])
        .arg(fwmark_bin())
        .args(["detach", "--iface", dev])
        .output()
        .unwrap();
    ok(out);
    assert_eq!(ingress(&lab), vec!["netlink:early"]);
    assert_eq!(web_mark(&lab, &counters), 0);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_failed_reattach_is_retried_without_a_link_change_tcx() {
    failed_reattach_is_retried("tcx");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_failed_reattach_is_retried_without_a_link_change_netlink() {
    failed_reattach_is_retried("netlink");
}

/// Link notifications start a re-attach; one that fails (here: the new
/// attachment cannot be recorded) is retried by the daemon's timer, as no
/// notification may come to retry it.
fn failed_reattach_is_retried(mode: &str) {
    let name = format!("failed_reattach_is_retried_{mode}");
    let Some((lab, _files, a)) = setup(&name, &["ip", "nft", "nsenter", "tc"], "a.toml") else {
        return;
    };
    let counters = web_counters(&lab);
    let daemon = Daemon::run_on(&lab, &a, &["--attach", mode, "--no-watch"]).unwrap();
    assert_eq!(web_mark(&lab, &counters), 80);

    lab.delete_link().unwrap();
    daemon
        .wait_for_log("is gone (it had index", Duration::from_secs(10))
        .unwrap();
    // A directory where the state is written first: recording fails.
    let blocker = run_dir(&lab).join("state.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    lab.recreate_link().unwrap();
    daemon
        .wait_for_log("again failed", Duration::from_secs(10))
        .unwrap();
    assert!(
        ingress(&lab).is_empty(),
        "the unrecorded attachment stays off"
    );
    assert_eq!(web_mark(&lab, &counters), 0);

    // Fixed, with no change to the interface: the retry attaches.
    std::fs::remove_dir(&blocker).unwrap();
    daemon
        .wait_for_log("is back (index", Duration::from_secs(10))
        .unwrap();
    assert_eq!(ingress(&lab), vec![format!("{mode}:fwmark")]);
    assert_eq!(web_mark(&lab, &counters), 80);
    let log = daemon.stderr_so_far();
    assert_eq!(log.matches("again failed").count(), 1, "logged once: {log}");
    stop_ok(daemon);
    assert!(ingress(&lab).is_empty());
}
