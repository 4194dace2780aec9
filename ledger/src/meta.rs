//! What a ledger is about: its run, its owner and the genesis weights.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::wire::{decode_exact, encode};
use crate::{AuthorId, LedgerError, RecordHash, RunId, VerdictHash, WeightsHash};

/// The on-disk format this build writes. Opening a newer one is refused.
pub const FORMAT_VERSION: u32 = 3;

/// Stored once when a ledger is created; every record and verdict in it must
/// belong to this run.
#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct RunMeta {
    pub run_id: RunId,
    /// The node that keeps this ledger and signs its verdict chain.
    pub owner: AuthorId,
    pub genesis_weights: WeightsHash,
    /// The canonical RunSpec bytes, so an auditor can see what was agreed.
    pub run_spec: Vec<u8>,
}

impl RunMeta {
    /// The `prev` of every author's first record.
    pub fn genesis_link(&self) -> RecordHash {
        RecordHash::genesis(&self.run_id, &self.genesis_weights)
    }

    /// The `prev` of the owner's first verdict block.
    pub fn verdict_genesis(&self) -> VerdictHash {
        VerdictHash::genesis(&self.run_id, &self.owner)
    }

    /// The run id must be the hash of the stored spec.
    pub fn check(&self) -> Result<(), LedgerError> {
        let derived = RunId::of_spec(&self.run_spec);
        if derived != self.run_id {
            return Err(LedgerError::Corrupt {
                column: "meta",
                key: "run".into(),
                detail: format!("run id {} is not the hash of the stored spec ({derived})", self.run_id),
            });
        }
        Ok(())
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Self, LedgerError> {
        decode_exact(bytes, "run meta")
    }
}
