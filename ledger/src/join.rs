//! Joins: the moments a node took over anchor weights it did not compute
//! itself (joining late, restarting, catching up, or repairing onto the
//! anchor the majority of voting power signed), with the signed votes that
//! justified it. A replay resumes from these.

use std::collections::BTreeSet;

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::wire::{decode_exact, encode};
use crate::{AuthorId, LedgerError, PayloadHash, RecordTag, RunId, SignedRecord, SignedVerdictBlock, WeightsHash};

/// Why a node took an anchor over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JoinKind {
    /// At start: a late join or a restart.
    Start,
    /// Its anchor for a round differed from the one the majority signed.
    Repair,
    /// The mesh had left its round behind.
    Behind,
    /// No anchor of its round had half the voting power (the mesh had
    /// split into many): it went back to the last decided one.
    Revert,
}

/// A signed vote for an anchor: the author's record of the round the
/// anchor starts (it names the anchor it trained from), or a verdict block
/// naming it as the result of the round before.
#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub enum Vote {
    Record(SignedRecord),
    Block(SignedVerdictBlock),
}

impl Vote {
    pub fn voter(&self) -> AuthorId {
        match self {
            Vote::Record(r) => r.record.author,
            Vote::Block(b) => b.block.owner,
        }
    }

    /// The round the voted anchor starts (the round after the one it closed).
    pub fn starts(&self) -> Option<u64> {
        match self {
            Vote::Record(r) => Some(r.record.round),
            Vote::Block(b) => b.block.round.checked_add(1),
        }
    }

    /// The anchor its voter built the round before on (aggregated it
    /// onto), and that round: a record's `made_from`, a verdict block's
    /// base. None when the vote names none (an anchor taken over, a round
    /// given up).
    pub fn built_on(&self) -> Option<(u64, (WeightsHash, WeightsHash))> {
        match self {
            Vote::Record(r) if r.record.made_from != WeightsHash([0; 32]) => Some((
                r.record.round.checked_sub(1)?,
                (r.record.made_from, r.record.made_outer),
            )),
            Vote::Record(_) => None,
            Vote::Block(b) if crate::verdict::round_given_up(&b.block.entries) => None,
            Vote::Block(b) => Some((b.block.round, (b.block.base_anchor, b.block.base_outer))),
        }
    }

    /// The updates its voter merged in the round it built (tags): a
    /// record's `merged`, a verdict block's merged and clipped entries.
    pub fn merged(&self) -> BTreeSet<RecordTag> {
        match self {
            Vote::Record(r) => r.record.merged.iter().copied().collect(),
            Vote::Block(b) => b
                .block
                .entries
                .iter()
                .filter(|e| {
                    matches!(
                        e.verdict,
                        crate::Verdict::Merged { .. } | crate::Verdict::Clipped { .. }
                    )
                })
                .map(|e| e.record_hash.tag())
                .collect(),
        }
    }

    /// Of those, the ones the voter's close waited for (see
    /// `UpdateRecord::waited`); none for a verdict block.
    pub fn waited(&self) -> BTreeSet<RecordTag> {
        match self {
            Vote::Record(r) => r.record.waited_for().collect(),
            Vote::Block(_) => BTreeSet::new(),
        }
    }

    /// The anchor weights and outer state voted for.
    pub fn anchor(&self) -> (WeightsHash, WeightsHash) {
        match self {
            Vote::Record(r) => (r.record.base_hash, r.record.base_outer),
            Vote::Block(b) => (b.block.new_anchor, b.block.outer_state),
        }
    }

    /// Signed by its voter, for this run.
    pub fn verify(&self, run_id: &RunId) -> Result<(), LedgerError> {
        let run = match self {
            Vote::Record(r) => {
                r.verify_signature()?;
                r.record.run_id
            }
            Vote::Block(b) => {
                b.verify_signature()?;
                b.block.run_id
            }
        };
        if run != *run_id {
            return Err(LedgerError::Malformed {
                what: "vote",
                detail: format!("a vote of run {run}"),
            });
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct JoinRecord {
    /// The round the node continued from (the anchor starts it).
    pub round: u64,
    pub anchor: WeightsHash,
    pub outer_state: WeightsHash,
    /// Payloads (kept in the ledger) holding the anchor and the outer state,
    /// encoded as dense deltas.
    pub anchor_payload: PayloadHash,
    pub outer_payload: PayloadHash,
    pub kind: JoinKind,
    /// The round whose anchor the votes decided (the anchor that started
    /// it): `round` itself, or an earlier one for a revert.
    pub decided_at: u64,
    /// The votes, one per voter, that decided it (none for genesis, which
    /// every node derives from the run's seed). Whether they hold half the
    /// run's voting power is checked by whoever knows the run's admission
    /// (the node's replay).
    pub votes: Vec<Vote>,
}

impl JoinRecord {
    /// Every vote is validly signed, of this run, by a distinct voter, and
    /// names this anchor and outer state for this round.
    pub fn verify(&self, run_id: &RunId) -> Result<(), LedgerError> {
        let bad = |detail: String| LedgerError::Malformed {
            what: "join record",
            detail,
        };
        if self.decided_at > self.round {
            return Err(bad(format!(
                "decided at round {}, after the round {} it joins",
                self.decided_at, self.round
            )));
        }
        if self.votes.is_empty() && self.decided_at != 0 {
            return Err(bad("no vote".into()));
        }
        let mut voters = BTreeSet::new();
        for v in &self.votes {
            v.verify(run_id)?;
            if !voters.insert(v.voter()) {
                return Err(bad(format!("{} voted twice", v.voter())));
            }
            // For it, or (a round rebuilt from the votes has none of its
            // own) built the round it starts on it.
            let key = (self.anchor, self.outer_state);
            let votes_for = v.starts() == Some(self.decided_at) && v.anchor() == key;
            if !votes_for && v.built_on() != Some((self.decided_at, key)) {
                return Err(bad(format!("the vote of {} names another anchor or round", v.voter())));
            }
        }
        Ok(())
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Self, LedgerError> {
        decode_exact(bytes, "join record")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::{key, record};
    use crate::RecordHash;

    fn join(anchor: WeightsHash, decided_at: u64, votes: Vec<Vote>) -> JoinRecord {
        JoinRecord {
            round: decided_at,
            anchor,
            outer_state: WeightsHash([0; 32]),
            anchor_payload: PayloadHash([0; 32]),
            outer_payload: PayloadHash([0; 32]),
            kind: JoinKind::Revert,
            decided_at,
            votes,
        }
    }

    /// A record of round 5 that built round 4 on `on` (and votes, as every
    /// record does, for the anchor it trained from: `[1; 32]`).
    fn built_on(n: u8, on: WeightsHash) -> Vote {
        let k = key(n);
        let mut r = record(&k, 5, RecordHash([0; 32])).record;
        r.made_from = on;
        Vote::Record(r.sign(&k))
    }

    #[test]
    fn a_join_takes_votes_for_its_anchor_or_records_built_on_it() {
        let run = RunId([7; 32]);
        let rebuilt = WeightsHash([4; 32]);
        // Voted for at round 5 (every test record trains from [1; 32]).
        let voted = join(
            WeightsHash([1; 32]),
            5,
            vec![built_on(1, rebuilt), built_on(2, rebuilt)],
        );
        assert!(voted.verify(&run).is_ok());
        // Nobody voted for a rebuilt anchor of round 4, but round 5 was
        // built on it.
        let on = join(rebuilt, 4, vec![built_on(1, rebuilt), built_on(2, rebuilt)]);
        assert!(on.verify(&run).is_ok());
        // Built on another anchor, or on this one for another round: refused.
        let other = join(
            rebuilt,
            4,
            vec![built_on(1, rebuilt), built_on(2, WeightsHash([5; 32]))],
        );
        let err = other.verify(&run).expect_err("a record built on another anchor");
        assert!(err.to_string().contains("names another anchor or round"), "{err}");
        let late = join(rebuilt, 3, vec![built_on(1, rebuilt)]);
        assert!(late.verify(&run).is_err(), "round 5's records built round 4, not 3");
        // A record that took its anchor over names none.
        let none = join(WeightsHash([0; 32]), 4, vec![built_on(3, WeightsHash([0; 32]))]);
        assert!(none.verify(&run).is_err());
    }
}
