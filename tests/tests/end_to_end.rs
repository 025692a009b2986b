//! End to end: `fwmark run` with fwmark.example.toml on the director side of a
//! veth pair between two network namespaces; real TCP connection attempts and
//! UDP datagrams (IPv4 and IPv6) from the client; nftables counters in the
//! director's prerouting report the mark every packet arrived with.

use fwmark_testlab::{
    daemon::{Daemon, exit_globals, service_total},
    example::{self, probe},
    kernel,
    netns::{Lab, ingress_programs},
    nft::{self, MarkCounters, ProbeProto},
};

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn example_config_marks_exactly_its_services_tcx() {
    example_config_marks_exactly_its_services("tcx");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn example_config_marks_exactly_its_services_netlink() {
    example_config_marks_exactly_its_services("netlink");
}

fn example_config_marks_exactly_its_services(mode: &str) {
    let name = format!("example_config_marks_exactly_its_services_{mode}");
    if !kernel::available(&name, &["ip", "nft", "tc"]) {
        return;
    }
    let probes = example::probes();
    let lab = Lab::new(&example::vips(&probes)).expect("create namespaces");
    let counters = MarkCounters::install(&lab.director, &probes).expect("install nft counters");
    let config = example::config_path();
    let daemon = Daemon::run_on(&lab, config.to_str().unwrap(), &["--attach", mode])
        .expect("fwmark run attaches");
    assert_eq!(
        ingress_programs(&lab.director, &lab.director_if).unwrap(),
        vec![format!("{mode}:fwmark")],
        "exactly one fwmark attachment while it runs"
    );

    lab.client
        .run(|| probes.iter().try_for_each(nft::send))
        .unwrap()
        .expect("send probes");

    let observed = counters.read().expect("read nft counters");
    let mut failures = Vec::new();
    for (p, o) in probes.iter().zip(&observed) {
        let right = o.by_mark.get(&p.expect_mark).copied().unwrap_or(0);
        if right != u64::from(p.count) || o.total() != u64::from(p.count) {
            failures.push(format!(
                "{p}: sent {} expecting mark {:#x}, saw {:?} (other marks: {})",
                p.count, p.expect_mark, o.by_mark, o.other
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "wrong marks at the director:\n{}\n\nfwmark log:\n{}\nnft:\n{}",
        failures.join("\n"),
        daemon.stderr_so_far(),
        nft::dump(&lab.director)
    );

    let finished = daemon.stop().expect("fwmark stops on SIGTERM");
    assert!(
        finished.status.success(),
        "fwmark exited with {}: {}",
        finished.status,
        finished.stderr
    );
    let logged = if mode == "tcx" {
        "via tcx"
    } else {
        "via netlink clsact"
    };
    assert!(finished.stderr.contains(logged), "{}", finished.stderr);
    assert_eq!(
        ingress_programs(&lab.director, &lab.director_if).unwrap(),
        Vec::<String>::new(),
        "nothing left attached after exit"
    );

    // fwmark's own counters agree with what the director saw.
    let marked: u64 = probes
        .iter()
        .filter(|p| p.expect_mark != 0)
        .map(|p| u64::from(p.count))
        .sum();
    let globals = exit_globals(&finished.stdout).expect("global counters line");
    assert_eq!(globals["marked"], marked, "{}", finished.stdout);
    for (service, mark) in [("web", 80), ("ftp", 21), ("dns", 53), ("web6", 86)] {
        let sent: u64 = probes
            .iter()
            .filter(|p| p.expect_mark == mark)
            .map(|p| u64::from(p.count))
            .sum();
        assert_eq!(
            service_total(&finished.stdout, service),
            Some(sent),
            "{service}:\n{}",
            finished.stdout
        );
    }

    // Detached on exit: the same traffic now arrives unmarked.
    let web = probe("192.0.2.10", ProbeProto::Tcp, 80, 80, 2);
    lab.client.run(|| nft::send(&web)).unwrap().unwrap();
    let after = counters.read().unwrap();
    assert_eq!(after[0].by_mark.get(&0).copied(), Some(2), "{:?}", after[0]);
    assert_eq!(
        after[0].by_mark.get(&80).copied(),
        Some(3),
        "{:?}",
        after[0]
    );
}
