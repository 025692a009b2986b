//! The soak's judgements: which config could have classified a packet at a
//! given time, marks against that, counters against their previous reading
//! and against nftables, and the stability of the daemon's resources.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    time::{Duration, Instant},
};

use crate::{
    observe::{Counters, NftReading, Process, Span},
    plan::{Catalog, Probe},
};

/// How a config change reached the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum How {
    /// The config `fwmark run` started with.
    Start,
    /// `fwmark apply` from another process.
    Apply,
    /// The daemon's file watch noticed its config file change.
    Watch,
    /// SIGHUP after the daemon's config file changed.
    Sighup,
}

impl fmt::Display for How {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            How::Start => "start",
            How::Apply => "fwmark apply",
            How::Watch => "file watch",
            How::Sighup => "SIGHUP",
        })
    }
}

/// One config change: generation `generation` holds config `config`; it
/// became live somewhere between `started` and `done`.
#[derive(Clone, Debug)]
pub struct Switch {
    pub generation: u64,
    pub config: usize,
    pub how: How,
    pub started: Instant,
    /// None while the change is under way.
    pub done: Option<Instant>,
}

/// Every generation so far, in order (generation `g` at index `g - 1`).
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    pub switches: Vec<Switch>,
}

impl Timeline {
    /// The config of generation `g`.
    pub fn config_of(&self, g: u64) -> Option<usize> {
        let i = usize::try_from(g).ok()?.checked_sub(1)?;
        self.switches.get(i).map(|s| s.config)
    }

    /// The generations that may have been live at some moment of
    /// `[from, to]`: generation g is live from some time in its
    /// `[started, done]` until some time in the next one's.
    pub fn live_during(&self, from: Instant, to: Instant) -> BTreeSet<u64> {
        self.switches
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                let began_by_then = s.started <= to;
                let still_then = match self.switches.get(i + 1) {
                    None => true,
                    Some(next) => next.done.is_none_or(|d| d >= from),
                };
                began_by_then && still_then
            })
            .map(|(_, s)| s.generation)
            .collect()
    }
}

/// Tallies checks by kind and keeps the violations.
pub struct Checks {
    t0: Instant,
    pub counts: BTreeMap<&'static str, u64>,
    pub failed: BTreeMap<&'static str, u64>,
    /// The first violations, in order (at most [`Checks::KEEP`]).
    pub violations: Vec<String>,
}

impl Checks {
    const KEEP: usize = 200;

    pub fn new(t0: Instant) -> Checks {
        Checks {
            t0,
            counts: BTreeMap::new(),
            failed: BTreeMap::new(),
            violations: Vec::new(),
        }
    }

    /// Records one check of `kind`; a failure is printed at once and kept.
    pub fn check(&mut self, kind: &'static str, ok: bool, what: impl FnOnce() -> String) {
        *self.counts.entry(kind).or_default() += 1;
        if !ok {
            self.fail(kind, what());
        }
    }

    /// Records a violation that is not the outcome of a counted check.
    pub fn fail(&mut self, kind: &'static str, what: String) {
        *self.failed.entry(kind).or_default() += 1;
        let line = format!(
            "at {:.1} s: {kind}: {what}",
            self.t0.elapsed().as_secs_f64()
        );
        eprintln!("soak: VIOLATION {line}");
        if self.violations.len() < Checks::KEEP {
            self.violations.push(line);
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn total_failed(&self) -> u64 {
        self.failed.values().sum()
    }
}

fn marks_text(marks: &BTreeSet<u32>) -> String {
    marks
        .iter()
        .map(|m| format!("{m:#x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every packet counted between two nftables readings carries a mark that
/// its probe had in a config live at some moment between them (no mark
/// counts as mark 0, allowed only where a config leaves the port alone).
pub fn marks_between(
    checks: &mut Checks,
    probes: &[Probe],
    timeline: &Timeline,
    before: &(Span, NftReading),
    after: &(Span, NftReading),
) {
    let generations = timeline.live_during(before.0.start, after.0.end);
    for (i, probe) in probes.iter().enumerate() {
        let delta = after.1.probes[i].since(&before.1.probes[i]);
        let allowed: BTreeSet<u32> = generations
            .iter()
            .filter_map(|g| timeline.config_of(*g))
            .map(|k| probe.marks[k])
            .collect();
        let wrong: Vec<String> = delta
            .by_mark
            .iter()
            .filter(|(m, n)| **n > 0 && !allowed.contains(m))
            .map(|(m, n)| format!("{n} with mark {m:#x}"))
            .chain((delta.other > 0).then(|| format!("{} with a foreign mark", delta.other)))
            .collect();
        checks.check("mark", wrong.is_empty(), || {
            format!(
                "{}: {} while generations {:?} allowed only {{{}}}",
                probe.label(),
                wrong.join(", "),
                generations,
                marks_text(&allowed)
            )
        });
    }
}

/// A counters reading against the one before it: nothing goes down, except
/// a rule that some config in between did not have (its slot is then new)
/// and a service that lost a rule on the way.
pub fn monotonic(
    checks: &mut Checks,
    catalog: &Catalog,
    timeline: &Timeline,
    prev: &Counters,
    next: &Counters,
) {
    let what = format!(
        "{} (generation {}) -> {} (generation {})",
        prev.source, prev.generation, next.source, next.generation
    );
    checks.check(
        "counter monotonic",
        next.generation >= prev.generation,
        || format!("generation went down: {what}"),
    );
    for (name, before) in &prev.global {
        let after = next.global(name);
        checks.check("counter monotonic", after >= *before, || {
            format!("global {name} {before} -> {after}: {what}")
        });
    }
    let between: Vec<usize> = (prev.generation + 1..=next.generation)
        .filter_map(|g| timeline.config_of(g))
        .collect();
    for (id, (packets, bytes)) in &prev.rules {
        let Some((p2, b2)) = next.rules.get(id) else {
            continue;
        };
        if !between.iter().all(|k| catalog.rules[*k].contains(id)) {
            continue;
        }
        checks.check("counter monotonic", p2 >= packets, || {
            format!("rule {} {:?} packets {packets} -> {p2}: {what}", id.0, id.1)
        });
        if let (Some(b1), Some(b2)) = (bytes, b2) {
            checks.check("counter monotonic", b2 >= b1, || {
                format!("rule {} {:?} bytes {b1} -> {b2}: {what}", id.0, id.1)
            });
        }
    }
    let before_rules = timeline
        .config_of(prev.generation)
        .map(|k| &catalog.services[k]);
    for (name, (packets, bytes)) in &prev.services {
        let Some((p2, b2)) = next.services.get(name) else {
            continue;
        };
        let Some(rules) = before_rules.and_then(|s| s.get(name)) else {
            continue;
        };
        let kept = between.iter().all(|k| {
            catalog.services[*k]
                .get(name)
                .is_some_and(|later| rules.is_subset(later))
        });
        if !kept {
            continue;
        }
        checks.check("counter monotonic", p2 >= packets && b2 >= bytes, || {
            format!("service {name} {packets}/{bytes} -> {p2}/{b2} (packets/bytes): {what}")
        });
    }
}

/// nftables' counts from before fwmark attached: `before` was read just
/// before the daemon started, `after` once it was marking (and before the
/// soak's traffic). What arrived in between (neighbour discovery, say)
/// nftables counted and fwmark may or may not have.
#[derive(Clone, Debug, Default)]
pub struct Attach {
    pub before: NftReading,
    pub after: NftReading,
}

/// fwmark's counters read between two nftables readings: every packet
/// nftables counted before was counted by fwmark (which sees it first, in
/// TC ingress), and fwmark counted nothing nftables did not count by the
/// next reading. Global counters count from when fwmark attached.
pub fn against_nft(
    checks: &mut Checks,
    probes: &[Probe],
    counters: &Counters,
    attach: &Attach,
    lo: &NftReading,
    hi: &NftReading,
) {
    let src = counters.source;
    let bounds = |lo: u64, hi: u64, before: u64, after: u64| {
        (lo.saturating_sub(after), hi.saturating_sub(before))
    };
    let (a, b) = (&attach.before, &attach.after);
    let marked = counters.global("marked");
    let (min, max) = bounds(lo.marked, hi.marked, a.marked, b.marked);
    checks.check("counter vs nft", (min..=max).contains(&marked), || {
        format!(
            "{src}: global marked {marked} outside [{min}, {max}], the marked packets nftables \
             counted since fwmark attached"
        )
    });
    // Both sources have every global counter (`/metrics` by `result`).
    let unmarked = counters.global("no_match") + counters.global("malformed");
    let (min, max) = bounds(lo.unmarked, hi.unmarked, a.unmarked, b.unmarked);
    checks.check("counter vs nft", (min..=max).contains(&unmarked), || {
        format!(
            "{src}: global no_match + malformed {unmarked} outside [{min}, {max}], the \
             unmarked packets nftables counted since fwmark attached"
        )
    });
    for (i, probe) in probes.iter().enumerate() {
        let Some((service, rule)) = probe.rule else {
            continue;
        };
        let id = (service.to_string(), rule.to_string());
        let (lo, hi) = (lo.probes[i].marked(), hi.probes[i].marked());
        match counters.rules.get(&id) {
            Some((packets, _)) => {
                checks.check("counter vs nft", (lo..=hi).contains(packets), || {
                    format!(
                        "{src}: rule {service} {rule:?} counted {packets}, nftables saw [{lo}, {hi}] marked packets of {}",
                        probe.label()
                    )
                })
            }
            None => checks.fail(
                "counter vs nft",
                format!("{src}: no rule {service} {rule:?} (in every config)"),
            ),
        }
    }
}

/// A `status` reading names the config the soak made live as that
/// generation, and the daemon that manages the interface.
pub fn identity(
    checks: &mut Checks,
    catalog: &Catalog,
    timeline: &Timeline,
    status: &Counters,
    daemon_pid: u32,
) {
    let expected = timeline
        .config_of(status.generation)
        .map(|k| catalog.sha256[k].as_str());
    checks.check(
        "config identity",
        expected.is_some() && status.sha256.as_deref() == expected,
        || {
            format!(
                "generation {} has config sha256 {:?}, the soak made config {:?} live as it",
                status.generation,
                status.sha256,
                timeline.config_of(status.generation)
            )
        },
    );
    checks.check(
        "config identity",
        status.daemon_pid == Some(daemon_pid),
        || {
            format!(
                "status names daemon {:?}, the soak's is {daemon_pid}",
                status.daemon_pid
            )
        },
    );
}

/// One row of the stability verdict.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub what: &'static str,
    pub rule: String,
    pub baseline: String,
    pub end: String,
    pub ok: bool,
}

/// The windows compared: samples from the end of the warm-up for one
/// window (the baseline) against the last window of the run. Each is a
/// quarter of the run, at most a minute.
pub fn windows(duration: Duration) -> (Duration, Duration) {
    let window = (duration / 4).min(Duration::from_secs(60));
    (window, window)
}

/// Memory growth allowed beyond the baseline: 1 MiB or 5 %, whichever is
/// more (see docs/soak.md for why).
pub fn memory_slack_kib(baseline_kib: u64) -> u64 {
    (baseline_kib / 20).max(1024)
}

/// Judges the daemon's resource samples (seconds since start, reading).
pub fn stability(samples: &[(f64, Process)], duration: Duration) -> Vec<Verdict> {
    let (warmup, window) = windows(duration);
    let (w, win, dur) = (
        warmup.as_secs_f64(),
        window.as_secs_f64(),
        duration.as_secs_f64(),
    );
    let base: Vec<&Process> = samples
        .iter()
        .filter(|(t, _)| *t >= w && *t < w + win)
        .map(|(_, p)| p)
        .collect();
    let end: Vec<&Process> = samples
        .iter()
        .filter(|(t, _)| *t >= dur - win)
        .map(|(_, p)| p)
        .collect();
    let floor = |v: &[&Process], f: fn(&Process) -> u64| v.iter().map(|p| f(p)).min();
    let last = |v: &[&Process], f: fn(&Process) -> u64| v.last().map(|p| f(p));
    let mut out = Vec::new();
    let mut floor_rule =
        |what: &'static str, f: fn(&Process) -> u64, slack: fn(u64) -> u64, rule: &str| {
            let (b, e) = (floor(&base, f), floor(&end, f));
            let ok = matches!((b, e), (Some(b), Some(e)) if e <= b + slack(b));
            out.push(Verdict {
                what,
                rule: rule.to_string(),
                baseline: b.map_or("no samples".into(), |v| v.to_string()),
                end: e.map_or("no samples".into(), |v| v.to_string()),
                ok,
            });
        };
    floor_rule(
        "VmRSS floor (KiB)",
        |p| p.rss_kib,
        memory_slack_kib,
        "end floor <= baseline floor + max(1 MiB, 5 %)",
    );
    floor_rule(
        "VmSize floor (KiB)",
        |p| p.size_kib,
        memory_slack_kib,
        "end floor <= baseline floor + max(1 MiB, 5 %)",
    );
    floor_rule(
        "open fds floor",
        |p| p.fds,
        |_| 0,
        "end floor <= baseline floor (no growth)",
    );
    floor_rule(
        "threads floor",
        |p| p.threads,
        |_| 0,
        "end floor <= baseline floor (no growth)",
    );
    let (b, e) = (last(&base, |p| p.hwm_kib), last(&end, |p| p.hwm_kib));
    out.push(Verdict {
        what: "VmHWM (KiB)",
        rule: "peak at the end <= peak after the baseline window + max(1 MiB, 5 %)".into(),
        baseline: b.map_or("no samples".into(), |v| v.to_string()),
        end: e.map_or("no samples".into(), |v| v.to_string()),
        ok: matches!((b, e), (Some(b), Some(e)) if e <= b + memory_slack_kib(b)),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{observe::PerMark, plan::CONFIGS};
    use fwmark_testlab::nft::ProbeProto;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn timeline(t0: Instant) -> Timeline {
        // Generation 1 from 0 ms; 2 switched between 1000 and 1010 ms; 3
        // between 2000 and 2010 ms; 4 under way since 3000 ms.
        let s = |g: u64, config, from, to: Option<u64>| Switch {
            generation: g,
            config,
            how: How::Apply,
            started: at(t0, from),
            done: to.map(|ms| at(t0, ms)),
        };
        Timeline {
            switches: vec![
                s(1, 0, 0, Some(0)),
                s(2, 1, 1000, Some(1010)),
                s(3, 2, 2000, Some(2010)),
                s(4, 3, 3000, None),
            ],
        }
    }

    #[test]
    fn live_generations_cover_every_switch_that_overlaps() {
        let t0 = Instant::now();
        let t = timeline(t0);
        let live = |a, b| t.live_during(at(t0, a), at(t0, b));
        assert_eq!(live(100, 900), BTreeSet::from([1]));
        assert_eq!(live(100, 1005), BTreeSet::from([1, 2]));
        assert_eq!(live(1005, 1500), BTreeSet::from([1, 2]));
        assert_eq!(live(1020, 1500), BTreeSet::from([2]));
        // Under way: the previous one may still be live, the new one too.
        assert_eq!(live(2500, 3500), BTreeSet::from([3, 4]));
        assert_eq!(live(2500, 2900), BTreeSet::from([3]));
    }

    fn probe(marks: [u32; CONFIGS]) -> Probe {
        Probe {
            dst: "192.0.2.10".parse().unwrap(),
            proto: ProbeProto::Udp,
            port: 80,
            marks,
            rule: Some(("web", "192.0.2.10 udp port 80")),
        }
    }

    fn reading(by_mark: &[(u32, u64)], other: u64) -> NftReading {
        NftReading {
            probes: vec![PerMark {
                by_mark: by_mark.iter().copied().collect(),
                other,
            }],
            ..NftReading::default()
        }
    }

    #[test]
    fn a_mark_outside_the_live_configs_is_a_violation() {
        let t0 = Instant::now();
        let t = timeline(t0);
        let probes = [probe([80, 81, 80, 81])];
        let span = |a, b| Span {
            start: at(t0, a),
            end: at(t0, b),
        };
        let zero = (span(100, 110), reading(&[(0, 0), (80, 0), (81, 0)], 0));
        let mut checks = Checks::new(t0);
        // Mark 80 within generation 1: fine.
        let ok = (span(500, 510), reading(&[(0, 0), (80, 5), (81, 0)], 0));
        marks_between(&mut checks, &probes, &t, &zero, &ok);
        assert_eq!(checks.total_failed(), 0);
        // Mark 81 before generation 2 began: a violation; so is mark 0.
        let early = (span(500, 510), reading(&[(0, 1), (80, 5), (81, 2)], 0));
        marks_between(&mut checks, &probes, &t, &zero, &early);
        assert_eq!(checks.total_failed(), 1);
        assert!(
            checks.violations[0].contains("2 with mark 0x51"),
            "{:?}",
            checks.violations
        );
        assert!(
            checks.violations[0].contains("1 with mark 0x0"),
            "{:?}",
            checks.violations
        );
        // Both marks across the switch to generation 2: fine.
        let across = (span(1500, 1510), reading(&[(0, 0), (80, 5), (81, 2)], 0));
        marks_between(&mut checks, &probes, &t, &zero, &across);
        assert_eq!(checks.total_failed(), 1);
        // A foreign mark is always a violation.
        let foreign = (span(1500, 1510), reading(&[(0, 0), (80, 5), (81, 2)], 1));
        marks_between(&mut checks, &probes, &t, &zero, &foreign);
        assert_eq!(checks.total_failed(), 2);
    }

    #[test]
    fn counters_may_restart_only_where_a_config_dropped_the_rule() {
        let t0 = Instant::now();
        let t = timeline(t0);
        let catalog = Catalog::new().unwrap();
        let toggle = (
            "toggle".to_string(),
            "2001:db8::10 udp port 5000".to_string(),
        );
        let web = ("web".to_string(), "192.0.2.10 tcp port 80".to_string());
        let reading = |g: u64, web_n: u64, toggle_n: u64, marked: u64| Counters {
            source: "status",
            generation: g,
            global: BTreeMap::from([("marked".to_string(), marked)]),
            rules: BTreeMap::from([
                (web.clone(), (web_n, Some(web_n * 60))),
                (toggle.clone(), (toggle_n, Some(toggle_n * 60))),
            ]),
            ..Counters::default()
        };
        let mut checks = Checks::new(t0);
        // Generation 1 (config 0) to 3 (config 2): config 1 has no toggle,
        // so its counter may start again.
        monotonic(
            &mut checks,
            &catalog,
            &t,
            &reading(1, 10, 10, 20),
            &reading(3, 12, 1, 22),
        );
        assert_eq!(checks.total_failed(), 0, "{:?}", checks.violations);
        // Web is in every config: it may not go down.
        monotonic(
            &mut checks,
            &catalog,
            &t,
            &reading(1, 10, 10, 20),
            &reading(3, 9, 1, 22),
        );
        assert_eq!(checks.total_failed(), 2, "{:?}", checks.violations);
        // Nor may a global counter, or the generation.
        monotonic(
            &mut checks,
            &catalog,
            &t,
            &reading(3, 12, 1, 22),
            &reading(2, 12, 1, 21),
        );
        assert_eq!(checks.total_failed(), 4, "{:?}", checks.violations);
    }

    #[test]
    fn counters_must_sit_between_two_nft_readings() {
        let t0 = Instant::now();
        let probes = [probe([80, 81, 80, 81])];
        let lo = NftReading {
            marked: 10,
            unmarked: 3,
            probes: vec![PerMark {
                by_mark: BTreeMap::from([(0, 0), (80, 6), (81, 4)]),
                other: 0,
            }],
        };
        let hi = NftReading {
            marked: 12,
            unmarked: 3,
            probes: vec![PerMark {
                by_mark: BTreeMap::from([(0, 0), (80, 6), (81, 6)]),
                other: 0,
            }],
        };
        let counters = |marked, rule| Counters {
            source: "status",
            global: BTreeMap::from([
                ("marked".to_string(), marked),
                ("no_match".to_string(), 3),
                ("malformed".to_string(), 0),
            ]),
            rules: BTreeMap::from([(
                ("web".to_string(), "192.0.2.10 udp port 80".to_string()),
                (rule, None),
            )]),
            ..Counters::default()
        };
        let mut checks = Checks::new(t0);
        let attach = Attach::default();
        against_nft(&mut checks, &probes, &counters(11, 11), &attach, &lo, &hi);
        assert_eq!(checks.total_failed(), 0, "{:?}", checks.violations);
        against_nft(&mut checks, &probes, &counters(13, 9), &attach, &lo, &hi);
        assert_eq!(checks.total_failed(), 2, "{:?}", checks.violations);
        // Two unmarked packets came before fwmark attached, one maybe while
        // it attached: fwmark's 3 no_match may be 1 or 2 lower.
        let before = NftReading {
            unmarked: 2,
            ..NftReading::default()
        };
        let after = NftReading {
            unmarked: 3,
            ..NftReading::default()
        };
        let mut lo5 = lo.clone();
        lo5.unmarked = 5;
        let mut hi5 = hi.clone();
        hi5.unmarked = 5;
        let attach = Attach { before, after };
        against_nft(&mut checks, &probes, &counters(11, 11), &attach, &lo5, &hi5);
        assert_eq!(checks.total_failed(), 2, "{:?}", checks.violations);
        lo5.unmarked = 7;
        hi5.unmarked = 7;
        against_nft(&mut checks, &probes, &counters(11, 11), &attach, &lo5, &hi5);
        assert_eq!(checks.total_failed(), 3, "{:?}", checks.violations);
    }

    #[test]
    fn growth_beyond_the_slack_fails_stability() {
        let p = |rss, fds| Process {
            rss_kib: rss,
            hwm_kib: rss,
            size_kib: 100_000,
            threads: 1,
            fds,
        };
        let run = Duration::from_secs(40);
        // Warm-up and windows of 10 s: baseline 10..20 s, end 30..40 s.
        let steady: Vec<(f64, Process)> = (0..40)
            .map(|t| (t as f64, p(8_000 + (t % 3) * 100, 12)))
            .collect();
        assert!(stability(&steady, run).iter().all(|v| v.ok));
        let leaking: Vec<(f64, Process)> = (0..40)
            .map(|t| (t as f64, p(8_000 + t * 100, 12 + t / 30)))
            .collect();
        let verdicts = stability(&leaking, run);
        let failed: Vec<&str> = verdicts.iter().filter(|v| !v.ok).map(|v| v.what).collect();
        assert_eq!(
            failed,
            ["VmRSS floor (KiB)", "open fds floor", "VmHWM (KiB)"]
        );
    }
}
