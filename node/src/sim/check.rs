//! The invariants a simulated run must keep, checked when it ends.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use meshtrain_ledger::{AuthorId, RecordHash, Seq, WeightsHash};
use serde::Serialize;

use super::world::Closed;
use super::World;

/// Rounds after the faults stop before agreement is required.
pub const QUIET_ROUNDS: u64 = 2;

/// One broken invariant, named so that a reader knows what failed.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "invariant", rename_all = "kebab-case")]
pub enum Violation {
    /// An honest author signed two records at one seq or for one round.
    TwoRecords { author: String, at: String },
    /// A node holds a broken chain.
    BrokenChain { node: usize, detail: String },
    /// An honest node took or ended a round on an anchor no honest node
    /// computed (the attackers' poisoned one).
    Hijacked { node: usize, round: u64 },
    /// Honest nodes aggregated a round, after the network was quiet, onto
    /// different anchors (after any repair: the anchor that started it).
    AnchorSplit {
        round: u64,
        anchors: BTreeMap<usize, String>,
    },
    /// Honest nodes ended on different anchors.
    FinalSplit { anchors: BTreeMap<usize, String> },
    /// After the network went quiet, most of an honest node's rounds moved
    /// nothing or were reverted: agreement kept, training lost.
    Stalled { node: usize, rounds: usize, lost: usize },
    /// A gossip message was settled twice, or never.
    Settlement { node: usize, detail: String },
    /// An honest node did not finish in time.
    Unfinished { node: usize, round: u64, phase: String },
    /// A node stopped on an error.
    Fatal { node: usize, error: String },
    /// An honest node's ledger does not replay (`ledger replay`): an
    /// auditor could not reproduce the anchors it recorded.
    Unreplayable { node: usize, detail: String },
}

impl Violation {
    pub fn invariant(&self) -> &'static str {
        match self {
            Violation::TwoRecords { .. } => "two-records",
            Violation::BrokenChain { .. } => "broken-chain",
            Violation::AnchorSplit { .. } => "anchor-split",
            Violation::Hijacked { .. } => "hijacked",
            Violation::FinalSplit { .. } => "final-split",
            Violation::Stalled { .. } => "stalled",
            Violation::Settlement { .. } => "settlement",
            Violation::Unfinished { .. } => "unfinished",
            Violation::Fatal { .. } => "fatal",
            Violation::Unreplayable { .. } => "unreplayable",
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::TwoRecords { author, at } => {
                write!(f, "author {author} signed two records at {at}")
            }
            Violation::BrokenChain { node, detail } => {
                write!(f, "node {node} holds a broken chain: {detail}")
            }
            Violation::Hijacked { node, round } => write!(f, "node {node} took the poisoned anchor at round {round}"),
            Violation::AnchorSplit { round, anchors } => {
                write!(f, "round {round} was aggregated onto different anchors: {anchors:?}")
            }
            Violation::FinalSplit { anchors } => {
                write!(f, "honest nodes ended on different anchors: {anchors:?}")
            }
            Violation::Stalled { node, rounds, lost } => write!(
                f,
                "node {node} lost {lost} of the {rounds} rounds it closed after the faults ended (moved nothing, or reverted)"
            ),
            Violation::Settlement { node, detail } => write!(f, "node {node}: {detail}"),
            Violation::Unfinished { node, round, phase } => {
                write!(f, "node {node} did not finish (round {round}, {phase})")
            }
            Violation::Fatal { node, error } => write!(f, "node {node} stopped: {error}"),
            Violation::Unreplayable { node, detail } => write!(f, "node {node}'s ledger does not replay: {detail}"),
        }
    }
}

pub fn check(world: &World) -> Vec<Violation> {
    let mut out = Vec::new();
    one_record_per_seq_and_round(world, &mut out);
    for n in world.nodes.iter().filter(|n| n.honest()) {
        if let Err(e) = crate::replay::replay_state(&**n.ledger(), &world.shape) {
            out.push(Violation::Unreplayable {
                node: n.index,
                detail: e.to_string(),
            });
        }
    }
    for n in &world.nodes {
        if let Err(e) = n.ledger().check_chains() {
            out.push(Violation::BrokenChain {
                node: n.index,
                detail: e.to_string(),
            });
        }
        if let Some(e) = &n.fatal {
            out.push(Violation::Fatal {
                node: n.index,
                error: e.clone(),
            });
        }
        if n.double_settles > 0 {
            out.push(Violation::Settlement {
                node: n.index,
                detail: format!("{} gossip messages settled twice", n.double_settles),
            });
        }
        if n.is_up() && n.unsettled() > 0 {
            out.push(Violation::Settlement {
                node: n.index,
                detail: format!("{} gossip messages never settled", n.unsettled()),
            });
        }
    }
    for n in world.nodes.iter().filter(|n| n.honest()) {
        if !n.finished && n.fatal.is_none() {
            out.push(Violation::Unfinished {
                node: n.index,
                round: n.closed.keys().next_back().copied().unwrap_or(0),
                phase: if n.is_up() { "up".into() } else { "down".into() },
            });
        }
    }
    agreement(world, &mut out);
    not_hijacked(world, &mut out);
    out
}

/// No honest node ever aggregates onto, ends on, or joins the attackers'
/// poisoned anchor.
fn not_hijacked(world: &World, out: &mut Vec<Violation>) {
    let mut poisoned = world.poisoned.clone();
    poisoned.extend(
        world
            .sybils
            .as_ref()
            .and_then(|s| s.inner.poisoned.as_ref().map(|p| p.key.0)),
    );
    if poisoned.is_empty() {
        return;
    }
    for n in world.nodes.iter().filter(|n| n.honest()) {
        let closed = n
            .closed
            .iter()
            .find(|(_, c)| poisoned.contains(&c.base) || poisoned.contains(&c.anchor))
            .map(|(r, _)| *r);
        let joined = meshtrain_ledger::Store::joins(&**n.ledger())
            .unwrap_or_default()
            .iter()
            .find(|j| poisoned.contains(&j.anchor))
            .map(|j| j.round);
        let ended = n.final_anchor.filter(|a| poisoned.contains(a)).map(|_| u64::MAX);
        if let Some(round) = closed.or(joined).or(ended) {
            out.push(Violation::Hijacked { node: n.index, round });
        }
    }
}

/// No honest author has two different records at one seq or one round in
/// any ledger.
fn one_record_per_seq_and_round(world: &World, out: &mut Vec<Violation>) {
    let honest: BTreeSet<AuthorId> = world.nodes.iter().filter(|n| n.honest()).map(|n| n.author).collect();
    let mut by_seq: HashMap<(AuthorId, Seq), RecordHash> = HashMap::new();
    let mut by_round: HashMap<(AuthorId, u64), RecordHash> = HashMap::new();
    for n in &world.nodes {
        for r in n.ledger().all_records() {
            let a = r.record.author;
            if !honest.contains(&a) {
                continue;
            }
            let h = r.hash();
            if by_seq.insert((a, r.record.seq), h).is_some_and(|o| o != h) {
                out.push(Violation::TwoRecords {
                    author: a.short(),
                    at: format!("seq {}", r.record.seq),
                });
            }
            if by_round.insert((a, r.record.round), h).is_some_and(|o| o != h) {
                out.push(Violation::TwoRecords {
                    author: a.short(),
                    at: format!("round {}", r.record.round),
                });
            }
        }
    }
}

/// Once the network has been quiet for two rounds, a majority of the
/// honest nodes aggregates every round onto one anchor, the others repair
/// onto it within a round, and all end on the same anchor.
/// The first round every honest node closed after the network was quiet
/// for [`QUIET_ROUNDS`] (faults over, and two of the longest rounds gone by
/// since): where agreement and progress are owed.
fn quiet_from(world: &World) -> u64 {
    let settled_at = world.quiet_at + QUIET_ROUNDS * (world.spec.rounds.max_wait_ms + world.cfg.train_ms);
    world
        .nodes
        .iter()
        .filter(|n| n.honest())
        .filter_map(|n| n.closed.iter().find(|(_, c)| c.at > settled_at).map(|(r, _)| *r))
        .max()
        .unwrap_or(u64::MAX)
}

/// Per honest node: the rounds it closed once the network was quiet, and
/// how many of them were lost. Agreeing on one anchor is no use if every
/// round is then thrown away: a round is lost when it moved nothing (given
/// up) or the node went back to its base after it (reverted; a repair onto
/// a sibling anchor moves on, and is agreement's).
pub fn progress(world: &World) -> Vec<(usize, u64, u64)> {
    let from = quiet_from(world);
    world
        .nodes
        .iter()
        .filter(|n| n.honest())
        .map(|n| {
            let after: Vec<(&u64, &Closed)> = n.closed.range(from..).collect();
            let lost = after
                .iter()
                .enumerate()
                .filter(|(i, (r, c))| {
                    let next = after.get(i + 1).filter(|(n, _)| **n == **r + 1);
                    c.anchor == c.base || next.is_some_and(|(_, n)| n.base == c.base)
                })
                .count();
            (n.index, lost as u64, after.len() as u64)
        })
        .collect()
}

fn agreement(world: &World, out: &mut Vec<Violation>) {
    let honest: Vec<_> = world.nodes.iter().filter(|n| n.honest()).collect();
    let from = quiet_from(world);
    let mut rounds: BTreeMap<u64, BTreeMap<usize, WeightsHash>> = BTreeMap::new();
    for n in &honest {
        for (r, c) in n.closed.range(from..) {
            rounds.entry(*r).or_default().insert(n.index, c.base);
        }
    }
    for (node, lost, after) in progress(world) {
        if after >= 4 && 2 * lost > after {
            out.push(Violation::Stalled {
                node,
                rounds: after as usize,
                lost: lost as usize,
            });
        }
    }
    // Each round after that: half the honest nodes or more aggregated it
    // onto one anchor, and any node that did not was back on the majority's
    // the round after (it notices within one round and repairs).
    let majority = |anchors: &BTreeMap<usize, WeightsHash>| -> Option<WeightsHash> {
        let mut count: BTreeMap<WeightsHash, usize> = BTreeMap::new();
        for h in anchors.values() {
            *count.entry(*h).or_default() += 1;
        }
        count
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .filter(|(_, n)| 2 * n >= anchors.len())
            .map(|(h, _)| h)
    };
    for (round, anchors) in &rounds {
        let split = || Violation::AnchorSplit {
            round: *round,
            anchors: anchors.iter().map(|(i, h)| (*i, h.short())).collect(),
        };
        let Some(top) = majority(anchors) else {
            out.push(split());
            break;
        };
        let next = rounds.get(&(round + 1));
        let next_top = next.and_then(majority);
        let lagging = anchors.iter().filter(|(_, h)| **h != top).map(|(i, _)| *i);
        let unrepaired = lagging
            .filter(|i| next.and_then(|n| n.get(i)).is_some_and(|h| Some(*h) != next_top))
            .count();
        if unrepaired > 0 {
            out.push(split());
            break;
        }
    }
    let finals: BTreeMap<usize, WeightsHash> = honest
        .iter()
        .filter(|n| n.finished)
        .filter_map(|n| n.final_anchor.map(|h| (n.index, h)))
        .collect();
    if finals.values().collect::<BTreeSet<_>>().len() > 1 {
        out.push(Violation::FinalSplit {
            anchors: finals.into_iter().map(|(i, h)| (i, h.short())).collect(),
        });
    }
}
