//! What peers send and ask: gossip, fetch requests and responses, and what
//! the inbox made of it. Every gossip message ends in exactly one
//! [`Core::settle`].

use meshtrain_gossip::libp2p::gossipsub::MessageId;
use meshtrain_gossip::libp2p::PeerId;
use meshtrain_gossip::{FetchRequest, FetchResponse, GossipMessage};
use meshtrain_ledger::{
    AuthorId, PayloadHash, RejectReason, Seq, SignedRecord, Verdict, VerdictEntry, Vote, WeightsHash,
};
use tracing::{debug, warn};

use super::agreement::Added;
use super::members::author_of;
use super::outcome::{IgnoreReason, Origin, Outcome};
use super::rounds::{Contribution, Offer as BookOffer};
use super::start::short;
use super::wants::{Next, WantedFor};
use super::{members, ChainPos, ChanId, Core, CoreFault, Effect, Millis, Phase, ReqId, RequestFor, Timer};
use crate::inbox::{Done, Job, PayloadFault, RecordDone};
use crate::serve::{MAX_HEADS_PER_RESPONSE, MAX_RECORDS_PER_RESPONSE};

/// Rounds of votes kept behind the current one at most.
const VOTE_HISTORY: u64 = 32;
/// Bounds on how long a payload request may go unanswered before the next
/// candidate is asked too (see `hedge_after`).
const HEDGE_MIN_MS: Millis = 100;
const HEDGE_MAX_MS: Millis = 5_000;
/// Authors whose updates are remembered as set aside for later, at most.
pub(super) const MAX_SET_ASIDE: usize = 4096;
/// What one peer may ask of us per window: requests of any kind (blocks
/// while it fetches its shard, records and payloads), anchors (each a full
/// weight vector; a node syncing asks each member about every half second,
/// one joining or repairing a few times), and bytes. Past any of them, it
/// is refused until the window ends.
const BUDGET_WINDOW_MS: u64 = 10_000;
const MAX_REQUESTS_PER_WINDOW: u32 = 2000;
const MAX_ANCHORS_PER_WINDOW: u32 = 40;
/// Bytes per window: a member fetching its shard gets blocks at about
/// 50 Mbit/s from each holder; without it, 2000 requests for 4 MiB blocks
/// would send 8 GiB to one peer in ten seconds. Never less than
/// `ANCHORS_PER_BYTE_BUDGET` anchors of a big model.
const MAX_BYTES_PER_WINDOW: u64 = 64 << 20;
const ANCHORS_PER_BYTE_BUDGET: u64 = 4;
/// Bytes of answers sent but not yet read, per peer and in all (libp2p
/// holds each until it is written or its stream times out after 30 s, so
/// without these a peer that reads slowly made a node hold its whole
/// window budget several times over). Per peer: a shard fetch's eight
/// 4 MiB blocks; never less than two anchors, or eight in all.
const MAX_IN_FLIGHT_PER_PEER: u64 = 32 << 20;
const MAX_IN_FLIGHT_TOTAL: u64 = 128 << 20;
/// How long a records request may go unanswered before another peer is
/// asked for the same author's records.
pub(super) const RECORDS_PATIENCE_MS: Millis = 3_000;

/// What a request's answer weighs, for the byte caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bulk {
    /// Records, heads, a vote: bounded and small.
    Small,
    Anchor,
    Payload,
    Block,
}

impl Bulk {
    fn of(request: &FetchRequest) -> Self {
        match request {
            FetchRequest::Anchor { .. } => Bulk::Anchor,
            // A verdict block can be asked for any round, all run long: its
            // bytes count like a payload's.
            FetchRequest::Payload { .. } | FetchRequest::RoundVerdict { .. } => Bulk::Payload,
            FetchRequest::Block { .. } => Bulk::Block,
            FetchRequest::Records { .. }
            | FetchRequest::Heads
            | FetchRequest::FinalVote
            | FetchRequest::FinalVoteOf { .. } => Bulk::Small,
        }
    }
}

impl Core {
    pub(super) fn on_gossip(&mut self, id: MessageId, source: PeerId, data: &[u8]) {
        if !self.unsettled.insert(id.clone()) {
            // gossipsub hands each message id over once; a second copy
            // would be settled twice.
            debug!(?id, "gossip message handed in twice; ignored");
            return;
        }
        let origin = Origin::Gossip { id, source };
        match GossipMessage::from_bytes(data) {
            Ok(GossipMessage::Update { record, payload }) => {
                self.counters.received += 1;
                if payload.as_ref().is_some_and(|p| p.len() > self.cfg.max_inline_payload) {
                    self.count_rejection("oversized-inline", None);
                    self.settle(&origin, &Outcome::Invalid(RejectReason::Malformed), true);
                    return;
                }
                self.emit(Effect::Inbox(Job::Record {
                    bytes: record,
                    payload,
                    origin,
                }));
            }
            Ok(GossipMessage::Equivocation { proof }) => self.emit(Effect::Inbox(Job::Proof { bytes: proof, origin })),
            Ok(GossipMessage::Vote { block }) => self.emit(Effect::Inbox(Job::Vote { bytes: block, origin })),
            Err(e) => {
                warn!(peer = %short(&source), error = %e, round = self.round(), "rejected garbage gossip");
                self.count_rejection("malformed", None);
                self.settle(&origin, &Outcome::Invalid(RejectReason::Malformed), false);
            }
        }
    }

    pub(super) fn on_request(&mut self, peer: PeerId, chan: ChanId, request: FetchRequest) {
        if self.members.is_banned_peer(&peer) {
            self.emit(Effect::Respond {
                chan,
                response: FetchResponse::Refused("banned".into()),
            });
            return;
        }
        if self.mischief_request(peer, chan, &request) {
            return;
        }
        if author_of(&peer).is_none_or(|a| !self.power.admitted(&a)) {
            self.emit(Effect::Respond {
                chan,
                response: FetchResponse::Refused("not a member of this run".into()),
            });
            return;
        }
        let bulk = Bulk::of(&request);
        let over = if !self.within_budget(peer, bulk) {
            Some("over budget; ask again later")
        } else if !self.room_in_flight(peer, bulk) {
            Some("answers still unread; ask again later")
        } else {
            None
        };
        if let Some(why) = over {
            self.counters.refused_over_budget += 1;
            self.emit(Effect::Respond {
                chan,
                response: FetchResponse::Refused(why.into()),
            });
            return;
        }
        if let (FetchRequest::Block { .. }, Some(author)) = (&request, author_of(&peer)) {
            // Only the first round waits on a member still fetching (one
            // entry per member at most).
            if self.round() <= self.book.joined_at() {
                self.block_asks.insert(author, self.now);
            }
        }
        if let FetchRequest::Anchor { weights } = request {
            let response = match self.anchor_snapshot(weights.map(WeightsHash)) {
                Some(anchor) => Effect::ServeAnchor {
                    peer,
                    chan,
                    anchor: Box::new(anchor),
                },
                None => Effect::Respond {
                    chan,
                    response: FetchResponse::Refused("no such anchor held".into()),
                },
            };
            self.last_served = self.now;
            self.emit(response);
            return;
        }
        if let FetchRequest::FinalVote = request {
            let response = match self.final_vote() {
                Some(block) => FetchResponse::Vote(block.to_bytes()),
                // Took over the final anchor, evaluated it and is leaving:
                // members draining would otherwise wait their whole limit
                // for a vote and a last record that will not come.
                None if matches!(self.phase, Phase::Draining | Phase::Done) => FetchResponse::Finished {
                    head_seq: self.own_head.as_ref().map(|h| h.seq.0),
                },
                None => FetchResponse::NotFound,
            };
            self.emit(Effect::Respond { chan, response });
            return;
        }
        if let FetchRequest::FinalVoteOf { author } = request {
            let response = match self.votes.get(self.end_round, &AuthorId(author)) {
                Some(Vote::Block(block)) => FetchResponse::Vote(block.to_bytes()),
                _ => FetchResponse::NotFound,
            };
            self.emit(Effect::Respond { chan, response });
            return;
        }
        if let FetchRequest::RoundVerdict { round } = request {
            let response = match self.gossiped_blocks.iter().find(|(r, _)| *r == round) {
                Some((_, bytes)) => FetchResponse::Vote(bytes.clone()),
                None => FetchResponse::NotFound,
            };
            self.emit(Effect::Respond { chan, response });
            return;
        }
        if let FetchRequest::Records { author, from_seq, max } = request {
            // A banned author's records since its ban are not in our
            // ledger, only among the votes: serve those (from the first
            // held at or after `from_seq`; earlier ones come from the
            // ledger when none is held), so that members that banned it
            // too can count the same votes.
            let author = AuthorId(author);
            if self.members.is_banned(&author) {
                let max = max.clamp(1, MAX_RECORDS_PER_RESPONSE) as usize;
                let held = self.votes.records_of(&author, from_seq, max);
                if !held.is_empty() {
                    let records = held.iter().map(|r| r.to_bytes()).collect();
                    self.emit(Effect::Respond {
                        chan,
                        response: FetchResponse::Records(records),
                    });
                    return;
                }
            }
        }
        // Heads are anti-entropy's periodic look, not a peer still needing
        // something from us (what it lacks it asks for next): they do not
        // hold a draining node.
        if !matches!(request, FetchRequest::Heads) {
            self.last_served = self.now;
        }
        self.emit(Effect::Serve { peer, chan, request });
    }

    /// Counts one request of `peer` against its budget; false when over.
    fn within_budget(&mut self, peer: PeerId, bulk: Bulk) -> bool {
        let bytes_allowed = self.byte_budget();
        let a = self.budget_window(peer);
        a.requests = a.requests.saturating_add(1);
        let anchor = bulk == Bulk::Anchor;
        a.anchors = a.anchors.saturating_add(u32::from(anchor));
        // Over the anchor cap only anchors are refused: a syncing node's
        // payload and record fetches go on. Over the byte budget only
        // payloads and blocks are: an anchor refused reads as "not held"
        // to a syncing node, and anchors have their own cap.
        let bytes_ok = !matches!(bulk, Bulk::Payload | Bulk::Block) || a.bytes < bytes_allowed;
        a.requests <= MAX_REQUESTS_PER_WINDOW && (!anchor || a.anchors <= MAX_ANCHORS_PER_WINDOW) && bytes_ok
    }

    /// `peer`'s current budget window (a fresh one once the last ended).
    fn budget_window(&mut self, peer: PeerId) -> &mut super::Asked {
        let now = self.now;
        if self.asked.len() > 4096 {
            self.asked.retain(|_, a| now.saturating_sub(a.since) < BUDGET_WINDOW_MS);
        }
        let fresh = super::Asked {
            since: now,
            requests: 0,
            anchors: 0,
            bytes: 0,
        };
        let a = self.asked.entry(peer).or_insert(fresh);
        if now.saturating_sub(a.since) >= BUDGET_WINDOW_MS {
            *a = fresh;
        }
        a
    }

    /// An anchor's size: the weights and the outer state, 4 bytes a value.
    fn anchor_bytes(&self) -> u64 {
        (self.cfg.params as u64).saturating_mul(8)
    }

    /// Bytes a peer may be served per window.
    pub(super) fn byte_budget(&self) -> u64 {
        MAX_BYTES_PER_WINDOW.max(self.anchor_bytes().saturating_mul(ANCHORS_PER_BYTE_BUDGET))
    }

    /// An answer went out: its bytes count against the window it is sent
    /// in, and are in flight until it is delivered. Answers admitted before
    /// the earlier ones were sent (at most the 16 serves running at once,
    /// and anchors being encoded) may overshoot both caps.
    pub(super) fn on_served(&mut self, peer: PeerId, bytes: u64) {
        self.counters.served_bytes = self.counters.served_bytes.saturating_add(bytes);
        let a = self.budget_window(peer);
        a.bytes = a.bytes.saturating_add(bytes);
        let f = self.in_flight.entry(peer).or_insert(0);
        *f = f.saturating_add(bytes);
        self.in_flight_total = self.in_flight_total.saturating_add(bytes);
    }

    pub(super) fn on_delivered(&mut self, peer: PeerId, bytes: u64) {
        let Some(f) = self.in_flight.get_mut(&peer) else {
            return;
        };
        let bytes = bytes.min(*f);
        *f -= bytes;
        if *f == 0 {
            self.in_flight.remove(&peer);
        }
        self.in_flight_total = self.in_flight_total.saturating_sub(bytes);
    }

    /// Whether another bulk answer to `peer` may be held while earlier
    /// ones are unread. Payloads and blocks wait for the peer's own unread
    /// answers; only blocks (the data phase, which can wait) wait for
    /// everyone's, so that a few keys that never read cannot stop a node
    /// serving the round's payloads to the others.
    fn room_in_flight(&self, peer: PeerId, bulk: Bulk) -> bool {
        let anchor = self.anchor_bytes();
        let per_peer = MAX_IN_FLIGHT_PER_PEER.max(anchor.saturating_mul(2));
        let total = MAX_IN_FLIGHT_TOTAL.max(anchor.saturating_mul(8));
        let mine = self.in_flight.get(&peer).copied().unwrap_or(0);
        match bulk {
            Bulk::Payload => mine < per_peer,
            Bulk::Block => mine < per_peer && self.in_flight_total < total,
            Bulk::Anchor | Bulk::Small => true,
        }
    }

    pub(super) fn on_response(&mut self, req: ReqId, peer: PeerId, response: FetchResponse) {
        let Some(what) = self.requests.remove(&req) else {
            tracing::trace!(req = req.0, peer = %short(&peer), "an answer to no request of ours");
            return;
        };
        match (what, response) {
            (RequestFor::Payload(hash), FetchResponse::Payload(bytes)) => {
                if let Some(asked) = self.wants.asked_at(&hash) {
                    let took = self.now.saturating_sub(asked) as f64;
                    self.payload_fetch_ms = Some(self.payload_fetch_ms.map_or(took, |e| 0.8 * e + 0.2 * took));
                }
                self.emit(Effect::Inbox(Job::Payload {
                    hash,
                    bytes,
                    from: peer,
                }));
            }
            (RequestFor::Payload(hash), _) => self.payload_attempt_failed(hash),
            (RequestFor::Anchor, response) => self.on_anchor_response(peer, response),
            (RequestFor::FinalVote(_) | RequestFor::RoundVerdict, FetchResponse::Vote(block)) => {
                self.emit(Effect::Inbox(Job::Vote {
                    bytes: block,
                    origin: Origin::Fetched { from: peer },
                }))
            }
            // Only a member speaks for itself (a peer asked for another's
            // vote cannot say it finished).
            (RequestFor::FinalVote(author), FetchResponse::Finished { head_seq })
                if members::peer_of(&author).is_some_and(|p| p == peer) =>
            {
                debug!(member = %author.short(), ?head_seq, "finished without a final vote");
                self.finished_unvoted.insert(author, head_seq);
            }
            (RequestFor::Records { author, from }, FetchResponse::Records(records)) => {
                self.records_answered(author, req);
                self.on_records(peer, author, from, records);
            }
            (RequestFor::Records { author, .. }, _) => self.records_answered(author, req),
            (RequestFor::Heads, FetchResponse::Heads(heads)) => {
                if heads.len() > MAX_HEADS_PER_RESPONSE {
                    warn!(peer = %short(&peer), heads = heads.len(), "more chain heads than any run has members; answer dropped");
                    self.fetch_fault(peer, RejectReason::Malformed);
                    return;
                }
                for h in heads {
                    let author = AuthorId(h.author);
                    // Banned authors' records too: their votes still count.
                    if author == self.me || !self.power.admitted(&author) {
                        continue;
                    }
                    let ours = self.chains.get(&author).map_or(0, |c| c.seq.saturating_add(1));
                    if h.seq.saturating_add(1) > ours {
                        self.request_records(peer, author, Seq(ours));
                    }
                }
            }
            _ => {}
        }
    }

    pub(super) fn on_request_failed(&mut self, req: ReqId, peer: PeerId) {
        debug!(peer = %short(&peer), "fetch failed");
        match self.requests.remove(&req) {
            Some(RequestFor::Payload(hash)) => self.payload_attempt_failed(hash),
            Some(RequestFor::Anchor) => self.anchor_request_failed(peer),
            Some(RequestFor::Records { author, .. }) => self.records_answered(author, req),
            _ => {}
        }
    }

    /// The inbox's queue had no room for a gossiped message (see
    /// [`crate::inbox::thread::Backlog`]): it is settled as ignored, so
    /// gossipsub neither relays it nor blames the sender.
    pub(super) fn on_inbox_busy(&mut self, job: Job) {
        debug!(
            round = self.round(),
            "inbox queue full; a gossiped message left unchecked"
        );
        let (origin, update) = match job {
            Job::Record { origin, .. } => (origin, true),
            Job::Proof { origin, .. } | Job::Vote { origin, .. } => (origin, false),
            _ => return,
        };
        if let Origin::Gossip { .. } = origin {
            self.settle(&origin, &Outcome::Ignored(IgnoreReason::Busy), update);
        }
    }

    /// Asks `peer` for `author`'s records from `from` on, unless a request
    /// for that author is already out.
    pub(super) fn request_records(&mut self, peer: PeerId, author: AuthorId, from: Seq) {
        if self
            .records_asked
            .get(&author)
            .is_some_and(|(_, at)| self.now.saturating_sub(*at) < RECORDS_PATIENCE_MS)
        {
            return;
        }
        self.ask_records(peer, author, from);
    }

    /// Asks `peer` for `author`'s records from `from` on, even while
    /// another request for them is out (a missing vote is asked of several
    /// members at once).
    pub(super) fn ask_records(&mut self, peer: PeerId, author: AuthorId, from: Seq) {
        let req = self.request(
            peer,
            FetchRequest::Records {
                author: author.0,
                from_seq: from.0,
                max: MAX_RECORDS_PER_RESPONSE,
            },
            RequestFor::Records { author, from },
        );
        self.records_asked.insert(author, (req, self.now));
    }

    /// A records request ended: the author may be asked again, unless a
    /// later request for it (sent when this one was overdue) is still out.
    fn records_answered(&mut self, author: AuthorId, req: ReqId) {
        if self
            .records_asked
            .get(&author)
            .is_some_and(|(latest, _)| *latest == req)
        {
            self.records_asked.remove(&author);
        }
    }

    /// Fetched records go to the inbox; those that are not what we asked
    /// for (another author, before `from`, more than asked, undecodable)
    /// are dropped and count against the sender.
    fn on_records(&mut self, peer: PeerId, author: AuthorId, from: Seq, records: Vec<Vec<u8>>) {
        let mut stray = records.len() > MAX_RECORDS_PER_RESPONSE as usize;
        for bytes in records.into_iter().take(MAX_RECORDS_PER_RESPONSE as usize) {
            let fits =
                SignedRecord::from_bytes(&bytes).is_ok_and(|r| r.record.author == author && r.record.seq >= from);
            if !fits {
                stray = true;
                continue;
            }
            self.emit(Effect::Inbox(Job::Record {
                bytes,
                payload: None,
                origin: Origin::Fetched { from: peer },
            }));
        }
        if stray {
            warn!(peer = %short(&peer), author = %author.short(), "fetched records that were not asked for; dropped");
            self.fetch_fault(peer, RejectReason::Malformed);
        }
    }

    /// A peer answered a fetch with something wrong: it pays as a gossip
    /// sender of invalid data would (the shell lowers its score).
    pub(super) fn fetch_fault(&mut self, peer: PeerId, reason: RejectReason) {
        self.settle(&Origin::Fetched { from: peer }, &Outcome::Invalid(reason), false);
        self.emit(Effect::FetchFault { peer });
    }

    pub(super) fn on_checked(&mut self, done: Done) {
        match done {
            Done::Record(done) => self.on_record(*done),
            Done::PayloadRefused { hash, from, fault } => match fault {
                PayloadFault::NotThePayload => {
                    warn!(peer = %short(&from), payload = %hash.short(), "peer served bytes that are not the payload");
                    self.fetch_fault(from, RejectReason::PayloadHashMismatch);
                    self.payload_attempt_failed(hash);
                }
                PayloadFault::Unknown | PayloadFault::Author(_) => {
                    if let Some(w) = self.wants.done(&hash) {
                        self.book.unannounce(w.round, &w.author);
                        self.maybe_close();
                    }
                }
            },
            Done::OwnStored { signed, payload } => self.own_stored(*signed, payload),
            Done::OwnFailed(e) => self.emit(Effect::Fatal(CoreFault::OwnRecord(e))),
            Done::LedgerFailed(e) => self.emit(Effect::Fatal(CoreFault::Ledger(e))),
            Done::VerdictStored { round } => debug!(round, "verdict block stored"),
            Done::VerdictFailed(e) => self.emit(Effect::Fatal(CoreFault::VerdictBlock(e))),
            Done::Proof { origin, outcome, proof } => {
                self.settle(&origin, &outcome, false);
                if let Some(p) = proof {
                    // Built here from two votes, nobody else has it yet; one
                    // that came by gossip is passed on by gossipsub itself.
                    let publish = origin == Origin::Local && outcome == Outcome::Accepted;
                    self.on_equivocation(&p, publish, "equivocation proof");
                }
            }
            Done::JoinStored { round } => debug!(round, "join stored"),
            Done::JoinFailed(e) => warn!(error = %e, "cannot record the join in the ledger"),
            Done::Vote { origin, outcome, block } => {
                self.settle(&origin, &outcome, false);
                if let Some(block) = block {
                    if block.block.round + 1 < self.end_round {
                        // A round's verdicts (open runs), not a vote: a
                        // member that repaired votes by its next record
                        // for another anchor than its block names.
                        // Only open runs earn anything (a roster's member
                        // sending them is ignored, not kept).
                        let b = &block.block;
                        if self.power.is_open() && self.power.of(&b.owner) > 0 {
                            let made = (b.new_anchor, b.outer_state);
                            let looked = self.note_credits(b.owner, b.round, made, &b.entries);
                            // One we asked for (its gossip was lost here):
                            // passed on, so that a block shown to one asker
                            // reaches every node (and one shown apart is
                            // seen twice everywhere; see `note_credits`).
                            if looked && matches!(origin, Origin::Fetched { .. }) {
                                self.emit(Effect::Publish(GossipMessage::Vote {
                                    block: block.to_bytes(),
                                }));
                            }
                        }
                    } else {
                        self.add_vote(Vote::Block(*block));
                    }
                }
            }
        }
    }

    fn on_record(&mut self, done: RecordDone) {
        self.settle(&done.origin, &done.outcome, true);
        let source = done.origin.peer();
        if let Outcome::Invalid(reason) = &done.outcome {
            warn!(
                round = self.round(),
                author = ?done.author.map(|a| a.short()),
                seq = ?done.seq.map(|s| s.0),
                from = ?source.map(|p| short(&p)),
                %reason,
                "rejected update"
            );
            if reason != &RejectReason::PayloadHashMismatch {
                self.count_rejection(reason.code(), done.author.as_ref());
            }
        }
        if matches!(
            done.outcome,
            Outcome::Ignored(IgnoreReason::BannedAuthor | IgnoreReason::VoteOnly)
        ) {
            self.count_rejection("banned", done.author.as_ref());
        }
        if let (true, Some(author), Some(seq), Some(round)) = (done.stored, done.author, done.seq, done.round) {
            self.chains.insert(author, ChainPos { seq: seq.0, round });
        }
        if let (false, Some(_), Some(author), Some(seq), Some(round)) =
            (done.stored, &done.signed, done.author, done.seq, done.round)
        {
            // A banned author's record, not stored but counted as a vote:
            // note how far its chain is known without a gap, so that
            // anti-entropy asks for the rest.
            let next = self.chains.get(&author).map_or(0, |c| c.seq.saturating_add(1));
            if seq.0 == next {
                self.chains.insert(author, ChainPos { seq: seq.0, round });
            }
        }
        if let Some(signed) = done.signed {
            self.add_vote(Vote::Record(*signed));
            self.check_round_lag();
        }
        // The payload's fate is known: stop asking for it.
        if done.contribution.is_some() || done.rejection.is_some() {
            if let Some(h) = done.payload_hash {
                self.wants.done(&h);
            }
        }
        if let Some(entry) = done.rejection {
            self.book.unannounce(entry.round, &entry.author);
            if self
                .recorded_rejections
                .entry(entry.round)
                .or_default()
                .insert(entry.record_hash)
            {
                if let Some(ban) = self.reputation.observe(entry.author, self.round(), &entry.verdict) {
                    self.ban(entry.author, &ban.to_string());
                }
                self.book.reject(entry);
            }
            self.maybe_close();
        }
        if let Some(proof) = done.proof {
            self.on_equivocation(&proof, true, "equivocation");
        }
        if let (Some(author), Some(from), Some(peer)) = (done.author, done.gap_from, source) {
            self.request_records(peer, author, from);
        }
        if done.need_payload {
            if let (Some(hash), Some(author), Some(seq), Some(record_hash), Some(round)) =
                (done.payload_hash, done.author, done.seq, done.record_hash, done.round)
            {
                if self.round_matters(round) && !self.members.is_banned(&author) {
                    self.book.announce(round, author, self.now);
                }
                if self.too_far_ahead(round) {
                    self.set_aside(author, round);
                }
                let of = WantedFor {
                    author,
                    seq,
                    record_hash,
                    round,
                };
                self.want_payload(hash, of, source);
            }
        }
        if let Some(c) = done.contribution {
            self.offer(c);
        }
    }

    /// Whether an update for `round` may matter to this node now: not behind
    /// the staleness window, nor beyond the next round.
    pub(super) fn round_matters(&self, round: u64) -> bool {
        round.saturating_add(self.cfg.spec.exchange.staleness) >= self.round() && !self.too_far_ahead(round)
    }

    /// Whether an update for `round` is beyond the next round: it cannot be
    /// aggregated before two rounds close, so its delta (a full vector even
    /// when a tiny top-k payload carried it) is not held and its payload
    /// not fetched yet. A peer could otherwise park one per future round.
    pub(super) fn too_far_ahead(&self, round: u64) -> bool {
        round > self.round().saturating_add(1)
    }

    pub(super) fn want_payload(&mut self, hash: PayloadHash, of: WantedFor, first: Option<PeerId>) {
        if self.wants.contains(&hash) || !self.round_matters(of.round) {
            return;
        }
        if matches!(self.phase, Phase::Fetching) {
            // Our shard is still coming: payloads would take the link from
            // it (on 2 Mbit/s, a round's payloads every half second left
            // the blocks none), and rounds we cannot train in need none.
            // The records are held; `begin_rounds` wants their payloads.
            return;
        }
        // The author first: it stored the payload before it announced the
        // record, where the peer that relayed the record may still be
        // fetching it (each such miss cost a retry pause, and rounds of
        // four nodes on loopback took 300 ms instead of 100).
        let mut candidates: Vec<PeerId> = members::peer_of(&of.author).into_iter().collect();
        candidates.extend(first);
        candidates.extend(self.members.peers());
        if self.wants.want(hash, of, candidates) {
            self.next_payload_attempt(hash);
        }
    }

    pub(super) fn next_payload_attempt(&mut self, hash: PayloadHash) {
        match self.wants.next(&hash, self.now) {
            Next::Ask(peer) => {
                self.request(peer, FetchRequest::Payload { hash: hash.0 }, RequestFor::Payload(hash));
                self.arm_payload_retry();
            }
            Next::GiveUp(of) => {
                warn!(author = %of.author.short(), round = of.round, "no peer could supply a payload");
                self.book.unannounce(of.round, &of.author);
                self.book.reject(VerdictEntry {
                    author: of.author,
                    seq: of.seq,
                    record_hash: of.record_hash,
                    round: of.round,
                    prior: 0.0,
                    verdict: Verdict::Rejected {
                        reason: RejectReason::PayloadUnavailable,
                    },
                });
                self.maybe_close();
            }
            Next::Nothing => {}
        }
    }

    fn payload_attempt_failed(&mut self, hash: PayloadHash) {
        self.wants.failed(&hash, self.now);
        self.arm_payload_retry();
    }

    pub(super) fn retry_payloads(&mut self) {
        for hash in self.wants.due(self.now) {
            self.next_payload_attempt(hash);
        }
        let after = self.hedge_after();
        for hash in self.wants.hedges(self.now, after) {
            debug!(payload = %hash.short(), after_ms = after, "payload request slow; asking the next peer too");
            self.next_payload_attempt(hash);
        }
        self.arm_payload_retry();
    }

    /// The payload timer: the earliest retry, or the earliest hedge.
    fn arm_payload_retry(&mut self) {
        let at = [self.wants.next_retry(), self.wants.next_hedge(self.hedge_after())]
            .into_iter()
            .flatten()
            .min();
        if let Some(at) = at {
            self.arm(Timer::PayloadRetry, at.max(self.now));
        }
    }

    /// How long a payload request may take before the next peer is asked
    /// too: four times what fetches took lately, 100 ms to 5 s (on a slow
    /// link a fetch takes long, and asking twice would double its bytes).
    fn hedge_after(&self) -> Millis {
        self.payload_fetch_ms
            .map_or(HEDGE_MAX_MS, |ms| (4.0 * ms) as Millis)
            .clamp(HEDGE_MIN_MS, HEDGE_MAX_MS)
    }

    /// An author is proven to have signed two conflicting records: its
    /// votes stop counting, it is banned, and (when `publish`) every node
    /// gets the proof.
    fn on_equivocation(&mut self, proof: &meshtrain_ledger::EquivocationProof, publish: bool, why: &str) {
        if publish {
            self.emit(Effect::Publish(GossipMessage::Equivocation {
                proof: proof.to_bytes(),
            }));
        }
        self.votes.void(proof.author());
        self.ban(proof.author(), why);
    }

    /// A signed vote (a record, or a final verdict block) of an admitted
    /// author. A ban stops merging an author's updates, not counting its
    /// votes: nodes ban at different times, and if each dropped those votes
    /// from its own ban on, they would count different votes for the same
    /// round and could decide it apart. Votes reach every node alike:
    /// members that took a record store and serve it, a node that banned
    /// its author serves it from its votes, a final vote is served by any
    /// member that holds it, and a node that lacks one asks.
    pub(super) fn add_vote(&mut self, vote: Vote) {
        let voter = vote.voter();
        if !self.power.admitted(&voter) {
            return;
        }
        let Some(starts) = vote.starts() else { return };
        // Votes from before our latest decision change nothing; voters
        // without power (unearned keys) count for nothing; and no anchor
        // starts after the run's last round. This bounds what is kept by
        // rounds times voters.
        if starts < self.vote_floor() || starts > self.end_round {
            return;
        }
        if self.power.total() > 0 && self.power.of(&voter) == 0 {
            // Counted once the key earns its vote here (`promote_earned`).
            self.votes.hold_unearned(vote);
            return;
        }
        // Two signed records of one voter for one round prove equivocation
        // (a banned voter's records are not checked against its chain, so
        // this is where such a pair shows): a node that saw only one of them
        // would count that one, so the proof goes to every node, and none
        // counts the voter.
        if let (Some(Vote::Record(first)), Vote::Record(second)) = (self.votes.get(starts, &voter), &vote) {
            if first.hash() != second.hash() {
                let proof = meshtrain_ledger::EquivocationProof::new(first.clone(), second.clone());
                if proof.verify().is_ok() {
                    warn!(voter = %voter.short(), round = starts, "two records for one round");
                    self.emit(Effect::Inbox(Job::Proof {
                        bytes: proof.to_bytes(),
                        origin: Origin::Local,
                    }));
                }
            }
        }
        let voted_for = vote.anchor();
        match self.votes.add(vote) {
            Added::New => {
                if starts == self.end_round && voted_for != self.anchor_key() {
                    // A member that ends on another anchor will repair onto
                    // the decided one and fetch it: draining waits for that.
                    self.odd_final_vote_at = self.now;
                }
                self.on_vote(starts)
            }
            Added::Known => {}
            Added::Conflict => {
                warn!(voter = %voter.short(), round = starts, "a second, different vote for one round; the first stands")
            }
        }
    }

    /// Keys that earned their vote here since their votes were kept aside:
    /// those votes count now, as at a node that credited the keys earlier.
    pub(super) fn promote_earned(&mut self) {
        let mut touched = std::collections::BTreeSet::new();
        for voter in self.votes.unearned_voters() {
            if self.power.of(&voter) == 0 {
                continue;
            }
            for vote in self.votes.take_unearned(&voter) {
                if let (Some(starts), Added::New) = (vote.starts(), self.votes.add(vote)) {
                    touched.insert(starts);
                }
            }
        }
        for starts in touched {
            if let Some(key) = self.votes.tally(starts, &self.power).decided() {
                self.note_decision(starts, key);
            }
        }
    }

    /// The oldest round whose votes we keep: that of our latest decision
    /// (a later decision, learnt late, is where a split mesh goes back to),
    /// but no more than [`VOTE_HISTORY`] rounds back.
    pub(super) fn vote_floor(&self) -> u64 {
        let current = self.round();
        let decided = self.decided.as_ref().map_or(0, |d| d.starts);
        // Two rounds back at least: a rebuild of the round before may need
        // the record of an update late in it from the round before that.
        decided
            .min(current.saturating_sub(2))
            .max(current.saturating_sub(VOTE_HISTORY))
    }

    /// Notes an update of `author` for `round` left for later.
    pub(super) fn set_aside(&mut self, author: AuthorId, round: u64) {
        if self.skipped_ahead.len() >= MAX_SET_ASIDE && !self.skipped_ahead.contains_key(&author) {
            // Full (only fresh keys of an open run get here): the farthest
            // round gives way to a nearer one, so updates parked far ahead
            // cannot crowd out the next rounds'. What gives way stays in
            // the ledger, and a sync rebuilds every author's records.
            let farthest = self
                .skipped_ahead
                .iter()
                .max_by_key(|(_, r)| **r)
                .map(|(a, r)| (*a, *r));
            match farthest {
                Some((far, at)) if at > round => {
                    self.skipped_ahead.remove(&far);
                }
                _ => return,
            }
        }
        let at = self.skipped_ahead.entry(author).or_insert(round);
        *at = (*at).min(round);
    }

    /// At the start of `round`: the inbox rebuilds the updates set aside
    /// whose round is now the next one (or this one), and drops what it
    /// holds for rounds that can no longer be merged; old rejections are
    /// forgotten.
    pub(super) fn tidy_for(&mut self, round: u64) {
        let due: Vec<AuthorId> = self
            .skipped_ahead
            .iter()
            .filter(|(_, r)| **r <= round.saturating_add(1))
            .map(|(a, _)| *a)
            .collect();
        if !due.is_empty() {
            for a in &due {
                self.skipped_ahead.remove(a);
            }
            self.emit(Effect::Inbox(Job::Rebuild {
                round,
                authors: Some(due),
            }));
        }
        let staleness = self.cfg.spec.exchange.staleness;
        self.emit(Effect::Inbox(Job::Prune {
            round,
            keep_from: round.saturating_sub(staleness),
        }));
        let floor = round.saturating_sub(VOTE_HISTORY.saturating_add(staleness));
        self.recorded_rejections = self.recorded_rejections.split_off(&floor);
        self.reputation.forget_idle(round);
    }

    /// Keeps updates this node will not merge (too late, or of rounds it
    /// skipped) for a rebuild of the round others merged them in: one
    /// dropped when a node skipped ahead was fetched again and again at
    /// the end of a run, its payload already in the ledger (simulator,
    /// `--attack dissensus`, seed 375).
    pub(super) fn keep_stale(&mut self, updates: impl IntoIterator<Item = Contribution>) {
        for c in updates {
            if !self.stale_kept.iter().any(|k| k.record_hash == c.record_hash) {
                self.stale_kept.push_back(c);
            }
        }
        // Over the cap the oldest round goes first: a restart reads back
        // every author's last rounds at once, author by author, and
        // dropping the first in would drop whole authors.
        while self.stale_kept.len() > super::STALE_KEPT {
            let oldest = (0..self.stale_kept.len())
                .min_by_key(|i| self.stale_kept[*i].round)
                .unwrap_or(0);
            self.stale_kept.remove(oldest);
        }
    }

    /// A verified delta for some round: kept for its round's aggregation.
    pub(super) fn offer(&mut self, c: Contribution) {
        if self.members.is_banned(&c.author) {
            return;
        }
        if self.too_far_ahead(c.round) {
            // Its record is stored: `start_round` has the inbox rebuild it
            // when its round is the next one.
            debug!(round = self.round(), author = %c.author.short(), for_round = c.round, "update too far ahead; set aside");
            self.set_aside(c.author, c.round);
            return;
        }
        debug!(round = self.round(), author = %c.author.short(), for_round = c.round, "update verified");
        let (author, seq, hash, round) = (c.author, c.seq, c.record_hash, c.round);
        let copy = c.clone();
        match self.book.offer(c, self.now) {
            BookOffer::Stale => {
                self.count_rejection("stale", Some(&author));
                debug!(author = %author.short(), seq = seq.0, record = %hash.short(), round, "stale update");
                // Too late to merge here, but others may have merged it: a
                // rebuild of the round they merged it in needs it.
                self.keep_stale([copy]);
            }
            // Of a round we skipped: others close it, or merge it late at
            // the next close, which a rebuild of ours may have to redo
            // (simulator, `--byzantine 1 --attack dissensus`, seed 2210: a
            // node that skipped round 28 dropped a late member's round-28
            // update the others merged in round 29, then could not rebuild
            // round 29 and ended on its own anchor).
            // Only one a rebuild of the round just closed may take (that
            // round's, or one late there from the round before): a node
            // catching up is handed older ones by the dozen, and the few
            // kept are for the rounds it may still have to redo.
            BookOffer::Before if round + self.cfg.spec.exchange.staleness + 1 >= self.round() => {
                debug!(author = %author.short(), record = %hash.short(), round, "update of a round skipped; kept for a rebuild");
                self.keep_stale([copy]);
            }
            BookOffer::Before | BookOffer::Kept | BookOffer::Duplicate => {}
        }
        if let Phase::Colluding(_) = self.phase {
            self.collusion_saw_update();
        }
        self.late_rearm();
        self.maybe_close();
    }
}
