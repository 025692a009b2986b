//! The `fwmark` binary's command line: `check`, and the one-line errors of
//! `run` (missing config, missing interface, not root).

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use fwmark_testlab::{
    daemon::{fwmark_bin, fwmark_unprivileged},
    kernel,
    netns::Netns,
    ops::TempDir,
    tun::Tun,
};

fn example_config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fwmark.example.toml")
}

fn fwmark(args: &[&str]) -> Output {
    Command::new(fwmark_bin())
        .args(args)
        .output()
        .expect("run fwmark")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `text` written as `name` in a directory of the test's own, which is
/// removed when the returned guard drops (also when the test fails); and the
/// file's path.
fn temp_config(name: &str, text: &str) -> (TempDir, String) {
    TempDir::with_file("cli", name, text)
}

#[test]
fn check_accepts_the_example() {
    let out = fwmark(&["check", "--config", example_config().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("OK: 4 services, 7 rules, 6 exact + 1 range + 0 prefix entries"),
        "{stdout}"
    );
}

#[test]
fn check_rejects_a_bad_config_with_file_line_and_field() {
    let (_dir, path) = temp_config(
        "bad.toml",
        "[[service]]\nname = \"web\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [80, 0]\nmark = 80\n",
    );
    let out = fwmark(&["check", "--config", &path]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{path}:5:9: service[1].ports: port 0")),
        "{err}"
    );
}

#[test]
fn check_names_both_services_of_a_conflict() {
    let (_dir, path) = temp_config(
        "conflict.toml",
        "[[service]]\nname = \"a\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [80]\nmark = 80\n\
         [[service]]\nname = \"b\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [\"79-81\"]\nmark = 81\n",
    );
    let out = fwmark(&["check", "--config", &path]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("\"a\" (line 1) and \"b\" (line 7)"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn run_without_a_config_says_how_to_make_one() {
    let out = fwmark(&[
        "run",
        "--iface",
        "lo",
        "--config",
        "/nonexistent/fwmark.toml",
    ]);
    // EX_CONFIG: the systemd unit does not restart on it.
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(
        err.contains("cannot read config /nonexistent/fwmark.toml")
            && err.contains("fwmark.example.toml"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn run_needs_an_interface_argument() {
    let out = fwmark(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--iface"), "{}", stderr(&out));
}

/// `fwmark run --iface IFACE` with the example config in `ns` must fail with
/// exit 1 and one line, which it returns.
fn run_fails_in(ns: &Netns, iface: &str) -> String {
    let out = ns
        .command(fwmark_bin())
        .args(["run", "--iface", iface, "--config"])
        .arg(example_config())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn run_on_a_missing_interface_is_one_clear_line() {
    if !kernel::available("run_on_a_missing_interface", &["ip"]) {
        return;
    }
    let ns = Netns::create('m').unwrap();
    let err = run_fails_in(&ns, "nosuch0");
    assert!(
        err.contains("interface \"nosuch0\" does not exist"),
        "{err}"
    );
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn run_as_an_unprivileged_user_says_it_needs_root() {
    if !kernel::available("run_as_an_unprivileged_user", &["setpriv"]) {
        return;
    }
    let example = example_config();
    let out = fwmark_unprivileged(&[
        "run",
        "--iface",
        "lo",
        "--config",
        example.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("fwmark needs root"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn run_refuses_an_interface_it_cannot_parse() {
    if !kernel::available("run_refuses_an_interface_it_cannot_parse", &["ip"]) {
        return;
    }
    let ns = Netns::create('t').unwrap();
    // A tun device (an L3 device fwmark marks) given PPP's link type, which
    // is neither Ethernet nor an L3 type fwmark knows.
    let _ppp = Tun::create_as(&ns, "tun0", 512).unwrap();
    let err = run_fails_in(&ns, "tun0");
    assert!(
        err.contains("\"tun0\" has link type 512 (PPP), which fwmark cannot parse"),
        "{err}"
    );
}

#[test]
fn run_rejects_an_unknown_attach_mode() {
    let out = fwmark(&["run", "--iface", "lo", "--attach", "xdp"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("possible values: auto, tcx, netlink"), "{err}");
}

#[test]
fn completions_and_man_page_come_from_the_cli() {
    for shell in ["bash", "zsh", "fish"] {
        let out = fwmark(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("apply") && text.contains("dry-run"),
            "{shell}: {text}"
        );
    }
    let out = fwmark(&["man"]);
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains(".TH fwmark 8"), "{page}");
    assert!(page.contains("detach"), "{page}");
}
