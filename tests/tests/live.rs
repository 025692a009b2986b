//! Live operation in the real kernel, between two namespaces: atomic applies
//! under load, restarts (kill -9 and adoption), status and metrics, and bad
//! input that must leave the live config alone.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use fwmark_testlab::{
    daemon::{DOCUMENTED_CAPS, Daemon, fwmark_unprivileged},
    example::probe,
    netns::Lab,
    nft::{MarkCounters, ProbeProto},
    ops::{
        DNS_VIP, TempDir, VIP, apply, fwmark, get_metrics, ingress, ok, send, service_packets,
        spawn_apply, status_json, stop_ok, web_dns_config as config,
    },
};

/// The common start of a live test: the kernel gate, a lab, a directory for
/// configs, and config A (web under mark 80) written there.
fn setup(name: &str, tools: &[&str]) -> Option<(Lab, TempDir, String)> {
    fwmark_testlab::ops::setup(name, tools, &[VIP, DNS_VIP], "a.toml")
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn applies_under_load_never_leave_a_packet_unmarked() {
    let Some((lab, files, a)) = setup("applies_under_load", &["ip", "nft", "nsenter"]) else {
        return;
    };
    let b = files.write("b.toml", &config(81));
    let probes = [
        probe(VIP, ProbeProto::Udp, 80, 80, 0),
        probe(VIP, ProbeProto::Udp, 443, 80, 0),
    ];
    let counters = MarkCounters::install_with_marks(&lab.director, &probes, &[81]).unwrap();
    let daemon = Daemon::run_on(&lab, &a, &["--no-watch"]).unwrap();

    let stop = AtomicBool::new(false);
    let sent = std::thread::scope(|s| {
        let sender = s.spawn(|| fwmark_testlab::ops::stream_until(&lab, &stop));
        for i in 0..100 {
            let file = if i % 2 == 0 { &b } else { &a };
            ok(apply(&lab, file));
        }
        stop.store(true, Ordering::Relaxed);
        sender.join().unwrap()
    });

    let seen = counters.read().unwrap();
    for (port, (sent, o)) in [80, 443].iter().zip(sent.iter().zip(&seen)) {
        assert!(*sent > 1000, "port {port}: only {sent} datagrams sent");
        assert_eq!(
            o.by_mark.get(&0),
            Some(&0),
            "port {port}: unmarked packets: {o:?}"
        );
        assert_eq!(o.other, 0, "port {port}: foreign marks: {o:?}");
        assert!(
            o.by_mark[&80] > 0 && o.by_mark[&81] > 0,
            "port {port}: both configs should have marked traffic: {o:?}"
        );
    }
    // The last apply (i = 99) was config A: mark 80 holds on both ports.
    let status = status_json(&lab);
    assert_eq!(status["config"]["generation"], 101);
    let before = counters.read().unwrap();
    for port in [80, 443] {
        send(&lab, &probe(VIP, ProbeProto::Udp, port, 80, 5));
        send(&lab, &probe(VIP, ProbeProto::Tcp, port, 80, 2));
    }
    let after = counters.read().unwrap();
    for i in 0..2 {
        assert_eq!(
            after[i].by_mark[&80] - before[i].by_mark[&80],
            5,
            "{:?}",
            after[i]
        );
    }
    stop_ok(daemon);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn restart_after_kill_keeps_marking_and_adopts_tcx() {
    restart_after_kill("tcx");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn restart_after_kill_keeps_marking_and_adopts_netlink() {
    restart_after_kill("netlink");
}

fn restart_after_kill(mode: &str) {
    let name = format!("restart_after_kill_{mode}");
    let Some((lab, _files, a)) = setup(&name, &["ip", "nft", "nsenter", "tc"]) else {
        return;
    };
    let web = probe(VIP, ProbeProto::Tcp, 443, 80, 2);
    let counters = MarkCounters::install(&lab.director, std::slice::from_ref(&web)).unwrap();
    let first = Daemon::run_on(&lab, &a, &["--attach", mode]).unwrap();
    send(&lab, &web);
    first.kill();

    // Pinned (tcx) or kernel-held (netlink): marking goes on without a daemon.
    send(&lab, &web);
    assert_eq!(counters.read().unwrap()[0].by_mark[&80], 4);
    let status = status_json(&lab);
    assert_eq!(status["attach"]["daemon_pid"], serde_json::Value::Null);
    assert_eq!(service_packets(&status, "web"), 4);
    let first_program = status["attach"]["program_id"].as_u64().unwrap();

    let second = Daemon::run_on(&lab, &a, &["--attach", mode]).unwrap();
    assert!(
        second.stderr_so_far().contains("adopted"),
        "{}",
        second.stderr_so_far()
    );
    assert_eq!(
        ingress(&lab),
        vec![format!("{mode}:fwmark")],
        "exactly one attachment after the restart"
    );
    send(&lab, &web);
    let seen = counters.read().unwrap();
    assert_eq!(
        (seen[0].by_mark[&80], seen[0].by_mark[&0]),
        (6, 0),
        "{seen:?}"
    );
    // Counters survived the restart; the new process's program runs now
    // (tcx: replaced on the live link; netlink: a new filter took over).
    let status = status_json(&lab);
    assert_eq!(service_packets(&status, "web"), 6);
    assert_ne!(
        status["attach"]["program_id"].as_u64().unwrap(),
        first_program
    );

    stop_ok(second);
    assert!(ingress(&lab).is_empty());
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn keep_then_detach() {
    let Some((lab, _files, a)) = setup("keep_then_detach", &["ip", "nft", "nsenter"]) else {
        return;
    };
    let web = probe(VIP, ProbeProto::Tcp, 80, 80, 1);
    let counters = MarkCounters::install(&lab.director, std::slice::from_ref(&web)).unwrap();
    let daemon = Daemon::run_on(&lab, &a, &["--keep"]).unwrap();
    let finished = stop_ok(daemon);
    assert!(finished.stderr.contains("--keep"), "{}", finished.stderr);
    send(&lab, &web);
    assert_eq!(counters.read().unwrap()[0].by_mark[&80], 1);

    let out = ok(fwmark(&lab, &["detach", "--iface", &lab.director_if]));
    assert!(out.contains("detached fwmark from"), "{out}");
    assert!(ingress(&lab).is_empty());
    send(&lab, &web);
    let seen = counters.read().unwrap();
    assert_eq!(seen[0].by_mark[&0], 1, "{seen:?}");

    // Nothing left: detach again is a clear error.
    let out = fwmark(&lab, &["detach", "--iface", &lab.director_if]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fwmark is not attached to"), "{err}");
}

/// `fwmark detach --all` (what removing the Debian package runs), in a
/// mount namespace of its own with a fresh bpffs and /run/fwmark: it sees
/// only this test's pins and state, never another test's or the host's.
/// Two interfaces, one with each attach mode, both left by `run --keep`,
/// plus a pin directory with nothing attached: all go; a second run finds
/// nothing.
fn detach_all_removes_every_attachment(mode: &str) {
    let name = format!("detach_all_{mode}");
    let Some((lab, _files, a)) = setup(&name, &["ip", "nft", "nsenter", "unshare", "mount"]) else {
        return;
    };
    let web = probe(VIP, ProbeProto::Tcp, 80, 80, 1);
    let counters = MarkCounters::install(&lab.director, std::slice::from_ref(&web)).unwrap();
    let fw = fwmark_testlab::daemon::fwmark_bin();
    let script = r#"
set -eu
fw=$1; iface=$2; config=$3; mode=$4
mount -t bpf bpf /sys/fs/bpf
mkdir -p /run/fwmark
mount -t tmpfs -o mode=0700 tmpfs /run/fwmark
"$fw" run --iface "$iface" --config "$config" --attach "$mode" --keep --no-watch 2>run.log &
pid=$!
i=0
until grep -q "marking on" run.log; do
    i=$((i + 1)); [ "$i" -lt 300 ] || { cat run.log; exit 3; }
    sleep 0.1
done
kill -TERM "$pid"; wait "$pid"
"$fw" status --iface "$iface" >/dev/null && echo "kept: yes"
ns=netns:$(stat -L -c %i /proc/self/ns/net)
mkdir -p /sys/fs/bpf/fwmark/$ns/stale0
"$fw" detach --all
echo "pins left: [$(ls -A /sys/fs/bpf/fwmark)]"
echo "state left: [$(ls -A /run/fwmark/* 2>/dev/null | grep json || true)]"
echo "run left: [$(ls -A /run/fwmark)]"
"$fw" detach --all
"#;
    let dir = std::env::temp_dir().join(format!("fwmark-{}", lab.director.name));
    let out = lab
        .director
        .command("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&fw)
        .args([&lab.director_if, &a, mode])
        .current_dir(&dir)
        .output()
        .unwrap();
    let stdout = ok(out);
    assert!(stdout.contains("kept: yes"), "{stdout}");
    assert!(
        stdout.contains(&format!("detached fwmark from {} ({mode}", lab.director_if)),
        "{stdout}"
    );
    assert!(stdout.contains("removed stale pins of stale0"), "{stdout}");
    assert!(stdout.contains("pins left: []"), "{stdout}");
    assert!(stdout.contains("state left: []"), "{stdout}");
    // Nothing behind: no lock files, no directory of the namespace.
    assert!(stdout.contains("run left: []"), "{stdout}");
    assert!(
        stdout.contains("fwmark is attached nowhere: nothing to detach"),
        "{stdout}"
    );
    assert!(ingress(&lab).is_empty(), "{:?}", ingress(&lab));
    send(&lab, &web);
    let seen = counters.read().unwrap();
    assert_eq!(seen[0].by_mark[&0], 1, "{seen:?}");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn detach_all_removes_every_tcx_attachment() {
    detach_all_removes_every_attachment("tcx");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn detach_all_removes_every_netlink_attachment() {
    detach_all_removes_every_attachment("netlink");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn status_and_metrics_count_what_was_sent() {
    let Some((lab, files, a)) = setup("status_and_metrics", &["ip", "nft", "nsenter"]) else {
        return;
    };
    let daemon = Daemon::run_on(&lab, &a, &["--metrics", "9469"]).unwrap();
    send(&lab, &probe(VIP, ProbeProto::Tcp, 80, 80, 3));
    send(&lab, &probe(VIP, ProbeProto::Udp, 443, 80, 4));
    send(&lab, &probe(DNS_VIP, ProbeProto::Udp, 53, 53, 2));
    send(&lab, &probe(VIP, ProbeProto::Tcp, 22, 0, 1));

    let status = status_json(&lab);
    assert_eq!(status["schema"], 1);
    assert_eq!(status["attach"]["mode"], "tcx");
    assert!(
        status["attach"]["daemon_pid"].as_u64().is_some(),
        "{status}"
    );
    assert_eq!(status["config"]["generation"], 1);
    assert_eq!(service_packets(&status, "web"), 7);
    assert_eq!(service_packets(&status, "dns"), 2);
    assert_eq!(status["global"]["marked"], 9);
    let rules = status["services"][0]["rules"].as_array().unwrap();
    let count = |m: &str| {
        rules
            .iter()
            .find(|r| r["match"] == m)
            .unwrap_or_else(|| panic!("no rule {m}"))["packets"]
            .clone()
    };
    assert_eq!(count("192.0.2.10 tcp port 80"), 3);
    assert_eq!(count("192.0.2.10 udp port 443"), 4);

    let text = ok(fwmark(&lab, &["status", "--iface", &lab.director_if]));
    assert!(text.contains("tcx attachment"), "{text}");

    // The metrics endpoint listens on 127.0.0.1 of the director namespace,
    // from the log line on ("marking on" comes before it).
    daemon
        .wait_for_log(
            "serving metrics at http://127.0.0.1:9469/metrics",
            Duration::from_secs(10),
        )
        .unwrap();
    let body = get_metrics(&lab.director, "127.0.0.1:9469").unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    let iface = &lab.director_if;
    for line in [
        format!(
            "fwmark_service_packets_total{{iface=\"{iface}\",service=\"web\",mark=\"0x50\"}} 7"
        ),
        format!(
            "fwmark_service_packets_total{{iface=\"{iface}\",service=\"dns\",mark=\"0x35\"}} 2"
        ),
        format!("fwmark_packets_total{{iface=\"{iface}\",result=\"marked\"}} 9"),
        format!("fwmark_later_fragments_total{{iface=\"{iface}\"}} 0"),
        format!("fwmark_config_generation{{iface=\"{iface}\"}} 1"),
        format!(
            "fwmark_config_info{{iface=\"{iface}\",file=\"{a}\",sha256=\"{}\",\
             generation=\"1\"}} 1",
            status["config"]["sha256"].as_str().unwrap()
        ),
    ] {
        assert!(body.contains(&line), "missing {line} in\n{body}");
    }
    // The outcomes add up to every packet seen (`status` reads `seen`).
    let outcomes: u64 = body
        .lines()
        .filter(|l| l.starts_with("fwmark_packets_total{"))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum();
    let seen = status_json(&lab)["global"]["seen"].as_u64().unwrap();
    assert!(
        outcomes > 0 && outcomes <= seen,
        "outcomes {outcomes}, seen {seen}:\n{body}"
    );
    assert!(!body.contains("result=\"seen\""), "{body}");

    // Counters of a service that survives an apply keep counting.
    let b = files.write("b.toml", &config(81));
    ok(apply(&lab, &b));
    send(&lab, &probe(VIP, ProbeProto::Tcp, 80, 81, 1));
    assert_eq!(service_packets(&status_json(&lab), "web"), 8);
    daemon.stop().unwrap();
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn bad_input_leaves_the_live_config_alone() {
    let Some((lab, files, live_file)) = setup("bad_input", &["ip", "nft", "nsenter", "setpriv"])
    else {
        return;
    };
    let web = probe(VIP, ProbeProto::Tcp, 80, 80, 1);
    let counters = MarkCounters::install(&lab.director, std::slice::from_ref(&web)).unwrap();
    let daemon = Daemon::run_on(&lab, &live_file, &[]).unwrap();
    let iface = lab.director_if.clone();

    // An invalid config in apply: non-zero exit, file:line, nothing changes.
    let bad = files.write(
        "bad.toml",
        "[[service]]\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nmark = 0\n",
    );
    let out = apply(&lab, &bad);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:4:8: service[1].mark"), "{err}");
    send(&lab, &web);
    assert_eq!(counters.read().unwrap()[0].by_mark[&80], 1);
    assert_eq!(status_json(&lab)["config"]["generation"], 1);

    // --dry-run shows the diff and changes nothing.
    let b = files.write("b.toml", &config(81));
    let out = ok(fwmark(
        &lab,
        &["apply", "--iface", &iface, "--config", &b, "--dry-run"],
    ));
    assert!(out.contains("~ service \"web\" mark 0x50 -> 0x51"), "{out}");
    assert!(
        out.contains("entries: 0 added, 0 removed, 4 re-marked, 1 unchanged"),
        "{out}"
    );
    assert!(out.contains("dry run: nothing changed"), "{out}");
    send(&lab, &web);
    assert_eq!(counters.read().unwrap()[0].by_mark[&80], 2);

    // An invalid file at SIGHUP: the daemon keeps the running config.
    std::fs::write(&live_file, "this is not toml [").unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    daemon
        .wait_for_log(
            "reload failed, the running config stays",
            Duration::from_secs(10),
        )
        .unwrap();
    send(&lab, &web);
    assert_eq!(counters.read().unwrap()[0].by_mark[&80], 3);
    assert_eq!(status_json(&lab)["config"]["generation"], 1);

    // A valid file again: the watcher picks it up without a signal.
    std::fs::write(&live_file, config(82)).unwrap();
    daemon
        .wait_for_log("is live as generation 2", Duration::from_secs(10))
        .unwrap();
    let status = status_json(&lab);
    assert_eq!(status["services"][0]["mark"], 82);

    // Errors that name what is wrong.
    let missing = fwmark(&lab, &["apply", "--iface", "nosuch0", "--config", &b]);
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("interface \"nosuch0\" does not exist"),
        "{missing:?}"
    );
    let detach = fwmark(&lab, &["detach", "--iface", &iface]);
    assert!(
        String::from_utf8_lossy(&detach.stderr).contains("manages"),
        "detach must refuse while run manages the interface: {detach:?}"
    );
    let unprivileged = fwmark_unprivileged(&["status", "--iface", &iface]);
    assert_eq!(unprivileged.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&unprivileged.stderr).contains("fwmark needs root"),
        "{unprivileged:?}"
    );
    daemon.stop().unwrap();
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn concurrent_applies_are_serialized() {
    let Some((lab, files, a)) = setup("concurrent_applies", &["ip", "nsenter"]) else {
        return;
    };
    let daemon = Daemon::run_on(&lab, &a, &["--no-watch"]).unwrap();
    let configs: Vec<String> = (0..8)
        .map(|i| files.write(&format!("c{i}.toml"), &config(100 + i)))
        .collect();
    let children: Vec<_> = configs.iter().map(|c| spawn_apply(&lab, c)).collect();
    let mut generations: Vec<u64> = children
        .into_iter()
        .map(|c| {
            let out = ok(c.wait_with_output().unwrap());
            out.lines()
                .find_map(|l| l.split("generation ").nth(1))
                .and_then(|g| g.split_whitespace().next())
                .and_then(|g| g.parse().ok())
                .unwrap_or_else(|| panic!("no generation in {out}"))
        })
        .collect();
    generations.sort();
    // Each apply switched once, one after the other.
    assert_eq!(generations, (2..=9).collect::<Vec<u64>>());
    assert_eq!(status_json(&lab)["config"]["generation"], 9);
    daemon.stop().unwrap();
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn kernel_debug_log_reports_decisions() {
    let Some((lab, _files, a)) = setup("kernel_debug_log", &["ip", "nsenter"]) else {
        return;
    };
    let daemon = Daemon::run_on(&lab, &a, &["--log-level", "debug"]).unwrap();
    send(&lab, &probe(VIP, ProbeProto::Tcp, 443, 80, 1));
    daemon
        .wait_for_log(
            "marked: family 4 proto 6 port 443 rule 1 mark 50/ffffffff",
            Duration::from_secs(10),
        )
        .unwrap();
    daemon.stop().unwrap();
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn runs_with_only_the_documented_capabilities() {
    let Some((lab, _files, a)) = setup(
        "runs_with_only_the_documented_capabilities",
        &["ip", "nsenter", "setpriv"],
    ) else {
        return;
    };
    let web = probe(VIP, ProbeProto::Tcp, 80, 80, 1);
    let counters = MarkCounters::install(&lab.director, std::slice::from_ref(&web)).unwrap();
    // What contrib/fwmark.service grants, less CAP_SYS_ADMIN (bpffs is mounted).
    let daemon = Daemon::run_behind(&lab, &["setpriv", DOCUMENTED_CAPS, "--"], &a, &[]).unwrap();
    send(&lab, &web);
    assert_eq!(counters.read().unwrap()[0].by_mark[&80], 1);
    stop_ok(daemon);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_bad_metrics_address_fails_but_leaves_marking_in_place() {
    let Some((lab, _files, a)) = setup("bad_metrics_address", &["ip", "nft", "nsenter"]) else {
        return;
    };
    let web = probe(VIP, ProbeProto::Tcp, 80, 80, 1);
    let counters = MarkCounters::install(&lab.director, std::slice::from_ref(&web)).unwrap();
    let out = fwmark(
        &lab,
        &[
            "run",
            "--iface",
            &lab.director_if,
            "--config",
            &a,
            "--metrics",
            "192.0.2.254:9469",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--metrics: cannot listen on 192.0.2.254:9469"),
        "{err}"
    );
    assert!(err.contains("marking stays in place"), "{err}");
    send(&lab, &web);
    assert_eq!(counters.read().unwrap()[0].by_mark[&80], 1);
    ok(fwmark(&lab, &["detach", "--iface", &lab.director_if]));
    send(&lab, &web);
    assert_eq!(counters.read().unwrap()[0].by_mark[&0], 1);
}

/// A reload of a million entries runs on the daemon's worker thread: scrapes
/// are answered within a second while it runs, and a SIGTERM sent during it
/// is acted on as soon as it ends, with the new generation recorded (not
/// cut off half-way).
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_long_reload_blocks_neither_scrapes_nor_sigterm() {
    use nix::sys::signal::Signal;
    use std::time::Instant;

    let Some((lab, files, a)) = setup("long_reload", &["ip", "nft", "nsenter"]) else {
        return;
    };
    let big = files.write("big.toml", &fwmark_testlab::ops::config_of(1_000_000, 100));
    let mut daemon = Daemon::run_on(
        &lab,
        &a,
        &[
            "--no-watch",
            "--keep",
            "--metrics",
            "9469",
            "--max-rules",
            "1000000",
        ],
    )
    .unwrap();
    daemon
        .wait_for_log("serving metrics at", Duration::from_secs(10))
        .unwrap();
    let iface = lab.director_if.clone();
    let generation = |g: u64| format!("fwmark_config_generation{{iface=\"{iface}\"}} {g}\n");
    let reloaded = "is live as generation 2";

    std::fs::rename(&big, &a).unwrap();
    daemon.signal(Signal::SIGHUP).unwrap();
    daemon
        .wait_for_log("SIGHUP: reloading", Duration::from_secs(10))
        .unwrap();

    // Scrapes while the reload runs: answered at once, from generation 1.
    let scrape = || {
        let started = Instant::now();
        let body = get_metrics(&lab.director, "127.0.0.1:9469").unwrap();
        (started.elapsed(), body)
    };
    let mut during = 0;
    while during < 3 {
        let (took, body) = scrape();
        if daemon.stderr_so_far().contains(reloaded) {
            break;
        }
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(took < Duration::from_secs(1), "a scrape took {took:?}");
        assert!(body.contains(&generation(1)), "{body}");
        eprintln!("scrape during the reload: {took:?}");
        during += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        during,
        3,
        "the reload ended before three scrapes (too fast to test?):\n{}",
        daemon.stderr_so_far()
    );

    daemon.signal(Signal::SIGTERM).unwrap();
    assert!(
        !daemon.stderr_so_far().contains(reloaded),
        "the reload ended before SIGTERM was sent"
    );
    // Still answered after SIGTERM, until the reload ends.
    let (took, body) = scrape();
    if !daemon.stderr_so_far().contains(reloaded) {
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(took < Duration::from_secs(1), "a scrape took {took:?}");
    }

    daemon
        .wait_for_log(reloaded, Duration::from_secs(600))
        .unwrap();
    let live_at = Instant::now();
    daemon
        .wait_for_log("SIGTERM: leaving marking in place", Duration::from_secs(60))
        .unwrap();
    let acted_after = live_at.elapsed();
    let finished = daemon.wait(Duration::from_secs(120)).unwrap();
    assert!(finished.status.success(), "{}", finished.stderr);
    let log = &finished.stderr;
    assert!(
        log.find(reloaded) < log.find("SIGTERM: leaving marking in place"),
        "{log}"
    );
    eprintln!("SIGTERM acted on {acted_after:?} after the reload ended");
    assert!(
        acted_after < Duration::from_secs(10),
        "SIGTERM acted on {acted_after:?} after the reload ended"
    );
    // The new generation is recorded, with nothing left half-way, and its
    // counters were printed on the way out.
    assert!(!fwmark_testlab::ops::pending_exists(&lab));
    let status = status_json(&lab);
    assert_eq!(status["config"]["generation"], 2, "{status}");
    assert_eq!(status["services"].as_array().unwrap().len(), 1000);
    assert_eq!(
        fwmark_testlab::daemon::service_total(&finished.stdout, "s999"),
        Some(0)
    );
    ok(fwmark(&lab, &["detach", "--iface", &iface]));
}

/// A stand-in for systemd's notification socket: a unix datagram socket
/// whose path goes to `fwmark run` as NOTIFY_SOCKET.
struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    /// Every message received so far, in order.
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: &std::path::Path) -> NotifySocket {
        let _ = std::fs::remove_file(path);
        let socket = std::os::unix::net::UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        NotifySocket {
            socket,
            seen: Vec::new(),
        }
    }

    /// Receives messages until one has the line `line` (within 30 s);
    /// returns that message.
    fn until(&mut self, line: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut buf = vec![0u8; 65536];
        while std::time::Instant::now() < deadline {
            let Ok(n) = self.socket.recv(&mut buf) else {
                continue;
            };
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.seen.push(msg.clone());
            if msg.lines().any(|l| l == line) {
                return msg;
            }
        }
        panic!("no {line} within 30 s; received: {:?}", self.seen);
    }

    /// What arrived since the last call (waits 100 ms for stragglers).
    fn drain(&mut self) -> Vec<String> {
        let mut buf = vec![0u8; 65536];
        let mut got = Vec::new();
        while let Ok(n) = self.socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        self.seen.extend(got.iter().cloned());
        got
    }
}

/// The `STATUS=` line of a notification.
fn status_of(msg: &str) -> &str {
    msg.lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS= in {msg:?}"))
}

/// systemd's `Type=notify` protocol without systemd: READY=1 comes once
/// the classifier marks under generation 1; SIGHUP brings RELOADING=1 then
/// READY=1 with the new generation live; a failed reload is in STATUS=;
/// SIGTERM brings STOPPING=1; an invalid config at start exits non-zero
/// with the error in STATUS= and never READY=1.
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn systemd_notifications_follow_what_is_live() {
    let Some((lab, files, a)) = setup("systemd_notify", &["ip", "nft", "nsenter"]) else {
        return;
    };
    let iface = lab.director_if.clone();
    let web = |mark, n| probe(VIP, ProbeProto::Tcp, 80, mark, n);
    let counters = MarkCounters::install_with_marks(&lab.director, &[web(80, 0)], &[81]).unwrap();
    let mut sock = NotifySocket::bind(&files.0.join("notify.sock"));
    let mut cmd = lab.director.command(fwmark_testlab::daemon::fwmark_bin());
    cmd.args(["run", "--iface", &iface, "--config", &a, "--no-watch"])
        .env("NOTIFY_SOCKET", files.0.join("notify.sock"));
    let daemon = Daemon::spawn(cmd).unwrap();

    let ready = sock.until("READY=1");
    // At READY=1, generation 1 is live and marks.
    assert_eq!(status_json(&lab)["config"]["generation"], 1);
    send(&lab, &web(80, 1));
    assert_eq!(counters.read().unwrap()[0].by_mark[&80], 1);
    let status = status_of(&ready);
    assert!(
        status.starts_with(&format!("marking on {iface}: generation 1, 2 services,")),
        "{status}"
    );
    assert!(status.contains("exact"), "{status}");
    assert!(
        sock.seen[..sock.seen.len() - 1]
            .iter()
            .all(|m| !m.contains("READY=1")),
        "{:?}",
        sock.seen
    );

    // SIGHUP with a changed config: RELOADING=1, then READY=1 with
    // generation 2 live.
    files.write("a.toml", &config(81));
    daemon.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    let reloading = sock.until("RELOADING=1");
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading}"
    );
    let ready = sock.until("READY=1");
    assert_eq!(status_json(&lab)["config"]["generation"], 2);
    send(&lab, &web(80, 1));
    assert_eq!(counters.read().unwrap()[0].by_mark[&81], 1);
    assert!(
        status_of(&ready).starts_with(&format!("marking on {iface}: generation 2,")),
        "{ready}"
    );

    // A reload that fails: READY=1 again, generation 2 stays, the error is
    // in the status line.
    files.write("a.toml", "[[service]]\nname = \"web\"\n");
    daemon.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    sock.until("RELOADING=1");
    let ready = sock.until("READY=1");
    let status = status_of(&ready);
    assert!(
        status.contains("generation 2,") && status.contains("last reload failed"),
        "{status}"
    );
    assert!(status.contains("a.toml"), "{status}");
    assert_eq!(status_json(&lab)["config"]["generation"], 2);

    // SIGTERM: STOPPING=1, and a clean exit.
    daemon.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    sock.until("STOPPING=1");
    let mut daemon = daemon;
    let finished = daemon.wait(Duration::from_secs(20)).unwrap();
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(ingress(&lab).is_empty());

    // An invalid config at start: exit status 78 (EX_CONFIG, which the unit
    // does not restart on), the error on stderr and in STATUS=, no READY=1.
    sock.drain();
    let out = lab
        .director
        .command(fwmark_testlab::daemon::fwmark_bin())
        .args(["run", "--iface", &iface, "--config", &a])
        .env("NOTIFY_SOCKET", files.0.join("notify.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("a.toml"), "{stderr}");
    let msgs = sock.drain();
    assert!(msgs.iter().all(|m| !m.contains("READY=1")), "{msgs:?}");
    let failed = msgs
        .iter()
        .find_map(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("STATUS="))
                .filter(|s| s.contains("failed"))
        })
        .unwrap_or_else(|| panic!("no STATUS= with the error: {msgs:?}"));
    assert!(
        failed.starts_with(&format!("fwmark run on {iface} failed: ")) && failed.contains("a.toml"),
        "{failed}"
    );
    assert!(ingress(&lab).is_empty());
}
