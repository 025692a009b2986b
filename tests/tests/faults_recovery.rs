//! Recovery in the real kernel, between two namespaces: a config too large
//! for the maps, `apply` and the daemon killed in the middle of a change,
//! SIGTERM during a reload, an apply racing a reload, and a config that
//! becomes unreadable or vanishes under `fwmark run`. The other faults
//! tests: faults_interface.rs, faults_coexistence.rs, faults_security.rs.
//!
//! A change is interrupted at a named step of the switch: fwmark's
//! test-only fail-points (`fwmark_testlab::failpoint`) stop the process
//! there, and the test kills or signals it while it is stopped, so every
//! run interrupts the same step.
//!
//! Covered elsewhere: two `apply` runs racing are serialized by the apply
//! lock (`concurrent_applies_are_serialized` in tests/live.rs: eight
//! concurrent applies get eight consecutive generations); `kill -9` of an
//! idle daemon and adoption (`restart_after_kill_*` in tests/live.rs).

use std::{process::Child, time::Duration};

use fwmark_testlab::{
    daemon::{DOCUMENTED_CAPS, Daemon},
    failpoint::{self, nth, step},
    faults::{
        ActiveWord, config_with_rules, install_counters, marks_now, setup, small, web_counters,
        web_mark, with_rules,
    },
    ops::{
        apply, fwmark, ingress, ok, ok_with_stderr, pending_exists, state_text, status_json,
        stop_ok, web_dns_config as config,
    },
};
use nix::sys::signal::Signal;

/// What a killed command said on stderr.
fn stderr_of(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_config_larger_than_the_counter_map_changes_nothing() {
    let Some((lab, files, a)) = setup(
        "config_larger_than_capacity",
        &["ip", "nft", "nsenter"],
        "a.toml",
    ) else {
        return;
    };
    let counters = install_counters(&lab);
    // The smallest counter map: 16384 rules (--max-rules below it rounds up).
    let daemon = Daemon::run_on(&lab, &a, &["--no-watch", "--max-rules", "16"]).unwrap();
    assert_eq!(marks_now(&lab, &counters), small(80));
    let state_before = state_text(&lab).expect("state.json");

    // 5 rules of web and DNS, and 16380 more.
    let too_big = files.write("too-big.toml", &config_with_rules(16380));
    let out = apply(&lab, &too_big);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "the config has 16385 rules but the live counter map holds 16384 (nothing was changed)"
        ),
        "{err}"
    );
    assert!(err.contains("fwmark detach"), "{err}");
    // Nothing changed: marks, generation, state, no pending change.
    assert_eq!(marks_now(&lab, &counters), small(80));
    assert_eq!(status_json(&lab)["config"]["generation"], 1);
    assert_eq!(state_text(&lab).as_deref(), Some(state_before.as_str()));
    assert!(!pending_exists(&lab));

    // A config that fits still applies.
    let fits = files.write("fits.toml", &config_with_rules(16000));
    ok(apply(&lab, &fits));
    assert_eq!(status_json(&lab)["config"]["generation"], 2);
    assert_eq!(marks_now(&lab, &counters), vec![80, 80, 99]);
    stop_ok(daemon);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn apply_killed_after_writing_the_pending_state_leaves_the_old_config() {
    apply_killed_before_the_switch(
        "apply_killed_after_the_pending_state",
        step::AFTER_PENDING_WRITTEN,
    );
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn apply_killed_with_the_new_maps_filled_leaves_the_old_config() {
    apply_killed_before_the_switch("apply_killed_before_the_switch", step::BEFORE_SWITCH);
}

/// `apply` SIGTERMed at `at`, a step before `ACTIVE` changes: wholly the
/// old config, and the next apply discards the interrupted change.
fn apply_killed_before_the_switch(name: &str, at: &str) {
    let Some((lab, files, a)) = setup(name, &["ip", "nft", "nsenter"], "a.toml") else {
        return;
    };
    let b = files.write("b.toml", &config(81));
    let counters = install_counters(&lab);
    let daemon = Daemon::run_on(&lab, &a, &["--no-watch"]).unwrap();
    let active = ActiveWord::open(&lab);
    let word = active.get();

    let killed = failpoint::spawn_apply(&lab, &b, at);
    assert!(pending_exists(&lab), "no pending state at {at}");
    failpoint::signal_and_resume(killed.id(), Signal::SIGTERM);
    let err = stderr_of(killed);
    assert!(
        err.contains(&format!("fail-point {at} reached")) && !err.contains("is live"),
        "{err}"
    );
    assert!(pending_exists(&lab));
    assert_eq!(active.get(), word, "ACTIVE changed");

    // Wholly the old config: marks, status (which leaves the files alone).
    assert_eq!(marks_now(&lab, &counters), small(80));
    assert_eq!(status_json(&lab)["config"]["generation"], 1);
    assert!(pending_exists(&lab));

    // The next apply discards the interrupted change and goes on from there.
    let c = files.write("c.toml", &config(82));
    let (stdout, err) = ok_with_stderr(apply(&lab, &c));
    assert!(
        err.contains("had not switched: the live config stays"),
        "{err}"
    );
    assert!(stdout.contains("generation 2 is live"), "{stdout}");
    assert!(!pending_exists(&lab));
    assert_eq!(marks_now(&lab, &counters), small(82));
    stop_ok(daemon);
    assert!(ingress(&lab).is_empty());
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn apply_killed_after_the_switch_is_recorded_by_the_next_change() {
    let Some((lab, files, a)) = setup(
        "apply_killed_after_the_switch",
        &["ip", "nft", "nsenter"],
        "a.toml",
    ) else {
        return;
    };
    let b = files.write("b.toml", &config_with_rules(10));
    let counters = install_counters(&lab);
    let daemon = Daemon::run_on(&lab, &a, &["--no-watch"]).unwrap();
    let active = ActiveWord::open(&lab);
    let word = active.get();

    // Stopped after ACTIVE switched (and the old generation was released),
    // before the state's rename: killed there.
    let killed = failpoint::spawn_apply(&lab, &b, step::AFTER_SWITCH);
    assert_ne!(active.get(), word, "ACTIVE did not change");
    failpoint::signal_and_resume(killed.id(), Signal::SIGKILL);
    let _ = stderr_of(killed);
    assert!(pending_exists(&lab));

    // Wholly the new config, though the state has not recorded it.
    assert_eq!(marks_now(&lab, &counters), with_rules());
    assert_eq!(status_json(&lab)["config"]["generation"], 2);
    // status says so (and leaves the files alone).
    let (_, err) = ok_with_stderr(fwmark(&lab, &["status", "--iface", &lab.director_if]));
    assert!(
        err.contains("switched to generation 2 and is not recorded yet"),
        "{err}"
    );
    assert!(pending_exists(&lab));

    // The next apply records the switched generation, then switches on.
    let c = files.write("c.toml", &config(82));
    let (stdout, err) = ok_with_stderr(apply(&lab, &c));
    assert!(
        err.contains("had switched already: recording generation 2"),
        "{err}"
    );
    assert!(stdout.contains("generation 3 is live"), "{stdout}");
    assert!(!pending_exists(&lab));
    assert_eq!(marks_now(&lab, &counters), small(82));
    stop_ok(daemon);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn sigterm_during_a_reload_finishes_it_before_exiting() {
    let Some((lab, files, live)) = setup(
        "sigterm_during_a_reload",
        &["ip", "nft", "nsenter"],
        "live.toml",
    ) else {
        return;
    };
    let counters = install_counters(&lab);
    // The start is the first switch, the reload the second.
    let at = nth(step::AFTER_PENDING_WRITTEN, 2);
    let daemon = failpoint::run_on(&lab, &live, &["--no-watch", "--keep"], &at);

    files.write("live.toml", &config_with_rules(10));
    daemon.signal(Signal::SIGHUP).unwrap();
    failpoint::wait_stopped(daemon.pid(), &at);
    // SIGTERM arrives in the middle of the reload.
    failpoint::signal_and_resume(daemon.pid(), Signal::SIGTERM);
    let finished = stop_ok(daemon);
    let live_at = finished
        .stderr
        .find("is live as generation 2")
        .unwrap_or_else(|| panic!("the reload did not finish:\n{}", finished.stderr));
    let term_at = finished.stderr.find("SIGTERM: leaving marking in place");
    assert!(term_at.is_some_and(|t| t > live_at), "{}", finished.stderr);

    // --keep: the new config marks, recorded whole.
    assert!(!pending_exists(&lab));
    assert_eq!(status_json(&lab)["config"]["generation"], 2);
    assert_eq!(marks_now(&lab, &counters), with_rules());
    ok(fwmark(&lab, &["detach", "--iface", &lab.director_if]));
    assert_eq!(marks_now(&lab, &counters), vec![0, 0, 0]);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn daemon_killed_during_a_reload_is_recovered_by_the_next_run() {
    let Some((lab, files, live)) = setup(
        "daemon_killed_during_a_reload",
        &["ip", "nft", "nsenter"],
        "live.toml",
    ) else {
        return;
    };
    let counters = install_counters(&lab);
    let at = nth(step::BEFORE_SWITCH, 2);
    let daemon = failpoint::run_on(&lab, &live, &["--no-watch"], &at);
    let active = ActiveWord::open(&lab);
    let word = active.get();

    files.write("live.toml", &config_with_rules(10));
    daemon.signal(Signal::SIGHUP).unwrap();
    failpoint::wait_stopped(daemon.pid(), &at);
    daemon.kill();
    assert!(pending_exists(&lab));
    assert_eq!(active.get(), word, "ACTIVE changed");
    // The pinned attachment marks on with the old config.
    assert_eq!(marks_now(&lab, &counters), small(80));
    assert_eq!(status_json(&lab)["config"]["generation"], 1);

    // The next run adopts, discards the interrupted change, then applies
    // the file as it is now.
    let daemon = Daemon::run_on(&lab, &live, &["--no-watch"]).unwrap();
    let log = daemon.stderr_so_far();
    assert!(log.contains("had not switched"), "{log}");
    assert!(log.contains("adopted"), "{log}");
    daemon
        .wait_for_log("is live as generation 2", Duration::from_secs(60))
        .unwrap();
    assert!(!pending_exists(&lab));
    assert_eq!(marks_now(&lab, &counters), with_rules());
    assert_eq!(ingress(&lab), vec!["tcx:fwmark".to_string()]);
    stop_ok(daemon);
    assert!(ingress(&lab).is_empty());
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn daemon_killed_after_the_switch_of_a_reload_is_recorded_by_the_next_run() {
    let Some((lab, files, live)) = setup(
        "daemon_killed_after_a_reload_switched",
        &["ip", "nft", "nsenter"],
        "live.toml",
    ) else {
        return;
    };
    let counters = install_counters(&lab);
    let at = nth(step::AFTER_SWITCH, 2);
    let daemon = failpoint::run_on(&lab, &live, &["--no-watch"], &at);

    files.write("live.toml", &config_with_rules(10));
    daemon.signal(Signal::SIGHUP).unwrap();
    failpoint::wait_stopped(daemon.pid(), &at);
    daemon.kill();
    assert!(pending_exists(&lab));
    // The pinned attachment marks on with the new config, not recorded yet.
    assert_eq!(marks_now(&lab, &counters), with_rules());
    assert_eq!(status_json(&lab)["config"]["generation"], 2);

    // The next run adopts and records the switched generation; the file
    // is what is live, so nothing more changes.
    let daemon = Daemon::run_on(&lab, &live, &["--no-watch"]).unwrap();
    let log = daemon.stderr_so_far();
    assert!(
        log.contains("had switched already: recording generation 2"),
        "{log}"
    );
    assert!(log.contains("adopted"), "{log}");
    assert!(log.contains("unchanged"), "{log}");
    assert!(!pending_exists(&lab));
    assert_eq!(status_json(&lab)["config"]["generation"], 2);
    assert_eq!(marks_now(&lab, &counters), with_rules());
    assert_eq!(ingress(&lab), vec!["tcx:fwmark".to_string()]);
    stop_ok(daemon);
    assert!(ingress(&lab).is_empty());
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn an_apply_and_a_reload_racing_are_serialized() {
    // Extends tests/live.rs's concurrent applies: the daemon's own reload
    // takes the same lock as `apply`.
    let Some((lab, files, live)) = setup(
        "apply_and_reload_racing",
        &["ip", "nft", "nsenter"],
        "live.toml",
    ) else {
        return;
    };
    let b = files.write("b.toml", &config_with_rules(10));
    let counters = install_counters(&lab);
    let daemon = Daemon::run_on(&lab, &live, &["--no-watch"]).unwrap();

    // The apply stops holding the lock, before its switch; a reload asked
    // for then waits for it and switches after it.
    let held = failpoint::spawn_apply(&lab, &b, step::AFTER_PENDING_WRITTEN);
    files.write("live.toml", &config(82));
    daemon.signal(Signal::SIGHUP).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let log = daemon.stderr_so_far();
    assert!(!log.contains("is live as generation 2"), "{log}");
    assert_eq!(status_json(&lab)["config"]["generation"], 1);
    failpoint::resume(held.id());
    let out = held.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("generation 2 is live"), "{stdout}");
    daemon
        .wait_for_log("is live as generation 3", Duration::from_secs(60))
        .unwrap();
    // The reload's diff starts from the apply's config: it ran after it.
    let log = daemon.stderr_so_far();
    assert!(log.contains("- service \"many\""), "{log}");
    assert_eq!(marks_now(&lab, &counters), small(82));
    let status = status_json(&lab);
    assert_eq!(status["config"]["generation"], 3);
    assert!(!pending_exists(&lab));
    stop_ok(daemon);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn an_unreadable_or_vanished_config_keeps_the_running_one() {
    let Some((lab, files, live)) = setup(
        "unreadable_or_vanished_config",
        &["ip", "nft", "nsenter", "setpriv"],
        "live.toml",
    ) else {
        return;
    };
    let counters = web_counters(&lab);
    let daemon = Daemon::run_behind(&lab, &["setpriv", DOCUMENTED_CAPS, "--"], &live, &[]).unwrap();
    let chmod = |mode: u32| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&live, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let count = |text: &str| daemon.stderr_so_far().matches(text).count();
    // Long enough for three checks of the file.
    let settle = || std::thread::sleep(Duration::from_millis(3500));

    // Unreadable: one line that says why and what to do, however long it
    // stays so.
    chmod(0o000);
    daemon
        .wait_for_log("Permission denied", Duration::from_secs(10))
        .unwrap();
    settle();
    assert_eq!(count("reload failed, the running config stays"), 1);
    assert_eq!(count("chown root FILE && chmod u+r FILE"), 1);
    assert_eq!(web_mark(&lab, &counters), 80);
    assert_eq!(status_json(&lab)["config"]["generation"], 1);

    // Readable again, with a change: picked up.
    files.write("live.toml", &config(81));
    chmod(0o644);
    daemon
        .wait_for_log("is live as generation 2", Duration::from_secs(10))
        .unwrap();
    assert_eq!(web_mark(&lab, &counters), 81);

    // Replaced by a directory: one line.
    std::fs::remove_file(&live).unwrap();
    std::fs::create_dir(&live).unwrap();
    daemon
        .wait_for_log("it is a directory", Duration::from_secs(10))
        .unwrap();
    settle();
    assert_eq!(count("reload failed, the running config stays"), 2);
    assert_eq!(web_mark(&lab, &counters), 81);

    // Gone: one line.
    std::fs::remove_dir(&live).unwrap();
    daemon
        .wait_for_log("is gone: the running config stays", Duration::from_secs(10))
        .unwrap();
    settle();
    assert_eq!(count("is gone: the running config stays"), 1);
    assert_eq!(count("reload failed"), 2);
    assert_eq!(web_mark(&lab, &counters), 81);
    assert_eq!(status_json(&lab)["config"]["generation"], 2);

    // Back: picked up.
    files.write("live.toml", &config(82));
    daemon
        .wait_for_log("is live as generation 3", Duration::from_secs(10))
        .unwrap();
    assert_eq!(web_mark(&lab, &counters), 82);
    stop_ok(daemon);
}
