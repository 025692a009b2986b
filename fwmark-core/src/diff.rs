//! What changes between the live config and a new one, for `apply` and for
//! reloads: per service (added, removed, re-marked, rules added/removed) and
//! per map entry.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use fwmark_common::{LPM_LOOKUP_PREFIX_LEN, ServiceKey};

use crate::{
    config::{Config, Service},
    ruleset::{Rule, Ruleset},
    text::mark as mark_text,
};

/// A config and its compiled ruleset.
pub type Compiled<'a> = (&'a Config, &'a Ruleset);

/// The difference between two configs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Human-readable lines, one change each.
    pub lines: Vec<String>,
    pub entries_added: usize,
    pub entries_removed: usize,
    pub entries_remarked: usize,
    pub entries_unchanged: usize,
}

impl Diff {
    /// True when the two configs mark every packet alike and name every
    /// rule alike.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in &self.lines {
            writeln!(f, "{line}")?;
        }
        write!(
            f,
            "entries: {} added, {} removed, {} re-marked, {} unchanged",
            self.entries_added, self.entries_removed, self.entries_remarked, self.entries_unchanged
        )
    }
}

/// First word of a port range's identity in [`entries`]: above every LPM
/// prefix length, plus the range's last port; the key's port is its first.
const RANGE_TAG: u32 = 1 << 16;

/// (lpm prefix length or exact, key) -> (mark, mask); a port range of an
/// exact address is (`RANGE_TAG` + last port, key with the first port).
fn entries(rs: &Ruleset) -> foldhash::HashMap<(u32, ServiceKey), (u32, u32)> {
    let mut out = foldhash::HashMap::with_capacity_and_hasher(rs.entries(), Default::default());
    out.extend(each_entry(rs));
    out
}

/// The entries of [`entries`], as they come.
fn each_entry(rs: &Ruleset) -> impl Iterator<Item = ((u32, ServiceKey), (u32, u32))> + '_ {
    rs.exact
        .iter()
        .map(|(k, t)| ((LPM_LOOKUP_PREFIX_LEN, *k), (t.mark, t.mask)))
        .chain(
            rs.prefix
                .iter()
                .map(|e| ((e.prefix_len, e.key), (e.target.mark, e.target.mask))),
        )
        .chain(rs.ranges.iter().map(|r| {
            let key = ServiceKey {
                port: r.lo.to_be_bytes(),
                ..r.key
            };
            (
                (RANGE_TAG + u32::from(r.hi), key),
                (r.target.mark, r.target.mask),
            )
        }))
}

/// Rules per service index, in one pass.
fn by_service(rs: &Ruleset, services: usize) -> Vec<Vec<&Rule>> {
    let mut out = vec![Vec::new(); services];
    for r in &rs.rules {
        out[r.service].push(r);
    }
    out
}

/// Rule texts, as a set.
fn texts(rules: &[&Rule]) -> BTreeSet<String> {
    rules.iter().map(|r| r.to_string()).collect()
}

/// At most this many rules are listed in one line of the diff.
const LISTED: usize = 8;

/// "a, b, c" or "a, b, ... (+N more)".
fn listing(rules: &[&Rule]) -> String {
    let mut shown: Vec<String> = rules.iter().take(LISTED).map(|r| r.to_string()).collect();
    if rules.len() > LISTED {
        shown.push(format!("... (+{} more)", rules.len() - LISTED));
    }
    shown.join(", ")
}

/// Same matches and mark (the file line may differ).
fn same_service(a: &Service, b: &Service) -> bool {
    (&a.vips, &a.protos, &a.ports, a.mark, a.mask) == (&b.vips, &b.protos, &b.ports, b.mark, b.mask)
}

/// The changes that turn `old` into `new`.
pub fn diff(old: Compiled<'_>, new: Compiled<'_>) -> Diff {
    let mut d = Diff::default();
    let index = |c: &Config| -> BTreeMap<String, usize> {
        c.services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect()
    };
    let (old_i, new_i) = (index(old.0), index(new.0));
    if old.0.icmp_errors != new.0.icmp_errors {
        d.lines.push(format!(
            "~ icmp_errors {} -> {}",
            old.0.icmp_errors, new.0.icmp_errors
        ));
    }
    let old_rules = by_service(old.1, old.0.services.len());
    let new_rules = by_service(new.1, new.0.services.len());
    for (name, &ni) in &new_i {
        let ns = &new.0.services[ni];
        match old_i.get(name) {
            None => {
                d.lines.push(format!(
                    "+ service {name:?} mark {}: {}",
                    mark_text(ns.mark, ns.mask),
                    listing(&new_rules[ni])
                ));
            }
            Some(&oi) => {
                let os = &old.0.services[oi];
                if same_service(os, ns) {
                    continue;
                }
                if (os.mark, os.mask) != (ns.mark, ns.mask) {
                    d.lines.push(format!(
                        "~ service {name:?} mark {} -> {}",
                        mark_text(os.mark, os.mask),
                        mark_text(ns.mark, ns.mask)
                    ));
                }
                let (was, now) = (texts(&old_rules[oi]), texts(&new_rules[ni]));
                let added: Vec<&String> = now.difference(&was).collect();
                let removed: Vec<&String> = was.difference(&now).collect();
                for (sign, list) in [("+", added), ("-", removed)] {
                    for r in list.iter().take(LISTED) {
                        d.lines.push(format!("{sign} service {name:?}: {r}"));
                    }
                    if list.len() > LISTED {
                        d.lines.push(format!(
                            "{sign} service {name:?}: ... (+{} more rules)",
                            list.len() - LISTED
                        ));
                    }
                }
            }
        }
    }
    for (name, &oi) in &old_i {
        if !new_i.contains_key(name) {
            let os = &old.0.services[oi];
            d.lines.push(format!(
                "- service {name:?} mark {}: {}",
                mark_text(os.mark, os.mask),
                listing(&old_rules[oi])
            ));
        }
    }

    // Only the old entries are indexed: a ruleset's keys are unique, so
    // the old entries the new ones do not find are the removed ones.
    let old_e = entries(old.1);
    let mut found = 0;
    for (key, target) in each_entry(new.1) {
        match old_e.get(&key) {
            None => d.entries_added += 1,
            Some(t) => {
                found += 1;
                if *t == target {
                    d.entries_unchanged += 1;
                } else {
                    d.entries_remarked += 1;
                }
            }
        }
    }
    d.entries_removed = old_e.len() - found;
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ruleset::compile_text as compile;

    #[test]
    fn reports_services_rules_and_entries() {
        let (ca, ra) = compile(
            "[[service]]\nname = \"web\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [80, 443]\nmark = 80\n\
             [[service]]\nname = \"old\"\nvip = \"192.0.2.99\"\nproto = \"udp\"\nports = [1]\nmark = 9\n",
        );
        let (cb, rb) = compile(
            "[[service]]\nname = \"web\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [443, \"8000-8001\"]\nmark = 81\n\
             [[service]]\nname = \"dns\"\nvip = \"192.0.2.53\"\nproto = \"udp\"\nports = [53]\nmark = 53\n",
        );
        let d = diff((&ca, &ra), (&cb, &rb));
        assert_eq!(
            d.lines,
            vec![
                "+ service \"dns\" mark 0x35: 192.0.2.53 udp port 53",
                "~ service \"web\" mark 0x50 -> 0x51",
                "+ service \"web\": 192.0.2.10 tcp port 8000-8001",
                "- service \"web\": 192.0.2.10 tcp port 80",
                "- service \"old\" mark 0x9: 192.0.2.99 udp port 1",
            ]
        );
        // 443 re-marked; 8000-8001 (one range entry) and 53 added; 80 and
        // 1 removed.
        assert_eq!(
            (
                d.entries_added,
                d.entries_removed,
                d.entries_remarked,
                d.entries_unchanged
            ),
            (2, 2, 1, 0)
        );
        assert!(
            d.to_string()
                .ends_with("entries: 2 added, 2 removed, 1 re-marked, 0 unchanged")
        );
    }

    #[test]
    fn identical_configs_have_no_diff() {
        let (c, r) = compile("[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nmark = 1\n");
        let d = diff((&c, &r), (&c, &r));
        assert!(d.is_empty());
        assert_eq!(d.entries_unchanged, 1);
    }

    #[test]
    fn turning_icmp_errors_on_is_a_change() {
        let svc = "[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nmark = 1\n";
        let (ca, ra) = compile(svc);
        let (cb, rb) = compile(&format!("icmp_errors = true\n{svc}"));
        let d = diff((&ca, &ra), (&cb, &rb));
        assert_eq!(d.lines, vec!["~ icmp_errors false -> true"]);
        assert_eq!(d.entries_unchanged, 1);
        assert!(rb.icmp_errors && !ra.icmp_errors);
    }
}
