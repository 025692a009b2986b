//! `cargo xtask vm-test`: fwmark against real IPVS, in guests booted from
//! Debian's distribution kernels (this machine's kernel has no IPVS): the
//! cloud kernels of Debian 11 (5.10), 12 (6.1) and 13 (6.12).
//!
//! Everything comes from Debian packages, fetched with `apt-get download`
//! through an apt configuration of the VM test's own (`.cache/vm/apt/SUITE`:
//! sources list, package lists, archive cache; the machine's apt setup is
//! neither read nor changed) and unpacked with `dpkg -x` (nothing is
//! installed): each suite's `linux-image-cloud-amd64` kernel and modules,
//! and from Debian 12 for every kernel the guest's userland, busybox-static,
//! ipvsadm, keepalived and their libraries. Downloads and unpacked trees are cached per
//! suite in `.cache/vm/` (git-ignored). Each run builds an initramfs per
//! kernel with the modules IPVS and fwmark need (order from `modprobe
//! --show-depends`, decompressed), iproute2, and the static (musl) `fwmark`
//! and `fwmark-vm-guest`, boots it in `qemu-system-x86_64` (TCG; KVM only
//! where the CPU has VT-x/AMD-V) and reads the scenario's verdict from the
//! serial console.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    qemu,
    util::{self, have, output, run},
};

/// A Debian release whose cloud kernel the VM test boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Suite {
    /// The codename: apt's suite, and the cache's directory name.
    pub name: &'static str,
    /// Debian's release number.
    pub debian: u8,
    /// The kernel series its `linux-image-cloud-amd64` carries.
    pub kernel: &'static str,
    /// How fwmark must attach there: tcx from Linux 6.6 on, else netlink
    /// (the guest's `fwmark-vm-guest` argument; `fwmark status --json`'s
    /// `attach.mode`).
    pub attach: &'static str,
}

/// Every kernel the VM test boots, oldest first (`--kernel` picks one).
pub const SUITES: [Suite; 3] = [
    Suite {
        name: "bullseye",
        debian: 11,
        kernel: "5.10",
        attach: "netlink",
    },
    Suite {
        name: "bookworm",
        debian: 12,
        kernel: "6.1",
        attach: "netlink",
    },
    Suite {
        name: "trixie",
        debian: 13,
        kernel: "6.12",
        attach: "tcx",
    },
];

/// The suite `--kernel WHICH` names: a kernel series (`6.1`), a codename
/// (`bookworm`) or a Debian release number (`12`).
pub fn suite(which: &str) -> Result<Suite> {
    SUITES
        .into_iter()
        .find(|s| which == s.kernel || which == s.name || which == s.debian.to_string())
        .with_context(|| {
            let known: Vec<String> = SUITES
                .iter()
                .map(|s| format!("{} ({})", s.kernel, s.name))
                .collect();
            format!(
                "--kernel {which}: not a kernel the VM test knows; use one of {}",
                known.join(", ")
            )
        })
}

/// The suite whose userland (busybox, ipvsadm) every guest runs.
const USERLAND: &str = "bookworm";
/// The kernel metapackage; its first dependency is the kernel itself.
const KERNEL_META: &str = "linux-image-cloud-amd64";
/// Userspace for the guest besides the kernel: busybox (shell, mount,
/// insmod, cpio), ipvsadm, keepalived and the libraries they link that a
/// Debian 12 host may lack (`ldd` finds the rest on the host).
const GUEST_PACKAGES: &[&str] = &[
    "busybox-static",
    "ipvsadm",
    "libnl-3-200",
    "libnl-genl-3-200",
    "libpopt0",
    "keepalived",
    "libmnl0",
    "libnftnl11",
    "libsnmp40",
    "libpci3",
    "libwrap0",
];
/// Where Debian's archive and its security archive are when this
/// machine's apt sources name none.
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian/";
const DEFAULT_SECURITY: &str = "http://deb.debian.org/debian-security/";
/// The keyring that signs every Debian release (bookworm's
/// debian-archive-keyring carries the keys of 11, 12 and 13).
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// What the scenario loads; `modprobe --show-depends` adds the rest
/// (conntrack, defrag, crc32c).
const MODULES: &[&str] = &[
    "ip_vs",
    "ip_vs_rr",
    "nf_defrag_ipv6",
    "veth",
    "sch_ingress",
    "cls_bpf",
    // keepalived's `nftables_ipvs` marking table.
    "nf_tables",
    // Step 9's tunnels (with tunnel4, ip_tunnel and gre).
    "ipip",
    "ip_gre",
];
/// A guest that has not finished by then is killed and the run fails.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const PASS: &str = "FWMARK-VM: PASS";
const FAIL: &str = "FWMARK-VM: FAIL";

/// Why the VM test cannot run on this machine (reported as a skip).
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

fn cache_dir() -> PathBuf {
    util::root().join(".cache/vm")
}

/// The host tools: qemu (Debian's qemu-system-x86, without recommends),
/// kmod (depmod, modprobe) to resolve module dependencies, xz for Debian
/// 13's compressed modules and strip (binutils).
fn ensure_host_tools() -> Result<()> {
    qemu::ensure_tools(
        "VM test",
        &[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("depmod", "kmod"),
            ("xz", "xz-utils"),
            ("strip", "binutils"),
        ],
    )
}

/// The base URLs of Debian's archive and of its security archive:
/// `FWMARK_VM_MIRROR` and `FWMARK_VM_SECURITY_MIRROR`, else the ones this
/// machine's apt sources use for Debian (a local mirror or proxy keeps
/// working), else deb.debian.org.
fn debian_mirrors() -> (String, String) {
    let targets = Command::new("apt-get")
        .args([
            "indextargets",
            "--format",
            "$(REPO_URI)\t$(ORIGIN)\t$(LABEL)",
        ])
        .arg("Created-By: Packages")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    let host = |label: &str| {
        targets
            .lines()
            .find_map(|l| match l.split('\t').collect::<Vec<_>>()[..] {
                [uri, "Debian", got] if got == label => Some(uri.to_string()),
                _ => None,
            })
    };
    let pick = |var: &str, label: &str, default: &str| {
        std::env::var(var)
            .ok()
            .or_else(|| host(label))
            .unwrap_or_else(|| default.to_string())
    };
    (
        pick("FWMARK_VM_MIRROR", "Debian", DEFAULT_MIRROR),
        pick(
            "FWMARK_VM_SECURITY_MIRROR",
            "Debian-Security",
            DEFAULT_SECURITY,
        ),
    )
}

/// apt for one suite, configured only by `.cache/vm/apt/SUITE/apt.conf`
/// (through `APT_CONFIG`, which also keeps the machine's apt.conf.d, and so
/// its hooks, out): its own sources list, package lists and archive cache,
/// no dpkg status. The machine's apt setup is neither read nor changed.
struct Apt {
    suite: &'static str,
    dir: PathBuf,
}

impl Apt {
    fn new(suite: &'static str) -> Result<Apt> {
        ensure!(
            Path::new(KEYRING).exists(),
            "{KEYRING} is missing: `apt-get install debian-archive-keyring`"
        );
        let dir = cache_dir().join("apt").join(suite);
        for sub in ["lists/partial", "cache/archives/partial", "empty"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // The release and its security updates, where Debian's current
        // kernel for it is.
        let (mirror, security) = debian_mirrors();
        std::fs::write(
            dir.join("sources.list"),
            format!(
                "deb [signed-by={KEYRING}] {mirror} {suite} main\n\
                 deb [signed-by={KEYRING}] {security} {suite}-security main\n"
            ),
        )?;
        let at = |sub: &str| dir.join(sub).display().to_string();
        // Package lists stay compressed and apt keeps no binary caches, so
        // a suite's apt directory is its compressed lists only.
        let mut conf = format!(
            "Dir::Etc::Parts \"{empty}\";\n\
             Dir::Etc::SourceList \"{sources}\";\n\
             Dir::Etc::SourceParts \"{empty}\";\n\
             Dir::Etc::Preferences \"/dev/null\";\n\
             Dir::Etc::PreferencesParts \"{empty}\";\n\
             Dir::State::Lists \"{lists}\";\n\
             Dir::State::status \"/dev/null\";\n\
             Dir::Cache \"{cache}\";\n\
             APT::Sandbox::User \"root\";\n\
             Acquire::Languages \"none\";\n\
             Acquire::GzipIndexes \"true\";\n\
             Dir::Cache::pkgcache \"\";\n\
             Dir::Cache::srcpkgcache \"\";\n",
            empty = at("empty"),
            sources = at("sources.list"),
            lists = at("lists"),
            cache = at("cache"),
        );
        // A proxy the machine's apt uses still applies.
        for key in ["Acquire::http::Proxy", "Acquire::https::Proxy"] {
            if let Ok(value) = output(Command::new("apt-config").args(["dump", "--no-empty", key]))
                && let Some(line) = value.lines().find(|l| l.starts_with(&format!("{key} ")))
            {
                conf.push_str(line);
                conf.push('\n');
            }
        }
        std::fs::write(dir.join("apt.conf"), conf)?;
        Ok(Apt { suite, dir })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", self.dir.join("apt.conf"));
        cmd
    }

    fn update(&self) -> Result<()> {
        eprintln!("vm-test: apt-get update ({})", self.suite);
        run(self.command("apt-get").args(["update", "-qq"]))
            .with_context(|| format!("apt-get update for {} failed", self.suite))
    }

    /// Whether `apt-get update` has run for this suite.
    fn has_lists(&self) -> bool {
        std::fs::read_dir(self.dir.join("lists")).is_ok_and(|entries| {
            entries
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
    }

    /// `linux-image-6.1.0-NN-cloud-amd64`: the metapackage's kernel dependency.
    fn kernel_package(&self) -> Result<String> {
        let deps = output(self.command("apt-cache").args(["depends", KERNEL_META]))?;
        deps.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|d| d.starts_with("linux-image-"))
            .map(str::to_string)
            .with_context(|| format!("{KERNEL_META} of {} names no linux-image", self.suite))
    }

    /// Downloads `packages` (names, or `KERNEL_META` for its kernel) into
    /// `into`; updates the lists first when there are none, and once more
    /// when the download fails (lists naming versions the archive dropped).
    fn download(&self, packages: &[&str], into: &Path) -> Result<()> {
        if !self.has_lists() {
            self.update()?;
        }
        let attempt = || -> Result<()> {
            let names: Vec<String> = packages
                .iter()
                .map(|p| {
                    if *p == KERNEL_META {
                        self.kernel_package()
                    } else {
                        Ok((*p).to_string())
                    }
                })
                .collect::<Result<_>>()?;
            eprintln!("vm-test: downloading {} ({})", names.join(" "), self.suite);
            run(self
                .command("apt-get")
                .args(["download", "-q"])
                .args(&names)
                .current_dir(into))
        };
        attempt()
            .or_else(|_| {
                self.update()?;
                attempt()
            })
            .with_context(|| {
                format!(
                    "downloading {} from {} failed",
                    packages.join(" "),
                    self.suite
                )
            })
    }
}

/// The cached .deb files of `suite` (`.cache/vm/SUITE/debs`): its kernel,
/// and for [`USERLAND`] the guest's userland; downloads what is missing.
fn debs(suite: &'static str) -> Result<Vec<PathBuf>> {
    let dir = cache_dir().join(suite).join("debs");
    std::fs::create_dir_all(&dir)?;
    let list = || -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".deb"))
            .collect();
        names.sort();
        Ok(names)
    };
    let cached = list()?;
    let mut wanted = Vec::new();
    // The kernel the cache holds, else the metapackage's current one.
    if !cached
        .iter()
        .any(|n| n.starts_with("linux-image-") && n.contains("-cloud-amd64_"))
    {
        wanted.push(KERNEL_META);
    }
    if suite == USERLAND {
        for p in GUEST_PACKAGES {
            if !cached.iter().any(|n| n.starts_with(&format!("{p}_"))) {
                wanted.push(p);
            }
        }
    }
    if !wanted.is_empty() {
        let started = Instant::now();
        let tmp = cache_dir().join(suite).join("debs.partial");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        Apt::new(suite)?.download(&wanted, &tmp)?;
        let mut bytes = 0;
        for e in std::fs::read_dir(&tmp)? {
            let e = e?;
            bytes += e.metadata()?.len();
            std::fs::rename(e.path(), dir.join(e.file_name()))?;
        }
        let _ = std::fs::remove_dir_all(&tmp);
        eprintln!(
            "vm-test: {suite}: downloaded {:.1} MB in {:.1} s",
            bytes as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(list()?.into_iter().map(|n| dir.join(n)).collect())
}

/// `debs` unpacked into `.cache/vm/SUITE/root` (redone when the set of
/// .debs changes), with `depmod` run; returns the root.
fn unpacked(suite: &str, debs: &[PathBuf]) -> Result<PathBuf> {
    let root = cache_dir().join(suite).join("root");
    let stamp = root.join(".fwmark-debs");
    let names: String = debs
        .iter()
        .map(|d| format!("{}\n", d.file_name().unwrap_or_default().to_string_lossy()))
        .collect();
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(names.as_str()) {
        eprintln!("vm-test: unpacking {} packages ({suite})", debs.len());
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        for deb in debs {
            run(Command::new("dpkg").arg("-x").arg(deb).arg(&root))?;
        }
        // Debian 13 ships modules in /usr/lib/modules, 11 and 12 in
        // /lib/modules; kmod looks in the one it was built for (Debian 12's
        // kmod: /lib/modules), so both name the same tree.
        let (lib, usr) = (root.join("lib/modules"), root.join("usr/lib/modules"));
        if usr.is_dir() && !lib.exists() {
            std::fs::create_dir_all(root.join("lib"))?;
            std::os::unix::fs::symlink("../usr/lib/modules", &lib)?;
        } else if lib.is_dir() && !usr.exists() {
            std::fs::create_dir_all(root.join("usr/lib"))?;
            std::os::unix::fs::symlink("../../lib/modules", &usr)?;
        }
        let kver = kernel_version(&root)?;
        run(Command::new(qemu::tool("depmod")?)
            .arg("-b")
            .arg(&root)
            .arg(&kver))?;
        std::fs::write(&stamp, names)?;
    }
    Ok(root)
}

/// The version of the one kernel in `root` (`boot/vmlinuz-VERSION`).
fn kernel_version(root: &Path) -> Result<String> {
    let mut versions: Vec<String> = std::fs::read_dir(root.join("boot"))
        .context("the kernel package has no /boot")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("vmlinuz-").map(str::to_string)
        })
        .collect();
    versions.sort();
    ensure!(
        versions.len() == 1,
        "expected one kernel in {}, found {versions:?}; remove that directory",
        root.display()
    );
    Ok(versions.remove(0))
}

/// The modules to insmod, dependencies first.
fn module_order(root: &Path, kver: &str) -> Result<Vec<PathBuf>> {
    let text = output(
        Command::new(qemu::tool("modprobe")?)
            .arg("-d")
            .arg(root)
            .args(["-S", kver, "--show-depends", "-a"])
            .args(MODULES),
    )?;
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for line in text.lines() {
        // "insmod /path/x.ko [options]"; "builtin x" needs nothing.
        if let Some(rest) = line.strip_prefix("insmod ") {
            let path = PathBuf::from(rest.split_whitespace().next().unwrap_or_default());
            if seen.insert(path.clone()) {
                order.push(path);
            }
        }
    }
    ensure!(!order.is_empty(), "modprobe resolved no modules:\n{text}");
    Ok(order)
}

/// Copies `bin` to `dest` inside `image` and every library `ldd` says it
/// needs to the same path inside `image`. `extra_libs` are searched first
/// (the unpacked packages' library directories).
fn copy_with_libs(image: &Path, bin: &Path, dest: &str, extra_libs: &[PathBuf]) -> Result<()> {
    let target = image.join(dest.trim_start_matches('/'));
    std::fs::create_dir_all(target.parent().expect("dest has a directory"))?;
    std::fs::copy(bin, &target).with_context(|| format!("copying {}", bin.display()))?;
    let ld_path = std::env::join_paths(extra_libs)?;
    let ldd = output(Command::new("ldd").arg(bin).env("LD_LIBRARY_PATH", ld_path))?;
    for line in ldd.lines() {
        ensure!(
            !line.contains("not found"),
            "{}: {}",
            bin.display(),
            line.trim()
        );
        // "libx.so => /path (0x..)" or "/lib64/ld-linux-x86-64.so.2 (0x..)"
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        let Some(path) = path else { continue };
        let host = PathBuf::from(path);
        // A library from an unpacked package goes where the package puts it.
        let guest = extra_libs
            .iter()
            .find_map(|dir| {
                let root = dir.ancestors().nth(2)?; // <root>/usr/lib/x86_64-linux-gnu
                host.strip_prefix(root).ok().map(Path::to_path_buf)
            })
            .unwrap_or_else(|| host.strip_prefix("/").unwrap_or(&host).to_path_buf());
        let out = image.join(&guest);
        if !out.exists() {
            std::fs::create_dir_all(out.parent().expect("library has a directory"))?;
            std::fs::copy(&host, &out).with_context(|| format!("copying {}", host.display()))?;
        }
    }
    Ok(())
}

/// The guest's /init: mounts, modules, the scenario, power off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
while read -r m; do
  insmod "/modules/$m" || { echo "FWMARK-VM: FAIL: insmod $m"; poweroff -f; }
done < /modules/order
echo "vm: kernel $(uname -r), $(wc -l < /modules/order) modules loaded"
/usr/bin/fwmark-vm-guest /usr/bin/fwmark /etc/fwmark/fwmark.example.toml @ATTACH@
echo "vm: guest scenario exited with $?"
poweroff -f
"#;

/// Copies the statically linked `bin` to `dest` inside `image`, stripped;
/// fails when `bin` needs a dynamic loader (the guest has no libc).
fn copy_static(image: &Path, bin: &Path, dest: &str) -> Result<()> {
    let ldd = Command::new("ldd").arg(bin).output()?;
    let said = String::from_utf8_lossy(&ldd.stdout) + String::from_utf8_lossy(&ldd.stderr);
    ensure!(
        said.contains("statically linked") || said.contains("not a dynamic executable"),
        "{} is not static (ldd: {}); build it with util::build_musl",
        bin.display(),
        said.trim()
    );
    let target = image.join(dest.trim_start_matches('/'));
    std::fs::create_dir_all(target.parent().expect("dest has a directory"))?;
    run(Command::new("strip").arg("-o").arg(&target).arg(bin))
}

/// Builds `.cache/vm/SUITE/initramfs.cpio`: `userland` (busybox, ipvsadm),
/// the host's ip and tc, the static `fwmark` and `fwmark-vm-guest`, and the
/// modules of the kernel `kver` unpacked in `kernel`; the guest expects
/// fwmark to attach through `attach`.
fn initramfs(
    suite: &Suite,
    userland: &Path,
    kernel: &Path,
    kver: &str,
    fwmark: &Path,
    guest: &Path,
) -> Result<PathBuf> {
    let image = cache_dir().join(suite.name).join("initramfs");
    let root = userland;
    let _ = std::fs::remove_dir_all(&image);
    for dir in [
        "bin",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "modules",
        "etc/fwmark",
    ] {
        std::fs::create_dir_all(image.join(dir))?;
    }
    std::fs::copy(root.join("bin/busybox"), image.join("bin/busybox"))?;
    let init = image.join("init");
    std::fs::write(&init, INIT.replace("@ATTACH@", suite.attach))?;
    set_mode(&init, 0o755)?;

    let libs = vec![
        root.join("usr/lib/x86_64-linux-gnu"),
        root.join("lib/x86_64-linux-gnu"),
    ];
    copy_with_libs(
        &image,
        &root.join("sbin/ipvsadm"),
        "/usr/sbin/ipvsadm",
        &libs,
    )?;
    copy_with_libs(
        &image,
        &root.join("usr/sbin/keepalived"),
        "/usr/sbin/keepalived",
        &libs,
    )?;
    for t in ["ip", "tc"] {
        copy_with_libs(&image, &qemu::tool(t)?, &format!("/usr/sbin/{t}"), &[])?;
    }
    copy_static(&image, fwmark, "/usr/bin/fwmark")?;
    copy_static(&image, guest, "/usr/bin/fwmark-vm-guest")?;
    std::fs::copy(
        util::root().join("fwmark.example.toml"),
        image.join("etc/fwmark/fwmark.example.toml"),
    )?;

    let mut order = String::new();
    for (i, ko) in module_order(kernel, kver)?.iter().enumerate() {
        let name = format!(
            "{i:02}-{}",
            ko.file_name().unwrap_or_default().to_string_lossy()
        );
        let name = if let Some(stem) = name.strip_suffix(".xz") {
            let raw = Command::new("xz").arg("-dc").arg(ko).output()?;
            ensure!(raw.status.success(), "cannot decompress {}", ko.display());
            std::fs::write(image.join("modules").join(stem), raw.stdout)?;
            stem.to_string()
        } else {
            ensure!(
                name.ends_with(".ko"),
                "unsupported module format: {}",
                ko.display()
            );
            std::fs::copy(ko, image.join("modules").join(&name))?;
            name
        };
        order.push_str(&name);
        order.push('\n');
    }
    std::fs::write(image.join("modules/order"), order)?;

    // newc archive with busybox's own cpio.
    let archive = cache_dir().join(suite.name).join("initramfs.cpio");
    qemu::cpio(&root.join("bin/busybox"), &image, &archive)?;
    std::fs::remove_dir_all(&image)?;
    Ok(archive)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Boots the guest; returns its console output and whether it passed.
fn boot(root: &Path, kver: &str, initrd: &Path) -> Result<(String, bool)> {
    eprintln!("vm-test: booting {kver} (qemu, accel {})", qemu::accel());
    let console = qemu::boot(&qemu::Guest {
        test: "vm-test",
        kernel: &root.join(format!("boot/vmlinuz-{kver}")),
        initrd,
        extra: Vec::new(),
        timeout: BOOT_TIMEOUT,
        pass: PASS,
        fail: FAIL,
        scenario_prefix: "vm:",
    })?;
    Ok((console.log, console.passed))
}

/// One kernel's run.
#[derive(Debug)]
pub struct Outcome {
    pub suite: Suite,
    /// The kernel's release (`uname -r`).
    pub kver: String,
    /// `attach.mode` as the guest's `fwmark status --json` reported it.
    pub attach: Option<String>,
    /// From starting qemu to its exit.
    pub guest: Duration,
    pub passed: bool,
    /// The guest's console.
    pub log: PathBuf,
}

/// The attach mode the guest's scenario saw: what `fwmark status --json`
/// said (`vm: ok: attached through …; status says "tcx"; …`), else what
/// fwmark's log said (`marking on vmd0 (tcx attachment, …`) when the
/// scenario stopped before asking.
fn attach_seen(log: &str) -> Option<String> {
    let status = log
        .lines()
        .find_map(|l| l.strip_prefix("vm: ok: attached through "))
        .and_then(|l| l.split_once("status says "))
        .map(|(_, rest)| {
            rest.split(';')
                .next()
                .unwrap_or_default()
                .trim_matches('"')
                .to_string()
        });
    status.or_else(|| {
        log.lines()
            .find_map(|l| {
                l.split_once("marking on ")?
                    .1
                    .split_once('(')?
                    .1
                    .split_once(" attachment")
            })
            .map(|(mode, _)| format!("{mode} (fwmark's log)"))
    })
}

/// How many guests boot at once: `FWMARK_VM_JOBS`, else one per CPU.
/// A guest spends much of its run waiting (probe answers, IPVS's 2-second
/// statistics), so on two cores two at a time took about half as long as
/// one at a time (docs/testing.md).
fn jobs() -> usize {
    std::env::var("FWMARK_VM_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// Prepares each suite's image (downloading and unpacking what the cache
/// lacks), then boots the guests. Errors when the test cannot run (an
/// [`Unavailable`] error: not at all on this machine) or an image cannot be
/// built; a guest that fails is a failed [`Outcome`].
pub fn run_kernels(fwmark: &Path, guest: &Path, suites: &[Suite]) -> Result<Vec<Outcome>> {
    ensure_host_tools()?;
    if !have("apt-get") || !have("dpkg") {
        return Err(
            Unavailable("the VM test needs apt-get and dpkg (a Debian host)".into()).into(),
        );
    }
    // The single-kernel cache this layout replaced.
    for old in [
        "debs",
        "root",
        "initramfs",
        "initramfs.cpio",
        "last-run.log",
    ] {
        let path = cache_dir().join(old);
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else if path.exists() {
            std::fs::remove_file(&path)?;
        }
    }
    let started = Instant::now();
    let userland = unpacked(USERLAND, &debs(USERLAND)?)?;
    let mut images = Vec::new();
    for suite in suites {
        let root = if suite.name == USERLAND {
            userland.clone()
        } else {
            unpacked(suite.name, &debs(suite.name)?)?
        };
        let kver = kernel_version(&root)?;
        let initrd = initramfs(suite, &userland, &root, &kver, fwmark, guest)?;
        images.push((*suite, root, kver, initrd));
    }
    let jobs = jobs().min(images.len());
    eprintln!(
        "vm-test: {} images ready in {:.1} s; {jobs} guests at a time",
        images.len(),
        started.elapsed().as_secs_f64()
    );
    // Taken from the back: oldest kernel first.
    let mut queue: Vec<_> = images.into_iter().enumerate().collect();
    queue.reverse();
    let queue = std::sync::Mutex::new(queue);
    let done = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let Some((i, (suite, root, kver, initrd))) = queue.lock().expect("queue").pop()
                    else {
                        break;
                    };
                    let booted = Instant::now();
                    let result = boot(&root, &kver, &initrd).and_then(|(log, passed)| {
                        let path = cache_dir().join(suite.name).join("last-run.log");
                        std::fs::write(&path, &log)?;
                        Ok(Outcome {
                            suite,
                            kver,
                            attach: attach_seen(&log),
                            guest: booted.elapsed(),
                            passed,
                            log: path,
                        })
                    });
                    done.lock().expect("results").push((i, result));
                }
            });
        }
    });
    let mut done = done.into_inner().expect("results");
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// The whole VM test on `suites`: prints each kernel's result (a failed
/// guest's console in full) and errors when any failed; an
/// [`Unavailable`] error means it could not run here at all.
pub fn vm_test(fwmark: &Path, guest: &Path, suites: &[Suite]) -> Result<()> {
    let started = Instant::now();
    let outcomes = run_kernels(fwmark, guest, suites)?;
    let mut failed = Vec::new();
    for o in &outcomes {
        let log = std::fs::read_to_string(&o.log).unwrap_or_default();
        if o.passed {
            for line in log.lines().filter(|l| l.starts_with("vm:")) {
                println!("[{}] {line}", o.suite.kernel);
            }
        } else {
            eprintln!("---- guest console, {} ({}) ----", o.kver, o.log.display());
            eprint!("{log}");
            eprintln!("---- end of guest console ----");
            failed.push(o.kver.as_str());
        }
    }
    for o in &outcomes {
        println!(
            "vm-test: {}: Debian {} ({}) kernel {}, attached through {} (expected {}), guest {:.1} s",
            if o.passed { "passed" } else { "FAILED" },
            o.suite.debian,
            o.suite.name,
            o.kver,
            o.attach.as_deref().unwrap_or("?"),
            o.suite.attach,
            o.guest.as_secs_f64()
        );
    }
    println!(
        "vm-test: {} of {} kernels passed in {:.1} s",
        outcomes.len() - failed.len(),
        outcomes.len(),
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        bail!(
            "the VM test failed on {} (consoles above, also in .cache/vm/SUITE/last-run.log)",
            failed.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{attach_seen, suite};

    #[test]
    fn kernel_names_pick_a_suite() {
        for which in ["5.10", "bullseye", "11"] {
            assert_eq!(suite(which).unwrap().name, "bullseye");
        }
        assert_eq!(suite("6.12").unwrap().attach, "tcx");
        assert_eq!(suite("6.1").unwrap().name, "bookworm");
        let err = suite("6.6").unwrap_err().to_string();
        assert!(err.contains("5.10 (bullseye)"), "{err}");
    }

    #[test]
    fn attach_mode_from_the_console() {
        let passed = "vm: fwmark: [..] marking on vmd0 (tcx attachment, program id 5, generation 1)\n\
                      vm: ok: attached through tcx; status says \"tcx\"; the kernel lists 1 tcx program\n";
        assert_eq!(attach_seen(passed).as_deref(), Some("tcx"));
        let stopped = "vm: fwmark: [..] marking on vmd0 (netlink clsact attachment, program id 4, generation 1)\n\
                       FWMARK-VM: FAIL: on this kernel fwmark must attach through tcx:\n";
        assert_eq!(
            attach_seen(stopped).as_deref(),
            Some("netlink clsact (fwmark's log)")
        );
        assert_eq!(attach_seen("FWMARK-VM: FAIL: insmod x\n"), None);
    }
}
