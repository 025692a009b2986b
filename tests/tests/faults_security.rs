//! Privileges and exposure, in the real kernel between two namespaces:
//! bpffs missing (the host's used; without `CAP_SYS_ADMIN` and the
//! host's out of reach, the command to run), pins, state and locks closed to other users, a
//! bare `--metrics` port on loopback only, and a config others can write
//! warned about.

use std::time::Duration;

use fwmark_testlab::{
    daemon::{DOCUMENTED_CAPS, Daemon, as_nobody, fwmark_bin},
    faults::{setup, web_counters, web_mark},
    netns::Lab,
    ops::{
        apply, fwmark, get_metrics, ingress, ok, ok_with_stderr, pin_dir, status_json, stop_ok,
        web_dns_config as config,
    },
};

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

/// A mount namespace without bpffs (as under `ip netns exec`): fwmark
/// pins in the host's, reached through an ancestor's root, and mounts
/// nothing.
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn missing_bpffs_pins_in_the_hosts() {
    let Some((lab, _files, a)) = setup(
        "missing_bpffs_pins_in_the_hosts",
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
    assert!(log.contains("pinning in the host's bpffs"), "{log}");
    assert!(!log.contains("mounted bpffs"), "{log}");
    assert_eq!(web_mark(&lab, &counters), 80);
    // Nothing mounted in its mount namespace; the pins are the host's.
    let root = format!("/proc/{}/root/sys/fs/bpf", daemon.pid());
    assert_ne!(fs_type(&root), "bpf_fs");
    assert!(pin_dir(&lab).join("ACTIVE").exists());
    assert_eq!(fs_type("/sys/fs/bpf"), "bpf_fs");
    stop_ok(daemon);
    assert_eq!(web_mark(&lab, &counters), 0);
    assert!(!pin_dir(&lab).exists());
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
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
#[ignore = "needs root: `cargo xtask test` runs it"]
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
        "EXACT4",
        "EXACT",
        "RANGE4",
        "RANGE6",
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
#[ignore = "needs root: `cargo xtask test` runs it"]
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
#[ignore = "needs root: `cargo xtask test` runs it"]
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
