//! Faults of the interface under `fwmark run`, in the real kernel between
//! two namespaces: deleted and created again, renamed away and back (tcx
//! and netlink), and a kept attachment whose interface was replaced.

use std::time::Duration;

use fwmark_testlab::{
    daemon::Daemon,
    faults::{setup, state_json, web_counters, web_mark},
    ops::{apply, ingress, ok, pin_dir, status_json, stop_ok, web_dns_config as config},
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
