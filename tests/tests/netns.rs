//! fwmark in network namespaces (issue 13, part 1), in the real kernel:
//! started under `ip netns exec` (a private mount namespace with a fresh
//! `/sys`), found from another `ip netns exec` and from `nsenter --net`,
//! marking on after `kill -9`, nothing left after `detach`; two namespaces
//! with same-named interfaces attached at once; the error for an interface
//! of another namespace.

use std::{process::Command, time::Duration};

use fwmark_testlab::{
    daemon::{Daemon, fwmark_bin},
    faults::{setup, web_counters, web_mark},
    netns::{Netns, run_cmd},
    ops::{ok, pin_dir, run_dir, web_dns_config as config},
};

/// `ip netns exec NS fwmark ARGS...`.
fn ip_netns_exec(ns: &Netns, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(fwmark_bin())
        .args(args);
    cmd
}

/// `nsenter --net=/run/netns/NS fwmark ARGS...`.
fn nsenter(ns: &Netns, args: &[&str]) -> Command {
    let mut cmd = ns.command(fwmark_bin());
    cmd.args(args);
    cmd
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ip_netns_exec_run_is_found_everywhere_and_survives_kill() {
    let Some((lab, files, a)) = setup("ip_netns_exec_run", &["ip", "nft", "nsenter"], "a.toml")
    else {
        return;
    };
    let iface = lab.director_if.as_str();
    let counters = web_counters(&lab);
    let daemon = Daemon::spawn(ip_netns_exec(
        &lab.director,
        &[
            "run",
            "--iface",
            iface,
            "--config",
            &a,
            "--keep",
            "--no-watch",
        ],
    ))
    .unwrap();
    let log = daemon.stderr_so_far();
    assert!(log.contains("pinning in the host's bpffs"), "{log}");
    assert!(!log.contains("mounted bpffs"), "{log}");
    // In the host's bpffs and /run, keyed by the namespace.
    assert!(pin_dir(&lab).join("ACTIVE").exists(), "{log}");
    assert!(run_dir(&lab).join("state.json").exists());
    assert_eq!(web_mark(&lab, &counters), 80);

    // status and apply from another `ip netns exec`, and from nsenter.
    for (how, cmd) in [
        (
            "ip netns exec",
            ip_netns_exec(&lab.director, &["status", "--iface", iface]),
        ),
        (
            "nsenter",
            nsenter(&lab.director, &["status", "--iface", iface]),
        ),
        (
            "ip netns exec (all)",
            ip_netns_exec(&lab.director, &["status"]),
        ),
    ] {
        let mut cmd = cmd;
        let out = ok(cmd.output().unwrap());
        assert!(
            out.contains(&format!("interface {iface}:")) && out.contains("generation 1"),
            "{how}: {out}"
        );
    }
    let b = files.write("b.toml", &config(81));
    let out = ok(
        ip_netns_exec(&lab.director, &["apply", "--iface", iface, "--config", &b])
            .output()
            .unwrap(),
    );
    assert!(out.contains("generation 2 is live"), "{out}");
    assert_eq!(web_mark(&lab, &counters), 81);
    let c = files.write("c.toml", &config(82));
    let out = ok(
        nsenter(&lab.director, &["apply", "--iface", iface, "--config", &c])
            .output()
            .unwrap(),
    );
    assert!(out.contains("generation 3 is live"), "{out}");
    assert_eq!(web_mark(&lab, &counters), 82);

    // kill -9: the pins are in the host's bpffs, so marking goes on.
    daemon.kill();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(web_mark(&lab, &counters), 82);
    let out = ok(ip_netns_exec(&lab.director, &["status", "--iface", iface])
        .output()
        .unwrap());
    assert!(out.contains("generation 3"), "{out}");

    // detach from yet another way in: nothing stays.
    let out = ok(ip_netns_exec(&lab.director, &["detach", "--iface", iface])
        .output()
        .unwrap());
    assert!(
        out.contains(&format!("detached fwmark from {iface}")),
        "{out}"
    );
    assert_eq!(web_mark(&lab, &counters), 0);
    let [pins, run] = lab.director.fwmark_dirs(iface);
    for dir in [
        &pins,
        &run,
        &pins.parent().unwrap().to_path_buf(),
        &run.parent().unwrap().to_path_buf(),
    ] {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_clean_exit_leaves_nothing() {
    let Some((lab, _files, a)) = setup("netns_clean_exit", &["ip", "nft", "nsenter"], "a.toml")
    else {
        return;
    };
    let iface = lab.director_if.as_str();
    let daemon = Daemon::spawn(nsenter(
        &lab.director,
        &["run", "--iface", iface, "--config", &a, "--no-watch"],
    ))
    .unwrap();
    assert!(run_dir(&lab).join("daemon.lock").exists());
    daemon.stop().unwrap();
    let [pins, run] = lab.director.fwmark_dirs(iface);
    for dir in [
        &pins,
        &run,
        &pins.parent().unwrap().to_path_buf(),
        &run.parent().unwrap().to_path_buf(),
    ] {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}

/// A second director namespace wired to the lab's client namespace, whose
/// veth end in the director is named `name` (the same name in both).
fn second_director(lab: &fwmark_testlab::netns::Lab, peer: &str, name: &str) -> Netns {
    let ns = Netns::create('e').unwrap();
    run_cmd(Command::new("ip").args([
        "link",
        "add",
        peer,
        "netns",
        &lab.client.name,
        "type",
        "veth",
        "peer",
        "name",
        name,
        "netns",
        &ns.name,
    ]))
    .unwrap();
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", name])
        .unwrap();
    ns.ip(&["addr", "add", "192.0.2.10/32", "dev", name])
        .unwrap();
    ns.ip(&["link", "set", name, "up"]).unwrap();
    ns
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn two_namespaces_with_same_named_interfaces() {
    let Some((lab, files, a)) = setup("netns_same_names", &["ip", "nft", "nsenter"], "a.toml")
    else {
        return;
    };
    // A third namespace whose interface has the director's name.
    let peer = format!("{}p", lab.client.name);
    let other = second_director(&lab, &peer, &lab.director_if);
    let iface = lab.director_if.as_str();
    let b = files.write("b.toml", &config(81));
    let one = Daemon::spawn(ip_netns_exec(
        &lab.director,
        &["run", "--iface", iface, "--config", &a, "--no-watch"],
    ))
    .unwrap();
    let two = Daemon::spawn(ip_netns_exec(
        &other,
        &["run", "--iface", iface, "--config", &b, "--no-watch"],
    ));
    let two = match two {
        Ok(two) => two,
        Err(e) => {
            one.kill();
            panic!("{e:#}");
        }
    };
    let counters = web_counters(&lab);
    assert_eq!(web_mark(&lab, &counters), 80);
    // Each status shows its own config.
    let json = |ns: &Netns| -> serde_json::Value {
        serde_json::from_str(&ok(nsenter(ns, &["status", "--json"]).output().unwrap())).unwrap()
    };
    let (s1, s2) = (json(&lab.director), json(&other));
    assert_eq!(s1.as_array().unwrap().len(), 1, "{s1}");
    assert_eq!(s2.as_array().unwrap().len(), 1, "{s2}");
    assert!(s1[0]["config"].to_string().contains("a.toml"), "{s1}");
    assert!(s2[0]["config"].to_string().contains("b.toml"), "{s2}");
    // The other director marks by its own config: route the client's
    // traffic for the VIP through the second link.
    lab.client
        .ip(&["addr", "add", "198.51.100.100/24", "dev", &peer])
        .unwrap();
    lab.client.ip(&["link", "set", &peer, "up"]).unwrap();
    lab.client
        .ip(&[
            "route",
            "replace",
            "192.0.2.10/32",
            "dev",
            &peer,
            "src",
            fwmark_testlab::netns::CLIENT_V4,
        ])
        .unwrap();
    let counters2 = fwmark_testlab::nft::MarkCounters::install_with_marks(
        &other,
        &[fwmark_testlab::faults::web()],
        &[80, 81],
    )
    .unwrap();
    assert_eq!(
        fwmark_testlab::faults::mark_of_next(&lab, &counters2, 0, &fwmark_testlab::faults::web()),
        81
    );
    lab.client
        .ip(&["route", "del", "192.0.2.10/32", "dev", &peer])
        .unwrap();
    assert_eq!(web_mark(&lab, &counters), 80);
    one.stop().unwrap();
    two.stop().unwrap();
    drop(counters2);
    fwmark_testlab::netns::remove_fwmark_state(&other, iface);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn an_interface_of_another_namespace_is_named_there() {
    let Some((lab, _files, a)) = setup("netns_wrong_ns", &["ip", "nft", "nsenter"], "a.toml")
    else {
        return;
    };
    let iface = lab.director_if.as_str();
    let daemon = Daemon::spawn(nsenter(
        &lab.director,
        &[
            "run",
            "--iface",
            iface,
            "--config",
            &a,
            "--keep",
            "--no-watch",
        ],
    ))
    .unwrap();
    daemon.stop().unwrap();
    // From the client's namespace, where the interface is not.
    let out = nsenter(&lab.client, &["detach", "--iface", iface])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let inode = lab.director.inode();
    assert!(
        err.contains(&format!("interface {iface} is not in network namespace net:[{}] (ip netns {})", lab.client.inode(), lab.client.name))
            && err.contains(&format!(
                "fwmark is attached to an interface named {iface} in network namespace net:[{inode}] (ip netns {})",
                lab.director.name
            ))
            && !err.contains("os error"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // The attachment is untouched; in its namespace, detach works.
    assert!(pin_dir(&lab).join("ACTIVE").exists());
    let out = ok(nsenter(&lab.director, &["detach", "--iface", iface])
        .output()
        .unwrap());
    assert!(out.contains("detached fwmark from"), "{out}");
}
