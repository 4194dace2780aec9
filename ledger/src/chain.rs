//! Per-author hash chains: where an incoming record sits, and what it proves.
//!
//! Pure functions: the store supplies the head and the hash held at a seq.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::{LedgerError, RecordHash, RunId, Seq, SignedRecord};

/// The newest record held for an author.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct Head {
    pub seq: Seq,
    pub hash: RecordHash,
    /// Its round: the next record must be for a later one.
    pub round: u64,
}

/// Where a correctly signed record of this run sits in its author's chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// It extends the head by exactly one.
    Next,
    /// The very record already held at its seq.
    Duplicate,
    /// It lies beyond the head: records from `missing_from` up to its seq - 1
    /// must be fetched first.
    Gap { missing_from: Seq },
}

/// Checks the cheap, context-free facts: the run and the signature.
pub fn check_signed(signed: &SignedRecord, run_id: &RunId) -> Result<(), LedgerError> {
    if signed.record.run_id != *run_id {
        return Err(LedgerError::WrongRun {
            author: signed.record.author,
            seq: signed.record.seq,
            expected: *run_id,
            got: signed.record.run_id,
        });
    }
    signed.verify_signature()
}

/// The seq and `prev` that the next record of a chain must carry.
pub fn expected_next(head: Option<Head>, genesis: RecordHash) -> (Seq, RecordHash) {
    match head {
        None => (Seq(0), genesis),
        Some(h) => (h.seq.next(), h.hash),
    }
}

/// Places `signed` (whose hash is `hash`) against `head`.
///
/// `held_at(seq)` returns the hash held at a seq at or below the head, so a
/// second, different record at a known seq is caught as equivocation.
pub fn locate(
    head: Option<Head>,
    genesis: RecordHash,
    signed: &SignedRecord,
    hash: RecordHash,
    held_at: impl FnOnce(Seq) -> Option<RecordHash>,
) -> Result<Link, LedgerError> {
    let rec = &signed.record;
    let (next_seq, expected_prev) = expected_next(head, genesis);
    if rec.seq == next_seq {
        if rec.prev != expected_prev {
            return Err(LedgerError::ChainBroken {
                author: rec.author,
                seq: rec.seq,
                expected_prev,
                got: rec.prev,
            });
        }
        check_round(head, rec)?;
        return Ok(Link::Next);
    }
    if rec.seq > next_seq {
        return Ok(Link::Gap { missing_from: next_seq });
    }
    match held_at(rec.seq) {
        Some(held) if held == hash => Ok(Link::Duplicate),
        Some(held) => Err(LedgerError::Equivocation {
            author: rec.author,
            seq: rec.seq,
            first: held,
            second: hash,
        }),
        None => Err(LedgerError::Corrupt {
            column: "records",
            key: format!("{}/{}", rec.author, rec.seq),
            detail: "head lies beyond a missing record".into(),
        }),
    }
}

/// Rounds strictly increase along a chain: an author contributes once per
/// round, and a second record for a round (or an earlier one) is an offence
/// like equivocation, provable by the two signed records.
pub fn check_round(head: Option<Head>, rec: &crate::UpdateRecord) -> Result<(), LedgerError> {
    match head {
        Some(h) if rec.round <= h.round => Err(LedgerError::RoundReused {
            author: rec.author,
            seq: rec.seq,
            round: rec.round,
            previous_round: h.round,
            previous: h.hash,
        }),
        _ => Ok(()),
    }
}

/// Where an incoming record goes, once its run and signature are checked.
#[derive(Debug)]
pub enum Placement {
    Next(Box<VerifiedRecord>),
    Duplicate,
    Gap { missing_from: Seq },
}

/// The whole receive check of a record against its author's chain: run,
/// signature, then link. Equivocation and broken links are errors.
pub fn place(
    signed: SignedRecord,
    run_id: &RunId,
    head: Option<Head>,
    genesis: RecordHash,
    held_at: impl FnOnce(Seq) -> Option<RecordHash>,
) -> Result<Placement, LedgerError> {
    check_signed(&signed, run_id)?;
    let hash = signed.hash();
    Ok(match locate(head, genesis, &signed, hash, held_at)? {
        Link::Next => Placement::Next(Box::new(VerifiedRecord { signed, hash })),
        Link::Duplicate => Placement::Duplicate,
        Link::Gap { missing_from } => Placement::Gap { missing_from },
    })
}

/// A record whose signature is valid and which extends its author's chain by
/// one. Only [`VerifiedRecord::extend`] and [`place`] make one.
#[derive(Clone, Debug)]
pub struct VerifiedRecord {
    signed: SignedRecord,
    hash: RecordHash,
}

impl VerifiedRecord {
    /// Checks run, signature and link; succeeds only for the next record.
    pub fn extend(
        signed: SignedRecord,
        run_id: &RunId,
        head: Option<Head>,
        genesis: RecordHash,
    ) -> Result<Self, LedgerError> {
        check_signed(&signed, run_id)?;
        let rec = &signed.record;
        let (next_seq, expected_prev) = expected_next(head, genesis);
        if rec.seq != next_seq {
            return Err(LedgerError::ChainGap {
                author: rec.author,
                expected: next_seq,
                got: rec.seq,
            });
        }
        if rec.prev != expected_prev {
            return Err(LedgerError::ChainBroken {
                author: rec.author,
                seq: rec.seq,
                expected_prev,
                got: rec.prev,
            });
        }
        check_round(head, rec)?;
        let hash = signed.hash();
        Ok(Self { signed, hash })
    }

    pub fn signed(&self) -> &SignedRecord {
        &self.signed
    }

    pub fn hash(&self) -> RecordHash {
        self.hash
    }

    pub fn head(&self) -> Head {
        Head {
            seq: self.signed.record.seq,
            hash: self.hash,
            round: self.signed.record.round,
        }
    }

    pub fn into_signed(self) -> SignedRecord {
        self.signed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::{key, record};

    const GEN: RecordHash = RecordHash([9; 32]);

    #[test]
    fn first_record_must_link_to_genesis() {
        let k = key(1);
        let good = record(&k, 0, GEN);
        assert_eq!(locate(None, GEN, &good, good.hash(), |_| None).unwrap(), Link::Next);
        let bad = record(&k, 0, RecordHash([0; 32]));
        assert!(matches!(
            locate(None, GEN, &bad, bad.hash(), |_| None),
            Err(LedgerError::ChainBroken { .. })
        ));
    }

    #[test]
    fn rounds_strictly_increase_along_a_chain() {
        let k = key(1);
        let r0 = record(&k, 0, GEN);
        let head = Some(Head {
            seq: Seq(0),
            hash: r0.hash(),
            round: 4,
        });
        assert!(check_round(None, &r0.record).is_ok());
        let mut next = record(&k, 1, r0.hash()).record;
        next.round = 5;
        assert!(check_round(head, &next).is_ok());
        for reused in [4, 3, 0] {
            next.round = reused;
            match check_round(head, &next) {
                Err(LedgerError::RoundReused {
                    round,
                    previous_round: 4,
                    previous,
                    ..
                }) => {
                    assert_eq!((round, previous), (reused, r0.hash()));
                }
                other => panic!("round {reused} after round 4 was not refused: {other:?}"),
            }
        }
    }

    #[test]
    fn next_gap_duplicate_equivocation() {
        let k = key(1);
        let r0 = record(&k, 0, GEN);
        let r1 = record(&k, 1, r0.hash());
        let head = Some(Head {
            seq: Seq(0),
            hash: r0.hash(),
            round: 0,
        });
        assert_eq!(locate(head, GEN, &r1, r1.hash(), |_| None).unwrap(), Link::Next);

        let r5 = record(&k, 5, RecordHash([3; 32]));
        assert_eq!(
            locate(head, GEN, &r5, r5.hash(), |_| None).unwrap(),
            Link::Gap { missing_from: Seq(1) }
        );

        let held = r0.hash();
        assert_eq!(
            locate(head, GEN, &r0, r0.hash(), |_| Some(held)).unwrap(),
            Link::Duplicate
        );

        let mut other = r0.record.clone();
        other.n_samples = 1;
        let other = other.sign(&k);
        assert!(matches!(
            locate(head, GEN, &other, other.hash(), |_| Some(held)),
            Err(LedgerError::Equivocation { .. })
        ));
    }

    #[test]
    fn extend_checks_run_and_signature() {
        let k = key(1);
        let r0 = record(&k, 0, GEN);
        let run = r0.record.run_id;
        VerifiedRecord::extend(r0.clone(), &run, None, GEN).unwrap();
        assert!(matches!(
            VerifiedRecord::extend(r0.clone(), &RunId([1; 32]), None, GEN),
            Err(LedgerError::WrongRun { .. })
        ));
        let mut forged = r0;
        forged.signature.0[0] ^= 1;
        assert!(matches!(
            VerifiedRecord::extend(forged, &run, None, GEN),
            Err(LedgerError::BadSignature { .. })
        ));
    }
}
