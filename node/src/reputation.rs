//! Per-author reputation, built from the verdicts a node records. Authors
//! whose updates keep being rejected or clipped hard are banned.
//!
//! Only verdicts about authenticated records count: a bad signature or a
//! wrong run names an author the sender may have made up, so those cost the
//! sending peer (through gossipsub) and never the named author.

use std::collections::HashMap;

use meshtrain_ledger::{AuthorId, RejectReason, Verdict};

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
        Self {
            ban_threshold: 0.5,
            min_verdicts: 3,
            alpha: 0.3,
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
    pub fn observe(&mut self, author: AuthorId, verdict: &Verdict) -> Option<BanReason> {
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
        s.verdicts += 1;
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
            assert_eq!(r.observe(A, &v), None, "verdict {i}");
        }
    }

    #[test]
    fn repeated_outliers_are_banned_after_min_verdicts() {
        let mut r = Reputation::new(ReputationConfig::default());
        let v = rejected(RejectReason::Outlier("far".into()));
        assert_eq!(r.observe(A, &v), None);
        assert_eq!(r.observe(A, &v), None);
        assert!(matches!(r.observe(A, &v), Some(BanReason::Badness(_))));
    }

    #[test]
    fn hard_clipping_counts_like_rejection() {
        let mut r = Reputation::new(ReputationConfig::default());
        let v = Verdict::Clipped {
            factor: 0.2,
            weight: 0.1,
        };
        let bans: Vec<_> = (0..3).map(|_| r.observe(A, &v)).collect();
        assert!(bans[2].is_some(), "{bans:?}");
    }

    #[test]
    fn offences_ban_quickly_and_equivocation_at_once() {
        let mut r = Reputation::new(ReputationConfig::default());
        assert_eq!(r.observe(A, &rejected(RejectReason::NonFinite)), None);
        assert_eq!(
            r.observe(A, &rejected(RejectReason::Replay)),
            Some(BanReason::Offences(2))
        );
        let b = AuthorId([2; 32]);
        assert_eq!(
            r.observe(b, &rejected(RejectReason::Equivocation)),
            Some(BanReason::Equivocation)
        );
    }

    #[test]
    fn unauthenticated_claims_cost_nothing() {
        let mut r = Reputation::new(ReputationConfig::default());
        for _ in 0..50 {
            assert_eq!(r.observe(A, &rejected(RejectReason::BadSignature)), None);
        }
        assert_eq!(r.standing(&A).verdicts, 0);
    }
}
