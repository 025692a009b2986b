//! Counter slots: which `RULE_STATS` index each rule counts in.
//!
//! A rule keeps its slot across applies as long as its service keeps its name
//! and the rule its text, so its counters keep counting. New rules get slots
//! that the live config does not use (zeroed before they are published);
//! slots of removed rules become free for later applies.

use std::collections::{BTreeSet, HashMap};

use crate::{config::Config, ruleset::Ruleset, state::RuleSlot};

/// Slots for a ruleset about to be published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotPlan {
    /// Slot of each rule, in rule order.
    pub slots: Vec<u32>,
    /// Slots new to the live config (to be zeroed before publishing).
    pub fresh: Vec<u32>,
    /// The table to record in the state.
    pub table: Vec<RuleSlot>,
}

/// Too many rules for the counter map.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the config has {rules} rules but the live classifier counts at most {capacity}; \
     restart `fwmark run` with --max-rules {rules} or more (nothing was changed)"
)]
pub struct OutOfSlots {
    pub rules: usize,
    pub capacity: u32,
}

/// (service name, rule text): what identifies a rule across configs.
pub fn identities(config: &Config, ruleset: &Ruleset) -> Vec<(String, String)> {
    ruleset
        .rules
        .iter()
        .map(|r| (config.services[r.service].name.clone(), r.to_string()))
        .collect()
}

/// Assigns slots to `ruleset`'s rules given the live table `previous`.
pub fn assign(
    config: &Config,
    ruleset: &Ruleset,
    previous: &[RuleSlot],
    capacity: u32,
) -> Result<SlotPlan, OutOfSlots> {
    let out_of_slots = OutOfSlots {
        rules: ruleset.rules.len(),
        capacity,
    };
    if ruleset.rules.len() > capacity as usize {
        return Err(out_of_slots);
    }
    let live: HashMap<(&str, &str), u32> = previous
        .iter()
        .map(|s| ((s.service.as_str(), s.rule.as_str()), s.slot))
        .collect();
    let ids = identities(config, ruleset);
    let kept: BTreeSet<u32> = ids
        .iter()
        .filter_map(|(s, r)| live.get(&(s.as_str(), r.as_str())).copied())
        .collect();
    let live_slots: BTreeSet<u32> = previous.iter().map(|s| s.slot).collect();
    // Never-live slots first; slots of rules removed by this very change only
    // when nothing else is left (a packet still in flight in the old
    // generation could count once more in them).
    let mut free = (0..capacity)
        .filter(|s| !live_slots.contains(s))
        .chain(live_slots.iter().copied().filter(|s| !kept.contains(s)));

    let mut plan = SlotPlan {
        slots: Vec::with_capacity(ids.len()),
        fresh: Vec::new(),
        table: Vec::with_capacity(ids.len()),
    };
    for (service, rule) in ids {
        let slot = match live.get(&(service.as_str(), rule.as_str())) {
            Some(&slot) => slot,
            None => {
                let slot = free.next().ok_or(out_of_slots.clone())?;
                plan.fresh.push(slot);
                slot
            }
        };
        plan.slots.push(slot);
        plan.table.push(RuleSlot {
            service,
            rule,
            slot,
        });
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ruleset::compile_text as compile;

    const A: &str = "[[service]]\nname = \"web\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [80, 443]\nmark = 80\n";
    const B: &str = "[[service]]\nname = \"dns\"\nvip = \"192.0.2.53\"\nproto = \"udp\"\nports = [53]\nmark = 53\n\
                     [[service]]\nname = \"web\"\nvip = \"192.0.2.10\"\nproto = \"tcp\"\nports = [443, 8443]\nmark = 81\n";

    #[test]
    fn first_assignment_is_dense_and_fresh() {
        let (c, r) = compile(A);
        let p = assign(&c, &r, &[], 8).unwrap();
        assert_eq!(p.slots, vec![0, 1]);
        assert_eq!(p.fresh, vec![0, 1]);
        assert_eq!(p.table[1].rule, "192.0.2.10 tcp port 443");
    }

    #[test]
    fn surviving_rules_keep_their_slots_new_ones_avoid_live_slots() {
        let (ca, ra) = compile(A);
        let a = assign(&ca, &ra, &[], 8).unwrap();
        let (cb, rb) = compile(B);
        let b = assign(&cb, &rb, &a.table, 8).unwrap();
        // dns:53 new, web:443 kept (same service name and rule text, even
        // with a new mark), web:8443 new. Port 80's slot 0 is not reused.
        assert_eq!(b.slots, vec![2, 1, 3]);
        assert_eq!(b.fresh, vec![2, 3]);
    }

    #[test]
    fn freed_slots_are_reused_only_when_nothing_else_is_left() {
        let (ca, ra) = compile(A);
        let a = assign(&ca, &ra, &[], 4).unwrap();
        let (cb, rb) = compile(B);
        let b = assign(&cb, &rb, &a.table, 4).unwrap();
        assert_eq!(b.slots, vec![2, 1, 3]);
        let b = assign(&cb, &rb, &a.table, 3).unwrap();
        assert_eq!(b.slots, vec![2, 1, 0]);
    }

    #[test]
    fn too_many_rules_is_an_error() {
        let (c, r) = compile(B);
        assert_eq!(
            assign(&c, &r, &[], 2),
            Err(OutOfSlots {
                rules: 3,
                capacity: 2
            })
        );
    }
}
