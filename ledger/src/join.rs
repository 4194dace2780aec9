//! Joins: the moments a node took over anchor weights it did not compute
//! itself (joining late, restarting, catching up, or repairing onto the
//! anchor the majority of voting power signed), with the signed votes that
//! justified it. A replay resumes from these.

use std::collections::BTreeSet;

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::wire::{decode_exact, encode};
use crate::{AuthorId, LedgerError, PayloadHash, RunId, SignedRecord, SignedVerdictBlock, WeightsHash};

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
            if v.starts() != Some(self.decided_at) || v.anchor() != (self.anchor, self.outer_state) {
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
