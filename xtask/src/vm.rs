//! `cargo xtask vm-test`: fwmark against real IPVS, in a guest booted from
//! Debian's distribution kernel (this machine's kernel has no IPVS).
//!
//! Everything comes from Debian packages, fetched with `apt-get download`
//! and unpacked with `dpkg -x` (nothing is installed into /boot): the cloud
//! kernel and its modules, busybox-static, ipvsadm and its libraries. The
//! downloads are cached in `.cache/vm/` (git-ignored). Each run builds an
//! initramfs with the modules IPVS and fwmark need (order from
//! `modprobe --show-depends`), iproute2 and the freshly built `fwmark` and
//! `fwmark-vm-guest` with the libraries `ldd` names, boots it in
//! `qemu-system-x86_64` (TCG; KVM only where the CPU has VT-x/AMD-V) and
//! reads the scenario's verdict from the serial console.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::util::{self, have, output, run};

/// The kernel metapackage; its first dependency is the kernel itself.
const KERNEL_META: &str = "linux-image-cloud-amd64";
/// Userspace for the guest besides the kernel: busybox (shell, mount,
/// insmod, cpio), ipvsadm and the libraries ipvsadm links.
const GUEST_PACKAGES: &[&str] = &[
    "busybox-static",
    "ipvsadm",
    "libnl-3-200",
    "libnl-genl-3-200",
    "libpopt0",
];
/// What the scenario loads; `modprobe --show-depends` adds the rest
/// (conntrack, defrag, crc32c).
const MODULES: &[&str] = &[
    "ip_vs",
    "ip_vs_rr",
    "nf_defrag_ipv6",
    "veth",
    "sch_ingress",
    "cls_bpf",
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

/// The host tools: qemu (Debian's qemu-system-x86, without recommends) and
/// kmod (depmod, modprobe) to resolve module dependencies.
fn ensure_host_tools() -> Result<()> {
    let missing: Vec<&str> = [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("depmod", "kmod"),
    ]
    .into_iter()
    .filter(|(tool, _)| !have_path(tool))
    .map(|(_, package)| package)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !util::is_root() {
        return Err(Unavailable(format!(
            "the VM test needs {}: `sudo apt-get install --no-install-recommends {}`",
            missing.join(", "),
            missing.join(" ")
        ))
        .into());
    }
    eprintln!("vm-test: installing {}", missing.join(" "));
    let install = |update: bool| -> Result<()> {
        if update {
            run(Command::new("apt-get").args(["update", "-qq"]))?;
        }
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    install(false)
        .or_else(|_| install(true))
        .context("installing the VM test's tools failed")
}

/// True when `tool` is on PATH or in /sbin, /usr/sbin (depmod lives there
/// and a non-root PATH may not have it).
fn have_path(tool: &str) -> bool {
    which(tool).is_some()
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

fn tool(name: &str) -> Result<PathBuf> {
    which(name).with_context(|| format!("{name} is not installed"))
}

/// The cached .deb files, downloading what is missing.
fn debs() -> Result<Vec<PathBuf>> {
    let dir = cache_dir().join("debs");
    std::fs::create_dir_all(&dir)?;
    // Whether the cache holds a .deb whose file name satisfies `is`.
    let cached = |is: &dyn Fn(&str) -> bool| -> Result<bool> {
        Ok(std::fs::read_dir(&dir)?.filter_map(|e| e.ok()).any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".deb") && is(&name)
        }))
    };
    // What the cache lacks: the kernel (whatever the cache holds, else the
    // metapackage's current dependency) and the guest's userspace.
    let missing = || -> Result<Vec<String>> {
        let mut wanted = Vec::new();
        if !cached(&|n| n.starts_with("linux-image-") && n.contains("-cloud-amd64_"))? {
            wanted.push(kernel_package()?);
        }
        for p in GUEST_PACKAGES {
            if !cached(&|n| n.starts_with(&format!("{p}_")))? {
                wanted.push((*p).to_string());
            }
        }
        Ok(wanted)
    };
    let wanted = missing()?;
    if !wanted.is_empty() {
        eprintln!("vm-test: downloading {}", wanted.join(" "));
        let tmp = cache_dir().join("debs.partial");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let download = |wanted: &[String]| {
            run(Command::new("apt-get")
                .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
                .args(wanted)
                .current_dir(&tmp))
        };
        download(&wanted)
            .or_else(|_| {
                ensure!(
                    util::is_root(),
                    "apt-get download failed; as root, `apt-get update` may help"
                );
                // Stale package lists name versions the archive no longer
                // has: update, then resolve the names again.
                run(Command::new("apt-get").args(["update", "-qq"]))?;
                download(&missing()?)
            })
            .context("downloading the guest's Debian packages failed")?;
        for e in std::fs::read_dir(&tmp)? {
            let e = e?;
            std::fs::rename(e.path(), dir.join(e.file_name()))?;
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    all.sort();
    Ok(all)
}

/// `linux-image-6.1.0-NN-cloud-amd64`: the metapackage's kernel dependency.
fn kernel_package() -> Result<String> {
    let resolve = || -> Result<String> {
        let deps = output(Command::new("apt-cache").args(["depends", KERNEL_META]))?;
        deps.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|d| d.starts_with("linux-image-"))
            .map(str::to_string)
            .with_context(|| format!("{KERNEL_META} depends on no linux-image package"))
    };
    resolve().or_else(|_| {
        ensure!(
            util::is_root(),
            "apt-cache knows no {KERNEL_META}; run `apt-get update` as root"
        );
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        resolve()
    })
}

/// The packages unpacked into `.cache/vm/root` (redone when the set of
/// .debs changes), with `depmod` run; returns (root, kernel version).
fn unpacked(debs: &[PathBuf]) -> Result<(PathBuf, String)> {
    let root = cache_dir().join("root");
    let stamp = root.join(".fwmark-debs");
    let names: String = debs
        .iter()
        .map(|d| format!("{}\n", d.file_name().unwrap_or_default().to_string_lossy()))
        .collect();
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(names.as_str()) {
        eprintln!("vm-test: unpacking {} packages", debs.len());
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        for deb in debs {
            run(Command::new("dpkg").arg("-x").arg(deb).arg(&root))?;
        }
        let kver = kernel_version(&root)?;
        run(Command::new(tool("depmod")?)
            .arg("-b")
            .arg(&root)
            .arg(&kver))?;
        std::fs::write(&stamp, names)?;
    }
    let kver = kernel_version(&root)?;
    Ok((root, kver))
}

fn kernel_version(root: &Path) -> Result<String> {
    let mut versions: Vec<String> = std::fs::read_dir(root.join("lib/modules"))
        .context("the kernel package has no lib/modules")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    versions.sort();
    ensure!(
        versions.len() == 1,
        "expected one kernel in {}, found {versions:?}; remove .cache/vm",
        root.display()
    );
    Ok(versions.remove(0))
}

/// The modules to insmod, dependencies first.
fn module_order(root: &Path, kver: &str) -> Result<Vec<PathBuf>> {
    let text = output(
        Command::new(tool("modprobe")?)
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
fn copy_with_libs(
    image: &Path,
    bin: &Path,
    dest: &str,
    extra_libs: &[PathBuf],
    strip: bool,
) -> Result<()> {
    let target = image.join(dest.trim_start_matches('/'));
    std::fs::create_dir_all(target.parent().expect("dest has a directory"))?;
    if strip {
        run(Command::new("strip").arg("-o").arg(&target).arg(bin))?;
    } else {
        std::fs::copy(bin, &target).with_context(|| format!("copying {}", bin.display()))?;
    }
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
/usr/bin/fwmark-vm-guest /usr/bin/fwmark /etc/fwmark/fwmark.example.toml
echo "vm: guest scenario exited with $?"
poweroff -f
"#;

/// Builds `.cache/vm/initramfs.cpio` for this run's binaries.
fn initramfs(root: &Path, kver: &str, fwmark: &Path, guest: &Path) -> Result<PathBuf> {
    let image = cache_dir().join("initramfs");
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
    std::fs::write(&init, INIT)?;
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
        false,
    )?;
    for t in ["ip", "tc"] {
        copy_with_libs(&image, &tool(t)?, &format!("/usr/sbin/{t}"), &[], false)?;
    }
    copy_with_libs(&image, fwmark, "/usr/bin/fwmark", &[], true)?;
    copy_with_libs(&image, guest, "/usr/bin/fwmark-vm-guest", &[], true)?;
    std::fs::copy(
        util::root().join("fwmark.example.toml"),
        image.join("etc/fwmark/fwmark.example.toml"),
    )?;

    let mut order = String::new();
    for (i, ko) in module_order(root, kver)?.iter().enumerate() {
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

    // newc archive with busybox's own cpio, every path relative to the image.
    let mut paths = Vec::new();
    collect(&image, &image, &mut paths)?;
    let archive = cache_dir().join("initramfs.cpio");
    let mut child = Command::new(root.join("bin/busybox"))
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(&image)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&archive)?)
        .stderr(Stdio::null())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(paths.join("\n").as_bytes())?;
    let status = child.wait()?;
    ensure!(status.success(), "busybox cpio failed: {status}");
    Ok(archive)
}

fn collect(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        out.push(path.strip_prefix(base)?.to_string_lossy().into_owned());
        if e.file_type()?.is_dir() {
            collect(base, &path, out)?;
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// KVM only where /dev/kvm exists and the CPU advertises VT-x/AMD-V (this
/// project's usual machine has a paravirtual /dev/kvm that cannot run a
/// stock kernel); `FWMARK_VM_ACCEL=tcg|kvm` overrides.
pub(crate) fn accel() -> &'static str {
    match std::env::var("FWMARK_VM_ACCEL").as_deref() {
        Ok("kvm") => return "kvm",
        Ok("tcg") => return "tcg,thread=multi",
        _ => {}
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpu
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hw && Path::new("/dev/kvm").exists() {
        "kvm"
    } else {
        "tcg,thread=multi"
    }
}

/// Boots the guest; returns its console output and whether it passed.
fn boot(root: &Path, kver: &str, initrd: &Path) -> Result<(String, bool)> {
    let kernel = root.join(format!("boot/vmlinuz-{kver}"));
    let accel = accel();
    eprintln!("vm-test: booting {kver} (qemu, accel {accel})");
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot", "-m", "1024", "-smp", "2"])
        .args(["-accel", accel, "-cpu", "max"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1 rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("qemu: {line}"));
        }
    });
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut log = String::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                log.push_str(line.trim_end_matches('\r'));
                log.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Both readers ended: qemu closed its output, so it has exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            log.push_str(&format!(
                "vm-test: guest killed after {} s\n",
                BOOT_TIMEOUT.as_secs()
            ));
            break;
        }
    }
    let _ = child.wait();
    // The scenario's last verdict line decides.
    let passed = log
        .lines()
        .rev()
        .find(|l| l.starts_with(PASS) || l.starts_with(FAIL))
        .is_some_and(|l| l.starts_with(PASS));
    Ok((log, passed))
}

/// The whole VM test. Errors when it fails; an [`Unavailable`] error means
/// it could not run here at all.
pub fn vm_test(fwmark: &Path, guest: &Path) -> Result<()> {
    let started = Instant::now();
    ensure_host_tools()?;
    if !have("apt-get") || !have("dpkg") {
        return Err(
            Unavailable("the VM test needs apt-get and dpkg (a Debian host)".into()).into(),
        );
    }
    let debs = debs()?;
    let (root, kver) = unpacked(&debs)?;
    let initrd = initramfs(&root, &kver, fwmark, guest)?;
    let prepared = started.elapsed();
    let booted = Instant::now();
    let (log, passed) = boot(&root, &kver, &initrd)?;
    let log_path = cache_dir().join("last-run.log");
    std::fs::write(&log_path, &log)?;
    let ran = booted.elapsed();
    if !passed {
        eprintln!("---- guest console ({}) ----", log_path.display());
        eprint!("{log}");
        eprintln!("---- end of guest console ----");
        bail!(
            "the VM test failed after {:.1} s in the guest (console above, also in {})",
            ran.as_secs_f64(),
            log_path.display()
        );
    }
    for line in log.lines().filter(|l| l.starts_with("vm:")) {
        println!("{line}");
    }
    println!(
        "vm-test: passed: kernel {kver}, guest run {:.1} s (+{:.1} s preparing the image)",
        ran.as_secs_f64(),
        prepared.as_secs_f64()
    );
    Ok(())
}
