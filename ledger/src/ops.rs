//! What node logic may read from and write to a ledger, whatever holds it:
//! the [`Store`] trait, with the RocksDB [`crate::Ledger`] and the in-memory
//! [`crate::MemLedger`] (for simulation) behind it.
//!
//! A write is one [`Batch`] of [`Op`]s, applied atomically. Both stores run
//! the same checks ([`check_append`], [`check_verdict`], ...), so neither can
//! hold a broken chain whatever its caller does, and a simulated node
//! refuses exactly what a real one refuses.

use crate::chain::{expected_next, Head};
use crate::verdict::VerdictHead;
use crate::{
    AuthorId, EquivocationProof, JoinRecord, LedgerError, PayloadHash, Result, RunMeta, Seq, SignedRecord,
    SignedVerdictBlock, UpdateRecord, VerifiedRecord,
};

/// One change inside a [`Batch`].
#[derive(Clone, Debug)]
pub enum Op {
    /// A record that extends its author's chain (checked again on write).
    Append(Box<VerifiedRecord>),
    /// Payload bytes under their hash, indexed by round for retention.
    Payload {
        hash: PayloadHash,
        round: u64,
        bytes: Vec<u8>,
    },
    /// The owner's next verdict block.
    Verdict(Box<SignedVerdictBlock>),
    /// An adopted anchor, with the anchor and outer state kept as payloads.
    Join {
        join: Box<JoinRecord>,
        anchor: Vec<u8>,
        outer: Vec<u8>,
    },
    /// An equivocation proof (checked before it is kept).
    Proof(Box<EquivocationProof>),
}

/// One atomic ledger event: all of it is written, or none.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub ops: Vec<Op>,
    /// fsync this write even when sync writes are off (own records).
    pub sync: bool,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn op(mut self, op: Op) -> Self {
        self.ops.push(op);
        self
    }

    pub fn synced(mut self) -> Self {
        self.sync = true;
        self
    }
}

/// A ledger, on disk or in memory. Reads are of committed state; writes are
/// whole batches.
pub trait Store: Send + Sync {
    fn meta(&self) -> &RunMeta;
    fn head(&self, author: &AuthorId) -> Option<Head>;
    /// Every author's head, sorted by author.
    fn heads(&self) -> Vec<(AuthorId, Head)>;
    fn record(&self, author: &AuthorId, seq: Seq) -> Result<Option<SignedRecord>>;
    /// Up to `limit` consecutive records of `author` from `from`.
    fn records_from(&self, author: &AuthorId, from: Seq, limit: usize) -> Result<Vec<SignedRecord>>;
    fn has_payload(&self, hash: &PayloadHash) -> Result<bool>;
    /// The payload, checked against its hash on the way out.
    fn payload(&self, hash: &PayloadHash) -> Result<Option<Vec<u8>>>;
    fn verdict_head(&self) -> Option<VerdictHead>;
    fn verdict(&self, seq: u64) -> Result<Option<SignedVerdictBlock>>;
    /// The owner's joins, oldest first.
    fn joins(&self) -> Result<Vec<JoinRecord>>;
    fn has_proof_against(&self, author: &AuthorId) -> Result<bool>;
    /// Applies a batch atomically (every op checked first).
    fn write(&self, batch: Batch) -> Result<()>;
    /// Drops payloads outside `retention`, oldest rounds first.
    fn apply_retention(&self, retention: crate::Retention, current_round: u64) -> Result<u64>;
}

/// A record may be appended only right after its author's head (as of the
/// batch, earlier ops included) and only for this run.
pub fn check_append(meta: &RunMeta, head: Option<Head>, rec: &UpdateRecord) -> Result<()> {
    let (next_seq, expected_prev) = expected_next(head, meta.genesis_link());
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
    if rec.run_id != meta.run_id {
        return Err(LedgerError::WrongRun {
            author: rec.author,
            seq: rec.seq,
            expected: meta.run_id,
            got: rec.run_id,
        });
    }
    crate::chain::check_round(head, rec)
}

/// Payload bytes must hash to the name they are stored under.
pub fn check_payload(hash: &PayloadHash, bytes: &[u8]) -> Result<()> {
    let got = PayloadHash::of(bytes);
    if got != *hash {
        return Err(LedgerError::PayloadHashMismatch { expected: *hash, got });
    }
    Ok(())
}

/// A verdict block must be the owner's, of this run, validly signed, and
/// extend the verdict chain; returns the new verdict head.
pub fn check_verdict(meta: &RunMeta, head: Option<VerdictHead>, block: &SignedVerdictBlock) -> Result<VerdictHead> {
    let b = &block.block;
    if b.owner != meta.owner || b.run_id != meta.run_id {
        return Err(LedgerError::Malformed {
            what: "verdict block",
            detail: "not of this ledger's owner and run".into(),
        });
    }
    // What decoding refuses must not be written: the block could never be
    // read back (audit, resume) nor sent as a vote.
    let size = block.to_bytes().len();
    if size > crate::wire::MAX_VALUE_BYTES {
        return Err(LedgerError::Malformed {
            what: "verdict block",
            detail: format!(
                "{size} bytes encoded, over the {}-byte limit",
                crate::wire::MAX_VALUE_BYTES
            ),
        });
    }
    let (next, prev) = match head {
        None => (0, meta.verdict_genesis()),
        Some(h) => (
            h.seq.checked_add(1).ok_or(LedgerError::Malformed {
                what: "verdict block",
                detail: "the verdict chain is full".into(),
            })?,
            h.hash,
        ),
    };
    if b.seq != next || b.prev != prev {
        return Err(LedgerError::VerdictChainBroken {
            seq: b.seq,
            expected_prev: prev,
            got: b.prev,
        });
    }
    block.verify_signature()?;
    Ok(VerdictHead {
        seq: b.seq,
        hash: b.hash(),
        anchor: b.new_anchor,
        round: b.round,
    })
}
