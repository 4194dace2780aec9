//! Equivocation proofs: two valid signatures by one author over different
//! records at the same seq. Anyone can check one without trusting its sender.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::wire::{decode_exact, encode};
use crate::{AuthorId, LedgerError, Seq, SignedRecord};

#[derive(Clone, Debug, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct EquivocationProof {
    pub first: SignedRecord,
    pub second: SignedRecord,
}

impl EquivocationProof {
    /// Orders the pair by hash so that every node builds the same proof.
    pub fn new(a: SignedRecord, b: SignedRecord) -> Self {
        if a.hash() <= b.hash() {
            Self { first: a, second: b }
        } else {
            Self { first: b, second: a }
        }
    }

    pub fn author(&self) -> AuthorId {
        self.first.record.author
    }

    pub fn seq(&self) -> Seq {
        self.first.record.seq
    }

    /// Holds only if both records are by one author, at one seq of one run,
    /// differ, and both carry valid signatures.
    pub fn verify(&self) -> Result<(), LedgerError> {
        let (a, b) = (&self.first.record, &self.second.record);
        let bad = |detail: &str| LedgerError::BadProof {
            author: a.author,
            detail: detail.to_string(),
        };
        if a.author != b.author {
            return Err(bad("records are by different authors"));
        }
        if a.seq != b.seq {
            return Err(bad("records are at different seqs"));
        }
        if a.run_id != b.run_id {
            return Err(bad("records are of different runs"));
        }
        if self.first.hash() == self.second.hash() {
            return Err(bad("records are identical"));
        }
        self.first
            .verify_signature()
            .map_err(|_| bad("first signature invalid"))?;
        self.second
            .verify_signature()
            .map_err(|_| bad("second signature invalid"))?;
        Ok(())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, LedgerError> {
        decode_exact(bytes, "equivocation proof")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::{key, record};
    use crate::RecordHash;

    #[test]
    fn valid_proof_verifies_and_order_is_canonical() {
        let k = key(1);
        let a = record(&k, 4, RecordHash([1; 32]));
        let b = record(&k, 4, RecordHash([2; 32]));
        let p = EquivocationProof::new(a.clone(), b.clone());
        p.verify().unwrap();
        assert_eq!(p, EquivocationProof::new(b, a));
        assert_eq!(EquivocationProof::from_bytes(&p.to_bytes()).unwrap(), p);
    }

    #[test]
    fn non_proofs_are_refused() {
        let k = key(1);
        let a = record(&k, 4, RecordHash([1; 32]));
        assert!(EquivocationProof::new(a.clone(), a.clone()).verify().is_err());
        let other_seq = record(&k, 5, RecordHash([1; 32]));
        assert!(EquivocationProof::new(a.clone(), other_seq).verify().is_err());
        let other_author = record(&key(2), 4, RecordHash([2; 32]));
        assert!(EquivocationProof::new(a.clone(), other_author).verify().is_err());
        let mut forged = record(&k, 4, RecordHash([3; 32]));
        forged.signature.0[5] ^= 0x40;
        assert!(EquivocationProof::new(a, forged).verify().is_err());
    }
}
