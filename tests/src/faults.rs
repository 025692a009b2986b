//! What the faults tests (`tests/tests/faults_*.rs`) share: their lab,
//! configs that tell each other apart by the marks of a few probes, the
//! mark the next packet of a probe arrives with, and fwmark's pinned
//! `ACTIVE` word and recorded state.

use crate::{
    example::probe,
    netns::Lab,
    nft::{MarkCounters, Probe, ProbeProto},
    ops::{DNS_VIP, TempDir, VIP, pin_dir, send, state_text, web_dns_config as config},
};

/// A VIP only the larger configs mark.
pub const BULK_VIP: &str = "10.99.0.1";

/// The common start of a faults test: the kernel gate, a lab whose director
/// owns the web, DNS and bulk VIPs, a directory for configs, and
/// [`config`]`(80)` written there as `file`.
pub fn setup(name: &str, tools: &[&str], file: &str) -> Option<(Lab, TempDir, String)> {
    crate::ops::setup(name, tools, &[VIP, DNS_VIP, BULK_VIP], file)
}

/// A config of `rules` more rules (one per port of [`BULK_VIP`], UDP,
/// mark 99) besides [`config`]`(80)`.
pub fn config_with_rules(rules: u16) -> String {
    let ports: Vec<String> = (1..=rules).map(|p| p.to_string()).collect();
    format!(
        "{}\n[[service]]\nname = \"many\"\nvip = \"{BULK_VIP}\"\nproto = \"udp\"\nports = [{}]\nmark = 99\n",
        config(80),
        ports.join(", ")
    )
}

/// The probes whose marks tell the configs apart: web TCP 80, web UDP 443
/// and UDP port 5 of [`BULK_VIP`] (in [`config_with_rules`]`(n)` for n of 5 or more).
pub fn telling_probes() -> Vec<Probe> {
    vec![
        probe(VIP, ProbeProto::Tcp, 80, 0, 1),
        probe(VIP, ProbeProto::Udp, 443, 0, 1),
        probe(BULK_VIP, ProbeProto::Udp, 5, 0, 1),
    ]
}

/// Counters for [`telling_probes`], with every mark the tests use.
pub fn install_counters(lab: &Lab) -> MarkCounters<'_> {
    MarkCounters::install_with_marks(&lab.director, &telling_probes(), &[80, 81, 82, 99])
        .expect("install nft counters")
}

/// Sends `p` (one packet) and returns the one mark it arrived with, read
/// from table `i` of `counters` (the table of `p`).
pub fn mark_of_next(lab: &Lab, counters: &MarkCounters<'_>, i: usize, p: &Probe) -> u32 {
    let before = counters.read().unwrap()[i].clone();
    send(lab, p);
    let after = counters.read().unwrap()[i].clone();
    assert_eq!(after.total(), before.total() + 1, "{p}: {after:?}");
    assert_eq!(
        after.other, before.other,
        "{p}: an unexpected mark: {after:?}"
    );
    after
        .by_mark
        .iter()
        .find(|(m, n)| before.by_mark.get(m) != Some(n))
        .map(|(m, _)| *m)
        .unwrap_or_else(|| panic!("{p}: the packet was not counted: {after:?}"))
}

/// Sends one packet of each telling probe and returns the mark each arrived
/// with.
pub fn marks_now(lab: &Lab, counters: &MarkCounters<'_>) -> Vec<u32> {
    telling_probes()
        .iter()
        .enumerate()
        .map(|(i, p)| mark_of_next(lab, counters, i, p))
        .collect()
}

/// What the telling probes get under [`config`]`(mark)`.
pub fn small(mark: u32) -> Vec<u32> {
    vec![mark, mark, 0]
}

/// What the telling probes get under [`config_with_rules`] (more than 0).
pub fn with_rules() -> Vec<u32> {
    vec![80, 80, 99]
}

/// The web probe that must arrive with mark 80 under [`config`]`(80)`.
pub fn web() -> Probe {
    probe(VIP, ProbeProto::Tcp, 80, 80, 1)
}

/// Packets the web probe got, per mark (a counter table of its own).
pub fn web_counters(lab: &Lab) -> MarkCounters<'_> {
    MarkCounters::install_with_marks(&lab.director, &[web()], &[81, 82]).unwrap()
}

/// The one mark the next web packet arrives with.
pub fn web_mark(lab: &Lab, counters: &MarkCounters<'_>) -> u32 {
    mark_of_next(lab, counters, 0, &web())
}

/// The recorded state (`state.json`) as JSON.
pub fn state_json(lab: &Lab) -> serde_json::Value {
    serde_json::from_str(&state_text(lab).expect("state.json")).unwrap()
}

/// The pinned `ACTIVE` word of the director's interface (generation slot
/// and flags), read the way the classifier reads it.
pub struct ActiveWord(aya::maps::Array<aya::maps::MapData, u32>);

impl ActiveWord {
    pub fn open(lab: &Lab) -> ActiveWord {
        let data =
            aya::maps::MapData::from_pin(pin_dir(lab).join(fwmark_common::map_names::ACTIVE))
                .expect("open the pinned ACTIVE map");
        ActiveWord(aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap())
    }

    pub fn get(&self) -> u32 {
        self.0.get(&0, 0).unwrap()
    }
}
