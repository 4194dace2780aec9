//! What an attacking node does besides poisoning its own update (which the
//! trainer does): the Sybil identities of `sybil:K` and `anchor-hijack:K`,
//! the held-back payloads of `split` and `dissensus`, the held-back updates
//! of `late`, and what colluding attacks remember between rounds.
//! Honest nodes never build this.

use meshtrain_gossip::libp2p::PeerId;
use meshtrain_gossip::{FetchRequest, FetchResponse};
use meshtrain_ledger::{AuthorId, AuthorKey, PayloadHash, SignedRecord, WeightsHash};
use tracing::{debug, info};

use super::{ChanId, Core, CoreConfig, Effect, Millis, Timer};
use crate::attack::sybil::{Poisoned, Sybils};
use crate::attack::{Attack, LATE_SHARE};

/// `split` answers the late half after at most this long (peers give up on
/// a request after 30 s).
const SPLIT_DELAY_CAP_MS: Millis = 20_000;

/// Held-back answers at most (each is a payload request of ours).
const MAX_HELD: usize = 256;

pub(super) struct Mischief {
    sybils: Option<Sybils>,
    /// `split`: our newest payload, and the answers held back for the late
    /// half of the mesh.
    own_payload: Option<PayloadHash>,
    held: Vec<Held>,
    /// `late`: our stored update, published when `Timer::Late` fires, and
    /// when it was ready.
    late: Option<(SignedRecord, Vec<u8>, Millis)>,
    /// Colluding: the honest mean of the last round crafted for (ROP's
    /// reference).
    pub(super) previous_mean: Option<Vec<f32>>,
}

struct Held {
    due: Millis,
    peer: PeerId,
    chan: ChanId,
    request: FetchRequest,
}

impl Mischief {
    pub(super) fn new(cfg: &CoreConfig, key: &AuthorKey, anchor: &[f32]) -> Option<Self> {
        let attack = cfg.attack?;
        let sybils = attack.sybils().map(|(count, hijack)| {
            let (host, identities) = Sybils::derive_keys(key, count as usize);
            Sybils::new(
                host,
                identities,
                cfg.run_id,
                cfg.genesis_link,
                cfg.spec.exchange.codec,
                hijack.then(|| Poisoned::from(anchor)),
            )
        });
        Some(Self {
            sybils,
            own_payload: None,
            held: Vec::new(),
            late: None,
            previous_mean: None,
        })
    }
}

/// Which half of the mesh a `split` attacker answers late.
fn late_half(peer: &PeerId) -> bool {
    blake3::hash(&peer.to_bytes()).as_bytes()[0] & 1 == 1
}

impl Core {
    /// Our (honest) update for `round` is out: the Sybils send theirs, each
    /// a sign-flipped copy of ours, a little apart from the others.
    pub(super) fn mischief_published(&mut self, round: u64, payload: PayloadHash, decoded: &[f32]) {
        let base = self.anchor_key();
        let max_inline = self.cfg.max_inline_payload;
        let Some(m) = self.mischief.as_mut() else {
            return;
        };
        m.own_payload = Some(payload);
        let Some(sybils) = m.sybils.as_mut() else {
            return;
        };
        let msgs = sybils.round(round, base, max_inline, |i| {
            let f = -(1.0 + i as f32 * 1e-3);
            decoded.iter().map(|v| v * f).collect()
        });
        info!(
            round,
            identities = msgs.len(),
            "ATTACK: the Sybil identities published their updates"
        );
        for msg in msgs {
            self.emit(Effect::Publish(msg));
        }
    }

    /// Our update is stored: publish it, or, attacking `late`, hold it until
    /// just before the honest nodes' deadline, as this node would set it
    /// (they started waiting when their own updates were ready, about when
    /// ours was): the whole deadline until a quorum is in, then the grace.
    pub(super) fn own_stored(&mut self, signed: SignedRecord, payload: Vec<u8>) {
        if self.cfg.attack != Some(Attack::Late) {
            return self.publish_own(signed, payload);
        }
        let round = signed.record.round;
        let now = self.now;
        let Some(m) = self.mischief.as_mut() else {
            return self.publish_own(signed, payload);
        };
        m.late = Some((signed, payload, now));
        self.book.own_ready(now);
        debug!(round, "ATTACK: holding our update back until just before the deadline");
        self.late_rearm();
    }

    /// `late`: the honest deadline moves as updates arrive (a quorum in
    /// brings it forward): aim just before it again.
    pub(super) fn late_rearm(&mut self) {
        let Some(since) = self.mischief.as_ref().and_then(|m| m.late.as_ref()).map(|l| l.2) else {
            return;
        };
        let expected = self.book.expected(&self.connected_authors());
        self.book.note_arrivals(self.now, &expected);
        let Some(deadline) = self.book.deadline() else {
            return;
        };
        let from = self.book.quorum_at().unwrap_or(since).max(since);
        let due = from + (deadline.saturating_sub(from) as f64 * LATE_SHARE) as Millis;
        self.arm(Timer::Late, due.max(self.now));
    }

    /// `late`: the held update goes out now (unless the round moved on
    /// without it, which `publish_own` sees).
    pub(super) fn release_late(&mut self) {
        if let Some((signed, payload, _)) = self.mischief.as_mut().and_then(|m| m.late.take()) {
            self.publish_own(signed, payload);
        }
    }

    /// Whether a `split` (or `dissensus`) attacker sends its payload by
    /// hash only.
    pub(super) fn withholds_inline(&self) -> bool {
        self.splits()
    }

    /// `split` and `dissensus` answer half the mesh late.
    fn splits(&self) -> bool {
        matches!(self.cfg.attack, Some(Attack::Split | Attack::Dissensus))
    }

    /// Answers a request the attacker's way, if it has one: the Sybils'
    /// payloads, the poisoned anchor, or our payload held back from the
    /// late half. Returns whether it answered (or will).
    pub(super) fn mischief_request(&mut self, peer: PeerId, chan: ChanId, request: &FetchRequest) -> bool {
        let round = self.round();
        let genesis = self.cfg.genesis_weights;
        let delay = self.cfg.spec.rounds.max_wait_ms.min(SPLIT_DELAY_CAP_MS);
        let split = self.splits();
        let now = self.now;
        let Some(m) = self.mischief.as_mut() else {
            return false;
        };
        let response = match (request, m.sybils.as_ref()) {
            (FetchRequest::Payload { hash }, Some(s)) => {
                s.payload(&PayloadHash(*hash)).cloned().map(FetchResponse::Payload)
            }
            (FetchRequest::Anchor { weights }, Some(s)) => s.anchor_offer(round, genesis, weights.map(WeightsHash)),
            (FetchRequest::Payload { hash }, None)
                if split
                    && m.own_payload == Some(PayloadHash(*hash))
                    && late_half(&peer)
                    && m.held.len() < MAX_HELD =>
            {
                debug!(round, peer = %super::start::short(&peer), "ATTACK: holding our payload back from this peer");
                m.held.push(Held {
                    due: now + delay,
                    peer,
                    chan,
                    request: request.clone(),
                });
                let first = m.held.iter().map(|h| h.due).min().unwrap_or(now);
                self.arm(Timer::Held, first);
                return true;
            }
            _ => None,
        };
        match response {
            Some(response) => {
                self.emit(Effect::Respond { chan, response });
                true
            }
            None => false,
        }
    }

    /// Answers the held-back requests that are due.
    pub(super) fn release_held(&mut self) {
        let now = self.now;
        let Some(m) = self.mischief.as_mut() else {
            return;
        };
        let (due, kept): (Vec<Held>, Vec<Held>) = std::mem::take(&mut m.held).into_iter().partition(|h| h.due <= now);
        m.held = kept;
        let next = m.held.iter().map(|h| h.due).min();
        for h in due {
            self.emit(Effect::Serve {
                peer: h.peer,
                chan: h.chan,
                request: h.request,
            });
        }
        if let Some(at) = next {
            self.arm(Timer::Held, at);
        }
    }

    /// The Sybil identities (for the results), and the anchor they push.
    pub fn sybil_authors(&self) -> Vec<AuthorId> {
        self.mischief
            .as_ref()
            .and_then(|m| m.sybils.as_ref())
            .map(|s| s.authors())
            .unwrap_or_default()
    }

    pub fn poisoned_anchor(&self) -> Option<WeightsHash> {
        self.mischief
            .as_ref()
            .and_then(|m| m.sybils.as_ref())
            .and_then(|s| s.poisoned.as_ref())
            .map(|p| p.key.0)
    }

    pub fn sybil_records(&self) -> u64 {
        self.mischief
            .as_ref()
            .and_then(|m| m.sybils.as_ref())
            .map_or(0, |s| s.published())
    }
}
