//! Taking over an anchor this node did not compute: at start (a late join or
//! a restart), when the mesh has left it behind, and when the anchor half
//! or more of the voting power signed for a round differs from its own
//! (a repair; see [`super::agreement`]).
//!
//! Nothing is taken on a peer's word. At start the node asks members for
//! their anchor; each answer carries the answering member's own signed
//! verdict block, which counts as that member's vote. An anchor is taken
//! only when it is decided by voting power, and its weights and outer state
//! are checked against the hashes the votes name before they are used.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use meshtrain_gossip::libp2p::PeerId;
use meshtrain_gossip::{FetchRequest, FetchResponse};
use meshtrain_ledger::{
    AuthorId, JoinKind, JoinRecord, PayloadHash, RejectReason, RunId, SignedVerdictBlock, Vote, WeightsHash,
};
use meshtrain_model::{codec, CodecSpec};
use rand::seq::SliceRandom;
use tracing::{debug, info, warn};

use super::agreement::{AnchorKey, Tally};
use super::members::author_of;
use super::start::short;
use super::{AnchorSnapshot, Core, Effect, Millis, Phase, RequestFor, Timer};
use crate::inbox::Job;

/// How long a start sync waits for answers.
const SYNC_WAIT_MS: Millis = 5000;
/// Members asked at once at start.
const SYNC_FANOUT: usize = 8;
/// Asks before a node that sees members ahead of it, without a decided
/// anchor, starts from its own (peers caught between rounds answer
/// differently; a moment later they agree).
const SYNC_ATTEMPTS: u32 = 40;
/// Pause between asks.
const SYNC_RETRY_MS: Millis = 300;
/// Anchors kept for peers that fetch them (ours, newest last).
const SNAPSHOTS_KEPT: usize = 3;
/// How long an anchor fetch may take before the next voter is asked.
const FETCH_ATTEMPT_MS: Millis = 10_000;

/// An answer to a start sync, decoded and checked.
#[derive(Clone, Debug)]
pub struct Offer {
    /// The round the anchor starts.
    pub round: u64,
    pub anchor_hash: WeightsHash,
    pub outer_hash: WeightsHash,
    pub weights: Arc<Vec<f32>>,
    pub velocity: Vec<f32>,
    /// The answering member's verdict block naming this anchor (none for
    /// genesis).
    pub attestation: Option<SignedVerdictBlock>,
    pub weights_bytes: Vec<u8>,
    pub outer_bytes: Vec<u8>,
}

impl Offer {
    fn key(&self) -> AnchorKey {
        (self.anchor_hash, self.outer_hash)
    }

    fn into_fetched(self) -> Fetched {
        Fetched {
            starts: self.round,
            key: (self.anchor_hash, self.outer_hash),
            weights: self.weights,
            velocity: self.velocity,
            weights_bytes: self.weights_bytes,
            outer_bytes: self.outer_bytes,
        }
    }
}

/// An anchor fetched from a voter and checked against the voted hashes.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub starts: u64,
    pub key: AnchorKey,
    pub weights: Arc<Vec<f32>>,
    pub velocity: Vec<f32>,
    pub weights_bytes: Vec<u8>,
    pub outer_bytes: Vec<u8>,
}

/// Why an anchor is fetched, which decides when it is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Before the first round (a late join or a restart).
    Start,
    /// Our base for the current round is not the decided one.
    Repair,
    /// The mesh decided anchors two or more rounds ahead of ours.
    Behind,
    /// The run's last anchor.
    Final,
    /// The latest decided anchor, to go back to after a split.
    Revert,
}

impl Purpose {
    fn join_kind(self) -> JoinKind {
        match self {
            Purpose::Start => JoinKind::Start,
            Purpose::Behind => JoinKind::Behind,
            Purpose::Repair | Purpose::Final => JoinKind::Repair,
            Purpose::Revert => JoinKind::Revert,
        }
    }
}

/// A decided anchor being fetched from its voters, one at a time.
pub struct AnchorFetch {
    pub starts: u64,
    pub key: AnchorKey,
    pub purpose: Purpose,
    candidates: VecDeque<PeerId>,
    in_flight: Option<PeerId>,
    pub since: Millis,
}

/// A start sync: members asked for their anchor.
pub struct AnchorSync {
    asked: HashSet<PeerId>,
    answered: HashSet<PeerId>,
    /// Answers handed off to be checked, not back yet.
    checking: usize,
    offers: Vec<Offer>,
    started: Millis,
    attempt: u32,
    retry_at: Option<Millis>,
}

/// Checks a start-sync answer: decodable, and (past round 0) attested by
/// a signed verdict block of this run naming exactly these weights and
/// state. Heavy (it decodes the whole anchor): the node runs it on a
/// worker thread.
pub fn check_offer(
    run_id: &RunId,
    genesis: &WeightsHash,
    params: usize,
    response: FetchResponse,
) -> Result<Offer, String> {
    let FetchResponse::Anchor {
        round,
        weights,
        outer,
        verdict,
    } = response
    else {
        return Err("not an anchor".into());
    };
    let (w, v) = decode_anchor(&weights, &outer, params)?;
    let anchor_hash = WeightsHash::of_f32(&w);
    let outer_hash = WeightsHash::of_f32(&v);
    let attestation = if round == 0 {
        if anchor_hash != *genesis {
            return Err("round 0 but not the genesis weights".into());
        }
        None
    } else if verdict.is_empty() {
        // A member that took its anchor over from others holds no block of
        // its own for it: an honest answer that vouches for nothing.
        None
    } else {
        let block = SignedVerdictBlock::from_bytes(&verdict).map_err(|e| e.to_string())?;
        block.verify_signature().map_err(|e| e.to_string())?;
        let b = &block.block;
        if b.run_id != *run_id {
            return Err("attested by a block of another run".into());
        }
        if b.new_anchor != anchor_hash || b.outer_state != outer_hash || b.round.checked_add(1) != Some(round) {
            return Err(format!(
                "the verdict block (round {}, anchor {}, outer {}) attests other weights or another round than the offer (round {round}, anchor {}, outer {})",
                b.round,
                b.new_anchor.short(),
                b.outer_state.short(),
                anchor_hash.short(),
                outer_hash.short()
            ));
        }
        Some(block)
    };
    Ok(Offer {
        round,
        anchor_hash,
        outer_hash,
        weights: Arc::new(w),
        velocity: v,
        attestation,
        weights_bytes: weights,
        outer_bytes: outer,
    })
}

/// Checks a fetched anchor against the hashes its voters signed. Heavy, like
/// [`check_offer`].
pub fn check_fetched(starts: u64, key: AnchorKey, params: usize, response: FetchResponse) -> Result<Fetched, String> {
    let FetchResponse::Anchor { weights, outer, .. } = response else {
        return Err("not an anchor".into());
    };
    let (w, v) = decode_anchor(&weights, &outer, params)?;
    if (WeightsHash::of_f32(&w), WeightsHash::of_f32(&v)) != key {
        return Err("the weights or outer state do not hash to what the votes name".into());
    }
    Ok(Fetched {
        starts,
        key,
        weights: Arc::new(w),
        velocity: v,
        weights_bytes: weights,
        outer_bytes: outer,
    })
}

fn decode_anchor(weights: &[u8], outer: &[u8], params: usize) -> Result<(Vec<f32>, Vec<f32>), String> {
    let w = codec::decode(weights, params).map_err(|e| format!("weights: {e}"))?;
    let v = match codec::peek_len(outer) {
        Ok(0) => Vec::new(),
        _ => codec::decode(outer, params).map_err(|e| format!("outer state: {e}"))?,
    };
    Ok((w, v))
}

/// Our anchor as it goes on the wire (the shell caches this per anchor).
pub fn encode_anchor(snapshot: &AnchorSnapshot) -> FetchResponse {
    FetchResponse::Anchor {
        round: snapshot.round,
        weights: codec::encode(CodecSpec::Dense, &snapshot.weights),
        outer: codec::encode(CodecSpec::Dense, &snapshot.velocity),
        verdict: snapshot.attestation.as_ref().map(|v| v.to_bytes()).unwrap_or_default(),
    }
}

impl Core {
    /// Asks members where the mesh is (at start).
    pub(super) fn start_sync(&mut self) {
        if self.sync.is_none() {
            self.ask_anchors(1);
        }
    }

    fn ask_anchors(&mut self, attempt: u32) {
        let mut peers: Vec<PeerId> = self.voters_by_author().into_values().collect();
        peers.shuffle(&mut self.rng);
        peers.truncate(SYNC_FANOUT);
        if peers.is_empty() {
            if attempt >= SYNC_ATTEMPTS {
                warn!(
                    round = self.round(),
                    "no member to ask where the mesh is; starting from our anchor"
                );
                if matches!(self.phase, Phase::Syncing) {
                    self.begin_rounds();
                }
                return;
            }
            // Nobody connected right now (a partition, or peers restarting):
            // ask again in a moment.
            self.sync = Some(AnchorSync {
                asked: HashSet::new(),
                answered: HashSet::new(),
                checking: 0,
                offers: Vec::new(),
                started: self.now,
                attempt,
                retry_at: Some(self.now + SYNC_RETRY_MS),
            });
            self.arm(Timer::Sync, self.now + SYNC_RETRY_MS);
            return;
        }
        for p in &peers {
            self.request(*p, FetchRequest::Anchor { weights: None }, RequestFor::Anchor);
        }
        info!(
            round = self.round(),
            asked = peers.len(),
            attempt,
            "asking members for their anchor"
        );
        self.sync = Some(AnchorSync {
            asked: peers.into_iter().collect(),
            answered: HashSet::new(),
            checking: 0,
            offers: Vec::new(),
            started: self.now,
            attempt,
            retry_at: None,
        });
        self.arm(Timer::Sync, self.now + SYNC_WAIT_MS);
    }

    /// An answer to an anchor request: for the start sync or for a fetch.
    pub(super) fn on_anchor_response(&mut self, peer: PeerId, response: FetchResponse) {
        if let Some(f) = self.fetch.as_mut().filter(|f| f.in_flight == Some(peer)) {
            if matches!(response, FetchResponse::Anchor { .. }) {
                let (starts, key) = (f.starts, f.key);
                self.emit(Effect::CheckAnchor {
                    peer,
                    starts,
                    key,
                    response,
                });
            } else {
                self.anchor_fetch_failed(peer, "refused");
            }
            return;
        }
        let Some(sync) = self.sync.as_mut() else { return };
        tracing::trace!(peer = %short(&peer), anchor = matches!(response, FetchResponse::Anchor { .. }), "an answer to the start sync");
        if matches!(response, FetchResponse::Anchor { .. }) {
            sync.checking += 1;
            self.emit(Effect::CheckOffer { peer, response });
        } else {
            sync.answered.insert(peer);
            self.sync_tick();
        }
    }

    pub(super) fn anchor_request_failed(&mut self, peer: PeerId) {
        if self.fetch.as_ref().is_some_and(|f| f.in_flight == Some(peer)) {
            self.anchor_fetch_failed(peer, "request failed");
        } else if let Some(sync) = self.sync.as_mut() {
            sync.answered.insert(peer);
            self.sync_tick();
        }
    }

    pub(super) fn on_offer_checked(&mut self, peer: PeerId, result: Result<Box<Offer>, String>) {
        let Some(sync) = self.sync.as_mut() else { return };
        sync.checking = sync.checking.saturating_sub(1);
        sync.answered.insert(peer);
        match result {
            // The attestation must be the answering member's own vote: a
            // peer cannot lend another's signature weight.
            Ok(offer)
                if offer
                    .attestation
                    .as_ref()
                    .is_some_and(|a| Some(a.block.owner) != author_of(&peer)) =>
            {
                warn!(peer = %short(&peer), "refused an anchor attested by someone other than the peer offering it");
            }
            Ok(offer) if offer.round > 0 && offer.attestation.is_none() => {
                debug!(peer = %short(&peer), round = offer.round, "an unattested anchor offer; not counted");
            }
            Ok(offer) => {
                if let Some(a) = &offer.attestation {
                    if self.power.admitted(&a.block.owner) {
                        self.votes.add(Vote::Block(a.clone()));
                    }
                }
                sync.offers.push(*offer);
            }
            Err(e) => {
                warn!(peer = %short(&peer), error = %e, "refused an anchor offer");
                self.fetch_fault(peer, RejectReason::Malformed);
            }
        }
        self.sync_tick();
    }

    /// Decides a start sync once every member asked answered (or the wait
    /// is over), and acts on the decision.
    pub(super) fn sync_tick(&mut self) {
        let now = self.now;

        let Some(sync) = self.sync.as_ref() else { return };
        if let Some(at) = sync.retry_at {
            if now >= at {
                let attempt = sync.attempt + 1;
                self.sync = None;
                self.ask_anchors(attempt);
            }
            return;
        }
        let all_in = sync.answered.len() >= sync.asked.len() && sync.checking == 0;
        // More than half the voting power signed for an anchor an answer
        // brought: the answers still out cannot undo that (one member that
        // never answered, an attacker answering late, held a restarted node
        // 5 s while the mesh ran 27 rounds: simulator, `--byzantine 1
        // --attack dissensus`, seed 246).
        // The same once more than half of those asked answered and some are
        // rounds ahead: asking again soon is what all the answers would
        // lead to.
        let enough_in_hand = || {
            sync.checking == 0
                && self.power.total() > 0
                && (self
                    .decided_ahead(self.round() + 1, &sync.offers)
                    .is_some_and(|(starts, key)| sync.offers.iter().any(|o| o.round == starts && o.key() == key))
                    || (2 * sync.answered.len() > sync.asked.len()
                        && sync.offers.iter().any(|o| o.round > self.round())))
        };
        if !all_in && now.saturating_sub(sync.started) < SYNC_WAIT_MS && !enough_in_hand() {
            return;
        }
        let Some(sync) = self.sync.take() else { return };
        let current = self.round();
        if let Some((starts, key)) = self.decided_ahead(current + 1, &sync.offers) {
            match sync.offers.iter().find(|o| o.round == starts && o.key() == key) {
                Some(o) => {
                    self.adopt(o.clone().into_fetched(), Purpose::Start);
                    self.begin_rounds();
                }
                None => {
                    self.fetch_anchor(starts, key, Purpose::Start);
                    if self.fetch.is_none() {
                        // Nobody connected to fetch it from: start on ours;
                        // the votes bring us onto it once we can fetch.
                        self.anchor_unavailable(Purpose::Start);
                    }
                }
            }
            return;
        }
        let ahead = sync.offers.iter().any(|o| o.round > current);
        if ahead && sync.attempt < SYNC_ATTEMPTS {
            // Members are ahead but no anchor is decided yet (they may be
            // between rounds): ask again in a moment.
            let mut sync = sync;
            sync.retry_at = Some(now + SYNC_RETRY_MS);
            self.sync = Some(sync);
            self.arm(Timer::Sync, now + SYNC_RETRY_MS);
            return;
        }
        if ahead {
            warn!(
                round = current,
                "members are ahead but no anchor has half the voting power; starting from ours"
            );
        }
        info!(round = current, "starting to train");
        self.begin_rounds();
    }

    /// The latest anchor, starting at `from` or later, that the votes
    /// decide. A node with no view of an open run's voting power (it never
    /// took part) counts the members it asked, one vote each, as the
    /// checkpoint it trusts.
    fn decided_ahead(&self, from: u64, offers: &[Offer]) -> Option<(u64, AnchorKey)> {
        if self.power.total() > 0 {
            return self.votes.latest_decided(from, &self.power);
        }
        let mut support: BTreeMap<(u64, AnchorKey), u64> = BTreeMap::new();
        for o in offers.iter().filter(|o| o.round >= from && o.attestation.is_some()) {
            *support.entry((o.round, o.key())).or_default() += 1;
        }
        let answered = offers.len() as u64;
        support
            .into_iter()
            .filter(|(_, s)| 2 * s >= answered)
            .max_by(|a, b| a.0 .0.cmp(&b.0 .0).then(a.1.cmp(&b.1)).then(b.0 .1.cmp(&a.0 .1)))
            .map(|(k, _)| k)
    }

    /// A vote for the anchor that starts `starts` arrived: repair our base,
    /// or catch up, as soon as the votes decide.
    pub(super) fn on_vote(&mut self, starts: u64) {
        if !self.in_rounds() {
            return;
        }
        let current = self.round();
        if starts >= current + 2 {
            self.check_ahead();
            return;
        }
        if let Some(key) = self.votes.tally(starts, &self.power).decided() {
            self.note_decision(starts, key);
            if starts == self.end_round
                && matches!(self.phase, Phase::Finishing | Phase::Draining)
                && key != self.anchor_key()
            {
                // Votes that came after we settled decided another final
                // anchor: settle again (and evaluate what was decided).
                warn!(round = starts, decided = %key.0.short(), "the final anchor was decided after we settled; settling again");
                let until = self.now + self.cfg.spec.rounds.max_wait_ms;
                self.set_phase(Phase::Settling { until });
                self.settle_tick(false);
                return;
            }
        }
        // While aggregating, the round has moved on but our anchor not yet:
        // the close that follows checks it.
        if starts == current && !matches!(self.phase, Phase::Aggregating(_)) {
            let tally = self.votes.tally(current, &self.power);
            self.repair_if_needed(current, &tally);
            self.maybe_close();
        }
        if matches!(self.phase, Phase::Settling { .. }) && starts == self.end_round {
            self.settle_tick(false);
        }
    }

    /// Half the voting power or more has records for rounds after ours (we
    /// fell out of step, closing rounds at deadlines while they did): skip
    /// ahead to the latest round that half the power has reached, keeping
    /// our anchor (whether it is the decided base of that round is checked
    /// when it closes, as always). Only the round number moves, so nothing
    /// anyone claims can move our anchor this way.
    pub(super) fn check_round_lag(&mut self) {
        if !matches!(self.phase, Phase::Waiting(_) | Phase::Training) || self.power.total() == 0 {
            return;
        }
        let current = self.round();
        let mut heads: Vec<(u64, u64)> = self
            .chains
            .iter()
            .filter(|(a, _)| **a != self.me && !self.members.is_banned(a))
            .map(|(a, c)| (c.round, self.power.of(a)))
            // One round ahead is the normal gap while a round closes.
            .filter(|(r, p)| *p > 0 && *r > current + 1)
            .collect();
        heads.sort_by_key(|b| std::cmp::Reverse(b.0));
        let total = self.power.total();
        let mut power = 0;
        let target = heads.iter().find_map(|(round, p)| {
            power += p;
            (2 * power > total).then_some(*round)
        });
        let Some(target) = target.filter(|t| *t > current) else {
            return;
        };
        info!(
            round = current,
            to = target,
            "half the voting power is rounds ahead; skipping to its round"
        );
        let skipped = self.book.restart_at(target);
        self.keep_stale(skipped);
        self.wants
            .drop_before(target.saturating_sub(self.cfg.spec.exchange.staleness));
        self.remember_snapshot();
        self.set_phase(Phase::Syncing);
        self.begin_rounds();
    }

    /// The votes decided anchors two or more rounds ahead of ours: fetch the
    /// latest and catch up.
    pub(super) fn check_ahead(&mut self) {
        let current = self.round();
        if let Some((s, key)) = self.votes.latest_decided(current + 2, &self.power) {
            if self.fetch.as_ref().is_none_or(|f| f.starts < s) {
                info!(
                    round = current,
                    decided = s,
                    "the mesh is rounds ahead of us; fetching its anchor"
                );
                self.fetch_anchor(s, key, Purpose::Behind);
            }
        }
    }

    /// Our base for round `starts` differs from the decided anchor: fetch it.
    fn repair_if_needed(&mut self, starts: u64, tally: &Tally) {
        let Some(key) = tally.decided() else { return };
        if key == self.anchor_key()
            || self
                .fetched
                .as_ref()
                .is_some_and(|f| f.starts == starts && f.key == key)
        {
            return;
        }
        if self.fetch.as_ref().is_some_and(|f| f.starts == starts && f.key == key) {
            return;
        }
        warn!(
            round = starts,
            ours = %self.anchor_hash.short(),
            decided = %key.0.short(),
            support = tally.support,
            of = tally.total,
            "our anchor is not the one the voting power decided; repairing"
        );
        let purpose = if matches!(self.phase, Phase::Settling { .. }) {
            Purpose::Final
        } else {
            Purpose::Repair
        };
        self.fetch_anchor(starts, key, purpose);
    }

    /// Starts fetching a decided anchor from its voters.
    pub(super) fn fetch_anchor(&mut self, starts: u64, key: AnchorKey, purpose: Purpose) {
        // Its voters first (they held it), then every other member (one may
        // still keep it as the last decided anchor it holds).
        let mut voters: Vec<AuthorId> = self
            .votes
            .for_anchor(starts, &key, &self.power)
            .iter()
            .map(|v| v.voter())
            .collect();
        if let Some(d) = self.decided.as_ref().filter(|d| d.key == key) {
            voters.extend(d.votes.iter().map(|v| v.voter()));
        }
        voters.sort();
        voters.dedup();
        voters.shuffle(&mut self.rng);
        let mut others: Vec<AuthorId> = self
            .connected_authors()
            .into_iter()
            .filter(|a| !voters.contains(a) && *a != self.me)
            .collect();
        others.sort();
        others.shuffle(&mut self.rng);
        let mut candidates: Vec<PeerId> = voters
            .iter()
            .chain(&others)
            .filter_map(super::members::peer_of)
            .filter(|p| self.members.is_connected(p) && !self.members.is_banned_peer(p))
            .collect();
        if candidates.is_empty() {
            // A weak-subjectivity start: whoever offered it.
            if let Some(sync) = &self.sync {
                candidates = sync.asked.iter().copied().collect();
            }
        }
        self.fetch = Some(AnchorFetch {
            starts,
            key,
            purpose,
            candidates: candidates.into(),
            in_flight: None,
            since: self.now,
        });
        self.next_anchor_attempt();
    }

    fn next_anchor_attempt(&mut self) {
        let Some(f) = self.fetch.as_mut() else { return };
        let Some(peer) = f.candidates.pop_front() else {
            let f = self.fetch.take();
            if let Some(f) = f {
                warn!(round = f.starts, ?f.purpose, "no voter could supply the decided anchor");
                self.unavailable = Some((f.starts, f.key));
                self.anchor_unavailable(f.purpose);
            }
            return;
        };
        f.in_flight = Some(peer);
        let weights = f.key.0 .0;
        self.request(
            peer,
            FetchRequest::Anchor { weights: Some(weights) },
            RequestFor::Anchor,
        );
        self.arm(Timer::Fetch, self.now + FETCH_ATTEMPT_MS);
    }

    fn anchor_fetch_failed(&mut self, peer: PeerId, why: &str) {
        debug!(peer = %short(&peer), why, "anchor fetch attempt failed");
        if let Some(f) = self.fetch.as_mut() {
            f.in_flight = None;
        }
        self.next_anchor_attempt();
    }

    /// The fetch timer: the voter asked takes too long.
    pub(super) fn fetch_tick(&mut self) {
        if let Some(peer) = self.fetch.as_ref().and_then(|f| f.in_flight) {
            self.anchor_fetch_failed(peer, "timed out");
        }
    }

    /// Nobody served a decided anchor: carry on with ours.
    fn anchor_unavailable(&mut self, purpose: Purpose) {
        match purpose {
            Purpose::Start => {
                if matches!(self.phase, Phase::Syncing) {
                    self.begin_rounds();
                }
            }
            Purpose::Repair | Purpose::Revert => {
                self.maybe_close();
                if matches!(self.phase, Phase::Settling { .. }) {
                    self.settle_tick(true);
                }
            }
            Purpose::Behind => {}
            Purpose::Final => self.settle_tick(true),
        }
    }

    pub(super) fn on_anchor_checked(&mut self, peer: PeerId, result: Result<Box<Fetched>, String>) {
        let Some(f) = self.fetch.as_ref() else { return };
        if f.in_flight != Some(peer) {
            return;
        }
        let fetched = match result {
            Ok(fetched) if fetched.starts == f.starts && fetched.key == f.key => *fetched,
            Ok(_) => return self.anchor_fetch_failed(peer, "another anchor"),
            Err(e) => {
                warn!(peer = %short(&peer), error = %e, "refused a fetched anchor");
                self.fetch_fault(peer, RejectReason::Malformed);
                return self.anchor_fetch_failed(peer, "bad anchor");
            }
        };
        let Some(f) = self.fetch.take() else { return };
        info!(round = fetched.starts, anchor = %fetched.key.0.short(), ?f.purpose, "fetched the decided anchor");
        match f.purpose {
            Purpose::Start => {
                self.adopt(fetched, Purpose::Start);
                if matches!(self.phase, Phase::Syncing) {
                    self.begin_rounds();
                }
            }
            Purpose::Repair | Purpose::Revert => {
                self.fetched = Some(Box::new(fetched));
                self.maybe_close();
                if matches!(self.phase, Phase::Settling { .. }) {
                    self.settle_tick(true);
                }
            }
            Purpose::Behind => {
                self.fetched = Some(Box::new(fetched));
                self.catch_up();
            }
            Purpose::Final => {
                self.fetched = Some(Box::new(fetched));
                self.settle_tick(true);
            }
        }
    }

    /// Jumps to a fetched anchor the mesh decided rounds ahead of ours,
    /// unless a round is aggregating (then at its close).
    pub(super) fn catch_up(&mut self) {
        if self.fetched.as_ref().is_none_or(|f| f.starts <= self.round()) {
            return;
        }
        if matches!(
            self.phase,
            Phase::Aggregating(_) | Phase::Publishing(_) | Phase::Colluding(_)
        ) {
            return;
        }
        let Some(f) = self.fetched.take() else { return };
        self.adopt(*f, Purpose::Behind);
        self.set_phase(Phase::Syncing);
        self.begin_rounds();
    }

    /// Our anchor weights and outer state, as votes name them.
    pub(super) fn anchor_key(&self) -> AnchorKey {
        (self.anchor_hash, self.outer_hash)
    }

    /// Takes over a checked anchor the votes decided, for `purpose`.
    pub(super) fn adopt(&mut self, f: Fetched, purpose: Purpose) {
        let mut votes = self.evidence(f.starts, &f.key);
        if votes.is_empty() {
            // A weak-subjectivity start: the attestations of the members
            // asked, who from now on have a vote here.
            votes = self.votes.unweighted_for_anchor(f.starts, &f.key);
            self.power.vouch(votes.iter().map(|v| v.voter()));
            self.promote_earned();
        }
        let starts = f.starts;
        self.take_over(f, purpose.join_kind(), starts, votes);
    }

    /// Takes over an anchor: weights, outer state and round; records the
    /// join, with the votes that decided it (for the anchor that started
    /// `decided_at`), in the ledger.
    pub(super) fn take_over(&mut self, f: Fetched, kind: JoinKind, decided_at: u64, votes: Vec<Vote>) {
        info!(
            from_round = self.round(),
            to_round = f.starts,
            anchor = %f.key.0.short(),
            ?kind,
            "taking over the decided anchor"
        );
        if let Some(outer) = self.outer.as_mut() {
            outer.set_velocity(f.velocity.clone());
            self.velocity = Arc::new(outer.velocity().to_vec());
        }
        self.anchor = f.weights.clone();
        self.anchor_hash = f.key.0;
        self.outer_hash = f.key.1;
        self.attestation = None;
        if f.starts > self.round() {
            let skipped = self.book.restart_at(f.starts);
            self.keep_stale(skipped);
            self.wants
                .drop_before(f.starts.saturating_sub(self.cfg.spec.exchange.staleness));
            self.rebuild_from_join();
        }
        self.remember_snapshot();
        self.joins.push((f.starts, kind));
        if votes.is_empty() && decided_at != 0 {
            warn!(round = f.starts, "no signed vote to record with the join");
            return;
        }
        let join = JoinRecord {
            round: f.starts,
            anchor: f.key.0,
            outer_state: f.key.1,
            anchor_payload: PayloadHash::of(&f.weights_bytes),
            outer_payload: PayloadHash::of(&f.outer_bytes),
            kind,
            decided_at,
            votes,
        };
        self.emit(Effect::Inbox(Job::Join {
            record: Box::new(join),
            anchor: f.weights_bytes,
            outer: f.outer_bytes,
        }));
    }

    /// Keeps our current anchor where peers can fetch it (with the ones
    /// before it: a peer repairing asks for one we may just have left).
    pub(super) fn remember_snapshot(&mut self) {
        let round = self.round();
        if self
            .snapshots
            .back()
            .is_some_and(|s| s.anchor_hash == self.anchor_hash && s.round == round)
        {
            return;
        }
        self.snapshots.push_back(AnchorSnapshot {
            round,
            anchor_hash: self.anchor_hash,
            weights: self.anchor.clone(),
            velocity: self.velocity.clone(),
            attestation: self.attestation.clone(),
        });
        while self.snapshots.len() > SNAPSHOTS_KEPT {
            self.snapshots.pop_front();
        }
    }
}
