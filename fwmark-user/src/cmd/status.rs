//! `fwmark status`: the attachment, the live config and the counters of an
//! interface, as a table or `--json`; without `--iface`, of every interface
//! fwmark is attached to in this network namespace.

use anyhow::{Context as _, Result, bail};
use fwmark::{
    datapath::Maps,
    live, netns, preflight,
    state::{Lock, Paths},
    status::Snapshot,
};

use crate::cli::StatusArgs;

pub fn status(args: StatusArgs) -> Result<()> {
    preflight::check_privileges()?;
    let Some(iface) = &args.iface else {
        return status_all(args.json);
    };
    // A member of a group: the group's status (its line among the
    // per-interface counters).
    let paths = Paths::new(iface)?.owner();
    if !paths.pin_dir.exists() {
        bail!("{}", paths.not_attached());
    }
    let snapshot = snapshot(&paths)?;
    if args.json {
        println!("{}", snapshot.json());
    } else {
        print!("{}", snapshot.text());
    }
    Ok(())
}

/// The snapshot of one interface with pins.
fn snapshot(paths: &Paths) -> Result<Snapshot> {
    let iface = &paths.iface;
    let not_attached = || paths.not_attached();
    // Pins of another layout are not read as this one's.
    if let Some(other) = fwmark::upgrade::other_layout(paths) {
        return Err(other.into());
    }
    let maps = Maps::from_pins(&paths.pin_dir).with_context(not_attached)?;
    let (state, unrecorded) = live::peek_state(paths, &maps)?.with_context(not_attached)?;
    // A change in progress holds the apply lock between its switch and
    // recording it: only a switch nobody is recording was interrupted.
    if unrecorded && !Lock::apply_busy(paths) {
        log::warn!(
            "an interrupted change of {iface} switched to generation {} and is not recorded \
             yet; the next `fwmark apply`, `run` or `detach` records it",
            state.generation
        );
    }
    let daemon = Lock::daemon_holder(paths).and_then(|p| p.parse().ok());
    Ok(Snapshot::collect(&state, &maps, daemon)?)
}

/// `fwmark status` without `--iface`: every interface of this network
/// namespace with fwmark's pins, one after the other (`--json`: an array),
/// then the namespaces deleted while fwmark was attached there (stale).
fn status_all(json: bool) -> Result<()> {
    let here = netns::Netns::current().context("reading /proc/self/ns/net")?;
    let all = Paths::all().context("listing fwmark's pins and state")?;
    let mut snapshots = Vec::new();
    let mut failed = Vec::new();
    // A group's members are shown with it.
    for paths in all
        .iter()
        .filter(|p| p.pin_dir.exists() && p.group().is_none())
    {
        match snapshot(paths) {
            Ok(s) => snapshots.push(s),
            Err(e) => {
                eprintln!("fwmark: error: {}: {e:#}", paths.iface);
                failed.push(paths.iface.as_str());
            }
        }
    }
    let stale: Vec<u64> = Paths::other_namespaces()
        .into_iter()
        .filter(|(_, alive)| *alive == Some(false))
        .map(|(inode, _)| inode)
        .collect();
    for inode in &stale {
        log::warn!(
            "stale: network namespace net:[{inode}] was deleted while fwmark was attached there; \
             the next `fwmark run` removes its pins and state"
        );
    }
    if json {
        let values: Vec<serde_json::Value> = snapshots
            .iter()
            .map(|s| serde_json::from_str(&s.json()).expect("a snapshot is JSON"))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&values).expect("JSON values serialize")
        );
    } else if snapshots.is_empty() && failed.is_empty() {
        println!("fwmark is attached to no interface in {here}");
    } else {
        println!(
            "fwmark in {here}: {} interface{}",
            snapshots.len() + failed.len(),
            if snapshots.len() + failed.len() == 1 {
                ""
            } else {
                "s"
            }
        );
        for s in &snapshots {
            println!();
            print!("{}", s.text());
        }
    }
    if !failed.is_empty() {
        bail!("status of {} failed (above)", failed.join(", "));
    }
    Ok(())
}
