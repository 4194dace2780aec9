//! A node's own signed verdict chain: what it did with every update it saw.

use std::fmt;

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::key::verify_one;
use crate::wire::{decode_exact, encode};
use crate::{
    id::hash_in, AuthorId, AuthorKey, LedgerError, RecordHash, RunId, Seq, SignatureBytes, VerdictHash, WeightsHash,
};

pub const VERDICT_VERSION: u16 = 2;
const VERDICT_SIGNING_CONTEXT: &[u8] = b"meshtrain/verdict-block/v1";

/// Why an update was not merged. The `code` is the stable name used in
/// metrics and summaries.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize)]
#[serde(tag = "reason", content = "detail", rename_all = "kebab-case")]
pub enum RejectReason {
    /// The record's bytes do not decode.
    Malformed,
    BadSignature,
    WrongRun,
    ChainBroken,
    Equivocation,
    PayloadHashMismatch,
    PayloadMalformed,
    WrongShape,
    NonFinite,
    /// The robust aggregator set it aside; the detail says by which rule.
    Outlier(String),
    /// Its author is banned (bad reputation or proven equivocation).
    Banned,
    /// It re-sends a payload already contributed earlier (replay attack).
    Replay,
    /// Its delta is all zeros: it claims work it did not do.
    FreeRider,
    /// It arrived after its round left the staleness window.
    Stale,
    /// No peer could supply its payload before the round closed.
    PayloadUnavailable,
    /// A second record for a round its author already contributed to (or
    /// an earlier one).
    RoundReused,
    /// Its author is not admitted to the run (not on the roster).
    NotAMember,
    /// Trained from another anchor than the one its round closed on (an
    /// author that was behind or on a sibling anchor; it repairs, and is
    /// not blamed).
    OffBase,
    /// Its round was given up: no anchor of it had half the voting power,
    /// and the node went back to the last decided one (merging nothing, so
    /// that every node going back lands on the same anchor).
    RoundAbandoned,
    /// The loss-scoring stage set it aside: applied alone to the anchor, it
    /// raised the loss on the held-out scoring batch past the round's
    /// robust limit; the detail gives both.
    LossScore(String),
}

impl RejectReason {
    pub fn code(&self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::BadSignature => "bad-signature",
            RejectReason::WrongRun => "wrong-run",
            RejectReason::ChainBroken => "chain-broken",
            RejectReason::Equivocation => "equivocation",
            RejectReason::PayloadHashMismatch => "payload-hash-mismatch",
            RejectReason::PayloadMalformed => "payload-malformed",
            RejectReason::WrongShape => "wrong-shape",
            RejectReason::NonFinite => "non-finite",
            RejectReason::Outlier(_) => "outlier",
            RejectReason::Banned => "banned",
            RejectReason::Replay => "replay",
            RejectReason::FreeRider => "free-rider",
            RejectReason::Stale => "stale",
            RejectReason::PayloadUnavailable => "payload-unavailable",
            RejectReason::RoundReused => "round-reused",
            RejectReason::NotAMember => "not-a-member",
            RejectReason::OffBase => "off-base",
            RejectReason::RoundAbandoned => "round-abandoned",
            RejectReason::LossScore(_) => "loss-score",
        }
    }

    /// Whether the fault shows in the message alone, so that any peer who
    /// forwarded it failed to check it. Faults that depend on what a node
    /// already holds (an equivocation, a conflicting chain, a replayed
    /// payload) do not: an honest relay may have seen the other half first.
    pub fn blames_the_forwarder(&self) -> bool {
        matches!(
            self,
            RejectReason::Malformed
                | RejectReason::BadSignature
                | RejectReason::WrongRun
                | RejectReason::PayloadHashMismatch
                | RejectReason::PayloadMalformed
                | RejectReason::WrongShape
                | RejectReason::NonFinite
                | RejectReason::FreeRider
                | RejectReason::NotAMember
        )
    }

    /// Offences against the protocol itself (as opposed to a contribution the
    /// aggregator judged unhelpful): these cost the author reputation at once.
    pub fn is_protocol_offence(&self) -> bool {
        !matches!(
            self,
            RejectReason::Outlier(_)
                | RejectReason::LossScore(_)
                | RejectReason::Stale
                | RejectReason::PayloadUnavailable
                | RejectReason::Banned
                | RejectReason::NotAMember
                | RejectReason::OffBase
                | RejectReason::RoundAbandoned
        )
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::Outlier(detail) => write!(f, "outlier ({detail})"),
            RejectReason::LossScore(detail) => write!(f, "loss-score ({detail})"),
            other => f.write_str(other.code()),
        }
    }
}

/// What the aggregator did with one update.
#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Verdict {
    /// Merged with this weight in the aggregate.
    Merged {
        weight: f32,
    },
    /// Scaled by `factor` (< 1) before merging with `weight`.
    Clipped {
        factor: f32,
        weight: f32,
    },
    Rejected {
        reason: RejectReason,
    },
    /// An update by a key without a vote yet (open runs): judged by the
    /// aggregator alongside the round's voters, but weighing nothing. No
    /// node waits for such an update, so merging it would make honest
    /// anchors depend on when it arrived. `factor` is what the aggregator
    /// would have scaled it by among the voters (1 merged, below 1 clipped,
    /// 0 rejected, or a near-copy of another update of the round); passing
    /// at 1 is what earns the key its vote.
    Probation {
        factor: f32,
    },
}

impl Verdict {
    pub fn is_rejected(&self) -> bool {
        matches!(self, Verdict::Rejected { .. })
    }
}

/// One line of a verdict block.
#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct VerdictEntry {
    pub author: AuthorId,
    pub seq: Seq,
    pub record_hash: RecordHash,
    /// The round the update was made for (it may be older than the block's).
    pub round: u64,
    /// The prior weight the aggregator was given for it (the staleness
    /// discount times the admission share; 0 when refused before
    /// aggregation), so that a replay needs nothing but the ledger.
    pub prior: f32,
    pub verdict: Verdict,
}

/// The verdicts of one round, and the anchor weights they produced.
#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct VerdictBlock {
    pub version: u16,
    pub run_id: RunId,
    pub owner: AuthorId,
    /// Position in the owner's verdict chain, from 0.
    pub seq: u64,
    pub prev: VerdictHash,
    pub round: u64,
    /// Anchor weights before this round's aggregate was applied.
    pub base_anchor: WeightsHash,
    /// The outer optimiser's state that came with them: with `base_anchor`,
    /// the anchor the round was built on, as records name it
    /// (`UpdateRecord::made_from`).
    pub base_outer: WeightsHash,
    /// Anchor weights after it.
    pub new_anchor: WeightsHash,
    /// The outer optimiser's state (momentum) after it, so that a node
    /// joining late can check what it is handed.
    pub outer_state: WeightsHash,
    pub entries: Vec<VerdictEntry>,
}

/// Whether these verdicts give their round up (the node went back to the
/// last decided anchor and merged nothing): such a round built nothing.
pub fn round_given_up(entries: &[VerdictEntry]) -> bool {
    entries
        .iter()
        .any(|e| matches!(&e.verdict, Verdict::Rejected { reason } if *reason == RejectReason::RoundAbandoned))
}

impl VerdictBlock {
    pub fn body_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn hash(&self) -> VerdictHash {
        VerdictHash(hash_in("meshtrain verdict-block v1", &[&self.body_bytes()]))
    }

    pub fn sign(self, key: &AuthorKey) -> SignedVerdictBlock {
        let signature = key.sign(&signing_message(&self.body_bytes()));
        SignedVerdictBlock { block: self, signature }
    }
}

fn signing_message(body: &[u8]) -> Vec<u8> {
    let mut msg = VERDICT_SIGNING_CONTEXT.to_vec();
    msg.extend_from_slice(body);
    msg
}

/// A verdict block signed by the node that judged.
#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct SignedVerdictBlock {
    pub block: VerdictBlock,
    pub signature: SignatureBytes,
}

impl SignedVerdictBlock {
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, LedgerError> {
        let signed: SignedVerdictBlock = decode_exact(bytes, "verdict block")?;
        if signed.block.version != VERDICT_VERSION {
            return Err(LedgerError::Malformed {
                what: "verdict block",
                detail: format!("version {} (this build knows {VERDICT_VERSION})", signed.block.version),
            });
        }
        Ok(signed)
    }

    pub fn message(&self) -> Vec<u8> {
        signing_message(&self.block.body_bytes())
    }

    pub fn verify_signature(&self) -> Result<(), LedgerError> {
        if verify_one(&self.block.owner, &self.message(), &self.signature) {
            Ok(())
        } else {
            Err(LedgerError::BadSignature {
                what: "verdict block",
                author: self.block.owner,
                seq: Seq(self.block.seq),
            })
        }
    }
}

/// The newest block of a verdict chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct VerdictHead {
    pub seq: u64,
    pub hash: VerdictHash,
    pub anchor: WeightsHash,
    pub round: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::key;

    fn block(k: &AuthorKey) -> VerdictBlock {
        VerdictBlock {
            version: VERDICT_VERSION,
            run_id: RunId([7; 32]),
            owner: k.author(),
            seq: 0,
            prev: VerdictHash([0; 32]),
            round: 0,
            base_anchor: WeightsHash([1; 32]),
            base_outer: WeightsHash([0; 32]),
            new_anchor: WeightsHash([2; 32]),
            outer_state: WeightsHash([0; 32]),
            entries: vec![VerdictEntry {
                author: key(3).author(),
                seq: Seq(0),
                record_hash: RecordHash([4; 32]),
                round: 0,
                prior: 0.0,
                verdict: Verdict::Rejected {
                    reason: RejectReason::Outlier("distance 9.1 > 3.0".into()),
                },
            }],
        }
    }

    #[test]
    fn signed_block_round_trips_and_verifies() {
        let k = key(1);
        let signed = block(&k).sign(&k);
        let back = SignedVerdictBlock::from_bytes(&signed.to_bytes()).unwrap();
        assert_eq!(back, signed);
        back.verify_signature().unwrap();
    }

    #[test]
    fn edited_verdict_breaks_signature() {
        let k = key(1);
        let mut signed = block(&k).sign(&k);
        signed.block.entries[0].verdict = Verdict::Merged { weight: 1.0 };
        assert!(signed.verify_signature().is_err());
    }

    #[test]
    fn reason_codes_are_kebab_case() {
        assert_eq!(RejectReason::NonFinite.code(), "non-finite");
        assert!(RejectReason::Equivocation.is_protocol_offence());
        assert!(!RejectReason::Outlier(String::new()).is_protocol_offence());
        assert!(RejectReason::BadSignature.blames_the_forwarder());
        assert!(!RejectReason::Equivocation.blames_the_forwarder());
        assert!(!RejectReason::Replay.blames_the_forwarder());
    }
}
