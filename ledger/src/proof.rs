//! Equivocation proofs: two valid signatures by one author over records
//! that cannot both be in one honest chain, because they share a seq, or
//! their rounds do not increase with their seqs (two records for one round,
//! or a round going back). Anyone can check one without trusting its
//! sender.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::wire::{decode_exact, encode};
use crate::{AuthorId, LedgerError, Seq, SignedRecord};

/// Which rule two conflicting records break.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProofKind {
    /// Two records at one seq.
    SameSeq,
    /// A later record for the same or an earlier round.
    RoundReused,
}

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

    /// What the two records show.
    pub fn kind(&self) -> ProofKind {
        if self.first.record.seq == self.second.record.seq {
            ProofKind::SameSeq
        } else {
            ProofKind::RoundReused
        }
    }

    /// Holds only if both records are by one author, of one run, differ,
    /// conflict (one seq, or rounds not increasing with seqs), and both
    /// carry valid signatures.
    pub fn verify(&self) -> Result<(), LedgerError> {
        let (a, b) = (&self.first.record, &self.second.record);
        let bad = |detail: &str| LedgerError::BadProof {
            author: a.author,
            detail: detail.to_string(),
        };
        if a.author != b.author {
            return Err(bad("records are by different authors"));
        }
        let (early, late) = if a.seq <= b.seq { (a, b) } else { (b, a) };
        if early.seq != late.seq && early.round < late.round {
            return Err(bad("records at different seqs with increasing rounds do not conflict"));
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
    use crate::UpdateRecord;

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
        // The test records' round is their seq: a later seq for a later
        // round is an ordinary chain, no conflict.
        let other_seq = record(&k, 5, RecordHash([1; 32]));
        assert!(EquivocationProof::new(a.clone(), other_seq).verify().is_err());
        let other_author = record(&key(2), 4, RecordHash([2; 32]));
        assert!(EquivocationProof::new(a.clone(), other_author).verify().is_err());
        let mut forged = record(&k, 4, RecordHash([3; 32]));
        forged.signature.0[5] ^= 0x40;
        assert!(EquivocationProof::new(a, forged).verify().is_err());
    }

    #[test]
    fn two_records_for_one_round_are_a_proof() {
        let k = key(1);
        let a = record(&k, 4, RecordHash([1; 32]));
        let mut later: UpdateRecord = record(&k, 5, a.hash()).record;
        later.round = 4;
        let p = EquivocationProof::new(a.clone(), later.clone().sign(&k));
        p.verify().unwrap();
        assert_eq!(p.kind(), ProofKind::RoundReused);
        later.round = 3;
        EquivocationProof::new(a, later.sign(&k)).verify().unwrap();
    }
}
