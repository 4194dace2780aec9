//! Auditing a ledger: every signature, link, verdict, payload and proof.
//!
//! The audit streams the store in key order and never holds more than a few
//! signature batches in memory, so its footprint does not grow with the
//! ledger. Signatures are checked with `ed25519_dalek::verify_batch` on worker
//! threads; a batch that fails is re-checked one signature at a time to name
//! the bad record.

use std::collections::HashMap;
use std::sync::mpsc;

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::chain::Head;
use crate::key::verify_one;
use crate::record::{body_hash, signing_message};
use crate::{
    AuthorId, EquivocationProof, Ledger, LedgerError, PayloadHash, RecordHash, Result, Seq, SignedRecord,
    SignedVerdictBlock, Verdict,
};

/// Signatures verified together in one `verify_batch` call.
pub const SIGNATURE_BATCH: usize = 512;
const MAX_PROBLEMS: usize = 100;

/// One thing found wrong, with where it is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditProblem {
    /// `record`, `head`, `verdict`, `payload`, `proof`, `meta`, or `files`
    /// (a table file that fails its checksums).
    pub kind: String,
    /// The author of the record (or the owner, for verdicts).
    pub author: Option<AuthorId>,
    /// The record's seq, or the verdict block's.
    pub seq: Option<u64>,
    pub detail: String,
}

impl AuditProblem {
    fn sort_key(&self) -> (u8, Option<AuthorId>, Option<u64>) {
        let kind = match self.kind.as_str() {
            "meta" => 0,
            "record" | "head" => 1,
            "verdict" => 2,
            "payload" => 3,
            _ => 4,
        };
        (kind, self.author, self.seq)
    }
}

impl std::fmt::Display for AuditProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(a) = &self.author {
            write!(f, " by {a}")?;
        }
        if let Some(s) = self.seq {
            write!(f, " at seq {s}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// What an audit counted and found. `ok` holds only if `problems` is empty.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AuditReport {
    pub ok: bool,
    pub run_id: String,
    pub owner: String,
    pub authors: u64,
    pub records: u64,
    pub signatures_verified: u64,
    pub signature_batches: u64,
    pub verdict_blocks: u64,
    pub verdict_entries: u64,
    pub merged: u64,
    pub clipped: u64,
    pub rejected: u64,
    /// Updates of keys without a vote, judged but weighing nothing.
    #[serde(default)]
    pub probation: u64,
    pub payloads_checked: u64,
    pub proofs: u64,
    /// Times the node adopted anchor weights from peers.
    pub joins: u64,
    /// Records held per author (hex), as far as each chain is sound.
    pub chain_lengths: std::collections::BTreeMap<String, u64>,
    /// The first problems found, the first broken record first.
    pub problems: Vec<AuditProblem>,
}

impl AuditReport {
    fn problem(&mut self, kind: &str, author: Option<AuthorId>, seq: Option<u64>, detail: impl Into<String>) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(AuditProblem {
                kind: kind.into(),
                author,
                seq,
                detail: detail.into(),
            });
        }
    }

    pub fn first_problem(&self) -> Option<&AuditProblem> {
        self.problems.first()
    }
}

/// A signature awaiting verification, with where it came from.
struct PendingSig {
    kind: &'static str,
    author: AuthorId,
    seq: u64,
    message: Vec<u8>,
    signature: [u8; 64],
}

/// Verifies one batch; returns the entries whose signatures are bad.
fn verify_chunk(chunk: &[PendingSig]) -> Vec<AuditProblem> {
    let mut keys = Vec::with_capacity(chunk.len());
    let mut bad = Vec::new();
    let mut ok_idx = Vec::with_capacity(chunk.len());
    for (i, p) in chunk.iter().enumerate() {
        match VerifyingKey::from_bytes(&p.author.0) {
            Ok(k) => {
                keys.push(k);
                ok_idx.push(i);
            }
            Err(_) => bad.push(i),
        }
    }
    let messages: Vec<&[u8]> = ok_idx.iter().map(|&i| chunk[i].message.as_slice()).collect();
    let sigs: Vec<Signature> = ok_idx
        .iter()
        .map(|&i| Signature::from_bytes(&chunk[i].signature))
        .collect();
    if ed25519_dalek::verify_batch(&messages, &sigs, &keys).is_err() {
        // Fall back to one at a time to name the culprits.
        for &i in &ok_idx {
            let p = &chunk[i];
            let sig = crate::SignatureBytes(p.signature);
            if !verify_one(&p.author, &p.message, &sig) {
                bad.push(i);
            }
        }
    }
    bad.sort_unstable();
    bad.into_iter()
        .map(|i| {
            let p = &chunk[i];
            AuditProblem {
                kind: p.kind.into(),
                author: Some(p.author),
                seq: Some(p.seq),
                detail: "bad signature".into(),
            }
        })
        .collect()
}

/// Feeds signature batches to worker threads, keeping a bounded queue.
struct SigPipeline<'scope> {
    pending: Vec<PendingSig>,
    to_workers: Option<mpsc::SyncSender<Vec<PendingSig>>>,
    from_workers: mpsc::Receiver<(usize, Vec<AuditProblem>)>,
    handles: Vec<std::thread::ScopedJoinHandle<'scope, ()>>,
    verified: u64,
    batches: u64,
}

impl<'scope> SigPipeline<'scope> {
    fn start<'env>(scope: &'scope std::thread::Scope<'scope, 'env>) -> Self {
        let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let (to_workers, work_rx) = mpsc::sync_channel::<Vec<PendingSig>>(workers * 2);
        let work_rx = std::sync::Arc::new(std::sync::Mutex::new(work_rx));
        let (result_tx, from_workers) = mpsc::channel();
        let handles = (0..workers)
            .map(|_| {
                let rx = work_rx.clone();
                let tx = result_tx.clone();
                scope.spawn(move || loop {
                    let next = rx.lock().map(|r| r.recv()).unwrap_or_else(|p| p.into_inner().recv());
                    match next {
                        Ok(chunk) => {
                            let n = chunk.len();
                            if tx.send((n, verify_chunk(&chunk))).is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                })
            })
            .collect();
        Self {
            pending: Vec::with_capacity(SIGNATURE_BATCH),
            to_workers: Some(to_workers),
            from_workers,
            handles,
            verified: 0,
            batches: 0,
        }
    }

    fn push(&mut self, sig: PendingSig, report: &mut AuditReport) {
        self.pending.push(sig);
        if self.pending.len() >= SIGNATURE_BATCH {
            self.flush(report);
        }
    }

    fn flush(&mut self, report: &mut AuditReport) {
        if self.pending.is_empty() {
            return;
        }
        let chunk = std::mem::replace(&mut self.pending, Vec::with_capacity(SIGNATURE_BATCH));
        self.batches += 1;
        if let Some(tx) = &self.to_workers {
            // Workers only stop when the sender is dropped, so this succeeds.
            let _ = tx.send(chunk);
        }
        self.drain(report);
    }

    fn drain(&mut self, report: &mut AuditReport) {
        while let Ok((n, problems)) = self.from_workers.try_recv() {
            self.collect(n, problems, report);
        }
    }

    fn collect(&mut self, n: usize, problems: Vec<AuditProblem>, report: &mut AuditReport) {
        self.verified += n as u64;
        for p in problems {
            report.problem(&p.kind, p.author, p.seq, p.detail);
        }
    }

    fn finish(mut self, report: &mut AuditReport) {
        self.flush(report);
        self.to_workers = None;
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        while let Ok((n, problems)) = self.from_workers.try_recv() {
            self.collect(n, problems, report);
        }
        report.signatures_verified = self.verified;
        report.signature_batches = self.batches;
    }
}

/// Per-author walk state while streaming the records column.
struct ChainWalk {
    author: AuthorId,
    next_seq: Seq,
    prev: RecordHash,
    /// The round of the record before (rounds strictly increase).
    round: Option<u64>,
    broken: bool,
}

/// Audits everything in `ledger`. The report lists problems; `ok` is true
/// only when there are none.
pub fn audit(ledger: &Ledger) -> Result<AuditReport> {
    let meta = ledger.meta().clone();
    let mut report = AuditReport {
        run_id: meta.run_id.to_string(),
        owner: meta.owner.to_string(),
        ..Default::default()
    };
    if let Err(e) = meta.check() {
        report.problem("meta", None, None, e.to_string());
    }
    // Every byte of the tables first: the walk below reads only what it
    // needs (records, payloads, verdicts), not every index or column.
    if let Err(e) = ledger.verify_checksums() {
        report.problem("files", None, None, e.to_string());
    }
    let genesis = meta.genesis_link();
    let heads: HashMap<AuthorId, Head> = ledger.heads().into_iter().collect();
    let mut walked: HashMap<AuthorId, Option<Head>> = HashMap::new();

    std::thread::scope(|scope| -> Result<()> {
        let mut sigs = SigPipeline::start(scope);
        let mut walk: Option<ChainWalk> = None;
        for item in ledger.iter_records()? {
            let (author, seq, bytes) = match item {
                Ok(v) => v,
                Err(e) => {
                    report.problem("record", None, None, e.to_string());
                    continue;
                }
            };
            report.records += 1;
            if walk.as_ref().map(|w| w.author) != Some(author) {
                if let Some(w) = walk.take() {
                    walked.insert(w.author, last_head(&w));
                }
                report.authors += 1;
                walk = Some(ChainWalk {
                    author,
                    next_seq: Seq(0),
                    prev: genesis,
                    round: None,
                    broken: false,
                });
            }
            let Some(w) = walk.as_mut() else { continue };
            let signed = match SignedRecord::from_bytes(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    if !w.broken {
                        report.problem("record", Some(author), Some(seq.0), format!("undecodable: {e}"));
                    }
                    w.broken = true;
                    continue;
                }
            };
            let rec = &signed.record;
            if w.broken {
                continue;
            }
            if rec.author != author || rec.seq != seq {
                report.problem(
                    "record",
                    Some(author),
                    Some(seq.0),
                    format!(
                        "stored under the key of another record ({} seq {})",
                        rec.author, rec.seq
                    ),
                );
                w.broken = true;
                continue;
            }
            if rec.run_id != meta.run_id {
                report.problem(
                    "record",
                    Some(author),
                    Some(seq.0),
                    format!("belongs to run {}", rec.run_id),
                );
                w.broken = true;
                continue;
            }
            if seq != w.next_seq {
                report.problem(
                    "record",
                    Some(author),
                    Some(seq.0),
                    format!("gap: expected seq {}", w.next_seq),
                );
                w.broken = true;
                continue;
            }
            if rec.prev != w.prev {
                report.problem(
                    "record",
                    Some(author),
                    Some(seq.0),
                    format!("prev is {}, expected {}", rec.prev, w.prev),
                );
                w.broken = true;
                continue;
            }
            if w.round.is_some_and(|r| rec.round <= r) {
                report.problem(
                    "record",
                    Some(author),
                    Some(seq.0),
                    format!(
                        "round {} after a record for round {:?}: rounds must increase",
                        rec.round, w.round
                    ),
                );
                w.broken = true;
                continue;
            }
            w.round = Some(rec.round);
            match ledger.payload_len(&rec.payload_hash) {
                Ok(Some(len)) if len != rec.payload_len => report.problem(
                    "record",
                    Some(author),
                    Some(seq.0),
                    format!(
                        "its payload {} has {len} bytes, the record says {}",
                        rec.payload_hash, rec.payload_len
                    ),
                ),
                Ok(_) => {}
                Err(e) => report.problem("payload", Some(author), Some(seq.0), e.to_string()),
            }
            let body = rec.body_bytes();
            w.prev = body_hash(&body);
            w.next_seq = seq.next();
            sigs.push(
                PendingSig {
                    kind: "record",
                    author,
                    seq: seq.0,
                    message: signing_message(&body),
                    signature: signed.signature.0,
                },
                &mut report,
            );
        }
        if let Some(w) = walk.take() {
            walked.insert(w.author, last_head(&w));
        }

        audit_verdicts(ledger, &meta, &mut report, &mut sigs)?;
        sigs.finish(&mut report);
        Ok(())
    })?;

    // Heads must point at the last record of each chain, and only there.
    for (author, head) in &heads {
        match walked.get(author) {
            Some(Some(last)) if last == head => {}
            Some(Some(last)) => report.problem(
                "head",
                Some(*author),
                Some(head.seq.0),
                format!(
                    "head says seq {} {}, chain ends at seq {} {}",
                    head.seq, head.hash, last.seq, last.hash
                ),
            ),
            Some(None) => {} // chain broken at its start; reported above
            None => report.problem(
                "head",
                Some(*author),
                Some(head.seq.0),
                "head points at records that are not stored",
            ),
        }
    }
    for author in walked.keys() {
        if !heads.contains_key(author) {
            report.problem("head", Some(*author), None, "records are stored without a head");
        }
    }

    for item in ledger.iter_payloads()? {
        let (name, bytes) = match item {
            Ok(v) => v,
            Err(e) => {
                report.problem("payload", None, None, e.to_string());
                continue;
            }
        };
        report.payloads_checked += 1;
        let got = PayloadHash::of(&bytes);
        if got != name {
            report.problem("payload", None, None, format!("payload {name} hashes to {got}"));
        }
    }

    match ledger.joins() {
        Ok(joins) => {
            for j in joins {
                report.joins += 1;
                if let Err(e) = j.verify(&meta.run_id) {
                    report.problem("join", None, Some(j.round), e.to_string());
                }
            }
        }
        Err(e) => report.problem("join", None, None, e.to_string()),
    }

    for item in ledger.iter_proofs()? {
        report.proofs += 1;
        let (key, value) = match item {
            Ok(v) => v,
            Err(e) => {
                report.problem("proof", None, None, e.to_string());
                continue;
            }
        };
        match EquivocationProof::from_bytes(&value).and_then(|p| p.verify().map(|_| p)) {
            Ok(p) if key.len() == 40 && key[..32] == p.author().0 => {}
            Ok(p) => report.problem("proof", Some(p.author()), Some(p.seq().0), "stored under another key"),
            Err(e) => report.problem("proof", None, None, format!("key {}: {e}", hex::encode(&key))),
        }
    }

    report.chain_lengths = walked
        .iter()
        .map(|(a, h)| (a.to_string(), h.map_or(0, |h| h.seq.0 + 1)))
        .collect();
    report.problems.sort_by_key(|p| p.sort_key());
    report.ok = report.problems.is_empty();
    Ok(report)
}

fn last_head(w: &ChainWalk) -> Option<Head> {
    (w.next_seq.0 > 0).then(|| Head {
        seq: Seq(w.next_seq.0 - 1),
        hash: w.prev,
        round: w.round.unwrap_or(0),
    })
}

fn audit_verdicts(
    ledger: &Ledger,
    meta: &crate::RunMeta,
    report: &mut AuditReport,
    sigs: &mut SigPipeline<'_>,
) -> Result<()> {
    let owner = meta.owner;
    let mut next = 0u64;
    let mut prev = meta.verdict_genesis();
    let mut last = None;
    for item in ledger.iter_verdicts()? {
        let (seq, bytes) = match item {
            Ok(v) => v,
            Err(e) => {
                report.problem("verdict", Some(owner), None, e.to_string());
                return Ok(());
            }
        };
        report.verdict_blocks += 1;
        let signed = match SignedVerdictBlock::from_bytes(&bytes) {
            Ok(s) => s,
            Err(e) => {
                report.problem("verdict", Some(owner), Some(seq), format!("undecodable: {e}"));
                return Ok(());
            }
        };
        let b = &signed.block;
        let problem = if b.owner != owner {
            Some(format!("signed by {} instead of the owner", b.owner))
        } else if b.run_id != meta.run_id {
            Some(format!("belongs to run {}", b.run_id))
        } else if b.seq != seq || seq != next {
            Some(format!("block seq {} stored at {seq}, expected {next}", b.seq))
        } else if b.prev != prev {
            Some(format!("prev is {}, expected {prev}", b.prev))
        } else {
            None
        };
        if let Some(detail) = problem {
            report.problem("verdict", Some(owner), Some(seq), detail);
            return Ok(());
        }
        for entry in &b.entries {
            report.verdict_entries += 1;
            match &entry.verdict {
                Verdict::Merged { .. } => report.merged += 1,
                Verdict::Clipped { .. } => report.clipped += 1,
                Verdict::Rejected { .. } => report.rejected += 1,
                Verdict::Probation { .. } => report.probation += 1,
            }
            if entry.verdict.is_rejected() {
                continue;
            }
            // What was merged must be in the author's chain, hash for hash.
            match ledger.record(&entry.author, entry.seq) {
                Ok(Some(r)) if r.hash() == entry.record_hash => {}
                Ok(Some(_)) => report.problem(
                    "verdict",
                    Some(owner),
                    Some(seq),
                    format!(
                        "merged record {}/{} differs from the stored one",
                        entry.author, entry.seq
                    ),
                ),
                Ok(None) => report.problem(
                    "verdict",
                    Some(owner),
                    Some(seq),
                    format!("merged record {}/{} is not stored", entry.author, entry.seq),
                ),
                Err(e) => report.problem("verdict", Some(owner), Some(seq), e.to_string()),
            }
        }
        prev = b.hash();
        next = seq + 1;
        last = Some((seq, prev));
        sigs.push(
            PendingSig {
                kind: "verdict",
                author: owner,
                seq,
                message: signed.message(),
                signature: signed.signature.0,
            },
            report,
        );
    }
    match (ledger.verdict_head(), last) {
        (None, None) => {}
        (Some(h), Some((seq, hash))) if h.seq == seq && h.hash == hash => {}
        (h, l) => report.problem(
            "verdict",
            Some(owner),
            None,
            format!(
                "verdict head {:?} does not match the chain's last block {:?}",
                h.map(|h| h.seq),
                l.map(|l| l.0)
            ),
        ),
    }
    Ok(())
}

/// Where two ledgers disagree about one author's chain.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Divergence {
    pub author: AuthorId,
    pub seq: Seq,
    pub left: RecordHash,
    pub right: RecordHash,
    /// Both records carry valid signatures: the author signed two histories.
    pub equivocation: bool,
}

/// How two nodes' anchors compare, round by round: the anchor each went on
/// from after the round, as its verdict chain and repairs name it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AnchorComparison {
    /// Rounds both nodes closed.
    pub rounds_compared: u64,
    pub rounds_differing: u64,
    /// The first round after which the two went on from different anchors.
    pub first_difference: Option<u64>,
    /// The last round both closed, and whether they closed it alike.
    pub last_common_round: Option<u64>,
    pub agree_at_end: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CompareReport {
    /// No chain diverges and the two end on the same anchor.
    pub ok: bool,
    pub shared_authors: u64,
    pub records_compared: u64,
    pub divergences: Vec<Divergence>,
    pub anchors: AnchorComparison,
}

/// One round as a node's verdict block records it: the anchor it
/// aggregated onto (after any repair) and the anchor it ended on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClosedRound {
    pub base: crate::WeightsHash,
    pub anchor: crate::WeightsHash,
}

/// Every round the owner closed, from its verdict blocks.
pub fn closed_rounds(ledger: &Ledger) -> Result<std::collections::BTreeMap<u64, ClosedRound>> {
    let mut out = std::collections::BTreeMap::new();
    for item in ledger.iter_verdicts()? {
        let (_, bytes) = item?;
        let b = crate::SignedVerdictBlock::from_bytes(&bytes)?.block;
        out.insert(
            b.round,
            ClosedRound {
                base: b.base_anchor,
                anchor: b.new_anchor,
            },
        );
    }
    Ok(out)
}

/// Round -> the anchor the owner went on from after it: the base of its
/// next round (after any repair onto the decided anchor), a repair onto the
/// decided final anchor after its last round, or else the anchor it closed
/// the round on. A node that closed a round on a sibling anchor and then
/// repaired agrees with the others.
fn ended_anchors(ledger: &Ledger) -> Result<std::collections::BTreeMap<u64, crate::WeightsHash>> {
    let closed = closed_rounds(ledger)?;
    let joins = ledger.joins()?;
    Ok(closed
        .iter()
        .map(|(round, c)| {
            let next = round + 1;
            let went_on = closed
                .get(&next)
                .map(|n| n.base)
                .or_else(|| joins.iter().rev().find(|j| j.round == next).map(|j| j.anchor))
                .unwrap_or(c.anchor);
            (*round, went_on)
        })
        .collect())
}

/// Compares the anchors two ledgers' owners went on from after each round.
pub fn compare_anchors(left: &Ledger, right: &Ledger) -> Result<AnchorComparison> {
    let (a, b) = (ended_anchors(left)?, ended_anchors(right)?);
    let mut c = AnchorComparison::default();
    for (round, x) in &a {
        let Some(y) = b.get(round) else { continue };
        c.rounds_compared += 1;
        c.last_common_round = Some(*round);
        c.agree_at_end = x == y;
        if x != y {
            c.rounds_differing += 1;
            c.first_difference.get_or_insert(*round);
        }
    }
    if c.rounds_compared == 0 {
        c.agree_at_end = true;
    }
    Ok(c)
}

/// Checks that two ledgers of one run agree on every chain they both hold,
/// over the overlap of the two chains.
pub fn compare(left: &Ledger, right: &Ledger) -> Result<CompareReport> {
    if left.meta().run_id != right.meta().run_id {
        return Err(LedgerError::OtherRun {
            path: right.path().to_path_buf(),
            expected: left.meta().run_id,
            found: right.meta().run_id,
        });
    }
    let mut report = CompareReport::default();
    let right_heads: HashMap<AuthorId, Head> = right.heads().into_iter().collect();
    for (author, lh) in left.heads() {
        let Some(rh) = right_heads.get(&author) else {
            continue;
        };
        report.shared_authors += 1;
        let end = lh.seq.0.min(rh.seq.0);
        let mut seq = 0u64;
        while seq <= end {
            let want = ((end - seq + 1) as usize).min(1024);
            let a = left.records_from(&author, Seq(seq), want)?;
            let b = right.records_from(&author, Seq(seq), want)?;
            if a.is_empty() || b.is_empty() {
                break;
            }
            for (x, y) in a.iter().zip(&b) {
                report.records_compared += 1;
                let (hx, hy) = (x.hash(), y.hash());
                if hx != hy {
                    let equivocation = EquivocationProof::new(x.clone(), y.clone()).verify().is_ok();
                    report.divergences.push(Divergence {
                        author,
                        seq: x.record.seq,
                        left: hx,
                        right: hy,
                        equivocation,
                    });
                    break;
                }
            }
            seq += a.len().min(b.len()) as u64;
            if report.divergences.last().is_some_and(|d| d.author == author) {
                break;
            }
        }
    }
    report.anchors = compare_anchors(left, right)?;
    report.ok = report.divergences.is_empty() && report.anchors.agree_at_end;
    Ok(report)
}

/// One line of `ledger export`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ExportLine {
    Meta {
        run_id: String,
        owner: String,
        genesis_weights: String,
    },
    Record {
        hash: RecordHash,
        #[serde(flatten)]
        signed: SignedRecord,
    },
    Verdict {
        hash: crate::VerdictHash,
        #[serde(flatten)]
        signed: SignedVerdictBlock,
    },
    Proof(Box<EquivocationProof>),
}

/// Writes the ledger as JSON lines: meta, records, verdict blocks, proofs.
pub fn export(ledger: &Ledger, out: &mut dyn std::io::Write) -> Result<u64> {
    let io = |e: std::io::Error| LedgerError::Malformed {
        what: "export output",
        detail: e.to_string(),
    };
    let write = |line: &ExportLine, out: &mut dyn std::io::Write| -> Result<()> {
        serde_json::to_writer(&mut *out, line).map_err(|e| io(e.into()))?;
        out.write_all(b"\n").map_err(io)
    };
    let meta = ledger.meta();
    write(
        &ExportLine::Meta {
            run_id: meta.run_id.to_string(),
            owner: meta.owner.to_string(),
            genesis_weights: meta.genesis_weights.to_string(),
        },
        out,
    )?;
    let mut lines = 1u64;
    for item in ledger.iter_records()? {
        let (_, _, bytes) = item?;
        let signed = SignedRecord::from_bytes(&bytes)?;
        write(
            &ExportLine::Record {
                hash: signed.hash(),
                signed,
            },
            out,
        )?;
        lines += 1;
    }
    for item in ledger.iter_verdicts()? {
        let (_, bytes) = item?;
        let signed = SignedVerdictBlock::from_bytes(&bytes)?;
        write(
            &ExportLine::Verdict {
                hash: signed.block.hash(),
                signed,
            },
            out,
        )?;
        lines += 1;
    }
    for proof in ledger.proofs()? {
        write(&ExportLine::Proof(Box::new(proof)), out)?;
        lines += 1;
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::key;
    use crate::store::tests::{meta_for, rec};
    use crate::store::{CF_HEADS, CF_PAYLOADS, CF_PROOFS, CF_RECORDS, CF_VERDICTS};
    use crate::{StoreOptions, VerdictBlock, VerdictEntry, VerifiedRecord, VERDICT_VERSION};

    /// A small but complete ledger: 3 authors x 5 records with payloads, two
    /// verdict blocks and an equivocation proof.
    fn populated(dir: &std::path::Path) -> Ledger {
        let owner = key(1);
        let meta = meta_for(&owner);
        let ledger = Ledger::open_or_create(dir, &meta, StoreOptions::default()).unwrap();
        let mut merged = Vec::new();
        for a in 2..5u8 {
            let k = key(a);
            let mut prev = meta.genesis_link();
            for seq in 0..5u64 {
                let payload = vec![a; 10 + seq as usize];
                let r = rec(&meta, &k, seq, prev, &payload);
                let v = VerifiedRecord::extend(r.clone(), &meta.run_id, ledger.head(&k.author()), meta.genesis_link())
                    .unwrap();
                prev = v.hash();
                let mut ev = ledger.begin();
                ev.append(&v)
                    .unwrap()
                    .payload(&r.record.payload_hash, seq, &payload)
                    .unwrap();
                ev.commit().unwrap();
                if seq < 2 {
                    merged.push((k.author(), Seq(seq), v.hash(), seq));
                }
            }
        }
        let mut prev = meta.verdict_genesis();
        for round in 0..2u64 {
            let block = VerdictBlock {
                version: VERDICT_VERSION,
                run_id: meta.run_id,
                owner: owner.author(),
                seq: round,
                prev,
                round,
                base_anchor: crate::WeightsHash([round as u8; 32]),
                base_outer: crate::WeightsHash([0; 32]),
                new_anchor: crate::WeightsHash([round as u8 + 1; 32]),
                outer_state: crate::WeightsHash([0; 32]),
                entries: merged
                    .iter()
                    .filter(|m| m.3 == round)
                    .map(|(a, s, h, r)| VerdictEntry {
                        author: *a,
                        seq: *s,
                        record_hash: *h,
                        round: *r,
                        prior: 0.0,
                        verdict: Verdict::Merged { weight: 1.0 / 3.0 },
                    })
                    .collect(),
            }
            .sign(&owner);
            prev = block.block.hash();
            let mut ev = ledger.begin();
            ev.verdict(&block).unwrap();
            ev.commit().unwrap();
        }
        let liar = key(9);
        let a = rec(&meta, &liar, 3, crate::RecordHash([1; 32]), b"x");
        let b = rec(&meta, &liar, 3, crate::RecordHash([2; 32]), b"y");
        let mut ev = ledger.begin();
        ev.proof(&EquivocationProof::new(a, b)).unwrap();
        ev.commit().unwrap();
        ledger
    }

    #[test]
    fn a_sound_ledger_passes() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = populated(dir.path());
        let r = audit(&ledger).unwrap();
        assert!(r.ok, "{:?}", r.problems);
        assert_eq!(
            (r.records, r.authors, r.verdict_blocks, r.proofs, r.payloads_checked),
            (15, 3, 2, 1, 15)
        );
        assert_eq!(r.signatures_verified, 17);
        assert!(r.chain_lengths.values().all(|&n| n == 5));
    }

    /// Every single flipped byte in every stored record is caught, and the
    /// first problem names that record.
    #[test]
    fn every_flipped_record_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = populated(dir.path());
        let mut flips = 0;
        for key in ledger.raw_keys(CF_RECORDS) {
            let original = ledger.raw_get(CF_RECORDS, &key).unwrap();
            let (author, seq) = crate::store::tests::split(&key);
            for i in 0..original.len() {
                let mut bad = original.clone();
                bad[i] ^= 0xff;
                ledger.raw_put(CF_RECORDS, &key, &bad);
                let r = audit(&ledger).unwrap();
                assert!(!r.ok, "flip of byte {i} in {author}/{seq} went unnoticed");
                let first = r.first_problem().unwrap();
                assert_eq!(
                    (first.author, first.seq),
                    (Some(author), Some(seq.0)),
                    "byte {i}: {first}"
                );
                flips += 1;
            }
            ledger.raw_put(CF_RECORDS, &key, &original);
        }
        assert!(flips > 1000, "{flips}");
        assert!(audit(&ledger).unwrap().ok);
    }

    #[test]
    fn flipped_verdicts_heads_payloads_and_proofs_are_caught() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = populated(dir.path());
        for column in [CF_VERDICTS, CF_HEADS, CF_PAYLOADS, CF_PROOFS] {
            for key in ledger.raw_keys(column) {
                let original = ledger.raw_get(column, &key).unwrap();
                for i in 0..original.len() {
                    let mut bad = original.clone();
                    bad[i] ^= 0xff;
                    ledger.raw_put(column, &key, &bad);
                    // Heads are cached when a ledger opens: reopen to see them.
                    let r = if column == CF_HEADS {
                        let path = ledger.path().to_path_buf();
                        match Ledger::open_read_only(&path) {
                            Ok(l) => audit(&l).unwrap(),
                            Err(_) => continue, // refusing to open is catching it too
                        }
                    } else {
                        audit(&ledger).unwrap()
                    };
                    assert!(!r.ok, "flip of byte {i} in {column} went unnoticed");
                }
                ledger.raw_put(column, &key, &original);
            }
        }
    }

    /// Bytes flipped anywhere in the table files (the heads, the indexes,
    /// the columns no walk reads) are reported, naming the file.
    #[test]
    fn flipped_bytes_anywhere_in_the_table_files_are_caught() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = populated(dir.path());
        ledger.flush_tables();
        drop(ledger);
        let tables: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "sst"))
            .collect();
        assert!(tables.len() >= 7, "a table per column: {tables:?}");
        let mut tried = 0;
        for table in &tables {
            let original = std::fs::read(table).unwrap();
            let name = table.file_name().unwrap().to_string_lossy().into_owned();
            // Spread over the file, and every byte of its tail (index,
            // meta blocks, footer).
            let tail = original.len().saturating_sub(160);
            let spread = (0..original.len()).step_by((original.len() / 24).max(1));
            for i in spread.chain(tail..original.len()) {
                let mut bad = original.clone();
                bad[i] ^= 0x5a;
                std::fs::write(table, &bad).unwrap();
                tried += 1;
                let report = match Ledger::open_read_only(dir.path()) {
                    Ok(l) => audit(&l).unwrap(),
                    Err(_) => continue, // refusing to open is catching it too
                };
                assert!(!report.ok, "flip of byte {i} of {name} went unnoticed");
                assert!(
                    report.problems.iter().any(|p| p.detail.contains(&name)),
                    "flip of byte {i} of {name}: no problem names the file: {:?}",
                    report.problems
                );
            }
            std::fs::write(table, &original).unwrap();
        }
        assert!(tried > 1000, "{tried}");
        assert!(audit(&Ledger::open_read_only(dir.path()).unwrap()).unwrap().ok);
    }

    #[test]
    fn compare_finds_equivocation_between_ledgers() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let left = populated(d1.path());
        let right = populated(d2.path());
        let same = compare(&left, &right).unwrap();
        assert!(
            same.ok && same.shared_authors == 3 && same.records_compared == 15,
            "{same:?}"
        );

        // The same author signs a different seq 3 in the right ledger's view.
        let meta = right.meta().clone();
        let d3 = tempfile::tempdir().unwrap();
        let forked = Ledger::open_or_create(d3.path(), &meta, StoreOptions::default()).unwrap();
        let k = key(2);
        let mut prev = meta.genesis_link();
        for seq in 0..5u64 {
            let payload = if seq == 3 {
                vec![0xee; 4]
            } else {
                vec![2; 10 + seq as usize]
            };
            let r = rec(&meta, &k, seq, prev, &payload);
            let v = VerifiedRecord::extend(r, &meta.run_id, forked.head(&k.author()), meta.genesis_link()).unwrap();
            prev = v.hash();
            let mut ev = forked.begin();
            ev.append(&v).unwrap();
            ev.commit().unwrap();
        }
        let diff = compare(&left, &forked).unwrap();
        assert!(!diff.ok);
        assert_eq!(diff.divergences.len(), 1);
        assert_eq!(diff.divergences[0].seq, Seq(3));
        assert!(diff.divergences[0].equivocation);
    }

    #[test]
    fn export_writes_one_json_line_per_item() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = populated(dir.path());
        let mut out = Vec::new();
        let lines = export(&ledger, &mut out).unwrap();
        assert_eq!(lines, 1 + 15 + 2 + 1);
        let text = String::from_utf8(out).unwrap();
        let parsed: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(parsed[0]["type"], "meta");
        assert_eq!(parsed[1]["type"], "record");
        assert_eq!(parsed[1]["record"]["seq"], 0);
        assert_eq!(parsed[16]["type"], "verdict");
        assert_eq!(parsed[16]["block"]["entries"][0]["verdict"]["verdict"], "merged");
        assert_eq!(parsed[18]["type"], "proof");
    }
}
