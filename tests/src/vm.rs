//! The IPVS scenario that `cargo xtask vm-test` runs inside a guest booted
//! from one of Debian's distribution kernels (5.10, 6.1, 6.12, with IPVS as
//! modules), where the guest's own network namespace is the director.
//!
//! ```text
//!  client ns                 director (guest root ns)             rs1 / rs2 ns
//!  10.0.1.11-40/24   vmc0 --- vmd0  fwmark here, VIPs on lo, IPVS   vmr1 --- eth0 10.0.2.2 / 10.0.3.2
//!  fd00:1::11-40/64          10.0.1.1, fd00:1::1              vmr2 --- eth0 fd00:2::2 / fd00:3::2
//! ```
//!
//! IPVS serves only fwmark services (NAT forwarding, `-m`), made with
//! `ipvsadm` to match `fwmark.example.toml`; the real servers answer every
//! TCP connection and UDP datagram with their own name, so a probe knows
//! where IPVS sent it. Every step checks the answer and IPVS's own counters.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use fwmark::mode::AttachMode;
use socket2::{Domain, Protocol, Socket, Type};

/// Where the guest image puts the tools (the xtask copies them there).
pub const IP: &str = "/usr/sbin/ip";
pub const IPVSADM: &str = "/usr/sbin/ipvsadm";
pub const KEEPALIVED: &str = "/usr/sbin/keepalived";
pub const TC: &str = "/usr/sbin/tc";

/// The director's client-facing interface, where fwmark attaches.
const IFACE: &str = "vmd0";
/// How long a probe waits for a connection or an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The services of `fwmark.example.toml` that the scenario relies on; checked
/// against the file first, so a changed example fails loudly here.
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const FTP_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 21);
const DNS_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
const WEB6_VIP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
/// The mark that `fwmark apply` moves HTTPS to, served by rs2 alone.
const MOVED_MARK: u32 = 90;

/// An IPVS fwmark service: its mark and whether it is the IPv6 one.
pub type Fwm = (u32, bool);

/// Splits an `ipvsadm -L -n` service line `FWM  80 [IPv6] rest...`.
fn fwm_line<'a>(words: &'a [&'a str]) -> Result<Option<(Fwm, &'a [&'a str])>> {
    let ["FWM", mark, rest @ ..] = words else {
        return Ok(None);
    };
    let mark: u32 = mark.parse().with_context(|| format!("mark in {words:?}"))?;
    Ok(Some(match rest {
        ["IPv6", rest @ ..] => ((mark, true), rest),
        rest => ((mark, false), rest),
    }))
}

/// Live connections per fwmark service and real server, from `ipvsadm -L
/// -n` (`-> addr:port Masq weight ActiveConn InActConn`): the kernel's own
/// per-destination counters, current at every call. Connections stay
/// counted (TIME_WAIT, UDP timeout) far longer than the scenario runs.
pub fn parse_ipvs_conns(text: &str) -> Result<BTreeMap<Fwm, BTreeMap<String, u64>>> {
    let mut out: BTreeMap<Fwm, BTreeMap<String, u64>> = BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some((key, _)) = fwm_line(&words)? {
            out.entry(key).or_default();
            current = Some(key);
            continue;
        }
        match words.as_slice() {
            ["->", "RemoteAddress:Port", ..] => {}
            // A real server of the current fwmark service (other services'
            // are skipped).
            ["->", server, _forward, _weight, active, inactive] => {
                let Some(key) = current else { continue };
                let n = |w: &str| {
                    w.parse::<u64>()
                        .with_context(|| format!("counts in {line:?}"))
                };
                let total = n(active)? + n(inactive)?;
                out.get_mut(&key)
                    .expect("current service")
                    .insert((*server).to_string(), total);
            }
            [_proto, ..] if !line.starts_with(' ') => current = None,
            _ => {}
        }
    }
    Ok(out)
}

/// Total connections each fwmark service has scheduled, from `ipvsadm -L -n
/// --stats --exact`. On 6.1 these are refreshed by IPVS's rate estimator
/// every 2 s, so they lag; the scenario checks them once, at the end.
pub fn parse_ipvs_stats(text: &str) -> Result<BTreeMap<Fwm, u64>> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some((key, rest)) = fwm_line(&words)? {
            let conns = rest
                .first()
                .and_then(|w| w.parse().ok())
                .with_context(|| format!("conns in {line:?}"))?;
            out.insert(key, conns);
        }
    }
    Ok(out)
}

/// Runs a command, failing with its stderr when it fails; returns stdout.
fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot start {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<()> {
    sh(IP, args).map(drop)
}

fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// `ip -n NS -batch -` with `commands` on stdin.
fn ip_batch(ns: &str, commands: &str) -> Result<()> {
    crate::netns::pipe_into(Command::new(IP).args(["-n", ns, "-batch", "-"]), commands).map(drop)
}

fn ipvsadm(args: &[&str]) -> Result<()> {
    sh(IPVSADM, args).map(drop)
}

/// A probe's outcome: which real server answered (and what it said), or why
/// nothing did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Server(String),
    Refused,
    TimedOut,
    Other(String),
}

impl Answer {
    fn server(&self) -> Option<&str> {
        match self {
            Answer::Server(s) => s.split_whitespace().next(),
            _ => None,
        }
    }
}

fn io_answer(e: std::io::Error) -> Answer {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Answer::Refused,
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Answer::TimedOut,
        _ => Answer::Other(e.to_string()),
    }
}

/// One TCP connection from `src` to `dst` in the client namespace; the
/// answer is the first line the server sends.
fn tcp_probe(src: IpAddr, dst: SocketAddr) -> Result<Answer> {
    crate::netns::run_in("vmclient", move || {
        let attempt = || -> std::io::Result<String> {
            let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
            sock.bind(&SocketAddr::new(src, 0).into())?;
            sock.connect_timeout(&dst.into(), PROBE_TIMEOUT)?;
            sock.set_read_timeout(Some(PROBE_TIMEOUT))?;
            let mut stream: std::net::TcpStream = sock.into();
            let mut buf = String::new();
            stream.read_to_string(&mut buf)?;
            Ok(buf.trim().to_string())
        };
        match attempt() {
            Ok(s) if s.is_empty() => Answer::Other("connection closed without an answer".into()),
            Ok(s) => Answer::Server(s),
            Err(e) => io_answer(e),
        }
    })
}

/// One UDP datagram of `len` bytes from `src` to `dst`, and its answer.
fn udp_probe(src: IpAddr, dst: SocketAddr, len: usize) -> Result<Answer> {
    crate::netns::run_in("vmclient", move || {
        let attempt = || -> std::io::Result<String> {
            let sock = UdpSocket::bind(SocketAddr::new(src, 0))?;
            sock.connect(dst)?;
            sock.set_read_timeout(Some(PROBE_TIMEOUT))?;
            sock.send(&vec![b'x'; len])?;
            let mut buf = [0u8; 256];
            let n = sock.recv(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
        };
        match attempt() {
            Ok(s) => Answer::Server(s),
            Err(e) => io_answer(e),
        }
    })
}

/// Starts the real server `name` in namespace `name`: every TCP port in
/// `tcp_ports` (IPv4 and IPv6) answers `name`, UDP port 53 answers
/// `name <bytes received>`.
fn start_server(name: &'static str, tcp_ports: &[u16]) -> Result<()> {
    let ports = tcp_ports.to_vec();
    let (listeners, udp) = crate::netns::run_in(name, move || -> Result<_> {
        let mut listeners = Vec::new();
        for port in ports {
            // [::] takes IPv4 too (bindv6only is 0 by default).
            listeners.push(
                TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
                    .with_context(|| format!("{name}: listening on tcp port {port}"))?,
            );
        }
        let udp = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 53))
            .with_context(|| format!("{name}: binding udp port 53"))?;
        Ok((listeners, udp))
    })??;
    for listener in listeners {
        std::thread::spawn(move || {
            for mut stream in listener.incoming().map_while(Result::ok) {
                let _ = writeln!(stream, "{name}");
            }
        });
    }
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("{name} {n}").as_bytes(), peer);
        }
    });
    Ok(())
}

/// The namespaces, links, addresses, routes, VIPs and IPVS services.
fn build_topology() -> Result<()> {
    for ns in ["vmclient", "rs1", "rs2"] {
        ip(&["netns", "add", ns])?;
        ip_in(ns, &["link", "set", "lo", "up"])?;
    }
    ip(&["link", "set", "lo", "up"])?;
    // client <-> director
    ip(&[
        "link", "add", IFACE, "type", "veth", "peer", "name", "vmc0", "netns", "vmclient",
    ])?;
    ip(&["addr", "add", "10.0.1.1/24", "dev", IFACE])?;
    ip(&["addr", "add", "fd00:1::1/64", "dev", IFACE, "nodad"])?;
    ip(&["link", "set", IFACE, "up"])?;
    // 60 client addresses in one `ip -batch` (every exec is slow under TCG).
    let batch: String = (11u8..=40)
        .map(|host| {
            format!(
                "addr add {}/24 dev vmc0\naddr add {}/64 dev vmc0 nodad\n",
                client_v4(host),
                client_v6(host)
            )
        })
        .collect();
    ip_batch("vmclient", &batch)?;
    ip_in("vmclient", &["link", "set", "vmc0", "up"])?;
    ip_in("vmclient", &["route", "add", "default", "via", "10.0.1.1"])?;
    ip_in(
        "vmclient",
        &["-6", "route", "add", "default", "via", "fd00:1::1"],
    )?;
    // director <-> real servers
    for (n, rs) in [(2, "rs1"), (3, "rs2")] {
        let dev = format!("vmr{}", n - 1);
        ip(&[
            "link", "add", &dev, "type", "veth", "peer", "name", "eth0", "netns", rs,
        ])?;
        ip(&["addr", "add", &format!("10.0.{n}.1/24"), "dev", &dev])?;
        ip(&[
            "addr",
            "add",
            &format!("fd00:{n}::1/64"),
            "dev",
            &dev,
            "nodad",
        ])?;
        ip(&["link", "set", &dev, "up"])?;
        ip_in(
            rs,
            &["addr", "add", &format!("10.0.{n}.2/24"), "dev", "eth0"],
        )?;
        ip_in(
            rs,
            &[
                "addr",
                "add",
                &format!("fd00:{n}::2/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        ip_in(rs, &["link", "set", "eth0", "up"])?;
        ip_in(
            rs,
            &["route", "add", "default", "via", &format!("10.0.{n}.1")],
        )?;
        ip_in(
            rs,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:{n}::1"),
            ],
        )?;
    }
    // The director holds the VIPs and forwards (IPVS NAT).
    for vip in ["192.0.2.10/32", "192.0.2.21/32", "192.0.2.53/32"] {
        ip(&["addr", "add", vip, "dev", "lo"])?;
    }
    ip(&["addr", "add", "2001:db8::10/128", "dev", "lo"])?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;

    // IPVS: fwmark services only, NAT to both real servers (rs2 only for
    // the mark that `apply` moves HTTPS to).
    ipvsadm(&["-C"])?;
    for (mark, persist) in [("80", true), ("21", true), ("53", false)] {
        let mut args = vec!["-A", "-f", mark, "-s", "rr"];
        if persist {
            args.extend(["-p", "300"]);
        }
        ipvsadm(&args)?;
        for rs in ["10.0.2.2", "10.0.3.2"] {
            ipvsadm(&["-a", "-f", mark, "-r", rs, "-m"])?;
        }
    }
    ipvsadm(&["-A", "-f", "86", "-6", "-s", "rr"])?;
    for rs in ["fd00:2::2", "fd00:3::2"] {
        ipvsadm(&["-a", "-f", "86", "-6", "-r", rs, "-m"])?;
    }
    let moved = MOVED_MARK.to_string();
    ipvsadm(&["-A", "-f", &moved, "-s", "rr"])?;
    ipvsadm(&["-a", "-f", &moved, "-r", "10.0.3.2", "-m"])?;
    Ok(())
}

/// IPVS's connection entries whose client is one of `sources` (TCP and UDP:
/// not the persistence templates, protocol `IP`).
fn ipvs_conns_from(sources: &[IpAddr]) -> Result<u64> {
    let text = sh(IPVSADM, &["-L", "-n", "-c"])?;
    let prefixes: Vec<String> = sources
        .iter()
        .map(|a| match a {
            IpAddr::V4(a) => format!("{a}:"),
            IpAddr::V6(a) => format!("[{a}]:"),
        })
        .collect();
    Ok(text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| matches!(w.first(), Some(&"TCP" | &"UDP")))
        .filter_map(|w| w.get(3).copied())
        .filter(|source| prefixes.iter().any(|p| source.starts_with(p.as_str())))
        .count() as u64)
}

/// Live connections per fwmark service (all real servers).
fn ipvs_conns() -> Result<BTreeMap<Fwm, u64>> {
    Ok(parse_ipvs_conns(&sh(IPVSADM, &["-L", "-n"])?)?
        .into_iter()
        .map(|(key, servers)| (key, servers.values().sum()))
        .collect())
}

fn client_v4(host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 1, host))
}

fn client_v6(host: u8) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, u16::from(host)))
}

fn v4(addr: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(addr), port)
}

fn v6(addr: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(addr), port)
}

/// What one probe should reach: the IPVS service (mark, v6) it must go
/// through, or nothing.
struct Probe {
    what: &'static str,
    udp_len: Option<usize>,
    src: IpAddr,
    dst: SocketAddr,
    via: Option<Fwm>,
}

impl Probe {
    fn tcp(what: &'static str, src: IpAddr, dst: SocketAddr, via: Option<Fwm>) -> Self {
        Probe {
            what,
            udp_len: None,
            src,
            dst,
            via,
        }
    }

    fn send(&self) -> Result<Answer> {
        match self.udp_len {
            Some(len) => udp_probe(self.src, self.dst, len),
            None => tcp_probe(self.src, self.dst),
        }
    }
}

/// The probes of "every service reaches a real server": web 80/443, FTP 21
/// and both ends of the passive range, DNS over UDP, IPv6 web; and ports
/// just outside the FTP range, which nothing may take.
fn service_probes(first_host: u8) -> Vec<Probe> {
    let h = first_host;
    vec![
        Probe::tcp(
            "tcp 192.0.2.10:80",
            client_v4(h),
            v4(WEB_VIP, 80),
            Some((80, false)),
        ),
        Probe::tcp(
            "tcp 192.0.2.10:443",
            client_v4(h),
            v4(WEB_VIP, 443),
            Some((80, false)),
        ),
        Probe::tcp(
            "tcp 192.0.2.21:21",
            client_v4(h + 1),
            v4(FTP_VIP, 21),
            Some((21, false)),
        ),
        Probe::tcp(
            "tcp 192.0.2.21:10000",
            client_v4(h + 1),
            v4(FTP_VIP, 10000),
            Some((21, false)),
        ),
        Probe::tcp(
            "tcp 192.0.2.21:20000",
            client_v4(h + 1),
            v4(FTP_VIP, 20000),
            Some((21, false)),
        ),
        Probe::tcp(
            "tcp 192.0.2.21:9999 (outside the range)",
            client_v4(h + 1),
            v4(FTP_VIP, 9999),
            None,
        ),
        Probe::tcp(
            "tcp 192.0.2.21:20001 (outside the range)",
            client_v4(h + 1),
            v4(FTP_VIP, 20001),
            None,
        ),
        Probe {
            what: "udp 192.0.2.53:53",
            udp_len: Some(32),
            src: client_v4(h + 2),
            dst: v4(DNS_VIP, 53),
            via: Some((53, false)),
        },
        Probe::tcp(
            "tcp [2001:db8::10]:80",
            client_v6(h),
            v6(WEB6_VIP, 80),
            Some((86, true)),
        ),
        Probe::tcp(
            "tcp [2001:db8::10]:443",
            client_v6(h),
            v6(WEB6_VIP, 443),
            Some((86, true)),
        ),
    ]
}

/// Connections the scenario has sent through each fwmark service so far;
/// IPVS's own counters must always agree.
#[derive(Default)]
struct Ledger(BTreeMap<Fwm, u64>);

impl Ledger {
    /// Checks IPVS's live connection counts against the ledger.
    fn check_live(&self) -> Result<()> {
        for (key, n) in ipvs_conns()? {
            let want = self.0.get(&key).copied().unwrap_or(0);
            ensure!(
                n == want,
                "IPVS FWM {}{} holds {n} connections, the scenario made {want} through it",
                key.0,
                if key.1 { " IPv6" } else { "" }
            );
        }
        Ok(())
    }

    /// Sends every probe; each must be answered by a real server through
    /// its IPVS service, or, without one, refused; then IPVS's connection
    /// counts must equal the ledger's exactly.
    fn probe(&mut self, probes: &[Probe]) -> Result<()> {
        for p in probes {
            let answer = p.send()?;
            match (p.via, &answer) {
                (Some(svc), Answer::Server(s)) => {
                    println!("vm: ok: {} -> FWM {} -> {s}", p.what, svc.0);
                    *self.0.entry(svc).or_default() += 1;
                }
                (None, Answer::Refused | Answer::TimedOut) => {
                    println!("vm: ok: {} not taken by IPVS ({answer:?})", p.what);
                }
                (Some(svc), _) => {
                    bail!(
                        "{} should reach a real server via FWM {}, got {answer:?}",
                        p.what,
                        svc.0
                    )
                }
                (None, _) => bail!(
                    "{} should not reach any real server, got {answer:?}",
                    p.what
                ),
            }
        }
        self.check_live()?;
        println!(
            "vm: ok: IPVS connection counts equal the probes': {:?}",
            self.0
        );
        Ok(())
    }

    /// One connection through `svc` that the caller made and checked.
    fn add(&mut self, svc: Fwm) {
        *self.0.entry(svc).or_default() += 1;
    }

    /// IPVS's statistics (refreshed every 2 s on 6.1) must come to the same
    /// totals: every connection the scenario made, and nothing else.
    fn check_stats(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(8);
        loop {
            let stats = parse_ipvs_stats(&sh(IPVSADM, &["-L", "-n", "--stats", "--exact"])?)?;
            let want: BTreeMap<Fwm, u64> = stats
                .keys()
                .map(|k| (*k, self.0.get(k).copied().unwrap_or(0)))
                .collect();
            if stats == want {
                println!("vm: ok: ipvsadm --stats totals equal the scenario's: {want:?}");
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "ipvsadm --stats totals {stats:?}, the scenario made {want:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// `fwmark run` as a child of the scenario.
struct Fwmark {
    bin: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Fwmark {
    fn start(bin: &Path, config: &Path) -> Result<Fwmark> {
        Fwmark::start_with(bin, config, &[])
    }

    /// `fwmark run` with `extra` arguments.
    fn start_with(bin: &Path, config: &Path, extra: &[&str]) -> Result<Fwmark> {
        Fwmark::start_on(bin, IFACE, config, extra)
    }

    /// `fwmark run --iface IFACE` with `extra` arguments.
    fn start_on(bin: &Path, iface: &str, config: &Path, extra: &[&str]) -> Result<Fwmark> {
        let log = if iface == IFACE {
            PathBuf::from("/tmp/fwmark-run.log")
        } else {
            PathBuf::from(format!("/tmp/fwmark-run-{iface}.log"))
        };
        let child = Command::new(bin)
            .args(["run", "--iface", iface, "--keep", "--no-watch", "--config"])
            .arg(config)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .context("starting fwmark run")?;
        let mut me = Fwmark {
            bin: bin.to_path_buf(),
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = me.log_text();
            if let Some(line) = text.lines().find(|l| l.contains("marking on ")) {
                println!("vm: fwmark: {}", line.trim());
                return Ok(me);
            }
            if let Some(status) = me.child.as_mut().expect("child").try_wait()? {
                bail!("fwmark run exited ({status}) before marking:\n{text}");
            }
            ensure!(
                Instant::now() < deadline,
                "fwmark run not ready after 60 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn cmd(&self, args: &[&str]) -> Result<String> {
        sh(self.bin.to_str().context("fwmark path")?, args)
    }

    /// SIGTERM, as systemd stops it; with `--keep` marking stays.
    fn stop(&mut self) -> Result<()> {
        let mut child = self.child.take().context("fwmark already stopped")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let status = child.wait()?;
        ensure!(
            status.success(),
            "fwmark run exited with {status}:\n{}",
            self.log_text()
        );
        Ok(())
    }
}

impl Drop for Fwmark {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Checks the example config still has the services this scenario's IPVS
/// setup assumes, and returns a copy that moves HTTPS on the web VIP to
/// [`MOVED_MARK`].
fn example_and_moved(example: &Path) -> Result<String> {
    let text = std::fs::read_to_string(example)
        .with_context(|| format!("reading {}", example.display()))?;
    let mut doc: toml::Table = text.parse().context("parsing the example config")?;
    let services = doc
        .get_mut("service")
        .and_then(|s| s.as_array_mut())
        .context("example config has no [[service]]")?;
    let expect = [
        ("web", "192.0.2.10", "tcp", "[80, 443]", 80),
        ("ftp", "192.0.2.21", "tcp", "[21, \"10000-20000\"]", 21),
        ("dns", "192.0.2.53", "udp", "[53]", 53),
        ("web6", "2001:db8::10", "tcp", "[80, 443]", 86),
    ];
    for (name, vip, proto, ports, mark) in expect {
        let svc = services
            .iter()
            .filter_map(|s| s.as_table())
            .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(name))
            .with_context(|| {
                format!("example config lost service {name:?}; update tests/src/vm.rs")
            })?;
        let got = (
            svc.get("vip").and_then(|v| v.as_str()),
            svc.get("proto").and_then(|v| v.as_str()),
            svc.get("ports").map(|v| v.to_string()),
            svc.get("mark").and_then(|v| v.as_integer()),
        );
        ensure!(
            got == (Some(vip), Some(proto), Some(ports.to_string()), Some(mark)),
            "example service {name:?} changed ({got:?}); update tests/src/vm.rs"
        );
    }
    for svc in services.iter_mut().filter_map(|s| s.as_table_mut()) {
        if svc.get("name").and_then(|n| n.as_str()) == Some("web") {
            svc.insert(
                "ports".into(),
                toml::Value::Array(vec![toml::Value::Integer(80)]),
            );
        }
    }
    let mut tls = toml::Table::new();
    tls.insert("name".into(), "web-tls".into());
    tls.insert("vip".into(), "192.0.2.10".into());
    tls.insert("proto".into(), "tcp".into());
    tls.insert(
        "ports".into(),
        toml::Value::Array(vec![toml::Value::Integer(443)]),
    );
    tls.insert("mark".into(), toml::Value::Integer(i64::from(MOVED_MARK)));
    services.push(toml::Value::Table(tls));
    Ok(toml::to_string(&doc)?)
}

/// How many BPF programs the kernel lists on [`IFACE`]'s ingress for
/// `mode`: tcx links (queried through aya: the guest's `tc`, from iproute2
/// 6.1, does not show them) or `cls_bpf` filters (`tc filter show`).
fn ingress_bpf(mode: AttachMode) -> Result<usize> {
    use aya::programs::{SchedClassifier, TcAttachType};
    Ok(match mode {
        AttachMode::Tcx => SchedClassifier::query_tcx(IFACE, TcAttachType::Ingress)
            .with_context(|| format!("querying the tcx programs on {IFACE}"))?
            .1
            .len(),
        AttachMode::Netlink => sh(TC, &["filter", "show", "dev", IFACE, "ingress"])?
            .lines()
            // "filter … bpf chain 0" heads each filter's own "… handle …" line.
            .filter(|l| l.contains(" bpf ") && l.contains(" handle "))
            .count(),
    })
}

fn status_json(fwmark: &Fwmark) -> Result<serde_json::Value> {
    let text = fwmark.cmd(&["status", "--iface", IFACE, "--json"])?;
    serde_json::from_str(&text).context("parsing fwmark status --json")
}

/// The whole scenario; any failed check is an error. `mode` is how fwmark
/// must attach on this kernel (tcx from 6.6 on), checked in its log, its
/// status and the kernel's own list.
pub fn scenario(fwmark_bin: &Path, example: &Path, mode: AttachMode) -> Result<()> {
    let started = Instant::now();
    let moved_text = example_and_moved(example)?;
    let moved_path = PathBuf::from("/tmp/fwmark-moved.toml");
    std::fs::write(&moved_path, &moved_text)?;

    build_topology()?;
    let tcp_ports = [21, 80, 443, 9999, 10000, 20000, 20001];
    start_server("rs1", &tcp_ports)?;
    start_server("rs2", &tcp_ports)?;
    println!(
        "vm: topology and IPVS ready ({:.1} s)",
        started.elapsed().as_secs_f64()
    );

    // 1. Without fwmark IPVS takes nothing: the director itself refuses.
    println!("vm: step 1: without fwmark");
    let mut ledger = Ledger::default();
    let unmarked: Vec<Probe> = service_probes(11)
        .into_iter()
        .map(|p| Probe { via: None, ..p })
        .collect();
    ledger.probe(&unmarked)?;

    // 2. With fwmark every service is reached through its FWM service.
    println!("vm: step 2: fwmark run");
    let mut daemon = Fwmark::start(fwmark_bin, example)?;
    let log = daemon.log_text();
    ensure!(
        log.contains(&format!("via {mode} ")),
        "on this kernel fwmark must attach through {mode}:\n{log}"
    );
    let status = status_json(&daemon)?;
    ensure!(
        status["attach"]["mode"] == serde_json::to_value(mode)?,
        "status mode: {}, expected {mode}",
        status["attach"]
    );
    let on_ingress = ingress_bpf(mode)?;
    ensure!(
        on_ingress == 1,
        "the kernel lists {on_ingress} {mode} programs on {IFACE}, expected fwmark's"
    );
    println!(
        "vm: ok: attached through {mode}; status says {}; the kernel lists 1 {mode} program",
        status["attach"]["mode"]
    );
    ledger.probe(&service_probes(12))?;

    // 3. Persistence across the bundle: each client's 80 and 443 land on
    // the same real server; over several clients both servers are used.
    println!("vm: step 3: persistence");
    let mut used = BTreeMap::new();
    for host in 20..28 {
        let a = tcp_probe(client_v4(host), v4(WEB_VIP, 80))?;
        let b = tcp_probe(client_v4(host), v4(WEB_VIP, 443))?;
        let (Some(sa), Some(sb)) = (a.server(), b.server()) else {
            bail!("client 10.0.1.{host}: web probes not answered: {a:?} {b:?}");
        };
        ensure!(
            sa == sb,
            "client 10.0.1.{host}: port 80 went to {sa}, port 443 to {sb}"
        );
        ledger.add((80, false));
        ledger.add((80, false));
        *used.entry(sa.to_string()).or_insert(0) += 1;
    }
    ledger.check_live()?;
    ensure!(
        used.len() == 2,
        "persistence test used only {used:?}; rr over 8 clients must use both"
    );
    println!("vm: ok: 8 clients, 80 and 443 on the same server each; per server {used:?}");

    // 4. A fragmented datagram: only its first fragment carries the port
    // and is marked; reassembly keeps that mark, so IPVS schedules it.
    println!("vm: step 4: fragmented UDP");
    let later_fragments = |d: &Fwmark| -> Result<u64> {
        status_json(d)?["global"]["later_fragment"]
            .as_u64()
            .context("status global.later_fragment")
    };
    let frags_before = later_fragments(&daemon)?;
    let answer = udp_probe(client_v4(30), v4(DNS_VIP, 53), 4000)?;
    let Answer::Server(text) = &answer else {
        bail!("4000-byte datagram to 192.0.2.53:53 not answered: {answer:?}");
    };
    ensure!(
        text.ends_with(" 4000"),
        "server got {text:?}, not the whole 4000 bytes"
    );
    ledger.add((53, false));
    ledger.check_live()?;
    let frags = later_fragments(&daemon)? - frags_before;
    ensure!(
        frags >= 2,
        "fwmark saw {frags} later fragments; the datagram was not fragmented"
    );
    println!("vm: ok: 4000 bytes in 1 + {frags} fragments, reassembled, via FWM 53 to {text}");

    // 5. `fwmark apply` moves HTTPS to another mark; IPVS follows.
    println!("vm: step 5: apply moves 443 to mark {MOVED_MARK}");
    let out = daemon.cmd(&[
        "apply",
        "--iface",
        IFACE,
        "--config",
        moved_path.to_str().expect("utf-8"),
    ])?;
    for line in out.lines() {
        println!("vm: apply: {line}");
    }
    for host in 31..35 {
        let a = tcp_probe(client_v4(host), v4(WEB_VIP, 443))?;
        ensure!(
            a.server() == Some("rs2"),
            "443 after apply should reach rs2 via FWM {MOVED_MARK}: {a:?}"
        );
        ledger.add((MOVED_MARK, false));
    }
    let a = tcp_probe(client_v4(35), v4(WEB_VIP, 80))?;
    ensure!(a.server().is_some(), "80 after apply not answered: {a:?}");
    ledger.add((80, false));
    ledger.check_live()?;
    let status = status_json(&daemon)?;
    ensure!(
        status["config"]["generation"] == 2,
        "generation after apply: {}",
        status["config"]
    );
    println!(
        "vm: ok: new 443 connections went to FWM {MOVED_MARK} (4 on rs2), 80 stayed on FWM 80; generation 2"
    );

    // 6. Stop with --keep: marking stays; `fwmark detach` removes it.
    println!("vm: step 6: stop (--keep), then detach");
    daemon.stop()?;
    let kept = tcp_probe(client_v4(36), v4(WEB_VIP, 80))?;
    ensure!(
        kept.server().is_some(),
        "marking should outlive a --keep run: {kept:?}"
    );
    ledger.add((80, false));
    ledger.check_live()?;
    let kept = ingress_bpf(mode)?;
    ensure!(kept == 1, "--keep left {kept} {mode} programs, expected 1");
    println!("vm: ok: after SIGTERM with --keep, marking continues");
    daemon.cmd(&["detach", "--iface", IFACE])?;
    let left = ingress_bpf(mode)?;
    ensure!(left == 0, "{left} {mode} programs still there after detach");
    let gone = tcp_probe(client_v4(37), v4(WEB_VIP, 80))?;
    ensure!(
        matches!(gone, Answer::Refused | Answer::TimedOut),
        "after detach 80 must no longer reach IPVS: {gone:?}"
    );
    ledger.check_live()?;
    println!("vm: ok: detach removed the {mode} program; traffic unmarked, IPVS idle");

    ledger.check_stats()?;

    // 7. What fwmark knows of IPVS: every finding of `check --ipvs` made
    // by a real misconfiguration (ipvsadm, keepalived) and gone once fixed.
    ipvs_check_step(fwmark_bin, example, &moved_path)?;
    // 8. ICMP errors under schedule_icmp (after the IPVS totals: IPVS
    // counts the connections it schedules for them).
    icmp_errors(fwmark_bin, &moved_text)?;
    // 9. Tunnels: the client reaches the services over ipip and GRE.
    tunnels(fwmark_bin, example)?;
    println!(
        "vm: scenario passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The findings `fwmark check --config CONFIG --ipvs` prints, by kind
/// (the word of each `warning:` line that names it), and whether
/// `--strict` failed.
fn ipvs_findings(fwmark: &Path, config: &Path) -> Result<(Vec<String>, String)> {
    let bin = fwmark.to_str().context("fwmark path")?;
    let config = config.to_str().context("config path")?;
    let text = sh(bin, &["check", "--config", config, "--ipvs"])?;
    let mut kinds: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("warning: "))
        .map(finding_kind)
        .collect();
    kinds.sort();
    // --strict agrees: exit 1 exactly when there is a finding.
    let strict = Command::new(bin)
        .args(["check", "--config", config, "--ipvs", "--strict"])
        .output()?;
    ensure!(
        strict.status.success() == kinds.is_empty(),
        "check --ipvs --strict exited {} with findings {kinds:?}:\n{text}",
        strict.status
    );
    Ok((kinds, text))
}

/// The kind of a finding from its message (the messages are fwmark-core's
/// `ipvs_check::Finding` texts).
fn finding_kind(message: &str) -> String {
    let kind = if message.starts_with("IPVS is not loaded") {
        "ipvs_not_loaded"
    } else if message.contains("but IPVS has no") {
        "no_ipvs_service"
    } else if message.contains("gets no packets from fwmark") {
        "not_marked"
    } else if message.contains("has no real server") {
        "no_destinations"
    } else if message.contains("one IPVS fwmark service receives") {
        "mixed_protocols"
    } else if message.contains("which includes bits") {
        "foreign_bits"
    } else if message.contains("keepalived's fwmark marking") {
        "keepalived_table"
    } else {
        "unknown"
    };
    kind.to_string()
}

/// Expects exactly `want` (finding kinds, sorted) from `check --ipvs`.
fn expect_findings(fwmark: &Path, config: &Path, want: &[&str], why: &str) -> Result<()> {
    let (found, text) = ipvs_findings(fwmark, config)?;
    let kinds: Vec<&str> = found.iter().map(String::as_str).collect();
    ensure!(
        kinds == want,
        "{why}: check --ipvs found {kinds:?}, expected {want:?}:\n{text}"
    );
    println!("vm: ok: {why}: findings {kinds:?}");
    Ok(())
}

/// A copy of the config at `base` with `edit` applied to its `[[service]]`
/// array, written to `path`.
fn config_variant(
    base: &Path,
    path: &str,
    edit: impl FnOnce(&mut Vec<toml::Value>),
) -> Result<PathBuf> {
    let mut doc: toml::Table = std::fs::read_to_string(base)?.parse()?;
    let services = doc
        .get_mut("service")
        .and_then(|s| s.as_array_mut())
        .context("no [[service]]")?;
    edit(services);
    std::fs::write(path, toml::to_string(&doc)?)?;
    Ok(PathBuf::from(path))
}

fn service(name: &str, vip: &str, proto: &str, port: i64, mark: i64) -> toml::Value {
    let mut t = toml::Table::new();
    t.insert("name".into(), name.into());
    t.insert("vip".into(), vip.into());
    t.insert("proto".into(), proto.into());
    t.insert(
        "ports".into(),
        toml::Value::Array(vec![toml::Value::Integer(port)]),
    );
    t.insert("mark".into(), toml::Value::Integer(mark));
    toml::Value::Table(t)
}

/// keepalived (Debian's package) run in the foreground with `config`,
/// checker process only; stopped (SIGTERM, so it removes what it made) on
/// drop.
struct Keepalived {
    child: Option<Child>,
    log: PathBuf,
}

impl Keepalived {
    fn start(name: &str, config: &str) -> Result<Keepalived> {
        let conf = PathBuf::from(format!("/tmp/keepalived-{name}.conf"));
        std::fs::write(&conf, config)?;
        let log = PathBuf::from(format!("/tmp/keepalived-{name}.log"));
        let out = File::create(&log)?;
        let child = Command::new(KEEPALIVED)
            .args(["--dont-fork", "--log-console", "--log-detail", "--check"])
            .arg("--use-file")
            .arg(&conf)
            .args([
                "--pid=/tmp/keepalived.pid",
                "--checkers_pid=/tmp/keepalived-check.pid",
            ])
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting keepalived")?;
        Ok(Keepalived {
            child: Some(child),
            log,
        })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `ready` holds (keepalived has made its IPVS services).
    fn wait(&mut self, what: &str, ready: impl Fn() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ready()? {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().expect("child").try_wait()? {
                bail!(
                    "keepalived exited ({status}) before {what}:\n{}",
                    self.log_text()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "keepalived: no {what} after 30 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM and wait: keepalived removes its IPVS services and nftables
    /// table on the way out.
    fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let status = child.wait()?;
        ensure!(
            status.success(),
            "keepalived exited with {status}:\n{}",
            self.log_text()
        );
        Ok(())
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }
}

/// Whether `ipvsadm -L -n` lists the IPv4 fwmark service `mark`.
fn has_fwm(mark: u32) -> Result<bool> {
    Ok(parse_ipvs_conns(&sh(IPVSADM, &["-L", "-n"])?)?.contains_key(&(mark, false)))
}

/// `GET /metrics` from the daemon.
fn scrape(addr: &str) -> Result<String> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    ensure!(text.starts_with("HTTP/1.1 200"), "metrics: {text}");
    Ok(text)
}

/// The value of the sample of `metric` whose labels contain `labels`.
fn sample(text: &str, metric: &str, labels: &str) -> Option<u64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(labels))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

/// Step 7: `fwmark check --ipvs`, `status` and the metrics against real
/// IPVS, with ipvsadm and Debian's keepalived making each finding.
fn ipvs_check_step(fwmark: &Path, example: &Path, moved: &Path) -> Result<()> {
    println!("vm: step 7: fwmark knows IPVS");
    // The moved config matches build_topology's IPVS exactly.
    expect_findings(fwmark, moved, &[], "matching config and IPVS")?;
    // The example lacks the moved mark 90, which IPVS has.
    expect_findings(
        fwmark,
        example,
        &["not_marked"],
        "IPVS FWM 90 that nothing marks",
    )?;

    // A mark IPVS has no service for, and the service back.
    ipvsadm(&["-D", "-f", "53"])?;
    expect_findings(fwmark, moved, &["no_ipvs_service"], "FWM 53 deleted")?;

    // status and metrics while the dns mark has no IPVS service.
    let metrics_addr = "127.0.0.1:9469";
    let mut daemon = Fwmark::start_with(fwmark, moved, &["--metrics", metrics_addr])?;
    let status = status_json(&daemon)?;
    let services = status["services"].as_array().context("status services")?;
    let by_name = |name: &str| {
        services
            .iter()
            .find(|s| s["name"] == name)
            .with_context(|| format!("status has no service {name}: {status}"))
    };
    ensure!(
        by_name("dns")?["ipvs"] == serde_json::json!([]),
        "dns feeds no IPVS service now: {}",
        by_name("dns")?
    );
    let web = &by_name("web")?["ipvs"][0];
    let conns = ipvs_conns()?;
    ensure!(
        web["fwmark"] == 80 && web["family"] == "ipv4" && web["real_servers"] == 2,
        "web's IPVS service in status: {web}"
    );
    let shown = web["active_conns"].as_u64().context("active_conns")?
        + web["inactive_conns"].as_u64().context("inactive_conns")?;
    ensure!(
        shown == conns[&(80, false)],
        "status shows {shown} connections on FWM 80, ipvsadm -L -n {}",
        conns[&(80, false)]
    );
    ensure!(
        status["ipvs"]["findings"][0]["kind"] == "no_ipvs_service",
        "status findings: {}",
        status["ipvs"]
    );
    let text = daemon.cmd(&["status", "--iface", IFACE])?;
    ensure!(
        text.contains("-> IPVS: no fwmark service for this mark")
            && text.contains("-> IPVS FWM 80 rr: 2 real servers"),
        "status text:\n{text}"
    );
    let m = scrape(metrics_addr)?;
    let present = |m: &str, svc: &str| {
        sample(
            m,
            "fwmark_ipvs_service_present",
            &format!("service=\"{svc}\""),
        )
    };
    ensure!(
        present(&m, "dns") == Some(0) && present(&m, "web") == Some(1),
        "metrics without FWM 53: dns {:?} web {:?}",
        present(&m, "dns"),
        present(&m, "web")
    );
    ensure!(
        sample(&m, "fwmark_ipvs_real_servers", "mark=\"0x50\"") == Some(2),
        "real servers of 0x50: {m}"
    );
    println!(
        "vm: ok: status shows FWM 80 with {shown} connections as ipvsadm does, dns without an IPVS service; metrics present 0/1"
    );

    // keepalived with `virtual_server fwmark 53` makes the missing service.
    let mut keepalived = Keepalived::start(
        "fwm53",
        "virtual_server fwmark 53 {\n  lb_algo rr\n  lb_kind NAT\n\
         real_server 10.0.2.2 53 {\n  }\n  real_server 10.0.3.2 53 {\n  }\n}\n",
    )?;
    keepalived.wait("FWM 53", || has_fwm(53))?;
    expect_findings(
        fwmark,
        moved,
        &[],
        "keepalived's virtual_server fwmark 53 up",
    )?;
    let m = scrape(metrics_addr)?;
    ensure!(
        present(&m, "dns") == Some(1)
            && sample(&m, "fwmark_ipvs_real_servers", "mark=\"0x35\"") == Some(2),
        "metrics with keepalived's FWM 53:\n{m}"
    );
    let dns = &status_json(&daemon)?["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "dns").cloned())
        .context("dns in status")?["ipvs"][0];
    ensure!(
        dns["fwmark"] == 53 && dns["real_servers"] == 2,
        "status of dns with keepalived: {dns}"
    );
    println!("vm: ok: status and metrics follow keepalived's FWM 53 (2 real servers)");
    keepalived.stop()?;
    ensure!(!has_fwm(53)?, "keepalived left FWM 53 behind");
    expect_findings(fwmark, moved, &["no_ipvs_service"], "keepalived stopped")?;
    let m = scrape(metrics_addr)?;
    ensure!(
        present(&m, "dns") == Some(0),
        "metrics after keepalived stopped:\n{m}"
    );
    ipvsadm(&["-A", "-f", "53", "-s", "rr"])?;
    // Without real servers first.
    expect_findings(
        fwmark,
        moved,
        &["no_destinations"],
        "FWM 53 without real servers",
    )?;
    for rs in ["10.0.2.2", "10.0.3.2"] {
        ipvsadm(&["-a", "-f", "53", "-r", rs, "-m"])?;
    }
    expect_findings(fwmark, moved, &[], "FWM 53 restored")?;
    daemon.stop()?;
    daemon.cmd(&["detach", "--iface", IFACE])?;

    // One mark for TCP and UDP.
    let mixed = config_variant(moved, "/tmp/fwmark-mixed.toml", |s| {
        s.push(service("dns-tcp", "192.0.2.53", "tcp", 53, 53));
    })?;
    expect_findings(
        fwmark,
        &mixed,
        &["mixed_protocols"],
        "mark 53 for udp and tcp",
    )?;
    // Bits kube-proxy owns (0x4000), with the IPVS service for the mark.
    let kube = config_variant(moved, "/tmp/fwmark-kube.toml", |s| {
        s.push(service("kube", "192.0.2.99", "tcp", 80, 0x4050));
    })?;
    ipvsadm(&["-A", "-f", &0x4050.to_string(), "-s", "rr"])?;
    ipvsadm(&["-a", "-f", &0x4050.to_string(), "-r", "10.0.2.2", "-m"])?;
    expect_findings(
        fwmark,
        &kube,
        &["foreign_bits"],
        "mark 0x4050 has kube-proxy's bit",
    )?;
    ipvsadm(&["-D", "-f", &0x4050.to_string()])?;
    expect_findings(fwmark, moved, &[], "kube-proxy's bit gone")?;

    // keepalived marking by itself through nftables (`nftables_ipvs`, a
    // virtual server group with an address range): its table is found,
    // and its own fwmark service is one fwmark does not mark for.
    let mut keepalived = Keepalived::start(
        "nft",
        "global_defs {\n  nftables_ipvs\n}\n\
         virtual_server_group RANGE {\n  192.0.2.60-62 80\n}\n\
         virtual_server group RANGE {\n  lb_algo rr\n  lb_kind NAT\n  protocol TCP\n\
         real_server 10.0.2.2 80 {\n  }\n}\n",
    )?;
    let ka_mark = || -> Result<Option<u32>> {
        Ok(parse_ipvs_conns(&sh(IPVSADM, &["-L", "-n"])?)?
            .keys()
            .map(|&(mark, _)| mark)
            .find(|&mark| mark >= 1000))
    };
    keepalived.wait("its nftables fwmark service", || Ok(ka_mark()?.is_some()))?;
    let mark = ka_mark()?.context("keepalived's mark")?;
    let (found, text) = ipvs_findings(fwmark, moved)?;
    ensure!(
        found == ["keepalived_table", "not_marked"] && text.contains("`ip keepalived_ipvs`"),
        "keepalived with nftables_ipvs (FWM {mark}):\n{text}"
    );
    println!(
        "vm: ok: keepalived's nftables table `ip keepalived_ipvs` (its FWM {mark}) is reported"
    );
    keepalived.stop()?;
    expect_findings(fwmark, moved, &[], "keepalived (nftables) stopped")?;
    Ok(())
}

/// Counts ICMP errors arriving in a real server's namespace: ICMP type 3
/// code 4 ("fragmentation needed") and ICMPv6 type 2 ("packet too big"), on
/// raw sockets read by two threads.
struct IcmpCounter {
    v4: std::sync::Arc<std::sync::atomic::AtomicU64>,
    v6: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl IcmpCounter {
    fn start(ns: &'static str) -> Result<IcmpCounter> {
        use std::sync::{Arc, atomic::AtomicU64};
        let (s4, s6) = crate::netns::run_in(ns, || -> std::io::Result<(Socket, Socket)> {
            Ok((
                Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?,
                Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?,
            ))
        })?
        .with_context(|| format!("{ns}: raw ICMP sockets"))?;
        let counter = IcmpCounter {
            v4: Arc::new(AtomicU64::new(0)),
            v6: Arc::new(AtomicU64::new(0)),
        };
        for (sock, count, v6) in [
            (s4, counter.v4.clone(), false),
            (s6, counter.v6.clone(), true),
        ] {
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while let Ok(n) = (&sock).read(&mut buf) {
                    // IPv4 raw sockets get the IP header, IPv6 ones do not.
                    let at = if v6 {
                        0
                    } else {
                        usize::from(buf[0] & 0x0f) * 4
                    };
                    let hit = matches!(
                        (v6, buf.get(at..n.min(at + 2))),
                        (false, Some([3, 4])) | (true, Some([2, _]))
                    );
                    if hit {
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
        Ok(counter)
    }

    fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.v4.load(Relaxed), self.v6.load(Relaxed))
    }
}

/// Frames of a router's ICMP errors about packets the director sent from
/// the web VIPs' port 443 to a client's port `client_port`: "fragmentation
/// needed" (IPv4, quoting 192.0.2.10:443 -> 10.0.1.41) and "packet too big"
/// (IPv6, quoting [2001:db8::10]:443 -> [fd00:1::41]), from routers on the
/// client link, to the director's MAC.
fn router_errors(client_port: u16, director_mac: [u8; 6]) -> Vec<Vec<u8>> {
    use crate::packets::{Frame, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMPV6_PACKET_TOO_BIG, L4};
    let quoted4 = Frame::to(client_v4(41), L4::Tcp(client_port))
        .from(IpAddr::V4(WEB_VIP))
        .from_port(443);
    let quoted6 = Frame::to(client_v6(41), L4::Tcp(client_port))
        .from(IpAddr::V6(WEB6_VIP))
        .from_port(443);
    [
        Frame::icmp_error(
            IpAddr::V4(Ipv4Addr::new(10, 0, 1, 254)),
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            [0, 0, 0x05, 0x78], // next-hop MTU 1400
            &quoted4,
            20 + 20,
        ),
        Frame::icmp_error(
            IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x254)),
            ICMPV6_PACKET_TOO_BIG,
            0,
            [0, 0, 0x05, 0x00], // MTU 1280
            &quoted6,
            40 + 20,
        ),
    ]
    .iter()
    .map(|f| {
        let mut b = f.build();
        b[..6].copy_from_slice(&director_mac);
        b
    })
    .collect()
}

/// Sends `frames` from the client namespace's link to the director.
fn send_from_client(frames: Vec<Vec<u8>>) -> Result<()> {
    crate::netns::run_in("vmclient", move || {
        crate::recorder::RawSocket::open("vmc0")?.send(&frames)
    })?
    .context("sending frames from vmclient")
}

/// Step 8: with `net.ipv4.vs.schedule_icmp=1` (IPVS reads the same sysctl
/// for IPv6), a "fragmentation needed" and a "packet too big" about packets
/// from the web VIPs' port 443 reach the director, which holds no
/// connection for them. IPVS then finds a fwmark service by the ICMP
/// packet's own mark. With `icmp_errors` off they are unmarked and go
/// nowhere; turned on by `fwmark apply`, they get the mark of the service
/// the quoted packet came from (443 -> FWM 90, served by rs2 alone; web6 ->
/// FWM 86) and IPVS forwards them to a real server, where they arrive.
fn icmp_errors(fwmark_bin: &Path, moved: &str) -> Result<()> {
    println!("vm: step 8: ICMP errors with schedule_icmp=1");
    std::fs::write("/proc/sys/net/ipv4/vs/schedule_icmp", "1")
        .context("setting net.ipv4.vs.schedule_icmp")?;
    let off = PathBuf::from("/tmp/fwmark-icmp-off.toml");
    let on = PathBuf::from("/tmp/fwmark-icmp-on.toml");
    std::fs::write(&off, moved)?;
    std::fs::write(&on, format!("icmp_errors = true\n{moved}"))?;
    let mac_text = std::fs::read_to_string(format!("/sys/class/net/{IFACE}/address"))?;
    let mac: Vec<u8> = mac_text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC {mac_text:?}"))?;
    let mac: [u8; 6] = mac
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC {mac_text:?}"))?;
    let rs1 = IcmpCounter::start("rs1")?;
    let rs2 = IcmpCounter::start("rs2")?;
    let arrived = || {
        let ((a4, a6), (b4, b6)) = (rs1.counts(), rs2.counts());
        (a4 + b4, a6 + b6, b4)
    };
    let icmp_counts = |d: &Fwmark| -> Result<(u64, u64, u64)> {
        let s = status_json(d)?;
        let service = |name: &str| {
            s["services"]
                .as_array()
                .and_then(|all| all.iter().find(|x| x["name"] == name))
                .and_then(|x| x["icmp_errors"].as_u64())
                .unwrap_or(u64::MAX)
        };
        Ok((
            s["global"]["icmp_error"]
                .as_u64()
                .context("status global.icmp_error")?,
            service("web-tls"),
            service("web6"),
        ))
    };

    // Off: unmarked, IPVS finds no service; nothing reaches a real server.
    let mut daemon = Fwmark::start(fwmark_bin, &off)?;
    send_from_client(router_errors(50001, mac))?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        arrived() == (0, 0, 0),
        "with icmp_errors off, ICMP errors reached a real server: {:?}",
        arrived()
    );
    ensure!(
        icmp_counts(&daemon)? == (0, 0, 0),
        "fwmark counted ICMP errors with icmp_errors off: {:?}",
        icmp_counts(&daemon)?
    );
    println!(
        "vm: ok: icmp_errors off: frag-needed and packet-too-big unmarked, no real server got them"
    );

    // On, by apply: marked, scheduled by IPVS, forwarded to a real server.
    let out = daemon.cmd(&[
        "apply",
        "--iface",
        IFACE,
        "--config",
        on.to_str().expect("utf-8"),
    ])?;
    ensure!(
        out.contains("icmp_errors false -> true"),
        "apply did not report the icmp_errors change:\n{out}"
    );
    send_from_client(router_errors(50002, mac))?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    while arrived() != (1, 1, 1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        arrived() == (1, 1, 1),
        "with icmp_errors on, (v4, v6, v4 at rs2) errors arrived at the real servers: {:?}, \
         want (1, 1, 1)",
        arrived()
    );
    ensure!(
        icmp_counts(&daemon)? == (2, 1, 1),
        "fwmark's ICMP error counters (global, web-tls, web6): {:?}, want (2, 1, 1)",
        icmp_counts(&daemon)?
    );
    println!(
        "vm: ok: icmp_errors on: frag-needed -> FWM 90 -> rs2, packet-too-big -> FWM 86 -> \
         {}; fwmark counted 1 for web-tls, 1 for web6",
        if rs1.counts().1 == 1 { "rs1" } else { "rs2" }
    );
    daemon.stop()?;
    daemon.cmd(&["detach", "--iface", IFACE])?;
    Ok(())
}

/// The client's end of a tunnel: its device, outer address, inner
/// address(es) and policy-routing table (traffic from the inner address
/// goes into the tunnel).
struct Tunnel {
    dev: &'static str,
    kind: &'static str,
    client_outer: &'static str,
    client_inner: Ipv4Addr,
    director_inner: &'static str,
    client_inner6: Option<Ipv6Addr>,
    table: &'static str,
}

const TUNNELS: [Tunnel; 2] = [
    Tunnel {
        dev: "vmipip",
        kind: "ipip",
        client_outer: "10.0.1.40",
        client_inner: Ipv4Addr::new(10, 9, 1, 2),
        director_inner: "10.9.1.1",
        client_inner6: None,
        table: "101",
    },
    Tunnel {
        dev: "vmgre",
        kind: "gre",
        client_outer: "10.0.1.39",
        client_inner: Ipv4Addr::new(10, 9, 2, 2),
        director_inner: "10.9.2.1",
        client_inner6: Some(Ipv6Addr::new(0xfd00, 9, 2, 0, 0, 0, 0, 2)),
        table: "102",
    },
];

impl Tunnel {
    /// Both ends: the director's device in its namespace (an L3 device:
    /// ARPHRD_TUNNEL, ARPHRD_IPGRE), the client's in `vmclient`, routes
    /// for the inner addresses, and policy routing on the client so that
    /// what it sends from the inner addresses goes through the tunnel.
    fn build(&self) -> Result<()> {
        let (dev, kind, table) = (self.dev, self.kind, self.table);
        let inner = self.client_inner.to_string();
        ip(&[
            "link",
            "add",
            dev,
            "type",
            kind,
            "local",
            "10.0.1.1",
            "remote",
            self.client_outer,
        ])?;
        ip(&["addr", "add", self.director_inner, "dev", dev])?;
        ip(&["link", "set", dev, "up"])?;
        ip(&["route", "add", &inner, "dev", dev])?;
        let client = format!(
            "link add {dev} type {kind} local {} remote 10.0.1.1\n\
             addr add {inner}/32 dev {dev}\n\
             link set {dev} up\n\
             route add default dev {dev} table {table}\n\
             rule add from {inner} lookup {table}\n",
            self.client_outer
        );
        ip_batch("vmclient", &client)?;
        if let Some(v6) = self.client_inner6 {
            ip(&["addr", "add", "fd00:9:2::1/128", "dev", dev, "nodad"])?;
            ip(&["-6", "route", "add", &format!("{v6}/128"), "dev", dev])?;
            let v6 = v6.to_string();
            ip_in(
                "vmclient",
                &["addr", "add", &format!("{v6}/128"), "dev", dev, "nodad"],
            )?;
            ip_in(
                "vmclient",
                &["-6", "route", "add", "default", "dev", dev, "table", table],
            )?;
            ip_in(
                "vmclient",
                &["-6", "rule", "add", "from", &v6, "lookup", table],
            )?;
        }
        Ok(())
    }

    /// What the client sends from its inner address(es): the probes of
    /// [`service_probes`] that the tunnel can carry.
    fn probes(&self) -> Vec<Probe> {
        let inner = IpAddr::V4(self.client_inner);
        let mut out = vec![
            Probe::tcp(
                "tcp 192.0.2.10:80",
                inner,
                v4(WEB_VIP, 80),
                Some((80, false)),
            ),
            Probe::tcp(
                "tcp 192.0.2.21:21",
                inner,
                v4(FTP_VIP, 21),
                Some((21, false)),
            ),
            Probe::tcp(
                "tcp 192.0.2.21:9999 (outside the range)",
                inner,
                v4(FTP_VIP, 9999),
                None,
            ),
            Probe {
                what: "udp 192.0.2.53:53",
                udp_len: Some(32),
                src: inner,
                dst: v4(DNS_VIP, 53),
                via: Some((53, false)),
            },
        ];
        if let Some(inner6) = self.client_inner6 {
            out.push(Probe::tcp(
                "tcp [2001:db8::10]:443",
                IpAddr::V6(inner6),
                v6(WEB6_VIP, 443),
                Some((86, true)),
            ));
        }
        out
    }
}

/// Step 9: an ipip and a GRE tunnel from the client to the director, as an
/// L3/L4 balancer tier delivers traffic. The director decapsulates on the
/// tunnel device, where fwmark (its L3 entry) marks the inner packets, and
/// IPVS serves them through the FWM services: a right mark reaches its
/// service's real servers, a wrong or missing one cannot (the director
/// itself then refuses the VIP's port), and IPVS's connection counts grow
/// by exactly the probes. Before fwmark runs on a tunnel, nothing of it
/// reaches IPVS.
fn tunnels(fwmark_bin: &Path, example: &Path) -> Result<()> {
    println!("vm: step 9: ipip and GRE tunnels");
    for t in &TUNNELS {
        t.build()?;
        let link_type = std::fs::read_to_string(format!("/sys/class/net/{}/type", t.dev))?;
        println!("vm: {} ({}): link type {}", t.dev, t.kind, link_type.trim());
        let before = tcp_probe(IpAddr::V4(t.client_inner), v4(WEB_VIP, 80))?;
        ensure!(
            matches!(before, Answer::Refused | Answer::TimedOut),
            "over {} without fwmark 80 must not reach IPVS: {before:?}",
            t.dev
        );
    }
    let daemons = TUNNELS
        .iter()
        .map(|t| Fwmark::start_on(fwmark_bin, t.dev, example, &[]))
        .collect::<Result<Vec<_>>>()?;
    for (t, daemon) in TUNNELS.iter().zip(&daemons) {
        let text = daemon.cmd(&["status", "--iface", t.dev, "--json"])?;
        let before: serde_json::Value = serde_json::from_str(&text)?;
        let mut want: BTreeMap<Fwm, u64> = BTreeMap::new();
        for p in t.probes() {
            let answer = p.send()?;
            match (p.via, &answer) {
                (Some(svc), Answer::Server(s)) => {
                    println!("vm: ok: {} over {} -> FWM {} -> {s}", p.what, t.dev, svc.0);
                    *want.entry(svc).or_default() += 1;
                }
                (None, Answer::Refused | Answer::TimedOut) => {
                    println!(
                        "vm: ok: {} over {} not taken by IPVS ({answer:?})",
                        p.what, t.dev
                    );
                }
                _ => bail!(
                    "{} over {}: expected {:?}, got {answer:?}\nfwmark log:\n{}",
                    p.what,
                    t.dev,
                    p.via,
                    daemon.log_text()
                ),
            }
        }
        // IPVS holds one connection per answered probe from the inner
        // addresses (the tunnel's own clients), and no other.
        let mut sources = vec![IpAddr::V4(t.client_inner)];
        sources.extend(t.client_inner6.map(IpAddr::V6));
        let held = ipvs_conns_from(&sources)?;
        let answered: u64 = want.values().sum();
        ensure!(
            held == answered,
            "over {}: IPVS holds {held} connections from {sources:?}, {answered} probes were \
             answered",
            t.dev
        );
        // fwmark's counters: which services marked (by mark: each service
        // has its own), nothing malformed.
        let text = daemon.cmd(&["status", "--iface", t.dev, "--json"])?;
        let after: serde_json::Value = serde_json::from_str(&text)?;
        let delta = |what: &str| {
            after["global"][what].as_u64().unwrap_or(0)
                - before["global"][what].as_u64().unwrap_or(0)
        };
        let service_packets = |status: &serde_json::Value| -> BTreeMap<u64, u64> {
            status["services"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| Some((s["mark"].as_u64()?, s["packets"].as_u64()?)))
                .collect()
        };
        let (was, now) = (service_packets(&before), service_packets(&after));
        let marked_by: BTreeMap<u64, u64> = now
            .iter()
            .map(|(m, n)| (*m, n - was.get(m).copied().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let want_marks: Vec<u64> = want.keys().map(|(m, _)| u64::from(*m)).collect();
        ensure!(
            marked_by.keys().copied().collect::<Vec<_>>() == want_marks
                && delta("malformed") == 0
                && delta("non_ip") == 0,
            "over {}: fwmark marked packets per mark {marked_by:?} (want marks {want_marks:?}), \
             malformed {}, non_ip {}",
            t.dev,
            delta("malformed"),
            delta("non_ip")
        );
        println!(
            "vm: ok: over {}: IPVS holds {held} connections from the tunnel's clients; fwmark \
             marked packets per mark {marked_by:?}, no_match {}, malformed 0",
            t.dev,
            delta("no_match")
        );
    }
    for (t, mut daemon) in TUNNELS.iter().zip(daemons) {
        daemon.stop()?;
        daemon.cmd(&["detach", "--iface", t.dev])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipvsadm_lists() {
        let list = "IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
FWM  21 rr persistent 300
  -> 10.0.2.2:0                   Masq    1      1          2
  -> 10.0.3.2:0                   Masq    1      0          1
FWM  86 IPv6 rr
  -> [fd00:2::2]:0                Masq    1      0          2
TCP  192.0.2.1:80 rr
  -> 10.0.2.2:80                  Masq    1      7          0
FWM  90 rr
";
        let conns = parse_ipvs_conns(list).unwrap();
        assert_eq!(conns.len(), 3);
        assert_eq!(conns[&(21, false)]["10.0.2.2:0"], 3);
        assert_eq!(conns[&(21, false)]["10.0.3.2:0"], 1);
        assert_eq!(conns[&(86, true)]["[fd00:2::2]:0"], 2);
        assert!(conns[&(90, false)].is_empty());

        let stats = "Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes
  -> RemoteAddress:Port
FWM  21                                  3       18       12     1080      720
  -> 10.0.2.2:0                          2       12        8      720      480
FWM  86 IPv6                             2       10        8      800      640
TCP  192.0.2.1:80                        7        1        1        1        1
";
        let stats = parse_ipvs_stats(stats).unwrap();
        assert_eq!(stats, BTreeMap::from([((21, false), 3), ((86, true), 2)]));
    }
}
