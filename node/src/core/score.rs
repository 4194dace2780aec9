//! The loss-scoring stage (optional, `exchange.score` in the run spec):
//! before the aggregator, every candidate update of a round is applied
//! alone to the anchor and scored by the loss on a fixed sample of the
//! held-out split. One that raises the loss past the round's robust limit
//! is refused, with both figures in its verdict, so an audit shows why.
//!
//! The sample is the same on every node (drawn evenly from the held-out
//! split every node holds), so honest nodes score a round's candidates
//! alike and keep agreeing on one anchor; scoring on each node's own
//! (label-skewed) data would have them refuse different updates, and every
//! difference would split the mesh.

use meshtrain_ledger::{RejectReason, Verdict, VerdictEntry};
use tracing::{info, warn};

use super::close::AggregateJob;
use super::{Core, Effect};
use crate::runspec::ScoreSpec;

/// A round's scores: the anchor's loss on the sample, and each candidate's
/// (anchor plus that update alone), in the job's input order.
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    pub base: f32,
    pub after: Vec<f32>,
}

/// How many scaled median absolute deviations of the round's rises a
/// candidate may lie above their median.
const SPREADS: f64 = 3.0;
/// The median absolute deviation of a normal sample, in its σ.
const MAD_TO_SIGMA: f64 = 1.4826;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    match xs.len() {
        0 => 0.0,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// The refusal (its detail) of each candidate, or `None` to keep it. A
/// candidate is refused when it raises the loss (rise > 0) by more than the
/// round's limit: the median rise plus three robust spreads, and at least
/// the median plus `tolerance`. A candidate whose loss is not finite is
/// refused outright. With a minority of attackers the median and the
/// spread are the honest updates'.
pub fn judge(scores: &Scores, tolerance: f32) -> Vec<Option<String>> {
    let base = scores.base as f64;
    let rises: Vec<f64> = scores.after.iter().map(|a| *a as f64 - base).collect();
    let finite: Vec<f64> = rises.iter().copied().filter(|r| r.is_finite()).collect();
    let mid = median(finite.clone());
    let spread = MAD_TO_SIGMA * median(finite.iter().map(|r| (r - mid).abs()).collect());
    let limit = mid + (SPREADS * spread).max(tolerance as f64);
    rises
        .iter()
        .map(|&rise| {
            if !rise.is_finite() || !base.is_finite() {
                Some(format!("loss {rise} after it, from {base:.4}"))
            } else if rise > 0.0 && rise > limit {
                Some(format!(
                    "it raised the held-out loss by {rise:.4} (from {base:.4}); the round's limit was {limit:.4}"
                ))
            } else {
                None
            }
        })
        .collect()
}

impl Core {
    /// Scores the round's candidates before aggregating them, if the run
    /// scores; otherwise aggregates at once.
    pub(super) fn score_or_aggregate(&mut self, job: AggregateJob) {
        if self.cfg.spec.exchange.score.is_none() || job.inputs.inputs.is_empty() {
            self.emit(Effect::Aggregate(Box::new(job)));
            return;
        }
        let deltas = job.inputs.inputs.iter().map(|(c, _)| c.delta.clone()).collect();
        self.emit(Effect::Score {
            round: job.inputs.round,
            anchor: job.anchor.clone(),
            deltas,
        });
        self.scoring = Some(Box::new(job));
    }

    /// The trainer scored the round: refuse what the scores condemn, then
    /// aggregate the rest. Scores that did not come (the trainer failed)
    /// leave the round to the aggregator alone.
    pub(super) fn on_scored(&mut self, round: u64, scores: Result<Scores, String>) {
        let Some(mut job) = self.scoring.take() else {
            return;
        };
        if job.inputs.round != round {
            self.scoring = Some(job);
            return;
        }
        let ScoreSpec { tolerance, .. } = self.cfg.spec.exchange.score.unwrap_or(ScoreSpec {
            records: 0,
            tolerance: ScoreSpec::DEFAULT_TOLERANCE,
        });
        match scores {
            Ok(s) if s.after.len() == job.inputs.inputs.len() => {
                tracing::debug!(round, base = s.base, after = ?s.after, "loss scores");
                let verdicts = judge(&s, tolerance);
                let mut kept = Vec::with_capacity(verdicts.len());
                let mut refused = Vec::new();
                for ((c, w), v) in std::mem::take(&mut job.inputs.inputs).into_iter().zip(verdicts) {
                    match v {
                        None => kept.push((c, w)),
                        Some(detail) => {
                            refused.push(c.author.short());
                            job.inputs.rejections.push(VerdictEntry {
                                author: c.author,
                                seq: c.seq,
                                record_hash: c.record_hash,
                                round: c.round,
                                prior: 0.0,
                                verdict: Verdict::Rejected {
                                    reason: RejectReason::LossScore(detail),
                                },
                            });
                        }
                    }
                }
                job.inputs.inputs = kept;
                info!(round, base_loss = s.base, ?refused, "scored the round's updates");
            }
            Ok(s) => warn!(
                round,
                scores = s.after.len(),
                inputs = job.inputs.inputs.len(),
                "scores do not match the round's updates; aggregating without them"
            ),
            Err(e) => warn!(round, error = %e, "scoring failed; aggregating without scores"),
        }
        self.emit(Effect::Aggregate(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(base: f32, after: &[f32]) -> Scores {
        Scores {
            base,
            after: after.to_vec(),
        }
    }

    #[test]
    fn an_update_that_raises_the_loss_far_past_the_others_is_refused() {
        // Six honest updates lower the loss by 0.10 to 0.15; a sign-flipped
        // one raises it by 0.5.
        let s = scores(1.0, &[0.9, 0.88, 0.85, 0.87, 0.9, 0.86, 1.5, 0.89]);
        let v = judge(&s, 0.05);
        assert!(
            v[6].as_deref()
                .is_some_and(|d| d.contains("raised the held-out loss by 0.5000")),
            "{v:?}"
        );
        assert_eq!(v.iter().filter(|x| x.is_some()).count(), 1, "{v:?}");
    }

    /// Honest updates that all raise the loss a little (label-skewed
    /// shards against a balanced sample) are not refused: the limit is
    /// relative to the round, and never under the tolerance.
    #[test]
    fn alike_rises_and_falls_are_kept() {
        let s = scores(1.0, &[1.02, 1.03, 1.01, 1.04, 1.02, 1.03]);
        assert!(judge(&s, 0.05).iter().all(|x| x.is_none()));
        let s = scores(1.0, &[0.5, 0.9, 0.99, 0.7]);
        assert!(judge(&s, 0.0).iter().all(|x| x.is_none()));
    }

    #[test]
    fn a_non_finite_loss_is_refused() {
        let s = scores(1.0, &[0.9, f32::NAN, 0.9, f32::INFINITY]);
        let v = judge(&s, 0.05);
        assert!(v[0].is_none() && v[1].is_some() && v[2].is_none() && v[3].is_some());
    }

    /// A minority cannot widen the limit: two of eight far rises leave the
    /// median and spread to the honest six.
    #[test]
    fn a_minority_cannot_move_the_limit() {
        let s = scores(1.0, &[0.9, 0.91, 0.89, 0.9, 0.92, 0.88, 3.0, 3.0]);
        let v = judge(&s, 0.05);
        assert_eq!(v.iter().filter(|x| x.is_some()).count(), 2, "{v:?}");
    }
}
