//! Operating fwmark in a lab the way an admin does: config files, one-shot
//! commands (`apply`, `status`, `detach`) in the director namespace, the
//! state fwmark keeps for an interface, and traffic from the client.

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::PathBuf,
    process::{Child, Output, Stdio},
    time::Duration,
};

use crate::{
    daemon::{Daemon, Finished, fwmark_bin},
    kernel,
    netns::{Lab, Netns, ingress_programs},
    nft::{self, Probe},
};

/// The web VIP of [`web_dns_config`].
pub const VIP: &str = "192.0.2.10";
/// The DNS VIP of [`web_dns_config`].
pub const DNS_VIP: &str = "192.0.2.53";

/// Web ([`VIP`], TCP and UDP 80 and 443) under `mark`, DNS ([`DNS_VIP`],
/// UDP 53) under 53: the config the live and faults tests start from.
pub fn web_dns_config(mark: u32) -> String {
    format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nproto = [\"tcp\", \"udp\"]\nports = [80, 443]\nmark = {mark}\n\n\
         [[service]]\nname = \"dns\"\nvip = \"{DNS_VIP}\"\nproto = \"udp\"\nports = [53]\nmark = 53\n"
    )
}

/// The common start of a lab test: the kernel gate (test `name` needs
/// `tools`), a lab whose director owns `vips`, a directory for config files,
/// and [`web_dns_config`]`(80)` written there as `file`, whose path it
/// returns. None when the test is skipped.
pub fn setup(
    name: &str,
    tools: &[&str],
    vips: &[&str],
    file: &str,
) -> Option<(Lab, TempDir, String)> {
    if !kernel::available(name, tools) {
        return None;
    }
    let vips: Vec<IpAddr> = vips
        .iter()
        .map(|v| v.parse().expect("a VIP address"))
        .collect();
    let lab = Lab::new(&vips).expect("create namespaces");
    let files = TempDir::new(&lab);
    let path = files.write(file, &web_dns_config(80));
    Some((lab, files, path))
}

/// A directory for a test's config files, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory named after the lab (mode 0755, owned by root).
    pub fn new(lab: &Lab) -> TempDir {
        TempDir::named(&lab.director.name)
    }

    /// The directory `fwmark-NAME` in the temp directory (mode 0755 under
    /// the usual umask); NAME must be unique to the test.
    pub fn named(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("fwmark-{name}"));
        std::fs::create_dir_all(&dir).expect("create the config directory");
        TempDir(dir)
    }

    /// `text` written as `file` in a directory of the test's own,
    /// `fwmark-TAG-PID-STEM` (STEM: `file` without `.toml`): the directory's
    /// guard, and the file's path.
    pub fn with_file(tag: &str, file: &str, text: &str) -> (TempDir, String) {
        let stem = file.trim_end_matches(".toml");
        let dir = TempDir::named(&format!("{tag}-{}-{stem}", std::process::id()));
        let path = dir.write(file, text);
        (dir, path)
    }

    /// Writes `text` to `name` in the directory; returns the path.
    pub fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write a config file");
        path.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `fwmark ARGS…` in the director namespace and waits for it.
pub fn fwmark(lab: &Lab, args: &[&str]) -> Output {
    lab.director
        .command(fwmark_bin())
        .args(args)
        .output()
        .expect("run fwmark")
}

/// The stdout of a command that must have succeeded.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "fwmark failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `fwmark apply --iface <director side> --config CONFIG`, waited for.
pub fn apply(lab: &Lab, config: &str) -> Output {
    fwmark(
        lab,
        &["apply", "--iface", &lab.director_if, "--config", config],
    )
}

/// [`apply`] started with its output piped (`wait_with_output` collects it).
pub fn spawn_apply(lab: &Lab, config: &str) -> Child {
    lab.director
        .command(fwmark_bin())
        .args(["apply", "--iface", &lab.director_if, "--config", config])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fwmark apply")
}

/// [`ok`] and what the command said on stderr (its warnings):
/// `(stdout, stderr)`.
pub fn ok_with_stderr(out: Output) -> (String, String) {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (ok(out), err)
}

/// Stops `fwmark run` (SIGTERM), which must exit successfully.
pub fn stop_ok(daemon: Daemon) -> Finished {
    let finished = daemon.stop().expect("stop fwmark run");
    assert!(finished.status.success(), "{}", finished.stderr);
    finished
}

/// The programs on the director interface's ingress, in the order they run
/// (see [`ingress_programs`]).
pub fn ingress(lab: &Lab) -> Vec<String> {
    ingress_programs(&lab.director, &lab.director_if).expect("list the ingress programs")
}

/// `GET /metrics` from `addr` inside `ns`: the whole response (status line,
/// headers and body), or why it failed (e.g. the connection was refused).
pub fn get_metrics(ns: &Netns, addr: &str) -> std::io::Result<String> {
    let addr: std::net::SocketAddr = addr.parse().expect("a socket address");
    ns.run(move || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })
    .expect("enter the namespace")
}

/// `fwmark status --iface <director side> --json`.
pub fn status_json(lab: &Lab) -> serde_json::Value {
    let out = ok(fwmark(
        lab,
        &["status", "--iface", &lab.director_if, "--json"],
    ));
    serde_json::from_str(&out).expect("status --json parses")
}

/// Sends a probe's traffic from the client namespace.
pub fn send(lab: &Lab, p: &Probe) {
    lab.client
        .run(|| nft::send(p))
        .expect("enter the client namespace")
        .unwrap_or_else(|e| panic!("sending {p}: {e:#}"));
}

/// The `packets` counter of service `name` in a `status --json` document.
pub fn service_packets(status: &serde_json::Value, name: &str) -> u64 {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name} in {status}"))["packets"]
        .as_u64()
        .unwrap()
}

/// Streams UDP datagrams from the client to `VIP` ports 80 and 443, about
/// 20k a second, until `stop` is set; returns how many went to each port.
pub fn stream_until(lab: &Lab, stop: &std::sync::atomic::AtomicBool) -> [u64; 2] {
    lab.client
        .run(|| {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let mut sent = [0u64; 2];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (i, port) in [80u16, 443].into_iter().enumerate() {
                    if sock.send_to(b"load", (VIP, port)).is_ok() {
                        sent[i] += 1;
                    }
                }
                // Bounded rate: about 20k datagrams per second.
                std::thread::sleep(Duration::from_micros(100));
            }
            sent
        })
        .expect("enter the client namespace")
}

/// fwmark's run directory of the director's interface (state and locks).
pub fn run_dir(lab: &Lab) -> PathBuf {
    let [_, run] = lab.director.fwmark_dirs(&lab.director_if);
    run
}

/// fwmark's pin directory of the director's interface.
pub fn pin_dir(lab: &Lab) -> PathBuf {
    let [pins, _] = lab.director.fwmark_dirs(&lab.director_if);
    pins
}

/// The state file's text (`state.json`), if there is one.
pub fn state_text(lab: &Lab) -> Option<String> {
    std::fs::read_to_string(run_dir(lab).join("state.json")).ok()
}

/// Whether an interrupted change left `state.pending.json`.
pub fn pending_exists(lab: &Lab) -> bool {
    run_dir(lab).join("state.pending.json").exists()
}

/// The i-th of `n` addresses of a family: 198.18.0.0/15 for IPv4,
/// 2001:db8:f00::/48 for IPv6.
pub fn nth_addr(v6: bool, i: usize) -> IpAddr {
    if v6 {
        IpAddr::V6((0x2001_0db8_0f00_0000_0000_0000_0000_0000u128 + i as u128).into())
    } else {
        IpAddr::V4((0xc612_0000u32 + i as u32).into())
    }
}

/// A config of `n` TCP port-80 entries: services of up to 1,000 VIPs each.
pub fn config_of(n: usize, mark_base: u32) -> String {
    let mut s = String::new();
    let mut i = 0;
    let mut service = 0;
    while i < n {
        let k = (n - i).min(1000);
        let vips: Vec<String> = (i..i + k)
            .map(|j| format!("\"{}\"", nth_addr(false, j)))
            .collect();
        let _ = writeln!(
            s,
            "[[service]]\nname = \"s{service}\"\nvip = [{}]\nproto = \"tcp\"\nports = [80]\nmark = {}\n",
            vips.join(", "),
            mark_base + service as u32
        );
        i += k;
        service += 1;
    }
    s
}
