//! Several interfaces under one `fwmark run` (`--iface A --iface B`): one
//! set of maps and one generation for all of them, global counters per
//! interface, applies under load on both, an interface deleted and created
//! again while the other keeps marking, and the set changed by a restart
//! with --keep without a gap on the interface that stays.
//!
//! The director namespace of the test lab gets a second link: a second
//! client namespace, wired to the director by its own veth pair on its own
//! subnet. The first client sends to the web VIP's port 80, the second to
//! its port 443, so the director's nft counters (by port) tell the two
//! interfaces' packets apart.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use fwmark_testlab::{
    daemon::Daemon,
    example::probe,
    netns::{Lab, Netns, fwmark_dirs_of, ingress_programs, run_cmd},
    nft::{self, MarkCounters, ProbeProto},
    ops::{TempDir, VIP, fwmark, get_metrics, ok, stop_ok, web_dns_config as config},
};

const SECOND_CLIENT_V4: &str = "198.51.100.2";
const SECOND_DIRECTOR_V4: &str = "198.51.100.1";

/// A second client namespace and its veth pair into the lab's director.
struct Second {
    client: Netns,
    client_if: String,
    /// The director's end: the second interface fwmark attaches to.
    director_if: String,
    /// The director namespace's inode (fwmark's directories of B).
    director_inode: u64,
}

impl Drop for Second {
    /// Removes what fwmark may have left for B (a failed test); the lab
    /// removes A's. The daemon is stopped by then (declared later).
    fn drop(&mut self) {
        for dir in fwmark_dirs_of(self.director_inode, &self.director_if) {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

impl Second {
    fn new(lab: &Lab) -> Second {
        let client = Netns::create('e').expect("create the second client");
        let client_if = format!("{}v", client.name);
        let director_if = format!("{}w", client.name);
        let second = Second {
            client,
            client_if,
            director_if,
            director_inode: lab.director.inode(),
        };
        second.wire(lab);
        second
    }

    /// Creates the veth pair with its addresses and the route to the VIP.
    fn wire(&self, lab: &Lab) {
        run_cmd(std::process::Command::new("ip").args([
            "link",
            "add",
            &self.client_if,
            "netns",
            &self.client.name,
            "type",
            "veth",
            "peer",
            "name",
            &self.director_if,
            "netns",
            &lab.director.name,
        ]))
        .expect("create the second veth pair");
        let c = &self.client;
        c.ip(&[
            "addr",
            "add",
            &format!("{SECOND_CLIENT_V4}/24"),
            "dev",
            &self.client_if,
        ])
        .unwrap();
        lab.director
            .ip(&[
                "addr",
                "add",
                &format!("{SECOND_DIRECTOR_V4}/24"),
                "dev",
                &self.director_if,
            ])
            .unwrap();
        c.ip(&["link", "set", &self.client_if, "up"]).unwrap();
        lab.director
            .ip(&["link", "set", &self.director_if, "up"])
            .unwrap();
        c.ip(&[
            "route",
            "replace",
            &format!("{VIP}/32"),
            "via",
            SECOND_DIRECTOR_V4,
        ])
        .unwrap();
    }

    /// Deletes the pair (both ends go).
    fn delete(&self, lab: &Lab) {
        lab.director
            .ip(&["link", "del", &self.director_if])
            .expect("delete the second link");
    }

    /// `count` UDP datagrams to the VIP's port 443 from the second client.
    fn send(&self, count: u32) {
        self.client
            .run(|| nft::send(&probe(VIP, ProbeProto::Udp, 443, 80, count)))
            .unwrap()
            .unwrap();
    }
}

/// The lab (director side A, first client sending to port 80), the second
/// link (director side B, second client sending to port 443), the config
/// directory with config A (web under mark 80) and config B (81).
fn setup(name: &str) -> Option<(Lab, Second, TempDir, String, String)> {
    let (lab, files, a) =
        fwmark_testlab::ops::setup(name, &["ip", "nft", "nsenter", "tc"], &[VIP], "a.toml")?;
    let second = Second::new(&lab);
    let b = files.write("b.toml", &config(81));
    Some((lab, second, files, a, b))
}

/// nft counters in the director: port 80 (interface A's traffic) and port
/// 443 (B's), by mark 0, 80, 81 and any other.
fn counters(lab: &Lab) -> MarkCounters<'_> {
    let probes = [
        probe(VIP, ProbeProto::Udp, 80, 80, 0),
        probe(VIP, ProbeProto::Udp, 443, 80, 0),
    ];
    MarkCounters::install_with_marks(&lab.director, &probes, &[81]).unwrap()
}

fn run_args<'a>(a_if: &'a str, b_if: &'a str, config: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--iface",
        a_if,
        "--iface",
        b_if,
        "--config",
        config,
        "--no-watch",
    ]
}

fn status_json(lab: &Lab, iface: &str) -> serde_json::Value {
    let out = ok(fwmark(lab, &["status", "--iface", iface, "--json"]));
    serde_json::from_str(&out).expect("status --json parses")
}

/// The global counters of `iface` in a status document.
fn interface_global<'a>(status: &'a serde_json::Value, iface: &str) -> &'a serde_json::Value {
    status["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .find(|i| i["iface"] == iface)
        .unwrap_or_else(|| panic!("no interface {iface} in {status}"))
        .get("global")
        .expect("global")
}

/// A UDP stream from `ns` to the VIP's `port` until `stop`: datagrams sent.
fn stream(ns: &Netns, port: u16, stop: &AtomicBool) -> u64 {
    ns.run(|| {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if sock.send_to(b"load", (VIP, port)).is_ok() {
                sent += 1;
            }
            // Bounded rate: about 10k datagrams per second per stream.
            std::thread::sleep(Duration::from_micros(100));
        }
        sent
    })
    .unwrap()
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn two_interfaces_one_daemon_both_marked_and_counted_tcx() {
    two_interfaces_one_daemon_both_marked_and_counted("tcx");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn two_interfaces_one_daemon_both_marked_and_counted_netlink() {
    two_interfaces_one_daemon_both_marked_and_counted("netlink");
}

fn two_interfaces_one_daemon_both_marked_and_counted(mode: &str) {
    let Some((lab, second, _files, a, b)) = setup(&format!("multi_two_interfaces_{mode}")) else {
        return;
    };
    let (a_if, b_if) = (lab.director_if.clone(), second.director_if.clone());
    let counters = counters(&lab);
    let mut args = run_args(&a_if, &b_if, &a);
    args.extend(["--metrics", "127.0.0.1:9469", "--attach", mode]);
    let daemon = Daemon::start(&lab.director, &args).unwrap();
    for iface in [&a_if, &b_if] {
        assert_eq!(
            ingress_programs(&lab.director, iface).unwrap(),
            vec![format!("{mode}:fwmark")],
            "{iface}"
        );
    }

    lab.client
        .run(|| nft::send(&probe(VIP, ProbeProto::Udp, 80, 80, 5)))
        .unwrap()
        .unwrap();
    second.send(3);
    let seen = counters.read().unwrap();
    assert_eq!(seen[0].by_mark.get(&80), Some(&5), "A: {:?}", seen[0]);
    assert_eq!(seen[1].by_mark.get(&80), Some(&3), "B: {:?}", seen[1]);

    // One status from either interface: the group's, per interface and in
    // total, the per-interface counters adding up to the total.
    let status = status_json(&lab, &b_if);
    // The same group from either name (the counters may move between the
    // two reads: the veths' own IPv6 traffic counts as it comes).
    let by_a = status_json(&lab, &a_if);
    for field in ["iface", "attach", "config"] {
        assert_eq!(status[field], by_a[field], "{field}");
    }
    assert_eq!(status["iface"], a_if.as_str());
    assert_eq!(status["config"]["generation"], 1);
    let (ga, gb) = (
        interface_global(&status, &a_if),
        interface_global(&status, &b_if),
    );
    assert!(ga["marked"].as_u64().unwrap() >= 5, "{status}");
    assert!(gb["marked"].as_u64().unwrap() >= 3, "{status}");
    for counter in ["seen", "marked", "no_match", "non_ip", "malformed"] {
        assert_eq!(
            ga[counter].as_u64().unwrap() + gb[counter].as_u64().unwrap(),
            status["global"][counter].as_u64().unwrap(),
            "{counter}: {status}"
        );
    }
    let text = ok(fwmark(&lab, &["status", "--iface", &b_if]));
    assert!(text.contains(&format!("global on {b_if}: seen=")), "{text}");
    // `status` without --iface lists the group once.
    let all: serde_json::Value =
        serde_json::from_str(&ok(fwmark(&lab, &["status", "--json"]))).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    let metrics = get_metrics(&lab.director, "127.0.0.1:9469").unwrap();
    for iface in [&a_if, &b_if] {
        let line = format!(
            "fwmark_interface_packets_total{{iface=\"{a_if}\",interface=\"{iface}\",result=\"marked\"}} "
        );
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }

    // One apply, from the second interface's name: both switch, one
    // generation.
    let out = ok(fwmark(&lab, &["apply", "--iface", &b_if, "--config", &b]));
    assert!(out.contains("generation 2 is live"), "{out}");
    lab.client
        .run(|| nft::send(&probe(VIP, ProbeProto::Udp, 80, 81, 4)))
        .unwrap()
        .unwrap();
    second.send(2);
    let seen = counters.read().unwrap();
    assert_eq!(seen[0].by_mark.get(&81), Some(&4), "A: {:?}", seen[0]);
    assert_eq!(seen[1].by_mark.get(&81), Some(&2), "B: {:?}", seen[1]);

    // Another run cannot take B.
    let other = fwmark(&lab, &["run", "--iface", &b_if, "--config", &a]);
    assert!(!other.status.success());
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(err.contains("held by process"), "{err}");

    // SIGTERM detaches from both and leaves nothing.
    let finished = stop_ok(daemon);
    assert!(
        finished.stderr.contains(&format!("detaching from {b_if}")),
        "{}",
        finished.stderr
    );
    for iface in [&a_if, &b_if] {
        assert!(
            ingress_programs(&lab.director, iface).unwrap().is_empty(),
            "{iface}"
        );
        for dir in lab.director.fwmark_dirs(iface) {
            assert!(!dir.exists(), "{} is left", dir.display());
        }
    }
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn applies_under_load_on_two_interfaces_never_leave_a_packet_unmarked() {
    let Some((lab, second, _files, a, b)) = setup("multi_applies_under_load") else {
        return;
    };
    let (a_if, b_if) = (lab.director_if.clone(), second.director_if.clone());
    let counters = counters(&lab);
    let daemon = Daemon::start(&lab.director, &run_args(&a_if, &b_if, &a)).unwrap();

    let stop = AtomicBool::new(false);
    let sent = std::thread::scope(|s| {
        let on_a = s.spawn(|| stream(&lab.client, 80, &stop));
        let on_b = s.spawn(|| stream(&second.client, 443, &stop));
        // Let both streams run before the first switch.
        std::thread::sleep(Duration::from_millis(200));
        for i in 0..100 {
            // Alternating configs, through either interface's name.
            let (file, via) = if i % 2 == 0 { (&b, &b_if) } else { (&a, &a_if) };
            ok(fwmark(&lab, &["apply", "--iface", via, "--config", file]));
        }
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        [on_a.join().unwrap(), on_b.join().unwrap()]
    });

    let seen = counters.read().unwrap();
    eprintln!(
        "applies under load on two interfaces: 100 applies; A: {} sent, {:?}; B: {} sent, {:?}",
        sent[0], seen[0], sent[1], seen[1]
    );
    for (iface, (sent, o)) in [&a_if, &b_if].iter().zip(sent.iter().zip(&seen)) {
        assert!(*sent > 1000, "{iface}: only {sent} datagrams sent");
        // Every packet's mark is one whole config's: 80 (A) or 81 (B),
        // never unmarked, never anything else.
        assert_eq!(
            o.by_mark.get(&0),
            Some(&0),
            "{iface}: unmarked packets: {o:?}"
        );
        assert_eq!(o.other, 0, "{iface}: foreign marks: {o:?}");
        assert!(
            o.by_mark[&80] > 0 && o.by_mark[&81] > 0,
            "{iface}: both configs should have marked traffic: {o:?}"
        );
        // What arrived was what was sent (nothing lost by an attachment gap
        // either): the nft counters saw every datagram.
        assert_eq!(o.total(), *sent, "{iface}: {o:?}");
    }
    let status = status_json(&lab, &a_if);
    assert_eq!(status["config"]["generation"], 101);
    let total = status["global"]["seen"].as_u64().unwrap();
    let per: u64 = [&a_if, &b_if]
        .iter()
        .map(|i| interface_global(&status, i)["seen"].as_u64().unwrap())
        .sum();
    assert_eq!(per, total, "{status}");
    stop_ok(daemon);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn one_interface_deleted_and_created_again_while_the_other_keeps_marking() {
    let Some((lab, second, _files, a, _b)) = setup("multi_delete_recreate") else {
        return;
    };
    let (a_if, b_if) = (lab.director_if.clone(), second.director_if.clone());
    let counters = counters(&lab);
    let daemon = Daemon::start(&lab.director, &run_args(&a_if, &b_if, &a)).unwrap();
    second.send(2);

    let stop = AtomicBool::new(false);
    let sent_a = std::thread::scope(|s| {
        let on_a = s.spawn(|| stream(&lab.client, 80, &stop));
        std::thread::sleep(Duration::from_millis(200));
        second.delete(&lab);
        daemon
            .wait_for_log(
                &format!("{b_if} is gone (it had index"),
                Duration::from_secs(10),
            )
            .unwrap();
        let status = status_json(&lab, &a_if);
        assert_eq!(status["config"]["generation"], 1);
        std::thread::sleep(Duration::from_millis(200));
        second.wire(&lab);
        daemon
            .wait_for_log(&format!("{b_if} is back (index"), Duration::from_secs(10))
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        on_a.join().unwrap()
    });
    assert_eq!(
        ingress_programs(&lab.director, &b_if).unwrap(),
        vec!["tcx:fwmark".to_string()],
        "exactly one attachment on the new {b_if}"
    );
    // The new B is marked again (the neighbour may need a moment after the
    // link came back: the datagram waits for it, and is counted).
    second.send(3);
    let seen = counters.read().unwrap();
    eprintln!(
        "delete and create again: A: {sent_a} sent, {:?}; B: {:?}",
        seen[0], seen[1]
    );
    assert!(sent_a > 1000, "only {sent_a} datagrams sent on A");
    assert_eq!(seen[0].by_mark.get(&0), Some(&0), "A: {:?}", seen[0]);
    assert_eq!(seen[0].by_mark.get(&80), Some(&sent_a), "A: {:?}", seen[0]);
    assert_eq!(seen[1].by_mark.get(&0), Some(&0), "B: {:?}", seen[1]);
    assert_eq!(seen[1].by_mark.get(&80), Some(&5), "B: {:?}", seen[1]);
    let status = status_json(&lab, &b_if);
    assert_eq!(status["config"]["generation"], 1);
    assert!(
        interface_global(&status, &b_if)["marked"].as_u64().unwrap() >= 5,
        "{status}"
    );
    stop_ok(daemon);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn the_set_changes_by_a_restart_with_keep_without_a_gap_on_the_interface_that_stays() {
    let Some((lab, second, _files, a, _b)) = setup("multi_change_set") else {
        return;
    };
    let (a_if, b_if) = (lab.director_if.clone(), second.director_if.clone());
    let counters = counters(&lab);
    let mut args = run_args(&a_if, &b_if, &a);
    args.push("--keep");
    let daemon = Daemon::start(&lab.director, &args).unwrap();

    let stop = AtomicBool::new(false);
    let sent_a = std::thread::scope(|s| {
        let on_a = s.spawn(|| stream(&lab.client, 80, &stop));
        std::thread::sleep(Duration::from_millis(200));
        stop_ok(daemon);
        // B is a later interface of A's group: it cannot come first.
        let wrong = fwmark(
            &lab,
            &["run", "--iface", &b_if, "--iface", &a_if, "--config", &a],
        );
        let err = String::from_utf8_lossy(&wrong.stderr);
        assert!(
            !wrong.status.success() && err.contains(&format!("name {a_if} first")),
            "{err}"
        );
        // B leaves: a restart with A only adopts A and detaches B.
        let only_a = Daemon::start(
            &lab.director,
            &[
                "run",
                "--iface",
                &a_if,
                "--config",
                &a,
                "--no-watch",
                "--keep",
            ],
        )
        .unwrap();
        assert!(
            ingress_programs(&lab.director, &b_if).unwrap().is_empty(),
            "B is detached"
        );
        for dir in lab.director.fwmark_dirs(&b_if) {
            assert!(!dir.exists(), "{} is left", dir.display());
        }
        second.send(2);
        std::thread::sleep(Duration::from_millis(100));
        // B joins again.
        stop_ok(only_a);
        let both = Daemon::start(&lab.director, &run_args(&a_if, &b_if, &a)).unwrap();
        second.send(3);
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        let sent = on_a.join().unwrap();
        stop_ok(both);
        sent
    });
    let seen = counters.read().unwrap();
    eprintln!(
        "set changed by restarts: A: {sent_a} sent, {:?}; B: {:?}",
        seen[0], seen[1]
    );
    assert!(sent_a > 1000, "only {sent_a} datagrams sent on A");
    assert_eq!(seen[0].by_mark.get(&0), Some(&0), "A: {:?}", seen[0]);
    assert_eq!(seen[0].by_mark.get(&80), Some(&sent_a), "A: {:?}", seen[0]);
    // B: unmarked while it was not in the set, marked once back.
    assert_eq!(seen[1].by_mark.get(&0), Some(&2), "B: {:?}", seen[1]);
    assert_eq!(seen[1].by_mark.get(&80), Some(&3), "B: {:?}", seen[1]);
}

/// Removes fwmark's directories of a test's device when dropped (a failed
/// test); declared before the daemon, so it runs once the daemon is gone.
struct DirsGuard(Vec<std::path::PathBuf>);

impl Drop for DirsGuard {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ethernet_and_l3_devices_mixed_each_with_its_entry() {
    use fwmark_testlab::{
        netns::unique_name,
        packets::{Frame, L4},
        tun::Tun,
    };
    let Some((lab, files, a)) =
        fwmark_testlab::ops::setup("multi_mixed", &["ip", "nft", "nsenter"], &[VIP], "a.toml")
    else {
        return;
    };
    let b = files.write("b.toml", &config(81));
    let tun_name = unique_name('u');
    let _dirs = DirsGuard(lab.director.fwmark_dirs(&tun_name).to_vec());
    let mut tun = Tun::create(&lab.director, &tun_name).expect("create the tun device");
    let counters = counters(&lab);
    let a_if = lab.director_if.clone();
    let daemon = Daemon::start(&lab.director, &run_args(&a_if, &tun_name, &a)).unwrap();
    assert_eq!(
        ingress_programs(&lab.director, &a_if).unwrap(),
        vec!["tcx:fwmark".to_string()]
    );
    assert_eq!(
        ingress_programs(&lab.director, &tun_name).unwrap(),
        vec!["tcx:fwmark_l3".to_string()]
    );

    // Veth: port 80 from the client; tun: IP packets to port 443 written
    // to the device. `mark` is what both must arrive with.
    let round = |tun: &mut Tun, mark: u32, before: &[u64; 2]| {
        lab.client
            .run(|| nft::send(&probe(VIP, ProbeProto::Udp, 80, mark, 5)))
            .unwrap()
            .unwrap();
        let packet = Frame::new(VIP, L4::Udp(443)).ip_packet();
        for _ in 0..4 {
            tun.send(&packet).unwrap();
        }
        // Tun writes are received asynchronously (the backlog).
        let mut seen = counters.read().unwrap();
        for _ in 0..50 {
            if seen[1].by_mark.get(&mark).copied().unwrap_or(0) >= before[1] + 4 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            seen = counters.read().unwrap();
        }
        assert_eq!(seen[0].by_mark[&mark], before[0] + 5, "veth: {:?}", seen[0]);
        assert_eq!(seen[1].by_mark[&mark], before[1] + 4, "tun: {:?}", seen[1]);
        assert_eq!(seen[0].by_mark[&0] + seen[1].by_mark[&0], 0, "{seen:?}");
    };
    round(&mut tun, 80, &[0, 0]);
    let status = status_json(&lab, &tun_name);
    assert_eq!(
        interface_global(&status, &tun_name)["marked"],
        4,
        "{status}"
    );
    assert!(interface_global(&status, &a_if)["marked"].as_u64().unwrap() >= 5);

    // One apply switches both entries' interfaces.
    ok(fwmark(&lab, &["apply", "--iface", &a_if, "--config", &b]));
    round(&mut tun, 81, &[0, 0]);
    stop_ok(daemon);
    for iface in [&a_if, &tun_name] {
        assert!(ingress_programs(&lab.director, iface).unwrap().is_empty());
    }
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn detach_of_one_interface_of_a_kept_group_leaves_the_other_marking() {
    let Some((lab, second, _files, a, _b)) = setup("multi_detach_member") else {
        return;
    };
    let (a_if, b_if) = (lab.director_if.clone(), second.director_if.clone());
    let counters = counters(&lab);
    let mut args = run_args(&a_if, &b_if, &a);
    args.push("--keep");
    stop_ok(Daemon::start(&lab.director, &args).unwrap());
    // Both kept marking after the run's exit.
    second.send(1);

    let out = ok(fwmark(&lab, &["detach", "--iface", &b_if]));
    assert!(
        out.contains(&format!("detached fwmark from {b_if}")),
        "{out}"
    );
    assert!(ingress_programs(&lab.director, &b_if).unwrap().is_empty());
    for dir in lab.director.fwmark_dirs(&b_if) {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
    let status = status_json(&lab, &a_if);
    assert_eq!(
        status["interfaces"].as_array().unwrap().len(),
        1,
        "{status}"
    );
    lab.client
        .run(|| nft::send(&probe(VIP, ProbeProto::Udp, 80, 80, 2)))
        .unwrap()
        .unwrap();
    second.send(1);
    let seen = counters.read().unwrap();
    assert_eq!(seen[0].by_mark.get(&80), Some(&2), "A: {:?}", seen[0]);
    assert_eq!(seen[1].by_mark.get(&80), Some(&1), "B: {:?}", seen[1]);
    assert_eq!(seen[1].by_mark.get(&0), Some(&1), "B: {:?}", seen[1]);

    ok(fwmark(&lab, &["detach", "--iface", &a_if]));
    assert!(ingress_programs(&lab.director, &a_if).unwrap().is_empty());
    for dir in lab.director.fwmark_dirs(&a_if) {
        assert!(!dir.exists(), "{} is left", dir.display());
    }

    // A kept group again: `detach --all` (this namespace only) takes both.
    stop_ok(Daemon::start(&lab.director, &args).unwrap());
    let out = ok(fwmark(&lab, &["detach", "--all"]));
    assert!(
        out.contains(&format!("detached fwmark from {a_if}")),
        "{out}"
    );
    for iface in [&a_if, &b_if] {
        assert!(
            ingress_programs(&lab.director, iface).unwrap().is_empty(),
            "{iface}: {out}"
        );
        for dir in lab.director.fwmark_dirs(iface) {
            assert!(!dir.exists(), "{} is left: {out}", dir.display());
        }
    }
}
