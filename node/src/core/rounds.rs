//! Round bookkeeping: which verified deltas wait for which round, when a
//! round may close, and how long to wait for stragglers.
//!
//! Plain structs and the caller's clock (milliseconds), so every rule here
//! is tested without a network.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use meshtrain_ledger::{AuthorId, RecordHash, RejectReason, Seq, Verdict, VerdictEntry};

use super::Millis;

/// A verified update whose payload decoded: ready to aggregate.
#[derive(Clone, Debug)]
pub struct Contribution {
    pub author: AuthorId,
    pub seq: Seq,
    pub record_hash: RecordHash,
    pub round: u64,
    pub n_samples: u64,
    /// The anchor the author trained from (as it claims).
    pub base: meshtrain_ledger::WeightsHash,
    pub delta: Arc<Vec<f32>>,
}

impl Contribution {
    /// Its verdict when refused before aggregation (weighing nothing).
    pub fn rejected(&self, reason: RejectReason) -> VerdictEntry {
        VerdictEntry {
            author: self.author,
            seq: self.seq,
            record_hash: self.record_hash,
            round: self.round,
            prior: 0.0,
            verdict: Verdict::Rejected { reason },
        }
    }
}

/// What happened to an offered contribution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    Kept,
    /// Its round lies behind the staleness window; a verdict records it.
    Stale,
    /// This author already has a contribution for that round.
    Duplicate,
    /// It belongs to a round before this node joined the mesh.
    Before,
}

/// Why a round may close now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// Every expected author's update is in.
    AllIn,
    /// A quorum was in and its grace for the stragglers passed.
    Quorum,
    /// The adaptive deadline passed with some missing (no quorum in time).
    Deadline,
}

/// Once this share of the round's expected updates (ours included) is in,
/// the rest get a short grace instead of the whole deadline: a minority
/// publishing just before the deadline (`late`) cannot make every round
/// wait for it.
const QUORUM: (usize, usize) = (2, 3);
/// The grace: this multiple of the time the later half of the quorum took
/// to arrive (from its median arrival to the quorum), and at least
/// `GRACE_MIN_MS`. With honest arrivals spread evenly over S, the quorum
/// (two thirds) comes S/6 after the median and the last one S/3 after the
/// quorum: twice S/6 covers it, so a clean round is rarely cut, and an
/// attacker timing its update to the grace stretches a round by about S/4
/// beyond the honest nodes' own wait. The later half, because a minority
/// publishing at once (free riders do not train) would otherwise widen the
/// spread at will.
const GRACE_SHARE: f64 = 2.0;
const GRACE_MIN_MS: Millis = 100;
/// The first round a node takes part in gives stragglers twice the
/// quorum's whole spread past the quorum (members may still be fetching
/// their shards, and with the usual grace they would start a round
/// behind), but at most this long: a member that will not come (its
/// round-0 record lost, say) must not hold the round to its whole
/// deadline (30 s by default), nor a `late` one every first round.
const FIRST_ROUND_GRACE_MS: Millis = 5_000;
/// And at least this long (a quorum all in at once says little about
/// members still fetching); the whole `FIRST_ROUND_GRACE_MS` while a member
/// still missing is seen fetching its blocks (`RoundBook::members_fetching`).
const FIRST_ROUND_GRACE_MIN_MS: Millis = 1_000;

/// Updates (ours included) that make a quorum of `members`.
pub fn quorum(members: usize) -> usize {
    (members * QUORUM.0).div_ceil(QUORUM.1).max(1)
}

/// Learns how long a round waits for stragglers from the waits it has seen
/// (rather than a constant, which is too long on a fast mesh and too short
/// on a slow one).
#[derive(Clone, Debug)]
pub struct AdaptiveWait {
    min: Millis,
    max: Millis,
    ema_ms: Option<f64>,
}

impl AdaptiveWait {
    pub fn new(min: Millis, max: Millis) -> Self {
        Self { min, max, ema_ms: None }
    }

    /// Records how long the last round waited after the own update for a
    /// quorum of updates.
    pub fn observe(&mut self, waited: Millis) {
        let ms = waited as f64;
        self.ema_ms = Some(match self.ema_ms {
            None => ms,
            Some(e) => 0.7 * e + 0.3 * ms,
        });
    }

    /// Four times the typical wait plus a second of slack, within bounds;
    /// the maximum until anything was observed.
    pub fn timeout(&self) -> Millis {
        match self.ema_ms {
            None => self.max,
            Some(e) => ((4.0 * e + 1000.0) as Millis).clamp(self.min, self.max),
        }
    }
}

/// Contributions waiting to be aggregated, by round.
#[derive(Debug)]
pub struct RoundBook {
    current: u64,
    staleness: u64,
    decay: f32,
    pending: BTreeMap<u64, BTreeMap<AuthorId, Contribution>>,
    rejections: Vec<VerdictEntry>,
    /// Authors (other than us) seen contributing, with their latest round.
    last_seen: BTreeMap<AuthorId, u64>,
    own_ready_at: Option<Millis>,
    /// When a quorum of the current round's expected updates was first in:
    /// the wait the adaptive deadline learns from (not the close, which
    /// may wait longer, for stragglers or votes), and where the grace for
    /// the stragglers starts.
    quorum_at: Option<Millis>,
    /// When each update of a round (ours or another's) arrived: the
    /// quorum's spread sizes the grace.
    arrivals: BTreeMap<u64, BTreeMap<AuthorId, Millis>>,
    /// The round this node (re)joined at; older updates are ignored.
    joined_at: u64,
    /// Authors whose verified record for a round is in, payload still on its
    /// way: the round waits for those payloads too (until the deadline), or
    /// nodes that happen to have it would aggregate differently.
    announced: BTreeMap<u64, BTreeMap<AuthorId, Millis>>,
    /// Members judged habitually late (see `super::lateness`):
    /// their records announced without a payload hold no round either.
    no_wait: HashSet<AuthorId>,
    /// See [`RoundBook::members_fetching`].
    fetching: bool,
    /// Updates (ours included) that made a quorum when last looked.
    quorum_need: usize,
    pub wait: AdaptiveWait,
}

/// Everything one round's aggregation consumes, in a fixed order.
pub struct RoundInputs {
    pub round: u64,
    /// (contribution, prior weight): this round's at 1.0, late ones decayed.
    pub inputs: Vec<(Contribution, f32)>,
    pub rejections: Vec<VerdictEntry>,
    /// This round's updates that came in the later half of its grace or
    /// after it: the round waited for them (see `UpdateRecord::waited`).
    pub waited: BTreeSet<RecordHash>,
}

impl RoundBook {
    pub fn new(start_round: u64, staleness: u64, decay: f32, wait: AdaptiveWait) -> Self {
        Self {
            current: start_round,
            staleness,
            decay,
            pending: BTreeMap::new(),
            rejections: Vec::new(),
            last_seen: BTreeMap::new(),
            own_ready_at: None,
            quorum_at: None,
            arrivals: BTreeMap::new(),
            joined_at: start_round,
            announced: BTreeMap::new(),
            no_wait: HashSet::new(),
            fetching: false,
            quorum_need: 1,
            wait,
        }
    }

    pub fn current(&self) -> u64 {
        self.current
    }

    /// The first round this node takes part in.
    pub fn joined_at(&self) -> u64 {
        self.joined_at
    }

    /// Offers a contribution that arrived at `now`.
    pub fn offer(&mut self, c: Contribution, now: Millis) -> Offer {
        let seen = self.last_seen.entry(c.author).or_insert(c.round);
        *seen = (*seen).max(c.round);
        if c.round < self.joined_at {
            return Offer::Before;
        }
        if c.round.saturating_add(self.staleness) < self.current {
            self.rejections.push(c.rejected(RejectReason::Stale));
            return Offer::Stale;
        }
        let slot = self.pending.entry(c.round).or_default();
        if slot.contains_key(&c.author) {
            return Offer::Duplicate;
        }
        self.arrivals.entry(c.round).or_default().insert(c.author, now);
        slot.insert(c.author, c);
        Offer::Kept
    }

    /// A verified record of `author` for `round` came in at `now` without
    /// its payload.
    pub fn announce(&mut self, round: u64, author: AuthorId, now: Millis) {
        if round >= self.current {
            self.announced.entry(round).or_default().entry(author).or_insert(now);
        }
    }

    /// Members no round waits for (judged habitually late); the caller
    /// leaves them out of `expected` too.
    pub fn wait_not_for(&mut self, late: HashSet<AuthorId>) {
        self.no_wait = late;
    }

    /// Whether a member still missing from the current round is still
    /// fetching its shard (it asked us for blocks a moment ago): the
    /// first round then gives stragglers its whole grace.
    pub fn members_fetching(&mut self, fetching: bool) {
        self.fetching = fetching;
    }

    /// The members no round waits for (see [`RoundBook::wait_not_for`]).
    pub fn not_waited_for(&self) -> &HashSet<AuthorId> {
        &self.no_wait
    }

    /// Its payload will not come (no peer had it, or it was bad).
    pub fn unannounce(&mut self, round: u64, author: &AuthorId) {
        if let Some(s) = self.announced.get_mut(&round) {
            s.remove(author);
        }
    }

    /// Records a protocol-level rejection for the next verdict block.
    pub fn reject(&mut self, entry: VerdictEntry) {
        self.rejections.push(entry);
    }

    pub fn has(&self, round: u64, author: &AuthorId) -> bool {
        self.pending.get(&round).is_some_and(|m| m.contains_key(author))
    }

    /// Contributions held for `round` (for colluding attackers and metrics).
    pub fn for_round(&self, round: u64) -> impl Iterator<Item = &Contribution> {
        self.pending.get(&round).into_iter().flat_map(|m| m.values())
    }

    pub fn own_ready(&mut self, now: Millis) {
        self.own_ready_at = Some(now);
    }

    pub fn is_own_ready(&self) -> bool {
        self.own_ready_at.is_some()
    }

    /// The authors we wait for in the current round: the connected peers
    /// that contributed recently, or every connected peer while the run is
    /// young (before anyone has been seen).
    pub fn expected(&self, connected: &HashSet<AuthorId>) -> HashSet<AuthorId> {
        connected
            .iter()
            .filter(|a| match self.last_seen.get(a) {
                Some(&r) => r.saturating_add(2) >= self.current,
                None => self.current < 2,
            })
            .copied()
            .collect()
    }

    /// Notes at `now` whether a quorum of the current round is in (ours
    /// and the `expected` authors' updates; the first time counts).
    pub fn note_arrivals(&mut self, now: Millis, expected: &HashSet<AuthorId>) {
        self.quorum_need = quorum(expected.len() + 1);
        if self.own_ready_at.is_none() || self.quorum_at.is_some() {
            return;
        }
        let have = self.pending.get(&self.current);
        let is_in = |a: &AuthorId| have.is_some_and(|m| m.contains_key(a));
        let others = expected.iter().filter(|a| is_in(a)).count();
        // Every member not judged late in counts as a quorum too: with late
        // ones over a third, a quorum of all might never come (and the
        // deadline would learn nothing).
        let timely_in = expected.iter().filter(|a| !self.no_wait.contains(*a)).all(is_in);
        if 1 + others >= quorum(expected.len() + 1) || timely_in {
            self.quorum_at = Some(now);
        }
    }

    /// Whether the current round may close at `now`: every expected (and
    /// announced) update is in, or a quorum was and its grace passed, or
    /// the deadline passed. `note_arrivals` first.
    pub fn should_close(&self, now: Millis, expected: &HashSet<AuthorId>) -> Option<Close> {
        self.own_ready_at?;
        let have = self.pending.get(&self.current);
        let announced = self
            .announced
            .get(&self.current)
            .into_iter()
            .flat_map(|m| m.keys())
            .filter(|a| !self.no_wait.contains(*a));
        let all_in = expected
            .iter()
            .chain(announced)
            .all(|a| have.is_some_and(|m| m.contains_key(a)));
        if all_in {
            return Some(Close::AllIn);
        }
        let deadline = self.deadline()?;
        if now < deadline {
            return None;
        }
        Some(if self.quorum_deadline().is_some_and(|q| q <= deadline) {
            Close::Quorum
        } else {
            Close::Deadline
        })
    }

    /// When the quorum's grace ends, if a quorum is in: the grace is a
    /// share of the quorum's spread, so it follows how far apart honest
    /// updates arrive, not how late the last one is.
    fn quorum_deadline(&self) -> Option<Millis> {
        let q = self.quorum_at?;
        let grace = self.grace(q);
        // A payload whose record was in with the quorum but that is still on
        // its way (held back from us, say, and asked of another peer) gets
        // one grace more: nodes that have it and nodes that do not would
        // aggregate apart. A record that came after the quorum (late) gets
        // none: that would hand a late member one more grace every round.
        Some(q + if self.announced_missing(q) { 2 * grace } else { grace })
    }

    /// The stragglers' grace after a quorum in at `q`.
    fn grace(&self, q: Millis) -> Millis {
        let mut before: Vec<Millis> = self
            .arrivals
            .get(&self.current)
            .into_iter()
            .flat_map(|m| m.values())
            .copied()
            .filter(|t| *t <= q)
            .collect();
        before.sort_unstable();
        let median = before.get(before.len().saturating_sub(1) / 2).copied().unwrap_or(q);
        let grace = (q.saturating_sub(median) as f64 * GRACE_SHARE) as Millis;
        let floor = if self.current != self.joined_at {
            GRACE_MIN_MS
        } else if self.fetching {
            FIRST_ROUND_GRACE_MS
        } else {
            // Members may still be fetching their shards: as long again as
            // the quorum's whole spread (fetches vary from first to last),
            // not a constant a `late` member takes every time.
            let first = before.first().copied().unwrap_or(q);
            ((q.saturating_sub(first) as f64 * GRACE_SHARE) as Millis)
                .clamp(FIRST_ROUND_GRACE_MIN_MS, FIRST_ROUND_GRACE_MS)
        };
        grace.clamp(floor, self.wait.timeout().max(floor))
    }

    /// Whether a record of the current round that was in by `by` still
    /// lacks its payload.
    fn announced_missing(&self, by: Millis) -> bool {
        let have = self.pending.get(&self.current);
        self.announced.get(&self.current).is_some_and(|m| {
            m.iter()
                .any(|(a, at)| *at <= by && !self.no_wait.contains(a) && !have.is_some_and(|h| h.contains_key(a)))
        })
    }

    /// When a quorum of the current round was in, if it was.
    pub fn quorum_at(&self) -> Option<Millis> {
        self.quorum_at
    }

    /// When the current round closes at the latest (stragglers aside), if
    /// the own update is ready: the deadline, or the quorum's grace.
    pub fn deadline(&self) -> Option<Millis> {
        let full = self.own_ready_at? + self.wait.timeout();
        Some(self.quorum_deadline().map_or(full, |q| q.min(full)))
    }

    /// A closed round was rebuilt from `taken`: what else it had (merged
    /// at our close, or come since) waits for the next close as late, like
    /// at a node whose close took exactly `taken`; `taken` is merged.
    pub fn rebuilt(&mut self, round: u64, had: impl IntoIterator<Item = Contribution>, taken: &BTreeSet<RecordHash>) {
        for slot in self.pending.values_mut() {
            slot.retain(|_, c| !taken.contains(&c.record_hash));
        }
        self.pending.retain(|_, slot| !slot.is_empty());
        let slot = self.pending.entry(round).or_default();
        for c in had {
            if c.round == round && !taken.contains(&c.record_hash) {
                slot.entry(c.author).or_insert(c);
            }
        }
        if slot.is_empty() {
            self.pending.remove(&round);
        }
    }

    /// Jumps to `round` (after adopting the mesh's anchor): what was pending
    /// for earlier rounds no longer applies, and updates older than the
    /// jump are history this node never took part in (not stale verdicts).
    /// Returns the contributions of the rounds skipped (a rebuild of one
    /// of them may still need them).
    pub fn restart_at(&mut self, round: u64) -> Vec<Contribution> {
        self.current = round;
        self.own_ready_at = None;
        self.quorum_at = None;
        let kept = self.pending.split_off(&round);
        let dropped = std::mem::replace(&mut self.pending, kept);
        self.arrivals.retain(|r, _| *r >= round);
        self.joined_at = round;
        dropped.into_values().flat_map(BTreeMap::into_values).collect()
    }

    /// A member left: until it contributes again, do not wait for it.
    pub fn forget(&mut self, author: &AuthorId) {
        self.last_seen.remove(author);
    }

    /// Closes the current round: takes its contributions and the late ones
    /// still in the window, and moves on to the next round.
    pub fn close(&mut self) -> RoundInputs {
        // A round that closed on its deadline had no quorum in time: it
        // teaches nothing (the next one waits as long).
        let round = self.current;
        let quorum_at = self.quorum_at;
        // The grace as the round used it (before the deadline learns).
        let waited_from = quorum_at.map(|q| q + self.grace(q) / 2);
        if let (Some(ready), Some(q)) = (self.own_ready_at, self.quorum_at) {
            self.wait.observe(q.saturating_sub(ready));
        }
        let arrived = |a: &AuthorId| self.arrivals.get(&round).and_then(|m| m.get(a)).copied();
        // Waited for: came in the later half of the grace, or after it,
        // where a member publishing at the grace's edge lands (honest
        // stragglers spread over the whole grace).
        let waited_for = |a: &AuthorId| match (waited_from, arrived(a)) {
            (Some(from), Some(at)) => at > from,
            _ => false,
        };
        // A member judged late whose update came after a quorum of the
        // others was in has it merged at the next close, decayed, at every
        // node alike (ours too, if we are the one judged late: our own
        // update counts as in only once it is ready, so the quorum is taken
        // from the arrivals themselves). Merged wherever it happened to be
        // in, it split the mesh.
        let mut timely: Vec<Millis> = self
            .arrivals
            .get(&round)
            .into_iter()
            .flatten()
            .filter(|(a, _)| !self.no_wait.contains(*a))
            .map(|(_, at)| *at)
            .collect();
        timely.sort_unstable();
        let quorum_time = timely
            .get(self.quorum_need.min(timely.len()).saturating_sub(1))
            .copied();
        let deferred = |a: &AuthorId| {
            self.no_wait.contains(a)
                && match (quorum_time, arrived(a)) {
                    (Some(q), Some(at)) => at > q,
                    _ => true,
                }
        };
        let mut keep: BTreeMap<AuthorId, Contribution> = BTreeMap::new();
        let mut waited: BTreeSet<RecordHash> = BTreeSet::new();
        if let Some(slot) = self.pending.get_mut(&round) {
            let authors: Vec<AuthorId> = slot.keys().copied().collect();
            for a in authors {
                if deferred(&a) {
                    if let Some(c) = slot.remove(&a) {
                        keep.insert(a, c);
                    }
                } else if waited_for(&a) {
                    waited.extend(slot.get(&a).map(|c| c.record_hash));
                }
            }
        }
        self.quorum_at = None;
        let mut inputs = Vec::new();
        let rounds: Vec<u64> = self.pending.range(..=round).map(|(r, _)| *r).collect();
        for r in rounds {
            let Some(slot) = self.pending.remove(&r) else {
                continue;
            };
            let lag = round - r;
            if lag > self.staleness {
                for c in slot.into_values() {
                    self.rejections.push(c.rejected(RejectReason::Stale));
                }
                continue;
            }
            let weight = self.decay.powi(lag as i32);
            inputs.extend(slot.into_values().map(|c| (c, weight)));
        }
        // Oldest round first, then by author: every node orders alike.
        inputs.sort_by(|(a, _), (b, _)| a.round.cmp(&b.round).then(a.author.cmp(&b.author)));
        self.announced.retain(|r, _| *r > round);
        self.arrivals.retain(|r, _| *r > round);
        if !keep.is_empty() {
            self.pending.insert(round, keep);
        }
        self.current += 1;
        self.own_ready_at = None;
        RoundInputs {
            round,
            inputs,
            rejections: std::mem::take(&mut self.rejections),
            waited,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(author: u8, round: u64) -> Contribution {
        Contribution {
            author: AuthorId([author; 32]),
            seq: Seq(round),
            record_hash: RecordHash([author; 32]),
            round,
            n_samples: 64,
            base: meshtrain_ledger::WeightsHash([0; 32]),
            delta: Arc::new(vec![author as f32]),
        }
    }

    fn book() -> RoundBook {
        RoundBook::new(0, 1, 0.5, AdaptiveWait::new(1000, 10_000))
    }

    /// A book past its first round (where the quorum rule does not apply).
    fn book_at_1() -> RoundBook {
        let mut b = book();
        b.own_ready(0);
        b.close();
        b
    }

    #[test]
    fn closes_when_all_expected_are_in() {
        let mut b = book();
        let t0 = 1_000;
        let expected: HashSet<_> = [AuthorId([2; 32]), AuthorId([3; 32])].into();
        b.offer(c(1, 0), 0);
        b.own_ready(t0);
        b.offer(c(2, 0), 0);
        assert_eq!(b.should_close(t0, &expected), None);
        b.offer(c(3, 0), 0);
        assert_eq!(b.should_close(t0, &expected), Some(Close::AllIn));
        let inputs = b.close();
        assert_eq!(inputs.inputs.len(), 3);
        assert_eq!(b.current(), 1);
    }

    /// A close names the updates of its round that came in the later half
    /// of the grace or after it (not late ones of the round before, nor
    /// stragglers early in the grace).
    #[test]
    fn a_close_names_what_it_waited_for() {
        for (at, waited) in [(1_250, false), (1_350, true)] {
            let mut b = book_at_1();
            let expected: HashSet<_> = (2..=4).map(|a| AuthorId([a; 32])).collect();
            b.offer(c(5, 0), 0); // a round late: merged, not waited for
            b.own_ready(1_000);
            b.offer(c(2, 1), 1_100);
            b.offer(c(3, 1), 1_200);
            // 3 of 4: the quorum; its grace is twice 1100 -> 1200, and
            // its later half starts at 1300.
            b.note_arrivals(1_200, &expected);
            b.offer(c(4, 1), at);
            b.note_arrivals(at, &expected);
            assert_eq!(b.should_close(at, &expected), Some(Close::AllIn));
            let inputs = b.close();
            assert_eq!(inputs.inputs.len(), 4);
            let expect: BTreeSet<RecordHash> = if waited {
                [RecordHash([4; 32])].into()
            } else {
                BTreeSet::new()
            };
            assert_eq!(inputs.waited, expect, "arrived at {at}");
        }
    }

    /// A member judged habitually late holds no round: not while its record
    /// is in and its payload on the way either.
    #[test]
    fn no_round_waits_for_a_member_judged_late() {
        let mut b = book_at_1();
        let late = AuthorId([4; 32]);
        let all: HashSet<_> = (2..=4).map(|a| AuthorId([a; 32])).collect();
        let timely: HashSet<_> = all.iter().copied().filter(|a| *a != late).collect();
        b.offer(c(1, 1), 1_000); // ours
        b.own_ready(1_000);
        b.announce(1, late, 1_000);
        b.offer(c(2, 1), 1_100);
        b.offer(c(3, 1), 1_200);
        b.note_arrivals(1_200, &all);
        assert_eq!(
            b.should_close(1_200, &timely),
            None,
            "its announced payload holds the round"
        );
        b.wait_not_for([late].into());
        assert_eq!(b.should_close(1_200, &timely), Some(Close::AllIn));
        // Its update, in after the quorum, waits for the next close (at
        // every node alike), decayed; one in before the quorum is merged.
        b.offer(c(4, 1), 1_250);
        let inputs = b.close();
        assert_eq!(inputs.inputs.len(), 3);
        b.offer(c(2, 2), 1_900);
        b.offer(c(4, 2), 1_960);
        b.offer(c(3, 2), 1_970);
        b.offer(c(1, 2), 2_000);
        b.own_ready(2_000);
        b.note_arrivals(2_000, &all);
        let inputs = b.close();
        let got: Vec<(u8, u64, f32)> = inputs
            .inputs
            .iter()
            .map(|(c, w)| (c.author.0[0], c.round, *w))
            .collect();
        assert_eq!(
            got,
            vec![(4, 1, 0.5), (1, 2, 1.0), (2, 2, 1.0), (3, 2, 1.0), (4, 2, 1.0)]
        );
    }

    /// A node judged late itself leaves its own update, ready after a
    /// quorum of the others was in, for the next close, as they all do.
    #[test]
    fn a_node_judged_late_defers_its_own_slow_update() {
        let mut b = book_at_1();
        let all: HashSet<_> = (2..=4).map(|a| AuthorId([a; 32])).collect();
        b.wait_not_for([AuthorId([1; 32])].into());
        for a in 2..=4 {
            b.offer(c(a, 1), 1_000 + 10 * a as Millis);
        }
        b.offer(c(1, 1), 1_500);
        b.own_ready(1_500);
        b.note_arrivals(1_500, &all);
        assert_eq!(b.should_close(1_500, &all), Some(Close::AllIn));
        let inputs = b.close();
        let got: Vec<u8> = inputs.inputs.iter().map(|(c, _)| c.author.0[0]).collect();
        assert_eq!(got, vec![2, 3, 4]);
    }

    #[test]
    fn never_closes_before_own_update_and_times_out_without_stragglers() {
        let mut b = book();
        let t0 = 1_000;
        let expected: HashSet<_> = [AuthorId([2; 32])].into();
        assert_eq!(b.should_close(t0 + 99_000, &HashSet::new()), None);
        b.own_ready(t0);
        assert_eq!(b.should_close(t0 + 5_000, &expected), None);
        assert_eq!(b.should_close(t0 + 10_000, &expected), Some(Close::Deadline));
    }

    #[test]
    fn late_updates_are_decayed_then_stale() {
        let mut b = book();
        let t = 1_000;
        b.own_ready(t);
        b.close(); // round 0 closes without author 2
        assert_eq!(b.offer(c(2, 0), 0), Offer::Kept); // one round late: kept
        b.offer(c(1, 1), 0);
        b.own_ready(t);
        let inputs = b.close();
        let weights: Vec<f32> = inputs.inputs.iter().map(|(_, w)| *w).collect();
        assert_eq!(weights, vec![0.5, 1.0]);
        assert_eq!(b.offer(c(3, 0), 0), Offer::Stale); // two rounds late
        b.own_ready(t);
        let inputs = b.close();
        assert_eq!(inputs.rejections.len(), 1);
    }

    #[test]
    fn an_announced_payload_holds_the_round_until_it_arrives() {
        let mut b = book();
        let t = 1_000;
        b.own_ready(t);
        b.announce(0, AuthorId([5; 32]), t);
        assert_eq!(b.should_close(t, &HashSet::new()), None);
        b.offer(c(5, 0), 0);
        assert_eq!(b.should_close(t, &HashSet::new()), Some(Close::AllIn));
        b.announce(0, AuthorId([6; 32]), t);
        b.unannounce(0, &AuthorId([6; 32]));
        assert_eq!(b.should_close(t, &HashSet::new()), Some(Close::AllIn));
    }

    #[test]
    fn duplicates_and_future_rounds() {
        let mut b = book();
        assert_eq!(b.offer(c(2, 0), 0), Offer::Kept);
        assert_eq!(b.offer(c(2, 0), 0), Offer::Duplicate);
        b.offer(c(2, 3), 0);
        b.own_ready(1_000);
        let inputs = b.close();
        assert_eq!(inputs.inputs.len(), 1);
        assert!(b.has(3, &AuthorId([2; 32])));
    }

    #[test]
    fn expected_forgets_silent_peers() {
        let mut b = book();
        let connected: HashSet<_> = [AuthorId([2; 32]), AuthorId([3; 32])].into();
        assert_eq!(b.expected(&connected).len(), 2);
        for r in 0..4 {
            b.offer(c(2, r), 0);
            b.own_ready(1_000);
            b.close();
        }
        let e = b.expected(&connected);
        assert!(e.contains(&AuthorId([2; 32])) && !e.contains(&AuthorId([3; 32])));
    }

    /// A round whose quorum was in early but that closed late (it waited
    /// for votes, say in a partition) teaches the deadline the early time:
    /// otherwise every such round would lengthen the next one's wait,
    /// which lengthens the vote wait in turn.
    #[test]
    fn the_wait_learns_when_a_quorum_was_in_not_when_the_round_closed() {
        let mut b = book();
        let expected: HashSet<_> = [AuthorId([2; 32])].into();
        for r in 0..10 {
            let t = r * 100_000;
            b.own_ready(t);
            b.offer(c(2, r), t + 100);
            b.note_arrivals(t + 100, &expected);
            b.note_arrivals(t + 5_000, &expected);
            b.close();
        }
        assert!(b.wait.timeout() < 2_000, "learnt {} ms", b.wait.timeout());
    }

    fn authors(range: std::ops::Range<u8>) -> HashSet<AuthorId> {
        range.map(|a| AuthorId([a; 32])).collect()
    }

    /// The first round a node takes part in gives stragglers a longer
    /// grace (they may still be fetching their shards): twice the quorum's
    /// whole spread, not only its later half, but never the whole deadline
    /// (one that never comes does not hold the round that long).
    #[test]
    fn the_first_round_gives_stragglers_a_longer_grace_not_the_deadline() {
        let mut b = book();
        let expected = authors(2..6);
        b.offer(c(2, 0), 0);
        b.offer(c(3, 0), 1000);
        b.offer(c(4, 0), 1200);
        b.own_ready(1200);
        b.note_arrivals(1200, &expected);
        // The later half (1000 to 1200 ms) would give 400 ms.
        assert_eq!(b.deadline(), Some(1200 + 2 * 1200));
        assert_eq!(b.should_close(3599, &expected), None);
        assert_eq!(b.should_close(3600, &expected), Some(Close::Quorum));
        // The rounds after it are back to the short grace.
        b.close();
        b.offer(c(2, 1), 20_000);
        b.offer(c(3, 1), 20_000);
        b.offer(c(4, 1), 20_000);
        b.own_ready(20_000);
        b.note_arrivals(20_000, &expected);
        assert_eq!(b.deadline(), Some(20_000 + GRACE_MIN_MS));
        // A first round whose quorum took long waits at most the cap.
        let mut b = book();
        b.offer(c(2, 0), 0);
        b.offer(c(3, 0), 9000);
        b.offer(c(4, 0), 9000);
        b.own_ready(9000);
        b.note_arrivals(9000, &expected);
        assert_eq!(b.deadline(), Some(9000 + FIRST_ROUND_GRACE_MS));
    }

    /// A member still missing from the first round that is still fetching
    /// its shard gets the whole first-round grace.
    #[test]
    fn the_first_round_waits_its_whole_grace_for_a_member_still_fetching() {
        let mut b = book();
        let expected = authors(2..6);
        b.offer(c(2, 0), 0);
        b.offer(c(3, 0), 100);
        b.offer(c(4, 0), 200);
        b.own_ready(200);
        b.members_fetching(true);
        b.note_arrivals(200, &expected);
        assert_eq!(b.deadline(), Some(200 + FIRST_ROUND_GRACE_MS));
        b.members_fetching(false);
        assert_eq!(b.deadline(), Some(200 + FIRST_ROUND_GRACE_MIN_MS));
    }

    #[test]
    fn quorum_sizes() {
        assert_eq!([1, 2, 3, 4, 8, 9, 10].map(quorum), [1, 2, 2, 3, 6, 6, 7]);
    }

    /// Eight members, two of them late every round: once the six others
    /// are in, the round waits a share of their spread, not the deadline
    /// the late ones aim at; and the late ones teach the deadline nothing.
    #[test]
    fn a_late_minority_gets_a_grace_not_the_deadline() {
        let mut b = RoundBook::new(0, 1, 0.5, AdaptiveWait::new(1000, 30_000));
        b.own_ready(0);
        b.close();
        let expected = authors(2..9); // seven others; 7 and 8 are late
        for r in 1..20u64 {
            let t0 = r * 100_000;
            for (i, a) in (2..7u8).enumerate() {
                let at = t0 + 200 * i as u64; // honest arrivals: 0 to 800 ms
                b.offer(c(a, r), at);
                b.note_arrivals(at, &expected);
            }
            b.own_ready(t0 + 800);
            b.note_arrivals(t0 + 800, &expected);
            let deadline = b.deadline().unwrap();
            // The quorum was in at 800 ms, its median arrival at 400 ms:
            // a grace of twice the 400 ms between.
            assert_eq!(deadline, t0 + 1_600, "round {r}");
            assert_eq!(b.should_close(deadline - 1, &expected), None);
            assert_eq!(b.should_close(deadline, &expected), Some(Close::Quorum));
            b.close();
        }
        // The wait learnt from the quorum (in when ours was), not from
        // the late ones: the deadline before a quorum stays short.
        assert!(b.wait.timeout() <= 1_500, "learnt {} ms", b.wait.timeout());
    }

    /// Two members publishing at the start of the round (they do not
    /// train) cannot widen the grace: it is sized from the quorum's median
    /// arrival, an honest one.
    #[test]
    fn an_early_minority_cannot_widen_the_grace() {
        let mut b = book_at_1();
        let expected = authors(2..9);
        b.offer(c(7, 1), 0);
        b.offer(c(8, 1), 0);
        for (i, a) in (2..6u8).enumerate() {
            b.offer(c(a, 1), 5_000 + 100 * i as u64);
        }
        b.own_ready(5_300);
        b.note_arrivals(5_300, &expected);
        // Arrivals 0, 0, 5000, 5100, 5200, 5300: median 5000 (not 0).
        assert_eq!(b.deadline(), Some(5_300 + 600));
    }

    /// A record in with the quorum but without its payload doubles the
    /// grace (the payload is on its way from another peer), within the
    /// deadline; a record that came after the quorum does not.
    #[test]
    fn an_announced_payload_gets_one_grace_more() {
        let mut b = book_at_1();
        let expected = authors(2..5);
        b.offer(c(2, 1), 1_000);
        b.offer(c(3, 1), 1_200);
        b.own_ready(1_200);
        b.note_arrivals(1_200, &expected);
        // Arrivals 1000, 1200: median 1000, grace 400.
        assert_eq!(b.deadline(), Some(1_600));
        b.announce(1, AuthorId([4; 32]), 1_100);
        assert_eq!(b.deadline(), Some(2_000));
        b.unannounce(1, &AuthorId([4; 32]));
        assert_eq!(b.deadline(), Some(1_600));
        // A record that came after the quorum gets no grace more.
        b.announce(1, AuthorId([4; 32]), 1_300);
        assert_eq!(b.deadline(), Some(1_600));
    }

    /// Without a quorum the round waits for the whole deadline.
    #[test]
    fn without_a_quorum_the_deadline_holds() {
        let mut b = book();
        let expected = authors(2..9);
        b.offer(c(2, 0), 0);
        b.own_ready(0);
        b.note_arrivals(0, &expected);
        assert_eq!(b.deadline(), Some(10_000));
        assert_eq!(b.should_close(9_999, &expected), None);
        assert_eq!(b.should_close(10_000, &expected), Some(Close::Deadline));
    }

    /// The grace is at least `GRACE_MIN_MS`, and never past the deadline.
    #[test]
    fn the_grace_has_a_floor_and_a_ceiling() {
        let mut b = book_at_1();
        let expected = authors(2..4);
        b.own_ready(1_000);
        b.offer(c(2, 1), 1_000);
        b.note_arrivals(1_000, &expected);
        assert_eq!(b.deadline(), Some(1_000 + GRACE_MIN_MS));
        let mut b = book_at_1();
        b.offer(c(2, 1), 0);
        b.own_ready(50_000);
        b.note_arrivals(50_000, &expected);
        assert_eq!(b.deadline(), Some(60_000));
    }

    #[test]
    fn adaptive_wait_follows_observations() {
        let mut w = AdaptiveWait::new(500, 30_000);
        assert_eq!(w.timeout(), 30_000);
        for _ in 0..10 {
            w.observe(100);
        }
        assert!(w.timeout() < 2_000);
        assert!(w.timeout() >= 500);
    }

    #[test]
    fn restarting_ahead_hands_back_the_updates_of_the_rounds_skipped() {
        let mut b = book();
        assert_eq!(b.offer(c(1, 0), 0), Offer::Kept);
        assert_eq!(b.offer(c(2, 1), 0), Offer::Kept);
        assert_eq!(b.offer(c(3, 2), 0), Offer::Kept);
        let skipped = b.restart_at(2);
        let mut got: Vec<(u8, u64)> = skipped.iter().map(|c| (c.author.0[0], c.round)).collect();
        got.sort();
        assert_eq!(got, vec![(1, 0), (2, 1)]);
        assert!(b.has(2, &AuthorId([3; 32])), "the round restarted at keeps its own");
        assert!(b.restart_at(2).is_empty());
    }
}
