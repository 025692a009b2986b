//! What both VM tests share: finding and installing the host's tools,
//! packing an initramfs, and booting a guest under qemu while reading its
//! serial console for the scenario's verdict.

use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use crate::{
    util::{self, run},
    vm::Unavailable,
};

/// `tool` on PATH or in /usr/sbin, /sbin (depmod, modprobe and mke2fs live
/// there, and a non-root PATH may lack them).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// The path of `name`, or an error naming it.
pub fn tool(name: &str) -> Result<PathBuf> {
    which(name).with_context(|| format!("{name} is not installed"))
}

/// Installs the Debian packages of the `(tool, package)` pairs whose tool
/// is missing (as root; otherwise [`Unavailable`] says what to install).
/// `test` names the test in messages.
pub fn ensure_tools(test: &str, tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| which(tool).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !util::is_root() {
        return Err(Unavailable(format!(
            "the {test} needs {}: `sudo apt-get install --no-install-recommends {}`",
            missing.join(", "),
            missing.join(" ")
        ))
        .into());
    }
    eprintln!("{test}: installing {}", missing.join(" "));
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
        .with_context(|| format!("installing the {test}'s tools failed"))
}

/// Packs the tree `dir` into the newc archive `archive` with `busybox`'s
/// cpio, every path relative to the tree.
pub fn cpio(busybox: &Path, dir: &Path, archive: &Path) -> Result<()> {
    let mut paths = Vec::new();
    collect(dir, dir, &mut paths)?;
    let mut child = Command::new(busybox)
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(archive)?)
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} cpio", busybox.display()))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(paths.join("\n").as_bytes())?;
    let status = child.wait()?;
    ensure!(status.success(), "busybox cpio failed: {status}");
    Ok(())
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

/// KVM only where /dev/kvm exists and the CPU advertises VT-x/AMD-V (this
/// project's usual machine has a paravirtual /dev/kvm that cannot run a
/// stock kernel); `FWMARK_VM_ACCEL=tcg|kvm` overrides.
pub fn accel() -> &'static str {
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

/// A guest to boot: kernel, initramfs, more qemu arguments (a disk), and
/// the console lines that give the verdict.
pub struct Guest<'a> {
    /// Says who writes "guest killed" (`vm-test`, `vm-debian`).
    pub test: &'a str,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub extra: Vec<OsString>,
    pub timeout: Duration,
    pub pass: &'a str,
    pub fail: &'a str,
    /// The prefix of the scenario's own lines: when the first one came is
    /// reported.
    pub scenario_prefix: &'a str,
}

/// What the console showed.
pub struct Console {
    pub log: String,
    /// The scenario's last verdict line was a pass.
    pub passed: bool,
    /// When (since qemu started) the scenario's first line came.
    pub scenario_at: Option<Duration>,
}

/// Boots `guest` (1 GiB, 2 CPUs, serial console on stdio, no reboot) and
/// reads its console until qemu exits or the timeout kills it.
pub fn boot(guest: &Guest) -> Result<Console> {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot", "-m", "1024", "-smp", "2"])
        .args(["-accel", accel(), "-cpu", "max"])
        .arg("-kernel")
        .arg(guest.kernel)
        .arg("-initrd")
        .arg(guest.initrd)
        .args(&guest.extra)
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
    let mut log = String::new();
    let mut scenario_at = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                if scenario_at.is_none() && line.starts_with(guest.scenario_prefix) {
                    scenario_at = Some(started.elapsed());
                }
                log.push_str(line);
                log.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Both readers ended: qemu closed its output, so it has exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if started.elapsed() > guest.timeout {
            let _ = child.kill();
            log.push_str(&format!(
                "{}: guest killed after {} s\n",
                guest.test,
                guest.timeout.as_secs()
            ));
            break;
        }
    }
    let _ = child.wait();
    // The scenario's last verdict line decides.
    let passed = log
        .lines()
        .rev()
        .find(|l| l.starts_with(guest.pass) || l.starts_with(guest.fail))
        .is_some_and(|l| l.starts_with(guest.pass));
    Ok(Console {
        log,
        passed,
        scenario_at,
    })
}
