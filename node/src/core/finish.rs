//! After the last round: settle the final anchor (every node gossips its
//! signed verdict block for the last round as its vote, and repairs onto
//! the decided anchor like after any round), evaluate it, then linger while
//! peers still fetch from us and our copies of their chains complete.

use std::collections::HashSet;

use meshtrain_gossip::{FetchRequest, GossipMessage};
use meshtrain_ledger::{AuthorId, SignedVerdictBlock, Vote};
use meshtrain_model::EvalReport;
use rand::seq::IndexedRandom;
use tracing::{debug, info, warn};

use super::sync::Purpose;
use super::{Core, Effect, Millis, Phase, RequestFor, Timer};

/// Draining ends once nobody fetched from us for this long (a peer that
/// still lacks our vote or record asks again every 250 to 400 ms) ...
const QUIET_MS: Millis = 600;
/// ... and we drained at least this long.
const MIN_DRAIN_MS: Millis = 500;
/// How often draining looks whether it is over.
const DRAIN_CHECK_MS: Millis = 250;
/// Draining waits for the members whose chains reach this close to the
/// last round.
const DRAIN_BEHIND: u64 = 3;

/// The shortest wait for the final votes.
const MIN_SETTLE_MS: Millis = 1000;
/// How often a settling node asks again for the final votes it lacks.
const ASK_AGAIN_MS: Millis = 400;
/// How many members a final vote is asked of when its voter is not one we
/// are connected to.
const ASK_PEERS: usize = 3;

impl Core {
    /// The last round is closed: vote for its anchor and collect the votes.
    pub(super) fn settle_final(&mut self) {
        if let Some(block) = self.attestation.clone() {
            self.votes.add(Vote::Block(block.clone()));
            self.emit(Effect::Publish(GossipMessage::Vote {
                block: block.to_bytes(),
            }));
        }
        // The slowest member closes its last round up to a round's longest
        // wait after us: its vote may take that long.
        let wait = self.cfg.spec.rounds.max_wait_ms.max(MIN_SETTLE_MS);
        self.set_phase(Phase::Settling { until: self.now + wait });
        self.settle_tick(false);
    }

    /// Asks each connected member whose final vote we lack for it (a node
    /// that was away when the votes were gossiped gets them this way).
    pub(super) fn ask_final_votes(&mut self) {
        let voted = self.votes.voters(self.round());
        let asking: HashSet<AuthorId> = self
            .requests
            .values()
            .filter_map(|w| match w {
                RequestFor::FinalVote(a) => Some(*a),
                _ => None,
            })
            .collect();
        let connected = self.voters_by_author();
        for (author, peer) in &connected {
            if !voted.contains(author) && !asking.contains(author) && !self.finished_unvoted.contains_key(author) {
                debug!(voter = %author.short(), "asking for a final vote");
                self.request(*peer, FetchRequest::FinalVote, RequestFor::FinalVote(*author));
            }
        }
        // Voters we are not connected to (ones we banned, or that left):
        // a few members that may hold their final vote are asked for it.
        let peers: Vec<_> = connected.values().copied().collect();
        let others: Vec<AuthorId> = self
            .power
            .holders()
            .into_iter()
            .filter(|a| *a != self.me && !connected.contains_key(a) && !voted.contains(a) && !asking.contains(a))
            .collect();
        for author in others {
            for peer in peers
                .choose_multiple(&mut self.rng, ASK_PEERS)
                .copied()
                .collect::<Vec<_>>()
            {
                debug!(voter = %author.short(), peer = %super::start::short(&peer), "asking a member for a final vote");
                self.request(
                    peer,
                    FetchRequest::FinalVoteOf { author: author.0 },
                    RequestFor::FinalVote(author),
                );
            }
        }
    }

    /// The final phase's timer: ask again for missing votes, or give up
    /// waiting.
    pub(super) fn settle_timer(&mut self) {
        self.settle_tick(false);
    }

    /// Decides the final anchor once it is decided for good (more than half
    /// the voting power, or half with every member's vote in), or when the
    /// wait is over; repairs onto it first when ours differs.
    pub(super) fn settle_tick(&mut self, force: bool) {
        let Phase::Settling { until } = self.phase else { return };
        let timed_out = force || self.now >= until;
        let starts = self.round();
        let tally = self.votes.tally(starts, &self.power);
        let voted = self.votes.voters(starts);
        let all_in = self.connected_authors().iter().all(|a| voted.contains(a));
        let settled = tally.decided().is_some() && (2 * tally.support > tally.total || all_in);
        // Every vote in and none decides: waiting changes nothing (a
        // voter's first vote stands), rebuild or go back now.
        let hopeless = tally.decided().is_none() && tally.seen >= tally.total;
        debug!(
            round = starts,
            support = tally.support,
            total = tally.total,
            voters = voted.len(),
            all_in,
            settled,
            timed_out,
            "final votes"
        );
        if !settled && !timed_out && !hopeless {
            self.ask_final_votes();
            self.arm(Timer::Settle, until.min(self.now + ASK_AGAIN_MS));
            return;
        }
        match tally.decided() {
            Some(key) if key != self.anchor_key() => {
                if let Some(f) = self.fetched.take().filter(|f| f.starts == starts && f.key == key) {
                    self.adopt(*f, Purpose::Final);
                } else if self.fetch.is_some() {
                    // Being fetched: its arrival or failure comes back here.
                    return;
                } else if !timed_out {
                    self.fetch_anchor(starts, key, Purpose::Final);
                    if self.fetch.is_some() {
                        return;
                    }
                } else {
                    warn!(
                        round = starts,
                        "the decided final anchor could not be fetched; evaluating ours"
                    );
                }
            }
            Some(_) => {}
            None => {
                // Rebuilt like any round (the final votes name what their
                // voters built on and merged); our final vote stays the one
                // we cast.
                let cast = self.attestation.clone();
                let wait = self.cfg.spec.rounds.max_wait_ms.max(MIN_SETTLE_MS);
                match self.rebuild_if_split(starts, &tally, Some(until + wait)) {
                    Some(true) => self.attestation = cast,
                    Some(false) if self.now < until + wait => {
                        self.prefetch_revert_target(starts);
                        self.arm(Timer::Settle, self.now + ASK_AGAIN_MS);
                        return;
                    }
                    _ => {
                        // The anchor to go back to is being fetched: its
                        // arrival or failure settles again (evaluating ours
                        // meanwhile ended the run apart from the others,
                        // seed 16 again). Bounded: a rebuild's fetch and
                        // this one could take turns in the one fetch slot.
                        let fetching = self.fetch.is_some() && self.now < until + 2 * wait;
                        if !self.revert_if_split(starts) && (!timed_out || fetching) {
                            self.arm(Timer::Settle, self.now + ASK_AGAIN_MS);
                            return;
                        }
                    }
                }
            }
        }
        // A fetch that failed at once may have settled (and evaluated) from
        // within the calls above.
        if matches!(self.phase, Phase::Settling { .. }) {
            self.finish_run();
        }
    }

    /// Our vote for the final anchor, once we cast it.
    pub(super) fn final_vote(&self) -> Option<SignedVerdictBlock> {
        let cast = self.run_over();
        let last = self.end_round.checked_sub(1)?;
        self.attestation.clone().filter(|a| cast && a.block.round == last)
    }

    /// Evaluates the final anchor. Counted: when the final anchor changes
    /// while one evaluation is under way, only the last one's report counts
    /// (reports come back in order).
    pub(super) fn finish_run(&mut self) {
        self.set_phase(Phase::Finishing);
        self.evals_pending += 1;
        self.emit(Effect::Evaluate {
            round: self.round(),
            anchor: self.anchor.clone(),
        });
    }

    pub(super) fn on_evaluated(&mut self, round: u64, report: EvalReport) {
        self.evals_pending = self.evals_pending.saturating_sub(1);
        if !matches!(self.phase, Phase::Finishing) || self.evals_pending > 0 {
            return;
        }
        let eval = report.summary;
        info!(
            round,
            test_acc = format_args!("{:.4}", eval.accuracy),
            test_loss = format_args!("{:.4}", eval.loss),
            perplexity = eval.perplexity,
            roc_auc = eval.roc_auc,
            macro_f1 = eval.macro_f1,
            "final evaluation"
        );
        self.final_eval = Some(report);
        self.set_phase(Phase::Draining);
        self.drain_tick();
    }

    pub(super) fn drain_tick(&mut self) {
        if !matches!(self.phase, Phase::Draining) {
            return;
        }
        let elapsed = self.now.saturating_sub(self.phase_since);
        let complete = self.chains_complete();
        // A member that closes its last round after us may be on another
        // anchor and need ours (the decided one): we stay until every
        // connected member has voted, and then while it still fetches.
        let voted = self.votes.voters(self.round());
        let votes_in = self
            .keeping_up()
            .iter()
            .all(|a| voted.contains(a) || self.finished_unvoted.contains_key(a));
        // A member whose final vote names another anchor repairs onto the
        // decided one as soon as it counts the votes, and asks us for it:
        // leaving the moment its vote came in left the last member of a
        // mesh with no one to fetch the final anchor from (simulator,
        // `--attack dissensus`, seed 47: it evaluated a sibling anchor).
        let quiet = self.now.saturating_sub(self.last_served.max(self.odd_final_vote_at)) > QUIET_MS;
        // Nobody to serve: no member is connected and none ever asked us
        // for anything (a lone node).
        let alone = self.members.is_empty() && self.last_served == 0;
        // A member left in the last second of the run: the re-plan that
        // re-replicates its blocks is still due (the shell then stays until
        // they are here).
        let replan_due = self.armed.contains_key(&Timer::Replan);
        if alone || (complete && votes_in && quiet && !replan_due && elapsed > MIN_DRAIN_MS) || elapsed > self.cfg.drain
        {
            if !complete {
                warn!("leaving with incomplete chains (drain timeout)");
            }
            self.set_phase(Phase::Done);
            self.emit(Effect::Finished);
            return;
        }
        tracing::trace!(
            elapsed,
            complete,
            votes_in,
            quiet,
            replan_due,
            since_served = self.now.saturating_sub(self.last_served),
            "draining"
        );
        if !votes_in {
            self.ask_final_votes();
        }
        self.arm(Timer::Drain, self.now + DRAIN_CHECK_MS);
    }

    /// Whether we hold the record for the last round of every member that
    /// kept up (a member that left cannot add to its chain any more), or,
    /// for one that skipped to the end (took the final anchor over), the
    /// last record it says it signed.
    fn chains_complete(&self) -> bool {
        let last = self.end_round.saturating_sub(1);
        self.keeping_up().iter().all(|a| {
            self.head_round(a).is_some_and(|r| r >= last)
                || self
                    .finished_unvoted
                    .get(a)
                    .is_some_and(|end| end.is_none_or(|s| self.chains.get(a).is_some_and(|c| c.seq >= s)))
        })
    }

    /// The connected members that kept up with the last rounds: draining
    /// waits for them. One far behind (an attacker whose updates came late
    /// all run long) would otherwise hold every honest node for the whole
    /// drain limit; its chain is as complete as it will get.
    fn keeping_up(&self) -> HashSet<AuthorId> {
        let last = self.end_round.saturating_sub(1);
        self.connected_authors()
            .into_iter()
            .filter(|a| self.head_round(a).is_some_and(|r| r + DRAIN_BEHIND >= last))
            .collect()
    }
}
