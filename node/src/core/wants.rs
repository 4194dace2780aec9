//! Payloads this node still needs for records it already holds, and which
//! peer to ask next: the author, then the peer that sent the record first,
//! then every member, a few times round before giving up. A request that
//! takes much longer than fetches usually do is hedged: the next candidate
//! is asked too (an author that holds its payload back from some peers,
//! `split`, would otherwise keep them waiting on it).

use std::collections::{HashMap, VecDeque};

use meshtrain_gossip::libp2p::PeerId;
use meshtrain_ledger::{AuthorId, PayloadHash, RecordHash, Seq};

use super::Millis;

/// Pause before asking the candidates round again once each has failed: they
/// may not have fetched the payload themselves yet.
const RETRY_MS: Millis = 300;
/// Rounds through the candidates before giving up.
const ROUNDS_OF_ASKING: u32 = 3;

/// The record a wanted payload belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WantedFor {
    pub author: AuthorId,
    pub seq: Seq,
    pub record_hash: RecordHash,
    pub round: u64,
}

#[derive(Debug)]
struct Want {
    of: WantedFor,
    candidates: VecDeque<PeerId>,
    attempts: u32,
    in_flight: bool,
    retry_at: Option<Millis>,
    /// When the last request went out, and whether it was hedged since.
    asked_at: Option<Millis>,
    hedged: bool,
}

/// What to do next about one wanted payload.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Ask(PeerId),
    /// Every candidate was asked often enough: the payload is unavailable.
    GiveUp(WantedFor),
    /// Not wanted (any more), or no one to ask.
    Nothing,
}

#[derive(Debug, Default)]
pub struct Wants {
    map: HashMap<PayloadHash, Want>,
}

impl Wants {
    pub fn contains(&self, hash: &PayloadHash) -> bool {
        self.map.contains_key(hash)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Starts wanting `hash`; `candidates` in the order to ask. Returns false
    /// if it was wanted already.
    pub fn want(&mut self, hash: PayloadHash, of: WantedFor, candidates: impl IntoIterator<Item = PeerId>) -> bool {
        if self.map.contains_key(&hash) {
            return false;
        }
        let mut list = VecDeque::new();
        for p in candidates {
            if !list.contains(&p) {
                list.push_back(p);
            }
        }
        self.map.insert(
            hash,
            Want {
                of,
                candidates: list,
                attempts: 0,
                in_flight: false,
                retry_at: None,
                asked_at: None,
                hedged: false,
            },
        );
        true
    }

    /// The next peer to ask at `now`, or the end of asking.
    pub fn next(&mut self, hash: &PayloadHash, now: Millis) -> Next {
        let Some(want) = self.map.get_mut(hash) else {
            return Next::Nothing;
        };
        let max_attempts = (want.candidates.len() as u32).max(1) * ROUNDS_OF_ASKING;
        if want.attempts >= max_attempts {
            let of = want.of;
            self.map.remove(hash);
            return Next::GiveUp(of);
        }
        let Some(peer) = want.candidates.pop_front() else {
            return Next::Nothing;
        };
        want.candidates.push_back(peer);
        want.attempts += 1;
        want.in_flight = true;
        want.retry_at = None;
        want.asked_at = Some(now);
        want.hedged = false;
        Next::Ask(peer)
    }

    /// When the last request for `hash` went out.
    pub fn asked_at(&self, hash: &PayloadHash) -> Option<Millis> {
        self.map.get(hash).and_then(|w| w.asked_at)
    }

    /// Wants whose request has been out `after` or longer without an
    /// answer, not hedged yet: each is marked hedged (ask the next
    /// candidate too), oldest name first.
    pub fn hedges(&mut self, now: Millis, after: Millis) -> Vec<PayloadHash> {
        let mut due: Vec<PayloadHash> = self
            .map
            .iter_mut()
            .filter(|(_, w)| w.in_flight && !w.hedged && w.asked_at.is_some_and(|t| now >= t + after))
            .map(|(h, w)| {
                w.hedged = true;
                *h
            })
            .collect();
        due.sort();
        due
    }

    /// When the earliest unhedged request may be hedged.
    pub fn next_hedge(&self, after: Millis) -> Option<Millis> {
        self.map
            .values()
            .filter(|w| w.in_flight && !w.hedged)
            .filter_map(|w| w.asked_at.map(|t| t + after))
            .min()
    }

    /// An attempt failed: ask the next candidate now, or, once each was
    /// asked in this pass, go round again after a pause.
    pub fn failed(&mut self, hash: &PayloadHash, now: Millis) {
        if let Some(w) = self.map.get_mut(hash) {
            w.in_flight = false;
            let pass_done = w.attempts.is_multiple_of((w.candidates.len() as u32).max(1));
            w.retry_at = Some(if pass_done { now + RETRY_MS } else { now });
        }
    }

    /// The payload arrived (or its record was judged): stop wanting it.
    /// Puts `peers` first among a wanted payload's candidates (the next
    /// ask goes to them). Returns whether the payload is wanted.
    pub fn prefer(&mut self, hash: &PayloadHash, peers: &[PeerId]) -> bool {
        let Some(w) = self.map.get_mut(hash) else {
            return false;
        };
        for p in peers.iter().rev() {
            w.candidates.retain(|c| c != p);
            w.candidates.push_front(*p);
        }
        true
    }

    pub fn done(&mut self, hash: &PayloadHash) -> Option<WantedFor> {
        self.map.remove(hash).map(|w| w.of)
    }

    /// Wants whose pause is over, oldest name first (a stable order).
    pub fn due(&self, now: Millis) -> Vec<PayloadHash> {
        let mut due: Vec<PayloadHash> = self
            .map
            .iter()
            .filter(|(_, w)| !w.in_flight && w.retry_at.is_some_and(|t| now >= t))
            .map(|(h, _)| *h)
            .collect();
        due.sort();
        due
    }

    /// When the earliest pause ends.
    pub fn next_retry(&self) -> Option<Millis> {
        self.map
            .values()
            .filter(|w| !w.in_flight)
            .filter_map(|w| w.retry_at)
            .min()
    }

    /// Forgets wants for rounds before `round` (they no longer matter).
    pub fn drop_before(&mut self, round: u64) {
        self.map.retain(|_, w| w.of.round >= round);
    }

    /// Forgets every want of `author` (banned).
    pub fn drop_author(&mut self, author: &AuthorId) {
        self.map.retain(|_, w| w.of.author != *author);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshtrain_ledger::AuthorKey;

    fn peer(n: u8) -> PeerId {
        super::super::members::peer_of(&AuthorKey::from_secret([n; 32]).author()).expect("peer")
    }

    fn of() -> WantedFor {
        WantedFor {
            author: AuthorId([1; 32]),
            seq: Seq(0),
            record_hash: RecordHash([2; 32]),
            round: 3,
        }
    }

    #[test]
    fn preferred_peers_are_asked_next() {
        let mut w = Wants::default();
        let h = PayloadHash([9; 32]);
        assert!(!w.prefer(&h, &[peer(3)]), "not wanted");
        assert!(w.want(h, of(), [peer(1), peer(2), peer(3)]));
        assert_eq!(w.next(&h, 0), Next::Ask(peer(1)));
        assert!(w.prefer(&h, &[peer(3), peer(1)]));
        assert_eq!(w.next(&h, 10), Next::Ask(peer(3)));
        assert_eq!(w.next(&h, 20), Next::Ask(peer(1)));
        assert_eq!(w.next(&h, 30), Next::Ask(peer(2)));
    }

    #[test]
    fn asks_each_candidate_in_turn_then_gives_up() {
        let mut w = Wants::default();
        let h = PayloadHash([9; 32]);
        assert!(w.want(h, of(), [peer(1), peer(2), peer(1)]));
        assert!(!w.want(h, of(), [peer(3)]));
        let mut asked = Vec::new();
        for t in 0..6 {
            match w.next(&h, 100 * t) {
                Next::Ask(p) => asked.push(p),
                other => panic!("attempt {t}: {other:?}"),
            }
            w.failed(&h, 100 * t);
            if t % 2 == 0 {
                // peer(2) not asked in this pass yet: at once.
                assert_eq!(w.due(100 * t), vec![h]);
            } else {
                // Both asked: a pause before the next pass.
                assert_eq!(w.due(100 * t), Vec::<PayloadHash>::new());
                assert_eq!(w.due(100 * t + RETRY_MS), vec![h]);
            }
        }
        assert_eq!(asked, vec![peer(1), peer(2), peer(1), peer(2), peer(1), peer(2)]);
        assert_eq!(w.next(&h, 1_000), Next::GiveUp(of()));
        assert!(w.is_empty());
    }

    /// A request out too long is hedged once: the next candidate is asked
    /// beside it.
    #[test]
    fn a_slow_request_is_hedged_once() {
        let mut w = Wants::default();
        let h = PayloadHash([9; 32]);
        w.want(h, of(), [peer(1), peer(2)]);
        assert_eq!(w.next(&h, 1_000), Next::Ask(peer(1)));
        assert_eq!(w.next_hedge(200), Some(1_200));
        assert!(w.hedges(1_199, 200).is_empty());
        assert_eq!(w.hedges(1_200, 200), vec![h]);
        assert!(w.hedges(5_000, 200).is_empty(), "hedged once");
        assert_eq!(w.next_hedge(200), None);
        assert_eq!(w.next(&h, 1_200), Next::Ask(peer(2)));
        assert_eq!(w.asked_at(&h), Some(1_200));
    }

    #[test]
    fn arrival_and_old_rounds_end_a_want() {
        let mut w = Wants::default();
        w.want(PayloadHash([1; 32]), of(), [peer(1)]);
        w.want(PayloadHash([2; 32]), WantedFor { round: 9, ..of() }, [peer(1)]);
        assert_eq!(w.done(&PayloadHash([1; 32])), Some(of()));
        w.drop_before(10);
        assert!(w.is_empty());
    }
}
