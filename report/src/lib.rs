//! The files a node writes about itself, in one place so that the node, the
//! testnet and the tests read and write one schema:
//!
//! - `DIR/results.json` and `DIR/live.json`: [`NodeReport`] (the latter
//!   rewritten once a round while the node runs);
//! - `DIR/progress.json`: [`Progress`];
//! - `DIR/listen.json`: [`ListenFile`].
//!
//! It knows nothing of the node's internals: plain numbers and strings.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Losses can be NaN when a model diverges (an attack can cause that); JSON
/// has no NaN, so they are written as null and read back as NaN.
pub mod lossy_f32 {
    use super::*;

    pub fn serialize<S: Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f32(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
    }
}

pub fn nan() -> f32 {
    f32::NAN
}

/// The figures only some tasks have (the held-out loss and accuracy are
/// reported for every task).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskFigures {
    /// Language models: `exp(loss in nats per character)`.
    pub perplexity: Option<f32>,
    /// Autoencoder: ROC-AUC of the reconstruction error as anomaly score.
    pub roc_auc: Option<f32>,
    /// Classifiers: unweighted mean F1 over classes.
    pub macro_f1: Option<f32>,
}

impl TaskFigures {
    /// The mean of each figure over the items that have it.
    pub fn mean<'a>(items: impl Iterator<Item = &'a TaskFigures> + Clone) -> TaskFigures {
        let mean = |f: fn(&TaskFigures) -> Option<f32>| {
            let v: Vec<f32> = items.clone().filter_map(f).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f32>() / v.len() as f32)
        };
        TaskFigures {
            perplexity: mean(|t| t.perplexity),
            roc_auc: mean(|t| t.roc_auc),
            macro_f1: mean(|t| t.macro_f1),
        }
    }
}

/// One round as a node saw it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    /// Test loss and accuracy of the anchor weights this round started from.
    #[serde(with = "lossy_f32")]
    pub test_loss: f32,
    #[serde(with = "lossy_f32")]
    pub test_acc: f32,
    #[serde(with = "lossy_f32")]
    pub train_loss: f32,
    /// Contributions merged (or clipped) into this round's aggregate.
    pub merged: u64,
    pub rejected: u64,
    /// libp2p byte counters at the end of the round.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Wall-clock milliseconds since the node started.
    pub at_ms: u64,
    pub train_ms: u64,
    pub wait_ms: u64,
}

/// A finished node's results.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub peer_id: String,
    pub author: String,
    pub honest: bool,
    pub attack: Option<String>,
    pub shard: String,
    pub param_count: u64,
    pub rounds_completed: u64,
    #[serde(with = "lossy_f32")]
    pub final_test_acc: f32,
    #[serde(with = "lossy_f32")]
    pub final_test_loss: f32,
    /// The task's own figures for the final weights.
    #[serde(default)]
    pub final_task: TaskFigures,
    /// The model crate's full evaluation of the final weights (per-class
    /// scores and confusion matrix, or the anomaly operating point).
    #[serde(default)]
    pub final_eval: Option<serde_json::Value>,
    /// Early stopping: the round the run ended at, and the best round.
    #[serde(default)]
    pub stopped_early_at: Option<u64>,
    #[serde(default)]
    pub best_round: Option<u64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Gossip messages (records, votes, proofs) this node published, sent
    /// (its own and forwarded ones, each copy) with their bytes, received
    /// new, and received again (copies of ones it had): gossipsub's own
    /// counters.
    #[serde(default)]
    pub gossip_published: u64,
    #[serde(default)]
    pub gossip_sent: u64,
    #[serde(default)]
    pub gossip_sent_bytes: u64,
    #[serde(default)]
    pub gossip_received: u64,
    #[serde(default)]
    pub gossip_duplicates: u64,
    pub updates_published: u64,
    /// Mean size of this node's own encoded payloads.
    pub payload_bytes_mean: f64,
    pub updates_received: u64,
    pub updates_merged: u64,
    pub updates_clipped: u64,
    pub updates_rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Rejections and clips by the author they concern.
    pub rejected_by_author: BTreeMap<String, u64>,
    pub clipped_by_author: BTreeMap<String, u64>,
    pub merged_by_author: BTreeMap<String, u64>,
    /// Updates of keys without a vote yet, judged but not merged (open runs).
    #[serde(default)]
    pub probation_by_author: BTreeMap<String, u64>,
    /// What this node's answers to peers' requests carried, and the
    /// requests it refused because their peer was over its budget.
    #[serde(default)]
    pub served_bytes: u64,
    #[serde(default)]
    pub refused_over_budget: u64,
    pub banned: Vec<String>,
    pub peers_seen: Vec<String>,
    /// Records per class in the blocks this node trained on.
    pub label_histogram: Vec<u64>,
    pub primary_blocks: u64,
    pub held_blocks: u64,
    /// Blocks and bytes fetched from peers, and how long the whole shard
    /// took to arrive (from the end of gathering to round 0).
    pub blocks_fetched: u64,
    pub bytes_fetched: u64,
    pub data_fetch_ms: Option<u64>,
    /// This run of the node resumed from an existing data dir.
    pub restarted: bool,
    /// Rounds at which the node adopted the mesh's anchor from peers (at
    /// start, or when left rounds behind).
    pub joined_at: Vec<u64>,
    /// Rounds whose anchor the node repaired onto the one the votes decided
    /// (or gave up for the last decided one).
    #[serde(default)]
    pub repaired_at: Vec<u64>,
    /// An attacker running Sybil identities (`sybil:K`, `anchor-hijack:K`):
    /// their author keys, the records they signed, and the anchor a hijack
    /// pushes (hex), so the testnet can check that nobody took it.
    #[serde(default)]
    pub sybil_authors: Vec<String>,
    #[serde(default)]
    pub sybil_records: u64,
    #[serde(default)]
    pub poisoned_anchor: Option<String>,
    pub wall_s: f64,
    /// Where a round's time goes: every stage of [`STAGES`] this node ran.
    #[serde(default)]
    pub stages: RoundTimes,
    pub history: Vec<RoundRecord>,
}

/// The stages of a round, in the order a round runs them: loading the
/// anchor (plus the codec's residual) into the replica, the local steps,
/// encoding the delta, signing and storing the own record (durable before
/// it is announced), publishing it, waiting for the others, checking what
/// peers sent, scoring their updates' held-out loss (when the run scores),
/// the robust aggregate, the outer step, storing the verdict
/// block, evaluating the anchor, taking a checkpoint (the trainer's state)
/// and writing it (beside the round).
pub const STAGES: [&str; 14] = [
    "load",
    "train",
    "encode",
    "sign_store",
    "publish",
    "wait",
    "verify",
    "score",
    "aggregate",
    "outer_step",
    "verdict_store",
    "evaluate",
    "checkpoint",
    "checkpoint_write",
];

/// How long one stage took, over a whole run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTime {
    /// How many times it ran.
    pub count: u64,
    pub total_ms: f64,
    pub max_ms: f64,
}

impl StageTime {
    pub fn add(&mut self, ms: f64) {
        self.count += 1;
        self.total_ms += ms;
        self.max_ms = self.max_ms.max(ms);
    }
}

/// A node's round, taken apart.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundTimes {
    /// Rounds closed, and their mean wall-clock time (from one round's
    /// close to the next's).
    pub rounds: u64,
    pub round_ms: f64,
    /// Per stage (names from [`STAGES`]).
    pub stages: BTreeMap<String, StageTime>,
    /// The part of a round that is not the local steps themselves
    /// (`1 - train per round / round_ms`): what the node adds to what plain
    /// PyTorch would spend on the same samples.
    pub overhead_share: f64,
}

impl RoundTimes {
    /// Mean milliseconds `stage` took per round (stages that run on other
    /// threads, like verify or checkpoint_write, overlap the round).
    pub fn per_round_ms(&self, stage: &str) -> f64 {
        match self.stages.get(stage) {
            Some(s) if self.rounds > 0 => s.total_ms / self.rounds as f64,
            _ => 0.0,
        }
    }

    /// Fills in `rounds`, `round_ms` and `overhead_share` from the rounds'
    /// close times (milliseconds since the start, in order).
    pub fn finish(&mut self, closed_at_ms: &[u64]) {
        self.rounds = closed_at_ms.len() as u64;
        if let (Some(first), Some(last)) = (closed_at_ms.first(), closed_at_ms.last()) {
            if closed_at_ms.len() > 1 {
                self.round_ms = last.saturating_sub(*first) as f64 / (closed_at_ms.len() - 1) as f64;
            }
        }
        self.overhead_share = if self.round_ms > 0.0 {
            (1.0 - self.per_round_ms("train") / self.round_ms).max(0.0)
        } else {
            0.0
        };
    }
}

/// `DIR/progress.json`: where a running node is, rewritten every round.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub round: u64,
    pub rounds: u64,
    /// The last finite test accuracy, if any evaluation was made.
    pub test_acc: Option<f32>,
    pub members: usize,
}

/// `DIR/listen.json`: how to reach a node, written once it listens.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ListenFile {
    pub peer_id: String,
    /// The node's ledger author (hex ed25519 key).
    pub author: String,
    /// `http://ADDR/metrics` when metrics are served.
    pub metrics: Option<String>,
    pub run_id: String,
    /// Multiaddrs with `/p2p/<peer id>`.
    pub addrs: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_is_taken_apart_from_its_close_times() {
        let mut t = RoundTimes::default();
        for ms in [60.0, 80.0, 70.0, 70.0] {
            t.stages.entry("train".into()).or_default().add(ms);
        }
        t.stages.entry("encode".into()).or_default().add(4.0);
        // Four rounds closed 100 ms apart.
        t.finish(&[1000, 1100, 1200, 1300]);
        assert_eq!(t.rounds, 4);
        assert_eq!(t.round_ms, 100.0);
        assert_eq!(t.per_round_ms("train"), 70.0);
        assert_eq!(t.per_round_ms("encode"), 1.0);
        assert_eq!(t.per_round_ms("wait"), 0.0);
        assert!((t.overhead_share - 0.3).abs() < 1e-9, "{}", t.overhead_share);
        assert_eq!(t.stages["train"].max_ms, 80.0);
    }

    #[test]
    fn one_round_or_none_has_no_round_time() {
        let mut t = RoundTimes::default();
        t.finish(&[]);
        assert_eq!((t.rounds, t.round_ms, t.overhead_share), (0, 0.0, 0.0));
        t.finish(&[500]);
        assert_eq!((t.rounds, t.round_ms, t.overhead_share), (1, 0.0, 0.0));
    }
}
