//! The inbox: one worker thread that checks every incoming record and payload
//! and writes the ledger, in order. Keeping verification and writes on one
//! queue means a chain head never changes under a check, and the event loop
//! never waits on a signature or an fsync.
//!
//! Checks run cheapest first (DESIGN §3.5): decode with limits, run, round,
//! signature, chain link, then the payload's hash, shape and finiteness.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use meshtrain_gossip::libp2p::{gossipsub::MessageId, PeerId};
use meshtrain_ledger::chain::place;
use meshtrain_ledger::{
    AuthorId, EquivocationProof, Ledger, LedgerError, PayloadHash, Placement, RecordHash, RejectReason, RunId, Seq,
    SignedRecord, SignedVerdictBlock, Verdict, VerdictEntry, VerifiedRecord,
};
use meshtrain_model::{codec, CodecError};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::round::Contribution;

/// Records held per author while a gap before them is being filled.
const GAP_BUFFER_PER_AUTHOR: usize = 64;

/// Where a record came from, for the gossipsub verdict and for retries.
#[derive(Clone, Debug)]
pub enum Origin {
    Gossip {
        message_id: MessageId,
        source: PeerId,
    },
    Fetched {
        from: PeerId,
    },
    /// Released from the gap buffer once its predecessors arrived.
    Buffered,
}

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
        signed: SignedRecord,
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
        record: Box<meshtrain_ledger::JoinRecord>,
        anchor: Vec<u8>,
        outer: Vec<u8>,
    },
}

/// The three outcomes of a message, one-to-one with gossipsub's acceptance.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Accepted,
    Ignored(&'static str),
    Invalid(RejectReason),
}

/// What the inbox learned about one record.
#[derive(Debug)]
pub struct RecordDone {
    pub origin: Origin,
    pub outcome: Outcome,
    pub author: Option<AuthorId>,
    pub seq: Option<Seq>,
    pub round: Option<u64>,
    pub payload_hash: Option<PayloadHash>,
    /// Payload verified: the delta is ready to aggregate.
    pub contribution: Option<Contribution>,
    /// The author is at fault for this record's payload; recorded as a verdict.
    pub rejection: Option<VerdictEntry>,
    /// Stored, but its payload must still be fetched by hash.
    pub need_payload: bool,
    /// Records of this author from this seq on are missing.
    pub gap_from: Option<Seq>,
    pub proof: Option<EquivocationProof>,
}

pub enum Done {
    Record(Box<RecordDone>),
    /// A fetched payload: the contribution, or why not.
    Payload {
        hash: PayloadHash,
        from: PeerId,
        result: Result<Box<RecordDone>, PayloadFault>,
    },
    OwnStored {
        signed: SignedRecord,
        payload: Vec<u8>,
    },
    OwnFailed(String),
    VerdictStored {
        round: u64,
    },
    VerdictFailed(String),
    Proof {
        origin: Origin,
        outcome: Outcome,
        proof: Option<EquivocationProof>,
    },
}

/// Why a payload could not be used.
#[derive(Clone, Debug, PartialEq)]
pub enum PayloadFault {
    /// These bytes are not the payload the record names (whoever sent them
    /// is at fault, not necessarily the author): try another peer.
    NotThePayload,
    /// No stored record names this payload (or it was already handled).
    Unknown,
    /// The author's payload itself is bad.
    Author(RejectReason),
}

pub struct InboxConfig {
    pub run_id: RunId,
    pub genesis: RecordHash,
    pub params: usize,
    /// Rounds of the run; records beyond them are invalid.
    pub rounds: u64,
    pub retention: meshtrain_ledger::Retention,
    /// Where checking (`verify`) and own writes (`ledger`) report their time.
    pub metrics: Option<crate::metrics::NodeMetrics>,
}

struct Inbox {
    ledger: Arc<Ledger>,
    cfg: InboxConfig,
    banned: HashSet<AuthorId>,
    gaps: HashMap<AuthorId, BTreeMap<Seq, (SignedRecord, Option<Vec<u8>>)>>,
    /// Stored records still waiting for their payload, by payload hash.
    awaiting: HashMap<PayloadHash, SignedRecord>,
    /// Every payload hash a stored record has named, with that record: a
    /// second record naming one again is a replay.
    named: HashMap<PayloadHash, RecordHash>,
    out: mpsc::UnboundedSender<Done>,
}

/// The inbox's ends: jobs in, results out, and the thread to join at exit
/// (it holds the ledger, which must close before the process ends).
pub struct InboxHandle {
    pub jobs: std::sync::mpsc::Sender<Job>,
    pub done: mpsc::UnboundedReceiver<Done>,
    pub thread: std::thread::JoinHandle<()>,
}

pub fn spawn(ledger: Arc<Ledger>, cfg: InboxConfig) -> Result<InboxHandle, crate::NodeError> {
    let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let mut inbox = Inbox {
        ledger,
        cfg,
        banned: HashSet::new(),
        gaps: HashMap::new(),
        awaiting: HashMap::new(),
        named: HashMap::new(),
        out: out_tx,
    };
    let thread = std::thread::Builder::new()
        .name("inbox".into())
        .spawn(move || {
            while let Ok(job) = job_rx.recv() {
                // Checking what peers sent (storing it included) is
                // `verify`; writing our own records and verdicts is `ledger`.
                let stage = match job {
                    Job::Record { .. } | Job::Payload { .. } | Job::Proof { .. } => Some("verify"),
                    Job::Own { .. } | Job::Verdict(_) | Job::Join { .. } => Some("ledger"),
                    _ => None,
                };
                let started = std::time::Instant::now();
                let alive = inbox.handle(job);
                if let (Some(stage), Some(m)) = (stage, inbox.cfg.metrics.as_ref()) {
                    m.stage(stage, started.elapsed());
                }
                if !alive {
                    break;
                }
            }
        })
        .map_err(|e| crate::NodeError::Trainer(format!("cannot start the inbox thread: {e}")))?;
    Ok(InboxHandle {
        jobs: job_tx,
        done: out_rx,
        thread,
    })
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

impl RecordDone {
    fn new(origin: Origin, outcome: Outcome) -> Self {
        Self {
            origin,
            outcome,
            author: None,
            seq: None,
            round: None,
            payload_hash: None,
            contribution: None,
            rejection: None,
            need_payload: false,
            gap_from: None,
            proof: None,
        }
    }

    fn about(mut self, signed: &SignedRecord) -> Self {
        self.author = Some(signed.record.author);
        self.seq = Some(signed.record.seq);
        self.round = Some(signed.record.round);
        self.payload_hash = Some(signed.record.payload_hash);
        self
    }
}

impl Inbox {
    /// Returns false when the event loop is gone.
    fn handle(&mut self, job: Job) -> bool {
        let done = match job {
            Job::Record { bytes, payload, origin } => {
                let mut results = Vec::new();
                self.record(&bytes, payload, origin, &mut results);
                for r in results {
                    if self.out.send(Done::Record(Box::new(r))).is_err() {
                        return false;
                    }
                }
                return true;
            }
            Job::Payload { hash, bytes, from } => Done::Payload {
                hash,
                from,
                result: self.payload(hash, &bytes),
            },
            Job::Own { signed, payload } => match self.own(&signed, &payload) {
                Ok(()) => Done::OwnStored { signed, payload },
                Err(e) => Done::OwnFailed(e.to_string()),
            },
            Job::Verdict(block) => {
                let mut event = self.ledger.begin();
                match event.verdict(&block).map(|_| ()).and_then(|_| event.commit()) {
                    Ok(()) => {
                        let round = block.block.round;
                        if let Err(e) = self.ledger.apply_retention(self.cfg.retention, round) {
                            warn!(error = %e, "payload retention failed");
                        }
                        Done::VerdictStored { round }
                    }
                    Err(e) => Done::VerdictFailed(e.to_string()),
                }
            }
            Job::Proof { bytes, origin } => self.proof(&bytes, origin),
            Job::Join { record, anchor, outer } => {
                let mut event = self.ledger.begin();
                if let Err(e) = event
                    .join(&record, &anchor, &outer)
                    .map(|_| ())
                    .and_then(|_| event.commit())
                {
                    warn!(error = %e, "cannot record the join");
                }
                return true;
            }
            Job::Ban(author) => {
                self.banned.insert(author);
                self.gaps.remove(&author);
                return true;
            }
        };
        self.out.send(done).is_ok()
    }

    fn held_hash(&self, author: &AuthorId, seq: Seq) -> Option<RecordHash> {
        self.ledger.record(author, seq).ok().flatten().map(|r| r.hash())
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
        if self.banned.contains(&author) {
            results.push(RecordDone::new(origin, Outcome::Ignored("banned author")).about(&signed));
            return;
        }
        if signed.record.round >= self.cfg.rounds {
            results.push(RecordDone::new(origin, Outcome::Invalid(RejectReason::Malformed)).about(&signed));
            return;
        }
        let head = self.ledger.head(&author);
        let held = |seq: Seq| self.held_hash(&author, seq);
        match place(signed.clone(), &self.cfg.run_id, head, self.cfg.genesis, held) {
            Ok(Placement::Next(verified)) => {
                let seq = signed.record.seq;
                let done = self.store(verified, payload, origin);
                let stored = self.ledger.head(&author).is_some_and(|h| h.seq == seq);
                results.push(done);
                if stored {
                    self.release_gap(author, results);
                }
            }
            Ok(Placement::Duplicate) => {
                // A payload we were still missing may ride along a duplicate.
                if let Some(p) = payload {
                    if self.awaiting.contains_key(&signed.record.payload_hash) {
                        if let Ok(done) = self.payload(signed.record.payload_hash, &p) {
                            results.push(*done);
                            return;
                        }
                    }
                }
                results.push(RecordDone::new(origin, Outcome::Ignored("duplicate")).about(&signed));
            }
            Ok(Placement::Gap { missing_from }) => {
                let buffer = self.gaps.entry(author).or_default();
                if buffer.len() < GAP_BUFFER_PER_AUTHOR {
                    buffer.insert(signed.record.seq, (signed.clone(), payload));
                }
                let mut done = RecordDone::new(origin, Outcome::Accepted).about(&signed);
                done.gap_from = Some(missing_from);
                results.push(done);
            }
            Err(LedgerError::Equivocation { first, .. }) => {
                let proof = self
                    .ledger
                    .record(&author, signed.record.seq)
                    .ok()
                    .flatten()
                    .filter(|held| held.hash() == first)
                    .map(|held| EquivocationProof::new(held, signed.clone()));
                let mut done = RecordDone::new(origin, Outcome::Invalid(RejectReason::Equivocation)).about(&signed);
                if let Some(p) = &proof {
                    let mut event = self.ledger.begin();
                    if let Err(e) = event.proof(p).map(|_| ()).and_then(|_| event.commit()) {
                        warn!(error = %e, "cannot store an equivocation proof");
                    }
                }
                self.banned.insert(author);
                self.gaps.remove(&author);
                done.rejection = Some(VerdictEntry {
                    author,
                    seq: signed.record.seq,
                    record_hash: signed.hash(),
                    round: signed.record.round,
                    verdict: Verdict::Rejected {
                        reason: RejectReason::Equivocation,
                    },
                });
                done.proof = proof;
                results.push(done);
            }
            Err(e) => {
                let reason = reason_of(&e);
                debug!(%author, error = %e, "record refused");
                let mut done = RecordDone::new(origin, Outcome::Invalid(reason.clone())).about(&signed);
                done.rejection = Some(VerdictEntry {
                    author,
                    seq: signed.record.seq,
                    record_hash: signed.hash(),
                    round: signed.record.round,
                    verdict: Verdict::Rejected { reason },
                });
                results.push(done);
            }
        }
    }

    /// Stores a record that extends its chain, with its payload when that
    /// is present and genuine, in one event.
    fn store(&mut self, verified: VerifiedRecord, payload: Option<Vec<u8>>, origin: Origin) -> RecordDone {
        let signed = verified.signed().clone();
        let rec = &signed.record;
        let mut done = RecordDone::new(origin, Outcome::Accepted).about(&signed);
        // A payload some earlier record already named (still awaited, or
        // stored, which survives restarts) is being replayed.
        let replayed = match self.named.get(&rec.payload_hash) {
            Some(first) => *first != verified.hash(),
            None => self.ledger.has_payload(&rec.payload_hash).unwrap_or(false),
        };
        let checked = if replayed {
            Some(Err(PayloadFault::Author(RejectReason::Replay)))
        } else {
            payload.as_ref().map(|p| check_payload(&signed, p, self.cfg.params))
        };
        let mut event = self.ledger.begin();
        if let Err(e) = event.append(&verified) {
            done.outcome = Outcome::Invalid(reason_of(&e));
            return done;
        }
        self.named.entry(rec.payload_hash).or_insert(verified.hash());
        if replayed {
            // The record stands in the chain; its payload is someone's old one.
            if let Err(e) = event.commit() {
                warn!(error = %e, "ledger write failed");
            }
            done.outcome = Outcome::Invalid(RejectReason::Replay);
            done.rejection = Some(rejection(&signed, RejectReason::Replay));
            return done;
        }
        match (&checked, &payload) {
            (Some(Ok(delta)), Some(p)) => {
                if let Err(e) = event.payload(&rec.payload_hash, rec.round, p) {
                    warn!(error = %e, "payload not stored");
                }
                done.contribution = Some(contribution(&signed, delta.clone()));
            }
            (Some(Err(PayloadFault::Author(reason))), Some(p)) => {
                // Keep the bad payload as evidence for auditors.
                let _ = event.payload(&rec.payload_hash, rec.round, p);
                done.outcome = Outcome::Invalid(reason.clone());
                done.rejection = Some(rejection(&signed, reason.clone()));
            }
            (Some(Err(_)), _) => {
                // Not the payload the record names: the record still stands.
                done.outcome = Outcome::Invalid(RejectReason::PayloadHashMismatch);
                done.need_payload = true;
            }
            _ => done.need_payload = true,
        }
        if let Err(e) = event.commit() {
            warn!(error = %e, "ledger write failed");
            return RecordDone::new(done.origin, Outcome::Ignored("ledger write failed")).about(&signed);
        }
        if done.need_payload {
            self.awaiting.insert(rec.payload_hash, signed.clone());
        }
        if matches!(done.outcome, Outcome::Invalid(RejectReason::PayloadHashMismatch)) {
            // The record is stored and valid; only its carrier lied.
            done.rejection = None;
        }
        done
    }

    /// Processes buffered records of `author` that now extend the chain.
    fn release_gap(&mut self, author: AuthorId, results: &mut Vec<RecordDone>) {
        loop {
            let next = self.ledger.head(&author).map(|h| h.seq.next()).unwrap_or(Seq(0));
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
            let Some((signed, payload)) = buffer.remove(&next) else {
                if buffer.is_empty() {
                    self.gaps.remove(&author);
                }
                return;
            };
            let before = results.len();
            self.record(&signed.to_bytes(), payload, Origin::Buffered, results);
            if results.len() == before {
                return;
            }
        }
    }

    fn payload(&mut self, hash: PayloadHash, bytes: &[u8]) -> Result<Box<RecordDone>, PayloadFault> {
        let signed = self.awaiting.get(&hash).cloned().ok_or(PayloadFault::Unknown)?;
        let checked = check_payload(&signed, bytes, self.cfg.params);
        match checked {
            Err(PayloadFault::NotThePayload) => Err(PayloadFault::NotThePayload),
            Err(PayloadFault::Author(reason)) => {
                self.awaiting.remove(&hash);
                let mut event = self.ledger.begin();
                let _ = event.payload(&hash, signed.record.round, bytes).map(|_| ());
                let _ = event.commit();
                let mut done = RecordDone::new(Origin::Buffered, Outcome::Invalid(reason.clone())).about(&signed);
                done.rejection = Some(rejection(&signed, reason.clone()));
                Ok(Box::new(done))
            }
            Err(PayloadFault::Unknown) => Err(PayloadFault::Unknown),
            Ok(delta) => {
                self.awaiting.remove(&hash);
                let mut event = self.ledger.begin();
                if let Err(e) = event
                    .payload(&hash, signed.record.round, bytes)
                    .map(|_| ())
                    .and_then(|_| event.commit())
                {
                    warn!(error = %e, "payload not stored");
                }
                let mut done = RecordDone::new(Origin::Buffered, Outcome::Accepted).about(&signed);
                done.contribution = Some(contribution(&signed, delta));
                Ok(Box::new(done))
            }
        }
    }

    fn own(&mut self, signed: &SignedRecord, payload: &[u8]) -> Result<(), LedgerError> {
        let head = self.ledger.head(&signed.record.author);
        let verified = VerifiedRecord::extend(signed.clone(), &self.cfg.run_id, head, self.cfg.genesis)?;
        let mut event = self.ledger.begin();
        event
            .append(&verified)?
            .payload(&signed.record.payload_hash, signed.record.round, payload)?
            .sync();
        event.commit()
    }

    fn proof(&mut self, bytes: &[u8], origin: Origin) -> Done {
        let proof = match EquivocationProof::from_bytes(bytes).and_then(|p| p.verify().map(|_| p)) {
            Ok(p) => p,
            Err(e) => {
                debug!(error = %e, "invalid equivocation proof");
                return Done::Proof {
                    origin,
                    outcome: Outcome::Invalid(RejectReason::Malformed),
                    proof: None,
                };
            }
        };
        if proof.first.record.run_id != self.cfg.run_id {
            return Done::Proof {
                origin,
                outcome: Outcome::Invalid(RejectReason::WrongRun),
                proof: None,
            };
        }
        let author = proof.author();
        let known = self.ledger.has_proof_against(&author).unwrap_or(false);
        if !known {
            let mut event = self.ledger.begin();
            if let Err(e) = event.proof(&proof).map(|_| ()).and_then(|_| event.commit()) {
                warn!(error = %e, "cannot store an equivocation proof");
            }
        }
        self.banned.insert(author);
        self.gaps.remove(&author);
        Done::Proof {
            origin,
            outcome: if known {
                Outcome::Ignored("known proof")
            } else {
                Outcome::Accepted
            },
            proof: Some(proof),
        }
    }
}

fn rejection(signed: &SignedRecord, reason: RejectReason) -> VerdictEntry {
    VerdictEntry {
        author: signed.record.author,
        seq: signed.record.seq,
        record_hash: signed.hash(),
        round: signed.record.round,
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
