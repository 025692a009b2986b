//! Counter tables in the spirit of `iptables -t mangle -L -n -v`.

use std::fmt::Write as _;

use fwmark_common::{GlobalCounters, RuleCounters};

use crate::{config::Config, ruleset::Ruleset};

/// One table: a line per service and per rule, then the global counters.
pub fn counters_table(
    config: &Config,
    ruleset: &Ruleset,
    rules: &[RuleCounters],
    global: &GlobalCounters,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14}  {:<10} {:<20} match",
        "pkts", "bytes", "mark", "service"
    );
    for (si, service) in config.services.iter().enumerate() {
        let mut total = RuleCounters::default();
        let mut lines = Vec::new();
        for (rule, c) in ruleset
            .rules
            .iter()
            .zip(rules)
            .filter(|(r, _)| r.service == si)
        {
            total.packets += c.packets;
            total.bytes += c.bytes;
            lines.push(format!(
                "{:>12} {:>14}  {:<10} {:<20} {}",
                c.packets, c.bytes, "", "", rule
            ));
        }
        let mark = if service.mask == u32::MAX {
            format!("{:#x}", service.mark)
        } else {
            format!("{:#x}/{:#x}", service.mark, service.mask)
        };
        let _ = writeln!(
            out,
            "{:>12} {:>14}  {:<10} {:<20} (total)",
            total.packets, total.bytes, mark, service.name
        );
        for line in lines {
            let _ = writeln!(out, "{line}");
        }
    }
    let global: Vec<String> = GlobalCounters::NAMES
        .iter()
        .zip(global.values())
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    let _ = writeln!(out, "global: {}", global.join(" "));
    out
}
