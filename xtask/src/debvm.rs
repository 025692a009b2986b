//! `cargo xtask vm-debian`: fwmark's Debian package in a real Debian 12
//! with systemd as PID 1, keepalived and real IPVS.
//!
//! The guest's userland is built once with `mmdebstrap` (bookworm minbase
//! plus systemd, udev, keepalived, ipvsadm, iproute2, nftables, bpftool,
//! busybox-static and the cloud kernel, from Debian's archive with an apt
//! setup of its own) and written into an ext4 image with `mke2fs -d` (no
//! loop mount). The image, the kernel and the modules that mount it are
//! cached in `.cache/debvm/` (git-ignored) and rebuilt only when the recipe
//! (suite, mirrors, packages, hook) changes: a stamp file holds it.
//!
//! Each run boots the cloud kernel in `qemu-system-x86_64` with the image as
//! a copy-on-write disk (`snapshot=on`: the cached image never changes) and
//! a small initramfs: busybox loads virtio_pci and virtio_blk (modules in
//! the cloud kernel), mounts the image, copies in this run's payload (the
//! .deb, the scenario `debvm-guest.sh` and its unit) and hands over to
//! systemd. The scenario runs as a oneshot unit after multi-user.target,
//! prints its verdict on the serial console and powers the guest off.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    qemu,
    util::{self, have, output, run},
    vm::Unavailable,
};

const SUITE: &str = "bookworm";
/// The archive, with updates and security so the kernel is current.
const SOURCES: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];
/// On top of minbase. busybox-static gives the real servers their httpd
/// and the client its wget, and the initramfs its shell.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "keepalived",
    "ipvsadm",
    "iproute2",
    "nftables",
    "kmod",
    "bpftool",
    "busybox-static",
    // fwmark's own dependency (the unit's ExecReload runs /bin/kill), as
    // apt would install it; `dpkg -i` refuses the package without it.
    "procps",
    "linux-image-cloud-amd64",
];
/// Run by mmdebstrap on the finished tree ("$1"): a host name, nothing
/// enabled that the test does not start itself (keepalived's postinst
/// enables it; the scenario enables it), no login prompts or timers.
const CUSTOMIZE: &str = r#"set -e
echo debvm >"$1/etc/hostname"
chroot "$1" systemctl disable keepalived.service
chroot "$1" systemctl mask serial-getty@ttyS0.service getty@tty1.service \
  apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
  e2scrub_all.timer e2scrub_reap.service fstrim.timer systemd-pstore.service
"#;
/// What the initramfs loads to mount the image (ext4 is built in).
const ROOT_MODULES: &[&str] = &["virtio_pci", "virtio_blk"];
/// A guest that has not given its verdict by then is killed (a warm run
/// takes 2.5 to 4.5 minutes on this project's busy 2-core machine; the
/// scenario's unit gives up after 420 s).
const TIMEOUT: Duration = Duration::from_secs(480);
const PASS: &str = "FWMARK-DEBVM: PASS";
const FAIL: &str = "FWMARK-DEBVM: FAIL";
const GUEST_SCRIPT: &str = include_str!("debvm-guest.sh");

/// The scenario's unit: after multi-user.target, output straight to the
/// serial port (in order with the kernel's), power off when done.
const GUEST_UNIT: &str = "[Unit]
Description=fwmark Debian VM test (cargo xtask vm-debian)
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/lib/fwmark-debvm/run
ExecStopPost=/bin/sh -c 'sleep 0.5; systemctl poweroff --force --force'
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TTYReset=no
TTYVHangup=no
TimeoutStartSec=420

[Install]
WantedBy=multi-user.target
";

/// The initramfs's /init: modules, mount, payload, systemd.
const INIT: &str = r#"#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t devtmpfs devtmpfs /dev
while read -r m; do
  $bb insmod "/modules/$m" || echo "FWMARK-DEBVM: FAIL: boot: insmod $m"
done </modules/order
n=0
until [ -b /dev/vda ] || [ $n -ge 50 ]; do $bb sleep 0.1; n=$((n + 1)); done
$bb mount -t ext4 /dev/vda /newroot || {
  echo "FWMARK-DEBVM: FAIL: boot: cannot mount /dev/vda"
  $bb poweroff -f
}
$bb cp -a /payload/. /newroot/
$bb umount /proc /dev
exec $bb switch_root /newroot /sbin/init
"#;

fn cache_dir() -> PathBuf {
    util::root().join(".cache/debvm")
}

/// The recipe the cached image was built from; a change rebuilds it.
fn recipe() -> String {
    format!(
        "suite {SUITE}\nsources {SOURCES:?}\npackages {PACKAGES:?}\nroot modules {ROOT_MODULES:?}\ncustomize:\n{CUSTOMIZE}"
    )
}

/// mmdebstrap (installed as root when missing), mke2fs and qemu.
fn ensure_host_tools() -> Result<()> {
    qemu::ensure_tools(
        "Debian VM test",
        &[
            ("mmdebstrap", "mmdebstrap"),
            ("mke2fs", "e2fsprogs"),
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("modprobe", "kmod"),
        ],
    )
}

/// The cached image: `root.img`, `vmlinuz` and `initrd/` (busybox and the
/// modules that mount the image), built when the stamp differs.
struct Image {
    root_img: PathBuf,
    vmlinuz: PathBuf,
    initrd: PathBuf,
    kver: String,
}

fn image() -> Result<Image> {
    let dir = cache_dir();
    let stamp = dir.join("stamp");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(recipe().as_str())
        && let Ok(image) = image_cached(&dir)
        && image.root_img.is_file()
        && image.vmlinuz.is_file()
        && image.initrd.join("modules/order").is_file()
    {
        return Ok(image);
    }
    build_image(&dir)?;
    std::fs::write(&stamp, recipe())?;
    image_cached(&dir)
}

fn image_cached(dir: &Path) -> Result<Image> {
    Ok(Image {
        root_img: dir.join("root.img"),
        vmlinuz: dir.join("vmlinuz"),
        initrd: dir.join("initrd"),
        kver: std::fs::read_to_string(dir.join("kernel-version"))?
            .trim()
            .to_string(),
    })
}

/// mmdebstrap into a directory, then the kernel, the root modules and
/// busybox out of it and the tree into an ext4 image.
fn build_image(dir: &Path) -> Result<()> {
    if !util::is_root() {
        return Err(Unavailable(
            "building the Debian VM test's image needs root (mmdebstrap --mode=root); \
             run `sudo cargo xtask vm-debian` once"
                .into(),
        )
        .into());
    }
    let started = Instant::now();
    let _ = std::fs::remove_file(dir.join("stamp"));
    std::fs::create_dir_all(dir)?;
    let tree = dir.join("root.partial");
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    eprintln!("vm-debian: building the Debian {SUITE} image with mmdebstrap (once; cached)");
    // INITRD=No: the kernel's postinst skips update-initramfs (the boot uses
    // the small initramfs made here).
    run(Command::new("mmdebstrap")
        .args(["--variant=minbase", "--mode=root", "--quiet"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(format!("--customize-hook={CUSTOMIZE}"))
        .arg(SUITE)
        .arg(&tree)
        .args(SOURCES)
        .env("INITRD", "No"))
    .context("mmdebstrap failed to build the Debian image")?;
    let built = started.elapsed();

    let mut kvers: Vec<String> = std::fs::read_dir(tree.join("lib/modules"))
        .context("the image has no /lib/modules: is the kernel in PACKAGES?")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ensure!(
        kvers.len() == 1,
        "expected one kernel in the image, found {kvers:?}"
    );
    let kver = kvers.remove(0);
    std::fs::copy(
        tree.join(format!("boot/vmlinuz-{kver}")),
        dir.join("vmlinuz.partial"),
    )
    .context("the image has no /boot/vmlinuz")?;

    let initrd = dir.join("initrd");
    if initrd.exists() {
        std::fs::remove_dir_all(&initrd)?;
    }
    std::fs::create_dir_all(initrd.join("bin"))?;
    std::fs::create_dir_all(initrd.join("modules"))?;
    std::fs::copy(tree.join("bin/busybox"), initrd.join("bin/busybox"))?;
    let deps = output(
        Command::new(qemu::which("modprobe").context("modprobe (kmod) is not installed")?)
            .arg("-d")
            .arg(&tree)
            .args(["-S", &kver, "--show-depends", "-a"])
            .args(ROOT_MODULES),
    )?;
    let mut order = Vec::<String>::new();
    for line in deps.lines() {
        // "insmod /path/x.ko [options]"; "builtin x" needs nothing.
        let Some(rest) = line.strip_prefix("insmod ") else {
            continue;
        };
        let ko = PathBuf::from(rest.split_whitespace().next().unwrap_or_default());
        let name = ko
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        ensure!(
            name.ends_with(".ko"),
            "unsupported module format: {}",
            ko.display()
        );
        if !order.contains(&name) {
            std::fs::copy(&ko, initrd.join("modules").join(&name))?;
            order.push(name);
        }
    }
    std::fs::write(initrd.join("modules/order"), order.join("\n") + "\n")?;

    // Room for what the test installs and logs (writes go to qemu's
    // snapshot, the file stays sparse).
    let used_mb: u64 = output(Command::new("du").args(["-sm"]).arg(&tree))?
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du printed no size")?;
    let img = dir.join("root.img.partial");
    let _ = std::fs::remove_file(&img);
    run(
        Command::new(qemu::which("mke2fs").context("mke2fs is not installed")?)
            .args(["-q", "-t", "ext4", "-L", "debvm-root", "-d"])
            .arg(&tree)
            .arg(&img)
            .arg(format!("{}M", used_mb + used_mb / 4 + 256)),
    )
    .context("mke2fs -d failed to write the image")?;
    std::fs::rename(&img, dir.join("root.img"))?;
    std::fs::rename(dir.join("vmlinuz.partial"), dir.join("vmlinuz"))?;
    std::fs::write(dir.join("kernel-version"), &kver)?;
    std::fs::remove_dir_all(&tree)?;
    eprintln!(
        "vm-debian: image built: {used_mb} MB, kernel {kver}; mmdebstrap {:.1} s, in all {:.1} s",
        built.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// This run's initramfs: the cached initrd/ plus the payload.
fn initramfs(image: &Image, deb: &Path) -> Result<PathBuf> {
    let run_dir = cache_dir().join("run");
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)?;
    }
    let tree = run_dir.join("initramfs");
    for d in ["bin", "modules", "newroot", "proc", "dev"] {
        std::fs::create_dir_all(tree.join(d))?;
    }
    for sub in ["bin", "modules"] {
        for e in std::fs::read_dir(image.initrd.join(sub))? {
            let e = e?;
            std::fs::copy(e.path(), tree.join(sub).join(e.file_name()))?;
        }
    }
    write_exec(&tree.join("init"), INIT)?;

    let payload = tree.join("payload");
    let lib = payload.join("usr/local/lib/fwmark-debvm");
    std::fs::create_dir_all(&lib)?;
    std::fs::copy(deb, lib.join("fwmark.deb"))
        .with_context(|| format!("copying {}", deb.display()))?;
    write_exec(&lib.join("run"), GUEST_SCRIPT)?;
    let units = payload.join("etc/systemd/system");
    std::fs::create_dir_all(units.join("multi-user.target.wants"))?;
    std::fs::write(units.join("fwmark-debvm.service"), GUEST_UNIT)?;
    std::os::unix::fs::symlink(
        "../fwmark-debvm.service",
        units.join("multi-user.target.wants/fwmark-debvm.service"),
    )?;

    // newc archive with the image's busybox.
    let archive = run_dir.join("initramfs.cpio");
    qemu::cpio(&tree.join("bin/busybox"), &tree, &archive)?;
    Ok(archive)
}

fn write_exec(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn boot(image: &Image, initrd: &Path) -> Result<qemu::Console> {
    eprintln!(
        "vm-debian: booting Debian {SUITE}, kernel {} (qemu, accel {})",
        image.kver,
        qemu::accel()
    );
    let mut drive = std::ffi::OsString::from("file=");
    drive.push(&image.root_img);
    drive.push(",format=raw,if=virtio,snapshot=on");
    qemu::boot(&qemu::Guest {
        test: "vm-debian",
        kernel: &image.vmlinuz,
        initrd,
        extra: vec!["-drive".into(), drive],
        timeout: TIMEOUT,
        pass: PASS,
        fail: FAIL,
        scenario_prefix: "debvm: ",
    })
}

/// The whole Debian VM test with the package `deb`. Errors when it fails;
/// an [`Unavailable`] error means it could not run here at all.
pub fn vm_debian(deb: &Path) -> Result<()> {
    let started = Instant::now();
    if !have("apt-get") || !have("dpkg") {
        return Err(Unavailable(
            "the Debian VM test needs apt-get and dpkg (a Debian host)".into(),
        )
        .into());
    }
    ensure_host_tools()?;
    ensure!(deb.is_file(), "no package at {}", deb.display());
    let image = image()?;
    let initrd = initramfs(&image, deb)?;
    let prepared = started.elapsed();
    let console = boot(&image, &initrd)?;
    let log_path = cache_dir().join("last-run.log");
    std::fs::write(&log_path, &console.log)?;
    let guest = started.elapsed() - prepared;
    if !console.passed {
        eprintln!("---- guest console ({}) ----", log_path.display());
        eprint!("{}", console.log);
        eprintln!("---- end of guest console ----");
        let reason = console
            .log
            .lines()
            .rev()
            .find(|l| l.starts_with(FAIL))
            .unwrap_or("no verdict on the console");
        bail!(
            "the Debian VM test failed after {:.1} s in the guest: {reason} (console above, also in {})",
            guest.as_secs_f64(),
            log_path.display()
        );
    }
    for line in console.log.lines().filter(|l| l.starts_with("debvm:")) {
        println!("{line}");
    }
    let boot = console.scenario_at.unwrap_or_default();
    println!(
        "vm-debian: passed: {}; boot to scenario {:.1} s, scenario {:.1} s, guest {:.1} s, total {:.1} s (+{:.1} s preparing)",
        deb.file_name().unwrap_or_default().to_string_lossy(),
        boot.as_secs_f64(),
        (guest.saturating_sub(boot)).as_secs_f64(),
        guest.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        prepared.as_secs_f64()
    );
    Ok(())
}
