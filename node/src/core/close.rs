//! Closing a round: the moment the last expected update or the deadline
//! arrives (no polling), the robust aggregation (run off the event loop),
//! and the signed verdict block that records what was done with each update
//! and which anchor came of it.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use meshtrain_ledger::{AuthorId, RejectReason, Verdict, VerdictBlock, VerdictEntry, WeightsHash, VERDICT_VERSION};
use meshtrain_model::aggregate::aggregate as aggregate_deltas;
use meshtrain_model::{AggInput, AggVerdict, AggregatorSpec, OuterOptimizer};
use tracing::info;

use super::rounds::{Close, RoundInputs};
use super::sync::SyncReason;
use super::{AnchorSnapshot, Core, Effect, Phase, RoundClosed, Timer};
use crate::inbox::Job;

/// Rounds between a join and the next minority sync.
const MINORITY_SYNC_GAP: u64 = 3;
/// How often a waiting node looks whether the mesh left it behind.
const BEHIND_CHECK_MS: u64 = 1000;

/// One round's aggregation, for a worker thread (or inline, simulated).
#[derive(Debug)]
pub struct AggregateJob {
    pub spec: AggregatorSpec,
    pub anchor: Arc<Vec<f32>>,
    pub inputs: RoundInputs,
    pub outer: OuterOptimizer,
    pub me: AuthorId,
    pub wait_ms: u64,
}

/// What a round's aggregation produced.
#[derive(Debug)]
pub struct AggregateDone {
    pub round: u64,
    pub anchor: Vec<f32>,
    pub outer: OuterOptimizer,
    pub entries: Vec<VerdictEntry>,
    pub wait_ms: u64,
}

impl std::fmt::Debug for RoundInputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoundInputs")
            .field("round", &self.round)
            .field("inputs", &self.inputs.len())
            .field("rejections", &self.rejections.len())
            .finish()
    }
}

impl Core {
    /// Closes the current round if every expected update is in or its
    /// deadline passed. Called whenever either may have changed.
    pub(super) fn maybe_close(&mut self) {
        if !matches!(self.phase, Phase::Waiting(_)) {
            return;
        }
        let expected = self.book.expected(&self.connected_authors());
        let Some(how) = self.book.should_close(self.now, &expected) else {
            return;
        };
        if how == Close::Deadline {
            let have: HashSet<AuthorId> = self.book.for_round(self.round()).map(|c| c.author).collect();
            let missing: Vec<String> = expected.difference(&have).map(|a| a.short()).collect();
            info!(round = self.round(), ?missing, "round deadline passed");
        }
        let inputs = self.book.close(self.now, how);
        self.check_minority(&inputs);
        self.aggregate(inputs);
    }

    fn aggregate(&mut self, inputs: RoundInputs) {
        let Some(outer) = self.outer.take() else {
            return;
        };
        let Phase::Waiting(note) = std::mem::replace(&mut self.phase, Phase::Training) else {
            return;
        };
        let wait_ms = self.now.saturating_sub(self.phase_since);
        self.set_phase(Phase::Aggregating(note));
        self.emit(Effect::Aggregate(Box::new(AggregateJob {
            spec: self.cfg.spec.exchange.aggregator,
            anchor: self.anchor.clone(),
            inputs,
            outer,
            me: self.me,
            wait_ms,
        })));
    }

    pub(super) fn on_aggregated(&mut self, done: AggregateDone) {
        let Phase::Aggregating(note) = std::mem::replace(&mut self.phase, Phase::Training) else {
            return;
        };
        let base = self.anchor_hash;
        let new_hash = WeightsHash::of_f32(&done.anchor);
        let (mut merged, mut clipped, mut rejected) = (0u64, 0u64, 0u64);
        let mut bans = Vec::new();
        for e in &done.entries {
            if e.author == self.me {
                continue;
            }
            let from_aggregator =
                !matches!(&e.verdict, Verdict::Rejected { reason } if !matches!(reason, RejectReason::Outlier(_)));
            if from_aggregator {
                if let Some(ban) = self.reputation.observe(e.author, &e.verdict) {
                    bans.push((e.author, ban));
                }
            }
            let who = e.author.to_string();
            match &e.verdict {
                Verdict::Merged { .. } => {
                    merged += 1;
                    self.emit(Effect::Counted {
                        outcome: "merged",
                        reason: "",
                    });
                    *self.counters.merged_by_author.entry(who).or_default() += 1;
                }
                Verdict::Clipped { .. } => {
                    clipped += 1;
                    self.emit(Effect::Counted {
                        outcome: "clipped",
                        reason: "",
                    });
                    *self.counters.clipped_by_author.entry(who).or_default() += 1;
                }
                Verdict::Rejected { reason } => {
                    rejected += 1;
                    if matches!(reason, RejectReason::Outlier(_)) {
                        self.count_rejection(reason.code(), Some(&e.author));
                    }
                }
            }
        }
        self.counters.merged += merged;
        self.counters.clipped += clipped;
        let (seq, prev) = match self.verdict_head {
            None => (0, self.cfg.verdict_genesis),
            Some((s, h)) => (s + 1, h),
        };
        let block = VerdictBlock {
            version: VERDICT_VERSION,
            run_id: self.cfg.run_id,
            owner: self.me,
            seq,
            prev,
            round: done.round,
            base_anchor: base,
            new_anchor: new_hash,
            outer_state: WeightsHash::of_f32(done.outer.velocity()),
            entries: done.entries,
        }
        .sign(&self.key);
        self.verdict_head = Some((seq, block.block.hash()));
        self.attestation = Some(block.clone());
        self.emit(Effect::Inbox(Job::Verdict(Box::new(block))));
        self.velocity = Arc::new(done.outer.velocity().to_vec());
        self.anchor = Arc::new(done.anchor);
        self.anchor_hash = new_hash;
        self.outer = Some(done.outer);
        info!(
            round = done.round,
            merged = merged + 1,
            clipped,
            rejected,
            wait_ms = done.wait_ms,
            anchor = %new_hash.short(),
            "round closed"
        );
        self.emit(Effect::RoundClosed(Box::new(RoundClosed {
            round: done.round,
            eval: note.eval,
            stats: note.stats,
            train_ms: note.train_ms,
            wait_ms: done.wait_ms,
            merged: merged + 1,
            clipped,
            rejected,
            anchor_hash: new_hash,
            members: self.members.len(),
        })));
        for (author, ban) in bans {
            self.ban(author, &ban.to_string());
        }
        if let Some((offer, attestations)) = self.pending_adoption.take() {
            if offer.round >= self.round() {
                self.adopt(*offer, attestations);
            }
        }
        if self.cfg.checkpoint_every > 0 && self.round().is_multiple_of(self.cfg.checkpoint_every) {
            self.emit(Effect::Checkpoint {
                round: self.round(),
                anchor: self.anchor.clone(),
                velocity: self.velocity.to_vec(),
            });
        }
        self.next_round_or_finish();
    }

    /// Our anchor for a peer that asks, unless it is being replaced.
    pub(super) fn anchor_snapshot(&self) -> Option<AnchorSnapshot> {
        self.outer.as_ref()?;
        Some(AnchorSnapshot {
            round: self.round(),
            anchor_hash: self.anchor_hash,
            weights: self.anchor.clone(),
            velocity: self.velocity.clone(),
            attestation: self.attestation.clone(),
        })
    }

    /// After a partition heals, the halves' updates are built on different
    /// anchors. Every node sees the same groups; the smaller group (ties:
    /// the larger anchor hash) takes the larger one's anchor over.
    fn check_minority(&mut self, inputs: &RoundInputs) {
        let mut groups: BTreeMap<WeightsHash, Vec<AuthorId>> = BTreeMap::new();
        for (c, _) in inputs.inputs.iter().filter(|(c, _)| c.round == inputs.round) {
            groups.entry(c.base).or_default().push(c.author);
        }
        if groups.len() < 2 {
            return;
        }
        let mine = groups.get(&self.anchor_hash).map_or(0, Vec::len);
        let Some((best, authors)) = groups
            .iter()
            .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(a.0)))
        else {
            return;
        };
        let we_lose =
            *best != self.anchor_hash && (authors.len() > mine || (authors.len() == mine && *best < self.anchor_hash));
        // A node that just took an anchor over gives the mesh a few rounds
        // to settle before it second-guesses it.
        let settled = self.joins.last().is_none_or(|j| inputs.round >= j + MINORITY_SYNC_GAP);
        if we_lose && settled && authors.len() >= 2 && self.sync.is_none() {
            tracing::warn!(
                round = inputs.round,
                ours = mine,
                theirs = authors.len(),
                "our anchor is the minority's; syncing to the majority"
            );
            let among = authors.clone();
            self.start_sync(SyncReason::Minority, Some(&among), None);
        }
    }

    /// Waiting on a round while two or more members already sign records
    /// two rounds further on (a restart into a mesh that moved on): ask for
    /// the mesh's anchor instead of waiting out the deadline.
    pub(super) fn check_behind(&mut self) {
        if !matches!(self.phase, Phase::Waiting(_)) {
            return;
        }
        self.arm(Timer::Behind, self.now + BEHIND_CHECK_MS);
        if self.sync.is_some() || self.now.saturating_sub(self.phase_since) < 2000 {
            return;
        }
        let round = self.round();
        let ahead = self
            .connected_authors()
            .iter()
            .filter(|a| self.head_round(a).is_some_and(|r| r >= round + 2))
            .count();
        if ahead >= 2 {
            info!(
                round,
                ahead, "members are rounds ahead of us; asking for the mesh's anchor"
            );
            self.start_sync(SyncReason::Start, None, None);
        }
    }
}

/// Aggregates one round and steps the anchor: a pure function, run on a
/// worker thread by the node and inline by the simulator.
pub fn run_aggregation(job: AggregateJob) -> AggregateDone {
    let AggregateJob {
        spec,
        anchor,
        inputs,
        mut outer,
        me,
        wait_ms,
    } = job;
    let agg_inputs: Vec<AggInput<'_>> = inputs
        .inputs
        .iter()
        .map(|(c, w)| AggInput {
            delta: c.delta.as_slice(),
            weight: *w,
        })
        .collect();
    let own = inputs
        .inputs
        .iter()
        .position(|(c, _)| c.author == me && c.round == inputs.round);
    let result = aggregate_deltas(spec, &agg_inputs, own);
    let mut new_anchor = anchor.to_vec();
    if !result.update.is_empty() {
        outer.step(&mut new_anchor, &result.update);
    }
    let mut entries: Vec<VerdictEntry> = inputs
        .inputs
        .iter()
        .zip(&result.verdicts)
        .map(|((c, _), v)| VerdictEntry {
            author: c.author,
            seq: c.seq,
            record_hash: c.record_hash,
            round: c.round,
            verdict: match v {
                AggVerdict::Merged { weight } => Verdict::Merged { weight: *weight },
                AggVerdict::Clipped { factor, weight } => Verdict::Clipped {
                    factor: *factor,
                    weight: *weight,
                },
                AggVerdict::Rejected { reason } => Verdict::Rejected {
                    reason: RejectReason::Outlier(reason.clone()),
                },
            },
        })
        .collect();
    entries.extend(inputs.rejections);
    AggregateDone {
        round: inputs.round,
        anchor: new_anchor,
        outer,
        entries,
        wait_ms,
    }
}
