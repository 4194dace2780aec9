//! A ledger held in memory, for the deterministic simulator: the same
//! [`Store`] contract and the same write checks as the RocksDB ledger, with
//! no files. A simulated crash keeps it (it stands for what the disk holds)
//! and throws the node's volatile state away.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::chain::Head;
use crate::ops::{check_append, check_payload, check_verdict, Batch, Op, Store};
use crate::verdict::VerdictHead;
use crate::{
    AuthorId, EquivocationProof, JoinRecord, LedgerError, PayloadHash, Result, Retention, RunMeta, Seq, SignedRecord,
    SignedVerdictBlock,
};

#[derive(Clone, Default)]
struct Contents {
    records: BTreeMap<(AuthorId, Seq), SignedRecord>,
    heads: BTreeMap<AuthorId, Head>,
    payloads: HashMap<PayloadHash, Vec<u8>>,
    /// (round, hash) -> length, as the RocksDB payload index.
    payload_index: BTreeMap<(u64, PayloadHash), u64>,
    verdicts: BTreeMap<u64, SignedVerdictBlock>,
    verdict_head: Option<VerdictHead>,
    /// By round, then anchor (see `store::Event::join`).
    joins: BTreeMap<(u64, crate::WeightsHash), JoinRecord>,
    proofs: BTreeMap<(AuthorId, Seq), EquivocationProof>,
}

/// An in-memory ledger for one node of a simulation.
pub struct MemLedger {
    meta: RunMeta,
    contents: Mutex<Contents>,
}

impl MemLedger {
    pub fn new(meta: RunMeta) -> Result<Self> {
        meta.check()?;
        Ok(Self {
            meta,
            contents: Mutex::new(Contents::default()),
        })
    }

    fn contents(&self) -> MutexGuard<'_, Contents> {
        self.contents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every record held, by author then seq (for the simulator's checks).
    pub fn all_records(&self) -> Vec<SignedRecord> {
        self.contents().records.values().cloned().collect()
    }

    /// The owner's verdict chain, oldest first.
    pub fn verdict_chain(&self) -> Vec<SignedVerdictBlock> {
        self.contents().verdicts.values().cloned().collect()
    }

    pub fn proofs(&self) -> Vec<EquivocationProof> {
        self.contents().proofs.values().cloned().collect()
    }

    /// Checks every chain held: contiguous from seq 0, each record linked to
    /// the one before with a later round, validly signed, of this run, heads
    /// matching.
    pub fn check_chains(&self) -> Result<u64> {
        let c = self.contents();
        let mut checked = 0;
        let mut current: Option<(AuthorId, Head)> = None;
        for ((author, seq), signed) in &c.records {
            let head = match current {
                Some((a, h)) if a == *author => Some(h),
                _ => None,
            };
            if signed.record.author != *author || signed.record.seq != *seq {
                return Err(LedgerError::Corrupt {
                    column: "records",
                    key: format!("{author}/{seq}"),
                    detail: "stored under another author or seq".into(),
                });
            }
            check_append(&self.meta, head, &signed.record)?;
            signed.verify_signature()?;
            let h = Head {
                seq: *seq,
                hash: signed.hash(),
                round: signed.record.round,
            };
            current = Some((*author, h));
            checked += 1;
            if c.heads.get(author).is_some_and(|held| held.seq == *seq && *held != h) {
                return Err(LedgerError::Corrupt {
                    column: "heads",
                    key: author.to_string(),
                    detail: "head does not name the last record".into(),
                });
            }
        }
        Ok(checked)
    }
}

impl Store for MemLedger {
    fn meta(&self) -> &RunMeta {
        &self.meta
    }

    fn head(&self, author: &AuthorId) -> Option<Head> {
        self.contents().heads.get(author).copied()
    }

    fn heads(&self) -> Vec<(AuthorId, Head)> {
        self.contents().heads.iter().map(|(a, h)| (*a, *h)).collect()
    }

    fn record(&self, author: &AuthorId, seq: Seq) -> Result<Option<SignedRecord>> {
        Ok(self.contents().records.get(&(*author, seq)).cloned())
    }

    fn records_from(&self, author: &AuthorId, from: Seq, limit: usize) -> Result<Vec<SignedRecord>> {
        Ok(self
            .contents()
            .records
            .range((*author, from)..=(*author, Seq(u64::MAX)))
            .take(limit)
            .map(|(_, r)| r.clone())
            .collect())
    }

    fn has_payload(&self, hash: &PayloadHash) -> Result<bool> {
        Ok(self.contents().payloads.contains_key(hash))
    }

    fn payload(&self, hash: &PayloadHash) -> Result<Option<Vec<u8>>> {
        Ok(self.contents().payloads.get(hash).cloned())
    }

    fn verdict_head(&self) -> Option<VerdictHead> {
        self.contents().verdict_head
    }

    fn verdict(&self, seq: u64) -> Result<Option<SignedVerdictBlock>> {
        Ok(self.contents().verdicts.get(&seq).cloned())
    }

    fn joins(&self) -> Result<Vec<JoinRecord>> {
        Ok(self.contents().joins.values().cloned().collect())
    }

    fn has_proof_against(&self, author: &AuthorId) -> Result<bool> {
        Ok(self
            .contents()
            .proofs
            .range((*author, Seq(0))..=(*author, Seq(u64::MAX)))
            .next()
            .is_some())
    }

    fn write(&self, batch: Batch) -> Result<()> {
        let mut guard = self.contents();
        // Apply to a copy of what changes, then swap in: all or nothing.
        let mut heads = guard.heads.clone();
        let mut verdict_head = guard.verdict_head;
        let mut staged: Vec<Op> = Vec::with_capacity(batch.ops.len());
        for op in batch.ops {
            match &op {
                Op::Append(record) => {
                    let rec = &record.signed().record;
                    check_append(&self.meta, heads.get(&rec.author).copied(), rec)?;
                    heads.insert(rec.author, record.head());
                }
                Op::Payload { hash, bytes, .. } => check_payload(hash, bytes)?,
                Op::Verdict(block) => verdict_head = Some(check_verdict(&self.meta, verdict_head, block)?),
                Op::Join { join, anchor, outer } => {
                    join.verify(&self.meta.run_id)?;
                    check_payload(&join.anchor_payload, anchor)?;
                    check_payload(&join.outer_payload, outer)?;
                }
                Op::Proof(proof) => proof.verify()?,
            }
            staged.push(op);
        }
        let c = &mut *guard;
        for op in staged {
            match op {
                Op::Append(record) => {
                    let signed = record.into_signed();
                    c.records.insert((signed.record.author, signed.record.seq), signed);
                }
                Op::Payload { hash, round, bytes } => {
                    c.payload_index.insert((round, hash), bytes.len() as u64);
                    c.payloads.insert(hash, bytes);
                }
                Op::Verdict(block) => {
                    c.verdicts.insert(block.block.seq, *block);
                }
                Op::Join { join, anchor, outer } => {
                    c.payload_index
                        .insert((join.round, join.anchor_payload), anchor.len() as u64);
                    c.payload_index
                        .insert((join.round, join.outer_payload), outer.len() as u64);
                    c.payloads.insert(join.anchor_payload, anchor);
                    c.payloads.insert(join.outer_payload, outer);
                    c.joins.insert((join.round, join.anchor), *join);
                }
                Op::Proof(proof) => {
                    c.proofs.insert((proof.author(), proof.seq()), *proof);
                }
            }
        }
        c.heads = heads;
        c.verdict_head = verdict_head;
        Ok(())
    }

    fn apply_retention(&self, retention: Retention, current_round: u64) -> Result<u64> {
        if retention == Retention::KEEP_ALL {
            return Ok(0);
        }
        let mut c = self.contents();
        let mut total: u64 = c.payload_index.values().sum();
        let keep_from = retention
            .rounds
            .map(|r| current_round.saturating_sub(r.saturating_sub(1)))
            .unwrap_or(0);
        let mut dropped = 0;
        let index: Vec<((u64, PayloadHash), u64)> = c.payload_index.iter().map(|(k, v)| (*k, *v)).collect();
        for ((round, hash), len) in index {
            let over_bytes = retention.bytes.is_some_and(|b| total > b);
            if round >= keep_from && !over_bytes {
                break;
            }
            c.payloads.remove(&hash);
            c.payload_index.remove(&(round, hash));
            total = total.saturating_sub(len);
            dropped += 1;
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::VerifiedRecord;
    use crate::record::tests::key;
    use crate::store::tests::{meta_for, rec};

    #[test]
    fn refuses_what_the_rocksdb_ledger_refuses() {
        let k = key(1);
        let meta = meta_for(&k);
        let mem = MemLedger::new(meta.clone()).unwrap();
        let r0 = rec(&meta, &k, 0, meta.genesis_link(), b"p0");
        let v0 = VerifiedRecord::extend(r0.clone(), &meta.run_id, None, meta.genesis_link()).unwrap();
        // A batch whose second op is bad writes nothing at all.
        let bad = Batch::new().op(Op::Append(Box::new(v0.clone()))).op(Op::Payload {
            hash: PayloadHash::of(b"other"),
            round: 0,
            bytes: b"p0".to_vec(),
        });
        assert!(matches!(mem.write(bad), Err(LedgerError::PayloadHashMismatch { .. })));
        assert_eq!(mem.head(&k.author()), None);
        mem.write(Batch::new().op(Op::Append(Box::new(v0.clone()))).op(Op::Payload {
            hash: PayloadHash::of(b"p0"),
            round: 0,
            bytes: b"p0".to_vec(),
        }))
        .unwrap();
        // The same record again no longer extends the chain.
        assert!(matches!(
            mem.write(Batch::new().op(Op::Append(Box::new(v0)))),
            Err(LedgerError::ChainGap { .. })
        ));
        let r1 = rec(&meta, &k, 1, r0.hash(), b"p1");
        let head = mem.head(&k.author());
        let v1 = VerifiedRecord::extend(r1, &meta.run_id, head, meta.genesis_link()).unwrap();
        mem.write(Batch::new().op(Op::Append(Box::new(v1)))).unwrap();
        assert_eq!(mem.records_from(&k.author(), Seq(0), 10).unwrap().len(), 2);
        assert_eq!(mem.check_chains().unwrap(), 2);
        assert!(mem.has_payload(&PayloadHash::of(b"p0")).unwrap());
        assert_eq!(
            mem.apply_retention(
                Retention {
                    rounds: Some(1),
                    bytes: None
                },
                5
            )
            .unwrap(),
            1
        );
        assert!(!mem.has_payload(&PayloadHash::of(b"p0")).unwrap());
    }

    #[test]
    fn a_verdict_block_too_large_to_read_back_is_not_written() {
        use crate::verdict::{RejectReason, Verdict, VerdictBlock, VerdictEntry, VERDICT_VERSION};
        let k = key(1);
        let meta = meta_for(&k);
        let mem = MemLedger::new(meta.clone()).unwrap();
        let entry = VerdictEntry {
            author: k.author(),
            seq: Seq(0),
            record_hash: meta.genesis_link(),
            round: 0,
            prior: 0.0,
            verdict: Verdict::Rejected {
                reason: RejectReason::Outlier("x".repeat(1 << 20)),
            },
        };
        let block = |entries: Vec<VerdictEntry>| {
            VerdictBlock {
                version: VERDICT_VERSION,
                run_id: meta.run_id,
                owner: k.author(),
                seq: 0,
                prev: meta.verdict_genesis(),
                round: 0,
                base_anchor: meta.genesis_weights,
                base_outer: crate::WeightsHash([0; 32]),
                new_anchor: meta.genesis_weights,
                outer_state: meta.genesis_weights,
                entries,
            }
            .sign(&k)
        };
        let big = block(vec![entry.clone(); 5]);
        let err = mem.write(Batch::new().op(Op::Verdict(Box::new(big)))).unwrap_err();
        assert!(err.to_string().contains("over the"), "{err}");
        assert!(mem.verdict_head().is_none());
        mem.write(Batch::new().op(Op::Verdict(Box::new(block(vec![entry])))))
            .unwrap();
        assert_eq!(mem.verdict_head().map(|h| h.seq), Some(0));
    }
}
