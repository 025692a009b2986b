//! fwmark beside other users of the ingress hook and of the mark, in the
//! real kernel between two namespaces: foreign tcx programs and tc filters
//! before and after fwmark (they keep running, those after it see its
//! mark, netlink takes a free priority), and other mark writers (iptables,
//! ip6tables, nftables, keepalived's IPVS table) named at run and apply;
//! fwmark's own rtnetlink requests against filters added with `tc`.

use fwmark_testlab::{
    daemon::Daemon,
    faults::{setup, state_json, web_counters, web_mark},
    foreign::{Foreign, Hook},
    netns::Lab,
    ops::{apply, ingress, ok, stop_ok, web_dns_config as config},
};

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
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
#[ignore = "needs root: `cargo xtask test` runs it"]
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
#[ignore = "needs root: `cargo xtask test` runs it"]
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

/// The rtnetlink requests on their own, against filters the test lab adds
/// with `tc`: the dump gives each filter's priority, chain, kind and bpf
/// name; a delete by priority and handle removes one element, and a second
/// one reports it gone.
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
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
