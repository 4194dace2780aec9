//! Per-author reputation, built from the verdicts a node records. Authors
//! whose updates keep being rejected or clipped hard are banned. An author
//! not judged for [`FORGET_AFTER`] rounds is forgotten unless it committed
//! a protocol offence (a ban is not: bans live in the ledger), so keys that
//! contribute once cannot grow it for the whole run.
//!
//! Only verdicts about authenticated records count: a bad signature or a
//! wrong run names an author the sender may have made up, so those cost the
//! sending peer (through gossipsub) and never the named author.

use std::collections::HashMap;

use meshtrain_ledger::{AuthorId, RejectReason, Verdict};

/// Rounds without a verdict after which an author's standing is dropped.
pub const FORGET_AFTER: u64 = 256;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReputationConfig {
    /// Ban when the smoothed badness exceeds this (0 = perfect, 1 = always rejected).
    pub ban_threshold: f32,
    /// Verdicts needed before a ban on badness alone.
    pub min_verdicts: u32,
    /// Weight of the newest verdict in the moving average.
    pub alpha: f32,
    /// Protocol offences (malformed payloads, replays, NaN, ...) tolerated
    /// before a ban, however good the rest.
    pub max_offences: u32,
}

impl Default for ReputationConfig {
    fn default() -> Self {
        // Slow enough that an honest member whose label-skewed updates the
        // aggregator rejects now and then is never banned: at 0.3 and 3
        // verdicts, two rejections after a merge (0.51) banned honest
        // members at Dirichlet 0.5 while attackers pulled the centre, and
        // the node that banned one no longer saw a majority. Now it takes
        // five rejections in a row, or sustained ones, after 8 verdicts.
        Self {
            ban_threshold: 0.5,
            min_verdicts: 8,
            alpha: 0.15,
            max_offences: 2,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Standing {
    /// Exponential moving average of per-verdict badness.
    pub badness: f32,
    pub verdicts: u32,
    pub offences: u32,
    /// The node's round when the latest verdict was folded in (not the
    /// round a record claims, which its author chooses).
    pub last_round: u64,
}

/// Why an author was banned.
#[derive(Clone, Debug, PartialEq)]
pub enum BanReason {
    Badness(f32),
    Offences(u32),
    Equivocation,
}

impl std::fmt::Display for BanReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BanReason::Badness(b) => write!(f, "updates kept being rejected (badness {b:.2})"),
            BanReason::Offences(n) => write!(f, "{n} protocol offences"),
            BanReason::Equivocation => f.write_str("equivocation"),
        }
    }
}

/// How bad one verdict is, in [0, 1]; None if it says nothing about the
/// author (unauthenticated, or not the author's fault).
fn badness(verdict: &Verdict) -> Option<f32> {
    match verdict {
        Verdict::Merged { .. } => Some(0.0),
        Verdict::Clipped { factor, .. } | Verdict::Probation { factor } => Some((1.0 - factor).clamp(0.0, 1.0)),
        Verdict::Rejected { reason } => match reason {
            RejectReason::Malformed | RejectReason::BadSignature | RejectReason::WrongRun => None,
            RejectReason::Stale | RejectReason::PayloadUnavailable | RejectReason::Banned => None,
            RejectReason::OffBase | RejectReason::RoundAbandoned => None,
            // A filter on a sample, not proof: an honest update refused by
            // chance now and then must not add up to a ban.
            RejectReason::LossScore(_) => None,
            _ => Some(1.0),
        },
    }
}

#[derive(Debug, Default)]
pub struct Reputation {
    cfg: ReputationConfig,
    standing: HashMap<AuthorId, Standing>,
}

impl Reputation {
    pub fn new(cfg: ReputationConfig) -> Self {
        Self {
            cfg,
            standing: HashMap::new(),
        }
    }

    pub fn standing(&self, author: &AuthorId) -> Standing {
        self.standing.get(author).copied().unwrap_or_default()
    }

    /// Folds one verdict in; returns a ban reason when the author crossed a
    /// line with it.
    pub fn observe(&mut self, author: AuthorId, round: u64, verdict: &Verdict) -> Option<BanReason> {
        if let Verdict::Rejected {
            reason: RejectReason::Equivocation,
        } = verdict
        {
            return Some(BanReason::Equivocation);
        }
        let b = badness(verdict)?;

        let cfg = self.cfg;
        let s = self.standing.entry(author).or_default();
        s.badness = if s.verdicts == 0 {
            b
        } else {
            cfg.alpha * b + (1.0 - cfg.alpha) * s.badness
        };
        s.verdicts = s.verdicts.saturating_add(1);
        s.last_round = s.last_round.max(round);
        if let Verdict::Rejected { reason } = verdict {
            if reason.is_protocol_offence() {
                s.offences += 1;
                if s.offences >= cfg.max_offences {
                    return Some(BanReason::Offences(s.offences));
                }
            }
        }
        (s.verdicts >= cfg.min_verdicts && s.badness > cfg.ban_threshold).then_some(BanReason::Badness(s.badness))
    }

    /// Drops the standing of authors not judged since [`FORGET_AFTER`]
    /// rounds before `round`.
    pub fn forget_idle(&mut self, round: u64) {
        let floor = round.saturating_sub(FORGET_AFTER);
        // Offences are kept: one offence every FORGET_AFTER rounds must
        // still add up to a ban.
        self.standing.retain(|_, s| s.last_round >= floor || s.offences > 0);
    }

    /// Authors whose standing is held.
    pub fn len(&self) -> usize {
        self.standing.len()
    }

    pub fn is_empty(&self) -> bool {
        self.standing.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: AuthorId = AuthorId([1; 32]);

    fn rejected(reason: RejectReason) -> Verdict {
        Verdict::Rejected { reason }
    }

    #[test]
    fn honest_authors_with_mild_clipping_are_never_banned() {
        let mut r = Reputation::new(ReputationConfig::default());
        for i in 0..200 {
            let v = if i % 3 == 0 {
                Verdict::Clipped {
                    factor: 0.7,
                    weight: 0.1,
                }
            } else {
                Verdict::Merged { weight: 0.1 }
            };
            assert_eq!(r.observe(A, 0, &v), None, "verdict {i}");
        }
    }

    #[test]
    fn repeated_outliers_are_banned_after_min_verdicts() {
        let mut r = Reputation::new(ReputationConfig::default());
        let v = rejected(RejectReason::Outlier("far".into()));
        for i in 0..7 {
            assert_eq!(r.observe(A, 0, &v), None, "verdict {i}");
        }
        assert!(matches!(r.observe(A, 0, &v), Some(BanReason::Badness(_))));
    }

    /// An honest member of a label-skewed mesh, rejected in a third of its
    /// rounds (two in a row now and then), is never banned; one rejected
    /// five times in a row after a good start is.
    #[test]
    fn sporadic_rejections_never_ban_but_a_run_of_them_does() {
        let mut r = Reputation::new(ReputationConfig::default());
        let bad = rejected(RejectReason::Outlier("points against".into()));
        let good = Verdict::Merged { weight: 0.1 };
        for i in 0..300 {
            let v = if i % 6 >= 4 { &bad } else { &good };
            assert_eq!(r.observe(A, i, v), None, "verdict {i}");
        }
        let b = AuthorId([2; 32]);
        for i in 0..8 {
            assert_eq!(r.observe(b, i, &good), None);
        }
        let bans: Vec<_> = (0..5).map(|i| r.observe(b, 8 + i, &bad)).collect();
        assert!(bans[..4].iter().all(|x| x.is_none()) && bans[4].is_some(), "{bans:?}");
    }

    /// Loss scoring's refusals are a filter on a sample: however many, no
    /// ban (an honest update refused now and then must not add up to one).
    #[test]
    fn loss_score_refusals_never_ban() {
        let mut r = Reputation::new(ReputationConfig::default());
        let v = rejected(RejectReason::LossScore("far".into()));
        for _ in 0..20 {
            assert_eq!(r.observe(A, 0, &v), None);
        }
        assert_eq!(r.standing(&A).verdicts, 0);
    }

    #[test]
    fn hard_clipping_counts_like_rejection() {
        let mut r = Reputation::new(ReputationConfig::default());
        let v = Verdict::Clipped {
            factor: 0.2,
            weight: 0.1,
        };
        let bans: Vec<_> = (0..8).map(|_| r.observe(A, 0, &v)).collect();
        assert!(bans[..7].iter().all(|b| b.is_none()) && bans[7].is_some(), "{bans:?}");
    }

    #[test]
    fn offences_ban_quickly_and_equivocation_at_once() {
        let mut r = Reputation::new(ReputationConfig::default());
        assert_eq!(r.observe(A, 0, &rejected(RejectReason::NonFinite)), None);
        assert_eq!(
            r.observe(A, 0, &rejected(RejectReason::Replay)),
            Some(BanReason::Offences(2))
        );
        let b = AuthorId([2; 32]);
        assert_eq!(
            r.observe(b, 0, &rejected(RejectReason::Equivocation)),
            Some(BanReason::Equivocation)
        );
    }

    #[test]
    fn unauthenticated_claims_cost_nothing() {
        let mut r = Reputation::new(ReputationConfig::default());
        for _ in 0..50 {
            assert_eq!(r.observe(A, 0, &rejected(RejectReason::BadSignature)), None);
        }
        assert_eq!(r.standing(&A).verdicts, 0);
    }

    #[test]
    fn authors_idle_for_long_are_forgotten_and_active_ones_kept() {
        let mut r = Reputation::new(ReputationConfig::default());
        let b = AuthorId([2; 32]);
        let bad = rejected(RejectReason::Outlier("far".into()));
        assert_eq!(r.observe(A, 3, &bad), None);
        assert_eq!(r.observe(b, 3, &Verdict::Merged { weight: 0.5 }), None);
        assert_eq!(r.observe(b, 200, &Verdict::Merged { weight: 0.5 }), None);
        r.forget_idle(3 + FORGET_AFTER);
        assert_eq!(r.len(), 2, "nobody idle for longer than FORGET_AFTER yet");
        r.forget_idle(4 + FORGET_AFTER);
        assert_eq!(r.standing(&A), Standing::default(), "A forgotten");
        assert_eq!(r.standing(&b).verdicts, 2, "b was judged at round 200");
        r.forget_idle(201 + FORGET_AFTER);
        assert!(r.is_empty());
        // An offence is remembered however long ago: the second one bans.
        assert_eq!(r.observe(A, 1, &rejected(RejectReason::NonFinite)), None);
        r.forget_idle(10 * FORGET_AFTER);
        assert_eq!(
            r.observe(A, 10 * FORGET_AFTER, &rejected(RejectReason::NonFinite)),
            Some(BanReason::Offences(2))
        );
    }
}
