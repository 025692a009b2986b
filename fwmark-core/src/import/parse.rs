//! Reading `iptables-save` / `ip6tables-save` output and iptables command
//! lines (as in shell scripts and the Piranha documentation) into rules of
//! the mangle table's PREROUTING chain and the user chains it jumps to.

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::config::{PortRange, Proto};

/// Address family of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

/// What a rule does when it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `mark = (mark & !mask) ^ value` (xt_MARK's own form).
    Mark { mask: u32, value: u32 },
    /// Jump to a user chain.
    Jump,
    /// `-j RETURN`: leave the current chain.
    Return,
    /// `-j ACCEPT`: leave the table.
    Accept,
}

/// A rule of a chain, with its matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Line in the input.
    pub line: usize,
    pub family: Family,
    /// `None`: every protocol.
    pub proto: Option<Proto>,
    /// `None`: every destination of the family.
    pub dst: Option<IpNet>,
    /// `None`: every port.
    pub ports: Option<Vec<PortRange>>,
    pub action: Action,
    /// Target chain of a jump.
    pub jump: Option<String>,
    /// `-m comment --comment TEXT`.
    pub comment: Option<String>,
    /// The rule's matches are unconditional (only for jumps).
    pub unconditional: bool,
}

/// A rule that cannot be imported, with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsupported {
    pub line: usize,
    pub reason: String,
    /// The mangle chain it belongs to, when known: it matters only if
    /// PREROUTING reaches that chain.
    pub chain: Option<String>,
}

/// The parsed input.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Chains of the mangle table per family, rules in order.
    pub chains: BTreeMap<(Family, String), Vec<Rule>>,
    pub unsupported: Vec<Unsupported>,
    /// Rules in other tables or mangle chains, counted per "table/chain".
    pub ignored: BTreeMap<String, usize>,
    /// Interfaces named by `-i` that were dropped because they equal --iface.
    pub notes: Vec<String>,
    /// User chains declared (`:NAME - [0:0]` or `-N NAME`), per table.
    declared: std::collections::HashSet<(String, Family, String)>,
}

/// Splits a line into words, honouring double and single quotes and
/// backslash escapes as iptables-save and shells write them.
pub fn tokenize(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                in_word = true;
                let quote = c;
                loop {
                    match chars.next() {
                        Some(q) if q == quote => break,
                        Some('\\') if quote == '"' => match chars.next() {
                            Some(e) => cur.push(e),
                            None => return Err("unterminated quote".into()),
                        },
                        Some(ch) => cur.push(ch),
                        None => return Err("unterminated quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(e) = chars.next() {
                    cur.push(e);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// `V` or `V/M`, decimal or hex.
pub fn parse_value_mask(s: &str) -> Option<(u32, Option<u32>)> {
    use crate::text::parse_u32 as num;
    match s.split_once('/') {
        Some((v, m)) => Some((num(v)?, Some(num(m)?))),
        None => Some((num(s)?, None)),
    }
}

/// `N`, `A:B`, `:B` or `A:` as iptables reads them. Port 0 is not a port to
/// fwmark (packets to port 0 get a service's every-port mark), so a range
/// from 0 starts at 1 and a range of port 0 alone is refused.
fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let num = |t: &str| -> Result<u16, String> {
        t.parse()
            .map_err(|_| format!("{t:?} is not a port (0..=65535)"))
    };
    let (lo, hi) = match s.split_once(':') {
        Some((a, b)) => (
            if a.is_empty() { 0 } else { num(a)? },
            if b.is_empty() { 65535 } else { num(b)? },
        ),
        None => {
            let p = num(s)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(format!("range {s:?} is reversed"));
    }
    if hi == 0 {
        return Err(
            "port 0 alone cannot be matched by fwmark (it gives packets to port 0 a \
             service's every-port mark)"
                .into(),
        );
    }
    Ok(PortRange { lo: lo.max(1), hi })
}

/// Reads the whole input. `iface`: the interface fwmark will run on (rules
/// with `-i` are kept only for it).
pub fn parse(text: &str, iface: Option<&str>) -> Parsed {
    let mut out = Parsed::default();
    let mut table = String::new();
    let mut family = Family::V4;
    // Join backslash-continued lines, keeping the first line's number.
    let mut logical: Vec<(usize, String)> = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let (start, mut acc) = pending.take().unwrap_or((line_no, String::new()));
        if let Some(stripped) = raw.strip_suffix('\\') {
            acc.push_str(stripped);
            acc.push(' ');
            pending = Some((start, acc));
        } else {
            acc.push_str(raw);
            logical.push((start, acc));
        }
    }
    if let Some(p) = pending {
        logical.push(p);
    }

    for (line, text) in logical {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            continue;
        }
        if let Some(comment) = trimmed.strip_prefix('#') {
            // The headers of iptables-save, iptables-nft-save,
            // ip6tables-legacy-save, ... and of `fwmark export`.
            if comment.contains("Generated by") || comment.contains("-save") {
                if comment.contains("ip6tables") {
                    family = Family::V6;
                } else if comment.contains("iptables") {
                    family = Family::V4;
                }
            }
            continue;
        }
        if let Some(t) = trimmed.strip_prefix('*') {
            table = t.trim().to_string();
            continue;
        }
        if trimmed == "COMMIT" {
            continue;
        }
        if let Some(decl) = trimmed.strip_prefix(':') {
            let mut parts = decl.split_whitespace();
            if let (Some(name), Some("-")) = (parts.next(), parts.next()) {
                out.declared
                    .insert((table.clone(), family, name.to_string()));
            }
            continue;
        }
        let words = match tokenize(trimmed) {
            Ok(w) => w,
            Err(e) => {
                out.unsupported.push(Unsupported {
                    line,
                    reason: format!("cannot split the line into words: {e}"),
                    chain: None,
                });
                continue;
            }
        };
        // `[pkts:bytes]` counters of `iptables-save -c`.
        let mut words: &[String] = &words;
        if words
            .first()
            .is_some_and(|w| w.starts_with('[') && w.ends_with(']'))
        {
            words = &words[1..];
        }
        // Command lines: `[/sbin/]iptables [-t TABLE] -A CHAIN ...`.
        let mut rule_table = table.clone();
        let mut rule_family = family;
        if let Some(first) = words.first() {
            let cmd = first.rsplit('/').next().unwrap_or(first);
            if cmd.starts_with("ip6tables") || cmd.starts_with("iptables") {
                if cmd.ends_with("-save") || cmd.ends_with("-restore") {
                    continue;
                }
                rule_family = if cmd.starts_with("ip6tables") {
                    Family::V6
                } else {
                    Family::V4
                };
                rule_table = "filter".into();
                words = &words[1..];
                if let Some(pos) = words.iter().position(|w| w == "-t" || w == "--table") {
                    let Some(t) = words.get(pos + 1) else {
                        out.unsupported.push(Unsupported {
                            line,
                            reason: "-t without a table name".into(),
                            chain: None,
                        });
                        continue;
                    };
                    if !["mangle", "filter", "nat", "raw", "security"].contains(&t.as_str()) {
                        let hint = ["-A", "-I", "-D", "-N"]
                            .iter()
                            .find(|op| t.ends_with(*op))
                            .map(|op| {
                                format!(
                                    " (a missing space: `-t {} {op}`?)",
                                    &t[..t.len() - op.len()]
                                )
                            })
                            .unwrap_or_default();
                        out.unsupported.push(Unsupported {
                            line,
                            reason: format!("unknown table {t:?}{hint}; the rule is not imported"),
                            chain: None,
                        });
                        continue;
                    }
                    rule_table = t.clone();
                    let mut rest = words[..pos].to_vec();
                    rest.extend_from_slice(&words[pos + 2..]);
                    let owned = rest;
                    parse_rule_words(&owned, line, &rule_table, rule_family, iface, &mut out);
                    continue;
                }
            } else if !first.starts_with('-') {
                // Some other shell command (modprobe, service, ...).
                continue;
            }
        }
        let owned = words.to_vec();
        parse_rule_words(&owned, line, &rule_table, rule_family, iface, &mut out);
    }
    out
}

fn parse_rule_words(
    words: &[String],
    line: usize,
    table: &str,
    family: Family,
    iface: Option<&str>,
    out: &mut Parsed,
) {
    let unsupported = |out: &mut Parsed, reason: String| {
        out.unsupported.push(Unsupported {
            line,
            reason,
            chain: None,
        });
    };
    let Some(op) = words.first() else { return };
    let (chain, rest, insert_at) = match op.as_str() {
        "-A" | "--append" => match words.get(1) {
            Some(c) => (c.clone(), &words[2..], None),
            None => return unsupported(out, "-A without a chain".into()),
        },
        "-I" | "--insert" => {
            let Some(c) = words.get(1) else {
                return unsupported(out, "-I without a chain".into());
            };
            match words.get(2).and_then(|w| w.parse::<usize>().ok()) {
                Some(n) => (c.clone(), &words[3..], Some(n.max(1) - 1)),
                None => (c.clone(), &words[2..], Some(0)),
            }
        }
        "-N" | "--new-chain" => {
            if let Some(name) = words.get(1) {
                out.declared
                    .insert((table.to_string(), family, name.clone()));
            }
            return;
        }
        "-P" | "--policy" | "-F" | "--flush" | "-X" | "-Z" => return,
        other => return unsupported(out, format!("{other} is not a rule (-A or -I)")),
    };
    if table != "mangle" {
        *out.ignored.entry(format!("{table}/{chain}")).or_default() += 1;
        return;
    }
    let chain_name = chain.clone();
    let unsupported = |out: &mut Parsed, reason: String| {
        out.unsupported.push(Unsupported {
            line,
            reason,
            chain: Some(chain_name.clone()),
        });
    };

    let mut rule = Rule {
        line,
        family,
        proto: None,
        dst: None,
        ports: None,
        action: Action::Accept,
        jump: None,
        comment: None,
        unconditional: true,
    };
    let mut target: Option<String> = None;
    let mut target_args: Vec<(String, String)> = Vec::new();
    let mut i = 0;
    let next = |i: &mut usize| -> Option<&String> {
        *i += 1;
        rest.get(*i)
    };
    while i < rest.len() {
        let w = rest[i].as_str();
        match w {
            "!" => return unsupported(out, "negation (!) cannot be expressed in fwmark".into()),
            "-p" | "--protocol" => {
                let Some(p) = next(&mut i) else {
                    return unsupported(out, "-p without a protocol".into());
                };
                match p.as_str() {
                    "all" | "0" => rule.proto = None,
                    other => match Proto::parse(other, true) {
                        Some(proto) => rule.proto = Some(proto),
                        None => {
                            return unsupported(
                                out,
                                format!("protocol {other:?}: fwmark marks tcp, udp and sctp only"),
                            );
                        }
                    },
                }
                rule.unconditional = false;
            }
            "-d" | "--destination" | "--dst" => {
                let Some(d) = next(&mut i) else {
                    return unsupported(out, "-d without an address".into());
                };
                if d.contains(',') {
                    return unsupported(out, format!("several destinations {d:?} in one rule"));
                }
                let net = if d.contains('/') {
                    d.parse::<IpNet>().map(|n| n.trunc()).ok()
                } else {
                    d.parse::<std::net::IpAddr>().map(IpNet::from).ok()
                };
                match net {
                    Some(n) => {
                        rule.family = if n.addr().is_ipv4() {
                            Family::V4
                        } else {
                            Family::V6
                        };
                        rule.dst = Some(n);
                    }
                    None => {
                        return unsupported(
                            out,
                            format!("-d {d:?}: not an address (host names are not resolved)"),
                        );
                    }
                }
                rule.unconditional = false;
            }
            "--dport" | "--destination-port" => {
                let Some(p) = next(&mut i) else {
                    return unsupported(out, "--dport without a port".into());
                };
                match parse_port_range(p) {
                    Ok(r) => rule.ports = Some(vec![r]),
                    Err(e) => return unsupported(out, format!("--dport {p:?}: {e}")),
                }
                rule.unconditional = false;
            }
            "--dports" | "--destination-ports" => {
                let Some(list) = next(&mut i) else {
                    return unsupported(out, "--dports without ports".into());
                };
                let mut ranges = Vec::new();
                for item in list.split(',') {
                    match parse_port_range(item) {
                        Ok(r) => ranges.push(r),
                        Err(e) => {
                            return unsupported(out, format!("--dports {list:?}: {e}"));
                        }
                    }
                }
                rule.ports = Some(ranges);
                rule.unconditional = false;
            }
            "-m" | "--match" => {
                let Some(m) = next(&mut i) else {
                    return unsupported(out, "-m without a module".into());
                };
                match m.as_str() {
                    "tcp" | "udp" | "sctp" | "multiport" | "comment" => {}
                    other => {
                        return unsupported(
                            out,
                            format!("match module {other:?} cannot be expressed in fwmark"),
                        );
                    }
                }
            }
            "--comment" => {
                let Some(c) = next(&mut i) else {
                    return unsupported(out, "--comment without text".into());
                };
                rule.comment = Some(c.clone());
            }
            "-i" | "--in-interface" => {
                let Some(name) = next(&mut i) else {
                    return unsupported(out, "-i without an interface".into());
                };
                if Some(name.as_str()) == iface {
                    out.notes.push(format!(
                        "line {line}: -i {name} dropped: fwmark runs on {name} only"
                    ));
                } else {
                    return unsupported(
                        out,
                        match iface {
                            Some(f) => format!("-i {name}: fwmark will run on {f}, not {name}"),
                            None => format!(
                                "-i {name}: pass --iface {name} if fwmark will run on {name}"
                            ),
                        },
                    );
                }
            }
            "-j" | "--jump" | "-g" | "--goto" => {
                if w == "-g" || w == "--goto" {
                    return unsupported(out, "-g (goto) is not supported; use -j".into());
                }
                let Some(t) = next(&mut i) else {
                    return unsupported(out, "-j without a target".into());
                };
                let known = ["MARK", "RETURN", "ACCEPT"].contains(&t.as_str())
                    || out
                        .declared
                        .contains(&(table.to_string(), rule.family, t.clone()));
                if !known {
                    return unsupported(
                        out,
                        format!(
                            "target {t} cannot be expressed in fwmark (only MARK, RETURN, ACCEPT \
                             and jumps to user chains)"
                        ),
                    );
                }
                target = Some(t.clone());
            }
            "--set-mark" | "--set-xmark" | "--and-mark" | "--or-mark" | "--xor-mark" => {
                let Some(v) = next(&mut i) else {
                    return unsupported(out, format!("{w} without a value"));
                };
                target_args.push((w.to_string(), v.clone()));
            }
            "-s" | "--source" | "--src" => {
                return unsupported(
                    out,
                    "source matches (-s) cannot be expressed in fwmark".into(),
                );
            }
            "--sport" | "--source-port" | "--sports" | "--source-ports" => {
                return unsupported(out, "source ports cannot be expressed in fwmark".into());
            }
            "-o" | "--out-interface" => {
                return unsupported(out, "-o has no meaning in PREROUTING".into());
            }
            "-f" | "--fragment" => {
                return unsupported(
                    out,
                    "fragment matches (-f) cannot be expressed in fwmark".into(),
                );
            }
            other => {
                return unsupported(out, format!("{other:?} cannot be expressed in fwmark"));
            }
        }
        i += 1;
    }

    match target.as_deref() {
        Some("MARK") => {
            let [(opt, value)] = target_args.as_slice() else {
                return unsupported(out, "MARK needs exactly one --set-mark/--set-xmark".into());
            };
            let Some((v, m)) = parse_value_mask(value) else {
                return unsupported(out, format!("{opt} {value:?}: not a number or VALUE/MASK"));
            };
            // The forms xt_MARK itself stores: mark = (mark & !mask) ^ value.
            let (mask, value) = match (opt.as_str(), m) {
                ("--set-mark", m) => (m.unwrap_or(u32::MAX) | v, v),
                ("--set-xmark", m) => (m.unwrap_or(u32::MAX), v),
                ("--and-mark", None) => (!v, 0),
                ("--or-mark", None) => (v, v),
                ("--xor-mark", None) => (0, v),
                _ => return unsupported(out, format!("{opt} takes no mask")),
            };
            rule.action = Action::Mark { mask, value };
        }
        Some("RETURN") => rule.action = Action::Return,
        Some("ACCEPT") => rule.action = Action::Accept,
        Some(chain_name)
            if out
                .declared
                .contains(&(table.to_string(), rule.family, chain_name.to_string())) =>
        {
            rule.action = Action::Jump;
            rule.jump = Some(chain_name.to_string());
        }
        Some(t) => {
            return unsupported(
                out,
                format!(
                    "target {t} cannot be expressed in fwmark (only MARK, RETURN, ACCEPT and \
                     jumps to user chains)"
                ),
            );
        }
        None => {
            return unsupported(
                out,
                "a rule without -j does nothing fwmark can import".into(),
            );
        }
    }
    let rules = out.chains.entry((rule.family, chain)).or_default();
    match insert_at {
        Some(n) => rules.insert(n.min(rules.len()), rule),
        None => rules.push(rule),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizes_quotes_and_escapes() {
        assert_eq!(
            tokenize(r#"-A X -m comment --comment "web \"v1\"" -j MARK"#).unwrap(),
            vec![
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "web \"v1\"",
                "-j",
                "MARK"
            ]
        );
        assert_eq!(tokenize("a 'b c' d").unwrap(), vec!["a", "b c", "d"]);
        assert!(tokenize("\"open").is_err());
    }

    #[test]
    fn values_and_masks_in_decimal_and_hex() {
        assert_eq!(parse_value_mask("80"), Some((80, None)));
        assert_eq!(parse_value_mask("0x50/0xff"), Some((0x50, Some(0xff))));
        assert_eq!(
            parse_value_mask("0x4000/0x4000"),
            Some((0x4000, Some(0x4000)))
        );
        assert_eq!(parse_value_mask("x"), None);
    }

    #[test]
    fn reads_save_output_and_command_lines() {
        let p = parse(
            "# Generated by iptables-save v1.8.9\n*mangle\n:PREROUTING ACCEPT [0:0]\n\
             [12:720] -A PREROUTING -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -j MARK --set-xmark 0x50/0xffffffff\n\
             COMMIT\n*filter\n-A INPUT -j ACCEPT\nCOMMIT\n\
             /sbin/iptables -t mangle -A PREROUTING -p udp -d 192.0.2.53 --dport 53 -j MARK --set-mark 53\n\
             /sbin/iptables -t mangle-A PREROUTING -p tcp -d 192.0.2.10/32 --dport 443 -j MARK --set-mark 80\n",
            None,
        );
        let rules = &p.chains[&(Family::V4, "PREROUTING".to_string())];
        assert_eq!(rules.len(), 2);
        assert_eq!(
            rules[0].action,
            Action::Mark {
                mask: u32::MAX,
                value: 0x50
            }
        );
        assert_eq!(rules[0].ports, Some(vec![PortRange { lo: 80, hi: 80 }]));
        assert_eq!(rules[1].line, 9);
        assert_eq!(p.ignored["filter/INPUT"], 1);
        assert_eq!(p.unsupported.len(), 1);
        assert_eq!(p.unsupported[0].line, 10);
        assert!(
            p.unsupported[0]
                .reason
                .contains("unknown table \"mangle-A\" (a missing space: `-t mangle -A`?)"),
            "{:?}",
            p.unsupported
        );
    }

    #[test]
    fn reports_what_it_cannot_express() {
        let p = parse(
            "*mangle\n-A PREROUTING -s 10.0.0.0/8 -j MARK --set-mark 1\n\
             -A PREROUTING ! -d 192.0.2.1 -j MARK --set-mark 1\n\
             -A PREROUTING -m mac --mac-source 00:11:22:33:44:55 -j MARK --set-mark 1\n\
             -A PREROUTING -m conntrack --ctstate NEW -j MARK --set-mark 1\n\
             -A PREROUTING -j CONNMARK --restore-mark\n\
             -A PREROUTING -i eth1 -d 192.0.2.1 -j MARK --set-mark 1\n\
             -A PREROUTING -i eth0 -d 192.0.2.1 -j MARK --set-mark 1\nCOMMIT\n",
            Some("eth0"),
        );
        let lines: Vec<usize> = p.unsupported.iter().map(|u| u.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5, 6, 7]);
        assert!(p.unsupported[4].reason.contains("CONNMARK"));
        assert_eq!(p.chains[&(Family::V4, "PREROUTING".into())].len(), 1);
        assert_eq!(p.notes.len(), 1);
    }

    /// Found by the import fuzz target: `--dports 000,4500` became the
    /// range 1-0 (lo > hi), which matched nothing where iptables matches
    /// packets to port 0.
    #[test]
    fn port_ranges_start_at_1_and_port_0_alone_is_refused() {
        assert_eq!(
            parse_port_range("0:1023"),
            Ok(PortRange { lo: 1, hi: 1023 })
        );
        assert_eq!(parse_port_range(":80"), Ok(PortRange { lo: 1, hi: 80 }));
        assert_eq!(parse_port_range("80:"), Ok(PortRange { lo: 80, hi: 65535 }));
        for zero in ["0", "000", "0:0", ":0"] {
            let e = parse_port_range(zero).unwrap_err();
            assert!(e.contains("port 0 alone"), "{zero}: {e}");
        }
        assert!(parse_port_range("90:80").unwrap_err().contains("reversed"));
        assert!(
            parse_port_range("65536")
                .unwrap_err()
                .contains("not a port")
        );
        let p = parse(
            "*mangle\n-A PREROUTING -d 192.0.2.31/32 -p udp -m multiport --dports 000,4500 -j MARK --set-mark 31\n\
             -A PREROUTING -d 192.0.2.31/32 -p udp --dport 0 -j MARK --set-mark 31\nCOMMIT\n",
            None,
        );
        assert!(p.chains.is_empty(), "{:?}", p.chains);
        let reasons: Vec<&str> = p.unsupported.iter().map(|u| u.reason.as_str()).collect();
        assert_eq!(reasons.len(), 2);
        assert!(
            reasons[0].starts_with("--dports \"000,4500\": port 0 alone"),
            "{reasons:?}"
        );
        assert!(
            reasons[1].starts_with("--dport \"0\": port 0 alone"),
            "{reasons:?}"
        );
    }

    #[test]
    fn mark_forms_become_mask_and_xor_value() {
        let p = parse(
            "*mangle\n-A PREROUTING -j MARK --set-mark 0x1/0x3\n-A PREROUTING -j MARK --set-xmark 0x4000/0x4000\n\
             -A PREROUTING -j MARK --and-mark 0xff\n-A PREROUTING -j MARK --or-mark 0x10\nCOMMIT\n",
            None,
        );
        let actions: Vec<Action> = p.chains[&(Family::V4, "PREROUTING".into())]
            .iter()
            .map(|r| r.action)
            .collect();
        assert_eq!(
            actions,
            vec![
                Action::Mark {
                    mask: 0x3,
                    value: 0x1
                },
                Action::Mark {
                    mask: 0x4000,
                    value: 0x4000
                },
                Action::Mark {
                    mask: !0xff,
                    value: 0
                },
                Action::Mark {
                    mask: 0x10,
                    value: 0x10
                },
            ]
        );
    }
}
