//! Anchor sync: adopting the mesh's current anchor weights and outer state
//! from peers, checked against their signed verdict blocks. Used when a node
//! joins late or restarts, and when a healed partition shows that this node
//! sits on the minority side.
//!
//! An offer counts only if its weights and outer state hash to what a validly
//! signed verdict block of this run names, for the round before the offered
//! one. When two or more peers answer, at least two distinct signers must
//! agree before anything is adopted.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use meshtrain_gossip::libp2p::PeerId;
use meshtrain_gossip::{FetchRequest, FetchResponse};
use meshtrain_ledger::{AuthorId, JoinRecord, PayloadHash, RunId, SignedVerdictBlock, WeightsHash};
use meshtrain_model::{codec, CodecSpec};
use tracing::{debug, info, warn};

use super::start::short;
use super::{Core, Effect, Millis, Phase, RequestFor, Timer};
use crate::inbox::Job;

/// How long a sync waits for answers.
const SYNC_WAIT_MS: Millis = 5000;
/// Peers asked at once.
const SYNC_FANOUT: usize = 5;
/// Asks before giving up when answers disagree (peers caught between two
/// rounds answer differently; a moment later they agree). A node that is not
/// training yet can afford to keep asking.
const SYNC_ATTEMPTS_START: u32 = 40;
const SYNC_ATTEMPTS_MINORITY: u32 = 10;
/// Pause between asks.
const SYNC_RETRY_MS: Millis = 300;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncReason {
    /// At start (a late join or a restart shows up as peers being ahead).
    Start,
    /// The round's updates were built on another anchor by more authors.
    Minority,
}

/// One checked offer.
#[derive(Clone, Debug)]
pub struct Offer {
    pub round: u64,
    pub anchor_hash: WeightsHash,
    pub outer_hash: WeightsHash,
    pub weights: Arc<Vec<f32>>,
    pub velocity: Vec<f32>,
    pub attestation: Option<SignedVerdictBlock>,
    pub weights_bytes: Vec<u8>,
    pub outer_bytes: Vec<u8>,
}

pub struct AnchorSync {
    pub reason: SyncReason,
    asked: HashSet<PeerId>,
    answered: HashSet<PeerId>,
    /// Answers handed off to be checked, not back yet.
    checking: usize,
    offers: Vec<Offer>,
    started: Millis,
    /// Only offers with this anchor count (Minority syncs target a group).
    target: Option<WeightsHash>,
    among: Option<Vec<AuthorId>>,
    attempt: u32,
    /// Ask again at this time (after a disagreement).
    retry_at: Option<Millis>,
}

/// Offers that name the same round, anchor and outer state.
type OfferKey = (u64, WeightsHash, WeightsHash);

/// What a sync decided.
enum SyncOutcome {
    Pending,
    /// Take this offer; the verdict blocks of its distinct signers attest it.
    Adopt(Box<Offer>, Vec<SignedVerdictBlock>),
    Nothing,
}

/// Checks an offer: decodable, and (past round 0) attested by a signed
/// verdict block of this run naming exactly these weights and state. Heavy
/// (it decodes the whole anchor): the node runs it on a worker thread.
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
    let w = codec::decode(&weights, params).map_err(|e| format!("weights: {e}"))?;
    let v = match codec::peek_len(&outer) {
        Ok(0) => Vec::new(),
        _ => codec::decode(&outer, params).map_err(|e| format!("outer state: {e}"))?,
    };
    let anchor_hash = WeightsHash::of_f32(&w);
    let outer_hash = WeightsHash::of_f32(&v);
    let attestation = if round == 0 {
        if anchor_hash != *genesis {
            return Err("round 0 but not the genesis weights".into());
        }
        None
    } else {
        let block = SignedVerdictBlock::from_bytes(&verdict).map_err(|e| e.to_string())?;
        block.verify_signature().map_err(|e| e.to_string())?;
        let b = &block.block;
        if b.run_id != *run_id {
            return Err("attested by a block of another run".into());
        }
        if b.new_anchor != anchor_hash || b.outer_state != outer_hash || b.round.checked_add(1) != Some(round) {
            return Err("the verdict block attests other weights or another round".into());
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

/// Our anchor as it goes on the wire (the shell caches this per anchor).
pub fn encode_anchor(snapshot: &super::AnchorSnapshot) -> FetchResponse {
    FetchResponse::Anchor {
        round: snapshot.round,
        weights: codec::encode(CodecSpec::Dense, &snapshot.weights),
        outer: codec::encode(CodecSpec::Dense, &snapshot.velocity),
        verdict: snapshot.attestation.as_ref().map(|v| v.to_bytes()).unwrap_or_default(),
    }
}

impl Core {
    /// Asks up to five members for their anchor. `among` restricts the
    /// choice (for a minority sync: authors of the majority group).
    pub(super) fn start_sync(&mut self, reason: SyncReason, among: Option<&[AuthorId]>, target: Option<WeightsHash>) {
        if self.sync.is_some() {
            return;
        }
        self.ask_anchors(reason, among.map(<[AuthorId]>::to_vec), target, 1);
    }

    fn ask_anchors(
        &mut self,
        reason: SyncReason,
        among: Option<Vec<AuthorId>>,
        target: Option<WeightsHash>,
        attempt: u32,
    ) {
        let among_ref = among.as_deref();
        let mut peers: Vec<PeerId> = self
            .voters_by_author()
            .into_iter()
            .filter(|(a, _)| among_ref.is_none_or(|set| set.contains(a)))
            .map(|(_, p)| p)
            .collect();
        peers.sort();
        peers.truncate(SYNC_FANOUT);
        if peers.is_empty() {
            return;
        }
        for p in &peers {
            self.request(*p, FetchRequest::Anchor, RequestFor::Anchor);
        }
        info!(
            round = self.round(),
            ?reason,
            asked = peers.len(),
            attempt,
            "asking peers for the current anchor"
        );
        self.sync = Some(AnchorSync {
            reason,
            asked: peers.into_iter().collect(),
            answered: HashSet::new(),
            checking: 0,
            offers: Vec::new(),
            started: self.now,
            target,
            among,
            attempt,
            retry_at: None,
        });
        self.arm(Timer::Sync, self.now + SYNC_WAIT_MS);
    }

    pub(super) fn on_anchor_response(&mut self, peer: PeerId, response: FetchResponse) {
        let Some(sync) = self.sync.as_mut() else {
            return;
        };
        if matches!(response, FetchResponse::Anchor { .. }) {
            sync.checking += 1;
            self.emit(Effect::CheckOffer { peer, response });
        } else {
            sync.answered.insert(peer);
            self.sync_tick();
        }
    }

    pub(super) fn on_offer_checked(&mut self, peer: PeerId, result: Result<Box<Offer>, String>) {
        let Some(sync) = self.sync.as_mut() else {
            return;
        };
        sync.checking = sync.checking.saturating_sub(1);
        sync.answered.insert(peer);
        match result {
            Ok(offer) => {
                if sync.target.is_none_or(|t| t == offer.anchor_hash) {
                    sync.offers.push(*offer);
                }
            }
            Err(e) => warn!(peer = %short(&peer), error = %e, "refused an anchor offer"),
        }
        self.sync_tick();
    }

    pub(super) fn anchor_request_failed(&mut self, peer: PeerId) {
        if let Some(sync) = self.sync.as_mut() {
            sync.answered.insert(peer);
            self.sync_tick();
        }
    }

    /// Decides a sync when it can, and acts on the decision.
    pub(super) fn sync_tick(&mut self) {
        if self.sync.is_none() {
            return;
        }
        match self.sync_outcome() {
            SyncOutcome::Pending => {}
            SyncOutcome::Adopt(offer, attestations) => {
                // The anchor is in use only while aggregating; a majority
                // already a round ahead is taken at our close.
                let aggregating = matches!(self.phase, Phase::Aggregating(_));
                let syncing = matches!(self.phase, Phase::Syncing);
                let now_ok = syncing || (!aggregating && offer.round == self.round());
                // Waiting on a round the mesh has left behind: jump.
                let jump = matches!(self.phase, Phase::Waiting(_)) && offer.round > self.round();
                if now_ok {
                    self.adopt(*offer, attestations);
                } else if jump {
                    self.adopt(*offer, attestations);
                    self.set_phase(Phase::Syncing);
                } else {
                    self.pending_adoption = Some((offer, attestations));
                }
            }
            SyncOutcome::Nothing => {}
        }
        if self.sync.is_none() && matches!(self.phase, Phase::Syncing) {
            info!(round = self.round(), "starting to train");
            self.begin_rounds();
        }
    }

    /// Decides once every asked peer answered or the wait is over.
    fn sync_outcome(&mut self) -> SyncOutcome {
        let now = self.now;
        let Some(sync) = self.sync.as_ref() else {
            return SyncOutcome::Nothing;
        };
        if let Some(at) = sync.retry_at {
            if now < at {
                return SyncOutcome::Pending;
            }
            let Some(s) = self.sync.take() else {
                return SyncOutcome::Nothing;
            };
            self.ask_anchors(s.reason, s.among, s.target, s.attempt + 1);
            return SyncOutcome::Pending;
        }
        let all_in = sync.answered.len() >= sync.asked.len() && sync.checking == 0;
        let done = all_in || now.saturating_sub(sync.started) >= SYNC_WAIT_MS;
        if !done {
            return SyncOutcome::Pending;
        }
        let Some(sync) = self.sync.take() else {
            return SyncOutcome::Nothing;
        };
        // Group identical offers; count distinct attesting signers.
        let mut groups: BTreeMap<OfferKey, (HashSet<Option<AuthorId>>, usize)> = BTreeMap::new();
        for (i, o) in sync.offers.iter().enumerate() {
            let g = groups
                .entry((o.round, o.anchor_hash, o.outer_hash))
                .or_insert((HashSet::new(), i));
            g.0.insert(o.attestation.as_ref().map(|a| a.block.owner));
        }
        let need = if sync.answered.len() >= 2 { 2 } else { 1 };
        let best = groups
            .iter()
            .filter(|(_, (signers, _))| signers.len() >= need || (signers.contains(&None) && sync.offers.len() >= need))
            .max_by(|a, b| {
                (a.1 .0.len(), a.0 .0, std::cmp::Reverse(a.0 .1)).cmp(&(
                    b.1 .0.len(),
                    b.0 .0,
                    std::cmp::Reverse(b.0 .1),
                ))
            });
        let Some((&(round, hash, _), &(_, first))) = best else {
            let attempts = match sync.reason {
                SyncReason::Start => SYNC_ATTEMPTS_START,
                SyncReason::Minority => SYNC_ATTEMPTS_MINORITY,
            };
            if sync.attempt < attempts {
                // Probably caught between rounds (answers disagree, or peers
                // refused while aggregating): ask again in a moment.
                let mut sync = sync;
                sync.retry_at = Some(now + SYNC_RETRY_MS);
                self.sync = Some(sync);
                self.arm(Timer::Sync, now + SYNC_RETRY_MS);
                return SyncOutcome::Pending;
            }
            warn!(
                offers = sync.offers.len(),
                attempts, "no two peers agreed on an anchor; keeping ours"
            );
            return SyncOutcome::Nothing;
        };
        let ahead = round > self.round();
        let minority_switch = sync.reason == SyncReason::Minority && hash != self.anchor_hash && round >= self.round();
        if sync.reason == SyncReason::Minority && round < self.round() && sync.attempt < SYNC_ATTEMPTS_MINORITY {
            // The majority has not closed the round we already closed: its
            // next anchor is moments away.
            let mut sync = sync;
            sync.retry_at = Some(now + SYNC_RETRY_MS);
            self.sync = Some(sync);
            self.arm(Timer::Sync, now + SYNC_RETRY_MS);
            return SyncOutcome::Pending;
        }
        if !(ahead || minority_switch) {
            debug!(
                round = self.round(),
                offered_round = round,
                offered = %hash.short(),
                ours = %self.anchor_hash.short(),
                "the agreed anchor is not ahead of ours; keeping ours"
            );
            return SyncOutcome::Nothing;
        }
        let mut signers = HashSet::new();
        let attestations = sync
            .offers
            .iter()
            .filter(|o| (o.round, o.anchor_hash) == (round, hash))
            .filter_map(|o| o.attestation.clone())
            .filter(|a| signers.insert(a.block.owner))
            .collect();
        SyncOutcome::Adopt(Box::new(sync.offers[first].clone()), attestations)
    }

    /// Takes over an offered anchor: weights, outer state and round, and
    /// records the join (with the attestations) in the ledger.
    pub(super) fn adopt(&mut self, offer: Offer, attestations: Vec<SignedVerdictBlock>) {
        info!(
            from_round = self.round(),
            to_round = offer.round,
            anchor = %offer.anchor_hash.short(),
            "adopting the mesh's anchor"
        );
        if let Some(outer) = self.outer.as_mut() {
            outer.set_velocity(offer.velocity.clone());
            self.velocity = Arc::new(outer.velocity().to_vec());
        }
        self.anchor = offer.weights.clone();
        self.anchor_hash = offer.anchor_hash;
        if offer.round > self.round() {
            self.book.restart_at(offer.round);
            self.wants
                .drop_before(offer.round.saturating_sub(self.cfg.spec.exchange.staleness));
            self.rebuild(offer.round);
        }
        // (At our own round, only the anchor this round's aggregation
        // starts from changes; what was gathered for the round stays.)
        self.joins.push(offer.round);
        if let Some(a) = attestations.first() {
            self.attestation = Some(a.clone());
            let join = JoinRecord {
                round: offer.round,
                anchor: offer.anchor_hash,
                outer_state: offer.outer_hash,
                anchor_payload: PayloadHash::of(&offer.weights_bytes),
                outer_payload: PayloadHash::of(&offer.outer_bytes),
                attestations,
            };
            self.emit(Effect::Inbox(Job::Join {
                record: Box::new(join),
                anchor: offer.weights_bytes,
                outer: offer.outer_bytes,
            }));
        }
    }
}
