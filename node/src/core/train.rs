//! Our own part of a round: train, sign, store, then publish. A record is
//! durable before anyone can see it, so a node never signs two records at
//! one seq, even across a `kill -9`.

use meshtrain_gossip::GossipMessage;
use meshtrain_ledger::{PayloadHash, Seq, SignedRecord, UpdateRecord, WeightsHash, RECORD_VERSION};
use tracing::info;

use super::rounds::Contribution;
use super::{Collusion, Core, Effect, OwnRound, Phase, RoundNote, Timer, Trained};
use crate::inbox::Job;

/// A colluding attacker crafts its update once it holds half the other
/// expected members' updates of the round (the statistics it needs, while
/// the honest nodes are still short of their quorum: waiting for all of
/// them, it published after their quorum's grace and missed most rounds),
/// or after this long in any case.
const COLLUDE_MAX_MS: u64 = 5000;

impl Core {
    pub(super) fn start_round(&mut self) {
        let round = self.round();
        self.tidy_for(round);
        if self.republish_own(round) {
            return;
        }
        if self.own_head.is_some_and(|h| h.round >= round) {
            // We signed for this round or a later one before a restart, and
            // no longer hold that update: one record per round, so we sit
            // this one out.
            info!(
                round,
                "already signed a record for this round or a later one; not contributing to it"
            );
            self.set_phase(Phase::Waiting(RoundNote {
                round,
                ..Default::default()
            }));
            self.book.own_ready(self.now);
            if let Some(at) = self.book.deadline() {
                self.arm(Timer::Deadline, at);
            }
            self.maybe_close();
            return;
        }
        self.trained_from = Some(self.anchor_key());
        self.set_phase(Phase::Training);
        self.emit(Effect::Train {
            round,
            anchor: self.anchor.clone(),
            evaluate: round.is_multiple_of(self.cfg.eval_every.max(1)),
        });
    }

    /// Trains the next round, or evaluates the final anchor when the run's
    /// rounds are done (also right after joining a mesh that is finishing).
    pub(super) fn next_round_or_finish(&mut self) {
        if self.round() >= self.end_round {
            self.finish_run();
        } else {
            self.start_round();
        }
    }

    pub(super) fn on_trained(&mut self, t: Box<Trained>) {
        if !matches!(self.phase, Phase::Training) || t.round != self.round() {
            return;
        }
        if self.trained_from != Some(self.anchor_key()) {
            // Our anchor was repaired while we trained: an update from the
            // old one would be merged by nobody.
            info!(
                round = t.round,
                "the anchor changed while training; training again from the new one"
            );
            self.start_round();
            return;
        }
        if let Some(e) = t.eval {
            if let Some(early) = self.early.as_mut() {
                if early.observe(t.round, e.loss) && self.end_round > t.round + 1 {
                    // This round still closes, so peers waiting on our
                    // record for it get one.
                    self.end_round = t.round + 1;
                    info!(
                        round = t.round,
                        best_round = early.best_round,
                        best_loss = early.best_loss,
                        patience = early.patience,
                        "early stopping: the held-out loss stopped improving"
                    );
                }
            }
        }
        if self.cfg.attack.is_some_and(|a| a.colludes()) {
            let now = self.now;
            self.set_phase(Phase::Colluding(Box::new(Collusion {
                trained: t,
                since: now,
                crafting: false,
            })));
            self.arm(Timer::Collude, now + COLLUDE_MAX_MS);
            self.collusion_saw_update();
            return;
        }
        self.sign_and_store(*t);
    }

    /// The crafted update of a colluding attacker, encoded.
    pub(super) fn on_crafted(&mut self, t: Trained) {
        if matches!(&self.phase, Phase::Colluding(c) if c.crafting && c.trained.round == t.round) {
            self.sign_and_store(t);
        }
    }

    /// Signs our update, stores it (synced) and, once stored, publishes it
    /// (see `publish_own`).
    fn sign_and_store(&mut self, t: Trained) {
        let (seq, prev) = match self.own_head {
            None => (Seq(0), self.cfg.genesis_link),
            Some(h) => (h.seq.next(), h.hash),
        };
        // What we merged to make our anchor, when we made it (not when we
        // took it over).
        let ((made_from, made_outer), merged, waited) = match self
            .made
            .as_ref()
            .filter(|m| m.anchor == self.anchor_hash && m.round + 1 == t.round)
        {
            Some(m) => (m.from, m.merged.clone(), m.waited.clone()),
            None => ((WeightsHash([0; 32]), WeightsHash([0; 32])), Vec::new(), Vec::new()),
        };
        let record = UpdateRecord {
            version: RECORD_VERSION,
            run_id: self.cfg.run_id,
            author: self.me,
            seq,
            prev,
            round: t.round,
            base_hash: self.anchor_hash,
            base_outer: self.outer_hash,
            made_from,
            made_outer,
            merged,
            waited,
            payload_hash: PayloadHash::of(&t.payload),
            payload_len: t.payload.len() as u64,
            n_samples: t.stats.samples,
            train_loss: t.stats.mean_loss,
        };
        let twin = t.twin.map(|other| {
            // An equivocating attacker: a second, different record at the
            // same seq, for other peers.
            let mut r = record.clone();
            r.payload_hash = PayloadHash::of(&other);
            r.payload_len = other.len() as u64;
            (r.sign(&self.key), other)
        });
        let signed = record.sign(&self.key);
        self.own_head = Some(meshtrain_ledger::Head {
            seq,
            hash: signed.hash(),
            round: t.round,
        });
        self.counters.payload_bytes += t.payload.len() as u64;
        self.set_phase(Phase::Publishing(Box::new(OwnRound {
            note: RoundNote {
                round: t.round,
                eval: t.eval,
                stats: t.stats,
                train_ms: t.train_ms,
            },
            decoded: t.decoded,
            twin,
        })));
        self.emit(Effect::Inbox(Job::Own {
            signed: Box::new(signed),
            payload: t.payload,
        }));
    }

    /// After a restart our record for ROUND may already be signed (the node
    /// died between publishing and closing the round). Training again would
    /// contribute twice; publish the stored record again and wait.
    fn republish_own(&mut self, round: u64) -> bool {
        if self.own_last.as_ref().is_none_or(|(s, _, _)| s.record.round != round) {
            return false;
        }
        let Some((signed, payload, decoded)) = self.own_last.take() else {
            return false;
        };
        info!(
            round,
            seq = signed.record.seq.0,
            "our update for this round was signed before the restart; publishing it again"
        );
        self.set_phase(Phase::Publishing(Box::new(OwnRound {
            note: RoundNote {
                round,
                ..Default::default()
            },
            decoded,
            twin: None,
        })));
        self.publish_own(signed, payload);
        true
    }

    pub(super) fn publish_own(&mut self, signed: SignedRecord, payload: Vec<u8>) {
        let Phase::Publishing(own) = std::mem::replace(&mut self.phase, Phase::Training) else {
            return;
        };
        let OwnRound { note, decoded, twin } = *own;
        let max_inline = if self.withholds_inline() {
            0
        } else {
            self.cfg.send_inline_payload.min(self.cfg.max_inline_payload)
        };
        let inline = (payload.len() <= max_inline).then_some(payload);
        self.emit(Effect::Publish(GossipMessage::Update {
            record: signed.to_bytes(),
            payload: inline,
        }));
        if let Some((twin, twin_payload)) = twin {
            let inline = (twin_payload.len() <= max_inline).then_some(twin_payload);
            self.emit(Effect::Publish(GossipMessage::Update {
                record: twin.to_bytes(),
                payload: inline,
            }));
        }
        self.counters.published += 1;
        self.mischief_published(note.round, signed.record.payload_hash, &decoded);
        self.add_vote(meshtrain_ledger::Vote::Record(signed.clone()));
        self.book.offer(
            Contribution {
                author: self.me,
                seq: signed.record.seq,
                record_hash: signed.hash(),
                round: note.round,
                n_samples: signed.record.n_samples,
                base: signed.record.base_hash,
                delta: decoded,
            },
            self.now,
        );
        self.book.own_ready(self.now);
        self.set_phase(Phase::Waiting(note));
        if let Some(at) = self.book.deadline() {
            self.arm(Timer::Deadline, at);
        }

        self.maybe_close();
    }

    /// An honest update of the round we collude in arrived.
    pub(super) fn collusion_saw_update(&mut self) {
        let Phase::Colluding(c) = &self.phase else {
            return;
        };
        let at = if self.collusion_ready() {
            self.now
        } else {
            c.since + COLLUDE_MAX_MS
        };
        self.arm(Timer::Collude, at);
    }

    /// Whether a colluder holds enough of the round's updates to craft
    /// from: half of the other members expected this round.
    fn collusion_ready(&self) -> bool {
        let Phase::Colluding(c) = &self.phase else {
            return false;
        };
        let seen = self
            .book
            .for_round(c.trained.round)
            .filter(|x| x.author != self.me)
            .count();
        let others = self.book.expected(&self.connected_authors());
        seen >= others.len().div_ceil(2).max(1)
    }

    /// A colluding attacker crafts its update once it holds half the other
    /// members' updates of the round (or after a few seconds), and has it
    /// encoded.
    pub(super) fn try_collude(&mut self) {
        let now = self.now;
        let Some(attack) = self.cfg.attack else {
            return;
        };
        let Phase::Colluding(c) = &self.phase else {
            return;
        };
        if c.crafting {
            return;
        }
        if !self.collusion_ready() && now.saturating_sub(c.since) < COLLUDE_MAX_MS {
            self.arm(Timer::Collude, c.since + COLLUDE_MAX_MS);
            return;
        }
        let round = c.trained.round;
        let honest: Vec<&[f32]> = self
            .book
            .for_round(round)
            .filter(|x| x.author != self.me)
            .map(|x| x.delta.as_slice())
            .collect();
        let previous = self.mischief.as_ref().and_then(|m| m.previous_mean.as_deref());
        let mut crafted = attack.collude(&honest, &c.trained.decoded, previous);
        // Colluders craft from the same honest updates: alike to the bit,
        // the second one's payload would be the first one's (a replay, and
        // a ban), and mimic's its honest author's. A factor of their own,
        // 1.001 to 1.003, keeps them apart.
        let own = u32::from_le_bytes([self.me.0[0], self.me.0[1], self.me.0[2], self.me.0[3]]);
        let factor = 1.0 + 0.002 * (0.5 + own as f32 / u32::MAX as f32);
        crafted.iter_mut().for_each(|v| *v *= factor);
        if !honest.is_empty() {
            let mean: Vec<f32> = crate::attack::mean_of(&honest).into_iter().map(|v| v as f32).collect();
            if let Some(m) = self.mischief.as_mut() {
                m.previous_mean = Some(mean);
            }
        }
        info!(round, honest = honest.len(), %attack, "crafted a colluding update");
        let like = c.trained.clone();
        if let Phase::Colluding(c) = &mut self.phase {
            c.crafting = true;
        }
        self.emit(Effect::Craft {
            round,
            delta: crafted,
            like,
        });
    }
}
