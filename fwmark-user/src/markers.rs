//! Other writers of marks on the path from TC ingress to IPVS: rules that
//! run after fwmark and may overwrite the mark it set (or the conntrack
//! mark a `--restore-mark` copies back). fwmark only warns about them, at
//! `run` and `apply`; it never fails for them.
//!
//! Looked at, in the network namespace fwmark runs in:
//! - `iptables-save` / `ip6tables-save` (and their `-legacy-` variants when
//!   the nf_tables ones say legacy tables exist): `MARK` and `CONNMARK`
//!   rules in raw `PREROUTING`, mangle `PREROUTING` and mangle `INPUT`, and
//!   in the user chains those jump or go to;
//! - `nft -j list ruleset`: rules that set `meta mark` or `ct mark` (or an
//!   iptables-nft `MARK`/`CONNMARK`) in chains on the `prerouting` hook, the
//!   `ingress` hook of this interface, or the `input` hook before IPVS
//!   (priority below 98), and in the chains those jump or go to. This
//!   includes keepalived's `nftables_ipvs` table (`keepalived_ipvs` by
//!   default: a `meta mark set ... map @tcp_map` rule in chain `in` on the
//!   input hook at priority -1), which marks virtual server groups itself.
//!
//! A missing tool is skipped silently (a host without iptables has no
//! iptables rules); a tool that fails is logged at debug level.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    fmt,
    io::ErrorKind,
    process::Command,
};

use log::{debug, warn};

use fwmark_core::import::parse::tokenize;

/// IPVS's `LOCAL_IN` hooks run at `NF_IP_PRI_NAT_SRC - 2`: input chains
/// with a lower priority run before IPVS looks at the mark.
const IPVS_INPUT_PRIORITY: i64 = 98;
/// At most this many findings are listed one by one.
const MAX_LISTED: usize = 20;

/// A rule that writes marks after fwmark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// `iptables`, `ip6tables`, `nft`.
    pub tool: String,
    /// Table and chain, and how the chain is reached.
    pub place: String,
    /// The rule as the tool prints it.
    pub rule: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.tool, self.place, self.rule)
    }
}

/// Runs `program args` and returns its stdout; `None` when the program
/// is not installed or fails (logged at debug level).
fn output(program: &str, args: &[&str]) -> Option<String> {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => Some(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => {
            debug!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            None
        }
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => {
            debug!("{program}: {e}");
            None
        }
    }
}

/// Tables and chains where a mark written after fwmark reaches IPVS.
fn start_chains(table: &str) -> &'static [&'static str] {
    match table {
        "raw" => &["PREROUTING"],
        "mangle" => &["PREROUTING", "INPUT"],
        _ => &[],
    }
}

/// A rule of an iptables-save dump: its line, and its target (`-j`/`-g`).
type SavedRule = (String, Option<String>);
/// The chains of one table, by name.
type Chains = BTreeMap<String, Vec<SavedRule>>;

/// The `MARK`/`CONNMARK` rules on the path in `iptables-save` output.
/// Returns them and the tables the dump held.
pub fn iptables_findings(tool: &str, text: &str) -> (Vec<Finding>, BTreeSet<String>) {
    // table -> chain -> rules
    let mut tables: BTreeMap<String, Chains> = BTreeMap::new();
    let mut table = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            table = Some(name.to_string());
            tables.entry(name.to_string()).or_default();
            continue;
        }
        let (Some(t), Some(rest)) = (&table, line.strip_prefix("-A ")) else {
            continue;
        };
        let Ok(words) = tokenize(rest) else {
            continue;
        };
        let Some(chain) = words.first() else {
            continue;
        };
        let target = words
            .windows(2)
            .find(|w| matches!(w[0].as_str(), "-j" | "--jump" | "-g" | "--goto"))
            .map(|w| w[1].clone());
        tables
            .get_mut(t)
            .expect("table entered")
            .entry(chain.clone())
            .or_default()
            .push((line.to_string(), target));
    }
    let mut findings = Vec::new();
    for (table, chains) in &tables {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut queue: VecDeque<(&str, Option<&str>)> = VecDeque::new();
        for start in start_chains(table) {
            if chains.contains_key(*start) {
                queue.push_back((start, None));
            }
        }
        while let Some((chain, from)) = queue.pop_front() {
            if !seen.insert(chain) {
                continue;
            }
            for (line, target) in chains.get(chain).into_iter().flatten() {
                match target.as_deref() {
                    Some("MARK" | "CONNMARK") => findings.push(Finding {
                        tool: tool.to_string(),
                        place: match from {
                            None => format!("{table} {chain}"),
                            Some(from) => format!("{table} {chain} (reached from {from})"),
                        },
                        rule: line.clone(),
                    }),
                    Some(next) if chains.contains_key(next) => {
                        queue.push_back((next, Some(from.unwrap_or(chain))));
                    }
                    _ => {}
                }
            }
        }
    }
    (findings, tables.into_keys().collect())
}

/// What `nft -a list ruleset` prints for each rule and each chain's
/// devices, by (family, table, chain) and handle.
#[derive(Debug, Default)]
struct NftText {
    rules: HashMap<(String, String, String, u64), String>,
    devices: HashMap<(String, String, String), Vec<String>>,
}

fn parse_nft_text(text: &str) -> NftText {
    let mut out = NftText::default();
    let mut table: Option<(String, String)> = None;
    let mut chain: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("table ") {
            let mut words = rest.split_whitespace();
            table = match (words.next(), words.next()) {
                (Some(f), Some(n)) => Some((f.to_string(), n.to_string())),
                _ => None,
            };
            chain = None;
        } else if let Some(rest) = line.strip_prefix("\tchain ") {
            chain = rest.split_whitespace().next().map(str::to_string);
        } else if line == "\t}" {
            chain = None;
        } else if let (Some((family, tname)), Some(c)) = (&table, &chain) {
            let body = line.trim();
            let key = (family.clone(), tname.clone(), c.clone());
            if body.starts_with("type ") {
                let devices = body
                    .split_once("device ")
                    .or_else(|| body.split_once("devices = "))
                    .map(|(_, d)| {
                        d.split(';')
                            .next()
                            .unwrap_or("")
                            .split(" priority")
                            .next()
                            .unwrap_or("")
                            .split(|c: char| c == ',' || c.is_whitespace())
                            .map(|w| w.trim_matches(|c| c == '"' || c == '{' || c == '}'))
                            .filter(|w| !w.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
                out.devices.insert(key, devices);
            } else if let Some((rule, handle)) = body.rsplit_once(" # handle ")
                && let Ok(handle) = handle.trim().parse()
            {
                out.rules
                    .insert((key.0, key.1, key.2, handle), rule.to_string());
            }
        }
    }
    out
}

/// Whether an expression (or anything inside it) writes `meta mark` or
/// `ct mark`, or is an iptables-nft `MARK`/`CONNMARK` target.
fn writes_mark(expr: &serde_json::Value) -> bool {
    match expr {
        serde_json::Value::Object(map) => {
            if let Some(m) = map.get("mangle") {
                let key = &m["key"];
                if key["meta"]["key"] == "mark" || key["ct"]["key"] == "mark" {
                    return true;
                }
            }
            if let Some(xt) = map.get("xt")
                && xt["type"] == "target"
                && matches!(xt["name"].as_str(), Some("MARK" | "CONNMARK"))
            {
                return true;
            }
            map.values().any(writes_mark)
        }
        serde_json::Value::Array(items) => items.iter().any(writes_mark),
        _ => false,
    }
}

/// The chains a rule jumps or goes to (also from verdict maps).
fn jumps(expr: &serde_json::Value, out: &mut Vec<String>) {
    match expr {
        serde_json::Value::Object(map) => {
            for verdict in ["jump", "goto"] {
                if let Some(target) = map.get(verdict).and_then(|v| v["target"].as_str()) {
                    out.push(target.to_string());
                }
            }
            map.values().for_each(|v| jumps(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| jumps(v, out)),
        _ => {}
    }
}

/// The mark-writing rules on the path in `nft -j list ruleset` output
/// (with `text`, `nft -a list ruleset`, for how the rules read). Tables in
/// `skip` (family, name) were reported from iptables-save already.
pub fn nft_findings(
    json: &str,
    text: &str,
    iface: &str,
    skip: &BTreeSet<(String, String)>,
) -> Vec<Finding> {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let text = parse_nft_text(text);
    type ChainKey = (String, String, String);
    let mut bases: Vec<(ChainKey, String)> = Vec::new();
    let mut rules: HashMap<ChainKey, Vec<(u64, serde_json::Value)>> = HashMap::new();
    for item in doc["nftables"].as_array().into_iter().flatten() {
        let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        if let Some(c) = item.get("chain") {
            let key = (s(&c["family"]), s(&c["table"]), s(&c["name"]));
            let prio = c["prio"].as_i64().unwrap_or(0);
            let on_path = match c["hook"].as_str() {
                Some("prerouting") => true,
                Some("input") => prio < IPVS_INPUT_PRIORITY,
                Some("ingress") => {
                    let devices: Vec<String> = match &c["dev"] {
                        serde_json::Value::String(d) => vec![d.clone()],
                        serde_json::Value::Array(d) => d.iter().map(s).collect(),
                        _ => text.devices.get(&key).cloned().unwrap_or_default(),
                    };
                    devices.is_empty() || devices.iter().any(|d| d == iface)
                }
                _ => false,
            };
            if on_path && !skip.contains(&(key.0.clone(), key.1.clone())) {
                let hook = format!("hook {}, priority {prio}", s(&c["hook"]));
                bases.push((key, hook));
            }
        } else if let Some(r) = item.get("rule") {
            let key = (s(&r["family"]), s(&r["table"]), s(&r["chain"]));
            let handle = r["handle"].as_u64().unwrap_or(0);
            rules
                .entry(key)
                .or_default()
                .push((handle, r["expr"].clone()));
        }
    }
    let mut findings = Vec::new();
    let mut seen: BTreeSet<ChainKey> = BTreeSet::new();
    for (base, hook) in bases {
        let mut queue: VecDeque<(ChainKey, String)> = VecDeque::from([(base.clone(), hook)]);
        while let Some((chain, how)) = queue.pop_front() {
            if !seen.insert(chain.clone()) {
                continue;
            }
            let (family, table, name) = &chain;
            for (handle, expr) in rules.get(&chain).into_iter().flatten() {
                if writes_mark(expr) {
                    let rule = text
                        .rules
                        .get(&(family.clone(), table.clone(), name.clone(), *handle))
                        .cloned()
                        .unwrap_or_else(|| format!("rule handle {handle}"));
                    let keepalived = table.starts_with("keepalived")
                        || ["@tcp_map", "@udp_map", "@sctp_map"]
                            .iter()
                            .any(|m| rule.contains(m));
                    let note = if keepalived {
                        "; keepalived's nftables_ipvs table: keepalived marks virtual server \
                         groups itself, so give those services to fwmark or to keepalived"
                    } else {
                        ""
                    };
                    findings.push(Finding {
                        tool: "nft".to_string(),
                        place: format!("table {family} {table} chain {name} ({how}{note})"),
                        rule,
                    });
                }
                let mut targets = Vec::new();
                jumps(expr, &mut targets);
                for target in targets {
                    queue.push_back((
                        (family.clone(), table.clone(), target),
                        format!("reached from chain {name}"),
                    ));
                }
            }
        }
    }
    findings
}

/// Every other mark writer on the path of `iface`'s packets.
pub fn scan(iface: &str) -> Vec<Finding> {
    let mut findings = Vec::new();
    // nft shows iptables-nft's tables too: they are reported once, from
    // iptables-save, which prints them as the admin wrote them.
    let mut covered: BTreeSet<(String, String)> = BTreeSet::new();
    for (tool, family) in [("iptables", "ip"), ("ip6tables", "ip6")] {
        let Some(dump) = output(&format!("{tool}-save"), &[]) else {
            continue;
        };
        let (found, tables) = iptables_findings(tool, &dump);
        findings.extend(found);
        if dump.contains("(nf_tables)") {
            covered.extend(tables.into_iter().map(|t| (family.to_string(), t)));
        }
        if dump.contains("legacy tables present")
            && let Some(legacy) = output(&format!("{tool}-legacy-save"), &[])
        {
            findings.extend(iptables_findings(&format!("{tool}-legacy"), &legacy).0);
        }
    }
    if let Some(json) = output("nft", &["-j", "list", "ruleset"]) {
        let text = output("nft", &["-a", "list", "ruleset"]).unwrap_or_default();
        findings.extend(nft_findings(&json, &text, iface, &covered));
    }
    findings
}

/// Scans and warns: one line that says what was found and what to do, then
/// one line per rule.
pub fn warn_other_markers(iface: &str) {
    let findings = scan(iface);
    if findings.is_empty() {
        return;
    }
    warn!(
        "{} other rule(s) write marks on {iface}'s packets after fwmark (netfilter runs after \
         TC ingress) and can overwrite fwmark's marks before IPVS reads them; remove the ones \
         for services fwmark marks (README: Migrating from iptables):",
        findings.len()
    );
    for f in findings.iter().take(MAX_LISTED) {
        warn!("  {f}");
    }
    if findings.len() > MAX_LISTED {
        warn!("  ... and {} more", findings.len() - MAX_LISTED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_mark_rules_on_the_path_are_found_with_their_chain() {
        let dump = "# Generated by iptables-save v1.8.9 (nf_tables)\n*mangle\n\
            :PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:SUB - [0:0]\n:UNUSED - [0:0]\n\
            -A PREROUTING -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -j MARK --set-xmark 0x50/0xffffffff\n\
            -A PREROUTING -p udp -j SUB\n\
            -A SUB -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff\n\
            -A INPUT -j MARK --set-xmark 0x1/0x1\n\
            -A OUTPUT -j MARK --set-xmark 0x2/0xffffffff\n\
            -A UNUSED -j MARK --set-xmark 0x3/0xffffffff\n\
            COMMIT\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j MARK --set-xmark 0x4/0xffffffff\nCOMMIT\n";
        let (found, tables) = iptables_findings("iptables", dump);
        let found: Vec<String> = found.iter().map(|f| f.to_string()).collect();
        assert_eq!(
            found,
            vec![
                "iptables mangle PREROUTING: -A PREROUTING -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -j MARK --set-xmark 0x50/0xffffffff",
                "iptables mangle INPUT: -A INPUT -j MARK --set-xmark 0x1/0x1",
                "iptables mangle SUB (reached from PREROUTING): -A SUB -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
            ]
        );
        assert_eq!(
            tables,
            BTreeSet::from(["filter".to_string(), "mangle".to_string()])
        );
    }

    #[test]
    fn nft_mark_writers_on_the_path_are_found() {
        let json = r#"{"nftables": [
          {"chain": {"family": "inet", "table": "other", "name": "pre", "hook": "prerouting", "prio": -150}},
          {"chain": {"family": "inet", "table": "other", "name": "sub"}},
          {"chain": {"family": "inet", "table": "other", "name": "out", "hook": "output", "prio": 0}},
          {"chain": {"family": "netdev", "table": "ing", "name": "c", "hook": "ingress", "prio": 0}},
          {"chain": {"family": "netdev", "table": "ing2", "name": "c", "hook": "ingress", "prio": 0}},
          {"chain": {"family": "ip", "table": "keepalived_ipvs", "name": "in", "hook": "input", "prio": -1}},
          {"chain": {"family": "ip", "table": "late", "name": "in", "hook": "input", "prio": 100}},
          {"chain": {"family": "ip", "table": "mangle", "name": "PREROUTING", "hook": "prerouting", "prio": -150}},
          {"rule": {"family": "inet", "table": "other", "chain": "pre", "handle": 5, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 81}}]}},
          {"rule": {"family": "inet", "table": "other", "chain": "pre", "handle": 8, "expr": [{"vmap": {"key": {"meta": {"key": "mark"}}, "data": {"set": [[1, {"jump": {"target": "sub"}}]]}}}]}},
          {"rule": {"family": "inet", "table": "other", "chain": "sub", "handle": 9, "expr": [{"mangle": {"key": {"ct": {"key": "mark"}}, "value": 1}}]}},
          {"rule": {"family": "inet", "table": "other", "chain": "out", "handle": 11, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 9}}]}},
          {"rule": {"family": "netdev", "table": "ing", "chain": "c", "handle": 2, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 7}}]}},
          {"rule": {"family": "netdev", "table": "ing2", "chain": "c", "handle": 2, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 7}}]}},
          {"rule": {"family": "ip", "table": "keepalived_ipvs", "chain": "in", "handle": 3, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"map": {"data": "@tcp_map"}}}}]}},
          {"rule": {"family": "ip", "table": "late", "chain": "in", "handle": 3, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1}}]}},
          {"rule": {"family": "ip", "table": "mangle", "chain": "PREROUTING", "handle": 2, "expr": [{"xt": {"type": "target", "name": "MARK"}}]}}
        ]}"#;
        let text = "table inet other { # handle 1\n\tchain pre { # handle 1\n\t\ttype filter hook prerouting priority mangle; policy accept;\n\
            \t\tip daddr 192.0.2.10 meta mark set 0x00000051 # handle 5\n\t}\n\
            \tchain sub { # handle 2\n\t\tct mark set 0x00000001 # handle 9\n\t}\n}\n\
            table netdev ing { # handle 2\n\tchain c { # handle 1\n\t\ttype filter hook ingress device \"eth0\" priority filter; policy accept;\n\
            \t\tmeta mark set 0x00000007 # handle 2\n\t}\n}\n\
            table netdev ing2 { # handle 3\n\tchain c { # handle 1\n\t\ttype filter hook ingress devices = { eth1, eth2 } priority filter; policy accept;\n\
            \t\tmeta mark set 0x00000007 # handle 2\n\t}\n}\n";
        let skip = BTreeSet::from([("ip".to_string(), "mangle".to_string())]);
        let found: Vec<String> = nft_findings(json, text, "eth0", &skip)
            .iter()
            .map(|f| f.to_string())
            .collect();
        assert_eq!(found.len(), 4, "{found:#?}");
        assert_eq!(
            found[0],
            "nft table inet other chain pre (hook prerouting, priority -150): ip daddr 192.0.2.10 meta mark set 0x00000051"
        );
        assert_eq!(
            found[1],
            "nft table inet other chain sub (reached from chain pre): ct mark set 0x00000001"
        );
        assert_eq!(
            found[2],
            "nft table netdev ing chain c (hook ingress, priority 0): meta mark set 0x00000007"
        );
        assert!(
            found[3].starts_with(
                "nft table ip keepalived_ipvs chain in (hook input, priority -1; keepalived's nftables_ipvs"
            ),
            "{}",
            found[3]
        );
    }
}
