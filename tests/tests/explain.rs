//! `fwmark explain`: the binary's account of one packet, from the reference
//! model (no kernel, no root).

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use fwmark_testlab::{
    daemon::{fwmark_bin, fwmark_unprivileged},
    kernel,
    ops::TempDir,
};

fn example_config() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fwmark.example.toml")
        .display()
        .to_string()
}

fn fwmark(args: &[&str]) -> Output {
    Command::new(fwmark_bin())
        .args(args)
        .output()
        .expect("run fwmark")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn explain_ok(args: &[&str]) -> String {
    let out = fwmark(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    stdout(&out)
}

/// `text` written as `name` in a directory of the test's own, which is
/// removed when the returned guard drops (also when the test fails); and the
/// file's path.
fn temp_config(name: &str, text: &str) -> (TempDir, String) {
    TempDir::with_file("explain", name, text)
}

const PREFIXES: &str = r#"
[[service]]
name = "block"
vip = "198.51.100.0/24"
proto = "tcp"
mark = 1

[[service]]
name = "block-web"
vip = "198.51.100.0/24"
proto = "tcp"
ports = [80]
mark = 2

[[service]]
name = "bit"
vip = "198.51.100.7"
proto = "udp"
ports = ["5000-5010"]
mark = 0x4000
mask = 0x4000

[[service]]
name = "v6-all"
vip = "2001:db8:1::/48"
proto = ["udp", "sctp"]
mark = 7
"#;

#[test]
fn a_hit_names_the_stage_service_line_and_mark() {
    let config = example_config();
    let out = explain_ok(&["explain", "--config", &config, "tcp", "192.0.2.10:443"]);
    assert!(
        out.contains("IPv4 at byte 14, header 20 bytes, dst 192.0.2.10, tcp"),
        "{out}"
    );
    assert!(
        out.contains("TCP at byte 34, destination port 443"),
        "{out}"
    );
    assert!(
        out.contains("lookup key: IPv4 192.0.2.10 tcp port 443"),
        "{out}"
    );
    assert!(
        out.contains("match: stage 1 (exact address, exact port)"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "service \"web\" ({config} line 21): 192.0.2.10 tcp port 443"
        )),
        "{out}"
    );
    assert!(
        out.contains("mark: (0x0 & !0xffffffff) | (0x50 & 0xffffffff) = 0x50"),
        "{out}"
    );
    assert!(out.contains("counters: seen, marked\n"), "{out}");
    // One word or two, IPv6 in brackets, behind two VLAN tags.
    let out = explain_ok(&[
        "explain",
        "--config",
        &config,
        "--vlan",
        "100",
        "--vlan",
        "200",
        "tcp [2001:db8::10]:80",
    ]);
    assert!(out.contains("VLAN tag 0x8100 (802.1Q), id 200"), "{out}");
    assert!(out.contains("service \"web6\""), "{out}");
    assert!(out.contains("= 0x56"), "{out}");
}

#[test]
fn a_miss_says_which_entries_were_close_and_why() {
    let out = explain_ok(&[
        "explain",
        "--config",
        &example_config(),
        "--mark",
        "0x1234",
        "tcp",
        "192.0.2.10:22",
    ]);
    assert!(
        out.contains("no match: no entry covers this key; mark stays 0x1234"),
        "{out}"
    );
    assert!(
        out.contains("192.0.2.10 tcp port 80 (port 22 is not in 80)"),
        "{out}"
    );
    assert!(out.contains("counters: seen, no_match\n"), "{out}");
    let out = explain_ok(&[
        "explain",
        "--config",
        &example_config(),
        "udp",
        "192.0.2.10:80",
    ]);
    assert!(out.contains("(the packet is udp)"), "{out}");
}

#[test]
fn prefixes_later_fragments_and_masks() {
    let (_dir, config) = temp_config("prefixes.toml", PREFIXES);
    let out = explain_ok(&["explain", "-c", &config, "tcp", "198.51.100.9:80"]);
    assert!(
        out.contains("match: stage 3 (longest prefix, port entry)"),
        "{out}"
    );
    assert!(out.contains("service \"block-web\""), "{out}");
    assert!(out.contains("also matching, lower precedence:"), "{out}");
    assert!(
        out.contains("stage 3 (longest prefix, every-port entry): service \"block\""),
        "{out}"
    );
    // A later fragment is looked up without a port: the every-port entry.
    let out = explain_ok(&[
        "explain",
        "-c",
        &config,
        "--later-fragment",
        "tcp",
        "198.51.100.9",
    ]);
    assert!(out.contains("fragment offset 1480 bytes"), "{out}");
    assert!(
        out.contains("lookup key: IPv4 198.51.100.9 tcp (later fragment: no port)"),
        "{out}"
    );
    assert!(out.contains("service \"block\""), "{out}");
    assert!(
        out.contains("counters: seen, marked, later_fragment"),
        "{out}"
    );
    let out = explain_ok(&[
        "explain",
        "-c",
        &config,
        "--later-fragment",
        "udp",
        "[2001:db8:1::5]",
    ]);
    assert!(out.contains("IPv6 fragment header at byte 54"), "{out}");
    assert!(out.contains("service \"v6-all\""), "{out}");
    // The mask keeps the other bits.
    let out = explain_ok(&[
        "explain",
        "-c",
        &config,
        "--mark",
        "0x1234",
        "udp",
        "198.51.100.7:5010",
    ]);
    assert!(
        out.contains("mark: (0x1234 & !0x4000) | (0x4000 & 0x4000) = 0x5234"),
        "{out}"
    );
}

#[test]
fn hex_frames_parse_as_the_classifier_parses_them() {
    let config = example_config();
    let out = explain_ok(&["explain", "--config", &config, "tcp", "192.0.2.10:80"]);
    let hex = out
        .lines()
        .find_map(|l| l.strip_prefix("frame: 70 bytes: "))
        .expect("the frame's hex")
        .to_string();
    // The same frame as hex, with --hex and recognised by its form.
    for args in [vec!["--hex", hex.as_str()], vec![hex.as_str()]] {
        let mut all = vec!["explain", "--config", config.as_str()];
        all.extend(args);
        let out = explain_ok(&all);
        assert!(out.contains("service \"web\""), "{out}");
    }
    // Cut inside the TCP header: malformed, never marked.
    let cut = &hex[..2 * 50];
    let out = explain_ok(&["explain", "--config", &config, "--hex", cut]);
    assert!(
        out.contains("malformed: truncated TCP header: it needs bytes 34..54 but the frame has 50"),
        "{out}"
    );
    assert!(out.contains("counters: seen, malformed"), "{out}");
    // ARP is not IP.
    let arp = format!("{}0806{}", &hex[..24], "00".repeat(28));
    let out = explain_ok(&["explain", "--config", &config, "--hex", &arp]);
    assert!(
        out.contains("ethertype 0x0806 is neither IPv4 nor IPv6"),
        "{out}"
    );
    assert!(out.contains("counters: seen, non_ip"), "{out}");
}

#[test]
fn bad_packets_and_configs_are_one_clear_error() {
    let config = example_config();
    for (args, want) in [
        (vec!["tcp", "192.0.2.10"], "tcp needs a destination port"),
        (vec!["tcp", "192.0.2.300:80"], "is not an IP address"),
        (
            vec!["bogus", "192.0.2.10:80"],
            "\"bogus\" is not a protocol",
        ),
        (vec!["--hex", "0011zz"], "'z' is not a hex digit"),
        (vec!["icmp", "192.0.2.10:80"], "icmp (1) has no ports"),
        (vec![], "no packet"),
    ] {
        let mut all = vec!["explain", "--config", config.as_str()];
        all.extend(args.iter().copied());
        let out = fwmark(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let (_dir, bad) = temp_config(
        "bad.toml",
        "[[service]]\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [0]\nmark = 1\n",
    );
    let out = fwmark(&["explain", "--config", &bad, "tcp", "192.0.2.10:80"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("bad.toml:4:9: service[1].ports"),
        "{}",
        stderr(&out)
    );
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn explain_needs_no_privileges() {
    if !kernel::available("explain_needs_no_privileges", &["setpriv"]) {
        return;
    }
    let (_dir, config) = temp_config("unprivileged.toml", PREFIXES);
    let out = fwmark_unprivileged(&["explain", "--config", &config, "tcp", "198.51.100.9:80"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("service \"block-web\""),
        "{}",
        stdout(&out)
    );
}
