//! fwmark's TC ingress classifier.
//!
//! For every packet: parse Ethernet (+ up to two VLAN tags), IPv4 or IPv6
//! (+ extension headers), then the TCP/UDP/SCTP destination port; look up
//! (family, protocol, port, destination address) in the active generation's
//! maps; on a match write `mark = (mark & !mask) | (value & mask)`.
//!
//! L3 devices (tun, WireGuard, ipip, GRE, ...) have no Ethernet header: their
//! entry, `fwmark_l3`, starts at the network header with the family taken
//! from the skb's protocol; everything after the parse is the same code.
//!
//! It never drops, redirects or rewrites a packet and always returns
//! `TC_ACT_UNSPEC` (== `TCX_NEXT`), so later tc programs still run.
//!
//! Exact IPv4 addresses are looked up in `EXACT4` by an 8-byte key
//! (protocol, port, address), exact IPv6 addresses in `EXACT` by the
//! 20-byte `ServiceKey`, prefixes of both families in `PREFIX`.
//!
//! Precedence, first match wins:
//! 1. exact address, exact port, then exact address, port range (`RANGE4`,
//!    `RANGE6`: a small sorted table per address, scanned only when the
//!    generation has ranges)
//! 2. exact address, all ports
//! 3. longest address prefix; at equal length the port entry before the
//!    all-ports entry
//!
//! IP fragments at a non-zero offset carry no L4 header: they are looked up
//! with "all ports" only (like iptables, whose port matches never match them).
//!
//! With `icmp_errors = true` (a flag in the `ACTIVE` word, so it switches
//! with the entries), an ICMP error (ICMPv4 3, 4, 11; ICMPv6 1-4) is looked
//! up by the packet it quotes: its family, protocol, SOURCE port and SOURCE
//! address, by the same lookup. IPVS's `schedule_icmp` then finds the
//! fwmark service by the error's mark. The flag is read only for ICMP.
//!
//! Debug logging (aya-log) is compiled in but gated by `AYA_LOG_LEVEL`, a
//! read-only global the loader sets before loading (off unless
//! `--log-level` says otherwise); the verifier then removes the disabled
//! branches, so with logging off the hot path has no logging code at all.
// The classifier is built for the BPF target (by fwmark-user/build.rs);
// host builds of this crate exist only so clippy checks it with the rest.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

mod parse;

use aya_ebpf::{
    Global,
    bindings::TC_ACT_UNSPEC,
    btf_maps::{Array, ArrayOfMaps, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use aya_log_ebpf::{debug, trace};
use fwmark_common::{
    ACTIVE_GENERATION_MASK, ACTIVE_HAS_PREFIX, ACTIVE_HAS_RANGE, ACTIVE_ICMP_ERRORS, ALL_PORTS,
    FAMILY_IPV4, GENERATIONS, GlobalCounters, LPM_LOOKUP_PREFIX_LEN, MAX_INTERFACES, MAX_RANGES,
    RangeTable, RangeTableBytes, RuleCounters, ServiceKey, ServiceKey4, Target, TargetBytes,
};
use parse::{Icmp, Parsed};

/// Index of the generation in use, plus `ACTIVE_HAS_PREFIX`. Read once per
/// packet, so every lookup of one packet sees one whole configuration.
#[btf_map]
static ACTIVE: Array<u32, 1> = Array::new();

/// Exact IPv4-address entries (8-byte key), one inner hash map per
/// generation (inner maps are created and filled by userspace and never
/// modified once published). Values are `Target`s declared as bytes (see
/// `TargetBytes`: kernel 6.1).
#[btf_map]
static EXACT4: ArrayOfMaps<HashMap<ServiceKey4, TargetBytes, 1>, { GENERATIONS as usize }> =
    ArrayOfMaps::new();

/// Exact IPv6-address entries, like `EXACT4` with the 20-byte key.
#[btf_map]
static EXACT: ArrayOfMaps<HashMap<ServiceKey, TargetBytes, 1>, { GENERATIONS as usize }> =
    ArrayOfMaps::new();

/// Port ranges of exact IPv4 addresses, one inner hash map per generation:
/// (protocol, address) with port `ALL_PORTS` -> a `RangeTable` (as bytes).
#[btf_map]
static RANGE4: ArrayOfMaps<HashMap<ServiceKey4, RangeTableBytes, 1>, { GENERATIONS as usize }> =
    ArrayOfMaps::new();

/// Port ranges of exact IPv6 addresses, like `RANGE4`.
#[btf_map]
static RANGE6: ArrayOfMaps<HashMap<ServiceKey, RangeTableBytes, 1>, { GENERATIONS as usize }> =
    ArrayOfMaps::new();

/// Prefix entries, one inner LPM trie per generation; empty slot = no prefixes.
#[btf_map]
static PREFIX: ArrayOfMaps<LpmTrie<ServiceKey, TargetBytes, 1>, { GENERATIONS as usize }> =
    ArrayOfMaps::new();

/// Per-rule counters; userspace sizes this map at load time.
#[btf_map]
static RULE_STATS: PerCpuArray<RuleCounters, 1> = PerCpuArray::new();

/// Global counters: one slot per interface the maps are attached to, one
/// struct per CPU in each (one lookup per packet, at [`FWMARK_IFACE_SLOT`]).
#[btf_map]
static GLOBAL_STATS: PerCpuArray<GlobalCounters, { MAX_INTERFACES as usize }> = PerCpuArray::new();

/// This load's slot in `GLOBAL_STATS`: a read-only global the loader sets
/// per interface (`fwmark_common::IFACE_SLOT`); the verifier knows its
/// value (the map is frozen), so the slot is in range by construction.
#[unsafe(no_mangle)]
static FWMARK_IFACE_SLOT: Global<u32> = Global::new(0);

/// The entry for Ethernet devices (and loopback): frames start with an
/// Ethernet header.
#[classifier]
pub fn fwmark(ctx: TcContext) -> i32 {
    run::<false>(&ctx)
}

/// The entry for L3 devices (tun, WireGuard, ipip, ip6tnl, sit, GRE):
/// packets start at the IP header, their family is the skb's protocol.
/// Same maps, same lookup and counters; only the parse's start differs.
#[classifier]
pub fn fwmark_l3(ctx: TcContext) -> i32 {
    run::<true>(&ctx)
}

#[inline(always)]
fn run<const L3: bool>(ctx: &TcContext) -> i32 {
    let Some(global) = GLOBAL_STATS.get_ptr_mut(FWMARK_IFACE_SLOT.load()) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: this CPU's slot of a per-CPU array, used by this program only
    // while it runs (no other writer can interleave on this CPU).
    let global = unsafe { &mut *global };
    global.seen += 1;
    let parsed = if L3 {
        parse::packet_l3(ctx)
    } else {
        parse::packet(ctx.data(), ctx.data_end())
    };
    match parsed {
        Parsed::NonIp => global.non_ip += 1,
        Parsed::Malformed => global.malformed += 1,
        Parsed::Ip(pkt) => {
            if pkt.later_fragment {
                global.later_fragment += 1;
            }
            // One read of the generation word per packet: the entries, the
            // has-prefix flag and the icmp_errors flag of one config.
            let Some(&active) = ACTIVE.get(0) else {
                global.no_match += 1;
                return TC_ACT_UNSPEC;
            };
            let mut key = pkt.key;
            let mut with_port = !pkt.later_fragment;
            let mut icmp = false;
            // The flag is read only for ICMP: other packets pay one compare.
            if parse::is_icmp(&pkt) && active & ACTIVE_ICMP_ERRORS != 0 {
                match parse::icmp_error(ctx.data(), ctx.data_end(), &pkt) {
                    Icmp::Informational => {}
                    Icmp::Error(quoted, later_fragment) => {
                        key = quoted;
                        with_port = !later_fragment;
                        icmp = true;
                    }
                    Icmp::Malformed => {
                        global.malformed += 1;
                        return TC_ACT_UNSPEC;
                    }
                }
            }
            match lookup(active, &key, with_port) {
                Some(target) => {
                    mark(ctx, &target, pkt.l3_offset, icmp);
                    global.marked += 1;
                    if icmp {
                        global.icmp_error += 1;
                    }
                    debug!(
                        ctx,
                        "marked: family {} proto {} port {} rule {} mark {:x}/{:x} icmp error {}",
                        key.family,
                        key.proto,
                        u16::from_be_bytes(key.port),
                        target.rule,
                        target.mark,
                        target.mask,
                        u8::from(icmp)
                    );
                }
                None => {
                    global.no_match += 1;
                    trace!(
                        ctx,
                        "no match: family {} proto {} port {}",
                        key.family,
                        key.proto,
                        u16::from_be_bytes(key.port)
                    );
                }
            }
        }
    }
    TC_ACT_UNSPEC
}

#[inline(always)]
fn mark(ctx: &TcContext, target: &Target, l3_offset: u32, icmp: bool) {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    let old = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark((old & !target.mask) | (target.mark & target.mask));
    if let Some(stats) = RULE_STATS.get_ptr_mut(target.rule) {
        // SAFETY: a per-CPU array slot, owned by this CPU while the program runs.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += u64::from(ctx.len().saturating_sub(l3_offset));
            if icmp {
                (*stats).icmp_errors += 1;
            }
        }
    }
}

// Keys are passed by reference: a by-value key is first copied to a second
// stack slot, which costs instructions on every packet.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
fn lookup(active: u32, key: &ServiceKey, with_port: bool) -> Option<Target> {
    let generation = active & ACTIVE_GENERATION_MASK;
    let mut key = *key;
    let port = key.port;

    // A range is a port entry: after the exact port, before all ports;
    // looked up only when the generation has ranges.
    let ranges = with_port && active & ACTIVE_HAS_RANGE != 0;
    if key.family == FAMILY_IPV4 {
        if let Some(exact) = EXACT4.get(generation) {
            let mut key4 = key.v4();
            if with_port && let Some(target) = exact.get_ptr(&key4) {
                return Some(read_target(target));
            }
            key4.port = ALL_PORTS.to_be_bytes();
            if ranges
                && let Some(table) = RANGE4.get(generation).and_then(|m| m.get_ptr(&key4))
                && let Some(target) = in_range(table, port)
            {
                return Some(target);
            }
            if let Some(target) = exact.get_ptr(&key4) {
                return Some(read_target(target));
            }
        }
    } else if let Some(exact) = EXACT.get(generation) {
        if with_port && let Some(target) = exact.get_ptr(&key) {
            return Some(read_target(target));
        }
        key.port = ALL_PORTS.to_be_bytes();
        if ranges
            && let Some(table) = RANGE6.get(generation).and_then(|m| m.get_ptr(&key))
            && let Some(target) = in_range(table, port)
        {
            return Some(target);
        }
        if let Some(target) = exact.get_ptr(&key) {
            return Some(read_target(target));
        }
    }
    key.port = port;

    if active & ACTIVE_HAS_PREFIX == 0 {
        return None;
    }
    let prefix = PREFIX.get(generation)?;
    let mut lpm_key = Key::new(LPM_LOOKUP_PREFIX_LEN, key);
    let with_port = if with_port {
        prefix.get(&lpm_key).map(|t| read_target(t))
    } else {
        None
    };
    lpm_key.data.port = ALL_PORTS.to_be_bytes();
    let all_ports = prefix.get(&lpm_key).map(|t| read_target(t));
    match (with_port, all_ports) {
        (Some(p), Some(a)) if a.prefix_len > p.prefix_len => Some(a),
        (Some(p), _) => Some(p),
        (None, a) => a,
    }
}

/// The target of the range of `table` that holds `port` (network order),
/// if one does: a scan of at most `MAX_RANGES` sorted, disjoint ranges.
#[inline(always)]
fn in_range(table: *const RangeTableBytes, port: [u8; 2]) -> Option<Target> {
    let port = u16::from_be_bytes(port);
    let table = table.cast::<RangeTable>();
    // SAFETY: `table` points at a live map value (published inner maps are
    // never modified) that userspace wrote as a `RangeTable`'s bytes; hash
    // map values are 8-byte aligned, enough for `RangeTable` (align 4).
    let len = unsafe { (*table).len };
    for i in 0..MAX_RANGES {
        if i as u32 >= len {
            break;
        }
        // SAFETY: as above; `i < MAX_RANGES`, inside the value.
        let range = unsafe { &(*table).ranges[i] };
        if port < range.lo {
            break;
        }
        if port <= range.hi {
            return Some(range.target);
        }
    }
    None
}

/// The `Target` stored in an inner map's value.
#[inline(always)]
fn read_target(value: *const TargetBytes) -> Target {
    // SAFETY: `value` points at a live map value (published inner maps are
    // never modified, so it is stable) that userspace wrote as a `Target`'s
    // bytes; map values sit at 4-byte-aligned addresses (hash: 8-aligned;
    // LPM trie: after a 4-aligned header and the 20-byte key), enough for
    // `Target` (align 4, asserted in fwmark-common).
    unsafe { *value.cast::<Target>() }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
