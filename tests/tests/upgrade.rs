//! Upgrades across a change of the pinned maps' layout: a director runs the
//! previous layout's fwmark (built from [`prev::LAYOUT_2_COMMIT`]) with
//! `--keep`, a packet stream flows, the old daemon stops (its attachment
//! stays), and this build's `fwmark run` takes the pins over. Not one packet
//! may go unmarked; the counters carry over; `detach` cleans up everything.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use fwmark_testlab::{
    daemon::Daemon,
    example::probe,
    failpoint,
    netns::Lab,
    nft::{MarkCounters, ProbeProto},
    ops::{
        DNS_VIP, VIP, fwmark, ingress, ok, pin_dir, run_dir, service_packets, status_json, stop_ok,
    },
    prev,
};

/// `fwmark status --json` of the director's interface by the binary `bin`.
fn status_by(lab: &Lab, bin: &std::path::Path) -> serde_json::Value {
    let out = lab
        .director
        .command(bin)
        .args(["status", "--iface", &lab.director_if, "--json"])
        .output()
        .expect("run fwmark status");
    serde_json::from_str(&ok(out)).expect("status --json parses")
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn upgrade_from_layout_2_without_a_gap_tcx() {
    upgrade_without_a_gap("tcx", None);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn upgrade_from_layout_2_without_a_gap_netlink() {
    upgrade_without_a_gap("netlink", None);
}

/// The upgrade killed after it replaced the program (nothing recorded):
/// the next start discards the staging pins and upgrades again.
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn upgrade_killed_after_replacing_the_program_is_done_again() {
    upgrade_without_a_gap("tcx", Some(failpoint::step::UPGRADE_AFTER_REPLACE));
}

/// The same on netlink: the filter the killed run added was never
/// recorded; the next upgrade removes it (exactly one filter after).
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn upgrade_killed_after_replacing_the_filter_leaves_no_stray_filter() {
    upgrade_without_a_gap("netlink", Some(failpoint::step::UPGRADE_AFTER_REPLACE));
}

/// The upgrade killed after it recorded its result (pins not swapped):
/// the next start finishes it.
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn upgrade_killed_after_recording_is_finished_by_the_next_start() {
    upgrade_without_a_gap("netlink", Some(failpoint::step::UPGRADE_AFTER_RECORD));
}

fn upgrade_without_a_gap(mode: &str, killed_at: Option<&str>) {
    let name = format!(
        "upgrade_{mode}{}",
        killed_at.map(|s| format!("_{s}")).unwrap_or_default()
    );
    let Some((lab, _files, a)) = fwmark_testlab::ops::setup(
        &name,
        &["ip", "nft", "nsenter", "tc", "git", "tar"],
        &[VIP, DNS_VIP],
        "a.toml",
    ) else {
        return;
    };
    let old_bin = prev::binary().unwrap_or_else(|e| panic!("{e:#}"));
    let probes = [
        probe(VIP, ProbeProto::Udp, 80, 80, 0),
        probe(VIP, ProbeProto::Udp, 443, 80, 0),
    ];
    let counters = MarkCounters::install(&lab.director, &probes).unwrap();

    // The previous release, kept attached.
    let mut cmd = lab.director.command(&old_bin);
    cmd.args([
        "run",
        "--iface",
        &lab.director_if,
        "--config",
        &a,
        "--keep",
        "--no-watch",
        "--attach",
        mode,
    ]);
    let old = Daemon::spawn(cmd).expect("start the layout-2 fwmark");

    let stop = AtomicBool::new(false);
    let (sent, old_status, upgraded_log) = std::thread::scope(|s| {
        let sender = s.spawn(|| fwmark_testlab::ops::stream_until(&lab, &stop));
        std::thread::sleep(Duration::from_millis(300));
        stop_ok(old);
        // The old daemon is gone, its program marks on from the pins.
        let old_status = status_by(&lab, &old_bin);
        assert_eq!(old_status["attach"]["daemon_pid"], serde_json::Value::Null);
        // This build does not read layout 2 as its own; it says what to do.
        for args in [
            vec!["status", "--iface", &lab.director_if],
            vec!["apply", "--iface", &lab.director_if, "--config", &a],
        ] {
            let out = fwmark(&lab, &args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success()
                    && err.contains("pins of layout 2")
                    && err.contains("upgrades them without a gap"),
                "{args:?}: {err}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));

        if let Some(at) = killed_at {
            let mut child = lab
                .director
                .command(fwmark_testlab::daemon::fwmark_bin())
                .args([
                    "run",
                    "--iface",
                    &lab.director_if,
                    "--config",
                    &a,
                    "--no-watch",
                    "--keep",
                ])
                .env(failpoint::ENV, at)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn fwmark run");
            failpoint::wait_stopped(child.id(), at);
            child.kill().unwrap();
            child.wait().unwrap();
            std::thread::sleep(Duration::from_millis(200));
        }

        let new = Daemon::run_on(&lab, &a, &["--no-watch", "--keep", "--attach", mode])
            .expect("start this build's fwmark");
        std::thread::sleep(Duration::from_millis(300));
        let log = new.stderr_so_far();
        let finished = stop_ok(new);
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        (
            sender.join().unwrap(),
            old_status,
            format!("{log}{}", finished.stderr),
        )
    });

    let seen = counters.read().unwrap();
    eprintln!("{mode}: sent {sent:?}, seen {seen:?}");
    for (port, (sent, o)) in [80, 443].iter().zip(sent.iter().zip(&seen)) {
        assert!(*sent > 1000, "port {port}: only {sent} datagrams sent");
        assert_eq!(
            o.by_mark.get(&0),
            Some(&0),
            "port {port}: unmarked packets: {o:?}"
        );
        assert_eq!(o.other, 0, "port {port}: foreign marks: {o:?}");
        assert!(o.by_mark[&80] > 0, "port {port}: nothing marked: {o:?}");
    }
    if killed_at == Some(failpoint::step::UPGRADE_AFTER_RECORD) {
        // The killed run had replaced the program and recorded it: the
        // next start finished its upgrade and adopted.
        assert!(
            upgraded_log.contains("interrupted upgrade") && upgraded_log.contains("adopted"),
            "{upgraded_log}"
        );
    } else {
        let line = upgraded_log
            .lines()
            .find(|l| l.contains("upgraded"))
            .unwrap_or_else(|| panic!("no upgrade logged:\n{upgraded_log}"));
        eprintln!("{mode}: {line}");
        assert!(
            line.contains("from layout 2 to layout 3") && line.contains(&format!("({mode}")),
            "{line}"
        );
    }
    if killed_at == Some(failpoint::step::UPGRADE_AFTER_REPLACE) {
        assert!(
            upgraded_log.contains("interrupted upgrade"),
            "{upgraded_log}"
        );
        // On netlink the killed run's filter was left: the upgrade took it
        // off.
        assert_eq!(
            mode == "netlink",
            upgraded_log.contains("removing a leftover fwmark filter"),
            "{upgraded_log}"
        );
    }

    // Layout 3 now; the counters went on from where the old program was.
    let status = status_json(&lab);
    assert_eq!(status["attach"]["layout"], 3, "{status}");
    assert_eq!(old_status["attach"]["layout"], serde_json::Value::Null);
    let (old_web, new_web) = (
        service_packets(&old_status, "web"),
        service_packets(&status, "web"),
    );
    let (old_marked, new_marked) = (
        old_status["global"]["marked"].as_u64().unwrap(),
        status["global"]["marked"].as_u64().unwrap(),
    );
    let nft_marked: u64 = seen.iter().map(|o| o.by_mark[&80]).sum();
    eprintln!(
        "{mode}: web packets counted by the old fwmark {old_web}, after the upgrade {new_web}; \
         global marked {old_marked} -> {new_marked}; marked as nft saw them {nft_marked}"
    );
    assert!(old_web > 0, "{old_status}");
    assert!(new_web > old_web, "web {old_web} -> {new_web}");
    assert!(
        new_marked > old_marked,
        "marked {old_marked} -> {new_marked}"
    );
    // Every marked packet counted once: what the old program counted until
    // it was replaced is carried over. Within 0.5 %: on netlink a packet in
    // the instant both filters are in place counts in both, and a counter
    // copy races the new program's increments for a few microseconds. The
    // run killed after it replaced the program took what its program
    // counted with it (its maps were never recorded).
    if killed_at != Some(failpoint::step::UPGRADE_AFTER_REPLACE) {
        assert!(
            new_web.abs_diff(nft_marked) <= nft_marked / 200,
            "fwmark counted {new_web} web packets, nft saw {nft_marked} marked"
        );
    }
    assert_eq!(
        ingress(&lab),
        vec![format!("{mode}:fwmark")],
        "exactly one attachment after the upgrade"
    );
    let pins = pin_dir(&lab);
    assert!(!pins.join("upgrade").exists(), "staging pins left");
    assert!(!run_dir(&lab).join("state.upgrade.json").exists());

    // A layout this build cannot read (here: a newer one) is refused, with
    // what to do, and nothing is touched.
    if killed_at.is_none() && mode == "tcx" {
        let state_path = run_dir(&lab).join("state.json");
        let text = std::fs::read_to_string(&state_path).unwrap();
        let mut state: serde_json::Value = serde_json::from_str(&text).unwrap();
        state["abi"] = 99.into();
        std::fs::write(&state_path, state.to_string()).unwrap();
        let out = fwmark(
            &lab,
            &[
                "run",
                "--iface",
                &lab.director_if,
                "--config",
                &a,
                "--no-watch",
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains("holds pins of layout 99")
                && err.contains("newer fwmark")
                && err.contains("fwmark detach --iface"),
            "{err}"
        );
        assert_eq!(ingress(&lab), vec![format!("{mode}:fwmark")]);
        std::fs::write(&state_path, text).unwrap();
    }

    // `detach` removes everything.
    ok(fwmark(&lab, &["detach", "--iface", &lab.director_if]));
    assert!(ingress(&lab).is_empty(), "{:?}", ingress(&lab));
    assert!(!pins.exists(), "{} is left", pins.display());
    assert!(
        !run_dir(&lab).exists(),
        "{} is left",
        run_dir(&lab).display()
    );
}

/// Without the layout-2 commit (a shallow clone) the test says what to do.
#[test]
fn a_missing_commit_asks_for_the_full_history() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let missing = "0123456789abcdef0123456789abcdef01234567";
    let e = prev::build(&root, missing).unwrap_err().to_string();
    assert!(
        e.contains(missing) && e.contains("git fetch --unshallow"),
        "{e}"
    );
    assert!(!root.join(".cache/prev").join(missing).exists());
}
