//! What else runs on an interface's ingress: tcx programs and tc filters.
//!
//! fwmark goes first: with tcx it is attached at the head of the tcx list
//! (tcx programs all run before any tc filter); with netlink it takes the
//! lowest filter priority no other filter uses, so it never collides with
//! an existing filter, and says which filters still run before it.

use std::process::Command;

use aya::programs::{SchedClassifier, TcAttachType};
use log::{info, warn};

use crate::attach::NETLINK_PRIORITY;

/// A tc filter on the ingress hook (chain 0, where fwmark's filter lives).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub pref: u16,
    /// `bpf`, `u32`, `flower`, ...
    pub kind: String,
    /// A `bpf` filter's program name.
    pub name: Option<String>,
}

impl std::fmt::Display for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tc filter pref {} {}", self.pref, self.kind)?;
        if let Some(name) = &self.name {
            write!(f, " {name}")?;
        }
        Ok(())
    }
}

/// Why the filters could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("cannot run tc (install iproute2): {0}")]
    NoTc(std::io::Error),
    #[error("`tc filter show dev {iface} ingress` failed: {why}")]
    Tc { iface: String, why: String },
    #[error("cannot read the output of `tc -j filter show`: {0}")]
    Json(#[from] serde_json::Error),
}

/// Parses `tc -j filter show dev IF ingress`: one entry per filter, in
/// priority order (tc prints a row per filter element; they are merged).
pub fn parse_filters(json: &str) -> Result<Vec<Filter>, serde_json::Error> {
    let rows: Vec<serde_json::Value> = if json.trim().is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(json)?
    };
    let mut filters: Vec<Filter> = Vec::new();
    for row in &rows {
        if row["chain"].as_u64().unwrap_or(0) != 0 {
            continue;
        }
        let Some(pref) = row["pref"].as_u64().and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        let kind = row["kind"].as_str().unwrap_or("?").to_string();
        let name = row["options"]["bpf_name"].as_str().map(str::to_string);
        match filters.iter_mut().find(|f| f.pref == pref) {
            Some(f) => {
                if f.name.is_none() {
                    f.name = name;
                }
            }
            None => filters.push(Filter { pref, kind, name }),
        }
    }
    filters.sort_by_key(|f| f.pref);
    Ok(filters)
}

/// The tc filters on `iface`'s ingress (`tc` from iproute2).
pub fn filters(iface: &str) -> Result<Vec<Filter>, IngressError> {
    let out = Command::new("tc")
        .args(["-j", "filter", "show", "dev", iface, "ingress"])
        .output()
        .map_err(IngressError::NoTc)?;
    if !out.status.success() {
        return Err(IngressError::Tc {
            iface: iface.to_string(),
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(parse_filters(&String::from_utf8_lossy(&out.stdout))?)
}

/// The lowest priority at or above [`NETLINK_PRIORITY`] that no filter uses.
pub fn free_priority(filters: &[Filter]) -> u16 {
    let mut pref = NETLINK_PRIORITY;
    while filters.iter().any(|f| f.pref == pref) {
        pref += 1;
    }
    pref
}

/// The tcx programs on `iface`'s ingress, in the order they run, as
/// `NAME (id N)`.
pub fn tcx_programs(iface: &str) -> Vec<String> {
    match SchedClassifier::query_tcx(iface, TcAttachType::Ingress) {
        Ok((_, programs)) => programs
            .iter()
            .map(|p| format!("{} (id {})", p.name_as_str().unwrap_or("?"), p.id()))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Chooses the priority of fwmark's netlink filter on `iface` and tells
/// the operator what runs before it.
pub fn netlink_priority(iface: &str) -> u16 {
    let filters = match filters(iface) {
        Ok(f) => f,
        Err(e) => {
            warn!(
                "cannot list the tc filters on {iface} ({e}); fwmark's filter takes pref \
                 {NETLINK_PRIORITY}, which fails if another filter uses it"
            );
            return NETLINK_PRIORITY;
        }
    };
    let pref = free_priority(&filters);
    let before: Vec<String> = filters
        .iter()
        .filter(|f| f.pref < pref)
        .map(|f| f.to_string())
        .collect();
    if !before.is_empty() {
        warn!(
            "{} on {iface} ingress run(s) before fwmark's filter (pref {pref}): they see packets \
             unmarked, and a filter that classifies a packet stops fwmark from seeing it; move \
             them to a priority above {pref} (`tc filter del ... pref N` and add them again), or, \
             on kernels 6.6 and later, use --attach tcx",
            before.join(", ")
        );
    }
    let tcx = tcx_programs(iface);
    if !tcx.is_empty() {
        warn!(
            "tcx program(s) {} on {iface} ingress run before every tc filter, fwmark's too: \
             they see packets unmarked; use --attach tcx to run first",
            tcx.join(", ")
        );
    }
    pref
}

/// With tcx, fwmark runs first: logs what runs after it, for the record.
pub fn log_after_tcx(iface: &str, own_program: u32) {
    let mut after: Vec<String> = tcx_programs(iface)
        .into_iter()
        .filter(|p| !p.ends_with(&format!("(id {own_program})")))
        .map(|p| format!("tcx {p}"))
        .collect();
    after.extend(
        filters(iface)
            .unwrap_or_default()
            .iter()
            .map(|f| f.to_string()),
    );
    if !after.is_empty() {
        info!(
            "also on {iface} ingress, after fwmark (they see its marks): {}",
            after.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_read_from_tc_json_and_the_first_free_priority_is_taken() {
        let json = r#"[{"protocol":"ip","pref":1,"kind":"u32","chain":0},
            {"protocol":"ip","pref":1,"kind":"u32","chain":0,"options":{"fh":"800:"}},
            {"protocol":"all","pref":2,"kind":"bpf","chain":0},
            {"protocol":"all","pref":2,"kind":"bpf","chain":0,"options":{"handle":"0x1","bpf_name":"counter","direct-action":true}},
            {"protocol":"all","pref":3,"kind":"u32","chain":5},
            {"protocol":"all","pref":10,"kind":"bpf","chain":0}]"#;
        let filters = parse_filters(json).unwrap();
        assert_eq!(
            filters,
            vec![
                Filter {
                    pref: 1,
                    kind: "u32".into(),
                    name: None
                },
                Filter {
                    pref: 2,
                    kind: "bpf".into(),
                    name: Some("counter".into())
                },
                Filter {
                    pref: 10,
                    kind: "bpf".into(),
                    name: None
                },
            ]
        );
        // Chain 5's pref 3 is another chain's: chain 0's 3 is free.
        assert_eq!(free_priority(&filters), 3);
        assert_eq!(free_priority(&[]), NETLINK_PRIORITY);
        assert_eq!(parse_filters("").unwrap(), vec![]);
        assert_eq!(parse_filters("[]").unwrap(), vec![]);
    }
}
