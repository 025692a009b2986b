//! `fwmark run` as a child process inside a namespace.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::PathBuf,
    process::{Child, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::netns::Netns;

/// The `fwmark` binary under test: `$FWMARK_BIN` (set by `cargo xtask test`)
/// or the workspace's debug build.
pub fn fwmark_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FWMARK_BIN") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/fwmark");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask test`, or build it with `cargo build -p fwmark-user --features failpoints`",
        p.display()
    );
    p
}

/// What a stopped daemon left.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A running `fwmark run`.
pub struct Daemon {
    child: Child,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
    /// Drains stdout as it comes (the exit table can exceed a pipe buffer).
    stdout_thread: Option<JoinHandle<String>>,
}

impl Daemon {
    /// Starts `fwmark ARGS...` ([`fwmark_bin`]) in `ns` and waits until it
    /// logs that it is marking (or fails).
    pub fn start(ns: &Netns, args: &[&str]) -> Result<Daemon> {
        Daemon::start_bin(&fwmark_bin(), ns, args)
    }

    /// `fwmark run --iface <director side> --config CONFIG EXTRA...` in the
    /// lab's director namespace.
    pub fn run_on(lab: &crate::netns::Lab, config: &str, extra: &[&str]) -> Result<Daemon> {
        Daemon::run_behind(lab, &[], config, extra)
    }

    /// [`Daemon::run_on`] behind a wrapper command line that ends with the
    /// program to run (`setpriv … --`, `env PATH=…`): `WRAPPER... fwmark run
    /// --iface <director side> --config CONFIG EXTRA...`.
    pub fn run_behind(
        lab: &crate::netns::Lab,
        wrapper: &[&str],
        config: &str,
        extra: &[&str],
    ) -> Result<Daemon> {
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = lab.director.command(program);
                cmd.args(args).arg(fwmark_bin());
                cmd
            }
            None => lab.director.command(fwmark_bin()),
        };
        cmd.args(["run", "--iface", &lab.director_if, "--config", config])
            .args(extra);
        Daemon::spawn(cmd)
    }

    /// [`Daemon::start`] with the binary given.
    pub fn start_bin(bin: &std::path::Path, ns: &Netns, args: &[&str]) -> Result<Daemon> {
        let mut cmd = ns.command(bin);
        cmd.args(args);
        Daemon::spawn(cmd)
    }

    /// Starts a prepared `fwmark run` command line (e.g. behind `setpriv`)
    /// and waits until it logs that it is marking.
    pub fn spawn(mut cmd: std::process::Command) -> Result<Daemon> {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning fwmark")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&stderr);
        let stderr_thread = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let attached = line.contains("marking on ");
                sink.lock().expect("stderr lock").push_str(&(line + "\n"));
                if attached {
                    let _ = tx.send(());
                }
            }
        });
        let mut out = child.stdout.take().expect("piped stdout");
        let stdout_thread = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let mut daemon = Daemon {
            child,
            stderr,
            stderr_thread: Some(stderr_thread),
            stdout_thread: Some(stdout_thread),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                return Ok(daemon);
            }
            if let Some(status) = daemon.child.try_wait()? {
                let finished = daemon.collect(status);
                bail!(
                    "fwmark exited before attaching ({}):\n{}",
                    finished.status,
                    finished.stderr
                );
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "fwmark did not attach within 30 s:\n{}",
                    daemon.stderr_so_far()
                );
            }
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far.
    pub fn stderr_so_far(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// Sends `signal` to it.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), signal)?;
        Ok(())
    }

    /// Waits until its log contains `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.stderr_so_far().contains(text) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "fwmark did not log {text:?} within {timeout:?}:\n{}",
            self.stderr_so_far()
        )
    }

    /// SIGKILLs it (no cleanup of its own) and reaps it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits (up to 20 s) for it to exit.
    pub fn stop(mut self) -> Result<Finished> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM)?;
        self.wait(Duration::from_secs(20)).context("after SIGTERM")
    }

    /// Waits (up to `timeout`) for it to exit, e.g. after a signal sent
    /// with [`Daemon::signal`].
    pub fn wait(&mut self, timeout: Duration) -> Result<Finished> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(self.collect(status));
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "fwmark did not exit within {timeout:?}:\n{}",
                    self.stderr_so_far()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn collect(&mut self, status: ExitStatus) -> Finished {
        let stdout = self
            .stdout_thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        Finished {
            status,
            stdout,
            stderr: self.stderr_so_far(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The capabilities contrib/fwmark.service grants, less CAP_SYS_ADMIN (bpffs
/// is mounted), as a `setpriv` option: root without CAP_DAC_OVERRIDE, so
/// file modes apply to it.
pub const DOCUMENTED_CAPS: &str = "--bounding-set=-all,+bpf,+perfmon,+net_admin";

/// Runs `PROGRAM ARGS...` as user nobody with no capabilities.
pub fn as_nobody(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .arg(program)
        .args(args)
        .output()
        .expect("run setpriv")
}

/// Runs `fwmark ARGS...` as user nobody with no capabilities.
pub fn fwmark_unprivileged(args: &[&str]) -> std::process::Output {
    as_nobody(fwmark_bin(), args)
}

/// Parses the `global: name=value ...` line `fwmark run` prints on exit.
pub fn exit_globals(stdout: &str) -> Option<std::collections::BTreeMap<String, u64>> {
    let line = stdout.lines().find_map(|l| l.strip_prefix("global: "))?;
    line.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Packets of the `(total)` line of `service` in the table `fwmark run`
/// prints on exit.
pub fn service_total(table: &str, service: &str) -> Option<u64> {
    table.lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.len() == 5 && cols[3] == service && cols[4] == "(total)")
            .then(|| cols[0].parse().ok())
            .flatten()
    })
}
