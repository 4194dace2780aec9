//! Joins: the moments a node adopted anchor weights from its peers (joining
//! late, restarting, or healing a partition), with the peers' signed
//! verdict blocks that attest them. A replay resumes from these.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::wire::{decode_exact, encode};
use crate::{LedgerError, PayloadHash, SignedVerdictBlock, WeightsHash};

#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct JoinRecord {
    /// The round the node continued from.
    pub round: u64,
    pub anchor: WeightsHash,
    pub outer_state: WeightsHash,
    /// Payloads (kept in the ledger) holding the anchor and the outer state,
    /// encoded as dense deltas.
    pub anchor_payload: PayloadHash,
    pub outer_payload: PayloadHash,
    /// Verdict blocks of the peers that handed the anchor over, each naming
    /// it as the product of round `round - 1`.
    pub attestations: Vec<SignedVerdictBlock>,
}

impl JoinRecord {
    /// Every attestation is validly signed and names this anchor and state.
    pub fn verify(&self) -> Result<(), LedgerError> {
        let bad = |detail: String| LedgerError::Malformed {
            what: "join record",
            detail,
        };
        if self.attestations.is_empty() {
            return Err(bad("no attestation".into()));
        }
        for a in &self.attestations {
            a.verify_signature()?;
            let b = &a.block;
            if b.new_anchor != self.anchor || b.outer_state != self.outer_state || b.round + 1 != self.round {
                return Err(bad(format!(
                    "the verdict block of {} attests another anchor or round",
                    b.owner
                )));
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
