//! The loss-scoring stage (optional, `exchange.score` in the run spec):
//! before the aggregator, every candidate update of a round is scored by
//! what it does to the loss on a fixed sample of the held-out split: the
//! loss of the anchor moved by the mean of all the round's updates, against
//! the mean of all but that one (leave one out, at the step the mesh
//! really takes: one node's whole update applied alone overshoots, and
//! honest ones then raise the loss too, each by its own amount). One whose
//! presence raises the loss past the round's robust limit is refused, with
//! the figures in its verdict, so an audit shows why.
//!
//! The sample is the same on every node (drawn evenly from the held-out
//! split every node holds), so honest nodes score a round's candidates
//! alike and keep agreeing on one anchor; scoring on each node's own
//! (label-skewed) data would have them refuse different updates, and every
//! difference would split the mesh.

use meshtrain_ledger::RejectReason;
use meshtrain_model::aggregate::median_of;
use tracing::{info, warn};

use super::close::AggregateJob;
use super::{Core, Effect};
use crate::runspec::ScoreSpec;

/// A round's scores on the sample: the loss of the anchor moved by the mean
/// of every candidate, and by the mean of all but each one (in the job's
/// input order).
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    pub with_all: f32,
    pub without: Vec<f32>,
}

/// The sum of `deltas` (each `dim` long), in f64.
pub fn sum_of(deltas: &[std::sync::Arc<Vec<f32>>], dim: usize) -> Vec<f64> {
    let mut sum = vec![0f64; dim];
    for d in deltas {
        for (s, v) in sum.iter_mut().zip(d.iter()) {
            *s += *v as f64;
        }
    }
    sum
}

/// Writes into `out` the anchor moved by the mean of the deltas, less
/// `leave` if given (with one delta and `leave`, the anchor itself).
pub fn moved(anchor: &[f32], sum: &[f64], deltas: &[std::sync::Arc<Vec<f32>>], leave: Option<usize>, out: &mut [f32]) {
    let left = leave.and_then(|i| deltas.get(i));
    let n = deltas.len() - usize::from(left.is_some());
    let k = if n == 0 { 0.0 } else { 1.0 / n as f64 };
    for (j, (o, a)) in out.iter_mut().zip(anchor).enumerate() {
        let s = sum[j] - left.map_or(0.0, |d| d[j] as f64);
        *o = (*a as f64 + k * s) as f32;
    }
}

/// How many scaled median absolute deviations of the round's rises a
/// candidate may lie above their median.
const SPREADS: f64 = 3.0;
/// The median absolute deviation of a normal sample, in its σ.
const MAD_TO_SIGMA: f64 = 1.4826;

/// The refusal (its detail) of each candidate, or `None` to keep it. A
/// candidate's harm is how much its presence raises the loss (the loss
/// with all, less the loss without it); it is refused when the harm is
/// positive and above the round's limit: the median harm plus three robust
/// spreads, and at least the median plus `tolerance`. A candidate whose
/// score is not finite is refused outright. With a minority of attackers
/// the median and the spread are the honest updates'.
pub fn judge(scores: &Scores, tolerance: f32) -> Vec<Option<String>> {
    let all = scores.with_all as f64;
    let harms: Vec<f64> = scores.without.iter().map(|w| all - *w as f64).collect();
    let finite: Vec<f64> = harms.iter().copied().filter(|h| h.is_finite()).collect();
    let mid = median_of(&mut finite.clone());
    let spread = MAD_TO_SIGMA * median_of(&mut finite.iter().map(|h| (h - mid).abs()).collect::<Vec<f64>>());
    let limit = mid + (SPREADS * spread).max(tolerance as f64);
    harms
        .iter()
        .zip(&scores.without)
        .map(|(&harm, &without)| {
            if !harm.is_finite() {
                Some(format!("held-out loss {all} with it, {without} without it"))
            } else if harm > 0.0 && harm > limit {
                Some(format!(
                    "leaving it out lowers the held-out loss by {harm:.4} (from {all:.4}); the round's limit was {limit:.4}"
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
        // Leaving one out needs two.
        if self.cfg.spec.exchange.score.is_none() || job.inputs.inputs.len() < 2 {
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
        let tolerance = self
            .cfg
            .spec
            .exchange
            .score
            .map_or(ScoreSpec::DEFAULT_TOLERANCE, |s| s.tolerance);
        match scores {
            Ok(s) if s.without.len() == job.inputs.inputs.len() => {
                tracing::debug!(round, with_all = s.with_all, without = ?s.without, "loss scores");
                let verdicts = judge(&s, tolerance);
                let mut kept = Vec::with_capacity(verdicts.len());
                let mut refused = Vec::new();
                for ((c, w), v) in std::mem::take(&mut job.inputs.inputs).into_iter().zip(verdicts) {
                    match v {
                        None => kept.push((c, w)),
                        Some(detail) => {
                            refused.push(c.author.short());
                            job.inputs.rejections.push(c.rejected(RejectReason::LossScore(detail)));
                        }
                    }
                }
                job.inputs.inputs = kept;
                info!(round, loss = s.with_all, ?refused, "scored the round's updates");
            }
            Ok(s) => warn!(
                round,
                scores = s.without.len(),
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
    use std::sync::Arc;

    /// Loss with all `all`; without each one, `without`.
    fn scores(all: f32, without: &[f32]) -> Scores {
        Scores {
            with_all: all,
            without: without.to_vec(),
        }
    }

    #[test]
    fn an_update_whose_presence_raises_the_loss_far_past_the_others_is_refused() {
        // Leaving an honest one out raises the loss a little (it helped);
        // leaving the sign-flipped one out lowers it by 0.2.
        let s = scores(1.0, &[1.01, 1.02, 1.0, 1.01, 1.03, 1.02, 0.8, 1.01]);
        let v = judge(&s, 0.01);
        assert!(
            v[6].as_deref()
                .is_some_and(|d| d.contains("lowers the held-out loss by 0.2000")),
            "{v:?}"
        );
        assert_eq!(v.iter().filter(|x| x.is_some()).count(), 1, "{v:?}");
    }

    /// Harms alike (label-skewed shards against a balanced sample) are not
    /// refused: the limit is relative to the round, never under the
    /// tolerance, and an update that helps is never refused.
    #[test]
    fn alike_harms_and_helpers_are_kept() {
        let s = scores(1.0, &[0.99, 0.985, 0.99, 0.98, 0.995]);
        assert!(judge(&s, 0.05).iter().all(|x| x.is_none()));
        let s = scores(1.0, &[1.5, 1.1, 1.01, 1.3]);
        assert!(judge(&s, 0.0).iter().all(|x| x.is_none()));
    }

    #[test]
    fn a_non_finite_score_is_refused() {
        let s = scores(1.0, &[1.01, f32::NAN, 1.01, f32::INFINITY]);
        let v = judge(&s, 0.01);
        assert!(v[0].is_none() && v[1].is_some() && v[2].is_none() && v[3].is_some());
    }

    /// A minority cannot move the limit: two far harms of eight leave the
    /// median and spread to the honest six.
    #[test]
    fn a_minority_cannot_move_the_limit() {
        let s = scores(1.0, &[1.01, 1.0, 1.02, 1.01, 1.0, 1.01, 0.7, 0.7]);
        let v = judge(&s, 0.01);
        assert_eq!(v.iter().filter(|x| x.is_some()).count(), 2, "{v:?}");
    }

    #[test]
    fn moved_is_the_anchor_plus_the_mean_with_or_without_one() {
        let deltas = vec![
            Arc::new(vec![1.0f32, 0.0]),
            Arc::new(vec![3.0, 2.0]),
            Arc::new(vec![-1.0, 4.0]),
        ];
        let sum = sum_of(&deltas, 2);
        let anchor = [10.0f32, 10.0];
        let mut out = [0f32; 2];
        moved(&anchor, &sum, &deltas, None, &mut out);
        assert_eq!(out, [11.0, 12.0]);
        moved(&anchor, &sum, &deltas, Some(2), &mut out);
        assert_eq!(out, [12.0, 11.0]);
        let one = vec![Arc::new(vec![5.0f32, 5.0])];
        moved(&anchor, &sum_of(&one, 2), &one, Some(0), &mut out);
        assert_eq!(out, anchor);
    }
}
