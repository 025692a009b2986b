//! `fwmark import`: turn iptables mangle MARK rules into an fwmark config
//! that gives every (address, protocol, port) the mark iptables gives it.
//!
//! iptables applies every matching rule in order, so with overlapping rules
//! the last one wins and, with masks, each rule works on the mark the earlier
//! ones left. fwmark applies one entry, chosen by precedence (exact address,
//! longest prefix, port before all ports). The importer bridges the two
//! exactly: for every destination prefix the rules use (a *region*: the
//! addresses whose longest matching rule prefix is that one), protocol and
//! port interval it folds the rules in order into one effect
//! `mark = (mark & !M) ^ V`, and writes an entry wherever fwmark's fallback
//! would not give that effect already. A region's all-ports entry is the fold
//! with every port match false, which is also what later IP fragments get in
//! iptables. Effects fwmark cannot write (`V` outside `M`, or setting the
//! whole mark to 0) are refused, naming the rules involved.

pub mod parse;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt::Write as _,
};

use ipnet::IpNet;
use parse::{Action, Family, Parsed, Rule, Unsupported};

use crate::{
    config::{Config, PortRange, Proto},
    ruleset::Ruleset,
    text::{Prefix, RuleText},
};

/// A composed mark effect: `mark = (mark & !mask) ^ value`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Effect {
    pub mask: u32,
    pub value: u32,
}

impl Effect {
    fn is_identity(self) -> bool {
        self.mask == 0 && self.value == 0
    }

    /// `self`, then `next`.
    fn then(self, next: Effect) -> Effect {
        Effect {
            mask: self.mask | next.mask,
            value: (self.value & !next.mask) ^ next.value,
        }
    }

    /// Applies the effect to a mark.
    pub fn apply(self, mark: u32) -> u32 {
        (mark & !self.mask) ^ self.value
    }
}

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{}", format_unsupported(.0))]
    Unsupported(Vec<Unsupported>),
    #[error("{0}")]
    Inexpressible(String),
    #[error(
        "no MARK rule in the mangle table's PREROUTING chain (or chains it jumps to) to import"
    )]
    Nothing,
    #[error(
        "the {family:?} mangle PREROUTING chain, with the chains it jumps to copied at every \
         jump, has more than {MAX_PROGRAM_RULES} rules; fwmark import follows jumps by copying \
         the chain: jump to each chain once"
    )]
    TooLarge { family: Family },
    #[error("the imported config does not validate (a bug in fwmark import): {0}")]
    Invalid(String),
}

fn format_unsupported(list: &[Unsupported]) -> String {
    let mut s = String::new();
    for u in list {
        let _ = writeln!(s, "line {}: {}", u.line, u.reason);
    }
    let _ = write!(
        s,
        "{} rules cannot be imported; fix or remove them, or pass --skip-unsupported to import the rest",
        list.len()
    );
    s
}

/// What an import produced.
#[derive(Debug)]
pub struct Imported {
    /// The fwmark config, TOML.
    pub config_text: String,
    pub config: Config,
    pub ruleset: Ruleset,
    /// MARK rules that took part.
    pub rules: usize,
    /// Lines for the operator (skipped rules, ignored tables, notes).
    pub report: Vec<String>,
}

/// A region of one family and protocol: the addresses of `prefix` not in a
/// longer prefix the rules use.
#[derive(Clone, Copy, Debug)]
struct Region {
    prefix: IpNet,
    proto: Proto,
}

/// A rule flattened with the chain structure kept: jumps are blocks.
enum Node<'a> {
    Rule(&'a Rule),
    Block(Vec<Node<'a>>),
}

/// The program in evaluation order: each rule with the index just past
/// the chain (block) it sits in, where a RETURN continues.
struct Flat<'a> {
    rule: &'a Rule,
    block_end: usize,
}

fn flatten<'a>(nodes: &[Node<'a>], out: &mut Vec<Flat<'a>>) {
    let start = out.len();
    for node in nodes {
        match node {
            Node::Rule(r) => out.push(Flat {
                rule: r,
                block_end: 0,
            }),
            Node::Block(inner) => flatten(inner, out),
        }
    }
    let end = out.len();
    // Rules of nested blocks already have their (smaller) end set.
    for f in &mut out[start..end] {
        if f.block_end == 0 {
            f.block_end = end;
        }
    }
}

fn contains(outer: &IpNet, inner: &IpNet) -> bool {
    outer.prefix_len() <= inner.prefix_len() && outer.contains(&inner.network())
}

/// Does `rule` match packets of `region`, ignoring its ports?
fn matches_region(rule: &Rule, region: &Region) -> bool {
    rule.proto.is_none_or(|p| p == region.proto)
        && rule
            .dst
            .as_ref()
            .is_none_or(|d| contains(d, &region.prefix))
}

fn matches_port(rule: &Rule, port: Option<u16>) -> bool {
    match (&rule.ports, port) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(ranges), Some(p)) => ranges.iter().any(|r| r.lo <= p && p <= r.hi),
    }
}

/// Folds the rules that match a region (`relevant`: indices into `flat`, in
/// order) for one port (`None`: a later fragment, no port matches); returns
/// the effect and the lines of the MARK rules applied.
fn eval(flat: &[Flat<'_>], relevant: &[usize], port: Option<u16>) -> (Effect, Vec<usize>) {
    let mut effect = Effect::default();
    let mut lines = Vec::new();
    let mut resume = 0;
    for &i in relevant {
        if i < resume {
            continue;
        }
        let rule = flat[i].rule;
        if !matches_port(rule, port) {
            continue;
        }
        match rule.action {
            Action::Mark { mask, value } => {
                effect = effect.then(Effect { mask, value });
                lines.push(rule.line);
            }
            Action::Return => resume = flat[i].block_end,
            Action::Accept => break,
            Action::Jump => {}
        }
    }
    (effect, lines)
}

/// Most rules the program of one family may have once jumps are followed:
/// a chain is copied at every jump to it, so a few lines jumping twice into
/// the next chain, level after level, would otherwise grow without bound.
pub const MAX_PROGRAM_RULES: usize = 1_000_000;

/// Builds the program of one family from PREROUTING, following jumps;
/// `size` counts the rules placed, and the build stops once it passes
/// `MAX_PROGRAM_RULES`.
fn build<'a>(
    parsed: &'a Parsed,
    family: Family,
    chain: &str,
    stack: &mut Vec<String>,
    used: &mut HashSet<String>,
    unsupported: &mut Vec<Unsupported>,
    size: &mut usize,
) -> Vec<Node<'a>> {
    let Some(rules) = parsed.chains.get(&(family, chain.to_string())) else {
        return Vec::new();
    };
    used.insert(chain.to_string());
    let mut nodes = Vec::new();
    for rule in rules {
        *size += 1;
        if *size > MAX_PROGRAM_RULES {
            break;
        }
        if let (Action::Jump, Some(target)) = (rule.action, &rule.jump) {
            if !rule.unconditional {
                unsupported.push(Unsupported {
                    line: rule.line,
                    reason: format!(
                        "a conditional jump to {target}: only unconditional jumps to user chains are followed"
                    ),
                    chain: None,
                });
                continue;
            }
            if stack.contains(target) {
                unsupported.push(Unsupported {
                    line: rule.line,
                    reason: format!("the jump to {target} loops"),
                    chain: None,
                });
                continue;
            }
            if !parsed.chains.contains_key(&(family, target.clone())) {
                // An empty or undeclared chain: nothing happens there.
                used.insert(target.clone());
                continue;
            }
            stack.push(target.clone());
            let block = build(parsed, family, target, stack, used, unsupported, size);
            stack.pop();
            nodes.push(Node::Block(block));
        } else {
            nodes.push(Node::Rule(rule));
        }
    }
    nodes
}

/// One fwmark entry the import needs.
#[derive(Clone, Debug)]
struct Entry {
    prefix: IpNet,
    proto: Proto,
    /// `None`: every port.
    ports: Option<PortRange>,
    effect: Effect,
    /// Comment of the last MARK rule that shaped the effect.
    name: Option<String>,
    /// Smallest line among those rules, for ordering.
    first_line: usize,
}

const PROTOS: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Sctp];

/// Imports `text` (iptables-save output or iptables commands).
pub fn import(
    text: &str,
    iface: Option<&str>,
    skip_unsupported: bool,
) -> Result<Imported, ImportError> {
    let parsed = parse::parse(text, iface);
    let mut unsupported = parsed.unsupported.clone();
    let mut report = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    let mut imported_rules = 0;
    let comments: BTreeMap<usize, String> = parsed
        .chains
        .values()
        .flatten()
        .filter_map(|r| r.comment.clone().map(|c| (r.line, c)))
        .collect();
    let mut ignored = parsed.ignored.clone();
    let mut inexpressible = Vec::new();
    let mut checks: Vec<Check> = Vec::new();
    // Mangle chains PREROUTING reaches, in either family.
    let mut reached: HashSet<String> = HashSet::from(["PREROUTING".to_string()]);
    let mut all_prefixes: HashSet<IpNet> = HashSet::new();

    for family in [Family::V4, Family::V6] {
        let mut used = HashSet::new();
        let mut size = 0;
        let program = build(
            &parsed,
            family,
            "PREROUTING",
            &mut vec!["PREROUTING".to_string()],
            &mut used,
            &mut unsupported,
            &mut size,
        );
        if size > MAX_PROGRAM_RULES {
            return Err(ImportError::TooLarge { family });
        }
        for ((f, chain), rules) in &parsed.chains {
            if *f == family && !used.contains(chain) {
                *ignored.entry(format!("mangle/{chain}")).or_default() += rules.len();
            }
        }
        reached.extend(used);
        let mut flat = Vec::new();
        flatten(&program, &mut flat);
        imported_rules += flat
            .iter()
            .filter(|f| matches!(f.rule.action, Action::Mark { .. }))
            .count();
        let whole: IpNet = match family {
            Family::V4 => "0.0.0.0/0".parse().expect("valid"),
            Family::V6 => "::/0".parse().expect("valid"),
        };
        // Rules by destination prefix, in program order.
        let mut by_prefix: BTreeMap<IpNet, Vec<usize>> = BTreeMap::new();
        for (i, f) in flat.iter().enumerate() {
            by_prefix
                .entry(f.rule.dst.unwrap_or(whole))
                .or_default()
                .push(i);
        }
        all_prefixes.extend(by_prefix.keys().copied());
        for (&prefix, own_rules) in &by_prefix {
            // The rules of this prefix and of every prefix containing it.
            let mut around: Vec<usize> = (0..=prefix.prefix_len())
                .filter_map(|len| {
                    let sup = IpNet::new(prefix.network(), len).ok()?.trunc();
                    by_prefix.get(&sup)
                })
                .flatten()
                .copied()
                .collect();
            around.sort_unstable();
            around.dedup();
            for proto in PROTOS {
                let region = Region { prefix, proto };
                // Without a rule of this very prefix and protocol, the region
                // behaves as its parent region, and fwmark's fallback to the
                // parent's entries gives exactly that: no entries needed.
                let own = own_rules
                    .iter()
                    .any(|&i| flat[i].rule.proto.is_none_or(|p| p == proto));
                let relevant: Vec<usize> = around
                    .iter()
                    .copied()
                    .filter(|&i| matches_region(flat[i].rule, &region))
                    .collect();
                if !own
                    || !relevant
                        .iter()
                        .any(|&i| matches!(flat[i].rule.action, Action::Mark { .. }))
                {
                    continue;
                }
                region_entries(
                    &flat,
                    &region,
                    &relevant,
                    &comments,
                    &mut entries,
                    &mut inexpressible,
                    &mut checks,
                );
            }
        }
    }

    // Rules PREROUTING never reaches do not matter (e.g. libvirt's CHECKSUM
    // rules in mangle POSTROUTING): they are among the ignored ones.
    unsupported.retain(|u| {
        let keep = u.chain.as_ref().is_none_or(|c| reached.contains(c));
        if !keep {
            let chain = u.chain.clone().unwrap_or_default();
            *ignored.entry(format!("mangle/{chain}")).or_default() += 1;
        }
        keep
    });
    if !ignored.is_empty() {
        let parts: Vec<String> = ignored.iter().map(|(k, n)| format!("{k} {n}")).collect();
        report.push(format!(
            "ignored {} rules outside the mangle table's PREROUTING path: {}",
            ignored.values().sum::<usize>(),
            parts.join(", ")
        ));
    }
    report.extend(parsed.notes.iter().cloned());
    unsupported.sort_by_key(|u| u.line);
    if !unsupported.is_empty() {
        if !skip_unsupported {
            return Err(ImportError::Unsupported(unsupported));
        }
        for u in &unsupported {
            report.push(format!("skipped line {}: {}", u.line, u.reason));
        }
    }
    if !inexpressible.is_empty() {
        return Err(ImportError::Inexpressible(inexpressible.join("\n")));
    }
    if entries.is_empty() {
        return Err(ImportError::Nothing);
    }
    let config_text = render(&entries, imported_rules);
    let config = Config::parse(&config_text, "imported config")
        .map_err(|e| ImportError::Invalid(e.to_string()))?;
    let ruleset = Ruleset::compile(&config).map_err(|e| ImportError::Invalid(e.to_string()))?;
    let mismatches = verify(&checks, &all_prefixes, &ruleset);
    if !mismatches.is_empty() {
        return Err(ImportError::Inexpressible(mismatches.join("\n")));
    }
    Ok(Imported {
        config_text,
        config,
        ruleset,
        rules: imported_rules,
        report,
    })
}

/// The entries one region needs.
fn region_entries(
    flat: &[Flat<'_>],
    region: &Region,
    relevant: &[usize],
    comments: &BTreeMap<usize, String>,
    entries: &mut Vec<Entry>,
    inexpressible: &mut Vec<String>,
    checks: &mut Vec<Check>,
) {
    let point = |port: Option<u16>| eval(flat, relevant, port);
    // Port intervals on which every relevant rule's port match is constant.
    let mut bounds: BTreeSet<u32> = BTreeSet::from([1, 65536]);
    for &i in relevant {
        for r in flat[i].rule.ports.iter().flatten() {
            bounds.insert(u32::from(r.lo));
            bounds.insert(u32::from(r.hi) + 1);
        }
    }
    let bounds: Vec<u32> = bounds
        .into_iter()
        .filter(|b| (1..=65536).contains(b))
        .collect();
    let (default, default_lines) = point(None);
    let mut intervals: Vec<(u16, u16, Effect, Vec<usize>)> = Vec::new();
    // Every interval before merging: the entries of wider prefixes change
    // at these bounds too (their rules are among `relevant`), so fwmark's
    // fallback may differ inside a merged interval and each is checked.
    let mut windows: Vec<(u16, Effect, Vec<usize>)> = Vec::new();
    for w in bounds.windows(2) {
        let (lo, hi) = (w[0] as u16, (w[1] - 1) as u16);
        let (effect, lines) = point(Some(lo));
        windows.push((lo, effect, lines.clone()));
        match intervals.last_mut() {
            Some(last) if last.2 == effect && u32::from(last.1) + 1 == u32::from(lo) => {
                last.1 = hi;
            }
            _ => intervals.push((lo, hi, effect, lines)),
        }
    }
    let mut add = |ports: Option<PortRange>, effect: Effect, lines: &[usize]| {
        let where_ = RuleText {
            vip: &region.prefix,
            proto: region.proto,
            ports,
        };
        let rules = lines
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        if effect.value & !effect.mask != 0 {
            inexpressible.push(format!(
                "{where_}: rules on lines {rules} XOR bits outside their mask ({:#x}/{:#x}); \
                 fwmark only sets bits inside the mask",
                effect.value, effect.mask
            ));
            return;
        }
        if effect.value == 0 && effect.mask == u32::MAX {
            inexpressible.push(format!(
                "{where_}: rules on lines {rules} set the whole mark to 0; fwmark cannot \
                 write mark 0 (drop those rules: no mark is the same unless another tool marks first)"
            ));
            return;
        }
        entries.push(Entry {
            prefix: region.prefix,
            proto: region.proto,
            ports,
            effect,
            name: lines.iter().rev().find_map(|l| comments.get(l).cloned()),
            first_line: lines.iter().copied().min().unwrap_or(usize::MAX),
        });
    };
    checks.push(Check {
        region: *region,
        default: (default, default_lines.clone()),
        intervals: windows,
    });
    if !default.is_identity() {
        add(None, default, &default_lines);
    }
    for (lo, hi, effect, lines) in intervals {
        if effect != default && !effect.is_identity() {
            add(Some(PortRange { lo, hi }), effect, &lines);
        }
    }
}

/// What iptables does in one region, to check the config against.
struct Check {
    region: Region,
    default: (Effect, Vec<usize>),
    /// (first port of the interval, effect, MARK rule lines), one per
    /// interval on which every relevant rule's port match is constant.
    intervals: Vec<(u16, Effect, Vec<usize>)>,
}

/// An address whose longest rule prefix is `prefix`: one outside every
/// longer prefix of `all` (none when they cover `prefix` whole). Every such
/// address is marked alike, by iptables and by fwmark, so one stands for
/// the region.
fn representative(prefix: &IpNet, all: &HashSet<IpNet>) -> Option<std::net::IpAddr> {
    let inside: Vec<IpNet> = all
        .iter()
        .copied()
        .filter(|n| n != prefix && contains(prefix, n))
        .collect();
    uncovered(*prefix, &inside)
}

/// An address of `net` in none of `inside`: `net`'s first address when no
/// prefix of `inside` lies within it, else the search goes on in its halves.
fn uncovered(net: IpNet, inside: &[IpNet]) -> Option<std::net::IpAddr> {
    let within: Vec<IpNet> = inside
        .iter()
        .copied()
        .filter(|n| contains(&net, n))
        .collect();
    if within.is_empty() {
        return Some(net.network());
    }
    if within.contains(&net) {
        return None;
    }
    // `net` is shorter than a prefix within it, so it has halves.
    net.subnets(net.prefix_len() + 1)
        .ok()?
        .find_map(|half| uncovered(half, &within))
}

/// Checks that the config gives every region, protocol and port interval
/// (and later fragments) the effect iptables gives it; fwmark has no entry
/// meaning "leave the mark alone", so a region iptables leaves alone under a
/// wider marking rule (RETURN/ACCEPT exceptions) cannot be expressed.
fn verify(checks: &[Check], all: &HashSet<IpNet>, ruleset: &Ruleset) -> Vec<String> {
    let exact: std::collections::HashMap<fwmark_common::ServiceKey, fwmark_common::Target> =
        ruleset.exact.iter().copied().collect();
    let lookup = |addr, proto: Proto, port: Option<u16>| {
        ruleset.classify_with(&exact, addr, proto.number(), port)
    };
    let mut out = Vec::new();
    let mut representatives = std::collections::HashMap::new();
    for c in checks {
        let Some(addr) = *representatives
            .entry(c.region.prefix)
            .or_insert_with(|| representative(&c.region.prefix, all))
        else {
            continue;
        };
        let points = std::iter::once((None, &c.default.0, &c.default.1))
            .chain(c.intervals.iter().map(|(lo, e, l)| (Some(*lo), e, l)));
        for (port, want, lines) in points {
            let got = lookup(addr, c.region.proto, port).map(|t| (t.mark, t.mask));
            let want_pair = (!want.is_identity()).then_some((want.value, want.mask));
            if got != want_pair {
                let place = match port {
                    Some(p) => format!("{addr} {} port {p}", c.region.proto),
                    None => format!("{addr} {} (later fragments)", c.region.proto),
                };
                let lines = lines
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                out.push(match want_pair {
                    None => format!(
                        "{place}: iptables leaves the mark alone here (a RETURN or ACCEPT cuts \
                         the rules), but fwmark has no \"leave it\" entry and would apply a wider \
                         match's mark {:#x}; fwmark cannot express this rule set",
                        got.map_or(0, |g| g.0)
                    ),
                    Some((v, m)) => format!(
                        "{place}: iptables gives {v:#x}/{m:#x} (rules on lines {lines}), the \
                         imported config {got:x?}; fwmark cannot express this rule set"
                    ),
                });
            }
        }
    }
    out
}

/// One `[[service]]` block being assembled.
struct Block {
    name: Option<String>,
    effect: Effect,
    vips: Vec<IpNet>,
    protos: Vec<Proto>,
    ports: Option<Vec<PortRange>>,
    first_line: usize,
}

/// Groups entries into services whose cross product (vips x protos x
/// ports) is exactly the entries, and writes the config.
fn render(entries: &[Entry], rules: usize) -> String {
    // (name, effect, prefix, proto) -> port items (None = all ports).
    type Key = (Option<String>, Effect, IpNet, Proto);
    let mut by_point: BTreeMap<Key, (Vec<Option<PortRange>>, usize)> = BTreeMap::new();
    for e in entries {
        let slot = by_point
            .entry((e.name.clone(), e.effect, e.prefix, e.proto))
            .or_insert((Vec::new(), usize::MAX));
        slot.0.push(e.ports);
        slot.1 = slot.1.min(e.first_line);
    }
    // Split all-ports from port lists, then merge prefixes with equal
    // (name, effect, proto, ports), then protocols with equal (.., vips, ports).
    type Key2 = (Option<String>, Effect, Proto, Option<Vec<PortRange>>);
    let mut by_ports: BTreeMap<Key2, (Vec<IpNet>, usize)> = BTreeMap::new();
    for ((name, effect, prefix, proto), (items, line)) in by_point {
        let mut ports: Vec<PortRange> = items.iter().flatten().copied().collect();
        ports.sort();
        let mut push = |p: Option<Vec<PortRange>>| {
            let slot = by_ports
                .entry((name.clone(), effect, proto, p))
                .or_insert((Vec::new(), usize::MAX));
            slot.0.push(prefix);
            slot.1 = slot.1.min(line);
        };
        if items.iter().any(Option::is_none) {
            push(None);
        }
        if !ports.is_empty() {
            push(Some(ports));
        }
    }
    type Key3 = (Option<String>, Effect, Vec<IpNet>, Option<Vec<PortRange>>);
    let mut by_vips: BTreeMap<Key3, (Vec<Proto>, usize)> = BTreeMap::new();
    for ((name, effect, proto, ports), (mut vips, line)) in by_ports {
        vips.sort();
        let slot = by_vips
            .entry((name, effect, vips, ports))
            .or_insert((Vec::new(), usize::MAX));
        slot.0.push(proto);
        slot.1 = slot.1.min(line);
    }
    let mut blocks: Vec<Block> = by_vips
        .into_iter()
        .map(
            |((name, effect, vips, ports), (protos, first_line))| Block {
                name,
                effect,
                vips,
                protos,
                ports,
                first_line,
            },
        )
        .collect();
    blocks.sort_by_key(|b| b.first_line);

    let mut out = format!(
        "# Imported by `fwmark import` from {rules} iptables MARK rules.\n\
         # Every (address, protocol, port) gets the mark iptables gave it; rules were\n\
         # folded in iptables order (last match wins, masks applied in turn).\n"
    );
    let mut used: HashSet<String> = HashSet::new();
    for b in &blocks {
        let base = b
            .name
            .as_deref()
            .map(sanitize)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| {
                if b.effect.mask == u32::MAX {
                    format!("mark-{:#x}", b.effect.value)
                } else {
                    format!("mark-{:#x}-{:#x}", b.effect.value, b.effect.mask)
                }
            });
        let mut name = base.clone();
        let mut n = 2;
        while !used.insert(name.clone()) {
            name = format!("{base}-{n}");
            n += 1;
        }
        let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
        let vips: Vec<String> = b
            .vips
            .iter()
            .map(|v| quote(&Prefix(v).to_string()))
            .collect();
        let protos: Vec<String> = b.protos.iter().map(|p| quote(p.name())).collect();
        let _ = writeln!(out, "\n[[service]]");
        let _ = writeln!(out, "name  = {}", quote(&name));
        let _ = writeln!(out, "vip   = [{}]", vips.join(", "));
        let _ = writeln!(out, "proto = [{}]", protos.join(", "));
        if let Some(ports) = &b.ports {
            let items: Vec<String> = ports
                .iter()
                .map(|p| {
                    if p.lo == p.hi {
                        p.lo.to_string()
                    } else {
                        quote(&format!("{}-{}", p.lo, p.hi))
                    }
                })
                .collect();
            let _ = writeln!(out, "ports = [{}]", items.join(", "));
        }
        let _ = writeln!(out, "mark  = {:#x}", b.effect.value);
        if b.effect.mask != u32::MAX {
            let _ = writeln!(out, "mask  = {:#x}", b.effect.mask);
        }
    }
    out
}

/// A service name from an iptables comment.
/// Control characters become spaces, then the ends are trimmed: a comment
/// of only blanks and control characters gives no name (the config refuses
/// blank names).
fn sanitize(s: &str) -> String {
    let printable: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    printable.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries_of(text: &str) -> Imported {
        import(text, None, false).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn effects_compose_like_xt_mark() {
        let set = |v: u32, m: u32| Effect {
            mask: m | v,
            value: v,
        };
        let xset = |v: u32, m: u32| Effect { mask: m, value: v };
        let e = set(0x50, u32::MAX).then(xset(0x4000, 0x4000));
        assert_eq!(e.apply(0x1234), 0x4050);
        let e = xset(0x1, 0x1).then(xset(0x1, 0x0)); // set bit, then xor it away
        assert_eq!(e.apply(0), 0);
        assert_eq!(e.apply(0xf0), 0xf0);
        assert_eq!(set(0x1, 0x3).apply(0xff), 0xfd);
    }

    #[test]
    fn the_source_text_imports_to_one_service() {
        let i = entries_of(
            "*mangle\n\
             -A PREROUTING -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -j MARK --set-xmark 0x50/0xffffffff\n\
             -A PREROUTING -d 192.0.2.10/32 -p tcp -m tcp --dport 443 -j MARK --set-xmark 0x50/0xffffffff\nCOMMIT\n",
        );
        assert_eq!(i.config.services.len(), 1);
        let s = &i.config.services[0];
        assert_eq!((s.mark, s.ports.as_ref().unwrap().len()), (80, 2));
        assert_eq!(i.ruleset.exact.len(), 2);
    }

    #[test]
    fn later_rules_override_earlier_ones() {
        let i = entries_of(
            "*mangle\n-A PREROUTING -d 192.0.2.0/24 -p tcp -j MARK --set-mark 1\n\
             -A PREROUTING -d 192.0.2.10 -p tcp --dport 1000:2000 -j MARK --set-mark 2\n\
             -A PREROUTING -d 192.0.2.0/24 -p tcp --dport 1500 -j MARK --set-mark 3\nCOMMIT\n",
        );
        let text = &i.config_text;
        // The /24 keeps mark 1 for every port but 1500 (3); the /32 gets 2
        // on 1000-1499 and 1501-2000, 3 on 1500, 1 elsewhere.
        assert!(text.contains("\"1000-1499\", \"1501-2000\""), "{text}");
        // The two ranges stay two range entries, not 1,000 ports.
        assert_eq!(i.ruleset.ranges.len(), 2);
        let addr: std::net::IpAddr = "192.0.2.10".parse().unwrap();
        let marks: Vec<Option<u32>> = [999, 1000, 1499, 1500, 1501, 2000, 2001]
            .into_iter()
            .map(|p| i.ruleset.classify(addr, 6, Some(p)).map(|t| t.mark))
            .collect();
        assert_eq!(
            marks,
            [1, 2, 2, 3, 2, 2, 1].map(Some),
            "ports 999, 1000, 1499, 1500, 1501, 2000, 2001"
        );
    }

    #[test]
    fn refuses_what_fwmark_cannot_write() {
        let err = import(
            "*mangle\n-A PREROUTING -d 192.0.2.1 -p tcp -j MARK --xor-mark 0x1\nCOMMIT\n",
            None,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("lines 2 XOR bits outside their mask"), "{err}");
        let err = import(
            "*mangle\n-A PREROUTING -d 192.0.2.1 -p tcp -j MARK --set-mark 1\n\
             -A PREROUTING -d 192.0.2.1 -p tcp --dport 22 -j MARK --set-mark 0\nCOMMIT\n",
            None,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("192.0.2.1 tcp port 22: rules on lines 2, 3 set the whole mark to 0"),
            "{err}"
        );
    }

    #[test]
    fn follows_unconditional_jumps_and_return() {
        let i = entries_of(
            "*mangle\n:FWMARK - [0:0]\n-A PREROUTING -j FWMARK\n\
             -A FWMARK -d 192.0.2.10 -p udp --dport 53 -j MARK --set-xmark 0x35/0xffffffff\n\
             -A FWMARK -d 192.0.2.10 -p udp --dport 53 -j RETURN\n\
             -A FWMARK -d 192.0.2.0/24 -p udp -j MARK --set-xmark 0x9/0xffffffff\nCOMMIT\n",
        );
        let marks: BTreeSet<(u16, u32)> = i
            .ruleset
            .exact
            .iter()
            .map(|(k, t)| (u16::from_be_bytes(k.port), t.mark))
            .chain(
                i.ruleset
                    .prefix
                    .iter()
                    .map(|e| (u16::from_be_bytes(e.key.port), e.target.mark)),
            )
            .collect();
        assert!(marks.contains(&(53, 0x35)), "{marks:?}");
        assert!(marks.contains(&(0, 9)), "{marks:?}");
    }

    #[test]
    fn exceptions_under_a_wider_mark_are_refused() {
        for text in [
            "*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -d 192.0.2.10/32 -j RETURN\n\
             -A PREROUTING -d 192.0.2.0/24 -p tcp -j MARK --set-mark 1\nCOMMIT\n",
            "*mangle\n-A PREROUTING -p tcp --dport 22 -j ACCEPT\n\
             -A PREROUTING -d 192.0.2.10/32 -p tcp -j MARK --set-mark 1\nCOMMIT\n",
        ] {
            let err = import(text, None, false).unwrap_err().to_string();
            assert!(err.contains("iptables leaves the mark alone here"), "{err}");
            assert!(err.contains("192.0.2."), "{err}");
        }
    }

    /// Found by the import fuzz target: a RETURN for a whole address
    /// under a wider prefix's port rule. iptables leaves port 80 of
    /// 198.51.100.200 alone; fwmark would fall back to the /25's port entry.
    /// The merged interval 1-65535 (all "leave alone") hid port 80 from the
    /// check.
    #[test]
    fn an_exception_under_a_wider_port_rule_is_refused() {
        let err = import(
            "*mangle\n-A PREROUTING -d 198.51.100.200/32 -p tcp -j RETURN\n\
             -A PREROUTING -d 198.51.100.128/25 -p tcp --dport 80 -j MARK --set-mark 0x65\nCOMMIT\n",
            None,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("198.51.100.200 tcp port 80: iptables leaves the mark alone here"),
            "{err}"
        );
    }

    /// Found by the import fuzz target: the /24's first two and last two
    /// addresses lie in longer prefixes, so the check found no address of
    /// the /24's own region and skipped it; 198.51.100.64-127 are that
    /// region, and there iptables leaves port 80 alone while fwmark would
    /// apply the /24's every-port mark.
    #[test]
    fn a_region_between_longer_prefixes_is_checked() {
        let err = import(
            "*mangle\n-A PREROUTING -d 198.51.100.0/26 -p tcp --dport 80 -j MARK --set-mark 2\n\
             -A PREROUTING -d 198.51.100.128/25 -p tcp -j MARK --set-mark 3\n\
             -A PREROUTING -d 198.51.100.0/24 -p tcp --dport 80 -j RETURN\n\
             -A PREROUTING -d 198.51.100.0/24 -p tcp -j MARK --set-mark 1\nCOMMIT\n",
            None,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("198.51.100.64 tcp port 80: iptables leaves the mark alone here"),
            "{err}"
        );
        let all: HashSet<IpNet> = ["10.0.0.0/8", "10.0.0.0/9", "10.128.0.0/9", "10.0.0.0/24"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(representative(&"10.0.0.0/8".parse().unwrap(), &all), None);
        assert_eq!(
            representative(&"10.0.0.0/9".parse().unwrap(), &all),
            Some("10.0.1.0".parse().unwrap())
        );
    }

    /// Chains that jump twice into the next one, 25 levels deep: a 1 KB
    /// input that copied 2^24 rules (44 s and 5.8 GB in a debug build).
    #[test]
    fn jumps_that_multiply_the_program_are_refused() {
        let mut text = String::from("*mangle\n");
        for i in 0..25 {
            text.push_str(&format!(":C{i} - [0:0]\n"));
        }
        text.push_str("-A PREROUTING -j C0\n");
        for i in 0..24 {
            text.push_str(&format!("-A C{i} -j C{}\n-A C{i} -j C{}\n", i + 1, i + 1));
        }
        text.push_str("-A C24 -d 192.0.2.1 -p tcp -j MARK --set-mark 1\nCOMMIT\n");
        let err = import(&text, None, true).unwrap_err();
        assert!(
            matches!(err, ImportError::TooLarge { family: Family::V4 }),
            "{err}"
        );
        assert!(err.to_string().contains("more than 1000000 rules"), "{err}");
        // Ten levels (C9 copied 512 times, its two rules now MARK rules) import.
        let small: String = text
            .lines()
            .filter(|l| {
                !(10..25)
                    .any(|i| l.starts_with(&format!("-A C{i} ")) || *l == format!(":C{i} - [0:0]"))
            })
            .map(|l| {
                format!(
                    "{}\n",
                    l.replace("-j C10", "-d 192.0.2.1 -p tcp -j MARK --set-mark 1")
                )
            })
            .collect();
        let i = entries_of(&small);
        assert_eq!(i.rules, 1024);
    }

    #[test]
    fn unsupported_rules_fail_unless_skipped() {
        let text = "*mangle\n-A PREROUTING -s 10.0.0.1 -j MARK --set-mark 1\n\
                    -A PREROUTING -d 192.0.2.1 -p tcp -j MARK --set-mark 2\nCOMMIT\n*nat\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n";
        let err = import(text, None, false).unwrap_err().to_string();
        assert!(err.starts_with("line 2: source matches (-s)"), "{err}");
        let i = import(text, None, true).unwrap();
        assert_eq!(i.config.services.len(), 1);
        assert!(
            i.report.iter().any(|l| l.contains("nat/POSTROUTING 1")),
            "{:?}",
            i.report
        );
        assert!(
            i.report.iter().any(|l| l.starts_with("skipped line 2")),
            "{:?}",
            i.report
        );
    }

    #[test]
    fn unsupported_rules_outside_the_prerouting_path_are_only_ignored() {
        let i = entries_of(
            "*mangle\n-A POSTROUTING -o virbr0 -p udp --dport 68 -j CHECKSUM --checksum-fill\n\
             -A PREROUTING -d 192.0.2.1 -p tcp -j MARK --set-mark 2\nCOMMIT\n",
        );
        assert!(
            i.report.iter().any(|l| l.contains("mangle/POSTROUTING 1")),
            "{:?}",
            i.report
        );
    }

    /// Found by the import fuzz target: a comment of control characters
    /// became a name of spaces, and the printed config did not validate.
    #[test]
    fn comments_of_control_characters_give_no_name() {
        let i = entries_of(
            "*mangle\n-A PREROUTING -d 192.0.2.1 -p tcp -m comment --comment \"\x04\x00 \" \
             -j MARK --set-mark 2\n-A PREROUTING -d 192.0.2.2 -p tcp -m comment --comment \" \tweb\x07\" \
             -j MARK --set-mark 3\nCOMMIT\n",
        );
        let names: Vec<&str> = i.config.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, vec!["mark-0x2", "web"]);
    }

    #[test]
    fn comments_name_services_and_hex_marks_stay_hex() {
        let i = entries_of(
            "*mangle\n-A PREROUTING -d 2001:db8::10/128 -p tcp -m multiport --dports 80,443,8000:8002 \
             -m comment --comment \"web v6\" -j MARK --set-mark 0x56\nCOMMIT\n",
        );
        assert!(
            i.config_text.contains("name  = \"web v6\""),
            "{}",
            i.config_text
        );
        assert!(i.config_text.contains("mark  = 0x56"), "{}", i.config_text);
        assert!(
            i.config_text.contains("ports = [80, 443, \"8000-8002\"]"),
            "{}",
            i.config_text
        );
    }
}
