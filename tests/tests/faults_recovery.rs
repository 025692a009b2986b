//! Recovery in the real kernel, between two namespaces: a config too large
//! for the maps, `apply` and the daemon killed in the middle of a change,
//! SIGTERM during a reload, an apply racing a reload, and a config that
//! becomes unreadable or vanishes under `fwmark run`. The other faults
//! tests: faults_interface.rs, faults_coexistence.rs, faults_security.rs.
//!
//! Covered elsewhere: two `apply` runs racing are serialized by the apply
//! lock (`concurrent_applies_are_serialized` in tests/live.rs: eight
//! concurrent applies get eight consecutive generations); `kill -9` of an
//! idle daemon and adoption (`restart_after_kill_*` in tests/live.rs).

use std::{
    process::Child,
    time::{Duration, Instant},
};

use fwmark_testlab::{
    daemon::{DOCUMENTED_CAPS, Daemon},
    faults::{
        ActiveWord, config_with_rules, install_counters, marks_now, setup, small, web_counters,
        web_mark,
    },
    ops::{
        apply, fwmark, ingress, ok, ok_with_stderr, pending_exists, spawn_apply, state_text,
        status_json, stop_ok, web_dns_config as config,
    },
};
use nix::sys::signal::Signal;

/// [`config`] plus a service of 8 VIPs with every TCP and UDP port under
/// mark 99: about a million map entries, so a switch takes long enough to
/// be interrupted in the middle.
fn large_config(mark: u32) -> String {
    let vips: Vec<String> = (0..8).map(|i| format!("\"10.99.{i}.1\"")).collect();
    format!(
        "{}\n[[service]]\nname = \"bulk\"\nvip = [{}]\nproto = [\"tcp\", \"udp\"]\nports = [\"1-65535\"]\nmark = 99\n",
        config(mark),
        vips.join(", ")
    )
}

/// What the telling probes get under [`large_config`]`(mark)`.
fn large(mark: u32) -> Vec<u32> {
    vec![mark, mark, 99]
}

/// Waits until `cond` holds (polling every 100 µs), or panics after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn signal(child: &Child, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

fn stderr_of(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
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
fn apply_killed_before_the_switch_leaves_the_old_config() {
    let Some((lab, files, a)) = setup(
        "apply_killed_before_the_switch",
        &["ip", "nft", "nsenter"],
        "a.toml",
    ) else {
        return;
    };
    let b = files.write("b.toml", &large_config(81));
    let counters = install_counters(&lab);
    let daemon = Daemon::run_on(&lab, &a, &["--no-watch"]).unwrap();
    let active = ActiveWord::open(&lab);
    let word = active.get();

    // The pending state is written just before the new maps are filled:
    // killing the apply then interrupts it while it fills them.
    let killed = spawn_apply(&lab, &b);
    wait_until("the pending state", Duration::from_secs(60), || {
        pending_exists(&lab)
    });
    signal(&killed, Signal::SIGTERM);
    let err = stderr_of(killed);
    assert!(
        pending_exists(&lab),
        "the apply finished before it was killed: {err}"
    );
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
fn apply_killed_after_the_switch_is_recorded_by_the_next_change() {
    let Some((lab, files, a)) = setup(
        "apply_killed_after_the_switch",
        &["ip", "nft", "nsenter"],
        "a.toml",
    ) else {
        return;
    };
    let b = files.write("b.toml", &large_config(81));
    let counters = install_counters(&lab);
    let daemon = Daemon::run_on(&lab, &a, &["--no-watch"]).unwrap();
    let active = ActiveWord::open(&lab);

    // Between the switch of ACTIVE and the state's rename the old
    // generation is released (a few RCU grace periods): kill the apply the
    // moment ACTIVE changes. Should the apply win the race, its change is
    // complete; apply it away and try again.
    let mut generation = 1;
    let mut interrupted = false;
    for attempt in 0..5 {
        let word = active.get();
        let (config, marks) = if attempt % 2 == 0 {
            (&b, large(81))
        } else {
            (&a, small(80))
        };
        let apply = spawn_apply(&lab, config);
        wait_until("the switch", Duration::from_secs(60), || {
            active.get() != word
        });
        signal(&apply, Signal::SIGKILL);
        let _ = stderr_of(apply);
        generation += 1;
        // Wholly the new config, whether or not the state recorded it yet.
        assert_eq!(marks_now(&lab, &counters), marks);
        assert_eq!(status_json(&lab)["config"]["generation"], generation);
        if pending_exists(&lab) {
            eprintln!("interrupted between the switch and the state's rename at attempt {attempt}");
            interrupted = true;
            break;
        }
    }
    assert!(
        interrupted,
        "the apply finished before it was killed in five attempts"
    );
    // status says so (and leaves the files alone).
    let (_, err) = ok_with_stderr(fwmark(&lab, &["status", "--iface", &lab.director_if]));
    assert!(
        err.contains(&format!(
            "switched to generation {generation} and is not recorded yet"
        )),
        "{err}"
    );
    assert!(pending_exists(&lab));

    // The next apply records the switched generation, then switches on.
    let c = files.write("c.toml", &config(82));
    let (stdout, err) = ok_with_stderr(apply(&lab, &c));
    assert!(
        err.contains(&format!(
            "had switched already: recording generation {generation}"
        )),
        "{err}"
    );
    assert!(
        stdout.contains(&format!("generation {} is live", generation + 1)),
        "{stdout}"
    );
    assert!(!pending_exists(&lab));
    assert_eq!(marks_now(&lab, &counters), small(82));
    stop_ok(daemon);
}

#[test]
fn sigterm_during_a_reload_finishes_it_before_exiting() {
    let Some((lab, files, live)) = setup(
        "sigterm_during_a_reload",
        &["ip", "nft", "nsenter"],
        "live.toml",
    ) else {
        return;
    };
    let counters = install_counters(&lab);
    let daemon = Daemon::run_on(&lab, &live, &["--no-watch", "--keep"]).unwrap();

    files.write("live.toml", &large_config(81));
    daemon.signal(Signal::SIGHUP).unwrap();
    wait_until(
        "the reload's pending state",
        Duration::from_secs(60),
        || pending_exists(&lab),
    );
    daemon.signal(Signal::SIGTERM).unwrap();
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
    assert_eq!(marks_now(&lab, &counters), large(81));
    ok(fwmark(&lab, &["detach", "--iface", &lab.director_if]));
    assert_eq!(marks_now(&lab, &counters), vec![0, 0, 0]);
}

#[test]
fn daemon_killed_during_a_reload_is_recovered_by_the_next_run() {
    let Some((lab, files, live)) = setup(
        "daemon_killed_during_a_reload",
        &["ip", "nft", "nsenter"],
        "live.toml",
    ) else {
        return;
    };
    let counters = install_counters(&lab);
    let daemon = Daemon::run_on(&lab, &live, &["--no-watch"]).unwrap();
    let active = ActiveWord::open(&lab);
    let word = active.get();

    files.write("live.toml", &large_config(81));
    daemon.signal(Signal::SIGHUP).unwrap();
    wait_until(
        "the reload's pending state",
        Duration::from_secs(60),
        || pending_exists(&lab),
    );
    daemon.kill();
    assert!(pending_exists(&lab), "the reload finished before the kill");
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
    assert_eq!(marks_now(&lab, &counters), large(81));
    assert_eq!(ingress(&lab), vec!["tcx:fwmark".to_string()]);
    stop_ok(daemon);
    assert!(ingress(&lab).is_empty());
}

#[test]
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
    let b = files.write("b.toml", &large_config(81));
    let counters = install_counters(&lab);
    let daemon = Daemon::run_on(&lab, &live, &["--no-watch"]).unwrap();

    // The apply holds the lock while it fills the maps; a reload asked for
    // then waits for it and switches after it.
    let apply = spawn_apply(&lab, &b);
    wait_until("the apply's pending state", Duration::from_secs(60), || {
        pending_exists(&lab)
    });
    files.write("live.toml", &config(82));
    daemon.signal(Signal::SIGHUP).unwrap();
    let out = apply.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("generation 2 is live"), "{stdout}");
    daemon
        .wait_for_log("is live as generation 3", Duration::from_secs(60))
        .unwrap();
    // The reload's diff starts from the apply's config: it ran after it.
    let log = daemon.stderr_so_far();
    assert!(log.contains("- service \"bulk\""), "{log}");
    assert_eq!(marks_now(&lab, &counters), small(82));
    let status = status_json(&lab);
    assert_eq!(status["config"]["generation"], 3);
    assert!(!pending_exists(&lab));
    stop_ok(daemon);
}

#[test]
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
