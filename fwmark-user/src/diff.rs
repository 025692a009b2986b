//! What changes between the live config and a new one, for `apply` and for
//! reloads: per service (added, removed, re-marked, rules added/removed) and
//! per map entry.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
};

use fwmark_common::{LPM_LOOKUP_PREFIX_LEN, ServiceKey};

use crate::{config::Config, ruleset::Ruleset};

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

fn mark_text(mark: u32, mask: u32) -> String {
    if mask == u32::MAX {
        format!("{mark:#x}")
    } else {
        format!("{mark:#x}/{mask:#x}")
    }
}

/// (lpm prefix length or exact, key) -> (mark, mask).
fn entries(rs: &Ruleset) -> HashMap<(u32, ServiceKey), (u32, u32)> {
    rs.exact
        .iter()
        .map(|(k, t)| ((LPM_LOOKUP_PREFIX_LEN, *k), (t.mark, t.mask)))
        .chain(
            rs.prefix
                .iter()
                .map(|e| ((e.prefix_len, e.key), (e.target.mark, e.target.mask))),
        )
        .collect()
}

/// Per service name: (mark, mask, rule texts).
fn services(c: &Config, rs: &Ruleset) -> BTreeMap<String, (u32, u32, BTreeSet<String>)> {
    let mut out: BTreeMap<String, (u32, u32, BTreeSet<String>)> = c
        .services
        .iter()
        .map(|s| (s.name.clone(), (s.mark, s.mask, BTreeSet::new())))
        .collect();
    for rule in &rs.rules {
        let name = &c.services[rule.service].name;
        if let Some(e) = out.get_mut(name) {
            e.2.insert(rule.to_string());
        }
    }
    out
}

/// The changes that turn `old` into `new`.
pub fn diff(old: Compiled<'_>, new: Compiled<'_>) -> Diff {
    let mut d = Diff::default();
    let (old_s, new_s) = (services(old.0, old.1), services(new.0, new.1));
    for (name, (mark, mask, rules)) in &new_s {
        match old_s.get(name) {
            None => {
                d.lines.push(format!(
                    "+ service {name:?} mark {}: {}",
                    mark_text(*mark, *mask),
                    rules.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            Some((old_mark, old_mask, old_rules)) => {
                if (old_mark, old_mask) != (mark, mask) {
                    d.lines.push(format!(
                        "~ service {name:?} mark {} -> {}",
                        mark_text(*old_mark, *old_mask),
                        mark_text(*mark, *mask)
                    ));
                }
                for r in rules.difference(old_rules) {
                    d.lines.push(format!("+ service {name:?}: {r}"));
                }
                for r in old_rules.difference(rules) {
                    d.lines.push(format!("- service {name:?}: {r}"));
                }
            }
        }
    }
    for (name, (mark, mask, rules)) in &old_s {
        if !new_s.contains_key(name) {
            d.lines.push(format!(
                "- service {name:?} mark {}: {}",
                mark_text(*mark, *mask),
                rules.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }

    let (old_e, new_e) = (entries(old.1), entries(new.1));
    for (key, target) in &new_e {
        match old_e.get(key) {
            None => d.entries_added += 1,
            Some(t) if t == target => d.entries_unchanged += 1,
            Some(_) => d.entries_remarked += 1,
        }
    }
    d.entries_removed = old_e.keys().filter(|k| !new_e.contains_key(k)).count();
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
        // 443 re-marked; 8000, 8001, 53 added; 80 and 1 removed.
        assert_eq!(
            (
                d.entries_added,
                d.entries_removed,
                d.entries_remarked,
                d.entries_unchanged
            ),
            (3, 2, 1, 0)
        );
        assert!(
            d.to_string()
                .ends_with("entries: 3 added, 2 removed, 1 re-marked, 0 unchanged")
        );
    }

    #[test]
    fn identical_configs_have_no_diff() {
        let (c, r) = compile("[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nmark = 1\n");
        let d = diff((&c, &r), (&c, &r));
        assert!(d.is_empty());
        assert_eq!(d.entries_unchanged, 1);
    }
}
