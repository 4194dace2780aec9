//! The inbox: checks every incoming record and payload and writes the
//! ledger, in order. Keeping verification and writes on one queue means a
//! chain head never changes under a check.
//!
//! [`Inbox`] is plain logic over a [`Store`]: the node runs it on its own
//! thread over RocksDB ([`thread::spawn`]), the simulator runs it inline over
//! a [`meshtrain_ledger::MemLedger`]. Checks run cheapest first (DESIGN
//! §3.5): decode with limits, run, round, signature, chain link, then the
//! payload's hash, shape and finiteness.

pub mod thread;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use meshtrain_gossip::libp2p::PeerId;
use meshtrain_ledger::chain::place;
use meshtrain_ledger::{
    AuthorId, Batch, EquivocationProof, JoinRecord, LedgerError, Op, PayloadHash, Placement, RecordHash, RejectReason,
    Retention, RunId, Seq, SignedRecord, SignedVerdictBlock, Store, Verdict, VerdictEntry, VerifiedRecord,
};
use meshtrain_model::{codec, CodecError};
use tracing::{debug, warn};

use crate::core::outcome::{IgnoreReason, Origin, Outcome};
use crate::core::rounds::Contribution;

/// Records held per author while a gap before them is being filled.
const GAP_BUFFER_PER_AUTHOR: usize = 64;
/// Records held out of order across all authors, and the inline payload
/// bytes they carry: fresh keys must not add up to unbounded memory. A
/// record not held is fetched again once its gap is filled.
const GAP_BUFFER_TOTAL: usize = 1024;
const GAP_BUFFER_BYTES: usize = 16 << 20;
/// Rounds (as [`Job::Prune`] tells them) a record may wait for its gap.
const GAP_MAX_AGE: u64 = 8;
/// Rounds behind the pruned window for which payload hashes stay named, so
/// that a replay is caught without a ledger read; older ones are caught by
/// the payload still held in the ledger (`has_payload`) while retained.
const NAMED_ROUNDS: u64 = 256;
/// Records read back per author when rebuilding a round after a restart.
const REBUILD_DEPTH: u64 = 8;

#[derive(Debug)]
pub enum Job {
    Record {
        bytes: Vec<u8>,
        payload: Option<Vec<u8>>,
        origin: Origin,
    },
    /// A payload fetched by hash for a record already stored.
    Payload {
        hash: PayloadHash,
        bytes: Vec<u8>,
        from: PeerId,
    },
    /// Our own record: stored (synced) before it is published.
    Own {
        signed: Box<SignedRecord>,
        payload: Vec<u8>,
    },
    Verdict(Box<SignedVerdictBlock>),
    Proof {
        bytes: Vec<u8>,
        origin: Origin,
    },
    Ban(AuthorId),
    /// The node adopted peers' anchor: keep the record and the payloads.
    Join {
        record: Box<JoinRecord>,
        anchor: Vec<u8>,
        outer: Vec<u8>,
    },
    /// After a restart or a jump to `round`: the records of `round` and later
    /// already held become contributions again (their payloads are read back
    /// and checked) or wanted payloads. `authors`, when given, limits it to
    /// those authors (updates the core set aside as too far ahead).
    Rebuild {
        round: u64,
        authors: Option<Vec<AuthorId>>,
    },
    /// A gossiped verdict block: a vote for the run's final anchor.
    Vote {
        bytes: Vec<u8>,
        origin: Origin,
    },
    /// The core is at `round`; updates of rounds before `keep_from` can no
    /// longer be merged: what is held for them (records waiting for a gap
    /// or a payload) is dropped.
    Prune {
        round: u64,
        keep_from: u64,
    },
}

/// What the inbox learned about one record.
#[derive(Debug)]
pub struct RecordDone {
    pub origin: Origin,
    pub outcome: Outcome,
    pub author: Option<AuthorId>,
    pub seq: Option<Seq>,
    pub round: Option<u64>,
    pub record_hash: Option<RecordHash>,
    pub payload_hash: Option<PayloadHash>,
    /// The anchor the author says it trained from.
    pub base: Option<meshtrain_ledger::WeightsHash>,
    /// Stored in the chain (a new record, not a duplicate or a refusal).
    pub stored: bool,
    /// Payload verified: the delta is ready to aggregate.
    pub contribution: Option<Contribution>,
    /// The author is at fault for this record's payload; recorded as a verdict.
    pub rejection: Option<VerdictEntry>,
    /// Stored, but its payload must still be fetched by hash.
    pub need_payload: bool,
    /// Records of this author from this seq on are missing.
    pub gap_from: Option<Seq>,
    pub proof: Option<EquivocationProof>,
    /// The record, when it is in the chain now (or was read back from it),
    /// or a banned author's valid record (not stored): its author's vote for
    /// the anchor it trained from.
    pub signed: Option<Box<SignedRecord>>,
}

pub enum Done {
    Record(Box<RecordDone>),
    /// A fetched payload that did not settle its record: who sent it and why.
    PayloadRefused {
        hash: PayloadHash,
        from: PeerId,
        fault: PayloadFault,
    },
    OwnStored {
        signed: Box<SignedRecord>,
        payload: Vec<u8>,
    },
    OwnFailed(String),
    /// The ledger could not be written or read (a full disk, an I/O
    /// error, corrupt data): the node cannot keep an honest ledger and
    /// stops, instead of running on with records it cannot keep.
    LedgerFailed(String),
    VerdictStored {
        round: u64,
    },
    VerdictFailed(String),
    Proof {
        origin: Origin,
        outcome: Outcome,
        proof: Option<Box<EquivocationProof>>,
    },
    JoinStored {
        round: u64,
    },
    JoinFailed(String),
    /// A checked vote (its block, when valid).
    Vote {
        origin: Origin,
        outcome: Outcome,
        block: Option<Box<SignedVerdictBlock>>,
    },
}

/// Why a payload could not be used.
#[derive(Clone, Debug, PartialEq)]
pub enum PayloadFault {
    /// These bytes are not the payload the record names (whoever sent them
    /// is at fault, not necessarily the author): try another peer.
    NotThePayload,
    /// No stored record waits for this payload (or it was already handled).
    Unknown,
    /// The author's payload itself is bad.
    Author(RejectReason),
}

pub struct InboxConfig {
    pub run_id: RunId,
    /// A permissioned run's roster: records of anyone else are refused.
    pub roster: Option<std::collections::BTreeSet<AuthorId>>,
    pub genesis: RecordHash,
    pub params: usize,
    /// Rounds of the run; records beyond them are invalid.
    pub rounds: u64,
    pub retention: Retention,
}

/// A record held out of order, with the payload that came with it and the
/// round the inbox was at when it came.
type Held = (SignedRecord, Option<Vec<u8>>, u64);

/// Record checks and ledger writes over a store.
pub struct Inbox<S: Store + ?Sized> {
    store: Arc<S>,
    cfg: InboxConfig,
    banned: HashSet<AuthorId>,
    gaps: HashMap<AuthorId, BTreeMap<Seq, Held>>,
    /// Stored records still waiting for their payload, by payload hash.
    awaiting: HashMap<PayloadHash, SignedRecord>,
    /// Every payload hash a stored record has named, with that record and
    /// its round: a second record naming one again is a replay. Pruned
    /// [`NAMED_ROUNDS`] behind the window.
    named: HashMap<PayloadHash, (RecordHash, u64)>,
    /// The core's round, as the last [`Job::Prune`] told it.
    round: u64,
    /// The first local ledger fault met while running a job, reported
    /// once the job is done.
    fault: Option<String>,
}

impl Job {
    /// The peer that forwarded a gossiped job and the bytes it brings
    /// (what the backlog counts); `None` for answers to our own requests
    /// and the node's own jobs, which are never refused.
    pub fn gossiped(&self) -> Option<(PeerId, usize)> {
        let (origin, bytes) = match self {
            Job::Record { bytes, payload, origin } => (origin, bytes.len() + payload.as_ref().map_or(0, Vec::len)),
            Job::Proof { bytes, origin } | Job::Vote { bytes, origin } => (origin, bytes.len()),
            _ => return None,
        };
        match origin {
            Origin::Gossip { source, .. } => Some((*source, bytes)),
            _ => None,
        }
    }
}

fn reason_of(e: &LedgerError) -> RejectReason {
    match e {
        LedgerError::WrongRun { .. } => RejectReason::WrongRun,
        LedgerError::BadSignature { .. } | LedgerError::BadAuthorKey { .. } => RejectReason::BadSignature,
        LedgerError::ChainBroken { .. } | LedgerError::ChainGap { .. } => RejectReason::ChainBroken,
        LedgerError::Equivocation { .. } => RejectReason::Equivocation,
        _ => RejectReason::Malformed,
    }
}

/// Whether a ledger error is about the data (the sender's fault) rather
/// than this node's disk.
fn is_local(e: &LedgerError) -> bool {
    matches!(e, LedgerError::Store { .. } | LedgerError::Corrupt { .. })
}

impl RecordDone {
    fn new(origin: Origin, outcome: Outcome) -> Self {
        Self {
            origin,
            outcome,
            author: None,
            seq: None,
            round: None,
            record_hash: None,
            payload_hash: None,
            base: None,
            stored: false,
            contribution: None,
            rejection: None,
            need_payload: false,
            gap_from: None,
            proof: None,
            signed: None,
        }
    }

    fn about(mut self, signed: &SignedRecord) -> Self {
        self.author = Some(signed.record.author);
        self.seq = Some(signed.record.seq);
        self.round = Some(signed.record.round);
        self.record_hash = Some(signed.hash());
        self.payload_hash = Some(signed.record.payload_hash);
        self.base = Some(signed.record.base_hash);
        self
    }
}

impl<S: Store + ?Sized> Inbox<S> {
    pub fn new(store: Arc<S>, cfg: InboxConfig) -> Self {
        Self {
            store,
            cfg,
            banned: HashSet::new(),
            gaps: HashMap::new(),
            awaiting: HashMap::new(),
            named: HashMap::new(),
            round: 0,
            fault: None,
        }
    }

    /// Records held out of order, and the inline payload bytes with them.
    fn gap_held(&self) -> (usize, usize) {
        self.gaps
            .values()
            .flat_map(|b| b.values())
            .fold((0, 0), |(n, bytes), h| {
                (n + 1, bytes + h.1.as_ref().map_or(0, Vec::len))
            })
    }

    /// Drops what can no longer be merged (see [`Job::Prune`]).
    fn prune(&mut self, round: u64, keep_from: u64) {
        self.round = self.round.max(round);
        let now = self.round;
        self.gaps.retain(|_, buffer| {
            buffer.retain(|_, (signed, _, since)| {
                signed.record.round >= keep_from && since.saturating_add(GAP_MAX_AGE) >= now
            });
            !buffer.is_empty()
        });
        self.awaiting.retain(|_, r| r.record.round >= keep_from);
        let named_from = keep_from.saturating_sub(NAMED_ROUNDS);
        self.named.retain(|_, (_, r)| *r >= named_from);
    }

    /// How much the inbox holds in memory: records out of order, records
    /// waiting for payloads, payload hashes named (for tests and metrics).
    pub fn held(&self) -> (usize, usize, usize) {
        (self.gap_held().0, self.awaiting.len(), self.named.len())
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Runs one job; what it learned, in order, then a
    /// [`Done::LedgerFailed`] if the ledger failed on the way.
    pub fn handle(&mut self, job: Job) -> Vec<Done> {
        let mut done = self.run(job);
        if let Some(e) = self.fault.take() {
            done.push(Done::LedgerFailed(e));
        }
        done
    }

    /// Notes a ledger error that is this node's own (its disk, its data),
    /// not a sender's: the node stops once the job is done.
    fn local_fault(&mut self, e: &LedgerError) {
        if is_local(e) && self.fault.is_none() {
            self.fault = Some(e.to_string());
        }
    }

    fn run(&mut self, job: Job) -> Vec<Done> {
        match job {
            Job::Record { bytes, payload, origin } => {
                let mut results = Vec::new();
                self.record(&bytes, payload, origin, &mut results);
                results.into_iter().map(|r| Done::Record(Box::new(r))).collect()
            }
            Job::Payload { hash, bytes, from } => match self.payload(hash, &bytes, Origin::Fetched { from }) {
                Ok(done) => vec![Done::Record(done)],
                Err(fault) => vec![Done::PayloadRefused { hash, from, fault }],
            },
            Job::Own { signed, payload } => vec![match self.own(&signed, &payload) {
                Ok(()) => Done::OwnStored { signed, payload },
                Err(e) => Done::OwnFailed(e.to_string()),
            }],
            Job::Verdict(block) => {
                let round = block.block.round;
                vec![match self.store.write(Batch::new().op(Op::Verdict(block))) {
                    Ok(()) => {
                        if let Err(e) = self.store.apply_retention(self.cfg.retention, round) {
                            warn!(error = %e, "payload retention failed");
                            self.local_fault(&e);
                        }
                        Done::VerdictStored { round }
                    }
                    Err(e) => Done::VerdictFailed(e.to_string()),
                }]
            }
            Job::Proof { bytes, origin } => vec![self.proof(&bytes, origin)],
            Job::Join { record, anchor, outer } => {
                let round = record.round;
                vec![match self.store.write(Batch::new().op(Op::Join {
                    join: record,
                    anchor,
                    outer,
                })) {
                    Ok(()) => Done::JoinStored { round },
                    Err(e) => {
                        self.local_fault(&e);
                        Done::JoinFailed(e.to_string())
                    }
                }]
            }
            Job::Ban(author) => {
                self.banned.insert(author);
                self.gaps.remove(&author);
                self.awaiting.retain(|_, r| r.record.author != author);
                Vec::new()
            }
            Job::Rebuild { round, authors } => self
                .rebuild(round, authors.as_deref())
                .into_iter()
                .map(|r| Done::Record(Box::new(r)))
                .collect(),
            Job::Vote { bytes, origin } => vec![self.vote(&bytes, origin)],
            Job::Prune { round, keep_from } => {
                self.prune(round, keep_from);
                Vec::new()
            }
        }
    }

    fn held_hash(&self, author: &AuthorId, seq: Seq) -> Option<RecordHash> {
        self.store.record(author, seq).ok().flatten().map(|r| r.hash())
    }

    fn record(&mut self, bytes: &[u8], payload: Option<Vec<u8>>, origin: Origin, results: &mut Vec<RecordDone>) {
        let signed = match SignedRecord::from_bytes(bytes) {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "undecodable record");
                results.push(RecordDone::new(origin, Outcome::Invalid(RejectReason::Malformed)));
                return;
            }
        };
        let author = signed.record.author;
        if self.cfg.roster.as_ref().is_some_and(|r| !r.contains(&author)) {
            results.push(RecordDone::new(origin, Outcome::Invalid(RejectReason::NotAMember)).about(&signed));
            return;
        }
        if self.banned.contains(&author) {
            // Never stored, its payload never fetched; but a valid record
            // still carries its author's vote: every honest node must count
            // the same votes, whenever (or whether) it banned the author.
            let valid = signed.record.run_id == self.cfg.run_id
                && signed.record.round < self.cfg.rounds
                && signed.verify_signature().is_ok();
            let reason = if valid {
                IgnoreReason::VoteOnly
            } else {
                IgnoreReason::BannedAuthor
            };
            let mut done = RecordDone::new(origin, Outcome::Ignored(reason)).about(&signed);
            if valid {
                done.signed = Some(Box::new(signed));
            }
            results.push(done);
            return;
        }
        if signed.record.round >= self.cfg.rounds {
            results.push(RecordDone::new(origin, Outcome::Invalid(RejectReason::Malformed)).about(&signed));
            return;
        }
        let head = self.store.head(&author);
        let held = |seq: Seq| self.held_hash(&author, seq);
        match place(signed.clone(), &self.cfg.run_id, head, self.cfg.genesis, held) {
            Ok(Placement::Next(verified)) => {
                let done = self.store_record(verified, payload, origin);
                let stored = done.stored;
                results.push(done);
                if stored {
                    self.release_gap(author, results);
                }
            }
            Ok(Placement::Duplicate) => {
                // A payload we were still missing may ride along a duplicate;
                // the message is settled once, by whichever result it gets.
                if let Some(p) = payload {
                    if self.awaiting.contains_key(&signed.record.payload_hash) {
                        if let Ok(done) = self.payload(signed.record.payload_hash, &p, origin.clone()) {
                            results.push(*done);
                            return;
                        }
                    }
                }
                results.push(RecordDone::new(origin, Outcome::Ignored(IgnoreReason::Duplicate)).about(&signed));
            }
            Ok(Placement::Gap { missing_from }) => {
                let (total, bytes) = self.gap_held();
                let size = payload.as_ref().map_or(0, Vec::len);
                let buffer = self.gaps.entry(author).or_default();
                if buffer.len() < GAP_BUFFER_PER_AUTHOR
                    && total < GAP_BUFFER_TOTAL
                    && bytes.saturating_add(size) <= GAP_BUFFER_BYTES
                {
                    buffer.insert(signed.record.seq, (signed.clone(), payload, self.round));
                } else if buffer.is_empty() {
                    self.gaps.remove(&author);
                }
                let mut done = RecordDone::new(origin, Outcome::Accepted).about(&signed);
                done.gap_from = Some(missing_from);
                results.push(done);
            }
            Err(LedgerError::Equivocation { first, .. }) => {
                let proof = self
                    .store
                    .record(&author, signed.record.seq)
                    .ok()
                    .flatten()
                    .filter(|held| held.hash() == first)
                    .map(|held| EquivocationProof::new(held, signed.clone()));
                let mut done = RecordDone::new(origin, Outcome::Invalid(RejectReason::Equivocation)).about(&signed);
                if let Some(p) = &proof {
                    if let Err(e) = self.store.write(Batch::new().op(Op::Proof(Box::new(p.clone())))) {
                        warn!(error = %e, "cannot store an equivocation proof");
                        self.local_fault(&e);
                    }
                }
                self.banned.insert(author);
                self.gaps.remove(&author);
                done.rejection = Some(rejection(&signed, RejectReason::Equivocation));
                done.proof = proof;
                results.push(done);
            }
            Err(LedgerError::RoundReused { previous, .. }) => {
                // A second record for a round (or an earlier one): provable
                // with the record held before it.
                let proof = self
                    .store
                    .head(&author)
                    .and_then(|h| self.store.record(&author, h.seq).ok().flatten())
                    .filter(|held| held.hash() == previous)
                    .map(|held| EquivocationProof::new(held, signed.clone()));
                let mut done = RecordDone::new(origin, Outcome::Invalid(RejectReason::RoundReused)).about(&signed);
                if let Some(p) = &proof {
                    if let Err(e) = self.store.write(Batch::new().op(Op::Proof(Box::new(p.clone())))) {
                        warn!(error = %e, "cannot store a proof of two records for one round");
                        self.local_fault(&e);
                    }
                }
                self.banned.insert(author);
                self.gaps.remove(&author);
                done.rejection = Some(rejection(&signed, RejectReason::RoundReused));
                done.proof = proof;
                results.push(done);
            }
            Err(e) if is_local(&e) => {
                warn!(%author, error = %e, "cannot check a record against the local ledger");
                self.local_fault(&e);
                results.push(RecordDone::new(origin, Outcome::Ignored(IgnoreReason::LocalFault)).about(&signed));
            }
            Err(e) => {
                let reason = reason_of(&e);
                debug!(%author, error = %e, "record refused");
                let mut done = RecordDone::new(origin, Outcome::Invalid(reason.clone())).about(&signed);
                // A bad signature or another run names an author the sender
                // may have made up: no verdict against that author.
                if !matches!(reason, RejectReason::BadSignature | RejectReason::WrongRun) {
                    done.rejection = Some(rejection(&signed, reason));
                }
                results.push(done);
            }
        }
    }

    /// Stores a record that extends its chain, with its payload when that
    /// is present and genuine, in one event.
    fn store_record(&mut self, verified: Box<VerifiedRecord>, payload: Option<Vec<u8>>, origin: Origin) -> RecordDone {
        let signed = verified.signed().clone();
        let rec = &signed.record;
        let mut done = RecordDone::new(origin.clone(), Outcome::Accepted).about(&signed);
        // A payload some earlier record already named (still awaited, or
        // stored, which survives restarts) is being replayed.
        let replayed = match self.named.get(&rec.payload_hash) {
            Some((first, _)) => *first != verified.hash(),
            None => self.store.has_payload(&rec.payload_hash).unwrap_or(false),
        };
        let checked = if replayed {
            Some(Err(PayloadFault::Author(RejectReason::Replay)))
        } else {
            payload.as_ref().map(|p| check_payload(&signed, p, self.cfg.params))
        };
        let mut batch = Batch::new().op(Op::Append(verified.clone()));
        match (&checked, &payload) {
            (Some(Ok(delta)), Some(p)) => {
                batch = batch.op(Op::Payload {
                    hash: rec.payload_hash,
                    round: rec.round,
                    bytes: p.clone(),
                });
                done.contribution = Some(contribution(&signed, delta.clone()));
            }
            (Some(Err(PayloadFault::Author(RejectReason::Replay))), _) => {
                // The record stands in the chain; its payload is someone's old one.
                done.outcome = Outcome::Invalid(RejectReason::Replay);
                done.rejection = Some(rejection(&signed, RejectReason::Replay));
            }
            (Some(Err(PayloadFault::Author(reason))), Some(p)) => {
                // Keep the bad payload as evidence for auditors.
                batch = batch.op(Op::Payload {
                    hash: rec.payload_hash,
                    round: rec.round,
                    bytes: p.clone(),
                });
                done.outcome = Outcome::Invalid(reason.clone());
                done.rejection = Some(rejection(&signed, reason.clone()));
            }
            (Some(Err(_)), _) => {
                // Not the payload the record names: the record still stands,
                // only its carrier lied.
                done.outcome = Outcome::Invalid(RejectReason::PayloadHashMismatch);
                done.need_payload = true;
            }
            _ => done.need_payload = true,
        }
        if let Err(e) = self.store.write(batch) {
            warn!(error = %e, "ledger write failed");
            self.local_fault(&e);
            let outcome = if is_local(&e) {
                Outcome::Ignored(IgnoreReason::LocalFault)
            } else {
                Outcome::Invalid(reason_of(&e))
            };
            return RecordDone::new(origin, outcome).about(&signed);
        }
        done.stored = true;
        done.signed = Some(Box::new(signed.clone()));
        self.named
            .entry(rec.payload_hash)
            .or_insert((verified.hash(), rec.round));
        if done.need_payload {
            self.awaiting.insert(rec.payload_hash, signed.clone());
        }
        done
    }

    /// Processes buffered records of `author` that now extend the chain.
    fn release_gap(&mut self, author: AuthorId, results: &mut Vec<RecordDone>) {
        loop {
            let next = self.store.head(&author).map(|h| h.seq.next()).unwrap_or(Seq(0));
            let Some(buffer) = self.gaps.get_mut(&author) else {
                return;
            };
            // Drop anything at or below the head: already stored.
            while let Some((&seq, _)) = buffer.first_key_value() {
                if seq < next {
                    buffer.pop_first();
                } else {
                    break;
                }
            }
            let Some((signed, payload, _)) = buffer.remove(&next) else {
                if buffer.is_empty() {
                    self.gaps.remove(&author);
                }
                return;
            };
            let before = results.len();
            self.record(&signed.to_bytes(), payload, Origin::Local, results);
            if results.len() == before || !results.last().is_some_and(|r| r.stored) {
                return;
            }
        }
    }

    /// Checks payload bytes for a stored record that waits for them.
    fn payload(&mut self, hash: PayloadHash, bytes: &[u8], origin: Origin) -> Result<Box<RecordDone>, PayloadFault> {
        let signed = self.awaiting.get(&hash).cloned().ok_or(PayloadFault::Unknown)?;
        match check_payload(&signed, bytes, self.cfg.params) {
            Err(PayloadFault::NotThePayload) => Err(PayloadFault::NotThePayload),
            Err(PayloadFault::Unknown) => Err(PayloadFault::Unknown),
            Err(PayloadFault::Author(reason)) => {
                self.awaiting.remove(&hash);
                let stored = Batch::new().op(Op::Payload {
                    hash,
                    round: signed.record.round,
                    bytes: bytes.to_vec(),
                });
                if let Err(e) = self.store.write(stored) {
                    warn!(error = %e, "cannot keep a bad payload as evidence");
                    self.local_fault(&e);
                }
                let mut done = RecordDone::new(origin, Outcome::Invalid(reason.clone())).about(&signed);
                done.rejection = Some(rejection(&signed, reason));
                Ok(Box::new(done))
            }
            Ok(delta) => {
                let stored = Batch::new().op(Op::Payload {
                    hash,
                    round: signed.record.round,
                    bytes: bytes.to_vec(),
                });
                if let Err(e) = self.store.write(stored) {
                    // The payload is good, our disk is not: the node stops.
                    warn!(error = %e, "payload not stored");
                    self.local_fault(&e);
                    return Ok(Box::new(
                        RecordDone::new(origin, Outcome::Ignored(IgnoreReason::LocalFault)).about(&signed),
                    ));
                }
                self.awaiting.remove(&hash);
                let mut done = RecordDone::new(origin, Outcome::Accepted).about(&signed);
                done.contribution = Some(contribution(&signed, delta));
                Ok(Box::new(done))
            }
        }
    }

    fn own(&mut self, signed: &SignedRecord, payload: &[u8]) -> Result<(), LedgerError> {
        let head = self.store.head(&signed.record.author);
        let verified = VerifiedRecord::extend(signed.clone(), &self.cfg.run_id, head, self.cfg.genesis)?;
        self.named
            .insert(signed.record.payload_hash, (signed.hash(), signed.record.round));
        self.store.write(
            Batch::new()
                .op(Op::Append(Box::new(verified)))
                .op(Op::Payload {
                    hash: signed.record.payload_hash,
                    round: signed.record.round,
                    bytes: payload.to_vec(),
                })
                .synced(),
        )
    }

    fn proof(&mut self, bytes: &[u8], origin: Origin) -> Done {
        let invalid = |origin, reason| Done::Proof {
            origin,
            outcome: Outcome::Invalid(reason),
            proof: None,
        };
        let proof = match EquivocationProof::from_bytes(bytes).and_then(|p| p.verify().map(|_| p)) {
            Ok(p) => p,
            Err(e) => {
                debug!(error = %e, "invalid equivocation proof");
                return invalid(origin, RejectReason::Malformed);
            }
        };
        if proof.first.record.run_id != self.cfg.run_id {
            return invalid(origin, RejectReason::WrongRun);
        }
        let author = proof.author();
        let known = self.store.has_proof_against(&author).unwrap_or(false);
        if !known {
            if let Err(e) = self.store.write(Batch::new().op(Op::Proof(Box::new(proof.clone())))) {
                warn!(error = %e, "cannot store an equivocation proof");
                self.local_fault(&e);
            }
        }
        self.banned.insert(author);
        self.gaps.remove(&author);
        Done::Proof {
            origin,
            outcome: if known {
                Outcome::Ignored(IgnoreReason::KnownProof)
            } else {
                Outcome::Accepted
            },
            proof: Some(Box::new(proof)),
        }
    }

    /// Checks a gossiped vote: a verdict block of this run, validly signed,
    /// by an admitted member.
    fn vote(&mut self, bytes: &[u8], origin: Origin) -> Done {
        let invalid = |origin, reason| Done::Vote {
            origin,
            outcome: Outcome::Invalid(reason),
            block: None,
        };
        let block = match SignedVerdictBlock::from_bytes(bytes) {
            Ok(b) => b,
            Err(_) => return invalid(origin, RejectReason::Malformed),
        };
        if block.block.run_id != self.cfg.run_id {
            return invalid(origin, RejectReason::WrongRun);
        }
        if self
            .cfg
            .roster
            .as_ref()
            .is_some_and(|r| !r.contains(&block.block.owner))
        {
            return invalid(origin, RejectReason::NotAMember);
        }
        // A banned owner's block is checked like any other: its vote counts
        // (see `Core::add_vote`), and passing it on lets members that banned
        // the owner too count it.
        if block.verify_signature().is_err() {
            return invalid(origin, RejectReason::BadSignature);
        }
        Done::Vote {
            origin,
            outcome: Outcome::Accepted,
            block: Some(Box::new(block)),
        }
    }

    /// The newest records of every author, for rounds from `round` on: those
    /// with a stored payload become contributions again, the others wanted
    /// payloads.
    fn rebuild(&mut self, round: u64, only: Option<&[AuthorId]>) -> Vec<RecordDone> {
        let mut out = Vec::new();
        let owner = self.store.meta().owner;
        for (author, head) in self.store.heads() {
            // Our own record of the round is published again by the core.
            if author == owner || self.banned.contains(&author) || only.is_some_and(|o| !o.contains(&author)) {
                continue;
            }
            let from = Seq(head.seq.0.saturating_sub(REBUILD_DEPTH - 1));
            let Ok(records) = self.store.records_from(&author, from, REBUILD_DEPTH as usize) else {
                continue;
            };
            for signed in records.into_iter().filter(|r| r.record.round >= round) {
                let hash = signed.record.payload_hash;
                let mut done = RecordDone::new(Origin::Local, Outcome::Accepted).about(&signed);
                match self.store.payload(&hash) {
                    Ok(Some(bytes)) => match check_payload(&signed, &bytes, self.cfg.params) {
                        Ok(delta) => done.contribution = Some(contribution(&signed, delta)),
                        // Judged when it first came in: nothing to add now.
                        Err(_) => continue,
                    },
                    Ok(None) => {
                        self.awaiting.insert(hash, signed.clone());
                        done.need_payload = true;
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot read a payload back from the ledger");
                        continue;
                    }
                }
                self.named.entry(hash).or_insert((signed.hash(), signed.record.round));
                done.signed = Some(Box::new(signed));
                out.push(done);
            }
        }
        out
    }
}

fn rejection(signed: &SignedRecord, reason: RejectReason) -> VerdictEntry {
    VerdictEntry {
        author: signed.record.author,
        seq: signed.record.seq,
        record_hash: signed.hash(),
        round: signed.record.round,
        prior: 0.0,
        verdict: Verdict::Rejected { reason },
    }
}

fn contribution(signed: &SignedRecord, delta: Arc<Vec<f32>>) -> Contribution {
    Contribution {
        author: signed.record.author,
        seq: signed.record.seq,
        record_hash: signed.hash(),
        round: signed.record.round,
        n_samples: signed.record.n_samples,
        base: signed.record.base_hash,
        delta,
    }
}

/// Checks payload bytes against their record: hash and length, then that
/// they decode to the model's parameter count with every value finite.
pub fn check_payload(signed: &SignedRecord, bytes: &[u8], params: usize) -> Result<Arc<Vec<f32>>, PayloadFault> {
    let rec = &signed.record;
    if PayloadHash::of(bytes) != rec.payload_hash || bytes.len() as u64 != rec.payload_len {
        return Err(PayloadFault::NotThePayload);
    }
    let delta = codec::decode(bytes, params).map_err(|e| {
        PayloadFault::Author(match e {
            CodecError::Malformed(_) => RejectReason::PayloadMalformed,
            CodecError::WrongShape { .. } => RejectReason::WrongShape,
            CodecError::NonFinite(_) => RejectReason::NonFinite,
        })
    })?;
    if delta.iter().all(|v| *v == 0.0) {
        return Err(PayloadFault::Author(RejectReason::FreeRider));
    }
    Ok(Arc::new(delta))
}
