//! Network namespaces and veth pairs that a test creates, names uniquely and
//! removes on drop (processes left in them are killed first).

use std::{
    fs::File,
    net::IpAddr,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};
use nix::sched::{CloneFlags, setns};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A name no other lab on this machine uses: `fw<pid><n><tag>`, short enough
/// for an interface name (15 bytes).
pub fn unique_name(tag: char) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("fw{}x{n}{tag}", std::process::id() % 1_000_000)
}

/// Runs a command, failing with its stderr when it fails.
pub fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with `input` on its stdin, failing with its stderr when it
/// fails; returns how long it took.
pub fn pipe_into(cmd: &mut Command, input: &str) -> Result<std::time::Duration> {
    use std::io::Write as _;
    let started = std::time::Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(started.elapsed())
}

/// A network namespace owned by the test.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates a namespace with a unique name and its loopback up.
    pub fn create(tag: char) -> Result<Netns> {
        let name = unique_name(tag);
        run_cmd(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_cmd(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside the namespace. It enters the
    /// network namespace only (`nsenter --net`), unlike `ip netns exec`,
    /// whose private /sys would hide the host's bpffs and so fwmark's pins.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `f` on a thread that has entered the namespace, so sockets it
    /// opens live there.
    pub fn run<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> Result<R> {
        run_in(&self.name, f)
    }
}

/// Runs `f` on a thread that has entered the named network namespace
/// (`/run/netns/NAME`), so sockets it opens live there.
pub fn run_in<R: Send, F: FnOnce() -> R + Send>(name: &str, f: F) -> Result<R> {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    let entered = path.clone();
    std::thread::scope(|s| {
        s.spawn(move || -> Result<R> {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering network namespace {entered}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {path} panicked"))?
    })
}

impl Netns {
    /// SIGKILLs every process in the namespace and waits until they are gone.
    pub fn kill_all(&self) {
        for _ in 0..50 {
            let pids: Vec<i32> = run_cmd(Command::new("ip").args(["netns", "pids", &self.name]))
                .map(|p| {
                    p.split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_all();
        // Deleting the namespace also deletes the veth ends inside it.
        let _ = run_cmd(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// fwmark's pin and run directories of `iface` in the namespace with this
/// inode (a test namespace is never the root one):
/// `/sys/fs/bpf/fwmark/netns:INODE/IFACE`, `/run/fwmark/netns:INODE/IFACE`.
pub fn fwmark_dirs_of(inode: u64, iface: &str) -> [std::path::PathBuf; 2] {
    let key = format!("netns:{inode}");
    [
        std::path::Path::new("/sys/fs/bpf/fwmark")
            .join(&key)
            .join(iface),
        std::path::Path::new("/run/fwmark").join(&key).join(iface),
    ]
}

impl Netns {
    /// The inode of the namespace (`stat /run/netns/NAME`): what keys
    /// fwmark's pins and state of its interfaces.
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .map(|m| m.ino())
            .unwrap_or_else(|e| panic!("stat /run/netns/{}: {e}", self.name))
    }

    /// fwmark's pin and run directories of `iface` in this namespace.
    pub fn fwmark_dirs(&self, iface: &str) -> [std::path::PathBuf; 2] {
        fwmark_dirs_of(self.inode(), iface)
    }
}

/// Removes fwmark's pins and state of `iface` in `ns` (test interfaces
/// only: their names and namespaces are the lab's own), and the
/// namespace's directories once empty. Call it once no process of the lab
/// runs any more.
pub fn remove_fwmark_state(ns: &Netns, iface: &str) {
    for dir in ns.fwmark_dirs(iface) {
        let _ = std::fs::remove_dir_all(&dir);
        if let Some(parent) = dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Client-side IPv4 address of the lab link.
pub const CLIENT_V4: &str = "192.0.2.100";
/// Director-side IPv4 address of the lab link.
pub const DIRECTOR_V4: &str = "192.0.2.1";
/// Client-side IPv6 address of the lab link.
pub const CLIENT_V6: &str = "2001:db8::100";
/// Director-side IPv6 address of the lab link.
pub const DIRECTOR_V6: &str = "2001:db8::1";

/// A client namespace and a director namespace joined by a veth pair; the
/// director holds the VIPs, the client routes them to the director. On drop
/// it kills what runs in them, removes fwmark's pins and state of its
/// interfaces, and deletes both namespaces.
pub struct Lab {
    pub client: Netns,
    pub director: Netns,
    /// The veth end in the client namespace.
    pub client_if: String,
    /// The veth end in the director namespace (where fwmark attaches).
    pub director_if: String,
    /// The VIPs the director holds.
    pub vips: Vec<IpAddr>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.director.kill_all();
        self.client.kill_all();
        remove_fwmark_state(&self.director, &self.director_if);
        remove_fwmark_state(&self.client, &self.client_if);
    }
}

impl Lab {
    pub fn new(vips: &[IpAddr]) -> Result<Lab> {
        let client = Netns::create('c')?;
        let director = Netns::create('d')?;
        let client_if = format!("{}v", client.name);
        let director_if = format!("{}v", director.name);
        let lab = Lab {
            client,
            director,
            client_if,
            director_if,
            vips: vips.to_vec(),
        };
        lab.wire()?;
        Ok(lab)
    }

    /// Creates the veth pair with its addresses, the VIPs and the client's
    /// routes to them.
    fn wire(&self) -> Result<()> {
        let Lab {
            client,
            director,
            client_if,
            director_if,
            vips,
        } = self;
        run_cmd(Command::new("ip").args([
            "link",
            "add",
            client_if,
            "netns",
            &client.name,
            "type",
            "veth",
            "peer",
            "name",
            director_if,
            "netns",
            &director.name,
        ]))?;
        client.ip(&["addr", "add", &format!("{CLIENT_V4}/24"), "dev", client_if])?;
        client.ip(&[
            "addr",
            "add",
            &format!("{CLIENT_V6}/64"),
            "dev",
            client_if,
            "nodad",
        ])?;
        director.ip(&[
            "addr",
            "add",
            &format!("{DIRECTOR_V4}/24"),
            "dev",
            director_if,
        ])?;
        director.ip(&[
            "addr",
            "add",
            &format!("{DIRECTOR_V6}/64"),
            "dev",
            director_if,
            "nodad",
        ])?;
        client.ip(&["link", "set", client_if, "up"])?;
        director.ip(&["link", "set", director_if, "up"])?;
        for vip in vips {
            let (host, via) = match vip {
                IpAddr::V4(_) => (format!("{vip}/32"), DIRECTOR_V4),
                IpAddr::V6(_) => (format!("{vip}/128"), DIRECTOR_V6),
            };
            director.ip(&["addr", "add", &host, "dev", director_if, "nodad"])?;
            client.ip(&["route", "replace", &host, "via", via])?;
        }
        Ok(())
    }

    /// Deletes the veth pair (both ends go).
    pub fn delete_link(&self) -> Result<()> {
        self.director.ip(&["link", "del", &self.director_if])?;
        Ok(())
    }

    /// Creates the veth pair again after [`Lab::delete_link`]: same names
    /// and addresses, new interface indexes.
    /// Returns once the client reaches the director over IPv4 and IPv6 (a
    /// refused connection to its own addresses, not a VIP), so the first
    /// probe of a test does not race neighbour resolution on the new link.
    pub fn recreate_link(&self) -> Result<()> {
        self.wire()?;
        let reachable = self.client.run(|| {
            use std::{net::TcpStream, time::Duration};
            [DIRECTOR_V4, DIRECTOR_V6].iter().all(|addr| {
                let addr = std::net::SocketAddr::new(addr.parse().expect("address"), 9);
                (0..50).any(|_| {
                    match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                        Ok(_) => true,
                        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
                    }
                })
            })
        })?;
        anyhow::ensure!(
            reachable,
            "the director is unreachable on the re-created link"
        );
        Ok(())
    }
}

/// The programs on `dev`'s ingress in `ns`, as `tcx:NAME` (tcx links, queried
/// through aya: Debian 12's bpftool predates tcx) and `netlink:NAME`
/// (`cls_bpf` filters listed by `tc`), in the order the kernel runs them.
pub fn ingress_programs(ns: &Netns, dev: &str) -> Result<Vec<String>> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let tcx = ns.run(|| SchedClassifier::query_tcx(dev, TcAttachType::Ingress))??;
    let mut out: Vec<String> = tcx
        .1
        .iter()
        .map(|p| format!("tcx:{}", p.name_as_str().unwrap_or("?")))
        .collect();
    let filters = run_cmd(
        ns.command("tc")
            .args(["filter", "show", "dev", dev, "ingress"]),
    )
    .unwrap_or_default();
    out.extend(filters.lines().filter_map(|l| {
        let name = l.split_whitespace().skip_while(|w| *w != "name").nth(1)?;
        Some(format!("netlink:{name}"))
    }));
    Ok(out)
}
