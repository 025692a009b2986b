//! The soak's markdown report: verdict, figures, marks per probe, counters
//! against nftables, stability, samples, violations and method.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use fwmark_testlab::{daemon::Finished, nft::ProbeProto};

use crate::{
    FINAL_BURST, Options, Poller, Sent,
    checks::{self, How, Timeline, Verdict},
    observe::{self, Counters},
    plan::Probe,
};

pub(super) struct ReportContext<'a, 'p> {
    pub(super) opts: &'a Options,
    pub(super) date: String,
    pub(super) kernel_release: String,
    pub(super) load: (String, String),
    pub(super) probes: &'a [Probe],
    pub(super) sent: &'a Sent,
    pub(super) timeline: &'a Timeline,
    pub(super) final_marks: &'a [observe::PerMark],
    pub(super) finished: Option<&'a Finished>,
    pub(super) end_status: Option<&'a Counters>,
    pub(super) after_stop: Vec<Verdict>,
    pub(super) poller: &'a mut Poller<'p>,
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn marks_text(marks: &BTreeSet<u32>) -> String {
    marks
        .iter()
        .map(|m| m.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The markdown report, and whether the soak passed.
pub(super) fn report(ctx: &mut ReportContext<'_, '_>) -> (String, bool) {
    let mut md = String::new();
    let p = &mut *ctx.poller;
    let duration = ctx.opts.duration;

    // Daemon log: reload paths taken, warnings and errors.
    let log = ctx.finished.map(|f| f.stderr.clone()).unwrap_or_default();
    let mut by_path: BTreeMap<&str, u64> = BTreeMap::new();
    let mut last_trigger = "";
    for line in log.lines() {
        if line.contains("SIGHUP: reloading") {
            last_trigger = "SIGHUP";
        } else if line.contains("changed: reloading") {
            last_trigger = "file watch";
        } else if line.contains("is live as generation") {
            *by_path.entry(last_trigger).or_default() += 1;
        }
    }
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    p.checks.check("daemon", complaints.is_empty(), || {
        format!(
            "the daemon logged warnings or errors:\n{}",
            complaints.join("\n")
        )
    });
    match ctx.finished {
        Some(f) => p.checks.check("daemon", f.status.success(), || {
            format!("fwmark run exited with {}: {}", f.status, f.stderr)
        }),
        None => p
            .checks
            .fail("daemon", "the daemon died during the soak".into()),
    }
    let mut changes: BTreeMap<How, u64> = BTreeMap::new();
    for s in ctx.timeline.switches.iter().filter(|s| s.done.is_some()) {
        *changes.entry(s.how).or_default() += 1;
    }
    p.checks.check(
        "coverage",
        changes.get(&How::Apply).copied().unwrap_or(0) > 0
            && by_path.get("SIGHUP").copied().unwrap_or(0) > 0
            && by_path.get("file watch").copied().unwrap_or(0) > 0,
        || format!("not every change path was taken: {changes:?}, daemon reloads {by_path:?}"),
    );
    let last = p.last_nft.clone().map(|(_, n)| n).unwrap_or_default();
    let first = p.attach.before.clone();
    for (probe, seen) in ctx.probes.iter().zip(&last.probes) {
        let missing: Vec<u32> = probe
            .allowed()
            .into_iter()
            .filter(|m| seen.by_mark.get(m).copied().unwrap_or(0) == 0)
            .collect();
        p.checks.check("coverage", missing.is_empty(), || {
            format!(
                "{}: no packet arrived with mark(s) {missing:?}, so those configs were not exercised under traffic",
                probe.label()
            )
        });
    }
    let stability = checks::stability(
        &p.rows.iter().map(|r| (r.t, r.process)).collect::<Vec<_>>(),
        duration,
    );
    for v in &stability {
        p.checks.check("stability", v.ok, || {
            format!(
                "{}: baseline {}, end {} ({})",
                v.what, v.baseline, v.end, v.rule
            )
        });
    }
    let passed = p.checks.total_failed() == 0;

    let _ = writeln!(md, "# Soak test\n");
    let secs = duration.as_secs_f64();
    let length = if secs % 60.0 == 0.0 {
        format!("--minutes {}", secs / 60.0)
    } else {
        format!("--seconds {secs}")
    };
    let _ = writeln!(
        md,
        "`cargo xtask soak {length}` on {}, Linux {}, {} CPUs (shared with other \
         builds: load average {} before, {} after). fwmark: `{}`.\n",
        ctx.date,
        ctx.kernel_release,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        ctx.load.0,
        ctx.load.1,
        ctx.opts.fwmark.display()
    );
    let _ = writeln!(
        md,
        "**{}**: {} checks, {} violations.\n",
        if passed { "PASSED" } else { "FAILED" },
        thousands(p.checks.total()),
        p.checks.total_failed()
    );

    // Figures.
    let sent_by = |v4: bool, proto: ProbeProto| -> u64 {
        ctx.probes
            .iter()
            .zip(&ctx.sent.per_probe)
            .filter(|(pr, _)| pr.dst.is_ipv4() == v4 && pr.proto == proto)
            .map(|(_, n)| n)
            .sum()
    };
    let fwmark_end = p.last_counters.clone().unwrap_or_default();
    let _ = writeln!(md, "## Figures\n");
    let _ = writeln!(md, "| what | figure |\n|---|---|");
    let mut fig = |what: &str, value: String| {
        let _ = writeln!(md, "| {what} | {value} |");
    };
    fig(
        "packets sent (TCP attempts / UDP datagrams)",
        format!(
            "{} (IPv4 TCP {}, IPv4 UDP {}, IPv6 TCP {}, IPv6 UDP {}); {} send errors",
            thousands(ctx.sent.per_probe.iter().sum()),
            thousands(sent_by(true, ProbeProto::Tcp)),
            thousands(sent_by(true, ProbeProto::Udp)),
            thousands(sent_by(false, ProbeProto::Tcp)),
            thousands(sent_by(false, ProbeProto::Udp)),
            ctx.sent.errors
        ),
    );
    fig(
        "packets in the director's prerouting since fwmark started (nftables)",
        format!(
            "{} marked, {} unmarked (probes' ports, and neighbour discovery)",
            thousands(last.marked - first.marked),
            thousands(last.unmarked - first.unmarked)
        ),
    );
    fig(
        "fwmark's global counters at the end",
        format!(
            "marked {}, no_match {}, non_ip {}, malformed {}, seen {}",
            thousands(fwmark_end.global("marked")),
            thousands(fwmark_end.global("no_match")),
            thousands(fwmark_end.global("non_ip")),
            thousands(fwmark_end.global("malformed")),
            thousands(fwmark_end.global("seen"))
        ),
    );
    fig(
        "config changes",
        format!(
            "{} ({} `fwmark apply`, {} file rewrites, {} rewrites + SIGHUP; the daemon reloaded {} times by file watch, {} by SIGHUP)",
            changes.values().sum::<u64>() - changes.get(&How::Start).copied().unwrap_or(0),
            changes.get(&How::Apply).copied().unwrap_or(0),
            changes.get(&How::Watch).copied().unwrap_or(0),
            changes.get(&How::Sighup).copied().unwrap_or(0),
            by_path.get("file watch").copied().unwrap_or(0),
            by_path.get("SIGHUP").copied().unwrap_or(0),
        ),
    );
    fig(
        "last generation",
        ctx.end_status
            .map_or("unknown".into(), |s| s.generation.to_string()),
    );
    fig(
        "readings",
        format!(
            "{} polls: {} nftables, {} `status --json`, {} `/metrics`, {} kernel",
            thousands(p.polls),
            thousands(p.reads.get("nft").copied().unwrap_or(0)),
            thousands(p.reads.get("status").copied().unwrap_or(0)),
            thousands(p.reads.get("metrics").copied().unwrap_or(0)),
            thousands(p.reads.get("kernel").copied().unwrap_or(0))
        ),
    );
    for (kind, n) in &p.checks.counts {
        let failed = p.checks.failed.get(kind).copied().unwrap_or(0);
        fig(
            &format!("checks: {kind}"),
            format!("{} ({failed} failed)", thousands(*n)),
        );
    }
    for (kind, n) in &p.checks.failed {
        if !p.checks.counts.contains_key(kind) {
            fig(&format!("failures: {kind}"), n.to_string());
        }
    }
    fig(
        "replaced generations' inner maps checked freed",
        format!("{} (of {} inner maps seen)", p.freed, p.inner_ever.len()),
    );

    // Marks per probe.
    let _ = writeln!(md, "\n## Marks per probe\n");
    let _ = writeln!(
        md,
        "Packets counted by nftables in the director per mark (mark: packets), and \
         the last config's marks with the traffic stopped ({FINAL_BURST} packets each).\n"
    );
    let _ = writeln!(
        md,
        "| probe | marks allowed | packets seen per mark | foreign marks | sent | final burst |\n|---|---|---|---|---|---|"
    );
    for (i, probe) in ctx.probes.iter().enumerate() {
        let seen = last.probes[i].since(&first.probes[i]);
        let per_mark = seen
            .by_mark
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(m, n)| format!("{m}: {}", thousands(*n)))
            .collect::<Vec<_>>()
            .join(", ");
        let fin = &ctx.final_marks[i];
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            probe.label(),
            marks_text(&probe.allowed()),
            if per_mark.is_empty() {
                "none".into()
            } else {
                per_mark
            },
            seen.other,
            thousands(ctx.sent.per_probe[i]),
            fin.by_mark
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(m, n)| format!("{m}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    // fwmark against nftables at the end.
    let _ = writeln!(md, "\n## fwmark's counters against nftables at the end\n");
    let _ = writeln!(
        md,
        "| counter | fwmark (`status`) | nftables |\n|---|---|---|"
    );
    let _ = writeln!(
        md,
        "| global marked | {} | {} marked packets |",
        thousands(fwmark_end.global("marked")),
        thousands(last.marked)
    );
    let _ = writeln!(
        md,
        "| global no_match + malformed | {} | {} unmarked packets |",
        thousands(fwmark_end.global("no_match") + fwmark_end.global("malformed")),
        thousands(last.unmarked)
    );
    for (i, probe) in ctx.probes.iter().enumerate() {
        if let Some((service, rule)) = probe.rule {
            let counted = fwmark_end
                .rules
                .get(&(service.to_string(), rule.to_string()))
                .map_or("missing".into(), |(n, _)| thousands(*n));
            let _ = writeln!(
                md,
                "| {service}: {rule} | {counted} | {} marked packets to {} |",
                thousands(last.probes[i].marked()),
                probe.label()
            );
        }
    }

    // Stability.
    let (warmup, window) = checks::windows(duration);
    let _ = writeln!(md, "\n## Stability\n");
    let _ = writeln!(
        md,
        "The daemon's /proc samples ({} of them) are compared between a baseline window \
         ({:.0}-{:.0} s, after a {:.0} s warm-up) and the last {:.0} s; fwmark's kernel objects \
         are compared at every kernel reading with the first one that has both generation \
         slots filled.\n",
        p.rows.len(),
        warmup.as_secs_f64(),
        (warmup + window).as_secs_f64(),
        warmup.as_secs_f64(),
        window.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "| measure | rule | baseline | end | verdict |\n|---|---|---|---|---|"
    );
    let kernel_first = p.kernel_baseline().unwrap_or_default();
    let kernel_last = p.kernel.last().map(|(_, k)| k.clone()).unwrap_or_default();
    let kernel_ok = p.checks.failed.get("kernel objects").copied().unwrap_or(0) == 0;
    let mut rows: Vec<Verdict> = stability;
    rows.push(Verdict {
        what: "fwmark's maps (program's + inner)",
        rule: "the same at every kernel reading".into(),
        baseline: kernel_first.maps().to_string(),
        end: kernel_last.maps().to_string(),
        ok: kernel_first.maps() == kernel_last.maps(),
    });
    rows.push(Verdict {
        what: "programs on ingress",
        rule: "exactly one, the same id at every kernel reading".into(),
        baseline: format!("{:?}", kernel_first.programs),
        end: format!("{:?}", kernel_last.programs),
        ok: kernel_first.programs == kernel_last.programs && kernel_last.programs.len() == 1,
    });
    rows.push(Verdict {
        what: "pins",
        rule: "the same at every kernel reading".into(),
        baseline: kernel_first.pins.to_string(),
        end: kernel_last.pins.to_string(),
        ok: kernel_first.pins == kernel_last.pins,
    });
    rows.push(Verdict {
        what: "replaced inner maps",
        rule: "gone from the kernel at the next kernel reading".into(),
        baseline: format!("{} checked", p.freed),
        end: format!(
            "{} still there",
            p.checks
                .violations
                .iter()
                .filter(|v| v.contains("still exists"))
                .count()
        ),
        ok: kernel_ok,
    });
    rows.append(&mut ctx.after_stop);
    rows.push(Verdict {
        what: "all BPF maps / programs on the machine",
        rule: "reported, not judged: other engineers' tests load and unload their own".into(),
        baseline: format!(
            "{} / {}",
            kernel_first.system_maps, kernel_first.system_programs
        ),
        end: format!(
            "{} / {}",
            kernel_last.system_maps, kernel_last.system_programs
        ),
        ok: true,
    });
    for v in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            v.what,
            v.rule,
            v.baseline,
            v.end,
            if v.ok { "ok" } else { "**FAILED**" }
        );
    }

    // Samples.
    let _ = writeln!(md, "\n## Samples\n");
    let _ = writeln!(
        md,
        "| t (s) | generation | packets (nft) | VmRSS KiB | VmHWM KiB | VmSize KiB | fds | threads | fwmark maps | inner map ids | map memlock KiB | all maps | all progs |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let step = (duration.as_secs_f64() / 20.0).max(1.0);
    let mut next = 0.0;
    let n = p.rows.len();
    for (i, r) in p.rows.iter().enumerate() {
        if r.t < next && i + 1 != n {
            continue;
        }
        next = r.t + step;
        let k = p
            .kernel
            .iter()
            .rev()
            .find(|(t, _)| *t <= r.t + 0.5)
            .map(|(_, k)| k.clone())
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "| {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.t,
            r.generation,
            thousands(r.packets),
            r.process.rss_kib,
            r.process.hwm_kib,
            r.process.size_kib,
            r.process.fds,
            r.process.threads,
            k.maps(),
            k.inner_maps
                .iter()
                .map(|id| id.to_string())
                .collect::<Vec<_>>()
                .join(" "),
            k.memlock / 1024,
            k.system_maps,
            k.system_programs
        );
    }

    if !p.checks.violations.is_empty() {
        let _ = writeln!(md, "\n## Violations\n");
        for v in &p.checks.violations {
            let _ = writeln!(md, "- {v}");
        }
        if p.checks.total_failed() as usize > p.checks.violations.len() {
            let _ = writeln!(
                md,
                "- … {} more",
                p.checks.total_failed() as usize - p.checks.violations.len()
            );
        }
    }
    md += METHOD;
    (md, passed)
}

const METHOD: &str = "
## Method

- **Lab**: a client and a director network namespace joined by veth;
  `fwmark run --metrics` on the director's end with a config file it
  watches. The client sends, in rounds every 2 ms, one TCP connection
  attempt (refused by the director: one SYN) or UDP datagram per probe:
  IPv4 and IPv6, exact addresses and prefixes, ports whose mark alternates
  (80/81 every change, 90/91 every two), a port in a range that grows and
  shrinks, a port whose service comes and goes, and ports that must never
  be marked (next to marked ones).
- **Changes**: every second the next of four configs becomes live: three
  changes in five by `fwmark apply` from another process, one by rewriting
  the daemon's file (its watch, checked every second), one by rewriting it
  and sending SIGHUP. Each change is recorded with when it started and
  when it was seen live (apply's output, the daemon's log).
- **Marks**: nftables counts every packet in the director's prerouting
  (mangle priority, after TC ingress) per probe and mark. Between two
  readings, every packet must carry a mark its probe has in a config that
  was live at some moment between them, written by hand per config; no
  mark counts as 0, allowed only where a config leaves the port alone. A
  mark no config gives is always a violation. At the end, with the traffic
  stopped, 3 packets per probe must all carry the last config's mark.
- **Counters**: each reading of `fwmark status --json` and of `/metrics`
  is checked against the reading before it: the generation and every global,
  service and rule counter may only grow, except a rule that a config in
  between did not have (it gets a fresh counter slot) and a service that
  lost a rule. Each reading also lies between the nftables readings just
  before and after it: global `marked` between the marked packets,
  `no_match + malformed` between the unmarked ones, and each rule that is
  in every config between the marked packets of its probe. With the traffic
  stopped the bounds meet, so the final figures must be equal. `status`
  must name the config the soak made live as that generation, and the
  daemon.
- **Daemon resources**: VmRSS, VmHWM, VmSize, threads and open fds from
  /proc at every poll. Transient use during a reload or a scrape lifts
  single samples, so floors (minimums) over a window are compared: the
  baseline window starts after a warm-up of a quarter of the run (at most
  a minute) and lasts as long; the end window is the last quarter (at most
  a minute). File descriptors and threads may not grow at all: each one a
  reload or a scrape opens is closed before the daemon returns to its loop,
  so any rise of the floor is a leak. Memory may grow by 1 MiB or 5 % of
  the baseline, whichever is more: the allocator keeps freed memory in its
  arenas and returns it in pages, so a few hundred KiB move either way
  without a leak, while a leak of 4 KiB per reload (a compiled config is
  far larger) or of 440 bytes per `/metrics` scrape adds up to about 1 MiB
  over the 240 reloads and 2,400 scrapes of a 10-minute run; VmHWM (the
  peak) has the same limit.
- **Kernel objects**: every 2 s the program on the interface (through tcx),
  the maps it uses, the inner maps in the two generation slots and fwmark's
  pins. The program (same id), its maps and the pins must not change; the
  inner maps change with every config, and each one replaced must be gone
  from the kernel (no map with its id) at the next reading: old generations
  are freed. After the daemon exits, every map and the program it used must
  be gone, nothing attached and no pins left. A map lives while something
  holds it: a program that uses it, a slot of an outer map, a pin or a file
  descriptor, and each of those is judged exactly above (the daemon's fds
  in its floor). Counts of all maps and programs on the machine are shown
  as well but not judged: other engineers' tests load and unload their own
  on this machine, and the counts come from the same map ids.
- Throughput is reported, never judged: the machine's 2 CPUs are shared.
";
