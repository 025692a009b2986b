//! What the fuzz targets check, beyond "no panic". Each target is a thin
//! `fuzz_target!` over one function here; they call the library functions
//! the `fwmark` binary calls (`Config::parse` + `Ruleset::compile` are
//! `Loaded::from_text`, behind `check`, `run`, `apply` and `export`;
//! `import::import` is `fwmark import`).
//!
//! The invariants are the ones fwmark documents (README, doc comments):
//! - a config that validates has the documented shape (names, marks inside
//!   masks, sorted port ranges, prefixes without host bits, ...);
//! - it compiles, or is refused as a conflict or as too large, exactly when
//!   it expands to more than `MAX_ENTRIES`;
//! - the compiled ruleset marks every packet by the documented precedence
//!   (exact address and port, exact address, longest prefix, port before all
//!   ports at equal length), checked against a naive reading of the config;
//! - `fwmark export --format iptables`/`ip6tables` imports back to the same
//!   marks (README, "Migrating"), and `export --format nft` renders;
//! - a config diffed against itself is empty, and the entry counts of a diff
//!   add up;
//! - `fwmark import` never produces a config that does not validate (it calls
//!   that a bug), and a config it produces gives every (address, protocol,
//!   port, later fragment) the mark iptables would: checked against an
//!   evaluation of the parsed rules in iptables order (last match wins, masks
//!   applied in turn, jumps, RETURN, ACCEPT).
//!
//! - `frame`: any bytes are a frame for the reference classifier
//!   (`fwmark_core::model`, what `fwmark explain --hex` runs), with
//!   `icmp_errors` on and off: a marked frame's mark is the compiled
//!   lookup's for its key, or for an ICMP error's quoted key; the flag
//!   changes nothing but ICMP of the frame's own family; an ICMP error
//!   marked whole is malformed when cut anywhere before the end of its 8
//!   quoted transport bytes; `explain` renders every frame.
//!
//! Work per input is bounded (see `BUDGET`), so a slow input does not stall
//! the fuzzer: probes are then sampled evenly.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use fwmark_core::{
    config::{Config, DEFAULT_MASK, PortRange, Proto},
    diff, explain, export,
    import::{
        self, ImportError,
        parse::{Action, Family, Parsed},
    },
    precedence::Rank,
    ruleset::{MAX_ENTRIES, Ruleset, RulesetError},
};
use ipnet::IpNet;

/// Rough number of rule or entry visits allowed per input for the
/// reference checks; beyond it probes are sampled.
const BUDGET: usize = 1 << 19;

/// Configs that expand to more entries than this are not compiled (except
/// beyond `MAX_ENTRIES`, where compiling must refuse at once): compiling
/// millions of entries per input would stall fuzzing, and the code path is
/// the same loop.
const COMPILE_LIMIT: usize = 1 << 16;

/// The three protocols and their numbers.
const PROTOS: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Sctp];

/// The mark function of a packet's outcome, as `f(0)` and `f(!0)`: two
/// `(mark & !M) ^ V` or `(mark & !M) | (V & M)` functions are equal exactly
/// when they agree on these two marks.
type MarkFn = (u32, u32);

/// What fwmark does to the mark: `None` leaves it alone.
fn fwmark_fn(target: Option<(u32, u32)>) -> MarkFn {
    let f = |m: u32| match target {
        Some((mark, mask)) => (m & !mask) | (mark & mask),
        None => m,
    };
    (f(0), f(u32::MAX))
}

/// Addresses around each prefix: its first, second, last and second-to-last
/// address, and the addresses just outside it.
fn probe_addrs<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Vec<IpAddr> {
    let step = |a: IpAddr, d: i128| -> Option<IpAddr> {
        match a {
            IpAddr::V4(v) => u32::try_from(i128::from(u32::from(v)) + d)
                .ok()
                .map(|x| IpAddr::V4(x.into())),
            IpAddr::V6(v) => u128::from(v)
                .checked_add_signed(d)
                .map(|x| IpAddr::V6(x.into())),
        }
    };
    let mut out = BTreeSet::new();
    for net in nets {
        let (lo, hi) = (net.network(), net.broadcast());
        out.extend(
            [
                Some(lo),
                Some(hi),
                step(lo, 1),
                step(lo, -1),
                step(hi, 1),
                step(hi, -1),
            ]
            .into_iter()
            .flatten(),
        );
    }
    out.into_iter().collect()
}

/// Ports around each range (both ends and their neighbours), the extremes,
/// and `None`: a later fragment, which carries no port.
fn probe_ports<'a>(ranges: impl IntoIterator<Item = &'a PortRange>) -> Vec<Option<u16>> {
    let mut out = BTreeSet::from([Some(1), Some(65535), None]);
    for r in ranges {
        for p in [
            r.lo.checked_sub(1),
            Some(r.lo),
            Some(r.hi),
            r.hi.checked_add(1),
        ]
        .into_iter()
        .flatten()
        .filter(|&p| p != 0)
        {
            out.insert(Some(p));
        }
    }
    out.into_iter().collect()
}

/// Every (address, protocol, port) probe, sampled evenly so that
/// `probes * cost_each` stays within `BUDGET`.
fn probes(
    addrs: &[IpAddr],
    ports: &[Option<u16>],
    cost_each: usize,
) -> impl Iterator<Item = (IpAddr, Proto, Option<u16>)> {
    let total = addrs.len() * PROTOS.len() * ports.len();
    let stride = (total.saturating_mul(cost_each.max(1)) / BUDGET).max(1);
    let (addrs, ports) = (addrs.to_vec(), ports.to_vec());
    (0..total).step_by(stride).map(move |i| {
        let port = ports[i % ports.len()];
        let rest = i / ports.len();
        (
            addrs[rest / PROTOS.len()],
            PROTOS[rest % PROTOS.len()],
            port,
        )
    })
}

/// The mark and mask fwmark's precedence ([`Rank`]) picks for a packet,
/// read straight from the config: among the (vip, proto, port item)s that
/// match, the longest prefix wins (an exact address being the longest), at
/// equal length a port item before an all-ports one; later fragments
/// (`port == None`) match all-ports items only. Ties have one mark, since
/// the config compiled (no conflict).
fn by_precedence(
    config: &Config,
    addr: IpAddr,
    proto: Proto,
    port: Option<u16>,
) -> Option<(u32, u32)> {
    let mut best: Option<(Rank, (u32, u32))> = None;
    for s in &config.services {
        if !s.protos.contains(&proto) {
            continue;
        }
        let with_port = match (&s.ports, port) {
            (None, _) => Some(false),
            (Some(ranges), Some(p)) if ranges.iter().any(|r| r.lo <= p && p <= r.hi) => Some(true),
            (Some(_), _) => None,
        };
        let Some(with_port) = with_port else { continue };
        for vip in s.vips.iter().filter(|v| v.contains(&addr)) {
            let rank = Rank::new(vip.prefix_len(), !with_port);
            let target = (s.mark, s.mask);
            match best {
                Some((r, t)) if r == rank => assert_eq!(
                    t, target,
                    "two services tie for {addr} {proto} {port:?} with different marks, yet the config compiled"
                ),
                Some((r, _)) if r < rank => {}
                _ => best = Some((rank, target)),
            }
        }
    }
    best.map(|(_, t)| t)
}

/// The shape `Config::parse` promises for a config it accepts.
fn check_shape(config: &Config) {
    assert!(!config.services.is_empty(), "a valid config has a service");
    let mut names = BTreeSet::new();
    for s in &config.services {
        assert!(names.insert(&s.name), "duplicate name {:?}", s.name);
        assert!(
            !s.name.trim().is_empty() && !s.name.chars().any(char::is_control),
            "bad name {:?}",
            s.name
        );
        assert!(s.line >= 1);
        assert!(!s.vips.is_empty() && !s.protos.is_empty(), "{s:?}");
        for (i, v) in s.vips.iter().enumerate() {
            assert_eq!(v.addr(), v.network(), "host bits set in {v}");
            assert!(!s.vips[..i].contains(v), "duplicate vip {v}");
        }
        for (i, p) in s.protos.iter().enumerate() {
            assert!(!s.protos[..i].contains(p), "duplicate proto {p}");
        }
        if let Some(ports) = &s.ports {
            assert!(!ports.is_empty(), "empty port list accepted");
            for r in ports {
                assert!(1 <= r.lo && r.lo <= r.hi, "bad range {r:?}");
            }
            assert!(
                ports.windows(2).all(|w| w[0] < w[1]),
                "ports not sorted and deduplicated: {ports:?}"
            );
        }
        assert_ne!(s.mask, 0, "mask 0 accepted");
        assert_eq!(s.mark & !s.mask, 0, "mark outside the mask accepted");
        assert!(
            s.mark != 0 || s.mask != DEFAULT_MASK,
            "mark 0 accepted under the full mask"
        );
    }
}

/// `fwmark check`/`run`/`apply`/`export` on config text.
pub fn config(data: &[u8]) {
    // The binary reads the file with `read_to_string`: other bytes are a
    // read error before any parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::parse(text, "fuzz.toml") {
        Ok(c) => c,
        Err(errors) => {
            assert!(!errors.0.is_empty(), "rejected without a reason");
            let lines = text.split('\n').count();
            for e in &errors.0 {
                assert!(
                    (1..=lines).contains(&e.line) && e.column >= 1,
                    "error outside the file ({lines} lines): {e}"
                );
                assert_eq!(e.file, "fuzz.toml");
            }
            let _ = errors.to_string();
            return;
        }
    };
    check_shape(&config);

    let entries = Ruleset::expansion(&config);
    if entries > COMPILE_LIMIT && entries <= MAX_ENTRIES {
        return;
    }
    let ruleset = match Ruleset::compile(&config) {
        Ok(r) => r,
        Err(RulesetError::TooLarge { entries: e, .. }) => {
            // Refused before compiling (the estimate) or after (ranges
            // beyond a table's 8, or split by earlier rules, expand).
            assert!(e == entries || entries <= MAX_ENTRIES);
            assert!(e > MAX_ENTRIES, "refused {e} entries as too many");
            return;
        }
        Err(RulesetError::Conflict(c)) => {
            assert_ne!(
                (c.first_mark, c.first_mask),
                (c.second_mark, c.second_mask),
                "a conflict between equal marks"
            );
            let _ = c.to_string();
            return;
        }
    };
    assert!(entries <= MAX_ENTRIES, "compiled {entries} entries");
    let rules: usize = config
        .services
        .iter()
        .map(|s| s.vips.len() * s.protos.len() * s.ports.as_ref().map_or(1, Vec::len))
        .sum();
    assert_eq!(
        ruleset.rules.len(),
        rules,
        "one rule per (service, vip, proto, port item)"
    );
    // Every entry covers at least one port of one rule, disjoint from the
    // others: at most one entry per port of every rule.
    let ports: usize = config
        .services
        .iter()
        .map(|s| {
            let ports = s
                .ports
                .as_ref()
                .map_or(1, |ps| ps.iter().map(|p| p.len()).sum());
            s.vips.len() * s.protos.len() * ports
        })
        .sum();
    assert!(ruleset.entries() <= ports);
    for r in &ruleset.ranges {
        let s = &config.services[ruleset.rules[r.target.rule as usize].service];
        assert_eq!((r.target.mark, r.target.mask), (s.mark, s.mask));
        assert!(r.lo < r.hi, "a range of one port is an exact entry");
    }
    for (_, t) in &ruleset.exact {
        let s = &config.services[ruleset.rules[t.rule as usize].service];
        assert_eq!((t.mark, t.mask), (s.mark, s.mask));
    }
    for e in &ruleset.prefix {
        let s = &config.services[ruleset.rules[e.target.rule as usize].service];
        assert_eq!((e.target.mark, e.target.mask), (s.mark, s.mask));
    }

    // Precedence: the compiled ruleset against a naive reading of the config.
    let exact: HashMap<_, _> = ruleset.exact.iter().copied().collect();
    let addrs = probe_addrs(config.services.iter().flat_map(|s| &s.vips));
    let ports = probe_ports(
        config
            .services
            .iter()
            .flat_map(|s| s.ports.iter().flatten()),
    );
    let cost = ruleset.prefix.len() + ruleset.rules.len();
    for (addr, proto, port) in probes(&addrs, &ports, cost) {
        let got = ruleset
            .classify_with(&exact, addr, proto.number(), port)
            .map(|t| (t.mark, t.mask));
        let want = by_precedence(&config, addr, proto, port);
        assert_eq!(got, want, "{addr} {proto} port {port:?}");
    }

    // apply's diff: nothing against itself; counts add up against another.
    let d = diff::diff((&config, &ruleset), (&config, &ruleset));
    assert!(d.is_empty(), "a config differs from itself: {d}");
    assert_eq!(
        (d.entries_added, d.entries_removed, d.entries_remarked),
        (0, 0, 0)
    );
    assert_eq!(d.entries_unchanged, ruleset.entries());
    let other = example();
    let d = diff::diff((&other.0, &other.1), (&config, &ruleset));
    assert_eq!(
        d.entries_added + d.entries_remarked + d.entries_unchanged,
        ruleset.entries()
    );
    assert_eq!(
        d.entries_removed + d.entries_remarked + d.entries_unchanged,
        other.1.entries()
    );
    let _ = d.to_string();

    // export: nft renders; iptables + ip6tables import back to the same marks.
    let _ = export::nft(&config, &ruleset);
    if ruleset.rules.len().saturating_mul(entries) > COMPILE_LIMIT * 4 {
        // Importing folds every region's port intervals into entries of
        // its own; keep that within what a fuzz iteration can afford.
        return;
    }
    let text = format!(
        "{}{}",
        export::iptables(&config, &ruleset, false),
        export::iptables(&config, &ruleset, true)
    );
    let back = import::import(&text, None, false)
        .unwrap_or_else(|e| panic!("the export does not import back: {e}\n--- export:\n{text}"));
    let back_exact: HashMap<_, _> = back.ruleset.exact.iter().copied().collect();
    let cost = cost + back.ruleset.prefix.len();
    for (addr, proto, port) in probes(&addrs, &ports, cost) {
        let want = ruleset
            .classify_with(&exact, addr, proto.number(), port)
            .map(|t| (t.mark, t.mask));
        let got = back
            .ruleset
            .classify_with(&back_exact, addr, proto.number(), port)
            .map(|t| (t.mark, t.mask));
        assert_eq!(
            fwmark_fn(got),
            fwmark_fn(want),
            "{addr} {proto} port {port:?}: export imported back as {got:x?}, config {want:x?}\n\
             --- export:\n{text}\n--- imported:\n{}",
            back.config_text
        );
    }
}

/// The example config, compiled: the other side of a diff.
fn example() -> &'static (Config, Ruleset) {
    static EXAMPLE: std::sync::OnceLock<(Config, Ruleset)> = std::sync::OnceLock::new();
    EXAMPLE.get_or_init(|| {
        let c = Config::parse(
            include_str!("../../fwmark.example.toml"),
            "fwmark.example.toml",
        )
        .expect("the example config is valid");
        let r = Ruleset::compile(&c).expect("the example config compiles");
        (c, r)
    })
}

/// iptables' mangle PREROUTING on a packet, over the parsed rules: every
/// matching rule in order, unconditional jumps into user chains (a jump that
/// loops or is conditional is skipped, as `import` does with
/// `--skip-unsupported`; otherwise it refuses the input), RETURN leaves a
/// chain, ACCEPT the table. Returns the final mark.
fn iptables_mark(parsed: &Parsed, addr: IpAddr, proto: Proto, port: Option<u16>, mark: u32) -> u32 {
    fn chain(
        parsed: &Parsed,
        family: Family,
        name: &str,
        pkt: (IpAddr, Proto, Option<u16>),
        mark: &mut u32,
        stack: &mut Vec<String>,
    ) -> bool {
        let Some(rules) = parsed.chains.get(&(family, name.to_string())) else {
            return false;
        };
        let (addr, proto, port) = pkt;
        for rule in rules {
            let matches = rule.proto.is_none_or(|p| p == proto)
                && rule.dst.is_none_or(|d| d.contains(&addr))
                && match (&rule.ports, port) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(rs), Some(p)) => rs.iter().any(|r| r.lo <= p && p <= r.hi),
                };
            match rule.action {
                Action::Jump => {
                    let target = rule.jump.as_deref().expect("a jump has a target");
                    if !rule.unconditional || stack.iter().any(|s| s == target) {
                        continue;
                    }
                    stack.push(target.to_string());
                    let accepted = chain(parsed, family, target, pkt, mark, stack);
                    stack.pop();
                    if accepted {
                        return true;
                    }
                }
                _ if !matches => {}
                Action::Mark { mask, value } => *mark = (*mark & !mask) ^ value,
                Action::Return => return false,
                Action::Accept => return true,
            }
        }
        false
    }
    let family = if addr.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    };
    let mut m = mark;
    chain(
        parsed,
        family,
        "PREROUTING",
        (addr, proto, port),
        &mut m,
        &mut vec!["PREROUTING".to_string()],
    );
    m
}

/// Rules `iptables_mark` may visit per packet: PREROUTING of both families
/// with every chain counted again at every jump to it.
fn program_size(parsed: &Parsed) -> usize {
    fn size(
        parsed: &Parsed,
        key: (Family, String),
        memo: &mut HashMap<(Family, String), usize>,
    ) -> usize {
        if let Some(&n) = memo.get(&key) {
            return n;
        }
        memo.insert(key.clone(), 0); // a loop counts nothing more
        let mut n = 0usize;
        for rule in parsed.chains.get(&key).into_iter().flatten() {
            n = n.saturating_add(1);
            if let (Action::Jump, Some(target)) = (rule.action, &rule.jump) {
                n = n.saturating_add(size(parsed, (key.0, target.clone()), memo));
            }
        }
        memo.insert(key, n);
        n
    }
    let mut memo = HashMap::new();
    [Family::V4, Family::V6]
        .into_iter()
        .map(|f| size(parsed, (f, "PREROUTING".to_string()), &mut memo))
        .fold(0, usize::saturating_add)
}

/// `fwmark import --iface eth0` on iptables-save output or commands, and
/// with `--skip-unsupported` when it refuses unsupported rules.
pub fn import(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let iface = Some("eth0");
    let parsed = import::parse::parse(text, iface);
    for rule in parsed.chains.values().flatten() {
        for r in rule.ports.iter().flatten() {
            assert!(
                1 <= r.lo && r.lo <= r.hi,
                "line {}: parsed port range {}-{} breaks PortRange's lo <= hi",
                rule.line,
                r.lo,
                r.hi
            );
        }
        if let Some(d) = rule.dst {
            assert_eq!(
                d.addr(),
                d.network(),
                "line {}: {d} not truncated",
                rule.line
            );
            assert_eq!(d.addr().is_ipv4(), rule.family == Family::V4);
        }
    }
    let imported = match import::import(text, iface, false) {
        Err(ImportError::Unsupported(list)) => {
            assert!(!list.is_empty());
            import::import(text, iface, true)
        }
        other => other,
    };
    let imported = match imported {
        Ok(i) => i,
        Err(ImportError::Invalid(e)) => panic!("import wrote a config that does not validate: {e}"),
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    // What `fwmark check` would say about the printed config.
    let again = Config::parse(&imported.config_text, "imported config")
        .expect("the printed config validates");
    assert_eq!(again, imported.config);
    check_shape(&imported.config);

    // Every probe gets the mark iptables gives it.
    let rules: Vec<_> = parsed.chains.values().flatten().collect();
    let whole: [IpNet; 2] = [
        "0.0.0.0/0".parse().expect("net"),
        "::/0".parse().expect("net"),
    ];
    let addrs = probe_addrs(rules.iter().filter_map(|r| r.dst.as_ref()).chain(&whole));
    let ports = probe_ports(rules.iter().flat_map(|r| r.ports.iter().flatten()));
    let exact: HashMap<_, _> = imported.ruleset.exact.iter().copied().collect();
    let cost = program_size(&parsed) + imported.ruleset.prefix.len();
    for (addr, proto, port) in probes(&addrs, &ports, cost) {
        let want = (
            iptables_mark(&parsed, addr, proto, port, 0),
            iptables_mark(&parsed, addr, proto, port, u32::MAX),
        );
        let got = imported
            .ruleset
            .classify_with(&exact, addr, proto.number(), port)
            .map(|t| (t.mark, t.mask));
        assert_eq!(
            fwmark_fn(got),
            want,
            "{addr} {proto} port {port:?}: fwmark {got:x?}, iptables f(0)={:#x} f(!0)={:#x}\n\
             --- imported:\n{}",
            want.0,
            want.1,
            imported.config_text
        );
    }
}

/// The config the `frame` target classifies by: exact addresses, a port
/// range, every-port services and prefixes of both families, a partial mask.
const FRAME_CONFIG: &str = r#"
[[service]]
name = "web"
vip = ["192.0.2.10", "2001:db8::10"]
proto = "tcp"
ports = [80, 443]
mark = 80

[[service]]
name = "dns"
vip = ["192.0.2.53", "2001:db8::53"]
proto = ["udp", "tcp"]
ports = [53]
mark = 53

[[service]]
name = "sig"
vip = "2001:db8::90"
proto = "sctp"
ports = ["2905-2910"]
mark = 90

[[service]]
name = "net"
vip = ["198.51.100.0/24", "2001:db8:1::/48"]
proto = ["tcp", "udp", "sctp"]
mark = 0x4000
mask = 0xff00
"#;

/// The configs of the `frame` target: `icmp_errors` off and on, compiled.
struct FrameSetup {
    off: (Config, Ruleset, fwmark_core::model::Model),
    on: (Config, Ruleset, fwmark_core::model::Model),
}

fn frame_setup() -> &'static FrameSetup {
    static SETUP: std::sync::OnceLock<FrameSetup> = std::sync::OnceLock::new();
    SETUP.get_or_init(|| {
        let make = |text: &str| {
            let config = Config::parse(text, "frame.toml").expect("the frame config is valid");
            let ruleset = Ruleset::compile(&config).expect("the frame config compiles");
            let model = fwmark_core::model::Model::new(&config);
            (config, ruleset, model)
        };
        FrameSetup {
            off: make(FRAME_CONFIG),
            on: make(&format!("icmp_errors = true\n{FRAME_CONFIG}")),
        }
    })
}

/// The `frame` target: the first 4 bytes are the mark the frame arrives
/// with, the rest the frame.
pub fn frame(data: &[u8]) {
    use fwmark_core::model::{Icmp, Outcome, Parse, is_icmp};
    let Some((mark, frame)) = data.split_first_chunk::<4>() else {
        return;
    };
    let mark = u32::from_le_bytes(*mark);
    let setup = frame_setup();
    let mut decisions = Vec::new();
    for (config, ruleset, model) in [&setup.off, &setup.on] {
        let d = model.classify(frame, mark);
        // The compiled entries' lookup agrees with the model's, by the
        // quoted key for an ICMP error.
        if let Parse::Ip(key) = &d.parsed.result {
            let looked_up = match (&d.icmp, d.outcome) {
                (_, Outcome::Malformed) => None,
                (Some(Icmp::Error { quoted, .. }), _) => {
                    Some(ruleset.classify(quoted.src, quoted.proto, quoted.port))
                }
                _ => Some(ruleset.classify(key.dst, key.proto, key.port)),
            };
            if let Some(target) = looked_up {
                let want = target.map_or(mark, |t| (mark & !t.mask) | (t.mark & t.mask));
                assert_eq!(d.mark, want, "model and compiled lookup differ: {d:?}");
            }
            if d.icmp.is_some() {
                assert!(config.icmp_errors && is_icmp(key), "{d:?}");
            }
        } else {
            assert_eq!(d.mark, mark);
        }
        // Counted once, as the classifier counts.
        let mut c = fwmark_common::GlobalCounters::default();
        d.count(&mut c);
        assert_eq!(c.seen, c.marked + c.no_match + c.non_ip + c.malformed);
        assert!(c.icmp_error <= c.marked);
        // `fwmark explain --hex` of any frame renders.
        let text = explain::explain(config, frame, mark);
        assert!(text.starts_with("frame: "));
        decisions.push(d);
    }
    let (off, on) = (&decisions[0], &decisions[1]);
    // The flag changes ICMP of the frame's own family only.
    let icmp = matches!(&off.parsed.result, Parse::Ip(k) if is_icmp(k));
    if !icmp {
        assert_eq!((off.outcome, off.mark), (on.outcome, on.mark));
    }
    // An ICMP error marked whole is malformed cut anywhere before the end
    // of its 8 quoted transport bytes (sampled: 16 cuts).
    if let (true, Some(Icmp::Error { quoted, .. })) = (on.icmp_error(), &on.icmp) {
        if quoted.port.is_some() {
            let Some(fwmark_core::model::Layer::QuotedPorts { offset, .. }) = on
                .parsed
                .layers
                .iter()
                .find(|l| matches!(l, fwmark_core::model::Layer::QuotedPorts { .. }))
            else {
                panic!("a marked ICMP error with a port has its quoted ports: {on:?}");
            };
            let end = offset + 8;
            let Parse::Ip(key) = &on.parsed.result else {
                unreachable!()
            };
            let step = (end / 16).max(1);
            for len in (key.l4_offset..end).step_by(step) {
                let cut = setup.on.2.classify(&frame[..len], mark);
                assert_eq!(cut.outcome, Outcome::Malformed, "cut at {len}: {cut:?}");
            }
        }
    }
}
