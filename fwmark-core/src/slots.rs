//! Counter slots: which `RULE_STATS` index each rule counts in.
//!
//! A rule keeps its slot across applies as long as its service keeps its name
//! and the rule its text, so its counters keep counting. New rules get slots
//! that the live config does not use (zeroed before they are published);
//! slots of removed rules become free for later applies.

use ipnet::IpNet;

use crate::{
    config::{Config, PortRange, Proto},
    ruleset::Ruleset,
};

/// Slots for a ruleset about to be published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotPlan {
    /// Slot of each rule, in rule order.
    pub slots: Vec<u32>,
    /// Slots new to the live config (to be zeroed before publishing, when
    /// they were used before).
    pub fresh: Vec<u32>,
}

/// Too many rules for the counter map.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the config has {rules} rules but the live counter map holds {capacity} (nothing was \
     changed); its size is fixed while the interface is attached: run `fwmark detach` and \
     `fwmark run --max-rules {rules}` or more (marking stops in between), or use fewer rules"
)]
pub struct OutOfSlots {
    pub rules: usize,
    pub capacity: u32,
}

/// What identifies a rule across configs: its service's name and its match.
type Identity<'a> = (&'a str, (IpNet, Proto, Option<PortRange>));

fn identities<'a>(
    config: &'a Config,
    ruleset: &'a Ruleset,
) -> impl ExactSizeIterator<Item = Identity<'a>> + 'a {
    ruleset
        .rules
        .iter()
        .map(|r| (config.services[r.service].name.as_str(), r.matches()))
}

/// Assigns slots to `new`'s rules given the live config and its slots.
pub fn assign(
    new: (&Config, &Ruleset),
    live: Option<(&Config, &Ruleset)>,
    live_slots: &[u32],
    capacity: u32,
) -> Result<SlotPlan, OutOfSlots> {
    let out_of_slots = OutOfSlots {
        rules: new.1.rules.len(),
        capacity,
    };
    if new.1.rules.len() > capacity as usize {
        return Err(out_of_slots);
    }
    let live_map: foldhash::HashMap<Identity<'_>, u32> = match live {
        Some((c, r)) if r.rules.len() == live_slots.len() => {
            identities(c, r).zip(live_slots.iter().copied()).collect()
        }
        _ => Default::default(),
    };
    // Per slot: live (used by the live config), kept (by one of its rules
    // that stays). Slots past the capacity are never handed out.
    let mut live_slot = vec![false; capacity as usize];
    let mut kept = vec![false; capacity as usize];
    let mark = |set: &mut [bool], slot: u32| {
        if let Some(b) = set.get_mut(slot as usize) {
            *b = true;
        }
    };
    for &slot in live_map.values() {
        mark(&mut live_slot, slot);
    }
    if !live_map.is_empty() {
        for id in identities(new.0, new.1) {
            if let Some(&slot) = live_map.get(&id) {
                mark(&mut kept, slot);
            }
        }
    }
    // Never-live slots first; slots of rules removed by this very change only
    // when nothing else is left (a packet still in flight in the old
    // generation could count once more in them).
    let mut free = (0..capacity)
        .filter(|&s| !live_slot[s as usize])
        .chain((0..capacity).filter(|&s| live_slot[s as usize] && !kept[s as usize]));

    let mut plan = SlotPlan {
        slots: Vec::with_capacity(new.1.rules.len()),
        fresh: Vec::new(),
    };
    for id in identities(new.0, new.1) {
        let slot = match live_map.get(&id) {
            Some(&slot) => slot,
            None => {
                let slot = free.next().ok_or(out_of_slots.clone())?;
                plan.fresh.push(slot);
                slot
            }
        };
        plan.slots.push(slot);
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
        let p = assign((&c, &r), None, &[], 8).unwrap();
        assert_eq!(p.slots, vec![0, 1]);
        assert_eq!(p.fresh, vec![0, 1]);
    }

    #[test]
    fn surviving_rules_keep_their_slots_new_ones_avoid_live_slots() {
        let (ca, ra) = compile(A);
        let a = assign((&ca, &ra), None, &[], 8).unwrap();
        let (cb, rb) = compile(B);
        let b = assign((&cb, &rb), Some((&ca, &ra)), &a.slots, 8).unwrap();
        // dns:53 new, web:443 kept (same service name and rule text, even
        // with a new mark), web:8443 new. Port 80's slot 0 is not reused.
        assert_eq!(b.slots, vec![2, 1, 3]);
        assert_eq!(b.fresh, vec![2, 3]);
    }

    #[test]
    fn freed_slots_are_reused_only_when_nothing_else_is_left() {
        let (ca, ra) = compile(A);
        let a = assign((&ca, &ra), None, &[], 4).unwrap();
        let (cb, rb) = compile(B);
        let b = assign((&cb, &rb), Some((&ca, &ra)), &a.slots, 4).unwrap();
        assert_eq!(b.slots, vec![2, 1, 3]);
        let b = assign((&cb, &rb), Some((&ca, &ra)), &a.slots, 3).unwrap();
        assert_eq!(b.slots, vec![2, 1, 0]);
    }

    #[test]
    fn too_many_rules_is_an_error() {
        let (c, r) = compile(B);
        assert_eq!(
            assign((&c, &r), None, &[], 2),
            Err(OutOfSlots {
                rules: 3,
                capacity: 2
            })
        );
    }
}
