//! `cargo xtask demo`: fwmark marking real traffic between two throwaway
//! network namespaces. Usage: fwmark-demo FWMARK_BIN CONFIG (as root).
//! Nothing outside the namespaces it creates is touched; they are removed
//! when it ends, also on failure.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use fwmark_testlab::{
    daemon::Daemon,
    example,
    netns::Lab,
    nft::{self, MarkCounters},
};

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let (Some(bin), Some(config)) = (args.next(), args.next()) else {
        bail!("usage: fwmark-demo FWMARK_BIN CONFIG (run it through `cargo xtask demo`)");
    };
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces and needs root; use `cargo xtask demo`");
    }

    let probes = example::probes();
    let lab = Lab::new(&example::vips(&probes)).context("creating the demo namespaces")?;
    println!(
        "== namespaces {} (client) and {} (director), joined by veth {} <-> {}",
        lab.client.name, lab.director.name, lab.client_if, lab.director_if
    );
    println!(
        "== the director counts arriving packets per mark with nftables (prerouting, mangle priority)"
    );
    let counters = MarkCounters::install(&lab.director, &probes)?;

    let config_arg = config.to_string_lossy().into_owned();
    println!(
        "== director: fwmark run --iface {} --config {config_arg}",
        lab.director_if
    );
    let daemon = Daemon::start_bin(
        &bin,
        &lab.director,
        &["run", "--iface", &lab.director_if, "--config", &config_arg],
    )?;
    print!("{}", daemon.stderr_so_far());

    println!("== client: TCP connection attempts and UDP datagrams to the VIPs");
    lab.client.run(|| probes.iter().try_for_each(nft::send))??;

    let observed = counters.read()?;
    println!();
    println!(
        "{:<24} {:>5}  {:<10} {:<24} result",
        "traffic", "sent", "expected", "arrived with"
    );
    let mut wrong = 0;
    for (p, o) in probes.iter().zip(&observed) {
        let seen: BTreeMap<u32, u64> = o
            .by_mark
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(m, n)| (*m, *n))
            .collect();
        let arrived = seen
            .iter()
            .map(|(m, n)| {
                if *m == 0 {
                    format!("no mark x{n}")
                } else {
                    format!("{m:#x} x{n}")
                }
            })
            .chain((o.other > 0).then(|| format!("other x{}", o.other)))
            .collect::<Vec<_>>()
            .join(", ");
        let ok = seen.get(&p.expect_mark) == Some(&u64::from(p.count))
            && o.total() == u64::from(p.count);
        wrong += usize::from(!ok);
        let expected = if p.expect_mark == 0 {
            "no mark".to_string()
        } else {
            format!("{:#x}", p.expect_mark)
        };
        println!(
            "{:<24} {:>5}  {:<10} {:<24} {}",
            p.to_string(),
            p.count,
            expected,
            arrived,
            if ok { "ok" } else { "WRONG" }
        );
    }

    let finished = daemon.stop()?;
    println!("\n== fwmark's counters when it stopped (SIGTERM):");
    print!("{}", finished.stdout);
    println!("== removing the namespaces");
    drop(lab);
    if wrong > 0 || !finished.status.success() {
        bail!(
            "{wrong} probes arrived with the wrong mark (fwmark exit: {})",
            finished.status
        );
    }
    println!("== every packet arrived with the mark fwmark.example.toml promises");
    Ok(())
}
