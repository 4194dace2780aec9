//! Members that habitually make rounds wait, judged alike by every node.
//!
//! A round closes once every expected update is in, or a quorum is and a
//! short grace for the stragglers has passed. A member that publishes at
//! the edge of that grace every round (`late`) makes every round wait the
//! whole of it, and splits the mesh whenever it lands between the honest
//! nodes' closes. Each node notes, per round, which members came late:
//! voters with two thirds of the power that built the round on its decided
//! base waited for their updates or closed without them
//! ([`super::agreement::Votes::came_late`], from signed votes). A member
//! late in three quarters of its last [`LATE_WINDOW`] judged rounds (and
//! in [`LATE_ROUNDS`] at least) is waited for no longer, and its update,
//! if it came after a quorum of the others, is merged at the next close
//! (decayed) at every node alike, its own author's included. Judged by
//! each node's own arrival times instead, honest stragglers were judged
//! apart and the mesh split (docs/figures.md, issue 17).

use std::collections::{BTreeMap, BTreeSet};

use meshtrain_ledger::{AuthorId, SignedRecord, Vote};

use super::agreement::Votes;
use super::power::Power;

/// Rounds back, of those judged with an update of the member's.
pub const LATE_WINDOW: usize = 8;
/// A member is late once it came late to at least this many of them, and
/// to three quarters of those judged. In a calm mesh the last third of the
/// members come after the quorum each round, by chance, and about half of
/// those in the later half of the grace (what counts as waited for): a
/// given member then meets the rule about once in 300 windows at worst
/// (five judged rounds, four late) and once in 2,000 with the window full;
/// a member publishing at the edge of the grace is late every round, and
/// judged so after four.
pub const LATE_ROUNDS: usize = 4;
/// Rounds of judgements kept.
const KEPT: usize = 4 * LATE_WINDOW;

/// Per judged round, whether each member with an update came late to it.
#[derive(Clone, Debug, Default)]
pub struct Lateness {
    rounds: BTreeMap<u64, BTreeMap<AuthorId, bool>>,
}

impl Lateness {
    /// The judgements a restarted node makes again from the records its
    /// ledger holds (each a vote), for the rounds before `before`: without
    /// them it waited, for its first rounds back, for members the others
    /// no longer wait for, merged their updates where the others did not,
    /// and repaired.
    pub fn from_records(records: Vec<SignedRecord>, power: &Power, before: u64) -> Self {
        let first = records.iter().map(|r| r.record.round).min();
        let mut votes = Votes::default();
        for r in records {
            votes.add(Vote::Record(r));
        }
        let mut lateness = Self::default();
        for d in first.unwrap_or(before)..before {
            if let Some(judged) = votes.came_late(d, power) {
                lateness.note(d, &judged);
            }
        }
        lateness
    }

    /// Notes members judged in round `d` (the first judgement of a member
    /// for a round stands; members judged later are added); how many were
    /// new.
    pub fn note(&mut self, d: u64, came_late: &BTreeMap<AuthorId, bool>) -> usize {
        let round = self.rounds.entry(d).or_default();
        let before = round.len();
        for (a, late) in came_late {
            round.entry(*a).or_insert(*late);
        }
        let added = round.len() - before;
        while self.rounds.len() > KEPT {
            self.rounds.pop_first();
        }
        added
    }

    /// Members late in at least [`LATE_ROUNDS`] of their last
    /// [`LATE_WINDOW`] rounds judged up to round `upto`, and in three
    /// quarters of them.
    pub fn late(&self, upto: u64) -> BTreeSet<AuthorId> {
        let mut seen: BTreeMap<AuthorId, (usize, usize)> = BTreeMap::new();
        for judged in self.rounds.range(..=upto).map(|(_, j)| j).rev() {
            for (author, late) in judged {
                let (n, l) = seen.entry(*author).or_default();
                if *n < LATE_WINDOW {
                    *n += 1;
                    *l += usize::from(*late);
                }
            }
        }
        seen.into_iter()
            .filter(|(_, (n, l))| *l >= LATE_ROUNDS && 4 * *l >= 3 * *n)
            .map(|(a, _)| a)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(n: u8) -> AuthorId {
        AuthorId([n; 32])
    }

    #[test]
    fn late_in_three_quarters_of_the_last_eight_rounds_it_had_an_update_for() {
        let mut l = Lateness::default();
        // Member 1 late every round; member 2 in three of four; member 3
        // late in the rounds it had an update for long ago, then in time
        // in the last eight; member 4 late in every other round.
        for d in 0..20u64 {
            let mut j = BTreeMap::new();
            j.insert(a(1), true);
            j.insert(a(2), d % 4 != 0);
            if !(6..12).contains(&d) {
                j.insert(a(3), d < 6);
            }
            j.insert(a(4), d % 2 == 0);
            l.note(d, &j);
            if d == 2 {
                assert!(l.late(u64::MAX).is_empty(), "three rounds are not four");
            }
            if d == 3 {
                assert_eq!(l.late(u64::MAX), [a(1), a(3)].into(), "four of four");
            }
        }
        assert_eq!(l.late(u64::MAX), [a(1), a(2)].into());
        // Up to round 3 only: member 1 late in four of four, member 3 too.
        assert_eq!(l.late(3), [a(1), a(3)].into());
        for d in 20..30u64 {
            l.note(d, &[(a(1), d % 4 != 0), (a(2), false)].into());
        }
        // Member 1 now late in six of eight: still late; member 2 in none.
        assert_eq!(l.late(u64::MAX), [a(1)].into());
        l.note(30, &[(a(1), false)].into());
        // Five of eight is under three quarters: waited for again.
        assert!(l.late(u64::MAX).is_empty());
    }

    /// A restarted node judges again from its ledger's records: five
    /// members, each round's records built on the round before's anchor,
    /// every one waiting for member 5's update.
    #[test]
    fn a_restart_judges_again_from_the_records_it_holds() {
        use crate::core::power::{Power, Rule};
        use meshtrain_ledger::{
            AuthorKey, PayloadHash, RecordHash, RecordTag, RunId, Seq, UpdateRecord, WeightsHash, RECORD_VERSION,
        };
        let keys: Vec<AuthorKey> = (1..=5u8).map(|i| AuthorKey::from_secret([i; 32])).collect();
        let power = Power::new(Rule::Permissioned(keys.iter().map(|k| k.author()).collect()));
        let mut records = Vec::new();
        let mut last: Vec<RecordTag> = Vec::new();
        for round in 0..10u64 {
            let mut tags = Vec::new();
            for (i, k) in keys.iter().enumerate() {
                let mut merged = last.clone();
                merged.sort();
                let waited: std::collections::BTreeSet<RecordTag> = last.get(4).copied().into_iter().collect();
                let r = UpdateRecord {
                    version: RECORD_VERSION,
                    run_id: RunId([1; 32]),
                    author: k.author(),
                    seq: Seq(round),
                    prev: RecordHash([0; 32]),
                    round,
                    base_hash: WeightsHash([round as u8; 32]),
                    base_outer: WeightsHash([0; 32]),
                    made_from: WeightsHash([if round == 0 { 0 } else { round as u8 - 1 }; 32]),
                    made_outer: WeightsHash([0; 32]),
                    waited: UpdateRecord::waited_bits(&merged, &waited),
                    merged,
                    payload_hash: PayloadHash([i as u8; 32]),
                    payload_len: 1,
                    n_samples: 1,
                    train_loss: 0.0,
                }
                .sign(k);
                tags.push(r.hash().tag());
                records.push(r);
            }
            last = tags;
        }
        let l = Lateness::from_records(records.clone(), &power, 9);
        assert_eq!(l.late(u64::MAX), [keys[4].author()].into());
        // Rounds up to 3 only: three judged (round 0's builders name the
        // all-zero hash, which means none), not four.
        assert!(Lateness::from_records(records, &power, 4).late(u64::MAX).is_empty());
    }

    #[test]
    fn the_first_judgement_of_a_member_stands_and_old_rounds_go() {
        let mut l = Lateness::default();
        assert_eq!(l.note(3, &[(a(1), true)].into()), 1);
        assert_eq!(l.note(3, &[(a(1), false), (a(2), false)].into()), 1);
        assert!(l.rounds[&3][&a(1)]);
        assert!(!l.rounds[&3][&a(2)]);
        for d in 4..100 {
            l.note(d, &BTreeMap::new());
        }
        assert_eq!(l.rounds.len(), KEPT);
        assert!(!l.rounds.contains_key(&3));
    }
}
