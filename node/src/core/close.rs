//! Closing a round: the moment the last expected update or the deadline
//! arrives (no polling), onto the anchor the voting power decided for the
//! round (repairing ours first when it differs), the robust aggregation
//! (run off the event loop), and the signed verdict block that records what
//! was done with each update and which anchor came of it.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use meshtrain_gossip::GossipMessage;
use meshtrain_ledger::{AuthorId, RejectReason, Verdict, VerdictBlock, VerdictEntry, WeightsHash, VERDICT_VERSION};
use meshtrain_model::aggregate::aggregate as aggregate_deltas;
use meshtrain_model::{AggInput, AggVerdict, AggregatorSpec, OuterOptimizer};
use rand::seq::{IndexedRandom, SliceRandom};
use tracing::{debug, info, warn};

use super::rounds::{Close, RoundInputs};
use super::sync::Fetched;
use super::sync::Purpose;
use super::{AnchorSnapshot, Core, CoreFault, Effect, Millis, Phase, RoundClosed, Settled, Timer};
use crate::inbox::Job;

/// How long a round's close waits for the decided anchor it must repair
/// onto before it goes on with its own.
const REPAIR_WAIT_MS: Millis = 15_000;
/// How often a close that cannot go on yet looks again.
const RECHECK_MS: Millis = 1000;
/// How often a close waiting on votes asks for the ones it lacks.
const VOTE_ASK_MS: Millis = 250;
/// How many members a vote is asked of when its voter is not one we are
/// connected to.
const VOTE_ASK_PEERS: usize = 3;

/// How long past a round's deadline a node waits to hear from more than
/// half the voting power before it gives up: long enough for a short
/// partition to heal or crashed members to come back.
fn isolation_ms(max_wait_ms: Millis) -> Millis {
    (2 * max_wait_ms).max(60_000)
}

/// How many times that long a node waits when most of the voting power is
/// connected but has not voted yet: those members are alive and behind
/// (fetching their shard over a slow link before their first round), and
/// giving up on them would stop the one node that was ready first.
const BEHIND_FACTOR: Millis = 10;

/// One round's aggregation, for a worker thread (or inline, simulated).
#[derive(Debug)]
pub struct AggregateJob {
    pub spec: AggregatorSpec,
    pub anchor: Arc<Vec<f32>>,
    pub inputs: RoundInputs,
    /// Updates of keys on probation: judged, not merged.
    pub probation: Vec<super::rounds::Contribution>,
    pub outer: OuterOptimizer,
    pub wait_ms: u64,
}

/// An anchor's weights and outer state.
type AnchorState = (Arc<Vec<f32>>, Arc<Vec<f32>>);

/// What [`Core::rebuild_round`] came to.
enum Rebuild {
    /// Votes still out could change which anchor or updates.
    Wait,
    /// The anchor built on is being fetched.
    Fetching,
    Unable,
    Built(Box<Rebuilt>),
}

#[derive(Clone)]
pub(super) struct Rebuilt {
    /// The round rebuilt (its result starts the next).
    prev: u64,
    /// The anchor it was built on, its weights and outer state.
    from: super::agreement::AnchorKey,
    base: AnchorState,
    /// The rebuilt anchor.
    key: super::agreement::AnchorKey,
    done: AggregateDone,
    taken: std::collections::BTreeSet<meshtrain_ledger::RecordHash>,
    updates: usize,
}

/// What a round's aggregation produced.
#[derive(Clone, Debug)]
pub struct AggregateDone {
    pub round: u64,
    pub anchor: Vec<f32>,
    pub outer: OuterOptimizer,
    pub entries: Vec<VerdictEntry>,
    pub wait_ms: u64,
    /// Wall-clock time of the two halves, for the node's stage timings
    /// (nothing in the core reads them: the simulator stays deterministic).
    pub took: AggregateTimes,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct AggregateTimes {
    /// The robust aggregate and the verdicts.
    pub aggregate: std::time::Duration,
    pub outer_step: std::time::Duration,
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
    /// deadline passed, onto the decided anchor. Called whenever any of
    /// these may have changed.
    pub(super) fn maybe_close(&mut self) {
        // Deciding the base can fail a fetch, which asks to close again:
        // one close at a time.
        if self.closing || !matches!(self.phase, Phase::Waiting(_)) || self.outer.is_none() {
            tracing::trace!(
                closing = self.closing,
                phase = self.phase.name(),
                outer = self.outer.is_some(),
                "cannot close now"
            );
            return;
        }
        // The quorum counts every expected member, the habitually late
        // too: left out, the quorum (and so the grace) came sooner than the
        // honest members' spread, and a late member not yet judged landed
        // between the honest nodes' closes. No round waits for them to be
        // all in.
        let late = self.late_members();
        let all = self.book.expected(&self.connected_authors());
        // The first round waits longer for a member still fetching its
        // shard (the netns test's slow host skipped round 0 otherwise);
        // one that is not gets the quorum's spread. When the last of them
        // stops counting as fetching, the deadline moves earlier: look
        // again then.
        let mut fetching_until = None;
        if !self.block_asks.is_empty() && self.round() == self.book.joined_at() {
            let round = self.round();
            fetching_until = all
                .iter()
                .filter(|a| !self.book.has(round, a))
                .filter_map(|a| self.block_asks.get(a))
                .map(|t| t + super::FETCHING_MS)
                .filter(|until| *until > self.now)
                .max();
            self.book.members_fetching(fetching_until.is_some());
        }
        self.book.note_arrivals(self.now, &all);
        let expected: HashSet<AuthorId> = all.into_iter().filter(|a| !late.contains(a)).collect();
        let Some(how) = self.book.should_close(self.now, &expected) else {
            tracing::trace!(round = self.round(), deadline = ?self.book.deadline(), "not closing yet");
            // A quorum in brings the deadline forward.
            if let Some(at) = self.book.deadline().map(|d| fetching_until.map_or(d, |f| d.min(f))) {
                if self
                    .armed
                    .get(&Timer::Deadline)
                    .is_none_or(|a| *a <= self.now || *a > at)
                {
                    self.arm(Timer::Deadline, at);
                }
            }
            return;
        };
        self.closing = true;
        let decided = self.base_is_decided();
        self.closing = false;
        if !decided {
            if tracing::enabled!(tracing::Level::TRACE) {
                let tally = self.votes.tally(self.round(), &self.power);
                tracing::trace!(
                    round = self.round(),
                    support = tally.support,
                    seen = tally.seen,
                    total = tally.total,
                    decided = tally.decided().is_some(),
                    fetching = self.fetch.is_some(),
                    "the round's base is not decided yet"
                );
            }
            // Whatever we wait for (votes, a fetch, the grace), look again
            // soon: no wait may depend on an event that might never come.
            let again = self.now + RECHECK_MS;
            if self
                .armed
                .get(&Timer::Deadline)
                .is_none_or(|at| *at <= self.now || *at > again)
            {
                self.arm(Timer::Deadline, again);
            }
            return;
        }
        if how != Close::AllIn {
            let have: HashSet<AuthorId> = self.book.for_round(self.round()).map(|c| c.author).collect();
            let missing: Vec<String> = expected.difference(&have).map(|a| a.short()).collect();
            if how == Close::Quorum {
                info!(
                    round = self.round(),
                    ?missing,
                    "a quorum was in and the stragglers' grace passed"
                );
            } else {
                info!(round = self.round(), ?missing, "round deadline passed");
            }
        }
        let mut inputs = self.book.close();
        self.waited = Some((inputs.round, std::mem::take(&mut inputs.waited)));
        self.aggregate(inputs);
    }

    /// The members this round waits for no longer (see `lateness`), judged
    /// once a round, and handed to the round book.
    fn late_members(&mut self) -> HashSet<AuthorId> {
        let round = self.round();
        // Rounds up to two back, while their votes are held, at every look:
        // a vote that came since may judge a member (a judgement once made
        // stands).
        for d in self.vote_floor()..round.saturating_sub(1) {
            if let Some(j) = self.votes.came_late(d, &self.power) {
                if self.lateness.note(d, &j) > 0 {
                    let came_late: Vec<String> = j.iter().filter(|(_, l)| **l).map(|(a, _)| a.short()).collect();
                    debug!(
                        judged = d,
                        ?came_late,
                        in_time = j.len() - came_late.len(),
                        "who came late to a round"
                    );
                }
            }
        }
        if self.late_taken_at == Some(round) {
            return self.book.not_waited_for().clone();
        }
        // The round's set, once, from the rounds judged so far (two back at
        // most; taking only those judged during a whole round, three back,
        // let one dissensus seed of 1000 end with a straggler on its own
        // anchor). Ourselves too: a node judged late leaves its own update
        // that came after the quorum for the next close, like every other
        // node does, rather than make an anchor no one else makes.
        let late: HashSet<AuthorId> = self.lateness.late(round.saturating_sub(2)).into_iter().collect();
        let before = self.book.not_waited_for();
        for a in late.difference(before) {
            if *a == self.me {
                info!(
                    round,
                    "we habitually come late: our updates that come after the quorum wait for the next close"
                );
            } else {
                info!(round, author = %a.short(), "it habitually comes late (rounds waited for its updates, or closed without them): rounds no longer wait for it");
            }
        }
        for a in before.difference(&late) {
            info!(round, author = %a.short(), "it comes in time again: rounds wait for it");
        }
        self.book.wait_not_for(late.clone());
        self.late_taken_at = Some(round);
        late
    }

    /// Voting power of the members we are connected to that `keep` picks.
    fn connected_power_where(&self, keep: impl Fn(&AuthorId) -> bool) -> u64 {
        self.connected_authors()
            .iter()
            .filter(|a| keep(a))
            .map(|a| self.power.of(a))
            .sum()
    }

    /// Voting power of the members we banned that have not voted for
    /// `round` but kept up until the round before: their votes still count
    /// and reach us through the members that take their records, as soon
    /// as a connected member's would.
    fn banned_alive_power(&self, round: u64, voted: &std::collections::BTreeSet<AuthorId>) -> u64 {
        self.power
            .holders()
            .into_iter()
            .filter(|a| self.members.is_banned(a) && !voted.contains(a))
            // Its records come to us out of order (its chain here has gaps
            // where members served only its latest votes): its last vote
            // tells how far it kept up.
            .filter(|a| self.votes.last_voted(a).is_some_and(|r| r + 1 >= round))
            .map(|a| self.power.of(&a))
            .sum()
    }

    /// Whether this round may be aggregated onto the base we hold: ours is
    /// the decided one, or the decided one is fetched (and taken over
    /// here) or cannot be had in time, or enough voters were heard to know
    /// that none will be decided (then we go back to the last decided one).
    fn base_is_decided(&mut self) -> bool {
        let round = self.round();
        if round == 0 {
            // Round 0 starts from the genesis weights the run spec fixes.
            return true;
        }
        let tally = self.votes.tally(round, &self.power);
        // The mesh may be a round ahead of us: what more than half of the
        // voting power built this round on is its anchor, voted for or not
        // (a rebuilt round has no votes of its own).
        let decided = tally
            .decided()
            .or_else(|| self.votes.built_on(round + 1, &self.power).flatten());
        let Some(key) = decided else {
            if self.power.total() == 0 {
                // Nobody has a vote yet (an open run's first rounds).
                return true;
            }
            self.ask_missing_votes(round);
            if 2 * tally.seen < tally.total {
                // Too few voters heard from to decide anything (we are on
                // a minority side, or most members are down): wait for
                // them rather than run ahead on an anchor nobody agreed,
                // but not forever (a node cut off for good, or banned by
                // everyone, stops with an error instead of hanging).
                // While members we are connected to could still make up
                // the half, they are alive and behind (fetching their
                // shard over a slow link, say), not gone: wait longer.
                let voted = self.votes.voters(round);
                let connected = self.connected_power_where(|a| !voted.contains(a));
                let isolation = isolation_ms(self.cfg.spec.rounds.max_wait_ms);
                let patience = if 2 * (tally.seen + connected) > tally.total {
                    BEHIND_FACTOR * isolation
                } else {
                    isolation
                };
                if let Some(deadline) = self.book.deadline() {
                    let give_up = deadline + patience;
                    if self.now >= give_up {
                        self.emit(Effect::Fatal(CoreFault::Isolated {
                            round,
                            waited_s: (self.now - deadline) / 1000,
                            heard: tally.seen,
                            of: tally.total,
                        }));
                    } else {
                        self.arm(Timer::Deadline, give_up);
                    }
                }
                return false;
            }
            let outstanding = tally.total.saturating_sub(tally.seen);
            let deadline = self.book.deadline();
            if deadline.is_some_and(|d| self.now < d) && 2 * (tally.support + outstanding) >= tally.total {
                // Votes still out could decide it: wait for them until the
                // round's deadline (a voter may be catching up, not training).
                return false;
            }
            // Past the deadline, wait on for the votes of connected members
            // only, and one more round timeout at most: a node a little
            // ahead of the mesh (it closes at deadlines while the others
            // still train) would otherwise give up on an anchor about to be
            // decided, go back a round, and stay a round behind in anchors
            // from then on. Members we are cut off from cannot vote soon.
            let voted = self.votes.voters(round);
            let reachable = self.connected_power_where(|a| !voted.contains(a)) + self.banned_alive_power(round, &voted);
            let best = tally.support + reachable;
            let could = if reachable >= outstanding {
                2 * best >= tally.total
            } else {
                2 * best > tally.total
            };
            let grace = deadline.map(|d| d + self.book.wait.timeout());
            if could && grace.is_some_and(|g| self.now < g) {
                return false;
            }
            // Members still behind us (their chains end before this round)
            // will vote once they train it: while their votes could decide,
            // wait for them (bounded). A node that ran ahead of a slowed
            // mesh would otherwise give round after round up alone.
            let behind =
                self.connected_power_where(|a| !voted.contains(a) && self.head_round(a).is_none_or(|r| r < round));
            let could_later = if behind >= outstanding {
                2 * (tally.support + behind) >= tally.total
            } else {
                2 * (tally.support + behind) > tally.total
            };
            let patience = deadline.map(|d| d + isolation_ms(self.cfg.spec.rounds.max_wait_ms));
            if could_later && patience.is_some_and(|p| self.now < p) {
                return false;
            }
            if let Some(go_on) = self.rebuild_if_split(round, &tally, grace) {
                return go_on;
            }
            return self.revert_if_split(round);
        };
        tracing::trace!(
            round,
            support = tally.support,
            seen = tally.seen,
            total = tally.total,
            ours = key == self.anchor_key(),
            "the round's base is decided"
        );
        self.note_decision(round, key);
        if key == self.anchor_key() {
            self.settle_here(round);
            return true;
        }
        if let Some(f) = self.fetched.take() {
            if f.starts == round && f.key == key {
                self.adopt(*f, Purpose::Repair);
                self.settle_here(round);
                return true;
            }
        }
        match &self.fetch {
            Some(f) if f.starts == round && f.key == key => {
                if self.now.saturating_sub(f.since) < REPAIR_WAIT_MS {
                    return false;
                }
                warn!(round, "the decided anchor did not arrive in time; closing on ours");
                self.fetch = None;
                true
            }
            // Nobody could serve it: go on with ours.
            _ if self.unavailable == Some((round, key)) => true,
            _ => {
                self.fetch_anchor(round, key, Purpose::Repair);
                self.fetch.is_none()
            }
        }
    }

    /// While a round waits on votes, asks for the records of the voters
    /// whose vote for it we lack (at most every [`VOTE_ASK_MS`]): a record
    /// lost on the way, or one that a voter showed only some members (one
    /// we banned still sends to those that did not, and a hostile one may
    /// do it on purpose). Nodes that decide with a vote others lack, and
    /// others that give the round up without it, would split; pulling the
    /// vote from whoever has it closes that gap before the deadline.
    /// Each voter's chain is asked of the voter when it is a member we are
    /// connected to, else of a member picked at random.
    fn ask_missing_votes(&mut self, round: u64) {
        if self
            .votes_asked
            .is_some_and(|(r, at)| r == round && self.now.saturating_sub(at) < VOTE_ASK_MS)
        {
            return;
        }
        let voted = self.votes.voters(round);
        let members = self.members.by_author();
        let peers: Vec<_> = members.values().copied().collect();
        if peers.is_empty() {
            return;
        }
        let missing: Vec<AuthorId> = self
            .power
            .holders()
            .into_iter()
            .filter(|v| *v != self.me && !voted.contains(v) && self.head_round(v).is_none_or(|r| r < round))
            .collect();
        if missing.is_empty() {
            return;
        }
        self.votes_asked = Some((round, self.now));
        for voter in missing {
            let from = self.chains.get(&voter).map_or(0, |c| c.seq.saturating_add(1));
            let asked: Vec<meshtrain_gossip::libp2p::PeerId> = match members.get(&voter) {
                Some(p) => vec![*p],
                // A voter we are not connected to (one we banned, say) is
                // known only to the members that still take its records:
                // ask a few, so that one of them likely holds it.
                None => peers.choose_multiple(&mut self.rng, VOTE_ASK_PEERS).copied().collect(),
            };
            for peer in asked {
                tracing::debug!(round, voter = %voter.short(), from, peer = %super::start::short(&peer), "asking for a vote we lack");
                self.ask_records(peer, voter, meshtrain_ledger::Seq(from));
            }
        }
    }

    /// Our base for `round` is the decided anchor: remember it whole.
    fn settle_here(&mut self, round: u64) {
        let key = self.anchor_key();
        if self.settled.as_ref().is_some_and(|s| s.starts == round && s.key == key) {
            return;
        }
        self.settled = Some(Settled {
            starts: round,
            key,
            weights: self.anchor.clone(),
            velocity: self.velocity.clone(),
            votes: self.votes.for_anchor(round, &key, &self.power),
        });
    }

    /// No anchor for `round` has half the voting power: the mesh split
    /// into more pieces than votes can mend. Every node goes back to the
    /// latest decided anchor (the latest the votes decided, or a later one
    /// rebuilt from them: the same for all once they see the same votes;
    /// after rounds given up in a row, only the one the votes decided),
    /// giving up the rounds since; a minority side of a
    /// partition makes no lasting progress this way, and nothing a minority
    /// votes for is ever taken. Returns whether the round may close now
    /// (false while the decided anchor is being fetched).
    pub(super) fn revert_if_split(&mut self, round: u64) -> bool {
        if self.power.total() == 0 {
            return true;
        }
        if !self.stalled() {
            self.rebuilt_since_decided(round);
        }
        let Some((starts, key, kept)) = self.revert_target(round) else {
            return true;
        };
        // Votes that came since (records built on a rebuilt anchor) prove
        // it better than those held when it was decided.
        let fresh = self.evidence(starts, &key);
        let votes = if fresh.len() >= kept.len() { fresh } else { kept };
        if key == self.anchor_key() {
            // Already on the latest decided anchor: give this round up all
            // the same (merging would move us onto an anchor nobody decided).
            self.abandoned = Some(round);
            return true;
        }
        // A round we rebuilt after giving it up has no votes of its own, and
        // the records built on it may not be here yet (or be fewer than
        // half: the others may have gone back too): a join with those alone
        // would not replay (simulator, `--byzantine 2 --attack sign-flip`,
        // seed 276: a join with 4 of 10). Go back the way a rebuild does:
        // onto the anchor the round was built on, then the rebuilt round.
        let power = |votes: &[meshtrain_ledger::Vote]| votes.iter().map(|v| self.power.of(&v.voter())).sum::<u64>();
        if 2 * power(&votes) <= self.power.total() {
            let kept = self
                .rebuilt_target
                .as_ref()
                .filter(|r| r.prev + 1 == starts && r.key == key);
            if let Some(r) = kept.cloned() {
                warn!(
                    round,
                    back_to = starts,
                    rebuilt = r.prev,
                    on = %r.from.0.short(),
                    anchor = %key.0.short(),
                    "no anchor has half the voting power; going back to a round rebuilt from the votes"
                );
                self.fetched = None;
                self.adopt_rebuilt(*r, false);
                self.abandoned = Some(round);
                return true;
            }
        }
        let held = match &self.fetched {
            Some(f) if f.key == key => Some((f.weights.clone(), f.velocity.clone())),
            // The anchor we settled on, or one of our own last anchors: we
            // made it, then moved off it (seed 16 of the sign-flip sweep
            // fetched one it held, at the end of the run, from members
            // that had left).
            _ => self.held_anchor(starts, &key).map(|(w, v)| (w, v.to_vec())),
        };
        let Some((weights, velocity)) = held else {
            if self.unavailable == Some((starts, key)) {
                return true;
            }
            if let Some(f) = self.fetch.as_ref().filter(|f| f.key == key) {
                return self.now.saturating_sub(f.since) >= REPAIR_WAIT_MS;
            }
            self.fetch_anchor(starts, key, Purpose::Revert);
            return self.fetch.is_none();
        };
        self.fetched = None;
        let tally = self.votes.tally(round, &self.power);
        warn!(
            round,
            back_to = starts,
            anchor = %key.0.short(),
            support = tally.support,
            seen = tally.seen,
            of = tally.total,
            "no anchor has half the voting power; going back to the last decided one"
        );
        self.revert_onto(round, key, (weights, velocity), starts, votes);
        self.abandoned = Some(round);
        true
    }

    /// Takes `key` over from `starts` on with a `Revert` join backed by
    /// `votes`, for the anchor decided at `decided_at`.
    fn revert_onto(
        &mut self,
        starts: u64,
        key: super::agreement::AnchorKey,
        (weights, velocity): (Arc<Vec<f32>>, Vec<f32>),
        decided_at: u64,
        votes: Vec<meshtrain_ledger::Vote>,
    ) {
        let weights_bytes = meshtrain_model::codec::encode(meshtrain_model::CodecSpec::Dense, &weights);
        let outer_bytes = meshtrain_model::codec::encode(meshtrain_model::CodecSpec::Dense, &velocity);
        self.take_over(
            Fetched {
                starts,
                key,
                weights,
                velocity,
                weights_bytes,
                outer_bytes,
            },
            meshtrain_ledger::JoinKind::Revert,
            decided_at,
            votes,
        );
    }

    /// The anchor going back from `round` takes, with the votes that
    /// decided it: the later of the latest decided anchor and the one we
    /// settled on.
    ///
    /// Once rounds keep being given up (`stalled`), the latest anchor the
    /// votes decided: two nodes can rebuild a round apart (each judges
    /// from the votes it holds which members are silent), and each then
    /// went back to its own rebuild every round, for good (simulator,
    /// `--byzantine 1 --attack dissensus`, seed 1797: three anchors to the
    /// end). What more than half the voting power signed is one for all.
    fn revert_target(&mut self, round: u64) -> Option<(u64, super::agreement::AnchorKey, Vec<meshtrain_ledger::Vote>)> {
        if self.stalled() {
            let (s, k) = self.votes.latest_decided_below(0, round, &self.power)?;
            return Some((s, k, self.evidence(s, &k)));
        }
        // Decisions we took no part in (a round we skipped, one the mesh
        // rebuilt while we were behind) count too: going back to an older
        // one would part us from the others.
        if let Some((s, k)) = self.votes.latest_decided_below(0, round, &self.power) {
            if self.decided.as_ref().is_none_or(|d| d.starts < s || d.starts >= round) {
                self.decided = None;
                self.note_decision(s, k);
            }
        }
        // The later of the two: the votes do not show a round we rebuilt
        // (it has none of its own), so the latest they decide can be older
        // than the anchor we settled on (simulator, `--byzantine 2 --attack
        // sign-flip`, seed 276: a node that rebuilt round 20 went back past
        // it to the anchor round 20 was built on, alone).
        let decided = self.decided.as_ref().filter(|d| d.starts < round);
        let settled = self.settled.as_ref().filter(|s| s.starts < round);
        match (decided, settled) {
            (Some(d), Some(s)) if s.starts > d.starts => Some((s.starts, s.key, s.votes.clone())),
            (Some(d), _) => Some((d.starts, d.key, d.votes.clone())),
            (None, Some(s)) => Some((s.starts, s.key, s.votes.clone())),
            (None, None) => None,
        }
    }

    /// While a final round waits on votes before it rebuilds or goes back:
    /// fetches the anchor going back would take, if we lack it. The others
    /// may go back at once and be gone when our wait ends (simulator,
    /// `--byzantine 2 --attack sign-flip`, seed 16: three nodes that gave
    /// round 29 up waited 3 s for a banned member's final vote, then found
    /// nobody left to serve the anchor the rest had gone back to).
    pub(super) fn prefetch_revert_target(&mut self, round: u64) {
        if self.fetch.is_some() || self.power.total() == 0 {
            return;
        }
        let Some((starts, key, _)) = self.revert_target(round) else {
            return;
        };
        if key == self.anchor_key()
            || self.unavailable == Some((starts, key))
            || self.fetched.as_ref().is_some_and(|f| f.key == key)
            || self.held_anchor(starts, &key).is_some()
        {
            return;
        }
        self.fetch_anchor(starts, key, Purpose::Revert);
    }

    /// Rounds have been given up `GIVEN_UP_BEFORE_VOTES_ONLY`
    /// times in a row: going back takes only what the votes decided.
    fn stalled(&self) -> bool {
        self.given_up_in_a_row >= super::GIVEN_UP_BEFORE_VOTES_ONLY
    }

    /// Keeps what `owner`'s verdicts of `round` credit (open runs); false
    /// when the round is out of the window and nothing was looked at.
    pub(super) fn note_credits(
        &mut self,
        owner: AuthorId,
        round: u64,
        made: super::agreement::AnchorKey,
        entries: &[meshtrain_ledger::VerdictEntry],
    ) -> bool {
        if self.credited_through.is_some_and(|c| round <= c) || round > self.round() + 1 {
            return false;
        }
        if self.credit_conflicts.contains(&(round, owner)) {
            return true;
        }
        let earned = entries
            .iter()
            .filter(|e| e.round == round && super::power::earns(&e.verdict))
            .map(|e| e.author)
            .collect();
        let notes = self.credit_notes.entry(round).or_default();
        match notes.get(&owner) {
            None => {
                notes.insert(owner, (made, earned));
            }
            Some(n) if *n == (made, earned) => {}
            // Two blocks of one owner for one round that credit apart (an
            // owner answering each asker another block, or one it signed
            // but never gossiped, passed on by someone else): "the first
            // one stands" would count each node's first, so neither counts.
            Some(_) => {
                notes.remove(&owner);
                self.credit_conflicts.insert((round, owner));
                warn!(round, owner = %owner.short(), "two verdict blocks of one round credit apart; neither counts");
            }
        }
        true
    }

    /// Asks each member with a vote whose verdict block of `round` we lack
    /// for it (open runs: the credits it gave; gossip can lose it).
    pub(super) fn ask_missing_credits(&mut self, round: u64) {
        if self.credited_through.is_some_and(|c| round <= c) {
            return;
        }
        let noted = self.credit_notes.get(&round);
        let peers = self.members.by_author();
        let missing: Vec<meshtrain_gossip::libp2p::PeerId> = self
            .power
            .holders()
            .into_iter()
            .filter(|a| *a != self.me && self.power.of(a) > 0)
            .filter(|a| noted.is_none_or(|n| !n.contains_key(a)))
            .filter_map(|a| peers.get(&a).copied())
            .take(super::MAX_CREDIT_ASKS)
            .collect();
        for peer in missing {
            debug!(round, peer = %super::start::short(&peer), "asking for a verdict block we lack");
            self.request(
                peer,
                meshtrain_gossip::FetchRequest::RoundVerdict { round },
                super::RequestFor::RoundVerdict,
            );
        }
    }

    /// Credits every round up to `last` not credited yet, each by the
    /// verdicts of the voters of its decided anchor.
    pub(super) fn give_credits_through(&mut self, last: u64) {
        let first = self.credited_through.map_or(0, |c| c + 1);
        if last < first {
            return;
        }
        let notes = std::mem::take(&mut self.credit_notes);
        let (old, keep): (BTreeMap<_, _>, BTreeMap<_, _>) = notes.into_iter().partition(|(r, _)| *r <= last);
        self.credit_notes = keep;
        for (round, notes) in old {
            let Some(decided) = self.votes.tally(round + 1, &self.power).decided() else {
                continue;
            };
            let keys = super::agreement::agreed_credits(&notes, &decided, &self.power);
            debug!(
                round,
                decided = %decided.0.short(),
                blocks = ?notes.iter().map(|(o, (made, earned))| {
                    format!("{}:{}:{}", o.short(), made.0.short(), earned.iter().map(|a| a.short()).collect::<Vec<_>>().join("+"))
                }).collect::<Vec<_>>(),
                credited = ?keys.iter().map(|a| a.short()).collect::<Vec<_>>(),
                "credits of a round"
            );
            let before = self.power.total();
            self.power.credit(round, keys);
            self.log_power(round, before);
        }
        self.credited_through = Some(last);
        self.credit_conflicts.retain(|(r, _)| *r > last);
        self.promote_earned();
    }

    fn log_power(&self, round: u64, before: u64) {
        if self.power.total() != before {
            debug!(
                round,
                total = self.power.total(),
                holders = ?self.power.holders().iter().map(|a| a.short()).collect::<Vec<_>>(),
                "voting power grew"
            );
        }
    }

    /// The votes decided the anchor that starts `starts`: remember the
    /// latest such decision (a split mesh goes back to it).
    pub(super) fn note_decision(&mut self, starts: u64, key: super::agreement::AnchorKey) {
        // A later decision is what going back would take: the rebuilt round
        // kept for that (four copies of the model) is no longer needed.
        if self.rebuilt_target.as_ref().is_some_and(|r| r.prev + 1 < starts) {
            self.rebuilt_target = None;
        }
        if self
            .decided
            .as_ref()
            .is_some_and(|d| d.starts > starts || (d.starts == starts && d.key == key))
        {
            return;
        }
        let votes = self.evidence(starts, &key);
        self.decided = Some(super::Decision { starts, key, votes });
    }

    /// The signed votes that decided `key` for the anchor starting
    /// `starts`: those for it, and (a rebuilt round has none of its own)
    /// the records that built the round on it, one per voter.
    pub(super) fn evidence(&self, starts: u64, key: &super::agreement::AnchorKey) -> Vec<meshtrain_ledger::Vote> {
        let mut votes = self.votes.for_anchor(starts, key, &self.power);
        let mut voters: std::collections::BTreeSet<AuthorId> = votes.iter().map(|v| v.voter()).collect();
        for v in self.votes.built_on_by(starts + 1, key, &self.power) {
            if voters.insert(v.voter()) {
                votes.push(v);
            }
        }
        votes
    }

    fn aggregate(&mut self, mut inputs: RoundInputs) {
        let Some(outer) = self.outer.take() else { return };
        let Phase::Waiting(note) = std::mem::replace(&mut self.phase, Phase::Training) else {
            return;
        };
        // Only updates trained from the anchor their round closed on are
        // merged: every node that closes a round on one base then merges
        // from one candidate set, and a node that trained on a sibling or
        // stale anchor (and repairs) cannot drag the base elsewhere.
        self.bases.insert(inputs.round, self.anchor_hash);
        self.bases
            .retain(|r, _| r + self.cfg.spec.exchange.staleness + 1 > inputs.round);
        // A round given up merges nothing: every node that goes back lands
        // on the same anchor, and the next round's votes agree again.
        let abandoned = self.abandoned.take() == Some(inputs.round);
        self.given_up_in_a_row = if abandoned { self.given_up_in_a_row + 1 } else { 0 };
        self.closes.push_back(super::LastClose {
            inputs: inputs.inputs.clone(),
        });
        while self.closes.len() > super::CLOSES_KEPT {
            self.closes.pop_front();
        }
        let bases = &self.bases;
        let (on, off): (Vec<_>, Vec<_>) = std::mem::take(&mut inputs.inputs)
            .into_iter()
            .partition(|(c, _)| !abandoned && bases.get(&c.round) == Some(&c.base));
        inputs.inputs = on;
        let reason = if abandoned {
            RejectReason::RoundAbandoned
        } else {
            RejectReason::OffBase
        };
        for (c, _) in off {
            inputs.rejections.push(c.rejected(reason.clone()));
        }
        // Keys without a vote (open runs) are on probation: judged on their
        // own against the voters' updates, but left out of the anchor, which
        // only updates that every node waits for may shape (a Sybil crowd's
        // updates, merged as they happen to arrive, would give every node
        // another anchor each round).
        let power = &self.power;
        let (probation, voters): (Vec<_>, Vec<_>) = std::mem::take(&mut inputs.inputs)
            .into_iter()
            .partition(|(c, _)| power.on_probation(&c.author));
        inputs.inputs = voters;
        let probation = probation.into_iter().map(|(c, _)| c).collect();
        let wait_ms = self.now.saturating_sub(self.phase_since);
        self.set_phase(Phase::Aggregating(note));
        self.score_or_aggregate(AggregateJob {
            spec: self.cfg.spec.exchange.aggregator,
            anchor: self.anchor.clone(),
            inputs,
            probation,
            outer,
            wait_ms,
        });
    }

    pub(super) fn on_aggregated(&mut self, done: AggregateDone) {
        let Phase::Aggregating(note) = std::mem::replace(&mut self.phase, Phase::Training) else {
            return;
        };
        let base = self.anchor_hash;
        let base_key = self.anchor_key();
        let new_hash = WeightsHash::of_f32(&done.anchor);
        let (mut merged, mut clipped, mut rejected, mut probation) = (0u64, 0u64, 0u64, 0u64);
        let mut bans = Vec::new();
        let outer_hash = WeightsHash::of_f32(done.outer.velocity());
        let open = self.power.is_open();
        if !open {
            // A roster's votes are fixed: nothing is earned.
        } else if self.power.total() == 0 {
            // Nobody has a vote yet (an open run without founders): nothing
            // is decided, and our own verdicts are all there is.
            let before = self.power.total();
            self.power.credit_round(done.round, &done.entries);
            self.log_power(done.round, before);
            self.promote_earned();
        } else {
            let _ = self.note_credits(self.me, done.round, (new_hash, outer_hash), &done.entries);
            // The base of this round was decided (or given up) before we
            // aggregated: the round before can be credited, once every
            // member's block of it is here. A block lost on the way left
            // one node without a credit the others gave, and from then on
            // it counted other voting power (`--admission open --late-join
            // 2`, seed 490: three nodes against five to the end). So the
            // missing blocks of the round before are asked for now, and
            // that round is credited at the next close.
            if let Some(prev) = done.round.checked_sub(1) {
                self.ask_missing_credits(prev);
            }
            if let Some(before) = done.round.checked_sub(2) {
                self.give_credits_through(before);
            }
        }
        for e in &done.entries {
            if e.author == self.me {
                continue;
            }
            let from_aggregator = !matches!(&e.verdict, Verdict::Rejected { reason }
                if !matches!(reason, RejectReason::Outlier(_) | RejectReason::LossScore(_)));
            // A late update (from an earlier round) is judged against
            // updates trained for another round: its clipping says more
            // about the network than about its author. Except a late
            // update on probation refused outright: rounds do not wait for
            // keys without a vote, so their updates are late whenever they
            // lose the race, and a sign-flipper on probation went unbanned
            // for 20 rounds with half its verdicts late. Only refused: an
            // honest late joiner's late update is clipped against the next
            // round's updates, and counting that banned honest joiners.
            let refused_on_probation = matches!(e.verdict, Verdict::Probation { factor } if factor <= 0.0);
            if from_aggregator && (e.round == done.round || refused_on_probation) {
                if let Some(ban) = self.reputation.observe(e.author, done.round, &e.verdict) {
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
                    // Refusals made before this point were counted then;
                    // an update off the decided base blames nobody.
                    match reason {
                        RejectReason::Outlier(_) | RejectReason::LossScore(_) => {
                            self.count_rejection(reason.code(), Some(&e.author))
                        }
                        RejectReason::OffBase | RejectReason::RoundAbandoned => {
                            self.count_rejection(reason.code(), None)
                        }
                        _ => {}
                    }
                }
                Verdict::Probation { .. } => {
                    probation += 1;
                    self.emit(Effect::Counted {
                        outcome: "probation",
                        reason: "",
                    });
                    *self.counters.probation_by_author.entry(who).or_default() += 1;
                }
            }
        }
        self.counters.merged += merged;
        self.counters.clipped += clipped;
        let abandoned = meshtrain_ledger::round_given_up(&done.entries);
        self.apply_close(
            done.round,
            base_key,
            (done.anchor, new_hash),
            (done.outer, outer_hash),
            done.entries,
            open,
        );
        if abandoned {
            // Gone back, not made: our next record claims no merges.
            self.made = None;
        }
        self.votes.prune_below(self.vote_floor());
        info!(
            round = done.round,
            merged = merged + 1,
            clipped,
            rejected,
            probation,
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
            base_hash: base,
            anchor_hash: new_hash,
            members: self.members.len(),
        })));
        for (author, ban) in bans {
            self.ban(author, &ban.to_string());
        }
        if self.cfg.checkpoint_every > 0 && self.round().is_multiple_of(self.cfg.checkpoint_every) {
            self.emit(Effect::Checkpoint {
                round: self.round(),
                anchor: self.anchor.clone(),
                velocity: self.velocity.to_vec(),
            });
        }
        // The mesh may have decided anchors rounds ahead meanwhile.
        if self.fetched.as_ref().is_some_and(|f| f.starts > self.round()) {
            self.catch_up();
            return;
        }
        if self.round() >= self.end_round {
            self.settle_final();
        } else {
            self.start_round();
        }
    }

    /// Records a round's close (ours, or a rebuild of it) in a signed
    /// verdict block and moves onto the anchor it made.
    fn apply_close(
        &mut self,
        round: u64,
        base: super::agreement::AnchorKey,
        (anchor, new_hash): (Vec<f32>, WeightsHash),
        (outer, outer_hash): (OuterOptimizer, WeightsHash),
        entries: Vec<VerdictEntry>,
        publish: bool,
    ) {
        let merged: Vec<_> = entries
            .iter()
            .filter(|e| matches!(e.verdict, Verdict::Merged { .. } | Verdict::Clipped { .. }))
            .map(|e| e.record_hash.tag())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        // What our own close of this round waited for (a rebuild waited
        // for nothing).
        let waited = match self.waited.take() {
            Some((r, w)) if r == round => w.iter().map(|h| h.tag()).collect(),
            _ => std::collections::BTreeSet::new(),
        };
        self.made = Some(super::Made {
            round,
            anchor: new_hash,
            from: base,
            waited: meshtrain_ledger::UpdateRecord::waited_bits(&merged, &waited),
            merged,
        });
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
            round,
            base_anchor: base.0,
            base_outer: base.1,
            new_anchor: new_hash,
            outer_state: outer_hash,
            entries,
        }
        .sign(&self.key);
        self.verdict_head = Some((seq, block.block.hash()));
        if block.block.round + 1 < self.end_round && publish {
            // Open runs: what we credit each round, for every node to count
            // alike (the last round's block goes out as our final vote).
            let bytes = block.to_bytes();
            self.gossiped_blocks.push_back((round, bytes.clone()));
            while self.gossiped_blocks.len() > super::GOSSIPED_BLOCKS_KEPT {
                self.gossiped_blocks.pop_front();
            }
            self.emit(Effect::Publish(GossipMessage::Vote { block: bytes }));
        }
        self.attestation = Some(block.clone());
        self.emit(Effect::Inbox(Job::Verdict(Box::new(block))));
        self.velocity = Arc::new(outer.velocity().to_vec());
        self.anchor = Arc::new(anchor);
        self.anchor_hash = new_hash;
        self.outer_hash = outer_hash;
        self.outer = Some(outer);
        self.remember_snapshot();
    }

    /// No anchor for the base of `round` has half the voting power, nor can
    /// get it: instead of giving two rounds up, rebuild the round before
    /// (see [`Core::rebuild_round`]) and close this one on the result.
    /// `Some(false)`: wait (votes still out could change the answer, or the
    /// anchor built on is being fetched); `None`: no rebuild here (the
    /// caller goes back as before).
    pub(super) fn rebuild_if_split(
        &mut self,
        round: u64,
        tally: &super::agreement::Tally,
        grace: Option<Millis>,
    ) -> Option<bool> {
        let waiting = grace.is_some_and(|g| self.now < g);
        let r = match self.rebuild_round(round, grace) {
            Rebuild::Wait => return waiting.then_some(false),
            Rebuild::Fetching => return Some(false),
            Rebuild::Unable => return None,
            Rebuild::Built(r) => r,
        };
        let key = r.key;
        warn!(
            round,
            rebuilt = r.prev,
            on = %r.from.0.short(),
            updates = r.updates,
            support = tally.support,
            of = tally.total,
            anchor = %key.0.short(),
            ours = key == self.anchor_key(),
            "no anchor has half the voting power; rebuilt the round before from what more than half of it built on and merged"
        );
        // Kept: going back to it later needs the rebuild again (it has no
        // votes of its own; see `revert_if_split`).
        self.rebuilt_target = Some(r.clone());
        if key != self.anchor_key() {
            self.adopt_rebuilt(*r, true);
        }
        self.settle_rebuilt(round, key, self.anchor.clone(), self.velocity.clone());
        Some(true)
    }

    /// A rebuilt anchor, taken as decided for the round it starts (its
    /// evidence: the records built on it, once they come).
    fn settle_rebuilt(
        &mut self,
        starts: u64,
        key: super::agreement::AnchorKey,
        weights: Arc<Vec<f32>>,
        velocity: Arc<Vec<f32>>,
    ) {
        let votes = self.evidence(starts, &key);
        self.decided = Some(super::Decision {
            starts,
            key,
            votes: votes.clone(),
        });
        self.settled = Some(Settled {
            starts,
            key,
            weights,
            velocity,
            votes,
        });
    }

    /// Takes a rebuilt round's result as our anchor: back onto the anchor
    /// that round was built on (a join the audit replays from, with the
    /// records that name it: more than half the voting power, or the
    /// rebuild would not have used it), then the rebuilt round as a verdict
    /// block of its own. `requeue`: what else that round had waits for the
    /// next close as late, as at a node whose close took exactly these
    /// updates (not when the round being closed is given up anyway).
    fn adopt_rebuilt(&mut self, r: Rebuilt, requeue: bool) {
        let Rebuilt {
            prev,
            from,
            key,
            base,
            done,
            taken,
            ..
        } = r;
        let (weights, velocity) = base;
        let evidence = self.evidence(prev, &from);
        self.revert_onto(prev, from, (weights, velocity.to_vec()), prev, evidence);
        self.bases.insert(prev, from.0);
        if requeue {
            let had: Vec<_> = self
                .closes
                .iter()
                .flat_map(|l| l.inputs.iter().map(|(c, _)| c.clone()))
                .filter(|c| c.round == prev)
                .collect();
            self.book.rebuilt(prev, had, &taken);
        }
        // Not gossiped: in an open run it would be a second vote for
        // the anchor our record already voted.
        self.apply_close(
            prev,
            from,
            (done.anchor, key.0),
            (done.outer, key.1),
            done.entries,
            false,
        );
    }

    /// Rebuilds the anchor that starts `starts` from what the votes for it
    /// say. Each record names the anchor its author built round `starts -
    /// 1` on and the updates it merged (see `UpdateRecord::merged`); the
    /// anchor more than half of the voting power built on, aggregated with
    /// the updates more than half of it merged, is that round's result.
    /// Every node that holds votes enough to settle both rebuilds the same
    /// anchor, bit for bit, and takes it as decided: the anchor built on is
    /// one an honest node computed, each update was merged by an honest
    /// node, and the robust aggregator judges them again. An attacker that
    /// shows its payload to half the mesh late (`split`) otherwise left
    /// four nodes against four and every round given up. Not with loss
    /// scoring, whose scores come from each node's own data. Until
    /// `fetch_until`, what we lack (the anchor built on, updates) is
    /// fetched and waited for.
    fn rebuild_round(&mut self, starts: u64, fetch_until: Option<Millis>) -> Rebuild {
        if self.cfg.spec.exchange.score.is_some() {
            return Rebuild::Unable;
        }
        let Some(prev) = starts.checked_sub(1) else {
            return Rebuild::Unable;
        };
        // Once the wait is over, members silent for two rounds are not
        // waited for (`Votes::silent_power`). Who is silent depends on the
        // votes each node holds, so two nodes can judge it apart: mid-run
        // the next round's votes bring them together again, after the last
        // round nothing does (seed 133 of the same sweep ended split when
        // the final round ignored them too). By the round being closed:
        // the final round also rebuilds rounds before it.
        let silent = if self.round() < self.end_round && fetch_until.is_none_or(|u| self.now >= u) {
            self.votes.silent_power(starts, &self.power)
        } else {
            0
        };
        let from = match self.votes.built_on_ignoring(starts, &self.power, silent) {
            None => return Rebuild::Wait,
            Some(None) => return Rebuild::Unable,
            Some(Some(from)) => from,
        };
        let Some(merged) = self
            .votes
            .merged_by_majority_ignoring(starts, &from, &self.power, silent)
        else {
            return Rebuild::Wait;
        };
        // Each update as the round's close weighed it: its own round's
        // fully, a late one by the staleness decay.
        let decay = self.cfg.spec.exchange.staleness_decay;
        let mut inputs: Vec<(super::rounds::Contribution, f32)> = Vec::with_capacity(merged.len());
        let mut missing = Vec::new();
        for tag in &merged {
            let held = self
                .updates_held(prev)
                .find(|c| c.round <= prev && c.record_hash.tag() == *tag)
                .map(|c| (c.clone(), decay.powi((prev - c.round) as i32)));
            match held {
                Some(i) => inputs.push(i),
                None => missing.push(*tag),
            }
        }
        // What no close would take: a proven equivocator's updates, or two
        // updates of one author for one round.
        if inputs.iter().enumerate().any(|(i, (c, _))| {
            self.votes.is_void(&c.author)
                || inputs[..i]
                    .iter()
                    .any(|(d, _)| d.author == c.author && d.round == c.round)
        }) {
            warn!(
                round = starts,
                rebuilds = prev,
                "the majority merged what no close takes; not rebuilding"
            );
            return Rebuild::Unable;
        }
        if !missing.is_empty() {
            // Updates of the round just closed (ones that came late here,
            // or before we caught up) are fetched like any late update, for
            // as long as a repair waits.
            let (since, first) = match self.rebuild_wait {
                Some((s, since)) if s == starts => (since, false),
                _ => (self.now, true),
            };
            self.rebuild_wait = Some((starts, since));
            let mut asked = 0;
            if fetch_until.is_some_and(|u| self.now < u.max(since + RECHECK_MS)) {
                for tag in &missing {
                    // That round's, or one late there from the round before.
                    let Some(r) = self
                        .votes
                        .record_tagged(prev, tag)
                        .or_else(|| prev.checked_sub(1).and_then(|p| self.votes.record_tagged(p, tag)))
                    else {
                        continue;
                    };
                    let of = super::wants::WantedFor {
                        author: r.record.author,
                        seq: r.record.seq,
                        record_hash: r.hash(),
                        round: r.record.round,
                    };
                    let hash = r.record.payload_hash;
                    // Those that merged it hold it: ask them first, at once
                    // (the author may be the one holding it back).
                    let members = self.members.by_author();
                    let mut holders: Vec<_> = self
                        .votes
                        .merged_by(starts, &from, tag)
                        .iter()
                        .filter(|a| **a != of.author)
                        .filter_map(|a| members.get(a).copied())
                        .collect();
                    // Not by key order: keys can be ground to come first.
                    holders.shuffle(&mut self.rng);
                    if !self.wants.contains(&hash) {
                        // Too late to merge here, so not wanted before: an
                        // update that arrives is kept for the rebuild.
                        let mut candidates = holders.clone();
                        candidates.extend(super::members::peer_of(&of.author));
                        candidates.extend(self.members.peers());
                        if self.wants.want(hash, of, candidates) {
                            self.next_payload_attempt(hash);
                        }
                    } else if first && !holders.is_empty() && self.wants.prefer(&hash, &holders) {
                        // Two at once: one of them may be slow too.
                        self.next_payload_attempt(hash);
                        self.next_payload_attempt(hash);
                    }
                    asked += usize::from(self.wants.contains(&hash));
                }
            }
            let missing: Vec<String> = missing.iter().map(|t| t.to_string()).collect();
            if tracing::enabled!(tracing::Level::TRACE) {
                let held: Vec<String> = self
                    .updates_held(prev)
                    .map(|c| format!("{}@{}:{}", c.author.short(), c.round, c.record_hash.tag()))
                    .collect();
                tracing::trace!(round = starts, ?held, "updates held for a rebuild");
            }
            if asked > 0 {
                debug!(
                    round = starts,
                    rebuilds = prev,
                    ?missing,
                    "fetching the updates a rebuild needs"
                );
                return Rebuild::Fetching;
            }
            warn!(
                round = starts,
                rebuilds = prev,
                ?missing,
                "updates the majority merged are not here to rebuild the round"
            );
            return Rebuild::Unable;
        }
        // The anchor built on: ours from that round, or fetched.
        let Some((weights, velocity)) = self.held_anchor(prev, &from) else {
            if fetch_until.is_none() || self.unavailable == Some((prev, from)) {
                return Rebuild::Unable;
            }
            if let Some(f) = self.fetch.as_ref().filter(|f| f.key == from) {
                if self.now.saturating_sub(f.since) < REPAIR_WAIT_MS {
                    return Rebuild::Fetching;
                }
                return Rebuild::Unable;
            }
            self.fetch_anchor(prev, from, Purpose::Revert);
            return if self.fetch.is_some() {
                Rebuild::Fetching
            } else {
                Rebuild::Unable
            };
        };
        let Some(mut outer) = self.outer.clone() else {
            return Rebuild::Unable;
        };
        inputs.sort_by(|(a, _), (b, _)| a.round.cmp(&b.round).then(a.author.cmp(&b.author)));
        let taken = inputs.iter().map(|(c, _)| c.record_hash).collect();
        outer.set_velocity(velocity.to_vec());
        // Inline, unlike a round's aggregation: a rebuild is rare, and the
        // close must know its anchor before it can go on.
        let done = run_aggregation(AggregateJob {
            spec: self.cfg.spec.exchange.aggregator,
            anchor: weights.clone(),
            inputs: RoundInputs {
                round: prev,
                inputs,
                rejections: Vec::new(),
                waited: std::collections::BTreeSet::new(),
            },
            probation: Vec::new(),
            outer,
            wait_ms: 0,
        });
        let key = (
            WeightsHash::of_f32(&done.anchor),
            WeightsHash::of_f32(done.outer.velocity()),
        );
        Rebuild::Built(Box::new(Rebuilt {
            prev,
            from,
            key,
            base: (weights, velocity),
            done,
            taken,
            updates: merged.len(),
        }))
    }

    /// Before going back to the latest decided anchor: rounds after it
    /// that others rebuilt (we gave them up before every vote was in) are
    /// decided too, and going back anywhere else would part us from them
    /// for good.
    fn rebuilt_since_decided(&mut self, round: u64) {
        let Some(mut from) = self
            .decided
            .as_ref()
            .map(|d| d.starts)
            .or(self.settled.as_ref().map(|s| s.starts))
        else {
            return;
        };
        while from + 1 < round {
            let starts = from + 1;
            if self.votes.tally(starts, &self.power).decided().is_some() {
                break;
            }
            let Rebuild::Built(r) = self.rebuild_round(starts, None) else {
                break;
            };
            info!(
                round,
                rebuilt = r.prev,
                anchor = %r.key.0.short(),
                "a round we gave up was rebuilt from the votes: it is the one to go back to"
            );
            let (weights, velocity) = (r.done.anchor.clone(), r.done.outer.velocity().to_vec());
            self.settle_rebuilt(starts, r.key, Arc::new(weights), Arc::new(velocity));
            self.rebuilt_target = Some(r);
            from = starts;
        }
    }

    /// Every update a rebuild of round `prev` may use: those our kept
    /// closes took (one late here is another round's input), those still
    /// pending for it or the round before, and those refused as too late.
    fn updates_held(&self, prev: u64) -> impl Iterator<Item = &super::rounds::Contribution> {
        self.closes
            .iter()
            .flat_map(|l| l.inputs.iter().map(|(c, _)| c))
            .chain((prev.saturating_sub(1)..=prev).flat_map(|r| self.book.for_round(r)))
            .chain(self.stale_kept.iter())
    }

    /// The weights and outer state of `key`, when we hold them: the anchor
    /// we settled on, one fetched for `starts`, or one of our last.
    fn held_anchor(&self, starts: u64, key: &super::agreement::AnchorKey) -> Option<AnchorState> {
        if let Some(s) = self.settled.as_ref().filter(|s| s.key == *key) {
            return Some((s.weights.clone(), s.velocity.clone()));
        }
        if let Some(f) = self.fetched.as_ref().filter(|f| f.starts == starts && f.key == *key) {
            return Some((f.weights.clone(), Arc::new(f.velocity.clone())));
        }
        self.snapshots
            .iter()
            .rev()
            .find(|s| s.anchor_hash == key.0 && WeightsHash::of_f32(&s.velocity) == key.1)
            .map(|s| (s.weights.clone(), s.velocity.clone()))
    }

    /// Our anchor for a peer that asks: the one with these weights (one of
    /// our last two, or the last decided one), or the current one.
    pub(super) fn anchor_snapshot(&self, weights: Option<WeightsHash>) -> Option<AnchorSnapshot> {
        let Some(w) = weights else {
            return self.snapshots.back().cloned();
        };
        if let Some(s) = self.snapshots.iter().rev().find(|s| s.anchor_hash == w) {
            return Some(s.clone());
        }
        self.settled.as_ref().filter(|s| s.key.0 == w).map(|s| AnchorSnapshot {
            round: s.starts,
            anchor_hash: s.key.0,
            weights: s.weights.clone(),
            velocity: s.velocity.clone(),
            attestation: None,
        })
    }
}

/// Aggregates one round and steps the anchor: a pure function, run on a
/// worker thread by the node and inline by the simulator.
pub fn run_aggregation(job: AggregateJob) -> AggregateDone {
    let AggregateJob {
        spec,
        anchor,
        inputs,
        probation,
        mut outer,
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
    let started = std::time::Instant::now();
    let result = aggregate_deltas(spec, &agg_inputs);
    let aggregated = started.elapsed();
    let started = std::time::Instant::now();
    let mut new_anchor = anchor.to_vec();
    if !result.update.is_empty() {
        outer.step(&mut new_anchor, &result.update);
    }
    let outer_step = started.elapsed();
    let started = std::time::Instant::now();
    let mut entries: Vec<VerdictEntry> = inputs
        .inputs
        .iter()
        .zip(&result.verdicts)
        .map(|((c, w), v)| VerdictEntry {
            author: c.author,
            seq: c.seq,
            record_hash: c.record_hash,
            round: c.round,
            prior: *w,
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
    if !probation.is_empty() {
        entries.extend(judge_probation(spec, &agg_inputs, &probation));
    }
    entries.extend(inputs.rejections);
    AggregateDone {
        round: inputs.round,
        anchor: new_anchor,
        outer,
        entries,
        wait_ms,
        took: AggregateTimes {
            aggregate: aggregated + started.elapsed(),
            outer_step,
        },
    }
}

/// Above this cosine similarity two updates are one piece of work (an
/// attacker's copies under many keys, scaled or not); honest nodes training
/// on their own shards stay below it even when their updates share most of
/// their direction (the simulator's stand-in updates reach 0.99).
const COPY_COSINE: f64 = 0.9999;

/// Judges each update on probation on its own against the voters' updates
/// (as one member among them), so that its verdict does not depend on which
/// other unearned updates happened to arrive. A near-copy of another update
/// of the round earns nothing: one training run earns one vote.
fn judge_probation(
    spec: AggregatorSpec,
    voters: &[AggInput<'_>],
    probation: &[super::rounds::Contribution],
) -> Vec<VerdictEntry> {
    // Every update with its norm, computed once: each is compared with all.
    let norm = |x: &[f32]| x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
    let voters_n: Vec<(&[f32], f64)> = voters.iter().map(|v| (v.delta, norm(v.delta))).collect();
    let probation_n: Vec<(&[f32], f64)> = probation.iter().map(|c| (c.delta.as_slice(), norm(&c.delta))).collect();
    let copies = |(a, na): (&[f32], f64), (b, nb): (&[f32], f64)| {
        if na == 0.0 || nb == 0.0 || a.len() != b.len() {
            return false;
        }
        let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
        dot / (na * nb) >= COPY_COSINE
    };
    probation
        .iter()
        .zip(&probation_n)
        .enumerate()
        .map(|(i, (c, &own))| {
            let delta = c.delta.as_slice();
            let copied = voters_n.iter().any(|&v| copies(own, v))
                || probation_n.iter().enumerate().any(|(j, &o)| j != i && copies(own, o));
            let factor = if copied {
                0.0
            } else {
                let mut all = voters.to_vec();
                all.push(AggInput { delta, weight: 1.0 });
                match aggregate_deltas(spec, &all).verdicts.last() {
                    Some(AggVerdict::Merged { .. }) => 1.0,
                    Some(AggVerdict::Clipped { factor, .. }) => *factor,
                    _ => 0.0,
                }
            };
            VerdictEntry {
                author: c.author,
                seq: c.seq,
                record_hash: c.record_hash,
                round: c.round,
                prior: 0.0,
                verdict: Verdict::Probation { factor },
            }
        })
        .collect()
}
