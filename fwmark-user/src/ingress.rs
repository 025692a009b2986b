//! What else runs on an interface's ingress: tcx programs and tc filters.
//!
//! fwmark goes first: with tcx it is attached at the head of the tcx list
//! (tcx programs all run before any tc filter); with netlink it takes the
//! lowest filter priority no other filter uses, so it never collides with
//! an existing filter, and says which filters still run before it.

use aya::programs::{SchedClassifier, TcAttachType};
use log::{info, warn};

use crate::{
    preflight,
    rtnl::{self, FilterEntry},
};

/// Netlink filter priority when it is free: lower runs first.
pub const NETLINK_PRIORITY: u16 = 1;

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
    #[error("cannot list the tc filters on {iface}")]
    NoInterface {
        iface: String,
        #[source]
        source: preflight::PreflightError,
    },
    #[error("cannot list the tc filters on {iface}")]
    Netlink {
        iface: String,
        #[source]
        source: rtnl::NetlinkError,
    },
}

/// The filters of chain 0 in a filter dump: one per priority, in priority
/// order (the kernel sends an entry per filter element; they are merged).
pub fn chain0_filters(entries: &[FilterEntry]) -> Vec<Filter> {
    let mut filters: Vec<Filter> = Vec::new();
    for entry in entries.iter().filter(|e| e.chain == 0) {
        match filters.iter_mut().find(|f| f.pref == entry.priority) {
            Some(f) => {
                if f.name.is_none() {
                    f.name.clone_from(&entry.bpf_name);
                }
            }
            None => filters.push(Filter {
                pref: entry.priority,
                kind: entry.kind.clone().unwrap_or_else(|| "?".to_string()),
                name: entry.bpf_name.clone(),
            }),
        }
    }
    filters.sort_by_key(|f| f.pref);
    filters
}

/// The tc filters on `iface`'s ingress (chain 0).
pub fn filters(iface: &str) -> Result<Vec<Filter>, IngressError> {
    let ifindex =
        preflight::interface_index(iface).map_err(|source| IngressError::NoInterface {
            iface: iface.to_string(),
            source,
        })?;
    let entries = rtnl::ingress_filters(ifindex).map_err(|source| IngressError::Netlink {
        iface: iface.to_string(),
        source,
    })?;
    Ok(chain0_filters(&entries))
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
                "{}; fwmark's filter takes pref {NETLINK_PRIORITY}, which fails if another \
                 filter uses it",
                crate::chain(&e)
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

    fn entry(priority: u16, chain: u32, kind: &str, bpf_name: Option<&str>) -> FilterEntry {
        FilterEntry {
            priority,
            chain,
            handle: u32::from(bpf_name.is_some()),
            kind: Some(kind.into()),
            bpf_name: bpf_name.map(str::to_string),
        }
    }

    #[test]
    fn filters_are_merged_per_priority_of_chain_0_and_the_first_free_priority_is_taken() {
        // As the kernel dumps them: an entry per filter, then per element.
        let entries = [
            entry(1, 0, "u32", None),
            entry(1, 0, "u32", None),
            entry(2, 0, "bpf", None),
            entry(2, 0, "bpf", Some("counter")),
            entry(3, 5, "u32", None),
            entry(10, 0, "bpf", None),
        ];
        let filters = chain0_filters(&entries);
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
        assert_eq!(chain0_filters(&[]), vec![]);
        // Out of order, the filters still come sorted.
        let reversed: Vec<FilterEntry> = entries.iter().rev().cloned().collect();
        assert_eq!(chain0_filters(&reversed), filters);
    }
}
