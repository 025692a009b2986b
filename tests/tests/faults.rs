//! Faults and security in the real kernel, between two namespaces: a config
//! too large for the maps, `apply` and the daemon killed in the middle of a
//! change, the interface vanishing under `fwmark run`, bpffs missing, an
//! unreadable config, other tc programs on the interface, other mark
//! writers, who may open fwmark's pins and state, and fwmark without
//! iproute2 (its own rtnetlink requests).
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
    daemon::{DOCUMENTED_CAPS, Daemon, as_nobody, fwmark_bin},
    example::probe,
    foreign::{Foreign, Hook},
    netns::Lab,
    nft::{MarkCounters, Probe, ProbeProto},
    ops::{
        DNS_VIP, TempDir, VIP, apply, fwmark, get_metrics, ingress, ok, ok_with_stderr,
        pending_exists, pin_dir, run_dir, send, spawn_apply, state_text, status_json, stop_ok,
        web_dns_config as config,
    },
};
use nix::sys::signal::Signal;

/// A VIP only the large configs mark.
const BULK_VIP: &str = "10.99.0.1";

/// The common start of a faults test: the kernel gate, a lab whose director
/// owns the web, DNS and bulk VIPs, a directory for configs, and
/// [`config`]`(80)` written there as `file`.
fn setup(name: &str, tools: &[&str], file: &str) -> Option<(Lab, TempDir, String)> {
    fwmark_testlab::ops::setup(name, tools, &[VIP, DNS_VIP, BULK_VIP], file)
}

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

/// A config of `rules` rules (one per port of one VIP).
fn config_with_rules(rules: u16) -> String {
    let ports: Vec<String> = (1..=rules).map(|p| p.to_string()).collect();
    format!(
        "{}\n[[service]]\nname = \"many\"\nvip = \"{BULK_VIP}\"\nproto = \"udp\"\nports = [{}]\nmark = 99\n",
        config(80),
        ports.join(", ")
    )
}

/// The probes whose marks tell the configs apart: web TCP 80, web UDP 443
/// and a bulk-only UDP port.
fn telling_probes() -> Vec<Probe> {
    vec![
        probe(VIP, ProbeProto::Tcp, 80, 0, 1),
        probe(VIP, ProbeProto::Udp, 443, 0, 1),
        probe(BULK_VIP, ProbeProto::Udp, 5000, 0, 1),
    ]
}

/// Counters for [`telling_probes`], with every mark the tests use.
fn install_counters(lab: &Lab) -> MarkCounters<'_> {
    MarkCounters::install_with_marks(&lab.director, &telling_probes(), &[80, 81, 82, 99])
        .expect("install nft counters")
}

/// Sends `p` (one packet) and returns the one mark it arrived with, read
/// from table `i` of `counters` (the table of `p`).
fn mark_of_next(lab: &Lab, counters: &MarkCounters<'_>, i: usize, p: &Probe) -> u32 {
    let before = counters.read().unwrap()[i].clone();
    send(lab, p);
    let after = counters.read().unwrap()[i].clone();
    assert_eq!(after.total(), before.total() + 1, "{p}: {after:?}");
    assert_eq!(
        after.other, before.other,
        "{p}: an unexpected mark: {after:?}"
    );
    after
        .by_mark
        .iter()
        .find(|(m, n)| before.by_mark.get(m) != Some(n))
        .map(|(m, _)| *m)
        .unwrap_or_else(|| panic!("{p}: the packet was not counted: {after:?}"))
}

/// Sends one packet of each telling probe and returns the mark each arrived
/// with.
fn marks_now(lab: &Lab, counters: &MarkCounters<'_>) -> Vec<u32> {
    telling_probes()
        .iter()
        .enumerate()
        .map(|(i, p)| mark_of_next(lab, counters, i, p))
        .collect()
}

/// What the telling probes get under [`config`] (`mark`) and under
/// [`large_config`] (`mark`).
fn small(mark: u32) -> Vec<u32> {
    vec![mark, mark, 0]
}

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

/// The pinned `ACTIVE` word of the director's interface (generation slot
/// and flags), read the way the classifier reads it.
struct ActiveWord(aya::maps::Array<aya::maps::MapData, u32>);

impl ActiveWord {
    fn open(lab: &Lab) -> ActiveWord {
        let data =
            aya::maps::MapData::from_pin(pin_dir(lab).join(fwmark_common::map_names::ACTIVE))
                .expect("open the pinned ACTIVE map");
        ActiveWord(aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap())
    }

    fn get(&self) -> u32 {
        self.0.get(&0, 0).unwrap()
    }
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

/// The web probe that must arrive with mark 80 under [`config`]`(80)`.
fn web() -> Probe {
    probe(VIP, ProbeProto::Tcp, 80, 80, 1)
}

/// Packets the web probe got, per mark (a counter table of its own).
fn web_counters(lab: &Lab) -> MarkCounters<'_> {
    MarkCounters::install_with_marks(&lab.director, &[web()], &[81, 82]).unwrap()
}

/// The one mark the next web packet arrives with.
fn web_mark(lab: &Lab, counters: &MarkCounters<'_>) -> u32 {
    mark_of_next(lab, counters, 0, &web())
}

/// The recorded state (`state.json`) as JSON.
fn state_json(lab: &Lab) -> serde_json::Value {
    serde_json::from_str(&state_text(lab).expect("state.json")).unwrap()
}

#[test]
fn interface_deleted_and_created_again_is_followed_tcx() {
    interface_deleted_and_created_again("tcx");
}

#[test]
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
fn interface_renamed_away_and_back_is_followed_tcx() {
    interface_renamed_away_and_back("tcx");
}

#[test]
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
fn a_kept_attachment_whose_interface_was_replaced_is_attached_afresh_tcx() {
    kept_attachment_of_a_replaced_interface("tcx");
}

#[test]
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
fn other_tc_programs_run_after_fwmark_and_see_its_mark_tcx() {
    let Some((lab, _files, a)) = setup(
        "other_tc_programs_tcx",
        &["ip", "nft", "nsenter", "tc"],
        "a.toml",
    ) else {
        return;
    };
    let counters = web_counters(&lab);
    let dev = &lab.director_if;
    // Attached before fwmark: a tcx program and a tc filter at pref 1.
    let tcx = Foreign::attach(&lab.director, dev, "other_tcx", Hook::Tcx).unwrap();
    let filter = Foreign::attach(&lab.director, dev, "other_filter", Hook::Filter(1)).unwrap();

    let daemon = Daemon::run_on(&lab, &a, &["--attach", "tcx"]).unwrap();
    let log = daemon.stderr_so_far();
    assert!(log.contains("after fwmark (they see its marks)"), "{log}");
    assert!(log.contains("tc filter pref 1 bpf other_filter"), "{log}");
    assert_eq!(
        ingress(&lab),
        vec!["tcx:fwmark", "tcx:other_tcx", "netlink:other_filter"]
    );
    for _ in 0..3 {
        assert_eq!(web_mark(&lab, &counters), 80);
    }
    // Both still run, after fwmark: they saw the packets with its mark.
    assert_eq!(tcx.seen(80), 3, "{:?}", tcx.counts());
    assert_eq!(filter.seen(80), 3, "{:?}", filter.counts());

    stop_ok(daemon);
    // fwmark removed only its own attachment.
    assert_eq!(ingress(&lab), vec!["tcx:other_tcx", "netlink:other_filter"]);
    // They go on without it (ARP and neighbour discovery count under 0
    // too: only growth is certain there).
    let before = (tcx.seen(0), filter.seen(0));
    assert_eq!(web_mark(&lab, &counters), 0);
    assert!(tcx.seen(0) > before.0 && filter.seen(0) > before.1);
    assert_eq!((tcx.seen(80), filter.seen(80)), (3, 3));
}

#[test]
fn netlink_takes_a_free_priority_and_other_programs_keep_running() {
    let Some((lab, _files, a)) = setup(
        "other_tc_programs_netlink",
        &["ip", "nft", "nsenter", "tc"],
        "a.toml",
    ) else {
        return;
    };
    let counters = web_counters(&lab);
    let dev = &lab.director_if;
    let tcx = Foreign::attach(&lab.director, dev, "other_tcx", Hook::Tcx).unwrap();
    let early = Foreign::attach(&lab.director, dev, "early", Hook::Filter(1)).unwrap();
    let late = Foreign::attach(&lab.director, dev, "late", Hook::Filter(10)).unwrap();

    let daemon = Daemon::run_on(&lab, &a, &["--attach", "netlink"]).unwrap();
    let log = daemon.stderr_so_far();
    assert!(
        log.contains("tc filter pref 1 bpf early on")
            && log.contains("before fwmark's filter (pref 2)"),
        "{log}"
    );
    assert!(log.contains("tcx program(s) other_tcx (id"), "{log}");
    assert_eq!(state_json(&lab)["netlink"][0], 2);
    assert_eq!(
        ingress(&lab),
        vec![
            "tcx:other_tcx",
            "netlink:early",
            "netlink:fwmark",
            "netlink:late"
        ]
    );
    for _ in 0..2 {
        assert_eq!(web_mark(&lab, &counters), 80);
    }
    // The tcx program and pref 1 run before fwmark (they never see its
    // mark), pref 10 after it.
    for (other, name) in [(&tcx, "tcx"), (&early, "early")] {
        let counts = other.counts().unwrap();
        assert!(
            counts.get(&0) >= Some(&2) && !counts.contains_key(&80),
            "{name}: {counts:?}"
        );
    }
    assert_eq!(late.seen(80), 2, "{:?}", late.counts());

    // A restart adopts at the same priority, next to nobody else's.
    daemon.kill();
    let daemon = Daemon::run_on(&lab, &a, &["--attach", "netlink"]).unwrap();
    assert_eq!(state_json(&lab)["netlink"][0], 2);
    assert_eq!(
        ingress(&lab),
        vec![
            "tcx:other_tcx",
            "netlink:early",
            "netlink:fwmark",
            "netlink:late"
        ]
    );
    assert_eq!(web_mark(&lab, &counters), 80);
    assert_eq!(late.seen(80), 3);

    stop_ok(daemon);
    assert_eq!(
        ingress(&lab),
        vec!["tcx:other_tcx", "netlink:early", "netlink:late"]
    );
    let before = late.seen(0);
    assert_eq!(web_mark(&lab, &counters), 0);
    assert!(late.seen(0) > before);
    assert_eq!(late.seen(80), 3);
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

/// `unshare` into a private mount namespace, unmount bpffs there (never in
/// the test's own), then run `inner` in the director's network namespace.
fn without_bpffs(lab: &Lab, inner: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        "while mountpoint -q /sys/fs/bpf; do umount /sys/fs/bpf || exit 1; done; exec \"$@\"",
        "sh",
        "nsenter",
        &format!("--net=/run/netns/{}", lab.director.name),
        "--",
    ])
    .args(inner);
    cmd
}

/// The file system type of `path` as `stat -f` names it.
fn fs_type(path: &str) -> String {
    let out = std::process::Command::new("stat")
        .args(["-f", "-c", "%T", path])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn missing_bpffs_is_mounted_root_only() {
    let Some((lab, _files, a)) = setup(
        "missing_bpffs_is_mounted",
        &["ip", "nft", "nsenter", "unshare", "mountpoint"],
        "a.toml",
    ) else {
        return;
    };
    let counters = web_counters(&lab);
    let bin = fwmark_bin();
    let cmd = without_bpffs(
        &lab,
        &[
            bin.to_str().unwrap(),
            "run",
            "--iface",
            &lab.director_if,
            "--config",
            &a,
        ],
    );
    let daemon = Daemon::spawn(cmd).unwrap();
    let log = daemon.stderr_so_far();
    assert!(log.contains("mounted bpffs at /sys/fs/bpf"), "{log}");
    assert_eq!(web_mark(&lab, &counters), 80);
    // Its own bpffs, root only, holding the pins; the test's is untouched.
    let root = format!("/proc/{}/root/sys/fs/bpf", daemon.pid());
    let mode = {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(&root).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode, 0o700, "{root}");
    assert!(
        std::path::Path::new(&root)
            .join("fwmark")
            .join(&lab.director_if)
            .join("ACTIVE")
            .exists()
    );
    assert_eq!(fs_type("/sys/fs/bpf"), "bpf_fs");
    assert!(!pin_dir(&lab).exists());
    stop_ok(daemon);
    assert_eq!(web_mark(&lab, &counters), 0);
}

#[test]
fn bpffs_that_cannot_be_mounted_says_what_to_run() {
    let Some((lab, _files, a)) = setup(
        "bpffs_cannot_be_mounted",
        &["ip", "nsenter", "unshare", "mountpoint", "setpriv"],
        "a.toml",
    ) else {
        return;
    };
    let bin = fwmark_bin();
    // Without CAP_SYS_ADMIN nothing may mount.
    let out = without_bpffs(
        &lab,
        &[
            "setpriv",
            DOCUMENTED_CAPS,
            "--",
            bin.to_str().unwrap(),
            "run",
            "--iface",
            &lab.director_if,
            "--config",
            &a,
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bpffs is not mounted at /sys/fs/bpf")
            && err.contains("run `mount -t bpf -o mode=0700 bpf /sys/fs/bpf` as root"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(ingress(&lab).is_empty());
    assert_eq!(fs_type("/sys/fs/bpf"), "bpf_fs");
}

#[test]
fn pins_and_state_are_root_only() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let Some((lab, files, a)) = setup(
        "pins_and_state_are_root_only",
        &["ip", "nsenter", "setpriv"],
        "a.toml",
    ) else {
        return;
    };
    let daemon = Daemon::run_on(&lab, &a, &["--no-watch"]).unwrap();
    // A switch by apply writes the state too.
    let b = files.write("b.toml", &config(81));
    ok(apply(&lab, &b));
    let pins = pin_dir(&lab);
    let run = fwmark_testlab::ops::run_dir(&lab);
    for dir in [
        pins.clone(),
        pins.parent().unwrap().to_path_buf(),
        run.clone(),
        run.parent().unwrap().to_path_buf(),
    ] {
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(
            (meta.uid(), meta.permissions().mode() & 0o7777),
            (0, 0o700),
            "{}",
            dir.display()
        );
    }
    let mut entries: Vec<std::path::PathBuf> = Vec::new();
    for dir in [&pins, &run] {
        entries.extend(std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()));
    }
    for name in [
        "ACTIVE",
        "EXACT",
        "PREFIX",
        "RULE_STATS",
        "GLOBAL_STATS",
        "link",
    ] {
        assert!(entries.contains(&pins.join(name)), "{name} is not pinned");
    }
    for name in ["state.json", "apply.lock", "daemon.lock"] {
        assert!(entries.contains(&run.join(name)), "no {name}");
    }
    for entry in &entries {
        let meta = std::fs::metadata(entry).unwrap();
        assert_eq!(meta.uid(), 0, "{}", entry.display());
        assert_eq!(
            meta.permissions().mode() & 0o077,
            0,
            "{} is open to group or others",
            entry.display()
        );
    }

    // An unprivileged user opens none of it.
    for path in [
        pins.join("ACTIVE"),
        pins.join("RULE_STATS"),
        run.join("state.json"),
    ] {
        let out = as_nobody("cat", &[path.to_str().unwrap()]);
        assert!(!out.status.success(), "{} was readable", path.display());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Permission denied"), "{err}");
    }
    for dir in [&pins, &run] {
        let out = as_nobody("ls", &[dir.to_str().unwrap()]);
        assert!(!out.status.success(), "{} was listable", dir.display());
    }
    let out = as_nobody(
        "sh",
        &[
            "-c",
            &format!("echo x >> {}", run.join("apply.lock").display()),
        ],
    );
    assert!(!out.status.success(), "apply.lock was writable");
    stop_ok(daemon);
}

#[test]
fn metrics_on_a_bare_port_listen_on_loopback_only() {
    let Some((lab, _files, a)) = setup("metrics_on_loopback_only", &["ip", "nsenter"], "a.toml")
    else {
        return;
    };
    let daemon = Daemon::run_on(&lab, &a, &["--metrics", "9470"]).unwrap();
    daemon
        .wait_for_log(
            "serving metrics at http://127.0.0.1:9470/metrics",
            Duration::from_secs(10),
        )
        .unwrap();
    let body = get_metrics(&lab.director, "127.0.0.1:9470").unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    // The director's own address, from inside and from the client: refused.
    let director = format!("{}:9470", fwmark_testlab::netns::DIRECTOR_V4);
    for ns in [&lab.director, &lab.client] {
        let err = get_metrics(ns, &director).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    }
    let v6 = format!("[{}]:9470", fwmark_testlab::netns::DIRECTOR_V6);
    let err = get_metrics(&lab.client, &v6).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    daemon.stop().unwrap();
}

#[test]
fn a_config_others_can_write_is_warned_about() {
    let Some((lab, files, open)) =
        setup("config_others_can_write", &["ip", "nsenter"], "open.toml")
    else {
        return;
    };
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
    let theirs = files.write("theirs.toml", &config(81));
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let fine = files.write("fine.toml", &config(82));
    let every_user = format!("config {open} is writable by every user (mode 0666)");
    let owned = format!("config {theirs} is owned by uid 65534, not root");

    // check warns and still succeeds.
    let (_, err) = ok_with_stderr(fwmark(&lab, &["check", "--config", &open]));
    assert!(
        err.contains(&every_user) && err.contains("chmod go-w"),
        "{err}"
    );
    // run warns at start, and runs.
    let daemon = Daemon::run_on(&lab, &open, &["--no-watch"]).unwrap();
    let log = daemon.stderr_so_far();
    assert!(log.contains(&every_user), "{log}");
    // apply warns, and applies.
    let (_, err) = ok_with_stderr(apply(&lab, &theirs));
    assert!(
        err.contains(&owned) && err.contains("chown root:root"),
        "{err}"
    );
    // A root-owned 0644 file in a root-owned 0755 directory: no warning.
    let (_, err) = ok_with_stderr(apply(&lab, &fine));
    assert!(!err.contains(&format!("config {fine}")), "{err}");
    assert_eq!(status_json(&lab)["config"]["generation"], 3);
    daemon.stop().unwrap();
}

/// Other mark writers in the director namespace: iptables and ip6tables
/// rules, nft chains on the path (and off it), keepalived's IPVS table.
fn install_other_markers(lab: &Lab) {
    fwmark_testlab::netns::pipe_into(
        lab.director.command("iptables-restore").arg("--noflush"),
        "*mangle\n:SUB - [0:0]\n\
         -A PREROUTING -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -j MARK --set-xmark 0x50/0xffffffff\n\
         -A PREROUTING -p udp -j SUB\n\
         -A SUB -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff\n\
         -A OUTPUT -j MARK --set-xmark 0x2/0xffffffff\n\
         COMMIT\n",
    )
    .unwrap();
    fwmark_testlab::netns::pipe_into(
        lab.director.command("ip6tables-restore").arg("--noflush"),
        "*mangle\n-A PREROUTING -j MARK --set-xmark 0x5/0xff\nCOMMIT\n",
    )
    .unwrap();
    let dev = &lab.director_if;
    fwmark_testlab::nft::nft_script(
        &lab.director,
        &format!(
            "table inet other {{\n\
               chain pre {{\n\
                 type filter hook prerouting priority -150; policy accept;\n\
                 ip daddr 192.0.2.10 meta mark set 0x51\n\
                 meta l4proto udp jump sub\n\
                 meta mark vmap {{ 0x1 : jump sub2 }}\n\
               }}\n\
               chain sub {{\n ct mark set 0x1\n }}\n\
               chain sub2 {{\n meta mark set ct mark\n }}\n\
               chain out {{\n type filter hook output priority 0;\n meta mark set 0x9\n }}\n\
             }}\n\
             table netdev ing {{\n\
               chain c {{\n type filter hook ingress device \"{dev}\" priority 0;\n meta mark set 0x7\n }}\n\
             }}\n\
             table netdev lo_only {{\n\
               chain c {{\n type filter hook ingress device \"lo\" priority 0;\n meta mark set 0x8\n }}\n\
             }}\n\
             table ip keepalived_ipvs {{\n\
               map tcp_map {{\n type ipv4_addr . inet_service : mark\n elements = {{ 192.0.2.10 . 80 : 0x50 }}\n }}\n\
               chain in {{\n\
                 type filter hook input priority -1; policy accept;\n\
                 meta l4proto tcp meta mark set ip daddr . tcp dport map @tcp_map counter return\n\
               }}\n\
             }}\n"
        ),
    )
    .unwrap();
}

#[test]
fn other_mark_writers_are_named_at_run_and_apply() {
    let Some((lab, files, a)) = setup(
        "other_mark_writers",
        &["ip", "nft", "nsenter", "iptables", "ip6tables"],
        "a.toml",
    ) else {
        return;
    };
    // Counting marks is not writing them: this table must not be named.
    let _counters = web_counters(&lab);
    install_other_markers(&lab);
    let expected = [
        "8 other rule(s) write marks on".to_string(),
        "iptables mangle PREROUTING: -A PREROUTING -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -j MARK --set-xmark 0x50/0xffffffff".to_string(),
        "iptables mangle SUB (reached from PREROUTING): -A SUB -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff".to_string(),
        "ip6tables mangle PREROUTING: -A PREROUTING -j MARK --set-xmark 0x5/0xff".to_string(),
        "nft table inet other chain pre (hook prerouting, priority -150): ip daddr 192.0.2.10 meta mark set 0x00000051".to_string(),
        "nft table inet other chain sub (reached from chain pre): ct mark set 0x00000001".to_string(),
        "nft table inet other chain sub2 (reached from chain pre): meta mark set ct mark".to_string(),
        "nft table netdev ing chain c (hook ingress, priority 0): meta mark set 0x00000007".to_string(),
        "nft table ip keepalived_ipvs chain in (hook input, priority -1; keepalived's nftables_ipvs table".to_string(),
    ];
    let absent = [
        "-A OUTPUT",
        "0x00000009",
        "0x00000008",
        "fwmarktest",
        "table ip mangle",
    ];
    let check = |log: &str| {
        for line in &expected {
            assert!(log.contains(line.as_str()), "missing {line:?} in\n{log}");
        }
        for text in absent {
            assert!(!log.contains(text), "{text:?} named in\n{log}");
        }
    };

    let daemon = Daemon::run_on(&lab, &a, &["--no-watch"]).unwrap();
    check(&daemon.stderr_so_far());
    let b = files.write("b.toml", &config(81));
    let out = apply(&lab, &b);
    check(&String::from_utf8_lossy(&out.stderr));
    ok(out);
    stop_ok(daemon);

    // Without iptables and nft on the PATH: nothing to say, no error.
    let daemon = Daemon::run_behind(
        &lab,
        &["/usr/bin/env", "PATH=/nonexistent"],
        &a,
        &["--attach", "tcx"],
    )
    .unwrap();
    let log = daemon.stderr_so_far();
    assert!(!log.contains("write marks"), "{log}");
    stop_ok(daemon);
}

#[test]
fn no_iproute2_is_needed_at_run_time_tcx() {
    no_iproute2_at_run_time("tcx");
}

#[test]
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
fn a_failed_reattach_is_retried_without_a_link_change_tcx() {
    failed_reattach_is_retried("tcx");
}

#[test]
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

/// The rtnetlink requests on their own, against filters the test lab adds
/// with `tc`: the dump gives each filter's priority, chain, kind and bpf
/// name; a delete by priority and handle removes one element, and a second
/// one reports it gone.
#[test]
fn rtnl_lists_and_deletes_ingress_filters() {
    let Some((lab, _files, _a)) = setup(
        "rtnl_lists_and_deletes_ingress_filters",
        &["ip", "nft", "nsenter", "tc"],
        "a.toml",
    ) else {
        return;
    };
    let dev = lab.director_if.clone();
    let ifindex = {
        let dev = dev.clone();
        lab.director
            .run(move || fwmark::preflight::interface_index(&dev).unwrap())
            .unwrap()
    };
    let list = || {
        lab.director
            .run(move || fwmark::rtnl::ingress_filters(ifindex).unwrap())
            .unwrap()
    };
    // No clsact qdisc yet: nothing, and no error.
    assert_eq!(list(), vec![]);
    let _early = Foreign::attach(&lab.director, &dev, "early", Hook::Filter(1)).unwrap();
    let _late = Foreign::attach(&lab.director, &dev, "late", Hook::Filter(10)).unwrap();
    let entries = list();
    let named: Vec<(u16, u32, Option<&str>, Option<&str>)> = entries
        .iter()
        .filter(|e| e.handle != 0)
        .map(|e| {
            (
                e.priority,
                e.chain,
                e.kind.as_deref(),
                e.bpf_name.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        named,
        vec![
            (1, 0, Some("bpf"), Some("early")),
            (10, 0, Some("bpf"), Some("late"))
        ],
        "{entries:?}"
    );
    let late = entries
        .iter()
        .find(|e| e.priority == 10 && e.handle != 0)
        .unwrap()
        .handle;
    let delete = |priority: u16, handle: u32, kind: &'static str| {
        lab.director
            .run(move || fwmark::rtnl::delete_ingress_filter(ifindex, priority, handle, kind))
            .unwrap()
    };
    // The wrong kind is refused, not taken for "gone".
    assert!(delete(10, late, "u32").is_err());
    assert!(delete(10, late, "bpf").unwrap(), "deleted");
    assert!(!delete(10, late, "bpf").unwrap(), "already gone");
    assert!(!delete(7, 1, "bpf").unwrap(), "no filter at that priority");
    assert_eq!(ingress(&lab), vec!["netlink:early"]);
    assert!(list().iter().all(|e| e.priority == 1), "{:?}", list());
}
