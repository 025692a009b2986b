//! The kernel side as userspace sees it: load the classifier, switch its
//! maps to a new configuration generation, read its counters.
//!
//! A ruleset is published as a *generation*: fresh inner hash maps (exact
//! IPv4 entries under an 8-byte key, exact IPv6 entries) and a fresh inner
//! LPM trie (prefix entries) are filled completely while nothing can see
//! them, placed in the unused slot of the `EXACT4`, `EXACT` and `PREFIX`
//! outer arrays, and then `ACTIVE` (one 32-bit word: slot and
//! has-prefix flag) is pointed at them. The classifier reads `ACTIVE` once per
//! packet, so a packet is classified wholly by one generation.
//!
//! The old generation is released only after every program that may still
//! use it has finished: an update of a map-in-map from userspace returns only
//! after an RCU grace period (`maybe_wait_bpf_programs()` in the kernel), so
//! one more update after the switch is the wait.

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, ArrayOfMaps, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuArray,
        PerCpuValues, lpm_trie::Key,
    },
    programs::{ProgramError, SchedClassifier},
};
use aya_obj::generated::{bpf_attr, bpf_attr__bindgen_ty_3, bpf_cmd};
use fwmark_common::{
    ACTIVE_GENERATION_MASK, ACTIVE_HAS_PREFIX, ACTIVE_HAS_RANGE, ACTIVE_ICMP_ERRORS, FAMILY_IPV4,
    GENERATIONS, GlobalCounters, Link, MAX_INTERFACES, MAX_RANGES, PortRangeEntry, RangeTable,
    RuleCounters, ServiceKey, ServiceKey4, Target, map_names,
};

use fwmark_core::ruleset::{RangeEntry, Ruleset};

/// The classifier object, built by `build.rs` from `fwmark-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fwmark"));

/// The benchmark floor's object (one empty classifier), built by `build.rs`
/// beside the classifier's; only the test lab and the benchmark embed it.
#[cfg(feature = "floor")]
pub static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fwmark-floor"));

/// Inserts `keys[i] -> values[i]` into an exact-entry map with
/// `BPF_MAP_UPDATE_BATCH`, many entries per syscall. On an error, returns
/// where the failed chunk starts (all before it were inserted), with the
/// error. The map is typed, so its key and value sizes are those of `K`
/// and `Target` (aya checks them when the map is made).
fn update_batch<K: aya::Pod>(
    map: &HashMap<MapData, K, Target>,
    keys: &[K],
    values: &[Target],
) -> Result<(), (usize, std::io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    // SAFETY: from any `done`, `values` holds as many values as `keys`
    // holds keys, of the typed map's value size.
    unsafe { update_chunks(map.map(), keys, |done| values[done..].as_ptr().cast()) }
}

/// Sets the per-CPU values of array indexes `slots` to zero on every CPU
/// with `BPF_MAP_UPDATE_BATCH`, many per syscall. On an error, returns
/// where the failed chunk starts (all before it were zeroed), with the
/// error (the caller goes on one by one).
fn zero_batch_per_cpu<V: aya::Pod + bytemuck::Pod>(
    map: &PerCpuArray<MapData, V>,
    slots: &[u32],
    cpus: usize,
) -> Result<(), (usize, std::io::Error)> {
    assert_eq!(
        std::mem::size_of::<V>() % 8,
        0,
        "per-CPU values are 8-byte multiples"
    );
    // The same zeroes for every chunk: the kernel only reads them.
    let zeros = vec![<V as bytemuck::Zeroable>::zeroed(); BATCH_CHUNK.min(slots.len()) * cpus];
    // SAFETY: `zeros` holds a chunk's worth of per-CPU values (`cpus` of
    // the typed map's value size V per key; V is a multiple of 8 bytes,
    // asserted above, so the kernel's rounding adds nothing).
    unsafe { update_chunks(map.map(), slots, |_| zeros.as_ptr().cast()) }
}

/// Keys per `BPF_MAP_UPDATE_BATCH` call.
const BATCH_CHUNK: usize = 16 * 1024;

/// `BPF_MAP_UPDATE_BATCH` of `keys` into `map`, [`BATCH_CHUNK`] keys per
/// call; `values(done)` gives the values of the chunk starting at key
/// `done`. On an error, returns where the failed chunk starts (all before
/// it were written; the kernel reports a partial count only once it
/// started, so callers redo the whole chunk one by one), with the error.
///
/// # Safety
///
/// `K` must be the map's key type, and `values(done)` must point at the
/// values of at least `min(keys.len() - done, BATCH_CHUNK)` keys, laid out
/// as the kernel reads the map's values.
unsafe fn update_chunks<K>(
    map: &MapData,
    keys: &[K],
    values: impl Fn(usize) -> *const u8,
) -> Result<(), (usize, std::io::Error)> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = map.fd().as_fd().as_raw_fd();
    let mut done = 0;
    while done < keys.len() {
        let n = (keys.len() - done).min(BATCH_CHUNK);
        let mut batch = bpf_attr__bindgen_ty_3 {
            in_batch: 0,
            out_batch: 0,
            keys: keys[done..].as_ptr() as u64,
            values: values(done) as u64,
            count: n as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `keys` holds at least `n` keys of the map's key type from
        // `done` on, and the caller vouches for the values.
        if let Err(error) = unsafe { bpf_batch(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut batch) } {
            return Err((done, error));
        }
        done += n;
    }
    Ok(())
}

/// The `bpf(2)` syscall with a `batch` command (`BPF_MAP_*_BATCH`, since
/// Linux 5.6). The kernel's answer (the count done, the next token) is
/// copied back into `batch`, also when it fails.
///
/// # Safety
///
/// `batch.keys` and `batch.values` point at room for `batch.count` keys
/// and values of the map's (`batch.map_fd`'s) key and value sizes (for a
/// per-CPU map, values of the value size rounded up to 8 bytes, times the
/// possible CPUs), readable for an update and writable for a lookup; a
/// non-zero `in_batch`/`out_batch` points at a key.
unsafe fn bpf_batch(cmd: bpf_cmd, batch: &mut bpf_attr__bindgen_ty_3) -> std::io::Result<()> {
    // SAFETY: `bpf_attr` is a C union of plain integers: all zeroes is a
    // valid value (and what the kernel requires of the unused bytes).
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.batch = *batch;
    // SAFETY: `attr` is a valid, fully initialized `bpf_attr` of the size
    // passed; the kernel reads or writes `count` keys and values through
    // the pointers in it, which the caller made valid for that many
    // elements (this function's contract).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    let error = std::io::Error::last_os_error();
    // SAFETY: `batch` is the member written above, the one the kernel
    // updates; it is plain integers, valid for any bits.
    *batch = unsafe { attr.batch };
    if rc < 0 { Err(error) } else { Ok(()) }
}

/// Reads the per-CPU values of array indexes `0..len` with
/// `BPF_MAP_LOOKUP_BATCH`, many per syscall: `len * cpus` values, index
/// by index (the kernel's per-CPU layout). `None` where the kernel
/// refuses batches (the caller reads one by one).
fn lookup_batch_per_cpu<V: aya::Pod + bytemuck::Pod>(
    map: &PerCpuArray<MapData, V>,
    len: u32,
    cpus: usize,
) -> Option<Vec<V>> {
    let map = map.map();
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const CHUNK: u32 = 16 * 1024;
    // Per-CPU values are 8-byte aligned in the kernel's copy.
    assert_eq!(
        std::mem::size_of::<V>() % 8,
        0,
        "per-CPU values are 8-byte multiples"
    );
    let fd = map.fd().as_fd().as_raw_fd();
    let mut values = vec![<V as bytemuck::Zeroable>::zeroed(); len as usize * cpus];
    let mut keys = vec![0u32; CHUNK.min(len) as usize];
    let mut done = 0u32;
    let mut token = 0u32;
    while done < len {
        let n = (len - done).min(CHUNK);
        let mut batch = bpf_attr__bindgen_ty_3 {
            // No token the first time: start at index 0.
            in_batch: if done == 0 {
                0
            } else {
                &token as *const u32 as u64
            },
            out_batch: &mut token as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values[done as usize * cpus..].as_mut_ptr() as u64,
            count: n,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // The token is a u32 (the array's key size), `keys` has room for
        // `n` keys and `values` for `n` per-CPU values of `cpus` CPUs of
        // the map's value size (V is typed like the map).
        // SAFETY: the token is a u32 (an array's key), `keys` has room for
        // `n` keys and `values` for `n` per-CPU values of `cpus` CPUs of the
        // map's value size: the map is typed with V (aya checks the size)
        // and V is a multiple of 8 bytes (asserted above), so the kernel's
        // rounding adds nothing.
        let result = unsafe { bpf_batch(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut batch) };
        let end = matches!(&result, Err(e) if e.raw_os_error() == Some(libc::ENOENT));
        if result.is_err() && !end {
            return None;
        }
        done += batch.count;
        if end || batch.count == 0 {
            break;
        }
    }
    (done >= len).then_some(values)
}

/// A new exact-entry hash map holding `keys[i] -> values[i]`: sized to
/// the entries (at least 1), filled many entries per syscall, one by one
/// where batches are refused.
fn fill_exact<K: aya::Pod>(
    keys: &[K],
    values: &[Target],
) -> Result<HashMap<MapData, K, Target>, DatapathError> {
    let len = u32::try_from(keys.len().max(1)).unwrap_or(u32::MAX);
    let mut map: HashMap<MapData, K, Target> =
        HashMap::create(len, 0).map_err(map_err("exact entries"))?;
    if let Err((done, _)) = update_batch(&map, keys, values) {
        for (key, value) in keys.iter().zip(values).skip(done) {
            map.insert(key, value, 0)
                .map_err(map_err("exact entries"))?;
        }
    }
    Ok(map)
}

/// The range tables of `ranges` (grouped by key, in port order, at most
/// `MAX_RANGES` per key: `Ruleset::compile` makes them so), with their
/// targets' rules mapped by `target`.
fn range_tables(
    ranges: &[&RangeEntry],
    target: &impl Fn(&Target) -> Target,
) -> (Vec<ServiceKey>, Vec<RangeTable>) {
    let mut keys: Vec<ServiceKey> = Vec::new();
    let mut tables: Vec<RangeTable> = Vec::new();
    for r in ranges {
        if keys.last() != Some(&r.key) {
            keys.push(r.key);
            tables.push(bytemuck::Zeroable::zeroed());
        }
        let table = tables.last_mut().expect("pushed above");
        let i = table.len as usize;
        assert!(
            i < MAX_RANGES,
            "the compiler keeps at most MAX_RANGES per key"
        );
        table.ranges[i] = PortRangeEntry {
            lo: r.lo,
            hi: r.hi,
            target: target(&r.target),
        };
        table.len += 1;
    }
    (keys, tables)
}

/// A new range map holding `keys[i] -> tables[i]`, sized to them (at
/// least 1).
fn fill_range<K: aya::Pod>(
    keys: &[K],
    tables: &[RangeTable],
) -> Result<HashMap<MapData, K, RangeTable>, DatapathError> {
    let len = u32::try_from(keys.len().max(1)).unwrap_or(u32::MAX);
    let mut map: HashMap<MapData, K, RangeTable> =
        HashMap::create(len, 0).map_err(map_err("port ranges"))?;
    for (key, table) in keys.iter().zip(tables) {
        map.insert(key, table, 0).map_err(map_err("port ranges"))?;
    }
    Ok(map)
}

/// `BPF_F_NO_PREALLOC`: required by LPM tries.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Smallest size of the per-rule counter map.
pub const MIN_RULE_CAPACITY: u32 = 16 * 1024;

/// Every map of the classifier, by name.
pub const MAP_NAMES: [&str; 8] = [
    map_names::ACTIVE,
    map_names::EXACT4,
    map_names::EXACT,
    map_names::RANGE4,
    map_names::RANGE6,
    map_names::PREFIX,
    map_names::RULE_STATS,
    map_names::GLOBAL_STATS,
];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object failed")]
    Load(#[from] aya::EbpfError),
    #[error(
        "the kernel refused the classifier (fwmark needs Linux >= 5.10 with BTF, \
         CONFIG_DEBUG_INFO_BTF, and root or CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN)"
    )]
    Program(#[from] ProgramError),
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("starting the kernel log reader failed")]
    Log(#[source] aya_log::Error),
    #[error("cannot read the possible CPUs (/sys/devices/system/cpu/possible)")]
    Cpus(#[source] std::io::Error),
    #[error("the eBPF object has no {0}; it does not belong to this fwmark build")]
    Missing(&'static str),
    #[error("counter slot {slot} is outside the counter map ({capacity} slots)")]
    SlotOutOfRange { slot: u32, capacity: u32 },
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// Size of the per-rule counter map for a config with `rules` rules:
/// at least [`MIN_RULE_CAPACITY`] and twice the rules, so a config can grow
/// and change without reloading.
pub fn rule_capacity(rules: usize) -> u32 {
    u32::try_from(rules.saturating_mul(2))
        .unwrap_or(u32::MAX)
        .max(MIN_RULE_CAPACITY)
        .checked_next_power_of_two()
        .unwrap_or(u32::MAX)
}

/// The classifier's maps, owned by this process (from a load or from pins).
pub struct Maps {
    active: Array<MapData, u32>,
    exact4: ArrayOfMaps<MapData, MapData>,
    exact: ArrayOfMaps<MapData, MapData>,
    range4: ArrayOfMaps<MapData, MapData>,
    range6: ArrayOfMaps<MapData, MapData>,
    prefix: ArrayOfMaps<MapData, MapData>,
    rule_stats: PerCpuArray<MapData, RuleCounters>,
    global_stats: PerCpuArray<MapData, GlobalCounters>,
}

impl Maps {
    fn typed<T: TryFrom<Map, Error = MapError>>(
        name: &'static str,
        map: Option<Map>,
    ) -> Result<T, DatapathError> {
        T::try_from(map.ok_or(DatapathError::Missing(name))?).map_err(map_err(name))
    }

    /// Takes the maps out of a loaded object (after the program is loaded).
    fn from_ebpf(ebpf: &mut Ebpf) -> Result<Maps, DatapathError> {
        Ok(Maps {
            active: Maps::typed(map_names::ACTIVE, ebpf.take_map(map_names::ACTIVE))?,
            exact4: Maps::typed(map_names::EXACT4, ebpf.take_map(map_names::EXACT4))?,
            range4: Maps::typed(map_names::RANGE4, ebpf.take_map(map_names::RANGE4))?,
            range6: Maps::typed(map_names::RANGE6, ebpf.take_map(map_names::RANGE6))?,
            exact: Maps::typed(map_names::EXACT, ebpf.take_map(map_names::EXACT))?,
            prefix: Maps::typed(map_names::PREFIX, ebpf.take_map(map_names::PREFIX))?,
            rule_stats: Maps::typed(map_names::RULE_STATS, ebpf.take_map(map_names::RULE_STATS))?,
            global_stats: Maps::typed(
                map_names::GLOBAL_STATS,
                ebpf.take_map(map_names::GLOBAL_STATS),
            )?,
        })
    }

    /// Opens the maps pinned in `dir` (by `Datapath::load` with a pin dir).
    pub fn from_pins(dir: &Path) -> Result<Maps, DatapathError> {
        fn open(dir: &Path, name: &'static str) -> Result<Option<Map>, DatapathError> {
            let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
            Map::from_map_data(data).map(Some).map_err(map_err(name))
        }
        Ok(Maps {
            active: Maps::typed(map_names::ACTIVE, open(dir, map_names::ACTIVE)?)?,
            exact4: Maps::typed(map_names::EXACT4, open(dir, map_names::EXACT4)?)?,
            range4: Maps::typed(map_names::RANGE4, open(dir, map_names::RANGE4)?)?,
            range6: Maps::typed(map_names::RANGE6, open(dir, map_names::RANGE6)?)?,
            exact: Maps::typed(map_names::EXACT, open(dir, map_names::EXACT)?)?,
            prefix: Maps::typed(map_names::PREFIX, open(dir, map_names::PREFIX)?)?,
            rule_stats: Maps::typed(map_names::RULE_STATS, open(dir, map_names::RULE_STATS)?)?,
            global_stats: Maps::typed(
                map_names::GLOBAL_STATS,
                open(dir, map_names::GLOBAL_STATS)?,
            )?,
        })
    }

    /// Room in the per-rule counter map.
    pub fn rule_capacity(&self) -> u32 {
        self.rule_stats.len()
    }

    /// The `ACTIVE` word: slot and flags.
    fn active_word(&self) -> Result<u32, DatapathError> {
        self.active.get(&0, 0).map_err(map_err(map_names::ACTIVE))
    }

    /// The generation slot in use (0 before anything was published).
    pub fn active_slot(&self) -> Result<u32, DatapathError> {
        Ok(self.active_word()? & ACTIVE_GENERATION_MASK)
    }

    /// Handles on the live generation's exact maps (IPv4, IPv6) and its
    /// prefix trie (only when the generation has prefix entries: without
    /// them no trie is placed for it).
    pub fn live_inner_maps(&self) -> Result<(MapData, MapData, Option<MapData>), DatapathError> {
        let word = self.active_word()?;
        let slot = word & ACTIVE_GENERATION_MASK;
        let prefix = if word & ACTIVE_HAS_PREFIX != 0 {
            Some(
                self.prefix
                    .get(&slot, 0)
                    .map_err(map_err(map_names::PREFIX))?,
            )
        } else {
            None
        };
        Ok((
            self.exact4
                .get(&slot, 0)
                .map_err(map_err(map_names::EXACT4))?,
            self.exact
                .get(&slot, 0)
                .map_err(map_err(map_names::EXACT))?,
            prefix,
        ))
    }

    /// Handles on the live generation's range maps (IPv4, IPv6), when it
    /// has port ranges (without them none are placed for it).
    pub fn live_range_maps(&self) -> Result<Option<(MapData, MapData)>, DatapathError> {
        let word = self.active_word()?;
        if word & ACTIVE_HAS_RANGE == 0 {
            return Ok(None);
        }
        let slot = word & ACTIVE_GENERATION_MASK;
        Ok(Some((
            self.range4
                .get(&slot, 0)
                .map_err(map_err(map_names::RANGE4))?,
            self.range6
                .get(&slot, 0)
                .map_err(map_err(map_names::RANGE6))?,
        )))
    }

    /// The per-rule counter map (per CPU), e.g. to measure its memory.
    pub fn rule_stats_map(&self) -> &MapData {
        self.rule_stats.map()
    }

    /// Whether a generation has ever been published into these maps.
    pub fn is_published(&self) -> Result<bool, DatapathError> {
        let slot = self.active_slot()?;
        Ok(self.exact.get(&slot, 0).is_ok())
    }

    /// Builds the ruleset's maps and makes them the live generation; `slots`
    /// gives the counter slot of each rule (`Target::rule` indexes it).
    /// Counter slots of rules new to the live config are zeroed first.
    /// Returns the slot of the generation now in use.
    pub fn publish(
        &mut self,
        ruleset: &Ruleset,
        slots: &[u32],
        fresh_slots: &[u32],
    ) -> Result<u32, DatapathError> {
        assert_eq!(slots.len(), ruleset.rules.len(), "one slot per rule");
        let capacity = self.rule_capacity();
        if let Some(&slot) = slots.iter().chain(fresh_slots).find(|&&s| s >= capacity) {
            return Err(DatapathError::SlotOutOfRange { slot, capacity });
        }
        let mut phases = crate::live::Phases::new("publish");
        let current_word = self.active_word()?;
        let current = current_word & ACTIVE_GENERATION_MASK;
        let next = if self.is_published()? {
            (current + 1) % GENERATIONS
        } else {
            current
        };

        // 1. Fill the new inner maps while nothing can see them.
        let target = |t: &Target| Target {
            rule: slots[t.rule as usize],
            ..*t
        };
        // Exact entries by family: IPv4 under its 8-byte key.
        let (v4, v6): (Vec<_>, Vec<_>) = ruleset
            .exact
            .iter()
            .partition(|(k, _)| k.family == FAMILY_IPV4);
        let keys4: Vec<ServiceKey4> = v4.iter().map(|(k, _)| k.v4()).collect();
        let values4: Vec<Target> = v4.iter().map(|(_, t)| target(t)).collect();
        let exact4 = fill_exact(&keys4, &values4)?;
        let keys: Vec<ServiceKey> = v6.iter().map(|(k, _)| *k).collect();
        let values: Vec<Target> = v6.iter().map(|(_, t)| target(t)).collect();
        let exact = fill_exact(&keys, &values)?;
        phases.done("creating and filling the exact maps");
        // Port ranges by family: one table per (protocol, address).
        let (r4, r6): (Vec<_>, Vec<_>) = ruleset
            .ranges
            .iter()
            .partition(|r| r.key.family == FAMILY_IPV4);
        let (keys4, tables4) = range_tables(&r4, &target);
        let range4 = fill_range(
            &keys4.iter().map(ServiceKey::v4).collect::<Vec<_>>(),
            &tables4,
        )?;
        let (keys6, tables6) = range_tables(&r6, &target);
        let range6 = fill_range(&keys6, &tables6)?;
        phases.done("the port ranges");
        let prefix_len = u32::try_from(ruleset.prefix.len().max(1)).unwrap_or(u32::MAX);
        let mut prefix: LpmTrie<MapData, ServiceKey, Target> =
            LpmTrie::create(prefix_len, BPF_F_NO_PREALLOC).map_err(map_err("prefix entries"))?;
        for entry in &ruleset.prefix {
            prefix
                .insert(
                    &Key::new(entry.prefix_len, entry.key),
                    target(&entry.target),
                    0,
                )
                .map_err(map_err("prefix entries"))?;
        }
        phases.done("the prefix entries");
        self.zero_rule_slots(fresh_slots)?;
        phases.done("zeroing fresh counter slots");

        // 2. Place them in the unused slot; 3. switch with one word. Each
        // placement is a map-in-map update, which returns after an RCU
        // grace period, so the range and prefix maps are placed only when
        // the generation has such entries (and once into a slot that never
        // held one, so every slot always holds a map). Without them their
        // flag is off in the ACTIVE word and the classifier never reads
        // those slots: what an earlier generation left there is never seen.
        self.exact4
            .set(next, exact4.map(), 0)
            .map_err(map_err(map_names::EXACT4))?;
        self.exact
            .set(next, exact.map(), 0)
            .map_err(map_err(map_names::EXACT))?;
        let mut flags = 0;
        if !ruleset.ranges.is_empty() || self.range4.get(&next, 0).is_err() {
            self.range4
                .set(next, range4.map(), 0)
                .map_err(map_err(map_names::RANGE4))?;
            self.range6
                .set(next, range6.map(), 0)
                .map_err(map_err(map_names::RANGE6))?;
        }
        if !ruleset.ranges.is_empty() {
            flags |= ACTIVE_HAS_RANGE;
        }
        if !ruleset.prefix.is_empty() || self.prefix.get(&next, 0).is_err() {
            self.prefix
                .set(next, prefix.map(), 0)
                .map_err(map_err(map_names::PREFIX))?;
        }
        if !ruleset.prefix.is_empty() {
            flags |= ACTIVE_HAS_PREFIX;
        }
        phases.done("placing the new generation");
        if ruleset.icmp_errors {
            // In the same word: ICMP errors are marked from exactly the
            // packet that first sees these entries.
            flags |= ACTIVE_ICMP_ERRORS;
        }
        crate::failpoint::pause(crate::failpoint::step::BEFORE_SWITCH);
        self.active
            .set(0, next | flags, 0)
            .map_err(map_err(map_names::ACTIVE))?;
        phases.done("switching");

        if next != current {
            // The new generation is live from here on: what follows only
            // frees the old one, so a failure is a warning, not an error.
            if let Err(e) = self.release(current, current_word, exact.map()) {
                log::warn!(
                    "the new config is live, but freeing the previous generation failed \
                     (it is freed at the next change): {e}"
                );
            }
            phases.done("releasing the previous generation");
        }
        Ok(next)
    }

    /// Waits until no program reads generation `old` any more, then
    /// replaces its maps by empty ones so their memory goes. Its prefix
    /// trie and range tables are replaced only when it had such entries
    /// (`old_word`, its `ACTIVE` word, has their flag); otherwise they were
    /// not placed for it, and each map-in-map update costs an RCU grace
    /// period.
    fn release(
        &mut self,
        old: u32,
        old_word: u32,
        live_exact: &MapData,
    ) -> Result<(), DatapathError> {
        let live = (old + 1) % GENERATIONS;
        // 4. Wait for programs that read the old ACTIVE word: this
        // map-in-map update returns after an RCU grace period.
        self.exact
            .set(live, live_exact, 0)
            .map_err(map_err(map_names::EXACT))?;
        // 5. Release the old generation's memory: nothing reads it now.
        let empty_exact4: HashMap<MapData, ServiceKey4, Target> =
            HashMap::create(1, 0).map_err(map_err("exact entries"))?;
        self.exact4
            .set(old, empty_exact4.map(), 0)
            .map_err(map_err(map_names::EXACT4))?;
        if old_word & ACTIVE_HAS_RANGE != 0 {
            let empty_range4 = fill_range::<ServiceKey4>(&[], &[])?;
            self.range4
                .set(old, empty_range4.map(), 0)
                .map_err(map_err(map_names::RANGE4))?;
            let empty_range6 = fill_range::<ServiceKey>(&[], &[])?;
            self.range6
                .set(old, empty_range6.map(), 0)
                .map_err(map_err(map_names::RANGE6))?;
        }
        let empty_exact: HashMap<MapData, ServiceKey, Target> =
            HashMap::create(1, 0).map_err(map_err("exact entries"))?;
        self.exact
            .set(old, empty_exact.map(), 0)
            .map_err(map_err(map_names::EXACT))?;
        if old_word & ACTIVE_HAS_PREFIX != 0 {
            let empty_prefix: LpmTrie<MapData, ServiceKey, Target> =
                LpmTrie::create(1, BPF_F_NO_PREALLOC).map_err(map_err("prefix entries"))?;
            self.prefix
                .set(old, empty_prefix.map(), 0)
                .map_err(map_err(map_names::PREFIX))?;
        }
        Ok(())
    }

    /// Sets the given counter slots to zero on every CPU.
    fn zero_rule_slots(&mut self, slots: &[u32]) -> Result<(), DatapathError> {
        if slots.is_empty() {
            return Ok(());
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?;
        // Many slots per syscall; one by one where batches are refused.
        let done = match zero_batch_per_cpu(&self.rule_stats, slots, cpus) {
            Ok(()) => return Ok(()),
            Err((done, _)) => done,
        };
        for &slot in &slots[done..] {
            let zeros = PerCpuValues::try_from(vec![RuleCounters::default(); cpus])
                .map_err(DatapathError::Cpus)?;
            self.rule_stats
                .set(slot, zeros, 0)
                .map_err(map_err(map_names::RULE_STATS))?;
        }
        Ok(())
    }

    /// Sets counters carried over from another set of maps (an upgrade
    /// from an older layout, [`crate::upgrade`]): each given rule slot's
    /// per-CPU values, and the global counters' per-CPU values (one value
    /// per possible CPU each). Only for maps no program uses yet: the
    /// values are written, not added.
    pub fn carry_counters(
        &mut self,
        rules: &[(u32, Vec<RuleCounters>)],
        global: Vec<GlobalCounters>,
    ) -> Result<(), DatapathError> {
        let capacity = self.rule_capacity();
        for (slot, values) in rules {
            if *slot >= capacity {
                return Err(DatapathError::SlotOutOfRange {
                    slot: *slot,
                    capacity,
                });
            }
            let values = PerCpuValues::try_from(values.clone()).map_err(DatapathError::Cpus)?;
            self.rule_stats
                .set(*slot, values, 0)
                .map_err(map_err(map_names::RULE_STATS))?;
        }
        let global = PerCpuValues::try_from(global).map_err(DatapathError::Cpus)?;
        self.global_stats
            .set(0, global, 0)
            .map_err(map_err(map_names::GLOBAL_STATS))?;
        Ok(())
    }

    /// Adds counters per CPU to the given rule slots and to the global
    /// counters (what an old program counted after [`Maps::carry_counters`]
    /// copied its counters, until it was replaced). A read, then a write:
    /// an increment the program makes on a CPU in between is lost.
    pub fn add_counters(
        &mut self,
        rules: &[(u32, Vec<RuleCounters>)],
        global: &[GlobalCounters],
    ) -> Result<(), DatapathError> {
        for (slot, extra) in rules {
            if extra.iter().all(|c| *c == RuleCounters::default()) {
                continue;
            }
            let now = self
                .rule_stats
                .get(slot, 0)
                .map_err(map_err(map_names::RULE_STATS))?;
            let sum: Vec<RuleCounters> = now
                .iter()
                .zip(extra)
                .map(|(a, b)| RuleCounters {
                    packets: a.packets + b.packets,
                    bytes: a.bytes + b.bytes,
                    icmp_errors: a.icmp_errors + b.icmp_errors,
                })
                .collect();
            let sum = PerCpuValues::try_from(sum).map_err(DatapathError::Cpus)?;
            self.rule_stats
                .set(*slot, sum, 0)
                .map_err(map_err(map_names::RULE_STATS))?;
        }
        let now = self
            .global_stats
            .get(&0, 0)
            .map_err(map_err(map_names::GLOBAL_STATS))?;
        let sum: Vec<GlobalCounters> = now
            .iter()
            .zip(global)
            .map(|(a, b)| add_global(*a, b))
            .collect();
        let sum = PerCpuValues::try_from(sum).map_err(DatapathError::Cpus)?;
        self.global_stats
            .set(0, sum, 0)
            .map_err(map_err(map_names::GLOBAL_STATS))?;
        Ok(())
    }

    /// Global counters of every interface together, summed over CPUs.
    pub fn global_counters(&self) -> Result<GlobalCounters, DatapathError> {
        Ok(self
            .global_counters_per_slot()?
            .iter()
            .fold(GlobalCounters::default(), add_global))
    }

    /// Global counters of one interface's slot ([`fwmark_common::IFACE_SLOT`]),
    /// summed over CPUs.
    pub fn global_counters_at(&self, slot: u32) -> Result<GlobalCounters, DatapathError> {
        let per_cpu = self
            .global_stats
            .get(&slot, 0)
            .map_err(map_err(map_names::GLOBAL_STATS))?;
        Ok(per_cpu.iter().fold(GlobalCounters::default(), add_global))
    }

    /// Global counters of every slot, summed over CPUs, in slot order (one
    /// batched read where the kernel has batches).
    pub fn global_counters_per_slot(&self) -> Result<Vec<GlobalCounters>, DatapathError> {
        let len = self.global_stats.len();
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?;
        if let Some(all) = lookup_batch_per_cpu::<GlobalCounters>(&self.global_stats, len, cpus) {
            return Ok(all
                .chunks(cpus)
                .map(|c| c.iter().fold(GlobalCounters::default(), add_global))
                .collect());
        }
        (0..len).map(|s| self.global_counters_at(s)).collect()
    }

    /// Sets one interface's global counters to zero on every CPU (a slot
    /// taken by an interface new to the maps).
    pub fn zero_global_slot(&mut self, slot: u32) -> Result<(), DatapathError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?;
        let zeros = PerCpuValues::try_from(vec![GlobalCounters::default(); cpus])
            .map_err(DatapathError::Cpus)?;
        self.global_stats
            .set(slot, zeros, 0)
            .map_err(map_err(map_names::GLOBAL_STATS))
    }

    /// Counters of the given slots, summed over CPUs, in slot order given.
    /// Reads every slot up to the highest given in a few batched syscalls
    /// (a scrape of a large config), one by one where batches are refused.
    pub fn rule_counters(&self, slots: &[u32]) -> Result<Vec<RuleCounters>, DatapathError> {
        let sum = |values: &[RuleCounters]| {
            values
                .iter()
                .fold(RuleCounters::default(), |acc, c| RuleCounters {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                    icmp_errors: acc.icmp_errors + c.icmp_errors,
                })
        };
        let Some(&top) = slots.iter().max() else {
            return Ok(Vec::new());
        };
        let capacity = self.rule_capacity();
        if top >= capacity {
            return Err(DatapathError::SlotOutOfRange {
                slot: top,
                capacity,
            });
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?;
        if let Some(all) = lookup_batch_per_cpu::<RuleCounters>(&self.rule_stats, top + 1, cpus) {
            return Ok(slots
                .iter()
                .map(|&s| sum(&all[s as usize * cpus..(s as usize + 1) * cpus]))
                .collect());
        }
        slots
            .iter()
            .map(|&slot| {
                let values = self
                    .rule_stats
                    .get(&slot, 0)
                    .map_err(map_err(map_names::RULE_STATS))?;
                Ok(sum(&values))
            })
            .collect()
    }
}

/// `a + c`, counter by counter.
pub fn add_global(a: GlobalCounters, c: &GlobalCounters) -> GlobalCounters {
    GlobalCounters {
        seen: a.seen + c.seen,
        marked: a.marked + c.marked,
        no_match: a.no_match + c.no_match,
        non_ip: a.non_ip + c.non_ip,
        later_fragment: a.later_fragment + c.later_fragment,
        malformed: a.malformed + c.malformed,
        icmp_error: a.icmp_error + c.icmp_error,
    }
}

/// Reads the classifier's aya-log records into the `log` crate.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// A loaded classifier program and its maps.
pub struct Datapath {
    ebpf: Ebpf,
    /// Which entry was loaded: Ethernet frames or L3 packets.
    link: Link,
    pub maps: Maps,
    /// Present when kernel-side logging is on.
    pub logger: Option<KernelLogger>,
}

impl Datapath {
    /// Loads the classifier into the kernel (not attached anywhere yet),
    /// with a per-rule counter map of `rule_capacity` slots. With `pin_dir`
    /// the maps are pinned there, or, when pins exist already, reused: the
    /// program then works on the live maps. `log_level`: kernel-side log
    /// records up to that level (`None`: none, and no logging code runs).
    pub fn load(
        rule_capacity: u32,
        pin_dir: Option<&Path>,
        log_level: Option<aya_log::Level>,
    ) -> Result<Datapath, DatapathError> {
        Datapath::load_for(Link::Ethernet, rule_capacity, pin_dir, log_level)
    }

    /// [`Datapath::load`] of the entry for `link`: `fwmark` for Ethernet
    /// devices, `fwmark_l3` for L3 devices (the same maps either way, so
    /// pins are shared with any earlier run on the device).
    pub fn load_for(
        link: Link,
        rule_capacity: u32,
        pin_dir: Option<&Path>,
        log_level: Option<aya_log::Level>,
    ) -> Result<Datapath, DatapathError> {
        Datapath::load_at(link, 0, rule_capacity, pin_dir, log_level)
    }

    /// [`Datapath::load_for`] counting its global counters in `GLOBAL_STATS`
    /// slot `iface_slot` (below [`MAX_INTERFACES`]): one load per interface
    /// of a group that shares the maps ([`fwmark_common::IFACE_SLOT`]).
    pub fn load_at(
        link: Link,
        iface_slot: u32,
        rule_capacity: u32,
        pin_dir: Option<&Path>,
        log_level: Option<aya_log::Level>,
    ) -> Result<Datapath, DatapathError> {
        if iface_slot >= MAX_INTERFACES {
            return Err(DatapathError::SlotOutOfRange {
                slot: iface_slot,
                capacity: MAX_INTERFACES,
            });
        }
        let mut loader = EbpfLoader::new();
        // Read-only: the verifier folds the slot into the map lookup.
        loader.override_global(fwmark_common::IFACE_SLOT, &iface_slot, true);
        loader.map_max_entries(map_names::RULE_STATS, rule_capacity);
        // A read-only global: the verifier prunes the disabled log calls.
        let level: u8 = log_level.map_or(0, |l| l as u8);
        loader.override_global(aya_log::LEVEL, &level, true);
        let pins: Vec<(&str, std::path::PathBuf)> = pin_dir
            .map(|dir| MAP_NAMES.iter().map(|n| (*n, dir.join(n))).collect())
            .unwrap_or_default();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(link.program_name())
            .ok_or(DatapathError::Missing("classifier program"))?
            .try_into()?;
        program.load()?;
        let logger = match log_level {
            Some(_) => Some(aya_log::EbpfLogger::init(&mut ebpf).map_err(DatapathError::Log)?),
            None => None,
        };
        let maps = Maps::from_ebpf(&mut ebpf)?;
        Ok(Datapath {
            ebpf,
            link,
            maps,
            logger,
        })
    }

    /// The link this classifier's entry parses.
    pub fn link(&self) -> Link {
        self.link
    }

    /// The classifier program (for attaching and `BPF_PROG_TEST_RUN`).
    pub fn program(&self) -> Result<&SchedClassifier, DatapathError> {
        Ok(self
            .ebpf
            .program(self.link.program_name())
            .ok_or(DatapathError::Missing("classifier program"))?
            .try_into()?)
    }

    /// Mutable access to the classifier program.
    pub fn program_mut(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        Ok(self
            .ebpf
            .program_mut(self.link.program_name())
            .ok_or(DatapathError::Missing("classifier program"))?
            .try_into()?)
    }

    /// The program and the maps at once, to run the program while the maps
    /// change (tests).
    pub fn split(&mut self) -> Result<(&SchedClassifier, &mut Maps), DatapathError> {
        let program = self
            .ebpf
            .program(self.link.program_name())
            .ok_or(DatapathError::Missing("classifier program"))?
            .try_into()?;
        Ok((program, &mut self.maps))
    }

    /// Publishes `ruleset` with rule `i` counting in slot `i` (for a
    /// classifier that only ever runs one ruleset: tests, benchmarks).
    pub fn publish_simple(&mut self, ruleset: &Ruleset) -> Result<u32, DatapathError> {
        let slots: Vec<u32> = (0..ruleset.rules.len() as u32).collect();
        self.maps.publish(ruleset, &slots, &[])
    }
}

/// The benchmark floor: an empty classifier, loaded from its own object
/// ([`FLOOR_OBJECT`]), to measure the hook's cost with nothing to do.
#[cfg(feature = "floor")]
pub struct Floor {
    ebpf: Ebpf,
}

#[cfg(feature = "floor")]
impl Floor {
    /// Loads the floor program into the kernel (not attached anywhere).
    pub fn load() -> Result<Floor, DatapathError> {
        let mut ebpf = Ebpf::load(FLOOR_OBJECT)?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(fwmark_common::FLOOR_PROGRAM_NAME)
            .ok_or(DatapathError::Missing("floor program"))?
            .try_into()?;
        program.load()?;
        Ok(Floor { ebpf })
    }

    /// The floor program (for `BPF_PROG_TEST_RUN`).
    pub fn program(&self) -> Result<&SchedClassifier, DatapathError> {
        Ok(self
            .ebpf
            .program(fwmark_common::FLOOR_PROGRAM_NAME)
            .ok_or(DatapathError::Missing("floor program"))?
            .try_into()?)
    }

    /// The floor program, mutable (to attach it).
    pub fn program_mut(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        Ok(self
            .ebpf
            .program_mut(fwmark_common::FLOOR_PROGRAM_NAME)
            .ok_or(DatapathError::Missing("floor program"))?
            .try_into()?)
    }
}
