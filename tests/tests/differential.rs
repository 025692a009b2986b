//! The classifier in the kernel against the reference model
//! (`fwmark_core::model`), frame by frame: over a million seeded frames per run
//! (well-formed ones of every kind, mutations, random bytes) through
//! BPF_PROG_TEST_RUN, under several configs published one after the other
//! as generations. Every frame must come back `TC_ACT_UNSPEC` with the
//! model's mark; the global and per-rule counters must move as the model
//! says, checked per batch (a mismatch is then located frame by frame).
//!
//! `FWMARK_DIFF_SEED=N` replays a run (the seed is printed either way);
//! `FWMARK_DIFF_FRAMES=N` changes the number of frames.
//!
//! The L3 entry (`fwmark_l3`, for tun, WireGuard, ipip, GRE) is held against
//! the model's L3 mode on the same generated frames: BPF_PROG_TEST_RUN
//! always hands a TC program an Ethernet skb, so the kernel runs the frame
//! with its Ethernet header as a 14-byte `mac_len` in front of the network
//! header and the ethertype as the skb's protocol, and the model gets the
//! bytes after the header with that protocol. What it cannot show is a
//! `mac_len` of 0, which only a real L3 device gives (the tun test in
//! `classifier.rs` and the VM's ipip and GRE tunnels).

use std::{
    collections::{BTreeMap, HashMap},
    io::Write as _,
    time::Instant,
};

use fwmark_common::{GlobalCounters, Link, RuleCounters, ServiceKey, Target, wire::ETH_HLEN};
use fwmark_core::{
    config::Config,
    model::{Decision, Icmp, Model, Outcome, Parse},
    ruleset::Ruleset,
    text::parse_u64,
};
use fwmark_testlab::{
    framegen::{Generated, Generator, Kind, Targets},
    harness::{EINVAL, Harness, TC_ACT_UNSPEC},
    kernel,
};

/// Exact ports, ranges, every-port services, nested v4 and v6 prefixes with
/// exact-address overrides, and masks; ICMP errors marked by the packet they
/// quote (B and the example leave them off, so the flag switches too).
const RICH_A: &str = r#"
icmp_errors = true

[[service]]
name = "web"
vip = ["192.0.2.10", "2001:db8::10"]
proto = "tcp"
ports = [80, 443, "8080-8090"]
mark = 80

[[service]]
name = "ftp"
vip = "192.0.2.21"
proto = "tcp"
ports = [21, "10000-10100"]
mark = 21

[[service]]
name = "dns"
vip = ["192.0.2.53", "2001:db8::53"]
proto = ["udp", "tcp"]
ports = [53]
mark = 53

[[service]]
name = "sig"
vip = ["192.0.2.90", "2001:db8::90"]
proto = "sctp"
ports = [2905, "3868-3870"]
mark = 90

[[service]]
name = "allports"
vip = ["192.0.2.77", "2001:db8::77"]
proto = ["tcp", "udp", "sctp"]
mark = 77

[[service]]
name = "net24"
vip = "198.51.100.0/24"
proto = "tcp"
mark = 1

[[service]]
name = "net24-web"
vip = "198.51.100.0/24"
proto = "tcp"
ports = [80, 443]
mark = 2

[[service]]
name = "net25"
vip = "198.51.100.128/25"
proto = ["tcp", "udp"]
mark = 3

[[service]]
name = "host-in-net"
vip = "198.51.100.200"
proto = "tcp"
ports = [443]
mark = 5

[[service]]
name = "net16-ssh"
vip = "198.51.0.0/16"
proto = "tcp"
ports = [22, "2200-2202"]
mark = 6

[[service]]
name = "bit"
vip = ["192.0.2.1", "198.51.100.1"]
proto = "tcp"
ports = [80]
mark = 0x4000
mask = 0x4000

[[service]]
name = "byte"
vip = "192.0.2.2"
proto = ["tcp", "udp"]
ports = ["1-1024"]
mark = 0x0100
mask = 0xff00

[[service]]
name = "v6-48"
vip = "2001:db8:1::/48"
proto = ["tcp", "udp"]
mark = 7

[[service]]
name = "v6-64-web"
vip = "2001:db8:1:2::/64"
proto = "tcp"
ports = [80, "443-444"]
mark = 8
mask = 0xff

[[service]]
name = "v6-120"
vip = "2001:db8:1:2::100/120"
proto = ["tcp", "sctp"]
mark = 9
"#;

/// Other shapes: default routes (/0), a partial top-level mask, overlapping
/// ranges with the same mark (the first owns the overlap), mark 0 under a
/// partial mask, hosts written as /32 and /128, tiny prefixes.
const RICH_B: &str = r#"
mask = 0x0000ffff

[[service]]
name = "everything-v4-udp"
vip = "0.0.0.0/0"
proto = "udp"
mark = 0x11

[[service]]
name = "everything-v6-https"
vip = "::/0"
proto = "tcp"
ports = [443]
mark = 0x12

[[service]]
name = "dup-a"
vip = "203.0.113.0/24"
proto = "tcp"
ports = ["100-200"]
mark = 0x21

[[service]]
name = "dup-b"
vip = "203.0.113.0/24"
proto = "tcp"
ports = ["150-250"]
mark = 0x21

[[service]]
name = "clear"
vip = "203.0.113.7"
proto = ["tcp", "udp", "sctp"]
mark = 0
mask = 0x00f0

[[service]]
name = "v6-host"
vip = "2001:db8::10"
proto = ["udp", "sctp"]
ports = [53, 9899]
mark = 0x31

[[service]]
name = "host-prefixes"
vip = ["203.0.113.9/32", "2001:db8:5::9/128"]
proto = "sctp"
ports = [36412]
mark = 0x51

[[service]]
name = "net31"
vip = "192.0.2.0/31"
proto = "tcp"
mark = 0x41

[[service]]
name = "net30-port"
vip = "192.0.2.0/30"
proto = "tcp"
ports = [80]
mark = 0x42
"#;

/// The example config: exact addresses only (no prefix lookups at all).
const EXAMPLE: &str = include_str!("../../fwmark.example.toml");

/// Frames between two counter comparisons.
const BATCH: usize = 4096;

/// Whether BPF_PROG_TEST_RUN refuses a frame for a TC program, with EINVAL
/// (net/bpf/test_run.c): shorter than an Ethernet header
/// (`bpf_test_init`), or an untagged IPv4 / IPv6 frame shorter than the
/// fixed IP header (`bpf_prog_test_run_skb`, which reads its addresses), or
/// larger than a page minus head- and tailroom (never generated here).
fn test_run_refuses(frame: &[u8]) -> bool {
    if frame.len() < 14 {
        return true;
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => frame.len() < 14 + 20,
        0x86dd => frame.len() < 14 + 40,
        _ => false,
    }
}

/// splitmix64: one independent generator seed per round from the run's seed.
fn round_seed(seed: u64, round: usize) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(round as u64 + 1));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    Some(parse_u64(v).unwrap_or_else(|| panic!("{name}={v:?} is not a number")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Written straight to stderr: libtest captures `eprintln!` of passing tests.
fn say(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// One config under test.
struct Setup {
    name: &'static str,
    toml: &'static str,
    config: Config,
    ruleset: Ruleset,
    exact: HashMap<ServiceKey, Target>,
    model: Model,
}

impl Setup {
    fn new(name: &'static str, toml: &'static str) -> Setup {
        let config = Config::parse(toml, name).expect("valid test config");
        let ruleset = Ruleset::compile(&config).expect("compilable test config");
        let exact = ruleset.exact.iter().copied().collect();
        let model = Model::new(&config);
        assert_eq!(
            model.rules.len(),
            ruleset.rules.len(),
            "{name}: the model and the compiler number rules differently"
        );
        Setup {
            name,
            toml,
            config,
            ruleset,
            exact,
            model,
        }
    }
}

/// The skb protocol `eth_type_trans` gives `frame` (BPF_PROG_TEST_RUN runs
/// it): the ethertype, or for an 802.3 length field `ETH_P_802_2` (not IP).
fn skb_protocol(frame: &[u8]) -> u16 {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype >= 0x0600 {
        ethertype
    } else {
        0x0004
    }
}

/// What the model reads of `frame` on the entry for `link`: all of it, or
/// (L3) the bytes after the Ethernet header the kernel has in front.
fn model_bytes(link: Link, frame: &[u8]) -> &[u8] {
    match link {
        Link::Ethernet => frame,
        Link::L3 => &frame[ETH_HLEN..],
    }
}

/// The model's decision on `frame` for the entry for `link`.
fn decide(setup: &Setup, link: Link, frame: &[u8], mark: u32) -> Decision {
    match link {
        Link::Ethernet => setup.model.classify(frame, mark),
        Link::L3 => setup
            .model
            .classify_l3(skb_protocol(frame), model_bytes(link, frame), mark),
    }
}

/// Everything needed to report one frame and replay the run.
struct Failure<'a> {
    link: Link,
    seed: u64,
    setup: &'a Setup,
    round: usize,
    index: usize,
    generated: &'a Generated,
}

impl Failure<'_> {
    fn fail(&self, what: &str) -> ! {
        let g = self.generated;
        let path = std::env::temp_dir().join(format!(
            "fwmark-diff-{}-{}.toml",
            self.seed, self.setup.name
        ));
        let _ = std::fs::write(&path, self.setup.toml);
        panic!(
            "{what}\n\
             config {:?}, round {}, frame {} of the round, kind {:?}, preset mark {:#x}\n\
             frame ({} bytes): {}\n\
             the model's view:\n{}\
             reproduce: FWMARK_DIFF_SEED={} cargo test -p fwmark-testlab --test differential (as root)\n\
             explain:   fwmark explain --config {} --mark {:#x}{} --hex {}",
            self.setup.name,
            self.round,
            self.index,
            g.kind,
            g.mark,
            g.frame.len(),
            hex(&g.frame),
            fwmark_core::explain::explain_on(
                &self.setup.config,
                self.link,
                model_bytes(self.link, &g.frame),
                g.mark
            ),
            self.seed,
            path.display(),
            g.mark,
            if self.link == Link::L3 { " --l3" } else { "" },
            hex(model_bytes(self.link, &g.frame)),
        );
    }
}

/// Per-kind figures for the summary.
#[derive(Default)]
struct Row {
    frames: u64,
    marked: u64,
    no_match: u64,
    non_ip: u64,
    malformed: u64,
    later_fragment: u64,
    refused: u64,
}

fn diff_global(after: &GlobalCounters, before: &GlobalCounters) -> GlobalCounters {
    GlobalCounters {
        seen: after.seen - before.seen,
        marked: after.marked - before.marked,
        no_match: after.no_match - before.no_match,
        non_ip: after.non_ip - before.non_ip,
        later_fragment: after.later_fragment - before.later_fragment,
        malformed: after.malformed - before.malformed,
        icmp_error: after.icmp_error - before.icmp_error,
    }
}

/// Runs one frame through the kernel and the model and compares them.
/// Returns the model's decision (`None`: refused by BPF_PROG_TEST_RUN).
fn check_frame(h: &Harness, setup: &Setup, f: &Failure<'_>) -> Option<Decision> {
    let g = f.generated;
    let verdict = match h.try_run(&g.frame, g.mark).expect("BPF_PROG_TEST_RUN") {
        Err(errno) => {
            if errno != EINVAL || !test_run_refuses(&g.frame) {
                f.fail(&format!(
                    "BPF_PROG_TEST_RUN refused a frame it is not documented to refuse (errno {errno})"
                ));
            }
            return None;
        }
        Ok(v) => v,
    };
    if test_run_refuses(&g.frame) {
        f.fail("BPF_PROG_TEST_RUN ran a frame it is documented to refuse (the refusal rule is out of date)");
    }
    if verdict.ret != TC_ACT_UNSPEC {
        f.fail(&format!(
            "the classifier returned {} instead of TC_ACT_UNSPEC",
            verdict.ret
        ));
    }
    let decision = decide(setup, f.link, &g.frame, g.mark);
    if verdict.mark != decision.mark {
        f.fail(&format!(
            "mark differs: kernel {:#x}, model {:#x}",
            verdict.mark, decision.mark
        ));
    }
    // A third opinion on the lookup: the compiled entries' userspace lookup,
    // by the quoted packet's key for an ICMP error.
    if let (Parse::Ip(key), false) = (
        &decision.parsed.result,
        decision.outcome == Outcome::Malformed,
    ) {
        let (addr, proto, port, what) = match &decision.icmp {
            Some(Icmp::Error { quoted, .. }) => (
                quoted.src,
                quoted.proto,
                quoted.port,
                format!("{quoted} (quoted by an ICMP error)"),
            ),
            _ => (key.dst, key.proto, key.port, key.to_string()),
        };
        let compiled = setup
            .ruleset
            .classify_with(&setup.exact, addr, proto, port)
            .map(|t| (t.mark, t.mask, t.rule as usize));
        let modelled = match decision.outcome {
            Outcome::Marked(hit) => Some((hit.mark, hit.mask, hit.rule)),
            _ => None,
        };
        if compiled != modelled {
            f.fail(&format!(
                "Ruleset::classify {compiled:?} and the model {modelled:?} disagree on {what}"
            ));
        }
    }
    Some(decision)
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn kernel_agrees_with_the_model_on_generated_frames() {
    if !kernel::available("kernel_agrees_with_the_model_on_generated_frames", &[]) {
        return;
    }
    differential(Link::Ethernet, 1_050_000);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn l3_entry_agrees_with_the_model_on_generated_packets() {
    if !kernel::available("l3_entry_agrees_with_the_model_on_generated_packets", &[]) {
        return;
    }
    differential(Link::L3, 262_144);
}

/// The differential run on the entry for `link`, `frames` frames unless
/// `FWMARK_DIFF_FRAMES` says otherwise.
fn differential(link: Link, frames: u64) {
    let seed = env_u64("FWMARK_DIFF_SEED").unwrap_or_else(|| fastrand::u64(..));
    let total = env_u64("FWMARK_DIFF_FRAMES").unwrap_or(frames) as usize;
    say(&format!(
        "differential ({link:?} entry): seed {seed} ({total} frames); replay with \
         FWMARK_DIFF_SEED={seed}"
    ));
    // libtest shows stdout of a failing test: the seed is there too.
    println!("differential: seed {seed}");
    let started = Instant::now();

    let setups = [
        Setup::new("rich-a", RICH_A),
        Setup::new("rich-b", RICH_B),
        Setup::new("example", EXAMPLE),
    ];
    // Generations: A, B, the example, A again.
    let schedule = [0usize, 1, 2, 0];
    let mut h = Harness::on(link, RICH_A).expect("load the classifier");
    let mut rows: BTreeMap<Kind, Row> = BTreeMap::new();
    let mut per_config: BTreeMap<&str, u64> = BTreeMap::new();
    let mut kernel_total = GlobalCounters::default();
    let mut model_total = GlobalCounters::default();

    for (round, &si) in schedule.iter().enumerate() {
        let setup = &setups[si];
        if round > 0 {
            h.datapath
                .publish_simple(&setup.ruleset)
                .expect("publish the next config");
        }
        let slots: Vec<u32> = (0..setup.ruleset.rules.len() as u32).collect();
        let mut generator = Generator::new(round_seed(seed, round), Targets::new(&setup.config));
        let frames = total / schedule.len() + usize::from(round < total % schedule.len());
        let mut done = 0;
        while done < frames {
            let n = BATCH.min(frames - done);
            let batch: Vec<Generated> = (0..n).map(|_| generator.next_frame()).collect();
            let global_before = h.global().expect("global counters");
            let rules_before = h
                .datapath
                .maps
                .rule_counters(&slots)
                .expect("rule counters");
            let mut want = GlobalCounters::default();
            let mut want_rules = vec![RuleCounters::default(); slots.len()];
            for (i, g) in batch.iter().enumerate() {
                let failure = Failure {
                    link,
                    seed,
                    setup,
                    round,
                    index: done + i,
                    generated: g,
                };
                let row = rows.entry(g.kind).or_default();
                row.frames += 1;
                let Some(d) = check_frame(&h, setup, &failure) else {
                    row.refused += 1;
                    continue;
                };
                d.count(&mut want);
                match d.outcome {
                    Outcome::Marked(hit) => {
                        row.marked += 1;
                        let Parse::Ip(key) = &d.parsed.result else {
                            unreachable!("only IP packets are marked");
                        };
                        want_rules[hit.rule].packets += 1;
                        want_rules[hit.rule].bytes +=
                            (model_bytes(link, &g.frame).len() - key.l3_offset) as u64;
                        if d.icmp_error() {
                            want_rules[hit.rule].icmp_errors += 1;
                        }
                    }
                    Outcome::NoMatch => row.no_match += 1,
                    Outcome::NonIp => row.non_ip += 1,
                    Outcome::Malformed => row.malformed += 1,
                }
                if d.later_fragment() {
                    row.later_fragment += 1;
                }
            }
            let got = diff_global(&h.global().expect("global counters"), &global_before);
            let rules_after = h
                .datapath
                .maps
                .rule_counters(&slots)
                .expect("rule counters");
            let got_rules: Vec<RuleCounters> = rules_after
                .iter()
                .zip(&rules_before)
                .map(|(a, b)| RuleCounters {
                    packets: a.packets - b.packets,
                    bytes: a.bytes - b.bytes,
                    icmp_errors: a.icmp_errors - b.icmp_errors,
                })
                .collect();
            if got != want || got_rules != want_rules {
                locate_counter_mismatch(&h, link, setup, seed, round, done, &batch, &slots);
                panic!(
                    "counters of round {round} ({}), frames {done}..{}: kernel {got:?}, model \
                     {want:?}; per rule kernel {got_rules:?}, model {want_rules:?} \
                     (no single frame reproduced it); replay with FWMARK_DIFF_SEED={seed}",
                    setup.name,
                    done + n
                );
            }
            for (t, d) in [(&mut kernel_total, &got), (&mut model_total, &want)] {
                t.seen += d.seen;
                t.marked += d.marked;
                t.no_match += d.no_match;
                t.non_ip += d.non_ip;
                t.later_fragment += d.later_fragment;
                t.malformed += d.malformed;
                t.icmp_error += d.icmp_error;
            }
            done += n;
        }
        *per_config.entry(setup.name).or_default() += frames as u64;
    }

    let elapsed = started.elapsed();
    let mut total_row = Row::default();
    let mut report = format!(
        "differential ({link:?} entry): seed {seed}: {total} frames in {:.1} s, configs \
         {per_config:?}\n\
         {:<22} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8} {:>8}\n",
        elapsed.as_secs_f64(),
        "kind",
        "frames",
        "marked",
        "no_match",
        "non_ip",
        "malformed",
        "later_fr",
        "refused"
    );
    for kind in Kind::ALL {
        let r = rows.remove(&kind).unwrap_or_default();
        report += &format!(
            "{:<22} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8} {:>8}\n",
            format!("{kind:?}"),
            r.frames,
            r.marked,
            r.no_match,
            r.non_ip,
            r.malformed,
            r.later_fragment,
            r.refused
        );
        total_row.frames += r.frames;
        total_row.marked += r.marked;
        total_row.no_match += r.no_match;
        total_row.non_ip += r.non_ip;
        total_row.malformed += r.malformed;
        total_row.later_fragment += r.later_fragment;
        total_row.refused += r.refused;
    }
    report += &format!(
        "{:<22} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8} {:>8}\n\
         kernel counters {kernel_total:?}",
        "total",
        total_row.frames,
        total_row.marked,
        total_row.no_match,
        total_row.non_ip,
        total_row.malformed,
        total_row.later_fragment,
        total_row.refused
    );
    say(&report);

    assert_eq!(total_row.frames, total as u64);
    assert_eq!(kernel_total, model_total);
    assert_eq!(
        kernel_total.seen + total_row.refused,
        total as u64,
        "every frame is either run or refused"
    );
    // The generator must reach every outcome, or the comparison proves little.
    for (what, n) in [
        ("marked", total_row.marked),
        ("no_match", total_row.no_match),
        ("non_ip", total_row.non_ip),
        ("malformed", total_row.malformed),
        ("later_fragment", total_row.later_fragment),
        ("refused", total_row.refused),
        ("icmp_error", kernel_total.icmp_error),
    ] {
        assert!(
            n > total as u64 / 1000,
            "only {n} frames were {what}: the generator misses a kind"
        );
    }
}

/// After a batch's counters differ: replays it frame by frame, reading the
/// counters around each one, and fails on the first frame that moves them
/// differently from the model.
#[allow(clippy::too_many_arguments)]
fn locate_counter_mismatch(
    h: &Harness,
    link: Link,
    setup: &Setup,
    seed: u64,
    round: usize,
    first: usize,
    batch: &[Generated],
    slots: &[u32],
) {
    for (i, g) in batch.iter().enumerate() {
        let failure = Failure {
            link,
            seed,
            setup,
            round,
            index: first + i,
            generated: g,
        };
        let before = h.global().expect("global counters");
        let rules_before = h.datapath.maps.rule_counters(slots).expect("rule counters");
        let Some(d) = check_frame(h, setup, &failure) else {
            continue;
        };
        let mut want = GlobalCounters::default();
        d.count(&mut want);
        let got = diff_global(&h.global().expect("global counters"), &before);
        if got != want {
            failure.fail(&format!(
                "global counters differ: kernel added {got:?}, model {want:?}"
            ));
        }
        let rules_after = h.datapath.maps.rule_counters(slots).expect("rule counters");
        for (slot, (a, b)) in rules_after.iter().zip(&rules_before).enumerate() {
            let moved = (a.packets - b.packets, a.bytes - b.bytes);
            let want = match (d.outcome, &d.parsed.result) {
                (Outcome::Marked(hit), Parse::Ip(key)) if hit.rule == slot => (
                    1,
                    (model_bytes(link, &g.frame).len() - key.l3_offset) as u64,
                ),
                _ => (0, 0),
            };
            if moved != want {
                failure.fail(&format!(
                    "rule {slot} counters moved by {moved:?} (packets, bytes), the model says {want:?}"
                ));
            }
        }
    }
}
