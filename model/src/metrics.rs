//! Evaluation metrics as pure functions over predictions and scores, so
//! they are tested without tensors: the confusion matrix with per-class
//! precision, recall and F1, ROC-AUC, and the early-stopping rule.

use serde::{Deserialize, Serialize};

/// Counts of (true class, predicted class) pairs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    /// `matrix[truth][predicted]`.
    pub matrix: Vec<Vec<u64>>,
}

/// One class's scores; NaN-free (an empty denominator scores 0).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassScore {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Records whose true class this is.
    pub support: u64,
}

impl Confusion {
    pub fn new(classes: usize) -> Self {
        Self {
            matrix: vec![vec![0; classes]; classes],
        }
    }

    /// Counts one prediction; pairs outside the matrix are ignored.
    pub fn add(&mut self, truth: usize, predicted: usize) {
        if let Some(c) = self.matrix.get_mut(truth).and_then(|row| row.get_mut(predicted)) {
            *c += 1;
        }
    }

    pub fn total(&self) -> u64 {
        self.matrix.iter().flatten().sum()
    }

    pub fn accuracy(&self) -> f64 {
        let right: u64 = (0..self.matrix.len()).map(|i| self.matrix[i][i]).sum();
        ratio(right, self.total())
    }

    pub fn per_class(&self) -> Vec<ClassScore> {
        let k = self.matrix.len();
        (0..k)
            .map(|c| {
                let tp = self.matrix[c][c];
                let support: u64 = self.matrix[c].iter().sum();
                let predicted: u64 = (0..k).map(|t| self.matrix[t][c]).sum();
                let precision = ratio(tp, predicted);
                let recall = ratio(tp, support);
                let f1 = if precision + recall > 0.0 {
                    2.0 * precision * recall / (precision + recall)
                } else {
                    0.0
                };
                ClassScore {
                    precision,
                    recall,
                    f1,
                    support,
                }
            })
            .collect()
    }

    /// Unweighted mean F1 over classes that occur.
    pub fn macro_f1(&self) -> f64 {
        let scores: Vec<_> = self.per_class().into_iter().filter(|s| s.support > 0).collect();
        scores.iter().map(|s| s.f1).sum::<f64>() / scores.len().max(1) as f64
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Area under the ROC curve of `scores` (higher means more likely
/// positive), by the rank-sum (Mann-Whitney) identity with ties counted
/// half. None when either class is absent.
pub fn roc_auc(scores: &[f32], positive: &[bool]) -> Option<f64> {
    let n = scores.len().min(positive.len());
    let pos = positive[..n].iter().filter(|&&p| p).count();
    let neg = n - pos;
    if pos == 0 || neg == 0 || scores[..n].iter().any(|s| s.is_nan()) {
        return None;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average 1-based ranks over runs of equal scores.
    let mut rank_sum_pos = 0f64;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += mean_rank * order[i..=j].iter().filter(|&&k| positive[k]).count() as f64;
        i = j + 1;
    }
    let u = rank_sum_pos - (pos * (pos + 1)) as f64 / 2.0;
    Some(u / (pos as f64 * neg as f64))
}

/// The `q` quantile (0..=1) of `values`, by the nearest rank.
pub fn quantile(values: &[f32], q: f64) -> Option<f32> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f32::total_cmp);
    let idx = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[idx])
}

/// An anomaly detector's operating point at one threshold.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// Scores above it are flagged.
    pub threshold: f32,
    /// Share of anomalies flagged (recall, true-positive rate).
    pub recall: f64,
    /// Share of flagged records that are anomalies.
    pub precision: f64,
    /// Share of normal records flagged.
    pub false_positive_rate: f64,
    pub anomalies: u64,
    pub normals: u64,
}

pub fn detection(scores: &[f32], positive: &[bool], threshold: f32) -> Detection {
    let (mut tp, mut fp, mut pos, mut neg) = (0u64, 0u64, 0u64, 0u64);
    for (&s, &p) in scores.iter().zip(positive) {
        let flagged = s > threshold;
        if p {
            pos += 1;
            tp += flagged as u64;
        } else {
            neg += 1;
            fp += flagged as u64;
        }
    }
    Detection {
        threshold,
        recall: ratio(tp, pos),
        precision: ratio(tp, tp + fp),
        false_positive_rate: ratio(fp, neg),
        anomalies: pos,
        normals: neg,
    }
}

/// Early stopping on validation loss: stop once `patience` evaluations in
/// a row have not improved on the best loss seen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    pub patience: u64,
    pub best_loss: Option<f32>,
    /// The round whose weights scored `best_loss`.
    pub best_round: Option<u64>,
    /// Evaluations since the best one.
    pub stale: u64,
}

impl EarlyStopping {
    pub fn new(patience: u64) -> Self {
        Self {
            patience,
            best_loss: None,
            best_round: None,
            stale: 0,
        }
    }

    /// Records one evaluation; true when training should stop. A NaN loss
    /// never counts as an improvement.
    pub fn observe(&mut self, round: u64, loss: f32) -> bool {
        match self.best_loss {
            Some(best) if loss.partial_cmp(&best) != Some(std::cmp::Ordering::Less) => self.stale += 1,
            _ if loss.is_nan() => self.stale += 1,
            _ => {
                self.best_loss = Some(loss);
                self.best_round = Some(round);
                self.stale = 0;
            }
        }
        self.stale >= self.patience
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_class_scores_by_hand() {
        // truth 0: 3 right, 1 called 1; truth 1: 2 right, 2 called 0; class 2 never occurs.
        let mut c = Confusion::new(3);
        for (t, p) in [(0, 0), (0, 0), (0, 0), (0, 1), (1, 1), (1, 1), (1, 0), (1, 0)] {
            c.add(t, p);
        }
        c.add(7, 0); // outside: ignored
        assert_eq!(c.total(), 8);
        assert!((c.accuracy() - 5.0 / 8.0).abs() < 1e-12);
        let s = c.per_class();
        assert!((s[0].precision - 3.0 / 5.0).abs() < 1e-12);
        assert!((s[0].recall - 3.0 / 4.0).abs() < 1e-12);
        assert!((s[1].precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((s[1].recall - 0.5).abs() < 1e-12);
        let f1_0 = 2.0 * 0.6 * 0.75 / 1.35;
        assert!((s[0].f1 - f1_0).abs() < 1e-12);
        assert_eq!(
            s[2],
            ClassScore {
                precision: 0.0,
                recall: 0.0,
                f1: 0.0,
                support: 0
            }
        );
        assert!((c.macro_f1() - (f1_0 + s[1].f1) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn auc_known_values() {
        let perfect = roc_auc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]).unwrap();
        assert_eq!(perfect, 1.0);
        let inverted = roc_auc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]).unwrap();
        assert_eq!(inverted, 0.0);
        // all tied: chance
        assert_eq!(roc_auc(&[0.5; 4], &[false, true, false, true]).unwrap(), 0.5);
        // one of the four pos/neg pairs misordered
        let auc = roc_auc(&[0.1, 0.35, 0.4, 0.8], &[false, true, false, true]).unwrap();
        assert!((auc - 0.75).abs() < 1e-12);
        assert_eq!(roc_auc(&[0.1, 0.2], &[true, true]), None);
        assert_eq!(roc_auc(&[f32::NAN, 0.2], &[true, false]), None);
    }

    #[test]
    fn quantile_and_detection() {
        let v: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        assert_eq!(quantile(&v, 0.95), Some(95.0));
        assert_eq!(quantile(&v, 0.0), Some(1.0));
        assert_eq!(quantile(&[], 0.5), None);
        let d = detection(&[1.0, 2.0, 3.0, 4.0], &[false, false, true, true], 2.5);
        assert_eq!((d.recall, d.precision, d.false_positive_rate), (1.0, 1.0, 0.0));
        let d = detection(&[1.0, 3.0, 2.0, 4.0], &[false, false, true, true], 2.5);
        assert_eq!((d.recall, d.precision, d.false_positive_rate), (0.5, 0.5, 0.5));
    }

    #[test]
    fn early_stopping_waits_out_patience() {
        let mut e = EarlyStopping::new(2);
        assert!(!e.observe(0, 1.0));
        assert!(!e.observe(1, 0.8));
        assert!(!e.observe(2, 0.9));
        assert!(!e.observe(3, 0.7)); // improvement resets
        assert!(!e.observe(4, 0.7)); // equal is not better
        assert!(e.observe(5, f32::NAN));
        assert_eq!((e.best_round, e.best_loss), (Some(3), Some(0.7)));
    }
}
