//! The kernel side as userspace sees it: load the classifier, publish a
//! ruleset into its maps, read its counters.
//!
//! A ruleset is published as a *generation*: a fresh inner hash map (exact
//! entries) and a fresh inner LPM trie (prefix entries), filled completely
//! before they are placed in the `EXACT`/`PREFIX` outer arrays; then `ACTIVE`
//! is pointed at them. The classifier reads `ACTIVE` once per packet, so a
//! packet is classified wholly by one generation.

use std::collections::BTreeMap;

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, ArrayOfMaps, HashMap, IterableMap, LpmTrie, MapData, MapError, PerCpuArray,
        lpm_trie::Key,
    },
    programs::{ProgramError, SchedClassifier},
};
use fwmark_common::{
    ACTIVE_HAS_PREFIX, GENERATIONS, GlobalCounters, RuleCounters, ServiceKey, Target, map_names,
};

use crate::ruleset::Ruleset;

/// The classifier object, built by `build.rs` from `fwmark-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fwmark"));

/// `BPF_F_NO_PREALLOC`: required by LPM tries.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Smallest size of the per-rule counter array.
const MIN_RULE_CAPACITY: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object failed")]
    Load(#[from] aya::EbpfError),
    #[error(
        "the kernel refused the classifier (fwmark needs Linux >= 5.10 with BTF, \
         CONFIG_DEBUG_INFO_BTF, and root or CAP_BPF + CAP_NET_ADMIN)"
    )]
    Program(#[from] ProgramError),
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the eBPF object has no {0}; it does not belong to this fwmark build")]
    Missing(&'static str),
    #[error("the ruleset has {rules} rules but the counter map holds {capacity}")]
    Capacity { rules: usize, capacity: u32 },
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// A loaded classifier and its maps.
pub struct Datapath {
    ebpf: Ebpf,
    rule_capacity: u32,
    active: Option<u32>,
}

impl Datapath {
    /// Loads the classifier into the kernel (not attached anywhere yet),
    /// with room for `rules` per-rule counters.
    pub fn load(rules: usize) -> Result<Datapath, DatapathError> {
        let rule_capacity = u32::try_from(rules)
            .unwrap_or(u32::MAX)
            .max(MIN_RULE_CAPACITY)
            .next_power_of_two();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::RULE_STATS, rule_capacity)
            .load(EBPF_OBJECT)?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(fwmark_common::PROGRAM_NAME)
            .ok_or(DatapathError::Missing("classifier program"))?
            .try_into()?;
        program.load()?;
        Ok(Datapath {
            ebpf,
            rule_capacity,
            active: None,
        })
    }

    /// The classifier program (for attaching and `BPF_PROG_TEST_RUN`).
    pub fn program(&self) -> Result<&SchedClassifier, DatapathError> {
        Ok(self
            .ebpf
            .program(fwmark_common::PROGRAM_NAME)
            .ok_or(DatapathError::Missing("classifier program"))?
            .try_into()?)
    }

    /// Mutable access to the classifier program.
    pub fn program_mut(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        Ok(self
            .ebpf
            .program_mut(fwmark_common::PROGRAM_NAME)
            .ok_or(DatapathError::Missing("classifier program"))?
            .try_into()?)
    }

    /// Room in the per-rule counter map.
    pub fn rule_capacity(&self) -> u32 {
        self.rule_capacity
    }

    /// The generation the classifier uses, once something was published.
    pub fn active_generation(&self) -> Option<u32> {
        self.active
    }

    /// Builds the ruleset's maps and makes them the live generation.
    /// Returns the generation index now in use.
    pub fn publish(&mut self, ruleset: &Ruleset) -> Result<u32, DatapathError> {
        if ruleset.rules.len() > self.rule_capacity as usize {
            return Err(DatapathError::Capacity {
                rules: ruleset.rules.len(),
                capacity: self.rule_capacity,
            });
        }
        let next = self.active.map_or(0, |g| (g + 1) % GENERATIONS);

        // Fill the new inner maps completely while nothing can see them.
        let exact_len = u32::try_from(ruleset.exact.len().max(1)).unwrap_or(u32::MAX);
        let mut exact: HashMap<MapData, ServiceKey, Target> =
            HashMap::create(exact_len, 0).map_err(map_err("exact entries"))?;
        for (key, target) in &ruleset.exact {
            exact
                .insert(key, target, 0)
                .map_err(map_err("exact entries"))?;
        }
        let prefix_len = u32::try_from(ruleset.prefix.len().max(1)).unwrap_or(u32::MAX);
        let mut prefix: LpmTrie<MapData, ServiceKey, Target> =
            LpmTrie::create(prefix_len, BPF_F_NO_PREALLOC).map_err(map_err("prefix entries"))?;
        for entry in &ruleset.prefix {
            prefix
                .insert(&Key::new(entry.prefix_len, entry.key), entry.target, 0)
                .map_err(map_err("prefix entries"))?;
        }

        // Place them in the unused generation slot, then switch to it.
        self.outer(map_names::EXACT)?
            .set(next, exact.map(), 0)
            .map_err(map_err(map_names::EXACT))?;
        self.outer(map_names::PREFIX)?
            .set(next, prefix.map(), 0)
            .map_err(map_err(map_names::PREFIX))?;
        let mut active: Array<&mut MapData, u32> = Array::try_from(
            self.ebpf
                .map_mut(map_names::ACTIVE)
                .ok_or(DatapathError::Missing(map_names::ACTIVE))?,
        )
        .map_err(map_err(map_names::ACTIVE))?;
        let flags = if ruleset.prefix.is_empty() {
            0
        } else {
            ACTIVE_HAS_PREFIX
        };
        active
            .set(0, next | flags, 0)
            .map_err(map_err(map_names::ACTIVE))?;
        self.active = Some(next);
        Ok(next)
    }

    fn outer(
        &mut self,
        name: &'static str,
    ) -> Result<ArrayOfMaps<&mut MapData, MapData>, DatapathError> {
        ArrayOfMaps::try_from(
            self.ebpf
                .map_mut(name)
                .ok_or(DatapathError::Missing(name))?,
        )
        .map_err(map_err(name))
    }

    /// Global counters, summed over CPUs.
    pub fn global_counters(&self) -> Result<GlobalCounters, DatapathError> {
        let map: PerCpuArray<&MapData, GlobalCounters> = PerCpuArray::try_from(
            self.ebpf
                .map(map_names::GLOBAL_STATS)
                .ok_or(DatapathError::Missing(map_names::GLOBAL_STATS))?,
        )
        .map_err(map_err(map_names::GLOBAL_STATS))?;
        let per_cpu = map.get(&0, 0).map_err(map_err(map_names::GLOBAL_STATS))?;
        Ok(per_cpu
            .iter()
            .fold(GlobalCounters::default(), |a, c| GlobalCounters {
                seen: a.seen + c.seen,
                marked: a.marked + c.marked,
                no_match: a.no_match + c.no_match,
                non_ip: a.non_ip + c.non_ip,
                later_fragment: a.later_fragment + c.later_fragment,
                malformed: a.malformed + c.malformed,
            }))
    }

    /// Counters of rules `0..rules`, summed over CPUs.
    pub fn rule_counters(&self, rules: usize) -> Result<Vec<RuleCounters>, DatapathError> {
        let map: PerCpuArray<&MapData, RuleCounters> = PerCpuArray::try_from(
            self.ebpf
                .map(map_names::RULE_STATS)
                .ok_or(DatapathError::Missing(map_names::RULE_STATS))?,
        )
        .map_err(map_err(map_names::RULE_STATS))?;
        (0..rules.min(self.rule_capacity as usize))
            .map(|i| {
                let values = map
                    .get(&(i as u32), 0)
                    .map_err(map_err(map_names::RULE_STATS))?;
                Ok(values
                    .iter()
                    .fold(RuleCounters::default(), |acc, c| RuleCounters {
                        packets: acc.packets + c.packets,
                        bytes: acc.bytes + c.bytes,
                    }))
            })
            .collect()
    }

    /// Per-service totals: service index -> (packets, bytes).
    pub fn service_counters(
        &self,
        ruleset: &Ruleset,
    ) -> Result<BTreeMap<usize, RuleCounters>, DatapathError> {
        let rules = self.rule_counters(ruleset.rules.len())?;
        let mut out: BTreeMap<usize, RuleCounters> = BTreeMap::new();
        for (rule, c) in ruleset.rules.iter().zip(rules) {
            let e = out.entry(rule.service).or_default();
            e.packets += c.packets;
            e.bytes += c.bytes;
        }
        Ok(out)
    }
}
